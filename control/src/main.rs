//! `clustergate-control`: the control daemon.
//!
//! Reads Services and EndpointSlices from the Kubernetes API or from a
//! manifest, applies kube-proxy's semantics, builds one Maglev ring per
//! frontend and publishes the table as a snapshot for the gateway.
//!
//! - `run`: publish, then publish again whenever the objects change. The
//!   source is the API (`--in-cluster` or `--kubeconfig`, watched through
//!   `clustergate_control::kube_source`) or a manifest file (`--manifest`,
//!   polled), or a manifest directory (`--manifest DIR`, watched with inotify,
//!   only the changed files re-read: `clustergate_control::manifest_dir`). An object that cannot be used is skipped alone (logged once,
//!   counted in `clustergate_control_objects_skipped`); a broken manifest or
//!   an unreachable API keep the last good snapshot.
//!   `run` serves Prometheus metrics at `--metrics` and `/healthz`, `/livez`
//!   at `--health` (see `docs/operations.md`).
//! - `show`: print what would be programmed (JSON or a table for people),
//!   from a manifest or from the API (`--kubeconfig`, `--in-cluster`: listed
//!   once through `kube_source::list_objects`, then the same model and output).
//!
//! `run` stops on SIGTERM or SIGINT between two publishes, logs it and exits
//! 0 (`stop.rs`). Every command logs to stderr as `--log-format` says (text,
//! in colour only on a terminal, or one JSON object per line); `--version`
//! names the git commit (`build.rs`), the snapshot ABI and the flow hash.
//! - `build`: write one snapshot file.
//!
//! `show` and `build` exit with [`EXIT_SKIPPED`] (3) when the manifest has an
//! object that cannot be used (an invalid value, a duplicate, a clash: see
//! [`Model::errors`]) after printing or building the rest; with `--strict`
//! such a manifest is refused (exit 1, nothing printed or written).
//!
//! `run`, `show` and `build` take `--proxy-name`, `--return-path` (the
//! return path of Services without the `clustergate.io/return-path`
//! annotation; default `snat`), `--nodeport-addresses` (where node ports are
//! served; default every address of the node) and `--service-node-port-range`
//! (node ports outside it are skipped; default 30000-32767), see
//! `docs/semantics.md`. `run` also answers each `healthCheckNodePort` of the
//! published model (`health_check.rs`).
//! - `maglev`: build one ring and report its size, balance and build time.

mod health;
mod health_check;
mod metrics;
mod serve;
mod stop;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{ArgGroup, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use clustergate_builder::maglev::{
    build_ring, ring_size_for, MaglevBackend, DEFAULT_MAX_RING_SIZE,
};
use clustergate_builder::snapshot::{self, Written};
use clustergate_builder::TableBuild;
use clustergate_control::incremental::{IncrementalModel, TableChanges};
use clustergate_control::kube_source::{self, FollowConfig, Hooks};
use clustergate_control::manifest_dir::{self, ManifestDir};
use clustergate_control::model::{default_node_port_addresses, SkipLog};
use clustergate_control::publish::{Published, Publisher};
use clustergate_control::{
    load_manifest_file, load_manifest_file_strict, Model, ModelOptions, Skipped,
    DEFAULT_PROXY_NAME, DEFAULT_RETURN_PATH,
};
use clustergate_dataplane::flow::addr16;
use clustergate_dataplane::table::{ReturnPath, Table};
use ipnet::IpNet;
use tracing::{debug, error, info, warn};

use crate::health_check::HealthChecks;
use crate::metrics::Telemetry;
use crate::serve::{Handler, Response};
use crate::stop::Stop;

/// The exit status of `show` and `build` when objects were skipped as invalid
/// (what `--strict` refuses): the rest was printed or built.
const EXIT_SKIPPED: i32 = 3;

/// `show` and `build`: the exit statuses, for `--help`.
const EXIT_STATUS_HELP: &str = "Exit status: 0 all objects usable (some may be skipped as kube-proxy skips them, e.g. \
ExternalName); 3 the rest was printed/built but some objects or fields are invalid and were skipped \
(listed under Skipped); 1 error (unreadable manifest, or with --strict an invalid object); 2 bad usage.";

/// kube-proxy's default `--metrics-bind-address`.
const DEFAULT_METRICS: &str = "127.0.0.1:10249";
/// kube-proxy's default `--healthz-bind-address`.
const DEFAULT_HEALTH: &str = "0.0.0.0:10256";

#[derive(Debug, Parser)]
#[command(
    name = "clustergate-control",
    version,
    about = "clustergate control daemon"
)]
struct Cli {
    /// Log format on stderr: `text` for people (no colour unless stderr is a
    /// terminal), `json` one object per line for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// `2026-01-01T12:00:00.123456Z  INFO target: message field=value`.
    Text,
    /// `{"timestamp":…,"level":"INFO","message":…,FIELD:…,"target":…}`, one object per line.
    Json,
}

