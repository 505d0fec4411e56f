//! Stock Debian kernels for `vm-test`: find the current package through apt,
//! download it once, unpack it once (with `depmod`), and reuse it afterwards.
//!
//! Cache layout (default `~/.cache/ctguard/vm/`, or `$CTGUARD_VM_CACHE`):
//!
//! ```text
//! linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb      the downloaded package
//! linux-image-6.1.0-56-amd64_6.1.192-2/              `dpkg -x` of it, plus modules.dep
//!     .done                                           written last: the tree is complete
//!     boot/vmlinuz-6.1.0-56-amd64
//!     lib/modules/6.1.0-56-amd64/
//!     vmlinux.pvh                                     the ELF kernel cut out of the bzImage
//! ```
use std::{
    cmp::Ordering,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cmd, note};

/// How long one `apt-get download` / `apt-get update` may take.
const APT_TIMEOUT: Duration = Duration::from_secs(900);

/// One kernel the suite runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    /// `debian-6.1`: the name on the command line, in the summary and in
    /// `CTGUARD_VM_KERNEL` inside the guest.
    pub label: &'static str,
    /// The `apt-cache search --names-only` pattern of its image packages.
    pub apt_pattern: &'static str,
    /// Which apt source carries it (for the error when apt knows none).
    pub sources: &'static str,
}

pub const DEBIAN_6_1: KernelSpec = KernelSpec {
    label: "debian-6.1",
    apt_pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    sources: "Debian bookworm (`deb http://deb.debian.org/debian bookworm main`; \
              `bookworm-security` carries the newest ABI)",
};

pub const DEBIAN_6_12: KernelSpec = KernelSpec {
    label: "debian-6.12",
    apt_pattern: r"^linux-image-6\.12\.[0-9.]+\+deb12-amd64$",
    sources: "Debian bookworm's security or backports archive \
              (`deb http://deb.debian.org/debian-security bookworm-security main` or \
              `deb http://deb.debian.org/debian bookworm-backports main`)",
};

/// A package apt can download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub package: String,
    pub version: String,
}

/// An unpacked kernel, ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub label: &'static str,
    /// `6.1.0-56-amd64` (`uname -r` in the guest).
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// What qemu boots: the uncompressed ELF vmlinux when the kernel supports
    /// PVH boot (no decompression under TCG), else the bzImage.
    pub boot_image: PathBuf,
    /// The directory holding `<release>/modules.dep` (the guest's /lib/modules).
    pub modules_dir: PathBuf,
    /// The root `modprobe -d` and `depmod -b` take.
    pub root: PathBuf,
}

/// Where kernels are cached.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CTGUARD_VM_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither HOME nor XDG_CACHE_HOME is set: set CTGUARD_VM_CACHE=DIR")?;
    Ok(base.join("ctguard/vm"))
}

// ------------------------------------------------------------ apt lookup

/// Finds the newest downloadable package of `spec`. Runs `apt-get update`
/// (once per xtask run, tracked by `updated`) only when apt knows no package.
pub fn resolve(spec: &KernelSpec, updated: &mut bool) -> Result<Resolved> {
    let mut names = search(spec)?;
    if names.is_empty() && !*updated {
        note(format!("apt knows no package matching `{}`: refreshing the package lists", spec.apt_pattern));
        apt_get_update().with_context(|| {
            format!(
                "no package matches `apt-cache search --names-only '{}'` and the package lists \
                 could not be refreshed",
                spec.apt_pattern
            )
        })?;
        *updated = true;
        names = search(spec)?;
    }
    if names.is_empty() {
        bail!(
            "apt knows no {} kernel: `apt-cache search --names-only '{}'` found nothing, even \
             after `apt-get update`. Add {} to /etc/apt/sources.list (or a file in \
             /etc/apt/sources.list.d/), run `apt-get update` and try again",
            spec.label,
            spec.apt_pattern,
            spec.sources
        );
    }
    names.sort_by(|a, b| natural_cmp(b, a));
    for name in &names {
        let policy = util::output(&mut cmd("apt-cache", ["policy", name.as_str()]))?;
        if let Some(version) = parse_candidate(&policy) {
            return Ok(Resolved { package: name.clone(), version });
        }
        note(format!("{name}: apt lists it but has no installation candidate; trying an older one"));
    }
    bail!(
        "apt lists {} kernels ({}) but none has a download candidate (`apt-cache policy` says \
         `Candidate: (none)`). Check that {} is in the apt sources and run `apt-get update`",
        spec.label,
        names.join(", "),
        spec.sources
    )
}

