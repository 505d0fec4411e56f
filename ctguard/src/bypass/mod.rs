//! `ctguard bypass`: NOTRACK-equivalent nftables rules, added safely.
//!
//! The runbook's fix for ports that churn conntrack is four iptables lines in
//! the raw table (`-p tcp -m multiport --dports/--sports 80,15000 -j
//! NOTRACK`, in PREROUTING and OUTPUT). ctguard writes the nftables
//! equivalent into a table it owns, `table inet ctguard` (chains
//! `prerouting` and `output`, type filter, priority raw = -300, rules
//! `... counter notrack comment "ctguard <id> ..."`), never touching other
//! tables; removing the last bypass deletes the table.
//!
//! Before applying, it reads the live ruleset and looks for what untracked
//! packets break (see [`analysis`]): NAT, `ct state` policies, conntrack
//! helpers. Every change is one nft transaction (all or nothing), and adding
//! the same selector twice changes nothing: rules carry a stable id derived
//! from the selector.
//!
//! Why nft's JSON built with serde_json rather than the `nftables` crate
//! (0.6.3, the maintained Rust binding of nft's JSON API): it serializes
//! `Statement::Notrack` as the bare string `"notrack"`, which nft 1.0.6
//! rejects ("Unexpected expr array element of type string, expected
//! object") -- and notrack is the one statement this module exists for; its
//! typed ruleset parser also fails on any statement it does not model
//! (iptables-nft `xt`, newer nft features), while the conflict analysis must
//! read whatever ruleset a host has. So rules are built from ctguard's own
//! small model ([`rules`]) into `serde_json` values, piped to `nft -j -f -`
//! on stdin (no shell, no string-built command lines), and rulesets are
//! read with `nft -j list ruleset` into `serde_json::Value`.
pub mod analysis;
pub mod error;
pub mod eval;
pub mod nft;
pub mod ranges;
pub mod render;
pub mod rules;
pub mod ruleset;
pub mod selector;
pub mod state;
pub mod suggest;

use std::{io::Read, path::PathBuf, process::ExitCode, time::Duration};

use serde::Serialize;

use self::{
    analysis::{Conflict, Environment, Severity},
    error::BypassError,
    nft::{Lock, Nft},
    rules::{Command, FAMILY, TABLE, Transaction, rules_for},
    ruleset::Ruleset,
    selector::{Direction, Selector, SelectorInput},
    state::TableState,
};

macro_rules! bypass_examples {
    () => {
        "Examples:
  ctguard bypass suggest --observe 10s              which ports churn the table, and the commands
  ctguard bypass add --proto tcp --port 80,15000    the runbook's four NOTRACK lines
  ctguard bypass add --port 53 --dry-run            print the nft script, change nothing
  ctguard bypass list                               rules and their packet counters
  ctguard bypass remove 1a2b3c4d                    one bypass (or --all)
  ctguard bypass add --netns lab-b --port 5000 --proto udp

Exit codes: 0 ok; 1 done, with warnings printed (conflicts ctguard could not decide, or \
--force overrode them); 2 error or refusal (nothing was changed)."
    };
}

