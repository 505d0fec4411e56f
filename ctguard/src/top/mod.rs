//! `ctguard top`: live view of conntrack churn and drops.
//!
//! The sampler reads the kernel, `model` turns two samples into a frame (pure),
//! and either `batch` prints frames or `tui` draws them.
pub mod batch;
pub mod model;
pub mod render;
pub mod sampler;
mod tui;

use std::process::ExitCode;

use self::model::KeyFilter;
use crate::{cli::TopArgs, error::CtguardError, sensors::SensorOptions};

pub fn run(args: &TopArgs) -> anyhow::Result<ExitCode> {
    if args.interval.is_zero() {
        return Err(CtguardError::usage("--interval must be greater than 0", "e.g. --interval 1s").into());
    }
    let filter = key_filter(args)?;
    // top reads only the maps: no drop events are produced (none can be lost).
    let opts = SensorOptions {
        key_mode: args.by,
        max_keys: args.max_keys,
        backend: args.backend,
        emit_drop_events: false,
        ..Default::default()
    };
    if args.once || args.json || args.count.is_some() {
        batch::run(args, &opts, &filter)
    } else {
        tui::run(args, &opts, filter)
    }
}

fn key_filter(args: &TopArgs) -> anyhow::Result<KeyFilter> {
    args.filter.resolve()
}
