//! The gateway's `--metrics` address: Prometheus text at `/metrics`
//! (prometheus-client), `/healthz` and `/livez` like kube-proxy's, and the
//! inspection API at `/api/v1/services`, `/api/v1/flows` and
//! `/api/v1/summary` (JSON, [`crate::inspect`]).
//!
//! Owns: a small blocking HTTP/1.1 responder on a thread of its own (GET and
//! HEAD, one request per connection) and the metric families, built afresh
//! at each scrape from the workers' published counters and the management
//! loop's [`Status`] (which also carries what the current table holds,
//! [`TableStatus`]: frontends per kind, node ports inside the SNAT range,
//! worked out once per generation). Never on the packet path: workers hand
//! their counters over every 50 ms.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clustergate_dataplane::conntrack::{Conntrack, FlowClass, PerClass};
use clustergate_dataplane::io::nexthop::Unresolved;
use clustergate_dataplane::io::steer::SteerStats;
use clustergate_dataplane::io::worker::WorkerStats;
use clustergate_dataplane::pipeline::{BackendCount, BackendKey};
use clustergate_dataplane::pipeline::{DropReason, VerdictKind};
use clustergate_dataplane::snapshot::{SnapshotStats, TableHandle};
use clustergate_dataplane::snat::PortRange;
use clustergate_dataplane::table::{FrontendKind, Table};
use clustergate_dataplane::time::Now;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What the management loop publishes for the endpoints.
#[derive(Debug, Default)]
pub struct Status {
    /// Last time round the management loop.
    pub beat: Option<Instant>,
    /// Table generation applied.
    pub generation: u64,
    /// When it was applied.
    pub applied_at: Option<SystemTime>,
    /// Snapshot counters.
    pub snapshots: SnapshotStats,
    /// The steering program's counters.
    pub steer: SteerStats,
    /// Set when a worker faulted.
    pub fault: Option<String>,
    /// Set while a served interface is gone (`/healthz` answers 503 with it;
    /// `/livez` does not: the process is well, and exits when it returns).
    pub lost_interface: Option<String>,
    /// What the current table holds.
    pub table: TableStatus,
}

/// The frontend kinds, in [`FrontendKind`] value order, with the label of
/// `clustergate_frontends` (the Service field each comes from).
pub const FRONTEND_KINDS: [(FrontendKind, &str); 4] = [
    (FrontendKind::ClusterIp, "clusterIP"),
    (FrontendKind::NodePort, "nodePort"),
    (FrontendKind::ExternalIp, "externalIP"),
    (FrontendKind::LoadBalancer, "loadBalancer"),
];

/// What the metrics show of the current table, worked out by the management
/// loop once per generation (never at scrape time).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableStatus {
    /// Frontends per kind, indexed by [`FrontendKind`] value.
    pub frontends: [u64; 4],
    /// Node-port frontends whose port lies in the SNAT range.
    pub node_ports_in_snat_range: u64,
}

impl TableStatus {
    /// Counts `table`'s frontends per kind; `in_snat_range`: its node ports
    /// inside the SNAT range.
    #[must_use]
    pub fn of(table: &Table, in_snat_range: usize) -> Self {
        let mut frontends = [0u64; 4];
        for f in table.frontends() {
            if let Some(n) = frontends.get_mut(usize::from(f.kind)) {
                *n += 1;
            }
        }
        Self {
            frontends,
            node_ports_in_snat_range: in_snat_range as u64,
        }
    }
}

/// What the endpoints read.
#[derive(Debug)]
pub struct Server {
    /// `proxy_name` label.
    pub proxy_name: String,
    /// The management loop's status.
    pub status: Arc<Mutex<Status>>,
    /// (core, counters) per worker.
    pub workers: Vec<(usize, Arc<Mutex<WorkerStats>>)>,
    /// The connection table.
    pub conntrack: Arc<Conntrack>,
    /// (core, its share of the SNAT ports) per worker.
    pub snat_ports: Vec<(usize, PortRange)>,
    /// The table the workers use (the inspection API reads it).
    pub table: Arc<TableHandle>,
    /// The workers' clock origin: conntrack times are relative to it.
    pub epoch: Instant,
    /// `--metrics-per-frontend`: packets, bytes and new flows per frontend.
    pub per_frontend: bool,
}

/// A heartbeat older than this makes `/livez` and `/healthz` answer 503.
const STALE: Duration = Duration::from_secs(2);

