//! `clustergate-bench pipeline`: the packet core in process (no network).
//!
//! Owns: the table and flows the bench builds, the single-thread passes
//! (baseline, established flows, new flows, replies) over the batch path,
//! the random-read unit the targets are stated in, and the multi-thread run
//! (`--threads`): frames spread over OS threads as RSS spreads them, and the
//! hand-off rings that carry a frame to the worker owning its flow.
//!
//! Every figure is a median over `--runs` of nanoseconds per packet (or Mpps),
//! measured in the same process, so that ratios between them hold on a busy
//! machine too. `--json` prints them as one JSON object, the last line of
//! stdout.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{addr16, ip_from16, Addr16, FlowTuple, Proto};
use clustergate_dataplane::packet::parse::parse;
use clustergate_dataplane::pipeline::{Frame, Ownership, Verdict, Worker, BATCH};
use clustergate_dataplane::snat::ReturnConfig;
use clustergate_dataplane::table::Table;
use clustergate_dataplane::testkit::{self, L4Spec, Tcp};
use clustergate_dataplane::time::Now;
use clustergate_dataplane::verdict::Side;
use crossbeam_queue::ArrayQueue;
use serde::Serialize;

/// `clustergate-bench pipeline`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Established flows in the connection table, 1..=4000000.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=4_000_000))]
    pub flows: u32,
    /// Services (each with 10 endpoints) in the table, 1..=65000.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=65_000))]
    pub services: u32,
    /// Repetitions, 1..=101; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=101))]
    pub runs: u16,
    /// Print the figures as one JSON object (the last line of stdout)
    /// instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also forward the established flows with this many worker threads,
    /// 1..=64, on one connection table, and with one thread in the same run
    /// (for `scaling`).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
    /// How the workers share the connection table: `owned` (each owns a
    /// partition, holds it per batch of 64 and hands other workers' frames
    /// over) or `shared` (256 shards, each lookup locks its shard, no
    /// hand-off: the table before partitions), to compare the two in one
    /// build.
    #[arg(long, value_enum, default_value_t = TableMode::Owned)]
    pub table: TableMode,
}

/// `--table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TableMode {
    /// A partition per worker, held per batch; hand-offs.
    Owned,
    /// Shards locked per lookup; no hand-off.
    Shared,
}

/// Most worker threads `--threads` takes.
const MAX_THREADS: u16 = 64;

/// Slots of each hand-off ring (one ring per ordered pair of threads).
const RING_SLOTS: usize = 4096;

/// How long a worker waits on a full hand-off ring (draining its own rings
/// meanwhile) before it drops the frame; a drop fails the run.
const RING_PATIENCE: Duration = Duration::from_secs(1);

/// Random reads timed per run for `random_read_ns`.
const RANDOM_READS: usize = 1 << 23;

/// Bytes of random-read array per established flow (512 MiB at 1M flows),
/// and the least (well beyond the caches).
const READ_BYTES_PER_FLOW: usize = 512;
const READ_BYTES_MIN: usize = 64 << 20;

/// The MAC the backends send their replies from.
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Seed of the RSS hash that spreads frames over the threads.
const RSS_SEED: u64 = 0x5eed_c1a5_7e2a_7e00;

/// Checks the flags (clap checks them too; this names the same limits for
/// callers that build [`Args`] themselves).
///
/// # Errors
/// The first flag out of its range, with the value given.
pub fn validate(a: &Args) -> Result<()> {
    ensure!(
        (1..=4_000_000).contains(&a.flows),
        "--flows must be 1..=4000000, got {}",
        a.flows
    );
    ensure!(
        (1..=65_000).contains(&a.services),
        "--services must be 1..=65000, got {}",
        a.services
    );
    ensure!(
        (1..=101).contains(&a.runs),
        "--runs must be 1..=101, got {}",
        a.runs
    );
    if let Some(t) = a.threads {
        ensure!(
            (1..=MAX_THREADS).contains(&t),
            "--threads must be 1..={MAX_THREADS}, got {t}"
        );
    }
    Ok(())
}

/// The figures of one `pipeline` invocation (medians over `runs`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `--table`: "owned" or "shared".
    pub table: &'static str,
    /// Established flows in the table.
    pub flows: u32,
    /// Services in the table (10 endpoints each).
    pub services: u32,
    /// Runs the medians are taken over.
    pub runs: u16,
    /// Bytes of every frame measured.
    pub frame_bytes: usize,
    /// Memory the single-thread connection table took for the `flows`
    /// (growth of resident memory while they were opened).
    pub conntrack_bytes: usize,
    /// Size of the random-read array: a power of two, at least
    /// `conntrack_bytes`, 512 bytes per flow and 64 MiB.
    pub random_read_bytes: usize,
    /// ns per independent random 8-byte read over that array.
    pub random_read_ns: f64,
    /// ns per frame: copy it into a buffer and parse it, nothing else.
    pub baseline_ns: f64,
    /// ns per ACK of an established flow, batch path.
    pub established_ns: f64,
    /// ns per ACK of an established flow, one frame at a time.
    pub established_one_at_a_time_ns: f64,
    /// ns per SYN of a new flow, batch path, `flows` already established.
    pub new_flow_ns: f64,
    /// New flows opened per run.
    pub new_flows_per_run: usize,
    /// ns per reply (backend → client) of an established flow, batch path.
    pub reply_ns: f64,
    /// Worker threads of the multi-thread run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u16>,
    /// Established flows' Mpps over all `threads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mpps_total: Option<f64>,
    /// The same frames with one thread, in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mpps_one_thread: Option<f64>,
    /// `mpps_total ÷ mpps_one_thread`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<f64>,
    /// Share of the frames handed to another thread (median run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_share: Option<f64>,
    /// Times a hand-off found its ring full and waited (all runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_ring_full: Option<u64>,
    /// Whether every thread was pinned to a core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
}

