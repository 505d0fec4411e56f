//! ctguard's development tasks, run as `cargo xtask <task>` (an alias in
//! .cargo/config.toml):
//!
//! - `setup`: install what building and testing need (idempotent);
//! - `test`:  setup, then every test tier, with one summary line each;
//! - `demo`:  setup, build ctguard, run `ctguard doctor`, then the `ctguard lab` story;
//! - `vm-test`: the privileged integration suite under stock Debian kernels in qemu.
mod bench;
mod demo;
mod setup;
mod test;
mod util;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "ctguard's development tasks: toolchain setup, tests, demo",
    after_help = "Environment: CTGUARD_BPF_LINKER_ROOT=DIR installs/looks for bpf-linker in \
DIR/bin instead of ~/.cargo/bin; CTGUARD_SKIP_APT=1 skips the Debian package step (non-Debian hosts)."
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need: Debian packages, the nightly
    /// rust-src component, bpf-linker. Quick when everything is already there.
    Setup,
    /// Run setup, then the test tiers in order: "unit + CLI" (no root),
    /// "privileged integration" (root, serial, in network namespaces) and
    /// "vm" (the privileged suite under stock Debian kernels in qemu).
    Test(test::TestArgs),
    /// Run setup, build ctguard (release), run `ctguard doctor` on this host,
    /// then `ctguard lab`: a flood fills a throw-away table, ctguard explains
    /// the drops, recommends limits and bypasses the hot port (`--script`
    /// when there is no terminal).
    Demo,
    /// Run the privileged integration suite under stock Debian kernels
    /// (downloaded through apt, cached) in qemu; no KVM needed. Exits with the
    /// suite's status (124: timed out, 125: the guest never reported).
    VmTest(vm::VmTestArgs),
    /// Benchmark ctguard against the new-flow limit and the alternatives
    /// (root; under 10 minutes; writes BENCHMARKS.md). --smoke: a quick check.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    // Tools installed by cargo (bpf-linker) must be found by the builds we
    // start; the tests run ip, nft and conntrack from the sbin directories.
    let mut front: Vec<_> = util::cargo_home_bin().into_iter().collect();
    if std::env::var_os("CTGUARD_BPF_LINKER_ROOT").is_some_and(|r| !r.is_empty()) {
        front.extend(util::bpf_linker_root().map(|r| r.join("bin")));
    }
    let back = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(std::path::PathBuf::from);
    util::extend_path(&front, &back);

    let result = match &cli.task {
        Task::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Task::Test(args) => test::run(args),
        Task::Demo => demo::run(),
        Task::VmTest(args) => vm::run(args),
        Task::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;
    use crate::test::TierChoice;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_defaults_to_all_tiers_without_extra_args() {
        let cli = Cli::try_parse_from(["xtask", "test"]).unwrap();
        let Task::Test(args) = cli.task else { panic!("not test") };
        assert_eq!(args.tier, TierChoice::All);
        assert!(args.test_args.is_empty());
    }

    #[test]
    fn test_takes_a_tier_and_args_after_double_dash() {
        let cli = Cli::try_parse_from(["xtask", "test", "--tier", "privileged", "--", "netns", "--nocapture"]).unwrap();
        let Task::Test(args) = cli.task else { panic!("not test") };
        assert_eq!(args.tier, TierChoice::Privileged);
        assert_eq!(args.test_args, ["netns", "--nocapture"]);
    }

    #[test]
    fn unknown_tier_and_stray_args_are_rejected() {
        assert!(Cli::try_parse_from(["xtask", "test", "--tier", "kvm"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "test", "filter"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "setup", "--", "x"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "vm-test", "--kernel", "debian-7"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "vm-test", "filter"]).is_err());
    }

    #[test]
    fn vm_test_defaults_to_every_kernel() {
        let cli = Cli::try_parse_from(["xtask", "vm-test"]).unwrap();
        let Task::VmTest(args) = cli.task else { panic!("not vm-test") };
        assert_eq!(args.kernel, vm::KernelChoice::All);
        assert_eq!(args.timeout, 2400);
        assert_eq!(args.accel, vm::qemu::Accel::Auto);
        assert!(args.test_args.is_empty());
    }

    #[test]
    fn vm_test_takes_a_kernel_a_timeout_and_test_args() {
        let cli =
            Cli::try_parse_from(["xtask", "vm-test", "--kernel", "debian-6.1", "--timeout", "60", "--", "--list"])
                .unwrap();
        let Task::VmTest(args) = cli.task else { panic!("not vm-test") };
        assert_eq!(args.kernel, vm::KernelChoice::Debian61);
        assert_eq!(args.timeout, 60);
        assert_eq!(args.test_args, ["--list"]);
    }
}
