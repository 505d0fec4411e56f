//! Reading the facts a plan needs: RAM, page size, the slab object size, a
//! `hashsize=` module option, the settings in force and every namespace's
//! own entry count. The parsers are pure and unit-tested.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use super::{
    formulas::FALLBACK_OBJECT_SIZE,
    plan::{Current, Host},
};
use crate::{
    conntrack::{self, ObjectSizeSource, sysctl},
    error::CtguardError,
    kernel::system,
    netns::{self, Netns},
};

/// Where modprobe reads `options` lines, in its own order of precedence.
pub const MODPROBE_DIRS: [&str; 5] =
    ["/etc/modprobe.d", "/run/modprobe.d", "/usr/local/lib/modprobe.d", "/lib/modprobe.d", "/usr/lib/modprobe.d"];
pub const CMDLINE: &str = "/proc/cmdline";

pub fn host() -> Result<Host, CtguardError> {
    let ram_bytes = system::mem_total_bytes().ok_or_else(|| CtguardError::Conntrack {
        what: "cannot read MemTotal from /proc/meminfo".into(),
        hint: "the sizing formulas start from RAM; check that /proc is mounted".into(),
    })?;
    // SAFETY: sysconf has no preconditions.
    let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    };
    let (object_size, object_size_source) = match conntrack::memory::lookup_object_size() {
        Some(o) => (
            o.bytes,
            match o.source {
                ObjectSizeSource::Sysfs => "sysfs",
                ObjectSizeSource::Slabinfo => "slabinfo",
            },
        ),
        None => (FALLBACK_OBJECT_SIZE, "assumed"),
    };
    let (hashsize_option, hashsize_option_source) = match hashsize_option() {
        Some((n, src)) => (Some(n), Some(src)),
        None => (None, None),
    };
    Ok(Host {
        ram_bytes,
        page_size,
        arch_bits: usize::BITS,
        kernel_release: system::kernel_release(),
        object_size,
        object_size_source: object_size_source.into(),
        hashsize_option,
        hashsize_option_source,
    })
}

/// `nf_conntrack.hashsize=` from the kernel command line, else the last
/// `options nf_conntrack … hashsize=N` in modprobe.d, with where it was found.
pub fn hashsize_option() -> Option<(u64, String)> {
    if let Some(n) = std::fs::read_to_string(CMDLINE).ok().as_deref().and_then(parse_cmdline_hashsize) {
        return Some((n, format!("{CMDLINE} (nf_conntrack.hashsize={n})")));
    }
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    // A file name in an earlier directory hides the same name in later ones.
    for dir in MODPROBE_DIRS.iter().rev() {
        let Ok(listing) = std::fs::read_dir(dir) else { continue };
        for entry in listing.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".conf") {
                files.insert(name, entry.path());
            }
        }
    }
    let mut found = None;
    for path in files.values() {
        if let Some(n) = std::fs::read_to_string(path).ok().as_deref().and_then(parse_modprobe_hashsize) {
            found = Some((n, format!("{} (options nf_conntrack hashsize={n})", path.display())));
        }
    }
    found
}

pub fn parse_cmdline_hashsize(text: &str) -> Option<u64> {
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix("nf_conntrack.hashsize="))
        .filter_map(|v| v.parse().ok())
        .next_back()
}

pub fn parse_modprobe_hashsize(text: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("options")
            || words.next().map(|m| m.replace('-', "_")).as_deref() != Some("nf_conntrack")
        {
            continue;
        }
        for w in words {
            if let Some(n) = w.strip_prefix("hashsize=").and_then(|v| v.parse().ok()) {
                found = Some(n);
            }
        }
    }
    found
}

/// A namespace whose table was read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NsSeen {
    pub inode: u32,
    pub label: String,
    pub entries: u64,
}

/// The settings in force (read in this process's namespace) and each
/// namespace's count. Namespaces that cannot be entered (not root) or that
/// vanish are skipped; `skipped` says how many.
pub fn current() -> Result<(Current, Vec<NsSeen>, usize), CtguardError> {
    let here = Netns::current()?;
    let view = conntrack::read_netns(&here)?;
    let Some(table) = view.active() else {
        let reason = match &view {
            conntrack::ConntrackView::NotActive { reason } => reason.clone(),
            _ => String::new(),
        };
        return Err(CtguardError::Conntrack {
            what: format!("nothing to size here: {reason}"),
            hint: "conntrack loads with the first rule that uses it (NAT, `ct state`), or with `modprobe nf_conntrack`; then run ctguard recommend again".into(),
        });
    };
    let timeouts = sysctl::read_timeouts(Path::new(sysctl::NETFILTER_SYSCTL_DIR))?;
    let mut seen = vec![NsSeen { inode: here.inode, label: here.label(), entries: table.entries }];
    let mut skipped = 0;
    for ns in netns::list_all().unwrap_or_default() {
        if ns.inode == here.inode {
            continue;
        }
        match conntrack::read_netns(&ns) {
            Ok(v) => {
                if let Some(t) = v.active() {
                    seen.push(NsSeen { inode: ns.inode, label: ns.label(), entries: t.entries });
                }
            }
            Err(e) => {
                log::debug!("skipping {}: {e}", ns.label());
                skipped += 1;
            }
        }
    }
    let entries = seen.iter().map(|s| (s.inode, s.entries)).collect();
    Ok((Current { max: table.max, buckets: table.buckets, timeouts, entries }, seen, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashsize_on_the_command_line() {
        assert_eq!(
            parse_cmdline_hashsize("BOOT_IMAGE=/vmlinuz ro nf_conntrack.hashsize=131072 quiet\n"),
            Some(131_072)
        );
        assert_eq!(parse_cmdline_hashsize("ro quiet"), None);
        assert_eq!(parse_cmdline_hashsize("nf_conntrack.hashsize=x"), None);
    }

    #[test]
    fn hashsize_in_modprobe_d() {
        let text = "# comment\noptions nf_conntrack hashsize=262144\noptions other hashsize=1\n";
        assert_eq!(parse_modprobe_hashsize(text), Some(262_144));
        assert_eq!(parse_modprobe_hashsize("options nf-conntrack expect_hashsize=9 hashsize=4096 # x"), Some(4096));
        assert_eq!(parse_modprobe_hashsize("#options nf_conntrack hashsize=4096"), None);
        assert_eq!(parse_modprobe_hashsize("options nf_conntrack_ipv4 hashsize=4096"), None);
    }
}
