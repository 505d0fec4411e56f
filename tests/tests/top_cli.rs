//! `ctguard top` with known traffic: the JSON batch mode ranks ports by their
//! real rates, and the terminal view shows them and gives the terminal back.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ctguard::flood::{Proto, SendOptions};
use ctguard_integration::{
    Lab, Side,
    bin::ctguard_bin,
    tmux::{Tmux, wait_for_file},
};

/// Flows per second per port: 3:2:1 by weighting the port list.
const PORTS: [u16; 6] = [7100, 7100, 7100, 7200, 7200, 7300];
const TOTAL_RATE: u64 = 6000;

fn flood_for(lab: &Lab, secs: u64) -> f64 {
    let spec = lab.flow_spec(Proto::Udp, &PORTS);
    let opts = SendOptions {
        rate: Some(TOTAL_RATE),
        deadline: Duration::from_secs(secs + 5),
        ..SendOptions::count(TOTAL_RATE * secs)
    };
    let report = lab.send_with(&spec, &opts);
    assert_eq!(report.sent, TOTAL_RATE * secs);
    report.rate
}

#[test]
fn top_json_ranks_ports_by_their_real_rates() {
    let lab = Lab::new("top_json");
    lab.enable_conntrack();
    let inode = lab.netns_inode(Side::B).to_string();
    let mut child = Command::new(ctguard_bin())
        .args(["top", "--json", "--interval", "1s", "--count", "8", "--netns", &inode])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start top");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first document means the sensors are attached and sampling.
    let first = lines.next().expect("a first document").unwrap();
    assert!(first.contains("ctguard.top.v1"), "{first}");
    let started = Instant::now();
    let achieved = flood_for(&lab, 5);
    let flood_secs = started.elapsed().as_secs_f64();
    let docs: Vec<serde_json::Value> = lines.map_while(Result::ok).map(|l| serde_json::from_str(&l).unwrap()).collect();
    assert!(child.wait().unwrap().success());

    // Documents whose whole interval fell inside the flood: the busiest ones.
    let mut busy: Vec<&serde_json::Value> =
        docs.iter().filter(|d| d["rates"]["new_per_s"].as_f64().unwrap_or(0.0) > 0.9 * achieved).collect();
    assert!(busy.len() >= 2, "expected at least 2 full intervals during a {flood_secs:.1}s flood: {docs:?}");
    busy.truncate(3);
    for doc in busy {
        let keys = doc["keys"].as_array().unwrap();
        let names: Vec<&str> = keys.iter().take(3).map(|k| k["key"].as_str().unwrap()).collect();
        assert_eq!(names, ["7100/udp", "7200/udp", "7300/udp"], "ranked by inserts/s: {doc}");
        let total: f64 = keys.iter().map(|k| k["inserts_per_s"].as_f64().unwrap()).sum();
        for (k, share) in keys.iter().zip([0.5, 1.0 / 3.0, 1.0 / 6.0]) {
            let rate = k["inserts_per_s"].as_f64().unwrap();
            let expected = share * achieved;
            assert!(
                (rate - expected).abs() / expected < 0.05,
                "{}: {rate:.0}/s, expected {expected:.0}/s (within 5 %)",
                k["key"]
            );
            assert!((k["share_percent"].as_f64().unwrap() - share * 100.0).abs() < 2.0, "{k}");
        }
        assert!((total - achieved).abs() / achieved < 0.05, "total {total:.0}/s vs sent {achieved:.0}/s");
        assert_eq!(doc["tables"][0]["netns"].to_string(), inode);
    }
}

#[test]
fn top_terminal_view_shows_the_ports_and_restores_the_terminal() {
    let lab = Lab::new("top_tui");
    lab.enable_conntrack();
    let stty_file = Tmux::scratch_file("ctg-top", "stty");
    let script = format!(
        "{} top --interval 500ms --netns {}; stty -a > {}; sleep 30",
        ctguard_bin().display(),
        lab.name(Side::B),
        stty_file.display()
    );
    let term = Tmux::start("ctg-top", &script);
    term.wait_for(&["ctguard top", "conntrack tables", "drops/s"], 90);
    flood_for(&lab, 2);
    term.wait_for(&["7100/udp", "7200/udp", "7300/udp"], 30);
    term.send_keys("q");
    let stty = wait_for_file(&stty_file, 30, |t| t.contains("icanon"));
    assert!(stty.contains("icanon"), "top did not quit, or the shell never ran stty: {stty:?}");
    // Raw mode is off again: canonical input and echo are back.
    assert!(stty.contains(" icanon") && !stty.contains("-icanon"), "{stty}");
    assert!(stty.contains(" echo ") && !stty.contains("-echo "), "{stty}");
}
