//! Maglev ring sizes survive a control restart: control reads them from the
//! snapshot it published, so removing one endpoint after a restart keeps the
//! ring's size (and the other endpoints' flows) as it would without one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::path::Path;
use std::process::Command;

use clustergate_builder::maglev::{ring_size_for, DEFAULT_MAX_RING_SIZE};
use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::snapshot;

/// A Service with `n` ready endpoints, 198.18.1.1 to 198.18.1.n.
fn manifest(n: u8) -> String {
    let endpoints: String = (1..=n)
        .map(|i| format!("  - addresses: [198.18.1.{i}]\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: web, namespace: shop}}\n  spec:\n    clusterIP: 198.19.0.10\n    ports: [{{name: http, port: 80, protocol: TCP}}]\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: web-1\n    namespace: shop\n    labels: {{kubernetes.io/service-name: web}}\n  addressType: IPv4\n  ports: [{{name: http, port: 8080, protocol: TCP}}]\n  endpoints:\n{endpoints}"
    )
}

/// `run --once` on a manifest of `n` endpoints into `shm`: a fresh control
/// process each time. Returns the generation and the ring size published.
fn run_once(dir: &Path, shm: &Path, n: u8) -> (u64, u32, String) {
    let file = dir.join("manifest.yaml");
    std::fs::write(&file, manifest(n)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
        .args(["run", "--once", "--manifest"])
        .arg(&file)
        .arg("--shm-dir")
        .arg(shm)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    let t = snapshot::load_current(shm).unwrap().unwrap();
    let f = t
        .frontend(&addr16("198.19.0.10".parse().unwrap()), 80, Proto::Tcp)
        .unwrap();
    (t.generation(), t.frontend_record(f).unwrap().ring_len, log)
}

#[test]
fn a_restarted_control_keeps_the_ring_sizes() {
    let dir = std::env::temp_dir().join(format!("clustergate-rings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = dir.join("shm");
    let cap = DEFAULT_MAX_RING_SIZE;

    // First start: nothing published, the fresh size for 10 endpoints.
    let (g, m, _) = run_once(&dir, &shm, 10);
    assert_eq!((g, m), (1, ring_size_for(10, cap)));
    assert_eq!(m, 4001);

    // Restarted with one endpoint fewer: the published size is kept (the
    // fresh size for 9 would be another ring, 2917 slots).
    let (g, kept, log) = run_once(&dir, &shm, 9);
    assert_eq!(g, 2);
    assert_eq!(kept, m, "the ring keeps its size across the restart");
    assert_ne!(ring_size_for(9, cap), m);
    assert!(
        log.contains("keeping the Maglev ring sizes of the published snapshot"),
        "{log}"
    );

    // Restarted with 25: 4001 no longer serves 25 backends (at least
    // 25³/2 = 7812 slots): the fresh size for 25.
    let (_, grown, _) = run_once(&dir, &shm, 25);
    assert_eq!(grown, ring_size_for(25, cap));

    // A new snapshot directory: no previous sizes, the fresh size for 9.
    let other = dir.join("other");
    let (g, fresh, _) = run_once(&dir, &other, 9);
    assert_eq!((g, fresh), (1, ring_size_for(9, cap)));
    let _ = std::fs::remove_dir_all(&dir);
}
