//! From facts to a plan: the recommended max, buckets and timeouts, each with
//! its reason, the overrides validated the same way, and what the result
//! costs. Pure: [`plan`] reads nothing and writes nothing.
//!
//! The rules, in order:
//! * **need** = (peak demand of the busiest namespace, never below the
//!   largest count any table holds now) x headroom. `nf_conntrack_max` is one
//!   global limit that each namespace's own count is compared against, so
//!   the busiest namespace decides.
//! * **max**: the need rounded up ([`formulas::round_max`]), at least the
//!   kernel's own default for this host, at most what fits in 1/4 of RAM
//!   ([`formulas::max_within_budget`]), never below the current count. A
//!   current max that is already at least that, and fits, is kept: a larger
//!   max costs nothing until entries fill it.
//! * **buckets**: the current value is kept while a full table averages at
//!   most 2 entries per bucket (and still fits the memory budget); otherwise
//!   the next power of two >= max (one entry per bucket, the kernel's own
//!   default ratio).
//! * **timeouts**: each suggestion says what it would free at peak churn
//!   (Little's law). One enters the plan only when the table is under
//!   pressure (the need exceeds the kernel default) and it frees at least
//!   10 % of the demand; the max is still sized for the current timeouts,
//!   so shorter ones add headroom on top (and the recommendation stays
//!   monotone in demand).
//! * **bypass**: when one destination port makes more than half of all new
//!   entries, NOTRACK for that port (`ctguard bypass add --port P`) removes
//!   its churn at the source and is the better fix.
use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    demand::{self, Class, NsDemand, Observation},
    formulas::{self, Classic, KernelDefault},
};
use crate::conntrack::Timeouts;

/// A timeout change is proposed only when it frees at least this share of
/// the machine-wide peak demand.
pub const MIN_TIMEOUT_SAVING_FRACTION: f64 = 0.10;
/// NOTRACK is suggested when one destination port makes more than this
/// share of new entries...
pub const BYPASS_SHARE_PERCENT: f64 = 50.0;
/// ...and the window saw at least this many new entries.
pub const BYPASS_MIN_NEW: f64 = 100.0;
/// Buckets are kept while a full table averages at most this many entries per bucket.
pub const KEEP_BUCKETS_LOAD_FACTOR: f64 = 2.0;
/// Above this average chain length at max, lookups get slow: a warning.
pub const WARN_LOAD_FACTOR: f64 = 8.0;

/// Suggested timeouts: (sysctl key, seconds, may enter the plan on its own, why).
pub const TIMEOUT_SUGGESTIONS: [(&str, u64, bool, &str); 7] = [
    (
        "tcp_timeout_established",
        86_400,
        false,
        "only reaps connections that went silent without FIN/RST (5 days by default; kube-proxy uses 24 h); \
         what it frees cannot be told from churn, so it is never proposed on its own",
    ),
    (
        "tcp_timeout_time_wait",
        30,
        true,
        "every cleanly closed connection waits here; a SYN reusing the tuple reopens the entry anyway",
    ),
    ("tcp_timeout_fin_wait", 60, false, "half-closed connections; not estimable from churn"),
    ("tcp_timeout_close_wait", 60, false, "connections the local side has not closed yet; not estimable from churn"),
    (
        "udp_timeout",
        10,
        true,
        "unreplied flows and request/response exchanges (DNS) are done within a few seconds; replied-to streams keep udp_timeout_stream",
    ),
    ("icmp_timeout", 10, true, "echo requests are answered within milliseconds"),
    ("generic_timeout", 120, true, "protocols conntrack has no tracker for"),
];

/// The host facts the plan depends on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Host {
    pub ram_bytes: u64,
    pub page_size: u64,
    /// Word size of the kernel (taken as this build's pointer width).
    pub arch_bits: u32,
    pub kernel_release: String,
    pub object_size: u64,
    /// `sysfs`, `slabinfo`, or `assumed` (see [`formulas::FALLBACK_OBJECT_SIZE`]).
    pub object_size_source: String,
    /// `nf_conntrack.hashsize=` from the kernel command line or modprobe.d.
    pub hashsize_option: Option<u64>,
    pub hashsize_option_source: Option<String>,
}

/// The settings in force.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Current {
    pub max: u64,
    pub buckets: u64,
    pub timeouts: Timeouts,
    /// Entries per namespace inode (each table's own count).
    pub entries: BTreeMap<u32, u64>,
}

impl Current {
    /// The largest count any namespace holds, and which one.
    pub fn busiest(&self) -> (Option<u32>, u64) {
        self.entries
            .iter()
            .max_by_key(|(ns, n)| (**n, std::cmp::Reverse(**ns)))
            .map_or((None, 0), |(ns, n)| (Some(*ns), *n))
    }
}

/// Values the user asked for instead of the recommendation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub max: Option<u64>,
    pub buckets: Option<u64>,
    /// (name as typed, seconds), in order.
    pub timeouts: Vec<(String, u64)>,
}

