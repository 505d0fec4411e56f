//! `cargo xtask bench`: ctguard against the limit it watches and against the
//! alternatives, measured side by side in one run and written to
//! BENCHMARKS.md.
//!
//! The modules: [`env`] (the namespaces, sysctl guards, the lock, Ctrl-C),
//! [`tools`] (starting, readying and stopping the measured programs),
//! [`measure`] (CPU, memory and BPF readings of a process), [`parse`] (what
//! the tools print), [`stats`] (medians, spreads, ratios), [`scenarios`]
//! (the measurements), [`results`] (their data) and [`report`] (markdown).
//!
//! Benchmarks are not timed tests: nothing here fails because a number is
//! bad. `--smoke` runs every step with tiny counts to check the harness
//! itself, and only writes a file when `--out` is given.
mod env;
mod measure;
mod parse;
mod report;
mod results;
mod scenarios;
mod stats;
mod tools;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use self::{
    env::{BenchLock, Lab},
    results::{Cond, Machine, Plan, Results},
    scenarios::Ctx,
    tools::Tools,
};
use crate::util::{self, cmd, note, step};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tiny counts and one round: checks the harness end to end in well under
    /// a minute and prints the report (writes no file unless --out is given).
    #[arg(long)]
    pub smoke: bool,
    /// Rounds of every interleaved measurement [default: 7, with --smoke 1].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub repeats: Option<u64>,
    /// Where to write the report [default: BENCHMARKS.md at the workspace
    /// root; with --smoke: print it only].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

impl BenchArgs {
    pub fn plan(&self) -> Plan {
        match (self.smoke, self.repeats) {
            (true, r) => Plan::smoke(r.unwrap_or(1) as usize),
            (false, r) => Plan::full(r.unwrap_or(7) as usize),
        }
    }

    /// The file the report goes to, if any.
    pub fn out_path(&self, root: &Path) -> Option<PathBuf> {
        match (&self.out, self.smoke) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => None,
            (None, false) => Some(root.join("BENCHMARKS.md")),
        }
    }

    /// How the run was asked for, for the report.
    pub fn command(&self) -> String {
        let mut c = "cargo xtask bench".to_string();
        if self.smoke {
            c.push_str(" --smoke");
        }
        if let Some(r) = self.repeats {
            c.push_str(&format!(" --repeats {r}"));
        }
        c
    }
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let root = util::workspace_root();
    let plan = args.plan();
    let out = args.out_path(&root);
    if !util::is_root() {
        bail!("the benchmark needs root: it creates network namespaces, loads eBPF programs and changes sysctls");
    }
    for tool in ["ip", "nft", "conntrack"] {
        if util::which(tool).is_none() {
            bail!("`{tool}` is not installed (run `cargo xtask setup`)");
        }
    }
    env::catch_interrupts();

    step("bench 1/7: building ctguard (release)");
    util::run(cmd(util::cargo(), ["build", "--release", "-p", "ctguard"]).current_dir(&root))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let ctguard = target.join("release/ctguard");

    step("bench 2/7: taking the test lock, setting up the namespaces");
    let _lock = BenchLock::acquire()?;
    env::restore_stale()?;
    env::cleanup_stale_namespaces();
    let tmp = TempDir::create()?;
    let lab = Lab::create()?;
    note(format!("lab: {} -> {} (server netns inode {})", lab.client, lab.server, lab.server_inode));
    let bpftrace = tools::probe_bpftrace();
    match &bpftrace {
        Ok(a) => note(format!("bpftrace runs here (tracepoint arguments spelled `{a}name`)")),
        Err(e) => note(format!("bpftrace: {e}")),
    }
    let tools = Tools { ctguard: ctguard.clone(), tmp: tmp.0.clone(), bpftrace: bpftrace.clone() };
    let mut results = Results {
        machine: machine(&ctguard, &root),
        plan: Some(plan.clone()),
        command: args.command(),
        ..Default::default()
    };
    results.bpftrace = Some(bpftrace.clone().map(str::to_string));

    let mut ctx =
        Ctx { lab: &lab, tools: &tools, plan: &plan, notes: Vec::new(), backend: None, bpftrace_stderr: None };
    let mut conds = vec![Cond::None, Cond::Top, Cond::Trace, Cond::ConntrackEvents];
    if bpftrace.is_ok() {
        conds.push(Cond::Bpftrace);
    }
    step(format!("bench 3/7: overhead and fidelity ({} rounds × {} conditions)", plan.repeats, conds.len()));
    results.overhead = ctx.overhead(&conds)?;
    step(format!("bench 4/7: drops (nf_conntrack_max {} for each run, restored after)", plan.drop_max));
    results.drops = ctx.drops()?;
    step("bench 5/7: in-kernel cost (kernel.bpf_stats_enabled=1, restored after)");
    let cost_conds: Vec<Cond> =
        conds.iter().copied().filter(|c| matches!(c, Cond::Top | Cond::Trace | Cond::Bpftrace)).collect();
    results.cost = ctx.cost(&cost_conds)?;
    step(format!("bench 6/7: the seed's method and scaling (nf_conntrack_max {} for the phase)", plan.raised_max));
    let (seed, scaling) = ctx.big_tables()?;
    results.seed = seed;
    results.scaling = scaling;

    results.machine.backend = ctx.backend.clone().unwrap_or_else(|| "unknown".into());
    results.bpftrace_stderr = ctx.bpftrace_stderr.clone();
    results.notes = ctx.notes.clone();
    drop(ctx);
    drop(lab);
    results.total_s = started.elapsed().as_secs_f64();
    results.machine.load_after = loadavg();

    step("bench 7/7: report");
    let md = report::render(&results);
    match &out {
        Some(path) => {
            std::fs::write(path, &md).with_context(|| format!("cannot write {}", path.display()))?;
            println!("{md}");
            note(format!("wrote {}", path.display()));
        }
        None => println!("{md}"),
    }
    check_sane(&results)?;
    note(format!("done in {:.0} s", results.total_s));
    Ok(ExitCode::SUCCESS)
}

