//! What a bypass exempts from conntrack: protocols, ports, addresses, an
//! interface and which direction of the flows.
//!
//! A selector describes flows by their *service side*: `--port 80` means
//! flows whose destination port (in the original direction) is 80, whether
//! this host serves them or opens them. NOTRACK must catch every packet of
//! such a flow, so `--direction both` (the default) matches the request
//! direction (`dport 80`, `saddr --src`, `daddr --dst`) and the reply
//! direction (`sport 80`, `saddr --dst`, `daddr --src`) in both the
//! prerouting and output hooks -- the runbook's four iptables lines.
//!
//! Every selector has a canonical form (the `bypass add` options that
//! recreate it, in a fixed order) and an id derived from it, so the same
//! selector always gets the same id and adding it twice is a no-op.
use std::{fmt, net::IpAddr};

use serde::Serialize;

use super::{error::BypassError, ranges::RangeSet};
use crate::util::Cidr;

/// nft keeps at most 127 bytes of a rule comment.
pub const COMMENT_MAX: usize = 127;
/// First word of every rule comment ctguard writes.
pub const COMMENT_TAG: &str = "ctguard";
/// Protocols used when `--proto` is not given.
pub const DEFAULT_PROTOS: [u8; 2] = [6, 17];

const MAX_PORT: u128 = 65535;

/// Which packets of the selected flows are exempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Only packets going to the selected port / --dst (the requests).
    In,
    /// Only packets coming from the selected port / --dst (the replies).
    Out,
    /// Both: every packet of the flows (what NOTRACK needs; the default).
    Both,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Both => "both",
        }
    }

    /// The halves of a flow this direction exempts.
    pub fn halves(self) -> &'static [Half] {
        match self {
            Direction::In => &[Half::Request],
            Direction::Out => &[Half::Reply],
            Direction::Both => &[Half::Request, Half::Reply],
        }
    }
}

/// One direction of a flow: `Request` packets go to the service port,
/// `Reply` packets come from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Half {
    Request,
    Reply,
}

impl Half {
    pub fn as_str(self) -> &'static str {
        match self {
            Half::Request => "request",
            Half::Reply => "reply",
        }
    }

    pub fn parse(s: &str) -> Option<Half> {
        match s {
            "request" => Some(Half::Request),
            "reply" => Some(Half::Reply),
            _ => None,
        }
    }
}

/// IP protocol numbers ctguard names, and the names nft uses for them.
const PROTOS: [(u8, &str); 7] =
    [(1, "icmp"), (6, "tcp"), (17, "udp"), (33, "dccp"), (58, "icmpv6"), (132, "sctp"), (136, "udplite")];

/// `tcp`, `udp`, ... or the number.
pub fn proto_name(p: u8) -> String {
    PROTOS.iter().find(|(n, _)| *n == p).map_or_else(|| p.to_string(), |(_, s)| (*s).to_string())
}

/// Protocols whose header starts with 16-bit source and destination ports
/// (what nft's `th sport/dport` reads).
pub fn has_ports(p: u8) -> bool {
    matches!(p, 6 | 17 | 33 | 132 | 136)
}

/// A protocol name (as nft, /etc/protocols or `ctguard top` spell it) or number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    let lower = s.trim().to_ascii_lowercase();
    let alias = match lower.as_str() {
        "ipv6-icmp" | "icmp6" => "icmpv6",
        other => other,
    };
    if let Some((n, _)) = PROTOS.iter().find(|(_, name)| *name == alias) {
        return Ok(*n);
    }
    lower.parse::<u8>().map_err(|_| {
        format!("unknown protocol `{s}`: use tcp, udp, sctp, udplite, dccp, icmp, icmpv6 or a number 0-255")
    })
}

/// Parses port lists: `80`, `80,15000`, `8000-8100`; repeated options add up.
pub fn parse_ports(items: &[String]) -> Result<Option<RangeSet>, BypassError> {
    let mut ranges = Vec::new();
    for item in items {
        for part in item.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(BypassError::selector(
                    format!("--port `{item}` has an empty element"),
                    "list ports and ranges separated by commas, e.g. --port 80,443,8000-8100",
                ));
            }
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (parse_port(a, item)?, parse_port(b, item)?),
                None => {
                    let p = parse_port(part, item)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(BypassError::selector(
                    format!("--port range `{part}` runs backwards"),
                    format!("write the lower port first: {hi}-{lo}"),
                ));
            }
            ranges.push((u128::from(lo), u128::from(hi)));
        }
    }
    Ok((!ranges.is_empty()).then(|| RangeSet::from_ranges(ranges, MAX_PORT)))
}

