//! `ctguard capture`: armed triggers during load tests.
//!
//! The sensors run with packet capture on (the first bytes of every dropped
//! packet from its network header; bundles keep its headers only, or
//! `--snap-bytes`, see [`snap`]). Every drop event goes into a
//! pre-trigger ring ([`window::PreRing`], bounded by `--pre` and
//! `--pre-max-events`); every `--interval` a stat snapshot (a `top` frame
//! plus exact counts) is taken and the triggers ([`trigger`]; grammar in its
//! module doc and in `--help`) are evaluated. When one holds, a bundle
//! directory is created ([`bundle`]): the ring's events of the last `--pre`
//! go in, then everything of the next `--post`; at the end of the window a
//! summary is written. Up to `--max-captures`, `--cooldown` apart.
//!
//! With `-- CMD ARGS...` the command is started once the sensors are
//! attached ([`wrap`]); capture stops when it exits (a window in progress
//! runs to its end first) and exits 3 when a trigger fired, else with the
//! command's status -- so a CI load test fails with the evidence attached.
//!
//! Layout: `trigger` (pure parser and evaluator), `window` (pure ring and
//! schedule), `pcapng` (writer and reader), `bundle` (files, summary),
//! `wrap` (the child process); this file holds the arguments and the loop.
pub mod bundle;
pub mod pcapng;
pub mod snap;
pub mod trigger;
pub mod window;
pub mod wrap;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use self::{
    bundle::{
        AlsoTrue, Bundle, CommandInfo, EventContext, IntervalTotals, Offender, PlanFix, Sizing, StatLine, SummaryInput,
        TriggerInfo, WindowInfo,
    },
    trigger::{Armed, Observation, SinceArmed, Trigger},
    window::{PreRing, Route, Schedule, ScheduleConfig, Transition, Window},
    wrap::Wrapped,
};
use crate::{
    conntrack::{self, sysctl},
    error::CtguardError,
    kernel::kallsyms::Kallsyms,
    netns::Netns,
    recommend,
    sensors::{
        KeyMode, SensorOptions,
        event::{self, DecodedEvent},
    },
    top::{
        model::{self, Frame, FrameOptions, KeyFilter, Sample, SortBy, counter_delta},
        sampler::Sampler,
    },
    util::format_duration,
};

/// Exit status when at least one trigger fired.
pub const EXIT_TRIGGERED: u8 = 3;

/// Headroom passed to `ctguard recommend`'s plan (its own default).
const RECOMMEND_HEADROOM: f64 = 2.0;

fn long_help() -> String {
    format!(
        "Arms triggers during a load test. While armed, ctguard keeps the last --pre of drop events in memory \
(at most --pre-max-events) and takes a stat snapshot every --interval. When a trigger holds it writes a \
bundle to DIR/capture-<UTC time>-<n>/ (directory 0700, files 0600):\n\n  \
summary.md / summary.json   what fired, when, peaks, drops by cause, top offenders, suggested fix\n  \
drops.pcapng                the dropped packets' headers, or first --snap-bytes bytes (raw IP, wall-clock\n                              \
time, original length, a comment with cause, confidence, netns and drop location)\n  \
events.jsonl                every event of the window (--pre before the trigger, --post after)\n  \
stats.jsonl                 one stat snapshot per --interval (a `top --json` frame plus exact counts)\n  \
top.json                    top keys by churn and by drops at trigger time\n  \
recommendation.json         `ctguard recommend`'s plan at trigger time\n\n\
Events the ring buffer could not hold are counted and reported in the summary, never hidden.\n\n\
Wrap a load test: `ctguard capture --trigger 'table_full>0' -- ./load-test.sh ARGS` starts the command once \
the sensors are attached and stops when it exits (finishing a post window in progress, up to --post). \
--duration / --until bound the whole run (the command then gets SIGTERM, SIGKILL {}s later).\n\n\
Exit status: 3 when a trigger fired (the bundle holds the evidence); otherwise the wrapped command's \
status (its exit code, or 128+signal), or 0 without a command; 2 on errors (bad trigger, no privileges).\n\n\
{}",
        wrap::TERM_GRACE.as_secs(),
        trigger::GRAMMAR
    )
}

const SHORT_HELP: &str = "Trigger syntax: NAME[NETNS][/s] OP NUMBER[%], e.g. 'table_full>0', 'fill>90%', 'drops/s>100', \
'inserts/s>50k'; --help shows the grammar. Exit status: 3 when a trigger fired, else the wrapped command's status \
(or 0), 2 on errors.";