/// The harness's own sanity checks (not performance verdicts): every
/// section produced numbers.
fn check_sane(r: &Results) -> Result<()> {
    let mut missing = Vec::new();
    if r.overhead.iter().all(|x| x.cond != Cond::None) {
        missing.push("overhead baseline");
    }
    if r.overhead.iter().all(|x| x.trace.is_none()) {
        missing.push("trace summaries");
    }
    if r.drops.iter().all(|x| x.trace.is_none()) {
        missing.push("drop runs");
    }
    if r.cost.is_empty() {
        missing.push("cost runs");
    }
    if r.seed.is_empty() || r.scaling.is_empty() {
        missing.push("big-table runs");
    }
    if !missing.is_empty() {
        bail!("the benchmark produced no {}", missing.join(", "));
    }
    Ok(())
}

/// A scratch directory for the tools' output, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("ctgbench-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn first_line_of(c: &mut std::process::Command) -> String {
    util::probe(c).map(|s| util::first_line(&s).to_string()).unwrap_or_else(|| "unknown".into())
}

fn machine(ctguard: &Path, root: &Path) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let mem_kib = measure::parse_status_kib(&read("/proc/meminfo"), "MemTotal").unwrap_or(0);
    let lockdown = read("/sys/kernel/security/lockdown");
    let lockdown = lockdown
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']').map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let git = |args: &[&str]| util::probe(cmd("git", args).current_dir(root));
    let rev = git(&["rev-parse", "--short", "HEAD"]).map(|s| s.trim().to_string()).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.trim().is_empty());
    Machine {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu_model,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_gib: mem_kib as f64 / (1024.0 * 1024.0),
        lockdown,
        date_utc: first_line_of(&mut cmd("date", ["-u", "+%Y-%m-%d %H:%M UTC"])),
        ctguard_version: first_line_of(&mut cmd(ctguard, ["--version"])),
        git_rev: if dirty { format!("commit {rev} + uncommitted changes") } else { format!("commit {rev}") },
        backend: String::new(),
        hooks: doctor_hooks(ctguard),
        conntrack_version: first_line_of(&mut cmd("conntrack", ["--version"])),
        bpftrace_version: util::probe(&mut cmd("bpftrace", ["--version"]))
            .map(|s| util::first_line(&s).to_string())
            .unwrap_or_else(|| "bpftrace not installed".into()),
        nf_conntrack_max: env::read_sysctl("net.netfilter.nf_conntrack_max").unwrap_or_default(),
        nf_conntrack_buckets: env::read_sysctl("net.netfilter.nf_conntrack_buckets").unwrap_or_default(),
        load_before: loadavg(),
        load_after: String::new(),
    }
}

