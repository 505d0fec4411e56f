//! Trigger expressions: parsing and evaluation. Pure: nothing here reads the
//! kernel, so every case is unit-tested.
//!
//! # Syntax
//!
//! One comparison per `--trigger`; several `--trigger`s fire when any of them
//! holds. Spaces are allowed between tokens.
//!
//! ```text
//! trigger  = metric op number [ "%" ]
//! metric   = name [ selector ] [ "/s" [ selector ] ]     (at most one selector)
//! name     = "fill" | "drops" | "inserts" | "early_drop" | cause
//! cause    = "table_full" | "insert_failed" | "ct_invalid" | "ruleset" | "other"
//! selector = "[" netns "]"        a name from `ip netns list`, an inode number or a path
//! op       = ">" | ">=" | "<" | "<="
//! number   = digits [ "." digits ] [ "k" | "M" ]       (k = x1000, M = x1000000)
//! ```
//!
//! What the names measure:
//!
//! * `fill`: entries / nf_conntrack_max of a namespace's table, in percent
//!   (`%` is optional and only allowed here). Without a selector, the fullest
//!   table. A level, so `/s` does not apply.
//! * `drops`: packets netfilter dropped, every cause; a cause name counts only
//!   the drops of that cause.
//! * `inserts`: new conntrack entries.
//! * `early_drop`: entries conntrack evicted to make room for new ones (the
//!   kernel's `early_drop` counter).
//!
//! `NAME/s` is a rate over the last stat snapshot interval (`--interval`);
//! a bare `NAME` (except `fill`) is the count since the triggers were armed
//! (the start of the run, or the end of the last capture's cooldown). So
//! `table_full>0` fires on the first table-full drop, `drops/s>100` on a
//! sustained rate. A selector narrows a metric to one namespace; without one
//! counts and rates cover every namespace.
//!
//! Errors name the column (the character offset in the expression, counting
//! from 0) and the token expected there, e.g.
//! ``trigger `drops/s>>5`: at column 8: expected a number``.
use std::{collections::BTreeMap, fmt};

use serde::Serialize;

use crate::{
    sensors::snapshot::Cause,
    top::model::{Sample, counter_delta, counter_delta_u32},
};

/// The grammar, as `--help` prints it.
pub const GRAMMAR: &str = "\
Trigger syntax (one comparison per --trigger; several --trigger fire when any holds):
  trigger  = metric op number [ \"%\" ]
  metric   = name [ selector ] [ \"/s\" [ selector ] ]     (at most one selector)
  name     = fill | drops | inserts | early_drop | cause
  cause    = table_full | insert_failed | ct_invalid | ruleset | other
  selector = \"[\" netns \"]\"      name from `ip netns list`, inode number or path
  op       = > | >= | < | <=
  number   = digits [ . digits ] [ k | M ]      (k = x1000, M = x1000000)

  fill        entries / nf_conntrack_max in percent (the fullest table without a
              selector); a level: no /s, `%` allowed (only here)
  drops       packets netfilter dropped (all causes); a cause name counts one cause
  inserts     new conntrack entries
  early_drop  entries conntrack evicted to make room (kernel counter early_drop)
  NAME/s      per second over the last --interval; bare NAME (not fill) counts
              since the triggers were armed (start, or end of the last cooldown)

Examples:
  --trigger 'table_full>0'          the first table-full drop
  --trigger 'fill>90%'              any table above 90 % full
  --trigger 'fill[lb1]>=75'         namespace lb1's table at 75 % or more
  --trigger 'drops/s>100'           more than 100 netfilter drops per second
  --trigger 'ct_invalid/s>5'        invalid packets dropped, per second
  --trigger 'inserts/s>50k'         more than 50000 new entries per second
  --trigger 'early_drop/s>10'       evictions to make room, per second
Quote expressions: the shell treats > and [ ] specially.";

/// What a trigger measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Fill,
    Drops,
    Cause(Cause),
    Inserts,
    EarlyDrop,
}

impl Metric {
    const NAMES: [(&'static str, Metric); 9] = [
        ("fill", Metric::Fill),
        ("drops", Metric::Drops),
        ("inserts", Metric::Inserts),
        ("early_drop", Metric::EarlyDrop),
        ("table_full", Metric::Cause(Cause::TableFull)),
        ("insert_failed", Metric::Cause(Cause::InsertFailed)),
        ("ct_invalid", Metric::Cause(Cause::CtInvalid)),
        ("ruleset", Metric::Cause(Cause::Ruleset)),
        ("other", Metric::Cause(Cause::Other)),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, m)| *m == self).map_or("?", |(n, _)| n)
    }

    fn from_name(s: &str) -> Option<Metric> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)
    }

    fn names_list() -> String {
        Self::NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }
}

