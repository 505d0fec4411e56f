//! Decoding ring-buffer records into [`DecodedEvent`]s.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Buf;
use ctguard_ebpf::{CTINFO_NONE, Event, FlowTuple, MAX_CAPTURE, event_kind};
use serde::Serialize;

use super::snapshot::{Cause, Confidence};
use crate::error::CtguardError;

/// A flow in userspace terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Flow {
    pub proto: u8,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub fn from_kernel(t: &FlowTuple) -> Flow {
        let addr = |a: &[u8; 16]| match t.ip_version {
            4 => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(*a))),
            _ => None,
        };
        Flow { proto: t.proto, src: addr(&t.saddr), dst: addr(&t.daddr), sport: t.sport, dport: t.dport }
    }

    pub fn proto_name(&self) -> String {
        proto_name(self.proto)
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => format!("proto-{n}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Drop,
    NewEntry,
}

/// A ring-buffer record, decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecodedEvent {
    pub kind: EventKind,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cpu: u32,
    pub netns: u32,
    pub ifindex: u32,
    pub cause: Option<Cause>,
    pub cause_confidence: Option<Confidence>,
    pub location: u64,
    /// `skb->_nfct & 7`, None when no conntrack entry was attached.
    pub ctinfo: Option<u8>,
    pub ct_status: u32,
    pub zone: u16,
    pub flow: Flow,
    /// The packet's first bytes (from its network header), when the sensors
    /// were started with `capture_bytes`.
    #[serde(skip)]
    pub packet: Option<CapturedPacket>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedPacket {
    /// Length of the whole packet from its network header.
    pub wire_len: u32,
    pub data: Vec<u8>,
}

/// Decodes one record. The layout is `ctguard_ebpf::Event` (little-endian
/// host order, as the kernel wrote it).
pub fn decode(mut buf: &[u8]) -> Result<DecodedEvent, CtguardError> {
    if buf.len() < size_of::<Event>() {
        return Err(CtguardError::ebpf(
            format!("short ring-buffer record: {} bytes, expected {}", buf.len(), size_of::<Event>()),
            "the kernel object and ctguard are out of sync; rebuild ctguard",
        ));
    }
    let ts_ns = buf.get_u64_le();
    let location = buf.get_u64_le();
    let netns = buf.get_u32_le();
    let ifindex = buf.get_u32_le();
    let cpu = buf.get_u32_le();
    let ct_status = buf.get_u32_le();
    let kind = buf.get_u8();
    let cause = buf.get_u8();
    let confidence = buf.get_u8();
    let ctinfo = buf.get_u8();
    let zone = buf.get_u16_le();
    buf.advance(2);
    let mut t = FlowTuple::default();
    buf.copy_to_slice(&mut t.saddr);
    buf.copy_to_slice(&mut t.daddr);
    t.sport = buf.get_u16_le();
    t.dport = buf.get_u16_le();
    t.ip_version = buf.get_u8();
    t.proto = buf.get_u8();
    buf.advance(2);
    // A PacketEvent: the Event, then wire_len, cap_len and the bytes.
    let packet = (buf.len() >= 8 + MAX_CAPTURE).then(|| {
        let wire_len = buf.get_u32_le();
        let cap_len = (buf.get_u32_le() as usize).min(MAX_CAPTURE);
        CapturedPacket { wire_len, data: buf[..cap_len].to_vec() }
    });
    let is_drop = kind == event_kind::DROP;
    Ok(DecodedEvent {
        kind: if is_drop { EventKind::Drop } else { EventKind::NewEntry },
        ts_ns,
        cpu,
        netns,
        ifindex,
        cause: is_drop.then(|| Cause::from_kernel(cause)),
        cause_confidence: is_drop.then(|| Confidence::from_kernel(confidence)),
        location,
        ctinfo: (ctinfo != CTINFO_NONE).then_some(ctinfo),
        ct_status,
        zone,
        flow: Flow::from_kernel(&t),
        packet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctguard_ebpf::{cause, confidence};

    fn raw(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) plain data.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>()) }.to_vec()
    }

    #[test]
    fn decodes_what_the_kernel_layout_holds() {
        let mut t = FlowTuple { sport: 40000, dport: 53, ip_version: 4, proto: 17, ..Default::default() };
        t.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        t.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let ev = Event {
            ts_ns: 123,
            location: 0xffff_ffff_81f2_afcd,
            netns: 4026531840,
            ifindex: 7,
            cpu: 1,
            ct_status: 0,
            kind: event_kind::DROP,
            cause: cause::TABLE_FULL,
            confidence: confidence::LIKELY,
            ctinfo: CTINFO_NONE,
            zone: 0,
            _pad: [0; 2],
            tuple: t,
        };
        let d = decode(&raw(&ev)).unwrap();
        assert_eq!(d.kind, EventKind::Drop);
        assert_eq!(d.cause, Some(Cause::TableFull));
        assert_eq!(d.cause_confidence, Some(Confidence::Likely));
        assert_eq!(d.ctinfo, None);
        assert_eq!(d.flow.src, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(d.flow.dst, Some("10.0.0.2".parse().unwrap()));
        assert_eq!((d.flow.sport, d.flow.dport, d.flow.proto), (40000, 53, 17));
        assert_eq!((d.netns, d.ifindex, d.cpu, d.location), (4026531840, 7, 1, 0xffff_ffff_81f2_afcd));
    }

    #[test]
    fn decodes_ipv6_and_new_entries() {
        let mut t = FlowTuple { sport: 1, dport: 443, ip_version: 6, proto: 6, ..Default::default() };
        t.daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let ev = Event { kind: event_kind::NEW_ENTRY, ctinfo: 2, tuple: t, ..Default::default() };
        let d = decode(&raw(&ev)).unwrap();
        assert_eq!(d.kind, EventKind::NewEntry);
        assert_eq!(d.cause, None);
        assert_eq!(d.ctinfo, Some(2));
        assert_eq!(d.flow.dst, Some("fd00::2".parse().unwrap()));
    }

    #[test]
    fn decodes_captured_packet_bytes() {
        use ctguard_ebpf::PacketEvent;
        let mut pe = PacketEvent {
            event: Event { kind: event_kind::DROP, ..Default::default() },
            wire_len: 60,
            cap_len: 3,
            data: [0; MAX_CAPTURE],
        };
        pe.data[..3].copy_from_slice(&[0x45, 0, 0x3c]);
        // SAFETY: PacketEvent is repr(C) plain data.
        let raw =
            unsafe { std::slice::from_raw_parts((&pe as *const PacketEvent).cast::<u8>(), size_of::<PacketEvent>()) };
        let d = decode(raw).unwrap();
        assert_eq!(d.packet, Some(CapturedPacket { wire_len: 60, data: vec![0x45, 0, 0x3c] }));
        let plain = decode(&raw[..size_of::<Event>()]).unwrap();
        assert_eq!(plain.packet, None);
    }

    #[test]
    fn rejects_short_records() {
        assert!(decode(&[0u8; 10]).is_err());
    }
}
