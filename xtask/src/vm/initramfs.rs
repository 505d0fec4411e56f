//! The guest's initramfs: a static busybox, the few modules needed to reach
//! the host's root over virtio-9p, `/init`, and the command to run.
//!
//! `/init` mounts the host's `/` read-only over 9p under a tmpfs overlay (so
//! the guest can write anywhere; writes vanish at power-off), shows the
//! kernel's own modules at `/lib/modules`, points `/proc/sys/kernel/modprobe`
//! at a wrapper that runs the host's `modprobe` inside that root (so
//! nf_conntrack and nf_tables autoload when nft asks), chroots and runs the
//! command with its output on ttyS1 and its exit code on ttyS2.
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cmd, note};

use super::kernel::Kernel;

/// Modules the guest needs before it can mount its root (the rest load on demand).
pub const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// 9p mount tags shared by qemu and `/init`.
pub const HOST_ROOT_TAG: &str = "hostroot";
pub const MODULES_TAG: &str = "kmods";

/// Prefix of the lines the guest scripts print (and the host looks for).
pub const MARK: &str = "ctguard-vm:";

/// What the guest runs, from the host's point of view.
#[derive(Clone, Debug)]
pub struct GuestCommand {
    pub label: String,
    pub workdir: PathBuf,
    pub ctguard: PathBuf,
    pub test_exes: Vec<PathBuf>,
    pub test_args: Vec<String>,
    /// Directories put in front of the guest's PATH (~/.cargo/bin).
    pub path_front: Vec<PathBuf>,
    /// Extra `NAME=value` variables (RUST_LOG when set on the host).
    pub env: Vec<(String, String)>,
}

/// Writes the initramfs for `kernel` running `command` to `out`.
pub fn build(kernel: &Kernel, command: &GuestCommand, out: &Path) -> Result<()> {
    let busybox = static_busybox()?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "sbin", "dev", "proc", "sys", "modules", "lower", "upper", "newroot"] {
        cpio.dir(dir, 0o755);
    }
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("bin/busybox", 0o755, std::fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?);

    let mut order = String::new();
    for ko in boot_modules(kernel)? {
        let (name, data) = read_module(&ko)?;
        cpio.file(&format!("modules/{name}"), 0o644, data);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.into_bytes());
    cpio.file("init", 0o755, INIT.as_bytes().to_vec());
    cpio.file("sbin/ctguard-modprobe", 0o755, MODPROBE_WRAPPER.as_bytes().to_vec());
    cpio.file("guest.sh", 0o644, guest_script(command).into_bytes());
    std::fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

/// busybox from PATH, if it is statically linked (it runs before any library is reachable).
fn static_busybox() -> Result<PathBuf> {
    let busybox = util::which("busybox").context(
        "busybox is not installed: the guest's /init needs a static busybox \
         (`apt-get install busybox-static`, or `cargo xtask setup`)",
    )?;
    let kind = util::output(&mut cmd("file", ["-bL".as_ref(), busybox.as_os_str()]))
        .context("could not check busybox with `file` (`apt-get install file`)")?;
    if !kind.contains("statically linked") && !kind.contains("static-pie linked") {
        bail!(
            "{} is not statically linked ({}): install busybox-static (`apt-get install \
             busybox-static`, which replaces busybox)",
            busybox.display(),
            kind.trim()
        );
    }
    Ok(busybox)
}

/// The module files of [`BOOT_MODULES`] with their dependencies, dependencies first.
fn boot_modules(kernel: &Kernel) -> Result<Vec<PathBuf>> {
    let mut c = cmd(
        "modprobe",
        [
            "-d".as_ref(),
            kernel.root.as_os_str(),
            "-S".as_ref(),
            kernel.release.as_ref(),
            "--show-depends".as_ref(),
            "-a".as_ref(),
        ],
    );
    c.args(BOOT_MODULES);
    let out = util::output(&mut c).with_context(|| {
        format!(
            "could not list the modules {} needs to mount its root (is {} complete? delete it \
             to unpack it again)",
            kernel.label,
            kernel.root.display()
        )
    })?;
    let modules = parse_show_depends(&out);
    note(format!(
        "boot modules: {}",
        modules.iter().filter_map(|m| m.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>().join(" ")
    ));
    Ok(modules)
}

/// The `insmod PATH` lines of `modprobe --show-depends`, first occurrence
/// kept (`builtin NAME` lines need nothing).
pub fn parse_show_depends(out: &str) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("insmod")
            && let Some(path) = words.next()
        {
            let path = PathBuf::from(path);
            if !seen.contains(&path) {
                seen.push(path);
            }
        }
    }
    seen
}