/// Binds `addr` and serves it on a thread of its own.
pub fn spawn(addr: SocketAddr, server: Server) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot bind {addr}"))?;
    std::thread::Builder::new()
        .name("cg-http".into())
        .spawn(move || {
            // Capabilities are per thread: this one reads the network and
            // needs none.
            let _ = caps::clear(None, caps::CapSet::Effective);
            let _ = caps::clear(None, caps::CapSet::Permitted);
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &server);
            }
        })
        .context("spawning the HTTP thread")?;
    Ok(())
}

fn answer(mut conn: TcpStream, server: &Server) -> std::io::Result<()> {
    // Short: one connection at a time, and kubelet probes time out after 1 s.
    conn.set_read_timeout(Some(Duration::from_millis(300)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        let n = conn.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("");
    let target = words.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", p) if p.starts_with("/api/") => {
            let (s, b) = api(server, p, query);
            (s, "application/json", b)
        }
        ("GET" | "HEAD", "/metrics") => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(server),
        ),
        ("GET" | "HEAD", "/healthz") => {
            let (s, b) = healthz(server);
            (s, "application/json", b)
        }
        ("GET" | "HEAD", "/livez") => {
            let (s, b) = livez(server);
            (s, "text/plain; charset=utf-8", b)
        }
        ("GET" | "HEAD", _) => (404, "text/plain; charset=utf-8", "not found\n".into()),
        _ => (
            405,
            "text/plain; charset=utf-8",
            "GET or HEAD only\n".into(),
        ),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    conn.write_all(out.as_bytes())
}

/// A copy of every worker's published counters, with its core.
fn worker_stats(server: &Server) -> Vec<(usize, WorkerStats)> {
    server
        .workers
        .iter()
        .map(|(c, w)| (*c, w.lock().unwrap_or_else(PoisonError::into_inner).clone()))
        .collect()
}

/// `/api/v1/*`: (status, JSON body). The flows come from a bounded,
/// shard-by-shard conntrack snapshot: the workers are never stopped.
fn api(server: &Server, path: &str, query: &str) -> (u16, String) {
    let json = |v: serde_json::Result<String>| match v {
        Ok(s) => (200, s + "\n"),
        Err(e) => (500, error_json(&format!("encoding: {e}"))),
    };
    match path.strip_prefix(crate::inspect::API) {
        Some("/services") => {
            let table = server.table.load_full();
            let workers: Vec<WorkerStats> =
                worker_stats(server).into_iter().map(|(_, w)| w).collect();
            json(serde_json::to_string(&crate::inspect::services(
                &table, &workers,
            )))
        }
        Some("/flows") => match crate::inspect::FlowQuery::parse(query) {
            Ok(q) => {
                let now = Now(Instant::now()
                    .saturating_duration_since(server.epoch)
                    .as_nanos() as u64);
                let table = server.table.load_full();
                match crate::inspect::flows(&server.conntrack, now, &q, &table) {
                    Ok(doc) => json(serde_json::to_string(&doc)),
                    Err(e) => (404, error_json(&e)),
                }
            }
            Err(e) => (400, error_json(&e)),
        },
        Some("/summary") => {
            let table = server.table.load_full();
            let generation = server
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .generation;
            json(serde_json::to_string(&crate::inspect::summary(
                generation,
                &table,
                &server.conntrack,
                &worker_stats(server),
            )))
        }
        _ => (
            404,
            error_json(&format!(
                "no such API path {path:?}: {api}/services, {api}/flows, {api}/summary",
                api = crate::inspect::API
            )),
        ),
    }
}

fn error_json(msg: &str) -> String {
    format!("{}\n", serde_json::json!({ "error": msg }))
}

/// Why the gateway is not healthy, if it is not.
fn unhealthy(server: &Server, now: Instant) -> Option<String> {
    let st = server.status.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(f) = &st.fault {
        return Some(f.clone());
    }
    match st.beat {
        Some(b) if now.saturating_duration_since(b) <= STALE => {}
        _ => return Some("management loop stalled".into()),
    }
    for (core, w) in &server.workers {
        let w = w.lock().unwrap_or_else(PoisonError::into_inner);
        if w.stopped {
            return Some(format!("worker on core {core} stopped"));
        }
        match w.beat {
            Some(b) if now.saturating_duration_since(b) <= STALE => {}
            Some(b) => {
                return Some(format!(
                    "worker on core {core}: no heartbeat for {:.1} s",
                    now.saturating_duration_since(b).as_secs_f64()
                ))
            }
            None => return Some(format!("worker on core {core} has not started polling")),
        }
    }
    None
}

