//! What an operator sees of `clustergate-control` (issue 16): `show` against
//! the API prints exactly what `show --manifest` prints on the same objects;
//! `--log-format json` writes one JSON object per line; SIGTERM and SIGINT
//! end `run` with status 0 after a log line, the snapshot intact; `--version`
//! names the commit, the snapshot ABI and the flow hash.
//!
//! The API is the scripted one of `support/apiserver.rs`, on 127.0.0.1.
//! Every wait is bounded ([`WAIT`]); each test has its own directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

#[allow(dead_code)] // reason: shared with the other tests, which use other parts
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clustergate_dataplane::snapshot;
use serde_json::{json, Value};
use support::apiserver::ApiServer;
use support::daemon::{run_on_manifest, wait_generation, write_atomically, Daemon};

/// The most any step waits.
const WAIT: Duration = Duration::from_secs(20);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clustergate-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A kubeconfig for `server` (no TLS, no credentials), written into `dir`.
fn kubeconfig(dir: &Path, server: &ApiServer) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            server.url()
        ),
    )
    .unwrap();
    path
}

/// Waits for `child` at most `bound`; kills it and panics past that.
fn wait_exit(child: &mut Child, bound: Duration, what: &str) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `command` to its end (at most [`WAIT`]): (exit code, stdout, stderr).
fn output(mut command: Command) -> (i32, String, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes on threads, so a full pipe cannot stall the child.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let status = wait_exit(&mut child, WAIT, "clustergate-control");
    (
        status.code().expect("exited, not killed"),
        out.join().unwrap(),
        err.join().unwrap(),
    )
}

// ---- objects: the same ones for the API server and the manifest ----

fn service(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

fn slice(ns: &str, name: &str, svc: &str, port: u16, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn ep(address: &str, ready: bool, node: &str) -> Value {
    json!({
        "addresses": [address],
        "conditions": {"ready": ready, "serving": ready, "terminating": false},
        "nodeName": node,
    })
}

/// Services of every kind with slices, two nodes, one Service the proxy name
/// excludes, and (with `bad`) a Service whose cluster IP does not parse.
fn objects(bad: bool) -> Vec<Value> {
    let mut v = vec![
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a"},
            "spec": {"podCIDR": "198.18.1.0/24", "podCIDRs": ["198.18.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]},
        }),
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-b"},
            "spec": {"podCIDR": "198.18.2.0/24", "podCIDRs": ["198.18.2.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.2"}]},
        }),
        service(
            "shop",
            "api",
            json!({
                "type": "NodePort", "clusterIP": "198.19.0.11", "clusterIPs": ["198.19.0.11"],
                "externalIPs": ["203.0.113.7"],
                "ports": [{"name": "http", "port": 8000, "protocol": "TCP", "nodePort": 30080}],
            }),
        ),
        service(
            "shop",
            "lb",
            json!({
                "type": "LoadBalancer", "clusterIP": "198.19.0.12", "clusterIPs": ["198.19.0.12"],
                "externalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 443, "protocol": "TCP", "nodePort": 30443}],
            }),
        ),
        service(
            "shop",
            "web",
            json!({
                "type": "ClusterIP", "clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"],
                "internalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            }),
        ),
        {
            let mut other = service(
                "tools",
                "other",
                json!({
                    "type": "ClusterIP", "clusterIP": "198.19.0.20", "clusterIPs": ["198.19.0.20"],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                }),
            );
            other["metadata"]["labels"] =
                json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
            other
        },
        slice(
            "shop",
            "api-1",
            "api",
            9000,
            json!([
                ep("198.18.1.5", true, "node-a"),
                ep("198.18.2.5", false, "node-b")
            ]),
        ),
        slice(
            "shop",
            "lb-1",
            "lb",
            8443,
            json!([
                ep("198.18.1.6", true, "node-a"),
                ep("198.18.2.6", true, "node-b")
            ]),
        ),
        slice(
            "shop",
            "web-1",
            "web",
            8080,
            json!([
                ep("198.18.1.1", true, "node-a"),
                ep("198.18.2.2", true, "node-b")
            ]),
        ),
    ];
    if bad {
        v.push(service(
            "shop",
            "bad",
            json!({
                "type": "ClusterIP", "clusterIP": "198.19.0.x", "clusterIPs": ["198.19.0.x"],
                "ports": [{"name": "http", "port": 81, "protocol": "TCP"}],
            }),
        ));
    }
    v
}