/// What `--version` prints after the name: the crate's version, the git
/// commit it was built from (`unknown` outside a repository), and the
/// snapshot ABI and flow hash it publishes, which the gateway must share.
fn long_version() -> String {
    format!(
        "{} (commit {}, snapshot ABI {}, flow hash {} = {})",
        env!("CARGO_PKG_VERSION"),
        env!("CLUSTERGATE_GIT_COMMIT"),
        snapshot::ABI_VERSION,
        snapshot::HASH_XXH3_64,
        hash_name(snapshot::HASH_XXH3_64),
    )
}

/// The name of a flow-hash id of the snapshot header.
fn hash_name(id: u32) -> &'static str {
    if id == snapshot::HASH_XXH3_64 {
        "XXH3-64"
    } else {
        "unknown"
    }
}

/// Installs the global subscriber: `format` on stderr, ANSI colour only on a
/// terminal, `RUST_LOG` or else `default_level`.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
}

/// How Services become frontends: the options of every command that builds a model.
#[derive(Debug, Args)]
struct ModelArgs {
    /// Serve only Services without a `service.kubernetes.io/service-proxy-name` label, or with this value.
    #[arg(long, default_value = DEFAULT_PROXY_NAME)]
    proxy_name: String,
    /// Return path of Services without a `clustergate.io/return-path` annotation.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_RETURN_PATH.as_str(), value_parser = return_path_parser())]
    return_path: ReturnPath,
    /// Serve node ports on the node's addresses within these CIDRs (kube-proxy's flag)
    /// [default: every address: 0.0.0.0/0,::/0].
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    nodeport_addresses: Vec<IpNet>,
    /// Node ports (and health-check node ports) outside this range are skipped (the API server's flag).
    #[arg(long, value_name = "FIRST-LAST", default_value = "30000-32767", value_parser = parse_port_range)]
    service_node_port_range: (u16, u16),
}

impl ModelArgs {
    fn options(self) -> ModelOptions {
        let (first, last) = self.service_node_port_range;
        ModelOptions {
            proxy_name: self.proxy_name,
            return_path: self.return_path,
            node_port_range: first..=last,
            node_port_addresses: if self.nodeport_addresses.is_empty() {
                default_node_port_addresses()
            } else {
                self.nodeport_addresses
            },
        }
    }
}

/// One `--nodeport-addresses` entry: a CIDR (host bits are cleared).
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/64)"))
}

/// `--service-node-port-range`: `FIRST-LAST`, both ports, FIRST <= LAST.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a port range FIRST-LAST (e.g. 30000-32767)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let first = a.trim().parse::<u16>().map_err(|_| bad())?;
    let last = b.trim().parse::<u16>().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(bad());
    }
    Ok((first, last))
}

