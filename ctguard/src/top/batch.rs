//! `top --once` / `top --json`: frames for scripts, no terminal needed.
use std::{io::Write, process::ExitCode, time::Instant};

use serde::Serialize;

use super::{
    model::{self, Frame, FrameOptions, KeyFilter},
    render,
    sampler::Sampler,
};
use crate::{
    cli::TopArgs,
    sensors::{KeyMode, SensorOptions},
};

/// One JSON document per interval (schema `ctguard.top.v1`).
#[derive(Serialize)]
pub struct Document<'a> {
    schema: &'static str,
    time_unix_ms: u128,
    key_mode: KeyMode,
    #[serde(flatten)]
    frame: &'a Frame,
}

impl<'a> Document<'a> {
    pub fn new(frame: &'a Frame, key_mode: KeyMode) -> Self {
        let time_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Document { schema: "ctguard.top.v1", time_unix_ms, key_mode, frame }
    }
}

pub fn run(args: &TopArgs, opts: &SensorOptions, filter: &KeyFilter) -> anyhow::Result<ExitCode> {
    let only = filter.netns;
    let mut sampler = Sampler::start(opts, only)?;
    let mut prev = sampler.sample()?;
    let started = Instant::now();
    let limit = if args.once { 1 } else { args.count.unwrap_or(u64::MAX) };
    let mut out = std::io::stdout().lock();
    let mut emitted = 0;
    while emitted < limit && args.duration.is_none_or(|d| started.elapsed() < d) {
        std::thread::sleep(args.interval);
        let cur = sampler.sample()?;
        let frame = model::frame(&prev, &cur, &FrameOptions { mode: args.by, sort: args.sort, top: args.top, filter });
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&Document::new(&frame, args.by))?)?;
        } else {
            write!(out, "{}", render::text(&frame, args.by))?;
        }
        out.flush()?;
        emitted += 1;
        prev = cur;
    }
    Ok(ExitCode::SUCCESS)
}
