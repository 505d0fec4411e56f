//! `cargo xtask setup`: makes a fresh Debian machine able to build and test
//! ctguard. Every step checks first and only acts when something is missing,
//! so a second run takes well under two seconds.
//!
//! 1. Debian packages (the tools the tests and the lab drive: nft, conntrack, ip, qemu, ...).
//! 2. The `nightly` toolchain with its `rust-src` component (the eBPF crate is
//!    built with `-Z build-std=core` for the bpf target).
//! 3. bpf-linker, built from crates.io against the nightly toolchain's own
//!    libLLVM (no distribution ships an LLVM of the version nightly uses).
//! 4. A report of every tool's version.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cmd, note, step};

/// Debian packages the build, the tests and the demo use.
pub const PACKAGES: &[&str] = &[
    "nftables",
    "conntrack",
    "iproute2",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "file",
    "xz-utils",
    "zstd",
    // The TUI test drives `ctguard top` in tmux; the benchmarks compare
    // against a bpftrace one-liner.
    "tmux",
    "bpftrace",
    // iptables-legacy: a rule that drops new flows outside nftables, which
    // the trace test must tell apart from conntrack's own refusals.
    "iptables",
];

/// The toolchain that builds the eBPF crate (aya-build's `Toolchain::default()`).
pub const NIGHTLY: &str = "nightly";

/// How long `rustup component add` may take before we give up.
const RUSTUP_TIMEOUT: Duration = Duration::from_secs(300);

/// What setup learnt about the nightly toolchain.
pub struct Nightly {
    pub sysroot: PathBuf,
    /// `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`
    pub version: String,
    /// `22.1.4`
    pub llvm_version: String,
}

pub fn run() -> Result<()> {
    let start = Instant::now();
    step("setup 1/4: Debian packages");
    debian_packages().context("setup step 1/4 (Debian packages) failed")?;
    step(format!("setup 2/4: `{NIGHTLY}` toolchain and its rust-src component"));
    let nightly = nightly_toolchain().context("setup step 2/4 (nightly toolchain) failed")?;
    step("setup 3/4: bpf-linker");
    let linker = bpf_linker(&nightly).context("setup step 3/4 (bpf-linker) failed")?;
    step("setup 4/4: versions");
    report_versions(&nightly, &linker);
    step(format!("setup: done in {:.1} s", start.elapsed().as_secs_f64()));
    Ok(())
}

// ---------------------------------------------------------------- packages