/// `--return-path`: one of the names of [`ReturnPath`], listed in `--help`
/// and in the error for any other value.
fn return_path_parser() -> impl TypedValueParser<Value = ReturnPath> {
    PossibleValuesParser::new(ReturnPath::ALL.map(|p| {
        PossibleValue::new(p.as_str()).help(match p {
            ReturnPath::Snat => "the gateway replaces the client's address and port with its own",
            ReturnPath::Dsr => {
                "backends get the client's packet encapsulated and answer it directly"
            }
            ReturnPath::Routed => "backends route their replies back through the gateway",
        })
    }))
    .try_map(|s| s.parse::<ReturnPath>())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// `{"frontends": [...], "skipped": [...], "notes": [...]}`.
    Json,
    /// For people, like `ipvsadm -Ln`.
    Table,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish the tables, then again whenever the Services or EndpointSlices change.
    #[command(group(ArgGroup::new("source").required(true).args(["manifest", "kubeconfig", "in_cluster"])))]
    Run {
        /// Read a YAML manifest (a `kubectl get -o yaml` List, or documents separated by `---`) and poll it;
        /// or a directory of them (every `*.yaml`/`*.yml` file), watched with inotify.
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
        #[command(flatten)]
        model: ModelArgs,
        /// How often to look at the manifest, in milliseconds (`--manifest` only).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        poll_ms: u64,
        /// Least time between two table builds from the API or a manifest
        /// directory, in milliseconds (kube-proxy's `--min-sync-period`); 0: as
        /// fast as changes come.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
        min_sync_period_ms: u64,
        /// Watch Pods, Namespaces and NetworkPolicies and enforce the
        /// policies (API only; a manifest's are always used). `false` skips
        /// those watches and publishes no policy: every flow is allowed.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
        network_policy: bool,
        /// Flow-hash seed written into every snapshot (all gateways of one ECMP group must share it).
        #[arg(long, default_value_t = 0)]
        hash_seed: u64,
        /// Publish once and exit.
        #[arg(long)]
        once: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics [default: 127.0.0.1:10249].
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Serve `/healthz` and `/livez` at ADDR [default: 0.0.0.0:10256].
        #[arg(long, value_name = "ADDR")]
        health: Option<SocketAddr>,
        /// Seconds a change may wait unpublished, or the API stay unreachable,
        /// before `/healthz` answers 503.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        unpublished_bound_s: u64,
    },
    /// Print what would be programmed, from a manifest or from the API (listed once).
    #[command(
        after_help = EXIT_STATUS_HELP,
        group(ArgGroup::new("source").required(true).args(["manifest", "kubeconfig", "in_cluster"]))
    )]
    Show {
        /// YAML manifest, or a directory of them (every `*.yaml`/`*.yml` file).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// List Services, EndpointSlices and Nodes from the API server of this kubeconfig file (its current context).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// List them from the API server of the cluster this pod runs in (its service account).
        #[arg(long)]
        in_cluster: bool,
        /// Refuse the whole manifest or listing (exit 1, print nothing) if any object is invalid.
        #[arg(long)]
        strict: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Explain NetworkPolicy instead: may this client address open
        /// connections to the Service of `--policy-to`, backend by backend?
        #[arg(long, requires = "policy_to")]
        policy_from: Option<IpAddr>,
        /// With `--policy-from`: the Service, `namespace/name` or
        /// `namespace/name:port` (a port name or number).
        #[arg(long, requires = "policy_from")]
        policy_to: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Write one snapshot file.
    #[command(after_help = EXIT_STATUS_HELP)]
    Build {
        /// YAML manifest, or a directory of them (every `*.yaml`/`*.yml` file).
        #[arg(long)]
        manifest: PathBuf,
        /// Refuse the whole manifest (exit 1, write nothing) if any object is invalid.
        #[arg(long)]
        strict: bool,
        /// Snapshot file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
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
    match real_main() {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => clustergate_dataplane::cli::exit_on_error(Err(e)),
    }
}

/// The model of a manifest for `show` and `build`: with `strict`, refused
/// when anything is invalid; else with every skip logged once.
fn one_shot_model(manifest: &Path, options: &ModelOptions, strict: bool) -> Result<Model> {
    if strict {
        return Ok(load_manifest_file_strict(manifest, options)?);
    }
    let model = load_manifest_file(manifest, options)?;
    SkipLog::default().log(&model);
    Ok(model)
}

/// The model of the objects the API server of `kubeconfig` (or of this
/// pod's cluster) lists now, for `show`: with `strict`, refused when anything
/// is invalid; else with every skip logged once.
fn api_model(kubeconfig: Option<&Path>, options: &ModelOptions, strict: bool) -> Result<Model> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube_client(kubeconfig, "listing").await?;
        let objects = kube_source::list_objects(client)
            .await
            .context("listing Services, EndpointSlices and Nodes")?;
        let model = clustergate_control::build_model(&objects, options);
        if strict {
            return model.strict().context("the objects listed (--strict)");
        }
        SkipLog::default().log(&model);
        Ok(model)
    })
}

