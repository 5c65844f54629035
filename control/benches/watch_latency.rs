//! Watch event → published snapshot, with 10 000 services × 10 endpoints.
//!
//! The tests' scripted API server (HTTP on loopback) holds the objects; the
//! real `kube_source::follow` watches them through kube-rs, and every model it
//! hands over is published with the real snapshot `Writer`, as `run` does.
//! Each change moves one endpoint of one service; the time runs from the
//! server applying the change (and streaming the watch event) to the
//! snapshot's rename into place, in /dev/shm as in production. Prints p50,
//! p99, min and max in ms.
//!
//! `cargo bench -p clustergate-control --bench watch_latency [-- CHANGES]`

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: a benchmark fails loudly on purpose

#[path = "../tests/support/apiserver.rs"]
#[allow(dead_code)] // reason: the benchmark uses a part of the tests' server
mod apiserver;

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clustergate_builder::snapshot::Writer;
use clustergate_builder::TableBuild;
use clustergate_control::kube_source::{follow, FollowConfig};
use clustergate_dataplane::table::Table;
use serde_json::{json, Value};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn endpoint_ip(n: u32) -> String {
    format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
}

fn service(s: u32) -> Value {
    let vip = format!("198.19.{}.{}", s >> 8, s & 0xff);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{s}"), "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

fn slice(s: u32, shift: u32) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let n = if e == 0 && shift > 0 {
                SERVICES * ENDPOINTS + shift
            } else {
                s * ENDPOINTS + e
            };
            json!({"addresses": [endpoint_ip(n)], "conditions": {"ready": true}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{s}-a"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn main() {
    let changes: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30)
        .clamp(1, 1000);
    // Where production publishes: tmpfs under /dev/shm (fsync is cheap there).
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("clustergate-watch-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = mpsc::channel::<(u64, Instant)>();
    let server = rt.block_on(apiserver::ApiServer::start());
    for s in 0..SERVICES {
        server.apply(service(s));
        server.apply(slice(s, 0));
    }
    let client = rt.block_on(async { server.client() });
    let mut writer = Writer::open(&dir).unwrap();
    let mut last_specs = None;
    rt.spawn(async move {
        follow(client, &FollowConfig::default(), move |model| {
            let specs = model.service_specs();
            if last_specs.as_ref() == Some(&specs) {
                return ControlFlow::Continue(());
            }
            let generation = writer.next_generation();
            let table = Table::build(generation, 0, &specs).expect("table");
            writer.publish(&table).expect("publish");
            last_specs = Some(specs);
            let _ = tx.send((generation, Instant::now()));
            ControlFlow::Continue(())
        })
        .await;
    });
    let started = Instant::now();
    let (g, first) = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("first snapshot");
    assert_eq!(g, 1);
    eprintln!(
        "watch-latency: {SERVICES} services × {ENDPOINTS} endpoints listed and published in {:.2} s",
        (first - started).as_secs_f64()
    );
    let mut ms = Vec::new();
    for k in 1..=changes {
        let service = k % SERVICES;
        let t0 = Instant::now();
        server.apply(slice(service, k));
        let (g, done) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a snapshot for the change");
        assert_eq!(g, u64::from(k) + 1, "one generation per change");
        ms.push((done - t0).as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!();
    println!(
        "| watch event → published snapshot ({SERVICES} services × {ENDPOINTS} endpoints) | ms |"
    );
    println!("|---|---|");
    println!("| p50 of {} changes | {:.1} |", ms.len(), q(0.5));
    println!("| p99 | {:.1} |", q(0.99));
    println!("| min | {:.1} |", ms[0]);
    println!("| max | {:.1} |", ms[ms.len() - 1]);
    drop(server);
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&dir);
}