fn debian_packages() -> Result<()> {
    if std::env::var_os("CTGUARD_SKIP_APT").is_some_and(|v| !v.is_empty() && v != "0") {
        note("CTGUARD_SKIP_APT is set: not checking Debian packages");
        note(format!("(the tests expect the tools of: {})", PACKAGES.join(" ")));
        return Ok(());
    }
    if util::which("dpkg-query").is_none() {
        bail!(
            "dpkg-query not found: setup installs system packages with apt (Debian/Ubuntu). \
             On another distribution install the equivalents of [{}] yourself and set \
             CTGUARD_SKIP_APT=1",
            PACKAGES.join(" ")
        );
    }
    let missing = missing_packages(PACKAGES)?;
    if missing.is_empty() {
        note(format!("all {} present: {}", PACKAGES.len(), PACKAGES.join(" ")));
        return Ok(());
    }
    note(format!("missing: {}", missing.join(" ")));
    if !util::is_root() {
        bail!(
            "Debian packages missing: {m}. Installing them needs root: run `cargo xtask setup` \
             as root, or install them yourself with `sudo apt-get install {m}`",
            m = missing.join(" ")
        );
    }
    util::run(cmd("apt-get", ["update"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    util::run(cmd("apt-get", ["install", "-y"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still = missing_packages(PACKAGES)?;
    if !still.is_empty() {
        bail!("apt-get finished but these packages are still not installed: {}", still.join(" "));
    }
    note("installed");
    Ok(())
}

/// The packages of `wanted` that dpkg does not report as "install ok installed".
fn missing_packages<'a>(wanted: &[&'a str]) -> Result<Vec<&'a str>> {
    // One call for all of them; dpkg-query exits 1 when it knows nothing of
    // some package but still prints the others, so its status is not an error.
    let out = cmd("dpkg-query", ["-W", "-f=${Package} ${Status}\\n"])
        .args(wanted)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .context("could not run dpkg-query")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed = installed_packages(&stdout);
    Ok(wanted.iter().copied().filter(|p| !installed.contains(p)).collect())
}

/// Names from `dpkg-query -W -f='${Package} ${Status}\n'` output whose status is installed.
fn installed_packages(dpkg_output: &str) -> Vec<&str> {
    dpkg_output
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect()
}

// ----------------------------------------------------------------- nightly

fn nightly_toolchain() -> Result<Nightly> {
    let plus = format!("+{NIGHTLY}");
    let vv = util::output(&mut cmd("rustc", [plus.as_str(), "-vV"])).with_context(|| {
        format!(
            "the `{NIGHTLY}` toolchain is not usable (ctguard's eBPF programs are built with it). \
             Install it with `rustup toolchain install {NIGHTLY}`"
        )
    })?;
    let version = util::first_line(&vv).to_owned();
    let llvm_version =
        llvm_version(&vv).with_context(|| format!("no `LLVM version:` line in `rustc {plus} -vV`:\n{vv}"))?.to_owned();
    let sysroot = PathBuf::from(util::output(&mut cmd("rustc", [plus.as_str(), "--print", "sysroot"]))?.trim());
    note(format!("{version} (LLVM {llvm_version}) at {}", sysroot.display()));

    let core = rust_src_core(&sysroot);
    if core.is_dir() {
        note("rust-src present");
    } else {
        note(format!("rust-src missing ({} does not exist): adding it", core.display()));
        let added = util::run_with_timeout(
            &mut cmd("rustup", ["component", "add", "rust-src", "--toolchain", NIGHTLY]),
            RUSTUP_TIMEOUT,
        );
        if !core.is_dir() {
            // Machines without access to the Rust distribution server (or
            // where rustup's bookkeeping disagrees with the disk) can point
            // CTGUARD_RUST_SRC_TARBALL at a rust-src tarball for this
            // nightly, laid out as `src/rust/library/...`.
            let why = match &added {
                Err(e) => format!("rustup failed: {e:#}"),
                Ok(()) => format!("rustup reported success but {} does not exist", core.display()),
            };
            let Some(tarball) = std::env::var_os(RUST_SRC_TARBALL_ENV) else {
                bail!(
                    "could not add rust-src to the nightly toolchain ({why}); retry, or set {RUST_SRC_TARBALL_ENV} to a local rust-src tarball"
                );
            };
            let tarball = PathBuf::from(tarball);
            note(format!("{why}; unpacking {} into the sysroot instead", tarball.display()));
            util::run(&mut cmd(
                "tar",
                [
                    std::ffi::OsStr::new("-xJf"),
                    tarball.as_os_str(),
                    std::ffi::OsStr::new("-C"),
                    sysroot.join("lib/rustlib").as_os_str(),
                ],
            ))
            .with_context(|| format!("unpacking {} failed", tarball.display()))?;
            if !core.is_dir() {
                bail!(
                    "{} does not hold rust-src for this toolchain: {} still missing",
                    tarball.display(),
                    core.display()
                );
            }
        }
        note("rust-src added");
    }
    Ok(Nightly { sysroot, version, llvm_version })
}

/// Names a local rust-src tarball to unpack when rustup cannot download it.
const RUST_SRC_TARBALL_ENV: &str = "CTGUARD_RUST_SRC_TARBALL";

fn rust_src_core(sysroot: &Path) -> PathBuf {
    sysroot.join("lib/rustlib/src/rust/library/core")
}

/// `22.1.4` from the `LLVM version: 22.1.4` line of `rustc -vV`.
fn llvm_version(rustc_vv: &str) -> Option<&str> {
    rustc_vv.lines().find_map(|l| l.trim().strip_prefix("LLVM version:")).map(str::trim).filter(|v| !v.is_empty())
}

/// `22` from `22.1.4`.
fn llvm_major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

// -------------------------------------------------------------- bpf-linker

/// Finds a working bpf-linker or builds one; returns its path and version.
fn bpf_linker(nightly: &Nightly) -> Result<(PathBuf, String)> {
    let custom_root = std::env::var_os("CTGUARD_BPF_LINKER_ROOT").filter(|r| !r.is_empty());
    let root = util::bpf_linker_root()
        .context("cannot tell where to install bpf-linker: neither CARGO_HOME nor HOME is set")?;
    let mut candidates = Vec::new();
    if custom_root.is_some() {
        note(format!("CTGUARD_BPF_LINKER_ROOT={}: looking only there", root.display()));
    } else {
        candidates.extend(util::which("bpf-linker"));
    }
    candidates.push(root.join("bin/bpf-linker"));
    candidates.dedup();

    for path in &candidates {
        if !util::is_executable(path) {
            continue;
        }
        match util::probe(cmd(path, ["--version"]).env_remove("LD_LIBRARY_PATH")) {
            Some(v) => {
                let v = util::first_line(&v).to_owned();
                note(format!("present: {} ({v})", path.display()));
                return Ok((path.clone(), v));
            }
            None => note(format!(
                "{} exists but `--version` fails (was its LLVM removed by a toolchain update?): \
                 building it again",
                path.display()
            )),
        }
    }
    install_bpf_linker(nightly, &root)
}

fn install_bpf_linker(nightly: &Nightly, root: &Path) -> Result<(PathBuf, String)> {
    let major = llvm_major(&nightly.llvm_version)
        .with_context(|| format!("cannot read the LLVM major version from {}", nightly.llvm_version))?;
    let libdir = nightly.sysroot.join("lib");
    let names = std::fs::read_dir(&libdir)
        .with_context(|| format!("cannot list {}", libdir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok());
    let libllvm = pick_libllvm(names).with_context(|| {
        format!(
            "no libLLVM.so.* in {}: this nightly toolchain ships no shared LLVM to build \
             bpf-linker against",
            libdir.display()
        )
    })?;
    let libllvm_path = libdir.join(&libllvm);

    // bpf-linker's build links against $LLVM_PREFIX/lib/libLLVM.so and records
    // that directory as its rpath, so it must live as long as the toolchain:
    // put it inside the toolchain itself.
    let prefix = libdir.join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        symlink_atomically(&libllvm_path, &prefix_lib.join(name))?;
    }
    note(format!(
        "building bpf-linker (feature llvm-{major}) against {} -- this takes a few minutes",
        libllvm_path.display()
    ));
    let mut install: Command = cmd(util::cargo(), ["install", "bpf-linker", "--locked", "--no-default-features"]);
    install
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(root)
        .env("LLVM_PREFIX", &prefix)
        // `cargo run` put the stable toolchain's lib dir here; keep it out of the build.
        .env_remove("LD_LIBRARY_PATH");
    util::run(&mut install).context("building bpf-linker failed")?;

    let path = root.join("bin/bpf-linker");
    let v = util::output(cmd(&path, ["--version"]).env_remove("LD_LIBRARY_PATH"))
        .context("bpf-linker was installed but does not run")?;
    let v = util::first_line(&v).to_owned();
    note(format!("installed: {} ({v})", path.display()));
    if util::which("bpf-linker").as_deref() != Some(path.as_path()) {
        note(format!(
            "note: {} is not first in your PATH; add it so cargo finds bpf-linker outside xtask",
            root.join("bin").display()
        ));
    }
    Ok((path, v))
}

/// Makes `link` a symlink to `target`. Leaves a correct link alone and
/// replaces a wrong one by rename, so a bpf-linker already loading its LLVM
/// through it never sees it missing.
fn symlink_atomically(target: &Path, link: &Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(".xtask-tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("cannot create the symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, link).with_context(|| format!("cannot move the symlink into place at {}", link.display()))
}

/// The versioned shared LLVM among a toolchain's lib/ file names
/// (`libLLVM.so.22.1-rust-1.97.0-nightly`), the first in sorted order.
fn pick_libllvm(names: impl IntoIterator<Item = String>) -> Option<String> {
    let mut found: Vec<String> = names.into_iter().filter(|n| n.starts_with("libLLVM.so.")).collect();
    found.sort();
    found.into_iter().next()
}

// ---------------------------------------------------------------- versions

fn report_versions(nightly: &Nightly, (linker, linker_version): &(PathBuf, String)) {
    let cargo = util::cargo();
    let version_of =
        |c: &mut Command| util::probe(c).map(|s| util::first_line(&s).to_owned()).unwrap_or_else(|| "NOT FOUND".into());
    let rows: Vec<(&str, String)> = vec![
        ("rustc", version_of(&mut cmd("rustc", ["--version"]))),
        ("cargo", version_of(&mut cmd(&cargo, ["--version"]))),
        ("rustc +nightly", format!("{} (LLVM {})", nightly.version, nightly.llvm_version)),
        ("bpf-linker", format!("{linker_version} ({})", linker.display())),
        ("nft", version_of(&mut cmd("nft", ["--version"]))),
        ("conntrack", version_of(&mut cmd("conntrack", ["--version"]))),
        ("ip", version_of(&mut cmd("ip", ["-V"]))),
        ("qemu", version_of(&mut cmd("qemu-system-x86_64", ["--version"]))),
        (
            "kernel",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
        ),
        (
            "kernel BTF",
            if Path::new("/sys/kernel/btf/vmlinux").exists() {
                "/sys/kernel/btf/vmlinux present".into()
            } else {
                "MISSING (/sys/kernel/btf/vmlinux): ctguard cannot load its programs here".into()
            },
        ),
    ];
    for (name, v) in rows {
        note(format!("{name:<15} {v}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_output_is_parsed() {
        let out = "nftables install ok installed\n\
                   tmux deinstall ok config-files\n\
                   zstd install ok installed\n\
                   kmod:amd64 install ok installed\n";
        assert_eq!(installed_packages(out), ["nftables", "zstd", "kmod"]);
        assert!(installed_packages("").is_empty());
    }

    #[test]
    fn dpkg_query_reports_unknown_packages_as_missing() {
        if util::which("dpkg-query").is_none() {
            eprintln!("no dpkg-query on this host (not Debian): nothing to check");
            return;
        }
        let missing = missing_packages(&["coreutils", "ctguard-no-such-package"]).unwrap();
        assert_eq!(missing, ["ctguard-no-such-package"]);
    }

    #[test]
    fn llvm_version_and_major_come_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_version(vv), Some("22.1.4"));
        assert_eq!(llvm_major("22.1.4"), Some(22));
        assert_eq!(llvm_version("rustc 1.0\n"), None);
        assert_eq!(llvm_major("x.1"), None);
    }

    #[test]
    fn the_versioned_libllvm_is_picked() {
        let names = [
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "rustlib",
        ]
        .map(String::from);
        assert_eq!(pick_libllvm(names).as_deref(), Some("libLLVM.so.22.1-rust-1.97.0-nightly"));
        assert_eq!(pick_libllvm(["libLLVM-22.so".to_string()]), None);
    }

    #[test]
    fn symlinks_are_created_kept_and_replaced() {
        let dir = std::env::temp_dir().join(format!("xtask-symlink-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("libLLVM.so");
        symlink_atomically(Path::new("/a"), &link).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/a"));
        symlink_atomically(Path::new("/a"), &link).unwrap();
        symlink_atomically(Path::new("/b"), &link).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rust_src_is_looked_for_in_the_sysroot() {
        assert_eq!(rust_src_core(Path::new("/t")), Path::new("/t/lib/rustlib/src/rust/library/core"));
    }
}
