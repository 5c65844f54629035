//! End to end over IPv6: `clustergate run` between real namespaces, every
//! address in 2001:2::/48 (RFC 5180; IPv4 beside it in 198.18.0.0/15).
//!
//! The topology is tests/e2e/topology.sh's (IPv6 on every link; `mtu-router`
//! adds backend-5 behind a router whose link to it has MTU 1400), the
//! harness tests/support/e2e.rs, shared with gateway_e2e.rs. What each test
//! shows:
//! - `ipv6_routed_cluster_ip_and_node_port`: the `routed` return path over
//!   IPv6 through a ClusterIP and a NodePort on the gateway's IPv6 address,
//!   the first connection arriving with the gateway's neighbour table flushed
//!   (NDP resolves the next hops while it waits), UDP with fragments both
//!   ways and with a destination options header, rejects, a stream, and an
//!   ICMPv6 packet too big from the router reaching the client translated.
//! - `ipv6_snat_in_a_pod_network`: source NAT to the gateway's IPv6 address
//!   (the backends see it, from the SNAT range), the same checks, the
//!   router's packet too big addressed to the gateway's address translated
//!   back to the client, and `routed` failing there.
//! - `ipv6_dsr_with_ipv6_in_ipv6`: DSR, the backends decapsulating
//!   IPv6-in-IPv6 (in userspace where the kernel has no ip6tnl) and
//!   answering from the VIP; too big once encapsulated gives the client a
//!   path MTU of 1500 − 40.
//! - `dual_stack_service_with_affinity_per_family`: one Service with an IPv4
//!   and an IPv6 cluster IP and node port, `sessionAffinity: ClientIP`,
//!   driven on both families at once.
//!
//! Every backend captures what reaches it and checks every checksum (IPv6
//! pseudo-header included); the steering program's counters must show
//! redirected frames and nothing malformed.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use std::collections::BTreeMap;
use std::path::Path;

use e2e::*;
use serde_json::Value;
use support::root_or_skip;

#[path = "support/e2e.rs"]
mod e2e;
mod support;

const VIP6: &str = "2001:2:100::1";
const EMPTY_VIP6: &str = "2001:2:100::2";
/// `far`: served by backend-5 behind the small-MTU router.
const FAR_VIP6: &str = "2001:2:100::5";
const CLIENT6: &str = "2001:2:1::2";
/// The gateway's address on the client's link (node ports are served there).
const GW_CLIENT6: &str = "2001:2:1::1";
/// The gateway's address on the backends' LAN (source NAT's address).
const GW_LAN6: &str = "2001:2:2::1";
const NODE_PORT: &str = "30080";
/// MTU of the router's link to backend-5 (topology.sh's default).
const ROUTER_MTU: u64 = 1400;

/// One Service of the tests' manifests.
struct Svc<'a> {
    name: &'a str,
    /// spec.clusterIPs (the first is spec.clusterIP).
    cluster_ips: &'a [&'a str],
    /// HTTP's port (80; 8080 for DSR, whose backends must see the frontend's port).
    http_port: u16,
    node_port: Option<&'a str>,
    return_path: Option<&'a str>,
    affinity: bool,
    /// Backends (numbers) per family: IPv4, IPv6.
    backends4: &'a [u8],
    backends6: &'a [u8],
}

