//! `clustergate-bench sink`: the checking sink in a backend namespace.
//!
//! Owns: the sink's own XDP program on its interface ([`crate::xdp_sink`]:
//! every unicast IPv4 frame, and IPv6 but ICMPv6, to the AF_XDP socket of
//! its queue; ARP, neighbour discovery and multicast to the kernel), so it
//! sees whatever the dataplane under test sent it, IP-in-IP included; one
//! thread per queue that checks every frame with [`wire::check`] for the
//! return path it was told (`--return-path`), keeps per flow the SNAT port
//! (which must not change within a flow nor be shared by two flows to the
//! same port), measures one-way latency on the shared `CLOCK_MONOTONIC`,
//! counts reordering and duplicates per flow, and hands the frames back (it
//! never transmits). One JSON result line at the end.
//!
//! It never allocates per packet, reads the clock once per RX batch, and
//! sleeps in `poll(2)` when idle.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};

use anyhow::{ensure, Context as _, Result};
use clustergate_dataplane::io::nexthop::ifindex_by_name;
use clustergate_dataplane::io::xsk::{FrameToken, Iface, Ports, XskOptions, ZeroCopy, RX_BATCH};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::layout::{
    backend_ip, backend_mac, gw_lan_ip, parse_family, Family, MAX_BACKENDS, MAX_FLOWS, MAX_SERVICES,
};
use crate::pktgen::mono_ns;
use crate::wire::{self, Bad, Expect, PathExpect};
use crate::xdp_sink::{self, SinkProg, MAX_QUEUES};

/// Most accepted ports.
pub const MAX_PORTS: u32 = 1024;
/// Longest `poll(2)` when idle (also bounds how late a stop is seen).
const IDLE_WAIT_MS: i32 = 10;
/// Entries in each ring: deep enough that a sink descheduled for a few
/// milliseconds at 1 Mpps loses nothing (the fill ring is what runs dry).
const RING_SIZE: u32 = 4096;
/// Highest latency the histogram tells apart (larger values are clamped).
const MAX_LATENCY_NS: u64 = 10_000_000_000;

/// Flags of `clustergate-bench sink`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Interface to receive on.
    #[arg(long, default_value = "e0")]
    pub iface: String,
    /// Which backend this is, 1..=16: its address and MAC follow.
    #[arg(long, value_name = "I")]
    pub backend: u32,
    /// Accepted destination ports: `P` or `P-Q` (at most 1024 ports).
    #[arg(long, value_parser = parse_ports, default_value = "8080")]
    pub ports: PortRange,
    /// Flows the generator sends, 1..=4000000 (per-flow reorder state).
    #[arg(long, default_value_t = 1000)]
    pub flows: u32,
    /// RX queues, comma-separated; one thread (and socket) per queue, 0..=63.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub queues: Vec<u32>,
    /// Upper bound on the run, 0.1..=3600 seconds (SIGTERM/SIGINT end it
    /// earlier).
    #[arg(long, default_value_t = 600.0, value_name = "D")]
    pub duration_s: f64,
    /// Print `{"event":"first-port",...}` the first time each port is seen.
    #[arg(long)]
    pub report_first_port: bool,
    /// Accept this destination address instead of the backend's own (a
    /// test without a gateway: pktgen straight into the sink).
    #[arg(long, value_name = "ADDR")]
    pub accept_dst: Option<IpAddr>,
    /// How the frames come: `routed` (destination NAT only: the source is
    /// the flow's), `snat` (the source is `--gateway-addr` and a port of
    /// `--snat-ports`, stable within a flow and not shared), `dsr` (IP-in-IP
    /// from `--gateway-addr`; inside, the client's packet to the VIP of the
    /// flow's service of `--services`, TTL one lower).
    #[arg(long, value_enum, default_value = "routed")]
    pub return_path: ReturnPath,
    /// The gateway's address: the SNAT source, or the DSR outer source
    /// (default: g1's of `--family`).
    #[arg(long, value_name = "ADDR")]
    pub gateway_addr: Option<IpAddr>,
    /// The family of the frames it accepts: 4 (its address in
    /// 198.18.2.0/24) or 6 (in 2001:2:0:2::/64).
    #[arg(long, default_value = "4", value_parser = parse_family)]
    pub family: Family,
    /// The SNAT ports a source port must be in, `LO-HI` (`--return-path snat`).
    #[arg(long, value_name = "LO-HI", value_parser = parse_port_span, default_value = "1024-29999")]
    pub snat_ports: (u16, u16),
    /// Services the generator spreads the flows over (`--return-path dsr`
    /// checks the inner destination: the VIP of service flow mod S).
    #[arg(long, default_value_t = 1)]
    pub services: u32,
    /// Keep polling an empty RX ring this long (µs, 0..=10000; yielding
    /// the core in between) before sleeping in `poll(2)`. On a VM this
    /// avoids the vCPU wake-up on every packet (p99 latency ÷10 measured),
    /// at the price of CPU. Default 0: sleep at once.
    #[arg(long, default_value_t = 0, value_name = "US")]
    pub busy_poll_us: u64,
}

