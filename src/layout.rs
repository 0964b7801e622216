//! Where things live in etcd: the key layout shared with the original tool, and the JSON values
//! stored under it.
//!
//! ```text
//! <prefix>/hosts/config                    {"Subnet":"192.0.2.0/24","Gateway":"192.0.2.1"}
//! <prefix>/hosts/pool/<ip>                 ""            free host address
//! <prefix>/hosts/assigned/<ip>             {owner}       host address in use
//! <prefix>/containers/<net>/config         {"Ipnet":"192.0.2.0","Mask":"24"}
//! <prefix>/containers/<net>/pool/<ip>      ""            free container address
//! <prefix>/containers/<net>/assigned/<ip>  {owner}       container address in use, or reserved
//! ```

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The keys of one installation, under its prefix (`/talkingdata` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn hosts_config(&self) -> String {
        format!("{}/hosts/config", self.prefix)
    }

    /// Everything of the hosts' pool: its config and both directories.
    pub fn hosts_dir(&self) -> String {
        format!("{}/hosts", self.prefix)
    }

    /// Everything of the container network whose network address is `net`.
    pub fn container_dir(&self, net: Ipv4Addr) -> String {
        format!("{}/containers/{net}", self.prefix)
    }

    /// Where `migrate-v2` records the etcd v2 index it brought over (this tool's own key; the
    /// original has none).
    pub fn migrated_v2(&self) -> String {
        format!("{}/migrated-v2", self.prefix)
    }

    /// The key prefix of this installation, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What a key under the prefix is in the original's layout, if anything.
    pub fn classify(&self, key: &str) -> Option<KeyKind> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let addr = |text: &str| text.parse::<Ipv4Addr>().ok();
        match parts.as_slice() {
            ["hosts", "config"] => Some(KeyKind::HostsConfig),
            ["hosts", "pool", a] => Some(KeyKind::Free(None, addr(a)?)),
            ["hosts", "assigned", a] => Some(KeyKind::Assigned(None, addr(a)?)),
            ["containers", net, "config"] => Some(KeyKind::ContainerConfig(addr(net)?)),
            ["containers", net, "pool", a] => Some(KeyKind::Free(Some(addr(net)?), addr(a)?)),
            ["containers", net, "assigned", a] => {
                Some(KeyKind::Assigned(Some(addr(net)?), addr(a)?))
            }
            _ => None,
        }
    }

    /// The host address pool.
    pub fn hosts(&self) -> PoolKeys {
        PoolKeys::under(&format!("{}/hosts", self.prefix))
    }

    /// The config key of the container network whose network address is `net`.
    pub fn container_config(&self, net: Ipv4Addr) -> String {
        format!("{}/containers/{net}/config", self.prefix)
    }

    /// The container pool of network `net` (its network address: also Docker's PoolID).
    pub fn containers(&self, net: Ipv4Addr) -> PoolKeys {
        PoolKeys::under(&format!("{}/containers/{net}", self.prefix))
    }
}

/// What a key of the layout is. A pool is the hosts' (`None`) or a container network's
/// (`Some(network address)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    HostsConfig,
    ContainerConfig(Ipv4Addr),
    /// A free address of a pool.
    Free(Option<Ipv4Addr>, Ipv4Addr),
    /// An address of a pool in use.
    Assigned(Option<Ipv4Addr>, Ipv4Addr),
}

/// The two directories of one pool: free addresses and addresses in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKeys {
    /// `…/pool/`, with the trailing slash.
    pub pool_dir: String,
    /// `…/assigned/`, with the trailing slash.
    pub assigned_dir: String,
    /// `…/config`: while it exists, the pool is defined.
    pub config: String,
}

impl PoolKeys {
    fn under(base: &str) -> PoolKeys {
        PoolKeys {
            pool_dir: format!("{base}/pool/"),
            assigned_dir: format!("{base}/assigned/"),
            config: format!("{base}/config"),
        }
    }

    pub fn pool(&self, addr: Ipv4Addr) -> String {
        format!("{}{addr}", self.pool_dir)
    }

    pub fn assigned(&self, addr: Ipv4Addr) -> String {
        format!("{}{addr}", self.assigned_dir)
    }

