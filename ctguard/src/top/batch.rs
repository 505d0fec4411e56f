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

/// The schema name of `top --json` documents.
pub const TOP_SCHEMA: &str = "ctguard.top.v1";

/// Documents that carry a whole `top` frame: `top --json` output, and the
/// `stats.jsonl` lines of a capture bundle (a frame plus exact counts).
pub fn carries_top_frame(schema: &str) -> bool {
    schema == TOP_SCHEMA || schema == crate::capture::bundle::STATS_SCHEMA
}

/// Where saved `top` frames are read from: a file (or `-`), or a capture
/// bundle directory, whose `stats.jsonl` holds one frame per interval.
pub fn frames_path(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_dir() { path.join("stats.jsonl") } else { path.to_path_buf() }
}

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
        Document { schema: TOP_SCHEMA, time_unix_ms, key_mode, frame }
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::{
        sensors::snapshot::Cause,
        top::model::{KeyRow, ProgramCost, Rates, TableView, Trend},
    };

    /// Every path of a JSON value: `a.b`, arrays as `a[].b`.
    fn paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    out.insert(p.clone());
                    paths(child, &p, out);
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    paths(item, &format!("{prefix}[]"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_documented_schema_is_the_real_one() {
        let frame = Frame {
            interval_s: 1.0,
            rates: Rates {
                new_per_s: 1.0,
                removed_per_s: 0.0,
                drops_per_s: Cause::ALL.iter().map(|c| (*c, 0.0)).collect::<BTreeMap<_, _>>(),
                early_drop_per_s: 0.0,
            },
            tables: vec![TableView {
                netns: 1,
                label: "lab".into(),
                entries: 1,
                max: 2,
                buckets: 2,
                fill_percent: 50.0,
                trend: Trend::Steady,
                growth_per_s: 0.0,
                time_to_full_s: None,
            }],
            keys: vec![KeyRow {
                netns: 1,
                key: "53/udp".into(),
                inserts_per_s: 1.0,
                share_percent: 100.0,
                drops_per_s: 0.0,
                removals_per_s: 0.0,
                total_inserts: 1,
            }],
            keys_hidden: 0,
            events_lost: 0,
            key_overflow: 0,
            programs: vec![ProgramCost {
                program: "ctg_ct_alloc".into(),
                runs_per_s: 1.0,
                ns_per_run: None,
                recursion_misses: 0,
            }],
        };
        let doc = serde_json::to_value(Document::new(&frame, KeyMode::DstPort)).unwrap();
        assert_eq!(doc["schema"], "ctguard.top.v1");
        let mut real = BTreeSet::new();
        paths(&doc, "", &mut real);
        let text = include_str!("../../../docs/top-json.md");
        let documented: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`').map(|(path, _)| path.to_string()))
            .collect();
        let undocumented: Vec<_> = real.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&real).collect();
        assert!(
            undocumented.is_empty() && stale.is_empty(),
            "docs/top-json.md: missing {undocumented:?}, stale {stale:?}"
        );
    }
}
