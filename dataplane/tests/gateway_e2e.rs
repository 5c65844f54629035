//! End to end: `clustergate run` between real clients and real servers.
//!
//! Each test builds its own namespaces (tests/e2e/topology.sh: a client, the
//! gateway, a bridged LAN and four backends, all in 198.18.0.0/15; for a pod
//! network also a router that knows no clients; for DSR the backends'
//! decapsulation and the VIP on lo), starts `clustergate-control` on a
//! manifest and `clustergate run` in the gateway namespace, and drives real
//! sockets from tests/e2e/peer.py: HTTP and a streaming echo over TCP (both
//! report the peer the backend saw), a UDP echo, raw ICMP, a path-MTU probe,
//! held connections, and an AF_PACKET capture in every backend that checks
//! every frame's checksums. The return paths: `routed` in the two-armed
//! test, `snat` (control's default) in a pod network, where `routed` fails,
//! `dsr`, and SNAT ports running out. Everything is bounded in time and
//! count, and the namespaces are deleted even when a test fails.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::*;
use serde_json::Value;
use support::root_or_skip;

#[path = "support/e2e.rs"]
mod e2e;
mod support;

/// One gateway test at a time: they share the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn two_armed_gateway_end_to_end() {
    if !root_or_skip("two_armed_gateway_end_to_end", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut env = Env::up("a", "two-armed", 2);
    // This test covers the `routed` return path (the backends' default route
    // is the gateway): control's default is `snat`, the flag changes it.
    env.control_args = vec!["--return-path", "routed"];
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    env.start_control();
    let gw_pid = env.start_gateway(&["g0", "g1"], "0,1", 2, &[]);
    env.wait_healthy();

    // Every frame reaching a backend is captured and its checksums checked.
    let stop_capture = env.dir.join("stop-capture");
    for b in 1..=4u8 {
        let mut cmd = env.in_ns(&format!("b{b}"), Path::new("python3"), &[]);
        cmd.arg(e2e_dir().join("peer.py")).args([
            "capture",
            "e0",
            "150",
            stop_capture.to_str().expect("utf-8"),
        ]);
        env.spawn(&format!("capture-{b}"), cmd, true);
    }
    std::thread::sleep(Duration::from_millis(300));

    // Privileges: after set-up, the main thread keeps NET_ADMIN (12) and
    // BPF (39); the workers keep nothing. The gateway is the child of
    // `ip netns exec`, which execs it, so the pid is the gateway's.
    let proc_dir = PathBuf::from(format!("/proc/{gw_pid}"));
    assert_eq!(
        cap_eff(&proc_dir.join("status")),
        (1 << 12) | (1 << 39),
        "main thread capabilities"
    );
    let mut workers_seen = 0;
    for task in std::fs::read_dir(proc_dir.join("task"))
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("cg-worker") {
            workers_seen += 1;
            assert_eq!(
                cap_eff(&task.path().join("status")),
                0,
                "worker {comm} capabilities"
            );
        }
    }
    assert_eq!(workers_seen, 2, "two pinned workers");

    // 5. The gateway's own address still answers while clustergate runs.
    let v = env.peer("cli", &["ping", "198.18.1.1", "3"]);
    assert_eq!(v["replies"], 3, "ping to the gateway's own address: {v}");
    let mut listener = env.in_ns("gw", Path::new("python3"), &[]);
    listener
        .arg(e2e_dir().join("peer.py"))
        .args(["listen", "198.18.1.1", "7000", "30"]);
    env.spawn("listener", listener, true);
    let mut line = String::new();
    let out = env.child("listener").stdout.take().expect("stdout");
    BufReader::new(out).read_line(&mut line).expect("listener");
    let v = env.peer("cli", &["probe", "198.18.1.1", "7000"]);
    assert_eq!(v["answer"], "node", "TCP to the gateway's own address: {v}");

    // 1. 1000 connections through the VIP spread like the Maglev ring.
    let shares = ring_shares(&env.dir.join("shm"));
    let v = env.peer("cli", &["http", VIP, "80", "1000"]);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "HTTP errors: {v}"
    );
    let got = counts(&v);
    assert_eq!(got.values().sum::<u64>(), 1000, "{v}");
    for (name, share) in &shares {
        // Binomial spread: allow 5 standard deviations around n·p.
        let n = 1000.0;
        let expect = n * share;
        let sd = (n * share * (1.0 - share)).sqrt();
        let seen = *got.get(name).unwrap_or(&0) as f64;
        assert!(
            (seen - expect).abs() <= 5.0 * sd,
            "{name}: {seen} connections, ring share {share:.3} expects {expect:.0} ± {:.0}",
            5.0 * sd
        );
    }
    assert_eq!(got.len(), 3, "every backend answered: {got:?}");
    // Routed: destination NAT only, every backend saw the client itself.
    assert_eq!(peers(&v).len(), 3, "every backend reported its peer: {v}");
    for (name, addrs) in peers(&v) {
        assert_eq!(
            addrs.keys().collect::<Vec<_>>(),
            ["198.18.1.2"],
            "{name}: routed keeps the client's address"
        );
    }

    // 3. UDP request/response through the VIP.
    let v = env.peer("cli", &["udp", VIP, "9001", "200"]);
    assert_eq!(v["answered"], 200, "UDP echo: {v}");

    // 4. No endpoints: RST for TCP, ICMP port unreachable for UDP.
    let v = env.peer("cli", &["reject", EMPTY_VIP, "80", "9001"]);
    assert_eq!(v["tcp"], "refused", "{v}");
    assert_eq!(v["udp"], "unreachable", "{v}");

    // 2 and 6. A long-lived stream survives a backend added, another removed,
    // and control killed and restarted.
    let stream = Stream::start(&mut env, "9000", 8, 1024);
    let (removed, keep) = stream.table_change(&[1, 2, 3]);
    let g0 = env.generation();
    std::thread::sleep(Duration::from_secs(1));
    env.write_manifest(&keep);
    let g1 = env.wait_generation_above(g0);
    // Control goes away and comes back while the stream runs: no frame is
    // dropped meanwhile, by the core, the next hops or the rings.
    let before = env.metrics();
    env.kill("control");
    std::thread::sleep(Duration::from_millis(1500));
    env.start_control();
    let _ = env.wait_generation_above(g1);
    let after = env.metrics();
    for m in [
        "clustergate_drops_total",
        "clustergate_xsk_rx_dropped_total",
    ] {
        assert_eq!(
            env.metric(&before, m),
            env.metric(&after, m),
            "{m} grew while control restarted:\n{after}"
        );
    }
    assert!(
        env.metric(&after, "clustergate_packets_total{")
            > env.metric(&before, "clustergate_packets_total{"),
        "the stream kept flowing through the restart"
    );
    stream.finish(100_000);

    // New connections now reach the added backend and never the removed one.
    let v = env.peer("cli", &["http", VIP, "80", "200"]);
    let got = counts(&v);
    assert!(
        got.contains_key("backend-4"),
        "added backend takes new flows: {got:?}"
    );
    assert!(
        !got.contains_key(&format!("backend-{removed}")),
        "removed backend-{removed} still gets new flows: {got:?}"
    );

    // 7. Every frame that reached a backend had valid checksums.
    std::fs::write(&stop_capture, b"").expect("stop file");
    for b in 1..=4u8 {
        let name = format!("capture-{b}");
        let out = env.child(&name).stdout.take().expect("stdout");
        let mut l = String::new();
        BufReader::new(out)
            .read_line(&mut l)
            .expect("capture result");
        let v: Value = serde_json::from_str(&l).expect("capture json");
        assert_eq!(v["bad"], 0, "backend-{b}: frames with bad checksums: {v}");
        assert!(
            v["seen"].as_u64().unwrap_or(0) > 0,
            "backend-{b} saw no frame: {v}"
        );
    }

    // Metrics name what happened.
    let m = env.metrics();
    assert!(env.metric(&m, "clustergate_packets_total{") > 2000.0, "{m}");
    assert!(m.contains("clustergate_xsk_socket_info"), "{m}");
    assert!(
        env.metric(&m, "clustergate_conntrack_inserts_total") >= 1200.0,
        "{m}"
    );

    // SIGTERM drains and detaches; the interfaces are left as found.
    let st = Command::new("kill")
        .args(["-TERM", &gw_pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = env.child("gateway").try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "gateway exit: {status}\n{}",
        env.log("gateway")
    );
    assert!(!env.xdp_attached("gw", "g0"), "XDP left on g0");
    assert!(!env.xdp_attached("gw", "g1"), "XDP left on g1");
}

