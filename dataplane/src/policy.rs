//! NetworkPolicy as a worker checks it: one lookup per new flow, after the
//! backend is picked and before NAT.
//!
//! Control compiles the policies (`clustergate-control`'s `policy` module
//! says what they mean) into:
//! - **client classes**: every client address falls in exactly one class,
//!   and within a class every decision is the same. A pod's address is a
//!   host prefix naming the class of its (namespace, labels, ipBlocks
//!   holding it); other prefixes come from the policies' ipBlocks and their
//!   excepts; an address in no prefix is in class 0, "the world". The class
//!   of an address is its longest prefix's ([`PolicyTable::class_of`]);
//! - **per class**, whether some policy isolates it for egress;
//! - **per backend address**, whether some policy isolates it for ingress,
//!   and the sorted list of (class, protocol, port range) entries that both
//!   its ingress and the class's egress admit.
//!
//! A flow is allowed when neither side is isolated, or an entry of its
//! backend names its class, protocol and port. Established flows are never
//! checked again: the decision is made once, when the flow is created.
//!
//! An empty policy table (no section in the snapshot) allows everything.

use std::collections::HashMap;

use thiserror::Error;

use crate::flow::{ip_from16, Addr16, Proto};
use crate::table::{check_prefix, is_v4_mapped, masked, PrefixRecord};

/// [`PolicyClassRecord::flags`]: some policy isolates the class's pods for
/// egress.
pub const CLASS_EGRESS_ISOLATED: u32 = 1;
/// [`PolicyBackendRecord::flags`]: some policy isolates the backend's pod
/// for ingress.
pub const BACKEND_INGRESS_ISOLATED: u32 = 1;
/// [`PolicyEntryRecord::proto`]: every protocol.
pub const PROTO_ANY: u8 = 0;

/// One client class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PolicyClassRecord {
    /// [`CLASS_EGRESS_ISOLATED`] or 0.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// One backend address and its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PolicyBackendRecord {
    /// The backend's address (canonical 16-byte form).
    pub addr: Addr16,
    /// First entry, in the entry array.
    pub entries_start: u32,
    /// Number of entries, sorted by (class, protocol, low port).
    pub entries_len: u32,
    /// [`BACKEND_INGRESS_ISOLATED`] or 0.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// What a backend admits from one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C)]
pub struct PolicyEntryRecord {
    /// The client class.
    pub class: u32,
    /// Lowest port admitted.
    pub lo: u16,
    /// Highest port admitted.
    pub hi: u16,
    /// IP protocol number (6, 17, 132) or [`PROTO_ANY`].
    pub proto: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

impl PolicyEntryRecord {
    /// An entry admitting `lo..=hi` of `proto` from `class`.
    #[must_use]
    pub fn new(class: u32, proto: u8, lo: u16, hi: u16) -> Self {
        Self {
            class,
            lo,
            hi,
            proto,
            reserved: [0; 7],
        }
    }
}

const _: () = {
    assert!(size_of::<PolicyClassRecord>() == 8);
    assert!(size_of::<PolicyBackendRecord>() == 32);
    assert!(std::mem::offset_of!(PolicyBackendRecord, entries_start) == 16);
    assert!(std::mem::offset_of!(PolicyBackendRecord, entries_len) == 20);
    assert!(std::mem::offset_of!(PolicyBackendRecord, flags) == 24);
    assert!(std::mem::offset_of!(PolicyBackendRecord, reserved) == 28);
    assert!(size_of::<PolicyEntryRecord>() == 16);
    assert!(std::mem::offset_of!(PolicyEntryRecord, lo) == 4);
    assert!(std::mem::offset_of!(PolicyEntryRecord, hi) == 6);
    assert!(std::mem::offset_of!(PolicyEntryRecord, proto) == 8);
    assert!(std::mem::offset_of!(PolicyEntryRecord, reserved) == 9);
};

/// The arrays of a policy table, as the snapshot carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyParts {
    /// Client prefixes; [`PrefixRecord::node`] holds the class.
    pub prefixes: Vec<PrefixRecord>,
    /// Classes; class 0 is the world.
    pub classes: Vec<PolicyClassRecord>,
    /// Backends, each address once.
    pub backends: Vec<PolicyBackendRecord>,
    /// Entries, each backend's together.
    pub entries: Vec<PolicyEntryRecord>,
}

