//! The command line (clap derive). Each subcommand's arguments live here; its
//! behaviour lives in the module of the same name.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{
    sensors::{KeyMode, snapshot::Cause},
    util::Cidr,
};

#[derive(Debug, Parser)]
#[command(
    name = "ctguard",
    version,
    about = "Find, explain and fix nf_conntrack table-full drops",
    long_about = "ctguard watches Linux connection tracking with eBPF: it counts every new \
conntrack entry by the flow it belongs to, catches every packet netfilter drops and names \
the cause (table full, insert failed, invalid, ruleset), and reports table occupancy per \
network namespace.\n\nStart with `ctguard doctor` (what this kernel allows), then \
`ctguard status` (how full the tables are) and `ctguard trace` (drops as they happen).",
    after_help = "Exit codes: 0 ok, 1 warning (status: table >= 80% full or drops rising), 2 error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(
        about = "What this kernel allows: BTF, lockdown, which hook kinds load, which sensor backend ctguard uses."
    )]
    Doctor(DoctorArgs),
    #[command(about = "Conntrack table occupancy, counters, timeouts and memory per network namespace.")]
    Status(StatusArgs),
    #[command(about = "Stream dropped packets (and optionally new entries) with their cause.")]
    Trace(TraceArgs),
    #[command(about = "Live view of conntrack churn and drops: fill gauges, rates by cause, top keys.")]
    Top(TopArgs),
    #[command(
        about = "Sizing advice (max, buckets, timeouts) from RAM, kernel defaults and observed churn; --apply with backup."
    )]
    Recommend(crate::recommend::RecommendArgs),
    #[command(about = "Restore the conntrack settings saved by `recommend --apply`.")]
    Rollback(crate::recommend::RollbackArgs),
    #[command(about = "NOTRACK-equivalent nftables rules in a ctguard-owned table: add, list, remove, suggest.")]
    Bypass(crate::bypass::BypassArgs),
    #[command(about = "Self-contained demo in throw-away namespaces (and `lab flood`, the load generator).")]
    Lab(crate::lab::LabArgs),
    #[command(
        about = "Triggered captures during load tests: pcapng of dropped packets' headers, events, stats and a summary around a trigger; can wrap the load-test command."
    )]
    Capture(crate::capture::CaptureArgs),
}

#[derive(Debug, Args)]
#[command(long_about = "Probes the running kernel by loading tiny eBPF programs of each hook kind \
(tracepoint, tp_btf, raw_tp, fentry/fexit on vmlinux and on module functions, kprobe, netfilter \
link) and reports which work, plus BTF, lockdown mode and whether conntrack is active here. \
Needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root).")]
pub struct DoctorArgs {
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(long_about = "Reads /proc/net/stat/nf_conntrack and the nf_conntrack sysctls inside each \
network namespace: entries, max, buckets, fill %, per-CPU and summed counters, timeouts and the \
estimated kernel memory (slab object size x entries + 8 bytes per bucket).\n\n\
Exit code: 0 healthy, 1 warning (a table is >= 80% full, or drops rose between two readings \
taken --interval apart), 2 error.")]
pub struct StatusArgs {
    /// Which namespace(s): a name from `ip netns list`, a path like /proc/PID/ns/net, or `all`.
    /// Default: the namespace ctguard runs in.
    #[arg(long, value_name = "NAME|PATH|all")]
    pub netns: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also print the per-CPU counter rows.
    #[arg(long)]
    pub per_cpu: bool,
    /// Time between the two readings used to tell whether drops are rising (e.g. 500ms, 2s; 0 = one reading).
    #[arg(long, default_value = "1s", value_parser = crate::util::parse_duration)]
    pub interval: std::time::Duration,
}

