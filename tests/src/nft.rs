//! nftables helpers: the conntrack table the lab loads, and reading counters.

/// The table [`crate::Lab::enable_conntrack`] loads into the receiver.
pub const TABLE: &str = "ctgtest";
/// Its named counter of packets in conntrack state `new`.
pub const NEW_FLOWS_COUNTER: &str = "new_flows";

/// The ruleset: an `inet` table whose `ct state new` match makes the kernel
/// track connections in the namespace, counting new ones in a named counter.
/// Chains `prerouting` and `input` (priority `filter`, i.e. 0, after
/// conntrack's −200) take extra rules.
///
/// Chain `output` (priority `raw`, before conntrack) marks the receiver's
/// TCP RSTs `notrack`: a SYN to a closed port is answered with a RST, and a
/// RST as the only reply makes conntrack kill the entry at once
/// (`nf_conntrack_tcp_packet`). Without conntrack seeing it, a SYN flow
/// stays as a SYN_SENT entry (120 s), like a UDP flow stays (30 s).
pub fn conntrack_ruleset() -> String {
    format!(
        "table inet {TABLE} {{
    counter {NEW_FLOWS_COUNTER} {{ }}
    chain prerouting {{
        type filter hook prerouting priority filter; policy accept;
        ct state new counter name \"{NEW_FLOWS_COUNTER}\"
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
    }}
    chain output {{
        type filter hook output priority raw; policy accept;
        tcp flags rst notrack
    }}
}}
"
    )
}

/// The packet count of counter `name` in `nft -j list counter …` output.
pub fn parse_counter_packets(json: &str, name: &str) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    v["nftables"]
        .as_array()
        .ok_or("no `nftables` array")?
        .iter()
        .filter_map(|item| item.get("counter"))
        .find(|c| c["name"] == name)
        .ok_or_else(|| format!("no counter named {name}"))?["packets"]
        .as_u64()
        .ok_or_else(|| format!("counter {name} has no packet count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_packets_of_the_named_counter() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "new_flows", "table": "ctgtest", "handle": 2, "packets": 300, "bytes": 10800}}]}"#;
        assert_eq!(parse_counter_packets(json, "new_flows"), Ok(300));
        assert!(parse_counter_packets(json, "other").is_err());
        assert!(parse_counter_packets("{}", "new_flows").is_err());
    }
}