/// `bypass --help`, after the command list (the one-line doc of the
/// `bypass` variant in cli.rs replaces any long_about set here).
const BYPASS_LONG: &str = concat!(
    "Exempts chosen flows from connection tracking with nftables `notrack` rules, the \
nftables equivalent of the iptables raw-table NOTRACK rules from the conntrack runbook:

  iptables -t raw -A PREROUTING -p tcp -m multiport --dports 80,15000 -j NOTRACK
  iptables -t raw -A PREROUTING -p tcp -m multiport --sports 80,15000 -j NOTRACK
  iptables -t raw -A OUTPUT     -p tcp -m multiport --dports 80,15000 -j NOTRACK
  iptables -t raw -A OUTPUT     -p tcp -m multiport --sports 80,15000 -j NOTRACK

is `ctguard bypass add --proto tcp --port 80,15000`.

Untracked packets create no conntrack entry, so busy stateless traffic (DNS, health checks, \
load-test ports) can no longer fill the table. They also lose what conntrack gives them: \
they are never NATed, `ct state established,related accept` no longer matches them, and \
conntrack helpers (FTP, SIP) ignore them. `add` therefore reads the live ruleset first and \
refuses (exit 2) when a NAT rule, a `ct state` policy that would drop the untracked packets, \
or a helper applies to the selected traffic -- naming the table, chain, rule handle and text, \
and the nft rule to add -- unless you pass --force.

All rules live in one table ctguard owns, `table inet ctguard`: chains `prerouting` and \
`output` at priority raw (-300, before conntrack), one `counter notrack` rule per chain and \
direction, commented with the bypass id. Other tables are never modified. Each change is a \
single nft transaction: it applies completely or not at all, even if ctguard is killed. \
Removing the last bypass deletes the table, leaving the ruleset as it was.

",
    bypass_examples!()
);

#[derive(Debug, clap::Args)]
#[command(after_help = bypass_examples!(), after_long_help = BYPASS_LONG, arg_required_else_help = true)]
pub struct BypassArgs {
    #[command(subcommand)]
    pub command: BypassCommand,
}

const ADD_LONG: &str = "Adds NOTRACK rules for the selected flows to table inet ctguard.

A selector names flows by their service side: --port 80 means flows whose destination port is \
80, whether this host serves them or connects to them. With --direction both (the default) \
every packet of those flows is exempt: requests (to port 80: `dport`, from --src to --dst) and \
replies (from port 80: `sport`, from --dst to --src), in prerouting (arriving and forwarded \
packets) and output (packets this host sends). --iface limits prerouting rules to the input \
interface and output rules to the output interface.

