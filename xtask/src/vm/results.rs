//! Reading the guest's output: the marker lines of the guest script and
//! libtest's result lines, for the per-kernel summary.
use super::initramfs::MARK;

/// What the host learnt from the guest's output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestLog {
    /// `uname -r` in the guest.
    pub guest_kernel: Option<String>,
    /// The guest's uptime when the command started.
    pub guest_uptime: Option<f64>,
    pub doctor_exit: Option<i32>,
    /// (test executable, exit status), in run order.
    pub executables: Vec<(String, i32)>,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// `executable: test name` of every failed test.
    pub failed_tests: Vec<String>,
    /// The guest's own setup failure, if any.
    pub setup_error: Option<String>,
    current: Option<String>,
}

impl GuestLog {
    pub fn feed(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix(MARK) {
            self.marker(rest.trim());
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                // "ok. 5 passed": the number is the word before the last.
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        } else if let Some(name) = line.strip_prefix("test ").and_then(|r| r.strip_suffix(" ... FAILED")) {
            self.failed_test(name.trim());
        } else if let Some(name) = line.strip_prefix("---- ").and_then(|r| r.strip_suffix(" stdout ----")) {
            // With --nocapture, "test x ... FAILED" can be split by output;
            // the failure report's header still names the test.
            self.failed_test(name.trim());
        }
    }

    fn marker(&mut self, rest: &str) {
        if let Some(r) = rest.strip_prefix("guest up: kernel ") {
            let (kernel, after) = r.split_once(", ").unwrap_or((r, ""));
            self.guest_kernel = Some(kernel.to_string());
            self.guest_uptime = after.split_whitespace().next().and_then(|s| s.parse().ok());
        } else if let Some(r) = rest.strip_prefix("(ctguard doctor exited ") {
            self.doctor_exit = r.trim_end_matches(')').parse().ok();
        } else if let Some(r) = rest.strip_prefix("== ") {
            // `== PATH ARGS...`; the doctor run is not a test executable.
            if let Some(exe) = r.split_whitespace().next().map(executable_name)
                && exe != "ctguard"
            {
                self.current = Some(exe);
            }
        } else if let Some(r) = rest.strip_prefix("result ") {
            let (code, exe) = r.split_once(' ').unwrap_or((r, ""));
            if let Ok(code) = code.parse() {
                self.executables.push((executable_name(exe), code));
            }
            self.current = None;
        } else if let Some(r) = rest.strip_prefix("guest setup failed: ") {
            self.setup_error = Some(r.to_string());
        }
    }

    fn failed_test(&mut self, name: &str) {
        let full = match &self.current {
            Some(exe) => format!("{exe}: {name}"),
            None => name.to_string(),
        };
        if !self.failed_tests.contains(&full) {
            self.failed_tests.push(full);
        }
    }

    pub fn failed_executables(&self) -> Vec<&str> {
        self.executables.iter().filter(|(_, code)| *code != 0).map(|(exe, _)| exe.as_str()).collect()
    }
}

/// `/w/target/debug/deps/sensors-6c085f2e3c43ad16` -> `sensors`.
pub fn executable_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.to_string(),
        _ => file.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(text: &str) -> GuestLog {
        let mut log = GuestLog::default();
        for l in text.lines() {
            log.feed(l);
        }
        log
    }

    #[test]
    fn a_whole_run_is_summarised() {
        let log = feed(
            "ctguard-vm: guest up: kernel 6.12.117+deb12-amd64, 7.31 s after boot\n\
             ctguard-vm: == /w/target/debug/ctguard doctor\n\
             backend: function_hooks\n\
             ctguard-vm: (ctguard doctor exited 0)\n\
             ctguard-vm: == /w/target/debug/deps/sensors-6c085f2e3c43ad16 --test-threads=1\n\
             running 3 tests\n\
             test drops_are_seen ... ok\n\
             test vm_kprobe_backend ... FAILED\n\
             test slow ... ignored\n\
             \n\
             failures:\n\
             \n\
             ---- vm_kprobe_backend stdout ----\n\
             panicked\n\
             test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 2.00s\n\
             ctguard-vm: result 101 /w/target/debug/deps/sensors-6c085f2e3c43ad16\n\
             ctguard-vm: == /w/target/debug/deps/fixture-8a100c5b7100cdba --test-threads=1\n\
             test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n\
             ctguard-vm: result 0 /w/target/debug/deps/fixture-8a100c5b7100cdba\n",
        );
        assert_eq!(log.guest_kernel.as_deref(), Some("6.12.117+deb12-amd64"));
        assert_eq!(log.guest_uptime, Some(7.31));
        assert_eq!(log.doctor_exit, Some(0));
        assert_eq!(log.executables, [("sensors".to_string(), 101), ("fixture".to_string(), 0)]);
        assert_eq!((log.passed, log.failed, log.ignored), (5, 1, 1));
        assert_eq!(log.failed_tests, ["sensors: vm_kprobe_backend"]);
        assert_eq!(log.failed_executables(), ["sensors"]);
        assert_eq!(log.setup_error, None);
    }

    #[test]
    fn setup_failures_are_kept() {
        let log = feed("ctguard-vm: guest setup failed: cannot mount the host's root (9p tag hostroot)\n");
        assert_eq!(log.setup_error.as_deref(), Some("cannot mount the host's root (9p tag hostroot)"));
    }

    #[test]
    fn executable_names_lose_the_hash() {
        assert_eq!(executable_name("/w/target/debug/deps/table_full-cd5bcefc0cd943e8"), "table_full");
        assert_eq!(executable_name("/usr/bin/my-tool"), "my-tool");
    }
}
