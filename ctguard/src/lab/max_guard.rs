//! Lowers the global `nf_conntrack_max` for the lab and always puts it back:
//! on drop (normal exit, error, panic unwinding), and, if the process was
//! killed, at the next lab start from the state file written first.
use std::{fs, io::Write, os::unix::fs::OpenOptionsExt};

use crate::error::CtguardError;

pub const NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// The value to restore, kept on disk while the limit is lowered.
pub const STATE_FILE: &str = "/run/ctguard-lab-nf_conntrack_max.orig";

#[must_use = "nf_conntrack_max is restored when the guard is dropped"]
pub struct MaxGuard {
    original: u64,
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
        hint:
            "the lab runs as root in the initial network namespace (nf_conntrack_max is global and read-only elsewhere)"
                .into(),
    }
}

/// Restores a value a killed lab left in the state file; returns it.
pub fn restore_stale() -> Result<Option<u64>, CtguardError> {
    let Ok(text) = fs::read_to_string(STATE_FILE) else { return Ok(None) };
    let Ok(v) = text.trim().parse::<u64>() else {
        let _ = fs::remove_file(STATE_FILE);
        return Ok(None);
    };
    write_max(v)?;
    let _ = fs::remove_file(STATE_FILE);
    Ok(Some(v))
}

impl MaxGuard {
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
            .map_err(|e| conntrack_error(format!("cannot write {STATE_FILE}: {e}")))?;
        if let Err(e) = write_max(n) {
            let _ = fs::remove_file(STATE_FILE);
            return Err(e);
        }
        Ok(Self { original })
    }

    pub fn original(&self) -> u64 {
        self.original
    }
}

impl Drop for MaxGuard {
    fn drop(&mut self) {
        match write_max(self.original) {
            Ok(()) => {
                let _ = fs::remove_file(STATE_FILE);
            }
            // The state file stays: the next `ctguard lab` restores from it.
            Err(e) => eprintln!(
                "ctguard lab: {e}; restore it with `sysctl -w net.netfilter.nf_conntrack_max={}`",
                self.original
            ),
        }
    }
}
