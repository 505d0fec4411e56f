//! One namespace's conntrack table as its own files show it: entries, max,
//! buckets and the per-CPU counters.
use std::{
    collections::BTreeMap,
    io::ErrorKind,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::{
    stats::{Counters, StatTable, parse_stat},
    sysctl,
};
use crate::{error::CtguardError, netns::Netns};

/// /proc/self/net follows the process's main thread, so a thread that entered
/// another namespace must read its own view through /proc/thread-self.
pub const THREAD_STAT_FILE: &str = "/proc/thread-self/net/stat/nf_conntrack";
const THREAD_NETNS_LINK: &str = "/proc/thread-self/ns/net";

/// Where a namespace's conntrack files are.
#[derive(Clone, Debug)]
pub struct Sources {
    pub stat_file: PathBuf,
    pub sysctl_dir: PathBuf,
}

impl Sources {
    /// The calling thread's namespace: net sysctls resolve to the namespace
    /// of the thread that opens them, /proc/thread-self/net likewise.
    pub fn this_thread() -> Self {
        Sources { stat_file: THREAD_STAT_FILE.into(), sysctl_dir: sysctl::NETFILTER_SYSCTL_DIR.into() }
    }
}

/// A namespace where conntrack is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveTable {
    /// nf_conntrack_count: entries in this namespace.
    pub entries: u64,
    /// nf_conntrack_max: one global limit, applied to each namespace's count.
    pub max: u64,
    /// nf_conntrack_buckets: the size of the hash table all namespaces share.
    pub buckets: u64,
    pub stats: StatTable,
}

impl ActiveTable {
    pub fn fill_percent(&self) -> Option<f64> {
        fill_percent(self.entries, self.max)
    }
}

/// Entries as a percentage of max; `None` when max is 0, which the kernel
/// treats as "no limit".
pub fn fill_percent(entries: u64, max: u64) -> Option<f64> {
    (max > 0).then(|| entries as f64 * 100.0 / max as f64)
}

/// What one namespace's conntrack looks like now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConntrackView {
    Active(ActiveTable),
    /// Nothing to read here; `reason` says what is missing.
    NotActive {
        reason: String,
    },
}

impl ConntrackView {
    pub fn active(&self) -> Option<&ActiveTable> {
        match self {
            ConntrackView::Active(table) => Some(table),
            ConntrackView::NotActive { .. } => None,
        }
    }

    /// Counters summed over the CPUs (`entries` taken once), when active.
    pub fn summed(&self) -> Option<Counters> {
        self.active().map(|table| table.stats.summed())
    }
}

/// Reads the view from `sources` (the calling thread's namespace for
/// [`Sources::this_thread`]).
pub fn read_from(sources: &Sources) -> Result<ConntrackView, CtguardError> {
    let Some(stat_text) = read_stat_text(&sources.stat_file)? else {
        return Ok(ConntrackView::NotActive {
            reason: "no /proc/net/stat/nf_conntrack: the nf_conntrack module is not loaded \
                     (or the kernel lacks CONFIG_NF_CONNTRACK_PROCFS)"
                .into(),
        });
    };
    let dir = &sources.sysctl_dir;
    let Some(entries) = sysctl::read_optional(dir, sysctl::COUNT)? else {
        return Ok(ConntrackView::NotActive {
            reason: "no net.netfilter.nf_conntrack_count sysctl in this namespace".into(),
        });
    };
    let max = sysctl::read_required(dir, sysctl::MAX)?;
    let buckets = sysctl::read_required(dir, sysctl::BUCKETS)?;
    let stats = parse_stat(&stat_text).map_err(|e| unparsable(&sources.stat_file, e))?;
    Ok(ConntrackView::Active(ActiveTable { entries, max, buckets, stats }))
}

/// The view of the calling thread's namespace.
pub fn read_current_netns() -> Result<ConntrackView, CtguardError> {
    read_from(&Sources::this_thread())
}

/// The view of `ns`, read from inside it. Cheap: three sysctls and one
/// small /proc file, plus a short-lived thread when `ns` is not ours.
pub fn read_netns(ns: &Netns) -> Result<ConntrackView, CtguardError> {
    run_in(ns, read_current_netns)?
}

