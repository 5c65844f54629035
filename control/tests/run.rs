//! `clustergate-control run` as a daemon: publishes, follows the manifest,
//! keeps the last good snapshot through a broken manifest, and publishes
//! nothing new when the tables did not change.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

#[allow(dead_code)] // reason: shared with the other tests, which use more of it
mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clustergate_dataplane::snapshot;
use support::daemon::{wait_generation, write_atomically, Daemon};

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
        Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
            .arg("run")
            .arg("--manifest")
            .arg(&manifest)
            .arg("--shm-dir")
            .arg(&shm)
            .arg("--poll-ms")
            .arg("5")
            .env("RUST_LOG", "info")
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

    // A broken manifest: the snapshot stays, the error names object and field.
    write_atomically(
        &manifest,
        &service(8080, "broken").replace("port: 80,", "port: 70000,"),
    );
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
        log.contains("Service shop/web: spec.ports[0].port: 70000 is not a valid port"),
        "the error names the object and the field: {log}"
    );
    assert!(log.contains("keeping generation 1"), "{log}");
    assert!(log.contains("did not: no new generation"), "{log}");
}

/// `show --output json` prints exactly the model's JSON, and the table view
/// lists frontends and skipped objects; `build` writes a snapshot the
/// dataplane accepts.
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
    let model = clustergate_control::load_manifest_file(Path::new(fixture), "clustergate").unwrap();
    assert_eq!(printed, model.to_json());
    assert_eq!(
        printed.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["frontends", "skipped"]
    );

    let out = Command::new(bin)
        .args(["show", "--manifest", fixture, "--output", "table"])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("TCP  198.19.0.10:80 ClusterIP default/web:http"),
        "{table}"
    );
    assert!(table.contains("(not served yet)"), "{table}");
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
    let _ = std::fs::remove_dir_all(&dir);
}
