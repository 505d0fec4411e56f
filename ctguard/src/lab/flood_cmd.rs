//! `ctguard lab flood`: the load generator on its own, for load tests and
//! benchmarks. One packet per flow, from a raw socket inside a namespace.
use std::{net::Ipv4Addr, process::ExitCode, time::Duration};

use clap::Args;
use serde::Serialize;

use crate::{
    flood::{self, FlowSpec, Proto, SendOptions},
    netns::Netns,
};

#[derive(Debug, Args)]
#[command(long_about = "Sends new flows -- one UDP datagram or TCP SYN each, every one a distinct \
5-tuple -- from inside network namespace --from to --to, as fast as possible or at --rate, \
bounded by --count and --duration, and reports the rate achieved.\n\nFor test links only: \
--to must be a private (RFC 1918) address and --from must not be the initial namespace.")]
pub struct FloodArgs {
    /// Namespace to send from (name from `ip netns list`, or a path).
    #[arg(long)]
    pub from: String,
    /// Source address (must be configured in --from).
    #[arg(long)]
    pub src: Ipv4Addr,
    /// Destination address.
    #[arg(long)]
    pub to: Ipv4Addr,
    /// Destination ports, cycled through (e.g. 53,80,443).
    #[arg(long, value_delimiter = ',', default_value = "9")]
    pub ports: Vec<u16>,
    /// udp, tcp (SYNs) or icmp (echo requests; the source port becomes the echo identifier).
    #[arg(long, default_value = "udp", value_parser = ["udp", "tcp", "icmp"])]
    pub proto: String,
    /// Number of flows.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Flows per second (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Stop after this long.
    #[arg(long, default_value = "30s", value_parser = crate::util::parse_duration)]
    pub duration: Duration,
    /// Vary source addresses within this prefix of --src beyond 55 536 flows (e.g. 24).
    #[arg(long, default_value_t = 32)]
    pub src_prefix: u8,
    /// Index of the first flow (to continue a previous flood with fresh flows).
    #[arg(long, default_value_t = 0)]
    pub first_flow: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    sent: u64,
    elapsed_s: f64,
    rate_per_s: f64,
    next_flow: u64,
    retries: u64,
    deadline_hit: bool,
}

pub fn run(args: &FloodArgs) -> anyhow::Result<ExitCode> {
    let from = Netns::resolve(Some(&args.from))?.remove(0);
    let proto = match args.proto.as_str() {
        "tcp" => Proto::TcpSyn,
        "icmp" => Proto::IcmpEcho,
        _ => Proto::Udp,
    };
    let spec = FlowSpec::new(proto, args.src, args.to, args.ports.clone()).with_src_prefix(args.src_prefix);
    let opts = SendOptions {
        first_flow: args.first_flow,
        deadline: args.duration,
        rate: args.rate,
        ..SendOptions::count(args.count)
    };
    let r = flood::send_flows(&from, &spec, &opts)?;
    let report = Report {
        sent: r.sent,
        elapsed_s: r.elapsed.as_secs_f64(),
        rate_per_s: r.rate,
        next_flow: r.next_flow,
        retries: r.retries,
        deadline_hit: r.deadline_hit,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "sent {} flows in {:.2}s ({:.0} flows/s){}{}",
            report.sent,
            report.elapsed_s,
            report.rate_per_s,
            if report.retries > 0 { format!(", {} retried sends", report.retries) } else { String::new() },
            if report.deadline_hit { ", stopped by --duration" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
