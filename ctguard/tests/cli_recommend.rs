//! `ctguard recommend` and `ctguard rollback` through the built binary.
//!
//! None of these writes a kernel setting: refused values must leave
//! everything as it was (checked by reading the sysctls before and after),
//! and every run uses its own --state-file in a temporary directory. They
//! need conntrack loaded in the test's namespace to get past reading the
//! current settings; where it is not, they check for the exit-2 error with
//! a hint instead.
//!
//! The tests sit in `mod recommend` so `cargo test -p ctguard recommend` selects them.

mod recommend {
    use std::{
        collections::BTreeMap,
        path::{Path, PathBuf},
        process::{Command, Output},
    };

    const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";

    fn ctguard(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ctguard"))
            .args(args)
            .env_remove("CTGUARD_STATE_FILE")
            .output()
            .expect("run ctguard")
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn conntrack_loaded() -> bool {
        Path::new(SYSCTL_DIR).join("nf_conntrack_max").exists()
    }

    /// Every nf_conntrack sysctl and the hashsize parameter, as text.
    fn settings() -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir(SYSCTL_DIR) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("nf_conntrack_")
                    && name != "nf_conntrack_count"
                    && let Ok(t) = std::fs::read_to_string(e.path())
                {
                    out.insert(e.path(), t);
                }
            }
        }
        let hashsize = PathBuf::from("/sys/module/nf_conntrack/parameters/hashsize");
        if let Ok(t) = std::fs::read_to_string(&hashsize) {
            out.insert(hashsize, t);
        }
        out
    }

    /// The privileged integration tests (tests/ crate) change global conntrack
    /// settings while holding an flock on this file; holding it too keeps the
    /// before/after comparisons here from seeing their changes. Best effort:
    /// without write access to /run there is nothing to lock (and those tests
    /// cannot run either).
    const TEST_LOCK: &str = "/run/ctguard-tests.lock";

    fn settings_lock() -> Option<std::fs::File> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(TEST_LOCK).ok()?;
        // SAFETY: flock on a file descriptor we own; released when `f` is closed.
        (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0).then_some(f)
    }

    /// Runs a command that must be refused: exit 2, a hint, and neither a state
    /// file nor a changed setting.
    fn assert_refused(args: &[&str], expect_in_stderr: &[&str]) -> String {
        let _lock = settings_lock();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("rollback.json");
        let before = settings();
        let mut all: Vec<&str> = args.to_vec();
        let state_arg = state.to_str().unwrap().to_string();
        all.extend(["--state-file", &state_arg]);
        let out = ctguard(&all);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: stdout {} stderr {stderr}", text(&out.stdout));
        assert!(stderr.contains("hint:"), "{args:?}: no hint in {stderr}");
        if conntrack_loaded() {
            for needle in expect_in_stderr {
                assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
            }
        }
        assert!(!state.exists(), "{args:?}: a state file was written");
        assert_eq!(settings(), before, "{args:?}: a setting changed");
        stderr
    }

    #[test]
    fn help_teaches_the_formulas_and_the_workflow() {
        let out = ctguard(&["recommend", "--help"]);
        assert!(out.status.success());
        let help = text(&out.stdout);
        for needle in [
            "RAM / 16384 / (ARCH/32)",
            "max/8",
            "RAM / 128 KiB",
            "262144",
            "Little's law",
            "tcp_timeout_time_wait",
            "1/4 of RAM",
            "ctguard bypass add --port P",
            "--observe <DURATION>",
            "--from-top <FILE|BUNDLE>",
            "--headroom <FACTOR>",
            "--max <N>",
            "--buckets <N>",
            "--timeout <NAME=SECS>",
            "--emit",
            "--apply",
            "--force",
            "--state-file <PATH>",
            "/var/lib/ctguard/rollback.json",
            "ctguard rollback",
            "Exit codes",
        ] {
            assert!(help.contains(needle), "`recommend --help` lacks {needle:?}:\n{help}");
        }
        let out = ctguard(&["rollback", "--help"]);
        assert!(out.status.success());
        let help = text(&out.stdout);
        for needle in ["byte for byte", "--dry-run", "--state-file", "initial network namespace"] {
            assert!(help.contains(needle), "`rollback --help` lacks {needle:?}:\n{help}");
        }
    }

    #[test]
    fn unknown_timeout_is_refused_with_the_valid_names() {
        assert_refused(
            &["recommend", "--apply", "--timeout", "bogus=1"],
            &["`bogus` is not a conntrack timeout", "udp_timeout", "nothing was written"],
        );
    }

    #[test]
    fn zero_and_out_of_range_values_are_refused() {
        assert_refused(&["recommend", "--apply", "--max", "0"], &["removes the limit"]);
        assert_refused(&["recommend", "--apply", "--max", "3000000000"], &["INT_MAX"]);
        assert_refused(&["recommend", "--apply", "--buckets", "0"], &["EINVAL"]);
        assert_refused(&["recommend", "--apply", "--timeout", "udp_timeout=0"], &["0 s"]);
        // Far more than 1/4 of any test machine's RAM.
        assert_refused(&["recommend", "--apply", "--max", "2000000000"], &["1/4 of RAM"]);
        // Several at once: each is named.
        let stderr = assert_refused(
            &["recommend", "--apply", "--max", "0", "--timeout", "nope=5"],
            &["removes the limit", "`nope`"],
        );
        if conntrack_loaded() {
            assert_eq!(stderr.matches("refused ").count(), 2, "{stderr}");
        }
    }

    /// A `ctguard top --json` file whose table held 5000 entries: that count is
    /// a floor no --max may go below.
    fn top_file(dir: &Path, entries: u64, udp_per_s: f64, tcp_per_s: f64) -> PathBuf {
        let doc = |netns: u64| {
            serde_json::json!({
                "schema": "ctguard.top.v1",
                "time_unix_ms": 1,
                "key_mode": "dst-port",
                "interval_s": 1.0,
                "rates": {"new_per_s": udp_per_s + tcp_per_s, "removed_per_s": 0.0, "drops_per_s": {}, "early_drop_per_s": 0.0},
                "tables": [{"netns": netns, "label": "test", "entries": entries, "max": 262144, "buckets": 262144,
                            "fill_percent": 0.0, "trend": "steady", "growth_per_s": 0.0, "time_to_full_s": null}],
                "keys": [
                    {"netns": netns, "key": "53/udp", "inserts_per_s": udp_per_s, "share_percent": 0.0, "drops_per_s": 0.0, "removals_per_s": 0.0, "total_inserts": 0},
                    {"netns": netns, "key": "443/tcp", "inserts_per_s": tcp_per_s, "share_percent": 0.0, "drops_per_s": 0.0, "removals_per_s": 0.0, "total_inserts": 0}
                ],
                "keys_hidden": 0, "events_lost": 0, "key_overflow": 0
            })
            .to_string()
        };
        let path = dir.join("top.jsonl");
        let lines: Vec<String> = (0..60).map(|_| doc(4_026_599_999)).collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    }

    #[test]
    fn max_below_the_current_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let top = top_file(dir.path(), 5000, 10.0, 0.0);
        let top = top.to_str().unwrap();
        assert_refused(
            &["recommend", "--apply", "--from-top", top, "--max", "4999"],
            &["below the 5000 entries", "netns 4026599999"],
        );
        // At the count it is accepted (dry run: nothing written either way).
        if conntrack_loaded() {
            let out = ctguard(&["recommend", "--from-top", top, "--max", "5000"]);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            assert!(text(&out.stdout).contains("[override]"));
        }
    }

    #[test]
    fn malformed_arguments_exit_2() {
        for args in [
            &["recommend", "--timeout", "bogus"][..],
            &["recommend", "--timeout", "udp=ten"],
            &["recommend", "--headroom", "0.5"],
            &["recommend", "--observe", "1s", "--from-top", "x"],
            &["recommend", "--force"],
        ] {
            let out = ctguard(args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        }
    }

    #[test]
    fn json_parses_and_carries_every_figure() {
        let out = ctguard(&["recommend", "--json"]);
        if !conntrack_loaded() {
            assert_eq!(out.status.code(), Some(2));
            assert!(text(&out.stderr).contains("hint:"));
            return;
        }
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
        assert_eq!(doc["schema"], "ctguard.recommend.v1");
        for key in ["host", "current", "observation", "assumptions", "plan", "files", "apply"] {
            assert!(doc.get(key).is_some(), "missing {key}: {doc}");
        }
        let plan = &doc["plan"];
        for key in [
            "classic",
            "kernel_default",
            "demand",
            "sizing",
            "timeouts",
            "changes",
            "memory",
            "bypass",
            "warnings",
            "refusals",
        ] {
            assert!(plan.get(key).is_some(), "missing plan.{key}: {plan}");
        }
        let ram = doc["host"]["ram_bytes"].as_u64().unwrap();
        assert_eq!(plan["classic"]["max"].as_u64().unwrap(), ram / 16384 / 2, "64-bit classic formula");
        assert!(plan["kernel_default"]["max"].as_u64().unwrap() >= 1024);
        let changes = plan["changes"].as_array().unwrap();
        assert_eq!(changes[0]["sysctl"], "net.netfilter.nf_conntrack_max");
        assert_eq!(changes[1]["sysctl"], "net.netfilter.nf_conntrack_buckets");
        assert!(changes[0]["proposed"].as_u64().unwrap() >= doc["plan"]["sizing"]["current_entries"].as_u64().unwrap());
        assert_eq!(doc["apply"]["dry_run"], true);
        assert_eq!(doc["files"][0]["path"], "/etc/sysctl.d/90-ctguard-conntrack.conf");
    }

    #[test]
    fn churn_from_a_top_file_drives_the_plan() {
        if !conntrack_loaded() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 8000 udp/s x 30 s + 3000 tcp/s x 120 s = 600 000 entries; x2 headroom.
        let top = top_file(dir.path(), 1000, 8000.0, 3000.0);
        let out = ctguard(&["recommend", "--json", "--from-top", top.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let sizing = &doc["plan"]["sizing"];
        let (udp, tcp) = (
            doc["current"]["timeouts"]["udp_timeout"].as_u64().unwrap() as f64,
            doc["current"]["timeouts"]["tcp_timeout_time_wait"].as_u64().unwrap() as f64,
        );
        let expect = 8000.0 * udp + 3000.0 * tcp;
        let peak = sizing["peak_entries"].as_f64().unwrap();
        assert!((peak - expect).abs() < 1.0, "peak {peak}, expected {expect}");
        assert_eq!(sizing["busiest_netns"], 4_026_599_999u64);
        let max = doc["plan"]["changes"][0]["proposed"].as_u64().unwrap();
        assert!(
            max as f64 >= (2.0 * expect).min(sizing["cap"].as_f64().unwrap()),
            "max {max} for need {}",
            2.0 * expect
        );
        // 8000 / 11000 = 73 % of new entries on 53/udp.
        assert_eq!(doc["plan"]["bypass"]["port"], 53);
        assert_eq!(doc["plan"]["bypass"]["command"], "ctguard bypass add --proto udp --port 53 --netns 4026599999");

        let out = ctguard(&["recommend", "--from-top", top.to_str().unwrap()]);
        let report = text(&out.stdout);
        for needle in [
            "classic runbook",
            "kernel default",
            "observed demand",
            "udp_timeout",
            "frees ≈",
            "ctguard bypass add --proto udp --port 53 --netns 4026599999",
            "dry run",
        ] {
            assert!(report.contains(needle), "report lacks {needle:?}:\n{report}");
        }
    }

    #[test]
    fn emit_prints_both_files() {
        let out =
            ctguard(&["recommend", "--emit", "--max", "524288", "--buckets", "262144", "--timeout", "time_wait=30"]);
        if !conntrack_loaded() {
            assert_eq!(out.status.code(), Some(2));
            return;
        }
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let files = text(&out.stdout);
        assert!(files.starts_with("# ==> /etc/sysctl.d/90-ctguard-conntrack.conf <==\n"), "{files}");
        assert!(files.contains("\nnet.netfilter.nf_conntrack_max = 524288\n"), "{files}");
        assert!(files.contains("\nnet.netfilter.nf_conntrack_tcp_timeout_time_wait = 30\n"), "{files}");
        assert!(files.contains("# ==> /etc/modprobe.d/ctguard-conntrack.conf <==\n"), "{files}");
        assert!(files.contains("\noptions nf_conntrack hashsize=262144\n"), "{files}");
    }

    #[test]
    fn rollback_without_state_exits_2_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("none.json");
        let out = ctguard(&["rollback", "--state-file", state.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("nothing to roll back") && stderr.contains("hint:"), "{stderr}");
    }

    #[test]
    fn apply_refuses_an_existing_state_without_force() {
        if !conntrack_loaded() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("rollback.json");
        let saved = r#"{"schema":"ctguard.rollback.v1","created_unix_s":0,"updated_unix_s":0,"kernel_release":"x","boot_id":null,"entries":[]}"#;
        std::fs::write(&state, saved).unwrap();
        let _lock = settings_lock();
        let before = settings();
        // A value that differs from the current one, so there is something to write.
        let current: u64 =
            std::fs::read_to_string(Path::new(SYSCTL_DIR).join("nf_conntrack_max")).unwrap().trim().parse().unwrap();
        let max = (current + 1024).to_string();
        let out = ctguard(&["recommend", "--apply", "--max", &max, "--state-file", state.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        // Refused either for the state (root in the initial namespace) or for
        // lacking privileges; in both cases nothing changed.
        assert!(stderr.contains("hint:"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&state).unwrap(), saved, "the state file was touched");
        assert_eq!(settings(), before);
    }
}
