//! `clustergate-bench sink` (being written).

use anyhow::Result;

/// Flags of `clustergate-bench sink`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `clustergate-bench sink`.
pub fn run(_args: &Args) -> Result<()> {
    anyhow::bail!("not yet")
}
