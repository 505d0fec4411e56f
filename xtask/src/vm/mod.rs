//! `cargo xtask vm-test`: ctguard's privileged integration suite under stock
//! Debian kernels in qemu. This host's own kernel may refuse what a backend
//! needs (kprobes, fentry); stock kernels allow it, so tests of those
//! backends run in a guest.
//!
//! For each kernel: find the current package through apt and unpack it once
//! into a cache ([`kernel`]), build an initramfs whose /init mounts the
//! host's root read-only over virtio-9p ([`initramfs`]), boot it under qemu
//! (TCG unless the host has hardware KVM) and stream the command's output
//! ([`qemu`]). Everything the guest runs is built on the host first
//! ([`build`]); the guest's output is summarised per kernel ([`results`]).
mod build;
pub mod initramfs;
pub mod kernel;
pub mod qemu;
mod results;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};

use self::{
    kernel::{KernelSpec, PrepareTimes},
    qemu::{Accel, GuestExit},
};
use crate::util::{self, note, step};

/// Default time limit of one guest run (a whole suite under single-threaded
/// TCG takes 15 to 25 minutes on a 2-core host).
pub const DEFAULT_TIMEOUT_SECS: u64 = 2400;

#[derive(Debug, Args)]
pub struct VmTestArgs {
    /// Which stock kernel(s) to boot.
    #[arg(long, value_enum, default_value_t = KernelChoice::All)]
    pub kernel: KernelChoice,
    /// Seconds one guest may run before qemu is stopped (exit status 124).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// How qemu runs the guest.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Show the guest kernel's console on stderr while it runs (it is
    /// otherwise kept in target/vm-test/KERNEL/console.log).
    #[arg(long)]
    pub console: bool,
    /// Arguments after `--` go to every test executable in the guest (after
    /// `--test-threads=1`): a test-name filter, `--list`, `--nocapture`, ...
    #[arg(last = true, value_name = "TEST_ARGS")]
    pub test_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    /// Debian bookworm's 6.1 kernel (newest ABI apt knows).
    #[value(name = "debian-6.1")]
    Debian61,
    /// Debian bookworm's 6.12 kernel (security/backports).
    #[value(name = "debian-6.12")]
    Debian612,
    /// Both, one after the other.
    All,
}

impl KernelChoice {
    pub fn specs(self) -> Vec<KernelSpec> {
        match self {
            KernelChoice::Debian61 => vec![kernel::DEBIAN_6_1],
            KernelChoice::Debian612 => vec![kernel::DEBIAN_6_12],
            KernelChoice::All => vec![kernel::DEBIAN_6_1, kernel::DEBIAN_6_12],
        }
    }
}

/// What one vm-test run does.
#[derive(Clone, Debug)]
pub struct Options {
    pub kernels: Vec<KernelSpec>,
    pub timeout: Duration,
    pub accel: Accel,
    pub console: bool,
    pub test_args: Vec<String>,
}

impl Options {
    /// All kernels with the defaults: what `cargo xtask test --tier vm` runs.
    pub fn all_kernels(test_args: &[String]) -> Options {
        Options {
            kernels: KernelChoice::All.specs(),
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            accel: Accel::Auto,
            console: false,
            test_args: test_args.to_vec(),
        }
    }
}

impl From<&VmTestArgs> for Options {
    fn from(a: &VmTestArgs) -> Options {
        Options {
            kernels: a.kernel.specs(),
            timeout: Duration::from_secs(a.timeout),
            accel: a.accel,
            console: a.console,
            test_args: a.test_args.clone(),
        }
    }
}

/// How the suite went under one kernel.
#[derive(Debug)]
pub struct KernelOutcome {
    pub label: &'static str,
    /// `linux-image-6.1.0-56-amd64 6.1.192-2`, once apt found it.
    pub package: Option<String>,
    pub prepare: PrepareTimes,
    pub result: Result<qemu::Run, String>,
}

impl KernelOutcome {
    /// 0 when every test executable passed; the guest's exit code otherwise
    /// (124 timeout, 125 no report), 1 for a failure on the host.
    pub fn code(&self) -> i32 {
        match &self.result {
            Ok(run) => run.exit.code(),
            Err(_) => 1,
        }
    }
}

