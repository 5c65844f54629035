//! `clustergate replay`: runs every packet of a pcap through the real pipeline.
//!
//! Owns: reading an Ethernet pcap, taking the clock from its timestamps,
//! writing the forwarded and rejected frames to another pcap, and one verdict
//! line per packet. It tells people and tests exactly what the gateway would do
//! with that traffic and that table. Thin I/O around the pure core: the
//! decisions are `Worker::process`'s, nothing else.
//!
//! Ethernet addresses of forwarded frames are left as captured: at run time
//! the gateway resolves the next hop through the kernel's neighbour table.
//!
//! Node ports: with `--nodeport-addresses`, every address within those
//! prefixes is taken as the node's ([`PrefixNodeAddrs`]); without, every
//! address within the snapshot's node-port addresses is.
//!
//! Return paths: the one replay worker has the whole SNAT range and the
//! `--snat-address` overrides; with no routes to ask, the gateway's own
//! address for a flow is the first `--snat-address` of its family (source
//! NAT and DSR frontends drop as `snat_no_address` without one).

use std::io::{Read, Write};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clustergate_dataplane::conntrack::{Config, Conntrack, ConntrackStats, FlowClass, PerClass};
use clustergate_dataplane::flow::{ip_from16, Addr16};
use clustergate_dataplane::pipeline::{Counters, NodeAddrs, Side, Verdict, VerdictKind, Worker};
use clustergate_dataplane::snat::{FixedSources, ReturnConfig};
use clustergate_dataplane::table::Table;
use clustergate_dataplane::time::Now;
use ipnet::IpNet;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::DataLink;

/// Room a frame buffer has beyond the captured bytes, for rejects (an ICMP
/// error quoting a short packet is longer than the packet).
const HEADROOM: usize = 1600;

/// The node's addresses as replay sees them: every address within some
/// prefixes (`--nodeport-addresses`, as kube-proxy takes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixNodeAddrs(pub Vec<IpNet>);

