//! The kernel sensors against real conntrack: real programs, real packets in
//! network namespaces, ctguard's numbers against the kernel's own counters.
//!
//! Every test here needs root and fails (never skips) without it.
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ctguard::{
    flood::Proto,
    sensors::{
        KeyMode, SensorOptions, Sensors,
        event::{self, DecodedEvent, EventKind},
        snapshot::{Cause, Snapshot},
    },
    trace::format,
};
use ctguard_integration::{
    lab::{Lab, Side},
    max::MaxGuard,
    root::require_root,
};

fn start(opts: SensorOptions) -> Sensors {
    let sensors = Sensors::start(&opts).unwrap_or_else(|e| panic!("sensors failed to start: {e}"));
    ctguard_integration::expect_backend(sensors.backend);
    sensors
}

/// All events currently in the ring buffer.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<DecodedEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(event::decode(&item).expect("decodable event"));
    }
    out
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, key: &str) -> u64 {
    after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0)
}

fn cause_delta(end: &Snapshot, start: &Snapshot, netns: u32, cause: Cause) -> u64 {
    let get = |s: &Snapshot| s.drops_by_cause(Some(netns)).get(&cause).copied().unwrap_or(0);
    get(end) - get(start)
}

#[test]
fn table_full_drops_equal_the_kernel_drop_counter_and_name_sent_flows() {
    require_root();
    let lab = Lab::new("sens-full");
    lab.enable_conntrack();
    let ns = lab.netns_inode(Side::B);
    let mut sensors = start(SensorOptions::default());
    let mut ring = sensors.take_events().unwrap();
    let _max = MaxGuard::lower(64);

    let kernel0 = lab.kernel_stats();
    let snap0 = sensors.snapshot().unwrap();
    drain(&mut ring);
    lab.send_udp_flows(400, &[5000, 5001]);
    let kernel1 = lab.kernel_stats();
    let snap1 = sensors.snapshot().unwrap();

    let kernel_drops = delta(&kernel1, &kernel0, "drop");
    let ours = cause_delta(&snap1, &snap0, ns, Cause::TableFull);
    assert!(kernel_drops > 100, "the table should have overflowed: kernel drop +{kernel_drops}");
    assert_eq!(ours, kernel_drops, "ctguard table_full must equal the kernel's drop counter delta");

    let spec = lab.flow_spec(Proto::Udp, &[5000, 5001]);
    let sent: HashSet<(IpAddr, u16, IpAddr, u16)> = spec
        .flows()
        .take(400)
        .map(|f| (IpAddr::V4(*f.src.ip()), f.src.port(), IpAddr::V4(*f.dst.ip()), f.dst.port()))
        .collect();
    let events: Vec<DecodedEvent> =
        drain(&mut ring).into_iter().filter(|e| e.netns == ns && e.cause == Some(Cause::TableFull)).collect();
    assert_eq!(events.len() as u64, ours, "one event per drop (the ring buffer was large enough)");
    for e in &events {
        let f = &e.flow;
        let tuple = (f.src.unwrap(), f.sport, f.dst.unwrap(), f.dport);
        assert!(sent.contains(&tuple), "event flow {} was not sent", format::flow(f));
        assert_eq!(f.proto, 17);
        assert_eq!(e.ctinfo, None, "a refused packet carries no conntrack entry");
    }
    assert_eq!(snap1.counters.since(&snap0.counters).events_lost, 0);
}

