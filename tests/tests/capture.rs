//! `ctguard capture` as a load test runs it: real programs, real packets
//! through real conntrack in a lab, the bundle checked against the kernel.
//!
//! 1. A flood that fills a small table fires `table_full[b]>0`; the bundle's
//!    pcapng (read with pcap-file, and with tshark when installed) holds
//!    exactly the dropped packets events.jsonl records, which match the
//!    kernel's drop counter; ruleset drops sent a second before the flood
//!    are in the pre-trigger part.
//! 2. A quiet run fires nothing and exits 0; a wrapped command's status is
//!    propagated when nothing fired (`exit 7` -> 7, killed by SIGKILL -> 137).
//! 3. A wrapped command during which the table overflows makes capture exit
//!    3, after finishing the post window.
//! 4. Re-arming: with --max-captures 2 and a cooldown, two floods make two
//!    bundles.
use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc::{Receiver, channel},
    },
    time::{Duration, Instant},
};

use ctguard::capture::pcapng;
use ctguard_integration::{Lab, MaxGuard, bin::ctguard_bin, lab::Side, max};

const MAX: u64 = 50;
const FLOWS: u64 = 300;
const RULESET_DROPS: u64 = 5;
const FLOOD_PORT: u16 = 5353;
const DROP_PORT: u16 = 9999;

/// A scratch directory removed at drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ctguard-capture-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn bundles_dir(&self) -> PathBuf {
        self.0.join("bundles")
    }

    /// The capture-* directories written, sorted by name.
    fn bundles(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.bundles_dir()) else { return vec![] };
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `ctguard capture`, its stderr read line by line.
struct Running {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(ctguard_bin())
            .arg("capture")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ctguard capture");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let r = Running { child, lines: rx, log, started: Instant::now() };
        r.wait_line("capture armed", Duration::from_secs(60));
        r
    }

    fn stderr(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a stderr line containing `needle`.
    fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => {
                    panic!("no stderr line with `{needle}` within {timeout:?}; stderr so far:\n{}", self.stderr())
                }
            }
        }
    }

    /// Waits for the exit; returns (code, stderr, stdout, seconds since start).
    fn finish(mut self, timeout: Duration) -> (Option<i32>, String, String, f64) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("ctguard capture did not exit within {timeout:?}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut stdout = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            use std::io::Read;
            let _ = o.read_to_string(&mut stdout);
        }
        // Let the reader thread catch the last lines.
        std::thread::sleep(Duration::from_millis(100));
        (status.code(), self.stderr(), stdout, elapsed)
    }
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display())))
        .collect()
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Floods the lab's receiver past a table of MAX entries; returns the
/// kernel's drop-counter delta (nf_conntrack_max restored before returning).
fn overflow(lab: &Lab, flows: u64) -> u64 {
    let before = lab.kernel_stats();
    let original = {
        let guard = MaxGuard::lower(MAX);
        lab.send_udp_flows(flows, &[FLOOD_PORT]);
        guard.original()
    };
    assert_eq!(max::read_max(), original, "nf_conntrack_max restored");
    lab.kernel_stats()["drop"] - before["drop"]
}

