//! Demand from observation, by Little's law: the entries a namespace holds
//! ≈ Σ over protocol classes of (new entries per second x how long an entry
//! of that class lives under the current timeouts).
//!
//! Pure: observations come in as [`Interval`]s (built from two sensor
//! snapshots by [`interval_between`], or from `ctguard top --json` documents
//! by [`parse_top_json`]), and come out as rates, port shares and demand.
//!
//! Lifetime assumptions (one timeout per class; stated in every report):
//! * **tcp**: short connections that close cleanly end in TIME_WAIT and stay
//!   there `tcp_timeout_time_wait` (120 s by default). The time they spent
//!   established (and in FIN_WAIT/CLOSE_WAIT) is not known from churn and is
//!   not counted; long-lived connections are covered by the floor of the
//!   table's own current count instead.
//! * **udp** (and udplite): `udp_timeout` (30 s): an unreplied flow, or a
//!   request/response exchange, expires that long after its last packet;
//!   streams (`udp_timeout_stream`) live longer and are likewise covered by
//!   the current-count floor.
//! * **icmp** / **icmpv6**: `icmp_timeout` / `icmpv6_timeout`.
//! * **other** protocols: `generic_timeout` (an over-estimate for gre and
//!   sctp, which have their own, shorter, trackers).
//! * **unknown** (a key without a protocol: the kernel map's "other keys",
//!   or a `top` file recorded with another `--by`): first spread over the
//!   known classes of the same interval in proportion; when there is none,
//!   the longer of the tcp and udp lifetimes.
use std::collections::{BTreeMap, HashMap};

use ctguard_ebpf::ChurnKey;
use serde::Serialize;
use serde_json::Value;

use super::formulas::littles_law;
use crate::{conntrack::Timeouts, sensors::snapshot::Snapshot, top::model::counter_delta, trace::filter::parse_proto};

/// The namespace new entries are booked to when nothing says which one.
pub const UNATTRIBUTED_NETNS: u32 = 0;

/// The kernel's default timeouts (6.18), used when a sysctl is missing.
pub const DEFAULT_TIMEOUTS: [(&str, u64); 5] = [
    ("tcp_timeout_time_wait", 120),
    ("udp_timeout", 30),
    ("icmp_timeout", 30),
    ("icmpv6_timeout", 30),
    ("generic_timeout", 600),
];

/// A protocol class with one lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Other,
    Unknown,
}

impl Class {
    pub fn from_proto(proto: u8) -> Class {
        match proto {
            6 => Class::Tcp,
            17 | 136 => Class::Udp,
            1 => Class::Icmp,
            58 => Class::Icmpv6,
            _ => Class::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Tcp => "tcp",
            Class::Udp => "udp",
            Class::Icmp => "icmp",
            Class::Icmpv6 => "icmpv6",
            Class::Other => "other",
            Class::Unknown => "unknown",
        }
    }

    /// The timeout (sysctl key without `nf_conntrack_`) that is this class's
    /// lifetime; `None` for [`Class::Unknown`].
    pub fn timeout_key(self) -> Option<&'static str> {
        match self {
            Class::Tcp => Some("tcp_timeout_time_wait"),
            Class::Udp => Some("udp_timeout"),
            Class::Icmp => Some("icmp_timeout"),
            Class::Icmpv6 => Some("icmpv6_timeout"),
            Class::Other => Some("generic_timeout"),
            Class::Unknown => None,
        }
    }

    /// The assumption behind the lifetime, for reports.
    pub fn assumption(self) -> &'static str {
        match self {
            Class::Tcp => "short connections end in TIME_WAIT; time spent established is unknown and not counted",
            Class::Udp => "unreplied flows and request/response exchanges expire udp_timeout after their last packet",
            Class::Icmp | Class::Icmpv6 => "echo and error exchanges expire after the icmp timeout",
            Class::Other => "protocols without their own tracker use the generic timeout",
            Class::Unknown => "protocol not known: the longer of the tcp (time_wait) and udp lifetimes",
        }
    }

    /// How long an entry of this class lives under `timeouts`, in seconds.
    pub fn lifetime_s(self, timeouts: &Timeouts) -> u64 {
        match self.timeout_key() {
            Some(key) => timeout_or_default(timeouts, key),
            None => Class::Tcp.lifetime_s(timeouts).max(Class::Udp.lifetime_s(timeouts)),
        }
    }
}

