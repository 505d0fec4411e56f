//! The read-only globals the kernel programs need, resolved from the running
//! kernel's BTF and /proc/kallsyms (kernel reference §2, §4, §5).
use crate::{
    error::CtguardError,
    kernel::{btf::KernelBtf, kallsyms::Kallsyms},
};

/// Every value handed to the kernel programs before load, by global name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub u32s: Vec<(&'static str, u32)>,
    pub u64s: Vec<(&'static str, u64)>,
    /// Functions the drop classifier needs but this kernel lacks (e.g. nf_tables
    /// not loaded): drops freed there are reported as `other`.
    pub missing_functions: Vec<&'static str>,
}

impl Layout {
    pub fn resolve(btf: &KernelBtf, syms: &Kallsyms) -> Result<Self, CtguardError> {
        if btf.tracepoint_arg_count("kfree_skb")? < 3 {
            return Err(CtguardError::Btf {
                what: "tracepoint skb:kfree_skb has no drop reason on this kernel (before 5.15.58)".into(),
            });
        }
        let tuple = |path: &[&str]| btf.offset("nf_conntrack_tuple", path);
        let u32s = vec![
            ("NF_DROP_REASON", btf.enum_value("SKB_DROP_REASON_NETFILTER_DROP")? as u32),
            ("OFF_SKB_NFCT", btf.offset("sk_buff", &["_nfct"])?),
            ("OFF_SKB_DEV", btf.offset("sk_buff", &["dev"])?),
            ("OFF_SKB_SK", btf.offset("sk_buff", &["sk"])?),
            ("OFF_SKB_HEAD", btf.offset("sk_buff", &["head"])?),
            ("OFF_SKB_NETWORK_HEADER", btf.offset("sk_buff", &["network_header"])?),
            ("OFF_SKB_LEN", btf.offset("sk_buff", &["len"])?),
            ("OFF_SKB_DATA", btf.offset("sk_buff", &["data"])?),
            ("OFF_SKB_DATA_LEN", btf.offset("sk_buff", &["data_len"])?),
            ("OFF_DEV_IFINDEX", btf.offset("net_device", &["ifindex"])?),
            ("OFF_DEV_NET", btf.offset("net_device", &["nd_net", "net"])?),
            ("OFF_SK_NET", btf.offset("sock", &["__sk_common", "skc_net", "net"])?),
            ("OFF_NET_INUM", btf.offset("net", &["ns", "inum"])?),
            ("OFF_CT_TUPLE", btf.offset("nf_conn", &["tuplehash", "tuple"])?),
            ("OFF_CT_STATUS", btf.offset("nf_conn", &["status"])?),
            ("OFF_CT_NET", btf.offset("nf_conn", &["ct_net", "net"])?),
            ("OFF_CT_ZONE", btf.optional_offset("nf_conn", &["zone", "id"])?.unwrap_or(u32::MAX)),
            ("OFF_TUPLE_SRC_ADDR", tuple(&["src", "u3"])?),
            ("OFF_TUPLE_SRC_PORT", tuple(&["src", "u", "all"])?),
            ("OFF_TUPLE_L3NUM", tuple(&["src", "l3num"])?),
            ("OFF_TUPLE_DST_ADDR", tuple(&["dst", "u3"])?),
            ("OFF_TUPLE_DST_PORT", tuple(&["dst", "u", "all"])?),
            ("OFF_TUPLE_PROTO", tuple(&["dst", "protonum"])?),
            ("OFF_CACHE_OBJECT_SIZE", btf.offset("kmem_cache", &["object_size"])?),
            ("OFF_CACHE_NAME", btf.offset("kmem_cache", &["name"])?),
            ("NF_CONN_SIZE", btf.struct_size("nf_conn")?),
        ];
        let mut missing_functions = Vec::new();
        let mut range = |name: &'static str| match syms.function_range(name) {
            Some(r) => (r.start, r.end),
            None => {
                missing_functions.push(name);
                (0, 0)
            }
        };
        let (nft_start, nft_end) = range("nft_do_chain");
        let (hook_start, hook_end) = range("nf_hook_slow");
        let u64s = vec![
            ("NFT_DO_CHAIN_START", nft_start),
            ("NFT_DO_CHAIN_END", nft_end),
            ("NF_HOOK_SLOW_START", hook_start),
            ("NF_HOOK_SLOW_END", hook_end),
        ];
        Ok(Self { u32s, u64s, missing_functions })
    }

    /// Resolves the layout of the running kernel. nf_conntrack's types live in
    /// its module BTF when it is a module.
    pub fn for_running_kernel() -> Result<Self, CtguardError> {
        let btf = if std::path::Path::new("/sys/kernel/btf/nf_conntrack").exists() {
            KernelBtf::with_module("nf_conntrack")?
        } else {
            KernelBtf::vmlinux()?
        };
        Self::resolve(&btf, &Kallsyms::read()?)
    }
}
