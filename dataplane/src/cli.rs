//! What the three binaries share at their edge: how an error reaches a person,
//! how logs are written, and what `--version` says.
//!
//! Owns: [`exit_on_error`], [`LogFormat`] and [`init_logging`], [`long_version`].
//! Not used by the packet core.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by [`init_logging`] for `--log-format json`: the final error is then
/// a JSON log line too, so that every line on stderr parses.
static JSON_LOGS: AtomicBool = AtomicBool::new(false);

/// `--log-format`: how log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event; coloured only when stderr is a
    /// terminal (and `NO_COLOR` is unset).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, the
    /// event's other fields, `target`), never coloured.
    Json,
}

/// Installs the global tracing subscriber on stderr: `RUST_LOG` filters
/// (default `default_level`), `format` chooses text or JSON. Colour only on a
/// terminal: a file, a pipe or a container log gets no escape codes.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(use_colour()).init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, Ordering::Relaxed);
            builder
                .json()
                .with_ansi(false)
                .with_current_span(false)
                .init();
        }
    }
}

/// Colour on stderr: a terminal, and no `NO_COLOR` (<https://no-color.org>).
#[must_use]
pub fn use_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `--version`'s text after the program name: the crate version, the git
/// commit it was built from, the snapshot ABI version and the flow-hash
/// function it reads.
#[must_use]
pub fn long_version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        "\ncommit: ",
        env!("CLUSTERGATE_GIT_COMMIT"),
        "\nsnapshot ABI: 7",
        "\nflow hash: 1 (xxh3-64)",
    )
}

/// Prints `error: …` with the error's chain, each cause once (a cause whose
/// text its parent already shows is not repeated), and exits with status 1.
/// Under `--log-format json` the error is an error-level JSON log line.
/// No backtrace: a person gets the message; developers can debug with logs.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        if JSON_LOGS.load(Ordering::Relaxed) {
            tracing::error!("{}", describe(&e));
        } else {
            eprintln!("error: {}", describe(&e));
        }
        std::process::exit(1);
    }
}

/// The error chain as one line: `outer: cause: cause`, without repeats.
#[must_use]
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_not_repeated() {
        let inner = std::io::Error::other("70000 is not a valid port");
        let e = anyhow::Error::new(inner)
            .context("bad.yaml: 70000 is not a valid port")
            .context("manifest");
        assert_eq!(
            describe(&e),
            "manifest: bad.yaml: 70000 is not a valid port"
        );
        let e = anyhow::anyhow!("disk full").context("writing out.pcap");
        assert_eq!(describe(&e), "writing out.pcap: disk full");
    }

    #[test]
    fn version_names_the_abi_and_the_hash_in_force() {
        let v = long_version();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
        assert!(
            v.contains(&format!("snapshot ABI: {}\n", crate::snapshot::ABI_VERSION)),
            "{v}"
        );
        assert!(
            v.contains(&format!(
                "flow hash: {} (xxh3-64)",
                crate::snapshot::HASH_XXH3_64
            )),
            "{v}"
        );
        assert!(v.contains("commit: "), "{v}");
    }
}
