//! `ctguard doctor`: what this kernel allows, measured by loading programs.
mod backend;
mod probes;
mod raw_bpf;
mod render;

use std::process::ExitCode;

use serde::Serialize;

pub use self::{
    backend::{BackendChoice, KernelFacts},
    probes::{ConntrackPlacement, HookKind, Outcome, Probe},
};
use crate::{
    cli::DoctorArgs,
    kernel::{btf::KernelBtf, system},
    sensors::{SensorOptions, Sensors},
    util::error_chain,
};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub lockdown: Option<String>,
    pub btf: BtfReport,
    pub conntrack: ConntrackReport,
    pub probes: Vec<Probe>,
    pub backend: BackendChoice,
    /// Whether ctguard's real sensor programs loaded and attached just now
    /// (Ok holds the backend they used: `tracepoint` or `function_hooks`).
    pub sensors_load: Result<String, String>,
    /// Why the sensors took that backend (their own `can_run` check).
    pub sensors_reason: Option<String>,
}

impl Report {
    /// The sensors loaded, and with the backend the probes predicted.
    pub fn sensors_agree(&self) -> bool {
        self.sensors_load.as_deref().is_ok_and(|b| b == self.backend.backend)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BtfReport {
    pub vmlinux: bool,
    /// /sys/kernel/btf/nf_conntrack (only when conntrack is a loaded module).
    pub nf_conntrack_module: bool,
    pub kfree_skb_has_reason: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConntrackReport {
    pub placement: ConntrackPlacement,
    /// Entries in the namespace ctguard runs in.
    pub entries: Option<u64>,
    pub max: Option<u64>,
    /// Entries exist or counters moved here: some rule uses conntrack.
    pub active_here: bool,
    /// doctor loaded the nf_conntrack module just now (as the sensors would).
    pub module_loaded_now: bool,
    /// Why loading the module failed, if it did.
    pub module_load_error: Option<String>,
}

pub fn run(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    system::require_bpf_caps()?;
    let report = collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::table(&report));
    }
    Ok(if report.backend.backend == "none" || !report.sensors_agree() { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

pub fn collect() -> Report {
    let vmlinux = std::path::Path::new(crate::kernel::btf::VMLINUX_BTF).exists();
    let kfree_skb_has_reason =
        KernelBtf::vmlinux().and_then(|b| b.tracepoint_arg_count("kfree_skb")).is_ok_and(|n| n >= 3);
    let btf = if vmlinux { aya::Btf::from_sys_fs().ok() } else { None };
    // Loading the module (if needed) is what the sensors would do too; the
    // report then shows the backend they would really use.
    let loaded_module = system::ensure_conntrack_loaded();
    let placement = probes::conntrack_placement();
    let probes = probes::run_all(btf.as_ref(), placement);
    let missing_functions = crate::kernel::kallsyms::Kallsyms::read()
        .map(|syms| crate::sensors::backend::probe_host(&syms).missing_functions)
        .unwrap_or_else(|_| crate::sensors::backend::HOOKED_FUNCTIONS.to_vec());
    let backend =
        backend::choose(&probes, &KernelFacts { vmlinux_btf: vmlinux, kfree_skb_has_reason, missing_functions });
    let (sensors_load, sensors_reason) = if backend.backend == "none" {
        (Err("no usable backend".to_string()), None)
    } else {
        // Load the real sensors the way `trace`/`top` would (automatic choice).
        match Sensors::start(&SensorOptions::default()) {
            Ok(s) => (Ok(s.backend.name().to_string()), Some(s.backend_reason.clone())),
            Err(e) => (Err(error_chain(&e)), None),
        }
    };
    Report {
        kernel: system::kernel_release(),
        lockdown: system::lockdown_mode(),
        btf: BtfReport {
            vmlinux,
            nf_conntrack_module: std::path::Path::new("/sys/kernel/btf/nf_conntrack").exists(),
            kfree_skb_has_reason,
        },
        conntrack: ConntrackReport {
            module_loaded_now: *loaded_module.as_ref().unwrap_or(&false),
            module_load_error: loaded_module.as_ref().err().map(|e| e.to_string()),
            ..conntrack_here(placement)
        },
        probes,
        backend,
        sensors_load,
        sensors_reason,
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn conntrack_here(placement: ConntrackPlacement) -> ConntrackReport {
    let entries = read_u64("/proc/sys/net/netfilter/nf_conntrack_count");
    let moved = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").is_ok_and(|s| {
        // Any non-zero counter column (after "entries") on any CPU row.
        s.lines().skip(1).any(|row| row.split_whitespace().skip(1).any(|v| !v.trim_start_matches('0').is_empty()))
    });
    ConntrackReport {
        placement,
        entries,
        max: read_u64("/proc/sys/net/netfilter/nf_conntrack_max"),
        active_here: entries.is_some_and(|n| n > 0) || moved,
        module_loaded_now: false,
        module_load_error: None,
    }
}
