//! Docker's remote IPAM protocol: the calls dockerd makes (path and JSON body in, status and
//! JSON body out) answered from the pools. Knows nothing of sockets or HTTP framing.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::alloc::{AllocError, Allocator, Released, Taken};
use crate::kv::Kv;
use crate::layout::{HostIdentity, Layout, Owner, Role};
use crate::pools::{self, ContainerNetwork};

/// The content type Docker's own plugin helpers answer with.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// The option Docker sets on the gateway's RequestAddress.
const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
const GATEWAY_TYPE: &str = "com.docker.network.gateway";
/// The option carrying a container endpoint's MAC (sent because we require it).
const MAC_OPTION: &str = "com.docker.network.endpoint.macaddress";

/// An answer to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    fn ok(body: Value) -> Answer {
        Answer {
            status: 200,
            body: body.to_string(),
        }
    }

    /// Docker shows `Err` to the person who ran the command, after "IpamDriver.<Call>: ".
    fn err(status: u16, message: impl Into<String>) -> Answer {
        Answer {
            status,
            body: json!({ "Err": message.into() }).to_string(),
        }
    }
}

/// A failed call: the status to answer with and the message for Docker's user.
struct Refusal(u16, String);

impl<E: std::fmt::Display> From<E> for Refusal {
    fn from(e: E) -> Refusal {
        Refusal(500, e.to_string())
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal(400, message.into())
}

#[derive(Deserialize)]
struct RequestPool {
    #[serde(rename = "Pool", default)]
    pool: String,
    #[serde(rename = "SubPool", default)]
    sub_pool: String,
    #[serde(rename = "V6", default)]
    v6: bool,
}

#[derive(Deserialize)]
struct RequestAddress {
    #[serde(rename = "PoolID")]
    pool_id: String,
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "Options", default)]
    options: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pool_id: String,
    #[serde(rename = "Address")]
    address: String,
}

/// The plugin's state: the allocator, and the container networks already read from etcd
/// (PoolID → network), since a pool's config does not change under a running network.
pub struct Plugin<K> {
    alloc: Allocator<K>,
    layout: Layout,
    host: String,
    /// This host's stable identity (empty: the name alone identifies it).
    host_id: String,
    networks: HashMap<Ipv4Addr, Ipv4Net>,
}

impl<K: Kv> Plugin<K> {
    /// A plugin on host `host` (recorded as the owner of what it takes).
    pub fn new(kv: K, layout: Layout, host: String) -> Plugin<K> {
        Plugin {
            alloc: Allocator::new(kv),
            layout,
            host,
            host_id: String::new(),
            networks: HashMap::new(),
        }
    }

    /// Records `id` as this host's stable identity in what it takes, and releases what
    /// records carrying it hold even after a rename.
    pub fn with_host_id(mut self, id: &str) -> Plugin<K> {
        self.host_id = id.into();
        self
    }

