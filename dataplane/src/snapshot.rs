//! Table snapshots in shared memory: the ABI and the reader (dataplane).
//!
//! Owns: the snapshot file format ([`Header`] followed by the flat
//! [`FrontendRecord`], [`BackendRecord`], ring-slot, [`PrefixRecord`] and
//! [`LocalRecord`] arrays and the frontends' names, little-endian;
//! `docs/shm-abi.md` is its reference): the header layout
//! ([`Header::to_bytes`], [`Header::from_bytes`], [`Header::parse`]), the
//! record and section constants, [`decode`], reading the `current` pointer
//! and the files it names ([`read_current`], [`load_file`],
//! [`load_current`]), and the hand-over to the workers ([`TableHandle`], an
//! [`arc_swap::ArcSwap`]; [`Watcher`] polls the directory and swaps new
//! generations in).
//!
//! The writer side (encoding a table, the publish protocol, compaction and
//! pruning) is control's: `clustergate_builder::snapshot`, which writes
//! these same bytes through [`Header::to_bytes`].
//!
//! Must never: use a snapshot before every byte of it has been validated
//! (magic, ABI version, header checksum, lengths, offsets, body checksum, then
//! every index through [`Table::assemble`]); reinterpret bytes as structs
//! (each field is decoded with `from_le_bytes`); go back to an older
//! generation; or let a refused snapshot replace the last good table.
//!
//! The mapping of a snapshot file ([`load_file`]) is one of the two places of
//! the project with `unsafe` code (the other is AF_XDP); see its `SAFETY`
//! comment.
//!
//! Dataplane side:
//! ```no_run
//! # use std::sync::Arc;
//! # use clustergate_dataplane::snapshot::{TableHandle, Watcher};
//! let handle = Arc::new(TableHandle::default()); // generation 0: nothing yet
//! let mut watcher = Watcher::new("/dev/shm/clustergate", Arc::clone(&handle));
//! watcher.poll(); // at start-up: maps the current snapshot, if any
//! // each worker, once per batch:
//! let table = handle.load();
//! # let _ = table.generation();
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use memmap2::Mmap;
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use crate::policy::{
    PolicyBackendRecord, PolicyClassRecord, PolicyParts, PolicyPortRecord, PolicyRuleRecord,
};
use crate::table::{
    BackendRecord, FrontendRecord, LocalRecord, PrefixRecord, Table, TableError, TableParts,
    FRONTEND_FLAGS,
};

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"CGSNAP\0\0";
/// The layout version. Any change to the layout, the checksum or the flow hash
/// bumps it; readers refuse every other version.
pub const ABI_VERSION: u32 = 7;
/// Flow-hash function identifier: XXH3-64 (xxHash 0.8), as defined in
/// `docs/architecture.md`, "Flow hash (ABI)". The only one known.
pub const HASH_XXH3_64: u32 = 1;
/// Size of the [`Header`] in bytes.
pub const HEADER_LEN: usize = 320;
/// Size of one [`FrontendRecord`] in the file.
pub const FRONTEND_RECORD_LEN: usize = 64;
/// Size of one [`BackendRecord`] in the file.
pub const BACKEND_RECORD_LEN: usize = 24;
/// Size of one ring slot (`u16`) in the file.
pub const RING_SLOT_LEN: usize = 2;
/// Size of one [`PrefixRecord`] in the file (source ranges, node prefixes,
/// node-port addresses).
pub const PREFIX_RECORD_LEN: usize = 24;
/// Size of one [`LocalRecord`] in the file.
pub const LOCAL_RECORD_LEN: usize = 16;
/// Size of one name offset (`u32`) in the file.
pub const NAME_OFFSET_LEN: usize = 4;
/// Bytes per policy class record ([`PolicyClassRecord`]).
pub const POLICY_CLASS_RECORD_LEN: usize = 16;
/// Bytes per policy backend record ([`PolicyBackendRecord`]).
pub const POLICY_BACKEND_RECORD_LEN: usize = 32;
/// Bytes per policy rule record ([`PolicyRuleRecord`]).
pub const POLICY_RULE_RECORD_LEN: usize = 16;
/// Bytes per policy port record ([`PolicyPortRecord`]).
pub const POLICY_PORT_RECORD_LEN: usize = 8;
/// Bytes per policy bitmap word (`u64`).
pub const POLICY_BITS_WORD_LEN: usize = 8;
/// Every section starts at a multiple of this many bytes from the file start.
pub const SECTION_ALIGN: u64 = 8;
/// Largest snapshot file a reader maps (4 GiB).
pub const MAX_FILE_LEN: u64 = 1 << 32;
/// Name of the pointer file that names the current generation.
pub const CURRENT: &str = "current";
/// Default snapshot directory.
pub const DEFAULT_DIR: &str = "/dev/shm/clustergate";
/// Longest `current` file accepted (a `u64` in decimal is 20 digits).
const MAX_POINTER_LEN: u64 = 64;

/// The snapshot header: the first [`HEADER_LEN`] bytes of the file, every
/// integer little-endian. `docs/shm-abi.md` describes each field.
///
/// The struct documents the layout (its offsets are asserted at compile time);
/// it is read and written field by field ([`Header::from_bytes`],
/// [`Header::to_bytes`]), never by reinterpreting bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// [`HEADER_LEN`]; the body starts here.
    pub header_len: u32,
    /// The table generation (≥ 1 for a published snapshot).
    pub generation: u64,
    /// The flow-hash seed `S`.
    pub hash_seed: u64,
    /// The flow-hash function ([`HASH_XXH3_64`]).
    pub hash_id: u32,
    /// [`FRONTEND_RECORD_LEN`].
    pub frontend_record_len: u32,
    /// [`BACKEND_RECORD_LEN`].
    pub backend_record_len: u32,
    /// [`RING_SLOT_LEN`].
    pub ring_slot_len: u32,
    /// Length of the whole file (header and body) in bytes.
    pub file_len: u64,
    /// XXH3-64 (seed 0) of the body, bytes `header_len..file_len`.
    pub body_checksum: u64,
    /// Offset of the frontend array from the start of the file.
    pub frontends_off: u64,
    /// Number of frontend records.
    pub frontends_count: u64,
    /// Offset of the backend array from the start of the file.
    pub backends_off: u64,
    /// Number of backend records.
    pub backends_count: u64,
    /// Offset of the ring-slot array from the start of the file.
    pub ring_off: u64,
    /// Number of ring slots.
    pub ring_count: u64,
    /// [`PREFIX_RECORD_LEN`].
    pub prefix_record_len: u32,
    /// [`LOCAL_RECORD_LEN`].
    pub local_record_len: u32,
    /// Offset of the source-range array (prefix records).
    pub source_ranges_off: u64,
    /// Number of source ranges.
    pub source_ranges_count: u64,
    /// Offset of the per-node ring array (local records).
    pub locals_off: u64,
    /// Number of per-node rings.
    pub locals_count: u64,
    /// Offset of the node-prefix array (prefix records).
    pub node_prefixes_off: u64,
    /// Number of node prefixes.
    pub node_prefixes_count: u64,
    /// Offset of the node-port address array (prefix records).
    pub node_port_prefixes_off: u64,
    /// Number of node-port address ranges.
    pub node_port_prefixes_count: u64,
    /// Offset of the name-offset array (`u32`s).
    pub name_offsets_off: u64,
    /// Number of name offsets: `frontends_count + 1`, or 0 (no names).
    pub name_offsets_count: u64,
    /// Offset of the names (UTF-8 bytes).
    pub names_off: u64,
    /// Length of the names in bytes.
    pub names_len: u64,
    /// Offset of the policy client prefixes (prefix records; `node` holds
    /// the class).
    pub policy_prefixes_off: u64,
    /// Number of policy client prefixes.
    pub policy_prefixes_count: u64,
    /// Offset of the policy classes.
    pub policy_classes_off: u64,
    /// Number of policy classes (0: no NetworkPolicy, all allowed).
    pub policy_classes_count: u64,
    /// Offset of the policy backends.
    pub policy_backends_off: u64,
    /// Number of policy backends.
    pub policy_backends_count: u64,
    /// Offset of the policy rules.
    pub policy_rules_off: u64,
    /// Number of policy rules.
    pub policy_rules_count: u64,
    /// Offset of the policy port ranges.
    pub policy_ports_off: u64,
    /// Number of policy port ranges.
    pub policy_ports_count: u64,
    /// Offset of the policy class bitmaps (`u64` words).
    pub policy_bits_off: u64,
    /// Number of policy bitmap words.
    pub policy_bits_count: u64,
    /// XXH3-64 (seed 0) of header bytes `0..312` (everything before this field).
    pub header_checksum: u64,
}

