//! Pure arithmetic of `top`: successive samples in, rates and rankings out.
//! Nothing here touches the kernel, so every case is unit-tested.
use std::collections::{BTreeMap, HashMap};

use ctguard_ebpf::{ChurnKey, ChurnValue};
use serde::Serialize;

use crate::{
    sensors::{
        KeyMode,
        event::Flow,
        prog_stats::ProgramStats,
        snapshot::{Cause, Snapshot},
    },
    trace::format,
    util::Cidr,
};

/// Occupancy of one namespace's table at sampling time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TableGauge {
    pub netns: u32,
    pub label: String,
    pub entries: u64,
    pub max: u64,
    pub buckets: u64,
    /// The kernel's cumulative `early_drop` counter (32-bit per CPU, summed).
    pub early_drop: u64,
}

/// Everything one sampling tick read.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the session started.
    pub at_s: f64,
    pub snapshot: Snapshot,
    pub tables: Vec<TableGauge>,
    /// Kernel statistics of ctguard's own programs.
    pub programs: Vec<ProgramStats>,
}

/// What one of ctguard's kernel programs cost over the interval.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub program: String,
    pub runs_per_s: f64,
    /// Average ns per run (only while kernel.bpf_stats_enabled=1).
    pub ns_per_run: Option<f64>,
    /// Runs the kernel skipped since start because the program was already
    /// running on that CPU: events ctguard could not count.
    pub recursion_misses: u64,
}

/// Delta of a monotonically increasing counter. A decrease means the
/// counter restarted (maps re-created, a CPU's slot reset): count from zero
/// instead of producing a huge bogus rate.
pub fn counter_delta(prev: u64, cur: u64) -> u64 {
    if cur >= prev { cur - prev } else { cur }
}

/// Delta of a 32-bit kernel counter (/proc/net/stat values are `unsigned
/// int`), which wraps at 2^32.
pub fn counter_delta_u32(prev: u64, cur: u64) -> u64 {
    let (p, c) = (prev as u32, cur as u32);
    u64::from(c.wrapping_sub(p))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    /// New entries per second.
    Inserts,
    /// Conntrack drops per second.
    Drops,
    /// Removals per second.
    Removals,
    /// Total new entries since start.
    Total,
    /// The key itself.
    Key,
}

impl SortBy {
    pub fn next(self) -> SortBy {
        match self {
            SortBy::Inserts => SortBy::Drops,
            SortBy::Drops => SortBy::Removals,
            SortBy::Removals => SortBy::Total,
            SortBy::Total => SortBy::Key,
            SortBy::Key => SortBy::Inserts,
        }
    }
}

/// What the user narrowed the view to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyFilter {
    pub netns: Option<u32>,
    pub proto: Option<u8>,
    pub port: Option<u16>,
    pub src: Option<Cidr>,
    pub dst: Option<Cidr>,
}

impl KeyFilter {
    /// Filters apply to what the key mode keeps; a filter on a field the key
    /// does not carry (e.g. a port when grouping by source address) hides the
    /// key, since it cannot be shown to match.
    pub fn matches(&self, key: &ChurnKey) -> bool {
        let f = Flow::from_kernel(&key.tuple);
        self.netns.is_none_or(|ns| ns == key.netns)
            && self.proto.is_none_or(|p| key.other == 0 && p == f.proto)
            && self.port.is_none_or(|p| key.other == 0 && (p == f.dport || p == f.sport))
            && self.src.is_none_or(|c| f.src.is_some_and(|a| c.contains(&a)))
            && self.dst.is_none_or(|c| f.dst.is_some_and(|a| c.contains(&a)))
    }

