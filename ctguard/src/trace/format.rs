//! How `trace` prints events and churn keys. Pure.
use std::{fmt::Write as _, net::IpAddr};

use ctguard_ebpf::ChurnKey;

use crate::sensors::{
    KeyMode,
    event::{DecodedEvent, EventKind, Flow, proto_name},
    snapshot::Confidence,
};

/// `10.0.0.1:40000`, `[fd00::1]:443`, or `?` for an unknown address.
fn endpoint(addr: Option<IpAddr>, port: u16, with_port: bool) -> String {
    match (addr, with_port) {
        (Some(IpAddr::V6(a)), true) => format!("[{a}]:{port}"),
        (Some(a), true) => format!("{a}:{port}"),
        (Some(a), false) => a.to_string(),
        (None, _) => "?".into(),
    }
}

pub fn flow(f: &Flow) -> String {
    let ports = matches!(f.proto, 6 | 17 | 132 | 136);
    let mut s =
        format!("{} {} -> {}", f.proto_name(), endpoint(f.src, f.sport, ports), endpoint(f.dst, f.dport, ports));
    if matches!(f.proto, 1 | 58) {
        let _ = write!(s, " type {} code {}", f.dport >> 8, f.dport & 0xff);
    }
    s
}

/// One line of text for an event. `location` is the symbolised drop site.
pub fn event_line(ev: &DecodedEvent, rel_secs: f64, location: Option<&str>) -> String {
    let head = format!("{rel_secs:>10.6}s cpu{:<2} netns:[{}]", ev.cpu, ev.netns);
    match ev.kind {
        EventKind::Drop => {
            let cause = ev.cause.map_or("?", |c| c.as_str());
            let conf = match ev.cause_confidence {
                Some(Confidence::Certain) | None => "",
                Some(Confidence::Likely) => " (likely)",
            };
            let ct = match ev.ctinfo {
                None => "no ct".to_string(),
                Some(7) => "untracked".to_string(),
                Some(i) => format!("ctinfo {i} status {:#x}", ev.ct_status),
            };
            format!(
                "{head} DROP {cause}{conf} if{} {} [{ct}] at {}",
                ev.ifindex,
                flow(&ev.flow),
                location.unwrap_or("?")
            )
        }
        EventKind::NewEntry => format!("{head} NEW  {} zone {}", flow(&ev.flow), ev.zone),
    }
}

/// A churn key as the chosen key mode shows it.
pub fn churn_key(key: &ChurnKey, mode: KeyMode) -> String {
    if key.other != 0 {
        return "(other keys)".into();
    }
    let f = Flow::from_kernel(&key.tuple);
    match mode {
        KeyMode::DstPort => format!("{}/{}", key.tuple.dport, proto_name(key.tuple.proto)),
        KeyMode::SrcIp => endpoint(f.src, 0, false),
        KeyMode::DstIp => endpoint(f.dst, 0, false),
        KeyMode::SrcDst => format!("{} -> {}", endpoint(f.src, 0, false), endpoint(f.dst, 0, false)),
        KeyMode::Netns => format!("netns:[{}]", key.netns),
        KeyMode::Zone => format!("zone {}", key.zone),
        KeyMode::Tuple => format!("{} zone {}", flow(&f), key.zone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::snapshot::Cause;
    use ctguard_ebpf::FlowTuple;

    #[test]
    fn drop_line_names_cause_flow_and_location() {
        let ev = DecodedEvent {
            kind: EventKind::Drop,
            ts_ns: 0,
            cpu: 1,
            netns: 4026532247,
            ifindex: 3,
            cause: Some(Cause::TableFull),
            cause_confidence: Some(Confidence::Likely),
            location: 0,
            ctinfo: None,
            ct_status: 0,
            zone: 0,
            flow: Flow {
                proto: 17,
                src: Some("10.0.0.1".parse().unwrap()),
                dst: Some("10.0.0.2".parse().unwrap()),
                sport: 40000,
                dport: 5000,
            },
            packet: None,
        };
        let line = event_line(&ev, 1.5, Some("nf_hook_slow+0x7d"));
        assert!(line.contains("DROP table_full (likely)"), "{line}");
        assert!(line.contains("udp 10.0.0.1:40000 -> 10.0.0.2:5000"), "{line}");
        assert!(line.contains("at nf_hook_slow+0x7d"), "{line}");
        assert!(line.contains("netns:[4026532247]"), "{line}");
    }

    #[test]
    fn ipv6_and_icmp_flows() {
        let f = Flow {
            proto: 6,
            src: Some("fd00::1".parse().unwrap()),
            dst: Some("fd00::2".parse().unwrap()),
            sport: 1,
            dport: 443,
        };
        assert_eq!(flow(&f), "tcp [fd00::1]:1 -> [fd00::2]:443");
        let icmp = Flow {
            proto: 1,
            src: Some("10.0.0.1".parse().unwrap()),
            dst: Some("10.0.0.2".parse().unwrap()),
            sport: 9,
            dport: 0x0800,
        };
        assert_eq!(flow(&icmp), "icmp 10.0.0.1 -> 10.0.0.2 type 8 code 0");
    }

    #[test]
    fn keys_render_per_mode() {
        let mut t = FlowTuple { dport: 53, proto: 17, ip_version: 4, ..Default::default() };
        t.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let key = ChurnKey { netns: 5, zone: 0, other: 0, _pad: 0, tuple: t };
        assert_eq!(churn_key(&key, KeyMode::DstPort), "53/udp");
        assert_eq!(churn_key(&key, KeyMode::SrcIp), "10.0.0.1");
        assert_eq!(churn_key(&key, KeyMode::Netns), "netns:[5]");
        assert_eq!(churn_key(&ChurnKey { other: 1, ..key }, KeyMode::DstPort), "(other keys)");
    }
}
