//! `clustergate-control run --manifest` serves `--metrics` and `--health` on
//! loopback: the metric names, the generation gauge, the sync histogram and
//! the change counters follow the publishes, and `/healthz` and `/livez`
//! answer 200. With the API as the source (the test API server of
//! `support/`): network programming latency from the slices' trigger times,
//! watch restarts, and `/healthz` answering 503 while the API is unreachable.
//! (The other 503 cases are unit tests of the health state, with a fake clock,
//! in `src/health.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

#[allow(dead_code)] // reason: shared with kube_api.rs, which uses more of it
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::apiserver::ApiServer;
use support::daemon::{run_on_manifest, wait_generation, write_atomically, Daemon};

const WAIT: Duration = Duration::from_secs(30);

fn manifest(endpoint_port: u16, addresses: &str) -> String {
    format!(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: web, namespace: shop}}\n  spec:\n    clusterIP: 198.19.0.10\n    ports: [{{name: http, port: 80, protocol: TCP}}]\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: web-1\n    namespace: shop\n    labels: {{kubernetes.io/service-name: web}}\n  addressType: IPv4\n  ports: [{{name: http, port: {endpoint_port}, protocol: TCP}}]\n  endpoints:\n  - addresses: [{addresses}]\n"
    )
}

/// A loopback port nothing listens on (bound, read, released).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// GET `path` from `addr`: (status, body); retries the connection until the
/// daemon listens.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let t = Instant::now();
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) => {
                assert!(t.elapsed() < WAIT, "{addr} never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// `/metrics` once it shows `generation`: the daemon publishes the snapshot
/// before it updates its gauges, so a reader that saw the shared-memory
/// generation may briefly get the previous one here.
fn metrics_at(addr: SocketAddr, generation: f64) -> String {
    let t = Instant::now();
    loop {
        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        let now = sample(&text, "clustergate_snapshot_generation");
        if now == generation {
            return text;
        }
        assert!(
            t.elapsed() < WAIT,
            "metrics stayed at generation {now}, not {generation}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the sample `name` (exact name, no labels) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_and_health_follow_the_publishes() {
    let dir = std::env::temp_dir().join(format!("clustergate-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let path = dir.join("manifest.yaml");
    write_atomically(&path, &manifest(8080, "198.18.1.1"));
    let (metrics, health) = (free_port(), free_port());
    let mut d = Daemon {
        dir: dir.clone(),
        child: None,
    };
    d.child = Some(
        run_on_manifest(&path, &shm)
            .arg("--metrics")
            .arg(metrics.to_string())
            .arg("--health")
            .arg(health.to_string())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);

    let text = metrics_at(metrics, 1.0);
    for name in [
        "clustergate_sync_proxy_rules_duration_seconds",
        "clustergate_network_programming_duration_seconds",
        "clustergate_service_changes_total",
        "clustergate_endpoint_changes_total",
        "clustergate_sync_proxy_rules_last_timestamp_seconds",
        "clustergate_watch_restarts_total",
        "clustergate_snapshot_generation",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from\n{text}"
        );
    }
    assert_eq!(sample(&text, "clustergate_snapshot_generation"), 1.0);
    assert!(sample(&text, "clustergate_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(sample(&text, "clustergate_sync_proxy_rules_last_timestamp_seconds") > 1.0e9);
    let services = sample(&text, "clustergate_service_changes_total");
    let slices = sample(&text, "clustergate_endpoint_changes_total");
    assert_eq!((services, slices), (1.0, 1.0), "the first look adds both");

    // Only the slice changes: generation 2, one more endpoint change.
    write_atomically(&path, &manifest(9090, "198.18.1.1, 198.18.1.2"));
    wait_generation(&shm, 2);
    let text = metrics_at(metrics, 2.0);
    assert_eq!(sample(&text, "clustergate_snapshot_generation"), 2.0);
    assert!(sample(&text, "clustergate_sync_proxy_rules_duration_seconds_count") >= 2.0);
    assert_eq!(sample(&text, "clustergate_service_changes_total"), services);
    assert_eq!(
        sample(&text, "clustergate_endpoint_changes_total"),
        slices + 1.0
    );

    let (status, body) = get(health, "/healthz");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["nodeEligible"], true, "{body}");
    assert!(v["lastUpdated"].is_string(), "{body}");
    assert!(v["currentTime"].is_string(), "{body}");
    let (status, body) = get(health, "/livez");
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(health, "/nothing").0, 404);
    assert_eq!(get(metrics, "/healthz").0, 404);
}

/// `manifest(port, "198.18.1.1")` and, when given, a Service `shop/bad`
/// with `cluster_ip`.
fn with_bad(endpoint_port: u16, cluster_ip: Option<&str>) -> String {
    manifest(endpoint_port, "198.18.1.1")
        + &cluster_ip
            .map(|ip| {
                format!(
                    "- apiVersion: v1\n  kind: Service\n  metadata: {{name: bad, namespace: shop}}\n  spec:\n    clusterIP: {ip}\n    ports: [{{port: 81, protocol: TCP}}]\n"
                )
            })
            .unwrap_or_default()
}

const SKIPPED_BAD_IP: &str =
    "clustergate_control_objects_skipped{kind=\"Service\",reason=\"invalid_address\"}";

/// `/metrics` once the sample `name` reads `value`.
fn metrics_when(addr: SocketAddr, name: &str, value: f64) -> String {
    let t = Instant::now();
    loop {
        let text = get(addr, "/metrics").1;
        if text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            == Some(value)
        {
            return text;
        }
        assert!(t.elapsed() < WAIT, "{name} never read {value}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The frontends of the current snapshot in `shm`: (address, port, backend ports).
fn snapshot_frontends(shm: &std::path::Path) -> Vec<(String, u16, Vec<u16>)> {
    let t = clustergate_dataplane::snapshot::load_current(shm)
        .unwrap()
        .unwrap();
    let mut out: Vec<(String, u16, Vec<u16>)> = t
        .frontends()
        .iter()
        .map(|f| {
            let ports = t.backends_of(f).iter().map(|b| b.port).collect();
            (
                clustergate_dataplane::flow::ip_from16(f.addr).to_string(),
                f.port,
                ports,
            )
        })
        .collect();
    out.sort();
    out
}

/// Issue 18 with the manifest source: a bad object among good ones is
/// skipped (gauge, `/healthz` body, one log line), the rest published; an
/// unrelated change is published; fixing it (with a leading-zero address)
/// serves it; deleting it brings the gauge back to 0.
#[test]
fn a_bad_object_in_the_manifest_is_skipped_and_counted() {
    let dir = std::env::temp_dir().join(format!("clustergate-skipped-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let path = dir.join("manifest.yaml");
    write_atomically(&path, &with_bad(8080, Some("198.19.0.x")));
    let (metrics, health) = (free_port(), free_port());
    let log = dir.join("log");
    let mut d = Daemon {
        dir: dir.clone(),
        child: None,
    };
    d.child = Some(
        run_on_manifest(&path, &shm)
            .arg("--metrics")
            .arg(metrics.to_string())
            .arg("--health")
            .arg(health.to_string())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);
    assert_eq!(
        snapshot_frontends(&shm),
        [("198.19.0.10".to_owned(), 80, vec![8080])]
    );
    metrics_at(metrics, 1.0);
    metrics_when(metrics, SKIPPED_BAD_IP, 1.0);
    let (status, body) = get(health, "/healthz");
    assert_eq!(
        status, 200,
        "skipped objects do not make it unhealthy: {body}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["skipped"].clone(), v["invalid"].clone()),
        (json!(1), json!(1)),
        "{body}"
    );

    // An unrelated change while it is there: published.
    write_atomically(&path, &with_bad(9090, Some("198.19.0.x")));
    wait_generation(&shm, 2);
    assert_eq!(
        snapshot_frontends(&shm),
        [("198.19.0.10".to_owned(), 80, vec![9090])]
    );

    // Fixed, with a legacy leading-zero address: served, the gauge falls.
    write_atomically(&path, &with_bad(9090, Some("198.19.0.011")));
    wait_generation(&shm, 3);
    assert_eq!(
        snapshot_frontends(&shm),
        [
            ("198.19.0.10".to_owned(), 80, vec![9090]),
            ("198.19.0.11".to_owned(), 81, vec![]),
        ]
    );
    metrics_when(metrics, SKIPPED_BAD_IP, 0.0);

    // Bad again, then deleted: the gauge rises and falls back.
    write_atomically(&path, &with_bad(9090, Some("198.19.0.x")));
    wait_generation(&shm, 4);
    metrics_when(metrics, SKIPPED_BAD_IP, 1.0);
    write_atomically(&path, &with_bad(9090, None));
    metrics_when(metrics, SKIPPED_BAD_IP, 0.0);
    let v: Value = serde_json::from_str(&get(health, "/healthz").1).unwrap();
    assert_eq!(v["skipped"], 0, "{v}");

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("skipped: spec.clusterIP") && !l.contains("no longer"))
        .collect();
    assert_eq!(lines.len(), 2, "logged once each time it appears:\n{text}");
    assert!(
        lines[0].contains("WARN")
            && lines[0].contains("Service shop/bad")
            && lines[0].contains("invalid_address")
            && lines[0].contains("\"198.19.0.x\" is not an IP address"),
        "{}",
        lines[0]
    );
    assert!(text.contains("no longer skipped"), "{text}");
}

/// An address given on the command line that cannot be bound is an error
/// naming it.
#[test]
fn a_taken_address_is_refused_by_name() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("clustergate-metrics-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("manifest.yaml");
    write_atomically(&path, &manifest(8080, "198.18.1.1"));
    let out = Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
        .arg("run")
        .arg("--manifest")
        .arg(&path)
        .arg("--shm-dir")
        .arg(dir.join("shm"))
        .arg("--metrics")
        .arg(addr.to_string())
        .arg("--health")
        .arg(free_port().to_string())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    drop(taken);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("--metrics {addr}")), "{err}");
}

fn api_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "ClusterIP", "clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

/// The slice of `web`, its trigger time half a second ago.
fn api_slice(addresses: &[&str]) -> Value {
    let trigger = jiff::Timestamp::now() - jiff::SignedDuration::from_millis(500);
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1", "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger.to_string()},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Polls `GET path` (blocking, on a helper thread) until `pred` holds.
async fn wait_get(
    addr: SocketAddr,
    path: &'static str,
    pred: impl Fn(u16, &str) -> bool,
) -> String {
    let t = Instant::now();
    loop {
        let (status, body) = tokio::task::spawn_blocking(move || get(addr, path))
            .await
            .unwrap();
        if pred(status, &body) {
            return body;
        }
        assert!(
            t.elapsed() < WAIT,
            "{path} never as expected; last {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_source_metrics_and_unreachable_health() {
    let mut server = ApiServer::start().await;
    server.apply(api_service());
    server.apply(api_slice(&["198.18.1.1"]));
    let dir = std::env::temp_dir().join(format!("clustergate-metrics-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            server.url()
        ),
    )
    .unwrap();
    let shm = dir.join("shm");
    let (metrics, health) = (free_port(), free_port());
    let mut d = Daemon {
        dir: dir.clone(),
        child: None,
    };
    d.child = Some(
        Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--shm-dir")
            .arg(&shm)
            .arg("--metrics")
            .arg(metrics.to_string())
            .arg("--health")
            .arg(health.to_string())
            .arg("--unpublished-bound-s")
            .arg("1")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let waiting = shm.clone();
    tokio::task::spawn_blocking(move || wait_generation(&waiting, 1))
        .await
        .unwrap();
    let text = wait_get(metrics, "/metrics", |s, t| {
        s == 200 && sample(t, "clustergate_snapshot_generation") == 1.0
    })
    .await;
    assert_eq!(
        sample(
            &text,
            "clustergate_network_programming_duration_seconds_count"
        ),
        1.0
    );
    assert!(
        sample(
            &text,
            "clustergate_network_programming_duration_seconds_sum"
        ) >= 0.5
    );
    assert!(sample(&text, "clustergate_service_changes_total") >= 1.0);
    assert!(sample(&text, "clustergate_endpoint_changes_total") >= 1.0);
    assert_eq!(sample(&text, "clustergate_watch_restarts_total"), 0.0);
    wait_get(health, "/healthz", |s, _| s == 200).await;

    // The API goes away: after the bound, /healthz says so.
    server.stop().await;
    let body = wait_get(health, "/healthz", |s, _| s == 503).await;
    assert!(body.contains("API unreachable since"), "{body}");
    let text = wait_get(metrics, "/metrics", |s, _| s == 200).await;
    assert!(
        sample(&text, "clustergate_watch_restarts_total") >= 1.0,
        "{text}"
    );
    assert_eq!(wait_get(health, "/livez", |_, _| true).await, "ok\n");

    // It comes back with a change: published, measured, healthy again.
    server.restart().await;
    server.apply(api_slice(&["198.18.1.1", "198.18.1.2"]));
    let waiting = shm.clone();
    tokio::task::spawn_blocking(move || wait_generation(&waiting, 2))
        .await
        .unwrap();
    wait_get(health, "/healthz", |s, _| s == 200).await;
    let text = wait_get(metrics, "/metrics", |s, t| {
        s == 200 && sample(t, "clustergate_snapshot_generation") == 2.0
    })
    .await;
    assert_eq!(
        sample(
            &text,
            "clustergate_network_programming_duration_seconds_count"
        ),
        2.0
    );
    let families = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\nin\n{text}"));
    assert!(
        sample_with(
            &families,
            "clustergate_control_sync_latency_seconds_count",
            &[("source", "api")]
        ) >= 2.0,
        "{text}"
    );
    promtool_check(&text, &families);

    // A bad object (issue 18): counted and skipped, the rest stays served and
    // /healthz healthy; deleted, the gauge falls back to 0.
    let mut bad = api_service();
    bad["metadata"]["name"] = json!("bad");
    bad["spec"]["clusterIP"] = json!("198.19.0.x");
    bad["spec"]["clusterIPs"] = json!(["198.19.0.x"]);
    server.apply(bad);
    let skipped = format!("{SKIPPED_BAD_IP} 1");
    wait_get(metrics, "/metrics", |s, t| {
        s == 200 && t.lines().any(|l| l == skipped)
    })
    .await;
    let body = wait_get(health, "/healthz", |s, _| s == 200).await;
    assert!(body.contains("\"skipped\":1"), "{body}");
    assert_eq!(
        snapshot_frontends(&shm),
        [("198.19.0.10".to_owned(), 80, vec![8080, 8080])]
    );
    server.delete(support::apiserver::Kind::Service, "shop", "bad");
    let cleared = format!("{SKIPPED_BAD_IP} 0");
    wait_get(metrics, "/metrics", |s, t| {
        s == 200 && t.lines().any(|l| l == cleared)
    })
    .await;
}

// ---- the whole exposition, parsed strictly (issue 16) ----

/// Labels, in order.
type Labels = Vec<(String, String)>;

/// One sample: its name, labels and value.
type Sample = (String, Labels, f64);

/// Per label set of a histogram: the (le, count) buckets, `_count`, a `_sum` seen.
type HistogramSeries = BTreeMap<Labels, (Vec<(f64, f64)>, Option<f64>, bool)>;

/// One metric family of an OpenMetrics text exposition.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: bool,
    /// (sample name, labels, value), in order.
    samples: Vec<Sample>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

/// `{a="x",b="y"}` (the braces removed): the pairs, escapes resolved.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .ok_or_else(|| format!("no =\" in labels {s:?}"))?;
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("label {name:?} twice"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated label value in {s:?}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in {s:?}")),
                },
                Some((_, '\n')) => return Err("newline in a label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        out.push((name.to_owned(), value));
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
            if rest.is_empty() {
                return Err(format!("trailing comma in {s:?}"));
            }
        } else if !rest.is_empty() {
            return Err(format!("junk {rest:?} after a label in {s:?}"));
        }
    }
    Ok(out)
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+') => {
            s.parse().map_err(|_| format!("bad value {s:?}"))
        }
        _ => Err(format!("bad value {s:?}")),
    }
}

/// The sample suffixes each type allows after its family name.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "gauge" | "unknown" => &[""],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        "stateset" => &[""],
        _ => &[],
    }
}

/// Parses an OpenMetrics 1.0 text exposition strictly, as Prometheus would
/// refuse it, plus Prometheus's naming conventions: every line well formed;
/// `# EOF` last; HELP and TYPE at most once per family and before its
/// samples; samples of a family together, named by the family and a suffix
/// of its type; no series twice; histograms with increasing `le` ending in
/// `+Inf`, cumulative buckets, `_count` equal to the `+Inf` bucket and a
/// `_sum`; counters not negative; every name with our prefix, in base units
/// (`_seconds`, never `_ms`/`_milliseconds`), counters' samples in `_total`.
fn check_exposition(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("the exposition does not end with `# EOF`")?;
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut series = BTreeSet::new();
    for (n, line) in body.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (what, name, rest) = (parts.next(), parts.next(), parts.next());
            let (Some(what), Some(name), Some(rest)) = (what, name, rest) else {
                return Err(at("short metadata line".into()));
            };
            if !is_metric_name(name) {
                return Err(at(format!("bad family name {name:?}")));
            }
            if order.last().map(String::as_str) != Some(name) {
                if families.contains_key(name) {
                    return Err(at(format!("family {name} is split")));
                }
                order.push(name.to_owned());
            }
            let family = families.entry(name.to_owned()).or_default();
            if !family.samples.is_empty() {
                return Err(at("metadata after samples".into()));
            }
            match what {
                "TYPE" => {
                    if !family.kind.is_empty() || suffixes(rest).is_empty() {
                        return Err(at(format!("TYPE twice or unknown type {rest:?}")));
                    }
                    family.kind = rest.to_owned();
                }
                "HELP" => {
                    if family.help || rest.is_empty() {
                        return Err(at("HELP twice or empty".into()));
                    }
                    family.help = true;
                }
                "UNIT" => {
                    if !name.ends_with(&format!("_{rest}")) {
                        return Err(at(format!("unit {rest} not the name's suffix")));
                    }
                }
                _ => return Err(at(format!("unknown metadata {what}"))),
            }
            continue;
        }
        if line.starts_with('#') {
            return Err(at("a comment".into()));
        }
        let (series_part, value) = line.rsplit_once(' ').ok_or_else(|| at("no value".into()))?;
        let value = parse_value(value).map_err(at)?;
        let (name, labels) = match series_part.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .ok_or_else(|| at("unclosed labels".into()))?;
                (name, parse_labels(labels).map_err(at)?)
            }
            None => (series_part, Vec::new()),
        };
        if !is_metric_name(name) {
            return Err(at(format!("bad sample name {name:?}")));
        }
        let family_name = order
            .last()
            .ok_or_else(|| at("a sample before any TYPE".into()))?;
        let family = families.get_mut(family_name).expect("in order");
        let suffix = name
            .strip_prefix(family_name.as_str())
            .filter(|s| suffixes(&family.kind).contains(s))
            .ok_or_else(|| {
                at(format!(
                    "sample {name} does not belong to the {} {family_name}",
                    family.kind
                ))
            })?;
        if (suffix == "_bucket") != labels.iter().any(|(n, _)| n == "le") {
            return Err(at("`le` on a bucket, and only there".into()));
        }
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(at("the same series twice".into()));
        }
        family.samples.push((name.to_owned(), labels, value));
    }
    for (name, family) in &families {
        let fail = |e: &str| Err(format!("{name}: {e}"));
        if family.kind.is_empty() || !family.help {
            return fail("no TYPE or no HELP");
        }
        if !name.starts_with("clustergate_") {
            return fail("not under our prefix clustergate_");
        }
        if [
            "_ms",
            "_milliseconds",
            "_microseconds",
            "_minutes",
            "_hours",
        ]
        .iter()
        .any(|u| name.ends_with(u) || name.contains(&format!("{u}_")))
        {
            return fail("not in base units");
        }
        if family.samples.is_empty() && family.kind != "histogram" {
            return fail("no samples");
        }
        if name.ends_with("_total") {
            return fail("a family name ending in _total (the sample has it)");
        }
        if family.kind == "counter" && family.samples.iter().any(|s| s.2.is_nan() || s.2 < 0.0) {
            return fail("a negative counter");
        }
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    Ok(families)
}

