//! Delta snapshots: a change to some frontends, published as only those
//! frontends' blocks (`docs/shm-abi.md`, "Delta files").
//!
//! Owns: the delta file format ([`header_bytes`], [`removed_record`],
//! [`seal_delta`], [`decode_delta`]; control's writer encodes with them), and how
//! a reader reaches the generation `current` names from the one it has
//! ([`load_chain`]): by the deltas since its own generation, or from the
//! newest full snapshot before them.
//!
//! A delta file `delta-{G:020}.snap` is a 64-byte header, the removed
//! frontends' keys, and an embedded full snapshot ([`crate::snapshot`]) of
//! generation `G` that holds only the added and changed frontends. Both
//! parts are checksummed; nothing in them is trusted before it is checked.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::snapshot::{
    body_checksum, decode, load_file, snapshot_path, SnapshotError, ABI_VERSION, MAX_FILE_LEN,
};
use crate::table::{Delta, FrontKey, Table};

/// The first 8 bytes of a delta file.
pub const DELTA_MAGIC: [u8; 8] = *b"CGDELTA\0";
/// Length of a delta file's header.
pub const DELTA_HEADER_LEN: usize = 64;
/// Length of a removed frontend's key record.
pub const REMOVED_RECORD_LEN: usize = 24;
/// The longest chain of deltas a reader follows before it wants a full
/// snapshot instead (a writer writes one at least this often).
pub const MAX_CHAIN: usize = 4096;

/// Path of the delta file of `generation` in `dir`: `delta-{generation:020}.snap`.
#[must_use]
pub fn delta_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("delta-{generation:020}.snap"))
}

/// The generation a delta file name stands for, if it is one.
#[must_use]
pub fn parse_delta_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("delta-")?.strip_suffix(".snap")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn bad(what: impl Into<String>) -> SnapshotError {
    SnapshotError::BadDelta { what: what.into() }
}

/// A delta file's header, its checksums zero ([`seal_delta`] fills them
/// in). Little-endian: magic (8), ABI version (u32), header length (u32,
/// 64), generation (u64), base generation (u64), removed count (u64), file
/// length (u64), XXH3-64 of bytes 64.. (u64), XXH3-64 of header bytes 0..56
/// (u64). The writer (`clustergate_builder::delta::encode_delta`) and
/// [`delta_header`] both go by this layout.
#[must_use]
pub fn header_bytes(
    generation: u64,
    base: u64,
    removed: u64,
    file_len: u64,
) -> [u8; DELTA_HEADER_LEN] {
    let mut h = [0u8; DELTA_HEADER_LEN];
    h[..8].copy_from_slice(&DELTA_MAGIC);
    h[8..12].copy_from_slice(&ABI_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(DELTA_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h[24..32].copy_from_slice(&base.to_le_bytes());
    h[32..40].copy_from_slice(&removed.to_le_bytes());
    h[40..48].copy_from_slice(&file_len.to_le_bytes());
    h
}

/// A removed frontend's key record: address (16), port (u16), protocol
/// (u8), five zero bytes.
#[must_use]
pub fn removed_record(k: &FrontKey) -> [u8; REMOVED_RECORD_LEN] {
    let mut r = [0u8; REMOVED_RECORD_LEN];
    r[..16].copy_from_slice(&k.addr);
    r[16..18].copy_from_slice(&k.port.to_le_bytes());
    r[18] = k.proto;
    r
}

/// Fills in both checksums of a delta file image: the body's (bytes 64..),
/// then the header's. Does nothing to a buffer shorter than a header.
pub fn seal_delta(bytes: &mut [u8]) {
    if bytes.len() < DELTA_HEADER_LEN {
        return;
    }
    let body = body_checksum(&bytes[DELTA_HEADER_LEN..]);
    bytes[48..56].copy_from_slice(&body.to_le_bytes());
    let head = body_checksum(&bytes[..56]);
    bytes[56..64].copy_from_slice(&head.to_le_bytes());
}

/// The generation and base a delta file's header names, after checking the
/// header alone (magic, version, length, checksum).
///
/// # Errors
/// [`SnapshotError::BadDelta`] naming what is wrong.
pub fn delta_header(bytes: &[u8]) -> Result<(u64, u64), SnapshotError> {
    if bytes.len() < DELTA_HEADER_LEN {
        return Err(bad(format!(
            "{} bytes, the header needs {DELTA_HEADER_LEN}",
            bytes.len()
        )));
    }
    if bytes[..8] != DELTA_MAGIC {
        return Err(bad(format!("magic {:02x?} is not CGDELTA", &bytes[..8])));
    }
    let version = u32_at(bytes, 8);
    if version != ABI_VERSION {
        return Err(bad(format!(
            "ABI version {version}, this reader knows {ABI_VERSION}"
        )));
    }
    if u32_at(bytes, 12) != DELTA_HEADER_LEN as u32 {
        return Err(bad(format!(
            "header length {}, expected {DELTA_HEADER_LEN}",
            u32_at(bytes, 12)
        )));
    }
    let head = body_checksum(&bytes[..56]);
    if head != u64_at(bytes, 56) {
        return Err(bad(format!(
            "header checksum {head:#018x} does not match {:#018x}",
            u64_at(bytes, 56)
        )));
    }
    let (generation, base) = (u64_at(bytes, 16), u64_at(bytes, 24));
    if base == 0 || generation <= base {
        return Err(bad(format!(
            "generation {generation} does not follow base {base}"
        )));
    }
    Ok((generation, base))
}

/// Checks and decodes a whole delta file.
///
/// # Errors
/// [`SnapshotError::BadDelta`] for the delta's own header and keys; the
/// embedded snapshot's faults as [`decode`] names them.
pub fn decode_delta(bytes: &[u8]) -> Result<Delta, SnapshotError> {
    let (generation, base) = delta_header(bytes)?;
    let file_len = u64_at(bytes, 40);
    if file_len != bytes.len() as u64 {
        return Err(bad(format!(
            "{} bytes, the header says {file_len}",
            bytes.len()
        )));
    }
    let body = body_checksum(&bytes[DELTA_HEADER_LEN..]);
    if body != u64_at(bytes, 48) {
        return Err(bad(format!(
            "body checksum {body:#018x} does not match {:#018x}",
            u64_at(bytes, 48)
        )));
    }
    let count = u64_at(bytes, 32);
    let keys_end = (count as u128) * REMOVED_RECORD_LEN as u128 + DELTA_HEADER_LEN as u128;
    if keys_end > bytes.len() as u128 {
        return Err(bad(format!(
            "{count} removed frontends do not fit in {} bytes",
            bytes.len()
        )));
    }
    let keys_end = keys_end as usize;
    let mut removed = Vec::with_capacity(count as usize);
    for (i, r) in bytes[DELTA_HEADER_LEN..keys_end]
        .chunks_exact(REMOVED_RECORD_LEN)
        .enumerate()
    {
        if r[19..] != [0; 5] {
            return Err(bad(format!(
                "removed frontend #{i}: reserved bytes are not zero"
            )));
        }
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&r[..16]);
        removed.push(FrontKey {
            addr,
            port: u16::from_le_bytes([r[16], r[17]]),
            proto: r[18],
        });
    }
    let changed = decode(&bytes[keys_end..])?;
    if changed.generation() != generation {
        return Err(bad(format!(
            "the embedded table is generation {}, the delta {generation}",
            changed.generation()
        )));
    }
    Ok(Delta {
        generation,
        base,
        removed,
        changed,
    })
}

/// Reads a whole file (at most [`MAX_FILE_LEN`] bytes).
fn read_all(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(SnapshotError::TooLarge {
            len: bytes.len() as u64,
            max: MAX_FILE_LEN,
        }
        .in_file(path));
    }
    Ok(bytes)
}

