//! `bypass suggest`: which ports to exempt, from observed churn.
//!
//! Churn comes either from the sensors (new conntrack entries per
//! destination port and protocol, counted in the kernel, over `--observe`)
//! or from `ctguard top --json` output (`--from-top`). A port is proposed
//! when its flows make a large share of a namespace's new entries. The
//! entries a bypass saves follow Little's law: entries = new flows/s x
//! the time each entry lives, at least the timeout of the state a
//! short-lived flow ends in (UDP: `nf_conntrack_udp_timeout`, an unreplied
//! or single-exchange flow; TCP: `nf_conntrack_tcp_timeout_time_wait`, a
//! closed connection, equal by default to the unanswered-SYN timeout).
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{
    error::BypassError,
    selector::{has_ports, parse_proto, proto_name},
};
use crate::{conntrack::sysctl::Timeouts, sensors::snapshot::Snapshot};

/// New entries per second of one (namespace, protocol, destination port).
#[derive(Clone, Debug, PartialEq)]
pub struct Churn {
    pub netns: u32,
    pub proto: u8,
    pub port: u16,
    pub inserts_per_s: f64,
}

/// Reads `ctguard top --json` output: one document per line (or one
/// pretty-printed document), averaging each key's rate over all documents,
/// weighted by their intervals.
pub fn from_top_json(text: &str) -> Result<(Vec<Churn>, f64), BypassError> {
    let docs: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(v) => vec![v],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    BypassError::usage(
                        format!("--from-top: line {} is not JSON: {e}", i + 1),
                        "record it with `ctguard top --json > FILE`",
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let mut total_s = 0.0;
    let mut sums: BTreeMap<(u32, u8, u16), f64> = BTreeMap::new();
    for doc in &docs {
        if !doc["schema"].as_str().is_some_and(crate::top::batch::carries_top_frame) {
            return Err(BypassError::usage(
                "--from-top: not `ctguard top --json` output (no \"schema\": \"ctguard.top.v1\") nor a capture's stats.jsonl",
                "record it with `ctguard top --json --duration 30s > FILE`",
            ));
        }
        if doc["key_mode"] != "dst-port" {
            return Err(BypassError::usage(
                format!("--from-top: keys were grouped by {}, not by destination port", doc["key_mode"]),
                "record with `ctguard top --json --by dst-port` (the default)",
            ));
        }
        let dt = doc["interval_s"].as_f64().unwrap_or(0.0);
        if dt <= 0.0 {
            continue;
        }
        total_s += dt;
        for key in doc["keys"].as_array().into_iter().flatten() {
            let Some((port, proto)) = key["key"].as_str().and_then(|k| k.split_once('/')) else { continue };
            let (Ok(port), Ok(proto)) = (port.parse::<u16>(), parse_proto(proto)) else { continue };
            let netns = key["netns"].as_u64().unwrap_or(0) as u32;
            *sums.entry((netns, proto, port)).or_default() += key["inserts_per_s"].as_f64().unwrap_or(0.0) * dt;
        }
    }
    if total_s == 0.0 {
        return Err(BypassError::usage(
            "--from-top: the file holds no samples",
            "let `ctguard top --json` run for at least one interval",
        ));
    }
    let churn = sums
        .into_iter()
        .map(|((netns, proto, port), n)| Churn { netns, proto, port, inserts_per_s: n / total_s })
        .collect();
    Ok((churn, total_s))
}

/// Churn between two sensor snapshots (key mode dst-port) `secs` apart.
pub fn from_snapshots(a: &Snapshot, b: &Snapshot, secs: f64, netns: Option<u32>) -> Vec<Churn> {
    let before: BTreeMap<(u32, u16, u8, u16), u64> =
        a.churn.iter().map(|(k, v)| ((k.netns, k.zone, k.tuple.proto, k.tuple.dport), v.inserts)).collect();
    let mut sums: BTreeMap<(u32, u8, u16), u64> = BTreeMap::new();
    for (k, v) in &b.churn {
        if k.other != 0 || netns.is_some_and(|n| n != k.netns) {
            continue;
        }
        let prev = before.get(&(k.netns, k.zone, k.tuple.proto, k.tuple.dport)).copied().unwrap_or(0);
        let delta = if v.inserts >= prev { v.inserts - prev } else { v.inserts };
        *sums.entry((k.netns, k.tuple.proto, k.tuple.dport)).or_default() += delta;
    }
    sums.into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|((netns, proto, port), n)| Churn { netns, proto, port, inserts_per_s: n as f64 / secs.max(1e-9) })
        .collect()
}