/// `timeouts[key]`, or the kernel default when the sysctl is missing.
pub fn timeout_or_default(timeouts: &Timeouts, key: &str) -> u64 {
    timeouts
        .get(key)
        .copied()
        .or_else(|| DEFAULT_TIMEOUTS.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
        .unwrap_or(0)
}

/// New entries of one key in one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyCount {
    pub netns: u32,
    /// IP protocol; `None` when the key does not carry it.
    pub proto: Option<u8>,
    /// Destination port (meaningful for tcp, udp, udplite and sctp).
    pub dport: Option<u16>,
    pub inserts: f64,
}

/// What one sampling interval saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Interval {
    pub dt_s: f64,
    pub keys: Vec<KeyCount>,
    /// New entries no key accounts for (neither namespace nor protocol known).
    pub unattributed: f64,
}

impl Interval {
    pub fn total(&self) -> f64 {
        self.keys.iter().map(|k| k.inserts).sum::<f64>() + self.unattributed
    }
}

/// Books every new entry of an interval to a (namespace, class): entries of
/// unknown protocol are spread over the known classes of their namespace
/// (else of the whole interval) in proportion; entries of unknown namespace
/// over everything booked. What cannot be spread stays `Unknown`.
pub fn attribute(interval: &Interval) -> BTreeMap<(u32, Class), f64> {
    let mut known: BTreeMap<(u32, Class), f64> = BTreeMap::new();
    let mut unknown: BTreeMap<u32, f64> = BTreeMap::new();
    for k in interval.keys.iter().filter(|k| k.inserts > 0.0) {
        match k.proto {
            Some(p) => *known.entry((k.netns, Class::from_proto(p))).or_default() += k.inserts,
            None => *unknown.entry(k.netns).or_default() += k.inserts,
        }
    }
    let weights = known.clone();
    let mut out = known;
    for (ns, amount) in unknown {
        let same_ns: Vec<_> = weights.iter().filter(|((n, _), _)| *n == ns).map(|(k, v)| (*k, *v)).collect();
        let pool = if same_ns.is_empty() { weights.iter().map(|(k, v)| (*k, *v)).collect() } else { same_ns };
        spread(&mut out, &pool, amount, (ns, Class::Unknown));
    }
    if interval.unattributed > 0.0 {
        let pool: Vec<_> = out.iter().map(|(k, v)| (*k, *v)).collect();
        spread(&mut out, &pool, interval.unattributed, (UNATTRIBUTED_NETNS, Class::Unknown));
    }
    out
}

fn spread(out: &mut BTreeMap<(u32, Class), f64>, pool: &[((u32, Class), f64)], amount: f64, fallback: (u32, Class)) {
    let total: f64 = pool.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        *out.entry(fallback).or_default() += amount;
        return;
    }
    for (key, w) in pool {
        *out.entry(*key).or_default() += amount * w / total;
    }
}

/// New entries of one class in one namespace over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassRate {
    pub netns: u32,
    pub class: Class,
    pub inserts: f64,
    /// inserts / window.
    pub mean_per_s: f64,
    /// The highest rate of any one interval (the busiest second).
    pub peak_per_s: f64,
    /// (interval seconds, new entries) for every interval of the window, in order.
    #[serde(skip)]
    pub series: Vec<(f64, f64)>,
}

impl ClassRate {
    /// The highest rate sustained over `lifetime_s` (see [`sustained_rate`]).
    pub fn sustained_per_s(&self, lifetime_s: f64) -> f64 {
        if self.series.is_empty() { self.peak_per_s } else { sustained_rate(&self.series, lifetime_s) }
    }
}

/// The highest mean rate over any run of consecutive intervals lasting at
/// least `lifetime_s` (the whole window when it is shorter). Little's law
/// with this rate gives the most entries the window shows alive at once:
/// an entry lives `lifetime_s`, so what matters is the busiest stretch of
/// that length, not the busiest second.
pub fn sustained_rate(series: &[(f64, f64)], lifetime_s: f64) -> f64 {
    let total: f64 = series.iter().map(|(dt, _)| dt.max(0.0)).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let span = lifetime_s.min(total).max(f64::MIN_POSITIVE);
    let mut best = 0.0f64;
    let (mut start, mut dur, mut sum) = (0, 0.0, 0.0);
    for (end, &(dt, n)) in series.iter().enumerate() {
        dur += dt.max(0.0);
        sum += n;
        // Shrink from the left while the run stays at least `span` long.
        while start < end && dur - series[start].0.max(0.0) >= span {
            dur -= series[start].0.max(0.0);
            sum -= series[start].1;
            start += 1;
        }
        if dur >= span * (1.0 - 1e-9) {
            best = best.max(sum / dur);
        }
    }
    best
}

/// One destination port's share of all new entries.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PortShare {
    pub proto: u8,
    pub port: u16,
    /// The namespace where this port made the most new entries (the one a
    /// bypass rule for it belongs in).
    pub netns: u32,
    pub inserts: f64,
    pub share_percent: f64,
}

