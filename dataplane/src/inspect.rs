//! `clustergate inspect` and the gateway's `/api/v1/*`: the running
//! gateway's services with their backends' counters, its connection table,
//! and a summary of its workers, rings and drops.
//!
//! Owns: the JSON documents (a stable interface, docs/operations.md,
//! "Inspecting a running gateway"), how the gateway builds them from its
//! table, its workers' published counters and a bounded conntrack snapshot
//! ([`services`], [`flows`], [`summary`]), and the command's side: one GET
//! to the gateway ([`get`]) and the table rendering.
//!
//! Names: the snapshot (ABI 5 and later) carries each frontend's name as control
//! wrote it, `ns/name` or `ns/name:port-name` ([`Table::frontend_name`]);
//! the documents split it into `service` and `port_name` (both `null` for a
//! frontend without a name). `--service` takes a Service (`NS/NAME`) or a
//! frontend (`IP:PORT`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use clustergate_dataplane::conntrack::{Conntrack, FlowInfo, FlowNat, FlowState};
use clustergate_dataplane::flow::{addr16, ip_from16, Addr16, Proto};
use clustergate_dataplane::io::nexthop::Unresolved;
use clustergate_dataplane::io::worker::WorkerStats;
use clustergate_dataplane::pipeline::{BackendCount, BackendKey, DropReason, VerdictKind};
use clustergate_dataplane::table::{BackendState, Table};
use clustergate_dataplane::time::Now;
use serde::{Deserialize, Serialize};

use crate::gateway_http::FRONTEND_KINDS;

/// The API's version, in its paths.
pub const API: &str = "/api/v1";
/// `--limit`'s default.
pub const DEFAULT_FLOW_LIMIT: usize = 1000;
/// The most flows one answer carries.
pub const MAX_FLOW_LIMIT: usize = 100_000;

// ---------------------------------------------------------------- documents

/// `GET /api/v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesDoc {
    /// The table generation the workers use.
    pub generation: u64,
    /// One per frontend, in table order.
    pub services: Vec<Service>,
}

/// One frontend and its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// `"namespace/name"`; `null` when the table has no name for the
    /// frontend.
    pub service: Option<String>,
    /// The Service port's name; `null` for an unnamed port (or no name).
    #[serde(default)]
    pub port_name: Option<String>,
    /// `"IP:PORT"` (IPv6 in brackets; a node port's address is `0.0.0.0`
    /// or `::`, every node address the table selects).
    pub frontend: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// `clusterIP`, `nodePort`, `externalIP` or `loadBalancer`.
    pub kind: String,
    /// `snat`, `dsr` or `routed`.
    pub return_path: String,
    /// Its backends, in table order.
    pub backends: Vec<Backend>,
}

/// One backend of a frontend, with the workers' counters summed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// `"IP:PORT"`.
    pub address: String,
    /// Maglev weight (0: draining).
    pub weight: u32,
    /// `ready`, `terminating` or `draining` (weight 0).
    pub state: String,
    /// New flows bound to it since the gateway started.
    pub new_flows: u64,
    /// Frames forwarded to it (client to backend).
    pub packets: u64,
    /// Their bytes, as received.
    pub bytes: u64,
}

/// `GET /api/v1/flows`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsDoc {
    /// The flows copied, at most `limit`.
    pub flows: Vec<Flow>,
    /// The limit applied.
    pub limit: usize,
    /// True when the limit stopped the walk (more flows match).
    pub truncated: bool,
}

/// One tracked flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// `"namespace/name"` of the frontend's Service in the current table;
    /// `null` when unknown (no name, or the frontend has left the table).
    #[serde(default)]
    pub service: Option<String>,
    /// `"IP:PORT"` of the client.
    pub client: String,
    /// `"IP:PORT"` the client sent to.
    pub frontend: String,
    /// `"IP:PORT"` of the backend.
    pub backend: String,
    /// `"IP:PORT"` the gateway sends from under source NAT; `null` otherwise.
    pub snat: Option<String>,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// `syn_sent`, `established`, `closing`, `reset`, `unreplied`, `replied`.
    pub state: String,
    /// How replies come back: `snat`, `dsr` or `routed`.
    pub return_path: String,
    /// Seconds since the flow was bound.
    pub age_s: u32,
    /// Seconds since its last packet.
    pub idle_s: u32,
}

