//! Rendering: the human report, the JSON document, the ready-to-install
//! sysctl.d / modprobe.d files, and the rollback summary. Pure.
use std::{fmt::Write as _, path::PathBuf};

use serde::Serialize;

use super::{
    apply::{Applied, NetnsCheck, Restored},
    demand::{Class, Observation},
    formulas,
    gather::NsSeen,
    plan::{Current, Host, Knob, Origin, Plan, group_thousands, human_bytes, round_entries},
    state::State,
};

pub const SYSCTL_D_PATH: &str = "/etc/sysctl.d/90-ctguard-conntrack.conf";
pub const MODPROBE_D_PATH: &str = "/etc/modprobe.d/ctguard-conntrack.conf";
pub const SCHEMA: &str = "ctguard.recommend.v1";

/// Everything one run knows, for rendering.
pub struct Context<'a> {
    pub host: &'a Host,
    pub current: &'a Current,
    pub namespaces: &'a [NsSeen],
    pub namespaces_skipped: usize,
    pub observation: Option<&'a Observation>,
    pub plan: &'a Plan,
    pub netns: &'a NetnsCheck,
    /// `Some` after `--apply`.
    pub applied: Option<&'a [Applied]>,
    pub state_file: &'a std::path::Path,
}

impl Context<'_> {
    fn label(&self, netns: u32) -> String {
        if netns == super::demand::UNATTRIBUTED_NETNS {
            return "unattributed".into();
        }
        self.namespaces
            .iter()
            .find(|n| n.inode == netns)
            .map_or_else(|| format!("netns:[{netns}]"), |n| n.label.clone())
    }
}

/// A ready-to-install file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct File {
    pub path: String,
    pub text: String,
}

/// The sysctl.d and modprobe.d files for the plan's values.
pub fn files(plan: &Plan, host: &Host) -> [File; 2] {
    let max = plan.change(&Knob::Max).map_or(0, |c| c.proposed);
    let buckets = plan.change(&Knob::Buckets).map_or(0, |c| c.proposed);
    let mut sysctl = String::new();
    let _ = writeln!(sysctl, "# {SYSCTL_D_PATH}");
    let _ = writeln!(
        sysctl,
        "# Written by `ctguard recommend` for a host with {} of RAM (kernel {}).",
        human_bytes(host.ram_bytes),
        host.kernel_release
    );
    sysctl.push_str(
        "# systemd-sysctl applies this at boot, but net.netfilter.* exists only once nf_conntrack\n\
         # is loaded: if the firewall loads it later, also run\n\
         #   echo nf_conntrack > /etc/modules-load.d/nf_conntrack.conf\n\
         # so the module (and these settings) are there first.\n",
    );
    let _ = writeln!(sysctl, "net.netfilter.nf_conntrack_max = {max}");
    for c in plan.changes.iter().filter(|c| matches!(c.knob, Knob::Timeout(_))) {
        let _ = writeln!(sysctl, "{} = {}", c.sysctl, c.proposed);
    }
    let mut modprobe = String::new();
    let _ = writeln!(modprobe, "# {MODPROBE_D_PATH}");
    modprobe.push_str(
        "# Written by `ctguard recommend`. The hash table is sized when nf_conntrack loads;\n\
         # with hashsize= the kernel also sets nf_conntrack_max = 8 x hashsize at load, and the\n\
         # sysctl.d file then sets the recommended max. At run time the same value can be\n\
         # written to /sys/module/nf_conntrack/parameters/hashsize.\n",
    );
    let _ = writeln!(modprobe, "options nf_conntrack hashsize={buckets}");
    [File { path: SYSCTL_D_PATH.into(), text: sysctl }, File { path: MODPROBE_D_PATH.into(), text: modprobe }]
}

/// `--emit`: both files, each after a `# ==> PATH <==` line.
pub fn emit(plan: &Plan, host: &Host) -> String {
    files(plan, host).iter().map(|f| format!("# ==> {} <==\n{}", f.path, f.text)).collect::<Vec<_>>().join("\n")
}

