//! `ctguard recommend` and `ctguard rollback`: sizing advice for
//! nf_conntrack (max, buckets, timeouts) from RAM, the kernel's own
//! defaults and the observed churn, with a safe `--apply` and its rollback.
//!
//! Pure: [`formulas`] (classic runbook, kernel defaults, Little's law,
//! memory), [`demand`] (rates and demand from observations), [`plan`]
//! (decisions and validation) and [`report`] (rendering). I/O: [`gather`]
//! (host facts and current settings), [`observe`] (sensors or a `top`
//! file), [`apply`] (writing and restoring) and [`state`] (the rollback file).
pub mod apply;
pub mod demand;
pub mod formulas;
pub mod gather;
pub mod observe;
pub mod plan;
pub mod report;
pub mod state;

use std::{io::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use self::plan::{Input, Overrides};
use crate::error::CtguardError;

// The teaching text lives in after_long_help: the subcommand's doc comment in
// cli.rs sets about/long_about and would hide a long_about given here.
#[derive(Debug, clap::Args)]
#[command(
    after_long_help = "Sizing advice for nf_conntrack, every figure with its reason, side by side:\n\
\n\
* the classic runbook formula: max = RAM / 16384 / (ARCH/32) (64-bit: RAM / 32 KiB), buckets = max/8 (up to max/2);\n\
* the kernel's own default for this host (5.15+): buckets = RAM / 128 KiB, set to 65536 above 1 GiB and 262144\n  \
above 4 GiB (64-bit), at least 1024; max = buckets (8 x hashsize when hashsize= is given);\n\
* the demand, by Little's law: entries ≈ Σ new entries/s x lifetime under the current timeouts (udp: udp_timeout;\n  \
tcp: tcp_timeout_time_wait, as short connections end in TIME_WAIT; icmp: icmp_timeout; others: generic_timeout),\n  \
measured with --observe or read from a `ctguard top --json` file with --from-top, never below what each\n  \
namespace's table holds now; times --headroom.\n\
\n\
The recommendation keeps a current value that is already enough, never goes below the current count and never\n\
costs more than 1/4 of RAM (slab object size x max + 8 B x buckets). Shorter timeouts are proposed with what\n\
each would free, and NOTRACK (`ctguard bypass add --port P`) when one port makes most of the churn.\n\
\n\
Without --apply nothing is written: the report ends with the diff (current -> proposed) for every knob.\n\
--apply writes the changes to the running kernel from the initial network namespace, after saving the\n\
previous values in the state file (mode 0600); `ctguard rollback` restores them byte for byte.\n\
\n\
Examples:\n  \
ctguard recommend                                 # RAM, defaults and current counts only\n  \
ctguard recommend --observe 60s                   # measure churn for a minute first (root, eBPF)\n  \
ctguard top --json --duration 5m > top.jsonl; ctguard recommend --from-top top.jsonl\n  \
ctguard recommend --emit                          # sysctl.d and modprobe.d files\n  \
ctguard recommend --apply --max 524288 --timeout time_wait=30\n  \
ctguard rollback\n\n\
Exit codes: 0 ok, 2 error or refused value (nothing written).",
    after_help = "Exit codes: 0 ok, 2 error or refused value (nothing written). --help explains the formulas."
)]
pub struct RecommendArgs {
    /// Measure churn for this long first (e.g. 60s, 5m): the eBPF sensors count every new entry by destination
    /// port and protocol, once a second, giving per-protocol rates. Peak = the busiest stretch one lifetime long
    /// (the whole window when it is shorter). Needs root.
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration, conflicts_with = "from_top")]
    pub observe: Option<Duration>,
    /// Take the rates from saved `ctguard top --json` output (one document per line; use `--by dst-port`, the
    /// default, so protocols are known), or from a `ctguard capture` bundle directory (its stats.jsonl). Peak =
    /// the busiest stretch of documents one lifetime long, mean = over all of them; the tables' entry counts in the
    /// file are a floor.
    #[arg(long, value_name = "FILE|BUNDLE")]
    pub from_top: Option<PathBuf>,
    /// Which kernel hooks to use for --observe (see `ctguard doctor`).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: crate::sensors::backend::BackendRequest,
    /// Size the table for this many times the peak demand (at least 1).
    #[arg(long, value_name = "FACTOR", default_value_t = 2.0, value_parser = parse_headroom)]
    pub headroom: f64,
    /// Use this net.netfilter.nf_conntrack_max instead of the recommended one. Refused (exit 2, nothing written)
    /// when 0, above INT_MAX, below the entries a namespace holds now (max applies to each namespace's own
    /// count), or when a full table would take more than 1/4 of RAM.
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,
    /// Use this many hash buckets instead of the recommended number (a power of two is best; the kernel rounds up
    /// to a multiple of 512). Applied through /sys/module/nf_conntrack/parameters/hashsize.
    #[arg(long, value_name = "N")]
    pub buckets: Option<u64>,
    /// Set a timeout: NAME=SECS, NAME as `ctguard status` shows it (tcp_timeout_time_wait), as the sysctl
    /// (net.netfilter.nf_conntrack_udp_timeout) or a unique short form (time_wait, udp). Repeatable.
    #[arg(long = "timeout", value_name = "NAME=SECS", value_parser = parse_timeout_override)]
    pub timeouts: Vec<TimeoutOverride>,
    /// Print one JSON document (schema "ctguard.recommend.v1") instead of the report.
    #[arg(long, conflicts_with = "emit")]
    pub json: bool,
    /// Print the ready-to-install files instead of the report: /etc/sysctl.d/90-ctguard-conntrack.conf and
    /// /etc/modprobe.d/ctguard-conntrack.conf, each after a `# ==> PATH <==` line.
    #[arg(long)]
    pub emit: bool,
    /// Write the changes to the running kernel (initial network namespace only, as root), after saving the
    /// current values in --state-file for `ctguard rollback`.
    #[arg(long)]
    pub apply: bool,
    /// With --apply: go ahead although an earlier --apply has not been rolled back. The state keeps the
    /// earliest saved values, so a rollback still returns to the settings before the first apply.
    #[arg(long, requires = "apply")]
    pub force: bool,
    /// Where --apply saves the values it replaces.
    #[arg(long, value_name = "PATH", env = "CTGUARD_STATE_FILE", default_value = state::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

