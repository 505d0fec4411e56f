//! [`Lab`]: two network namespaces joined by a veth pair, the sender (`a`)
//! and the receiver (`b`), for tests that make conntrack entries.
//!
//! ```text
//!   netns ctg-<test>-<pid>-<n>-a            netns ctg-<test>-<pid>-<n>-b
//!   veth-a 10.X.Y.1/24  <----- veth ----->  veth-b 10.X.Y.2/24
//!   (raw-socket flood)                      (nft table inet ctgtest: conntrack)
//! ```
//!
//! IPv6 is disabled in both namespaces so no neighbour discovery or MLD
//! traffic reaches the receiver's conntrack (it would show as `invalid`).
//! Neighbour entries are static on both sides, so the first packets never
//! wait for ARP. Dropping the lab (also on panic) deletes both namespaces.
use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use ctguard::{
    flood::{FloodReport, FlowSpec, Proto, SendOptions},
    netns::{NAMED_NETNS_DIR, Netns},
};

use crate::{
    cmd::{run, run_with_stdin, try_run},
    lock::SerialGuard,
    max::MaxGuard,
    nft, root, stats,
};

/// One end of a [`Lab`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The sender: floods from here.
    A,
    /// The receiver: conntrack runs here once [`Lab::enable_conntrack`] ran.
    B,
}

impl Side {
    fn idx(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
    fn letter(self) -> char {
        match self {
            Side::A => 'a',
            Side::B => 'b',
        }
    }
}

/// Prefix of every namespace a lab creates.
pub const NETNS_PREFIX: &str = "ctg-";
/// Length of the lab subnet's prefix.
pub const PREFIX_LEN: u8 = 24;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Two namespaces and a veth pair; see the module docs.
pub struct Lab {
    test_name: String,
    names: [String; 2],
    addrs: [Ipv4Addr; 2],
    conntrack_enabled: AtomicBool,
    next_flow: Mutex<u64>,
    _lock: SerialGuard,
}

impl Lab {
    /// Creates the lab for test `test_name` (used in the namespace names).
    ///
    /// Panics when not root. Takes the test lock (see [`crate::lock`]) for
    /// the lab's lifetime, restores an nf_conntrack_max a killed run left
    /// lowered, and deletes namespaces of earlier runs whose process is gone.
    pub fn new(test_name: &str) -> Lab {
        root::require_root();
        let lock = SerialGuard::acquire();
        MaxGuard::restore_stale();
        cleanup_stale_labs();

        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
        let short: String = test_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
            .take(12)
            .collect::<String>()
            .trim_matches('-')
            .to_string();
        let short = if short.is_empty() { "lab".to_string() } else { short };
        let name = |side: Side| format!("{NETNS_PREFIX}{short}-{pid}-{n}-{}", side.letter());
        // Labs are isolated from each other, so the subnet only needs to be
        // unique for readability (captures, dmesg, ctguard output).
        let (o2, o3) = (100 + (pid % 100) as u8, (n % 256) as u8);
        let lab = Lab {
            test_name: test_name.to_string(),
            names: [name(Side::A), name(Side::B)],
            addrs: [Ipv4Addr::new(10, o2, o3, 1), Ipv4Addr::new(10, o2, o3, 2)],
            conntrack_enabled: AtomicBool::new(false),
            next_flow: Mutex::new(0),
            _lock: lock,
        };
        // From here on a panic drops `lab`, which deletes what exists.
        lab.setup();
        lab
    }

    fn setup(&self) {
        let (a, b) = (self.name(Side::A), self.name(Side::B));
        run("ip", &["netns", "add", a]);
        run("ip", &["netns", "add", b]);
        for side in [Side::A, Side::B] {
            if Path::new("/proc/sys/net/ipv6").exists() {
                self.exec(
                    side,
                    &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                );
            }
            run("ip", &["-n", self.name(side), "link", "set", "lo", "up"]);
        }
        let (mac_a, mac_b) = ("02:c7:00:00:00:0a", "02:c7:00:00:00:0b");
        run(
            "ip",
            &[
                "-n", a, "link", "add", "veth-a", "address", mac_a, "type", "veth", "peer", "name", "veth-b",
                "address", mac_b, "netns", b,
            ],
        );
        for (side, peer_mac) in [(Side::A, mac_b), (Side::B, mac_a)] {
            let (ns, dev) = (self.name(side), self.ifname(side));
            let cidr = format!("{}/{PREFIX_LEN}", self.addr(side));
            let peer = self.addr(other(side)).to_string();
            run("ip", &["-n", ns, "addr", "add", &cidr, "dev", dev]);
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
            run("ip", &["-n", ns, "neigh", "replace", &peer, "lladdr", peer_mac, "dev", dev, "nud", "permanent"]);
        }
        self.wait_links_up();
    }

