//! Looking without touching: one consistent read of every pool under the prefix (a single etcd
//! range, so one revision), and what `show` and `check` make of it, for people and as stable
//! JSON. Nothing here writes to the store.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::addr::is_host_of;
use crate::kv::{KeyValue, Kv, Range, StoreError};
use crate::layout::{describe_holder, ContainerConfig, HostsConfig, KeyKind, Layout, Owner, Role};

/// One pool as stored: its config and both directories.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    /// `None` for the hosts' pool; a container network's network address (its pool ID).
    pub id: Option<Ipv4Addr>,
    pub config_key: String,
    /// The config as stored, if any.
    pub config: Option<String>,
    /// The network the config names, if it parses.
    pub net: Option<Ipv4Net>,
    /// The hosts' gateway (hosts' pool only), if its config parses.
    pub gateway: Option<Ipv4Addr>,
    /// Free addresses and their keys.
    pub free: BTreeMap<Ipv4Addr, String>,
    /// Addresses in use and their records (key, value, revision).
    pub assigned: BTreeMap<Ipv4Addr, KeyValue>,
}

impl Pool {
    fn new(id: Option<Ipv4Addr>, layout: &Layout) -> Pool {
        Pool {
            id,
            config_key: match id {
                None => layout.hosts_config(),
                Some(net) => layout.container_config(net),
            },
            ..Pool::default()
        }
    }

    /// `hosts` or the network's pool ID, as `show` takes it.
    pub fn name(&self) -> String {
        match self.id {
            None => "hosts".into(),
            Some(id) => id.to_string(),
        }
    }

    fn is_empty(&self) -> bool {
        self.config.is_none() && self.free.is_empty() && self.assigned.is_empty()
    }
}

/// Every pool of an installation, read at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub hosts: Pool,
    pub containers: BTreeMap<Ipv4Addr, Pool>,
    /// Keys under the prefix that are no part of the layout.
    pub stray: Vec<String>,
}

impl Snapshot {
    /// Reads every key under the prefix in one request.
    pub fn read<K: Kv>(kv: &K, layout: &Layout) -> Result<Snapshot, StoreError> {
        let all = kv.range(&Range::prefix(format!("{}/", layout.prefix())))?;
        let mut snap = Snapshot {
            hosts: Pool::new(None, layout),
            ..Snapshot::default()
        };
        for entry in all {
            match layout.classify(&entry.key) {
                Some(KeyKind::HostsConfig) => {
                    let parsed = HostsConfig::parse(&entry.value);
                    snap.hosts.net = parsed.map(|(net, _)| net);
                    snap.hosts.gateway = parsed.map(|(_, gw)| gw);
                    snap.hosts.config = Some(entry.value);
                }
                Some(KeyKind::ContainerConfig(id)) => {
                    let pool = snap.pool_mut(Some(id), layout);
                    pool.net = ContainerConfig::parse(&entry.value);
                    pool.config = Some(entry.value);
                }
                Some(KeyKind::Free(id, addr)) => {
                    snap.pool_mut(id, layout).free.insert(addr, entry.key);
                }
                Some(KeyKind::Assigned(id, addr)) => {
                    snap.pool_mut(id, layout).assigned.insert(addr, entry);
                }
                None if entry.key == layout.migrated_v2() => {}
                None => snap.stray.push(entry.key),
            }
        }
        Ok(snap)
    }

    fn pool_mut(&mut self, id: Option<Ipv4Addr>, layout: &Layout) -> &mut Pool {
        match id {
            None => &mut self.hosts,
            Some(id) => self
                .containers
                .entry(id)
                .or_insert_with(|| Pool::new(Some(id), layout)),
        }
    }

    /// The hosts' pool (if anything of it is stored), then each container pool.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        std::iter::once(&self.hosts)
            .filter(|p| !p.is_empty())
            .chain(self.containers.values())
    }
}

