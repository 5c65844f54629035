//! `clustergate run`: the AF_XDP gateway.
//!
//! The main thread sets everything up (steering program, sockets through the
//! workers, next hops), drops the capabilities it no longer needs, and then
//! runs the management loop: it follows the snapshots (and keeps the
//! steering maps and the kept-resolved neighbours in step with them),
//! refreshes the next hops, answers resolution requests from the workers,
//! supervises the workers and stops everything on SIGTERM/SIGINT. Workers are
//! pinned threads running [`clustergate_dataplane::io::worker::run`].
//!
//! The return-path settings (`--snat-address`, `--snat-ports`,
//! `--encap-mtu`) are checked here too: the SNAT range against the node's
//! `ip_local_port_range`, then split between the workers; the steering
//! program learns the SNAT addresses and range, and the management loop
//! keeps the addresses in step with the node's when no `--snat-address`
//! names them.
//!
//! Node ports: the node's own addresses (every interface's, both families,
//! [`clustergate_dataplane::io::node_addrs`]) come with each next-hop
//! refresh. The workers hand them to the core when they change; the
//! management loop then re-syncs the steering program, whose `frontends`
//! map holds each node port once per node address the table's node-port
//! addresses select. A table whose node ports fall inside the SNAT range is
//! served, with one warning per generation naming them and the gauge
//! `clustergate_node_ports_in_snat_range`: a backend's reply to a SNAT port
//! that is also a node port cannot be told from a new node-port connection.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use clap::Args;
use clustergate_dataplane::conntrack::{self, Conntrack};
use clustergate_dataplane::flow::{addr16, ip_from16, Addr16};
use clustergate_dataplane::io::handoff;
use clustergate_dataplane::io::nexthop::{self, NextHopError, NextHops, Resolver};
use clustergate_dataplane::io::node_addrs::NodeAddrSet;
use clustergate_dataplane::io::steer::{self, Steering, SyncStats};
use clustergate_dataplane::io::worker::{self, OpenedSocket, Shared, WorkerSpec, WorkerStats};
use clustergate_dataplane::io::xsk::{Iface, XskOptions, ZeroCopy};
use clustergate_dataplane::pipeline::Ownership;
use clustergate_dataplane::snapshot::{self, PollOutcome, TableHandle, Watcher};
use clustergate_dataplane::snat::{
    self, parse_local_port_range, PortRange, ReturnConfig, LINUX_LOCAL_PORTS, MAX_SNAT_ADDRS,
    NODE_PORTS,
};
use clustergate_dataplane::table::{FrontendKind, Table};
use tracing::{error, info, warn};

use crate::gateway_http::{self, Status, TableStatus};
use crate::link_watch::{self, Action, LinkWatch};

/// Flags of `clustergate run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface to serve (repeat for the two-armed topology: client side and
    /// backend side). Every worker serves every interface.
    #[arg(long = "interface", required = true, value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Snapshot directory written by `clustergate-control`.
    #[arg(long, default_value = snapshot::DEFAULT_DIR)]
    pub shm_dir: PathBuf,
    /// Cores to pin one worker each on, e.g. `0,1` or `2-5`.
    #[arg(long, default_value = "0", value_parser = parse_cores)]
    pub cores: CoreList,
    /// Queues per interface (0..N); worker `w` polls queues w, w+W, ….
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=steer::MAX_QUEUES as i64))]
    pub queues: u32,
    /// Prometheus metrics, `/healthz`, `/livez` and the inspection API
    /// (`/api/v1/*`, `clustergate inspect`) on this address.
    #[arg(long, default_value = "127.0.0.1:10257")]
    pub metrics: SocketAddr,
    /// Also export packets, bytes and new flows per frontend
    /// (`clustergate_frontend_*`): one series per frontend and metric, so
    /// off by default.
    #[arg(long)]
    pub metrics_per_frontend: bool,
    /// The proxy name this gateway serves (control's `--proxy-name`); a label
    /// on every metric.
    #[arg(long, default_value = "clustergate")]
    pub proxy_name: String,
    /// Connection-table capacity (flows per IP family).
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
    pub flows: u32,
    /// Zero-copy: `auto` tries it and falls back to copy mode; `never`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "never"])]
    pub zero_copy: String,
    /// Entries in each AF_XDP ring (a power of two, 64..=16384).
    #[arg(long, default_value_t = 2048, value_parser = parse_ring)]
    pub ring_size: u32,
    /// Snapshot poll interval in milliseconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub poll_ms: u64,
    /// The gateway's own address for source NAT and as the outer source of
    /// DSR's encapsulation. Repeat it: once per family, or several times per
    /// family (at most 16) to multiply the SNAT ports. Without it, a flow
    /// leaves with the address the kernel would choose for the route to its
    /// backend.
    #[arg(long = "snat-address", value_name = "ADDR", value_parser = parse_snat_address)]
    pub snat_addresses: Vec<IpAddr>,
    /// Source NAT ports, `LO-HI`, split between the workers. Default: the
    /// longest run in 1024-65535 outside the node's ip_local_port_range and
    /// the NodePort range 30000-32767 (1024-29999 with Linux's defaults).
    #[arg(long, value_name = "LO-HI", value_parser = parse_port_range)]
    pub snat_ports: Option<PortRange>,
    /// Largest IP packet towards the backends once encapsulated for DSR
    /// (576..=9216); bigger ones are answered with ICMP fragmentation
    /// needed / packet too big. Default: the smallest MTU of the interfaces.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(576..=9216))]
    pub encap_mtu: Option<u16>,
    /// Idle timeout of an established TCP flow (kube-proxy's flag): seconds,
    /// or a number with s, m or h.
    #[arg(long, value_name = "DURATION", default_value = "86400", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_established: u32,
    /// Idle timeout of a TCP flow after a FIN (kube-proxy's flag).
    #[arg(long, value_name = "DURATION", default_value = "120", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_close_wait: u32,
    /// Idle timeout of a UDP (and SCTP) flow the backend has not answered.
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = parse_timeout)]
    pub conntrack_udp_timeout: u32,
    /// Idle timeout of a UDP (and SCTP) flow the backend has answered.
    #[arg(long, value_name = "DURATION", default_value = "120", value_parser = parse_timeout)]
    pub conntrack_udp_timeout_stream: u32,
    /// Exit after this many seconds (0: run until SIGTERM); for tests.
    #[arg(long, default_value_t = 0)]
    pub exit_after_s: u64,
    /// Tests only: the first worker panics after receiving this many frames.
    #[arg(long, hide = true)]
    pub inject_worker_fault: Option<u64>,
}

/// A parsed `--cores`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

fn parse_cores(s: &str) -> Result<CoreList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a
            .parse()
            .map_err(|_| format!("{part:?} is not a core number or range"))?;
        let b: usize = b
            .parse()
            .map_err(|_| format!("{part:?} is not a core number or range"))?;
        if a > b {
            return Err(format!("range {part:?} runs backwards"));
        }
        for c in a..=b {
            if out.contains(&c) {
                return Err(format!("core {c} is listed twice"));
            }
            out.push(c);
        }
    }
    if out.is_empty() || out.len() > 1024 {
        return Err("give 1 to 1024 cores".into());
    }
    Ok(CoreList(out))
}

fn parse_ring(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(64..=16384).contains(&v) || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two in 64..=16384"));
    }
    Ok(v)
}