impl Svc<'_> {
    fn yaml(&self) -> String {
        let q = |a: &str| format!("\"{a}\"");
        let ips: Vec<String> = self.cluster_ips.iter().map(|a| q(a)).collect();
        let families: Vec<&str> = self
            .cluster_ips
            .iter()
            .map(|a| if a.contains(':') { "IPv6" } else { "IPv4" })
            .collect();
        let mut meta = format!("{{name: {}, namespace: default", self.name);
        if let Some(p) = self.return_path {
            meta.push_str(&format!(
                ", annotations: {{clustergate.io/return-path: {p}}}"
            ));
        }
        meta.push('}');
        let mut spec = String::new();
        if self.node_port.is_some() {
            spec.push_str("  type: NodePort\n");
        }
        spec.push_str(&format!(
            "  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ipFamilyPolicy: {}\n",
            ips[0],
            ips.join(", "),
            families.join(", "),
            if ips.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            }
        ));
        if self.affinity {
            spec.push_str("  sessionAffinity: ClientIP\n");
        }
        let np = self
            .node_port
            .map_or(String::new(), |p| format!(", nodePort: {p}"));
        spec.push_str(&format!(
            "  ports:\n  - {{name: http, port: {}, protocol: TCP, targetPort: 8080{np}}}\n\
             \x20 - {{name: stream, port: 9000, protocol: TCP, targetPort: 9000}}\n\
             \x20 - {{name: echo, port: 9001, protocol: UDP, targetPort: 9001}}\n\
             \x20 - {{name: closed-udp, port: {CLOSED_UDP}, protocol: UDP, targetPort: {CLOSED_UDP}}}\n\
             \x20 - {{name: closed-tcp, port: {CLOSED_TCP}, protocol: TCP, targetPort: {CLOSED_TCP}}}\n",
            self.http_port
        ));
        let mut out = format!("apiVersion: v1\nkind: Service\nmetadata: {meta}\nspec:\n{spec}");
        for (family, backends) in [(4u8, self.backends4), (6, self.backends6)] {
            if backends.is_empty() {
                continue;
            }
            let mut eps = String::new();
            for &b in backends {
                eps.push_str(&format!(
                    "- addresses: [{}]\n  conditions: {{ready: true}}\n",
                    q(&backend_addr(b, family))
                ));
            }
            out.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {}-v{family}, namespace: default, labels: {{kubernetes.io/service-name: {}}}}}\n\
                 addressType: IPv{family}\nports:\n\
                 - {{name: http, port: 8080, protocol: TCP}}\n\
                 - {{name: stream, port: 9000, protocol: TCP}}\n\
                 - {{name: echo, port: 9001, protocol: UDP}}\n\
                 - {{name: closed-udp, port: {CLOSED_UDP}, protocol: UDP}}\n\
                 - {{name: closed-tcp, port: {CLOSED_TCP}, protocol: TCP}}\n\
                 endpoints:\n{eps}",
                self.name, self.name
            ));
        }
        out
    }
}