/// The return path a sink checks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReturnPath {
    /// Destination NAT only.
    Routed,
    /// Source NAT as well.
    Snat,
    /// IP-in-IP encapsulation (direct server return).
    Dsr,
}

impl ReturnPath {
    /// The name control's `--return-path` takes.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::Snat => "snat",
            Self::Dsr => "dsr",
        }
    }
}

/// Parses `LO-HI` (1 ≤ LO ≤ HI).
///
/// # Errors
/// Not two ports, 0, or LO > HI.
pub fn parse_port_span(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: not a range LO-HI"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: {p:?} is not a port"))
    };
    let (lo, hi) = (port(a)?, port(b)?);
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: need 1 <= LO <= HI"));
    }
    Ok((lo, hi))
}

/// Accepted destination ports, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl PortRange {
    /// Ports in the range.
    #[must_use]
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

/// Parses `P` or `P-Q` (P ≤ Q, at most [`MAX_PORTS`] ports).
///
/// # Errors
/// Not a port or range, P > Q, or too many ports.
pub fn parse_ports(s: &str) -> Result<PortRange, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: not a port (P or P-Q)"))
    };
    let r = match s.split_once('-') {
        Some((a, b)) => PortRange {
            first: port(a)?,
            last: port(b)?,
        },
        None => {
            let p = port(s)?;
            PortRange { first: p, last: p }
        }
    };
    if r.first > r.last {
        return Err(format!("{s:?}: {} > {}", r.first, r.last));
    }
    if r.len() > MAX_PORTS {
        return Err(format!("{s:?}: {} ports, at most {MAX_PORTS}", r.len()));
    }
    Ok(r)
}

/// Frames that failed a check, per [`Bad`] variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadCounts {
    /// [`Bad::Malformed`].
    pub malformed: u64,
    /// [`Bad::Magic`].
    pub magic: u64,
    /// [`Bad::IpChecksum`].
    pub ip_checksum: u64,
    /// [`Bad::L4Checksum`].
    pub l4_checksum: u64,
    /// [`Bad::DstAddr`].
    pub dst_addr: u64,
    /// [`Bad::DstPort`].
    pub dst_port: u64,
    /// [`Bad::Src`].
    pub src: u64,
    /// [`Bad::DstMac`].
    pub dst_mac: u64,
    /// [`Bad::SnatAddr`].
    pub snat_addr: u64,
    /// [`Bad::SnatPort`].
    pub snat_port: u64,
    /// [`Bad::SnatUnstable`].
    pub snat_unstable: u64,
    /// [`Bad::SnatShared`].
    pub snat_shared: u64,
    /// [`Bad::OuterChecksum`].
    pub outer_checksum: u64,
    /// [`Bad::OuterAddr`].
    pub outer_addr: u64,
    /// [`Bad::OuterHeader`].
    pub outer_header: u64,
    /// [`Bad::Ttl`].
    pub ttl: u64,
}

impl BadCounts {
    fn from_array(a: &[u64; Bad::ALL.len()]) -> Self {
        let c = |b: Bad| a[b.index()];
        Self {
            malformed: c(Bad::Malformed),
            magic: c(Bad::Magic),
            ip_checksum: c(Bad::IpChecksum),
            l4_checksum: c(Bad::L4Checksum),
            dst_addr: c(Bad::DstAddr),
            dst_port: c(Bad::DstPort),
            src: c(Bad::Src),
            dst_mac: c(Bad::DstMac),
            snat_addr: c(Bad::SnatAddr),
            snat_port: c(Bad::SnatPort),
            snat_unstable: c(Bad::SnatUnstable),
            snat_shared: c(Bad::SnatShared),
            outer_checksum: c(Bad::OuterChecksum),
            outer_addr: c(Bad::OuterAddr),
            outer_header: c(Bad::OuterHeader),
            ttl: c(Bad::Ttl),
        }
    }

    /// All bad frames.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.malformed
            + self.magic
            + self.ip_checksum
            + self.l4_checksum
            + self.dst_addr
            + self.dst_port
            + self.src
            + self.dst_mac
            + self.snat_addr
            + self.snat_port
            + self.snat_unstable
            + self.snat_shared
            + self.outer_checksum
            + self.outer_addr
            + self.outer_header
            + self.ttl
    }
}

/// The XDP program's counters at the end (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteerCounts {
    /// Redirected to the sink's sockets.
    pub redirected: u64,
    /// Passed to the kernel (ARP, neighbour discovery, multicast).
    pub passed: u64,
    /// An IP frame on an rx queue with no socket (passed to the kernel).
    pub no_socket: u64,
}

impl From<xdp_sink::Stats> for SteerCounts {
    fn from(s: xdp_sink::Stats) -> Self {
        Self {
            redirected: s.redirected,
            passed: s.passed,
            no_socket: s.no_socket,
        }
    }
}

