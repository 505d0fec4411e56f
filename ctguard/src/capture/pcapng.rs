//! `drops.pcapng`: the dropped packets' first bytes, as standard pcapng
//! (readable by Wireshark, tshark, tcpdump -r).
//!
//! One section, one interface of link type RAW (101: the packet starts with
//! its IPv4 or IPv6 header, which is where the kernel programs copy from),
//! nanosecond timestamps (`if_tsresol` = 9) on the wall clock, and per packet
//! the original length (the whole packet from its network header) and a
//! comment (`opt_comment`) naming the drop's cause, confidence, namespace
//! and the kernel function that dropped it.
use std::{borrow::Cow, io::Write, path::Path, time::Duration};

use pcap_file::{
    DataLink,
    pcapng::{
        Block, PcapNgReader, PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
    },
};

/// LINKTYPE_RAW: raw IPv4 or IPv6, no link-layer header.
pub const LINKTYPE_RAW: u32 = 101;

/// One packet to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketRecord<'a> {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    /// Length of the whole packet from its network header.
    pub wire_len: u32,
    /// Its first bytes (truncated to the writer's snap length).
    pub data: &'a [u8],
    pub comment: String,
}

/// Writes a section header and the RAW interface, then packets.
pub struct DropWriter<W: Write> {
    inner: PcapNgWriter<W>,
    snap_len: u32,
    written: u64,
}

impl<W: Write> DropWriter<W> {
    pub fn new(out: W, snap_len: u32) -> Result<Self, pcap_file::PcapError> {
        let section = SectionHeaderBlock {
            endianness: pcap_file::Endianness::native(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                "ctguard {} capture",
                env!("CARGO_PKG_VERSION")
            )))],
            ..Default::default()
        };
        let mut inner = PcapNgWriter::with_section_header(out, section)?;
        inner.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: snap_len,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed("netfilter-drops")),
                InterfaceDescriptionOption::IfDescription(Cow::Borrowed(
                    "packets netfilter dropped, copied by ctguard's kernel programs from their network header",
                )),
                // pcap-file writes EPB timestamps in nanoseconds.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        })?;
        Ok(DropWriter { inner, snap_len, written: 0 })
    }

    /// Appends one packet; returns its 1-based number in the file (what
    /// Wireshark shows as the frame number).
    pub fn write(&mut self, p: &PacketRecord<'_>) -> Result<u64, pcap_file::PcapError> {
        let n = p.data.len().min(self.snap_len as usize);
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_nanos(p.time_unix_ns),
            original_len: p.wire_len.max(n as u32),
            data: Cow::Borrowed(&p.data[..n]),
            options: if p.comment.is_empty() {
                vec![]
            } else {
                vec![EnhancedPacketOption::Comment(Cow::Borrowed(p.comment.as_str()))]
            },
        };
        self.inner.write_pcapng_block(block)?;
        self.written += 1;
        Ok(self.written)
    }

    /// Packets written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn into_inner(self) -> W {
        self.inner.into_inner()
    }
}

/// A packet as read back from a pcapng file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPacket {
    pub time_unix_ns: u64,
    pub original_len: u32,
    pub data: Vec<u8>,
    pub comment: Option<String>,
    /// The link type of the packet's interface (101 for ctguard's files).
    pub linktype: u32,
}

