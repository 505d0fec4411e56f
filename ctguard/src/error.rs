//! Errors a user can see. Each names what went wrong and carries a hint on
//! what to do about it; `main` prints both and picks the exit code.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CtguardError {
    #[error(
        "{what}\n  hint: run ctguard as root, or grant it CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (plus CAP_SYS_ADMIN to enter other network namespaces)"
    )]
    Privileges { what: String },

    #[error(
        "kernel BTF: {what}\n  hint: ctguard needs a kernel built with CONFIG_DEBUG_INFO_BTF=y; `ctguard doctor` shows what this kernel offers"
    )]
    Btf { what: String },

    #[error(
        "kernel symbols: {what}\n  hint: run as root with kernel.kptr_restrict <= 1 so /proc/kallsyms shows addresses"
    )]
    Kallsyms { what: String },

    #[error(
        "network namespace {name}: {what}\n  hint: name one from `ip netns list`, a path such as /proc/PID/ns/net, or `all`"
    )]
    Netns { name: String, what: String },

    #[error("conntrack: {what}\n  hint: {hint}")]
    Conntrack { what: String, hint: String },

    #[error("eBPF: {what}\n  hint: {hint}")]
    Ebpf { what: String, hint: String },

    #[error("{what}\n  hint: {hint}")]
    Usage { what: String, hint: String },
}

impl CtguardError {
    pub fn ebpf(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Ebpf { what: what.into(), hint: hint.into() }
    }
    pub fn usage(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Usage { what: what.into(), hint: hint.into() }
    }
}