/// The buckets, `_count` and `_sum` of each label set of a histogram.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut sets: HistogramSeries = BTreeMap::new();
    for (sample, labels, value) in &family.samples {
        let mut key = labels.clone();
        let le = key
            .iter()
            .position(|(n, _)| n == "le")
            .map(|i| key.remove(i).1);
        let entry = sets.entry(key).or_default();
        match (sample.strip_prefix(name), le) {
            (Some("_bucket"), Some(le)) => entry.0.push((parse_value(&le)?, *value)),
            (Some("_count"), None) => entry.1 = Some(*value),
            (Some("_sum"), None) => entry.2 = true,
            _ => {}
        }
    }
    for (labels, (buckets, count, sum)) in sets {
        let fail = |e: &str| Err(format!("{name}{labels:?}: {e}"));
        if buckets.is_empty() || !sum {
            return fail("no buckets or no _sum");
        }
        if buckets.windows(2).any(|w| {
            w[0].0.partial_cmp(&w[1].0) != Some(std::cmp::Ordering::Less) || w[0].1 > w[1].1
        }) {
            return fail("`le` not increasing or buckets not cumulative");
        }
        let last = buckets.last().expect("not empty");
        if last.0 != f64::INFINITY || Some(last.1) != count {
            return fail("the last bucket is not +Inf, or it differs from _count");
        }
    }
    Ok(())
}