// The ABI, frozen at compile time: these numbers are the tables of
// docs/shm-abi.md.
const _: () = {
    assert!(size_of::<Header>() == HEADER_LEN);
    assert!(offset_of!(Header, magic) == 0);
    assert!(offset_of!(Header, abi_version) == 8);
    assert!(offset_of!(Header, header_len) == 12);
    assert!(offset_of!(Header, generation) == 16);
    assert!(offset_of!(Header, hash_seed) == 24);
    assert!(offset_of!(Header, hash_id) == 32);
    assert!(offset_of!(Header, frontend_record_len) == 36);
    assert!(offset_of!(Header, backend_record_len) == 40);
    assert!(offset_of!(Header, ring_slot_len) == 44);
    assert!(offset_of!(Header, file_len) == 48);
    assert!(offset_of!(Header, body_checksum) == 56);
    assert!(offset_of!(Header, frontends_off) == 64);
    assert!(offset_of!(Header, frontends_count) == 72);
    assert!(offset_of!(Header, backends_off) == 80);
    assert!(offset_of!(Header, backends_count) == 88);
    assert!(offset_of!(Header, ring_off) == 96);
    assert!(offset_of!(Header, ring_count) == 104);
    assert!(offset_of!(Header, prefix_record_len) == 112);
    assert!(offset_of!(Header, local_record_len) == 116);
    assert!(offset_of!(Header, source_ranges_off) == 120);
    assert!(offset_of!(Header, source_ranges_count) == 128);
    assert!(offset_of!(Header, locals_off) == 136);
    assert!(offset_of!(Header, locals_count) == 144);
    assert!(offset_of!(Header, node_prefixes_off) == 152);
    assert!(offset_of!(Header, node_prefixes_count) == 160);
    assert!(offset_of!(Header, node_port_prefixes_off) == 168);
    assert!(offset_of!(Header, node_port_prefixes_count) == 176);
    assert!(offset_of!(Header, name_offsets_off) == 184);
    assert!(offset_of!(Header, name_offsets_count) == 192);
    assert!(offset_of!(Header, names_off) == 200);
    assert!(offset_of!(Header, names_len) == 208);
    assert!(offset_of!(Header, policy_prefixes_off) == 216);
    assert!(offset_of!(Header, policy_prefixes_count) == 224);
    assert!(offset_of!(Header, policy_classes_off) == 232);
    assert!(offset_of!(Header, policy_classes_count) == 240);
    assert!(offset_of!(Header, policy_backends_off) == 248);
    assert!(offset_of!(Header, policy_backends_count) == 256);
    assert!(offset_of!(Header, policy_rules_off) == 264);
    assert!(offset_of!(Header, policy_rules_count) == 272);
    assert!(offset_of!(Header, policy_ports_off) == 280);
    assert!(offset_of!(Header, policy_ports_count) == 288);
    assert!(offset_of!(Header, policy_bits_off) == 296);
    assert!(offset_of!(Header, policy_bits_count) == 304);
    assert!(offset_of!(Header, header_checksum) == 312);

    assert!(size_of::<FrontendRecord>() == FRONTEND_RECORD_LEN);
    assert!(offset_of!(FrontendRecord, addr) == 0);
    assert!(offset_of!(FrontendRecord, port) == 16);
    assert!(offset_of!(FrontendRecord, proto) == 18);
    assert!(offset_of!(FrontendRecord, kind) == 19);
    assert!(offset_of!(FrontendRecord, flags) == 20);
    assert!(offset_of!(FrontendRecord, affinity_timeout_s) == 24);
    assert!(offset_of!(FrontendRecord, backends_start) == 28);
    assert!(offset_of!(FrontendRecord, backends_len) == 32);
    assert!(offset_of!(FrontendRecord, ring_start) == 36);
    assert!(offset_of!(FrontendRecord, ring_len) == 40);
    assert!(offset_of!(FrontendRecord, return_path) == 44);
    assert!(offset_of!(FrontendRecord, reserved) == 45);
    assert!(offset_of!(FrontendRecord, ranges_start) == 48);
    assert!(offset_of!(FrontendRecord, ranges_len) == 52);
    assert!(offset_of!(FrontendRecord, locals_start) == 56);
    assert!(offset_of!(FrontendRecord, locals_len) == 60);

    assert!(size_of::<BackendRecord>() == BACKEND_RECORD_LEN);
    assert!(offset_of!(BackendRecord, addr) == 0);
    assert!(offset_of!(BackendRecord, port) == 16);
    assert!(offset_of!(BackendRecord, state) == 18);
    assert!(offset_of!(BackendRecord, reserved) == 19);
    assert!(offset_of!(BackendRecord, weight) == 20);

    assert!(size_of::<PrefixRecord>() == PREFIX_RECORD_LEN);
    assert!(offset_of!(PrefixRecord, addr) == 0);
    assert!(offset_of!(PrefixRecord, len) == 16);
    assert!(offset_of!(PrefixRecord, reserved) == 17);
    assert!(offset_of!(PrefixRecord, node) == 20);

    assert!(size_of::<LocalRecord>() == LOCAL_RECORD_LEN);
    assert!(offset_of!(LocalRecord, node) == 0);
    assert!(offset_of!(LocalRecord, ring_start) == 4);
    assert!(offset_of!(LocalRecord, ring_len) == 8);
    assert!(offset_of!(LocalRecord, reserved) == 12);

    assert!(size_of::<PolicyClassRecord>() == POLICY_CLASS_RECORD_LEN);
    assert!(size_of::<PolicyBackendRecord>() == POLICY_BACKEND_RECORD_LEN);
    assert!(size_of::<PolicyRuleRecord>() == POLICY_RULE_RECORD_LEN);
    assert!(size_of::<PolicyPortRecord>() == POLICY_PORT_RECORD_LEN);
    assert!(size_of::<u64>() == POLICY_BITS_WORD_LEN);
    assert!(size_of::<u16>() == RING_SLOT_LEN);
    assert!(size_of::<u32>() == NAME_OFFSET_LEN);
    // Sections laid out back to back stay aligned.
    assert!((HEADER_LEN as u64).is_multiple_of(SECTION_ALIGN));
    assert!((FRONTEND_RECORD_LEN as u64).is_multiple_of(SECTION_ALIGN));
    assert!((BACKEND_RECORD_LEN as u64).is_multiple_of(SECTION_ALIGN));
    assert!((PREFIX_RECORD_LEN as u64).is_multiple_of(SECTION_ALIGN));
    assert!((LOCAL_RECORD_LEN as u64).is_multiple_of(SECTION_ALIGN));
};