#[test]
fn a_table_full_flood_fires_and_the_bundle_holds_exactly_the_dropped_packets() {
    let lab = Lab::new("capture-full");
    lab.enable_conntrack();
    lab.add_nft_rule(&format!("udp dport {DROP_PORT} drop"));
    let inode = lab.netns_inode(Side::B);
    let scratch = Scratch::new("full");
    let dir = scratch.bundles_dir();
    let trigger = format!("table_full[{}]>0", lab.name(Side::B));
    let run = Running::start(&[
        "--trigger",
        &trigger,
        "--pre",
        "10s",
        "--post",
        "3s",
        "--interval",
        "500ms",
        "--duration",
        "60s",
        "--dir",
        dir.to_str().unwrap(),
    ]);

    let before = lab.kernel_stats();
    lab.send_udp_flows(RULESET_DROPS, &[DROP_PORT]);
    std::thread::sleep(Duration::from_secs(1));
    let kernel_drops = overflow(&lab, FLOWS);
    let after = lab.kernel_stats();
    assert!(kernel_drops >= FLOWS - MAX - 5, "the flood overflowed the table: {kernel_drops} drops");
    let (code, stderr, stdout, _) = run.finish(Duration::from_secs(60));
    assert_eq!(code, Some(3), "a trigger fired: exit 3\n{stderr}");
    assert!(stdout.is_empty(), "capture prints on stderr only: {stdout}");
    assert!(stderr.contains(&format!("trigger `{trigger}` fired")), "{stderr}");

    let bundles = scratch.bundles();
    assert_eq!(bundles.len(), 1, "one capture (--max-captures 1): {bundles:?}");
    let b = &bundles[0];
    let name = b.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("capture-") && name.ends_with("-1"), "{name}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(b), 0o700);
    for f in
        ["summary.md", "summary.json", "drops.pcapng", "events.jsonl", "stats.jsonl", "top.json", "recommendation.json"]
    {
        assert_eq!(mode(&b.join(f)), 0o600, "{f}");
    }

    // events.jsonl: the lab's drops, by cause, with the pre-trigger ones.
    let events = json_lines(&b.join("events.jsonl"));
    let drops: Vec<&serde_json::Value> = events.iter().filter(|e| e["kind"] == "drop").collect();
    let ours: Vec<&serde_json::Value> = drops.iter().copied().filter(|e| e["netns"] == inode).collect();
    let count = |cause: &str| ours.iter().filter(|e| e["cause"] == cause).count() as u64;
    assert_eq!(
        count("table_full"),
        kernel_drops,
        "one table_full event per kernel drop (the whole flood is in the window)"
    );
    assert_eq!(count("ruleset"), RULESET_DROPS);
    assert_eq!(ours.len() as u64, kernel_drops + RULESET_DROPS, "nothing else dropped in the lab");
    assert_eq!(after["drop"] - before["drop"], kernel_drops);
    for e in ours.iter().filter(|e| e["cause"] == "ruleset") {
        assert_eq!(e["phase"], "pre", "the ruleset drops came a second before the trigger: {e}");
        assert!(e["rel_trigger_s"].as_f64().unwrap() < -0.5, "{e}");
        assert_eq!(e["flow"]["dport"], DROP_PORT);
        assert!(e["location_symbol"].as_str().unwrap_or("").starts_with("nft_do_chain"), "{e}");
    }
    for e in ours.iter().filter(|e| e["cause"] == "table_full") {
        assert_eq!(e["flow"]["dport"], FLOOD_PORT);
        assert_eq!(e["netns_label"], lab.name(Side::B));
        assert_eq!(e["wire_len"], 36);
        assert_eq!(e["captured_len"], 28, "headers only");
    }

    // drops.pcapng: exactly the drop events, in order, same bytes and times.
    let packets = pcapng::read_packets(&b.join("drops.pcapng")).expect("pcap-file reads the bundle");
    assert_eq!(packets.len(), drops.len(), "one packet per drop event");
    for (i, (p, e)) in packets.iter().zip(&drops).enumerate() {
        assert_eq!(e["pcap_frame"], i as u64 + 1);
        assert_eq!(p.linktype, pcapng::LINKTYPE_RAW);
        assert_eq!(p.time_unix_ns, e["time_unix_ns"].as_u64().unwrap(), "frame {}", i + 1);
        let c = p.comment.as_deref().expect("every packet has a comment");
        assert!(c.contains(&format!("cause={} ", e["cause"].as_str().unwrap())), "{c}");
        assert!(c.contains(&format!("netns={}", e["netns"])), "{c}");
        assert!(c.contains("confidence=") && c.contains("location="), "{c}");
        if e["netns"] == inode {
            assert_eq!(p.original_len, 36);
            assert_eq!(p.data.len(), 28, "IPv4 and UDP headers only: no --snap-bytes, no payload");
            assert_eq!(p.data[0], 0x45, "an IPv4 header");
            assert_eq!(p.data[9], 17, "UDP");
            assert_eq!(u16::from_be_bytes([p.data[22], p.data[23]]), e["flow"]["dport"].as_u64().unwrap() as u16);
        }
    }
    let in_lab =
        packets.iter().filter(|p| p.comment.as_deref().unwrap_or("").contains(&format!("netns={inode} "))).count();
    assert_eq!(in_lab as u64, kernel_drops + RULESET_DROPS);
    // The wall clock: the packets are from the last minute.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(packets.iter().all(|p| p.time_unix_ns < now && p.time_unix_ns > now - 120_000_000_000));

    // tshark, when installed, reads it too.
    if let Ok(out) = Command::new("tshark")
        .args([
            "-r",
            b.join("drops.pcapng").to_str().unwrap(),
            "-T",
            "fields",
            "-e",
            "frame.comment",
            "-e",
            "udp.dstport",
        ])
        .output()
    {
        assert!(out.status.success(), "tshark -r failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), packets.len(), "tshark sees every packet");
        let full =
            text.lines().filter(|l| l.contains("cause=table_full") && l.ends_with(&FLOOD_PORT.to_string())).count()
                as u64;
        assert!(full >= kernel_drops, "tshark decodes the UDP headers: {full}");
    } else {
        eprintln!("tshark not installed: pcapng checked with pcap-file only");
    }

    // summary.json: what fired, the counts, nothing lost.
    let s = json_file(&b.join("summary.json"));
    assert_eq!(s["schema"], "ctguard.capture.summary.v1");
    assert_eq!(s["trigger"]["expression"], trigger.as_str());
    assert_eq!(s["trigger"]["netns"], inode);
    assert!(s["trigger"]["value"].as_f64().unwrap() >= 1.0, "{s}");
    assert_eq!(s["events"]["drops"], drops.len());
    assert_eq!(s["events"]["packets_in_pcapng"], packets.len());
    assert_eq!(s["events"]["lost_by_ring_buffer"], 0);
    assert_eq!(s["events"]["discarded_by_pre_max_events"], 0);
    assert_eq!(s["events"]["complete"], true);
    assert_eq!(s["window"]["cut_short"], false);
    let row =
        s["drops_by_cause"].as_array().unwrap().iter().find(|r| r["cause"] == "table_full").expect("table_full row");
    assert!(row["kernel"].as_u64().unwrap() >= kernel_drops, "{row}");
    assert!(row["events"].as_u64().unwrap() >= kernel_drops, "{row}");
    let offender = &s["top_offenders"][0];
    assert_eq!(offender["key"], format!("{FLOOD_PORT}/udp"), "{s}");
    assert_eq!(offender["netns"], inode);
    assert!(
        s["suggestions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["title"].as_str().unwrap().starts_with("Raise nf_conntrack_max")),
        "{s}"
    );
    let md = std::fs::read_to_string(b.join("summary.md")).unwrap();
    assert!(md.starts_with(&format!("# ctguard capture 1: `{trigger}` fired")), "{md}");
    assert!(md.contains("## Suggested fix") && md.contains("## Top offenders"), "{md}");

    // stats.jsonl and top.json.
    let stats = json_lines(&b.join("stats.jsonl"));
    assert!(stats.len() >= 3, "snapshots every 500ms over the window: {}", stats.len());
    assert!(stats.iter().all(|l| l["schema"] == "ctguard.capture.stats.v1" && l["rates"].is_object()));
    let stat_drops: u64 = stats.iter().filter_map(|l| l["counts"]["drops"]["table_full"].as_u64()).sum();
    assert!(stat_drops >= kernel_drops, "the snapshots cover the flood: {stat_drops}");
    let top = json_file(&b.join("top.json"));
    let keys = top["since_armed"]["by_inserts"].as_array().unwrap();
    assert!(keys.iter().any(|k| k["key"] == format!("{FLOOD_PORT}/udp")), "{top}");
    let rec = json_file(&b.join("recommendation.json"));
    assert!(rec["schema"].as_str().is_some(), "{rec}");

    // The bundle feeds the other commands afterwards: recommend and bypass
    // suggest read its stats.jsonl when given the directory.
    let run_json = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(ctguard_bin()).args(args).output().unwrap();
        assert!(out.status.code().is_some_and(|c| c <= 1), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e})"))
    };
    let bundle = b.to_str().unwrap();
    let rec = run_json(&["recommend", "--from-top", bundle, "--json"]);
    let obs = &rec["observation"];
    assert!(obs["source"].as_str().unwrap().contains("stats.jsonl"), "{obs}");
    assert!(obs["total_new"].as_f64().unwrap() >= MAX as f64, "the flood's new entries: {obs}");
    let ports = obs["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["port"] == FLOOD_PORT && p["proto"] == 17), "{obs}");
    let suggest = run_json(&["bypass", "suggest", "--from-top", bundle, "--json"]);
    assert!(suggest.to_string().contains(&format!("--port {FLOOD_PORT}")), "{suggest}");
}

#[test]
fn a_quiet_run_fires_nothing_and_exit_statuses_are_propagated() {
    let lab = Lab::new("capture-quiet");
    lab.enable_conntrack();
    let scratch = Scratch::new("quiet");
    let dir = scratch.bundles_dir();
    let trigger = format!("table_full[{}]>0", lab.name(Side::B));
    let base = [
        "--trigger",
        trigger.as_str(),
        "--trigger",
        "early_drop/s>1000000",
        "--dir",
        dir.to_str().unwrap(),
        "--interval",
        "200ms",
    ];

    let run = Running::start(&base.iter().copied().chain(["--duration", "2s"]).collect::<Vec<_>>());
    lab.send_udp_flows(20, &[FLOOD_PORT]); // tracked, nothing dropped
    let (code, stderr, _, elapsed) = run.finish(Duration::from_secs(90));
    assert_eq!(code, Some(0), "nothing fired: exit 0\n{stderr}");
    assert!(stderr.contains("no trigger fired"), "{stderr}");
    // Generous: loading the programs takes seconds under an emulated CPU (vm tier).
    let bound = if std::env::var_os("CTGUARD_VM_KERNEL").is_some() { 90.0 } else { 15.0 };
    assert!(elapsed < bound, "--duration 2s bounds the run: {elapsed}s");
    assert!(!dir.exists(), "no bundle directory without a trigger");

    let run = Running::start(&base.iter().copied().chain(["--", "sh", "-c", "exit 7"]).collect::<Vec<_>>());
    let (code, stderr, _, _) = run.finish(Duration::from_secs(90));
    assert_eq!(code, Some(7), "the wrapped command's status\n{stderr}");
    assert!(stderr.contains("the command exited with 7"), "{stderr}");

    let run = Running::start(&base.iter().copied().chain(["--", "sh", "-c", "kill -KILL $$"]).collect::<Vec<_>>());
    let (code, stderr, _, _) = run.finish(Duration::from_secs(90));
    assert_eq!(code, Some(137), "128 + SIGKILL\n{stderr}");

    // --duration shorter than the command: it is stopped (SIGTERM -> 143).
    let run =
        Running::start(&base.iter().copied().chain(["--duration", "1s", "--", "sleep", "30"]).collect::<Vec<_>>());
    let (code, stderr, _, _) = run.finish(Duration::from_secs(90));
    // 143 = 128 + SIGTERM: ctguard stopped it (a `sleep 30` that ended on
    // its own would exit 0). Wall time says nothing here: loading the
    // programs alone can take half a minute on an emulated CPU.
    assert_eq!(code, Some(143), "the bound stops the command\n{stderr}");
    assert!(!dir.exists());
}

#[test]
fn a_wrapped_load_test_that_overflows_the_table_exits_3() {
    let lab = Lab::new("capture-wrap");
    lab.enable_conntrack();
    let inode = lab.netns_inode(Side::B);
    let scratch = Scratch::new("wrap");
    let dir = scratch.bundles_dir();
    let trigger = format!("table_full[{inode}]>0");
    let run = Running::start(&[
        "--trigger",
        "fill>99.9", // the lowered max may or may not be sampled; table_full is sure to fire
        "--trigger",
        &trigger,
        "--post",
        "4s",
        "--interval",
        "500ms",
        "--snap-bytes",
        "64",
        "--dir",
        dir.to_str().unwrap(),
        "--",
        "sleep",
        "3",
    ]);
    let t0 = Instant::now();
    let kernel_drops = overflow(&lab, FLOWS);
    assert!(kernel_drops > 0);
    let fired = run.wait_line("fired", Duration::from_secs(10));
    let fired_after = t0.elapsed();
    let (code, stderr, _, elapsed) = run.finish(Duration::from_secs(60));
    assert_eq!(code, Some(3), "a trigger fired during the command: exit 3\n{stderr}");
    assert!(stderr.contains("the command exited with 0"), "{stderr}");
    // The post window (4 s from the trigger) ran to its end after `sleep 3` exited.
    assert!(
        elapsed >= fired_after.as_secs_f64() + 3.5,
        "post window finished: fired at {fired_after:?}, exited after {elapsed}s\n{fired}"
    );
    let bundles = scratch.bundles();
    assert_eq!(bundles.len(), 1, "{bundles:?}");
    let s = json_file(&bundles[0].join("summary.json"));
    assert_eq!(s["command"]["argv"], serde_json::json!(["sleep", "3"]));
    assert_eq!(s["command"]["status"], "exited with 0");
    assert_eq!(s["window"]["cut_short"], false);
    assert_eq!(s["window"]["closed_because"], "the post-trigger window ended");
    let events = json_lines(&bundles[0].join("events.jsonl"));
    let full = events.iter().filter(|e| e["netns"] == inode && e["cause"] == "table_full").count() as u64;
    assert_eq!(full, kernel_drops, "every drop of the flood is in the bundle");
    // --snap-bytes 64 opts into payload: the whole 36-byte packets are kept.
    let packets = pcapng::read_packets(&bundles[0].join("drops.pcapng")).expect("pcap-file reads the bundle");
    let lab_packets: Vec<_> =
        packets.iter().filter(|p| p.comment.as_deref().unwrap_or("").contains(&format!("netns={inode} "))).collect();
    assert_eq!(lab_packets.len() as u64, kernel_drops);
    assert!(lab_packets.iter().all(|p| p.data.len() == 36 && p.original_len == 36), "headers and payload kept");
    let md = std::fs::read_to_string(bundles[0].join("summary.md")).unwrap();
    assert!(md.contains("**Wrapped command**: `sleep 3` (exited with 0)"), "{md}");
}

#[test]
fn triggers_rearm_after_the_cooldown_up_to_max_captures() {
    let lab = Lab::new("capture-rearm");
    lab.enable_conntrack();
    let scratch = Scratch::new("rearm");
    let dir = scratch.bundles_dir();
    let trigger = format!("table_full[{}]>0", lab.name(Side::B));
    let run = Running::start(&[
        "--trigger",
        &trigger,
        "--pre",
        "2s",
        "--post",
        "1s",
        "--cooldown",
        "1s",
        "--max-captures",
        "2",
        "--interval",
        "250ms",
        "--duration",
        "60s",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let first = overflow(&lab, FLOWS);
    run.wait_line("capture 1 written", Duration::from_secs(20));
    run.wait_line("re-armed", Duration::from_secs(20));
    // The first flood's entries still fill the table: this one drops everything.
    let second = overflow(&lab, 100);
    run.wait_line("capture 2 written", Duration::from_secs(20));
    let (code, stderr, _, _) = run.finish(Duration::from_secs(90));
    assert_eq!(code, Some(3), "{stderr}");
    let bundles = scratch.bundles();
    assert_eq!(bundles.len(), 2, "{bundles:?}");
    let inode = lab.netns_inode(Side::B);
    for (b, expected, n) in [(&bundles[0], first, 1), (&bundles[1], second, 2)] {
        let name = b.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with(&format!("-{n}")), "{name}");
        let full = json_lines(&b.join("events.jsonl"))
            .iter()
            .filter(|e| e["netns"] == inode && e["cause"] == "table_full")
            .count() as u64;
        assert_eq!(full, expected, "capture {n} holds its own flood only");
        let s = json_file(&b.join("summary.json"));
        assert_eq!(s["capture"], n);
    }
}