/// A parsed trigger expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    /// The expression as the user wrote it.
    pub source: String,
    pub metric: Metric,
    /// `NAME/s`: a rate rather than a count since armed.
    pub rate: bool,
    /// The selector's text (`[...]`), resolved to an inode by the caller.
    pub netns: Option<String>,
    pub op: Op,
    pub threshold: f64,
}

/// A parse error: where, and what was expected there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub expr: String,
    /// Character offset in `expr`, from 0.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trigger `{}`: at column {}: {}", self.expr, self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

impl ParseError {
    /// The expression with a caret under the error's column.
    pub fn caret(&self) -> String {
        format!("    {}\n    {}^", self.expr, " ".repeat(self.column))
    }
}

struct Parser<'a> {
    src: &'a str,
    chars: Vec<char>,
    pos: usize,
}

const EXPECT_OP: &str = "expected a comparison (>, >=, <, <=)";

impl<'a> Parser<'a> {
    fn err<T>(&self, column: usize, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { expr: self.src.to_string(), column, message: message.into() })
    }

    fn skip_ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// Describes what sits at the current position, for messages.
    fn found(&self) -> String {
        match self.peek() {
            None => "end of trigger".into(),
            Some(c) => format!("`{c}`"),
        }
    }

    fn selector(&mut self, netns: &mut Option<String>) -> Result<(), ParseError> {
        let open = self.pos;
        if netns.is_some() {
            return self.err(open, "only one namespace selector `[...]` is allowed");
        }
        self.pos += 1;
        let start = self.pos;
        // A namespace name or path never holds these; stopping at them points
        // the error at the comparison that follows an unclosed selector.
        while self.peek().is_some_and(|c| !matches!(c, ']' | '[' | '>' | '<' | '=')) {
            self.pos += 1;
        }
        if self.peek() != Some(']') {
            return self.err(self.pos, format!("expected `]` to close the selector opened at column {open}"));
        }
        let text: String = self.chars[start..self.pos].iter().collect::<String>().trim().to_string();
        if text.is_empty() {
            return self.err(self.pos, "expected a network namespace (a name, an inode number or a path)");
        }
        self.pos += 1;
        *netns = Some(text);
        Ok(())
    }

    fn parse(mut self) -> Result<Trigger, ParseError> {
        self.skip_ws();
        // name
        let name_start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        let name: String = self.chars[name_start..self.pos].iter().collect();
        if name.is_empty() {
            return self.err(name_start, format!("expected a metric ({})", Metric::names_list()));
        }
        let Some(metric) = Metric::from_name(&name) else {
            return self.err(name_start, format!("unknown metric `{name}`; expected one of {}", Metric::names_list()));
        };
        // selector and /s
        let mut netns = None;
        let mut rate = false;
        self.skip_ws();
        if self.peek() == Some('[') {
            self.selector(&mut netns)?;
            self.skip_ws();
        }
        if self.peek() == Some('/') {
            let slash = self.pos;
            if metric == Metric::Fill {
                return self.err(slash, format!("{EXPECT_OP}; fill is a level, `/s` does not apply to it"));
            }
            self.pos += 1;
            if self.peek() != Some('s') {
                return self.err(self.pos, format!("expected `s` after `/` (per second), found {}", self.found()));
            }
            self.pos += 1;
            rate = true;
            self.skip_ws();
            if self.peek() == Some('[') {
                self.selector(&mut netns)?;
                self.skip_ws();
            }
        }
        // op
        let op = match (self.peek(), self.chars.get(self.pos + 1).copied()) {
            (Some('>'), Some('=')) => Op::Ge,
            (Some('<'), Some('=')) => Op::Le,
            (Some('>'), _) => Op::Gt,
            (Some('<'), _) => Op::Lt,
            _ => {
                let what = if self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    format!("unexpected `{}`", self.peek().unwrap_or(' '))
                } else {
                    format!("found {}", self.found())
                };
                let allowed = if netns.is_none() && !rate && metric != Metric::Fill {
                    "`[`, `/s` or "
                } else if netns.is_none() {
                    "`[` or "
                } else if !rate && metric != Metric::Fill {
                    "`/s` or "
                } else {
                    ""
                };
                return self.err(self.pos, format!("expected {allowed}a comparison (>, >=, <, <=), {what}"));
            }
        };
        self.pos += if matches!(op, Op::Ge | Op::Le) { 2 } else { 1 };
        self.skip_ws();
        // number
        let num_start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == num_start {
            return self.err(num_start, "expected a number");
        }
        if self.peek() == Some('.') {
            self.pos += 1;
            let frac = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            if self.pos == frac {
                return self.err(frac, "expected a digit after `.`");
            }
        }
        let digits: String = self.chars[num_start..self.pos].iter().collect();
        let mut threshold: f64 = digits.parse().map_err(|_| ParseError {
            expr: self.src.to_string(),
            column: num_start,
            message: "expected a number".into(),
        })?;
        match self.peek() {
            Some('k') => {
                threshold *= 1e3;
                self.pos += 1;
            }
            Some('M') => {
                threshold *= 1e6;
                self.pos += 1;
            }
            _ => {}
        }
        self.skip_ws();
        if self.peek() == Some('%') {
            if metric != Metric::Fill {
                return self
                    .err(self.pos, format!("`%` only applies to fill; {name} is a number of packets or entries"));
            }
            self.pos += 1;
            self.skip_ws();
        }
        if metric == Metric::Fill && threshold > 100.0 {
            return self.err(num_start, "expected a percentage from 0 to 100 (fill is entries / nf_conntrack_max)");
        }
        if let Some(c) = self.peek() {
            let hint = if matches!(c, '>' | '<' | '=') {
                "; write one comparison per --trigger (several --trigger fire when any holds)"
            } else {
                ""
            };
            return self.err(self.pos, format!("expected end of trigger, found `{c}`{hint}"));
        }
        Ok(Trigger { source: self.src.to_string(), metric, rate, netns, op, threshold })
    }
}