/// Little-endian field access at fixed offsets. Every caller passes a buffer
/// whose length is a constant larger than `at + N` (a header, or one record of
/// a `chunks_exact`), so the slicing cannot fail.
fn get<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(get(b, at))
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(get(b, at))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(get(b, at))
}

impl Header {
    /// Reads the fields from their offsets, without any check.
    #[must_use]
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            magic: get(b, offset_of!(Self, magic)),
            abi_version: get_u32(b, offset_of!(Self, abi_version)),
            header_len: get_u32(b, offset_of!(Self, header_len)),
            generation: get_u64(b, offset_of!(Self, generation)),
            hash_seed: get_u64(b, offset_of!(Self, hash_seed)),
            hash_id: get_u32(b, offset_of!(Self, hash_id)),
            frontend_record_len: get_u32(b, offset_of!(Self, frontend_record_len)),
            backend_record_len: get_u32(b, offset_of!(Self, backend_record_len)),
            ring_slot_len: get_u32(b, offset_of!(Self, ring_slot_len)),
            file_len: get_u64(b, offset_of!(Self, file_len)),
            body_checksum: get_u64(b, offset_of!(Self, body_checksum)),
            frontends_off: get_u64(b, offset_of!(Self, frontends_off)),
            frontends_count: get_u64(b, offset_of!(Self, frontends_count)),
            backends_off: get_u64(b, offset_of!(Self, backends_off)),
            backends_count: get_u64(b, offset_of!(Self, backends_count)),
            ring_off: get_u64(b, offset_of!(Self, ring_off)),
            ring_count: get_u64(b, offset_of!(Self, ring_count)),
            prefix_record_len: get_u32(b, offset_of!(Self, prefix_record_len)),
            local_record_len: get_u32(b, offset_of!(Self, local_record_len)),
            source_ranges_off: get_u64(b, offset_of!(Self, source_ranges_off)),
            source_ranges_count: get_u64(b, offset_of!(Self, source_ranges_count)),
            locals_off: get_u64(b, offset_of!(Self, locals_off)),
            locals_count: get_u64(b, offset_of!(Self, locals_count)),
            node_prefixes_off: get_u64(b, offset_of!(Self, node_prefixes_off)),
            node_prefixes_count: get_u64(b, offset_of!(Self, node_prefixes_count)),
            node_port_prefixes_off: get_u64(b, offset_of!(Self, node_port_prefixes_off)),
            node_port_prefixes_count: get_u64(b, offset_of!(Self, node_port_prefixes_count)),
            name_offsets_off: get_u64(b, offset_of!(Self, name_offsets_off)),
            name_offsets_count: get_u64(b, offset_of!(Self, name_offsets_count)),
            names_off: get_u64(b, offset_of!(Self, names_off)),
            names_len: get_u64(b, offset_of!(Self, names_len)),
            policy_prefixes_off: get_u64(b, offset_of!(Self, policy_prefixes_off)),
            policy_prefixes_count: get_u64(b, offset_of!(Self, policy_prefixes_count)),
            policy_classes_off: get_u64(b, offset_of!(Self, policy_classes_off)),
            policy_classes_count: get_u64(b, offset_of!(Self, policy_classes_count)),
            policy_backends_off: get_u64(b, offset_of!(Self, policy_backends_off)),
            policy_backends_count: get_u64(b, offset_of!(Self, policy_backends_count)),
            policy_rules_off: get_u64(b, offset_of!(Self, policy_rules_off)),
            policy_rules_count: get_u64(b, offset_of!(Self, policy_rules_count)),
            policy_ports_off: get_u64(b, offset_of!(Self, policy_ports_off)),
            policy_ports_count: get_u64(b, offset_of!(Self, policy_ports_count)),
            policy_bits_off: get_u64(b, offset_of!(Self, policy_bits_off)),
            policy_bits_count: get_u64(b, offset_of!(Self, policy_bits_count)),
            header_checksum: get_u64(b, offset_of!(Self, header_checksum)),
        }
    }

    /// Writes the fields at their offsets, little-endian.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        put(&mut b, offset_of!(Self, magic), &self.magic);
        for (at, v) in [
            (offset_of!(Self, abi_version), self.abi_version),
            (offset_of!(Self, header_len), self.header_len),
            (offset_of!(Self, hash_id), self.hash_id),
            (
                offset_of!(Self, frontend_record_len),
                self.frontend_record_len,
            ),
            (
                offset_of!(Self, backend_record_len),
                self.backend_record_len,
            ),
            (offset_of!(Self, ring_slot_len), self.ring_slot_len),
            (offset_of!(Self, prefix_record_len), self.prefix_record_len),
            (offset_of!(Self, local_record_len), self.local_record_len),
        ] {
            put(&mut b, at, &v.to_le_bytes());
        }
        for (at, v) in [
            (offset_of!(Self, generation), self.generation),
            (offset_of!(Self, hash_seed), self.hash_seed),
            (offset_of!(Self, file_len), self.file_len),
            (offset_of!(Self, body_checksum), self.body_checksum),
            (offset_of!(Self, frontends_off), self.frontends_off),
            (offset_of!(Self, frontends_count), self.frontends_count),
            (offset_of!(Self, backends_off), self.backends_off),
            (offset_of!(Self, backends_count), self.backends_count),
            (offset_of!(Self, ring_off), self.ring_off),
            (offset_of!(Self, ring_count), self.ring_count),
            (offset_of!(Self, source_ranges_off), self.source_ranges_off),
            (
                offset_of!(Self, source_ranges_count),
                self.source_ranges_count,
            ),
            (offset_of!(Self, locals_off), self.locals_off),
            (offset_of!(Self, locals_count), self.locals_count),
            (offset_of!(Self, node_prefixes_off), self.node_prefixes_off),
            (
                offset_of!(Self, node_prefixes_count),
                self.node_prefixes_count,
            ),
            (
                offset_of!(Self, node_port_prefixes_off),
                self.node_port_prefixes_off,
            ),
            (
                offset_of!(Self, node_port_prefixes_count),
                self.node_port_prefixes_count,
            ),
            (offset_of!(Self, name_offsets_off), self.name_offsets_off),
            (
                offset_of!(Self, name_offsets_count),
                self.name_offsets_count,
            ),
            (offset_of!(Self, names_off), self.names_off),
            (offset_of!(Self, names_len), self.names_len),
            (
                offset_of!(Self, policy_prefixes_off),
                self.policy_prefixes_off,
            ),
            (
                offset_of!(Self, policy_prefixes_count),
                self.policy_prefixes_count,
            ),
            (
                offset_of!(Self, policy_classes_off),
                self.policy_classes_off,
            ),
            (
                offset_of!(Self, policy_classes_count),
                self.policy_classes_count,
            ),
            (
                offset_of!(Self, policy_backends_off),
                self.policy_backends_off,
            ),
            (
                offset_of!(Self, policy_backends_count),
                self.policy_backends_count,
            ),
            (offset_of!(Self, policy_rules_off), self.policy_rules_off),
            (
                offset_of!(Self, policy_rules_count),
                self.policy_rules_count,
            ),
            (offset_of!(Self, policy_ports_off), self.policy_ports_off),
            (
                offset_of!(Self, policy_ports_count),
                self.policy_ports_count,
            ),
            (offset_of!(Self, policy_bits_off), self.policy_bits_off),
            (offset_of!(Self, policy_bits_count), self.policy_bits_count),
            (offset_of!(Self, header_checksum), self.header_checksum),
        ] {
            put(&mut b, at, &v.to_le_bytes());
        }
        b
    }

    /// The header checksum these fields call for: XXH3-64 (seed 0) of the
    /// encoded bytes before `header_checksum`.
    #[must_use]
    pub fn compute_checksum(&self) -> u64 {
        xxh3_64(&self.to_bytes()[..offset_of!(Self, header_checksum)])
    }

    /// Reads and checks the header at the start of `bytes`: length, magic,
    /// version, header checksum, and the fixed fields (header and record
    /// lengths, hash function). Lengths and offsets against the
    /// file are [`decode`]'s business.
    ///
    /// # Errors
    /// The first check that fails, in the order above (magic and version are
    /// looked at as soon as their bytes are there, so a foreign file is named
    /// as such even when it is short).
    pub fn parse(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let len = bytes.len() as u64;
        let truncated = || SnapshotError::Truncated {
            len,
            need: HEADER_LEN as u64,
        };
        let magic: [u8; 8] = get(bytes.get(..8).ok_or_else(truncated)?, 0);
        if magic != MAGIC {
            return Err(SnapshotError::BadMagic { found: magic });
        }
        let version = get_u32(bytes.get(8..12).ok_or_else(truncated)?, 0);
        if version != ABI_VERSION {
            return Err(SnapshotError::Version {
                found: version,
                expected: ABI_VERSION,
            });
        }
        let raw: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .ok_or_else(truncated)?
            .try_into()
            .map_err(|_| truncated())?;
        let h = Self::from_bytes(raw);
        let computed = h.compute_checksum();
        if computed != h.header_checksum {
            return Err(SnapshotError::HeaderChecksum {
                computed,
                expected: h.header_checksum,
            });
        }
        let fixed: [(&'static str, u64, u64); 6] = [
            ("header_len", h.header_len.into(), HEADER_LEN as u64),
            (
                "frontend_record_len",
                h.frontend_record_len.into(),
                FRONTEND_RECORD_LEN as u64,
            ),
            (
                "backend_record_len",
                h.backend_record_len.into(),
                BACKEND_RECORD_LEN as u64,
            ),
            (
                "ring_slot_len",
                h.ring_slot_len.into(),
                RING_SLOT_LEN as u64,
            ),
            (
                "prefix_record_len",
                h.prefix_record_len.into(),
                PREFIX_RECORD_LEN as u64,
            ),
            (
                "local_record_len",
                h.local_record_len.into(),
                LOCAL_RECORD_LEN as u64,
            ),
        ];
        if let Some(&(field, value, expected)) = fixed.iter().find(|(_, v, e)| v != e) {
            return Err(SnapshotError::BadHeader {
                field,
                value,
                expected,
            });
        }
        if h.hash_id != HASH_XXH3_64 {
            return Err(SnapshotError::UnknownHash { id: h.hash_id });
        }
        Ok(h)
    }
}

