//! `clustergate-bench compare` (being written).

use anyhow::Result;

/// Flags of `clustergate-bench compare`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `clustergate-bench compare`.
pub fn run(_args: &Args) -> Result<()> {
    anyhow::bail!("not yet")
}
