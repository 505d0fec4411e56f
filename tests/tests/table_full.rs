//! The seed symptom: with nf_conntrack_max low, new flows beyond it are
//! dropped by conntrack ("nf_conntrack: table full, dropping packet").
use ctguard_integration::{Lab, MaxGuard, max};

const MAX: u64 = 64;
const FLOWS: u64 = 400;

#[test]
fn new_flows_beyond_nf_conntrack_max_are_dropped() {
    let lab = Lab::new("table_full");
    lab.enable_conntrack();
    let before = lab.kernel_stats();
    let original_max;
    let (report, after, count, new_flows);
    {
        let guard = MaxGuard::lower(MAX);
        original_max = guard.original();
        assert_eq!(max::read_max(), MAX);
        report = lab.send_udp_flows(FLOWS, &[53, 80, 443]);
        after = lab.kernel_stats();
        count = lab.conntrack_count();
        new_flows = lab.nft_new_counter();
    } // nf_conntrack_max restored here, before any assertion can fail
    assert_eq!(max::read_max(), original_max, "nf_conntrack_max was not restored");

    let delta = |k: &str| after[k] - before[k];
    eprintln!(
        "{lab}: sent {} in {:?}; new={new_flows} count={count} drop={} early_drop={} insert_failed={} invalid={}",
        report.sent,
        report.elapsed,
        delta("drop"),
        delta("early_drop"),
        delta("insert_failed"),
        delta("invalid")
    );
    assert_eq!(report.sent, FLOWS);
    assert!(delta("drop") > 0, "conntrack's drop counter did not rise: {after:?}");
    assert!(count <= MAX, "{count} entries in the receiver, more than nf_conntrack_max={MAX}");
    assert!(new_flows >= MAX, "only {new_flows} flows were tracked, expected at least {MAX}");
    // Every flow either got an entry (and passed the ct-state-new rule, which
    // runs after conntrack) or was dropped when its entry could not be
    // allocated; nothing else touches the receiver.
    assert_eq!(new_flows + delta("drop"), FLOWS, "tracked ({new_flows}) + dropped ({}) != flows sent", delta("drop"));
    assert_eq!(delta("invalid"), 0, "packets were invalid: {after:?}");
}

/// Issue 2's proof of the harness: the seed's symptom, seen through
/// `ctguard status --json`, with the kernel's numbers.
#[test]
fn status_json_reports_the_full_table_and_its_drops() {
    use ctguard_integration::{bin::ctguard, lab::Side};
    let lab = Lab::new("status_full");
    lab.enable_conntrack();
    let name = lab.name(Side::B).to_string();
    let status = |args: &[&str]| {
        let out = ctguard(args);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), doc)
    };
    let (code, doc, kernel, count) = {
        let _max = MaxGuard::lower(MAX);
        lab.send_udp_flows(FLOWS, &[53]);
        let kernel = lab.kernel_stats();
        let count = lab.conntrack_count();
        let (code, doc) = status(&["status", "--netns", &name, "--json", "--interval", "0"]);
        (code, doc, kernel, count)
    };
    let ns = &doc["namespaces"][0];
    assert_eq!(ns["name"], name.as_str());
    assert_eq!(ns["entries"], count);
    assert_eq!(ns["max"], MAX);
    assert_eq!(ns["fill_percent"], 100.0);
    assert_eq!(ns["counters"]["drop"], kernel["drop"]);
    assert!(kernel["drop"] > 0);
    assert_eq!(doc["health"], "warning", "a full table is a warning: {doc}");
    assert_eq!(code, Some(1), "exit code 1 = warning");

    // With the limit back to normal the same table is healthy.
    let (code, doc) = status(&["status", "--netns", &name, "--json", "--interval", "0"]);
    assert_eq!(doc["namespaces"][0]["max"], max::read_max());
    assert_eq!(code, Some(0), "{doc}");
}

#[test]
fn status_warns_when_drops_rise_between_its_two_readings() {
    use ctguard_integration::{bin::ctguard_bin, lab::Side};
    let lab = Lab::new("status_rise");
    lab.enable_conntrack();
    let name = lab.name(Side::B).to_string();
    let _max = MaxGuard::lower(MAX);
    // First reading now (empty table), second 8 s later; in between the
    // table overflows and is emptied again, so only the drop counter tells.
    let child = std::process::Command::new(ctguard_bin())
        .args(["status", "--netns", &name, "--json", "--interval", "8s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ctguard status");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let before = lab.kernel_stats();
    lab.send_udp_flows(FLOWS, &[53]);
    let dropped = lab.kernel_stats()["drop"] - before["drop"];
    lab.exec(Side::B, &["conntrack", "-F"]);
    let out = child.wait_with_output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert!(dropped > 0, "the flood overflowed the table");
    let ns = &doc["namespaces"][0];
    assert!(ns["fill_percent"].as_f64().unwrap() < 80.0, "emptied before the second reading: {ns}");
    assert_eq!(doc["health"], "warning", "{doc}");
    assert_eq!(out.status.code(), Some(1), "exit code 1 = warning");
    let reasons = doc["reasons"].to_string();
    assert!(reasons.contains(&format!("drop counter rose by {dropped} in 8s")), "{reasons}");
}
