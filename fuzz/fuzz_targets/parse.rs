//! Fuzz `packet::parse::parse`: it must never panic, every offset it
//! returns must lie inside the frame it was given, and where the fast path
//! (fixed-offset views) answers, its answer is the full path's.

#![no_main]

use clustergate_dataplane::packet::parse::{parse, parse_fast, parse_full, L4};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = parse_full(data);
    if let Some(fast) = parse_fast(data) {
        assert_eq!(Ok(fast), full, "the fast path disagrees");
    }
    assert_eq!(parse(data), full);
    if let Ok(Some(p)) = full {
        assert!(p.l3() <= p.ip_end() && p.ip_end() <= data.len(), "{p:?}");
        match p.l4 {
            L4::Flow(f) => assert!(f.offset() >= p.l3() && f.offset() <= p.ip_end(), "{p:?}"),
            L4::NonFirstFragment(_) => assert!(p.fragment().is_some_and(|f| !f.first), "{p:?}"),
            L4::IcmpError(e) => {
                let q = e.quoted;
                assert!(e.offset() >= p.l3() && e.offset() + 8 <= p.ip_end(), "{p:?}");
                assert!(
                    q.l3() <= q.l4() && q.l4() + 4 <= q.end() && q.end() <= p.ip_end(),
                    "{p:?}"
                );
            }
        }
    }
});