    /// Answers one call. Never panics on what a request contains.
    pub fn handle(&mut self, path: &str, body: &[u8]) -> Answer {
        self.settle();
        let result = match path {
            "/Plugin.Activate" => Ok(json!({ "Implements": ["IpamDriver"] })),
            "/IpamDriver.GetCapabilities" => {
                Ok(json!({ "RequiresMACAddress": true, "RequiresRequestReplay": false }))
            }
            "/IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
                "LocalDefaultAddressSpace": "",
                "GlobalDefaultAddressSpace": ""
            })),
            "/IpamDriver.RequestPool" => parse(body).and_then(|r| self.request_pool(r)),
            "/IpamDriver.ReleasePool" => Ok(self.release_pool(body)),
            "/IpamDriver.RequestAddress" => parse(body).and_then(|r| self.request_address(r)),
            "/IpamDriver.ReleaseAddress" => parse(body).and_then(|r| self.release_address(r)),
            _ => Err(Refusal(404, format!("unknown call {path}"))),
        };
        match result {
            Ok(body) => Answer::ok(body),
            Err(Refusal(status, message)) => {
                log::warn!("{path}: {message}");
                Answer::err(status, message)
            }
        }
    }

    /// Tries again to settle what etcd left unanswered (at most every second).
    pub fn settle(&mut self) {
        self.alloc.settle();
    }

    /// Says, on the way out, what etcd left unanswered: `reconcile` finds it later.
    pub fn leave(&mut self) {
        for item in self.alloc.unsettled() {
            log::warn!("left unsettled at exit: {item}");
        }
    }

    /// Answers a request whose body could not be read, with `status`.
    pub fn refuse(&mut self, status: u16, message: &str) -> Answer {
        log::warn!("refused a request: {message}");
        Answer::err(status, message)
    }

    fn request_pool(&mut self, request: RequestPool) -> Result<Value, Refusal> {
        log::info!("RequestPool {:?}", request.pool);
        if request.v6 {
            return Err(bad_request("IPv6 pools are not supported"));
        }
        if request.pool.is_empty() {
            return Err(bad_request(
                "no subnet given: create the network with --subnet set to a pool defined by \
                 'oam-docker-ipam ip-range'",
            ));
        }
        if !request.sub_pool.is_empty() {
            return Err(bad_request(
                "sub-pools (--ip-range) are not supported: define the range with \
                 'oam-docker-ipam ip-range'",
            ));
        }
        let asked: Ipv4Net = request
            .pool
            .parse()
            .map_err(|_| bad_request(format!("{:?} is not an IPv4 subnet", request.pool)))?;
        let net = self.network(asked.network())?;
        if net != asked.trunc() {
            return Err(bad_request(format!(
                "pool {asked} does not match the container pool {net} defined in etcd"
            )));
        }
        Ok(json!({ "PoolID": net.network().to_string(), "Pool": net.to_string(), "Data": {} }))
    }

    /// The container network whose PoolID (network address) is `id`, from etcd once.
    fn network(&mut self, id: Ipv4Addr) -> Result<Ipv4Net, Refusal> {
        if let Some(net) = self.networks.get(&id) {
            return Ok(*net);
        }
        let net = match pools::container_network(self.alloc.kv(), &self.layout, id)? {
            ContainerNetwork::Defined(net) => net,
            ContainerNetwork::OnlyInOriginal(dir) => {
                return Err(Refusal(
                    404,
                    format!(
                        "the original's etcd v2 data defines this network ({dir}): run \
                         'oam-docker-ipam migrate-v2'"
                    ),
                ))
            }
            ContainerNetwork::Undefined => {
                return Err(Refusal(
                    404,
                    format!(
                        "no container pool {id} in etcd: define one with 'oam-docker-ipam ip-range'"
                    ),
                ))
            }
            ContainerNetwork::Unusable { key, value } => {
                return Err(Refusal(
                    500,
                    format!("{key} holds {value:?}, not a network with usable addresses"),
                ))
            }
        };
        self.networks.insert(id, net);
        Ok(net)
    }

    /// A pool removed meanwhile is forgotten, so that the next RequestPool reads etcd again.
    fn forget_if_gone(&mut self, net: Ipv4Net, e: AllocError) -> AllocError {
        if let AllocError::PoolRemoved { .. } = e {
            self.networks.remove(&net.network());
        }
        e
    }

    fn pool_of(&mut self, pool_id: &str) -> Result<Ipv4Net, Refusal> {
        let id: Ipv4Addr = pool_id
            .parse()
            .map_err(|_| bad_request(format!("unknown pool ID {pool_id:?}")))?;
        self.network(id)
    }

    fn release_pool(&mut self, body: &[u8]) -> Value {
        // Pools are defined with the command line; Docker releasing one changes nothing.
        log::info!(
            "ReleasePool {}: pools stay defined in etcd",
            String::from_utf8_lossy(body)
        );
        json!({})
    }

    fn request_address(&mut self, request: RequestAddress) -> Result<Value, Refusal> {
        let net = self.pool_of(&request.pool_id)?;
        let keys = self.layout.containers(net.network());
        let wanted = match request.address.as_str() {
            "" => None,
            text => {
                // Docker sends a bare address; accept A/N too, N being the pool's.
                let (bare, mask) = match text.split_once('/') {
                    Some((bare, mask)) => (bare, Some(mask)),
                    None => (text, None),
                };
                let addr: Ipv4Addr = bare
                    .parse()
                    .map_err(|_| bad_request(format!("{text:?} is not an IPv4 address")))?;
                if !net.contains(&addr) {
                    return Err(bad_request(format!("{addr} is outside the pool {net}")));
                }
                if let Some(mask) = mask {
                    if mask != net.prefix_len().to_string() {
                        return Err(bad_request(format!(
                            "{text:?}: the pool {net} has prefix length {}",
                            net.prefix_len()
                        )));
                    }
                }
                Some(addr)
            }
        };
        let options = request.options.unwrap_or_default();
        let role = if options.get(REQUEST_ADDRESS_TYPE).map(String::as_str) == Some(GATEWAY_TYPE) {
            Role::Gateway
        } else if options.is_empty() && wanted.is_some() {
            // Docker names aux addresses with no options at all.
            Role::Aux
        } else {
            Role::Container
        };
        let answer = |addr: Ipv4Addr| json!({ "Address": format!("{addr}/{}", net.prefix_len()), "Data": {} });

        let mac = options
            .get(MAC_OPTION)
            .map(String::as_str)
            .unwrap_or_default();
        // The outcome gets the info line: one line per allocation, as the log is written on
        // the request's path.
        log::debug!(
            "RequestAddress {} in pool {} for a {} (mac {mac:?})",
            wanted.map_or("(any)".to_string(), |a| a.to_string()),
            request.pool_id,
            role.as_str()
        );

        if role != Role::Container {
            let Some(addr) = wanted else {
                return Err(bad_request(format!(
                    "a {} request must name its address",
                    role.as_str()
                )));
            };
            let owner =
                Owner::new(role, &self.host, "", &crate::host::now()).with_host_id(&self.host_id);
            self.alloc
                .reserve(&keys, addr, &owner)
                .map_err(|e| self.forget_if_gone(net, e))?;
            return Ok(answer(addr));
        }

        // The MAC tells two containers of one host apart: without it, a retry by one and a
        // request by another for the same --ip could not be told apart.
        if mac.is_empty() {
            return Err(bad_request(format!(
                "a container request must carry its MAC address ({MAC_OPTION}), which Docker \
                 sends because GetCapabilities requires it"
            )));
        }
        if !is_mac(mac) {
            return Err(bad_request(format!("{mac:?} is not a MAC address")));
        }
        let owner = Owner::new(
            Role::Container,
            &self.host,
            &mac.to_ascii_lowercase(),
            &crate::host::now(),
        )
        .with_host_id(&self.host_id);
        let addr = match wanted {
            Some(addr) => {
                let taken = self.alloc.take(&keys, net, addr, &owner);
                if taken.map_err(|e| self.forget_if_gone(net, e))? == Taken::AlreadyYours {
                    log::info!("{addr} is already held by this container: answering it again");
                }
                addr
            }
            None => self
                .alloc
                .take_any(&keys, net, &owner)
                .map_err(|e| self.forget_if_gone(net, e))?,
        };
        log::info!("assigned {addr} to {}", owner.describe());
        Ok(answer(addr))
    }

    fn release_address(&mut self, request: ReleaseAddress) -> Result<Value, Refusal> {
        log::debug!("ReleaseAddress {} in {}", request.address, request.pool_id);
        let net = self.pool_of(&request.pool_id)?;
        let bare = request.address.split('/').next().unwrap_or_default();
        let addr: Ipv4Addr = bare
            .parse()
            .map_err(|_| bad_request(format!("{:?} is not an IPv4 address", request.address)))?;
        let keys = self.layout.containers(net.network());
        let me = HostIdentity::new(&self.host, &self.host_id);
        match self.alloc.release_container(&keys, addr, &me)? {
            Released::Freed { holder } => log::info!("released {addr} (held by {holder})"),
            Released::Kept { holder } => log::info!("kept {addr}: it is held by {holder}"),
            Released::AlreadyFree | Released::Unknown => {
                log::info!("{addr} was not assigned: nothing to release")
            }
        }
        Ok(json!({}))
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("malformed request: {e}")))
}