/// The objects as a `kubectl get -o yaml`-style List (JSON is YAML).
fn manifest_of(objects: &[Value]) -> String {
    serde_json::to_string_pretty(&json!({"apiVersion": "v1", "kind": "List", "items": objects}))
        .unwrap()
}

/// `show` with `source` (`--manifest PATH` or `--kubeconfig PATH`) and `flags`.
fn show(source: &[&str], flags: &[&str]) -> (i32, String, String) {
    let mut c = bin();
    c.arg("show").args(source).args(flags);
    output(c)
}

/// `show --kubeconfig` and `show --manifest` on the same objects, with the
/// same flags: the same status and byte-for-byte the same stdout. Returns
/// (status, stdout).
fn same_show(kubeconfig: &Path, manifest: &Path, flags: &[&str]) -> (i32, String) {
    let api = show(&["--kubeconfig", kubeconfig.to_str().unwrap()], flags);
    let file = show(&["--manifest", manifest.to_str().unwrap()], flags);
    assert_eq!(
        api.0, file.0,
        "exit status with {flags:?}\napi stderr:\n{}\nmanifest stderr:\n{}",
        api.2, file.2
    );
    assert_eq!(
        api.1, file.1,
        "stdout with {flags:?}\napi stderr:\n{}\nmanifest stderr:\n{}",
        api.2, file.2
    );
    (api.0, api.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_from_the_api_prints_what_show_from_a_manifest_prints() {
    let server = ApiServer::start().await;
    let dir = scratch("show");
    let kubeconfig = kubeconfig(&dir, &server);
    let manifest = dir.join("cluster.yaml");

    let run = |flags: &'static [&'static str]| {
        let (k, m) = (kubeconfig.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || same_show(&k, &m, flags))
    };

    // All objects usable: status 0, in both formats and with every model flag.
    for o in objects(false) {
        server.apply(o);
    }
    std::fs::write(&manifest, manifest_of(&objects(false))).unwrap();
    let (status, table) = run(&[]).await.unwrap();
    assert_eq!(status, 0, "{table}");
    for want in [
        "198.19.0.10:80",
        "198.19.0.11:8000",
        "203.0.113.7:8000",
        ":30080",
        ":30443",
        "198.18.1.5:9000",
    ] {
        assert!(table.contains(want), "{want} missing from\n{table}");
    }
    assert!(
        !table.contains("198.19.0.20"),
        "another proxy's Service is not ours:\n{table}"
    );
    let (status, text) = run(&["--output", "json"]).await.unwrap();
    assert_eq!(status, 0);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["frontends"].as_array().is_some_and(|f| f.len() >= 5),
        "{text}"
    );
    let flags: &[&str] = &[
        "--output",
        "json",
        "--return-path",
        "dsr",
        "--nodeport-addresses",
        "198.18.0.1/32",
        "--service-node-port-range",
        "30000-30100",
        "--proxy-name",
        "someone-else",
    ];
    let (status, text) = run(flags).await.unwrap();
    assert_eq!(status, 0);
    assert!(
        text.contains("198.19.0.20"),
        "the other proxy's now:\n{text}"
    );
    let (status, _) = run(&[
        "--return-path",
        "routed",
        "--service-node-port-range",
        "30000-30100",
    ])
    .await
    .unwrap();
    assert_eq!(status, 0);

    // One invalid object: skipped and listed, the rest printed, status 3;
    // with --strict, status 1 and nothing printed, from both sources.
    let bad = objects(true);
    server.apply(bad.last().unwrap().clone());
    std::fs::write(&manifest, manifest_of(&bad)).unwrap();
    let (status, table) = run(&[]).await.unwrap();
    assert_eq!(status, 3, "{table}");
    assert!(table.contains("shop/bad"), "{table}");
    assert!(table.contains("198.19.0.10:80"), "{table}");
    let (status, text) = run(&["--output", "json"]).await.unwrap();
    assert_eq!(status, 3);
    assert!(text.contains("198.19.0.x"), "{text}");
    let (status, out) = run(&["--strict"]).await.unwrap();
    assert_eq!((status, out.as_str()), (1, ""));
    let (status, out) = run(&["--strict", "--output", "json"]).await.unwrap();
    assert_eq!((status, out.as_str()), (1, ""));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An API server that does not answer: `show` fails (status 1) naming what it did.
#[test]
fn show_from_an_unreachable_api_fails() {
    let dir = scratch("show-down");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n"
        ),
    )
    .unwrap();
    let (status, out, err) = show(&["--kubeconfig", path.to_str().unwrap()], &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((status, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("listing Services"), "{err}");
}

/// Two sources, or none, is a usage error.
#[test]
fn show_takes_exactly_one_source() {
    let (status, _, err) = show(&[], &[]);
    assert_eq!(status, 2, "{err}");
    let (status, _, err) = show(&["--manifest", "x.yaml", "--in-cluster"], &[]);
    assert_eq!(status, 2, "{err}");
}

// ---- run: logs and signals ----

/// A manifest with `shop/web` and, to log a warning too, an invalid Service.
fn run_manifest() -> String {
    let mut v = objects(true);
    v.retain(|o| o["metadata"]["namespace"] == "shop" && o["metadata"]["name"] != "api");
    manifest_of(&v)
}

/// `run` on [`run_manifest`] with `flags`, stderr into `dir/log`; waits for
/// generation 1.
fn start_run(dir: &Path, flags: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let path = dir.join("manifest.yaml");
    write_atomically(&path, &run_manifest());
    let shm = dir.join("shm");
    let log = dir.join("log");
    let child = run_on_manifest(&path, &shm)
        .args(flags)
        .args(["--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon {
        dir: dir.to_owned(),
        child: Some(child),
    };
    wait_generation(&shm, 1);
    (d, shm, log)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name}");
}

/// `signal` to the daemon: it exits 0 within 5 s; returns its log.
fn stop_with(d: &mut Daemon, log: &Path, name: &str) -> String {
    let child = d.child.as_mut().unwrap();
    signal(child, name);
    let status = wait_exit(child, Duration::from_secs(5), "run after a signal");
    d.child = None;
    let text = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "{name}: {status}\n{text}");
    text
}

