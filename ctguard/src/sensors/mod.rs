//! Loads ctguard's kernel programs, attaches them, and reads what they count.
//!
//! The tracepoint backend (the only one this module implements) works on every
//! kernel with BTF and raw tracepoints, including locked-down ones:
//! `skb:kfree_skb` for drops, `kmem:kmem_cache_alloc/free` on the nf_conntrack
//! slab for new and removed entries. Totals always come from the per-CPU maps,
//! never from event delivery.
pub mod backend;
pub mod event;
pub mod layout;
pub mod prog_stats;
pub mod snapshot;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{KProbe, RawTracePoint, RawTracePointRunOptions, TestRun},
};
use ctguard_ebpf::{ChurnKey, ChurnValue, DropKey, counter, key_mode};

use self::{
    backend::{Backend, BackendRequest},
    layout::Layout,
    snapshot::Snapshot,
};
use crate::{
    error::CtguardError,
    kernel::{kallsyms::Kallsyms, system},
};

/// The compiled kernel programs, embedded at build time (see build.rs).
pub fn object_bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctguard"))
}

/// How new entries are grouped in the kernel (`--by`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyMode {
    /// Destination port and protocol.
    DstPort,
    /// Source address.
    SrcIp,
    /// Destination address.
    DstIp,
    /// Source and destination address pair.
    SrcDst,
    /// Network namespace only.
    Netns,
    /// Conntrack zone.
    Zone,
    /// Full 5-tuple (and zone).
    Tuple,
}

