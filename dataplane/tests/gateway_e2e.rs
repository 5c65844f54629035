//! End to end: `clustergate run` between real clients and real servers.
//!
//! Each test builds its own namespaces (tests/e2e/topology.sh: a client, the
//! gateway, a bridged LAN and four backends, all in 198.18.0.0/15), starts
//! `clustergate-control` on a manifest and `clustergate run` in the gateway
//! namespace, and drives real sockets from tests/e2e/peer.py: HTTP and a
//! streaming echo over TCP, a UDP echo, raw ICMP, and an AF_PACKET capture in
//! every backend that checks every frame's checksums. Everything is bounded in
//! time and count, and the namespaces are deleted even when a test fails.
//!
//! Root only. CI runs as root, so there a missing root is a failure, not a skip.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::snapshot;
use serde_json::Value;
use support::root_or_skip;

mod support;

/// One gateway test at a time: they share the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const VIP: &str = "198.18.100.1";
const EMPTY_VIP: &str = "198.18.100.2";
const NEEDS: &str = "network namespaces, XDP, AF_XDP";

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

fn gateway_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clustergate"))
}

/// `clustergate-control`, built next to `clustergate` (the workspace's test
/// command builds it; a run of this package alone builds it here).
fn control_bin() -> PathBuf {
    let gw = gateway_bin();
    let dir = gw.parent().expect("binary directory");
    let bin = dir.join("clustergate-control");
    if !bin.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "-p",
            "clustergate-control",
            "--bin",
            "clustergate-control",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build");
        assert!(st.success(), "building clustergate-control failed");
    }
    bin
}

fn manifest(backends: &[u8]) -> String {
    let mut eps = String::new();
    for b in backends {
        eps.push_str(&format!(
            "- addresses: [198.18.2.1{b}]\n  conditions: {{ready: true}}\n"
        ));
    }
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
  - {{name: stream, port: 9000, protocol: TCP, targetPort: 9000}}
  - {{name: echo, port: 9001, protocol: UDP, targetPort: 9001}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: stream, port: 9000, protocol: TCP}}
- {{name: echo, port: 9001, protocol: UDP}}
endpoints:
{eps}---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: {EMPTY_VIP}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
  - {{name: echo, port: 9001, protocol: UDP, targetPort: 9001}}
"
    )
}

