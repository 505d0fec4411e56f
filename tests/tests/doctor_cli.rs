//! `ctguard doctor` tells the truth about the kernel it runs on.
use ctguard_integration::{bin::ctguard, require_root};

fn doctor_json() -> serde_json::Value {
    let out = ctguard(&["doctor", "--json"]);
    assert_eq!(out.status.code(), Some(0), "doctor failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("doctor --json is JSON")
}

fn probe<'a>(doc: &'a serde_json::Value, hook: &str) -> &'a serde_json::Value {
    doc["probes"].as_array().unwrap().iter().find(|p| p["hook"] == hook).unwrap_or_else(|| panic!("no {hook} probe"))
}

#[test]
fn doctor_reports_what_loads_here() {
    require_root();
    let doc = doctor_json();
    assert_eq!(probe(&doc, "tp_btf")["result"], "works");
    assert_eq!(probe(&doc, "tracepoint")["result"], "works");
    assert_eq!(probe(&doc, "raw_tp")["result"], "works");
    assert!(doc["sensors_load"]["Ok"].is_string(), "the real sensors must load: {}", doc["sensors_load"]);
    // The probes' prediction and the sensors' own choice are the same backend.
    assert_eq!(doc["sensors_load"]["Ok"], doc["backend"]["backend"], "{}", doc["sensors_reason"]);
    assert!(doc["sensors_reason"].as_str().is_some_and(|r| !r.is_empty()), "{}", doc["sensors_reason"]);
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    if std::env::var_os("CTGUARD_VM_KERNEL").is_some() {
        // Stock distro kernel in the VM: kprobes and fentry work.
        assert_eq!(probe(&doc, "kprobe")["result"], "works");
        assert_eq!(probe(&doc, "fentry_vmlinux")["result"], "works");
        // nf_conntrack is a module there: fentry/fexit on its functions load
        // with the module's BTF object (measured with bpf(2), not assumed).
        assert_eq!(probe(&doc, "fentry_module")["result"], "works", "{}", probe(&doc, "fentry_module"));
        assert_eq!(probe(&doc, "fexit_module")["result"], "works", "{}", probe(&doc, "fexit_module"));
        assert_eq!(doc["backend"]["backend"], "function_hooks");
    } else {
        // This project's locked-down host kernel: fentry/fexit are refused
        // with EPERM and there are no kprobes.
        let fentry = probe(&doc, "fentry_vmlinux");
        assert_eq!(fentry["result"], "refused", "{fentry}");
        assert_eq!(fentry["errno"], 1, "EPERM expected: {fentry}");
        assert_eq!(probe(&doc, "kprobe")["result"], if kprobes { "works" } else { "refused" });
        // conntrack is built in here: no module hooks to probe.
        assert_eq!(probe(&doc, "fentry_module")["result"], "not_applicable");
        assert_eq!(doc["backend"]["backend"], if kprobes { "function_hooks" } else { "tracepoint" });
    }
}

#[test]
fn doctor_without_privileges_names_the_capabilities_and_fails() {
    require_root();
    // setpriv drops to nobody with no capabilities.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(ctguard_integration::bin::ctguard_bin())
        .arg("doctor")
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(stderr.contains(cap), "missing {cap} in: {stderr}");
    }
}
