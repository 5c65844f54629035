//! `clustergate-control run` as a daemon: publishes, follows the manifest,
//! keeps the last good snapshot through a broken manifest, and publishes
//! nothing new when the tables did not change. `show` and `build` on the
//! command line, with a bad object among good ones (exit 3, or 1 with
//! `--strict`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

#[allow(dead_code)] // reason: shared with the other tests, which use more of it
mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clustergate_control::ModelOptions;
use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::snapshot;
use clustergate_dataplane::table::{ReturnPath, Table};
use support::daemon::{run_on_manifest, wait_generation, write_atomically, Daemon};

fn service(endpoint_port: u16, extra_comment: &str) -> String {
    format!(
        "# {extra_comment}\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: web, namespace: shop}}\n  spec:\n    clusterIP: 198.19.0.10\n    ports: [{{name: http, port: 80, protocol: TCP}}]\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: web-1\n    namespace: shop\n    labels: {{kubernetes.io/service-name: web}}\n  addressType: IPv4\n  ports: [{{name: http, port: {endpoint_port}, protocol: TCP}}]\n  endpoints:\n  - addresses: [198.18.1.1]\n"
    )
}

#[test]
fn run_follows_the_manifest_and_keeps_the_last_good_snapshot() {
    let dir = std::env::temp_dir().join(format!("clustergate-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let manifest = dir.join("manifest.yaml");
    write_atomically(&manifest, &service(8080, "first"));
    let mut d = Daemon {
        dir: dir.clone(),
        child: None,
    };
    d.child = Some(
        run_on_manifest(&manifest, &shm)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);
    let port_of = |dir: &Path| {
        let t = snapshot::load_current(dir).unwrap().unwrap();
        (t.generation(), t.backend_records()[0].port)
    };
    assert_eq!(port_of(&shm), (1, 8080));

    // A broken manifest (not YAML): the snapshot stays, the error says where.
    write_atomically(&manifest, &(service(8080, "broken") + "  - [\n"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(port_of(&shm), (1, 8080), "the last good snapshot stays");

    // Only comments changed: same tables, no new generation.
    write_atomically(&manifest, &service(8080, "reformatted"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        snapshot::read_current(&shm).unwrap(),
        Some(1),
        "no new generation for the same tables"
    );

    // A real change is published as the next generation.
    write_atomically(&manifest, &service(9090, "changed"));
    wait_generation(&shm, 2);
    assert_eq!(port_of(&shm), (2, 9090));

    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("not valid YAML") && log.contains("line"),
        "the error says where: {log}"
    );
    assert!(log.contains("keeping generation 1"), "{log}");
    assert!(log.contains("did not: no new generation"), "{log}");
}

/// The return path of the frontend `addr:port/TCP` in a snapshot file.
fn return_path_in(snap: &Path, addr: &str, port: u16) -> ReturnPath {
    let table = snapshot::load_file(snap).unwrap();
    let f = table
        .frontend(&addr16(addr.parse().unwrap()), port, Proto::Tcp)
        .unwrap();
    Table::return_path(table.frontend_record(f).unwrap())
}

/// `show --output json` prints exactly the model's JSON, and the table view
/// lists frontends (with their return paths) and skipped objects; `build`
/// writes a snapshot the dataplane accepts, with the return paths.
#[test]
fn show_and_build_from_the_command_line() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cluster.yaml");
    let bin = env!("CARGO_BIN_EXE_clustergate-control");
    let out = Command::new(bin)
        .args(["show", "--manifest", fixture, "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let model =
        clustergate_control::load_manifest_file(Path::new(fixture), &ModelOptions::default())
            .unwrap();
    assert_eq!(printed, model.to_json());
    let mut keys: Vec<&String> = printed.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "frontends",
            "health_checks",
            "node_port_addresses",
            "nodes",
            "notes",
            "skipped"
        ]
    );
    assert!(printed["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["return_path"] == "snat"));

    let out = Command::new(bin)
        .args(["show", "--manifest", fixture, "--output", "table"])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("TCP  198.19.0.10:80 ClusterIP default/web:http snat\n"),
        "{table}"
    );
    assert!(!table.contains("not served"), "{table}");
    assert!(
        table.contains("TCP  0.0.0.0:30080 NodePort default/exposed:http snat on node addresses in 0.0.0.0/0\n"),
        "{table}"
    );
    assert!(
        table.contains("Service default/headless: headless"),
        "{table}"
    );

    let dir = std::env::temp_dir().join(format!("clustergate-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("t.snap");
    let out = Command::new(bin)
        .args(["build", "--manifest", fixture, "--generation", "5", "--out"])
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = snapshot::load_file(&snap).unwrap();
    assert_eq!(table.generation(), 5);
    assert_eq!(table.frontends().len(), model.service_specs().len());
    assert!(table
        .frontends()
        .iter()
        .all(|f| f.return_path == ReturnPath::Snat as u8));
    assert_eq!(return_path_in(&snap, "198.19.0.10", 80), ReturnPath::Snat);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--return-path` on `show` and `build`: the default of Services without the
/// annotation; an annotated Service keeps its own; other values are refused.
#[test]
fn the_return_path_flag_from_the_command_line() {
    let bin = env!("CARGO_BIN_EXE_clustergate-control");
    let dir = std::env::temp_dir().join(format!("clustergate-return-path-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("m.yaml");
    std::fs::write(&manifest, two_services()).unwrap();

    let out = Command::new(bin)
        .args([
            "show",
            "--output",
            "table",
            "--return-path",
            "routed",
            "--manifest",
        ])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("TCP  198.19.0.10:80 ClusterIP shop/web:http routed\n"),
        "{table}"
    );
    assert!(
        table.contains("TCP  198.19.0.20:80 ClusterIP shop/direct:http dsr\n"),
        "{table}"
    );
    assert!(
        table.contains(
            "\nNotes:\n  Service shop/direct: dsr: ClusterIP frontend 198.19.0.20:80/TCP"
        ),
        "{table}"
    );

    let out = Command::new(bin)
        .args([
            "show",
            "--output",
            "json",
            "--return-path",
            "dsr",
            "--manifest",
        ])
        .arg(&manifest)
        .output()
        .unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = printed["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["return_path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["dsr", "dsr"]);
    assert_eq!(printed["notes"].as_array().unwrap().len(), 2, "{printed}");

    for (flag, web) in [
        (None, ReturnPath::Snat),
        (Some("routed"), ReturnPath::Routed),
        (Some("snat"), ReturnPath::Snat),
    ] {
        let snap = dir.join("t.snap");
        let mut cmd = Command::new(bin);
        cmd.args(["build", "--manifest"])
            .arg(&manifest)
            .arg("--out")
            .arg(&snap);
        if let Some(flag) = flag {
            cmd.args(["--return-path", flag]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(return_path_in(&snap, "198.19.0.10", 80), web, "{flag:?}");
        assert_eq!(
            return_path_in(&snap, "198.19.0.20", 80),
            ReturnPath::Dsr,
            "annotated, {flag:?}"
        );
    }

    for args in [
        &["show", "--return-path", "bogus", "--manifest"][..],
        &[
            "build",
            "--out",
            "/nonexistent/t.snap",
            "--return-path",
            "bogus",
            "--manifest",
        ][..],
        &["run", "--once", "--return-path", "bogus", "--manifest"][..],
    ] {
        let out = Command::new(bin)
            .args(args)
            .arg(&manifest)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("invalid value 'bogus' for '--return-path <PATH>'")
                && stderr.contains("[possible values: snat, dsr, routed]"),
            "{args:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `shop/web` (no annotation, 80 -> 8080) and `shop/direct` (annotated dsr,
/// 80 -> 8080, so noted).
fn two_services() -> String {
    let svc = |name: &str, ip: &str, annotations: &str| {
        format!("- apiVersion: v1\n  kind: Service\n  metadata: {{name: {name}, namespace: shop{annotations}}}\n  spec:\n    clusterIP: {ip}\n    ports: [{{name: http, port: 80, protocol: TCP}}]\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {name}-1\n    namespace: shop\n    labels: {{kubernetes.io/service-name: {name}}}\n  addressType: IPv4\n  ports: [{{name: http, port: 8080, protocol: TCP}}]\n  endpoints:\n  - addresses: [198.18.1.1]\n")
    };
    format!(
        "apiVersion: v1\nkind: List\nitems:\n{}{}",
        svc("web", "198.19.0.10", ""),
        svc(
            "direct",
            "198.19.0.20",
            ", annotations: {clustergate.io/return-path: dsr}"
        )
    )
}

/// `run --return-path` publishes the chosen return paths and logs the notes
/// as warnings.
#[test]
fn run_publishes_return_paths_and_warns_of_notes() {
    let dir = std::env::temp_dir().join(format!("clustergate-run-rp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let manifest = dir.join("manifest.yaml");
    std::fs::write(&manifest, two_services()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
        .args(["run", "--once", "--return-path", "routed", "--manifest"])
        .arg(&manifest)
        .arg("--shm-dir")
        .arg(&shm)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let table = snapshot::load_current(&shm).unwrap().unwrap();
    let path = |addr: &str| {
        let f = table
            .frontend(&addr16(addr.parse().unwrap()), 80, Proto::Tcp)
            .unwrap();
        Table::return_path(table.frontend_record(f).unwrap())
    };
    assert_eq!(path("198.19.0.10"), ReturnPath::Routed);
    assert_eq!(path("198.19.0.20"), ReturnPath::Dsr);
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("Service shop/direct"))
        .unwrap_or_else(|| panic!("no warning for the note in {log}"));
    assert!(
        warning.contains(
            "dsr: ClusterIP frontend 198.19.0.20:80/TCP delivers the client's packets unchanged"
        ),
        "{warning}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--nodeport-addresses` and `--service-node-port-range` on `show` and
/// `build`; bad values are refused by name.
#[test]
fn node_port_flags_from_the_command_line() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cluster.yaml");
    let bin = env!("CARGO_BIN_EXE_clustergate-control");
    let out = Command::new(bin)
        .args(["show", "--manifest", fixture, "--output", "json"])
        .args(["--nodeport-addresses", "10.0.0.0/8,2001:db8::/64"])
        .args(["--service-node-port-range", "30000-30079"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed["node_port_addresses"],
        serde_json::json!(["10.0.0.0/8", "2001:db8::/64"])
    );
    assert!(
        !printed["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "NodePort"),
        "30080 is outside 30000-30079"
    );
    assert!(printed["skipped"].as_array().unwrap().iter().any(|s| {
        s["object"] == "Service default/exposed"
            && s["reason"].as_str().unwrap().starts_with(
                "spec.ports[0].nodePort: 30080 is outside the node port range 30000-30079",
            )
    }));

    // build takes them too; the snapshot holds the node port frontend. (The
    // snapshot format does not carry the node-port addresses yet: the
    // dataplane's side of issue 11.)
    let dir = std::env::temp_dir().join(format!("clustergate-npflags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("t.snap");
    let out = Command::new(bin)
        .args(["build", "--manifest", fixture, "--out"])
        .arg(&snap)
        .args(["--nodeport-addresses", "192.168.0.0/16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = snapshot::load_file(&snap).unwrap();
    assert!(table
        .frontend(&addr16("0.0.0.0".parse().unwrap()), 30080, Proto::Tcp)
        .is_some());
    let _ = std::fs::remove_dir_all(&dir);

    for (flag, value) in [
        ("--nodeport-addresses", "10.0.0.0/33"),
        ("--nodeport-addresses", "somewhere"),
        ("--service-node-port-range", "32767-30000"),
        ("--service-node-port-range", "30000"),
    ] {
        let out = Command::new(bin)
            .args(["show", "--manifest", fixture, flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains(value), "{err}");
    }
}

/// `shop/web` (good, its slice's address written with a leading zero as old
/// objects may have it) and `shop/bad`, whose clusterIP does not parse.
const WITH_A_BAD_OBJECT: &str = "apiVersion: v1\nkind: List\nitems:\n\
- apiVersion: v1\n  kind: Service\n  metadata: {name: web, namespace: shop}\n  spec:\n    clusterIP: 198.19.0.10\n    ports: [{name: http, port: 80}]\n\
- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: web-1\n    namespace: shop\n    labels: {kubernetes.io/service-name: web}\n  addressType: IPv4\n  ports: [{name: http, port: 8080}]\n  endpoints:\n  - addresses: [198.18.001.1]\n\
- apiVersion: v1\n  kind: Service\n  metadata: {name: bad, namespace: shop}\n  spec:\n    clusterIP: 198.19.0.x\n    ports: [{port: 81}]\n";

const BAD_REASON: &str =
    "spec.clusterIP: \"198.19.0.x\" is not an IP address; the Service is skipped";

/// Issue 18: `show` and `build` print and build the good objects, list the bad
/// one under Skipped, and exit 3; `--strict` refuses (exit 1, nothing out).
#[test]
fn show_and_build_skip_a_bad_object_and_exit_3() {
    let dir = std::env::temp_dir().join(format!("clustergate-bad-object-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("manifest.yaml");
    std::fs::write(&manifest, WITH_A_BAD_OBJECT).unwrap();
    let bin = env!("CARGO_BIN_EXE_clustergate-control");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .arg("--manifest")
            .arg(&manifest)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };

    let (code, stdout, stderr) = run(&["show", "--output", "json"]);
    assert_eq!(code, Some(3), "{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let frontends: Vec<String> = printed["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{} {}:{} -> {}",
                f["service"].as_str().unwrap(),
                f["address"].as_str().unwrap(),
                f["port"],
                f["backends"][0]["address"].as_str().unwrap_or("none")
            )
        })
        .collect();
    assert_eq!(frontends, ["shop/web 198.19.0.10:80 -> 198.18.1.1"]);
    assert_eq!(
        printed["skipped"],
        serde_json::json!([{"object": "Service shop/bad", "reason": BAD_REASON, "label": "invalid_address"}])
    );
    assert!(
        stderr.contains("Service shop/bad")
            && stderr.contains(BAD_REASON.split(';').next().unwrap()),
        "one log line names the object, the field and the reason: {stderr}"
    );

    let (code, stdout, stderr) = run(&["show"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stdout.contains("TCP  198.19.0.10:80 ClusterIP shop/web:http snat\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("\nSkipped:\n  Service shop/bad: {BAD_REASON}\n")),
        "{stdout}"
    );

    let snap = dir.join("snap");
    let (code, _, stderr) = run(&["build", "--out", snap.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("exit status 3"), "{stderr}");
    let table = snapshot::load_file(&snap).unwrap();
    assert_eq!(table.frontends().len(), 1, "the good Service is built");
    assert!(table
        .frontend(&addr16("198.19.0.10".parse().unwrap()), 80, Proto::Tcp)
        .is_some());

    // --strict: today's refusal, naming the object and field; nothing out.
    let (code, stdout, stderr) = run(&["show", "--strict"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("Service shop/bad: spec.clusterIP: \"198.19.0.x\" is not an IP address"),
        "{stderr}"
    );
    let strict_snap = dir.join("strict-snap");
    let (code, _, stderr) = run(&["build", "--strict", "--out", strict_snap.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!strict_snap.exists(), "nothing is written");

    // Without the bad object: exit 0, with or without --strict.
    std::fs::write(
        &manifest,
        WITH_A_BAD_OBJECT
            .split("- apiVersion: v1\n  kind: Service\n  metadata: {name: bad")
            .next()
            .unwrap(),
    )
    .unwrap();
    for args in [&["show"][..], &["show", "--strict"][..]] {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stdout.contains("Skipped:"), "{stdout}");
    }
    let help = Command::new(bin).args(["show", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("3 the rest was printed/built"));
    let _ = std::fs::remove_dir_all(&dir);
}