/// Why a snapshot (or the pointer to it) was refused.
///
/// Each message says what failed with which values; [`SnapshotError::label`]
/// gives the snake_case fault name used for counters.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Too short to hold a header.
    #[error("truncated: {len} bytes, header needs {need}")]
    Truncated {
        /// Bytes present.
        len: u64,
        /// Bytes needed.
        need: u64,
    },
    /// Shorter than the header says (a half-written or cut file).
    #[error("truncated: {len} bytes, header says the file has {file_len}")]
    ShortFile {
        /// Bytes present.
        len: u64,
        /// `file_len` from the header.
        file_len: u64,
    },
    /// Longer than the header says.
    #[error("file has {len} bytes, header says {file_len}")]
    LongFile {
        /// Bytes present.
        len: u64,
        /// `file_len` from the header.
        file_len: u64,
    },
    /// Larger than any snapshot a reader accepts.
    #[error("file has {len} bytes, more than the {max} a snapshot may have")]
    TooLarge {
        /// Bytes present.
        len: u64,
        /// [`MAX_FILE_LEN`].
        max: u64,
    },
    /// Not a clustergate snapshot.
    #[error("magic {found:02x?}, expected {:02x?}", MAGIC)]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// A snapshot of another ABI version.
    #[error("ABI version {found}, expected {expected}")]
    Version {
        /// Version in the file.
        found: u32,
        /// [`ABI_VERSION`].
        expected: u32,
    },
    /// The header checksum does not match the header.
    #[error("header checksum {computed:#018x} does not match header {expected:#018x}")]
    HeaderChecksum {
        /// Checksum of the header bytes as read.
        computed: u64,
        /// `header_checksum` from the header.
        expected: u64,
    },
    /// A fixed header field holds another value than this version's.
    #[error("header field {field} is {value}, expected {expected}")]
    BadHeader {
        /// Field name.
        field: &'static str,
        /// Value in the file.
        value: u64,
        /// Value this version writes.
        expected: u64,
    },
    /// A flow-hash function this reader does not know.
    #[error("flow hash function {id} is unknown (known: {HASH_XXH3_64} = XXH3-64)")]
    UnknownHash {
        /// `hash_id` from the header.
        id: u32,
    },
    /// A section lies (partly) outside the body.
    #[error("{section} section {start}..{end} lies outside the body {body_start}..{file_len}")]
    SectionBounds {
        /// `frontends`, `backends`, `ring`, `source_ranges`, `locals`,
        /// `node_prefixes`, `node_port_prefixes`, `name_offsets` or `names`.
        section: &'static str,
        /// First byte.
        start: u128,
        /// One past the last byte.
        end: u128,
        /// Where the body starts ([`HEADER_LEN`]).
        body_start: u64,
        /// File length.
        file_len: u64,
    },
    /// A section does not start at a multiple of [`SECTION_ALIGN`].
    #[error("{section} section at offset {offset} is not {SECTION_ALIGN}-byte aligned")]
    SectionAlignment {
        /// The section's name (as in [`SnapshotError::SectionBounds`]).
        section: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// Two sections share bytes.
    #[error("{first} section {first_start}..{first_end} overlaps {second} section {second_start}..{second_end}")]
    SectionOverlap {
        /// One section.
        first: &'static str,
        /// Its first byte.
        first_start: u64,
        /// One past its last byte.
        first_end: u64,
        /// The other section.
        second: &'static str,
        /// Its first byte.
        second_start: u64,
        /// One past its last byte.
        second_end: u64,
    },
    /// The body does not match its checksum (corruption).
    #[error("body checksum {computed:#018x} does not match header {expected:#018x}")]
    BodyChecksum {
        /// Checksum of the body as read.
        computed: u64,
        /// `body_checksum` from the header.
        expected: u64,
    },
    /// A record holds a value this version does not define.
    #[error("{section} record #{index}: {what}")]
    BadRecord {
        /// `frontends`, `backends`, `source_ranges`, `locals`,
        /// `node_prefixes` or `node_port_prefixes`.
        section: &'static str,
        /// Index in its array.
        index: u64,
        /// What is wrong.
        what: String,
    },
    /// The records are well-formed but do not make a valid table.
    #[error("table validation: {0}")]
    Invalid(#[from] TableError),
    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The path is not a regular file.
    #[error("{}: not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The `current` pointer does not hold a generation.
    #[error("{}: does not name a generation: {content:?}", path.display())]
    BadPointer {
        /// The pointer file.
        path: PathBuf,
        /// Its content (at most the first 64 bytes, lossily decoded).
        content: String,
    },
    /// A generation that is not newer than the current one.
    #[error("generation {generation} is not newer than generation {current}")]
    Stale {
        /// The generation offered.
        generation: u64,
        /// The generation already in use (published, or in the handle).
        current: u64,
    },
    /// The file `current` names holds another generation.
    #[error("`current` names generation {named} but the file holds generation {found}")]
    GenerationMismatch {
        /// Generation named by `current` (and the file name).
        named: u64,
        /// Generation in the file's header.
        found: u64,
    },
    /// A delta file's own header or keys are wrong ([`crate::delta`]).
    #[error("delta: {what}")]
    BadDelta {
        /// What is wrong.
        what: String,
    },
    /// A delta that does not apply to the table it leads from.
    #[error("delta: {0}")]
    Delta(#[from] crate::table::DeltaError),
    /// A fault found in a file, with the file's path.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// The fault.
        source: Box<SnapshotError>,
    },
}

/// Every value [`SnapshotError::label`] returns, for registering counters.
pub const FAULT_LABELS: [&str; 21] = [
    "truncated",
    "length_mismatch",
    "too_large",
    "bad_magic",
    "abi_version",
    "header_checksum",
    "bad_header",
    "hash_function",
    "section_bounds",
    "section_alignment",
    "section_overlap",
    "body_checksum",
    "bad_record",
    "invalid_table",
    "io",
    "missing_file",
    "not_a_file",
    "bad_pointer",
    "stale_generation",
    "generation_mismatch",
    "bad_delta",
];

impl SnapshotError {
    /// The fault as a snake_case name for counters (one of [`FAULT_LABELS`]).
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Truncated { .. } | Self::ShortFile { .. } => "truncated",
            Self::LongFile { .. } => "length_mismatch",
            Self::TooLarge { .. } => "too_large",
            Self::BadMagic { .. } => "bad_magic",
            Self::Version { .. } => "abi_version",
            Self::HeaderChecksum { .. } => "header_checksum",
            Self::BadHeader { .. } => "bad_header",
            Self::UnknownHash { .. } => "hash_function",
            Self::SectionBounds { .. } => "section_bounds",
            Self::SectionAlignment { .. } => "section_alignment",
            Self::SectionOverlap { .. } => "section_overlap",
            Self::BodyChecksum { .. } => "body_checksum",
            Self::BadRecord { .. } => "bad_record",
            Self::Invalid(_) => "invalid_table",
            Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => "missing_file",
            Self::Io { .. } => "io",
            Self::NotAFile { .. } => "not_a_file",
            Self::BadPointer { .. } => "bad_pointer",
            Self::Stale { .. } => "stale_generation",
            Self::GenerationMismatch { .. } => "generation_mismatch",
            Self::BadDelta { .. } | Self::Delta(_) => "bad_delta",
            Self::InFile { source, .. } => source.label(),
        }
    }

    /// The fault itself, without the [`SnapshotError::InFile`] wrapper.
    #[must_use]
    pub fn fault(&self) -> &Self {
        match self {
            Self::InFile { source, .. } => source.fault(),
            other => other,
        }
    }

    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (Self::Io { .. } | Self::NotAFile { .. } | Self::BadPointer { .. }) => e,
            e @ Self::InFile { .. } => e,
            e => Self::InFile {
                path: path.to_owned(),
                source: Box::new(e),
            },
        }
    }
}

