//! The XDP steering program (`bpf/steer.c`) and its maps, through aya.
//!
//! Owns: loading the program, attaching it to the gateway's interfaces (driver
//! mode, else generic), the AF_XDP socket map (`xsks`), and keeping the lookup
//! maps equal to what the current [`Table`] needs, as a diff against a
//! user-space mirror: per entry, from counted keys, by the frontends whose
//! block changed since the last sync (see [`Steering::sync`]), and the
//! gateway's source-NAT addresses and port range
//! ([`Steering::set_snat`]). The program redirects to the gateway only
//! packets to a frontend, replies from a backend (to one of the gateway's
//! SNAT addresses: only on a SNAT port), ICMP errors about either and
//! non-first fragments of either; everything else goes to the kernel.
//!
//! Node ports: the table keeps a node-port frontend on the unspecified
//! address of its family (`0.0.0.0`, `::`), which is never put in a map.
//! Instead `frontends` gets one key (node address, node port, protocol) for
//! every node address ([`Steering::set_node_addrs`], the node's own
//! addresses of [`crate::io::node_addrs`]) of the frontend's family that the
//! table's node-port addresses select ([`Table::selects_node_port_address`],
//! control's `--nodeport-addresses`). A packet to one is then steered like a
//! packet to any frontend, and so is an ICMP error quoting such a flow. Node
//! addresses are *not* put in `vip_addrs`: that would steer every non-first
//! fragment to the node itself; so the non-first fragments of a node-port
//! flow reach the kernel (a node port that needs fragments, e.g. large UDP
//! datagrams, is better served through an external or load-balancer IP).
//! The keys follow both the table ([`Steering::sync`]) and the node's
//! addresses (set them, then sync again).
//!
//! Must never: steer anything the table does not name (the node must stay
//! reachable: ARP, SSH and the node's own traffic are always passed), replace
//! an XDP program it did not attach (attaching to an interface that already
//! has one fails instead), leave its program on an interface after
//! [`Steering::detach`], drop or the process's death (see [`Steering::load`]),
//! or look at packets itself (that is [`crate::pipeline`]'s job).
//!
//! Map and key layout (an ABI with `bpf/steer.c`):
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | `frontends` | HASH | [`SteerKey`] bytes: addr\[16\], port (network order), proto, pad 0; a node port once per selected node address | `u8` 1 |
//! | `backends` | HASH | [`SteerKey`] bytes (backend address, backend port, frontend proto) | `u8` 1 |
//! | `vip_addrs` | HASH | `[u8; 16]` frontend address (never a node port's, never unspecified) | `u8` 1 |
//! | `backend_addrs` | HASH | `[u8; 16]` backend address | `u8` 1 |
//! | `snat_addrs` | HASH | `[u8; 16]` one of the gateway's SNAT addresses | `u8` 1 |
//! | `snat_ports` | ARRAY (1 entry) | `u32` 0 | `[u16; 2]` lo, hi: the SNAT range, inclusive, **host order**; lo 0: none |
//! | `if_slots` | HASH | `u32` ifindex | `u32` slot (position in [`Steering::load`]'s list) |
//! | `xsks` | XSKMAP | `u32` slot × [`MAX_QUEUES`] + rx queue | AF_XDP socket fd |
//! | `stats` | PERCPU_ARRAY | `u32` 0..4 | `u64`: redirected, passed, malformed, no socket |
//!
//! Addresses are [`Addr16`] (IPv4 as `::ffff:a.b.c.d`).

use std::collections::BTreeSet;
use std::fmt;
use std::os::fd::RawFd;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, XskMap};
use aya::programs::links::{Link as _, LinkType};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader, TestRun as _, TestRunOptions};
use foldhash::fast::RandomState;
use hashbrown::HashSet;
use thiserror::Error;

use crate::flow::{ip_from16, Addr16, Proto};
use crate::snat::PortRange;
use crate::table::{Front, FrontendKind, Table};

/// Rx queues per interface: `xsks` holds `slot * MAX_QUEUES + queue`.
pub const MAX_QUEUES: u32 = 64;

/// Interfaces one [`Steering`] can serve (the size of `if_slots`).
pub const MAX_INTERFACES: usize = 256;

/// Bytes of a `frontends` / `backends` key.
pub const KEY_LEN: usize = 20;

/// Capacity of `snat_addrs`: the `--snat-address` overrides, or every
/// address of the served interfaces.
pub const MAX_SNAT_STEER_ADDRS: u32 = 4096;

/// The compiled program (`build.rs` runs clang on `bpf/steer.c`).
static STEER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.o"));

const PROGRAM: &str = "steer";
const MAP_FRONTENDS: &str = "frontends";
const MAP_BACKENDS: &str = "backends";
const MAP_VIP_ADDRS: &str = "vip_addrs";
const MAP_BACKEND_ADDRS: &str = "backend_addrs";
const MAP_SNAT_ADDRS: &str = "snat_addrs";
const MAP_SNAT_PORTS: &str = "snat_ports";
const MAP_IF_SLOTS: &str = "if_slots";
const MAP_XSKS: &str = "xsks";
const MAP_STATS: &str = "stats";

/// Indexes of the `stats` counters (as in `bpf/steer.c`).
const STAT_REDIRECTED: u32 = 0;
const STAT_PASSED: u32 = 1;
const STAT_MALFORMED: u32 = 2;
const STAT_NO_SOCKET: u32 = 3;

/// How the program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native XDP, run by the driver.
    Driver,
    /// Generic (SKB) XDP, run by the kernel's stack after the skb is built.
    Generic,
}

/// Map capacities (`max_entries`), set before the maps are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteerConfig {
    /// `frontends`: (address, port, protocol) of every frontend, and of
    /// every node port on every selected node address.
    pub frontends: u32,
    /// `backends`: (address, port, protocol) of every backend.
    pub backends: u32,
    /// `vip_addrs`: distinct frontend addresses.
    pub vip_addrs: u32,
    /// `backend_addrs`: distinct backend addresses.
    pub backend_addrs: u32,
}

impl Default for SteerConfig {
    fn default() -> Self {
        Self {
            frontends: 262_144,
            backends: 1_048_576,
            // As many as frontends: 100 000 Services have 100 000 cluster IPs.
            vip_addrs: 262_144,
            backend_addrs: 262_144,
        }
    }
}

/// What failed, and with which input.
#[derive(Debug, Error)]
pub enum SteerError {
    /// More interfaces than `if_slots` holds.
    #[error("{count} interfaces given; the steering program serves at most {max}")]
    TooManyInterfaces {
        /// Interfaces given.
        count: usize,
        /// [`MAX_INTERFACES`].
        max: usize,
    },
    /// The same ifindex twice in the list.
    #[error("interface {ifname} (ifindex {ifindex}) is given twice")]
    DuplicateInterface {
        /// Name.
        ifname: String,
        /// Index.
        ifindex: u32,
    },
    /// The object could not be parsed or its maps created.
    #[error("load the XDP steering object (map sizes {config:?}): {source}")]
    LoadObject {
        /// The capacities asked for.
        config: SteerConfig,
        /// aya's error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The object lacks a program or map this loader needs (a build mismatch).
    #[error("the XDP steering object has no {what} `{name}`")]
    Missing {
        /// "program" or "map".
        what: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map is not of the type or key/value size expected.
    #[error("open map `{map}` of the XDP steering object: {source}")]
    OpenMap {
        /// Map name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// The kernel (verifier) refused the program.
    #[error("load XDP program `{PROGRAM}` into the kernel: {source}")]
    LoadProgram {
        /// aya's error, with the verifier log.
        #[source]
        source: Box<ProgramError>,
    },
    /// Neither driver nor generic mode could be attached.
    #[error(
        "attach XDP program to {ifname} (ifindex {ifindex}): {source} (driver mode failed first: {driver})"
    )]
    Attach {
        /// Interface name.
        ifname: String,
        /// Interface index.
        ifindex: u32,
        /// Why driver mode failed.
        driver: String,
        /// Why generic mode failed.
        #[source]
        source: Box<ProgramError>,
    },
    /// `if_slots` could not be written.
    #[error("set slot {slot} for {ifname} (ifindex {ifindex}) in map `if_slots`: {source}")]
    SetSlot {
        /// Interface name.
        ifname: String,
        /// Interface index.
        ifindex: u32,
        /// Its slot.
        slot: u32,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// Slot or queue out of range.
    #[error(
        "AF_XDP socket at slot {slot} queue {queue}: out of range ({slots} slots, {MAX_QUEUES} queues each)"
    )]
    SocketOutOfRange {
        /// Slot asked for.
        slot: u32,
        /// Queue asked for.
        queue: u32,
        /// Slots (interfaces) loaded.
        slots: u32,
    },
    /// `xsks` refused the socket.
    #[error("register AF_XDP socket fd {fd} at slot {slot} queue {queue} in map `xsks`: {source}")]
    RegisterSocket {
        /// Slot.
        slot: u32,
        /// Queue.
        queue: u32,
        /// The socket (-1 when unregistering).
        fd: RawFd,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// A lookup map refused an insert (full: see [`SteerConfig`]).
    #[error("insert {key} into map `{map}`: {source}")]
    MapInsert {
        /// Map name.
        map: &'static str,
        /// The key, readable.
        key: String,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// A lookup map refused a delete.
    #[error("delete {key} from map `{map}`: {source}")]
    MapRemove {
        /// Map name.
        map: &'static str,
        /// The key, readable.
        key: String,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// A map could not be read.
    #[error("read map `{map}`: {source}")]
    ReadMap {
        /// Map name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("run XDP program `{PROGRAM}` on a {len}-byte test frame: {source}")]
    TestRun {
        /// Frame length.
        len: usize,
        /// aya's error.
        #[source]
        source: Box<ProgramError>,
    },
    /// The program could not be detached.
    #[error("detach XDP program from {ifname} (ifindex {ifindex}): {source}")]
    Detach {
        /// Interface name.
        ifname: String,
        /// Interface index.
        ifindex: u32,
        /// aya's error.
        #[source]
        source: Box<ProgramError>,
    },
}

/// The program's counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SteerStats {
    /// Redirected to an AF_XDP socket.
    pub redirected: u64,
    /// Passed to the kernel: not the gateway's (ARP, node traffic, other ports).
    pub passed: u64,
    /// Passed to the kernel because malformed or truncated.
    pub malformed: u64,
    /// The gateway's, but passed to the kernel: no AF_XDP socket at
    /// (slot, rx queue), or the interface has no slot.
    pub no_socket: u64,
}

/// What one [`Steering::sync`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    /// Keys in `frontends` afterwards.
    pub frontends: usize,
    /// Of them, (node address, node port, protocol) keys.
    pub node_port_keys: usize,
    /// Keys in `backends` afterwards.
    pub backends: usize,
    /// Keys inserted, over all four lookup maps.
    pub added: usize,
    /// Keys deleted, over all four lookup maps.
    pub removed: usize,
    /// Whether only the keys of the frontends that changed were looked at,
    /// or every frontend's.
    pub scope: SyncScope,
    /// Some backend address was added to or removed from `backend_addrs`
    /// ([`Steering::backend_addrs`] changed).
    pub backend_addrs_changed: bool,
}

/// How much of the table one [`Steering::sync`] looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncScope {
    /// Only the frontends whose block changed since the last sync (added,
    /// removed or replaced), and the lingering backends that came or went:
    /// their keys were counted out and in, and only keys whose count
    /// crossed zero were written.
    Frontends {
        /// Frontends added, removed or replaced.
        changed: usize,
    },
    /// Every frontend's keys, compared with what the maps hold.
    Whole(WholeSync),
}

impl Default for SyncScope {
    fn default() -> Self {
        Self::Whole(WholeSync::First)
    }
}

/// Why a [`Steering::sync`] looked at the whole table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeSync {
    /// The first sync.
    First,
    /// The last sync failed part-way: the maps may hold part of it.
    Retry,
    /// The node-port addresses changed: the node's own addresses
    /// ([`Steering::set_node_addrs`]) or the table's selection of them
    /// (`--nodeport-addresses`).
    NodePortAddresses,
    /// A frontend of the last table or of this one could not be looked up
    /// by its key (a protocol the table does not balance).
    Unmatched,
    /// The counts were out of step with the tables (a key counted out that
    /// was never counted in): counted again from the table.
    Recount,
}

