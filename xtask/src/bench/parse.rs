//! Parsers of what the measured tools print: `ctguard lab flood --json`,
//! `ctguard top --json` frames, the `ctguard trace --json` summary line,
//! `conntrack -E`, bpftrace, `nft -j list counter` and
//! `/proc/net/stat/nf_conntrack`. Pure functions, unit-tested against real
//! output recorded on this project's test machines.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

/// `ctguard lab flood --json`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flood {
    pub sent: u64,
    pub elapsed_s: f64,
    pub rate_per_s: f64,
    pub deadline_hit: bool,
}

pub fn flood(text: &str) -> Result<Flood> {
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line")?;
    let v: Value = serde_json::from_str(line).context("not JSON")?;
    Ok(Flood {
        sent: u64_at(&v, "/sent")?,
        elapsed_s: f64_at(&v, "/elapsed_s")?,
        rate_per_s: f64_at(&v, "/rate_per_s")?,
        deadline_hit: v.pointer("/deadline_hit").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// One of ctguard's kernel programs in a `top` frame.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramCost {
    pub program: String,
    pub runs_per_s: f64,
    pub ns_per_run: Option<f64>,
    pub recursion_misses: u64,
}

/// The parts of a `ctguard top --json` document (schema ctguard.top.v1) the
/// benchmark uses.
#[derive(Clone, Debug, PartialEq)]
pub struct TopFrame {
    pub time_unix_ms: u64,
    /// Seconds between the two samples the frame compares: the interval plus
    /// the time taking a sample and printing the frame took.
    pub interval_s: f64,
    pub new_per_s: f64,
    pub events_lost: u64,
    pub key_overflow: u64,
    pub keys_hidden: u64,
    pub programs: Vec<ProgramCost>,
}

pub fn top_frame(line: &str) -> Result<TopFrame> {
    let v: Value = serde_json::from_str(line).context("not JSON")?;
    if v["schema"] != "ctguard.top.v1" {
        bail!("not a ctguard.top.v1 document");
    }
    let programs = v["programs"]
        .as_array()
        .context("no programs array")?
        .iter()
        .map(|p| {
            Ok(ProgramCost {
                program: p["program"].as_str().context("program without a name")?.to_string(),
                runs_per_s: f64_at(p, "/runs_per_s")?,
                ns_per_run: p["ns_per_run"].as_f64(),
                recursion_misses: p["recursion_misses"].as_u64().unwrap_or(0),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TopFrame {
        time_unix_ms: u64_at(&v, "/time_unix_ms")?,
        interval_s: f64_at(&v, "/interval_s")?,
        new_per_s: f64_at(&v, "/rates/new_per_s")?,
        events_lost: u64_at(&v, "/events_lost")?,
        key_overflow: u64_at(&v, "/key_overflow")?,
        keys_hidden: v["keys_hidden"].as_u64().unwrap_or(0),
        programs,
    })
}

/// The `ctguard trace --json` summary, seen from one namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceSummary {
    pub duration_s: f64,
    pub events_shown: u64,
    pub events_read: u64,
    pub events_lost: u64,
    pub kernel_program_misses: u64,
    /// All namespaces (the counters are global).
    pub new_entries_all: u64,
    /// Sum of `top_new_entries[].inserts` for the namespace.
    pub inserts: u64,
    /// Keys of the namespace in `top_new_entries`.
    pub keys: usize,
    /// `drops.table_full` (the summary's drops follow --netns).
    pub table_full: u64,
    /// The reconciliation row of the namespace, if trace printed one:
    /// (kernel_drop, ctguard_table_full, exact).
    pub reconciliation: Option<(u64, u64, bool)>,
}

/// Finds the summary line (`"summary": true`) in trace's JSON lines output
/// and reads it for namespace `netns`.
pub fn trace_summary(text: &str, netns: u64) -> Result<TraceSummary> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\":true") || l.contains("\"summary\": true"))
        .context("no summary line")?;
    let v: Value = serde_json::from_str(line).context("the summary is not JSON")?;
    let mine = |x: &&Value| x["netns"].as_u64() == Some(netns);
    let top = v["top_new_entries"].as_array().context("no top_new_entries")?;
    let recon = v["reconciliation"].as_array().context("no reconciliation")?.iter().find(mine).map(|r| {
        (
            r["kernel_drop"].as_u64().unwrap_or(0),
            r["ctguard_table_full"].as_u64().unwrap_or(0),
            r["exact"].as_bool().unwrap_or(false),
        )
    });
    Ok(TraceSummary {
        duration_s: f64_at(&v, "/duration_s")?,
        events_shown: u64_at(&v, "/events_shown")?,
        events_read: u64_at(&v, "/events_read")?,
        events_lost: u64_at(&v, "/events_lost")?,
        kernel_program_misses: u64_at(&v, "/kernel_program_misses")?,
        new_entries_all: u64_at(&v, "/counters/new_entries")?,
        inserts: top.iter().filter(mine).map(|k| k["inserts"].as_u64().unwrap_or(0)).sum(),
        keys: top.iter().filter(mine).count(),
        table_full: v.pointer("/drops/table_full").and_then(Value::as_u64).unwrap_or(0),
        reconciliation: recon,
    })
}

/// What `conntrack -E -e NEW` printed: event lines on stdout, and on stderr
/// its ENOBUFS warnings and, at exit, "N flow events have been shown".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEvents {
    pub new_lines: u64,
    pub enobufs_warnings: u64,
    pub shown_reported: Option<u64>,
}

