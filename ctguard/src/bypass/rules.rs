//! The rules ctguard installs and the transactions that install them.
//!
//! Everything lives in `table inet ctguard`: two base chains at raw priority
//! (-300, before conntrack at -200), `prerouting` and `output`, each with one
//! rule per half of each selector: `<matches> counter notrack comment
//! "ctguard <id> <half> <selector>"`. A transaction renders both as the JSON
//! document `nft -j -f -` loads and as the equivalent `nft -f` script that
//! `--dry-run` prints.
use serde_json::{Value, json};

use super::{
    ranges::RangeSet,
    selector::{Family, Half, Selector},
};
use crate::util::Cidr;

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "ctguard";
/// NF_IP_PRI_RAW: before conntrack (-200) sees the packet.
pub const PRIORITY: i64 = -300;

/// One of ctguard's two base chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OurChain {
    /// Packets arriving on an interface (to this host or forwarded).
    Prerouting,
    /// Packets this host sends.
    Output,
}

impl OurChain {
    pub const ALL: [OurChain; 2] = [OurChain::Prerouting, OurChain::Output];

    pub fn name(self) -> &'static str {
        match self {
            OurChain::Prerouting => "prerouting",
            OurChain::Output => "output",
        }
    }

    pub fn parse(s: &str) -> Option<OurChain> {
        OurChain::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// One match of a generated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// `iifname` (input) or `oifname`.
    Iface { input: bool, name: String },
    /// `ip saddr 10.0.0.0/8`, `ip6 daddr fd00::1`.
    Addr { source: bool, cidr: Cidr },
    /// `meta l4proto { tcp, udp }`.
    L4proto(Vec<u8>),
    /// `tcp dport 80` (one protocol) or `th dport { 80, 15000 }` (after an l4proto match).
    Ports { proto: Option<u8>, dest: bool, set: RangeSet },
}

/// nft's name of an IP protocol, where it has one.
pub fn nft_proto_name(p: u8) -> Option<&'static str> {
    Some(match p {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        33 => "dccp",
        58 => "ipv6-icmp",
        132 => "sctp",
        136 => "udplite",
        _ => return None,
    })
}

fn proto_json(p: u8) -> Value {
    nft_proto_name(p).map_or_else(|| json!(p), |n| json!(n))
}

fn proto_text(p: u8) -> String {
    nft_proto_name(p).map_or_else(|| p.to_string(), str::to_string)
}

fn addr_text(c: &Cidr) -> String {
    let full = if c.addr.is_ipv4() { 32 } else { 128 };
    if c.prefix == full { c.addr.to_string() } else { c.to_string() }
}

fn set_json(items: Vec<Value>) -> Value {
    if items.len() == 1 { items.into_iter().next().unwrap_or(Value::Null) } else { json!({ "set": items }) }
}

fn set_text(items: Vec<String>) -> String {
    if items.len() == 1 { items.into_iter().next().unwrap_or_default() } else { format!("{{ {} }}", items.join(", ")) }
}

impl Match {
    pub fn json(&self) -> Value {
        let (left, right) = match self {
            Match::Iface { input, name } => {
                (json!({ "meta": { "key": if *input { "iifname" } else { "oifname" } } }), json!(name))
            }
            Match::Addr { source, cidr } => {
                let proto = Family::of(&cidr.addr).nft_ip();
                let field = if *source { "saddr" } else { "daddr" };
                let full = if cidr.addr.is_ipv4() { 32 } else { 128 };
                let right = if cidr.prefix == full {
                    json!(cidr.addr.to_string())
                } else {
                    json!({ "prefix": { "addr": cidr.addr.to_string(), "len": cidr.prefix } })
                };
                (json!({ "payload": { "protocol": proto, "field": field } }), right)
            }
            Match::L4proto(protos) => {
                (json!({ "meta": { "key": "l4proto" } }), set_json(protos.iter().map(|p| proto_json(*p)).collect()))
            }
            Match::Ports { proto, dest, set } => {
                let protocol = proto.and_then(nft_proto_name).unwrap_or("th");
                let field = if *dest { "dport" } else { "sport" };
                let items = set
                    .ranges()
                    .iter()
                    .map(|(lo, hi)| if lo == hi { json!(lo) } else { json!({ "range": [lo, hi] }) })
                    .collect();
                (json!({ "payload": { "protocol": protocol, "field": field } }), set_json(items))
            }
        };
        json!({ "match": { "op": "==", "left": left, "right": right } })
    }

