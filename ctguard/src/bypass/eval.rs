//! Abstract evaluation of nft rules over *classes* of packets instead of
//! single packets: one protocol and IP version, sets of addresses and ports,
//! an interface, a conntrack state -- a "box" of packets.
//!
//! For the NAT and helper checks a rule's matches relate to a class as
//! `Never` (no packet of it matches), `Always`, `Some` (a known, non-empty
//! part) or `Unknown` (marks, named sets, raw payloads: ctguard cannot
//! tell). For the `ct state` check, [`fate`] pushes a class through a base
//! chain: each rule splits every box into the part it matches and the rest
//! (exact set arithmetic on each field), verdicts take their part, jumps and
//! gotos carry theirs into the target chain, and what falls off the end
//! meets the policy. The result says which packets are accepted and dropped
//! by which rule; conditions ctguard cannot read leave the box whole and
//! mark the result unsure.
use serde_json::Value;

use super::{
    ranges::RangeSet,
    ruleset::{Chain, Rule, Ruleset},
    selector::{Family, cidr_range, has_ports, parse_proto},
};
use crate::util::Cidr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rel {
    Never,
    Some,
    Unknown,
    Always,
}

impl Rel {
    /// Conjunction: both must hold.
    pub fn and(self, other: Rel) -> Rel {
        use Rel::*;
        match (self, other) {
            (Never, _) | (_, Never) => Never,
            (Unknown, _) | (_, Unknown) => Unknown,
            (Some, _) | (_, Some) => Some,
            (Always, Always) => Always,
        }
    }

    fn negate(self) -> Rel {
        match self {
            Rel::Never => Rel::Always,
            Rel::Always => Rel::Never,
            other => other,
        }
    }

    /// How the packets' possible values relate to the values a rule accepts.
    pub fn of_sets(packets: &RangeSet, rule: &RangeSet) -> Rel {
        if packets.is_subset_of(rule) {
            Rel::Always
        } else if packets.is_disjoint(rule) {
            Rel::Never
        } else {
            Rel::Some
        }
    }
}

/// Conntrack state of the class (`ct state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtState {
    Invalid,
    Established,
    Related,
    New,
    Untracked,
}

impl CtState {
    const ALL: [CtState; 5] =
        [CtState::Invalid, CtState::Established, CtState::Related, CtState::New, CtState::Untracked];

    pub fn name(self) -> &'static str {
        match self {
            CtState::Invalid => "invalid",
            CtState::Established => "established",
            CtState::Related => "related",
            CtState::New => "new",
            CtState::Untracked => "untracked",
        }
    }

    fn index(self) -> u128 {
        CtState::ALL.iter().position(|s| *s == self).unwrap_or(0) as u128
    }

    fn parse(s: &str) -> Option<CtState> {
        CtState::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// An interface of the class: unknown, a name (or `prefix*` pattern), none
/// at all (locally generated packets have no input interface), or any but
/// some names (what is left after a rule took those).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Iface {
    Any,
    Named(String),
    Absent,
    AnyExcept(Vec<String>),
}

/// The class of packets being evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packets {
    pub family: Family,
    pub proto: u8,
    pub saddr: RangeSet,
    pub daddr: RangeSet,
    pub sport: RangeSet,
    pub dport: RangeSet,
    pub iif: Iface,
    pub oif: Iface,
    pub ct: CtState,
}

impl Packets {
    /// Every packet of one family and protocol.
    pub fn any(family: Family, proto: u8, ct: CtState) -> Packets {
        Packets {
            family,
            proto,
            saddr: RangeSet::full(family.max()),
            daddr: RangeSet::full(family.max()),
            sport: RangeSet::full(65535),
            dport: RangeSet::full(65535),
            iif: Iface::Any,
            oif: Iface::Any,
            ct,
        }
    }

    pub fn with_ct(&self, ct: CtState) -> Packets {
        Packets { ct, ..self.clone() }
    }
}

/// Fields a match can compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Proto,
    Family,
    Saddr,
    Daddr,
    Sport,
    Dport,
    Iif,
    Oif,
    CtState,
}

/// What the left side of a match reads: `Err(rel)` when the expression
/// settles the match by itself (a header the class does not have: Never;
/// something ctguard does not model: Unknown).
fn classify(left: &Value, p: &Packets) -> Result<Key, Rel> {
    let Some((kind, body)) = left.as_object().and_then(|o| o.iter().next()) else { return Err(Rel::Unknown) };
    match kind.as_str() {
        "payload" => {
            let (Some(proto), Some(field)) = (body["protocol"].as_str(), body["field"].as_str()) else {
                return Err(Rel::Unknown); // raw payload
            };
            match proto {
                "ip" | "ip6" => {
                    let fam = if proto == "ip" { Family::V4 } else { Family::V6 };
                    if fam != p.family {
                        return Err(Rel::Never);
                    }
                    match field {
                        "saddr" => Ok(Key::Saddr),
                        "daddr" => Ok(Key::Daddr),
                        "protocol" | "nexthdr" => Ok(Key::Proto),
                        _ => Err(Rel::Unknown),
                    }
                }
                "th" => {
                    if !has_ports(p.proto) {
                        return Err(Rel::Never);
                    }
                    port_key(field)
                }
                "ether" | "vlan" | "arp" | "rt" | "rt0" | "rt2" | "srh" | "hbh" | "frag" | "dst" | "mh" => {
                    Err(Rel::Unknown)
                }
                other => match header_proto(other) {
                    Some(n) if n != p.proto => Err(Rel::Never),
                    Some(_) => port_key(field),
                    None => Err(Rel::Unknown),
                },
            }
        }
        "meta" => match body["key"].as_str().unwrap_or("") {
            "l4proto" => Ok(Key::Proto),
            "nfproto" | "protocol" => Ok(Key::Family),
            "iifname" | "iif" => Ok(Key::Iif),
            "oifname" | "oif" => Ok(Key::Oif),
            _ => Err(Rel::Unknown),
        },
        "ct" if body["key"] == "state" && body.get("dir").is_none() => Ok(Key::CtState),
        _ => Err(Rel::Unknown),
    }
}

