//! One capture's bundle: a directory `DIR/capture-<UTC time>-<n>/` (mode
//! 0700) of files (mode 0600):
//!
//! | file | what |
//! |---|---|
//! | `summary.md` | what a human reads first: what fired, when, peaks, top offenders, suggested fix |
//! | `summary.json` | the same, for scripts (schema `ctguard.capture.summary.v1`) |
//! | `drops.pcapng` | the dropped packets' headers (or first `--snap-bytes` bytes), one per drop event |
//! | `events.jsonl` | every event of the window, one JSON object per line |
//! | `stats.jsonl` | one stat snapshot per `--interval` (a `ctguard top --json` frame plus exact counts) |
//! | `top.json` | top keys by churn and by drops at trigger time |
//! | `recommendation.json` | sizing at trigger time |
//!
//! The writer streams events and snapshots as they come; the summary is
//! built at the end from running totals. Summary building, the Markdown
//! rendering, the suggestions and the time formatting are pure.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{DirBuilder, File, OpenOptions},
    io::{BufWriter, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    pcapng::{DropWriter, PacketRecord},
    snap::Snap,
};
use crate::{
    sensors::{
        KeyMode,
        event::{DecodedEvent, EventKind, proto_name},
        snapshot::{Cause, Confidence},
    },
    top::model::Frame,
    trace::format,
};

pub const SUMMARY_SCHEMA: &str = "ctguard.capture.summary.v1";
pub const STATS_SCHEMA: &str = "ctguard.capture.stats.v1";
pub const TOP_SCHEMA: &str = "ctguard.capture.top.v1";
pub const RECOMMENDATION_SCHEMA: &str = "ctguard.capture.recommendation.v1";

/// The files of a bundle and what each holds, in reading order.
pub const FILES: [(&str, &str); 7] = [
    ("summary.md", "read this first"),
    ("summary.json", "the summary for scripts"),
    ("drops.pcapng", "the dropped packets' first bytes (Wireshark, tshark -r)"),
    ("events.jsonl", "every event of the window, one JSON object per line"),
    ("stats.jsonl", "one stat snapshot per --interval"),
    ("top.json", "top keys by churn and by drops at trigger time"),
    ("recommendation.json", "sizing at trigger time"),
];

// ---------------------------------------------------------------- time

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn utc_parts(unix_ns: u64) -> (i64, u32, u32, u64, u64, u64, u64) {
    let secs = unix_ns / 1_000_000_000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    (y, mo, d, sod / 3600, sod / 60 % 60, sod % 60, unix_ns % 1_000_000_000)
}

/// `2025-06-01T12:00:03.214Z`
pub fn iso_utc(unix_ns: u64) -> String {
    let (y, mo, d, h, mi, s, ns) = utc_parts(unix_ns);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z", ns / 1_000_000)
}

/// `20250601T120003Z`, for directory names.
pub fn compact_utc(unix_ns: u64) -> String {
    let (y, mo, d, h, mi, s, _) = utc_parts(unix_ns);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// `12:00:03.214`
pub fn clock_utc(unix_ns: u64) -> String {
    let (_, _, _, h, mi, s, ns) = utc_parts(unix_ns);
    format!("{h:02}:{mi:02}:{s:02}.{:03}", ns / 1_000_000)
}

// ---------------------------------------------------------------- files

/// Creates `dir` and its missing parents with mode 0700 (existing ones are
/// left as they are).
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Creates a new file with mode 0600; fails if it exists.
pub fn create_private_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot write {}: {e}", path.display())
}

/// Creates `root/capture-<time>-<index>` (0700), with a `.2`, `.3`...
/// suffix when a run in the same second already used the name.
pub fn create_bundle_dir(root: &Path, trigger_unix_ns: u64, index: u32) -> anyhow::Result<PathBuf> {
    create_private_dir_all(root).map_err(|e| io_err(root, e))?;
    let base = format!("capture-{}-{index}", compact_utc(trigger_unix_ns));
    for attempt in 1..100 {
        let name = if attempt == 1 { base.clone() } else { format!("{base}.{attempt}") };
        let dir = root.join(name);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&dir, e)),
        }
    }
    anyhow::bail!("cannot find a free directory name for {base} in {}", root.display())
}

/// Writes `value` as pretty JSON to a new 0600 file.
pub fn write_json_file(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut f = BufWriter::new(create_private_file(path).map_err(|e| io_err(path, e))?);
    serde_json::to_writer_pretty(&mut f, value)?;
    f.write_all(b"\n")?;
    f.flush().map_err(|e| io_err(path, e))?;
    Ok(())
}

// ---------------------------------------------------------------- lines

/// Exact counts between two stat snapshots (all namespaces).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IntervalTotals {
    pub drops: BTreeMap<Cause, u64>,
    pub new_entries: u64,
    pub early_drop: u64,
    pub events_lost: u64,
}

/// One line of stats.jsonl.
#[derive(Clone, Debug, Serialize)]
pub struct StatLine {
    pub schema: &'static str,
    pub time: String,
    pub time_unix_ms: u64,
    pub key_mode: KeyMode,
    #[serde(flatten)]
    pub frame: Frame,
    /// Exact counts over this interval (the frame has rates).
    pub counts: IntervalTotals,
}

/// Where an event sits relative to the trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pre,
    Post,
}

/// What the writer needs besides the event itself.
pub struct EventContext<'a> {
    pub time_unix_ns: u64,
    pub location_symbol: Option<&'a str>,
    pub netns_label: Option<&'a str>,
}

#[derive(Serialize)]
struct EventLine<'a> {
    time: String,
    time_unix_ns: u64,
    /// Seconds from the trigger (negative before it).
    rel_trigger_s: f64,
    phase: Phase,
    #[serde(flatten)]
    ev: &'a DecodedEvent,
    location_symbol: Option<&'a str>,
    netns_label: Option<&'a str>,
    /// Length of the packet from its network header.
    wire_len: Option<u32>,
    /// Bytes of it in drops.pcapng.
    captured_len: Option<usize>,
    /// Its frame number in drops.pcapng (1-based, as Wireshark counts).
    pcap_frame: Option<u64>,
}