fn manifest(services: &[Svc<'_>]) -> String {
    services
        .iter()
        .map(Svc::yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `web6` (backends 1–3 on IPv6, a node port), `empty6` (no endpoints) and
/// `far6` (backend-5, behind the small-MTU router), with `return_path`.
fn ipv6_services(return_path: Option<&str>, http_port: u16, far: bool) -> String {
    let mut services = vec![
        Svc {
            name: "web6",
            cluster_ips: &[VIP6],
            http_port,
            node_port: (http_port == 80).then_some(NODE_PORT),
            return_path,
            affinity: false,
            backends4: &[],
            backends6: &[1, 2, 3],
        },
        Svc {
            name: "empty6",
            cluster_ips: &[EMPTY_VIP6],
            http_port,
            node_port: None,
            return_path,
            affinity: false,
            backends4: &[],
            backends6: &[],
        },
    ];
    if far {
        services.push(Svc {
            name: "far6",
            cluster_ips: &[FAR_VIP6],
            http_port,
            node_port: None,
            return_path,
            affinity: false,
            backends4: &[],
            backends6: &[5],
        });
    }
    manifest(&services)
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn errors(v: &Value) -> Vec<String> {
    v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect()
}

/// Every one of `n` HTTP requests answered, by exactly the backends `who`,
/// each reporting only the peer address `peer`; returns, per backend, the
/// peer ports.
fn assert_http(v: &Value, n: u64, who: &[&str], peer: &str, what: &str) -> Vec<u64> {
    assert_eq!(errors(v), Vec::<String>::new(), "{what}: HTTP errors: {v}");
    let got = counts(v);
    assert_eq!(got.values().sum::<u64>(), n, "{what}: {v}");
    assert_eq!(
        got.keys().map(String::as_str).collect::<Vec<_>>(),
        who,
        "{what}: the backends that answered: {v}"
    );
    let mut ports = Vec::new();
    for (name, addrs) in v["peers"].as_object().into_iter().flatten() {
        let addrs = addrs.as_object().expect("peers of a backend");
        assert_eq!(
            addrs.keys().map(String::as_str).collect::<Vec<_>>(),
            [peer],
            "{what}: {name} saw other peers than {peer}: {v}"
        );
        ports.extend(
            addrs[peer]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64),
        );
    }
    assert_eq!(
        ports.len() as u64,
        n,
        "{what}: every answer named its peer: {v}"
    );
    ports
}

/// Every frame the captures saw had right checksums, and each backend of
/// `need6` saw IPv6 frames.
fn assert_captures(caps: &BTreeMap<u8, Value>, need6: &[u8]) {
    for (b, v) in caps {
        eprintln!("backend-{b} capture: {v}");
        assert_eq!(v["bad"], 0, "backend-{b}: frames with bad checksums: {v}");
    }
    for b in need6 {
        assert!(
            caps[b]["seen6"].as_u64().unwrap_or(0) > 0,
            "backend-{b} saw no IPv6 frame: {}",
            caps[b]
        );
    }
}

/// The datagrams with a destination options header and the fragmented
/// ones reached the backends as such: the steering program and the core
/// took those IPv6 paths with live traffic.
fn assert_ext_and_fragments(caps: &BTreeMap<u8, Value>) {
    let sum = |k: &str| {
        caps.values()
            .map(|v| v[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert!(sum("ext6") >= 20, "destination options datagrams: {caps:?}");
    assert!(sum("frag6") >= 40, "IPv6 fragments: {caps:?}");
}

/// The steering program redirected frames and found none malformed; the
/// core dropped nothing as malformed either.
fn assert_steering(env: &Env) {
    let m = env.metrics();
    let redirected = env.metric_where(
        &m,
        "clustergate_xdp_steered_total{",
        "outcome=\"redirected\"",
    );
    let malformed = env.metric_where(
        &m,
        "clustergate_xdp_steered_total{",
        "outcome=\"malformed\"",
    );
    assert!(redirected > 0.0, "nothing redirected:\n{m}");
    assert_eq!(
        malformed, 0.0,
        "the steering program saw malformed frames:\n{m}"
    );
    for l in m
        .lines()
        .filter(|l| l.starts_with("clustergate_drops_total{"))
    {
        let bad = ["malformed", "truncated", "checksum"];
        if bad.iter().any(|b| l.contains(b)) {
            assert!(l.ends_with(" 0"), "a malformed drop: {l}");
        }
    }
}

/// The gateway's neighbour entry for `addr` (`ip -6 neigh show`), or "".
fn neighbour(env: &Env, addr: &str) -> String {
    env.ip("gw", &["-6", "neigh", "show", addr])
        .trim()
        .to_string()
}

/// The client's path MTU to `vip` as peer.py pmtu finds it: sends DF UDP
/// datagrams of `size` bytes of payload; asserts it started at 1500 and
/// dropped to `want`.
fn assert_pmtu(env: &Env, vip: &str, size: u32, want: u64) {
    env.ip("cli", &["-6", "route", "flush", "cache"]);
    let v = env.peer("cli", &["pmtu", vip, "9001", &size.to_string(), "5"]);
    assert_eq!(v["mtu_before"], 1500, "{v}");
    assert_eq!(
        v["mtu"], want,
        "the path MTU the client learnt to {vip}: {v}"
    );
}

/// Starts the gateway on `interfaces` (one worker) and waits for it.
fn start(env: &mut Env, interfaces: &[&str], cores: &str, queues: u32) {
    env.start_control();
    env.start_gateway(interfaces, cores, queues, &[]);
    env.wait_healthy();
}

/// What both non-DSR tests check: UDP (plain, fragmented both ways, with a
/// destination options header), rejects, a stream and the router's packet
/// too big. `peer6` is the address the backends see.
fn udp_rejects_stream_pmtu(env: &mut Env, peer6: &str) {
    let v = env.peer("cli", &["udp", VIP6, "9001", "100"]);
    assert_eq!(v["answered"], 100, "UDP echo over IPv6: {v}");
    // 3000 bytes: the client's datagram and the backend's answer both go
    // in fragments (an IPv6 fragment header, non-first fragments).
    let v = env.peer("cli", &["udp", VIP6, "9001", "20", "3", "3000"]);
    assert_eq!(v["answered"], 20, "fragmented UDP over IPv6: {v}");
    let v = env.peer_env("cli", &["udp", VIP6, "9001", "20"], &[("DSTOPTS", "1")]);
    assert_eq!(
        v["answered"], 20,
        "UDP behind a destination options header: {v}"
    );

    // No endpoints: the gateway answers a reset and an ICMPv6 port
    // unreachable itself.
    let v = env.peer("cli", &["reject", EMPTY_VIP6, "80", "9001"]);
    assert_eq!(v["tcp"], "refused", "{v}");
    assert_eq!(v["udp"], "unreachable", "{v}");
    // A backend's reset and ICMPv6 port unreachable reach the client too.
    let v = env.peer(
        "cli",
        &[
            "reject",
            VIP6,
            &CLOSED_TCP.to_string(),
            &CLOSED_UDP.to_string(),
        ],
    );
    assert_eq!(v["tcp"], "refused", "backend's RST: {v}");
    assert_eq!(
        v["udp"], "unreachable",
        "backend's ICMPv6 port unreachable: {v}"
    );

    let stream = Stream::start_to(env, VIP6, "9000", 4, 1024);
    assert_eq!(
        stream.peer.rsplit_once(':').map(|p| p.0),
        Some(peer6),
        "stream's peer"
    );
    stream.finish(100_000);

    // A full-sized packet to backend-5 meets the router's 1400-byte link:
    // the router's packet too big reaches the client translated (it quotes
    // the client's packet to the VIP), and the client's path MTU drops.
    let v = env.peer("cli", &["http", FAR_VIP6, "80", "3"]);
    assert_http(&v, 3, &["backend-5"], peer6, "far6");
    assert_pmtu(env, FAR_VIP6, 1452, ROUTER_MTU);
    // TCP with full-sized segments finds it the same way and loses nothing.
    env.ip("cli", &["-6", "route", "flush", "cache"]);
    let stream = Stream::start_to(env, FAR_VIP6, "9000", 4, 16384);
    assert_eq!(stream.backend, 5, "far6's stream");
    stream.finish(500_000);
}

#[test]
fn ipv6_routed_cluster_ip_and_node_port() {
    if !root_or_skip("ipv6_routed_cluster_ip_and_node_port", NEEDS) {
        return;
    }
    let mut env = Env::up("6r", "two-armed mtu-router", 2);
    env.control_args = vec!["--return-path", "routed"];
    env.start_backends();
    env.write_manifest_text(&ipv6_services(None, 80, true));
    env.start_captures(&[1, 2, 3, 4, 5]);
    start(&mut env, &["g0", "g1"], "0,1", 2);

    // The gateway's own IPv6 address answers (the kernel's), and the client
    // knows the gateway's MAC from then on.
    let v = env.peer("cli", &["ping", GW_CLIENT6, "2"]);
    assert_eq!(v["replies"], 2, "ping to the gateway's IPv6 address: {v}");

    // NDP: the gateway forgets every neighbour; the first connection's
    // packets find neither the backend's nor the client's MAC, wait for the
    // kernel to resolve them, and the connection still completes.
    env.ip("gw", &["-6", "neigh", "flush", "all"]);
    assert_eq!(neighbour(&env, CLIENT6), "", "client entry after the flush");
    let unresolved = |env: &Env| {
        env.metric_where(
            &env.metrics(),
            "clustergate_drops_total{",
            "next_hop_no_neighbour",
        )
    };
    let before = unresolved(&env);
    let v = env.peer("cli", &["http", VIP6, "80", "1", "10"]);
    assert_eq!(counts(&v).values().sum::<u64>(), 1, "first connection: {v}");
    assert!(
        unresolved(&env) > before,
        "the first connection met no unresolved neighbour"
    );
    let n = neighbour(&env, CLIENT6);
    assert!(
        n.contains("lladdr"),
        "the gateway resolved the client: {n:?}"
    );

    // 300 connections through the IPv6 cluster IP: every backend answers,
    // and each saw the client's own address (routed: destination NAT only).
    let v = env.peer("cli", &["http", VIP6, "80", "300"]);
    assert_http(
        &v,
        300,
        &["backend-1", "backend-2", "backend-3"],
        CLIENT6,
        "cluster IP",
    );
    // The node port on the gateway's IPv6 address.
    let v = env.peer("cli", &["http", GW_CLIENT6, NODE_PORT, "60"]);
    assert_http(
        &v,
        60,
        &["backend-1", "backend-2", "backend-3"],
        CLIENT6,
        "node port",
    );

    udp_rejects_stream_pmtu(&mut env, CLIENT6);

    let caps = env.finish_captures(&[1, 2, 3, 4, 5]);
    assert_captures(&caps, &[1, 2, 3, 5]);
    assert_ext_and_fragments(&caps);
    assert_eq!(
        caps[&4]["seen"], 0,
        "backend-4 serves nothing: {}",
        caps[&4]
    );
    assert_steering(&env);
}

#[test]
fn ipv6_snat_in_a_pod_network() {
    if !root_or_skip("ipv6_snat_in_a_pod_network", NEEDS) {
        return;
    }
    // The backends' default route is a router that knows no clients: only
    // replies to the gateway's own address come back.
    let mut env = Env::up("6s", "two-armed pod-network mtu-router", 1);
    env.start_backends();
    env.write_manifest_text(&ipv6_services(None, 80, true));
    env.start_captures(&[1, 2, 3, 5]);
    start(&mut env, &["g0", "g1"], "0", 1);
    let m = env.metrics();
    let share = m
        .lines()
        .find(|l| l.starts_with("clustergate_snat_ports{"))
        .expect("clustergate_snat_ports");
    let label = |k: &str| -> u64 {
        let at = share.find(&format!("{k}=\"")).expect("label") + k.len() + 2;
        share[at..]
            .split('"')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("port")
    };
    let (lo, hi) = (label("lo"), label("hi"));

    // Source NAT to the gateway's IPv6 address on the LAN, ports from the
    // SNAT range, never one port twice at a time for one backend.
    for (addr, port) in [(VIP6, "80"), (GW_CLIENT6, NODE_PORT)] {
        let v = env.peer("cli", &["http", addr, port, "150"]);
        let ports = assert_http(
            &v,
            150,
            &["backend-1", "backend-2", "backend-3"],
            GW_LAN6,
            &format!("[{addr}]:{port}"),
        );
        assert!(
            ports.iter().all(|p| (lo..=hi).contains(p)),
            "ports outside the SNAT range {lo}-{hi}: {ports:?}"
        );
    }

    udp_rejects_stream_pmtu(&mut env, GW_LAN6);

    let caps = env.finish_captures(&[1, 2, 3, 5]);
    assert_captures(&caps, &[1, 2, 3, 5]);
    assert_ext_and_fragments(&caps);
    assert_steering(&env);

    // The same Services `routed`: the backends' answers go to the router,
    // which has no route to the client (so the checks above can fail).
    let g = env.generation();
    env.write_manifest_text(&ipv6_services(Some("routed"), 80, true));
    env.wait_generation_above(g);
    let v = env.peer("cli", &["http", VIP6, "80", "3", "1", "3"]);
    assert_eq!(counts(&v).len(), 0, "routed answered in a pod network: {v}");
    assert_eq!(errors(&v).len(), 3, "{v}");
}

#[test]
fn ipv6_dsr_with_ipv6_in_ipv6() {
    if !root_or_skip("ipv6_dsr_with_ipv6_in_ipv6", NEEDS) {
        return;
    }
    // One-armed: the client is on the backends' LAN, which they reach on
    // link; they decapsulate IPv6-in-IPv6 and hold the VIP on lo.
    let mut env = Env::up("6d", "one-armed pod-network dsr", 1);
    env.start_backends();
    // DSR delivers the client's packet unchanged: port == targetPort.
    env.write_manifest_text(&ipv6_services(Some("dsr"), 8080, false));
    env.start_captures(&[1, 2, 3]);
    start(&mut env, &["g1"], "0", 1);
    let client = "2001:2:3::2";

    // TCP completes only if the backends answer from the VIP; each saw the
    // client's own address.
    let v = env.peer("cli", &["http", VIP6, "8080", "200"]);
    assert_http(
        &v,
        200,
        &["backend-1", "backend-2", "backend-3"],
        client,
        "DSR",
    );
    // UDP: peer.py counts an answer only from (VIP, 9001).
    let v = env.peer("cli", &["udp", VIP6, "9001", "50"]);
    assert_eq!(v["answered"], 50, "UDP echo from the IPv6 VIP: {v}");
    // The gateway rejects for a Service without endpoints here too.
    let v = env.peer("cli", &["reject", EMPTY_VIP6, "8080", "9001"]);
    assert_eq!(v["tcp"], "refused", "{v}");
    assert_eq!(v["udp"], "unreachable", "{v}");

    // Too big once encapsulated: a 1500-byte packet (1452 of UDP payload)
    // is answered with packet too big, MTU 1500 − 40.
    let too_big = |env: &Env| env.metric(&env.metrics(), "clustergate_encap_too_big_total");
    let t0 = too_big(&env);
    assert_pmtu(&env, VIP6, 1452, 1460);
    let t1 = too_big(&env);
    assert!(t1 > t0, "clustergate_encap_too_big_total did not grow");
    // TCP with full-sized segments finds the path MTU the same way and
    // loses nothing.
    env.ip("cli", &["-6", "route", "flush", "cache"]);
    let stream = Stream::start_to(&mut env, VIP6, "9000", 4, 16384);
    assert_eq!(stream.peer.rsplit_once(':').map(|p| p.0), Some(client));
    stream.finish(500_000);
    assert!(
        too_big(&env) > t1,
        "the stream's segments met no packet too big"
    );

    // The captures looked inside the IPv6-in-IPv6 packets.
    let caps = env.finish_captures(&[1, 2, 3]);
    assert_captures(&caps, &[1, 2, 3]);
    assert_steering(&env);
}

#[test]
fn dual_stack_service_with_affinity_per_family() {
    if !root_or_skip("dual_stack_service_with_affinity_per_family", NEEDS) {
        return;
    }
    let mut env = Env::up("6x", "two-armed", 2);
    // A second client address per family.
    env.ip("cli", &["addr", "add", "198.18.1.3/24", "dev", "c0"]);
    env.ip(
        "cli",
        &["-6", "addr", "add", "2001:2:1::3/64", "dev", "c0", "nodad"],
    );
    env.start_backends();
    env.write_manifest_text(&manifest(&[Svc {
        name: "both",
        cluster_ips: &[VIP, VIP6],
        http_port: 80,
        node_port: Some(NODE_PORT),
        return_path: None,
        affinity: true,
        backends4: &[1, 2, 3],
        backends6: &[1, 2, 3],
    }]));
    env.start_captures(&[1, 2, 3]);
    start(&mut env, &["g0", "g1"], "0,1", 2);

    // Eight clients at once: the cluster IP and the node port of each
    // family, from two client addresses each. Every one sticks to one
    // backend (ClientIP affinity, kept per family), and sees source NAT to
    // the gateway's address of its own family.
    let cases = [
        (VIP, "80", "198.18.1.2"),
        (VIP, "80", "198.18.1.3"),
        ("198.18.1.1", NODE_PORT, "198.18.1.2"),
        ("198.18.1.1", NODE_PORT, "198.18.1.3"),
        (VIP6, "80", CLIENT6),
        (VIP6, "80", "2001:2:1::3"),
        (GW_CLIENT6, NODE_PORT, CLIENT6),
        (GW_CLIENT6, NODE_PORT, "2001:2:1::3"),
    ];
    let script = e2e_dir().join("peer.py");
    let children: Vec<_> = cases
        .iter()
        .map(|(addr, port, bind)| {
            env.in_ns("cli", Path::new("python3"), &[])
                .env("BIND", bind)
                .arg(&script)
                .args(["http", addr, port, "40"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("peer.py")
        })
        .collect();
    let mut sticky: BTreeMap<(bool, &str), String> = BTreeMap::new();
    for ((addr, port, bind), child) in cases.iter().zip(children) {
        let out = child.wait_with_output().expect("peer.py");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{addr}:{port} from {bind}: {e}: {text}"));
        let got = counts(&v);
        assert_eq!(
            got.len(),
            1,
            "[{addr}]:{port} from {bind}: not one backend: {v}"
        );
        let who = got.keys().next().expect("backend").clone();
        let v6 = addr.contains(':');
        let gw = if v6 { GW_LAN6 } else { "198.18.2.1" };
        assert_http(
            &v,
            40,
            &[who.as_str()],
            gw,
            &format!("[{addr}]:{port} from {bind}"),
        );
        // Affinity is per client address and frontend family: the same
        // client keeps its backend on the cluster IP.
        if *port == "80" {
            sticky.insert((v6, bind), who);
        }
    }
    eprintln!("ClientIP affinity, (IPv6, client) → backend: {sticky:?}");

    // UDP on both families at once.
    let udp: Vec<_> = [VIP, VIP6]
        .iter()
        .map(|vip| {
            env.in_ns("cli", Path::new("python3"), &[])
                .arg(&script)
                .args(["udp", vip, "9001", "50"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("peer.py")
        })
        .collect();
    for (vip, child) in [VIP, VIP6].iter().zip(udp) {
        let out = child.wait_with_output().expect("peer.py");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("udp {vip}: {e}: {text}"));
        assert_eq!(v["answered"], 50, "UDP {vip}: {v}");
        assert_eq!(
            v["names"].as_object().map(|m| m.len()),
            Some(1),
            "UDP {vip}: one backend (affinity): {v}"
        );
    }

    let caps = env.finish_captures(&[1, 2, 3]);
    for (b, v) in &caps {
        assert_eq!(v["bad"], 0, "backend-{b}: bad checksums: {v}");
    }
    let seen = |k: &str| {
        caps.values()
            .map(|v| v[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert!(
        seen("seen4") > 0 && seen("seen6") > 0,
        "both families reached the backends: {caps:?}"
    );
    assert_steering(&env);
}
