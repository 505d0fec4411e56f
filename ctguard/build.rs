//! Compiles the kernel programs (ctguard-ebpf's binary) for the bpf target with
//! the nightly toolchain and bpf-linker, and leaves the object in OUT_DIR where
//! `sensors::object_bytes()` embeds it. `cargo xtask setup` installs both.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ctguard-ebpf");
    let root_dir = metadata_dir.canonicalize().context("ctguard-ebpf crate not found next to ctguard")?;
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let package = aya_build::Package { name: "ctguard-ebpf", root_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker",
    )
}
