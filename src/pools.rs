//! Defining pools: adding a range of container or host addresses, with its network's config,
//! in batched transactions that never pool an address that is in use. Running the same
//! definition twice changes nothing.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::addr::{is_host_of, AddrRange};
use crate::kv::{Compare, Kv, Op, Range, StoreError, Txn, MAX_TXN_OPS};
use crate::layout::{ContainerConfig, HostsConfig, KeyKind, Layout, PoolKeys};

/// Why a range could not be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// Some of the range's addresses belong to the other kind of pool (hosts and containers
    /// share one subnet, so the overlap would hand one address to both).
    Overlap {
        first: Ipv4Addr,
        count: usize,
        other: &'static str,
    },
    /// A config already stored for this pool says something else.
    ConfigMismatch {
        key: String,
        stored: String,
        wanted: String,
    },
    /// The hosts' gateway is not a host address of their subnet.
    GatewayOutside { gateway: Ipv4Addr, subnet: Ipv4Net },
    /// The hosts' gateway is already in the container pool.
    GatewayPooled { gateway: Ipv4Addr },
    /// The range holds no address that may be pooled (only network, broadcast or gateway).
    NothingToPool,
    /// The original tool's etcd v2 data defines this pool and no v3 pool does yet: defining
    /// it anew would pool addresses the original's containers hold.
    DefinedByOriginal { dir: String },
    /// The store failed; what was written before stays (each address whole), and running the
    /// same command again completes it.
    Store(StoreError),
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Overlap {
                first,
                count,
                other,
            } => write!(
                f,
                "the range overlaps {other}: {count} of its addresses (first {first}) are there"
            ),
            PoolError::ConfigMismatch {
                key,
                stored,
                wanted,
            } => {
                write!(f, "{key} already holds {stored}, not {wanted}")
            }
            PoolError::GatewayOutside { gateway, subnet } => {
                write!(f, "gateway {gateway} is not a host address of {subnet}")
            }
            PoolError::GatewayPooled { gateway } => write!(
                f,
                "gateway {gateway} is in the container pool; release-ip it and remove it first"
            ),
            PoolError::NothingToPool => write!(
                f,
                "the range holds no address to pool (only the network, broadcast or gateway \
                 address); nothing changed"
            ),
            PoolError::DefinedByOriginal { dir } => write!(
                f,
                "the original's etcd v2 data defines this network ({dir}): run \
                 'oam-docker-ipam migrate-v2'"
            ),
            PoolError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PoolError {}

impl From<StoreError> for PoolError {
    fn from(e: StoreError) -> PoolError {
        PoolError::Store(e)
    }
}

/// What adding a range did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddReport {
    /// Put into `pool/` by this run.
    pub added: u64,
    /// Already free in `pool/`.
    pub already_free: u64,
    /// In `assigned/`: left there.
    pub in_use: u64,
    /// Never pooled: network, broadcast or gateway address.
    pub skipped: u64,
}

impl fmt::Display for AddReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} added, {} already in the pool, {} in use (left assigned), {} skipped \
             (network, broadcast or gateway address)",
            self.added, self.already_free, self.in_use, self.skipped
        )
    }
}

/// Reports progress of a long write: (addresses handled, addresses to handle).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// `ip-range`: adds `range` to the container pool of its network.
pub fn add_container_range<K: Kv>(
    kv: &K,
    layout: &Layout,
    range: AddrRange,
    progress: Progress,
) -> Result<AddReport, PoolError> {
    let hosts = layout.hosts();
    let mut excluded = Vec::new();
    let hosts_config = kv.range(&Range::key(layout.hosts_config()))?;
    if let Some((_, gateway)) = hosts_config
        .first()
        .and_then(|kv| HostsConfig::parse(&kv.value))
    {
        excluded.push(gateway);
    }
    if range.poolable(&excluded).next().is_none() {
        return Err(PoolError::NothingToPool);
    }
    let host_addrs = addrs_in(kv, &hosts)?;
    refuse_overlap(range, &host_addrs, "the host range")?;

    let config_key = layout.container_config(range.net.network());
    let config = json(&ContainerConfig::new(range.net));
    if check_config(kv, &config_key, &config)? {
        refuse_unmigrated(original_network(kv, layout, range.net)?)?;
    }
    let keys = layout.containers(range.net.network());
    fill(
        kv,
        &keys,
        range,
        &excluded,
        progress,
        (&config_key, &config),
    )
}

