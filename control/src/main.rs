//! `clustergate-control`: the control daemon.
//!
//! Reads Services and EndpointSlices from the Kubernetes API or from a
//! manifest, applies kube-proxy's semantics, builds one Maglev ring per
//! frontend and publishes the table as a snapshot for the gateway.
//!
//! - `run`: publish, then publish again whenever the objects change. The
//!   source is the API (`--in-cluster` or `--kubeconfig`, watched through
//!   `clustergate_control::kube_source`) or a manifest file (`--manifest`,
//!   polled). Refused objects, a broken manifest or an unreachable API keep the
//!   last good snapshot.
//! - `show`: print what would be programmed (JSON or a table for people).
//! - `build`: write one snapshot file.
//! - `maglev`: build one ring and report its size, balance and build time.

use std::net::IpAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use clustergate_control::kube_source::{self, FollowConfig};
use clustergate_control::{load_manifest_file, Model};
use clustergate_dataplane::flow::addr16;
use clustergate_dataplane::maglev::{
    build_ring, ring_size_for, MaglevBackend, DEFAULT_MAX_RING_SIZE,
};
use clustergate_dataplane::snapshot::{self, Writer};
use clustergate_dataplane::table::{ServiceSpec, Table};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(
    name = "clustergate-control",
    version,
    about = "clustergate control daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// `{"frontends": [...], "skipped": [...]}`.
    Json,
    /// For people, like `ipvsadm -Ln`.
    Table,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish the tables, then again whenever the Services or EndpointSlices change.
    #[command(group(ArgGroup::new("source").required(true).args(["manifest", "kubeconfig", "in_cluster"])))]
    Run {
        /// Read a YAML manifest (a `kubectl get -o yaml` List, or documents separated by `---`) and poll it.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Watch the API server of this kubeconfig file (its current context).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Watch the API server of the cluster this pod runs in (its service account).
        #[arg(long)]
        in_cluster: bool,
        /// Directory the snapshots are published in.
        #[arg(long, default_value = snapshot::DEFAULT_DIR)]
        shm_dir: PathBuf,
        /// Serve only services without a `service.kubernetes.io/service-proxy-name` label, or with this value.
        #[arg(long, default_value = "clustergate")]
        proxy_name: String,
        /// How often to look at the manifest, in milliseconds (`--manifest` only).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        poll_ms: u64,
        /// Least time between two table builds from the API, in milliseconds
        /// (kube-proxy's `--min-sync-period`); 0: as fast as changes come.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
        min_sync_period_ms: u64,
        /// Flow-hash seed written into every snapshot (all gateways of one ECMP group must share it).
        #[arg(long, default_value_t = 0)]
        hash_seed: u64,
        /// Publish once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print what would be programmed.
    Show {
        /// YAML manifest.
        #[arg(long)]
        manifest: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Proxy name (see `run`).
        #[arg(long, default_value = "clustergate")]
        proxy_name: String,
    },
    /// Write one snapshot file.
    Build {
        /// YAML manifest.
        #[arg(long)]
        manifest: PathBuf,
        /// Snapshot file to write.
        #[arg(long)]
        out: PathBuf,
        /// Proxy name (see `run`).
        #[arg(long, default_value = "clustergate")]
        proxy_name: String,
        /// Generation recorded in the snapshot.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        generation: u64,
        /// Flow-hash seed.
        #[arg(long, default_value_t = 0)]
        hash_seed: u64,
    },
    /// Build one Maglev ring for N equal-weight backends and report on it.
    Maglev {
        /// Number of backends, 1..=100000.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        backends: u32,
        /// Cap on the ring size M, at least 2.
        #[arg(long, default_value_t = DEFAULT_MAX_RING_SIZE, value_parser = clap::value_parser!(u32).range(2..))]
        max_ring: u32,
    },
}

fn main() {
    clustergate_dataplane::cli::exit_on_error(real_main());
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    // The daemon says what it publishes; one-shot commands only warn.
    let default_level = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run {
            manifest,
            kubeconfig,
            in_cluster,
            shm_dir,
            proxy_name,
            poll_ms,
            min_sync_period_ms,
            hash_seed,
            once,
        } => match (manifest, kubeconfig) {
            (Some(manifest), _) => run(
                &manifest,
                &shm_dir,
                &proxy_name,
                Duration::from_millis(poll_ms),
                hash_seed,
                once,
            ),
            (None, kubeconfig) => {
                debug_assert!(kubeconfig.is_some() != in_cluster, "clap's group");
                let config = FollowConfig {
                    proxy_name,
                    min_sync: Duration::from_millis(min_sync_period_ms),
                };
                run_api(kubeconfig.as_deref(), &shm_dir, &config, hash_seed, once)
            }
        },
        Command::Show {
            manifest,
            output,
            proxy_name,
        } => {
            let model = load_manifest_file(&manifest, &proxy_name)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&model.to_json())?),
                Output::Table => print!("{}", model.to_table()),
            }
            Ok(())
        }
        Command::Build {
            manifest,
            out,
            proxy_name,
            generation,
            hash_seed,
        } => {
            let model = load_manifest_file(&manifest, &proxy_name)?;
            let table = Table::build(generation, hash_seed, &model.service_specs())
                .with_context(|| format!("building the table for {}", manifest.display()))?;
            std::fs::write(&out, snapshot::encode(&table))
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {}: generation {generation}, {} frontends, {} backends",
                out.display(),
                table.frontends().len(),
                table.backend_records().len()
            );
            Ok(())
        }
        Command::Maglev { backends, max_ring } => maglev(backends, max_ring),
    }
}