/// What one address of a pool is, for `show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressView {
    pub address: String,
    /// `assigned` or `free`.
    pub state: &'static str,
    /// `container`, `host`, `gateway`, `aux`, or null (free, or a record that does not parse).
    pub role: Option<&'static str>,
    pub host: Option<String>,
    pub host_id: Option<String>,
    pub mac: Option<String>,
    pub since: Option<String>,
    /// `oam-docker-ipam` or `original` (migrated from etcd v2); null if free or unparseable.
    pub recorded_by: Option<&'static str>,
    /// The holder in words, as errors name it; empty when free.
    pub holder: String,
    pub key: String,
}

impl AddressView {
    fn assigned(addr: Ipv4Addr, record: &KeyValue) -> AddressView {
        let owner = Owner::from_json(&record.value);
        let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
        AddressView {
            address: addr.to_string(),
            state: "assigned",
            role: owner.as_ref().map(|o| o.role.as_str()),
            host: owner.as_ref().and_then(|o| text(&o.host)),
            host_id: owner.as_ref().and_then(|o| text(&o.host_id)),
            mac: owner.as_ref().and_then(|o| text(&o.mac)),
            since: owner.as_ref().and_then(|o| text(&o.since)),
            recorded_by: owner.as_ref().map(|o| {
                if o.is_original() {
                    "original"
                } else {
                    "oam-docker-ipam"
                }
            }),
            holder: describe_holder(&record.value),
            key: record.key.clone(),
        }
    }

    fn free(addr: Ipv4Addr, key: &str) -> AddressView {
        AddressView {
            address: addr.to_string(),
            state: "free",
            role: None,
            host: None,
            host_id: None,
            mac: None,
            since: None,
            recorded_by: None,
            holder: String::new(),
            key: key.into(),
        }
    }
}

/// One pool in `show`: counts, and the addresses asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolView {
    /// `hosts` or `containers`.
    pub kind: &'static str,
    /// The pool ID (network address) of a container pool; null for the hosts'.
    pub id: Option<String>,
    /// The network its config names (A.B.C.D/N); null if the config is missing or unreadable.
    pub network: Option<String>,
    /// The hosts' gateway; null for container pools.
    pub gateway: Option<String>,
    /// Lowest and highest address in the pool (free or assigned); null if it holds none.
    pub first: Option<String>,
    pub last: Option<String>,
    /// Addresses in the pool: free plus assigned.
    pub size: usize,
    pub free: usize,
    /// Assigned to containers by this tool.
    pub containers: usize,
    /// Held by hosts as their own (`create-network`).
    pub hosts: usize,
    /// Reserved for a Docker network's gateway or auxiliary address.
    pub reserved: usize,
    /// Held by the original tool (migrated, holder not recorded).
    pub original: usize,
    /// Records that do not parse (such as the original's empty values).
    pub unrecorded: usize,
    pub addresses: Vec<AddressView>,
}

/// What `show` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShowView {
    pub pools: Vec<PoolView>,
}

/// Which addresses `show` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// Every assigned address of every pool shown (JSON without `--ip`).
    Assigned,
    /// Counts only (the human summary of every pool).
    None,
    /// Only this address, free or assigned; pools without it are left out.
    Address(Ipv4Addr),
}