/// `host-range`: adds `range` to the host pool and records the hosts' subnet and gateway.
pub fn add_host_range<K: Kv>(
    kv: &K,
    layout: &Layout,
    range: AddrRange,
    gateway: Ipv4Addr,
    progress: Progress,
) -> Result<AddReport, PoolError> {
    if !is_host_of(gateway, range.net) {
        return Err(PoolError::GatewayOutside {
            gateway,
            subnet: range.net,
        });
    }
    if range.poolable(&[gateway]).next().is_none() {
        return Err(PoolError::NothingToPool);
    }
    let containers = layout.containers(range.net.network());
    let container_addrs = addrs_in(kv, &containers)?;
    refuse_overlap(range, &container_addrs, "the container pool")?;
    if container_addrs.contains(&gateway) {
        return Err(PoolError::GatewayPooled { gateway });
    }

    let config_key = layout.hosts_config();
    let config = json(&HostsConfig::new(range.net, gateway));
    if check_config(kv, &config_key, &config)? {
        let check = match kv.original_keys(&layout.hosts_dir())? {
            None => Original::Unchecked,
            Some(keys) if keys.is_empty() => Original::Clear,
            Some(_) => Original::Defines(layout.hosts_dir()),
        };
        refuse_unmigrated(check)?;
    }
    fill(
        kv,
        &layout.hosts(),
        range,
        &[gateway],
        progress,
        (&config_key, &config),
    )
}

/// A config or record as stored: JSON of a struct of strings.
pub(crate) fn json<T: serde::Serialize>(value: &T) -> String {
    // Serializing a struct of strings cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// Every address in a pool's two directories.
fn addrs_in<K: Kv>(kv: &K, keys: &PoolKeys) -> Result<HashSet<Ipv4Addr>, PoolError> {
    let mut found = addrs_of_dir(kv, keys, &keys.pool_dir)?;
    found.extend(addrs_of_dir(kv, keys, &keys.assigned_dir)?);
    Ok(found)
}

fn refuse_overlap(
    range: AddrRange,
    others: &HashSet<Ipv4Addr>,
    other: &'static str,
) -> Result<(), PoolError> {
    let mut overlap: Vec<Ipv4Addr> = others
        .iter()
        .copied()
        .filter(|a| range.contains(*a))
        .collect();
    overlap.sort();
    match overlap.first() {
        None => Ok(()),
        Some(first) => Err(PoolError::Overlap {
            first: *first,
            count: overlap.len(),
            other,
        }),
    }
}

/// Refuses early if the config key holds something other than `wanted`; whether it is
/// absent (a pool defined anew).
fn check_config<K: Kv>(kv: &K, key: &str, wanted: &str) -> Result<bool, PoolError> {
    match kv.range(&Range::key(key))?.first() {
        Some(stored) if stored.value != wanted => Err(PoolError::ConfigMismatch {
            key: key.into(),
            stored: stored.value.clone(),
            wanted: wanted.into(),
        }),
        Some(_) => Ok(false),
        None => Ok(true),
    }
}

/// What the original tool's v2 data says of a network about to be defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Original {
    /// Nothing of it overlaps, or what does is in v3 already.
    Clear,
    /// etcd does not serve its v2 API: the original's data, if any, cannot be read.
    Unchecked,
    /// The original defined an overlapping network (this directory) that v3 does not.
    Defines(String),
}

/// What etcd says of the container network whose network address is `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerNetwork {
    /// Defined by `ip-range`.
    Defined(Ipv4Net),
    /// Its config key holds something that is not a usable network.
    Unusable { key: String, value: String },
    /// Not defined in v3, but the original's v2 data defines it (in this directory).
    OnlyInOriginal(String),
    /// Defined nowhere.
    Undefined,
}