/// Runs `f` in `ns`: directly when the calling thread is already there
/// (entering a namespace needs CAP_SYS_ADMIN even when it is one's own),
/// otherwise on a thread that entered it with [`Netns::run`].
pub fn run_in<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> Result<T, CtguardError> {
    let here = std::fs::metadata(THREAD_NETNS_LINK).map(|m| m.ino() as u32);
    if here.is_ok_and(|inode| inode == ns.inode) { Ok(f()) } else { ns.run(f) }
}

/// Summed per-CPU counters of /proc/net/stat/nf_conntrack in the calling
/// thread's namespace (`entries` taken once); an error when conntrack is
/// not loaded. Call it on the namespace's thread, e.g. through `Netns::run`.
pub fn read_current_counters() -> Result<BTreeMap<String, u64>, CtguardError> {
    let path = Path::new(THREAD_STAT_FILE);
    let text = read_stat_text(path)?.ok_or_else(|| CtguardError::Conntrack {
        what: "no /proc/net/stat/nf_conntrack in this namespace".into(),
        hint: "nf_conntrack is not loaded; it loads when a rule uses conntrack (e.g. `ct state`), or with `modprobe nf_conntrack`".into(),
    })?;
    let table = parse_stat(&text).map_err(|e| unparsable(path, e))?;
    Ok(table.summed().iter().map(|(name, value)| (name.to_string(), value)).collect())
}

/// The stat file's text, or `None` when it does not exist.
fn read_stat_text(path: &Path) -> Result<Option<String>, CtguardError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CtguardError::Conntrack {
            what: format!("cannot read {}: {e}", path.display()),
            hint: "check that /proc is mounted and readable".into(),
        }),
    }
}

fn unparsable(path: &Path, e: super::stats::ParseError) -> CtguardError {
    CtguardError::Conntrack {
        what: format!("cannot parse {}: {e}", path.display()),
        hint: "this kernel prints a layout ctguard does not know; please report it with the file's contents".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources_in(dir: &Path) -> Sources {
        Sources { stat_file: dir.join("nf_conntrack"), sysctl_dir: dir.join("netfilter") }
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn reads_an_active_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources_in(dir.path());
        std::fs::create_dir(&src.sysctl_dir).unwrap();
        std::fs::write(&src.stat_file, fixture("stat_nf_conntrack_6.18.txt")).unwrap();
        for (name, value) in
            [("nf_conntrack_count", "996\n"), ("nf_conntrack_max", "262144\n"), ("nf_conntrack_buckets", "262144\n")]
        {
            std::fs::write(src.sysctl_dir.join(name), value).unwrap();
        }
        let view = read_from(&src).unwrap();
        let table = view.active().expect("active");
        assert_eq!((table.entries, table.max, table.buckets), (996, 262_144, 262_144));
        assert_eq!(view.summed().unwrap().get("entries"), Some(996));
        assert!((table.fill_percent().unwrap() - 0.3799).abs() < 0.001);
    }

    #[test]
    fn missing_files_mean_not_active() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources_in(dir.path());
        let ConntrackView::NotActive { reason } = read_from(&src).unwrap() else { panic!("expected not active") };
        assert!(reason.contains("not loaded"), "{reason}");

        std::fs::write(&src.stat_file, fixture("stat_nf_conntrack_6.18.txt")).unwrap();
        let ConntrackView::NotActive { reason } = read_from(&src).unwrap() else { panic!("expected not active") };
        assert!(reason.contains("nf_conntrack_count"), "{reason}");
    }

    #[test]
    fn garbage_stat_file_is_an_error_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources_in(dir.path());
        std::fs::create_dir(&src.sysctl_dir).unwrap();
        std::fs::write(&src.stat_file, "entries drop\n0000zz 1\n").unwrap();
        for name in ["nf_conntrack_count", "nf_conntrack_max", "nf_conntrack_buckets"] {
            std::fs::write(src.sysctl_dir.join(name), "1\n").unwrap();
        }
        let err = read_from(&src).unwrap_err().to_string();
        assert!(err.contains("cannot parse") && err.contains("hint"), "{err}");
    }

    #[test]
    fn fill_percent_treats_zero_max_as_unlimited() {
        assert_eq!(fill_percent(0, 0), None);
        assert_eq!(fill_percent(850, 1000), Some(85.0));
    }

    #[test]
    fn reads_this_namespace_without_failing() {
        // Conntrack may or may not be loaded here; either answer is fine.
        let view = read_netns(&Netns::current().unwrap()).unwrap();
        if let Some(table) = view.active() {
            assert!(!table.stats.per_cpu().is_empty());
        }
    }
}