/// Runs `clustergate-bench pipeline`: the table, or the JSON object.
///
/// # Errors
/// Bad flags, or a run in which a frame was not forwarded.
pub fn run(a: &Args) -> Result<()> {
    let r = measure(a)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_table(&r);
    }
    Ok(())
}

fn vip(i: u32) -> Addr16 {
    addr16(IpAddr::from([198, 19, (i >> 8) as u8, i as u8]))
}

/// Client of flow `i`: 32 768 addresses in 198.18.128.0/17, then the next
/// source port. One-to-one for every `i` the bench uses, so the new flows'
/// clients (indices past `--flows`) never meet an established one.
fn client(i: u32) -> (Addr16, u16) {
    let a = i % 32_768;
    (
        addr16(IpAddr::from([198, 18, 128 + (a >> 8) as u8, a as u8])),
        1024 + (i / 32_768) as u16,
    )
}

/// Deterministic shuffle (xorshift64*), so every run visits flows in the same
/// cache-hostile order.
fn shuffled(n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..n).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let j = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Equal-size frames laid out one after another, as a NIC fills its ring:
/// the harness adds no cache miss of its own.
#[derive(Debug, Clone, Default)]
struct Frames {
    bytes: Vec<u8>,
    stride: usize,
}

impl Frames {
    fn new(stride: usize) -> Self {
        Self {
            bytes: Vec::new(),
            stride,
        }
    }

    fn push(&mut self, f: &[u8]) -> Result<()> {
        ensure!(
            f.len() == self.stride,
            "frame of {} bytes among frames of {}",
            f.len(),
            self.stride
        );
        self.bytes.extend_from_slice(f);
        Ok(())
    }

    fn len(&self) -> usize {
        self.bytes.len().checked_div(self.stride).unwrap_or(0)
    }

    fn iter(&self) -> std::slice::ChunksExact<'_, u8> {
        self.bytes.chunks_exact(self.stride.max(1))
    }

    /// The frame starting at byte `off` (an offset a hand-off carries).
    fn at(&self, off: u32) -> &[u8] {
        let o = off as usize;
        &self.bytes[o..o + self.stride]
    }
}

/// `umem` (at least `BATCH` chunks of [`testkit::BUF_LEN`]) cut into a
/// batch, the frames of `src` copied in, as a NIC writes a batch into its
/// UMEM chunks. Returns the batch and how many frames it holds. No
/// allocation.
fn fill<'u, 's>(
    umem: &'u mut [u8],
    src: impl Iterator<Item = &'s [u8]>,
) -> ([Frame<'u>; BATCH], usize) {
    let mut rest = umem;
    let mut frames: [Frame<'u>; BATCH] = std::array::from_fn(|_| {
        let (buf, tail) = std::mem::take(&mut rest).split_at_mut(testkit::BUF_LEN);
        rest = tail;
        Frame { buf, len: 0 }
    });
    let mut k = 0;
    for (fr, s) in frames.iter_mut().zip(src) {
        fr.buf[..s.len()].copy_from_slice(s);
        fr.len = s.len();
        k += 1;
    }
    (frames, k)
}

/// Whatever decides a batch of frames: a [`Worker`] on the bench's table,
/// or a stub in the tests.
trait Decide {
    /// Decides `frames`, `verdicts[i]` for frame `i`.
    fn decide(&mut self, frames: &mut [Frame<'_>], verdicts: &mut [Verdict]);
}

/// A worker deciding on `table` at a fixed `now`.
#[derive(Debug)]
struct Live<'a> {
    worker: &'a mut Worker,
    table: &'a Table,
    now: Now,
}

impl Decide for Live<'_> {
    fn decide(&mut self, frames: &mut [Frame<'_>], verdicts: &mut [Verdict]) {
        self.worker
            .process_batch(self.now, self.table, frames, verdicts);
    }
}

/// One timed pass of `frames` through `d` in batches of [`BATCH`]: ns per
/// frame, and how many verdicts `ok` accepted.
fn batch_pass<D: Decide>(
    d: &mut D,
    frames: &Frames,
    umem: &mut [u8],
    ok: impl Fn(&Verdict) -> bool,
) -> (f64, usize) {
    let mut verdicts = [Verdict::Pass; BATCH];
    let mut good = 0usize;
    let t = Instant::now();
    for chunk in frames.bytes.chunks(frames.stride * BATCH) {
        let (mut batch, k) = fill(umem, chunk.chunks_exact(frames.stride));
        d.decide(&mut batch[..k], &mut verdicts[..k]);
        good += verdicts[..k].iter().filter(|v| ok(v)).count();
    }
    let ns = t.elapsed().as_nanos() as f64 / frames.len().max(1) as f64;
    (ns, good)
}

/// ns per independent random 8-byte read over `arr` (a power-of-two length):
/// indices from an inline LCG (its high bits), not from the values read, so
/// the reads overlap as the conntrack lookups of a batch can; summed so that
/// none is optimised away.
fn random_read_ns(arr: &[u64], reads: usize) -> f64 {
    debug_assert!(arr.len().is_power_of_two());
    let mask = arr.len() - 1;
    let mut x = 0x853c_49e6_748f_ea9bu64;
    let mut sum = 0u64;
    let t = Instant::now();
    for _ in 0..reads {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        sum = sum.wrapping_add(arr[(x >> 32) as usize & mask]);
    }
    let ns = t.elapsed().as_nanos() as f64 / reads as f64;
    std::hint::black_box(sum);
    ns
}

/// This process's resident memory, in bytes (0 where /proc says nothing).
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * rustix::param::page_size())
}