fn parse_port(s: &str, item: &str) -> Result<u16, BypassError> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(BypassError::selector(
            format!("port {p} in --port `{item}` is out of range"),
            "ports are numbers from 1 to 65535",
        )),
        Err(_) => Err(BypassError::selector(
            format!("`{}` in --port `{item}` is not a port number", s.trim()),
            "give numbers or ranges: --port 80,15000 or --port 8000-8100 (service names are not accepted)",
        )),
    }
}

/// `80,8000-8100`.
pub fn ports_text(set: &RangeSet) -> String {
    set.ranges()
        .iter()
        .map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
        .collect::<Vec<_>>()
        .join(",")
}

/// The network a CIDR names, host bits cleared (`10.1.2.3/8` -> `10.0.0.0/8`).
pub fn network(c: Cidr) -> Cidr {
    let addr = match c.addr {
        IpAddr::V4(a) => {
            let mask = if c.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(c.prefix)) };
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = if c.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(c.prefix)) };
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    Cidr { addr, prefix: c.prefix }
}

/// The addresses of a CIDR as a range set in its family's domain.
pub fn cidr_range(c: Cidr) -> RangeSet {
    let n = network(c);
    match n.addr {
        IpAddr::V4(a) => {
            let lo = u128::from(u32::from(a));
            let size = 1u128 << (32 - u32::from(c.prefix));
            RangeSet::from_ranges([(lo, lo + size - 1)], u128::from(u32::MAX))
        }
        IpAddr::V6(a) => {
            let lo = u128::from(a);
            let hi = lo | u128::MAX.checked_shr(u32::from(c.prefix)).unwrap_or(0);
            RangeSet::from_ranges([(lo, hi)], u128::MAX)
        }
    }
}

/// IP version of a packet class or an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        if addr.is_ipv4() { Family::V4 } else { Family::V6 }
    }
    /// Largest address value.
    pub fn max(self) -> u128 {
        match self {
            Family::V4 => u128::from(u32::MAX),
            Family::V6 => u128::MAX,
        }
    }
    /// nft's payload protocol for the IP header: `ip` or `ip6`.
    pub fn nft_ip(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// The raw options of `bypass add` (strings, as typed).
#[derive(Clone, Debug, Default)]
pub struct SelectorInput {
    pub ports: Vec<String>,
    pub protos: Vec<String>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub iface: Option<String>,
    pub direction: Option<Direction>,
}

/// A validated, normalized selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// Sorted, distinct, never empty.
    pub protos: Vec<u8>,
    /// `None`: any port.
    pub ports: Option<RangeSet>,
    /// Networks with host bits cleared.
    pub src: Option<Cidr>,
    pub dst: Option<Cidr>,
    pub iface: Option<String>,
    pub direction: Direction,
}

