//! The rollback state file: the exact text of every setting `--apply`
//! replaced, so `ctguard rollback` can write it back byte for byte.
//!
//! Written before the first value changes (mode 0600, in a 0700 directory,
//! through a temporary file renamed into place), removed by a successful
//! rollback. While it exists, another `--apply` is refused unless `--force`,
//! which keeps the earliest saved value of each setting so a rollback still
//! returns to what was in force before the first apply.
use std::{
    fs::{self, OpenOptions},
    io::{ErrorKind, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::error::CtguardError;

pub const DEFAULT_STATE_FILE: &str = "/var/lib/ctguard/rollback.json";
pub const SCHEMA: &str = "ctguard.rollback.v1";
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// One replaced setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `net.netfilter.nf_conntrack_max`, ...
    pub sysctl: String,
    /// The file written (the sysctl, or /sys/module/nf_conntrack/parameters/hashsize).
    pub path: PathBuf,
    /// Its exact text before the first apply.
    pub previous: String,
    /// The text the last apply wrote.
    pub applied: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub schema: String,
    pub created_unix_s: u64,
    pub updated_unix_s: u64,
    pub kernel_release: String,
    /// The boot the values were applied in (a reboot resets them anyway).
    pub boot_id: Option<String>,
    pub entries: Vec<Entry>,
}

impl State {
    /// Adds `entries` on top of `earlier` (if any): a path already saved
    /// keeps its earliest `previous`, and gets the new `applied`.
    pub fn merge(
        earlier: Option<State>,
        entries: Vec<Entry>,
        now_unix_s: u64,
        kernel_release: String,
        boot_id: Option<String>,
    ) -> State {
        let mut state = earlier.unwrap_or(State {
            schema: SCHEMA.into(),
            created_unix_s: now_unix_s,
            updated_unix_s: now_unix_s,
            kernel_release,
            boot_id,
            entries: vec![],
        });
        state.updated_unix_s = now_unix_s;
        for e in entries {
            match state.entries.iter_mut().find(|s| s.path == e.path) {
                Some(saved) => saved.applied = e.applied,
                None => state.entries.push(e),
            }
        }
        state
    }
}

fn state_error(path: &Path, what: String) -> CtguardError {
    CtguardError::usage(
        format!("rollback state {}: {what}", path.display()),
        "ctguard keeps the values --apply replaced there; --state-file (or CTGUARD_STATE_FILE) picks another path",
    )
}

/// The saved state, or `None` when there is none.
pub fn load(path: &Path) -> Result<Option<State>, CtguardError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_error(path, format!("cannot read: {e}"))),
    };
    let state: State = serde_json::from_str(&text).map_err(|e| {
        CtguardError::usage(
            format!("rollback state {} is damaged: {e}", path.display()),
            "it holds the settings to restore: read them from the file and set them with sysctl -w, then delete it",
        )
    })?;
    if state.schema != SCHEMA {
        return Err(state_error(path, format!("schema {:?}, expected {SCHEMA:?}", state.schema)));
    }
    Ok(Some(state))
}

/// Writes `state` to `path` with mode 0600, atomically.
pub fn save(path: &Path, state: &State) -> Result<(), CtguardError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| state_error(path, format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "rollback.json".into()),
        std::process::id()
    ));
    let text = serde_json::to_string_pretty(state).map_err(|e| state_error(path, e.to_string()))? + "\n";
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        // The umask cannot widen 0600, but an inherited ACL default could: be explicit.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        state_error(path, format!("cannot write: {e}"))
    })
}

pub fn remove(path: &Path) -> Result<(), CtguardError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(state_error(path, format!("cannot remove: {e}"))),
    }
}

pub fn boot_id() -> Option<String> {
    fs::read_to_string(BOOT_ID).ok().map(|s| s.trim().to_string())
}

pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, previous: &str, applied: &str) -> Entry {
        Entry { sysctl: path.into(), path: path.into(), previous: previous.into(), applied: applied.into() }
    }

    #[test]
    fn round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/rollback.json");
        assert_eq!(load(&path).unwrap(), None);
        let s = State::merge(None, vec![entry("/a", "262144\n", "300000\n")], 10, "6.18".into(), Some("b".into()));
        save(&path, &s).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(load(&path).unwrap(), Some(s));
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(load(&path).unwrap(), None);
    }

    #[test]
    fn merge_keeps_the_earliest_previous_value() {
        let first = State::merge(None, vec![entry("/max", "262144\n", "300000\n")], 10, "k".into(), None);
        let second = State::merge(
            Some(first),
            vec![entry("/max", "300000\n", "400000\n"), entry("/udp", "30\n", "10\n")],
            20,
            "k".into(),
            None,
        );
        assert_eq!(second.created_unix_s, 10);
        assert_eq!(second.updated_unix_s, 20);
        assert_eq!(second.entries, vec![entry("/max", "262144\n", "400000\n"), entry("/udp", "30\n", "10\n")]);
    }

    #[test]
    fn damaged_state_is_an_error_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollback.json");
        fs::write(&path, "{not json").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("hint"), "{e}");
        fs::write(
            &path,
            r#"{"schema":"x","created_unix_s":0,"updated_unix_s":0,"kernel_release":"","boot_id":null,"entries":[]}"#,
        )
        .unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("schema"));
    }
}
