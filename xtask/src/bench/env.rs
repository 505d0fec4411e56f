//! The benchmark's own test bed and the machine-wide settings it touches,
//! each behind a guard that undoes it on drop (normal exit, error, panic,
//! and Ctrl-C, which [`interrupted`] turns into an error):
//!
//! * [`Lab`]: two network namespaces `ctgbench-<pid>-c` (client, sends) and
//!   `ctgbench-<pid>-s` (server, tracks connections) joined by a veth,
//!   10.254.0.1/24 and 10.254.0.2/24. The server has nft table
//!   `inet ctgbench` whose prerouting chain counts `ct state new` packets in
//!   counter `new_flows`: the kernel's own count of new entries.
//! * [`SysctlGuard`]: sets a sysctl (nf_conntrack_max, kernel.bpf_stats_enabled)
//!   and restores it. The original value is written to a state file in /run
//!   first, so a run killed with SIGKILL is repaired by the next one
//!   ([`restore_stale`]).
//! * [`BenchLock`]: the flock the privileged tests take on
//!   `/run/ctguard-tests.lock` before they change nf_conntrack_max; the
//!   benchmark holds it for its whole run so neither disturbs the other.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::parse;
use crate::util::{self, cmd, note};

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
pub const PREFIX_LEN: u8 = 24;
/// Prefix of the namespaces' names.
pub const NETNS_PREFIX: &str = "ctgbench-";
const NETNS_DIR: &str = "/run/netns";
pub const NFT_TABLE: &str = "ctgbench";
pub const NFT_COUNTER: &str = "new_flows";
/// UDP entries live this long in the server (seconds): long enough for a
/// filled table to stay filled while it is being measured.
const UDP_TIMEOUT_S: u32 = 3600;

// ---------------------------------------------------------------- Ctrl-C

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

// xtask has no libc dependency; std links the C library anyway, so declare
// the one function needed to turn SIGINT/SIGTERM/SIGHUP into a flag.
unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
}

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT, SIGTERM and SIGHUP only set a flag that
/// [`interrupted`] reports, so the benchmark stops at its next check and its
/// guards clean up. (Children run in their own process groups: a Ctrl-C in
/// the terminal reaches only us.)
pub fn catch_interrupts() {
    for sig in [1, 2, 15] {
        // SAFETY: installs an async-signal-safe handler (one atomic store).
        unsafe { signal(sig, on_signal) };
    }
}

/// Fails once the user asked to stop.
pub fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Sleeps, but returns early with an error when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

// ---------------------------------------------------------------- lock

pub const LOCK_PATH: &str = "/run/ctguard-tests.lock";

#[must_use = "the lock is released when dropped"]
pub struct BenchLock {
    _file: fs::File,
}

impl BenchLock {
    pub fn acquire() -> Result<BenchLock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .with_context(|| format!("cannot open {LOCK_PATH}"))?;
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(BenchLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) => {
                    if !told {
                        note(format!("waiting for {LOCK_PATH}: privileged tests or another benchmark are running"));
                        told = true;
                    }
                    sleep(Duration::from_millis(200))?;
                }
                Err(fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {LOCK_PATH}")),
            }
        }
    }
}

// ---------------------------------------------------------------- sysctls

const STATE_DIR: &str = "/run";
const STATE_PREFIX: &str = "ctguard-bench-";
const STATE_SUFFIX: &str = ".sysctl";
static NEXT_GUARD: AtomicU32 = AtomicU32::new(0);

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

pub fn read_sysctl(name: &str) -> Result<String> {
    let p = sysctl_path(name);
    Ok(fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?.trim().to_string())
}

fn write_sysctl(name: &str, value: &str) -> Result<()> {
    let p = sysctl_path(name);
    fs::write(&p, format!("{value}\n")).with_context(|| format!("cannot write {value} to {}", p.display()))
}

/// A sysctl set for a while; the original value comes back on drop.
#[must_use = "the sysctl is restored when the guard is dropped"]
pub struct SysctlGuard {
    name: String,
    original: String,
    state_file: PathBuf,
}

impl SysctlGuard {
    /// Sets `name` (dotted, e.g. `net.netfilter.nf_conntrack_max`) to `value`.
    pub fn set(name: &str, value: impl ToString) -> Result<SysctlGuard> {
        let value = value.to_string();
        let original = read_sysctl(name)?;
        let seq = NEXT_GUARD.fetch_add(1, Ordering::SeqCst);
        let state_file =
            Path::new(STATE_DIR).join(format!("{STATE_PREFIX}{}-{seq:04}{STATE_SUFFIX}", std::process::id()));
        fs::write(&state_file, format!("{name} {original}\n"))
            .with_context(|| format!("cannot record the original {name} in {}", state_file.display()))?;
        if let Err(e) = write_sysctl(name, &value) {
            let _ = fs::remove_file(&state_file);
            return Err(e);
        }
        Ok(SysctlGuard { name: name.to_string(), original, state_file })
    }