/// The connection table of the bench: `capacity` flows, for `workers`
/// workers that own a partition each ([`TableMode::Owned`]) or share its
/// shards ([`TableMode::Shared`]).
fn conntrack(capacity: usize, workers: usize, mode: TableMode) -> Arc<Conntrack> {
    let d = Config::default();
    Arc::new(Conntrack::new(&Config {
        capacity,
        partitions: match mode {
            TableMode::Owned => workers,
            TableMode::Shared => d.shards,
        },
        ..d
    }))
}

/// Flows `ct` evicted or refused for want of room.
fn lost_flows(ct: &Conntrack) -> u64 {
    let st = ct.stats();
    st.evicted_total() + st.refused_total()
}

/// `n` workers on `ct`, worker `i` owning share `i` of the default SNAT
/// range.
fn workers(ct: &Arc<Conntrack>, n: u16, mode: TableMode) -> Result<Vec<Worker>> {
    let snat = ReturnConfig::default().ports;
    let shares = snat
        .split(usize::from(n))
        .map_err(|e| anyhow::anyhow!("--threads {n}: {e}"))?;
    Ok(shares
        .into_iter()
        .enumerate()
        .map(|(i, ports)| {
            let ret = ReturnConfig {
                ports,
                ..ReturnConfig::default()
            };
            match mode {
                TableMode::Owned => {
                    let own = Ownership {
                        index: i as u16,
                        count: n,
                        snat,
                    };
                    Worker::with_ownership(Arc::clone(ct), ret, own)
                }
                TableMode::Shared => Worker::with_config(Arc::clone(ct), ret),
            }
        })
        .collect())
}

/// Sends `frame` (a SYN) through `workers`: to worker 0, then to the owner
/// it names. Returns where it went and the rewritten frame.
fn open_flow(
    workers: &mut [Worker],
    now: Now,
    table: &Table,
    buf: &mut [u8],
    frame: &[u8],
) -> Result<(Verdict, usize)> {
    buf[..frame.len()].copy_from_slice(frame);
    let mut v = workers[0].process(now, table, buf, frame.len());
    if let Verdict::Handoff { owner } = v {
        let n = workers.len();
        let w = workers
            .get_mut(usize::from(owner))
            .with_context(|| format!("hand-off to worker {owner} of {n}"))?;
        buf[..frame.len()].copy_from_slice(frame);
        v = w.process(now, table, buf, frame.len());
    }
    match v {
        Verdict::Forward { len, .. } => Ok((v, len)),
        other => bail!("SYN not forwarded: {other:?}"),
    }
}

/// Everything built once per invocation.
struct Setup {
    table: Table,
    now: Now,
    /// Services in the table (flow `i` goes to service `i % services`).
    services: u32,
    /// ACKs of the established flows, shuffled.
    acks: Frames,
    /// Replies of the established flows (backend → client), same order.
    replies: Frames,
    /// SYNs of new flows, `new_per_run` for each run.
    new_syns: Vec<Frames>,
    capacity: usize,
}

impl Setup {
    fn syn(&self, i: u32) -> Vec<u8> {
        let (c, p) = client(i);
        testkit::client_frame(
            c,
            p,
            vip(i % self.services),
            80,
            L4Spec::Tcp(Tcp::syn(0)),
            b"",
        )
    }

    /// Opens the `flows` established flows on `workers`; returns each flow's
    /// backend (address, port), in flow order.
    fn establish(&self, workers: &mut [Worker], flows: u32) -> Result<Vec<(Addr16, u16)>> {
        let mut buf = vec![0u8; testkit::BUF_LEN];
        let mut backends = Vec::with_capacity(flows as usize);
        for i in 0..flows {
            let (_, len) = open_flow(workers, self.now, &self.table, &mut buf, &self.syn(i))
                .with_context(|| format!("flow {i}"))?;
            let t = match parse(&buf[..len]) {
                Ok(Some(p)) => p.tuple(),
                _ => None,
            }
            .with_context(|| format!("flow {i}: the forwarded SYN does not parse"))?;
            backends.push((t.dst_addr, t.dst_port));
        }
        Ok(backends)
    }
}

/// Builds the table and the frames; `flows` flows are not opened yet.
fn setup(a: &Args) -> Result<Setup> {
    let (flows, services) = (a.flows, a.services);
    let specs: Vec<ServiceSpec> = (0..services)
        .map(|s| {
            let backends = (0..10u32)
                .map(|e| {
                    let n = s * 10 + e;
                    // 16 384 addresses in 198.18.0.0/18; the port tells repeats apart.
                    let a = n % 16_384;
                    BackendSpec::ready(
                        IpAddr::from([198, 18, (a >> 8) as u8, a as u8]),
                        8080 + (n / 16_384) as u16,
                    )
                })
                .collect();
            ServiceSpec::cluster_ip(ip_from16(vip(s)), 80, Proto::Tcp, backends)
        })
        .collect();
    let table = Table::build(1, 0, &specs)?;
    let runs = u32::from(a.runs);
    // Enough new flows per run to time, few enough that the table grows by
    // at most a tenth over all runs (or by 4096 per run for small tables).
    let new_per_run = (flows / (10 * runs)).max(flows.min(4096));
    let capacity = 2 * (flows as usize + (runs * new_per_run) as usize);
    let mut s = Setup {
        table,
        now: Now::from_secs(1),
        services,
        acks: Frames::default(),
        replies: Frames::default(),
        new_syns: Vec::new(),
        capacity,
    };
    let stride = s.syn(0).len();
    s.acks = Frames::new(stride);
    s.replies = Frames::new(stride);
    s.new_syns = (0..runs)
        .map(|r| {
            let mut f = Frames::new(stride);
            for j in 0..new_per_run {
                f.push(&s.syn(flows + r * new_per_run + j))?;
            }
            Ok(f)
        })
        .collect::<Result<_>>()?;
    Ok(s)
}