/// The IP protocol of a header name nft uses (`tcp`, `esp`, ...).
fn header_proto(name: &str) -> Option<u8> {
    match name {
        "igmp" => Some(2),
        "gre" => Some(47),
        "esp" => Some(50),
        "ah" => Some(51),
        "comp" => Some(108),
        _ => parse_proto(name).ok(),
    }
}

fn port_key(field: &str) -> Result<Key, Rel> {
    match field {
        "sport" => Ok(Key::Sport),
        "dport" => Ok(Key::Dport),
        _ => Err(Rel::Unknown),
    }
}

/// The plain values on the right side of a match (sets, lists and `elem`
/// wrappers flattened), or `None` when they include something ctguard
/// cannot read (a named set, a concatenation, a map).
fn atoms(right: &Value) -> Option<Vec<&Value>> {
    let mut out = Vec::new();
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>) -> bool {
        match v {
            Value::Array(items) => items.iter().all(|i| walk(i, out)),
            Value::Object(o) if o.contains_key("set") => match &o["set"] {
                Value::Array(items) => items.iter().all(|i| walk(i, out)),
                other => walk(other, out),
            },
            Value::Object(o) if o.contains_key("elem") => walk(&o["elem"]["val"], out),
            Value::Object(o) if o.contains_key("range") || o.contains_key("prefix") => {
                out.push(v);
                true
            }
            Value::String(s) if s.starts_with('@') => false,
            Value::String(_) | Value::Number(_) => {
                out.push(v);
                true
            }
            _ => false,
        }
    }
    walk(right, &mut out).then_some(out)
}

fn service_port(name: &str) -> Option<u128> {
    Some(match name {
        "ftp" => 21,
        "ssh" => 22,
        "telnet" => 23,
        "smtp" => 25,
        "domain" => 53,
        "http" => 80,
        "ntp" => 123,
        "https" => 443,
        "sip" => 5060,
        _ => return name.parse().ok(),
    })
}

/// The value one atom stands for, as ranges in `key`'s domain.
fn atom_ranges(key: Key, family: Family, atom: &Value) -> Option<Vec<(u128, u128)>> {
    let scalar = |v: &Value| -> Option<u128> {
        match key {
            Key::Proto => match v {
                Value::Number(n) => n.as_u64().map(u128::from),
                Value::String(s) => header_proto(s).map(u128::from),
                _ => None,
            },
            Key::Family => match v.as_str() {
                Some("ipv4" | "ip") => Some(0),
                Some("ipv6" | "ip6") => Some(1),
                _ => match v.as_u64() {
                    Some(2 | 0x0800) => Some(0),
                    Some(10 | 0x86dd) => Some(1),
                    _ => None,
                },
            },
            Key::Sport | Key::Dport => match v {
                Value::Number(n) => n.as_u64().map(u128::from),
                Value::String(s) => service_port(s),
                _ => None,
            },
            Key::Saddr | Key::Daddr => {
                let addr: std::net::IpAddr = v.as_str()?.parse().ok()?;
                (Family::of(&addr) == family).then(|| match addr {
                    std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
                    std::net::IpAddr::V6(a) => u128::from(a),
                })
            }
            Key::CtState => v.as_str().and_then(CtState::parse).map(CtState::index),
            Key::Iif | Key::Oif => None,
        }
    };
    if let Some(r) = atom.get("range").and_then(Value::as_array) {
        let (lo, hi) = (scalar(r.first()?)?, scalar(r.get(1)?)?);
        return Some(vec![(lo, hi)]);
    }
    if let Some(pfx) = atom.get("prefix") {
        let addr: std::net::IpAddr = pfx["addr"].as_str()?.parse().ok()?;
        if Family::of(&addr) != family {
            return Some(vec![]);
        }
        let cidr = Cidr { addr, prefix: u8::try_from(pfx["len"].as_u64()?).ok()? };
        return Some(cidr_range(cidr).ranges().to_vec());
    }
    scalar(atom).map(|v| vec![(v, v)])
}

fn domain_max(key: Key, family: Family) -> u128 {
    match key {
        Key::Proto => 255,
        Key::Family => 1,
        Key::Sport | Key::Dport => 65535,
        Key::Saddr | Key::Daddr => family.max(),
        Key::CtState => (CtState::ALL.len() - 1) as u128,
        Key::Iif | Key::Oif => 0,
    }
}

fn packet_set(key: Key, p: &Packets) -> RangeSet {
    match key {
        Key::Proto => RangeSet::single(u128::from(p.proto), 255),
        Key::Family => RangeSet::single(if p.family == Family::V4 { 0 } else { 1 }, 1),
        Key::Saddr => p.saddr.clone(),
        Key::Daddr => p.daddr.clone(),
        Key::Sport => p.sport.clone(),
        Key::Dport => p.dport.clone(),
        Key::CtState => RangeSet::single(p.ct.index(), domain_max(Key::CtState, p.family)),
        Key::Iif | Key::Oif => RangeSet::empty(0),
    }
}

