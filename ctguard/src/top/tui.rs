//! The interactive terminal view of `top` (ratatui). Sampling runs on its
//! own thread; this thread only handles keys and draws. The terminal is
//! restored on quit, on panic and on SIGTERM/SIGHUP.
use std::{
    collections::VecDeque,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use ratatui::{
    Frame as TermFrame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Clear, Gauge, Paragraph, RenderDirection, Row, Sparkline, Table},
};

use super::{
    model::{self, Frame, FrameOptions, KeyFilter, Sample, SortBy},
    render,
    sampler::Sampler,
};
use crate::{
    cli::TopArgs,
    kernel::system,
    sensors::{KeyMode, SensorOptions},
    trace::filter::parse_proto,
};

/// Set by SIGTERM/SIGHUP; checked by the UI loop.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// What the sampler thread sends back.
enum Update {
    Sample(Sample),
    Error(String),
}

/// Sparkline history length (samples).
const HISTORY: usize = 300;

struct App {
    args_interval: Duration,
    mode: KeyMode,
    sort: SortBy,
    top: usize,
    filter: KeyFilter,
    paused: bool,
    help: bool,
    /// Some while the user types a filter.
    input: Option<String>,
    message: Option<String>,
    /// The two latest samples: the frame is computed between them.
    before: Option<Sample>,
    prev: Option<Sample>,
    frame: Option<Frame>,
    fill_history: VecDeque<u64>,
    drop_history: VecDeque<u64>,
    started: Instant,
    kernel: String,
    backend: String,
}

pub fn run(args: &TopArgs, opts: &SensorOptions, filter: KeyFilter) -> anyhow::Result<ExitCode> {
    // Fail before touching the terminal when the sensors cannot start.
    let sampler = Sampler::start(opts, filter.netns)?;
    let backend = format!("{:?}", sampler.backend());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        // In raw mode Ctrl-C arrives as a key, but a SIGINT or SIGQUIT sent by
        // another process would otherwise kill us with the terminal raw.
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let (mode_tx, mode_rx) = mpsc::channel::<KeyMode>();
    let (tx, rx) = mpsc::channel::<Update>();
    let interval = args.interval;
    let base_opts = opts.clone();
    let only = filter.netns;
    std::thread::spawn(move || sample_loop(sampler, base_opts, only, interval, mode_rx, tx));

    // ratatui::init installs a panic hook that restores the terminal first.
    let mut terminal = ratatui::init();
    let mut app = App {
        args_interval: args.interval,
        mode: args.by,
        sort: args.sort,
        top: args.top,
        filter,
        paused: false,
        help: false,
        input: None,
        message: None,
        before: None,
        prev: None,
        frame: None,
        fill_history: VecDeque::new(),
        drop_history: VecDeque::new(),
        started: Instant::now(),
        kernel: system::kernel_release(),
        backend,
    };
    let result = ui_loop(&mut terminal, &mut app, &rx, &mode_tx, args.duration);
    ratatui::restore();
    result?;
    Ok(ExitCode::SUCCESS)
}

fn sample_loop(
    mut sampler: Sampler,
    mut opts: SensorOptions,
    only: Option<u32>,
    interval: Duration,
    modes: mpsc::Receiver<KeyMode>,
    tx: mpsc::Sender<Update>,
) {
    loop {
        if let Some(mode) = modes.try_iter().last() {
            // The key mode is compiled into the kernel programs' globals:
            // switching means reloading them (rates restart).
            opts.key_mode = mode;
            drop(sampler);
            sampler = match Sampler::start(&opts, only) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Update::Error(e.to_string()));
                    return;
                }
            };
        }
        let update = match sampler.sample() {
            Ok(s) => Update::Sample(s),
            Err(e) => Update::Error(e.to_string()),
        };
        if tx.send(update).is_err() {
            return; // UI gone
        }
        std::thread::sleep(interval);
    }
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    rx: &mpsc::Receiver<Update>,
    mode_tx: &mpsc::Sender<KeyMode>,
    duration: Option<Duration>,
) -> anyhow::Result<()> {
    loop {
        if STOP.load(Ordering::Relaxed) || duration.is_some_and(|d| app.started.elapsed() >= d) {
            return Ok(());
        }
        loop {
            match rx.try_recv() {
                Ok(Update::Sample(s)) => app.absorb(s),
                Ok(Update::Error(e)) => anyhow::bail!("sampling failed: {e}"),
                Err(mpsc::TryRecvError::Empty) => break,
                // The sampler only hangs up by panicking: stop rather than
                // keep drawing numbers that no longer change.
                Err(mpsc::TryRecvError::Disconnected) => anyhow::bail!("the sampling thread stopped unexpectedly"),
            }
        }
        terminal.draw(|f| draw(f, app))?;
        if !event::poll(Duration::from_millis(100))? {
            continue;
        }
        let Event::Key(key) = event::read()? else { continue };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        if let Some(text) = app.input.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    let text = app.input.take().unwrap_or_default();
                    match parse_filter(&text, &app.filter) {
                        Ok(f) => {
                            app.filter = f;
                            app.message = None;
                            app.recompute();
                        }
                        Err(e) => app.message = Some(e),
                    }
                }
                KeyCode::Esc => app.input = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Char('?') | KeyCode::Char('h') => app.help = !app.help,
            KeyCode::Char('p') | KeyCode::Char(' ') => app.paused = !app.paused,
            KeyCode::Char('s') => {
                app.sort = app.sort.next();
                app.recompute();
            }
            KeyCode::Char('b') => {
                app.mode = next_mode(app.mode);
                app.before = None;
                app.prev = None;
                app.frame = None;
                let _ = mode_tx.send(app.mode);
            }
            KeyCode::Char('f') => app.input = Some(String::new()),
            KeyCode::Char('n') => {
                app.filter.netns = next_netns(app);
                app.recompute();
            }
            _ => {}
        }
    }
}

