//! Next-hop resolution against a real kernel, in network namespaces this test
//! makes (root only).
//!
//! Topology (addresses only from 198.18.0.0/15 and 2001:2::/48):
//!
//! ```text
//!  gateway ns "…-g"                          peer ns "…-p"
//!   ga 198.18.200.1/24 (+ .9 secondary),   ── pa 198.18.200.2/24 (+ .3), 2001:2:0:200::2/64
//!      198.18.203.1/24, 2001:2:0:200::1/64
//!   gb 198.18.201.1/24 (not served)       ── ob in ns "…-o" 198.18.201.2/24
//!   198.18.210.0/24 via 198.18.200.2, blackhole 198.18.220.0/24, no default route
//!   198.18.230.0/24 via 198.18.200.2 src 198.18.203.1, 198.18.231.0/24 via 198.18.203.2
//! ```
//!
//! Besides next hops and managed neighbours, it checks the gateway's source
//! address per destination ([`NextHops::source_for`]) against the kernel's own
//! choice (`ip route get`): a route's `src`, else the egress interface's
//! primary address (the one whose subnet holds the next hop), and the node's
//! own addresses ([`NextHops::node_addrs`]: every interface's, kept as the
//! same set while unchanged).
//!
//! The parent process builds the namespaces and runs this same test binary
//! inside the gateway namespace (`ip netns exec`), marked by an environment
//! variable; the namespaces go away in a `Drop` guard whatever happens.

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use clustergate_dataplane::flow::{addr16, ip_from16};
use clustergate_dataplane::io::nexthop::{
    ifindex_by_name, Hop, NextHopError, NextHops, Resolver, Unresolved,
};

const CHILD_ENV: &str = "CGT_NH_NETNS_CHILD";
const PEER_MAC_ENV: &str = "CGT_NH_PEER_MAC";
const GA_MAC_ENV: &str = "CGT_NH_GA_MAC";
const TEST_NAME: &str = "nexthop_in_namespaces";
/// Bound of every wait for the kernel.
const WAIT: Duration = Duration::from_secs(3);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip_cmd(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<_> = s.split(':').collect();
    assert_eq!(parts.len(), 6, "MAC {s:?}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("MAC {s:?}: {e}"));
    }
    mac
}

/// The MAC of `dev` in namespace `ns`, from `ip -j link`.
fn link_mac(ns: &str, dev: &str) -> String {
    let json = ip_cmd(&["-n", ns, "-j", "link", "show", "dev", dev]);
    let key = "\"address\":\"";
    let at = json.find(key).expect("ip -j link shows an address") + key.len();
    json[at..at + 17].to_string()
}