/// Kernel defaults, for namespaces whose sysctls cannot be read.
pub fn default_timeouts() -> Timeouts {
    [
        ("udp_timeout", 30),
        ("udp_timeout_stream", 120),
        ("tcp_timeout_time_wait", 120),
        ("tcp_timeout_syn_sent", 120),
        ("generic_timeout", 600),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The timeout (sysctl name without `nf_conntrack_`, seconds) bounding how
/// long a short-lived flow of `proto` keeps its entry.
pub fn lifetime(proto: u8, timeouts: &Timeouts) -> (String, u64) {
    let name = match proto {
        17 | 136 => "udp_timeout",
        6 => "tcp_timeout_time_wait",
        _ => "generic_timeout",
    };
    let secs = timeouts.get(name).copied().or_else(|| default_timeouts().get(name).copied()).unwrap_or(600);
    (name.to_string(), secs)
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suggestion {
    pub netns: u32,
    /// The namespace's name, or `netns:[inode]`.
    pub netns_label: String,
    /// `5000/udp`, as `ctguard top` shows keys.
    pub key: String,
    pub proto: String,
    pub port: u16,
    pub inserts_per_s: f64,
    /// Share of the namespace's new entries.
    pub share_percent: f64,
    /// `nf_conntrack_` sysctl the lifetime comes from.
    pub timeout: String,
    pub timeout_s: u64,
    /// inserts/s x timeout: entries the table holds for these flows now.
    pub entries_saved: u64,
    pub command: String,
}

/// How a namespace is named on the command line: `None` for ctguard's own.
pub struct NetnsNames<'a> {
    pub current: u32,
    pub label: &'a dyn Fn(u32) -> (String, Option<String>),
}

pub struct Options {
    pub top: usize,
    /// Minimum share of a namespace's new entries, in percent.
    pub min_share: f64,
}

/// Ranks ports by new entries/s and proposes those that dominate.
pub fn suggest(
    churn: &[Churn],
    timeouts: &dyn Fn(u32) -> Timeouts,
    names: &NetnsNames<'_>,
    opts: &Options,
) -> Vec<Suggestion> {
    let mut per_ns: BTreeMap<u32, f64> = BTreeMap::new();
    for c in churn {
        *per_ns.entry(c.netns).or_default() += c.inserts_per_s;
    }
    let mut ranked: Vec<&Churn> =
        churn.iter().filter(|c| has_ports(c.proto) && c.port != 0 && c.inserts_per_s > 0.0).collect();
    ranked.sort_by(|a, b| b.inserts_per_s.total_cmp(&a.inserts_per_s).then(a.port.cmp(&b.port)));
    let mut out = Vec::new();
    let mut ns_timeouts: BTreeMap<u32, Timeouts> = BTreeMap::new();
    for c in ranked {
        if out.len() >= opts.top {
            break;
        }
        let share = 100.0 * c.inserts_per_s / per_ns[&c.netns];
        if share < opts.min_share {
            continue;
        }
        let t = ns_timeouts.entry(c.netns).or_insert_with(|| timeouts(c.netns));
        let (timeout, timeout_s) = lifetime(c.proto, t);
        let (label, arg) = (names.label)(c.netns);
        let netns_opt = match (&arg, c.netns == names.current) {
            (_, true) => String::new(),
            (Some(a), false) => format!(" --netns {a}"),
            (None, false) => format!(" --netns {}", c.netns),
        };
        let proto = proto_name(c.proto);
        out.push(Suggestion {
            netns: c.netns,
            netns_label: label,
            key: format!("{}/{proto}", c.port),
            proto: proto.clone(),
            port: c.port,
            inserts_per_s: c.inserts_per_s,
            share_percent: share,
            timeout: format!("nf_conntrack_{timeout}"),
            timeout_s,
            entries_saved: (c.inserts_per_s * timeout_s as f64).round() as u64,
            command: format!("ctguard bypass add{netns_opt} --proto {proto} --port {}", c.port),
        });
    }
    out
}

/// The suggestions as a table with the command under each row.
pub fn render(s: &[Suggestion], source: &str) -> String {
    if s.is_empty() {
        return format!("No port dominates new conntrack entries ({source}); nothing to bypass.\n");
    }
    let mut out = format!(
        "Ports whose flows dominate new conntrack entries ({source}).\nEntries saved = new flows/s x the entry lifetime (at least the timeout shown).\n\n"
    );
    out.push_str(&format!(
        "{:<20} {:<12} {:>10} {:>6}  {:<40} {:>13}\n",
        "NETNS", "KEY", "INSERTS/S", "SHARE", "TIMEOUT", "ENTRIES SAVED"
    ));
    for x in s {
        out.push_str(&format!(
            "{:<20} {:<12} {:>10.1} {:>5.1}%  {:<40} {:>13}\n    {}\n",
            x.netns_label,
            x.key,
            x.inserts_per_s,
            x.share_percent,
            format!("{}={}s", x.timeout, x.timeout_s),
            x.entries_saved,
            x.command
        ));
    }
    out.push_str("\nEach command checks the ruleset for NAT, `ct state` and helper conflicts first; add --dry-run to see the rules.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(interval: f64, keys: &[(u32, &str, f64)]) -> String {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(ns, k, r)| serde_json::json!({ "netns": ns, "key": k, "inserts_per_s": r, "share_percent": 0, "drops_per_s": 0, "removals_per_s": 0, "total_inserts": 0 }))
            .collect();
        serde_json::json!({ "schema": "ctguard.top.v1", "time_unix_ms": 0, "key_mode": "dst-port", "interval_s": interval, "keys": keys }).to_string()
    }

    fn label(ns: u32) -> (String, Option<String>) {
        if ns == 7 { ("lab-b".into(), Some("lab-b".into())) } else { (format!("netns:[{ns}]"), None) }
    }

    #[test]
    fn top_json_rates_are_averaged_over_intervals() {
        let text = [
            doc(1.0, &[(7, "5000/udp", 1000.0), (7, "53/udp", 10.0)]),
            doc(3.0, &[(7, "5000/udp", 2000.0), (7, "(other keys)", 5.0)]),
        ]
        .join("\n");
        let (churn, secs) = from_top_json(&text).unwrap();
        assert_eq!(secs, 4.0);
        let p5000 = churn.iter().find(|c| c.port == 5000).unwrap();
        assert_eq!(p5000.inserts_per_s, 1750.0);
        assert_eq!(p5000.proto, 17);
        assert_eq!(churn.iter().find(|c| c.port == 53).unwrap().inserts_per_s, 2.5);
        assert_eq!(churn.len(), 2, "the other-keys bucket has no port");
    }

    #[test]
    fn wrong_files_are_clear_errors() {
        assert!(from_top_json("{}").unwrap_err().to_string().contains("ctguard.top.v1"));
        let by_ip = doc(1.0, &[]).replace("dst-port", "src-ip");
        assert!(from_top_json(&by_ip).unwrap_err().to_string().contains("--by dst-port"));
        assert!(from_top_json("nope\n").unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn dominant_ports_become_commands_with_entries_saved() {
        let churn = vec![
            Churn { netns: 7, proto: 17, port: 5000, inserts_per_s: 900.0 },
            Churn { netns: 7, proto: 6, port: 80, inserts_per_s: 95.0 },
            Churn { netns: 7, proto: 17, port: 53, inserts_per_s: 5.0 },
            Churn { netns: 9, proto: 1, port: 0, inserts_per_s: 500.0 },
        ];
        let timeouts =
            |_| -> Timeouts { [("udp_timeout".to_string(), 30), ("tcp_timeout_time_wait".to_string(), 60)].into() };
        let s =
            suggest(&churn, &timeouts, &NetnsNames { current: 1, label: &label }, &Options { top: 5, min_share: 5.0 });
        assert_eq!(s.len(), 2, "{s:#?}");
        assert_eq!(s[0].key, "5000/udp");
        assert_eq!(s[0].share_percent, 90.0);
        assert_eq!(
            (s[0].timeout.as_str(), s[0].timeout_s, s[0].entries_saved),
            ("nf_conntrack_udp_timeout", 30, 27_000)
        );
        assert_eq!(s[0].command, "ctguard bypass add --netns lab-b --proto udp --port 5000");
        assert_eq!(s[1].entries_saved, 95 * 60);
        let text = render(&s, "observed 10s");
        assert!(text.contains("ctguard bypass add --netns lab-b --proto tcp --port 80"), "{text}");
        // In ctguard's own namespace no --netns is needed.
        let s =
            suggest(&churn, &timeouts, &NetnsNames { current: 7, label: &label }, &Options { top: 1, min_share: 5.0 });
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].command, "ctguard bypass add --proto udp --port 5000");
    }

    #[test]
    fn lifetimes_fall_back_to_kernel_defaults() {
        assert_eq!(lifetime(17, &Timeouts::new()), ("udp_timeout".into(), 30));
        assert_eq!(lifetime(6, &Timeouts::new()), ("tcp_timeout_time_wait".into(), 120));
        assert_eq!(lifetime(132, &Timeouts::new()), ("generic_timeout".into(), 600));
    }
}
