//! The lab's throw-away network: a client and a server namespace joined by a
//! veth, conntrack switched on in the server by an nft `ct state` rule.
//! Dropping it deletes both namespaces (and with them everything inside).
use std::{net::Ipv4Addr, process::Command};

use crate::{error::CtguardError, netns::Netns};

pub struct LabNet {
    pub client: String,
    pub server: String,
    pub client_addr: Ipv4Addr,
    pub server_addr: Ipv4Addr,
}

/// The nft table that makes the server track connections (and counts them).
pub const LAB_TABLE: &str = "ctguard_lab";

fn ip(args: &[&str]) -> Result<(), CtguardError> {
    run("ip", args, None)
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), CtguardError> {
    use std::io::Write;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        CtguardError::usage(
            format!("cannot run {program}: {e}"),
            "install iproute2 and nftables (`cargo xtask setup` does)",
        )
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| CtguardError::usage(format!("writing to {program}: {e}"), "retry"))?;
    }
    let out = child.wait_with_output().map_err(|e| CtguardError::usage(format!("{program}: {e}"), "retry"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(CtguardError::usage(
        format!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
        "the lab needs root, iproute2 and nftables",
    ))
}

impl LabNet {
    /// Builds the namespaces; anything half-built is removed on error.
    pub fn create() -> Result<Self, CtguardError> {
        let id = std::process::id();
        let net = LabNet {
            client: format!("ctguard-lab-{id}-client"),
            server: format!("ctguard-lab-{id}-server"),
            // 10.253.0.0/24 is the lab link; the flood uses addresses in it.
            client_addr: Ipv4Addr::new(10, 253, 0, 1),
            server_addr: Ipv4Addr::new(10, 253, 0, 2),
        };
        ip(&["netns", "add", &net.client])?;
        // From here on, Drop cleans up whatever exists.
        ip(&["netns", "add", &net.server])?;
        ip(&[
            "link",
            "add",
            "lab-c",
            "netns",
            &net.client,
            "type",
            "veth",
            "peer",
            "name",
            "lab-s",
            "netns",
            &net.server,
        ])?;
        let (c, s) = (format!("{}/24", net.client_addr), format!("{}/24", net.server_addr));
        ip(&["-n", &net.client, "addr", "add", &c, "dev", "lab-c"])?;
        ip(&["-n", &net.server, "addr", "add", &s, "dev", "lab-s"])?;
        for (ns, dev) in [(&net.client, "lab-c"), (&net.server, "lab-s")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        net.enable_conntrack()?;
        Ok(net)
    }

    fn enable_conntrack(&self) -> Result<(), CtguardError> {
        let ruleset = format!(
            "table inet {LAB_TABLE} {{\n  chain prerouting {{\n    type filter hook prerouting priority filter; policy accept;\n    ct state new counter\n  }}\n}}\n"
        );
        run("ip", &["netns", "exec", &self.server, "nft", "-f", "-"], Some(&ruleset))
    }

    pub fn client_netns(&self) -> Result<Netns, CtguardError> {
        Ok(Netns::resolve(Some(&self.client))?.remove(0))
    }

    pub fn server_netns(&self) -> Result<Netns, CtguardError> {
        Ok(Netns::resolve(Some(&self.server))?.remove(0))
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Deletes namespaces of labs whose process is gone (killed with SIGKILL).
pub fn remove_stale_namespaces() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(dir) = std::fs::read_dir(crate::netns::NAMED_NETNS_DIR) else { return removed };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_lab_pid(&name) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            removed.push(name);
        }
    }
    removed
}

/// The pid in `ctguard-lab-PID-client|server`.
pub fn stale_lab_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ctguard-lab-")?;
    let (pid, side) = rest.split_once('-')?;
    matches!(side, "client" | "server").then(|| pid.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lab_names_are_stale_candidates() {
        assert_eq!(stale_lab_pid("ctguard-lab-123-client"), Some(123));
        assert_eq!(stale_lab_pid("ctguard-lab-9-server"), Some(9));
        assert_eq!(stale_lab_pid("ctguard-lab-x-server"), None);
        assert_eq!(stale_lab_pid("ctguard-lab-9-router"), None);
        assert_eq!(stale_lab_pid("ctb"), None);
    }
}
