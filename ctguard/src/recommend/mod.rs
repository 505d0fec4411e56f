//! `ctguard recommend` and `ctguard rollback` (being written).
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RecommendArgs {}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {}

pub fn run(_args: &RecommendArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("ctguard recommend is not available yet")
}

pub fn rollback(_args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("ctguard rollback is not available yet")
}