    /// The address a key of either directory names, if it names one.
    pub fn addr_of(&self, key: &str) -> Option<Ipv4Addr> {
        key.strip_prefix(&self.pool_dir)
            .or_else(|| key.strip_prefix(&self.assigned_dir))
            .and_then(|rest| rest.parse().ok())
    }
}

/// `<prefix>/hosts/config`: the subnet hosts and containers share, and its router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsConfig {
    #[serde(rename = "Subnet")]
    pub subnet: String,
    #[serde(rename = "Gateway")]
    pub gateway: String,
}

impl HostsConfig {
    pub fn new(subnet: Ipv4Net, gateway: Ipv4Addr) -> HostsConfig {
        HostsConfig {
            subnet: subnet.to_string(),
            gateway: gateway.to_string(),
        }
    }

    /// The subnet and gateway a stored value names, or `None` if it is not what this tool
    /// writes.
    pub fn parse(value: &str) -> Option<(Ipv4Net, Ipv4Addr)> {
        let config: HostsConfig = serde_json::from_str(value).ok()?;
        Some((config.subnet.parse().ok()?, config.gateway.parse().ok()?))
    }
}

/// `<prefix>/containers/<net>/config`: the container network, address and mask apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    #[serde(rename = "Ipnet")]
    pub ipnet: String,
    #[serde(rename = "Mask")]
    pub mask: String,
}

impl ContainerConfig {
    pub fn new(net: Ipv4Net) -> ContainerConfig {
        ContainerConfig {
            ipnet: net.network().to_string(),
            mask: net.prefix_len().to_string(),
        }
    }

    /// The network a stored value names, or `None` if it is not what this tool writes or has
    /// no usable host addresses (a hand-edited /31 or /32).
    pub fn parse(value: &str) -> Option<Ipv4Net> {
        let config: ContainerConfig = serde_json::from_str(value).ok()?;
        let net = Ipv4Net::new(config.ipnet.parse().ok()?, config.mask.parse().ok()?).ok()?;
        (net.prefix_len() <= crate::addr::MAX_PREFIX_LEN).then_some(net)
    }
}

/// What an address in `assigned/` is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A container's address, taken by the plugin or by hand.
    Container,
    /// A network's gateway as Docker named it: kept out of the pool.
    Gateway,
    /// A network's auxiliary address as Docker named it: kept out of the pool.
    Aux,
    /// A host's own address (`create-network`).
    Host,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Container => "container",
            Role::Gateway => "gateway",
            Role::Aux => "aux",
            Role::Host => "host",
        }
    }
}

/// Who wrote an owner record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordedBy {
    /// This tool, when it took the address: the record names the holder.
    #[default]
    #[serde(rename = "oam-docker-ipam")]
    ThisTool,
    /// `migrate-v2`, for an address the original tool had assigned: it recorded no holder.
    #[serde(rename = "original")]
    Original,
}

impl RecordedBy {
    fn is_this_tool(&self) -> bool {
        *self == RecordedBy::ThisTool
    }
}

/// The value of an `assigned/` key: who holds the address. The original stored "", so a value
/// that does not parse is an owner nobody recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "Role")]
    pub role: Role,
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Mac", default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// When it was taken (UTC, RFC 3339 with nanoseconds; also makes each record unique, so a
    /// retried write can tell its own earlier success from someone else's).
    #[serde(rename = "Since")]
    pub since: String,
    /// Omitted for this tool's own records, so they read as before.
    #[serde(
        rename = "RecordedBy",
        default,
        skip_serializing_if = "RecordedBy::is_this_tool"
    )]
    pub recorded_by: RecordedBy,
    /// The stable identity of the host that took it (`HostIdentity`), which survives a
    /// rename. Absent in records written before it existed: those match by host name.
    #[serde(rename = "HostId", default, skip_serializing_if = "String::is_empty")]
    pub host_id: String,
}

impl Owner {
    /// A record made at `since` (RFC 3339 with nanoseconds: see [`Owner::since`]).
    pub fn new(role: Role, host: &str, mac: &str, since: &str) -> Owner {
        Owner {
            role,
            host: host.into(),
            mac: mac.into(),
            since: since.into(),
            recorded_by: RecordedBy::ThisTool,
            host_id: String::new(),
        }
    }