/// One class's lifetime assumption, for the JSON document.
#[derive(Serialize)]
struct Assumption {
    class: Class,
    timeout: Option<&'static str>,
    lifetime_s: u64,
    assumption: &'static str,
}

#[derive(Serialize)]
struct CurrentView<'a> {
    max: u64,
    buckets: u64,
    timeouts: &'a crate::conntrack::Timeouts,
    namespaces: &'a [NsSeen],
    namespaces_skipped: usize,
}

#[derive(Serialize)]
struct ApplyView<'a> {
    dry_run: bool,
    netns: &'a NetnsCheck,
    state_file: PathBuf,
    applied: Option<&'a [Applied]>,
}

#[derive(Serialize)]
struct Document<'a> {
    schema: &'static str,
    host: &'a Host,
    current: CurrentView<'a>,
    observation: Option<&'a Observation>,
    assumptions: Vec<Assumption>,
    plan: &'a Plan,
    files: [File; 2],
    apply: ApplyView<'a>,
}

pub fn json(ctx: &Context<'_>) -> String {
    let assumptions = [Class::Tcp, Class::Udp, Class::Icmp, Class::Icmpv6, Class::Other, Class::Unknown]
        .into_iter()
        .map(|class| Assumption {
            class,
            timeout: class.timeout_key(),
            lifetime_s: class.lifetime_s(&ctx.current.timeouts),
            assumption: class.assumption(),
        })
        .collect();
    let doc = Document {
        schema: SCHEMA,
        host: ctx.host,
        current: CurrentView {
            max: ctx.current.max,
            buckets: ctx.current.buckets,
            timeouts: &ctx.current.timeouts,
            namespaces: ctx.namespaces,
            namespaces_skipped: ctx.namespaces_skipped,
        },
        observation: ctx.observation,
        assumptions,
        plan: ctx.plan,
        files: files(ctx.plan, ctx.host),
        apply: ApplyView {
            dry_run: ctx.applied.is_none(),
            netns: ctx.netns,
            state_file: ctx.state_file.to_path_buf(),
            applied: ctx.applied,
        },
    };
    serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")) + "\n"
}

const W: usize = 19;

fn row(out: &mut String, label: &str, text: &str) {
    let _ = writeln!(out, "  {label:<W$}{text}");
}

fn cont(out: &mut String, text: &str) {
    let _ = writeln!(out, "  {:<W$}{text}", "");
}

fn n(v: u64) -> String {
    group_thousands(v)
}