fn search(spec: &KernelSpec) -> Result<Vec<String>> {
    let out = util::output(&mut cmd("apt-cache", ["search", "--names-only", spec.apt_pattern]))
        .context("could not ask apt for kernel packages (is this a Debian system?)")?;
    Ok(parse_search(&out))
}

fn apt_get_update() -> Result<()> {
    if !util::is_root() {
        bail!("`apt-get update` needs root: run it yourself (`sudo apt-get update`) and try again");
    }
    util::run_with_timeout(cmd("apt-get", ["update"]).env("DEBIAN_FRONTEND", "noninteractive"), APT_TIMEOUT)
}

/// Package names from `apt-cache search` output (`name - description`).
pub fn parse_search(out: &str) -> Vec<String> {
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(" - ").next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace))
        .map(String::from)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The `Candidate:` version of `apt-cache policy` output; `None` for `(none)`.
pub fn parse_candidate(policy: &str) -> Option<String> {
    let v = policy.lines().find_map(|l| l.trim().strip_prefix("Candidate:"))?.trim();
    (!v.is_empty() && v != "(none)").then(|| v.to_string())
}

/// Compares names with their digit runs as numbers: `6.1.0-9` < `6.1.0-56`,
/// `6.12.99+deb12` < `6.12.117+deb12`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let da = trim_zeros(&a[..na]);
                let db = trim_zeros(&b[..nb]);
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let zeros = d.iter().take_while(|&&c| c == b'0').count();
    &d[zeros.min(d.len().saturating_sub(1))..]
}

// ------------------------------------------------ download and unpack cache

/// Time spent getting the kernel ready.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrepareTimes {
    pub download: Option<Duration>,
    pub unpack: Option<Duration>,
}

/// Downloads (unless cached) and unpacks (unless cached) `resolved`.
pub fn prepare(spec: &KernelSpec, resolved: &Resolved, cache: &Path) -> Result<(Kernel, PrepareTimes)> {
    let mut times = PrepareTimes::default();
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create the kernel cache {}", cache.display()))?;
    let stem = format!("{}_{}", resolved.package, resolved.version.replace(':', "%3a"));

    let deb = match find_deb(cache, &stem)? {
        Some(deb) => {
            note(format!("cached: {}", deb.display()));
            deb
        }
        None => {
            let start = Instant::now();
            let deb = download(resolved, cache, &stem)?;
            times.download = Some(start.elapsed());
            deb
        }
    };

    let root = cache.join(&stem);
    if root.join(".done").exists() {
        note(format!("unpacked: {}", root.display()));
    } else {
        let start = Instant::now();
        unpack(&deb, &root)?;
        times.unpack = Some(start.elapsed());
    }

    let modules_dir = root.join("lib/modules");
    let release = single_release(&modules_dir)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} has no kernel image {}: delete {} and try again", deb.display(), vmlinuz.display(), root.display());
    }
    let boot_image = pvh_image(&root, &release, &vmlinuz).unwrap_or_else(|e| {
        note(format!("booting the bzImage (no PVH ELF image: {e:#})"));
        vmlinuz.clone()
    });
    Ok((Kernel { label: spec.label, release, vmlinuz, boot_image, modules_dir, root }, times))
}