/// Forwarded towards a backend?
fn to_backend(v: &Verdict) -> bool {
    matches!(v, Verdict::Forward { next_hop, .. } if next_hop.side == Side::Backend)
}

/// Forwarded towards the client?
fn to_client(v: &Verdict) -> bool {
    matches!(v, Verdict::Forward { next_hop, .. } if next_hop.side == Side::Client)
}

/// Per-run samples, one vector per figure.
#[derive(Debug, Default)]
struct Samples {
    random_read: Vec<f64>,
    baseline: Vec<f64>,
    established: Vec<f64>,
    one_at_a_time: Vec<f64>,
    new_flow: Vec<f64>,
    reply: Vec<f64>,
    mpps_one: Vec<f64>,
    mpps_total: Vec<f64>,
    handoff_share: Vec<f64>,
    ring_full: u64,
    pinned: bool,
}

/// Builds everything, runs `--runs` times, and returns the medians.
fn measure(a: &Args) -> Result<Report> {
    validate(a)?;
    let (flows, services) = (a.flows, a.services);
    let started = Instant::now();
    let mut s = setup(a)?;

    // The single-thread figures: one worker on its own table.
    let rss0 = resident_bytes();
    let ct = conntrack(s.capacity, 1, a.table);
    let mut single = workers(&ct, 1, a.table)?;
    let backends = s.establish(&mut single, flows)?;
    let ct_bytes = resident_bytes().saturating_sub(rss0);
    let order = shuffled(flows as usize);
    for &i in &order {
        let (c, p) = client(i);
        s.acks.push(&testkit::client_frame(
            c,
            p,
            vip(i % services),
            80,
            L4Spec::Tcp(Tcp::ack(1, 1)),
            b"",
        ))?;
        let (b, bp) = backends[i as usize];
        s.replies.push(&testkit::frame(
            BACKEND_MAC,
            testkit::GATEWAY_MAC,
            None,
            b,
            bp,
            c,
            p,
            L4Spec::Tcp(Tcp::ack(1, 2)),
            64,
            b"",
        ))?;
    }
    drop(backends);

    // The multi-thread run: one table for one thread, one for `threads`,
    // each with the same flows; frames spread over the threads by RSS.
    let mut spread = match a.threads {
        Some(n) => Some(Spread::new(&s, flows, n, a.table)?),
        None => None,
    };

    let read_bytes = (ct_bytes.max(READ_BYTES_PER_FLOW * flows as usize))
        .max(READ_BYTES_MIN)
        .next_power_of_two();
    // Written, so that every page is backed by its own memory.
    let arr: Vec<u64> = (0..(read_bytes / 8) as u64).collect();
    eprintln!(
        "pipeline: {flows} flows over {services} services × 10 endpoints, set up in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let mut live = Live {
        worker: &mut single[0],
        table: &s.table,
        now: s.now,
    };

    let n = s.acks.len();
    let mut umem = vec![0u8; BATCH * testkit::BUF_LEN];
    let mut buf = vec![0u8; testkit::BUF_LEN];
    let mut m = Samples {
        pinned: true,
        ..Samples::default()
    };
    for run in 0..usize::from(a.runs) {
        m.random_read.push(random_read_ns(&arr, RANDOM_READS));

        // Baseline: copy each frame into a buffer and parse it; no lookup.
        let t = Instant::now();
        let mut ok = 0usize;
        for f in s.acks.iter() {
            buf[..f.len()].copy_from_slice(f);
            ok += usize::from(matches!(parse(&buf[..f.len()]), Ok(Some(_))));
        }
        m.baseline.push(t.elapsed().as_nanos() as f64 / n as f64);
        ensure!(ok == n, "baseline parsed {ok} of {n}");

        // Established flows, one frame at a time: the same copy, then parse →
        // lookup → conntrack → NAT.
        let t = Instant::now();
        let mut fwd = 0usize;
        for f in s.acks.iter() {
            buf[..f.len()].copy_from_slice(f);
            fwd += usize::from(matches!(
                live.worker.process(s.now, &s.table, &mut buf, f.len()),
                Verdict::Forward { .. }
            ));
        }
        m.one_at_a_time
            .push(t.elapsed().as_nanos() as f64 / n as f64);
        ensure!(fwd == n, "one at a time: forwarded {fwd} of {n} ACKs");

        let (ns, fwd) = batch_pass(&mut live, &s.acks, &mut umem, to_backend);
        ensure!(
            fwd == n,
            "batch: forwarded {fwd} of {n} ACKs to their backend"
        );
        m.established.push(ns);

        let (ns, fwd) = batch_pass(&mut live, &s.replies, &mut umem, to_client);
        ensure!(
            fwd == n,
            "batch: forwarded {fwd} of {n} replies to their client"
        );
        m.reply.push(ns);

        let syns = &s.new_syns[run];
        let (ns, fwd) = batch_pass(&mut live, syns, &mut umem, to_backend);
        let k = syns.len();
        ensure!(fwd == k, "batch: forwarded {fwd} of {k} SYNs of new flows");
        m.new_flow.push(ns);

        if let Some(sp) = &mut spread {
            let one = sp.run(true)?;
            let all = sp.run(false)?;
            m.mpps_one.push(one.mpps());
            m.mpps_total.push(all.mpps());
            m.handoff_share
                .push(all.handoffs() as f64 / all.frames.max(1) as f64);
            m.ring_full += all.ring_full();
            m.pinned &= one.pinned && all.pinned;
        }
    }
    let evicted = lost_flows(&ct) + spread.as_ref().map_or(0, Spread::lost_flows);
    ensure!(
        evicted == 0,
        "{evicted} flows were evicted or refused: the connection table was too small for the bench"
    );

    let mpps_total = spread.as_ref().map(|_| median(&m.mpps_total));
    let mpps_one = spread.as_ref().map(|_| median(&m.mpps_one));
    Ok(Report {
        table: match a.table {
            TableMode::Owned => "owned",
            TableMode::Shared => "shared",
        },
        flows,
        services,
        runs: a.runs,
        frame_bytes: s.acks.stride,
        conntrack_bytes: ct_bytes,
        random_read_bytes: read_bytes,
        random_read_ns: median(&m.random_read),
        baseline_ns: median(&m.baseline),
        established_ns: median(&m.established),
        established_one_at_a_time_ns: median(&m.one_at_a_time),
        new_flow_ns: median(&m.new_flow),
        new_flows_per_run: s.new_syns.first().map_or(0, Frames::len),
        reply_ns: median(&m.reply),
        threads: a.threads,
        mpps_total,
        mpps_one_thread: mpps_one,
        scaling: mpps_total.zip(mpps_one).map(|(t, o)| t / o),
        handoff_share: spread.as_ref().map(|_| median(&m.handoff_share)),
        handoff_ring_full: spread.as_ref().map(|_| m.ring_full),
        pinned: spread.as_ref().map(|_| m.pinned),
    })
}