/// `cargo xtask vm-test`.
pub fn run(args: &VmTestArgs) -> Result<ExitCode> {
    let outcomes = run_kernels(&Options::from(args))?;
    let code = outcomes.iter().map(KernelOutcome::code).find(|&c| c != 0).unwrap_or(0);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// `cargo xtask test --tier vm`: every kernel; an error names the failed ones.
pub fn run_for_tier(test_args: &[String]) -> Result<()> {
    let outcomes = run_kernels(&Options::all_kernels(test_args))?;
    let failed: Vec<String> =
        outcomes.iter().filter(|o| o.code() != 0).map(|o| format!("{} (exit {})", o.label, o.code())).collect();
    if !failed.is_empty() {
        bail!("the suite failed under {} of {} kernels: {}", failed.len(), outcomes.len(), failed.join(", "));
    }
    Ok(())
}

/// Builds on the host, then boots each kernel in turn; prints one summary
/// line per kernel (and a total line for several). Errors only for what
/// stops every kernel (missing tools, a failed host build).
pub fn run_kernels(opts: &Options) -> Result<Vec<KernelOutcome>> {
    let workspace = util::workspace_root();
    step("vm-test: checking the tools it needs");
    preflight()?;
    let accel = opts.accel.resolve();
    note(format!(
        "accelerator: {}",
        match accel {
            Accel::Kvm => "KVM (hardware virtualisation)",
            _ => "TCG (software emulation; no KVM needed)",
        }
    ));

    step("vm-test: building ctguard and the integration tests on the host");
    let host = build::build(&workspace)?;
    let cache = kernel::cache_dir()?;

    let mut outcomes = Vec::new();
    let mut apt_updated = false;
    for spec in &opts.kernels {
        banner(&format!("vm-test: {}", spec.label));
        let outcome = run_one(spec, opts, accel, &workspace, &host, &cache, &mut apt_updated);
        if let Err(e) = &outcome.result {
            eprintln!("xtask: vm-test: {}: {e}", spec.label);
        }
        println!("{}", summary_line(&outcome));
        outcomes.push(outcome);
    }

    if outcomes.len() > 1 {
        banner("vm-test: summary");
        for o in &outcomes {
            println!("{}", summary_line(o));
        }
        let failed = outcomes.iter().filter(|o| o.code() != 0).count();
        println!("{}", closing_line(outcomes.len() - failed, failed));
    }
    Ok(outcomes)
}

fn run_one(
    spec: &KernelSpec,
    opts: &Options,
    accel: Accel,
    workspace: &Path,
    host: &build::HostBuild,
    cache: &Path,
    apt_updated: &mut bool,
) -> KernelOutcome {
    let mut outcome = KernelOutcome {
        label: spec.label,
        package: None,
        prepare: PrepareTimes::default(),
        result: Err(String::new()),
    };
    let result = (|| -> Result<qemu::Run> {
        step(format!("{}: finding the kernel package", spec.label));
        let resolved = kernel::resolve(spec, apt_updated)?;
        note(format!("{} {}", resolved.package, resolved.version));
        outcome.package = Some(format!("{} {}", resolved.package, resolved.version));
        let (k, times) = kernel::prepare(spec, &resolved, cache)?;
        outcome.prepare = times;
        note(format!(
            "kernel {}: booting {}{}",
            k.release,
            k.boot_image.display(),
            if k.boot_image == k.vmlinuz { "" } else { " (PVH entry, no decompression)" }
        ));

        step(format!("{}: building the initramfs", spec.label));
        let work = workspace.join("target/vm-test").join(spec.label);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let initrd = work.join("initramfs.cpio");
        let command = initramfs::GuestCommand {
            label: spec.label.to_string(),
            workdir: workspace.to_path_buf(),
            ctguard: host.ctguard.clone(),
            test_exes: host.test_exes.iter().map(|t| t.path.clone()).collect(),
            test_args: opts.test_args.clone(),
            path_front: util::cargo_home_bin().into_iter().collect(),
            env: passed_env(),
        };
        initramfs::build(&k, &command, &initrd)
            .with_context(|| format!("building the initramfs for {}", spec.label))?;
        note(format!("{}", initrd.display()));

        step(format!("{}: booting {} under qemu; the guest's output follows", spec.label, k.release));
        let console_log = work.join("console.log");
        let config = qemu::Config {
            accel,
            memory: "2G".into(),
            cpus: qemu::default_cpus(),
            kernel_image: k.boot_image.clone(),
            initrd,
            append: qemu::kernel_append(),
            host_root: PathBuf::from("/"),
            modules_dir: k.modules_dir.clone(),
            console_log: (!opts.console).then(|| console_log.clone()),
            status_file: work.join("status"),
        };
        let run = qemu::run(&config, opts.timeout)?;
        if run.exit != GuestExit::Code(0) && !opts.console {
            show_console(&console_log, &run);
        }
        Ok(run)
    })();
    outcome.result = result.map_err(|e| format!("{e:#}"));
    outcome
}

fn show_console(log: &Path, run: &qemu::Run) {
    // Test failures speak for themselves; the console matters when the
    // guest itself went wrong, but a kernel warning can explain a test too.
    let n = if run.log.executables.is_empty() { 40 } else { 15 };
    match qemu::console_tail(log, n) {
        Some(tail) if !tail.trim().is_empty() => eprintln!(
            "--- guest kernel console, last {n} lines (all of it: {}) ---\n{tail}\n--- end of console ---",
            log.display()
        ),
        _ => eprintln!(
            "xtask: vm-test: the guest kernel printed nothing to its console ({}); --console shows it live",
            log.display()
        ),
    }
}

/// Host variables copied into the guest when set.
fn passed_env() -> Vec<(String, String)> {
    ["RUST_LOG"].iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect()
}

/// The programs vm-test runs, with the package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("file", "file"),
    ("modprobe", "kmod"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("dpkg", "dpkg"),
    ("apt-cache", "apt"),
    ("apt-get", "apt"),
];

fn preflight() -> Result<()> {
    let missing: Vec<(&str, &str)> = TOOLS.iter().copied().filter(|(tool, _)| util::which(tool).is_none()).collect();
    if !missing.is_empty() {
        let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        packages.dedup();
        bail!(
            "vm-test needs {} (not found in PATH): run `cargo xtask setup` or `apt-get install {}`",
            missing.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", "),
            packages.join(" ")
        );
    }
    note(format!("found {}", TOOLS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(" ")));
    Ok(())
}

