//! `ctguard trace`: stream drop (and new-entry) events with their cause.
pub mod filter;
pub mod format;
mod summary;

use std::{
    collections::BTreeMap,
    io::Write,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

pub use self::{filter::Filter, summary::Summary};
use crate::{
    cli::TraceArgs,
    conntrack::{self, ConntrackView, StatTable},
    error::CtguardError,
    kernel::kallsyms::Kallsyms,
    netns::{self, Netns},
    sensors::{SensorOptions, Sensors, event, snapshot::Snapshot},
};

pub fn run(args: &TraceArgs) -> anyhow::Result<ExitCode> {
    let filter = build_filter(args)?;
    if !args.ring_kib.is_power_of_two() || args.ring_kib < 4 {
        return Err(CtguardError::usage(
            format!("--ring-kib {} is not a power of two of at least 4", args.ring_kib),
            "use e.g. 256, 1024 or 4096",
        )
        .into());
    }
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let opts = SensorOptions {
        key_mode: args.by,
        emit_new_events: args.new,
        ring_bytes: args.ring_kib * 1024,
        backend: args.backend,
        ..Default::default()
    };
    let syms = Kallsyms::read()?;
    let mut sensors = Sensors::start(&opts)?;
    // Baselines are taken once everything is attached, back to back, and the
    // events produced before them are discarded: the summary, the events and
    // the kernel's counters then cover the same interval (up to the few
    // microseconds between the two baseline reads).
    let kernel_before = kernel_counters();
    let start = sensors.snapshot()?;
    let mono_start = monotonic_ns();
    let mut ring = sensors.take_events()?;
    while ring.next().is_some() {}
    // On stderr in every mode: scripts wait for this line before loading.
    eprintln!(
        "ctguard: tracing netfilter drops{} with the {:?} backend (Ctrl-C to stop)",
        if args.new { " and new entries" } else { "" },
        sensors.backend
    );
    let stream = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(stream_events(&sensors, ring, &filter, args, &syms, mono_start, &mut out))?;
    let end = sensors.snapshot()?;
    let mut summary = summarize(&start, &end, &stream, &filter, args, &kernel_before);
    summary.kernel_program_misses = sensors.program_stats().iter().map(|p| p.recursion_misses).sum();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
        out.flush()?;
    } else {
        out.flush()?;
        eprint!("{}", summary::text(&summary));
    }
    Ok(ExitCode::SUCCESS)
}

fn build_filter(args: &TraceArgs) -> anyhow::Result<Filter> {
    Ok(Filter { causes: args.cause.clone(), flow: args.filter.resolve()?, new_entries: args.new })
}

/// What the streaming loop saw.
pub struct StreamStats {
    pub shown: u64,
    pub read: u64,
    pub elapsed: Duration,
}

async fn stream_events(
    sensors: &Sensors,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    filter: &Filter,
    args: &TraceArgs,
    syms: &Kallsyms,
    mono_start: u64,
    out: &mut Box<dyn Write>,
) -> anyhow::Result<StreamStats> {
    let started = Instant::now();
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as
    // long as the AsyncFd holds it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;
    // Both streams exist for the whole loop: a `ctrl_c()` future made anew
    // each iteration misses a SIGINT that arrives while the loop body runs
    // (a flush, a burst of events), and trace would then never stop.
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let deadline = tokio::time::sleep(args.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let (mut shown, mut read) = (0u64, 0u64);
    let limit = args.count.unwrap_or(u64::MAX);
    // New entries are keyed (and their events sent) lazily; a periodic flush
    // keeps `--new` output live on idle CPUs.
    let mut flush_tick = tokio::time::interval(Duration::from_millis(250));
    'outer: while shown < limit {
        tokio::select! {
            _ = flush_tick.tick() => sensors.flush()?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    read += 1;
                    let ev = event::decode(&item)?;
                    drop(item);
                    if !filter.matches(&ev) {
                        continue;
                    }
                    shown += 1;
                    write_event(out, &ev, mono_start, syms, args.json)?;
                    if shown >= limit {
                        break 'outer;
                    }
                }
                out.flush()?;
                guard.clear_ready();
            }
        }
    }
    if shown < limit {
        // Key what is still pending and print what that produced.
        sensors.flush()?;
        let rb = ring.get_mut();
        while let Some(item) = rb.next() {
            read += 1;
            let ev = event::decode(&item)?;
            drop(item);
            if filter.matches(&ev) && shown < limit {
                shown += 1;
                write_event(out, &ev, mono_start, syms, args.json)?;
            }
        }
    }
    out.flush()?;
    Ok(StreamStats { shown, read, elapsed: started.elapsed() })
}

fn write_event(
    out: &mut Box<dyn Write>,
    ev: &event::DecodedEvent,
    mono_start: u64,
    syms: &Kallsyms,
    json: bool,
) -> anyhow::Result<()> {
    let location = (ev.location != 0).then(|| syms.symbolize(ev.location)).flatten();
    if json {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            #[serde(flatten)]
            ev: &'a event::DecodedEvent,
            location_symbol: Option<&'a str>,
        }
        writeln!(out, "{}", serde_json::to_string(&Line { ev, location_symbol: location.as_deref() })?)?;
    } else {
        let rel = ev.ts_ns.saturating_sub(mono_start) as f64 / 1e9;
        writeln!(out, "{}", format::event_line(ev, rel, location.as_deref()))?;
    }
    Ok(())
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Summed conntrack counters of every namespace where conntrack is loaded,
/// keyed by namespace inode.
fn kernel_counters() -> BTreeMap<u32, (Netns, StatTable)> {
    let mut out = BTreeMap::new();
    for ns in netns::list_all().unwrap_or_default() {
        if let Ok(ConntrackView::Active(table)) = conntrack::read_netns(&ns) {
            out.insert(ns.inode, (ns, table.stats));
        }
    }
    out
}

fn summarize(
    start: &Snapshot,
    end: &Snapshot,
    stream: &StreamStats,
    filter: &Filter,
    args: &TraceArgs,
    kernel_before: &BTreeMap<u32, (Netns, StatTable)>,
) -> Summary {
    let counters = end.counters.since(&start.counters);
    let drops = summary::drops_between(start, end, filter.flow.netns);
    let kernel_after = kernel_counters();
    let mut reconciliation = Vec::new();
    for (inode, (ns, after)) in &kernel_after {
        if filter.flow.netns.is_some_and(|f| f != *inode) {
            continue;
        }
        let Some((_, before)) = kernel_before.get(inode) else { continue };
        // Per-CPU deltas: the kernel's counters are 32-bit and wrap.
        let delta: BTreeMap<String, u64> = after.rise_since(before).iter().map(|(k, v)| (k.to_string(), v)).collect();
        let ours = summary::drops_between(start, end, Some(*inode));
        let interesting =
            ["drop", "insert_failed", "invalid", "early_drop"].iter().any(|k| delta.get(*k).is_some_and(|v| *v > 0));
        if interesting || !ours.is_empty() {
            reconciliation.push(summary::reconcile(*inode, ns.label(), &delta, &ours));
        }
    }
    Summary {
        summary: true,
        duration_s: stream.elapsed.as_secs_f64(),
        events_shown: stream.shown,
        events_read: stream.read,
        events_lost: counters.events_lost,
        kernel_program_misses: 0,
        counters,
        drops,
        reconciliation,
        top_new_entries: summary::top_keys(start, end, filter.flow.netns, args.by, 10),
    }
}