Protocols default to tcp and udp: a port usually means both (give --proto tcp to match the \
runbook's iptables lines exactly).

Before applying, the live ruleset is checked: a NAT rule, a `ct state` policy that would drop \
the untracked packets, or a conntrack helper applying to the same traffic refuses the change \
(exit 2) unless --force; undecidable cases warn (exit 1). Adding a selector that is already \
installed changes nothing (same id); an incomplete copy is repaired.";

const ADD_AFTER: &str = "Examples:
  ctguard bypass add --proto tcp --port 80,15000
  ctguard bypass add --port 8000-8100 --dst 10.0.0.0/8 --iface eth0
  ctguard bypass add --proto udp --port 53 --dry-run | nft -f -    (what ctguard would load)

Exit codes: 0 added (or already present); 1 added with warnings; 2 invalid selector, error or \
refusal (nothing changed).";

const LIST_LONG: &str = "Lists the bypasses in table inet ctguard, each with its selector, its id and \
the packets and bytes its rules exempted (one counter per chain and direction: a bypass that \
works shows prerouting/request hits for incoming requests and output/reply hits for the answers).

Exit codes: 0 ok; 1 the table holds an incomplete bypass or rules ctguard did not write; 2 error.";

const REMOVE_LONG: &str = "Removes bypasses in one transaction. Removing the last one (or --all) \
deletes table inet ctguard itself, so the ruleset is exactly what it was before the first \
`bypass add`. IDs may be abbreviated to a unique prefix.";

const SUGGEST_LONG: &str = "Proposes bypasses from observed churn: the destination ports whose flows \
make most new conntrack entries, with the entries a bypass would save (new flows/s x the entry \
lifetime: nf_conntrack_udp_timeout for UDP, nf_conntrack_tcp_timeout_time_wait for TCP, read \
in the namespace) and the exact `ctguard bypass add` command. Churn comes from the eBPF \
sensors (--observe, needs the privileges of `ctguard top`) or from a file written by \
`ctguard top --json`.

Nothing is changed.";

#[derive(Debug, clap::Subcommand)]
pub enum BypassCommand {
    /// Exempt flows from conntrack (checks the ruleset for conflicts first).
    #[command(long_about = ADD_LONG, after_help = ADD_AFTER)]
    Add(AddArgs),
    /// Show the bypasses with their packet counters.
    #[command(long_about = LIST_LONG)]
    List(ListArgs),
    /// Remove bypasses by id, or all of them (deletes table inet ctguard).
    #[command(long_about = REMOVE_LONG)]
    Remove(RemoveArgs),
    /// Propose bypasses from observed conntrack churn.
    #[command(long_about = SUGGEST_LONG)]
    Suggest(SuggestArgs),
}

/// Where the rules are.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Work in this network namespace: a name from `ip netns list`, a path like /proc/PID/ns/net, or an inode.
    #[arg(long, value_name = "NAME|PATH|INODE")]
    pub netns: Option<String>,
    /// Read the ruleset from this file (`nft -j list ruleset` output, `-` for stdin) instead of the
    /// kernel; nothing is applied (add and remove act as with --dry-run). No privileges needed.
    #[arg(long, value_name = "FILE")]
    pub ruleset: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// Ports and ranges, comma-separated or repeated: 80,15000 or 8000-8100.
    #[arg(long, value_name = "PORTS")]
    pub port: Vec<String>,
    /// Protocols, comma-separated: tcp, udp, sctp, udplite, dccp (with --port); also icmp, icmpv6 or a number
    /// without --port. [default: tcp,udp]
    #[arg(long, value_name = "PROTOS")]
    pub proto: Vec<String>,
    /// The clients' side: source network of the requests (IPv4 or IPv6 CIDR, or an address).
    #[arg(long, value_name = "CIDR")]
    pub src: Option<String>,
    /// The servers' side: destination network of the requests.
    #[arg(long, value_name = "CIDR")]
    pub dst: Option<String>,
    /// Only packets arriving on (prerouting) or leaving through (output) this interface; `eth*` matches a prefix.
    #[arg(long, value_name = "NAME")]
    pub iface: Option<String>,
    /// Which packets of the flows: in = requests, out = replies, both = all (what NOTRACK needs).
    #[arg(long, value_enum, default_value = "both")]
    pub direction: Direction,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print the nft script that would be loaded (`nft -f` syntax) and the conflicts; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply even when conflicts were found (they are still printed; exit code 1).
    #[arg(long)]
    pub force: bool,
    /// Print one JSON document (status, id, rules, conflicts, the nft JSON and script).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print JSON (schema ctguard.bypass.list.v1).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// Bypass ids, as `bypass list` shows them.
    #[arg(value_name = "ID", required_unless_present = "all", conflicts_with = "all")]
    pub ids: Vec<String>,
    /// Remove every bypass: delete table inet ctguard.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print the nft script that would be loaded; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct SuggestArgs {
    /// Watch new conntrack entries for this long (e.g. 10s, 1m).
    #[arg(long, value_parser = crate::util::parse_duration, default_value = "10s", conflicts_with = "from_top")]
    pub observe: Duration,
    /// Use the output of `ctguard top --json` (by dst-port) instead of observing, `-` for stdin, or a
    /// `ctguard capture` bundle directory (its stats.jsonl).
    #[arg(long, value_name = "FILE|BUNDLE")]
    pub from_top: Option<PathBuf>,
    /// Which kernel hooks to use for --observe (see `ctguard doctor`).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: crate::sensors::backend::BackendRequest,
    /// Propose at most this many ports.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Skip ports below this share of their namespace's new entries (percent).
    #[arg(long, default_value_t = 5.0)]
    pub min_share: f64,
    /// Only this namespace (name, path or inode).
    #[arg(long, value_name = "NAME|PATH|INODE")]
    pub netns: Option<String>,
    /// Print JSON (schema ctguard.bypass.suggest.v1).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &BypassArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        BypassCommand::Add(a) => add(a),
        BypassCommand::List(a) => list(a),
        BypassCommand::Remove(a) => remove(a),
        BypassCommand::Suggest(a) => suggest_cmd(a),
    }
}