/// A module's file name without the compression suffix, and its content
/// decompressed (busybox insmod reads only plain `.ko` files).
fn read_module(ko: &Path) -> Result<(String, Vec<u8>)> {
    let (name, decompressor) =
        module_name(ko).with_context(|| format!("{} is not a kernel module file name", ko.display()))?;
    let data = match decompressor {
        None => std::fs::read(ko).with_context(|| format!("reading {}", ko.display()))?,
        Some(program) => {
            let out = cmd(program, ["-dc".as_ref(), ko.as_os_str()])
                .output()
                .with_context(|| format!("could not run {program} (`cargo xtask setup`)"))?;
            if !out.status.success() {
                bail!("`{program} -dc {}` failed: {}", ko.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
            out.stdout
        }
    };
    Ok((name, data))
}

/// `9p.ko.xz` -> (`9p.ko`, Some("xz")).
pub fn module_name(ko: &Path) -> Option<(String, Option<&'static str>)> {
    let name = ko.file_name().and_then(OsStr::to_str)?;
    for (suffix, program) in [(".ko.xz", "xz"), (".ko.zst", "zstd"), (".ko.gz", "gzip")] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return Some((format!("{stem}.ko"), Some(program)));
        }
    }
    name.ends_with(".ko").then(|| (name.to_string(), None))
}

/// Single-quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn sh_path(p: &Path) -> String {
    sh_quote(&p.to_string_lossy())
}

