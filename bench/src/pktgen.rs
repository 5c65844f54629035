//! `clustergate-bench pktgen`: the AF_XDP traffic generator (runs in the
//! client namespace).
//!
//! Owns: one thread per queue, each with its own [`Ports`] on that one queue,
//! writing [`wire`] frames for its share of the flows into free UMEM frames
//! and putting them on its TX ring, rate-limited by a token bucket, until the
//! duration or the count is reached; then one JSON result line on stdout.
//!
//! Thread `q` of `Q` sends flows `q, q+Q, q+2Q, …` (wrapping at `--flows`)
//! and numbers its `n`-th frame `n·Q + q`, so sequence numbers are unique
//! and increase within every flow. In copy mode (veth) the generator is
//! closed-loop: a frame completes when the kernel frees its skb, so a slow
//! receiver slows the generator. `sent` counts completed frames.
//!
//! It never allocates and reads the clock once per batch in the loop; no XDP
//! program is needed on the sending side.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use clustergate_dataplane::io::nexthop::ifindex_by_name;
use clustergate_dataplane::io::xsk::{FrameToken, Iface, Ports, XskOptions, ZeroCopy};
use serde::{Deserialize, Serialize};

use crate::layout::{
    flow_service, flow_source_ip, parse_family, vip_ip, Family, CLIENT_MAC, MAX_FLOWS,
    MAX_SERVICES, SERVICE_PORT,
};
use crate::wire::{min_frame, Fields, L4Proto, Template, MAX_FRAME};

/// Frames per TX batch.
const BATCH: usize = 64;
// `with_frames` hands over at most RX_BATCH frames per call.
const _: () = assert!(BATCH <= clustergate_dataplane::io::xsk::RX_BATCH);
/// Longest wait for completions at the end.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// Sleep instead of yielding when the next token is further away than
/// this. Staying runnable for shorter waits keeps the send times on
/// schedule: a sleeping (halted) vCPU can take far longer to wake than asked.
const SLEEP_OVER_NS: u64 = 200_000;

/// Flags of `clustergate-bench pktgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Interface to send on.
    #[arg(long, default_value = "c0")]
    pub iface: String,
    /// TX queues, comma-separated; one thread (and socket) per queue.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub queues: Vec<u32>,
    /// Cores, comma-separated: thread i is pinned to the i-th.
    #[arg(long, value_delimiter = ',')]
    pub cores: Option<Vec<usize>>,
    /// Services (VIPs 198.19.x.y:80); flow f goes to service f % S.
    #[arg(long, default_value_t = 1)]
    pub services: u32,
    /// Flows (source address × source port), 1..=4000000.
    #[arg(long, default_value_t = 1000)]
    pub flows: u32,
    /// Send every flow to service K instead.
    #[arg(long, value_name = "K")]
    pub only_service: Option<u32>,
    /// Transport protocol (TCP: SYN first, then ACKs).
    #[arg(long, value_enum, default_value_t = L4Proto::Udp)]
    pub proto: L4Proto,
    /// Ethernet frame length without FCS, 64..=1500 (IPv6: 84..=1500).
    #[arg(long, default_value_t = 64, value_name = "B")]
    pub frame_size: usize,
    /// Address family: 4 (198.18.0.0/15) or 6 (2001:2::/48, VIPs
    /// 2001:2:0:100::/64).
    #[arg(long, default_value = "4", value_parser = parse_family)]
    pub family: Family,
    /// Packets per second over all threads; 0 = as fast as possible.
    #[arg(long, default_value_t = 0, value_name = "PPS")]
    pub rate: u64,
    /// How long to send, 0.1..=600 seconds.
    #[arg(long, default_value_t = 10.0, value_name = "D")]
    pub duration_s: f64,
    /// Stop after this many frames in all (or at the duration, if earlier).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Ethernet destination (default: the gateway's g0).
    #[arg(long, value_parser = parse_mac, default_value = "02:cb:01:00:00:01")]
    pub dst_mac: MacAddr,
}

/// An Ethernet address as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