fn livez(server: &Server) -> (u16, String) {
    match unhealthy(server, Instant::now()) {
        None => (200, "ok\n".into()),
        Some(why) => (503, format!("{why}\n")),
    }
}

/// kube-proxy's `/healthz` body shape: lastUpdated, currentTime, plus our
/// generation and, when unhealthy, the reason.
fn healthz(server: &Server) -> (u16, String) {
    let now = Instant::now();
    let mut why = unhealthy(server, now);
    let (generation, applied, lost) = {
        let st = server.status.lock().unwrap_or_else(PoisonError::into_inner);
        (st.generation, st.applied_at, st.lost_interface.clone())
    };
    if why.is_none() {
        why = lost;
    }
    if why.is_none() && generation == 0 {
        why = Some("no table snapshot applied yet".into());
    }
    let ts = |t: SystemTime| {
        jiff::Timestamp::try_from(t)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let body = serde_json::json!({
        "lastUpdated": applied.map(ts).unwrap_or_default(),
        "currentTime": ts(SystemTime::now()),
        "generation": generation,
        "reason": why.clone().unwrap_or_default(),
    });
    (if why.is_some() { 503 } else { 200 }, format!("{body}\n"))
}

type Labels = Vec<(String, String)>;

fn counter_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let fam = Family::<Labels, Counter>::default();
    for (l, v) in values {
        fam.get_or_create(&l).inc_by(v);
    }
    reg.register(name, help, fam);
}

fn gauge_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, i64)>,
) {
    let fam = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        fam.get_or_create(&l).set(v);
    }
    reg.register(name, help, fam);
}