pub struct Input<'a> {
    pub host: &'a Host,
    pub current: &'a Current,
    pub observation: Option<&'a Observation>,
    pub headroom: f64,
    pub overrides: &'a Overrides,
}

/// A setting the plan may change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Knob {
    Max,
    Buckets,
    /// A timeout, by sysctl key without the `nf_conntrack_` prefix.
    Timeout(String),
}

impl Knob {
    /// `nf_conntrack_max`, `nf_conntrack_buckets`, `nf_conntrack_udp_timeout`.
    pub fn file_name(&self) -> String {
        match self {
            Knob::Max => "nf_conntrack_max".into(),
            Knob::Buckets => "nf_conntrack_buckets".into(),
            Knob::Timeout(key) => format!("nf_conntrack_{key}"),
        }
    }

    /// `net.netfilter.nf_conntrack_max`, as sysctl(8) names it.
    pub fn sysctl(&self) -> String {
        format!("net.netfilter.{}", self.file_name())
    }
}

/// Where a proposed value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Recommended,
    Override,
}

/// One knob: current -> proposed, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Change {
    pub knob: Knob,
    pub sysctl: String,
    pub current: u64,
    pub proposed: u64,
    pub origin: Origin,
    pub reason: String,
}

impl Change {
    pub fn changes(&self) -> bool {
        self.current != self.proposed
    }
}

/// A value that must not be written, with the reason.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Refusal {
    pub knob: String,
    pub value: String,
    pub reason: String,
    pub hint: String,
}

/// One timeout suggestion.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeoutAdvice {
    pub key: String,
    pub current_s: u64,
    pub suggested_s: u64,
    /// Entries freed machine-wide at peak churn; `None` when not estimable.
    pub frees_entries: Option<f64>,
    /// In the plan (recommended, or overridden by the user).
    pub proposed: bool,
    pub reason: String,
}

/// How the max was sized.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sizing {
    /// The namespace whose demand decides (the busiest).
    pub busiest_netns: Option<u32>,
    pub peak_entries: f64,
    pub mean_entries: f64,
    /// Largest count any table holds now (or held during the window).
    pub current_entries: u64,
    pub headroom: f64,
    /// max(peak, current) x headroom.
    pub need: u64,
    /// What 1/4 of RAM can hold (entries plus their buckets).
    pub cap: u64,
    /// The need fits under the cap.
    pub fits: bool,
    /// The table needs more than the kernel default: timeouts may be proposed.
    pub pressure: bool,
    /// The recommended max before an override (what the rules say).
    pub recommended_max: u64,
    pub recommended_buckets: u64,
}

/// Worst-case kernel memory (every entry in use), current and proposed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Memory {
    pub object_size: u64,
    pub ram_bytes: u64,
    pub budget_bytes: u64,
    pub current_bytes: u64,
    pub proposed_bytes: u64,
    pub proposed_percent_of_ram: f64,
}

/// NOTRACK advice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bypass {
    pub proto: u8,
    pub port: u16,
    pub share_percent: f64,
    pub command: String,
    pub reason: String,
}

/// The whole recommendation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub classic: Classic,
    pub kernel_default: KernelDefault,
    pub demand: Vec<NsDemand>,
    pub sizing: Sizing,
    pub timeouts: Vec<TimeoutAdvice>,
    /// max, buckets, then proposed timeouts (unchanged ones included, so
    /// the diff shows every knob the plan is about).
    pub changes: Vec<Change>,
    pub memory: Memory,
    pub bypass: Option<Bypass>,
    pub warnings: Vec<String>,
    /// Non-empty means: nothing may be written.
    pub refusals: Vec<Refusal>,
}

impl Plan {
    pub fn change(&self, knob: &Knob) -> Option<&Change> {
        self.changes.iter().find(|c| &c.knob == knob)
    }

    /// The knobs whose value would actually change.
    pub fn effective_changes(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.changes())
    }
}

/// Resolves a timeout name as typed: the sysctl key (`udp_timeout`), the
/// file name (`nf_conntrack_udp_timeout`), the sysctl (`net.netfilter.…`),
/// or a unique short form (`time_wait`, `udp`).
pub fn resolve_timeout_name(name: &str, known: &Timeouts) -> Result<String, String> {
    let name = name.trim();
    let bare = name.strip_prefix("net.netfilter.").unwrap_or(name);
    let bare = bare.strip_prefix("nf_conntrack_").unwrap_or(bare);
    if known.contains_key(bare) {
        return Ok(bare.to_string());
    }
    let candidates: Vec<&String> = known
        .keys()
        .filter(|k| !bare.is_empty() && (k.ends_with(&format!("_timeout_{bare}")) || **k == format!("{bare}_timeout")))
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!("`{name}` is not a conntrack timeout on this kernel")),
        many => {
            Err(format!("`{name}` is ambiguous: {}", many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")))
        }
    }
}

