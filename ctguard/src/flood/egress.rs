//! Where a flood would leave its namespace: only through a veth (to another
//! namespace on this machine) or the loopback device. A namespace with a
//! route to a physical interface (a macvlan, a moved NIC, a VPN tunnel) must
//! never receive a flood, whatever its destination address looks like.
//!
//! The checks run `ip -j` from the flooding thread, whose network namespace
//! the child process inherits, and parse its JSON here (pure, unit-tested).
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::error::CtguardError;

/// The egress device of `ip -j route get DST`.
pub fn route_device(route_json: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(route_json).map_err(|e| format!("`ip -j route get` printed no JSON: {e}"))?;
    let dev = v.get(0).and_then(|r| r.get("dev")).and_then(Value::as_str);
    dev.map(str::to_string).ok_or_else(|| "the route names no device".into())
}

/// The kind of a link from `ip -j -d link show dev DEV`: `veth`,
/// `loopback`, or whatever else it is (`physical` when it has no kind).
pub fn link_kind(link_json: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(link_json).map_err(|e| format!("`ip -j link show` printed no JSON: {e}"))?;
    let link = v.get(0).ok_or("no such link")?;
    if link.get("link_type").and_then(Value::as_str) == Some("loopback") {
        return Ok("loopback".into());
    }
    let kind = link.get("linkinfo").and_then(|i| i.get("info_kind")).and_then(Value::as_str);
    Ok(kind.unwrap_or("physical").to_string())
}

/// Refuses unless packets to `dst` leave through a veth or loopback. Call
/// from inside the flooding namespace.
pub fn require_test_link(dst: Ipv4Addr, netns_label: &str) -> Result<(), CtguardError> {
    let ip = |args: &[&str]| -> Result<String, CtguardError> {
        let out = std::process::Command::new("ip").args(args).output().map_err(|e| {
            CtguardError::usage(format!("cannot run ip to check the flood's route: {e}"), "install iproute2")
        })?;
        if !out.status.success() {
            return Err(CtguardError::usage(
                format!("refusing to flood {dst} from {netns_label}: `ip {}` failed: {}", args.join(" "), stderr(&out)),
                "the destination must be reachable over a veth in that namespace",
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let refuse = |what: String| {
        CtguardError::usage(
            format!("refusing to flood {dst} from {netns_label}: {what}"),
            "flood only over test links: a veth to another namespace, or loopback",
        )
    };
    let dev = route_device(&ip(&["-j", "route", "get", &dst.to_string()])?).map_err(refuse)?;
    let kind = link_kind(&ip(&["-j", "-d", "link", "show", "dev", &dev])?).map_err(refuse)?;
    match kind.as_str() {
        "veth" | "loopback" => Ok(()),
        other => Err(refuse(format!("it would leave through {dev}, a {other} device"))),
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_and_link_kinds() {
        let route = r#"[{"dst":"10.0.0.2","dev":"veth-a","prefsrc":"10.0.0.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(route_device(route).unwrap(), "veth-a");
        assert!(route_device("[]").is_err());
        assert!(route_device("RTNETLINK answers: Network is unreachable").is_err());
        let veth = r#"[{"ifname":"veth-a","link_type":"ether","linkinfo":{"info_kind":"veth"}}]"#;
        assert_eq!(link_kind(veth).unwrap(), "veth");
        let lo = r#"[{"ifname":"lo","link_type":"loopback"}]"#;
        assert_eq!(link_kind(lo).unwrap(), "loopback");
        let nic = r#"[{"ifname":"eth0","link_type":"ether"}]"#;
        assert_eq!(link_kind(nic).unwrap(), "physical");
        let macvlan = r#"[{"ifname":"mv0","link_type":"ether","linkinfo":{"info_kind":"macvlan"}}]"#;
        assert_eq!(link_kind(macvlan).unwrap(), "macvlan");
    }
}