/// The namespaces, files and processes of one test; dropping it cleans up.
struct Env {
    prefix: String,
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Env {
    fn up(tag: &str, mode: &str, queues: u32) -> Self {
        let prefix = format!("cg{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("{prefix}-e2e"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shm")).expect("test directory");
        let env = Self {
            prefix,
            dir,
            children: Vec::new(),
        };
        let st = Command::new("bash")
            .arg(e2e_dir().join("topology.sh"))
            .args(["up", &env.prefix, mode])
            .env("QUEUES", queues.to_string())
            .status()
            .expect("running topology.sh");
        assert!(st.success(), "topology.sh up failed");
        env
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn in_ns(&self, n: &str, prog: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(n)]).arg(prog).args(args);
        c
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, log: bool) -> u32 {
        if log {
            let f = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log");
            cmd.stderr(f);
        }
        let child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
        let pid = child.id();
        self.children.push((name.into(), child));
        pid
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("child")
            .1
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Runs peer.py in a namespace and parses its last JSON line.
    fn peer(&self, n: &str, args: &[&str]) -> Value {
        let out = self
            .in_ns(n, Path::new("python3"), &[])
            .arg(e2e_dir().join("peer.py"))
            .args(args)
            .output()
            .expect("peer.py");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "peer.py {args:?} in {n}: {e}; stdout {text:?}; stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn write_manifest(&self, backends: &[u8]) {
        let tmp = self.dir.join("manifest.yaml.tmp");
        std::fs::write(&tmp, manifest(backends)).expect("manifest");
        std::fs::rename(&tmp, self.dir.join("manifest.yaml")).expect("manifest rename");
    }

    fn start_backends(&mut self) {
        for b in 1..=4u8 {
            let ns = format!("b{b}");
            let mut cmd = self.in_ns(&ns, Path::new("python3"), &[]);
            cmd.arg(e2e_dir().join("peer.py")).args([
                "serve",
                &format!("backend-{b}"),
                &format!("198.18.2.1{b}"),
                "170",
            ]);
            self.spawn(&format!("backend-{b}"), cmd, true);
        }
        for b in 1..=4u8 {
            let mut line = String::new();
            let out = self
                .child(&format!("backend-{b}"))
                .stdout
                .take()
                .expect("stdout");
            BufReader::new(out).read_line(&mut line).expect("backend");
            assert!(
                line.contains("serving"),
                "backend {b} did not start: {line}"
            );
        }
    }

    fn start_control(&mut self) {
        let cmd = self.in_ns(
            "gw",
            &control_bin(),
            &[
                "run",
                "--manifest",
                self.dir.join("manifest.yaml").to_str().expect("utf-8"),
                "--shm-dir",
                self.dir.join("shm").to_str().expect("utf-8"),
                "--poll-ms",
                "20",
                "--metrics",
                "127.0.0.1:10249",
                "--health",
                "127.0.0.1:10256",
            ],
        );
        self.spawn("control", cmd, true);
    }

    fn kill(&mut self, name: &str) {
        if let Some(pos) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(pos);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_gateway(
        &mut self,
        interfaces: &[&str],
        cores: &str,
        queues: u32,
        extra: &[&str],
    ) -> u32 {
        let mut args = vec!["run".to_string()];
        for i in interfaces {
            args.push("--interface".into());
            args.push((*i).into());
        }
        let shm = self.dir.join("shm");
        args.extend([
            "--shm-dir".into(),
            shm.to_str().expect("utf-8").into(),
            "--cores".into(),
            cores.into(),
            "--queues".into(),
            queues.to_string(),
            "--metrics".into(),
            "127.0.0.1:10257".into(),
            "--flows".into(),
            "65536".into(),
            "--exit-after-s".into(),
            "170".into(),
        ]);
        args.extend(extra.iter().map(|s| (*s).to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = self.in_ns("gw", &gateway_bin(), &argv);
        self.spawn("gateway", cmd, true)
    }

    fn metrics(&self) -> String {
        let v = self.peer("gw", &["get", "http://127.0.0.1:10257/metrics"]);
        v["body"].as_str().unwrap_or("").to_string()
    }

    fn metric(&self, text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.peer("gw", &["get", "http://127.0.0.1:10257/healthz"]);
            if v["status"] == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not healthy within 20 s: {v}\ngateway log:\n{}\ncontrol log:\n{}",
                self.log("gateway"),
                self.log("control")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn generation(&self) -> f64 {
        self.metric(&self.metrics(), "clustergate_snapshot_generation")
    }

    fn wait_generation_above(&self, g: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.generation();
            if now > g {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "no new generation after {g} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn xdp_attached(&self, ns: &str, ifname: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns(ns), "-j", "-d", "link", "show", ifname])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout).contains("\"xdp\"")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("bash")
            .arg(e2e_dir().join("topology.sh"))
            .args(["down", &self.prefix])
            .status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("logs kept in {}", self.dir.display());
        }
    }
}

/// Each backend's share of the web:80 Maglev ring in the published snapshot.
fn ring_shares(shm: &Path) -> BTreeMap<String, f64> {
    let table = snapshot::load_current(shm)
        .expect("snapshot")
        .expect("a published snapshot");
    let vip = addr16(VIP.parse().expect("vip"));
    let fi = table
        .frontend(&vip, 80, Proto::Tcp)
        .expect("web:80 frontend");
    let fe = table.frontend_record(fi).expect("record");
    let backends = table.backends_of(fe);
    let ring = &table.ring_slots()[fe.ring_start as usize..(fe.ring_start + fe.ring_len) as usize];
    let mut counts = BTreeMap::new();
    for &slot in ring {
        let b = backends[slot as usize];
        let name = format!("backend-{}", b.addr[15] - 10);
        *counts.entry(name).or_insert(0usize) += 1;
    }
    counts
        .into_iter()
        .map(|(k, v)| (k, v as f64 / ring.len() as f64))
        .collect()
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

/// CapEff of a task, from /proc.
fn cap_eff(status_path: &Path) -> u64 {
    let s = std::fs::read_to_string(status_path).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn two_armed_gateway_end_to_end() {
    if !root_or_skip("two_armed_gateway_end_to_end", NEEDS) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut env = Env::up("a", "two-armed", 2);
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

    // 3. UDP request/response through the VIP.
    let v = env.peer("cli", &["udp", VIP, "9001", "200"]);
    assert_eq!(v["answered"], 200, "UDP echo: {v}");

    // 4. No endpoints: RST for TCP, ICMP port unreachable for UDP.
    let v = env.peer("cli", &["reject", EMPTY_VIP, "80", "9001"]);
    assert_eq!(v["tcp"], "refused", "{v}");
    assert_eq!(v["udp"], "unreachable", "{v}");

    // 2 and 6. A long-lived stream survives a backend added, another removed,
    // and control killed and restarted.
    let mut stream = env.in_ns("cli", Path::new("python3"), &[]);
    stream
        .arg(e2e_dir().join("peer.py"))
        .args(["stream", VIP, "9000", "8", "1024"]);
    env.spawn("stream", stream, true);
    let out = env.child("stream").stdout.take().expect("stdout");
    let mut reader = BufReader::new(out);
    let mut first = String::new();
    reader.read_line(&mut first).expect("stream greeting");
    let first: Value = serde_json::from_str(&first).expect("stream greeting json");
    let own: u8 = first["backend"]
        .as_str()
        .and_then(|s| s.strip_prefix("backend-"))
        .and_then(|s| s.parse().ok())
        .expect("stream backend");
    let removed = [1u8, 2, 3]
        .into_iter()
        .find(|b| *b != own)
        .expect("another backend");
    let mut keep: Vec<u8> = [1u8, 2, 3, 4]
        .into_iter()
        .filter(|b| *b != removed)
        .collect();
    keep.sort_unstable();
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
    let mut last = String::new();
    reader.read_line(&mut last).expect("stream result");
    let r: Value = serde_json::from_str(&last).expect("stream result json");
    assert_eq!(r["error"], Value::Null, "stream: {r}");
    assert_eq!(
        r["mismatch"],
        Value::Null,
        "stream bytes out of order or lost: {r}"
    );
    assert_eq!(r["sent"], r["received"], "every byte echoed: {r}");
    assert!(
        r["sent"].as_u64().unwrap_or(0) > 100_000,
        "the stream moved data: {r}"
    );

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
    let _ = env.peer("cli", &["http", VIP, "80", "600"]);
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