/// XXH3-64 (seed 0) of a snapshot body: the checksum in the header.
#[must_use]
pub fn body_checksum(body: &[u8]) -> u64 {
    xxh3_64(body)
}

/// One body section, as the header places it.
#[derive(Clone, Copy)]
struct Section {
    name: &'static str,
    start: u64,
    end: u64,
}

fn section(
    name: &'static str,
    off: u64,
    count: u64,
    record_len: usize,
    file_len: u64,
) -> Result<Section, SnapshotError> {
    let end = u128::from(off) + u128::from(count) * record_len as u128;
    if off < HEADER_LEN as u64 || end > u128::from(file_len) {
        return Err(SnapshotError::SectionBounds {
            section: name,
            start: off.into(),
            end,
            body_start: HEADER_LEN as u64,
            file_len,
        });
    }
    if !off.is_multiple_of(SECTION_ALIGN) {
        return Err(SnapshotError::SectionAlignment {
            section: name,
            offset: off,
        });
    }
    // end <= file_len, a u64.
    Ok(Section {
        name,
        start: off,
        end: end as u64,
    })
}

/// Decodes the prefix records of section `name`, refusing set reserved bytes.
fn get_prefixes(name: &'static str, bytes: &[u8]) -> Result<Vec<PrefixRecord>, SnapshotError> {
    let mut v = Vec::with_capacity(bytes.len() / PREFIX_RECORD_LEN);
    for (i, c) in bytes.chunks_exact(PREFIX_RECORD_LEN).enumerate() {
        let p = PrefixRecord {
            addr: get(c, offset_of!(PrefixRecord, addr)),
            len: c[offset_of!(PrefixRecord, len)],
            reserved: get(c, offset_of!(PrefixRecord, reserved)),
            node: get_u32(c, offset_of!(PrefixRecord, node)),
        };
        if p.reserved != [0; 3] {
            return Err(SnapshotError::BadRecord {
                section: name,
                index: i as u64,
                what: format!("reserved is {:?}, expected zeros", p.reserved),
            });
        }
        v.push(p);
    }
    Ok(v)
}