/// The set of values a match's right side (with its operator) accepts.
fn rule_set(key: Key, op: &str, right: &Value, family: Family) -> Option<RangeSet> {
    let max = domain_max(key, family);
    let atoms = atoms(right)?;
    let mut ranges = Vec::new();
    for a in &atoms {
        ranges.extend(atom_ranges(key, family, a)?);
    }
    let set = RangeSet::from_ranges(ranges, max);
    match op {
        "==" | "in" => Some(set),
        "!=" => Some(set.complement()),
        "<" | "<=" | ">" | ">=" => {
            let [(v, _)] = set.ranges() else { return None };
            let v = *v;
            Some(match op {
                "<" if v == 0 => RangeSet::empty(max),
                "<" => RangeSet::from_ranges([(0, v - 1)], max),
                "<=" => RangeSet::from_ranges([(0, v)], max),
                ">" => RangeSet::from_ranges([(v.saturating_add(1), max)], max),
                _ => RangeSet::from_ranges([(v, max)], max),
            })
        }
        _ => None,
    }
}

/// How one interface name pattern of the class relates to one of a rule.
fn iface_pattern_rel(ours: &str, theirs: &str) -> Rel {
    match (ours.strip_suffix('*'), theirs.strip_suffix('*')) {
        (None, None) => {
            if ours == theirs {
                Rel::Always
            } else {
                Rel::Never
            }
        }
        (None, Some(tp)) => {
            if ours.starts_with(tp) {
                Rel::Always
            } else {
                Rel::Never
            }
        }
        (Some(op), None) => {
            if theirs.starts_with(op) {
                Rel::Some
            } else {
                Rel::Never
            }
        }
        (Some(op), Some(tp)) => {
            if op.starts_with(tp) {
                Rel::Always
            } else if tp.starts_with(op) {
                Rel::Some
            } else {
                Rel::Never
            }
        }
    }
}

fn iface_rel(ours: &Iface, op: &str, right: &Value) -> Rel {
    let Some(atoms) = atoms(right) else { return Rel::Unknown };
    let names: Option<Vec<&str>> = atoms.iter().map(|a| a.as_str()).collect();
    let Some(names) = names else { return Rel::Unknown };
    let rel = match ours {
        Iface::Absent => Rel::Never,
        Iface::Any => {
            if names.contains(&"*") {
                Rel::Always
            } else {
                Rel::Some
            }
        }
        Iface::AnyExcept(except) => {
            if names.iter().all(|n| excluded(except, n)) {
                Rel::Never
            } else {
                Rel::Some
            }
        }
        Iface::Named(n) => {
            let rels: Vec<Rel> = names.iter().map(|t| iface_pattern_rel(n, t)).collect();
            if rels.contains(&Rel::Always) {
                Rel::Always
            } else if rels.contains(&Rel::Some) {
                Rel::Some
            } else {
                Rel::Never
            }
        }
    };
    match op {
        "==" | "in" => rel,
        "!=" => rel.negate(),
        _ => Rel::Unknown,
    }
}

/// How one `match` statement relates to the class.
pub fn match_rel(m: &Value, p: &Packets) -> Rel {
    let op = m["op"].as_str().unwrap_or("==");
    let key = match classify(&m["left"], p) {
        Ok(k) => k,
        Err(rel) => return rel,
    };
    match key {
        Key::Iif => iface_rel(&p.iif, op, &m["right"]),
        Key::Oif => iface_rel(&p.oif, op, &m["right"]),
        _ => match rule_set(key, op, &m["right"], p.family) {
            Some(set) => Rel::of_sets(&packet_set(key, p), &set),
            None => Rel::Unknown,
        },
    }
}

/// What a rule does to the packets it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// No verdict: evaluation continues with the next rule.
    Continue,
    Accept,
    Drop,
    Jump(String),
    Goto(String),
    Return,
    /// A verdict ctguard cannot follow (queue, fwd, an unreadable map).
    Unknown(String),
}

fn verdict_action(v: &Value) -> Option<Action> {
    let (k, body) = v.as_object()?.iter().next()?;
    Some(match k.as_str() {
        "accept" => Action::Accept,
        "drop" | "reject" => Action::Drop,
        "continue" => Action::Continue,
        "return" => Action::Return,
        "jump" => Action::Jump(body["target"].as_str()?.to_string()),
        "goto" => Action::Goto(body["target"].as_str()?.to_string()),
        _ => return None,
    })
}

/// A verdict map: the verdict of the element the class's value falls in.
fn vmap_action(body: &Value, p: &Packets) -> (Rel, Action) {
    let Some(items) = body["data"]["set"].as_array() else { return (Rel::Unknown, Action::Unknown("vmap".into())) };
    let key = match classify(&body["key"], p) {
        Ok(k) => k,
        Err(Rel::Never) => return (Rel::Never, Action::Continue),
        Err(_) => return (Rel::Unknown, Action::Unknown("vmap".into())),
    };
    let mut hits = Vec::new();
    for item in items {
        let Some([k, verdict]) = item.as_array().map(Vec::as_slice) else {
            return (Rel::Unknown, Action::Unknown("vmap".into()));
        };
        let rel = match key {
            Key::Iif => iface_rel(&p.iif, "==", k),
            Key::Oif => iface_rel(&p.oif, "==", k),
            _ => match rule_set(key, "==", k, p.family) {
                Some(set) => Rel::of_sets(&packet_set(key, p), &set),
                None => Rel::Unknown,
            },
        };
        if rel != Rel::Never {
            hits.push((rel, verdict_action(verdict)));
        }
    }
    match hits.as_slice() {
        [] => (Rel::Never, Action::Continue),
        [(rel, Some(action))] => (*rel, action.clone()),
        _ => (Rel::Unknown, Action::Unknown("vmap".into())),
    }
}

/// One rule evaluated against a class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleEval {
    /// Whether the rule's conditions hold (before its verdict).
    pub rel: Rel,
    pub action: Action,
    /// It translates addresses (snat, dnat, masquerade, redirect).
    pub nat: bool,
    /// It assigns a conntrack helper.
    pub helper: bool,
    /// It holds statements ctguard does not know (iptables-nft `xt`, ...).
    pub opaque: bool,
}