/// Parses `aa:bb:cc:dd:ee:ff`.
///
/// # Errors
/// Not six colon-separated hex bytes.
pub fn parse_mac(s: &str) -> Result<MacAddr, String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(|| format!("{s:?}: not a MAC"))?;
        if p.len() != 2 {
            return Err(format!("{s:?}: not a MAC"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: not a MAC"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{s:?}: not a MAC"));
    }
    Ok(MacAddr(mac))
}

/// `CLOCK_MONOTONIC` in ns: the one clock every namespace shares.
#[must_use]
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// Frames one queue's thread sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSent {
    /// Queue id.
    pub queue: u32,
    /// Frames completed by the kernel.
    pub sent: u64,
}

/// The final line: `{"event":"result",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PktgenResult {
    /// Frames the kernel completed (taken off the completion rings), over
    /// all queues.
    pub sent: u64,
    /// From the first batch to the end of sending (deadline, count or
    /// signal), over all threads; the drain is not included.
    pub elapsed_s: f64,
    /// `sent / elapsed_s`.
    pub offered_pps: f64,
    /// `CLOCK_MONOTONIC` ns of the first batch (0 when nothing was sent).
    pub first_ns: u64,
    /// `CLOCK_MONOTONIC` ns of the last batch (0 when nothing was sent).
    pub last_ns: u64,
    /// Per queue.
    pub queues: Vec<QueueSent>,
}

/// The JSON lines pktgen prints on stdout, tagged by `event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum PktgenEvent {
    /// The final result.
    Result(PktgenResult),
}

/// Validated flags.
#[derive(Debug, Clone)]
struct Plan {
    queues: Vec<u32>,
    cores: Option<Vec<usize>>,
    services: u32,
    flows: u32,
    only_service: Option<u32>,
    rate: u64,
    duration_ns: u64,
    count: Option<u64>,
    template: Template,
}