fn print_table(r: &Report) {
    let rr = r.random_read_ns;
    let b = r.baseline_ns;
    let row = |name: &str, ns: f64| {
        println!(
            "| {name} | {ns:.1} | {:.2} | {:.2} | {:.1} |",
            1e3 / ns,
            ns / b,
            ns / rr
        );
    };
    println!();
    println!(
        "| {} flows, {} services, TCP | median ns/packet | Mpps/core | ÷ baseline | ÷ random read |",
        r.flows, r.services
    );
    println!("|---|---|---|---|---|");
    row("random 8-byte read (the unit)", rr);
    row("baseline: copy + parse only", b);
    row(
        "established, one frame at a time",
        r.established_one_at_a_time_ns,
    );
    row("established, batches of 64", r.established_ns);
    row("new flow (SYN), batches of 64", r.new_flow_ns);
    row("reply (backend → client), batches of 64", r.reply_ns);
    println!(
        "({} runs, one thread, frames {} bytes, shuffled flow order; {} new flows per run; random reads over {} MiB, the connection table took {} MiB)",
        r.runs,
        r.frame_bytes,
        r.new_flows_per_run,
        r.random_read_bytes >> 20,
        r.conntrack_bytes >> 20
    );
    if let (Some(n), Some(total), Some(one), Some(sc)) =
        (r.threads, r.mpps_total, r.mpps_one_thread, r.scaling)
    {
        println!();
        println!("| established, batches of 64 | median Mpps | ÷ one thread |");
        println!("|---|---|---|");
        println!("| 1 thread | {one:.2} | 1.00 |");
        println!("| {n} threads | {total:.2} | {sc:.2} |");
        println!(
            "(frames spread by an RSS hash of the 5-tuple; {:.1} % handed to the owning thread; ring full {} times; threads {})",
            r.handoff_share.unwrap_or(0.0) * 100.0,
            r.handoff_ring_full.unwrap_or(0),
            if r.pinned == Some(true) {
                "pinned"
            } else {
                "not pinned"
            }
        );
    }
}

/// The RSS queue (of `n`) of a 5-tuple: a hash of the whole tuple with a
/// fixed seed, unrelated to which worker owns the flow.
fn rss_queue(t: &FlowTuple, n: usize) -> usize {
    fn mix(mut z: u64) -> u64 {
        // splitmix64's finaliser.
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let word = |a: &Addr16, i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&a[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let mut h = RSS_SEED;
    for w in [
        word(&t.src_addr, 0),
        word(&t.src_addr, 1),
        word(&t.dst_addr, 0),
        word(&t.dst_addr, 1),
        (u64::from(t.src_port) << 24) | (u64::from(t.dst_port) << 8) | (t.proto as u64),
    ] {
        h = mix(h ^ w);
    }
    (h % n as u64) as usize
}

/// The multi-thread run's state: the same flows on two tables (one for
/// one worker, one for `n`), and the ACKs spread over the threads.
struct Spread<'s> {
    table: &'s Table,
    now: Now,
    ct_one: Arc<Conntrack>,
    ct_all: Arc<Conntrack>,
    one: Vec<Worker>,
    all: Vec<Worker>,
    /// All ACKs (the one-thread input) and the ACKs each thread receives.
    input_one: Vec<Frames>,
    input_all: Vec<Frames>,
    cores: Vec<usize>,
}

impl<'s> Spread<'s> {
    fn new(s: &'s Setup, flows: u32, n: u16, mode: TableMode) -> Result<Self> {
        let ct_one = conntrack(s.capacity, 1, mode);
        let ct_all = conntrack(s.capacity, usize::from(n), mode);
        let mut one = workers(&ct_one, 1, mode)?;
        let mut all = workers(&ct_all, n, mode)?;
        s.establish(&mut one, flows)?;
        s.establish(&mut all, flows)?;
        let mut input_all = vec![Frames::new(s.acks.stride); usize::from(n)];
        for f in s.acks.iter() {
            let t = match parse(f) {
                Ok(Some(p)) => p.tuple(),
                _ => None,
            }
            .context("an ACK does not parse")?;
            input_all[rss_queue(&t, usize::from(n))].push(f)?;
        }
        for q in &input_all {
            ensure!(
                q.bytes.len() <= u32::MAX as usize,
                "--flows: {} bytes of frames for one thread, more than a hand-off offset holds",
                q.bytes.len()
            );
        }
        let cores: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        Ok(Self {
            table: &s.table,
            now: s.now,
            ct_one,
            ct_all,
            one,
            all,
            input_one: vec![s.acks.clone()],
            input_all,
            cores,
        })
    }

    fn lost_flows(&self) -> u64 {
        lost_flows(&self.ct_one) + lost_flows(&self.ct_all)
    }

    /// One timed run, with one thread (`single`) or all of them.
    fn run(&mut self, single: bool) -> Result<ThreadRun> {
        let (workers, inputs) = if single {
            (&mut self.one, &self.input_one)
        } else {
            (&mut self.all, &self.input_all)
        };
        let (table, now) = (self.table, self.now);
        let mut deciders: Vec<Live<'_>> = workers
            .iter_mut()
            .map(|worker| Live { worker, table, now })
            .collect();
        let r = spread_run(&mut deciders, inputs, &self.cores, RING_SLOTS);
        r.check()?;
        Ok(r)
    }
}

/// What one thread did in a [`spread_run`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ThreadStats {
    /// Frames it received from the NIC (its RSS queue).
    own: u64,
    /// Frames it forwarded (its own and handed-in ones).
    forwarded: u64,
    /// Frames it handed to their owner.
    handed_off: u64,
    /// Frames handed in by other threads.
    received: u64,
    /// Verdicts other than forward or a hand-off to another thread
    /// (including a handed-in frame handed off again).
    unexpected: u64,
    /// Times a hand-off found its ring full and waited.
    ring_full: u64,
    /// Frames dropped after a ring stayed full for [`RING_PATIENCE`].
    dropped: u64,
}