/// Where the node's ephemeral ports are configured (per network namespace).
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Longest conntrack timeout the flags take: 30 days.
const MAX_TIMEOUT_S: u64 = 30 * 86_400;

/// `--snat-address`: an address the gateway can put on the wire as its own.
pub fn parse_snat_address(s: &str) -> Result<IpAddr, String> {
    let a: IpAddr = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))?;
    let why = match a {
        _ if a.is_unspecified() => Some("unspecified"),
        _ if a.is_multicast() => Some("multicast"),
        _ if a.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4 == Ipv4Addr::BROADCAST => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("IPv4-mapped (give the IPv4 address itself)")
        }
        _ => None,
    };
    match why {
        Some(w) => Err(format!(
            "{a} is {w}: a source address must be one of the node's unicast addresses"
        )),
        None => Ok(a),
    }
}

/// `--snat-ports`.
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    s.parse()
}

/// A conntrack timeout: seconds, or a number with `s`, `m` or `h`
/// (`30`, `90s`, `2m`, `24h`), from 1 s to 30 days.
pub fn parse_timeout(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(format!(
                "{s:?} is not a timeout: give seconds (30) or a number with s, m or h (24h)"
            ))
        }
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a timeout: give seconds (30) or a number with s, m or h (24h)")
    })?;
    let secs = n.saturating_mul(mult);
    if !(1..=MAX_TIMEOUT_S).contains(&secs) {
        return Err(format!(
            "{s:?} is {secs} s: a timeout must be from 1 s to {MAX_TIMEOUT_S} s (30 days)"
        ));
    }
    Ok(secs as u32)
}

/// The `--snat-address` overrides per family (IPv4, IPv6), refusing
/// repeats and more than [`MAX_SNAT_ADDRS`] in a family.
pub fn snat_overrides(addrs: &[IpAddr]) -> Result<(Vec<Addr16>, Vec<Addr16>), String> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for &a in addrs {
        let (list, family) = if a.is_ipv4() {
            (&mut v4, "IPv4")
        } else {
            (&mut v6, "IPv6")
        };
        if list.contains(&addr16(a)) {
            return Err(format!("--snat-address {a} is given twice"));
        }
        if list.len() == MAX_SNAT_ADDRS {
            return Err(format!(
                "--snat-address: more than {MAX_SNAT_ADDRS} {family} addresses (at {a})"
            ));
        }
        list.push(addr16(a));
    }
    Ok((v4, v6))
}

/// The node's `ip_local_port_range`, or Linux's default (said so) when it
/// cannot be read.
fn node_local_ports() -> PortRange {
    match std::fs::read_to_string(LOCAL_PORT_RANGE) {
        Ok(text) => match parse_local_port_range(&text) {
            Ok(r) => r,
            Err(e) => {
                warn!("{LOCAL_PORT_RANGE}: {e}; assuming Linux's default {LINUX_LOCAL_PORTS}");
                LINUX_LOCAL_PORTS
            }
        },
        Err(e) => {
            warn!(
                "cannot read {LOCAL_PORT_RANGE}: {e}; assuming Linux's default {LINUX_LOCAL_PORTS}"
            );
            LINUX_LOCAL_PORTS
        }
    }
}

/// The SNAT range: `flag`, refused when it overlaps the node's ephemeral
/// ports `local`, or the default around them. The second value is a warning
/// to log (an explicit range over the NodePorts).
pub fn choose_snat_ports(
    flag: Option<PortRange>,
    local: PortRange,
) -> Result<(PortRange, Option<String>), String> {
    let Some(r) = flag else {
        let d = snat::default_range(local);
        if d.overlaps(&local) {
            return Err(format!(
                "the node's ip_local_port_range {local} leaves no default SNAT range: give --snat-ports"
            ));
        }
        return Ok((d, None));
    };
    if r.overlaps(&local) {
        return Err(format!(
            "--snat-ports {r} overlaps the node's ip_local_port_range {local} \
             (net.ipv4.ip_local_port_range): replies to the node's own connections would be taken \
             for source-NAT replies; choose a range outside it (the default here is {})",
            snat::default_range(local)
        ));
    }
    let warning = r.overlaps(&NODE_PORTS).then(|| {
        format!(
            "--snat-ports {r} overlaps the NodePort range {NODE_PORTS}: a source-NAT port that is \
             also a NodePort of a Service makes replies and new connections indistinguishable"
        )
    });
    Ok((r, warning))
}

/// The return-path settings of every worker, from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnPlan {
    /// `--snat-address` for IPv4.
    pub v4: Vec<Addr16>,
    /// `--snat-address` for IPv6.
    pub v6: Vec<Addr16>,
    /// The whole SNAT range.
    pub range: PortRange,
    /// Worker w's share: `shares[w]`.
    pub shares: Vec<PortRange>,
    /// The DSR encapsulation MTU.
    pub encap_mtu: u16,
}

impl ReturnPlan {
    /// Worker `w`'s [`ReturnConfig`].
    #[must_use]
    pub fn worker(&self, w: usize) -> ReturnConfig {
        ReturnConfig {
            snat_v4: self.v4.clone(),
            snat_v6: self.v6.clone(),
            ports: self.shares[w],
            encap_mtu: self.encap_mtu,
        }
    }

    /// The addresses the steering program takes for SNAT addresses: per
    /// family the `--snat-address` overrides, or else every address of the
    /// served interfaces (and the preferred sources of their routes).
    #[must_use]
    pub fn steered_addrs(&self, hops: &NextHops) -> Vec<Addr16> {
        let mut out: Vec<Addr16> = Vec::new();
        for (overrides, v4) in [(&self.v4, true), (&self.v6, false)] {
            if overrides.is_empty() {
                out.extend(
                    hops.local_addrs()
                        .iter()
                        .filter(|a| ip_from16(**a).is_ipv4() == v4),
                );
            } else {
                out.extend_from_slice(overrides);
            }
        }
        out
    }
}

/// Checks the return-path flags (before anything on the node changes).
fn plan_returns(args: &RunArgs, ifaces: &[Iface], workers: usize) -> Result<ReturnPlan> {
    let (v4, v6) = snat_overrides(&args.snat_addresses).map_err(anyhow::Error::msg)?;
    let local = node_local_ports();
    let (range, warning) = choose_snat_ports(args.snat_ports, local).map_err(anyhow::Error::msg)?;
    if let Some(w) = warning {
        warn!("{w}");
    }
    // Each worker owns a partition of the flows and takes, anywhere in the
    // range, the ports whose replies come back to its partition (a keyed
    // hash of address, port and protocol): about 1/W of them each. A range
    // with fewer ports than workers would leave some without any.
    range
        .split(workers)
        .map_err(|e| anyhow::anyhow!("--snat-ports {range}: {e}"))?;
    let shares = vec![range; workers];
    let encap_mtu = match args.encap_mtu {
        Some(m) => m,
        None => {
            let mut smallest: Option<(u32, &str)> = None;
            for i in ifaces {
                let mtu = nexthop::mtu_by_index(i.ifindex)
                    .with_context(|| format!("reading the MTU of --interface {}", i.name))?;
                if smallest.is_none_or(|(m, _)| mtu < m) {
                    smallest = Some((mtu, &i.name));
                }
            }
            let (mtu, name) = smallest.context("no interface to read an MTU from")?;
            info!(
                interface = name,
                mtu, "DSR encapsulation MTU: the smallest of the served interfaces (--encap-mtu)"
            );
            u16::try_from(mtu).unwrap_or(u16::MAX)
        }
    };
    info!(
        range = %range,
        workers,
        local_port_range = %local,
        "SNAT ports (each worker takes those whose replies hash to its partition of the flows)"
    );
    if !v4.is_empty() || !v6.is_empty() {
        info!(
            addresses = ?args.snat_addresses,
            "SNAT addresses (--snat-address)"
        );
    }
    Ok(ReturnPlan {
        v4,
        v6,
        range,
        shares,
        encap_mtu,
    })
}