/// `GET /api/v1/summary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryDoc {
    /// The table generation the gateway applied.
    pub generation: u64,
    /// Frontends and backends of that table.
    pub frontends: u64,
    /// Backends (over all frontends).
    pub backends: u64,
    /// Flows tracked now, and the capacity per family.
    pub conntrack_entries: u64,
    /// Flows each family can hold.
    pub conntrack_capacity: u64,
    /// One per worker.
    pub workers: Vec<WorkerSummary>,
    /// One per AF_XDP socket.
    pub rings: Vec<RingSummary>,
    /// Frames dropped, by reason, summed over the workers (reasons with none
    /// left out).
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// One worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSummary {
    /// The core it is pinned to.
    pub core: usize,
    /// The table generation it used last.
    pub generation: u64,
    /// Frames received.
    pub rx_packets: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Frames forwarded.
    pub forwarded: u64,
    /// Rejects sent (TCP RST, ICMP unreachable or too big).
    pub rejected: u64,
    /// Frames dropped.
    pub dropped: u64,
    /// New flows bound.
    pub new_flows: u64,
}

/// One AF_XDP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSummary {
    /// Its worker's core.
    pub core: usize,
    /// Interface.
    pub interface: String,
    /// Queue.
    pub queue: u32,
    /// `zero-copy` or `copy` (and the like).
    pub mode: String,
    /// Frames the kernel dropped before the RX ring.
    pub rx_dropped: u64,
    /// Frames dropped for a full RX ring.
    pub rx_ring_full: u64,
}

// ---------------------------------------------------------------- building

/// `"IP:PORT"`, IPv6 in brackets.
#[must_use]
pub fn endpoint(a: &Addr16, port: u16) -> String {
    SocketAddr::new(ip_from16(*a), port).to_string()
}

/// `tcp`, `udp` or `sctp` (the number when it is none of them).
#[must_use]
pub fn proto_name(p: u8) -> String {
    Proto::from_ip_number(p).map_or_else(|| p.to_string(), |p| p.as_str().to_ascii_lowercase())
}

fn state_name(s: FlowState) -> &'static str {
    match s {
        FlowState::TcpSynSent => "syn_sent",
        FlowState::TcpEstablished => "established",
        FlowState::TcpClosing => "closing",
        FlowState::TcpReset => "reset",
        FlowState::Unreplied => "unreplied",
        FlowState::Replied => "replied",
    }
}

/// A frontend name ([`Table::frontend_name`]) split into the Service
/// (`ns/name`) and the port's name, if any. Neither a namespace nor a
/// Service name holds a `:`.
#[must_use]
pub fn split_name(name: &str) -> (String, Option<String>) {
    match name.split_once(':') {
        Some((service, port)) => (
            service.to_owned(),
            Some(port.to_owned()).filter(|p| !p.is_empty()),
        ),
        None => (name.to_owned(), None),
    }
}

/// The Service (`ns/name`) of frontend `index`, when the table names it.
fn service_of(table: &Table, index: u32) -> Option<&str> {
    let name = table.frontend_name(index)?;
    Some(name.split_once(':').map_or(name, |(s, _)| s))
}

/// The services document: `table`'s frontends, with each backend's counters
/// summed over `workers` (each counted against the table it used, matched by
/// frontend and backend).
#[must_use]
pub fn services(table: &Table, workers: &[WorkerStats]) -> ServicesDoc {
    let mut sums: HashMap<BackendKey, BackendCount> = HashMap::new();
    for w in workers {
        for (k, c) in w.backends.iter() {
            sums.entry(k).or_default().add(&c);
        }
    }
    let keys = BackendKey::all_of(table);
    let services = table
        .frontends()
        .iter()
        .enumerate()
        .map(|(index, f)| {
            let start = table.backend_base(index as u32).unwrap_or(0) as usize;
            let backends = table
                .backends_of(f)
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let c = keys
                        .get(start + i)
                        .and_then(|k| sums.get(k))
                        .copied()
                        .unwrap_or_default();
                    Backend {
                        address: endpoint(&b.addr, b.port),
                        weight: b.weight,
                        state: if b.weight == 0 {
                            "draining"
                        } else if b.state == BackendState::Terminating as u8 {
                            "terminating"
                        } else {
                            "ready"
                        }
                        .to_owned(),
                        new_flows: c.new_flows,
                        packets: c.packets,
                        bytes: c.bytes,
                    }
                })
                .collect();
            let (service, port_name) = table
                .frontend_name(index as u32)
                .map(split_name)
                .map_or((None, None), |(s, p)| (Some(s), p));
            Service {
                service,
                port_name,
                frontend: endpoint(&f.addr, f.port),
                protocol: proto_name(f.proto),
                kind: FRONTEND_KINDS
                    .iter()
                    .find(|(k, _)| *k as u8 == f.kind)
                    .map_or("unknown", |(_, l)| l)
                    .to_owned(),
                return_path: Table::return_path(f).as_str().to_owned(),
                backends,
            }
        })
        .collect();
    ServicesDoc {
        generation: table.generation(),
        services,
    }
}

