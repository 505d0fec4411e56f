//! `ctguard bypass` against real nftables and real conntrack, in the lab's
//! network namespaces, through the ctguard binary (built fresh by the fixture).
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ctguard_integration::{Lab, Side, cmd};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn ctguard_bin() -> PathBuf {
    ctguard_integration::bin::ctguard_bin()
}

fn ctguard(args: &[&str]) -> Output {
    Command::new(ctguard_bin()).args(args).stdin(Stdio::null()).output().expect("run ctguard")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs ctguard and checks its exit code.
#[track_caller]
fn ctguard_expect(code: i32, args: &[&str]) -> Output {
    let o = ctguard(args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "ctguard {}\n--- stdout ---\n{}--- stderr ---\n{}",
        args.join(" "),
        out(&o),
        err(&o)
    );
    o
}

/// `ctguard bypass <args> --netns <side>`.
#[track_caller]
fn bypass(lab: &Lab, side: Side, code: i32, args: &[&str]) -> Output {
    let mut full = vec!["bypass"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--netns", lab.name(side)]);
    ctguard_expect(code, &full)
}

fn ruleset(lab: &Lab, side: Side) -> String {
    lab.nft(side, &["list", "ruleset"])
}

fn list_json(lab: &Lab, side: Side) -> Value {
    let o = bypass(lab, side, 0, &["list", "--json"]);
    serde_json::from_slice(&o.stdout).expect("list --json is JSON")
}

/// Packets of one rule (`chain`, `half`) of the only bypass listed.
fn rule_packets(list: &Value, chain: &str, half: &str) -> u64 {
    let rules = list["bypasses"][0]["rules"].as_array().expect("one bypass with rules");
    rules
        .iter()
        .find(|r| r["chain"] == chain && r["half"] == half)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no {chain}/{half} rule in {list}"))
}

/// Lines of `conntrack -L` in a side's namespace that mention `port`.
fn conntrack_entries_with_port(lab: &Lab, side: Side, port: u16) -> Vec<String> {
    let o = cmd::try_run("ip", &["netns", "exec", lab.name(side), "conntrack", "-L"]);
    assert!(o.status.success(), "conntrack -L failed: {}", String::from_utf8_lossy(&o.stderr));
    let needle = format!("port={port} ");
    String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains(&needle)).map(str::to_string).collect()
}

/// Loads the lab's conntrack ruleset into the sender too, so both ends track.
fn enable_conntrack_in_a(lab: &Lab) {
    lab.nft_script(Side::A, &ctguard_integration::nft::conntrack_ruleset());
}

/// Waits for every child process left (orphans re-parented to this
/// subreaper); returns when there are none.
fn reap_orphans() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child, with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid <= 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return; // ECHILD: none left
        }
    }
}

/// Tiny deterministic PRNG (xorshift64*), seeded from the clock and printed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// A UDP echo server bound in the side's namespace (the socket keeps its
/// namespace; the thread serving it does not need to be inside).
struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl UdpEcho {
    fn start(lab: &Lab, side: Side, port: u16) -> UdpEcho {
        let sock = lab
            .netns(side)
            .run(move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
            .expect("enter netns")
            .expect("bind udp echo");
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut echoed = 0;
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::SeqCst) {
                match sock.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        sock.send_to(&buf[..n], peer).expect("echo");
                        echoed += 1;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("udp echo: {e}"),
                }
            }
            echoed
        });
        UdpEcho { stop, thread: Some(thread) }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("echo thread")
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sends `n` UDP datagrams, each from a fresh socket (a new flow), from
/// the side's namespace to `dst`; returns how many echoes came back.
fn udp_exchanges(lab: &Lab, side: Side, dst: SocketAddr, n: usize) -> usize {
    lab.netns(side)
        .run(move || {
            let mut answered = 0;
            for i in 0..n {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind client");
                s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                s.connect(dst).expect("connect");
                s.send(format!("ping {i}").as_bytes()).expect("send");
                let mut buf = [0u8; 64];
                if s.recv(&mut buf).is_ok() {
                    answered += 1;
                }
            }
            answered
        })
        .expect("enter netns")
}