impl App {
    fn absorb(&mut self, s: Sample) {
        if self.paused {
            return;
        }
        if let Some(prev) = &self.prev {
            let frame = self.compute(prev, &s);
            push(&mut self.fill_history, frame.tables.iter().map(|t| t.fill_percent.round() as u64).max().unwrap_or(0));
            push(&mut self.drop_history, frame.rates.drops_per_s.values().sum::<f64>().round() as u64);
            self.frame = Some(frame);
        }
        self.before = self.prev.replace(s);
    }

    fn compute(&self, prev: &Sample, cur: &Sample) -> Frame {
        model::frame(prev, cur, &FrameOptions { mode: self.mode, sort: self.sort, top: self.top, filter: &self.filter })
    }

    /// Recomputes the frame between the last two samples with the current
    /// sort and filter, so a key press shows its effect at once (and rows a
    /// filter or sort brings in are not missing until the next sample).
    fn recompute(&mut self) {
        if self.frame.is_none() {
            return;
        }
        if let (Some(before), Some(prev)) = (&self.before, &self.prev) {
            self.frame = Some(self.compute(before, prev));
        }
    }
}

/// A sparkline of a history given newest first. A sparkline draws as many
/// points as it is wide, starting from the first: drawn right to left, the
/// newest sample stays at the right edge and the oldest scroll out.
fn history_chart<'a>(title: &'a str, newest_first: &'a [u64]) -> Sparkline<'a> {
    Sparkline::default()
        .block(Block::bordered().title(title))
        .direction(RenderDirection::RightToLeft)
        .data(newest_first)
}

fn newest_first(h: &VecDeque<u64>) -> Vec<u64> {
    h.iter().rev().copied().collect()
}

fn push(h: &mut VecDeque<u64>, v: u64) {
    if h.len() == HISTORY {
        h.pop_front();
    }
    h.push_back(v);
}

fn next_mode(m: KeyMode) -> KeyMode {
    match m {
        KeyMode::DstPort => KeyMode::SrcIp,
        KeyMode::SrcIp => KeyMode::DstIp,
        KeyMode::DstIp => KeyMode::SrcDst,
        KeyMode::SrcDst => KeyMode::Netns,
        KeyMode::Netns => KeyMode::Zone,
        KeyMode::Zone => KeyMode::Tuple,
        KeyMode::Tuple => KeyMode::DstPort,
    }
}

fn next_netns(app: &App) -> Option<u32> {
    let tables: Vec<u32> = app.prev.as_ref().map(|s| s.tables.iter().map(|t| t.netns).collect()).unwrap_or_default();
    match app.filter.netns {
        None => tables.first().copied(),
        Some(cur) => tables.iter().position(|n| *n == cur).and_then(|i| tables.get(i + 1).copied()),
    }
}