/// The outcome of one [`spread_run`].
#[derive(Debug)]
struct ThreadRun {
    wall: Duration,
    frames: u64,
    threads: Vec<ThreadStats>,
    /// Every thread was pinned to a core.
    pinned: bool,
}

impl ThreadRun {
    fn sum(&self, f: impl Fn(&ThreadStats) -> u64) -> u64 {
        self.threads.iter().map(f).sum()
    }

    fn handoffs(&self) -> u64 {
        self.sum(|t| t.handed_off)
    }

    fn ring_full(&self) -> u64 {
        self.sum(|t| t.ring_full)
    }

    fn mpps(&self) -> f64 {
        self.frames as f64 / self.wall.as_secs_f64().max(1e-9) / 1e6
    }

    /// Every frame forwarded exactly once, none dropped, nothing unexpected.
    fn check(&self) -> Result<()> {
        let (fwd, lost, odd) = (
            self.sum(|t| t.forwarded),
            self.sum(|t| t.dropped),
            self.sum(|t| t.unexpected),
        );
        let (out, inn) = (self.handoffs(), self.sum(|t| t.received));
        ensure!(
            lost == 0,
            "{lost} of {} frames dropped: a hand-off ring stayed full for {RING_PATIENCE:?}",
            self.frames
        );
        ensure!(
            odd == 0,
            "{odd} of {} frames got a verdict other than forward or a hand-off to another thread",
            self.frames
        );
        ensure!(
            out == inn,
            "{out} frames handed off but {inn} received by their owner"
        );
        ensure!(
            fwd == self.frames,
            "{} threads forwarded {fwd} of {} frames",
            self.threads.len(),
            self.frames
        );
        Ok(())
    }
}

/// One thread's side of a [`spread_run`].
struct Rx<'r> {
    t: usize,
    n: usize,
    inputs: &'r [Frames],
    /// Ring `from * n + to` carries frames from thread `from` to `to`.
    rings: &'r [ArrayQueue<u32>],
    umem: Vec<u8>,
    verdicts: [Verdict; BATCH],
    stats: ThreadStats,
}