fn banner(title: &str) {
    let rule = "=".repeat(72);
    println!("\n{rule}\n== {title}\n{rule}");
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// One line per kernel: outcome, tests, timings.
pub fn summary_line(o: &KernelOutcome) -> String {
    let mut times = Vec::new();
    match o.prepare.download {
        Some(d) => times.push(format!("download {}", secs(d))),
        None if o.package.is_some() => times.push("download cached".to_string()),
        None => {}
    }
    if let Some(d) = o.prepare.unpack {
        times.push(format!("unpack {}", secs(d)));
    }
    let run = match &o.result {
        Err(e) => {
            let first = e.lines().next().unwrap_or("");
            return format!("vm-test: {:<11} ERROR: {first}", o.label);
        }
        Ok(run) => run,
    };
    match run.boot {
        Some(boot) => {
            times.push(format!("boot {}", secs(boot)));
            times.push(format!("suite {}", secs(run.total.saturating_sub(boot))));
        }
        None => times.push(format!("qemu {}", secs(run.total))),
    }
    let log = &run.log;
    let kernel = log.guest_kernel.clone().or_else(|| o.package.clone()).unwrap_or_default();
    let tests = if log.passed + log.failed + log.ignored > 0 {
        format!("{} tests passed, {} failed, {} ignored", log.passed, log.failed, log.ignored)
    } else {
        format!("{} test executables ran", log.executables.len())
    };
    let verdict = match &run.exit {
        GuestExit::Code(0) => "passed".to_string(),
        GuestExit::Code(c) => format!("FAILED (exit {c})"),
        GuestExit::TimedOut => format!("TIMED OUT (exit {})", qemu::EXIT_TIMEOUT),
        GuestExit::NoReport(why) => format!("NO REPORT (exit {}: {why})", qemu::EXIT_NO_REPORT),
    };
    let mut line = format!("vm-test: {:<11} {verdict}: kernel {kernel}, {tests} ({})", o.label, times.join(", "));
    if let Some(e) = &log.setup_error {
        line += &format!("; guest setup failed: {e}");
    }
    if !log.failed_tests.is_empty() {
        line += &format!("; failed: {}", log.failed_tests.join(", "));
    } else if !log.failed_executables().is_empty() {
        line += &format!("; failed executables: {}", log.failed_executables().join(", "));
    }
    line
}

/// The last line of `vm-test --kernel all`, counting kernels.
pub fn closing_line(passed: usize, failed: usize) -> String {
    format!("vm-test: {passed} passed, {failed} failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(exit: GuestExit, lines: &str) -> qemu::Run {
        let mut log = results::GuestLog::default();
        for l in lines.lines() {
            log.feed(l);
        }
        qemu::Run { exit, boot: Some(Duration::from_secs(7)), total: Duration::from_secs(100), log }
    }

    #[test]
    fn kernel_choices() {
        assert_eq!(KernelChoice::Debian61.specs(), [kernel::DEBIAN_6_1]);
        assert_eq!(KernelChoice::Debian612.specs(), [kernel::DEBIAN_6_12]);
        assert_eq!(KernelChoice::All.specs(), [kernel::DEBIAN_6_1, kernel::DEBIAN_6_12]);
        assert_eq!(KernelChoice::from_str("debian-6.12", false), Ok(KernelChoice::Debian612));
    }

    #[test]
    fn a_passing_kernel_line() {
        let o = KernelOutcome {
            label: "debian-6.1",
            package: Some("linux-image-6.1.0-56-amd64 6.1.192-2".into()),
            prepare: PrepareTimes {
                download: Some(Duration::from_millis(12_300)),
                unpack: Some(Duration::from_secs(3)),
            },
            result: Ok(run_with(
                GuestExit::Code(0),
                "ctguard-vm: guest up: kernel 6.1.0-56-amd64, 5.00 s after boot\n\
                 test result: ok. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out\n\
                 ctguard-vm: result 0 /t/deps/a-0123456789abcdef\n",
            )),
        };
        assert_eq!(o.code(), 0);
        assert_eq!(
            summary_line(&o),
            "vm-test: debian-6.1  passed: kernel 6.1.0-56-amd64, 4 tests passed, 0 failed, \
             1 ignored (download 12.3 s, unpack 3.0 s, boot 7.0 s, suite 93.0 s)"
        );
    }

    #[test]
    fn failing_and_broken_kernel_lines() {
        let o = KernelOutcome {
            label: "debian-6.12",
            package: Some("linux-image-6.12.117+deb12-amd64 6.12.117-1~deb12u1".into()),
            prepare: PrepareTimes::default(),
            result: Ok(run_with(
                GuestExit::Code(101),
                "ctguard-vm: == /t/deps/sensors-0123456789abcdef --test-threads=1\n\
                 test vm_x ... FAILED\n\
                 ctguard-vm: result 101 /t/deps/sensors-0123456789abcdef\n",
            )),
        };
        assert_eq!(o.code(), 101);
        let line = summary_line(&o);
        assert!(line.contains("FAILED (exit 101)"), "{line}");
        assert!(line.contains("download cached"), "{line}");
        assert!(line.ends_with("; failed: sensors: vm_x"), "{line}");

        let timeout = KernelOutcome { result: Ok(run_with(GuestExit::TimedOut, "")), ..o };
        assert_eq!(timeout.code(), 124);
        assert!(summary_line(&timeout).contains("TIMED OUT"));

        let err = KernelOutcome {
            label: "debian-6.1",
            package: None,
            prepare: PrepareTimes::default(),
            result: Err("apt knows no debian-6.1 kernel\nmore".into()),
        };
        assert_eq!(err.code(), 1);
        assert_eq!(summary_line(&err), "vm-test: debian-6.1  ERROR: apt knows no debian-6.1 kernel");
    }

    #[test]
    fn closing_line_counts_kernels() {
        assert_eq!(closing_line(2, 0), "vm-test: 2 passed, 0 failed");
    }
}