    fn wait_links_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for side in [Side::A, Side::B] {
            loop {
                let out = run("ip", &["-n", self.name(side), "-o", "link", "show", self.ifname(side)]);
                if out.contains("state UP") {
                    break;
                }
                if Instant::now() > deadline {
                    panic!("{}: {} did not come up: {out}", self, self.ifname(side));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The test name given to [`Lab::new`].
    pub fn test_name(&self) -> &str {
        &self.test_name
    }

    /// The `ip netns` name of a side.
    pub fn name(&self, side: Side) -> &str {
        &self.names[side.idx()]
    }

    /// The side's IPv4 address on the veth (prefix [`PREFIX_LEN`]).
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        self.addrs[side.idx()]
    }

    /// The veth interface name in that side's namespace.
    pub fn ifname(&self, side: Side) -> &'static str {
        match side {
            Side::A => "veth-a",
            Side::B => "veth-b",
        }
    }

    /// The side's namespace as ctguard sees it (for `Netns::run`, or to match
    /// the inode the kernel programs report).
    pub fn netns(&self, side: Side) -> Netns {
        let mut found = Netns::resolve(Some(self.name(side)))
            .unwrap_or_else(|e| panic!("{self}: cannot resolve {}: {e}", self.name(side)));
        found.remove(0)
    }

    /// The inode of the side's namespace (`stat -L /run/netns/NAME`), which
    /// is what the kernel prints in "table full in netns N" and what
    /// ctguard's kernel programs report.
    pub fn netns_inode(&self, side: Side) -> u32 {
        use std::os::unix::fs::MetadataExt;
        let path = Path::new(NAMED_NETNS_DIR).join(self.name(side));
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
        meta.ino() as u32
    }

    /// Runs `args` inside the side's namespace (`ip netns exec NAME args…`),
    /// panics on failure, returns stdout.
    pub fn exec(&self, side: Side, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name(side)];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `nft args…` in the side's namespace.
    pub fn nft(&self, side: Side, args: &[&str]) -> String {
        let mut full = vec!["nft"];
        full.extend_from_slice(args);
        self.exec(side, &full)
    }

    /// Feeds an nft script (`nft -f -`) to the side's namespace.
    pub fn nft_script(&self, side: Side, script: &str) {
        run_with_stdin("ip", &["netns", "exec", self.name(side), "nft", "-f", "-"], script);
    }

    /// Loads [`nft::conntrack_ruleset`] (table `inet ctgtest`, counter
    /// `new_flows`) into the receiver, so conntrack tracks its traffic. Its
    /// own TCP RSTs are `notrack`, so SYN flows keep their entries (see
    /// [`nft::conntrack_ruleset`]).
    pub fn enable_conntrack(&self) {
        self.nft_script(Side::B, &nft::conntrack_ruleset());
        self.conntrack_enabled.store(true, Ordering::SeqCst);
    }

    /// Appends `rule` (nft syntax, e.g. `udp dport 9 drop`) to the receiver's
    /// `prerouting` chain, which runs after conntrack created the entry but
    /// before it is confirmed: a drop there leaves no entry behind.
    pub fn add_nft_rule(&self, rule: &str) {
        self.add_nft_rule_to("prerouting", rule);
    }

    /// Appends `rule` to chain `prerouting`, `input` or `output` (priority
    /// raw) of the receiver's table.
    pub fn add_nft_rule_to(&self, chain: &str, rule: &str) {
        assert!(self.conntrack_enabled.load(Ordering::SeqCst), "{self}: call enable_conntrack() before adding rules");
        self.nft_script(Side::B, &format!("add rule inet {} {chain} {rule}\n", nft::TABLE));
    }

    /// Packets counted by the receiver's named counter `name`.
    pub fn nft_counter(&self, name: &str) -> u64 {
        let json = self.nft(Side::B, &["-j", "list", "counter", "inet", nft::TABLE, name]);
        nft::parse_counter_packets(&json, name).unwrap_or_else(|e| panic!("{self}: counter {name}: {e}\n{json}"))
    }

    /// Packets in conntrack state `new` the receiver saw: one per flow that
    /// got an entry (dropped-at-allocation flows never reach the chain).
    pub fn nft_new_counter(&self) -> u64 {
        self.nft_counter(nft::NEW_FLOWS_COUNTER)
    }

    /// The receiver's `/proc/net/stat/nf_conntrack`, summed over CPUs
    /// (`entries` from the first row); keys are the file's column names
    /// (`drop`, `early_drop`, `insert_failed`, `invalid`, …).
    pub fn kernel_stats(&self) -> BTreeMap<String, u64> {
        self.kernel_stats_of(Side::B)
    }

    /// Like [`kernel_stats`](Self::kernel_stats) for either side.
    pub fn kernel_stats_of(&self, side: Side) -> BTreeMap<String, u64> {
        let text = self.exec(side, &["cat", "/proc/net/stat/nf_conntrack"]);
        stats::parse_conntrack_stat(&text)
            .unwrap_or_else(|e| panic!("{self}: /proc/net/stat/nf_conntrack: {e}\n{text}"))
    }

    /// The receiver's `nf_conntrack_count` (entries in its namespace).
    pub fn conntrack_count(&self) -> u64 {
        self.conntrack_count_of(Side::B)
    }

    /// Like [`conntrack_count`](Self::conntrack_count) for either side.
    pub fn conntrack_count_of(&self, side: Side) -> u64 {
        let text = self.exec(side, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]);
        text.trim().parse().unwrap_or_else(|e| panic!("{self}: nf_conntrack_count is `{}`: {e}", text.trim()))
    }

