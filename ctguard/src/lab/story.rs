//! The `ctguard lab` demonstration, act by act: build a throw-away network,
//! shrink the table, flood it, show ctguard catching and explaining every
//! drop, ask for a recommendation, apply a bypass and show the drops gone.
use std::{
    io::{BufRead, IsTerminal, Write},
    process::{Command, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{LabArgs, env::LabNet, max_guard::MaxGuard};
use crate::{
    conntrack::{self, ConntrackView},
    flood::{self, FlowSpec, Proto, SendOptions},
    sensors::{KeyMode, SensorOptions, snapshot::Cause},
    top::{
        batch::Document,
        model::{self, FrameOptions, KeyFilter, Sample, SortBy},
        sampler::Sampler,
    },
};

/// Set by SIGINT/SIGTERM: every loop checks it, then the guards clean up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn stopped() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted: cleaning up (namespaces deleted, nf_conntrack_max restored)");
    }
    Ok(())
}

struct Narrator {
    script: bool,
}

impl Narrator {
    fn act(&self, n: u32, title: &str) {
        println!("\n[{n}/6] {title}");
    }
    fn say(&self, text: impl AsRef<str>) {
        println!("      {}", text.as_ref());
    }
    /// In a terminal (and not --script), waits for Enter between acts, or
    /// for Ctrl-C / SIGTERM (the caller then checks [`stopped`]). It polls
    /// rather than blocking in `read_line`, which retries after a signal and
    /// would keep the lab waiting for Enter after Ctrl-C.
    fn pause(&self) {
        if self.script || !std::io::stdin().is_terminal() {
            return;
        }
        print!("      (Enter to continue) ");
        let _ = std::io::stdout().flush();
        let mut stdin = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
        while !STOP.load(Ordering::Relaxed) {
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut stdin, 1, 200) };
            if ready > 0 {
                let _ = std::io::stdin().lock().read_line(&mut String::new());
                return;
            }
            if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        }
        println!();
    }
}

/// What one flood produced, as ctguard and the kernel saw it.
struct Round {
    sent: u64,
    rate: f64,
    ctguard_table_full: u64,
    kernel_drop: u64,
    new_entries: u64,
    top: Vec<model::KeyRow>,
    /// Length of the round: per-key counts are its rates times this.
    interval_s: f64,
}