    /// The same record, naming the stable identity of its host as well.
    pub fn with_host_id(mut self, id: &str) -> Owner {
        self.host_id = id.into();
        self
    }

    /// The record `migrate-v2` writes for an address the original tool had assigned for
    /// `role`: no host, no MAC, since the migration.
    pub fn original(role: Role, since: &str) -> Owner {
        Owner {
            recorded_by: RecordedBy::Original,
            ..Owner::new(role, "", "", since)
        }
    }

    pub fn is_original(&self) -> bool {
        self.recorded_by == RecordedBy::Original
    }

    pub fn to_json(&self) -> String {
        // Serializing a struct of strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Option<Owner> {
        serde_json::from_str(text).ok()
    }

    /// For messages: "host h2 (mac 02:42:…)", "the gateway of host h1".
    pub fn describe(&self) -> String {
        if self.is_original() {
            return format!(
                "a {} of the original tool (migrated from etcd v2; holder not recorded)",
                self.role.as_str()
            );
        }
        let host = if self.host.is_empty() {
            "an unknown host"
        } else {
            self.host.as_str()
        };
        match self.role {
            Role::Container if self.mac.is_empty() => format!("a container on host {host}"),
            Role::Container => format!("host {host} (mac {})", self.mac),
            Role::Gateway => format!("the network gateway (reserved by host {host})"),
            Role::Aux => format!("an auxiliary address (reserved by host {host})"),
            Role::Host => format!("host {host} as its own address"),
        }
    }
}

/// Describes the holder of an `assigned/` value, including the original's empty values.
pub fn describe_holder(value: &str) -> String {
    Owner::from_json(value)
        .map(|o| o.describe())
        .unwrap_or_else(|| "an unrecorded owner".into())
}

/// Who a host is: its name, and a stable identity that survives a rename (empty when none is
/// known, and then the name alone identifies it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostIdentity {
    pub name: String,
    pub id: String,
}

impl HostIdentity {
    pub fn new(name: &str, id: &str) -> HostIdentity {
        HostIdentity {
            name: name.into(),
            id: id.into(),
        }
    }

    /// A record of `role` for this host, made at `since`.
    pub fn owner(&self, role: Role, mac: &str, since: &str) -> Owner {
        Owner::new(role, &self.name, mac, since).with_host_id(&self.id)
    }
}

/// Tells whether a record names a host: by identity where both sides have one, else by name.
pub trait HostMatch {
    fn is_holder(&self, owner: &Owner) -> bool;

    /// The same host as an identity, to keep.
    fn identity(&self) -> HostIdentity;
}

impl HostMatch for HostIdentity {
    fn is_holder(&self, owner: &Owner) -> bool {
        if !self.id.is_empty() && !owner.host_id.is_empty() {
            owner.host_id == self.id
        } else {
            owner.host == self.name
        }
    }

    fn identity(&self) -> HostIdentity {
        self.clone()
    }
}

/// A bare host name: the name alone.
impl HostMatch for str {
    fn is_holder(&self, owner: &Owner) -> bool {
        owner.host == self
    }

    fn identity(&self) -> HostIdentity {
        HostIdentity::new(self, "")
    }
}

impl HostMatch for String {
    fn is_holder(&self, owner: &Owner) -> bool {
        self.as_str().is_holder(owner)
    }