/// What etcd says of the hosts' network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostsNetwork {
    /// Defined by `host-range`: the subnet hosts and containers share, and its router.
    Defined { subnet: Ipv4Net, gateway: Ipv4Addr },
    /// Its config key holds something that is not what `host-range` writes.
    Unusable(String),
    /// No `host-range` has been run.
    Undefined,
}

/// Reads the hosts' subnet and router.
pub fn hosts_network<K: Kv>(kv: &K, layout: &Layout) -> Result<HostsNetwork, StoreError> {
    let key = layout.hosts_config();
    let Some(stored) = kv.range(&Range::key(key))?.into_iter().next() else {
        return Ok(HostsNetwork::Undefined);
    };
    Ok(match HostsConfig::parse(&stored.value) {
        Some((subnet, gateway)) => HostsNetwork::Defined { subnet, gateway },
        None => HostsNetwork::Unusable(stored.value),
    })
}

/// Reads the container network `id` (a PoolID), and if v3 does not define it, whether the
/// original's v2 data does.
pub fn container_network<K: Kv>(
    kv: &K,
    layout: &Layout,
    id: Ipv4Addr,
) -> Result<ContainerNetwork, StoreError> {
    let key = layout.container_config(id);
    let Some(stored) = kv.range(&Range::key(&key))?.into_iter().next() else {
        let asked = Ipv4Net::new(id, 32).unwrap_or_default();
        return Ok(match original_network(kv, layout, asked)? {
            Original::Defines(dir) => ContainerNetwork::OnlyInOriginal(dir),
            Original::Clear | Original::Unchecked => ContainerNetwork::Undefined,
        });
    };
    Ok(match ContainerConfig::parse(&stored.value) {
        Some(net) => ContainerNetwork::Defined(net),
        None => ContainerNetwork::Unusable {
            key,
            value: stored.value,
        },
    })
}

/// Whether the original's v2 data holds a container network overlapping `net` (any mask)
/// that etcd v3 does not define yet: defining `net` then would pool addresses its
/// containers hold.
pub fn original_network<K: Kv>(
    kv: &K,
    layout: &Layout,
    net: Ipv4Net,
) -> Result<Original, StoreError> {
    let root = format!("{}/containers/", layout.prefix());
    let Some(keys) = kv.original_keys(&root)? else {
        return Ok(Original::Unchecked);
    };
    let mut overlapping = std::collections::BTreeSet::new();
    for key in &keys {
        let id = match layout.classify(&key.key) {
            Some(KeyKind::ContainerConfig(id)) => match ContainerConfig::parse(&key.value) {
                Some(theirs) if theirs.contains(&net.network()) || net.contains(&id) => id,
                _ => continue,
            },
            Some(KeyKind::Free(Some(id), addr) | KeyKind::Assigned(Some(id), addr))
                if net.contains(&addr) =>
            {
                id
            }
            _ => continue,
        };
        overlapping.insert(id);
    }
    for id in overlapping {
        if kv
            .range(&Range::key(layout.container_config(id)))?
            .is_empty()
        {
            return Ok(Original::Defines(layout.container_dir(id)));
        }
    }
    Ok(Original::Clear)
}

fn refuse_unmigrated(check: Original) -> Result<(), PoolError> {
    match check {
        Original::Clear => Ok(()),
        Original::Unchecked => {
            log::warn!(
                "etcd does not serve its v2 API, so whether the original tool defined this \
                 network there cannot be checked; if it did, start etcd with --enable-v2=true \
                 and run 'oam-docker-ipam migrate-v2' first"
            );
            Ok(())
        }
        Original::Defines(dir) => Err(PoolError::DefinedByOriginal { dir }),
    }
}

