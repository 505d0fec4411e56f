//! The `net.netfilter.nf_conntrack_*` sysctls. Net sysctls resolve to the
//! network namespace of the thread that opens them, so these functions read
//! the calling thread's namespace.
use std::{collections::BTreeMap, io::ErrorKind, path::Path};

use crate::error::CtguardError;

pub const NETFILTER_SYSCTL_DIR: &str = "/proc/sys/net/netfilter";
pub const COUNT: &str = "nf_conntrack_count";
pub const MAX: &str = "nf_conntrack_max";
pub const BUCKETS: &str = "nf_conntrack_buckets";

const CONNTRACK_PREFIX: &str = "nf_conntrack_";

/// Conntrack timeouts in seconds, keyed by sysctl name without the
/// `nf_conntrack_` prefix (`tcp_timeout_established`, `udp_timeout`, ...).
pub type Timeouts = BTreeMap<String, u64>;

/// An integer sysctl, or `None` when this namespace does not have it.
pub fn read_optional(dir: &Path, name: &str) -> Result<Option<u64>, CtguardError> {
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CtguardError::Conntrack {
                what: format!("cannot read {}: {e}", path.display()),
                hint: "ctguard reads net.netfilter sysctls through /proc/sys; check that /proc is mounted and readable"
                    .into(),
            });
        }
    };
    parse_value(&text).map(Some).ok_or_else(|| CtguardError::Conntrack {
        what: format!("{} holds `{}`, not a non-negative integer", path.display(), text.trim()),
        hint: "this kernel formats the sysctl differently from what ctguard knows; please report it".into(),
    })
}

/// An integer sysctl that must exist once conntrack is loaded.
pub fn read_required(dir: &Path, name: &str) -> Result<u64, CtguardError> {
    read_optional(dir, name)?.ok_or_else(|| CtguardError::Conntrack {
        what: format!("{} is missing although nf_conntrack_count exists", dir.join(name).display()),
        hint: "this namespace hides some conntrack sysctls (older kernels do so in namespaces owned by a user namespace); run ctguard from the initial user namespace".into(),
    })
}

/// Every `nf_conntrack_*timeout*` sysctl in `dir`; empty when there is none.
pub fn read_timeouts(dir: &Path) -> Result<Timeouts, CtguardError> {
    let Ok(listing) = std::fs::read_dir(dir) else { return Ok(Timeouts::new()) };
    let mut timeouts = Timeouts::new();
    for entry in listing.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(key) = timeout_key(&file_name) else { continue };
        if let Some(seconds) = read_optional(dir, &file_name)? {
            timeouts.insert(key.to_string(), seconds);
        }
    }
    Ok(timeouts)
}

/// `nf_conntrack_tcp_timeout_established` -> `tcp_timeout_established`;
/// `None` for sysctls that are not conntrack timeouts.
pub fn timeout_key(file_name: &str) -> Option<&str> {
    file_name.strip_prefix(CONNTRACK_PREFIX).filter(|rest| rest.contains("timeout"))
}

/// A sysctl's text (`262144\n`) as a number.
pub fn parse_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_keys() {
        assert_eq!(timeout_key("nf_conntrack_tcp_timeout_established"), Some("tcp_timeout_established"));
        assert_eq!(timeout_key("nf_conntrack_udp_timeout"), Some("udp_timeout"));
        assert_eq!(timeout_key("nf_conntrack_generic_timeout"), Some("generic_timeout"));
        assert_eq!(timeout_key("nf_conntrack_tcp_max_retrans"), None);
        assert_eq!(timeout_key("nf_conntrack_max"), None);
        assert_eq!(timeout_key("nf_log_timeout"), None, "not a conntrack sysctl");
    }

    #[test]
    fn values() {
        assert_eq!(parse_value("262144\n"), Some(262_144));
        assert_eq!(parse_value(" 0 "), Some(0));
        assert_eq!(parse_value("-1\n"), None);
        assert_eq!(parse_value("1 2\n"), None);
    }

    #[test]
    fn reads_a_sysctl_directory() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, value: &str| std::fs::write(dir.path().join(name), value).unwrap();
        write("nf_conntrack_count", "996\n");
        write("nf_conntrack_max", "262144\n");
        write("nf_conntrack_tcp_timeout_established", "432000\n");
        write("nf_conntrack_udp_timeout", "30\n");
        write("nf_conntrack_tcp_loose", "1\n");
        assert_eq!(read_optional(dir.path(), COUNT).unwrap(), Some(996));
        assert_eq!(read_optional(dir.path(), BUCKETS).unwrap(), None);
        let err = read_required(dir.path(), BUCKETS).unwrap_err().to_string();
        assert!(err.contains("nf_conntrack_buckets") && err.contains("hint"), "{err}");
        let timeouts = read_timeouts(dir.path()).unwrap();
        assert_eq!(timeouts.len(), 2);
        assert_eq!(timeouts["tcp_timeout_established"], 432_000);
        assert_eq!(timeouts["udp_timeout"], 30);

        write("nf_conntrack_max", "lots\n");
        let err = read_required(dir.path(), MAX).unwrap_err().to_string();
        assert!(err.contains("`lots`"), "{err}");
    }

    #[test]
    fn missing_directory_has_no_timeouts() {
        assert!(read_timeouts(Path::new("/nonexistent/ctguard")).unwrap().is_empty());
    }
}
