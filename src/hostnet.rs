//! This host's network as `ip` shows it (a bridge's addresses, the route to a gateway), and
//! the services `systemctl` runs it with (NetworkManager, the `network` service).

use std::fmt;
use std::net::Ipv4Addr;

use crate::exec::{run, RunError};

/// A change create-network makes to the services that run this host's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    StopNetworkManager,
    /// Undoes a stop.
    StartNetworkManager,
    DisableNetworkManager,
    /// Undoes a disable; starts nothing.
    EnableNetworkManager,
    RestartNetwork,
}

/// Why the interface of a route could not be told.
#[derive(Debug)]
pub enum RouteError {
    /// `ip route get` failed or could not run.
    Run(RunError),
    /// It answered without naming a device; what it said.
    NoDevice(String),
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::Run(e) => write!(f, "{e}"),
            RouteError::NoDevice(said) => write!(f, "no device in {said:?}"),
        }
    }
}

impl std::error::Error for RouteError {}

/// The IPv4 addresses `bridge` carries now (none if it does not exist); an error if `ip`
/// cannot tell.
pub fn bridge_addrs(bridge: &str) -> Result<Vec<Ipv4Addr>, RunError> {
    match run("ip", &["-4", "-o", "addr", "show", "dev", bridge]) {
        Ok(out) => Ok(inet_addrs(&out)),
        // What iproute2 says of a device that is not there: `Device "br0" does not exist.`
        Err(RunError::Failed { said, .. }) if said.ends_with("does not exist.") => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The device of the route to `gateway`, as `ip route get` tells.
pub fn route_interface(gateway: Ipv4Addr) -> Result<String, RouteError> {
    let out = run("ip", &["-4", "route", "get", &gateway.to_string()]).map_err(RouteError::Run)?;
    route_device(&out).ok_or_else(|| RouteError::NoDevice(out.trim().to_string()))
}

/// Whether NetworkManager is running.
pub fn network_manager_active() -> bool {
    run("systemctl", &["is-active", "--quiet", "NetworkManager"]).is_ok()
}

/// Whether NetworkManager is enabled, to start at boot.
pub fn network_manager_enabled() -> bool {
    run("systemctl", &["is-enabled", "--quiet", "NetworkManager"]).is_ok()
}

/// Makes `change` with `systemctl`.
pub fn change(change: Service) -> Result<(), RunError> {
    let args: &[&str] = match change {
        Service::StopNetworkManager => &["stop", "NetworkManager"],
        Service::StartNetworkManager => &["start", "NetworkManager"],
        Service::DisableNetworkManager => &["disable", "NetworkManager"],
        Service::EnableNetworkManager => &["enable", "NetworkManager"],
        Service::RestartNetwork => &["restart", "network"],
    };
    run("systemctl", args).map(drop)
}

/// The addresses of `ip -o addr show`'s `inet` words.
fn inet_addrs(out: &str) -> Vec<Ipv4Addr> {
    let mut words = out.split_whitespace();
    let mut found = Vec::new();
    while let Some(word) = words.next() {
        if word == "inet" {
            if let Some(addr) = words.next().and_then(|a| a.split('/').next()?.parse().ok()) {
                found.push(addr);
            }
        }
    }
    found
}

/// The word after `dev` in `ip route get`'s answer.
fn route_device(out: &str) -> Option<String> {
    let mut words = out.split_whitespace();
    while let Some(word) = words.next() {
        if word == "dev" {
            return words.next().map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_ip_prints() {
        let addr = "5: br0    inet 192.0.2.11/24 brd 192.0.2.255 scope global br0\\       \
                    valid_lft forever preferred_lft forever\n\
                    5: br0    inet 192.0.2.99/24 scope global secondary br0\n";
        assert_eq!(
            inet_addrs(addr),
            [
                "192.0.2.11".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.99".parse().unwrap()
            ]
        );
        assert!(inet_addrs("").is_empty());
        let route = "192.0.2.1 dev eth1 src 192.0.2.11 uid 0 \n    cache \n";
        assert_eq!(route_device(route).as_deref(), Some("eth1"));
        assert_eq!(route_device("local 127.0.0.1 table local"), None);
    }
}