    pub fn text(&self) -> String {
        match self {
            Match::Iface { input, name } => format!("{} \"{name}\"", if *input { "iifname" } else { "oifname" }),
            Match::Addr { source, cidr } => format!(
                "{} {} {}",
                Family::of(&cidr.addr).nft_ip(),
                if *source { "saddr" } else { "daddr" },
                addr_text(cidr)
            ),
            Match::L4proto(protos) => {
                format!("meta l4proto {}", set_text(protos.iter().map(|p| proto_text(*p)).collect()))
            }
            Match::Ports { proto, dest, set } => {
                let protocol = proto.and_then(nft_proto_name).unwrap_or("th");
                let items = set
                    .ranges()
                    .iter()
                    .map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
                    .collect();
                format!("{protocol} {} {}", if *dest { "dport" } else { "sport" }, set_text(items))
            }
        }
    }
}

/// The matches selecting one half of a selector's flows on one path:
/// `input_iface` says whether the interface is the packets' input
/// (prerouting, input, forward) or output interface.
pub fn half_matches(sel: &Selector, half: Half, input_iface: bool) -> Vec<Match> {
    let mut out = Vec::new();
    if let Some(name) = &sel.iface {
        out.push(Match::Iface { input: input_iface, name: name.clone() });
    }
    let (saddr, daddr) = match half {
        Half::Request => (sel.src, sel.dst),
        Half::Reply => (sel.dst, sel.src),
    };
    if let Some(cidr) = saddr {
        out.push(Match::Addr { source: true, cidr });
    }
    if let Some(cidr) = daddr {
        out.push(Match::Addr { source: false, cidr });
    }
    let dest = half == Half::Request;
    match (&sel.ports, sel.protos.as_slice()) {
        (Some(set), [one]) => out.push(Match::Ports { proto: Some(*one), dest, set: set.clone() }),
        (Some(set), many) => {
            out.push(Match::L4proto(many.to_vec()));
            out.push(Match::Ports { proto: None, dest, set: set.clone() });
        }
        (None, protos) => out.push(Match::L4proto(protos.to_vec())),
    }
    out
}

pub fn matches_text(matches: &[Match]) -> String {
    matches.iter().map(Match::text).collect::<Vec<_>>().join(" ")
}

/// One rule ctguard installs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BypassRule {
    pub chain: OurChain,
    pub half: Half,
    pub matches: Vec<Match>,
    pub comment: String,
}

impl BypassRule {
    pub fn json_expr(&self) -> Vec<Value> {
        let mut expr: Vec<Value> = self.matches.iter().map(Match::json).collect();
        expr.push(json!({ "counter": null }));
        expr.push(json!({ "notrack": null }));
        expr
    }

    /// The rule as `nft list` shows it, without counter values.
    pub fn text(&self) -> String {
        format!("{} counter notrack comment \"{}\"", matches_text(&self.matches), self.comment)
    }
}

/// The rules of one selector: for each of our chains, one per half.
pub fn rules_for(sel: &Selector) -> Vec<BypassRule> {
    let mut rules = Vec::new();
    for chain in OurChain::ALL {
        for half in sel.direction.halves() {
            rules.push(BypassRule {
                chain,
                half: *half,
                matches: half_matches(sel, *half, chain == OurChain::Prerouting),
                comment: sel.comment(*half),
            });
        }
    }
    rules
}

/// One step of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `add table inet ctguard` (a no-op when it exists).
    AddTable,
    /// `add chain ...` with its hook and raw priority (a no-op when it exists).
    AddChain(OurChain),
    AddRule(BypassRule),
    /// Deletes a rule by handle; fails the whole transaction if it is gone.
    DeleteRule {
        chain: String,
        handle: u64,
    },
    /// Deletes the table and everything in it.
    DeleteTable,
}

