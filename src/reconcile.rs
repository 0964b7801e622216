//! `reconcile`: what this host's Docker says its endpoints use (a [`DockerView`], read by the
//! caller) against what etcd records for this host. Finds leaked, orphaned and conflicting
//! addresses and the original tool's records a local endpoint has; with `--apply` fixes the
//! first, second and last, each by one compare-and-swap on what was read.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;

use crate::alloc::{AllocError, Allocator, Taken};
use crate::docker::{DockerView, Endpoint, ViewError};
use crate::inspect::Snapshot;
use crate::kv::{KeyValue, Kv, StoreError};
use crate::layout::{describe_holder, HostIdentity, HostMatch, Layout, Owner, Role};

/// A record younger than this when the run started is never called leaked: its container may
/// still be starting, its endpoint not yet listed.
const GRACE_SECS: u64 = 10;

/// Why reconcile stopped.
#[derive(Debug)]
pub enum ReconcileError {
    /// What Docker's endpoints use could not be read.
    Docker(ViewError),
    Store(StoreError),
    Alloc(AllocError),
}

impl fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReconcileError::Docker(e) => write!(f, "{e}"),
            ReconcileError::Store(e) => write!(f, "{e}"),
            ReconcileError::Alloc(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ReconcileError {}

impl From<StoreError> for ReconcileError {
    fn from(e: StoreError) -> ReconcileError {
        ReconcileError::Store(e)
    }
}

impl From<AllocError> for ReconcileError {
    fn from(e: AllocError) -> ReconcileError {
        ReconcileError::Alloc(e)
    }
}

/// One difference between Docker and etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Recorded for this host (a container's address or a gateway it reserved), and no
    /// endpoint or network of this host has it.
    Leaked {
        addr: Ipv4Addr,
        pool: Ipv4Addr,
        record: KeyValue,
    },
    /// An endpoint uses an address etcd has free.
    Orphaned { endpoint: Endpoint },
    /// An endpoint uses an address etcd records for another holder, or that no pool has.
    Conflicting { endpoint: Endpoint, why: String },
    /// An endpoint uses an address the original tool's record holds (no holder recorded).
    Original {
        endpoint: Endpoint,
        record: KeyValue,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ep = |e: &Endpoint| {
            format!(
                "container {} (mac {}) on network {}",
                e.container, e.mac, e.network
            )
        };
        match self {
            Finding::Leaked { addr, pool, record } => write!(
                f,
                "leaked {addr} in pool {pool}: recorded for {}, and nothing on this host uses it",
                describe_holder(&record.value)
            ),
            Finding::Orphaned { endpoint } => write!(
                f,
                "orphaned {} in pool {}: {} uses it, and etcd has it free",
                endpoint.addr,
                endpoint.pool,
                ep(endpoint)
            ),
            Finding::Conflicting { endpoint, why } => write!(
                f,
                "conflicting {} in pool {}: {} uses it, and {why}",
                endpoint.addr,
                endpoint.pool,
                ep(endpoint)
            ),
            Finding::Original { endpoint, .. } => write!(
                f,
                "original {} in pool {}: {} uses it, and the original tool's record holds it",
                endpoint.addr,
                endpoint.pool,
                ep(endpoint)
            ),
        }
    }
}

