//! End to end with two workers, as root: `clustergate run --cores 0,1
//! --queues 2` on veths with two queues each, so that RSS spreads the
//! client's connections and the backends' replies over both workers, and a
//! reply can reach another worker than the one that saw its request. A
//! frame whose flow the other worker owns is handed to it over the
//! hand-off rings (`io::handoff`): every connection must still work, and
//! every hand-off sent must be received.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use e2e::*;
use support::root_or_skip;

#[path = "support/e2e.rs"]
mod e2e;
mod support;

fn errors(v: &serde_json::Value) -> Vec<String> {
    v["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e.as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_workers_serve_both_directions() {
    if !root_or_skip("two_workers_serve_both_directions", NEEDS) {
        return;
    }
    // Source NAT in a pod network: the replies come back to the gateway's
    // address, on whichever queue RSS picks for them.
    let mut env = Env::up("w", "two-armed pod-network", 2);
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    env.start_control();
    env.start_gateway(&["g0", "g1"], "0,1", 2, &[]);
    env.wait_healthy();

    // TCP: many short connections (both directions of each through the
    // gateway), every one answered.
    let v = env.peer("cli", &["http", VIP, "80", "300"]);
    assert_eq!(errors(&v), Vec::<String>::new(), "HTTP errors: {v}");
    let got = counts(&v);
    assert_eq!(got.values().sum::<u64>(), 300, "{v}");
    assert_eq!(got.len(), 3, "every backend answered: {got:?}");
    // UDP request/response.
    let v = env.peer("cli", &["udp", VIP, "9001", "100"]);
    assert_eq!(v["answered"], 100, "UDP echo: {v}");

    // Both workers received frames, and the hand-off counters are exported:
    // none was lost to a full ring, and every one sent was received.
    let m = env.metrics();
    for w in ["0", "1"] {
        assert!(
            env.metric_where(
                &m,
                "clustergate_xsk_rx_packets_total",
                &format!("worker=\"{w}\"")
            ) > 0.0,
            "worker {w} received nothing: RSS did not spread the flows\n{m}"
        );
    }
    assert!(
        m.contains("clustergate_handoffs_sent_total")
            && m.contains("clustergate_handoffs_received_total"),
        "hand-off counters missing:\n{m}"
    );
    let sent = env.metric(&m, "clustergate_handoffs_sent_total");
    let received = env.metric(&m, "clustergate_handoffs_received_total");
    let full = env.metric_where(&m, "clustergate_drops_total", "reason=\"handoff_full\"");
    eprintln!("two workers: hand-offs sent {sent}, received {received}, ring full {full}");
    assert_eq!(full, 0.0, "hand-offs dropped on a full ring\n{m}");
    assert_eq!(sent, received, "hand-offs sent but never received\n{m}");
    // Each worker owns half of the flows; RSS puts requests and replies on
    // either queue by another hash, so many frames reach the other worker.
    assert!(
        sent >= 100.0,
        "with two owners, RSS must have put frames on the other worker: {sent} hand-offs\n{m}"
    );
}
