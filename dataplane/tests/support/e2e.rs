//! The end-to-end tests' harness, shared by gateway_e2e.rs and ipv6_e2e.rs
//! (each declares it with `#[path = "support/e2e.rs"] mod e2e;`): the
//! namespaces of tests/e2e/topology.sh, peer.py's clients and servers,
//! `clustergate-control` and `clustergate run`, and cleaning all of it up.
//!
//! One gateway test at a time, across test binaries too (cargo runs them in
//! parallel, and they share the machine's cores): [`Env::up`] takes an
//! exclusive `flock` on [`LOCK_FILE`] and the `Env` holds it until it has
//! torn everything down.

// reason: each test file uses its own part of the harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::snapshot;
use serde_json::Value;

/// The lock every end-to-end test holds while its namespaces exist.
pub const LOCK_FILE: &str = "/tmp/clustergate-e2e.lock";
pub const VIP: &str = "198.18.100.1";
pub const EMPTY_VIP: &str = "198.18.100.2";
/// Ports of `web` where no backend listens: the backends answer with ICMP
/// port unreachable (UDP) and a reset (TCP).
pub const CLOSED_UDP: u16 = 9002;
pub const CLOSED_TCP: u16 = 9003;
/// The IPv6 VIP the DSR backends hold on lo (topology.sh's `DSR_VIPS6`).
pub const DSR_VIP6: &str = "2001:2:100::1";
pub const NEEDS: &str = "network namespaces, XDP, AF_XDP";

pub fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

pub fn gateway_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clustergate"))
}

/// `clustergate-control`, built next to `clustergate` (the workspace's test
/// command builds it; a run of this package alone builds it here).
pub fn control_bin() -> PathBuf {
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

/// The Service `web` (HTTP, a streaming echo, a UDP echo) on `backends`
/// (backend-N is 198.18.2.1N), with its `clustergate.io/return-path`
/// annotation when `return_path` is given; HTTP is served on port
/// `http_port` (8080 for DSR, whose backends must accept the frontend's
/// port) and the Service `empty` without endpoints.
pub fn manifest(backends: &[u8], return_path: Option<&str>, http_port: u16) -> String {
    let mut eps = String::new();
    for b in backends {
        eps.push_str(&format!(
            "- addresses: [198.18.2.1{b}]\n  conditions: {{ready: true}}\n"
        ));
    }
    let annotations = return_path.map_or(String::new(), |p| {
        format!(", annotations: {{clustergate.io/return-path: {p}}}")
    });
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default{annotations}}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: http, port: {http_port}, protocol: TCP, targetPort: 8080}}
  - {{name: stream, port: 9000, protocol: TCP, targetPort: 9000}}
  - {{name: echo, port: 9001, protocol: UDP, targetPort: 9001}}
  - {{name: closed-udp, port: {CLOSED_UDP}, protocol: UDP, targetPort: {CLOSED_UDP}}}
  - {{name: closed-tcp, port: {CLOSED_TCP}, protocol: TCP, targetPort: {CLOSED_TCP}}}
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
- {{name: closed-udp, port: {CLOSED_UDP}, protocol: UDP}}
- {{name: closed-tcp, port: {CLOSED_TCP}, protocol: TCP}}
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
pub struct Env {
    pub prefix: String,
    pub dir: PathBuf,
    pub children: Vec<(String, Child)>,
    /// The topology has the backends' side of DSR (the VIP on lo, a tunnel).
    pub dsr: bool,
    /// The `web` Service's return-path annotation (none: control's default).
    pub return_path: Option<&'static str>,
    /// The `web` Service's HTTP port (80; 8080 for DSR).
    pub http_port: u16,
    /// Extra flags of every `clustergate-control run` of this test.
    pub control_args: Vec<&'static str>,
    /// The backends' numbers: 1..=4, and 5 (behind the router) with
    /// `mtu-router`.
    pub backend_ids: Vec<u8>,
    /// The exclusive lock on [`LOCK_FILE`], released when the `Env` is gone.
    _lock: std::fs::File,
}

/// The address backend-`b` serves on in `family` (4 or 6): 198.18.2.1N and
/// 2001:2:2::1N on the LAN, 198.18.5.15 and 2001:2:5::15 for backend-5
/// behind the router.
pub fn backend_addr(b: u8, family: u8) -> String {
    match (b, family) {
        (5, 4) => "198.18.5.15".into(),
        (5, _) => "2001:2:5::15".into(),
        (_, 4) => format!("198.18.2.1{b}"),
        _ => format!("2001:2:2::1{b}"),
    }
}

