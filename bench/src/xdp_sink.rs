//! The sink's own XDP program (`bpf/sink.c`), through aya.
//!
//! Owns: loading it, attaching it to one interface (driver mode first, else
//! generic), registering the sink's AF_XDP sockets by rx queue, reading its
//! counters, detaching. The program redirects every unicast IPv4 frame and
//! every unicast IPv6 frame but ICMPv6 to the socket of its queue, and
//! passes the rest (ARP, neighbour discovery, multicast) to the kernel, so
//! the sink sees whatever the dataplane under test sent it: rewritten UDP
//! or TCP, or IP-in-IP from a DSR gateway. The same program serves every
//! dataplane, so the receiving end costs the same for all of them.
//!
//! Must never: stay attached after the process (aya attaches with a
//! bpf_link, which the kernel releases when the process's descriptors
//! close), or take over an interface that already has an XDP program (the
//! attach fails).

use std::os::fd::RawFd;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray, XskMap};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;

/// The compiled program (`build.rs` runs clang on `bpf/sink.c`).
static SINK_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sink.o"));

const PROGRAM: &str = "sink";
/// Rx queues the program serves (the size of `xsks`).
pub const MAX_QUEUES: u32 = 64;
const STAT_REDIRECTED: u32 = 0;
const STAT_PASSED: u32 = 1;
const STAT_NO_SOCKET: u32 = 2;

/// The program's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Handed to a sink socket.
    pub redirected: u64,
    /// Passed to the kernel (ARP, neighbour discovery, multicast, not IP).
    pub passed: u64,
    /// An IP frame on a queue with no socket (passed to the kernel).
    pub no_socket: u64,
}

/// The loaded and attached program.
pub struct SinkProg {
    ebpf: Ebpf,
    xsks: XskMap<MapData>,
    stats: PerCpuArray<MapData, u64>,
    link: Option<XdpLinkId>,
    /// "driver" or "generic".
    pub mode: &'static str,
}

impl std::fmt::Debug for SinkProg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkProg")
            .field("mode", &self.mode)
            .field("attached", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl SinkProg {
    /// Loads the program and attaches it to `ifindex` (`ifname` for messages).
    ///
    /// # Errors
    /// The object does not load (verifier), or neither mode attaches (e.g.
    /// the interface already has an XDP program).
    pub fn attach(ifname: &str, ifindex: u32) -> Result<Self> {
        let mut ebpf = Ebpf::load(SINK_OBJ).context("loading the sink's XDP object")?;
        let xsks = XskMap::try_from(ebpf.take_map("xsks").context("map xsks missing")?)
            .context("opening map xsks")?;
        let stats = PerCpuArray::try_from(ebpf.take_map("stats").context("map stats missing")?)
            .context("opening map stats")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("program sink missing")?
            .try_into()
            .context("program sink is not XDP")?;
        prog.load()
            .context("loading the sink's XDP program (verifier)")?;
        let (link, mode) = match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(l) => (l, "driver"),
            Err(driver) => match prog.attach_to_if_index(ifindex, XdpMode::Skb) {
                Ok(l) => (l, "generic"),
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "attaching the sink's XDP program to {ifname} (driver mode: {driver})"
                    )))
                }
            },
        };
        Ok(Self {
            ebpf,
            xsks,
            stats,
            link: Some(link),
            mode,
        })
    }

    /// Frames from rx queue `queue` go to socket `fd` (bound to that queue).
    ///
    /// # Errors
    /// Queue out of range, or the kernel refuses the descriptor.
    pub fn register_socket(&mut self, queue: u32, fd: RawFd) -> Result<()> {
        anyhow::ensure!(
            queue < MAX_QUEUES,
            "queue {queue}: at most {MAX_QUEUES} queues"
        );
        self.xsks
            .set(queue, fd, 0)
            .with_context(|| format!("registering the socket of queue {queue}"))
    }

    /// The counters, summed over CPUs.
    ///
    /// # Errors
    /// The kernel refuses the read.
    pub fn stats(&self) -> Result<Stats> {
        let read = |i: u32| -> Result<u64> {
            let v = self
                .stats
                .get(&i, 0)
                .context("reading the sink's counters")?;
            Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(Stats {
            redirected: read(STAT_REDIRECTED)?,
            passed: read(STAT_PASSED)?,
            no_socket: read(STAT_NO_SOCKET)?,
        })
    }

    /// Detaches the program (also done when it is dropped).
    ///
    /// # Errors
    /// The kernel refuses the detach.
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<()> {
        if let Some(link) = self.link.take() {
            let prog: &mut Xdp = self
                .ebpf
                .program_mut(PROGRAM)
                .context("program sink missing")?
                .try_into()
                .context("program sink is not XDP")?;
            prog.detach(link)
                .context("detaching the sink's XDP program")?;
        }
        Ok(())
    }
}

impl Drop for SinkProg {
    fn drop(&mut self) {
        let _ = self.detach_inner();
    }
}
