//! Reading conntrack's own view of a namespace: /proc/net/stat/nf_conntrack,
//! the nf_conntrack sysctls and the slab object size.

/// Summed per-CPU counters of /proc/net/stat/nf_conntrack in the calling
/// thread's namespace (call it inside `Netns::run`).
pub fn read_current_counters() -> Result<std::collections::BTreeMap<String, u64>, crate::error::CtguardError> {
    let text = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").map_err(|e| {
        crate::error::CtguardError::Conntrack {
            what: format!("cannot read /proc/net/stat/nf_conntrack: {e}"),
            hint: "nf_conntrack is not loaded in this namespace".into(),
        }
    })?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let mut sums = std::collections::BTreeMap::new();
    for row in lines {
        for (name, value) in header.iter().zip(row.split_whitespace()) {
            let v = u64::from_str_radix(value, 16).unwrap_or(0);
            let slot = sums.entry(name.to_string()).or_insert(0u64);
            if *name == "entries" { *slot = v } else { *slot += v }
        }
    }
    Ok(sums)
}
