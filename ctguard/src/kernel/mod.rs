//! What ctguard learns about the running kernel: BTF layouts, symbols, version,
//! lockdown, mounted pseudo filesystems and the caller's capabilities.
pub mod bpf_sys;
pub mod btf;
pub mod kallsyms;
pub mod system;
