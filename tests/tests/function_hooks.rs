//! Tests only a kernel with kprobes can pass (stock distro kernels, run by
//! `cargo xtask vm-test`): their names start with `vm_`, and the host tier
//! skips them. Anywhere else they fail, never skip.
use std::{collections::HashSet, net::IpAddr};

use ctguard::{
    flood::Proto,
    sensors::{
        SensorOptions, Sensors,
        backend::{Backend, BackendRequest},
        event::{self, DecodedEvent},
        snapshot::{Cause, Confidence},
    },
    trace::format,
};
use ctguard_integration::{
    lab::{Lab, Side},
    max::MaxGuard,
    root::require_root,
};

fn function_hooks() -> Sensors {
    let opts = SensorOptions { backend: BackendRequest::FunctionHooks, ..Default::default() };
    let s =
        Sensors::start(&opts).unwrap_or_else(|e| panic!("the function-hook backend must start on this kernel: {e}"));
    assert_eq!(s.backend, Backend::FunctionHooks);
    s
}

#[test]
fn vm_automatic_choice_is_function_hooks() {
    require_root();
    let s = Sensors::start(&SensorOptions::default()).expect("sensors start");
    assert_eq!(s.backend, Backend::FunctionHooks, "auto should pick function hooks here: {}", s.backend_reason);
}

#[test]
fn vm_every_table_full_event_carries_the_refused_flows_exact_tuple() {
    require_root();
    let lab = Lab::new("vm-refused");
    lab.enable_conntrack();
    let ns = lab.netns_inode(Side::B);
    let mut sensors = function_hooks();
    let mut ring = sensors.take_events().unwrap();
    let _max = MaxGuard::lower(32);
    let kernel0 = lab.kernel_stats();
    let snap0 = sensors.snapshot().unwrap();
    while ring.next().is_some() {}

    lab.send_udp_flows(300, &[6000, 6001, 6002]);
    let kernel1 = lab.kernel_stats();
    let snap1 = sensors.snapshot().unwrap();

    let kernel_drops = kernel1["drop"] - kernel0["drop"];
    let refused = snap1.counters.since(&snap0.counters).alloc_refused;
    assert!(kernel_drops > 100, "kernel drop +{kernel_drops}");
    assert_eq!(refused, kernel_drops, "every refused allocation is one kernel drop");
    let sent: HashSet<(IpAddr, u16, IpAddr, u16)> = lab
        .flow_spec(Proto::Udp, &[6000, 6001, 6002])
        .flows()
        .take(300)
        .map(|f| (IpAddr::V4(*f.src.ip()), f.src.port(), IpAddr::V4(*f.dst.ip()), f.dst.port()))
        .collect();
    let mut events: Vec<DecodedEvent> = Vec::new();
    while let Some(item) = ring.next() {
        let e = event::decode(&item).unwrap();
        if e.netns == ns && e.cause == Some(Cause::TableFull) {
            events.push(e);
        }
    }
    assert_eq!(events.len() as u64, kernel_drops);
    for e in &events {
        assert_eq!(e.cause_confidence, Some(Confidence::Certain), "function hooks make the cause certain");
        let f = &e.flow;
        assert!(
            sent.contains(&(f.src.unwrap(), f.sport, f.dst.unwrap(), f.dport)),
            "not a sent flow: {}",
            format::flow(f)
        );
    }
}

#[test]
fn vm_early_drop_evictions_match_the_kernel_counter() {
    require_root();
    let lab = Lab::new("vm-evict");
    lab.enable_conntrack();
    let mut sensors = function_hooks();
    let _max = MaxGuard::lower(64);
    let kernel0 = lab.kernel_stats();
    let snap0 = sensors.snapshot().unwrap();

    // Unreplied UDP entries are never ASSURED, so early_drop may evict them
    // when a new flow hashes near one (8 buckets are searched).
    lab.send_udp_flows(3000, &[7000]);
    let kernel1 = lab.kernel_stats();
    let snap1 = sensors.snapshot().unwrap();

    let kernel_evictions = kernel1["early_drop"] - kernel0["early_drop"];
    let ours = snap1.counters.since(&snap0.counters).early_drop_evictions;
    assert!(kernel_evictions > 0, "expected some early_drop evictions with 3000 flows over max 64");
    assert_eq!(ours, kernel_evictions);
}
