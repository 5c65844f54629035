//! Publishing table snapshots (control's side): [`encode`] writes a table
//! in the shared-memory ABI that `clustergate_dataplane::snapshot` defines
//! and reads, and [`Writer`] publishes it into a directory (one file per
//! generation, written under a temporary name, fsynced and renamed, then
//! named by the `current` pointer file), as a delta when only frontends
//! changed, with full snapshots written in the background ([`Writer`]) and
//! old files pruned.
//!
//! Must never: write bytes the reader would refuse, or a layout of its own.
//! The header goes through [`Header::to_bytes`], each record field at its
//! `offset_of!` in the dataplane's `#[repr(C)]` record, each section at the
//! offsets the header names; the round trip through
//! `clustergate_dataplane::snapshot::decode` is tested.
//!
//! Typical use:
//! ```no_run
//! # use clustergate_builder::snapshot::Writer;
//! # use clustergate_builder::TableBuild;
//! # use clustergate_dataplane::table::Table;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut writer = Writer::open("/dev/shm/clustergate")?;
//! let table = Table::build(writer.next_generation(), 0, &[])?;
//! writer.publish(&table)?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::mem::offset_of;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clustergate_dataplane::delta::{delta_path, parse_delta_name};
use clustergate_dataplane::policy::{
    PolicyBackendRecord, PolicyClassRecord, PolicyPortRecord, PolicyRuleRecord,
};
use clustergate_dataplane::table::{
    BackendRecord, FrontendRecord, LocalRecord, PrefixRecord, Table,
};

use crate::table::TableBuild;

// The dataplane's side of the ABI (constants, `Header`, `decode`, loading),
// so that `use clustergate_builder::snapshot;` names the writer and the
// reader alike; they are defined there, once.
pub use clustergate_dataplane::snapshot::*;

/// Generations a [`Writer`] keeps by default (the newest two, so a reader that
/// has just read `current` can still open the file it names).
pub const DEFAULT_KEEP: usize = 2;

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where [`encode`] places a section of `count` records of `record_len`
/// bytes after `*at`: the next multiple of [`SECTION_ALIGN`]; moves `*at` past it.
fn place(at: &mut usize, count: usize, record_len: usize) -> usize {
    let off = at.next_multiple_of(SECTION_ALIGN as usize);
    *at = off + count * record_len;
    off
}

fn put_prefixes(out: &mut [u8], prefixes: &[PrefixRecord]) {
    for (c, p) in out.chunks_exact_mut(PREFIX_RECORD_LEN).zip(prefixes) {
        put(c, offset_of!(PrefixRecord, addr), &p.addr);
        put(c, offset_of!(PrefixRecord, len), &[p.len]);
        put(c, offset_of!(PrefixRecord, reserved), &p.reserved);
        put(c, offset_of!(PrefixRecord, node), &p.node.to_le_bytes());
    }
}