#[test]
fn ruleset_drops_are_ruleset_not_table_full() {
    require_root();
    let lab = Lab::new("sens-rule");
    lab.enable_conntrack();
    lab.add_nft_rule("udp dport 7777 drop");
    let ns = lab.netns_inode(Side::B);
    let mut sensors = start(SensorOptions::default());
    let mut ring = sensors.take_events().unwrap();
    let snap0 = sensors.snapshot().unwrap();
    drain(&mut ring);

    lab.send_udp_flows(50, &[7777]);
    lab.send_udp_flows(30, &[7778]);
    let snap1 = sensors.snapshot().unwrap();

    assert_eq!(cause_delta(&snap1, &snap0, ns, Cause::Ruleset), 50);
    assert_eq!(cause_delta(&snap1, &snap0, ns, Cause::TableFull), 0);
    let events: Vec<DecodedEvent> = drain(&mut ring).into_iter().filter(|e| e.netns == ns).collect();
    assert_eq!(events.len(), 50);
    assert!(events.iter().all(|e| e.cause == Some(Cause::Ruleset) && e.flow.dport == 7777));
    // nft's verdict frees the packet in nft_do_chain, with the new entry attached.
    assert!(events.iter().all(|e| e.ctinfo == Some(2)), "ctinfo IP_CT_NEW expected");
}

#[test]
fn invalid_packets_dropped_by_a_ct_state_rule_are_ct_invalid() {
    require_root();
    let lab = Lab::new("sens-inval");
    lab.enable_conntrack();
    lab.add_nft_rule("ct state invalid drop");
    let ns = lab.netns_inode(Side::B);
    let mut sensors = start(SensorOptions::default());
    let mut ring = sensors.take_events().unwrap();
    let kernel0 = lab.kernel_stats();
    let snap0 = sensors.snapshot().unwrap();
    drain(&mut ring);

    // SYN+FIN is a flag combination conntrack's TCP tracker rejects.
    lab.send_new_flows(Proto::TcpInvalidFlags, 40, &[8080]);
    let kernel1 = lab.kernel_stats();
    let snap1 = sensors.snapshot().unwrap();

    assert_eq!(delta(&kernel1, &kernel0, "invalid"), 40, "the kernel saw 40 invalid packets");
    assert_eq!(cause_delta(&snap1, &snap0, ns, Cause::CtInvalid), 40);
    assert_eq!(cause_delta(&snap1, &snap0, ns, Cause::Ruleset), 0);
    let events: Vec<DecodedEvent> = drain(&mut ring).into_iter().filter(|e| e.netns == ns).collect();
    assert_eq!(events.len(), 40);
    assert!(events.iter().all(|e| e.cause == Some(Cause::CtInvalid) && e.flow.proto == 6 && e.flow.dport == 8080));
}