fn pool_view(pool: &Pool, listing: Listing) -> PoolView {
    let mut view = PoolView {
        kind: if pool.id.is_none() {
            "hosts"
        } else {
            "containers"
        },
        id: pool.id.map(|id| id.to_string()),
        network: pool.net.map(|n| n.to_string()),
        gateway: pool.gateway.map(|g| g.to_string()),
        first: None,
        last: None,
        size: 0,
        free: pool.free.len(),
        containers: 0,
        hosts: 0,
        reserved: 0,
        original: 0,
        unrecorded: 0,
        addresses: Vec::new(),
    };
    let all: BTreeSet<Ipv4Addr> = pool
        .free
        .keys()
        .chain(pool.assigned.keys())
        .copied()
        .collect();
    view.size = all.len();
    view.first = all.first().map(|a| a.to_string());
    view.last = all.last().map(|a| a.to_string());
    for record in pool.assigned.values() {
        match Owner::from_json(&record.value) {
            None => view.unrecorded += 1,
            Some(o) if o.is_original() => view.original += 1,
            Some(o) => match o.role {
                Role::Container => view.containers += 1,
                Role::Host => view.hosts += 1,
                Role::Gateway | Role::Aux => view.reserved += 1,
            },
        }
    }
    match listing {
        Listing::None => {}
        Listing::Assigned => {
            view.addresses = pool
                .assigned
                .iter()
                .map(|(a, r)| AddressView::assigned(*a, r))
                .collect();
        }
        Listing::Address(addr) => {
            if let Some(record) = pool.assigned.get(&addr) {
                view.addresses.push(AddressView::assigned(addr, record));
            }
            if let Some(key) = pool.free.get(&addr) {
                view.addresses.push(AddressView::free(addr, key));
            }
        }
    }
    view
}

/// Why `show` could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShowError {
    /// No pool of that name is stored.
    NoPool(String),
    /// The network was given with a prefix length other than its pool's.
    WrongMask { given: String, pool: Ipv4Net },
}

impl std::fmt::Display for ShowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShowError::NoPool(name) => write!(f, "no pool {name} in etcd"),
            ShowError::WrongMask { given, pool } => {
                write!(f, "{given} does not match the container pool {pool}")
            }
        }
    }
}

impl std::error::Error for ShowError {}

/// The pools `show` lists: one (`pool`) or all, each with the addresses `listing` names.
pub fn show(
    snap: &Snapshot,
    pool: Option<crate::cli::PoolName>,
    listing: Listing,
) -> Result<ShowView, ShowError> {
    use crate::cli::PoolName;
    let chosen: Vec<&Pool> = match pool {
        None => snap.pools().collect(),
        Some(PoolName::Hosts) if snap.hosts.is_empty() => {
            return Err(ShowError::NoPool("hosts".into()))
        }
        Some(PoolName::Hosts) => vec![&snap.hosts],
        Some(PoolName::Containers(id, len)) => {
            let found = snap
                .containers
                .get(&id)
                .ok_or_else(|| ShowError::NoPool(id.to_string()))?;
            if let (Some(len), Some(net)) = (len, found.net) {
                if net.prefix_len() != len {
                    return Err(ShowError::WrongMask {
                        given: format!("{id}/{len}"),
                        pool: net,
                    });
                }
            }
            vec![found]
        }
    };
    let pools = chosen
        .into_iter()
        .map(|p| pool_view(p, listing))
        .filter(|v| !matches!(listing, Listing::Address(_)) || !v.addresses.is_empty())
        .collect();
    Ok(ShowView { pools })
}

/// `show`'s table for people: one line per pool, then the addresses listed, if any.
pub fn show_text(view: &ShowView, addresses: bool) -> String {
    let mut out = String::new();
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "{:<16} {:<18} {:<33} {:>6} {:>6} {:>10} {:>5} {:>8} {:>8} {:>10}",
        "POOL",
        "NETWORK",
        "RANGE",
        "SIZE",
        "FREE",
        "CONTAINERS",
        "HOSTS",
        "RESERVED",
        "ORIGINAL",
        "UNRECORDED"
    );
    for p in &view.pools {
        let range = match (&p.first, &p.last) {
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<18} {:<33} {:>6} {:>6} {:>10} {:>5} {:>8} {:>8} {:>10}",
            p.id.clone().unwrap_or_else(|| "hosts".into()),
            dash(&p.network),
            range,
            p.size,
            p.free,
            p.containers,
            p.hosts,
            p.reserved,
            p.original,
            p.unrecorded
        );
    }
    if let Some(gw) = view.pools.iter().find_map(|p| p.gateway.clone()) {
        let _ = writeln!(out, "hosts' gateway: {gw}");
    }
    if addresses {
        let _ = writeln!(
            out,
            "\n{:<16} {:<16} {:<9} {:<10} {:<16} {:<18} {:<31} HOLDER",
            "POOL", "ADDRESS", "STATE", "ROLE", "HOST", "MAC", "SINCE"
        );
        for p in &view.pools {
            for a in &p.addresses {
                let _ = writeln!(
                    out,
                    "{:<16} {:<16} {:<9} {:<10} {:<16} {:<18} {:<31} {}",
                    p.id.clone().unwrap_or_else(|| "hosts".into()),
                    a.address,
                    a.state,
                    a.role.unwrap_or("-"),
                    dash(&a.host),
                    dash(&a.mac),
                    dash(&a.since),
                    if a.holder.is_empty() { "-" } else { &a.holder }
                );
            }
        }
    }
    out
}

