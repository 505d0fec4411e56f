//! What ctguard's table holds right now: its bypasses (rules grouped by the
//! id in their comment), their counters, and any rule someone else put there.
use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    render::rule_text,
    rules::{FAMILY, OurChain, TABLE, rules_for},
    ruleset::Ruleset,
    selector::{Half, Selector, parse_comment},
};

/// One installed rule of a bypass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstalledRule {
    pub chain: String,
    pub half: Half,
    pub handle: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The rule as nft shows it (with its counter values).
    pub text: String,
}

/// One bypass found in the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Installed {
    pub id: String,
    /// The selector options from the comments.
    pub args: String,
    #[serde(skip)]
    pub selector: Option<Selector>,
    pub rules: Vec<InstalledRule>,
}

impl Installed {
    pub fn packets(&self) -> u64 {
        self.rules.iter().map(|r| r.packets).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.rules.iter().map(|r| r.bytes).sum()
    }

    /// Has exactly the rules its selector needs: one per (chain, half), and
    /// the selector in the comment hashes to the id.
    pub fn complete(&self) -> bool {
        let Some(sel) = &self.selector else { return false };
        if sel.id() != self.id {
            return false;
        }
        let mut want: Vec<(String, Half)> =
            rules_for(sel).iter().map(|r| (r.chain.name().to_string(), r.half)).collect();
        let mut have: Vec<(String, Half)> = self.rules.iter().map(|r| (r.chain.clone(), r.half)).collect();
        want.sort();
        have.sort();
        want == have
    }

    /// `(chain, handle)` of every rule, for deleting them.
    pub fn handles(&self) -> Vec<(String, u64)> {
        self.rules.iter().map(|r| (r.chain.clone(), r.handle)).collect()
    }
}

/// A rule in ctguard's table that ctguard did not write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignRule {
    pub chain: String,
    pub handle: u64,
    pub text: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TableState {
    /// `table inet ctguard` exists.
    pub present: bool,
    /// Its chains, by name.
    pub chains: Vec<String>,
    /// Bypasses by id.
    pub bypasses: BTreeMap<String, Installed>,
    pub foreign: Vec<ForeignRule>,
}

impl TableState {
    pub fn read(rs: &Ruleset) -> TableState {
        let mut st = TableState { present: rs.has_table(FAMILY, TABLE), ..Default::default() };
        for chain in rs.table_chains(FAMILY, TABLE) {
            st.chains.push(chain.name.clone());
            for rule in &chain.rules {
                let parsed = rule.comment.as_deref().and_then(parse_comment);
                let ours = OurChain::parse(&chain.name).is_some();
                match parsed {
                    Some((id, half, args)) if ours => {
                        let (packets, bytes) = counter(&rule.expr);
                        let entry = st.bypasses.entry(id.to_string()).or_insert_with(|| Installed {
                            id: id.to_string(),
                            args: args.to_string(),
                            selector: Selector::from_args(args).ok(),
                            rules: Vec::new(),
                        });
                        // The comment repeats the bypass; show the rule without it.
                        let text = rule_text(&rule.expr, None);
                        entry.rules.push(InstalledRule {
                            chain: chain.name.clone(),
                            half,
                            handle: rule.handle,
                            packets,
                            bytes,
                            text,
                        });
                    }
                    _ => st.foreign.push(ForeignRule {
                        chain: chain.name.clone(),
                        handle: rule.handle,
                        text: rule_text(&rule.expr, rule.comment.as_deref()),
                    }),
                }
            }
        }
        st
    }

    /// The bypass an id (or a unique prefix of one) names.
    pub fn find(&self, id: &str) -> Result<&Installed, Vec<&str>> {
        if let Some(b) = self.bypasses.get(id) {
            return Ok(b);
        }
        let hits: Vec<&Installed> = self.bypasses.values().filter(|b| !id.is_empty() && b.id.starts_with(id)).collect();
        match hits.as_slice() {
            [one] => Ok(one),
            _ => Err(hits.iter().map(|b| b.id.as_str()).collect()),
        }
    }

