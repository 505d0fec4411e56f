//! Conflict analysis: what untracked packets would break, read from the
//! live ruleset before anything is applied. Pure: ruleset JSON in,
//! conflicts out.
//!
//! A packet a `notrack` rule marks has conntrack state `untracked` and no
//! connection behind it. Three things in a ruleset depend on that
//! connection:
//!
//! * **NAT.** Address translation is decided on a flow's first packet and
//!   applied to the rest (and reversed on replies) through its conntrack
//!   entry; untracked packets are never translated. Every rule in a table
//!   that has a `nat` chain and translates (snat, dnat, masquerade,
//!   redirect) is compared with the selected flows, taken in their original
//!   direction (destination port in `--port`, source in `--src`,
//!   destination in `--dst`). Overlap refuses; a rule ctguard cannot read
//!   (marks, named sets, iptables-nft `xt`) warns.
//! * **`ct state` policies.** A filter chain that accepts `ct state
//!   established,related` and drops the rest (policy drop, or a final drop
//!   or reject) drops untracked packets unless some rule accepts them
//!   without conntrack (`ct state untracked accept`, a plain port accept).
//!   Each base filter chain the packets traverse is walked twice: with the
//!   state the packets have today (requests: `new`; replies:
//!   `established`) and as `untracked`. Accepted today and dropped untracked
//!   refuses, with the exact rule to add; uncertain cases warn.
//! * **Conntrack helpers.** `ct helper set` assigns a helper (ftp, sip, ...)
//!   through the flow's entry; untracked flows get none, so their related
//!   data connections break. Overlap refuses.
//!
//! Flows whose *source* port is in `--port` (e.g. a client using source
//! port 80) are untracked too by the reply-direction rules; they are rare
//! and not analysed.
use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    eval::{By, CtState, Iface, Packets, Rel, RuleRef, eval_rule, fate},
    ranges::RangeSet,
    render::rule_text,
    rules::{TABLE, half_matches, matches_text},
    ruleset::{Chain, Ruleset},
    selector::{Direction, Family, Half, Selector, cidr_range, has_ports},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Printed; the bypass is applied; exit code 1.
    Warn,
    /// The bypass is not applied without --force; exit code 2.
    Refuse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Nat,
    CtState,
    Helper,
    OneDirection,
    LegacyIptables,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Nat => "nat",
            Kind::CtState => "ct-state",
            Kind::Helper => "ct-helper",
            Kind::OneDirection => "one-direction",
            Kind::LegacyIptables => "iptables-legacy",
        }
    }
}

/// One problem, with the rule it is about and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub severity: Severity,
    pub kind: Kind,
    /// `family name` of the table, e.g. `inet filter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    /// The rule as nft shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half: Option<Half>,
    /// What breaks.
    pub message: String,
    /// What to do: nft commands to run, or advice.
    pub fix: Vec<String>,
}

impl Conflict {
    /// Multi-line text for people.
    pub fn text(&self) -> String {
        let sev = match self.severity {
            Severity::Refuse => "CONFLICT",
            Severity::Warn => "warning",
        };
        let mut out = format!("{sev} [{}]", self.kind.as_str());
        if let (Some(t), Some(c)) = (&self.table, &self.chain) {
            out.push_str(&format!(" table {t} chain {c}"));
            if let Some(h) = self.handle {
                out.push_str(&format!(" handle {h}"));
            }
        } else if let Some(t) = &self.table {
            out.push_str(&format!(" table {t}"));
        }
        if let Some(r) = &self.rule {
            out.push_str(&format!(":\n    {r}"));
        }
        out.push_str(&format!("\n  {}", self.message));
        for f in &self.fix {
            out.push_str(&format!("\n  fix: {f}"));
        }
        out
    }
}

/// Where packets enter the ruleset: through prerouting (arriving) or output
/// (sent by this host). The selector's interface is their input interface
/// in the first case and their output interface in the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Prerouting,
    Output,
}

impl Origin {
    fn reaches(self, hook: &str) -> bool {
        match self {
            Origin::Prerouting => matches!(hook, "prerouting" | "input" | "forward" | "postrouting"),
            Origin::Output => matches!(hook, "output" | "postrouting"),
        }
    }
}

fn family_fits(table_family: &str, f: Family) -> bool {
    match table_family {
        "ip" => f == Family::V4,
        "ip6" => f == Family::V6,
        "inet" => true,
        _ => false,
    }
}