impl Selector {
    pub fn parse(input: &SelectorInput) -> Result<Selector, BypassError> {
        let mut protos = Vec::new();
        for item in &input.protos {
            for part in item.split(',') {
                let p =
                    parse_proto(part).map_err(|e| BypassError::selector(e, "e.g. --proto tcp or --proto tcp,udp"))?;
                protos.push(p);
            }
        }
        let explicit_protos = !protos.is_empty();
        if !explicit_protos {
            protos.extend(DEFAULT_PROTOS);
        }
        protos.sort_unstable();
        protos.dedup();

        let ports = parse_ports(&input.ports)?;
        if ports.is_some()
            && let Some(p) = protos.iter().find(|p| !has_ports(**p))
        {
            return Err(BypassError::selector(
                format!("--proto {} has no ports, so it cannot be combined with --port", proto_name(*p)),
                "ports exist for tcp, udp, sctp, udplite and dccp; drop --port to exempt all of that protocol's traffic",
            ));
        }

        let cidr = |opt: &str, s: &Option<String>| -> Result<Option<Cidr>, BypassError> {
            s.as_deref()
                .map(|s| {
                    s.parse::<Cidr>().map(network).map_err(|e| {
                        BypassError::selector(
                            format!("{opt} `{s}`: {e}"),
                            "give an address or a network: 10.0.0.0/8, 192.0.2.7, fd00::/64",
                        )
                    })
                })
                .transpose()
        };
        let src = cidr("--src", &input.src)?;
        let dst = cidr("--dst", &input.dst)?;
        if let (Some(s), Some(d)) = (src, dst)
            && Family::of(&s.addr) != Family::of(&d.addr)
        {
            return Err(BypassError::selector(
                format!("--src {s} and --dst {d} are of different IP versions, so no packet can match both"),
                "use two IPv4 or two IPv6 networks (add one bypass per IP version)",
            ));
        }

        let iface = input.iface.as_deref().map(validate_iface).transpose()?;

        if ports.is_none() && src.is_none() && dst.is_none() {
            return Err(BypassError::selector(
                "a bypass needs --port, --src or --dst: exempting all traffic from conntrack would break NAT and every `ct state` rule".to_string(),
                "e.g. ctguard bypass add --port 80,15000 --proto tcp",
            ));
        }

        let sel = Selector { protos, ports, src, dst, iface, direction: input.direction.unwrap_or(Direction::Both) };
        for half in sel.direction.halves() {
            let len = sel.comment(*half).len();
            if len > COMMENT_MAX {
                return Err(BypassError::selector(
                    format!("this selector needs a {len}-byte rule comment; nft keeps at most {COMMENT_MAX} bytes"),
                    "split it: run `ctguard bypass add` once per group of ports or networks",
                ));
            }
        }
        Ok(sel)
    }

    /// The address family the selector is limited to, if any.
    pub fn family(&self) -> Option<Family> {
        self.src.or(self.dst).map(|c| Family::of(&c.addr))
    }

    /// The families whose packets it matches.
    pub fn families(&self) -> Vec<Family> {
        self.family().map_or_else(|| vec![Family::V4, Family::V6], |f| vec![f])
    }

    /// The `bypass add` options that recreate this selector, in canonical order.
    pub fn args(&self) -> String {
        let mut out = format!("--proto {}", self.protos.iter().map(|p| proto_name(*p)).collect::<Vec<_>>().join(","));
        if let Some(p) = &self.ports {
            out.push_str(&format!(" --port {}", ports_text(p)));
        }
        if let Some(c) = self.src {
            out.push_str(&format!(" --src {c}"));
        }
        if let Some(c) = self.dst {
            out.push_str(&format!(" --dst {c}"));
        }
        if let Some(i) = &self.iface {
            out.push_str(&format!(" --iface {i}"));
        }
        out.push_str(&format!(" --direction {}", self.direction.as_str()));
        out
    }

    /// The stable id: 8 hex digits of a 64-bit FNV-1a hash of the canonical
    /// form. Stable across runs, hosts and ctguard builds (no randomized
    /// hasher); changing the canonical form would need a new version tag.
    pub fn id(&self) -> String {
        let h = fnv1a64(format!("ctguard-bypass-v1 {}", self.args()).as_bytes());
        format!("{:08x}", (h >> 32) ^ (h & 0xffff_ffff))
    }

    /// The comment of this selector's rule for one half:
    /// `ctguard <id> <half> <args>`.
    pub fn comment(&self, half: Half) -> String {
        format!("{COMMENT_TAG} {} {} {}", self.id(), half.as_str(), self.args())
    }