    /// Sets `name` to `value` only if it is below; `None` when nothing changed.
    pub fn at_least(name: &str, value: u64) -> Result<Option<SysctlGuard>> {
        let cur: u64 = read_sysctl(name)?.parse().with_context(|| format!("{name} is not a number"))?;
        if cur >= value { Ok(None) } else { SysctlGuard::set(name, value).map(Some) }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        match write_sysctl(&self.name, &self.original) {
            Ok(()) => {
                let _ = fs::remove_file(&self.state_file);
            }
            Err(e) => eprintln!(
                "xtask bench: CANNOT RESTORE {} to {}: {e:#}; run `sysctl -w {}={}` (the next `cargo xtask bench` also retries from {})",
                self.name,
                self.original,
                self.name,
                self.original,
                self.state_file.display()
            ),
        }
    }
}

/// (name, original value) from a state file's text.
pub fn parse_state_file(text: &str) -> Option<(String, String)> {
    let mut it = text.split_whitespace();
    let (name, value) = (it.next()?, it.next()?);
    (it.next().is_none() && !name.is_empty()).then(|| (name.to_string(), value.to_string()))
}

/// (pid, sequence number) from a state file's name.
pub fn parse_state_file_name(name: &str) -> Option<(u32, u32)> {
    let (pid, seq) = name.strip_prefix(STATE_PREFIX)?.strip_suffix(STATE_SUFFIX)?.split_once('-')?;
    Some((pid.parse().ok()?, seq.parse().ok()?))
}