/// Why a policy table was refused; each names the record.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// A record holds a value out of range.
    #[error("policy {section} #{index}: {what}")]
    Bad {
        /// `"prefix"`, `"class"`, `"backend"` or `"entry"`.
        section: &'static str,
        /// Index in its array.
        index: usize,
        /// What is wrong.
        what: String,
    },
}

/// The compiled policies, indexed for lookups.
#[derive(Debug, Clone, Default)]
pub struct PolicyTable {
    parts: PolicyParts,
    /// (IPv4, canonical length, network) → class.
    prefixes: HashMap<(bool, u8, Addr16), u32>,
    /// The canonical lengths in `prefixes`, longest first.
    lens: Vec<(bool, u8)>,
    /// Backend address → index in `parts.backends`.
    backends: HashMap<Addr16, u32>,
}

impl PolicyTable {
    /// Checks `parts` and builds the indexes.
    ///
    /// # Errors
    /// The first record out of range: a bad prefix, a prefix twice, a class
    /// that does not exist, set reserved bytes or unknown flags, a backend
    /// twice, entries outside the array or not sorted, a range backwards, an
    /// unknown protocol; and entries or backends without class 0.
    pub fn assemble(parts: PolicyParts) -> Result<Self, PolicyError> {
        let nclasses = parts.classes.len() as u64;
        let bad = |section, index, what: String| PolicyError::Bad {
            section,
            index,
            what,
        };
        if nclasses == 0 && (!parts.prefixes.is_empty() || !parts.backends.is_empty()) {
            return Err(bad(
                "class",
                0,
                "no classes, but prefixes or backends (class 0, the world, must exist)".into(),
            ));
        }
        for (i, c) in parts.classes.iter().enumerate() {
            if c.flags & !CLASS_EGRESS_ISOLATED != 0 || c.reserved != 0 {
                return Err(bad(
                    "class",
                    i,
                    format!("flags {:#x} / reserved {} not known", c.flags, c.reserved),
                ));
            }
        }
        let mut prefixes = HashMap::with_capacity(parts.prefixes.len());
        let mut lens = Vec::new();
        for (i, p) in parts.prefixes.iter().enumerate() {
            check_prefix(p).map_err(|w| bad("prefix", i, w))?;
            if u64::from(p.node) >= nclasses {
                return Err(bad("prefix", i, format!("class {} of {nclasses}", p.node)));
            }
            let v4 = is_v4_mapped(&p.addr);
            let len = canonical_len(p);
            if prefixes.insert((v4, len, p.addr), p.node).is_some() {
                return Err(bad("prefix", i, format!("{} appears twice", p.net())));
            }
            if !lens.contains(&(v4, len)) {
                lens.push((v4, len));
            }
        }
        lens.sort_by_key(|&(_, len)| std::cmp::Reverse(len));
        let mut backends = HashMap::with_capacity(parts.backends.len());
        for (i, b) in parts.backends.iter().enumerate() {
            if b.flags & !BACKEND_INGRESS_ISOLATED != 0 || b.reserved != 0 {
                return Err(bad(
                    "backend",
                    i,
                    format!("flags {:#x} / reserved {} not known", b.flags, b.reserved),
                ));
            }
            let end = u64::from(b.entries_start) + u64::from(b.entries_len);
            if end > parts.entries.len() as u64 {
                return Err(bad(
                    "backend",
                    i,
                    format!(
                        "entries {}..{end} exceed {}",
                        b.entries_start,
                        parts.entries.len()
                    ),
                ));
            }
            let mine = &parts.entries[b.entries_start as usize..end as usize];
            if mine.windows(2).any(|w| w[0] > w[1]) {
                return Err(bad("backend", i, "entries are not sorted".into()));
            }
            if backends.insert(b.addr, i as u32).is_some() {
                return Err(bad(
                    "backend",
                    i,
                    format!("{} appears twice", ip_from16(b.addr)),
                ));
            }
        }
        for (i, e) in parts.entries.iter().enumerate() {
            if u64::from(e.class) >= nclasses {
                return Err(bad("entry", i, format!("class {} of {nclasses}", e.class)));
            }
            if e.lo > e.hi {
                return Err(bad(
                    "entry",
                    i,
                    format!("ports {}..{} go backwards", e.lo, e.hi),
                ));
            }
            if e.proto != PROTO_ANY && Proto::from_ip_number(e.proto).is_none() {
                return Err(bad("entry", i, format!("protocol {} is unknown", e.proto)));
            }
            if e.reserved != [0; 7] {
                return Err(bad("entry", i, "reserved bytes are not zero".into()));
            }
        }
        Ok(Self {
            parts,
            prefixes,
            lens,
            backends,
        })
    }

