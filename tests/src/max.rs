//! Lowering the global `net.netfilter.nf_conntrack_max` for a test, and
//! always putting it back.
//!
//! The value is global (the kernel compares every namespace's own entry count
//! against it) and writable only from the initial network namespace, where
//! the test process runs. A lowered value affects the whole machine, so:
//!
//! * [`MaxGuard::lower`] records the original value in [`STATE_FILE`] before
//!   changing anything, and the guard's `Drop` restores it, also when the test
//!   panics;
//! * if the process is killed before that, the next [`MaxGuard::lower`] or
//!   [`crate::Lab::new`] (through [`MaxGuard::restore_stale`]) restores the
//!   value from the state file.
use std::{
    fs,
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
};

use crate::{lock::SerialGuard, root};

/// The global maximum.
pub const NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// Holds the value to restore while a guard is active (or after a crash).
pub const STATE_FILE: &str = "/run/ctguard-test-nf_conntrack_max.orig";

/// True while a guard of this process is alive.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Keeps `nf_conntrack_max` lowered until dropped.
#[must_use = "the original nf_conntrack_max is restored when the guard is dropped"]
pub struct MaxGuard {
    original: u64,
    lowered: u64,
    _lock: SerialGuard,
}

impl MaxGuard {
    /// Sets the global nf_conntrack_max to `n` (only one guard at a time).
    pub fn lower(n: u64) -> MaxGuard {
        root::require_root();
        if !root::in_initial_netns() {
            panic!("MaxGuard must run in the initial network namespace: {NF_CONNTRACK_MAX} is read-only elsewhere");
        }
        let lock = SerialGuard::acquire();
        if ACTIVE.load(Ordering::SeqCst) {
            panic!("MaxGuard::lower called while another MaxGuard is alive; drop the first one");
        }
        restore_from_state_file();
        let original = read_max();
        write_state_file(original);
        write_max(n).unwrap_or_else(|e| {
            let _ = fs::remove_file(STATE_FILE);
            panic!("cannot set {NF_CONNTRACK_MAX} to {n}: {e}")
        });
        ACTIVE.store(true, Ordering::SeqCst);
        MaxGuard { original, lowered: n, _lock: lock }
    }

    /// The value restored on drop.
    pub fn original(&self) -> u64 {
        self.original
    }

    /// The value set by [`lower`](Self::lower).
    pub fn lowered(&self) -> u64 {
        self.lowered
    }

    /// Restores nf_conntrack_max from a state file a killed test left behind.
    /// Returns the value restored, or `None` when there was nothing to do (or a
    /// guard of this process is alive).
    pub fn restore_stale() -> Option<u64> {
        let _lock = SerialGuard::acquire();
        if ACTIVE.load(Ordering::SeqCst) {
            return None;
        }
        restore_from_state_file()
    }
}

impl Drop for MaxGuard {
    fn drop(&mut self) {
        match write_max(self.original) {
            Ok(()) => {
                let _ = fs::remove_file(STATE_FILE);
            }
            Err(e) => {
                // Keep the state file: the next run restores from it.
                let msg = format!(
                    "CANNOT RESTORE {NF_CONNTRACK_MAX} to {} (it is {}): {e}; \
                     run `sysctl -w net.netfilter.nf_conntrack_max={}`",
                    self.original, self.lowered, self.original
                );
                eprintln!("{msg}");
                if !std::thread::panicking() {
                    ACTIVE.store(false, Ordering::SeqCst);
                    panic!("{msg}");
                }
            }
        }
        ACTIVE.store(false, Ordering::SeqCst);
    }
}

/// Reads the current global nf_conntrack_max.
pub fn read_max() -> u64 {
    let text = fs::read_to_string(NF_CONNTRACK_MAX).unwrap_or_else(|e| panic!("cannot read {NF_CONNTRACK_MAX}: {e}"));
    text.trim().parse().unwrap_or_else(|e| panic!("{NF_CONNTRACK_MAX} holds `{}`: {e}", text.trim()))
}

fn write_max(n: u64) -> std::io::Result<()> {
    fs::write(NF_CONNTRACK_MAX, format!("{n}\n"))
}

fn write_state_file(original: u64) {
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(STATE_FILE)?;
        writeln!(f, "{original}")?;
        f.sync_all()
    };
    write().unwrap_or_else(|e| panic!("cannot record the original nf_conntrack_max in {STATE_FILE}: {e}"));
}

fn restore_from_state_file() -> Option<u64> {
    let text = fs::read_to_string(STATE_FILE).ok()?;
    let value: u64 = match text.trim().parse() {
        Ok(v) if v > 0 => v,
        _ => {
            eprintln!("ignoring {STATE_FILE}: it holds `{}`, not a positive number", text.trim());
            let _ = fs::remove_file(STATE_FILE);
            return None;
        }
    };
    write_max(value).unwrap_or_else(|e| panic!("cannot restore {NF_CONNTRACK_MAX} to {value} from {STATE_FILE}: {e}"));
    let _ = fs::remove_file(STATE_FILE);
    eprintln!("restored {NF_CONNTRACK_MAX} to {value} from {STATE_FILE} (a previous test run did not finish)");
    Some(value)
}