/// The human report.
pub fn text(ctx: &Context<'_>) -> String {
    let (h, cur, p) = (ctx.host, ctx.current, ctx.plan);
    let mut out = String::new();
    let _ = writeln!(out, "ctguard recommend: nf_conntrack sizing for this host\n");
    row(
        &mut out,
        "host",
        &format!(
            "{} RAM, {}-bit, kernel {}, one entry = {} B ({})",
            human_bytes(h.ram_bytes),
            h.arch_bits,
            h.kernel_release,
            h.object_size,
            h.object_size_source
        ),
    );
    // The first of equals: this process's own namespace comes first.
    let busiest = ctx.namespaces.iter().rev().max_by_key(|s| s.entries);
    row(
        &mut out,
        "now",
        &format!(
            "max {}, buckets {}; busiest table {} entries ({}); {} namespace(s) read{}",
            n(cur.max),
            n(cur.buckets),
            n(busiest.map_or(0, |b| b.entries)),
            busiest.map_or("-".into(), |b| b.label.clone()),
            ctx.namespaces.len(),
            if ctx.namespaces_skipped > 0 {
                format!(", {} skipped (not root?)", ctx.namespaces_skipped)
            } else {
                String::new()
            }
        ),
    );

    let _ = writeln!(out, "\nsizing, side by side");
    let c = &p.classic;
    row(
        &mut out,
        "classic runbook",
        &format!(
            "max {:>11}   buckets {:>11}  (range {} .. {})",
            n(c.max),
            n(c.buckets),
            n(c.buckets_min),
            n(c.buckets_max)
        ),
    );
    cont(&mut out, &format!("RAM / 16384 / ({}/32); buckets = max/8, at most max/2", h.arch_bits));
    let kd = &p.kernel_default;
    let live = if (cur.max, cur.buckets) == (kd.max, kd.buckets) {
        "  (= the live values)"
    } else {
        "  (the live values differ: changed since the module loaded)"
    };
    row(&mut out, "kernel default", &format!("max {:>11}   buckets {:>11}{live}", n(kd.max), n(kd.buckets)));
    cont(
        &mut out,
        &format!(
            "{} ({})",
            kd.describe(),
            h.hashsize_option_source
                .as_deref()
                .map_or("no hashsize= option found".to_string(), |s| format!("from {s}"))
        ),
    );
    demand_rows(&mut out, ctx);
    let s = &p.sizing;
    row(
        &mut out,
        "need",
        &format!(
            "max(peak {}, current {}) x headroom {} = {}",
            round_entries(s.peak_entries),
            n(s.current_entries),
            s.headroom,
            n(s.need)
        ),
    );
    let max = p.change(&Knob::Max).expect("max is always planned");
    let buckets = p.change(&Knob::Buckets).expect("buckets are always planned");
    row(
        &mut out,
        "recommended",
        &format!(
            "max {:>11}   buckets {:>11}  ({:.2} entries/bucket when full)",
            n(s.recommended_max),
            n(s.recommended_buckets),
            formulas::load_factor(s.recommended_max, s.recommended_buckets)
        ),
    );
    if max.origin == Origin::Recommended {
        cont(&mut out, &format!("max: {}", max.reason));
    }
    if buckets.origin == Origin::Recommended {
        cont(&mut out, &format!("buckets: {}", buckets.reason));
    }

    let _ =
        writeln!(out, "\ntimeouts (Little's law: entries ≈ new/s x lifetime; savings at peak churn, all namespaces)");
    let shown: Vec<_> = p.timeouts.iter().filter(|t| t.proposed || t.current_s > t.suggested_s).collect();
    if shown.is_empty() {
        cont(&mut out, "all at or below ctguard's suggestions");
    }
    for t in shown {
        let frees = match t.frees_entries {
            Some(_) if ctx.observation.is_none() => "no churn measured".into(),
            Some(f) if t.current_s > t.suggested_s => format!("frees ≈ {} entries", round_entries(f)),
            Some(_) => "frees nothing".into(),
            None => "not estimable from churn".into(),
        };
        let tag = if t.proposed { "PROPOSED" } else { "option" };
        let _ = writeln!(out, "  {:<26}{:>7} s -> {:<6} s  {frees:<26} {tag}", t.key, t.current_s, t.suggested_s);
    }
    if !p.sizing.pressure {
        let _ = writeln!(
            out,
            "  (none proposed: the need is within the kernel default; --timeout NAME=SECS sets one anyway)"
        );
    }

    let m = &p.memory;
    let _ = writeln!(out, "\nmemory (a full table: {} B per entry + 8 B per bucket)", m.object_size);
    row(&mut out, "now", &human_bytes(m.current_bytes));
    row(
        &mut out,
        "planned",
        &format!(
            "{} = {:.2} % of RAM (ctguard's limit: 1/4 of RAM = {}, i.e. max {})",
            human_bytes(m.proposed_bytes),
            m.proposed_percent_of_ram,
            human_bytes(m.budget_bytes),
            n(p.sizing.cap)
        ),
    );

    if let Some(b) = &p.bypass {
        let _ = writeln!(out, "\nbetter fix: skip tracking for one port");
        row(&mut out, "command", &b.command);
        cont(&mut out, &b.reason);
    }
    if !p.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings");
        for w in &p.warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }

    match ctx.applied {
        Some(applied) => applied_rows(&mut out, applied, ctx.state_file),
        None => diff_rows(&mut out, ctx),
    }
    out
}