/// Parses one trigger expression.
pub fn parse(expr: &str) -> Result<Trigger, ParseError> {
    Parser { src: expr, chars: expr.chars().collect(), pos: 0 }.parse()
}

/// Counts over some span: drops by cause, new entries, early-drop evictions.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    pub drops: BTreeMap<Cause, u64>,
    pub inserts: u64,
    pub early_drop: u64,
}

impl Counts {
    pub fn drops_total(&self) -> u64 {
        self.drops.values().sum()
    }

    pub fn add(&mut self, other: &Counts) {
        for (c, n) in &other.drops {
            *self.drops.entry(*c).or_insert(0) += n;
        }
        self.inserts += other.inserts;
        self.early_drop += other.early_drop;
    }

    fn get(&self, metric: Metric) -> u64 {
        match metric {
            Metric::Drops => self.drops_total(),
            Metric::Cause(c) => self.drops.get(&c).copied().unwrap_or(0),
            Metric::Inserts => self.inserts,
            Metric::EarlyDrop => self.early_drop,
            Metric::Fill => 0,
        }
    }
}

/// What changed between two samples, for every namespace together and for
/// each one.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IntervalCounts {
    pub interval_s: f64,
    pub all: Counts,
    pub per_netns: BTreeMap<u32, Counts>,
}

