//! Reading conntrack's own view of a namespace: /proc/net/stat/nf_conntrack,
//! the nf_conntrack sysctls and the slab object size.
//!
//! Everything per namespace is read from a thread inside that namespace
//! ([`read_netns`]); parsing and arithmetic are pure functions.
pub mod memory;
pub mod stats;
pub mod sysctl;
mod view;

pub use self::{
    memory::{MemoryEstimate, ObjectSize, ObjectSizeSource},
    stats::{Counters, ParseError, StatTable},
    sysctl::Timeouts,
    view::{
        ActiveTable, ConntrackView, Sources, fill_percent, read_current_counters, read_current_netns, read_from,
        read_netns, run_in,
    },
};
