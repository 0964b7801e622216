//! Taking back what `ip-range`/`host-range` gave: removing the free addresses of a range from
//! its pool (refused, naming them, while any of them is in use; the pool's config goes first
//! when nothing of the pool would be left, so Docker never allocates from a half-removed
//! pool), and changing the hosts' recorded gateway. Every write is guarded by what was read.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::addr::{is_host_of, AddrRange};
use crate::kv::{Compare, KeyValue, Kv, Op, Range, StoreError, Txn, MAX_TXN_OPS};
use crate::layout::{describe_holder, ContainerConfig, HostsConfig, Layout, PoolKeys};
use crate::pools::Progress;

/// How many addresses in use a refusal names before it counts the rest.
const NAMED: usize = 5;

/// Why a range could not be removed or the gateway changed. Nothing changed, except where
/// said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShrinkError {
    /// Nothing of this pool is stored.
    NoPool(String),
    /// The stored config names another network (or does not parse).
    ConfigDiffers {
        key: String,
        stored: String,
    },
    /// Addresses of the range are in use: `named` lists the first few with their holders.
    InUse {
        count: usize,
        named: Vec<String>,
    },
    /// `--gateway` given with `--remove` is not the recorded one.
    GatewayDiffers {
        given: Ipv4Addr,
        stored: Ipv4Addr,
    },
    /// `host-range --force` cannot change the hosts' subnet, only their gateway.
    SubnetDiffers {
        stored: Ipv4Net,
        wanted: Ipv4Net,
    },
    /// The new gateway is not a host address of the subnet.
    GatewayOutside {
        gateway: Ipv4Addr,
        subnet: Ipv4Net,
    },
    /// The new gateway is in use, or in a container pool.
    GatewayTaken {
        gateway: Ipv4Addr,
        why: String,
    },
    /// A key read changed before the guarded write: nothing was written.
    Changed(String),
    /// Addresses were taken while the range was being removed; the rest is removed.
    TakenMeanwhile {
        removed: u64,
        taken: Vec<Ipv4Addr>,
    },
    Store(StoreError),
}

impl fmt::Display for ShrinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShrinkError::NoPool(what) => write!(f, "no {what} in etcd; nothing changed"),
            ShrinkError::ConfigDiffers { key, stored } => write!(
                f,
                "{key} holds {stored:?}, another network than the range's; nothing changed"
            ),
            ShrinkError::InUse { count, named } => {
                write!(
                    f,
                    "{count} address(es) of the range are in use: {}",
                    named.join(", ")
                )?;
                if *count > named.len() {
                    write!(f, " and {} more", count - named.len())?;
                }
                write!(
                    f,
                    "; release them (release-ip/release-host) or narrow the range; nothing changed"
                )
            }
            ShrinkError::GatewayDiffers { given, stored } => write!(
                f,
                "--gateway {given} is not the recorded gateway {stored}; nothing changed"
            ),
            ShrinkError::SubnetDiffers { stored, wanted } => write!(
                f,
                "the hosts' subnet is {stored}, not {wanted}: --force changes only the gateway \
                 (remove the host range with --remove to change the subnet); nothing changed"
            ),
            ShrinkError::GatewayOutside { gateway, subnet } => write!(
                f,
                "gateway {gateway} is not a host address of {subnet}; nothing changed"
            ),
            ShrinkError::GatewayTaken { gateway, why } => {
                write!(f, "gateway {gateway} {why}; nothing changed")
            }
            ShrinkError::Changed(key) => write!(
                f,
                "{key} changed while this ran; nothing changed, run it again"
            ),
            ShrinkError::TakenMeanwhile { removed, taken } => {
                let taken: Vec<String> = taken.iter().map(|a| a.to_string()).collect();
                write!(
                    f,
                    "{removed} removed, but {} taken while removing and left in use; release \
                     them and run it again",
                    taken.join(", ")
                )
            }
            ShrinkError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ShrinkError {}

impl From<StoreError> for ShrinkError {
    fn from(e: StoreError) -> ShrinkError {
        ShrinkError::Store(e)
    }
}

/// What removing a range did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveReport {
    /// Taken out of `pool/`.
    pub removed: u64,
    /// Addresses of the range that were not in the pool.
    pub not_in_pool: u64,
    /// The pool's config was removed: nothing of the pool is left.
    pub config_removed: Option<String>,
}

impl fmt::Display for RemoveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} removed, {} were not in the pool",
            self.removed, self.not_in_pool
        )?;
        if let Some(key) = &self.config_removed {
            write!(f, "; no address is left, so {key} was removed first")?;
        }
        Ok(())
    }
}