pub fn eval_rule(expr: &[Value], p: &Packets) -> RuleEval {
    let mut ev = RuleEval { rel: Rel::Always, action: Action::Continue, nat: false, helper: false, opaque: false };
    for stmt in expr {
        let Some((kind, body)) = stmt.as_object().and_then(|o| o.iter().next()) else {
            ev.rel = ev.rel.and(Rel::Unknown);
            ev.opaque = true;
            continue;
        };
        match kind.as_str() {
            "match" => ev.rel = ev.rel.and(match_rel(body, p)),
            "accept" | "drop" | "reject" | "continue" | "return" | "jump" | "goto" => {
                ev.action = verdict_action(stmt).unwrap_or(Action::Unknown(kind.clone()));
                break;
            }
            "vmap" => {
                let (rel, action) = vmap_action(body, p);
                ev.rel = ev.rel.and(rel);
                ev.action = action;
                break;
            }
            "snat" | "dnat" | "masquerade" | "redirect" => {
                ev.nat = true;
                break;
            }
            "ct helper" => ev.helper = true,
            // Statements that only let some packets through.
            "limit" | "quota" | "ct count" => ev.rel = ev.rel.and(Rel::Some),
            // Statements without a bearing on matching or the verdict.
            "counter" | "log" | "notrack" | "mangle" | "set" | "map" | "dup" | "last" | "ct timeout"
            | "ct expectation" | "flow" | "meter" | "secmark" => {}
            "queue" | "fwd" | "tproxy" | "synproxy" => {
                ev.action = Action::Unknown(kind.clone());
                break;
            }
            _ => {
                // `xt` (iptables-nft compatibility) and anything newer.
                ev.opaque = true;
                ev.rel = ev.rel.and(Rel::Unknown);
                if kind == "xt" && body["type"] == "target" {
                    ev.action = Action::Unknown(format!("xt target {}", body["name"].as_str().unwrap_or("?")));
                    break;
                }
            }
        }
        if ev.rel == Rel::Never {
            break;
        }
    }
    ev
}

/// A rule by position, for reports.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
}

impl RuleRef {
    pub fn of(r: &Rule) -> RuleRef {
        RuleRef { family: r.family.clone(), table: r.table.clone(), chain: r.chain.clone(), handle: r.handle }
    }
}

/// What decided the fate of some packets.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum By {
    Rule(RuleRef),
    /// The base chain's policy (`family table chain`).
    Policy(String),
}

/// A condition of a rule on one field, for splitting classes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Constraint {
    Num(Key, RangeSet),
    /// `iifname`/`iif` (input) or `oifname`/`oif`; `eq` false for `!=`.
    Iface {
        input: bool,
        eq: bool,
        names: Vec<String>,
    },
}

/// A match as a constraint, or how it settles by itself (Never, Unknown).
fn match_constraint(m: &Value, p: &Packets) -> Result<Constraint, Rel> {
    let op = m["op"].as_str().unwrap_or("==");
    let key = classify(&m["left"], p)?;
    match key {
        Key::Iif | Key::Oif => {
            let eq = match op {
                "==" | "in" => true,
                "!=" => false,
                _ => return Err(Rel::Unknown),
            };
            let atoms = atoms(&m["right"]).ok_or(Rel::Unknown)?;
            let names: Option<Vec<String>> = atoms.iter().map(|a| a.as_str().map(str::to_string)).collect();
            Ok(Constraint::Iface { input: key == Key::Iif, eq, names: names.ok_or(Rel::Unknown)? })
        }
        _ => rule_set(key, op, &m["right"], p.family).map(|s| Constraint::Num(key, s)).ok_or(Rel::Unknown),
    }
}

fn set_field(p: &mut Packets, key: Key, set: RangeSet) {
    match key {
        Key::Saddr => p.saddr = set,
        Key::Daddr => p.daddr = set,
        Key::Sport => p.sport = set,
        Key::Dport => p.dport = set,
        // Single-valued fields: the box is either fully inside or outside.
        _ => {}
    }
}

/// Whether an exclusion list covers interface name (pattern) `n`.
fn excluded(except: &[String], n: &str) -> bool {
    except.iter().any(|e| iface_pattern_rel(n, e) == Rel::Always)
}

/// Splits an interface value by a rule's interface condition:
/// `(inside, outside, exact)`; `exact` is false when the split had to be
/// approximated (a wildcard of ours against a name of theirs).
fn split_iface(cur: &Iface, eq: bool, names: &[String]) -> (Vec<Iface>, Vec<Iface>, bool) {
    let named = |ns: Vec<&String>| ns.into_iter().map(|n| Iface::Named(n.clone())).collect::<Vec<_>>();
    match cur {
        Iface::Absent => {
            if eq {
                (vec![], vec![Iface::Absent], true)
            } else {
                (vec![Iface::Absent], vec![], true)
            }
        }
        Iface::Named(x) => {
            let rels: Vec<Rel> = names.iter().map(|n| iface_pattern_rel(x, n)).collect();
            let hit = rels.contains(&Rel::Always);
            let miss = rels.iter().all(|r| *r == Rel::Never);
            match (hit, miss, eq) {
                (true, _, true) | (false, true, false) => (vec![cur.clone()], vec![], true),
                (true, _, false) | (false, true, true) => (vec![], vec![cur.clone()], true),
                _ => (vec![], vec![cur.clone()], false),
            }
        }
        Iface::Any => {
            let (some, rest) = (named(names.iter().collect()), vec![Iface::AnyExcept(names.to_vec())]);
            if eq { (some, rest, true) } else { (rest, some, true) }
        }
        Iface::AnyExcept(except) => {
            let fresh = named(names.iter().filter(|n| !excluded(except, n)).collect());
            let mut wider = except.clone();
            wider.extend(names.iter().cloned());
            let rest = vec![Iface::AnyExcept(wider)];
            if eq { (fresh, rest, true) } else { (rest, fresh, true) }
        }
    }
}

