//! AF_XDP sockets for one worker: a UMEM shared by the worker's sockets (one
//! per served interface, on each of the worker's queues), the fill and
//! completion rings kept full, and batched RX and TX.
//!
//! Owns: the UMEM frames and the four rings of every socket, the free-frame
//! pool, and the `unsafe` that handing frames to and from the kernel needs.
//! Frames in the caller's hands are [`FrameToken`]s: only a [`Ports`] makes
//! them, and transmitting or releasing one consumes it, so its callers need
//! no `unsafe` of their own.
//! It never looks inside a frame (the core does that) and never allocates
//! after [`Ports::open`]: the free pool and every scratch array are sized up
//! front.
//!
//! Shared UMEM: every socket of a worker is created on the same UMEM, so a
//! frame received on the client-facing interface is put on the
//! backend-facing interface's TX ring as it is, without a copy. Each
//! (interface, queue) pair still has its own fill and completion rings, as the
//! kernel requires (`XDP_SHARED_UMEM`). The UMEM is created inside the worker
//! thread, after it is pinned, so its pages are first touched on that core.
#![allow(unsafe_code)] // The UMEM and its rings are memory shared with the kernel.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};

use thiserror::Error;
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, RxQueue, Socket, TxQueue, Umem};

use xsk_rs::FrameDesc;

use crate::pipeline::Frame;

/// Empty poll rounds before an idle worker sleeps in `poll(2)` ([`Ports::idle`]).
pub const SPINS_BEFORE_WAIT: u32 = 512;
/// Longest sleep of an idle worker, in milliseconds.
pub const IDLE_WAIT_MS: i32 = 1;

/// Frames the kernel transmits per `sendto` kick in copy mode
/// (`MAX_PER_SOCKET_BUDGET` in net/xdp/xsk.c).
pub const KICK_BUDGET: usize = 32;

/// Frames handled per RX call (and the size of every per-batch array).
pub const RX_BATCH: usize = crate::pipeline::BATCH;

/// How a socket was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies each frame (veth, drivers without AF_XDP support).
    Copy,
}

impl BindMode {
    /// For logs and metrics.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::ZeroCopy => "zero-copy",
            Self::Copy => "copy",
        }
    }
}

/// Whether to try zero-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Try zero-copy, fall back to copy mode when the driver refuses it.
    Auto,
    /// Copy mode only.
    Never,
}

/// Sizes of the rings and the UMEM.
#[derive(Debug, Clone, Copy)]
pub struct XskOptions {
    /// Entries in every RX, TX, fill and completion ring (a power of two).
    pub ring_size: u32,
    /// Bytes per UMEM frame: 2048 or 4096.
    pub frame_size: u32,
    /// Zero-copy policy.
    pub zero_copy: ZeroCopy,
}

impl Default for XskOptions {
    fn default() -> Self {
        Self {
            ring_size: 2048,
            frame_size: 2048,
            zero_copy: ZeroCopy::Auto,
        }
    }
}

/// An interface as the worker sees it.
#[derive(Debug, Clone)]
pub struct Iface {
    /// Interface name.
    pub name: String,
    /// Kernel interface index.
    pub ifindex: u32,
    /// Position in `--interface` (the XSKMAP slot).
    pub slot: u32,
}

/// Why sockets could not be opened.
#[derive(Debug, Error)]
pub enum XskError {
    /// A size was refused.
    #[error("AF_XDP option {what} = {value}: {reason}")]
    Option {
        /// Which option.
        what: &'static str,
        /// Its value.
        value: u32,
        /// Why.
        reason: String,
    },
    /// The UMEM could not be created.
    #[error("creating a UMEM of {frames} frames of {frame_size} bytes: {source}")]
    Umem {
        /// Frames asked for.
        frames: u32,
        /// Frame size.
        frame_size: u32,
        /// The cause.
        source: xsk_rs::umem::UmemCreateError,
    },
    /// A socket could not be created or bound.
    #[error("AF_XDP socket on {ifname} queue {queue}: {source}")]
    Socket {
        /// Interface.
        ifname: String,
        /// Queue.
        queue: u32,
        /// The cause.
        source: xsk_rs::socket::SocketCreateError,
    },
    /// The interface name is not a valid C string.
    #[error("interface name {0:?} is not valid")]
    Name(String),
    /// The UMEM's fill and completion rings were not handed over.
    #[error("AF_XDP socket on {ifname} queue {queue}: no fill/completion rings for a new (interface, queue) pair")]
    NoFillRing {
        /// Interface.
        ifname: String,
        /// Queue.
        queue: u32,
    },
}