/// Warns about each `--snat-address` that is not an address of this node:
/// the backends' replies to it reach the gateway only if something routes
/// it here (the kernel does not answer ARP or NDP for it).
fn warn_foreign_snat(plan: &ReturnPlan, hops: &NextHops) {
    for a in plan.v4.iter().chain(&plan.v6) {
        if !hops.local_addrs().contains(a) {
            warn!(
                address = %ip_from16(*a),
                "--snat-address is not an address of the served interfaces: replies to it come back only if it is routed to this node"
            );
        }
    }
}

/// Brings the steering program's SNAT addresses to `plan` and `hops`.
fn steer_snat(steering: &mut Steering, plan: &ReturnPlan, hops: &NextHops) {
    let addrs = plan.steered_addrs(hops);
    match steering.set_snat(&addrs, Some(plan.range)) {
        Ok(s) if s.added > 0 || s.removed > 0 => info!(
            addresses = %addrs.iter().map(|a| ip_from16(*a).to_string()).collect::<Vec<_>>().join(", "),
            added = s.added,
            removed = s.removed,
            "steering: SNAT addresses updated"
        ),
        Ok(_) => {}
        Err(e) => error!("updating the steering program's SNAT addresses: {e}"),
    }
}

/// Makes the steering maps match `table` (and the node addresses last set),
/// logging what changed; `why` says what prompted it. `None` when it failed
/// (the caller tries again at the next refresh).
///
/// The log says how much was looked at: `changed_frontends=N` when only
/// the frontends whose block changed were (most table changes), or
/// `whole=REASON` ([`steer::WholeSync`]) when every frontend was.
fn sync_steering(steering: &mut Steering, table: &Table, why: &str) -> Option<SyncStats> {
    match steering.sync(table) {
        Ok(s) => {
            match s.scope {
                steer::SyncScope::Frontends { changed } => info!(
                    generation = table.generation(),
                    frontends = s.frontends,
                    node_port_keys = s.node_port_keys,
                    backends = s.backends,
                    added = s.added,
                    removed = s.removed,
                    changed_frontends = changed,
                    "steering maps updated ({why})"
                ),
                steer::SyncScope::Whole(w) => info!(
                    generation = table.generation(),
                    frontends = s.frontends,
                    node_port_keys = s.node_port_keys,
                    backends = s.backends,
                    added = s.added,
                    removed = s.removed,
                    whole = %w,
                    "steering maps updated ({why})"
                ),
            }
            Some(s)
        }
        Err(e) => {
            error!("updating the steering maps ({why}): {e}");
            None
        }
    }
}

/// Hands the node's addresses to the steering program; true when they
/// changed (the caller then syncs it).
fn steer_node_addrs(steering: &mut Steering, node: &NodeAddrSet) -> bool {
    let changed = steering.set_node_addrs(node.addrs());
    if changed {
        info!(
            addresses = %node.addrs().iter().map(|a| ip_from16(*a).to_string()).collect::<Vec<_>>().join(", "),
            "the node's addresses (node ports are served on those --nodeport-addresses selects)"
        );
    }
    changed
}

/// The node-port frontends of `table` whose port lies in the SNAT range,
/// as `0.0.0.0:30080/tcp`.
pub fn node_ports_in_snat_range(table: &Table, range: PortRange) -> Vec<String> {
    if !table.has_node_ports() {
        return Vec::new();
    }
    table
        .frontends()
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort as u8 && range.contains(f.port))
        .map(|f| {
            steer::SteerKey {
                addr: f.addr,
                port: f.port,
                proto: f.proto,
            }
            .to_string()
        })
        .collect()
}

/// What the endpoints show of `table`, warning (once: call it once per
/// generation) about node ports inside the SNAT range.
fn table_status(table: &Table, plan: &ReturnPlan) -> TableStatus {
    let overlap = node_ports_in_snat_range(table, plan.range);
    if !overlap.is_empty() {
        warn!(
            generation = table.generation(),
            snat_ports = %plan.range,
            frontends = %overlap.join(", "),
            "{} node port(s) inside the SNAT range (--snat-ports): a backend's reply to such a \
             port cannot be told from a new node-port connection; move the SNAT range or the \
             node ports",
            overlap.len()
        );
    }
    TableStatus::of(table, overlap.len())
}

/// How often the served interfaces are looked up by name (link_watch).
const LINK_PROBE: Duration = Duration::from_millis(250);
/// How often the next hops are re-read from the kernel.
const REFRESH_HOPS: Duration = Duration::from_millis(500);
/// The same address is asked to be resolved at most this often.
const TRIGGER_EVERY: Duration = Duration::from_millis(500);
/// After a new table, the backends' neighbours appear within milliseconds:
/// refresh this often for [`EAGER_FOR`], not every [`REFRESH_HOPS`], so the
/// first packets to new backends are not dropped for half a second. (A
/// resolution request refreshes once at once; it does not extend this, so a
/// neighbour that never resolves cannot keep the dumps running every 20 ms.)
const EAGER_REFRESH: Duration = Duration::from_millis(20);
/// How long eager refreshing lasts.
const EAGER_FOR: Duration = Duration::from_secs(1);

struct WorkerHandle {
    core: usize,
    stats: Arc<Mutex<WorkerStats>>,
    join: Option<JoinHandle<()>>,
}

