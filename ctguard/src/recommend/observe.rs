//! Where rates come from: a sampling window with the eBPF sensors, or a file
//! of `ctguard top --json` documents.
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use super::demand::{self, Observation};
use crate::{
    conntrack,
    error::CtguardError,
    netns,
    sensors::{KeyMode, SensorOptions, Sensors, backend::BackendRequest},
    util::format_duration,
};

/// Length of one sampling interval of `--observe`: peaks are per-second rates.
pub const TICK: Duration = Duration::from_secs(1);

/// Watches new conntrack entries for `window` with the sensors keyed by
/// destination port (so each key carries its protocol), one interval per
/// [`TICK`], and reads every namespace's count at each tick.
pub fn with_sensors(window: Duration, backend: BackendRequest) -> Result<Observation, CtguardError> {
    if window.is_zero() {
        return Err(CtguardError::usage("--observe must be longer than 0", "e.g. --observe 60s"));
    }
    let opts = SensorOptions { key_mode: KeyMode::DstPort, backend, ..Default::default() };
    let mut sensors = Sensors::start(&opts)?;
    let namespaces = netns::list_all().unwrap_or_default();
    let mut peaks: BTreeMap<u32, u64> = BTreeMap::new();
    let read_counts = |peaks: &mut BTreeMap<u32, u64>| {
        for ns in &namespaces {
            if let Ok(view) = conntrack::read_netns(ns)
                && let Some(t) = view.active()
            {
                let p = peaks.entry(ns.inode).or_default();
                *p = (*p).max(t.entries);
            }
        }
    };
    let mut prev = sensors.snapshot()?;
    let started = Instant::now();
    read_counts(&mut peaks);
    // Printed once the baseline is taken: every entry made from now on counts.
    eprintln!("observing conntrack churn for {} (Ctrl-C aborts)...", format_duration(window));
    let mut intervals = Vec::new();
    while started.elapsed() < window {
        std::thread::sleep(TICK.min(window.saturating_sub(started.elapsed())).max(Duration::from_millis(10)));
        let cur = sensors.snapshot()?;
        intervals.push(demand::interval_between(&prev, &cur));
        read_counts(&mut peaks);
        prev = cur;
    }
    let source = format!("eBPF sensors, {} in {} intervals", format_duration(window), intervals.len());
    Ok(demand::summarize(source, &intervals, peaks))
}

/// Rates from a saved `ctguard top --json` run.
pub fn from_top_file(given: &Path) -> Result<Observation, CtguardError> {
    let path = &crate::top::batch::frames_path(given);
    let text = std::fs::read_to_string(path).map_err(|e| {
        CtguardError::usage(
            format!("cannot read {}: {e}", path.display()),
            "record one with `ctguard top --json --duration 60s > top.jsonl`",
        )
    })?;
    let file = demand::parse_top_json(&text).map_err(|e| {
        CtguardError::usage(
            format!("{}: {e}", path.display()),
            "--from-top takes the output of `ctguard top --json` (one ctguard.top.v1 document per line) or a capture bundle directory",
        )
    })?;
    let mut source = format!("{} ({} top documents", path.display(), file.documents);
    match file.key_mode.as_deref() {
        Some("dst-port") => {}
        other => source.push_str(&format!(
            "; keyed by {}, so protocols are unknown: record with --by dst-port",
            other.unwrap_or("?")
        )),
    }
    if file.truncated_documents > 0 {
        source.push_str(&format!("; {} cut to the top keys, rest spread in proportion", file.truncated_documents));
    }
    source.push(')');
    Ok(demand::summarize(source, &file.intervals, file.table_peaks))
}
