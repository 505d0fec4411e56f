//! Writing a plan to the running kernel, and putting the old values back.
//!
//! * Only from the initial network namespace ([`initial_netns`]):
//!   `nf_conntrack_max`, `nf_conntrack_buckets` and the `hashsize` module
//!   parameter are global, and the kernel makes the first two read-only
//!   (0444) in every other namespace (`nf_conntrack_standalone.c`); timeouts
//!   written there would change that namespace only.
//! * Buckets go through /sys/module/nf_conntrack/parameters/hashsize when it
//!   is writable, else through the `nf_conntrack_buckets` sysctl.
//! * Before the first write, the exact text of every file about to change is
//!   saved in the state file ([`super::state`]); when a write fails, what was
//!   already written is put back and nothing is left changed.
//! * Rollback writes the saved text back byte for byte and checks that the
//!   file reads back the same.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    plan::{Change, Knob},
    state::{self, Entry, State},
};
use crate::{conntrack::sysctl::NETFILTER_SYSCTL_DIR, error::CtguardError, kernel::system};

pub const HASHSIZE_PARAM: &str = "/sys/module/nf_conntrack/parameters/hashsize";

/// Where the knobs live (temporary directories in tests).
#[derive(Clone, Debug)]
pub struct Paths {
    pub sysctl_dir: PathBuf,
    pub hashsize_param: PathBuf,
}

impl Paths {
    pub fn system() -> Self {
        Paths { sysctl_dir: NETFILTER_SYSCTL_DIR.into(), hashsize_param: HASHSIZE_PARAM.into() }
    }
}

/// Whether this process may change the global conntrack settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "initial", rename_all = "snake_case")]
pub enum NetnsCheck {
    /// In the initial network namespace; `how` says how that was told.
    Yes {
        how: String,
    },
    No {
        reason: String,
    },
}

/// Compares /proc/self/ns/net with /proc/1/ns/net; where PID 1's is not
/// readable (containers, sandboxes), falls back to a sysctl only the
/// initial namespace registers (`net.core.netdev_max_backlog`).
pub fn initial_netns() -> NetnsCheck {
    let mine = match std::fs::metadata("/proc/self/ns/net") {
        Ok(m) => m.ino(),
        Err(e) => return NetnsCheck::No { reason: format!("cannot read /proc/self/ns/net: {e}") },
    };
    match std::fs::metadata("/proc/1/ns/net") {
        Ok(init) if init.ino() == mine => {
            NetnsCheck::Yes { how: format!("same network namespace as PID 1 (net:[{mine}])") }
        }
        Ok(init) => NetnsCheck::No {
            reason: format!("ctguard runs in network namespace net:[{mine}], PID 1 in net:[{}]", init.ino()),
        },
        Err(_) => match crate::flood::thread_in_initial_netns() {
            Ok(true) => NetnsCheck::Yes {
                how: format!(
                    "/proc/1/ns/net is not readable here, but net.core.netdev_max_backlog exists, which only the initial \
                     namespace registers (net:[{mine}])"
                ),
            },
            Ok(false) => NetnsCheck::No {
                reason: format!("net:[{mine}] has no net.core.netdev_max_backlog, so it is not the initial namespace"),
            },
            Err(e) => NetnsCheck::No { reason: format!("cannot tell which namespace this is: {e}") },
        },
    }
}

/// Fails unless this is the initial network namespace.
pub fn require_initial_netns(action: &str) -> Result<(), CtguardError> {
    match initial_netns() {
        NetnsCheck::Yes { .. } => Ok(()),
        NetnsCheck::No { reason } => Err(CtguardError::usage(
            format!("{action} works only from the initial network namespace: {reason}"),
            "nf_conntrack_max, nf_conntrack_buckets and hashsize are global: the kernel makes them read-only (0444) in \
             every other namespace, and timeouts set there change only that namespace. Run ctguard on the host, e.g. \
             `nsenter --net=/proc/1/ns/net ctguard ...`",
        )),
    }
}

