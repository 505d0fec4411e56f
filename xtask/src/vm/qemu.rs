//! Booting the guest: the qemu command line, and running it with a time
//! limit while its serial ports carry the command's output (ttyS1, streamed
//! to our stdout) and exit code (ttyS2, a file); ttyS0 is the kernel console.
use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::ValueEnum;

use super::{
    initramfs::{HOST_ROOT_TAG, MODULES_TAG},
    results::GuestLog,
};
use crate::util;

/// Exit code when the time limit killed qemu.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code when the guest never reported one.
pub const EXIT_NO_REPORT: i32 = 125;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM when the host has hardware virtualisation (kvm_intel or kvm_amd) and /dev/kvm is usable, else TCG.
    Auto,
    /// Hardware virtualisation (/dev/kvm).
    Kvm,
    /// Software emulation: slow, but runs anywhere.
    Tcg,
}

impl Accel {
    /// Decides `Auto` by looking at this host.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto if hardware_kvm() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        }
    }
}

/// /dev/kvm backed by real hardware virtualisation. Some hosts have a
/// /dev/kvm from a nested software virtualiser (kvm_pvm) that cannot boot
/// stock kernels, hence the check for the hardware modules.
fn hardware_kvm() -> bool {
    let hw = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"].iter().any(|m| Path::new(m).exists());
    hw && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Everything the qemu command line is made of.
#[derive(Clone, Debug)]
pub struct Config {
    pub accel: Accel,
    pub memory: String,
    pub cpus: usize,
    pub kernel_image: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// Shared read-only as the guest's root (tag `hostroot`).
    pub host_root: PathBuf,
    /// The kernel's lib/modules (tag `kmods`).
    pub modules_dir: PathBuf,
    /// Where the kernel console goes (`None`: our stderr).
    pub console_log: Option<PathBuf>,
    pub status_file: PathBuf,
}

/// The guest's vCPUs: the host's cores, at most 4.
pub fn default_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// The kernel command line.
pub fn kernel_append() -> String {
    "console=ttyS0 panic=-1 quiet rdinit=/init".to_string()
}

/// qemu-system-x86_64's arguments.
pub fn argv(c: &Config) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    match c.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // `Auto` never gets here (resolved first); treat it as the safe choice.
        // One host thread for all vCPUs: with multi-threaded TCG a guest
        // once died of an `int3` oops in kmem_cache_free, a stale breakpoint
        // from live kernel-text patching (the static key of the tracepoint
        // ctguard attaches to), which one vCPU still saw after another had
        // finished the patch. Round-robin vCPUs cannot race on patched code.
        Accel::Tcg | Accel::Auto => push(&["-accel", "tcg,thread=single", "-cpu", "max"]),
    }
    let cpus = c.cpus.to_string();
    push(&["-m", &c.memory, "-smp", &cpus]);
    a.push("-kernel".into());
    a.push(c.kernel_image.clone().into());
    a.push("-initrd".into());
    a.push(c.initrd.clone().into());
    a.push("-append".into());
    a.push(c.append.clone().into());
    for (path, tag, extra) in [(&c.host_root, HOST_ROOT_TAG, ",multidevs=remap"), (&c.modules_dir, MODULES_TAG, "")] {
        a.push("-virtfs".into());
        let mut spec = OsString::from("local,path=");
        spec.push(path);
        spec.push(format!(",mount_tag={tag},security_model=none,readonly=on{extra}"));
        a.push(spec);
    }
    // ttyS0: kernel console; ttyS1: the command's output; ttyS2: its exit code.
    a.push("-serial".into());
    a.push(match &c.console_log {
        Some(log) => file_chardev(log),
        None => "file:/dev/stderr".into(),
    });
    a.extend(["-chardev", "stdio,id=out,signal=off", "-serial", "chardev:out", "-serial"].map(OsString::from));
    a.push(file_chardev(&c.status_file));
    a
}