impl Rx<'_> {
    /// Decides one batch of this thread's own frames (`chunk`, which starts
    /// at byte `base` of its input) and hands off what others own.
    fn own_batch<D: Decide>(&mut self, d: &mut D, base: usize, chunk: &[u8]) {
        let stride = self.inputs[self.t].stride;
        let mut verdicts = [Verdict::Pass; BATCH];
        let k = {
            let (mut batch, k) = fill(&mut self.umem, chunk.chunks_exact(stride));
            d.decide(&mut batch[..k], &mut verdicts[..k]);
            k
        };
        self.stats.own += k as u64;
        for (j, v) in verdicts[..k].iter().enumerate() {
            match *v {
                Verdict::Forward { .. } => self.stats.forwarded += 1,
                Verdict::Handoff { owner }
                    if usize::from(owner) < self.n && usize::from(owner) != self.t =>
                {
                    self.hand_off(d, usize::from(owner), (base + j * stride) as u32);
                }
                _ => self.stats.unexpected += 1,
            }
        }
    }

    /// Puts the frame at `off` of this thread's input on the ring to
    /// `owner`; while the ring is full, decides what others handed in (so
    /// that two threads waiting on each other both progress), and drops the
    /// frame after [`RING_PATIENCE`].
    fn hand_off<D: Decide>(&mut self, d: &mut D, owner: usize, off: u32) {
        let rings = self.rings;
        let ring = &rings[self.t * self.n + owner];
        let mut item = off;
        let mut since: Option<Instant> = None;
        loop {
            match ring.push(item) {
                Ok(()) => {
                    self.stats.handed_off += 1;
                    return;
                }
                Err(back) => {
                    item = back;
                    let t0 = *since.get_or_insert_with(|| {
                        self.stats.ring_full += 1;
                        Instant::now()
                    });
                    if t0.elapsed() > RING_PATIENCE {
                        self.stats.dropped += 1;
                        return;
                    }
                    if !self.drain(d) {
                        std::thread::yield_now();
                    }
                }
            }
        }
    }

    /// Decides what the other threads handed in, a batch at a time; returns
    /// whether there was anything.
    fn drain<D: Decide>(&mut self, d: &mut D) -> bool {
        let (rings, inputs) = (self.rings, self.inputs);
        let mut any = false;
        for from in (0..self.n).filter(|&f| f != self.t) {
            let ring = &rings[from * self.n + self.t];
            let src = &inputs[from];
            loop {
                let mut offs = [0u32; BATCH];
                let mut k = 0;
                while k < BATCH {
                    match ring.pop() {
                        Some(o) => {
                            offs[k] = o;
                            k += 1;
                        }
                        None => break,
                    }
                }
                if k == 0 {
                    break;
                }
                any = true;
                let (mut batch, k) = fill(&mut self.umem, offs[..k].iter().map(|&o| src.at(o)));
                d.decide(&mut batch[..k], &mut self.verdicts[..k]);
                self.stats.received += k as u64;
                for v in &self.verdicts[..k] {
                    match v {
                        Verdict::Forward { .. } => self.stats.forwarded += 1,
                        _ => self.stats.unexpected += 1,
                    }
                }
                if k < BATCH {
                    break;
                }
            }
        }
        any
    }

    /// The thread: its own frames batch by batch, draining the rings between
    /// batches, then the rings until every thread is done. Returns when it
    /// left the start barrier and when it decided its last frame.
    fn run_thread<D: Decide>(
        &mut self,
        d: &mut D,
        start: &Barrier,
        done: &AtomicUsize,
    ) -> (Instant, Instant) {
        let inputs = self.inputs;
        let own = &inputs[self.t];
        start.wait();
        let began = Instant::now();
        let step = own.stride * BATCH;
        for (c, chunk) in own.bytes.chunks(step.max(1)).enumerate() {
            self.own_batch(d, c * step, chunk);
            self.drain(d);
        }
        // Every hand-off of this thread is on its ring before this count
        // (Release); a thread that sees every count (Acquire) then finds
        // every frame handed to it with one last drain.
        done.fetch_add(1, Ordering::Release);
        while done.load(Ordering::Acquire) < self.n {
            if !self.drain(d) {
                std::thread::yield_now();
            }
        }
        self.drain(d);
        (began, Instant::now())
    }
}