#[derive(Debug, clap::Args)]
#[command(
    after_long_help = "Writes back, byte for byte, every setting `ctguard recommend --apply` replaced \
(nf_conntrack_max, the hash table size, timeouts), reads each back to check, and removes the state file \
once all are restored. Runs from the initial network namespace only, as root.\n\n\
If some setting cannot be restored the state file is kept, so the rollback can be retried.\n\n\
Exit codes: 0 restored, 2 error (nothing saved, or a value could not be restored).",
    after_help = "Exit codes: 0 restored, 2 error (nothing saved, or a value could not be restored)."
)]
pub struct RollbackArgs {
    /// Show what would be restored; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The state file `recommend --apply` wrote.
    #[arg(long, value_name = "PATH", env = "CTGUARD_STATE_FILE", default_value = state::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

/// `--timeout NAME=SECS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeoutOverride {
    pub name: String,
    pub secs: u64,
}

fn parse_timeout_override(s: &str) -> Result<TimeoutOverride, String> {
    let (name, secs) =
        s.split_once('=').ok_or_else(|| format!("`{s}` is not NAME=SECS (e.g. tcp_timeout_time_wait=30)"))?;
    let secs = secs.trim().trim_end_matches('s');
    let secs = secs.parse().map_err(|_| format!("`{secs}` in `{s}` is not a number of seconds"))?;
    if name.trim().is_empty() {
        return Err(format!("`{s}` has no timeout name (e.g. udp_timeout=10)"));
    }
    Ok(TimeoutOverride { name: name.trim().to_string(), secs })
}

fn parse_headroom(s: &str) -> Result<f64, String> {
    let v: f64 =
        s.trim().trim_end_matches(['x', 'X']).parse().map_err(|_| format!("`{s}` is not a number (e.g. 2 or 1.5)"))?;
    if !v.is_finite() || !(1.0..=1000.0).contains(&v) {
        return Err(format!(
            "headroom {s} must be between 1 and 1000: below 1 the table would be sized under the demand"
        ));
    }
    Ok(v)
}