/// The packet classes of one half of the selector that can reach `hook` in
/// a table of `table_family`, with conntrack state `ct`.
fn classes(sel: &Selector, half: Half, hook: &str, table_family: &str, ct: CtState) -> Vec<Packets> {
    let mut out = Vec::new();
    for family in sel.families() {
        if !family_fits(table_family, family) {
            continue;
        }
        let range = |c: Option<crate::util::Cidr>| c.map_or_else(|| RangeSet::full(family.max()), cidr_range);
        let (saddr, daddr) = match half {
            Half::Request => (range(sel.src), range(sel.dst)),
            Half::Reply => (range(sel.dst), range(sel.src)),
        };
        for &proto in &sel.protos {
            let ports = sel.ports.clone().filter(|_| has_ports(proto)).unwrap_or_else(|| RangeSet::full(65535));
            let (sport, dport) = match half {
                Half::Request => (RangeSet::full(65535), ports),
                Half::Reply => (ports, RangeSet::full(65535)),
            };
            for origin in [Origin::Prerouting, Origin::Output] {
                if !origin.reaches(hook) {
                    continue;
                }
                let ours = sel.iface.clone().map_or(Iface::Any, Iface::Named);
                let (iif, oif) = match origin {
                    Origin::Prerouting => (ours, if hook == "input" { Iface::Absent } else { Iface::Any }),
                    Origin::Output => (Iface::Absent, ours),
                };
                out.push(Packets {
                    family,
                    proto,
                    saddr: saddr.clone(),
                    daddr: daddr.clone(),
                    sport: sport.clone(),
                    dport: dport.clone(),
                    iif,
                    oif,
                    ct,
                });
            }
        }
    }
    out
}

/// Every hook a flow's first packet passes where NAT or helpers act.
const FLOW_HOOKS: [&str; 4] = ["prerouting", "input", "output", "postrouting"];

/// Input for the analysis besides the ruleset.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    /// Tables of legacy (non-nft) iptables in the namespace, as
    /// `/proc/net/ip_tables_names` and `ip6_tables_names` list them.
    pub legacy_iptables: Vec<String>,
}

/// Everything that would break if `sel` were bypassed, most severe first.
pub fn analyze(rs: &Ruleset, sel: &Selector, env: &Environment) -> Vec<Conflict> {
    let mut out = Vec::new();
    if sel.direction != Direction::Both {
        let (done, left) = match sel.direction {
            Direction::In => ("requests", "replies"),
            _ => ("replies", "requests"),
        };
        out.push(Conflict {
            severity: Severity::Warn,
            kind: Kind::OneDirection,
            table: None,
            chain: None,
            handle: None,
            rule: None,
            half: None,
            message: format!(
                "--direction {} exempts only the {done}: the {left} of these flows are still tracked, so each flow \
                 still gets a conntrack entry (created by its first tracked packet, often marked invalid for TCP)",
                sel.direction.as_str()
            ),
            fix: vec!["use --direction both unless the other direction never passes this host".into()],
        });
    }
    nat_conflicts(rs, sel, &mut out);
    helper_conflicts(rs, sel, &mut out);
    ct_state_conflicts(rs, sel, &mut out);
    for name in &env.legacy_iptables {
        if matches!(name.as_str(), "nat" | "filter") {
            out.push(Conflict {
                severity: Severity::Warn,
                kind: Kind::LegacyIptables,
                table: Some(format!("iptables-legacy {name}")),
                chain: None,
                handle: None,
                rule: None,
                half: None,
                message: format!(
                    "the legacy iptables `{name}` table is loaded in this namespace; ctguard reads only nftables, so its \
                     NAT and conntrack-state rules were not checked"
                ),
                fix: vec![format!("review `iptables-legacy -t {name} -S` (and ip6tables-legacy) for NAT and -m conntrack/-m state rules")],
            });
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.severity));
    out
}

fn foreign_tables(rs: &Ruleset) -> impl Iterator<Item = &(String, String)> {
    rs.tables.iter().filter(|(f, n)| !(f == "inet" && n == TABLE))
}

fn rule_location(r: &RuleRef) -> (Option<String>, Option<String>, Option<u64>) {
    (Some(format!("{} {}", r.family, r.table)), Some(r.chain.clone()), Some(r.handle))
}

