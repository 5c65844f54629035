//! The snapshot target: the reader (`snapshot::decode`) on arbitrary bytes
//! and on valid snapshots with bytes changed.
//!
//! Input: `[mode, rest...]`. `mode & 3` picks:
//! - 0: `rest` is the snapshot, as is;
//! - 1: `rest` is the snapshot, with both checksums recomputed first
//!   (`snapshot::seal`), so the fuzzer reaches the checks behind them;
//! - 2: a valid snapshot ([`valid`], number `mode >> 2`) with the edits of
//!   `rest` applied, then sealed;
//! - 3: the same, not sealed.
//!
//! An edit is four bytes: a 24-bit little-endian offset (modulo the length)
//! and a byte XORed in there; a last, shorter edit cuts the snapshot at its
//! offset instead.
//!
//! Checked: `decode` never panics. Unsealed edits that changed a byte are
//! refused. A table it accepts encodes to a snapshot that decodes to the
//! same table (the bytes may differ: readers accept any placement of the
//! sections), and a worker given that table forwards a frame to each of its
//! first frontends and the replies to them without breaking the pipeline
//! target's checks.

use std::sync::OnceLock;

use clustergate_dataplane::snapshot::decode;

use clustergate_builder::snapshot::{encode, seal};
use clustergate_dataplane::table::Table;

use crate::pipeline::{self, Op};

/// The valid snapshots mutated by modes 2 and 3: the pipeline target's
/// tables (every frontend kind and return path, both generations) and an
/// empty one.
pub fn valid() -> &'static [Vec<u8>] {
    static V: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    V.get_or_init(|| {
        let mut v: Vec<Vec<u8>> = pipeline::tables()
            .iter()
            .flat_map(|(a, b)| [encode(a), encode(b)])
            .collect();
        v.push(encode(&Table::empty(9)));
        v
    })
}

/// Mode bits: see the module's docs.
pub const RAW: u8 = 0;
/// Raw bytes, sealed.
pub const RAW_SEALED: u8 = 1;
/// A valid snapshot, edited, sealed.
pub const EDIT_SEALED: u8 = 2;
/// A valid snapshot, edited, not sealed.
pub const EDIT: u8 = 3;

/// An edit-mode input: valid snapshot `base`, then `edits` (offset, XOR).
#[must_use]
pub fn encode_edits(mode: u8, base: u8, edits: &[(u32, u8)]) -> Vec<u8> {
    let mut v = vec![(base << 2) | (mode & 3)];
    for (at, x) in edits {
        v.extend_from_slice(&at.to_le_bytes()[..3]);
        v.push(*x);
    }
    v
}

/// Runs one input (see the module's docs); panics on a broken property.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (bytes, must_refuse) = match mode & 3 {
        RAW => (rest.to_vec(), false),
        RAW_SEALED => {
            let mut b = rest.to_vec();
            seal(&mut b);
            (b, false)
        }
        m => {
            let valid = valid();
            let base = &valid[usize::from(mode >> 2) % valid.len()];
            let mut b = base.clone();
            for e in rest.chunks(4) {
                let mut at = [0u8; 4];
                at[..e.len().min(3)].copy_from_slice(&e[..e.len().min(3)]);
                let at = u32::from_le_bytes(at) as usize;
                match e {
                    [_, _, _, x] => {
                        let i = at % b.len();
                        b[i] ^= x;
                    }
                    _ => b.truncate(at % (b.len() + 1)),
                }
            }
            if m == EDIT_SEALED {
                seal(&mut b);
            }
            let changed = b != *base;
            (b, m == EDIT && changed)
        }
    };
    match decode(&bytes) {
        Ok(table) => {
            assert!(
                !must_refuse,
                "a snapshot changed without its checksums was accepted"
            );
            // Readers accept any placement of the sections (docs/shm-abi.md),
            // so the bytes need not come back; the table must.
            let again = encode(&table);
            let back = decode(&again).unwrap_or_else(|e| panic!("a re-encoded table refused: {e}"));
            assert!(
                encode(&back) == again,
                "a re-encoded table decodes to another"
            );
            let n = table.frontends().len().min(6) as u8;
            let mut ops = Vec::new();
            for i in 0..n {
                ops.push(Op::Client {
                    frontend: i,
                    client: i,
                    sport: i,
                    flags: 0x04, // SYN (TCP)
                    payload: 8,
                });
                ops.push(Op::Reply {
                    back: 0,
                    flags: 0,
                    payload: 8,
                });
            }
            pipeline::drive(&table, pipeline::ROOM, &ops);
        }
        Err(e) => {
            // The error names what was wrong.
            assert!(!e.to_string().is_empty());
            let _ = e.label();
        }
    }
}
