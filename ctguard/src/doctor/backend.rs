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
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelFacts {
    pub vmlinux_btf: bool,
    /// skb:kfree_skb carries a drop reason (5.15.58+).
    pub kfree_skb_has_reason: bool,
}

pub fn choose(probes: &[Probe], facts: KernelFacts) -> BackendChoice {
    let works = |k: HookKind| probes.iter().any(|p| p.hook == k && p.works());
    let fentry_note = if works(HookKind::FentryVmlinux) {
        "fentry works here too; the function-hook backend is not in this version yet"
    } else {
        "fentry/fexit are refused here, so the tracepoint backend is also the only possible one"
    };
    if !facts.vmlinux_btf {
        return none("the kernel has no BTF (/sys/kernel/btf/vmlinux): ctguard cannot resolve struct layouts");
    }
    if !works(HookKind::TpBtf) {
        return none("tp_btf programs do not load: the tracepoint backend needs them");
    }
    if !facts.kfree_skb_has_reason {
        return none("skb:kfree_skb has no drop reason on this kernel (needs 5.15.58+)");
    }
    BackendChoice {
        backend: "tracepoint",
        sensors: vec![
            SensorPlan { sensor: "drops", hooks: "tp_btf skb:kfree_skb (reason NETFILTER_DROP)" },
            SensorPlan { sensor: "new/removed entries", hooks: "tp_btf kmem:kmem_cache_alloc / kmem_cache_free on the nf_conntrack slab" },
        ],
        reason: format!("tp_btf works and the kernel has BTF; {fentry_note}"),
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

    const GOOD: KernelFacts = KernelFacts { vmlinux_btf: true, kfree_skb_has_reason: true };

    #[test]
    fn locked_down_kernel_uses_tracepoints_and_says_fentry_is_refused() {
        let c = choose(&[probe(HookKind::TpBtf, true), probe(HookKind::FentryVmlinux, false)], GOOD);
        assert_eq!(c.backend, "tracepoint");
        assert!(c.reason.contains("refused"), "{}", c.reason);
        assert_eq!(c.sensors.len(), 2);
    }

    #[test]
    fn fentry_capable_kernel_is_told_apart() {
        let c = choose(&[probe(HookKind::TpBtf, true), probe(HookKind::FentryVmlinux, true)], GOOD);
        assert_eq!(c.backend, "tracepoint");
        assert!(c.reason.contains("fentry works"), "{}", c.reason);
    }

    #[test]
    fn no_backend_without_tp_btf_btf_or_reason() {
        assert_eq!(choose(&[probe(HookKind::TpBtf, false)], GOOD).backend, "none");
        assert_eq!(choose(&[probe(HookKind::TpBtf, true)], KernelFacts { vmlinux_btf: false, ..GOOD }).backend, "none");
        assert_eq!(choose(&[probe(HookKind::TpBtf, true)], KernelFacts { kfree_skb_has_reason: false, ..GOOD }).backend, "none");
    }
}
