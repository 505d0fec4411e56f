//! Checks of the fixture itself: K flows make exactly K entries, namespaces
//! and nf_conntrack_max are cleaned up, rules and counters work.
use std::path::Path;

use ctguard_integration::{Lab, MaxGuard, SerialGuard, Side, max};

const K: u64 = 300;
const PORTS: [u16; 3] = [53, 80, 443];

#[test]
fn k_udp_flows_make_exactly_k_entries() {
    let lab = Lab::new("fixture_udp");
    lab.enable_conntrack();
    let before = lab.kernel_stats();
    let report = lab.send_udp_flows(K, &PORTS);
    assert_eq!(report.sent, K);
    assert_eq!(lab.nft_new_counter(), K);
    assert_eq!(lab.conntrack_count(), K);
    let after = lab.kernel_stats();
    assert_eq!(after["entries"], K);
    for k in ["drop", "invalid", "insert_failed", "early_drop"] {
        assert_eq!(after[k], before[k], "{k} changed: {after:?}");
    }
    // The ports cycle: each destination port got K / 3 flows.
    let table = lab.exec(Side::B, &["cat", "/proc/net/nf_conntrack"]);
    if !table.is_empty() {
        for port in PORTS {
            let n = table.lines().filter(|l| l.contains(&format!(" dport={port} "))).count() as u64;
            assert_eq!(n, K / 3, "port {port}");
        }
    }
}

#[test]
fn k_tcp_syns_make_exactly_k_entries() {
    // The receiver verifies TCP checksums: a wrong one would count as invalid.
    let lab = Lab::new("fixture_tcp");
    lab.enable_conntrack();
    let before = lab.kernel_stats();
    lab.send_tcp_syns(K, &PORTS);
    assert_eq!(lab.nft_new_counter(), K);
    assert_eq!(lab.conntrack_count(), K);
    let after = lab.kernel_stats();
    assert_eq!(after["invalid"], before["invalid"], "{after:?}");
    assert_eq!(after["drop"], before["drop"], "{after:?}");
}

#[test]
fn successive_sends_open_fresh_flows() {
    let lab = Lab::new("fixture_fresh");
    lab.enable_conntrack();
    lab.send_udp_flows(100, &PORTS);
    lab.send_udp_flows(100, &PORTS);
    lab.send_tcp_syns(50, &[80]);
    assert_eq!(lab.nft_new_counter(), 250);
    assert_eq!(lab.conntrack_count(), 250);
}

#[test]
fn a_prerouting_drop_leaves_no_entry() {
    let lab = Lab::new("fixture_drop");
    lab.enable_conntrack();
    lab.add_nft_rule("udp dport 9 drop");
    lab.send_udp_flows(20, &[9]);
    lab.send_udp_flows(10, &[53]);
    // All 30 were new to conntrack; the 20 dropped ones never got confirmed.
    assert_eq!(lab.nft_new_counter(), 30);
    assert_eq!(lab.conntrack_count(), 10);
}

#[test]
fn without_conntrack_nothing_is_tracked() {
    let lab = Lab::new("fixture_nocon");
    lab.send_udp_flows(50, &PORTS);
    assert_eq!(lab.conntrack_count(), 0);
}

#[test]
fn netns_inode_matches_ctguard() {
    let lab = Lab::new("fixture_inode");
    for side in [Side::A, Side::B] {
        assert_eq!(lab.netns_inode(side), lab.netns(side).inode);
    }
    assert_ne!(lab.netns_inode(Side::A), lab.netns_inode(Side::B));
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn namespaces_are_deleted_on_drop_and_on_panic() {
    let lab = Lab::new("fixture_cleanup");
    let names = [lab.name(Side::A).to_string(), lab.name(Side::B).to_string()];
    assert!(names.iter().all(|n| netns_exists(n)));
    drop(lab);
    assert!(names.iter().all(|n| !netns_exists(n)), "{names:?} still exist");

    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new("fixture_cleanup");
        names.lock().unwrap().extend([lab.name(Side::A).to_string(), lab.name(Side::B).to_string()]);
        panic!("deliberate panic inside a lab");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert!(names.iter().all(|n| !netns_exists(n)), "{names:?} survived a panic");
}

#[test]
fn max_guard_restores_on_drop_and_on_panic() {
    // Hold the lock so no other test changes the value between our reads.
    let _lock = SerialGuard::acquire();
    // Harmless values: just below the current maximum.
    let original = max::read_max();
    let lowered = original - 100;
    {
        let g = MaxGuard::lower(lowered);
        assert_eq!(g.original(), original);
        assert_eq!(max::read_max(), lowered);
        assert!(Path::new(max::STATE_FILE).exists());
    }
    assert_eq!(max::read_max(), original);
    assert!(!Path::new(max::STATE_FILE).exists());

    let result = std::panic::catch_unwind(|| {
        let _g = MaxGuard::lower(lowered);
        panic!("deliberate panic while lowered");
    });
    assert!(result.is_err());
    assert_eq!(max::read_max(), original);
}

const CHILD_ENV: &str = "CTGUARD_TEST_ABORT_WHILE_LOWERED";

#[test]
fn max_lowered_by_a_killed_run_is_restored_next_time() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // Child: lower, then die without unwinding (no Drop runs).
        let _g = MaxGuard::lower(max::read_max() - 100);
        std::process::abort();
    }
    // Hold the test lock throughout (the child inherits it), so no other
    // test restores the value before we look.
    let lock = SerialGuard::acquire();
    let original = max::read_max();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "max_lowered_by_a_killed_run_is_restored_next_time", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    lock.pass_to(&mut child);
    let mut child = child.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            MaxGuard::restore_stale();
            panic!("the child did not finish within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Observe, restore, then assert: a failed assertion must not leave the
    // value lowered.
    let lowered = max::read_max();
    let recorded = std::fs::read_to_string(max::STATE_FILE).ok();
    let restored = MaxGuard::restore_stale();
    let after = max::read_max();
    assert!(!status.success(), "the child should have aborted");
    assert_eq!(lowered, original - 100, "the child did not lower the max");
    assert_eq!(recorded.as_deref().map(str::trim), Some(original.to_string().as_str()));
    assert_eq!(restored, Some(original));
    assert_eq!(after, original);
    assert!(!Path::new(max::STATE_FILE).exists());
    drop(lock);
}

#[test]
fn max_lowered_by_a_killed_lab_is_restored_by_the_next_test() {
    // `ctguard lab` and this fixture share one state file: a lab killed while
    // the limit was lowered must not make the next test take the lowered
    // value for the original.
    let lock = SerialGuard::acquire();
    let original = max::read_max();
    let lab_guard = ctguard::lab::max_guard::MaxGuard::lower(original - 100).expect("lower as the lab does");
    // A killed process runs no Drop.
    std::mem::forget(lab_guard);
    let lowered = max::read_max();
    let restored = MaxGuard::restore_stale();
    let after = max::read_max();
    assert_eq!(lowered, original - 100);
    assert_eq!(restored, Some(original));
    assert_eq!(after, original);
    assert!(!Path::new(max::STATE_FILE).exists());
    drop(lock);
}
