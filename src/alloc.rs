//! Moving single addresses between a pool's `pool/` and `assigned/` directories: taking a
//! random or a given address, reserving one for a role, releasing one. Every move is ONE
//! compare-and-swap transaction, so an address is never in both directories nor in neither,
//! whoever else writes at the same time.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;

use crate::kv::{prefix_end, Compare, KeyValue, Kv, Op, Range, StoreError, Txn};
use crate::layout::{describe_holder, HostMatch, Owner, PoolKeys, Role};

/// How many free keys one look at a window brings back as candidates.
const WINDOW_LIMIT: u64 = 64;

/// Compare-and-swap attempts for one random allocation before giving up under contention.
const MAX_ATTEMPTS: u32 = 32;

/// Wall-clock bound of one allocation, so that Docker never waits on us for long.
const MAX_ALLOCATION_TIME: Duration = Duration::from_secs(10);

/// Why an address could not be taken, reserved or released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    /// Every address of the pool is in use.
    Exhausted { net: Ipv4Net },
    /// The address asked for is held by someone else; `holder` says who.
    InUse { addr: Ipv4Addr, holder: String },
    /// The address asked for is neither free nor in use in this pool.
    NotInPool { addr: Ipv4Addr, net: Ipv4Net },
    /// Other writers won every compare-and-swap until the attempts ran out.
    Contended { net: Ipv4Net, attempts: u32 },
    /// The store failed.
    Store(StoreError),
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::Exhausted { net } => write!(f, "no free address left in pool {net}"),
            AllocError::InUse { addr, holder } => write!(f, "{addr} is already in use by {holder}"),
            AllocError::NotInPool { addr, net } => {
                write!(f, "{addr} is not in the address pool of {net}")
            }
            AllocError::Contended { net, attempts } => write!(
                f,
                "gave up taking an address from pool {net} after {attempts} attempts lost to \
                 concurrent requests"
            ),
            AllocError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AllocError {}

impl From<StoreError> for AllocError {
    fn from(e: StoreError) -> AllocError {
        AllocError::Store(e)
    }
}

/// The result of taking a given address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Moved from `pool/` to `assigned/` just now.
    New,
    /// Already held by the same owner (a retried request): nothing changed.
    AlreadyYours,
}

/// The result of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Moved back to `pool/`; `holder` describes who had it.
    Freed { holder: String },
    /// It was already free in `pool/`: nothing changed.
    AlreadyFree,
    /// Neither free nor in use in this pool (a gateway outside it, say): nothing changed.
    Unknown,
    /// Held for another role or by another host; left as it is. `holder` says who.
    Kept { holder: String },
}

/// Takes and releases addresses of pools in a store. Remembers free candidates it has seen,
/// so that most random allocations cost one transaction.
pub struct Allocator<K> {
    kv: K,
    /// Per pool directory: addresses seen free in `pool/` lately.
    candidates: HashMap<String, Vec<Ipv4Addr>>,
    rng: u64,
}