/// Takes the lock of every end-to-end test (waiting for the test that
/// holds it, in this process or another).
fn e2e_lock() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .unwrap_or_else(|e| panic!("{LOCK_FILE}: {e}"));
    f.lock()
        .unwrap_or_else(|e| panic!("flock {LOCK_FILE}: {e}"));
    f
}

impl Env {
    /// The namespaces of `topology.sh up PREFIX MODE…`: `mode` is its words,
    /// e.g. `two-armed`, `two-armed pod-network`, `one-armed pod-network dsr`.
    pub fn up(tag: &str, mode: &str, queues: u32) -> Self {
        let lock = e2e_lock();
        let prefix = format!("cg{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("{prefix}-e2e"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shm")).expect("test directory");
        let env = Self {
            prefix,
            dir,
            children: Vec::new(),
            dsr: mode.split_whitespace().any(|w| w == "dsr"),
            return_path: None,
            http_port: 80,
            control_args: Vec::new(),
            backend_ids: if mode.split_whitespace().any(|w| w == "mtu-router") {
                vec![1, 2, 3, 4, 5]
            } else {
                vec![1, 2, 3, 4]
            },
            _lock: lock,
        };
        let st = Command::new("bash")
            .arg(e2e_dir().join("topology.sh"))
            .args(["up", &env.prefix])
            .args(mode.split_whitespace())
            .env("QUEUES", queues.to_string())
            .status()
            .expect("running topology.sh");
        assert!(st.success(), "topology.sh up failed");
        env
    }

    pub fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    pub fn in_ns(&self, n: &str, prog: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(n)]).arg(prog).args(args);
        c
    }

    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: bool) -> u32 {
        if log {
            let f = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log");
            cmd.stderr(f);
        }
        let child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
        let pid = child.id();
        self.children.push((name.into(), child));
        pid
    }

    pub fn child(&mut self, name: &str) -> &mut Child {
        &mut self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("child")
            .1
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Runs peer.py in a namespace and parses its last JSON line.
    pub fn peer(&self, n: &str, args: &[&str]) -> Value {
        self.peer_env(n, args, &[])
    }

    /// [`Env::peer`] with environment variables (`BIND`, `DSTOPTS`).
    pub fn peer_env(&self, n: &str, args: &[&str], vars: &[(&str, &str)]) -> Value {
        let out = self
            .in_ns(n, Path::new("python3"), &[])
            .envs(vars.iter().copied())
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

    /// `ip -n PREFIX-n ARGS…`, which must succeed; returns its output.
    pub fn ip(&self, n: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns(n)])
            .args(args)
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.ns(n),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// peer.py capture on e0 of each of `backends` (every frame's checksums
    /// checked) until [`Env::finish_captures`].
    pub fn start_captures(&mut self, backends: &[u8]) {
        let stop = self.dir.join("stop-capture");
        for &b in backends {
            let mut cmd = self.in_ns(&format!("b{b}"), Path::new("python3"), &[]);
            cmd.arg(e2e_dir().join("peer.py")).args([
                "capture",
                "e0",
                "150",
                stop.to_str().expect("utf-8"),
            ]);
            self.spawn(&format!("capture-{b}"), cmd, true);
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Stops the captures and returns each backend's report (`seen`,
    /// `seen4`, `seen6`, `bad`, `bad_examples`).
    pub fn finish_captures(&mut self, backends: &[u8]) -> BTreeMap<u8, Value> {
        std::fs::write(self.dir.join("stop-capture"), b"").expect("stop file");
        let mut out = BTreeMap::new();
        for &b in backends {
            let name = format!("capture-{b}");
            let stdout = self.child(&name).stdout.take().expect("stdout");
            let mut l = String::new();
            BufReader::new(stdout)
                .read_line(&mut l)
                .expect("capture result");
            let v: Value = serde_json::from_str(&l)
                .unwrap_or_else(|e| panic!("{name}: {l:?}: {e}\n{}", self.log(&name)));
            out.insert(b, v);
        }
        out
    }

    /// Writes `text` as the manifest control follows.
    pub fn write_manifest_text(&self, text: &str) {
        let tmp = self.dir.join("manifest.yaml.tmp");
        std::fs::write(&tmp, text).expect("manifest");
        std::fs::rename(&tmp, self.dir.join("manifest.yaml")).expect("manifest rename");
    }

    pub fn write_manifest(&self, backends: &[u8]) {
        let tmp = self.dir.join("manifest.yaml.tmp");
        std::fs::write(&tmp, manifest(backends, self.return_path, self.http_port))
            .expect("manifest");
        std::fs::rename(&tmp, self.dir.join("manifest.yaml")).expect("manifest rename");
    }

    /// True when namespace `n` has the interface `ifname`.
    pub fn has_link(&self, n: &str, ifname: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.ns(n), "link", "show", ifname])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The servers of peer.py in every backend, on the backend's addresses
    /// of both families (and on the VIPs too where the backends take DSR:
    /// [`VIP`] and [`DSR_VIP6`]); with DSR, the userspace decapsulation of
    /// each family the kernel has no tunnel device for (topology.sh made a
    /// tun0 then).
    pub fn start_backends(&mut self) {
        let decap = self.dsr && self.has_link("b1", "tun0");
        let mut families = Vec::new();
        if decap && !self.has_link("b1", "ipip0") {
            families.push("4");
        }
        if decap && !self.has_link("b1", "ip6tnl6") {
            families.push("6");
        }
        let families = families.join(",");
        let ids = self.backend_ids.clone();
        for &b in &ids {
            let ns = format!("b{b}");
            let mut addrs = format!("{},{}", backend_addr(b, 4), backend_addr(b, 6));
            if self.dsr && b != 5 {
                addrs.push_str(&format!(",{VIP},{DSR_VIP6}"));
            }
            let mut cmd = self.in_ns(&ns, Path::new("python3"), &[]);
            cmd.arg(e2e_dir().join("peer.py")).args([
                "serve",
                &format!("backend-{b}"),
                &addrs,
                "170",
            ]);
            self.spawn(&format!("backend-{b}"), cmd, true);
            if decap && b != 5 {
                let mut cmd = self.in_ns(&ns, Path::new("python3"), &[]);
                cmd.arg(e2e_dir().join("peer.py"))
                    .args(["decap", "tun0", "170", &families]);
                self.spawn(&format!("decap-{b}"), cmd, true);
            }
        }
        if self.dsr {
            let kernel4 = self.has_link("b1", "ipip0");
            let kernel6 = self.has_link("b1", "ip6tnl6");
            eprintln!(
                "DSR decapsulation on the backends: IPv4 by {}, IPv6 by {}",
                if kernel4 {
                    "the kernel's ipip0"
                } else {
                    "userspace (peer.py decap into tun0)"
                },
                if kernel6 {
                    "the kernel's ip6tnl6"
                } else {
                    "userspace (peer.py decap into tun0)"
                }
            );
        }
        let mut names: Vec<String> = ids.iter().map(|b| format!("backend-{b}")).collect();
        if decap {
            names.extend(
                ids.iter()
                    .filter(|&&b| b != 5)
                    .map(|b| format!("decap-{b}")),
            );
        }
        for name in names {
            let mut line = String::new();
            let out = self.child(&name).stdout.take().expect("stdout");
            BufReader::new(out).read_line(&mut line).expect("backend");
            assert!(
                line.contains("serving") || line.contains("decap"),
                "{name} did not start: {line}\n{}",
                self.log(&name)
            );
        }
    }

    pub fn start_control(&mut self) {
        let mut cmd = self.in_ns(
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
        cmd.args(&self.control_args);
        self.spawn("control", cmd, true);
    }

    pub fn kill(&mut self, name: &str) {
        if let Some(pos) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(pos);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_gateway(
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

    pub fn metrics(&self) -> String {
        let v = self.peer("gw", &["get", "http://127.0.0.1:10257/metrics"]);
        v["body"].as_str().unwrap_or("").to_string()
    }

    pub fn metric(&self, text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The sum of the samples of `name` whose labels contain `label`.
    pub fn metric_where(&self, text: &str, name: &str, label: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Polls the connection table until it is empty (every flow expired),
    /// for at most `secs`; returns how long that took.
    pub fn wait_conntrack_empty(&self, secs: u64) -> Duration {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            let n = self.metric(&m, "clustergate_conntrack_entries");
            if n == 0.0 && m.contains("clustergate_conntrack_entries") {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{n} flows still in the connection table after {secs} s:\n{m}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_healthy(&self) {
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

    pub fn generation(&self) -> f64 {
        self.metric(&self.metrics(), "clustergate_snapshot_generation")
    }

    pub fn wait_generation_above(&self, g: f64) -> f64 {
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

    pub fn xdp_attached(&self, ns: &str, ifname: &str) -> bool {
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
pub fn ring_shares(shm: &Path) -> BTreeMap<String, f64> {
    let table = snapshot::load_current(shm)
        .expect("snapshot")
        .expect("a published snapshot");
    let vip = addr16(VIP.parse().expect("vip"));
    let fi = table
        .frontend(&vip, 80, Proto::Tcp)
        .expect("web:80 frontend");
    let fe = table.frontend_record(fi).expect("record");
    let backends = table.backends_of(fe);
    let ring = &fe.ring()[fe.ring_start as usize..(fe.ring_start + fe.ring_len) as usize];
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

/// A long TCP stream through the VIP (peer.py stream: a counter pattern
/// echoed back, every byte checked), started in the client's namespace.
pub struct Stream {
    pub reader: BufReader<ChildStdout>,
    /// The backend it landed on (N of backend-N).
    pub backend: u8,
    /// The peer address and port that backend saw.
    pub peer: String,
}

impl Stream {
    pub fn start(env: &mut Env, port: &str, secs: u32, chunk: u32) -> Self {
        Self::start_to(env, VIP, port, secs, chunk)
    }

    /// [`Stream::start`] to another address than [`VIP`].
    pub fn start_to(env: &mut Env, vip: &str, port: &str, secs: u32, chunk: u32) -> Self {
        env.kill("stream");
        let mut cmd = env.in_ns("cli", Path::new("python3"), &[]);
        cmd.arg(e2e_dir().join("peer.py")).args([
            "stream",
            vip,
            port,
            &secs.to_string(),
            &chunk.to_string(),
        ]);
        env.spawn("stream", cmd, true);
        let out = env.child("stream").stdout.take().expect("stdout");
        let mut reader = BufReader::new(out);
        let mut first = String::new();
        reader.read_line(&mut first).expect("stream greeting");
        let first: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("stream greeting {first:?}: {e}\n{}", env.log("stream")));
        let backend: u8 = first["backend"]
            .as_str()
            .and_then(|s| s.strip_prefix("backend-"))
            .and_then(|s| s.parse().ok())
            .expect("stream backend");
        let peer = first["peer"].as_str().unwrap_or("").to_string();
        Self {
            reader,
            backend,
            peer,
        }
    }

    /// A table change that leaves this stream's backend alone: one of
    /// `serving` other than the stream's removed, backend-4 added. Returns
    /// the removed backend and the new list.
    pub fn table_change(&self, serving: &[u8]) -> (u8, Vec<u8>) {
        let removed = serving
            .iter()
            .copied()
            .find(|b| *b != self.backend)
            .expect("another backend");
        let mut keep: Vec<u8> = serving
            .iter()
            .copied()
            .chain([4])
            .filter(|b| *b != removed)
            .collect();
        keep.sort_unstable();
        keep.dedup();
        (removed, keep)
    }

    /// Waits for the stream's end and asserts that every byte came back,
    /// in order, and that more than `min_bytes` moved.
    pub fn finish(mut self, min_bytes: u64) -> Value {
        let mut last = String::new();
        self.reader.read_line(&mut last).expect("stream result");
        let r: Value = serde_json::from_str(&last).expect("stream result json");
        assert_eq!(r["error"], Value::Null, "stream: {r}");
        assert_eq!(
            r["mismatch"],
            Value::Null,
            "stream bytes out of order or lost: {r}"
        );
        assert_eq!(r["sent"], r["received"], "every byte echoed: {r}");
        assert!(
            r["sent"].as_u64().unwrap_or(0) > min_bytes,
            "the stream moved data: {r}"
        );
        r
    }
}

pub fn counts(v: &Value) -> BTreeMap<String, u64> {
    v["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Per backend, the peer addresses it reported and, per address, the ports.
pub fn peers(v: &Value) -> BTreeMap<String, BTreeMap<String, Vec<u64>>> {
    let mut out = BTreeMap::new();
    for (name, addrs) in v["peers"].as_object().into_iter().flatten() {
        let mut per = BTreeMap::new();
        for (addr, ports) in addrs.as_object().into_iter().flatten() {
            let ports: Vec<u64> = ports
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect();
            per.insert(addr.clone(), ports);
        }
        out.insert(name.clone(), per);
    }
    out
}

/// `ADDR:PORT` split.
pub fn addr_port(s: &str) -> (String, u16) {
    let (a, p) = s
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{s:?} is not ADDR:PORT"));
    (
        a.to_string(),
        p.parse().unwrap_or_else(|_| panic!("{s:?}: bad port")),
    )
}

/// CapEff of a task, from /proc.
pub fn cap_eff(status_path: &Path) -> u64 {
    let s = std::fs::read_to_string(status_path).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX)
}