/// The sample `name` with exactly `labels`.
fn sample_with(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> f64 {
    families
        .values()
        .flat_map(|f| &f.samples)
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .unwrap_or_else(|| panic!("no {name}{labels:?}"))
        .2
}

/// `promtool check metrics` (Prometheus's linter: naming conventions) on the
/// text, when promtool is installed (`scripts/install-deps.sh` installs
/// Debian's `prometheus`; required when `CI` is set). promtool 2.42 reads
/// the Prometheus text format 0.0.4, whose counter families carry the
/// `_total` of their samples: the OpenMetrics HELP and TYPE lines of
/// counters are renamed so, and `# EOF` dropped; nothing else changes.
fn promtool_check(text: &str, families: &BTreeMap<String, Family>) {
    let mut v004 = String::new();
    for line in text.lines().filter(|l| *l != "# EOF") {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            (families.get(name)?.kind == "counter").then(|| format!("{p}{name}_total {tail}"))
        });
        v004.push_str(renamed.as_deref().unwrap_or(line));
        v004.push('\n');
    }
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required in CI (scripts/install-deps.sh): {e}"
            );
            eprintln!("promtool not run ({e}); the strict parser alone checked /metrics");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(v004.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}\non\n{v004}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_parser_refuses_what_it_should() {
    let good = "# HELP clustergate_x_seconds X.\n# TYPE clustergate_x_seconds histogram\nclustergate_x_seconds_sum{source=\"api\"} 0.5\nclustergate_x_seconds_count{source=\"api\"} 2\nclustergate_x_seconds_bucket{le=\"0.1\",source=\"api\"} 1\nclustergate_x_seconds_bucket{le=\"+Inf\",source=\"api\"} 2\n# HELP clustergate_n N.\n# TYPE clustergate_n counter\nclustergate_n_total 3\n# EOF\n";
    let families = check_exposition(good).unwrap();
    assert_eq!(
        sample_with(
            &families,
            "clustergate_x_seconds_count",
            &[("source", "api")]
        ),
        2.0
    );
    for (bad, why) in [
        (good.replace("# EOF\n", ""), "no EOF"),
        (
            good.replace(
                "le=\"+Inf\",source=\"api\"} 2",
                "le=\"+Inf\",source=\"api\"} 3",
            ),
            "+Inf != count",
        ),
        (
            good.replace(
                "le=\"0.1\",source=\"api\"} 1",
                "le=\"0.1\",source=\"api\"} 5",
            ),
            "not cumulative",
        ),
        (good.replace("le=\"+Inf\"", "le=\"9\""), "no +Inf"),
        (
            good.replace("clustergate_n_total", "clustergate_n"),
            "counter without _total",
        ),
        (
            good.replace("clustergate_n", "clustergate_n_ms"),
            "not a base unit",
        ),
        (good.replace("clustergate_n", "other_n"), "not our prefix"),
        (good.replace("# HELP clustergate_n N.\n", ""), "no HELP"),
        (
            good.replace("source=\"api\"} 0.5", "source=\"api} 0.5"),
            "unterminated label",
        ),
        (good.replace("} 0.5", "} x"), "bad value"),
        (
            good.replace("_total 3", "_total 3\nclustergate_n_total 4"),
            "the same series twice",
        ),
        (good.replace("_total 3", "_total -1"), "a negative counter"),
        (
            good.replace(
                "# TYPE clustergate_n counter\n",
                "# TYPE clustergate_n counter\n\n",
            ),
            "empty line",
        ),
    ] {
        assert!(check_exposition(&bad).is_err(), "accepted ({why}):\n{bad}");
    }
}

