//! The `status` report as text: one block per namespace, then the overall
//! health with its reasons.
use std::fmt::Write as _;

use super::{
    health::{Health, RISING_WARNING_COUNTERS},
    report::{ActiveStatus, ConntrackStatus, CpuCounters, NamespaceStatus, StatusReport},
};
use crate::{conntrack::stats::ENTRIES_COLUMN, util::format_duration};

/// Lines of `key=value` items wrap at this width.
const LINE_WIDTH: usize = 100;
/// Width of the label column inside a block.
const LABEL_WIDTH: usize = 12;

pub fn table(report: &StatusReport, per_cpu: bool) -> String {
    let mut out = String::new();
    for ns in &report.namespaces {
        namespace_block(&mut out, ns, report.interval_ms, per_cpu);
        out.push('\n');
    }
    if report.namespaces.len() > 1
        && let Some(total) = report.memory_total_bytes
    {
        let _ = writeln!(
            out,
            "memory, all namespaces: ~{} (their entries + the shared hash table once)",
            human_bytes(total)
        );
    }
    let _ = writeln!(out, "health: {}", health_word(report.health));
    for reason in &report.reasons {
        let _ = writeln!(out, "  {reason}");
    }
    out
}

fn namespace_block(out: &mut String, ns: &NamespaceStatus, interval_ms: u64, per_cpu: bool) {
    let id = &ns.netns;
    let _ = match &id.name {
        Some(name) => writeln!(out, "netns {name} (inode {}, {})", id.inode, id.path.display()),
        None => writeln!(out, "netns inode {} ({})", id.inode, id.path.display()),
    };
    match &ns.conntrack {
        ConntrackStatus::NotActive { detail } => line(out, "conntrack", &format!("not active: {detail}")),
        ConntrackStatus::Error { detail } => {
            line(out, "error", &detail.replace('\n', &format!("\n{:w$}", "", w = LABEL_WIDTH + 2)))
        }
        ConntrackStatus::Active(active) => active_lines(out, active, interval_ms, per_cpu),
    }
    let health = match ns.reasons.as_slice() {
        [] => health_word(ns.health).to_string(),
        reasons => format!("{}: {}", health_word(ns.health), reasons.join("; ")),
    };
    line(out, "health", &health);
}

fn active_lines(out: &mut String, a: &ActiveStatus, interval_ms: u64, per_cpu: bool) {
    let fill = a.fill_percent.map_or("no limit (max 0)".to_string(), |p| format!("{p:.1}% full"));
    line(out, "entries", &format!("{} / {} max ({fill})", a.entries, a.max));
    line(out, "buckets", &a.buckets.to_string());
    line(
        out,
        "memory",
        &a.memory.map_or("unknown (the nf_conntrack slab object size is readable by root only)".to_string(), |m| {
            format!(
                "~{}: {} x {} B objects ({}) + {} hash table (shared by all namespaces)",
                human_bytes(m.total_bytes),
                a.entries,
                m.object_size,
                serde_plain(&m.object_size_source),
                human_bytes(m.hash_table_bytes)
            )
        }),
    );
    let counters = a.counters.iter().filter(|(n, _)| *n != ENTRIES_COLUMN).map(|(n, v)| format!("{n}={v}"));
    wrapped(out, "counters", counters);
    if let Some(rise) = &a.rise {
        // The counters that decide health, and any other that moved, in column order.
        let over = format!("in {}:", format_duration(std::time::Duration::from_millis(interval_ms)));
        let moved = rise
            .iter()
            .filter(|(name, value)| RISING_WARNING_COUNTERS.contains(name) || *value > 0)
            .map(|(n, v)| format!("{n}+{v}"));
        wrapped(out, "rise", std::iter::once(over).chain(moved));
    }
    if a.timeouts.is_empty() {
        line(out, "timeouts", "none found");
    } else {
        wrapped(out, "timeouts", a.timeouts.iter().map(|(n, s)| format!("{n}={s}s")));
    }
    if per_cpu {
        per_cpu_table(out, &a.per_cpu);
    }
}

/// One row per CPU, one column per counter (`entries` left out: it is the
/// namespace's count, the same on every row).
fn per_cpu_table(out: &mut String, rows: &[CpuCounters]) {
    let Some(first) = rows.first() else { return };
    let names: Vec<&str> = first.counters.iter().map(|(n, _)| n).filter(|n| *n != ENTRIES_COLUMN).collect();
    let widths: Vec<usize> = names
        .iter()
        .map(|name| {
            rows.iter().filter_map(|r| r.counters.get(name)).map(|v| v.to_string().len()).fold(name.len(), usize::max)
        })
        .collect();
    line(out, "per CPU", "");
    let _ = write!(out, "    {:>4}", "cpu");
    for (name, width) in names.iter().zip(&widths) {
        let _ = write!(out, " {name:>width$}");
    }
    out.push('\n');
    for row in rows {
        let _ = write!(out, "    {:>4}", row.cpu);
        for (name, width) in names.iter().zip(&widths) {
            let value = row.counters.get(name).map_or("-".to_string(), |v| v.to_string());
            let _ = write!(out, " {value:>width$}");
        }
        out.push('\n');
    }
}

fn line(out: &mut String, label: &str, text: &str) {
    // A label longer than the column still gets a space before its text.
    let width = LABEL_WIDTH.max(label.len() + 1);
    let text = format!("  {label:<width$}{text}");
    let _ = writeln!(out, "{}", text.trim_end());
}