fn has_statement(expr: &[serde_json::Value], keys: &[&str]) -> bool {
    expr.iter().any(|s| s.as_object().is_some_and(|o| o.keys().any(|k| keys.contains(&k.as_str()))))
}

/// How a rule's matches relate to the selected flows' first packets, over
/// every hook and class: any overlap beats undecidable beats none.
fn flow_overlap(table_family: &str, expr: &[serde_json::Value], sel: &Selector) -> Rel {
    let mut worst = Rel::Never;
    for hook in FLOW_HOOKS {
        for p in classes(sel, Half::Request, hook, table_family, CtState::New) {
            match eval_rule(expr, &p).rel {
                Rel::Always | Rel::Some => return Rel::Some,
                Rel::Unknown => worst = Rel::Unknown,
                Rel::Never => {}
            }
        }
    }
    worst
}

fn nat_conflicts(rs: &Ruleset, sel: &Selector, out: &mut Vec<Conflict>) {
    for (family, table) in foreign_tables(rs) {
        let chains: Vec<&Chain> = rs.table_chains(family, table).collect();
        let has_nat = chains.iter().any(|c| c.base.as_ref().is_some_and(|b| b.kind == "nat"));
        if !has_nat || !matches!(family.as_str(), "ip" | "ip6" | "inet") {
            continue;
        }
        for chain in chains {
            for rule in &chain.rules {
                let nat = has_statement(&rule.expr, &["snat", "dnat", "masquerade", "redirect"]);
                if !nat && !has_statement(&rule.expr, &["xt"]) {
                    continue;
                }
                let rel = flow_overlap(family, &rule.expr, sel);
                let r = RuleRef::of(rule);
                let (table_s, chain_s, handle) = rule_location(&r);
                let text = rule_text(&rule.expr, rule.comment.as_deref());
                let conflict = |severity, message: String| {
                    Conflict {
                    severity,
                    kind: Kind::Nat,
                    table: table_s.clone(),
                    chain: chain_s.clone(),
                    handle,
                    rule: Some(text.clone()),
                    half: None,
                    message,
                    fix: vec![
                        "narrow the bypass so it leaves out the translated traffic (--src, --dst, --iface), or do not bypass it".into(),
                    ],
                }
                };
                match rel {
                    Rel::Always | Rel::Some if nat => out.push(conflict(
                        Severity::Refuse,
                        format!(
                            "this NAT rule matches flows the bypass selects ({}); untracked packets are never translated, \
                             so those flows would leave untranslated and their replies would not be mapped back",
                            sel.describe()
                        ),
                    )),
                    Rel::Never => {}
                    _ => out.push(conflict(
                        Severity::Warn,
                        format!(
                            "ctguard cannot tell whether this rule in a NAT table matches the selected flows ({}); if it \
                             translates them, untracked packets would bypass the translation",
                            sel.describe()
                        ),
                    )),
                }
            }
        }
    }
}

fn helper_conflicts(rs: &Ruleset, sel: &Selector, out: &mut Vec<Conflict>) {
    for (family, table) in foreign_tables(rs) {
        for chain in rs.table_chains(family, table) {
            for rule in &chain.rules {
                let assigns = rule.expr.iter().any(|s| s.get("ct helper").is_some());
                if !assigns {
                    continue;
                }
                let rel = flow_overlap(family, &rule.expr, sel);
                if rel == Rel::Never {
                    continue;
                }
                let (table_s, chain_s, handle) = rule_location(&RuleRef::of(rule));
                let helper = rule.expr.iter().find_map(|s| s.get("ct helper")).and_then(|h| h.as_str()).unwrap_or("?");
                let kind = rs
                    .helpers
                    .iter()
                    .find(|h| h.family == *family && h.table == *table && h.name == helper)
                    .map_or_else(String::new, |h| format!(" ({} over {})", h.kind, h.protocol));
                out.push(Conflict {
                    severity: if rel == Rel::Unknown { Severity::Warn } else { Severity::Refuse },
                    kind: Kind::Helper,
                    table: table_s,
                    chain: chain_s,
                    handle,
                    rule: Some(rule_text(&rule.expr, rule.comment.as_deref())),
                    half: None,
                    message: format!(
                        "this rule assigns conntrack helper \"{helper}\"{kind} to flows the bypass {} ({}); untracked flows \
                         get no helper, so the connections it opens (FTP data, SIP media, ...) would be refused or not translated",
                        if rel == Rel::Unknown { "may select" } else { "selects" },
                        sel.describe()
                    ),
                    fix: vec!["leave the helper's ports out of the bypass".into()],
                });
            }
        }
    }
}