/// One broken invariant, named by the key that shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub key: String,
    pub problem: String,
}

/// What `check` found: violations (exit status 1) and notes (for information).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    /// Pools read and addresses (keys of pool/ and assigned/) checked.
    pub pools: usize,
    pub addresses: usize,
    pub violations: Vec<Finding>,
    pub notes: Vec<Finding>,
}

/// Checks every invariant of the store on one snapshot.
pub fn check(snap: &Snapshot) -> CheckReport {
    let mut bad = Vec::new();
    let mut notes = Vec::new();
    let hosts_gateway = snap.hosts.gateway;
    let mut seen: BTreeMap<Ipv4Addr, Vec<(String, String)>> = BTreeMap::new();
    let mut addresses = 0;
    for pool in snap.pools() {
        let label = match pool.id {
            None => "the host pool".to_string(),
            Some(id) => format!("container pool {id}"),
        };
        let keys = pool.free.len() + pool.assigned.len();
        addresses += keys;
        match (&pool.config, pool.net) {
            (None, _) => bad.push(Finding {
                key: pool.config_key.clone(),
                problem: format!("missing, but {label} holds {keys} address key(s)"),
            }),
            (Some(value), None) => bad.push(Finding {
                key: pool.config_key.clone(),
                problem: format!("holds {value:?}, which does not parse"),
            }),
            (Some(_), Some(net)) => {
                if let Some(id) = pool.id.filter(|id| *id != net.network()) {
                    bad.push(Finding {
                        key: pool.config_key.clone(),
                        problem: format!("names network {net}, not the pool's {id}"),
                    });
                }
            }
        }
        if pool.id.is_none() {
            if let (Some(gw), Some(net)) = (hosts_gateway, pool.net) {
                if !is_host_of(gw, net) {
                    bad.push(Finding {
                        key: pool.config_key.clone(),
                        problem: format!("gateway {gw} is not a host address of {net}"),
                    });
                }
            }
        }
        let keyed = pool
            .free
            .iter()
            .map(|(a, k)| (*a, k.clone()))
            .chain(pool.assigned.iter().map(|(a, r)| (*a, r.key.clone())));
        for (addr, key) in keyed {
            seen.entry(addr)
                .or_default()
                .push((label.clone(), key.clone()));
            if let Some(net) = pool.net {
                let problem = if !net.contains(&addr) {
                    Some(format!("{addr} is outside the network {net}"))
                } else if addr == net.network() {
                    Some(format!("the network address of {net} is pooled"))
                } else if addr == net.broadcast() {
                    Some(format!("the broadcast address of {net} is pooled"))
                } else if Some(addr) == hosts_gateway {
                    Some(format!("the hosts' gateway {addr} is pooled"))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    bad.push(Finding { key, problem });
                }
            }
        }
        for (addr, key) in &pool.free {
            if let Some(record) = pool.assigned.get(addr) {
                bad.push(Finding {
                    key: key.clone(),
                    problem: format!(
                        "{addr} is free and assigned at once (also {}, held by {})",
                        record.key,
                        describe_holder(&record.value)
                    ),
                });
            }
        }
        for (addr, record) in &pool.assigned {
            match Owner::from_json(&record.value) {
                None => bad.push(Finding {
                    key: record.key.clone(),
                    problem: format!("owner record {:?} does not parse", record.value),
                }),
                Some(o) if o.role == Role::Aux => notes.push(Finding {
                    key: record.key.clone(),
                    problem: format!(
                        "{addr} is an auxiliary address of Docker network {} (reserved by \
                         host {}); it stays reserved while any host's network names it",
                        pool.net.map_or(pool.name(), |n| n.to_string()),
                        o.host
                    ),
                }),
                Some(o) if o.role == Role::Gateway => notes.push(Finding {
                    key: record.key.clone(),
                    problem: format!(
                        "{addr} is the gateway of Docker network {} on host {}; freed when \
                         that host removes the network",
                        pool.net.map_or(pool.name(), |n| n.to_string()),
                        o.host
                    ),
                }),
                Some(_) => {}
            }
        }
    }
    for (addr, places) in &seen {
        // One address in two pools: the host pool and a container pool, or two networks.
        let pools: BTreeSet<&String> = places.iter().map(|(label, _)| label).collect();
        if pools.len() > 1 {
            for (label, key) in places.iter().skip(1) {
                let (first_label, first_key) = &places[0];
                bad.push(Finding {
                    key: key.clone(),
                    problem: format!(
                        "{addr} is in {label} and also in {first_label} ({first_key})"
                    ),
                });
            }
        }
    }
    for key in &snap.stray {
        bad.push(Finding {
            key: key.clone(),
            problem: "not a key of this tool's layout".into(),
        });
    }
    bad.sort();
    bad.dedup();
    CheckReport {
        ok: bad.is_empty(),
        pools: snap.pools().count(),
        addresses,
        violations: bad,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::memory::MemKv;
    use crate::kv::{Op, Txn};
    use crate::layout::Owner;

    fn put(kv: &MemKv, key: &str, value: &str) {
        kv.txn(&Txn {
            success: vec![Op::put(key, value)],
            ..Txn::default()
        })
        .unwrap();
    }

    fn consistent() -> MemKv {
        let kv = MemKv::new();
        put(
            &kv,
            "/t/hosts/config",
            r#"{"Subnet":"192.0.2.0/24","Gateway":"192.0.2.1"}"#,
        );
        put(&kv, "/t/hosts/pool/192.0.2.10", "");
        let host = Owner::new(Role::Host, "h1", "", &crate::host::now()).to_json();
        put(&kv, "/t/hosts/assigned/192.0.2.11", &host);
        put(
            &kv,
            "/t/containers/192.0.2.0/config",
            r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
        );
        put(&kv, "/t/containers/192.0.2.0/pool/192.0.2.100", "");
        let c = Owner::new(
            Role::Container,
            "h1",
            "02:42:00:00:00:01",
            &crate::host::now(),
        )
        .to_json();
        put(&kv, "/t/containers/192.0.2.0/assigned/192.0.2.101", &c);
        let aux = Owner::new(Role::Aux, "h1", "", &crate::host::now()).to_json();
        put(&kv, "/t/containers/192.0.2.0/assigned/192.0.2.102", &aux);
        put(&kv, "/t/migrated-v2", "7");
        kv
    }

    #[test]
    fn a_consistent_store_passes_with_notes_on_reservations() {
        let kv = consistent();
        let snap = Snapshot::read(&kv, &Layout::new("/t")).unwrap();
        let report = check(&snap);
        assert!(report.ok, "{:?}", report.violations);
        assert_eq!((report.pools, report.addresses), (2, 5));
        assert_eq!(report.notes.len(), 1);
        assert!(report.notes[0]
            .problem
            .contains("auxiliary address of Docker network 192.0.2.0/24"));
        let view = show(&snap, None, Listing::Assigned).unwrap();
        assert_eq!(view.pools.len(), 2);
        let c = &view.pools[1];
        assert_eq!((c.size, c.free, c.containers, c.reserved), (3, 1, 1, 1));
        assert_eq!(c.addresses[0].mac.as_deref(), Some("02:42:00:00:00:01"));
        assert_eq!(c.addresses[0].host.as_deref(), Some("h1"));
        assert!(show_text(&view, true).contains("192.0.2.101"));
    }

    #[test]
    fn each_broken_invariant_is_named_by_its_key() {
        let kv = consistent();
        put(&kv, "/t/containers/192.0.2.0/pool/192.0.2.101", "");
        put(&kv, "/t/containers/192.0.2.0/pool/192.0.2.255", "");
        put(&kv, "/t/containers/192.0.2.0/pool/192.0.2.1", "");
        put(&kv, "/t/containers/192.0.2.0/pool/198.51.100.1", "");
        put(&kv, "/t/containers/192.0.2.0/pool/192.0.2.11", "");
        put(&kv, "/t/containers/192.0.2.0/assigned/192.0.2.103", "");
        put(&kv, "/t/containers/198.51.100.0/pool/198.51.100.5", "");
        put(&kv, "/t/containers/203.0.113.0/config", "nonsense");
        put(&kv, "/t/containers/192.0.2.0/pool/junk", "");
        let snap = Snapshot::read(&kv, &Layout::new("/t")).unwrap();
        let report = check(&snap);
        let said: Vec<String> = report
            .violations
            .iter()
            .map(|f| format!("{}: {}", f.key, f.problem))
            .collect();
        let want = [
            "/t/containers/192.0.2.0/pool/192.0.2.101: 192.0.2.101 is free and assigned at once",
            "/t/containers/192.0.2.0/pool/192.0.2.255: the broadcast address of 192.0.2.0/24 is pooled",
            "/t/containers/192.0.2.0/pool/192.0.2.1: the hosts' gateway 192.0.2.1 is pooled",
            "/t/containers/192.0.2.0/pool/198.51.100.1: 198.51.100.1 is outside the network 192.0.2.0/24",
            "/t/containers/192.0.2.0/pool/192.0.2.11: 192.0.2.11 is in container pool 192.0.2.0 and also in the host pool (/t/hosts/assigned/192.0.2.11)",
            "/t/containers/192.0.2.0/assigned/192.0.2.103: owner record \"\" does not parse",
            "/t/containers/198.51.100.0/config: missing",
            "/t/containers/203.0.113.0/config: holds \"nonsense\", which does not parse",
            "/t/containers/192.0.2.0/pool/junk: not a key of this tool's layout",
        ];
        for w in want {
            assert!(
                said.iter().any(|s| s.starts_with(w)),
                "{w} not in {said:#?}"
            );
        }
        assert_eq!(said.len(), want.len(), "{said:#?}");
    }

    #[test]
    fn show_finds_one_address_wherever_it_is() {
        let kv = consistent();
        let snap = Snapshot::read(&kv, &Layout::new("/t")).unwrap();
        let a: Ipv4Addr = "192.0.2.101".parse().unwrap();
        let view = show(&snap, None, Listing::Address(a)).unwrap();
        assert_eq!(view.pools.len(), 1);
        assert_eq!(view.pools[0].addresses[0].state, "assigned");
        let none = show(&snap, None, Listing::Address("192.0.2.77".parse().unwrap())).unwrap();
        assert!(none.pools.is_empty());
        use crate::cli::PoolName;
        let wrong = PoolName::Containers("192.0.2.0".parse().unwrap(), Some(25));
        assert!(matches!(
            show(&snap, Some(wrong), Listing::None),
            Err(ShowError::WrongMask { .. })
        ));
        let missing = PoolName::Containers("198.51.100.0".parse().unwrap(), None);
        assert_eq!(
            show(&snap, Some(missing), Listing::None),
            Err(ShowError::NoPool("198.51.100.0".into()))
        );
    }
}