impl KeyMode {
    fn kernel_value(self) -> u8 {
        match self {
            KeyMode::DstPort => key_mode::DST_PORT,
            KeyMode::SrcIp => key_mode::SRC_IP,
            KeyMode::DstIp => key_mode::DST_IP,
            KeyMode::SrcDst => key_mode::SRC_DST,
            KeyMode::Netns => key_mode::NETNS,
            KeyMode::Zone => key_mode::ZONE,
            KeyMode::Tuple => key_mode::TUPLE,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SensorOptions {
    pub key_mode: KeyMode,
    /// Also send every new entry over the ring buffer (`trace --new`).
    pub emit_new_events: bool,
    /// Send drop events over the ring buffer. Off for views that only read
    /// the maps (`top`, `lab`), so no event is produced only to be lost.
    pub emit_drop_events: bool,
    /// Distinct churn keys kept in the kernel before folding into "other".
    pub max_keys: u32,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Which hooks to use (`--backend`).
    pub backend: BackendRequest,
    /// Bytes of each dropped packet (from its network header) sent with its
    /// event, at most ctguard_ebpf::MAX_CAPTURE; 0 sends none.
    pub capture_bytes: u32,
}

impl Default for SensorOptions {
    fn default() -> Self {
        Self {
            key_mode: KeyMode::DstPort,
            emit_new_events: false,
            emit_drop_events: true,
            max_keys: 16384,
            ring_bytes: 1 << 20,
            backend: BackendRequest::Auto,
            capture_bytes: 0,
        }
    }
}

/// Programs attached to the tracepoint backend's hooks. Dropping it detaches
/// everything (aya owns the links).
pub struct Sensors {
    ebpf: Ebpf,
    /// Kernel-side diagnostics (aya-log), drained into `log` at each snapshot.
    kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub layout: Layout,
    /// The hooks in use and why they were chosen.
    pub backend: Backend,
    pub backend_reason: String,
    cpus: Vec<u32>,
}

/// An entry younger than this may still be mid-initialisation when a flush
/// interrupts its CPU; it is keyed at the next flush instead.
const FLUSH_MIN_AGE_NS: u64 = 200_000;

/// Raw tracepoint programs and their tracepoints, per backend.
const TRACEPOINT_PROGRAMS: [(&str, &str); 3] =
    [("ctg_kfree_skb", "kfree_skb"), ("ctg_ct_alloc", "kmem_cache_alloc"), ("ctg_ct_free", "kmem_cache_free")];
/// The function-hook backend keys new entries at __nf_conntrack_alloc's
/// return instead of at the slab allocation.
const FUNCTION_BACKEND_TRACEPOINTS: [(&str, &str); 2] =
    [("ctg_kfree_skb", "kfree_skb"), ("ctg_ct_free", "kmem_cache_free")];
/// kprobe / kretprobe programs and the functions they attach to.
const FUNCTION_HOOKS: [(&str, &str); 6] = [
    ("fh_alloc_entry", "__nf_conntrack_alloc"),
    ("fh_alloc_exit", "__nf_conntrack_alloc"),
    ("fh_confirm_exit", "__nf_conntrack_confirm"),
    ("fh_early_drop_entry", "early_drop"),
    ("fh_early_drop_exit", "early_drop"),
    ("fh_ct_delete_exit", "nf_ct_delete"),
];

fn attach_function_hooks(ebpf: &mut Ebpf) -> Result<(), CtguardError> {
    for (prog, tracepoint) in FUNCTION_BACKEND_TRACEPOINTS {
        attach_raw_tp(ebpf, prog, tracepoint)?;
    }
    for (prog, function) in FUNCTION_HOOKS {
        let p: &mut KProbe = program(ebpf, prog)?;
        p.load().map_err(|e| load_error(prog, e))?;
        p.attach(function, 0).map_err(|e| load_error(prog, e))?;
    }
    Ok(())
}

impl Sensors {
    pub fn start(opts: &SensorOptions) -> Result<Self, CtguardError> {
        system::require_bpf_caps()?;
        if system::ensure_conntrack_loaded()? {
            log::info!("loaded the nf_conntrack module (it tracks nothing until a rule uses it)");
        }
        system::try_load_nf_tables();
        let layout = Layout::for_running_kernel()?;
        for f in &layout.missing_functions {
            log::warn!("{f} is not in /proc/kallsyms: netfilter drops freed there are classified as `other`");
        }
        let key_mode = opts.key_mode.kernel_value();
        let emit = u8::from(opts.emit_new_events);
        let mut loader = EbpfLoader::new();
        for (name, value) in &layout.u32s {
            loader.override_global(name, value, true);
        }
        for (name, value) in &layout.u64s {
            loader.override_global(name, value, true);
        }
        loader.override_global("KEY_MODE", &key_mode, true);
        loader.override_global("EMIT_NEW_EVENTS", &emit, true);
        let emit_drops = u8::from(opts.emit_drop_events);
        loader.override_global("EMIT_DROP_EVENTS", &emit_drops, true);
        let capture_bytes = opts.capture_bytes.min(ctguard_ebpf::MAX_CAPTURE as u32);
        loader.override_global("CAPTURE_BYTES", &capture_bytes, true);
        loader.map_max_entries("CHURN", opts.max_keys.max(16));
        loader.map_max_entries("EVENTS", opts.ring_bytes);
        let mut ebpf = loader.load(object_bytes()).map_err(|e| {
            CtguardError::ebpf(
                format!("loading the kernel programs failed: {e}"),
                "run `ctguard doctor` to see which hooks this kernel allows",
            )
        })?;
        let facts = backend::probe_host(&Kallsyms::read()?);
        let (backend, backend_reason) = backend::choose(opts.backend, &facts)
            .map_err(|e| CtguardError::usage(e, "use --backend auto or --backend tracepoint"))?;
        match backend {
            Backend::Tracepoint => {
                for (prog, tracepoint) in TRACEPOINT_PROGRAMS {
                    attach_raw_tp(&mut ebpf, prog, tracepoint)?;
                }
            }
            Backend::FunctionHooks => {
                if let Err(e) = attach_function_hooks(&mut ebpf) {
                    if opts.backend != BackendRequest::Auto {
                        return Err(e);
                    }
                    // kprobes exist but this kernel refuses them (lockdown, a
                    // blocklisted symbol): start over on tracepoints, and say so.
                    drop(ebpf);
                    let mut sensors =
                        Self::start(&SensorOptions { backend: BackendRequest::Tracepoint, ..opts.clone() })?;
                    sensors.backend_reason = format!("function hooks failed to attach ({e}); tracepoints instead");
                    log::warn!("{}", sensors.backend_reason);
                    return Ok(sensors);
                }
            }
        }
        let kernel_log = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("kernel-side diagnostics unavailable: {e}");
                None
            }
        };
        let flush: &mut RawTracePoint = program(&mut ebpf, "ctg_flush")?;
        flush.load().map_err(|e| load_error("ctg_flush", e))?;
        let cpus = aya::util::online_cpus()
            .map_err(|(_, e)| CtguardError::ebpf(format!("cannot list online CPUs: {e}"), "is /sys mounted?"))?;
        Ok(Self { ebpf, kernel_log, layout, backend, backend_reason, cpus })
    }

    /// Keys the last new entry of every CPU (see `ctg_flush`).
    pub fn flush(&self) -> Result<(), CtguardError> {
        let prog: &RawTracePoint = self
            .ebpf
            .program("ctg_flush")
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| CtguardError::ebpf("ctg_flush missing from the object", "rebuild ctguard"))?;
        // CPUs come and go (hot-plug): flush the ones online now. An entry
        // pending on a CPU that went offline is keyed when it is back.
        let online = aya::util::online_cpus().unwrap_or_else(|_| self.cpus.clone());
        for &cpu in &online {
            let mut opts = RawTracePointRunOptions::new();
            opts.args[0] = FLUSH_MIN_AGE_NS;
            opts.cpu = Some(cpu);
            if let Err(e) = prog.test_run(opts) {
                // Gone offline between the listing and the run: not an error.
                if aya::util::online_cpus().is_ok_and(|now| !now.contains(&cpu)) {
                    continue;
                }
                return Err(CtguardError::ebpf(
                    format!("flushing CPU {cpu} failed: {e}"),
                    "needs kernel 5.10+ (BPF_PROG_TEST_RUN on raw tracepoints)",
                ));
            }
        }
        Ok(())
    }

