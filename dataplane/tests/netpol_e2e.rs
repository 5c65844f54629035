//! End to end: NetworkPolicy through the real gateway.
//!
//! Two client namespaces on the LAN (topology.sh `one-armed two-clients`),
//! the Service `web` on backends 1 and 2, source NAT (control's default), so
//! the backends see only the gateway: the pod network could not tell the
//! clients apart, the gateway must. The manifest declares the clients and
//! backends as pods; a NetworkPolicy admits only namespace `front`'s pods.
//! The allowed client gets its answers, the denied one times out and the
//! gateway counts `network_policy` drops; then the policy is widened and the
//! denied client's new connections go through, within the update latency.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use std::time::{Duration, Instant};

use e2e::*;
use support::root_or_skip;

#[path = "support/e2e.rs"]
mod e2e;
mod support;

/// The Service and its slice (`e2e::manifest`), plus the pods, namespaces
/// and the policy, admitting namespaces labelled with one of `teams`.
fn manifest(teams: &[&str]) -> String {
    let mut m = e2e::manifest(&[1, 2], None, 80);
    for (ns, team) in [("front", "front"), ("other", "other"), ("default", "shop")] {
        m.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{team: {team}}}}}\n"
        ));
    }
    for (ns, name, labels, ip) in [
        ("front", "ui", "role: ui", "198.18.3.2"),
        ("other", "ui", "role: ui", "198.18.3.3"),
        ("default", "web-1", "app: web", "198.18.2.11"),
        ("default", "web-2", "app: web", "198.18.2.12"),
    ] {
        m.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
             status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
        ));
    }
    m.push_str(&format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: web-from-teams, namespace: default}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from:\n    \
         - namespaceSelector: {{matchExpressions: [{{key: team, operator: In, values: [{}]}}]}}\n    \
         ports: [{{port: http}}]\n",
        teams.join(", ")
    ));
    m
}

#[test]
fn network_policy_admits_one_client_and_denies_the_other() {
    if !root_or_skip(
        "network_policy_admits_one_client_and_denies_the_other",
        NEEDS,
    ) {
        return;
    }
    let mut env = Env::up("np", "one-armed two-clients", 1);
    env.start_backends();
    env.write_manifest_text(&manifest(&["front"]));
    env.start_control();
    env.start_gateway(&["g1"], "0", 1, &[]);
    env.wait_healthy();

    let v = env.peer("cli", &["http", VIP, "80", "20"]);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "the allowed client: {v}\n{}",
        env.log("gateway")
    );
    assert_eq!(counts(&v).values().sum::<u64>(), 20, "{v}");

    let m = env.metrics();
    let before = env.metric_where(&m, "clustergate_drops_total", "network_policy");
    let entries_before = env.metric(&m, "clustergate_conntrack_entries");
    // The denied client: 3 connections, each given up after 1 s.
    let v = env.peer("cli2", &["http", VIP, "80", "3", "1", "3"]);
    assert_eq!(
        counts(&v).values().sum::<u64>(),
        0,
        "the denied client got answers: {v}"
    );
    let errors = v["errors"].as_array().map(Vec::len).unwrap_or(0);
    assert!(errors >= 1, "the denied client saw no failure: {v}");
    let m = env.metrics();
    let after = env.metric_where(&m, "clustergate_drops_total", "network_policy");
    assert!(
        after >= before + 3.0,
        "network_policy drops {before} -> {after}: every SYN (and its retries) is counted"
    );
    // A denied flow leaves no state.
    assert!(
        env.metric(&m, "clustergate_conntrack_entries") <= entries_before,
        "denied flows in the connection table ({entries_before} before):\n{m}"
    );

    // The policy is widened: the other team's new connections go through.
    let g = env.generation();
    let changed = Instant::now();
    env.write_manifest_text(&manifest(&["front", "other"]));
    env.wait_generation_above(g);
    let v = env.peer("cli2", &["http", VIP, "80", "10"]);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "after the policy change: {v}"
    );
    assert_eq!(counts(&v).values().sum::<u64>(), 10, "{v}");
    assert!(
        changed.elapsed() < Duration::from_secs(30),
        "the change took {:?}",
        changed.elapsed()
    );
}