/// Ring statistics of one socket, from `XDP_STATISTICS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Frames dropped by the kernel for lack of room or a bad descriptor.
    pub rx_dropped: u64,
    /// Invalid RX descriptors.
    pub rx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was found empty.
    pub rx_fill_ring_empty: u64,
    /// Invalid TX descriptors.
    pub tx_invalid_descs: u64,
    /// Times the TX ring was found empty.
    pub tx_ring_empty: u64,
}

/// One UMEM frame in the caller's hands, as [`Ports::receive`] and
/// [`Ports::alloc`] hand them out. Only a [`Ports`] makes one, it is neither
/// `Copy` nor `Clone`, and [`Ports::transmit`] and [`Ports::release`]
/// consume it: so no frame is on a ring and in hand at once, nor in two
/// hands. A token carries its `Ports`' identity, and any other `Ports`
/// refuses it (a panic: a programming error, caught before a frame of one
/// UMEM could be mistaken for a frame of another). A token dropped instead
/// of handed back loses its frame until the `Ports` is dropped.
#[derive(Debug)]
#[must_use = "a frame not handed back to `Ports::transmit` or `Ports::release` is lost"]
pub struct FrameToken {
    desc: FrameDesc,
    owner: u32,
}

impl FrameToken {
    /// The frame's length: as received, or as last set in
    /// [`Ports::with_frames`].
    #[must_use]
    pub fn len(&self) -> usize {
        self.desc.lengths().data()
    }

    /// Whether the frame holds no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Identity of a [`Ports`] (its tokens carry it).
fn next_ports_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One socket: an (interface, queue) pair with its four rings.
#[derive(Debug)]
pub struct Port {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name.
    pub ifname: String,
    /// XSKMAP slot of the interface.
    pub slot: u32,
    /// Queue id.
    pub queue: u32,
    /// How it was bound.
    pub mode: BindMode,
    rx: RxQueue,
    tx: TxQueue,
    fq: FillQueue,
    cq: CompQueue,
    /// Frames handed to TX and not completed yet.
    in_flight: u32,
}

impl Port {
    /// The socket's file descriptor, for the XSKMAP.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// `XDP_STATISTICS` of the socket (one syscall; not for the packet path).
    ///
    /// # Errors
    /// The `getsockopt` error.
    pub fn ring_stats(&self) -> io::Result<RingStats> {
        let s = self.rx.fd().xdp_statistics()?;
        Ok(RingStats {
            rx_dropped: s.rx_dropped(),
            rx_invalid_descs: s.rx_invalid_descs(),
            rx_ring_full: s.rx_ring_full(),
            rx_fill_ring_empty: s.rx_fill_ring_empty_descs(),
            tx_invalid_descs: s.tx_invalid_descs(),
            tx_ring_empty: s.tx_ring_empty_descs(),
        })
    }
}

/// A worker's sockets on one shared UMEM, and its pool of free frames.
#[derive(Debug)]
pub struct Ports {
    // Field order matters: the sockets (and their rings) drop before the UMEM.
    ports: Vec<Port>,
    umem: Umem,
    free: Vec<FrameDesc>,
    scratch: Vec<FrameDesc>,
    /// The descriptors of one [`Ports::transmit`] call.
    tx_scratch: Vec<FrameDesc>,
    ring_size: u32,
    /// Stamped on every [`FrameToken`] this `Ports` hands out.
    id: u32,
}

fn queue_size(what: &'static str, v: u32) -> Result<QueueSize, XskError> {
    QueueSize::new(v).map_err(|e| XskError::Option {
        what,
        value: v,
        reason: e.to_string(),
    })
}

impl Ports {
    /// Creates the UMEM and one socket per (interface, queue), trying
    /// zero-copy first when `opts.zero_copy` allows it. Every fill ring is
    /// filled. No XDP program is loaded here (the steering program is ours).
    ///
    /// # Errors
    /// [`XskError`] naming the interface and queue that failed.
    pub fn open(ifaces: &[Iface], queues: &[u32], opts: XskOptions) -> Result<Self, XskError> {
        match Self::open_with(ifaces, queues, opts) {
            // One UMEM has one mode: when the first interface took zero-copy
            // and a later one cannot, bind them all in copy mode.
            Err(e) if opts.zero_copy == ZeroCopy::Auto => {
                tracing::info!("{e}; binding every socket of this worker in copy mode");
                Self::open_with(
                    ifaces,
                    queues,
                    XskOptions {
                        zero_copy: ZeroCopy::Never,
                        ..opts
                    },
                )
            }
            r => r,
        }
    }

