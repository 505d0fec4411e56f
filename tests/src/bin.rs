//! The `ctguard` binary, for tests that drive the CLI.
//!
//! `cargo test -p ctguard-integration` builds ctguard only as a library, so
//! the binary is built here once per test process (cargo makes this a no-op
//! when it is fresh). `CTGUARD_BIN` overrides the path, e.g. inside the VM
//! where nothing is compiled.
use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::OnceLock,
};

pub fn ctguard_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CTGUARD_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "-p", "ctguard", "--bin", "ctguard", "--message-format=json"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo} to build ctguard: {e}"));
        assert!(out.status.success(), "building ctguard failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "ctguard")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no ctguard executable")
    })
    .clone()
}

/// Runs `ctguard ARGS` and returns its output (any exit status).
pub fn ctguard(args: &[&str]) -> Output {
    Command::new(ctguard_bin()).args(args).output().expect("run ctguard")
}