impl NodeAddrs for PrefixNodeAddrs {
    fn is_node_addr(&self, addr: &Addr16) -> bool {
        let ip = ip_from16(*addr);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// What a replay did, for the summary line.
#[derive(Debug, Default)]
pub struct Summary {
    /// Packets read.
    pub packets: u64,
    /// Packets written to the output pcap (forwarded and rejected).
    pub written: u64,
    /// Captures shorter than the packet on the wire (snap length).
    pub truncated_captures: u64,
    /// The worker's counters.
    pub counters: Counters,
    /// The connection table's counters at the end.
    pub conntrack: ConntrackStats,
    /// Flows per family the connection table holds.
    pub capacity: usize,
}

/// Replays `input` (a pcap of Ethernet frames) through `table` with one
/// worker configured by `ret`; writes the forwarded and rejected frames to
/// `out` and, if given, one line per packet to `verdicts`. `node_addrs`:
/// the node's addresses for node ports (`None`: every address within the
/// table's node-port addresses).
///
/// # Errors
/// A pcap that cannot be read or is not Ethernet, or a write that fails.
pub fn replay<R: Read, W: Write>(
    table: &Table,
    flows: usize,
    ret: ReturnConfig,
    node_addrs: Option<PrefixNodeAddrs>,
    input: R,
    out: W,
    mut verdicts: Option<&mut dyn Write>,
) -> Result<Summary> {
    let mut reader = PcapReader::new(input).context("reading the pcap header")?;
    let header = reader.header();
    if header.datalink != DataLink::ETHERNET {
        bail!(
            "pcap link type {:?}: only Ethernet (link type 1) is supported",
            header.datalink
        );
    }
    let mut writer = PcapWriter::with_header(
        out,
        PcapHeader {
            datalink: DataLink::ETHERNET,
            ts_resolution: header.ts_resolution,
            snaplen: header.snaplen.max(65_535),
            ..PcapHeader::default()
        },
    )
    .context("writing the output pcap header")?;
    let ct = Arc::new(Conntrack::new(&Config {
        capacity: flows,
        shards: 64,
        partitions: 1,
        ..Config::default()
    }));
    let sources = FixedSources {
        v4: ret.snat_v4.first().copied(),
        v6: ret.snat_v6.first().copied(),
    };
    let mut worker = Worker::with_config(Arc::clone(&ct), ret);
    worker.set_sources(Some(Arc::new(sources)));
    worker.set_node_addrs(node_addrs.map(|n| Arc::new(n) as Arc<dyn NodeAddrs>));
    let mut summary = Summary::default();
    let mut buf = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let packet = packet.with_context(|| format!("reading packet {}", summary.packets + 1))?;
        summary.packets += 1;
        let n = summary.packets;
        let data = &packet.data;
        if (packet.orig_len as usize) > data.len() {
            summary.truncated_captures += 1;
        }
        buf.clear();
        buf.resize(data.len() + HEADROOM, 0);
        buf[..data.len()].copy_from_slice(data);
        let now = Now(u64::try_from(packet.timestamp.as_nanos()).unwrap_or(u64::MAX));
        let verdict = worker.process(now, table, &mut buf, data.len());
        let line = match verdict {
            Verdict::Forward { len, next_hop } => {
                let side = match next_hop.side {
                    Side::Backend => "backend",
                    Side::Client => "client",
                };
                write_frame(&mut writer, packet.timestamp, &buf[..len])?;
                summary.written += 1;
                format!(
                    "{n} forward to={} side={side} len={len}",
                    ip_from16(next_hop.addr)
                )
            }
            Verdict::Reject { len } => {
                write_frame(&mut writer, packet.timestamp, &buf[..len])?;
                summary.written += 1;
                format!("{n} reject len={len}")
            }
            Verdict::Pass => format!("{n} pass"),
            Verdict::Handoff { owner } => format!("{n} handoff owner={owner}"),
            Verdict::Drop(reason) => format!("{n} drop reason={}", reason.label()),
        };
        if let Some(v) = verdicts.as_deref_mut() {
            writeln!(v, "{line}").context("writing the verdicts file")?;
        }
    }
    if let Some(v) = verdicts {
        v.flush().context("writing the verdicts file")?;
    }
    writer
        .into_writer()
        .flush()
        .context("writing the output pcap")?;
    summary.counters = worker.counters;
    summary.conntrack = ct.stats();
    summary.capacity = ct.capacity();
    Ok(summary)
}

/// `N (class=n class=n …)`: a per-class count and its nonzero classes.
fn by_class(v: &PerClass) -> String {
    let total: u64 = v.iter().sum();
    let parts: Vec<String> = FlowClass::ALL
        .iter()
        .filter(|c| v[**c as usize] > 0)
        .map(|c| format!("{}={}", c.label(), v[*c as usize]))
        .collect();
    if parts.is_empty() {
        total.to_string()
    } else {
        format!("{total} ({})", parts.join(" "))
    }
}

fn write_frame<W: Write>(
    w: &mut PcapWriter<W>,
    ts: std::time::Duration,
    frame: &[u8],
) -> Result<()> {
    let len = u32::try_from(frame.len()).context("frame longer than 4 GiB")?;
    w.write_packet(&PcapPacket::new(ts, len, frame))
        .context("writing a packet to the output pcap")?;
    Ok(())
}

/// One line for people: how many packets got which verdict.
#[must_use]
pub fn summary_line(s: &Summary) -> String {
    let c = &s.counters;
    let mut line = format!(
        "replay: {} packets: {} forward, {} reject, {} pass, {} drop; {} written",
        s.packets,
        c.count(VerdictKind::Forward),
        c.count(VerdictKind::Reject),
        c.count(VerdictKind::Pass),
        c.count(VerdictKind::Drop),
        s.written
    );
    let ct = &s.conntrack;
    line.push_str(&format!(
        "; conntrack: {} flows (capacity {} per family), {} expired, evicted unconfirmed {}, refused {}, clashes {}",
        ct.entries,
        s.capacity,
        ct.expired,
        by_class(&ct.evicted),
        by_class(&ct.refused),
        ct.clashes
    ));
    if s.truncated_captures > 0 {
        line.push_str(&format!(
            "; {} captures were cut short by the snap length",
            s.truncated_captures
        ));
    }
    line
}
