//! ctguard's kernel programs.
//!
//! Sensors (tracepoint backend, works on every kernel with BTF, including
//! locked-down ones):
//! - `ctg_kfree_skb` (raw_tp `skb:kfree_skb`): every packet netfilter drops,
//!   classified by cause, counted per netns and sent as an event.
//! - `ctg_ct_alloc` / `ctg_ct_free` (raw_tp `kmem:kmem_cache_alloc/free` on the
//!   `nf_conntrack` slab): exact counts of new and removed entries, keyed by
//!   the flow key the user chose.
//! - `ctg_flush` (raw_tp, never attached): run by userspace on each CPU through
//!   BPF_PROG_TEST_RUN to key the last new entry a CPU has seen (see PENDING).
//!
//! Probes (`probe_*`): tiny programs `ctguard doctor` loads to learn what the
//! running kernel allows.
//!
//! No struct layout is compiled in: every offset and enum value is a read-only
//! global that userspace fills from the running kernel's BTF before loading.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, map, raw_tracepoint, tracepoint},
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext,
        TracePointContext,
    },
};
use aya_log_ebpf::info;
use ctguard_ebpf::{
    CTINFO_NONE, ChurnKey, ChurnValue, DropKey, Event, FlowTuple, MAX_CAPTURE, PacketEvent, cause, confidence, counter,
    event_kind, key_mode,
};

// ---------------------------------------------------------------------------
// Read-only globals, set by the loader from BTF and /proc/kallsyms.
// ---------------------------------------------------------------------------

macro_rules! globals {
    ($($name:ident: $ty:ty),* $(,)?) => {
        $(#[unsafe(no_mangle)] static $name: $ty = 0;)*
    };
}

globals! {
    // enum skb_drop_reason value of SKB_DROP_REASON_NETFILTER_DROP.
    NF_DROP_REASON: u32,
    // struct sk_buff
    OFF_SKB_NFCT: u32, OFF_SKB_DEV: u32, OFF_SKB_SK: u32, OFF_SKB_HEAD: u32,
    OFF_SKB_NETWORK_HEADER: u32, OFF_SKB_LEN: u32, OFF_SKB_DATA: u32, OFF_SKB_DATA_LEN: u32,
    // struct net_device
    OFF_DEV_IFINDEX: u32, OFF_DEV_NET: u32,
    // struct sock (sk->__sk_common.skc_net)
    OFF_SK_NET: u32,
    // struct net (net->ns.inum)
    OFF_NET_INUM: u32,
    // struct nf_conn
    OFF_CT_TUPLE: u32, OFF_CT_STATUS: u32, OFF_CT_NET: u32,
    // zone id offset, or u32::MAX when the kernel has no conntrack zones.
    OFF_CT_ZONE: u32,
    // struct nf_conntrack_tuple
    OFF_TUPLE_SRC_ADDR: u32, OFF_TUPLE_SRC_PORT: u32, OFF_TUPLE_L3NUM: u32,
    OFF_TUPLE_DST_ADDR: u32, OFF_TUPLE_DST_PORT: u32, OFF_TUPLE_PROTO: u32,
    // struct kmem_cache
    OFF_CACHE_OBJECT_SIZE: u32, OFF_CACHE_NAME: u32,
    // sizeof(struct nf_conn): a cheap pre-filter before the name comparison.
    NF_CONN_SIZE: u32,
    // Text ranges of the functions that free dropped packets.
    NFT_DO_CHAIN_START: u64, NFT_DO_CHAIN_END: u64,
    NF_HOOK_SLOW_START: u64, NF_HOOK_SLOW_END: u64,
    // key_mode::* and whether new entries also go out as events.
    KEY_MODE: u8,
    EMIT_NEW_EVENTS: u8,
    // 0 when nobody reads drop events (top, lab): only the maps count them.
    EMIT_DROP_EVENTS: u8,
    // Bytes of each dropped packet to send with its event (0: none).
    CAPTURE_BYTES: u32,
}

/// Reads a global the loader set. The volatile read keeps the compiler from
/// folding in the zero it was compiled with; the verifier then sees a constant
/// because the section is frozen read-only.
#[inline(always)]
fn g<T: Copy>(v: &T) -> T {
    unsafe { core::ptr::read_volatile(v) }
}

// ---------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU space to assemble a drop event in (see on_netfilter_drop).
#[map]
static SCRATCH: PerCpuArray<PacketEvent> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map]
static CHURN: PerCpuHashMap<ChurnKey, ChurnValue> = PerCpuHashMap::with_max_entries(16384, 0);