    /// The arrays, for the snapshot writer.
    #[must_use]
    pub fn parts(&self) -> &PolicyParts {
        &self.parts
    }

    /// No policy at all: everything is allowed, and nothing is looked up.
    #[inline]
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.parts.classes.is_empty()
    }

    /// The class of a client address: its longest prefix's, else 0.
    #[inline]
    #[must_use]
    pub fn class_of(&self, a: &Addr16) -> u32 {
        let v4 = is_v4_mapped(a);
        self.lens
            .iter()
            .filter(|(f, _)| *f == v4)
            .find_map(|&(f, len)| self.prefixes.get(&(f, len, masked(a, len))).copied())
            .unwrap_or(0)
    }

    /// Whether a new flow from `client` to `backend` on `proto`/`port` (the
    /// backend's port) is allowed.
    #[inline]
    #[must_use]
    pub fn allows(&self, client: &Addr16, backend: &Addr16, proto: Proto, port: u16) -> bool {
        if self.is_empty() {
            return true;
        }
        let class = self.class_of(client);
        let out_isolated = self
            .parts
            .classes
            .get(class as usize)
            .is_some_and(|c| c.flags & CLASS_EGRESS_ISOLATED != 0);
        let b = self
            .backends
            .get(backend)
            .and_then(|&i| self.parts.backends.get(i as usize));
        let in_isolated = b.is_some_and(|b| b.flags & BACKEND_INGRESS_ISOLATED != 0);
        if !out_isolated && !in_isolated {
            return true;
        }
        let Some(b) = b else { return false };
        let s = b.entries_start as usize;
        let mine = self
            .parts
            .entries
            .get(s..s + b.entries_len as usize)
            .unwrap_or(&[]);
        let first = mine.partition_point(|e| e.class < class);
        let p = proto.ip_number();
        mine[first..]
            .iter()
            .take_while(|e| e.class == class)
            .any(|e| (e.proto == PROTO_ANY || e.proto == p) && (e.lo..=e.hi).contains(&port))
    }
}

