//! A fast generator of *new* flows, for the integration tests and the lab.
//!
//! Every packet it sends opens a distinct conntrack entry on the receiver: a
//! UDP datagram or a TCP SYN with its own 5-tuple. The module has two halves:
//!
//! * **Pure packet building** ([`FlowSpec`], [`Flow`], [`build_ipv4_udp`],
//!   [`build_ipv4_tcp_syn`], [`checksum`]): which 5-tuple flow *i* has and the
//!   exact bytes (IPv4 header plus L4 header plus payload, checksums filled in)
//!   that carry it. No I/O, unit tested.
//! * **Sending** ([`send_flows`]): a raw IPv4 socket (`IPPROTO_RAW`, which
//!   implies `IP_HDRINCL`) created inside a network namespace, fed with
//!   `sendmmsg` batches, bounded by a packet count and a deadline, optionally
//!   paced to a rate.
//!
//! Safety rails: [`send_flows`] refuses to send from the initial network
//! namespace and to destinations outside RFC 1918 space (10/8, 172.16/12,
//! 192.168/16). It is meant for veth links between namespaces a test or the
//! lab created, never for real networks.
//!
//! IPv4 only; IPv6 is not implemented.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{error::CtguardError, netns::Netns};

mod egress;

/// The first source port [`FlowSpec::new`] uses: above the well-known and
/// registered low ports, so a flow never looks like a reply to a service.
pub const DEFAULT_FIRST_SRC_PORT: u16 = 10_000;

/// Length of the IPv4 header we build (no options).
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;
/// Length of the UDP payload [`build_flow_packet`] puts in a datagram: the
/// flow index, big endian, so a capture shows which flow a packet is.
pub const UDP_PAYLOAD_LEN: usize = 8;
/// Length of the TCP SYN header we build: 20 bytes plus one MSS option.
pub const TCP_SYN_HEADER_LEN: usize = 24;
/// The MSS the SYNs advertise.
pub const TCP_SYN_MSS: u16 = 1460;
/// The TTL of every packet.
pub const TTL: u8 = 64;
/// Upper bound of any packet this module builds (buffer stride).
pub const MAX_PACKET_LEN: usize = 64;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REQUEST: u8 = 8;
/// Type, code, checksum, identifier, sequence number.
const ICMP_ECHO_HEADER_LEN: usize = 8;

/// What each flow opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    /// One UDP datagram per flow.
    Udp,
    /// One TCP SYN per flow. Mind that a receiver with nothing listening
    /// answers with a RST, and a RST as the only reply makes conntrack
    /// delete the new entry at once; the integration lab marks those RSTs
    /// `notrack` so SYN flows keep their entries.
    TcpSyn,
    /// One TCP segment per flow with SYN and FIN both set: a flag
    /// combination conntrack's TCP tracker rejects (`tcp_error`), so each
    /// packet counts as `invalid` and creates no entry. For tests of
    /// invalid-packet accounting.
    TcpInvalidFlags,
    /// One ICMP echo request per flow. Conntrack keys an echo by its
    /// identifier, so the flow's source port is used as the identifier (and
    /// the destination port is ignored); the receiver's echo reply lands in
    /// the same entry.
    IcmpEcho,
}

impl Proto {
    /// The IP protocol number.
    pub fn ip_proto(self) -> u8 {
        match self {
            Proto::Udp => IPPROTO_UDP,
            Proto::TcpSyn | Proto::TcpInvalidFlags => IPPROTO_TCP,
            Proto::IcmpEcho => IPPROTO_ICMP,
        }
    }
}

/// One flow: the 5-tuple of the single packet that opens it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Flow {
    pub proto: Proto,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// Describes a family of distinct flows from one sender to one receiver.
///
/// Flow `i` goes to `dst:dst_ports[i % dst_ports.len()]`. Its source is
/// `(address, port)` with port `first_src_port + i % P` and address number
/// `i / P` in the source prefix, where `P = 65536 - first_src_port` is the
/// number of usable source ports. Source addresses start at `src` and count
/// upwards inside `src/src_prefix_len`, wrapping around, and skip the
/// network and broadcast addresses (for prefixes up to /30) and `dst`. So
/// every flow has a different (source address, source port) pair, hence a
/// different conntrack tuple, and with the default /32 prefix the first
/// [`FlowSpec::capacity`] = `65536 - first_src_port` flows (55 536 with the
/// default first port) all come from `src` itself.
///
/// To go beyond that, widen `src_prefix_len` (a /24 gives 253 addresses,
/// about 14 million flows). The receiver must accept those sources: they
/// should lie in the subnet of the link between the namespaces, so its
/// reverse-path check passes. The receiver will try to ARP for them when
/// it answers (ICMP port unreachable, TCP RST); those answers go nowhere,
/// which is harmless for a few hundred addresses but keep the prefix at /24
/// or narrower (the neighbour table holds 1024 entries by default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowSpec {
    pub proto: Proto,
    /// The first source address; the others follow it inside the prefix.
    pub src: Ipv4Addr,
    /// Length of the prefix the source addresses stay in; 32 = only `src`.
    pub src_prefix_len: u8,
    pub dst: Ipv4Addr,
    /// Destination ports, used round robin. Must not be empty.
    pub dst_ports: Vec<u16>,
    /// The first source port; must be at least 1.
    pub first_src_port: u16,
}

