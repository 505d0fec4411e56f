//! The live ruleset as `nft -j list ruleset` prints it, indexed by chain.
//!
//! Rules keep their statements as raw JSON: the analysis reads the parts it
//! understands and treats the rest as "cannot decide", so a ruleset with
//! statements no library models (iptables-nft `xt`, newer nft features)
//! still loads.
use serde_json::Value;

use super::error::BypassError;

#[derive(Clone, Debug, PartialEq)]
pub struct BaseChain {
    /// `filter`, `nat` or `route`.
    pub kind: String,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`, `ingress`, ...
    pub hook: String,
    pub prio: i64,
    /// `accept` or `drop`.
    pub policy: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub expr: Vec<Value>,
    pub comment: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    pub family: String,
    pub table: String,
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

impl Chain {
    /// `inet filter input`.
    pub fn path(&self) -> String {
        format!("{} {} {}", self.family, self.table, self.name)
    }
}

/// A `ct helper` object.
#[derive(Clone, Debug, PartialEq)]
pub struct Helper {
    pub family: String,
    pub table: String,
    pub name: String,
    pub handle: Option<u64>,
    /// `ftp`, `sip`, ...
    pub kind: String,
    pub protocol: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ruleset {
    /// `(family, name)` of every table, in listing order.
    pub tables: Vec<(String, String)>,
    pub chains: Vec<Chain>,
    pub helpers: Vec<Helper>,
    /// nft's version, from the metainfo object.
    pub nft_version: Option<String>,
}

fn str_field(obj: &Value, key: &str) -> String {
    obj.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

impl Ruleset {
    pub fn parse_str(text: &str) -> Result<Ruleset, BypassError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| BypassError::ruleset(format!("not JSON: {e}"), "give the output of `nft -j list ruleset`"))?;
        Self::parse(&v)
    }

    pub fn parse(v: &Value) -> Result<Ruleset, BypassError> {
        let items = v.get("nftables").and_then(Value::as_array).ok_or_else(|| {
            BypassError::ruleset("no top-level `nftables` array", "give the output of `nft -j list ruleset`")
        })?;
        let mut rs = Ruleset::default();
        for item in items {
            let Some(obj) = item.as_object() else { continue };
            for (kind, body) in obj {
                match kind.as_str() {
                    "metainfo" => rs.nft_version = body.get("version").and_then(Value::as_str).map(str::to_string),
                    "table" => rs.tables.push((str_field(body, "family"), str_field(body, "name"))),
                    "chain" => {
                        let base = body.get("hook").and_then(Value::as_str).map(|hook| BaseChain {
                            kind: str_field(body, "type"),
                            hook: hook.to_string(),
                            prio: body.get("prio").and_then(Value::as_i64).unwrap_or(0),
                            policy: body.get("policy").and_then(Value::as_str).unwrap_or("accept").to_string(),
                        });
                        rs.chains.push(Chain {
                            family: str_field(body, "family"),
                            table: str_field(body, "table"),
                            name: str_field(body, "name"),
                            base,
                            rules: Vec::new(),
                        });
                    }
                    "rule" => {
                        let rule = Rule {
                            family: str_field(body, "family"),
                            table: str_field(body, "table"),
                            chain: str_field(body, "chain"),
                            handle: body.get("handle").and_then(Value::as_u64).unwrap_or(0),
                            expr: body.get("expr").and_then(Value::as_array).cloned().unwrap_or_default(),
                            comment: body.get("comment").and_then(Value::as_str).map(str::to_string),
                        };
                        match rs
                            .chains
                            .iter_mut()
                            .find(|c| c.family == rule.family && c.table == rule.table && c.name == rule.chain)
                        {
                            Some(c) => c.rules.push(rule),
                            None => {
                                return Err(BypassError::ruleset(
                                    format!(
                                        "rule handle {} names chain {} {} {} which is not listed",
                                        rule.handle, rule.family, rule.table, rule.chain
                                    ),
                                    "give the complete output of `nft -j list ruleset`",
                                ));
                            }
                        }
                    }
                    "ct helper" => rs.helpers.push(Helper {
                        family: str_field(body, "family"),
                        table: str_field(body, "table"),
                        name: str_field(body, "name"),
                        handle: body.get("handle").and_then(Value::as_u64),
                        kind: str_field(body, "type"),
                        protocol: str_field(body, "protocol"),
                    }),
                    _ => {}
                }
            }
        }
        Ok(rs)
    }

    pub fn has_table(&self, family: &str, name: &str) -> bool {
        self.tables.iter().any(|(f, n)| f == family && n == name)
    }

    pub fn chain(&self, family: &str, table: &str, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.family == family && c.table == table && c.name == name)
    }

    /// Chains of one table.
    pub fn table_chains<'a>(&'a self, family: &'a str, table: &'a str) -> impl Iterator<Item = &'a Chain> + 'a {
        self.chains.iter().filter(move |c| c.family == family && c.table == table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tables_chains_rules_and_helpers() {
        let rs = Ruleset::parse_str(include_str!("fixtures/helper.json")).unwrap();
        assert_eq!(rs.nft_version.as_deref(), Some("1.0.6"));
        assert!(rs.has_table("inet", "raw"));
        assert_eq!(rs.helpers.len(), 1);
        assert_eq!(rs.helpers[0].kind, "ftp");
        let pre = rs.chain("inet", "raw", "prerouting").unwrap();
        let base = pre.base.as_ref().unwrap();
        assert_eq!((base.kind.as_str(), base.hook.as_str(), base.prio), ("filter", "prerouting", 0));
        assert_eq!(pre.rules.len(), 1);
    }

    #[test]
    fn rejects_what_is_not_a_ruleset() {
        assert!(Ruleset::parse_str("nope").unwrap_err().to_string().contains("not JSON"));
        assert!(Ruleset::parse_str("{}").unwrap_err().to_string().contains("nftables"));
        let empty = Ruleset::parse_str(r#"{"nftables": []}"#).unwrap();
        assert!(empty.chains.is_empty());
    }
}
