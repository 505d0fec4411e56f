//! Rebuild the kernel programs when bpf-linker changes: it is their linker,
//! but cargo does not track it as an input.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