/// Serializes a table: header, then frontends, backends, ring slots, source
/// ranges, per-node rings, node prefixes, node-port addresses, name offsets
/// and names back to back (each section starting at a multiple of
/// [`SECTION_ALIGN`]: zero padding after the ring and the name offsets), all
/// little-endian, with both checksums filled in.
#[must_use]
pub fn encode(table: &Table) -> Vec<u8> {
    let parts = table.to_parts();
    let frontends = &parts.frontends;
    let backends = &parts.backends;
    let ring = &parts.ring;
    let ranges = &parts.source_ranges;
    let locals = &parts.locals;
    let node_prefixes = &parts.node_prefixes;
    let np_prefixes = &parts.node_port_prefixes;
    let name_offsets = &parts.name_offsets;
    let names = &parts.names[..];
    let pol = &parts.policy;
    let mut at = HEADER_LEN;
    let frontends_off = place(&mut at, frontends.len(), FRONTEND_RECORD_LEN);
    let backends_off = place(&mut at, backends.len(), BACKEND_RECORD_LEN);
    let ring_off = place(&mut at, ring.len(), RING_SLOT_LEN);
    let ranges_off = place(&mut at, ranges.len(), PREFIX_RECORD_LEN);
    let locals_off = place(&mut at, locals.len(), LOCAL_RECORD_LEN);
    let node_prefixes_off = place(&mut at, node_prefixes.len(), PREFIX_RECORD_LEN);
    let np_prefixes_off = place(&mut at, np_prefixes.len(), PREFIX_RECORD_LEN);
    let name_offsets_off = place(&mut at, name_offsets.len(), NAME_OFFSET_LEN);
    let pol_prefixes_off = place(&mut at, pol.prefixes.len(), PREFIX_RECORD_LEN);
    let pol_classes_off = place(&mut at, pol.classes.len(), POLICY_CLASS_RECORD_LEN);
    let pol_backends_off = place(&mut at, pol.backends.len(), POLICY_BACKEND_RECORD_LEN);
    let pol_rules_off = place(&mut at, pol.rules.len(), POLICY_RULE_RECORD_LEN);
    let pol_ports_off = place(&mut at, pol.ports.len(), POLICY_PORT_RECORD_LEN);
    let pol_bits_off = place(&mut at, pol.bits.len(), POLICY_BITS_WORD_LEN);
    let names_off = place(&mut at, names.len(), 1);
    let file_len = at;
    let mut out = vec![0u8; file_len];

    let chunks = out[frontends_off..backends_off].chunks_exact_mut(FRONTEND_RECORD_LEN);
    for (c, f) in chunks.zip(frontends) {
        put(c, offset_of!(FrontendRecord, addr), &f.addr);
        put(c, offset_of!(FrontendRecord, port), &f.port.to_le_bytes());
        put(c, offset_of!(FrontendRecord, proto), &[f.proto]);
        put(c, offset_of!(FrontendRecord, kind), &[f.kind]);
        put(c, offset_of!(FrontendRecord, return_path), &[f.return_path]);
        put(c, offset_of!(FrontendRecord, reserved), &f.reserved);
        for (at, v) in [
            (offset_of!(FrontendRecord, flags), f.flags),
            (
                offset_of!(FrontendRecord, affinity_timeout_s),
                f.affinity_timeout_s,
            ),
            (offset_of!(FrontendRecord, backends_start), f.backends_start),
            (offset_of!(FrontendRecord, backends_len), f.backends_len),
            (offset_of!(FrontendRecord, ring_start), f.ring_start),
            (offset_of!(FrontendRecord, ring_len), f.ring_len),
            (offset_of!(FrontendRecord, ranges_start), f.ranges_start),
            (offset_of!(FrontendRecord, ranges_len), f.ranges_len),
            (offset_of!(FrontendRecord, locals_start), f.locals_start),
            (offset_of!(FrontendRecord, locals_len), f.locals_len),
        ] {
            put(c, at, &v.to_le_bytes());
        }
    }
    let chunks = out[backends_off..].chunks_exact_mut(BACKEND_RECORD_LEN);
    for (c, b) in chunks.zip(backends) {
        put(c, offset_of!(BackendRecord, addr), &b.addr);
        put(c, offset_of!(BackendRecord, port), &b.port.to_le_bytes());
        put(c, offset_of!(BackendRecord, state), &[b.state]);
        put(c, offset_of!(BackendRecord, reserved), &[b.reserved]);
        put(
            c,
            offset_of!(BackendRecord, weight),
            &b.weight.to_le_bytes(),
        );
    }
    let chunks = out[ring_off..].chunks_exact_mut(RING_SLOT_LEN);
    for (c, s) in chunks.zip(ring) {
        c.copy_from_slice(&s.to_le_bytes());
    }
    put_prefixes(&mut out[ranges_off..], ranges);
    let chunks = out[locals_off..].chunks_exact_mut(LOCAL_RECORD_LEN);
    for (c, l) in chunks.zip(locals) {
        for (at, v) in [
            (offset_of!(LocalRecord, node), l.node),
            (offset_of!(LocalRecord, ring_start), l.ring_start),
            (offset_of!(LocalRecord, ring_len), l.ring_len),
            (offset_of!(LocalRecord, reserved), l.reserved),
        ] {
            put(c, at, &v.to_le_bytes());
        }
    }
    put_prefixes(&mut out[node_prefixes_off..], node_prefixes);
    put_prefixes(&mut out[np_prefixes_off..], np_prefixes);
    let chunks = out[name_offsets_off..].chunks_exact_mut(NAME_OFFSET_LEN);
    for (c, o) in chunks.zip(name_offsets) {
        c.copy_from_slice(&o.to_le_bytes());
    }
    out[names_off..names_off + names.len()].copy_from_slice(names);
    put_prefixes(&mut out[pol_prefixes_off..], &pol.prefixes);
    let chunks = out[pol_classes_off..].chunks_exact_mut(POLICY_CLASS_RECORD_LEN);
    for (c, r) in chunks.zip(&pol.classes) {
        for (at, v) in [
            (offset_of!(PolicyClassRecord, flags), r.flags),
            (offset_of!(PolicyClassRecord, rules_start), r.rules_start),
            (offset_of!(PolicyClassRecord, rules_len), r.rules_len),
            (offset_of!(PolicyClassRecord, reserved), r.reserved),
        ] {
            put(c, at, &v.to_le_bytes());
        }
    }
    let chunks = out[pol_backends_off..].chunks_exact_mut(POLICY_BACKEND_RECORD_LEN);
    for (c, r) in chunks.zip(&pol.backends) {
        put(c, offset_of!(PolicyBackendRecord, addr), &r.addr);
        for (at, v) in [
            (offset_of!(PolicyBackendRecord, rules_start), r.rules_start),
            (offset_of!(PolicyBackendRecord, rules_len), r.rules_len),
            (offset_of!(PolicyBackendRecord, flags), r.flags),
            (offset_of!(PolicyBackendRecord, class), r.class),
        ] {
            put(c, at, &v.to_le_bytes());
        }
    }
    let chunks = out[pol_rules_off..].chunks_exact_mut(POLICY_RULE_RECORD_LEN);
    for (c, r) in chunks.zip(&pol.rules) {
        for (at, v) in [
            (offset_of!(PolicyRuleRecord, bits_start), r.bits_start),
            (offset_of!(PolicyRuleRecord, ports_start), r.ports_start),
            (offset_of!(PolicyRuleRecord, ports_len), r.ports_len),
            (offset_of!(PolicyRuleRecord, reserved), r.reserved),
        ] {
            put(c, at, &v.to_le_bytes());
        }
    }
    let chunks = out[pol_ports_off..].chunks_exact_mut(POLICY_PORT_RECORD_LEN);
    for (c, r) in chunks.zip(&pol.ports) {
        put(c, offset_of!(PolicyPortRecord, lo), &r.lo.to_le_bytes());
        put(c, offset_of!(PolicyPortRecord, hi), &r.hi.to_le_bytes());
        put(c, offset_of!(PolicyPortRecord, proto), &[r.proto]);
        put(c, offset_of!(PolicyPortRecord, reserved), &r.reserved);
    }
    let chunks = out[pol_bits_off..].chunks_exact_mut(POLICY_BITS_WORD_LEN);
    for (c, w) in chunks.zip(&pol.bits) {
        c.copy_from_slice(&w.to_le_bytes());
    }

    let mut header = Header {
        magic: MAGIC,
        abi_version: ABI_VERSION,
        header_len: HEADER_LEN as u32,
        generation: table.generation(),
        hash_seed: table.hash_seed(),
        hash_id: HASH_XXH3_64,
        frontend_record_len: FRONTEND_RECORD_LEN as u32,
        backend_record_len: BACKEND_RECORD_LEN as u32,
        ring_slot_len: RING_SLOT_LEN as u32,
        file_len: file_len as u64,
        body_checksum: body_checksum(&out[HEADER_LEN..]),
        frontends_off: frontends_off as u64,
        frontends_count: frontends.len() as u64,
        backends_off: backends_off as u64,
        backends_count: backends.len() as u64,
        ring_off: ring_off as u64,
        ring_count: ring.len() as u64,
        prefix_record_len: PREFIX_RECORD_LEN as u32,
        local_record_len: LOCAL_RECORD_LEN as u32,
        source_ranges_off: ranges_off as u64,
        source_ranges_count: ranges.len() as u64,
        locals_off: locals_off as u64,
        locals_count: locals.len() as u64,
        node_prefixes_off: node_prefixes_off as u64,
        node_prefixes_count: node_prefixes.len() as u64,
        node_port_prefixes_off: np_prefixes_off as u64,
        node_port_prefixes_count: np_prefixes.len() as u64,
        name_offsets_off: name_offsets_off as u64,
        name_offsets_count: name_offsets.len() as u64,
        names_off: names_off as u64,
        names_len: names.len() as u64,
        policy_prefixes_off: pol_prefixes_off as u64,
        policy_prefixes_count: pol.prefixes.len() as u64,
        policy_classes_off: pol_classes_off as u64,
        policy_classes_count: pol.classes.len() as u64,
        policy_backends_off: pol_backends_off as u64,
        policy_backends_count: pol.backends.len() as u64,
        policy_rules_off: pol_rules_off as u64,
        policy_rules_count: pol.rules.len() as u64,
        policy_ports_off: pol_ports_off as u64,
        policy_ports_count: pol.ports.len() as u64,
        policy_bits_off: pol_bits_off as u64,
        policy_bits_count: pol.bits.len() as u64,
        header_checksum: 0,
    };
    header.header_checksum = header.compute_checksum();
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    out
}

/// Recomputes both checksums of a snapshot image as it is: the body checksum
/// over bytes `HEADER_LEN..`, then the header checksum. Other header fields
/// are left alone. For tools and tests that craft snapshots; does nothing to
/// a buffer shorter than a header.
pub fn seal(bytes: &mut [u8]) {
    let Some(raw) = bytes.get(..HEADER_LEN) else {
        return;
    };
    let mut raw_header = [0u8; HEADER_LEN];
    raw_header.copy_from_slice(raw);
    let mut h = Header::from_bytes(&raw_header);
    h.body_checksum = body_checksum(&bytes[HEADER_LEN..]);
    h.header_checksum = h.compute_checksum();
    bytes[..HEADER_LEN].copy_from_slice(&h.to_bytes());
}