pub fn run(args: &LabArgs) -> anyhow::Result<ExitCode> {
    crate::kernel::system::require_bpf_caps()?;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let n = Narrator { script: args.script };
    println!("ctguard lab: a throw-away conntrack lab (everything is undone at exit, also on Ctrl-C)");
    if let Some(v) = super::max_guard::restore_stale()? {
        n.say(format!("restored nf_conntrack_max={v} left lowered by a killed lab"));
    }
    for ns in super::env::remove_stale_namespaces() {
        n.say(format!("removed namespace {ns} left by a killed lab"));
    }

    n.act(1, "network");
    let net = LabNet::create()?;
    let server = net.server_netns()?;
    n.say(format!("{} ({}) --veth--> {} ({})", net.client, net.client_addr, net.server, net.server_addr));
    n.say("the server tracks connections: nft `ct state new counter` in its prerouting chain");

    n.act(2, "a small conntrack table");
    let guard = MaxGuard::lower(args.max)?;
    n.say(format!("nf_conntrack_max {} -> {} (global; restored at exit)", guard.original(), args.max));
    n.pause();
    stopped()?;

    n.act(3, "ctguard's sensors");
    let opts = SensorOptions {
        key_mode: KeyMode::DstPort,
        emit_drop_events: false,
        backend: args.backend,
        ..Default::default()
    };
    let mut sampler = Sampler::start(&opts, Some(server.inode))?;
    n.say(format!(
        "attached ({:?} backend); they count every new entry and every drop in the kernel",
        sampler.backend()
    ));

    n.act(4, "load test: many short-lived UDP flows, most of them to one port");
    let ports = weighted_ports(args.hot_port, &[80, 443]);
    let top_file = std::env::temp_dir().join(format!("ctguard-lab-{}-top.jsonl", std::process::id()));
    let first = flood_round(&n, args, &net, &mut sampler, &ports, 0, &top_file)?;
    report_round(&n, &first, args.hot_port);
    let exact = first.ctguard_table_full == first.kernel_drop;
    n.pause();
    stopped()?;

    n.act(5, "what ctguard recommends");
    let me = std::env::current_exe().context("cannot locate the ctguard binary")?;
    let top_arg = top_file.display().to_string();
    run_ctguard(&n, &me, &["recommend", "--from-top", &top_arg])?;
    n.pause();
    stopped()?;

    n.act(6, format!("the fix: exempt {}/udp from tracking, then the same load again", args.hot_port).as_str());
    let port = args.hot_port.to_string();
    run_ctguard(&n, &me, &["bypass", "add", "--netns", &net.server, "--port", &port, "--proto", "udp"])?;
    n.say(format!("$ ip netns exec {} conntrack -F   (as if the first round's entries had expired)", net.server));
    let flushed = Command::new("ip").args(["netns", "exec", &net.server, "conntrack", "-F"]).output()?;
    if !flushed.status.success() {
        anyhow::bail!("conntrack -F failed: {}", String::from_utf8_lossy(&flushed.stderr).trim());
    }
    let second = flood_round(&n, args, &net, &mut sampler, &ports, first.sent, &top_file)?;
    report_round(&n, &second, args.hot_port);
    run_ctguard(&n, &me, &["bypass", "list", "--netns", &net.server])?;
    let _ = std::fs::remove_file(&top_file);

    println!("\nsummary");
    n.say(format!(
        "before the fix: {} of {} flows dropped (table full); ctguard {} the kernel's drop counter ({} vs {})",
        first.kernel_drop,
        first.sent,
        if exact { "matched" } else { "DID NOT MATCH" },
        first.ctguard_table_full,
        first.kernel_drop
    ));
    n.say(format!(
        "after bypassing {}/udp: {} of {} flows dropped, {} new entries (only the other ports are tracked)",
        args.hot_port, second.kernel_drop, second.sent, second.new_entries
    ));
    if second.kernel_drop > 0 {
        n.say("the other ports alone still overflow this table: size it as `ctguard recommend` says (act 5)");
    }
    drop(sampler);
    drop(guard);
    drop(net);
    n.say("cleaned up: namespaces deleted, nf_conntrack_max restored");
    Ok(if exact && second.ctguard_table_full == second.kernel_drop { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Destination ports with the hot port three times as often as the others.
fn weighted_ports(hot: u16, others: &[u16]) -> Vec<u16> {
    let mut ports = vec![hot; 3 * others.len()];
    ports.extend_from_slice(others);
    ports
}

fn kernel_drop(server: &crate::netns::Netns) -> anyhow::Result<u64> {
    match conntrack::read_netns(server)? {
        ConntrackView::Active(t) => Ok(t.stats.summed().get("drop").unwrap_or(0)),
        ConntrackView::NotActive { reason } => anyhow::bail!("conntrack is not active in the lab server: {reason}"),
    }
}

fn flood_round(
    n: &Narrator,
    args: &LabArgs,
    net: &LabNet,
    sampler: &mut Sampler,
    ports: &[u16],
    first_flow: u64,
    top_file: &std::path::Path,
) -> anyhow::Result<Round> {
    let server = net.server_netns()?;
    let client = net.client_netns()?;
    let spec = FlowSpec::new(Proto::Udp, net.client_addr, net.server_addr, ports.to_vec()).with_src_prefix(24);
    let drop0 = kernel_drop(&server)?;
    let start = sampler.sample()?;
    let mut prev = start.clone();
    let mut top_out = std::fs::OpenOptions::new().create(true).append(true).open(top_file)?;

    let done = Arc::new(AtomicBool::new(false));
    let flows = args.flows;
    let rate = (args.rate > 0).then_some(args.rate);
    let sender = {
        let done = done.clone();
        std::thread::spawn(move || {
            // Chunks, so Ctrl-C stops the flood within a fraction of a second.
            let mut sent = 0;
            let mut elapsed = Duration::ZERO;
            let mut result = Ok(());
            while sent < flows && !STOP.load(Ordering::Relaxed) {
                let chunk = (flows - sent).min(rate.unwrap_or(50_000).max(1) / 4 + 1);
                let opts = SendOptions { first_flow: first_flow + sent, rate, ..SendOptions::count(chunk) };
                match flood::send_flows(&client, &spec, &opts) {
                    Ok(r) => {
                        sent += r.sent;
                        elapsed += r.elapsed;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            done.store(true, Ordering::Relaxed);
            result.map(|()| (sent, elapsed))
        })
    };
    let filter = KeyFilter { netns: Some(server.inode), ..Default::default() };
    let fopts = FrameOptions { mode: KeyMode::DstPort, sort: SortBy::Inserts, top: 5, filter: &filter };
    let started = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        let cur = sampler.sample()?;
        progress(n, &model::frame(&prev, &cur, &fopts), started.elapsed(), &mut top_out)?;
        prev = cur;
    }
    let (sent, elapsed) = sender.join().map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    stopped()?;
    std::thread::sleep(Duration::from_millis(300)); // let the receiver finish
    let end = sampler.sample()?;
    progress(n, &model::frame(&prev, &end, &fopts), started.elapsed(), &mut top_out)?;
    let whole = model::frame(&start, &end, &FrameOptions { top: 5, ..fopts });
    let table_full =
        |s: &Sample| s.snapshot.drops_by_cause(Some(server.inode)).get(&Cause::TableFull).copied().unwrap_or(0);
    Ok(Round {
        sent,
        rate: sent as f64 / elapsed.as_secs_f64().max(1e-6),
        ctguard_table_full: table_full(&end) - table_full(&start),
        kernel_drop: kernel_drop(&server)? - drop0,
        new_entries: end.snapshot.inserts_in(Some(server.inode)) - start.snapshot.inserts_in(Some(server.inode)),
        top: whole.keys,
        interval_s: whole.interval_s,
    })
}

fn progress(n: &Narrator, f: &model::Frame, at: Duration, top_out: &mut std::fs::File) -> anyhow::Result<()> {
    writeln!(top_out, "{}", serde_json::to_string(&Document::new(f, KeyMode::DstPort))?)?;
    let t = f.tables.first();
    n.say(format!(
        "{:>5.1}s  entries {:>6}/{:<6} ({:>5.1}%)  new/s {:>8.0}  table_full/s {:>8.0}  events lost {}",
        at.as_secs_f64(),
        t.map_or(0, |t| t.entries),
        t.map_or(0, |t| t.max),
        t.map_or(0.0, |t| t.fill_percent),
        f.rates.new_per_s,
        f.rates.drops_per_s.get(&Cause::TableFull).copied().unwrap_or(0.0),
        f.events_lost
    ));
    Ok(())
}

fn report_round(n: &Narrator, r: &Round, hot: u16) {
    n.say(format!("sent {} new flows at {:.0}/s", r.sent, r.rate));
    let verdict = if r.ctguard_table_full == r.kernel_drop { "exact match" } else { "MISMATCH" };
    if r.ctguard_table_full == 0 && r.kernel_drop == 0 {
        n.say(format!("ctguard: no drops; kernel drop counter +0 -> {verdict}"));
    } else {
        n.say(format!(
            "ctguard: {} drops, cause table_full (\"nf_conntrack: table full, dropping packet\"); kernel drop counter +{} -> {verdict}",
            r.ctguard_table_full, r.kernel_drop
        ));
    }
    n.say(format!("new entries: {}", r.new_entries));
    for k in &r.top {
        let marker = if k.key.starts_with(&format!("{hot}/")) { "  <- the hot port" } else { "" };
        let count = |rate: f64| (rate * r.interval_s).round() as u64;
        n.say(format!(
            "  {:<12} {:>8} new entries ({:>5.1}%)  {:>8} dropped{marker}",
            k.key,
            count(k.inserts_per_s),
            k.share_percent,
            count(k.drops_per_s)
        ));
    }
}

/// Runs `ctguard ARGS` (this binary), printing the command and its output.
fn run_ctguard(n: &Narrator, me: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    n.say(format!("$ ctguard {}", args.join(" ")));
    let out = Command::new(me).args(args).output().with_context(|| format!("cannot run ctguard {}", args[0]))?;
    for line in String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
        n.say(format!("  {line}"));
    }
    // Exit 1 means "warnings printed" for these commands; 2 is an error.
    if out.status.code().is_none_or(|c| c >= 2) {
        anyhow::bail!("`ctguard {}` failed ({})", args.join(" "), out.status);
    }
    Ok(())
}
