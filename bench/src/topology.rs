//! `clustergate-bench topology` (being written).

use anyhow::Result;

/// Flags of `clustergate-bench topology`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `clustergate-bench topology`.
pub fn run(_args: &Args) -> Result<()> {
    anyhow::bail!("not yet")
}