/// The comment stored with each packet in drops.pcapng.
pub fn packet_comment(ev: &DecodedEvent, netns_label: Option<&str>, location: Option<&str>) -> String {
    let cause = ev.cause.map_or("?", |c| c.as_str());
    let conf = match ev.cause_confidence {
        Some(Confidence::Certain) => "certain",
        Some(Confidence::Likely) => "likely",
        None => "?",
    };
    let ns = match netns_label {
        Some(l) if !l.starts_with("netns:[") => format!("{} ({l})", ev.netns),
        _ => ev.netns.to_string(),
    };
    let at = location.map_or_else(|| format!("{:#x}", ev.location), str::to_string);
    format!(
        "ctguard drop: cause={cause} confidence={conf} netns={ns} ifindex={} location={at} flow={}",
        ev.ifindex,
        format::flow(&ev.flow)
    )
}

// ---------------------------------------------------------------- totals

/// The fullest a table got in the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FillPeak {
    pub netns: u32,
    pub label: String,
    pub fill_percent: f64,
    pub entries: u64,
    pub max: u64,
}

/// Highest values seen in the window's stat snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Peaks {
    /// Per namespace, fullest first.
    pub fill: Vec<FillPeak>,
    pub drops_per_s: BTreeMap<Cause, f64>,
    pub drops_per_s_total: f64,
    pub inserts_per_s: f64,
    pub early_drop_per_s: f64,
}

/// Running totals of what went into the bundle.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub events: u64,
    pub drop_events: u64,
    pub new_entry_events: u64,
    pub drop_events_by_cause: BTreeMap<Cause, u64>,
    pub packets: u64,
    /// Drop events that came without packet bytes.
    pub packets_without_bytes: u64,
    pub stat_lines: u64,
    /// Exact kernel-map counts summed over the window's stat snapshots.
    pub kernel: IntervalTotals,
    /// Time span those snapshots cover (wall clock, ns): from the first
    /// snapshot's start (its time minus its interval) to the last one.
    pub kernel_span: Option<(u64, u64)>,
    fill: BTreeMap<u32, FillPeak>,
    pub peaks: Peaks,
}

impl Totals {
    pub fn add_event(&mut self, ev: &DecodedEvent, packet_written: bool) {
        self.events += 1;
        match ev.kind {
            EventKind::Drop => {
                self.drop_events += 1;
                if let Some(c) = ev.cause {
                    *self.drop_events_by_cause.entry(c).or_insert(0) += 1;
                }
                if packet_written {
                    self.packets += 1;
                    if ev.packet.as_ref().is_none_or(|p| p.data.is_empty()) {
                        self.packets_without_bytes += 1;
                    }
                }
            }
            EventKind::NewEntry => self.new_entry_events += 1,
        }
    }

    pub fn add_stat_line(&mut self, line: &StatLine) {
        self.stat_lines += 1;
        let k = &mut self.kernel;
        for (c, n) in &line.counts.drops {
            *k.drops.entry(*c).or_insert(0) += n;
        }
        k.new_entries += line.counts.new_entries;
        k.early_drop += line.counts.early_drop;
        k.events_lost += line.counts.events_lost;
        let end = line.time_unix_ms * 1_000_000;
        let start = end.saturating_sub((line.frame.interval_s * 1e9) as u64);
        self.kernel_span = Some(match self.kernel_span {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
        let r = &line.frame.rates;
        let p = &mut self.peaks;
        for (c, v) in &r.drops_per_s {
            let slot = p.drops_per_s.entry(*c).or_insert(0.0);
            *slot = slot.max(*v);
        }
        p.drops_per_s_total = p.drops_per_s_total.max(r.drops_per_s.values().sum());
        p.inserts_per_s = p.inserts_per_s.max(r.new_per_s);
        p.early_drop_per_s = p.early_drop_per_s.max(r.early_drop_per_s);
        for t in &line.frame.tables {
            let cur = FillPeak {
                netns: t.netns,
                label: t.label.clone(),
                fill_percent: t.fill_percent,
                entries: t.entries,
                max: t.max,
            };
            match self.fill.get(&t.netns) {
                Some(old) if old.fill_percent >= cur.fill_percent => {}
                _ => {
                    self.fill.insert(t.netns, cur);
                }
            }
        }
        let mut fill: Vec<FillPeak> = self.fill.values().cloned().collect();
        fill.sort_by(|a, b| b.fill_percent.total_cmp(&a.fill_percent).then(a.netns.cmp(&b.netns)));
        p.fill = fill;
    }
}

// ---------------------------------------------------------------- writer

/// A bundle being written.
pub struct Bundle {
    pub dir: PathBuf,
    events: BufWriter<File>,
    pcap: DropWriter<BufWriter<File>>,
    stats: BufWriter<File>,
    trigger_unix_ns: u64,
    snap: Snap,
    pub totals: Totals,
}

impl Bundle {
    /// Creates the directory and the streamed files.
    pub fn create(root: &Path, trigger_unix_ns: u64, index: u32, snap: Snap) -> anyhow::Result<Bundle> {
        let dir = create_bundle_dir(root, trigger_unix_ns, index)?;
        let open = |name: &str| -> anyhow::Result<BufWriter<File>> {
            let path = dir.join(name);
            Ok(BufWriter::with_capacity(1 << 16, create_private_file(&path).map_err(|e| io_err(&path, e))?))
        };
        let events = open("events.jsonl")?;
        let stats = open("stats.jsonl")?;
        let pcap = DropWriter::new(open("drops.pcapng")?, snap.capture_bytes())
            .map_err(|e| io_err(&dir.join("drops.pcapng"), e))?;
        Ok(Bundle { dir, events, pcap, stats, trigger_unix_ns, snap, totals: Totals::default() })
    }

    /// Appends an event to events.jsonl and, for a drop, its packet to drops.pcapng.
    pub fn write_event(&mut self, ev: &DecodedEvent, ctx: &EventContext<'_>) -> anyhow::Result<()> {
        let mut pcap_frame = None;
        if ev.kind == EventKind::Drop {
            let (wire_len, data): (u32, &[u8]) = match &ev.packet {
                Some(p) => (p.wire_len, self.snap.cut(&p.data)),
                None => (0, &[]),
            };
            let rec = PacketRecord {
                time_unix_ns: ctx.time_unix_ns,
                wire_len,
                data,
                comment: packet_comment(ev, ctx.netns_label, ctx.location_symbol),
            };
            pcap_frame = Some(self.pcap.write(&rec).map_err(|e| io_err(&self.dir.join("drops.pcapng"), e))?);
        }
        let rel = (ctx.time_unix_ns as f64 - self.trigger_unix_ns as f64) / 1e9;
        let line = EventLine {
            time: iso_utc(ctx.time_unix_ns),
            time_unix_ns: ctx.time_unix_ns,
            rel_trigger_s: (rel * 1e6).round() / 1e6,
            phase: if ctx.time_unix_ns < self.trigger_unix_ns { Phase::Pre } else { Phase::Post },
            ev,
            location_symbol: ctx.location_symbol,
            netns_label: ctx.netns_label,
            wire_len: ev.packet.as_ref().map(|p| p.wire_len),
            captured_len: ev.packet.as_ref().map(|p| self.snap.cut(&p.data).len()),
            pcap_frame,
        };
        serde_json::to_writer(&mut self.events, &line)?;
        self.events.write_all(b"\n").map_err(|e| io_err(&self.dir.join("events.jsonl"), e))?;
        self.totals.add_event(ev, pcap_frame.is_some());
        Ok(())
    }

    pub fn write_stat_line(&mut self, line: &StatLine) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.stats, line)?;
        self.stats.write_all(b"\n").map_err(|e| io_err(&self.dir.join("stats.jsonl"), e))?;
        self.totals.add_stat_line(line);
        Ok(())
    }