    /// Parses the canonical options back (from a rule comment).
    pub fn from_args(args: &str) -> Result<Selector, BypassError> {
        let mut input = SelectorInput::default();
        let mut words = args.split_whitespace();
        while let Some(flag) = words.next() {
            let value = words.next().ok_or_else(|| {
                BypassError::selector(format!("`{flag}` has no value in `{args}`"), "not a ctguard selector")
            })?;
            match flag {
                "--proto" => input.protos.push(value.into()),
                "--port" => input.ports.push(value.into()),
                "--src" => input.src = Some(value.into()),
                "--dst" => input.dst = Some(value.into()),
                "--iface" => input.iface = Some(value.into()),
                "--direction" => {
                    input.direction = Some(match value {
                        "in" => Direction::In,
                        "out" => Direction::Out,
                        "both" => Direction::Both,
                        _ => {
                            return Err(BypassError::selector(
                                format!("unknown direction `{value}`"),
                                "in, out or both",
                            ));
                        }
                    })
                }
                _ => {
                    return Err(BypassError::selector(
                        format!("unknown option `{flag}` in `{args}`"),
                        "not a ctguard selector",
                    ));
                }
            }
        }
        Selector::parse(&input)
    }

    /// A one-line description for people: `tcp,udp port 80,15000 from any to any (both directions)`.
    pub fn describe(&self) -> String {
        let mut out = self.protos.iter().map(|p| proto_name(*p)).collect::<Vec<_>>().join(",");
        if let Some(p) = &self.ports {
            out.push_str(&format!(" port {}", ports_text(p)));
        }
        if let Some(c) = self.src {
            out.push_str(&format!(" from {c}"));
        }
        if let Some(c) = self.dst {
            out.push_str(&format!(" to {c}"));
        }
        if let Some(i) = &self.iface {
            out.push_str(&format!(" on {i}"));
        }
        out
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.args())
    }
}