/// Builds the plan. Never fails: problems with values are [`Refusal`]s.
pub fn plan(input: &Input<'_>) -> Plan {
    let Input { host, current, observation, headroom, overrides } = *input;
    let classic = formulas::classic(host.ram_bytes, host.arch_bits);
    let kernel_default = formulas::kernel_default(
        host.ram_bytes,
        host.page_size,
        host.arch_bits,
        host.hashsize_option,
        formulas::Rules::for_release(&host.kernel_release),
    );
    let demand = demand::demand(observation, &current.entries, &current.timeouts);
    let (busiest_now, count_now) = current.busiest();
    let busiest = demand.first();
    let current_entries = demand.iter().map(|d| d.current_entries).max().unwrap_or(0).max(count_now);
    let floor = busiest.map_or(0.0, NsDemand::floor_entries).max(current_entries as f64);
    let need = (floor * headroom).ceil() as u64;
    let cap = formulas::max_within_budget(host.ram_bytes, host.object_size);
    let budget = formulas::memory_budget(host.ram_bytes);
    let pressure = need > kernel_default.max;
    let mut warnings = Vec::new();
    let mut refusals = Vec::new();

    // --- max ---------------------------------------------------------------
    let base = formulas::round_max(need).max(kernel_default.max);
    let target = base.min(cap).max(current_entries);
    // Keeping the current max is fine when a full table of it, with the
    // buckets the rules below would pair with it, fits in the budget.
    let paired_buckets = if formulas::load_factor(current.max, current.buckets) <= KEEP_BUCKETS_LOAD_FACTOR {
        current.buckets
    } else {
        formulas::buckets_for(current.max)
    };
    let current_fits = formulas::memory_cost(current.max, paired_buckets, host.object_size) <= budget;
    let (rec_max, max_reason) = if current.max != 0 && current.max >= target && current_fits {
        (current.max, keep_max_reason(current.max, need, &kernel_default))
    } else {
        (target, raise_max_reason(current.max, target, need, floor, headroom, base, cap, &kernel_default))
    };
    if need > cap {
        warnings.push(format!(
            "the need ({need} entries) exceeds what 1/4 of RAM can track ({cap} entries of {} B plus their buckets): \
             ctguard will not recommend more; shorten the timeouts below and/or exempt the busiest port from tracking",
            host.object_size
        ));
    }
    let max_change = match overrides.max {
        Some(v) => Change {
            knob: Knob::Max,
            sysctl: Knob::Max.sysctl(),
            current: current.max,
            proposed: v,
            origin: Origin::Override,
            reason: format!("--max {v} (the rules say {rec_max})"),
        },
        None => Change {
            knob: Knob::Max,
            sysctl: Knob::Max.sysctl(),
            current: current.max,
            proposed: rec_max,
            origin: Origin::Recommended,
            reason: max_reason,
        },
    };

    // --- buckets -----------------------------------------------------------
    let rec_buckets = if current.buckets > 0
        && formulas::load_factor(max_change.proposed, current.buckets) <= KEEP_BUCKETS_LOAD_FACTOR
        && formulas::memory_cost(max_change.proposed, current.buckets, host.object_size) <= budget
    {
        current.buckets
    } else {
        formulas::buckets_for(max_change.proposed)
    };
    let buckets_reason = if rec_buckets == current.buckets {
        format!(
            "keeps {:.2} entries per bucket when the table is full (<= {KEEP_BUCKETS_LOAD_FACTOR})",
            formulas::load_factor(max_change.proposed, rec_buckets)
        )
    } else {
        format!(
            "next power of two >= max {}: at most 1 entry per bucket when full (the kernel's own default ratio)",
            max_change.proposed
        )
    };
    let buckets_change = match overrides.buckets {
        Some(v) => Change {
            knob: Knob::Buckets,
            sysctl: Knob::Buckets.sysctl(),
            current: current.buckets,
            proposed: v,
            origin: Origin::Override,
            reason: format!("--buckets {v} (the rules say {rec_buckets})"),
        },
        None => Change {
            knob: Knob::Buckets,
            sysctl: Knob::Buckets.sysctl(),
            current: current.buckets,
            proposed: rec_buckets,
            origin: Origin::Recommended,
            reason: buckets_reason,
        },
    };

    // --- validation of max and buckets -------------------------------------
    let fullest = demand.iter().filter(|d| d.current_entries > 0).max_by_key(|d| d.current_entries).map(|d| d.netns);
    validate_max(&max_change, current_entries, fullest.or(busiest_now), &mut refusals);
    validate_buckets(&buckets_change, host.page_size, &mut refusals, &mut warnings);
    let proposed_bytes = formulas::memory_cost(max_change.proposed, buckets_change.proposed, host.object_size);
    let overridden = overrides.max.is_some() || overrides.buckets.is_some();
    if overridden && proposed_bytes > budget {
        refusals.push(Refusal {
            knob: "memory".into(),
            value: format!("max {} / buckets {}", max_change.proposed, buckets_change.proposed),
            reason: format!(
                "a full table would take {} of kernel memory, more than 1/4 of RAM ({})",
                human_bytes(proposed_bytes),
                human_bytes(budget)
            ),
            hint: format!("stay at or below max {cap} on this host, or reduce the churn (shorter timeouts, `ctguard bypass add --port P`)"),
        });
    }
    if max_change.origin == Origin::Override && max_change.proposed < need {
        warnings.push(format!(
            "--max {} is below the need of {need} entries (peak demand x headroom {headroom}): expect table-full drops at peak",
            max_change.proposed
        ));
    }
    let lf = formulas::load_factor(max_change.proposed, buckets_change.proposed);
    if lf > WARN_LOAD_FACTOR && buckets_change.proposed > 0 {
        warnings.push(format!(
            "a full table would average {lf:.1} entries per bucket (> {WARN_LOAD_FACTOR}): lookups walk long chains"
        ));
    }
    if max_change.proposed > classic.max && classic.max > 0 {
        warnings.push(format!(
            "max {} is above the classic runbook ceiling {} (RAM / 16384 / {}); that formula assumed 16 KiB of RAM per entry, \
             this kernel's entries take {} B, and the memory check above is what bounds the recommendation",
            max_change.proposed,
            classic.max,
            host.arch_bits / 32,
            host.object_size
        ));
    }

    // --- timeouts ----------------------------------------------------------
    let total_peak: f64 = demand.iter().map(|d| d.peak_entries).sum();
    let mut timeouts = Vec::new();
    let mut timeout_changes = Vec::new();
    for (key, suggested, auto, why) in TIMEOUT_SUGGESTIONS {
        let Some(&cur) = current.timeouts.get(key) else { continue };
        let frees = demand::frees_by_timeout(observation, &current.timeouts, key, suggested);
        let significant = frees.is_some_and(|f| f >= 1.0 && f >= MIN_TIMEOUT_SAVING_FRACTION * total_peak);
        let proposed = auto && cur > suggested && pressure && significant;
        let reason = match frees {
            Some(f) if cur > suggested => format!("{why}; frees ≈ {} entries at peak churn", round_entries(f)),
            _ => why.to_string(),
        };
        if proposed {
            timeout_changes.push(Change {
                knob: Knob::Timeout(key.into()),
                sysctl: Knob::Timeout(key.into()).sysctl(),
                current: cur,
                proposed: suggested,
                origin: Origin::Recommended,
                reason: reason.clone(),
            });
        }
        timeouts.push(TimeoutAdvice {
            key: key.into(),
            current_s: cur,
            suggested_s: suggested,
            frees_entries: frees,
            proposed,
            reason,
        });
    }
    for (name, secs) in &overrides.timeouts {
        let key = match resolve_timeout_name(name, &current.timeouts) {
            Ok(key) => key,
            Err(reason) => {
                refusals.push(Refusal {
                    knob: format!("--timeout {name}"),
                    value: secs.to_string(),
                    reason,
                    hint: format!("use one of: {}", current.timeouts.keys().cloned().collect::<Vec<_>>().join(", ")),
                });
                continue;
            }
        };
        validate_timeout(&key, *secs, &mut refusals);
        let cur = current.timeouts[&key];
        let frees = demand::frees_by_timeout(observation, &current.timeouts, &key, *secs);
        let reason = match frees {
            Some(f) if cur > *secs => {
                format!("--timeout {name}={secs}; frees ≈ {} entries at peak churn", round_entries(f))
            }
            Some(_) if cur < *secs => format!(
                "--timeout {name}={secs}; adds ≈ {} entries at peak churn",
                round_entries(frees_added(observation, &key, cur, *secs))
            ),
            _ => format!("--timeout {name}={secs}"),
        };
        let change = Change {
            knob: Knob::Timeout(key.clone()),
            sysctl: Knob::Timeout(key.clone()).sysctl(),
            current: cur,
            proposed: *secs,
            origin: Origin::Override,
            reason: reason.clone(),
        };
        timeout_changes.retain(|c| c.knob != change.knob);
        timeout_changes.push(change);
        match timeouts.iter_mut().find(|t| t.key == key) {
            Some(t) => t.proposed = true,
            None => timeouts.push(TimeoutAdvice {
                key: key.clone(),
                current_s: cur,
                suggested_s: *secs,
                frees_entries: frees,
                proposed: true,
                reason,
            }),
        }
    }

    // --- bypass ------------------------------------------------------------
    let bypass = observation.and_then(|o| {
        let top = o.ports.first()?;
        (top.share_percent > BYPASS_SHARE_PERCENT && o.total_new >= BYPASS_MIN_NEW).then(|| Bypass {
            proto: top.proto,
            port: top.port,
            share_percent: top.share_percent,
            command: bypass_command(top),
            reason: format!(
                "{}/{} makes {:.0} % of all new entries: exempting it from tracking (NOTRACK) removes that churn at the source, \
                 which no table size or timeout can; untracked packets skip NAT and no longer match `ct state` rules{}",
                top.port,
                crate::sensors::event::proto_name(top.proto),
                top.share_percent,
                if need > cap { " — and the need does not fit in memory, so this is the fix" } else { "" }
            ),
        })
    });

    let sizing = Sizing {
        busiest_netns: busiest.map(|d| d.netns).or(busiest_now),
        peak_entries: busiest.map_or(0.0, |d| d.peak_entries),
        mean_entries: busiest.map_or(0.0, |d| d.mean_entries),
        current_entries,
        headroom,
        need,
        cap,
        fits: need <= cap,
        pressure,
        recommended_max: rec_max,
        recommended_buckets: rec_buckets,
    };
    let memory = Memory {
        object_size: host.object_size,
        ram_bytes: host.ram_bytes,
        budget_bytes: budget,
        current_bytes: formulas::memory_cost(current.max, current.buckets, host.object_size),
        proposed_bytes,
        proposed_percent_of_ram: if host.ram_bytes == 0 {
            0.0
        } else {
            proposed_bytes as f64 * 100.0 / host.ram_bytes as f64
        },
    };
    let mut changes = vec![max_change, buckets_change];
    changes.extend(timeout_changes);
    Plan { classic, kernel_default, demand, sizing, timeouts, changes, memory, bypass, warnings, refusals }
}