    pub fn write_json(&self, name: &str, value: &impl Serialize) -> anyhow::Result<()> {
        write_json_file(&self.dir.join(name), value)
    }

    /// Writes `text` to a new 0600 file of the bundle.
    pub fn write_text(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let path = self.dir.join(name);
        let mut f = create_private_file(&path).map_err(|e| io_err(&path, e))?;
        f.write_all(text.as_bytes()).map_err(|e| io_err(&path, e))
    }

    /// Flushes the streamed files, writes summary.json and summary.md.
    pub fn finish(mut self, summary: &Summary) -> anyhow::Result<PathBuf> {
        self.events.flush().map_err(|e| io_err(&self.dir.join("events.jsonl"), e))?;
        self.stats.flush().map_err(|e| io_err(&self.dir.join("stats.jsonl"), e))?;
        let mut pcap = self.pcap.into_inner();
        pcap.flush().map_err(|e| io_err(&self.dir.join("drops.pcapng"), e))?;
        write_json_file(&self.dir.join("summary.json"), summary)?;
        let md = self.dir.join("summary.md");
        let mut f = create_private_file(&md).map_err(|e| io_err(&md, e))?;
        f.write_all(render_markdown(summary).as_bytes()).map_err(|e| io_err(&md, e))?;
        Ok(self.dir)
    }
}

// ---------------------------------------------------------------- summary

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TriggerInfo {
    pub expression: String,
    /// What the value measures (`table_full drops since armed`).
    pub measures: String,
    pub value: f64,
    pub netns: Option<u32>,
    pub netns_label: Option<String>,
    /// Without a selector: the namespace that contributed most.
    pub busiest_netns: Option<u32>,
    pub busiest_label: Option<String>,
    pub time: String,
    pub time_unix_ns: u64,
}

