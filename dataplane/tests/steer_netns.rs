//! The XDP steering program and its loader ([`clustergate_dataplane::io::steer`]),
//! for real, as root.
//!
//! - `steer_classifies_frames`: the program, loaded but attached nowhere, run
//!   with `BPF_PROG_TEST_RUN` on fixture frames: frontends, backend replies,
//!   VLAN tags, IPv4 options, IPv6 extension headers, fragments, ICMP and
//!   ICMPv6 errors, ARP, other ports and malformed frames.
//! - `steer_snat_replies_only_on_snat_ports`: the same, with the gateway's
//!   SNAT addresses and range set ([`Steering::set_snat`]): a backend's
//!   packet to a SNAT address is steered only on a SNAT port (a reply), and
//!   reaches the kernel on any other (the pod's own connection to the node);
//!   a backend's reply to a client is steered as before.
//! - `steer_node_ports`: node ports, kept in the table on `0.0.0.0` / `::`,
//!   are steered on the node's addresses ([`Steering::set_node_addrs`]) that
//!   the table's node-port addresses select, and nowhere else: not on
//!   another address, not on another port or protocol, never on the
//!   unspecified address; ICMP errors quoting a node-port flow are steered;
//!   the keys follow the node's addresses and the table; node addresses
//!   never become VIPs (their non-first fragments reach the kernel).
//! - `steer_netns`: two namespaces of our own joined by a veth pair
//!   (198.18.210.1/24 and .2, from the benchmarking range 198.18.0.0/15). The
//!   test re-runs itself inside namespace A (`ip netns exec A <this binary>
//!   --exact steer_netns`, told its part by `CGT_STEER_ROLE`) and shows that
//!   (1) with the program attached the node stays reachable (ARP, TCP, ping
//!   where `ping` exists), (2) `sync` puts exactly the table's keys in the
//!   maps and a changed table removes the stale ones, (3) UDP to a frontend is
//!   steered (passed back while no socket is registered, redirected into an
//!   AF_XDP socket once one is) while UDP to another port reaches the kernel,
//!   (4) after `detach`, after drop, and after SIGKILL of the process holding
//!   it, the interface has no XDP program.
//!
//! Not root: skipped with a message, except under CI (CI runs as root, so a
//! skip there is a defect). The namespaces are deleted by a guard, even when
//! the test fails; every wait is bounded; traffic stays between the two
//! namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clustergate_builder::table::{BackendSpec, ServiceSpec, TableSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::flow::{addr16, Addr16, Proto};
use clustergate_dataplane::io::steer::{AttachMode, Classified, SnatSync, SteerKey, Steering};
use clustergate_dataplane::io::xsk::{Iface, Ports, XskOptions, ZeroCopy};
use clustergate_dataplane::snat::PortRange;
use clustergate_dataplane::table::{FrontendKind, Table};
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use support::root_or_skip;

mod support;

const NEEDS: &str = "XDP programs, network namespaces";

/// Which half of `steer_netns` this process is (unset: the parent).
const ROLE: &str = "CGT_STEER_ROLE";
/// For the client role: what to do, `;`-separated (`tcp:IP:PORT`, `udp:IP:PORT:N`).
const OPS: &str = "CGT_STEER_OPS";
const NS_B: &str = "CGT_STEER_NS_B";

const IF_A: &str = "cgst0";
const IF_B: &str = "cgst1";
/// A bridge in A: no native XDP, so generic mode.
const IF_BRIDGE: &str = "cgst2";
const ADDR_A: &str = "198.18.210.1";
const ADDR_B: &str = "198.18.210.2";
/// A VIP routed from B through A.
const VIP: &str = "198.18.211.10";
const VIP_NET: &str = "198.18.211.0/24";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn a16(s: &str) -> Addr16 {
    addr16(ip(s))
}

/// Runs a command to completion within `limit`; panics on failure or timeout.
fn run(cmd: &mut Command, limit: Duration) -> String {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let status = wait_bounded(&mut child, limit, &what);
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{what}: {status}\n{out}{err}");
    out
}

fn ip_cmd(args: &[&str]) -> String {
    run(Command::new("ip").args(args), Duration::from_secs(10))
}

fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}; killed");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it holds or `limit` passes.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `ip -j link show dev IF` (in namespace `ns` when given) mentions an XDP program.
fn has_xdp(ns: Option<&str>, ifname: &str) -> bool {
    let mut args = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-j", "link", "show", "dev", ifname]);
    ip_cmd(&args).contains("\"xdp")
}