/// Decodes and validates a snapshot image: header ([`Header::parse`]), file
/// length, section bounds, alignment and overlap, body checksum, reserved
/// fields and flags, then every index, prefix and name through
/// [`Table::assemble`].
///
/// Never panics, whatever the bytes; allocates at most in proportion to
/// `bytes.len()`.
///
/// # Errors
/// The first fault found, in the order above.
pub fn decode(bytes: &[u8]) -> Result<Table, SnapshotError> {
    let h = Header::parse(bytes)?;
    let len = bytes.len() as u64;
    if len < h.file_len {
        return Err(SnapshotError::ShortFile {
            len,
            file_len: h.file_len,
        });
    }
    if len > h.file_len {
        return Err(SnapshotError::LongFile {
            len,
            file_len: h.file_len,
        });
    }
    let sections = [
        section(
            "frontends",
            h.frontends_off,
            h.frontends_count,
            FRONTEND_RECORD_LEN,
            len,
        )?,
        section(
            "backends",
            h.backends_off,
            h.backends_count,
            BACKEND_RECORD_LEN,
            len,
        )?,
        section("ring", h.ring_off, h.ring_count, RING_SLOT_LEN, len)?,
        section(
            "source_ranges",
            h.source_ranges_off,
            h.source_ranges_count,
            PREFIX_RECORD_LEN,
            len,
        )?,
        section(
            "locals",
            h.locals_off,
            h.locals_count,
            LOCAL_RECORD_LEN,
            len,
        )?,
        section(
            "node_prefixes",
            h.node_prefixes_off,
            h.node_prefixes_count,
            PREFIX_RECORD_LEN,
            len,
        )?,
        section(
            "node_port_prefixes",
            h.node_port_prefixes_off,
            h.node_port_prefixes_count,
            PREFIX_RECORD_LEN,
            len,
        )?,
        section(
            "name_offsets",
            h.name_offsets_off,
            h.name_offsets_count,
            NAME_OFFSET_LEN,
            len,
        )?,
        section("names", h.names_off, h.names_len, 1, len)?,
        section(
            "policy_prefixes",
            h.policy_prefixes_off,
            h.policy_prefixes_count,
            PREFIX_RECORD_LEN,
            len,
        )?,
        section(
            "policy_classes",
            h.policy_classes_off,
            h.policy_classes_count,
            POLICY_CLASS_RECORD_LEN,
            len,
        )?,
        section(
            "policy_backends",
            h.policy_backends_off,
            h.policy_backends_count,
            POLICY_BACKEND_RECORD_LEN,
            len,
        )?,
        section(
            "policy_rules",
            h.policy_rules_off,
            h.policy_rules_count,
            POLICY_RULE_RECORD_LEN,
            len,
        )?,
        section(
            "policy_ports",
            h.policy_ports_off,
            h.policy_ports_count,
            POLICY_PORT_RECORD_LEN,
            len,
        )?,
        section(
            "policy_bits",
            h.policy_bits_off,
            h.policy_bits_count,
            POLICY_BITS_WORD_LEN,
            len,
        )?,
    ];
    for (i, a) in sections.iter().enumerate() {
        for b in &sections[i + 1..] {
            if a.start < a.end && b.start < b.end && a.start < b.end && b.start < a.end {
                return Err(SnapshotError::SectionOverlap {
                    first: a.name,
                    first_start: a.start,
                    first_end: a.end,
                    second: b.name,
                    second_start: b.start,
                    second_end: b.end,
                });
            }
        }
    }
    let computed = body_checksum(&bytes[HEADER_LEN..]);
    if computed != h.body_checksum {
        return Err(SnapshotError::BodyChecksum {
            computed,
            expected: h.body_checksum,
        });
    }
    // In bounds: checked above against len == bytes.len().
    let [fs, bs, rs, gs, ls, ns, ps, os, names, pps, pcs, pbs, prs, pts, pws] =
        sections.map(|s| &bytes[s.start as usize..s.end as usize]);

    let mut frontends = Vec::with_capacity(fs.len() / FRONTEND_RECORD_LEN);
    for (i, c) in fs.chunks_exact(FRONTEND_RECORD_LEN).enumerate() {
        let f = FrontendRecord {
            addr: get(c, offset_of!(FrontendRecord, addr)),
            port: get_u16(c, offset_of!(FrontendRecord, port)),
            proto: c[offset_of!(FrontendRecord, proto)],
            kind: c[offset_of!(FrontendRecord, kind)],
            flags: get_u32(c, offset_of!(FrontendRecord, flags)),
            affinity_timeout_s: get_u32(c, offset_of!(FrontendRecord, affinity_timeout_s)),
            backends_start: get_u32(c, offset_of!(FrontendRecord, backends_start)),
            backends_len: get_u32(c, offset_of!(FrontendRecord, backends_len)),
            ring_start: get_u32(c, offset_of!(FrontendRecord, ring_start)),
            ring_len: get_u32(c, offset_of!(FrontendRecord, ring_len)),
            return_path: c[offset_of!(FrontendRecord, return_path)],
            reserved: get(c, offset_of!(FrontendRecord, reserved)),
            ranges_start: get_u32(c, offset_of!(FrontendRecord, ranges_start)),
            ranges_len: get_u32(c, offset_of!(FrontendRecord, ranges_len)),
            locals_start: get_u32(c, offset_of!(FrontendRecord, locals_start)),
            locals_len: get_u32(c, offset_of!(FrontendRecord, locals_len)),
        };
        let bad = |what: String| SnapshotError::BadRecord {
            section: "frontends",
            index: i as u64,
            what,
        };
        if f.flags & !FRONTEND_FLAGS != 0 {
            return Err(bad(format!("unknown flags {:#x}", f.flags)));
        }
        if f.reserved != [0; 3] {
            return Err(bad(format!("reserved is {:?}, expected zeros", f.reserved)));
        }
        frontends.push(f);
    }
    let mut backends = Vec::with_capacity(bs.len() / BACKEND_RECORD_LEN);
    for (i, c) in bs.chunks_exact(BACKEND_RECORD_LEN).enumerate() {
        let b = BackendRecord {
            addr: get(c, offset_of!(BackendRecord, addr)),
            port: get_u16(c, offset_of!(BackendRecord, port)),
            state: c[offset_of!(BackendRecord, state)],
            reserved: c[offset_of!(BackendRecord, reserved)],
            weight: get_u32(c, offset_of!(BackendRecord, weight)),
        };
        if b.reserved != 0 {
            return Err(SnapshotError::BadRecord {
                section: "backends",
                index: i as u64,
                what: format!("reserved is {}, expected 0", b.reserved),
            });
        }
        backends.push(b);
    }
    let ring: Vec<u16> = rs
        .chunks_exact(RING_SLOT_LEN)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let source_ranges = get_prefixes("source_ranges", gs)?;
    let mut locals = Vec::with_capacity(ls.len() / LOCAL_RECORD_LEN);
    for (i, c) in ls.chunks_exact(LOCAL_RECORD_LEN).enumerate() {
        let l = LocalRecord {
            node: get_u32(c, offset_of!(LocalRecord, node)),
            ring_start: get_u32(c, offset_of!(LocalRecord, ring_start)),
            ring_len: get_u32(c, offset_of!(LocalRecord, ring_len)),
            reserved: get_u32(c, offset_of!(LocalRecord, reserved)),
        };
        if l.reserved != 0 {
            return Err(SnapshotError::BadRecord {
                section: "locals",
                index: i as u64,
                what: format!("reserved is {}, expected 0", l.reserved),
            });
        }
        locals.push(l);
    }
    let node_prefixes = get_prefixes("node_prefixes", ns)?;
    let node_port_prefixes = get_prefixes("node_port_prefixes", ps)?;
    let name_offsets: Vec<u32> = os
        .chunks_exact(NAME_OFFSET_LEN)
        .map(|c| get_u32(c, 0))
        .collect();
    let policy = PolicyParts {
        prefixes: get_prefixes("policy_prefixes", pps)?,
        classes: pcs
            .chunks_exact(POLICY_CLASS_RECORD_LEN)
            .map(|c| PolicyClassRecord {
                flags: get_u32(c, offset_of!(PolicyClassRecord, flags)),
                rules_start: get_u32(c, offset_of!(PolicyClassRecord, rules_start)),
                rules_len: get_u32(c, offset_of!(PolicyClassRecord, rules_len)),
                reserved: get_u32(c, offset_of!(PolicyClassRecord, reserved)),
            })
            .collect(),
        backends: pbs
            .chunks_exact(POLICY_BACKEND_RECORD_LEN)
            .map(|c| PolicyBackendRecord {
                addr: get(c, offset_of!(PolicyBackendRecord, addr)),
                rules_start: get_u32(c, offset_of!(PolicyBackendRecord, rules_start)),
                rules_len: get_u32(c, offset_of!(PolicyBackendRecord, rules_len)),
                flags: get_u32(c, offset_of!(PolicyBackendRecord, flags)),
                class: get_u32(c, offset_of!(PolicyBackendRecord, class)),
            })
            .collect(),
        rules: prs
            .chunks_exact(POLICY_RULE_RECORD_LEN)
            .map(|c| PolicyRuleRecord {
                bits_start: get_u32(c, offset_of!(PolicyRuleRecord, bits_start)),
                ports_start: get_u32(c, offset_of!(PolicyRuleRecord, ports_start)),
                ports_len: get_u32(c, offset_of!(PolicyRuleRecord, ports_len)),
                reserved: get_u32(c, offset_of!(PolicyRuleRecord, reserved)),
            })
            .collect(),
        ports: pts
            .chunks_exact(POLICY_PORT_RECORD_LEN)
            .map(|c| PolicyPortRecord {
                lo: get_u16(c, offset_of!(PolicyPortRecord, lo)),
                hi: get_u16(c, offset_of!(PolicyPortRecord, hi)),
                proto: c[offset_of!(PolicyPortRecord, proto)],
                reserved: get(c, offset_of!(PolicyPortRecord, reserved)),
            })
            .collect(),
        bits: pws
            .chunks_exact(POLICY_BITS_WORD_LEN)
            .map(|c| get_u64(c, 0))
            .collect(),
    };
    Ok(Table::assemble(
        h.generation,
        h.hash_seed,
        TableParts {
            frontends,
            backends,
            ring,
            source_ranges,
            locals,
            node_prefixes,
            node_port_prefixes,
            name_offsets,
            names: names.to_vec(),
            policy,
        },
    )?)
}