/// [`EXIT_SKIPPED`] when `model` has invalid objects, else 0.
fn exit_status(model: &Model) -> i32 {
    if model.errors.is_empty() {
        0
    } else {
        EXIT_SKIPPED
    }
}

/// The command; `Ok` holds the exit status.
fn real_main() -> Result<i32> {
    // `String::leak`: clap keeps `&'static str`s; this runs once.
    let command = Cli::command().version(long_version().leak() as &str);
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    // The daemon says what it publishes; one-shot commands only warn.
    let default_level = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    init_logging(cli.log_format, default_level);
    match cli.command {
        Command::Run {
            manifest,
            kubeconfig,
            in_cluster,
            shm_dir,
            model,
            poll_ms,
            min_sync_period_ms,
            network_policy,
            hash_seed,
            once,
            metrics,
            health,
            unpublished_bound_s,
        } => {
            let bound = Duration::from_secs(unpublished_bound_s);
            let poll = Duration::from_millis(poll_ms);
            // The manifest loop beats once per poll; the API loop once a second.
            let beat_bound = bound
                + if manifest.is_some() {
                    poll
                } else {
                    Duration::ZERO
                };
            let source = if manifest.is_some() {
                "manifest"
            } else {
                "api"
            };
            let telemetry = Arc::new(Telemetry::new(bound, beat_bound, source));
            let mut checks = None;
            if !once {
                serve_telemetry(metrics, health, &telemetry)?;
                checks = Some(HealthChecks::start(Arc::clone(&telemetry))?);
            }
            let options = model.options();
            info!(
                proxy_name = %options.proxy_name,
                default_return_path = %options.return_path,
                "Services without the clustergate.io/return-path annotation use the default return path"
            );
            let result = match (manifest, kubeconfig) {
                (Some(manifest), _) => run(
                    &manifest,
                    &shm_dir,
                    &options,
                    poll,
                    Duration::from_millis(min_sync_period_ms),
                    hash_seed,
                    once,
                    &telemetry,
                    checks.as_mut(),
                ),
                (None, kubeconfig) => {
                    debug_assert!(kubeconfig.is_some() != in_cluster, "clap's group");
                    let config = FollowConfig {
                        model: options,
                        min_sync: Duration::from_millis(min_sync_period_ms),
                        network_policy,
                    };
                    run_api(
                        kubeconfig.as_deref(),
                        &shm_dir,
                        &config,
                        hash_seed,
                        once,
                        &telemetry,
                        checks.as_mut(),
                    )
                }
            };
            result.map(|()| 0)
        }
        Command::Show {
            manifest,
            kubeconfig,
            in_cluster,
            strict,
            output,
            policy_from,
            policy_to,
            model,
        } => {
            let options = model.options();
            let model = match manifest {
                Some(manifest) => one_shot_model(&manifest, &options, strict)?,
                None => {
                    debug_assert!(kubeconfig.is_some() != in_cluster, "clap's group");
                    api_model(kubeconfig.as_deref(), &options, strict)?
                }
            };
            if let (Some(from), Some(to)) = (policy_from, policy_to) {
                let text = model
                    .explain_policy(from, &to)
                    .map_err(|e| anyhow::anyhow!("--policy-to {to}: {e}"))?;
                print!("{text}");
                return Ok(exit_status(&model));
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&model.to_json())?),
                Output::Table => print!("{}", model.to_table()),
            }
            Ok(exit_status(&model))
        }
        Command::Build {
            manifest,
            strict,
            out,
            model,
            generation,
            hash_seed,
        } => {
            let model = one_shot_model(&manifest, &model.options(), strict)?;
            let table = Table::build_full(
                generation,
                hash_seed,
                &model.table_spec(),
                DEFAULT_MAX_RING_SIZE,
            )
            .with_context(|| format!("building the table for {}", manifest.display()))?;
            std::fs::write(&out, snapshot::encode(&table))
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {}: generation {generation}, {} frontends, {} backends",
                out.display(),
                table.frontends().len(),
                table.backend_records().len()
            );
            if !model.errors.is_empty() {
                let n = model.errors.len();
                eprintln!(
                    "skipped {n} invalid object{} or field{0} (see the warnings above, or `show`); \
                     exit status {EXIT_SKIPPED}",
                    if n == 1 { "" } else { "s" },
                );
            }
            Ok(exit_status(&model))
        }
        Command::Maglev { backends, max_ring } => maglev(backends, max_ring).map(|()| 0),
    }
}

