//! Reading the requested namespaces: once, or twice `--interval` apart so
//! rising drop counters show.
use std::time::Duration;

use super::report::{LatestReading, Observation};
use crate::{
    conntrack::{self, ConntrackView, StatTable, sysctl},
    error::CtguardError,
    netns::Netns,
};

/// Which CPUs the kernel considers possible: one stat row each.
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// Reads every namespace; with a non-zero `interval`, reads all of them,
/// sleeps once, and reads them again.
///
/// With `keep_going` (several namespaces), a namespace that cannot be read
/// becomes an error entry instead of ending the command, and one whose
/// path vanished in between (its last process exited) is left out.
pub fn observe(namespaces: &[Netns], interval: Duration, keep_going: bool) -> Result<Vec<Observation>, CtguardError> {
    let mut earlier: Vec<Option<Result<ConntrackView, CtguardError>>> = namespaces.iter().map(|_| None).collect();
    if !interval.is_zero() {
        earlier = namespaces.iter().map(|ns| Some(conntrack::read_netns(ns))).collect();
        std::thread::sleep(interval);
    }
    let mut observations = Vec::with_capacity(namespaces.len());
    for (ns, earlier) in namespaces.iter().zip(earlier) {
        let both = earlier.transpose().and_then(|earlier| Ok((earlier, read_latest(ns)?)));
        match both {
            Ok((earlier, latest)) => observations.push(Observation {
                netns: ns.clone(),
                earlier: earlier.and_then(into_stats),
                latest: Ok(latest),
            }),
            Err(e) if !keep_going => return Err(e),
            Err(_) if !ns.path.exists() => log::debug!("{} vanished while being read", ns.label()),
            Err(e) => observations.push(Observation { netns: ns.clone(), earlier: None, latest: Err(e.to_string()) }),
        }
    }
    Ok(observations)
}

/// The possible CPUs, to name the stat rows; `None` if unreadable.
pub fn possible_cpus() -> Option<Vec<u32>> {
    conntrack::stats::parse_cpu_list(&std::fs::read_to_string(POSSIBLE_CPUS).ok()?)
}

/// The table and, when active, its timeouts, read in one visit.
fn read_latest(ns: &Netns) -> Result<LatestReading, CtguardError> {
    conntrack::run_in(ns, || {
        let view = conntrack::read_current_netns()?;
        let timeouts = match view {
            ConntrackView::Active(_) => sysctl::read_timeouts(sysctl::NETFILTER_SYSCTL_DIR.as_ref())?,
            ConntrackView::NotActive { .. } => Default::default(),
        };
        Ok(LatestReading { view, timeouts })
    })?
}

fn into_stats(view: ConntrackView) -> Option<StatTable> {
    match view {
        ConntrackView::Active(table) => Some(table.stats),
        ConntrackView::NotActive { .. } => None,
    }
}