    /// Whether removing `ids` leaves the table without any rule.
    pub fn empty_without(&self, ids: &[&str]) -> bool {
        self.foreign.is_empty() && self.bypasses.keys().all(|k| ids.contains(&k.as_str()))
    }
}

/// Packets and bytes of a rule's anonymous counter.
fn counter(expr: &[serde_json::Value]) -> (u64, u64) {
    expr.iter()
        .find_map(|s| s.get("counter").filter(|c| c.is_object()))
        .map_or((0, 0), |c| (c["packets"].as_u64().unwrap_or(0), c["bytes"].as_u64().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bypass::{rules::Transaction, selector::SelectorInput};
    use serde_json::json;

    /// What `nft -j list ruleset` shows after loading `t` (handles from 2 on).
    fn listed(t: &Transaction, counters: u64) -> Ruleset {
        let mut items = vec![json!({ "metainfo": { "version": "1.0.6" } })];
        let mut handle = 1;
        for c in &t.json()["nftables"].as_array().unwrap().clone() {
            let (verb, body) = c.as_object().unwrap().iter().next().unwrap();
            assert_eq!(verb, "add");
            let (kind, obj) = body.as_object().unwrap().iter().next().unwrap();
            let mut obj = obj.clone();
            handle += 1;
            obj["handle"] = json!(handle);
            if kind == "rule" {
                for s in obj["expr"].as_array_mut().unwrap() {
                    if s.get("counter").is_some() {
                        *s = json!({ "counter": { "packets": counters, "bytes": counters * 40 } });
                    }
                }
            }
            items.push(json!({ kind.clone(): obj }));
        }
        Ruleset::parse(&json!({ "nftables": items })).unwrap()
    }

    fn sel(ports: &str) -> Selector {
        Selector::parse(&SelectorInput { ports: vec![ports.into()], ..Default::default() }).unwrap()
    }

    #[test]
    fn groups_rules_by_id_and_sums_counters() {
        let s = sel("80,15000");
        let st = TableState::read(&listed(&Transaction::add(&s, &[]), 5));
        assert!(st.present);
        assert_eq!(st.chains, ["prerouting", "output"]);
        let b = &st.bypasses[&s.id()];
        assert!(b.complete());
        assert_eq!(b.rules.len(), 4);
        assert_eq!(b.packets(), 20);
        assert_eq!(b.bytes(), 800);
        assert_eq!(b.selector.as_ref(), Some(&s));
        assert!(b.rules[0].text.contains("counter packets 5 bytes 200 notrack"), "{}", b.rules[0].text);
        assert!(st.foreign.is_empty());
        assert!(st.empty_without(&[&s.id()]));
        assert_eq!(st.find(&s.id()[..3]).unwrap().id, s.id());
        assert!(st.find("zzz").is_err());
    }

    #[test]
    fn missing_rules_make_a_bypass_incomplete() {
        let s = sel("53");
        let mut t = Transaction::add(&s, &[]);
        t.commands.pop();
        let st = TableState::read(&listed(&t, 0));
        assert!(!st.bypasses[&s.id()].complete());
    }

    #[test]
    fn rules_without_a_ctguard_comment_are_foreign() {
        let rs = Ruleset::parse(&json!({ "nftables": [
            { "table": { "family": "inet", "name": "ctguard" } },
            { "chain": { "family": "inet", "table": "ctguard", "name": "prerouting", "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept" } },
            { "rule": { "family": "inet", "table": "ctguard", "chain": "prerouting", "handle": 9, "expr": [ { "notrack": null } ] } }
        ] }))
        .unwrap();
        let st = TableState::read(&rs);
        assert_eq!(st.foreign, [ForeignRule { chain: "prerouting".into(), handle: 9, text: "notrack".into() }]);
        assert!(!st.empty_without(&[]));
    }
}