/// Everything a sampling window (or a `top` file) says about churn.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Observation {
    /// Where the numbers come from, for humans.
    pub source: String,
    pub window_s: f64,
    pub intervals: usize,
    pub total_new: f64,
    pub classes: Vec<ClassRate>,
    /// Sorted by inserts, largest first.
    pub ports: Vec<PortShare>,
    /// The largest entry count each namespace's table showed during the window.
    pub table_peaks: BTreeMap<u32, u64>,
}

/// Protocols whose port is a real destination port (NOTRACK-able by port).
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

/// Rates (mean and per-interval peak) per namespace and class, and port
/// shares, over a series of intervals.
pub fn summarize(source: String, intervals: &[Interval], table_peaks: BTreeMap<u32, u64>) -> Observation {
    let window_s: f64 = intervals.iter().map(|i| i.dt_s.max(0.0)).sum();
    let attributed: Vec<BTreeMap<(u32, Class), f64>> = intervals.iter().map(attribute).collect();
    let mut rates: BTreeMap<(u32, Class), (f64, f64)> = BTreeMap::new();
    let mut series: BTreeMap<(u32, Class), Vec<(f64, f64)>> = BTreeMap::new();
    for a in &attributed {
        for key in a.keys() {
            series.entry(*key).or_default();
        }
    }
    let mut ports: BTreeMap<(u8, u16), BTreeMap<u32, f64>> = BTreeMap::new();
    let mut total_new = 0.0;
    for (interval, a) in intervals.iter().zip(&attributed) {
        total_new += interval.total();
        for (key, points) in series.iter_mut() {
            points.push((interval.dt_s.max(0.0), a.get(key).copied().unwrap_or(0.0)));
        }
        for (key, n) in a {
            let slot = rates.entry(*key).or_default();
            slot.0 += n;
            if interval.dt_s > 0.0 {
                slot.1 = slot.1.max(n / interval.dt_s);
            }
        }
        for k in &interval.keys {
            if let (Some(p), Some(port)) = (k.proto, k.dport)
                && has_ports(p)
            {
                *ports.entry((p, port)).or_default().entry(k.netns).or_default() += k.inserts;
            }
        }
    }
    let classes = rates
        .into_iter()
        .map(|((netns, class), (inserts, peak))| ClassRate {
            netns,
            class,
            inserts,
            mean_per_s: if window_s > 0.0 { inserts / window_s } else { 0.0 },
            peak_per_s: peak,
            series: series.remove(&(netns, class)).unwrap_or_default(),
        })
        .collect();
    let mut ports: Vec<PortShare> = ports
        .into_iter()
        .filter_map(|((proto, port), per_netns)| {
            let inserts: f64 = per_netns.values().sum();
            let netns = per_netns.iter().max_by(|a, b| a.1.total_cmp(b.1)).map(|(n, _)| *n)?;
            (inserts > 0.0).then(|| PortShare {
                proto,
                port,
                netns,
                inserts,
                share_percent: if total_new > 0.0 { inserts * 100.0 / total_new } else { 0.0 },
            })
        })
        .collect();
    ports.sort_by(|a, b| b.inserts.total_cmp(&a.inserts).then((a.proto, a.port).cmp(&(b.proto, b.port))));
    Observation { source, window_s, intervals: intervals.len(), total_new, classes, ports, table_peaks }
}

/// One class's share of a namespace's demand.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassDemand {
    pub class: Class,
    /// The timeout that is this class's lifetime (`tcp_timeout_time_wait`, ...).
    pub timeout: Option<&'static str>,
    pub lifetime_s: u64,
    pub mean_per_s: f64,
    /// The busiest single interval.
    pub busiest_interval_per_s: f64,
    /// The highest rate sustained over one lifetime: the peak Little's law uses.
    pub peak_per_s: f64,
    /// Little's law at the mean and at the peak rate.
    pub mean_entries: f64,
    pub peak_entries: f64,
}

/// One namespace's demand.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NsDemand {
    pub netns: u32,
    pub classes: Vec<ClassDemand>,
    pub mean_entries: f64,
    pub peak_entries: f64,
    /// The table's own count: the largest seen now or during the window.
    pub current_entries: u64,
}

impl NsDemand {
    /// What this namespace must be able to hold: the peak demand, never
    /// less than what its table holds already.
    pub fn floor_entries(&self) -> f64 {
        self.peak_entries.max(self.current_entries as f64)
    }
}