/// Applies one filter command to the current filter: `udp`, `proto tcp`,
/// `port 53`, `src 10.0.0.0/8`, `dst fd00::/64`, `netns 4026531840`, `clear`.
pub fn parse_filter(input: &str, current: &KeyFilter) -> Result<KeyFilter, String> {
    let mut f = current.clone();
    let words: Vec<&str> = input.split_whitespace().collect();
    match words.as_slice() {
        [] => {}
        ["clear"] => f = KeyFilter::default(),
        ["port", p] => f.port = Some(p.parse().map_err(|_| format!("`{p}` is not a port"))?),
        ["proto", p] => f.proto = Some(parse_proto(p)?),
        ["src", c] => f.src = Some(c.parse()?),
        ["dst", c] => f.dst = Some(c.parse()?),
        ["netns", n] => f.netns = Some(n.parse().map_err(|_| format!("`{n}` is not a namespace inode"))?),
        [p] => {
            f.proto = Some(parse_proto(p).map_err(|_| {
                format!("unknown filter `{p}`; try: udp | port 53 | src 10.0.0.0/8 | dst ... | netns N | clear")
            })?)
        }
        _ => {
            return Err(format!(
                "unknown filter `{input}`; try: udp | port 53 | src 10.0.0.0/8 | dst ... | netns N | clear"
            ));
        }
    }
    Ok(f)
}

fn describe_filter(f: &KeyFilter) -> String {
    if f.is_empty() {
        return "none".into();
    }
    let mut parts = Vec::new();
    if let Some(n) = f.netns {
        parts.push(format!("netns {n}"));
    }
    if let Some(p) = f.proto {
        parts.push(crate::sensors::event::proto_name(p));
    }
    if let Some(p) = f.port {
        parts.push(format!("port {p}"));
    }
    if let Some(c) = f.src {
        parts.push(format!("src {c}"));
    }
    if let Some(c) = f.dst {
        parts.push(format!("dst {c}"));
    }
    parts.join(", ")
}

fn draw(f: &mut TermFrame<'_>, app: &App) {
    let tables = app.frame.as_ref().map_or(0, |fr| fr.tables.len()).clamp(1, 6) as u16;
    let [header, gauges, rates, charts, keys, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(tables + 2),
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Min(5),
        Constraint::Length(1),
    ])
    .areas(f.area());

    let up = app.started.elapsed().as_secs();
    let head = format!(
        " ctguard top | kernel {} | backend {} | netns {} | up {:02}:{:02}:{:02} | every {:.1}s | by {:?} | sort {:?}{}",
        app.kernel,
        app.backend,
        app.filter.netns.map_or("all".to_string(), |n| n.to_string()),
        up / 3600,
        up / 60 % 60,
        up % 60,
        app.args_interval.as_secs_f64(),
        app.mode,
        app.sort,
        if app.paused { " | PAUSED" } else { "" }
    );
    f.render_widget(Paragraph::new(head).style(Style::new().add_modifier(Modifier::REVERSED)), header);

    let Some(frame) = &app.frame else {
        f.render_widget(Paragraph::new(" collecting the first interval..."), gauges);
        draw_footer(f, footer, app);
        return;
    };
    draw_gauges(f, gauges, frame);
    let rates_text = vec![
        Line::from(format!(
            " new/s {:.1}   removed/s {:.1}   early-drop evictions/s {:.1}",
            frame.rates.new_per_s, frame.rates.removed_per_s, frame.rates.early_drop_per_s
        )),
        Line::from(format!(" drops/s  {}", render::drops_line(frame))),
        Line::from(format!(
            " events lost by the ring buffer: {}   keys folded into \"other\": {}   filter: {}",
            frame.events_lost,
            frame.key_overflow,
            describe_filter(&app.filter)
        )),
    ];
    f.render_widget(Paragraph::new(rates_text).block(Block::new().borders(Borders::TOP).title(" rates ")), rates);

    let [fill_area, drop_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    let fill = newest_first(&app.fill_history);
    let drops = newest_first(&app.drop_history);
    f.render_widget(history_chart(" fill % (max over tables) ", &fill).max(100), fill_area);
    f.render_widget(history_chart(" drops/s ", &drops).style(Style::new().fg(Color::Red)), drop_area);
    draw_keys(f, keys, frame, app);
    draw_footer(f, footer, app);
    if app.help {
        draw_help(f);
    }
}

fn draw_gauges(f: &mut TermFrame<'_>, area: Rect, frame: &Frame) {
    let block = Block::bordered().title(" conntrack tables ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    if frame.tables.is_empty() {
        f.render_widget(Paragraph::new(" no namespace has conntrack active"), inner);
        return;
    }
    let rows = Layout::vertical(vec![Constraint::Length(1); frame.tables.len().min(6)]).split(inner);
    for (t, row) in frame.tables.iter().zip(rows.iter()) {
        let color = if t.fill_percent >= 95.0 {
            Color::Red
        } else if t.fill_percent >= 80.0 {
            Color::Yellow
        } else {
            Color::Green
        };
        let label = format!(
            "{}: {}/{} ({:.1}%) buckets {} {} {:+.0}/s full in {}",
            t.label,
            t.entries,
            t.max,
            t.fill_percent,
            t.buckets,
            render::trend_arrow(t.trend),
            t.growth_per_s,
            render::time_to_full(t.time_to_full_s)
        );
        f.render_widget(
            Gauge::default()
                .gauge_style(Style::new().fg(color))
                .ratio((t.fill_percent / 100.0).clamp(0.0, 1.0))
                .label(label),
            *row,
        );
    }
}