pub fn conntrack_events(stdout: &str, stderr: &str) -> ConntrackEvents {
    let shown_reported = stderr.lines().find_map(|l| {
        let head = l.strip_suffix(" flow events have been shown.")?;
        head.rsplit(' ').next()?.parse().ok()
    });
    ConntrackEvents {
        new_lines: stdout.lines().filter(|l| l.trim_start().starts_with("[NEW]")).count() as u64,
        enobufs_warnings: stderr.lines().filter(|l| l.contains("ENOBUFS")).count() as u64,
        shown_reported,
    }
}

/// The value of count map `@name` bpftrace prints at exit (`@n: 200000`);
/// 0 when the map was never touched (bpftrace then prints nothing for it).
pub fn bpftrace_count(stdout: &str, name: &str) -> u64 {
    let prefix = format!("@{name}:");
    stdout.lines().find_map(|l| l.trim().strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0)
}

/// The packet count of counter `name` in `nft -j list counter …` output.
pub fn nft_counter_packets(json: &str, name: &str) -> Result<u64> {
    let v: Value = serde_json::from_str(json).context("not JSON")?;
    v["nftables"]
        .as_array()
        .context("no `nftables` array")?
        .iter()
        .filter_map(|item| item.get("counter"))
        .find(|c| c["name"] == name)
        .with_context(|| format!("no counter named {name}"))?["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("counter {name} has no packet count"))
}

/// `/proc/net/stat/nf_conntrack`: a header of column names, then one row of
/// hex numbers per CPU. Each column summed over the CPUs, except `entries`
/// (the namespace's count, repeated on every row), taken from the first row.
pub fn conntrack_stat(text: &str) -> Result<BTreeMap<String, u64>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().context("empty file")?.split_whitespace().collect();
    if header.is_empty() || header.iter().any(|h| h.chars().all(|c| c.is_ascii_hexdigit())) {
        bail!("the first line is not a header: {header:?}");
    }
    let mut out: BTreeMap<String, u64> = header.iter().map(|h| (h.to_string(), 0)).collect();
    let mut rows = 0;
    for line in lines {
        let values: Vec<&str> = line.split_whitespace().collect();
        if values.len() != header.len() {
            bail!("row {rows} has {} values for {} columns", values.len(), header.len());
        }
        for (name, v) in header.iter().zip(values) {
            let v = u64::from_str_radix(v, 16).with_context(|| format!("column {name}: `{v}`"))?;
            let slot = out.get_mut(*name).expect("every column has a slot");
            if *name != "entries" {
                *slot += v;
            } else if rows == 0 {
                *slot = v;
            }
        }
        rows += 1;
    }
    if rows == 0 {
        bail!("no per-CPU rows");
    }
    Ok(out)
}

