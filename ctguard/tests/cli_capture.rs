//! `ctguard capture` through the built binary, without privileges: bad
//! trigger expressions are refused with the column and the token expected
//! there, exit 2, and nothing is touched (no sensors, no bundle directory, the
//! wrapped command never runs); `--help` teaches the syntax.
use std::{
    path::Path,
    process::{Command, Output},
};

fn ctguard_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctguard")).args(args).current_dir(dir).output().expect("run ctguard")
}

/// Runs a capture with `triggers` wrapping `touch ran` in a fresh directory,
/// once with the default --dir and once with an explicit one; checks that
/// nothing was created either time and returns the (exit code, stderr) of
/// both, which must agree.
fn refused(triggers: &[&str]) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let explicit = tmp.path().join("explicit-dir");
    let explicit_s = explicit.to_str().unwrap().to_string();
    let mut results = Vec::new();
    for dir_args in [vec![], vec!["--dir", explicit_s.as_str()]] {
        let mut args = vec!["capture"];
        for t in triggers {
            args.extend(["--trigger", t]);
        }
        args.extend(dir_args);
        args.extend(["--", "touch", "ran"]);
        let out = ctguard_in(tmp.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!tmp.path().join("ctguard-captures").exists(), "the default bundle directory was created: {stderr}");
        assert!(!explicit.exists(), "--dir was created: {stderr}");
        assert!(!tmp.path().join("ran").exists(), "the wrapped command ran: {stderr}");
        assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
        results.push((out.status.code(), stderr));
    }
    assert_eq!(results[0], results[1], "--dir does not change the verdict");
    results.remove(0)
}

#[test]
fn the_documented_example_error() {
    let (code, err) = refused(&["drops/s>>5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("error: trigger `drops/s>>5`: at column 8: expected a number\n"), "{err}");
    // A caret under column 8.
    assert!(err.contains("\n    drops/s>>5\n            ^\n"), "{err}");
    assert!(err.contains("hint:") && err.contains("ctguard capture --help"), "{err}");
}

#[test]
fn bad_expressions_name_the_column_and_what_was_expected() {
    let cases: [(&str, usize, &str); 12] = [
        (
            "",
            0,
            "expected a metric (fill, drops, inserts, early_drop, table_full, insert_failed, ct_invalid, ruleset, other)",
        ),
        ("tabel_full>0", 0, "unknown metric `tabel_full`; expected one of fill, drops,"),
        ("fill/s>90", 4, "fill is a level, `/s` does not apply to it"),
        ("drops/x>5", 6, "expected `s` after `/` (per second), found `x`"),
        ("drops", 5, "expected `[`, `/s` or a comparison (>, >=, <, <=), found end of trigger"),
        ("fill[lb>90", 7, "expected `]` to close the selector opened at column 4"),
        ("fill[]>90", 5, "expected a network namespace"),
        ("drops/s>", 8, "expected a number"),
        ("drops/s>5%", 9, "`%` only applies to fill"),
        ("fill>101%", 5, "expected a percentage from 0 to 100"),
        ("inserts/s>50000 extra", 16, "expected end of trigger, found `e`"),
        ("drops>1 > 2", 8, "write one comparison per --trigger"),
    ];
    for (expr, column, expected) in cases {
        let (code, err) = refused(&[expr]);
        assert_eq!(code, Some(2), "`{expr}`: {err}");
        let head = format!("error: trigger `{expr}`: at column {column}: ");
        assert!(err.starts_with(&head), "`{expr}`: expected `{head}...`, got:\n{err}");
        assert!(err.lines().next().unwrap().contains(expected), "`{expr}`: expected `{expected}` in:\n{err}");
    }
}

#[test]
fn one_bad_trigger_among_good_ones_is_named() {
    let (code, err) = refused(&["table_full>0", "fill>90%", "ct_invalid/s>>1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("error: trigger `ct_invalid/s>>1`: at column 13: expected a number"), "{err}");
}

#[test]
fn a_missing_trigger_or_a_bad_option_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ctguard_in(tmp.path(), &["capture", "--", "touch", "ran"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trigger <EXPR>"));
    let out =
        ctguard_in(tmp.path(), &["capture", "--trigger", "table_full>0", "--snap-bytes", "300", "--", "touch", "ran"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--snap-bytes"));
    let out =
        ctguard_in(tmp.path(), &["capture", "--trigger", "table_full>0", "--until", "25:00", "--", "touch", "ran"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
    assert!(!tmp.path().join("ran").exists());
    assert!(!tmp.path().join("ctguard-captures").exists());
}

#[test]
fn help_teaches_the_trigger_syntax() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ctguard_in(tmp.path(), &["capture", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "trigger  = metric op number [ \"%\" ]",
        "metric   = name [ selector ] [ \"/s\" [ selector ] ]",
        "cause    = table_full | insert_failed | ct_invalid | ruleset | other",
        "op       = > | >= | < | <=",
        "--trigger 'table_full>0'",
        "--trigger 'fill>90%'",
        "--trigger 'drops/s>100'",
        "--trigger 'inserts/s>50k'",
        "--trigger 'early_drop/s>10'",
        "Exit status: 3 when a trigger fired",
        "128+signal",
        "drops.pcapng",
        "summary.md",
        "--pre-max-events",
        "--snap-bytes",
        "--until <HH:MM[:SS]>",
    ] {
        assert!(help.contains(needle), "--help lacks `{needle}`:\n{help}");
    }
    let short = ctguard_in(tmp.path(), &["capture", "-h"]);
    let short = String::from_utf8_lossy(&short.stdout);
    assert!(short.contains("Trigger syntax: NAME[NETNS][/s] OP NUMBER[%]"), "{short}");
    let top = ctguard_in(tmp.path(), &["--help"]);
    assert!(String::from_utf8_lossy(&top.stdout).contains("capture"), "listed among the commands");
}