/// The sockets' `XDP_STATISTICS` at the end, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingCounts {
    /// Frames the kernel dropped for lack of room.
    pub rx_dropped: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was found empty.
    pub rx_fill_ring_empty: u64,
}

/// The final line: `{"event":"result",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkResult {
    /// The backend number.
    pub backend: u32,
    /// Frames received on the sockets.
    pub received: u64,
    /// Frames that passed every check.
    pub ok: u64,
    /// Frames that failed, by first failed check.
    pub bad: BadCounts,
    /// OK frames whose seq was below the last seen of their flow.
    pub reordered: u64,
    /// OK frames whose seq equalled the last seen of their flow.
    pub duplicates: u64,
    /// OK TCP frames with SYN.
    pub syn: u64,
    /// `CLOCK_MONOTONIC` ns of the first RX batch (0 when none).
    pub first_mono_ns: u64,
    /// `CLOCK_MONOTONIC` ns of the last RX batch (0 when none).
    pub last_mono_ns: u64,
    /// One-way latency of OK frames: `[value_ns, count]` per recorded
    /// histogram bucket (hdrhistogram, 3 significant digits), to merge.
    pub latency_ns: Vec<(u64, u64)>,
    /// OK frames per destination port: `[port, count]`, ports seen only.
    pub by_port: Vec<(u16, u64)>,
    /// The XDP program's counters.
    pub steer: SteerCounts,
    /// The sockets' ring statistics.
    pub rings: RingCounts,
}

/// The JSON lines the sink prints on stdout, tagged by `event`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[allow(clippy::large_enum_variant)] // A few lines per run; unboxed is simpler to match.
pub enum SinkEvent {
    /// The program is attached and the sockets registered.
    Ready,
    /// The first frame to `port` arrived at `mono_ns` (--report-first-port).
    FirstPort {
        /// Destination port.
        port: u16,
        /// `CLOCK_MONOTONIC` ns of the RX batch.
        mono_ns: u64,
    },
    /// The final result.
    Result(SinkResult),
}