/// Starts the `--metrics` and `--health` servers. An address given on the
/// command line that cannot be bound is an error; a default one is only
/// warned about (another process, kube-proxy say, may hold it).
fn serve_telemetry(
    metrics: Option<SocketAddr>,
    health: Option<SocketAddr>,
    telemetry: &Arc<Telemetry>,
) -> Result<()> {
    let metrics_handler: Handler = {
        let telemetry = Arc::clone(telemetry);
        Arc::new(move |path: &str| match path {
            "/metrics" => Response {
                status: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                headers: Vec::new(),
                body: telemetry.metrics.encode(),
            },
            _ => Response::text(404, "not found: try /metrics\n"),
        })
    };
    let health_handler: Handler = {
        let telemetry = Arc::clone(telemetry);
        Arc::new(move |path: &str| match path {
            "/healthz" => {
                let (status, body) = telemetry.healthz();
                Response {
                    status,
                    content_type: "application/json",
                    headers: Vec::new(),
                    body,
                }
            }
            "/livez" => {
                let (status, body) = telemetry.livez();
                Response::text(status, body)
            }
            _ => Response::text(404, "not found: try /healthz or /livez\n"),
        })
    };
    let mut servers = Vec::new();
    for (flag, given, default, handler) in [
        ("--metrics", metrics, DEFAULT_METRICS, metrics_handler),
        ("--health", health, DEFAULT_HEALTH, health_handler),
    ] {
        let addr = match given {
            Some(addr) => addr,
            None => default.parse().context("default address")?,
        };
        match serve::bind(flag, addr) {
            Ok(listener) => servers.push((listener, handler)),
            Err(e) if given.is_some() => return Err(e),
            Err(e) => warn!("{e:#}; serving no {flag} endpoint (choose an address with {flag})"),
        }
    }
    serve::spawn(servers)
}

/// Logs the notes of `model` as warnings, unless they are the ones logged last.
fn warn_notes(model: &Model, last: &mut Option<Vec<Skipped>>) {
    if last.as_ref() == Some(&model.notes) {
        return;
    }
    for note in &model.notes {
        warn!(object = %note.object, "{}", note.reason);
    }
    *last = Some(model.notes.clone());
}

#[allow(clippy::too_many_arguments)] // reason: the command's flags, one by one
fn run(
    manifest: &Path,
    dir: &Path,
    options: &ModelOptions,
    poll: Duration,
    min_sync: Duration,
    seed: u64,
    once: bool,
    telemetry: &Telemetry,
    checks: Option<&mut HealthChecks>,
) -> Result<()> {
    match std::fs::metadata(manifest) {
        Ok(meta) if meta.is_dir() => {
            return run_dir(
                manifest, dir, options, poll, min_sync, seed, once, telemetry, checks,
            );
        }
        Ok(meta) if !meta.is_file() => {
            anyhow::bail!(
                "{}: --manifest is neither a file nor a directory",
                manifest.display()
            );
        }
        _ => {}
    }
    // Only for SIGTERM and SIGINT: the loop sleeps in it between two looks.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut stop = {
        let _entered = runtime.enter();
        Stop::install()?
    };
    let mut p = Publishing::new(dir, seed, telemetry, checks)?;
    let mut last_text: Option<String> = None;
    loop {
        telemetry.beat();
        match std::fs::read_to_string(manifest) {
            Err(e) => {
                if last_text.take().is_some() || p.published.is_none() {
                    error!(manifest = %manifest.display(), "cannot read the manifest: {e}; keeping the last snapshot");
                }
            }
            Ok(text) if last_text.as_deref() == Some(text.as_str()) => {}
            Ok(text) => {
                telemetry.source_changed();
                match model_of(&text, manifest, options, telemetry) {
                    // One file: what changed is not known, the whole table
                    // is built (still sharing every unchanged frontend).
                    Ok(model) => p.apply(&model, None),
                    Err(e) => error!("{e:#}; keeping generation {}", p.generation()),
                }
                last_text = Some(text);
            }
        }
        if once {
            return match p.published {
                Some(_) => Ok(()),
                None => anyhow::bail!("nothing was published from {}", manifest.display()),
            };
        }
        let stopped = runtime.block_on(async {
            tokio::select! {
                () = tokio::time::sleep(poll) => false,
                _ = stop.wait() => true,
            }
        });
        if stopped {
            p.log_stopped();
            return Ok(());
        }
    }
}

