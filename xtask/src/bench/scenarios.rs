//! The measurements: each function drives the lab, the load and the tools
//! for one section of the report and returns plain [`super::results`] data.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::{
    env::{self, Lab, SysctlGuard},
    measure::{ProcSample, TICKS_PER_S},
    parse,
    results::{Cond, Plan, Run, ScaleRun, SeedScan},
    stats,
    tools::{Proc, Tools},
};
use crate::util::note;

pub const NF_CONNTRACK_MAX: &str = "net.netfilter.nf_conntrack_max";
pub const BPF_STATS: &str = "kernel.bpf_stats_enabled";

/// How one run is made.
#[derive(Clone, Copy, Debug)]
pub struct RunOpts {
    pub flows: u64,
    /// Lower nf_conntrack_max to this for the run (restored right after the flood).
    pub lowered_max: Option<u64>,
    /// For `top`: wait for the frame that covers the end of the flood.
    pub frame_after: bool,
}

pub struct Ctx<'a> {
    pub lab: &'a Lab,
    pub tools: &'a Tools,
    pub plan: &'a Plan,
    pub notes: Vec<String>,
    /// The sensor backend ctguard trace reported.
    pub backend: Option<String>,
    pub bpftrace_stderr: Option<String>,
}

impl Ctx<'_> {
    fn note(&mut self, what: String) {
        note(format!("note: {what}"));
        self.notes.push(what);
    }

    /// One flood of `opts.flows` new flows with `cond` running.
    pub fn run(&mut self, cond: Cond, round: usize, opts: RunOpts) -> Result<Run> {
        env::interrupted()?;
        let (lab, tools) = (self.lab, self.tools);
        lab.flush()?;
        let max_guard = opts.lowered_max.map(|m| SysctlGuard::set(NF_CONNTRACK_MAX, m)).transpose()?;
        let file = tools.tmp.join(format!("{}-{round}.out", cond.short().replace([' ', '-'], "_")));
        let mut proc: Option<Proc> = match cond {
            Cond::None => None,
            Cond::Top => Some(tools.start_top(&[])?),
            Cond::Trace => Some(tools.start_trace(lab, &file)?),
            Cond::ConntrackEvents => Some(tools.start_conntrack_events(lab, &file)?),
            Cond::Bpftrace => Some(tools.start_bpftrace()?),
        };
        let (new0, k0) = (lab.kernel_new()?, lab.kernel_stats()?);
        let s0 = proc.as_ref().map(|p| ProcSample::read(p.pid())).transpose()?;
        let t0 = Instant::now();
        let flood = tools.flood(lab, opts.flows, 0)?;
        lab.settle()?;
        let window_s = t0.elapsed().as_secs_f64();
        let s1 = proc.as_ref().map(|p| ProcSample::read(p.pid())).transpose()?;
        let (new1, k1) = (lab.kernel_new()?, lab.kernel_stats()?);
        // The kernel's per-CPU counters are 32-bit and wrap.
        let rise = |col: &str| {
            let (a, b) = (k0.get(col).copied().unwrap_or(0), k1.get(col).copied().unwrap_or(0));
            b.wrapping_sub(a) & 0xffff_ffff
        };
        drop(max_guard);

        let mut run = Run {
            cond,
            round,
            flood,
            kernel_new: new1 - new0,
            kernel_drop: rise("drop"),
            kernel_early_drop: rise("early_drop"),
            cpu_pct: None,
            cpu_pct_ticks: None,
            rss_kib: None,
            hwm_kib: None,
            map_memlock: None,
            bpf_run_ns: None,
            bpf_runs: None,
            counted_new: None,
            trace: None,
            conntrack: None,
            frames: Vec::new(),
        };
        if let (Some(a), Some(b)) = (s0, s1) {
            run.cpu_pct_ticks = stats::cpu_percent(a.cpu_ticks, b.cpu_ticks, TICKS_PER_S, window_s);
            run.cpu_pct = if b.cpu_ns > 0 {
                stats::cpu_percent(a.cpu_ns, b.cpu_ns, 1_000_000_000, window_s)
            } else {
                run.cpu_pct_ticks
            };
            run.rss_kib = Some(b.rss_kib);
            run.hwm_kib = Some(b.hwm_kib);
            run.map_memlock = Some(b.map_memlock);
            if b.prog_run_cnt > a.prog_run_cnt {
                run.bpf_run_ns = Some(b.prog_run_ns - a.prog_run_ns);
                run.bpf_runs = Some(b.prog_run_cnt - a.prog_run_cnt);
            }
        }
        let Some(p) = proc.as_mut() else { return Ok(run) };
        match cond {
            Cond::None => {}
            Cond::Top => {
                if opts.frame_after {
                    let have = p.stdout_len();
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while p.stdout_len() <= have && Instant::now() < deadline {
                        env::sleep(Duration::from_millis(20))?;
                    }
                }
                p.stop("TERM", Duration::from_secs(10))?;
                run.frames = p
                    .stdout_lines()
                    .iter()
                    .map(|(_, l)| parse::top_frame(l))
                    .collect::<Result<_>>()
                    .context("reading ctguard top's frames")?;
            }
            Cond::Trace => {
                // trace keys pending new entries every 250 ms; let it catch up.
                env::sleep(Duration::from_millis(400))?;
                let st = p.stop("TERM", Duration::from_secs(60))?;
                let err = p.stderr_text();
                if self.backend.is_none() {
                    self.backend = err
                        .lines()
                        .find_map(|l| Some(l.split(" with the ").nth(1)?.split(" backend").next()?.to_string()));
                }
                let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
                let summary = parse::trace_summary(&text, lab.server_inode).with_context(|| {
                    format!("ctguard trace ({}) printed no summary; stderr: {}", crate::util::describe(st), err.trim())
                })?;
                run.counted_new = Some(summary.inserts);
                run.trace = Some(summary);
            }
            Cond::ConntrackEvents => {
                // Events reach it through a socket: wait until the file stops growing.
                let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
                let mut last = size();
                let deadline = Instant::now() + Duration::from_secs(15);
                loop {
                    env::sleep(Duration::from_millis(300))?;
                    let now = size();
                    if now == last || Instant::now() > deadline {
                        break;
                    }
                    last = now;
                }
                p.stop("TERM", Duration::from_secs(10))?;
                let out = std::fs::read_to_string(&file).unwrap_or_default();
                let ev = parse::conntrack_events(&out, &p.stderr_text());
                run.counted_new = Some(ev.new_lines);
                run.conntrack = Some(ev);
            }
            Cond::Bpftrace => {
                p.stop("INT", Duration::from_secs(30))?;
                run.counted_new = Some(parse::bpftrace_count(&p.stdout_text(), "n"));
                if self.bpftrace_stderr.is_none() {
                    self.bpftrace_stderr = p.stderr_text().lines().find(|l| !l.trim().is_empty()).map(str::to_string);
                }
            }
        }
        let _ = std::fs::remove_file(&file);
        Ok(run)
    }

    fn log_run(&self, section: &str, r: &Run) {
        let mut s = format!(
            "{section} round {} {:<13} {:>9.0} flows/s  kernel new {:>7} drop {:>7}",
            r.round + 1,
            r.cond.short(),
            r.flood.rate_per_s,
            r.kernel_new,
            r.kernel_drop
        );
        if let Some(n) = r.counted_new {
            s.push_str(&format!("  counted {n}"));
        }
        if let Some(t) = &r.trace {
            s.push_str(&format!("  table_full {} lost {}", t.table_full, t.events_lost));
        }
        if let Some(c) = r.cpu_pct {
            s.push_str(&format!("  cpu {c:.1}%"));
        }
        note(s);
    }

    /// [`Ctx::run`], logged; a failure of one of the alternatives (not of
    /// ctguard, not an interrupt) is noted and the run skipped.
    fn run_or_skip(&mut self, section: &str, cond: Cond, round: usize, opts: RunOpts) -> Result<Option<Run>> {
        match self.run(cond, round, opts) {
            Ok(r) => {
                self.log_run(section, &r);
                Ok(Some(r))
            }
            Err(e) if matches!(cond, Cond::ConntrackEvents | Cond::Bpftrace) && env::interrupted().is_ok() => {
                self.note(format!("{section} round {}: {} failed, run skipped: {e:#}", round + 1, cond.short()));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sections 1–3 (live part): the same load with nothing, top, trace,
    /// conntrack -E and bpftrace, interleaved round by round.
    pub fn overhead(&mut self, conds: &[Cond]) -> Result<Vec<Run>> {
        let flows = self.plan.overhead_flows;
        let _max = SysctlGuard::at_least(NF_CONNTRACK_MAX, headroom(flows))?;
        // A warm-up flood (not recorded): slab caches, neighbour entries, page cache.
        self.lab.flush()?;
        self.tools.flood(self.lab, flows, 0)?;
        let mut runs = Vec::new();
        for round in 0..self.plan.repeats {
            for &cond in conds {
                let opts = RunOpts { flows, lowered_max: None, frame_after: false };
                if let Some(r) = self.run_or_skip("overhead", cond, round, opts)? {
                    runs.push(r);
                }
            }
        }
        Ok(runs)
    }

    /// Section 2 (drops): nf_conntrack_max lowered so most flows are dropped.
    pub fn drops(&mut self) -> Result<Vec<Run>> {
        let (flows, max) = (self.plan.drop_flows, self.plan.drop_max);
        let mut runs = Vec::new();
        for round in 0..self.plan.repeats {
            let r = self.run(Cond::Trace, round, RunOpts { flows, lowered_max: Some(max), frame_after: false })?;
            self.log_run("drops", &r);
            if r.trace.as_ref().is_some_and(|t| t.table_full != r.kernel_drop) {
                let t = r.trace.as_ref().expect("checked");
                self.note(format!(
                    "drops round {}: ctguard table_full {} != kernel drop {}",
                    round + 1,
                    t.table_full,
                    r.kernel_drop
                ));
            }
            runs.push(r);
        }
        Ok(runs)
    }

    /// Section 4 (cost): with kernel.bpf_stats_enabled=1, the BPF time the
    /// tools' programs spend per new entry, and top's per-program figures.
    pub fn cost(&mut self, conds: &[Cond]) -> Result<Vec<Run>> {
        let flows = self.plan.overhead_flows;
        let _max = SysctlGuard::at_least(NF_CONNTRACK_MAX, headroom(flows))?;
        let _stats = SysctlGuard::set(BPF_STATS, 1)?;
        let mut runs = Vec::new();
        for round in 0..self.plan.repeats {
            for &cond in conds {
                let opts = RunOpts { flows, lowered_max: None, frame_after: true };
                if let Some(r) = self.run_or_skip("cost", cond, round, opts)? {
                    runs.push(r);
                }
            }
        }
        Ok(runs)
    }

    /// Sections 3 (the seed's method) and 5 (scaling); both need big tables,
    /// so nf_conntrack_max is raised for them, and bpf stats are on so
    /// `top --once` reports its programs' cost.
    pub fn big_tables(&mut self) -> Result<(Vec<SeedScan>, Vec<super::results::ScaleRun>)> {
        let _max = SysctlGuard::at_least(NF_CONNTRACK_MAX, self.plan.raised_max)?;
        let _stats = SysctlGuard::set(BPF_STATS, 1)?;
        let seed = self.seed()?;
        let scaling = self.scaling()?;
        self.lab.flush()?;
        Ok((seed, scaling))
    }

    fn seed(&mut self) -> Result<Vec<SeedScan>> {
        let lab = self.lab;
        lab.flush()?;
        let mut have = 0u64;
        let mut out = Vec::new();
        for &size in &self.plan.fill_sizes.clone() {
            self.tools.flood(lab, size - have, have)?;
            lab.settle()?;
            have = size;
            let entries = lab.entries()?;
            if entries != size {
                self.note(format!("seed method: the table holds {entries} entries, not {size}"));
            }
            let mut scan = SeedScan { entries, ..Default::default() };
            for round in 0..self.plan.repeats {
                env::interrupted()?;
                let t = Instant::now();
                let text = lab.exec(&lab.server, &["sh", "-c", SEED_PIPELINE])?;
                scan.pipeline_s.push(t.elapsed().as_secs_f64());
                scan.pipeline_counted = parse::uniq_counts_total(&text);
                let (secs, frame) = self.top_once(&[])?;
                scan.once_s.push(secs);
                scan.once_frame = Some(frame);
                note(format!(
                    "seed round {} {entries} entries: pipeline {:.3} s (counted {}), top --once {secs:.3} s",
                    round + 1,
                    scan.pipeline_s.last().expect("pushed"),
                    scan.pipeline_counted
                ));
            }
            out.push(scan);
        }
        Ok(out)
    }

    /// Runs `ctguard top --once --interval 200ms --json`; wall seconds and its frame.
    fn top_once(&self, extra: &[&str]) -> Result<(f64, parse::TopFrame)> {
        let mut args = vec!["top", "--once", "--interval", "200ms", "--json"];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let mut p = Proc::spawn("ctguard top --once", self.tools.ctguard(&args), super::tools::Out::Lines)?;
        let st = p.wait(Duration::from_secs(60))?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(st.success(), "ctguard top --once failed ({}): {}", crate::util::describe(st), p.stderr_text());
        let out = p.stdout_text();
        let line = out.lines().find(|l| l.starts_with('{')).context("ctguard top --once printed no JSON")?;
        Ok((secs, parse::top_frame(line)?))
    }

    fn scaling(&mut self) -> Result<Vec<ScaleRun>> {
        let (lab, tools) = (self.lab, self.tools);
        let mut out = Vec::new();
        for &keys in &self.plan.scales.clone() {
            env::interrupted()?;
            lab.flush()?;
            let mut top = tools.start_top(&["--by", "tuple"])?;
            let s0 = ProcSample::read(top.pid())?;
            let flood = tools.flood(lab, keys, 0)?;
            lab.settle()?;
            let flood_end = Instant::now();
            // Three frames that sampled the filled map.
            let deadline = Instant::now() + Duration::from_secs(15);
            while top.stdout_lines().iter().filter(|(at, _)| *at > flood_end).count() < 3 && Instant::now() < deadline {
                env::sleep(Duration::from_millis(50))?;
            }
            let s1 = ProcSample::read(top.pid())?;
            top.stop("TERM", Duration::from_secs(10))?;
            let lines = top.stdout_lines();
            let frames: Vec<(Instant, parse::TopFrame)> = lines
                .iter()
                .map(|(at, l)| Ok((*at, parse::top_frame(l)?)))
                .collect::<Result<_>>()
                .context("reading ctguard top's frames")?;
            let nominal = 1.0;
            let refresh_ms: Vec<f64> = frames
                .iter()
                .filter(|(at, _)| *at > flood_end)
                .map(|(_, f)| (f.interval_s - nominal) * 1000.0)
                .collect();
            let last = frames.last().map(|(_, f)| f.clone());
            let mut run = ScaleRun {
                keys,
                flood,
                memlock_before: s0.map_memlock,
                memlock_after: s1.map_memlock,
                maps: s1.maps,
                rss_kib: s1.rss_kib,
                key_overflow: last.as_ref().map_or(0, |f| f.key_overflow),
                refresh_ms,
                once_s: Vec::new(),
            };
            for _ in 0..self.plan.repeats {
                let (secs, _) = self.top_once(&["--by", "tuple"])?;
                run.once_s.push(secs);
            }
            note(format!(
                "scaling {keys} keys: {:.0} flows/s, memlock {} -> {} bytes, key_overflow {}, refresh {:?} ms, top --once {:?} s",
                run.flood.rate_per_s,
                run.memlock_before,
                run.memlock_after,
                run.key_overflow,
                stats::median(&run.refresh_ms),
                stats::median(&run.once_s)
            ));
            out.push(run);
        }
        Ok(out)
    }
}

/// nf_conntrack_max that leaves room for `flows` entries.
fn headroom(flows: u64) -> u64 {
    flows + flows / 4 + 1_000
}

/// The classic way to see who fills the table, grouped like
/// `ctguard top --by dst-port`: protocol and destination port.
pub const SEED_PIPELINE: &str = "cat /proc/net/nf_conntrack \
| awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^dport=/) { print $3, $i; break } }' \
| sort | uniq -c | sort -rn";