/// Counts between two samples. New entries per namespace come from the
/// churn keys (every key carries its namespace); the all-namespaces total
/// from the global counter. Early drops from each table's kernel counter
/// (a table absent from `prev` contributes nothing yet).
pub fn interval_counts(prev: &Sample, cur: &Sample) -> IntervalCounts {
    let (s0, s1) = (&prev.snapshot, &cur.snapshot);
    let mut namespaces: std::collections::BTreeSet<u32> = s1.drops.iter().map(|(k, _)| k.netns).collect();
    namespaces.extend(s1.churn.iter().map(|(k, _)| k.netns));
    namespaces.extend(cur.tables.iter().map(|t| t.netns));
    let drops_delta = |netns: Option<u32>| -> BTreeMap<Cause, u64> {
        let before = s0.drops_by_cause(netns);
        s1.drops_by_cause(netns)
            .into_iter()
            .map(|(c, n)| (c, counter_delta(before.get(&c).copied().unwrap_or(0), n)))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    // New entries per namespace, in one pass over each sample's keys.
    let inserts_by_ns = |snap: &crate::sensors::snapshot::Snapshot| {
        let mut m: BTreeMap<u32, u64> = BTreeMap::new();
        for (k, v) in &snap.churn {
            *m.entry(k.netns).or_insert(0) += v.inserts;
        }
        m
    };
    let (ins0, ins1) = (inserts_by_ns(s0), inserts_by_ns(s1));
    let prev_tables: BTreeMap<u32, u64> = prev.tables.iter().map(|t| (t.netns, t.early_drop)).collect();
    let early = |netns: u32| -> u64 {
        let cur_v = cur.tables.iter().find(|t| t.netns == netns).map(|t| t.early_drop);
        match (prev_tables.get(&netns), cur_v) {
            (Some(p), Some(c)) => counter_delta_u32(*p, c),
            _ => 0,
        }
    };
    let mut per_netns = BTreeMap::new();
    for ns in namespaces {
        let counts = Counts {
            drops: drops_delta(Some(ns)),
            inserts: counter_delta(ins0.get(&ns).copied().unwrap_or(0), ins1.get(&ns).copied().unwrap_or(0)),
            early_drop: early(ns),
        };
        per_netns.insert(ns, counts);
    }
    let all = Counts {
        drops: drops_delta(None),
        inserts: counter_delta(s0.counters.new_entries, s1.counters.new_entries),
        early_drop: per_netns.values().map(|c| c.early_drop).sum(),
    };
    IntervalCounts { interval_s: (cur.at_s - prev.at_s).max(1e-6), all, per_netns }
}

/// Counts since the triggers were (re-)armed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SinceArmed {
    pub all: Counts,
    pub per_netns: BTreeMap<u32, Counts>,
}

impl SinceArmed {
    pub fn add(&mut self, iv: &IntervalCounts) {
        self.all.add(&iv.all);
        for (ns, c) in &iv.per_netns {
            self.per_netns.entry(*ns).or_default().add(c);
        }
    }

    pub fn reset(&mut self) {
        *self = SinceArmed::default();
    }
}

/// Everything a trigger can look at, at one evaluation.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub last: IntervalCounts,
    pub since_armed: SinceArmed,
    /// Fill percent per namespace with an active table (max > 0).
    pub fill: BTreeMap<u32, f64>,
}

impl Observation {
    pub fn new(last: IntervalCounts, since_armed: SinceArmed, cur: &Sample) -> Self {
        let fill = cur
            .tables
            .iter()
            .filter(|t| t.max > 0)
            .map(|t| (t.netns, t.entries as f64 * 100.0 / t.max as f64))
            .collect();
        Observation { last, since_armed, fill }
    }
}

/// A trigger with its selector resolved to a namespace inode.
#[derive(Clone, Debug, PartialEq)]
pub struct Armed {
    pub trigger: Trigger,
    pub netns: Option<u32>,
}

