//! Building on the host what the guest runs: the ctguard binary and the
//! integration test executables (the guest never compiles: under TCG that
//! would take forever).
use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cmd, note};

/// The package whose test executables the guest runs.
pub const TEST_PACKAGE: &str = "ctguard-integration";

/// One test executable cargo built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestExe {
    /// `sensors` (test target) or `ctguard_integration` (unit tests of the lib).
    pub target: String,
    pub path: PathBuf,
}

/// What the guest needs from the host build.
#[derive(Clone, Debug)]
pub struct HostBuild {
    pub ctguard: PathBuf,
    pub test_exes: Vec<TestExe>,
}

pub fn build(workspace: &Path) -> Result<HostBuild> {
    util::run(cmd(util::cargo(), ["build", "-p", "ctguard"]).current_dir(workspace))
        .context("building ctguard on the host failed")?;
    let ctguard = workspace.join("target/debug/ctguard");
    if !util::is_executable(&ctguard) {
        bail!(
            "`cargo build -p ctguard` succeeded but {} is not there (is CARGO_TARGET_DIR set? \
             vm-test expects the workspace's target/ directory)",
            ctguard.display()
        );
    }

    let mut c =
        cmd(util::cargo(), ["test", "-p", TEST_PACKAGE, "--no-run", "--message-format=json-render-diagnostics"]);
    c.current_dir(workspace);
    eprintln!("    $ {}", util::display(&c));
    // JSON on stdout (parsed), cargo's progress and diagnostics on stderr (shown).
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", util::display(&c)))?;
    let mut json = String::new();
    child.stdout.take().expect("piped stdout").read_to_string(&mut json).context("reading cargo's JSON messages")?;
    let st = child.wait().context("waiting for cargo")?;
    if !st.success() {
        bail!("building the integration tests on the host failed (`{}`: {})", util::display(&c), util::describe(st));
    }
    let test_exes = test_executables(&json)?;
    if test_exes.is_empty() {
        bail!("`{}` reported no test executable", util::display(&c));
    }
    for t in &test_exes {
        note(format!("test executable {}: {}", t.target, t.path.display()));
    }
    Ok(HostBuild { ctguard, test_exes })
}

/// The test executables in `cargo test --no-run --message-format=json`
/// output: `compiler-artifact` messages with an executable and a test profile.
/// In `cargo test`'s order: the library's unit tests first, then by name
/// (cargo reports them in the order they finished building).
pub fn test_executables(json_lines: &str) -> Result<Vec<TestExe>> {
    let mut exes = Vec::new();
    for (i, line) in json_lines.lines().enumerate() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        let msg: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo's JSON message {} is not valid JSON", i + 1))?;
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(path) = msg["executable"].as_str() else {
            continue;
        };
        let target = msg["target"]["name"].as_str().unwrap_or("?").to_string();
        let is_lib = msg["target"]["kind"].as_array().is_some_and(|kinds| kinds.iter().any(|k| k == "lib"));
        let exe = TestExe { target, path: PathBuf::from(path) };
        if !exes.iter().any(|(_, e)| *e == exe) {
            exes.push((!is_lib, exe));
        }
    }
    exes.sort_by(|(a_not_lib, a), (b_not_lib, b)| a_not_lib.cmp(b_not_lib).then_with(|| a.target.cmp(&b.target)));
    Ok(exes.into_iter().map(|(_, e)| e).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_test_executables_are_taken() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/ctguard#0.1.0","target":{"kind":["lib"],"name":"ctguard"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"ctguard"},"profile":{"test":false},"executable":"/w/target/debug/ctguard"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"ctguard_integration"},"profile":{"test":true},"executable":"/w/target/debug/deps/ctguard_integration-1"}
{"reason":"compiler-message","message":{"rendered":"warning"}}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"sensors"},"profile":{"test":true},"executable":"/w/target/debug/deps/sensors-2"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"sensors"},"profile":{"test":true},"executable":"/w/target/debug/deps/sensors-2"}
{"reason":"build-finished","success":true}
"#;
        let exes = test_executables(json).unwrap();
        assert_eq!(
            exes,
            [
                TestExe {
                    target: "ctguard_integration".into(),
                    path: "/w/target/debug/deps/ctguard_integration-1".into()
                },
                TestExe { target: "sensors".into(), path: "/w/target/debug/deps/sensors-2".into() },
            ]
        );
    }

    #[test]
    fn broken_json_is_an_error_and_other_lines_are_ignored() {
        assert!(test_executables("{not json").is_err());
        assert!(test_executables("   Compiling x\n\n").unwrap().is_empty());
    }
}
