//! Network namespaces: naming them, listing them, and running code inside one.
//!
//! Conntrack state is per namespace (its /proc/net/stat/nf_conntrack, its
//! entry count), so ctguard reads it from a thread that has `setns`-ed into the
//! namespace; the rest of the process stays where it was.
use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::error::CtguardError;

/// Where named namespaces (`ip netns add NAME`) are bind-mounted.
pub const NAMED_NETNS_DIR: &str = "/run/netns";

/// A network namespace ctguard can enter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Netns {
    /// The namespace's inode number: what the kernel programs report.
    pub inode: u32,
    /// `ip netns` name, if it has one.
    pub name: Option<String>,
    /// A path that opens it.
    pub path: PathBuf,
}

impl Netns {
    /// The namespace this process runs in.
    pub fn current() -> Result<Self, CtguardError> {
        Self::from_path(Path::new("/proc/self/ns/net"), None)
            .map(|ns| Netns { path: PathBuf::from("/proc/self/ns/net"), ..ns })
    }

    fn from_path(path: &Path, name: Option<String>) -> Result<Self, CtguardError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| CtguardError::Netns { name: path.display().to_string(), what: format!("cannot open: {e}") })?;
        Ok(Netns { inode: meta.ino() as u32, name, path: path.to_path_buf() })
    }

    /// A label for humans: the name, or `inode N`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("netns:[{}]", self.inode),
        }
    }

    /// Resolves `NAME`, a path, an inode number, or `all` to namespaces.
    pub fn resolve(spec: Option<&str>) -> Result<Vec<Netns>, CtguardError> {
        match spec {
            None => Ok(vec![Self::current()?]),
            Some("all") => list_all(),
            Some(s) if s.contains('/') => Ok(vec![Self::from_path(Path::new(s), None)?]),
            Some(s) if s.chars().all(|c| c.is_ascii_digit()) => {
                let inode: u32 = s
                    .parse()
                    .map_err(|_| CtguardError::Netns { name: s.into(), what: "not a valid inode number".into() })?;
                list_all()?.into_iter().find(|ns| ns.inode == inode).map(|ns| vec![ns]).ok_or_else(|| {
                    CtguardError::Netns { name: s.into(), what: "no process or name holds this namespace".into() }
                })
            }
            Some(name) => {
                let path = Path::new(NAMED_NETNS_DIR).join(name);
                if !path.exists() {
                    return Err(CtguardError::Netns {
                        name: name.into(),
                        what: format!("{} does not exist", path.display()),
                    });
                }
                Ok(vec![Self::from_path(&path, Some(name.to_string()))?])
            }
        }
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its
    /// result. The calling thread's namespace never changes.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, CtguardError> {
        let file = File::open(&self.path).map_err(|e| self.error(format!("cannot open: {e}")))?;
        let label = self.label();
        std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(CtguardError::Netns {
                    name: label,
                    what: format!("cannot enter (setns: {e}); entering a namespace needs CAP_SYS_ADMIN"),
                });
            }
            Ok(f())
        })
        .join()
        .map_err(|_| self.error("the worker thread panicked".into()))?
    }

    fn error(&self, what: String) -> CtguardError {
        CtguardError::Netns { name: self.label(), what }
    }
}

/// Every namespace reachable through a name in /run/netns or a process in
/// /proc, one entry per inode (named ones first), sorted by inode.
pub fn list_all() -> Result<Vec<Netns>, CtguardError> {
    let mut by_inode: BTreeMap<u32, Netns> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(NAMED_NETNS_DIR) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(ns) = Netns::from_path(&entry.path(), Some(name)) {
                by_inode.entry(ns.inode).or_insert(ns);
            }
        }
    }
    let proc = std::fs::read_dir("/proc")
        .map_err(|e| CtguardError::Netns { name: "all".into(), what: format!("cannot list /proc: {e}") })?;
    for entry in proc.flatten() {
        let pid = entry.file_name();
        if !pid.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Ok(ns) = Netns::from_path(&path, None) {
            by_inode.entry(ns.inode).or_insert(ns);
        }
    }
    Ok(by_inode.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_namespace_is_listed_and_resolvable() {
        let me = Netns::current().unwrap();
        assert!(me.inode > 0);
        let all = list_all().unwrap();
        assert!(all.iter().any(|ns| ns.inode == me.inode));
        let by_inode = Netns::resolve(Some(&me.inode.to_string())).unwrap();
        assert_eq!(by_inode[0].inode, me.inode);
    }

    #[test]
    fn unknown_name_is_a_clear_error() {
        let err = Netns::resolve(Some("ctguard-no-such-netns")).unwrap_err().to_string();
        assert!(err.contains("ctguard-no-such-netns"), "{err}");
        assert!(err.contains("hint"), "{err}");
    }

    #[test]
    fn run_returns_the_closure_value() {
        let me = Netns::current().unwrap();
        assert_eq!(me.run(|| 41 + 1).unwrap(), 42);
    }
}