/// A trigger's value at one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Value {
    pub value: f64,
    /// The namespace the value belongs to (the fullest for `fill`, the
    /// selector's otherwise), when it is one namespace.
    pub netns: Option<u32>,
    /// Without a selector: the namespace that contributed most (if any did).
    pub busiest: Option<u32>,
}

impl Armed {
    /// The trigger's current value; `None` when it cannot be measured (no
    /// active table for `fill`).
    pub fn value(&self, obs: &Observation) -> Option<Value> {
        let t = &self.trigger;
        if t.metric == Metric::Fill {
            return match self.netns {
                Some(ns) => obs.fill.get(&ns).map(|v| Value { value: *v, netns: Some(ns), busiest: Some(ns) }),
                None => obs
                    .fill
                    .iter()
                    .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
                    .map(|(ns, v)| Value { value: *v, netns: Some(*ns), busiest: Some(*ns) }),
            };
        }
        let zero = Counts::default();
        let counts = match (t.rate, self.netns) {
            (true, None) => &obs.last.all,
            (true, Some(ns)) => obs.last.per_netns.get(&ns).unwrap_or(&zero),
            (false, None) => &obs.since_armed.all,
            (false, Some(ns)) => obs.since_armed.per_netns.get(&ns).unwrap_or(&zero),
        };
        let n = counts.get(t.metric) as f64;
        let value = if t.rate { n / obs.last.interval_s.max(1e-6) } else { n };
        let per_netns = if t.rate { &obs.last.per_netns } else { &obs.since_armed.per_netns };
        let busiest = match self.netns {
            Some(ns) => Some(ns),
            None => per_netns
                .iter()
                .map(|(ns, c)| (*ns, c.get(t.metric)))
                .filter(|(_, v)| *v > 0)
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
                .map(|(ns, _)| ns),
        };
        Some(Value { value, netns: self.netns, busiest })
    }

    /// The value when the trigger holds.
    pub fn fires(&self, obs: &Observation) -> Option<Value> {
        self.value(obs).filter(|v| self.trigger.op.holds(v.value, self.trigger.threshold))
    }

    /// What the value means, for summaries: `table_full drops since armed`.
    pub fn describe(&self) -> String {
        let t = &self.trigger;
        let what = match t.metric {
            Metric::Fill => return "percent of nf_conntrack_max in use".into(),
            Metric::Drops => "netfilter drops".to_string(),
            Metric::Cause(c) => format!("{} drops", c.as_str()),
            Metric::Inserts => "new conntrack entries".to_string(),
            Metric::EarlyDrop => "early_drop evictions".to_string(),
        };
        if t.rate { format!("{what} per second (last interval)") } else { format!("{what} since armed") }
    }
}