/// What `run` keeps between two publishes, whatever its source.
struct Publishing<'a> {
    publisher: Publisher,
    published: Option<Published>,
    notes: Option<Vec<Skipped>>,
    /// `None` where the source logs what it skips itself (the API's).
    skip_log: Option<SkipLog>,
    telemetry: &'a Telemetry,
    checks: Option<&'a mut HealthChecks>,
}

impl<'a> Publishing<'a> {
    fn new(
        dir: &Path,
        seed: u64,
        telemetry: &'a Telemetry,
        checks: Option<&'a mut HealthChecks>,
    ) -> Result<Self> {
        let publisher = Publisher::open(dir, seed)?;
        info!(dir = %dir.display(), next_generation = publisher.next_generation(), "publishing snapshots");
        Ok(Self {
            publisher,
            published: None,
            notes: None,
            skip_log: Some(SkipLog::default()),
            telemetry,
            checks,
        })
    }

    /// The generation published last (0: none).
    fn generation(&self) -> u64 {
        self.published.as_ref().map_or(0, |p| p.generation)
    }

    /// Publishes `model` unless its tables equal the last published ones;
    /// `changes`: what changed in its tables since the last call, when
    /// known (see [`Publisher::publish`]).
    fn apply(&mut self, model: &Model, changes: Option<&TableChanges>) {
        if let Some(log) = self.skip_log.as_mut() {
            log.log(model);
        }
        self.telemetry.skipped(model);
        warn_notes(model, &mut self.notes);
        self.telemetry.change_seen();
        let started = Instant::now();
        let result = self.publisher.publish(model, changes);
        if result.is_ok() {
            // Built in place: the same frontends, so the same counts.
            if !result
                .as_ref()
                .is_ok_and(|p| p.as_ref().is_some_and(|p| p.in_place))
            {
                self.telemetry.frontends(model);
            }
            if let Some(checks) = self.checks.as_deref_mut() {
                checks.sync(&model.health_checks);
            }
        }
        match result {
            Ok(Some(p)) => {
                let took = started.elapsed();
                self.telemetry.published(p.generation, took);
                match &p.written {
                    Written::Full(path) => {
                        debug!(generation = p.generation, path = %path.display(), "full snapshot written");
                    }
                    Written::Delta {
                        changed,
                        removed,
                        full,
                        ..
                    } => debug!(
                        generation = p.generation,
                        changed,
                        removed,
                        full = full.is_some(),
                        "delta written"
                    ),
                }
                info!(
                    generation = p.generation,
                    frontends = p.frontends,
                    in_place = p.in_place,
                    took_ms = took.as_secs_f64() * 1e3,
                    "published"
                );
                self.published = Some(p);
            }
            Ok(None) => {
                self.telemetry.unchanged();
                info!("the objects changed but the tables did not: no new generation");
            }
            Err(e) => error!("{e:#}; keeping generation {}", self.generation()),
        }
    }

    /// The last line of `run` after SIGTERM or SIGINT.
    fn log_stopped(&self) {
        match &self.published {
            Some(p) => info!(
                generation = p.generation,
                "stopped; generation {} stays published", p.generation
            ),
            None => info!("stopped before anything was published"),
        }
    }
}

