//! What a running process costs, read from /proc: CPU time (utime+stime of
//! `/proc/PID/stat`), memory (`VmRSS`/`VmHWM` of `/proc/PID/status`), the
//! kernel memory its BPF maps hold (the `memlock:` lines of
//! `/proc/PID/fdinfo/N` for its `anon_inode:bpf-map` descriptors) and what
//! its BPF programs ran (`run_time_ns:`/`run_cnt:` of its `anon_inode:bpf-prog`
//! descriptors, counted only while `kernel.bpf_stats_enabled=1`).
//!
//! The parsers are pure functions over the files' text and unit-tested; the
//! readers around them only do the I/O.
use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, Result};

/// Clock ticks per second of the utime/stime fields: USER_HZ, which is 100
/// on every Linux architecture's user ABI (`getconf CLK_TCK`).
pub const TICKS_PER_S: u64 = 100;

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Time on a CPU in ns, summed over the threads' `schedstat` (the same
    /// time as utime+stime, without the 10 ms tick resolution); 0 when the
    /// kernel has no schedstat.
    pub cpu_ns: u64,
    pub rss_kib: u64,
    /// Peak resident set size so far.
    pub hwm_kib: u64,
    /// Sum of `memlock` over the process's BPF map descriptors, bytes.
    pub map_memlock: u64,
    /// BPF map descriptors seen.
    pub maps: u32,
    /// Sums over the process's BPF program descriptors.
    pub prog_run_ns: u64,
    pub prog_run_cnt: u64,
    pub prog_recursion_misses: u64,
    pub progs: u32,
}

impl ProcSample {
    /// Reads `/proc/PID/{stat,status,fd,fdinfo}`.
    pub fn read(pid: u32) -> Result<ProcSample> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid} is gone"))?;
        let status =
            fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid} is gone"))?;
        let (utime, stime) = parse_stat_cpu(&stat).with_context(|| format!("cannot parse /proc/{pid}/stat: {stat}"))?;
        let mut s = ProcSample {
            cpu_ticks: utime + stime,
            rss_kib: parse_status_kib(&status, "VmRSS").unwrap_or(0),
            hwm_kib: parse_status_kib(&status, "VmHWM").unwrap_or(0),
            ..ProcSample::default()
        };
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let text = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
                s.cpu_ns += parse_schedstat(&text).unwrap_or(0);
            }
        }
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Ok(s) };
        for entry in dir.flatten() {
            let Ok(target) = fs::read_link(entry.path()) else { continue };
            let kind = BpfFd::from_link(&target.to_string_lossy());
            if kind == BpfFd::Other {
                continue;
            }
            let fd = entry.file_name();
            // The descriptor may close between listing and reading: skip it.
            let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy())) else { continue };
            let fields = parse_fdinfo(&info);
            let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match kind {
                BpfFd::Map => {
                    s.maps += 1;
                    s.map_memlock += num("memlock");
                }
                BpfFd::Prog => {
                    s.progs += 1;
                    s.prog_run_ns += num("run_time_ns");
                    s.prog_run_cnt += num("run_cnt");
                    s.prog_recursion_misses += num("recursion_misses");
                }
                BpfFd::Other => {}
            }
        }
        Ok(s)
    }
}

/// What a descriptor's `/proc/PID/fd/N` link says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpfFd {
    Map,
    Prog,
    Other,
}

impl BpfFd {
    pub fn from_link(target: &str) -> BpfFd {
        match target {
            "anon_inode:bpf-map" => BpfFd::Map,
            "anon_inode:bpf-prog" => BpfFd::Prog,
            _ => BpfFd::Other,
        }
    }
}

/// (utime, stime) in clock ticks from the text of `/proc/PID/stat`. The
/// command name (field 2) is in parentheses and may hold spaces and
/// parentheses itself, so fields are counted after its last `)`.
pub fn parse_stat_cpu(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime = fields.get(14 - 3)?.parse().ok()?;
    let stime = fields.get(15 - 3)?.parse().ok()?;
    Some((utime, stime))
}

/// Time on a CPU in ns: the first of the three numbers of
/// `/proc/PID/task/TID/schedstat` (on-CPU ns, run-queue wait ns, timeslices).
pub fn parse_schedstat(text: &str) -> Option<u64> {
    let mut it = text.split_whitespace();
    let ns = it.next()?.parse().ok()?;
    it.next()?;
    Some(ns)
}

/// A `Key:   123 kB` line of `/proc/PID/status`, in KiB.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

/// The `key:\tvalue` lines of a `/proc/PID/fdinfo/N` file.
pub fn parse_fdinfo(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn stat_cpu_counts_fields_after_the_name() {
        let stat = "2988 (ctguard) S 2986 2986 10481 0 -1 4194560 23085 0 0 0 13 21 0 0 20 0 1 0 373670 \
                    110968832 9456 18446744073709551615 1 1 0 0 0 0 4102 1088 1 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat_cpu(stat), Some((13, 21)));
        let odd = "77 (a) b (c)) R 1 1 1 0 -1 0 0 0 0 0 5 7 0 0 20 0 1 0 1 1 1\n";
        assert_eq!(parse_stat_cpu(odd), Some((5, 7)), "a name with spaces and parentheses");
        assert_eq!(parse_stat_cpu("12 (x) S 1 2"), None, "too short");
        assert_eq!(parse_stat_cpu("no parenthesis"), None);
    }

    #[test]
    fn schedstat_on_cpu_time() {
        assert_eq!(parse_schedstat("218615 63695 2\n"), Some(218615));
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let status = "Name:\tctguard\nVmHWM:\t   60716 kB\nVmRSS:\t   38024 kB\nThreads:\t1\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(38024));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(60716));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        assert_eq!(parse_status_kib("VmRSSX:\t1 kB\n", "VmRSS"), None, "whole keys only");
    }

    #[test]
    fn fdinfo_of_a_map_and_a_program() {
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t5\nkey_size:\t44\n\
                   value_size:\t24\nmax_entries:\t16384\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t2753408\n\
                   map_id:\t301\nfrozen:\t0\n";
        let f = parse_fdinfo(map);
        assert_eq!(f["memlock"], "2753408");
        assert_eq!(f["max_entries"], "16384");
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\tf3a1e8b4e3d4c1b2\n\
                    memlock:\t12288\nprog_id:\t88\nrun_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t2\n\
                    verified_insns:\t311\n";
        let p = parse_fdinfo(prog);
        assert_eq!(
            (p["run_time_ns"].as_str(), p["run_cnt"].as_str(), p["recursion_misses"].as_str()),
            ("123456", "789", "2")
        );
    }

    #[test]
    fn descriptor_kinds_from_links() {
        assert_eq!(BpfFd::from_link("anon_inode:bpf-map"), BpfFd::Map);
        assert_eq!(BpfFd::from_link("anon_inode:bpf-prog"), BpfFd::Prog);
        assert_eq!(BpfFd::from_link("anon_inode:bpf_link"), BpfFd::Other);
        assert_eq!(BpfFd::from_link("/dev/null"), BpfFd::Other);
    }

    #[test]
    fn reads_this_process() {
        let s = ProcSample::read(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib, "{s:?}");
        assert!(s.cpu_ns > 0 || !Path::new("/proc/self/schedstat").exists(), "{s:?}");
        assert_eq!((s.maps, s.map_memlock), (0, 0), "the test binary holds no BPF maps");
    }
}