#[derive(Debug, clap::Args)]
#[command(after_help = SHORT_HELP, after_long_help = long_help())]
pub struct CaptureArgs {
    /// Fire a capture when EXPR holds, e.g. 'table_full>0', 'fill>90%', 'drops/s>100' (repeatable: fires when any
    /// holds; grammar below).
    #[arg(long = "trigger", value_name = "EXPR", required = true)]
    pub triggers: Vec<String>,
    /// Keep this much history before the trigger (events in memory, stat snapshots).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::util::parse_duration)]
    pub pre: Duration,
    /// At most this many pre-trigger events in memory; older ones are discarded (and counted in the summary).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub pre_max_events: usize,
    /// Keep recording this long after the trigger.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = crate::util::parse_duration)]
    pub post: Duration,
    /// Stop after this many captures (the wrapped command keeps running).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_captures: u32,
    /// After a capture's window ends, ignore triggers this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::util::parse_duration)]
    pub cooldown: Duration,
    /// Stop the whole run after this long.
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop the whole run at this local clock time (today, or tomorrow when it has passed).
    #[arg(long, value_name = "HH:MM[:SS]", value_parser = parse_clock_time)]
    pub until: Option<ClockTime>,
    /// Write bundles under this directory (created 0700 when a trigger first fires).
    #[arg(long, value_name = "DIR", default_value = "ctguard-captures")]
    pub dir: PathBuf,
    /// Keep the first N bytes of each dropped packet from its IP header, payload included (max 256).
    /// Unset: headers only (IP and TCP/UDP/ICMP/SCTP, never payload), because bundles travel.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub snap_bytes: Option<u32>,
    /// Time between stat snapshots and trigger evaluations.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::util::parse_duration)]
    pub interval: Duration,
    /// Keys in top.json and in the summary's top offenders.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// How new entries are grouped (in the kernel) for the top keys.
    #[arg(long, value_enum, default_value = "dst-port")]
    pub by: KeyMode,
    /// Ring buffer size in KiB (power of two, at least 4); each drop event with its bytes takes ~350 bytes.
    #[arg(long, value_name = "KIB", default_value_t = 4096)]
    pub ring_kib: u32,
    /// Which kernel hooks to use (see `ctguard doctor`).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: crate::sensors::backend::BackendRequest,
    /// The load-test command to wrap, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// A local time of day (`--until`), in seconds since midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockTime(pub u32);

pub fn parse_clock_time(s: &str) -> Result<ClockTime, String> {
    let bad = || format!("`{s}` is not a clock time HH:MM or HH:MM:SS (e.g. 14:30)");
    let parts: Vec<&str> = s.trim().split(':').collect();
    if !(2..=3).contains(&parts.len())
        || parts.iter().any(|p| p.is_empty() || p.len() > 2 || !p.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(bad());
    }
    let n: Vec<u32> = parts.iter().map(|p| p.parse().unwrap_or(99)).collect();
    let (h, m, sec) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
    if h > 23 || m > 59 || sec > 59 {
        return Err(format!("`{s}` is out of range (hours 0-23, minutes and seconds 0-59)"));
    }
    Ok(ClockTime(h * 3600 + m * 60 + sec))
}

/// Time from `now` (seconds since local midnight) to the next `target`.
pub fn until_next(now_s: u32, target: ClockTime) -> Duration {
    let day = 86_400;
    let d = (target.0 + day - now_s % day) % day;
    Duration::from_secs(u64::from(if d == 0 { day } else { d }))
}

fn local_seconds_of_day() -> u32 {
    // SAFETY: time and localtime_r write only into what we pass.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return (t % 86_400) as u32;
        }
        (tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec) as u32
    }
}

/// Checks everything that needs no system access: the triggers first (a
/// typo must never touch the system), then the numbers.
pub fn check_args(args: &CaptureArgs) -> Result<Vec<Trigger>, CtguardError> {
    let mut triggers = Vec::new();
    for expr in &args.triggers {
        let t = trigger::parse(expr).map_err(|e| {
            CtguardError::usage(
                format!("{e}\n{}", e.caret()),
                "a trigger is NAME[NETNS][/s] OP NUMBER[%], e.g. 'table_full>0', 'fill>90%', 'drops/s>100'; \
                 `ctguard capture --help` shows the grammar",
            )
        })?;
        triggers.push(t);
    }
    if args.interval.is_zero() {
        return Err(CtguardError::usage("--interval must be greater than 0", "e.g. --interval 1s"));
    }
    if args.max_captures == 0 {
        return Err(CtguardError::usage("--max-captures must be at least 1", "e.g. --max-captures 3"));
    }
    if !args.ring_kib.is_power_of_two() || args.ring_kib < 4 {
        return Err(CtguardError::usage(
            format!("--ring-kib {} is not a power of two of at least 4", args.ring_kib),
            "use e.g. 1024, 4096 or 16384",
        ));
    }
    if args.dir.exists() && !args.dir.is_dir() {
        return Err(CtguardError::usage(
            format!("--dir {} exists and is not a directory", args.dir.display()),
            "name a directory (it is created when a trigger first fires)",
        ));
    }
    Ok(triggers)
}