/// Puts every poolable address of `range` that is in neither directory into `pool/`, guarded
/// by "not in `assigned/`", then writes the config. The config goes last: until it is there
/// Docker cannot use the pool, so an interrupted run leaves nothing half-usable.
fn fill<K: Kv>(
    kv: &K,
    keys: &PoolKeys,
    range: AddrRange,
    excluded: &[Ipv4Addr],
    progress: Progress,
    (config_key, config): (&str, &str),
) -> Result<AddReport, PoolError> {
    let free: HashSet<Ipv4Addr> = addrs_of_dir(kv, keys, &keys.pool_dir)?;
    let used: HashSet<Ipv4Addr> = addrs_of_dir(kv, keys, &keys.assigned_dir)?;
    let mut report = AddReport::default();
    let mut missing = Vec::new();
    for addr in range.poolable(excluded) {
        if free.contains(&addr) {
            report.already_free += 1;
        } else if used.contains(&addr) {
            report.in_use += 1;
        } else {
            missing.push(addr);
        }
    }
    report.skipped = range.size() - report.already_free - report.in_use - missing.len() as u64;

    let total = missing.len() as u64;
    let ranged = kv.compares_ranges()?;
    let mut done = 0;
    for batch in batches(missing, &used, ranged) {
        let added = pool_batch(kv, keys, &batch)?;
        report.added += added;
        report.in_use += batch.addrs.len() as u64 - added;
        done += batch.addrs.len() as u64;
        progress(done, total);
    }
    let write_config = Txn {
        compares: vec![Compare::Absent(config_key.into())],
        success: vec![Op::put(config_key, config)],
        failure: vec![Op::Range(Range::key(config_key))],
    };
    let outcome = kv.txn(&write_config)?;
    if let Some(stored) = outcome.range(0).first() {
        if stored.value != config {
            return Err(PoolError::ConfigMismatch {
                key: config_key.into(),
                stored: stored.value.clone(),
                wanted: config.into(),
            });
        }
    }
    Ok(report)
}

/// Addresses to put into `pool/` in one transaction, and how they are guarded.
struct Batch {
    addrs: Vec<Ipv4Addr>,
    /// By one compare over their span of `assigned/` keys, rather than one per address.
    span: bool,
}

/// A run shorter than this goes in with others, one compare per address: a transaction of its
/// own would cost etcd more (a transaction's fixed cost is about that of 30 puts, a compare
/// per address about a third of a put).
const SHORTEST_SPAN: usize = MAX_TXN_OPS / 2;

/// `missing` cut into transactions: runs long enough guarded as a span (when the store can),
/// the rest together, up to `MAX_TXN_OPS`, one compare each. Where assigned addresses lie
/// scattered among the missing ones, runs are short, and this keeps the count of transactions
/// to what one compare per address took.
fn batches(missing: Vec<Ipv4Addr>, used: &HashSet<Ipv4Addr>, ranged: bool) -> Vec<Batch> {
    let each = |addrs: &[Ipv4Addr]| Batch {
        addrs: addrs.to_vec(),
        span: false,
    };
    if !ranged {
        return missing.chunks(MAX_TXN_OPS).map(each).collect();
    }
    let mut out = Vec::new();
    let mut short = Vec::new();
    for run in runs_between(missing, used) {
        if run.len() >= SHORTEST_SPAN {
            out.push(Batch {
                addrs: run,
                span: true,
            });
        } else {
            short.extend(run);
        }
    }
    out.extend(short.chunks(MAX_TXN_OPS).map(each));
    out
}

/// `missing` in the order of their keys, cut into runs of at most `MAX_TXN_OPS` with no
/// address of `used` between a run's first and last key: then "no key of `assigned/` lies in
/// that span" guards a whole run with one compare, which costs etcd less than one per key.
fn runs_between(missing: Vec<Ipv4Addr>, used: &HashSet<Ipv4Addr>) -> Vec<Vec<Ipv4Addr>> {
    // Keys share their directory, so they sort as the addresses' text does.
    let mut missing: Vec<(String, Ipv4Addr)> =
        missing.into_iter().map(|a| (a.to_string(), a)).collect();
    missing.sort_unstable();
    let mut used: Vec<String> = used.iter().map(Ipv4Addr::to_string).collect();
    used.sort_unstable();
    let mut runs: Vec<Vec<Ipv4Addr>> = Vec::new();
    let mut previous: Option<&str> = None;
    for (text, addr) in &missing {
        let run = match (previous, runs.last_mut()) {
            (Some(previous), Some(run)) if run.len() < MAX_TXN_OPS => {
                let next_used = used.partition_point(|u| u.as_str() <= previous);
                let used_between = used.get(next_used).is_some_and(|u| u < text);
                (!used_between).then_some(run)
            }
            _ => None,
        };
        match run {
            Some(run) => run.push(*addr),
            None => runs.push(vec![*addr]),
        }
        previous = Some(text);
    }
    runs
}

