//! NetworkPolicy as a worker checks it: one lookup per new flow, after the
//! backend is picked and before NAT.
//!
//! Control compiles the policies (`clustergate-control`'s `policy` module
//! says what they mean) into:
//! - **client classes**: every address falls in exactly one class, and
//!   within a class every decision is the same. A pod's address is a host
//!   prefix naming the class of its (namespace, labels, named ports, the
//!   ipBlocks holding it); other prefixes come from the policies' ipBlocks
//!   and their excepts; an address in no prefix is in class 0, "the world".
//!   The class of an address is its longest prefix's
//!   ([`PolicyTable::class_of`]);
//! - **rules**: a bitmap of the classes a rule's peers match, and the
//!   (protocol, port range)s it admits;
//! - **per backend address**: whether some policy isolates it for ingress,
//!   the ingress rules that admit clients to it (shared by every backend of
//!   the same policies and ports), and its own class (as a destination);
//! - **per class**: whether some policy isolates its pods for egress, and
//!   the egress rules that admit destinations (by destination class).
//!
//! A new flow from client class `c` to backend `b` (class `d`) on a port is
//! allowed when `b` is not isolated or one of its rules has bit `c` and the
//! port, and `c` is not isolated for egress or one of its rules has bit `d`
//! and the port. Established flows are never checked again: the decision is
//! made once, when the flow is created.
//!
//! An empty policy table (no classes in the snapshot) allows everything.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

use hashbrown::HashMap;

use thiserror::Error;

use crate::flow::{ip_from16, Addr16, Proto};
use crate::table::{check_prefix, is_v4_mapped, masked, PrefixRecord};

/// [`PolicyClassRecord::flags`]: some policy isolates the class's pods for
/// egress.
pub const CLASS_EGRESS_ISOLATED: u32 = 1;
/// [`PolicyBackendRecord::flags`]: some policy isolates the backend's pod
/// for ingress.
pub const BACKEND_INGRESS_ISOLATED: u32 = 1;
/// [`PolicyPortRecord::proto`]: every protocol.
pub const PROTO_ANY: u8 = 0;

/// One client class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PolicyClassRecord {
    /// [`CLASS_EGRESS_ISOLATED`] or 0.
    pub flags: u32,
    /// First egress rule, in the rule array.
    pub rules_start: u32,
    /// Number of egress rules.
    pub rules_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// One backend address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PolicyBackendRecord {
    /// The backend's address (canonical 16-byte form).
    pub addr: Addr16,
    /// First ingress rule, in the rule array.
    pub rules_start: u32,
    /// Number of ingress rules.
    pub rules_len: u32,
    /// [`BACKEND_INGRESS_ISOLATED`] or 0.
    pub flags: u32,
    /// The backend's own class, as egress rules see it.
    pub class: u32,
}

/// One rule: which classes its peers match, which ports it admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PolicyRuleRecord {
    /// First word of its class bitmap (`ceil(classes / 64)` words).
    pub bits_start: u32,
    /// First port range, in the port array.
    pub ports_start: u32,
    /// Number of port ranges.
    pub ports_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// One (protocol, port range) a rule admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[repr(C)]