fn demand_rows(out: &mut String, ctx: &Context<'_>) {
    let Some(obs) = ctx.observation else {
        row(out, "observed demand", "none measured: add --observe 60s (eBPF, root) or --from-top FILE");
        cont(out, "the tables' own counts are the floor");
        return;
    };
    row(
        out,
        "observed demand",
        &format!("{} new entries over {:.0} s from {}", round_entries(obs.total_new), obs.window_s, obs.source),
    );
    let with_churn: Vec<_> = ctx.plan.demand.iter().filter(|d| !d.classes.is_empty()).take(3).collect();
    if with_churn.is_empty() {
        cont(out, "no new entries: demand is the tables' own counts");
    }
    for d in with_churn {
        cont(
            out,
            &format!(
                "{}: peak {} / mean {} entries (table holds {})",
                ctx.label(d.netns),
                round_entries(d.peak_entries),
                round_entries(d.mean_entries),
                n(d.current_entries)
            ),
        );
        for c in &d.classes {
            cont(
                out,
                &format!(
                    "  {:<7} {:>9.1}/s peak x {:>4} s ({}) = {}  [mean {:.1}/s, busiest interval {:.1}/s]",
                    c.class.as_str(),
                    c.peak_per_s,
                    c.lifetime_s,
                    c.timeout.unwrap_or("longer of tcp/udp"),
                    round_entries(c.peak_entries),
                    c.mean_per_s,
                    c.busiest_interval_per_s,
                ),
            );
        }
    }
    cont(out, "peak = the busiest stretch one lifetime long (the whole window when shorter)");
    cont(
        out,
        "assumes: tcp ends in TIME_WAIT (time established not counted), udp lives udp_timeout after its last packet",
    );
}

fn diff_rows(out: &mut String, ctx: &Context<'_>) {
    let p = ctx.plan;
    let _ = writeln!(out, "\nchanges (dry run: nothing written)");
    for c in &p.changes {
        let what = if c.changes() { "" } else { "  (unchanged)" };
        let origin = if c.origin == Origin::Override { "  [override]" } else { "" };
        let _ = writeln!(out, "  {:<50} {:>10} -> {:<10}{what}{origin}", c.sysctl, c.current, c.proposed);
    }
    let count = p.effective_changes().count();
    let _ = writeln!(out);
    if count == 0 {
        let _ = writeln!(out, "nothing to change. `--emit` prints sysctl.d / modprobe.d files that pin these values.");
    } else {
        let _ = writeln!(
            out,
            "`ctguard recommend --apply` (same options) writes the {count} change(s), saving the current values in {} for \
             `ctguard rollback`;\n`--emit` prints sysctl.d / modprobe.d files that make them permanent.",
            ctx.state_file.display()
        );
    }
    if let NetnsCheck::No { reason } = ctx.netns {
        let _ = writeln!(
            out,
            "note: --apply would be refused here ({reason}): these settings are global, set them from the initial namespace."
        );
    }
}

fn applied_rows(out: &mut String, applied: &[Applied], state_file: &std::path::Path) {
    let _ = writeln!(out, "\napplied");
    if applied.is_empty() {
        let _ = writeln!(out, "  nothing to change: no value differs from what is in force; nothing written");
        return;
    }
    for a in applied {
        let rounded =
            if a.now != a.written { format!("  (the kernel made it {})", a.now.trim()) } else { String::new() };
        let _ = writeln!(
            out,
            "  {:<50} {:>10} -> {:<10} via {}{rounded}",
            a.sysctl,
            a.previous.trim(),
            a.written.trim(),
            a.path.display()
        );
    }
    let _ = writeln!(out, "\nprevious values saved in {}; `ctguard rollback` restores them.", state_file.display());
}

