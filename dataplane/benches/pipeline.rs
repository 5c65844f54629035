//! Per-packet pipeline benchmarks: `Worker::process` on whole Ethernet frames.
//!
//! Run with `cargo bench -p clustergate-dataplane --bench pipeline`.
//!
//! Benches (each criterion iteration is one batch of [`BATCH`] = 64 frames, and
//! the group throughput is `Throughput::Elements(64)`, so criterion's
//! `thrpt: … Melem/s` is **Mpps on one core**; ns/packet = criterion's time / 64):
//! - `established/1k_flows`, `established/1m_flows`: client ACK segments of
//!   established TCP flows (conntrack hit → DNAT), in a pseudo-random order.
//! - `reply/1k_flows`, `reply/1m_flows`: backend → client segments of the same
//!   flows (reverse-conntrack hit → reverse NAT).
//! - `new_flows/syn_batch`: the same through `Worker::process_batch`.
//! - `new_flows/syn`: every frame is the SYN of a never-seen flow (conntrack
//!   miss → Maglev pick → conntrack insert → DNAT).
//! - `batch/established_1m`: as `established/1m_flows`, through
//!   `Worker::process_batch` (all 64 frames loaded, then processed).
//! - `batch/established_1m_while_inspecting`: the same while another thread
//!   takes flow snapshots back to back (`Conntrack::snapshot_flows`, 100 000
//!   flows each, what `clustergate inspect flows --limit 100000` asks for, in
//!   a loop): the cost to a worker of an operator reading the table.
//!
//! The workers' per-backend counters are on, as in the gateway
//! (`Worker::follow_table` once per fixture).
//!
//! Setup: 10 000 TCP ClusterIP services (198.19.x.y:80, 10 ready endpoints
//! each in 198.18.0.0/17, port 8080); clients in 198.18.128.0/17. Flows are
//! opened by a SYN and a SYN-ACK through the pipeline before measuring, so they
//! are in the Established state, as on a busy gateway. Each bench's frames are
//! checked once before measuring (every one must be `Verdict::Forward` to the
//! expected next hop) and the worker's counters are checked after, so a bench
//! cannot silently measure drops.
//!
//! Per-packet overhead inside the timed region, identical for every bench:
//! the pipeline rewrites frames in place, so each frame is restored before it
//! is processed: a 64-byte copy of a pristine template (L1-resident) into one of
//! 64 buffers of `BUF_LEN` bytes laid out like an AF_XDP UMEM, plus patching 16
//! bytes (addresses, ports, IPv4 and TCP checksums) from a precomputed record
//! read sequentially (16 MiB for 1M flows, streamed by the prefetcher).
//! Checksums in the records are computed at setup, so every frame is valid on
//! the wire (checked against `testkit::client_frame`), though the pipeline only
//! updates checksums incrementally and never verifies them.
//!
//! At the end, one summary line per bench is printed (mean over criterion's
//! measured samples): `pipeline <bench>: X ns/packet, Y Mpps/core`.
//!
//! Under `cargo test --benches` (criterion's test mode) the 1M-flow fixtures
//! shrink to 20 000 flows so that an unoptimised build stays quick.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustergate_builder::table::{BackendSpec, ServiceSpec};
use clustergate_builder::TableBuild;
use clustergate_dataplane::conntrack::{Config, Conntrack};
use clustergate_dataplane::flow::{v4_to_16, Proto};
use clustergate_dataplane::pipeline::{Frame, Side, Verdict, VerdictKind, Worker};
use clustergate_dataplane::table::Table;
use clustergate_dataplane::testkit::{client_frame, L4Spec, Tcp, BUF_LEN};
use clustergate_dataplane::time::Now;
use criterion::measurement::WallTime;
use criterion::{Bencher, BenchmarkGroup, Criterion, Throughput};