fn plan(a: &Args) -> Result<Plan> {
    ensure!(!a.iface.is_empty(), "--iface: must not be empty");
    ensure!(!a.queues.is_empty(), "--queues: give at least one queue");
    for (i, q) in a.queues.iter().enumerate() {
        ensure!(
            *q < 64,
            "--queues {}: queue {q} is not 0..=63",
            list(&a.queues)
        );
        ensure!(
            !a.queues[..i].contains(q),
            "--queues {}: queue {q} is given twice",
            list(&a.queues)
        );
    }
    if let Some(c) = &a.cores {
        ensure!(
            c.len() >= a.queues.len(),
            "--cores {}: {} cores for {} queues (one core per queue thread)",
            list(c),
            c.len(),
            a.queues.len()
        );
    }
    ensure!(
        (1..=MAX_SERVICES).contains(&a.services),
        "--services {}: must be 1..={MAX_SERVICES}",
        a.services
    );
    ensure!(
        (1..=MAX_FLOWS).contains(&a.flows),
        "--flows {}: must be 1..={MAX_FLOWS}",
        a.flows
    );
    ensure!(
        a.flows as usize >= a.queues.len(),
        "--flows {}: fewer flows than queues ({}); every queue needs one",
        a.flows,
        a.queues.len()
    );
    if let Some(k) = a.only_service {
        ensure!(
            k < a.services,
            "--only-service {k}: must be one of the --services {} (0..={})",
            a.services,
            a.services - 1
        );
    }
    let min = min_frame(a.family);
    ensure!(
        (min..=MAX_FRAME).contains(&a.frame_size),
        "--frame-size {}: must be {min}..={MAX_FRAME} (IPv{})",
        a.frame_size,
        a.family.number()
    );
    ensure!(
        a.duration_s.is_finite() && (0.1..=600.0).contains(&a.duration_s),
        "--duration-s {}: must be 0.1..=600",
        a.duration_s
    );
    if let Some(n) = a.count {
        ensure!(n >= 1, "--count {n}: must be at least 1");
    }
    let template = Template::new_in(a.family, a.proto, a.frame_size, CLIENT_MAC, a.dst_mac.0)
        .with_context(|| format!("--frame-size {}", a.frame_size))?;
    Ok(Plan {
        queues: a.queues.clone(),
        cores: a.cores.clone(),
        services: a.services,
        flows: a.flows,
        only_service: a.only_service,
        rate: a.rate,
        duration_ns: (a.duration_s * 1e9) as u64,
        count: a.count,
        template,
    })
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// What one thread did.
#[derive(Debug, Clone, Copy, Default)]
struct ThreadOut {
    completed: u64,
    first_ns: Option<u64>,
    last_ns: Option<u64>,
    end_ns: u64,
}

/// One thread's share of the flows and its numbering.
#[derive(Debug, Clone, Copy)]
struct Flows {
    /// This thread's index and the number of threads.
    index: u32,
    threads: u32,
    /// Flows in this thread: `index + k·threads` for k < `own`.
    own: u64,
    services: u32,
    only_service: Option<u32>,
    family: Family,
}

impl Flows {
    fn new(index: u32, threads: u32, plan: &Plan) -> Self {
        Self {
            index,
            threads,
            own: u64::from(plan.flows - index).div_ceil(u64::from(threads)),
            services: plan.services,
            only_service: plan.only_service,
            family: plan.template.family(),
        }
    }

    /// The fields of this thread's `n`-th frame (ts set by the caller).
    fn fields(&self, n: u64, pos: u64) -> Fields {
        let flow = self.index + (pos as u32) * self.threads;
        let service = self
            .only_service
            .unwrap_or_else(|| flow_service(flow, self.services));
        Fields {
            src: flow_source_ip(self.family, flow),
            dst: (vip_ip(self.family, service), SERVICE_PORT),
            flow,
            seq: n * u64::from(self.threads) + u64::from(self.index),
            ts: 0,
            syn: n < self.own,
        }
    }
}

/// Runs `clustergate-bench pktgen`.
///
/// # Errors
/// A flag out of range, an interface or socket that cannot be opened, a
/// core that cannot be pinned.
pub fn run(args: &Args) -> Result<()> {
    let plan = Arc::new(plan(args)?);
    let ifindex =
        ifindex_by_name(&args.iface).with_context(|| format!("--iface {}", args.iface))?;
    let iface = Iface {
        name: args.iface.clone(),
        ifindex,
        slot: 0,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .with_context(|| format!("registering a handler for signal {sig}"))?;
    }
    let threads = plan.queues.len() as u32;
    // Every thread opens its socket, reports, then all start together.
    let barrier = Arc::new(Barrier::new(plan.queues.len() + 1));
    let (opened_tx, opened_rx) = mpsc::channel::<Result<()>>();
    let mut handles = Vec::with_capacity(plan.queues.len());
    for (i, &queue) in plan.queues.iter().enumerate() {
        let (plan, iface, stop, barrier, opened) = (
            Arc::clone(&plan),
            iface.clone(),
            Arc::clone(&stop),
            Arc::clone(&barrier),
            opened_tx.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("pktgen-q{queue}"))
            .spawn(move || -> Result<ThreadOut> {
                let ports = open(&plan, i, &iface, queue);
                // The error itself goes to the main thread; this one only
                // has to leave.
                let _ = opened.send(
                    ports
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| anyhow::anyhow!("{e:#}")),
                );
                barrier.wait();
                let Ok(ports) = ports else {
                    return Ok(ThreadOut::default());
                };
                if stop.load(Ordering::Relaxed) {
                    return Ok(ThreadOut::default());
                }
                Ok(send_loop(
                    ports,
                    &plan,
                    Flows::new(i as u32, threads, &plan),
                    &stop,
                ))
            })
            .context("spawning a pktgen thread")?;
        handles.push(h);
    }
    drop(opened_tx);
    let mut first_err = None;
    for _ in 0..plan.queues.len() {
        match opened_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("a pktgen thread died while opening"));
            }
        }
    }
    if first_err.is_some() {
        stop.store(true, Ordering::Relaxed);
    }
    barrier.wait();
    let mut outs = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(Ok(o)) => outs.push(o),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("a pktgen thread panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let result = summarise(&plan.queues, &outs);
    let line = serde_json::to_string(&PktgenEvent::Result(result))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn summarise(queues: &[u32], outs: &[ThreadOut]) -> PktgenResult {
    let sent = outs.iter().map(|o| o.completed).sum::<u64>();
    let first_ns = outs.iter().filter_map(|o| o.first_ns).min();
    let last_ns = outs.iter().filter_map(|o| o.last_ns).max().unwrap_or(0);
    let end_ns = outs.iter().map(|o| o.end_ns).max().unwrap_or(0);
    let elapsed_s = first_ns.map_or(0.0, |f| end_ns.saturating_sub(f) as f64 / 1e9);
    PktgenResult {
        sent,
        elapsed_s,
        offered_pps: if elapsed_s > 0.0 {
            sent as f64 / elapsed_s
        } else {
            0.0
        },
        first_ns: first_ns.unwrap_or(0),
        last_ns,
        queues: queues
            .iter()
            .zip(outs)
            .map(|(&queue, o)| QueueSent {
                queue,
                sent: o.completed,
            })
            .collect(),
    }
}

/// Pins the thread (when asked) and opens its socket: on the pinned core,
/// so the UMEM's pages are first touched there.
fn open(plan: &Plan, index: usize, iface: &Iface, queue: u32) -> Result<Ports> {
    if let Some(core) = plan.cores.as_ref().and_then(|c| c.get(index)) {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: *core }) {
            bail!("--cores: pinning the thread of queue {queue} to core {core} failed");
        }
    }
    let ports = Ports::open(
        std::slice::from_ref(iface),
        &[queue],
        XskOptions {
            zero_copy: ZeroCopy::Auto,
            ..XskOptions::default()
        },
    )
    .map_err(|e| open_error(&e))?;
    if let Some(p) = ports.ports().first() {
        tracing::info!(
            iface = %iface.name,
            queue,
            mode = p.mode.label(),
            "pktgen socket open"
        );
    }
    Ok(ports)
}