/// Another trigger that also held at the firing evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AlsoTrue {
    pub expression: String,
    pub value: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowInfo {
    pub start: String,
    pub end: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub pre_s: f64,
    pub post_s: f64,
    /// Why the window closed.
    pub closed_because: String,
    /// The window closed before its --post ran out.
    pub cut_short: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventTotals {
    pub recorded: u64,
    pub drops: u64,
    pub new_entries: u64,
    pub packets_in_pcapng: u64,
    pub packets_without_bytes: u64,
    /// Events the ring buffer had no room for during the window's stat intervals.
    pub lost_by_ring_buffer: u64,
    /// Pre-trigger events pushed out of memory by --pre-max-events.
    pub discarded_by_pre_max_events: u64,
    /// Nothing lost and nothing discarded.
    pub complete: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CauseRow {
    pub cause: Cause,
    /// Drop events recorded in events.jsonl / drops.pcapng.
    pub events: u64,
    /// Exact count from the kernel maps over the stat snapshots' span.
    pub kernel: u64,
    pub peak_per_s: f64,
}

/// A key with much churn or many drops.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Offender {
    pub netns: u32,
    /// The namespace's `ip netns` name, when it has one.
    pub netns_name: Option<String>,
    pub key: String,
    pub new_entries: u64,
    pub drops: u64,
    /// Share of all new entries over the span, in percent.
    pub share_percent: f64,
}

/// The table's sizing when the capture closed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sizing {
    pub nf_conntrack_max: u64,
    pub nf_conntrack_buckets: u64,
    /// Timeouts of the namespace the trigger concerned (seconds).
    pub timeouts: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suggestion {
    pub title: String,
    pub command: Option<String>,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommandInfo {
    pub argv: Vec<String>,
    /// `exited with 0`, `killed by signal 9`, or `still running` when the
    /// bundle was closed.
    pub status: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub schema: &'static str,
    pub capture: u32,
    pub directory: String,
    pub trigger: TriggerInfo,
    pub also_true: Vec<AlsoTrue>,
    pub window: WindowInfo,
    pub events: EventTotals,
    pub drops_by_cause: Vec<CauseRow>,
    /// Span of the stat snapshots the kernel counts and peaks come from.
    pub stats_span: Option<(String, String)>,
    pub kernel_new_entries: u64,
    pub kernel_early_drop: u64,
    pub peaks: Peaks,
    /// Keys by new entries, from when the triggers were armed to the end of the window.
    pub top_offenders: Vec<Offender>,
    pub key_mode: KeyMode,
    pub sizing: Sizing,
    pub suggestions: Vec<Suggestion>,
    /// How the recommendation was made (see recommendation.json).
    pub recommendation_note: String,
    pub command: Option<CommandInfo>,
    pub files: Vec<(String, String)>,
}

/// Everything besides the running totals that the summary needs.
pub struct SummaryInput {
    pub capture: u32,
    pub directory: String,
    pub trigger: TriggerInfo,
    pub also_true: Vec<AlsoTrue>,
    pub window: WindowInfo,
    pub discarded_by_pre_max_events: u64,
    pub top_offenders: Vec<Offender>,
    pub key_mode: KeyMode,
    pub sizing: Sizing,
    /// `ctguard recommend`'s plan at trigger time, when it could be made.
    pub plan: Option<PlanFix>,
    pub recommendation_note: String,
    pub command: Option<CommandInfo>,
}

/// What `ctguard recommend`'s plan proposes, reduced to what the
/// suggestions need: (current, proposed, reason) per knob.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanFix {
    pub max: Option<(u64, u64, String)>,
    pub buckets: Option<(u64, u64, String)>,
    /// (timeout key, current, proposed, reason), only the ones that change.
    pub timeouts: Vec<(String, u64, u64, String)>,
    /// (command, reason).
    pub bypass: Option<(String, String)>,
}

pub fn build_summary(input: SummaryInput, totals: &Totals) -> Summary {
    let mut causes: Vec<Cause> = totals.drop_events_by_cause.keys().copied().collect();
    causes.extend(totals.kernel.drops.keys().copied());
    causes.sort();
    causes.dedup();
    let drops_by_cause = causes
        .into_iter()
        .map(|c| CauseRow {
            cause: c,
            events: totals.drop_events_by_cause.get(&c).copied().unwrap_or(0),
            kernel: totals.kernel.drops.get(&c).copied().unwrap_or(0),
            peak_per_s: totals.peaks.drops_per_s.get(&c).copied().unwrap_or(0.0),
        })
        .collect();
    let lost = totals.kernel.events_lost;
    let events = EventTotals {
        recorded: totals.events,
        drops: totals.drop_events,
        new_entries: totals.new_entry_events,
        packets_in_pcapng: totals.packets,
        packets_without_bytes: totals.packets_without_bytes,
        lost_by_ring_buffer: lost,
        discarded_by_pre_max_events: input.discarded_by_pre_max_events,
        complete: lost == 0 && input.discarded_by_pre_max_events == 0,
    };
    let suggestions = suggest(&SuggestInput {
        sizing: &input.sizing,
        kernel_drops: &totals.kernel.drops,
        early_drop: totals.kernel.early_drop,
        peaks: &totals.peaks,
        offenders: &input.top_offenders,
        key_mode: input.key_mode,
        plan: input.plan.as_ref(),
    });
    Summary {
        schema: SUMMARY_SCHEMA,
        capture: input.capture,
        directory: input.directory,
        trigger: input.trigger,
        also_true: input.also_true,
        window: input.window,
        events,
        drops_by_cause,
        stats_span: totals.kernel_span.map(|(a, b)| (iso_utc(a), iso_utc(b))),
        kernel_new_entries: totals.kernel.new_entries,
        kernel_early_drop: totals.kernel.early_drop,
        peaks: totals.peaks.clone(),
        top_offenders: input.top_offenders,
        key_mode: input.key_mode,
        sizing: input.sizing,
        suggestions,
        recommendation_note: input.recommendation_note,
        command: input.command,
        files: FILES.iter().map(|(n, w)| (n.to_string(), w.to_string())).collect(),
    }
}

// ---------------------------------------------------------------- suggestions

pub struct SuggestInput<'a> {
    pub sizing: &'a Sizing,
    pub kernel_drops: &'a BTreeMap<Cause, u64>,
    pub early_drop: u64,
    pub peaks: &'a Peaks,
    pub offenders: &'a [Offender],
    pub key_mode: KeyMode,
    pub plan: Option<&'a PlanFix>,
}

/// `reason` ending with a full stop.
fn sentence(reason: &str) -> String {
    let r = reason.trim_end();
    if r.ends_with(['.', '!', '?']) { r.to_string() } else { format!("{r}.") }
}

/// Headroom over the estimated need when raising nf_conntrack_max.
pub const HEADROOM: f64 = 1.25;
/// A port making more than this share of new entries is a bypass candidate...
pub const BYPASS_SHARE_PERCENT: f64 = 50.0;
/// ...when it made at least this many.
pub const BYPASS_MIN_NEW: u64 = 100;

/// `53/udp` -> (53, 17).
pub fn parse_port_key(key: &str) -> Option<(u16, u8)> {
    let (port, proto) = key.split_once('/')?;
    let proto = match proto {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        "udplite" => 136,
        _ => return None,
    };
    Some((port.parse().ok()?, proto))
}

/// How long a new entry of this protocol lives when nothing else happens to
/// it: (seconds, the timeout's name).
pub fn lifetime(proto: Option<u8>, timeouts: &BTreeMap<String, u64>) -> (u64, String) {
    let get = |k: &str, default: u64| (timeouts.get(k).copied().unwrap_or(default), k.to_string());
    match proto {
        // A new TCP flow lives tcp_timeout_syn_sent unanswered, and as long in
        // TIME_WAIT after a clean close: take the longer.
        Some(6) => {
            let a = get("tcp_timeout_syn_sent", 120);
            let b = get("tcp_timeout_time_wait", 120);
            if a.0 >= b.0 { a } else { b }
        }
        Some(17) | Some(136) => get("udp_timeout", 30),
        Some(1) => get("icmp_timeout", 30),
        Some(58) => get("icmpv6_timeout", 30),
        Some(_) => get("generic_timeout", 600),
        None => get("udp_timeout", 30),
    }
}

/// Rounds a table size up: to 1024 below 65536, to 65536 above.
pub fn round_max(n: f64) -> u64 {
    let n = n.max(1.0).ceil() as u64;
    let step = if n < 65_536 { 1024 } else { 65_536 };
    n.div_ceil(step) * step
}