/// The published snapshot is whole: it loads (checksummed), has the
/// expected generation and `shop/web`'s frontend.
fn assert_intact(shm: &Path, generation: u64) {
    assert_eq!(snapshot::read_current(shm).unwrap(), Some(generation));
    let table = snapshot::load_current(shm).unwrap().unwrap();
    assert_eq!(table.generation(), generation);
    assert!(
        table
            .frontends()
            .iter()
            .any(
                |f| clustergate_dataplane::flow::ip_from16(f.addr).to_string() == "198.19.0.10"
                    && f.port == 80
            ),
        "shop/web is published"
    );
}

#[test]
fn sigterm_stops_run_cleanly() {
    let dir = scratch("sigterm");
    let (mut d, shm, log) = start_run(&dir, &[]);
    let text = stop_with(&mut d, &log, "TERM");
    assert!(text.contains("received SIGTERM, stopping"), "{text}");
    assert!(
        text.contains("stopped; generation 1 stays published"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "no colour into a file:\n{text}");
    assert_intact(&shm, 1);
}

#[test]
fn sigint_stops_run_cleanly_after_a_change() {
    let dir = scratch("sigint");
    let (mut d, shm, log) = start_run(&dir, &[]);
    // A second generation, then SIGINT while it keeps polling.
    let path = dir.join("manifest.yaml");
    write_atomically(&path, &run_manifest().replace("198.18.1.1", "198.18.1.9"));
    wait_generation(&shm, 2);
    let text = stop_with(&mut d, &log, "INT");
    assert!(text.contains("received SIGINT, stopping"), "{text}");
    assert_intact(&shm, 2);
    assert_eq!(
        snapshot::load_current(&shm).unwrap().unwrap().generation(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_run_against_the_api() {
    let server = ApiServer::start().await;
    for o in objects(false) {
        server.apply(o);
    }
    let dir = scratch("sigterm-api");
    let kubeconfig = kubeconfig(&dir, &server);
    let shm = dir.join("shm");
    let log = dir.join("log");
    let child = bin()
        .arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--shm-dir")
        .arg(&shm)
        .args(["--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        dir: dir.clone(),
        child: Some(child),
    };
    let text = tokio::task::spawn_blocking(move || {
        wait_generation(&shm, 1);
        let text = stop_with(&mut d, &log, "TERM");
        assert_intact(&shm, 1);
        text
    })
    .await
    .unwrap();
    let lines = json_lines(&text);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "received SIGTERM, stopping"),
        "{text}"
    );
}

/// Every line of `text` as a JSON object with a `level` and a `message`.
fn json_lines(text: &str) -> Vec<Value> {
    assert!(text.ends_with('\n'), "whole lines:\n{text}");
    text.lines()
        .map(|line| {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(v.is_object(), "not an object: {line}");
            for field in ["level", "message", "timestamp", "target"] {
                assert!(v[field].is_string(), "no string {field:?} in {line}");
            }
            v
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = scratch("json");
    let (mut d, shm, log) = start_run(&dir, &["--log-format", "json"]);
    let text = stop_with(&mut d, &log, "TERM");
    let lines = json_lines(&text);
    let levels: Vec<&str> = lines.iter().filter_map(|l| l["level"].as_str()).collect();
    assert!(
        levels.contains(&"INFO") && levels.contains(&"WARN"),
        "{text}"
    );
    let published = lines
        .iter()
        .find(|l| l["message"] == "published")
        .unwrap_or_else(|| panic!("no publish line in\n{text}"));
    assert_eq!(
        published["generation"], 1,
        "fields are top-level: {published}"
    );
    let skipped = lines
        .iter()
        .find(|l| l["level"] == "WARN" && l["object"] == "Service shop/bad")
        .unwrap_or_else(|| panic!("no skip warning in\n{text}"));
    assert_eq!(skipped["reason"], "invalid_address");
    assert!(lines
        .iter()
        .any(|l| l["message"] == "received SIGTERM, stopping"));
    assert_intact(&shm, 1);
}

#[test]
fn text_logs_have_no_colour_off_a_terminal() {
    let dir = scratch("text");
    let (mut d, _shm, log) = start_run(&dir, &["--log-format", "text"]);
    let text = stop_with(&mut d, &log, "TERM");
    assert!(text.contains(" INFO "), "{text}");
    assert!(text.contains(" WARN "), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escapes in\n{text}");
}

#[test]
fn an_unknown_log_format_is_a_usage_error() {
    let mut c = bin();
    c.args(["--log-format", "xml", "maglev", "--backends", "1"]);
    let (status, _, err) = output(c);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("json"), "lists the formats: {err}");
}

// ---- --version ----

#[test]
fn version_names_commit_abi_and_hash() {
    for flag in ["--version", "-V"] {
        let mut c = bin();
        c.arg(flag);
        let (status, out, err) = output(c);
        assert_eq!(status, 0, "{err}");
        let line = out
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("one line: {out:?}"));
        let rest = line
            .strip_prefix(&format!(
                "clustergate-control {} (commit ",
                env!("CARGO_PKG_VERSION")
            ))
            .unwrap_or_else(|| panic!("{line}"));
        let (commit, rest) = rest.split_once(", ").unwrap();
        assert!(
            commit == "unknown"
                || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
            "{line}"
        );
        assert_eq!(
            rest,
            format!(
                "snapshot ABI {}, flow hash {} = XXH3-64)",
                snapshot::ABI_VERSION,
                snapshot::HASH_XXH3_64
            ),
            "{line}"
        );
        // Built from this checkout: the commit is its HEAD (when git can say).
        let head = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output();
        if let Ok(head) = head {
            if head.status.success() {
                let head = String::from_utf8(head.stdout).unwrap();
                assert_eq!(commit, head.trim(), "{line}");
            }
        }
    }
}