    /// A spec for flows from a's address (and, past 55 536 flows, more
    /// addresses of the lab's /24) to b's address.
    pub fn flow_spec(&self, proto: Proto, dst_ports: &[u16]) -> FlowSpec {
        FlowSpec::new(proto, self.addr(Side::A), self.addr(Side::B), dst_ports).with_src_prefix(PREFIX_LEN)
    }

    /// Sends `n` new UDP flows from a to b, cycling through `dst_ports`.
    /// Successive sends of a lab never repeat a flow. Panics unless all `n`
    /// were sent; waits for the receiver to finish processing them.
    pub fn send_udp_flows(&self, n: u64, dst_ports: &[u16]) -> FloodReport {
        self.send_new_flows(Proto::Udp, n, dst_ports)
    }

    /// Sends `n` TCP SYNs (new flows) from a to b; see
    /// [`send_udp_flows`](Self::send_udp_flows).
    pub fn send_tcp_syns(&self, n: u64, dst_ports: &[u16]) -> FloodReport {
        self.send_new_flows(Proto::TcpSyn, n, dst_ports)
    }

    /// Sends `n` new flows of `proto` from a to b.
    pub fn send_new_flows(&self, proto: Proto, n: u64, dst_ports: &[u16]) -> FloodReport {
        let mut next = self.next_flow.lock().unwrap_or_else(PoisonError::into_inner);
        let opts = SendOptions { first_flow: *next, ..SendOptions::count(n) };
        let report = self.send_with(&self.flow_spec(proto, dst_ports), &opts);
        assert_eq!(report.sent, n, "{self}: only {} of {n} flows sent: {report:?}", report.sent);
        *next = report.next_flow;
        report
    }

