//! The Docker CLI: networks listed, inspected, created and removed with the `docker` command
//! (so `DOCKER_HOST` applies), the options create-network gives a network, and which
//! containers use which address on talkingdata networks, as `reconcile` compares with etcd.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::Value;

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

/// Why what Docker's endpoints use could not be read.
#[derive(Debug)]
pub enum ViewError {
    /// The docker command failed or could not run.
    Run(RunError),
    /// Docker answered something that is not what `docker network inspect` prints.
    BadAnswer(String),
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ViewError::Run(e) => write!(f, "cannot ask Docker: {e}"),
            ViewError::BadAnswer(e) => {
                write!(
                    f,
                    "docker network inspect answered something unexpected: {e}"
                )
            }
        }
    }
}

impl std::error::Error for ViewError {}

/// One container's endpoint on a talkingdata network of this host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The Docker network's name.
    pub network: String,
    /// The container pool it allocates from (its subnet's network address).
    pub pool: Ipv4Addr,
    pub container: String,
    pub addr: Ipv4Addr,
    pub mac: String,
}

/// What Docker on this host has on talkingdata networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerView {
    pub endpoints: Vec<Endpoint>,
    /// Each network's gateway: (pool, gateway).
    pub gateways: Vec<(Ipv4Addr, Ipv4Addr)>,
}

/// Reads the talkingdata networks' endpoints with `docker network ls` and `inspect`.
pub fn talkingdata_view() -> Result<DockerView, ViewError> {
    let ids = network_ids().map_err(ViewError::Run)?;
    if ids.is_empty() {
        return Ok(DockerView::default());
    }
    let json = inspect_networks(&ids).map_err(ViewError::Run)?;
    parse_networks(&json)
}

/// The talkingdata networks of `docker network inspect`'s JSON array.
pub fn parse_networks(json: &str) -> Result<DockerView, ViewError> {
    let bad = |why: &str| ViewError::BadAnswer(why.to_string());
    let networks: Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let networks = networks.as_array().ok_or_else(|| bad("not a JSON array"))?;
    let mut view = DockerView::default();
    for net in networks {
        if net["IPAM"]["Driver"].as_str() != Some(IPAM_DRIVER) {
            continue;
        }
        let name = net["Name"].as_str().unwrap_or_default().to_string();
        let configs = net["IPAM"]["Config"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(subnet) = configs
            .iter()
            .find_map(|c| c["Subnet"].as_str()?.parse::<Ipv4Net>().ok())
        else {
            log::warn!("Docker network {name} has no IPv4 subnet: skipped");
            continue;
        };
        let pool = subnet.network();
        for c in &configs {
            if let Some(gw) = c["Gateway"].as_str().and_then(|g| g.parse().ok()) {
                view.gateways.push((pool, gw));
            }
        }
        let containers = net["Containers"].as_object().cloned().unwrap_or_default();
        for (id, ep) in containers {
            let Some(addr) = ep["IPv4Address"]
                .as_str()
                .and_then(|a| a.split('/').next()?.parse().ok())
            else {
                continue;
            };
            let container = match ep["Name"].as_str() {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => id.chars().take(12).collect(),
            };
            view.endpoints.push(Endpoint {
                network: name.clone(),
                pool,
                container,
                addr,
                mac: ep["MacAddress"]
                    .as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
            });
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSPECT: &str = r#"[
      {"Name":"bridge","IPAM":{"Driver":"default","Config":[{"Subnet":"172.17.0.0/16"}]},
       "Containers":{"x":{"Name":"other","MacAddress":"02:42:ac:11:00:02","IPv4Address":"172.17.0.2/16"}}},
      {"Name":"mynet","IPAM":{"Driver":"talkingdata","Config":[{"Subnet":"192.0.2.0/24","Gateway":"192.0.2.10"}]},
       "Containers":{"abc":{"Name":"c1","MacAddress":"02:42:C0:00:02:65","IPv4Address":"192.0.2.101/24"},
                     "def":{"Name":"c2","MacAddress":"02:42:c0:00:02:66","IPv4Address":"192.0.2.102/24"},
                     "ghi":{"Name":"c3","MacAddress":"02:42:c0:00:02:67","IPv4Address":"192.0.2.103/24"},
                     "jkl":{"Name":"c4","MacAddress":"02:42:c0:00:02:68","IPv4Address":"192.0.2.104/24"}}}
    ]"#;

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

    #[test]
    fn reads_only_talkingdata_networks() {
        let view = parse_networks(INSPECT).unwrap();
        assert_eq!(view.endpoints.len(), 4);
        let c1 = view.endpoints.iter().find(|e| e.container == "c1").unwrap();
        assert_eq!(c1.mac, "02:42:c0:00:02:65");
        assert_eq!(c1.pool, "192.0.2.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            view.gateways,
            vec![("192.0.2.0".parse().unwrap(), "192.0.2.10".parse().unwrap())]
        );
        assert!(parse_networks("{}").is_err());
    }
}
