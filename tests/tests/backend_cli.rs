//! `--backend` is honoured, and a backend the kernel cannot run is an error
//! that says why, never a silent fallback.
use std::process::Command;

use ctguard_integration::{bin::ctguard_bin, require_root};

fn trace_with(backend: &str) -> (Option<i32>, String) {
    let out = Command::new(ctguard_bin())
        .args(["trace", "--json", "--duration", "1", "--backend", backend])
        .output()
        .expect("run ctguard trace");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn backend_tracepoint_is_used_when_asked_for() {
    require_root();
    let (code, stderr) = trace_with("tracepoint");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("with the Tracepoint backend"), "{stderr}");
}

#[test]
fn backend_function_hooks_runs_where_kprobes_work_and_is_refused_elsewhere() {
    require_root();
    let (code, stderr) = trace_with("function-hooks");
    let distro_kernel = std::env::var("CTGUARD_EXPECT_BACKEND").is_ok_and(|b| b == "function_hooks");
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    if distro_kernel {
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("with the FunctionHooks backend"), "{stderr}");
    } else if !kprobes {
        // This project's locked-down host: no kprobes at all.
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("--backend function-hooks cannot run"), "{stderr}");
        assert!(stderr.contains("no kprobes"), "{stderr}");
        assert!(stderr.contains("--backend auto or --backend tracepoint"), "the hint: {stderr}");
    } else {
        panic!("unexpected machine: kprobes exist but CTGUARD_EXPECT_BACKEND is not function_hooks ({stderr})");
    }
}