    fn open_with(ifaces: &[Iface], queues: &[u32], opts: XskOptions) -> Result<Self, XskError> {
        let pairs = (ifaces.len() * queues.len()) as u32;
        let ring = queue_size("ring size", opts.ring_size)?;
        let frame_size = FrameSize::new(opts.frame_size).map_err(|e| XskError::Option {
            what: "frame size",
            value: opts.frame_size,
            reason: e.to_string(),
        })?;
        // Each pair: a full fill ring, plus a full TX ring of frames in flight,
        // plus a batch in hand.
        let frames = pairs
            .saturating_mul(opts.ring_size.saturating_mul(2))
            .saturating_add(RX_BATCH as u32);
        let umem_config = UmemConfig::builder()
            .frame_size(frame_size)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| XskError::Option {
                what: "UMEM",
                value: opts.frame_size,
                reason: e.to_string(),
            })?;
        let count = NonZeroU32::new(frames).ok_or(XskError::Option {
            what: "frames",
            value: 0,
            reason: "no interface or queue".into(),
        })?;
        let (umem, descs) =
            Umem::new(umem_config, count, false).map_err(|source| XskError::Umem {
                frames,
                frame_size: opts.frame_size,
                source,
            })?;
        let mut ports = Vec::with_capacity(pairs as usize);
        for iface in ifaces {
            let name: Interface = iface
                .name
                .parse()
                .map_err(|_| XskError::Name(iface.name.clone()))?;
            for &queue in queues {
                // Sockets after the first share its UMEM and, with it, its
                // mode: the kernel binds them the way the UMEM was bound.
                let inherited = ports.first().map(|p: &Port| p.mode);
                ports.push(open_port(
                    &umem, iface, &name, queue, ring, opts, inherited,
                )?);
            }
        }
        let mut this = Self {
            ports,
            umem,
            free: Vec::with_capacity(descs.len()),
            scratch: vec![FrameDesc::default(); opts.ring_size as usize],
            tx_scratch: Vec::with_capacity(opts.ring_size as usize),
            ring_size: opts.ring_size,
            id: next_ports_id(),
        };
        this.free.extend(descs);
        this.refill();
        Ok(this)
    }

    /// The sockets.
    #[must_use]
    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    /// Frames in the free pool (neither in a ring nor in hand).
    #[must_use]
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Frames on TX rings not yet completed, over all sockets.
    #[must_use]
    pub fn in_flight(&self) -> u32 {
        self.ports.iter().map(|p| p.in_flight).sum()
    }

    /// Takes completed TX frames back into the pool and tops every fill ring
    /// up from it, waking the kernel where the ring asks for it.
    pub fn recycle(&mut self) {
        for p in &mut self.ports {
            if p.in_flight == 0 {
                continue;
            }
            // SAFETY: the completion ring hands back frames of this UMEM that
            // the kernel has finished transmitting; from now on only we
            // touch them, and `scratch` is ours.
            let n = unsafe { p.cq.consume(&mut self.scratch) };
            p.in_flight = p.in_flight.saturating_sub(n as u32);
            self.free.extend_from_slice(&self.scratch[..n]);
        }
        self.refill();
    }