#[test]
fn churn_counts_every_new_entry_split_per_port_as_sent() {
    require_root();
    let lab = Lab::new("sens-churn");
    lab.enable_conntrack();
    let ns = lab.netns_inode(Side::B);
    let mut sensors = start(SensorOptions { key_mode: KeyMode::DstPort, ..Default::default() });
    let count0 = lab.conntrack_count();
    let nft0 = lab.nft_new_counter();
    let snap0 = sensors.snapshot().unwrap();

    // 600 flows over 3 ports: 200 each (flow i goes to port i % 3).
    lab.send_udp_flows(600, &[53, 123, 443]);
    let snap1 = sensors.snapshot().unwrap();

    let kernel_new = lab.nft_new_counter() - nft0;
    let entries = lab.conntrack_count() - count0;
    assert_eq!(kernel_new, 600, "the kernel's own ct state new counter");
    assert_eq!(entries, 600, "the table grew by one entry per flow");
    let per_port: BTreeMap<u16, u64> = snap1
        .churn_in(Some(ns))
        .iter()
        .map(|(k, v)| {
            let before = snap0.churn_in(Some(ns)).iter().find(|(k0, _)| k0 == k).map_or(0, |(_, v0)| v0.inserts);
            (k.tuple.dport, v.inserts - before)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(per_port, BTreeMap::from([(53, 200), (123, 200), (443, 200)]));
    assert_eq!(snap1.inserts_in(Some(ns)) - snap0.inserts_in(Some(ns)), kernel_new);
    // Every allocation was keyed.
    let c = snap1.counters.since(&snap0.counters);
    assert!(c.keyed_entries >= 600 && c.new_entries >= 600);
}

#[test]
fn ring_buffer_overflow_is_counted_and_totals_stay_exact() {
    require_root();
    let lab = Lab::new("sens-ring");
    lab.enable_conntrack();
    let ns = lab.netns_inode(Side::B);
    // 4 KiB holds a few dozen events; nothing reads it during the flood.
    let mut sensors = start(SensorOptions { ring_bytes: 4096, ..Default::default() });
    let mut ring = sensors.take_events().unwrap();
    let _max = MaxGuard::lower(32);
    let kernel0 = lab.kernel_stats();
    let snap0 = sensors.snapshot().unwrap();
    drain(&mut ring);

    lab.send_udp_flows(500, &[9000]);
    let kernel1 = lab.kernel_stats();
    let snap1 = sensors.snapshot().unwrap();

    let kernel_drops = delta(&kernel1, &kernel0, "drop");
    let ours = cause_delta(&snap1, &snap0, ns, Cause::TableFull);
    assert!(kernel_drops > 300, "kernel drop +{kernel_drops}");
    assert_eq!(ours, kernel_drops, "map totals do not depend on event delivery");
    let lost = snap1.counters.since(&snap0.counters).events_lost;
    let delivered = drain(&mut ring).iter().filter(|e| e.kind == EventKind::Drop).count() as u64;
    assert!(lost > 0, "a 4 KiB ring cannot hold {kernel_drops} events");
    assert_eq!(
        delivered + lost,
        snap1.counters.since(&snap0.counters).netfilter_drops,
        "every drop is either delivered or counted lost"
    );
}

#[test]
fn captured_drop_events_carry_the_packet_headers() {
    require_root();
    let lab = Lab::new("sens-capture");
    lab.enable_conntrack();
    lab.add_nft_rule("udp dport 4444 drop");
    let ns = lab.netns_inode(Side::B);
    let mut sensors = start(SensorOptions { capture_bytes: 64, ..Default::default() });
    let mut ring = sensors.take_events().unwrap();
    drain(&mut ring);
    lab.send_udp_flows(10, &[4444]);
    sensors.snapshot().unwrap();
    let events: Vec<DecodedEvent> = drain(&mut ring).into_iter().filter(|e| e.netns == ns).collect();
    assert_eq!(events.len(), 10);
    for e in events {
        let p = e.packet.expect("captured bytes");
        // IPv4 header + 8 byte UDP header + 8 byte payload from the flood.
        assert_eq!(p.wire_len, 36);
        assert_eq!(p.data.len(), 36, "never past the end of the packet");
        assert_eq!(p.data[0], 0x45);
        assert_eq!(p.data[9], 17);
        assert_eq!(u16::from_be_bytes([p.data[22], p.data[23]]), 4444);
    }
}

/// Per-port (inserts, removals) of one namespace between two snapshots.
fn per_port(start: &Snapshot, end: &Snapshot, ns: u32) -> BTreeMap<u16, (u64, u64)> {
    end.churn_in(Some(ns))
        .iter()
        .filter(|(k, _)| k.other == 0)
        .map(|(k, v)| {
            let b = start.churn_in(Some(ns)).iter().find(|(k0, _)| k0 == k).map(|(_, v0)| *v0).unwrap_or_default();
            (k.tuple.dport, (v.inserts - b.inserts, v.removals - b.removals))
        })
        .filter(|(_, (i, r))| *i > 0 || *r > 0)
        .collect()
}

#[test]
fn removed_entries_are_counted_per_key_when_the_table_is_flushed() {
    require_root();
    let lab = Lab::new("sens-free");
    lab.enable_conntrack();
    let ns = lab.netns_inode(Side::B);
    let mut sensors = start(SensorOptions { key_mode: KeyMode::DstPort, ..Default::default() });
    let snap0 = sensors.snapshot().unwrap();
    lab.send_udp_flows(300, &[53, 123]);
    assert_eq!(lab.conntrack_count(), 300);
    lab.exec(Side::B, &["conntrack", "-F"]);
    // Entries are freed when their last reference goes: poll briefly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut snap1 = sensors.snapshot().unwrap();
    while per_port(&snap0, &snap1, ns).values().map(|(_, r)| r).sum::<u64>() < 300
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
        snap1 = sensors.snapshot().unwrap();
    }
    assert_eq!(lab.conntrack_count(), 0, "conntrack -F emptied the table");
    assert_eq!(per_port(&snap0, &snap1, ns), BTreeMap::from([(53, (150, 150)), (123, (150, 150))]));
    assert!(snap1.counters.since(&snap0.counters).removed_entries >= 300);
}

#[test]
fn a_full_key_map_folds_new_keys_into_other_and_totals_stay_exact() {
    require_root();
    let lab = Lab::new("sens-keys");
    lab.enable_conntrack();
    let ns = lab.netns_inode(Side::B);
    // The smallest key map: 16 keys for the whole machine.
    let mut sensors = start(SensorOptions { key_mode: KeyMode::DstPort, max_keys: 16, ..Default::default() });
    let nft0 = lab.nft_new_counter();
    let snap0 = sensors.snapshot().unwrap();
    let ports: Vec<u16> = (7000..7040).collect();
    lab.send_udp_flows(400, &ports);
    let snap1 = sensors.snapshot().unwrap();
    let kernel_new = lab.nft_new_counter() - nft0;
    assert_eq!(kernel_new, 400);

    let keyed: u64 = per_port(&snap0, &snap1, ns).values().map(|(i, _)| i).sum();
    let other_before =
        snap0.churn_in(Some(ns)).iter().filter(|(k, _)| k.other != 0).map(|(_, v)| v.inserts).sum::<u64>();
    let other = snap1.churn_in(Some(ns)).iter().filter(|(k, _)| k.other != 0).map(|(_, v)| v.inserts).sum::<u64>()
        - other_before;
    assert!(keyed <= 16 * 10, "at most 16 ports have their own key: {keyed}");
    assert!(other > 0, "the rest went to the namespace's \"other\" key");
    assert_eq!(keyed + other, kernel_new, "nothing lost: own keys + other = the kernel's count");
    assert!(snap1.counters.since(&snap0.counters).key_overflow >= other, "each fold is counted");
}

#[test]
fn every_key_mode_groups_new_entries_as_named() {
    require_root();
    let lab = Lab::new("sens-modes");
    lab.enable_conntrack();
    let ns = lab.netns_inode(Side::B);
    let (a, b) = (lab.addr(Side::A).to_string(), lab.addr(Side::B).to_string());
    // (mode, expected keys of the lab's namespace as `ctguard top` names them)
    let cases: [(KeyMode, BTreeMap<String, u64>); 4] = [
        (KeyMode::Netns, BTreeMap::from([(format!("netns:[{ns}]"), 60)])),
        (KeyMode::SrcIp, BTreeMap::from([(a.clone(), 60)])),
        (KeyMode::DstIp, BTreeMap::from([(b.clone(), 60)])),
        (KeyMode::SrcDst, BTreeMap::from([(format!("{a} -> {b}"), 60)])),
    ];
    let mut round = 0;
    for (mode, expected) in cases {
        let mut sensors = start(SensorOptions { key_mode: mode, ..Default::default() });
        let snap0 = sensors.snapshot().unwrap();
        // Fresh flows each round (the previous round's entries still exist).
        let spec = lab.flow_spec(Proto::Udp, &[6200, 6201]);
        lab.send_with(
            &spec,
            &ctguard::flood::SendOptions { first_flow: round * 60, ..ctguard::flood::SendOptions::count(60) },
        );
        round += 1;
        let snap1 = sensors.snapshot().unwrap();
        let got: BTreeMap<String, u64> = snap1
            .churn_in(Some(ns))
            .iter()
            .map(|(k, v)| {
                let before = snap0.churn_in(Some(ns)).iter().find(|(k0, _)| k0 == k).map_or(0, |(_, v0)| v0.inserts);
                (format::churn_key(k, mode), v.inserts - before)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(got, expected, "--by {mode:?}");
    }
    // The full tuple: one key per flow.
    let mut sensors = start(SensorOptions { key_mode: KeyMode::Tuple, ..Default::default() });
    let snap0 = sensors.snapshot().unwrap();
    let spec = lab.flow_spec(Proto::Udp, &[6200, 6201]);
    lab.send_with(
        &spec,
        &ctguard::flood::SendOptions { first_flow: round * 60, ..ctguard::flood::SendOptions::count(60) },
    );
    let snap1 = sensors.snapshot().unwrap();
    // Keys that gained new entries (earlier rounds' entries may expire
    // meanwhile and add removal-only keys on a slow, emulated CPU).
    let before = snap0.churn_in(Some(ns));
    let keys = snap1
        .churn_in(Some(ns))
        .iter()
        .filter(|(k, v)| v.inserts > before.iter().find(|(k0, _)| k0 == k).map_or(0, |(_, v0)| v0.inserts))
        .count();
    assert_eq!(keys, 60, "--by tuple: one key per flow");
    assert_eq!(snap1.inserts_in(Some(ns)) - snap0.inserts_in(Some(ns)), 60);
}

#[test]
fn icmp_and_ipv6_flows_are_keyed_and_their_table_full_drops_named() {
    require_root();
    let lab = Lab::new("sens-v6");
    lab.enable_conntrack();
    lab.enable_ipv6();
    let ns = lab.netns_inode(Side::B);
    let mut sensors = start(SensorOptions { key_mode: KeyMode::DstPort, ..Default::default() });
    let mut ring = sensors.take_events().unwrap();
    let snap0 = sensors.snapshot().unwrap();

    // 40 ICMP echo flows (one identifier each) and 50 UDP flows over IPv6.
    lab.send_new_flows(Proto::IcmpEcho, 40, &[9]);
    lab.send_udp6_flows(50, 6300, 20_000);
    let snap1 = sensors.snapshot().unwrap();
    let by_key: BTreeMap<(u8, u8, u16), u64> = snap1
        .churn_in(Some(ns))
        .iter()
        .map(|(k, v)| {
            let before = snap0.churn_in(Some(ns)).iter().find(|(k0, _)| k0 == k).map_or(0, |(_, v0)| v0.inserts);
            ((k.tuple.ip_version, k.tuple.proto, k.tuple.dport), v.inserts - before)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    // ICMP is keyed by type and code (echo request: 8/0), as conntrack does.
    assert_eq!(by_key.get(&(4, 1, 0x0800)), Some(&40), "{by_key:?}");
    assert_eq!(by_key.get(&(6, 17, 6300)), Some(&50), "{by_key:?}");

    // A full table refuses IPv6 flows too; each drop names the flow.
    drain(&mut ring);
    let kernel0 = lab.kernel_stats();
    let full_at = lab.conntrack_count();
    {
        let _max = MaxGuard::lower(full_at + 10);
        lab.send_udp6_flows(60, 6301, 30_000);
    }
    let kernel_drops = delta(&lab.kernel_stats(), &kernel0, "drop");
    let events: Vec<DecodedEvent> =
        drain(&mut ring).into_iter().filter(|e| e.netns == ns && e.cause == Some(Cause::TableFull)).collect();
    assert!(kernel_drops >= 40, "the table overflowed: kernel drop +{kernel_drops}");
    assert_eq!(events.len() as u64, kernel_drops, "one event per drop");
    let (a6, b6) = (IpAddr::V6(lab.addr6(Side::A)), IpAddr::V6(lab.addr6(Side::B)));
    for e in &events {
        let f = &e.flow;
        assert_eq!((f.src, f.dst, f.proto, f.dport), (Some(a6), Some(b6), 17, 6301), "{}", format::flow(f));
        assert!((30_000..30_060).contains(&f.sport), "{}", format::flow(f));
    }
}