/// Runs `deciders.len()` threads, thread `t` reading `inputs[t]` (its RSS
/// queue) and pinned to `cores[t % len]` when `cores` is not empty. A frame
/// a thread's decider hands off goes to the owner over that pair's ring of
/// `slots`. Wall time from the first thread out of the start barrier to
/// the last thread's last frame.
fn spread_run<D: Decide + Send>(
    deciders: &mut [D],
    inputs: &[Frames],
    cores: &[usize],
    slots: usize,
) -> ThreadRun {
    let n = deciders.len();
    let rings: Vec<ArrayQueue<u32>> = (0..n * n).map(|_| ArrayQueue::new(slots)).collect();
    let start = Barrier::new(n);
    let done = AtomicUsize::new(0);
    let mut stats = Vec::with_capacity(n);
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    let mut pinned = true;
    std::thread::scope(|sc| {
        let handles: Vec<_> = deciders
            .iter_mut()
            .enumerate()
            .map(|(t, d)| {
                let (rings, start, done) = (&rings, &start, &done);
                let core = (!cores.is_empty()).then(|| cores[t % cores.len()]);
                sc.spawn(move || {
                    let pinned = core.is_some_and(|id| {
                        core_affinity::set_for_current(core_affinity::CoreId { id })
                    });
                    let mut rx = Rx {
                        t,
                        n,
                        inputs,
                        rings,
                        umem: vec![0u8; BATCH * testkit::BUF_LEN],
                        verdicts: [Verdict::Pass; BATCH],
                        stats: ThreadStats::default(),
                    };
                    let (began, end) = rx.run_thread(d, start, done);
                    (rx.stats, began, end, pinned)
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok((s, began, end, p)) => {
                    first = Some(first.map_or(began, |f| f.min(began)));
                    last = Some(last.map_or(end, |l| l.max(end)));
                    pinned &= p;
                    stats.push(s);
                }
                Err(p) => std::panic::resume_unwind(p),
            }
        }
    });
    ThreadRun {
        wall: first
            .zip(last)
            .map_or(Duration::ZERO, |(f, l)| l.saturating_duration_since(f)),
        frames: inputs.iter().map(|f| f.len() as u64).sum(),
        threads: stats,
        pinned,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;
    use clap::Parser;
    use clustergate_dataplane::verdict::NextHop;

    /// A stub worker `me` of a run: byte 0 of a frame names its owner,
    /// bytes 1..5 its id; it forwards its own frames (noting their ids)
    /// and hands off the others. With `pass_on`, it hands off even frames
    /// it owns, to the next worker.
    struct Stub {
        me: u8,
        n: u8,
        pass_on: bool,
        seen: Vec<u32>,
    }

    impl Decide for Stub {
        fn decide(&mut self, frames: &mut [Frame<'_>], verdicts: &mut [Verdict]) {
            for (f, v) in frames.iter().zip(verdicts.iter_mut()) {
                let owner = f.buf[0];
                *v = if owner == self.me && !self.pass_on {
                    self.seen
                        .push(u32::from_le_bytes(f.buf[1..5].try_into().unwrap()));
                    Verdict::Forward {
                        len: f.len,
                        next_hop: NextHop {
                            addr: [0; 16],
                            side: Side::Backend,
                        },
                    }
                } else if owner == self.me {
                    Verdict::Handoff {
                        owner: u16::from((self.me + 1) % self.n),
                    }
                } else {
                    Verdict::Handoff {
                        owner: u16::from(owner),
                    }
                };
            }
        }
    }

    fn stubs(n: u8, pass_on: bool) -> Vec<Stub> {
        (0..n)
            .map(|me| Stub {
                me,
                n,
                pass_on,
                seen: Vec::new(),
            })
            .collect()
    }

    /// `per_thread` frames of 60 bytes for each of `n` threads; frame `id`'s
    /// owner is `owner(id)`.
    fn inputs(n: u8, per_thread: u32, owner: impl Fn(u32) -> u8) -> Vec<Frames> {
        (0..u32::from(n))
            .map(|t| {
                let mut q = Frames::new(60);
                for j in 0..per_thread {
                    let id = t * per_thread + j;
                    let mut f = [0u8; 60];
                    f[0] = owner(id);
                    f[1..5].copy_from_slice(&id.to_le_bytes());
                    q.push(&f).unwrap();
                }
                q
            })
            .collect()
    }

    #[test]
    fn every_frame_reaches_its_owner_once() {
        let (n, per) = (3u8, 1000u32);
        let owner = |id: u32| (id.wrapping_mul(2_654_435_761) >> 7) as u8 % n;
        let ins = inputs(n, per, owner);
        let mut ds = stubs(n, false);
        let r = spread_run(&mut ds, &ins, &[], RING_SLOTS);
        r.check().unwrap();
        let total = u32::from(n) * per;
        // Frames not owned by the thread RSS gave them to.
        let foreign = (0..total)
            .filter(|&id| u32::from(owner(id)) != id / per)
            .count() as u64;
        assert!(foreign > 0);
        assert_eq!(r.handoffs(), foreign);
        assert_eq!(r.sum(|t| t.received), foreign);
        assert_eq!(r.frames, u64::from(total));
        for d in &ds {
            assert!(
                d.seen.iter().all(|&id| owner(id) == d.me),
                "worker {}",
                d.me
            );
        }
        let mut seen: Vec<u32> = ds.iter().flat_map(|d| d.seen.iter().copied()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..total).collect::<Vec<_>>());
    }

    #[test]
    fn full_rings_make_the_sender_wait_not_lose() {
        // Every frame belongs to the other thread, through rings of 2 slots.
        let ins = inputs(2, 5000, |id| u8::from(id < 5000));
        let mut ds = stubs(2, false);
        let r = spread_run(&mut ds, &ins, &[], 2);
        r.check().unwrap();
        assert_eq!(r.handoffs(), 10_000);
        assert!(r.ring_full() > 0, "rings of 2 never filled");
        assert_eq!(ds[0].seen.len() + ds[1].seen.len(), 10_000);
    }

    #[test]
    fn a_frame_handed_off_twice_fails_the_run() {
        let ins = inputs(2, 100, |id| u8::from(id < 100));
        let mut ds = stubs(2, true);
        let r = spread_run(&mut ds, &ins, &[], RING_SLOTS);
        assert_eq!(r.sum(|t| t.unexpected), 200);
        let e = r.check().unwrap_err().to_string();
        assert!(e.contains("200 of 200 frames"), "{e}");
    }

    #[test]
    fn rss_spreads_flows_evenly_and_ignores_ownership() {
        let n = 4;
        let mut per = [0u32; 4];
        for i in 0..40_000u32 {
            let (c, p) = client(i);
            let t = FlowTuple {
                src_addr: c,
                dst_addr: vip(i % 100),
                src_port: p,
                dst_port: 80,
                proto: Proto::Tcp,
            };
            per[rss_queue(&t, n)] += 1;
        }
        for q in per {
            assert!((9_000..11_000).contains(&q), "{per:?}");
        }
    }

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        a: Args,
    }

    #[test]
    fn flags_out_of_range_are_named() {
        for (flag, bad) in [
            ("--threads", "0"),
            ("--threads", "65"),
            ("--flows", "0"),
            ("--runs", "102"),
        ] {
            let e = Cmd::try_parse_from(["pipeline", flag, bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag) && e.contains(bad), "{e}");
        }
        let mut a = Cmd::try_parse_from(["pipeline"]).unwrap().a;
        a.threads = Some(65);
        let e = validate(&a).unwrap_err().to_string();
        assert_eq!(e, "--threads must be 1..=64, got 65");
    }

    #[test]
    fn a_small_bench_forwards_everything_on_two_threads() {
        let a = Args {
            flows: 3000,
            services: 7,
            runs: 1,
            json: true,
            threads: Some(2),
            table: TableMode::Owned,
        };
        let r = measure(&a).unwrap();
        assert_eq!(r.frame_bytes, 54);
        assert_eq!(r.new_flows_per_run, 3000);
        for ns in [
            r.random_read_ns,
            r.baseline_ns,
            r.established_ns,
            r.new_flow_ns,
            r.reply_ns,
        ] {
            assert!(ns.is_finite() && ns > 0.0, "{r:?}");
        }
        assert!(r.mpps_total.unwrap() > 0.0 && r.mpps_one_thread.unwrap() > 0.0);
        let json = serde_json::to_value(&r).unwrap();
        for k in [
            "flows",
            "services",
            "runs",
            "random_read_ns",
            "baseline_ns",
            "established_ns",
            "new_flow_ns",
            "reply_ns",
            "threads",
            "mpps_total",
            "mpps_one_thread",
            "scaling",
        ] {
            assert!(json.get(k).is_some(), "{k} missing from {json}");
        }
    }
}
