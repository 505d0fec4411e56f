//! How much of each dropped packet a bundle keeps: by default only its
//! headers (IP, then TCP/UDP/ICMP), never payload, because capture bundles
//! get attached to tickets and payload is where names, tokens and user data
//! live. `--snap-bytes N` opts into the first N bytes, payload included.

/// Bytes the kernel programs copy when only headers are kept: an IPv4
/// header with options (60) plus a TCP header with options (60) fit, and so
/// does IPv6 (40) + TCP (60).
pub const HEADERS_CAPTURE_BYTES: u32 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snap {
    /// Network and transport headers only.
    Headers,
    /// The first N bytes from the network header.
    Bytes(u32),
}

impl Snap {
    pub fn from_arg(snap_bytes: Option<u32>) -> Snap {
        snap_bytes.map_or(Snap::Headers, Snap::Bytes)
    }

    /// How many bytes the kernel programs must copy.
    pub fn capture_bytes(self) -> u32 {
        match self {
            Snap::Headers => HEADERS_CAPTURE_BYTES,
            Snap::Bytes(n) => n,
        }
    }

    /// The part of a captured packet to keep.
    pub fn cut(self, packet: &[u8]) -> &[u8] {
        let keep = match self {
            Snap::Headers => headers_len(packet),
            Snap::Bytes(n) => n as usize,
        };
        &packet[..keep.min(packet.len())]
    }
}

/// Length of the IP and transport headers at the start of `packet` (raw
/// IPv4 or IPv6). Unknown transports and IPv6 extension headers keep the IP
/// header alone; a truncated or malformed header keeps what is there of it.
pub fn headers_len(packet: &[u8]) -> usize {
    let Some(&first) = packet.first() else { return 0 };
    let (ip_len, proto, first_fragment) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || packet.len() < 20 {
                return packet.len().min(20);
            }
            // A later fragment carries payload where the ports would be.
            let frag_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            (ihl, packet[9], frag_offset == 0)
        }
        6 => {
            if packet.len() < 40 {
                return packet.len();
            }
            (40, packet[6], true)
        }
        _ => return 0,
    };
    if !first_fragment {
        return ip_len.min(packet.len());
    }
    let l4 = match proto {
        // TCP: data offset in 32-bit words, at least the 20-byte header.
        6 => match packet.get(ip_len + 12) {
            Some(b) => usize::from(b >> 4).max(5) * 4,
            None => 20,
        },
        // UDP, UDP-Lite, ICMP, ICMPv6: fixed 8-byte headers.
        17 | 136 | 1 | 58 => 8,
        // SCTP common header.
        132 => 12,
        _ => 0,
    };
    (ip_len + l4).min(packet.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(payload: &[u8]) -> Vec<u8> {
        crate::flood::build_ipv4_udp("10.0.0.1:40000".parse().unwrap(), "10.0.0.2:53".parse().unwrap(), 7, payload)
    }

    #[test]
    fn udp_keeps_ip_and_udp_headers_only() {
        let p = udp4(b"secret.example.com");
        assert_eq!(headers_len(&p), 28);
        assert_eq!(Snap::Headers.cut(&p), &p[..28]);
        assert_eq!(Snap::Bytes(30).cut(&p), &p[..30]);
        assert_eq!(Snap::Bytes(500).cut(&p), &p[..]);
    }

    #[test]
    fn tcp_header_length_comes_from_its_data_offset() {
        let mut p = vec![0u8; 20 + 32 + 10];
        p[0] = 0x45;
        p[9] = 6;
        p[20 + 12] = 8 << 4; // 32-byte TCP header (options)
        assert_eq!(headers_len(&p), 52);
        p[20 + 12] = 0; // nonsense offset: at least the fixed header
        assert_eq!(headers_len(&p), 40);
    }

    #[test]
    fn ipv4_options_and_later_fragments() {
        let mut p = vec![0u8; 24 + 8 + 16];
        p[0] = 0x46; // 24-byte header
        p[9] = 17;
        assert_eq!(headers_len(&p), 32);
        p[6] = 0x00;
        p[7] = 0x10; // fragment offset 16: no UDP header here
        assert_eq!(headers_len(&p), 24);
    }

    #[test]
    fn ipv6_and_odd_input() {
        let mut p = vec![0u8; 40 + 8 + 100];
        p[0] = 0x60;
        p[6] = 58; // ICMPv6
        assert_eq!(headers_len(&p), 48);
        p[6] = 0; // hop-by-hop extension header: the IP header alone
        assert_eq!(headers_len(&p), 40);
        assert_eq!(headers_len(&[]), 0);
        assert_eq!(headers_len(&[0x45, 0, 0]), 3, "truncated: what is there");
        assert_eq!(headers_len(&[0x10; 30]), 0, "not IP: nothing");
    }
}
