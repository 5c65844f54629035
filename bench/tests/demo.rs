//! `clustergate-bench demo`: the packet core on the built-in example, as the
//! gateway binary's `demo` printed it before building tables became
//! control's side. Without root: no network, two worker threads in process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::process::Command;

fn demo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clustergate-bench"))
        .arg("demo")
        .args(args)
        .output()
        .expect("running clustergate-bench demo")
}

/// No flow moves off a surviving backend across the table change, the SYN
/// to the service without endpoints is rejected, and nothing is dropped.
#[test]
fn demo_moves_no_flow_off_a_surviving_backend() {
    let out = demo(&["--flows", "2000", "--workers", "2"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with(
            "clustergate demo: 2000 TCP connections to 198.19.0.10:80 over 4 backends, 2 workers\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("flows moved by the table change: ")
            && text.contains("(all from 198.18.1.4: true)"),
        "{text}"
    );
    assert!(
        text.contains("SYN to 198.19.0.12:80 (no endpoints): reject (")
            && text.contains("-byte TCP RST back to the client)"),
        "{text}"
    );
    // Gen 1 spreads the flows over the four backends; every flow is still
    // forwarded in gen 2 (established flows keep their backend, the removed
    // one's included: conntrack holds them).
    let row = |b: &str| -> (u32, u32) {
        let line = text
            .lines()
            .find(|l| l.starts_with(b))
            .unwrap_or_else(|| panic!("no row for {b}: {text}"));
        let n: Vec<u32> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        (n[0], n[1])
    };
    let mut total = (0, 0);
    for b in ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"] {
        let (g1, g2) = row(b);
        assert!(g1 > 0, "{b} got no flow in generation 1: {text}");
        total = (total.0 + g1, total.1 + g2);
    }
    assert_eq!(total, (2000, 2000), "{text}");
}

/// The flags are checked as before.
#[test]
fn demo_refuses_out_of_range_flags() {
    for args in [
        &["--workers", "0"][..],
        &["--workers", "65"],
        &["--flows", "0"],
    ] {
        let out = demo(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("is not in 1.."), "{args:?}: {err}");
    }
}
