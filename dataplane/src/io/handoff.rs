//! Hand-off rings between workers: a frame whose flow another worker owns
//! ([`crate::verdict::Verdict::Handoff`]) is copied into a slot of the ring
//! from this worker to the owner, and the owner copies it into a frame of
//! its own UMEM and runs it through its core.
//!
//! Owns: one bounded ring per ordered pair of workers ([`Mesh`]), each with
//! its preallocated slots. One worker pushes into a ring and one pops from it
//! (single producer, single consumer; `crossbeam_queue::ArrayQueue` is safe
//! for more, and lock-free). Slots travel between two queues, the ring's
//! free slots and its handed frames, so nothing is allocated after
//! [`Mesh::new`]. A full ring refuses the frame: the sender drops and counts
//! it ([`crate::io::worker::IoCounters::handoff_full`]); nothing blocks.
//!
//! Why a copy rather than the UMEM frame itself: each worker has its own
//! UMEM (pages first touched on its own core, fill rings it alone feeds), and
//! a frame lent to another worker would have to come back before its UMEM
//! could reuse it. A copy of a frame that is already in cache costs less
//! than that round trip, and hand-offs are the minority path (a reply that
//! RSS put on another queue than its request).

use crossbeam_queue::ArrayQueue;

/// Slots per ring: a batch in flight several times over, while a ring of
/// 2048-byte slots stays at 512 KiB.
pub const HANDOFF_SLOTS: usize = 256;

/// One handed frame: its bytes and the interface it arrived on (a reject
/// leaves through it).
#[derive(Debug)]
struct Slot {
    len: usize,
    ifindex: u32,
    data: Box<[u8]>,
}

/// The ring from one worker to another.
#[derive(Debug)]
pub struct Ring {
    /// Frames handed over, oldest first.
    full: ArrayQueue<Slot>,
    /// Free slots.
    empty: ArrayQueue<Slot>,
    slot_size: usize,
}

impl Ring {
    /// A ring of `slots` slots of `slot_size` bytes each, all allocated now.
    #[must_use]
    pub fn new(slots: usize, slot_size: usize) -> Self {
        let slots = slots.max(1);
        let empty = ArrayQueue::new(slots);
        for _ in 0..slots {
            let _ = empty.push(Slot {
                len: 0,
                ifindex: 0,
                data: vec![0; slot_size].into_boxed_slice(),
            });
        }
        Self {
            full: ArrayQueue::new(slots),
            empty,
            slot_size,
        }
    }

    /// Copies `frame`, received on interface `ifindex`, into a free slot and
    /// hands it over. `false` when no slot is free (the ring is full) or the
    /// frame is longer than a slot: the caller drops it.
    pub fn push(&self, frame: &[u8], ifindex: u32) -> bool {
        if frame.len() > self.slot_size {
            return false;
        }
        let Some(mut slot) = self.empty.pop() else {
            return false;
        };
        slot.data[..frame.len()].copy_from_slice(frame);
        slot.len = frame.len();
        slot.ifindex = ifindex;
        // Cannot fail: every slot is in exactly one of the two queues, each
        // as large as the number of slots.
        let _ = self.full.push(slot);
        true
    }

    /// Takes the oldest handed frame: calls `f` with its bytes and the
    /// interface it arrived on, then recycles its slot. `None` when the ring
    /// is empty.
    pub fn pop_with<R>(&self, f: impl FnOnce(&[u8], u32) -> R) -> Option<R> {
        let slot = self.full.pop()?;
        let r = f(&slot.data[..slot.len], slot.ifindex);
        let _ = self.empty.push(slot);
        Some(r)
    }

    /// Frames waiting in the ring.
    #[must_use]
    pub fn len(&self) -> usize {
        self.full.len()
    }

    /// Whether no frame waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.full.is_empty()
    }
}

