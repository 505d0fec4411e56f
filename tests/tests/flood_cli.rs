//! `ctguard lab flood`: sends what it says over a veth, and refuses anything
//! that could leave the machine's test links.
use std::process::Command;

use ctguard_integration::{
    bin::ctguard_bin,
    lab::{Lab, Side},
    require_root,
};

fn flood(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(ctguard_bin()).args(["lab", "flood"]).args(args).output().expect("run ctguard lab flood");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn flood_sends_every_flow_over_the_veth_and_reports_it() {
    require_root();
    let lab = Lab::new("flood_veth");
    lab.enable_conntrack();
    let new0 = lab.nft_new_counter();
    let (src, dst) = (lab.addr(Side::A).to_string(), lab.addr(Side::B).to_string());
    let (code, stdout, stderr) = flood(&[
        "--from",
        lab.name(Side::A),
        "--src",
        &src,
        "--to",
        &dst,
        "--ports",
        "7001,7002",
        "--count",
        "500",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON report");
    assert_eq!(report["sent"], 500);
    assert_eq!(report["next_flow"], 500);
    assert!(report["rate_per_s"].as_f64().unwrap() > 0.0, "{report}");
    lab.settle();
    assert_eq!(lab.nft_new_counter() - new0, 500, "the receiver tracked one new entry per flow");
}

/// A namespace whose only link is a bridge (what a NIC would be enslaved to).
struct DummyNetns(String);

impl DummyNetns {
    fn new() -> Self {
        let name = format!("ctgflood-{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().expect("ip").success();
            assert!(ok, "ip {args:?}");
        };
        let ns = DummyNetns(name.clone());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "add", "d0", "type", "bridge"]);
        ip(&["-n", &name, "addr", "add", "10.78.0.1/24", "dev", "d0"]);
        ip(&["-n", &name, "link", "set", "d0", "up"]);
        ns
    }
}

impl Drop for DummyNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn flood_refuses_routes_that_are_not_test_links_and_public_or_initial_namespaces() {
    require_root();
    let ns = DummyNetns::new();
    let (code, _, stderr) = flood(&["--from", &ns.0, "--src", "10.78.0.1", "--to", "10.78.0.2", "--count", "10"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("it would leave through d0, a bridge device"), "{stderr}");
    assert!(stderr.contains("veth"), "the hint names what is allowed: {stderr}");

    let (code, _, stderr) = flood(&["--from", &ns.0, "--src", "10.78.0.1", "--to", "192.0.2.1", "--count", "10"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a private (RFC 1918) address"), "{stderr}");

    let (code, _, stderr) =
        flood(&["--from", "/proc/self/ns/net", "--src", "10.0.0.1", "--to", "10.0.0.2", "--count", "10"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("initial network namespace"), "{stderr}");
}