#[test]
fn one_armed_gateway_and_a_worker_fault() {
    if !root_or_skip("one_armed_gateway_and_a_worker_fault", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut env = Env::up("b", "one-armed", 1);
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    // Before control publishes, the gateway runs but is not ready, and says why.
    env.start_gateway(&["g1"], "0", 1, &["--inject-worker-fault", "3000"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = env.peer("gw", &["get", "http://127.0.0.1:10257/healthz"]);
        if v["status"] == 503
            && v["body"]
                .as_str()
                .unwrap_or("")
                .contains("no table snapshot")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 503 before the first snapshot: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = env.peer("gw", &["get", "http://127.0.0.1:10257/livez"]);
    assert_eq!(v["status"], 200, "live while waiting for a table: {v}");
    env.start_control();
    env.wait_healthy();

    let v = env.peer("cli", &["http", VIP, "80", "200"]);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "HTTP errors: {v}"
    );
    assert_eq!(counts(&v).len(), 3, "every backend answered: {v}");
    let v = env.peer("cli", &["udp", VIP, "9001", "50"]);
    assert_eq!(v["answered"], 50, "UDP echo: {v}");
    let v = env.peer("cli", &["reject", EMPTY_VIP, "80", "9001"]);
    assert_eq!(v["tcp"], "refused", "{v}");
    assert_eq!(v["udp"], "unreachable", "{v}");
    let v = env.peer("cli", &["ping", "198.18.3.1", "2"]);
    assert_eq!(v["replies"], 2, "the gateway's own address: {v}");

    // The injected fault: the worker panics once 3000 frames came in. The
    // process reports it, detaches and exits non-zero instead of hanging.
    // (Connections fail from then on: stop after 5 failures of 1 s each.)
    let _ = env.peer("cli", &["http", VIP, "80", "600", "1", "5"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = env.child("gateway").try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway still running 15 s after its worker faulted\n{}",
            env.log("gateway")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a faulted worker must fail the process");
    let log = env.log("gateway");
    assert!(log.contains("worker faulted"), "{log}");
    assert!(log.contains("injected fault"), "{log}");
    assert!(
        !env.xdp_attached("gw", "g1"),
        "XDP left on g1 after the fault"
    );
}

/// The workers' shares of the SNAT range, as the gateway exports them
/// (`clustergate_snat_ports`, labels `lo` and `hi`), lowest first.
fn snat_shares(metrics: &str) -> Vec<(u16, u16)> {
    let mut shares: Vec<(u16, u16)> = metrics
        .lines()
        .filter(|l| l.starts_with("clustergate_snat_ports{"))
        .map(|line| {
            let label = |k: &str| -> u16 {
                let at = line.find(&format!("{k}=\"")).expect("label") + k.len() + 2;
                line[at..]
                    .split('"')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("port label")
            };
            (label("lo"), label("hi"))
        })
        .collect();
    assert!(!shares.is_empty(), "no clustergate_snat_ports:\n{metrics}");
    shares.sort_unstable();
    shares
}

/// The whole SNAT range: from the first share's first port to the last's last.
fn snat_range(metrics: &str) -> (u16, u16) {
    let shares = snat_shares(metrics);
    (shares[0].0, shares[shares.len() - 1].1)
}

/// Errors of a peer.py answer.
fn errors(v: &Value) -> Vec<String> {
    v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect()
}

#[test]
fn snat_in_a_pod_network() {
    if !root_or_skip("snat_in_a_pod_network", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The backends' default route is a router that knows no clients: a reply
    // to the client's own address dies there.
    let mut env = Env::up("c", "two-armed pod-network", 2);
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    // No --return-path and no annotation: control's default, source NAT.
    env.start_control();
    // Two workers: each owns half of the flows and takes the SNAT ports
    // whose replies come back to it, anywhere in the range.
    env.start_gateway(&["g0", "g1"], "0,1", 2, &[]);
    env.wait_healthy();
    let shares = snat_shares(&env.metrics());
    assert_eq!(shares.len(), 2, "one line per worker: {shares:?}");
    assert_eq!(
        shares[0], shares[1],
        "both workers probe the whole range: {shares:?}"
    );
    let (lo, hi) = shares[0];

    // HTTP through the VIP: every backend answers, and every backend saw the
    // gateway's address, never the client's, from a port of the SNAT range;
    // two connections to one backend never share a port.
    let v = env.peer("cli", &["http", VIP, "80", "300"]);
    assert_eq!(errors(&v), Vec::<String>::new(), "HTTP errors: {v}");
    let got = counts(&v);
    assert_eq!(got.values().sum::<u64>(), 300, "{v}");
    assert_eq!(got.len(), 3, "every backend answered: {got:?}");
    let seen = peers(&v);
    assert_eq!(seen.len(), 3, "every backend reported its peer: {v}");
    for (name, addrs) in &seen {
        assert_eq!(
            addrs.keys().collect::<Vec<_>>(),
            ["198.18.2.1"],
            "{name} saw other peers than the gateway's address"
        );
        let mut ports = addrs["198.18.2.1"].clone();
        assert!(
            ports
                .iter()
                .all(|p| (u64::from(lo)..=u64::from(hi)).contains(p)),
            "{name}: ports outside the SNAT range {lo}-{hi}: {ports:?}"
        );
        let n = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n, "{name}: a SNAT port used twice");
    }
    // Both workers owned flows and allocated their ports (a reply that
    // reached the other worker was handed over, never lost: 300 answers).
    let m = env.metrics();
    for w in 0..2 {
        let new_flows = env.metric_where(
            &m,
            "clustergate_new_flows_total",
            &format!("worker=\"{w}\""),
        );
        assert!(new_flows > 0.0, "worker {w} bound no flow:\n{m}");
    }

    // UDP request/response: the answers come back from the VIP.
    let v = env.peer("cli", &["udp", VIP, "9001", "100"]);
    assert_eq!(v["answered"], 100, "UDP echo: {v}");

    // A backend's reset and ICMP port unreachable reach the client too, the
    // ICMP error translated back (its quoted packet names the gateway).
    let v = env.peer(
        "cli",
        &[
            "reject",
            VIP,
            &CLOSED_TCP.to_string(),
            &CLOSED_UDP.to_string(),
        ],
    );
    assert_eq!(v["tcp"], "refused", "backend's RST: {v}");
    assert_eq!(
        v["udp"], "unreachable",
        "backend's ICMP port unreachable: {v}"
    );

    // A long stream survives a backend added and another removed.
    let stream = Stream::start(&mut env, "9000", 8, 1024);
    assert_eq!(addr_port(&stream.peer).0, "198.18.2.1", "stream's peer");
    let (removed, keep) = stream.table_change(&[1, 2, 3]);
    let g0 = env.generation();
    std::thread::sleep(Duration::from_secs(1));
    env.write_manifest(&keep);
    env.wait_generation_above(g0);
    stream.finish(100_000);
    let v = env.peer("cli", &["http", VIP, "80", "100"]);
    assert_eq!(errors(&v), Vec::<String>::new(), "HTTP errors: {v}");
    let got = counts(&v);
    assert!(got.contains_key("backend-4"), "added backend: {got:?}");
    assert!(
        !got.contains_key(&format!("backend-{removed}")),
        "removed backend-{removed} still gets new flows: {got:?}"
    );

    // The same Service `routed`: the backends get the connections but their
    // replies go to the router, which has no route to the client. This is
    // what source NAT is for (and shows the checks above can fail).
    env.return_path = Some("routed");
    let g = env.generation();
    env.write_manifest(&keep);
    env.wait_generation_above(g);
    let forwarded = |m: &str| env.metric_where(m, "clustergate_packets_total{", "\"forward\"");
    let before = forwarded(&env.metrics());
    let v = env.peer("cli", &["http", VIP, "80", "4", "1", "4"]);
    assert_eq!(counts(&v).len(), 0, "routed answered in a pod network: {v}");
    let errs = errors(&v);
    assert_eq!(errs.len(), 4, "{v}");
    assert!(
        errs.iter().all(|e| e.contains("timed out")),
        "routed connections time out: {v}"
    );
    let v = env.peer("cli", &["udp", VIP, "9001", "2", "1"]);
    assert_eq!(
        v["answered"], 0,
        "routed UDP answered in a pod network: {v}"
    );
    assert!(
        forwarded(&env.metrics()) >= before + 4.0,
        "the gateway forwarded the connections to the backends"
    );
}

#[test]
fn dsr_backends_answer_the_client_directly() {
    if !root_or_skip("dsr_backends_answer_the_client_directly", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // One-armed: the client is on the backends' LAN, and the backends reach
    // it through an on-link route, not through the gateway (their default
    // route is the router, which knows no clients). They decapsulate IPIP
    // and hold the VIP on lo.
    let mut env = Env::up("d", "one-armed pod-network dsr", 1);
    env.return_path = Some("dsr");
    // DSR delivers the client's packet unchanged: port == targetPort.
    env.http_port = 8080;
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    env.start_control();
    env.start_gateway(&["g1"], "0", 1, &[]);
    env.wait_healthy();

    // TCP completes only if the backends answer from the VIP; each saw the
    // client's own address.
    let v = env.peer("cli", &["http", VIP, "8080", "200"]);
    assert_eq!(errors(&v), Vec::<String>::new(), "HTTP errors: {v}");
    let got = counts(&v);
    assert_eq!(got.len(), 3, "every backend answered: {got:?}");
    assert_eq!(peers(&v).len(), 3, "every backend reported its peer: {v}");
    for (name, addrs) in peers(&v) {
        assert_eq!(
            addrs.keys().collect::<Vec<_>>(),
            ["198.18.3.2"],
            "{name}: DSR keeps the client's address"
        );
    }
    // UDP: peer.py counts an answer only from (VIP, 9001).
    let v = env.peer("cli", &["udp", VIP, "9001", "50"]);
    assert_eq!(v["answered"], 50, "UDP echo from the VIP: {v}");

    // Too big once encapsulated: a DF datagram of 1500 bytes (1472 of
    // payload) is answered with fragmentation needed, MTU 1500 − 20.
    let too_big = |env: &Env| env.metric(&env.metrics(), "clustergate_encap_too_big_total");
    let t0 = too_big(&env);
    let v = env.peer("cli", &["pmtu", VIP, "9001", "1472", "3"]);
    assert_eq!(v["mtu_before"], 1500, "{v}");
    assert_eq!(v["mtu"], 1480, "path MTU the client learnt: {v}");
    let t1 = too_big(&env);
    assert!(t1 > t0, "clustergate_encap_too_big_total did not grow");

    // TCP with full-sized segments finds the path MTU the same way and loses
    // nothing (the learnt MTU is forgotten first).
    let st = Command::new("ip")
        .args(["-n", &env.ns("cli"), "route", "flush", "cache"])
        .status()
        .expect("ip route flush cache");
    assert!(st.success());
    let stream = Stream::start(&mut env, "9000", 5, 16384);
    assert_eq!(addr_port(&stream.peer).0, "198.18.3.2", "stream's peer");
    stream.finish(1_000_000);
    assert!(
        too_big(&env) > t1,
        "the stream's full-sized segments were not answered with fragmentation needed"
    );
}

/// peer.py hold: `n` connections to the stream port; returns what each got
/// and the reader that reports their close once `stop` exists.
fn hold(env: &mut Env, name: &str, n: u32, stop: &Path) -> (Vec<Value>, BufReader<ChildStdout>) {
    let mut cmd = env.in_ns("cli", Path::new("python3"), &[]);
    cmd.arg(e2e_dir().join("peer.py")).args([
        "hold",
        VIP,
        "9000",
        &n.to_string(),
        "3",
        stop.to_str().expect("utf-8"),
        "60",
    ]);
    env.spawn(name, cmd, true);
    let out = env.child(name).stdout.take().expect("stdout");
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line).expect("hold");
    let v: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("{name}: {line:?}: {e}\n{}", env.log(name)));
    let held = v["held"].as_array().cloned().expect("held");
    (held, reader)
}

/// The SNAT ports of `answers` (`{"peer": "ADDR:PORT"}`), asserting that
/// each came from `addr` and a port in `lo..=hi`, and that none repeats.
fn distinct_ports(answers: &[Value], addr: &str, lo: u16, hi: u16) -> Vec<u16> {
    let mut ports = Vec::new();
    for a in answers {
        let peer = a["peer"]
            .as_str()
            .unwrap_or_else(|| panic!("no answer: {a}"));
        let (got, port) = addr_port(peer);
        assert_eq!(got, addr, "{a}");
        assert!((lo..=hi).contains(&port), "{a}: outside {lo}-{hi}");
        assert!(
            !ports.contains(&port),
            "port {port} used twice: {answers:?}"
        );
        ports.push(port);
    }
    ports
}

#[test]
fn snat_ports_run_out_and_come_back() {
    if !root_or_skip("snat_ports_run_out_and_come_back", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut env = Env::up("e", "two-armed pod-network", 1);
    // Four ports, outside the gateway namespace's ephemeral ports.
    let (lo, hi) = (20_000u16, 20_003u16);
    let out = env
        .in_ns(
            "gw",
            Path::new("cat"),
            &["/proc/sys/net/ipv4/ip_local_port_range"],
        )
        .output()
        .expect("ip_local_port_range");
    let local: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        local.len() == 2 && (hi < local[0] || lo > local[1]),
        "{lo}-{hi} overlaps ip_local_port_range {local:?}"
    );
    env.start_backends();
    // One backend: every flow wants a port of the same (address, backend,
    // port, protocol).
    env.write_manifest(&[1]);
    env.start_control();
    let range = format!("{lo}-{hi}");
    env.start_gateway(
        &["g0", "g1"],
        "0",
        1,
        &[
            "--snat-ports",
            &range,
            "--conntrack-tcp-timeout-close-wait",
            "2",
            "--conntrack-udp-timeout",
            "2",
            "--conntrack-udp-timeout-stream",
            "2",
        ],
    );
    env.wait_healthy();
    assert_eq!(snat_range(&env.metrics()), (lo, hi));
    let exhausted = |env: &Env| {
        env.metric_where(
            &env.metrics(),
            "clustergate_drops_total{",
            "reason=\"snat_ports_exhausted\"",
        )
    };

    // TCP: four connections held open take the four ports; the fifth gets
    // no port and times out.
    let stop = env.dir.join("stop-hold");
    let (held, mut reader) = hold(&mut env, "hold-1", 5, &stop);
    let ports = distinct_ports(&held[..4], "198.18.2.1", lo, hi);
    assert_eq!(ports.len(), 4);
    let fifth = held[4]["error"].as_str().unwrap_or("");
    assert!(
        fifth.contains("timed out"),
        "fifth connection: {:?}",
        held[4]
    );
    assert!(
        exhausted(&env) > 0.0,
        "no snat_ports_exhausted drop counted"
    );
    // Closed, they free their ports after close-wait (2 s) and a sweep.
    std::fs::write(&stop, b"").expect("stop file");
    let mut line = String::new();
    reader.read_line(&mut line).expect("hold closed");
    assert!(line.contains("\"closed\": 4"), "{line}");
    env.wait_conntrack_empty(15);
    std::fs::remove_file(&stop).expect("stop file");
    let (held, mut reader) = hold(&mut env, "hold-2", 4, &stop);
    distinct_ports(&held, "198.18.2.1", lo, hi);
    // Reset instead of closed: the ports come back after the 10 s a reset
    // flow lingers.
    std::fs::write(&stop, b"rst").expect("stop file");
    let mut line = String::new();
    reader.read_line(&mut line).expect("hold closed");
    assert!(line.contains("\"closed\": 4, \"with\": \"rst\""), "{line}");
    env.wait_conntrack_empty(20);
    std::fs::write(&stop, b"fin").expect("stop file");
    let (held, _) = hold(&mut env, "hold-3", 4, &stop);
    distinct_ports(&held, "198.18.2.1", lo, hi);
    env.wait_conntrack_empty(15);

    // UDP: six flows (six source ports); four get the ports and an answer,
    // two are dropped. Once the four expire, four new ones get through.
    let before = exhausted(&env);
    let v = env.peer("cli", &["whoami", VIP, "9001", "6", "2"]);
    let answers = v["answers"].as_array().cloned().expect("answers");
    distinct_ports(&answers[..4], "198.18.2.1", lo, hi);
    for a in &answers[4..] {
        assert!(
            a["error"].as_str().unwrap_or("").contains("timed out"),
            "{v}"
        );
    }
    assert!(exhausted(&env) >= before + 2.0, "UDP drops not counted");
    env.wait_conntrack_empty(15);
    let v = env.peer("cli", &["whoami", VIP, "9001", "4", "2"]);
    let answers = v["answers"].as_array().cloned().expect("answers");
    distinct_ports(&answers, "198.18.2.1", lo, hi);
}

#[test]
fn run_refuses_bad_flags() {
    let bin = gateway_bin();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--interface", "cg-no-such0"], "cg-no-such0"),
        (
            &["run", "--interface", "lo", "--cores", "0,0"],
            "listed twice",
        ),
        (
            &[
                "run",
                "--interface",
                "lo",
                "--cores",
                "0-1",
                "--queues",
                "1",
            ],
            "every worker needs a queue",
        ),
        (
            &["run", "--interface", "lo", "--ring-size", "1000"],
            "power of two",
        ),
        (
            &["run", "--interface", "lo", "--interface", "lo"],
            "given twice",
        ),
        (&["run", "--interface", "lo", "--queues", "0"], "--queues"),
        (
            &["run", "--interface", "lo", "--snat-ports", "20-10"],
            "backwards",
        ),
        (
            &["run", "--interface", "lo", "--snat-ports", "0-100"],
            "port 0",
        ),
        (
            &["run", "--interface", "lo", "--snat-address", "224.0.0.1"],
            "multicast",
        ),
        (
            &[
                "run",
                "--interface",
                "lo",
                "--snat-address",
                "::ffff:198.18.0.1",
            ],
            "IPv4-mapped",
        ),
        (
            &["run", "--interface", "lo", "--snat-address", "0.0.0.0"],
            "unspecified",
        ),
        (
            &[
                "run",
                "--interface",
                "lo",
                "--snat-address",
                "198.18.0.1",
                "--snat-address",
                "198.18.0.1",
            ],
            "given twice",
        ),
        (
            &["run", "--interface", "lo", "--encap-mtu", "100"],
            "--encap-mtu",
        ),
        (
            &["run", "--interface", "lo", "--conntrack-udp-timeout", "0"],
            "from 1 s",
        ),
        (
            &[
                "run",
                "--interface",
                "lo",
                "--conntrack-tcp-timeout-established",
                "1d",
            ],
            "not a timeout",
        ),
        (
            &[
                "run",
                "--interface",
                "lo",
                "--conntrack-tcp-timeout-close-wait=-1",
            ],
            "not a timeout",
        ),
        (
            &[
                "run",
                "--interface",
                "lo",
                "--conntrack-udp-timeout-stream",
                "721h",
            ],
            "30 days",
        ),
    ];
    let mut cases: Vec<(Vec<String>, String)> = cases
        .iter()
        .map(|(a, n)| (a.iter().map(|s| (*s).to_owned()).collect(), (*n).to_owned()))
        .collect();
    // 17 IPv4 SNAT addresses: at most 16 per family.
    let mut many = vec!["run".to_owned(), "--interface".into(), "lo".into()];
    for i in 1..=17 {
        many.extend(["--snat-address".to_owned(), format!("198.18.0.{i}")]);
    }
    cases.push((many, "more than 16 IPv4".into()));
    // A SNAT range inside this namespace's ip_local_port_range: refused,
    // naming both ranges.
    let local = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("reading ip_local_port_range");
    let mut ends = local
        .split_whitespace()
        .map(|p| p.parse::<u16>().expect("port"));
    let (lo, hi) = (ends.next().expect("lo"), ends.next().expect("hi"));
    let inside = format!("{lo}-{}", lo.saturating_add(10).min(hi));
    cases.push((
        ["run", "--interface", "lo", "--snat-ports", inside.as_str()]
            .map(str::to_owned)
            .to_vec(),
        format!("--snat-ports {inside} overlaps the node's ip_local_port_range {lo}-{hi}"),
    ));
    for (args, needle) in &cases {
        let out = Command::new(&bin).args(args).output().expect("clustergate");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(needle.as_str()),
            "{args:?}: {err:?} does not name {needle:?}"
        );
    }
}

/// Node port, external IP and load-balancer IP of `web` (source NAT, source
/// ranges), and two `externalTrafficPolicy: Local` Services with health-check
/// node ports, one with endpoints (`local`) and one without (`gone`).
fn every_way_manifest() -> String {
    let slice = |name: &str, svc: &str, backends: &[u8]| {
        let mut eps = String::new();
        for b in backends {
            eps.push_str(&format!(
                "- addresses: [198.18.2.1{b}]\n  conditions: {{ready: true}}\n"
            ));
        }
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n{eps}"
        )
    };
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {VIP}
  externalIPs: [198.18.101.1]
  loadBalancerSourceRanges: [198.18.1.2/32]
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}
status:
  loadBalancer:
    ingress: [{{ip: 198.18.102.1}}]
