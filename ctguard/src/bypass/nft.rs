//! Running `nft`, in the namespace the user chose.
//!
//! nft is started directly (never through a shell) from a thread that has
//! entered the target network namespace with setns(2); a child process
//! inherits the namespace of the thread that forks it. Reads use
//! `nft -j list ruleset`; writes pipe one JSON document to `nft -j -f -`,
//! which nft sends to the kernel as one netlink batch: nf_tables applies
//! the whole batch or, on any error, none of it.
//!
//! ctguard's read-check-write sequences are serialized across processes by
//! an flock on [`LOCK_PATH`] (released by the kernel if ctguard dies), and
//! every rule it deletes is named by handle, so a change made meanwhile by
//! something else makes the transaction fail instead of doing the wrong thing.
use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::fd::AsRawFd,
    process::{Command, Stdio},
};

use super::error::BypassError;
use crate::{error::CtguardError, netns::Netns};

/// The lock that serializes ctguard's own bypass changes.
pub const LOCK_PATH: &str = "/run/ctguard-bypass.lock";

/// Where nft runs.
#[derive(Clone, Debug)]
pub struct Nft {
    /// `None`: the namespace ctguard runs in.
    pub netns: Option<Netns>,
}

impl Nft {
    /// The namespace's label for messages: ` in netns NAME` or empty.
    pub fn place(&self) -> String {
        self.netns.as_ref().map_or_else(String::new, |ns| format!(" in netns {}", ns.label()))
    }

    fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        match &self.netns {
            None => Ok(f()),
            Some(ns) => {
                ns.run(f).map_err(|e| netns_error(e, "run ctguard as root: entering a namespace needs CAP_SYS_ADMIN"))
            }
        }
    }

    /// `nft -j list ruleset`.
    pub fn list_ruleset(&self) -> anyhow::Result<String> {
        let out = self.in_netns(|| run_nft(&["-j", "list", "ruleset"], None))??;
        Ok(out)
    }

    /// Applies a transaction document with `nft -j -f -`.
    pub fn apply(&self, document: String) -> anyhow::Result<()> {
        self.in_netns(move || run_nft(&["-j", "-f", "-"], Some(document)))??;
        Ok(())
    }

    /// Legacy iptables tables loaded in the namespace (`nat`, `filter`, ...).
    pub fn legacy_iptables_tables(&self) -> anyhow::Result<Vec<String>> {
        self.in_netns(|| {
            let mut names = Vec::new();
            // thread-self: /proc/self/net would show the main thread's namespace.
            for file in ["/proc/thread-self/net/ip_tables_names", "/proc/thread-self/net/ip6_tables_names"] {
                if let Ok(text) = std::fs::read_to_string(file) {
                    names.extend(text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
                }
            }
            names.sort();
            names.dedup();
            names
        })
    }
}

fn run_nft(args: &[&str], stdin: Option<String>) -> Result<String, BypassError> {
    let shown = format!("nft {}", args.join(" "));
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                "install nftables (Debian/Ubuntu: apt install nftables) so `nft` is in PATH"
            } else {
                "check that `nft` can be executed"
            };
            BypassError::nft(format!("cannot run `{shown}`: {e}"), hint)
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A short write (nft died) shows up as nft's own error below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| BypassError::nft(format!("`{shown}`: {e}"), "retry"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        let hint = if stderr.contains("Operation not permitted") {
            "run ctguard as root or with CAP_NET_ADMIN (plus CAP_SYS_ADMIN for --netns)"
        } else if stderr.contains("No such file or directory") || stderr.contains("Device or resource busy") {
            "the ruleset changed while ctguard was working (or table inet ctguard was edited by hand); nothing was applied: run the command again"
        } else {
            "nothing was applied (nft applies a transaction completely or not at all); run with --dry-run to see the commands"
        };
        return Err(BypassError::nft(format!("`{shown}` failed ({}): {stderr}", out.status), hint));
    }
    String::from_utf8(out.stdout)
        .map_err(|e| BypassError::nft(format!("`{shown}` printed non-UTF-8: {e}"), "report this"))
}

/// Holds [`LOCK_PATH`] until dropped.
pub struct Lock {
    _file: Option<File>,
}

impl Lock {
    /// Waits for the lock. Without a writable /run the lock is skipped
    /// (nft's transactions stay atomic; only concurrent ctguards could race).
    pub fn acquire() -> Lock {
        let file = match OpenOptions::new().create(true).truncate(false).write(true).open(LOCK_PATH) {
            Ok(f) => f,
            Err(e) => {
                log::debug!("cannot open {LOCK_PATH}: {e}; continuing without the lock");
                return Lock { _file: None };
            }
        };
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Lock { _file: Some(file) };
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                log::debug!("cannot lock {LOCK_PATH}: {e}; continuing without the lock");
                return Lock { _file: None };
            }
        }
    }
}

/// Resolves `--netns` to one namespace.
pub fn resolve_netns(spec: Option<&str>) -> anyhow::Result<Option<Netns>> {
    match spec {
        None => Ok(None),
        Some("all") => Err(BypassError::usage(
            "--netns all: bypass rules are changed in one namespace at a time",
            "name one namespace (`ip netns list`), a path such as /proc/PID/ns/net, or an inode number",
        )
        .into()),
        Some(s) => Ok(Netns::resolve(Some(s))
            .map_err(|e| {
                netns_error(e, "name one from `ip netns list`, a path such as /proc/PID/ns/net, or an inode number")
            })?
            .into_iter()
            .next()),
    }
}

/// Namespace errors with a hint that fits bypass (which takes one namespace).
fn netns_error(e: CtguardError, hint: &str) -> anyhow::Error {
    match e {
        CtguardError::Netns { name, what } => {
            BypassError::usage(format!("network namespace {name}: {what}"), hint).into()
        }
        other => other.into(),
    }
}