/// Runs the gateway until SIGTERM/SIGINT (or `--exit-after-s`).
pub fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    // Interfaces and cores first: a typo is reported before anything changes.
    let mut ifaces = Vec::new();
    for (slot, name) in args.interfaces.iter().enumerate() {
        if ifaces.iter().any(|i: &Iface| &i.name == name) {
            bail!("--interface {name} is given twice");
        }
        let ifindex =
            nexthop::ifindex_by_name(name).with_context(|| format!("--interface {name}"))?;
        let rxq = rx_queues(name);
        if let Some(n) = rxq {
            if args.queues > n {
                bail!(
                    "--queues {} but interface {name} has {n} receive queue(s)",
                    args.queues
                );
            }
        }
        ifaces.push(Iface {
            name: name.clone(),
            ifindex,
            slot: slot as u32,
        });
    }
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    for c in &args.cores.0 {
        if !available.contains(c) {
            bail!("--cores: core {c} is not available to this process (available: {available:?})");
        }
    }
    keep_off_worker_cores(&available, &args.cores.0);
    let workers = args.cores.0.len() as u32;
    if workers > args.queues {
        bail!(
            "--cores lists {workers} cores but --queues is {}: every worker needs a queue",
            args.queues
        );
    }
    let plan = plan_returns(&args, &ifaces, workers as usize)?;
    let xsk = XskOptions {
        ring_size: args.ring_size,
        zero_copy: if args.zero_copy == "never" {
            ZeroCopy::Never
        } else {
            ZeroCopy::Auto
        },
        ..XskOptions::default()
    };

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }

    // The table: whatever is published now (or an empty one until control
    // publishes).
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(&args.shm_dir, Arc::clone(&handle));
    let first = watcher.poll();
    report_poll(&watcher, first);

    let ct = Arc::new(Conntrack::new(&conntrack::Config {
        capacity: args.flows as usize,
        timeouts: conntrack::Timeouts {
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_fin: args.conntrack_tcp_timeout_close_wait,
            datagram: args.conntrack_udp_timeout,
            datagram_replied: args.conntrack_udp_timeout_stream,
            ..conntrack::Timeouts::default()
        },
        // A partition per worker: each owns its flows, holds its partition
        // per batch, and hands the others their frames (io::handoff).
        partitions: workers as usize,
        ..conntrack::Config::default()
    }));

    let named: Vec<(String, u32)> = ifaces.iter().map(|i| (i.name.clone(), i.ifindex)).collect();
    let mut steering = Steering::load(&named).context("loading the XDP steering program")?;
    for (i, m) in ifaces.iter().zip(steering.attach_modes()) {
        info!(interface = %i.name, "XDP steering program attached ({m:?} mode)");
    }
    let served: Vec<u32> = ifaces.iter().map(|i| i.ifindex).collect();
    let mut resolver = Resolver::new(&served).context("opening netlink for next hops")?;
    let hops = Arc::new(ArcSwap::from_pointee(
        resolver
            .refresh()
            .context("reading routes and neighbours")?,
    ));
    let table = handle.load_full();
    steer_node_addrs(&mut steering, hops.load().node_addrs());
    let synced = steering
        .sync(&table)
        .context("filling the steering maps from the table")?;
    info!(
        frontends = synced.frontends,
        node_port_keys = synced.node_port_keys,
        backends = synced.backends,
        "steering maps filled"
    );
    let first_table = table_status(&table, &plan);
    keep_backends_resolved(&mut resolver, &steering);
    warn_foreign_snat(&plan, &hops.load());
    steer_snat(&mut steering, &plan, &hops.load());

    let (resolve_tx, resolve_rx) = sync_channel::<IpAddr>(1024);
    let shared = Shared {
        table: Arc::clone(&handle),
        hops: Arc::clone(&hops),
        conntrack: Arc::clone(&ct),
        stop: Arc::clone(&stop),
        resolve: resolve_tx,
        epoch: started,
        panic_after_rx: None,
        // With several workers, a frame that reached a worker other than its
        // flow's owner is copied to the owner through these rings.
        handoff: (workers > 1).then(|| {
            Arc::new(handoff::Mesh::new(
                workers as usize,
                handoff::HANDOFF_SLOTS,
                xsk.frame_size as usize,
            ))
        }),
    };

    // Workers: each pins itself, opens its sockets, reports them, drops
    // every capability, and polls.
    let (opened_tx, opened_rx) = sync_channel::<(usize, Result<Vec<OpenedSocket>, String>)>(64);
    let mut handles = Vec::new();
    for (w, &core) in args.cores.0.iter().enumerate() {
        let queues: Vec<u32> = (0..args.queues)
            .filter(|q| q % workers == w as u32)
            .collect();
        let spec = WorkerSpec {
            ifaces: ifaces.clone(),
            queues,
            xsk,
            ret: plan.worker(w),
            own: Ownership {
                index: w as u16,
                count: workers as u16,
                snat: plan.range,
            },
        };
        let mut shared = shared.clone();
        if w == 0 {
            shared.panic_after_rx = args.inject_worker_fault;
        }
        let stats = Arc::new(Mutex::new(WorkerStats::default()));
        let stats2 = Arc::clone(&stats);
        let opened_tx = opened_tx.clone();
        let join = std::thread::Builder::new()
            .name(format!("cg-worker-{core}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    warn!(core, "could not pin the worker to its core");
                }
                match worker::open(&spec) {
                    Ok((ports, opened)) => {
                        let _ = opened_tx.send((w, Ok(opened)));
                        drop(opened_tx);
                        if let Err(e) = drop_all_caps() {
                            warn!(core, "could not drop the worker's capabilities: {e}");
                        }
                        worker::run(ports, &spec, &shared, &stats2);
                    }
                    Err(e) => {
                        let _ = opened_tx.send((w, Err(e.to_string())));
                    }
                }
            })
            .context("spawning a worker thread")?;
        handles.push(WorkerHandle {
            core,
            stats,
            join: Some(join),
        });
    }
    drop(opened_tx);
    let mut setup_error = None;
    for _ in 0..handles.len() {
        match opened_rx.recv_timeout(Duration::from_secs(10)) {
            Ok((_, Ok(sockets))) => {
                for s in sockets {
                    if let Err(e) = steering.register_socket(s.slot, s.queue, s.fd) {
                        setup_error.get_or_insert_with(|| format!("{e}"));
                    }
                }
            }
            Ok((w, Err(e))) => {
                setup_error
                    .get_or_insert_with(|| format!("worker on core {}: {e}", args.cores.0[w]));
            }
            Err(_) => {
                setup_error
                    .get_or_insert_with(|| "a worker did not open its sockets within 10 s".into());
                break;
            }
        }
    }
    if let Some(e) = setup_error {
        stop.store(true, Ordering::Relaxed);
        join_all(&mut handles);
        let _ = steering.detach();
        bail!("setting up the AF_XDP sockets: {e}");
    }
    // Set-up is done: keep only what the management loop needs.
    if let Err(e) = keep_caps(&[caps::Capability::CAP_NET_ADMIN, caps::Capability::CAP_BPF]) {
        warn!("could not drop capabilities: {e}");
    }
    info!(
        interfaces = ?args.interfaces,
        cores = ?args.cores.0,
        queues = args.queues,
        generation = handle.generation(),
        "gateway running"
    );

    let status = Arc::new(Mutex::new(Status {
        table: first_table,
        ..Status::default()
    }));
    let http = gateway_http::Server {
        proxy_name: args.proxy_name.clone(),
        status: Arc::clone(&status),
        workers: handles
            .iter()
            .map(|h| (h.core, Arc::clone(&h.stats)))
            .collect(),
        conntrack: Arc::clone(&ct),
        snat_ports: args
            .cores
            .0
            .iter()
            .copied()
            .zip(plan.shares.clone())
            .collect(),
        table: Arc::clone(&handle),
        epoch: started,
        per_frontend: args.metrics_per_frontend,
    };
    gateway_http::spawn(args.metrics, http)
        .with_context(|| format!("--metrics {}", args.metrics))?;

    let mut links = LinkWatch::new(named);
    let outcome = manage(
        &args,
        &stop,
        &mut links,
        &mut watcher,
        &mut steering,
        &mut resolver,
        &hops,
        &plan,
        &resolve_rx,
        &mut handles,
        &status,
        &ct,
        started,
    );
    stop.store(true, Ordering::Relaxed);
    join_all(&mut handles);
    match steering.detach() {
        Ok(()) => info!("XDP steering program detached"),
        Err(e) => error!("detaching the XDP program: {e}"),
    }
    outcome
}