/// Demand per namespace under `timeouts`. Every namespace that has a count
/// or churn appears; the busiest first.
pub fn demand(obs: Option<&Observation>, current: &BTreeMap<u32, u64>, timeouts: &Timeouts) -> Vec<NsDemand> {
    let mut by_ns: BTreeMap<u32, NsDemand> = BTreeMap::new();
    let blank = |netns| NsDemand { netns, classes: vec![], mean_entries: 0.0, peak_entries: 0.0, current_entries: 0 };
    for (&netns, &entries) in current.iter().chain(obs.map(|o| &o.table_peaks).into_iter().flatten()) {
        let ns = by_ns.entry(netns).or_insert_with(|| blank(netns));
        ns.current_entries = ns.current_entries.max(entries);
    }
    for rate in obs.map(|o| o.classes.as_slice()).unwrap_or_default() {
        let ns = by_ns.entry(rate.netns).or_insert_with(|| blank(rate.netns));
        let lifetime_s = rate.class.lifetime_s(timeouts);
        let peak_per_s = rate.sustained_per_s(lifetime_s as f64);
        let c = ClassDemand {
            class: rate.class,
            timeout: rate.class.timeout_key(),
            lifetime_s,
            mean_per_s: rate.mean_per_s,
            busiest_interval_per_s: rate.peak_per_s,
            peak_per_s,
            mean_entries: littles_law(rate.mean_per_s, lifetime_s as f64),
            peak_entries: littles_law(peak_per_s, lifetime_s as f64),
        };
        ns.mean_entries += c.mean_entries;
        ns.peak_entries += c.peak_entries;
        ns.classes.push(c);
    }
    let mut out: Vec<NsDemand> = by_ns.into_values().collect();
    out.sort_by(|a, b| b.floor_entries().total_cmp(&a.floor_entries()).then(a.netns.cmp(&b.netns)));
    out
}

/// Entries freed machine-wide (all namespaces, at peak churn) by setting
/// timeout `key` to `new_s`; `None` when no class's lifetime is that timeout
/// (its effect cannot be estimated from churn).
pub fn frees_by_timeout(obs: Option<&Observation>, timeouts: &Timeouts, key: &str, new_s: u64) -> Option<f64> {
    let class = [Class::Tcp, Class::Udp, Class::Icmp, Class::Icmpv6, Class::Other]
        .into_iter()
        .find(|c| c.timeout_key() == Some(key))?;
    let old_s = timeout_or_default(timeouts, key);
    Some(obs.map_or(0.0, |o| change_in_entries(o, class, old_s, new_s)))
}

/// Entries one class holds at peak under lifetime `old_s` minus under
/// `new_s` (positive: freed), summed over namespaces. Each side uses the
/// rate sustained over its own lifetime, so a shorter lifetime never frees
/// more than the difference in entries the window shows alive at once.
pub fn change_in_entries(obs: &Observation, class: Class, old_s: u64, new_s: u64) -> f64 {
    obs.classes
        .iter()
        .filter(|r| r.class == class)
        .map(|r| {
            let old = littles_law(r.sustained_per_s(old_s as f64), old_s as f64);
            let new = littles_law(r.sustained_per_s(new_s as f64), new_s as f64);
            old - new
        })
        .sum()
}

/// The interval between two sensor snapshots taken with `KeyMode::DstPort`.
pub fn interval_between(prev: &Snapshot, cur: &Snapshot) -> Interval {
    let dt_s = cur.taken.saturating_duration_since(prev.taken).as_secs_f64();
    let before: HashMap<ChurnKey, u64> = prev.churn.iter().map(|(k, v)| (*k, v.inserts)).collect();
    let mut keys = Vec::new();
    for (key, value) in &cur.churn {
        let inserts = counter_delta(before.get(key).copied().unwrap_or(0), value.inserts);
        if inserts == 0 {
            continue;
        }
        let known = key.other == 0;
        keys.push(KeyCount {
            netns: key.netns,
            proto: known.then_some(key.tuple.proto),
            dport: known.then_some(key.tuple.dport),
            inserts: inserts as f64,
        });
    }
    // Only the entries the kernel could not key at all (both key maps full)
    // are unattributed. "all new entries minus keyed ones" would be wrong:
    // COUNTERS and CHURN are read one after the other while traffic runs, so
    // that difference swings between intervals, and clipping its negative
    // swings at zero would inflate the total.
    let unattributed = counter_delta(prev.counters.other_overflow, cur.counters.other_overflow) as f64;
    Interval { dt_s, keys, unattributed }
}

