//! When a conntrack table needs attention, and why. Pure: the rules are
//! tested without a kernel.
use std::time::Duration;

use serde::Serialize;

use crate::{
    conntrack::{Counters, fill_percent},
    util::format_duration,
};

/// At this fill a burst of new flows can hit the limit, after which new
/// flows are dropped.
pub const FULL_WARNING_PERCENT: f64 = 80.0;

/// Counters whose rise means packets were dropped or entries evicted:
/// `drop` (no room for a new entry), `insert_failed` (a clash or a hash
/// chain too long at confirm), `early_drop` (an entry evicted to make room).
pub const RISING_WARNING_COUNTERS: [&str; 3] = ["drop", "insert_failed", "early_drop"];

/// Ordered from best to worst, so the overall health is the maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Ok,
    Warning,
    Error,
}

impl Health {
    /// 0 healthy, 1 warning, 2 error (as documented in `--help`).
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Ok => 0,
            Health::Warning => 1,
            Health::Error => 2,
        }
    }
}

/// A health and the reasons for it (empty when ok).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub health: Health,
    pub reasons: Vec<String>,
}

impl Assessment {
    pub fn ok() -> Self {
        Assessment { health: Health::Ok, reasons: Vec::new() }
    }

    pub fn error(reason: impl Into<String>) -> Self {
        Assessment { health: Health::Error, reasons: vec![reason.into()] }
    }

    fn warn(&mut self, reason: String) {
        self.health = self.health.max(Health::Warning);
        self.reasons.push(reason);
    }
}

/// Assesses one namespace's table from its fill and, when two readings were
/// taken `interval` apart, how much its counters rose in between.
pub fn assess_table(entries: u64, max: u64, rise: Option<&Counters>, interval: Duration) -> Assessment {
    let mut assessment = Assessment::ok();
    if let Some(percent) = fill_percent(entries, max)
        && percent >= FULL_WARNING_PERCENT
    {
        // Rounded down so "100% full" only ever means full.
        assessment.warn(format!("table {}% full ({entries} of {max} entries)", percent.floor()));
    }
    for name in RISING_WARNING_COUNTERS {
        if let Some(rose) = rise.and_then(|r| r.get(name)).filter(|n| *n > 0) {
            assessment.warn(format!("{name} counter rose by {rose} in {}", format_duration(interval)));
        }
    }
    assessment
}

/// The worst of several healths; ok when there are none.
pub fn overall(healths: impl IntoIterator<Item = Health>) -> Health {
    healths.into_iter().max().unwrap_or(Health::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(pairs: &[(&str, u64)]) -> Counters {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_quiet_table_is_ok() {
        let rise = counters(&[("found", 100), ("drop", 0), ("insert_failed", 0), ("early_drop", 0)]);
        assert_eq!(assess_table(996, 262_144, Some(&rise), SECOND), Assessment::ok());
    }

    #[test]
    fn eighty_percent_full_warns() {
        let a = assess_table(800, 1000, None, Duration::ZERO);
        assert_eq!(a.health, Health::Warning);
        assert_eq!(a.reasons, ["table 80% full (800 of 1000 entries)"]);
        assert_eq!(assess_table(799, 1000, None, Duration::ZERO).health, Health::Ok);
        let nearly = assess_table(999_999, 1_000_000, None, Duration::ZERO);
        assert_eq!(nearly.reasons, ["table 99% full (999999 of 1000000 entries)"]);
    }

    #[test]
    fn zero_max_means_unlimited_not_full() {
        assert_eq!(assess_table(5000, 0, None, Duration::ZERO).health, Health::Ok);
    }

    #[test]
    fn rising_drop_counters_warn_with_the_amount_and_interval() {
        let rise = counters(&[("invalid", 40), ("drop", 12), ("insert_failed", 0), ("early_drop", 3)]);
        let a = assess_table(10, 1000, Some(&rise), SECOND);
        assert_eq!(a.health, Health::Warning);
        assert_eq!(a.reasons, ["drop counter rose by 12 in 1s", "early_drop counter rose by 3 in 1s"]);
        let a = assess_table(10, 1000, Some(&counters(&[("insert_failed", 2)])), Duration::from_millis(500));
        assert_eq!(a.reasons, ["insert_failed counter rose by 2 in 500ms"]);
    }

    #[test]
    fn invalid_alone_does_not_warn() {
        assert_eq!(assess_table(10, 1000, Some(&counters(&[("invalid", 40)])), SECOND).health, Health::Ok);
    }

    #[test]
    fn full_and_dropping_gives_both_reasons() {
        let a = assess_table(1000, 1000, Some(&counters(&[("drop", 7)])), SECOND);
        assert_eq!(a.reasons.len(), 2);
        assert!(a.reasons[0].starts_with("table 100% full"));
    }

    #[test]
    fn overall_is_the_worst_and_exit_codes_follow() {
        assert_eq!(overall([]), Health::Ok);
        assert_eq!(overall([Health::Ok, Health::Warning, Health::Ok]), Health::Warning);
        assert_eq!(overall([Health::Warning, Health::Error]), Health::Error);
        assert_eq!([Health::Ok, Health::Warning, Health::Error].map(Health::exit_code), [0, 1, 2]);
        assert_eq!(serde_json::to_string(&Health::Warning).unwrap(), r#""warning""#);
    }
}