/// The rollback summary.
pub fn rollback_text(
    state: &State,
    restored: &[Restored],
    dry_run: bool,
    state_file: &std::path::Path,
    notes: &[String],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} setting(s) saved by `ctguard recommend --apply` (kernel {}, {}):",
        if dry_run { "would restore" } else { "restored" },
        restored.len(),
        state.kernel_release,
        state_file.display()
    );
    for r in restored {
        let status = match (&r.error, dry_run, r.exact) {
            (Some(e), _, _) => format!("FAILED: {e}"),
            (None, true, true) => "already the saved value".into(),
            (None, true, false) => "would be written".into(),
            (None, false, _) => "ok, reads back exactly".into(),
        };
        let _ = writeln!(out, "  {:<50} {:>10} -> {:<10} {status}", r.sysctl, r.before.trim(), r.restored.trim());
    }
    for note in notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::recommend::plan::{Input, Overrides, plan};

    fn fixture() -> (Host, Current) {
        let host = Host {
            ram_bytes: 24 << 30,
            page_size: 4096,
            arch_bits: 64,
            kernel_release: "6.18.44".into(),
            object_size: 248,
            object_size_source: "sysfs".into(),
            hashsize_option: None,
            hashsize_option_source: None,
        };
        let timeouts = [("tcp_timeout_time_wait", 120), ("udp_timeout", 30)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        (host, Current { max: 262_144, buckets: 262_144, timeouts, entries: BTreeMap::from([(1, 60)]) })
    }

    #[test]
    fn files_carry_the_planned_values() {
        let (host, current) = fixture();
        let ov = Overrides { max: Some(524_288), buckets: Some(131_072), timeouts: vec![("time_wait".into(), 30)] };
        let p = plan(&Input { host: &host, current: &current, observation: None, headroom: 2.0, overrides: &ov });
        let [sysctl, modprobe] = files(&p, &host);
        assert_eq!(sysctl.path, "/etc/sysctl.d/90-ctguard-conntrack.conf");
        assert!(sysctl.text.contains("\nnet.netfilter.nf_conntrack_max = 524288\n"), "{}", sysctl.text);
        assert!(sysctl.text.contains("\nnet.netfilter.nf_conntrack_tcp_timeout_time_wait = 30\n"));
        assert!(sysctl.text.lines().all(|l| l.starts_with('#') || l.contains(" = ")), "only comments and settings");
        assert!(modprobe.text.ends_with("options nf_conntrack hashsize=131072\n"), "{}", modprobe.text);
        let emitted = emit(&p, &host);
        assert!(emitted.starts_with("# ==> /etc/sysctl.d/90-ctguard-conntrack.conf <==\n"));
        assert!(emitted.contains("# ==> /etc/modprobe.d/ctguard-conntrack.conf <==\n"));
    }

    #[test]
    fn report_shows_figures_side_by_side_and_the_diff() {
        let (host, current) = fixture();
        let p = plan(&Input {
            host: &host,
            current: &current,
            observation: None,
            headroom: 2.0,
            overrides: &Overrides::default(),
        });
        let seen = [NsSeen { inode: 1, label: "host".into(), entries: 60 }];
        let netns = NetnsCheck::Yes { how: "test".into() };
        let ctx = Context {
            host: &host,
            current: &current,
            namespaces: &seen,
            namespaces_skipped: 0,
            observation: None,
            plan: &p,
            netns: &netns,
            applied: None,
            state_file: std::path::Path::new("/var/lib/ctguard/rollback.json"),
        };
        let t = text(&ctx);
        for needle in [
            "classic runbook",
            "786 432",
            "kernel default",
            "262 144",
            "observed demand",
            "need",
            "recommended",
            "memory",
            "dry run",
            "nothing to change",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
        }
        let v: serde_json::Value = serde_json::from_str(&json(&ctx)).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["plan"]["classic"]["max"], 786_432);
        assert_eq!(v["plan"]["kernel_default"]["max"], 262_144);
        assert_eq!(v["apply"]["dry_run"], true);
        assert!(v["files"][1]["text"].as_str().unwrap().contains("hashsize=262144"));
    }
}