/// Puts `batch` into `pool/`, each address guarded by "not in `assigned/`": with one compare
/// over its span or one per address; if that fails (someone took an address since the read,
/// or one in the span), one per address, then one address at a time. How many it put.
fn pool_batch<K: Kv>(kv: &K, keys: &PoolKeys, batch: &Batch) -> Result<u64, StoreError> {
    let addrs = &batch.addrs;
    let (Some(first), Some(last)) = (addrs.first(), addrs.last()) else {
        return Ok(0);
    };
    let all = addrs.len() as u64;
    let puts: Vec<Op> = addrs.iter().map(|a| Op::put(keys.pool(*a), "")).collect();
    if batch.span {
        let span = Txn {
            // The smallest key after `last` is `last` followed by a NUL byte.
            compares: vec![Compare::NoKeyIn {
                start: keys.assigned(*first),
                end: format!("{}\0", keys.assigned(*last)),
            }],
            success: puts.clone(),
            failure: vec![],
        };
        if kv.txn(&span)?.succeeded {
            return Ok(all);
        }
    }
    let each = Txn {
        compares: addrs
            .iter()
            .map(|a| Compare::Absent(keys.assigned(*a)))
            .collect(),
        success: puts,
        failure: vec![],
    };
    if kv.txn(&each)?.succeeded {
        return Ok(all);
    }
    let mut added = 0;
    for addr in addrs {
        let one = Txn {
            compares: vec![Compare::Absent(keys.assigned(*addr))],
            success: vec![Op::put(keys.pool(*addr), "")],
            failure: vec![],
        };
        if kv.txn(&one)?.succeeded {
            added += 1;
        }
    }
    Ok(added)
}