/// Splits a box by one constraint: `(inside, outside, exact)`.
fn split_one(p: &Packets, c: &Constraint) -> (Vec<Packets>, Vec<Packets>, bool) {
    match c {
        Constraint::Num(key, set) => {
            let field = packet_set(*key, p);
            let (inside, outside) = (field.intersect(set), field.intersect(&set.complement()));
            let with = |s: RangeSet| {
                let mut q = p.clone();
                set_field(&mut q, *key, s);
                q
            };
            let ins = if inside.is_empty() { vec![] } else { vec![with(inside)] };
            let outs = if outside.is_empty() { vec![] } else { vec![with(outside)] };
            (ins, outs, true)
        }
        Constraint::Iface { input, eq, names } => {
            let cur = if *input { &p.iif } else { &p.oif };
            let (ins, outs, exact) = split_iface(cur, *eq, names);
            let with = |i: Iface| {
                let mut q = p.clone();
                if *input {
                    q.iif = i
                } else {
                    q.oif = i
                }
                q
            };
            (ins.into_iter().map(with).collect(), outs.into_iter().map(with).collect(), exact)
        }
    }
}

/// Splits a box by all constraints of a rule: `(matching, not matching, exact)`.
fn split(p: Packets, cs: &[Constraint]) -> (Vec<Packets>, Vec<Packets>, bool) {
    let Some((c, rest)) = cs.split_first() else { return (vec![p], vec![], true) };
    let (ins, mut outs, mut exact) = split_one(&p, c);
    let mut matched = Vec::new();
    for i in ins {
        let (m, r, e) = split(i, rest);
        matched.extend(m);
        outs.extend(r);
        exact &= e;
    }
    (matched, outs, exact)
}

fn iface_meet(a: &Iface, b: &Iface) -> Option<Iface> {
    match (a, b) {
        (Iface::Absent, Iface::Absent) => Some(Iface::Absent),
        (Iface::Absent, _) | (_, Iface::Absent) => None,
        (Iface::Any, x) | (x, Iface::Any) => Some(x.clone()),
        (Iface::Named(x), Iface::Named(y)) => match (iface_pattern_rel(x, y), iface_pattern_rel(y, x)) {
            (Rel::Always, _) => Some(a.clone()),
            (_, Rel::Always) => Some(b.clone()),
            (Rel::Some, _) | (_, Rel::Some) => Some(a.clone()),
            _ => None,
        },
        (Iface::Named(x), Iface::AnyExcept(e)) | (Iface::AnyExcept(e), Iface::Named(x)) => {
            (!excluded(e, x)).then(|| Iface::Named(x.clone()))
        }
        (Iface::AnyExcept(e1), Iface::AnyExcept(e2)) => Some(Iface::AnyExcept(e1.iter().chain(e2).cloned().collect())),
    }
}

impl Packets {
    /// The packets in both boxes, whatever their conntrack state (`self`'s
    /// is kept), or `None`.
    pub fn meet(&self, other: &Packets) -> Option<Packets> {
        if self.family != other.family || self.proto != other.proto {
            return None;
        }
        let m = Packets {
            family: self.family,
            proto: self.proto,
            saddr: self.saddr.intersect(&other.saddr),
            daddr: self.daddr.intersect(&other.daddr),
            sport: self.sport.intersect(&other.sport),
            dport: self.dport.intersect(&other.dport),
            iif: iface_meet(&self.iif, &other.iif)?,
            oif: iface_meet(&self.oif, &other.oif)?,
            ct: self.ct,
        };
        let empty = m.saddr.is_empty() || m.daddr.is_empty() || m.sport.is_empty() || m.dport.is_empty();
        (!empty).then_some(m)
    }
}

/// A rule prepared for one box.
struct Prepared {
    /// The rule cannot match this box.
    never: bool,
    constraints: Vec<Constraint>,
    /// Some condition could not be read: the rule may or may not match.
    unknown: bool,
    action: Action,
    /// A verdict map: `(condition, verdict)` per element, tried in turn.
    vmap: Option<Vec<(Constraint, Action)>>,
}

fn prepare(expr: &[Value], p: &Packets) -> Prepared {
    let mut pr =
        Prepared { never: false, constraints: Vec::new(), unknown: false, action: Action::Continue, vmap: None };
    for stmt in expr {
        let Some((kind, body)) = stmt.as_object().and_then(|o| o.iter().next()) else {
            pr.unknown = true;
            continue;
        };
        match kind.as_str() {
            "match" => match match_constraint(body, p) {
                Ok(c) => pr.constraints.push(c),
                Err(Rel::Never) => {
                    pr.never = true;
                    return pr;
                }
                Err(_) => pr.unknown = true,
            },
            "accept" | "drop" | "reject" | "continue" | "return" | "jump" | "goto" => {
                pr.action = verdict_action(stmt).unwrap_or(Action::Unknown(kind.clone()));
                break;
            }
            "vmap" => {
                let elements = vmap_elements(body, p);
                match elements {
                    Ok(e) => pr.vmap = Some(e),
                    Err(Rel::Never) => pr.never = true,
                    Err(_) => {
                        pr.unknown = true;
                        pr.action = Action::Unknown("vmap".into());
                    }
                }
                break;
            }
            // Translation ends evaluation of a nat chain; not reached in filter chains.
            "snat" | "dnat" | "masquerade" | "redirect" => {
                pr.action = Action::Accept;
                break;
            }
            "limit" | "quota" | "ct count" => pr.unknown = true,
            "ct helper" | "counter" | "log" | "notrack" | "mangle" | "set" | "map" | "dup" | "last" | "ct timeout"
            | "ct expectation" | "flow" | "meter" | "secmark" => {}
            "queue" | "fwd" | "tproxy" | "synproxy" => {
                pr.action = Action::Unknown(kind.clone());
                break;
            }
            _ => {
                pr.unknown = true;
                if kind == "xt" && body["type"] == "target" {
                    pr.action = Action::Unknown(format!("xt target {}", body["name"].as_str().unwrap_or("?")));
                    break;
                }
            }
        }
    }
    pr
}

