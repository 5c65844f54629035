//! `clustergate-bench bounce` (being written).

use anyhow::Result;

/// Flags of `clustergate-bench bounce`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `clustergate-bench bounce`.
pub fn run(_args: &Args) -> Result<()> {
    anyhow::bail!("not yet")
}