/// Publishes snapshots into a directory (control's side).
///
/// Protocol for generation `G` (see `docs/shm-abi.md`):
/// 1. write `.gen-G.snap.tmp` (mode 0444), fsync, rename to
///    `gen-{G:020}.snap` (a delta: `.delta-G.snap.tmp` to
///    `delta-{G:020}.snap`);
/// 2. write `.current.tmp` with `G\n`, fsync, rename to `current`;
/// 3. fsync the directory, then remove all but the newest `keep` full
///    snapshot files, and the deltas no chain from those needs.
///
/// **Compaction in the background.** While it publishes deltas, the writer
/// also writes the full snapshot of a delta's generation now and then
/// ([`DELTAS_PER_FULL`], [`FULL_AT_LEAST_EVERY`]). It does so on a thread of
/// its own (one at a time), after the delta and `current` are in place, so
/// [`Writer::publish_change`] returns as soon as the change is published:
/// encoding and writing up to hundreds of megabytes never delays a change.
/// The full file appears atomically (temporary name, fsync, rename), and
/// until it does a reader reaches the generation from the older full
/// snapshot and the deltas after it, which pruning keeps. [`Writer::publish`] (a full
/// snapshot) and dropping the writer first wait for a running compaction;
/// [`Writer::wait_compaction`] waits on demand.
///
/// Generations only grow: [`Writer::open`] continues after the highest
/// generation found in the directory, and [`Writer::publish`] refuses a table
/// whose generation is not above both the writer's last one and what
/// `current` names on disk. One writer per directory: [`Writer::open`] takes
/// an exclusive lock on `.lock` in the directory, held until the writer is
/// dropped (the kernel releases it if the process dies).
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    next_generation: u64,
    keep: usize,
    /// Deltas published since the last full snapshot (`usize::MAX`: none
    /// published by this writer yet, so the next must be full). A full
    /// snapshot written in the background counts once it is in place.
    deltas_since_full: usize,
    /// When the last full snapshot was written (for one written in the
    /// background: when it was started), and how often one is written at
    /// least while deltas are published.
    last_full: std::time::Instant,
    full_every: std::time::Duration,
    /// The full snapshot being written in the background, if any (until
    /// the writer notices that it ended).
    compaction: Option<Compaction>,
    /// Compactions started while a [`CompactionHold`] lives wait for it.
    hold: Option<Arc<Gate>>,
    _lock: File,
}

/// A full snapshot being written in the background.
#[derive(Debug)]
struct Compaction {
    generation: u64,
    path: PathBuf,
    /// [`Writer::deltas_since_full`] when it started (its own delta
    /// included): the deltas it makes unnecessary for a reader that starts.
    deltas_at_start: usize,
    started: std::time::Instant,
    thread: std::thread::JoinHandle<Result<(), SnapshotError>>,
}