/// What `run` published last.
struct Published {
    generation: u64,
    specs: Vec<ServiceSpec>,
}

fn run(
    manifest: &Path,
    dir: &Path,
    proxy_name: &str,
    poll: Duration,
    seed: u64,
    once: bool,
) -> Result<()> {
    let mut writer = Writer::open(dir)
        .with_context(|| format!("opening snapshot directory {}", dir.display()))?;
    info!(dir = %dir.display(), next_generation = writer.next_generation(), "publishing snapshots");
    let mut last_text: Option<String> = None;
    let mut published: Option<Published> = None;
    loop {
        match std::fs::read_to_string(manifest) {
            Err(e) => {
                if last_text.take().is_some() || published.is_none() {
                    error!(manifest = %manifest.display(), "cannot read the manifest: {e}; keeping the last snapshot");
                }
            }
            Ok(text) if last_text.as_deref() == Some(text.as_str()) => {}
            Ok(text) => {
                let started = Instant::now();
                match apply(
                    &text,
                    manifest,
                    proxy_name,
                    seed,
                    &mut writer,
                    published.as_ref(),
                ) {
                    Ok(Some(p)) => {
                        info!(
                            generation = p.generation,
                            frontends = p.specs.len(),
                            took_ms = started.elapsed().as_secs_f64() * 1e3,
                            "published"
                        );
                        published = Some(p);
                    }
                    Ok(None) => info!("manifest changed but the tables did not: no new generation"),
                    Err(e) => error!(
                        "{e:#}; keeping generation {}",
                        published.as_ref().map_or(0, |p| p.generation)
                    ),
                }
                last_text = Some(text);
            }
        }
        if once {
            return match published {
                Some(_) => Ok(()),
                None => anyhow::bail!("nothing was published from {}", manifest.display()),
            };
        }
        std::thread::sleep(poll);
    }
}

/// `run` with the API as the source: follows Services and EndpointSlices and
/// publishes every model whose tables differ from the last published ones.
fn run_api(
    kubeconfig: Option<&Path>,
    dir: &Path,
    config: &FollowConfig,
    seed: u64,
    once: bool,
) -> Result<()> {
    let mut writer = Writer::open(dir)
        .with_context(|| format!("opening snapshot directory {}", dir.display()))?;
    info!(dir = %dir.display(), next_generation = writer.next_generation(), "publishing snapshots");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube_client(kubeconfig).await?;
        let mut published: Option<Published> = None;
        kube_source::follow(client, config, |model| {
            let started = Instant::now();
            match publish(&model, seed, &mut writer, published.as_ref()) {
                Ok(Some(p)) => {
                    info!(
                        generation = p.generation,
                        frontends = p.specs.len(),
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        "published"
                    );
                    published = Some(p);
                }
                Ok(None) => info!("objects changed but the tables did not: no new generation"),
                Err(e) => error!(
                    "{e:#}; keeping generation {}",
                    published.as_ref().map_or(0, |p| p.generation)
                ),
            }
            if once && published.is_some() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await;
        Ok(())
    })
}

/// A client for the API server of `kubeconfig` (its current context), or of
/// the cluster this pod runs in.
async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "in-cluster configuration (service account token and KUBERNETES_SERVICE_HOST)",
        )?,
    };
    info!(server = %config.cluster_url, "watching Services and EndpointSlices");
    kube::Client::try_from(config).context("creating the API client")
}

/// Builds and publishes the tables for `text`, unless they equal the last ones.
fn apply(
    text: &str,
    manifest: &Path,
    proxy_name: &str,
    seed: u64,
    writer: &mut Writer,
    last: Option<&Published>,
) -> Result<Option<Published>> {
    let objects = clustergate_control::parse_manifest(text)
        .with_context(|| format!("manifest {}", manifest.display()))?;
    let model: Model = clustergate_control::build_model(&objects, proxy_name)
        .with_context(|| format!("manifest {}", manifest.display()))?;
    publish(&model, seed, writer, last)
}

/// Builds and publishes the tables of `model`, unless they equal the last ones.
fn publish(
    model: &Model,
    seed: u64,
    writer: &mut Writer,
    last: Option<&Published>,
) -> Result<Option<Published>> {
    let specs = model.service_specs();
    if last.is_some_and(|p| p.specs == specs) {
        return Ok(None);
    }
    let generation = writer.next_generation();
    let table = Table::build(generation, seed, &specs).context("building the table")?;
    writer.publish(&table).context("publishing the snapshot")?;
    Ok(Some(Published { generation, specs }))
}

fn maglev(n: u32, cap: u32) -> Result<()> {
    let list: Vec<MaglevBackend> = (0..n)
        .map(|i| MaglevBackend {
            addr: addr16(IpAddr::from([198, 18, (i >> 8) as u8, i as u8])),
            port: 8080,
            weight: 1,
        })
        .collect();
    let m = ring_size_for(list.len(), cap);
    let t = Instant::now();
    let ring = build_ring(&list, m)?;
    let took = t.elapsed();
    let mut counts = vec![0u32; list.len()];
    for s in &ring {
        counts[*s as usize] += 1;
    }
    let (lo, hi) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    let mean = f64::from(m) / f64::from(n);
    println!("backends {n}, ring size M = {m} (prime, M > 100·N unless capped at {cap})");
    println!(
        "slots per backend: min {lo}, max {hi}, mean {mean:.1}; imbalance (max−min)/mean = {:.2} %",
        f64::from(hi - lo) / mean * 100.0
    );
    println!("build time: {:.3} ms", took.as_secs_f64() * 1e3);
    Ok(())
}
