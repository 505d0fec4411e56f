//! `ctguard bypass` from the command line, without touching the kernel:
//! help, selector errors, and `--ruleset FILE` (analysis and dry runs
//! against a saved `nft -j list ruleset`). The privileged tests with real
//! nftables are in tests/tests/bypass.rs.
use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Output},
};

fn ctguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctguard")).args(args).output().expect("run ctguard")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/bypass/fixtures").join(name).display().to_string()
}

/// A file holding `content`, deleted when dropped.
fn file(content: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f
}

const EMPTY_RULESET: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}]}"#;

/// Inside `mod bypass` so that `cargo test -p ctguard bypass` runs them.
mod bypass {
    use super::*;

    #[test]
    fn help_teaches_what_bypass_does_and_what_it_breaks() {
        let o = ctguard(&["bypass", "--help"]);
        assert_eq!(code(&o), 0);
        let out = text(&o.stdout);
        for needle in [
            "iptables -t raw -A PREROUTING -p tcp -m multiport --dports 80,15000 -j NOTRACK",
            "ctguard bypass add --proto tcp --port 80,15000",
            "table inet ctguard",
            "never NATed",
            "ct state established,related accept",
            "single nft transaction",
            "Exit codes: 0 ok; 1",
            "add",
            "list",
            "remove",
            "suggest",
        ] {
            assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
        }
        let o = ctguard(&["bypass", "add", "--help"]);
        assert_eq!(code(&o), 0);
        let out = text(&o.stdout);
        for needle in [
            "--port <PORTS>",
            "8000-8100",
            "[default: tcp,udp]",
            "--direction <DIRECTION>",
            "in = requests",
            "--dry-run",
            "--force",
            "--netns",
            "--ruleset",
        ] {
            assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
        }
        // No subcommand: the help, as a usage error.
        let o = ctguard(&["bypass"]);
        assert_eq!(code(&o), 2);
        assert!(text(&o.stderr).contains("Usage: ctguard bypass"), "{}", text(&o.stderr));
    }