/// Entries added by lengthening a timeout (the mirror of frees).
fn frees_added(obs: Option<&Observation>, key: &str, old_s: u64, new_s: u64) -> f64 {
    let class = [Class::Tcp, Class::Udp, Class::Icmp, Class::Icmpv6, Class::Other]
        .into_iter()
        .find(|c| c.timeout_key() == Some(key));
    match (obs, class) {
        (Some(o), Some(c)) => -demand::change_in_entries(o, c, old_s, new_s),
        _ => 0.0,
    }
}

fn keep_max_reason(current: u64, need: u64, kd: &KernelDefault) -> String {
    if need <= kd.max {
        format!(
            "keep {current}: the need ({need}) is within the kernel default for this host ({}) and the current value",
            kd.max
        )
    } else {
        format!("keep {current}: already above the need of {need} entries")
    }
}

#[allow(clippy::too_many_arguments)]
fn raise_max_reason(
    current: u64,
    target: u64,
    need: u64,
    floor: f64,
    headroom: f64,
    base: u64,
    cap: u64,
    kd: &KernelDefault,
) -> String {
    let why = if base > cap {
        format!("the need {need} is capped at {cap}, the most 1/4 of RAM can hold")
    } else if need <= kd.max {
        format!("the kernel default for this host ({}) already covers the need ({need})", kd.max)
    } else {
        format!("need = {} entries x headroom {headroom} = {need}, rounded up", round_entries(floor))
    };
    if current == 0 {
        format!("{target}: {why} (0 means no limit at all)")
    } else if target < current {
        format!("{target}: a full table at {current} would not fit in 1/4 of RAM; {why}")
    } else {
        format!("{target}: {why}")
    }
}

