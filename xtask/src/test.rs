//! `cargo xtask test`: the project's test command. Runs `setup`, then each
//! tier in order (stopping at the first that fails), then prints one summary
//! line per tier and, last, `xtask: N passed, N failed` (counting tiers).
//!
//! Integration tests named `vm_*` need what only the stock kernels of the vm
//! tier allow (kprobes, fentry): the privileged tier skips them on this host.
use std::{
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use crate::util::{self, cmd, note, step};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Which tier(s) to run.
    #[arg(long, value_enum, default_value_t = TierChoice::All)]
    pub tier: TierChoice,
    /// Arguments after `--` go to the test binaries: a test-name filter,
    /// `--nocapture`, `--exact`, ...
    #[arg(last = true, value_name = "TEST_ARGS")]
    pub test_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TierChoice {
    /// Unit tests and CLI tests of ctguard and xtask (no root needed).
    Unit,
    /// The integration tests that load the eBPF programs in network namespaces (root),
    /// except the `vm_*` ones.
    Privileged,
    /// A short smoke run of the benchmark harness (`cargo xtask bench --smoke`, root).
    BenchSmoke,
    /// The whole integration suite under stock Debian kernels in qemu (`cargo xtask vm-test`).
    Vm,
    /// All of them: unit, privileged, bench-smoke, vm.
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Unit,
    Privileged,
    BenchSmoke,
    Vm,
}

/// Test-name filter of the tests that only make sense in the VM tier.
pub const VM_ONLY_PREFIX: &str = "vm_";

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Unit => "unit + CLI",
            Tier::Privileged => "privileged integration",
            Tier::BenchSmoke => "benchmark smoke run",
            Tier::Vm => "vm (Debian kernels)",
        }
    }

    /// The `cargo test` arguments of this tier, with `extra` for the test
    /// binaries; `None` for the vm tier, which is not one cargo command.
    pub fn cargo_args(self, extra: &[String]) -> Option<Vec<String>> {
        let mut args: Vec<String> = match self {
            Tier::Unit => ["test", "-p", "ctguard", "-p", "xtask"].map(String::from).to_vec(),
            Tier::Privileged => {
                ["test", "-p", "ctguard-integration", "--", "--test-threads=1", "--skip", VM_ONLY_PREFIX]
                    .map(String::from)
                    .to_vec()
            }
            Tier::BenchSmoke | Tier::Vm => return None,
        };
        if !extra.is_empty() {
            if !args.iter().any(|a| a == "--") {
                args.push("--".into());
            }
            args.extend(extra.iter().cloned());
        }
        Some(args)
    }
}

impl TierChoice {
    pub fn tiers(self) -> Vec<Tier> {
        match self {
            TierChoice::Unit => vec![Tier::Unit],
            TierChoice::Privileged => vec![Tier::Privileged],
            TierChoice::BenchSmoke => vec![Tier::BenchSmoke],
            TierChoice::Vm => vec![Tier::Vm],
            TierChoice::All => vec![Tier::Unit, Tier::Privileged, Tier::BenchSmoke, Tier::Vm],
        }
    }
}

#[derive(Debug)]
pub enum Outcome {
    Passed(Duration),
    Failed(Duration, String),
    NotRun,
}

pub fn run(args: &TestArgs) -> Result<ExitCode> {
    crate::setup::run()?;

    let tiers = args.tier.tiers();
    let mut outcomes: Vec<(Tier, Outcome)> = tiers.iter().map(|&t| (t, Outcome::NotRun)).collect();
    let total = tiers.len();
    for (i, (tier, outcome)) in outcomes.iter_mut().enumerate() {
        banner(&format!("tier {}/{total}: {}", i + 1, tier.name()));
        let start = Instant::now();
        let result = run_tier(*tier, &args.test_args);
        *outcome = match result {
            Ok(()) => Outcome::Passed(start.elapsed()),
            Err(e) => {
                eprintln!("xtask: tier \"{}\" FAILED: {e:#}", tier.name());
                Outcome::Failed(start.elapsed(), format!("{e:#}"))
            }
        };
        if matches!(outcome, Outcome::Failed(..)) {
            break;
        }
    }

    banner("summary");
    for (tier, outcome) in &outcomes {
        println!("{}", summary_line(*tier, outcome));
    }
    let passed = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Passed(_))).count();
    let failed = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Failed(..))).count();
    println!("{}", closing_line(passed, failed));
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn banner(title: &str) {
    let rule = "=".repeat(72);
    println!("\n{rule}\n== xtask: {title}\n{rule}");
}

pub fn summary_line(tier: Tier, outcome: &Outcome) -> String {
    let name = tier.name();
    match outcome {
        Outcome::Passed(d) => format!("  {name:<24} passed   ({:.1} s)", d.as_secs_f64()),
        Outcome::Failed(d, why) => {
            let why = why.lines().next().unwrap_or("");
            format!("  {name:<24} FAILED   ({:.1} s): {why}", d.as_secs_f64())
        }
        Outcome::NotRun => format!("  {name:<24} not run  (an earlier tier failed)"),
    }
}