/// Sum of the counts `uniq -c` printed (`   66667 udp dport=5000`).
pub fn uniq_counts_total(text: &str) -> u64 {
    text.lines().filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

fn u64_at(v: &Value, ptr: &str) -> Result<u64> {
    v.pointer(ptr).and_then(Value::as_u64).with_context(|| format!("no integer at {ptr}"))
}

fn f64_at(v: &Value, ptr: &str) -> Result<f64> {
    v.pointer(ptr).and_then(Value::as_f64).with_context(|| format!("no number at {ptr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_report() {
        let out = r#"{"sent":200000,"elapsed_s":1.134565973,"rate_per_s":176278.86324773467,"next_flow":200000,"retries":0,"deadline_hit":false}"#;
        let f = flood(out).unwrap();
        assert_eq!(f.sent, 200000);
        assert!((f.rate_per_s - 176278.86).abs() < 0.01);
        assert!(!f.deadline_hit);
        assert!(flood("sent 5 flows").is_err());
    }

    const TOP: &str = r#"{"schema":"ctguard.top.v1","time_unix_ms":1760000000123,"key_mode":"dst_port","interval_s":1.0123,"rates":{"new_per_s":176000.5,"removed_per_s":0.0,"drops_per_s":{},"early_drop_per_s":0.0},"tables":[],"keys":[{"netns":4026532248,"key":"5000/udp","inserts_per_s":0.0,"share_percent":0.0,"drops_per_s":0.0,"removals_per_s":0.0,"total_inserts":200001}],"keys_hidden":11,"events_lost":0,"key_overflow":7,"programs":[{"program":"ctg_ct_alloc","runs_per_s":880000.0,"ns_per_run":41.5,"recursion_misses":0},{"program":"ctg_ct_free","runs_per_s":0.0,"ns_per_run":null,"recursion_misses":263}]}"#;

    #[test]
    fn top_frame_fields() {
        let f = top_frame(TOP).unwrap();
        assert_eq!(f.time_unix_ms, 1760000000123);
        assert_eq!((f.events_lost, f.key_overflow, f.keys_hidden), (0, 7, 11));
        assert!((f.interval_s - 1.0123).abs() < 1e-9);
        assert_eq!(f.programs.len(), 2);
        assert_eq!(f.programs[0].ns_per_run, Some(41.5));
        assert_eq!(f.programs[1].ns_per_run, None);
        assert_eq!(f.programs[1].recursion_misses, 263);
        assert!(top_frame(r#"{"schema":"other"}"#).is_err());
    }

    #[test]
    fn trace_summary_for_one_namespace() {
        let text = concat!(
            r#"{"ts_ns":1,"kind":"drop"}"#,
            "\n",
            r#"{"summary":true,"duration_s":3.81,"events_shown":180000,"events_read":180000,"events_lost":120,"kernel_program_misses":0,"counters":{"new_entries":20001,"alloc_failed":0,"removed_entries":0,"events_lost":120,"key_overflow":0,"netfilter_drops":180000,"keyed_entries":20001,"other_overflow":0,"alloc_refused":0,"confirm_failed":0,"early_drop_evictions":0},"drops":{"table_full":180000},"reconciliation":[{"netns":7,"label":"ctgbench-1-s","kernel_drop":180000,"kernel_insert_failed":0,"kernel_invalid":0,"kernel_early_drop":0,"ctguard_table_full":180000,"ctguard_insert_failed":0,"exact":true}],"top_new_entries":[{"netns":7,"key":"5000/udp","inserts":6667,"removals":0,"drops":60000},{"netns":7,"key":"5001/udp","inserts":6667,"removals":0,"drops":60000},{"netns":9,"key":"53/udp","inserts":1,"removals":0,"drops":0},{"netns":7,"key":"5002/udp","inserts":6666,"removals":0,"drops":60000}]}"#,
            "\n"
        );
        let s = trace_summary(text, 7).unwrap();
        assert_eq!((s.inserts, s.keys, s.table_full, s.events_lost), (20000, 3, 180000, 120));
        assert_eq!(s.reconciliation, Some((180000, 180000, true)));
        assert_eq!(s.new_entries_all, 20001);
        let other = trace_summary(text, 8).unwrap();
        assert_eq!((other.inserts, other.reconciliation), (0, None));
        assert!(trace_summary(r#"{"ts_ns":1}"#, 7).is_err());
    }

    #[test]
    fn conntrack_event_lines_and_warnings() {
        let out = "    [NEW] udp      17 30 src=10.254.0.1 dst=10.254.0.2 sport=10000 dport=5000 [UNREPLIED] src=10.254.0.2 dst=10.254.0.1 sport=5000 dport=10000\n\
                   [NEW] udp      17 30 src=10.254.0.1 dst=10.254.0.2 sport=10001 dport=5001 [UNREPLIED] src=10.254.0.2 dst=10.254.0.1 sport=5001 dport=10001\n";
        let err = "WARNING: We have hit ENOBUFS! We are losing events.\n\
                   This message means that the current netlink socket buffer size is too small.\n\
                   Please, check --buffer-size in conntrack(8) manpage.\n\
                   conntrack v1.4.7 (conntrack-tools): 139721 flow events have been shown.\n";
        let e = conntrack_events(out, err);
        assert_eq!(e, ConntrackEvents { new_lines: 2, enobufs_warnings: 1, shown_reported: Some(139721) });
        assert_eq!(conntrack_events("", ""), ConntrackEvents::default());
    }

    #[test]
    fn bpftrace_count_map() {
        assert_eq!(bpftrace_count("Attaching 2 probes...\nready\n\n\n@n: 200000\n", "n"), 200000);
        assert_eq!(bpftrace_count("Attaching 2 probes...\nready\n", "n"), 0);
        assert_eq!(bpftrace_count("@nn: 5\n@n: 3\n", "n"), 3);
    }

    #[test]
    fn nft_counter() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "new_flows", "table": "ctgbench", "handle": 2, "packets": 200000, "bytes": 7200000}}]}"#;
        assert_eq!(nft_counter_packets(json, "new_flows").unwrap(), 200000);
        assert!(nft_counter_packets(json, "other").is_err());
        assert!(nft_counter_packets("{}", "new_flows").is_err());
    }

    #[test]
    fn conntrack_stat_sums_cpus_in_hex() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00004e20  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 0000ea60 00000000 00000000  00000000 00000000 00000000 00000000\n\
                    00004e20  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000010 00000000 00000000  00000000 00000000 00000000 00000000\n";
        let s = conntrack_stat(text).unwrap();
        assert_eq!(s["entries"], 20000);
        assert_eq!(s["drop"], 60000 + 16);
        assert_eq!(s["invalid"], 1);
        assert!(conntrack_stat("00000001 00000002\n").is_err());
        assert!(conntrack_stat("entries drop\n").is_err());
    }

    #[test]
    fn uniq_totals() {
        assert_eq!(
            uniq_counts_total("  66667 udp dport=5000\n  66667 udp dport=5001\n  66666 udp dport=5002\n"),
            200000
        );
        assert_eq!(uniq_counts_total(""), 0);
    }
}