/// What a file of `ctguard top --json` documents holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TopFile {
    pub intervals: Vec<Interval>,
    pub table_peaks: BTreeMap<u32, u64>,
    pub documents: usize,
    /// The `key_mode` of the documents (`dst-port` gives protocols and ports).
    pub key_mode: Option<String>,
    /// Documents whose key list was cut to the top N (their remainder is
    /// spread in proportion, see [`attribute`]).
    pub truncated_documents: usize,
}

/// New entries a `top` document's keys do not account for (keys cut to the
/// top N, or the kernel's key maps full), booked so that read skew between
/// documents cancels out: a document's total and its keys are read a moment
/// apart, so one document may show more keyed entries than new ones and the
/// next fewer. The running balance carries the excess forward instead of
/// clipping it at zero, which would count the same entries twice.
#[derive(Default)]
struct KeyingGap {
    /// All new entries minus keyed ones, over every document so far.
    balance: f64,
    /// What has been booked as unattributed so far.
    booked: f64,
}

impl KeyingGap {
    fn unattributed(&mut self, all: f64, keyed: f64) -> f64 {
        self.balance += all - keyed;
        let now = (self.balance - self.booked).max(0.0);
        self.booked += now;
        now
    }
}

/// Parses `ctguard top --json` output: one `ctguard.top.v1` document per
/// line; blank lines are skipped, anything else is an error naming the line.
pub fn parse_top_json(text: &str) -> Result<TopFile, String> {
    let mut file = TopFile {
        intervals: vec![],
        table_peaks: BTreeMap::new(),
        documents: 0,
        key_mode: None,
        truncated_documents: 0,
    };
    let mut gap = KeyingGap::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n = i + 1;
        let doc: Value = serde_json::from_str(line).map_err(|e| format!("line {n}: not JSON ({e})"))?;
        match doc.get("schema").and_then(Value::as_str) {
            Some(schema) if crate::top::batch::carries_top_frame(schema) => {}
            other => {
                return Err(format!(
                    "line {n}: schema is {other:?}, expected \"ctguard.top.v1\" (or a capture's \"{}\")",
                    crate::capture::bundle::STATS_SCHEMA
                ));
            }
        }
        let dt_s = doc.get("interval_s").and_then(Value::as_f64).filter(|d| d.is_finite() && *d > 0.0);
        let dt_s = dt_s.ok_or_else(|| format!("line {n}: interval_s is missing or not a positive number"))?;
        let key_mode = doc.get("key_mode").and_then(Value::as_str).map(str::to_string);
        let dst_port = key_mode.as_deref() == Some("dst-port");
        if file.key_mode.is_none() {
            file.key_mode = key_mode;
        }
        let new_per_s = doc.pointer("/rates/new_per_s").and_then(Value::as_f64).unwrap_or(0.0).max(0.0);
        let mut keys = Vec::new();
        for key in doc.get("keys").and_then(Value::as_array).into_iter().flatten() {
            let rate = key.get("inserts_per_s").and_then(Value::as_f64).unwrap_or(0.0).max(0.0);
            let netns = key.get("netns").and_then(Value::as_u64).unwrap_or(0) as u32;
            let (proto, dport) = match key.get("key").and_then(Value::as_str) {
                Some(k) if dst_port => parse_dst_port_key(k).map_or((None, None), |(port, p)| (Some(p), Some(port))),
                _ => (None, None),
            };
            keys.push(KeyCount { netns, proto, dport, inserts: rate * dt_s });
        }
        if doc.get("keys_hidden").and_then(Value::as_u64).unwrap_or(0) > 0 {
            file.truncated_documents += 1;
        }
        let keyed: f64 = keys.iter().map(|k| k.inserts).sum();
        let unattributed = gap.unattributed(new_per_s * dt_s, keyed);
        for table in doc.get("tables").and_then(Value::as_array).into_iter().flatten() {
            let (Some(netns), Some(entries)) =
                (table.get("netns").and_then(Value::as_u64), table.get("entries").and_then(Value::as_u64))
            else {
                continue;
            };
            let peak = file.table_peaks.entry(netns as u32).or_default();
            *peak = (*peak).max(entries);
        }
        file.intervals.push(Interval { dt_s, keys, unattributed });
        file.documents += 1;
    }
    if file.documents == 0 {
        return Err("no documents: the file is empty".into());
    }
    Ok(file)
}