impl Command {
    pub fn json(&self) -> Value {
        match self {
            Command::AddTable => json!({ "add": { "table": { "family": FAMILY, "name": TABLE } } }),
            Command::AddChain(c) => json!({ "add": { "chain": {
                "family": FAMILY, "table": TABLE, "name": c.name(),
                "type": "filter", "hook": c.name(), "prio": PRIORITY, "policy": "accept"
            } } }),
            Command::AddRule(r) => json!({ "add": { "rule": {
                "family": FAMILY, "table": TABLE, "chain": r.chain.name(),
                "expr": r.json_expr(), "comment": r.comment
            } } }),
            Command::DeleteRule { chain, handle } => json!({ "delete": { "rule": {
                "family": FAMILY, "table": TABLE, "chain": chain, "handle": handle
            } } }),
            Command::DeleteTable => json!({ "delete": { "table": { "family": FAMILY, "name": TABLE } } }),
        }
    }

    pub fn script_line(&self) -> String {
        match self {
            Command::AddTable => format!("add table {FAMILY} {TABLE}"),
            Command::AddChain(c) => format!(
                "add chain {FAMILY} {TABLE} {0} {{ type filter hook {0} priority raw; policy accept; }}",
                c.name()
            ),
            Command::AddRule(r) => format!("add rule {FAMILY} {TABLE} {} {}", r.chain.name(), r.text()),
            Command::DeleteRule { chain, handle } => format!("delete rule {FAMILY} {TABLE} {chain} handle {handle}"),
            Command::DeleteTable => format!("delete table {FAMILY} {TABLE}"),
        }
    }
}

