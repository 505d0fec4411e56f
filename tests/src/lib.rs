//! Fixture for ctguard's privileged integration tests.
//!
//! Everything here needs root: tests create network namespaces, load nft
//! rules and change the global `nf_conntrack_max`. They fail (never skip)
//! without root. Run them serially:
//!
//! ```text
//! cargo test -p ctguard-integration -- --test-threads=1
//! ```
//!
//! (a file lock, [`lock::LOCK_PATH`], serializes them anyway.)
//!
//! * [`Lab`] — two namespaces `a` (sender) and `b` (receiver) joined by a
//!   veth; conntrack in `b` ([`Lab::enable_conntrack`]), its counters
//!   ([`Lab::kernel_stats`], [`Lab::conntrack_count`],
//!   [`Lab::nft_new_counter`]), new flows from `a` ([`Lab::send_udp_flows`],
//!   [`Lab::send_tcp_syns`], built on `ctguard::flood`).
//! * [`MaxGuard`] — lowers the global nf_conntrack_max and always restores it.
//! * [`require_root`] — the check every privileged test starts with.
//!
//! ```no_run
//! use ctguard_integration::{Lab, MaxGuard};
//!
//! let lab = Lab::new("example");
//! lab.enable_conntrack();
//! let before = lab.kernel_stats();
//! {
//!     let _max = MaxGuard::lower(64);
//!     lab.send_udp_flows(400, &[53, 80, 443]);
//! } // restored here
//! assert!(lab.kernel_stats()["drop"] > before["drop"]);
//! ```
pub mod bin;
pub mod cmd;
pub mod lab;
pub mod lock;
pub mod max;
pub mod nft;
pub mod root;
pub mod stats;
pub mod tmux;

pub use ctguard::flood::{FloodReport, Proto};
pub use lab::{Lab, Side};
pub use lock::SerialGuard;
pub use max::MaxGuard;
pub use root::require_root;

/// In the VM tier, `CTGUARD_EXPECT_BACKEND` names the backend the kernel
/// must give (`function_hooks` on stock distro kernels); tests that start
/// sensors check it, so a silent fallback to tracepoints fails the run.
pub fn expect_backend(actual: ctguard::sensors::backend::Backend) {
    if let Ok(expected) = std::env::var("CTGUARD_EXPECT_BACKEND") {
        let actual = serde_json::to_value(actual).expect("backend serializes");
        assert_eq!(actual.as_str(), Some(expected.as_str()), "sensor backend (CTGUARD_EXPECT_BACKEND)");
    }
}