fn validate_iface(name: &str) -> Result<String, BypassError> {
    let body = name.strip_suffix('*').unwrap_or(name);
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':');
    if body.is_empty() || name.len() > 15 || !body.chars().all(ok_char) {
        return Err(BypassError::selector(
            format!("`{name}` is not an interface name"),
            "interface names have 1 to 15 letters, digits or -_.@: (a trailing * matches a prefix, e.g. veth*)",
        ));
    }
    Ok(name.to_string())
}

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Parses a rule comment ctguard wrote: `(id, half, selector args)`.
pub fn parse_comment(comment: &str) -> Option<(&str, Half, &str)> {
    let rest = comment.strip_prefix(COMMENT_TAG)?.strip_prefix(' ')?;
    let (id, rest) = rest.split_once(' ')?;
    let (half, args) = rest.split_once(' ')?;
    let valid_id = id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit());
    valid_id.then_some(())?;
    Some((id, Half::parse(half)?, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(ports: &[&str], protos: &[&str]) -> Result<Selector, BypassError> {
        Selector::parse(&SelectorInput {
            ports: ports.iter().map(|s| s.to_string()).collect(),
            protos: protos.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    fn err(input: SelectorInput) -> String {
        Selector::parse(&input).unwrap_err().to_string()
    }

    #[test]
    fn ports_lists_and_ranges_normalize() {
        let s = sel(&["15000,80", "8000-8100", "81"], &["tcp"]).unwrap();
        assert_eq!(ports_text(s.ports.as_ref().unwrap()), "80-81,8000-8100,15000");
        assert_eq!(s.protos, vec![6]);
        assert_eq!(s.direction, Direction::Both);
        assert_eq!(s.args(), "--proto tcp --port 80-81,8000-8100,15000 --direction both");
    }

    #[test]
    fn default_protocols_are_tcp_and_udp() {
        let s = sel(&["53"], &[]).unwrap();
        assert_eq!(s.protos, vec![6, 17]);
        assert_eq!(s.args(), "--proto tcp,udp --port 53 --direction both");
        let same = sel(&["53"], &["udp,tcp", "TCP"]).unwrap();
        assert_eq!(same, s);
    }

    #[test]
    fn bad_ports_are_clear_errors() {
        for (port, expect) in [
            ("0", "out of range"),
            ("70000", "out of range"),
            ("http", "not a port number"),
            ("90-80", "runs backwards"),
            ("80,,81", "empty element"),
            ("-5", "not a port number"),
        ] {
            let e = sel(&[port], &["tcp"]).unwrap_err().to_string();
            assert!(e.contains(expect), "{port}: {e}");
            assert!(e.contains("hint:"), "{port}: {e}");
        }
    }

    #[test]
    fn protocols_without_ports_reject_port_lists() {
        let e = sel(&["80"], &["icmp"]).unwrap_err().to_string();
        assert!(e.contains("icmp has no ports"), "{e}");
        assert!(sel(&[], &["bogus"]).is_err());
        assert_eq!(parse_proto("ipv6-icmp"), Ok(58));
        assert_eq!(parse_proto("47"), Ok(47));
    }

    #[test]
    fn addresses_are_normalized_and_families_must_agree() {
        let s = Selector::parse(&SelectorInput {
            src: Some("10.1.2.3/8".into()),
            dst: Some("192.0.2.7".into()),
            ports: vec!["53".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.src.unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(s.dst.unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(s.family(), Some(Family::V4));
        let e =
            err(SelectorInput { src: Some("10.0.0.0/8".into()), dst: Some("fd00::/8".into()), ..Default::default() });
        assert!(e.contains("different IP versions"), "{e}");
        let e = err(SelectorInput { src: Some("10.0.0.0/40".into()), ..Default::default() });
        assert!(e.contains("0 to 32"), "{e}");
        let v6 = Selector::parse(&SelectorInput { dst: Some("fd00::1:2/64".into()), ..Default::default() }).unwrap();
        assert_eq!(v6.dst.unwrap().to_string(), "fd00::/64");
        assert_eq!(v6.family(), Some(Family::V6));
    }

    #[test]
    fn an_empty_selector_is_refused() {
        let e = err(SelectorInput { protos: vec!["udp".into()], ..Default::default() });
        assert!(e.contains("needs --port, --src or --dst"), "{e}");
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "a very long interface name", "eth 0", "eth\"0", "*"] {
            let e = err(SelectorInput { ports: vec!["80".into()], iface: Some(bad.into()), ..Default::default() });
            assert!(e.contains("not an interface name"), "{bad}: {e}");
        }
        let ok = Selector::parse(&SelectorInput {
            ports: vec!["80".into()],
            iface: Some("veth*".into()),
            ..Default::default()
        });
        assert_eq!(ok.unwrap().iface.as_deref(), Some("veth*"));
    }

    #[test]
    fn ids_are_stable_and_depend_only_on_the_canonical_form() {
        let a = sel(&["80,15000"], &["tcp"]).unwrap();
        let b = sel(&["15000", "80"], &["TCP"]).unwrap();
        assert_eq!(a.id(), b.id());
        // Pinned: the id is stored in rule comments, so it must never change
        // between ctguard versions (that would orphan installed rules).
        assert_eq!(a.args(), "--proto tcp --port 80,15000 --direction both");
        assert_eq!(a.id(), "37ec144b");
        let c = sel(&["80,15000"], &["udp"]).unwrap();
        assert_ne!(a.id(), c.id());
        let d = Selector { direction: Direction::In, ..a.clone() };
        assert_ne!(a.id(), d.id());
    }

    #[test]
    fn comments_round_trip() {
        let s = Selector::parse(&SelectorInput {
            ports: vec!["80,8000-8100".into()],
            src: Some("fd00::/16".into()),
            iface: Some("eth0".into()),
            direction: Some(Direction::In),
            ..Default::default()
        })
        .unwrap();
        let c = s.comment(Half::Request);
        let (id, half, args) = parse_comment(&c).unwrap();
        assert_eq!(id, s.id());
        assert_eq!(half, Half::Request);
        assert_eq!(Selector::from_args(args).unwrap(), s);
        assert!(parse_comment("ctguard xyz request --proto tcp").is_none());
        assert!(parse_comment("something else").is_none());
    }

    #[test]
    fn overlong_selectors_are_refused_before_nft_truncates_them() {
        let many: Vec<String> = (0..40).map(|i| (1000 + i * 3).to_string()).collect();
        let e = sel(&[&many.join(",")], &["tcp"]).unwrap_err().to_string();
        assert!(e.contains("rule comment"), "{e}");
    }

    #[test]
    fn cidr_ranges() {
        let r = cidr_range("10.0.0.0/8".parse().unwrap());
        assert_eq!(r.ranges(), &[(0x0a00_0000, 0x0aff_ffff)]);
        let all = cidr_range("::/0".parse().unwrap());
        assert!(all.is_full());
        let host = cidr_range("fd00::1".parse().unwrap());
        assert_eq!(host.len(), 1);
    }
}