fn file_chardev(p: &Path) -> OsString {
    let mut s = OsString::from("file:");
    s.push(p);
    s
}

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The command's exit code, as the guest reported it.
    Code(i32),
    /// Killed at the time limit.
    TimedOut,
    /// qemu ended without a report (setup failed, kernel panic, ...).
    NoReport(String),
}

impl GuestExit {
    pub fn code(&self) -> i32 {
        match self {
            GuestExit::Code(c) => *c,
            GuestExit::TimedOut => EXIT_TIMEOUT,
            GuestExit::NoReport(_) => EXIT_NO_REPORT,
        }
    }
}

/// What one qemu run produced.
#[derive(Debug)]
pub struct Run {
    pub exit: GuestExit,
    /// From starting qemu to the guest's first line of output.
    pub boot: Option<Duration>,
    pub total: Duration,
    pub log: GuestLog,
}

/// Runs qemu, streaming the guest's output to our stdout, and kills it
/// after `limit`.
pub fn run(c: &Config, limit: Duration) -> Result<Run> {
    let _ = std::fs::remove_file(&c.status_file);
    if let Some(log) = &c.console_log {
        let _ = std::fs::remove_file(log);
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(argv(c));
    eprintln!("    $ {}   (time limit {} s)", util::display(&cmd), limit.as_secs());
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| {
        anyhow::anyhow!(
            "could not start qemu-system-x86_64: {e} (install it with `apt-get install \
                 qemu-system-x86` or `cargo xtask setup`)"
        )
    })?;

    let (first_line_tx, first_line_rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    let out_thread = std::thread::spawn(move || pump_stdout(stdout, std::io::stdout(), first_line_tx));
    let stderr = child.stderr.take().expect("piped stderr");
    let err_thread = std::thread::spawn(move || filter_stderr(stderr));

    let timed_out = wait_or_kill(&mut child, limit)?;
    let total = start.elapsed();
    let log = out_thread.join().unwrap_or_default();
    let _ = err_thread.join();
    let boot = first_line_rx.try_recv().ok().map(|t: Instant| t.duration_since(start));

    let status = std::fs::read_to_string(&c.status_file).unwrap_or_default();
    let exit = match parse_status(&status) {
        Some(code) => GuestExit::Code(code),
        None if timed_out => GuestExit::TimedOut,
        None => GuestExit::NoReport(format!("qemu ended without a report (after {:.0} s)", total.as_secs_f64())),
    };
    Ok(Run { exit, boot, total, log })
}

/// Waits for qemu; kills it at `limit`. True when it was killed.
fn wait_or_kill(child: &mut Child, limit: Duration) -> Result<bool> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().context("waiting for qemu")? {
            if !st.success() {
                eprintln!("xtask: vm: qemu ended with {}", util::describe(st));
            }
            return Ok(false);
        }
        if start.elapsed() >= limit {
            eprintln!("xtask: vm: the guest did not finish within {} s: stopping qemu", limit.as_secs());
            let _ = child.kill();
            let _ = child.wait();
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies the guest's output to `to` (our stdout) as it comes, and parses it.
fn pump_stdout(
    mut from: impl std::io::Read,
    mut to: impl std::io::Write,
    first_line: mpsc::Sender<Instant>,
) -> GuestLog {
    let mut log = GuestLog::default();
    let mut buf = [0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    let mut sent = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = to.write_all(&buf[..n]);
        let _ = to.flush();
        pending.extend_from_slice(&buf[..n]);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            if !sent {
                let _ = first_line.send(Instant::now());
                sent = true;
            }
            log.feed(line.trim_end_matches(['\r', '\n']));
        }
    }
    if !pending.is_empty() {
        log.feed(String::from_utf8_lossy(&pending).trim_end());
    }
    log
}

/// qemu's stderr minus the 9p warning about several devices under `/`.
fn filter_stderr(from: impl std::io::Read) {
    for line in BufReader::new(from).lines().map_while(Result::ok) {
        if !line.contains("Multiple devices detected") {
            eprintln!("qemu: {line}");
        }
    }
}

/// The exit code the guest wrote to ttyS2 (digits, maybe with `\r\n`).
pub fn parse_status(s: &str) -> Option<i32> {
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The last `n` lines of the kernel console log, for failure reports.
pub fn console_tail(log: &Path, n: usize) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(log).ok()?.read_to_string(&mut text).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    Some(lines[lines.len().saturating_sub(n)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(accel: Accel) -> Config {
        Config {
            accel,
            memory: "2G".into(),
            cpus: 2,
            kernel_image: "/c/k/vmlinux.pvh".into(),
            initrd: "/w/target/vm-test/debian-6.1/initramfs.cpio".into(),
            append: kernel_append(),
            host_root: "/".into(),
            modules_dir: "/c/k/lib/modules".into(),
            console_log: Some("/w/target/vm-test/debian-6.1/console.log".into()),
            status_file: "/w/target/vm-test/debian-6.1/status".into(),
        }
    }

    fn strings(a: Vec<OsString>) -> Vec<String> {
        a.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn tcg_command_line() {
        let a = strings(argv(&config(Accel::Tcg)));
        assert_eq!(after(&a, "-accel"), ["tcg,thread=single"]);
        assert_eq!(after(&a, "-cpu"), ["max"]);
        assert_eq!(after(&a, "-m"), ["2G"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-kernel"), ["/c/k/vmlinux.pvh"]);
        assert_eq!(after(&a, "-append"), ["console=ttyS0 panic=-1 quiet rdinit=/init"]);
        assert_eq!(
            after(&a, "-virtfs"),
            [
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
                "local,path=/c/k/lib/modules,mount_tag=kmods,security_model=none,readonly=on"
            ]
        );
        assert_eq!(
            after(&a, "-serial"),
            [
                "file:/w/target/vm-test/debian-6.1/console.log",
                "chardev:out",
                "file:/w/target/vm-test/debian-6.1/status"
            ]
        );
        assert_eq!(after(&a, "-chardev"), ["stdio,id=out,signal=off"]);
        assert!(a.contains(&"-nodefaults".to_string()) && a.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn kvm_and_live_console() {
        let mut c = config(Accel::Kvm);
        c.console_log = None;
        let a = strings(argv(&c));
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-serial")[0], "file:/dev/stderr");
    }

    #[test]
    fn explicit_accel_choices_are_kept() {
        assert_eq!(Accel::Tcg.resolve(), Accel::Tcg);
        assert_eq!(Accel::Kvm.resolve(), Accel::Kvm);
        assert_ne!(Accel::Auto.resolve(), Accel::Auto);
    }

    #[test]
    fn cpus_are_capped_at_four() {
        let n = default_cpus();
        assert!((1..=4).contains(&n));
    }

    #[test]
    fn status_port_text_is_parsed() {
        assert_eq!(parse_status("0\r\n"), Some(0));
        assert_eq!(parse_status("101\n"), Some(101));
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("\r\n"), None);
    }

    #[test]
    fn exit_codes_distinguish_the_endings() {
        assert_eq!(GuestExit::Code(3).code(), 3);
        assert_eq!(GuestExit::TimedOut.code(), 124);
        assert_eq!(GuestExit::NoReport(String::new()).code(), 125);
    }

    #[test]
    fn stdout_is_parsed_line_by_line() {
        let (tx, rx) = mpsc::channel();
        let text = "ctguard-vm: guest up: kernel 6.1.0-56-amd64, 6.50 s after boot\r\n\
                    test a ... ok\nctguard-vm: result 0 /x/a-1\n";
        let mut copy = Vec::new();
        let log = pump_stdout(text.as_bytes(), &mut copy, tx);
        assert_eq!(copy, text.as_bytes());
        assert!(rx.try_recv().is_ok());
        assert_eq!(log.guest_kernel.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(log.executables.len(), 1);
    }
}
