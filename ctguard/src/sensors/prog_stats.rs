//! Per-program kernel statistics: run count and time (when
//! `kernel.bpf_stats_enabled` is 1) and recursion misses — runs the kernel
//! skipped because the program was already running on that CPU, which would
//! otherwise be silent gaps in the counts.
use std::os::fd::AsFd;

use aya_obj::generated::bpf_prog_info;
use serde::Serialize;

use crate::kernel::bpf_sys;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProgramStats {
    pub program: String,
    /// Runs counted while kernel.bpf_stats_enabled=1.
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Times the kernel did not run the program because it was already
    /// running on that CPU (an interrupt hit it): each is an uncounted event.
    pub recursion_misses: u64,
}

impl ProgramStats {
    /// Average cost of one run, when stats were enabled.
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }
}

/// BPF_OBJ_GET_INFO_BY_FD on a program fd (aya does not expose recursion_misses).
pub fn read(program: &str, fd: impl AsFd) -> std::io::Result<ProgramStats> {
    // SAFETY: a plain C struct for which all-zero is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    bpf_sys::object_info(fd.as_fd(), &mut info)?;
    Ok(ProgramStats {
        program: program.to_string(),
        run_count: info.run_cnt,
        run_time_ns: info.run_time_ns,
        recursion_misses: info.recursion_misses,
    })
}