/// The addresses named by the keys of one of a pool's directories.
pub(crate) fn addrs_of_dir<K: Kv>(
    kv: &K,
    keys: &PoolKeys,
    dir: &str,
) -> Result<HashSet<Ipv4Addr>, StoreError> {
    let kvs = kv.range(&Range::prefix(dir).keys_only())?;
    Ok(kvs.iter().filter_map(|kv| keys.addr_of(&kv.key)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::memory::MemKv;
    use ipnet::Ipv4Net;
    use std::cell::{Cell, RefCell};

    fn range(a: &str, b: &str) -> AddrRange {
        AddrRange::parse(a, b).unwrap()
    }

    fn quiet() -> impl FnMut(u64, u64) {
        |_, _| {}
    }

    #[test]
    fn adds_a_range_once() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let r = range("192.0.2.0/24", "192.0.2.255/24");
        let first = add_container_range(&kv, &l, r, &mut quiet()).unwrap();
        assert_eq!(
            first,
            AddReport {
                added: 254,
                already_free: 0,
                in_use: 0,
                skipped: 2
            }
        );
        let before = kv.dump();
        let again = add_container_range(&kv, &l, r, &mut quiet()).unwrap();
        assert_eq!(
            again,
            AddReport {
                added: 0,
                already_free: 254,
                in_use: 0,
                skipped: 2
            }
        );
        assert_eq!(kv.dump(), before);
        assert!(before.contains(&(
            "/t/containers/192.0.2.0/config".to_string(),
            r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#.to_string()
        )));
    }

    #[test]
    fn hosts_and_containers_never_overlap_and_the_gateway_is_never_pooled() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let gw: Ipv4Addr = "192.0.2.1".parse().unwrap();
        add_host_range(
            &kv,
            &l,
            range("192.0.2.1/24", "192.0.2.20/24"),
            gw,
            &mut quiet(),
        )
        .unwrap();
        assert!(!kv
            .dump()
            .iter()
            .any(|(k, _)| k == "/t/hosts/pool/192.0.2.1"));
        let before = kv.dump();
        let err = add_container_range(
            &kv,
            &l,
            range("192.0.2.15/24", "192.0.2.30/24"),
            &mut quiet(),
        );
        assert!(
            matches!(err, Err(PoolError::Overlap { count: 6, .. })),
            "{err:?}"
        );
        assert_eq!(kv.dump(), before);
        let err = add_host_range(
            &kv,
            &l,
            range("192.0.2.1/24", "192.0.2.20/24"),
            "192.0.2.2".parse().unwrap(),
            &mut quiet(),
        );
        assert!(
            matches!(err, Err(PoolError::ConfigMismatch { .. })),
            "{err:?}"
        );
        let err = add_host_range(
            &kv,
            &l,
            range("192.0.2.1/24", "192.0.2.20/24"),
            "198.51.100.1".parse().unwrap(),
            &mut quiet(),
        );
        assert!(
            matches!(err, Err(PoolError::GatewayOutside { .. })),
            "{err:?}"
        );
        assert_eq!(kv.dump(), before);
    }

    #[test]
    fn assigned_addresses_stay_assigned() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let keys = l.containers("192.0.2.0".parse().unwrap());
        kv.txn(&Txn {
            success: vec![Op::put(keys.assigned("192.0.2.5".parse().unwrap()), "x")],
            ..Txn::default()
        })
        .unwrap();
        let report =
            add_container_range(&kv, &l, range("192.0.2.1/24", "192.0.2.9/24"), &mut quiet())
                .unwrap();
        assert_eq!(
            report,
            AddReport {
                added: 8,
                already_free: 0,
                in_use: 1,
                skipped: 0
            }
        );
        assert!(!kv
            .dump()
            .iter()
            .any(|(k, _)| k == &keys.pool("192.0.2.5".parse().unwrap())));
    }

    #[test]
    fn a_pool_only_the_original_defined_is_not_defined_again() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        kv.original_put(
            "/t/containers/192.0.2.0/config",
            r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
        );
        kv.original_put("/t/containers/192.0.2.0/assigned/192.0.2.100", "");
        kv.original_put("/t/hosts/config", "");
        let refused = Err(PoolError::DefinedByOriginal {
            dir: "/t/containers/192.0.2.0".into(),
        });
        // The same network, and overlapping ones of other masks.
        for (a, b) in [
            ("192.0.2.1/24", "192.0.2.9/24"),
            ("192.0.2.100/22", "192.0.2.102/22"),
            ("192.0.2.130/25", "192.0.2.140/25"),
        ] {
            assert_eq!(
                add_container_range(&kv, &l, range(a, b), &mut quiet()),
                refused
            );
        }
        let err = add_host_range(
            &kv,
            &l,
            range("192.0.2.50/24", "192.0.2.59/24"),
            "192.0.2.1".parse().unwrap(),
            &mut quiet(),
        );
        assert!(
            matches!(err, Err(PoolError::DefinedByOriginal { .. })),
            "{err:?}"
        );
        assert_eq!(kv.dump(), vec![]);
        // Another network the original never defined is fine.
        add_container_range(
            &kv,
            &l,
            range("198.51.100.1/24", "198.51.100.9/24"),
            &mut quiet(),
        )
        .unwrap();
        // With no v2 keyspace to read, it goes ahead (and says it could not check).
        *kv.original.borrow_mut() = None;
        add_container_range(&kv, &l, range("192.0.2.1/24", "192.0.2.9/24"), &mut quiet()).unwrap();
    }

    #[test]
    fn a_range_with_nothing_to_pool_writes_nothing() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let only_broadcast = range("192.0.2.255/24", "192.0.2.255/24");
        let err = add_container_range(&kv, &l, only_broadcast, &mut quiet());
        assert_eq!(err, Err(PoolError::NothingToPool));
        assert_eq!(kv.dump(), vec![]);
    }

    #[test]
    fn a_different_mask_for_the_same_network_is_refused() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        add_container_range(&kv, &l, range("192.0.2.1/24", "192.0.2.9/24"), &mut quiet()).unwrap();
        let err = add_container_range(&kv, &l, range("192.0.2.1/25", "192.0.2.9/25"), &mut quiet());
        assert!(
            matches!(err, Err(PoolError::ConfigMismatch { .. })),
            "{err:?}"
        );
    }

    /// A store where someone else applies `meanwhile` just before our first transaction; it
    /// records every compare it is sent and says whether it `compares_ranges`.
    struct Meanwhile<'a> {
        kv: &'a MemKv,
        meanwhile: RefCell<Option<Txn>>,
        ranged: bool,
        compares: RefCell<Vec<Compare>>,
        txns: Cell<usize>,
    }

    impl<'a> Meanwhile<'a> {
        fn new(kv: &'a MemKv, meanwhile: Option<Txn>, ranged: bool) -> Meanwhile<'a> {
            Meanwhile {
                kv,
                meanwhile: RefCell::new(meanwhile),
                ranged,
                compares: RefCell::default(),
                txns: Cell::default(),
            }
        }
    }

    impl Kv for Meanwhile<'_> {
        fn range(&self, range: &Range) -> Result<Vec<crate::kv::KeyValue>, StoreError> {
            self.kv.range(range)
        }
        fn txn(&self, txn: &Txn) -> Result<crate::kv::TxnOutcome, StoreError> {
            if let Some(other) = self.meanwhile.borrow_mut().take() {
                self.kv.txn(&other)?;
            }
            self.compares
                .borrow_mut()
                .extend(txn.compares.iter().cloned());
            self.txns.set(self.txns.get() + 1);
            self.kv.txn(txn)
        }
        fn compares_ranges(&self) -> Result<bool, StoreError> {
            Ok(self.ranged)
        }
    }

    fn assign(keys: &PoolKeys, addr: &str) -> Txn {
        Txn {
            success: vec![Op::put(keys.assigned(addr.parse().unwrap()), "x")],
            ..Txn::default()
        }
    }

    fn pooled(kv: &MemKv, keys: &PoolKeys) -> HashSet<Ipv4Addr> {
        addrs_of_dir(kv, keys, &keys.pool_dir).unwrap()
    }

    #[test]
    fn runs_never_span_an_assigned_key_and_cover_every_missing_address_once() {
        let net: Ipv4Net = "198.18.0.0/22".parse().unwrap();
        let all: Vec<Ipv4Addr> = net.hosts().collect();
        // Assigned: every 7th address, so that they fall between others in key order.
        let used: HashSet<Ipv4Addr> = all.iter().copied().step_by(7).collect();
        let missing: Vec<Ipv4Addr> = all.iter().copied().filter(|a| !used.contains(a)).collect();
        let runs = runs_between(missing.clone(), &used);
        let mut seen: Vec<Ipv4Addr> = runs.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, missing);
        for run in &runs {
            assert!(!run.is_empty() && run.len() <= MAX_TXN_OPS);
            let texts: Vec<String> = run.iter().map(Ipv4Addr::to_string).collect();
            assert!(texts.windows(2).all(|w| w[0] < w[1]), "{texts:?}");
            let (first, last) = (&texts[0], &texts[texts.len() - 1]);
            let inside = used
                .iter()
                .map(Ipv4Addr::to_string)
                .find(|u| u > first && u < last);
            assert_eq!(inside, None, "run {first}..{last}");
        }
        // With nothing assigned, runs are as long as a transaction allows.
        let runs = runs_between(all.clone(), &HashSet::new());
        assert_eq!(runs.len(), all.len().div_ceil(MAX_TXN_OPS));
    }

    /// Puts each address of `held` in `assigned/`; then adds the whole `net` through a store
    /// that compares ranges; the report and how many transactions it took.
    fn grow_around(held: &[Ipv4Addr], net: &str) -> (AddReport, usize) {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let net: Ipv4Net = net.parse().unwrap();
        let keys = l.containers(net.network());
        for addr in held {
            kv.txn(&assign(&keys, &addr.to_string())).unwrap();
        }
        let store = Meanwhile::new(&kv, None, true);
        let whole = AddrRange {
            net,
            start: net.network(),
            end: net.broadcast(),
        };
        let report = add_container_range(&store, &l, whole, &mut quiet()).unwrap();
        (report, store.txns.get())
    }

    #[test]
    fn assigned_addresses_scattered_among_the_missing_cost_no_more_transactions() {
        // The README's example: .100-.200 in use, the pool then grown to the whole /24. In key
        // order they cut the rest into runs of a few addresses each.
        let held: Vec<Ipv4Addr> = (100..=200).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
        let (report, txns) = grow_around(&held, "198.18.0.0/24");
        assert_eq!((report.added, report.in_use), (153, 101));
        assert_eq!(txns, 2 + 1, "two of 128 at most, and the config");
        // Every other address of a /22 in use: every run is one address long.
        let net: Ipv4Net = "198.18.0.0/22".parse().unwrap();
        let held: Vec<Ipv4Addr> = net.hosts().step_by(2).collect();
        let (report, txns) = grow_around(&held, "198.18.0.0/22");
        assert_eq!((report.added, report.in_use), (511, 511));
        assert_eq!(txns, 4 + 1);
    }

    #[test]
    fn a_new_range_costs_one_compare_per_transaction() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let store = Meanwhile::new(&kv, None, true);
        let r = range("198.18.0.0/22", "198.18.3.255/22");
        let report = add_container_range(&store, &l, r, &mut quiet()).unwrap();
        assert_eq!(report.added, 1022);
        let compares = store.compares.borrow();
        // Eight runs of 128 (the last one 126), then the config.
        assert_eq!(compares.len(), 8 + 1, "{compares:?}");
        assert!(compares[..8]
            .iter()
            .all(|c| matches!(c, Compare::NoKeyIn { .. })));
    }

    #[test]
    fn an_address_taken_meanwhile_inside_a_run_stays_assigned() {
        let l = Layout::new("/t");
        let keys = l.containers("198.18.0.0".parse().unwrap());
        let r = range("198.18.0.1/24", "198.18.0.254/24");
        // Taken between the read and the first write: in the first run's span, and (in key
        // order) the second address of it.
        for ranged in [true, false] {
            let kv = MemKv::new();
            let store = Meanwhile::new(&kv, Some(assign(&keys, "198.18.0.10")), ranged);
            let report = add_container_range(&store, &l, r, &mut quiet()).unwrap();
            assert_eq!((report.added, report.in_use), (253, 1), "ranged {ranged}");
            let pooled = pooled(&kv, &keys);
            assert_eq!(pooled.len(), 253);
            assert!(!pooled.contains(&"198.18.0.10".parse().unwrap()));
            let sent_ranges = store
                .compares
                .borrow()
                .iter()
                .any(|c| matches!(c, Compare::NoKeyIn { .. }));
            assert_eq!(sent_ranges, ranged);
        }
    }

    #[test]
    fn a_free_address_taken_meanwhile_inside_a_run_costs_one_more_transaction() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let keys = l.containers("198.18.0.0".parse().unwrap());
        // .10 is free before the run: it lies in the span of the run of the addresses
        // around it but is not one of them.
        add_container_range(
            &kv,
            &l,
            range("198.18.0.10/24", "198.18.0.10/24"),
            &mut quiet(),
        )
        .unwrap();
        let take = Txn {
            success: vec![
                Op::delete(keys.pool("198.18.0.10".parse().unwrap())),
                Op::put(keys.assigned("198.18.0.10".parse().unwrap()), "x"),
            ],
            ..Txn::default()
        };
        let store = Meanwhile::new(&kv, Some(take), true);
        let report = add_container_range(
            &store,
            &l,
            range("198.18.0.1/24", "198.18.0.254/24"),
            &mut quiet(),
        )
        .unwrap();
        assert_eq!(report.added, 253);
        // The first run's range compare fails, its compares per key do not; the second run
        // and the config as usual.
        assert_eq!(store.compares.borrow().len(), 1 + 128 + 1 + 1);
        assert!(!pooled(&kv, &keys).contains(&"198.18.0.10".parse().unwrap()));
    }
}