#[allow(clippy::too_many_arguments)] // reason: the management loop's state, kept explicit
fn manage(
    args: &RunArgs,
    stop: &AtomicBool,
    links: &mut LinkWatch,
    watcher: &mut Watcher,
    steering: &mut Steering,
    resolver: &mut Resolver,
    hops: &ArcSwap<NextHops>,
    plan: &ReturnPlan,
    resolve_rx: &Receiver<IpAddr>,
    handles: &mut [WorkerHandle],
    status: &Mutex<Status>,
    ct: &Conntrack,
    started: Instant,
) -> Result<()> {
    let mut last_refresh = Instant::now();
    let mut last_linger = Instant::now();
    // Backends that left the table with TCP connections still on them (or,
    // until the next look, that left it lately: see `LINGER_COALESCE`).
    let mut lingering: BTreeSet<steer::SteerKey> = BTreeSet::new();
    // When the connections must be looked at again, after backends left
    // within `LINGER_COALESCE` of the last look.
    let mut linger_due: Option<Instant> = None;
    // The table the last apply saw (to tell what left the table).
    let mut previous: Option<Arc<Table>> = None;
    let mut eager_until = Instant::now() + EAGER_FOR;
    let mut triggered: HashMap<IpAddr, Instant> = HashMap::new();
    let handle = Arc::clone(watcher.handle());
    let mut applied_at = (handle.generation() > 0).then(std::time::SystemTime::now);
    let mut node = Arc::clone(hops.load().node_addrs());
    let mut table_st = None;
    // A steering sync failed: retried at each refresh until it succeeds.
    let mut resync = false;
    // The backends' neighbours must be looked at again (an address came or
    // went, or the last look failed).
    let mut resolve = false;
    let poll = Duration::from_millis(args.poll_ms);
    let mut last_link_probe = Instant::now();
    // Snapshots are followed on a thread of their own, so that a new table
    // reaches the workers at once, whatever this loop is doing (the steering
    // sync after a large table takes tens of milliseconds). It says here
    // when it applied one; this loop then brings the rest to it.
    let snapshots = Mutex::new(watcher.stats.clone());
    let (applied_tx, applied_rx) = std::sync::mpsc::channel::<()>();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let follower = std::thread::Builder::new()
            .name("snapshots".into())
            .spawn_scoped(scope, || {
                follow_snapshots(watcher, stop, &done, poll, &snapshots, &applied_tx)
            })
            .context("starting the snapshot thread")?;
        let mut applied = false;
        let result = (|| -> Result<()> {
            loop {
                if stop.load(Ordering::Relaxed) {
                    info!("stop requested: draining the workers");
                    return Ok(());
                }
                if args.exit_after_s > 0
                    && started.elapsed() >= Duration::from_secs(args.exit_after_s)
                {
                    info!("--exit-after-s reached");
                    return Ok(());
                }
                // A worker that left its loop while we were not stopping faulted.
                for h in handles.iter_mut() {
                    if h.join.as_ref().is_some_and(JoinHandle::is_finished) {
                        let why = match h.join.take().map(JoinHandle::join) {
                            Some(Err(p)) => panic_message(&p),
                            _ => "left its loop".to_string(),
                        };
                        error!(core = h.core, "worker faulted: {why}");
                        if let Ok(mut s) = status.lock() {
                            s.fault = Some(format!("worker on core {} faulted: {why}", h.core));
                        }
                        bail!("worker on core {} faulted: {why}", h.core);
                    }
                }

                // A served interface that disappeared: said once, then reminded
                // with back-off; exit when it returns (see link_watch). Asked of
                // the kernel every LINK_PROBE, not every poll.
                if last_link_probe.elapsed() >= LINK_PROBE {
                    last_link_probe = Instant::now();
                    probe_links(links, last_link_probe)?;
                }

                while applied_rx.try_recv().is_ok() {
                    applied = true;
                }
                if std::mem::take(&mut applied) {
                    let table = handle.load_full();
                    // Before the sync, so that a backend that left keeps its key.
                    // Only a backend that left the table can linger: a change that
                    // removed none skips the connection scan. The scan costs the
                    // connection table, so in a burst of changes it runs at most
                    // every LINGER_COALESCE: in between, the TCP backends that
                    // left stay steered until it does (as lingering ones would).
                    let in_place = previous.as_ref().map(|p| left_backends(p, &table));
                    // Every frontend where it was, with its kind: what the
                    // status counts did not change.
                    let same_frontends = matches!(in_place, Some(Some(_)));
                    let left = in_place.zip(previous.as_ref()).map(|(left, p)| match left {
                        // The frontends moved: whether any backend left.
                        None if !backends_left(p, &table) => Some(BTreeSet::new()),
                        left => left,
                    });
                    let now = Instant::now();
                    match left {
                        Some(Some(left)) if left.is_empty() && lingering.is_empty() => {}
                        Some(Some(left)) if now.duration_since(last_linger) < LINGER_COALESCE => {
                            let mut keys = lingering.clone();
                            keys.extend(left);
                            if steering.set_lingering(keys.clone()) {
                                lingering = keys;
                            }
                            linger_due.get_or_insert(last_linger + LINGER_COALESCE);
                        }
                        _ => {
                            lingering = steer_lingering(steering, ct, &table, started);
                            last_linger = now;
                            linger_due = None;
                        }
                    }
                    previous = Some(Arc::clone(&table));
                    let synced = sync_steering(steering, &table, "new table");
                    resync = synced.is_none();
                    let addrs_changed = synced.is_none_or(|s| s.backend_addrs_changed);
                    resolve |= addrs_changed;
                    // Counted (and node ports in the SNAT range warned
                    // about) when the frontends changed, not per change:
                    // the status keeps the last counts.
                    if !same_frontends {
                        table_st = Some(table_status(&table, plan));
                    }
                    // Most endpoint changes keep the backend addresses (a
                    // port moved): the neighbours are looked at again only
                    // when an address came or went.
                    if std::mem::take(&mut resolve) {
                        resolve = !keep_backends_resolved(resolver, steering);
                    }
                    applied_at = Some(std::time::SystemTime::now());
                    // New backend addresses get their neighbours within
                    // milliseconds: look at them often for a while. A change
                    // that moved only ports needs no neighbour.
                    if addrs_changed {
                        eager_until = Instant::now() + EAGER_FOR;
                    }
                }

                let now = Instant::now();
                // Backends kept for their TCP connections are let go once
                // those end; those that left in a burst are looked at once
                // it is LINGER_COALESCE old.
                if linger_due.is_some_and(|d| now >= d)
                    || (!lingering.is_empty() && now.duration_since(last_linger) >= LINGER_EVERY)
                {
                    let table = handle.load_full();
                    let before = lingering.clone();
                    lingering = steer_lingering(steering, ct, &table, started);
                    linger_due = None;
                    if lingering != before {
                        let synced =
                            sync_steering(steering, &table, "backends without connections let go");
                        resync |= synced.is_none();
                        resolve |= synced.is_none_or(|s| s.backend_addrs_changed);
                    }
                    last_linger = now;
                }
                let since = now.duration_since(last_refresh);
                let mut refresh =
                    since >= REFRESH_HOPS || (now < eager_until && since >= EAGER_REFRESH);
                while let Ok(addr) = resolve_rx.try_recv() {
                    let due = triggered
                        .get(&addr)
                        .is_none_or(|t| now.duration_since(*t) >= TRIGGER_EVERY);
                    if due {
                        triggered.insert(addr, now);
                        if let Err(e) = resolver.trigger(addr) {
                            warn!(%addr, "asking the kernel to resolve a neighbour: {e}");
                        }
                        refresh = true;
                    }
                }
                triggered.retain(|_, t| now.duration_since(*t) < TRIGGER_EVERY * 4);
                // While an interface is gone every refresh would fail the same way.
                if refresh && !links.is_lost() {
                    match resolver.refresh() {
                        Ok(h) => {
                            // The node's addresses may have changed with the routes.
                            steer_snat(steering, plan, &h);
                            // Node ports follow the node's addresses (the resolver
                            // keeps the same set while they do not change).
                            if !Arc::ptr_eq(&node, h.node_addrs()) {
                                node = Arc::clone(h.node_addrs());
                                if steer_node_addrs(steering, &node) {
                                    resync = true;
                                }
                            }
                            if resync {
                                let table = handle.load_full();
                                let synced = sync_steering(
                                    steering,
                                    &table,
                                    "the node's addresses changed, or a retry",
                                );
                                resync = synced.is_none();
                                resolve |= synced.is_none_or(|s| s.backend_addrs_changed);
                            }
                            hops.store(Arc::new(h));
                        }
                        // The refresh met a served interface gone before the link
                        // probe did: the probe says so (once), not this warning.
                        Err(NextHopError::ServedInterfaceGone { .. }) => {
                            last_link_probe = Instant::now();
                            probe_links(links, last_link_probe)?;
                        }
                        Err(e) => warn!("reading routes and neighbours: {e}"),
                    }
                    last_refresh = now;
                }

                if let Ok(mut s) = status.lock() {
                    s.beat = Some(now);
                    s.generation = handle.generation();
                    s.applied_at = applied_at;
                    s.lost_interface = links.reason();
                    if let Ok(st) = snapshots.lock() {
                        s.snapshots = st.clone();
                    }
                    if let Some(t) = table_st.take() {
                        s.table = t;
                    }
                    if let Ok(st) = steering.stats() {
                        s.steer = st;
                    }
                }
                applied = applied_rx.recv_timeout(poll).is_ok();
            }
        })();
        done.store(true, Ordering::Relaxed);
        let _ = follower.join();
        result
    })
}