/// Commands nft applies in one netlink batch: all of them or none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    pub commands: Vec<Command>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The document piped to `nft -j -f -`.
    pub fn json(&self) -> Value {
        json!({ "nftables": self.commands.iter().map(Command::json).collect::<Vec<_>>() })
    }

    /// The equivalent `nft -f` script, one command per line.
    pub fn script(&self) -> String {
        self.commands.iter().map(|c| c.script_line() + "\n").collect()
    }

    /// Installs `sel`: creates the table and chains if needed, deletes
    /// `stale` rules (handles of an incomplete earlier copy of the same
    /// selector), adds its rules.
    pub fn add(sel: &Selector, stale: &[(String, u64)]) -> Transaction {
        let mut commands = vec![Command::AddTable];
        commands.extend(OurChain::ALL.map(Command::AddChain));
        commands
            .extend(stale.iter().map(|(chain, handle)| Command::DeleteRule { chain: chain.clone(), handle: *handle }));
        commands.extend(rules_for(sel).into_iter().map(Command::AddRule));
        Transaction { commands }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bypass::selector::{Direction, SelectorInput};

    fn seed() -> Selector {
        Selector::parse(&SelectorInput {
            ports: vec!["80,15000".into()],
            protos: vec!["tcp".into()],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn the_seed_example_is_four_rules_like_the_four_iptables_lines() {
        let sel = seed();
        let id = sel.id();
        let script = Transaction::add(&sel, &[]).script();
        let expected = format!(
            "add table inet ctguard
add chain inet ctguard prerouting {{ type filter hook prerouting priority raw; policy accept; }}
add chain inet ctguard output {{ type filter hook output priority raw; policy accept; }}
add rule inet ctguard prerouting tcp dport {{ 80, 15000 }} counter notrack comment \"ctguard {id} request --proto tcp --port 80,15000 --direction both\"
add rule inet ctguard prerouting tcp sport {{ 80, 15000 }} counter notrack comment \"ctguard {id} reply --proto tcp --port 80,15000 --direction both\"
add rule inet ctguard output tcp dport {{ 80, 15000 }} counter notrack comment \"ctguard {id} request --proto tcp --port 80,15000 --direction both\"
add rule inet ctguard output tcp sport {{ 80, 15000 }} counter notrack comment \"ctguard {id} reply --proto tcp --port 80,15000 --direction both\"
"
        );
        assert_eq!(script, expected);
    }

    #[test]
    fn the_seed_example_json_is_exact() {
        let sel = seed();
        let doc = Transaction::add(&sel, &[]).json();
        let rule = |chain: &str, field: &str, half: &str| {
            json!({ "add": { "rule": {
                "family": "inet", "table": "ctguard", "chain": chain,
                "expr": [
                    { "match": { "op": "==", "left": { "payload": { "protocol": "tcp", "field": field } }, "right": { "set": [80, 15000] } } },
                    { "counter": null },
                    { "notrack": null }
                ],
                "comment": format!("ctguard {} {half} --proto tcp --port 80,15000 --direction both", sel.id())
            } } })
        };
        let expected = json!({ "nftables": [
            { "add": { "table": { "family": "inet", "name": "ctguard" } } },
            { "add": { "chain": { "family": "inet", "table": "ctguard", "name": "prerouting", "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept" } } },
            { "add": { "chain": { "family": "inet", "table": "ctguard", "name": "output", "type": "filter", "hook": "output", "prio": -300, "policy": "accept" } } },
            rule("prerouting", "dport", "request"),
            rule("prerouting", "sport", "reply"),
            rule("output", "dport", "request"),
            rule("output", "sport", "reply"),
        ] });
        assert_eq!(doc, expected);
    }

    #[test]
    fn addresses_swap_between_request_and_reply_and_interfaces_follow_the_hook() {
        let sel = Selector::parse(&SelectorInput {
            ports: vec!["53".into(), "8000-8100".into()],
            src: Some("10.0.0.0/8".into()),
            dst: Some("192.0.2.1".into()),
            iface: Some("eth0".into()),
            ..Default::default()
        })
        .unwrap();
        let rules = rules_for(&sel);
        let texts: Vec<String> =
            rules.iter().map(|r| format!("{} {}", r.chain.name(), matches_text(&r.matches))).collect();
        assert_eq!(
            texts,
            [
                "prerouting iifname \"eth0\" ip saddr 10.0.0.0/8 ip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport { 53, 8000-8100 }",
                "prerouting iifname \"eth0\" ip saddr 192.0.2.1 ip daddr 10.0.0.0/8 meta l4proto { tcp, udp } th sport { 53, 8000-8100 }",
                "output oifname \"eth0\" ip saddr 10.0.0.0/8 ip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport { 53, 8000-8100 }",
                "output oifname \"eth0\" ip saddr 192.0.2.1 ip daddr 10.0.0.0/8 meta l4proto { tcp, udp } th sport { 53, 8000-8100 }",
            ]
        );
        let j = rules[0].json_expr();
        assert_eq!(
            j[1],
            json!({ "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "saddr" } }, "right": { "prefix": { "addr": "10.0.0.0", "len": 8 } } } })
        );
        assert_eq!(j[2]["match"]["right"], json!("192.0.2.1"));
        assert_eq!(j[3]["match"]["right"], json!({ "set": ["tcp", "udp"] }));
        assert_eq!(j[4]["match"]["right"], json!({ "set": [53, { "range": [8000, 8100] }] }));
    }

    #[test]
    fn one_direction_makes_two_rules_and_portless_selectors_match_the_protocol() {
        let sel = Selector::parse(&SelectorInput {
            src: Some("fd00::/64".into()),
            protos: vec!["udp".into()],
            direction: Some(Direction::Out),
            ..Default::default()
        })
        .unwrap();
        let rules = rules_for(&sel);
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().all(|r| r.half == Half::Reply));
        assert_eq!(matches_text(&rules[0].matches), "ip6 daddr fd00::/64 meta l4proto udp");
    }

    #[test]
    fn removal_commands() {
        let t = Transaction {
            commands: vec![Command::DeleteRule { chain: "output".into(), handle: 7 }, Command::DeleteTable],
        };
        assert_eq!(t.script(), "delete rule inet ctguard output handle 7\ndelete table inet ctguard\n");
        assert_eq!(
            t.json(),
            json!({ "nftables": [
                { "delete": { "rule": { "family": "inet", "table": "ctguard", "chain": "output", "handle": 7 } } },
                { "delete": { "table": { "family": "inet", "name": "ctguard" } } }
            ] })
        );
    }
}