---
{}---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.3
  externalTrafficPolicy: Local
  healthCheckNodePort: 30999
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30081}}
status:
  loadBalancer:
    ingress: [{{ip: 198.18.102.3}}]
---
{}---
apiVersion: v1
kind: Service
metadata: {{name: gone, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.4
  externalTrafficPolicy: Local
  healthCheckNodePort: 30998
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30082}}
",
        slice("web-1", "web", &[1, 2]),
        slice("local-1", "local", &[3, 4])
    )
}

/// The backends that answered `v` (an `http` result) and the one peer
/// address each reported; every request answered.
fn answered_from(v: &Value, n: usize) -> (Vec<String>, Vec<String>) {
    assert_eq!(errors(v), Vec::<String>::new(), "HTTP errors: {v}");
    assert_eq!(counts(v).values().sum::<u64>(), n as u64, "{v}");
    let backends = counts(v).keys().cloned().collect();
    let mut addrs: Vec<String> = peers(v).values().flat_map(|a| a.keys().cloned()).collect();
    addrs.sort();
    addrs.dedup();
    (backends, addrs)
}

#[test]
fn every_way_into_a_service() {
    if !root_or_skip("every_way_into_a_service", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Two-armed: the backends route through the gateway, so `routed` (what
    // externalTrafficPolicy: Local gets) works as well as source NAT.
    let mut env = Env::up("e", "two-armed", 1);
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .args(["-n", &env.ns("cli")])
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    // The client routes the external and load-balancer IPs to the gateway,
    // and has a second address outside `web`'s source ranges.
    ip(&["route", "add", "198.18.101.0/24", "via", "198.18.1.1"]);
    ip(&["route", "add", "198.18.102.0/24", "via", "198.18.1.1"]);
    ip(&["addr", "add", "198.18.1.3/24", "dev", "c0"]);
    env.start_backends();
    env.write_manifest_text(&every_way_manifest());
    env.start_control();
    env.start_gateway(&["g0", "g1"], "0", 1, &[]);
    env.wait_healthy();
    let backends = |names: &[&str]| names.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();

    // A node port on the gateway's own address, an external IP and a
    // load-balancer IP: each served by `web`'s backends, through source NAT
    // (the backends see the gateway's address on their side).
    for (addr, port) in [
        ("198.18.1.1", "30080"),
        ("198.18.101.1", "80"),
        ("198.18.102.1", "80"),
        (VIP, "80"),
    ] {
        let v = env.peer("cli", &["http", addr, port, "20"]);
        let (who, seen) = answered_from(&v, 20);
        assert_eq!(
            who,
            backends(&["backend-1", "backend-2"]),
            "{addr}:{port}: {v}"
        );
        assert_eq!(seen, ["198.18.2.1"], "{addr}:{port}: source NAT: {v}");
    }

    // loadBalancerSourceRanges: a client outside is dropped on the
    // load-balancer IP only; the cluster IP and the node port stay open to it.
    let outside = |addr: &str, port: &str, n: &str, timeout: &str| {
        let out = env
            .in_ns("cli", Path::new("python3"), &[])
            .env("BIND", "198.18.1.3")
            .arg(e2e_dir().join("peer.py"))
            .args(["http", addr, port, n, timeout])
            .output()
            .expect("peer.py");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str::<Value>(text.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("peer.py: {e}: {text}"))
    };
    let before = env.metric_where(&env.metrics(), "clustergate_drops_total", "source_range");
    let v = outside("198.18.102.1", "80", "3", "1");
    assert_eq!(
        counts(&v).values().sum::<u64>(),
        0,
        "outside client served: {v}"
    );
    assert_eq!(errors(&v).len(), 3, "{v}");
    let after = env.metric_where(&env.metrics(), "clustergate_drops_total", "source_range");
    assert!(
        after >= before + 3.0,
        "source_range drops {before} → {after}"
    );
    for (addr, port) in [(VIP, "80"), ("198.18.1.1", "30080")] {
        let v = outside(addr, port, "5", "3");
        assert_eq!(
            counts(&v).values().sum::<u64>(),
            5,
            "{addr}:{port} refused a client outside the source ranges: {v}"
        );
    }

    // externalTrafficPolicy: Local keeps the client's address (no source NAT)
    // on the node port and the load-balancer IP.
    for (addr, port) in [("198.18.1.1", "30081"), ("198.18.102.3", "80")] {
        let v = env.peer("cli", &["http", addr, port, "20"]);
        let (who, seen) = answered_from(&v, 20);
        assert_eq!(
            who,
            backends(&["backend-3", "backend-4"]),
            "{addr}:{port}: {v}"
        );
        assert_eq!(
            seen,
            ["198.18.1.2"],
            "{addr}:{port}: the client's own address: {v}"
        );
    }

    // healthCheckNodePort: 200 with endpoints, 503 without, kube-proxy's body.
    let v = env.peer("cli", &["get", "http://198.18.1.1:30999/"]);
    assert_eq!(v["status"], 200, "health check of `local`: {v}");
    let body: Value = serde_json::from_str(v["body"].as_str().unwrap_or("")).expect("json body");
    assert_eq!(body["service"]["namespace"], "default", "{body}");
    assert_eq!(body["service"]["name"], "local", "{body}");
    assert_eq!(body["localEndpoints"], 2, "{body}");
    let v = env.peer("cli", &["get", "http://198.18.1.1:30998/"]);
    assert_eq!(v["status"], 503, "health check of `gone`: {v}");
    let body: Value = serde_json::from_str(v["body"].as_str().unwrap_or("")).expect("json body");
    assert_eq!(body["localEndpoints"], 0, "{body}");

    // `gone` has no endpoints: its node port rejects like its cluster IP.
    let v = env.peer("cli", &["reject", "198.18.1.1", "30082", "30082"]);
    assert_eq!(v["tcp"], "refused", "{v}");
}

/// `clustergate inspect` against a running gateway (in its namespace).
fn inspect(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["inspect", "--server", "127.0.0.1:10257"];
    all.extend_from_slice(args);
    let out = env
        .in_ns("gw", &gateway_bin(), &all)
        .output()
        .expect("clustergate inspect");
    assert!(
        out.status.success(),
        "clustergate {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `clustergate inspect` that must fail: its stderr.
fn inspect_fails(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["inspect", "--server", "127.0.0.1:10257"];
    all.extend_from_slice(args);
    let out = env
        .in_ns("gw", &gateway_bin(), &all)
        .output()
        .expect("clustergate inspect");
    assert!(!out.status.success(), "clustergate {all:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn inspect_json(env: &Env, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let text = inspect(env, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("inspect {args:?}: {e}: {text}"))
}

/// The `web` HTTP frontend's backends from `inspect services`: address →
/// (new_flows, packets, bytes).
fn web_backends(services: &Value) -> BTreeMap<String, (u64, u64, u64)> {
    let web = services["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["frontend"] == format!("{VIP}:80") && s["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("no {VIP}:80 in {services}"));
    web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            let n = |k: &str| b[k].as_u64().unwrap_or_else(|| panic!("{k} in {b}"));
            (
                b["address"].as_str().expect("address").to_owned(),
                (n("new_flows"), n("packets"), n("bytes")),
            )
        })
        .collect()
}

#[test]
fn inspect_a_running_gateway() {
    if !root_or_skip("inspect_a_running_gateway", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut env = Env::up("i", "one-armed", 1);
    env.start_backends();
    env.write_manifest(&[1, 2, 3]);
    env.start_control();
    env.start_gateway(
        &["g1"],
        "0",
        1,
        &["--metrics-per-frontend", "--log-format", "json"],
    );
    env.wait_healthy();

    let before = inspect_json(&env, &["services"]);
    assert!(before["generation"].as_u64().unwrap_or(0) > 0, "{before}");
    // Each frontend carries its Service's name, from control's snapshot.
    let web = before["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["frontend"] == format!("{VIP}:80") && s["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("no {VIP}:80 in {before}"));
    assert_eq!(web["service"], "default/web", "{web}");
    assert_eq!(web["port_name"], "http", "{web}");
    let m0 = env.metrics();

    // 100 HTTP connections through the VIP (control's default return path:
    // source NAT, so each flow has a SNAT address and port).
    let v = env.peer("cli", &["http", VIP, "80", "100"]);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "HTTP errors: {v}"
    );
    let answered = counts(&v);
    assert_eq!(answered.values().sum::<u64>(), 100, "{v}");
    let seen_by = peers(&v);

    // flows: every connection, to its backend, with the SNAT port that
    // backend saw.
    let flows = inspect_json(&env, &["flows", "--limit", "5000"]);
    let list = flows["flows"].as_array().expect("flows");
    let web: Vec<&Value> = list
        .iter()
        .filter(|f| f["frontend"] == format!("{VIP}:80"))
        .collect();
    assert_eq!(web.len(), 100, "{flows}");
    assert_eq!(flows["truncated"], false);
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    for f in &web {
        for k in ["client", "frontend", "backend", "protocol", "state"] {
            assert!(f[k].is_string(), "{k} in {f}");
        }
        assert!(f["age_s"].is_u64() && f["idle_s"].is_u64(), "{f}");
        assert_eq!(f["protocol"], "tcp");
        assert_eq!(f["service"], "default/web", "{f}");
        assert_eq!(f["return_path"], "snat");
        let (backend, port) = addr_port(f["backend"].as_str().expect("backend"));
        assert_eq!(port, 8080, "{f}");
        let b: u8 = backend
            .strip_prefix("198.18.2.1")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("backend {backend}"));
        let name = format!("backend-{b}");
        *per_backend.entry(name.clone()).or_default() += 1;
        let (snat_addr, snat_port) = addr_port(f["snat"].as_str().expect("snat"));
        assert!(
            seen_by
                .get(&name)
                .and_then(|a| a.get(&snat_addr))
                .is_some_and(|ports| ports.contains(&u64::from(snat_port))),
            "{name} never saw {snat_addr}:{snat_port}: {f}"
        );
    }
    assert_eq!(per_backend, answered, "flows per backend as answered");
    // Filters: one backend, and a frontend; the limit truncates.
    let one = inspect_json(&env, &["flows", "--backend", "198.18.2.11"]);
    let n = one["flows"].as_array().expect("flows").len() as u64;
    assert_eq!(n, answered.get("backend-1").copied().unwrap_or(0), "{one}");
    let few = inspect_json(
        &env,
        &["flows", "--service", &format!("{VIP}:80"), "--limit", "7"],
    );
    assert_eq!(few["flows"].as_array().map(Vec::len), Some(7));
    assert_eq!(few["truncated"], true);
    // By Service name: the 100 connections to its port 80 (and nothing else
    // was sent to its other ports).
    let by_name = inspect_json(
        &env,
        &["flows", "--service", "default/web", "--limit", "5000"],
    );
    let named = by_name["flows"].as_array().expect("flows");
    assert_eq!(named.len(), 100, "{by_name}");
    assert!(
        named.iter().all(|f| f["frontend"] == format!("{VIP}:80")),
        "{by_name}"
    );
    let err = inspect_fails(&env, &["flows", "--service", "default/nope"]);
    assert!(
        err.contains("Service default/nope has no frontend"),
        "{err}"
    );
    let text = inspect(&env, &["flows", "--limit", "3"]);
    assert!(text.starts_with("SERVICE"), "{text}");
    assert!(text.contains("\ndefault/web "), "{text}");
    eprintln!("inspect flows --limit 3:\n{text}");

    // services: the counters grew by what was sent.
    let after = inspect_json(&env, &["services"]);
    let (b0, b1) = (web_backends(&before), web_backends(&after));
    let mut new_flows = 0;
    for (addr, &(nf, pk, by)) in &b1 {
        let (nf0, pk0, by0) = b0.get(addr).copied().unwrap_or_default();
        let name = format!(
            "backend-{}",
            addr.trim_start_matches("198.18.2.1")
                .trim_end_matches(":8080")
        );
        let want = answered.get(&name).copied().unwrap_or(0);
        assert_eq!(nf - nf0, want, "{addr}: new flows");
        // A connection sends at least SYN, the request, ACKs and FIN.
        assert!(pk - pk0 >= 4 * want, "{addr}: packets {pk0} -> {pk}");
        assert!(by > by0 || want == 0, "{addr}: bytes {by0} -> {by}");
        new_flows += nf - nf0;
    }
    assert_eq!(new_flows, 100);
    let text = inspect(&env, &["services"]);
    eprintln!("inspect services:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("default/web:http ") && l.contains(&format!("{VIP}:80/tcp"))),
        "{text}"
    );
    let text = inspect(&env, &["summary"]);
    eprintln!("inspect summary:\n{text}");
    assert!(text.starts_with("table generation "), "{text}");
    let summary = inspect_json(&env, &["summary"]);
    assert_eq!(summary["workers"].as_array().map(Vec::len), Some(1));
    assert!(summary["conntrack_entries"].as_u64().unwrap_or(0) >= 100);

    // The API answers bad requests plainly.
    let v = env.peer(
        "gw",
        &["get", "http://127.0.0.1:10257/api/v1/flows?limit=0"],
    );
    assert_eq!(v["status"], 400, "{v}");
    let v = env.peer("gw", &["get", "http://127.0.0.1:10257/api/v2/flows"]);
    assert_eq!(v["status"], 404, "{v}");

    // Metrics: the core's counters and the per-frontend ones grew.
    let m1 = env.metrics();
    let grew = |name: &str| env.metric(&m1, name) - env.metric(&m0, name);
    assert!(grew("clustergate_new_flows_total") >= 100.0, "{m1}");
    let label = format!("frontend=\"{VIP}:80\"");
    let fe = |m: &str, name: &str| env.metric_where(m, name, &label);
    assert!(
        fe(&m1, "clustergate_frontend_new_flows_total")
            - fe(&m0, "clustergate_frontend_new_flows_total")
            >= 100.0,
        "{m1}"
    );
    assert!(
        fe(&m1, "clustergate_frontend_packets_total")
            > fe(&m0, "clustergate_frontend_packets_total"),
        "{m1}"
    );
    for name in [
        "clustergate_flows_moved_total",
        "clustergate_affinity_hits_total",
        "clustergate_icmp_errors_translated_total",
        "clustergate_rejects_sent_total",
    ] {
        assert!(m1.contains(name), "{name} missing:\n{m1}");
    }
    // A SYN to the Service without endpoints is rejected, and counted.
    let v = env.peer("cli", &["probe", EMPTY_VIP, "80"]);
    eprintln!("probe of the empty service: {v}");
    let m2 = env.metrics();
    assert!(
        env.metric(&m2, "clustergate_rejects_sent_total")
            > env.metric(&m1, "clustergate_rejects_sent_total"),
        "{m2}"
    );

    // --log-format json: every line of the gateway's log is a JSON object.
    let log = env.log("gateway");
    assert!(log.lines().count() > 3, "{log}");
    for line in log.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}
