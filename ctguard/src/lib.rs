//! ctguard: find, explain and fix nf_conntrack table-full drops.
//!
//! The library holds every command's logic so integration tests can drive it;
//! `main.rs` only parses the command line and maps errors to exit codes.
pub mod error;
pub mod kernel;
pub mod sensors;
pub mod util;