#[derive(Debug, Args)]
#[command(long_about = "Attaches the sensors and prints every packet netfilter drops, with its \
cause (table_full, insert_failed, ct_invalid, ruleset, other), how sure ctguard is of it, the \
network namespace, interface, flow and the kernel function that dropped it.\n\n\
Filters combine with AND. At exit (Ctrl-C, --count or --duration) a summary shows events \
shown, events lost by the ring buffer, and per-cause totals from the kernel maps -- exact even \
when events were lost -- next to the kernel's own conntrack drop counters.")]
pub struct TraceArgs {
    /// JSON lines instead of text (the summary becomes the last line, with "summary": true).
    #[arg(long)]
    pub json: bool,
    /// Also stream new conntrack entries.
    #[arg(long)]
    pub new: bool,
    /// Only these causes (repeatable).
    #[arg(long, value_enum)]
    pub cause: Vec<Cause>,
    #[command(flatten)]
    pub filter: FlowFilterArgs,
    /// Stop after this many events shown.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = crate::util::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Ring buffer size in KiB (power of two, at least 4).
    #[arg(long, default_value_t = 1024)]
    pub ring_kib: u32,
    /// Write the events (not the summary) to this file instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// How new entries are keyed in the summary's top list.
    #[arg(long, value_enum, default_value = "dst-port")]
    pub by: KeyMode,
    /// Which kernel hooks to use (see `ctguard doctor`).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: crate::sensors::backend::BackendRequest,
}

#[derive(Debug, Args)]
#[command(long_about = "A live view for load tests: per-namespace fill gauges with trend and \
time-to-full, new entries/s, removals/s, drops/s by cause, early-drop evictions/s, events lost, and \
the top keys by churn (grouped in the kernel by --by).\n\n\
Keys in the terminal view: b grouping, s sort column, p pause, f filter, n namespace, ? help, q quit.\n\n\
Batch mode for scripts: --once prints one sample taken --interval apart; --json prints one JSON \
document per interval and needs no terminal. Schema \"ctguard.top.v1\": schema, time_unix_ms, \
key_mode, interval_s, rates{new_per_s, removed_per_s, drops_per_s{<every cause>}, early_drop_per_s}, \
tables[], keys[], keys_hidden, events_lost, key_overflow, programs[]; every field with its unit in \
docs/top-json.md.")]
pub struct TopArgs {
    /// How new entries are grouped (in the kernel).
    #[arg(long, value_enum, default_value = "dst-port")]
    pub by: KeyMode,
    /// Sampling interval (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = crate::util::parse_duration)]
    pub interval: std::time::Duration,
    /// Print one sample (taken one interval apart) and exit.
    #[arg(long)]
    pub once: bool,
    /// Print one JSON document per interval instead of the terminal view.
    #[arg(long)]
    pub json: bool,
    /// Batch mode: stop after this many samples.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (batch mode and terminal view).
    #[arg(long, value_parser = crate::util::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Rows in the key table.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Sort column.
    #[arg(long, value_enum, default_value = "inserts")]
    pub sort: crate::top::model::SortBy,
    #[command(flatten)]
    pub filter: FlowFilterArgs,
    /// Distinct keys kept in the kernel before folding into "other".
    #[arg(long, default_value_t = 16384)]
    pub max_keys: u32,
    /// Which kernel hooks to use (see `ctguard doctor`).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: crate::sensors::backend::BackendRequest,
}

/// Which flows a view shows (`trace`, `top`); all combine with AND.
#[derive(Debug, Args)]
pub struct FlowFilterArgs {
    /// Only this network namespace: inode number, name from `ip netns list`, or path.
    #[arg(long)]
    pub netns: Option<String>,
    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp or a number.
    #[arg(long)]
    pub proto: Option<String>,
    /// Only flows with this source or destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only flows whose source address is in this CIDR (IPv4 or IPv6).
    #[arg(long)]
    pub src: Option<Cidr>,
    /// Only flows whose destination address is in this CIDR.
    #[arg(long)]
    pub dst: Option<Cidr>,
}

impl FlowFilterArgs {
    /// Resolves the namespace and protocol names.
    pub fn resolve(&self) -> anyhow::Result<crate::top::model::KeyFilter> {
        let netns = match self.netns.as_deref() {
            None => None,
            Some(s) if s.chars().all(|c| c.is_ascii_digit()) => Some(s.parse::<u32>().map_err(|_| {
                crate::error::CtguardError::usage(
                    format!("--netns {s} is not a valid inode number"),
                    "see `ls -L -i /proc/PID/ns/net`",
                )
            })?),
            Some(s) => crate::netns::Netns::resolve(Some(s))?.first().map(|ns| ns.inode),
        };
        let proto = self
            .proto
            .as_deref()
            .map(crate::trace::filter::parse_proto)
            .transpose()
            .map_err(|e| crate::error::CtguardError::usage(e, "e.g. --proto udp"))?;
        Ok(crate::top::model::KeyFilter { netns, proto, port: self.port, src: self.src, dst: self.dst })
    }
}