/// Per-namespace totals of keys that found CHURN full.
#[map]
static OTHER_KEYS: PerCpuHashMap<u32, ChurnValue> = PerCpuHashMap::with_max_entries(4096, 0);

#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// The conntrack entry this CPU allocated last whose key is not counted yet.
/// At `kmem_cache_alloc` the new `nf_conn` is still uninitialised (the tuple is
/// written right after the allocation returns), so its key is read at the next
/// conntrack event on the same CPU, or when userspace runs `ctg_flush` there.
#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    ct: u64,
    ts_ns: u64,
}

#[map]
static PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// The `struct kmem_cache *` of the nf_conntrack slab once recognised, so the
/// hot path is one pointer comparison.
#[map]
static CT_CACHE: Array<u64> = Array::with_max_entries(1, 0);

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

#[inline(always)]
fn read<T: Copy + Default>(base: u64, off: u32) -> T {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.unwrap_or_default()
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn net_inum(net: u64) -> u32 {
    if net == 0 { 0 } else { read::<u32>(net, g(&OFF_NET_INUM)) }
}

// ---------------------------------------------------------------------------
// Drops: tp_btf skb:kfree_skb
// ---------------------------------------------------------------------------

const NFCT_INFOMASK: u64 = 7;
const IP_CT_UNTRACKED: u64 = 7;
const IPS_CONFIRMED: u32 = 1 << 3;

// Raw tracepoints, not tp_btf: older verifiers (6.1, 6.12) refuse tp_btf
// reads of `void *` arguments (kfree_skb's location, the slab object), and
// every pointer here is read with bpf_probe_read_kernel anyway.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn ctg_kfree_skb(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(skb, location, reason[, rx_sk]); reason is an enum (u32).
    let reason: u64 = ctx.arg(2);
    if reason as u32 != g(&NF_DROP_REASON) {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    bump(counter::NF_DROPS);
    on_netfilter_drop(skb, location);
    0
}

#[inline(always)]
fn on_netfilter_drop(skb: u64, location: u64) {
    let nfct: u64 = read(skb, g(&OFF_SKB_NFCT));
    let ct = nfct & !NFCT_INFOMASK;
    let ctinfo = nfct & NFCT_INFOMASK;
    let ct_status: u32 = if ct != 0 { read(ct, g(&OFF_CT_STATUS)) } else { 0 };

    let (mut drop_cause, mut conf) = classify_drop(location, ct, ctinfo, ct_status);
    // With the function-hook backend, conntrack told us (on this CPU, in this
    // very call chain) whether it refused an allocation or failed a confirm.
    let verdict = take_verdict();
    if let Some(v) = verdict {
        if location >= g(&NF_HOOK_SLOW_START) && location < g(&NF_HOOK_SLOW_END) {
            drop_cause = if v.kind == VERDICT_REFUSED { cause::TABLE_FULL } else { cause::INSERT_FAILED };
            conf = confidence::CERTAIN;
        }
    }

    let dev: u64 = read(skb, g(&OFF_SKB_DEV));
    let (ifindex, mut net) =
        if dev != 0 { (read::<u32>(dev, g(&OFF_DEV_IFINDEX)), read::<u64>(dev, g(&OFF_DEV_NET))) } else { (0, 0) };
    if net == 0 {
        let sk: u64 = read(skb, g(&OFF_SKB_SK));
        if sk != 0 {
            net = read(sk, g(&OFF_SK_NET));
        }
    }
    if net == 0 && ct != 0 {
        net = read(ct, g(&OFF_CT_NET));
    }
    let netns = net_inum(net);

    let key = DropKey { netns, cause: drop_cause, confidence: conf, _pad: [0; 2] };
    add_drop(&key);

    // The event is assembled in per-CPU map memory: the BPF stack (512 bytes)
    // cannot hold it next to the map keys.
    let Some(pe) = SCRATCH.get_ptr_mut(0) else { return };
    let pe = unsafe { &mut *pe };
    let ev = &mut pe.event;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.location = location;
    ev.netns = netns;
    ev.ifindex = ifindex;
    ev.cpu = unsafe { bpf_get_smp_processor_id() };
    ev.ct_status = ct_status;
    ev.kind = event_kind::DROP;
    ev.cause = drop_cause;
    ev.confidence = conf;
    ev.ctinfo = if nfct == 0 { CTINFO_NONE } else { ctinfo as u8 };
    ev.zone = 0;
    parse_packet(skb, &mut ev.tuple);
    if let Some(v) = verdict {
        if drop_cause == cause::TABLE_FULL && v.kind == VERDICT_REFUSED {
            // The tuple conntrack itself refused (post-defrag, as it keys it).
            ev.tuple = v.tuple;
        }
    }

    if drop_cause != cause::RULESET && drop_cause != cause::OTHER {
        // Conntrack's own drops also count against the flow key they would
        // have had, so `top` can show drops per port / address.
        add_churn(&reduce_key(netns, 0, &ev.tuple), &ONE_DROP);
    }
    if g(&EMIT_DROP_EVENTS) == 0 {
        return;
    }
    let sent = if g(&CAPTURE_BYTES) == 0 {
        EVENTS.output::<Event>(&pe.event, 0)
    } else {
        capture_packet(skb, pe);
        EVENTS.output::<PacketEvent>(&*pe, 0)
    };
    if sent.is_err() {
        bump(counter::RINGBUF_LOST);
    }
}

/// Copies the first CAPTURE_BYTES of the packet, from its network header,
/// never past the end of its linear part: the rest of a non-linear packet
/// lives in page fragments, not after `data` (the bytes there are not the
/// packet's), so a capture of such a packet is shorter than asked for.
#[inline(always)]
fn capture_packet(skb: u64, pe: &mut PacketEvent) {
    let head: u64 = read(skb, g(&OFF_SKB_HEAD));
    let data: u64 = read(skb, g(&OFF_SKB_DATA));
    let nh: u16 = read(skb, g(&OFF_SKB_NETWORK_HEADER));
    let len: u32 = read(skb, g(&OFF_SKB_LEN));
    let paged: u32 = read(skb, g(&OFF_SKB_DATA_LEN));
    let ip = head + nh as u64;
    // skb->len counts from skb->data, which may sit before or after the
    // network header depending on the hook.
    let wire = (data + len as u64).saturating_sub(ip) as u32;
    let linear = (data + len.saturating_sub(paged) as u64).saturating_sub(ip) as u32;
    pe.wire_len = wire;
    let mut n = g(&CAPTURE_BYTES).min(linear) as usize;
    if n > MAX_CAPTURE {
        n = MAX_CAPTURE;
    }
    pe.cap_len = 0;
    if head == 0 || n == 0 {
        return;
    }
    if unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_buf(ip as *const u8, &mut pe.data[..n]) }.is_ok() {
        pe.cap_len = n as u32;
    }
}