/// Space-separated items after a label, wrapped under the first item.
fn wrapped(out: &mut String, label: &str, items: impl Iterator<Item = String>) {
    let mut current = String::new();
    let mut first_line = true;
    for item in items {
        if !current.is_empty() && LABEL_WIDTH + 2 + current.len() + 1 + item.len() > LINE_WIDTH {
            line(out, if first_line { label } else { "" }, &current);
            first_line = false;
            current.clear();
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(&item);
    }
    if first_line || !current.is_empty() {
        line(out, if first_line { label } else { "" }, if current.is_empty() { "none" } else { &current });
    }
}

fn health_word(health: Health) -> &'static str {
    match health {
        Health::Ok => "ok",
        Health::Warning => "warning",
        Health::Error => "error",
    }
}

/// A unit enum's serde name (`sysfs`), so text and JSON say the same.
fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// 1023 B, 1.5 KiB, 2.0 MiB, ...
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::{
        conntrack::{ActiveTable, ConntrackView, ObjectSize, ObjectSizeSource, Timeouts, stats::parse_stat},
        netns::Netns,
        status::report::{LatestReading, Observation, build},
    };

    fn report(per_ns: Vec<(&str, ConntrackView, Option<&str>)>) -> StatusReport {
        let observations = per_ns
            .into_iter()
            .enumerate()
            .map(|(i, (name, view, earlier))| Observation {
                netns: Netns {
                    inode: 100 + i as u32,
                    name: Some(name.into()),
                    path: PathBuf::from(format!("/run/netns/{name}")),
                },
                earlier: earlier.map(|t| parse_stat(t).unwrap()),
                latest: Ok(LatestReading {
                    view,
                    timeouts: Timeouts::from([("tcp_timeout_established".into(), 432_000), ("udp_timeout".into(), 30)]),
                }),
            })
            .collect();
        let size = ObjectSize { bytes: 248, source: ObjectSizeSource::Sysfs };
        build(observations, Some(size), Some(&[0, 1]), Duration::from_secs(1))
    }

    const EARLIER: &str = "entries found drop insert_failed early_drop\n00000000 00000001 00000000 00000000 00000000\n00000000 00000000 00000000 00000000 00000000\n";
    const LATER: &str = "entries found drop insert_failed early_drop\n00000352 00000009 0000000c 00000000 00000000\n00000352 00000000 00000000 00000000 00000000\n";

    fn active(entries: u64) -> ConntrackView {
        ConntrackView::Active(ActiveTable { entries, max: 1000, buckets: 1024, stats: parse_stat(LATER).unwrap() })
    }

    #[test]
    fn a_warning_block_explains_itself() {
        let text = table(&report(vec![("st1", active(850), Some(EARLIER))]), false);
        assert!(text.starts_with("netns st1 (inode 100, /run/netns/st1)\n"), "{text}");
        assert!(text.contains("  entries     850 / 1000 max (85.0% full)\n"), "{text}");
        assert!(text.contains("  buckets     1024\n"), "{text}");
        assert!(text.contains("  memory      ~213.9 KiB: 850 x 248 B objects (sysfs) + 8.0 KiB hash table"), "{text}");
        assert!(text.contains("  counters    found=9 drop=12 insert_failed=0 early_drop=0\n"), "{text}");
        assert!(text.contains("  rise        in 1s: found+8 drop+12 insert_failed+0 early_drop+0\n"), "{text}");
        assert!(text.contains("  timeouts    tcp_timeout_established=432000s udp_timeout=30s\n"), "{text}");
        assert!(
            text.contains(
                "  health      warning: table 85% full (850 of 1000 entries); drop counter rose by 12 in 1s\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "health: warning\n  st1: table 85% full (850 of 1000 entries)\n  st1: drop counter rose by 12 in 1s\n"
            ),
            "{text}"
        );
        assert!(!text.contains("cpu"), "per-CPU rows only on request: {text}");
    }

    #[test]
    fn per_cpu_rows_on_request() {
        let text = table(&report(vec![("st1", active(10), None)]), true);
        assert!(text.contains("  per CPU\n     cpu found drop insert_failed early_drop\n"), "{text}");
        assert!(text.contains("\n       0     9   12             0          0\n"), "{text}");
        assert!(text.contains("\n       1     0    0             0          0\n"), "{text}");
    }

    #[test]
    fn not_active_and_totals_over_namespaces() {
        let text = table(
            &report(vec![
                ("on", active(10), None),
                ("off", ConntrackView::NotActive { reason: "nf_conntrack is not loaded".into() }, None),
            ]),
            false,
        );
        assert!(text.contains("netns off (inode 101, /run/netns/off)\n  conntrack   not active: nf_conntrack is not loaded\n  health      ok\n"), "{text}");
        assert!(text.contains("memory, all namespaces: ~10.4 KiB"), "{text}");
        assert!(text.ends_with("health: ok\n"), "{text}");
    }

    #[test]
    fn long_lists_wrap_under_the_first_item() {
        let mut out = String::new();
        wrapped(&mut out, "timeouts", (0..30).map(|i| format!("item_{i:02}=1s")));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() > 1);
        assert!(lines.iter().all(|l| l.len() <= LINE_WIDTH), "{out}");
        assert!(lines[1].starts_with(&" ".repeat(LABEL_WIDTH + 2)), "{out}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2 * 1024 * 1024), "2.0 MiB");
    }
}