/// The first [`DELTA_HEADER_LEN`] bytes of a file, if it has them.
fn read_header(path: &Path) -> Option<[u8; DELTA_HEADER_LEN]> {
    let mut head = [0u8; DELTA_HEADER_LEN];
    File::open(path).ok()?.read_exact(&mut head).ok()?;
    Some(head)
}

/// Loads and checks the delta of `generation` in `dir`.
///
/// # Errors
/// As [`decode_delta`], with the path; `missing_file` when there is none.
pub fn load_delta(dir: &Path, generation: u64) -> Result<Delta, SnapshotError> {
    let path = delta_path(dir, generation);
    let bytes = read_all(&path)?;
    let delta = decode_delta(&bytes).map_err(|e| e.in_file(&path))?;
    if delta.generation != generation {
        return Err(SnapshotError::GenerationMismatch {
            named: generation,
            found: delta.generation,
        }
        .in_file(&path));
    }
    Ok(delta)
}

/// How a reader got to a generation.
#[derive(Debug)]
pub struct Reached {
    /// The table of the generation asked for.
    pub table: Table,
    /// Deltas applied.
    pub deltas: usize,
    /// Whether it started from a full snapshot (else from the reader's
    /// own table).
    pub full: bool,
}

/// The table of generation `target` in `dir`, reached from `have` (the
/// reader's table, if any): by the deltas after it when they lead back to
/// it, else from the newest full snapshot the deltas lead back to (or
/// `gen-{target}` itself), then the deltas after that.
///
/// # Errors
/// The first file that is missing or refused, with its path; or a delta
/// that does not apply ([`SnapshotError::Delta`]).
pub fn load_chain(dir: &Path, target: u64, have: Option<&Table>) -> Result<Reached, SnapshotError> {
    let mine = have.map(Table::generation);
    let mut chain: Vec<Delta> = Vec::new();
    let mut g = target;
    let start: Option<Table> = loop {
        if Some(g) == mine {
            break None;
        }
        // A full snapshot of the generation the chain has reached ends it,
        // unless the reader's own table is one delta away.
        let full = snapshot_path(dir, g);
        let delta = delta_path(dir, g);
        let prefer_delta = mine.is_some()
            && read_header(&delta)
                .and_then(|b| delta_header(&b).ok())
                .is_some_and(|(_, base)| Some(base) == mine);
        if full.exists() && !prefer_delta {
            let t = load_file(&full)?;
            if t.generation() != g {
                return Err(SnapshotError::GenerationMismatch {
                    named: g,
                    found: t.generation(),
                }
                .in_file(&full));
            }
            break Some(t);
        }
        let d = load_delta(dir, g)?;
        g = d.base;
        chain.push(d);
        if chain.len() > MAX_CHAIN {
            return Err(bad(format!(
                "more than {MAX_CHAIN} deltas lead to generation {target} without a full snapshot"
            ))
            .in_file(&delta_path(dir, target)));
        }
    };
    let full = start.is_some();
    let mut table = match (start, have) {
        (Some(t), _) => t,
        (None, Some(h)) => {
            let Some(first) = chain.pop() else {
                return Err(bad("no change to apply"));
            };
            h.apply_delta(&first)
                .map_err(|e| SnapshotError::Delta(e).in_file(&delta_path(dir, first.generation)))?
        }
        (None, None) => return Err(bad("nothing to start from")),
    };
    let deltas = chain.len() + usize::from(!full);
    while let Some(d) = chain.pop() {
        table = table
            .apply_delta(&d)
            .map_err(|e| SnapshotError::Delta(e).in_file(&delta_path(dir, d.generation)))?;
    }
    Ok(Reached {
        table,
        deltas,
        full,
    })
}
