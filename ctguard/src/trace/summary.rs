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
    /// ctguard's drops of this namespace after checking each conntrack cause
    /// against the kernel counter that cause bumps (see [`reconcile`]).
    pub reconciled: BTreeMap<Cause, u64>,
    /// Drops moved to `ruleset` by that check, per cause they were first given.
    pub moved_to_ruleset: BTreeMap<Cause, u64>,
    /// The reconciled table_full count equals the kernel's `drop` counter.
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

/// Compares the kernel counter deltas of one namespace with ctguard's drops
/// there, and corrects what the kernel programs could only guess.
///
/// At `kfree_skb` a conntrack refusal and a rule's verdict can look alike:
/// an iptables-legacy rule that drops a new flow frees it in `nf_hook_slow`
/// with an unconfirmed entry attached, exactly like a failed confirm; a rule
/// in a chain that runs before conntrack (or where conntrack is off) drops a
/// packet with no entry, like a refused allocation or an invalid packet. The
/// kernel counts its own refusals, so each conntrack cause can hold at most
/// what its counter rose by: `table_full` ≤ `drop`, `insert_failed` ≤
/// `insert_failed`, `ct_invalid` ≤ `invalid`. Whatever ctguard booked beyond
/// that was a rule's verdict and moves to `ruleset`.
pub fn reconcile(
    netns: u32,
    label: String,
    kernel_delta: &BTreeMap<String, u64>,
    ctguard: &BTreeMap<Cause, u64>,
) -> Reconciliation {
    let k = |name: &str| kernel_delta.get(name).copied().unwrap_or(0);
    let c = |cause: Cause| ctguard.get(&cause).copied().unwrap_or(0);
    let mut reconciled = ctguard.clone();
    let mut moved_to_ruleset = BTreeMap::new();
    for (cause, ceiling) in
        [(Cause::TableFull, k("drop")), (Cause::InsertFailed, k("insert_failed")), (Cause::CtInvalid, k("invalid"))]
    {
        let excess = c(cause).saturating_sub(ceiling);
        if excess > 0 {
            reconciled.insert(cause, ceiling);
            *reconciled.entry(Cause::Ruleset).or_default() += excess;
            moved_to_ruleset.insert(cause, excess);
        }
    }
    reconciled.retain(|_, n| *n > 0);
    let table_full = reconciled.get(&Cause::TableFull).copied().unwrap_or(0);
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
        // (and, rarely, a failed clash resolution or an L4 tracker's drop,
        // which also bump insert_failed or invalid).
        exact: k("drop") == table_full,
        reconciled,
        moved_to_ruleset,
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
        for (cause, n) in &r.moved_to_ruleset {
            let _ = writeln!(
                out,
                "    {n} drops first seen as {} are a rule's verdict: the kernel's {} counter did not rise for them",
                cause.as_str(),
                kernel_counter_of(*cause)
            );
        }
        if !r.moved_to_ruleset.is_empty() {
            let parts: Vec<String> = r.reconciled.iter().map(|(c, n)| format!("{} {n}", c.as_str())).collect();
            let _ = writeln!(out, "    reconciled drops: {}", parts.join(", "));
        }
    }
    if !s.top_new_entries.is_empty() {
        let _ = writeln!(out, "top new entries:");
        for k in &s.top_new_entries {
            let _ = writeln!(out, "  {:>10}  {}  netns:[{}]", k.inserts, k.key, k.netns);
        }
    }
    out
}

fn kernel_counter_of(cause: Cause) -> &'static str {
    match cause {
        Cause::TableFull => "drop",
        Cause::InsertFailed => "insert_failed",
        Cause::CtInvalid => "invalid",
        _ => "(none)",
    }
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
        assert!(r.moved_to_ruleset.is_empty());
        assert_eq!(r.reconciled, ours);
        let off: BTreeMap<Cause, u64> = [(Cause::TableFull, 300)].into();
        assert!(!reconcile(1, "b".into(), &kernel, &off).exact);
    }

    #[test]
    fn conntrack_causes_beyond_the_kernel_counters_are_rule_verdicts() {
        // An iptables-legacy rule dropped 50 new flows (seen as insert_failed,
        // the kernel's insert_failed stayed put); 3 real confirm failures; a
        // raw-priority rule dropped 7 untracked packets (seen as ct_invalid
        // and table_full, with neither kernel counter rising).
        let kernel: BTreeMap<String, u64> =
            [("drop".to_string(), 100), ("insert_failed".to_string(), 3), ("invalid".to_string(), 0)].into();
        let ours: BTreeMap<Cause, u64> =
            [(Cause::TableFull, 104), (Cause::InsertFailed, 53), (Cause::CtInvalid, 3), (Cause::Ruleset, 10)].into();
        let r = reconcile(1, "b".into(), &kernel, &ours);
        assert_eq!(
            r.reconciled,
            [(Cause::TableFull, 100), (Cause::InsertFailed, 3), (Cause::Ruleset, 10 + 4 + 50 + 3)].into()
        );
        assert_eq!(
            r.moved_to_ruleset,
            [(Cause::TableFull, 4), (Cause::InsertFailed, 50), (Cause::CtInvalid, 3)].into()
        );
        assert!(r.exact);
        // Nothing is lost or invented: the total is the same.
        assert_eq!(r.reconciled.values().sum::<u64>(), ours.values().sum::<u64>());
        let text = text(&Summary {
            summary: true,
            duration_s: 1.0,
            events_shown: 0,
            events_read: 0,
            events_lost: 0,
            kernel_program_misses: 0,
            counters: Counters::default(),
            drops: ours,
            reconciliation: vec![r],
            top_new_entries: vec![],
        });
        assert!(text.contains("50 drops first seen as insert_failed are a rule's verdict"), "{text}");
        assert!(text.contains("reconciled drops: table_full 100, insert_failed 3, ruleset 67"), "{text}");
    }
}