pub fn suggest(i: &SuggestInput<'_>) -> Vec<Suggestion> {
    let mut out = Vec::new();
    let drops = |c: Cause| i.kernel_drops.get(&c).copied().unwrap_or(0);
    let (table_full, insert_failed, invalid, ruleset) =
        (drops(Cause::TableFull), drops(Cause::InsertFailed), drops(Cause::CtInvalid), drops(Cause::Ruleset));
    let fullest = i.peaks.fill.first();
    let max = i.sizing.nf_conntrack_max;
    let pressure = table_full > 0 || i.early_drop > 0 || fullest.is_some_and(|f| f.fill_percent >= 90.0);

    let top_port = (i.key_mode == KeyMode::DstPort)
        .then(|| i.offenders.iter().filter(|o| o.key != "(other keys)").max_by_key(|o| o.new_entries))
        .flatten()
        .and_then(|o| parse_port_key(&o.key).map(|(port, proto)| (o, port, proto)));

    if pressure && max > 0 {
        let mut why = String::new();
        if table_full > 0 {
            let _ = write!(why, "{table_full} packets were dropped because the table was full");
        } else if i.early_drop > 0 {
            let _ = write!(why, "conntrack evicted {} entries to make room (early_drop)", i.early_drop);
        } else {
            why.push_str("the table came close to full");
        }
        if let Some(f) = fullest {
            let _ = write!(why, " (peak {} of {} entries, {:.1} %, in {})", f.entries, f.max, f.fill_percent, f.label);
        }
        let planned = i.plan.and_then(|p| p.max.as_ref()).filter(|(cur, proposed, _)| proposed > cur);
        if let Some((cur, proposed, reason)) = planned {
            out.push(Suggestion {
                title: format!("Raise nf_conntrack_max from {cur} to {proposed}"),
                command: Some(format!("sysctl -w net.netfilter.nf_conntrack_max={proposed}")),
                why: format!(
                    "{why}. `ctguard recommend`: {} Persist it with `ctguard recommend --emit` (sysctl.d) or apply it \
                     with `ctguard recommend --apply` (rollback-able).",
                    sentence(reason)
                ),
            });
        } else {
            let proto = top_port.map(|(_, _, p)| p);
            let (life, life_key) = lifetime(proto, &i.sizing.timeouts);
            let peak_entries = fullest.map_or(0, |f| f.entries);
            let by_rate = i.peaks.inserts_per_s * life as f64;
            let need = (peak_entries as f64).max(by_rate) * HEADROOM;
            let target = round_max(need.max(max as f64 * 2.0));
            let _ = write!(
                why,
                ". At the peak rate of {:.0} new entries/s and {life} s of {life_key}{}, the table needs about {:.0} entries; \
                 {target} adds {:.0} % headroom and at least doubles the current {max}. Persist it in /etc/sysctl.d/ and size \
                 the hash (nf_conntrack_buckets) and timeouts with `ctguard recommend`.",
                i.peaks.inserts_per_s,
                proto.map_or(String::new(), |p| format!(" ({} flows)", proto_name(p))),
                need / HEADROOM,
                (HEADROOM - 1.0) * 100.0,
            );
            out.push(Suggestion {
                title: format!("Raise nf_conntrack_max from {max} to {target}"),
                command: Some(format!("sysctl -w net.netfilter.nf_conntrack_max={target}")),
                why,
            });
        }
        for (key, cur, proposed, reason) in i.plan.map(|p| p.timeouts.as_slice()).unwrap_or_default() {
            out.push(Suggestion {
                title: format!("Shorten {key} from {cur} s to {proposed} s"),
                command: Some(format!("sysctl -w net.netfilter.nf_conntrack_{key}={proposed}")),
                why: format!("`ctguard recommend`: {}", sentence(reason)),
            });
        }
    }
    if (pressure || insert_failed > 0)
        && let Some((cur, proposed, reason)) = i.plan.and_then(|p| p.buckets.as_ref()).filter(|(c, p, _)| c != p)
    {
        out.push(Suggestion {
            title: format!("Resize the hash table: nf_conntrack_buckets from {cur} to {proposed}"),
            command: Some(format!("echo {proposed} > /sys/module/nf_conntrack/parameters/hashsize")),
            why: format!("`ctguard recommend`: {}", sentence(reason)),
        });
    }
    if let Some((command, reason)) = i.plan.and_then(|p| p.bypass.as_ref()) {
        out.push(Suggestion {
            title: "Exempt the busiest port from connection tracking".into(),
            command: Some(command.clone()),
            why: format!(
                "`ctguard recommend`: {} Check first that no NAT or `ct state` rule needs those flows tracked \
                 (add --dry-run to see the rules and the conflict warnings first).",
                sentence(reason)
            ),
        });
    } else if let Some((o, port, proto)) = top_port
        && o.share_percent > BYPASS_SHARE_PERCENT
        && o.new_entries >= BYPASS_MIN_NEW
    {
        out.push(Suggestion {
            title: format!("Exempt port {port}/{} from connection tracking", proto_name(proto)),
            command: Some(format!(
                "ctguard bypass add --proto {} --port {port}{}",
                proto_name(proto),
                o.netns_name.as_ref().map_or(String::new(), |n| format!(" --netns {n}"))
            )),
            why: format!(
                "{:.0} % of new entries ({}) were for destination port {port}/{}: NOTRACK for it removes that churn \
                 at the source. Check first that no NAT or `ct state` rule needs those flows tracked \
                 (add --dry-run to see the rules and the conflict warnings first).",
                o.share_percent,
                o.new_entries,
                proto_name(proto)
            ),
        });
    }
    if insert_failed > 0 {
        out.push(Suggestion {
            title: "Look at insert failures (hash clashes, long chains)".into(),
            command: None,
            why: format!(
                "{insert_failed} packets were dropped because their new entry could not be inserted: a clash with an \
                 existing entry (often parallel UDP flows through NAT) or a hash chain that was too long \
                 (nf_conntrack_buckets is {} for max {max}). `ctguard recommend` sizes the hash.",
                i.sizing.nf_conntrack_buckets
            ),
        });
    }
    if invalid > 0 {
        out.push(Suggestion {
            title: "Check why conntrack found packets invalid".into(),
            command: None,
            why: format!(
                "{invalid} packets conntrack considered invalid were dropped by a rule (e.g. `ct state invalid drop`): \
                 asymmetric routing, TCP packets outside the window, or entries that expired or were evicted early. \
                 events.jsonl and drops.pcapng show which flows."
            ),
        });
    }
    if ruleset > 0 && out.is_empty() {
        out.push(Suggestion {
            title: "These drops come from your ruleset, not from conntrack capacity".into(),
            command: None,
            why: format!(
                "{ruleset} packets were dropped by nftables/iptables rule verdicts; the drop location in events.jsonl \
                 names the chain evaluation that dropped them."
            ),
        });
    }
    if out.is_empty() {
        out.push(Suggestion {
            title: "No conntrack capacity problem in this window".into(),
            command: None,
            why: "No table-full, insert-failed or invalid drops and no early evictions were counted while the window was open.".into(),
        });
    }
    out
}

// ---------------------------------------------------------------- markdown