/// Six hex pairs separated by colons.
fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::memory::MemKv;
    use crate::kv::{Op, Txn};

    fn plugin(kv: &MemKv) -> Plugin<&MemKv> {
        let layout = Layout::new("/t");
        let net: Ipv4Net = "192.0.2.0/24".parse().unwrap();
        let keys = layout.containers(net.network());
        let mut ops = vec![Op::put(
            layout.container_config(net.network()),
            r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
        )];
        ops.extend(net.hosts().map(|a| Op::put(keys.pool(a), "")));
        for chunk in ops.chunks(crate::kv::MAX_TXN_OPS) {
            kv.txn(&Txn {
                success: chunk.to_vec(),
                ..Txn::default()
            })
            .unwrap();
        }
        Plugin::new(kv, layout, "h1".into())
    }

    fn call(p: &mut Plugin<&MemKv>, path: &str, body: &str) -> (u16, Value) {
        let a = p.handle(path, body.as_bytes());
        (a.status, serde_json::from_str(&a.body).unwrap())
    }

    #[test]
    fn answers_dockers_sequence() {
        let kv = MemKv::new();
        let mut p = plugin(&kv);
        assert_eq!(
            call(&mut p, "/Plugin.Activate", "").1,
            json!({"Implements":["IpamDriver"]})
        );
        let (s, pool) = call(
            &mut p,
            "/IpamDriver.RequestPool",
            r#"{"AddressSpace":"","Pool":"192.0.2.0/24","SubPool":"","Options":{},"V6":false}"#,
        );
        assert_eq!(
            (s, pool),
            (
                200,
                json!({"PoolID":"192.0.2.0","Pool":"192.0.2.0/24","Data":{}})
            )
        );
        let gw = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.10","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#;
        assert_eq!(
            call(&mut p, "/IpamDriver.RequestAddress", gw).1["Address"],
            "192.0.2.10/24"
        );
        let aux = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.1","Options":null}"#;
        assert_eq!(
            call(&mut p, "/IpamDriver.RequestAddress", aux).1["Address"],
            "192.0.2.1/24"
        );
        let any = r#"{"PoolID":"192.0.2.0","Address":"","Options":{"com.docker.network.endpoint.macaddress":"02:42:68:43:a9:ad"}}"#;
        let (s, got) = call(&mut p, "/IpamDriver.RequestAddress", any);
        assert_eq!(s, 200);
        let got = got["Address"].as_str().unwrap().to_string();
        assert!(got != "192.0.2.10/24" && got != "192.0.2.1/24", "{got}");
        let fixed = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.99","Options":{"com.docker.network.endpoint.macaddress":"02:42:3a:3c:3b:a9"}}"#;
        assert_eq!(
            call(&mut p, "/IpamDriver.RequestAddress", fixed).1["Address"],
            "192.0.2.99/24"
        );
        let again = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.99","Options":{"com.docker.network.endpoint.macaddress":"02:42:00:00:00:01"}}"#;
        let (s, err) = call(&mut p, "/IpamDriver.RequestAddress", again);
        assert_eq!(s, 500);
        assert_eq!(
            err["Err"],
            "192.0.2.99 is already in use by host h1 (mac 02:42:3a:3c:3b:a9)"
        );
        for addr in ["192.0.2.99", "192.0.2.10", "192.0.2.1", "203.0.113.1"] {
            let body = format!(r#"{{"PoolID":"192.0.2.0","Address":"{addr}"}}"#);
            assert_eq!(
                call(&mut p, "/IpamDriver.ReleaseAddress", &body),
                (200, json!({}))
            );
        }
        assert_eq!(
            call(
                &mut p,
                "/IpamDriver.ReleasePool",
                r#"{"PoolID":"192.0.2.0"}"#
            )
            .0,
            200
        );
    }

    #[test]
    fn refuses_bad_requests_and_keeps_serving() {
        let kv = MemKv::new();
        let mut p = plugin(&kv);
        let cases = [
            ("/Nope", "", 404),
            ("/IpamDriver.RequestPool", "not json", 400),
            (
                "/IpamDriver.RequestPool",
                r#"{"Pool":"198.51.100.0/24"}"#,
                404,
            ),
            ("/IpamDriver.RequestPool", r#"{"Pool":"192.0.2.0/25"}"#, 400),
            (
                "/IpamDriver.RequestPool",
                r#"{"Pool":"2001:db8::/64","V6":true}"#,
                400,
            ),
            ("/IpamDriver.RequestAddress", r#"{"PoolID":5}"#, 400),
            (
                "/IpamDriver.RequestAddress",
                r#"{"PoolID":"192.0.2.0","Address":"198.51.100.1","Options":{"com.docker.network.endpoint.macaddress":"02:42:00:00:00:01"}}"#,
                400,
            ),
            (
                "/IpamDriver.RequestAddress",
                r#"{"PoolID":"192.0.2.0","Address":"","Options":{"com.docker.network.endpoint.macaddress":"zz"}}"#,
                400,
            ),
            // No MAC: two such requests for one --ip could not be told apart.
            (
                "/IpamDriver.RequestAddress",
                r#"{"PoolID":"192.0.2.0","Address":"192.0.2.50","Options":{"other":"x"}}"#,
                400,
            ),
            (
                "/IpamDriver.RequestAddress",
                r#"{"PoolID":"192.0.2.0","Address":""}"#,
                400,
            ),
        ];
        for (path, body, status) in cases {
            let (s, answer) = call(&mut p, path, body);
            assert_eq!(s, status, "{path} {body}: {answer}");
            assert!(answer["Err"].as_str().is_some_and(|e| !e.is_empty()));
        }
        assert_eq!(call(&mut p, "/IpamDriver.GetCapabilities", "").0, 200);
    }

    #[test]
    fn a_pool_only_the_original_defined_needs_migrating() {
        let kv = MemKv::new();
        let mut p = plugin(&kv);
        kv.original_put(
            "/t/containers/198.51.100.0/config",
            r#"{"Ipnet":"198.51.100.0","Mask":"24"}"#,
        );
        let (s, answer) = call(
            &mut p,
            "/IpamDriver.RequestPool",
            r#"{"Pool":"198.51.100.0/24"}"#,
        );
        assert_eq!(s, 404);
        assert_eq!(
            answer["Err"],
            "the original's etcd v2 data defines this network (/t/containers/198.51.100.0): \
             run 'oam-docker-ipam migrate-v2'"
        );
    }
}