/// The elements of a verdict map as constraints on its key.
fn vmap_elements(body: &Value, p: &Packets) -> Result<Vec<(Constraint, Action)>, Rel> {
    let items = body["data"]["set"].as_array().ok_or(Rel::Unknown)?;
    let mut out = Vec::new();
    for item in items {
        let Some([k, verdict]) = item.as_array().map(Vec::as_slice) else { return Err(Rel::Unknown) };
        let m = serde_json::json!({ "op": "==", "left": body["key"], "right": k });
        let c = match_constraint(&m, p)?;
        out.push((c, verdict_action(verdict).ok_or(Rel::Unknown)?));
    }
    Ok(out)
}

/// Where the packets of a class end up in one base chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fate {
    pub accepted: Vec<(Packets, By)>,
    pub dropped: Vec<(Packets, By)>,
    /// Packets that reached a verdict ctguard cannot follow.
    pub unknown: Vec<(Packets, RuleRef, String)>,
    /// Rules whose conditions ctguard could not read (their verdict may
    /// apply to packets counted elsewhere), or that it had to approximate.
    pub unsure: Vec<RuleRef>,
}

const MAX_DEPTH: usize = 16;
/// Boxes alive at once before ctguard gives up on a chain.
const MAX_BOXES: usize = 1024;

struct Walker<'a> {
    rs: &'a Ruleset,
    fate: Fate,
}

impl Walker<'_> {
    fn unsure(&mut self, r: &RuleRef) {
        if !self.fate.unsure.contains(r) {
            self.fate.unsure.push(r.clone());
        }
    }

    /// Applies `action` to the boxes a rule matched; returns the boxes that
    /// go on in this chain and those that return from it.
    fn act(
        &mut self,
        chain: &Chain,
        here: &RuleRef,
        action: &Action,
        boxes: Vec<Packets>,
        depth: usize,
    ) -> (Vec<Packets>, Vec<Packets>) {
        match action {
            Action::Continue => (boxes, vec![]),
            Action::Accept => {
                self.fate.accepted.extend(boxes.into_iter().map(|b| (b, By::Rule(here.clone()))));
                (vec![], vec![])
            }
            Action::Drop => {
                self.fate.dropped.extend(boxes.into_iter().map(|b| (b, By::Rule(here.clone()))));
                (vec![], vec![])
            }
            Action::Return => (vec![], boxes),
            Action::Unknown(what) => {
                self.fate.unknown.extend(boxes.into_iter().map(|b| (b, here.clone(), what.clone())));
                (vec![], vec![])
            }
            Action::Jump(target) | Action::Goto(target) => {
                let Some(t) = self.rs.chain(&chain.family, &chain.table, target).filter(|_| depth < MAX_DEPTH) else {
                    let what = format!("jump to chain {target}, which ctguard cannot follow");
                    self.fate.unknown.extend(boxes.into_iter().map(|b| (b, here.clone(), what.clone())));
                    return (vec![], vec![]);
                };
                let back = self.chain(t, boxes, depth + 1);
                if matches!(action, Action::Jump(_)) { (back, vec![]) } else { (vec![], back) }
            }
        }
    }

    /// Evaluates `boxes` through `chain`; returns those that fall off its
    /// end or return from it.
    fn chain(&mut self, chain: &Chain, boxes: Vec<Packets>, depth: usize) -> Vec<Packets> {
        let mut live = boxes;
        let mut returned = Vec::new();
        for rule in &chain.rules {
            if live.is_empty() {
                break;
            }
            if live.len() > MAX_BOXES {
                let here = RuleRef::of(rule);
                let what = "the ruleset splits these packets too finely to follow".to_string();
                self.fate.unknown.extend(live.drain(..).map(|b| (b, here.clone(), what.clone())));
                break;
            }
            let here = RuleRef::of(rule);
            let mut next = Vec::new();
            for b in std::mem::take(&mut live) {
                let pr = prepare(&rule.expr, &b);
                if pr.never {
                    next.push(b);
                    continue;
                }
                let (matched, rest, exact) = split(b, &pr.constraints);
                next.extend(rest);
                if !exact {
                    self.unsure(&here);
                }
                if matched.is_empty() {
                    continue;
                }
                if pr.unknown {
                    // May or may not match: assume not, but remember the doubt
                    // if the rule would have decided something.
                    if pr.action != Action::Continue || pr.vmap.is_some() {
                        self.unsure(&here);
                    }
                    next.extend(matched);
                    continue;
                }
                match &pr.vmap {
                    None => {
                        let (go_on, back) = self.act(chain, &here, &pr.action, matched, depth);
                        next.extend(go_on);
                        returned.extend(back);
                    }
                    Some(elements) => {
                        let mut remaining = matched;
                        for (c, action) in elements {
                            let mut hit = Vec::new();
                            let mut miss = Vec::new();
                            for r in remaining {
                                let (m, o, e) = split_one(&r, c);
                                if !e {
                                    self.unsure(&here);
                                }
                                hit.extend(m);
                                miss.extend(o);
                            }
                            let (go_on, back) = self.act(chain, &here, action, hit, depth);
                            next.extend(go_on);
                            returned.extend(back);
                            remaining = miss;
                        }
                        next.extend(remaining); // no element: the rule does not match
                    }
                }
            }
            live = next;
        }
        returned.extend(live);
        returned
    }
}

