//! SIGTERM and SIGINT for `run`: the main loop stops between two publishes
//! (a publish in progress is finished, never cut short: it runs without an
//! await point), logs one line and `run` exits 0. The last snapshot stays
//! published for the gateway.

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::info;

/// The two stop signals, caught from [`Stop::install`] on (before it, they
/// end the process with the default action).
#[derive(Debug)]
pub struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    /// Catches SIGTERM and SIGINT. Must run inside a tokio runtime with its
    /// I/O driver; a signal that comes while that runtime is not polled is
    /// kept and seen by the next [`Stop::wait`].
    ///
    /// # Errors
    /// A handler cannot be installed.
    pub fn install() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
        })
    }

    /// Waits for either signal; logs `received SIGTERM, stopping` (or
    /// SIGINT) and returns its name.
    pub async fn wait(&mut self) -> &'static str {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        info!(signal = name, "received {name}, stopping");
        name
    }
}