/// What today's state of a half's packets is.
fn tracked_state(half: Half) -> CtState {
    match half {
        Half::Request => CtState::New,
        Half::Reply => CtState::Established,
    }
}

fn find_rule<'a>(rs: &'a Ruleset, r: &RuleRef) -> Option<&'a crate::bypass::ruleset::Rule> {
    rs.chain(&r.family, &r.table, &r.chain).and_then(|c| c.rules.iter().find(|x| x.handle == r.handle))
}

fn rule_text_of(rs: &Ruleset, r: &RuleRef) -> Option<String> {
    find_rule(rs, r).map(|x| rule_text(&x.expr, x.comment.as_deref()))
}

fn by_text(rs: &Ruleset, by: &By) -> String {
    match by {
        By::Policy(path) => format!("the drop policy of chain {path}"),
        By::Rule(r) => {
            format!("handle {} `{}` in chain {}", r.handle, rule_text_of(rs, r).unwrap_or_default(), r.chain)
        }
    }
}

/// Packets accepted today and dropped (or lost to sight) once untracked.
struct Piece {
    /// What the accepting rule accepts today of the class: the fix accepts
    /// exactly these when untracked (some of them may pass untracked already).
    packets: Packets,
    dropped_by: String,
    certain: bool,
}

fn ct_state_conflicts(rs: &Ruleset, sel: &Selector, out: &mut Vec<Conflict>) {
    for (family, table) in foreign_tables(rs) {
        if !matches!(family.as_str(), "ip" | "ip6" | "inet") {
            continue;
        }
        for chain in rs.table_chains(family, table) {
            let Some(base) = &chain.base else { continue };
            if base.kind != "filter"
                || !matches!(base.hook.as_str(), "prerouting" | "input" | "forward" | "output" | "postrouting")
            {
                continue;
            }
            // Chains in prerouting/output at or before raw priority see the
            // packets before the notrack rule does.
            if matches!(base.hook.as_str(), "prerouting" | "output") && base.prio <= super::rules::PRIORITY {
                continue;
            }
            for &half in sel.direction.halves() {
                // Pieces by the rule (or policy) that accepts them today.
                let mut pieces: BTreeMap<By, Vec<Piece>> = BTreeMap::new();
                let mut unsure = false;
                for p in classes(sel, half, &base.hook, family, CtState::Untracked) {
                    let before = fate(rs, chain, &p.with_ct(tracked_state(half)));
                    let after = fate(rs, chain, &p);
                    unsure |= !before.unsure.is_empty() || !after.unsure.is_empty();
                    for (ok, by) in &before.accepted {
                        for (gone, drop_by) in &after.dropped {
                            if ok.meet(gone).is_some() {
                                pieces.entry(by.clone()).or_default().push(Piece {
                                    packets: ok.clone(),
                                    dropped_by: by_text(rs, drop_by),
                                    certain: true,
                                });
                            }
                        }
                        for (lost, r, what) in &after.unknown {
                            if ok.meet(lost).is_some() {
                                let dropped_by = format!("handle {} in chain {} ({what})", r.handle, r.chain);
                                pieces.entry(by.clone()).or_default().push(Piece {
                                    packets: ok.clone(),
                                    dropped_by,
                                    certain: false,
                                });
                            }
                        }
                    }
                }
                for (accepted_by, pieces) in pieces {
                    out.push(ct_state_conflict(rs, chain, sel, half, &accepted_by, &pieces, unsure));
                }
            }
        }
    }
}

