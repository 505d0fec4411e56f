//! One probe per hook kind: load (and attach) a tiny program from ctguard's
//! own object and report exactly what the kernel said. Nothing is guessed from
//! the kernel config.
use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, RawTracePoint, TracePoint},
};
use serde::Serialize;

use super::raw_bpf;
use crate::{
    kernel::{btf::KernelBtf, system},
    sensors::object_bytes,
    util::error_chain,
};

/// The hook kinds ctguard can use or may use in the future.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    Tracepoint,
    TpBtf,
    RawTp,
    FentryVmlinux,
    FexitVmlinux,
    FentryModule,
    FexitModule,
    Kprobe,
    NetfilterLink,
}

impl HookKind {
    pub fn label(self) -> &'static str {
        match self {
            HookKind::Tracepoint => "tracepoint",
            HookKind::TpBtf => "tp_btf",
            HookKind::RawTp => "raw_tp",
            HookKind::FentryVmlinux => "fentry (vmlinux)",
            HookKind::FexitVmlinux => "fexit (vmlinux)",
            HookKind::FentryModule => "fentry (module)",
            HookKind::FexitModule => "fexit (module)",
            HookKind::Kprobe => "kprobe",
            HookKind::NetfilterLink => "netfilter link",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Loaded and attached.
    Works,
    /// The kernel refused; `errno` when it gave one.
    Refused { errno: Option<i32>, error: String },
    /// The probe does not apply on this host.
    NotApplicable { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub hook: HookKind,
    /// What was attached to.
    pub target: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Probe {
    pub fn works(&self) -> bool {
        self.outcome == Outcome::Works
    }
}

/// Where conntrack's functions live on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConntrackPlacement {
    BuiltIn,
    Module,
    /// A module that is not loaded (nothing uses conntrack yet).
    ModuleNotLoaded,
    Absent,
}

pub fn conntrack_placement() -> ConntrackPlacement {
    let module_dir = std::path::Path::new("/sys/module/nf_conntrack");
    if !module_dir.exists() {
        // Built-in modules still get /sys/module/NAME when they have
        // parameters; nf_conntrack has (hashsize), so no directory means not loaded.
        let available = std::fs::read_to_string(format!("/lib/modules/{}/modules.dep", system::kernel_release()))
            .is_ok_and(|deps| deps.contains("/nf_conntrack.ko"));
        return if available { ConntrackPlacement::ModuleNotLoaded } else { ConntrackPlacement::Absent };
    }
    // Only loadable modules have an initstate file.
    if module_dir.join("initstate").exists() { ConntrackPlacement::Module } else { ConntrackPlacement::BuiltIn }
}

/// Extracts the errno from an error chain such as `... (os error 1)`.
pub fn errno_of(message: &str) -> Option<i32> {
    let start = message.rfind("os error ")? + "os error ".len();
    message[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

fn outcome(result: Result<(), ProgramError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Works,
        Err(e) => {
            let error = error_chain(&e);
            Outcome::Refused { errno: errno_of(&error), error }
        }
    }
}

fn fresh_object() -> Result<Ebpf, String> {
    Ebpf::load(object_bytes()).map_err(|e| format!("cannot load ctguard's object: {}", error_chain(&e)))
}

/// Runs `f` on a fresh copy of the object (one program per copy, so a probe
/// never inherits another probe's state) and turns its result into an outcome.
fn with_program<T>(name: &str, f: impl FnOnce(&mut T) -> Result<(), ProgramError>) -> Outcome
where
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let mut ebpf = match fresh_object() {
        Ok(e) => e,
        Err(error) => return Outcome::Refused { errno: None, error },
    };
    let Some(prog) = ebpf.program_mut(name).and_then(|p| <&mut T>::try_from(p).ok()) else {
        return Outcome::Refused { errno: None, error: format!("program {name} missing from the object") };
    };
    outcome(f(prog))
}

/// A vmlinux function every netfilter kernel has (netfilter's core is never a module).
const VMLINUX_TARGET: &str = "nf_hook_slow";
/// The conntrack function the function-hook backend needs.
const CONNTRACK_TARGET: &str = "__nf_conntrack_alloc";

pub fn run_all(btf: Option<&Btf>, placement: ConntrackPlacement) -> Vec<Probe> {
    let mut probes = Vec::new();
    let tracefs = system::ensure_tracefs();
    probes.push(Probe {
        hook: HookKind::Tracepoint,
        target: "skb:kfree_skb".into(),
        outcome: match &tracefs {
            Ok(_) => with_program::<TracePoint>("probe_tracepoint", |p| {
                p.load()?;
                p.attach("skb", "kfree_skb").map(drop)
            }),
            Err(e) => Outcome::Refused { errno: None, error: e.to_string() },
        },
    });
    let need_btf = |reason: &str| Outcome::NotApplicable { reason: format!("no kernel BTF ({reason})") };
    probes.push(Probe {
        hook: HookKind::TpBtf,
        target: "kfree_skb".into(),
        outcome: match btf {
            Some(btf) => with_program::<BtfTracePoint>("probe_tp_btf", |p| {
                p.load("kfree_skb", btf)?;
                p.attach().map(drop)
            }),
            None => need_btf("tp_btf needs it"),
        },
    });
    probes.push(Probe {
        hook: HookKind::RawTp,
        target: "kfree_skb".into(),
        outcome: with_program::<RawTracePoint>("probe_raw_tp", |p| {
            p.load()?;
            p.attach("kfree_skb").map(drop)
        }),
    });
    for (hook, name) in [(HookKind::FentryVmlinux, "probe_fentry"), (HookKind::FexitVmlinux, "probe_fexit")] {
        let outcome = match btf {
            None => need_btf("fentry/fexit need it"),
            Some(btf) if hook == HookKind::FentryVmlinux => with_program::<FEntry>(name, |p| {
                p.load(VMLINUX_TARGET, btf)?;
                p.attach().map(drop)
            }),
            Some(btf) => with_program::<FExit>(name, |p| {
                p.load(VMLINUX_TARGET, btf)?;
                p.attach().map(drop)
            }),
        };
        probes.push(Probe { hook, target: VMLINUX_TARGET.into(), outcome });
    }
    for (hook, fexit) in [(HookKind::FentryModule, false), (HookKind::FexitModule, true)] {
        let outcome = match module_not_applicable(placement) {
            Some(reason) => Outcome::NotApplicable { reason },
            None => module_tracing_outcome(fexit),
        };
        probes.push(Probe { hook, target: format!("nf_conntrack:{CONNTRACK_TARGET}"), outcome });
    }
    probes.push(Probe {
        hook: HookKind::Kprobe,
        target: VMLINUX_TARGET.into(),
        outcome: with_program::<KProbe>("probe_kprobe", |p| {
            p.load()?;
            p.attach(VMLINUX_TARGET, 0).map(drop)
        }),
    });
    probes.push(Probe {
        hook: HookKind::NetfilterLink,
        target: "ipv4 LOCAL_OUT".into(),
        outcome: match raw_bpf::probe_netfilter_link() {
            Ok(()) => Outcome::Works,
            Err(e) => Outcome::Refused { errno: e.raw_os_error(), error: e.to_string() },
        },
    });
    probes
}

/// Why fentry/fexit on nf_conntrack's functions cannot be probed as module
/// hooks here, or None when conntrack is a loaded module.
fn module_not_applicable(placement: ConntrackPlacement) -> Option<String> {
    match placement {
        ConntrackPlacement::Module => None,
        ConntrackPlacement::BuiltIn => Some(
            "nf_conntrack is built into vmlinux here: its functions are vmlinux functions (see the vmlinux rows)"
                .into(),
        ),
        ConntrackPlacement::Absent => Some("this kernel has no nf_conntrack".into()),
        ConntrackPlacement::ModuleNotLoaded => Some(
            "nf_conntrack is a module that is not loaded; load it (modprobe nf_conntrack) and run doctor again".into(),
        ),
    }
}

/// fentry/fexit on a module function needs the module's BTF object at load
/// time, which aya 0.14 cannot pass: measured with bpf(2) directly.
fn module_tracing_outcome(fexit: bool) -> Outcome {
    let func_id = match KernelBtf::with_module("nf_conntrack").and_then(|b| b.function_id(CONNTRACK_TARGET)) {
        Ok(id) => id,
        Err(e) => return Outcome::Refused { errno: None, error: e.to_string() },
    };
    match raw_bpf::probe_module_tracing("nf_conntrack", func_id, fexit) {
        Ok(()) => Outcome::Works,
        Err(e) => Outcome::Refused { errno: e.raw_os_error(), error: e.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_found_in_chains() {
        assert_eq!(errno_of("the BPF_PROG_LOAD syscall failed: Operation not permitted (os error 1)"), Some(1));
        assert_eq!(errno_of("`bpf_link_create` failed: Device or resource busy (os error 16)"), Some(16));
        assert_eq!(errno_of("no errno here"), None);
    }

    #[test]
    fn module_hooks_are_measured_only_where_conntrack_is_a_loaded_module() {
        assert_eq!(module_not_applicable(ConntrackPlacement::Module), None);
        for p in [ConntrackPlacement::BuiltIn, ConntrackPlacement::Absent, ConntrackPlacement::ModuleNotLoaded] {
            assert!(module_not_applicable(p).is_some(), "{p:?}");
        }
    }
}