/// A socket error as one message: the error names the interface and queue
/// and repeats its cause's message, but not the OS error under it.
pub(crate) fn open_error(e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !msg.contains(&m) {
            msg = format!("{msg}: {m}");
        }
        cause = c.source();
    }
    anyhow::anyhow!(msg)
}

/// Token bucket fed from the per-batch clock reading.
#[derive(Debug)]
struct Bucket {
    per_ns: f64,
    burst: f64,
    tokens: f64,
    last_ns: u64,
}

impl Bucket {
    fn new(pps: f64, now: u64) -> Self {
        Self {
            per_ns: pps / 1e9,
            // At least a batch, else a millisecond's worth: a slow round
            // does not lose tokens.
            burst: (pps / 1e3).max(BATCH as f64),
            tokens: 0.0,
            last_ns: now,
        }
    }

    /// Whole tokens available at `now`.
    fn available(&mut self, now: u64) -> usize {
        let dt = now.saturating_sub(self.last_ns) as f64;
        self.tokens = (self.tokens + dt * self.per_ns).min(self.burst);
        self.last_ns = now;
        self.tokens as usize
    }

    /// Nanoseconds until `n` whole tokens are there.
    fn wait_ns(&self, n: usize) -> u64 {
        ((n as f64 - self.tokens).max(0.0) / self.per_ns).ceil() as u64
    }

    fn take(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }
}