/// `ip-range --remove`: takes the free addresses of `range` out of its container pool.
pub fn remove_container_range<K: Kv>(
    kv: &K,
    layout: &Layout,
    range: AddrRange,
    progress: Progress,
) -> Result<RemoveReport, ShrinkError> {
    let id = range.net.network();
    let config_key = layout.container_config(id);
    let config = read_one(kv, &config_key)?;
    if let Some(stored) = &config {
        if ContainerConfig::parse(&stored.value) != Some(range.net) {
            return Err(ShrinkError::ConfigDiffers {
                key: config_key,
                stored: stored.value.clone(),
            });
        }
    }
    let what = format!("container pool {}", range.net);
    remove(kv, &layout.containers(id), range, config, &what, progress)
}

/// `host-range --remove`: takes the free addresses of `range` out of the host pool.
pub fn remove_host_range<K: Kv>(
    kv: &K,
    layout: &Layout,
    range: AddrRange,
    gateway: Option<Ipv4Addr>,
    progress: Progress,
) -> Result<RemoveReport, ShrinkError> {
    let config_key = layout.hosts_config();
    let config = read_one(kv, &config_key)?;
    if let Some(stored) = &config {
        match HostsConfig::parse(&stored.value) {
            Some((subnet, gw)) if subnet == range.net => {
                if let Some(given) = gateway.filter(|g| *g != gw) {
                    return Err(ShrinkError::GatewayDiffers { given, stored: gw });
                }
            }
            _ => {
                return Err(ShrinkError::ConfigDiffers {
                    key: config_key,
                    stored: stored.value.clone(),
                })
            }
        }
    }
    remove(kv, &layout.hosts(), range, config, "host pool", progress)
}

fn read_one<K: Kv>(kv: &K, key: &str) -> Result<Option<KeyValue>, StoreError> {
    Ok(kv.range(&Range::key(key))?.into_iter().next())
}

fn remove<K: Kv>(
    kv: &K,
    keys: &PoolKeys,
    range: AddrRange,
    config: Option<KeyValue>,
    what: &str,
    progress: Progress,
) -> Result<RemoveReport, ShrinkError> {
    let free: BTreeSet<Ipv4Addr> = kv
        .range(&Range::prefix(keys.pool_dir.as_str()).keys_only())?
        .iter()
        .filter_map(|kv| keys.addr_of(&kv.key))
        .collect();
    let assigned: BTreeMap<Ipv4Addr, String> = kv
        .range(&Range::prefix(keys.assigned_dir.as_str()))?
        .into_iter()
        .filter_map(|kv| Some((keys.addr_of(&kv.key)?, kv.value)))
        .collect();
    if config.is_none() && free.is_empty() && assigned.is_empty() {
        return Err(ShrinkError::NoPool(what.into()));
    }
    let in_use: Vec<(&Ipv4Addr, &String)> = assigned
        .iter()
        .filter(|(a, _)| range.contains(**a))
        .collect();
    if !in_use.is_empty() {
        let named = in_use
            .iter()
            .take(NAMED)
            .map(|(a, v)| format!("{a} (held by {})", describe_holder(v)))
            .collect();
        return Err(ShrinkError::InUse {
            count: in_use.len(),
            named,
        });
    }
    let doomed: Vec<Ipv4Addr> = free
        .iter()
        .copied()
        .filter(|a| range.contains(*a))
        .collect();
    let mut report = RemoveReport {
        not_in_pool: range.size() - doomed.len() as u64,
        ..RemoveReport::default()
    };
    // Nothing of the pool would be left: its config goes first, so that no plugin starts
    // using the pool while it is half removed (and `check` does not see a pool without one).
    let whole = assigned.is_empty() && doomed.len() == free.len();
    if let (true, Some(config)) = (whole, &config) {
        let txn = Txn {
            compares: vec![Compare::ModRevision(
                config.key.clone(),
                config.mod_revision,
            )],
            success: vec![Op::delete(config.key.clone())],
            failure: vec![],
        };
        if !kv.txn(&txn)?.succeeded {
            return Err(ShrinkError::Changed(config.key.clone()));
        }
        log::info!("removed {} before the last addresses of {what}", config.key);
        report.config_removed = Some(config.key.clone());
    }
    let total = doomed.len() as u64;
    let mut taken = Vec::new();
    for batch in doomed.chunks(MAX_TXN_OPS) {
        let txn = Txn {
            compares: batch
                .iter()
                .map(|a| Compare::Absent(keys.assigned(*a)))
                .collect(),
            success: batch.iter().map(|a| Op::delete(keys.pool(*a))).collect(),
            failure: vec![],
        };
        if kv.txn(&txn)?.succeeded {
            report.removed += batch.len() as u64;
        } else {
            // Someone took one of these since we looked: go one by one and leave it.
            for addr in batch {
                let one = Txn {
                    compares: vec![Compare::Absent(keys.assigned(*addr))],
                    success: vec![Op::delete(keys.pool(*addr))],
                    failure: vec![],
                };
                if kv.txn(&one)?.succeeded {
                    report.removed += 1;
                } else {
                    taken.push(*addr);
                }
            }
        }
        progress(report.removed + taken.len() as u64, total);
    }
    if !taken.is_empty() {
        return Err(ShrinkError::TakenMeanwhile {
            removed: report.removed,
            taken,
        });
    }
    Ok(report)
}