pub fn run(args: &RecommendArgs) -> anyhow::Result<ExitCode> {
    let host = gather::host()?;
    let (current, namespaces, skipped) = gather::current()?;
    let observation = match (&args.observe, &args.from_top) {
        (Some(window), _) => Some(observe::with_sensors(*window, args.backend)?),
        (None, Some(path)) => Some(observe::from_top_file(path)?),
        (None, None) => None,
    };
    let overrides = Overrides {
        max: args.max,
        buckets: args.buckets,
        timeouts: args.timeouts.iter().map(|t| (t.name.clone(), t.secs)).collect(),
    };
    let plan = plan::plan(&Input {
        host: &host,
        current: &current,
        observation: observation.as_ref(),
        headroom: args.headroom,
        overrides: &overrides,
    });
    if !plan.refusals.is_empty() {
        return Err(refused(&plan.refusals).into());
    }
    let netns = apply::initial_netns();
    let applied = if args.apply {
        apply::require_initial_netns("--apply")?;
        let changes: Vec<_> = plan.effective_changes().collect();
        Some(apply::apply(&changes, &apply::Paths::system(), &args.state_file, args.force)?)
    } else {
        None
    };
    let ctx = report::Context {
        host: &host,
        current: &current,
        namespaces: &namespaces,
        namespaces_skipped: skipped,
        observation: observation.as_ref(),
        plan: &plan,
        netns: &netns,
        applied: applied.as_deref(),
        state_file: &args.state_file,
    };
    let text = if args.emit {
        report::emit(&plan, &host)
    } else if args.json {
        report::json(&ctx)
    } else {
        report::text(&ctx)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    if args.emit && applied.as_ref().is_some_and(|a| !a.is_empty()) {
        eprintln!(
            "applied {} change(s); previous values saved in {}",
            applied.as_ref().map_or(0, Vec::len),
            args.state_file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// All refusals as one error: each value with its reason, the hints after.
fn refused(refusals: &[plan::Refusal]) -> CtguardError {
    let what = refusals
        .iter()
        .map(|r| format!("refused {} = {}: {}", r.knob, r.value, r.reason))
        .collect::<Vec<_>>()
        .join("\n");
    let mut hints: Vec<&str> = refusals.iter().map(|r| r.hint.as_str()).collect();
    hints.dedup();
    CtguardError::usage(format!("{what}\nnothing was written"), hints.join("; "))
}

pub fn rollback(args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let Some(saved) = state::load(&args.state_file)? else {
        return Err(CtguardError::usage(
            format!("nothing to roll back: {} does not exist", args.state_file.display()),
            "`ctguard recommend --apply` saves the values it replaces there; a successful rollback removes it",
        )
        .into());
    };
    apply::require_initial_netns("rollback")?;
    let mut notes = Vec::new();
    if let (Some(then), Some(now)) = (&saved.boot_id, state::boot_id())
        && *then != now
    {
        notes.push("the host rebooted since --apply: the kernel already started from its defaults; the saved values were written anyway".into());
    }
    let restored = apply::rollback(&saved, args.dry_run);
    let failed: Vec<_> = restored.iter().filter(|r| r.error.is_some()).collect();
    if !args.dry_run && failed.is_empty() {
        state::remove(&args.state_file)?;
        notes.push(format!("removed {}", args.state_file.display()));
    }
    let text = if args.json {
        serde_json::to_string_pretty(&serde_json::json!({
            "schema": "ctguard.rollback-result.v1",
            "dry_run": args.dry_run,
            "state_file": args.state_file,
            "restored": restored,
            "notes": notes,
        }))? + "\n"
    } else {
        report::rollback_text(&saved, &restored, args.dry_run, &args.state_file, &notes)
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    if !failed.is_empty() {
        return Err(CtguardError::usage(
            format!(
                "{} of {} setting(s) could not be restored: {}",
                failed.len(),
                restored.len(),
                failed
                    .iter()
                    .map(|r| format!("{} ({})", r.sysctl, r.error.as_deref().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            format!(
                "the state file {} is kept: fix the cause and run `ctguard rollback` again",
                args.state_file.display()
            ),
        )
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_overrides_parse() {
        assert_eq!(
            parse_timeout_override("udp_timeout=10").unwrap(),
            TimeoutOverride { name: "udp_timeout".into(), secs: 10 }
        );
        assert_eq!(parse_timeout_override("time_wait=30s").unwrap().secs, 30);
        assert!(parse_timeout_override("bogus").unwrap_err().contains("NAME=SECS"));
        assert!(parse_timeout_override("udp=ten").unwrap_err().contains("seconds"));
        assert!(parse_timeout_override("=5").unwrap_err().contains("no timeout name"));
    }

    #[test]
    fn headroom_parses() {
        assert_eq!(parse_headroom("2").unwrap(), 2.0);
        assert_eq!(parse_headroom("1.5x").unwrap(), 1.5);
        assert!(parse_headroom("0.5").unwrap_err().contains("between 1"));
        assert!(parse_headroom("nan").is_err());
    }
}
