//! The image's recipe without building it (scripts/image.sh builds it where
//! podman can): the Containerfile's base is Debian's slim image, every COPY
//! source is a file of the repository or a release binary that a workspace
//! package builds (and, once `cargo build --release` ran, exists),
//! .containerignore lets every COPY source through, and the DaemonSet runs
//! those binaries from that image.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The instructions of a Containerfile: continuations joined, comments and
/// blank lines dropped; (keyword in upper case, the rest).
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (k, rest) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((k.to_uppercase(), rest.trim().to_owned()));
        cur.clear();
    }
    out
}

/// The `[[bin]]` names of a package's Cargo.toml.
fn bins(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_bin = t == "[[bin]]";
        } else if in_bin {
            if let Some(v) = t.strip_prefix("name = ") {
                out.push(v.trim_matches('"').to_owned());
            }
        }
    }
    out
}

#[test]
fn every_copy_source_is_there_and_the_base_is_debian_slim() {
    let text = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    let ins = instructions(&text);
    let base = ins
        .iter()
        .find_map(|(k, v)| (k == "ARG").then(|| v.strip_prefix("BASE=")).flatten())
        .expect("ARG BASE=");
    assert!(
        base.starts_with("docker.io/library/debian:") && base.ends_with("-slim"),
        "a small Debian base: {base}"
    );
    let froms: Vec<&String> = ins
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(froms, ["${BASE}"], "one stage, on the base");

    let built: Vec<String> = ["dataplane/Cargo.toml", "control/Cargo.toml"]
        .iter()
        .flat_map(|m| bins(&repo().join(m)))
        .collect();
    assert!(built.contains(&"clustergate".to_owned()), "{built:?}");
    assert!(
        built.contains(&"clustergate-control".to_owned()),
        "{built:?}"
    );

    let ignore = std::fs::read_to_string(repo().join(".containerignore")).unwrap();
    let let_through: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .collect();
    let mut copied = Vec::new();
    for (k, v) in &ins {
        if k == "ADD" {
            panic!("ADD fetches and unpacks: use COPY ({v})");
        }
        if k != "COPY" {
            continue;
        }
        let words: Vec<&str> = v
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (dest, sources) = words.split_last().expect("COPY SRC DEST");
        assert!(dest.starts_with('/'), "absolute destination: {v}");
        for src in sources {
            assert!(
                let_through.contains(src),
                ".containerignore keeps {src} out of the build context"
            );
            let path = repo().join(src);
            if let Some(bin) = src.strip_prefix("target/release/") {
                assert!(
                    built.iter().any(|b| b == bin),
                    "{src}: no package builds {bin}"
                );
                // Only there after `cargo build --release` (scripts/image.sh).
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map_or_else(|| repo().join("target"), PathBuf::from);
                let release = target.join("release").join(bin);
                if std::env::var_os("CLUSTERGATE_CHECK_RELEASE").is_some() {
                    assert!(
                        release.exists(),
                        "{} missing: cargo build --release",
                        release.display()
                    );
                } else if !release.exists() {
                    eprintln!("{}: not built (cargo build --release)", release.display());
                }
            } else {
                assert!(path.exists(), "COPY source {src} is not in the repository");
            }
            copied.push((*src).to_owned());
        }
    }
    for b in ["clustergate", "clustergate-control"] {
        assert!(
            copied.iter().any(|c| c == &format!("target/release/{b}")),
            "the image carries {b}"
        );
    }
}

#[test]
fn the_daemon_set_runs_both_binaries_from_that_image() {
    let ds = std::fs::read_to_string(repo().join("deploy/daemonset.yaml")).unwrap();
    let images: Vec<&str> = ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(images.len(), 2, "{images:?}");
    let version = env!("CARGO_PKG_VERSION");
    for i in &images {
        assert_eq!(
            *i,
            format!("clustergate:{version}"),
            "the image scripts/image.sh and the Containerfile make, at this version"
        );
    }
    for cmd in [
        r#"command: ["clustergate"]"#,
        r#"command: ["clustergate-control"]"#,
    ] {
        assert!(ds.contains(cmd), "{cmd}");
    }
}