/// One word, for logs (`whole=retry`).
impl fmt::Display for WholeSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::First => "first",
            Self::Retry => "retry",
            Self::NodePortAddresses => "node_port_addresses",
            Self::Unmatched => "unmatched",
            Self::Recount => "recount",
        })
    }
}

/// What one [`Steering::set_snat`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnatSync {
    /// Addresses in `snat_addrs` afterwards.
    pub addrs: usize,
    /// Addresses inserted.
    pub added: usize,
    /// Addresses deleted.
    pub removed: usize,
    /// Whether `snat_ports` was written.
    pub ports_changed: bool,
}

/// What the program did with one frame in [`Steering::classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classified {
    /// The gateway's: redirected, or passed for want of a socket.
    Steered,
    /// Not the gateway's: passed to the kernel.
    Passed,
    /// Malformed or truncated: passed to the kernel.
    Malformed,
}

/// A `frontends` / `backends` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SteerKey {
    /// Address, canonical 16-byte form.
    pub addr: Addr16,
    /// Port, host order (stored in network order).
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
}

impl SteerKey {
    /// The map's key bytes: addr, port big-endian, proto, a zero pad byte.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        let mut b = [0u8; KEY_LEN];
        b[..16].copy_from_slice(&self.addr);
        b[16..18].copy_from_slice(&self.port.to_be_bytes());
        b[18] = self.proto;
        b
    }

    /// Parses the map's key bytes (the pad byte is ignored).
    #[must_use]
    pub fn from_bytes(b: &[u8; KEY_LEN]) -> Self {
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&b[..16]);
        Self {
            addr,
            port: u16::from_be_bytes([b[16], b[17]]),
            proto: b[18],
        }
    }
}

impl fmt::Display for SteerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            132 => "sctp".to_owned(),
            p => format!("proto {p}"),
        };
        match ip_from16(self.addr) {
            std::net::IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            std::net::IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

/// The lookup maps' contents as read from the kernel (sorted).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MapDump {
    /// `frontends`.
    pub frontends: Vec<SteerKey>,
    /// `backends`.
    pub backends: Vec<SteerKey>,
    /// `vip_addrs`.
    pub vip_addrs: Vec<Addr16>,
    /// `backend_addrs`.
    pub backend_addrs: Vec<Addr16>,
    /// `snat_addrs`.
    pub snat_addrs: Vec<Addr16>,
    /// `snat_ports` (`None` while unset).
    pub snat_ports: Option<PortRange>,
}

type Set<K> = HashSet<K, RandomState>;
type Counts<K> = hashbrown::HashMap<K, u32, RandomState>;

/// What the maps hold (the mirror) or must hold (from a table).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Keys {
    frontends: Set<SteerKey>,
    backends: Set<SteerKey>,
    vip_addrs: Set<Addr16>,
    backend_addrs: Set<Addr16>,
}

impl Keys {
    /// The keys `table` needs on a node with addresses `node_addrs`, every
    /// frontend at once: what [`Wanted`] must always count, kept as its
    /// reference. Every frontend steers, with or without backends (the core
    /// answers those with a reset or an ICMP unreachable); a node port on
    /// each node address of its family that the table's node-port
    /// addresses select (never on the unspecified address it is kept at,
    /// and its addresses are not VIPs); every backend, draining and
    /// terminating ones included, steers its replies. Also returns how many
    /// distinct node-port keys there are (one that is also another
    /// frontend's key counts too).
    #[cfg(test)]
    fn wanted(table: &Table, node_addrs: &BTreeSet<Addr16>) -> (Self, usize) {
        let mut k = Self::default();
        // The node addresses each family's node ports are steered on.
        let selected: Vec<Addr16> = if table.has_node_ports() {
            node_addrs
                .iter()
                .filter(|a| !ip_from16(**a).is_unspecified())
                .filter(|a| table.selects_node_port_address(a))
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        let mut node_ports: Set<SteerKey> = Set::default();
        for f in table.frontends() {
            let v4 = ip_from16(f.addr).is_ipv4();
            if f.kind == FrontendKind::NodePort as u8 {
                for a in selected.iter().filter(|a| ip_from16(**a).is_ipv4() == v4) {
                    let key = SteerKey {
                        addr: *a,
                        port: f.port,
                        proto: f.proto,
                    };
                    k.frontends.insert(key);
                    node_ports.insert(key);
                }
            } else if !ip_from16(f.addr).is_unspecified() {
                k.frontends.insert(SteerKey {
                    addr: f.addr,
                    port: f.port,
                    proto: f.proto,
                });
                k.vip_addrs.insert(f.addr);
            }
            for b in table.backends_of(f) {
                k.backends.insert(SteerKey {
                    addr: b.addr,
                    port: b.port,
                    proto: f.proto,
                });
                k.backend_addrs.insert(b.addr);
            }
        }
        (k, node_ports.len())
    }
}

/// The node's addresses that `table`'s node ports are steered on: those of
/// `node_addrs` the table's node-port addresses select (never the
/// unspecified address). In the order of `node_addrs`, so two selections
/// compare equal when they are.
fn selected_node_addrs(table: &Table, node_addrs: &BTreeSet<Addr16>) -> Vec<Addr16> {
    node_addrs
        .iter()
        .filter(|a| !ip_from16(**a).is_unspecified())
        .filter(|a| table.selects_node_port_address(a))
        .copied()
        .collect()
}

/// Adds one to `key`'s count (`up`) or takes one off (a count held is
/// never 0). `Some(true)` when the key appeared or disappeared; `None` when
/// taken off a key that had none (the counts are out of step).
fn bump<K: std::hash::Hash + Eq + Copy>(counts: &mut Counts<K>, key: K, up: bool) -> Option<bool> {
    if up {
        let n = counts.entry(key).or_insert(0);
        *n += 1;
        return Some(*n == 1);
    }
    let n = counts.get_mut(&key)?;
    *n -= 1;
    if *n == 0 {
        counts.remove(&key);
        return Some(true);
    }
    Some(false)
}

/// The keys the maps must hold, each with how many needs it has: one per
/// frontend of the table that names it (a backend of two frontends of the
/// same protocol, an address with two ports: 2), and one per lingering
/// backend. A frontend's change counts its old block's keys out and its new
/// block's in; only a key whose count crosses zero changes in the maps.
#[derive(Debug, Default, PartialEq, Eq)]
struct Wanted {
    frontends: Counts<SteerKey>,
    /// The node-port keys among `frontends`, counted by node port alone
    /// (for [`SyncStats::node_port_keys`]).
    node_ports: Counts<SteerKey>,
    backends: Counts<SteerKey>,
    vip_addrs: Counts<Addr16>,
    backend_addrs: Counts<Addr16>,
}

/// The keys whose count crossed zero during an update (either way, maybe
/// twice): the only map entries it may have to write.
#[derive(Debug, Default)]
struct Touched {
    /// Whether to note them (not while counting a whole table).
    on: bool,
    frontends: Vec<SteerKey>,
    backends: Vec<SteerKey>,
    vip_addrs: Vec<Addr16>,
    backend_addrs: Vec<Addr16>,
}

impl Touched {
    fn note<K>(on: bool, list: &mut Vec<K>, key: K, crossed: Option<bool>) -> bool {
        if on && crossed == Some(true) {
            list.push(key);
        }
        crossed.is_some()
    }
}

impl Wanted {
    /// The counts of `table` (node ports on `selected`) and `lingering`.
    fn build(table: &Table, selected: &[Addr16], lingering: &BTreeSet<SteerKey>) -> Self {
        let mut w = Self::default();
        let mut off = Touched::default();
        for f in table.frontends() {
            w.front(f, selected, true, &mut off);
        }
        for k in lingering {
            w.linger(*k, true, &mut off);
        }
        w
    }

    /// Counts frontend `f`'s keys in (`up`) or out, with its node ports on
    /// the node addresses `selected`. False when the counts were out of
    /// step (a key counted out that had no count).
    fn front(&mut self, f: &Front, selected: &[Addr16], up: bool, t: &mut Touched) -> bool {
        let mut ok = true;
        let v4 = ip_from16(f.addr).is_ipv4();
        if f.kind == FrontendKind::NodePort as u8 {
            for a in selected.iter().filter(|a| ip_from16(**a).is_ipv4() == v4) {
                let key = SteerKey {
                    addr: *a,
                    port: f.port,
                    proto: f.proto,
                };
                ok &= bump(&mut self.node_ports, key, up).is_some();
                let c = bump(&mut self.frontends, key, up);
                ok &= Touched::note(t.on, &mut t.frontends, key, c);
            }
        } else if !ip_from16(f.addr).is_unspecified() {
            let key = SteerKey {
                addr: f.addr,
                port: f.port,
                proto: f.proto,
            };
            let c = bump(&mut self.frontends, key, up);
            ok &= Touched::note(t.on, &mut t.frontends, key, c);
            let c = bump(&mut self.vip_addrs, f.addr, up);
            ok &= Touched::note(t.on, &mut t.vip_addrs, f.addr, c);
        }
        for b in f.backends() {
            ok &= self.backend(
                SteerKey {
                    addr: b.addr,
                    port: b.port,
                    proto: f.proto,
                },
                up,
                t,
            );
        }
        ok
    }

    /// Counts a lingering backend in or out.
    fn linger(&mut self, key: SteerKey, up: bool, t: &mut Touched) -> bool {
        self.backend(key, up, t)
    }

    fn backend(&mut self, key: SteerKey, up: bool, t: &mut Touched) -> bool {
        let c = bump(&mut self.backends, key, up);
        let ok = Touched::note(t.on, &mut t.backends, key, c);
        let c = bump(&mut self.backend_addrs, key.addr, up);
        ok & Touched::note(t.on, &mut t.backend_addrs, key.addr, c)
    }

