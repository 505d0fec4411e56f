//! `cargo xtask demo`: set up, build ctguard in release mode, show what this
//! kernel allows (`ctguard doctor`), then run the lab: a throw-away conntrack
//! table filled, every drop caught and explained, the fix applied
//! (`ctguard lab`, non-interactive unless stdin is a terminal).
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::util::{self, cmd, note, step};

/// ctguard's exit codes: 0 ok, 1 warning, 2 error.
const WARNING: i32 = 1;

pub fn run() -> Result<ExitCode> {
    crate::setup::run()?;

    let root = util::workspace_root();
    step("demo 1/3: building ctguard (release)");
    // The lab waits for Enter between acts only when a person is watching.
    let lab: &[&str] =
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) { &["lab"] } else { &["lab", "--script"] };
    util::run(cmd(util::cargo(), ["build", "--release", "-p", "ctguard"]).current_dir(&root))?;
    let ctguard = root.join("target/release/ctguard");

    if !util::is_root() {
        note("note: not running as root; ctguard needs root (or CAP_BPF, CAP_PERFMON and");
        note("CAP_NET_ADMIN) to load its probes and enter network namespaces, so expect errors");
    }

    let runs: [(&str, &[&str]); 2] = [("doctor", &["doctor"]), ("lab", lab)];
    let mut warned = false;
    for (i, (name, args)) in runs.iter().enumerate() {
        step(format!("demo {}/3: ctguard {}", i + 2, args.join(" ")));
        let st = util::status(cmd(&ctguard, *args).current_dir(&root))
            .with_context(|| format!("could not run {}", ctguard.display()))?;
        match st.code() {
            Some(0) => {}
            Some(WARNING) => {
                warned = true;
                note(format!("ctguard {name} exited 1: a warning, not an error; continuing"));
            }
            Some(code) => {
                eprintln!("xtask: demo: `ctguard {}` failed with exit status {code}", args.join(" "));
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(2)));
            }
            None => anyhow::bail!("`ctguard {}` was {}", args.join(" "), util::describe(st)),
        }
    }
    step(if warned { "demo: done (with warnings, see above)" } else { "demo: done" });
    Ok(ExitCode::SUCCESS)
}