    /// Flushes, then reads every counter and map into one snapshot.
    pub fn snapshot(&mut self) -> Result<Snapshot, CtguardError> {
        self.flush()?;
        if let Some(l) = self.kernel_log.as_mut() {
            l.flush();
        }
        let read_err = |what: &str, e: &dyn std::fmt::Display| {
            CtguardError::ebpf(format!("reading {what} failed: {e}"), "the programs may have been unloaded")
        };
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map("COUNTERS")?).map_err(|e| read_err("COUNTERS", &e))?;
        let mut totals = [0u64; counter::COUNT as usize];
        for (i, slot) in totals.iter_mut().enumerate() {
            let per_cpu = counters.get(&(i as u32), 0).map_err(|e| read_err("COUNTERS", &e))?;
            *slot = per_cpu.iter().sum();
        }
        let churn: PerCpuHashMap<_, ChurnKey, ChurnValue> =
            PerCpuHashMap::try_from(self.map("CHURN")?).map_err(|e| read_err("CHURN", &e))?;
        let mut keys = Vec::new();
        for item in churn.iter() {
            let (key, per_cpu) = item.map_err(|e| read_err("CHURN", &e))?;
            keys.push((key, sum_values(per_cpu.iter())));
        }
        let other: PerCpuHashMap<_, u32, ChurnValue> =
            PerCpuHashMap::try_from(self.map("OTHER_KEYS")?).map_err(|e| read_err("OTHER_KEYS", &e))?;
        for item in other.iter() {
            let (netns, per_cpu) = item.map_err(|e| read_err("OTHER_KEYS", &e))?;
            keys.push((ChurnKey { netns, other: 1, ..Default::default() }, sum_values(per_cpu.iter())));
        }
        let drops_map: PerCpuHashMap<_, DropKey, u64> =
            PerCpuHashMap::try_from(self.map("DROPS")?).map_err(|e| read_err("DROPS", &e))?;
        let mut drops = Vec::new();
        for item in drops_map.iter() {
            let (key, per_cpu) = item.map_err(|e| read_err("DROPS", &e))?;
            drops.push((key, per_cpu.iter().sum()));
        }
        Ok(Snapshot::new(std::time::Instant::now(), totals, keys, drops))
    }

    /// Statistics of every attached program (see [`prog_stats`]).
    pub fn program_stats(&self) -> Vec<prog_stats::ProgramStats> {
        let mut out = Vec::new();
        for (name, prog) in self.ebpf.programs() {
            // Attached programs are the loaded ones; probes and the rest have no fd.
            let Ok(fd) = prog.fd() else { continue };
            if name.starts_with("probe_") {
                continue;
            }
            if let Ok(s) = prog_stats::read(name, fd) {
                out.push(s);
            }
        }
        out.sort_by(|a, b| a.program.cmp(&b.program));
        out
    }

    /// Takes the ring buffer for event streaming (`trace`).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, CtguardError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| CtguardError::ebpf("EVENTS map already taken", "internal error"))?;
        RingBuf::try_from(map).map_err(|e| CtguardError::ebpf(format!("EVENTS: {e}"), "internal error"))
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map, CtguardError> {
        self.ebpf
            .map(name)
            .ok_or_else(|| CtguardError::ebpf(format!("map {name} missing from the object"), "rebuild ctguard"))
    }
}

fn sum_values<'a>(values: impl Iterator<Item = &'a ChurnValue>) -> ChurnValue {
    values.fold(ChurnValue::default(), |acc, v| ChurnValue {
        inserts: acc.inserts + v.inserts,
        removals: acc.removals + v.removals,
        drops: acc.drops + v.drops,
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, CtguardError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| CtguardError::ebpf(format!("program {name} missing from the object"), "rebuild ctguard"))
}

fn load_error(prog: &str, e: aya::programs::ProgramError) -> CtguardError {
    let full = crate::util::error_chain(&e);
    log::debug!("full error for {prog}: {full}");
    CtguardError::ebpf(
        format!("the kernel refused program {prog}: {}", trim_verifier_log(&full)),
        "run `ctguard doctor` to see which hooks this kernel allows",
    )
}

fn attach_raw_tp(ebpf: &mut Ebpf, prog: &str, tracepoint: &str) -> Result<(), CtguardError> {
    let p: &mut RawTracePoint = program(ebpf, prog)?;
    p.load().map_err(|e| load_error(prog, e))?;
    p.attach(tracepoint).map_err(|e| load_error(prog, e))?;
    Ok(())
}

/// Verifier logs run to thousands of lines; users get the verdict (the last
/// lines), and RUST_LOG=debug prints the whole log.
fn trim_verifier_log(message: &str) -> String {
    const KEEP: usize = 8;
    let lines: Vec<&str> = message.lines().collect();
    if lines.len() <= KEEP * 2 {
        return message.to_string();
    }
    format!(
        "{}\n  [... {} verifier log lines omitted; RUST_LOG=debug shows them ...]\n{}",
        lines[0],
        lines.len() - KEEP - 1,
        lines[lines.len() - KEEP..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_logs_are_trimmed_to_the_verdict() {
        let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = trim_verifier_log(&long);
        assert!(t.starts_with("line 0"));
        assert!(t.contains("91 verifier log lines omitted"));
        assert!(t.ends_with("line 99"));
        assert_eq!(trim_verifier_log("short"), "short");
    }
}