/// A refusal of change `c`'s proposed value.
fn refusal(c: &Change, reason: String, hint: &str) -> Refusal {
    Refusal { knob: c.sysctl.clone(), value: c.proposed.to_string(), reason, hint: hint.into() }
}

fn validate_max(c: &Change, current_entries: u64, busiest: Option<u32>, refusals: &mut Vec<Refusal>) {
    let v = c.proposed;
    let refuse = |reason: String, hint: &str| refusal(c, reason, hint);
    if v == 0 {
        refusals.push(refuse(
            "0 removes the limit: the table could grow until kernel memory runs out".into(),
            "give a positive value; `ctguard recommend` shows what the host needs",
        ));
    } else if v > formulas::KERNEL_MAX_LIMIT {
        refusals.push(refuse(
            format!("the kernel accepts at most {} (INT_MAX)", formulas::KERNEL_MAX_LIMIT),
            "give a smaller value",
        ));
    } else if v < current_entries {
        refusals.push(refuse(
            format!(
                "below the {current_entries} entries {} holds (now, or during the observed window): the table would be over \
                 full at once and every new flow dropped until entries expire",
                busiest.map_or("a namespace".to_string(), |ns| format!("netns {ns}"))
            ),
            "give at least the current count (see `ctguard status --netns all`)",
        ));
    }
}

fn validate_buckets(c: &Change, page_size: u64, refusals: &mut Vec<Refusal>, warnings: &mut Vec<String>) {
    let v = c.proposed;
    let refuse = |reason: String, hint: &str| refusal(c, reason, hint);
    if v == 0 {
        refusals.push(refuse(
            "the kernel refuses a hash table of 0 buckets (EINVAL)".into(),
            "give a positive power of two, e.g. 262144",
        ));
    } else if v > formulas::KERNEL_BUCKETS_LIMIT {
        refusals.push(refuse(
            format!("the kernel allocates at most {} buckets (INT_MAX / 8 bytes)", formulas::KERNEL_BUCKETS_LIMIT),
            "give a smaller power of two",
        ));
    } else if c.changes() {
        let rounded = formulas::kernel_rounds_buckets(v, page_size);
        if rounded != v {
            warnings.push(format!("the kernel rounds buckets {v} up to {rounded} (a whole page of bucket heads)"));
        }
    }
}