/// Deletes the namespaces (and with them the veths) even when the test fails.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn nexthop_in_namespaces() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    if !support::root_or_skip("nexthop_in_namespaces", "network namespaces") {
        return;
    }

    let pid = std::process::id();
    let (g, p, o) = (
        format!("cgt-nh-{pid}-g"),
        format!("cgt-nh-{pid}-p"),
        format!("cgt-nh-{pid}-o"),
    );
    let mut guard = Namespaces(Vec::new());
    for ns in [&g, &p, &o] {
        ip_cmd(&["netns", "add", ns]);
        guard.0.push(ns.clone());
        ip_cmd(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip_cmd(&[
        "-n", &g, "link", "add", "ga", "type", "veth", "peer", "name", "pa", "netns", &p,
    ]);
    ip_cmd(&[
        "-n", &g, "link", "add", "gb", "type", "veth", "peer", "name", "ob", "netns", &o,
    ]);
    for (ns, dev, addrs) in [
        (
            &g,
            "ga",
            &[
                "198.18.200.1/24",
                "198.18.200.9/24",
                "198.18.203.1/24",
                "2001:2:0:200::1/64",
            ][..],
        ),
        (
            &p,
            "pa",
            &["198.18.200.2/24", "198.18.200.3/24", "2001:2:0:200::2/64"][..],
        ),
        (&g, "gb", &["198.18.201.1/24"][..]),
        (&o, "ob", &["198.18.201.2/24"][..]),
    ] {
        for a in addrs {
            if a.contains(':') {
                ip_cmd(&["-n", ns, "addr", "add", a, "dev", dev, "nodad"]);
            } else {
                ip_cmd(&["-n", ns, "addr", "add", a, "dev", dev]);
            }
        }
        ip_cmd(&["-n", ns, "link", "set", dev, "up"]);
    }
    ip_cmd(&[
        "-n",
        &g,
        "route",
        "add",
        "198.18.210.0/24",
        "via",
        "198.18.200.2",
    ]);
    ip_cmd(&["-n", &g, "route", "add", "blackhole", "198.18.220.0/24"]);
    ip_cmd(&[
        "-n",
        &g,
        "route",
        "add",
        "198.18.230.0/24",
        "via",
        "198.18.200.2",
        "src",
        "198.18.203.1",
    ]);
    ip_cmd(&[
        "-n",
        &g,
        "route",
        "add",
        "198.18.231.0/24",
        "via",
        "198.18.203.2",
    ]);

    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("ip")
        .args(["netns", "exec", &g])
        .arg(&exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env(PEER_MAC_ENV, link_mac(&p, "pa"))
        .env(GA_MAC_ENV, link_mac(&g, "ga"))
        .output()
        .expect("running the test body in the gateway namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- child stdout ---\n{stdout}\n--- child stderr ---\n{stderr}");
    assert!(out.status.success(), "child run failed: {}", out.status);
    assert!(
        stdout.contains("1 passed"),
        "the child did not run the test: {stdout}"
    );
}

/// Polls `refresh` until `dst` resolves or [`WAIT`] passes.
fn wait_resolved(r: &mut Resolver, dst: &str) -> Result<Hop, Unresolved> {
    let deadline = Instant::now() + WAIT;
    loop {
        let nh = r.refresh().expect("refresh");
        let got = nh.resolve(&addr16(ip(dst)));
        if got.is_ok() || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The kernel's source address for `dst` (`ip -j route get`'s `prefsrc`).
fn kernel_source(dst: &str) -> Option<IpAddr> {
    let json = ip_cmd(&["-j", "route", "get", dst]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j route get");
    v.get(0)?.get("prefsrc")?.as_str().map(ip)
}

fn neigh_line(addr: &str, dev: &str) -> String {
    ip_cmd(&["-d", "neigh", "show", addr, "dev", dev])
}

/// The test body, inside the gateway namespace.
fn child() {
    let peer_mac = parse_mac(&std::env::var(PEER_MAC_ENV).expect("peer MAC from the parent"));
    let ga_mac = parse_mac(&std::env::var(GA_MAC_ENV).expect("ga MAC from the parent"));
    let ga = ifindex_by_name("ga").expect("ga");
    let gb = ifindex_by_name("gb").expect("gb");
    assert_ne!(ga, gb);
    let err = ifindex_by_name("cgt-nope0").expect_err("no such interface");
    assert!(
        matches!(err, NextHopError::InterfaceNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "interface cgt-nope0: not found");

    let mut r = Resolver::new(&[ga]).expect("resolver");
    let nh = r.refresh().expect("first refresh");
    assert!(nh.routes() >= 4, "routes: {}", nh.routes());
    let resolve = |nh: &NextHops, a: &str| nh.resolve(&addr16(ip(a)));
    // Nothing has talked to the peer yet.
    assert_eq!(resolve(&nh, "198.18.200.2"), Err(Unresolved::NoNeighbour));
    // Through the unserved interface, without a route, into a blackhole.
    assert_eq!(
        resolve(&nh, "198.18.201.2"),
        Err(Unresolved::OtherInterface)
    );
    assert_eq!(resolve(&nh, "198.19.250.1"), Err(Unresolved::NoRoute));
    assert_eq!(resolve(&nh, "198.18.220.1"), Err(Unresolved::NoRoute));
    assert_eq!(resolve(&nh, "2001:2:1::1"), Err(Unresolved::NoRoute));

    // The gateway's own address per destination, as the kernel chooses it.
    let source = |nh: &NextHops, a: &str| nh.source_for(&addr16(ip(a))).map(ip_from16);
    for (dst, want) in [
        // The kernel's prefix route carries src 198.18.200.1 (not .9, secondary).
        ("198.18.200.2", "198.18.200.1"),
        // No src on the route: the primary address whose subnet holds the
        // router (198.18.200.2), or the router 198.18.203.2.
        ("198.18.210.5", "198.18.200.1"),
        ("198.18.231.5", "198.18.203.1"),
        // The route's src, although its router is in the other subnet.
        ("198.18.230.5", "198.18.203.1"),
        // IPv6 routes carry no src: the interface's global address.
        ("2001:2:0:200::2", "2001:2:0:200::1"),
        // Through the interface the gateway does not serve.
        ("198.18.201.2", "198.18.201.1"),
    ] {
        assert_eq!(source(&nh, dst), Some(ip(want)), "source for {dst}");
        assert_eq!(kernel_source(dst), Some(ip(want)), "ip route get {dst}");
    }
    assert_eq!(source(&nh, "198.19.250.1"), None);
    assert_eq!(source(&nh, "198.18.220.1"), None);
    // The steering program's SNAT addresses without --snat-address: the
    // served interface's, not the other one's.
    let local: Vec<IpAddr> = nh.local_addrs().iter().map(|a| ip_from16(*a)).collect();
    for want in [
        "198.18.200.1",
        "198.18.200.9",
        "198.18.203.1",
        "2001:2:0:200::1",
    ] {
        assert!(local.contains(&ip(want)), "{want} in {local:?}");
    }
    assert!(!local.contains(&ip("198.18.201.1")), "{local:?}");

    // The node's own addresses, for node ports: every interface's, served or
    // not, both families; no loopback address.
    let node: Vec<IpAddr> = nh
        .node_addrs()
        .addrs()
        .iter()
        .map(|a| ip_from16(*a))
        .collect();
    for want in [
        "198.18.200.1",
        "198.18.200.9",
        "198.18.203.1",
        "198.18.201.1",
        "2001:2:0:200::1",
    ] {
        assert!(node.contains(&ip(want)), "{want} in {node:?}");
    }
    for not in ["127.0.0.1", "::1", "198.18.200.2"] {
        assert!(!node.contains(&ip(not)), "{not} in {node:?}");
    }
    // The same set (the same `Arc`) while nothing changes; a new one when an
    // address comes or goes.
    let again = r.refresh().expect("refresh again");
    assert!(std::sync::Arc::ptr_eq(nh.node_addrs(), again.node_addrs()));
    ip_cmd(&["addr", "add", "198.18.201.77/32", "dev", "gb"]);
    let added = r.refresh().expect("refresh with a new address");
    assert!(!std::sync::Arc::ptr_eq(nh.node_addrs(), added.node_addrs()));
    assert!(added.node_addrs().contains(&addr16(ip("198.18.201.77"))));
    ip_cmd(&["addr", "del", "198.18.201.77/32", "dev", "gb"]);
    let removed = r.refresh().expect("refresh without it");
    assert!(!removed.node_addrs().contains(&addr16(ip("198.18.201.77"))));
    assert_eq!(**removed.node_addrs(), **nh.node_addrs());

    // Managed entries: 198.18.200.2 (direct, and the gateway of .210.5) and
    // the peer's IPv6 address; the unserved and unroutable ones are skipped.
    let wanted = [
        ip("198.18.200.2"),
        ip("198.18.210.5"),
        ip("2001:2:0:200::2"),
        ip("198.18.201.2"),
        ip("198.19.250.1"),
    ];
    assert_eq!(r.keep_resolved(&wanted).expect("keep_resolved"), 2);
    assert!(
        neigh_line("198.18.200.2", "ga").contains("managed"),
        "{}",
        neigh_line("198.18.200.2", "ga")
    );
    let want = Ok(Hop {
        ifindex: ga,
        src_mac: ga_mac,
        dst_mac: peer_mac,
    });
    assert_eq!(wait_resolved(&mut r, "198.18.200.2"), want);
    assert_eq!(wait_resolved(&mut r, "2001:2:0:200::2"), want);
    // Via the gateway route: the gateway's MAC.
    assert_eq!(wait_resolved(&mut r, "198.18.210.5"), want);
    // Asking again changes nothing.
    assert_eq!(r.keep_resolved(&wanted).expect("keep_resolved again"), 0);
    // A trigger on a managed entry leaves it managed.
    r.trigger(ip("198.18.200.2")).expect("trigger on managed");
    assert!(neigh_line("198.18.200.2", "ga").contains("managed"));

    // trigger() on an on-link address nobody asked for yet.
    let nh = r.refresh().expect("refresh");
    assert_eq!(resolve(&nh, "198.18.200.3"), Err(Unresolved::NoNeighbour));
    r.trigger(ip("198.18.200.3")).expect("trigger");
    assert_eq!(wait_resolved(&mut r, "198.18.200.3"), want);
    assert!(!neigh_line("198.18.200.3", "ga").contains("managed"));
    let err = r.trigger(ip("198.19.250.1")).expect_err("unroutable");
    assert!(
        matches!(
            err,
            NextHopError::Unroutable {
                reason: Unresolved::NoRoute,
                ..
            }
        ),
        "{err:?}"
    );

    // A permanent entry is never replaced, nor removed.
    ip_cmd(&[
        "neigh",
        "add",
        "198.18.200.50",
        "dev",
        "ga",
        "lladdr",
        "02:00:00:00:00:50",
        "nud",
        "permanent",
    ]);
    let with_static = [
        ip("198.18.200.2"),
        ip("2001:2:0:200::2"),
        ip("198.18.200.50"),
    ];
    assert_eq!(r.keep_resolved(&with_static).expect("keep_resolved"), 0);
    let line = neigh_line("198.18.200.50", "ga");
    assert!(
        line.contains("PERMANENT") && !line.contains("managed"),
        "{line}"
    );
    r.trigger(ip("198.18.200.50"))
        .expect("trigger on permanent");
    let line = neigh_line("198.18.200.50", "ga");
    assert!(line.contains("PERMANENT"), "{line}");
    assert_eq!(
        wait_resolved(&mut r, "198.18.200.50").map(|h| h.dst_mac),
        Ok([2, 0, 0, 0, 0, 0x50])
    );

    // Nothing wanted any more: exactly the two entries it made go.
    assert_eq!(r.keep_resolved(&[]).expect("keep_resolved(empty)"), 2);
    let all = ip_cmd(&["-d", "neigh", "show", "dev", "ga"]);
    assert!(!all.contains("managed"), "{all}");
    assert!(all.contains("198.18.200.50"), "{all}");
    assert_eq!(r.keep_resolved(&[]).expect("keep_resolved(empty) again"), 0);

    // A new resolver adopts managed entries tagged as clustergate's (left by
    // a predecessor) and removes them when they are not wanted.
    assert_eq!(r.keep_resolved(&[ip("198.18.200.2")]).expect("again"), 1);
    drop(r);
    let mut r2 = Resolver::new(&[ga]).expect("second resolver");
    assert_eq!(r2.keep_resolved(&[]).expect("cleanup by successor"), 1);
    assert!(!ip_cmd(&["-d", "neigh", "show", "dev", "ga"]).contains("managed"));

    // Unknown served interface: refresh names it.
    let mut r3 = Resolver::new(&[ga, 999_999]).expect("resolver with a missing interface");
    let err = r3.refresh().expect_err("missing served interface");
    assert!(
        matches!(err, NextHopError::ServedInterfaceGone { ifindex: 999_999 }),
        "{err:?}"
    );
}
