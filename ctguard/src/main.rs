//! ctguard's entry point: parse the command line, run the command, turn errors
//! into a message with a hint and exit code 2.
use std::process::ExitCode;

use clap::Parser;
use ctguard::cli::{Cli, Command};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Doctor(args) => ctguard::doctor::run(args),
        Command::Status(args) => ctguard::status::run(args),
        Command::Trace(args) => ctguard::trace::run(args),
        Command::Top(args) => ctguard::top::run(args),
        Command::Recommend(args) => ctguard::recommend::run(args),
        Command::Rollback(args) => ctguard::recommend::rollback(args),
        Command::Bypass(args) => ctguard::bypass::run(args),
        Command::Lab(args) => ctguard::lab::run(args),
        Command::Capture(args) => ctguard::capture::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