fn writable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: access(2) with a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// The file that sets `knob`.
pub fn path_for(knob: &Knob, paths: &Paths) -> Result<PathBuf, CtguardError> {
    let not_writable = |path: &Path| {
        CtguardError::usage(
            format!("{} is not writable", path.display()),
            "changing conntrack settings needs root (CAP_NET_ADMIN) in the initial network namespace",
        )
    };
    match knob {
        Knob::Buckets => {
            let sysctl = paths.sysctl_dir.join(knob.file_name());
            if writable(&paths.hashsize_param) {
                Ok(paths.hashsize_param.clone())
            } else if writable(&sysctl) {
                Ok(sysctl)
            } else {
                Err(CtguardError::usage(
                    format!(
                        "neither {} nor {} is writable, so the bucket count cannot change at run time",
                        paths.hashsize_param.display(),
                        sysctl.display()
                    ),
                    "run as root in the initial network namespace, or install the emitted modprobe.d file (`--emit`) \
                     and reload nf_conntrack",
                ))
            }
        }
        Knob::Max | Knob::Timeout(_) => {
            let path = paths.sysctl_dir.join(knob.file_name());
            if !path.exists() {
                return Err(CtguardError::usage(
                    format!("{} does not exist on this kernel", path.display()),
                    "`ctguard status` lists the conntrack settings this kernel has",
                ));
            }
            if writable(&path) { Ok(path) } else { Err(not_writable(&path)) }
        }
    }
}

/// One setting written by `--apply`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub sysctl: String,
    pub path: PathBuf,
    /// The text read before writing.
    pub previous: String,
    pub written: String,
    /// The text read back after writing (the kernel may round buckets).
    pub now: String,
}

fn read(path: &Path) -> Result<String, CtguardError> {
    std::fs::read_to_string(path).map_err(|e| {
        CtguardError::usage(
            format!("cannot read {}: {e}", path.display()),
            "run as root in the initial network namespace",
        )
    })
}

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    // One write(2) of the whole text, as sysctl(8) does: /proc/sys and
    // module parameters parse a single write.
    std::fs::write(path, text.as_bytes())
}

/// Writes `changes` after saving the current values in `state_path`.
/// Refuses when a state from an earlier apply exists, unless `force`.
pub fn apply(changes: &[&Change], paths: &Paths, state_path: &Path, force: bool) -> Result<Vec<Applied>, CtguardError> {
    if changes.is_empty() {
        return Ok(vec![]);
    }
    let mut targets = Vec::new();
    for c in changes {
        targets.push((*c, path_for(&c.knob, paths)?));
    }
    let earlier = state::load(state_path)?;
    if let Some(s) = &earlier
        && !force
    {
        return Err(CtguardError::usage(
            format!(
                "an earlier `ctguard recommend --apply` ({} setting(s), saved {}) has not been rolled back; nothing written",
                s.entries.len(),
                state_path.display()
            ),
            "run `ctguard rollback` first, or add --force to apply on top of it (the state keeps the earliest saved \
             values, so a rollback still returns to the settings before the first apply)",
        ));
    }
    let mut entries = Vec::new();
    for (c, path) in &targets {
        entries.push(Entry {
            sysctl: c.sysctl.clone(),
            path: path.clone(),
            previous: read(path)?,
            applied: format!("{}\n", c.proposed),
        });
    }
    let merged =
        State::merge(earlier.clone(), entries.clone(), state::now_unix_s(), system::kernel_release(), state::boot_id());
    state::save(state_path, &merged)?;

    let mut written: Vec<&Entry> = Vec::new();
    for entry in &entries {
        if let Err(e) = write(&entry.path, &entry.applied) {
            let mut undo_failed = Vec::new();
            for done in written.iter().rev() {
                if let Err(u) = write(&done.path, &done.previous) {
                    undo_failed.push(format!("{} ({u})", done.path.display()));
                }
            }
            let what = format!("writing {} to {} failed: {e}", entry.applied.trim(), entry.path.display());
            if undo_failed.is_empty() {
                match earlier {
                    Some(s) => state::save(state_path, &s)?,
                    None => state::remove(state_path)?,
                }
                return Err(CtguardError::usage(
                    format!("{what}; the {} setting(s) already written were put back", written.len()),
                    "the kernel refused the value (EINVAL: out of its range; EPERM: not root or not the initial namespace)",
                ));
            }
            return Err(CtguardError::usage(
                format!("{what}; putting back {} failed too", undo_failed.join(", ")),
                format!("the saved values are in {}: run `ctguard rollback`", state_path.display()),
            ));
        }
        written.push(entry);
    }
    entries
        .into_iter()
        .map(|e| {
            let now = read(&e.path)?;
            Ok(Applied { sysctl: e.sysctl, path: e.path, previous: e.previous, written: e.applied, now })
        })
        .collect()
}