    /// The keys counted, as sets.
    #[cfg(test)]
    fn keys(&self) -> Keys {
        Keys {
            frontends: self.frontends.keys().copied().collect(),
            backends: self.backends.keys().copied().collect(),
            vip_addrs: self.vip_addrs.keys().copied().collect(),
            backend_addrs: self.backend_addrs.keys().copied().collect(),
        }
    }
}

/// Map entries to write: inserted first (all four maps), then deleted, so a
/// key that stays is never missing in between.
#[derive(Debug, Default)]
struct Diff {
    add: KeyLists,
    remove: KeyLists,
}

#[derive(Debug, Default)]
struct KeyLists {
    frontends: Vec<SteerKey>,
    backends: Vec<SteerKey>,
    vip_addrs: Vec<Addr16>,
    backend_addrs: Vec<Addr16>,
}

impl KeyLists {
    fn len(&self) -> usize {
        self.frontends.len() + self.backends.len() + self.vip_addrs.len() + self.backend_addrs.len()
    }
}

/// Splits `keys` into those `want` has and `have` lacks (to insert) and
/// the reverse (to delete), each once.
fn split<K: std::hash::Hash + Eq + Copy + Ord>(
    mut keys: Vec<K>,
    want: &Counts<K>,
    have: &Set<K>,
    add: &mut Vec<K>,
    remove: &mut Vec<K>,
) {
    keys.sort_unstable();
    keys.dedup();
    for k in keys {
        match (want.contains_key(&k), have.contains(&k)) {
            (true, false) => add.push(k),
            (false, true) => remove.push(k),
            _ => {}
        }
    }
}

/// Every key of `want` that `have` lacks, and the reverse.
fn whole<K: std::hash::Hash + Eq + Copy>(
    want: &Counts<K>,
    have: &Set<K>,
    add: &mut Vec<K>,
    remove: &mut Vec<K>,
) {
    add.extend(want.keys().filter(|k| !have.contains(*k)).copied());
    remove.extend(have.iter().filter(|k| !want.contains_key(*k)).copied());
}

/// What the counts of a [`Tracker`] were made of.
#[derive(Debug)]
struct Basis {
    /// The table (a clone: it shares the blocks, so a block still here is
    /// the very same one in the next table when that frontend did not
    /// change).
    table: Table,
    /// The node addresses its node ports were counted on.
    selected: Vec<Addr16>,
    /// The lingering backends counted.
    lingering: BTreeSet<SteerKey>,
}

/// How a [`Tracker::update`] went.
#[derive(Debug)]
enum Update {
    /// Counted again from the whole table: compare every key with the maps.
    Whole(WholeSync),
    /// Only `changed` frontends (and the lingering backends that came or
    /// went) were counted out and in: compare the touched keys.
    Frontends { changed: usize, touched: Touched },
}

impl Update {
    fn scope(&self) -> SyncScope {
        match self {
            Self::Whole(w) => SyncScope::Whole(*w),
            Self::Frontends { changed, .. } => SyncScope::Frontends { changed: *changed },
        }
    }
}

/// A deliberate fault, for the test that shows the property test can fail.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    #[default]
    None,
    /// Removed frontends are not counted out.
    KeepRemoved,
    /// A replaced block with the same key is taken as unchanged.
    SameKeySame,
}

/// The steering maps' wanted keys, counted, and how to bring them from one
/// table to the next by the frontends that changed: the pure part of
/// [`Steering::sync`].
#[derive(Debug, Default)]
struct Tracker {
    wanted: Wanted,
    /// What `wanted` counts; `None` before the first sync and after a
    /// failed one (the next update counts the whole table).
    basis: Option<Basis>,
    /// Why the next update is whole while `basis` is `None`.
    stale: Option<WholeSync>,
    #[cfg(test)]
    mutation: Mutation,
}

/// The frontends of `next` whose block is not `prev`'s (replaced: both;
/// added: only the new one) and those of `prev` that `next` lacks
/// (removed: only the old one). Walks both tables in order (a delta keeps
/// the order and puts added frontends last), looking a frontend up by key
/// only where the orders part; `None` when one cannot be looked up.
fn changed_fronts<'a>(
    prev: &'a Table,
    next: &'a Table,
) -> Option<Vec<(Option<&'a Front>, Option<&'a Front>)>> {
    let p = prev.frontends();
    let n = next.frontends();
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let in_table = |t: &Table, f: &Front| -> Option<Option<u32>> {
        Some(t.frontend(&f.addr, f.port, Proto::from_ip_number(f.proto)?))
    };
    while let Some(a) = p.get(i) {
        if let Some(b) = n.get(j) {
            if std::ptr::eq(a, b) {
                i += 1;
                j += 1;
                continue;
            }
            if a.key() == b.key() {
                out.push((Some(a), Some(b)));
                i += 1;
                j += 1;
                continue;
            }
        }
        if in_table(next, a)?.is_some() {
            return by_key(prev, next);
        }
        out.push((Some(a), None));
        i += 1;
    }
    while let Some(b) = n.get(j) {
        if in_table(prev, b)?.is_some() {
            return by_key(prev, next);
        }
        out.push((None, Some(b)));
        j += 1;
    }
    Some(out)
}

/// As [`changed_fronts`], every frontend looked up by key.
fn by_key<'a>(
    prev: &'a Table,
    next: &'a Table,
) -> Option<Vec<(Option<&'a Front>, Option<&'a Front>)>> {
    let mut out = Vec::new();
    for a in prev.frontends() {
        let proto = Proto::from_ip_number(a.proto)?;
        match next
            .frontend(&a.addr, a.port, proto)
            .and_then(|i| next.frontend_record(i))
        {
            Some(b) if std::ptr::eq(a, b) => {}
            b => out.push((Some(a), b)),
        }
    }
    for b in next.frontends() {
        let proto = Proto::from_ip_number(b.proto)?;
        if prev.frontend(&b.addr, b.port, proto).is_none() {
            out.push((None, Some(b)));
        }
    }
    Some(out)
}

/// Which (address, port, protocol) are backends of a table: for telling
/// the backends that left it ([`Steering::table_backends`]). Answered from
/// the counts of the last synced table and the blocks that changed since
/// (a change costs its frontends), or else from a set of every backend.
#[derive(Debug)]
pub struct TableBackends<'a> {
    how: Backends<'a>,
}

#[derive(Debug)]
enum Backends<'a> {
    /// The last synced table's counts (lingering backends included), and
    /// per key what the changed blocks and lingering backends add or take.
    Counted {
        counts: &'a Counts<SteerKey>,
        delta: hashbrown::HashMap<SteerKey, i64, RandomState>,
    },
    /// Every backend of the table.
    Every(Set<SteerKey>),
}

impl TableBackends<'_> {
    /// Is `key` a backend (address, port, frontend protocol) of the table?
    #[must_use]
    pub fn contains(&self, key: &SteerKey) -> bool {
        match &self.how {
            Backends::Counted { counts, delta } => {
                let n = i64::from(counts.get(key).copied().unwrap_or(0));
                n + delta.get(key).copied().unwrap_or(0) > 0
            }
            Backends::Every(set) => set.contains(key),
        }
    }

    /// Whether it was answered from the counts (not a set of every backend).
    #[must_use]
    pub fn counted(&self) -> bool {
        matches!(self.how, Backends::Counted { .. })
    }
}

impl Tracker {
    /// Brings the counts to `table` (node ports on those of `node_addrs` it
    /// selects) and `lingering`: by the frontends whose block changed since
    /// the last [`Tracker::commit`]ted table, or else from the whole table.
    /// Returns what was done and what to commit once the maps hold it.
    fn update(
        &mut self,
        table: &Table,
        node_addrs: &BTreeSet<Addr16>,
        lingering: &BTreeSet<SteerKey>,
    ) -> (Update, Basis) {
        let selected = selected_node_addrs(table, node_addrs);
        let why = match self.basis.take() {
            None => self.stale.unwrap_or(WholeSync::First),
            Some(b) if b.selected != selected => WholeSync::NodePortAddresses,
            Some(b) => match self.count_changes(&b, table, &selected, lingering) {
                Ok(u) => return (u, Self::basis(table, selected, lingering)),
                Err(why) => why,
            },
        };
        self.wanted = Wanted::build(table, &selected, lingering);
        (Update::Whole(why), Self::basis(table, selected, lingering))
    }

    fn basis(table: &Table, selected: Vec<Addr16>, lingering: &BTreeSet<SteerKey>) -> Basis {
        Basis {
            table: table.clone(),
            selected,
            lingering: lingering.clone(),
        }
    }

    /// The backends of `table`: from the counts when they are those of a
    /// synced table and `table`'s frontends can be matched with its.
    fn table_backends(&self, table: &Table) -> TableBackends<'_> {
        let counted = self.basis.as_ref().and_then(|b| {
            let pairs = changed_fronts(&b.table, table)?;
            let mut delta: hashbrown::HashMap<SteerKey, i64, RandomState> = Default::default();
            let mut add = |f: &Front, n: i64| {
                for be in f.backends() {
                    let key = SteerKey {
                        addr: be.addr,
                        port: be.port,
                        proto: f.proto,
                    };
                    *delta.entry(key).or_insert(0) += n;
                }
            };
            for (old, new) in pairs {
                if let Some(f) = old {
                    add(f, -1);
                }
                if let Some(f) = new {
                    add(f, 1);
                }
            }
            // The counts hold the lingering backends too.
            for k in &b.lingering {
                *delta.entry(*k).or_insert(0) -= 1;
            }
            Some(Backends::Counted {
                counts: &self.wanted.backends,
                delta,
            })
        });
        let how = counted.unwrap_or_else(|| {
            Backends::Every(
                table
                    .frontends()
                    .iter()
                    .flat_map(|f| {
                        f.backends().iter().map(move |b| SteerKey {
                            addr: b.addr,
                            port: b.port,
                            proto: f.proto,
                        })
                    })
                    .collect(),
            )
        });
        TableBackends { how }
    }

    /// Counts the new blocks of `table` and the new lingering backends in,
    /// then the old ones out (in first, so a key that stays never drops to
    /// zero on the way).
    fn count_changes(
        &mut self,
        b: &Basis,
        table: &Table,
        selected: &[Addr16],
        lingering: &BTreeSet<SteerKey>,
    ) -> Result<Update, WholeSync> {
        #[allow(unused_mut)] // reason: only the mutation test changes it
        let mut pairs = changed_fronts(&b.table, table).ok_or(WholeSync::Unmatched)?;
        #[cfg(test)]
        match self.mutation {
            Mutation::None => {}
            Mutation::KeepRemoved => pairs.retain(|(_, new)| new.is_some()),
            Mutation::SameKeySame => pairs.retain(|(old, new)| old.is_none() || new.is_none()),
        }
        let mut t = Touched {
            on: true,
            ..Touched::default()
        };
        let w = &mut self.wanted;
        let mut ok = true;
        for f in pairs.iter().filter_map(|(_, new)| *new) {
            ok &= w.front(f, selected, true, &mut t);
        }
        for k in lingering.difference(&b.lingering) {
            ok &= w.linger(*k, true, &mut t);
        }
        for f in pairs.iter().filter_map(|(old, _)| *old) {
            ok &= w.front(f, selected, false, &mut t);
        }
        for k in b.lingering.difference(lingering) {
            ok &= w.linger(*k, false, &mut t);
        }
        if !ok {
            return Err(WholeSync::Recount);
        }
        Ok(Update::Frontends {
            changed: pairs.len(),
            touched: t,
        })
    }

    /// The map entries to write so that maps holding `mirror` hold the
    /// counted keys: for a per-frontend update only the touched keys are
    /// looked at.
    fn diff(&self, mirror: &Keys, update: Update) -> Diff {
        let w = &self.wanted;
        let mut d = Diff::default();
        let (a, r) = (&mut d.add, &mut d.remove);
        match update {
            Update::Whole(_) => {
                whole(
                    &w.frontends,
                    &mirror.frontends,
                    &mut a.frontends,
                    &mut r.frontends,
                );
                whole(
                    &w.backends,
                    &mirror.backends,
                    &mut a.backends,
                    &mut r.backends,
                );
                whole(
                    &w.vip_addrs,
                    &mirror.vip_addrs,
                    &mut a.vip_addrs,
                    &mut r.vip_addrs,
                );
                whole(
                    &w.backend_addrs,
                    &mirror.backend_addrs,
                    &mut a.backend_addrs,
                    &mut r.backend_addrs,
                );
            }
            Update::Frontends { touched: t, .. } => {
                split(
                    t.frontends,
                    &w.frontends,
                    &mirror.frontends,
                    &mut a.frontends,
                    &mut r.frontends,
                );
                split(
                    t.backends,
                    &w.backends,
                    &mirror.backends,
                    &mut a.backends,
                    &mut r.backends,
                );
                split(
                    t.vip_addrs,
                    &w.vip_addrs,
                    &mirror.vip_addrs,
                    &mut a.vip_addrs,
                    &mut r.vip_addrs,
                );
                split(
                    t.backend_addrs,
                    &w.backend_addrs,
                    &mirror.backend_addrs,
                    &mut a.backend_addrs,
                    &mut r.backend_addrs,
                );
            }
        }
        d
    }

    /// The maps hold the counted keys now: the next update starts from
    /// `basis`.
    fn commit(&mut self, basis: Basis) {
        self.basis = Some(basis);
        self.stale = None;
    }

    /// Writing the maps failed part-way: the next update counts the whole
    /// table and compares every key with the mirror.
    fn failed(&mut self) {
        self.basis = None;
        self.stale = Some(WholeSync::Retry);
    }
}