fn print_event(e: &SinkEvent) -> Result<()> {
    let line = serde_json::to_string(e)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Validated flags.
#[derive(Debug, Clone)]
struct Plan {
    queues: Vec<u32>,
    expect: Expect,
    duration_ns: u64,
    busy_poll_ns: u64,
    report_first_port: bool,
}

fn plan(a: &Args) -> Result<Plan> {
    ensure!(!a.iface.is_empty(), "--iface: must not be empty");
    ensure!(
        (1..=MAX_BACKENDS).contains(&a.backend),
        "--backend {}: must be 1..={MAX_BACKENDS}",
        a.backend
    );
    ensure!(
        (1..=MAX_FLOWS).contains(&a.flows),
        "--flows {}: must be 1..={MAX_FLOWS}",
        a.flows
    );
    ensure!(!a.queues.is_empty(), "--queues: give at least one queue");
    for (i, q) in a.queues.iter().enumerate() {
        ensure!(
            *q < MAX_QUEUES,
            "--queues: queue {q} is out of range (0..={})",
            MAX_QUEUES - 1
        );
        ensure!(
            !a.queues[..i].contains(q),
            "--queues: queue {q} is given twice"
        );
    }
    ensure!(
        a.duration_s.is_finite() && (0.1..=3600.0).contains(&a.duration_s),
        "--duration-s {}: must be 0.1..=3600",
        a.duration_s
    );
    ensure!(
        a.busy_poll_us <= 10_000,
        "--busy-poll-us {}: must be 0..=10000",
        a.busy_poll_us
    );
    let (bench_range, range) = match a.family {
        Family::V4 => (
            (|d: IpAddr| match d {
                IpAddr::V4(d) => d.octets()[0] == 198 && (d.octets()[1] & 0xfe) == 18,
                IpAddr::V6(_) => false,
            }) as fn(IpAddr) -> bool,
            "198.18.0.0/15",
        ),
        Family::V6 => (
            (|d: IpAddr| match d {
                IpAddr::V6(d) => d.segments()[..3] == [0x2001, 2, 0],
                IpAddr::V4(_) => false,
            }) as fn(IpAddr) -> bool,
            "2001:2::/48",
        ),
    };
    if let Some(d) = a.accept_dst {
        ensure!(
            bench_range(d),
            "--accept-dst {d}: must be in {range} (--family {})",
            a.family.number()
        );
    }
    let gateway_addr = a.gateway_addr.unwrap_or_else(|| gw_lan_ip(a.family));
    ensure!(
        bench_range(gateway_addr),
        "--gateway-addr {gateway_addr}: must be in {range} (--family {})",
        a.family.number()
    );
    ensure!(
        (1..=MAX_SERVICES).contains(&a.services),
        "--services {}: must be 1..={MAX_SERVICES}",
        a.services
    );
    let path = match a.return_path {
        ReturnPath::Routed => PathExpect::Routed,
        ReturnPath::Snat => PathExpect::Snat {
            addr: gateway_addr,
            lo: a.snat_ports.0,
            hi: a.snat_ports.1,
        },
        ReturnPath::Dsr => PathExpect::Dsr {
            gateway: gateway_addr,
            services: a.services,
        },
    };
    Ok(Plan {
        queues: a.queues.clone(),
        expect: Expect {
            mac: backend_mac(a.backend),
            addr: a
                .accept_dst
                .unwrap_or_else(|| backend_ip(a.family, a.backend)),
            first_port: a.ports.first,
            last_port: a.ports.last,
            flows: a.flows,
            path,
        },
        duration_ns: (a.duration_s * 1e9) as u64,
        busy_poll_ns: a.busy_poll_us * 1_000,
        report_first_port: a.report_first_port,
    })
}

/// What one queue's thread counted.
#[derive(Debug)]
struct Counts {
    received: u64,
    ok: u64,
    bad: [u64; Bad::ALL.len()],
    reordered: u64,
    duplicates: u64,
    syn: u64,
    first_ns: Option<u64>,
    last_ns: u64,
    latency: Histogram<u64>,
    by_port: Vec<u64>,
    rings: RingCounts,
}

impl Counts {
    fn new(ports: u32) -> Result<Self> {
        Ok(Self {
            received: 0,
            ok: 0,
            bad: [0; Bad::ALL.len()],
            reordered: 0,
            duplicates: 0,
            syn: 0,
            first_ns: None,
            last_ns: 0,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .context("creating the latency histogram")?,
            by_port: vec![0; ports as usize],
            rings: RingCounts::default(),
        })
    }

    fn merge(&mut self, o: &Self) -> Result<()> {
        self.received += o.received;
        self.ok += o.ok;
        for (a, b) in self.bad.iter_mut().zip(&o.bad) {
            *a += b;
        }
        self.reordered += o.reordered;
        self.duplicates += o.duplicates;
        self.syn += o.syn;
        self.first_ns = match (self.first_ns, o.first_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_ns = self.last_ns.max(o.last_ns);
        self.latency
            .add(&o.latency)
            .context("merging latency histograms")?;
        for (a, b) in self.by_port.iter_mut().zip(&o.by_port) {
            *a += b;
        }
        self.rings.rx_dropped += o.rings.rx_dropped;
        self.rings.rx_ring_full += o.rings.rx_ring_full;
        self.rings.rx_fill_ring_empty += o.rings.rx_fill_ring_empty;
        Ok(())
    }
}

/// Per-flow state: the last sequence number + 1 (0: none yet) and, under
/// source NAT, the flow's SNAT port.
#[derive(Debug)]
struct Order {
    last: Vec<u64>,
    snat: Option<SnatTrack>,
}

/// Under source NAT: each flow's port, and which flow holds each port.
#[derive(Debug)]
struct SnatTrack {
    /// Per flow: the source port of its first frame (0: not seen yet).
    port_of: Vec<u16>,
    /// Per source port: `(destination port << 32) | (flow + 1)` of the last
    /// flow seen with it (0: none). Two flows to the same destination port
    /// must not share a source port; flows to different destination ports
    /// may (the gateway's ports are unique per backend port). Only the last
    /// holder is kept, so with several destination ports in turn a clash
    /// can go unseen; with one (compare) none can.
    holder: Vec<u64>,
}

impl SnatTrack {
    fn new(flows: u32) -> Self {
        Self {
            port_of: vec![0; flows as usize],
            holder: vec![0; 1 << 16],
        }
    }

    fn see(&mut self, flow: u32, src_port: u16, dst_port: u16) -> Result<(), Bad> {
        let Some(port) = self.port_of.get_mut(flow as usize) else {
            return Ok(());
        };
        if *port == 0 {
            let mine = (u64::from(dst_port) << 32) | u64::from(flow + 1);
            let h = &mut self.holder[usize::from(src_port)];
            if *h != 0 && *h >> 32 == u64::from(dst_port) && *h != mine {
                return Err(Bad::SnatShared);
            }
            *h = mine;
            *port = src_port;
            Ok(())
        } else if *port == src_port {
            Ok(())
        } else {
            Err(Bad::SnatUnstable)
        }
    }
}

/// What [`Order::see`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    InOrder,
    Reordered,
    Duplicate,
}

impl Order {
    fn new(flows: u32, snat: bool) -> Self {
        Self {
            last: vec![0; flows as usize],
            snat: snat.then(|| SnatTrack::new(flows)),
        }
    }

    fn see(&mut self, flow: u32, seq: u64) -> Seen {
        let Some(last) = self.last.get_mut(flow as usize) else {
            return Seen::InOrder;
        };
        let s = seq.saturating_add(1);
        if s > *last {
            *last = s;
            Seen::InOrder
        } else if s == *last {
            Seen::Duplicate
        } else {
            Seen::Reordered
        }
    }
}

/// Counts one checked frame (the per-packet work of the sink).
fn account(
    c: &mut Counts,
    order: &mut Order,
    checked: Result<wire::Probe, Bad>,
    now: u64,
    first_port: u16,
) -> Option<u16> {
    c.received += 1;
    match checked {
        Err(b) => {
            c.bad[b.index()] += 1;
            None
        }
        Ok(p) => {
            if let Some(t) = &mut order.snat {
                if let Err(b) = t.see(p.flow, p.src_port, p.dst_port) {
                    c.bad[b.index()] += 1;
                    return None;
                }
            }
            c.ok += 1;
            c.syn += u64::from(p.syn);
            c.latency.saturating_record(now.saturating_sub(p.ts));
            match order.see(p.flow, p.seq) {
                Seen::InOrder => {}
                Seen::Reordered => c.reordered += 1,
                Seen::Duplicate => c.duplicates += 1,
            }
            // Under DSR the destination is the service port, not one of ours.
            let slot = c
                .by_port
                .get_mut(usize::from(p.dst_port.checked_sub(first_port)?))?;
            *slot += 1;
            (*slot == 1).then_some(p.dst_port)
        }
    }
}

struct Shared {
    plan: Plan,
    stop: AtomicBool,
    /// Per accepted port: already reported by some thread.
    port_seen: Vec<AtomicBool>,
    deadline_ns: std::sync::OnceLock<u64>,
}

/// Runs `clustergate-bench sink`.
///
/// # Errors
/// A flag out of range, the program or a socket that cannot be set up.
pub fn run(args: &Args) -> Result<()> {
    let plan = plan(args)?;
    let ifindex =
        ifindex_by_name(&args.iface).with_context(|| format!("--iface {}", args.iface))?;
    let mut prog = SinkProg::attach(&args.iface, ifindex)?;
    tracing::info!(
        iface = args.iface,
        mode = prog.mode,
        addr = %plan.expect.addr,
        ports = ?args.ports,
        return_path = args.return_path.name(),
        "sink XDP program attached"
    );

    let shared = Arc::new(Shared {
        port_seen: (0..args.ports.len())
            .map(|_| AtomicBool::new(false))
            .collect(),
        plan: plan.clone(),
        stop: AtomicBool::new(false),
        deadline_ns: std::sync::OnceLock::new(),
    });
    let stop_flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop_flag))
            .with_context(|| format!("registering a handler for signal {sig}"))?;
    }
    let iface = Iface {
        name: args.iface.clone(),
        ifindex,
        slot: 0,
    };
    let barrier = Arc::new(Barrier::new(plan.queues.len() + 1));
    let (opened_tx, opened_rx) = mpsc::channel::<Result<(u32, i32)>>();
    let mut handles = Vec::with_capacity(plan.queues.len());
    let ports_len = args.ports.len();
    for &queue in &plan.queues {
        let (shared, iface, barrier, opened, stop_flag) = (
            Arc::clone(&shared),
            iface.clone(),
            Arc::clone(&barrier),
            opened_tx.clone(),
            Arc::clone(&stop_flag),
        );
        let h = std::thread::Builder::new()
            .name(format!("sink-q{queue}"))
            .spawn(move || -> Result<Counts> {
                let ports = Ports::open(
                    std::slice::from_ref(&iface),
                    &[queue],
                    XskOptions {
                        ring_size: RING_SIZE,
                        zero_copy: ZeroCopy::Auto,
                        ..XskOptions::default()
                    },
                )
                .map_err(|e| crate::pktgen::open_error(&e));
                // Errors go to the main thread, which stops everyone.
                let _ = opened.send(match &ports {
                    Ok(p) => p
                        .ports()
                        .first()
                        .map(|s| (queue, s.fd()))
                        .context("no socket"),
                    Err(e) => Err(anyhow::anyhow!("{e:#}")),
                });
                barrier.wait();
                let counts = Counts::new(ports_len)?;
                match ports {
                    Ok(p) if !shared.stop.load(Ordering::Relaxed) => {
                        receive_loop(p, &shared, &stop_flag, counts)
                    }
                    _ => Ok(counts),
                }
            })
            .context("spawning a sink thread")?;
        handles.push(h);
    }
    drop(opened_tx);
    let mut first_err = None;
    for _ in 0..plan.queues.len() {
        let registered = opened_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("a sink thread died while opening"))
            .and_then(|r| r)
            .and_then(|(queue, fd)| prog.register_socket(queue, fd));
        if let Err(e) = registered {
            first_err.get_or_insert(e);
        }
    }
    if first_err.is_none() {
        let _ = shared
            .deadline_ns
            .set(mono_ns().saturating_add(plan.duration_ns));
        if let Err(e) = print_event(&SinkEvent::Ready) {
            first_err = Some(e.context("printing the ready line"));
        }
    }
    if first_err.is_some() {
        shared.stop.store(true, Ordering::Relaxed);
    }
    // The threads wait here until the sockets are registered (or not).
    barrier.wait();
    let mut total = Counts::new(args.ports.len())?;
    for h in handles {
        match h.join() {
            Ok(Ok(c)) => total.merge(&c)?,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("a sink thread panicked"));
            }
        }
    }
    let steer = prog.stats().map(SteerCounts::from).unwrap_or_default();
    prog.detach()
        .with_context(|| format!("detaching the sink's XDP program from {}", args.iface))?;
    if let Some(e) = first_err {
        return Err(e);
    }
    let r = result(args.backend, &total, steer, args.ports.first);
    if r.bad.total() > 0 {
        tracing::warn!(bad = ?r.bad, "frames failed their checks");
    }
    print_event(&SinkEvent::Result(r))
}

