//! Facts about the host kernel that come from /proc and /sys.
use std::path::Path;

use crate::error::CtguardError;

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The active lockdown mode (`none`, `integrity`, `confidentiality`), from
/// securityfs; mounts securityfs when it is not mounted yet. `None` when the
/// kernel has no lockdown LSM.
pub fn lockdown_mode() -> Option<String> {
    let path = Path::new("/sys/kernel/security/lockdown");
    if !path.exists() {
        mount_pseudo("securityfs", "/sys/kernel/security");
    }
    let text = std::fs::read_to_string(path).ok()?;
    parse_lockdown(&text)
}

/// Picks the bracketed entry of `none [integrity] confidentiality`.
pub fn parse_lockdown(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|w| w.starts_with('[') && w.ends_with(']'))
        .map(|w| w.trim_matches(['[', ']']).to_string())
}

/// Makes sure tracefs is mounted (perf tracepoints are attached through the
/// event ids it lists). Returns the directory that holds `events/`.
pub fn ensure_tracefs() -> Result<&'static str, CtguardError> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(dir);
        }
    }
    mount_pseudo("tracefs", "/sys/kernel/tracing");
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok("/sys/kernel/tracing");
    }
    Err(CtguardError::ebpf(
        "tracefs is not mounted and could not be mounted at /sys/kernel/tracing",
        "mount it with `mount -t tracefs nodev /sys/kernel/tracing` (needs root)",
    ))
}

fn mount_pseudo(fstype: &str, target: &str) {
    let (Ok(src), Ok(tgt), Ok(fs)) =
        (std::ffi::CString::new("none"), std::ffi::CString::new(target), std::ffi::CString::new(fstype))
    else {
        return;
    };
    // SAFETY: plain mount(2) with valid NUL-terminated strings; failure is
    // reported by the callers' follow-up checks.
    unsafe {
        libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null());
    }
}

/// Capabilities ctguard's kernel work needs.
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The effective capability set of this process.
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| parse_cap_eff(&s)).unwrap_or(0)
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Names of the capabilities from `needed` that `caps` lacks. CAP_SYS_ADMIN
/// stands in for CAP_BPF and CAP_PERFMON, as it does in the kernel.
pub fn missing_caps(caps: u64, needed: &[u32]) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    needed
        .iter()
        .filter(|&&c| {
            let covered_by_sys_admin = matches!(c, CAP_BPF | CAP_PERFMON) && has(CAP_SYS_ADMIN);
            !has(c) && !covered_by_sys_admin
        })
        .map(|&c| match c {
            CAP_NET_ADMIN => "CAP_NET_ADMIN",
            CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
            CAP_PERFMON => "CAP_PERFMON",
            CAP_BPF => "CAP_BPF",
            _ => "CAP_?",
        })
        .collect()
}

/// Fails with a typed error naming what is missing for eBPF work.
pub fn require_bpf_caps() -> Result<(), CtguardError> {
    let missing = missing_caps(effective_caps(), &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN]);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CtguardError::Privileges { what: format!("missing capabilities: {}", missing.join(", ")) })
    }
}

/// Total RAM in bytes (MemTotal).
pub fn mem_total_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Loads nf_conntrack when it is a module that is not loaded yet: ctguard
/// needs its BTF (struct nf_conn) and its functions in kallsyms. Loading it
/// tracks nothing by itself: conntrack hooks register only where a rule or
/// NAT asks for them. Returns true when this call loaded it.
pub fn ensure_conntrack_loaded() -> Result<bool, CtguardError> {
    if Path::new("/sys/module/nf_conntrack").exists() {
        return Ok(false);
    }
    let out =
        std::process::Command::new("modprobe").arg("nf_conntrack").output().map_err(|e| CtguardError::Conntrack {
            what: format!("nf_conntrack is not loaded and modprobe could not run: {e}"),
            hint: "install kmod, or load it yourself: modprobe nf_conntrack".into(),
        })?;
    if !out.status.success() || !Path::new("/sys/module/nf_conntrack").exists() {
        return Err(CtguardError::Conntrack {
            what: format!(
                "nf_conntrack is not loaded and `modprobe nf_conntrack` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            hint: "this kernel may lack conntrack (CONFIG_NF_CONNTRACK); `ctguard doctor` shows what it has".into(),
        });
    }
    Ok(true)
}

/// Loads nf_tables when it is an available module that is not loaded yet,
/// so `nft_do_chain` has an address when the sensors resolve where drops
/// happen (a ruleset created later would otherwise have its drops
/// classified as `other`). Loading it creates no table. Best effort: a
/// kernel without nf_tables (iptables-legacy only) is fine.
pub fn try_load_nf_tables() {
    if Path::new("/sys/module/nf_tables").exists() {
        return;
    }
    let _ = std::process::Command::new("modprobe")
        .arg("nf_tables")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockdown_picks_bracketed_mode() {
        assert_eq!(parse_lockdown("none [integrity] confidentiality\n").as_deref(), Some("integrity"));
        assert_eq!(parse_lockdown("[none] integrity confidentiality").as_deref(), Some("none"));
        assert_eq!(parse_lockdown(""), None);
    }

    #[test]
    fn cap_eff_parses_hex() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ffffffffff));
    }

    #[test]
    fn missing_caps_names_each_gap() {
        assert!(missing_caps(u64::MAX, &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN]).is_empty());
        assert_eq!(
            missing_caps(0, &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN]),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        // CAP_SYS_ADMIN covers BPF and PERFMON but not NET_ADMIN.
        assert_eq!(missing_caps(1 << CAP_SYS_ADMIN, &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN]), vec!["CAP_NET_ADMIN"]);
    }
}