/// Frames per criterion iteration (one RX batch).
const BATCH: usize = 64;
/// Criterion samples per bench; the summary averages the last this many calls.
const SAMPLE_SIZE: usize = 20;
const SERVICES: u32 = 10_000;
const BACKENDS_PER_SERVICE: u32 = 10;
const VPORT: u16 = 80;
const BPORT: u16 = 8080;
/// Conntrack capacity for every bench (flows per family).
const CT_CAPACITY: usize = 2_000_000;
/// 14 (Ethernet) + 20 (IPv4) + 20 (TCP) + 10 = a 64-byte data segment.
const PAYLOAD: &[u8; 10] = b"0123456789";
/// Template size: every frame here fits in one cache line.
const TEMPLATE_LEN: usize = 64;

// Offsets in an untagged IPv4/TCP frame without options.
const IP_CSUM: usize = 24;
const IP_SRC: usize = 26;
const IP_DST: usize = 30;
const TCP_SPORT: usize = 34;
const TCP_DPORT: usize = 36;
const TCP_CSUM: usize = 50;

fn vip(svc: u32) -> [u8; 4] {
    [198, 19, (svc >> 8) as u8, svc as u8]
}

fn backend(svc: u32, j: u32) -> [u8; 4] {
    let k = (svc * BACKENDS_PER_SERVICE + j) % 32_768;
    [198, 18, (k >> 8) as u8, k as u8]
}