/// The first trigger (in the order given) that holds, with its value.
pub fn first_firing<'a>(triggers: &'a [Armed], obs: &Observation) -> Option<(&'a Armed, Value)> {
    triggers.iter().find_map(|t| t.fires(obs).map(|v| (t, v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sensors::snapshot::Snapshot, top::model::TableGauge};
    use ctguard_ebpf::{ChurnKey, ChurnValue, DropKey, FlowTuple, cause, confidence, counter};
    use std::time::Instant;

    fn err(expr: &str) -> (usize, String) {
        let e = parse(expr).unwrap_err();
        (e.column, e.message)
    }

    #[test]
    fn parses_the_documented_forms() {
        let t = parse("fill>90%").unwrap();
        assert_eq!(
            (t.metric, t.rate, t.op, t.threshold, t.netns.as_deref()),
            (Metric::Fill, false, Op::Gt, 90.0, None)
        );
        let t = parse("fill[lb1]>=75").unwrap();
        assert_eq!((t.metric, t.op, t.threshold, t.netns.as_deref()), (Metric::Fill, Op::Ge, 75.0, Some("lb1")));
        let t = parse("drops/s>100").unwrap();
        assert_eq!((t.metric, t.rate, t.threshold), (Metric::Drops, true, 100.0));
        let t = parse("table_full>0").unwrap();
        assert_eq!((t.metric, t.rate, t.threshold), (Metric::Cause(Cause::TableFull), false, 0.0));
        let t = parse("insert_failed>0").unwrap();
        assert_eq!(t.metric, Metric::Cause(Cause::InsertFailed));
        let t = parse("ct_invalid/s>5").unwrap();
        assert_eq!((t.metric, t.rate), (Metric::Cause(Cause::CtInvalid), true));
        let t = parse("inserts/s>50000").unwrap();
        assert_eq!((t.metric, t.rate, t.threshold), (Metric::Inserts, true, 50000.0));
        assert_eq!(parse("inserts/s>50k").unwrap().threshold, 50000.0);
        assert_eq!(parse("inserts/s>1.5M").unwrap().threshold, 1_500_000.0);
        let t = parse("early_drop/s>10").unwrap();
        assert_eq!((t.metric, t.rate), (Metric::EarlyDrop, true));
        let t = parse("  drops[/run/netns/x]/s <= 2.5 ").unwrap();
        assert_eq!((t.netns.as_deref(), t.rate, t.op, t.threshold), (Some("/run/netns/x"), true, Op::Le, 2.5));
        let t = parse("drops/s[4026532247]<1").unwrap();
        assert_eq!((t.netns.as_deref(), t.op), (Some("4026532247"), Op::Lt));
        assert_eq!(parse("ruleset > 3").unwrap().metric, Metric::Cause(Cause::Ruleset));
        assert_eq!(parse("other>=1").unwrap().metric, Metric::Cause(Cause::Other));
        assert_eq!(parse("fill > 99.5 %").unwrap().threshold, 99.5);
        assert_eq!(parse("drops/s>100").unwrap().source, "drops/s>100");
    }

    #[test]
    fn errors_name_the_column_and_the_expected_token() {
        assert_eq!(
            parse("drops/s>>5").unwrap_err().to_string(),
            "trigger `drops/s>>5`: at column 8: expected a number"
        );
        assert_eq!(err("drops/s>"), (8, "expected a number".into()));
        assert_eq!(err(""), (0, "expected a metric (fill, drops, inserts, early_drop, table_full, insert_failed, ct_invalid, ruleset, other)".into()));
        assert_eq!(err(">5").0, 0);
        let (col, msg) = err("drop>5");
        assert_eq!(col, 0);
        assert!(msg.starts_with("unknown metric `drop`; expected one of fill, drops"), "{msg}");
        let (col, msg) = err("fill/s>5");
        assert_eq!(col, 4);
        assert!(msg.contains("fill is a level"), "{msg}");
        assert_eq!(err("drops/x>5"), (6, "expected `s` after `/` (per second), found `x`".into()));
        assert_eq!(err("drops/"), (6, "expected `s` after `/` (per second), found end of trigger".into()));
        assert_eq!(err("drops"), (5, "expected `[`, `/s` or a comparison (>, >=, <, <=), found end of trigger".into()));
        assert_eq!(err("drops/s=5"), (7, "expected `[` or a comparison (>, >=, <, <=), found `=`".into()));
        assert_eq!(err("fill 90"), (5, "expected `[` or a comparison (>, >=, <, <=), unexpected `9`".into()));
        assert_eq!(err("fill[b>90"), (6, "expected `]` to close the selector opened at column 4".into()));
        assert_eq!(err("fill[]>90"), (5, "expected a network namespace (a name, an inode number or a path)".into()));
        assert_eq!(err("drops[a]/s[b]>1"), (10, "only one namespace selector `[...]` is allowed".into()));
        assert_eq!(err("drops/s>abc"), (8, "expected a number".into()));
        assert_eq!(err("drops/s>1."), (10, "expected a digit after `.`".into()));
        assert_eq!(err("drops/s>1.2.3"), (11, "expected end of trigger, found `.`".into()));
        let (col, msg) = err("drops/s>5%");
        assert_eq!(col, 9);
        assert!(msg.starts_with("`%` only applies to fill"), "{msg}");
        assert_eq!(err("fill>150%").0, 5);
        let (col, msg) = err("drops>1 > 2");
        assert_eq!(col, 8);
        assert!(msg.contains("one comparison per --trigger"), "{msg}");
        assert_eq!(err("drops>1 or fill>2"), (8, "expected end of trigger, found `o`".into()));
        // Columns count characters, not bytes.
        assert_eq!(err("fïll>1").0, 0);
        assert_eq!(err("drops>é").0, 6);
    }

    #[test]
    fn caret_points_at_the_column() {
        let e = parse("drops/s>>5").unwrap_err();
        assert_eq!(e.caret(), "    drops/s>>5\n            ^");
    }

    fn drop_key(netns: u32, c: u8) -> DropKey {
        DropKey { netns, cause: c, confidence: confidence::LIKELY, _pad: [0; 2] }
    }

    fn key(netns: u32, dport: u16) -> ChurnKey {
        ChurnKey {
            netns,
            tuple: FlowTuple { dport, proto: 17, ip_version: 4, ..Default::default() },
            ..Default::default()
        }
    }

    fn sample(
        at_s: f64,
        new_entries: u64,
        drops: Vec<(DropKey, u64)>,
        keys: Vec<(ChurnKey, u64)>,
        tables: Vec<(u32, u64, u64, u64)>,
    ) -> Sample {
        let mut c = [0u64; counter::COUNT as usize];
        c[counter::CT_ALLOCATED as usize] = new_entries;
        let churn = keys.into_iter().map(|(k, ins)| (k, ChurnValue { inserts: ins, removals: 0, drops: 0 })).collect();
        Sample {
            at_s,
            snapshot: Snapshot::new(Instant::now(), c, churn, drops),
            tables: tables
                .into_iter()
                .map(|(netns, entries, max, early_drop)| TableGauge {
                    netns,
                    label: format!("ns{netns}"),
                    entries,
                    max,
                    buckets: 1024,
                    early_drop,
                })
                .collect(),
            programs: vec![],
        }
    }

    fn armed(expr: &str, netns: Option<u32>) -> Armed {
        Armed { trigger: parse(expr).unwrap(), netns }
    }

    #[test]
    fn interval_counts_split_by_namespace() {
        let a = sample(
            0.0,
            100,
            vec![(drop_key(1, cause::TABLE_FULL), 5)],
            vec![(key(1, 53), 60), (key(2, 80), 40)],
            vec![(1, 10, 100, 7), (2, 5, 100, 0)],
        );
        let b = sample(
            2.0,
            400,
            vec![(drop_key(1, cause::TABLE_FULL), 25), (drop_key(2, cause::RULESET), 4)],
            vec![(key(1, 53), 260), (key(2, 80), 140)],
            vec![(1, 100, 100, 17), (2, 5, 100, 0)],
        );
        let iv = interval_counts(&a, &b);
        assert_eq!(iv.interval_s, 2.0);
        assert_eq!(iv.all.inserts, 300);
        assert_eq!(iv.all.drops[&Cause::TableFull], 20);
        assert_eq!(iv.all.drops[&Cause::Ruleset], 4);
        assert_eq!(iv.all.early_drop, 10);
        assert_eq!(iv.per_netns[&1].inserts, 200);
        assert_eq!(iv.per_netns[&1].drops[&Cause::TableFull], 20);
        assert!(!iv.per_netns[&1].drops.contains_key(&Cause::Ruleset));
        assert_eq!(iv.per_netns[&2].drops_total(), 4);
        assert_eq!(iv.per_netns[&2].inserts, 100);
        assert_eq!(iv.per_netns[&1].early_drop, 10);
    }

    #[test]
    fn evaluation_of_counts_rates_and_fill() {
        let a = sample(0.0, 0, vec![], vec![], vec![(1, 10, 100, 0), (2, 50, 100, 0)]);
        let b = sample(
            2.0,
            1000,
            vec![(drop_key(1, cause::TABLE_FULL), 3), (drop_key(2, cause::CT_INVALID), 30)],
            vec![(key(1, 53), 1000)],
            vec![(1, 95, 100, 40), (2, 50, 100, 0)],
        );
        let iv = interval_counts(&a, &b);
        let mut since = SinceArmed::default();
        since.add(&iv);
        let obs = Observation::new(iv, since, &b);

        let v = armed("table_full>0", None).fires(&obs).unwrap();
        assert_eq!(v, Value { value: 3.0, netns: None, busiest: Some(1) });
        assert!(armed("table_full>3", None).fires(&obs).is_none());
        assert!(armed("table_full>=3", None).fires(&obs).is_some());
        assert!(armed("table_full[x]>0", Some(2)).fires(&obs).is_none(), "none in namespace 2");
        assert_eq!(armed("ct_invalid/s>5", None).fires(&obs).unwrap().value, 15.0);
        assert!(armed("ct_invalid/s>5", Some(1)).fires(&obs).is_none());
        assert_eq!(armed("drops/s>10", None).fires(&obs).unwrap().value, 16.5);
        assert_eq!(armed("inserts/s>400", None).fires(&obs).unwrap().value, 500.0);
        assert!(armed("inserts/s>500", None).fires(&obs).is_none());
        assert_eq!(armed("early_drop/s>10", None).fires(&obs).unwrap().value, 20.0);
        assert!(armed("early_drop>40", None).fires(&obs).is_none());
        // fill: the fullest table without a selector, the named one with.
        assert_eq!(
            armed("fill>90%", None).fires(&obs).unwrap(),
            Value { value: 95.0, netns: Some(1), busiest: Some(1) }
        );
        assert_eq!(armed("ct_invalid/s>5", None).fires(&obs).unwrap().busiest, Some(2));
        assert_eq!(armed("early_drop/s>100", None).value(&obs).unwrap().busiest, Some(1));
        assert_eq!(armed("insert_failed>=0", None).value(&obs).unwrap().busiest, None, "nobody contributed");
        assert!(armed("fill[b]>90", Some(2)).fires(&obs).is_none());
        assert!(armed("fill[b]>90", Some(3)).value(&obs).is_none(), "no such table: no value");
        assert!(armed("inserts<1", Some(3)).fires(&obs).is_some(), "a namespace without data counts zero");
        let triggers = [armed("fill>99", None), armed("drops/s>10", None), armed("table_full>0", None)];
        let (t, v) = first_firing(&triggers, &obs).unwrap();
        assert_eq!((t.trigger.source.as_str(), v.value), ("drops/s>10", 16.5));
    }

    #[test]
    fn counts_since_armed_accumulate_and_reset() {
        let a = sample(0.0, 0, vec![], vec![], vec![]);
        let b = sample(1.0, 0, vec![(drop_key(1, cause::TABLE_FULL), 2)], vec![], vec![]);
        let c = sample(2.0, 0, vec![(drop_key(1, cause::TABLE_FULL), 5)], vec![], vec![]);
        let mut since = SinceArmed::default();
        since.add(&interval_counts(&a, &b));
        since.add(&interval_counts(&b, &c));
        assert_eq!(since.all.drops[&Cause::TableFull], 5);
        assert_eq!(since.per_netns[&1].drops[&Cause::TableFull], 5);
        since.reset();
        let obs = Observation::new(interval_counts(&c, &c), since, &c);
        assert!(armed("table_full>0", None).fires(&obs).is_none(), "re-armed: old drops do not count");
    }

    #[test]
    fn descriptions() {
        assert_eq!(armed("table_full>0", None).describe(), "table_full drops since armed");
        assert_eq!(armed("drops/s>1", None).describe(), "netfilter drops per second (last interval)");
        assert_eq!(armed("fill>1", None).describe(), "percent of nf_conntrack_max in use");
    }
}
