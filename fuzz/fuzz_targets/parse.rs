//! Fuzz `packet::parse::parse`: it must never panic, and every offset it
//! returns must lie inside the frame it was given.

#![no_main]

use clustergate_dataplane::packet::parse::{parse, L4};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(p)) = parse(data) {
        assert!(p.l3 <= p.ip_end && p.ip_end <= data.len(), "{p:?}");
        match p.l4 {
            L4::Flow(f) => assert!(f.offset >= p.l3 && f.offset <= p.ip_end, "{p:?}"),
            L4::NonFirstFragment(_) => assert!(p.fragment.is_some_and(|f| !f.first), "{p:?}"),
            L4::IcmpError(e) => {
                let q = e.quoted;
                assert!(e.offset >= p.l3 && e.offset + 8 <= p.ip_end, "{p:?}");
                assert!(
                    q.l3 <= q.l4 && q.l4 + 4 <= q.end && q.end <= p.ip_end,
                    "{p:?}"
                );
            }
        }
    }
});