/// Resolves each trigger's namespace selector to an inode.
fn resolve(triggers: Vec<Trigger>) -> anyhow::Result<Vec<Armed>> {
    triggers
        .into_iter()
        .map(|t| {
            let netns = match t.netns.as_deref() {
                None => None,
                Some(s) if s.chars().all(|c| c.is_ascii_digit()) => Some(s.parse::<u32>().map_err(|_| {
                    CtguardError::usage(
                        format!("trigger `{}`: {s} is not a valid inode number", t.source),
                        "see `ls -L -i /proc/PID/ns/net`",
                    )
                })?),
                Some(s) => Some(
                    Netns::resolve(Some(s))
                        .with_context(|| format!("trigger `{}`", t.source))?
                        .first()
                        .map(|ns| ns.inode)
                        .unwrap_or(0),
                ),
            };
            Ok(Armed { trigger: t, netns })
        })
        .collect()
}

pub fn run(args: &CaptureArgs) -> anyhow::Result<ExitCode> {
    let triggers = check_args(args)?;
    let bound = match (args.duration, args.until) {
        (d, None) => d,
        (d, Some(t)) => {
            let u = until_next(local_seconds_of_day(), t);
            Some(d.map_or(u, |d| d.min(u)))
        }
    };
    let triggers = resolve(triggers)?;
    let opts = SensorOptions {
        key_mode: args.by,
        ring_bytes: args.ring_kib * 1024,
        backend: args.backend,
        capture_bytes: snap::Snap::from_arg(args.snap_bytes).capture_bytes(),
        ..Default::default()
    };
    // The sensors first: without privileges their error is the one to see.
    let mut sampler = Sampler::start(&opts, None)?;
    let syms = Kallsyms::read()?;
    let ring = sampler.sensors_mut().take_events()?;
    let backend = sampler.backend();
    let host = recommend::gather::host().map_err(|e| e.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut session = Session::new(args, triggers, sampler, syms, host)?;
        let list: Vec<&str> = session.triggers.iter().map(|t| t.trigger.source.as_str()).collect();
        // On stderr: scripts wait for this line before loading.
        eprintln!(
            "ctguard: capture armed: {} (any of them) with the {backend:?} backend; pre {}, post {}, bundles under {}{}",
            list.join(", "),
            format_duration(args.pre),
            format_duration(args.post),
            args.dir.display(),
            if args.command.is_empty() { " (Ctrl-C to stop)".to_string() } else { format!("; starting `{}`", args.command.join(" ")) }
        );
        session.run(ring, bound).await
    })
}

/// CLOCK_MONOTONIC (what the kernel programs stamp events with) in ns.
fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts CLOCK_MONOTONIC to the wall clock (CLOCK_REALTIME).
#[derive(Clone, Copy, Debug)]
struct Clock {
    offset_ns: i128,
}

impl Clock {
    fn measure() -> Clock {
        // The pair read closest together gives the best offset.
        let mut best = (u64::MAX, 0i128);
        for _ in 0..5 {
            let a = mono_ns();
            let r = clock_ns(libc::CLOCK_REALTIME);
            let b = mono_ns();
            if b - a < best.0 {
                best = (b - a, r as i128 - (a as i128 + (b - a) as i128 / 2));
            }
        }
        Clock { offset_ns: best.1 }
    }

    fn wall(&self, mono: u64) -> u64 {
        (mono as i128 + self.offset_ns).max(0) as u64
    }
}

/// Decorates events for the bundle: wall time, symbol, namespace label.
struct Decor {
    clock: Clock,
    syms: Kallsyms,
    symbols: HashMap<u64, Option<String>>,
    labels: BTreeMap<u32, String>,
}

impl Decor {
    fn write(&mut self, bundle: &mut Bundle, ev: &DecodedEvent) -> anyhow::Result<()> {
        let syms = &self.syms;
        let symbol = self
            .symbols
            .entry(ev.location)
            .or_insert_with(|| (ev.location != 0).then(|| syms.symbolize(ev.location)).flatten());
        let ctx = EventContext {
            time_unix_ns: self.clock.wall(ev.ts_ns),
            location_symbol: symbol.as_deref(),
            netns_label: self.labels.get(&ev.netns).map(String::as_str),
        };
        bundle.write_event(ev, &ctx)
    }
}

/// A capture being recorded.
struct Active {
    bundle: Bundle,
    trigger: TriggerInfo,
    also_true: Vec<AlsoTrue>,
    discarded: u64,
    /// The sample the triggers were armed at (for the top offenders).
    base: Sample,
    plan: Option<PlanFix>,
    recommendation_note: String,
    timeouts: BTreeMap<String, u64>,
}

/// Why the run ended before its windows did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Bound,
    Signal(i32),
}

