//! What one benchmark run measured: plain data, filled by
//! [`super::scenarios`] and rendered by [`super::report`].
use super::parse::{ConntrackEvents, Flood, TopFrame, TraceSummary};

/// What runs next to the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cond {
    /// Nothing: the baseline.
    None,
    /// `ctguard top --json --interval 1s`.
    Top,
    /// `ctguard trace --json --netns SERVER`.
    Trace,
    /// `conntrack -E -e NEW` in the server namespace.
    ConntrackEvents,
    /// The bpftrace one-liner on kmem:kmem_cache_alloc.
    Bpftrace,
}

impl Cond {
    pub fn label(self) -> &'static str {
        match self {
            Cond::None => "no tool (baseline)",
            Cond::Top => "`ctguard top --json --interval 1s`",
            Cond::Trace => "`ctguard trace --json --netns <server>`",
            Cond::ConntrackEvents => "`conntrack -E -e NEW` (server netns)",
            Cond::Bpftrace => "bpftrace one-liner (kmem_cache_alloc)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Cond::None => "none",
            Cond::Top => "top",
            Cond::Trace => "trace",
            Cond::ConntrackEvents => "conntrack -E",
            Cond::Bpftrace => "bpftrace",
        }
    }

    pub fn is_ctguard(self) -> bool {
        matches!(self, Cond::Top | Cond::Trace)
    }
}

/// One flood with one condition.
#[derive(Clone, Debug)]
pub struct Run {
    pub cond: Cond,
    pub round: usize,
    pub flood: Flood,
    /// Delta of the server's `ct state new` counter over the flood.
    pub kernel_new: u64,
    /// Delta of the server's conntrack `drop` counter (summed over CPUs).
    pub kernel_drop: u64,
    /// Delta of its `early_drop` column: entries evicted to make room.
    pub kernel_early_drop: u64,
    /// The tool's CPU use over the flood, percent of one core: from
    /// schedstat (ns) and from utime+stime (10 ms ticks).
    pub cpu_pct: Option<f64>,
    pub cpu_pct_ticks: Option<f64>,
    pub rss_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
    /// Sum of `memlock` over the tool's BPF map descriptors, bytes.
    pub map_memlock: Option<u64>,
    /// The tool's BPF programs over the window (only with bpf stats on):
    /// total run time and runs, from /proc/PID/fdinfo.
    pub bpf_run_ns: Option<u64>,
    pub bpf_runs: Option<u64>,
    /// New entries the tool counted for the server: ctguard trace's
    /// inserts, conntrack -E's [NEW] lines, bpftrace's count.
    pub counted_new: Option<u64>,
    pub trace: Option<TraceSummary>,
    pub conntrack: Option<ConntrackEvents>,
    pub frames: Vec<TopFrame>,
}

/// The seed's method against `ctguard top --once` on a table of `entries`.
#[derive(Clone, Debug, Default)]
pub struct SeedScan {
    pub entries: u64,
    /// Wall seconds of the cat | awk | sort | uniq -c pipeline, per repeat.
    pub pipeline_s: Vec<f64>,
    /// What the pipeline counted (sum of its uniq -c counts), last repeat.
    pub pipeline_counted: u64,
    /// Wall seconds of `ctguard top --once --interval 200ms --json`.
    pub once_s: Vec<f64>,
    /// The frame the last `top --once` printed.
    pub once_frame: Option<TopFrame>,
}

/// `ctguard top --by tuple` with `keys` distinct flows.
#[derive(Clone, Debug, Default)]
pub struct ScaleRun {
    pub keys: u64,
    pub flood: Flood,
    pub memlock_before: u64,
    pub memlock_after: u64,
    pub maps: u32,
    pub rss_kib: u64,
    pub key_overflow: u64,
    /// Frame interval minus the nominal interval, ms, for frames after the flood.
    pub refresh_ms: Vec<f64>,
    /// Wall seconds of `ctguard top --once --by tuple --interval 200ms --json`.
    pub once_s: Vec<f64>,
}

/// Facts about the machine and the build.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cores: usize,
    pub mem_gib: f64,
    pub lockdown: String,
    pub date_utc: String,
    pub ctguard_version: String,
    pub git_rev: String,
    pub backend: String,
    /// The hook lines of `ctguard doctor` ("new/removed entries  raw_tp …").
    pub hooks: Vec<String>,
    pub conntrack_version: String,
    pub bpftrace_version: String,
    pub nf_conntrack_max: String,
    pub nf_conntrack_buckets: String,
    /// /proc/loadavg's 1-minute figure before and after the run: how busy
    /// the rest of the machine was.
    pub load_before: String,
    pub load_after: String,
}

/// The sizes a run uses.
#[derive(Clone, Debug)]
pub struct Plan {
    pub smoke: bool,
    pub repeats: usize,
    pub overhead_flows: u64,
    pub drop_max: u64,
    pub drop_flows: u64,
    pub fill_sizes: Vec<u64>,
    pub scales: Vec<u64>,
    /// nf_conntrack_max while tables are filled (restored after).
    pub raised_max: u64,
    pub max_keys: u64,
    pub max_loss_percent: f64,
}

impl Plan {
    pub fn full(repeats: usize) -> Plan {
        Plan {
            smoke: false,
            repeats,
            overhead_flows: 200_000,
            drop_max: 2_000,
            drop_flows: 200_000,
            fill_sizes: vec![100_000, 1_000_000],
            scales: vec![10_000, 100_000, 1_000_000],
            raised_max: 2_000_000,
            max_keys: 16_384,
            max_loss_percent: 3.0,
        }
    }

    /// Tiny counts: checks the harness end to end in well under a minute.
    pub fn smoke(repeats: usize) -> Plan {
        Plan {
            smoke: true,
            repeats,
            overhead_flows: 5_000,
            drop_max: 1_000,
            drop_flows: 5_000,
            fill_sizes: vec![2_000, 10_000],
            scales: vec![1_000, 20_000],
            raised_max: 100_000,
            max_keys: 16_384,
            max_loss_percent: 3.0,
        }
    }
}

/// Everything the report shows.
#[derive(Clone, Debug, Default)]
pub struct Results {
    pub machine: Machine,
    pub plan: Option<Plan>,
    pub command: String,
    /// bpftrace's argument spelling, or why it could not run.
    pub bpftrace: Option<Result<String, String>>,
    /// First stderr line bpftrace printed (a warning it gives on this host).
    pub bpftrace_stderr: Option<String>,
    pub overhead: Vec<Run>,
    pub drops: Vec<Run>,
    pub cost: Vec<Run>,
    pub seed: Vec<SeedScan>,
    pub scaling: Vec<ScaleRun>,
    /// Things that went wrong or looked odd, for the report.
    pub notes: Vec<String>,
    pub total_s: f64,
}
