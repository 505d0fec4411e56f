//! Which events `trace` shows. Pure: every filter is unit-tested.
use crate::{
    sensors::{event::DecodedEvent, event::EventKind, snapshot::Cause},
    top::model::KeyFilter,
};

#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub causes: Vec<Cause>,
    /// Namespace, protocol, port and addresses (shared with `top`).
    pub flow: KeyFilter,
    /// Show new-entry events too (they never match a cause filter).
    pub new_entries: bool,
}

impl Filter {
    pub fn matches(&self, ev: &DecodedEvent) -> bool {
        let kind_ok = match ev.kind {
            EventKind::Drop => self.causes.is_empty() || ev.cause.is_some_and(|c| self.causes.contains(&c)),
            EventKind::NewEntry => self.new_entries && self.causes.is_empty(),
        };
        let (f, want) = (&ev.flow, &self.flow);
        kind_ok
            && want.netns.is_none_or(|ns| ns == ev.netns)
            && want.proto.is_none_or(|p| p == f.proto)
            && want.port.is_none_or(|p| p == f.sport || p == f.dport)
            && want.src.is_none_or(|c| f.src.is_some_and(|a| c.contains(&a)))
            && want.dst.is_none_or(|c| f.dst.is_some_and(|a| c.contains(&a)))
    }
}

/// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, `udplite` or a protocol number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" | "ipv6-icmp" => Ok(58),
        "sctp" => Ok(132),
        "udplite" => Ok(136),
        other => other.parse().map_err(|_| {
            format!("unknown protocol `{s}`: use tcp, udp, icmp, icmpv6, sctp, udplite or a number 0-255")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::{event::Flow, snapshot::Confidence};

    fn drop_event(cause: Cause, sport: u16, dport: u16, src: &str, dst: &str) -> DecodedEvent {
        DecodedEvent {
            kind: EventKind::Drop,
            ts_ns: 0,
            cpu: 0,
            netns: 7,
            ifindex: 2,
            cause: Some(cause),
            cause_confidence: Some(Confidence::Likely),
            location: 0,
            ctinfo: None,
            ct_status: 0,
            zone: 0,
            flow: Flow { proto: 17, src: Some(src.parse().unwrap()), dst: Some(dst.parse().unwrap()), sport, dport },
            packet: None,
        }
    }

    #[test]
    fn empty_filter_shows_drops_not_new_entries() {
        let f = Filter::default();
        let mut ev = drop_event(Cause::TableFull, 1, 2, "10.0.0.1", "10.0.0.2");
        assert!(f.matches(&ev));
        ev.kind = EventKind::NewEntry;
        assert!(!f.matches(&ev));
        assert!(Filter { new_entries: true, ..Default::default() }.matches(&ev));
    }

    #[test]
    fn each_field_filters() {
        let ev = drop_event(Cause::Ruleset, 40000, 53, "10.0.0.1", "192.168.1.9");
        let yes = |f: Filter| assert!(f.matches(&ev), "{f:?}");
        let no = |f: Filter| assert!(!f.matches(&ev), "{f:?}");
        yes(Filter { causes: vec![Cause::Ruleset, Cause::TableFull], ..Default::default() });
        no(Filter { causes: vec![Cause::TableFull], ..Default::default() });
        yes(Filter { flow: KeyFilter { netns: Some(7), ..Default::default() }, ..Default::default() });
        no(Filter { flow: KeyFilter { netns: Some(8), ..Default::default() }, ..Default::default() });
        yes(Filter { flow: KeyFilter { proto: Some(17), ..Default::default() }, ..Default::default() });
        no(Filter { flow: KeyFilter { proto: Some(6), ..Default::default() }, ..Default::default() });
        yes(Filter { flow: KeyFilter { port: Some(53), ..Default::default() }, ..Default::default() });
        yes(Filter { flow: KeyFilter { port: Some(40000), ..Default::default() }, ..Default::default() });
        no(Filter { flow: KeyFilter { port: Some(80), ..Default::default() }, ..Default::default() });
        yes(Filter {
            flow: KeyFilter { src: Some("10.0.0.0/8".parse().unwrap()), ..Default::default() },
            ..Default::default()
        });
        no(Filter {
            flow: KeyFilter { src: Some("192.168.0.0/16".parse().unwrap()), ..Default::default() },
            ..Default::default()
        });
        yes(Filter {
            flow: KeyFilter { dst: Some("192.168.0.0/16".parse().unwrap()), ..Default::default() },
            ..Default::default()
        });
        no(Filter {
            flow: KeyFilter { dst: Some("fd00::/8".parse().unwrap()), ..Default::default() },
            ..Default::default()
        });
    }

    #[test]
    fn protocols_by_name_or_number() {
        assert_eq!(parse_proto("TCP"), Ok(6));
        assert_eq!(parse_proto("udp"), Ok(17));
        assert_eq!(parse_proto("47"), Ok(47));
        assert!(parse_proto("gre-ish").unwrap_err().contains("unknown protocol"));
        assert!(parse_proto("300").is_err());
    }
}
