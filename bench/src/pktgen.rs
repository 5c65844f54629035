//! `clustergate-bench pktgen` (being written).

use anyhow::Result;

/// Flags of `clustergate-bench pktgen`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `clustergate-bench pktgen`.
pub fn run(_args: &Args) -> Result<()> {
    anyhow::bail!("not yet")
}