pub struct PolicyPortRecord {
    /// Lowest port admitted.
    pub lo: u16,
    /// Highest port admitted.
    pub hi: u16,
    /// IP protocol number (6, 17, 132) or [`PROTO_ANY`].
    pub proto: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

impl PolicyPortRecord {
    /// `lo..=hi` of `proto`.
    #[must_use]
    pub fn new(proto: u8, lo: u16, hi: u16) -> Self {
        Self {
            lo,
            hi,
            proto,
            reserved: [0; 3],
        }
    }
}

const _: () = {
    assert!(size_of::<PolicyClassRecord>() == 16);
    assert!(size_of::<PolicyBackendRecord>() == 32);
    assert!(std::mem::offset_of!(PolicyBackendRecord, rules_start) == 16);
    assert!(std::mem::offset_of!(PolicyBackendRecord, rules_len) == 20);
    assert!(std::mem::offset_of!(PolicyBackendRecord, flags) == 24);
    assert!(std::mem::offset_of!(PolicyBackendRecord, class) == 28);
    assert!(size_of::<PolicyRuleRecord>() == 16);
    assert!(size_of::<PolicyPortRecord>() == 8);
    assert!(std::mem::offset_of!(PolicyPortRecord, hi) == 2);
    assert!(std::mem::offset_of!(PolicyPortRecord, proto) == 4);
    assert!(std::mem::offset_of!(PolicyPortRecord, reserved) == 5);
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
    /// Rules, referred to by ranges from backends and classes (shared).
    pub rules: Vec<PolicyRuleRecord>,
    /// Port ranges, referred to by rules.
    pub ports: Vec<PolicyPortRecord>,
    /// Class bitmaps, `ceil(classes / 64)` words each, bit `c % 64` of word
    /// `c / 64` for class `c`.
    pub bits: Vec<u64>,
}

impl PolicyParts {
    /// Words per class bitmap.
    #[must_use]
    pub fn words_per_bitmap(&self) -> usize {
        self.classes.len().div_ceil(64)
    }
}

/// Why a policy table was refused; each names the record.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// A record holds a value out of range.
    #[error("policy {section} #{index}: {what}")]
    Bad {
        /// `"prefix"`, `"class"`, `"backend"`, `"rule"` or `"port"`.
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
    words: usize,
}

fn in_bounds(start: u32, len: u32, total: usize) -> bool {
    u64::from(start) + u64::from(len) <= total as u64
}

impl PolicyTable {
    /// Checks `parts` and builds the indexes.
    ///
    /// # Errors
    /// The first record out of range: a bad prefix, a prefix twice, a class
    /// that does not exist, set reserved bytes or unknown flags, a backend
    /// twice, a rule, port or bitmap range outside its array, a port range
    /// backwards or of an unknown protocol, a bit set for a class that does
    /// not exist; and prefixes or backends without class 0.
    pub fn assemble(parts: PolicyParts) -> Result<Self, PolicyError> {
        let nclasses = parts.classes.len() as u64;
        let words = parts.words_per_bitmap();
        let bad = |section, index, what: String| PolicyError::Bad {
            section,
            index,
            what,
        };
        if nclasses == 0
            && (!parts.prefixes.is_empty() || !parts.backends.is_empty() || !parts.rules.is_empty())
        {
            return Err(bad(
                "class",
                0,
                "no classes, but prefixes, backends or rules (class 0, the world, must exist)"
                    .into(),
            ));
        }
        let rules_ok = |start: u32, len: u32| in_bounds(start, len, parts.rules.len());
        for (i, c) in parts.classes.iter().enumerate() {
            if c.flags & !CLASS_EGRESS_ISOLATED != 0 || c.reserved != 0 {
                return Err(bad(
                    "class",
                    i,
                    format!("flags {:#x} / reserved {} not known", c.flags, c.reserved),
                ));
            }
            if !rules_ok(c.rules_start, c.rules_len) {
                return Err(bad(
                    "class",
                    i,
                    format!(
                        "rules {}+{} exceed {}",
                        c.rules_start,
                        c.rules_len,
                        parts.rules.len()
                    ),
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
            if b.flags & !BACKEND_INGRESS_ISOLATED != 0 {
                return Err(bad("backend", i, format!("flags {:#x} not known", b.flags)));
            }
            if u64::from(b.class) >= nclasses {
                return Err(bad(
                    "backend",
                    i,
                    format!("class {} of {nclasses}", b.class),
                ));
            }
            if !rules_ok(b.rules_start, b.rules_len) {
                return Err(bad(
                    "backend",
                    i,
                    format!(
                        "rules {}+{} exceed {}",
                        b.rules_start,
                        b.rules_len,
                        parts.rules.len()
                    ),
                ));
            }
            if backends.insert(b.addr, i as u32).is_some() {
                return Err(bad(
                    "backend",
                    i,
                    format!("{} appears twice", ip_from16(b.addr)),
                ));
            }
        }
        for (i, r) in parts.rules.iter().enumerate() {
            if r.reserved != 0 {
                return Err(bad("rule", i, "reserved is not zero".into()));
            }
            if !in_bounds(r.ports_start, r.ports_len, parts.ports.len()) {
                return Err(bad(
                    "rule",
                    i,
                    format!(
                        "ports {}+{} exceed {}",
                        r.ports_start,
                        r.ports_len,
                        parts.ports.len()
                    ),
                ));
            }
            let w = u32::try_from(words).unwrap_or(u32::MAX);
            if !in_bounds(r.bits_start, w, parts.bits.len()) {
                return Err(bad(
                    "rule",
                    i,
                    format!(
                        "bitmap {}+{words} exceeds {} words",
                        r.bits_start,
                        parts.bits.len()
                    ),
                ));
            }
            // No bit for a class that does not exist.
            if let Some(&last) = parts
                .bits
                .get(r.bits_start as usize + words.saturating_sub(1))
            {
                let used = nclasses % 64;
                if words > 0 && used != 0 && last >> used != 0 {
                    return Err(bad(
                        "rule",
                        i,
                        "its bitmap names classes that do not exist".into(),
                    ));
                }
            }
        }
        for (i, p) in parts.ports.iter().enumerate() {
            if p.lo > p.hi {
                return Err(bad(
                    "port",
                    i,
                    format!("ports {}..{} go backwards", p.lo, p.hi),
                ));
            }
            if p.proto != PROTO_ANY && Proto::from_ip_number(p.proto).is_none() {
                return Err(bad("port", i, format!("protocol {} is unknown", p.proto)));
            }
            if p.reserved != [0; 3] {
                return Err(bad("port", i, "reserved bytes are not zero".into()));
            }
        }
        Ok(Self {
            parts,
            prefixes,
            lens,
            backends,
            words,
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

    /// The class of an address: its longest prefix's, else 0.
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

    /// Whether one of `rules[start..start + len]` has bit `class` and
    /// admits `proto`/`port`.
    #[inline]
    fn admits(&self, start: u32, len: u32, class: u32, proto: u8, port: u16) -> bool {
        let s = start as usize;
        let rules = self.parts.rules.get(s..s + len as usize).unwrap_or(&[]);
        let (word, bit) = ((class / 64) as usize, class % 64);
        rules.iter().any(|r| {
            let set = self
                .parts
                .bits
                .get(r.bits_start as usize + word)
                .is_some_and(|w| w >> bit & 1 == 1);
            let p = r.ports_start as usize;
            set && self
                .parts
                .ports
                .get(p..p + r.ports_len as usize)
                .unwrap_or(&[])
                .iter()
                .any(|x| {
                    (x.proto == PROTO_ANY || x.proto == proto) && (x.lo..=x.hi).contains(&port)
                })
        })
    }

    /// The index of `addr`'s backend record, if it has one.
    #[must_use]
    pub fn backend_record(&self, addr: &Addr16) -> Option<u32> {
        self.backends.get(addr).copied()
    }

    /// Whether a new flow from `client` to `backend` on `proto`/`port` (the
    /// backend's port) is allowed.
    #[inline]
    #[must_use]
    pub fn allows(&self, client: &Addr16, backend: &Addr16, proto: Proto, port: u16) -> bool {
        if self.is_empty() {
            return true;
        }
        self.allows_at(client, backend, self.backend_record(backend), proto, port)
    }

    /// [`allows`](Self::allows) with the backend's record already found
    /// (`record`: [`backend_record`](Self::backend_record) of `backend`), as
    /// the table keeps it per backend: one hash lookup fewer per new flow.
    #[inline]
    #[must_use]
    pub fn allows_at(
        &self,
        client: &Addr16,
        backend: &Addr16,
        record: Option<u32>,
        proto: Proto,
        port: u16,
    ) -> bool {
        if self.is_empty() {
            return true;
        }
        let p = proto.ip_number();
        let class = self.class_of(client);
        let b = record.and_then(|i| self.parts.backends.get(i as usize));
        if let Some(b) = b.filter(|b| b.flags & BACKEND_INGRESS_ISOLATED != 0) {
            if !self.admits(b.rules_start, b.rules_len, class, p, port) {
                return false;
            }
        }
        match self.parts.classes.get(class as usize) {
            Some(c) if c.flags & CLASS_EGRESS_ISOLATED != 0 => {
                let dest = b.map_or_else(|| self.class_of(backend), |b| b.class);
                self.admits(c.rules_start, c.rules_len, dest, p, port)
            }
            _ => true,
        }
    }

    /// Words per class bitmap.
    #[must_use]
    pub fn words(&self) -> usize {
        self.words
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
        // Class 1: pod 198.18.10.2 (egress isolated: only to class 3 on TCP
        // 80); class 2: the block 198.18.200.0/24; class 3: backend
        // 198.18.10.1, isolated for ingress: admits class 1 on TCP 80-81 and
        // class 2 on anything. Backend 198.18.10.3 (class 0) is open.
        PolicyTable::assemble(PolicyParts {
            prefixes: vec![
                PrefixRecord::new("198.18.10.2/32".parse().expect("net"), 1),
                PrefixRecord::new("198.18.200.0/24".parse().expect("net"), 2),
                PrefixRecord::new("198.18.10.1/32".parse().expect("net"), 3),
            ],
            classes: vec![
                PolicyClassRecord::default(),
                PolicyClassRecord {
                    flags: CLASS_EGRESS_ISOLATED,
                    rules_start: 2,
                    rules_len: 1,
                    reserved: 0,
                },
                PolicyClassRecord::default(),
                PolicyClassRecord::default(),
            ],
            backends: vec![
                PolicyBackendRecord {
                    addr: a("198.18.10.1"),
                    rules_start: 0,
                    rules_len: 2,
                    flags: BACKEND_INGRESS_ISOLATED,
                    class: 3,
                },
                PolicyBackendRecord {
                    addr: a("198.18.10.3"),
                    rules_start: 0,
                    rules_len: 0,
                    flags: 0,
                    class: 0,
                },
            ],
            rules: vec![
                PolicyRuleRecord {
                    bits_start: 0,
                    ports_start: 0,
                    ports_len: 1,
                    reserved: 0,
                },
                PolicyRuleRecord {
                    bits_start: 1,
                    ports_start: 1,
                    ports_len: 1,
                    reserved: 0,
                },
                PolicyRuleRecord {
                    bits_start: 2,
                    ports_start: 2,
                    ports_len: 1,
                    reserved: 0,
                },
            ],
            ports: vec![
                PolicyPortRecord::new(6, 80, 81),
                PolicyPortRecord::new(PROTO_ANY, 0, 65535),
                PolicyPortRecord::new(6, 80, 80),
            ],
            bits: vec![1 << 1, 1 << 2, 1 << 3],
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
        // Ingress admits 81, egress does not.
        assert!(!t.allows(&a("198.18.10.2"), &b1, Proto::Tcp, 81));
        assert!(!t.allows(&a("198.18.10.2"), &b1, Proto::Udp, 80));
        assert!(t.allows(&a("198.18.200.9"), &b1, Proto::Sctp, 9));
        assert!(!t.allows(&a("198.18.201.9"), &b1, Proto::Tcp, 80));
        // b3 is open for ingress: the world reaches it, the egress-isolated
        // class does not (its rule names class 3 only).
        assert!(t.allows(&a("198.18.201.9"), &b3, Proto::Tcp, 80));
        assert!(!t.allows(&a("198.18.10.2"), &b3, Proto::Tcp, 80));
        // A backend without a record is open for ingress.
        assert!(t.allows(&a("198.18.201.9"), &a("198.18.10.9"), Proto::Tcp, 80));
        assert!(PolicyTable::default().allows(&b1, &b3, Proto::Tcp, 1));
    }

    #[test]
    fn bad_parts_are_refused_by_record() {
        let good = table().parts().clone();
        let refused = |p: PolicyParts| PolicyTable::assemble(p).expect_err("refused").to_string();
        let mut p = good.clone();
        p.prefixes[1].node = 4;
        assert_eq!(refused(p), "policy prefix #1: class 4 of 4");
        let mut p = good.clone();
        p.ports[0].lo = 90;
        assert!(refused(p).contains("port #0: ports 90..81 go backwards"));
        let mut p = good.clone();
        p.backends[1].rules_len = 5;
        assert!(refused(p).contains("backend #1: rules 0+5 exceed 3"));
        let mut p = good.clone();
        p.backends[1].addr = p.backends[0].addr;
        assert!(refused(p).contains("appears twice"));
        let mut p = good.clone();
        p.rules[2].bits_start = 3;
        assert!(refused(p).contains("rule #2: bitmap 3+1 exceeds 3 words"));
        let mut p = good.clone();
        p.bits[0] |= 1 << 9;
        assert!(refused(p).contains("rule #0: its bitmap names classes that do not exist"));
        let mut p = good.clone();
        p.ports[1].proto = 1;
        assert!(refused(p).contains("protocol 1 is unknown"));
        let mut p = good.clone();
        p.classes[1].rules_len = 9;
        assert!(refused(p).contains("class #1: rules 2+9 exceed 3"));
        let mut p = good;
        p.classes.clear();
        assert!(PolicyTable::assemble(p).is_err());
    }
}