fn num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn ns_name(netns: Option<u32>, label: Option<&str>) -> String {
    match (netns, label) {
        (Some(n), Some(l)) if !l.starts_with("netns:[") => format!("{l} (netns {n})"),
        (Some(n), _) => format!("netns {n}"),
        (None, _) => "all namespaces".into(),
    }
}

pub fn render_markdown(s: &Summary) -> String {
    let mut o = String::new();
    let t = &s.trigger;
    let w = &s.window;
    let _ = writeln!(o, "# ctguard capture {}: `{}` fired\n", s.capture, t.expression);
    let mut where_ = ns_name(t.netns, t.netns_label.as_deref());
    if t.netns.is_none() && t.busiest_netns.is_some() {
        let _ = write!(where_, ", most in {}", ns_name(t.busiest_netns, t.busiest_label.as_deref()));
    }
    let _ = writeln!(
        o,
        "- **What fired**: `{}` with value **{}** ({}) in {where_}",
        t.expression,
        num(t.value),
        t.measures
    );
    let _ = writeln!(o, "- **When**: {} UTC", t.time.replace('T', " ").trim_end_matches('Z'));
    let _ = writeln!(
        o,
        "- **Window**: {} to {} UTC ({} s before the trigger, {} s after{}; closed because {})",
        clock_utc(w.start_unix_ns),
        clock_utc(w.end_unix_ns),
        num(w.pre_s),
        num(w.post_s),
        if w.cut_short { ", **cut short**" } else { "" },
        w.closed_because
    );
    if !s.also_true.is_empty() {
        let list: Vec<String> = s.also_true.iter().map(|a| format!("`{}` ({})", a.expression, num(a.value))).collect();
        let _ = writeln!(o, "- **Also true at that moment**: {}", list.join(", "));
    }
    if let Some(c) = &s.command {
        let _ = writeln!(o, "- **Wrapped command**: `{}` ({})", c.argv.join(" "), c.status);
    }

    let e = &s.events;
    let _ = writeln!(o, "\n## Events\n");
    let _ = writeln!(
        o,
        "| drop events recorded | packets in drops.pcapng | lost by the ring buffer | discarded (--pre-max-events) |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|");
    let _ = writeln!(
        o,
        "| {} | {} | {} | {} |",
        e.drops, e.packets_in_pcapng, e.lost_by_ring_buffer, e.discarded_by_pre_max_events
    );
    if e.lost_by_ring_buffer > 0 {
        let _ = writeln!(
            o,
            "\n**Warning: {} events were lost by the ring buffer** during the window: events.jsonl and drops.pcapng miss \
             that many packets. The kernel counts below are exact regardless. Use a larger --ring-kib.",
            e.lost_by_ring_buffer
        );
    }
    if e.discarded_by_pre_max_events > 0 {
        let _ = writeln!(
            o,
            "\n**Warning: {} pre-trigger events were discarded** because --pre-max-events was reached.",
            e.discarded_by_pre_max_events
        );
    }
    if e.packets_without_bytes > 0 {
        let _ = writeln!(
            o,
            "\n{} packets came without bytes (the kernel could not copy them); they are in drops.pcapng with length 0.",
            e.packets_without_bytes
        );
    }

    let _ = writeln!(o, "\n## Drops by cause\n");
    if s.drops_by_cause.is_empty() {
        let _ = writeln!(o, "No drops in the window.");
    } else {
        let _ = writeln!(o, "| cause | events recorded | kernel count | peak /s |");
        let _ = writeln!(o, "|---|---:|---:|---:|");
        for r in &s.drops_by_cause {
            let _ = writeln!(o, "| {} | {} | {} | {} |", r.cause.as_str(), r.events, r.kernel, num(r.peak_per_s));
        }
    }
    if let Some((a, b)) = &s.stats_span {
        let _ = writeln!(
            o,
            "\nKernel counts are exact totals from ctguard's kernel maps over the stat snapshots from {a} to {b}."
        );
    }

    let p = &s.peaks;
    let _ = writeln!(o, "\n## Peaks\n");
    // Tables that held entries (the fullest one anyway), at most five.
    for f in p.fill.iter().enumerate().filter(|(i, f)| *i == 0 || f.entries > 0).map(|(_, f)| f).take(5) {
        let _ = writeln!(o, "- fill {}: **{:.1} %** ({} of {} entries)", f.label, f.fill_percent, f.entries, f.max);
    }
    let _ = writeln!(
        o,
        "- new entries: **{}/s** (total {} in the window)",
        num(p.inserts_per_s.round()),
        s.kernel_new_entries
    );
    let _ = writeln!(o, "- drops: **{}/s**", num(p.drops_per_s_total.round()));
    let _ =
        writeln!(o, "- early_drop evictions: {}/s (total {})", num(p.early_drop_per_s.round()), s.kernel_early_drop);

    let _ = writeln!(o, "\n## Top offenders\n");
    if s.top_offenders.is_empty() {
        let _ = writeln!(o, "No new entries were keyed in the window.");
    } else {
        let _ = writeln!(
            o,
            "By new entries (key: {:?}), from when the triggers were armed to the end of the window:\n",
            s.key_mode
        );
        let _ = writeln!(o, "| netns | key | new entries | share | conntrack drops |");
        let _ = writeln!(o, "|---|---|---:|---:|---:|");
        for k in &s.top_offenders {
            let _ =
                writeln!(o, "| {} | {} | {} | {:.1} % | {} |", k.netns, k.key, k.new_entries, k.share_percent, k.drops);
        }
    }

    let _ = writeln!(o, "\n## Suggested fix\n");
    for (n, g) in s.suggestions.iter().enumerate() {
        let _ = writeln!(o, "{}. **{}**", n + 1, g.title);
        if let Some(c) = &g.command {
            let _ = writeln!(o, "   `{c}`");
        }
        let _ = writeln!(o, "   {}", g.why);
    }
    let _ = writeln!(
        o,
        "\nCurrent sizing: nf_conntrack_max {}, nf_conntrack_buckets {}. {}",
        s.sizing.nf_conntrack_max, s.sizing.nf_conntrack_buckets, s.recommendation_note
    );

    let _ = writeln!(o, "\n## Files\n");
    for (name, what) in &s.files {
        let _ = writeln!(o, "- `{name}`: {what}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::event::{CapturedPacket, Flow};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn utc_formatting() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000Z");
        // 2024-02-29 23:59:58.123 UTC (a leap day).
        let t = 1_709_251_198_123_000_000;
        assert_eq!(iso_utc(t), "2024-02-29T23:59:58.123Z");
        assert_eq!(compact_utc(t), "20240229T235958Z");
        assert_eq!(clock_utc(t), "23:59:58.123");
        assert_eq!(iso_utc(4_102_444_800_000_000_000), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn sizes_round_up() {
        assert_eq!(round_max(1.0), 1024);
        assert_eq!(round_max(1025.0), 2048);
        assert_eq!(round_max(70_000.0), 131_072);
        assert_eq!(parse_port_key("53/udp"), Some((53, 17)));
        assert_eq!(parse_port_key("(other keys)"), None);
    }

    fn peaks(entries: u64, max: u64, inserts: f64) -> Peaks {
        Peaks {
            fill: vec![FillPeak {
                netns: 7,
                label: "lb".into(),
                fill_percent: entries as f64 * 100.0 / max as f64,
                entries,
                max,
            }],
            inserts_per_s: inserts,
            ..Default::default()
        }
    }

    #[test]
    fn table_full_suggests_a_larger_max_and_a_bypass_for_a_dominant_port() {
        let sizing = Sizing {
            nf_conntrack_max: 50,
            nf_conntrack_buckets: 1024,
            timeouts: [("udp_timeout".to_string(), 30)].into(),
        };
        let drops = [(Cause::TableFull, 250)].into();
        let p = peaks(50, 50, 300.0);
        let offenders = [Offender {
            netns: 7,
            netns_name: Some("lb".into()),
            key: "5353/udp".into(),
            new_entries: 300,
            drops: 250,
            share_percent: 100.0,
        }];
        let s = suggest(&SuggestInput {
            sizing: &sizing,
            kernel_drops: &drops,
            early_drop: 0,
            peaks: &p,
            offenders: &offenders,
            key_mode: KeyMode::DstPort,
            plan: None,
        });
        // 300/s x 30 s = 9000, x 1.25 = 11250 -> 11264.
        assert_eq!(s[0].title, "Raise nf_conntrack_max from 50 to 11264");
        assert_eq!(s[0].command.as_deref(), Some("sysctl -w net.netfilter.nf_conntrack_max=11264"));
        assert!(s[0].why.starts_with("250 packets were dropped because the table was full"), "{}", s[0].why);
        assert!(s[0].why.contains("30 s of udp_timeout (udp flows)"), "{}", s[0].why);
        assert_eq!(s[1].command.as_deref(), Some("ctguard bypass add --proto udp --port 5353 --netns lb"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_plan_of_ctguard_recommend_is_followed_when_there_is_one() {
        let sizing = Sizing { nf_conntrack_max: 50, nf_conntrack_buckets: 1024, timeouts: BTreeMap::new() };
        let drops = [(Cause::TableFull, 250)].into();
        let p = peaks(50, 50, 300.0);
        let plan = PlanFix {
            max: Some((50, 262_144, "the kernel default for this host.".into())),
            buckets: Some((1024, 1024, "kept.".into())),
            timeouts: vec![("udp_timeout".into(), 30, 10, "frees 6000 entries.".into())],
            bypass: Some(("ctguard bypass add --port 5353".into(), "port 5353/udp makes 100 % of new entries.".into())),
        };
        let s = suggest(&SuggestInput {
            sizing: &sizing,
            kernel_drops: &drops,
            early_drop: 0,
            peaks: &p,
            offenders: &[],
            key_mode: KeyMode::DstPort,
            plan: Some(&plan),
        });
        assert_eq!(s[0].title, "Raise nf_conntrack_max from 50 to 262144");
        assert!(s[0].why.contains("`ctguard recommend`: the kernel default"), "{}", s[0].why);
        assert_eq!(s[1].command.as_deref(), Some("sysctl -w net.netfilter.nf_conntrack_udp_timeout=10"));
        assert_eq!(
            s[2].command.as_deref(),
            Some("ctguard bypass add --port 5353"),
            "unchanged buckets are not suggested"
        );
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn quiet_or_ruleset_windows_say_so() {
        let sizing = Sizing { nf_conntrack_max: 262_144, ..Default::default() };
        let none = BTreeMap::new();
        let p = peaks(10, 262_144, 5.0);
        let input = |d| SuggestInput {
            sizing: &sizing,
            kernel_drops: d,
            early_drop: 0,
            peaks: &p,
            offenders: &[],
            key_mode: KeyMode::DstPort,
            plan: None,
        };
        assert!(suggest(&input(&none))[0].title.starts_with("No conntrack capacity problem"));
        let rs = [(Cause::Ruleset, 3)].into();
        assert!(suggest(&input(&rs))[0].title.contains("your ruleset"));
        let inv = [(Cause::CtInvalid, 3), (Cause::InsertFailed, 1)].into();
        let s = suggest(&input(&inv));
        assert_eq!(s.len(), 2);
        assert!(s[0].title.contains("insert failures"));
        assert!(s[1].title.contains("invalid"));
    }

    #[test]
    fn tcp_lifetimes_take_the_longer_timeout() {
        let t: BTreeMap<String, u64> =
            [("tcp_timeout_syn_sent".to_string(), 120), ("tcp_timeout_time_wait".to_string(), 60)].into();
        assert_eq!(lifetime(Some(6), &t), (120, "tcp_timeout_syn_sent".into()));
        assert_eq!(lifetime(Some(17), &t), (30, "udp_timeout".into()), "defaults when unknown");
    }

    fn drop_event(ts: u64, cause: Cause, packet: Option<CapturedPacket>) -> DecodedEvent {
        DecodedEvent {
            kind: EventKind::Drop,
            ts_ns: ts,
            cpu: 0,
            netns: 7,
            ifindex: 3,
            cause: Some(cause),
            cause_confidence: Some(Confidence::Likely),
            location: 0xffff_ffff_8100_0000,
            ctinfo: None,
            ct_status: 0,
            zone: 0,
            flow: Flow {
                proto: 17,
                src: Some("10.0.0.1".parse().unwrap()),
                dst: Some("10.0.0.2".parse().unwrap()),
                sport: 4000,
                dport: 53,
            },
            packet,
        }
    }

    fn summary_input(dir: &Path) -> SummaryInput {
        let t0 = 1_709_251_198_000_000_000;
        SummaryInput {
            capture: 1,
            directory: dir.display().to_string(),
            trigger: TriggerInfo {
                expression: "table_full>0".into(),
                measures: "table_full drops since armed".into(),
                value: 2.0,
                netns: None,
                netns_label: None,
                busiest_netns: Some(7),
                busiest_label: Some("lb".into()),
                time: iso_utc(t0),
                time_unix_ns: t0,
            },
            also_true: vec![AlsoTrue { expression: "drops/s>1".into(), value: 2.0 }],
            window: WindowInfo {
                start: iso_utc(t0 - 10_000_000_000),
                end: iso_utc(t0 + 20_000_000_000),
                start_unix_ns: t0 - 10_000_000_000,
                end_unix_ns: t0 + 20_000_000_000,
                pre_s: 10.0,
                post_s: 20.0,
                closed_because: "the post-trigger window ended".into(),
                cut_short: false,
            },
            discarded_by_pre_max_events: 0,
            top_offenders: vec![],
            key_mode: KeyMode::DstPort,
            sizing: Sizing { nf_conntrack_max: 50, nf_conntrack_buckets: 1024, timeouts: BTreeMap::new() },
            plan: None,
            recommendation_note: "note".into(),
            command: Some(CommandInfo { argv: vec!["sleep".into(), "2".into()], status: "exited with 0".into() }),
        }
    }

    #[test]
    fn a_bundle_is_private_and_holds_what_was_written() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("captures");
        let t0 = 1_709_251_198_000_000_000;
        let mut b = Bundle::create(&out, t0, 1, Snap::Headers).unwrap();
        assert!(b.dir.file_name().unwrap().to_string_lossy().starts_with("capture-20240229T235958Z-1"));
        let pkt = CapturedPacket { wire_len: 36, data: vec![0x45; 36] };
        let ctx =
            |ts| EventContext { time_unix_ns: ts, location_symbol: Some("nf_hook_slow+0x7d"), netns_label: Some("lb") };
        b.write_event(&drop_event(1, Cause::Ruleset, Some(pkt.clone())), &ctx(t0 - 1_000_000_000)).unwrap();
        b.write_event(&drop_event(2, Cause::TableFull, Some(pkt)), &ctx(t0 + 1)).unwrap();
        b.write_event(&drop_event(3, Cause::TableFull, None), &ctx(t0 + 2)).unwrap();
        assert_eq!(b.totals.drop_events, 3);
        assert_eq!(b.totals.packets, 3);
        assert_eq!(b.totals.packets_without_bytes, 1);
        b.write_json("top.json", &serde_json::json!({"x": 1})).unwrap();
        let totals = b.totals.clone();
        let dir = b.dir.clone();
        let summary = build_summary(summary_input(&dir), &totals);
        assert_eq!(b.finish(&summary).unwrap(), dir);

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in ["drops.pcapng", "events.jsonl", "stats.jsonl", "top.json", "summary.json", "summary.md"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let packets = super::super::pcapng::read_packets(&dir.join("drops.pcapng")).unwrap();
        assert_eq!(packets.len(), 3);
        assert_eq!(packets[0].time_unix_ns, t0 - 1_000_000_000);
        // Headers only: the 20-byte IPv4 header of protocol 0x45 (unknown,
        // so no transport header), and the whole packet's length.
        assert_eq!((packets[0].data.len(), packets[0].original_len), (20, 36));
        let c = packets[1].comment.as_deref().unwrap();
        assert!(
            c.contains("cause=table_full confidence=likely netns=7 (lb) ifindex=3 location=nf_hook_slow+0x7d"),
            "{c}"
        );
        assert!(c.ends_with("flow=udp 10.0.0.1:4000 -> 10.0.0.2:53"), "{c}");
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("events.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["phase"], "pre");
        assert_eq!(lines[0]["rel_trigger_s"], -1.0);
        assert_eq!(lines[0]["cause"], "ruleset");
        assert_eq!(lines[0]["pcap_frame"], 1);
        assert_eq!((lines[0]["wire_len"].as_u64(), lines[0]["captured_len"].as_u64()), (Some(36), Some(20)));
        assert_eq!(lines[1]["phase"], "post");
        assert_eq!(lines[1]["location_symbol"], "nf_hook_slow+0x7d");
        assert_eq!(lines[2]["wire_len"], serde_json::Value::Null);
        let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
        assert!(md.starts_with("# ctguard capture 1: `table_full>0` fired"), "{md}");
        assert!(md.contains("(table_full drops since armed) in all namespaces, most in lb (netns 7)"), "{md}");
        assert!(md.contains("| table_full | 2 | 0 | 0 |"), "{md}");
        assert!(md.contains("`sleep 2` (exited with 0)"), "{md}");
        let js: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
        assert_eq!(js["schema"], SUMMARY_SCHEMA);
        assert_eq!(js["events"]["drops"], 3);
        assert_eq!(js["events"]["complete"], true);

        // A second bundle in the same second gets its own directory.
        // With --snap-bytes, the first N bytes, payload included.
        let mut b2 = Bundle::create(&out, t0, 1, Snap::Bytes(30)).unwrap();
        assert!(b2.dir.to_string_lossy().ends_with("-1.2"));
        let pkt = CapturedPacket { wire_len: 36, data: vec![0x45; 36] };
        b2.write_event(&drop_event(1, Cause::TableFull, Some(pkt)), &ctx(t0)).unwrap();
        let dir2 = b2.dir.clone();
        b2.finish(&build_summary(summary_input(&dir2), &Totals::default())).unwrap();
        let packets = super::super::pcapng::read_packets(&dir2.join("drops.pcapng")).unwrap();
        assert_eq!((packets[0].data.len(), packets[0].original_len), (30, 36));
    }

    #[test]
    fn lost_and_discarded_events_are_shown_not_hidden() {
        let mut totals = Totals::default();
        totals.kernel.events_lost = 120;
        let mut input = summary_input(Path::new("/x"));
        input.discarded_by_pre_max_events = 7;
        let s = build_summary(input, &totals);
        assert!(!s.events.complete);
        let md = render_markdown(&s);
        assert!(md.contains("**Warning: 120 events were lost by the ring buffer**"), "{md}");
        assert!(md.contains("**Warning: 7 pre-trigger events were discarded**"), "{md}");
        assert!(md.contains("| 0 | 0 | 120 | 7 |"), "{md}");
    }
}
