//! The summary `trace` prints at exit: what was shown, what was lost, and the
//! per-cause totals from the kernel maps next to the kernel's own counters.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::format;
use crate::sensors::{
    KeyMode,
    snapshot::{Cause, Counters, Snapshot},
};

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub summary: bool,
    pub duration_s: f64,
    /// Events printed (after filters).
    pub events_shown: u64,
    /// Events read from the ring buffer (before filters).
    pub events_read: u64,
    /// Events the ring buffer had no room for (counted in the kernel).
    pub events_lost: u64,
    /// Runs of ctguard's kernel programs the kernel skipped (recursion):
    /// events nobody counted. Zero in a healthy run.
    pub kernel_program_misses: u64,
    /// Counters over the run, all namespaces.
    pub counters: Counters,
    /// Drops per cause over the run (only the --netns namespace if given), from the kernel maps.
    pub drops: BTreeMap<Cause, u64>,
    /// Per namespace: the kernel's conntrack counters next to ctguard's.
    pub reconciliation: Vec<Reconciliation>,
    /// Namespaces with most new entries over the run, by the --by key.
    pub top_new_entries: Vec<KeyCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    pub netns: u32,
    pub label: String,
    /// Deltas of /proc/net/stat/nf_conntrack columns over the run.
    pub kernel_drop: u64,
    pub kernel_insert_failed: u64,
    pub kernel_invalid: u64,
    pub kernel_early_drop: u64,
    pub ctguard_table_full: u64,
    pub ctguard_insert_failed: u64,
    /// ctguard's table_full count equals the kernel's `drop` counter.
    pub exact: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyCount {
    pub netns: u32,
    pub key: String,
    pub inserts: u64,
    pub removals: u64,
    /// Conntrack's own drops of packets whose flow maps to this key.
    pub drops: u64,
}

/// Drops per cause between two snapshots.
pub fn drops_between(start: &Snapshot, end: &Snapshot, netns: Option<u32>) -> BTreeMap<Cause, u64> {
    let before = start.drops_by_cause(netns);
    end.drops_by_cause(netns)
        .into_iter()
        .map(|(c, n)| (c, n.saturating_sub(before.get(&c).copied().unwrap_or(0))))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// New entries per key between two snapshots, largest first, at most `n`.
pub fn top_keys(start: &Snapshot, end: &Snapshot, netns: Option<u32>, mode: KeyMode, n: usize) -> Vec<KeyCount> {
    let before: BTreeMap<_, _> = start.churn_in(netns).into_iter().map(|(k, v)| (key_bytes(&k), v)).collect();
    let mut out: Vec<KeyCount> = end
        .churn_in(netns)
        .into_iter()
        .map(|(k, v)| {
            let b = before.get(&key_bytes(&k)).copied().unwrap_or_default();
            KeyCount {
                netns: k.netns,
                key: format::churn_key(&k, mode),
                inserts: v.inserts.saturating_sub(b.inserts),
                removals: v.removals.saturating_sub(b.removals),
                drops: v.drops.saturating_sub(b.drops),
            }
        })
        .filter(|k| k.inserts > 0 || k.removals > 0 || k.drops > 0)
        .collect();
    out.sort_by(|a, b| b.inserts.cmp(&a.inserts).then_with(|| a.key.cmp(&b.key)));
    out.truncate(n);
    out
}

fn key_bytes(k: &ctguard_ebpf::ChurnKey) -> (u32, u16, u8, [u8; 16], [u8; 16], u16, u16, u8, u8) {
    let t = &k.tuple;
    (k.netns, k.zone, k.other, t.saddr, t.daddr, t.sport, t.dport, t.ip_version, t.proto)
}

/// Compares the kernel counter deltas of one namespace with ctguard's drops there.
pub fn reconcile(
    netns: u32,
    label: String,
    kernel_delta: &BTreeMap<String, u64>,
    ctguard: &BTreeMap<Cause, u64>,
) -> Reconciliation {
    let k = |name: &str| kernel_delta.get(name).copied().unwrap_or(0);
    let c = |cause: Cause| ctguard.get(&cause).copied().unwrap_or(0);
    Reconciliation {
        netns,
        label,
        kernel_drop: k("drop"),
        kernel_insert_failed: k("insert_failed"),
        kernel_invalid: k("invalid"),
        kernel_early_drop: k("early_drop"),
        ctguard_table_full: c(Cause::TableFull),
        ctguard_insert_failed: c(Cause::InsertFailed),
        // The kernel's `drop` counts conntrack's own refusals: table full
        // (and, rarely, failed clash resolution, which also bumps insert_failed).
        exact: k("drop") == c(Cause::TableFull),
    }
}

pub fn text(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "--- ctguard trace summary ({:.1}s) ---", s.duration_s);
    let _ = writeln!(
        out,
        "events shown {}, read {}, lost by the ring buffer {}",
        s.events_shown, s.events_read, s.events_lost
    );
    if s.kernel_program_misses > 0 {
        let _ = writeln!(
            out,
            "the kernel skipped ctguard's programs {} times (recursion): those are not counted",
            s.kernel_program_misses
        );
    }
    let _ = writeln!(
        out,
        "new entries {}, removed {}, netfilter drops {}",
        s.counters.new_entries, s.counters.removed_entries, s.counters.netfilter_drops
    );
    if s.drops.is_empty() {
        let _ = writeln!(out, "drops by cause: none");
    } else {
        let parts: Vec<String> = s.drops.iter().map(|(c, n)| format!("{} {n}", c.as_str())).collect();
        let _ = writeln!(out, "drops by cause (kernel maps, exact): {}", parts.join(", "));
    }
    for r in &s.reconciliation {
        let _ = writeln!(
            out,
            "  {}: kernel drop +{} insert_failed +{} invalid +{} early_drop +{} | ctguard table_full {} insert_failed {} {}",
            r.label,
            r.kernel_drop,
            r.kernel_insert_failed,
            r.kernel_invalid,
            r.kernel_early_drop,
            r.ctguard_table_full,
            r.ctguard_insert_failed,
            if r.exact { "(match)" } else { "(MISMATCH: see `ctguard doctor`)" }
        );
    }
    if !s.top_new_entries.is_empty() {
        let _ = writeln!(out, "top new entries:");
        for k in &s.top_new_entries {
            let _ = writeln!(out, "  {:>10}  {}  netns:[{}]", k.inserts, k.key, k.netns);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciliation_matches_table_full_to_kernel_drop() {
        let kernel: BTreeMap<String, u64> = [("drop".to_string(), 336), ("invalid".to_string(), 0)].into();
        let ours: BTreeMap<Cause, u64> = [(Cause::TableFull, 336), (Cause::Ruleset, 10)].into();
        let r = reconcile(1, "b".into(), &kernel, &ours);
        assert!(r.exact);
        assert_eq!((r.kernel_drop, r.ctguard_table_full), (336, 336));
        let off: BTreeMap<Cause, u64> = [(Cause::TableFull, 300)].into();
        assert!(!reconcile(1, "b".into(), &kernel, &off).exact);
    }
}