/// The cause of a NETFILTER_DROP, from where the packet was freed and what
/// conntrack left attached to it (kernel reference §2).
#[inline(always)]
fn classify_drop(location: u64, ct: u64, ctinfo: u64, ct_status: u32) -> (u8, u8) {
    let untracked = ct == 0 && ctinfo == IP_CT_UNTRACKED;
    if location >= g(&NFT_DO_CHAIN_START) && location < g(&NFT_DO_CHAIN_END) {
        // nftables freed it: a rule's verdict. With no entry attached (and not
        // NOTRACKed) conntrack found the packet invalid and a
        // `ct state invalid drop` style rule acted on that.
        if ct == 0 && !untracked {
            return (cause::CT_INVALID, confidence::LIKELY);
        }
        return (cause::RULESET, confidence::CERTAIN);
    }
    if location >= g(&NF_HOOK_SLOW_START) && location < g(&NF_HOOK_SLOW_END) {
        // nf_hook_slow freed it: conntrack's own verdict or an iptables rule.
        if ct == 0 {
            if untracked {
                return (cause::RULESET, confidence::LIKELY);
            }
            // Allocation refused: nf_conntrack_in never attached an entry.
            return (cause::TABLE_FULL, confidence::LIKELY);
        }
        if ct_status & IPS_CONFIRMED == 0 {
            // Dropped while its fresh entry was still unconfirmed: confirm failed.
            return (cause::INSERT_FAILED, confidence::LIKELY);
        }
        return (cause::RULESET, confidence::LIKELY);
    }
    (cause::OTHER, confidence::CERTAIN)
}