/// The names of the manifest files an inotify event is about, or None when
/// the whole directory must be listed again (queue overflow, the directory
/// itself moved or removed). Events that do not end a write are ignored: a
/// file is re-read when it is closed after writing, renamed in or out, or
/// removed, never while half written.
fn event_names(event: &notify::Event, dir: &Path) -> Option<Vec<String>> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    if event.need_rescan() {
        return None;
    }
    let relevant = matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Remove(_)
    );
    if !relevant {
        return Some(Vec::new());
    }
    let mut names = Vec::new();
    for path in &event.paths {
        if path == dir {
            return None;
        }
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            if manifest_dir::is_manifest_name(name) {
                names.push(name.to_owned());
            } else if name.starts_with("..") {
                // A ConfigMap volume swaps its `..data` link: every file's
                // target may have changed.
                return None;
            }
        }
    }
    Some(names)
}

/// `run` on a manifest directory: watches it with inotify and re-reads only
/// the files an event names (falling back to polling every file's mtime
/// when the directory cannot be watched); a file that cannot be read keeps
/// its last good objects.
#[allow(clippy::too_many_arguments)] // reason: the command's flags, one by one
fn run_dir(
    manifest: &Path,
    dir: &Path,
    options: &ModelOptions,
    poll: Duration,
    min_sync: Duration,
    seed: u64,
    once: bool,
    telemetry: &Telemetry,
    checks: Option<&mut HealthChecks>,
) -> Result<()> {
    use notify::Watcher as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut stop = {
        let _entered = runtime.enter();
        Stop::install()?
    };
    let mut p = Publishing::new(dir, seed, telemetry, checks)?;
    // The watch starts before the first listing, so no change falls between.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })
    .and_then(|mut w| {
        w.watch(manifest, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let watcher = match watcher {
        Ok(w) => {
            info!(manifest = %manifest.display(), "watching the manifest directory");
            Some(w)
        }
        Err(e) => {
            warn!(
                manifest = %manifest.display(),
                "cannot watch the manifest directory ({e}); polling its files' mtimes every {} ms",
                poll.as_millis()
            );
            None
        }
    };
    let mut files = ManifestDir::new(manifest);
    // Only the objects of the files read again are taken up: the model is
    // updated for the Services they touch, not rebuilt.
    let mut model = IncrementalModel::new(options.clone(), manifest);
    // Some(names): re-read those files; None: list the directory again.
    let mut todo: Option<Vec<String>> = None;
    let mut first = true;
    let mut built: Option<Instant> = None;
    loop {
        telemetry.beat();
        let woke = Instant::now();
        let (changed, errors, read) = match todo.take() {
            None => match files.rescan() {
                Ok((changed, errors)) => (changed, errors, None),
                Err(e) => {
                    error!("{e}; keeping generation {}", p.generation());
                    (false, Vec::new(), Some(Vec::new()))
                }
            },
            Some(mut names) => {
                names.sort();
                names.dedup();
                let mut changed = false;
                let mut errors = Vec::new();
                for name in &names {
                    match files.refresh(name) {
                        Ok(c) => changed |= c,
                        Err(e) => errors.push(e),
                    }
                }
                (changed, errors, Some(names))
            }
        };
        for e in &errors {
            error!("{e}; the file's last good objects are kept");
        }
        if changed || !errors.is_empty() || first {
            first = false;
            telemetry.source_changed();
            let read_ms = woke.elapsed().as_secs_f64() * 1e3;
            let (services, slices) = model.sync_dir(&files, read.as_deref());
            telemetry.changes_seen(services, slices, None);
            let changes = model.take_table_changes();
            let model = model.model();
            debug!(
                files = read.as_ref().map_or(0, Vec::len),
                listed = read.is_none(),
                services,
                endpointslices = slices,
                read_ms,
                model_ms = woke.elapsed().as_secs_f64() * 1e3 - read_ms,
                "manifest files read"
            );
            p.apply(model, Some(&changes));
            built = Some(Instant::now());
        }
        if once {
            return match p.published {
                Some(_) => Ok(()),
                None => anyhow::bail!("nothing was published from {}", manifest.display()),
            };
        }
        // Waits for an event (the watcher) or a poll period (no watcher:
        // list again), then takes every event already queued, so a burst of
        // writes is read once.
        let woke = runtime.block_on(async {
            tokio::select! {
                event = rx.recv(), if watcher.is_some() => Some(event),
                () = tokio::time::sleep(poll) => Some(None),
                _ = stop.wait() => None,
            }
        });
        let Some(event) = woke else {
            p.log_stopped();
            return Ok(());
        };
        // `--min-sync-period-ms`: the events of the rest of the period are
        // read with this one.
        let wait = built.map_or(Duration::ZERO, |b| min_sync.saturating_sub(b.elapsed()));
        if event.is_some() && !wait.is_zero() {
            let stopped = runtime.block_on(async {
                tokio::select! {
                    () = tokio::time::sleep(wait) => false,
                    _ = stop.wait() => true,
                }
            });
            if stopped {
                p.log_stopped();
                return Ok(());
            }
        }
        if watcher.is_none() {
            todo = None;
            continue;
        }
        let mut names = Some(Vec::new());
        let mut take = |event: Option<notify::Result<notify::Event>>| match event {
            Some(Ok(event)) => match (event_names(&event, manifest), names.as_mut()) {
                (Some(n), Some(all)) => all.extend(n),
                (None, _) => names = None,
                (Some(_), None) => {}
            },
            Some(Err(e)) => {
                warn!("watching the manifest directory: {e}; listing it again");
                names = None;
            }
            None => {}
        };
        take(event);
        while let Ok(event) = rx.try_recv() {
            take(Some(event));
        }
        todo = names;
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
    telemetry: &Arc<Telemetry>,
    checks: Option<&mut HealthChecks>,
) -> Result<()> {
    let mut p = Publishing::new(dir, seed, telemetry, checks)?;
    // The API source logs what it skips.
    p.skip_log = None;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut stop = Stop::install()?;
        let client = kube_client(kubeconfig, "watching").await?;
        // Liveness: the runtime is turning (the callback below beats too).
        let beating = Arc::clone(telemetry);
        let beat = tokio::spawn(async move {
            loop {
                beating.beat();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let hooks = Hooks {
            changed: Some(Box::new(|| telemetry.source_changed())),
            changes: Some(Box::new(
                |services, slices, applied: &[k8s_openapi::api::discovery::v1::EndpointSlice]| {
                    telemetry.changes_seen(services, slices, Some(applied));
                },
            )),
            watch: Some(Box::new(|event| telemetry.watch(event))),
        };
        let follow = kube_source::follow_with(client, config, hooks, |model, changes| {
            telemetry.beat();
            p.apply(model, Some(changes));
            if once && p.published.is_some() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        // A publish runs inside the callback, without an await point: the
        // signal drops `follow` between two publishes, never during one.
        let stopped = tokio::select! {
            () = follow => false,
            _ = stop.wait() => true,
        };
        beat.abort();
        if stopped {
            p.log_stopped();
        }
        Ok(())
    })
}

/// A client for the API server of `kubeconfig` (its current context), or of
/// the cluster this pod runs in.
async fn kube_client(kubeconfig: Option<&Path>, doing: &str) -> Result<kube::Client> {
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
    info!(server = %config.cluster_url, "{doing} Services, EndpointSlices and Nodes");
    kube::Client::try_from(config).context("creating the API client")
}

/// The model of the manifest `text`; counts the objects that changed.
fn model_of(
    text: &str,
    manifest: &Path,
    options: &ModelOptions,
    telemetry: &Telemetry,
) -> Result<Model> {
    let objects = clustergate_control::parse_manifest(text)
        .with_context(|| format!("manifest {}", manifest.display()))?;
    telemetry.objects_seen(&objects, false);
    Ok(clustergate_control::build_model(&objects, options))
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
    println!(
        "backends {n}, ring size M = {m} (a fresh ring: the smallest prime >= max(200·N, min(2·N, 40)³/2), capped at {cap})"
    );
    println!(
        "slots per backend: min {lo}, max {hi}, mean {mean:.1}; imbalance (max−min)/mean = {:.2} %",
        f64::from(hi - lo) / mean * 100.0
    );
    println!("build time: {:.3} ms", took.as_secs_f64() * 1e3);
    Ok(())
}