/// What `ctguard doctor` says the sensors hook here: its indented `drops`
/// and `new/removed entries` lines, spaces collapsed.
fn doctor_hooks(ctguard: &Path) -> Vec<String> {
    // doctor exits 1 on warnings; its report is what matters.
    let Ok(out) = cmd(ctguard, ["doctor"]).stdin(std::process::Stdio::null()).output() else { return Vec::new() };
    hook_lines(&String::from_utf8_lossy(&out.stdout))
}

fn hook_lines(doctor: &str) -> Vec<String> {
    doctor
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("drops ") || l.starts_with("new/removed entries "))
        .map(|l| {
            let (what, how) = l.split_once("  ").unwrap_or((l, ""));
            format!("{what}: {}", how.trim())
        })
        .collect()
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).unwrap().bench
    }

    #[test]
    fn full_run_writes_benchmarks_md_with_seven_rounds() {
        let a = parse(&[]);
        assert_eq!(a.plan().repeats, 7);
        assert!(!a.plan().smoke);
        assert_eq!(a.out_path(Path::new("/w")), Some(PathBuf::from("/w/BENCHMARKS.md")));
        assert_eq!(a.command(), "cargo xtask bench");
    }

    #[test]
    fn smoke_prints_only_unless_out_is_given() {
        let a = parse(&["--smoke"]);
        assert!(a.plan().smoke);
        assert_eq!(a.plan().repeats, 1);
        assert_eq!(a.out_path(Path::new("/w")), None);
        let a = parse(&["--smoke", "--repeats", "2", "--out", "/tmp/b.md"]);
        assert_eq!(a.plan().repeats, 2);
        assert_eq!(a.out_path(Path::new("/w")), Some(PathBuf::from("/tmp/b.md")));
        assert_eq!(a.command(), "cargo xtask bench --smoke --repeats 2");
    }

    #[test]
    fn doctor_hook_lines() {
        let doctor = "kernel        6.18\n\nsensor backend     tracepoint\n  drops                raw_tp skb:kfree_skb (reason NETFILTER_DROP)\n  \
                      new/removed entries  raw_tp kmem:kmem_cache_alloc / kmem_cache_free on the nf_conntrack slab\n  why: raw tracepoints work\n";
        assert_eq!(
            hook_lines(doctor),
            [
                "drops: raw_tp skb:kfree_skb (reason NETFILTER_DROP)",
                "new/removed entries: raw_tp kmem:kmem_cache_alloc / kmem_cache_free on the nf_conntrack slab"
            ]
        );
    }

    #[test]
    fn repeats_must_be_positive() {
        assert!(Cli::try_parse_from(["bench", "--repeats", "0"]).is_err());
    }

    #[test]
    fn smoke_plan_is_tiny_and_full_plan_is_the_documented_one() {
        let s = Plan::smoke(1);
        assert!(s.overhead_flows <= 10_000 && s.fill_sizes.iter().all(|&n| n <= 20_000));
        assert!(s.scales.iter().any(|&n| n > s.max_keys), "smoke still shows key overflow");
        let f = Plan::full(5);
        assert_eq!((f.overhead_flows, f.drop_max), (200_000, 2_000));
        assert_eq!(f.fill_sizes, [100_000, 1_000_000]);
        assert_eq!(f.scales, [10_000, 100_000, 1_000_000]);
        assert!(f.raised_max >= 2 * 1_000_000);
    }
}