/// One setting put back by rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Restored {
    pub sysctl: String,
    pub path: PathBuf,
    /// The text just before the rollback.
    pub before: String,
    /// The saved text written back.
    pub restored: String,
    /// The file reads back exactly the saved text.
    pub exact: bool,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// Writes every saved value back (last applied first) and checks each reads
/// back byte for byte. With `dry_run`, only reads. The caller removes the
/// state when every entry is `exact`.
pub fn rollback(state: &State, dry_run: bool) -> Vec<Restored> {
    state
        .entries
        .iter()
        .rev()
        .map(|e| {
            let before = std::fs::read_to_string(&e.path).unwrap_or_default();
            let mut r = Restored {
                sysctl: e.sysctl.clone(),
                path: e.path.clone(),
                before: before.clone(),
                restored: e.previous.clone(),
                exact: before == e.previous,
                error: None,
            };
            if dry_run {
                return r;
            }
            if let Err(err) = write(&e.path, &e.previous) {
                r.error = Some(format!("writing {} failed: {err}", e.path.display()));
                r.exact = false;
                return r;
            }
            match std::fs::read_to_string(&e.path) {
                Ok(now) if now == e.previous => r.exact = true,
                Ok(now) => {
                    r.exact = false;
                    r.error = Some(format!("reads back {:?}, not the saved {:?}", now, e.previous));
                }
                Err(err) => {
                    r.exact = false;
                    r.error = Some(format!("cannot read it back: {err}"));
                }
            }
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recommend::plan::Origin;

    fn fake() -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().unwrap();
        let sysctl_dir = dir.path().join("netfilter");
        std::fs::create_dir(&sysctl_dir).unwrap();
        for (name, value) in [
            ("nf_conntrack_max", "262144\n"),
            ("nf_conntrack_buckets", "262144\n"),
            ("nf_conntrack_udp_timeout", "30\n"),
        ] {
            std::fs::write(sysctl_dir.join(name), value).unwrap();
        }
        let hashsize_param = dir.path().join("hashsize");
        std::fs::write(&hashsize_param, "262144\n").unwrap();
        (dir, Paths { sysctl_dir, hashsize_param })
    }

    fn change(knob: Knob, current: u64, proposed: u64) -> Change {
        Change { sysctl: knob.sysctl(), knob, current, proposed, origin: Origin::Override, reason: String::new() }
    }

    #[test]
    fn apply_saves_then_writes_and_rollback_restores_exactly() {
        let (dir, paths) = fake();
        let state_path = dir.path().join("state/rollback.json");
        let changes = [
            change(Knob::Max, 262_144, 300_000),
            change(Knob::Buckets, 262_144, 131_072),
            change(Knob::Timeout("udp_timeout".into()), 30, 10),
        ];
        let refs: Vec<&Change> = changes.iter().collect();
        let applied = apply(&refs, &paths, &state_path, false).unwrap();
        assert_eq!(applied.len(), 3);
        assert_eq!(applied[1].path, paths.hashsize_param, "hashsize is preferred for buckets");
        assert_eq!(std::fs::read_to_string(paths.sysctl_dir.join("nf_conntrack_max")).unwrap(), "300000\n");
        assert_eq!(std::fs::read_to_string(&paths.hashsize_param).unwrap(), "131072\n");
        assert_eq!(std::fs::read_to_string(paths.sysctl_dir.join("nf_conntrack_udp_timeout")).unwrap(), "10\n");

        // A second apply is refused, nothing written.
        let again = [change(Knob::Max, 300_000, 400_000)];
        let e = apply(&again.iter().collect::<Vec<_>>(), &paths, &state_path, false).unwrap_err().to_string();
        assert!(e.contains("not been rolled back") && e.contains("--force"), "{e}");
        assert_eq!(std::fs::read_to_string(paths.sysctl_dir.join("nf_conntrack_max")).unwrap(), "300000\n");
        // With --force it applies and keeps the earliest previous value.
        apply(&again.iter().collect::<Vec<_>>(), &paths, &state_path, true).unwrap();
        let saved = state::load(&state_path).unwrap().unwrap();
        assert_eq!(saved.entries.len(), 3);
        assert_eq!(saved.entries[0].previous, "262144\n");
        assert_eq!(saved.entries[0].applied, "400000\n");

        let restored = rollback(&saved, false);
        assert!(restored.iter().all(|r| r.exact && r.error.is_none()), "{restored:?}");
        assert_eq!(std::fs::read_to_string(paths.sysctl_dir.join("nf_conntrack_max")).unwrap(), "262144\n");
        assert_eq!(std::fs::read_to_string(&paths.hashsize_param).unwrap(), "262144\n");
        assert_eq!(std::fs::read_to_string(paths.sysctl_dir.join("nf_conntrack_udp_timeout")).unwrap(), "30\n");
    }

    #[test]
    fn a_failed_write_puts_back_what_was_written() {
        let (dir, paths) = fake();
        let state_path = dir.path().join("rollback.json");
        // A directory where the timeout file should be: the write fails.
        std::fs::create_dir(paths.sysctl_dir.join("nf_conntrack_generic_timeout")).unwrap();
        let changes = [change(Knob::Max, 262_144, 300_000), change(Knob::Timeout("generic_timeout".into()), 600, 60)];
        let refs: Vec<&Change> = changes.iter().collect();
        let e = apply(&refs, &paths, &state_path, false).unwrap_err().to_string();
        assert!(e.contains("generic_timeout"), "{e}");
        assert_eq!(std::fs::read_to_string(paths.sysctl_dir.join("nf_conntrack_max")).unwrap(), "262144\n");
        assert!(!state_path.exists(), "no state left behind");
    }

    #[test]
    fn missing_knob_is_refused_before_anything_is_written() {
        let (dir, paths) = fake();
        let state_path = dir.path().join("rollback.json");
        let changes = [change(Knob::Max, 262_144, 300_000), change(Knob::Timeout("nope".into()), 1, 2)];
        let e = apply(&changes.iter().collect::<Vec<_>>(), &paths, &state_path, false).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert_eq!(std::fs::read_to_string(paths.sysctl_dir.join("nf_conntrack_max")).unwrap(), "262144\n");
        assert!(!state_path.exists());
    }

    #[test]
    fn buckets_fall_back_to_the_sysctl() {
        let (_dir, mut paths) = fake();
        paths.hashsize_param = "/nonexistent/ctguard/hashsize".into();
        assert_eq!(path_for(&Knob::Buckets, &paths).unwrap(), paths.sysctl_dir.join("nf_conntrack_buckets"));
    }

    #[test]
    fn rollback_dry_run_writes_nothing() {
        let (dir, paths) = fake();
        let path = paths.sysctl_dir.join("nf_conntrack_max");
        let s = State::merge(
            None,
            vec![Entry { sysctl: "m".into(), path: path.clone(), previous: "1\n".into(), applied: "2\n".into() }],
            0,
            String::new(),
            None,
        );
        let r = rollback(&s, true);
        assert!(!r[0].exact);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "262144\n");
        drop(dir);
    }

    #[test]
    fn this_process_namespace_is_classified() {
        // Whatever the answer, it comes with an explanation.
        match initial_netns() {
            NetnsCheck::Yes { how } => assert!(how.contains("net:["), "{how}"),
            NetnsCheck::No { reason } => assert!(!reason.is_empty()),
        }
    }
}