/// A TCP server in the side's namespace that echoes one message per connection.
fn tcp_echo(lab: &Lab, side: Side, port: u16) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let listener = lab
        .netns(side)
        .run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .expect("enter netns")
        .expect("bind tcp");
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 64];
                    if let Ok(n) = c.read(&mut buf) {
                        let _ = c.write_all(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    (stop, t)
}

/// Opens `n` TCP connections from the side's namespace, each sending a
/// message and reading the echo; returns how many round trips succeeded.
fn tcp_exchanges(lab: &Lab, side: Side, dst: SocketAddr, n: usize, timeout: Duration) -> usize {
    lab.netns(side)
        .run(move || {
            let mut ok = 0;
            for _ in 0..n {
                let Ok(mut s) = TcpStream::connect_timeout(&dst, timeout) else { continue };
                s.set_read_timeout(Some(timeout)).unwrap();
                let mut buf = [0u8; 16];
                if s.write_all(b"hello").is_ok() && s.read(&mut buf).is_ok_and(|n| n == 5) {
                    ok += 1;
                }
            }
            ok
        })
        .expect("enter netns")
}

/// The bypasses in `nft -j list ruleset` output, checked for consistency:
/// every rule of table inet ctguard is ctguard's, and each id has exactly
/// the four rules of a `--direction both` selector (one per chain and
/// direction, no duplicates). Returns the ids.
fn consistent_bypass_ids(json: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(json).expect("nft -j output");
    let mut by_id: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
    let mut chains = Vec::new();
    for item in v["nftables"].as_array().unwrap() {
        if let Some(c) = item.get("chain").filter(|c| c["table"] == "ctguard") {
            chains.push(c["name"].as_str().unwrap().to_string());
        }
        let Some(r) = item.get("rule").filter(|r| r["table"] == "ctguard") else { continue };
        let comment = r["comment"].as_str().unwrap_or_else(|| panic!("rule without comment: {r}"));
        let words: Vec<&str> = comment.split(' ').collect();
        assert_eq!(words[0], "ctguard", "{comment}");
        by_id
            .entry(words[1].to_string())
            .or_default()
            .push((r["chain"].as_str().unwrap().to_string(), words[2].to_string()));
    }
    let has_table =
        v["nftables"].as_array().unwrap().iter().any(|i| i.get("table").is_some_and(|t| t["name"] == "ctguard"));
    if has_table {
        chains.sort();
        assert_eq!(chains, ["output", "prerouting"], "table inet ctguard has chains {chains:?}");
    }
    for (id, mut rules) in by_id.clone() {
        rules.sort();
        let want: Vec<(String, String)> =
            [("output", "reply"), ("output", "request"), ("prerouting", "reply"), ("prerouting", "request")]
                .iter()
                .map(|(c, h)| (c.to_string(), h.to_string()))
                .collect();
        assert_eq!(rules, want, "bypass {id} is not complete: a partial transaction was applied");
    }
    by_id.into_keys().collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The core promise: after `bypass add --port P`, new flows to P make no
/// conntrack entries while other ports are still tracked, and the rule
/// counters show the bypassed packets.
#[test]
fn a_bypassed_port_creates_no_entries_and_its_counters_show_the_hits() {
    let lab = Lab::new("bypass_notrack");
    lab.enable_conntrack();
    let o = bypass(&lab, Side::B, 0, &["add", "--port", "5000"]);
    assert!(out(&o).contains("added bypass"), "{}", out(&o));

    let before = lab.conntrack_count();
    lab.send_udp_flows(200, &[5000]);
    lab.send_tcp_syns(100, &[5000]);
    assert_eq!(lab.conntrack_count(), before, "flows to the bypassed port made conntrack entries");
    assert!(conntrack_entries_with_port(&lab, Side::B, 5000).is_empty());

    lab.send_udp_flows(50, &[5001]);
    lab.send_tcp_syns(25, &[5001]);
    assert_eq!(lab.conntrack_count(), before + 75, "other ports must still be tracked");

    let list = list_json(&lab, Side::B);
    assert_eq!(list["bypasses"].as_array().unwrap().len(), 1);
    assert_eq!(list["bypasses"][0]["complete"], true);
    // Every flow is one packet in; each SYN to the closed port is answered
    // by one RST from port 5000, which the output/reply rule exempts.
    assert_eq!(rule_packets(&list, "prerouting", "request"), 300);
    assert_eq!(rule_packets(&list, "output", "reply"), 100);
    assert_eq!(rule_packets(&list, "prerouting", "reply"), 0);
    assert_eq!(rule_packets(&list, "output", "request"), 0);
    assert_eq!(list["bypasses"][0]["packets"], 400);
}

/// Both directions: the replies of bypassed flows are untracked too, at
/// both ends (conntrack runs in both namespaces here); a control port is
/// tracked; and `--direction in` alone lets the replies create entries.
#[test]
fn replies_of_bypassed_flows_are_untracked_in_both_namespaces() {
    let lab = Lab::new("bypass_replies");
    lab.enable_conntrack();
    enable_conntrack_in_a(&lab);
    let (bypassed, control) = (7000u16, 7001u16);
    for side in [Side::A, Side::B] {
        bypass(&lab, side, 0, &["add", "--port", &bypassed.to_string()]);
    }
    let b_addr = lab.addr(Side::B);

    // UDP with a reply.
    let echo = UdpEcho::start(&lab, Side::B, bypassed);
    let echo_control = UdpEcho::start(&lab, Side::B, control);
    assert_eq!(udp_exchanges(&lab, Side::A, (b_addr, bypassed).into(), 20), 20, "echoes over the bypassed port");
    assert_eq!(udp_exchanges(&lab, Side::A, (b_addr, control).into(), 5), 5);
    assert_eq!(echo.stop(), 20);
    echo_control.stop();

    // TCP: handshake, data and teardown, all untracked.
    let (stop, server) = tcp_echo(&lab, Side::B, bypassed);
    assert_eq!(tcp_exchanges(&lab, Side::A, (b_addr, bypassed).into(), 10, Duration::from_secs(2)), 10);
    stop.store(true, Ordering::SeqCst);
    server.join().unwrap();

    for side in [Side::A, Side::B] {
        let tracked = conntrack_entries_with_port(&lab, side, bypassed);
        assert!(tracked.is_empty(), "{side:?} tracked bypassed flows:\n{}", tracked.join("\n"));
        assert_eq!(
            conntrack_entries_with_port(&lab, side, control).len(),
            5,
            "{side:?}: the control port must be tracked"
        );
        let list = list_json(&lab, side);
        let (req, rep) = match side {
            // a sends the requests and receives the replies
            Side::A => (rule_packets(&list, "output", "request"), rule_packets(&list, "prerouting", "reply")),
            Side::B => (rule_packets(&list, "prerouting", "request"), rule_packets(&list, "output", "reply")),
        };
        assert!(req >= 20 + 10 * 3, "{side:?}: {req} request packets counted");
        assert!(rep >= 20 + 10 * 2, "{side:?}: {rep} reply packets counted");
    }

    // Only the requests exempt: b's replies create entries of their own.
    let o = bypass(&lab, Side::B, 0, &["remove", "--all"]);
    assert!(out(&o).contains("table inet ctguard deleted"));
    let o = bypass(&lab, Side::B, 1, &["add", "--port", &bypassed.to_string(), "--direction", "in"]);
    assert!(err(&o).contains("warning [one-direction]"), "{}", err(&o));
    let echo = UdpEcho::start(&lab, Side::B, bypassed);
    let before = lab.conntrack_count();
    assert_eq!(udp_exchanges(&lab, Side::A, (b_addr, bypassed).into(), 10), 10);
    echo.stop();
    lab.settle();
    assert_eq!(lab.conntrack_count(), before + 10, "each reply should have made an entry in b");
    assert_eq!(conntrack_entries_with_port(&lab, Side::B, bypassed).len(), 10);
}

/// An invalid selector changes nothing, and a transaction nft rejects
/// halfway (the kernel aborts the whole batch) leaves no trace either.
#[test]
fn invalid_selectors_and_failed_transactions_apply_nothing() {
    let lab = Lab::new("bypass_atomic");
    lab.enable_conntrack();
    bypass(&lab, Side::B, 0, &["add", "--port", "53", "--proto", "udp"]);
    let before = ruleset(&lab, Side::B);
    for bad in [
        &["--port", "70000"][..],
        &["--port", "80-70"],
        &["--proto", "icmp", "--port", "80"],
        &["--src", "10.0.0.0/8", "--dst", "fd00::/8"],
        &["--iface", "name with spaces", "--port", "80"],
        &["--proto", "tcp"],
    ] {
        let mut args = vec!["add"];
        args.extend_from_slice(bad);
        let o = bypass(&lab, Side::B, 2, &args);
        assert!(err(&o).starts_with("error: invalid selector: "), "{bad:?}: {}", err(&o));
        assert_eq!(ruleset(&lab, Side::B), before, "{bad:?} changed the ruleset");
    }

    // A table inet ctguard whose `output` chain hangs on the wrong hook:
    // the transaction creates chain prerouting, then fails on chain output.
    // nf_tables aborts the whole batch, so prerouting is not created either.
    let lab2 = Lab::new("bypass_abort");
    lab2.nft_script(
        Side::B,
        "table inet ctguard {\n\tchain output {\n\t\ttype filter hook input priority 0; policy accept;\n\t}\n}\n",
    );
    let before = ruleset(&lab2, Side::B);
    let o = bypass(&lab2, Side::B, 2, &["add", "--port", "80"]);
    assert!(err(&o).contains("error: nft: `nft -j -f -` failed"), "{}", err(&o));
    assert!(err(&o).contains("nothing was applied"), "{}", err(&o));
    assert_eq!(ruleset(&lab2, Side::B), before, "a failed transaction left changes behind");
}

/// Kill ctguard at random points of many add and remove runs: the table is
/// always in a state some complete run would have produced (every bypass
/// has all four rules or none), because each run is one nft transaction.
///
/// Why: ctguard writes the whole JSON document to `nft -j -f -`; nft parses
/// it completely before sending anything (a truncated document is invalid
/// JSON: nothing happens), then sends one netlink batch that nf_tables
/// commits or aborts as a unit -- a batch without its end message (nft
/// killed mid-send) is aborted by the kernel. ctguard's lock is an flock the
/// kernel releases when the process dies.
#[test]
fn killing_ctguard_mid_operation_leaves_the_old_or_the_new_ruleset() {
    let lab = Lab::new("bypass_kill");
    let ns = lab.name(Side::B).to_string();
    // Orphaned children of a killed ctguard (its nft) are re-parented to
    // this process, so the test can wait for them to finish.
    // SAFETY: prctl with constant arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let initial = ruleset(&lab, Side::B);
    let mut rng = Rng::new();

    // How long one run takes, to aim the kills inside it.
    let t0 = Instant::now();
    bypass(&lab, Side::B, 0, &["add", "--port", "30000"]);
    let run_time = t0.elapsed();
    bypass(&lab, Side::B, 0, &["remove", "--all"]);
    eprintln!("one add takes {run_time:?}");

    let spawn = |args: &[&str]| -> Child {
        Command::new(ctguard_bin())
            .args(["bypass"])
            .args(args)
            .args(["--netns", &ns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ctguard")
    };
    let (mut applied, mut not_applied, mut finished) = (0, 0, 0);
    let max_delay_us = (run_time.as_micros() as u64 * 3 / 2).max(1000);
    for i in 0..60u16 {
        let port = (31000 + i).to_string();
        let args: Vec<String> = if i % 4 == 3 {
            vec!["remove".into(), "--all".into()]
        } else {
            vec!["add".into(), "--port".into(), port.clone()]
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let before: Vec<String> = consistent_bypass_ids(&lab.nft(Side::B, &["-j", "list", "ruleset"]));
        let mut child = spawn(&args);
        std::thread::sleep(Duration::from_micros(rng.below(max_delay_us)));
        let killed = child.kill().is_ok();
        let status = child.wait().unwrap();
        if !killed || status.success() {
            finished += 1;
        }
        // An orphaned nft may still be committing: the state must be
        // consistent at any instant; then wait for it to finish.
        consistent_bypass_ids(&lab.nft(Side::B, &["-j", "list", "ruleset"]));
        reap_orphans();
        let after = consistent_bypass_ids(&lab.nft(Side::B, &["-j", "list", "ruleset"]));
        if args[0] == "add" {
            let id_added = after.iter().find(|id| !before.contains(id));
            assert!(
                after.len() == before.len() || (after.len() == before.len() + 1 && id_added.is_some()),
                "{before:?} -> {after:?}"
            );
            if after.len() > before.len() { applied += 1 } else { not_applied += 1 }
        } else {
            assert!(after.is_empty() || after == before, "remove --all: {before:?} -> {after:?}");
        }
    }
    eprintln!("adds applied {applied}, not applied {not_applied}; runs that finished before the kill: {finished}");
    assert!(applied > 0 && not_applied > 0, "the kills should land both before and after the commit");
    bypass(&lab, Side::B, 0, &["remove", "--all"]);
    assert_eq!(ruleset(&lab, Side::B), initial);
}

/// The conflict analysis on a real ruleset: a planted DNAT rule and a
/// planted `ct state` policy are found, named and refused; --force applies
/// anyway; applying the printed fixes makes the bypass safe and the traffic
/// work.
#[test]
fn planted_nat_and_ct_state_policies_are_detected() {
    let lab = Lab::new("bypass_conflicts");
    lab.enable_conntrack();
    lab.nft_script(
        Side::B,
        "table ip nat {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		tcp dport 6000 dnat to 10.99.0.9
	}
}
",
    );
    let before = ruleset(&lab, Side::B);
    let o = bypass(&lab, Side::B, 2, &["add", "--proto", "tcp", "--port", "6000"]);
    let e = err(&o);
    assert!(e.contains("CONFLICT [nat] table ip nat chain prerouting handle "), "{e}");
    assert!(e.contains("    tcp dport 6000 dnat to 10.99.0.9\n"), "{e}");
    assert!(e.contains("untracked packets are never translated"), "{e}");
    assert!(e.contains("error: refusing to add this bypass: 1 conflict(s)"), "{e}");
    assert_eq!(ruleset(&lab, Side::B), before, "a refused bypass changed the ruleset");
    // --force applies it, exit code 1; other ports are not in conflict.
    bypass(&lab, Side::B, 1, &["add", "--proto", "tcp", "--port", "6000", "--force"]);
    bypass(&lab, Side::B, 0, &["remove", "--all"]);
    bypass(&lab, Side::B, 0, &["add", "--proto", "tcp", "--port", "6001", "--dry-run"]);

    // A stateful firewall on b: input drops what is not established or a new
    // connection to 6001.
    lab.nft_script(
        Side::B,
        "table inet filter {
	chain input {
		type filter hook input priority filter; policy drop;
		ct state established,related accept
		tcp dport 6001 ct state new accept
	}
}
",
    );
    let b_addr = lab.addr(Side::B);
    let (stop, server) = tcp_echo(&lab, Side::B, 6001);
    assert_eq!(
        tcp_exchanges(&lab, Side::A, (b_addr, 6001).into(), 3, Duration::from_secs(2)),
        3,
        "the firewall lets 6001 in"
    );

    let o = bypass(&lab, Side::B, 2, &["add", "--proto", "tcp", "--port", "6001"]);
    let e = err(&o);
    assert!(e.contains("CONFLICT [ct-state] table inet filter chain input handle "), "{e}");
    assert!(e.contains("    tcp dport 6001 ct state new accept\n"), "{e}");
    assert!(e.contains("dropped by the drop policy of chain inet filter input"), "{e}");
    // Requests to 6001 (accepted as new today) and replies from 6001 to
    // connections b opens (accepted as established) would both be dropped.
    assert!(e.contains("    ct state established,related accept\n"), "{e}");
    let fixes: Vec<String> = e.lines().filter_map(|l| l.trim().strip_prefix("fix: nft ")).map(str::to_string).collect();
    assert_eq!(fixes.len(), 2, "{e}");
    assert!(
        fixes[0].starts_with("insert rule inet filter input position ")
            && fixes[0].ends_with(" ct state untracked tcp dport 6001 accept"),
        "{fixes:?}"
    );
    assert!(
        fixes[1].starts_with("insert rule inet filter input position ")
            && fixes[1].ends_with(" ct state untracked tcp sport 6001 accept"),
        "{fixes:?}"
    );

    // The analysis is right: forced through, the bypass breaks the service.
    bypass(&lab, Side::B, 1, &["add", "--proto", "tcp", "--port", "6001", "--force"]);
    assert_eq!(
        tcp_exchanges(&lab, Side::A, (b_addr, 6001).into(), 1, Duration::from_millis(500)),
        0,
        "untracked SYNs should be dropped"
    );
    // With the printed fix the service works, untracked, and the analysis is satisfied.
    for fix in &fixes {
        lab.nft_script(Side::B, &format!("{fix}\n"));
    }
    let tracked = lab.conntrack_count();
    assert_eq!(
        tcp_exchanges(&lab, Side::A, (b_addr, 6001).into(), 3, Duration::from_secs(2)),
        3,
        "the fix should let 6001 in"
    );
    assert_eq!(lab.conntrack_count(), tracked, "the connections should be untracked");
    bypass(&lab, Side::B, 0, &["remove", "--all"]);
    let o = bypass(&lab, Side::B, 0, &["add", "--proto", "tcp", "--port", "6001"]);
    assert!(!err(&o).contains("CONFLICT"), "{}", err(&o));
    stop.store(true, Ordering::SeqCst);
    server.join().unwrap();
}

/// `remove --all` (and removing the last bypass) restores the ruleset byte
/// for byte, in a namespace with other tables and in an empty one.
#[test]
fn removing_everything_restores_the_ruleset_byte_for_byte() {
    let lab = Lab::new("bypass_restore");
    lab.enable_conntrack();
    for side in [Side::A, Side::B] {
        let before = ruleset(&lab, side);
        bypass(&lab, side, 0, &["add", "--proto", "tcp", "--port", "80,15000"]);
        bypass(&lab, side, 0, &["add", "--port", "8000-8100", "--dst", "fd00::/64", "--iface", "veth*"]);
        let o = bypass(&lab, side, 0, &["add", "--proto", "udp", "--port", "53", "--src", "10.0.0.0/8"]);
        assert_ne!(ruleset(&lab, side), before);
        assert!(out(&o).contains("added bypass"));
        let list = list_json(&lab, side);
        let ids: Vec<String> =
            list["bypasses"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(ids.len(), 3);
        // One by (abbreviated) id, the others all at once.
        bypass(&lab, side, 0, &["remove", &ids[0][..5]]);
        assert_eq!(list_json(&lab, side)["bypasses"].as_array().unwrap().len(), 2);
        let o = bypass(&lab, side, 0, &["remove", "--all"]);
        assert!(out(&o).contains("table inet ctguard deleted"), "{}", out(&o));
        assert_eq!(ruleset(&lab, side), before, "{side:?}: the ruleset is not what it was");
        // Removing the last bypass by id deletes the table too.
        let o = bypass(&lab, side, 0, &["add", "--proto", "tcp", "--port", "443", "--json"]);
        let id = serde_json::from_slice::<Value>(&o.stdout).unwrap()["id"].as_str().unwrap().to_string();
        bypass(&lab, side, 0, &["remove", &id]);
        assert_eq!(ruleset(&lab, side), before);
    }
    assert!(ruleset(&lab, Side::B).contains("table inet ctgtest"), "the lab's own table is untouched");
}

/// What `--dry-run` prints is exactly what `add` loads: the script, fed to
/// `nft -f` in another namespace, produces the same table.
#[test]
fn the_dry_run_script_is_exactly_what_add_loads() {
    let lab = Lab::new("bypass_dryrun");
    let args = ["add", "--port", "80,443,8000-8100", "--src", "192.0.2.0/24", "--iface", "veth-b"];
    let before = ruleset(&lab, Side::B);
    let o = bypass(&lab, Side::B, 0, &[&args[..], &["--dry-run"]].concat());
    let script = out(&o);
    assert!(script.starts_with("# ctguard bypass add --proto tcp,udp --port 80,443,8000-8100 --src 192.0.2.0/24 --iface veth-b --direction both"));
    assert_eq!(ruleset(&lab, Side::B), before, "--dry-run changed the ruleset");
    lab.nft_script(Side::A, &script);
    bypass(&lab, Side::B, 0, &args);
    let table = |side| lab.nft(side, &["list", "table", "inet", "ctguard"]);
    assert_eq!(table(Side::A), table(Side::B));
    assert!(table(Side::B).contains("iifname \"veth-b\" ip saddr 192.0.2.0/24 meta l4proto { tcp, udp } th dport { 80, 443, 8000-8100 } counter packets 0 bytes 0 notrack"), "{}", table(Side::B));
}

/// Adding a selector twice changes nothing (same handles); an edited
/// bypass is reported incomplete and `add` repairs it.
#[test]
fn adding_twice_is_a_no_op_and_add_repairs_a_damaged_bypass() {
    let lab = Lab::new("bypass_idem");
    bypass(&lab, Side::B, 0, &["add", "--proto", "tcp", "--port", "80,15000"]);
    let with_handles = || lab.nft(Side::B, &["-a", "list", "ruleset"]);
    let first = with_handles();
    let o = bypass(&lab, Side::B, 0, &["add", "--port", "15000,80", "--proto", "TCP"]);
    assert!(out(&o).contains("is already installed"), "{}", out(&o));
    assert_eq!(with_handles(), first, "a repeated add changed the ruleset");
    assert_eq!(list_json(&lab, Side::B)["bypasses"][0]["rules"].as_array().unwrap().len(), 4);

    // Delete one of its rules by hand.
    let list = list_json(&lab, Side::B);
    let victim =
        list["bypasses"][0]["rules"].as_array().unwrap().iter().find(|r| r["chain"] == "output").unwrap()["handle"]
            .as_u64()
            .unwrap();
    lab.nft(Side::B, &["delete", "rule", "inet", "ctguard", "output", "handle", &victim.to_string()]);
    let o = bypass(&lab, Side::B, 1, &["list"]);
    assert!(out(&o).contains("INCOMPLETE"), "{}", out(&o));
    let o = bypass(&lab, Side::B, 0, &["add", "--proto", "tcp", "--port", "80,15000"]);
    assert!(out(&o).contains("repaired bypass"), "{}", out(&o));
    let list = list_json(&lab, Side::B);
    assert_eq!(list["bypasses"][0]["complete"], true);
    assert_eq!(list["bypasses"][0]["rules"].as_array().unwrap().len(), 4);
    consistent_bypass_ids(&lab.nft(Side::B, &["-j", "list", "ruleset"]));
}

/// `suggest --observe` sees the port a flood hammers, computes the entries
/// it holds, and its command -- run as printed -- stops the churn.
#[test]
fn suggest_finds_the_churning_port_and_its_command_stops_the_churn() {
    use ctguard_integration::Proto;
    let lab = Lab::new("bypass_suggest");
    lab.enable_conntrack();
    let mut child = Command::new(ctguard_bin())
        .args(["bypass", "suggest", "--observe", "3s", "--json", "--netns", lab.name(Side::B)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Flood once the first snapshot is taken (ctguard says so on stderr).
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("observing") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "suggest ended before observing");
    }
    let spec = lab.flow_spec(Proto::Udp, &[5353]);
    let opts = ctguard::flood::SendOptions {
        count: 4000,
        first_flow: 1_000_000,
        deadline: Duration::from_secs(2),
        rate: Some(2000),
        batch: 64,
    };
    let report = lab.send_with(&spec, &opts);
    lab.send_udp_flows(100, &[53]);
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "suggest failed: {stdout}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let s = &doc["suggestions"][0];
    eprintln!("sent {}; suggestion {s}", report.sent);
    assert_eq!(s["key"], "5353/udp", "{doc}");
    // Every flow of the flood was counted: the sensors' counts are exact.
    let rate = s["inserts_per_s"].as_f64().unwrap();
    assert!(
        (rate * 3.0 - report.sent as f64).abs() <= report.sent as f64 * 0.02,
        "rate {rate}/s vs {} sent in 3 s",
        report.sent
    );
    let timeout =
        lab.exec(Side::B, &["cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"]).trim().parse::<f64>().unwrap();
    assert_eq!(s["timeout_s"].as_f64(), Some(timeout));
    assert_eq!(s["entries_saved"].as_f64(), Some((rate * timeout).round()));
    let command = s["command"].as_str().unwrap();
    assert_eq!(command, format!("ctguard bypass add --netns {} --proto udp --port 5353", lab.name(Side::B)));

    // Run the command as printed.
    let words: Vec<&str> = command.split_whitespace().skip(1).collect();
    ctguard_expect(0, &words);
    let before = lab.conntrack_count();
    lab.send_udp_flows(500, &[5353]);
    assert_eq!(lab.conntrack_count(), before);
}
