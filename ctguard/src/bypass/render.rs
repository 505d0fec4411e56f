//! nft's JSON statements back to nft syntax, for naming the rules a
//! conflict is about. Covers what rulesets commonly hold; anything else is
//! shown as its compact JSON, so the text is never silently wrong.
use serde_json::Value;

/// The rule body as `nft list ruleset` prints it (without the handle).
pub fn rule_text(expr: &[Value], comment: Option<&str>) -> String {
    let mut parts: Vec<String> = expr.iter().map(statement).collect();
    if let Some(c) = comment {
        parts.push(format!("comment \"{c}\""));
    }
    parts.join(" ")
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// One statement.
pub fn statement(s: &Value) -> String {
    let Some((key, body)) = s.as_object().and_then(|o| o.iter().next()) else {
        return s.as_str().map_or_else(|| compact(s), str::to_string);
    };
    match key.as_str() {
        "match" => {
            let left = expression(&body["left"]);
            // nft quotes interface names: `iifname "eth0"`.
            let quote = IFACE_META.contains(&body["left"]["meta"]["key"].as_str().unwrap_or(""));
            let right = expr_q(&body["right"], quote);
            match body["op"].as_str().unwrap_or("==") {
                "==" | "in" => format!("{left} {right}"),
                op => format!("{left} {op} {right}"),
            }
        }
        "accept" | "drop" | "continue" | "return" | "notrack" | "masquerade" if body.is_null() => key.clone(),
        "jump" | "goto" => format!("{key} {}", body["target"].as_str().unwrap_or("?")),
        "counter" => match body {
            Value::String(name) => format!("counter name \"{name}\""),
            Value::Object(o) if o.contains_key("packets") => {
                format!("counter packets {} bytes {}", body["packets"], body["bytes"])
            }
            _ => "counter".into(),
        },
        "reject" => match (body.get("type").and_then(Value::as_str), body.get("expr")) {
            (Some("tcp reset"), _) => "reject with tcp reset".into(),
            (Some(t), Some(e)) => format!("reject with {t} {}", expression(e)),
            _ => "reject".into(),
        },
        "snat" | "dnat" | "masquerade" | "redirect" => nat(key, body),
        "ct helper" => format!("ct helper set {}", quoted(body)),
        "vmap" => format!("{} vmap {}", expression(&body["key"]), map_data(&body["data"])),
        "log" => match body.get("prefix").and_then(Value::as_str) {
            Some(p) => format!("log prefix \"{p}\""),
            None => "log".into(),
        },
        "limit" => format!(
            "limit rate {}{}/{}",
            if body["inv"].as_bool() == Some(true) { "over " } else { "" },
            body["rate"],
            body["per"].as_str().unwrap_or("second")
        ),
        "mangle" => format!("{} set {}", expression(&body["key"]), expression(&body["value"])),
        "xt" => format!("xt {} \"{}\"", body["type"].as_str().unwrap_or("?"), body["name"].as_str().unwrap_or("?")),
        _ => compact(s),
    }
}

fn quoted(v: &Value) -> String {
    v.as_str().map_or_else(|| expression(v), |s| format!("\"{s}\""))
}

fn nat(key: &str, body: &Value) -> String {
    let mut out = key.to_string();
    if body.is_null() {
        return out;
    }
    if let Some(f) = body.get("family").and_then(Value::as_str) {
        out.push_str(&format!(" {f}"));
    }
    let addr = body.get("addr").map(expression);
    let port = body.get("port").map(expression);
    match (addr, port) {
        (Some(a), Some(p)) => out.push_str(&format!(" to {a}:{p}")),
        (Some(a), None) => out.push_str(&format!(" to {a}")),
        (None, Some(p)) => out.push_str(&format!(" to :{p}")),
        (None, None) => {}
    }
    out
}

fn map_data(v: &Value) -> String {
    match v.get("set").and_then(Value::as_array) {
        Some(items) => {
            let parts: Vec<String> = items
                .iter()
                .map(|pair| match pair.as_array().map(Vec::as_slice) {
                    Some([k, d]) => format!("{} : {}", expression(k), verdict_or_expr(d)),
                    _ => expression(pair),
                })
                .collect();
            format!("{{ {} }}", parts.join(", "))
        }
        None => expression(v),
    }
}

fn verdict_or_expr(v: &Value) -> String {
    match v.as_object().and_then(|o| o.iter().next()) {
        Some((k, body)) if matches!(k.as_str(), "accept" | "drop" | "continue" | "return") && body.is_null() => {
            k.clone()
        }
        Some((k, body)) if matches!(k.as_str(), "jump" | "goto") => {
            format!("{k} {}", body["target"].as_str().unwrap_or("?"))
        }
        _ => expression(v),
    }
}

/// Meta keys nft prints without the `meta` keyword.
const UNQUALIFIED_META: [&str; 6] = ["iif", "oif", "iifname", "oifname", "iifgroup", "oifgroup"];

/// Meta keys whose values are interface names.
const IFACE_META: [&str; 4] = ["iif", "oif", "iifname", "oifname"];

/// One expression (either side of a match).
pub fn expression(v: &Value) -> String {
    expr_q(v, false)
}

/// An expression; `quote` quotes every string (interface names).
fn expr_q(v: &Value, quote: bool) -> String {
    let expression = |v: &Value| expr_q(v, quote);
    match v {
        Value::String(s) => {
            if !quote
                && (s.starts_with('@')
                    || s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '_' | '/')))
            {
                s.clone()
            } else {
                format!("\"{s}\"")
            }
        }
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => items.iter().map(expression).collect::<Vec<_>>().join(","),
        Value::Object(o) => {
            let Some((key, body)) = o.iter().next() else { return "{}".into() };
            match key.as_str() {
                "payload" => {
                    match (body.get("protocol").and_then(Value::as_str), body.get("field").and_then(Value::as_str)) {
                        (Some(p), Some(f)) => format!("{p} {f}"),
                        _ => format!("@{},{},{}", body["base"].as_str().unwrap_or("?"), body["offset"], body["len"]),
                    }
                }
                "meta" => {
                    let k = body["key"].as_str().unwrap_or("?");
                    if UNQUALIFIED_META.contains(&k) { k.to_string() } else { format!("meta {k}") }
                }
                "ct" => {
                    let mut out = "ct".to_string();
                    if let Some(d) = body.get("dir").and_then(Value::as_str) {
                        out.push_str(&format!(" {d}"));
                    }
                    if let Some(f) = body.get("family").and_then(Value::as_str) {
                        out.push_str(&format!(" {f}"));
                    }
                    out.push_str(&format!(" {}", body["key"].as_str().unwrap_or("?")));
                    out
                }
                "set" => match body.as_array() {
                    Some(items) => format!("{{ {} }}", items.iter().map(expression).collect::<Vec<_>>().join(", ")),
                    None => expression(body),
                },
                "range" => match body.as_array().map(Vec::as_slice) {
                    Some([lo, hi]) => format!("{}-{}", expression(lo), expression(hi)),
                    _ => compact(v),
                },
                "prefix" => format!("{}/{}", expression(&body["addr"]), body["len"]),
                "elem" => expression(&body["val"]),
                "concat" => match body.as_array() {
                    Some(items) => items.iter().map(expression).collect::<Vec<_>>().join(" . "),
                    None => compact(v),
                },
                "&" | "|" | "^" | "<<" | ">>" => match body.as_array().map(Vec::as_slice) {
                    Some([a, b]) => format!("{} {key} {}", expression(a), expression(b)),
                    _ => compact(v),
                },
                "fib" => format!(
                    "fib {} {}",
                    body["flags"].as_array().map_or_else(String::new, |f| f
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" . ")),
                    body["result"].as_str().unwrap_or("?")
                ),
                _ => compact(v),
            }
        }
        Value::Null => "null".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bypass::ruleset::Ruleset;

    fn texts(fixture: &str) -> Vec<String> {
        let rs = Ruleset::parse_str(fixture).unwrap();
        rs.chains.iter().flat_map(|c| c.rules.iter().map(|r| rule_text(&r.expr, r.comment.as_deref()))).collect()
    }

    #[test]
    fn renders_rules_as_nft_lists_them() {
        let t = texts(include_str!("fixtures/hardened.json"));
        assert_eq!(
            t,
            [
                "ct state established,related accept",
                "ct state invalid drop",
                "iif \"lo\" accept",
                "tcp dport 22 accept",
                "tcp dport 80 ct state new accept",
                "meta l4proto icmp accept",
                "tcp dport 8080 dnat to 10.0.0.5:80",
                "ip saddr 172.17.0.0/16 oifname \"eth0\" masquerade",
            ]
        );
        let v = texts(include_str!("fixtures/vmap.json"));
        assert_eq!(v[0], "ct state vmap { invalid : drop, established : accept, related : accept }");
        assert_eq!(v[2], "jump allowed");
        assert_eq!(v[3], "reject with icmpx admin-prohibited");
        assert_eq!(v[4], "tcp dport { 22, 443 } accept");
        let h = texts(include_str!("fixtures/helper.json"));
        assert_eq!(h[0], "tcp dport 21 ct helper set \"ftp-standard\"");
        assert_eq!(h[1], "meta mark 16 masquerade");
    }

    #[test]
    fn unknown_statements_show_as_json() {
        let s = serde_json::json!({ "synproxy": { "mss": 1460 } });
        assert_eq!(statement(&s), r#"{"synproxy":{"mss":1460}}"#);
    }
}
