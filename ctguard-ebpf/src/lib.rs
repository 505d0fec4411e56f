//! Types shared between ctguard's kernel programs and its userspace loader.
//!
//! Everything here is `#[repr(C)]`, has explicit padding and no pointers, so the
//! bytes the kernel writes into maps and the ring buffer decode the same way in
//! userspace. The kernel programs themselves live in `main.rs`.
#![no_std]

/// Why a packet was dropped, as the kernel programs classify it.
pub mod cause {
    pub const TABLE_FULL: u8 = 1;
    pub const INSERT_FAILED: u8 = 2;
    pub const CT_INVALID: u8 = 3;
    pub const RULESET: u8 = 4;
    pub const OTHER: u8 = 5;
    /// Highest valid cause value (causes are 1..=MAX).
    pub const MAX: u8 = OTHER;
}

/// How sure the kernel program is of the cause it assigned.
pub mod confidence {
    /// The signals leave no other explanation (e.g. an nft rule dropped a tracked packet).
    pub const CERTAIN: u8 = 1;
    /// The most likely explanation; userspace reconciles it with the kernel's counters.
    pub const LIKELY: u8 = 2;
}

/// How new-entry counts are keyed in the kernel (the `--by` option of `top`).
pub mod key_mode {
    pub const DST_PORT: u8 = 0;
    pub const SRC_IP: u8 = 1;
    pub const DST_IP: u8 = 2;
    pub const NETNS: u8 = 3;
    pub const ZONE: u8 = 4;
    pub const TUPLE: u8 = 5;
    pub const SRC_DST: u8 = 6;
}

/// Event kinds carried by the ring buffer.
pub mod event_kind {
    pub const DROP: u8 = 1;
    pub const NEW_ENTRY: u8 = 2;
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// nf_conntrack slab allocations that succeeded (= new entries, exact).
    pub const CT_ALLOCATED: u32 = 0;
    /// nf_conntrack slab allocations that returned NULL (memory pressure, not table full).
    pub const CT_ALLOC_FAILED: u32 = 1;
    /// nf_conntrack slab frees (= entries removed, exact).
    pub const CT_FREED: u32 = 2;
    /// Events the ring buffer had no room for.
    pub const RINGBUF_LOST: u32 = 3;
    /// New-entry or removal keys that found the CHURN map full and went to the "other" key.
    pub const KEY_OVERFLOW: u32 = 4;
    /// Packets freed with reason NETFILTER_DROP (all causes).
    pub const NF_DROPS: u32 = 5;
    /// Pending new entries whose key was resolved (must end equal to CT_ALLOCATED).
    pub const CT_KEYED: u32 = 6;
    /// Keys lost because even the per-namespace "other" map was full.
    pub const OTHER_OVERFLOW: u32 = 7;
    /// Allocations conntrack refused: table full (function-hook backend only).
    pub const CT_ALLOC_REFUSED: u32 = 8;
    /// __nf_conntrack_confirm returned NF_DROP (function-hook backend only).
    pub const CONFIRM_FAILED: u32 = 9;
    /// Entries evicted by early_drop (function-hook backend only).
    pub const EARLY_DROP_EVICTIONS: u32 = 10;
    pub const COUNT: u32 = 12;
}

/// A flow as conntrack sees it: addresses in network byte order (IPv4 in the
/// first 4 bytes), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6; 0 when unknown.
    pub ip_version: u8,
    /// IP protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6, ...).
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// The key the kernel aggregates new entries and removals under. Fields that the
/// chosen key mode does not use are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChurnKey {
    pub netns: u32,
    pub zone: u16,
    /// 1 for the "other" bucket of a namespace (keys that found the map full;
    /// userspace builds these from the OTHER_KEYS map).
    pub other: u8,
    pub _pad: u8,
    pub tuple: FlowTuple,
}

/// Per-CPU counts for one churn key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChurnValue {
    pub inserts: u64,
    pub removals: u64,
    /// Conntrack's own drops (table full, insert failed, invalid) of packets
    /// whose flow maps to this key.
    pub drops: u64,
}

/// Key of the per-CPU `DROPS` map: drops per netns, cause and confidence.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub netns: u32,
    pub cause: u8,
    pub confidence: u8,
    pub _pad: [u8; 2],
}

/// One record on the ring buffer: a dropped packet or a new conntrack entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns).
    pub ts_ns: u64,
    /// Kernel text address that freed the packet (drops only).
    pub location: u64,
    pub netns: u32,
    pub ifindex: u32,
    pub cpu: u32,
    /// `ct->status` bits when a conntrack entry is attached, else 0.
    pub ct_status: u32,
    pub kind: u8,
    pub cause: u8,
    pub confidence: u8,
    /// `skb->_nfct & 7`, or 0xff when no conntrack entry is attached.
    pub ctinfo: u8,
    pub zone: u16,
    pub _pad: [u8; 2],
    pub tuple: FlowTuple,
}

/// Most bytes of a dropped packet a capture can carry.
pub const MAX_CAPTURE: usize = 256;

/// A drop event followed by the first bytes of the packet (from its network
/// header), sent instead of a bare [`Event`] when a capture asks for bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PacketEvent {
    pub event: Event,
    /// Length of the packet from its network header (`skb->len` at the drop).
    pub wire_len: u32,
    /// Bytes of `data` that hold packet bytes.
    pub cap_len: u32,
    pub data: [u8; MAX_CAPTURE],
}

/// Value the kernel writes for `Event::ctinfo` when `skb->_nfct` is 0.
pub const CTINFO_NONE: u8 = 0xff;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and
    // explicit padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ChurnKey {}
    unsafe impl aya::Pod for super::ChurnValue {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::PacketEvent {}
}