/// The very last line of `cargo xtask test`, read by CI.
pub fn closing_line(passed: usize, failed: usize) -> String {
    format!("xtask: {passed} passed, {failed} failed")
}

fn run_tier(tier: Tier, extra: &[String]) -> Result<()> {
    if matches!(tier, Tier::Privileged | Tier::BenchSmoke) {
        privileged_preflight()?;
    }
    if tier == Tier::BenchSmoke {
        // Benchmarks are not timed tests: CI only checks the harness works end to end.
        let code = crate::bench::run(&crate::bench::BenchArgs { smoke: true, repeats: None, out: None })?;
        if code != ExitCode::SUCCESS {
            bail!("the benchmark smoke run failed");
        }
        return Ok(());
    }
    let Some(args) = tier.cargo_args(extra) else {
        return crate::vm::run_for_tier(extra);
    };
    let mut c = cmd(util::cargo(), args);
    c.current_dir(util::workspace_root());
    util::run(&mut c)
}

/// What the privileged tier needs before cargo starts: root, kernel BTF and tracefs.
fn privileged_preflight() -> Result<()> {
    step("checking what the privileged tier needs");
    if !util::is_root() {
        bail!(
            "the privileged integration tests must run as root: they load eBPF programs, create \
             network namespaces and change conntrack settings inside them. They were NOT run. \
             Re-run as root, e.g. `sudo -E env \"PATH=$PATH\" cargo xtask test`, or run only \
             the unprivileged tier with `cargo xtask test --tier unit`"
        );
    }
    note("running as root");
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        bail!(
            "this kernel exposes no BTF ({} is missing; it needs CONFIG_DEBUG_INFO_BTF=y): \
             ctguard's eBPF programs cannot load here",
            btf.display()
        );
    }
    note(format!("kernel BTF: {}", btf.display()));
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").is_dir() {
        note(format!("tracefs mounted at {}", tracing.display()));
    } else {
        note(format!("tracefs not mounted at {}: mounting it", tracing.display()));
        util::run(&mut cmd("mount", ["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
            .map_err(|e| e.context("cannot mount tracefs (the tests read tracepoint formats from it)"))?;
        if !tracing.join("events").is_dir() {
            bail!("mounted tracefs but {}/events still does not exist", tracing.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn unit_tier_runs_ctguard_and_xtask_tests() {
        assert_eq!(Tier::Unit.cargo_args(&[]), Some(s(&["test", "-p", "ctguard", "-p", "xtask"])));
        assert_eq!(
            Tier::Unit.cargo_args(&s(&["status", "--nocapture"])),
            Some(s(&["test", "-p", "ctguard", "-p", "xtask", "--", "status", "--nocapture"]))
        );
    }

    #[test]
    fn privileged_tier_runs_serially_skips_vm_tests_and_keeps_the_filter() {
        assert_eq!(
            Tier::Privileged.cargo_args(&[]),
            Some(s(&["test", "-p", "ctguard-integration", "--", "--test-threads=1", "--skip", "vm_"]))
        );
        assert_eq!(
            Tier::Privileged.cargo_args(&s(&["trace"])),
            Some(s(&["test", "-p", "ctguard-integration", "--", "--test-threads=1", "--skip", "vm_", "trace"]))
        );
    }

    #[test]
    fn vm_tier_is_not_a_cargo_command() {
        assert_eq!(Tier::Vm.cargo_args(&s(&["trace"])), None);
        assert_eq!(Tier::Vm.name(), "vm (Debian kernels)");
    }

    #[test]
    fn tier_choice_orders_tiers() {
        assert_eq!(TierChoice::All.tiers(), [Tier::Unit, Tier::Privileged, Tier::BenchSmoke, Tier::Vm]);
        assert_eq!(TierChoice::Vm.tiers(), [Tier::Vm]);
        assert_eq!(TierChoice::Unit.tiers(), [Tier::Unit]);
        assert_eq!(TierChoice::Privileged.tiers(), [Tier::Privileged]);
    }

    #[test]
    fn closing_line_is_the_plain_form_ci_reads() {
        assert_eq!(closing_line(2, 0), "xtask: 2 passed, 0 failed");
        assert_eq!(closing_line(1, 1), "xtask: 1 passed, 1 failed");
    }

    #[test]
    fn summary_lines_name_the_outcome() {
        let ok = summary_line(Tier::Unit, &Outcome::Passed(Duration::from_millis(1500)));
        assert!(ok.contains("unit + CLI") && ok.contains("passed") && ok.contains("1.5 s"), "{ok}");
        let bad = summary_line(Tier::Privileged, &Outcome::Failed(Duration::ZERO, "must run as root\nmore".into()));
        assert!(bad.contains("FAILED") && bad.ends_with("must run as root"), "{bad}");
        assert!(summary_line(Tier::Privileged, &Outcome::NotRun).contains("not run"));
    }
}
