//! Table snapshots in shared memory: the ABI, the writer (control) and the
//! reader (dataplane).
//!
//! Owns: the snapshot file format ([`Header`] followed by the flat
//! [`FrontendRecord`], [`BackendRecord`] and ring-slot arrays, little-endian;
//! `docs/shm-abi.md` is its reference), [`encode`] and [`decode`], the
//! publish protocol ([`Writer`]: one file per generation, written under a
//! temporary name, fsynced and renamed, then named by the `current` pointer
//! file), and the hand-over to the workers ([`TableHandle`], an
//! [`arc_swap::ArcSwap`]; [`Watcher`] polls the directory and swaps new
//! generations in).
//!
//! Must never: use a snapshot before every byte of it has been validated
//! (magic, ABI version, header checksum, lengths, offsets, body checksum, then
//! every index through [`Table::from_parts`]); reinterpret bytes as structs
//! (each field is decoded with `from_le_bytes`); go back to an older
//! generation; or let a refused snapshot replace the last good table.
//!
//! The mapping of a snapshot file ([`load_file`]) is one of the two places of
//! the project with `unsafe` code (the other is AF_XDP); see its `SAFETY`
//! comment.
//!
//! Typical use, control side:
//! ```no_run
//! # use clustergate_dataplane::snapshot::Writer;
//! # use clustergate_dataplane::table::Table;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut writer = Writer::open("/dev/shm/clustergate")?;
//! let table = Table::build(writer.next_generation(), 0, &[])?;
//! writer.publish(&table)?;
//! # Ok(()) }
//! ```
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
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::mem::{offset_of, size_of};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use memmap2::Mmap;
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use crate::table::{BackendRecord, FrontendRecord, Table, TableError, FRONTEND_FLAGS};

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"CGSNAP\0\0";
/// The layout version. Any change to the layout, the checksum or the flow hash
/// bumps it; readers refuse every other version.
pub const ABI_VERSION: u32 = 3;
/// Flow-hash function identifier: XXH3-64 (xxHash 0.8), as defined in
/// `docs/architecture.md`, "Flow hash (ABI)". The only one known.
pub const HASH_XXH3_64: u32 = 1;
/// Size of the [`Header`] in bytes.
pub const HEADER_LEN: usize = 128;
/// Size of one [`FrontendRecord`] in the file.
pub const FRONTEND_RECORD_LEN: usize = 64;
/// Size of one [`BackendRecord`] in the file.
pub const BACKEND_RECORD_LEN: usize = 24;
/// Size of one ring slot (`u16`) in the file.
pub const RING_SLOT_LEN: usize = 2;
/// Every section starts at a multiple of this many bytes from the file start.
pub const SECTION_ALIGN: u64 = 8;
/// Largest snapshot file a reader maps (4 GiB).
pub const MAX_FILE_LEN: u64 = 1 << 32;
/// Name of the pointer file that names the current generation.
pub const CURRENT: &str = "current";
/// Default snapshot directory.
pub const DEFAULT_DIR: &str = "/dev/shm/clustergate";
/// Generations a [`Writer`] keeps by default (the newest two, so a reader that
/// has just read `current` can still open the file it names).
pub const DEFAULT_KEEP: usize = 2;
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
    /// Reserved, zero.
    pub reserved: u64,
    /// XXH3-64 (seed 0) of header bytes `0..120` (everything before this field).
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
    assert!(offset_of!(Header, reserved) == 112);
    assert!(offset_of!(Header, header_checksum) == 120);

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

    assert!(size_of::<u16>() == RING_SLOT_LEN);
    // Sections laid out back to back stay aligned.
    assert!((HEADER_LEN as u64).is_multiple_of(SECTION_ALIGN));
    assert!((FRONTEND_RECORD_LEN as u64).is_multiple_of(SECTION_ALIGN));
    assert!((BACKEND_RECORD_LEN as u64).is_multiple_of(SECTION_ALIGN));
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
            reserved: get_u64(b, offset_of!(Self, reserved)),
            header_checksum: get_u64(b, offset_of!(Self, header_checksum)),
        }
    }

    /// Writes the fields at their offsets, little-endian.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        put(&mut b, offset_of!(Self, magic), &self.magic);
        put(
            &mut b,
            offset_of!(Self, abi_version),
            &self.abi_version.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, header_len),
            &self.header_len.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, generation),
            &self.generation.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, hash_seed),
            &self.hash_seed.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, hash_id),
            &self.hash_id.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, frontend_record_len),
            &self.frontend_record_len.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, backend_record_len),
            &self.backend_record_len.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, ring_slot_len),
            &self.ring_slot_len.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, file_len),
            &self.file_len.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, body_checksum),
            &self.body_checksum.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, frontends_off),
            &self.frontends_off.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, frontends_count),
            &self.frontends_count.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, backends_off),
            &self.backends_off.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, backends_count),
            &self.backends_count.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, ring_off),
            &self.ring_off.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, ring_count),
            &self.ring_count.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, reserved),
            &self.reserved.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, header_checksum),
            &self.header_checksum.to_le_bytes(),
        );
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
    /// lengths, hash function, reserved). Lengths and offsets against the
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
        let fixed: [(&'static str, u64, u64); 5] = [
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
            ("reserved", h.reserved, 0),
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
        /// `frontends`, `backends` or `ring`.
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
        /// `frontends`, `backends` or `ring`.
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
        /// `frontends` or `backends`.
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
pub const FAULT_LABELS: [&str; 20] = [
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

    fn in_file(self, path: &Path) -> Self {
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

/// Serializes a table: header, then frontends, backends and ring slots back
/// to back (all little-endian), with both checksums filled in.
#[must_use]
pub fn encode(table: &Table) -> Vec<u8> {
    let frontends = table.frontends();
    let backends = table.backend_records();
    let ring = table.ring_slots();
    let frontends_off = HEADER_LEN;
    let backends_off = frontends_off + frontends.len() * FRONTEND_RECORD_LEN;
    let ring_off = backends_off + backends.len() * BACKEND_RECORD_LEN;
    let file_len = ring_off + ring.len() * RING_SLOT_LEN;
    let mut out = vec![0u8; file_len];

    let chunks = out[frontends_off..backends_off].chunks_exact_mut(FRONTEND_RECORD_LEN);
    for (c, f) in chunks.zip(frontends) {
        put(c, offset_of!(FrontendRecord, addr), &f.addr);
        put(c, offset_of!(FrontendRecord, port), &f.port.to_le_bytes());
        put(c, offset_of!(FrontendRecord, proto), &[f.proto]);
        put(c, offset_of!(FrontendRecord, kind), &[f.kind]);
        put(c, offset_of!(FrontendRecord, flags), &f.flags.to_le_bytes());
        put(
            c,
            offset_of!(FrontendRecord, affinity_timeout_s),
            &f.affinity_timeout_s.to_le_bytes(),
        );
        put(
            c,
            offset_of!(FrontendRecord, backends_start),
            &f.backends_start.to_le_bytes(),
        );
        put(
            c,
            offset_of!(FrontendRecord, backends_len),
            &f.backends_len.to_le_bytes(),
        );
        put(
            c,
            offset_of!(FrontendRecord, ring_start),
            &f.ring_start.to_le_bytes(),
        );
        put(
            c,
            offset_of!(FrontendRecord, ring_len),
            &f.ring_len.to_le_bytes(),
        );
        put(c, offset_of!(FrontendRecord, return_path), &[f.return_path]);
        put(c, offset_of!(FrontendRecord, reserved), &f.reserved);
        for (at, v) in [
            (offset_of!(FrontendRecord, ranges_start), f.ranges_start),
            (offset_of!(FrontendRecord, ranges_len), f.ranges_len),
            (offset_of!(FrontendRecord, locals_start), f.locals_start),
            (offset_of!(FrontendRecord, locals_len), f.locals_len),
        ] {
            put(c, at, &v.to_le_bytes());
        }
    }
    let chunks = out[backends_off..ring_off].chunks_exact_mut(BACKEND_RECORD_LEN);
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
    let chunks = out[ring_off..file_len].chunks_exact_mut(RING_SLOT_LEN);
    for (c, s) in chunks.zip(ring) {
        c.copy_from_slice(&s.to_le_bytes());
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
        reserved: 0,
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

/// Decodes and validates a snapshot image: header ([`Header::parse`]), file
/// length, section bounds, alignment and overlap, body checksum, reserved
/// fields and flags, then every index through [`Table::from_parts`].
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
    let [fs, bs, rs] = sections.map(|s| &bytes[s.start as usize..s.end as usize]);

    let mut frontends = Vec::with_capacity(h.frontends_count as usize);
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
    let mut backends = Vec::with_capacity(h.backends_count as usize);
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
    Ok(Table::from_parts(
        h.generation,
        h.hash_seed,
        frontends,
        backends,
        ring,
    )?)
}

/// Path of the snapshot file of `generation` in `dir`:
/// `gen-{generation:020}.snap`.
#[must_use]
pub fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("gen-{generation:020}.snap"))
}

/// The generation a snapshot file name stands for, if it is one.
fn parse_snapshot_name(name: &str) -> Option<u64> {
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

/// Loads generation `generation` from `dir`, checking the file holds it.
fn load_generation(dir: &Path, generation: u64) -> Result<Table, SnapshotError> {
    let path = snapshot_path(dir, generation);
    let table = load_file(&path)?;
    if table.generation() != generation {
        return Err(SnapshotError::GenerationMismatch {
            named: generation,
            found: table.generation(),
        }
        .in_file(&path));
    }
    Ok(table)
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
        Some(g) => load_generation(dir, g).map(Some),
    }
}

/// Publishes snapshots into a directory (control's side).
///
/// Protocol for generation `G` (see `docs/shm-abi.md`):
/// 1. write `.gen-G.snap.tmp` (mode 0444), fsync, rename to
///    `gen-{G:020}.snap`;
/// 2. write `.current.tmp` with `G\n`, fsync, rename to `current`;
/// 3. fsync the directory, then remove all but the newest `keep` snapshot
///    files.
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
    _lock: File,
}

impl Writer {
    /// Opens (creating it if needed) a snapshot directory. The next
    /// generation is one above the highest of what `current` names and the
    /// snapshot files present, so a restarted control never reuses a
    /// generation. Leftover temporary files of a writer that died are
    /// removed.
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
            if let Some(g) = parse_snapshot_name(name) {
                highest = highest.max(g);
            } else if name.starts_with('.') && name.ends_with(".tmp") {
                remove_quietly(&entry.path());
            }
        }
        Ok(Self {
            dir,
            next_generation: highest.saturating_add(1),
            keep: DEFAULT_KEEP,
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
    /// the snapshot file's path.
    ///
    /// # Errors
    /// [`SnapshotError::Stale`] for a generation that is not newer;
    /// [`SnapshotError::Io`] when writing, syncing or renaming fails (nothing
    /// is published then: `current` still names the previous generation).
    pub fn publish(&mut self, table: &Table) -> Result<PathBuf, SnapshotError> {
        let generation = table.generation();
        if generation < self.next_generation {
            return Err(SnapshotError::Stale {
                generation,
                current: self.next_generation - 1,
            });
        }
        match read_current(&self.dir) {
            Ok(Some(current)) if generation <= current => {
                return Err(SnapshotError::Stale {
                    generation,
                    current,
                })
            }
            Ok(_) | Err(SnapshotError::BadPointer { .. }) => {}
            Err(e) => return Err(e),
        }
        let bytes = encode(table);
        let path = snapshot_path(&self.dir, generation);
        let tmp = self.dir.join(format!(".gen-{generation:020}.snap.tmp"));
        write_and_rename(&tmp, &path, &bytes, 0o444)?;
        let pointer = self.dir.join(CURRENT);
        let pointer_tmp = self.dir.join(".current.tmp");
        write_and_rename(
            &pointer_tmp,
            &pointer,
            format!("{generation}\n").as_bytes(),
            0o644,
        )?;
        // Make the renames durable where that means something (not tmpfs);
        // some filesystems refuse to sync a directory, which is harmless.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.next_generation = generation.saturating_add(1);
        self.prune();
        tracing::debug!(generation, path = %path.display(), "snapshot published");
        Ok(path)
    }

    /// Removes all but the newest `keep` snapshot files.
    fn prune(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut generations: Vec<u64> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(parse_snapshot_name))
            .collect();
        generations.sort_unstable_by(|a, b| b.cmp(a));
        for &g in generations.iter().skip(self.keep) {
            remove_quietly(&snapshot_path(&self.dir, g));
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
        fs::rename(tmp, to)
    })();
    result.map_err(|e| {
        remove_quietly(tmp);
        io_error(to)(e)
    })
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
            match load_generation(&self.dir, named) {
                Ok(table) => {
                    let old = self.handle.swap(Arc::new(table));
                    if Arc::strong_count(&old) > 1 {
                        self.retired.push(old);
                    }
                    self.last_fault = None;
                    self.stats.applied += 1;
                    self.stats.generation = named;
                    tracing::info!(generation = named, previous = have, dir = %self.dir.display(), "snapshot applied");
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
    use crate::flow::Proto;
    use crate::table::{BackendSpec, ServiceSpec};

    fn small() -> Table {
        Table::build(
            7,
            0x1122_3344_5566_7788,
            &[ServiceSpec::cluster_ip(
                "198.19.0.10".parse().unwrap(),
                80,
                Proto::Tcp,
                vec![BackendSpec::ready("198.18.1.1".parse().unwrap(), 8080)],
            )],
        )
        .unwrap()
    }

    #[test]
    fn header_bytes_are_where_the_abi_says() {
        let t = small();
        let b = encode(&t);
        assert_eq!(&b[0..8], b"CGSNAP\0\0");
        assert_eq!(b[8..12], 3u32.to_le_bytes());
        assert_eq!(b[12..16], 128u32.to_le_bytes());
        assert_eq!(b[16..24], 7u64.to_le_bytes());
        assert_eq!(b[24..32], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[32..36], 1u32.to_le_bytes());
        assert_eq!(b[36..40], 48u32.to_le_bytes());
        assert_eq!(b[40..44], 24u32.to_le_bytes());
        assert_eq!(b[44..48], 2u32.to_le_bytes());
        let ring = t.ring_slots().len() as u64;
        let len = 128 + 48 + 24 + RING_SLOT_LEN as u64 * ring;
        assert_eq!(b.len() as u64, len);
        assert_eq!(b[48..56], len.to_le_bytes());
        assert_eq!(b[56..64], xxh3_64(&b[128..]).to_le_bytes());
        assert_eq!(b[64..72], 128u64.to_le_bytes());
        assert_eq!(b[72..80], 1u64.to_le_bytes());
        assert_eq!(b[80..88], 176u64.to_le_bytes());
        assert_eq!(b[88..96], 1u64.to_le_bytes());
        assert_eq!(b[96..104], 200u64.to_le_bytes());
        assert_eq!(b[104..112], ring.to_le_bytes());
        assert_eq!(b[112..120], [0; 8]);
        assert_eq!(b[120..128], xxh3_64(&b[..120]).to_le_bytes());
        // The frontend record: address, then port 80 little-endian, TCP.
        assert_eq!(b[128 + 12..128 + 16], [198, 19, 0, 10]);
        assert_eq!(b[128 + 16..128 + 20], [80, 0, 6, 0]);
        // The backend: port 8080 little-endian, weight 1.
        assert_eq!(b[176 + 16..176 + 18], 8080u16.to_le_bytes());
        assert_eq!(b[176 + 20..176 + 24], 1u32.to_le_bytes());
        let back = decode(&b).unwrap();
        assert_eq!(back.frontends(), t.frontends());
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

    #[test]
    fn decode_messages_name_the_values() {
        let b = encode(&small());
        assert_eq!(
            decode(&b[..10]).unwrap_err().to_string(),
            "truncated: 10 bytes, header needs 128"
        );
        let mut v = b.clone();
        v[8] = 2;
        assert_eq!(
            decode(&v).unwrap_err().to_string(),
            "ABI version 2, expected 3"
        );
        let mut v = b.clone();
        let last = v.len() - 1;
        v[last] ^= 1;
        assert!(decode(&v)
            .unwrap_err()
            .to_string()
            .starts_with("body checksum 0x"));
        let mut v = b.clone();
        v.truncate(200);
        assert_eq!(
            decode(&v).unwrap_err().to_string(),
            format!("truncated: 200 bytes, header says the file has {}", b.len())
        );
    }
}