    fn refill(&mut self) {
        for p in &mut self.ports {
            let want = p.fq.nb_free(self.ring_size) as usize;
            let n = want.min(self.free.len());
            if n == 0 {
                continue;
            }
            let start = self.free.len() - n;
            // SAFETY: frames in the free pool belong to this UMEM and are not
            // on any ring nor in hand; after `produce` they are the kernel's
            // until the RX ring returns them, and we drop them from the pool.
            let done = unsafe { p.fq.produce(&self.free[start..]) };
            self.free.truncate(self.free.len() - done);
            if done > 0 && p.fq.needs_wakeup() {
                // A zero-timeout poll is the wakeup; its error (none is
                // expected) would show again at the next RX.
                let _ = p.fq.wakeup(p.rx.fd_mut(), 0);
            }
        }
    }

    /// The token for `desc`, a frame now in the caller's hands.
    fn token(&self, desc: FrameDesc) -> FrameToken {
        FrameToken {
            desc,
            owner: self.id,
        }
    }

    /// Panics unless `t` is one of this `Ports`' tokens.
    #[inline]
    fn check(&self, t: &FrameToken) {
        assert!(
            t.owner == self.id,
            "a frame token of AF_XDP port set {} handed to port set {}",
            t.owner,
            self.id
        );
    }

    /// Takes up to `n` free frames out of the pool into `out`, for the
    /// caller to fill ([`Ports::with_frames`]) and [`Ports::transmit`] (a
    /// traffic generator); returns how many. Never more than `out`'s spare
    /// capacity, so it does not allocate. Call [`Ports::recycle`] first to
    /// take completed TX frames back. The frames' contents are whatever they
    /// last held.
    pub fn alloc(&mut self, out: &mut Vec<FrameToken>, n: usize) -> usize {
        let n = n.min(out.capacity() - out.len()).min(self.free.len());
        let start = self.free.len() - n;
        for i in start..self.free.len() {
            out.push(self.token(self.free[i]));
        }
        self.free.truncate(start);
        n
    }

    /// Receives up to [`RX_BATCH`] frames from socket `port` into `out`
    /// (never more than `out`'s spare capacity, so it does not allocate);
    /// returns how many.
    pub fn receive(&mut self, port: usize, out: &mut Vec<FrameToken>) -> usize {
        let want = (out.capacity() - out.len()).min(RX_BATCH);
        let mut descs = [FrameDesc::default(); RX_BATCH];
        let n = match self.ports.get_mut(port) {
            // SAFETY: `descs` receives frames of this UMEM that the kernel has
            // filled and released to us; nothing else refers to them until we
            // put them on a ring again, and each becomes one token.
            Some(p) => unsafe { p.rx.consume(&mut descs[..want]) },
            None => 0,
        };
        for d in &descs[..n] {
            out.push(self.token(*d));
        }
        n
    }