fn result(backend: u32, c: &Counts, steer: SteerCounts, first_port: u16) -> SinkResult {
    SinkResult {
        backend,
        received: c.received,
        ok: c.ok,
        bad: BadCounts::from_array(&c.bad),
        reordered: c.reordered,
        duplicates: c.duplicates,
        syn: c.syn,
        first_mono_ns: c.first_ns.unwrap_or(0),
        last_mono_ns: c.last_ns,
        latency_ns: c
            .latency
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
        by_port: c
            .by_port
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| (first_port + i as u16, n))
            .collect(),
        steer,
        rings: c.rings,
    }
}

fn receive_loop(
    mut ports: Ports,
    shared: &Shared,
    signalled: &AtomicBool,
    mut c: Counts,
) -> Result<Counts> {
    let plan = &shared.plan;
    let expect = plan.expect;
    let deadline = shared.deadline_ns.get().copied().unwrap_or(0);
    let mut order = Order::new(expect.flows, matches!(expect.path, PathExpect::Snat { .. }));
    let mut rx: Vec<FrameToken> = Vec::with_capacity(RX_BATCH);
    // Ports seen for the first time in a batch, reported after it.
    let mut fresh = [0u16; RX_BATCH];
    // When the ring was last found non-empty (for --busy-poll-us).
    let mut busy_since = 0u64;
    loop {
        ports.recycle();
        let n = ports.receive(0, &mut rx);
        let now = mono_ns();
        if n > 0 {
            busy_since = now;
            c.first_ns.get_or_insert(now);
            c.last_ns = now;
            let mut nfresh = 0;
            ports.with_frames(&mut rx, |frames, _lens| {
                for f in frames.iter() {
                    let checked = wire::check(&f.buf[..f.len.min(f.buf.len())], &expect);
                    if let Some(p) = account(&mut c, &mut order, checked, now, expect.first_port) {
                        fresh[nfresh] = p;
                        nfresh += 1;
                    }
                }
            });
            ports.release(&mut rx);
            if plan.report_first_port {
                for &port in &fresh[..nfresh] {
                    let i = usize::from(port - expect.first_port);
                    if shared
                        .port_seen
                        .get(i)
                        .is_some_and(|s| !s.swap(true, Ordering::Relaxed))
                    {
                        print_event(&SinkEvent::FirstPort { port, mono_ns: now })?;
                    }
                }
            }
        }
        if signalled.load(Ordering::Relaxed) || now >= deadline {
            break;
        }
        if n == 0 {
            if now.saturating_sub(busy_since) < plan.busy_poll_ns {
                // Stay runnable, but let whatever shares the core run.
                std::thread::yield_now();
            } else {
                ports.wait(IDLE_WAIT_MS);
            }
        }
    }
    if let Some(p) = ports.ports().first() {
        if let Ok(r) = p.ring_stats() {
            c.rings = RingCounts {
                rx_dropped: r.rx_dropped,
                rx_ring_full: r.rx_ring_full,
                rx_fill_ring_empty: r.rx_fill_ring_empty,
            };
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly.

    use clap::Parser;

    use super::*;
    use std::net::Ipv4Addr;

    use crate::layout::{backend_addr, flow_source_ip, CLIENT_MAC, GW_LAN_ADDR};
    use crate::wire::{Fields, L4Proto, Template};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(line: &str) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("sink").chain(line.split_whitespace())).map(|c| c.args)
    }

    fn err(line: &str) -> String {
        format!("{:#}", plan(&args(line).unwrap()).unwrap_err())
    }

    #[test]
    fn flags_are_checked_by_name() {
        let p = plan(&args("--backend 3").unwrap()).unwrap();
        assert_eq!(p.expect.addr, IpAddr::V4(backend_addr(3)));
        assert_eq!(p.expect.mac, backend_mac(3));
        assert_eq!((p.expect.first_port, p.expect.last_port), (8080, 8080));
        assert_eq!(p.duration_ns, 600_000_000_000);
        assert!(err("--backend 0").starts_with("--backend 0"));
        assert!(err("--backend 17").starts_with("--backend 17"));
        assert!(err("--backend 1 --flows 0").starts_with("--flows 0"));
        assert!(err("--backend 1 --queues 64").starts_with("--queues"));
        assert!(err("--backend 1 --queues 1,1").starts_with("--queues"));
        assert!(err("--backend 1 --duration-s 3601").starts_with("--duration-s 3601"));
        assert!(err("--backend 1 --busy-poll-us 10001").starts_with("--busy-poll-us 10001"));
        assert!(err("--backend 1 --accept-dst 10.0.0.1").starts_with("--accept-dst 10.0.0.1"));
        assert!(args("--backend 1 --ports 9000-8000").is_err());
        assert!(args("--backend 1 --ports 8080-9104").is_err());
        assert!(args("--backend 1 --ports x").is_err());
        assert!(args("").is_err(), "--backend is required");
        assert!(err("--backend 1 --services 0").starts_with("--services 0"));
        assert!(err("--backend 1 --gateway-addr 10.0.0.1").starts_with("--gateway-addr 10.0.0.1"));
        assert!(args("--backend 1 --snat-ports 0-10").is_err());
        assert!(args("--backend 1 --snat-ports 20-10").is_err());
        assert!(args("--backend 1 --snat-ports 20").is_err());
        assert!(args("--backend 1 --return-path other").is_err());
        assert_eq!(p.expect.path, PathExpect::Routed, "routed by default");
        let p =
            plan(&args("--backend 1 --return-path snat --snat-ports 1024-65535").unwrap()).unwrap();
        assert_eq!(
            p.expect.path,
            PathExpect::Snat {
                addr: GW_LAN_ADDR.into(),
                lo: 1024,
                hi: 65_535
            }
        );
        let p = plan(
            &args("--backend 1 --return-path dsr --services 7 --gateway-addr 198.18.2.9").unwrap(),
        )
        .unwrap();
        assert_eq!(
            p.expect.path,
            PathExpect::Dsr {
                gateway: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 9)),
                services: 7
            }
        );
        let a = args("--backend 2 --ports 8080-9103 --accept-dst 198.19.0.0").unwrap();
        assert_eq!(a.ports.len(), 1024);
        assert_eq!(
            plan(&a).unwrap().expect.addr,
            IpAddr::V4(Ipv4Addr::new(198, 19, 0, 0))
        );
        let p = plan(&args("--backend 2 --family 6 --return-path snat").unwrap()).unwrap();
        assert_eq!(p.expect.addr, backend_ip(Family::V6, 2));
        assert_eq!(
            p.expect.path,
            PathExpect::Snat {
                addr: gw_lan_ip(Family::V6),
                lo: 1024,
                hi: 29_999
            }
        );
        assert!(err("--backend 1 --family 6 --gateway-addr 198.18.2.1")
            .starts_with("--gateway-addr 198.18.2.1"));
        assert!(err("--backend 1 --family 6 --accept-dst 2001:db8::1")
            .starts_with("--accept-dst 2001:db8::1"));
    }

    #[test]
    fn snat_ports_must_stay_with_their_flow_and_not_be_shared() {
        let mut t = SnatTrack::new(10);
        assert_eq!(t.see(1, 5000, 8080), Ok(()));
        assert_eq!(t.see(1, 5000, 8080), Ok(()));
        assert_eq!(t.see(1, 5001, 8080), Err(Bad::SnatUnstable));
        // Another flow to the same destination port with the same port.
        assert_eq!(t.see(2, 5000, 8080), Err(Bad::SnatShared));
        // To another destination port it may.
        assert_eq!(t.see(3, 5000, 8081), Ok(()));
        assert_eq!(t.see(2, 5002, 8080), Ok(()));
        assert_eq!(t.see(2, 5002, 8080), Ok(()));
        // Beyond --flows: the wire check refuses those; nothing kept.
        assert_eq!(t.see(10, 5000, 8080), Ok(()));
    }

    #[test]
    fn snat_accounting_counts_unstable_ports_as_bad() {
        let e = Expect {
            mac: backend_mac(1),
            addr: backend_addr(1).into(),
            first_port: 8080,
            last_port: 8080,
            flows: 10,
            path: PathExpect::Snat {
                addr: GW_LAN_ADDR.into(),
                lo: 1024,
                hi: 29_999,
            },
        };
        let t = Template::new(L4Proto::Udp, 64, CLIENT_MAC, backend_mac(1)).unwrap();
        let mut c = Counts::new(1).unwrap();
        let mut o = Order::new(10, true);
        let mut buf = [0u8; 64];
        for (seq, port) in [(0, 2000), (1, 2000), (2, 2001), (3, 2000)] {
            let f = Fields {
                src: (GW_LAN_ADDR.into(), port),
                dst: (backend_addr(1).into(), 8080),
                flow: 7,
                seq,
                ts: 1_000,
                syn: false,
            };
            assert_eq!(t.write(&mut buf, &f), 64);
            account(&mut c, &mut o, wire::check(&buf, &e), 1_500, 8080);
        }
        let r = result(1, &c, SteerCounts::default(), 8080);
        assert_eq!((r.received, r.ok, r.bad.snat_unstable), (4, 3, 1));
        assert_eq!(r.bad.total(), 1);
        assert_eq!(r.by_port, vec![(8080, 3)]);
    }

    #[test]
    fn dsr_frames_are_not_counted_by_backend_port() {
        let mut c = Counts::new(1).unwrap();
        let mut o = Order::new(10, false);
        let p = wire::Probe {
            flow: 1,
            seq: 0,
            ts: 0,
            proto: L4Proto::Udp,
            src_port: 1025,
            dst_port: 80,
            syn: false,
        };
        assert_eq!(account(&mut c, &mut o, Ok(p), 10, 8080), None);
        assert_eq!((c.received, c.ok), (1, 1));
        assert_eq!(c.by_port, vec![0]);
    }

    #[test]
    fn order_counts_reordering_and_duplicates() {
        let mut o = Order::new(4, false);
        assert_eq!(o.see(1, 0), Seen::InOrder);
        assert_eq!(o.see(1, 5), Seen::InOrder);
        assert_eq!(o.see(1, 5), Seen::Duplicate);
        assert_eq!(o.see(1, 3), Seen::Reordered);
        assert_eq!(o.see(1, 9), Seen::InOrder);
        assert_eq!(o.see(2, 0), Seen::InOrder);
        assert_eq!(o.see(2, 0), Seen::Duplicate);
        assert_eq!(o.see(9, 0), Seen::InOrder, "out of range is ignored");
    }

    #[test]
    fn accounting_and_result_line() {
        let e = Expect {
            mac: backend_mac(1),
            addr: backend_addr(1).into(),
            first_port: 8080,
            last_port: 8081,
            flows: 10,
            path: PathExpect::Routed,
        };
        let t = Template::new(L4Proto::Tcp, 64, CLIENT_MAC, backend_mac(1)).unwrap();
        let mut c = Counts::new(2).unwrap();
        let mut o = Order::new(10, false);
        let mut buf = [0u8; 64];
        let mut first = Vec::new();
        for (seq, port, syn) in [
            (1, 8081, true),
            (2, 8081, false),
            (2, 8081, false),
            (0, 8080, false),
        ] {
            let f = Fields {
                src: flow_source_ip(Family::V4, 3),
                dst: (backend_addr(1).into(), port),
                flow: 3,
                seq,
                ts: 1_000,
                syn,
            };
            assert_eq!(t.write(&mut buf, &f), 64);
            first.extend(account(&mut c, &mut o, wire::check(&buf, &e), 1_500, 8080));
        }
        assert_eq!(first, vec![8081, 8080]);
        account(&mut c, &mut o, Err(Bad::Src), 2_000, 8080);
        // A timestamp in the future counts as zero latency.
        let f = Fields {
            src: flow_source_ip(Family::V4, 4),
            dst: (backend_addr(1).into(), 8080),
            flow: 4,
            seq: 7,
            ts: 5_000,
            syn: false,
        };
        assert_eq!(t.write(&mut buf, &f), 64);
        account(&mut c, &mut o, wire::check(&buf, &e), 2_000, 8080);
        c.first_ns = Some(1_500);
        c.last_ns = 2_000;
        let mut total = Counts::new(2).unwrap();
        total.merge(&c).unwrap();
        let r = result(1, &total, SteerCounts::default(), 8080);
        assert_eq!((r.received, r.ok, r.bad.src, r.bad.total()), (6, 5, 1, 1));
        assert_eq!((r.duplicates, r.reordered, r.syn), (1, 1, 1));
        assert_eq!(r.latency_ns, vec![(0, 1), (500, 4)]);
        assert_eq!(r.by_port, vec![(8080, 2), (8081, 3)]);
        let line = serde_json::to_string(&SinkEvent::Result(r.clone())).unwrap();
        assert!(line.starts_with(
            r#"{"event":"result","backend":1,"received":6,"ok":5,"bad":{"malformed":0,"magic":0,"ip_checksum":0,"l4_checksum":0,"dst_addr":0,"dst_port":0,"src":1,"dst_mac":0,"snat_addr":0,"snat_port":0,"snat_unstable":0,"snat_shared":0,"outer_checksum":0,"outer_addr":0,"outer_header":0,"ttl":0},"reordered":1,"duplicates":1,"syn":1,"first_mono_ns":1500,"last_mono_ns":2000,"latency_ns":[[0,1],[500,4]],"#
        ), "{line}");
        assert_eq!(
            serde_json::from_str::<SinkEvent>(&line).unwrap(),
            SinkEvent::Result(r.clone())
        );
        assert_eq!(serde_json::from_str::<SinkResult>(&line).unwrap(), r);
        assert_eq!(
            serde_json::to_string(&SinkEvent::Ready).unwrap(),
            r#"{"event":"ready"}"#
        );
        assert_eq!(
            serde_json::to_string(&SinkEvent::FirstPort {
                port: 8081,
                mono_ns: 9
            })
            .unwrap(),
            r#"{"event":"first-port","port":8081,"mono_ns":9}"#
        );
    }
}