fn canonical_len(p: &PrefixRecord) -> u8 {
    if is_v4_mapped(&p.addr) {
        p.len.saturating_add(96)
    } else {
        p.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::addr16;

    fn a(s: &str) -> Addr16 {
        addr16(s.parse().expect("ip"))
    }

    fn table() -> PolicyTable {
        // Class 1: pod 198.18.10.2 (egress isolated); class 2: the block
        // 198.18.200.0/24. Backend 198.18.10.1 isolated for ingress, admits
        // class 1 on TCP 80-81 and class 2 on anything.
        PolicyTable::assemble(PolicyParts {
            prefixes: vec![
                PrefixRecord::new("198.18.10.2/32".parse().expect("net"), 1),
                PrefixRecord::new("198.18.200.0/24".parse().expect("net"), 2),
            ],
            classes: vec![
                PolicyClassRecord::default(),
                PolicyClassRecord {
                    flags: CLASS_EGRESS_ISOLATED,
                    reserved: 0,
                },
                PolicyClassRecord::default(),
            ],
            backends: vec![
                PolicyBackendRecord {
                    addr: a("198.18.10.1"),
                    entries_start: 0,
                    entries_len: 2,
                    flags: BACKEND_INGRESS_ISOLATED,
                    reserved: 0,
                },
                PolicyBackendRecord {
                    addr: a("198.18.10.3"),
                    entries_start: 2,
                    entries_len: 0,
                    flags: 0,
                    reserved: 0,
                },
            ],
            entries: vec![
                PolicyEntryRecord::new(1, 6, 80, 81),
                PolicyEntryRecord::new(2, PROTO_ANY, 0, 65535),
            ],
        })
        .expect("valid")
    }

    #[test]
    fn lookups() {
        let t = table();
        let b1 = a("198.18.10.1");
        let b3 = a("198.18.10.3");
        assert_eq!(t.class_of(&a("198.18.10.2")), 1);
        assert_eq!(t.class_of(&a("198.18.200.9")), 2);
        assert_eq!(t.class_of(&a("198.18.201.9")), 0);
        assert!(t.allows(&a("198.18.10.2"), &b1, Proto::Tcp, 80));
        assert!(t.allows(&a("198.18.10.2"), &b1, Proto::Tcp, 81));
        assert!(!t.allows(&a("198.18.10.2"), &b1, Proto::Tcp, 82));
        assert!(!t.allows(&a("198.18.10.2"), &b1, Proto::Udp, 80));
        assert!(t.allows(&a("198.18.200.9"), &b1, Proto::Sctp, 9));
        assert!(!t.allows(&a("198.18.201.9"), &b1, Proto::Tcp, 80));
        // b3 is open for ingress: the world reaches it, the egress-isolated
        // class does not (no entry).
        assert!(t.allows(&a("198.18.201.9"), &b3, Proto::Tcp, 80));
        assert!(!t.allows(&a("198.18.10.2"), &b3, Proto::Tcp, 80));
        // A backend without a record is open for ingress.
        assert!(t.allows(&a("198.18.201.9"), &a("198.18.10.9"), Proto::Tcp, 80));
        assert!(PolicyTable::default().allows(&b1, &b3, Proto::Tcp, 1));
    }

    #[test]
    fn bad_parts_are_refused_by_record() {
        let good = table().parts().clone();
        let mut p = good.clone();
        p.prefixes[1].node = 3;
        assert_eq!(
            PolicyTable::assemble(p).expect_err("class").to_string(),
            "policy prefix #1: class 3 of 3"
        );
        let mut p = good.clone();
        p.entries[0].lo = 90;
        assert!(PolicyTable::assemble(p)
            .expect_err("backwards")
            .to_string()
            .contains("entry #0: ports 90..81 go backwards"));
        let mut p = good.clone();
        p.backends[1].entries_len = 5;
        assert!(PolicyTable::assemble(p)
            .expect_err("bounds")
            .to_string()
            .contains("backend #1: entries 2..7 exceed 2"));
        let mut p = good.clone();
        p.backends[1].addr = p.backends[0].addr;
        assert!(PolicyTable::assemble(p)
            .expect_err("twice")
            .to_string()
            .contains("appears twice"));
        let mut p = good.clone();
        p.entries.swap(0, 1);
        assert!(PolicyTable::assemble(p)
            .expect_err("sorted")
            .to_string()
            .contains("not sorted"));
        let mut p = good.clone();
        p.entries[1].proto = 1;
        assert!(PolicyTable::assemble(p)
            .expect_err("proto")
            .to_string()
            .contains("protocol 1 is unknown"));
        let mut p = good;
        p.classes.clear();
        assert!(PolicyTable::assemble(p).is_err());
    }
}