/// What `host-range --force` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayChange {
    pub key: String,
    pub old: Ipv4Addr,
    pub new: Ipv4Addr,
    /// The new gateway was free in the host pool and was taken out of it.
    pub unpooled: bool,
}

impl fmt::Display for GatewayChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "changed the hosts' gateway in {} from {} to {}",
            self.key, self.old, self.new
        )?;
        if self.unpooled {
            write!(f, "; {} was taken out of the host pool", self.new)?;
        }
        write!(
            f,
            "; {} is no longer kept out of the pools. Docker networks and ifcfg-br0 files \
             made before still name {} (DefaultGatewayIPv4, GATEWAY=): re-create them on each \
             host",
            self.old, self.old
        )
    }
}

/// `host-range --force`: records `gateway` as the hosts' gateway if the stored config names
/// another one in the same subnet; `None` if there is nothing to change. The new gateway must
/// be neither in use nor in the container pool; if it is free in the host pool it is taken
/// out in the same transaction.
pub fn change_hosts_gateway<K: Kv>(
    kv: &K,
    layout: &Layout,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
) -> Result<Option<GatewayChange>, ShrinkError> {
    let key = layout.hosts_config();
    let Some(stored) = read_one(kv, &key)? else {
        return Ok(None);
    };
    let Some((stored_subnet, old)) = HostsConfig::parse(&stored.value) else {
        return Err(ShrinkError::ConfigDiffers {
            key,
            stored: stored.value,
        });
    };
    if stored_subnet != subnet {
        return Err(ShrinkError::SubnetDiffers {
            stored: stored_subnet,
            wanted: subnet,
        });
    }
    if old == gateway {
        return Ok(None);
    }
    if !is_host_of(gateway, subnet) {
        return Err(ShrinkError::GatewayOutside { gateway, subnet });
    }
    let hosts = layout.hosts();
    let containers = layout.containers(subnet.network());
    if let Some(held) = read_one(kv, &hosts.assigned(gateway))? {
        let why = format!("is held by {}", describe_holder(&held.value));
        return Err(ShrinkError::GatewayTaken { gateway, why });
    }
    for key in [containers.pool(gateway), containers.assigned(gateway)] {
        if read_one(kv, &key)?.is_some() {
            let why = format!(
                "is in the container pool ({key}): take it out first with ip-range --remove \
                 (and release-ip --force first if a container holds it)"
            );
            return Err(ShrinkError::GatewayTaken { gateway, why });
        }
    }
    let unpooled = read_one(kv, &hosts.pool(gateway))?.is_some();
    let config = crate::pools::json(&HostsConfig::new(subnet, gateway));
    let mut success = vec![Op::put(key.clone(), config)];
    if unpooled {
        success.push(Op::delete(hosts.pool(gateway)));
    }
    let txn = Txn {
        compares: vec![
            Compare::ModRevision(key.clone(), stored.mod_revision),
            Compare::Absent(hosts.assigned(gateway)),
            Compare::Absent(containers.pool(gateway)),
            Compare::Absent(containers.assigned(gateway)),
        ],
        success,
        failure: vec![],
    };
    if !kv.txn(&txn)?.succeeded {
        return Err(ShrinkError::Changed(key));
    }
    log::info!("changed the hosts' gateway from {old} to {gateway}");
    Ok(Some(GatewayChange {
        key,
        old,
        new: gateway,
        unpooled,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::memory::MemKv;
    use crate::layout::{Owner, Role};
    use crate::pools::{add_container_range, add_host_range};

    fn range(a: &str, b: &str) -> AddrRange {
        AddrRange::parse(a, b).unwrap()
    }

    fn quiet() -> impl FnMut(u64, u64) {
        |_, _| {}
    }

    #[test]
    fn removes_free_addresses_and_the_config_with_the_last_of_them() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        add_container_range(
            &kv,
            &l,
            range("192.0.2.100/24", "192.0.2.200/24"),
            &mut quiet(),
        )
        .unwrap();
        let part = remove_container_range(
            &kv,
            &l,
            range("192.0.2.150/24", "192.0.2.250/24"),
            &mut quiet(),
        )
        .unwrap();
        assert_eq!((part.removed, part.not_in_pool), (51, 50));
        assert_eq!(part.config_removed, None);
        let rest = remove_container_range(
            &kv,
            &l,
            range("192.0.2.0/24", "192.0.2.255/24"),
            &mut quiet(),
        )
        .unwrap();
        assert_eq!(rest.removed, 50);
        assert_eq!(
            rest.config_removed.as_deref(),
            Some("/t/containers/192.0.2.0/config")
        );
        assert!(kv.dump().is_empty(), "{:?}", kv.dump());
        assert_eq!(
            remove_container_range(
                &kv,
                &l,
                range("192.0.2.0/24", "192.0.2.255/24"),
                &mut quiet()
            ),
            Err(ShrinkError::NoPool("container pool 192.0.2.0/24".into()))
        );
    }

    #[test]
    fn refuses_ranges_with_addresses_in_use_and_changes_nothing() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        add_container_range(
            &kv,
            &l,
            range("192.0.2.100/24", "192.0.2.110/24"),
            &mut quiet(),
        )
        .unwrap();
        let keys = l.containers("192.0.2.0".parse().unwrap());
        let a: Ipv4Addr = "192.0.2.105".parse().unwrap();
        kv.txn(&Txn {
            success: vec![
                Op::delete(keys.pool(a)),
                Op::put(
                    keys.assigned(a),
                    Owner::new(
                        Role::Container,
                        "h1",
                        "02:42:00:00:00:01",
                        &crate::host::now(),
                    )
                    .to_json(),
                ),
            ],
            ..Txn::default()
        })
        .unwrap();
        let before = kv.dump();
        let err = remove_container_range(
            &kv,
            &l,
            range("192.0.2.100/24", "192.0.2.110/24"),
            &mut quiet(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "1 address(es) of the range are in use: 192.0.2.105 (held by host h1 (mac \
             02:42:00:00:00:01)); release them (release-ip/release-host) or narrow the range; \
             nothing changed"
        );
        assert!(matches!(
            remove_container_range(
                &kv,
                &l,
                range("192.0.2.100/25", "192.0.2.110/25"),
                &mut quiet()
            ),
            Err(ShrinkError::ConfigDiffers { .. })
        ));
        assert_eq!(kv.dump(), before);
    }

    #[test]
    fn a_large_removal_goes_in_batches_etcd_accepts() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        add_host_range(
            &kv,
            &l,
            range("198.18.0.0/22", "198.18.3.255/22"),
            "198.18.0.1".parse().unwrap(),
            &mut quiet(),
        )
        .unwrap();
        let r = remove_host_range(
            &kv,
            &l,
            range("198.18.0.0/22", "198.18.3.255/22"),
            None,
            &mut quiet(),
        )
        .unwrap();
        assert_eq!(r.removed, 1021);
        assert!(r.config_removed.is_some());
        assert!(kv.dump().is_empty());
    }

    #[test]
    fn the_hosts_gateway_changes_only_with_its_subnet_and_when_free() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let subnet: Ipv4Net = "192.0.2.0/24".parse().unwrap();
        add_host_range(
            &kv,
            &l,
            range("192.0.2.10/24", "192.0.2.20/24"),
            "192.0.2.1".parse().unwrap(),
            &mut quiet(),
        )
        .unwrap();
        add_container_range(
            &kv,
            &l,
            range("192.0.2.100/24", "192.0.2.110/24"),
            &mut quiet(),
        )
        .unwrap();
        let before = kv.dump();
        for bad in ["192.0.2.105", "192.0.2.255"] {
            assert!(change_hosts_gateway(&kv, &l, subnet, bad.parse().unwrap()).is_err());
        }
        assert!(matches!(
            change_hosts_gateway(
                &kv,
                &l,
                "192.0.2.0/25".parse().unwrap(),
                "192.0.2.2".parse().unwrap()
            ),
            Err(ShrinkError::SubnetDiffers { .. })
        ));
        assert_eq!(kv.dump(), before);
        assert_eq!(
            change_hosts_gateway(&kv, &l, subnet, "192.0.2.1".parse().unwrap()),
            Ok(None)
        );
        let change = change_hosts_gateway(&kv, &l, subnet, "192.0.2.12".parse().unwrap())
            .unwrap()
            .unwrap();
        assert!(change.unpooled);
        let dump = kv.dump();
        assert!(dump.contains(&(
            "/t/hosts/config".into(),
            r#"{"Subnet":"192.0.2.0/24","Gateway":"192.0.2.12"}"#.into()
        )));
        assert!(!dump.iter().any(|(k, _)| k == "/t/hosts/pool/192.0.2.12"));
    }
}