/// A gate a compaction waits at, its file written under the temporary name
/// but not yet renamed into place ([`Writer::hold_compactions`]).
#[derive(Debug, Default)]
struct Gate {
    /// (a compaction is waiting at the gate, the gate is open)
    state: std::sync::Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_while(&self, blocked: impl Fn(&(bool, bool)) -> bool) {
        let mut s = self.lock();
        while blocked(&s) {
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// A compaction: says it is here, and waits until the gate opens.
    fn pass(&self) {
        self.lock().0 = true;
        self.changed.notify_all();
        self.wait_while(|&(_, open)| !open);
    }

    fn open(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }
}

/// Holds back the full snapshots a [`Writer`] writes in the background
/// ([`Writer::hold_compactions`]), each written under its temporary name
/// but not renamed into place, until this is dropped: for tests that need
/// a compaction that is still running.
#[derive(Debug)]
#[must_use = "the compactions are held only while this lives"]
pub struct CompactionHold(Arc<Gate>);

impl CompactionHold {
    /// Blocks until a compaction has written its temporary file and waits
    /// at this hold (at once when the hold was let go).
    pub fn wait_written(&self) {
        self.0.wait_while(|&(waiting, open)| !waiting && !open);
    }
}

impl Drop for CompactionHold {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// What [`Writer::publish_change`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// A full snapshot.
    Full(PathBuf),
    /// A delta, and, when it was time for one, a full snapshot of the same
    /// generation after it, written in the background.
    Delta {
        /// The delta file.
        path: PathBuf,
        /// Frontends added or changed.
        changed: usize,
        /// Frontends removed.
        removed: usize,
        /// The full snapshot of this generation that this publish started
        /// writing in the background, if any. The file appears (atomically)
        /// when that ends; [`Writer::wait_compaction`] waits for it.
        full: Option<PathBuf>,
    },
}

/// A writer writes a full snapshot after this many deltas, so a reader that
/// starts never follows a long chain.
pub const DELTAS_PER_FULL: usize = 64;

/// While it publishes deltas, a writer also writes a full snapshot at least
/// this often: a gateway that refused a delta (and so every delta after it)
/// is back on the current table within this time.
pub const FULL_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Writer {
    /// Opens (creating it if needed) a snapshot directory. The next
    /// generation is one above the highest of what `current` names and the
    /// snapshot files present, so a restarted control never reuses a
    /// generation. Leftover temporary files of a writer that died (a full
    /// snapshot it was writing in the background, say) are removed.
    ///
    /// # Errors
    /// [`SnapshotError::Io`] when the directory cannot be created or listed,
    /// or `current` cannot be read. A `current` with garbage in it is only
    /// logged: the next publish replaces it.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, SnapshotError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SnapshotError::Io {
                    path: lock_path,
                    source: io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "another writer (clustergate-control) publishes in this directory",
                    ),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error(&lock_path)(e)),
        }
        let mut highest = match read_current(&dir) {
            Ok(g) => g.unwrap_or(0),
            Err(e @ SnapshotError::BadPointer { .. }) => {
                tracing::warn!(dir = %dir.display(), "ignoring a bad pointer file: {e}");
                0
            }
            Err(e) => return Err(e),
        };
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(g) = parse_snapshot_name(name).or_else(|| parse_delta_name(name)) {
                highest = highest.max(g);
            } else if name.starts_with('.') && name.ends_with(".tmp") {
                remove_quietly(&entry.path());
            }
        }
        Ok(Self {
            dir,
            next_generation: highest.saturating_add(1),
            keep: DEFAULT_KEEP,
            deltas_since_full: usize::MAX,
            last_full: std::time::Instant::now(),
            full_every: FULL_AT_LEAST_EVERY,
            compaction: None,
            hold: None,
            _lock: lock,
        })
    }

    /// Keeps the newest `keep` snapshot files (at least 2, so a reader that
    /// has just read `current` can still open the file it names).
    #[must_use]
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep.max(DEFAULT_KEEP);
        self
    }

    /// Writes a full snapshot at least every `every` while publishing deltas
    /// (default [`FULL_AT_LEAST_EVERY`]).
    #[must_use]
    pub fn with_full_every(mut self, every: std::time::Duration) -> Self {
        self.full_every = every;
        self
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lowest generation [`Writer::publish`] accepts next: build the
    /// next table with it.
    #[must_use]
    pub fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Publishes `table` as its generation, which must be at least
    /// [`Writer::next_generation`] and above what `current` names. Returns
    /// the snapshot file's path. A full snapshot still being written in the
    /// background is finished first, so full snapshot files appear in
    /// generation order and only one is written at a time.
    ///
    /// # Errors
    /// [`SnapshotError::Stale`] for a generation that is not newer;
    /// [`SnapshotError::Io`] when writing, syncing or renaming fails (nothing
    /// is published then: `current` still names the previous generation).
    /// A failed background write is only logged: this one replaces it.
    pub fn publish(&mut self, table: &Table) -> Result<PathBuf, SnapshotError> {
        let generation = table.generation();
        self.check_newer(generation)?;
        // Logged by `finish_compaction`; this full snapshot supersedes it.
        let _ = self.finish_compaction(true);
        let bytes = encode(table);
        let path = snapshot_path(&self.dir, generation);
        let tmp = self.dir.join(format!(".gen-{generation:020}.snap.tmp"));
        write_and_rename(&tmp, &path, &bytes, 0o444)?;
        self.point_at(generation)?;
        self.deltas_since_full = 0;
        self.last_full = std::time::Instant::now();
        self.prune();
        tracing::debug!(generation, path = %path.display(), "snapshot published");
        Ok(path)
    }

    /// Publishes `table`, as a delta from `prev` (the table this writer
    /// published last) when only frontends changed and a delta is worth it,
    /// else as a full snapshot ([`Writer::publish`]).
    ///
    /// After [`DELTAS_PER_FULL`] deltas, or [`FULL_AT_LEAST_EVERY`] after
    /// the last full snapshot, a delta is followed by a full snapshot of the
    /// same generation, for readers that start and for one that refused a
    /// delta. That one is written **in the background** (see [`Writer`]):
    /// this returns once the delta and `current` are in place, with
    /// `full` of [`Written::Delta`] naming the file being written. When one is
    /// due while the previous one is still being written, none is queued:
    /// it stays due, and the first delta published after the running one
    /// ended starts it. A background write that failed is logged (naming
    /// the file) and retried by the next delta.
    ///
    /// # Errors
    /// As [`Writer::publish`].
    pub fn publish_change(
        &mut self,
        table: &Table,
        prev: Option<&Table>,
    ) -> Result<Written, SnapshotError> {
        let delta = prev
            .filter(|p| {
                self.deltas_since_full != usize::MAX && p.generation() + 1 == self.next_generation
            })
            .and_then(|p| table.delta_from(p))
            .filter(|d| d.changed.frontends().len() <= table.frontends().len() / 2 + 1);
        let Some(delta) = delta else {
            let path = self.publish(table)?;
            return Ok(Written::Full(path));
        };
        let generation = table.generation();
        self.check_newer(generation)?;
        let bytes = crate::delta::encode_delta(&delta);
        let path = delta_path(&self.dir, generation);
        let tmp = self.dir.join(format!(".delta-{generation:020}.snap.tmp"));
        write_and_rename(&tmp, &path, &bytes, 0o444)?;
        self.point_at(generation)?;
        self.deltas_since_full = self.deltas_since_full.saturating_add(1);
        // Count a compaction that ended; a failed one was logged, and as the
        // counters did not move, this delta starts the next try.
        let _ = self.finish_compaction(false);
        let due = self.deltas_since_full >= DELTAS_PER_FULL
            || self.last_full.elapsed() >= self.full_every;
        let full = if due && self.compaction.is_none() {
            self.start_compaction(table)
        } else {
            None
        };
        self.prune();
        tracing::debug!(generation, path = %path.display(), "delta published");
        Ok(Written::Delta {
            path,
            changed: delta.changed.frontends().len(),
            removed: delta.removed.len(),
            full,
        })
    }

    /// Waits for the full snapshot being written in the background, if any
    /// (and lets go of a [`CompactionHold`]): for a clean stop, and tests.
    /// Returns its path once it is in place, `None` when none was being
    /// written.
    ///
    /// # Errors
    /// [`SnapshotError::Io`] naming the file, when writing it failed (also
    /// logged; the next delta that is due retries).
    pub fn wait_compaction(&mut self) -> Result<Option<PathBuf>, SnapshotError> {
        self.finish_compaction(true)
    }

    /// The generation of the full snapshot being written in the background,
    /// while it is.
    #[must_use]
    pub fn compacting(&self) -> Option<u64> {
        self.compaction
            .as_ref()
            .filter(|c| !c.thread.is_finished())
            .map(|c| c.generation)
    }

    /// Holds every full snapshot this writer starts writing in the
    /// background once it is written under its temporary name, before it
    /// is renamed into place, until the hold is dropped (or the writer
    /// waits for it: [`Writer::wait_compaction`], [`Writer::publish`],
    /// drop). For tests that need a compaction still running.
    pub fn hold_compactions(&mut self) -> CompactionHold {
        let gate = Arc::new(Gate::default());
        self.hold = Some(Arc::clone(&gate));
        CompactionHold(gate)
    }

    /// Starts writing the full snapshot of `table` (just published as a
    /// delta) in the background, from a copy that shares its blocks (one
    /// pointer per frontend). Returns the file's path, or `None` (and logs
    /// why) when it cannot start; the next delta tries again.
    fn start_compaction(&mut self, table: &Table) -> Option<PathBuf> {
        let generation = table.generation();
        let path = snapshot_path(&self.dir, generation);
        let table = table.clone();
        let tmp = self.dir.join(format!(".gen-{generation:020}.snap.tmp"));
        let (dir, keep, hold, to) = (self.dir.clone(), self.keep, self.hold.clone(), path.clone());
        let spawned = std::thread::Builder::new()
            .name("cg-compact".into())
            .spawn(move || {
                let bytes = encode(&table);
                drop(table);
                write_and_rename_after(&tmp, &to, &bytes, 0o444, || {
                    if let Some(gate) = hold {
                        gate.pass();
                    }
                })?;
                drop(bytes);
                sync_dir(&dir);
                prune(&dir, keep);
                tracing::debug!(generation, path = %to.display(), "full snapshot written in the background");
                Ok(())
            });
        match spawned {
            Ok(thread) => {
                self.compaction = Some(Compaction {
                    generation,
                    path: path.clone(),
                    deltas_at_start: self.deltas_since_full,
                    started: std::time::Instant::now(),
                    thread,
                });
                Some(path)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot start writing the full snapshot: {e}");
                None
            }
        }
    }

    /// Takes the result of the compaction, if one was started: waiting for
    /// it when `wait` (then also letting go of a hold), else only when it
    /// has ended. On success the full snapshot counts (the deltas before it
    /// no longer do); on failure it is logged and the counters stay, so the
    /// next delta starts another.
    fn finish_compaction(&mut self, wait: bool) -> Result<Option<PathBuf>, SnapshotError> {
        if wait {
            if let Some(gate) = self.hold.take() {
                gate.open();
            }
        }
        let Some(c) = self.compaction.take() else {
            return Ok(None);
        };
        if !wait && !c.thread.is_finished() {
            self.compaction = Some(c);
            return Ok(None);
        }
        let result = c.thread.join().unwrap_or_else(|_| {
            Err(SnapshotError::Io {
                path: c.path.clone(),
                source: io::Error::other("the thread writing it panicked"),
            })
        });
        match result {
            Ok(()) => {
                self.deltas_since_full = self.deltas_since_full.saturating_sub(c.deltas_at_start);
                self.last_full = c.started;
                Ok(Some(c.path))
            }
            Err(e) => {
                tracing::warn!(
                    path = %c.path.display(),
                    generation = c.generation,
                    "the full snapshot was not written (the next delta retries): {e}"
                );
                Err(e)
            }
        }
    }

    /// Refuses a generation that is not above the writer's last one and what
    /// `current` names.
    fn check_newer(&self, generation: u64) -> Result<(), SnapshotError> {
        if generation < self.next_generation {
            return Err(SnapshotError::Stale {
                generation,
                current: self.next_generation - 1,
            });
        }
        match read_current(&self.dir) {
            Ok(Some(current)) if generation <= current => Err(SnapshotError::Stale {
                generation,
                current,
            }),
            Ok(_) | Err(SnapshotError::BadPointer { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Points `current` at `generation` (its file is in place).
    fn point_at(&mut self, generation: u64) -> Result<(), SnapshotError> {
        let pointer = self.dir.join(CURRENT);
        let pointer_tmp = self.dir.join(".current.tmp");
        write_and_rename(
            &pointer_tmp,
            &pointer,
            format!("{generation}\n").as_bytes(),
            0o644,
        )?;
        sync_dir(&self.dir);
        self.next_generation = generation.saturating_add(1);
        Ok(())
    }

    fn prune(&self) {
        prune(&self.dir, self.keep);
    }
}

impl Drop for Writer {
    /// A writer that stops (control on SIGTERM) finishes the full snapshot
    /// it is writing in the background: no half-written file is left, and
    /// the directory lock is released only after it.
    fn drop(&mut self) {
        // Logged by `finish_compaction`.
        let _ = self.finish_compaction(true);
    }
}

/// Makes the renames in `dir` durable where that means something (not
/// tmpfs); some filesystems refuse to sync a directory, which is harmless.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Removes all but the newest `keep` full snapshot files in `dir`, and the
/// deltas no chain from them needs (those not above the oldest one kept).
///
/// Safe to run while a full snapshot is written in the background, and
/// twice at once (the writer's and the compaction's): a full snapshot not
/// yet renamed into place is not listed, so it only makes this keep more
/// (an older full snapshot, the deltas after it); a file listed and
/// already gone is skipped; and a listing taken earlier only ever removes
/// what a later one would remove too, as files are only ever added above
/// the generations listed. Temporary files are never touched.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut fulls: Vec<u64> = Vec::new();
    let mut deltas: Vec<u64> = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(g) = parse_snapshot_name(name) {
            fulls.push(g);
        } else if let Some(g) = parse_delta_name(name) {
            deltas.push(g);
        }
    }
    fulls.sort_unstable_by(|a, b| b.cmp(a));
    for &g in fulls.iter().skip(keep) {
        remove_quietly(&snapshot_path(dir, g));
    }
    let oldest_kept = fulls.get(keep.min(fulls.len()).saturating_sub(1)).copied();
    for g in deltas {
        if oldest_kept.is_some_and(|o| g <= o) {
            remove_quietly(&delta_path(dir, g));
        }
    }
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), "cannot remove: {e}"),
    }
}

