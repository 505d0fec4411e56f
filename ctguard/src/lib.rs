//! ctguard: find, explain and fix nf_conntrack table-full drops.
//!
//! The library holds every command's logic so integration tests can drive it;
//! `main.rs` only parses the command line and maps errors to exit codes.
pub mod bypass;
pub mod capture;
pub mod cli;
pub mod conntrack;
pub mod doctor;
pub mod error;
pub mod flood;
pub mod kernel;
pub mod lab;
pub mod netns;
pub mod recommend;
pub mod sensors;
pub mod status;
pub mod top;
pub mod trace;
pub mod util;