/// The ruleset and where it came from.
struct Loaded {
    nft: Nft,
    ruleset: Ruleset,
    /// Read from --ruleset: nothing may be applied.
    offline: bool,
    env: Environment,
}

fn load(target: &TargetArgs) -> anyhow::Result<Loaded> {
    let netns = nft::resolve_netns(target.netns.as_deref())?;
    let nft = Nft { netns };
    if let Some(path) = &target.ruleset {
        let text = read_input(path, "--ruleset")?;
        let ruleset = Ruleset::parse_str(&text)?;
        return Ok(Loaded { nft, ruleset, offline: true, env: Environment::default() });
    }
    let text = nft.list_ruleset()?;
    let ruleset = Ruleset::parse_str(&text)?;
    let env = Environment { legacy_iptables: nft.legacy_iptables_tables().unwrap_or_default() };
    Ok(Loaded { nft, ruleset, offline: false, env })
}

fn read_input(path: &std::path::Path, opt: &str) -> Result<String, BypassError> {
    let res = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map(|_| s)
    } else {
        std::fs::read_to_string(path)
    };
    res.map_err(|e| {
        BypassError::usage(format!("{opt} {}: {e}", path.display()), "give a readable file, or - for stdin")
    })
}

fn netns_suffix(t: &TargetArgs) -> String {
    t.netns.as_ref().map_or_else(String::new, |n| format!(" --netns {n}"))
}

fn print_conflicts(conflicts: &[Conflict]) {
    for c in conflicts {
        eprintln!("{}\n", c.text());
    }
}

#[derive(Serialize)]
struct AddReport<'a> {
    schema: &'static str,
    netns: Option<String>,
    id: String,
    selector: String,
    /// added, present, repaired, dry_run, refused
    status: &'static str,
    rules: Vec<String>,
    conflicts: &'a [Conflict],
    nft_script: String,
    nft_json: serde_json::Value,
}