fn ct_state_conflict(
    rs: &Ruleset,
    chain: &Chain,
    sel: &Selector,
    half: Half,
    accepted_by: &By,
    pieces: &[Piece],
    unsure: bool,
) -> Conflict {
    let certain = !unsure && pieces.iter().all(|p| p.certain);
    let severity = if certain { Severity::Refuse } else { Severity::Warn };
    let hook = chain.base.as_ref().map_or("?", |b| b.hook.as_str());
    let input_iface = hook != "output";
    let what = matches_text(&half_matches(sel, half, input_iface));
    let state = tracked_state(half).name();
    let mut dropped: Vec<&str> = Vec::new();
    for p in pieces {
        if !dropped.contains(&p.dropped_by.as_str()) {
            dropped.push(&p.dropped_by);
        }
    }
    let (table, chain_name, handle, rule, today, position) = match accepted_by {
        By::Rule(r) => {
            let (t, c, h) = rule_location(r);
            (t, c, h, rule_text_of(rs, r), format!("accepted today as `{state}` by this rule"), Some(r))
        }
        By::Policy(_) => (
            Some(format!("{} {}", chain.family, chain.table)),
            Some(chain.name.clone()),
            None,
            None,
            format!("accepted today as `{state}` by the policy of chain {}", chain.path()),
            None,
        ),
    };
    let affected = fix_matches(pieces, input_iface);
    let message = format!(
        "{} packets of the bypassed flows ({what}) pass base chain {} (hook {hook}); {affected_part} are {today}. Untracked, they {} {}",
        half.as_str(),
        chain.path(),
        if certain { "are dropped by" } else { "may be dropped by" },
        dropped.join(" or "),
        affected_part = if affected.len() == 1 && affected[0] == what {
            "they".to_string()
        } else {
            format!("those matching `{}`", affected.join("` or `"))
        },
    );
    // Accept the untracked packets just where the tracked ones are accepted
    // today -- after whatever runs before that rule (blocklists, limits) --
    // and only those.
    let fix = affected
        .iter()
        .map(|m| match position {
            Some(r) => format!(
                "nft insert rule {} {} {} position {} ct state untracked {m} accept",
                r.family, r.table, r.chain, r.handle
            ),
            None => {
                format!("nft insert rule {} {} {} ct state untracked {m} accept", chain.family, chain.table, chain.name)
            }
        })
        .collect();
    Conflict { severity, kind: Kind::CtState, table, chain: chain_name, handle, rule, half: Some(half), message, fix }
}

/// nft matches for the pieces, merged: port sets of the same protocol and
/// other fields are united, then protocols with the same ports share a rule.
fn fix_matches(pieces: &[Piece], input_iface: bool) -> Vec<String> {
    // (addresses and interface, which port fields are narrowed) -> proto -> (sport, dport)
    type Ports = (Option<RangeSet>, Option<RangeSet>);
    let mut groups: BTreeMap<String, BTreeMap<u8, Ports>> = BTreeMap::new();
    for p in pieces {
        let b = &p.packets;
        let mut other = Vec::new();
        match (&b.iif, &b.oif, input_iface) {
            (Iface::Named(n), _, true) => other.push(format!("iifname \"{n}\"")),
            (_, Iface::Named(n), false) => other.push(format!("oifname \"{n}\"")),
            _ => {}
        }
        for (set, field) in [(&b.saddr, "saddr"), (&b.daddr, "daddr")] {
            if !set.is_full() {
                other.push(format!("{} {field} {}", b.family.nft_ip(), addr_set_text(b.family, set)));
            }
        }
        let narrowed = |s: &RangeSet| (!s.is_full() && has_ports(b.proto)).then(|| s.clone());
        let (sp, dp) = (narrowed(&b.sport), narrowed(&b.dport));
        let key = format!("{}|{}|{}", other.join(" "), sp.is_some(), dp.is_some());
        let entry = groups.entry(key).or_default().entry(b.proto).or_insert((None, None));
        let unite = |a: &Option<RangeSet>, b: Option<RangeSet>| match (a, b) {
            (Some(x), Some(y)) => Some(x.union(&y)),
            (_, y) => y,
        };
        *entry = (unite(&entry.0, sp), unite(&entry.1, dp));
    }
    let mut out = Vec::new();
    for (key, protos) in groups {
        let other = key.split('|').next().unwrap_or_default().to_string();
        // Protocols with identical ports share one rule.
        let mut by_ports: Vec<(Ports, Vec<u8>)> = Vec::new();
        for (proto, ports) in protos {
            match by_ports.iter_mut().find(|(p, _)| *p == ports) {
                Some((_, list)) => list.push(proto),
                None => by_ports.push((ports, vec![proto])),
            }
        }
        for ((sport, dport), list) in by_ports {
            let mut m = Vec::new();
            if !other.is_empty() {
                m.push(other.clone());
            }
            let names: Vec<String> = list
                .iter()
                .map(|p| crate::bypass::rules::nft_proto_name(*p).map_or_else(|| p.to_string(), str::to_string))
                .collect();
            let set_text = |s: &RangeSet| {
                let items: Vec<String> = s
                    .ranges()
                    .iter()
                    .map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
                    .collect();
                if items.len() == 1 { items[0].clone() } else { format!("{{ {} }}", items.join(", ")) }
            };
            let ports: Vec<(&str, &RangeSet)> = [("sport", &sport), ("dport", &dport)]
                .into_iter()
                .filter_map(|(f, s)| s.as_ref().map(|s| (f, s)))
                .collect();
            let proto_word = if names.len() == 1 && !ports.is_empty() {
                names[0].clone()
            } else {
                m.push(format!(
                    "meta l4proto {}",
                    if names.len() == 1 { names[0].clone() } else { format!("{{ {} }}", names.join(", ")) }
                ));
                "th".to_string()
            };
            for (field, set) in ports {
                m.push(format!("{proto_word} {field} {}", set_text(set)));
            }
            out.push(m.join(" "));
        }
    }
    out
}

