//! Two processes: `clustergate-control run` publishes three generations while
//! another process maps them, and the reader never sees a torn table.
//!
//! The reader is this test binary, started again with `READER_ENV` set: it
//! follows the snapshot directory with the dataplane's `Watcher` (the code the
//! gateway's workers use) and prints each generation it applied. Every
//! generation `k` of the manifest gives all endpoints port `1000 + k`, so a
//! table mixing two generations would show two ports.
//!
//! `harness = false`: this file's `main` is the test; it prints one
//! "N passed, N failed" line.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: a test fails loudly on purpose

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustergate_dataplane::snapshot::{PollOutcome, TableHandle, Watcher};

const READER_ENV: &str = "CLUSTERGATE_TWO_PROCESS_READER";
const SERVICES: u32 = 3;
const ENDPOINTS: u32 = 4;
const GENERATIONS: u64 = 3;

fn manifest(k: u32) -> String {
    let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for s in 0..SERVICES {
        y.push_str(&format!(
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: svc-{s}, namespace: two}}\n  spec:\n    clusterIP: 198.19.0.{}\n    ports:\n    - {{name: http, port: 80, protocol: TCP, targetPort: http}}\n",
            10 + s
        ));
        y.push_str(&format!(
            "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: svc-{s}-a\n    namespace: two\n    labels: {{kubernetes.io/service-name: svc-{s}}}\n  addressType: IPv4\n  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n  endpoints:\n",
            1000 + k
        ));
        for e in 0..ENDPOINTS {
            y.push_str(&format!(
                "  - addresses: [198.18.{s}.{}]\n    conditions: {{ready: true}}\n",
                e + 1
            ));
        }
    }
    y
}

/// The reader process: follow `dir` until `GENERATIONS` were applied.
fn reader(dir: &Path) -> ! {
    let handle = Arc::new(TableHandle::default());
    let mut watcher = Watcher::new(dir, Arc::clone(&handle));
    let started = Instant::now();
    let mut last = 0;
    while started.elapsed() < Duration::from_secs(60) {
        match watcher.poll() {
            PollOutcome::Applied { generation } => {
                let table = handle.load_full();
                assert!(
                    generation > last,
                    "generations went back: {last} then {generation}"
                );
                last = generation;
                let mut ports: Vec<u16> = table.backend_records().iter().map(|b| b.port).collect();
                ports.sort_unstable();
                ports.dedup();
                println!(
                    "applied {generation} frontends={} backends={} ports={ports:?}",
                    table.frontends().len(),
                    table.backend_records().len()
                );
                if generation >= GENERATIONS {
                    std::process::exit(0);
                }
            }
            PollOutcome::Refused { fault, .. } => {
                println!("refused {fault}");
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("reader: only reached generation {last} in 60 s");
    std::process::exit(2);
}

struct Cleanup {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn current(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("current"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn two_processes() {
    let dir = std::env::temp_dir().join(format!("clustergate-two-process-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cleanup = Cleanup {
        dir: dir.clone(),
        children: Vec::new(),
    };
    let shm = dir.join("shm");
    let path = dir.join("manifest.yaml");
    write_atomically(&path, &manifest(1));

    let control = Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
        .arg("run")
        .arg("--manifest")
        .arg(&path)
        .arg("--shm-dir")
        .arg(&shm)
        .arg("--poll-ms")
        .arg("5")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start clustergate-control");
    cleanup.children.push(control);
    let mut reader = Command::new(std::env::current_exe().unwrap())
        .env(READER_ENV, &shm)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the reader process");
    let out = reader.stdout.take().unwrap();

    // Publish generations 2 and 3 once the one before is out.
    let deadline = Instant::now() + Duration::from_secs(60);
    for k in 2..=GENERATIONS {
        while current(&shm) < k - 1 {
            assert!(
                Instant::now() < deadline,
                "control did not publish generation {}",
                k - 1
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        write_atomically(&path, &manifest(k as u32));
    }
    let lines: Vec<String> = BufReader::new(out).lines().map(Result::unwrap).collect();
    let status = reader.wait().unwrap();
    cleanup.children.push(reader);
    assert!(
        status.success(),
        "reader failed ({status}); it printed {lines:?}"
    );

    let mut seen = Vec::new();
    for l in &lines {
        let Some(rest) = l.strip_prefix("applied ") else {
            panic!("the reader refused a snapshot: {l}");
        };
        let generation: u32 = rest.split(' ').next().unwrap().parse().unwrap();
        let expected = format!(
            "applied {generation} frontends={SERVICES} backends={} ports=[{}]",
            SERVICES * ENDPOINTS,
            1000 + generation
        );
        assert_eq!(l, &expected, "a torn or wrong table");
        seen.push(generation);
    }
    assert_eq!(
        seen.last(),
        Some(&(GENERATIONS as u32)),
        "the reader saw {seen:?}"
    );
}

fn main() {
    if let Some(dir) = std::env::var_os(READER_ENV) {
        reader(Path::new(&dir));
    }
    let result = std::panic::catch_unwind(two_processes);
    match result {
        Ok(()) => println!("two_process: 1 passed, 0 failed"),
        Err(_) => {
            println!("two_process: 0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}