/// Evaluates class `p` through base chain `chain` (following jumps and
/// gotos): which packets are accepted, dropped, or lost to ctguard's sight,
/// and by which rule or policy.
pub fn fate(rs: &Ruleset, chain: &Chain, p: &Packets) -> Fate {
    let mut w = Walker { rs, fate: Fate::default() };
    let fell_off = w.chain(chain, vec![p.clone()], 0);
    let by = By::Policy(chain.path());
    let drop = chain.base.as_ref().is_some_and(|b| b.policy == "drop");
    for b in fell_off {
        if drop { w.fate.dropped.push((b, by.clone())) } else { w.fate.accepted.push((b, by.clone())) }
    }
    w.fate
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tcp(dport: u16) -> Packets {
        Packets { dport: RangeSet::single(u128::from(dport), 65535), ..Packets::any(Family::V4, 6, CtState::New) }
    }

    fn m(left: Value, op: &str, right: Value) -> Value {
        json!({ "op": op, "left": left, "right": right })
    }

    fn payload(p: &str, f: &str) -> Value {
        json!({ "payload": { "protocol": p, "field": f } })
    }

    #[test]
    fn port_matches() {
        let p = tcp(80);
        assert_eq!(match_rel(&m(payload("tcp", "dport"), "==", json!(80)), &p), Rel::Always);
        assert_eq!(match_rel(&m(payload("tcp", "dport"), "!=", json!(80)), &p), Rel::Never);
        assert_eq!(match_rel(&m(payload("udp", "dport"), "==", json!(80)), &p), Rel::Never, "wrong protocol");
        assert_eq!(
            match_rel(&m(payload("tcp", "dport"), "==", json!({ "set": [22, { "range": [70, 90] }] })), &p),
            Rel::Always
        );
        assert_eq!(match_rel(&m(payload("tcp", "dport"), "<", json!(1024)), &p), Rel::Always);
        assert_eq!(match_rel(&m(payload("th", "sport"), "==", json!(80)), &p), Rel::Some);
        assert_eq!(match_rel(&m(payload("tcp", "dport"), "==", json!("@allowed")), &p), Rel::Unknown);
        assert_eq!(match_rel(&m(payload("tcp", "dport"), "==", json!("http")), &p), Rel::Always);
        let two = Packets { dport: RangeSet::from_ranges([(80, 80), (15000, 15000)], 65535), ..tcp(0) };
        assert_eq!(match_rel(&m(payload("tcp", "dport"), "==", json!(80)), &two), Rel::Some);
    }

    #[test]
    fn addresses_families_and_protocols() {
        let mut p = tcp(80);
        p.saddr = cidr_range("10.1.0.0/16".parse().unwrap());
        let pfx = |a: &str, l: u8| json!({ "prefix": { "addr": a, "len": l } });
        assert_eq!(match_rel(&m(payload("ip", "saddr"), "==", pfx("10.0.0.0", 8)), &p), Rel::Always);
        assert_eq!(match_rel(&m(payload("ip", "saddr"), "==", pfx("10.1.2.0", 24)), &p), Rel::Some);
        assert_eq!(match_rel(&m(payload("ip", "saddr"), "==", pfx("172.17.0.0", 16)), &p), Rel::Never);
        assert_eq!(match_rel(&m(payload("ip6", "saddr"), "==", pfx("fd00::", 8)), &p), Rel::Never);
        assert_eq!(match_rel(&m(payload("ip", "daddr"), "==", json!("10.0.0.5")), &p), Rel::Some);
        let meta = |k: &str| json!({ "meta": { "key": k } });
        assert_eq!(match_rel(&m(meta("l4proto"), "==", json!({ "set": ["tcp", "udp"] })), &p), Rel::Always);
        assert_eq!(match_rel(&m(meta("l4proto"), "==", json!("icmp")), &p), Rel::Never);
        assert_eq!(match_rel(&m(meta("nfproto"), "==", json!("ipv6")), &p), Rel::Never);
        assert_eq!(match_rel(&m(meta("mark"), "==", json!(16)), &p), Rel::Unknown);
        assert_eq!(match_rel(&m(payload("icmp", "type"), "==", json!("echo-request")), &p), Rel::Never);
    }

    #[test]
    fn conntrack_state() {
        let ct = json!({ "ct": { "key": "state" } });
        let untracked = tcp(80).with_ct(CtState::Untracked);
        assert_eq!(match_rel(&m(ct.clone(), "in", json!(["established", "related"])), &untracked), Rel::Never);
        assert_eq!(match_rel(&m(ct.clone(), "in", json!("untracked")), &untracked), Rel::Always);
        assert_eq!(match_rel(&m(ct.clone(), "!=", json!("invalid")), &untracked), Rel::Always);
        assert_eq!(
            match_rel(&m(ct, "in", json!(["established", "related"])), &tcp(80).with_ct(CtState::Established)),
            Rel::Always
        );
    }

    #[test]
    fn interfaces() {
        let iif = json!({ "meta": { "key": "iifname" } });
        let mut p = tcp(80);
        assert_eq!(match_rel(&m(iif.clone(), "==", json!("lo")), &p), Rel::Some);
        p.iif = Iface::Named("eth0".into());
        assert_eq!(match_rel(&m(iif.clone(), "==", json!("lo")), &p), Rel::Never);
        assert_eq!(match_rel(&m(iif.clone(), "==", json!("eth*")), &p), Rel::Always);
        assert_eq!(match_rel(&m(iif.clone(), "!=", json!("eth0")), &p), Rel::Never);
        p.iif = Iface::Named("veth*".into());
        assert_eq!(match_rel(&m(iif.clone(), "==", json!("veth3")), &p), Rel::Some);
        p.iif = Iface::Absent;
        assert_eq!(match_rel(&m(iif, "==", json!("lo")), &p), Rel::Never);
    }

    #[test]
    fn rules_combine_matches_and_find_verdicts() {
        let expr = vec![
            json!({ "match": m(payload("tcp", "dport"), "==", json!(80)) }),
            json!({ "match": m(json!({ "ct": { "key": "state" } }), "in", json!("new")) }),
            json!({ "counter": null }),
            json!({ "accept": null }),
        ];
        let ev = eval_rule(&expr, &tcp(80));
        assert_eq!((ev.rel, ev.action.clone()), (Rel::Always, Action::Accept));
        let ev = eval_rule(&expr, &tcp(80).with_ct(CtState::Untracked));
        assert_eq!(ev.rel, Rel::Never);
        let nat = vec![
            json!({ "match": m(payload("tcp", "dport"), "==", json!(8080)) }),
            json!({ "dnat": { "addr": "10.0.0.5" } }),
        ];
        assert!(eval_rule(&nat, &tcp(8080)).nat);
        let xt = vec![json!({ "xt": { "type": "match", "name": "conntrack" } }), json!({ "accept": null })];
        let ev = eval_rule(&xt, &tcp(80));
        assert!(ev.opaque);
        assert_eq!(ev.rel, Rel::Unknown);
    }

    fn handles(v: &[(Packets, By)]) -> Vec<String> {
        v.iter()
            .map(|(_, by)| match by {
                By::Rule(r) => format!("{}:{}", r.chain, r.handle),
                By::Policy(p) => format!("policy {p}"),
            })
            .collect()
    }

    #[test]
    fn fates_follow_policies_jumps_and_vmaps() {
        let rs = Ruleset::parse_str(include_str!("fixtures/vmap.json")).unwrap();
        let inbound = rs.chain("inet", "fw", "inbound").unwrap();
        // A reply from port 443 (client side): established today, accepted by the vmap.
        let reply =
            Packets { sport: RangeSet::single(443, 65535), ..Packets::any(Family::V4, 6, CtState::Established) };
        let f = fate(&rs, inbound, &reply);
        assert_eq!(handles(&f.accepted), ["inbound:4"]);
        assert!(f.dropped.is_empty());
        // Untracked it misses the vmap; only loopback and replies to local
        // ports 22 and 443 get through; the rest is rejected.
        let f = fate(&rs, inbound, &reply.with_ct(CtState::Untracked));
        assert_eq!(handles(&f.accepted), ["inbound:5", "allowed:9"]);
        assert_eq!(f.accepted[0].0.iif, Iface::Named("lo".into()));
        assert_eq!(f.accepted[1].0.dport, RangeSet::from_ranges([(22, 22), (443, 443)], 65535));
        assert_eq!(handles(&f.dropped), ["inbound:7"]);
        assert_eq!(f.dropped[0].0.iif, Iface::AnyExcept(vec!["lo".into()]));
        assert_eq!(f.dropped[0].0.dport.complement(), RangeSet::from_ranges([(22, 22), (443, 443)], 65535));
        assert!(f.unsure.is_empty());
        // A request to 443 is accepted in `allowed`, tracked or not.
        let request =
            Packets { dport: RangeSet::single(443, 65535), ..Packets::any(Family::V4, 6, CtState::Untracked) };
        let f = fate(&rs, inbound, &request);
        assert_eq!(handles(&f.accepted), ["inbound:5", "allowed:9"]);
        assert!(f.dropped.is_empty());
    }

    #[test]
    fn unreadable_conditions_make_the_fate_unsure() {
        let rs = Ruleset::parse(&json!({ "nftables": [
            { "table": { "family": "inet", "name": "f" } },
            { "chain": { "family": "inet", "table": "f", "name": "in", "type": "filter", "hook": "input", "prio": 0, "policy": "drop" } },
            { "rule": { "family": "inet", "table": "f", "chain": "in", "handle": 2, "expr": [
                { "match": { "op": "==", "left": { "meta": { "key": "mark" } }, "right": 1 } }, { "accept": null } ] } },
            { "rule": { "family": "inet", "table": "f", "chain": "in", "handle": 3, "expr": [
                { "match": { "op": "!=", "left": { "meta": { "key": "iifname" } }, "right": { "set": ["eth0", "eth1"] } } }, { "accept": null } ] } }
        ] }))
        .unwrap();
        let chain = rs.chain("inet", "f", "in").unwrap();
        let f = fate(&rs, chain, &tcp(80));
        assert_eq!(f.unsure.len(), 1);
        assert_eq!(handles(&f.accepted), ["in:3"]);
        assert_eq!(f.accepted[0].0.iif, Iface::AnyExcept(vec!["eth0".into(), "eth1".into()]));
        assert_eq!(
            f.dropped.iter().map(|(p, _)| p.iif.clone()).collect::<Vec<_>>(),
            [Iface::Named("eth0".into()), Iface::Named("eth1".into())]
        );
    }

    #[test]
    fn boxes_meet_field_by_field() {
        let a = Packets { dport: RangeSet::from_ranges([(80, 80), (15000, 15000)], 65535), ..tcp(0) };
        let b = Packets { dport: RangeSet::single(80, 65535), iif: Iface::AnyExcept(vec!["lo".into()]), ..tcp(0) };
        let m = a.meet(&b).unwrap();
        assert_eq!(m.dport, RangeSet::single(80, 65535));
        assert_eq!(m.iif, Iface::AnyExcept(vec!["lo".into()]));
        let lo = Packets { iif: Iface::Named("lo".into()), ..tcp(80) };
        assert!(lo.meet(&b).is_none());
        assert!(tcp(22).meet(&tcp(80)).is_none());
    }
}