    fn identity(&self) -> HostIdentity {
        self.as_str().identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_original_layout() {
        let l = Layout::new("/talkingdata/");
        let a: Ipv4Addr = "192.168.0.5".parse().unwrap();
        let net: Ipv4Addr = "192.168.0.0".parse().unwrap();
        assert_eq!(l.hosts_config(), "/talkingdata/hosts/config");
        assert_eq!(l.hosts().pool(a), "/talkingdata/hosts/pool/192.168.0.5");
        assert_eq!(
            l.hosts().assigned(a),
            "/talkingdata/hosts/assigned/192.168.0.5"
        );
        assert_eq!(
            l.container_config(net),
            "/talkingdata/containers/192.168.0.0/config"
        );
        let c = l.containers(net);
        assert_eq!(
            c.pool(a),
            "/talkingdata/containers/192.168.0.0/pool/192.168.0.5"
        );
        assert_eq!(
            c.assigned(a),
            "/talkingdata/containers/192.168.0.0/assigned/192.168.0.5"
        );
        assert_eq!(c.addr_of(&c.assigned(a)), Some(a));
        assert_eq!(
            c.addr_of("/talkingdata/containers/192.168.0.0/config"),
            None
        );
        assert_eq!(l.classify(&l.hosts_config()), Some(KeyKind::HostsConfig));
        assert_eq!(
            l.classify(&l.hosts().assigned(a)),
            Some(KeyKind::Assigned(None, a))
        );
        assert_eq!(l.classify(&c.pool(a)), Some(KeyKind::Free(Some(net), a)));
        assert_eq!(
            l.classify(&l.container_config(net)),
            Some(KeyKind::ContainerConfig(net))
        );
        for other in [
            "/talkingdata/hosts/pool/x",
            "/talkingdata/hosts",
            "/talkingdatax/hosts/config",
            "/talkingdata/containers/192.168.0.0/pool/1.2.3.4/extra",
        ] {
            assert_eq!(l.classify(other), None, "{other}");
        }
    }

    #[test]
    fn configs_serialize_as_the_original() {
        let net: Ipv4Net = "192.168.0.0/24".parse().unwrap();
        let hosts = HostsConfig::new(net, "192.168.0.1".parse().unwrap());
        assert_eq!(
            serde_json::to_string(&hosts).unwrap(),
            r#"{"Subnet":"192.168.0.0/24","Gateway":"192.168.0.1"}"#
        );
        assert_eq!(
            serde_json::to_string(&ContainerConfig::new(net)).unwrap(),
            r#"{"Ipnet":"192.168.0.0","Mask":"24"}"#
        );
        let stored = serde_json::to_string(&ContainerConfig::new(net)).unwrap();
        assert_eq!(ContainerConfig::parse(&stored), Some(net));
        assert_eq!(
            ContainerConfig::parse(r#"{"Ipnet":"192.0.2.0","Mask":"31"}"#),
            None
        );
        assert_eq!(ContainerConfig::parse(""), None);
    }

    #[test]
    fn owners_round_trip_and_describe() {
        let o = Owner::new(
            Role::Container,
            "h2",
            "02:42:00:00:00:01",
            &crate::host::now(),
        );
        let back = Owner::from_json(&o.to_json()).unwrap();
        assert_eq!(back, o);
        assert_eq!(back.describe(), "host h2 (mac 02:42:00:00:00:01)");
        assert_eq!(describe_holder(""), "an unrecorded owner");
        assert!(!o.to_json().contains("RecordedBy"), "{}", o.to_json());
    }

    #[test]
    fn identities_match_by_id_and_records_without_one_by_name() {
        let old = Owner::new(
            Role::Container,
            "h1",
            "02:42:00:00:00:01",
            &crate::host::now(),
        );
        assert!(!old.to_json().contains("HostId"), "{}", old.to_json());
        let renamed = HostIdentity::new("h1-new", "abc");
        assert!(!renamed.is_holder(&old));
        assert!(HostIdentity::new("h1", "abc").is_holder(&old));
        let new = renamed.owner(Role::Container, "02:42:00:00:00:01", &crate::host::now());
        let back = Owner::from_json(&new.to_json()).unwrap();
        assert_eq!(back.host_id, "abc");
        assert!(HostIdentity::new("h1-newer", "abc").is_holder(&back));
        assert!(!HostIdentity::new("h1-new", "xyz").is_holder(&back));
        assert!(HostIdentity::new("h1-new", "").is_holder(&back));
        assert!("h1-new".is_holder(&back));
        // A record of the previous version reads as before.
        let stored = r#"{"Role":"container","Host":"h1","Mac":"02:42:00:00:00:01","Since":"x"}"#;
        assert_eq!(Owner::from_json(stored).unwrap().host_id, "");
    }

    #[test]
    fn records_of_the_original_say_so() {
        let o = Owner::original(Role::Container, &crate::host::now());
        let json = o.to_json();
        assert!(json.contains(r#""RecordedBy":"original""#), "{json}");
        let back = Owner::from_json(&json).unwrap();
        assert!(back.is_original());
        assert_eq!(
            back.describe(),
            "a container of the original tool (migrated from etcd v2; holder not recorded)"
        );
        assert!(!Owner::new(Role::Container, "h1", "", &crate::host::now()).is_original());
    }
}