/// Client `n`: address in 198.18.128.0/17, port from 1024 up; distinct for every `n < 2^31`.
fn client(n: u32) -> ([u8; 4], u16) {
    let k = n % 32_768;
    (
        [198, 18, 128 | (k >> 8) as u8, k as u8],
        1024 + (n / 32_768) as u16,
    )
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The service flow `n` goes to (spread pseudo-randomly).
fn service_of(n: u32) -> u32 {
    (splitmix64(u64::from(n)) % u64::from(SERVICES)) as u32
}

/// A permutation of `0..n` (Fisher–Yates with splitmix64).
fn shuffled(n: usize, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        s = splitmix64(s);
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One's-complement checksum of `parts` (RFC 1071), folded and complemented.
fn inet_csum(parts: &[&[u8]]) -> [u8; 2] {
    let mut sum = 0u64;
    for p in parts {
        let mut c = p.chunks_exact(2);
        for w in &mut c {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [b] = c.remainder() {
            sum += u64::from(*b) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

fn table() -> Table {
    let ip = |a: [u8; 4]| IpAddr::V4(Ipv4Addr::from(a));
    let services: Vec<ServiceSpec> = (0..SERVICES)
        .map(|s| {
            let backends = (0..BACKENDS_PER_SERVICE)
                .map(|j| BackendSpec::ready(ip(backend(s, j)), BPORT))
                .collect();
            ServiceSpec::cluster_ip(ip(vip(s)), VPORT, Proto::Tcp, backends)
        })
        .collect();
    Table::build(1, 0x5eed, &services).expect("the bench table builds")
}

fn conntrack() -> Arc<Conntrack> {
    Arc::new(Conntrack::new(&Config {
        capacity: CT_CAPACITY,
        ..Config::default()
    }))
}

/// The per-packet variable part of a frame: 16 bytes patched into a template.
#[derive(Debug, Clone, Copy)]
struct Rec {
    src: [u8; 4],
    dst: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    ip_csum: [u8; 2],
    tcp_csum: [u8; 2],
}

/// A pristine IPv4/TCP frame (addresses and ports to be patched).
#[derive(Debug, Clone)]
struct Template {
    bytes: [u8; TEMPLATE_LEN],
    len: usize,
    tcp: Tcp,
    payload: &'static [u8],
}

impl Template {
    fn new(tcp: Tcp, payload: &'static [u8]) -> Self {
        let z = v4_to_16([0; 4]);
        let f = client_frame(z, 0, z, 0, L4Spec::Tcp(tcp), payload);
        assert!(
            f.len() <= TEMPLATE_LEN,
            "template fits in {TEMPLATE_LEN} bytes"
        );
        assert_eq!(
            &f[12..15],
            &[0x08, 0x00, 0x45],
            "untagged IPv4 without options"
        );
        assert_eq!(f[46] >> 4, 5, "TCP without options");
        let mut bytes = [0u8; TEMPLATE_LEN];
        bytes[..f.len()].copy_from_slice(&f);
        Self {
            bytes,
            len: f.len(),
            tcp,
            payload,
        }
    }

    /// The record for `src:sport → dst:dport`, with both checksums computed.
    fn rec(&self, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Rec {
        let mut b = self.bytes;
        b[IP_SRC..IP_SRC + 4].copy_from_slice(&src);
        b[IP_DST..IP_DST + 4].copy_from_slice(&dst);
        b[TCP_SPORT..TCP_SPORT + 2].copy_from_slice(&sport.to_be_bytes());
        b[TCP_DPORT..TCP_DPORT + 2].copy_from_slice(&dport.to_be_bytes());
        b[IP_CSUM..IP_CSUM + 2].fill(0);
        b[TCP_CSUM..TCP_CSUM + 2].fill(0);
        let ip_csum = inet_csum(&[&b[14..34]]);
        let tcp_len = ((self.len - 34) as u16).to_be_bytes();
        let tcp_csum = inet_csum(&[&src, &dst, &[0, 6], &tcp_len, &b[34..self.len]]);
        Rec {
            src,
            dst,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            ip_csum,
            tcp_csum,
        }
    }

    /// Restores the frame of `r` into `buf`; returns its length. This is the
    /// whole per-packet bench overhead (see the module comment).
    #[inline(always)]
    fn load(&self, buf: &mut [u8], r: &Rec) -> usize {
        let b = &mut buf[..TEMPLATE_LEN];
        b.copy_from_slice(&self.bytes);
        b[IP_CSUM..IP_CSUM + 2].copy_from_slice(&r.ip_csum);
        b[IP_SRC..IP_SRC + 4].copy_from_slice(&r.src);
        b[IP_DST..IP_DST + 4].copy_from_slice(&r.dst);
        b[TCP_SPORT..TCP_SPORT + 2].copy_from_slice(&r.sport);
        b[TCP_DPORT..TCP_DPORT + 2].copy_from_slice(&r.dport);
        b[TCP_CSUM..TCP_CSUM + 2].copy_from_slice(&r.tcp_csum);
        self.len
    }

    /// Checks that a loaded record equals the frame testkit builds (checksums included).
    fn check(&self, r: &Rec) {
        let mut buf = [0u8; TEMPLATE_LEN];
        let len = self.load(&mut buf, r);
        let port = |p: [u8; 2]| u16::from_be_bytes(p);
        let want = client_frame(
            v4_to_16(r.src),
            port(r.sport),
            v4_to_16(r.dst),
            port(r.dport),
            L4Spec::Tcp(self.tcp),
            self.payload,
        );
        assert_eq!(
            &buf[..len],
            &want[..],
            "patched frame equals the testkit frame"
        );
    }
}

fn syn_template() -> Template {
    Template::new(Tcp::syn(1000), &[])
}

/// A pre-built stream of frames, consumed [`BATCH`] at a time, cyclically.
#[derive(Debug)]
struct Stream {
    tmpl: Template,
    /// Length is a multiple of [`BATCH`].
    recs: Vec<Rec>,
    pos: usize,
}

impl Stream {
    #[inline(always)]
    fn next_batch(&mut self) -> (&Template, &[Rec]) {
        let at = self.pos;
        self.pos += BATCH;
        if self.pos == self.recs.len() {
            self.pos = 0;
        }
        (&self.tmpl, &self.recs[at..at + BATCH])
    }
}

/// 64 frame buffers of `BUF_LEN` bytes in one allocation, like an AF_XDP UMEM.
fn umem() -> Vec<u8> {
    vec![0u8; BATCH * BUF_LEN]
}

/// One timed iteration: 64 frames, each restored then processed on its own.
#[inline(always)]
fn one_by_one(w: &mut Worker, table: &Table, now: Now, s: &mut Stream, umem: &mut [u8]) {
    let (tmpl, recs) = s.next_batch();
    for (buf, r) in umem.chunks_exact_mut(BUF_LEN).zip(recs) {
        let len = tmpl.load(buf, r);
        black_box(w.process(now, table, buf, len));
    }
}

fn forward_to(v: Verdict, side: Side) -> [u8; 4] {
    match v {
        Verdict::Forward { next_hop, .. } if next_hop.side == side => {
            let a = next_hop.addr;
            [a[12], a[13], a[14], a[15]]
        }
        other => panic!("expected Forward to the {side:?}, got {other:?}"),
    }
}

/// Every frame the worker saw was forwarded.
fn assert_all_forwarded(w: &Worker, what: &str) {
    for k in [VerdictKind::Reject, VerdictKind::Pass, VerdictKind::Drop] {
        assert_eq!(
            w.counters.count(k),
            0,
            "{what}: {} frames got {} ({:?})",
            w.counters.count(k),
            k.label(),
            w.counters
        );
    }
}

/// `n` established flows and the streams that hit them.
#[derive(Debug)]
struct Established {
    worker: Worker,
    now: Now,
    /// Client → vip ACK segments, in a shuffled order.
    fwd: Stream,
    /// Backend → client ACK segments, in the same order.
    rev: Stream,
}

impl Established {
    fn new(table: &Table, n: usize) -> Self {
        let t0 = Instant::now();
        let now = Now::from_secs(1_000);
        let mut w = Worker::new(conntrack());
        // Per-backend counters, as the gateway's workers keep them.
        w.follow_table(table);
        let syn = syn_template();
        let synack = Template::new(
            Tcp {
                syn: true,
                ack: Some(1001),
                seq: 5000,
                ..Tcp::default()
            },
            &[],
        );
        let ack = Template::new(Tcp::ack(1001, 5001), PAYLOAD);
        let reply = Template::new(Tcp::ack(5001, 1011), PAYLOAD);
        let mut buf = vec![0u8; BUF_LEN];
        // (client, cport, vip, backend) per flow.
        let mut flows = Vec::with_capacity(n);
        for i in 0..n as u32 {
            let (c, cport) = client(i);
            let v = vip(service_of(i));
            let r = syn.rec(c, cport, v, VPORT);
            if i < 4 {
                syn.check(&r);
            }
            let len = syn.load(&mut buf, &r);
            let b = forward_to(w.process(now, table, &mut buf, len), Side::Backend);
            assert_eq!(&buf[IP_DST..IP_DST + 4], &b, "DNAT to the next hop");
            assert_eq!(&buf[TCP_DPORT..TCP_DPORT + 2], &BPORT.to_be_bytes());
            let r = synack.rec(b, BPORT, c, cport);
            let len = synack.load(&mut buf, &r);
            assert_eq!(
                forward_to(w.process(now, table, &mut buf, len), Side::Client),
                c
            );
            assert_eq!(&buf[IP_SRC..IP_SRC + 4], &v, "reverse NAT to the vip");
            flows.push((c, cport, v, b));
        }
        assert_eq!(w.counters.new_flows, n as u64);
        assert_eq!(w.counters.replies, n as u64);
        assert_eq!(w.conntrack().len(), n);

        // Enough shuffled passes over the flows to fill whole batches.
        let passes = BATCH / gcd(n, BATCH);
        let mut fwd = Vec::with_capacity(n * passes);
        let mut rev = Vec::with_capacity(n * passes);
        for p in 0..passes {
            for i in shuffled(n, 0xc1u64 + p as u64) {
                let (c, cport, v, b) = flows[i as usize];
                fwd.push(ack.rec(c, cport, v, VPORT));
                rev.push(reply.rec(b, BPORT, c, cport));
            }
        }
        drop(flows);
        ack.check(&fwd[0]);
        reply.check(&rev[0]);
        let mut fx = Self {
            worker: w,
            now,
            fwd: Stream {
                tmpl: ack,
                recs: fwd,
                pos: 0,
            },
            rev: Stream {
                tmpl: reply,
                recs: rev,
                pos: 0,
            },
        };
        fx.verify(table, n);
        eprintln!(
            "pipeline setup: {n} established flows in {:.2?} (conntrack: {} entries)",
            t0.elapsed(),
            fx.worker.conntrack().len()
        );
        fx
    }

    /// One pass over both streams outside timing: every frame is forwarded to
    /// the flow's backend (resp. client), and rewritten as expected.
    fn verify(&mut self, table: &Table, n: usize) {
        let mut buf = vec![0u8; BUF_LEN];
        for r in &self.fwd.recs {
            let len = self.fwd.tmpl.load(&mut buf, r);
            let b = forward_to(
                self.worker.process(self.now, table, &mut buf, len),
                Side::Backend,
            );
            assert_eq!(&buf[IP_DST..IP_DST + 4], &b);
        }
        for r in &self.rev.recs {
            let len = self.rev.tmpl.load(&mut buf, r);
            assert_eq!(
                forward_to(
                    self.worker.process(self.now, table, &mut buf, len),
                    Side::Client
                ),
                r.dst
            );
        }
        assert_eq!(
            self.worker.counters.new_flows, n as u64,
            "no ACK opened a new flow"
        );
        assert_eq!(self.worker.conntrack().len(), n);
        assert_all_forwarded(&self.worker, "setup");
    }
}

/// The service table, built once (10 000 Maglev rings).
fn table_ref() -> &'static Table {
    static TABLE: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let t0 = Instant::now();
        let t = table();
        eprintln!(
            "pipeline setup: table of {SERVICES} services x {BACKENDS_PER_SERVICE} endpoints in {:.2?}",
            t0.elapsed()
        );
        t
    })
}

/// SYNs of never-seen flows. A window of distinct tuples is replayed; between
/// windows (outside timing) the table is emptied by moving time past the SYN
/// timeout and sweeping, so the table holds 0 to `window` flows while measured.
#[derive(Debug)]
struct NewFlows {
    worker: Worker,
    now: Now,
    syn: Stream,
    dirty: bool,
}

impl NewFlows {
    fn new(table: &Table, window: usize) -> Self {
        let t0 = Instant::now();
        let tmpl = syn_template();
        let window = window / BATCH * BATCH;
        let recs: Vec<Rec> = (0..window as u32)
            .map(|i| {
                let (c, cport) = client(i);
                tmpl.rec(c, cport, vip(service_of(i)), VPORT)
            })
            .collect();
        tmpl.check(&recs[0]);
        let mut fx = Self {
            worker: Worker::new(conntrack()),
            now: Now::from_secs(1_000),
            syn: Stream { tmpl, recs, pos: 0 },
            dirty: false,
        };
        // Verify (and fault in the table's memory) with one full window.
        let mut buf = vec![0u8; BUF_LEN];
        for r in &fx.syn.recs {
            let len = fx.syn.tmpl.load(&mut buf, r);
            let b = forward_to(
                fx.worker.process(fx.now, table, &mut buf, len),
                Side::Backend,
            );
            assert_eq!(&b[..2], &[198, 18]);
        }
        assert_eq!(fx.worker.conntrack().len(), window);
        assert_eq!(fx.worker.counters.new_flows, window as u64);
        assert_all_forwarded(&fx.worker, "setup");
        fx.reset();
        eprintln!(
            "pipeline setup: {window} SYN tuples in {:.2?}",
            t0.elapsed()
        );
        fx
    }

    /// Empties the conntrack (no allocation): time moves past the SYN
    /// timeout, then every shard is swept.
    fn reset(&mut self) {
        self.now = self.now.plus_secs(1_000);
        let mut cursor = 0;
        let removed = self
            .worker
            .conntrack()
            .expire(self.now, &mut cursor, usize::MAX);
        assert!(removed > 0 || !self.dirty);
        assert_eq!(
            self.worker.conntrack().len(),
            0,
            "the sweep emptied the conntrack"
        );
        self.syn.pos = 0;
        self.dirty = false;
    }

    fn bench(
        &mut self,
        b: &mut Bencher<'_, WallTime>,
        samples: &mut Samples,
        table: &Table,
        umem: &mut [u8],
        batched: bool,
    ) {
        let mut frames: Vec<Frame<'_>> = umem
            .chunks_exact_mut(BUF_LEN)
            .map(|buf| Frame { buf, len: 0 })
            .collect();
        let mut verdicts = vec![Verdict::Pass; BATCH];
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                if self.dirty && self.syn.pos == 0 {
                    self.reset();
                }
                let room = ((self.syn.recs.len() - self.syn.pos) / BATCH) as u64;
                let k = left.min(room);
                let start = Instant::now();
                for _ in 0..k {
                    if batched {
                        let (tmpl, recs) = self.syn.next_batch();
                        for (f, r) in frames.iter_mut().zip(recs) {
                            f.len = tmpl.load(f.buf, r);
                        }
                        self.worker
                            .process_batch(self.now, table, &mut frames, &mut verdicts);
                        black_box(&mut verdicts);
                    } else {
                        let (tmpl, recs) = self.syn.next_batch();
                        for (buf, r) in frames.iter_mut().zip(recs) {
                            let len = tmpl.load(buf.buf, r);
                            black_box(self.worker.process(self.now, table, buf.buf, len));
                        }
                    }
                }
                total += start.elapsed();
                left -= k;
                self.dirty = true;
            }
            samples.0.push((iters, total));
            total
        });
    }
}

/// (iterations, time) of every call criterion made; the last [`SAMPLE_SIZE`]
/// are the measured samples (the earlier ones are warm-up).
#[derive(Debug, Default)]
struct Samples(Vec<(u64, Duration)>);

impl Samples {
    fn time(&mut self, b: &mut Bencher<'_, WallTime>, mut body: impl FnMut()) {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                body();
            }
            let d = start.elapsed();
            self.0.push((iters, d));
            d
        });
    }

    fn summary(&self, name: &str) -> Option<String> {
        let last = &self.0[self.0.len().saturating_sub(SAMPLE_SIZE)..];
        let iters: u64 = last.iter().map(|s| s.0).sum();
        let ns: f64 = last.iter().map(|s| s.1.as_secs_f64() * 1e9).sum();
        if iters == 0 {
            return None;
        }
        let per_packet = ns / (iters as f64 * BATCH as f64);
        Some(format!(
            "pipeline {name}: {per_packet:.1} ns/packet, {:.2} Mpps/core",
            1e3 / per_packet
        ))
    }
}