#[inline(always)]
fn add_drop(key: &DropKey) {
    if let Some(p) = DROPS.get_ptr_mut(key) {
        unsafe { *p += 1 };
    } else if DROPS.insert(key, 1u64, 0).is_err() {
        // Map full: still counted in NF_DROPS; keep the per-cause view honest.
        bump(counter::KEY_OVERFLOW);
    }
}

/// The flow a dropped packet belongs to, parsed from its headers into `t`.
#[inline(always)]
fn parse_packet(skb: u64, t: &mut FlowTuple) {
    *t = FlowTuple::default();
    let head: u64 = read(skb, g(&OFF_SKB_HEAD));
    let nh: u16 = read(skb, g(&OFF_SKB_NETWORK_HEADER));
    if head == 0 || nh == u16::MAX {
        return;
    }
    let ip = head + nh as u64;
    let first: u8 = read(ip, 0);
    let l4;
    match first >> 4 {
        4 => {
            t.ip_version = 4;
            t.proto = read(ip, 9);
            let s: [u8; 4] = read(ip, 12);
            let d: [u8; 4] = read(ip, 16);
            t.saddr[..4].copy_from_slice(&s);
            t.daddr[..4].copy_from_slice(&d);
            l4 = ip + ((first & 0x0f) as u64) * 4;
        }
        6 => {
            t.ip_version = 6;
            t.proto = read(ip, 6);
            t.saddr = read(ip, 8);
            t.daddr = read(ip, 24);
            l4 = ip + 40;
        }
        _ => return,
    }
    match t.proto {
        6 | 17 | 132 | 136 => {
            let ports: [u8; 4] = read(l4, 0);
            t.sport = u16::from_be_bytes([ports[0], ports[1]]);
            t.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        1 | 58 => {
            // ICMP: type and code, the way conntrack keys them.
            let tc: [u8; 2] = read(l4, 0);
            t.dport = u16::from_be_bytes(tc);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Churn: tp_btf kmem:kmem_cache_alloc / kmem_cache_free on the nf_conntrack slab
// ---------------------------------------------------------------------------

/// Is `cache` the nf_conntrack slab? One pointer comparison once known.
#[inline(always)]
fn is_conntrack_cache(ctx: &RawTracePointContext, cache: u64) -> bool {
    let Some(known) = CT_CACHE.get_ptr_mut(0) else { return false };
    let known_val = unsafe { *known };
    if known_val != 0 {
        return known_val == cache;
    }
    // Not seen yet: object size first (cheap), then the name.
    if read::<u32>(cache, g(&OFF_CACHE_OBJECT_SIZE)) != g(&NF_CONN_SIZE) {
        return false;
    }
    let name_ptr: u64 = read(cache, g(&OFF_CACHE_NAME));
    let name: [u8; 13] = read(name_ptr, 0);
    if &name != b"nf_conntrack\0" {
        return false;
    }
    unsafe { *known = cache };
    // Once per load: tells the user (through aya-log) that the slab was found.
    // (The pointer itself is not logged: formatting it would be pointer
    // arithmetic, which the verifier rejects.)
    info!(ctx, "nf_conntrack slab recognised: counting new and removed entries");
    true
}

#[raw_tracepoint(tracepoint = "kmem_cache_alloc")]
pub fn ctg_ct_alloc(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(call_site, ptr, s, gfp_flags, node)
    let cache: u64 = ctx.arg(2);
    if !is_conntrack_cache(&ctx, cache) {
        return 0;
    }
    let ct: u64 = ctx.arg(1);
    if ct == 0 {
        bump(counter::CT_ALLOC_FAILED);
        return 0;
    }
    bump(counter::CT_ALLOCATED);
    let Some(slot) = PENDING.get_ptr_mut(0) else { return 0 };
    unsafe {
        let previous = (*slot).ct;
        if previous != 0 {
            count_new_entry(previous, (*slot).ts_ns);
        }
        (*slot).ct = ct;
        (*slot).ts_ns = bpf_ktime_get_ns();
    }
    0
}

#[raw_tracepoint(tracepoint = "kmem_cache_free")]
pub fn ctg_ct_free(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(call_site, ptr, s)
    let cache: u64 = ctx.arg(2);
    if !is_conntrack_cache(&ctx, cache) {
        return 0;
    }
    let ct: u64 = ctx.arg(1);
    if ct == 0 {
        return 0;
    }
    bump(counter::CT_FREED);
    if let Some(slot) = PENDING.get_ptr_mut(0) {
        unsafe {
            if (*slot).ct == ct {
                // Freed before anything else happened on this CPU (e.g. a
                // ruleset drop of its first packet): key it now, intact.
                count_new_entry(ct, (*slot).ts_ns);
                (*slot).ct = 0;
            }
        }
    }
    let key = churn_key(ct);
    add_churn(&key, &ONE_REMOVAL);
    0
}

/// Userspace runs this on every CPU (BPF_PROG_TEST_RUN with a CPU) before it
/// reads the maps, so the last new entry of an idle CPU is keyed too. The first
/// argument is the minimum age in ns: an entry younger than that may have been
/// interrupted between its allocation and its initialisation, and waits.
#[raw_tracepoint(tracepoint = "ctguard_flush")]
pub fn ctg_flush(ctx: RawTracePointContext) -> i32 {
    let min_age: u64 = ctx.arg(0);
    let Some(slot) = PENDING.get_ptr_mut(0) else { return 0 };
    unsafe {
        let ct = (*slot).ct;
        if ct == 0 {
            return 0;
        }
        if bpf_ktime_get_ns().wrapping_sub((*slot).ts_ns) < min_age {
            return 1;
        }
        count_new_entry(ct, (*slot).ts_ns);
        (*slot).ct = 0;
    }
    0
}

#[inline(always)]
/// Counts an allocated entry under its key; `allocated_ns` is when the slab
/// handed it out, which is what a new-entry event reports.
fn count_new_entry(ct: u64, allocated_ns: u64) {
    bump(counter::CT_KEYED);
    let key = churn_key(ct);
    add_churn(&key, &ONE_INSERT);
    if g(&EMIT_NEW_EVENTS) != 0 {
        emit_new_entry(ct, &key, allocated_ns);
    }
}

#[inline(always)]
fn ct_tuple(ct: u64) -> FlowTuple {
    let mut t = FlowTuple::default();
    read_tuple(ct + g(&OFF_CT_TUPLE) as u64, &mut t);
    t
}

/// Reads a `struct nf_conntrack_tuple` at `base` into `t`.
#[inline(always)]
fn read_tuple(base: u64, t: &mut FlowTuple) {
    t.saddr = read(base, g(&OFF_TUPLE_SRC_ADDR));
    t.daddr = read(base, g(&OFF_TUPLE_DST_ADDR));
    t.sport = u16::from_be(read(base, g(&OFF_TUPLE_SRC_PORT)));
    t.dport = u16::from_be(read(base, g(&OFF_TUPLE_DST_PORT)));
    t.proto = read(base, g(&OFF_TUPLE_PROTO));
    let l3: u16 = read(base, g(&OFF_TUPLE_L3NUM));
    t.ip_version = match l3 {
        2 => 4,
        10 => 6,
        _ => 0,
    };
    if t.ip_version == 4 {
        // nf_inet_addr is 16 bytes; only the first 4 hold an IPv4 address.
        for b in &mut t.saddr[4..] {
            *b = 0;
        }
        for b in &mut t.daddr[4..] {
            *b = 0;
        }
    }
}

#[inline(always)]
fn ct_zone(ct: u64) -> u16 {
    let off = g(&OFF_CT_ZONE);
    if off == u32::MAX { 0 } else { read(ct, off) }
}

/// The churn key of an initialised entry.
#[inline(always)]
fn churn_key(ct: u64) -> ChurnKey {
    let net: u64 = read(ct, g(&OFF_CT_NET));
    reduce_key(net_inum(net), ct_zone(ct), &ct_tuple(ct))
}

/// Keeps from a flow what the chosen key mode groups by (the rest stays zero).
#[inline(always)]
fn reduce_key(netns: u32, zone: u16, t: &FlowTuple) -> ChurnKey {
    let mut key = ChurnKey { netns, zone: 0, other: 0, _pad: 0, tuple: FlowTuple::default() };
    key.tuple.ip_version = t.ip_version;
    match g(&KEY_MODE) {
        key_mode::DST_PORT => {
            key.tuple.proto = t.proto;
            key.tuple.dport = t.dport;
        }
        key_mode::SRC_IP => key.tuple.saddr = t.saddr,
        key_mode::DST_IP => key.tuple.daddr = t.daddr,
        key_mode::SRC_DST => {
            key.tuple.saddr = t.saddr;
            key.tuple.daddr = t.daddr;
        }
        key_mode::ZONE => key.zone = zone,
        key_mode::TUPLE => {
            key.tuple = *t;
            key.zone = zone;
        }
        _ => key.tuple.ip_version = 0, // NETNS: the netns alone
    }
    key
}

#[inline(always)]
fn add_churn(key: &ChurnKey, delta: &ChurnValue) {
    if let Some(v) = CHURN.get_ptr_mut(key) {
        add_value(v, delta);
        return;
    }
    if CHURN.insert(key, delta, 0).is_ok() {
        return;
    }
    // The key map is full: count under the namespace's "other" bucket, which
    // lives in its own map so it always has room, and totals stay exact.
    bump(counter::KEY_OVERFLOW);
    if let Some(v) = OTHER_KEYS.get_ptr_mut(&key.netns) {
        add_value(v, delta);
    } else if OTHER_KEYS.insert(&key.netns, delta, 0).is_err() {
        bump(counter::OTHER_OVERFLOW);
    }
}

#[inline(always)]
fn add_value(v: *mut ChurnValue, d: &ChurnValue) {
    unsafe {
        (*v).inserts += d.inserts;
        (*v).removals += d.removals;
        (*v).drops += d.drops;
    }
}

const ONE_INSERT: ChurnValue = ChurnValue { inserts: 1, removals: 0, drops: 0 };
const ONE_REMOVAL: ChurnValue = ChurnValue { inserts: 0, removals: 1, drops: 0 };
const ONE_DROP: ChurnValue = ChurnValue { inserts: 0, removals: 0, drops: 1 };

#[inline(always)]
fn emit_new_entry(ct: u64, key: &ChurnKey, allocated_ns: u64) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(counter::RINGBUF_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).ts_ns = allocated_ns;
        (*ev).location = 0;
        (*ev).netns = key.netns;
        (*ev).ifindex = 0;
        (*ev).cpu = bpf_get_smp_processor_id();
        (*ev).ct_status = read(ct, g(&OFF_CT_STATUS));
        (*ev).kind = event_kind::NEW_ENTRY;
        (*ev).cause = 0;
        (*ev).confidence = 0;
        (*ev).ctinfo = CTINFO_NONE;
        (*ev).zone = ct_zone(ct);
        (*ev)._pad = [0; 2];
        (*ev).tuple = ct_tuple(ct);
    }
    entry.submit(0);
}

// ---------------------------------------------------------------------------
// Function-hook backend (kprobe / kretprobe on nf_conntrack's functions): used
// where the kernel has kprobes (stock distro kernels). New entries are keyed
// as __nf_conntrack_alloc returns them, refusals carry the refused tuple, and
// early_drop evictions are counted one by one.
// ---------------------------------------------------------------------------

/// Arguments of an __nf_conntrack_alloc call in flight, per CPU. A softirq can
/// interrupt a process-context call between entry and return, so this is a
/// small stack rather than one slot.
#[repr(C)]
#[derive(Clone, Copy)]
struct AllocFrames {
    depth: u32,
    _pad: u32,
    /// When the outermost frame was entered (see [`FRAME_MAX_AGE_NS`]).
    ts_ns: u64,
    net: [u64; ALLOC_DEPTH],
    orig: [u64; ALLOC_DEPTH],
}

const ALLOC_DEPTH: usize = 4;

#[map]
static ALLOC_FRAMES: PerCpuArray<AllocFrames> = PerCpuArray::with_max_entries(1, 0);

/// What conntrack decided last on this CPU, consumed by the next NETFILTER_DROP.
#[repr(C)]
#[derive(Clone, Copy)]
struct Verdict {
    kind: u32,
    netns: u32,
    ts_ns: u64,
    tuple: FlowTuple,
}

const VERDICT_NONE: u32 = 0;
const VERDICT_REFUSED: u32 = 1;
const VERDICT_CONFIRM_FAILED: u32 = 2;
/// A verdict older than this belongs to another packet. The refused packet
/// is freed in the same call chain right after the verdict (microseconds on
/// hardware; emulated CPUs take far longer), so this is only a safety net for
/// a verdict no packet followed (e.g. a ctnetlink create that was refused).
const VERDICT_MAX_AGE_NS: u64 = 100_000_000;

#[map]
static VERDICTS: PerCpuArray<Verdict> = PerCpuArray::with_max_entries(1, 0);

/// A kretprobe can miss a return (too many concurrent calls for its
/// instances): the entry probe's depth would then never come back to zero.
/// A frame entered longer ago than this is stale, and the next entry starts
/// over. Generous, because emulated CPUs are slow; a real call takes
/// microseconds.
const FRAME_MAX_AGE_NS: u64 = 100_000_000;

/// Nesting depth of early_drop on this CPU (nf_ct_delete calls inside it are
/// evictions) and when the outermost call began.
#[repr(C)]
#[derive(Clone, Copy)]
struct Depth {
    depth: u32,
    _pad: u32,
    ts_ns: u64,
}

#[map]
static EARLY_DROP_DEPTH: PerCpuArray<Depth> = PerCpuArray::with_max_entries(1, 0);

/// Enters one more nesting level, first dropping levels whose return was
/// missed.
#[inline(always)]
fn enter_frame(depth: *mut u32, ts_ns: *mut u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        if *depth > 0 && now.wrapping_sub(*ts_ns) > FRAME_MAX_AGE_NS {
            *depth = 0;
        }
        if *depth == 0 {
            *ts_ns = now;
        }
        *depth += 1;
    }
}

#[inline(always)]
fn take_verdict() -> Option<Verdict> {
    let slot = VERDICTS.get_ptr_mut(0)?;
    let v = unsafe { *slot };
    if v.kind == VERDICT_NONE {
        return None;
    }
    unsafe { (*slot).kind = VERDICT_NONE };
    let age = unsafe { bpf_ktime_get_ns() }.wrapping_sub(v.ts_ns);
    (age < VERDICT_MAX_AGE_NS).then_some(v)
}

#[inline(always)]
fn set_verdict(kind: u32, netns: u32, tuple: &FlowTuple) {
    if let Some(slot) = VERDICTS.get_ptr_mut(0) {
        unsafe {
            (*slot).kind = kind;
            (*slot).netns = netns;
            (*slot).ts_ns = bpf_ktime_get_ns();
            (*slot).tuple = *tuple;
        }
    }
}

#[kprobe]
pub fn fh_alloc_entry(ctx: ProbeContext) -> u32 {
    // __nf_conntrack_alloc(net, zone, orig, repl, gfp, hash)
    let (Some(net), Some(orig)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(2)) else { return 0 };
    let Some(f) = ALLOC_FRAMES.get_ptr_mut(0) else { return 0 };
    unsafe {
        enter_frame(&mut (*f).depth, &mut (*f).ts_ns);
        let d = (*f).depth as usize - 1;
        if d < ALLOC_DEPTH {
            (*f).net[d] = net;
            (*f).orig[d] = orig;
        }
    }
    0
}

#[kretprobe]
pub fn fh_alloc_exit(ctx: RetProbeContext) -> u32 {
    let ret: u64 = ctx.ret();
    let Some(f) = ALLOC_FRAMES.get_ptr_mut(0) else { return 0 };
    let (net, orig) = unsafe {
        if (*f).depth == 0 {
            return 0; // attached mid-call: no entry seen
        }
        (*f).depth -= 1;
        let d = (*f).depth as usize;
        if d >= ALLOC_DEPTH { (0, 0) } else { ((*f).net[d], (*f).orig[d]) }
    };
    // ERR_PTR values are the top 4095 addresses.
    if ret >= (-4095i64) as u64 {
        bump(counter::CT_ALLOC_REFUSED);
        if orig != 0 {
            let mut t = FlowTuple::default();
            read_tuple(orig, &mut t);
            set_verdict(VERDICT_REFUSED, net_inum(net), &t);
        }
        return 0;
    }
    if ret == 0 {
        bump(counter::CT_ALLOC_FAILED);
        return 0;
    }
    bump(counter::CT_ALLOCATED);
    // Unlike at the slab tracepoint, the entry is initialised here.
    count_new_entry(ret, unsafe { bpf_ktime_get_ns() });
    0
}

#[kretprobe]
pub fn fh_confirm_exit(ctx: RetProbeContext) -> u32 {
    // __nf_conntrack_confirm returns NF_DROP (0) when the insert failed.
    let ret: u64 = ctx.ret();
    if ret as u32 == 0 {
        bump(counter::CONFIRM_FAILED);
        set_verdict(VERDICT_CONFIRM_FAILED, 0, &FlowTuple::default());
    }
    0
}

#[kprobe]
pub fn fh_early_drop_entry(_ctx: ProbeContext) -> u32 {
    if let Some(d) = EARLY_DROP_DEPTH.get_ptr_mut(0) {
        unsafe { enter_frame(&mut (*d).depth, &mut (*d).ts_ns) };
    }
    0
}

#[kretprobe]
pub fn fh_early_drop_exit(_ctx: RetProbeContext) -> u32 {
    if let Some(d) = EARLY_DROP_DEPTH.get_ptr_mut(0) {
        unsafe { (*d).depth = (*d).depth.saturating_sub(1) };
    }
    0
}

#[kretprobe]
pub fn fh_ct_delete_exit(ctx: RetProbeContext) -> u32 {
    // nf_ct_delete returns true when it killed the entry; inside early_drop
    // that is one eviction (the kernel's `early_drop` counter counts the same).
    let killed: u64 = ctx.ret();
    let Some(d) = EARLY_DROP_DEPTH.get_ptr_mut(0) else { return 0 };
    let d = unsafe { *d };
    let fresh = unsafe { bpf_ktime_get_ns() }.wrapping_sub(d.ts_ns) <= FRAME_MAX_AGE_NS;
    if d.depth > 0 && fresh && killed as u8 != 0 {
        bump(counter::EARLY_DROP_EVICTIONS);
    }
    0
}

// ---------------------------------------------------------------------------
// Probes for `ctguard doctor`: each only has to load (and attach) to prove the
// hook kind works on this kernel.
// ---------------------------------------------------------------------------

#[tracepoint(category = "skb", name = "kfree_skb")]
pub fn probe_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn probe_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn probe_raw_tp(_ctx: RawTracePointContext) -> i32 {
    0
}

#[fentry]
pub fn probe_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[fexit]
pub fn probe_fexit(_ctx: FExitContext) -> u32 {
    0
}

#[kprobe]
pub fn probe_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