/// Reads every packet of a pcapng file with pcap-file's reader (used by the
/// tests and to check a bundle).
pub fn read_packets(path: &Path) -> Result<Vec<ReadPacket>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    read_packets_from(std::io::BufReader::new(file)).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn read_packets_from<R: std::io::Read>(r: R) -> Result<Vec<ReadPacket>, String> {
    let mut reader = PcapNgReader::new(r).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut linktypes = Vec::new();
    while let Some(block) = reader.next_block() {
        let block = block.map_err(|e| e.to_string())?;
        if let Block::SectionHeader(_) = block {
            linktypes.clear();
        }
        if let Block::InterfaceDescription(idb) = &block {
            linktypes.push(u32::from(idb.linktype));
        }
        if let Block::EnhancedPacket(epb) = block {
            let linktype = linktypes
                .get(epb.interface_id as usize)
                .copied()
                .ok_or_else(|| format!("packet on unknown interface {}", epb.interface_id))?;
            let comment = epb.options.iter().find_map(|o| match o {
                EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                _ => None,
            });
            out.push(ReadPacket {
                time_unix_ns: epb.timestamp.as_nanos() as u64,
                original_len: epb.original_len,
                data: epb.data.to_vec(),
                comment,
                linktype,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp(dport: u16) -> Vec<u8> {
        crate::flood::build_ipv4_udp(
            "10.0.0.1:40000".parse().unwrap(),
            format!("10.0.0.2:{dport}").parse().unwrap(),
            7,
            &[0u8; 8],
        )
    }

    #[test]
    fn writes_standard_pcapng_that_reads_back() {
        let p1 = ipv4_udp(53);
        let p2 = vec![0x60u8; 40]; // an IPv6 header's worth
        let mut w = DropWriter::new(Vec::new(), 128).unwrap();
        let n1 = w
            .write(&PacketRecord {
                time_unix_ns: 1_700_000_000_123_456_789,
                wire_len: p1.len() as u32,
                data: &p1,
                comment: "cause=table_full".into(),
            })
            .unwrap();
        let n2 = w
            .write(&PacketRecord {
                time_unix_ns: 1_700_000_001_000_000_001,
                wire_len: 1500,
                data: &p2,
                comment: String::new(),
            })
            .unwrap();
        assert_eq!((n1, n2, w.written()), (1, 2, 2));
        let bytes = w.into_inner();
        // Section header block, little- or big-endian magic.
        assert_eq!(&bytes[..4], &[0x0a, 0x0d, 0x0d, 0x0a]);

        let read = read_packets_from(&bytes[..]).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].time_unix_ns, 1_700_000_000_123_456_789, "nanosecond timestamps survive");
        assert_eq!(read[0].original_len, p1.len() as u32);
        assert_eq!(read[0].data, p1);
        assert_eq!(read[0].comment.as_deref(), Some("cause=table_full"));
        assert_eq!(read[0].linktype, LINKTYPE_RAW);
        assert_eq!(read[1].original_len, 1500);
        assert_eq!(read[1].data.len(), 40);
        assert_eq!(read[1].comment, None);
    }

    #[test]
    fn the_interface_says_raw_ip_with_nanosecond_timestamps() {
        let w = DropWriter::new(Vec::new(), 64).unwrap();
        let bytes = w.into_inner();
        let mut r = PcapNgReader::new(&bytes[..]).unwrap();
        let Some(Ok(Block::InterfaceDescription(idb))) = r.next_block() else { panic!("expected an IDB") };
        assert_eq!(u32::from(idb.linktype), 101);
        assert_eq!(idb.snaplen, 64);
        assert!(idb.options.contains(&InterfaceDescriptionOption::IfTsResol(9)));
    }

    #[test]
    fn data_is_truncated_to_the_snap_length_and_original_length_kept() {
        let big = vec![0x45u8; 300];
        let mut w = DropWriter::new(Vec::new(), 128).unwrap();
        w.write(&PacketRecord { time_unix_ns: 1, wire_len: 300, data: &big, comment: "x".into() }).unwrap();
        // A record with no bytes (the kernel could not copy any) is still a packet.
        w.write(&PacketRecord { time_unix_ns: 2, wire_len: 60, data: &[], comment: "no bytes".into() }).unwrap();
        let read = read_packets_from(&w.into_inner()[..]).unwrap();
        assert_eq!(read[0].data.len(), 128);
        assert_eq!(read[0].original_len, 300);
        assert_eq!(read[1].data.len(), 0);
        assert_eq!(read[1].original_len, 60);
    }
}