    pub fn is_empty(&self) -> bool {
        *self == KeyFilter::default()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Rates {
    pub new_per_s: f64,
    pub removed_per_s: f64,
    /// Conntrack and ruleset drops per second, by cause.
    pub drops_per_s: BTreeMap<Cause, f64>,
    /// Entries the kernel evicted to make room (`early_drop`), per second.
    pub early_drop_per_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    Rising,
    Falling,
    Steady,
}

#[derive(Clone, Debug, Serialize)]
pub struct TableView {
    pub netns: u32,
    pub label: String,
    pub entries: u64,
    pub max: u64,
    pub buckets: u64,
    pub fill_percent: f64,
    pub trend: Trend,
    /// Net entries added per second over the last interval.
    pub growth_per_s: f64,
    /// Seconds until entries reach max at the current growth; None when not growing.
    pub time_to_full_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KeyRow {
    pub netns: u32,
    pub key: String,
    pub inserts_per_s: f64,
    /// Share of all new entries (this interval, after filters) in percent.
    pub share_percent: f64,
    pub drops_per_s: f64,
    pub removals_per_s: f64,
    pub total_inserts: u64,
}

/// One computed screen / JSON document.
#[derive(Clone, Debug, Serialize)]
pub struct Frame {
    pub interval_s: f64,
    pub rates: Rates,
    pub tables: Vec<TableView>,
    pub keys: Vec<KeyRow>,
    /// Keys not shown (below the top N).
    pub keys_hidden: usize,
    /// Events lost by the ring buffer since start (shown, never hidden).
    pub events_lost: u64,
    /// Keys folded into "other" since start because the kernel map was full.
    pub key_overflow: u64,
    /// ctguard's own kernel programs: rate, cost, misses.
    pub programs: Vec<ProgramCost>,
}

/// Identity of a key for matching across samples.
type KeyId = (u32, u16, u8, [u8; 16], [u8; 16], u16, u16, u8, u8);

fn key_id(k: &ChurnKey) -> KeyId {
    let t = &k.tuple;
    (k.netns, k.zone, k.other, t.saddr, t.daddr, t.sport, t.dport, t.ip_version, t.proto)
}

pub struct FrameOptions<'a> {
    pub mode: KeyMode,
    pub sort: SortBy,
    pub top: usize,
    pub filter: &'a KeyFilter,
}

/// Rates and rankings between two samples.
pub fn frame(prev: &Sample, cur: &Sample, opts: &FrameOptions<'_>) -> Frame {
    let dt = (cur.at_s - prev.at_s).max(1e-6);
    let per_s = |n: u64| n as f64 / dt;
    let netns = opts.filter.netns;

    let (c0, c1) = (&prev.snapshot, &cur.snapshot);
    let (prev_drops, cur_drops) = (c0.drops_by_cause(netns), c1.drops_by_cause(netns));
    // Every cause, zero included: the JSON document keeps one shape.
    let count = |m: &BTreeMap<Cause, u64>, c: &Cause| m.get(c).copied().unwrap_or(0);
    let drops_per_s =
        Cause::ALL.iter().map(|c| (*c, per_s(counter_delta(count(&prev_drops, c), count(&cur_drops, c))))).collect();

    let prev_keys: HashMap<KeyId, ChurnValue> = c0.churn.iter().map(|(k, v)| (key_id(k), *v)).collect();
    let mut interval_inserts = 0u64;
    let mut interval_removals = 0u64;
    let mut rows: Vec<(KeyRow, u64)> = Vec::new();
    for (key, v) in &c1.churn {
        if netns.is_some_and(|ns| ns != key.netns) {
            continue;
        }
        let p = prev_keys.get(&key_id(key)).copied().unwrap_or_default();
        let (ins, rem, drp) = (
            counter_delta(p.inserts, v.inserts),
            counter_delta(p.removals, v.removals),
            counter_delta(p.drops, v.drops),
        );
        interval_inserts += ins;
        interval_removals += rem;
        if !opts.filter.matches(key) {
            continue;
        }
        rows.push((
            KeyRow {
                netns: key.netns,
                key: format::churn_key(key, opts.mode),
                inserts_per_s: per_s(ins),
                share_percent: 0.0,
                drops_per_s: per_s(drp),
                removals_per_s: per_s(rem),
                total_inserts: v.inserts,
            },
            ins,
        ));
    }
    let shown_total: u64 = rows.iter().map(|(_, ins)| ins).sum();
    for (row, ins) in &mut rows {
        row.share_percent = if shown_total == 0 { 0.0 } else { *ins as f64 * 100.0 / shown_total as f64 };
    }
    let mut keys: Vec<KeyRow> = rows.into_iter().map(|(r, _)| r).collect();
    let keys_hidden = select_top(&mut keys, opts.top, opts.sort);

    let prev_tables: HashMap<u32, &TableGauge> = prev.tables.iter().map(|t| (t.netns, t)).collect();
    let early_drops: u64 = cur
        .tables
        .iter()
        .filter(|t| netns.is_none_or(|ns| ns == t.netns))
        .filter_map(|t| prev_tables.get(&t.netns).map(|p| counter_delta_u32(p.early_drop, t.early_drop)))
        .sum();
    let tables = cur
        .tables
        .iter()
        .filter(|t| netns.is_none_or(|ns| ns == t.netns))
        .map(|t| table_view(prev_tables.get(&t.netns).copied(), t, dt))
        .collect();

    Frame {
        interval_s: dt,
        rates: Rates {
            new_per_s: per_s(if netns.is_some() {
                interval_inserts
            } else {
                counter_delta(c0.counters.new_entries, c1.counters.new_entries)
            }),
            removed_per_s: per_s(if netns.is_some() {
                interval_removals
            } else {
                counter_delta(c0.counters.removed_entries, c1.counters.removed_entries)
            }),
            drops_per_s,
            early_drop_per_s: per_s(early_drops),
        },
        tables,
        keys,
        keys_hidden,
        events_lost: c1.counters.events_lost,
        key_overflow: c1.counters.key_overflow,
        programs: program_costs(&prev.programs, &cur.programs, dt),
    }
}

fn program_costs(prev: &[ProgramStats], cur: &[ProgramStats], dt: f64) -> Vec<ProgramCost> {
    cur.iter()
        .map(|c| {
            let p = prev.iter().find(|p| p.program == c.program).cloned().unwrap_or_default();
            let runs = counter_delta(p.run_count, c.run_count);
            let time = counter_delta(p.run_time_ns, c.run_time_ns);
            ProgramCost {
                program: c.program.clone(),
                runs_per_s: runs as f64 / dt,
                ns_per_run: (runs > 0).then(|| time as f64 / runs as f64),
                recursion_misses: c.recursion_misses,
            }
        })
        .collect()
}

fn table_view(prev: Option<&TableGauge>, cur: &TableGauge, dt: f64) -> TableView {
    let growth = prev.map_or(0.0, |p| (cur.entries as f64 - p.entries as f64) / dt);
    let trend = if growth > 0.0 {
        Trend::Rising
    } else if growth < 0.0 {
        Trend::Falling
    } else {
        Trend::Steady
    };
    let time_to_full_s = (growth > 0.0 && cur.max > cur.entries)
        .then(|| (cur.max - cur.entries) as f64 / growth)
        .or_else(|| (growth > 0.0 && cur.max > 0 && cur.entries >= cur.max).then_some(0.0));
    TableView {
        netns: cur.netns,
        label: cur.label.clone(),
        entries: cur.entries,
        max: cur.max,
        buckets: cur.buckets,
        fill_percent: if cur.max == 0 { 0.0 } else { cur.entries as f64 * 100.0 / cur.max as f64 },
        trend,
        growth_per_s: growth,
        time_to_full_s,
    }
}

fn sort_key_cmp(sort: SortBy, a: &KeyRow, b: &KeyRow) -> std::cmp::Ordering {
    let desc = |x: f64, y: f64| y.total_cmp(&x);
    match sort {
        SortBy::Inserts => desc(a.inserts_per_s, b.inserts_per_s),
        SortBy::Drops => desc(a.drops_per_s, b.drops_per_s),
        SortBy::Removals => desc(a.removals_per_s, b.removals_per_s),
        SortBy::Total => b.total_inserts.cmp(&a.total_inserts),
        SortBy::Key => a.key.cmp(&b.key),
    }
    .then_with(|| a.key.cmp(&b.key))
    .then_with(|| a.netns.cmp(&b.netns))
}

/// Keeps the best `n` rows in order and returns how many were dropped.
/// Uses selection, not a full sort, so cost stays O(keys + n log n).
pub fn select_top(rows: &mut Vec<KeyRow>, n: usize, sort: SortBy) -> usize {
    let hidden = rows.len().saturating_sub(n);
    if n == 0 {
        rows.clear();
        return hidden;
    }
    if rows.len() > n {
        rows.select_nth_unstable_by(n - 1, |a, b| sort_key_cmp(sort, a, b));
        rows.truncate(n);
    }
    rows.sort_by(|a, b| sort_key_cmp(sort, a, b));
    hidden
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctguard_ebpf::{DropKey, FlowTuple, cause, confidence, counter};
    use std::time::Instant;

    fn key(netns: u32, dport: u16) -> ChurnKey {
        ChurnKey {
            netns,
            tuple: FlowTuple { dport, proto: 17, ip_version: 4, ..Default::default() },
            ..Default::default()
        }
    }

    fn snap(new_entries: u64, keys: Vec<(ChurnKey, u64, u64)>, table_full: u64) -> Snapshot {
        let mut counters = [0u64; counter::COUNT as usize];
        counters[counter::CT_ALLOCATED as usize] = new_entries;
        let churn =
            keys.into_iter().map(|(k, ins, drops)| (k, ChurnValue { inserts: ins, removals: 0, drops })).collect();
        let drops = vec![(
            DropKey { netns: 1, cause: cause::TABLE_FULL, confidence: confidence::LIKELY, _pad: [0; 2] },
            table_full,
        )];
        Snapshot::new(Instant::now(), counters, churn, drops)
    }

    fn sample(at_s: f64, snapshot: Snapshot, entries: u64) -> Sample {
        Sample {
            at_s,
            snapshot,
            tables: vec![TableGauge {
                netns: 1,
                label: "b".into(),
                entries,
                max: 1000,
                buckets: 1024,
                early_drop: entries / 100,
            }],
            programs: vec![ProgramStats {
                program: "ctg_ct_alloc".into(),
                run_count: entries * 10,
                run_time_ns: entries * 1000,
                recursion_misses: 0,
            }],
        }
    }

    fn opts(filter: &KeyFilter) -> FrameOptions<'_> {
        FrameOptions { mode: KeyMode::DstPort, sort: SortBy::Inserts, top: 10, filter }
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let a = sample(0.0, snap(100, vec![(key(1, 80), 60, 0), (key(1, 53), 40, 0)], 0), 100);
        let b = sample(2.0, snap(400, vec![(key(1, 80), 260, 10), (key(1, 53), 140, 0)], 10), 300);
        let f = frame(&a, &b, &opts(&KeyFilter::default()));
        assert_eq!(f.rates.new_per_s, 150.0);
        assert_eq!(f.rates.drops_per_s[&Cause::TableFull], 5.0);
        assert_eq!(f.keys[0].key, "80/udp");
        assert_eq!(f.keys[0].inserts_per_s, 100.0);
        assert!((f.keys[0].share_percent - 66.666).abs() < 0.01);
        assert_eq!(f.keys[0].drops_per_s, 5.0);
        assert_eq!(f.keys[1].inserts_per_s, 50.0);
        assert_eq!(f.rates.early_drop_per_s, 1.0, "early_drop 1 -> 3 over 2 s");
        assert_eq!(f.programs[0].runs_per_s, 1000.0, "1000 -> 3000 runs over 2 s");
        assert_eq!(f.programs[0].ns_per_run, Some(100.0));
        let t = &f.tables[0];
        assert_eq!(t.trend, Trend::Rising);
        assert_eq!(t.growth_per_s, 100.0);
        assert_eq!(t.time_to_full_s, Some(7.0));
    }

    #[test]
    fn counter_restart_is_not_a_huge_rate() {
        assert_eq!(counter_delta(100, 130), 30);
        assert_eq!(counter_delta(100, 5), 5, "a reset counts from zero");
        let a = sample(0.0, snap(1_000_000, vec![], 0), 0);
        let b = sample(1.0, snap(10, vec![], 0), 0);
        assert_eq!(frame(&a, &b, &opts(&KeyFilter::default())).rates.new_per_s, 10.0);
    }

    #[test]
    fn kernel_u32_counters_wrap() {
        assert_eq!(counter_delta_u32(u32::MAX as u64 - 1, 3), 5);
        assert_eq!(counter_delta_u32(7, 9), 2);
    }

    #[test]
    fn keys_new_since_the_last_sample_count_fully() {
        let a = sample(0.0, snap(0, vec![], 0), 0);
        let b = sample(1.0, snap(5, vec![(key(1, 443), 5, 0)], 0), 5);
        let f = frame(&a, &b, &opts(&KeyFilter::default()));
        assert_eq!(f.keys[0].inserts_per_s, 5.0);
        assert_eq!(f.keys[0].share_percent, 100.0);
    }

    #[test]
    fn filters_narrow_rows_and_netns_narrows_rates() {
        let a = sample(0.0, snap(0, vec![], 0), 0);
        let b = sample(1.0, snap(30, vec![(key(1, 80), 10, 0), (key(2, 80), 20, 0)], 0), 0);
        let only_ns2 = KeyFilter { netns: Some(2), ..Default::default() };
        let f = frame(&a, &b, &opts(&only_ns2));
        assert_eq!(f.keys.len(), 1);
        assert_eq!(f.rates.new_per_s, 20.0);
        let port53 = KeyFilter { port: Some(53), ..Default::default() };
        assert!(frame(&a, &b, &opts(&port53)).keys.is_empty());
    }

    #[test]
    fn top_n_selection_keeps_the_largest_in_order() {
        let mut rows: Vec<KeyRow> = (0..100)
            .map(|i| KeyRow {
                netns: 1,
                key: format!("k{i:03}"),
                inserts_per_s: (i * 7 % 100) as f64,
                share_percent: 0.0,
                drops_per_s: 0.0,
                removals_per_s: 0.0,
                total_inserts: i,
            })
            .collect();
        let hidden = select_top(&mut rows, 5, SortBy::Inserts);
        assert_eq!(hidden, 95);
        let rates: Vec<f64> = rows.iter().map(|r| r.inserts_per_s).collect();
        assert_eq!(rates, vec![99.0, 98.0, 97.0, 96.0, 95.0]);
        select_top(&mut rows, 5, SortBy::Key);
        assert!(rows.windows(2).all(|w| w[0].key <= w[1].key));
    }

    #[test]
    fn shrinking_or_steady_tables_have_no_time_to_full() {
        let prev = TableGauge { netns: 1, label: "x".into(), entries: 500, max: 1000, buckets: 1, early_drop: 0 };
        let cur = TableGauge { entries: 400, ..prev.clone() };
        let v = table_view(Some(&prev), &cur, 1.0);
        assert_eq!(v.trend, Trend::Falling);
        assert_eq!(v.time_to_full_s, None);
        let v = table_view(Some(&prev), &prev, 1.0);
        assert_eq!(v.trend, Trend::Steady);
    }
}