impl FlowSpec {
    /// Flows from `src` (a /32: one source address) starting at source port
    /// [`DEFAULT_FIRST_SRC_PORT`].
    pub fn new(proto: Proto, src: Ipv4Addr, dst: Ipv4Addr, dst_ports: impl Into<Vec<u16>>) -> Self {
        FlowSpec {
            proto,
            src,
            src_prefix_len: 32,
            dst,
            dst_ports: dst_ports.into(),
            first_src_port: DEFAULT_FIRST_SRC_PORT,
        }
    }

    /// Lets source addresses vary inside `src/len` (see the type docs).
    pub fn with_src_prefix(mut self, len: u8) -> Self {
        self.src_prefix_len = len;
        self
    }

    pub fn with_first_src_port(mut self, port: u16) -> Self {
        self.first_src_port = port;
        self
    }

    /// Checks the spec; every other method assumes it passed.
    pub fn validate(&self) -> Result<(), CtguardError> {
        let bad = |what: String, hint: &str| Err(CtguardError::usage(what, hint));
        if self.dst_ports.is_empty() {
            return bad("no destination ports given".into(), "name at least one destination port");
        }
        if self.first_src_port == 0 {
            return bad("source port 0 is not usable".into(), "start the source ports at 1 or above");
        }
        if self.src_prefix_len > 32 {
            return bad(
                format!("source prefix /{} is longer than 32 bits", self.src_prefix_len),
                "use a prefix length from 0 to 32",
            );
        }
        if self.src == self.dst {
            return bad(
                format!("source and destination are both {}", self.src),
                "send from the sender's own address to the receiver's",
            );
        }
        let layout = self.layout();
        if layout.excluded.contains(&0) {
            return bad(
                format!("{} is the network or broadcast address of {}/{}", self.src, self.src, self.src_prefix_len),
                "start the source addresses at a host address",
            );
        }
        Ok(())
    }

    /// How many distinct flows the spec describes.
    pub fn capacity(&self) -> u64 {
        if self.dst_ports.is_empty() || self.first_src_port == 0 || self.src_prefix_len > 32 {
            return 0;
        }
        self.ports_per_address() * self.layout().addresses()
    }

    /// Flow number `i`, or `None` past [`capacity`](Self::capacity).
    pub fn flow(&self, i: u64) -> Option<Flow> {
        if i >= self.capacity() {
            return None;
        }
        let ports = self.ports_per_address();
        let src_port = self.first_src_port as u64 + i % ports;
        let src_addr = self.layout().address(i / ports);
        let dst_port = self.dst_ports[(i % self.dst_ports.len() as u64) as usize];
        Some(Flow {
            proto: self.proto,
            src: SocketAddrV4::new(src_addr, src_port as u16),
            dst: SocketAddrV4::new(self.dst, dst_port),
        })
    }

    /// All flows, in order.
    pub fn flows(&self) -> impl Iterator<Item = Flow> + '_ {
        (0..self.capacity()).map_while(move |i| self.flow(i))
    }

    fn ports_per_address(&self) -> u64 {
        65_536 - self.first_src_port as u64
    }

    fn layout(&self) -> SrcLayout {
        SrcLayout::new(self.src, self.src_prefix_len, self.dst)
    }
}

/// The source addresses of a spec: `src` and the addresses after it in its
/// prefix, wrapping, minus the excluded ones. Positions count from `src`.
struct SrcLayout {
    network: u32,
    size: u64,
    src_off: u64,
    /// Sorted, deduplicated positions (relative to `src`) never used.
    excluded: Vec<u64>,
}

impl SrcLayout {
    fn new(src: Ipv4Addr, prefix_len: u8, dst: Ipv4Addr) -> Self {
        let prefix_len = prefix_len.min(32);
        let mask: u32 = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len) };
        let size = 1u64 << (32 - prefix_len);
        let network = u32::from(src) & mask;
        let src_off = (u32::from(src) - network) as u64;
        let pos = |off: u64| (off + size - src_off) % size;
        let mut excluded = Vec::new();
        if prefix_len <= 30 {
            excluded.push(pos(0));
            excluded.push(pos(size - 1));
        }
        if u32::from(dst) & mask == network {
            excluded.push(pos((u32::from(dst) - network) as u64));
        }
        excluded.sort_unstable();
        excluded.dedup();
        SrcLayout { network, size, src_off, excluded }
    }

    fn addresses(&self) -> u64 {
        self.size - self.excluded.len() as u64
    }

    /// The `k`-th usable address (`k < addresses()`).
    fn address(&self, k: u64) -> Ipv4Addr {
        let mut pos = k;
        for &e in &self.excluded {
            if e <= pos {
                pos += 1;
            }
        }
        let off = (self.src_off + pos) % self.size;
        Ipv4Addr::from(self.network.wrapping_add(off as u32))
    }
}