/// Addresses as nft writes them: prefixes where the ranges align, `a-b` otherwise.
fn addr_set_text(family: Family, set: &RangeSet) -> String {
    let addr = |v: u128| -> String {
        match family {
            Family::V4 => std::net::Ipv4Addr::from(v as u32).to_string(),
            Family::V6 => std::net::Ipv6Addr::from(v).to_string(),
        }
    };
    let bits = if family == Family::V4 { 32 } else { 128 };
    let items: Vec<String> = set
        .ranges()
        .iter()
        .map(|&(lo, hi)| {
            let size = hi - lo;
            let aligned = size.checked_add(1).is_some_and(|n| n.is_power_of_two() && lo % n == 0);
            if lo == hi {
                addr(lo)
            } else if aligned {
                let host_bits = (size + 1).trailing_zeros();
                format!("{}/{}", addr(lo), bits - host_bits)
            } else if size == family.max() {
                format!("{}/0", addr(0))
            } else {
                format!("{}-{}", addr(lo), addr(hi))
            }
        })
        .collect();
    if items.len() == 1 { items[0].clone() } else { format!("{{ {} }}", items.join(", ")) }
}

/// The worst severity, if any.
pub fn worst(conflicts: &[Conflict]) -> Option<Severity> {
    conflicts.iter().map(|c| c.severity).max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bypass::selector::SelectorInput;

    fn sel(ports: &str, protos: &str) -> Selector {
        Selector::parse(&SelectorInput {
            ports: vec![ports.into()],
            protos: if protos.is_empty() { vec![] } else { vec![protos.into()] },
            ..Default::default()
        })
        .unwrap()
    }

    fn fixture(name: &str) -> Ruleset {
        let text = match name {
            "hardened" => include_str!("fixtures/hardened.json"),
            "untracked_ok" => include_str!("fixtures/untracked_ok.json"),
            "vmap" => include_str!("fixtures/vmap.json"),
            "helper" => include_str!("fixtures/helper.json"),
            _ => unreachable!(),
        };
        Ruleset::parse_str(text).unwrap()
    }

    type Summary = (Severity, Kind, Option<String>, Option<u64>, Option<Half>);

    fn kinds(c: &[Conflict]) -> Vec<Summary> {
        c.iter().map(|c| (c.severity, c.kind, c.chain.clone(), c.handle, c.half)).collect()
    }

    #[test]
    fn an_empty_ruleset_has_no_conflicts() {
        let rs = Ruleset::parse_str(r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}]}"#).unwrap();
        assert!(analyze(&rs, &sel("80,15000", "tcp"), &Environment::default()).is_empty());
    }

    #[test]
    fn nat_rules_on_the_same_traffic_refuse() {
        let rs = fixture("hardened");
        // dnat on tcp dport 8080: the bypass of 8080 selects those flows.
        let c = analyze(&rs, &sel("8080", "tcp"), &Environment::default());
        let nat: Vec<&Conflict> = c.iter().filter(|c| c.kind == Kind::Nat).collect();
        assert_eq!(nat.len(), 2, "{c:#?}");
        assert_eq!(nat[0].table.as_deref(), Some("ip nat"));
        assert_eq!(nat[0].chain.as_deref(), Some("prerouting"));
        assert_eq!(nat[0].handle, Some(3));
        assert_eq!(nat[0].rule.as_deref(), Some("tcp dport 8080 dnat to 10.0.0.5:80"));
        assert_eq!(nat[0].severity, Severity::Refuse);
        // The masquerade of 172.17.0.0/16 catches part of any flow selection.
        assert_eq!(nat[1].rule.as_deref(), Some("ip saddr 172.17.0.0/16 oifname \"eth0\" masquerade"));
        // A bypass limited to other sources leaves both rules alone.
        let narrow = Selector::parse(&SelectorInput {
            ports: vec!["8081".into()],
            protos: vec!["tcp".into()],
            src: Some("192.168.0.0/16".into()),
            ..Default::default()
        })
        .unwrap();
        let c = analyze(&rs, &narrow, &Environment::default());
        assert!(c.iter().all(|c| c.kind != Kind::Nat), "{c:#?}");
        // IPv6-only selections cannot meet an `ip` NAT table.
        let v6 = Selector::parse(&SelectorInput {
            ports: vec!["8080".into()],
            dst: Some("fd00::/8".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(analyze(&rs, &v6, &Environment::default()).iter().all(|c| c.kind != Kind::Nat));
    }

    #[test]
    fn ct_state_policy_with_drop_refuses_and_names_the_fix() {
        let rs = fixture("hardened");
        let c = analyze(&rs, &sel("80", "tcp"), &Environment::default());
        let ct: Vec<&Conflict> = c.iter().filter(|c| c.kind == Kind::CtState).collect();
        assert_eq!(
            kinds(&ct.iter().map(|c| (*c).clone()).collect::<Vec<_>>()),
            vec![
                (Severity::Refuse, Kind::CtState, Some("input".into()), Some(8), Some(Half::Request)),
                (Severity::Refuse, Kind::CtState, Some("input".into()), Some(4), Some(Half::Reply)),
            ],
            "{ct:#?}"
        );
        assert_eq!(ct[0].rule.as_deref(), Some("tcp dport 80 ct state new accept"));
        assert_eq!(ct[0].fix, ["nft insert rule inet filter input position 8 ct state untracked tcp dport 80 accept"]);
        assert!(ct[0].message.contains("dropped by the drop policy of chain inet filter input"), "{}", ct[0].message);
        assert_eq!(ct[1].rule.as_deref(), Some("ct state established,related accept"));
        assert_eq!(ct[1].fix, ["nft insert rule inet filter input position 4 ct state untracked tcp sport 80 accept"]);
        // Of ports 80 and 15000 only 80 was open: the fix opens no more.
        let c = analyze(&rs, &sel("80,15000", "tcp"), &Environment::default());
        let req = c.iter().find(|c| c.kind == Kind::CtState && c.half == Some(Half::Request)).unwrap();
        assert_eq!(req.severity, Severity::Refuse, "{req:#?}");
        assert!(
            req.message.contains("those matching `tcp dport 80` are accepted today as `new` by this rule"),
            "{}",
            req.message
        );
        assert_eq!(req.fix, ["nft insert rule inet filter input position 8 ct state untracked tcp dport 80 accept"]);
        // Port 22 is accepted without conntrack: requests pass untracked; the
        // replies of outgoing ssh connections do not.
        let c = analyze(&rs, &sel("22", "tcp"), &Environment::default());
        let nat: Vec<&Conflict> = c.iter().filter(|c| c.kind == Kind::Nat).collect();
        assert_eq!(nat.len(), 1, "the masquerade of 172.17.0.0/16 overlaps every port: {c:#?}");
        let c: Vec<Conflict> = c.into_iter().filter(|c| c.kind == Kind::CtState).collect();
        assert_eq!(
            kinds(&c),
            vec![(Severity::Refuse, Kind::CtState, Some("input".into()), Some(4), Some(Half::Reply))],
            "{c:#?}"
        );
    }

    #[test]
    fn an_untracked_accept_resolves_the_ct_state_conflict() {
        let rs = fixture("untracked_ok");
        assert!(analyze(&rs, &sel("80,15000", "tcp"), &Environment::default()).is_empty());
    }

    #[test]
    fn vmaps_and_jumps_are_followed() {
        let rs = fixture("vmap");
        let c = analyze(&rs, &sel("443", "tcp"), &Environment::default());
        // Requests to 443 are accepted in chain `allowed`; replies from 443
        // were accepted by the vmap as established and would hit the reject.
        assert_eq!(
            kinds(&c),
            vec![(Severity::Refuse, Kind::CtState, Some("inbound".into()), Some(4), Some(Half::Reply))],
            "{c:#?}"
        );
        assert!(c[0].message.contains("handle 7 `reject with icmpx admin-prohibited`"), "{}", c[0].message);
        // Port 8443 was never accepted: nothing to break for requests; replies still.
        let c = analyze(&rs, &sel("8443", "tcp"), &Environment::default());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].half, Some(Half::Reply));
    }

    #[test]
    fn helpers_on_the_same_traffic_refuse_and_unreadable_nat_warns() {
        let rs = fixture("helper");
        let c = analyze(&rs, &sel("21", "tcp"), &Environment::default());
        let helper: Vec<&Conflict> = c.iter().filter(|c| c.kind == Kind::Helper).collect();
        assert_eq!(helper.len(), 1, "{c:#?}");
        assert_eq!(helper[0].severity, Severity::Refuse);
        assert_eq!(helper[0].table.as_deref(), Some("inet raw"));
        assert_eq!(helper[0].handle, Some(3));
        assert!(helper[0].message.contains("ftp over tcp"), "{}", helper[0].message);
        // `meta mark 0x10 masquerade` in an ip6 nat table: undecidable, a warning.
        let nat: Vec<&Conflict> = c.iter().filter(|c| c.kind == Kind::Nat).collect();
        assert_eq!(nat.len(), 1);
        assert_eq!(nat[0].severity, Severity::Warn);
        assert_eq!(nat[0].table.as_deref(), Some("ip6 nat6"));
        // Other ports do not meet the helper.
        let c = analyze(&rs, &sel("80", "tcp"), &Environment::default());
        assert!(c.iter().all(|c| c.kind != Kind::Helper));
    }

    #[test]
    fn iptables_nft_xt_rules_in_nat_tables_warn() {
        let rs = Ruleset::parse(&serde_json::json!({ "nftables": [
            { "table": { "family": "ip", "name": "nat" } },
            { "chain": { "family": "ip", "table": "nat", "name": "POSTROUTING", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept" } },
            { "rule": { "family": "ip", "table": "nat", "chain": "POSTROUTING", "handle": 5, "expr": [
                { "xt": { "type": "match", "name": "addrtype" } },
                { "counter": { "packets": 0, "bytes": 0 } },
                { "xt": { "type": "target", "name": "MASQUERADE" } }
            ] } }
        ] }))
        .unwrap();
        let c = analyze(&rs, &sel("53", "udp"), &Environment::default());
        assert_eq!(kinds(&c), vec![(Severity::Warn, Kind::Nat, Some("POSTROUTING".into()), Some(5), None)]);
        assert!(c[0].rule.as_deref().unwrap().contains("xt target \"MASQUERADE\""));
    }

    #[test]
    fn ctguards_own_table_is_ignored() {
        let rs = Ruleset::parse(&serde_json::json!({ "nftables": [
            { "table": { "family": "inet", "name": "ctguard" } },
            { "chain": { "family": "inet", "table": "ctguard", "name": "prerouting", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "drop" } },
            { "rule": { "family": "inet", "table": "ctguard", "chain": "prerouting", "handle": 2, "expr": [ { "masquerade": null } ] } }
        ] }))
        .unwrap();
        assert!(analyze(&rs, &sel("80", "tcp"), &Environment::default()).is_empty());
    }

    #[test]
    fn one_direction_and_legacy_iptables_warn() {
        let rs = Ruleset::default();
        let mut s = sel("80", "tcp");
        s.direction = Direction::In;
        let env = Environment { legacy_iptables: vec!["filter".into(), "mangle".into()] };
        let c = analyze(&rs, &s, &env);
        assert_eq!(
            c.iter().map(|c| (c.severity, c.kind)).collect::<Vec<_>>(),
            vec![(Severity::Warn, Kind::OneDirection), (Severity::Warn, Kind::LegacyIptables)]
        );
        assert!(c[0].text().contains("replies"), "{}", c[0].text());
    }
}