/// This test binary, re-run with `--exact test` inside namespace `ns`.
fn self_in_ns(ns: &str, test: &str, role: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    c
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct Netns {
    a: String,
    b: String,
}

impl Netns {
    fn new() -> Self {
        let pid = std::process::id();
        let this = Self {
            a: format!("cgt-st-{pid}-a"),
            b: format!("cgt-st-{pid}-b"),
        };
        // Leftovers of an earlier run with the same pid.
        this.delete();
        let (a, b) = (this.a.as_str(), this.b.as_str());
        ip_cmd(&["netns", "add", a]);
        ip_cmd(&["netns", "add", b]);
        // Created inside A, so the names never meet the root namespace's.
        ip_cmd(&[
            "-n", a, "link", "add", IF_A, "type", "veth", "peer", "name", IF_B, "netns", b,
        ]);
        ip_cmd(&["-n", a, "addr", "add", &format!("{ADDR_A}/24"), "dev", IF_A]);
        ip_cmd(&["-n", b, "addr", "add", &format!("{ADDR_B}/24"), "dev", IF_B]);
        for (ns, dev) in [(a, IF_A), (b, IF_B)] {
            ip_cmd(&["-n", ns, "link", "set", "lo", "up"]);
            ip_cmd(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip_cmd(&["-n", b, "route", "add", VIP_NET, "via", ADDR_A]);
        ip_cmd(&["-n", a, "link", "add", IF_BRIDGE, "type", "bridge"]);
        ip_cmd(&["-n", a, "link", "set", IF_BRIDGE, "up"]);
        this
    }

    fn delete(&self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

// ---------------------------------------------------------------------------
// The parent.

#[test]
fn steer_netns() {
    match std::env::var(ROLE).as_deref() {
        Ok("gateway") => return gateway_half(),
        Ok("client") => return client_half(),
        Ok("hold") => return hold_half(),
        _ => {}
    }
    if !root_or_skip("steer_netns", NEEDS) {
        return;
    }
    let net = Netns::new();

    // (1)–(4) inside A.
    let mut gw = self_in_ns(&net.a, "steer_netns", "gateway");
    gw.env(NS_B, &net.b);
    let mut child = gw.spawn().expect("spawn the in-namespace half");
    let status = wait_bounded(&mut child, Duration::from_secs(120), "gateway half");
    assert!(status.success(), "the in-namespace half failed: {status}");
    assert!(!has_xdp(Some(&net.a), IF_A), "XDP left on {IF_A}");

    // Death by SIGKILL: the bpf_link goes with the process.
    let mut hold = self_in_ns(&net.a, "steer_netns", "hold");
    hold.stdout(Stdio::piped());
    let mut child = hold.spawn().expect("spawn the holding half");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attached = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("CGT-STEER-ATTACHED") => {
                attached = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if !attached {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the holding half did not attach within 60 s");
    }
    assert!(
        has_xdp(Some(&net.a), IF_A),
        "holding half attached, but ip shows no XDP program"
    );
    child.kill().unwrap(); // SIGKILL: no destructor runs
    let status = wait_bounded(&mut child, Duration::from_secs(10), "killed holding half");
    assert!(!status.success());
    assert!(
        eventually(Duration::from_secs(5), || !has_xdp(Some(&net.a), IF_A)),
        "XDP program still on {IF_A} after its process was killed"
    );
    eprintln!("steer_netns: SIGKILL of the holder removed the XDP program");
}

// ---------------------------------------------------------------------------
// Halves run inside a namespace.

fn ifindex(ifname: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Runs the client half inside namespace B with these operations.
fn client(ns_b: &str, ops: &str) {
    let mut c = self_in_ns(ns_b, "steer_netns", "client");
    c.env(OPS, ops);
    run(&mut c, Duration::from_secs(30));
}

/// In B: performs `CGT_STEER_OPS`.
fn client_half() {
    let ops = std::env::var(OPS).unwrap();
    for op in ops.split(';').filter(|o| !o.is_empty()) {
        let f: Vec<&str> = op.split(':').collect();
        match f.as_slice() {
            ["tcp", addr, port] => {
                let to = SocketAddr::new(ip(addr), port.parse().unwrap());
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("TCP connect to {to}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"ping").unwrap();
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf)
                    .unwrap_or_else(|e| panic!("TCP echo from {to}: {e}"));
                assert_eq!(&buf, b"ping");
            }
            ["udp", addr, port, n] => {
                let to = SocketAddr::new(ip(addr), port.parse().unwrap());
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                for i in 0..n.parse::<u32>().unwrap() {
                    s.send_to(&i.to_be_bytes(), to).unwrap();
                    thread::sleep(Duration::from_millis(2));
                }
            }
            _ => panic!("unknown op {op:?}"),
        }
    }
}

/// In A: loads, keeps the program attached, says so, and waits to be killed.
fn hold_half() {
    let s = Steering::load(&[(IF_A.to_owned(), ifindex(IF_A))]).expect("load");
    assert!(s.detaches_on_exit(), "attached without a bpf_link");
    println!("CGT-STEER-ATTACHED");
    std::io::stdout().flush().unwrap();
    thread::sleep(Duration::from_secs(60));
    panic!("not killed within 60 s");
}

/// Counts datagrams arriving on a UDP socket, in a thread.
struct UdpCounter {
    rx: mpsc::Receiver<()>,
    seen: usize,
}

impl UdpCounter {
    fn bind(addr: &str, port: u16) -> Self {
        let sock = UdpSocket::bind((ip(addr), port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match sock.recv_from(&mut buf) {
                    Ok(_) => {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        });
        Self { rx, seen: 0 }
    }

    /// Datagrams seen so far, after waiting until `want` arrived or `limit` passed.
    fn count(&mut self, want: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        while self.seen < want {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if self.rx.recv_timeout(left).is_ok() {
                self.seen += 1;
            }
        }
        while self.rx.try_recv().is_ok() {
            self.seen += 1;
        }
        self.seen
    }
}

fn table(generation: u64, services: &[ServiceSpec]) -> Table {
    Table::build(generation, 1, services).unwrap()
}

fn key(addr: &str, port: u16, proto: Proto) -> SteerKey {
    SteerKey {
        addr: a16(addr),
        port,
        proto: proto as u8,
    }
}

/// In A: (1)–(4).
fn gateway_half() {
    let ns_b = std::env::var(NS_B).unwrap();
    let ifx = ifindex(IF_A);
    assert!(!has_xdp(None, IF_A), "{IF_A} already has an XDP program");

    // (1) Load and attach; the node stays reachable.
    let mut steer = Steering::load(&[(IF_A.to_owned(), ifx)]).expect("load");
    let modes = steer.attach_modes().to_vec();
    eprintln!(
        "steer_netns: attach mode on veth: {modes:?}; bpf_link: {}",
        steer.detaches_on_exit()
    );
    assert_eq!(modes.len(), 1);
    assert!(matches!(modes[0], AttachMode::Driver | AttachMode::Generic));
    assert!(steer.detaches_on_exit());
    assert!(has_xdp(None, IF_A));

    let listener = TcpListener::bind((ip(ADDR_A), 7001)).unwrap();
    thread::spawn(move || {
        while let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        }
    });
    ip_cmd(&["-n", &ns_b, "neigh", "flush", "dev", IF_B]);
    client(&ns_b, &format!("tcp:{ADDR_A}:7001"));
    let neigh = ip_cmd(&["-n", &ns_b, "neigh", "show", ADDR_A, "dev", IF_B]);
    assert!(
        neigh.contains("lladdr"),
        "ARP for {ADDR_A} not resolved in B: {neigh:?}"
    );
    if Command::new("ping").arg("-V").output().is_ok() {
        run(
            Command::new("ip").args(["netns", "exec", &ns_b, "ping", "-c", "2", "-W", "2", ADDR_A]),
            Duration::from_secs(10),
        );
        eprintln!("steer_netns: ping {ADDR_A} from B answered");
    } else {
        eprintln!("steer_netns: no `ping` here; reachability shown with ARP and TCP");
    }
    let s0 = steer.stats().unwrap();
    assert!(
        s0.passed > 0,
        "ARP and TCP went through the program: {s0:?}"
    );
    assert_eq!(s0.redirected + s0.no_socket, 0, "{s0:?}");

    // (2) sync: exactly the table's keys; a second sync is a no-op; a
    // changed table removes the stale ones.
    let t1 = table(
        1,
        &[
            ServiceSpec::cluster_ip(
                ip(VIP),
                8080,
                Proto::Udp,
                vec![
                    BackendSpec::ready(ip("198.18.212.1"), 9000),
                    BackendSpec::ready(ip("198.18.212.2"), 9000),
                ],
            ),
            ServiceSpec::cluster_ip(ip(VIP), 80, Proto::Tcp, vec![]),
            ServiceSpec::cluster_ip(
                ip("2001:db8::10"),
                443,
                Proto::Tcp,
                vec![BackendSpec::ready(ip("2001:db8::1:1"), 8443)],
            ),
        ],
    );
    let st = steer.sync(&t1).unwrap();
    assert_eq!(
        (st.frontends, st.backends, st.added, st.removed),
        (3, 3, 3 + 3 + 2 + 3, 0)
    );
    let d = steer.dump().unwrap();
    let mut want_f = vec![
        key(VIP, 8080, Proto::Udp),
        key(VIP, 80, Proto::Tcp),
        key("2001:db8::10", 443, Proto::Tcp),
    ];
    want_f.sort_unstable();
    let mut want_b = vec![
        key("198.18.212.1", 9000, Proto::Udp),
        key("198.18.212.2", 9000, Proto::Udp),
        key("2001:db8::1:1", 8443, Proto::Tcp),
    ];
    want_b.sort_unstable();
    assert_eq!(d.frontends, want_f);
    assert_eq!(d.backends, want_b);
    let mut vips = vec![a16(VIP), a16("2001:db8::10")];
    vips.sort_unstable();
    assert_eq!(d.vip_addrs, vips);
    assert_eq!(d.backend_addrs.len(), 3);
    let again = steer.sync(&t1).unwrap();
    assert_eq!((again.added, again.removed), (0, 0), "sync is idempotent");

    // t2: the TCP and IPv6 frontends go, one backend moves, and a frontend
    // on A's own address (with a local listener) is added.
    let t2 = table(
        2,
        &[
            ServiceSpec::cluster_ip(
                ip(VIP),
                8080,
                Proto::Udp,
                vec![
                    BackendSpec::ready(ip("198.18.212.1"), 9000),
                    BackendSpec::ready(ip("198.18.212.3"), 9000),
                ],
            ),
            ServiceSpec::cluster_ip(ip(ADDR_A), 7002, Proto::Udp, vec![]),
        ],
    );
    let st = steer.sync(&t2).unwrap();
    // added: frontend A:7002, backend .3 (key and address), vip A;
    // removed: 2 frontends, backends .2 and v6 (keys and addresses), vip v6.
    assert_eq!(
        (st.frontends, st.backends, st.added, st.removed),
        (2, 2, 4, 7)
    );
    let d = steer.dump().unwrap();
    let mut want_f = vec![key(VIP, 8080, Proto::Udp), key(ADDR_A, 7002, Proto::Udp)];
    want_f.sort_unstable();
    let mut want_b = vec![
        key("198.18.212.1", 9000, Proto::Udp),
        key("198.18.212.3", 9000, Proto::Udp),
    ];
    want_b.sort_unstable();
    assert_eq!(d.frontends, want_f);
    assert_eq!(d.backends, want_b);
    let mut vips = vec![a16(VIP), a16(ADDR_A)];
    vips.sort_unstable();
    assert_eq!(d.vip_addrs, vips);
    let mut bes = vec![a16("198.18.212.1"), a16("198.18.212.3")];
    bes.sort_unstable();
    assert_eq!(d.backend_addrs, bes);

    // (3) Traffic from B. No socket registered yet: frontend traffic is
    // matched and falls back to the kernel (A's listener on the frontend
    // port gets it); other ports are plainly passed.
    let mut on_frontend = UdpCounter::bind(ADDR_A, 7002);
    let mut on_other = UdpCounter::bind(ADDR_A, 7003);
    const N: u64 = 20;
    let before = steer.stats().unwrap();
    client(
        &ns_b,
        &format!("udp:{VIP}:8080:{N};udp:{ADDR_A}:7002:{N};udp:{ADDR_A}:7003:{N}"),
    );
    assert_eq!(
        on_frontend.count(N as usize, Duration::from_secs(3)),
        N as usize
    );
    assert_eq!(
        on_other.count(N as usize, Duration::from_secs(3)),
        N as usize
    );
    let after = steer.stats().unwrap();
    eprintln!("steer_netns: without a socket: {before:?} -> {after:?}");
    assert_eq!(after.redirected, before.redirected);
    assert!(after.no_socket - before.no_socket >= 2 * N, "{after:?}");
    assert!(after.passed - before.passed >= N, "{after:?}");
    assert_eq!(after.malformed, before.malformed);

    // With an AF_XDP socket on queue 0: frontend traffic is redirected into
    // it and no longer reaches A's stack; port 7003 still does.
    let mut ports = Ports::open(
        &[Iface {
            name: IF_A.to_owned(),
            ifindex: ifx,
            slot: 0,
        }],
        &[0],
        XskOptions {
            ring_size: 256,
            frame_size: 2048,
            zero_copy: ZeroCopy::Never,
        },
    )
    .expect("open an AF_XDP socket on the veth");
    steer
        .register_socket(0, 0, ports.ports()[0].fd())
        .expect("register the socket");
    assert!(steer.register_socket(1, 0, ports.ports()[0].fd()).is_err());
    assert!(steer.register_socket(0, 64, ports.ports()[0].fd()).is_err());

    let before = steer.stats().unwrap();
    client(
        &ns_b,
        &format!("udp:{VIP}:8080:{N};udp:{ADDR_A}:7002:{N};udp:{ADDR_A}:7003:{N}"),
    );
    let mut got: Vec<u16> = Vec::new();
    let mut descs = Vec::with_capacity(64);
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < 2 * N as usize && Instant::now() < deadline {
        ports.wait(100);
        let n = ports.receive(0, &mut descs);
        if n == 0 {
            continue;
        }
        ports.with_frames(&mut descs, |frames, _lens| {
            for f in frames.iter() {
                let b = &f.buf[..f.len];
                // Ethernet, IPv4 without options, UDP: destination port.
                assert_eq!(&b[12..14], &[0x08, 0x00], "an IPv4 frame");
                let l4 = 14 + usize::from(b[14] & 0x0f) * 4;
                got.push(u16::from_be_bytes([b[l4 + 2], b[l4 + 3]]));
            }
        });
        ports.release(&mut descs);
        ports.recycle();
    }
    assert_eq!(
        on_other.count(2 * N as usize, Duration::from_secs(3)),
        2 * N as usize
    );
    assert_eq!(
        on_frontend.count(N as usize + 1, Duration::from_millis(300)),
        N as usize,
        "frontend traffic reached the kernel although a socket was registered"
    );
    let after = steer.stats().unwrap();
    eprintln!(
        "steer_netns: with a socket: {before:?} -> {after:?}; socket received {} frames",
        got.len()
    );
    assert_eq!(after.redirected - before.redirected, 2 * N, "{after:?}");
    assert_eq!(after.no_socket, before.no_socket);
    assert!(after.passed - before.passed >= N);
    got.sort_unstable();
    let mut want = vec![7002u16; N as usize];
    want.extend(vec![8080u16; N as usize]);
    assert_eq!(
        got, want,
        "the socket received exactly the frontend traffic"
    );
    steer.unregister_socket(0, 0).unwrap();
    drop(ports);

    // (4) detach leaves the interface as found; so does drop.
    steer.detach().expect("detach");
    assert!(!has_xdp(None, IF_A), "XDP still attached after detach()");
    client(&ns_b, &format!("tcp:{ADDR_A}:7001"));

    let steer = Steering::load(&[(IF_A.to_owned(), ifx)]).expect("load again");
    assert!(has_xdp(None, IF_A));
    drop(steer);
    assert!(!has_xdp(None, IF_A), "XDP still attached after drop");
    eprintln!("steer_netns: detach() and drop both left {IF_A} without XDP");

    // Two interfaces: slots in order; a device without native XDP gets
    // generic mode.
    let steer = Steering::load(&[
        (IF_A.to_owned(), ifx),
        (IF_BRIDGE.to_owned(), ifindex(IF_BRIDGE)),
    ])
    .expect("load on veth and bridge");
    eprintln!("steer_netns: veth + bridge: {:?}", steer.attach_modes());
    assert_eq!(steer.attach_modes()[1], AttachMode::Generic);
    assert!(has_xdp(None, IF_A) && has_xdp(None, IF_BRIDGE));
    steer.detach().expect("detach both");
    assert!(!has_xdp(None, IF_A) && !has_xdp(None, IF_BRIDGE));
    // The same interface twice is refused before anything is loaded.
    let dup = Steering::load(&[(IF_A.to_owned(), ifx), ("again".to_owned(), ifx)]);
    assert!(dup.is_err());
}

// ---------------------------------------------------------------------------
// The program's decisions, frame by frame (BPF_PROG_TEST_RUN).

const CLIENT: &str = "198.18.213.7";
const BE1: &str = "198.18.212.1";
const BE_SCTP: &str = "198.18.212.2";
const VIP6: &str = "2001:db8::10";
const BE6: &str = "2001:db8::1:1";
const CLIENT6: &str = "2001:db8::7";

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    testkit::client_frame(a16(src), sport, a16(dst), dport, L4Spec::Udp, b"hello")
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    testkit::client_frame(
        a16(src),
        sport,
        a16(dst),
        dport,
        L4Spec::Tcp(Tcp::syn(1)),
        b"",
    )
}

/// `f` (untagged IPv4) with 4 bytes of NOP options in its IP header.
fn with_ipv4_options(f: &[u8]) -> Vec<u8> {
    let mut out = f[..14 + 20].to_vec();
    out[14] = 0x46; // version 4, IHL 6
    let tot = u16::from_be_bytes([out[16], out[17]]) + 4;
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    out.extend_from_slice(&[1, 1, 1, 0]); // NOP, NOP, NOP, end of list
    out.extend_from_slice(&f[14 + 20..]);
    out
}

/// `f` (untagged IPv6) with `n` 8-byte extension headers (hop-by-hop first,
/// then destination options) before its upper layer.
fn with_ipv6_ext(f: &[u8], n: usize) -> Vec<u8> {
    let upper = f[14 + 6];
    let mut out = f[..14 + 40].to_vec();
    let plen = u16::from_be_bytes([out[18], out[19]]) + 8 * n as u16;
    out[18..20].copy_from_slice(&plen.to_be_bytes());
    out[20] = 0; // hop-by-hop
    for i in 0..n {
        let next = if i + 1 == n { upper } else { 60 }; // destination options
        out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]); // PadN
    }
    out.extend_from_slice(&f[14 + 40..]);
    out
}

fn vlan(f: &[u8], id: u16) -> Vec<u8> {
    let mut out = f[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&f[12..]);
    out
}

#[test]
fn steer_classifies_frames() {
    if std::env::var_os(ROLE).is_some() || !root_or_skip("steer_classifies_frames", NEEDS) {
        return;
    }
    // Attached nowhere: only BPF_PROG_TEST_RUN runs the program.
    let mut steer = Steering::load(&[]).expect("load");
    let t = table(
        1,
        &[
            ServiceSpec::cluster_ip(
                ip(VIP),
                8080,
                Proto::Udp,
                vec![BackendSpec::ready(ip(BE1), 9000)],
            ),
            ServiceSpec::cluster_ip(ip(VIP), 80, Proto::Tcp, vec![]),
            ServiceSpec::cluster_ip(
                ip(VIP),
                3868,
                Proto::Sctp,
                vec![BackendSpec::ready(ip(BE_SCTP), 3868)],
            ),
            ServiceSpec::cluster_ip(
                ip(VIP6),
                443,
                Proto::Tcp,
                vec![BackendSpec::ready(ip(BE6), 8443)],
            ),
        ],
    );
    steer.sync(&t).unwrap();

    use Classified::{Malformed, Passed, Steered};
    let sctp = |src: &str, sport, dst: &str, dport| {
        testkit::client_frame(a16(src), sport, a16(dst), dport, L4Spec::Sctp, b"hb")
    };
    let to_vip = udp(CLIENT, 5555, VIP, 8080);
    let reply = udp(BE1, 9000, CLIENT, 5555);
    let to_vip6 = tcp(CLIENT6, 5555, VIP6, 443);
    let tcp_hdr6 = to_vip6[14 + 40..].to_vec();
    let datagram = testkit::udp_datagram(a16(CLIENT), a16(VIP), 5555, 8080, 1200);
    let mut arp = testkit::ethernet(etherparse::EtherType::ARP);
    arp.extend_from_slice(&[0u8; 28]);
    let mut bad_ihl = to_vip.clone();
    bad_ihl[14] = 0x44;
    let icmp_echo = testkit::icmp_error(a16(CLIENT), a16(VIP), (8, 0, [0; 4]), &to_vip, 28);

    let cases: Vec<(&str, Vec<u8>, Classified)> = vec![
        ("client to frontend (udp)", to_vip.clone(), Steered),
        (
            "client to another port",
            udp(CLIENT, 5555, VIP, 8081),
            Passed,
        ),
        (
            "frontend without backends (tcp)",
            tcp(CLIENT, 5555, VIP, 80),
            Steered,
        ),
        (
            "frontend port, other protocol",
            tcp(CLIENT, 5555, VIP, 8080),
            Passed,
        ),
        ("backend reply", reply.clone(), Steered),
        (
            "backend, another port",
            udp(BE1, 9001, CLIENT, 5555),
            Passed,
        ),
        (
            "node's own traffic",
            udp(CLIENT, 5555, "198.18.210.1", 22),
            Passed,
        ),
        ("802.1Q tagged, to frontend", vlan(&to_vip, 42), Steered),
        (
            "802.1Q tagged, other port",
            vlan(&udp(CLIENT, 1, VIP, 1), 42),
            Passed,
        ),
        (
            "IPv4 options, to frontend",
            with_ipv4_options(&to_vip),
            Steered,
        ),
        ("sctp to frontend", sctp(CLIENT, 3868, VIP, 3868), Steered),
        (
            "sctp backend reply",
            sctp(BE_SCTP, 3868, CLIENT, 3868),
            Steered,
        ),
        ("IPv6 to frontend", to_vip6.clone(), Steered),
        ("IPv6 backend reply", tcp(BE6, 8443, CLIENT6, 5555), Steered),
        ("IPv6 other port", tcp(CLIENT6, 5555, VIP6, 444), Passed),
        (
            "IPv6, 2 extension headers",
            with_ipv6_ext(&to_vip6, 2),
            Steered,
        ),
        (
            "IPv6, 4 extension headers",
            with_ipv6_ext(&to_vip6, 4),
            Steered,
        ),
        (
            "IPv6, 5 extension headers (beyond the walk)",
            with_ipv6_ext(&to_vip6, 5),
            Passed,
        ),
        (
            "IPv6 first fragment to frontend",
            testkit::ipv6_fragment(a16(CLIENT6), a16(VIP6), 6, 9, (0, true), &tcp_hdr6),
            Steered,
        ),
        (
            "IPv6 later fragment to a VIP",
            testkit::ipv6_fragment(a16(CLIENT6), a16(VIP6), 6, 9, (4, false), &[0; 16]),
            Steered,
        ),
        (
            "IPv6 later fragment from a backend",
            testkit::ipv6_fragment(a16(BE6), a16(CLIENT6), 6, 9, (4, false), &[0; 16]),
            Steered,
        ),
        (
            "IPv6 later fragment, unrelated",
            testkit::ipv6_fragment(
                a16(CLIENT6),
                a16("2001:db8::99"),
                6,
                9,
                (4, false),
                &[0; 16],
            ),
            Passed,
        ),
        (
            "IPv4 first fragment to frontend",
            testkit::ipv4_raw(a16(CLIENT), a16(VIP), 17, 7, (0, true), &datagram[..600]),
            Steered,
        ),
        (
            "IPv4 later fragment to a VIP",
            testkit::ipv4_raw(a16(CLIENT), a16(VIP), 17, 7, (75, false), &datagram[600..]),
            Steered,
        ),
        (
            "IPv4 later fragment from a backend",
            testkit::ipv4_raw(a16(BE1), a16(CLIENT), 17, 7, (75, false), &datagram[600..]),
            Steered,
        ),
        (
            "IPv4 later fragment, unrelated",
            testkit::ipv4_raw(
                a16(CLIENT),
                a16("198.18.213.9"),
                17,
                7,
                (75, false),
                &datagram[600..],
            ),
            Passed,
        ),
        (
            "ICMP unreachable quoting a packet to a backend",
            testkit::icmp_error(
                a16(BE1),
                a16(CLIENT),
                (3, 3, [0; 4]),
                &udp(CLIENT, 5555, BE1, 9000),
                28,
            ),
            Steered,
        ),
        (
            "ICMP frag needed quoting a reply from the frontend",
            testkit::icmp_error(
                a16("198.18.213.1"),
                a16(VIP),
                (3, 4, [0, 0, 5, 0xdc]),
                &udp(VIP, 8080, CLIENT, 5555),
                28,
            ),
            Steered,
        ),
        (
            "ICMP time exceeded quoting a packet to the frontend",
            testkit::icmp_error(
                a16("198.18.213.1"),
                a16(CLIENT),
                (11, 0, [0; 4]),
                &to_vip,
                28,
            ),
            Steered,
        ),
        (
            "ICMP error quoting unrelated traffic",
            testkit::icmp_error(
                a16("198.18.213.1"),
                a16(CLIENT),
                (3, 3, [0; 4]),
                &udp(CLIENT, 1, "198.18.213.9", 2),
                28,
            ),
            Passed,
        ),
        (
            "ICMP error with options in the quoted header",
            testkit::icmp_error(
                a16(BE1),
                a16(CLIENT),
                (3, 3, [0; 4]),
                &with_ipv4_options(&udp(CLIENT, 5555, BE1, 9000)),
                32,
            ),
            Steered,
        ),
        ("ICMP echo request to a VIP", icmp_echo, Passed),
        (
            "ICMPv6 packet too big quoting a reply from the frontend",
            testkit::icmp_error(
                a16("2001:db8::1"),
                a16(VIP6),
                (2, 0, 1280u32.to_be_bytes()),
                &tcp(VIP6, 443, CLIENT6, 5555),
                48,
            ),
            Steered,
        ),
        (
            "ICMPv6 unreachable quoting a packet to a backend",
            testkit::icmp_error(
                a16(BE6),
                a16(CLIENT6),
                (1, 4, [0; 4]),
                &tcp(CLIENT6, 5555, BE6, 8443),
                48,
            ),
            Steered,
        ),
        (
            "ICMPv6 neighbour solicitation",
            testkit::icmp_error(a16(CLIENT6), a16(VIP6), (135, 0, [0; 4]), &to_vip6, 40),
            Passed,
        ),
        ("ARP", arp, Passed),
        (
            "truncated UDP header",
            to_vip[..14 + 20 + 4].to_vec(),
            Malformed,
        ),
        (
            "truncated IPv4 header",
            to_vip[..14 + 10].to_vec(),
            Malformed,
        ),
        ("IPv4 IHL below 5", bad_ihl, Malformed),
        (
            "truncated IPv6 header",
            to_vip6[..14 + 30].to_vec(),
            Malformed,
        ),
        (
            "truncated VLAN tag",
            vlan(&to_vip, 1)[..16].to_vec(),
            Malformed,
        ),
        (
            "ICMP error quoting no ports",
            testkit::icmp_error(
                a16(BE1),
                a16(CLIENT),
                (3, 3, [0; 4]),
                &udp(CLIENT, 5555, BE1, 9000),
                22,
            ),
            Malformed,
        ),
    ];
    assert_classified(&steer, &cases);

    // Frontends with no backends keep steering; removed ones stop.
    steer.sync(&Table::empty(2)).unwrap();
    assert_eq!(steer.classify(&to_vip).unwrap(), Passed);
    assert_eq!(steer.classify(&reply).unwrap(), Passed);
    assert_eq!(steer.dump().unwrap(), Default::default());
}

#[test]
fn steer_snat_replies_only_on_snat_ports() {
    if std::env::var_os(ROLE).is_some()
        || !root_or_skip("steer_snat_replies_only_on_snat_ports", NEEDS)
    {
        return;
    }
    // The gateway's own addresses (what --snat-address gives, or the served
    // interfaces' addresses).
    const SNAT: &str = "198.18.210.1";
    const SNAT2: &str = "198.18.210.3";
    const SNAT6: &str = "2001:db8::ff";
    let mut steer = Steering::load(&[]).expect("load");
    steer
        .sync(&table(
            1,
            &[
                ServiceSpec::cluster_ip(
                    ip(VIP),
                    8080,
                    Proto::Udp,
                    vec![BackendSpec::ready(ip(BE1), 9000)],
                ),
                ServiceSpec::cluster_ip(
                    ip(VIP),
                    80,
                    Proto::Tcp,
                    vec![BackendSpec::ready(ip(BE1), 8080)],
                ),
                ServiceSpec::cluster_ip(
                    ip(VIP6),
                    443,
                    Proto::Tcp,
                    vec![BackendSpec::ready(ip(BE6), 8443)],
                ),
            ],
        ))
        .unwrap();
    use Classified::{Passed, Steered};
    let reply_in_range = udp(BE1, 9000, SNAT, 25_000);
    let pod_to_sshd = tcp(BE1, 8080, SNAT, 22);
    let pod_to_metrics = udp(BE1, 9000, SNAT, 9100);
    let reply_to_client = udp(BE1, 9000, CLIENT, 5555);

    // Before any SNAT address is set: today's rule, every packet from a
    // backend's (address, port) is the gateway's.
    for f in [
        &reply_in_range,
        &pod_to_sshd,
        &pod_to_metrics,
        &reply_to_client,
    ] {
        assert_eq!(steer.classify(f).unwrap(), Steered);
    }

    let range = PortRange::new(20_000, 29_999).unwrap();
    let set = steer
        .set_snat(&[a16(SNAT), a16(SNAT2), a16(SNAT6)], Some(range))
        .unwrap();
    assert_eq!(
        set,
        SnatSync {
            addrs: 3,
            added: 3,
            removed: 0,
            ports_changed: true
        }
    );
    let dump = steer.dump().unwrap();
    assert_eq!(dump.snat_ports, Some(range));
    assert_eq!(dump.snat_addrs.len(), 3);
    assert!(dump.snat_addrs.contains(&a16(SNAT6)));

    let cases: Vec<(&str, Vec<u8>, Classified)> = vec![
        (
            "backend reply to a SNAT port",
            reply_in_range.clone(),
            Steered,
        ),
        (
            "to the lowest SNAT port",
            udp(BE1, 9000, SNAT, 20_000),
            Steered,
        ),
        (
            "to the highest SNAT port",
            udp(BE1, 9000, SNAT, 29_999),
            Steered,
        ),
        ("just above the range", udp(BE1, 9000, SNAT, 30_000), Passed),
        ("just below the range", udp(BE1, 9000, SNAT, 19_999), Passed),
        (
            "a pod's TCP to the node's sshd",
            pod_to_sshd.clone(),
            Passed,
        ),
        (
            "a pod's UDP to the node exporter",
            pod_to_metrics.clone(),
            Passed,
        ),
        (
            "reply to the second SNAT address",
            tcp(BE1, 8080, SNAT2, 24_242),
            Steered,
        ),
        (
            "backend reply to a client",
            reply_to_client.clone(),
            Steered,
        ),
        (
            "not from a backend, to a SNAT port",
            udp(CLIENT, 9000, SNAT, 25_000),
            Passed,
        ),
        (
            "a client to the frontend",
            udp(CLIENT, 5555, VIP, 8080),
            Steered,
        ),
        (
            "IPv6 reply to a SNAT port",
            tcp(BE6, 8443, SNAT6, 22_000),
            Steered,
        ),
        ("IPv6 to the node's sshd", tcp(BE6, 8443, SNAT6, 22), Passed),
        (
            "IPv6 reply to a client",
            tcp(BE6, 8443, CLIENT6, 22),
            Steered,
        ),
        (
            "ICMP error about a packet to a backend, to a SNAT address",
            testkit::icmp_error(
                a16(BE1),
                a16(SNAT),
                (3, 3, [0; 4]),
                &udp(SNAT, 22, BE1, 9000),
                28,
            ),
            Steered,
        ),
    ];
    assert_classified(&steer, &cases);

    // Setting the same again writes nothing.
    let again = steer
        .set_snat(&[a16(SNAT6), a16(SNAT), a16(SNAT2)], Some(range))
        .unwrap();
    assert_eq!(
        (again.added, again.removed, again.ports_changed),
        (0, 0, false)
    );

    // An address that leaves the set (the node lost it) is a client again:
    // today's rule; the range moves with the flag.
    let moved = PortRange::new(40_000, 40_100).unwrap();
    let set = steer.set_snat(&[a16(SNAT2)], Some(moved)).unwrap();
    assert_eq!((set.addrs, set.added, set.removed), (1, 0, 2));
    assert_eq!(steer.classify(&pod_to_sshd).unwrap(), Steered);
    assert_eq!(
        steer.classify(&tcp(BE1, 8080, SNAT2, 24_242)).unwrap(),
        Passed
    );
    assert_eq!(
        steer.classify(&tcp(BE1, 8080, SNAT2, 40_000)).unwrap(),
        Steered
    );

    // No range: nothing to a SNAT address is a reply.
    steer.set_snat(&[a16(SNAT2)], None).unwrap();
    assert_eq!(
        steer.classify(&tcp(BE1, 8080, SNAT2, 40_000)).unwrap(),
        Passed
    );
    steer.set_snat(&[], None).unwrap();
    let dump = steer.dump().unwrap();
    assert!(dump.snat_addrs.is_empty() && dump.snat_ports.is_none());
    assert_eq!(
        steer.classify(&tcp(BE1, 8080, SNAT2, 40_000)).unwrap(),
        Steered
    );
}

#[test]
fn steer_node_ports() {
    if std::env::var_os(ROLE).is_some() || !root_or_skip("steer_node_ports", NEEDS) {
        return;
    }
    // The node's addresses (what the gateway reads over netlink).
    const NODE: &str = "198.18.210.1";
    const NODE2: &str = "198.18.214.1";
    const NODE6: &str = "2001:2::1";
    const OTHER: &str = "198.18.210.9";
    const OTHER6: &str = "2001:2::9";
    const CLIENT_V6: &str = "2001:2:0:1::7";
    const BE_V6: &str = "2001:2:0:2::1";
    let node_table = |generation, node_port_addresses: &[&str], port: u16| {
        let np = |addr: &str, port, proto, backends| {
            ServiceSpec::cluster_ip(ip(addr), port, proto, backends)
                .with_kind(FrontendKind::NodePort, ip(addr))
        };
        let spec = TableSpec {
            services: vec![
                np(
                    "0.0.0.0",
                    port,
                    Proto::Tcp,
                    vec![BackendSpec::ready(ip(BE1), 8080)],
                ),
                np("0.0.0.0", 30053, Proto::Udp, vec![]),
                np(
                    "::",
                    port,
                    Proto::Tcp,
                    vec![BackendSpec::ready(ip(BE_V6), 8080)],
                ),
                ServiceSpec::cluster_ip(
                    ip(VIP),
                    80,
                    Proto::Tcp,
                    vec![BackendSpec::ready(ip(BE1), 8080)],
                ),
            ],
            nodes: vec![],
            node_port_addresses: node_port_addresses
                .iter()
                .map(|n| n.parse().unwrap())
                .collect(),
            policy: Default::default(),
        };
        Table::build_full(generation, 1, &spec, 65_537).unwrap()
    };
    let mut steer = Steering::load(&[]).expect("load");
    assert!(steer.set_node_addrs(&[a16(NODE), a16(NODE2), a16(NODE6), a16("0.0.0.0")]));
    assert!(!steer.set_node_addrs(&[a16(NODE6), a16(NODE2), a16(NODE)]));
    let st = steer
        .sync(&node_table(1, &["0.0.0.0/0", "::/0"], 30080))
        .unwrap();
    assert_eq!((st.node_port_keys, st.frontends), (5, 6));
    let dump = steer.dump().unwrap();
    assert!(
        dump.frontends
            .iter()
            .all(|k| !ip_from(k.addr).is_unspecified()),
        "{:?}",
        dump.frontends
    );
    assert_eq!(dump.vip_addrs, [a16(VIP)], "node addresses are no VIPs");
    assert!(dump.frontends.contains(&key(NODE2, 30053, Proto::Udp)));

    use Classified::{Passed, Steered};
    let to_node = tcp(CLIENT, 5555, NODE, 30080);
    let cases: Vec<(&str, Vec<u8>, Classified)> = vec![
        ("a node address on a node port", to_node.clone(), Steered),
        (
            "another node address on a node port",
            tcp(CLIENT, 5555, NODE2, 30080),
            Steered,
        ),
        (
            "a UDP node port without endpoints",
            udp(CLIENT, 5555, NODE, 30053),
            Steered,
        ),
        (
            "IPv6: a node address on a node port",
            tcp(CLIENT_V6, 5555, NODE6, 30080),
            Steered,
        ),
        (
            "not a node address, on a node port",
            tcp(CLIENT, 5555, OTHER, 30080),
            Passed,
        ),
        (
            "IPv6: not a node address",
            tcp(CLIENT_V6, 5555, OTHER6, 30080),
            Passed,
        ),
        (
            "a node address, not a node port (sshd)",
            tcp(CLIENT, 5555, NODE, 22),
            Passed,
        ),
        (
            "a node address, the next port",
            tcp(CLIENT, 5555, NODE, 30081),
            Passed,
        ),
        (
            "a node port of another protocol",
            udp(CLIENT, 5555, NODE, 30080),
            Passed,
        ),
        (
            "to the unspecified address",
            tcp(CLIENT, 5555, "0.0.0.0", 30080),
            Passed,
        ),
        (
            "a cluster IP on the node port's port",
            tcp(CLIENT, 5555, VIP, 30080),
            Passed,
        ),
        ("the cluster IP still", tcp(CLIENT, 5555, VIP, 80), Steered),
        (
            "a node-port backend's reply",
            tcp(BE1, 8080, CLIENT, 5555),
            Steered,
        ),
        (
            "ICMP error quoting a packet to a node port",
            testkit::icmp_error(
                a16("198.18.213.1"),
                a16(CLIENT),
                (11, 0, [0; 4]),
                &to_node,
                28,
            ),
            Steered,
        ),
        (
            "ICMP frag needed quoting a reply from a node port",
            testkit::icmp_error(
                a16("198.18.213.1"),
                a16(NODE),
                (3, 4, [0, 0, 5, 0xdc]),
                &tcp(NODE, 30080, CLIENT, 5555),
                28,
            ),
            Steered,
        ),
        (
            "ICMP error quoting the node's own traffic",
            testkit::icmp_error(
                a16("198.18.213.1"),
                a16(NODE),
                (3, 3, [0; 4]),
                &tcp(NODE, 22, CLIENT, 5555),
                28,
            ),
            Passed,
        ),
        (
            "a later fragment to a node address (no VIP: the kernel's)",
            testkit::ipv4_raw(a16(CLIENT), a16(NODE), 17, 7, (75, false), &[0; 64]),
            Passed,
        ),
    ];
    assert_classified(&steer, &cases);

    // --nodeport-addresses narrows the node addresses served.
    let st = steer
        .sync(&node_table(2, &["198.18.214.0/24"], 30080))
        .unwrap();
    assert_eq!(st.node_port_keys, 2);
    assert_classified(
        &steer,
        &[
            ("selected", tcp(CLIENT, 5555, NODE2, 30080), Steered),
            ("not selected", to_node.clone(), Passed),
            (
                "not selected, IPv6",
                tcp(CLIENT_V6, 5555, NODE6, 30080),
                Passed,
            ),
        ],
    );

    // The node's addresses change: the keys follow at the next sync; so
    // they do when the node port moves.
    let t3 = node_table(3, &["0.0.0.0/0", "::/0"], 30090);
    assert!(steer.set_node_addrs(&[a16(NODE2), a16(OTHER)]));
    let st = steer.sync(&t3).unwrap();
    assert_eq!(st.node_port_keys, 4);
    assert_classified(
        &steer,
        &[
            (
                "a new node address",
                tcp(CLIENT, 5555, OTHER, 30090),
                Steered,
            ),
            (
                "a lost node address",
                tcp(CLIENT, 5555, NODE, 30090),
                Passed,
            ),
            ("the old node port", tcp(CLIENT, 5555, NODE2, 30080), Passed),
            (
                "no IPv6 node address left",
                tcp(CLIENT_V6, 5555, NODE6, 30090),
                Passed,
            ),
        ],
    );
    // No node ports: no key on a node address.
    let st = steer.sync(&table(4, &[])).unwrap();
    assert_eq!((st.node_port_keys, st.frontends), (0, 0));
    assert!(steer.dump().unwrap().frontends.is_empty());
}

fn ip_from(a: Addr16) -> IpAddr {
    clustergate_dataplane::flow::ip_from16(a)
}

/// Runs every case through the program and fails listing each frame the
/// program classified otherwise than expected.
fn assert_classified(steer: &Steering, cases: &[(&str, Vec<u8>, Classified)]) {
    let mut wrong = Vec::new();
    for (what, frame, want) in cases {
        let got = steer.classify(frame).unwrap();
        if got != *want {
            wrong.push(format!("{what}: want {want:?}, got {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
