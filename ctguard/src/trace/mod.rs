use std::process::ExitCode;

pub fn run(_args: &crate::cli::TraceArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
