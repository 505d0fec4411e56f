//! Plain-text rendering of a frame (`top --once`).
use std::fmt::Write as _;

use super::model::{Frame, Trend};
use crate::sensors::{KeyMode, snapshot::Cause};

pub fn trend_arrow(t: Trend) -> &'static str {
    match t {
        Trend::Rising => "rising",
        Trend::Falling => "falling",
        Trend::Steady => "steady",
    }
}

pub fn time_to_full(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1.0 => "now".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

pub fn drops_line(f: &Frame) -> String {
    Cause::ALL
        .iter()
        .map(|c| format!("{} {:.1}", c.as_str(), f.rates.drops_per_s.get(c).copied().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join("  ")
}

pub fn text(f: &Frame, mode: KeyMode) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "interval {:.2}s  new/s {:.1}  removed/s {:.1}  early_drop/s {:.1}  events lost {}  keys folded {}",
        f.interval_s, f.rates.new_per_s, f.rates.removed_per_s, f.rates.early_drop_per_s, f.events_lost, f.key_overflow
    );
    let _ = writeln!(out, "drops/s  {}", drops_line(f));
    let misses: u64 = f.programs.iter().map(|p| p.recursion_misses).sum();
    if misses > 0 {
        let _ =
            writeln!(out, "kernel skipped ctguard's programs {misses} times (recursion): those events are not counted");
    }
    for t in &f.tables {
        let _ = writeln!(
            out,
            "table {:<24} {:>9}/{:<9} {:>5.1}% full  buckets {:<8} {} {:+.1}/s  full in {}",
            t.label,
            t.entries,
            t.max,
            t.fill_percent,
            t.buckets,
            trend_arrow(t.trend),
            t.growth_per_s,
            time_to_full(t.time_to_full_s)
        );
    }
    let _ = writeln!(
        out,
        "{:<40} {:>12} {:>7} {:>10} {:>10} {:>12}",
        format!("key ({mode:?})"),
        "inserts/s",
        "share",
        "drops/s",
        "removed/s",
        "total"
    );
    for k in &f.keys {
        let _ = writeln!(
            out,
            "{:<40} {:>12.1} {:>6.1}% {:>10.1} {:>10.1} {:>12}",
            k.key, k.inserts_per_s, k.share_percent, k.drops_per_s, k.removals_per_s, k.total_inserts
        );
    }
    if f.keys_hidden > 0 {
        let _ = writeln!(out, "({} more keys not shown; raise --top)", f.keys_hidden);
    }
    out
}