    /// Calls `f` with the frames `tokens` as mutable buffers (each the
    /// whole frame, so that a reject has room to grow), at most [`RX_BATCH`]
    /// of them. `f` writes into `lens[i]` the length to send frame `i` with
    /// (its current length when `f` leaves it); after `f`, each token
    /// carries that length (at most the frame's room).
    ///
    /// # Panics
    /// On a token of another `Ports`.
    pub fn with_frames<R>(
        &self,
        tokens: &mut [FrameToken],
        f: impl FnOnce(&mut [Frame<'_>], &mut [usize]) -> R,
    ) -> R {
        let n = tokens.len().min(RX_BATCH);
        let mut lens = [0usize; RX_BATCH];
        let mut datas: [Option<xsk_rs::umem::frame::DataMut<'_>>; RX_BATCH] =
            [const { None }; RX_BATCH];
        for (slot, t) in datas.iter_mut().zip(tokens[..n].iter_mut()) {
            self.check(t);
            // SAFETY: a token of this `Ports` (checked above) is a frame of
            // this UMEM that is on no ring and in no other hands: tokens are
            // made once per frame handed out and are neither `Copy` nor
            // `Clone`, and `&mut [FrameToken]` holds each once. So the
            // buffers do not alias each other nor anything the kernel writes.
            *slot = Some(unsafe { self.umem.data_mut(&mut t.desc) });
        }
        let r = {
            let mut it = datas.iter_mut().zip(lens.iter_mut());
            let mut frames: [Frame<'_>; RX_BATCH] = std::array::from_fn(|_| match it.next() {
                Some((Some(d), l)) => {
                    *l = d.contents().len();
                    let received = *l;
                    // Open the whole data segment: the frame's length is set
                    // again below from what `f` decides.
                    d.cursor().set_pos(usize::MAX);
                    Frame {
                        buf: d.contents_mut(),
                        len: received,
                    }
                }
                _ => Frame {
                    buf: &mut [],
                    len: 0,
                },
            });
            f(&mut frames[..n], &mut lens[..n])
        };
        for (d, &l) in datas.iter_mut().zip(&lens[..n]) {
            if let Some(d) = d {
                d.cursor().set_pos(l);
            }
        }
        r
    }

    /// Puts the frames of `tokens` (emptying it) on socket `port`'s TX ring
    /// and kicks the kernel when it asks for it (always, in copy mode).
    /// Frames that do not fit, and empty ones (the kernel would drop them
    /// without completing them, losing the frame), go back to the pool.
    /// Returns how many were queued.
    ///
    /// # Panics
    /// On a token of another `Ports`.
    pub fn transmit(&mut self, port: usize, tokens: &mut Vec<FrameToken>) -> usize {
        if tokens.is_empty() {
            return 0;
        }
        self.tx_scratch.clear();
        for t in tokens.drain(..) {
            assert!(
                t.owner == self.id,
                "a frame token of AF_XDP port set {} handed to port set {}",
                t.owner,
                self.id
            );
            if t.desc.lengths().data() == 0 {
                self.free.push(t.desc);
            } else {
                self.tx_scratch.push(t.desc);
            }
        }
        let descs = &self.tx_scratch[..];
        let Some(p) = self.ports.get_mut(port) else {
            self.free.extend_from_slice(descs);
            return 0;
        };
        let room = p.tx.nb_free(descs.len() as u32) as usize;
        let n = room.min(descs.len());
        let done = if n > 0 {
            // SAFETY: the descriptors come from tokens of this `Ports`
            // (checked above), consumed here: frames of this UMEM in our
            // hands only, each once. After `produce` they are the kernel's
            // until the completion ring returns them (`recycle`).
            unsafe { p.tx.produce(&descs[..n]) }
        } else {
            0
        };
        p.in_flight += done as u32;
        if p.tx.needs_wakeup() {
            // In copy mode one `sendto` sends at most KICK_BUDGET frames, so
            // one kick per batch would let the ring fill under load: kick
            // once per KICK_BUDGET frames queued. ENOBUFS/EAGAIN/EBUSY are
            // absorbed by xsk-rs; anything else would repeat and show in the
            // TX statistics.
            let kicks = match p.mode {
                BindMode::Copy => done.div_ceil(KICK_BUDGET).max(1),
                BindMode::ZeroCopy => 1,
            };
            for _ in 0..kicks {
                let _ = p.tx.wakeup();
            }
        }
        self.free.extend_from_slice(&descs[done..]);
        done
    }

    /// Returns the frames of `tokens` (emptying it) to the pool: frames not
    /// sent.
    ///
    /// # Panics
    /// On a token of another `Ports`.
    pub fn release(&mut self, tokens: &mut Vec<FrameToken>) {
        for t in tokens.drain(..) {
            self.release_one(t);
        }
    }

    /// Returns one frame to the pool.
    ///
    /// # Panics
    /// On a token of another `Ports`.
    pub fn release_one(&mut self, token: FrameToken) {
        self.check(&token);
        self.free.push(token.desc);
    }

    /// Kicks every TX ring that still has frames in flight (copy mode needs a
    /// `sendto` to make progress).
    pub fn kick(&mut self) {
        for p in &mut self.ports {
            if p.in_flight > 0 && p.tx.needs_wakeup() {
                let _ = p.tx.wakeup();
            }
        }
    }

    /// A poll loop's end of round: after a round that handled `work` frames,
    /// resets `spins`; after an empty one, kicks the TX rings still in flight
    /// (copy mode needs it) and spins, then sleeps in `poll(2)` for up to
    /// [`IDLE_WAIT_MS`] once [`SPINS_BEFORE_WAIT`] empty rounds have passed.
    pub fn idle(&mut self, work: usize, spins: &mut u32) {
        if work > 0 {
            *spins = 0;
            return;
        }
        self.kick();
        *spins += 1;
        if *spins >= SPINS_BEFORE_WAIT {
            self.wait(IDLE_WAIT_MS);
            *spins = 0;
        } else {
            std::hint::spin_loop();
        }
    }

    /// Kicks and recycles until no TX frame is in flight or `limit` has
    /// passed; returns the frames still in flight.
    pub fn drain(&mut self, limit: std::time::Duration) -> u32 {
        let deadline = std::time::Instant::now() + limit;
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            self.kick();
            self.recycle();
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        self.in_flight()
    }

    /// Waits up to `timeout_ms` for any RX ring to have frames: `poll(2)` on
    /// the first socket with the timeout, the others without. Used when
    /// idle, so that an idle worker does not spin.
    pub fn wait(&mut self, timeout_ms: i32) -> bool {
        let mut ready = false;
        let last = self.ports.len().saturating_sub(1);
        for (i, p) in self.ports.iter_mut().enumerate() {
            let t = if i == last { timeout_ms } else { 0 };
            if ready {
                break;
            }
            ready = p.rx.poll(t).unwrap_or(false);
        }
        ready
    }
}

fn open_port(
    umem: &Umem,
    iface: &Iface,
    name: &Interface,
    queue: u32,
    ring: QueueSize,
    opts: XskOptions,
    inherited: Option<BindMode>,
) -> Result<Port, XskError> {
    let copy = [(
        BindMode::Copy,
        BindFlags::XDP_COPY.union(BindFlags::XDP_USE_NEED_WAKEUP),
    )];
    let zero_copy = [(
        BindMode::ZeroCopy,
        BindFlags::XDP_ZEROCOPY.union(BindFlags::XDP_USE_NEED_WAKEUP),
    )];
    let attempts: &[(BindMode, BindFlags)] = match (inherited, opts.zero_copy) {
        (Some(BindMode::Copy), _) => &copy,
        (Some(BindMode::ZeroCopy), _) => &zero_copy,
        (None, ZeroCopy::Auto) => &[
            (
                BindMode::ZeroCopy,
                BindFlags::XDP_ZEROCOPY.union(BindFlags::XDP_USE_NEED_WAKEUP),
            ),
            (
                BindMode::Copy,
                BindFlags::XDP_COPY.union(BindFlags::XDP_USE_NEED_WAKEUP),
            ),
        ],
        (None, ZeroCopy::Never) => &copy,
    };
    let mut last_err = None;
    for &(mode, flags) in attempts {
        let config = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(flags)
            .build();
        // SAFETY: the program-load inhibit flag is set, as xsk-rs requires
        // for shared UMEMs; each (interface, queue) pair is bound once per
        // UMEM, and the returned rings live in the `Port`, which drops before
        // the UMEM (field order of `Ports`).
        match unsafe { Socket::new(config, umem, name, queue) } {
            Ok((tx, rx, Some((fq, cq)))) => {
                tracing::info!(
                    interface = %iface.name,
                    queue,
                    mode = mode.label(),
                    "AF_XDP socket bound in {} mode",
                    mode.label()
                );
                return Ok(Port {
                    ifindex: iface.ifindex,
                    ifname: iface.name.clone(),
                    slot: iface.slot,
                    queue,
                    mode,
                    rx,
                    tx,
                    fq,
                    cq,
                    in_flight: 0,
                });
            }
            Ok((_, _, None)) => {
                return Err(XskError::NoFillRing {
                    ifname: iface.name.clone(),
                    queue,
                })
            }
            Err(e) => {
                if mode == BindMode::ZeroCopy {
                    tracing::info!(
                        interface = %iface.name,
                        queue,
                        "zero-copy refused ({e}); falling back to copy mode"
                    );
                }
                last_err = Some(e);
            }
        }
    }
    Err(XskError::Socket {
        ifname: iface.name.clone(),
        queue,
        source: last_err.expect("at least one bind attempt"),
    })
}