/// Compares etcd (`snap`) with two reads of Docker, one before and one after etcd was read:
/// an endpoint counts only if both list it, and a record is leaked only if neither does and it
/// was taken more than `GRACE_SECS` before the first (`started`, seconds since the epoch).
pub fn compare(
    snap: &Snapshot,
    before: &DockerView,
    after: &DockerView,
    me: &HostIdentity,
    started: u64,
) -> Vec<Finding> {
    let mut found = Vec::new();
    let used: HashSet<(Ipv4Addr, Ipv4Addr)> = before
        .endpoints
        .iter()
        .chain(&after.endpoints)
        .map(|e| (e.pool, e.addr))
        .chain(before.gateways.iter().chain(&after.gateways).copied())
        .collect();
    for (pool_id, pool) in &snap.containers {
        for (addr, record) in &pool.assigned {
            let Some(owner) = Owner::from_json(&record.value) else {
                continue;
            };
            let ours = matches!(owner.role, Role::Container | Role::Gateway)
                && !owner.is_original()
                && me.is_holder(&owner);
            if !ours || used.contains(&(*pool_id, *addr)) {
                continue;
            }
            match since_secs(&owner.since) {
                Some(t) if t + GRACE_SECS > started => {
                    log::info!(
                        "{addr} in pool {pool_id} was taken moments ago; not judged this time"
                    );
                }
                _ => found.push(Finding::Leaked {
                    addr: *addr,
                    pool: *pool_id,
                    record: record.clone(),
                }),
            }
        }
    }
    let later: HashSet<&Endpoint> = after.endpoints.iter().collect();
    for endpoint in before.endpoints.iter().filter(|e| later.contains(e)) {
        let endpoint = endpoint.clone();
        let Some(pool) = snap.containers.get(&endpoint.pool) else {
            let why = "etcd holds no such container pool".to_string();
            found.push(Finding::Conflicting { endpoint, why });
            continue;
        };
        if let Some(record) = pool.assigned.get(&endpoint.addr) {
            match Owner::from_json(&record.value) {
                None => found.push(Finding::Original {
                    endpoint,
                    record: record.clone(),
                }),
                Some(o) if o.is_original() => found.push(Finding::Original {
                    endpoint,
                    record: record.clone(),
                }),
                Some(o)
                    if o.role == Role::Container
                        && me.is_holder(&o)
                        && o.mac.eq_ignore_ascii_case(&endpoint.mac) => {}
                Some(o) => found.push(Finding::Conflicting {
                    endpoint,
                    why: format!("etcd records it for {}", o.describe()),
                }),
            }
        } else if pool.free.contains_key(&endpoint.addr) {
            found.push(Finding::Orphaned { endpoint });
        } else {
            let why = "it is not in the pool at all".to_string();
            found.push(Finding::Conflicting { endpoint, why });
        }
    }
    found
}

/// What applying one finding did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Fixed; what was done.
    Fixed(String),
    /// Left as it is; why (a conflict, or the record changed since it was read).
    Left(String),
}

/// Fixes one finding in etcd, guarded by what was read.
pub fn apply<K: Kv>(
    alloc: &mut Allocator<K>,
    layout: &Layout,
    snap: &Snapshot,
    me: &HostIdentity,
    finding: &Finding,
) -> Result<Outcome, ReconcileError> {
    match finding {
        Finding::Leaked { addr, pool, record } => {
            let keys = layout.containers(*pool);
            Ok(
                if alloc.release_if_unchanged(&keys, *addr, record.mod_revision)? {
                    log::info!("reconcile: freed leaked {addr} in pool {pool}");
                    Outcome::Fixed(format!("freed {addr}"))
                } else {
                    Outcome::Left(format!(
                        "{addr}: its record changed since it was read; left alone"
                    ))
                },
            )
        }
        Finding::Orphaned { endpoint } => {
            let keys = layout.containers(endpoint.pool);
            let net = snap
                .containers
                .get(&endpoint.pool)
                .and_then(|p| p.net)
                .unwrap_or_else(|| Ipv4Net::from(endpoint.addr));
            let owner = me.owner(Role::Container, &endpoint.mac, &crate::host::now());
            match alloc.take(&keys, net, endpoint.addr, &owner) {
                Ok(Taken::New | Taken::AlreadyYours) => {
                    log::info!(
                        "reconcile: recorded {} for container {} (mac {})",
                        endpoint.addr,
                        endpoint.container,
                        endpoint.mac
                    );
                    Ok(Outcome::Fixed(format!(
                        "recorded {} for container {}",
                        endpoint.addr, endpoint.container
                    )))
                }
                Err(e @ (AllocError::InUse { .. } | AllocError::NotInPool { .. })) => {
                    Ok(Outcome::Left(format!("{}: {e}", endpoint.addr)))
                }
                Err(e) => Err(e.into()),
            }
        }
        Finding::Original { endpoint, record } => {
            let keys = layout.containers(endpoint.pool);
            let owner = me
                .owner(Role::Container, &endpoint.mac, &crate::host::now())
                .to_json();
            Ok(
                if alloc.replace_owner(&keys, endpoint.addr, record.mod_revision, &owner)? {
                    log::info!(
                        "reconcile: adopted {} for container {}",
                        endpoint.addr,
                        endpoint.container
                    );
                    Outcome::Fixed(format!(
                        "adopted {} for container {}",
                        endpoint.addr, endpoint.container
                    ))
                } else {
                    Outcome::Left(format!(
                        "{}: its record changed since it was read; left alone",
                        endpoint.addr
                    ))
                },
            )
        }
        Finding::Conflicting { endpoint, .. } => Ok(Outcome::Left(format!(
            "{}: a conflict is for a person to resolve (see show --ip {})",
            endpoint.addr, endpoint.addr
        ))),
    }
}