/// Restores the sysctls of benchmark runs that were killed (their state
/// files are still there and their process is gone), newest guard first so
/// the oldest original wins. Call with the [`BenchLock`] held.
pub fn restore_stale() -> Result<()> {
    let mut stale: Vec<(u32, u32, PathBuf)> = fs::read_dir(STATE_DIR)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let (pid, seq) = parse_state_file_name(&e.file_name().to_string_lossy())?;
                    let alive = Path::new(&format!("/proc/{pid}")).exists();
                    (pid != std::process::id() && !alive).then(|| (pid, seq, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    stale.sort();
    for (_, _, path) in stale.into_iter().rev() {
        let text = fs::read_to_string(&path).unwrap_or_default();
        if let Some((name, value)) = parse_state_file(&text) {
            write_sysctl(&name, &value)?;
            note(format!("restored {name}={value} left by a killed benchmark ({})", path.display()));
        }
        let _ = fs::remove_file(&path);
    }
    Ok(())
}

// ---------------------------------------------------------------- namespaces

/// The owner pid of a benchmark namespace name (`ctgbench-<pid>-c|s`).
pub fn netns_owner(name: &str) -> Option<u32> {
    let (pid, side) = name.strip_prefix(NETNS_PREFIX)?.rsplit_once('-')?;
    if side != "c" && side != "s" {
        return None;
    }
    pid.parse().ok()
}

/// Deletes benchmark namespaces whose process is gone.
pub fn cleanup_stale_namespaces() {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = netns_owner(&name) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if util::probe(&mut cmd("ip", ["netns", "del", &name])).is_some() {
            note(format!("deleted stale benchmark namespace {name}"));
        }
    }
}

/// The two namespaces and the veth between them; see the module docs.
pub struct Lab {
    pub client: String,
    pub server: String,
    /// Inode of the server namespace (what ctguard's `--netns` takes).
    pub server_inode: u64,
    created: Vec<String>,
}

impl Lab {
    pub fn create() -> Result<Lab> {
        let pid = std::process::id();
        let mut lab = Lab {
            client: format!("{NETNS_PREFIX}{pid}-c"),
            server: format!("{NETNS_PREFIX}{pid}-s"),
            server_inode: 0,
            created: Vec::new(),
        };
        // From here on an error drops `lab`, which deletes what exists.
        lab.setup()?;
        Ok(lab)
    }

    fn setup(&mut self) -> Result<()> {
        let (c, s) = (self.client.clone(), self.server.clone());
        for ns in [&c, &s] {
            util::output(&mut cmd("ip", ["netns", "add", ns.as_str()]))?;
            self.created.push(ns.clone());
            if Path::new("/proc/sys/net/ipv6").exists() {
                // No neighbour discovery or MLD noise in the server's conntrack.
                self.exec(
                    ns,
                    &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                )?;
            }
            util::output(&mut cmd("ip", ["-n", ns, "link", "set", "lo", "up"]))?;
        }
        let (mac_c, mac_s) = ("02:c7:be:00:00:0c", "02:c7:be:00:00:0d");
        util::output(&mut cmd(
            "ip",
            [
                "-n", &c, "link", "add", "veth-c", "address", mac_c, "type", "veth", "peer", "name", "veth-s",
                "address", mac_s, "netns", &s,
            ],
        ))?;
        for (ns, dev, addr, peer, peer_mac) in
            [(&c, "veth-c", CLIENT_ADDR, SERVER_ADDR, mac_s), (&s, "veth-s", SERVER_ADDR, CLIENT_ADDR, mac_c)]
        {
            util::output(&mut cmd("ip", ["-n", ns, "addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", dev]))?;
            util::output(&mut cmd("ip", ["-n", ns, "link", "set", dev, "up"]))?;
            util::output(&mut cmd(
                "ip",
                ["-n", ns, "neigh", "replace", &peer.to_string(), "lladdr", peer_mac, "dev", dev, "nud", "permanent"],
            ))?;
        }
        let ruleset = format!(
            "table inet {NFT_TABLE} {{\n  counter {NFT_COUNTER} {{ }}\n  chain prerouting {{\n    \
             type filter hook prerouting priority filter; policy accept;\n    \
             ct state new counter name \"{NFT_COUNTER}\"\n  }}\n}}\n"
        );
        let script = std::env::temp_dir().join(format!("ctgbench-{}.nft", std::process::id()));
        fs::write(&script, ruleset)?;
        let loaded = self.exec(&s, &["nft", "-f", &script.to_string_lossy()]);
        let _ = fs::remove_file(&script);
        loaded?;
        self.exec(&s, &["sysctl", "-qw", &format!("net.netfilter.nf_conntrack_udp_timeout={UDP_TIMEOUT_S}")])?;
        use std::os::unix::fs::MetadataExt as _;
        self.server_inode = fs::metadata(Path::new(NETNS_DIR).join(&s))?.ino();
        self.wait_links_up()
    }

    fn wait_links_up(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        for (ns, dev) in [(&self.client, "veth-c"), (&self.server, "veth-s")] {
            while !util::output(&mut cmd("ip", ["-n", ns.as_str(), "-o", "link", "show", dev]))?.contains("state UP") {
                if Instant::now() > deadline {
                    bail!("{dev} in {ns} did not come up");
                }
                sleep(Duration::from_millis(20))?;
            }
        }
        Ok(())
    }

    /// Runs `args` in namespace `ns` and returns its stdout.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(args);
        util::output(&mut cmd("ip", full))
    }

    /// The kernel's count of new entries in the server: the nft counter.
    pub fn kernel_new(&self) -> Result<u64> {
        let json = self.exec(&self.server, &["nft", "-j", "list", "counter", "inet", NFT_TABLE, NFT_COUNTER])?;
        parse::nft_counter_packets(&json, NFT_COUNTER)
    }

    /// The server's `/proc/net/stat/nf_conntrack`, summed over CPUs.
    pub fn kernel_stats(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        parse::conntrack_stat(&self.exec(&self.server, &["cat", "/proc/net/stat/nf_conntrack"])?)
    }

    /// Entries in the server's table.
    pub fn entries(&self) -> Result<u64> {
        let t = self.exec(&self.server, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])?;
        t.trim().parse().with_context(|| format!("nf_conntrack_count is `{}`", t.trim()))
    }

    /// Empties the server's table (`conntrack -F`) and waits until it is empty.
    pub fn flush(&self) -> Result<()> {
        self.exec(&self.server, &["conntrack", "-F"])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.entries()?;
            if n == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} still holds {n} conntrack entries 10 s after `conntrack -F`", self.server);
            }
            self.exec(&self.server, &["conntrack", "-F"])?;
            sleep(Duration::from_millis(50))?;
        }
    }

    /// Waits until the server's new-entry counter and entry count stop
    /// changing (the receiver may process the last packets in ksoftirqd).
    pub fn settle(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let read = || -> Result<(u64, u64)> { Ok((self.kernel_new()?, self.entries()?)) };
        let mut last = read()?;
        while Instant::now() < deadline {
            sleep(Duration::from_millis(40))?;
            let now = read()?;
            if now == last {
                return Ok(());
            }
            last = now;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = util::output(&mut cmd("ip", ["netns", "del", ns.as_str()])) {
                eprintln!("xtask bench: cannot delete namespace {ns}: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_carry_the_owner() {
        assert_eq!(netns_owner("ctgbench-1234-c"), Some(1234));
        assert_eq!(netns_owner("ctgbench-1234-s"), Some(1234));
        assert_eq!(netns_owner("ctgbench-1234-x"), None);
        assert_eq!(netns_owner("ctgbench-manual-s"), None);
        assert_eq!(netns_owner("ctg-table-full-1234-0-a"), None);
    }

    #[test]
    fn state_files_name_the_sysctl_and_its_original() {
        assert_eq!(
            parse_state_file("net.netfilter.nf_conntrack_max 262144\n"),
            Some(("net.netfilter.nf_conntrack_max".into(), "262144".into()))
        );
        assert_eq!(parse_state_file(""), None);
        assert_eq!(parse_state_file("a b c"), None);
        assert_eq!(parse_state_file_name("ctguard-bench-42-0003.sysctl"), Some((42, 3)));
        assert_eq!(parse_state_file_name("ctguard-bench-42.sysctl"), None);
        assert_eq!(parse_state_file_name("ctguard-tests.lock"), None);
    }

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net.netfilter.nf_conntrack_max"),
            Path::new("/proc/sys/net/netfilter/nf_conntrack_max")
        );
        assert_eq!(sysctl_path("kernel.bpf_stats_enabled"), Path::new("/proc/sys/kernel/bpf_stats_enabled"));
    }
}
