//! `ctguard trace` as a user runs it: a flood fills a small table while
//! trace streams JSON lines; the drops are attributed and the summary agrees
//! with the kernel's own counter.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use ctguard_integration::{Lab, MaxGuard, bin::ctguard_bin, lab::Side};

/// Starts `ctguard trace ARGS` and returns once the sensors are attached
/// (its first stderr line), with the rest of stderr still to read.
fn start_trace(args: &[&str]) -> (std::process::Child, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(ctguard_bin())
        .arg("trace")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ctguard trace");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("tracing"), "unexpected first stderr line: {line}");
    (child, stderr)
}

#[test]
fn trace_json_shows_table_full_drops_during_a_flood() {
    let lab = Lab::new("trace_cli");
    lab.enable_conntrack();
    lab.add_nft_rule("udp dport 9999 drop");
    let inode = lab.netns_inode(Side::B).to_string();
    let (child, _stderr) = start_trace(&["--json", "--netns", &inode, "--duration", "8"]);

    let before = lab.kernel_stats();
    {
        let _max = MaxGuard::lower(50);
        lab.send_udp_flows(300, &[5353]);
    }
    lab.send_udp_flows(20, &[9999]);
    let after = lab.kernel_stats();
    let out = child.wait_with_output().expect("trace exits after --duration");
    assert!(out.status.success(), "trace failed: {}", String::from_utf8_lossy(&out.stderr));

    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let (summary, events) = lines.split_last().expect("at least the summary");
    assert_eq!(summary["summary"], true);
    let kernel_drops = after["drop"] - before["drop"];
    assert!(kernel_drops > 100);
    let table_full = events.iter().filter(|e| e["cause"] == "table_full").count() as u64;
    let ruleset = events.iter().filter(|e| e["cause"] == "ruleset").count() as u64;
    assert_eq!(table_full, kernel_drops, "one table_full event per kernel drop");
    assert_eq!(ruleset, 20);
    for e in events.iter().filter(|e| e["cause"] == "table_full") {
        assert_eq!(e["flow"]["dport"], 5353);
        assert_eq!(e["netns"].as_u64(), Some(inode.parse().unwrap()));
        assert!(e["location_symbol"].as_str().unwrap_or("").starts_with("nf_hook_slow"), "{e}");
    }
    for e in events.iter().filter(|e| e["cause"] == "ruleset") {
        assert_eq!(e["flow"]["dport"], 9999);
        assert!(e["location_symbol"].as_str().unwrap_or("").starts_with("nft_do_chain"), "{e}");
    }
    assert_eq!(summary["drops"]["table_full"], kernel_drops);
    assert_eq!(summary["drops"]["ruleset"], 20);
    assert_eq!(summary["events_lost"], 0);
    let inode_num: u64 = inode.parse().unwrap();
    let rec = summary["reconciliation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["netns"].as_u64() == Some(inode_num))
        .unwrap_or_else(|| panic!("no reconciliation row for netns {inode}: {summary}"));
    assert_eq!(rec["kernel_drop"], kernel_drops);
    assert_eq!(rec["exact"], true, "{rec}");
}

#[test]
fn iptables_legacy_drops_of_new_flows_are_reconciled_to_ruleset() {
    // An iptables-legacy rule drops new flows in nf_hook_slow with their
    // unconfirmed entry attached: at kfree_skb that looks like a failed
    // confirm. The kernel's insert_failed counter does not rise, and the
    // summary's reconciliation says what it was.
    const FLOWS: u64 = 40;
    let lab = Lab::new("trace_ipt");
    lab.enable_conntrack();
    // Stock kernels build the filter table as a module the kernel does not
    // always load on demand; here it is built in (modprobe fails harmlessly).
    let _ = Command::new("modprobe").arg("iptable_filter").output();
    lab.exec(Side::B, &["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "7777", "-j", "DROP"]);
    let inode: u64 = lab.netns_inode(Side::B).into();
    let (child, _stderr) = start_trace(&["--json", "--netns", &inode.to_string(), "--duration", "6"]);
    let before = lab.kernel_stats();
    lab.send_udp_flows(FLOWS, &[7777]);
    let after = lab.kernel_stats();
    let out = child.wait_with_output().expect("trace exits after --duration");
    assert!(out.status.success(), "trace failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(after["insert_failed"] - before["insert_failed"], 0, "no confirm failed");
    assert_eq!(after["drop"] - before["drop"], 0, "conntrack refused nothing");

    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (summary, events) = lines.split_last().expect("at least the summary");
    // What the kernel programs could see at the drop:
    assert_eq!(events.iter().filter(|e| e["flow"]["dport"] == 7777).count() as u64, FLOWS);
    assert!(events.iter().all(|e| e["cause"] == "insert_failed"), "{events:?}");
    let rec = summary["reconciliation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["netns"].as_u64() == Some(inode))
        .unwrap_or_else(|| panic!("no reconciliation row for netns {inode}: {summary}"));
    assert_eq!(rec["moved_to_ruleset"]["insert_failed"], FLOWS, "{rec}");
    assert_eq!(rec["reconciled"], serde_json::json!({ "ruleset": FLOWS }), "{rec}");
    assert_eq!(rec["exact"], true, "{rec}");
}

#[test]
fn trace_streams_new_entries_as_text_stops_on_ctrl_c_and_detaches() {
    const FLOWS: usize = 30;
    let lab = Lab::new("trace_new");
    lab.enable_conntrack();
    let inode = lab.netns_inode(Side::B).to_string();
    let (child, mut stderr) = start_trace(&["--new", "--netns", &inode]);
    lab.send_udp_flows(FLOWS as u64, &[6100]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    // Ctrl-C, as a user stops it.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("trace exits on SIGINT");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "Ctrl-C is a normal stop: {:?}\n{stdout}", out.status);
    let new_lines: Vec<&str> = stdout.lines().filter(|l| l.contains(" NEW ") && l.contains(":6100 ")).collect();
    assert_eq!(new_lines.len(), FLOWS, "one NEW line per flow:\n{stdout}");
    assert!(new_lines.iter().all(|l| l.contains("udp")), "{new_lines:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    // The text summary goes to stderr, so stdout stays one line per event.
    assert!(rest.contains("--- ctguard trace summary"), "the summary at exit:\n{rest}");
    assert!(rest.contains("events shown 30, read ") && rest.contains("lost by the ring buffer 0"), "{rest}");
    // Nothing of ctguard stays in the kernel once it has exited (the kernel
    // frees a program after an RCU grace period: allow it a moment).
    let ours = || -> Vec<String> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| p.name_as_str().map(str::to_string))
            .filter(|n| n.starts_with("ctg_") || n.starts_with("fh_"))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ours().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ours().is_empty(), "programs still loaded 10 s after exit: {:?}", ours());
}