/// Seconds since the epoch now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The seconds since the epoch of an owner's `Since` (`YYYY-MM-DDTHH:MM:SS[.n]Z`).
pub fn since_secs(text: &str) -> Option<u64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3_600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::memory::MemKv;
    use crate::kv::{Op, Txn};
    use crate::layout::Owner;

    /// Network mynet (pool 192.0.2.0, gateway 192.0.2.10) with containers c1 to c4 on
    /// 192.0.2.101 to .104; c1's MAC in capitals, which still matches its lower-case record.
    fn mynet() -> DockerView {
        let endpoint = |container: &str, addr: &str, mac: &str| Endpoint {
            network: "mynet".into(),
            pool: "192.0.2.0".parse().unwrap(),
            container: container.into(),
            addr: addr.parse().unwrap(),
            mac: mac.into(),
        };
        DockerView {
            endpoints: vec![
                endpoint("c1", "192.0.2.101", "02:42:C0:00:02:65"),
                endpoint("c2", "192.0.2.102", "02:42:c0:00:02:66"),
                endpoint("c3", "192.0.2.103", "02:42:c0:00:02:67"),
                endpoint("c4", "192.0.2.104", "02:42:c0:00:02:68"),
            ],
            gateways: vec![("192.0.2.0".parse().unwrap(), "192.0.2.10".parse().unwrap())],
        }
    }

    fn put(kv: &MemKv, key: &str, value: &str) {
        kv.txn(&Txn {
            success: vec![Op::put(key, value)],
            ..Txn::default()
        })
        .unwrap();
    }

    #[test]
    fn finds_and_fixes_each_kind_of_difference() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let me = HostIdentity::new("h1", "id1");
        put(
            &kv,
            "/t/containers/192.0.2.0/config",
            r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
        );
        let old = |o: Owner| {
            let mut o = o;
            o.since = "2020-01-01T00:00:00.000000000Z".into();
            o.to_json()
        };
        // c1: recorded right. c2: free (orphaned). c3: another host's. c4: the original's.
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.101",
            &old(me.owner(Role::Container, "02:42:c0:00:02:65", &crate::host::now())),
        );
        put(&kv, "/t/containers/192.0.2.0/pool/192.0.2.102", "");
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.103",
            &old(Owner::new(
                Role::Container,
                "h2",
                "02:42:c0:00:02:67",
                &crate::host::now(),
            )),
        );
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.104",
            &Owner::original(Role::Container, &crate::host::now()).to_json(),
        );
        // Leaked: ours, old, no endpoint. Kept: ours but just taken; another host's.
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.105",
            &old(me.owner(Role::Container, "02:42:c0:00:02:69", &crate::host::now())),
        );
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.106",
            &me.owner(Role::Container, "02:42:c0:00:02:6a", &crate::host::now())
                .to_json(),
        );
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.107",
            &old(Owner::new(
                Role::Container,
                "h2",
                "02:42:c0:00:02:6b",
                &crate::host::now(),
            )),
        );
        // A gateway this host reserved that no network of it has: leaked too.
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.11",
            &old(me.owner(Role::Gateway, "", &crate::host::now())),
        );
        let snap = Snapshot::read(&kv, &l).unwrap();
        let docker = mynet();
        let found = compare(&snap, &docker, &docker, &me, now_secs());
        let said: Vec<String> = found.iter().map(|f| f.to_string()).collect();
        assert_eq!(said.len(), 5, "{said:#?}");
        for want in [
            "leaked 192.0.2.11 in pool 192.0.2.0: recorded for the network gateway",
            "leaked 192.0.2.105 in pool 192.0.2.0",
            "orphaned 192.0.2.102 in pool 192.0.2.0: container c2",
            "conflicting 192.0.2.103 in pool 192.0.2.0: container c3 (mac 02:42:c0:00:02:67) on network mynet uses it, and etcd records it for host h2",
            "original 192.0.2.104",
        ] {
            assert!(said.iter().any(|s| s.starts_with(want)), "{want}: {said:#?}");
        }
        // Nothing changed by looking.
        let before = kv.dump();
        let _ = compare(&snap, &docker, &docker, &me, now_secs());
        assert_eq!(kv.dump(), before);

        let mut alloc = Allocator::new(&kv);
        let outcomes: Vec<Outcome> = found
            .iter()
            .map(|f| apply(&mut alloc, &l, &snap, &me, f).unwrap())
            .collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Fixed(_)))
                .count(),
            4,
            "{outcomes:?}"
        );
        let after = Snapshot::read(&kv, &l).unwrap();
        let again = compare(&after, &docker, &docker, &me, now_secs());
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(matches!(again[0], Finding::Conflicting { .. }));
        let c2 = &after.containers[&"192.0.2.0".parse().unwrap()].assigned
            [&"192.0.2.102".parse().unwrap()];
        assert!(c2.value.contains("02:42:c0:00:02:66") && c2.value.contains("id1"));
    }

    #[test]
    fn a_leak_fix_never_undoes_a_concurrent_retake() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let me = HostIdentity::new("h1", "");
        let mut o = me.owner(Role::Container, "02:42:00:00:00:01", &crate::host::now());
        o.since = "2020-01-01T00:00:00Z".into();
        put(
            &kv,
            "/t/containers/192.0.2.0/config",
            r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
        );
        put(
            &kv,
            "/t/containers/192.0.2.0/assigned/192.0.2.5",
            &o.to_json(),
        );
        let snap = Snapshot::read(&kv, &l).unwrap();
        let found = compare(
            &snap,
            &DockerView::default(),
            &DockerView::default(),
            &me,
            now_secs(),
        );
        assert_eq!(found.len(), 1);
        // Freed and taken again by another container after the read.
        let retaken = me
            .owner(Role::Container, "02:42:00:00:00:02", &crate::host::now())
            .to_json();
        put(&kv, "/t/containers/192.0.2.0/assigned/192.0.2.5", &retaken);
        let mut alloc = Allocator::new(&kv);
        let outcome = apply(&mut alloc, &l, &snap, &me, &found[0]).unwrap();
        assert!(matches!(outcome, Outcome::Left(_)), "{outcome:?}");
        assert!(kv
            .dump()
            .contains(&("/t/containers/192.0.2.0/assigned/192.0.2.5".into(), retaken)));
    }

    #[test]
    fn reads_back_the_times_owners_record() {
        assert_eq!(since_secs("1970-01-01T00:00:00.000000000Z"), Some(0));
        assert_eq!(
            since_secs("2026-11-22T00:00:00.000000005Z"),
            Some(1_795_305_600)
        );
        assert_eq!(since_secs("2000-02-29T11:59:59Z"), Some(951_825_599));
        assert_eq!(since_secs(""), None);
        assert_eq!(since_secs("yesterday"), None);
        let now = crate::host::now();
        let back = since_secs(&now).unwrap();
        assert!(back.abs_diff(now_secs()) <= 1);
    }
}
