//! The human-readable doctor report.
use std::fmt::Write as _;

use super::{ConntrackPlacement, Outcome, Report};

pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(out, "kernel        {}", r.kernel);
    let _ = writeln!(out, "lockdown      {}", r.lockdown.as_deref().unwrap_or("not available (no lockdown LSM)"));
    let _ = writeln!(
        out,
        "BTF           vmlinux: {}, nf_conntrack module: {}, kfree_skb drop reason: {}",
        yes_no(r.btf.vmlinux),
        yes_no(r.btf.nf_conntrack_module),
        yes_no(r.btf.kfree_skb_has_reason)
    );
    let placement = match r.conntrack.placement {
        ConntrackPlacement::BuiltIn => "built into the kernel",
        ConntrackPlacement::Module => "loaded module",
        ConntrackPlacement::ModuleNotLoaded => "module, not loaded",
        ConntrackPlacement::Absent => "not available",
    };
    let count = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    let _ = writeln!(
        out,
        "conntrack     {placement}; this netns: {} entries (max {}), {}",
        count(r.conntrack.entries),
        count(r.conntrack.max),
        if r.conntrack.active_here { "active" } else { "idle (conntrack runs only where a rule or NAT uses it)" }
    );
    if r.conntrack.module_loaded_now {
        let _ = writeln!(
            out,
            "              (doctor loaded the nf_conntrack module, as the sensors would; it tracks nothing by itself)"
        );
    }
    if let Some(e) = &r.conntrack.module_load_error {
        let _ = writeln!(out, "              could not load nf_conntrack: {e}");
    }
    let _ = writeln!(out, "\nhook kind          target                            result");
    for p in &r.probes {
        let result = match &p.outcome {
            Outcome::Works => "works".to_string(),
            Outcome::Refused { errno, error } => match errno {
                Some(n) => format!("refused ({}): {error}", errno_name(*n)),
                None => format!("refused: {error}"),
            },
            Outcome::NotApplicable { reason } => format!("n/a: {reason}"),
        };
        let _ = writeln!(out, "{:<18} {:<33} {}", p.hook.label(), p.target, result);
    }
    let _ = writeln!(out, "\nsensor backend     {}", r.backend.backend);
    for s in &r.backend.sensors {
        let _ = writeln!(out, "  {:<20} {}", s.sensor, s.hooks);
    }
    let _ = writeln!(out, "  why: {}", r.backend.reason);
    match &r.sensors_load {
        Ok(backend) if r.sensors_agree() => {
            let _ = writeln!(out, "  sensors loaded and attached: ok (backend {backend})");
        }
        Ok(backend) => {
            let _ = writeln!(
                out,
                "  sensors loaded, but with the {backend} backend, not {}: {}",
                r.backend.backend,
                r.sensors_reason.as_deref().unwrap_or("no reason given")
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  sensors failed to load: {e}");
        }
    }
    out
}

fn errno_name(n: i32) -> String {
    match n {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::ESRCH => "ESRCH".into(),
        n => format!("errno {n}"),
    }
}