    #[test]
    fn dry_run_prints_the_exact_ruleset_for_the_seed_example() {
        let rs = file(EMPTY_RULESET);
        let o = ctguard(&[
            "bypass",
            "add",
            "--proto",
            "tcp",
            "--port",
            "80,15000",
            "--ruleset",
            rs.path().to_str().unwrap(),
        ]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        let c = "--proto tcp --port 80,15000 --direction both";
        let expected = [
            format!("# ctguard bypass add {c} (id 37ec144b): nft -f equivalent of the JSON piped to `nft -j -f -`"),
            "add table inet ctguard".into(),
            "add chain inet ctguard prerouting { type filter hook prerouting priority raw; policy accept; }".into(),
            "add chain inet ctguard output { type filter hook output priority raw; policy accept; }".into(),
            format!("add rule inet ctguard prerouting tcp dport {{ 80, 15000 }} counter notrack comment \"ctguard 37ec144b request {c}\""),
            format!("add rule inet ctguard prerouting tcp sport {{ 80, 15000 }} counter notrack comment \"ctguard 37ec144b reply {c}\""),
            format!("add rule inet ctguard output tcp dport {{ 80, 15000 }} counter notrack comment \"ctguard 37ec144b request {c}\""),
            format!("add rule inet ctguard output tcp sport {{ 80, 15000 }} counter notrack comment \"ctguard 37ec144b reply {c}\""),
        ]
        .map(|l: String| l + "\n")
        .concat();
        assert_eq!(text(&o.stdout), expected);
        assert!(text(&o.stderr).contains("dry run: nothing was applied"), "{}", text(&o.stderr));

        // --json carries the exact document piped to `nft -j -f -`.
        let o = ctguard(&[
            "bypass",
            "add",
            "--proto",
            "tcp",
            "--port",
            "80,15000",
            "--ruleset",
            rs.path().to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(code(&o), 0);
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["schema"], "ctguard.bypass.add.v1");
        assert_eq!(doc["status"], "dry_run");
        assert_eq!(doc["id"], "37ec144b");
        let cmds = doc["nft_json"]["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 7);
        assert_eq!(
            cmds[3],
            serde_json::json!({ "add": { "rule": {
                "family": "inet", "table": "ctguard", "chain": "prerouting",
                "expr": [
                    { "match": { "op": "==", "left": { "payload": { "protocol": "tcp", "field": "dport" } }, "right": { "set": [80, 15000] } } },
                    { "counter": null },
                    { "notrack": null }
                ],
                "comment": format!("ctguard 37ec144b request {c}")
            } } })
        );
    }

    #[test]
    fn bad_selectors_exit_2_with_a_clear_error() {
        let cases: &[(&[&str], &str)] = &[
            (&["--port", "0"], "port 0 in --port `0` is out of range"),
            (&["--port", "70000"], "out of range"),
            (&["--port", "90-80"], "runs backwards"),
            (&["--port", "http"], "`http` in --port `http` is not a port number"),
            (&["--port", "80,,81"], "empty element"),
            (&["--proto", "icmp", "--port", "80"], "icmp has no ports"),
            (&["--proto", "tcpp", "--port", "80"], "unknown protocol `tcpp`"),
            (&["--src", "10.0.0.0/8", "--dst", "fd00::/8"], "different IP versions"),
            (&["--src", "10.0.0.0/33"], "prefix `/33`"),
            (&["--dst", "nope"], "`nope` is not an IPv4 or IPv6 address"),
            (&["--port", "80", "--iface", "bad name"], "not an interface name"),
            (&["--proto", "udp"], "needs --port, --src or --dst"),
        ];
        for (args, expect) in cases {
            let mut full = vec!["bypass", "add"];
            full.extend_from_slice(args);
            let o = ctguard(&full);
            let err = text(&o.stderr);
            assert_eq!(code(&o), 2, "{args:?}: {err}");
            assert!(err.starts_with("error: invalid selector: "), "{args:?}: {err}");
            assert!(err.contains(expect), "{args:?}: `{expect}` missing: {err}");
            assert!(err.contains("\n  hint: "), "{args:?}: no hint: {err}");
            assert!(o.stdout.is_empty(), "{args:?}: printed {}", text(&o.stdout));
        }
        // Clap-level mistakes are usage errors too.
        let o = ctguard(&["bypass", "add", "--port", "80", "--direction", "sideways"]);
        assert_eq!(code(&o), 2);
        assert!(text(&o.stderr).contains("possible values: in, out, both"), "{}", text(&o.stderr));
        let o = ctguard(&["bypass", "remove", "abc", "--all"]);
        assert_eq!(code(&o), 2);
        let o = ctguard(&["bypass", "add", "--port", "80", "--netns", "all"]);
        assert_eq!(code(&o), 2);
        assert!(text(&o.stderr).contains("one namespace at a time"), "{}", text(&o.stderr));
    }

    #[test]
    fn conflicts_in_a_saved_ruleset_refuse_and_name_rule_and_fix() {
        let hardened = fixture("hardened.json");
        let o = ctguard(&["bypass", "add", "--proto", "tcp", "--port", "80", "--ruleset", &hardened]);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 2, "{err}");
        for needle in [
            "CONFLICT [nat] table ip nat chain postrouting handle 4:\n    ip saddr 172.17.0.0/16 oifname \"eth0\" masquerade",
            "CONFLICT [ct-state] table inet filter chain input handle 8:\n    tcp dport 80 ct state new accept",
            "fix: nft insert rule inet filter input position 8 ct state untracked tcp dport 80 accept",
            "CONFLICT [ct-state] table inet filter chain input handle 4:\n    ct state established,related accept",
            "fix: nft insert rule inet filter input position 4 ct state untracked tcp sport 80 accept",
            "error: refusing to add this bypass: 3 conflict(s)",
            "--force",
        ] {
            assert!(err.contains(needle), "`{needle}` missing from:\n{err}");
        }
        // --force: the same report, exit 1 (the dry run still applies nothing).
        let o = ctguard(&["bypass", "add", "--proto", "tcp", "--port", "80", "--ruleset", &hardened, "--force"]);
        assert_eq!(code(&o), 1, "{}", text(&o.stderr));
        assert!(text(&o.stdout).contains("add rule inet ctguard prerouting tcp dport 80 counter notrack"));
        // JSON lists the conflicts.
        let o = ctguard(&["bypass", "add", "--proto", "tcp", "--port", "80", "--ruleset", &hardened, "--json"]);
        assert_eq!(code(&o), 2);
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["status"], "refused");
        let kinds: Vec<&str> =
            doc["conflicts"].as_array().unwrap().iter().map(|c| c["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["nat", "ct_state", "ct_state"]);
        // A ruleset that already accepts untracked packets: nothing to report.
        let o = ctguard(&[
            "bypass",
            "add",
            "--proto",
            "tcp",
            "--port",
            "80,15000",
            "--ruleset",
            &fixture("untracked_ok.json"),
        ]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        assert!(!text(&o.stderr).contains("CONFLICT"));
    }

    /// A saved listing holding bypass `--proto udp --port 53` with counters.
    fn listing_with_dns_bypass() -> String {
        let rs = file(EMPTY_RULESET);
        let o = ctguard(&[
            "bypass",
            "add",
            "--proto",
            "udp",
            "--port",
            "53",
            "--ruleset",
            rs.path().to_str().unwrap(),
            "--json",
        ]);
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut items = vec![serde_json::json!({ "metainfo": { "version": "1.0.6" } })];
        for (i, cmd) in doc["nft_json"]["nftables"].as_array().unwrap().iter().enumerate() {
            let (kind, body) = cmd["add"].as_object().unwrap().iter().next().unwrap();
            let mut body = body.clone();
            body["handle"] = serde_json::json!(i + 1);
            if kind == "rule" {
                body["expr"][1] = serde_json::json!({ "counter": { "packets": 10 * i, "bytes": 1000 * i } });
            }
            items.push(serde_json::json!({ kind.clone(): body }));
        }
        serde_json::json!({ "nftables": items }).to_string()
    }

    #[test]
    fn list_and_remove_read_a_saved_ruleset() {
        let rs = file(&listing_with_dns_bypass());
        let path = rs.path().to_str().unwrap();
        let o = ctguard(&["bypass", "list", "--ruleset", path]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        let out = text(&o.stdout);
        assert!(out.contains("table inet ctguard: 1 bypass"), "{out}");
        // Rules 4..7 carry 30, 40, 50 and 60 packets.
        assert!(out.contains("--proto udp --port 53 --direction both"), "{out}");
        assert!(out.contains("180"), "{out}");
        assert!(
            out.contains(
                "prerouting request           30  handle 4     udp dport 53 counter packets 30 bytes 3000 notrack"
            ),
            "{out}"
        );
        let o = ctguard(&["bypass", "list", "--ruleset", path, "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["schema"], "ctguard.bypass.list.v1");
        let b = &doc["bypasses"][0];
        assert_eq!((b["packets"].as_u64(), b["complete"].as_bool()), (Some(180), Some(true)));
        assert_eq!(b["rules"].as_array().unwrap().len(), 4);
        assert_eq!(b["rules"][1]["half"], "reply");
        let id = b["id"].as_str().unwrap().to_string();

        // Removing the only bypass deletes the table.
        let o = ctguard(&["bypass", "remove", &id[..4], "--ruleset", path]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        assert!(text(&o.stdout).ends_with("\ndelete table inet ctguard\n"), "{}", text(&o.stdout));
        let o = ctguard(&["bypass", "remove", "--all", "--ruleset", path]);
        assert!(text(&o.stdout).ends_with("\ndelete table inet ctguard\n"));
        let o = ctguard(&["bypass", "remove", "deadbeef", "--ruleset", path]);
        assert_eq!(code(&o), 2);
        let err = text(&o.stderr);
        assert!(
            err.contains("no bypass deadbeef in table inet ctguard") && err.contains(&format!("installed: {id}")),
            "{err}"
        );
        // Nothing installed, nothing to do.
        let empty = file(EMPTY_RULESET);
        let o = ctguard(&["bypass", "list", "--ruleset", empty.path().to_str().unwrap()]);
        assert!(text(&o.stdout).contains("table inet ctguard does not exist"));
        let o = ctguard(&["bypass", "remove", "--all", "--ruleset", empty.path().to_str().unwrap()]);
        assert_eq!(code(&o), 0);
        assert!(text(&o.stdout).contains("nothing to remove"));
    }

    #[test]
    fn adding_an_installed_selector_changes_nothing() {
        let rs = file(&listing_with_dns_bypass());
        let o = ctguard(&["bypass", "add", "--port", "53", "--proto", "udp", "--ruleset", rs.path().to_str().unwrap()]);
        assert_eq!(code(&o), 0);
        assert!(text(&o.stdout).contains("is already installed; nothing changed"), "{}", text(&o.stdout));
    }

    #[test]
    fn suggest_reads_top_json_and_prints_the_commands() {
        use std::os::unix::fs::MetadataExt;
        let me = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let doc = |interval: f64, rate: f64| {
            serde_json::json!({
                "schema": "ctguard.top.v1", "time_unix_ms": 0, "key_mode": "dst-port", "interval_s": interval,
                "keys": [
                    { "netns": me, "key": "5000/udp", "inserts_per_s": rate, "share_percent": 90.0 },
                    { "netns": me, "key": "443/tcp", "inserts_per_s": 1.0, "share_percent": 1.0 }
                ]
            })
            .to_string()
        };
        let f = file(&format!("{}\n{}\n", doc(1.0, 800.0), doc(1.0, 1200.0)));
        let o = ctguard(&["bypass", "suggest", "--from-top", f.path().to_str().unwrap(), "--json"]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let s = v["suggestions"].as_array().unwrap();
        assert_eq!(s.len(), 1, "443/tcp is below 5% of the new entries: {v}");
        assert_eq!(s[0]["key"], "5000/udp");
        assert_eq!(s[0]["inserts_per_s"], 1000.0);
        assert_eq!(s[0]["timeout"], "nf_conntrack_udp_timeout");
        let timeout = s[0]["timeout_s"].as_u64().unwrap();
        assert_eq!(s[0]["entries_saved"].as_u64(), Some(1000 * timeout));
        assert_eq!(s[0]["command"], "ctguard bypass add --proto udp --port 5000");
        let o = ctguard(&["bypass", "suggest", "--from-top", f.path().to_str().unwrap()]);
        let out = text(&o.stdout);
        assert!(out.contains("5000/udp") && out.contains("    ctguard bypass add --proto udp --port 5000\n"), "{out}");
        let bad = file("{\"schema\": \"something else\"}");
        let o = ctguard(&["bypass", "suggest", "--from-top", bad.path().to_str().unwrap()]);
        assert_eq!(code(&o), 2);
        assert!(text(&o.stderr).contains("ctguard top --json"), "{}", text(&o.stderr));
    }
}