struct Session<'a> {
    args: &'a CaptureArgs,
    triggers: Vec<Armed>,
    sampler: Sampler,
    decor: Decor,
    schedule: Schedule,
    events: PreRing<DecodedEvent>,
    lines: PreRing<StatLine>,
    /// Churn per interval for `recommend`'s observation (dst-port keys only).
    intervals: PreRing<recommend::demand::Interval>,
    prev: Sample,
    since: SinceArmed,
    armed_base: Sample,
    active: Option<Active>,
    written: Vec<PathBuf>,
    host: Result<recommend::plan::Host, String>,
    command_status: Option<String>,
    lost_at_start: u64,
}

impl<'a> Session<'a> {
    fn new(
        args: &'a CaptureArgs,
        triggers: Vec<Armed>,
        mut sampler: Sampler,
        syms: Kallsyms,
        host: Result<recommend::plan::Host, String>,
    ) -> anyhow::Result<Self> {
        let first = sampler.sample()?;
        let pre_ns = args.pre.as_nanos() as u64;
        let labels = first.tables.iter().map(|t| (t.netns, t.label.clone())).collect();
        Ok(Session {
            args,
            triggers,
            sampler,
            decor: Decor { clock: Clock::measure(), syms, symbols: HashMap::new(), labels },
            schedule: Schedule::new(ScheduleConfig {
                pre_ns,
                post_ns: args.post.as_nanos() as u64,
                cooldown_ns: args.cooldown.as_nanos() as u64,
                max_captures: args.max_captures,
            }),
            events: PreRing::new(pre_ns, args.pre_max_events),
            lines: PreRing::new(pre_ns, usize::MAX),
            intervals: PreRing::new(pre_ns, usize::MAX),
            lost_at_start: first.snapshot.counters.events_lost,
            armed_base: first.clone(),
            prev: first,
            since: SinceArmed::default(),
            active: None,
            written: Vec::new(),
            host,
            command_status: None,
        })
    }