/// Runs one bench in `g` and adds its summary line.
fn bench(
    g: &mut BenchmarkGroup<'_, WallTime>,
    group: &str,
    name: &str,
    summary: &mut Vec<String>,
    mut f: impl FnMut(&mut Bencher<'_, WallTime>, &mut Samples),
) {
    let mut samples = Samples::default();
    g.bench_function(name, |b| f(b, &mut samples));
    summary.extend(samples.summary(&format!("{group}/{name}")));
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(BATCH as u64));
    g
}

/// Criterion's own rule: benchmarks run only under `--bench` without `--test`.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let large = if test_mode() { 20_000 } else { 1_000_000 };
    let mut summary = Vec::new();
    let mut umem = umem();
    // Fixtures are built on first use, so a filtered run skips unneeded setup.
    let mut small: Option<Established> = None;
    let mut big: Option<Established> = None;

    let mut g = group(&mut c, "established");
    for (name, fx, n) in [
        ("1k_flows", &mut small, 1_000),
        ("1m_flows", &mut big, large),
    ] {
        bench(&mut g, "established", name, &mut summary, |b, s| {
            let table = table_ref();
            let fx = fx.get_or_insert_with(|| Established::new(table, n));
            s.time(b, || {
                one_by_one(&mut fx.worker, table, fx.now, &mut fx.fwd, &mut umem)
            });
            assert_all_forwarded(&fx.worker, name);
        });
    }
    g.finish();

    let mut g = group(&mut c, "new_flows");
    let mut new_flows: Option<NewFlows> = None;
    for (name, batched) in [("syn", false), ("syn_batch", true)] {
        bench(&mut g, "new_flows", name, &mut summary, |b, s| {
            let table = table_ref();
            let fx = new_flows.get_or_insert_with(|| NewFlows::new(table, large));
            fx.bench(b, s, table, &mut umem, batched);
            assert_all_forwarded(&fx.worker, "new_flows");
        });
    }
    g.finish();
    drop(new_flows);

    let mut g = group(&mut c, "reply");
    for (name, fx, n) in [
        ("1k_flows", &mut small, 1_000),
        ("1m_flows", &mut big, large),
    ] {
        bench(&mut g, "reply", name, &mut summary, |b, s| {
            let table = table_ref();
            let fx = fx.get_or_insert_with(|| Established::new(table, n));
            s.time(b, || {
                one_by_one(&mut fx.worker, table, fx.now, &mut fx.rev, &mut umem)
            });
            assert_all_forwarded(&fx.worker, name);
        });
    }
    g.finish();
    drop(small);

    let mut g = group(&mut c, "batch");
    bench(&mut g, "batch", "established_1m", &mut summary, |b, s| {
        let table = table_ref();
        let fx = big.get_or_insert_with(|| Established::new(table, large));
        let mut frames: Vec<Frame<'_>> = umem
            .chunks_exact_mut(BUF_LEN)
            .map(|buf| Frame { buf, len: 0 })
            .collect();
        let mut verdicts = vec![Verdict::Pass; BATCH];
        s.time(b, || {
            let (tmpl, recs) = fx.fwd.next_batch();
            for (f, r) in frames.iter_mut().zip(recs) {
                f.len = tmpl.load(f.buf, r);
            }
            fx.worker
                .process_batch(fx.now, table, &mut frames, &mut verdicts);
            black_box(&mut verdicts);
        });
        assert_all_forwarded(&fx.worker, "batch");
    });
    // The same, while flow snapshots run back to back on another core.
    bench(
        &mut g,
        "batch",
        "established_1m_while_inspecting",
        &mut summary,
        |b, s| {
            let table = table_ref();
            let fx = big.get_or_insert_with(|| Established::new(table, large));
            let mut frames: Vec<Frame<'_>> = umem
                .chunks_exact_mut(BUF_LEN)
                .map(|buf| Frame { buf, len: 0 })
                .collect();
            let mut verdicts = vec![Verdict::Pass; BATCH];
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let ct = Arc::clone(fx.worker.conntrack());
            let now = fx.now;
            let reader = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut out = Vec::with_capacity(100_000);
                    let mut snapshots = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        out.clear();
                        ct.snapshot_flows(now, 100_000, &|_| true, &mut out);
                        snapshots += 1;
                    }
                    snapshots
                })
            };
            let t0 = Instant::now();
            s.time(b, || {
                let (tmpl, recs) = fx.fwd.next_batch();
                for (f, r) in frames.iter_mut().zip(recs) {
                    f.len = tmpl.load(f.buf, r);
                }
                fx.worker
                    .process_batch(fx.now, table, &mut frames, &mut verdicts);
                black_box(&mut verdicts);
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let snapshots = reader.join().expect("snapshot thread");
            eprintln!(
                "while inspecting: {snapshots} snapshots of 100000 flows in {:.2?}",
                t0.elapsed()
            );
            assert_all_forwarded(&fx.worker, "batch while inspecting");
        },
    );
    g.finish();
    drop(big);

    c.final_summary();
    for line in &summary {
        println!("{line}");
    }
}