fn draw_keys(f: &mut TermFrame<'_>, area: Rect, frame: &Frame, app: &App) {
    let header = Row::new(["key", "netns", "inserts/s", "share", "drops/s", "removed/s", "total"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = frame.keys.iter().map(|k| {
        Row::new(vec![
            k.key.clone(),
            k.netns.to_string(),
            format!("{:.1}", k.inserts_per_s),
            format!("{:.1}%", k.share_percent),
            format!("{:.1}", k.drops_per_s),
            format!("{:.1}", k.removals_per_s),
            k.total_inserts.to_string(),
        ])
    });
    let title = format!(" top keys by {:?} ({} more not shown) ", app.sort, frame.keys_hidden);
    let widths = [
        Constraint::Min(24),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(12),
    ];
    f.render_widget(Table::new(rows, widths).header(header).block(Block::bordered().title(title)), area);
}

fn draw_footer(f: &mut TermFrame<'_>, area: Rect, app: &App) {
    let text = if let Some(input) = &app.input {
        format!(
            " filter> {input}_   (udp | port 53 | src CIDR | dst CIDR | netns N | clear; Enter applies, Esc cancels)"
        )
    } else if let Some(msg) = &app.message {
        format!(" {msg}")
    } else {
        " q quit  b grouping  s sort  p pause  f filter  n namespace  ? help".into()
    };
    f.render_widget(Paragraph::new(text), area);
}

fn draw_help(f: &mut TermFrame<'_>) {
    let area = f.area();
    let w = 64.min(area.width);
    let h = 14.min(area.height);
    let rect = Rect { x: (area.width - w) / 2, y: (area.height - h) / 2, width: w, height: h };
    let text = vec![
        Line::from(" q / Esc      quit (the terminal is restored)"),
        Line::from(" b            next grouping: dst port, src ip, dst ip, pair,"),
        Line::from("              netns, zone, tuple (reloads the kernel programs)"),
        Line::from(" s            next sort column"),
        Line::from(" p / space    pause / resume"),
        Line::from(" f            filter: udp | port 53 | src 10.0.0.0/8 | clear"),
        Line::from(" n            cycle through namespaces (then back to all)"),
        Line::from(" ? / h        this help"),
        Line::from(""),
        Line::from(" Rates come from exact in-kernel counters; events lost by"),
        Line::from(" the ring buffer never change them."),
    ];
    f.render_widget(Clear, rect);
    f.render_widget(Paragraph::new(text).block(Block::bordered().title(" help ")), rect);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_show_the_newest_samples_at_the_right_edge() {
        use ratatui::{buffer::Buffer, widgets::Widget};
        // Far more history than the chart is wide: 0 for a long time, then
        // a spike in the newest sample only.
        let mut history = VecDeque::new();
        for _ in 0..HISTORY {
            push(&mut history, 0);
        }
        push(&mut history, 100);
        let data = newest_first(&history);
        let area = Rect::new(0, 0, 12, 4);
        let mut buf = Buffer::empty(area);
        history_chart("t", &data).max(100).render(area, &mut buf);
        // Inside the border: columns 1..=10, rows 1..=2.
        assert_eq!(buf[(10, 1)].symbol(), "█", "newest sample at the right edge");
        assert_eq!(buf[(10, 2)].symbol(), "█");
        assert_eq!(buf[(9, 2)].symbol(), " ", "older samples were 0");
    }

    #[test]
    fn filter_commands() {
        let f = parse_filter("udp", &KeyFilter::default()).unwrap();
        assert_eq!(f.proto, Some(17));
        let f = parse_filter("port 53", &f).unwrap();
        assert_eq!((f.proto, f.port), (Some(17), Some(53)));
        let f = parse_filter("src 10.0.0.0/8", &f).unwrap();
        assert!(f.src.is_some());
        assert_eq!(parse_filter("clear", &f).unwrap(), KeyFilter::default());
        assert!(parse_filter("port x", &f).unwrap_err().contains("not a port"));
        assert!(parse_filter("frobnicate", &f).unwrap_err().contains("unknown filter"));
    }

    #[test]
    fn modes_cycle_through_all() {
        let mut m = KeyMode::DstPort;
        for _ in 0..7 {
            m = next_mode(m);
        }
        assert_eq!(m, KeyMode::DstPort);
    }
}
