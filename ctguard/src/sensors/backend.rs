//! Which hooks feed the sensors, and whether this kernel can run them
//! (a `can_run` check per backend, so the choice is explained, not guessed).
use std::path::Path;

use serde::Serialize;

use crate::kernel::kallsyms::Kallsyms;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// raw_tp on skb:kfree_skb and kmem:kmem_cache_alloc/free: works on every
    /// kernel with BTF, including locked-down ones.
    Tracepoint,
    /// kprobes/kretprobes on nf_conntrack's functions (__nf_conntrack_alloc,
    /// __nf_conntrack_confirm, early_drop, nf_ct_delete) plus the drop and
    /// free tracepoints: certain attribution, the refused flow's own tuple,
    /// counted evictions. Needs kprobes (stock distro kernels have them).
    FunctionHooks,
}

impl Backend {
    /// The name used in JSON and by `--backend`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tracepoint => "tracepoint",
            Backend::FunctionHooks => "function_hooks",
        }
    }
}

/// `--backend`: automatic, or forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendRequest {
    /// Function hooks where the kernel allows them, else tracepoints.
    #[default]
    Auto,
    Tracepoint,
    FunctionHooks,
}

/// Kernel functions the function-hook backend attaches to.
pub const HOOKED_FUNCTIONS: [&str; 4] =
    ["__nf_conntrack_alloc", "__nf_conntrack_confirm", "early_drop", "nf_ct_delete"];

/// Facts the choice depends on, gathered by [`probe_host`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub kprobe_pmu: bool,
    /// Hooked functions missing from kallsyms (inlined or renamed).
    pub missing_functions: Vec<&'static str>,
}

pub fn probe_host(syms: &Kallsyms) -> HostFacts {
    HostFacts {
        kprobe_pmu: Path::new("/sys/bus/event_source/devices/kprobe/type").exists(),
        missing_functions: HOOKED_FUNCTIONS.iter().copied().filter(|f| syms.function_range(f).is_none()).collect(),
    }
}

/// Why the function-hook backend cannot run here, or Ok.
pub fn function_hooks_can_run(facts: &HostFacts) -> Result<(), String> {
    if !facts.kprobe_pmu {
        return Err("the kernel has no kprobes (no /sys/bus/event_source/devices/kprobe)".into());
    }
    if !facts.missing_functions.is_empty() {
        return Err(format!("not in /proc/kallsyms (inlined or renamed): {}", facts.missing_functions.join(", ")));
    }
    Ok(())
}

/// The backend to use, or why the request cannot be met.
pub fn choose(request: BackendRequest, facts: &HostFacts) -> Result<(Backend, String), String> {
    match (request, function_hooks_can_run(facts)) {
        (BackendRequest::Tracepoint, _) => Ok((Backend::Tracepoint, "requested with --backend tracepoint".into())),
        (BackendRequest::FunctionHooks, Ok(())) => {
            Ok((Backend::FunctionHooks, "requested with --backend function-hooks".into()))
        }
        (BackendRequest::FunctionHooks, Err(why)) => Err(format!("--backend function-hooks cannot run: {why}")),
        (BackendRequest::Auto, Ok(())) => {
            Ok((Backend::FunctionHooks, "kprobes and every hooked function are available".into()))
        }
        (BackendRequest::Auto, Err(why)) => Ok((Backend::Tracepoint, format!("function hooks unavailable: {why}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: HostFacts = HostFacts { kprobe_pmu: true, missing_functions: Vec::new() };

    #[test]
    fn auto_prefers_function_hooks_when_possible() {
        assert_eq!(choose(BackendRequest::Auto, &GOOD).unwrap().0, Backend::FunctionHooks);
        let locked = HostFacts { kprobe_pmu: false, ..GOOD };
        let (b, why) = choose(BackendRequest::Auto, &locked).unwrap();
        assert_eq!(b, Backend::Tracepoint);
        assert!(why.contains("no kprobes"), "{why}");
    }

    #[test]
    fn forced_function_hooks_fail_with_the_reason() {
        let inlined = HostFacts { missing_functions: vec!["early_drop"], ..GOOD };
        let err = choose(BackendRequest::FunctionHooks, &inlined).unwrap_err();
        assert!(err.contains("early_drop"), "{err}");
        assert_eq!(choose(BackendRequest::Tracepoint, &GOOD).unwrap().0, Backend::Tracepoint);
    }
}
