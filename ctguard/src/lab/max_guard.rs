//! Lowers the global `nf_conntrack_max` and always puts it back: on drop
//! (normal exit, error, panic unwinding), and, if the process was killed, at
//! the next start from the state file written before anything changed.
//!
//! The lab and the integration tests share this code and its state file, so
//! whichever runs next repairs what a killed one left behind (with two files,
//! one would take the other's lowered value for the original).
use std::{fs, io::Write, os::unix::fs::OpenOptionsExt};

use crate::error::CtguardError;

pub const NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// The value to restore, kept on disk while the limit is lowered.
pub const STATE_FILE: &str = "/run/ctguard-nf_conntrack_max.orig";

#[must_use = "nf_conntrack_max is restored when the guard is dropped"]
pub struct MaxGuard {
    original: u64,
    lowered: u64,
    /// False once [`MaxGuard::restore`] ran, so `Drop` does nothing more.
    armed: bool,
}

pub fn read_max() -> Result<u64, CtguardError> {
    let text = fs::read_to_string(NF_CONNTRACK_MAX)
        .map_err(|e| conntrack_error(format!("cannot read {NF_CONNTRACK_MAX}: {e}")))?;
    text.trim().parse().map_err(|e| conntrack_error(format!("{NF_CONNTRACK_MAX} holds `{}`: {e}", text.trim())))
}

fn write_max(v: u64) -> Result<(), CtguardError> {
    fs::write(NF_CONNTRACK_MAX, v.to_string())
        .map_err(|e| conntrack_error(format!("cannot write {v} to {NF_CONNTRACK_MAX}: {e}")))
}

fn conntrack_error(what: String) -> CtguardError {
    CtguardError::Conntrack {
        what,
        hint: "lowering nf_conntrack_max needs root in the initial network namespace (it is global and read-only \
               elsewhere)"
            .into(),
    }
}

/// Restores a value a killed run left in the state file; returns it. A state
/// file that does not hold a positive number is removed and ignored.
pub fn restore_stale() -> Result<Option<u64>, CtguardError> {
    let Ok(text) = fs::read_to_string(STATE_FILE) else { return Ok(None) };
    let value = match text.trim().parse::<u64>() {
        Ok(v) if v > 0 => v,
        _ => {
            eprintln!("ctguard: ignoring {STATE_FILE}: it holds `{}`, not a positive number", text.trim());
            let _ = fs::remove_file(STATE_FILE);
            return Ok(None);
        }
    };
    write_max(value)?;
    let _ = fs::remove_file(STATE_FILE);
    Ok(Some(value))
}

impl MaxGuard {
    /// Records the current value in [`STATE_FILE`], then sets `n`.
    pub fn lower(n: u64) -> Result<Self, CtguardError> {
        restore_stale()?;
        let original = read_max()?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(STATE_FILE)
            .map_err(|e| conntrack_error(format!("cannot create {STATE_FILE}: {e} (is another lab running?)")))?;
        f.write_all(original.to_string().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| conntrack_error(format!("cannot write {STATE_FILE}: {e}")))?;
        if let Err(e) = write_max(n) {
            let _ = fs::remove_file(STATE_FILE);
            return Err(e);
        }
        Ok(Self { original, lowered: n, armed: true })
    }

    /// The value restored at the end.
    pub fn original(&self) -> u64 {
        self.original
    }

    /// The value [`MaxGuard::lower`] set.
    pub fn lowered(&self) -> u64 {
        self.lowered
    }

    /// Puts the original value back now and says whether that worked (`Drop`
    /// can only print). On failure the state file stays for the next run.
    pub fn restore(mut self) -> Result<(), CtguardError> {
        self.armed = false;
        self.put_back()
    }

    fn put_back(&self) -> Result<(), CtguardError> {
        write_max(self.original)?;
        let _ = fs::remove_file(STATE_FILE);
        Ok(())
    }
}

impl Drop for MaxGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // On failure the state file stays: the next run restores from it.
        if let Err(e) = self.put_back() {
            eprintln!("ctguard: {e}; restore it with `sysctl -w net.netfilter.nf_conntrack_max={}`", self.original);
        }
    }
}
