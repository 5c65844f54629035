//! `clustergate-control run --manifest` answers each `healthCheckNodePort`
//! like kube-proxy's service health server: 200 with kube-proxy's JSON body
//! while the Service has endpoints (and control is healthy), 503 without; the
//! port opens and closes as the Service comes and goes. Also the frontends
//! gauge, by kind, at `--metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

#[allow(dead_code)] // reason: shared with the other tests, which use more of it
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::daemon::{run_on_manifest, wait_generation, write_atomically, Daemon};

const WAIT: Duration = Duration::from_secs(30);

/// A loopback port nothing listens on (bound, read, released).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A LoadBalancer Service `shop/edge` with `externalTrafficPolicy: Local`
/// and health check node port `hc`, and a slice with `endpoints` (YAML
/// list items, may be empty).
fn manifest(hc: u16, endpoints: &str) -> String {
    format!(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: edge, namespace: shop}}\n  spec:\n    type: LoadBalancer\n    clusterIP: 198.19.0.50\n    externalTrafficPolicy: Local\n    healthCheckNodePort: {hc}\n    ports: [{{name: http, port: 80, protocol: TCP, nodePort: 30080}}]\n  status:\n    loadBalancer:\n      ingress: [{{ip: 198.18.201.1}}]\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: edge-1\n    namespace: shop\n    labels: {{kubernetes.io/service-name: edge}}\n  addressType: IPv4\n  ports: [{{name: http, port: 8080, protocol: TCP}}]\n  endpoints: [{endpoints}]\n"
    )
}

/// One GET: (status, head, body), or `None` when nothing listens.
fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_owned(), body.to_owned()))
}

/// GETs until the answer satisfies `want` (at most [`WAIT`]).
fn get_until(
    addr: SocketAddr,
    path: &str,
    what: &str,
    want: impl Fn(u16, &str) -> bool,
) -> (u16, String, String) {
    let t = Instant::now();
    let mut last = None;
    loop {
        if let Some((status, head, body)) = try_get(addr, path) {
            if want(status, &body) {
                return (status, head, body);
            }
            last = Some((status, body));
        }
        assert!(t.elapsed() < WAIT, "{what}: never; last answer {last:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn health_check_node_port_answers_like_kube_proxy() {
    let dir = std::env::temp_dir().join(format!("clustergate-hc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let path = dir.join("manifest.yaml");
    let (hc, health, metrics) = (free_port(), free_port(), free_port());
    let hc_port = hc.port();

    // No endpoints yet.
    write_atomically(&path, &manifest(hc_port, ""));
    let mut d = Daemon {
        dir: dir.clone(),
        child: None,
    };
    d.child = Some(
        run_on_manifest(&path, &shm)
            .arg("--health")
            .arg(health.to_string())
            .arg("--metrics")
            .arg(metrics.to_string())
            // The test's port is wherever the kernel had one free.
            .arg("--service-node-port-range")
            .arg("1024-65535")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);
    // /healthz is healthy once published: the 503 is for the endpoints.
    get_until(health, "/healthz", "healthz 200", |s, _| s == 200);
    let (status, head, body) = get_until(hc, "/", "503 without endpoints", |s, _| s == 503);
    assert_eq!(status, 503);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        json!({
            "service": {"namespace": "shop", "name": "edge"},
            "localEndpoints": 0,
            "serviceProxyHealthy": true,
        })
    );
    assert_eq!(header(&head, "Content-Type"), Some("application/json"));
    assert_eq!(header(&head, "X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(header(&head, "X-Load-Balancing-Endpoint-Weight"), Some("0"));

    // Two ready endpoints and one not ready: 200, two endpoints.
    write_atomically(
        &path,
        &manifest(
            hc_port,
            "{addresses: [198.18.6.1]}, {addresses: [198.18.6.2]}, {addresses: [198.18.6.3], conditions: {ready: false}}",
        ),
    );
    wait_generation(&shm, 2);
    let (status, head, body) = get_until(hc, "/healthz", "200 with endpoints", |s, _| s == 200);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 2, "{body}");
    assert_eq!(v["serviceProxyHealthy"], true, "{body}");
    assert_eq!(header(&head, "X-Load-Balancing-Endpoint-Weight"), Some("2"));

    // The frontends gauge counts every kind of the published model.
    let (_, _, text) = get_until(metrics, "/metrics", "frontends gauge", |s, b| {
        s == 200 && b.contains("clustergate_frontends{kind=\"loadBalancer\"} 1")
    });
    for line in [
        "clustergate_frontends{kind=\"clusterIP\"} 1",
        "clustergate_frontends{kind=\"nodePort\"} 1",
        "clustergate_frontends{kind=\"externalIP\"} 0",
        "clustergate_frontends{kind=\"loadBalancer\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }

    // The Service goes: the port closes.
    write_atomically(
        &path,
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: other, namespace: shop}\n  spec:\n    clusterIP: 198.19.0.60\n    ports: [{port: 80}]\n",
    );
    wait_generation(&shm, 3);
    let t = Instant::now();
    while try_get(hc, "/").is_some() {
        assert!(t.elapsed() < WAIT, "the health check port stayed open");
        std::thread::sleep(Duration::from_millis(20));
    }

    // It comes back: the port opens again.
    write_atomically(&path, &manifest(hc_port, "{addresses: [198.18.6.1]}"));
    wait_generation(&shm, 4);
    let (_, _, body) = get_until(hc, "/", "200 again", |s, _| s == 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["localEndpoints"],
        1
    );
}

/// A health check port that another process holds is logged with the Service
/// named; the daemon keeps publishing.
#[test]
fn a_taken_health_check_port_is_logged_not_fatal() {
    let dir = std::env::temp_dir().join(format!("clustergate-hc-taken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let path = dir.join("manifest.yaml");
    // Held on every address, so neither family can be bound.
    let holder = TcpListener::bind("[::]:0")
        .or_else(|_| TcpListener::bind("0.0.0.0:0"))
        .unwrap();
    let port = holder.local_addr().unwrap().port();
    let _v4 = TcpListener::bind(("0.0.0.0", port));
    write_atomically(&path, &manifest(port, "{addresses: [198.18.6.1]}"));
    let log = dir.join("log");
    let mut d = Daemon {
        dir: dir.clone(),
        child: None,
    };
    d.child = Some(
        run_on_manifest(&path, &shm)
            .arg("--health")
            .arg(free_port().to_string())
            .arg("--metrics")
            .arg(free_port().to_string())
            .arg("--service-node-port-range")
            .arg("1024-65535")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("cannot open the health check node port") {
            assert!(text.contains("shop/edge"), "{text}");
            break;
        }
        assert!(t.elapsed() < WAIT, "no error logged:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still alive and publishing.
    write_atomically(&path, &manifest(port, "{addresses: [198.18.6.9]}"));
    wait_generation(&shm, 2);
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
    drop(holder);
}
