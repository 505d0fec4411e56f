//! Running external commands with clear messages and clear errors, plus the
//! few facts about the machine every task needs (root? where is the workspace?
//! where do cargo-installed tools live?).
use std::{
    ffi::{OsStr, OsString},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Prints a step heading: `==> what`.
pub fn step(what: impl std::fmt::Display) {
    eprintln!("==> {what}");
}

/// Prints a detail line under a step.
pub fn note(what: impl std::fmt::Display) {
    eprintln!("    {what}");
}

/// Builds a command. Nothing runs until one of the functions below is called.
pub fn cmd<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// `program arg1 arg2`, quoted where needed, with the environment variables
/// this module set on it in front.
pub fn display(c: &Command) -> String {
    let mut s = String::new();
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), quote(v));
        }
    }
    // The cargo that runs us is a long toolchain path; `cargo` says the same.
    let program = c.get_program();
    if program == cargo() {
        s.push_str("cargo");
    } else {
        s.push_str(&quote(program));
    }
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn spawn_error(c: &Command, e: std::io::Error) -> anyhow::Error {
    let program = c.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!("could not start `{}`: `{program}` is not installed or not in PATH", display(c))
    } else {
        anyhow::anyhow!("could not start `{}`: {e}", display(c))
    }
}

/// Runs the command with the terminal attached, echoing it first; returns its
/// exit status (success or not) so the caller decides what failure means.
pub fn status(c: &mut Command) -> Result<ExitStatus> {
    eprintln!("    $ {}", display(c));
    c.status().map_err(|e| spawn_error(c, e))
}

/// Runs the command with the terminal attached and fails unless it succeeds.
pub fn run(c: &mut Command) -> Result<()> {
    let st = status(c)?;
    if !st.success() {
        bail!("`{}` failed ({})", display(c), describe(st));
    }
    Ok(())
}

/// Like [`run`], but kills the command after `limit`.
pub fn run_with_timeout(c: &mut Command, limit: Duration) -> Result<()> {
    eprintln!("    $ {}   (time limit {} s)", display(c), limit.as_secs());
    let mut child = c.spawn().map_err(|e| spawn_error(c, e))?;
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().context("waiting for a child process")? {
            if !st.success() {
                bail!("`{}` failed ({})", display(c), describe(st));
            }
            return Ok(());
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{}` did not finish within {} s and was stopped", display(c), limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the command quietly and returns its standard output, or fails with
/// its standard error in the message.
pub fn output(c: &mut Command) -> Result<String> {
    let out =
        c.stdin(Stdio::null()).stderr(Stdio::piped()).stdout(Stdio::piped()).output().map_err(|e| spawn_error(c, e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("`{}` failed ({}): {}", display(c), describe(out.status), err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the command quietly; its standard output, or `None` if it could not
/// run or failed. For probes ("is this tool here?").
pub fn probe(c: &mut Command) -> Option<String> {
    let out = c.stdin(Stdio::null()).stderr(Stdio::null()).stdout(Stdio::piped()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "exit status 3" / "killed by signal 9".
pub fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (st.code(), st.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => st.to_string(),
    }
}

/// Whether this process runs with effective user id 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| effective_uid(&s)).is_some_and(|uid| uid == 0)
}

/// The effective uid from the text of /proc/self/status (`Uid: real effective saved fs`).
pub fn effective_uid(proc_status: &str) -> Option<u32> {
    let line = proc_status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time too; prefer it so a moved
    // checkout still works, fall back to where xtask was built.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().map(Path::to_path_buf).unwrap_or(manifest_dir)
}

/// The cargo that runs us (so a `cargo +toolchain xtask` stays on that toolchain).
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `$CARGO_HOME/bin`, i.e. usually `~/.cargo/bin`.
pub fn cargo_home_bin() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// Where `cargo xtask setup` installs bpf-linker: `$CTGUARD_BPF_LINKER_ROOT`
/// if set (lets the install path be tested without touching the real one),
/// else cargo's own root (bpf-linker lands in `<root>/bin`).
pub fn bpf_linker_root() -> Option<PathBuf> {
    match std::env::var_os("CTGUARD_BPF_LINKER_ROOT") {
        Some(r) if !r.is_empty() => Some(PathBuf::from(r)),
        _ => cargo_home_bin().and_then(|b| b.parent().map(Path::to_path_buf)),
    }
}

/// Puts `front` before and `back` after PATH's entries (those not already in
/// it) for this process and every command it starts: tools that `setup` finds
/// in ~/.cargo/bin must also be found by the builds it starts, and the tests
/// run `ip` and `nft` from /usr/sbin. Call before starting any thread.
pub fn extend_path(front: &[PathBuf], back: &[PathBuf]) {
    let current = std::env::var_os("PATH").unwrap_or_default();
    if let Some(joined) = extended_path(&current, front, back) {
        // SAFETY: called from main before any other thread exists.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

fn extended_path(current: &OsStr, front: &[PathBuf], back: &[PathBuf]) -> Option<OsString> {
    let mut parts: Vec<PathBuf> = std::env::split_paths(current).collect();
    for d in front.iter().rev() {
        if !parts.contains(d) {
            parts.insert(0, d.clone());
        }
    }
    for d in back {
        if !parts.contains(d) {
            parts.push(d.clone());
        }
    }
    std::env::join_paths(parts).ok()
}

/// Looks `name` up in PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first line of a `--version` style output, trimmed.
pub fn first_line(s: &str) -> &str {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_number() {
        let s = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(s), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name: x\n"), None);
    }

    #[test]
    fn display_quotes_only_when_needed() {
        let mut c = cmd("apt-get", ["install", "-y", "a b", "it's"]);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        assert_eq!(display(&c), r"DEBIAN_FRONTEND=noninteractive apt-get install -y 'a b' 'it'\''s'");
    }

    #[test]
    fn our_cargo_is_shown_as_cargo() {
        assert_eq!(display(&cmd(cargo(), ["test", "-p", "xtask"])), "cargo test -p xtask");
    }

    #[test]
    fn output_reports_failure_and_stderr() {
        let err = output(&mut cmd("sh", ["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exit status 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
        assert_eq!(output(&mut cmd("sh", ["-c", "echo hi"])).unwrap(), "hi\n");
    }

    #[test]
    fn missing_program_is_named() {
        let err = run(&mut cmd("ctguard-xtask-no-such-program", ["x"])).unwrap_err();
        assert!(err.to_string().contains("not installed or not in PATH"), "{err}");
    }

    #[test]
    fn timeout_stops_the_command() {
        let err = run_with_timeout(&mut cmd("sleep", ["5"]), Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        run_with_timeout(&mut cmd("true", [""; 0]), Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn path_is_extended_without_duplicates() {
        let p = |s: &str| PathBuf::from(s);
        let got = extended_path(
            OsStr::new("/usr/bin:/root/.cargo/bin:/bin"),
            &[p("/root/.cargo/bin"), p("/opt/bin")],
            &[p("/usr/sbin"), p("/bin")],
        );
        assert_eq!(got.unwrap(), "/opt/bin:/usr/bin:/root/.cargo/bin:/bin:/usr/sbin");
    }

    #[test]
    fn first_line_skips_blank_lines() {
        assert_eq!(first_line("\n  bpf-linker 0.13.0 \nmore"), "bpf-linker 0.13.0");
        assert_eq!(first_line(""), "");
    }
}
