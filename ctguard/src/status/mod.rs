use std::process::ExitCode;

pub fn run(_args: &crate::cli::StatusArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
