//! `ctguard bypass` (being written).
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct BypassArgs {}

pub fn run(_args: &BypassArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("ctguard bypass is not available yet")
}