fn addr_str(a: &Addr16) -> String {
    ip_from16(*a).to_string()
}

/// One interface the program is attached to.
#[derive(Debug)]
struct Attached {
    ifname: String,
    ifindex: u32,
    mode: AttachMode,
    /// A bpf_link (detached by the kernel when its last fd closes), not a
    /// netlink attachment (which outlives the process).
    bpf_link: bool,
    link: aya::programs::xdp::XdpLink,
}

/// The loaded steering program, attached to the gateway's interfaces.
///
/// Dropping it detaches the program from every interface and frees the maps.
pub struct Steering {
    // Field order is drop order: the links go first.
    attached: Vec<Attached>,
    modes: Vec<AttachMode>,
    frontends: HashMap<MapData, [u8; KEY_LEN], u8>,
    backends: HashMap<MapData, [u8; KEY_LEN], u8>,
    vip_addrs: HashMap<MapData, Addr16, u8>,
    backend_addrs: HashMap<MapData, Addr16, u8>,
    snat_addrs: HashMap<MapData, Addr16, u8>,
    snat_ports: Array<MapData, [u16; 2]>,
    xsks: XskMap<MapData>,
    stats: PerCpuArray<MapData, u64>,
    _if_slots: HashMap<MapData, u32, u32>,
    /// What the four lookup maps hold.
    mirror: Keys,
    /// What they must hold, counted, and the table it was counted from.
    tracker: Tracker,
    /// What `snat_addrs` holds.
    snat_mirror: Set<Addr16>,
    /// What `snat_ports` holds.
    snat_range: Option<PortRange>,
    /// The node's addresses node ports are steered on (from the next sync).
    node_addrs: BTreeSet<Addr16>,
    /// Backends that left the table but still have TCP connections (from
    /// the next sync): their replies stay steered.
    lingering: BTreeSet<SteerKey>,
    slots: u32,
    ebpf: Ebpf,
}

const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Steering>();
};

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("attached", &self.attached)
            .field("slots", &self.slots)
            .field("frontends", &self.mirror.frontends.len())
            .field("backends", &self.mirror.backends.len())
            .finish_non_exhaustive()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, SteerError> {
    ebpf.take_map(name)
        .ok_or(SteerError::Missing { what: "map", name })
}

fn open_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, SteerError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    M::try_from(take_map(ebpf, name)?).map_err(|source| SteerError::OpenMap {
        map: name,
        source: Box::new(source),
    })
}

/// XDP links of program `prog_id` that the kernel knows of (0 on error: the
/// count only tells bpf_link from netlink attachments).
fn xdp_links_of(prog_id: u32) -> usize {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| l.program_id() == prog_id && l.link_type().ok() == Some(LinkType::Xdp))
        .count()
}

impl Steering {
    /// Loads the program with [`SteerConfig::default`] capacities and attaches
    /// it to every interface of `ifaces` (name, ifindex); see [`Steering::load_with`].
    ///
    /// # Errors
    /// See [`Steering::load_with`].
    pub fn load(ifaces: &[(String, u32)]) -> Result<Self, SteerError> {
        Self::load_with(ifaces, SteerConfig::default())
    }

    /// Loads the program, sizes the maps from `config`, and attaches it to every
    /// interface of `ifaces` (name, ifindex; the slot of each is its position):
    /// driver mode first, else generic (SKB) mode. Which mode each interface got
    /// is logged and kept ([`Steering::attach_modes`]).
    ///
    /// Detach on death: aya's `Xdp::attach_to_if_index` (aya 0.14,
    /// `programs/xdp.rs`) first calls `bpf_link_create(BPF_XDP)` (Linux ≥ 5.9)
    /// and keeps the link as an `FdLink`, an owned file descriptor; it falls
    /// back to a netlink `IFLA_XDP` attachment only when link creation fails
    /// with `EINVAL` (older kernels). A bpf_link lives only as long as a file
    /// descriptor refers to it: when the process exits, even by SIGKILL, the
    /// kernel closes its descriptors, the link is released and the program
    /// leaves the interface. A netlink attachment would outlive the process;
    /// this is detected (the kernel's link list is counted after each attach),
    /// logged as a warning, and reported by [`Steering::detaches_on_exit`].
    /// No bpffs is used: nothing is pinned.
    ///
    /// An interface that already has an XDP program is not taken over: the
    /// attach fails (`EBUSY`) and so does this call.
    ///
    /// # Errors
    /// Too many or duplicate interfaces, an object or verifier failure, or an
    /// interface neither mode can attach to. Interfaces attached before the
    /// failure are detached again.
    pub fn load_with(ifaces: &[(String, u32)], config: SteerConfig) -> Result<Self, SteerError> {
        if ifaces.len() > MAX_INTERFACES {
            return Err(SteerError::TooManyInterfaces {
                count: ifaces.len(),
                max: MAX_INTERFACES,
            });
        }
        for (i, (name, idx)) in ifaces.iter().enumerate() {
            if ifaces[..i].iter().any(|(_, j)| j == idx) {
                return Err(SteerError::DuplicateInterface {
                    ifname: name.clone(),
                    ifindex: *idx,
                });
            }
        }
        let slots = ifaces.len().max(1) as u32;

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FRONTENDS, config.frontends)
            .map_max_entries(MAP_BACKENDS, config.backends)
            .map_max_entries(MAP_VIP_ADDRS, config.vip_addrs)
            .map_max_entries(MAP_BACKEND_ADDRS, config.backend_addrs)
            .map_max_entries(MAP_SNAT_ADDRS, MAX_SNAT_STEER_ADDRS)
            .map_max_entries(MAP_IF_SLOTS, MAX_INTERFACES as u32)
            .map_max_entries(MAP_XSKS, slots * MAX_QUEUES)
            .load(STEER_OBJ)
            .map_err(|source| SteerError::LoadObject {
                config,
                source: Box::new(source),
            })?;

        let frontends = open_map(&mut ebpf, MAP_FRONTENDS)?;
        let backends = open_map(&mut ebpf, MAP_BACKENDS)?;
        let vip_addrs = open_map(&mut ebpf, MAP_VIP_ADDRS)?;
        let backend_addrs = open_map(&mut ebpf, MAP_BACKEND_ADDRS)?;
        let snat_addrs = open_map(&mut ebpf, MAP_SNAT_ADDRS)?;
        let snat_ports = open_map(&mut ebpf, MAP_SNAT_PORTS)?;
        let xsks = open_map(&mut ebpf, MAP_XSKS)?;
        let stats = open_map(&mut ebpf, MAP_STATS)?;
        let mut if_slots: HashMap<MapData, u32, u32> = open_map(&mut ebpf, MAP_IF_SLOTS)?;

        // Slots first, so the first steered packet finds its socket row.
        for (slot, (ifname, ifindex)) in ifaces.iter().enumerate() {
            let slot = slot as u32;
            if_slots
                .insert(ifindex, slot, 0)
                .map_err(|source| SteerError::SetSlot {
                    ifname: ifname.clone(),
                    ifindex: *ifindex,
                    slot,
                    source: Box::new(source),
                })?;
        }

        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(SteerError::Missing {
                what: "program",
                name: PROGRAM,
            })?
            .try_into()
            .map_err(|source| SteerError::LoadProgram {
                source: Box::new(source),
            })?;
        prog.load().map_err(|source| SteerError::LoadProgram {
            source: Box::new(source),
        })?;
        let prog_id = prog.info().map(|i| i.id()).unwrap_or(0);

        let mut attached: Vec<Attached> = Vec::with_capacity(ifaces.len());
        for (ifname, ifindex) in ifaces {
            let links_before = xdp_links_of(prog_id);
            let (id, mode) = match prog.attach_to_if_index(*ifindex, XdpMode::Driver) {
                Ok(id) => (id, AttachMode::Driver),
                Err(driver) => {
                    tracing::debug!(ifname, ifindex, error = %driver, "XDP driver mode refused; trying generic mode");
                    match prog.attach_to_if_index(*ifindex, XdpMode::Skb) {
                        Ok(id) => (id, AttachMode::Generic),
                        Err(source) => {
                            return Err(SteerError::Attach {
                                ifname: ifname.clone(),
                                ifindex: *ifindex,
                                driver: driver.to_string(),
                                source: Box::new(source),
                            })
                        }
                    }
                }
            };
            let link = prog.take_link(id).map_err(|source| SteerError::Attach {
                ifname: ifname.clone(),
                ifindex: *ifindex,
                driver: String::new(),
                source: Box::new(source),
            })?;
            let bpf_link = xdp_links_of(prog_id) > links_before;
            tracing::info!(
                ifname,
                ifindex,
                ?mode,
                bpf_link,
                "XDP steering program attached"
            );
            if !bpf_link {
                tracing::warn!(
                    ifname,
                    ifindex,
                    "XDP attached through netlink (no bpf_link on this kernel): it stays attached if the process dies without detaching"
                );
            }
            attached.push(Attached {
                ifname: ifname.clone(),
                ifindex: *ifindex,
                mode,
                bpf_link,
                link,
            });
        }

