//! `ctguard lab`: a self-contained demonstration in throw-away network
//! namespaces, and `ctguard lab flood`, the new-flow generator it uses.
mod env;
mod flood_cmd;
pub mod max_guard;
mod story;

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(long_about = "Builds two throw-away network namespaces joined by a veth, makes the \
server track connections, lowers nf_conntrack_max, floods it with short-lived UDP flows (most \
to one hot port) and shows ctguard catching every table-full drop (matched against the kernel's \
own drop counter), what `ctguard recommend` says, and what a `ctguard bypass` rule for the hot \
port changes. Everything is undone at exit, also on Ctrl-C; a lab killed with SIGKILL is cleaned \
up by the next one.\n\nNeeds root. Only sends to the lab's own 10.253.0.0/24 veth link.")]
pub struct LabArgs {
    #[command(subcommand)]
    pub command: Option<LabCommand>,
    /// Never wait for Enter between acts (for CI and docs).
    #[arg(long)]
    pub script: bool,
    /// nf_conntrack_max during the lab (the default fits the cold ports'
    /// flows but not the hot port's, so the bypass alone ends the drops).
    #[arg(long, default_value_t = 8192)]
    pub max: u64,
    /// New flows per load round.
    #[arg(long, default_value_t = 20_000)]
    pub flows: u64,
    /// Flows per second; 0 sends as fast as this machine can (the default
    /// keeps each round a few seconds long, so the narration can follow it).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// The port most flows go to (and that the fix exempts from tracking).
    #[arg(long, default_value_t = 5353)]
    pub hot_port: u16,
    /// Which kernel hooks to use for the sensors (see `ctguard doctor`).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: crate::sensors::backend::BackendRequest,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Send new flows (one packet each) from one namespace to an address on a test link.
    Flood(flood_cmd::FloodArgs),
}

pub fn run(args: &LabArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        Some(LabCommand::Flood(f)) => flood_cmd::run(f),
        None => {
            if args.max == 0 || args.flows == 0 {
                return Err(crate::error::CtguardError::usage(
                    "--max and --flows must be greater than 0",
                    "e.g. ctguard lab --max 1024 --flows 20000 --rate 10000",
                )
                .into());
            }
            story::run(args)
        }
    }
}
