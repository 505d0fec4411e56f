//! Which sensor backend ctguard uses, decided from what the probes measured.
//! Pure, so every combination is unit-tested.
use serde::Serialize;

use super::probes::{HookKind, Probe};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendChoice {
    /// `tracepoint`, or `none` when ctguard cannot run here.
    pub backend: &'static str,
    /// Per sensor: which hooks it uses.
    pub sensors: Vec<SensorPlan>,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SensorPlan {
    pub sensor: &'static str,
    pub hooks: &'static str,
}

/// Facts besides the probes that the choice depends on.
#[derive(Clone, Debug, Default)]
pub struct KernelFacts {
    pub vmlinux_btf: bool,
    /// skb:kfree_skb carries a drop reason (5.15.58+).
    pub kfree_skb_has_reason: bool,
    /// Hooked conntrack functions missing from kallsyms.
    pub missing_functions: Vec<&'static str>,
}

pub fn choose(probes: &[Probe], facts: &KernelFacts) -> BackendChoice {
    let works = |k: HookKind| probes.iter().any(|p| p.hook == k && p.works());
    if !facts.vmlinux_btf {
        return none("the kernel has no BTF (/sys/kernel/btf/vmlinux): ctguard cannot resolve struct layouts");
    }
    if !works(HookKind::RawTp) {
        return none("raw_tp programs do not load: the tracepoint backend needs them");
    }
    if !facts.kfree_skb_has_reason {
        return none("skb:kfree_skb has no drop reason on this kernel (needs 5.15.58+)");
    }
    if works(HookKind::Kprobe) && facts.missing_functions.is_empty() {
        return BackendChoice {
            backend: "function_hooks",
            sensors: vec![
                SensorPlan { sensor: "drops", hooks: "raw_tp skb:kfree_skb + kretprobes __nf_conntrack_alloc / __nf_conntrack_confirm (certain cause, refused tuple)" },
                SensorPlan { sensor: "new entries", hooks: "kprobe + kretprobe __nf_conntrack_alloc" },
                SensorPlan { sensor: "removed entries", hooks: "raw_tp kmem:kmem_cache_free on the nf_conntrack slab" },
                SensorPlan { sensor: "evictions", hooks: "kprobe/kretprobe early_drop + kretprobe nf_ct_delete" },
            ],
            reason: "kprobes work and every hooked conntrack function is in kallsyms (fentry on module functions is not used: \
                     aya cannot pass module BTF, kprobes reach module functions directly)"
                .into(),
        };
    }
    let why_not = if !works(HookKind::Kprobe) {
        "kprobes do not work here".to_string()
    } else {
        format!("hooked functions missing from kallsyms: {}", facts.missing_functions.join(", "))
    };
    BackendChoice {
        backend: "tracepoint",
        sensors: vec![
            SensorPlan { sensor: "drops", hooks: "raw_tp skb:kfree_skb (reason NETFILTER_DROP)" },
            SensorPlan {
                sensor: "new/removed entries",
                hooks: "raw_tp kmem:kmem_cache_alloc / kmem_cache_free on the nf_conntrack slab",
            },
        ],
        reason: format!("raw tracepoints work and the kernel has BTF; function hooks unavailable: {why_not}"),
    }
}

fn none(reason: &str) -> BackendChoice {
    BackendChoice { backend: "none", sensors: vec![], reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::probes::Outcome;

    fn probe(hook: HookKind, ok: bool) -> Probe {
        Probe {
            hook,
            target: "x".into(),
            outcome: if ok { Outcome::Works } else { Outcome::Refused { errno: Some(1), error: "EPERM".into() } },
        }
    }

    fn good() -> KernelFacts {
        KernelFacts { vmlinux_btf: true, kfree_skb_has_reason: true, missing_functions: vec![] }
    }

    #[test]
    fn locked_down_kernel_uses_tracepoints_and_says_why() {
        let c = choose(&[probe(HookKind::RawTp, true), probe(HookKind::Kprobe, false)], &good());
        assert_eq!(c.backend, "tracepoint");
        assert!(c.reason.contains("kprobes do not work"), "{}", c.reason);
        assert_eq!(c.sensors.len(), 2);
    }

    #[test]
    fn distro_kernel_uses_function_hooks() {
        let c = choose(&[probe(HookKind::RawTp, true), probe(HookKind::Kprobe, true)], &good());
        assert_eq!(c.backend, "function_hooks");
        let inlined = KernelFacts { missing_functions: vec!["early_drop"], ..good() };
        let c = choose(&[probe(HookKind::RawTp, true), probe(HookKind::Kprobe, true)], &inlined);
        assert_eq!(c.backend, "tracepoint");
        assert!(c.reason.contains("early_drop"), "{}", c.reason);
    }

    #[test]
    fn no_backend_without_raw_tp_btf_or_reason() {
        assert_eq!(choose(&[probe(HookKind::RawTp, false)], &good()).backend, "none");
        assert_eq!(
            choose(&[probe(HookKind::RawTp, true)], &KernelFacts { vmlinux_btf: false, ..good() }).backend,
            "none"
        );
        assert_eq!(
            choose(&[probe(HookKind::RawTp, true)], &KernelFacts { kfree_skb_has_reason: false, ..good() }).backend,
            "none"
        );
    }
}