impl<K: Kv> Allocator<K> {
    pub fn new(kv: K) -> Allocator<K> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seed = now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32);
        Allocator {
            kv,
            candidates: HashMap::new(),
            rng: seed | 1,
        }
    }

    pub fn kv(&self) -> &K {
        &self.kv
    }

    /// xorshift64*: spread, not secrecy, is what matters here.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A free-looking address to try: a remembered candidate, else any host address of `net`.
    fn candidate(&mut self, keys: &PoolKeys, net: Ipv4Net) -> Ipv4Addr {
        let pick = self.random();
        if let Some(seen) = self.candidates.get_mut(&keys.pool_dir) {
            if !seen.is_empty() {
                let i = (pick % seen.len() as u64) as usize;
                return seen.swap_remove(i);
            }
        }
        // Host addresses run from network+1 to broadcast-1; a /31 or /32 has none to guess.
        let first = u64::from(u32::from(net.network())) + 1;
        let last = u64::from(u32::from(net.broadcast())).saturating_sub(1);
        if last < first {
            return net.network();
        }
        Ipv4Addr::from((first + pick % (last - first + 1)) as u32)
    }

    /// Takes a random free address of the pool for `owner`.
    ///
    /// One transaction tries a candidate; if it is gone, the same transaction's failure branch
    /// reads the free keys near it (a window bounded to one /24 of keys, so the cost does not
    /// grow with the pool) and the next attempt picks among those.
    pub fn take_any(
        &mut self,
        keys: &PoolKeys,
        net: Ipv4Net,
        owner: &Owner,
    ) -> Result<Ipv4Addr, AllocError> {
        let started = Instant::now();
        let value = owner.to_json();
        for _ in 0..MAX_ATTEMPTS {
            if started.elapsed() > MAX_ALLOCATION_TIME {
                break;
            }
            let addr = self.candidate(keys, net);
            let (window_start, window_end) = window(keys, addr);
            let txn = take_txn(
                keys,
                addr,
                &value,
                vec![
                    Op::Range(
                        Range::between(&window_start, &window_end)
                            .limit(WINDOW_LIMIT)
                            .keys_only(),
                    ),
                    Op::Range(Range::key(keys.assigned(addr))),
                ],
            );
            let outcome = self.kv.txn(&txn)?;
            if outcome.succeeded {
                return Ok(addr);
            }
            // A write of ours that timed out may have been applied after all.
            if outcome.range(1).first().is_some_and(|kv| kv.value == value) {
                return Ok(addr);
            }
            let mut free = addrs_of(keys, outcome.range(0));
            free.retain(|a| *a != addr);
            if free.is_empty() {
                free = self.scan_pool(keys, &window_start, &window_end)?;
                if free.is_empty() {
                    return Err(AllocError::Exhausted { net });
                }
            }
            self.candidates.insert(keys.pool_dir.clone(), free);
        }
        Err(AllocError::Contended {
            net,
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Free keys anywhere in the pool, after the empty window first and then before it. Each
    /// read costs what the free keys in it cost, and `pool/` holds only free addresses.
    fn scan_pool(
        &self,
        keys: &PoolKeys,
        window_start: &str,
        window_end: &str,
    ) -> Result<Vec<Ipv4Addr>, AllocError> {
        let after = Range::between(window_end, prefix_end(&keys.pool_dir));
        let before = Range::between(&keys.pool_dir, window_start);
        for range in [after, before] {
            let found = self.kv.range(&range.limit(WINDOW_LIMIT).keys_only())?;
            if !found.is_empty() {
                return Ok(addrs_of(keys, &found));
            }
        }
        Ok(Vec::new())
    }

    /// Takes exactly `addr` for `owner`. Asking again for an address the same owner already
    /// holds (same role, host and MAC) succeeds without change.
    pub fn take(
        &mut self,
        keys: &PoolKeys,
        net: Ipv4Net,
        addr: Ipv4Addr,
        owner: &Owner,
    ) -> Result<Taken, AllocError> {
        let held = vec![Op::Range(Range::key(keys.assigned(addr)))];
        let txn = take_txn(keys, addr, &owner.to_json(), held);
        let outcome = self.kv.txn(&txn)?;
        if outcome.succeeded {
            return Ok(Taken::New);
        }
        match outcome.range(0).first() {
            None => Err(AllocError::NotInPool { addr, net }),
            Some(held) => match Owner::from_json(&held.value) {
                Some(h) if h.role == owner.role && h.host == owner.host && h.mac == owner.mac => {
                    Ok(Taken::AlreadyYours)
                }
                _ => Err(AllocError::InUse {
                    addr,
                    holder: describe_holder(&held.value),
                }),
            },
        }
    }

    /// Keeps `addr` out of the container pool for a role Docker gave it (gateway, aux address):
    /// if it is free in the pool, it moves to `assigned/` with `owner`; if it is not in the pool,
    /// nothing changes. Fails only if a container holds it.
    pub fn reserve(
        &mut self,
        keys: &PoolKeys,
        addr: Ipv4Addr,
        owner: &Owner,
    ) -> Result<(), AllocError> {
        let held = vec![Op::Range(Range::key(keys.assigned(addr)))];
        let txn = take_txn(keys, addr, &owner.to_json(), held);
        let outcome = self.kv.txn(&txn)?;
        if outcome.succeeded {
            log::info!(
                "reserved {addr} for {} (taken out of the pool)",
                owner.role.as_str()
            );
            return Ok(());
        }
        match outcome
            .range(0)
            .first()
            .map(|kv| Owner::from_json(&kv.value))
        {
            Some(Some(holder)) if holder.role == Role::Container => Err(AllocError::InUse {
                addr,
                holder: holder.describe(),
            }),
            _ => Ok(()),
        }
    }

    /// Gives back an address a container on `host` held, or a gateway `host` reserved
    /// (Docker's ReleaseAddress). Aux addresses (every host's network names them), addresses
    /// held by another host, or not held at all stay as they are.
    pub fn release_container<H: HostMatch + ?Sized>(
        &mut self,
        keys: &PoolKeys,
        addr: Ipv4Addr,
        host: &H,
    ) -> Result<Released, AllocError> {
        // Read, then move only if unchanged since the read: a concurrent re-take is never undone.
        for _ in 0..MAX_ATTEMPTS {
            let Some(held) = self
                .kv
                .range(&Range::key(keys.assigned(addr)))?
                .into_iter()
                .next()
            else {
                return Ok(Released::Unknown);
            };
            if let Some(owner) = Owner::from_json(&held.value) {
                // The original recorded no host: whichever host's Docker releases one of its
                // containers' addresses is the one that had it.
                let ours = match owner.role {
                    Role::Container => host.is_holder(&owner) || owner.is_original(),
                    Role::Gateway => host.is_holder(&owner) && !owner.is_original(),
                    Role::Aux | Role::Host => false,
                };
                if !ours {
                    return Ok(Released::Kept {
                        holder: owner.describe(),
                    });
                }
            }
            let txn = Txn {
                compares: vec![Compare::ModRevision(held.key.clone(), held.mod_revision)],
                success: vec![
                    Op::delete(keys.assigned(addr)),
                    Op::put(keys.pool(addr), ""),
                ],
                failure: vec![],
            };
            if self.kv.txn(&txn)?.succeeded {
                return Ok(Released::Freed {
                    holder: describe_holder(&held.value),
                });
            }
        }
        Err(AllocError::Contended {
            net: Ipv4Net::from(addr),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Replaces the record of `addr` in `assigned/` with `value` if it is unchanged since
    /// `mod_revision`; whether it was.
    pub fn replace_owner(
        &mut self,
        keys: &PoolKeys,
        addr: Ipv4Addr,
        mod_revision: i64,
        value: &str,
    ) -> Result<bool, AllocError> {
        let key = keys.assigned(addr);
        let txn = Txn {
            compares: vec![Compare::ModRevision(key.clone(), mod_revision)],
            success: vec![Op::put(key, value)],
            failure: vec![],
        };
        Ok(self.kv.txn(&txn)?.succeeded)
    }

    /// Gives back `addr` (an operator's `release-ip`/`release-host`) unless its record is one
    /// `guarded` says to keep: then nothing changes and `Kept` says who holds it. The move is
    /// guarded by the revision read, so a record that changes meanwhile is read again.
    pub fn release_unless(
        &mut self,
        keys: &PoolKeys,
        addr: Ipv4Addr,
        guarded: impl Fn(&Owner) -> bool,
    ) -> Result<Released, AllocError> {
        for _ in 0..MAX_ATTEMPTS {
            let txn = Txn {
                compares: vec![Compare::Exists(keys.assigned(addr))],
                success: vec![Op::Range(Range::key(keys.assigned(addr)))],
                failure: vec![Op::Range(Range::key(keys.pool(addr)))],
            };
            let outcome = self.kv.txn(&txn)?;
            let Some(held) = outcome.range(0).first().filter(|_| outcome.succeeded) else {
                return Ok(if outcome.range(0).is_empty() {
                    Released::Unknown
                } else {
                    Released::AlreadyFree
                });
            };
            if let Some(owner) = Owner::from_json(&held.value).filter(|o| guarded(o)) {
                return Ok(Released::Kept {
                    holder: owner.describe(),
                });
            }
            let txn = Txn {
                compares: vec![Compare::ModRevision(held.key.clone(), held.mod_revision)],
                success: vec![
                    Op::delete(keys.assigned(addr)),
                    Op::put(keys.pool(addr), ""),
                ],
                failure: vec![],
            };
            if self.kv.txn(&txn)?.succeeded {
                return Ok(Released::Freed {
                    holder: describe_holder(&held.value),
                });
            }
        }
        Err(AllocError::Contended {
            net: Ipv4Net::from(addr),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Gives back `addr` whoever holds it (an operator's `release-ip`/`release-host`).
    pub fn release_any(&mut self, keys: &PoolKeys, addr: Ipv4Addr) -> Result<Released, AllocError> {
        let txn = Txn {
            compares: vec![Compare::Exists(keys.assigned(addr))],
            success: vec![
                Op::Range(Range::key(keys.assigned(addr))),
                Op::delete(keys.assigned(addr)),
                Op::put(keys.pool(addr), ""),
            ],
            failure: vec![Op::Range(Range::key(keys.pool(addr)))],
        };
        let outcome = self.kv.txn(&txn)?;
        if outcome.succeeded {
            let holder = outcome
                .range(0)
                .first()
                .map(|kv| describe_holder(&kv.value));
            return Ok(Released::Freed {
                holder: holder.unwrap_or_default(),
            });
        }
        if outcome.range(0).is_empty() {
            Ok(Released::Unknown)
        } else {
            Ok(Released::AlreadyFree)
        }
    }
}

/// "If `addr` is free (in `pool/`, not in `assigned/`), move it to `assigned/` with `value`;
/// otherwise run `failure`": the one transaction every taking goes through.
fn take_txn(keys: &PoolKeys, addr: Ipv4Addr, value: &str, failure: Vec<Op>) -> Txn {
    Txn {
        compares: vec![
            Compare::Exists(keys.pool(addr)),
            Compare::Absent(keys.assigned(addr)),
        ],
        success: vec![
            Op::delete(keys.pool(addr)),
            Op::put(keys.assigned(addr), value),
        ],
        failure,
    }
}

/// The keys of `pool/` that share `addr`'s first three octets: at most 256 keys, so reading
/// them costs the same in a /24 and a /16 (etcd 3.4 walks a whole range whatever its limit).
fn window(keys: &PoolKeys, addr: Ipv4Addr) -> (String, String) {
    let [a, b, c, _] = addr.octets();
    let start = format!("{}{a}.{b}.{c}.", keys.pool_dir);
    let end = prefix_end(&start);
    (start, end)
}

fn addrs_of(keys: &PoolKeys, kvs: &[KeyValue]) -> Vec<Ipv4Addr> {
    kvs.iter().filter_map(|kv| keys.addr_of(&kv.key)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::memory::MemKv;
    use crate::layout::Layout;
    use std::collections::HashSet;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A pool with every host address of `n` free.
    fn pool(n: Ipv4Net) -> (MemKv, PoolKeys) {
        let kv = MemKv::new();
        let keys = Layout::new("/t").containers(n.network());
        for addr in n.hosts() {
            kv.txn(&Txn {
                success: vec![Op::put(keys.pool(addr), "")],
                ..Txn::default()
            })
            .unwrap();
        }
        kv.calls.set(0);
        (kv, keys)
    }

    fn owner(mac: &str) -> Owner {
        Owner::new(Role::Container, "h1", mac)
    }

    #[test]
    fn takes_every_address_once_then_reports_exhaustion() {
        let n = net("192.0.2.0/28");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        let mut seen = HashSet::new();
        for i in 0..14 {
            let addr = alloc
                .take_any(&keys, n, &owner(&format!("02:42:00:00:00:{i:02x}")))
                .unwrap();
            assert!(seen.insert(addr), "{addr} handed out twice");
        }
        assert_eq!(
            alloc.take_any(&keys, n, &owner("02:42:00:00:00:ff")),
            Err(AllocError::Exhausted { net: n })
        );
        assert!(kv
            .dump()
            .iter()
            .all(|(k, _)| k.starts_with(&keys.assigned_dir)));
    }

    #[test]
    fn a_random_allocation_in_a_full_slash_16_costs_one_or_two_transactions() {
        let n = net("198.18.0.0/16");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        for i in 0..50 {
            let before = kv.calls.get();
            alloc
                .take_any(&keys, n, &owner(&format!("02:42:00:00:01:{i:02x}")))
                .unwrap();
            assert!(kv.calls.get() - before <= 2);
        }
    }

    #[test]
    fn finds_the_few_free_addresses_far_from_the_guess() {
        let n = net("198.18.0.0/16");
        let kv = MemKv::new();
        let keys = Layout::new("/t").containers(n.network());
        let only = a("198.18.200.7");
        kv.txn(&Txn {
            success: vec![Op::put(keys.pool(only), "")],
            ..Txn::default()
        })
        .unwrap();
        let mut alloc = Allocator::new(&kv);
        assert_eq!(
            alloc.take_any(&keys, n, &owner("02:42:00:00:00:01")),
            Ok(only)
        );
        assert_eq!(
            alloc.take_any(&keys, n, &owner("02:42:00:00:00:02")),
            Err(AllocError::Exhausted { net: n })
        );
    }

    #[test]
    fn tiny_networks_from_a_hand_edited_config_do_not_panic() {
        for n in ["255.255.255.255/32", "192.0.2.0/31"] {
            let n = net(n);
            let (kv, keys) = pool(n);
            let mut alloc = Allocator::new(&kv);
            let _ = alloc.take_any(&keys, n, &owner("02:42:00:00:00:01"));
        }
    }

    #[test]
    fn a_given_address_is_taken_once_and_retries_by_the_same_owner_succeed() {
        let n = net("192.0.2.0/24");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        let first = owner("02:42:00:00:00:01");
        assert_eq!(
            alloc.take(&keys, n, a("192.0.2.99"), &first),
            Ok(Taken::New)
        );
        assert_eq!(
            alloc.take(&keys, n, a("192.0.2.99"), &first),
            Ok(Taken::AlreadyYours)
        );
        let other = owner("02:42:00:00:00:02");
        assert_eq!(
            alloc.take(&keys, n, a("192.0.2.99"), &other),
            Err(AllocError::InUse {
                addr: a("192.0.2.99"),
                holder: "host h1 (mac 02:42:00:00:00:01)".into()
            })
        );
        assert_eq!(
            alloc.take(&keys, n, a("198.51.100.1"), &other),
            Err(AllocError::NotInPool {
                addr: a("198.51.100.1"),
                net: n
            })
        );
    }

    #[test]
    fn reserved_addresses_never_go_to_containers_nor_back_to_the_pool() {
        let n = net("192.0.2.0/29");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        let gateway = Owner::new(Role::Gateway, "h1", "");
        alloc.reserve(&keys, a("192.0.2.1"), &gateway).unwrap();
        alloc.reserve(&keys, a("192.0.2.1"), &gateway).unwrap();
        alloc.reserve(&keys, a("203.0.113.1"), &gateway).unwrap();
        for i in 0..5 {
            let got = alloc
                .take_any(&keys, n, &owner(&format!("02:42:00:00:00:{i:02x}")))
                .unwrap();
            assert_ne!(got, a("192.0.2.1"));
        }
        assert!(alloc
            .take_any(&keys, n, &owner("02:42:00:00:00:09"))
            .is_err());
        // Another host's release leaves it; the host that reserved it frees it (see below).
        assert!(matches!(
            alloc.release_container(&keys, a("192.0.2.1"), "h2"),
            Ok(Released::Kept { .. })
        ));
        assert!(kv
            .dump()
            .iter()
            .all(|(k, _)| !k.starts_with(&keys.pool_dir)));
    }

    #[test]
    fn reserving_an_address_a_container_holds_fails() {
        let n = net("192.0.2.0/24");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        alloc
            .take(&keys, n, a("192.0.2.5"), &owner("02:42:00:00:00:01"))
            .unwrap();
        let gateway = Owner::new(Role::Gateway, "h1", "");
        assert!(matches!(
            alloc.reserve(&keys, a("192.0.2.5"), &gateway),
            Err(AllocError::InUse { .. })
        ));
    }

    #[test]
    fn releases_only_what_this_host_holds_for_a_container() {
        let n = net("192.0.2.0/24");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        let before = kv.dump();
        alloc
            .take(&keys, n, a("192.0.2.5"), &owner("02:42:00:00:00:01"))
            .unwrap();
        assert!(matches!(
            alloc.release_container(&keys, a("192.0.2.5"), "h2"),
            Ok(Released::Kept { .. })
        ));
        assert!(matches!(
            alloc.release_container(&keys, a("192.0.2.5"), "h1"),
            Ok(Released::Freed { .. })
        ));
        assert_eq!(kv.dump(), before);
        assert_eq!(
            alloc.release_container(&keys, a("192.0.2.5"), "h1"),
            Ok(Released::Unknown)
        );
    }

    #[test]
    fn addresses_the_original_assigned_stay_taken_until_docker_releases_them() {
        let n = net("192.0.2.0/29");
        let (kv, keys) = pool(n);
        let held = a("192.0.2.3");
        kv.txn(&Txn {
            success: vec![
                Op::delete(keys.pool(held)),
                Op::put(
                    keys.assigned(held),
                    Owner::original(Role::Container).to_json(),
                ),
            ],
            ..Txn::default()
        })
        .unwrap();
        let mut alloc = Allocator::new(&kv);
        assert!(matches!(
            alloc.take(&keys, n, held, &owner("02:42:00:00:00:01")),
            Err(AllocError::InUse { .. })
        ));
        for i in 0..5 {
            let got = alloc
                .take_any(&keys, n, &owner(&format!("02:42:00:00:01:{i:02x}")))
                .unwrap();
            assert_ne!(got, held);
        }
        assert!(matches!(
            alloc.release_container(&keys, held, "any-host"),
            Ok(Released::Freed { .. })
        ));
    }

    #[test]
    fn a_gateway_goes_back_when_the_host_that_reserved_it_releases_it() {
        let n = net("192.0.2.0/29");
        let (kv, keys) = pool(n);
        let before = kv.dump();
        let mut alloc = Allocator::new(&kv);
        let me = crate::layout::HostIdentity::new("h1", "id-1");
        alloc
            .reserve(&keys, a("192.0.2.1"), &me.owner(Role::Gateway, ""))
            .unwrap();
        alloc
            .reserve(&keys, a("192.0.2.2"), &me.owner(Role::Aux, ""))
            .unwrap();
        let other = crate::layout::HostIdentity::new("h1", "id-2");
        assert!(matches!(
            alloc.release_container(&keys, a("192.0.2.1"), &other),
            Ok(Released::Kept { .. })
        ));
        // Renamed, same identity: still the host that reserved it.
        let renamed = crate::layout::HostIdentity::new("h1-renamed", "id-1");
        assert!(matches!(
            alloc.release_container(&keys, a("192.0.2.1"), &renamed),
            Ok(Released::Freed { .. })
        ));
        assert!(matches!(
            alloc.release_container(&keys, a("192.0.2.2"), &renamed),
            Ok(Released::Kept { .. })
        ));
        alloc.release_any(&keys, a("192.0.2.2")).unwrap();
        assert_eq!(kv.dump(), before);
    }

    #[test]
    fn a_guarded_release_keeps_what_the_guard_names() {
        let n = net("192.0.2.0/24");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        alloc
            .take(&keys, n, a("192.0.2.5"), &owner("02:42:00:00:00:01"))
            .unwrap();
        let taken = kv.dump();
        let containers = |o: &Owner| o.role == Role::Container;
        assert_eq!(
            alloc.release_unless(&keys, a("192.0.2.5"), containers),
            Ok(Released::Kept {
                holder: "host h1 (mac 02:42:00:00:00:01)".into()
            })
        );
        assert_eq!(kv.dump(), taken);
        assert!(matches!(
            alloc.release_unless(&keys, a("192.0.2.5"), |_| false),
            Ok(Released::Freed { .. })
        ));
        assert_eq!(
            alloc.release_unless(&keys, a("192.0.2.5"), containers),
            Ok(Released::AlreadyFree)
        );
        assert_eq!(
            alloc.release_unless(&keys, a("198.51.100.5"), containers),
            Ok(Released::Unknown)
        );
    }

    #[test]
    fn operator_release_moves_back_whoever_holds_it() {
        let n = net("192.0.2.0/24");
        let (kv, keys) = pool(n);
        let mut alloc = Allocator::new(&kv);
        alloc
            .take(&keys, n, a("192.0.2.5"), &owner("02:42:00:00:00:01"))
            .unwrap();
        assert!(matches!(
            alloc.release_any(&keys, a("192.0.2.5")),
            Ok(Released::Freed { .. })
        ));
        assert_eq!(
            alloc.release_any(&keys, a("192.0.2.5")),
            Ok(Released::AlreadyFree)
        );
        assert_eq!(
            alloc.release_any(&keys, a("198.51.100.5")),
            Ok(Released::Unknown)
        );
    }
}
