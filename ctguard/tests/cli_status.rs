//! `ctguard status` through the built binary. These must pass whether or not
//! conntrack is loaded in the namespace the tests run in.
use std::process::{Command, Output};

fn ctguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctguard")).args(args).output().expect("run ctguard")
}

#[test]
fn json_document_has_the_expected_keys() {
    let out = ctguard(&["status", "--json", "--interval", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 0 healthy or 1 warning: this host's table may be busy; never an error here.
    assert!(matches!(out.status.code(), Some(0 | 1)), "status {:?}, stderr: {stderr}", out.status);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    for key in ["health", "reasons", "interval_ms", "memory_total_bytes", "namespaces"] {
        assert!(doc.get(key).is_some(), "missing top-level {key}: {doc}");
    }
    assert!(["ok", "warning"].contains(&doc["health"].as_str().unwrap()), "{doc}");
    assert_eq!(doc["interval_ms"], 0);

    let namespaces = doc["namespaces"].as_array().unwrap();
    assert_eq!(namespaces.len(), 1, "the current namespace only, by default");
    let ns = &namespaces[0];
    for key in ["inode", "name", "path", "health", "reasons", "conntrack"] {
        assert!(ns.get(key).is_some(), "missing namespace key {key}: {ns}");
    }
    assert!(ns["inode"].is_u64());
    match ns["conntrack"].as_str().unwrap() {
        "active" => {
            for key in
                ["entries", "max", "buckets", "fill_percent", "memory", "counters", "per_cpu", "rise", "timeouts"]
            {
                assert!(ns.get(key).is_some(), "missing active key {key}: {ns}");
            }
            assert!(ns["entries"].is_u64() && ns["max"].is_u64() && ns["buckets"].is_u64());
            assert!(ns["counters"]["drop"].is_u64(), "{ns}");
            assert!(ns["rise"].is_null(), "one reading has no rise: {ns}");
            assert!(!ns["per_cpu"].as_array().unwrap().is_empty());
        }
        "not_active" => assert!(ns["detail"].is_string(), "{ns}"),
        other => panic!("unexpected conntrack state {other}: {ns}"),
    }
}

#[test]
fn table_ends_with_the_overall_health() {
    let out = ctguard(&["status", "--interval", "0"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("netns "), "{stdout}");
    assert!(stdout.contains("\nhealth: "), "{stdout}");
}

#[test]
fn unknown_namespace_exits_2_with_a_hint() {
    let out = ctguard(&["status", "--netns", "does-not-exist"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("does-not-exist"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout on error");
}