/// Which flows `GET /api/v1/flows` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowQuery {
    /// Only flows to a frontend of this Service (`ns/name`) in the current
    /// table.
    pub service: Option<String>,
    /// The frontend sent to (any port when `None`).
    pub frontend: Option<(Addr16, Option<u16>)>,
    /// The backend (any port when `None`).
    pub backend: Option<(Addr16, Option<u16>)>,
    /// At most this many.
    pub limit: usize,
}

impl FlowQuery {
    /// From a query string: `service=NS/NAME`, `frontend=IP[:PORT]`,
    /// `backend=IP[:PORT]`, `limit=N` (default [`DEFAULT_FLOW_LIMIT`], at
    /// most [`MAX_FLOW_LIMIT`]).
    ///
    /// # Errors
    /// An unknown key or a value that does not parse.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut q = Self {
            service: None,
            frontend: None,
            backend: None,
            limit: DEFAULT_FLOW_LIMIT,
        };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "service" => q.service = Some(parse_service(&v)?),
                "frontend" => q.frontend = Some(parse_addr_port(&v)?),
                "backend" => q.backend = Some(parse_addr_port(&v)?),
                "limit" => {
                    q.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_FLOW_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit={v}: give 1 to {MAX_FLOW_LIMIT}"))?;
                }
                _ => return Err(format!("unknown parameter {k:?}")),
            }
        }
        Ok(q)
    }

    /// The query string that [`FlowQuery::parse`] reads back.
    #[must_use]
    pub fn query_string(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        let show = |(a, p): (Addr16, Option<u16>)| match p {
            Some(p) => endpoint(&a, p),
            None => ip_from16(a).to_string(),
        };
        if let Some(svc) = &self.service {
            s.append_pair("service", svc);
        }
        if let Some(f) = self.frontend {
            s.append_pair("frontend", &show(f));
        }
        if let Some(b) = self.backend {
            s.append_pair("backend", &show(b));
        }
        s.append_pair("limit", &self.limit.to_string());
        s.finish()
    }

    /// `services`: the frontends of [`FlowQuery::service`], when it is given
    /// (a node port's address is the unspecified one of its family).
    fn keeps(&self, services: Option<&[(Addr16, u16, u8)]>, f: &FlowInfo) -> bool {
        let m = |want: Option<(Addr16, Option<u16>)>, a: &Addr16, p: u16| {
            want.is_none_or(|(wa, wp)| wa == *a && wp.is_none_or(|wp| wp == p))
        };
        let of_service = || {
            services.is_none_or(|keys| {
                let any = addr16(if ip_from16(f.frontend).is_ipv4() {
                    IpAddr::from([0, 0, 0, 0])
                } else {
                    IpAddr::from([0u16; 8])
                });
                let proto = f.proto.ip_number();
                keys.iter().any(|&(a, p, pr)| {
                    p == f.frontend_port && pr == proto && (a == f.frontend || a == any)
                })
            })
        };
        m(self.frontend, &f.frontend, f.frontend_port)
            && m(self.backend, &f.backend, f.backend_port)
            && of_service()
    }
}