/// Every ring between `workers` workers: one per ordered pair.
#[derive(Debug)]
pub struct Mesh {
    workers: usize,
    /// `rings[from * workers + to]`; the diagonal is empty (never used).
    rings: Vec<Ring>,
}

impl Mesh {
    /// Rings between `workers` workers, of `slots` slots of `slot_size`
    /// bytes (the UMEM frame size), all allocated now.
    #[must_use]
    pub fn new(workers: usize, slots: usize, slot_size: usize) -> Self {
        let rings = (0..workers * workers)
            .map(|i| {
                if i / workers == i % workers {
                    Ring::new(1, 0)
                } else {
                    Ring::new(slots, slot_size)
                }
            })
            .collect();
        Self { workers, rings }
    }

    /// Number of workers.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The ring from worker `from` to worker `to` (`None` out of range or
    /// when they are the same).
    #[must_use]
    pub fn ring(&self, from: usize, to: usize) -> Option<&Ring> {
        if from == to || from >= self.workers || to >= self.workers {
            return None;
        }
        self.rings.get(from * self.workers + to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_recycled_and_bytes_arrive_intact() {
        let ring = Ring::new(4, 64);
        let mut buffers = std::collections::BTreeSet::new();
        // Many more frames than slots, in bursts that fill the ring.
        for round in 0u8..50 {
            for k in 0..4u8 {
                let frame: Vec<u8> = (0..(10 + k as usize))
                    .map(|i| round ^ k ^ i as u8)
                    .collect();
                assert!(
                    ring.push(&frame, 7 + u32::from(k)),
                    "round {round} frame {k}"
                );
            }
            assert_eq!(ring.len(), 4);
            for k in 0..4u8 {
                let (bytes, ifindex, at) = ring
                    .pop_with(|b, i| (b.to_vec(), i, b.as_ptr() as usize))
                    .expect("a handed frame");
                let want: Vec<u8> = (0..(10 + k as usize))
                    .map(|i| round ^ k ^ i as u8)
                    .collect();
                assert_eq!(bytes, want, "round {round} frame {k}");
                assert_eq!(ifindex, 7 + u32::from(k));
                buffers.insert(at);
            }
            assert!(ring.is_empty());
            assert!(ring.pop_with(|_, _| ()).is_none());
        }
        // 200 frames went through the same 4 buffers: nothing was allocated.
        assert_eq!(buffers.len(), 4);
    }

    #[test]
    fn a_full_ring_refuses_until_the_owner_drains_it() {
        let ring = Ring::new(3, 16);
        for i in 0..3u8 {
            assert!(ring.push(&[i; 16], 1));
        }
        assert!(!ring.push(&[9; 4], 1), "a fourth frame in three slots");
        assert!(!Ring::new(3, 16).push(&[0; 17], 1), "a frame over a slot");
        assert_eq!(ring.pop_with(|b, _| b.to_vec()), Some(vec![0; 16]));
        assert!(ring.push(&[9; 4], 1), "room again after one pop");
        let rest: Vec<Vec<u8>> = std::iter::from_fn(|| ring.pop_with(|b, _| b.to_vec())).collect();
        assert_eq!(rest, vec![vec![1; 16], vec![2; 16], vec![9; 4]]);
    }

    #[test]
    fn a_mesh_has_one_ring_per_ordered_pair() {
        let mesh = Mesh::new(3, 8, 32);
        assert!(mesh.ring(0, 0).is_none());
        assert!(mesh.ring(0, 3).is_none());
        assert!(mesh.ring(0, 1).expect("0→1").push(b"to one", 2));
        assert!(
            mesh.ring(1, 0).expect("1→0").is_empty(),
            "directions are separate"
        );
        assert!(mesh.ring(2, 1).expect("2→1").is_empty());
        assert_eq!(
            mesh.ring(0, 1)
                .and_then(|r| r.pop_with(|b, i| (b.to_vec(), i))),
            Some((b"to one".to_vec(), 2))
        );
    }
}
