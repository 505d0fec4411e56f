//! Starting the measured tools, waiting until they are ready, stopping them
//! with the signal each expects, and collecting what they printed.
//!
//! Every child runs in its own process group (a Ctrl-C in the terminal
//! reaches only xtask, which then stops them itself) and is killed when its
//! [`Proc`] is dropped without having been stopped.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    env::{self, CLIENT_ADDR, Lab, PREFIX_LEN, SERVER_ADDR},
    parse,
};
use crate::util::{self, cmd};

/// Lines a reader thread collected, with when they arrived.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// Where a child's standard output goes.
pub enum Out {
    /// Read line by line by the harness.
    Lines,
    /// Written to this file.
    File(PathBuf),
}

/// A running child process.
pub struct Proc {
    pub what: String,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn reader(stream: impl Read + Send + 'static, sink: Lines) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap_or_else(PoisonError::into_inner).push((Instant::now(), line));
        }
    })
}

impl Proc {
    pub fn spawn(what: impl Into<String>, mut c: Command, out: Out) -> Result<Proc> {
        let what = what.into();
        c.stdin(Stdio::null()).stderr(Stdio::piped()).process_group(0);
        match &out {
            Out::Lines => c.stdout(Stdio::piped()),
            Out::File(p) => c.stdout(File::create(p).with_context(|| format!("cannot create {}", p.display()))?),
        };
        let shown = util::display(&c);
        let mut child = c.spawn().with_context(|| format!("cannot start `{shown}`"))?;
        let (stdout, stderr): (Lines, Lines) = Default::default();
        let mut readers = vec![reader(child.stderr.take().expect("piped"), stderr.clone())];
        if let Some(o) = child.stdout.take() {
            readers.push(reader(o, stdout.clone()));
        }
        Ok(Proc { what, child, stdout, stderr, readers, status: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_lines(&self) -> Vec<(Instant, String)> {
        self.stdout.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn stderr_text(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn stdout_text(&self) -> String {
        let lines = self.stdout.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("waiting for a child")?;
        }
        Ok(self.status)
    }

    /// Waits until a line of stdout (or stderr) satisfies `pred`; fails if
    /// the process exits first or `limit` passes.
    pub fn wait_line(&mut self, on_stderr: bool, limit: Duration, pred: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + limit;
        let found = |p: &Proc| {
            let lines = if on_stderr { &p.stderr } else { &p.stdout };
            lines.lock().unwrap_or_else(PoisonError::into_inner).iter().any(|(_, l)| pred(l))
        };
        loop {
            if found(self) {
                return Ok(());
            }
            if let Some(st) = self.exited()? {
                // Its last lines may still be on their way through the readers.
                self.join_readers();
                if found(self) {
                    return Ok(());
                }
                bail!(
                    "{} exited ({}) before it was ready: {}",
                    self.what,
                    util::describe(st),
                    self.stderr_text().trim()
                );
            }
            if Instant::now() > deadline {
                bail!("{} was not ready after {} s: {}", self.what, limit.as_secs(), self.stderr_text().trim());
            }
            env::sleep(Duration::from_millis(20))?;
        }
    }

    /// Number of stdout lines so far.
    pub fn stdout_len(&self) -> usize {
        self.stdout.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Sends `signal` (e.g. "TERM", "INT") and waits for the exit; kills it
    /// after `limit`. Returns the exit status.
    pub fn stop(&mut self, signal: &str, limit: Duration) -> Result<ExitStatus> {
        if self.exited()?.is_none() {
            util::probe(&mut cmd("kill", [format!("-{signal}"), self.pid().to_string()]));
            let deadline = Instant::now() + limit;
            while self.exited()?.is_none() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    self.status = Some(self.child.wait()?);
                    bail!("{} did not stop within {} s of SIG{signal}; killed", self.what, limit.as_secs());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.join_readers();
        Ok(self.status.expect("set above"))
    }

    /// Waits for the reader threads to reach the end of the pipes (call once
    /// the process has exited).
    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Waits for the process to exit by itself (interruptible).
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        while self.exited()?.is_none() {
            if Instant::now() > deadline {
                bail!("{} did not finish within {} s", self.what, limit.as_secs());
            }
            env::sleep(Duration::from_millis(5))?;
        }
        self.join_readers();
        Ok(self.status.expect("set above"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Paths and options shared by every measurement.
pub struct Tools {
    pub ctguard: PathBuf,
    pub tmp: PathBuf,
    /// bpftrace's spelling of a tracepoint argument (`args.name` since
    /// bpftrace 0.21, `args->name` before), or why bpftrace cannot run here.
    pub bpftrace: Result<&'static str, String>,
}

pub const FLOOD_PORTS: &str = "5000,5001,5002";
pub const TOP_INTERVAL: &str = "1s";

impl Tools {
    pub fn ctguard(&self, args: &[&str]) -> Command {
        cmd(&self.ctguard, args)
    }

    /// Runs `ctguard lab flood` from the client to the server: `count` new
    /// UDP flows to the three ports, starting at flow `first`.
    pub fn flood(&self, lab: &Lab, count: u64, first: u64) -> Result<parse::Flood> {
        let (count_s, first_s, src, to, prefix) = (
            count.to_string(),
            first.to_string(),
            CLIENT_ADDR.to_string(),
            SERVER_ADDR.to_string(),
            PREFIX_LEN.to_string(),
        );
        let c = self.ctguard(&[
            "lab",
            "flood",
            "--from",
            &lab.client,
            "--src",
            &src,
            "--src-prefix",
            &prefix,
            "--to",
            &to,
            "--ports",
            FLOOD_PORTS,
            "--count",
            &count_s,
            "--first-flow",
            &first_s,
            "--duration",
            "300s",
            "--json",
        ]);
        let mut p = Proc::spawn("ctguard lab flood", c, Out::Lines)?;
        let st = p.wait(Duration::from_secs(330))?;
        if !st.success() {
            bail!("ctguard lab flood failed ({}): {}", util::describe(st), p.stderr_text().trim());
        }
        let f = parse::flood(&p.stdout_text()).context("reading ctguard lab flood's report")?;
        if f.sent != count {
            bail!("ctguard lab flood sent {} of {count} flows (deadline hit: {})", f.sent, f.deadline_hit);
        }
        Ok(f)
    }

    /// `ctguard top --json` (stdout read by the harness), ready once its
    /// first frame arrived.
    pub fn start_top(&self, extra: &[&str]) -> Result<Proc> {
        let mut args = vec!["top", "--json", "--interval", TOP_INTERVAL];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn("ctguard top", self.ctguard(&args), Out::Lines)?;
        p.wait_line(false, Duration::from_secs(30), |l| l.starts_with('{'))?;
        Ok(p)
    }

    /// `ctguard trace --json --netns INODE --by dst-port > file`, ready once
    /// it printed its "tracing" line on stderr.
    pub fn start_trace(&self, lab: &Lab, out: &Path) -> Result<Proc> {
        let ino = lab.server_inode.to_string();
        let c = self.ctguard(&["trace", "--json", "--netns", &ino, "--by", "dst-port"]);
        let mut p = Proc::spawn("ctguard trace", c, Out::File(out.to_path_buf()))?;
        p.wait_line(true, Duration::from_secs(30), |l| l.contains("ctguard: tracing"))?;
        Ok(p)
    }

    /// `conntrack -E -e NEW` in the server, stdout to a file. It prints
    /// nothing when it is ready, so give it a moment to open its socket.
    pub fn start_conntrack_events(&self, lab: &Lab, out: &Path) -> Result<Proc> {
        let c = cmd("ip", ["netns", "exec", lab.server.as_str(), "conntrack", "-E", "-e", "NEW"]);
        let mut p = Proc::spawn("conntrack -E", c, Out::File(out.to_path_buf()))?;
        env::sleep(Duration::from_millis(700))?;
        if let Some(st) = p.exited()? {
            bail!("conntrack -E exited ({}): {}", util::describe(st), p.stderr_text().trim());
        }
        Ok(p)
    }

    /// The bpftrace one-liner counting allocations from the nf_conntrack
    /// slab on the same tracepoint ctguard uses; ready at its BEGIN probe.
    pub fn start_bpftrace(&self) -> Result<Proc> {
        let arg = match &self.bpftrace {
            Ok(a) => *a,
            Err(why) => bail!("bpftrace cannot run: {why}"),
        };
        let mut p = Proc::spawn("bpftrace", cmd("bpftrace", ["-B", "line", "-e", &bpftrace_program(arg)]), Out::Lines)?;
        p.wait_line(false, Duration::from_secs(60), |l| l.trim() == "ready")?;
        Ok(p)
    }
}

/// The one-liner (plus a BEGIN probe that says when it is attached).
pub fn bpftrace_program(arg_prefix: &str) -> String {
    format!(
        "tracepoint:kmem:kmem_cache_alloc /str({arg_prefix}name) == \"nf_conntrack\"/ {{ @n = count(); }} \
         BEGIN {{ printf(\"ready\\n\"); }}"
    )
}

/// Which spelling of tracepoint arguments this bpftrace takes, by compiling
/// and running the one-liner for an instant; the error says why neither runs.
pub fn probe_bpftrace() -> Result<&'static str, String> {
    if util::which("bpftrace").is_none() {
        return Err("bpftrace is not installed (`apt-get install -y bpftrace`)".into());
    }
    let mut last = String::new();
    for arg in ["args.", "args->"] {
        let prog = bpftrace_program(arg).replace("printf(\"ready\\n\");", "exit();");
        let tried = Proc::spawn("bpftrace", cmd("bpftrace", ["-e", &prog]), Out::Lines)
            .and_then(|mut p| Ok((p.wait(Duration::from_secs(60))?, p.stderr_text())));
        match tried {
            Ok((st, _)) if st.success() => return Ok(arg),
            Ok((st, err)) => {
                let err: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).take(4).collect();
                last = format!("{} ({})", err.join(" / "), util::describe(st));
            }
            Err(e) => last = format!("{e:#}"),
        }
    }
    Err(format!("bpftrace could not load the one-liner: {last}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftrace_program_names_the_slab() {
        let p = bpftrace_program("args->");
        assert!(p.contains("str(args->name) == \"nf_conntrack\""), "{p}");
        assert!(p.contains("BEGIN"), "{p}");
    }

    #[test]
    fn proc_collects_lines_and_stops() {
        let c = cmd("sh", ["-c", "echo one; echo two >&2; exec sleep 30"]);
        let mut p = Proc::spawn("sh", c, Out::Lines).unwrap();
        p.wait_line(false, Duration::from_secs(5), |l| l == "one").unwrap();
        p.wait_line(true, Duration::from_secs(5), |l| l == "two").unwrap();
        let st = p.stop("TERM", Duration::from_secs(5)).unwrap();
        assert!(!st.success());
        assert_eq!(p.stdout_text(), "one");
    }

    #[test]
    fn wait_line_fails_when_the_process_exits() {
        let mut p = Proc::spawn("false", cmd("sh", ["-c", "echo nope >&2; exit 3"]), Out::Lines).unwrap();
        let err = p.wait_line(false, Duration::from_secs(5), |_| false).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }
}
