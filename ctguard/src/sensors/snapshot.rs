//! One reading of the kernel maps, and the pure arithmetic on readings.
use std::{collections::BTreeMap, time::Instant};

use ctguard_ebpf::{ChurnKey, ChurnValue, DropKey, cause, confidence, counter};
use serde::Serialize;

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// nf_conntrack_max reached and nothing could be evicted.
    TableFull,
    /// The new entry could not be confirmed (clash, chain too long).
    InsertFailed,
    /// Conntrack found the packet invalid and a rule dropped it.
    CtInvalid,
    /// An nftables or iptables rule's verdict.
    Ruleset,
    /// Dropped by netfilter elsewhere.
    Other,
}

impl Cause {
    pub const ALL: [Cause; 5] = [Cause::TableFull, Cause::InsertFailed, Cause::CtInvalid, Cause::Ruleset, Cause::Other];

    pub fn from_kernel(v: u8) -> Cause {
        match v {
            cause::TABLE_FULL => Cause::TableFull,
            cause::INSERT_FAILED => Cause::InsertFailed,
            cause::CT_INVALID => Cause::CtInvalid,
            cause::RULESET => Cause::Ruleset,
            _ => Cause::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::TableFull => "table_full",
            Cause::InsertFailed => "insert_failed",
            Cause::CtInvalid => "ct_invalid",
            Cause::Ruleset => "ruleset",
            Cause::Other => "other",
        }
    }
}

/// How certain the kernel program was of a cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    Certain,
    Likely,
}

impl Confidence {
    pub fn from_kernel(v: u8) -> Confidence {
        if v == confidence::CERTAIN { Confidence::Certain } else { Confidence::Likely }
    }
}

/// The global per-CPU counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// New conntrack entries (slab allocations), all namespaces.
    pub new_entries: u64,
    /// Allocations the slab refused (memory pressure).
    pub alloc_failed: u64,
    /// Entries freed, all namespaces.
    pub removed_entries: u64,
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
    /// Keys folded into "other" because the kernel map was full.
    pub key_overflow: u64,
    /// Packets dropped by netfilter (every cause).
    pub netfilter_drops: u64,
    /// New entries whose key has been counted.
    pub keyed_entries: u64,
    /// Keys lost because even the per-namespace "other" buckets were full.
    pub other_overflow: u64,
    /// Allocations conntrack refused because the table was full (function hooks only).
    pub alloc_refused: u64,
    /// Confirms that failed (function hooks only).
    pub confirm_failed: u64,
    /// Entries evicted by early_drop to make room (function hooks only).
    pub early_drop_evictions: u64,
}

impl Counters {
    pub fn from_array(a: [u64; counter::COUNT as usize]) -> Self {
        Self {
            new_entries: a[counter::CT_ALLOCATED as usize],
            alloc_failed: a[counter::CT_ALLOC_FAILED as usize],
            removed_entries: a[counter::CT_FREED as usize],
            events_lost: a[counter::RINGBUF_LOST as usize],
            key_overflow: a[counter::KEY_OVERFLOW as usize],
            netfilter_drops: a[counter::NF_DROPS as usize],
            keyed_entries: a[counter::CT_KEYED as usize],
            other_overflow: a[counter::OTHER_OVERFLOW as usize],
            alloc_refused: a[counter::CT_ALLOC_REFUSED as usize],
            confirm_failed: a[counter::CONFIRM_FAILED as usize],
            early_drop_evictions: a[counter::EARLY_DROP_EVICTIONS as usize],
        }
    }

    /// `self - earlier`, counter by counter, tolerating wrap-around.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            new_entries: self.new_entries.wrapping_sub(earlier.new_entries),
            alloc_failed: self.alloc_failed.wrapping_sub(earlier.alloc_failed),
            removed_entries: self.removed_entries.wrapping_sub(earlier.removed_entries),
            events_lost: self.events_lost.wrapping_sub(earlier.events_lost),
            key_overflow: self.key_overflow.wrapping_sub(earlier.key_overflow),
            netfilter_drops: self.netfilter_drops.wrapping_sub(earlier.netfilter_drops),
            keyed_entries: self.keyed_entries.wrapping_sub(earlier.keyed_entries),
            other_overflow: self.other_overflow.wrapping_sub(earlier.other_overflow),
            alloc_refused: self.alloc_refused.wrapping_sub(earlier.alloc_refused),
            confirm_failed: self.confirm_failed.wrapping_sub(earlier.confirm_failed),
            early_drop_evictions: self.early_drop_evictions.wrapping_sub(earlier.early_drop_evictions),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub taken: Instant,
    pub counters: Counters,
    pub churn: Vec<(ChurnKey, ChurnValue)>,
    pub drops: Vec<(DropKey, u64)>,
}

impl Snapshot {
    pub fn new(
        taken: Instant,
        counters: [u64; counter::COUNT as usize],
        churn: Vec<(ChurnKey, ChurnValue)>,
        drops: Vec<(DropKey, u64)>,
    ) -> Self {
        Self { taken, counters: Counters::from_array(counters), churn, drops }
    }

    /// The reading of freshly created maps: everything zero.
    pub fn empty() -> Self {
        Self::new(Instant::now(), [0; counter::COUNT as usize], vec![], vec![])
    }

    /// Drops per cause, for one netns or all of them.
    pub fn drops_by_cause(&self, netns: Option<u32>) -> BTreeMap<Cause, u64> {
        let mut out = BTreeMap::new();
        for (key, n) in &self.drops {
            if netns.is_none_or(|ns| ns == key.netns) {
                *out.entry(Cause::from_kernel(key.cause)).or_insert(0) += n;
            }
        }
        out
    }

    /// New entries and removals per key, for one netns or all of them.
    pub fn churn_in(&self, netns: Option<u32>) -> Vec<(ChurnKey, ChurnValue)> {
        self.churn.iter().filter(|(k, _)| netns.is_none_or(|ns| ns == k.netns)).copied().collect()
    }

    /// Total new entries keyed in one netns (or all).
    pub fn inserts_in(&self, netns: Option<u32>) -> u64 {
        self.churn_in(netns).iter().map(|(_, v)| v.inserts).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_key(netns: u32, c: u8) -> DropKey {
        DropKey { netns, cause: c, confidence: confidence::LIKELY, _pad: [0; 2] }
    }

    #[test]
    fn counters_delta_survives_wrap() {
        let a = Counters { new_entries: u64::MAX - 1, ..Default::default() };
        let b = Counters { new_entries: 3, ..Default::default() };
        assert_eq!(b.since(&a).new_entries, 5);
    }

    #[test]
    fn drops_group_by_cause_and_netns() {
        let s = Snapshot::new(
            Instant::now(),
            [0; counter::COUNT as usize],
            vec![],
            vec![
                (drop_key(1, cause::TABLE_FULL), 5),
                (drop_key(2, cause::TABLE_FULL), 7),
                (drop_key(1, cause::RULESET), 2),
            ],
        );
        let all = s.drops_by_cause(None);
        assert_eq!(all[&Cause::TableFull], 12);
        assert_eq!(all[&Cause::Ruleset], 2);
        let one = s.drops_by_cause(Some(1));
        assert_eq!(one[&Cause::TableFull], 5);
        assert!(!s.drops_by_cause(Some(3)).contains_key(&Cause::TableFull));
    }

    #[test]
    fn unknown_kernel_cause_is_other() {
        assert_eq!(Cause::from_kernel(0), Cause::Other);
        assert_eq!(Cause::from_kernel(200), Cause::Other);
        assert_eq!(Cause::from_kernel(cause::INSERT_FAILED), Cause::InsertFailed);
    }
}