fn send_loop(mut ports: Ports, plan: &Plan, flows: Flows, stop: &AtomicBool) -> ThreadOut {
    let threads = u64::from(flows.threads);
    let index = u64::from(flows.index);
    // This thread's share of --count and of --rate.
    let quota = plan
        .count
        .map_or(u64::MAX, |c| c / threads + u64::from(index < c % threads));
    let start = mono_ns();
    let deadline = start.saturating_add(plan.duration_ns);
    let mut bucket = (plan.rate > 0).then(|| Bucket::new(plan.rate as f64 / threads as f64, start));
    let mut descs: Vec<FrameToken> = Vec::with_capacity(BATCH);
    let mut out = ThreadOut::default();
    // Frames queued so far (the n of seq = n·Q + q) and the flow position.
    let mut queued = 0u64;
    let mut pos = 0u64;
    while queued < quota && !stop.load(Ordering::Relaxed) {
        let now = mono_ns();
        if now >= deadline {
            break;
        }
        ports.recycle();
        let mut want = (quota - queued).min(BATCH as u64) as usize;
        if let Some(b) = bucket.as_mut() {
            let t = b.available(now);
            if t == 0 {
                // Kick meanwhile: frames on the TX ring need `sendto`s.
                ports.kick();
                let wait = b.wait_ns(1).min(deadline - now);
                if wait > SLEEP_OVER_NS {
                    std::thread::sleep(Duration::from_nanos(wait));
                } else {
                    // Stay runnable, but let whatever shares the core run.
                    std::thread::yield_now();
                }
                continue;
            }
            want = want.min(t);
        }
        let n = ports.alloc(&mut descs, want);
        if n == 0 {
            // Every frame is on the TX ring or in the kernel: push them on.
            ports.kick();
            continue;
        }
        let template = &plan.template;
        let short = ports.with_frames(&mut descs, |frames, lens| {
            let mut p = pos;
            let mut short = false;
            for (i, (frame, len)) in frames.iter_mut().zip(lens.iter_mut()).enumerate() {
                let mut f = flows.fields(queued + i as u64, p);
                f.ts = now;
                *len = template.write(frame.buf, &f);
                short |= *len == 0;
                p += 1;
                if p == flows.own {
                    p = 0;
                }
            }
            short
        });
        if short {
            // A UMEM frame shorter than the frame size: not possible with
            // the default 2048-byte frames; give the frames back and stop.
            ports.release(&mut descs);
            tracing::error!(
                frame_size = template.len(),
                "UMEM frames are shorter than the frame size"
            );
            break;
        }
        // Every length is the template's, 64..=1500 bytes, within the frame.
        let sent = ports.transmit(0, &mut descs);
        // `transmit` kicks once per 32 frames queued in copy mode.
        if sent > 0 {
            out.first_ns.get_or_insert(now);
            out.last_ns = Some(now);
            queued += sent as u64;
            pos = (pos + sent as u64) % flows.own;
            if let Some(b) = bucket.as_mut() {
                b.take(sent);
            }
        }
    }
    let end_ns = mono_ns();
    // Drain: wait (bounded) for what is on the ring to complete.
    ports.drain(DRAIN_LIMIT);
    ports.recycle();
    out.completed = queued.saturating_sub(u64::from(ports.in_flight()));
    out.end_ns = end_ns;
    if let Some(p) = ports.ports().first() {
        if let Ok(r) = p.ring_stats() {
            tracing::info!(
                queue = p.queue,
                queued,
                completed = out.completed,
                tx_invalid_descs = r.tx_invalid_descs,
                tx_ring_empty = r.tx_ring_empty,
                "pktgen queue done"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly.

    use clap::Parser;

    use super::*;
    use crate::layout::GW_CLIENT_MAC;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(line: &str) -> Args {
        Cli::try_parse_from(std::iter::once("pktgen").chain(line.split_whitespace()))
            .unwrap()
            .args
    }

    fn err(line: &str) -> String {
        format!("{:#}", plan(&args(line)).unwrap_err())
    }

    #[test]
    fn defaults_are_valid() {
        let p = plan(&args("")).unwrap();
        assert_eq!(p.queues, vec![0]);
        assert_eq!((p.services, p.flows, p.rate), (1, 1000, 0));
        assert_eq!(p.template.len(), 64);
        assert_eq!(p.duration_ns, 10_000_000_000);
        assert_eq!(args("").dst_mac, MacAddr(GW_CLIENT_MAC));
    }

    #[test]
    fn every_flag_is_checked_by_name() {
        assert!(err("--frame-size 40").starts_with("--frame-size 40: must be 64..=1500"));
        assert!(err("--frame-size 1501").starts_with("--frame-size 1501"));
        assert!(err("--services 0").starts_with("--services 0"));
        assert!(err("--services 65537").starts_with("--services 65537"));
        assert!(err("--flows 0").starts_with("--flows 0"));
        assert!(err("--flows 4000001").starts_with("--flows 4000001"));
        assert!(err("--flows 1 --queues 0,1").starts_with("--flows 1"));
        assert!(err("--only-service 65536").starts_with("--only-service 65536"));
        assert!(err("--duration-s 0.05").starts_with("--duration-s 0.05"));
        assert!(err("--duration-s 601").starts_with("--duration-s 601"));
        assert!(err("--count 0").starts_with("--count 0"));
        assert!(err("--queues 1,1").starts_with("--queues 1,1"));
        assert!(err("--queues 0,1 --cores 3").starts_with("--cores 3"));
        assert!(Cli::try_parse_from(["pktgen", "--dst-mac", "02:cb:01:00:00"]).is_err());
        assert!(Cli::try_parse_from(["pktgen", "--proto", "sctp"]).is_err());
        let a = args("--dst-mac 02:cb:02:00:00:0b --proto tcp --queues 0,1 --cores 0,1");
        assert_eq!(a.dst_mac, MacAddr([2, 0xcb, 2, 0, 0, 11]));
        assert_eq!(a.proto, L4Proto::Tcp);
        assert!(plan(&a).is_ok());
    }

    #[test]
    fn threads_share_flows_and_number_frames_uniquely() {
        let p = plan(&args("--flows 10 --services 3 --queues 0,1,2")).unwrap();
        let mut seen = std::collections::HashSet::new();
        let mut per_flow: std::collections::HashMap<u32, Vec<u64>> = Default::default();
        for t in 0..3u32 {
            let f = Flows::new(t, 3, &p);
            let mut pos = 0;
            for n in 0..25u64 {
                let x = f.fields(n, pos);
                pos = (pos + 1) % f.own;
                assert_eq!(x.flow % 3, t, "thread {t} sends its own flows");
                assert!(x.flow < 10);
                assert_eq!(x.dst, (vip_ip(Family::V4, x.flow % 3), 80));
                assert_eq!(x.src, flow_source_ip(Family::V4, x.flow));
                assert!(seen.insert(x.seq), "seq {} twice", x.seq);
                per_flow.entry(x.flow).or_default().push(x.seq);
                assert_eq!(x.syn, n < f.own, "SYN on the first round only");
            }
        }
        assert_eq!(per_flow.len(), 10);
        for (flow, seqs) in per_flow {
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "flow {flow}: {seqs:?}"
            );
        }
        let only = plan(&args("--only-service 7 --services 8")).unwrap();
        assert!(plan(&args("--only-service 7 --services 3"))
            .unwrap_err()
            .to_string()
            .contains("--only-service 7"));
        assert_eq!(
            Flows::new(0, 1, &only).fields(5, 5).dst,
            (vip_ip(Family::V4, 7), 80)
        );
    }

    #[test]
    fn token_bucket_paces() {
        let mut b = Bucket::new(1000.0, 0);
        assert_eq!(b.available(0), 0);
        assert_eq!(b.wait_ns(1), 1_000_000);
        assert_eq!(b.wait_ns(3), 3_000_000);
        assert_eq!(b.available(10_000_000), 10);
        b.take(10);
        assert_eq!(b.available(10_000_000), 0);
        // Capped at a batch after a long pause.
        assert_eq!(b.available(10_000_000_000), BATCH);
    }

    #[test]
    fn result_line_shape() {
        let r = summarise(
            &[0, 3],
            &[
                ThreadOut {
                    completed: 10,
                    first_ns: Some(1_000_000_000),
                    last_ns: Some(1_500_000_000),
                    end_ns: 2_000_000_000,
                },
                ThreadOut {
                    completed: 30,
                    first_ns: Some(1_100_000_000),
                    last_ns: Some(1_900_000_000),
                    end_ns: 2_000_000_000,
                },
            ],
        );
        let line = serde_json::to_string(&PktgenEvent::Result(r.clone())).unwrap();
        assert_eq!(
            line,
            r#"{"event":"result","sent":40,"elapsed_s":1.0,"offered_pps":40.0,"first_ns":1000000000,"last_ns":1900000000,"queues":[{"queue":0,"sent":10},{"queue":3,"sent":30}]}"#
        );
        let PktgenEvent::Result(back) = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        let direct: PktgenResult = serde_json::from_str(&line).unwrap();
        assert_eq!(direct, r);
    }
}