/// `NS/NAME`: a Service.
///
/// # Errors
/// When it is not two non-empty parts around one `/`.
pub fn parse_service(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name))
            if !ns.is_empty() && !name.is_empty() && !name.contains('/') && !s.contains(':') =>
        {
            Ok(s.to_owned())
        }
        _ => Err(format!("{s:?} is not a Service, NS/NAME")),
    }
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`.
///
/// # Errors
/// When it is none of those.
pub fn parse_addr_port(s: &str) -> Result<(Addr16, Option<u16>), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((addr16(sa.ip()), Some(sa.port())));
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|a| (addr16(a), None))
        .map_err(|_| format!("{s:?} is not IP, IP:PORT or [IPv6]:PORT"))
}

/// The flows document: at most `q.limit` flows from a per-shard snapshot,
/// each with its frontend's Service in `table` (the one the workers use).
///
/// # Errors
/// `q.service` names no frontend of `table`.
pub fn flows(ct: &Conntrack, now: Now, q: &FlowQuery, table: &Table) -> Result<FlowsDoc, String> {
    let services = match &q.service {
        Some(want) => {
            let keys: Vec<(Addr16, u16, u8)> = table
                .frontends()
                .iter()
                .enumerate()
                .filter(|&(i, _)| service_of(table, i as u32) == Some(want.as_str()))
                .map(|(_, f)| (f.addr, f.port, f.proto))
                .collect();
            if keys.is_empty() {
                return Err(format!(
                    "Service {want} has no frontend in table generation {}",
                    table.generation()
                ));
            }
            Some(keys)
        }
        None => None,
    };
    // One more than the limit tells whether it stopped the walk.
    let mut infos = Vec::new();
    ct.snapshot_flows(
        now,
        q.limit + 1,
        &|f| q.keeps(services.as_deref(), f),
        &mut infos,
    );
    let truncated = infos.len() > q.limit;
    infos.truncate(q.limit);
    Ok(FlowsDoc {
        flows: infos.iter().map(|f| flow(table, f)).collect(),
        limit: q.limit,
        truncated,
    })
}

/// The frontend of `table` a flow was sent to: exact, else a node port.
fn frontend_of(table: &Table, f: &FlowInfo) -> Option<u32> {
    table
        .frontend(&f.frontend, f.frontend_port, f.proto)
        .or_else(|| table.node_port(&f.frontend, f.frontend_port, f.proto))
}

fn flow(table: &Table, f: &FlowInfo) -> Flow {
    let (snat, return_path) = match f.nat {
        FlowNat::Routed => (None, "routed"),
        FlowNat::Snat { addr, port } => (Some(endpoint(&addr, port)), "snat"),
        FlowNat::Dsr { .. } => (None, "dsr"),
    };
    Flow {
        service: frontend_of(table, f)
            .and_then(|i| service_of(table, i))
            .map(str::to_owned),
        client: endpoint(&f.client, f.client_port),
        frontend: endpoint(&f.frontend, f.frontend_port),
        backend: endpoint(&f.backend, f.backend_port),
        snat,
        protocol: proto_name(f.proto.ip_number()),
        state: state_name(f.state).to_owned(),
        return_path: return_path.to_owned(),
        age_s: f.age_s,
        idle_s: f.idle_s,
    }
}

/// The summary document.
#[must_use]
pub fn summary(
    generation: u64,
    table: &Table,
    ct: &Conntrack,
    workers: &[(usize, WorkerStats)],
) -> SummaryDoc {
    let mut drops = std::collections::BTreeMap::new();
    let mut add = |k: String, v: u64| {
        if v > 0 {
            *drops.entry(k).or_insert(0) += v;
        }
    };
    for (_, w) in workers {
        for r in DropReason::ALL {
            add(r.label().to_owned(), w.pipeline.dropped(*r));
        }
        for u in Unresolved::ALL {
            add(
                format!("next_hop_{}", u.label()),
                w.io.unresolved[u as usize],
            );
        }
        add("tx_ring_full".into(), w.io.tx_ring_full);
        add("pass_unavailable".into(), w.io.pass_unavailable);
        add("handoff_full".into(), w.io.handoff_full);
    }
    let stats = ct.stats();
    SummaryDoc {
        generation,
        frontends: table.frontends().len() as u64,
        backends: table.backend_records().len() as u64,
        conntrack_entries: stats.entries,
        conntrack_capacity: ct.capacity() as u64,
        workers: workers
            .iter()
            .map(|(core, w)| WorkerSummary {
                core: *core,
                generation: w.generation,
                rx_packets: w.io.rx_packets,
                tx_packets: w.io.tx_packets,
                forwarded: w.pipeline.count(VerdictKind::Forward),
                rejected: w.pipeline.count(VerdictKind::Reject),
                dropped: w.pipeline.count(VerdictKind::Drop),
                new_flows: w.pipeline.new_flows,
            })
            .collect(),
        rings: workers
            .iter()
            .flat_map(|(core, w)| {
                w.ports.iter().map(move |p| RingSummary {
                    core: *core,
                    interface: p.ifname.clone(),
                    queue: p.queue,
                    mode: p.mode.label().to_owned(),
                    rx_dropped: p.rings.rx_dropped,
                    rx_ring_full: p.rings.rx_ring_full,
                })
            })
            .collect(),
        drops,
    }
}

// ---------------------------------------------------------------- the command

/// `clustergate inspect`'s flags.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The gateway's `--metrics` address.
    #[arg(long, global = true, default_value = "127.0.0.1:10257")]
    pub server: SocketAddr,
    /// `table` for people, `json` for programs (the API's documents as they
    /// are).
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// What to show.
    #[command(subcommand)]
    pub what: What,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

/// `clustergate inspect` subcommands.
#[derive(Debug, Subcommand)]
pub enum What {
    /// Every frontend with its backends and their counters, and the table
    /// generation.
    Services,
    /// The connection table (a bounded snapshot).
    Flows {
        /// Only flows to this Service's frontends (`NS/NAME`), or to this
        /// frontend (`IP:PORT`, or `IP` for any port).
        #[arg(long, value_name = "NS/NAME|IP:PORT")]
        service: Option<String>,
        /// Only flows to this backend, `IP` or `IP:PORT`.
        #[arg(long, value_name = "ADDR")]
        backend: Option<String>,
        /// At most this many flows.
        #[arg(long, default_value_t = DEFAULT_FLOW_LIMIT as u32, value_parser = clap::value_parser!(u32).range(1..=MAX_FLOW_LIMIT as i64))]
        limit: u32,
    },
    /// Workers, rings, drops by reason, the table generation.
    Summary,
}

/// Runs `clustergate inspect`, printing to stdout.
///
/// # Errors
/// A bad filter, or the gateway could not be asked or answered badly.
pub fn run(args: &InspectArgs) -> Result<()> {
    let out = match &args.what {
        What::Services => {
            let body = get(args.server, &format!("{API}/services"))?;
            render::<ServicesDoc>(&body, args.output, render_services)?
        }
        What::Flows {
            service,
            backend,
            limit,
        } => {
            let (service, frontend) = match service {
                Some(s) => match parse_addr_port(s) {
                    Ok(f) => (None, Some(f)),
                    Err(_) => (
                        Some(parse_service(s).map_err(|_| {
                            anyhow::anyhow!("--service: {s:?} is neither NS/NAME nor IP:PORT")
                        })?),
                        None,
                    ),
                },
                None => (None, None),
            };
            let backend = backend
                .as_deref()
                .map(parse_addr_port)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--backend: {e}"))?;
            let q = FlowQuery {
                service,
                frontend,
                backend,
                limit: *limit as usize,
            };
            let body = get(args.server, &format!("{API}/flows?{}", q.query_string()))?;
            render::<FlowsDoc>(&body, args.output, render_flows)?
        }
        What::Summary => {
            let body = get(args.server, &format!("{API}/summary"))?;
            render::<SummaryDoc>(&body, args.output, render_summary)?
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    Ok(())
}

fn render<T: for<'de> Deserialize<'de> + Serialize>(
    body: &str,
    output: Output,
    table: fn(&T) -> String,
) -> Result<String> {
    let doc: T =
        serde_json::from_str(body).context("the gateway's answer is not the expected JSON")?;
    Ok(match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&doc)?),
        Output::Table => table(&doc),
    })
}

/// One `GET path` to the gateway at `server`; the body of a 200 answer.
///
/// # Errors
/// Connection failures, a non-200 answer (its body is the message), or an
/// answer that is not HTTP.
pub fn get(server: SocketAddr, path: &str) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(3))
        .with_context(|| format!("connecting to the gateway at {server} (--server)"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(3)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {server}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => bail!("GET {path}: the answer was cut short"),
        Err(e) => bail!("GET {path}: not an HTTP answer: {e}"),
    };
    let code = resp.code.unwrap_or(0);
    let body = String::from_utf8_lossy(&raw[head..]).into_owned();
    if code != 200 {
        bail!("GET {path}: {code}: {}", body.trim());
    }
    Ok(body)
}

/// Columns, each as wide as its widest cell, two spaces apart.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (c, w) in cells.zip(&width) {
            let _ = write!(l, "{c:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// `inspect services` as a table: one line per frontend, then one per backend.
#[must_use]
pub fn render_services(doc: &ServicesDoc) -> String {
    let mut rows = Vec::new();
    for s in &doc.services {
        let name = match (&s.service, &s.port_name) {
            (Some(svc), Some(port)) => format!("{svc}:{port}"),
            (Some(svc), None) => svc.clone(),
            (None, _) => "-".into(),
        };
        rows.push(vec![
            name,
            format!("{}/{}", s.frontend, s.protocol),
            s.kind.clone(),
            s.return_path.clone(),
            format!("{} backends", s.backends.len()),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        for b in &s.backends {
            rows.push(vec![
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                format!("-> {}", b.address),
                b.weight.to_string(),
                b.state.clone(),
                b.new_flows.to_string(),
                format!("{}/{}", b.packets, b.bytes),
            ]);
        }
    }
    format!(
        "table generation {}\n{}",
        doc.generation,
        columns(
            &[
                "SERVICE",
                "FRONTEND",
                "KIND",
                "RETURN",
                "BACKEND",
                "WEIGHT",
                "STATE",
                "NEW-FLOWS",
                "PACKETS/BYTES",
            ],
            &rows,
        )
    )
}

/// `inspect flows` as a table.
#[must_use]
pub fn render_flows(doc: &FlowsDoc) -> String {
    let rows: Vec<Vec<String>> = doc
        .flows
        .iter()
        .map(|f| {
            vec![
                f.service.clone().unwrap_or_else(|| "-".into()),
                f.protocol.clone(),
                f.client.clone(),
                f.frontend.clone(),
                f.backend.clone(),
                f.snat.clone().unwrap_or_else(|| "-".into()),
                f.state.clone(),
                f.age_s.to_string(),
                f.idle_s.to_string(),
            ]
        })
        .collect();
    let mut out = columns(
        &[
            "SERVICE", "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "STATE", "AGE(s)",
            "IDLE(s)",
        ],
        &rows,
    );
    if doc.truncated {
        let _ = writeln!(
            out,
            "(first {} flows: more match; raise --limit)",
            doc.limit
        );
    }
    out
}

/// `inspect summary` as text.
#[must_use]
pub fn render_summary(doc: &SummaryDoc) -> String {
    let mut out = format!(
        "table generation {}: {} frontends, {} backends\nconntrack: {} flows (capacity {} per family)\n\n",
        doc.generation, doc.frontends, doc.backends, doc.conntrack_entries, doc.conntrack_capacity
    );
    let rows: Vec<Vec<String>> = doc
        .workers
        .iter()
        .map(|w| {
            vec![
                w.core.to_string(),
                w.generation.to_string(),
                w.rx_packets.to_string(),
                w.tx_packets.to_string(),
                w.forwarded.to_string(),
                w.rejected.to_string(),
                w.dropped.to_string(),
                w.new_flows.to_string(),
            ]
        })
        .collect();
    out.push_str(&columns(
        &[
            "WORKER",
            "GEN",
            "RX",
            "TX",
            "FORWARDED",
            "REJECTED",
            "DROPPED",
            "NEW-FLOWS",
        ],
        &rows,
    ));
    let rows: Vec<Vec<String>> = doc
        .rings
        .iter()
        .map(|r| {
            vec![
                r.core.to_string(),
                r.interface.clone(),
                r.queue.to_string(),
                r.mode.clone(),
                r.rx_dropped.to_string(),
                r.rx_ring_full.to_string(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&columns(
        &[
            "WORKER",
            "INTERFACE",
            "QUEUE",
            "MODE",
            "RX-DROPPED",
            "RX-RING-FULL",
        ],
        &rows,
    ));
    out.push_str("\ndrops:");
    if doc.drops.is_empty() {
        out.push_str(" none");
    }
    out.push('\n');
    for (reason, n) in &doc.drops {
        let _ = writeln!(out, "  {reason:<28} {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose

    use super::*;
    use clustergate_builder::table::{BackendSpec, ServiceSpec, TableBuild};
    use clustergate_dataplane::conntrack::{Binding, Config};
    use clustergate_dataplane::flow::FlowTuple;
    use clustergate_dataplane::packet::parse::Family;
    use clustergate_dataplane::snat::PortRange;
    use clustergate_dataplane::table::ReturnPath;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table(generation: u64) -> Table {
        let mut draining = BackendSpec::ready(ip("2001:2::7"), 8443);
        draining.weight = 0;
        Table::build(
            generation,
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
                )
                .with_name("default/web:http"),
                ServiceSpec::cluster_ip(ip("2001:2::10"), 443, Proto::Udp, vec![draining])
                    .with_return_path(ReturnPath::Snat),
            ],
        )
        .unwrap()
    }

    #[test]
    fn services_sum_the_workers_counters_by_backend() {
        let old = table(1);
        let new = table(2);
        let mut a = WorkerStats::default();
        a.backends.follow(&old);
        a.backends.fronts[0].counts[1] = BackendCount {
            new_flows: 2,
            packets: 10,
            bytes: 1000,
        };
        // The other worker already moved to generation 2.
        let mut b = WorkerStats::default();
        b.backends.follow(&new);
        b.backends.fronts[0].counts[1].packets = 5;
        b.backends.fronts[0].counts[1].bytes = 50;
        let doc = services(&new, &[a, b]);
        assert_eq!(doc.generation, 2);
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "generation": 2,
                "services": [
                    {
                        "service": "default/web",
                        "port_name": "http",
                        "frontend": "198.18.211.10:80",
                        "protocol": "tcp",
                        "kind": "clusterIP",
                        "return_path": "routed",
                        "backends": [
                            {"address": "198.18.1.1:8080", "weight": 1, "state": "ready",
                             "new_flows": 0, "packets": 0, "bytes": 0},
                            {"address": "198.18.1.2:8080", "weight": 1, "state": "ready",
                             "new_flows": 2, "packets": 15, "bytes": 1050},
                        ]
                    },
                    {
                        "service": null,
                        "port_name": null,
                        "frontend": "[2001:2::10]:443",
                        "protocol": "udp",
                        "kind": "clusterIP",
                        "return_path": "snat",
                        "backends": [
                            {"address": "[2001:2::7]:8443", "weight": 0, "state": "draining",
                             "new_flows": 0, "packets": 0, "bytes": 0},
                        ]
                    }
                ]
            })
        );
        let text = render_services(&doc);
        assert!(text.starts_with("table generation 2\nSERVICE"), "{text}");
        assert!(text.contains("-> 198.18.1.2:8080"), "{text}");
        assert!(text.contains("15/1050"), "{text}");
        assert!(
            text.contains("\ndefault/web:http  198.18.211.10:80/tcp"),
            "{text}"
        );
        // The JSON reads back as the same document (the command's side).
        let back: ServicesDoc = serde_json::from_value(json).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn flows_render_as_the_documented_json() {
        let ct = Conntrack::new(&Config {
            capacity: 1024,
            shards: 4,
            partitions: 1,
            affinity_capacity: 16,
            fragment_capacity: 16,
            ..Config::default()
        });
        let t0 = Now::from_secs(10);
        let t = FlowTuple {
            src_addr: addr16(ip("198.18.0.2")),
            dst_addr: addr16(ip("198.18.211.10")),
            src_port: 40000,
            dst_port: 80,
            proto: Proto::Tcp,
        };
        let b = Binding {
            backend: addr16(ip("198.18.1.2")),
            backend_port: 8080,
            frontend: 0,
            epoch: 1,
            backend_index: 1,
            nat: FlowNat::Routed,
        };
        ct.insert(t0, Family::V4, &t, &b, FlowState::TcpSynSent)
            .unwrap();
        let t6 = FlowTuple {
            src_addr: addr16(ip("2001:2::2")),
            dst_addr: addr16(ip("2001:2::10")),
            src_port: 5353,
            dst_port: 443,
            proto: Proto::Udp,
        };
        let b6 = Binding {
            backend: addr16(ip("2001:2::7")),
            backend_port: 8443,
            ..b
        };
        let nat = ct
            .insert_snat(
                t0,
                Family::V6,
                &t6,
                &b6,
                FlowState::Unreplied,
                &[addr16(ip("2001:2::99"))],
                PortRange::new(2000, 2000).unwrap(),
            )
            .unwrap();
        assert_eq!(
            nat,
            FlowNat::Snat {
                addr: addr16(ip("2001:2::99")),
                port: 2000
            }
        );
        let table = table(1);
        let all = FlowQuery::parse("").unwrap();
        let doc = flows(&ct, Now::from_secs(13), &all, &table).unwrap();
        assert_eq!(
            serde_json::to_value(&doc).unwrap(),
            serde_json::json!({
                "flows": [
                    {"service": "default/web",
                     "client": "198.18.0.2:40000", "frontend": "198.18.211.10:80",
                     "backend": "198.18.1.2:8080", "snat": null, "protocol": "tcp",
                     "state": "syn_sent", "return_path": "routed", "age_s": 3, "idle_s": 3},
                    {"service": null,
                     "client": "[2001:2::2]:5353", "frontend": "[2001:2::10]:443",
                     "backend": "[2001:2::7]:8443", "snat": "[2001:2::99]:2000",
                     "protocol": "udp", "state": "unreplied", "return_path": "snat",
                     "age_s": 3, "idle_s": 3},
                ],
                "limit": 1000,
                "truncated": false,
            })
        );
        // Filters and the limit, through the query string the command sends.
        let q = FlowQuery {
            service: None,
            frontend: None,
            backend: Some((addr16(ip("2001:2::7")), None)),
            limit: 5,
        };
        let q = FlowQuery::parse(&q.query_string()).unwrap();
        let doc = flows(&ct, Now::from_secs(13), &q, &table).unwrap();
        assert_eq!(doc.flows.len(), 1);
        assert_eq!(doc.flows[0].backend, "[2001:2::7]:8443");
        let q = FlowQuery::parse("frontend=198.18.211.10%3A80&limit=1").unwrap();
        assert_eq!(q.frontend, Some((addr16(ip("198.18.211.10")), Some(80))));
        let doc = flows(&ct, Now::from_secs(13), &q, &table).unwrap();
        assert_eq!((doc.flows.len(), doc.truncated), (1, false));
        // By Service, through the query string the command sends.
        let q = FlowQuery {
            service: Some(parse_service("default/web").unwrap()),
            frontend: None,
            backend: None,
            limit: 10,
        };
        let q = FlowQuery::parse(&q.query_string()).unwrap();
        assert_eq!(q.service.as_deref(), Some("default/web"));
        let doc = flows(&ct, Now::from_secs(13), &q, &table).unwrap();
        assert_eq!(doc.flows.len(), 1);
        assert_eq!(doc.flows[0].backend, "198.18.1.2:8080");
        let q = FlowQuery::parse("service=default/nope").unwrap();
        assert_eq!(
            flows(&ct, Now::from_secs(13), &q, &table).unwrap_err(),
            "Service default/nope has no frontend in table generation 1"
        );
        assert!(FlowQuery::parse("service=web").is_err());
        let doc = flows(
            &ct,
            Now::from_secs(13),
            &FlowQuery::parse("limit=1").unwrap(),
            &table,
        )
        .unwrap();
        assert_eq!((doc.flows.len(), doc.truncated), (1, true));
        assert!(render_flows(&doc).contains("raise --limit"));
        assert!(FlowQuery::parse("limit=0").is_err());
        assert!(FlowQuery::parse("colour=red").is_err());
        assert!(FlowQuery::parse("backend=nope").is_err());
        let text = render_flows(&flows(&ct, Now::from_secs(13), &all, &table).unwrap());
        assert!(text.starts_with("SERVICE      PROTO  CLIENT"), "{text}");
        assert!(text.contains("\ndefault/web  tcp"), "{text}");
        assert!(text.contains("[2001:2::99]:2000"), "{text}");
    }

    #[test]
    fn addresses_with_and_without_ports() {
        assert_eq!(
            parse_addr_port("198.18.1.1").unwrap(),
            (addr16(ip("198.18.1.1")), None)
        );
        assert_eq!(
            parse_addr_port("[2001:2::1]:80").unwrap(),
            (addr16(ip("2001:2::1")), Some(80))
        );
        assert_eq!(
            parse_addr_port("2001:2::1").unwrap(),
            (addr16(ip("2001:2::1")), None)
        );
        assert!(parse_addr_port("default/web").is_err());
        assert_eq!(parse_service("default/web").unwrap(), "default/web");
        for bad in ["web", "/web", "default/", "a/b/c", "default/web:http"] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_name("default/web:http"),
            ("default/web".to_owned(), Some("http".to_owned()))
        );
        assert_eq!(split_name("default/web"), ("default/web".to_owned(), None));
    }
}
