//! The Docker CLI: networks listed, inspected, created and removed with the `docker` command
//! (so `DOCKER_HOST` applies), and the options create-network gives a network.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::exec::{run, RunError};

/// The IPAM driver name Docker finds the plugin by (the socket's file name).
pub const IPAM_DRIVER: &str = "talkingdata";

/// The bridge network create-network makes, as the original tool made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    /// The Linux bridge device Docker creates for it.
    pub bridge: String,
    pub mtu: u32,
    /// The hosts' subnet.
    pub subnet: Ipv4Net,
    /// The hosts' router, recorded as the aux address `DefaultGatewayIPv4`.
    pub router: Ipv4Addr,
}

/// The arguments of `docker network create` for `spec`, with `gateway` (this host's address,
/// or a placeholder where a dry run does not know it yet) as the network's gateway.
pub fn create_args(spec: &NetworkSpec, gateway: &str) -> Vec<String> {
    vec![
        "network".into(),
        "create".into(),
        "--opt=com.docker.network.bridge.enable_icc=true".into(),
        "--opt=com.docker.network.bridge.enable_ip_masquerade=false".into(),
        "--opt=com.docker.network.bridge.host_binding_ipv4=0.0.0.0".into(),
        format!("--opt=com.docker.network.bridge.name={}", spec.bridge),
        format!("--opt=com.docker.network.driver.mtu={}", spec.mtu),
        format!("--ipam-driver={IPAM_DRIVER}"),
        format!("--subnet={}", spec.subnet),
        format!("--gateway={gateway}"),
        format!("--aux-address=DefaultGatewayIPv4={}", spec.router),
        spec.name.clone(),
    ]
}

/// None if Docker says no network `name` exists; else its IPv4 gateway, if it has one. An
/// error if Docker cannot be asked (no `docker`, no daemon): that is no answer.
pub fn network_gateway(name: &str) -> Result<Option<Option<Ipv4Addr>>, RunError> {
    let format = "{{range .IPAM.Config}}{{.Gateway}} {{end}}";
    match run("docker", &["network", "inspect", "--format", format, name]) {
        Ok(out) => Ok(Some(out.split_whitespace().find_map(|g| g.parse().ok()))),
        Err(RunError::Failed { said, .. }) if no_such_network(&said, name) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `docker network inspect name` failed for want of the network: Debian's docker.io
/// (20.10) says "Error: No such network: NAME", newer clients pass on the daemon's "Error
/// response from daemon: network NAME not found".
fn no_such_network(said: &str, name: &str) -> bool {
    said.contains("No such network") || said.contains(&format!("network {name} not found"))
}

/// `docker network create` for `spec`, with `gateway` as the network's gateway.
pub fn create_network(spec: &NetworkSpec, gateway: Ipv4Addr) -> Result<(), RunError> {
    run("docker", &create_args(spec, &gateway.to_string())).map(drop)
}

/// `docker network rm name`.
pub fn remove_network(name: &str) -> Result<(), RunError> {
    run("docker", &["network", "rm", name]).map(drop)
}

/// The full IDs of every network.
pub fn network_ids() -> Result<Vec<String>, RunError> {
    let out = run("docker", &["network", "ls", "-q", "--no-trunc"])?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

/// `docker network inspect` of `ids`: a JSON array, one object per network.
pub fn inspect_networks(ids: &[String]) -> Result<String, RunError> {
    let mut args = vec!["network", "inspect"];
    args.extend(ids.iter().map(String::as_str));
    run("docker", &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_missing_network_from_a_docker_that_cannot_answer() {
        assert!(no_such_network("Error: No such network: mynet", "mynet"));
        let newer = "Error response from daemon: network mynet not found";
        assert!(no_such_network(newer, "mynet"));
        let down = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. \
                    Is the docker daemon running?";
        assert!(!no_such_network(down, "mynet"));
        let context = "Current context \"x\" is not found on the file system";
        assert!(!no_such_network(context, "mynet"));
    }

    #[test]
    fn creates_networks_as_the_original_did() {
        let spec = NetworkSpec {
            name: "mynet".into(),
            bridge: "br0".into(),
            mtu: 1500,
            subnet: "192.0.2.0/24".parse().unwrap(),
            router: "192.0.2.1".parse().unwrap(),
        };
        assert_eq!(
            create_args(&spec, "192.0.2.11").join(" "),
            "network create --opt=com.docker.network.bridge.enable_icc=true \
             --opt=com.docker.network.bridge.enable_ip_masquerade=false \
             --opt=com.docker.network.bridge.host_binding_ipv4=0.0.0.0 \
             --opt=com.docker.network.bridge.name=br0 --opt=com.docker.network.driver.mtu=1500 \
             --ipam-driver=talkingdata --subnet=192.0.2.0/24 --gateway=192.0.2.11 \
             --aux-address=DefaultGatewayIPv4=192.0.2.1 mynet"
        );
    }
}