/// `/metrics` of a daemon on a manifest, after two publishes and with a
/// skipped object, is a valid exposition: every line, both parsers; the sync
/// latency histogram counts the publishes under `source="manifest"`.
#[test]
fn the_whole_exposition_parses() {
    let dir =
        std::env::temp_dir().join(format!("clustergate-metrics-parse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let path = dir.join("manifest.yaml");
    write_atomically(&path, &with_bad(8080, Some("198.19.0.x")));
    let metrics = free_port();
    let mut d = Daemon {
        dir: dir.clone(),
        child: None,
    };
    d.child = Some(
        run_on_manifest(&path, &shm)
            .arg("--metrics")
            .arg(metrics.to_string())
            .arg("--health")
            .arg(free_port().to_string())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);
    let text = metrics_at(metrics, 1.0);
    let families = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\nin\n{text}"));
    assert_eq!(
        families["clustergate_control_sync_latency_seconds"].kind,
        "histogram"
    );
    assert_eq!(
        sample_with(
            &families,
            "clustergate_control_sync_latency_seconds_count",
            &[("source", "manifest")]
        ),
        1.0
    );
    write_atomically(&path, &with_bad(9090, Some("198.19.0.x")));
    wait_generation(&shm, 2);
    let text = metrics_at(metrics, 2.0);
    let families = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\nin\n{text}"));
    assert_eq!(
        sample_with(
            &families,
            "clustergate_control_sync_latency_seconds_count",
            &[("source", "manifest")]
        ),
        2.0
    );
    assert!(
        sample_with(
            &families,
            "clustergate_control_sync_latency_seconds_sum",
            &[("source", "manifest")]
        ) > 0.0
    );
    assert_eq!(
        sample_with(
            &families,
            "clustergate_control_objects_skipped",
            &[("kind", "Service"), ("reason", "invalid_address")]
        ),
        1.0
    );
    for family in [
        "clustergate_sync_proxy_rules_duration_seconds",
        "clustergate_network_programming_duration_seconds",
        "clustergate_service_changes",
        "clustergate_endpoint_changes",
        "clustergate_watch_restarts",
        "clustergate_frontends",
        "clustergate_snapshot_generation",
    ] {
        assert!(families.contains_key(family), "{family} missing");
    }
    promtool_check(&text, &families);
}