/// The script run in the chroot (by /bin/sh of the host's root): doctor
/// first, then each test executable; exits with the first failing status.
pub fn guest_script(c: &GuestCommand) -> String {
    let mut path: Vec<String> = c.path_front.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    path.extend(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(String::from));
    let mut s = String::from("# generated by xtask/src/vm/initramfs.rs\n");
    s += &format!("export PATH={}\n", sh_quote(&path.join(":")));
    s += "export HOME=/root LANG=C.UTF-8 TERM=dumb RUST_BACKTRACE=1\n";
    s += &format!("export CTGUARD_VM_KERNEL={} CTGUARD_EXPECT_BACKEND=function_hooks\n", sh_quote(&c.label));
    for (k, v) in &c.env {
        s += &format!("export {k}={}\n", sh_quote(v));
    }
    s += &format!("cd {} || exit 125\n", sh_path(&c.workdir));
    s += &format!("echo \"{MARK} guest up: kernel $(uname -r), $(cut -d' ' -f1 /proc/uptime) s after boot\"\n");
    s += &format!("echo \"{MARK} == {} doctor\"\n", c.ctguard.display());
    s += &format!("{} doctor\n", sh_path(&c.ctguard));
    s += &format!("echo \"{MARK} (ctguard doctor exited $?)\"\n");
    s += "rc=0\n";
    s += "run_test() {\n";
    s += &format!("    echo \"{MARK} == $*\"\n");
    s += "    \"$@\"\n";
    s += "    st=$?\n";
    s += &format!("    echo \"{MARK} result $st $1\"\n");
    s += "    if [ \"$st\" -ne 0 ] && [ \"$rc\" -eq 0 ]; then rc=$st; fi\n";
    s += "}\n";
    let args: String = std::iter::once("--test-threads=1".to_string())
        .chain(c.test_args.iter().map(|a| sh_quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    for exe in &c.test_exes {
        s += &format!("run_test {} {args}\n", sh_path(exe));
    }
    s += "exit $rc\n";
    s
}

/// `/init` (busybox sh). Any failure before the command runs reports 125.
const INIT: &str = r#"#!/bin/busybox sh
# /init of `cargo xtask vm-test` (generated by xtask/src/vm/initramfs.rs)
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "ctguard-vm: $*" >/dev/console; }
finish() { echo "$1" >/dev/ttyS2; sync; poweroff -f; sleep 10; }
die() { say "$*"; echo "ctguard-vm: guest setup failed: $*" >/dev/ttyS1; finish 125; }

while read -r m; do
    insmod "/modules/$m" || say "insmod $m failed (built in or already loaded?)"
done </modules/order

# The host's root, read-only, under a tmpfs overlay so that everything is writable.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower ||
    mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /lower ||
    die "cannot mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 upper /upper || die "cannot mount a tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot || {
    say "overlayfs failed: the guest's root stays read-only"
    mount --bind /lower /newroot || die "cannot bind the host's root"
}

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
# What udev/systemd would add: `nft -f -` opens /dev/stdin, bash's <(...) uses /dev/fd.
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=0755 run $R/run
# No tmpfs on /tmp: the workspace may live there (CI clones anywhere), and
# the overlay already makes it writable.
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mount -t bpf bpf $R/sys/fs/bpf || say "cannot mount bpffs"
mount -t tracefs tracefs $R/sys/kernel/tracing || say "cannot mount tracefs"
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null

# The guest kernel's modules at /lib/modules (a symlink into /usr on merged-/usr hosts).
mkdir -p $R/lib/modules
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,ro kmods $R/lib/modules ||
    die "cannot mount the kernel's modules (9p tag kmods)"
[ -e "$R/lib/modules/$(uname -r)/modules.dep" ] || die "no modules.dep for $(uname -r)"
# Module autoload (request_module) runs the host's modprobe inside the root.
echo /sbin/ctguard-modprobe >/proc/sys/kernel/modprobe

hostname ctguard-vm
ip link set lo up
cp /guest.sh $R/run/ctguard-vm.sh

stty -F /dev/ttyS1 raw -echo
say "running the command"
chroot $R /bin/sh /run/ctguard-vm.sh </dev/null >/dev/ttyS1 2>&1
finish $?
"#;

/// `/sbin/ctguard-modprobe`: the kernel's usermode helper runs in the
/// initramfs root; the real modprobe and the module tree are in /newroot.
const MODPROBE_WRAPPER: &str = r#"#!/bin/busybox sh
exec /bin/busybox chroot /newroot /sbin/modprobe "$@"
"#;

// ------------------------------------------------------------ cpio (newc)

/// A "newc" cpio archive, the format the kernel unpacks as initramfs.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    pub fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, 0o040000 | perm, 2, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, content: Vec<u8>) {
        self.entry(name, 0o100000 | perm, 1, (0, 0), &content);
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, 1, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), content: &[u8]) {
        self.ino += 1;
        let size = u32::try_from(content.len()).expect("initramfs file under 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("short name");
        let fields = [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_depends_gives_insmod_paths_once_in_order() {
        let out = "insmod /k/lib/modules/6.12/kernel/net/9p/9pnet.ko.xz \n\
                   insmod /k/lib/modules/6.12/kernel/net/9p/9pnet_virtio.ko.xz \n\
                   builtin virtio_pci\n\
                   insmod /k/lib/modules/6.12/kernel/net/9p/9pnet.ko.xz \n\
                   insmod /k/lib/modules/6.12/kernel/fs/9p/9p.ko.xz \n";
        let got = parse_show_depends(out);
        let names: Vec<_> = got.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["9pnet.ko.xz", "9pnet_virtio.ko.xz", "9p.ko.xz"]);
    }

    #[test]
    fn module_names_lose_their_compression_suffix() {
        assert_eq!(module_name(Path::new("/a/9p.ko.xz")), Some(("9p.ko".into(), Some("xz"))));
        assert_eq!(module_name(Path::new("/a/netfs.ko.zst")), Some(("netfs.ko".into(), Some("zstd"))));
        assert_eq!(module_name(Path::new("/a/overlay.ko")), Some(("overlay.ko".into(), None)));
        assert_eq!(module_name(Path::new("/a/README")), None);
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("bin", 0o755);
        c.file("init", 0o755, b"#!/bin/sh\n".to_vec());
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        // First header: ino 1, mode 040755, namesize 4 ("bin\0").
        let header = std::str::from_utf8(&data[..110]).unwrap();
        assert_eq!(&header[6..14], "00000001");
        assert_eq!(&header[14..22], "000041ed");
        assert_eq!(&header[94..102], "00000004");
        assert_eq!(&data[110..113], b"bin");
        // The file's header starts right after "bin\0" padded: 110 + 4 = 114 -> 116.
        assert_eq!(&data[116..122], b"070701");
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn the_cpio_tool_reads_our_archive() {
        let mut c = Cpio::default();
        c.dir("sbin", 0o755);
        c.file("sbin/x", 0o644, b"hello".to_vec());
        c.char_device("console", 0o600, 5, 1);
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio is installed (cargo xtask setup)");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(&c.finish()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains("drwxr-xr-x"), "{listing}");
        assert!(listing.contains("-rw-r--r--") && listing.contains("sbin/x"), "{listing}");
        assert!(listing.contains("crw-------") && listing.contains("5,"), "{listing}");
    }

    fn command() -> GuestCommand {
        GuestCommand {
            label: "debian-6.1".into(),
            workdir: "/work/main".into(),
            ctguard: "/work/main/target/debug/ctguard".into(),
            test_exes: vec!["/work/main/target/debug/deps/a-1".into(), "/work/main/target/debug/deps/b-2".into()],
            test_args: vec!["--list".into(), "it's".into()],
            path_front: vec!["/root/.cargo/bin".into()],
            env: vec![("RUST_LOG".into(), "debug".into())],
        }
    }

    #[test]
    fn guest_script_runs_doctor_then_every_executable() {
        let s = guest_script(&command());
        assert!(
            s.contains("export PATH='/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'\n"),
            "{s}"
        );
        assert!(s.contains("CTGUARD_VM_KERNEL='debian-6.1' CTGUARD_EXPECT_BACKEND=function_hooks"));
        assert!(s.contains("RUST_BACKTRACE=1"));
        assert!(s.contains("export RUST_LOG='debug'\n"));
        assert!(s.contains("cd '/work/main' || exit 125\n"));
        let doctor = s.find("'/work/main/target/debug/ctguard' doctor\n").unwrap();
        let a = s.find(r"run_test '/work/main/target/debug/deps/a-1' --test-threads=1 '--list' 'it'\''s'").unwrap();
        let b = s.find("run_test '/work/main/target/debug/deps/b-2'").unwrap();
        assert!(doctor < a && a < b);
        assert!(s.ends_with("exit $rc\n"));
    }

    #[test]
    fn guest_script_is_valid_sh() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-sh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Fake "executables": true, false (exit 1) and a doctor that prints.
        let mut c = command();
        c.workdir = dir.clone();
        c.ctguard = "/bin/echo".into();
        c.test_exes = vec!["/bin/true".into(), "/bin/false".into(), "/bin/true".into()];
        c.test_args = vec![];
        let out = std::process::Command::new("sh").arg("-c").arg(guest_script(&c)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains("ctguard-vm: guest up: kernel "), "{text}");
        assert!(text.contains("\ndoctor\n"), "{text}");
        assert!(text.contains("ctguard-vm: result 0 /bin/true"), "{text}");
        assert!(text.contains("ctguard-vm: result 1 /bin/false"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn init_reports_through_the_status_port() {
        assert!(INIT.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT.contains(HOST_ROOT_TAG) && INIT.contains(MODULES_TAG));
        assert!(INIT.contains(">/dev/ttyS2"));
        assert!(INIT.contains("/sbin/ctguard-modprobe >/proc/sys/kernel/modprobe"));
        assert!(INIT.contains("ln -sf /proc/self/fd/0 $R/dev/stdin"));
        assert!(MODPROBE_WRAPPER.contains("chroot /newroot /sbin/modprobe"));
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