/// Path of the snapshot file of `generation` in `dir`:
/// `gen-{generation:020}.snap`.
#[must_use]
pub fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("gen-{generation:020}.snap"))
}

/// The generation a snapshot file name stands for, if it is one.
#[must_use]
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("gen-")?.strip_suffix(".snap")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The generation `dir/current` names: `None` when nothing was published
/// yet (no `current`).
///
/// # Errors
/// [`SnapshotError::BadPointer`] unless the file holds ASCII decimal digits
/// (a generation ≥ 1) and at most one trailing newline;
/// [`SnapshotError::Io`] when it cannot be read.
pub fn read_current(dir: &Path) -> Result<Option<u64>, SnapshotError> {
    let path = dir.join(CURRENT);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path)(e)),
    };
    let mut raw = Vec::new();
    file.take(MAX_POINTER_LEN)
        .read_to_end(&mut raw)
        .map_err(io_error(&path))?;
    let digits = raw.strip_suffix(b"\n").unwrap_or(&raw);
    let generation = std::str::from_utf8(digits)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&g| g > 0);
    match generation {
        Some(g) => Ok(Some(g)),
        None => Err(SnapshotError::BadPointer {
            path,
            content: String::from_utf8_lossy(&raw).into_owned(),
        }),
    }
}

/// Maps a snapshot file read-only.
///
/// The caller has checked that `file` is a regular file.
#[allow(unsafe_code)] // reason: memmap2's `Mmap::map` is `unsafe`; soundness argued below.
fn map_read_only(file: &File) -> io::Result<Mmap> {
    // SAFETY: `Mmap::map` is unsafe because the mapped bytes can change (or
    // vanish) underneath the slice if another process writes or truncates the
    // file. Published snapshot files are immutable: the writer creates each
    // under a temporary name, writes it completely, fsyncs it and only then
    // renames it into place (mode 0444); it never opens a published file for
    // writing, and pruning only unlinks files, which leaves existing mappings
    // intact. The map is private to `load_file`, which reads from it only
    // through the bounds-checked slice (`Mmap` derefs to exactly the file
    // length it saw at mapping time, and `decode` checks every offset against
    // that length), copies the records out into a `Table`, and drops the map
    // before returning. The remaining risk is SIGBUS if someone else truncates
    // a published file while it is mapped; the writer never does, and the
    // directory belongs to clustergate.
    unsafe { Mmap::map(file) }
}

/// Maps a snapshot file read-only, validates it ([`decode`]) and copies it
/// into a [`Table`]; the mapping is gone when this returns.
///
/// # Errors
/// [`SnapshotError::Io`] (the path, and `missing_file` when it does not
/// exist), [`SnapshotError::NotAFile`], or the decoding fault wrapped in
/// [`SnapshotError::InFile`] with the path.
pub fn load_file(path: &Path) -> Result<Table, SnapshotError> {
    let file = File::open(path).map_err(io_error(path))?;
    let meta = file.metadata().map_err(io_error(path))?;
    if !meta.is_file() {
        return Err(SnapshotError::NotAFile {
            path: path.to_owned(),
        });
    }
    let len = meta.len();
    if len > MAX_FILE_LEN {
        return Err(SnapshotError::TooLarge {
            len,
            max: MAX_FILE_LEN,
        }
        .in_file(path));
    }
    if len < HEADER_LEN as u64 {
        // Too short to be valid: read what there is to name the fault.
        let mut raw = Vec::new();
        (&file)
            .take(HEADER_LEN as u64)
            .read_to_end(&mut raw)
            .map_err(io_error(path))?;
        return decode(&raw).map_err(|e| e.in_file(path));
    }
    let map = map_read_only(&file).map_err(io_error(path))?;
    let table = decode(&map).map_err(|e| e.in_file(path));
    drop(map);
    table
}

/// Loads the snapshot `dir/current` names: `None` when nothing was
/// published yet.
///
/// # Errors
/// As [`read_current`] and [`load_file`], and
/// [`SnapshotError::GenerationMismatch`] when the file holds another
/// generation than its name.
pub fn load_current(dir: &Path) -> Result<Option<Table>, SnapshotError> {
    match read_current(dir)? {
        None => Ok(None),
        // A full snapshot of that generation, or the newest full one before
        // it and the deltas after it.
        Some(g) => crate::delta::load_chain(dir, g, None).map(|r| Some(r.table)),
    }
}

/// The current table, shared by all workers: an [`ArcSwap`] (arc-swap's
/// lock-free equivalent of an epoch-protected pointer).
///
/// A worker calls [`TableHandle::load`] once per batch and uses that table
/// for the whole batch: it sees the old table or the new one, never a mix.
/// Loading neither locks nor allocates.
#[derive(Debug)]
pub struct TableHandle {
    current: ArcSwap<Table>,
}

impl Default for TableHandle {
    /// Holds `Table::empty(0)`: nothing published yet.
    fn default() -> Self {
        Self::new(Table::empty(0))
    }
}

impl TableHandle {
    /// A handle holding `table`.
    #[must_use]
    pub fn new(table: Table) -> Self {
        Self {
            current: ArcSwap::from_pointee(table),
        }
    }

    /// The current table, for one batch (cheap; keep it no longer than a
    /// batch, or use [`TableHandle::load_full`]).
    #[inline]
    #[must_use]
    pub fn load(&self) -> Guard<Arc<Table>> {
        self.current.load()
    }