/// `<stem>_<arch>.deb` in `cache`.
fn find_deb(cache: &Path, stem: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{stem}_");
    for entry in std::fs::read_dir(cache).with_context(|| format!("reading {}", cache.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") && entry.path().is_file() {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

fn download(resolved: &Resolved, cache: &Path, stem: &str) -> Result<PathBuf> {
    // apt-get download writes into the current directory; a private
    // directory keeps a half-downloaded file out of the cache.
    let tmp = cache.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut c = cmd("apt-get", ["download", "-q"]);
    if util::is_root() {
        // Otherwise apt warns that its `_apt` user cannot write here.
        c.args(["-o", "APT::Sandbox::User=root"]);
    }
    c.arg(format!("{}={}", resolved.package, resolved.version)).current_dir(&tmp);
    let result = util::run_with_timeout(&mut c, APT_TIMEOUT).with_context(|| {
        format!(
            "could not download {} {}: check the network and the apt sources \
             (`apt-get update` if the lists are old)",
            resolved.package, resolved.version
        )
    });
    let found = result.and_then(|()| {
        find_deb(&tmp, stem)?.with_context(|| format!("apt-get download left no {stem}_*.deb in {}", tmp.display()))
    });
    let deb = match found {
        Ok(deb) => {
            let dest = cache.join(deb.file_name().expect("a file name"));
            std::fs::rename(&deb, &dest).with_context(|| format!("moving {} to {}", deb.display(), dest.display()))?;
            Ok(dest)
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let deb = deb?;
    let size = deb.metadata().map(|m| m.len()).unwrap_or(0);
    note(format!("downloaded {} ({:.1} MiB)", deb.display(), size as f64 / (1 << 20) as f64));
    Ok(deb)
}

fn unpack(deb: &Path, root: &Path) -> Result<()> {
    let tmp = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    util::run(&mut cmd("dpkg", ["-x".as_ref(), deb.as_os_str(), tmp.as_os_str()]))
        .with_context(|| format!("could not unpack {} (delete it to download it again)", deb.display()))?;
    // Packages of merged-/usr distributions put modules under usr/lib.
    let lib_modules = tmp.join("lib/modules");
    if !lib_modules.exists() && tmp.join("usr/lib/modules").is_dir() {
        std::fs::create_dir_all(tmp.join("lib"))?;
        std::os::unix::fs::symlink("../usr/lib/modules", &lib_modules)?;
    }
    let release = single_release(&lib_modules).with_context(|| format!("{} holds no kernel modules", deb.display()))?;
    util::run(&mut cmd("depmod", ["-b".as_ref(), tmp.as_os_str(), release.as_ref()]))?;
    std::fs::write(tmp.join(".done"), format!("{}\n", deb.display()))?;
    std::fs::rename(&tmp, root).with_context(|| format!("moving {} to {}", tmp.display(), root.display()))?;
    note(format!("unpacked {release} into {}", root.display()));
    Ok(())
}

/// The one `<release>` directory under `lib/modules`.
fn single_release(modules_dir: &Path) -> Result<String> {
    let mut releases: Vec<String> = std::fs::read_dir(modules_dir)
        .with_context(|| format!("reading {}", modules_dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        0 => bail!("{} holds no kernel release directory", modules_dir.display()),
        _ => bail!("{} holds several kernel releases ({}); expected one", modules_dir.display(), releases.join(", ")),
    }
}

// ------------------------------------------------------------ PVH image

/// A kernel built with CONFIG_PVH=y boots straight from its ELF vmlinux.
/// Under TCG that skips seconds of decompression, so the ELF image is cut out
/// of the bzImage once and kept next to it.
fn pvh_image(root: &Path, release: &str, vmlinuz: &Path) -> Result<PathBuf> {
    let elf = root.join("vmlinux.pvh");
    if elf.is_file() {
        return Ok(elf);
    }
    let no_pvh = root.join(".no-pvh");
    if no_pvh.exists() {
        bail!("{} says a previous attempt failed", no_pvh.display());
    }
    let config = root.join("boot").join(format!("config-{release}"));
    let config_text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
    if !config_text.lines().any(|l| l == "CONFIG_PVH=y") {
        let _ = std::fs::write(&no_pvh, "CONFIG_PVH is not set\n");
        bail!("the kernel is built without CONFIG_PVH");
    }
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    if extract_elf(&image, &elf)? {
        note(format!("extracted the PVH-bootable ELF kernel: {}", elf.display()));
        Ok(elf)
    } else {
        let _ = std::fs::write(&no_pvh, "no xz or zstd payload decompressed to an ELF file\n");
        bail!("found no compressed ELF payload in {}", vmlinuz.display())
    }
}

/// The payload compressions tried, with their magic bytes and decompressor.
const PAYLOADS: &[(&[u8], &str, &[&str])] =
    &[(b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]), (b"\x28\xb5\x2f\xfd", "zstd", &["-qdc"])];

fn extract_elf(image: &[u8], out: &Path) -> Result<bool> {
    let tmp = out.with_extension("tmp");
    for (magic, program, args) in PAYLOADS {
        for offset in find_all(image, magic) {
            let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut child = match cmd(program, *args).stdin(Stdio::piped()).stdout(file).stderr(Stdio::null()).spawn() {
                Ok(c) => c,
                Err(_) => continue, // decompressor not installed: try the next format
            };
            let mut stdin = child.stdin.take().expect("piped stdin");
            let payload = image[offset..].to_vec();
            // The decompressor stops reading at the end of the stream: a
            // broken pipe is expected.
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let _ = child.wait();
            let _ = writer.join();
            let head = std::fs::read(&tmp).map(|d| d.get(..4).map(<[u8]>::to_vec));
            if let Ok(Some(head)) = head
                && head == b"\x7fELF"
            {
                std::fs::rename(&tmp, out)?;
                return Ok(true);
            }
        }
    }
    let _ = std::fs::remove_file(&tmp);
    Ok(false)
}

/// Every offset where `needle` starts in `haystack`.
pub fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return Vec::new();
    }
    haystack.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_output_gives_names() {
        let out = "linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                   linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                   \n\
                   linux-image-6.1.0-56-amd64 - duplicate\n";
        assert_eq!(parse_search(out), ["linux-image-6.1.0-56-amd64", "linux-image-6.1.0-9-amd64"]);
        assert!(parse_search("").is_empty());
    }

    #[test]
    fn the_newest_version_sorts_first() {
        let mut names = parse_search(
            "linux-image-6.12.99+deb12-amd64 - x\n\
             linux-image-6.12.117+deb12-amd64 - x\n\
             linux-image-6.12.100+deb12-amd64 - x\n\
             linux-image-6.12.9+deb12-amd64 - x\n",
        );
        names.sort_by(|a, b| natural_cmp(b, a));
        assert_eq!(names[0], "linux-image-6.12.117+deb12-amd64");
        assert_eq!(names[3], "linux-image-6.12.9+deb12-amd64");
        assert_eq!(natural_cmp("linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64"), Ordering::Less);
        assert_eq!(natural_cmp("6.1.0-056", "6.1.0-56"), Ordering::Equal);
        assert_eq!(natural_cmp("6.1.0", "6.1.0-1"), Ordering::Less);
        assert_eq!(natural_cmp("a10", "a9"), Ordering::Greater);
    }

    #[test]
    fn candidate_comes_from_apt_cache_policy() {
        let policy = "linux-image-6.12.117+deb12-amd64:\n  Installed: (none)\n  \
                      Candidate: 6.12.117-1~deb12u1\n  Version table:\n     6.12.117-1~deb12u1 500\n";
        assert_eq!(parse_candidate(policy).as_deref(), Some("6.12.117-1~deb12u1"));
        assert_eq!(parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"), None);
        assert_eq!(parse_candidate("N: Unable to locate package x\n"), None);
    }

    #[test]
    fn the_patterns_are_the_documented_ones() {
        assert_eq!(DEBIAN_6_1.apt_pattern, r"^linux-image-6\.1\.0-[0-9]+-amd64$");
        assert_eq!(DEBIAN_6_12.apt_pattern, r"^linux-image-6\.12\.[0-9.]+\+deb12-amd64$");
    }

    #[test]
    fn magic_bytes_are_found_everywhere() {
        assert_eq!(find_all(b"abXZabXZ", b"XZ"), [2, 6]);
        assert_eq!(find_all(b"ab", b"abc"), Vec::<usize>::new());
        assert_eq!(find_all(b"ab", b""), Vec::<usize>::new());
    }

    #[test]
    fn an_elf_payload_is_cut_out_of_a_fake_bzimage() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut payload = b"\x7fELF".to_vec();
        payload.extend(std::iter::repeat_n(7u8, 4096));
        let mut xz = std::process::Command::new("xz")
            .args(["-c", "--check=crc32"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz is installed (cargo xtask setup)");
        xz.stdin.take().unwrap().write_all(&payload).unwrap();
        let compressed = xz.wait_with_output().unwrap().stdout;
        let mut image = b"MZ setup code \xfd7zXZ\x00 not a stream ".to_vec();
        image.extend(&compressed);
        image.extend(b"trailer");
        let out = dir.join("vmlinux");
        assert!(extract_elf(&image, &out).unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), payload);
        assert!(!extract_elf(b"no payload here", &dir.join("none")).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