fn validate_timeout(key: &str, secs: u64, refusals: &mut Vec<Refusal>) {
    let refuse = |reason: String, hint: &str| Refusal {
        knob: format!("net.netfilter.nf_conntrack_{key}"),
        value: secs.to_string(),
        reason,
        hint: hint.into(),
    };
    if secs == 0 {
        refusals.push(refuse(
            "a timeout of 0 s expires entries at once: flows would be re-created on every packet".into(),
            "give at least 1 second",
        ));
    } else if secs > formulas::KERNEL_TIMEOUT_LIMIT_S {
        refusals.push(refuse(
            format!("the kernel refuses more than {} s (INT_MAX jiffies at HZ=1000)", formulas::KERNEL_TIMEOUT_LIMIT_S),
            "give a smaller value",
        ));
    }
}

/// An entry count for humans: `41 000`, `1.2 M`.
pub fn round_entries(n: f64) -> String {
    let n = n.max(0.0);
    if n >= 10_000_000.0 {
        format!("{:.1} M", n / 1e6)
    } else if n >= 10_000.0 {
        group_thousands((n / 1000.0).round() as u64 * 1000)
    } else {
        group_thousands(n.round() as u64)
    }
}

/// 1234567 -> `1 234 567`.
pub fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// Bytes for humans, binary units.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// The `ctguard bypass add` line for a port: its protocol alone (a bypass
/// defaults to tcp and udp, and untracking the other protocol was not asked
/// for), in the namespace that made the churn (bypass rules are per
/// namespace; 0 means the namespace is unknown).
fn bypass_command(top: &super::demand::PortShare) -> String {
    let mut command =
        format!("ctguard bypass add --proto {} --port {}", crate::sensors::event::proto_name(top.proto), top.port);
    if top.netns != super::demand::UNATTRIBUTED_NETNS {
        command.push_str(&format!(" --netns {}", top.netns));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recommend::demand::{Interval, KeyCount, summarize};

    const GIB: u64 = 1 << 30;

    fn timeouts() -> Timeouts {
        [
            ("tcp_timeout_established", 432_000),
            ("tcp_timeout_time_wait", 120),
            ("tcp_timeout_fin_wait", 120),
            ("tcp_timeout_close_wait", 60),
            ("udp_timeout", 30),
            ("udp_timeout_stream", 120),
            ("icmp_timeout", 30),
            ("generic_timeout", 600),
            ("sctp_timeout_established", 210),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn host(ram: u64) -> Host {
        Host {
            ram_bytes: ram,
            page_size: 4096,
            arch_bits: 64,
            kernel_release: "6.18.0".into(),
            object_size: 248,
            object_size_source: "sysfs".into(),
            hashsize_option: None,
            hashsize_option_source: None,
        }
    }

    fn current(entries: u64) -> Current {
        Current { max: 262_144, buckets: 262_144, timeouts: timeouts(), entries: BTreeMap::from([(1, entries)]) }
    }

    fn observe(udp_per_s: f64, tcp_per_s: f64) -> Observation {
        let keys = vec![
            KeyCount { netns: 1, proto: Some(17), dport: Some(53), inserts: udp_per_s },
            KeyCount { netns: 1, proto: Some(6), dport: Some(443), inserts: tcp_per_s },
        ];
        summarize("test".into(), &[Interval { dt_s: 1.0, keys, unattributed: 0.0 }], BTreeMap::new())
    }

    fn run(h: &Host, c: &Current, o: Option<&Observation>, ov: &Overrides) -> Plan {
        plan(&Input { host: h, current: c, observation: o, headroom: 2.0, overrides: ov })
    }

    #[test]
    fn idle_host_keeps_the_kernel_default() {
        let p = run(&host(24 * GIB), &current(0), None, &Overrides::default());
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        assert_eq!(p.change(&Knob::Max).unwrap().proposed, 262_144);
        assert_eq!(p.change(&Knob::Buckets).unwrap().proposed, 262_144);
        assert_eq!(p.effective_changes().count(), 0);
        assert_eq!(p.changes.len(), 2, "no timeout proposed without churn");
        assert!(p.bypass.is_none());
        assert_eq!(p.memory.proposed_bytes, 262_144 * 256);
        assert_eq!(p.classic.max, 786_432);
    }

    #[test]
    fn churn_raises_max_and_buckets_and_proposes_timeouts() {
        // 5000 udp/s x 30 s + 2000 tcp/s x 120 s = 390 000 entries; x2 = 780 000.
        let obs = observe(5000.0, 2000.0);
        let p = run(&host(24 * GIB), &current(10_000), Some(&obs), &Overrides::default());
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        assert_eq!(p.sizing.need, 780_000);
        let max = p.change(&Knob::Max).unwrap();
        assert_eq!(max.proposed, 786_432, "780 000 rounded up to a multiple of 65536");
        assert_eq!(p.change(&Knob::Buckets).unwrap().proposed, 1_048_576);
        assert!(p.sizing.pressure);
        // time_wait 120 -> 30 frees 2000 x 90 = 180 000; udp 30 -> 10 frees 100 000.
        let tw = p.timeouts.iter().find(|t| t.key == "tcp_timeout_time_wait").unwrap();
        assert_eq!(tw.frees_entries, Some(180_000.0));
        assert!(tw.proposed && tw.reason.contains("180 000"), "{tw:?}");
        assert_eq!(p.change(&Knob::Timeout("udp_timeout".into())).unwrap().proposed, 10);
        let est = p.timeouts.iter().find(|t| t.key == "tcp_timeout_established").unwrap();
        assert!(!est.proposed && est.frees_entries.is_none());
        // 5000/7000 = 71 % on 53/udp: bypass.
        let b = p.bypass.as_ref().unwrap();
        assert_eq!((b.port, b.proto), (53, 17));
        assert_eq!(
            b.command, "ctguard bypass add --proto udp --port 53 --netns 1",
            "the port's protocol and namespace only"
        );
    }

    #[test]
    fn the_recommendation_never_exceeds_a_quarter_of_ram() {
        // 2 GiB host, 100 000 udp/s x 30 s = 3 M entries x 2: far beyond.
        let obs = observe(100_000.0, 0.0);
        let h = host(2 * GIB);
        let c = Current { max: 65_536, buckets: 65_536, ..current(0) };
        let p = run(&h, &c, Some(&obs), &Overrides::default());
        assert!(!p.sizing.fits);
        let max = p.change(&Knob::Max).unwrap().proposed;
        assert_eq!(max, formulas::max_within_budget(2 * GIB, 248));
        assert!(p.memory.proposed_bytes <= p.memory.budget_bytes);
        assert!(p.warnings.iter().any(|w| w.contains("1/4 of RAM")), "{:?}", p.warnings);
        assert!(p.bypass.as_ref().unwrap().reason.contains("this is the fix"));
    }

    #[test]
    fn overrides_go_through_the_same_validation() {
        let h = host(24 * GIB);
        let c = current(5000);
        let refused = |ov: Overrides| run(&h, &c, None, &ov).refusals;
        let r = refused(Overrides { max: Some(4999), ..Default::default() });
        assert_eq!(r.len(), 1);
        assert!(r[0].reason.contains("below the 5000 entries"), "{r:?}");
        assert!(refused(Overrides { max: Some(0), ..Default::default() })[0].reason.contains("removes the limit"));
        assert!(refused(Overrides { max: Some(1 << 31), ..Default::default() })[0].reason.contains("INT_MAX"));
        assert!(refused(Overrides { buckets: Some(0), ..Default::default() })[0].reason.contains("EINVAL"));
        assert!(refused(Overrides { buckets: Some(1 << 28), ..Default::default() })[0].reason.contains("at most"));
        // 100 M entries x 248 B = 23 GiB > 6 GiB.
        let r = refused(Overrides { max: Some(100_000_000), ..Default::default() });
        assert_eq!(r[0].knob, "memory", "{r:?}");
        let r = refused(Overrides { timeouts: vec![("bogus".into(), 1)], ..Default::default() });
        assert!(r[0].reason.contains("not a conntrack timeout") && r[0].hint.contains("udp_timeout"), "{r:?}");
        let r = refused(Overrides { timeouts: vec![("udp".into(), 0)], ..Default::default() });
        assert!(r[0].reason.contains("0 s"), "{r:?}");
        let r = refused(Overrides { timeouts: vec![("udp".into(), 3_000_000)], ..Default::default() });
        assert!(r[0].reason.contains("HZ"), "{r:?}");
        // Good overrides pass and show up as changes.
        let p = run(
            &h,
            &c,
            None,
            &Overrides { max: Some(300_000), buckets: Some(131_072), timeouts: vec![("time_wait".into(), 60)] },
        );
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        let changed: Vec<_> = p.effective_changes().map(|c| (c.sysctl.as_str(), c.proposed)).collect();
        assert_eq!(
            changed,
            [
                ("net.netfilter.nf_conntrack_max", 300_000),
                ("net.netfilter.nf_conntrack_buckets", 131_072),
                ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", 60)
            ]
        );
        assert!(p.changes.iter().all(|c| c.origin == Origin::Override));
    }

    #[test]
    fn timeout_names_resolve() {
        let t = timeouts();
        assert_eq!(resolve_timeout_name("udp_timeout", &t).unwrap(), "udp_timeout");
        assert_eq!(resolve_timeout_name("nf_conntrack_udp_timeout", &t).unwrap(), "udp_timeout");
        assert_eq!(
            resolve_timeout_name("net.netfilter.nf_conntrack_tcp_timeout_time_wait", &t).unwrap(),
            "tcp_timeout_time_wait"
        );
        assert_eq!(resolve_timeout_name("time_wait", &t).unwrap(), "tcp_timeout_time_wait");
        assert_eq!(resolve_timeout_name("udp", &t).unwrap(), "udp_timeout");
        assert!(resolve_timeout_name("established", &t).unwrap_err().contains("ambiguous"));
        assert!(resolve_timeout_name("bogus", &t).unwrap_err().contains("not a conntrack timeout"));
        assert!(resolve_timeout_name("", &t).is_err());
    }

    #[test]
    fn an_oversized_current_max_is_lowered_to_what_fits() {
        let h = host(2 * GIB);
        let c = Current { max: 50_000_000, buckets: 65_536, ..current(100) };
        let p = run(&h, &c, None, &Overrides::default());
        let max = p.change(&Knob::Max).unwrap();
        assert_eq!(max.proposed, 65_536, "the kernel default for 2 GiB");
        assert!(max.reason.contains("would not fit"), "{}", max.reason);
    }

    #[test]
    fn numbers_for_humans() {
        assert_eq!(round_entries(41_004.2), "41 000");
        assert_eq!(round_entries(999.6), "1 000");
        assert_eq!(round_entries(12_345_678.0), "12.3 M");
        assert_eq!(group_thousands(2_097_152), "2 097 152");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }

    /// A small deterministic generator (no extra crate): xorshift64*.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn random_case(g: &mut Gen) -> (Host, Current, [f64; 4]) {
        let ram =
            [GIB / 2, GIB, 2 * GIB, 4 * GIB, 16 * GIB, 64 * GIB, 512 * GIB][g.below(7) as usize] + g.below(GIB / 4);
        let h = Host { object_size: [248, 256, 320][g.below(3) as usize], ..host(ram) };
        let max = [0, 1024, 65_536, 262_144, 1 << 20, 50_000_000][g.below(6) as usize];
        let buckets = [1024, 65_536, 262_144, 1 << 20][g.below(4) as usize];
        let mut t = timeouts();
        t.insert("tcp_timeout_time_wait".into(), 1 + g.below(300));
        t.insert("udp_timeout".into(), 1 + g.below(180));
        let entries = BTreeMap::from([(1, g.below(200_000)), (2, g.below(50_000))]);
        let rates = [g.below(50_000) as f64, g.below(20_000) as f64, g.below(100) as f64, g.below(1000) as f64];
        (h, Current { max, buckets, timeouts: t, entries }, rates)
    }

    fn observe_rates(r: [f64; 4], scale: f64) -> Observation {
        let keys = [(17, 53), (6, 443), (1, 0), (47, 0)]
            .iter()
            .zip(r)
            .map(|(&(p, port), n)| KeyCount { netns: 1, proto: Some(p), dport: Some(port), inserts: n * scale })
            .collect();
        summarize("gen".into(), &[Interval { dt_s: 1.0, keys, unattributed: 0.0 }], BTreeMap::new())
    }

    #[test]
    fn property_recommendations_are_monotone_in_demand_and_never_below_the_count() {
        let mut g = Gen(0x9E37_79B9_7F4A_7C15);
        for case in 0..2000 {
            let (h, c, rates) = random_case(&mut g);
            let mut last_max = 0;
            let mut last_buckets = 0;
            for scale in [0.0, 0.1, 0.5, 1.0, 2.0, 7.5, 40.0] {
                let obs = observe_rates(rates, scale);
                let p = run(&h, &c, Some(&obs), &Overrides::default());
                let max = p.change(&Knob::Max).unwrap().proposed;
                let buckets = p.change(&Knob::Buckets).unwrap().proposed;
                let count = *c.entries.values().max().unwrap();
                assert!(max >= count, "case {case}: max {max} below the count {count}");
                assert!(max >= last_max, "case {case}: max fell from {last_max} to {max} as demand grew x{scale}");
                // Buckets only shrink when the current ones no longer fit next to the max.
                let current_buckets_fit = formulas::memory_cost(max, c.buckets, h.object_size) <= p.memory.budget_bytes;
                assert!(
                    buckets >= last_buckets || !current_buckets_fit,
                    "case {case}: buckets fell from {last_buckets} to {buckets}"
                );
                assert!(
                    max > 0
                        && max <= formulas::KERNEL_MAX_LIMIT
                        && buckets > 0
                        && buckets <= formulas::KERNEL_BUCKETS_LIMIT
                );
                assert!(p.refusals.is_empty(), "case {case}: the rules' own values were refused: {:?}", p.refusals);
                // The rules never add memory beyond the budget on their own
                // (keeping a current value that fits is fine).
                let fits = formulas::memory_cost(max, buckets, h.object_size) <= p.memory.budget_bytes;
                let kept = max == c.max && buckets == c.buckets;
                assert!(fits || kept || count > p.sizing.cap, "case {case}: {max}/{buckets} does not fit");
                last_max = max;
                last_buckets = buckets;
            }
        }
    }

    #[test]
    fn property_more_headroom_never_recommends_less() {
        let mut g = Gen(42);
        for case in 0..1000 {
            let (h, c, rates) = random_case(&mut g);
            let obs = observe_rates(rates, 1.0);
            let mut last = 0;
            for headroom in [1.0, 1.5, 2.0, 3.0, 5.0] {
                let p = plan(&Input {
                    host: &h,
                    current: &c,
                    observation: Some(&obs),
                    headroom,
                    overrides: &Overrides::default(),
                });
                let max = p.change(&Knob::Max).unwrap().proposed;
                assert!(max >= last, "case {case}: headroom {headroom} gave {max} < {last}");
                last = max;
            }
        }
    }
}