fn l(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

/// `--metrics-per-frontend`: each frontend of the current table with the
/// packets, bytes and new flows forwarded to its backends (summed over the
/// workers, counted against the table each used). One series per frontend
/// and metric: off by default, as a large table makes many.
fn per_frontend(reg: &mut Registry, server: &Server, workers: &[(String, WorkerStats)]) {
    let mut sums: std::collections::HashMap<BackendKey, BackendCount> =
        std::collections::HashMap::new();
    for (_, w) in workers {
        for (k, c) in w.backends.iter() {
            sums.entry(k).or_default().add(&c);
        }
    }
    let table = server.table.load_full();
    let keys = BackendKey::all_of(&table);
    let mut rows: Vec<(Labels, BackendCount)> = Vec::new();
    for (fi, f) in table.frontends().iter().enumerate() {
        let start = table.backend_base(fi as u32).unwrap_or(0) as usize;
        let mut total = BackendCount::default();
        for i in 0..f.backends_len as usize {
            if let Some(c) = keys.get(start + i).and_then(|k| sums.get(k)) {
                total.add(c);
            }
        }
        let kind = FRONTEND_KINDS
            .iter()
            .find(|(k, _)| *k as u8 == f.kind)
            .map_or("unknown", |(_, l)| l);
        rows.push((
            l(&[
                ("frontend", crate::inspect::endpoint(&f.addr, f.port)),
                ("protocol", crate::inspect::proto_name(f.proto)),
                ("kind", (*kind).into()),
            ]),
            total,
        ));
    }
    counter_family(
        reg,
        "frontend_packets",
        "Frames forwarded to a frontend's backends (--metrics-per-frontend)",
        rows.iter().map(|(l, c)| (l.clone(), c.packets)),
    );
    counter_family(
        reg,
        "frontend_bytes",
        "Bytes, as received, of the frames forwarded to a frontend's backends (--metrics-per-frontend)",
        rows.iter().map(|(l, c)| (l.clone(), c.bytes)),
    );
    counter_family(
        reg,
        "frontend_new_flows",
        "New flows bound to a frontend's backends (--metrics-per-frontend)",
        rows.iter().map(|(l, c)| (l.clone(), c.new_flows)),
    );
}

/// The metrics, in the text exposition format.
fn metrics(server: &Server) -> String {
    let mut reg = Registry::with_prefix_and_labels(
        "clustergate",
        [(
            std::borrow::Cow::Borrowed("proxy_name"),
            std::borrow::Cow::Owned(server.proxy_name.clone()),
        )]
        .into_iter(),
    );
    let workers: Vec<(String, WorkerStats)> = server
        .workers
        .iter()
        .map(|(c, w)| {
            (
                c.to_string(),
                w.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            )
        })
        .collect();

    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    let mut drops = Vec::new();
    for (core, w) in &workers {
        for k in VerdictKind::ALL {
            let labels = l(&[("worker", core.clone()), ("verdict", k.label().into())]);
            packets.push((labels.clone(), w.pipeline.packets[k as usize]));
            bytes.push((labels, w.pipeline.bytes[k as usize]));
        }
        for r in DropReason::ALL {
            drops.push((
                l(&[("worker", core.clone()), ("reason", r.label().into())]),
                w.pipeline.dropped(*r),
            ));
        }
        for u in Unresolved::ALL {
            drops.push((
                l(&[
                    ("worker", core.clone()),
                    ("reason", format!("next_hop_{}", u.label())),
                ]),
                w.io.unresolved[u as usize],
            ));
        }
        drops.push((
            l(&[("worker", core.clone()), ("reason", "tx_ring_full".into())]),
            w.io.tx_ring_full,
        ));
        drops.push((
            l(&[
                ("worker", core.clone()),
                ("reason", "pass_unavailable".into()),
            ]),
            w.io.pass_unavailable,
        ));
        drops.push((
            l(&[("worker", core.clone()), ("reason", "handoff_full".into())]),
            w.io.handoff_full,
        ));
    }
    counter_family(
        &mut reg,
        "packets",
        "Frames per worker and verdict of the packet core",
        packets,
    );
    counter_family(
        &mut reg,
        "bytes",
        "Bytes (frame length as received) per worker and verdict",
        bytes,
    );
    counter_family(
        &mut reg,
        "drops",
        "Frames dropped, per worker and reason (the core's reasons, next-hop failures, full TX rings)",
        drops,
    );
    counter_family(
        &mut reg,
        "encap_too_big",
        "DSR packets answered with ICMP fragmentation needed/packet too big, per worker",
        workers
            .iter()
            .map(|(c, w)| (l(&[("worker", c.clone())]), w.pipeline.encap_too_big)),
    );
    let per_worker = |f: fn(&WorkerStats) -> u64| {
        workers
            .iter()
            .map(|(c, w)| (l(&[("worker", c.clone())]), f(w)))
            .collect::<Vec<_>>()
    };
    counter_family(
        &mut reg,
        "new_flows",
        "New flows bound to a backend, per worker",
        per_worker(|w| w.pipeline.new_flows),
    );
    counter_family(
        &mut reg,
        "flows_moved",
        "Tracked flows whose backend left the table and that were bound anew, per worker",
        per_worker(|w| w.pipeline.flows_moved),
    );
    counter_family(
        &mut reg,
        "affinity_hits",
        "New flows sent to their ClientIP-affinity backend, per worker",
        per_worker(|w| w.pipeline.affinity_hits),
    );
    counter_family(
        &mut reg,
        "icmp_errors_translated",
        "ICMP errors that followed their flow, translated as the flow is, per worker",
        per_worker(|w| w.pipeline.icmp_errors),
    );
    counter_family(
        &mut reg,
        "replies",
        "Backend replies reverse-NATed, per worker",
        per_worker(|w| w.pipeline.replies),
    );
    counter_family(
        &mut reg,
        "rejects_sent",
        "Rejects sent back to clients (TCP RST or ICMP unreachable for a frontend without endpoints, and ICMP too big for DSR), per worker",
        per_worker(|w| w.pipeline.count(VerdictKind::Reject)),
    );
    if server.per_frontend {
        per_frontend(&mut reg, server, &workers);
    }
    gauge_family(
        &mut reg,
        "snat_ports",
        "Source-NAT ports of each worker's share of --snat-ports (labels: first and last port)",
        server.snat_ports.iter().map(|(core, r)| {
            (
                l(&[
                    ("worker", core.to_string()),
                    ("lo", r.lo().to_string()),
                    ("hi", r.hi().to_string()),
                ]),
                i64::from(r.len()),
            )
        }),
    );
    counter_family(
        &mut reg,
        "xsk_rx_packets",
        "Frames taken off the AF_XDP RX rings, per worker",
        workers
            .iter()
            .map(|(c, w)| (l(&[("worker", c.clone())]), w.io.rx_packets)),
    );
    counter_family(
        &mut reg,
        "xsk_tx_packets",
        "Frames put on the AF_XDP TX rings, per worker",
        workers
            .iter()
            .map(|(c, w)| (l(&[("worker", c.clone())]), w.io.tx_packets)),
    );
    counter_family(
        &mut reg,
        "handoffs_sent",
        "Frames whose flow another worker owns, handed to it, per worker",
        workers
            .iter()
            .map(|(c, w)| (l(&[("worker", c.clone())]), w.io.handoffs_sent)),
    );
    counter_family(
        &mut reg,
        "handoffs_received",
        "Frames other workers handed over (flows this worker owns), per worker",
        workers
            .iter()
            .map(|(c, w)| (l(&[("worker", c.clone())]), w.io.handoffs_received)),
    );
    counter_family(
        &mut reg,
        "next_hop_requests_dropped",
        "Neighbour resolution requests that did not fit the resolver's queue",
        workers
            .iter()
            .map(|(c, w)| (l(&[("worker", c.clone())]), w.io.trigger_dropped)),
    );
    let ring = |f: fn(&clustergate_dataplane::io::xsk::RingStats) -> u64| {
        workers
            .iter()
            .flat_map(|(c, w)| {
                w.ports.iter().map(move |p| {
                    (
                        l(&[
                            ("worker", c.clone()),
                            ("interface", p.ifname.clone()),
                            ("queue", p.queue.to_string()),
                        ]),
                        f(&p.rings),
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    counter_family(
        &mut reg,
        "xsk_rx_dropped",
        "Frames the kernel dropped before the RX ring (XDP_STATISTICS rx_dropped)",
        ring(|r| r.rx_dropped),
    );
    counter_family(
        &mut reg,
        "xsk_rx_ring_full",
        "Frames dropped because the RX ring was full",
        ring(|r| r.rx_ring_full),
    );
    counter_family(
        &mut reg,
        "xsk_fill_ring_empty",
        "Times the kernel found the fill ring empty",
        ring(|r| r.rx_fill_ring_empty),
    );
    counter_family(
        &mut reg,
        "xsk_tx_ring_empty",
        "Times the kernel found the TX ring empty",
        ring(|r| r.tx_ring_empty),
    );
    counter_family(
        &mut reg,
        "xsk_invalid_descs",
        "Invalid RX and TX descriptors",
        ring(|r| r.rx_invalid_descs + r.tx_invalid_descs),
    );
    gauge_family(
        &mut reg,
        "xsk_socket_info",
        "One per AF_XDP socket: its interface, queue, worker and bind mode",
        workers.iter().flat_map(|(c, w)| {
            w.ports.iter().map(move |p| {
                (
                    l(&[
                        ("worker", c.clone()),
                        ("interface", p.ifname.clone()),
                        ("queue", p.queue.to_string()),
                        ("mode", p.mode.label().into()),
                    ]),
                    1,
                )
            })
        }),
    );

    let ct = server.conntrack.stats();
    let one = |v: u64| vec![(Labels::new(), v)];
    gauge_family(
        &mut reg,
        "conntrack_entries",
        "Flows in the connection table",
        vec![(Labels::new(), ct.entries as i64)],
    );
    gauge_family(
        &mut reg,
        "conntrack_capacity",
        "Flows per IP family the connection table holds (allocated at start)",
        vec![(Labels::new(), server.conntrack.capacity() as i64)],
    );
    counter_family(
        &mut reg,
        "conntrack_inserts",
        "Flows inserted into the connection table",
        one(ct.inserts),
    );
    let per_class = |v: &PerClass| {
        FlowClass::ALL
            .iter()
            .map(|c| (l(&[("class", c.label().into())]), v[*c as usize]))
            .collect::<Vec<_>>()
    };
    counter_family(
        &mut reg,
        "conntrack_evictions",
        "Unconfirmed flows evicted under pressure, by class (confirmed flows are never evicted)",
        per_class(&ct.evicted),
    );
    counter_family(
        &mut reg,
        "conntrack_expired",
        "Entries removed because their timeout passed",
        one(ct.expired),
    );
    counter_family(
        &mut reg,
        "conntrack_refused",
        "New flows refused because their shard was full of confirmed flows, by class",
        per_class(&ct.refused),
    );
    counter_family(
        &mut reg,
        "conntrack_clashes",
        "New routed flows refused because their reply tuple was a live flow's",
        one(ct.clashes),
    );

    let st = server.status.lock().unwrap_or_else(PoisonError::into_inner);
    gauge_family(
        &mut reg,
        "snapshot_generation",
        "Generation of the table snapshot the workers use",
        vec![(Labels::new(), st.generation as i64)],
    );
    gauge_family(
        &mut reg,
        "snapshot_applied_timestamp_seconds",
        "Unix time the current snapshot was applied",
        vec![(
            Labels::new(),
            st.applied_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64),
        )],
    );
    counter_family(
        &mut reg,
        "snapshots_applied",
        "Snapshots validated and applied",
        one(st.snapshots.applied),
    );
    counter_family(
        &mut reg,
        "snapshot_deltas_applied",
        "Delta snapshots (changes to some frontends only) applied",
        one(st.snapshots.deltas),
    );
    counter_family(
        &mut reg,
        "snapshots_refused",
        "Snapshots refused, by fault",
        st.snapshots
            .refused_by_fault
            .iter()
            .map(|(f, n)| (l(&[("fault", (*f).to_string())]), *n)),
    );
    gauge_family(
        &mut reg,
        "frontends",
        "Frontends of the current table, by kind (the Service field each comes from; a node port counts once, whatever the node's addresses)",
        FRONTEND_KINDS.iter().map(|(k, label)| {
            (
                l(&[("kind", (*label).to_string())]),
                st.table.frontends[*k as usize] as i64,
            )
        }),
    );
    gauge_family(
        &mut reg,
        "node_ports_in_snat_range",
        "Node-port frontends of the current table whose port lies in the SNAT range (--snat-ports): replies to such a port and new connections to it are ambiguous",
        vec![(Labels::new(), st.table.node_ports_in_snat_range as i64)],
    );
    counter_family(
        &mut reg,
        "xdp_steered",
        "Frames seen by the XDP steering program, by outcome (no_socket: matched, but no AF_XDP socket at its queue, so passed to the kernel)",
        vec![
            (l(&[("outcome", "redirected".into())]), st.steer.redirected),
            (l(&[("outcome", "passed".into())]), st.steer.passed),
            (l(&[("outcome", "malformed".into())]), st.steer.malformed),
            (l(&[("outcome", "no_socket".into())]), st.steer.no_socket),
        ],
    );
    drop(st);

    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        out = format!("# encoding failed: {e}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustergate_dataplane::conntrack::Config;

    fn server() -> Server {
        let mut w = WorkerStats::default();
        w.pipeline.encap_too_big = 3;
        w.pipeline.drops[DropReason::SnatNoAddress.index()] = 2;
        w.pipeline.drops[DropReason::SnatPortsExhausted.index()] = 5;
        w.pipeline.drops[DropReason::SourceRange.index()] = 7;
        w.pipeline.drops[DropReason::NoLocalEndpoint.index()] = 11;
        Server {
            proxy_name: "cg".into(),
            status: Arc::new(Mutex::new(Status {
                table: TableStatus {
                    frontends: [4, 3, 2, 1],
                    node_ports_in_snat_range: 1,
                },
                ..Status::default()
            })),
            workers: vec![
                (2, Arc::new(Mutex::new(w))),
                (3, Arc::new(Mutex::new(WorkerStats::default()))),
            ],
            conntrack: Arc::new(Conntrack::new(&Config {
                capacity: 1024,
                shards: 4,
                partitions: 1,
                affinity_capacity: 16,
                fragment_capacity: 16,
                ..Config::default()
            })),
            snat_ports: vec![
                (2, PortRange::new(1024, 15_511).expect("range")),
                (3, PortRange::new(15_512, 29_999).expect("range")),
            ],
            table: Arc::new(TableHandle::default()),
            epoch: Instant::now(),
            per_frontend: false,
        }
    }

    #[test]
    fn return_path_metrics_are_exported() {
        let text = metrics(&server());
        for want in [
            r#"clustergate_drops_total{proxy_name="cg",worker="2",reason="snat_no_address"} 2"#,
            r#"clustergate_drops_total{proxy_name="cg",worker="2",reason="snat_ports_exhausted"} 5"#,
            r#"clustergate_drops_total{proxy_name="cg",worker="3",reason="snat_ports_exhausted"} 0"#,
            "# HELP clustergate_encap_too_big DSR packets answered with ICMP fragmentation needed/packet too big",
            "# TYPE clustergate_encap_too_big counter",
            r#"clustergate_encap_too_big_total{proxy_name="cg",worker="2"} 3"#,
            r#"clustergate_encap_too_big_total{proxy_name="cg",worker="3"} 0"#,
            "# TYPE clustergate_snat_ports gauge",
            r#"clustergate_snat_ports{proxy_name="cg",worker="2",lo="1024",hi="15511"} 14488"#,
            r#"clustergate_snat_ports{proxy_name="cg",worker="3",lo="15512",hi="29999"} 14488"#,
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }

    #[test]
    fn service_exposure_metrics_are_exported() {
        let text = metrics(&server());
        for want in [
            r#"clustergate_drops_total{proxy_name="cg",worker="2",reason="source_range"} 7"#,
            r#"clustergate_drops_total{proxy_name="cg",worker="2",reason="no_local_endpoint"} 11"#,
            r#"clustergate_drops_total{proxy_name="cg",worker="3",reason="no_local_endpoint"} 0"#,
            "# TYPE clustergate_frontends gauge",
            r#"clustergate_frontends{proxy_name="cg",kind="clusterIP"} 4"#,
            r#"clustergate_frontends{proxy_name="cg",kind="nodePort"} 3"#,
            r#"clustergate_frontends{proxy_name="cg",kind="externalIP"} 2"#,
            r#"clustergate_frontends{proxy_name="cg",kind="loadBalancer"} 1"#,
            "# TYPE clustergate_node_ports_in_snat_range gauge",
            r#"clustergate_node_ports_in_snat_range{proxy_name="cg"} 1"#,
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        // Every drop reason of the core has its series.
        for r in DropReason::ALL {
            let series = format!(r#"worker="3",reason="{}"}}"#, r.label());
            assert!(text.contains(&series), "{series} missing");
        }
    }

    #[test]
    fn the_api_names_each_frontends_service() {
        use clustergate_builder::table::{BackendSpec, ServiceSpec, TableBuild};
        use clustergate_dataplane::flow::Proto;
        use clustergate_dataplane::table::FrontendKind;
        let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("address") };
        let web = ServiceSpec::cluster_ip(
            ip("198.18.211.10"),
            80,
            Proto::Tcp,
            vec![BackendSpec::ready(ip("198.18.1.1"), 8080)],
        )
        .with_name("default/web:http");
        let node_port = web
            .clone()
            .with_kind(FrontendKind::NodePort, ip("0.0.0.0"))
            .with_name("default/web:http");
        let anon = ServiceSpec::cluster_ip(ip("198.18.211.11"), 53, Proto::Udp, vec![]);
        let dns = ServiceSpec::cluster_ip(ip("198.18.211.12"), 53, Proto::Udp, vec![])
            .with_name("kube-system/dns");
        let table = Table::build(4, 0, &[web, node_port, anon, dns]).expect("table");
        let mut s = server();
        s.table = Arc::new(TableHandle::new(table));
        let (code, body) = api(&s, "/api/v1/services", "");
        assert_eq!(code, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let names: Vec<(serde_json::Value, serde_json::Value)> = doc["services"]
            .as_array()
            .expect("services")
            .iter()
            .map(|s| (s["service"].clone(), s["port_name"].clone()))
            .collect();
        assert_eq!(
            names,
            [
                (serde_json::json!("default/web"), serde_json::json!("http")),
                (serde_json::json!("default/web"), serde_json::json!("http")),
                (serde_json::Value::Null, serde_json::Value::Null),
                (
                    serde_json::json!("kube-system/dns"),
                    serde_json::Value::Null
                ),
            ]
        );
        // Flows by Service: none yet, but the Service is known.
        let (code, body) = api(&s, "/api/v1/flows", "service=default%2Fweb");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""flows":[]"#), "{body}");
        let (code, body) = api(&s, "/api/v1/flows", "service=default/nope");
        assert_eq!(code, 404, "{body}");
        assert!(
            body.contains("Service default/nope has no frontend in table generation 4"),
            "{body}"
        );
        let (code, body) = api(&s, "/api/v1/flows", "service=nope");
        assert_eq!(code, 400, "{body}");
    }

    #[test]
    fn core_counters_and_per_frontend_metrics_are_exported() {
        use clustergate_builder::table::{BackendSpec, ServiceSpec, TableBuild};
        use clustergate_dataplane::flow::Proto;
        let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("address") };
        let table = Table::build(
            7,
            0,
            &[
                ServiceSpec::cluster_ip(
                    ip("198.18.211.10"),
                    80,
                    Proto::Tcp,
                    vec![
                        BackendSpec::ready(ip("198.18.1.1"), 8080),
                        BackendSpec::ready(ip("198.18.1.2"), 8080),
                    ],
                ),
                ServiceSpec::cluster_ip(ip("2001:2::10"), 53, Proto::Udp, vec![]),
            ],
        )
        .expect("table");
        let mut s = server();
        s.table = Arc::new(TableHandle::new(table));
        let table = s.table.load_full();
        {
            let mut w = s.workers[0].1.lock().expect("stats");
            w.pipeline.new_flows = 5;
            w.pipeline.flows_moved = 1;
            w.pipeline.affinity_hits = 2;
            w.pipeline.icmp_errors = 3;
            w.pipeline.replies = 9;
            w.pipeline.packets[VerdictKind::Reject as usize] = 4;
            w.backends.follow(&table);
            w.backends.fronts[0].counts[0] = BackendCount {
                new_flows: 3,
                packets: 30,
                bytes: 3000,
            };
            w.backends.fronts[0].counts[1] = BackendCount {
                new_flows: 2,
                packets: 20,
                bytes: 2000,
            };
        }
        let text = metrics(&s);
        for want in [
            r#"clustergate_new_flows_total{proxy_name="cg",worker="2"} 5"#,
            r#"clustergate_flows_moved_total{proxy_name="cg",worker="2"} 1"#,
            r#"clustergate_affinity_hits_total{proxy_name="cg",worker="2"} 2"#,
            r#"clustergate_icmp_errors_translated_total{proxy_name="cg",worker="2"} 3"#,
            r#"clustergate_replies_total{proxy_name="cg",worker="2"} 9"#,
            r#"clustergate_rejects_sent_total{proxy_name="cg",worker="2"} 4"#,
            r#"clustergate_rejects_sent_total{proxy_name="cg",worker="3"} 0"#,
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(
            !text.contains("clustergate_frontend_"),
            "per-frontend is off by default"
        );
        s.per_frontend = true;
        let text = metrics(&s);
        for want in [
            r#"clustergate_frontend_packets_total{proxy_name="cg",frontend="198.18.211.10:80",protocol="tcp",kind="clusterIP"} 50"#,
            r#"clustergate_frontend_bytes_total{proxy_name="cg",frontend="198.18.211.10:80",protocol="tcp",kind="clusterIP"} 5000"#,
            r#"clustergate_frontend_new_flows_total{proxy_name="cg",frontend="198.18.211.10:80",protocol="tcp",kind="clusterIP"} 5"#,
            r#"clustergate_frontend_packets_total{proxy_name="cg",frontend="[2001:2::10]:53",protocol="udp",kind="clusterIP"} 0"#,
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        promtool_check(&text);
    }

    /// `promtool check metrics` (Debian's `prometheus` package, installed by
    /// scripts/install-deps.sh): the text parses, and follows Prometheus'
    /// naming conventions (counters end in `_total`, units, case).
    fn promtool_check(text: &str) {
        use std::process::{Command, Stdio};
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (scripts/install-deps.sh installs Debian's prometheus package)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("writing to promtool");
        let out = child.wait_with_output().expect("promtool");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // promtool reads the Prometheus text format, where a counter's HELP
        // names the sample (`x_total`); OpenMetrics names the family (`x`).
        // That one finding is expected for each counter, and only when its
        // family has its HELP; anything else (a parse error, a naming or unit
        // lint) fails.
        let unexpected: Vec<&str> = report
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                let family = l
                    .strip_suffix(" no help text")
                    .and_then(|m| m.strip_suffix("_total"));
                family.is_none_or(|f| !text.contains(&format!("# HELP {f} ")))
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "promtool check metrics: {unexpected:?}\n{report}"
        );
    }

    #[test]
    fn frontends_are_counted_by_kind() {
        use clustergate_builder::table::{ServiceSpec, TableBuild, TableSpec};
        use clustergate_dataplane::flow::Proto;
        let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("address") };
        let fe = |kind, addr: &str, port| {
            ServiceSpec::cluster_ip(ip(addr), port, Proto::Tcp, vec![]).with_kind(kind, ip(addr))
        };
        let spec = TableSpec {
            services: vec![
                fe(FrontendKind::ClusterIp, "198.18.211.10", 80),
                fe(FrontendKind::ClusterIp, "2001:2::10", 80),
                fe(FrontendKind::NodePort, "0.0.0.0", 30080),
                fe(FrontendKind::NodePort, "::", 30080),
                fe(FrontendKind::NodePort, "0.0.0.0", 30081),
                fe(FrontendKind::LoadBalancer, "198.18.213.1", 80),
            ],
            ..TableSpec::default()
        };
        let table = Table::build_full(3, 1, &spec, 65_537).expect("table");
        let st = TableStatus::of(&table, 2);
        assert_eq!(st.frontends, [2, 3, 0, 1]);
        assert_eq!(st.node_ports_in_snat_range, 2);
        for (k, _) in FRONTEND_KINDS {
            assert!((k as usize) < st.frontends.len());
        }
    }
}