// ---------------------------------------------------------------------------
// Packet building
// ---------------------------------------------------------------------------

/// Adds `data` as big-endian 16-bit words (odd length padded with a zero byte)
/// to a running one's complement sum.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum_words(data, 0))
}

/// The TCP/UDP checksum: over the IPv4 pseudo header and `segment` (whose
/// checksum field must be zero).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = sum_words(&src.octets(), 0);
    acc = sum_words(&dst.octets(), acc);
    acc += proto as u64;
    acc += segment.len() as u64;
    fold(sum_words(segment, acc))
}

/// Writes a 20-byte IPv4 header (DF set, TTL [`TTL`]) into `buf[..20]`.
fn write_ipv4_header(buf: &mut [u8], proto: u8, src: Ipv4Addr, dst: Ipv4Addr, total_len: usize, ident: u16) {
    let h = &mut buf[..IPV4_HEADER_LEN];
    h[0] = 0x45; // version 4, IHL 5
    h[1] = 0; // DSCP/ECN
    h[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
    h[4..6].copy_from_slice(&ident.to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF, offset 0
    h[8] = TTL;
    h[9] = proto;
    h[10..12].fill(0);
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Writes an IPv4+UDP datagram into `buf` and returns its length.
///
/// Panics if `buf` is shorter than 28 bytes plus the payload.
pub fn write_ipv4_udp(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, ident: u16, payload: &[u8]) -> usize {
    let udp_len = UDP_HEADER_LEN + payload.len();
    let total = IPV4_HEADER_LEN + udp_len;
    write_ipv4_header(buf, IPPROTO_UDP, *src.ip(), *dst.ip(), total, ident);
    let u = &mut buf[IPV4_HEADER_LEN..total];
    u[0..2].copy_from_slice(&src.port().to_be_bytes());
    u[2..4].copy_from_slice(&dst.port().to_be_bytes());
    u[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    u[6..8].fill(0);
    u[8..].copy_from_slice(payload);
    let mut sum = l4_checksum(*src.ip(), *dst.ip(), IPPROTO_UDP, u);
    if sum == 0 {
        sum = 0xffff; // 0 means "no checksum" in UDP (RFC 768)
    }
    u[6..8].copy_from_slice(&sum.to_be_bytes());
    total
}

/// An IPv4+UDP datagram, checksums filled in.
pub fn build_ipv4_udp(src: SocketAddrV4, dst: SocketAddrV4, ident: u16, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; IPV4_HEADER_LEN + UDP_HEADER_LEN + payload.len()];
    write_ipv4_udp(&mut buf, src, dst, ident, payload);
    buf
}

/// TCP flag bits for [`write_ipv4_tcp`].
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Writes an IPv4+TCP SYN (window 64240, one MSS option, no payload) into
/// `buf` and returns its length (44).
pub fn write_ipv4_tcp_syn(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, ident: u16, seq: u32) -> usize {
    write_ipv4_tcp(buf, src, dst, ident, seq, TCP_SYN)
}

/// Writes an IPv4+TCP segment with the given `flags` (window 64240, one
/// MSS option, ack 0, no payload) into `buf` and returns its length (44).
pub fn write_ipv4_tcp(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, ident: u16, seq: u32, flags: u8) -> usize {
    let total = IPV4_HEADER_LEN + TCP_SYN_HEADER_LEN;
    write_ipv4_header(buf, IPPROTO_TCP, *src.ip(), *dst.ip(), total, ident);
    let t = &mut buf[IPV4_HEADER_LEN..total];
    t[0..2].copy_from_slice(&src.port().to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].fill(0); // ack
    t[12] = ((TCP_SYN_HEADER_LEN / 4) as u8) << 4; // data offset, in words
    t[13] = flags;
    t[14..16].copy_from_slice(&64_240u16.to_be_bytes()); // window
    t[16..18].fill(0); // checksum
    t[18..20].fill(0); // urgent pointer
    t[20] = 2; // option: MSS
    t[21] = 4;
    t[22..24].copy_from_slice(&TCP_SYN_MSS.to_be_bytes());
    let sum = l4_checksum(*src.ip(), *dst.ip(), IPPROTO_TCP, t);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    total
}

/// An IPv4+TCP SYN, checksums filled in.
pub fn build_ipv4_tcp_syn(src: SocketAddrV4, dst: SocketAddrV4, ident: u16, seq: u32) -> Vec<u8> {
    build_ipv4_tcp(src, dst, ident, seq, TCP_SYN)
}

/// An IPv4+TCP segment with `flags`, checksums filled in.
pub fn build_ipv4_tcp(src: SocketAddrV4, dst: SocketAddrV4, ident: u16, seq: u32, flags: u8) -> Vec<u8> {
    let mut buf = vec![0; IPV4_HEADER_LEN + TCP_SYN_HEADER_LEN];
    write_ipv4_tcp(&mut buf, src, dst, ident, seq, flags);
    buf
}

/// Writes an IPv4 ICMP echo request with identifier `id`, sequence `seq`
/// and an 8-byte payload into `buf`; returns its length (36).
pub fn write_ipv4_icmp_echo(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, ident: u16, id: u16, seq: u16) -> usize {
    let total = IPV4_HEADER_LEN + ICMP_ECHO_HEADER_LEN + 8;
    write_ipv4_header(buf, IPPROTO_ICMP, src, dst, total, ident);
    let m = &mut buf[IPV4_HEADER_LEN..total];
    m[0] = ICMP_ECHO_REQUEST;
    m[1] = 0;
    m[2..4].fill(0);
    m[4..6].copy_from_slice(&id.to_be_bytes());
    m[6..8].copy_from_slice(&seq.to_be_bytes());
    m[8..16].copy_from_slice(b"ctguard\0");
    // ICMP's checksum covers the message alone (no pseudo header).
    let sum = checksum(m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    total
}

/// Writes the packet that opens `flow`, flow number `index`, and returns its
/// length. The IP id is the low 16 bits of `index`; a UDP payload carries
/// `index`; a SYN's sequence number is derived from it.
pub fn write_flow_packet(buf: &mut [u8], flow: &Flow, index: u64) -> usize {
    let ident = index as u16;
    match flow.proto {
        Proto::Udp => write_ipv4_udp(buf, flow.src, flow.dst, ident, &index.to_be_bytes()),
        Proto::TcpSyn | Proto::TcpInvalidFlags => {
            let seq = (index as u32).wrapping_mul(2_654_435_761).wrapping_add(0x1000);
            let flags = if flow.proto == Proto::TcpSyn { TCP_SYN } else { TCP_SYN | TCP_FIN };
            write_ipv4_tcp(buf, flow.src, flow.dst, ident, seq, flags)
        }
        Proto::IcmpEcho => write_ipv4_icmp_echo(buf, *flow.src.ip(), *flow.dst.ip(), ident, flow.src.port(), ident),
    }
}

/// The packet that opens `flow` (see [`write_flow_packet`]).
pub fn build_flow_packet(flow: &Flow, index: u64) -> Vec<u8> {
    let mut buf = [0u8; MAX_PACKET_LEN];
    let len = write_flow_packet(&mut buf, flow, index);
    buf[..len].to_vec()
}

// ---------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------

/// How much to send and how fast.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SendOptions {
    /// Number of flows (= packets) to send.
    pub count: u64,
    /// Index of the first flow, so a second call can continue where the
    /// first stopped instead of repeating its flows.
    pub first_flow: u64,
    /// Stop after this long even if `count` has not been reached.
    pub deadline: Duration,
    /// Target packets per second; `None` sends as fast as possible.
    pub rate: Option<u64>,
    /// Packets per `sendmmsg` call (1 to 1024).
    pub batch: usize,
}

impl SendOptions {
    /// `count` packets as fast as possible, within 30 s, 256 per batch.
    pub fn count(count: u64) -> Self {
        SendOptions { count, first_flow: 0, deadline: Duration::from_secs(30), rate: None, batch: 256 }
    }
}

/// What a flood did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FloodReport {
    /// Packets the kernel accepted from us (each is one flow).
    pub sent: u64,
    /// Index of the next flow, for [`SendOptions::first_flow`].
    pub next_flow: u64,
    pub elapsed: Duration,
    /// `sent / elapsed`, packets per second.
    pub rate: f64,
    /// Sends retried after a transient error (ENOBUFS, EAGAIN, EINTR).
    pub retries: u64,
    /// True when the deadline stopped the flood before `count`.
    pub deadline_hit: bool,
}

/// Sends `opts.count` flows of `spec` from inside `netns`: one packet per
/// flow, on a raw socket created in that namespace.
///
/// Refuses (with an error) to run in the initial network namespace, to send
/// to a destination outside 10/8, 172.16/12 and 192.168/16, or to send
/// anywhere but over a veth or loopback device ([`egress`]).
pub fn send_flows(netns: &Netns, spec: &FlowSpec, opts: &SendOptions) -> Result<FloodReport, CtguardError> {
    spec.validate()?;
    if !spec.dst.is_private() {
        return Err(CtguardError::usage(
            format!("refusing to flood {}: not a private (RFC 1918) address", spec.dst),
            "flood only targets addresses on test links between network namespaces, e.g. 10.x.y.z on a veth",
        ));
    }
    if opts.batch == 0 || opts.batch > 1024 {
        return Err(CtguardError::usage(
            format!("batch size {} is out of range", opts.batch),
            "use 1 to 1024 packets per batch",
        ));
    }
    if opts.rate == Some(0) {
        return Err(CtguardError::usage("a rate of 0 packets/s sends nothing", "leave the rate unset for full speed"));
    }
    let end = opts.first_flow.saturating_add(opts.count);
    if end > spec.capacity() {
        return Err(CtguardError::usage(
            format!(
                "flows {}..{end} asked for, but the spec only has {} distinct flows",
                opts.first_flow,
                spec.capacity()
            ),
            "widen the source prefix (FlowSpec::with_src_prefix) or lower the first source port",
        ));
    }
    let label = netns.label();
    let (spec, opts) = (spec.clone(), opts.clone());
    netns.run(move || {
        refuse_initial_netns(&label)?;
        egress::require_test_link(spec.dst, &label)?;
        let sock = RawSocket::open()?;
        sock.flood(&spec, &opts)
    })?
}

/// Whether the calling *thread* is in the initial network namespace.
///
/// `net.core.netdev_max_backlog` is registered for the initial namespace
/// only (and `/proc/sys/net` resolves against the calling thread's
/// namespace), so its presence answers the question even where
/// `/proc/1/ns/net` cannot be read (containers, sandboxes).
pub fn thread_in_initial_netns() -> std::io::Result<bool> {
    match std::fs::metadata("/proc/sys/net/core/netdev_max_backlog") {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn refuse_initial_netns(label: &str) -> Result<(), CtguardError> {
    match thread_in_initial_netns() {
        Ok(false) => Ok(()),
        Ok(true) => Err(CtguardError::usage(
            format!("refusing to flood from {label}: it is the initial network namespace"),
            "flood from a test namespace (`ip netns add`) linked to the receiver by a veth",
        )),
        Err(e) => Err(CtguardError::Netns {
            name: label.to_string(),
            what: format!("cannot tell whether this is the initial namespace: {e}"),
        }),
    }
}

/// A raw IPv4 socket with `IP_HDRINCL` (implied by `IPPROTO_RAW`).
struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    fn open() -> Result<Self, CtguardError> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                CtguardError::Privileges { what: format!("cannot open a raw IPv4 socket: {e} (needs CAP_NET_RAW)") }
            } else {
                CtguardError::usage(format!("cannot open a raw IPv4 socket: {e}"), "is IPv4 available here?")
            });
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = RawSocket { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        // Without IP_RECVERR, raw_send_hdrinc turns ENOBUFS (e.g. the veth
        // peer's backlog overflowed and the packet was dropped) into
        // success, and the flow would be lost silently. With it we see the
        // error and resend.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads an int from a valid pointer.
        let rc = unsafe {
            libc::setsockopt(
                sock.fd.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(CtguardError::usage(format!("cannot set IP_RECVERR on the raw socket: {e}"), "internal error"));
        }
        Ok(sock)
    }

    fn flood(&self, spec: &FlowSpec, opts: &SendOptions) -> Result<FloodReport, CtguardError> {
        // All flows share the destination address; the kernel routes on it.
        // SAFETY: sockaddr_in is plain data; zeroed is a valid value.
        let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        dst.sin_family = libc::AF_INET as libc::sa_family_t;
        dst.sin_addr.s_addr = u32::from(spec.dst).to_be();

        // With a target rate, send in chunks of ~10 ms worth of packets.
        let batch = match opts.rate {
            Some(r) => opts.batch.min((r / 100).max(1) as usize),
            None => opts.batch,
        };
        let mut bufs = vec![0u8; batch * MAX_PACKET_LEN];
        let mut lens = vec![0usize; batch];
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(batch);
        let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(batch);

        let start = Instant::now();
        let end = opts.first_flow + opts.count;
        let mut next = opts.first_flow;
        let (mut retries, mut deadline_hit) = (0u64, false);
        'outer: while next < end {
            if start.elapsed() >= opts.deadline {
                deadline_hit = true;
                break;
            }
            if let Some(rate) = opts.rate {
                let due = Duration::from_secs_f64((next - opts.first_flow) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait.min(opts.deadline.saturating_sub(start.elapsed())));
                    if start.elapsed() >= opts.deadline {
                        deadline_hit = true;
                        break;
                    }
                }
            }
            let n = batch.min((end - next) as usize);
            for (k, (chunk, len)) in bufs.chunks_exact_mut(MAX_PACKET_LEN).zip(lens.iter_mut()).take(n).enumerate() {
                let index = next + k as u64;
                let flow = spec.flow(index).expect("flow index checked against capacity");
                *len = write_flow_packet(chunk, &flow, index);
            }
            iovs.clear();
            msgs.clear();
            for k in 0..n {
                iovs.push(libc::iovec { iov_base: bufs[k * MAX_PACKET_LEN..].as_mut_ptr().cast(), iov_len: lens[k] });
            }
            for iov in iovs.iter_mut() {
                // SAFETY: msghdr is plain data; zeroed is valid, fields set below.
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_name = (&mut dst as *mut libc::sockaddr_in).cast();
                hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                hdr.msg_iov = iov;
                hdr.msg_iovlen = 1;
                msgs.push(libc::mmsghdr { msg_hdr: hdr, msg_len: 0 });
            }

            let mut done = 0usize;
            let mut stalled_since: Option<Instant> = None;
            while done < n {
                // SAFETY: msgs[done..n] point at live iovecs, buffers and dst.
                let rc = unsafe {
                    libc::sendmmsg(self.fd.as_raw_fd(), msgs[done..].as_mut_ptr(), (n - done) as libc::c_uint, 0)
                };
                if rc > 0 {
                    done += rc as usize;
                    stalled_since = None;
                    continue;
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                        // The packet at `done` was not sent (e.g. the veth
                        // peer's backlog was full): back off and resend it.
                        retries += 1;
                        let since = *stalled_since.get_or_insert_with(Instant::now);
                        if start.elapsed() >= opts.deadline || since.elapsed() > Duration::from_secs(5) {
                            next += done as u64;
                            deadline_hit = start.elapsed() >= opts.deadline;
                            if !deadline_hit {
                                return Err(send_error(&e, spec));
                            }
                            break 'outer;
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    _ => return Err(send_error(&e, spec)),
                }
            }
            next += n as u64;
        }
        let elapsed = start.elapsed();
        let sent = next - opts.first_flow;
        Ok(FloodReport {
            sent,
            next_flow: next,
            elapsed,
            rate: if elapsed.is_zero() { 0.0 } else { sent as f64 / elapsed.as_secs_f64() },
            retries,
            deadline_hit,
        })
    }
}

fn send_error(e: &std::io::Error, spec: &FlowSpec) -> CtguardError {
    let what = format!("sending to {} failed: {e}", spec.dst);
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => CtguardError::usage(
            what,
            "a firewall rule in the sending namespace rejects the packets, or CAP_NET_RAW is missing",
        ),
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => CtguardError::usage(
            what,
            "the sending namespace has no route to the destination; is the veth up and addressed?",
        ),
        Some(libc::ENOBUFS | libc::EAGAIN) => {
            CtguardError::usage(what, "the link stayed congested for 5 s; lower the rate or the batch size")
        }
        _ => CtguardError::usage(what, "check the sending namespace's links and routes (`ip -n NS addr`)"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn rfc1071_example_checksum() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        // Odd length: the last byte is padded with zero.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2]), !(0x0001u16 + 0xf200));
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // The classic example header: 192.168.0.1 -> 192.168.0.199, UDP,
        // total length 0x73, DF, TTL 64. Its checksum is 0xb861.
        let mut hdr = [0u8; 20];
        write_ipv4_header(&mut hdr, 17, Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(192, 168, 0, 199), 0x73, 0);
        assert_eq!(
            hdr,
            [
                0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
                0xa8, 0x00, 0xc7
            ]
        );
        // A correct header sums to zero.
        assert_eq!(checksum(&hdr), 0);
    }

    #[test]
    fn known_udp_datagram() {
        // 10.0.0.1:1024 -> 10.0.0.2:53, payload "abcd". Worked by hand:
        // pseudo header 0a00+0001+0a00+0002+0011+000c = 0x1420, header
        // 0400+0035+000c = 0x0441, payload 6162+6364 = 0xc4c6;
        // total 0xdd27, checksum !0xdd27 = 0x22d8 (cross-checked in Python).
        let pkt = build_ipv4_udp(sa("10.0.0.1:1024"), sa("10.0.0.2:53"), 0x1234, b"abcd");
        assert_eq!(pkt.len(), 32);
        assert_eq!(&pkt[20..28], &[0x04, 0x00, 0x00, 0x35, 0x00, 0x0c, 0x22, 0xd8]);
        assert_eq!(&pkt[28..], b"abcd");
        assert_eq!(checksum(&pkt[..20]), 0);
        assert_eq!(&pkt[2..4], &32u16.to_be_bytes());
        assert_eq!(&pkt[4..6], &0x1234u16.to_be_bytes());
        assert_eq!(pkt[9], 17);
        // Verifying over pseudo header + segment yields zero.
        assert_eq!(l4_checksum(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 17, &pkt[20..]), 0);
    }

    #[test]
    fn udp_zero_checksum_is_sent_as_ffff() {
        // Find a payload whose checksum folds to 0 and check the substitution.
        let (src, dst) = (sa("10.0.0.1:1024"), sa("10.0.0.2:53"));
        let base = build_ipv4_udp(src, dst, 0, &[0, 0]);
        let sum = u16::from_be_bytes([base[26], base[27]]);
        // Adding `sum` as a payload word makes the complement sum 0xffff,
        // i.e. the checksum 0.
        let pkt = build_ipv4_udp(src, dst, 0, &sum.to_be_bytes());
        assert_eq!(&pkt[26..28], &[0xff, 0xff]);
    }

    #[test]
    fn known_tcp_syn() {
        // 10.0.0.1:40000 -> 10.0.0.2:80, seq 1, MSS 1460. By hand:
        // pseudo 0a00+0001+0a00+0002+0006+0018 = 0x1421; header
        // 9c40+0050+0000+0001+0000+0000+6002+faf0+0000+0000+0204+05b4
        // = 0x1_ff3b; 0x1421 + 0x1ff3b = 0x2_135c -> 0x135e;
        // checksum !0x135e = 0xeca1 (cross-checked in Python).
        let pkt = build_ipv4_tcp_syn(sa("10.0.0.1:40000"), sa("10.0.0.2:80"), 7, 1);
        assert_eq!(pkt.len(), 44);
        assert_eq!(checksum(&pkt[..20]), 0);
        assert_eq!(pkt[9], 6);
        let tcp = &pkt[20..];
        assert_eq!(tcp[12], 0x60, "data offset 6 words");
        assert_eq!(tcp[13], 0x02, "SYN only");
        assert_eq!(&tcp[16..18], &[0xec, 0xa1]);
        assert_eq!(&tcp[20..24], &[2, 4, 0x05, 0xb4]);
        assert_eq!(l4_checksum(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 6, tcp), 0);
    }

    #[test]
    fn flow_packets_verify() {
        let spec = FlowSpec::new(Proto::TcpSyn, Ipv4Addr::new(10, 9, 8, 1), Ipv4Addr::new(10, 9, 8, 2), vec![80, 443]);
        for proto in [Proto::Udp, Proto::TcpSyn, Proto::TcpInvalidFlags] {
            let spec = FlowSpec { proto, ..spec.clone() };
            for i in [0u64, 1, 2, 1000, 55_535] {
                let flow = spec.flow(i).unwrap();
                let pkt = build_flow_packet(&flow, i);
                assert_eq!(checksum(&pkt[..20]), 0);
                assert_eq!(l4_checksum(*flow.src.ip(), *flow.dst.ip(), proto.ip_proto(), &pkt[20..]), 0);
                assert_eq!(u16::from_be_bytes([pkt[2], pkt[3]]) as usize, pkt.len());
                assert_eq!(&pkt[12..16], &flow.src.ip().octets());
                assert_eq!(&pkt[16..20], &flow.dst.ip().octets());
                assert_eq!(&pkt[20..22], &flow.src.port().to_be_bytes());
                assert_eq!(&pkt[22..24], &flow.dst.port().to_be_bytes());
                assert!(pkt.len() <= MAX_PACKET_LEN);
                match proto {
                    Proto::Udp => {}
                    Proto::TcpSyn => assert_eq!(pkt[33], TCP_SYN),
                    Proto::TcpInvalidFlags => assert_eq!(pkt[33], TCP_SYN | TCP_FIN),
                    Proto::IcmpEcho => unreachable!("not in this loop (no ports, no pseudo header)"),
                }
            }
        }
    }

    #[test]
    fn icmp_echo_carries_the_flow_id_and_a_valid_checksum() {
        let flow =
            Flow { proto: Proto::IcmpEcho, src: "10.0.0.1:4242".parse().unwrap(), dst: "10.0.0.2:9".parse().unwrap() };
        let p = build_flow_packet(&flow, 7);
        assert_eq!(p.len(), 36);
        assert_eq!(p[9], 1, "ICMP");
        assert_eq!(checksum(&p[..20]), 0, "IPv4 header checksum");
        let m = &p[20..];
        assert_eq!((m[0], m[1]), (8, 0), "echo request");
        assert_eq!(u16::from_be_bytes([m[4], m[5]]), 4242, "identifier = source port");
        assert_eq!(u16::from_be_bytes([m[6], m[7]]), 7, "sequence = flow index");
        assert_eq!(checksum(m), 0, "ICMP checksum");
    }

    #[test]
    fn flows_round_robin_ports_and_count_source_ports() {
        let spec = FlowSpec::new(Proto::Udp, Ipv4Addr::new(10, 1, 2, 1), Ipv4Addr::new(10, 1, 2, 2), vec![53, 80, 443]);
        assert!(spec.validate().is_ok());
        assert_eq!(spec.capacity(), 65_536 - DEFAULT_FIRST_SRC_PORT as u64);
        let f: Vec<Flow> = (0..4).map(|i| spec.flow(i).unwrap()).collect();
        assert_eq!(f[0].src, sa("10.1.2.1:10000"));
        assert_eq!(f[0].dst, sa("10.1.2.2:53"));
        assert_eq!(f[1].src, sa("10.1.2.1:10001"));
        assert_eq!(f[1].dst, sa("10.1.2.2:80"));
        assert_eq!(f[2].dst, sa("10.1.2.2:443"));
        assert_eq!(f[3].dst, sa("10.1.2.2:53"));
        let last = spec.flow(spec.capacity() - 1).unwrap();
        assert_eq!(last.src, sa("10.1.2.1:65535"));
        assert_eq!(spec.flow(spec.capacity()), None);
    }

    #[test]
    fn all_flows_are_distinct_and_stay_in_the_prefix() {
        // /29 around .1 with dst .2: hosts .1..=.6 minus dst = 5 addresses.
        let spec = FlowSpec::new(Proto::Udp, Ipv4Addr::new(10, 1, 2, 1), Ipv4Addr::new(10, 1, 2, 2), vec![53, 80, 443])
            .with_src_prefix(29)
            .with_first_src_port(65_000);
        assert_eq!(spec.capacity(), 536 * 5);
        let flows: Vec<Flow> = spec.flows().collect();
        assert_eq!(flows.len() as u64, spec.capacity());
        let tuples: HashSet<_> = flows.iter().map(|f| (f.src, f.dst)).collect();
        assert_eq!(tuples.len(), flows.len());
        let addrs: HashSet<Ipv4Addr> = flows.iter().map(|f| *f.src.ip()).collect();
        let expected: HashSet<Ipv4Addr> = [1, 3, 4, 5, 6].iter().map(|&o| Ipv4Addr::new(10, 1, 2, o)).collect();
        assert_eq!(addrs, expected);
        // The first 536 flows use src itself, then the next address.
        assert_eq!(*flows[535].src.ip(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(*flows[536].src.ip(), Ipv4Addr::new(10, 1, 2, 3));
    }

    #[test]
    fn source_addresses_wrap_inside_the_prefix() {
        // Start at .5 of a /29 (.0-.7): .5 .6 then wrap to .1 .3 .4 (.2 = dst).
        let spec = FlowSpec::new(Proto::Udp, Ipv4Addr::new(10, 1, 2, 5), Ipv4Addr::new(10, 1, 2, 2), vec![53])
            .with_src_prefix(29)
            .with_first_src_port(65_535);
        let addrs: Vec<u8> = spec.flows().map(|f| f.src.ip().octets()[3]).collect();
        assert_eq!(addrs, vec![5, 6, 1, 3, 4]);
        // More than 64k flows from a /24.
        let wide = FlowSpec::new(Proto::TcpSyn, Ipv4Addr::new(10, 7, 0, 1), Ipv4Addr::new(10, 7, 0, 2), vec![80])
            .with_src_prefix(24);
        assert_eq!(wide.capacity(), 253 * 55_536);
        let f = wide.flow(100_000).unwrap();
        assert_eq!(f.src, SocketAddrV4::new(Ipv4Addr::new(10, 7, 0, 3), 10_000 + (100_000 - 55_536) as u16));
        let last = wide.flow(wide.capacity() - 1).unwrap();
        assert_eq!(*last.src.ip(), Ipv4Addr::new(10, 7, 0, 254));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let ok = FlowSpec::new(Proto::Udp, Ipv4Addr::new(10, 1, 2, 1), Ipv4Addr::new(10, 1, 2, 2), vec![53]);
        let cases = [
            FlowSpec { dst_ports: vec![], ..ok.clone() },
            FlowSpec { first_src_port: 0, ..ok.clone() },
            FlowSpec { src_prefix_len: 33, ..ok.clone() },
            FlowSpec { src: ok.dst, ..ok.clone() },
            FlowSpec { src: Ipv4Addr::new(10, 1, 2, 0), src_prefix_len: 24, ..ok.clone() },
            FlowSpec { src: Ipv4Addr::new(10, 1, 2, 255), src_prefix_len: 24, ..ok.clone() },
        ];
        for spec in cases {
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains("hint"), "{err}");
        }
        assert_eq!(FlowSpec { dst_ports: vec![], ..ok.clone() }.capacity(), 0);
    }

    #[test]
    fn refuses_public_destinations_and_oversized_requests() {
        let me = Netns::current().unwrap();
        let public = FlowSpec::new(Proto::Udp, Ipv4Addr::new(10, 1, 2, 1), Ipv4Addr::new(8, 8, 8, 8), vec![53]);
        let err = send_flows(&me, &public, &SendOptions::count(1)).unwrap_err().to_string();
        assert!(err.contains("refusing"), "{err}");
        let spec = FlowSpec::new(Proto::Udp, Ipv4Addr::new(10, 1, 2, 1), Ipv4Addr::new(10, 1, 2, 2), vec![53]);
        let err = send_flows(&me, &spec, &SendOptions::count(spec.capacity() + 1)).unwrap_err().to_string();
        assert!(err.contains("distinct flows"), "{err}");
    }

    #[test]
    fn refuses_the_initial_namespace() {
        // Only meaningful when the tests run in the initial namespace.
        if !thread_in_initial_netns().unwrap() {
            return;
        }
        let me = Netns::current().unwrap();
        let spec = FlowSpec::new(Proto::Udp, Ipv4Addr::new(10, 1, 2, 1), Ipv4Addr::new(10, 1, 2, 2), vec![53]);
        let err = send_flows(&me, &spec, &SendOptions::count(1)).unwrap_err().to_string();
        assert!(err.contains("initial network namespace"), "{err}");
    }
}