/// The snapshot thread: applies each new generation as soon as control
/// publishes it (woken by inotify, `--poll-ms` as the bound), logs what it
/// did, keeps `stats` current, and says on `applied` when a table changed.
/// Ends when `stop` or `done` is set.
fn follow_snapshots(
    watcher: &mut Watcher,
    stop: &AtomicBool,
    done: &AtomicBool,
    poll: Duration,
    stats: &Mutex<clustergate_dataplane::snapshot::SnapshotStats>,
    applied: &std::sync::mpsc::Sender<()>,
) {
    let (wake_tx, wake) = std::sync::mpsc::sync_channel::<()>(1);
    let _published = watch_published(watcher.dir(), wake_tx);
    while !stop.load(Ordering::Relaxed) && !done.load(Ordering::Relaxed) {
        let outcome = watcher.poll();
        report_poll(watcher, outcome);
        if let Ok(mut s) = stats.lock() {
            s.clone_from(&watcher.stats);
        }
        if let PollOutcome::Applied { .. } = outcome {
            let _ = applied.send(());
        }
        let _ = wake.recv_timeout(poll);
    }
}

/// Watches the snapshot directory with inotify and sends on `wake` when
/// `current` is replaced. `None` (logged) when inotify cannot be used:
/// the loop then only polls.
fn watch_published(
    dir: &std::path::Path,
    wake: std::sync::mpsc::SyncSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Not accesses: notify reports opens and reads too, and this
        // gateway's own reads of `current` would wake it again at once, in a
        // loop. Control replaces `current` by a rename.
        let names_current = event.is_ok_and(|e| {
            !matches!(e.kind, notify::EventKind::Access(_))
                && e.paths
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| n == snapshot::CURRENT))
        });
        if names_current {
            // Full: a wake-up is pending already.
            let _ = wake.try_send(());
        }
    });
    // Control creates it too; it may not have started yet.
    let _ = std::fs::create_dir_all(dir);
    let started = watcher.and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match started {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), "cannot watch the snapshot directory ({e}); polling it only");
            None
        }
    }
}

/// Looks the served interfaces up and says what changed (see link_watch);
/// an interface that returned ends the loop.
fn probe_links(links: &mut LinkWatch, now: Instant) -> Result<()> {
    match links.observe(now, &link_watch::probe(links.served())) {
        Action::None => {}
        Action::Lost(why) => error!("{why}"),
        Action::Remind(why) => warn!("{why}"),
        Action::Returned(why) => return Err(InterfaceReturned(why).into()),
    }
    Ok(())
}

/// A lost interface returned: `main` exits with
/// [`link_watch::EXIT_INTERFACE_RETURNED`] so that the gateway is restarted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InterfaceReturned(String);

fn report_poll(w: &Watcher, outcome: PollOutcome) {
    match outcome {
        PollOutcome::Applied { generation } => info!(generation, "snapshot applied"),
        PollOutcome::Refused {
            fault,
            repeated: false,
        } => warn!(
            "snapshot refused ({fault}): {}; still forwarding generation {}",
            w.stats.last_refusal.as_deref().unwrap_or("?"),
            w.handle().generation()
        ),
        _ => {}
    }
}

/// How often the backends kept for their TCP connections are looked at again.
const LINGER_EVERY: Duration = Duration::from_secs(2);
/// Least time between two looks at the connections for backends that left
/// the table: a burst of changes costs one scan of the connection table
/// per this, not one per change. The TCP backends that left in between stay
/// steered until the look (at most this long, when none has a connection).
const LINGER_COALESCE: Duration = Duration::from_millis(100);
/// Connections looked at per look (a backend with one among them is kept).
const LINGER_FLOWS: usize = 16_384;

/// Tells `steering` which backends left `table` but still have TCP
/// connections (the core keeps them until they close or time out, as Linux
/// conntrack keeps kube-proxy's DNAT), so that their replies stay steered;
/// returns how many. The next [`Steering::sync`] applies it.
/// Did some backend of `prev` (address, port, protocol) leave its
/// frontend in `next`? Looks only at frontends whose block changed.
fn backends_left(prev: &Table, next: &Table) -> bool {
    prev.frontends().iter().any(|f| {
        let Some(p) = clustergate_dataplane::flow::Proto::from_ip_number(f.proto) else {
            return true;
        };
        let Some(n) = next
            .frontend(&f.addr, f.port, p)
            .and_then(|i| next.frontend_record(i))
        else {
            return !f.backends().is_empty();
        };
        n.version() != f.version()
            && f.backends().iter().any(|b| {
                !n.backends()
                    .iter()
                    .any(|x| x.addr == b.addr && x.port == b.port)
            })
    })
}

fn steer_lingering(
    steering: &mut Steering,
    ct: &Conntrack,
    table: &Table,
    started: Instant,
) -> BTreeSet<steer::SteerKey> {
    // From the steering program's counts: costs the frontends that changed
    // since its last sync, not the table.
    let in_table = steering.table_backends(table);
    let mut flows = Vec::new();
    let now = clustergate_dataplane::time::Now(started.elapsed().as_nanos() as u64);
    ct.snapshot_flows(
        now,
        LINGER_FLOWS,
        &|f| {
            f.proto == clustergate_dataplane::flow::Proto::Tcp
                && !in_table.contains(&steer::SteerKey {
                    addr: f.backend,
                    port: f.backend_port,
                    proto: f.proto.ip_number(),
                })
        },
        &mut flows,
    );
    let keys: std::collections::BTreeSet<steer::SteerKey> = flows
        .iter()
        .map(|f| steer::SteerKey {
            addr: f.backend,
            port: f.backend_port,
            proto: f.proto.ip_number(),
        })
        .collect();
    if steering.set_lingering(keys.clone()) {
        info!(
            backends = keys.len(),
            "steering: backends kept for their TCP connections"
        );
    }
    keys
}

