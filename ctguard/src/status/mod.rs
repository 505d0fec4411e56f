//! `ctguard status`: conntrack occupancy, counters, timeouts and memory per
//! network namespace, with a health verdict as the exit code.
mod collect;
pub mod health;
mod render;
pub mod report;

use std::{io::Write as _, process::ExitCode};

pub use self::{
    health::Health,
    report::{NamespaceStatus, StatusReport},
};
use crate::{cli::StatusArgs, conntrack::memory, netns::Netns};

pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let namespaces = Netns::resolve(args.netns.as_deref())?;
    // Only `all` may contain namespaces that fail or vanish mid-read; one
    // namespace asked for by name must be read or be an error.
    let keep_going = args.netns.as_deref() == Some("all");
    let observations = collect::observe(&namespaces, args.interval, keep_going)?;
    let possible_cpus = collect::possible_cpus();
    let report = report::build(observations, memory::lookup_object_size(), possible_cpus.as_deref(), args.interval);
    let text =
        if args.json { serde_json::to_string_pretty(&report)? + "\n" } else { render::table(&report, args.per_cpu) };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(ExitCode::from(report.health.exit_code()))
}
