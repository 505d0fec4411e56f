//! The `status` report: what was read per namespace, turned into numbers
//! and a health. Building it is pure; `--json` prints it as it is.
use std::time::Duration;

use serde::Serialize;

use super::health::{self, Assessment, Health};
use crate::{
    conntrack::{
        ActiveTable, ConntrackView, Counters, MemoryEstimate, ObjectSize, StatTable, Timeouts, memory,
        stats::cpu_numbers,
    },
    netns::Netns,
};

/// What was read from one namespace.
#[derive(Clone, Debug)]
pub struct Observation {
    pub netns: Netns,
    /// The counters of the first of two readings, when there were two and
    /// conntrack was active at the first.
    pub earlier: Option<StatTable>,
    /// The last reading, or why the namespace could not be read.
    pub latest: Result<LatestReading, String>,
}

#[derive(Clone, Debug)]
pub struct LatestReading {
    pub view: ConntrackView,
    pub timeouts: Timeouts,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub health: Health,
    /// Every namespace's reasons, each prefixed with the namespace.
    pub reasons: Vec<String>,
    /// Time between the two readings; 0 when only one was taken.
    pub interval_ms: u64,
    /// Entries of every active namespace plus the shared hash table, once.
    pub memory_total_bytes: Option<u64>,
    pub namespaces: Vec<NamespaceStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NamespaceStatus {
    #[serde(flatten)]
    pub netns: Netns,
    pub health: Health,
    pub reasons: Vec<String>,
    #[serde(flatten)]
    pub conntrack: ConntrackStatus,
}

/// Serialized as `"conntrack": "active" | "not_active" | "error"` next to
/// the variant's fields.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "conntrack", rename_all = "snake_case")]
pub enum ConntrackStatus {
    Active(ActiveStatus),
    NotActive { detail: String },
    Error { detail: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct ActiveStatus {
    pub entries: u64,
    pub max: u64,
    pub buckets: u64,
    /// entries / max in percent, two decimals; null when max is 0 (no limit).
    pub fill_percent: Option<f64>,
    /// Null when the slab object size could not be found.
    pub memory: Option<MemoryEstimate>,
    /// Summed over the CPUs, in the kernel's column order (`entries` once).
    pub counters: Counters,
    pub per_cpu: Vec<CpuCounters>,
    /// How much each counter rose between the two readings; null with one reading.
    pub rise: Option<Counters>,
    /// Seconds, keyed by sysctl name without `nf_conntrack_`.
    pub timeouts: Timeouts,
}

#[derive(Clone, Debug, Serialize)]
pub struct CpuCounters {
    pub cpu: u32,
    pub counters: Counters,
}

/// Builds the report. `possible_cpus` names the stat rows (see
/// [`cpu_numbers`]); `interval` is the time between the two readings.
pub fn build(
    observations: Vec<Observation>,
    object_size: Option<ObjectSize>,
    possible_cpus: Option<&[u32]>,
    interval: Duration,
) -> StatusReport {
    let namespaces: Vec<NamespaceStatus> =
        observations.into_iter().map(|obs| namespace_status(obs, object_size, possible_cpus, interval)).collect();
    let reasons =
        namespaces.iter().flat_map(|ns| ns.reasons.iter().map(move |r| format!("{}: {r}", ns.netns.label()))).collect();
    StatusReport {
        health: health::overall(namespaces.iter().map(|ns| ns.health)),
        reasons,
        interval_ms: interval.as_millis() as u64,
        memory_total_bytes: memory_total(&namespaces),
        namespaces,
    }
}

fn namespace_status(
    obs: Observation,
    object_size: Option<ObjectSize>,
    possible_cpus: Option<&[u32]>,
    interval: Duration,
) -> NamespaceStatus {
    let (assessment, conntrack) = match obs.latest {
        Err(detail) => {
            (Assessment::error(format!("cannot read: {}", first_line(&detail))), ConntrackStatus::Error { detail })
        }
        Ok(LatestReading { view: ConntrackView::NotActive { reason }, .. }) => {
            (Assessment::ok(), ConntrackStatus::NotActive { detail: reason })
        }
        Ok(LatestReading { view: ConntrackView::Active(table), timeouts }) => {
            let rise = obs.earlier.as_ref().map(|earlier| table.stats.rise_since(earlier));
            let assessment = health::assess_table(table.entries, table.max, rise.as_ref(), interval);
            let active = active_status(table, rise, timeouts, object_size, possible_cpus);
            (assessment, ConntrackStatus::Active(active))
        }
    };
    NamespaceStatus { netns: obs.netns, health: assessment.health, reasons: assessment.reasons, conntrack }
}

fn active_status(
    table: ActiveTable,
    rise: Option<Counters>,
    timeouts: Timeouts,
    object_size: Option<ObjectSize>,
    possible_cpus: Option<&[u32]>,
) -> ActiveStatus {
    let rows = table.stats.per_cpu();
    let per_cpu = cpu_numbers(rows.len(), possible_cpus)
        .into_iter()
        .zip(rows)
        .map(|(cpu, counters)| CpuCounters { cpu, counters: counters.clone() })
        .collect();
    ActiveStatus {
        entries: table.entries,
        max: table.max,
        buckets: table.buckets,
        fill_percent: table.fill_percent().map(|p| (p * 100.0).round() / 100.0),
        memory: object_size.map(|size| memory::estimate(table.entries, table.buckets, size)),
        counters: table.stats.summed(),
        per_cpu,
        rise,
        timeouts,
    }
}

/// Entries are per namespace but the hash table is one global table, so it
/// is counted once.
fn memory_total(namespaces: &[NamespaceStatus]) -> Option<u64> {
    let estimates: Vec<&MemoryEstimate> = namespaces
        .iter()
        .filter_map(|ns| match &ns.conntrack {
            ConntrackStatus::Active(active) => active.memory.as_ref(),
            _ => None,
        })
        .collect();
    let hash_table = estimates.first()?.hash_table_bytes;
    Some(estimates.iter().map(|m| m.entries_bytes).sum::<u64>() + hash_table)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::conntrack::{ObjectSizeSource, stats::parse_stat};

    fn netns(name: &str, inode: u32) -> Netns {
        Netns { inode, name: Some(name.into()), path: PathBuf::from(format!("/run/netns/{name}")) }
    }

    fn stats(drop: u32) -> StatTable {
        parse_stat(&format!("entries found drop early_drop\n00000320 00000005 {drop:08x} 00000000\n00000320 00000001 00000000 00000000\n"))
            .unwrap()
    }

    fn active(entries: u64, max: u64, drop: u32) -> ConntrackView {
        ConntrackView::Active(ActiveTable { entries, max, buckets: 1024, stats: stats(drop) })
    }

    fn observed(ns: Netns, earlier: Option<StatTable>, view: ConntrackView) -> Observation {
        let timeouts = Timeouts::from([("udp_timeout".to_string(), 30)]);
        Observation { netns: ns, earlier, latest: Ok(LatestReading { view, timeouts }) }
    }

    const SIZE: ObjectSize = ObjectSize { bytes: 256, source: ObjectSizeSource::Slabinfo };

    #[test]
    fn full_and_dropping_namespaces_are_named_in_the_reasons() {
        let observations = vec![
            observed(netns("quiet", 1), Some(stats(0)), active(10, 1000, 0)),
            observed(netns("busy", 2), Some(stats(3)), active(850, 1000, 15)),
            observed(netns("bare", 3), None, ConntrackView::NotActive { reason: "not loaded".into() }),
        ];
        let report = build(observations, Some(SIZE), Some(&[0, 1]), Duration::from_secs(1));
        assert_eq!(report.health, Health::Warning);
        assert_eq!(
            report.reasons,
            ["busy: table 85% full (850 of 1000 entries)", "busy: drop counter rose by 12 in 1s"]
        );
        assert_eq!(report.namespaces[0].health, Health::Ok);
        assert_eq!(report.namespaces[2].health, Health::Ok, "not active is not a problem");
        assert_eq!(report.memory_total_bytes, Some(256 * (10 + 850) + memory::BUCKET_BYTES * 1024));
    }

    #[test]
    fn a_single_reading_has_no_rise() {
        let report = build(vec![observed(netns("a", 1), None, active(10, 1000, 9))], None, None, Duration::ZERO);
        let ConntrackStatus::Active(a) = &report.namespaces[0].conntrack else { panic!() };
        assert!(a.rise.is_none());
        assert!(a.memory.is_none());
        assert_eq!(report.memory_total_bytes, None);
        assert_eq!(report.health, Health::Ok);
    }

    #[test]
    fn an_unreadable_namespace_is_an_error() {
        let obs = Observation {
            netns: netns("gone", 4),
            earlier: None,
            latest: Err("network namespace gone: cannot enter\n  hint: ...".into()),
        };
        let report = build(vec![obs], None, None, Duration::ZERO);
        assert_eq!(report.health, Health::Error);
        assert_eq!(report.reasons, ["gone: cannot read: network namespace gone: cannot enter"]);
    }

    #[test]
    fn json_has_stable_snake_case_keys_and_numbers() {
        let report = build(
            vec![observed(netns("a", 7), Some(stats(0)), active(800, 1000, 0))],
            Some(SIZE),
            None,
            Duration::from_secs(1),
        );
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["health"], "warning");
        assert_eq!(json["interval_ms"], 1000);
        let ns = &json["namespaces"][0];
        for key in [
            "inode",
            "name",
            "path",
            "health",
            "reasons",
            "conntrack",
            "entries",
            "max",
            "buckets",
            "fill_percent",
            "memory",
            "counters",
            "per_cpu",
            "rise",
            "timeouts",
        ] {
            assert!(ns.get(key).is_some(), "missing {key} in {ns}");
        }
        assert_eq!(ns["conntrack"], "active");
        assert_eq!(ns["inode"], 7);
        assert_eq!(ns["fill_percent"], 80.0);
        assert_eq!(ns["counters"]["entries"], 800, "entries once, not per CPU");
        assert_eq!(ns["counters"]["found"], 6);
        assert_eq!(ns["per_cpu"][1]["cpu"], 1);
        assert_eq!(ns["rise"]["drop"], 0);
        assert_eq!(ns["memory"]["object_size_source"], "slabinfo");
        assert_eq!(ns["timeouts"]["udp_timeout"], 30);

        let bare = build(
            vec![observed(netns("b", 8), None, ConntrackView::NotActive { reason: "no stat file".into() })],
            None,
            None,
            Duration::ZERO,
        );
        let ns = &serde_json::to_value(&bare).unwrap()["namespaces"][0];
        assert_eq!(ns["conntrack"], "not_active");
        assert_eq!(ns["detail"], "no stat file");
    }
}