        Ok(Self {
            modes: attached.iter().map(|a| a.mode).collect(),
            attached,
            frontends,
            backends,
            vip_addrs,
            backend_addrs,
            snat_addrs,
            snat_ports,
            xsks,
            stats,
            _if_slots: if_slots,
            mirror: Keys::default(),
            tracker: Tracker::default(),
            snat_mirror: Set::default(),
            snat_range: None,
            node_addrs: BTreeSet::new(),
            lingering: BTreeSet::new(),
            slots,
            ebpf,
        })
    }

    /// The mode each interface got, in the order given to [`Steering::load`].
    #[must_use]
    pub fn attach_modes(&self) -> &[AttachMode] {
        &self.modes
    }

    /// True when every attachment is a bpf_link, so the kernel detaches the
    /// program if this process dies without calling [`Steering::detach`].
    #[must_use]
    pub fn detaches_on_exit(&self) -> bool {
        self.attached.iter().all(|a| a.bpf_link)
    }

    /// Puts an AF_XDP socket at (slot, queue) in `xsks`: frames the program
    /// steers from interface `slot`'s rx queue `queue` go to it. The socket
    /// must be bound to that interface and queue. The map holds its own
    /// reference: closing `fd` later removes the entry in the kernel.
    ///
    /// # Errors
    /// Slot or queue out of range, or the kernel refuses the fd (not an
    /// AF_XDP socket, not bound).
    pub fn register_socket(&mut self, slot: u32, queue: u32, fd: RawFd) -> Result<(), SteerError> {
        let index = self.socket_index(slot, queue)?;
        self.xsks
            .set(index, fd, 0)
            .map_err(|source| SteerError::RegisterSocket {
                slot,
                queue,
                fd,
                source: Box::new(source),
            })
    }

    /// Removes the socket at (slot, queue), if any.
    ///
    /// # Errors
    /// Slot or queue out of range, or the kernel refuses the delete.
    pub fn unregister_socket(&mut self, slot: u32, queue: u32) -> Result<(), SteerError> {
        let index = self.socket_index(slot, queue)?;
        match self.xsks.unset(index) {
            Err(e) if is_enoent(&e) => Ok(()),
            r => r.map_err(|source| SteerError::RegisterSocket {
                slot,
                queue,
                fd: -1,
                source: Box::new(source),
            }),
        }
    }

    fn socket_index(&self, slot: u32, queue: u32) -> Result<u32, SteerError> {
        if slot >= self.slots || queue >= MAX_QUEUES {
            return Err(SteerError::SocketOutOfRange {
                slot,
                queue,
                slots: self.slots,
            });
        }
        Ok(slot * MAX_QUEUES + queue)
    }

    /// Sets the node's addresses (every interface's,
    /// [`crate::io::node_addrs::NodeAddrSet`]): node ports are steered on
    /// those the table selects, from the next [`Steering::sync`] on. Call
    /// `sync` again when this says they changed. The unspecified address is
    /// never taken.
    pub fn set_node_addrs(&mut self, addrs: &[Addr16]) -> bool {
        let want: BTreeSet<Addr16> = addrs
            .iter()
            .filter(|a| !ip_from16(**a).is_unspecified())
            .copied()
            .collect();
        if want == self.node_addrs {
            return false;
        }
        self.node_addrs = want;
        true
    }

    /// Which (address, port, protocol) are backends of `table`, to tell the
    /// backends that left it (before `table` is synced: see
    /// [`Steering::set_lingering`]). After a successful sync it costs the
    /// frontends that changed since, not the table.
    #[must_use]
    pub fn table_backends(&self, table: &Table) -> TableBackends<'_> {
        self.tracker.table_backends(table)
    }

    /// Sets the backends (address, port, protocol) that left the table but
    /// still have TCP connections, which keep them until they close (see
    /// `docs/semantics.md`, "Draining"): their replies stay steered, from
    /// the next [`Steering::sync`] on. True when they changed (call `sync`).
    pub fn set_lingering(&mut self, keys: BTreeSet<SteerKey>) -> bool {
        if keys == self.lingering {
            return false;
        }
        self.lingering = keys;
        true
    }

    /// Makes the lookup maps equal to what `table` needs on this node (its
    /// node ports on the addresses of [`Steering::set_node_addrs`], and the
    /// backends of [`Steering::set_lingering`]): inserts the new keys of all
    /// four maps first, then deletes the stale ones, so a key that stays is
    /// never missing in between.
    ///
    /// Per frontend: each wanted key is counted (one per frontend or
    /// lingering backend that needs it). When `table` differs from the last
    /// synced one only in some frontends' blocks (tables share the blocks
    /// of unchanged frontends: [`Table::apply_delta`],
    /// [`Table::adopt_unchanged`]), only those frontends' keys are counted
    /// out and in, and only keys whose count crosses zero are written: a
    /// change costs its frontends, not the table. The whole table is
    /// counted again, and every key compared with what the maps hold, on
    /// the first sync, after a failed one, and when the node-port addresses
    /// changed ([`SyncStats::scope`] says which, and why). A call that fails
    /// part-way leaves the mirror matching the kernel, and the next call
    /// finishes the job.
    ///
    /// # Errors
    /// A map refuses an insert (full: raise [`SteerConfig`]) or a delete.
    pub fn sync(&mut self, table: &Table) -> Result<SyncStats, SteerError> {
        let (update, basis) = self
            .tracker
            .update(table, &self.node_addrs, &self.lingering);
        let scope = update.scope();
        let diff = self.tracker.diff(&self.mirror, update);
        let (added, removed) = (diff.add.len(), diff.remove.len());
        let backend_addrs_changed =
            !diff.add.backend_addrs.is_empty() || !diff.remove.backend_addrs.is_empty();
        if let Err(e) = self.write(&diff) {
            self.tracker.failed();
            return Err(e);
        }
        self.tracker.commit(basis);
        Ok(SyncStats {
            frontends: self.mirror.frontends.len(),
            node_port_keys: self.tracker.wanted.node_ports.len(),
            backends: self.mirror.backends.len(),
            added,
            removed,
            scope,
            backend_addrs_changed,
        })
    }

    /// The backend addresses the maps steer replies from: every backend
    /// address of the table last synced, and those of the backends kept for
    /// their connections. Kept up to date per entry by [`Steering::sync`].
    pub fn backend_addrs(&self) -> impl Iterator<Item = Addr16> + '_ {
        self.mirror.backend_addrs.iter().copied()
    }

    /// Writes `diff` to the maps, inserts first, keeping the mirror equal
    /// to what the kernel holds at every step.
    fn write(&mut self, diff: &Diff) -> Result<(), SteerError> {
        let (a, r) = (&diff.add, &diff.remove);
        for k in &a.frontends {
            insert(&mut self.frontends, MAP_FRONTENDS, &k.to_bytes(), || {
                k.to_string()
            })?;
            self.mirror.frontends.insert(*k);
        }
        for k in &a.backends {
            insert(&mut self.backends, MAP_BACKENDS, &k.to_bytes(), || {
                k.to_string()
            })?;
            self.mirror.backends.insert(*k);
        }
        for x in &a.vip_addrs {
            insert(&mut self.vip_addrs, MAP_VIP_ADDRS, x, || addr_str(x))?;
            self.mirror.vip_addrs.insert(*x);
        }
        for x in &a.backend_addrs {
            insert(&mut self.backend_addrs, MAP_BACKEND_ADDRS, x, || {
                addr_str(x)
            })?;
            self.mirror.backend_addrs.insert(*x);
        }
        for k in &r.frontends {
            remove(&mut self.frontends, MAP_FRONTENDS, &k.to_bytes(), || {
                k.to_string()
            })?;
            self.mirror.frontends.remove(k);
        }
        for k in &r.backends {
            remove(&mut self.backends, MAP_BACKENDS, &k.to_bytes(), || {
                k.to_string()
            })?;
            self.mirror.backends.remove(k);
        }
        for x in &r.vip_addrs {
            remove(&mut self.vip_addrs, MAP_VIP_ADDRS, x, || addr_str(x))?;
            self.mirror.vip_addrs.remove(x);
        }
        for x in &r.backend_addrs {
            remove(&mut self.backend_addrs, MAP_BACKEND_ADDRS, x, || {
                addr_str(x)
            })?;
            self.mirror.backend_addrs.remove(x);
        }
        Ok(())
    }

    /// Makes `snat_addrs` hold exactly `addrs` (the gateway's source-NAT
    /// addresses: the `--snat-address` overrides, or every address of the
    /// served interfaces) and `snat_ports` the range `ports` (the whole
    /// range, every worker's share). A reply from a backend to one of these
    /// addresses is then steered only when its destination port is in the
    /// range; to other addresses, as before. The range is written first, then
    /// new addresses inserted, then stale ones deleted; only what changed
    /// since the last successful call is written (a diff against a mirror,
    /// as [`Steering::sync`]), so calling it on every refresh is cheap.
    ///
    /// # Errors
    /// A map refuses a write (`snat_addrs` holds [`MAX_SNAT_STEER_ADDRS`]).
    pub fn set_snat(
        &mut self,
        addrs: &[Addr16],
        ports: Option<PortRange>,
    ) -> Result<SnatSync, SteerError> {
        let mut out = SnatSync::default();
        if ports != self.snat_range {
            let value = ports.map_or([0, 0], |r| [r.lo(), r.hi()]);
            self.snat_ports
                .set(0, value, 0)
                .map_err(|source| SteerError::MapInsert {
                    map: MAP_SNAT_PORTS,
                    key: ports.map_or_else(|| "no range".to_owned(), |r| r.to_string()),
                    source: Box::new(source),
                })?;
            self.snat_range = ports;
            out.ports_changed = true;
        }
        let want: Set<Addr16> = addrs.iter().copied().collect();
        for a in &want {
            if !self.snat_mirror.contains(a) {
                insert(&mut self.snat_addrs, MAP_SNAT_ADDRS, a, || addr_str(a))?;
                self.snat_mirror.insert(*a);
                out.added += 1;
            }
        }
        let stale: Vec<Addr16> = self.snat_mirror.difference(&want).copied().collect();
        for a in stale {
            remove(&mut self.snat_addrs, MAP_SNAT_ADDRS, &a, || addr_str(&a))?;
            self.snat_mirror.remove(&a);
            out.removed += 1;
        }
        out.addrs = self.snat_mirror.len();
        Ok(out)
    }

    /// The program's counters, summed over CPUs.
    ///
    /// # Errors
    /// The kernel refuses the read.
    pub fn stats(&self) -> Result<SteerStats, SteerError> {
        let read = |index: u32| -> Result<u64, SteerError> {
            let values = self
                .stats
                .get(&index, 0)
                .map_err(|source| SteerError::ReadMap {
                    map: MAP_STATS,
                    source: Box::new(source),
                })?;
            Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(SteerStats {
            redirected: read(STAT_REDIRECTED)?,
            passed: read(STAT_PASSED)?,
            malformed: read(STAT_MALFORMED)?,
            no_socket: read(STAT_NO_SOCKET)?,
        })
    }

    /// The lookup maps as the kernel holds them (not the mirror), sorted:
    /// for tests and debugging. Walks every map, so not for the hot path.
    ///
    /// # Errors
    /// The kernel refuses a read.
    pub fn dump(&self) -> Result<MapDump, SteerError> {
        fn keys<K: aya::Pod + Ord>(
            map: &HashMap<MapData, K, u8>,
            name: &'static str,
        ) -> Result<Vec<K>, SteerError> {
            let set: Result<BTreeSet<K>, MapError> = map.keys().collect();
            set.map(|s| s.into_iter().collect())
                .map_err(|source| SteerError::ReadMap {
                    map: name,
                    source: Box::new(source),
                })
        }
        let parse = |v: Vec<[u8; KEY_LEN]>| -> Vec<SteerKey> {
            let mut k: Vec<SteerKey> = v.iter().map(SteerKey::from_bytes).collect();
            k.sort_unstable();
            k
        };
        Ok(MapDump {
            frontends: parse(keys(&self.frontends, MAP_FRONTENDS)?),
            backends: parse(keys(&self.backends, MAP_BACKENDS)?),
            vip_addrs: keys(&self.vip_addrs, MAP_VIP_ADDRS)?,
            backend_addrs: keys(&self.backend_addrs, MAP_BACKEND_ADDRS)?,
            snat_addrs: keys(&self.snat_addrs, MAP_SNAT_ADDRS)?,
            snat_ports: self
                .snat_ports
                .get(&0, 0)
                .map_err(|source| SteerError::ReadMap {
                    map: MAP_SNAT_PORTS,
                    source: Box::new(source),
                })
                .map(|[lo, hi]| PortRange::new(lo, hi))?,
        })
    }

    /// Detaches the program from every interface (also done on drop); each
    /// interface is left as it was found. All are tried; the first error is
    /// returned.
    ///
    /// # Errors
    /// The kernel refuses a detach.
    pub fn detach(mut self) -> Result<(), SteerError> {
        let mut first = None;
        for a in self.attached.drain(..) {
            let Attached {
                ifname,
                ifindex,
                mode,
                link,
                ..
            } = a;
            match link.detach() {
                Ok(()) => tracing::info!(ifname, ifindex, ?mode, "XDP steering program detached"),
                Err(source) => {
                    first.get_or_insert(SteerError::Detach {
                        ifname,
                        ifindex,
                        source: Box::new(source),
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Runs the program on `frame` with `BPF_PROG_TEST_RUN` (as if received
    /// on `lo`, which has no slot) and says which counter it bumped: for
    /// tests and diagnostics. Exact only while no live traffic runs the
    /// program (load it with no interface to be sure).
    ///
    /// # Errors
    /// The kernel refuses the run (e.g. a frame shorter than 14 bytes) or a
    /// counter read.
    pub fn classify(&self, frame: &[u8]) -> Result<Classified, SteerError> {
        let prog: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .ok_or(SteerError::Missing {
                what: "program",
                name: PROGRAM,
            })?
            .try_into()
            .map_err(|source| SteerError::TestRun {
                len: frame.len(),
                source: Box::new(source),
            })?;
        let before = self.stats()?;
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        })
        .map_err(|source| SteerError::TestRun {
            len: frame.len(),
            source: Box::new(source),
        })?;
        let after = self.stats()?;
        Ok(if after.malformed > before.malformed {
            Classified::Malformed
        } else if after.redirected > before.redirected || after.no_socket > before.no_socket {
            Classified::Steered
        } else {
            Classified::Passed
        })
    }

    /// The aya object (program and any map not taken by this loader).
    #[must_use]
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        for a in self.attached.drain(..) {
            if let Err(e) = a.link.detach() {
                tracing::warn!(ifname = a.ifname, ifindex = a.ifindex, error = %e, "XDP detach on drop failed");
            }
        }
    }
}

fn is_enoent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

fn insert<K: aya::Pod>(
    map: &mut HashMap<MapData, K, u8>,
    name: &'static str,
    key: &K,
    show: impl FnOnce() -> String,
) -> Result<(), SteerError> {
    map.insert(key, 1u8, 0)
        .map_err(|source| SteerError::MapInsert {
            map: name,
            key: show(),
            source: Box::new(source),
        })
}

fn remove<K: aya::Pod>(
    map: &mut HashMap<MapData, K, u8>,
    name: &'static str,
    key: &K,
    show: impl FnOnce() -> String,
) -> Result<(), SteerError> {
    match map.remove(key) {
        Err(e) if is_enoent(&e) => Ok(()), // already gone: the goal is reached
        r => r.map_err(|source| SteerError::MapRemove {
            map: name,
            key: show(),
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::IpAddr;

    use super::*;
    use crate::flow::{addr16, Proto};
    use crate::test_builder::table::{BackendSpec, ServiceSpec, TableBuild, TableSpec};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn key_bytes_round_trip_and_layout() {
        let k = SteerKey {
            addr: addr16(ip("198.18.211.10")),
            port: 0x1f90,
            proto: 17,
        };
        let b = k.to_bytes();
        assert_eq!(&b[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&b[12..16], &[198, 18, 211, 10]);
        assert_eq!(&b[16..18], &[0x1f, 0x90], "port in network order");
        assert_eq!(b[18], 17);
        assert_eq!(b[19], 0);
        assert_eq!(SteerKey::from_bytes(&b), k);
        assert_eq!(k.to_string(), "198.18.211.10:8080/udp");
    }

    #[test]
    fn wanted_keys_cover_frontends_without_backends_and_every_backend() {
        let table = Table::build(
            1,
            7,
            &[
                ServiceSpec::cluster_ip(
                    ip("198.18.211.10"),
                    80,
                    Proto::Tcp,
                    vec![
                        BackendSpec::ready(ip("198.18.212.1"), 8080),
                        BackendSpec {
                            weight: 0,
                            ..BackendSpec::ready(ip("198.18.212.2"), 8080)
                        },
                    ],
                ),
                ServiceSpec::cluster_ip(ip("198.18.211.10"), 53, Proto::Udp, vec![]),
                ServiceSpec::cluster_ip(
                    ip("2001:db8::10"),
                    443,
                    Proto::Tcp,
                    vec![BackendSpec::ready(ip("2001:db8::1:1"), 8443)],
                ),
            ],
        )
        .unwrap();
        let (k, node_port_keys) = Keys::wanted(&table, &BTreeSet::new());
        assert_eq!(node_port_keys, 0);
        assert_eq!(k.frontends.len(), 3);
        assert!(k.frontends.contains(&SteerKey {
            addr: addr16(ip("198.18.211.10")),
            port: 53,
            proto: 17
        }));
        assert_eq!(k.backends.len(), 3, "draining backends steer their replies");
        assert!(k.backends.contains(&SteerKey {
            addr: addr16(ip("198.18.212.2")),
            port: 8080,
            proto: 6
        }));
        assert_eq!(k.vip_addrs.len(), 2);
        assert_eq!(k.backend_addrs.len(), 3);
        assert!(Keys::wanted(&Table::empty(0), &BTreeSet::new())
            .0
            .frontends
            .is_empty());
    }

    fn net(s: &str) -> ipnet::IpNet {
        s.parse().unwrap()
    }

    fn node_port_table(node_port_addresses: &[&str]) -> Table {
        let be = vec![BackendSpec::ready(ip("198.18.212.1"), 8080)];
        let be6 = vec![BackendSpec::ready(ip("2001:2::1:1"), 8080)];
        let spec = TableSpec {
            services: vec![
                ServiceSpec::cluster_ip(ip("198.18.211.10"), 80, Proto::Tcp, be.clone()),
                ServiceSpec::cluster_ip(ip("0.0.0.0"), 30080, Proto::Tcp, be.clone())
                    .with_kind(FrontendKind::NodePort, ip("0.0.0.0")),
                ServiceSpec::cluster_ip(ip("0.0.0.0"), 30053, Proto::Udp, vec![])
                    .with_kind(FrontendKind::NodePort, ip("0.0.0.0")),
                ServiceSpec::cluster_ip(ip("::"), 30080, Proto::Tcp, be6)
                    .with_kind(FrontendKind::NodePort, ip("::")),
                ServiceSpec::cluster_ip(ip("198.18.213.1"), 443, Proto::Tcp, be)
                    .with_kind(FrontendKind::LoadBalancer, ip("198.18.213.1")),
            ],
            nodes: vec![],
            node_port_addresses: node_port_addresses.iter().map(|n| net(n)).collect(),
            policy: Default::default(),
        };
        Table::build_full(
            1,
            7,
            &spec,
            crate::test_builder::maglev::DEFAULT_MAX_RING_SIZE,
        )
        .unwrap()
    }

    #[test]
    fn node_ports_are_steered_on_the_selected_node_addresses_only() {
        let node: BTreeSet<Addr16> = ["198.18.0.10", "198.18.1.10", "2001:2::10", "fe80::1"]
            .iter()
            .map(|a| addr16(ip(a)))
            .collect();
        let key = |a: &str, port, proto| SteerKey {
            addr: addr16(ip(a)),
            port,
            proto,
        };
        // Every node address (the default --nodeport-addresses).
        let (k, n) = Keys::wanted(&node_port_table(&["0.0.0.0/0", "::/0"]), &node);
        assert_eq!(
            n,
            2 * 2 + 2,
            "two IPv4 node ports on two addresses, one IPv6 on two"
        );
        assert_eq!(k.frontends.len(), n + 2);
        for want in [
            key("198.18.0.10", 30080, 6),
            key("198.18.1.10", 30080, 6),
            key("198.18.0.10", 30053, 17),
            key("198.18.1.10", 30053, 17),
            key("2001:2::10", 30080, 6),
            key("fe80::1", 30080, 6),
            key("198.18.211.10", 80, 6),
            key("198.18.213.1", 443, 6),
        ] {
            assert!(k.frontends.contains(&want), "{want}");
        }
        // Never the unspecified address, and node addresses are no VIPs.
        assert!(k
            .frontends
            .iter()
            .all(|f| !ip_from16(f.addr).is_unspecified()));
        let mut vips: Vec<IpAddr> = k.vip_addrs.iter().map(|a| ip_from16(*a)).collect();
        vips.sort_unstable();
        assert_eq!(vips, [ip("198.18.211.10"), ip("198.18.213.1")]);
        // Node-port backends steer their replies as any.
        assert!(k.backends.contains(&key("2001:2::1:1", 8080, 6)));

        // --nodeport-addresses 198.18.1.0/24: one IPv4 address, no IPv6.
        let (k, n) = Keys::wanted(&node_port_table(&["198.18.1.0/24"]), &node);
        assert_eq!(n, 2);
        assert!(k.frontends.contains(&key("198.18.1.10", 30080, 6)));
        assert!(!k.frontends.contains(&key("198.18.0.10", 30080, 6)));
        assert!(!k.frontends.contains(&key("2001:2::10", 30080, 6)));

        // No node address known: no node-port key.
        let (k, n) = Keys::wanted(&node_port_table(&["0.0.0.0/0", "::/0"]), &BTreeSet::new());
        assert_eq!((n, k.frontends.len()), (0, 2));
    }

    #[test]
    fn steering_object_is_embedded() {
        // An ELF object for the bpf target (EM_BPF = 247).
        assert_eq!(&STEER_OBJ[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([STEER_OBJ[18], STEER_OBJ[19]]), 247);
    }

    /// The incremental counts against the whole recompute, over random
    /// sequences of tables.
    mod incremental {
        use std::net::IpAddr;

        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestCaseError, TestRunner};

        use super::super::*;
        use crate::flow::{addr16, Proto};
        use crate::test_builder::maglev::DEFAULT_MAX_RING_SIZE;
        use crate::test_builder::table::{
            BackendSpec, Builder, RingSizes, ServiceSpec, TableBuild, TableSpec,
        };

        const SEED: u64 = 7;
        const MAX_RING: u32 = 1021;

        fn ip(s: &str) -> IpAddr {
            s.parse().unwrap()
        }

        /// Frontend addresses: two VIPs and a node's address (as an
        /// external IP, so that a node-port key can also be another
        /// frontend's) per family, and the node-port wildcards.
        const FRONT_ADDRS: [&str; 8] = [
            "198.18.211.1",
            "198.18.211.2",
            "198.18.0.10",
            "0.0.0.0",
            "2001:2::a:1",
            "2001:2::a:2",
            "2001:2::10",
            "::",
        ];
        const NODE_ADDRS: [&[&str]; 4] = [
            &[],
            &["198.18.0.10"],
            &["198.18.0.10", "198.18.1.10", "2001:2::10"],
            &["2001:2::10", "fe80::1", "198.18.1.10"],
        ];
        const NODE_PORT_ADDRS: [&[&str]; 4] = [
            &["0.0.0.0/0", "::/0"],
            &[],
            &["198.18.1.0/24"],
            &["::/0", "198.18.0.0/24"],
        ];

        /// Backend `i` of a family: 5 addresses × 2 ports, weight 0 from 10.
        fn backend(v4: bool, i: u8) -> BackendSpec {
            let n = i % 5 + 1;
            let addr = if v4 {
                ip(&format!("198.18.212.{n}"))
            } else {
                ip(&format!("2001:2::b:{n}"))
            };
            let port = [8080, 8443][usize::from(i / 5 % 2)];
            BackendSpec {
                weight: u32::from(i < 10),
                ..BackendSpec::ready(addr, port)
            }
        }

        fn backends(v4: bool, list: &[u8]) -> Vec<BackendSpec> {
            let mut out: Vec<BackendSpec> = Vec::new();
            for b in list.iter().map(|i| backend(v4, *i)) {
                if !out.iter().any(|x| x.addr == b.addr && x.port == b.port) {
                    out.push(b);
                }
            }
            out
        }

        #[derive(Debug, Clone)]
        enum Op {
            Add {
                addr: u8,
                port: u8,
                udp: bool,
                kind: u8,
                backends: Vec<u8>,
            },
            Remove(u8),
            /// One endpoint of one Service moves: what most changes are.
            Move {
                svc: u8,
                which: u8,
                to: u8,
            },
            SetBackends {
                svc: u8,
                backends: Vec<u8>,
            },
            /// The Services in another order (a full rebuild may do that).
            Rotate(u8),
            NodePortAddrs(u8),
            NodeAddrs(u8),
            /// Backends kept for their TCP connections: (v4, backend, udp).
            Linger(Vec<(bool, u8, bool)>),
        }

        /// How the next table is made from the spec and the last table.
        #[derive(Debug, Clone, Copy)]
        enum Make {
            /// Control's builder: unchanged frontends share their block.
            Builder,
            /// A full snapshot: built afresh, unchanged blocks adopted.
            Adopt,
            /// Built afresh: no block shared.
            Fresh,
            /// A delta applied to the last table (added frontends last).
            Delta,
            /// The last table again (only node addresses or lingering
            /// backends may change).
            Same,
        }

        fn op() -> impl Strategy<Value = Op> {
            let list = proptest::collection::vec(0u8..15, 0..5);
            prop_oneof![
                3 => (0u8..8, 0u8..3, any::<bool>(), 0u8..3, list.clone()).prop_map(
                    |(addr, port, udp, kind, backends)| Op::Add {
                        addr,
                        port,
                        udp,
                        kind,
                        backends
                    }
                ),
                2 => any::<u8>().prop_map(Op::Remove),
                4 => (any::<u8>(), any::<u8>(), 0u8..15).prop_map(|(svc, which, to)| Op::Move {
                    svc,
                    which,
                    to
                }),
                2 => (any::<u8>(), list).prop_map(|(svc, backends)| Op::SetBackends { svc, backends }),
                1 => any::<u8>().prop_map(Op::Rotate),
                1 => (0u8..4).prop_map(Op::NodePortAddrs),
                1 => (0u8..4).prop_map(Op::NodeAddrs),
                2 => proptest::collection::vec((any::<bool>(), 0u8..10, any::<bool>()), 0..3)
                    .prop_map(Op::Linger),
            ]
        }

        fn make() -> impl Strategy<Value = Make> {
            prop_oneof![
                3 => Just(Make::Builder),
                1 => Just(Make::Adopt),
                1 => Just(Make::Fresh),
                3 => Just(Make::Delta),
                1 => Just(Make::Same),
            ]
        }

        fn steps() -> impl Strategy<Value = Vec<(Vec<Op>, Make)>> {
            proptest::collection::vec((proptest::collection::vec(op(), 1..4), make()), 1..14)
        }

        /// The spec, node addresses and lingering backends as the ops leave them.
        #[derive(Default)]
        struct World {
            services: Vec<ServiceSpec>,
            node_port_addrs: Vec<ipnet::IpNet>,
            node_addrs: BTreeSet<Addr16>,
            lingering: BTreeSet<SteerKey>,
        }

        impl World {
            fn apply(&mut self, op: &Op) {
                let n = self.services.len();
                match op {
                    Op::Add {
                        addr,
                        port,
                        udp,
                        kind,
                        backends: list,
                    } => {
                        let a = ip(FRONT_ADDRS[usize::from(*addr)]);
                        let kind = if a.is_unspecified() {
                            FrontendKind::NodePort
                        } else {
                            [
                                FrontendKind::ClusterIp,
                                FrontendKind::ExternalIp,
                                FrontendKind::LoadBalancer,
                            ][usize::from(*kind)]
                        };
                        let port = [80, 443, 30080][usize::from(*port)];
                        let proto = if *udp { Proto::Udp } else { Proto::Tcp };
                        if self
                            .services
                            .iter()
                            .any(|s| s.addr == a && s.port == port && s.proto == proto)
                        {
                            return;
                        }
                        let be = backends(a.is_ipv4(), list);
                        self.services
                            .push(ServiceSpec::cluster_ip(a, port, proto, be).with_kind(kind, a));
                    }
                    Op::Remove(i) if n > 0 => {
                        self.services.remove(usize::from(*i) % n);
                    }
                    Op::Move { svc, which, to } if n > 0 => {
                        let s = &mut self.services[usize::from(*svc) % n];
                        let b = backend(s.addr.is_ipv4(), *to);
                        if s.backends
                            .iter()
                            .any(|x| x.addr == b.addr && x.port == b.port)
                        {
                            return;
                        }
                        if s.backends.is_empty() {
                            s.backends.push(b);
                        } else {
                            let w = usize::from(*which) % s.backends.len();
                            s.backends[w] = b;
                        }
                    }
                    Op::SetBackends {
                        svc,
                        backends: list,
                    } if n > 0 => {
                        let s = &mut self.services[usize::from(*svc) % n];
                        s.backends = backends(s.addr.is_ipv4(), list);
                    }
                    Op::Rotate(k) if n > 0 => self.services.rotate_left(usize::from(*k) % n),
                    Op::NodePortAddrs(c) => {
                        self.node_port_addrs = NODE_PORT_ADDRS[usize::from(*c)]
                            .iter()
                            .map(|s| s.parse().unwrap())
                            .collect();
                    }
                    Op::NodeAddrs(c) => {
                        self.node_addrs = NODE_ADDRS[usize::from(*c)]
                            .iter()
                            .map(|s| addr16(ip(s)))
                            .collect();
                    }
                    Op::Linger(list) => {
                        self.lingering = list
                            .iter()
                            .map(|(v4, i, udp)| {
                                let b = backend(*v4, *i);
                                SteerKey {
                                    addr: addr16(b.addr),
                                    port: b.port,
                                    proto: if *udp { 17 } else { 6 },
                                }
                            })
                            .collect();
                    }
                    _ => {}
                }
            }

            fn spec(&self) -> TableSpec {
                TableSpec {
                    services: self.services.clone(),
                    nodes: vec![],
                    node_port_addresses: self.node_port_addrs.clone(),
                    policy: Default::default(),
                }
            }
        }

        /// What the maps must hold: the whole recompute, lingering added.
        fn reference(table: &Table, w: &World) -> (Keys, usize) {
            let (mut k, n) = Keys::wanted(table, &w.node_addrs);
            for l in &w.lingering {
                k.backends.insert(*l);
                k.backend_addrs.insert(l.addr);
            }
            (k, n)
        }

        /// Applies `d` to a mirror, as [`Steering::write`] does to the maps.
        fn apply(m: &mut Keys, d: &Diff) {
            m.frontends.extend(d.add.frontends.iter().copied());
            m.backends.extend(d.add.backends.iter().copied());
            m.vip_addrs.extend(d.add.vip_addrs.iter().copied());
            m.backend_addrs.extend(d.add.backend_addrs.iter().copied());
            for k in &d.remove.frontends {
                m.frontends.remove(k);
            }
            for k in &d.remove.backends {
                m.backends.remove(k);
            }
            for a in &d.remove.vip_addrs {
                m.vip_addrs.remove(a);
            }
            for a in &d.remove.backend_addrs {
                m.backend_addrs.remove(a);
            }
        }

        /// Keys in `a` and not in `b`, over the four maps.
        fn missing(a: &Keys, b: &Keys) -> usize {
            a.frontends.difference(&b.frontends).count()
                + a.backends.difference(&b.backends).count()
                + a.vip_addrs.difference(&b.vip_addrs).count()
                + a.backend_addrs.difference(&b.backend_addrs).count()
        }

        /// What a run went through.
        #[derive(Debug, Default, Clone, Copy)]
        struct Ran {
            syncs: usize,
            /// Syncs per frontend that changed some frontend.
            per_frontend: usize,
            /// Of them, keys written.
            written: usize,
            /// Specs the table refused.
            refused: usize,
            /// Tables whose backends were told from the counts.
            counted: usize,
        }

        /// Runs `steps`, syncing a tracker and a mirror after each, and
        /// checks them against the whole recompute.
        fn run(steps: &[(Vec<Op>, Make)], mutation: Mutation) -> Result<Ran, String> {
            let mut w = World::default();
            let mut builder = Builder::new(SEED, MAX_RING, RingSizes::default());
            let mut tracker = Tracker {
                mutation,
                ..Tracker::default()
            };
            let mut mirror = Keys::default();
            let mut table = Table::empty(0);
            let mut ran = Ran::default();
            for (generation, (ops, how)) in (1u64..).zip(steps) {
                for o in ops {
                    w.apply(o);
                }
                let spec = w.spec();
                let next = match how {
                    Make::Builder => builder.build(generation, &spec),
                    Make::Adopt => {
                        Table::build_full(generation, SEED, &spec, MAX_RING).map(|mut t| {
                            t.adopt_unchanged(&table);
                            t
                        })
                    }
                    Make::Fresh => Table::build_full(generation, SEED, &spec, MAX_RING),
                    Make::Delta => builder.build(generation, &spec).map(|full| {
                        full.delta_from(&table)
                            .and_then(|d| table.apply_delta(&d).ok())
                            .unwrap_or(full)
                    }),
                    Make::Same => Ok(table.clone()),
                };
                // A spec the table refuses (none expected) keeps the last table.
                match next {
                    Ok(t) => table = t,
                    Err(_) => ran.refused += 1,
                }
                // Before the sync, as the gateway asks it: the new table's
                // backends, from the last one's counts.
                let (want, _) = Keys::wanted(&table, &w.node_addrs);
                let tb = tracker.table_backends(&table);
                ran.counted += usize::from(tb.counted());
                for v4 in [true, false] {
                    for i in 0..10 {
                        let b = backend(v4, i);
                        for proto in [6, 17] {
                            let key = SteerKey {
                                addr: addr16(b.addr),
                                port: b.port,
                                proto,
                            };
                            if tb.contains(&key) != want.backends.contains(&key) {
                                return Err(format!(
                                    "step {generation} ({how:?}): table_backends wrong about {key}"
                                ));
                            }
                        }
                    }
                }
                let (update, basis) = tracker.update(&table, &w.node_addrs, &w.lingering);
                ran.syncs += 1;
                let per_frontend =
                    matches!(update, Update::Frontends { changed, .. } if changed > 0);
                let scope = update.scope();
                let diff = tracker.diff(&mirror, update);
                let before = mirror.clone();
                apply(&mut mirror, &diff);
                if per_frontend {
                    ran.per_frontend += 1;
                    ran.written += diff.add.len() + diff.remove.len();
                }
                tracker.commit(basis);

                let (want, node_port_keys) = reference(&table, &w);
                if tracker.wanted.keys() != want {
                    return Err(format!(
                        "step {generation} ({how:?}, {scope:?}): counted keys differ from the whole recompute"
                    ));
                }
                if mirror != want {
                    return Err(format!(
                        "step {generation} ({how:?}, {scope:?}): maps differ from the whole recompute"
                    ));
                }
                if tracker.wanted.node_ports.len() != node_port_keys {
                    return Err(format!("step {generation}: node-port keys"));
                }
                if (diff.add.len(), diff.remove.len())
                    != (missing(&want, &before), missing(&before, &want))
                {
                    return Err(format!(
                        "step {generation} ({how:?}, {scope:?}): wrote {} and {}, more than what changed",
                        diff.add.len(),
                        diff.remove.len()
                    ));
                }
                let selected = selected_node_addrs(&table, &w.node_addrs);
                let recount = Wanted::build(&table, &selected, &w.lingering);
                if tracker.wanted != recount {
                    return Err(format!(
                        "step {generation} ({how:?}, {scope:?}): counts differ from a recount"
                    ));
                }
            }
            Ok(ran)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn incremental_keys_equal_the_whole_recompute(s in steps()) {
                run(&s, Mutation::None).map_err(TestCaseError::fail)?;
            }
        }

        /// The same property, with a fault planted in the tracker: it must
        /// find it.
        fn fails_with(mutation: Mutation) -> String {
            let mut runner = TestRunner::new(Config {
                cases: 512,
                failure_persistence: None,
                ..Config::default()
            });
            let r = runner.run(&steps(), |s| {
                run(&s, mutation).map(|_| ()).map_err(TestCaseError::fail)
            });
            match r {
                Err(e) => {
                    eprintln!("{mutation:?}: {e}");
                    e.to_string()
                }
                Ok(()) => panic!("{mutation:?}: the property test did not find the planted fault"),
            }
        }

        /// The sequences do reach the per-frontend path, and the table
        /// takes their specs.
        #[test]
        fn the_property_covers_per_frontend_syncs() {
            let mut runner = TestRunner::new(Config {
                cases: 256,
                failure_persistence: None,
                ..Config::default()
            });
            let total = std::cell::Cell::new(Ran::default());
            runner
                .run(&steps(), |s| {
                    let r = run(&s, Mutation::None).map_err(TestCaseError::fail)?;
                    let mut t = total.get();
                    t.syncs += r.syncs;
                    t.per_frontend += r.per_frontend;
                    t.written += r.written;
                    t.refused += r.refused;
                    t.counted += r.counted;
                    total.set(t);
                    Ok(())
                })
                .unwrap();
            let t = total.get();
            eprintln!("{t:?}");
            assert!(
                t.per_frontend * 3 >= t.syncs,
                "most syncs should be per frontend: {t:?}"
            );
            assert!(t.written > 0, "{t:?}");
            assert!(t.refused * 20 <= t.syncs, "{t:?}");
            assert!(t.counted * 2 >= t.syncs, "{t:?}");
        }

        #[test]
        fn the_property_finds_a_planted_fault() {
            let e = fails_with(Mutation::KeepRemoved);
            assert!(e.contains("differ"), "{e}");
            let e = fails_with(Mutation::SameKeySame);
            assert!(e.contains("differ"), "{e}");
        }

        #[test]
        fn one_moved_endpoint_is_one_frontend_and_two_keys() {
            let mut w = World::default();
            for i in 0..50u8 {
                w.services.push(ServiceSpec::cluster_ip(
                    ip(&format!("198.18.211.{i}")),
                    80,
                    Proto::Tcp,
                    vec![BackendSpec::ready(ip(&format!("198.18.212.{i}")), 8080)],
                ));
            }
            let mut builder = Builder::new(SEED, DEFAULT_MAX_RING_SIZE, RingSizes::default());
            let mut tracker = Tracker::default();
            let mut mirror = Keys::default();
            let mut node = BTreeSet::new();
            let mut sync = |tracker: &mut Tracker, t: &Table, node: &BTreeSet<Addr16>| {
                let (u, basis) = tracker.update(t, node, &BTreeSet::new());
                let scope = u.scope();
                let d = tracker.diff(&mirror, u);
                apply(&mut mirror, &d);
                tracker.commit(basis);
                (scope, d)
            };
            let t1 = builder.build(1, &w.spec()).unwrap();
            let (scope, d) = sync(&mut tracker, &t1, &node);
            assert_eq!(scope, SyncScope::Whole(WholeSync::First));
            assert_eq!((d.add.len(), d.remove.len()), (200, 0));

            // Service 7's endpoint moves to a new pod address.
            let mut w2 = w.spec();
            w2.services[7].backends = vec![BackendSpec::ready(ip("198.18.213.7"), 8080)];
            let t2 = builder.build(2, &w2).unwrap();
            let (scope, d) = sync(&mut tracker, &t2, &node);
            assert_eq!(scope, SyncScope::Frontends { changed: 1 });
            let key = |a: &str| SteerKey {
                addr: addr16(ip(a)),
                port: 8080,
                proto: 6,
            };
            assert_eq!(d.add.backends, [key("198.18.213.7")]);
            assert_eq!(d.add.backend_addrs, [addr16(ip("198.18.213.7"))]);
            assert_eq!(d.remove.backends, [key("198.18.212.7")]);
            assert_eq!(d.remove.backend_addrs, [addr16(ip("198.18.212.7"))]);
            assert_eq!((d.add.len(), d.remove.len()), (2, 2));

            // A Service added and one removed, as a delta: added last.
            let mut w3 = w2.clone();
            w3.services.remove(3);
            w3.services.push(ServiceSpec::cluster_ip(
                ip("198.18.211.200"),
                53,
                Proto::Udp,
                vec![],
            ));
            let full = builder.build(3, &w3).unwrap();
            let t3 = t2.apply_delta(&full.delta_from(&t2).unwrap()).unwrap();
            let (scope, d) = sync(&mut tracker, &t3, &node);
            assert_eq!(scope, SyncScope::Frontends { changed: 2 });
            assert_eq!((d.add.len(), d.remove.len()), (2, 4));

            // The node's addresses change, and the table's node ports are
            // served on them: whole.
            let mut w4 = w3.clone();
            w4.node_port_addresses = vec!["0.0.0.0/0".parse().unwrap()];
            w4.services.push(
                ServiceSpec::cluster_ip(ip("0.0.0.0"), 30080, Proto::Tcp, vec![])
                    .with_kind(FrontendKind::NodePort, ip("0.0.0.0")),
            );
            let t4 = builder.build(4, &w4).unwrap();
            let (scope, d) = sync(&mut tracker, &t4, &node);
            assert_eq!(scope, SyncScope::Frontends { changed: 1 });
            assert_eq!(
                (d.add.len(), d.remove.len()),
                (0, 0),
                "no node address known"
            );
            node.insert(addr16(ip("198.18.0.10")));
            let (scope, d) = sync(&mut tracker, &t4, &node);
            assert_eq!(scope, SyncScope::Whole(WholeSync::NodePortAddresses));
            assert_eq!(
                d.add.frontends,
                [SteerKey {
                    addr: addr16(ip("198.18.0.10")),
                    port: 30080,
                    proto: 6
                }]
            );
            assert_eq!(d.add.len() + d.remove.len(), 1);
        }

        #[test]
        fn a_failed_write_is_finished_by_a_whole_retry() {
            let be = |i: u8| vec![BackendSpec::ready(ip(&format!("198.18.212.{i}")), 8080)];
            let node = BTreeSet::new();
            let lingering = BTreeSet::new();
            let spec = |i: u8| TableSpec {
                services: vec![
                    ServiceSpec::cluster_ip(ip("198.18.211.1"), 80, Proto::Tcp, be(i)),
                    ServiceSpec::cluster_ip(ip("2001:2::a:1"), 80, Proto::Tcp, vec![]),
                ],
                ..TableSpec::default()
            };
            let mut builder = Builder::new(SEED, MAX_RING, RingSizes::default());
            let mut tracker = Tracker::default();
            let mut mirror = Keys::default();
            let t1 = builder.build(1, &spec(1)).unwrap();
            let (u, basis) = tracker.update(&t1, &node, &lingering);
            let d = tracker.diff(&mirror, u);
            apply(&mut mirror, &d);
            tracker.commit(basis);
            // The next write inserts its keys, then fails before deleting.
            let t2 = builder.build(2, &spec(2)).unwrap();
            let (u, _) = tracker.update(&t2, &node, &lingering);
            assert_eq!(u.scope(), SyncScope::Frontends { changed: 1 });
            let d = tracker.diff(&mirror, u);
            apply(
                &mut mirror,
                &Diff {
                    add: d.add,
                    remove: KeyLists::default(),
                },
            );
            tracker.failed();
            let (u, basis) = tracker.update(&t2, &node, &lingering);
            assert_eq!(u.scope(), SyncScope::Whole(WholeSync::Retry));
            let d = tracker.diff(&mirror, u);
            assert_eq!(
                (d.add.len(), d.remove.len()),
                (0, 2),
                "the stale backend and its address"
            );
            apply(&mut mirror, &d);
            tracker.commit(basis);
            assert_eq!(mirror, Keys::wanted(&t2, &node).0);
            // And per frontend again after it.
            let t3 = builder.build(3, &spec(3)).unwrap();
            let (u, _) = tracker.update(&t3, &node, &lingering);
            assert_eq!(u.scope(), SyncScope::Frontends { changed: 1 });
        }
    }
}