/// The TCP backends (address, port) that were in `prev` and are not in
/// `next`'s frontend of the same key, when no frontend moved: only the
/// blocks that changed are read (found by pointer). `None` when the
/// frontends moved (added, removed, reordered).
fn left_backends(prev: &Table, next: &Table) -> Option<BTreeSet<steer::SteerKey>> {
    let (a, b) = (prev.blocks(), next.blocks());
    if a.len() != b.len() {
        return None;
    }
    let mut left = BTreeSet::new();
    for (f, n) in a.iter().zip(b) {
        if Arc::ptr_eq(f, n) || n.version() == f.version() {
            continue;
        }
        if (n.addr, n.port, n.proto, n.kind) != (f.addr, f.port, f.proto, f.kind) {
            return None;
        }
        if f.proto != clustergate_dataplane::flow::Proto::Tcp.ip_number() {
            continue;
        }
        for be in f.backends() {
            if !n
                .backends()
                .iter()
                .any(|x| x.addr == be.addr && x.port == be.port)
            {
                left.insert(steer::SteerKey {
                    addr: be.addr,
                    port: be.port,
                    proto: f.proto,
                });
            }
        }
    }
    Some(left)
}

/// Keeps the neighbours of the backends the steering maps hold (the
/// table's and those kept for their connections) resolved; false when it
/// failed (logged: the next table tries again).
fn keep_backends_resolved(resolver: &mut Resolver, steering: &Steering) -> bool {
    let addrs: Vec<IpAddr> = steering.backend_addrs().map(ip_from16).collect();
    match resolver.keep_resolved(&addrs) {
        Ok(_) => true,
        Err(e) => {
            warn!("keeping backend neighbours resolved: {e}");
            false
        }
    }
}

/// Keeps the gateway's other threads (management, snapshot follower,
/// HTTP, inotify) off the workers' cores when some core is left: they are
/// all started from this thread and inherit its affinity, and each worker
/// pins itself to its own core. A management step right after a table
/// change (steering, route refresh) then never takes a worker's core.
fn keep_off_worker_cores(available: &[usize], workers: &[usize]) {
    let rest: Vec<usize> = available
        .iter()
        .copied()
        .filter(|c| !workers.contains(c))
        .collect();
    if rest.is_empty() {
        return;
    }
    let mut set = rustix::thread::CpuSet::new();
    for &c in &rest {
        set.set(c);
    }
    match rustix::thread::sched_setaffinity(None, &set) {
        Ok(()) => info!(cores = ?rest, "management threads kept off the workers' cores"),
        Err(e) => {
            warn!(cores = ?rest, "cannot keep the management threads off the workers' cores: {e}")
        }
    }
}

fn join_all(handles: &mut [WorkerHandle]) {
    for h in handles.iter_mut() {
        if let Some(j) = h.join.take() {
            if let Err(p) = j.join() {
                error!(core = h.core, "worker faulted: {}", panic_message(&p));
            }
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".to_string()
    }
}

/// Receive queues of an interface, from sysfs (None when unreadable).
fn rx_queues(name: &str) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/sys/class/net/{name}/queues")).ok()?;
    let n = dir
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    (n > 0).then_some(n as u32)
}

/// Drops every capability of the calling thread (workers need none to poll
/// their rings).
fn drop_all_caps() -> Result<(), caps::errors::CapsError> {
    caps::clear(None, caps::CapSet::Effective)?;
    caps::clear(None, caps::CapSet::Permitted)?;
    caps::clear(None, caps::CapSet::Inheritable)
}