    /// The current table as an owned `Arc` (for long-lived holders).
    #[must_use]
    pub fn load_full(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// Replaces the table; later loads see the new one.
    pub fn store(&self, table: Arc<Table>) {
        self.current.store(table);
    }

    /// Replaces the table and returns the previous one.
    pub fn swap(&self, table: Arc<Table>) -> Arc<Table> {
        self.current.swap(table)
    }

    /// Generation of the current table (0: nothing yet).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.current.load().generation()
    }
}

/// What a [`Watcher::poll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    /// No `current` in the directory: nothing published yet.
    NothingPublished,
    /// `current` names the generation the handle holds.
    Unchanged,
    /// A newer generation was validated and stored in the handle.
    Applied {
        /// Its generation.
        generation: u64,
    },
    /// The snapshot (or the pointer) was refused; the handle keeps its table.
    Refused {
        /// [`SnapshotError::label`] of the fault.
        fault: &'static str,
        /// The same refusal as the previous poll's (logged and counted once).
        repeated: bool,
    },
}

/// Counters of a [`Watcher`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Snapshots applied.
    pub applied: u64,
    /// Snapshots (or pointers) refused; a refusal that repeats poll after
    /// poll counts once.
    pub refused: u64,
    /// Refusals per fault label ([`FAULT_LABELS`]).
    pub refused_by_fault: BTreeMap<&'static str, u64>,
    /// The message of the latest refusal.
    pub last_refusal: Option<String>,
    /// Generation of the table in the handle.
    pub generation: u64,
    /// Deltas applied (each a change to some frontends only).
    pub deltas: u64,
}

/// Polls a snapshot directory and swaps newer generations into a
/// [`TableHandle`] (the dataplane's side). The watcher must be the only
/// writer of its handle.
///
/// Each [`Watcher::poll`] reads `current`; when it names a generation above
/// the handle's, the file is mapped, validated and stored. A fault is logged
/// (`tracing::warn!`, naming the file and the fault) and counted in
/// [`Watcher::stats`], and the handle keeps its table; generations never go
/// backwards. Polling at start-up maps the current snapshot.
#[derive(Debug)]
pub struct Watcher {
    dir: PathBuf,
    handle: Arc<TableHandle>,
    /// Message of the refusal of the previous poll (to log and count once).
    last_fault: Option<String>,
    /// Tables swapped out that a worker may still hold: kept here until only
    /// this list holds them, so they are freed on the watcher's thread rather
    /// than on a worker's.
    retired: Vec<Arc<Table>>,
    /// Counters.
    pub stats: SnapshotStats,
}

impl Watcher {
    /// A watcher of `dir` feeding `handle`.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, handle: Arc<TableHandle>) -> Self {
        let generation = handle.generation();
        Self {
            dir: dir.into(),
            handle,
            last_fault: None,
            retired: Vec::new(),
            stats: SnapshotStats {
                generation,
                ..SnapshotStats::default()
            },
        }
    }

    /// The directory watched.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The handle fed.
    #[must_use]
    pub fn handle(&self) -> &Arc<TableHandle> {
        &self.handle
    }

    /// Checks `current` once and applies a newer generation if it is valid.
    pub fn poll(&mut self) -> PollOutcome {
        self.retired.retain(|t| Arc::strong_count(t) > 1);
        let mut retried = false;
        loop {
            let have = self.handle.generation();
            let named = match read_current(&self.dir) {
                Ok(None) => {
                    self.last_fault = None;
                    return PollOutcome::NothingPublished;
                }
                Ok(Some(g)) => g,
                Err(e) => return self.refuse(have, &e),
            };
            if named == have {
                self.last_fault = None;
                return PollOutcome::Unchanged;
            }
            if named < have {
                let e = SnapshotError::Stale {
                    generation: named,
                    current: have,
                }
                .in_file(&self.dir.join(CURRENT));
                return self.refuse(have, &e);
            }
            let started = std::time::Instant::now();
            let current = self.handle.load_full();
            let have_table = (have > 0).then_some(&*current);
            match crate::delta::load_chain(&self.dir, named, have_table) {
                Ok(reached) => {
                    let mut table = reached.table;
                    if reached.full {
                        table.adopt_unchanged(&current);
                    }
                    drop(current);
                    self.stats.deltas += reached.deltas as u64;
                    let old = self.handle.swap(Arc::new(table));
                    if Arc::strong_count(&old) > 1 {
                        self.retired.push(old);
                    }
                    self.last_fault = None;
                    self.stats.applied += 1;
                    self.stats.generation = named;
                    tracing::info!(
                        generation = named,
                        previous = have,
                        deltas = reached.deltas,
                        full = reached.full,
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        dir = %self.dir.display(),
                        "snapshot applied"
                    );
                    return PollOutcome::Applied { generation: named };
                }
                // The writer may have moved `current` on and pruned this
                // file between our two reads: look again once.
                Err(e) if e.label() == "missing_file" && !retried => retried = true,
                Err(e) => return self.refuse(have, &e),
            }
        }
    }

    fn refuse(&mut self, have: u64, e: &SnapshotError) -> PollOutcome {
        let fault = e.label();
        let message = e.to_string();
        let repeated = self.last_fault.as_deref() == Some(message.as_str());
        if !repeated {
            tracing::warn!(
                fault,
                dir = %self.dir.display(),
                keeping = have,
                "snapshot refused, keeping generation {have}: {message}"
            );
            self.stats.refused += 1;
            *self.stats.refused_by_fault.entry(fault).or_insert(0) += 1;
            self.stats.last_refusal = Some(message.clone());
            self.last_fault = Some(message);
        }
        PollOutcome::Refused { fault, repeated }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose

    use super::*;

    #[test]
    fn labels_are_listed() {
        let errors = [
            SnapshotError::Truncated { len: 1, need: 128 },
            SnapshotError::ShortFile {
                len: 1,
                file_len: 2,
            },
            SnapshotError::LongFile {
                len: 2,
                file_len: 1,
            },
            SnapshotError::Io {
                path: PathBuf::from("x"),
                source: io::ErrorKind::NotFound.into(),
            },
            SnapshotError::Io {
                path: PathBuf::from("x"),
                source: io::ErrorKind::PermissionDenied.into(),
            },
            SnapshotError::Stale {
                generation: 1,
                current: 2,
            },
        ];
        for e in &errors {
            assert!(FAULT_LABELS.contains(&e.label()), "{e}");
        }
        assert_eq!(errors[3].label(), "missing_file");
        assert_eq!(errors[4].label(), "io");
        let wrapped = SnapshotError::Truncated { len: 10, need: 128 }.in_file(Path::new("/x/gen"));
        assert_eq!(wrapped.label(), "truncated");
        assert_eq!(
            wrapped.to_string(),
            "/x/gen: truncated: 10 bytes, header needs 128"
        );
        assert!(matches!(wrapped.fault(), SnapshotError::Truncated { .. }));
    }

    #[test]
    fn snapshot_names_parse_back() {
        let p = snapshot_path(Path::new("/d"), 42);
        assert_eq!(p, Path::new("/d/gen-00000000000000000042.snap"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_snapshot_name(name), Some(42));
        assert_eq!(parse_snapshot_name("gen-42.snap"), None);
        assert_eq!(
            parse_snapshot_name(".gen-00000000000000000042.snap.tmp"),
            None
        );
        assert_eq!(parse_snapshot_name("gen-0000000000000000004x.snap"), None);
    }
}