fn add(a: &AddArgs) -> anyhow::Result<ExitCode> {
    let sel = Selector::parse(&SelectorInput {
        ports: a.port.clone(),
        protos: a.proto.clone(),
        src: a.src.clone(),
        dst: a.dst.clone(),
        iface: a.iface.clone(),
        direction: Some(a.direction),
    })?;
    let dry_run = a.dry_run || a.target.ruleset.is_some();
    let _lock = (!dry_run).then(Lock::acquire);
    let loaded = load(&a.target)?;
    let state = TableState::read(&loaded.ruleset);
    let id = sel.id();
    let existing = state.bypasses.get(&id);
    let present = existing.is_some_and(|b| b.complete());
    let place = loaded.nft.place();

    let conflicts = if present { Vec::new() } else { analysis::analyze(&loaded.ruleset, &sel, &loaded.env) };
    let worst = analysis::worst(&conflicts);
    let refused = worst == Some(Severity::Refuse) && !a.force;
    let stale = existing.map(|b| b.handles()).unwrap_or_default();
    let tx = if present { Transaction::default() } else { Transaction::add(&sel, &stale) };
    let status = match (present, refused, dry_run, stale.is_empty()) {
        (true, ..) => "present",
        (_, true, ..) => "refused",
        (_, _, true, _) => "dry_run",
        (_, _, _, true) => "added",
        _ => "repaired",
    };

    if !a.json {
        print_conflicts(&conflicts);
    }
    if dry_run && !a.json && !present {
        print!(
            "# ctguard bypass add {} (id {id}){place}: nft -f equivalent of the JSON piped to `nft -j -f -`\n{}",
            sel.args(),
            tx.script()
        );
    }
    if status != "refused" && !dry_run && !present {
        loaded.nft.apply(tx.json().to_string())?;
    }
    if a.json {
        let report = AddReport {
            schema: "ctguard.bypass.add.v1",
            netns: loaded.nft.netns.as_ref().map(|n| n.label()),
            id: id.clone(),
            selector: sel.args(),
            status,
            rules: rules_for(&sel).iter().map(|r| format!("{} {}", r.chain.name(), r.text())).collect(),
            conflicts: &conflicts,
            nft_script: tx.script(),
            nft_json: tx.json(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if refused {
        return Err(BypassError::Refused {
            action: "add this bypass",
            count: conflicts.iter().filter(|c| c.severity == Severity::Refuse).count(),
        }
        .into());
    }
    let suffix = netns_suffix(&a.target);
    if !a.json {
        let n = rules_for(&sel).len();
        match status {
            "present" => println!("bypass {id} ({}) is already installed{place}; nothing changed", sel.args()),
            "dry_run" => eprintln!("dry run: nothing was applied{}", if loaded.offline { " (--ruleset)" } else { "" }),
            s => {
                let which = match sel.direction {
                    Direction::Both => "both directions",
                    Direction::In => "requests only",
                    Direction::Out => "replies only",
                };
                println!(
                    "{} bypass {id}: {} ({which}), {n} rules in table {FAMILY} {TABLE}{place}",
                    if s == "repaired" { "repaired" } else { "added" },
                    sel.describe(),
                );
                println!("  watch it work: ctguard bypass list{suffix}");
                println!("  undo:          ctguard bypass remove {id}{suffix}");
            }
        }
        if worst.is_some() {
            eprintln!(
                "{} warning(s){}",
                conflicts.len(),
                match (a.force && worst == Some(Severity::Refuse), dry_run) {
                    (true, false) => ": applied anyway because of --force",
                    (true, true) => ": --force would apply it anyway",
                    _ => "",
                }
            );
        }
    }
    Ok(if worst.is_some() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

#[derive(Serialize)]
struct ListReport<'a> {
    schema: &'static str,
    netns: Option<String>,
    table: String,
    table_present: bool,
    bypasses: Vec<ListBypass<'a>>,
    /// Rules in table inet ctguard that ctguard did not write.
    foreign_rules: &'a [state::ForeignRule],
}

#[derive(Serialize)]
struct ListBypass<'a> {
    id: &'a str,
    selector: &'a str,
    command: String,
    complete: bool,
    packets: u64,
    bytes: u64,
    rules: &'a [state::InstalledRule],
}

fn list(a: &ListArgs) -> anyhow::Result<ExitCode> {
    let loaded = load(&a.target)?;
    let st = TableState::read(&loaded.ruleset);
    let place = loaded.nft.place();
    let suffix = netns_suffix(&a.target);
    let problems = st.bypasses.values().filter(|b| !b.complete()).count() + st.foreign.len();
    if a.json {
        let bypasses: Vec<ListBypass> = st
            .bypasses
            .values()
            .map(|b| ListBypass {
                id: &b.id,
                selector: &b.args,
                command: format!("ctguard bypass add{suffix} {}", b.args),
                complete: b.complete(),
                packets: b.packets(),
                bytes: b.bytes(),
                rules: &b.rules,
            })
            .collect();
        let doc = ListReport {
            schema: "ctguard.bypass.list.v1",
            netns: loaded.nft.netns.as_ref().map(|n| n.label()),
            table: format!("{FAMILY} {TABLE}"),
            table_present: st.present,
            bypasses,
            foreign_rules: &st.foreign,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render_list(&st, &place, &suffix));
    }
    Ok(if problems > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn render_list(st: &TableState, place: &str, suffix: &str) -> String {
    if !st.present {
        return format!(
            "no bypasses{place}: table {FAMILY} {TABLE} does not exist (add one with `ctguard bypass add`)\n"
        );
    }
    let mut out = format!(
        "table {FAMILY} {TABLE}{place}: {} bypass{}\n",
        st.bypasses.len(),
        if st.bypasses.len() == 1 { "" } else { "es" }
    );
    if !st.bypasses.is_empty() {
        out.push_str(&format!("\n{:<10} {:>12} {:>14}  SELECTOR\n", "ID", "PACKETS", "BYTES"));
    }
    for b in st.bypasses.values() {
        out.push_str(&format!("{:<10} {:>12} {:>14}  {}\n", b.id, b.packets(), b.bytes(), b.args));
        for r in &b.rules {
            out.push_str(&format!(
                "    {:<10} {:<7} {:>12}  handle {:<5} {}\n",
                r.chain,
                r.half.as_str(),
                r.packets,
                r.handle,
                r.text
            ));
        }
        if !b.complete() {
            out.push_str(&format!(
                "    INCOMPLETE: rules are missing or were edited; repair with `ctguard bypass add{suffix} {}`\n",
                b.args
            ));
        }
    }
    if !st.foreign.is_empty() {
        out.push_str("\nrules ctguard did not write (kept by `remove ID`, deleted by `remove --all`):\n");
        for f in &st.foreign {
            out.push_str(&format!("    {:<10} handle {:<5} {}\n", f.chain, f.handle, f.text));
        }
    }
    out
}

#[derive(Serialize)]
struct RemoveReport {
    schema: &'static str,
    netns: Option<String>,
    /// removed, dry_run or nothing
    status: &'static str,
    removed: Vec<String>,
    table_deleted: bool,
    nft_script: String,
    nft_json: serde_json::Value,
}

fn remove(a: &RemoveArgs) -> anyhow::Result<ExitCode> {
    let dry_run = a.dry_run || a.target.ruleset.is_some();
    let _lock = (!dry_run).then(Lock::acquire);
    let loaded = load(&a.target)?;
    let st = TableState::read(&loaded.ruleset);
    let place = loaded.nft.place();
    let mut removed: Vec<&state::Installed> = Vec::new();
    if !a.all {
        for id in &a.ids {
            match st.find(id) {
                Ok(b) => {
                    if !removed.iter().any(|r| r.id == b.id) {
                        removed.push(b);
                    }
                }
                Err(ambiguous) => {
                    let known: Vec<&str> = st.bypasses.keys().map(String::as_str).collect();
                    let hint = if !ambiguous.is_empty() {
                        format!("`{id}` matches {}; give more digits", ambiguous.join(", "))
                    } else if known.is_empty() {
                        "there are no bypasses here; `ctguard bypass list` shows them".to_string()
                    } else {
                        format!(
                            "installed: {} (see `ctguard bypass list{}`)",
                            known.join(", "),
                            netns_suffix(&a.target)
                        )
                    };
                    return Err(BypassError::NotFound { id: id.clone(), place, hint }.into());
                }
            }
        }
    }
    let ids: Vec<&str> = removed.iter().map(|b| b.id.as_str()).collect();
    let delete_table = st.present && (a.all || st.empty_without(&ids));
    let tx = if delete_table {
        Transaction { commands: vec![Command::DeleteTable] }
    } else {
        Transaction {
            commands: removed
                .iter()
                .flat_map(|b| b.handles())
                .map(|(chain, handle)| Command::DeleteRule { chain, handle })
                .collect(),
        }
    };
    let status = if tx.is_empty() {
        "nothing"
    } else if dry_run {
        "dry_run"
    } else {
        loaded.nft.apply(tx.json().to_string())?;
        "removed"
    };
    let removed_ids: Vec<String> =
        if a.all { st.bypasses.keys().cloned().collect() } else { ids.iter().map(|s| s.to_string()).collect() };
    if a.json {
        let doc = RemoveReport {
            schema: "ctguard.bypass.remove.v1",
            netns: loaded.nft.netns.as_ref().map(|n| n.label()),
            status,
            removed: removed_ids,
            table_deleted: delete_table,
            nft_script: tx.script(),
            nft_json: tx.json(),
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    match status {
        "nothing" => println!("nothing to remove{place}: table {FAMILY} {TABLE} does not exist"),
        "dry_run" => {
            print!(
                "# ctguard bypass remove{place}: nft -f equivalent of the JSON piped to `nft -j -f -`\n{}",
                tx.script()
            );
            eprintln!("dry run: nothing was applied");
        }
        _ => {
            let what = if removed_ids.is_empty() {
                "no bypasses".to_string()
            } else {
                format!("bypass {}", removed_ids.join(", "))
            };
            println!(
                "removed {what}{place}{}",
                if delete_table { format!("; table {FAMILY} {TABLE} deleted") } else { String::new() }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn suggest_cmd(a: &SuggestArgs) -> anyhow::Result<ExitCode> {
    use crate::{
        conntrack::sysctl,
        netns::{self, Netns},
        sensors::{KeyMode, SensorOptions, Sensors},
    };
    let only: Option<u32> = match a.netns.as_deref() {
        None => None,
        Some(s) => nft::resolve_netns(Some(s))?.map(|n| n.inode),
    };
    let (churn, source) = match &a.from_top {
        Some(path) => {
            let text = read_input(&crate::top::batch::frames_path(path), "--from-top")?;
            let (mut churn, secs) = suggest::from_top_json(&text)?;
            churn.retain(|c| only.is_none_or(|n| n == c.netns));
            (churn, format!("from {} ({}s of samples)", path.display(), secs))
        }
        None => {
            if a.observe.is_zero() {
                return Err(BypassError::usage("--observe must be longer than 0", "e.g. --observe 10s").into());
            }
            let opts = SensorOptions { key_mode: KeyMode::DstPort, backend: a.backend, ..Default::default() };
            let mut sensors = Sensors::start(&opts)?;
            let first = sensors.snapshot()?;
            eprintln!("observing new conntrack entries for {} ...", crate::util::format_duration(a.observe));
            std::thread::sleep(a.observe);
            let second = sensors.snapshot()?;
            let secs = second.taken.duration_since(first.taken).as_secs_f64();
            (
                suggest::from_snapshots(&first, &second, secs, only),
                format!("observed {}", crate::util::format_duration(a.observe)),
            )
        }
    };
    let known = netns::list_all().unwrap_or_default();
    let current = Netns::current().map(|n| n.inode).unwrap_or(0);
    let label = |inode: u32| -> (String, Option<String>) {
        match known.iter().find(|n| n.inode == inode) {
            Some(n) => (n.label(), n.name.clone()),
            None => (format!("netns:[{inode}]"), None),
        }
    };
    let timeouts = |inode: u32| -> sysctl::Timeouts {
        let dir = std::path::Path::new(sysctl::NETFILTER_SYSCTL_DIR);
        let read = if inode == current {
            sysctl::read_timeouts(dir).ok()
        } else {
            known
                .iter()
                .find(|n| n.inode == inode)
                .and_then(|n| n.run(|| sysctl::read_timeouts(std::path::Path::new(sysctl::NETFILTER_SYSCTL_DIR))).ok())
                .and_then(Result::ok)
        };
        read.filter(|t| !t.is_empty()).unwrap_or_else(suggest::default_timeouts)
    };
    let suggestions = suggest::suggest(
        &churn,
        &timeouts,
        &suggest::NetnsNames { current, label: &label },
        &suggest::Options { top: a.top, min_share: a.min_share },
    );
    if a.json {
        #[derive(Serialize)]
        struct SuggestReport<'a> {
            schema: &'static str,
            source: &'a str,
            suggestions: &'a [suggest::Suggestion],
        }
        let doc = SuggestReport { schema: "ctguard.bypass.suggest.v1", source: &source, suggestions: &suggestions };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", suggest::render(&suggestions, &source));
    }
    Ok(ExitCode::SUCCESS)
}
