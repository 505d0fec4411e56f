//! `ctguard recommend --apply` and `ctguard rollback` against the real kernel.
//!
//! These change global settings (nf_conntrack_max, the hash table size, two
//! timeouts), so every test:
//! * runs as root in the initial network namespace, under the shared test
//!   lock ([`SerialGuard`]) so no other privileged test sees the changes;
//! * reads the original text of every setting first and holds a
//!   [`Restore`] guard whose `Drop` writes the originals back byte for byte,
//!   also when the test panics (and removes its state file);
//! * applies only values >= every namespace's current entry count.
//!
//! The binary is the one `ctguard_integration::bin::ctguard_bin()` builds
//! (`cargo build -p ctguard`, a no-op when fresh; `CTGUARD_BIN` overrides it):
//! `env!("CARGO_BIN_EXE_ctguard")` exists only inside the ctguard crate.
//!
//! ```text
//! cargo test -p ctguard-integration --test recommend_apply -- --test-threads=1
//! ```
use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Stdio},
};

use ctguard_integration::{
    Lab, SerialGuard, Side,
    bin::{ctguard, ctguard_bin},
    cmd::try_run,
    require_root, root,
};

const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const BUCKETS: &str = "/proc/sys/net/netfilter/nf_conntrack_buckets";
const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";
const TIME_WAIT: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait";
const UDP: &str = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout";
/// The settings these tests may touch. Buckets are restored through
/// hashsize (the sysctl is the same value, read-only in effect here).
const WRITABLE: [&str; 4] = [MAX, HASHSIZE, TIME_WAIT, UDP];

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn number(path: &str) -> u64 {
    read(path).trim().parse().unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Puts every setting back to the text it had when the guard was made, and
/// removes the test's state file, when dropped (panics included). Holds the
/// test lock for as long.
struct Restore {
    originals: Vec<(&'static str, String)>,
    state_file: PathBuf,
    _lock: SerialGuard,
}

impl Restore {
    fn new(test: &str) -> Restore {
        require_root();
        assert!(
            root::in_initial_netns(),
            "these tests change global sysctls: run them in the initial network namespace"
        );
        let lock = SerialGuard::acquire();
        let state_file = PathBuf::from(format!("/run/ctguard-test-recommend-{test}.json"));
        // A killed earlier run may have left its changes and state behind.
        if state_file.exists() {
            let out = ctguard(&["rollback", "--state-file", state_file.to_str().unwrap()]);
            eprintln!("restored a stale state {}: {}", state_file.display(), String::from_utf8_lossy(&out.stdout));
            let _ = std::fs::remove_file(&state_file);
        }
        let originals = WRITABLE.iter().map(|p| (*p, read(p))).collect();
        Restore { originals, state_file, _lock: lock }
    }

    fn original(&self, path: &str) -> &str {
        &self.originals.iter().find(|(p, _)| *p == path).expect("known path").1
    }

    fn state_arg(&self) -> &str {
        self.state_file.to_str().unwrap()
    }

    /// Every setting reads exactly what it read at the start.
    fn assert_unchanged(&self, context: &str) {
        for (path, text) in &self.originals {
            assert_eq!(&read(path), text, "{context}: {path} changed");
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (path, text) in &self.originals {
            if std::fs::read_to_string(path).ok().as_deref() != Some(text.as_str())
                && let Err(e) = std::fs::write(path, text.as_bytes())
            {
                eprintln!("CANNOT RESTORE {path} to {:?}: {e}; set it by hand", text.trim());
            }
        }
        let _ = std::fs::remove_file(&self.state_file);
    }
}

/// A value different from `current` (and from the kernel default's shape,
/// so a stale value is obvious), never below `floor`.
fn different(current: u64, candidates: &[u64], floor: u64) -> u64 {
    *candidates.iter().find(|&&c| c != current && c >= floor).expect("a candidate differs from the current value")
}

/// The largest entry count of any namespace, the floor for max.
fn largest_count() -> u64 {
    let out = ctguard(&["recommend", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["plan"]["sizing"]["current_entries"].as_u64().unwrap()
}

#[test]
fn apply_writes_known_values_and_rollback_restores_them_byte_for_byte() {
    let guard = Restore::new("apply");
    let floor = largest_count();
    let max = different(number(MAX), &[393_216, 327_680], floor);
    let buckets = different(number(BUCKETS), &[131_072, 65_536], 0);
    let time_wait = different(number(TIME_WAIT), &[60, 90], 0);
    let udp = different(number(UDP), &[20, 25], 0);
    let (max_s, buckets_s) = (max.to_string(), buckets.to_string());
    let tw = format!("tcp_timeout_time_wait={time_wait}");
    let ud = format!("udp={udp}");

    // Dry run first: the diff, nothing written.
    let out = ctguard(&[
        "recommend",
        "--max",
        &max_s,
        "--buckets",
        &buckets_s,
        "--timeout",
        &tw,
        "--timeout",
        &ud,
        "--state-file",
        guard.state_arg(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("dry run: nothing written"), "{report}");
    assert!(report.contains(&format!("-> {max}")), "{report}");
    guard.assert_unchanged("dry run");
    assert!(!guard.state_file.exists());

    // Apply.
    let out = ctguard(&[
        "recommend",
        "--apply",
        "--json",
        "--max",
        &max_s,
        "--buckets",
        &buckets_s,
        "--timeout",
        &tw,
        "--timeout",
        &ud,
        "--state-file",
        guard.state_arg(),
    ]);
    assert_eq!(out.status.code(), Some(0), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints one document");
    let applied = doc["apply"]["applied"].as_array().expect("applied list");
    assert_eq!(applied.len(), 4, "{applied:?}");
    assert_eq!(applied[1]["path"], HASHSIZE, "buckets go through the module parameter");
    assert_eq!(read(MAX), format!("{max}\n"));
    assert_eq!(read(HASHSIZE), format!("{buckets}\n"));
    assert_eq!(read(BUCKETS), format!("{buckets}\n"), "the sysctl shows the resized table");
    assert_eq!(read(TIME_WAIT), format!("{time_wait}\n"));
    assert_eq!(read(UDP), format!("{udp}\n"));

    // The state: mode 0600, the exact previous text of each file.
    let meta = std::fs::metadata(&guard.state_file).expect("state file written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let state: serde_json::Value = serde_json::from_str(&read(guard.state_arg())).unwrap();
    for entry in state["entries"].as_array().unwrap() {
        let path = entry["path"].as_str().unwrap();
        assert_eq!(entry["previous"].as_str().unwrap(), guard.original(path), "{path}");
    }

    // A second apply is refused while the first is not rolled back.
    let other = (max + 65_536).to_string();
    let out = ctguard(&["recommend", "--apply", "--max", &other, "--state-file", guard.state_arg()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not been rolled back") && stderr.contains("hint:"), "{stderr}");
    assert_eq!(read(MAX), format!("{max}\n"), "the refused apply wrote");

    // Rollback: byte for byte, state removed.
    let out = ctguard(&["rollback", "--state-file", guard.state_arg()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("reads back exactly").count(), 4, "{stdout}");
    guard.assert_unchanged("after rollback");
    assert!(!guard.state_file.exists(), "rollback leaves no state");
    let out = ctguard(&["rollback", "--state-file", guard.state_arg()]);
    assert_eq!(out.status.code(), Some(2), "a second rollback has nothing to do");
}

#[test]
fn force_applies_on_top_and_rollback_returns_to_the_first_values() {
    let guard = Restore::new("force");
    let floor = largest_count();
    let first = different(number(MAX), &[327_680, 393_216], floor);
    let second = different(first, &[458_752, 524_288], floor);
    let state = guard.state_arg();
    let out = ctguard(&["recommend", "--apply", "--max", &first.to_string(), "--state-file", state]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let tw = format!("time_wait={}", different(number(TIME_WAIT), &[60, 90], 0));
    let out = ctguard(&[
        "recommend",
        "--apply",
        "--force",
        "--max",
        &second.to_string(),
        "--timeout",
        &tw,
        "--state-file",
        state,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(number(MAX), second);
    let out = ctguard(&["rollback", "--state-file", state]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    guard.assert_unchanged("after rollback of two applies");
}

#[test]
fn values_below_the_count_and_unknown_timeouts_are_refused_and_nothing_is_written() {
    let lab = Lab::new("recommend_refuse");
    lab.enable_conntrack();
    lab.send_udp_flows(300, &[53, 80, 443]);
    let count = lab.conntrack_count();
    assert_eq!(count, 300);
    let guard = Restore::new("refuse");
    let floor = largest_count();
    assert!(floor >= count, "the lab's table counts: {floor} < {count}");

    let below = (floor - 1).to_string();
    for (args, needle) in [
        (vec!["--max", below.as_str()], "below the"),
        (vec!["--timeout", "bogus=1"], "not a conntrack timeout"),
        (vec!["--max", "0"], "removes the limit"),
    ] {
        let mut all = vec!["recommend", "--apply", "--state-file", guard.state_arg()];
        all.extend(args.iter().copied());
        let out = ctguard(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains("hint:") && stderr.contains("nothing was written"),
            "{all:?}: {stderr}"
        );
        guard.assert_unchanged(&format!("{all:?}"));
        assert!(!guard.state_file.exists(), "{all:?} wrote a state file");
    }
    // At the count itself it would be accepted (dry run).
    let out = ctguard(&["recommend", "--max", &floor.to_string(), "--state-file", guard.state_arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn apply_is_refused_outside_the_initial_namespace() {
    let lab = Lab::new("recommend_netns");
    lab.enable_conntrack();
    let guard = Restore::new("netns");
    let bin = ctguard_bin();
    let max = (number(MAX) + 65_536).to_string();
    let out = try_run(
        "ip",
        &[
            "netns",
            "exec",
            lab.name(Side::B),
            bin.to_str().unwrap(),
            "recommend",
            "--apply",
            "--max",
            &max,
            "--state-file",
            guard.state_arg(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("initial network namespace") && stderr.contains("read-only"), "{stderr}");
    guard.assert_unchanged("apply from another namespace");
    assert!(!guard.state_file.exists());
    // The dry run works there and says why --apply would not.
    let out = try_run("ip", &["netns", "exec", lab.name(Side::B), bin.to_str().unwrap(), "recommend"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--apply would be refused here"));
}

#[test]
fn observed_churn_is_counted_per_protocol_and_sized_by_littles_law() {
    const UDP_FLOWS: u64 = 3000;
    const TCP_FLOWS: u64 = 1000;
    let lab = Lab::new("recommend_observe");
    lab.enable_conntrack();
    let inode = lab.netns_inode(Side::B);
    let mut child = Command::new(ctguard_bin())
        .args(["recommend", "--observe", "4s", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ctguard recommend --observe");
    // Wait for the baseline: flows sent after this line are all counted.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            let out = child.wait_with_output().unwrap();
            panic!("ctguard exited before observing: {:?} {}", out.status, String::from_utf8_lossy(&out.stdout));
        }
        if line.contains("observing conntrack churn") {
            break;
        }
    }
    lab.send_udp_flows(UDP_FLOWS, &[53]);
    lab.send_tcp_syns(TCP_FLOWS, &[443]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "recommend --observe failed: {:?}", out.status);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let obs = &doc["observation"];
    let window = obs["window_s"].as_f64().unwrap();
    assert!((3.9..6.0).contains(&window), "window {window}");
    let inserts = |class: &str| -> f64 {
        obs["classes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["netns"] == inode && c["class"] == class)
            .map(|c| c["inserts"].as_f64().unwrap())
            .sum()
    };
    // Exact counts from the kernel maps; other namespaces' churn is only
    // ever spread onto the lab by the "unattributed" remainder, which stays
    // far below 1 %.
    let (udp, tcp) = (inserts("udp"), inserts("tcp"));
    assert!((udp - UDP_FLOWS as f64).abs() <= UDP_FLOWS as f64 * 0.01, "udp {udp}: {obs}");
    assert!((tcp - TCP_FLOWS as f64).abs() <= TCP_FLOWS as f64 * 0.01, "tcp {tcp}: {obs}");
    // Little's law: the window is shorter than both lifetimes, so the peak
    // rate is the window mean: flows / window x lifetime.
    let timeouts = &doc["current"]["timeouts"];
    let (udp_t, tw_t) =
        (timeouts["udp_timeout"].as_f64().unwrap(), timeouts["tcp_timeout_time_wait"].as_f64().unwrap());
    let ns = doc["plan"]["demand"].as_array().unwrap().iter().find(|d| d["netns"] == inode).expect("the lab's demand");
    let expect = (udp * udp_t + tcp * tw_t) / window;
    let peak = ns["peak_entries"].as_f64().unwrap();
    assert!((peak - expect).abs() < 1.0, "peak {peak}, expected {expect}");
    assert!(ns["current_entries"].as_u64().unwrap() >= UDP_FLOWS, "{ns}");
    // Every table count and demand fits the default on a 24 GiB host:
    // nothing to change, and the 53/udp share is reported.
    let share = obs["ports"].as_array().unwrap().iter().find(|p| p["port"] == 53 && p["proto"] == 17).expect("53/udp");
    assert!(share["inserts"].as_f64().unwrap() >= UDP_FLOWS as f64);
    assert_eq!(share["netns"], inode);
    // 53/udp makes 3/4 of the churn: NOTRACK for exactly that protocol and
    // port, in the lab's namespace.
    assert_eq!(
        doc["plan"]["bypass"]["command"],
        format!("ctguard bypass add --proto udp --port 53 --netns {inode}").as_str(),
        "{}",
        doc["plan"]
    );
}

#[test]
fn the_guard_restores_the_originals_when_a_test_panics() {
    let originals: Vec<String> = WRITABLE.iter().map(|p| read(p)).collect();
    let state_file = std::panic::catch_unwind(|| {
        let guard = Restore::new("panic");
        let max = different(number(MAX), &[327_680, 393_216], largest_count()).to_string();
        let out =
            ctguard(&["recommend", "--apply", "--max", &max, "--timeout", "udp=17", "--state-file", guard.state_arg()]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(read(MAX), format!("{max}\n"));
        let state_file = guard.state_file.clone();
        std::panic::panic_any(state_file);
    })
    .expect_err("the closure panics")
    .downcast::<PathBuf>()
    .expect("the panic carries the state path");
    let now: Vec<String> = WRITABLE.iter().map(|p| read(p)).collect();
    assert_eq!(now, originals, "the guard did not restore every setting");
    assert!(!state_file.exists(), "the guard did not remove {}", state_file.display());
}
