//! Lowering the global `net.netfilter.nf_conntrack_max` for a test, and
//! always putting it back.
//!
//! The value is global (the kernel compares every namespace's own entry count
//! against it) and writable only from the initial network namespace, where
//! the test process runs. The recording and restoring is ctguard's own
//! [`ctguard::lab::max_guard`] (the one `ctguard lab` uses, with the same
//! state file, so a test and a lab each repair what a killed other left).
//! This wrapper adds what tests need on top:
//!
//! * one guard at a time, across processes (the [`SerialGuard`] lock);
//! * panics instead of errors, and a panic when the value cannot be restored
//!   (unless the test is already panicking);
//! * [`MaxGuard::restore_stale`] for [`crate::Lab::new`], so a killed test's
//!   lowered value never leaks into the next test.
use std::sync::atomic::{AtomicBool, Ordering};

use ctguard::lab::max_guard as product;

use crate::{lock::SerialGuard, root};

pub use product::{NF_CONNTRACK_MAX, STATE_FILE};

/// True while a guard of this process is alive.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Keeps `nf_conntrack_max` lowered until dropped.
#[must_use = "the original nf_conntrack_max is restored when the guard is dropped"]
pub struct MaxGuard {
    inner: Option<product::MaxGuard>,
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
        report_stale(product::restore_stale());
        let inner = product::MaxGuard::lower(n).unwrap_or_else(|e| panic!("cannot set {NF_CONNTRACK_MAX} to {n}: {e}"));
        ACTIVE.store(true, Ordering::SeqCst);
        MaxGuard { inner: Some(inner), _lock: lock }
    }

    /// The value restored on drop.
    pub fn original(&self) -> u64 {
        self.inner.as_ref().expect("alive until dropped").original()
    }

    /// The value set by [`lower`](Self::lower).
    pub fn lowered(&self) -> u64 {
        self.inner.as_ref().expect("alive until dropped").lowered()
    }

    /// Restores nf_conntrack_max from a state file a killed run left behind.
    /// Returns the value restored, or `None` when there was nothing to do (or a
    /// guard of this process is alive).
    pub fn restore_stale() -> Option<u64> {
        let _lock = SerialGuard::acquire();
        if ACTIVE.load(Ordering::SeqCst) {
            return None;
        }
        report_stale(product::restore_stale())
    }
}

fn report_stale(result: Result<Option<u64>, ctguard::error::CtguardError>) -> Option<u64> {
    let restored = result.unwrap_or_else(|e| panic!("cannot restore {NF_CONNTRACK_MAX} from {STATE_FILE}: {e}"));
    if let Some(v) = restored {
        eprintln!("restored {NF_CONNTRACK_MAX} to {v} from {STATE_FILE} (a previous run did not finish)");
    }
    restored
}

impl Drop for MaxGuard {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else { return };
        let (original, lowered) = (inner.original(), inner.lowered());
        let result = inner.restore();
        ACTIVE.store(false, Ordering::SeqCst);
        if let Err(e) = result {
            // The state file stays: the next run restores from it.
            let msg = format!(
                "CANNOT RESTORE {NF_CONNTRACK_MAX} to {original} (it is {lowered}): {e}; \
                 run `sysctl -w net.netfilter.nf_conntrack_max={original}`"
            );
            eprintln!("{msg}");
            if !std::thread::panicking() {
                panic!("{msg}");
            }
        }
    }
}

/// Reads the current global nf_conntrack_max.
pub fn read_max() -> u64 {
    product::read_max().unwrap_or_else(|e| panic!("{e}"))
}
