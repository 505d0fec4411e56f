//! The wrapped load-test command (`ctguard capture ... -- CMD ARGS...`):
//! started once the sensors are attached, with ctguard's stdin, stdout and
//! stderr; its exit status becomes ctguard's when no trigger fired.
use std::{
    os::unix::process::ExitStatusExt,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use crate::error::CtguardError;

/// How long a command gets to exit after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// A running (or finished) command.
pub struct Wrapped {
    pub argv: Vec<String>,
    child: tokio::process::Child,
    status: Option<ExitStatus>,
}

impl Wrapped {
    /// Starts `argv` (must be called inside a tokio runtime).
    pub fn spawn(argv: &[String]) -> Result<Wrapped, CtguardError> {
        let (program, args) = argv.split_first().ok_or_else(|| {
            CtguardError::usage(
                "no command after `--`",
                "e.g. ctguard capture --trigger 'table_full>0' -- ./load-test.sh",
            )
        })?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                CtguardError::usage(
                    format!("cannot start the wrapped command `{}`: {e}", argv.join(" ")),
                    "check the command after `--` (its path, and that it is executable)",
                )
            })?;
        Ok(Wrapped { argv: argv.to_vec(), child, status: None })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The exit status, once [`wait`](Self::wait) returned it.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    pub fn running(&self) -> bool {
        self.status.is_none()
    }

    /// Waits for the command to exit. Cancel-safe (usable in `select!`).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self.child.wait().await?;
        self.status = Some(s);
        Ok(s)
    }

    /// Sends `signal` while the command runs.
    pub fn signal(&self, signal: i32) {
        if self.status.is_some() {
            return;
        }
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the exit.
    pub async fn terminate(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(r) => r,
            Err(_) => {
                let _ = self.child.start_kill();
                self.wait().await
            }
        }
    }

    /// How the command ended, for messages and summaries.
    pub fn describe(&self) -> String {
        self.status.map_or_else(|| "still running".to_string(), |s| describe_status(&s))
    }
}

impl Drop for Wrapped {
    /// ctguard never leaves a load test running behind it on an error path.
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: &ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).min(255) as u8,
        (None, None) => 1,
    }
}

pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with {c}"),
        (None, Some(sig)) => format!("killed by signal {sig} (status {})", 128 + sig),
        (None, None) => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(&ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(&ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(&ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(exit_code(&ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(describe_status(&ExitStatus::from_raw(7 << 8)), "exited with 7");
        assert_eq!(describe_status(&ExitStatus::from_raw(libc::SIGKILL)), "killed by signal 9 (status 137)");
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn runs_a_command_and_reports_its_status() {
        rt().block_on(async {
            let mut w = Wrapped::spawn(&["sh".into(), "-c".into(), "exit 7".into()]).unwrap();
            assert!(w.running());
            let s = w.wait().await.unwrap();
            assert_eq!(exit_code(&s), 7);
            assert_eq!(w.describe(), "exited with 7");
            assert_eq!(exit_code(&w.wait().await.unwrap()), 7, "waiting again returns the same status");
        });
    }

    #[test]
    fn terminate_stops_a_long_command() {
        rt().block_on(async {
            let mut w = Wrapped::spawn(&["sleep".into(), "30".into()]).unwrap();
            let s = w.terminate(Duration::from_secs(5)).await.unwrap();
            assert_eq!(exit_code(&s), 143);
        });
    }

    #[test]
    fn a_missing_program_is_a_usage_error() {
        rt().block_on(async {
            let e = Wrapped::spawn(&["/nonexistent/ctguard-test-cmd".into()]).err().unwrap().to_string();
            assert!(e.contains("cannot start the wrapped command"), "{e}");
            assert!(e.contains("hint"), "{e}");
        });
    }
}
