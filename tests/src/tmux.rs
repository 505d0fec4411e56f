//! A detached tmux session: a real terminal for tests of interactive views
//! (raw mode, prompts, keys), read back with `capture-pane`. Killed on drop.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

pub struct Tmux {
    session: String,
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux (cargo xtask setup installs it)");
    assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Tmux {
    /// Runs the shell `script` in a new 150×45 session named `NAME-PID`.
    pub fn start(name: &str, script: &str) -> Tmux {
        let session = format!("{name}-{}", std::process::id());
        tmux(&["new-session", "-d", "-s", &session, "-x", "150", "-y", "45", script]);
        Tmux { session }
    }

    /// A file name unique to this session, in the temp directory (for a
    /// script to leave its results in).
    pub fn scratch_file(name: &str, suffix: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{name}-{}.{suffix}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    pub fn screen(&self) -> String {
        tmux(&["capture-pane", "-p", "-t", &self.session])
    }

    /// `tmux send-keys`: `q`, `C-c`, `Enter`, …
    pub fn send_keys(&self, keys: &str) {
        tmux(&["send-keys", "-t", &self.session, keys]);
    }

    /// Polls the screen until it shows every needle (slow, emulated CPUs
    /// take a while to load the programs); panics with the screen after `secs`.
    pub fn wait_for(&self, needles: &[&str], secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.screen();
            if needles.iter().all(|n| screen.contains(n)) {
                return;
            }
            assert!(Instant::now() < deadline, "screen lacks one of {needles:?} after {secs}s:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.session]).output();
    }
}

/// Waits up to `secs` for `path` to hold text `done` accepts (a shell creates
/// the file before the command writing it has run); returns what it holds.
pub fn wait_for_file(path: &Path, secs: u64, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut text = String::new();
    while !done(&text) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = std::fs::read_to_string(path).unwrap_or_default();
    }
    let _ = std::fs::remove_file(path);
    text
}