    async fn run(&mut self, ring: RingBuf<MapData>, bound: Option<Duration>) -> anyhow::Result<ExitCode> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
        // as long as the AsyncFd holds it.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;
        // Events from before the first sample belong to no window yet; they
        // go to the pre-trigger ring like any other.
        self.drain(ring.get_mut())?;
        let mut child = if self.args.command.is_empty() { None } else { Some(Wrapped::spawn(&self.args.command)?) };
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let deadline = tokio::time::sleep(bound.unwrap_or(Duration::from_secs(100 * 365 * 86_400)));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(self.args.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut stop = None;
        let mut said_done = false;
        loop {
            if stop.is_some() {
                break;
            }
            let child_running = child.as_ref().is_some_and(Wrapped::running);
            if child.is_some() && !child_running && self.schedule.recording().is_none() {
                break;
            }
            if child.is_none() && self.schedule.is_done() && self.active.is_none() {
                break;
            }
            if child_running && self.schedule.is_done() && self.active.is_none() && !said_done {
                eprintln!("ctguard: {} capture(s) taken; waiting for the command to exit", self.schedule.taken());
                said_done = true;
            }
            tokio::select! {
                _ = tick.tick() => {
                    self.drain(ring.get_mut())?;
                    self.on_tick(mono_ns(), true)?;
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
                status = async {
                    match child.as_mut() {
                        Some(c) if c.running() => c.wait().await,
                        _ => std::future::pending().await,
                    }
                } => {
                    let status = status.context("waiting for the wrapped command")?;
                    let described = wrap::describe_status(&status);
                    eprintln!("ctguard: the command {described}");
                    self.command_status = Some(described);
                    // What happened while it ran may still fire a trigger.
                    self.drain(ring.get_mut())?;
                    self.on_tick(mono_ns(), true)?;
                    self.schedule.wind_down();
                    if let Some(w) = self.schedule.recording() {
                        eprintln!(
                            "ctguard: finishing the post-trigger window of capture {} ({} more)",
                            w.index,
                            format_duration(Duration::from_nanos(w.end_ns.saturating_sub(mono_ns())))
                        );
                    }
                }
                _ = &mut deadline => stop = Some(Stop::Bound),
                _ = sigint.recv() => stop = Some(Stop::Signal(libc::SIGINT)),
                _ = sigterm.recv() => stop = Some(Stop::Signal(libc::SIGTERM)),
            }
        }
        let stop_at = mono_ns();
        if let Some(c) = child.as_mut().filter(|c| c.running()) {
            match stop {
                Some(Stop::Signal(libc::SIGINT)) => {
                    // From a terminal the command got the SIGINT too.
                    // SAFETY: isatty has no preconditions.
                    if unsafe { libc::isatty(0) } == 0 {
                        c.signal(libc::SIGINT);
                    }
                    if tokio::time::timeout(wrap::TERM_GRACE, c.wait()).await.is_err() {
                        c.terminate(wrap::TERM_GRACE).await?;
                    }
                }
                _ => {
                    eprintln!("ctguard: stopping the command (SIGTERM)");
                    c.terminate(wrap::TERM_GRACE).await?;
                }
            }
            self.command_status = Some(c.describe());
        }
        // A last look, so the final window and summary include everything
        // up to now; nothing fires any more.
        self.drain(ring.get_mut())?;
        self.on_tick(mono_ns(), false)?;
        let in_progress = self.schedule.recording();
        if let Some(w) = self.schedule.stop(stop_at.max(in_progress.map_or(0, |w| w.start_ns))) {
            let reason = match stop {
                Some(Stop::Bound) => "the run reached its --duration / --until".to_string(),
                Some(Stop::Signal(s)) => {
                    format!("ctguard received {}", if s == libc::SIGINT { "SIGINT" } else { "SIGTERM" })
                }
                None => "the run ended".to_string(),
            };
            let cut = in_progress.is_some_and(|orig| orig.end_ns > w.end_ns);
            self.close(w, &reason, cut)?;
        }
        let lost = self.prev.snapshot.counters.events_lost.saturating_sub(self.lost_at_start);
        if lost > 0 {
            eprintln!(
                "ctguard: {lost} events were lost by the ring buffer during the run (see the summaries; a larger --ring-kib helps)"
            );
        }
        let fired = self.schedule.taken();
        if fired > 0 {
            eprintln!("ctguard: {fired} trigger(s) fired; exit status {EXIT_TRIGGERED}");
            for d in &self.written {
                eprintln!("ctguard: read {}", d.join("summary.md").display());
            }
            return Ok(ExitCode::from(EXIT_TRIGGERED));
        }
        let code = child.as_ref().and_then(Wrapped::status).map_or(0, |s| wrap::exit_code(&s));
        eprintln!(
            "ctguard: no trigger fired; exit status {code}{}",
            if child.is_some() { " (the command's)" } else { "" }
        );
        Ok(ExitCode::from(code))
    }

    fn drain(&mut self, rb: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        while let Some(item) = rb.next() {
            let ev = event::decode(&item)?;
            drop(item);
            match self.schedule.route(ev.ts_ns) {
                Route::Capture => {
                    let a = self.active.as_mut().expect("a window is recording");
                    self.decor.write(&mut a.bundle, &ev)?;
                }
                Route::Ring => self.events.push(ev.ts_ns, ev),
            }
        }
        Ok(())
    }

    fn frame(&self, prev: &Sample, cur: &Sample, sort: SortBy) -> Frame {
        let filter = KeyFilter::default();
        model::frame(prev, cur, &FrameOptions { mode: self.args.by, sort, top: self.args.top, filter: &filter })
    }

    /// One stat snapshot: record it, advance the schedule, evaluate.
    fn on_tick(&mut self, now: u64, allow_fire: bool) -> anyhow::Result<()> {
        let cur = self.sampler.sample()?;
        for t in &cur.tables {
            self.decor.labels.insert(t.netns, t.label.clone());
        }
        let iv = trigger::interval_counts(&self.prev, &cur);
        self.since.add(&iv);
        let wall = self.decor.clock.wall(now);
        let line = StatLine {
            schema: bundle::STATS_SCHEMA,
            time: bundle::iso_utc(wall),
            time_unix_ms: wall / 1_000_000,
            key_mode: self.args.by,
            frame: self.frame(&self.prev, &cur, SortBy::Inserts),
            counts: IntervalTotals {
                drops: iv.all.drops.clone(),
                new_entries: iv.all.inserts,
                early_drop: iv.all.early_drop,
                events_lost: counter_delta(self.prev.snapshot.counters.events_lost, cur.snapshot.counters.events_lost),
            },
        };
        if self.args.by == KeyMode::DstPort {
            self.intervals.push(now, recommend::demand::interval_between(&self.prev.snapshot, &cur.snapshot));
        }
        let prev = std::mem::replace(&mut self.prev, cur);
        match self.schedule.route(now) {
            Route::Capture => self.active.as_mut().expect("a window is recording").bundle.write_stat_line(&line)?,
            Route::Ring => self.lines.push(now, line),
        }
        self.events.expire(now);
        self.poll(now)?;
        if allow_fire && self.schedule.is_armed() {
            let obs = Observation::new(iv, self.since.clone(), &self.prev);
            if let Some((t, v)) = trigger::first_firing(&self.triggers, &obs) {
                let (t, v) = (t.clone(), v);
                self.fire(now, &t, v, &obs, &prev)?;
            }
        }
        Ok(())
    }

    fn poll(&mut self, now: u64) -> anyhow::Result<()> {
        while let Some(tr) = self.schedule.poll(now) {
            match tr {
                Transition::Closed(w) => self.close(w, "the post-trigger window ended", false)?,
                Transition::Rearmed => {
                    self.since.reset();
                    self.armed_base = self.prev.clone();
                    eprintln!("ctguard: triggers re-armed after the cooldown");
                }
            }
        }
        Ok(())
    }

    fn fire(&mut self, now: u64, t: &Armed, v: trigger::Value, obs: &Observation, prev: &Sample) -> anyhow::Result<()> {
        let w = self.schedule.fire(now).expect("fire only when armed");
        let wall = self.decor.clock.wall(now);
        let mut bundle = Bundle::create(&self.args.dir, wall, w.index, snap::Snap::from_arg(self.args.snap_bytes))?;
        let (pre_events, discarded) = self.events.take_since(w.start_ns);
        for (_, ev) in &pre_events {
            self.decor.write(&mut bundle, ev)?;
        }
        let (pre_lines, _) = self.lines.take_since(w.start_ns);
        let mut table_peaks: BTreeMap<u32, u64> = BTreeMap::new();
        for (_, line) in &pre_lines {
            for t in &line.frame.tables {
                let p = table_peaks.entry(t.netns).or_insert(0);
                *p = (*p).max(t.entries);
            }
            bundle.write_stat_line(line)?;
        }
        let (intervals, _) = self.intervals.take_since(w.start_ns);
        let intervals: Vec<_> = intervals.into_iter().map(|(_, i)| i).collect();

        let cur = &self.prev;
        let top = TopDoc {
            schema: bundle::TOP_SCHEMA,
            time: bundle::iso_utc(wall),
            key_mode: self.args.by,
            last_interval: TopList::new(self.frame(prev, cur, SortBy::Inserts), self.frame(prev, cur, SortBy::Drops)),
            since_armed: TopList::new(
                self.frame(&self.armed_base, cur, SortBy::Inserts),
                self.frame(&self.armed_base, cur, SortBy::Drops),
            ),
        };
        bundle.write_json("top.json", &top)?;
        let rec = self.recommendation(&intervals, table_peaks, &w, v.netns.or(t.netns));
        bundle.write_text("recommendation.json", &rec.json)?;

        let label_of = |ns: Option<u32>| ns.and_then(|ns| self.decor.labels.get(&ns).cloned());
        let label = label_of(v.netns);
        let info = TriggerInfo {
            expression: t.trigger.source.clone(),
            measures: t.describe(),
            value: (v.value * 1000.0).round() / 1000.0,
            netns: v.netns,
            netns_label: label.clone(),
            busiest_netns: v.busiest,
            busiest_label: label_of(v.busiest),
            time: bundle::iso_utc(wall),
            time_unix_ns: wall,
        };
        let also_true = self
            .triggers
            .iter()
            .filter(|o| o.trigger.source != t.trigger.source)
            .filter_map(|o| {
                o.fires(obs).map(|v| AlsoTrue {
                    expression: o.trigger.source.clone(),
                    value: (v.value * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        eprintln!(
            "ctguard: trigger `{}` fired at {} UTC: {} {}{}; capture {} -> {} (recording {} more)",
            t.trigger.source,
            bundle::clock_utc(wall),
            info.value,
            info.measures,
            label.or_else(|| label_of(v.busiest)).map_or(String::new(), |l| format!(" in {l}")),
            w.index,
            bundle.dir.display(),
            format_duration(self.args.post)
        );
        self.active = Some(Active {
            bundle,
            trigger: info,
            also_true,
            discarded,
            base: self.armed_base.clone(),
            plan: rec.plan,
            recommendation_note: rec.note,
            timeouts: rec.timeouts,
        });
        Ok(())
    }

    /// `ctguard recommend`'s plan for this moment: its host facts and
    /// current settings, the churn of the pre-trigger window as the
    /// observation. Falls back to the current sizing figures when the plan
    /// cannot be made.
    fn recommendation(
        &self,
        intervals: &[recommend::demand::Interval],
        table_peaks: BTreeMap<u32, u64>,
        w: &Window,
        netns: Option<u32>,
    ) -> Recommendation {
        use recommend::{apply, demand, gather, plan, report, state};
        let made = (|| -> Result<Recommendation, String> {
            let host = self.host.as_ref().map_err(Clone::clone)?;
            let (current, namespaces, skipped) = gather::current().map_err(|e| e.to_string())?;
            let observation = (!intervals.is_empty()).then(|| {
                demand::summarize(
                    format!(
                        "ctguard capture {}: churn of the {} before the trigger",
                        w.index,
                        format_duration(self.args.pre)
                    ),
                    intervals,
                    table_peaks.clone(),
                )
            });
            let overrides = plan::Overrides::default();
            let p = plan::plan(&plan::Input {
                host,
                current: &current,
                observation: observation.as_ref(),
                headroom: RECOMMEND_HEADROOM,
                overrides: &overrides,
            });
            let json = report::json(&report::Context {
                host,
                current: &current,
                namespaces: &namespaces,
                namespaces_skipped: skipped,
                observation: observation.as_ref(),
                plan: &p,
                netns: &apply::initial_netns(),
                applied: None,
                state_file: Path::new(state::DEFAULT_STATE_FILE),
            });
            let change = |knob: &plan::Knob| p.change(knob).map(|c| (c.current, c.proposed, c.reason.clone()));
            let fix = PlanFix {
                max: change(&plan::Knob::Max),
                buckets: change(&plan::Knob::Buckets),
                timeouts: p
                    .effective_changes()
                    .filter_map(|c| match &c.knob {
                        plan::Knob::Timeout(k) => Some((k.clone(), c.current, c.proposed, c.reason.clone())),
                        _ => None,
                    })
                    .collect(),
                bypass: p.bypass.as_ref().map(|b| (b.command.clone(), b.reason.clone())),
            };
            Ok(Recommendation {
                json,
                plan: Some(fix),
                note: format!(
                    "The fix above follows `ctguard recommend`'s plan at trigger time (headroom {RECOMMEND_HEADROOM}x, \
                     churn of the {} before the trigger); recommendation.json holds it in full.",
                    format_duration(self.args.pre)
                ),
                timeouts: current.timeouts.clone(),
            })
        })();
        made.unwrap_or_else(|why| {
            let timeouts = netns
                .and_then(|ns| Netns::resolve(Some(&ns.to_string())).ok())
                .and_then(|v| v.into_iter().next())
                .and_then(|ns| {
                    conntrack::run_in(&ns, || sysctl::read_timeouts(Path::new(sysctl::NETFILTER_SYSCTL_DIR))).ok()
                })
                .and_then(Result::ok)
                .or_else(|| sysctl::read_timeouts(Path::new(sysctl::NETFILTER_SYSCTL_DIR)).ok())
                .unwrap_or_default();
            let cur = &self.prev;
            let doc = serde_json::json!({
                "schema": bundle::RECOMMENDATION_SCHEMA,
                "available": false,
                "why": format!("`ctguard recommend` could not make a plan: {why}"),
                "current": {
                    "nf_conntrack_max": cur.tables.iter().map(|t| t.max).max(),
                    "nf_conntrack_buckets": cur.tables.iter().map(|t| t.buckets).max(),
                    "tables": cur.tables.iter().map(|t| serde_json::json!({
                        "netns": t.netns, "label": t.label, "entries": t.entries, "max": t.max,
                        "fill_percent": conntrack::fill_percent(t.entries, t.max),
                    })).collect::<Vec<_>>(),
                    "timeouts": &timeouts,
                },
            });
            Recommendation {
                json: serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n",
                plan: None,
                note: format!(
                    "`ctguard recommend` could not make a plan ({why}): the fix above is capture's own rule of thumb; \
                     recommendation.json holds the current sizing figures."
                ),
                timeouts,
            }
        })
    }

    fn close(&mut self, w: Window, reason: &str, cut_short: bool) -> anyhow::Result<()> {
        let Some(a) = self.active.take() else { return Ok(()) };
        let cur = &self.prev;
        let f = self.frame(&a.base, cur, SortBy::Inserts);
        let offenders = f
            .keys
            .iter()
            .map(|k| Offender {
                netns: k.netns,
                netns_name: self.decor.labels.get(&k.netns).filter(|l| !l.starts_with("netns:[")).cloned(),
                key: k.key.clone(),
                new_entries: (k.inserts_per_s * f.interval_s).round() as u64,
                drops: (k.drops_per_s * f.interval_s).round() as u64,
                share_percent: (k.share_percent * 10.0).round() / 10.0,
            })
            .collect();
        let clock = self.decor.clock;
        let (start, end) = (clock.wall(w.start_ns), clock.wall(w.end_ns));
        let input = SummaryInput {
            capture: w.index,
            directory: a.bundle.dir.display().to_string(),
            trigger: a.trigger,
            also_true: a.also_true,
            window: WindowInfo {
                start: bundle::iso_utc(start),
                end: bundle::iso_utc(end),
                start_unix_ns: start,
                end_unix_ns: end,
                pre_s: (w.trigger_ns - w.start_ns) as f64 / 1e9,
                post_s: (w.end_ns.saturating_sub(w.trigger_ns)) as f64 / 1e9,
                closed_because: reason.to_string(),
                cut_short,
            },
            discarded_by_pre_max_events: a.discarded,
            top_offenders: offenders,
            key_mode: self.args.by,
            sizing: Sizing {
                nf_conntrack_max: cur.tables.iter().map(|t| t.max).max().unwrap_or(0),
                nf_conntrack_buckets: cur.tables.iter().map(|t| t.buckets).max().unwrap_or(0),
                timeouts: a.timeouts,
            },
            plan: a.plan,
            recommendation_note: a.recommendation_note,
            command: (!self.args.command.is_empty()).then(|| CommandInfo {
                argv: self.args.command.clone(),
                status: self.command_status.clone().unwrap_or_else(|| "still running".into()),
            }),
        };
        let summary = bundle::build_summary(input, &a.bundle.totals);
        let dir = a.bundle.finish(&summary)?;
        let e = &summary.events;
        eprintln!(
            "ctguard: capture {} written to {}: {} drop events, {} packets in drops.pcapng, {} lost by the ring buffer{}",
            w.index,
            dir.display(),
            e.drops,
            e.packets_in_pcapng,
            e.lost_by_ring_buffer,
            if cut_short { format!(" (window cut short: {reason})") } else { String::new() }
        );
        self.written.push(dir);
        Ok(())
    }
}

struct Recommendation {
    json: String,
    plan: Option<PlanFix>,
    note: String,
    timeouts: BTreeMap<String, u64>,
}

/// top.json.
#[derive(Serialize)]
struct TopDoc {
    schema: &'static str,
    time: String,
    key_mode: KeyMode,
    /// The last stat interval before the trigger.
    last_interval: TopList,
    /// From when the triggers were armed to the trigger.
    since_armed: TopList,
}

#[derive(Serialize)]
struct TopList {
    interval_s: f64,
    by_inserts: Vec<model::KeyRow>,
    by_drops: Vec<model::KeyRow>,
    keys_hidden: usize,
}

impl TopList {
    fn new(by_inserts: Frame, by_drops: Frame) -> Self {
        TopList {
            interval_s: by_inserts.interval_s,
            keys_hidden: by_inserts.keys_hidden,
            by_inserts: by_inserts.keys,
            by_drops: by_drops.keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: CaptureArgs,
    }

    fn args(extra: &[&str]) -> Result<CaptureArgs, clap::Error> {
        T::try_parse_from(std::iter::once("capture").chain(extra.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn defaults_and_the_wrapped_command() {
        let a = args(&["--trigger", "table_full>0", "--", "sh", "-c", "exit 7"]).unwrap();
        assert_eq!(a.command, ["sh", "-c", "exit 7"]);
        assert_eq!(
            (a.pre, a.post, a.cooldown, a.interval),
            (Duration::from_secs(10), Duration::from_secs(20), Duration::from_secs(30), Duration::from_secs(1))
        );
        assert_eq!((a.pre_max_events, a.max_captures, a.snap_bytes), (100_000, 1, None));
        assert_eq!(a.dir, PathBuf::from("ctguard-captures"));
        assert_eq!(check_args(&a).unwrap().len(), 1);
        let a = args(&["--trigger", "fill>90%", "--trigger", "drops/s>100"]).unwrap();
        assert_eq!(check_args(&a).unwrap().len(), 2);
        assert!(a.command.is_empty());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(args(&[]).is_err(), "--trigger is required");
        assert!(args(&["--trigger", "x>1", "--snap-bytes", "257"]).is_err());
        assert!(args(&["--trigger", "x>1", "--snap-bytes", "0"]).is_err());
        assert!(args(&["--trigger", "x>1", "--until", "25:00"]).is_err());
        let e = check_args(&args(&["--trigger", "table_full>0", "--trigger", "drops/s>>5"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "trigger `drops/s>>5`: at column 8: expected a number\n    drops/s>>5\n            ^\n  hint:"
            ),
            "{e}"
        );
        let e = check_args(&args(&["--trigger", "table_full>0", "--interval", "0"]).unwrap()).unwrap_err().to_string();
        assert!(e.contains("--interval"), "{e}");
        let e =
            check_args(&args(&["--trigger", "table_full>0", "--max-captures", "0"]).unwrap()).unwrap_err().to_string();
        assert!(e.contains("--max-captures"), "{e}");
        let e =
            check_args(&args(&["--trigger", "table_full>0", "--ring-kib", "100"]).unwrap()).unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        let e = check_args(&args(&["--trigger", "table_full>0", "--dir", "/etc/hostname"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn clock_times() {
        assert_eq!(parse_clock_time("14:30").unwrap(), ClockTime(14 * 3600 + 30 * 60));
        assert_eq!(parse_clock_time("07:05:09").unwrap(), ClockTime(7 * 3600 + 5 * 60 + 9));
        assert!(parse_clock_time("24:00").unwrap_err().contains("out of range"));
        assert!(parse_clock_time("1430").is_err());
        assert!(parse_clock_time("14:3x").is_err());
        assert!(parse_clock_time("14:30:00:00").is_err());
        assert_eq!(until_next(10 * 3600, ClockTime(11 * 3600)), Duration::from_secs(3600));
        assert_eq!(until_next(23 * 3600, ClockTime(3600)), Duration::from_secs(2 * 3600), "tomorrow");
        assert_eq!(until_next(3600, ClockTime(3600)), Duration::from_secs(86_400), "now means tomorrow");
    }

    #[test]
    fn the_wall_clock_follows_the_monotonic_one() {
        let c = Clock::measure();
        let wall = c.wall(mono_ns());
        let real = clock_ns(libc::CLOCK_REALTIME);
        assert!(wall.abs_diff(real) < 50_000_000, "{wall} vs {real}");
    }

    #[test]
    fn help_teaches_the_syntax() {
        let help = long_help();
        assert!(help.contains("trigger  = metric op number"));
        assert!(help.contains("Exit status: 3 when a trigger fired"));
    }
}
