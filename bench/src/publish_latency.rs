//! `clustergate-bench publish-latency`: how long a manifest change takes to
//! become a published snapshot.
//!
//! Generates a manifest of S ClusterIP services × E endpoints (addresses in
//! 198.18.0.0/15), starts the real `clustergate-control run` on it with a
//! private snapshot directory, and for each change rewrites the manifest with
//! one endpoint moved, then times from the write until `current` names the
//! next generation. Reports the median, p99, min and max; the control's poll
//! interval is part of every figure (it is printed alongside).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Kills the control process and removes the scratch directory.
struct Scratch {
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn endpoint(n: u32) -> String {
    // 100 000 endpoints fit in 198.18.0.0/15 (131 072 addresses).
    format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
}

/// The manifest, with endpoint `moved` of service 0 shifted by `shift`.
fn manifest(services: u32, endpoints: u32, shift: u32) -> String {
    let mut y = String::with_capacity(services as usize * (700 + 60 * endpoints as usize));
    y.push_str("apiVersion: v1\nkind: List\nitems:\n");
    for s in 0..services {
        let vip = format!("198.19.{}.{}", s >> 8, s & 0xff);
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: svc-{s}\n    namespace: bench\n  spec:\n    clusterIP: {vip}\n    clusterIPs: [{vip}]\n    ports:\n    - name: http\n      port: 80\n      protocol: TCP\n      targetPort: 8080\n"
        );
        let _ = write!(
            y,
            "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: svc-{s}-a\n    namespace: bench\n    labels:\n      kubernetes.io/service-name: svc-{s}\n  addressType: IPv4\n  ports:\n  - name: http\n    port: 8080\n    protocol: TCP\n  endpoints:\n"
        );
        for e in 0..endpoints {
            let mut n = s * endpoints + e;
            if s == 0 && e == 0 {
                n = services * endpoints + shift;
            }
            let _ = write!(
                y,
                "  - addresses: [{}]\n    conditions: {{ready: true}}\n",
                endpoint(n)
            );
        }
    }
    y
}

fn current(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join("current"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn wait_for(dir: &Path, generation: u64, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if current(dir).is_some_and(|g| g >= generation) {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    bail!("generation {generation} was not published within {limit:?}")
}

/// Runs the measurement and prints a Markdown table.
pub fn run(
    services: u32,
    endpoints: u32,
    changes: u16,
    poll_ms: u64,
    control: Option<PathBuf>,
) -> Result<()> {
    if u64::from(services) * u64::from(endpoints) + u64::from(changes) + 1 > 131_072 {
        bail!("{services} services × {endpoints} endpoints do not fit in 198.18.0.0/15");
    }
    let control = match control {
        Some(c) => c,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("clustergate-control"),
    };
    let dir = std::env::temp_dir().join(format!(
        "clustergate-publish-latency-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut scratch = Scratch {
        dir: dir.clone(),
        child: None,
    };
    let shm = dir.join("shm");
    let path = dir.join("manifest.yaml");
    let gen_started = Instant::now();
    let text = manifest(services, endpoints, 0);
    eprintln!(
        "publish-latency: manifest of {services} services × {endpoints} endpoints, {:.1} MB, written in {:.2} s",
        text.len() as f64 / 1e6,
        gen_started.elapsed().as_secs_f64()
    );
    std::fs::write(&path, &text)?;
    let child = Command::new(&control)
        .arg("run")
        .arg("--manifest")
        .arg(&path)
        .arg("--shm-dir")
        .arg(&shm)
        .arg("--poll-ms")
        .arg(poll_ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", control.display()))?;
    scratch.child = Some(child);
    let first = wait_for(&shm, 1, Duration::from_secs(300))?;
    eprintln!(
        "publish-latency: first snapshot after {:.2} s",
        first.as_secs_f64()
    );

    let mut times = Vec::with_capacity(usize::from(changes));
    for k in 1..=u32::from(changes) {
        let text = manifest(services, endpoints, k);
        let before = current(&shm).unwrap_or(0);
        let tmp = dir.join("manifest.yaml.tmp");
        std::fs::write(&tmp, &text)?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, &path)?;
        wait_for(&shm, before + 1, Duration::from_secs(300))?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!();
    println!("| manifest change → published snapshot ({services} services × {endpoints} endpoints) | ms |");
    println!("|---|---|");
    println!("| median of {} changes | {:.1} |", times.len(), pick(0.5));
    println!("| p99 | {:.1} |", pick(0.99));
    println!("| min | {:.1} |", times[0]);
    println!("| max | {:.1} |", times[times.len() - 1]);
    println!("| control's poll interval (included) | {poll_ms} |");
    Ok(())
}