/// Keeps only `keep` in the calling thread's effective and permitted sets
/// (threads spawned afterwards inherit them).
fn keep_caps(keep: &[caps::Capability]) -> Result<(), caps::errors::CapsError> {
    let have = caps::read(None, caps::CapSet::Permitted)?;
    let set: caps::CapsHashSet = keep.iter().copied().filter(|c| have.contains(c)).collect();
    caps::set(None, caps::CapSet::Effective, &set)?;
    caps::set(None, caps::CapSet::Permitted, &set)?;
    caps::clear(None, caps::CapSet::Inheritable)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading `current` (as the follower does after each wake-up) does not
    /// wake the follower again; replacing it, as control publishes, does.
    #[test]
    fn only_a_published_current_wakes_the_follower() {
        let dir = std::env::temp_dir().join(format!("cg-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let current = dir.join(snapshot::CURRENT);
        std::fs::write(&current, "1\n").expect("current");
        let (tx, wake) = std::sync::mpsc::sync_channel::<()>(1);
        let watcher = watch_published(&dir, tx).expect("inotify");
        let quiet = |what: &str| {
            // Events already queued arrive within this.
            let woke = wake.recv_timeout(Duration::from_millis(200)).is_ok();
            assert!(!woke, "{what} woke the follower");
        };
        quiet("watching");
        for _ in 0..20 {
            std::fs::read_to_string(&current).expect("reading current");
        }
        quiet("reading current");
        let tmp = dir.join(".current.tmp");
        std::fs::write(&tmp, "2\n").expect("tmp");
        std::fs::rename(&tmp, &current).expect("rename");
        assert!(
            wake.recv_timeout(Duration::from_secs(5)).is_ok(),
            "a new current did not wake the follower"
        );
        drop(watcher);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn core_lists() {
        assert_eq!(parse_cores("0").map(|c| c.0), Ok(vec![0]));
        assert_eq!(parse_cores("0,2-4").map(|c| c.0), Ok(vec![0, 2, 3, 4]));
        assert!(parse_cores("1,1").expect_err("duplicate").contains("twice"));
        assert!(parse_cores("3-1")
            .expect_err("backwards")
            .contains("backwards"));
        assert!(parse_cores("x")
            .expect_err("not a number")
            .contains("not a core"));
        assert!(parse_cores("").is_err());
    }

    #[test]
    fn snat_addresses_are_checked() {
        assert_eq!(parse_snat_address("198.18.0.1"), Ok(ip("198.18.0.1")));
        assert_eq!(parse_snat_address("2001:2::1"), Ok(ip("2001:2::1")));
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("::ffff:198.18.0.1", "IPv4-mapped"),
            ("127.0.0.1", "loopback"),
            ("255.255.255.255", "broadcast"),
            ("198.18.0", "not an IPv4 or IPv6 address"),
        ] {
            let e = parse_snat_address(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        let many: Vec<IpAddr> = (1..=17).map(|i| ip(&format!("198.18.0.{i}"))).collect();
        let (v4, v6) = snat_overrides(&many[..16]).expect("16 IPv4");
        assert_eq!((v4.len(), v6.len()), (16, 0));
        let e = snat_overrides(&many).expect_err("17 IPv4");
        assert!(e.contains("more than 16 IPv4"), "{e}");
        // 16 of each family is fine.
        let mut both = many[..16].to_vec();
        both.extend((1..=16).map(|i| ip(&format!("2001:2::{i}"))));
        assert!(snat_overrides(&both).is_ok());
        let e = snat_overrides(&[ip("198.18.0.1"), ip("198.18.0.1")]).expect_err("twice");
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn snat_ports_avoid_the_node_ports() {
        let local = LINUX_LOCAL_PORTS;
        assert_eq!(
            choose_snat_ports(None, local),
            Ok((PortRange::new(1024, 29_999).expect("range"), None))
        );
        let e = choose_snat_ports(Some(PortRange::new(40_000, 40_100).expect("range")), local)
            .expect_err("overlaps");
        assert!(
            e.contains("40000-40100") && e.contains("32768-60999"),
            "names both ranges: {e}"
        );
        let (r, warning) =
            choose_snat_ports(Some(PortRange::new(20_000, 30_500).expect("range")), local)
                .expect("only a warning");
        assert_eq!(r.hi(), 30_500);
        assert!(warning.is_some_and(|w| w.contains("30000-32767")));
        let e = choose_snat_ports(None, PortRange::new(1, 65_535).expect("range"))
            .expect_err("no room");
        assert!(e.contains("give --snat-ports"), "{e}");
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("30"), Ok(30));
        assert_eq!(parse_timeout("90s"), Ok(90));
        assert_eq!(parse_timeout("2m"), Ok(120));
        assert_eq!(parse_timeout("24h"), Ok(86_400));
        assert!(parse_timeout("0").expect_err("zero").contains("from 1 s"));
        assert!(parse_timeout("31d")
            .expect_err("unit")
            .contains("not a timeout"));
        assert!(parse_timeout("-5")
            .expect_err("sign")
            .contains("not a timeout"));
        assert!(parse_timeout("721h").expect_err("long").contains("30 days"));
    }

    #[test]
    fn return_plan_per_worker_and_for_the_steering_program() {
        let plan = ReturnPlan {
            v4: vec![addr16(ip("198.18.0.1"))],
            v6: vec![],
            range: PortRange::new(1024, 29_999).expect("range"),
            shares: vec![PortRange::new(1024, 29_999).expect("range"); 2],
            encap_mtu: 1500,
        };
        let w1 = plan.worker(1);
        assert_eq!(w1.ports, plan.range);
        assert_eq!(w1.snat_v4, plan.v4);
        assert_eq!(w1.encap_mtu, 1500);
        // IPv4 from the flag; IPv6 from the served interfaces.
        let hops = NextHops::from_parts(
            &[(2, [2, 0, 0, 0, 0, 1])],
            &[],
            &[],
            &[
                address(2, "198.18.5.5", 24),
                address(2, "2001:2::5", 64),
                address(9, "2001:9::5", 64),
            ],
        );
        let mut got: Vec<IpAddr> = plan
            .steered_addrs(&hops)
            .into_iter()
            .map(ip_from16)
            .collect();
        got.sort_unstable();
        assert_eq!(got, [ip("198.18.0.1"), ip("2001:2::5")]);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn address(ifindex: u32, a: &str, prefix_len: u8) -> nexthop::AddressEntry {
        nexthop::AddressEntry {
            ifindex,
            addr: ip(a),
            prefix_len,
            scope: netlink_packet_route::address::AddressScope::Universe,
            flags: netlink_packet_route::address::AddressFlags::empty(),
        }
    }

    #[test]
    fn node_ports_in_the_snat_range_are_named() {
        use clustergate_builder::table::{ServiceSpec, TableBuild, TableSpec};
        use clustergate_dataplane::flow::Proto;
        let np = |addr: &str, port, proto| {
            ServiceSpec::cluster_ip(ip(addr), port, proto, vec![])
                .with_kind(FrontendKind::NodePort, ip(addr))
        };
        let spec = TableSpec {
            services: vec![
                np("0.0.0.0", 30_080, Proto::Tcp),
                np("::", 30_500, Proto::Udp),
                np("0.0.0.0", 32_000, Proto::Tcp),
                // A cluster IP on a port in the range is no node port.
                ServiceSpec::cluster_ip(ip("198.18.211.10"), 30_100, Proto::Tcp, vec![]),
            ],
            ..TableSpec::default()
        };
        let table = Table::build_full(1, 1, &spec, 65_537).expect("table");
        let range = PortRange::new(20_000, 30_500).expect("range");
        assert_eq!(
            node_ports_in_snat_range(&table, range),
            ["0.0.0.0:30080/tcp", "[::]:30500/udp"]
        );
        // The default range (below the NodePort range) never overlaps.
        let default = PortRange::new(1024, 29_999).expect("range");
        assert!(node_ports_in_snat_range(&table, default).is_empty());
        assert!(node_ports_in_snat_range(&Table::empty(0), range).is_empty());
        let plan = ReturnPlan {
            v4: vec![],
            v6: vec![],
            range,
            shares: vec![range],
            encap_mtu: 1500,
        };
        let st = table_status(&table, &plan);
        assert_eq!(st.node_ports_in_snat_range, 2);
        assert_eq!(st.frontends, [1, 3, 0, 0]);
    }

    /// The TCP backends that left, from the changed blocks alone; `None`
    /// once the frontends moved, and what that slower look then says.
    #[test]
    fn backends_that_left_are_found_by_block() {
        use clustergate_builder::table::{BackendSpec, Builder, RingSizes, ServiceSpec, TableSpec};
        use clustergate_builder::TableBuild;
        use clustergate_dataplane::flow::{addr16, Proto};
        let spec = |port5: u16, udp_port: u16, with_9: bool| {
            let svc = |i: u8, proto, port: u16| {
                ServiceSpec::cluster_ip(
                    ip(&format!("198.19.0.{i}")),
                    80,
                    proto,
                    (1..=2)
                        .map(|b| BackendSpec::ready(ip(&format!("198.18.{i}.{b}")), port))
                        .collect(),
                )
            };
            let mut services: Vec<ServiceSpec> = (1..=8)
                .map(|i| svc(i, Proto::Tcp, if i == 5 { port5 } else { 8080 }))
                .collect();
            services.push(svc(7, Proto::Udp, udp_port));
            if with_9 {
                services.push(svc(9, Proto::Tcp, 8080));
            }
            TableSpec {
                services,
                ..TableSpec::default()
            }
        };
        let mut b = Builder::new(1, 65_537, RingSizes::default());
        let t1 = b.build(1, &spec(8080, 53, false)).expect("table");
        let next = |b: &mut Builder, g, s: &TableSpec| {
            let t = b.build(g, s).expect("table");
            t1.apply_delta(&t.delta_from(&t1).expect("delta"))
                .expect("apply")
        };
        // Service 5's two TCP backends move to port 9090; the UDP one's
        // backends move too, and never linger.
        let t2 = next(&mut b, 2, &spec(9090, 54, false));
        let left = left_backends(&t1, &t2).expect("in place");
        let want: BTreeSet<steer::SteerKey> = (1..=2)
            .map(|k| steer::SteerKey {
                addr: addr16(ip(&format!("198.18.5.{k}"))),
                port: 8080,
                proto: Proto::Tcp.ip_number(),
            })
            .collect();
        assert_eq!(left, want);
        assert!(backends_left(&t1, &t2));
        // Nothing changed: nothing left.
        assert_eq!(left_backends(&t1, &t1), Some(BTreeSet::new()));
        // A Service added: the frontends moved, and no backend left.
        let t3 = next(&mut b, 3, &spec(8080, 53, true));
        assert_eq!(left_backends(&t1, &t3), None);
        assert!(!backends_left(&t1, &t3));
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring("2048"), Ok(2048));
        assert!(parse_ring("1000").is_err());
        assert!(parse_ring("32").is_err());
    }
}
