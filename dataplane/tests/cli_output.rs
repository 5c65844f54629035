//! What `clustergate` writes at its edge, without root: `--version`, JSON
//! log lines (one object per line, the final error included), and no colour
//! codes when stderr is not a terminal.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::process::Command;

fn clustergate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clustergate"))
        .args(args)
        // Debug: every log line the start-up path has, not only the error.
        .env("RUST_LOG", "debug")
        .env_remove("NO_COLOR")
        .output()
        .expect("running clustergate")
}

#[test]
fn version_names_commit_abi_and_flow_hash() {
    let out = clustergate(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(concat!("clustergate ", env!("CARGO_PKG_VERSION")))
    );
    let commit = lines
        .iter()
        .find_map(|l| l.strip_prefix("commit: "))
        .expect("a commit line");
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit:?}"
    );
    assert!(lines.contains(&"snapshot ABI: 7"), "{text}");
    assert!(lines.contains(&"flow hash: 1 (xxh3-64)"), "{text}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    // A run that fails at once (no such interface): its error is a log line.
    let out = clustergate(&[
        "--log-format",
        "json",
        "run",
        "--interface",
        "cg-no-such-if0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("cg-no-such-if0"),
        "{last}"
    );
}

#[test]
fn text_logs_have_no_colour_on_a_pipe() {
    let out = clustergate(&["run", "--interface", "cg-no-such-if0"]);
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.contains("cg-no-such-if0"), "{text}");
    assert!(!text.contains('\u{1b}'), "escape codes on a pipe: {text:?}");
    // A debug run of inspect against nothing fails plainly too: the same
    // subscriber.
    let out = clustergate(&["inspect", "--server", "127.0.0.1:9", "summary"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(
        text.starts_with("error: connecting to the gateway at 127.0.0.1:9"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "{text:?}");
}