/// `53/udp` -> (53, 17); `proto-47` style protocols are numbers.
pub fn parse_dst_port_key(key: &str) -> Option<(u16, u8)> {
    let (port, proto) = key.split_once('/')?;
    let proto = proto.strip_prefix("proto-").unwrap_or(proto);
    Some((port.parse().ok()?, parse_proto(proto).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::Timeouts;

    fn timeouts() -> Timeouts {
        [
            ("tcp_timeout_time_wait", 120),
            ("tcp_timeout_established", 432_000),
            ("udp_timeout", 30),
            ("icmp_timeout", 30),
            ("generic_timeout", 600),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn key(netns: u32, proto: Option<u8>, dport: u16, inserts: f64) -> KeyCount {
        KeyCount { netns, proto, dport: proto.map(|_| dport), inserts }
    }

    /// A snapshot whose totals and keys were read at different moments:
    /// `all` new entries in COUNTERS, `udp53` keyed under 53/udp.
    fn skewed_snapshot(at: std::time::Instant, all: u64, udp53: u64, lost_keys: u64) -> Snapshot {
        use ctguard_ebpf::{ChurnValue, FlowTuple, counter};
        let mut counters = [0; counter::COUNT as usize];
        counters[counter::CT_ALLOCATED as usize] = all;
        counters[counter::OTHER_OVERFLOW as usize] = lost_keys;
        let key = ChurnKey {
            netns: 7,
            tuple: FlowTuple { proto: 17, dport: 53, ..Default::default() },
            ..Default::default()
        };
        Snapshot::new(at, counters, vec![(key, ChurnValue { inserts: udp53, ..Default::default() })], vec![])
    }

    #[test]
    fn read_skew_between_totals_and_keys_adds_nothing() {
        // The keys were read a moment after the totals while traffic ran:
        // the middle snapshot has 15 more keyed entries than counted ones.
        let t0 = std::time::Instant::now();
        let s = [
            skewed_snapshot(t0, 0, 0, 0),
            skewed_snapshot(t0 + std::time::Duration::from_secs(1), 500, 515, 0),
            skewed_snapshot(t0 + std::time::Duration::from_secs(2), 1000, 1000, 0),
        ];
        let intervals = [interval_between(&s[0], &s[1]), interval_between(&s[1], &s[2])];
        assert_eq!(intervals.iter().map(Interval::total).sum::<f64>(), 1000.0);
        assert!(intervals.iter().all(|i| i.unattributed == 0.0));
        // Entries the kernel could not key at all are the unattributed ones.
        let lost = skewed_snapshot(t0 + std::time::Duration::from_secs(3), 1010, 1000, 10);
        assert_eq!(interval_between(&s[2], &lost).unattributed, 10.0);
    }

    #[test]
    fn keying_gap_carries_read_skew_forward() {
        let mut gap = KeyingGap::default();
        // 15 keyed entries show up one document early: nothing is booked
        // twice, and a real gap (20 hidden keys) still is.
        assert_eq!(gap.unattributed(485.0, 500.0), 0.0);
        assert_eq!(gap.unattributed(515.0, 500.0), 0.0);
        assert_eq!(gap.unattributed(520.0, 500.0), 20.0);
        assert_eq!(gap.unattributed(500.0, 500.0), 0.0);
    }

    #[test]
    fn classes_and_lifetimes() {
        let t = timeouts();
        assert_eq!(Class::from_proto(6).lifetime_s(&t), 120);
        assert_eq!(Class::from_proto(17).lifetime_s(&t), 30);
        assert_eq!(Class::from_proto(136), Class::Udp);
        assert_eq!(Class::from_proto(1).lifetime_s(&t), 30);
        assert_eq!(Class::from_proto(47).lifetime_s(&t), 600);
        // icmpv6_timeout missing: the kernel default.
        assert_eq!(Class::Icmpv6.lifetime_s(&t), 30);
        assert_eq!(Class::Unknown.lifetime_s(&t), 120);
        assert_eq!(Class::Unknown.lifetime_s(&Timeouts::new()), 120, "all defaults");
    }

    #[test]
    fn littles_law_per_namespace() {
        // 1 s intervals; netns 7: 1000 udp/s then 3000 udp/s; 200 tcp/s.
        let intervals = vec![
            Interval {
                dt_s: 1.0,
                keys: vec![key(7, Some(17), 53, 1000.0), key(7, Some(6), 80, 200.0)],
                unattributed: 0.0,
            },
            Interval {
                dt_s: 1.0,
                keys: vec![key(7, Some(17), 53, 3000.0), key(7, Some(6), 80, 200.0)],
                unattributed: 0.0,
            },
        ];
        let obs = summarize("test".into(), &intervals, BTreeMap::new());
        assert_eq!(obs.window_s, 2.0);
        assert_eq!(obs.total_new, 4400.0);
        let d = demand(Some(&obs), &BTreeMap::from([(7, 500)]), &timeouts());
        assert_eq!(d.len(), 1);
        let ns = &d[0];
        // mean: 2000 udp/s x 30 s + 200 tcp/s x 120 s = 60 000 + 24 000.
        assert_eq!(ns.mean_entries, 84_000.0);
        // A 2 s window is shorter than every lifetime: the peak rate over a
        // lifetime is the window's mean, so peak = mean here.
        assert_eq!(ns.peak_entries, 84_000.0);
        let udp = ns.classes.iter().find(|c| c.class == Class::Udp).unwrap();
        assert_eq!(udp.busiest_interval_per_s, 3000.0);
        assert_eq!(ns.current_entries, 500);
        assert_eq!(ns.floor_entries(), 84_000.0);
        // Port shares over the window: 53/udp = 4000 / 4400.
        assert_eq!((obs.ports[0].port, obs.ports[0].proto), (53, 17));
        assert!((obs.ports[0].share_percent - 90.909).abs() < 0.01);
    }

    #[test]
    fn sustained_rate_is_the_busiest_lifetime_long_stretch() {
        // 1 s intervals: 0, 0, 10, 10, 0, 0 new entries.
        let s: Vec<(f64, f64)> = [0.0, 0.0, 10.0, 10.0, 0.0, 0.0].iter().map(|&n| (1.0, n)).collect();
        assert_eq!(sustained_rate(&s, 1.0), 10.0, "the busiest second");
        assert_eq!(sustained_rate(&s, 2.0), 10.0);
        assert!((sustained_rate(&s, 3.0) - 20.0 / 3.0).abs() < 1e-9);
        assert!((sustained_rate(&s, 4.0) - 5.0).abs() < 1e-9);
        // Longer than the window: the mean over the window.
        assert!((sustained_rate(&s, 30.0) - 20.0 / 6.0).abs() < 1e-9);
        assert_eq!(sustained_rate(&[], 30.0), 0.0);
        // A burst of 5437/s in one second of an 8 s window with mean 2561/s
        // and udp_timeout 30 s: the window mean, not the burst, x 30 s.
        let mut s: Vec<(f64, f64)> = vec![(1.0, 2000.0); 7];
        s.push((1.0, 6000.0));
        assert_eq!(sustained_rate(&s, 30.0), 20_000.0 / 8.0);
        // Entries alive at once never exceed the inserts of the stretch.
        for l in 1..=8 {
            assert!(sustained_rate(&s, l as f64) * l as f64 <= 20_000.0 + 1e-6);
        }
    }

    #[test]
    fn shorter_lifetimes_free_what_little_s_law_says() {
        // Steady 100 udp/s for 60 s: 30 s -> 10 s frees 100 x 20 = 2000.
        let intervals: Vec<Interval> = (0..60)
            .map(|_| Interval { dt_s: 1.0, keys: vec![key(1, Some(17), 53, 100.0)], unattributed: 0.0 })
            .collect();
        let obs = summarize("t".into(), &intervals, BTreeMap::new());
        let f = frees_by_timeout(Some(&obs), &timeouts(), "udp_timeout", 10).unwrap();
        assert!((f - 2000.0).abs() < 1e-6, "{f}");
        let d = demand(Some(&obs), &BTreeMap::new(), &timeouts());
        assert!((d[0].peak_entries - 3000.0).abs() < 1e-6);
        assert_eq!(d[0].classes[0].busiest_interval_per_s, 100.0);
    }

    #[test]
    fn current_count_is_the_floor() {
        let d = demand(None, &BTreeMap::from([(1, 40_000), (2, 10)]), &timeouts());
        assert_eq!(d[0].netns, 1, "busiest first");
        assert_eq!(d[0].floor_entries(), 40_000.0);
        assert_eq!(d[1].floor_entries(), 10.0);
    }

    #[test]
    fn unknown_protocols_and_namespaces_are_spread_in_proportion() {
        let i = Interval {
            dt_s: 1.0,
            keys: vec![key(1, Some(17), 53, 300.0), key(1, Some(6), 443, 100.0), key(1, None, 0, 40.0)],
            unattributed: 44.0,
        };
        let a = attribute(&i);
        // 40 unknown in netns 1: 30 to udp, 10 to tcp; then 44 unattributed:
        // 33 / 11 in the same 3:1 proportion.
        assert!((a[&(1, Class::Udp)] - 363.0).abs() < 1e-9);
        assert!((a[&(1, Class::Tcp)] - 121.0).abs() < 1e-9);
        assert_eq!(a.len(), 2);
        // Nothing known: stays unknown.
        let only = Interval { dt_s: 1.0, keys: vec![key(3, None, 0, 5.0)], unattributed: 2.0 };
        let a = attribute(&only);
        assert_eq!(a[&(3, Class::Unknown)], 5.0 + 2.0 * 5.0 / 5.0);
        let nothing = Interval { dt_s: 1.0, keys: vec![], unattributed: 9.0 };
        assert_eq!(attribute(&nothing)[&(UNATTRIBUTED_NETNS, Class::Unknown)], 9.0);
    }

    #[test]
    fn frees_follow_littles_law() {
        // 455.6 TCP closes/s at peak: time_wait 120 -> 30 frees ~41 000.
        let intervals = vec![Interval { dt_s: 1.0, keys: vec![key(1, Some(6), 80, 455.6)], unattributed: 0.0 }];
        let obs = summarize("t".into(), &intervals, BTreeMap::new());
        let f = frees_by_timeout(Some(&obs), &timeouts(), "tcp_timeout_time_wait", 30).unwrap();
        assert_eq!(f.round(), 41_004.0);
        assert_eq!(frees_by_timeout(Some(&obs), &timeouts(), "udp_timeout", 10), Some(0.0));
        assert_eq!(frees_by_timeout(Some(&obs), &timeouts(), "tcp_timeout_established", 3600), None);
        assert_eq!(frees_by_timeout(None, &timeouts(), "udp_timeout", 10), Some(0.0));
    }

    #[test]
    fn top_json_peak_and_mean() {
        let doc = |new: f64, keys: &str, entries: u64| {
            format!(
                r#"{{"schema":"ctguard.top.v1","time_unix_ms":1,"key_mode":"dst-port","interval_s":2.0,"rates":{{"new_per_s":{new},"removed_per_s":0.0,"drops_per_s":{{}},"early_drop_per_s":0.0}},"tables":[{{"netns":9,"label":"x","entries":{entries},"max":262144,"buckets":262144,"fill_percent":0.0,"trend":"steady","growth_per_s":0.0,"time_to_full_s":null}}],"keys":[{keys}],"keys_hidden":0,"events_lost":0,"key_overflow":0}}"#
            )
        };
        let k = |port: &str, rate: f64| {
            format!(
                r#"{{"netns":9,"key":"{port}","inserts_per_s":{rate},"share_percent":0,"drops_per_s":0,"removals_per_s":0,"total_inserts":0}}"#
            )
        };
        let text = [
            doc(100.0, &k("53/udp", 100.0), 1000),
            String::new(),
            doc(500.0, &[k("53/udp", 300.0), k("(other keys)", 100.0)].join(","), 4000),
        ]
        .join("\n");
        let file = parse_top_json(&text).unwrap();
        assert_eq!(file.documents, 2);
        assert_eq!(file.table_peaks[&9], 4000);
        assert_eq!(file.intervals[1].unattributed, 200.0, "(500 - 400)/s x 2 s");
        let obs = summarize("top".into(), &file.intervals, file.table_peaks.clone());
        let udp = obs.classes.iter().find(|c| c.class == Class::Udp).unwrap();
        // Everything is udp once spread: 100/s then 500/s; mean 300/s.
        assert!((udp.peak_per_s - 500.0).abs() < 1e-9);
        assert!((udp.mean_per_s - 300.0).abs() < 1e-9);
        // 4 s of documents, shorter than udp_timeout: the peak over a
        // lifetime is the mean, 300/s x 30 s.
        let d = demand(Some(&obs), &BTreeMap::new(), &timeouts());
        assert_eq!(d[0].peak_entries.round(), 9_000.0);
        assert_eq!(d[0].mean_entries.round(), 9_000.0);
        // With a 1 s udp_timeout the busiest document counts: 500/s x 1 s.
        let short: Timeouts = [("udp_timeout".to_string(), 1)].into_iter().collect();
        assert_eq!(demand(Some(&obs), &BTreeMap::new(), &short)[0].peak_entries.round(), 500.0);
        assert_eq!(d[0].current_entries, 4000);
    }

    #[test]
    fn top_json_errors_name_the_line() {
        assert!(parse_top_json("").unwrap_err().contains("empty"));
        assert!(parse_top_json("\nnope\n").unwrap_err().contains("line 2"));
        assert!(parse_top_json(r#"{"schema":"other"}"#).unwrap_err().contains("ctguard.top.v1"));
        assert!(parse_top_json(r#"{"schema":"ctguard.top.v1","interval_s":0}"#).unwrap_err().contains("interval_s"));
    }

    #[test]
    fn dst_port_keys() {
        assert_eq!(parse_dst_port_key("53/udp"), Some((53, 17)));
        assert_eq!(parse_dst_port_key("443/tcp"), Some((443, 6)));
        assert_eq!(parse_dst_port_key("0/proto-47"), Some((0, 47)));
        assert_eq!(parse_dst_port_key("(other keys)"), None);
    }
}