    /// Floods from a with a custom spec and options (rate, deadline, …),
    /// then waits for the receiver to settle. Panics on send errors only; the
    /// report says how many were sent.
    ///
    /// Waiting matters on a loaded machine: the receiver processes the
    /// packets in softirq context, which the kernel may defer to ksoftirqd.
    /// So this waits until b's IP layer has received every packet sent (its
    /// `Ip InReceives` counter) and then until conntrack's statistics stop
    /// changing; it panics if the packets do not all arrive within 10 s.
    pub fn send_with(&self, spec: &FlowSpec, opts: &SendOptions) -> FloodReport {
        let received = || self.snmp(Side::B).get("Ip.InReceives").copied().unwrap_or(0);
        let before = received();
        let report = ctguard::flood::send_flows(&self.netns(Side::A), spec, opts)
            .unwrap_or_else(|e| panic!("{self}: flood failed: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = received() - before;
            if got >= report.sent as i64 {
                break;
            }
            if Instant::now() > deadline {
                panic!("{self}: b's IP layer received only {got} of the {} packets sent: {report:?}", report.sent);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.settle();
        report
    }

    /// The side's IPv6 address once [`Lab::enable_ipv6`] ran.
    pub fn addr6(&self, side: Side) -> Ipv6Addr {
        match side {
            Side::A => "fd00:c7::a".parse().unwrap(),
            Side::B => "fd00:c7::b".parse().unwrap(),
        }
    }

    /// Turns IPv6 on for the veth (labs start with it off, so no router or
    /// neighbour solicitations add noise): addresses without duplicate
    /// detection and permanent neighbour entries, so the first packet goes
    /// out at once.
    pub fn enable_ipv6(&self) {
        let (mac_a, mac_b) = ("02:c7:00:00:00:0a", "02:c7:00:00:00:0b");
        for (side, peer_mac) in [(Side::A, mac_b), (Side::B, mac_a)] {
            let dev = self.ifname(side);
            self.exec(side, &["sysctl", "-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=0")]);
            let cidr = format!("{}/64", self.addr6(side));
            run("ip", &["-n", self.name(side), "addr", "add", &cidr, "dev", dev, "nodad"]);
            let peer = self.addr6(other(side)).to_string();
            run(
                "ip",
                &["-n", self.name(side), "neigh", "replace", &peer, "lladdr", peer_mac, "dev", dev, "nud", "permanent"],
            );
        }
    }

    /// Sends one UDP datagram over IPv6 from A to B's `port` per flow, from
    /// source ports `first_sport..first_sport + n` (ordinary sockets: the
    /// flood generator is IPv4 only). Returns when B's conntrack is settled.
    pub fn send_udp6_flows(&self, n: u16, port: u16, first_sport: u16) {
        let (src, dst) = (self.addr6(Side::A), self.addr6(Side::B));
        self.netns(Side::A)
            .run(move || {
                for i in 0..n {
                    let sock = std::net::UdpSocket::bind((src, first_sport + i)).expect("bind an IPv6 UDP socket");
                    sock.send_to(b"ctguard", (dst, port)).expect("send over IPv6");
                }
            })
            .unwrap_or_else(|e| panic!("{self}: {e}"));
        self.settle();
    }

    /// A side's `/proc/net/snmp` counters, keyed `Ip.InReceives`,
    /// `Udp.NoPorts`, `Tcp.OutRsts`, …
    pub fn snmp(&self, side: Side) -> BTreeMap<String, i64> {
        let text = self.exec(side, &["cat", "/proc/net/snmp"]);
        stats::parse_snmp(&text).unwrap_or_else(|e| panic!("{self}: /proc/net/snmp: {e}\n{text}"))
    }

    /// Waits (up to 2 s) until the receiver's conntrack statistics stop
    /// changing, so counters read afterwards include every packet processed.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let read = || (self.exec(Side::B, &["cat", "/proc/net/stat/nf_conntrack"]), self.conntrack_count_of(Side::B));
        let mut last = read();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = read();
            if now == last {
                return;
            }
            last = now;
        }
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

impl fmt::Display for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lab {} ({} {} <-> {} {})",
            self.test_name, self.names[0], self.addrs[0], self.names[1], self.addrs[1]
        )
    }
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in &self.names {
            if !Path::new(NAMED_NETNS_DIR).join(name).exists() {
                continue;
            }
            let out = try_run("ip", &["netns", "del", name]);
            if !out.status.success() {
                eprintln!("cannot delete netns {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
}

/// Deletes lab namespaces (`ctg-…-PID-N-a|b`) whose process no longer
/// exists, left by runs that were killed. Returns the names deleted.
pub fn cleanup_stale_labs() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NAMED_NETNS_DIR) else { return Vec::new() };
    let me = std::process::id();
    let mut deleted = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = lab_owner(&name) else { continue };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if try_run("ip", &["netns", "del", &name]).status.success() {
            eprintln!("deleted stale lab namespace {name} (process {pid} is gone)");
            deleted.push(name);
        }
    }
    deleted
}

/// The pid in a lab namespace name `ctg-<short>-<pid>-<n>-<a|b>`.
fn lab_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let mut parts = rest.rsplitn(4, '-');
    let side = parts.next()?;
    let n = parts.next()?;
    let pid = parts.next()?;
    let short = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    if !(side == "a" || side == "b") || !digits(n) || !digits(pid) || short.is_empty() {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_lab_namespace_names_only() {
        assert_eq!(lab_owner("ctg-table-full-1234-0-a"), Some(1234));
        assert_eq!(lab_owner("ctg-lab-99-12-b"), Some(99));
        assert_eq!(lab_owner("ctg-lab-99-12-c"), None);
        assert_eq!(lab_owner("cta"), None);
        assert_eq!(lab_owner("ctg-99-1-a"), None);
        assert_eq!(lab_owner("ctg-x-pid-1-a"), None);
    }
}
