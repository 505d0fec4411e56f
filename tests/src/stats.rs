//! Parsing the kernel's conntrack statistics.
use std::collections::BTreeMap;

/// Parses `/proc/net/stat/nf_conntrack`: a header line of column names, then
/// one row of hex numbers per CPU. Returns each column summed over the CPUs,
/// except `entries` (the namespace's entry count, repeated on every row),
/// taken from the first row.
pub fn parse_conntrack_stat(text: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or("empty file")?.split_whitespace().collect();
    if header.is_empty() || header.iter().any(|h| h.chars().all(|c| c.is_ascii_hexdigit())) {
        return Err(format!("the first line is not a header: {header:?}"));
    }
    let mut out: BTreeMap<String, u64> = header.iter().map(|h| (h.to_string(), 0)).collect();
    let mut rows = 0;
    for (n, line) in lines.enumerate() {
        let values: Vec<&str> = line.split_whitespace().collect();
        if values.len() != header.len() {
            return Err(format!("row {n} has {} values for {} columns: `{line}`", values.len(), header.len()));
        }
        for (name, v) in header.iter().zip(values) {
            let v = u64::from_str_radix(v, 16).map_err(|e| format!("row {n}, column {name}: `{v}`: {e}"))?;
            let slot = out.get_mut(*name).expect("every header name has a slot");
            if *name == "entries" {
                if rows == 0 {
                    *slot = v;
                }
            } else {
                *slot += v;
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err("no per-CPU rows".into());
    }
    Ok(out)
}

/// Parses `/proc/net/snmp`: pairs of lines `Proto: Name Name …` and
/// `Proto: value value …`. Keys are `Proto.Name` (`Ip.InReceives`); values
/// are signed (`Tcp.MaxConn` is -1).
pub fn parse_snmp(text: &str) -> Result<BTreeMap<String, i64>, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(names) = lines.next() {
        let values = lines.next().ok_or_else(|| format!("no values after `{names}`"))?;
        let (proto, names) = names.split_once(':').ok_or_else(|| format!("no `Proto:` in `{names}`"))?;
        let (proto2, values) = values.split_once(':').ok_or_else(|| format!("no `Proto:` in `{values}`"))?;
        if proto != proto2 {
            return Err(format!("names of {proto} followed by values of {proto2}"));
        }
        let (names, values): (Vec<&str>, Vec<&str>) =
            (names.split_whitespace().collect(), values.split_whitespace().collect());
        if names.len() != values.len() {
            return Err(format!("{proto}: {} names, {} values", names.len(), values.len()));
        }
        for (name, v) in names.into_iter().zip(values) {
            let v: i64 = v.parse().map_err(|e| format!("{proto}.{name} = `{v}`: {e}"))?;
            out.insert(format!("{proto}.{name}"), v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snmp() {
        let text = "Ip: Forwarding DefaultTTL InReceives\nIp: 2 64 5\nTcp: RtoAlgorithm MaxConn OutRsts\nTcp: 1 -1 5\n";
        let s = parse_snmp(text).unwrap();
        assert_eq!(s["Ip.InReceives"], 5);
        assert_eq!(s["Tcp.MaxConn"], -1);
        assert_eq!(s.len(), 6);
        assert!(parse_snmp("Ip: A B\nIp: 1\n").is_err());
        assert!(parse_snmp("Ip: A\nTcp: 1\n").is_err());
    }

    const SAMPLE: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000012c  00000000 00000000 00000000 00000003 00000000 00000000 00000000 00000000 00000000 0000000a 00000001 00000000  00000000 00000000 00000000 00000000
0000012c  00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 000000f0 00000000 00000000  00000000 00000000 00000000 00000002
";

    #[test]
    fn sums_columns_but_not_entries() {
        let s = parse_conntrack_stat(SAMPLE).unwrap();
        assert_eq!(s["entries"], 300);
        assert_eq!(s["drop"], 0x0a + 0xf0);
        assert_eq!(s["invalid"], 3);
        assert_eq!(s["early_drop"], 1);
        assert_eq!(s["clashres"], 1);
        assert_eq!(s["search_restart"], 2);
        assert_eq!(s.len(), 17);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_conntrack_stat("").is_err());
        assert!(parse_conntrack_stat("entries drop\n").is_err());
        assert!(parse_conntrack_stat("entries drop\n00000001\n").is_err());
        assert!(parse_conntrack_stat("entries drop\nzz 01\n").is_err());
    }
}