/// Writes `bytes` to `tmp` (replacing any leftover), fsyncs, renames to `to`.
fn write_and_rename(tmp: &Path, to: &Path, bytes: &[u8], mode: u32) -> Result<(), SnapshotError> {
    write_and_rename_after(tmp, to, bytes, mode, || {})
}

/// As [`write_and_rename`], calling `before_rename` between the fsync and
/// the rename.
fn write_and_rename_after(
    tmp: &Path,
    to: &Path,
    bytes: &[u8],
    mode: u32,
    before_rename: impl FnOnce(),
) -> Result<(), SnapshotError> {
    remove_quietly(tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        before_rename();
        fs::rename(tmp, to)
    })();
    result.map_err(|e| {
        remove_quietly(tmp);
        io_error(to)(e)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose

    use std::net::{IpAddr, Ipv4Addr};

    use ipnet::IpNet;

    use super::*;
    use crate::table::{BackendSpec, ServiceSpec, TableSpec};
    use clustergate_dataplane::flow::{addr16, Proto};
    use clustergate_dataplane::snapshot::decode;
    use clustergate_dataplane::table::{
        FrontendKind, ReturnPath, FRONTEND_NODE_LOCAL, FRONTEND_SOURCE_RANGES,
    };
    use xxhash_rust::xxh3::xxh3_64;

    fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn small() -> Table {
        Table::build(
            7,
            0x1122_3344_5566_7788,
            &[ServiceSpec::cluster_ip(
                "198.19.0.10".parse().unwrap(),
                80,
                Proto::Tcp,
                vec![BackendSpec::ready("198.18.1.1".parse().unwrap(), 8080)],
            )
            .with_name("default/web:http")],
        )
        .unwrap()
    }

    /// A table with every section: a ClusterIP, a node port, an external
    /// IP, a load-balancer IP with source ranges (IPv4 and IPv6) and a
    /// node-local frontend, node prefixes and node-port addresses.
    fn full() -> Table {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let backends = vec![
            BackendSpec::ready(ip("198.18.1.1"), 8080).on_node(1),
            BackendSpec::ready(ip("198.18.1.2"), 8080).on_node(2),
            BackendSpec::ready(ip("198.18.1.3"), 8080).on_node(2),
        ];
        let base = ServiceSpec::cluster_ip(ip("198.19.0.10"), 80, Proto::Tcp, backends)
            .with_name("default/web:http");
        let mut lb = base
            .clone()
            .with_kind(FrontendKind::LoadBalancer, ip("198.19.9.1"));
        lb.source_ranges = Some(vec![net("198.18.0.0/16"), net("198.19.128.0/17")]);
        let mut local = base.clone();
        local.port = 81;
        local.node_local = true;
        local.name = Some("default/local".into());
        let mut ext = base
            .clone()
            .with_kind(FrontendKind::ExternalIp, ip("198.19.8.1"));
        ext.name = None;
        let mut lb6 = ServiceSpec::cluster_ip(
            ip("2001:2::10"),
            443,
            Proto::Tcp,
            vec![BackendSpec::ready(ip("2001:2:1::1"), 8443)],
        )
        .with_kind(FrontendKind::LoadBalancer, ip("2001:2::99"))
        .with_name("prod/façade:https");
        lb6.source_ranges = Some(vec![net("2001:2:ff::/56")]);
        let spec = TableSpec {
            services: vec![
                base.clone(),
                base.clone()
                    .with_kind(FrontendKind::NodePort, ip("0.0.0.0"))
                    .with_return_path(ReturnPath::Snat),
                ext,
                lb,
                local,
                lb6,
            ],
            nodes: vec![
                (net("198.18.64.0/24"), 1),
                (net("198.18.0.11/32"), 1),
                (net("198.18.65.0/24"), 2),
                (net("2001:2:0:1::/64"), 2),
            ],
            node_port_addresses: vec![net("198.18.0.0/16"), net("2001:2::/48")],
            policy: Default::default(),
        };
        Table::build_full(9, 0x0102_0304_0506_0708, &spec, 1031).unwrap()
    }

    #[test]
    fn header_bytes_are_where_the_abi_says() {
        let t = small();
        let b = encode(&t);
        assert_eq!(&b[0..8], b"CGSNAP\0\0");
        assert_eq!(b[8..12], 7u32.to_le_bytes());
        assert_eq!(b[12..16], 320u32.to_le_bytes());
        assert_eq!(b[16..24], 7u64.to_le_bytes());
        assert_eq!(b[24..32], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[32..36], 1u32.to_le_bytes());
        assert_eq!(b[36..40], 64u32.to_le_bytes());
        assert_eq!(b[40..44], 24u32.to_le_bytes());
        assert_eq!(b[44..48], 2u32.to_le_bytes());
        let ring = t.ring_slots().len() as u64;
        // Frontend at 320, backend at 384, ring at 408, then padding to 8.
        let ring_end = 408 + RING_SLOT_LEN as u64 * ring;
        let empty_at = ring_end.next_multiple_of(8);
        // Then two name offsets (8 bytes) and the 16 bytes of the name.
        let names_at = empty_at + 8;
        let len = names_at + 16;
        assert_eq!(b.len() as u64, len);
        assert_eq!(b[48..56], len.to_le_bytes());
        assert_eq!(b[56..64], xxh3_64(&b[320..]).to_le_bytes());
        assert_eq!(b[64..72], 320u64.to_le_bytes());
        assert_eq!(b[72..80], 1u64.to_le_bytes());
        assert_eq!(b[80..88], 384u64.to_le_bytes());
        assert_eq!(b[88..96], 1u64.to_le_bytes());
        assert_eq!(b[96..104], 408u64.to_le_bytes());
        assert_eq!(b[104..112], ring.to_le_bytes());
        assert_eq!(b[112..116], 24u32.to_le_bytes());
        assert_eq!(b[116..120], 16u32.to_le_bytes());
        // The four sections of ABI 4 are empty, after the ring.
        for at in [120, 136, 152, 168] {
            assert_eq!(b[at..at + 8], empty_at.to_le_bytes(), "offset at {at}");
            assert_eq!(b[at + 8..at + 16], [0; 8], "count at {}", at + 8);
        }
        // The name offsets, then the names.
        assert_eq!(b[184..192], empty_at.to_le_bytes());
        assert_eq!(b[192..200], 2u64.to_le_bytes());
        assert_eq!(b[200..208], names_at.to_le_bytes());
        assert_eq!(b[208..216], 16u64.to_le_bytes());
        // The six policy sections of ABI 6: empty, after the name offsets.
        for at in [216, 232, 248, 264, 280, 296] {
            assert_eq!(b[at..at + 8], names_at.to_le_bytes(), "offset at {at}");
            assert_eq!(b[at + 8..at + 16], [0; 8], "count at {}", at + 8);
        }
        assert_eq!(b[312..320], xxh3_64(&b[..312]).to_le_bytes());
        // The frontend record: address, then port 80 little-endian, TCP.
        assert_eq!(b[320 + 12..320 + 16], [198, 19, 0, 10]);
        assert_eq!(b[320 + 16..320 + 20], [80, 0, 6, 0]);
        assert_eq!(b[320 + 48..320 + 64], [0; 16], "no ranges, no locals");
        // The backend: port 8080 little-endian, weight 1.
        assert_eq!(b[384 + 16..384 + 18], 8080u16.to_le_bytes());
        assert_eq!(b[384 + 20..384 + 24], 1u32.to_le_bytes());
        assert!(
            b[ring_end as usize..empty_at as usize]
                .iter()
                .all(|&x| x == 0),
            "padding"
        );
        let o = empty_at as usize;
        assert_eq!(b[o..o + 8], [0, 0, 0, 0, 16, 0, 0, 0]);
        assert_eq!(&b[names_at as usize..], b"default/web:http");
        let back = decode(&b).unwrap();
        assert_eq!(back.frontends(), t.frontends());
        assert_eq!(back.frontend_name(0), Some("default/web:http"));
    }

    /// Every new section, byte by byte where it is, and back.
    #[test]
    fn new_sections_are_where_the_abi_says() {
        let t = full();
        let b = encode(&t);
        let h = Header::parse(&b).unwrap();
        let ring_end = h.ring_off + 2 * h.ring_count;
        assert_eq!(h.source_ranges_off, ring_end.next_multiple_of(8));
        assert_eq!(h.source_ranges_count, 3);
        assert_eq!(h.locals_off, h.source_ranges_off + 3 * 24);
        assert_eq!(h.locals_count, 2);
        assert_eq!(h.node_prefixes_off, h.locals_off + 2 * 16);
        assert_eq!(h.node_prefixes_count, 4);
        assert_eq!(h.node_port_prefixes_off, h.node_prefixes_off + 4 * 24);
        assert_eq!(h.node_port_prefixes_count, 2);
        assert_eq!(h.name_offsets_off, h.node_port_prefixes_off + 2 * 24);
        assert_eq!(h.name_offsets_count, 7);
        assert_eq!(
            h.names_off,
            (h.name_offsets_off + 7 * 4).next_multiple_of(8)
        );
        assert_eq!(h.file_len, h.names_off + h.names_len);
        let n = h.names_off as usize;
        assert_eq!(&b[n..n + 16], b"default/web:http");
        // The external-IP frontend (#2) has no name: an empty one.
        let o = h.name_offsets_off as usize;
        assert_eq!(b[o + 8..o + 12], b[o + 12..o + 16]);
        // Source range 1: 198.19.128.0/17, node 0.
        let r = h.source_ranges_off as usize + 24;
        assert_eq!(b[r..r + 16], addr16(ip4(198, 19, 128, 0)));
        assert_eq!(b[r + 16..r + 24], [17, 0, 0, 0, 0, 0, 0, 0]);
        // IPv6 source range: 2001:2:ff::/56, family-relative length.
        let r = h.source_ranges_off as usize + 48;
        assert_eq!(b[r..r + 4], [0x20, 0x01, 0x00, 0x02]);
        assert_eq!(b[r + 16], 56);
        // The node-local frontend's two rings: nodes 1 and 2, in order.
        let l = h.locals_off as usize;
        assert_eq!(b[l..l + 4], 1u32.to_le_bytes());
        assert_eq!(b[l + 16..l + 20], 2u32.to_le_bytes());
        let lr = t.local_records();
        assert_eq!(b[l + 4..l + 8], lr[0].ring_start.to_le_bytes());
        assert_eq!(b[l + 8..l + 12], lr[0].ring_len.to_le_bytes());
        assert_eq!(b[l + 12..l + 16], [0; 4]);
        // Node prefix 1: 198.18.0.11/32 of node 1.
        let n = h.node_prefixes_off as usize + 24;
        assert_eq!(b[n..n + 16], addr16(ip4(198, 18, 0, 11)));
        assert_eq!(b[n + 16], 32);
        assert_eq!(b[n + 20..n + 24], 1u32.to_le_bytes());
        // Node-port address 1: 2001:2::/48.
        let p = h.node_port_prefixes_off as usize + 24;
        assert_eq!(b[p + 16], 48);
        // The load-balancer frontend (#3) points at ranges 0..2.
        let f = h.frontends_off as usize + 3 * 64;
        assert_eq!(b[f + 19], FrontendKind::LoadBalancer as u8);
        assert_eq!(b[f + 20..f + 24], FRONTEND_SOURCE_RANGES.to_le_bytes());
        assert_eq!(b[f + 48..f + 56], [0, 0, 0, 0, 2, 0, 0, 0]);
        // The node-local frontend (#4) points at locals 0..2.
        let f = h.frontends_off as usize + 4 * 64;
        assert_eq!(b[f + 20..f + 24], FRONTEND_NODE_LOCAL.to_le_bytes());
        assert_eq!(b[f + 56..f + 64], [0, 0, 0, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn every_section_round_trips() {
        let t = full();
        let b = encode(&t);
        let back = decode(&b).unwrap();
        assert_eq!(back.frontends(), t.frontends());
        assert_eq!(back.backend_records(), t.backend_records());
        assert_eq!(back.ring_slots(), t.ring_slots());
        assert_eq!(back.source_range_records(), t.source_range_records());
        assert_eq!(back.local_records(), t.local_records());
        assert_eq!(back.node_prefix_records(), t.node_prefix_records());
        assert_eq!(
            back.node_port_prefix_records(),
            t.node_port_prefix_records()
        );
        assert!(back.has_node_ports());
        assert_eq!(back.to_parts().name_offsets, t.to_parts().name_offsets);
        assert_eq!(back.to_parts().names, t.to_parts().names);
        let names: Vec<Option<&str>> = (0..7).map(|i| back.frontend_name(i)).collect();
        assert_eq!(
            names,
            [
                Some("default/web:http"),
                Some("default/web:http"),
                None,
                Some("default/web:http"),
                Some("default/local"),
                Some("prod/façade:https"),
                None, // there is no frontend #6
            ]
        );
        assert_eq!(encode(&back), b, "encoding is deterministic");
        // The lookups work the same on the decoded table.
        let client = addr16(ip4(198, 18, 65, 7));
        assert_eq!(back.client_node(&client), Some(2));
        let np = back.node_port(&addr16(ip4(198, 18, 0, 11)), 80, Proto::Tcp);
        assert_eq!(np, Some(1));
        assert_eq!(
            back.node_port(&addr16(ip4(198, 19, 0, 11)), 80, Proto::Tcp),
            None
        );
        let lb = back.frontend_record(3).unwrap();
        assert!(back.source_allowed(lb, &client));
        assert!(!back.source_allowed(lb, &addr16(ip4(198, 19, 0, 1))));
        assert!(back.source_allowed(lb, &addr16(ip4(198, 19, 200, 1))));
    }

    /// A copy of `full()`'s image with `edit` applied to its bytes (given the
    /// header), resealed.
    fn edited(edit: impl FnOnce(&Header, &mut [u8])) -> Vec<u8> {
        let mut b = encode(&full());
        let h = Header::parse(&b).unwrap();
        edit(&h, &mut b);
        seal(&mut b);
        b
    }

    fn refusal(b: &[u8]) -> (String, &'static str) {
        let e = decode(b).unwrap_err();
        (e.to_string(), e.label())
    }

    #[test]
    fn bad_new_records_are_refused() {
        // Prefix length 33 on an IPv4 source range.
        let (m, l) = refusal(&edited(|h, b| b[h.source_ranges_off as usize + 16] = 33));
        assert_eq!(l, "invalid_table");
        assert!(
            m.contains("source range #0") && m.contains("prefix length 33"),
            "{m}"
        );
        // Host bits: 198.18.0.1/16 as a node-port address.
        let (m, l) = refusal(&edited(|h, b| {
            b[h.node_port_prefixes_off as usize + 15] = 1
        }));
        assert_eq!(l, "invalid_table");
        assert!(
            m.contains("node-port address #0") && m.contains("host bits"),
            "{m}"
        );
        // Host bits on an IPv6 node prefix (2001:2:0:1::1/64).
        let (m, l) = refusal(&edited(|h, b| {
            b[h.node_prefixes_off as usize + 3 * 24 + 15] = 1
        }));
        assert_eq!(l, "invalid_table");
        assert!(
            m.contains("node prefix #3") && m.contains("host bits"),
            "{m}"
        );
        // IPv6 prefix length 129.
        let (m, _) = refusal(&edited(|h, b| {
            b[h.node_prefixes_off as usize + 3 * 24 + 16] = 129
        }));
        assert!(m.contains("prefix length 129 is longer than 128"), "{m}");
        // Per-node rings out of order (node 2 before node 1).
        let (m, l) = refusal(&edited(|h, b| {
            let l = h.locals_off as usize;
            b[l..l + 4].copy_from_slice(&3u32.to_le_bytes());
        }));
        assert_eq!(l, "invalid_table");
        assert!(m.contains("not sorted by node"), "{m}");
        // A per-node ring slot naming backend 3 of 3.
        let (m, l) = refusal(&edited(|h, b| {
            let l = h.locals_off as usize;
            let start = u32::from_le_bytes(b[l + 4..l + 8].try_into().unwrap()) as usize;
            let at = h.ring_off as usize + 2 * start;
            b[at..at + 2].copy_from_slice(&3u16.to_le_bytes());
        }));
        assert_eq!(l, "invalid_table");
        assert!(m.contains("per-node ring slot names backend 3 of 3"), "{m}");
        // A per-node ring past the ring array.
        let (m, _) = refusal(&edited(|h, b| {
            let l = h.locals_off as usize;
            b[l + 4..l + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        }));
        assert!(m.contains("per-node ring 4294967295.."), "{m}");
        // Source ranges without the flag (the LB frontend, #3).
        let (m, l) = refusal(&edited(|h, b| {
            let f = h.frontends_off as usize + 3 * 64;
            b[f + 20..f + 24].copy_from_slice(&0u32.to_le_bytes());
        }));
        assert_eq!(l, "invalid_table");
        assert!(m.contains("frontend #3: source ranges without"), "{m}");
        // Per-node rings without the flag (#4).
        let (m, _) = refusal(&edited(|h, b| {
            let f = h.frontends_off as usize + 4 * 64;
            b[f + 20..f + 24].copy_from_slice(&0u32.to_le_bytes());
        }));
        assert!(m.contains("frontend #4: per-node rings without"), "{m}");
        // Source ranges past their array.
        let (m, _) = refusal(&edited(|h, b| {
            let f = h.frontends_off as usize + 3 * 64;
            b[f + 52..f + 56].copy_from_slice(&4u32.to_le_bytes());
        }));
        assert!(m.contains("source ranges 0..4 exceed 3"), "{m}");
        // An unknown flag bit.
        let (m, l) = refusal(&edited(|h, b| {
            let f = h.frontends_off as usize;
            b[f + 20..f + 24].copy_from_slice(&8u32.to_le_bytes());
        }));
        assert_eq!(l, "bad_record");
        assert!(m.contains("unknown flags 0x8"), "{m}");
        // Reserved bytes of the new records.
        let (m, l) = refusal(&edited(|h, b| b[h.source_ranges_off as usize + 18] = 1));
        assert_eq!(l, "bad_record");
        assert!(m.starts_with("source_ranges record #0: reserved"), "{m}");
        let (m, l) = refusal(&edited(|h, b| b[h.locals_off as usize + 16 + 12] = 1));
        assert_eq!(l, "bad_record");
        assert!(m.starts_with("locals record #1: reserved"), "{m}");
        // A node port not on the unspecified address.
        let (m, _) = refusal(&edited(|h, b| b[h.frontends_off as usize + 64 + 15] = 1));
        assert!(m.contains("node ports are on 0.0.0.0 or ::"), "{m}");
        // A source range of the other family.
        let (m, _) = refusal(&edited(|h, b| {
            let (from, to) = (
                h.source_ranges_off as usize + 48,
                h.source_ranges_off as usize,
            );
            b.copy_within(from..from + 24, to);
        }));
        assert!(m.contains("another IP family"), "{m}");
        // A source range naming a node.
        let (m, _) = refusal(&edited(|h, b| b[h.source_ranges_off as usize + 20] = 1));
        assert!(m.contains("source range #0") && m.contains("node"), "{m}");
    }

    /// Sets name offset `i` of an image to `v`.
    fn set_name_offset(h: &Header, b: &mut [u8], i: usize, v: u32) {
        let at = h.name_offsets_off as usize + 4 * i;
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn name_offset(h: &Header, b: &[u8], i: usize) -> u32 {
        let at = h.name_offsets_off as usize + 4 * i;
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn bad_names_are_refused() {
        // Out of bounds: the last name ends past the names.
        let (m, l) = refusal(&edited(|h, b| {
            set_name_offset(h, b, 6, h.names_len as u32 + 100);
        }));
        assert_eq!(l, "invalid_table");
        assert!(
            m.contains("frontend #5 name: offsets") && m.contains("exceed the"),
            "{m}"
        );
        // Going backwards: frontend #1 would end before it starts.
        let (m, l) = refusal(&edited(|h, b| set_name_offset(h, b, 2, 5)));
        assert_eq!(l, "invalid_table");
        assert_eq!(
            m,
            "table validation: frontend #1 name: offsets 16..5 go backwards"
        );
        // Not UTF-8.
        let (m, l) = refusal(&edited(|h, b| b[h.names_off as usize + 3] = 0xff));
        assert_eq!(l, "invalid_table");
        assert_eq!(
            m,
            "table validation: frontend #0 name: bytes 0..16 are not UTF-8 (at byte 3)"
        );
        // A boundary inside a character (the `ç` of frontend #5's name).
        let (m, _) = refusal(&edited(|h, b| {
            let at = name_offset(h, b, 5) + 8;
            set_name_offset(h, b, 5, at);
        }));
        assert!(m.contains("are not UTF-8"), "{m}");
        // Bytes no name covers, and a first offset that is not 0.
        let (m, _) = refusal(&edited(|h, b| {
            let last = name_offset(h, b, 6);
            set_name_offset(h, b, 6, last - 1);
        }));
        assert!(m.contains("name offsets: the last offset is"), "{m}");
        let (m, _) = refusal(&edited(|h, b| set_name_offset(h, b, 0, 1)));
        assert_eq!(
            m,
            "table validation: name offsets: the first offset is 1, expected 0"
        );
        // Not one more offset than frontends.
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.name_offsets_count = 6;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "invalid_table");
        assert!(
            m.contains("name offsets: 6 offsets for 6 frontends (expected 0 or 7)"),
            "{m}"
        );
        // Names without offsets.
        let (m, _) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.name_offsets_count = 0;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert!(m.contains("name offsets: none, but the names hold"), "{m}");
        // Too long: two names of 300 bytes made one of 600.
        let long = |c: char| std::iter::repeat_n(c, 300).collect::<String>();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let t = Table::build(
            1,
            0,
            &[
                ServiceSpec::cluster_ip(ip("198.19.0.1"), 80, Proto::Tcp, vec![])
                    .with_name(long('a')),
                ServiceSpec::cluster_ip(ip("198.19.0.2"), 80, Proto::Tcp, vec![])
                    .with_name(long('b')),
            ],
        )
        .unwrap();
        let mut b = encode(&t);
        let h = Header::parse(&b).unwrap();
        set_name_offset(&h, &mut b, 1, 0);
        seal(&mut b);
        let (m, l) = refusal(&b);
        assert_eq!(l, "invalid_table");
        assert_eq!(
            m,
            "table validation: frontend #1 name: 600 bytes, at most 512"
        );
        // The builder refuses a long name too.
        let e = Table::build(
            1,
            0,
            &[
                ServiceSpec::cluster_ip(ip("198.19.0.1"), 80, Proto::Tcp, vec![])
                    .with_name(long('a') + &long('b')),
            ],
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "frontend #0 name: 600 bytes, at most 512");
    }

    #[test]
    fn name_sections_are_bounds_and_alignment_checked() {
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.names_len += 1000;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "section_bounds", "{m}");
        assert!(m.starts_with("names section"), "{m}");
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.name_offsets_off += 4;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "section_alignment", "{m}");
        assert!(m.starts_with("name_offsets section"), "{m}");
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.names_off = h.node_port_prefixes_off;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "section_overlap", "{m}");
        // A table without names has no name sections.
        let b = encode(&Table::empty(3));
        let h = Header::parse(&b).unwrap();
        assert_eq!((h.name_offsets_count, h.names_len), (0, 0));
        assert_eq!(decode(&b).unwrap().frontend_name(0), None);
    }

    #[test]
    fn new_sections_are_bounds_and_overlap_checked() {
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.locals_count = 1000;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "section_bounds", "{m}");
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.node_prefixes_off = h.source_ranges_off;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "section_overlap", "{m}");
        assert!(
            m.contains("source_ranges section") && m.contains("node_prefixes section"),
            "{m}"
        );
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.node_port_prefixes_off += 4;
            h.node_port_prefixes_count -= 1;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "section_alignment", "{m}");
        let (m, l) = refusal(&edited(|h, b| {
            let mut h = *h;
            h.local_record_len = 24;
            b[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        }));
        assert_eq!(l, "bad_header", "{m}");
        assert_eq!(m, "header field local_record_len is 24, expected 16");
    }

    /// The empty table's image is frozen: a change here is an ABI change.
    #[test]
    fn empty_snapshot_is_frozen() {
        let b = encode(&Table::empty(1));
        assert_eq!(b.len(), HEADER_LEN);
        let h = Header::from_bytes(&b[..HEADER_LEN].try_into().unwrap());
        assert_eq!(h.body_checksum, xxh3_64(&[]));
        assert_eq!(h.body_checksum, 0x2d06_8005_38d3_94c2);
        assert_eq!(h.header_checksum, h.compute_checksum());
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let b = encode(&small());
        let h = Header::from_bytes(&b[..HEADER_LEN].try_into().unwrap());
        assert_eq!(h.to_bytes()[..], b[..HEADER_LEN]);
    }

    #[test]
    fn decode_messages_name_the_values() {
        let b = encode(&small());
        assert_eq!(
            decode(&b[..10]).unwrap_err().to_string(),
            "truncated: 10 bytes, header needs 320"
        );
        let mut v = b.clone();
        v[8] = 2;
        assert_eq!(
            decode(&v).unwrap_err().to_string(),
            "ABI version 2, expected 7"
        );
        let mut v = b.clone();
        let last = v.len() - 1;
        v[last] ^= 1;
        assert!(decode(&v)
            .unwrap_err()
            .to_string()
            .starts_with("body checksum 0x"));
        let mut v = b.clone();
        v.truncate(330);
        assert_eq!(
            decode(&v).unwrap_err().to_string(),
            format!("truncated: 330 bytes, header says the file has {}", b.len())
        );
    }
}
