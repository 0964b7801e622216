//! `migrate-v2`: brings the original tool's pools from etcd's v2 keyspace into this tool's v3
//! layout: configs, free addresses, and the addresses it had assigned (recorded as held by the
//! original). It is given the v2 keys and writes only v3, each address in a transaction guarded
//! by "v3 holds nothing for it", so the v2 data stays for going back and a second run changes
//! nothing. Where v3 already says something else, it refuses before writing anything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::kv::{Compare, KeyValue, Kv, Op, Range, StoreError, Txn, MAX_TXN_OPS};
use crate::layout::{
    describe_holder, ContainerConfig, HostsConfig, KeyKind, Layout, Owner, PoolKeys, Role,
};
use crate::pools::{addrs_of_dir, json};

/// Addresses per transaction: each needs two compares, and etcd allows 128 per list.
const BATCH: usize = MAX_TXN_OPS / 2;

/// Why the migration did not happen, or did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateError {
    /// v3 already holds something that disagrees with the v2 data (or the v2 data cannot be
    /// read as the original's); one line per key, printed before this error. Nothing written.
    Refused {
        problems: usize,
    },
    /// Keys changed in v3 while the migration wrote; what was written is whole, and running
    /// it again finishes the rest or names what disagrees.
    Raced {
        keys: Vec<String>,
    },
    /// Reading v3 back after writing did not show what was written.
    Unverified {
        problems: Vec<String>,
    },
    /// The store failed while writing: what was written is whole (each address, configs only
    /// after their addresses, no marker yet), and running it again finishes it.
    Interrupted(StoreError),
    Store(StoreError),
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::Refused { problems } => write!(
                f,
                "refusing to migrate: {problems} key(s) disagree (listed above); nothing was \
                 written"
            ),
            MigrateError::Raced { keys } => write!(
                f,
                "{} key(s) changed in etcd v3 while migrating ({}); run migrate-v2 again",
                keys.len(),
                keys.join(", ")
            ),
            MigrateError::Unverified { problems } => write!(
                f,
                "etcd v3 does not hold what was written: {}",
                problems.join("; ")
            ),
            MigrateError::Interrupted(e) => write!(
                f,
                "{e}; the migration stopped part way: what it wrote is whole, and no plugin \
                 uses a pool before its config is written: run migrate-v2 again to finish"
            ),
            MigrateError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MigrateError {}

impl From<StoreError> for MigrateError {
    fn from(e: StoreError) -> MigrateError {
        MigrateError::Store(e)
    }
}

/// The value of `<prefix>/migrated-v2`: the v2 index the last migration brought over. Keys
/// the original has not changed since then are not looked at again, so what the plugin did
/// in v3 since (taking, releasing) is never undone by a later run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    #[serde(rename = "V2Index")]
    v2_index: String,
    #[serde(rename = "Since")]
    since: String,
}

/// One pool of the original's data and what to write for it.
#[derive(Debug)]
pub struct PoolPlan {
    /// "host pool 192.0.2.0/24", "container pool 198.51.100.0/24".
    pub label: String,
    keys: PoolKeys,
    role: Role,
    /// The config key and the value to write, if v3 lacks it.
    config: Option<(String, String)>,
    pub write_free: Vec<Ipv4Addr>,
    pub write_assigned: Vec<Ipv4Addr>,
    /// In v3 already, as v2 has it (or taken in v3 since, for a free one).
    pub already: usize,
    /// Unchanged in v2 since the last migration: left as v3 has it now.
    pub carried: usize,
}

/// What a migration will do, worked out before anything is written.
#[derive(Debug)]
pub struct Plan {
    pub pools: Vec<PoolPlan>,
    /// Keys under the prefix that are not the original's layout: not migrated.
    pub ignored: Vec<String>,
    /// Oddities of the v2 data that are resolved the safe way (said, not refused).
    pub notes: Vec<String>,
    /// Where v3 disagrees, or the v2 data cannot be read: each names its key.
    pub problems: Vec<String>,
    v2_index: i64,
    previous_index: i64,
    marker_key: String,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.pools
            .iter()
            .all(|p| p.config.is_none() && p.write_free.is_empty() && p.write_assigned.is_empty())
    }
}

/// The original's data of one pool, as read from v2.
#[derive(Default)]
struct OriginalPool {
    config: Option<KeyValue>,
    free: BTreeMap<Ipv4Addr, i64>,
    assigned: BTreeMap<Ipv4Addr, i64>,
}

/// Works out the migration of `v2_keys` (the leaves under the prefix, `mod_revision` being
/// v2's modifiedIndex, read at v2 index `v2_index`) against what v3 holds now. Reads only.
pub fn plan<K: Kv>(
    kv: &K,
    layout: &Layout,
    v2_keys: &[KeyValue],
    v2_index: i64,
) -> Result<Plan, MigrateError> {
    let marker_key = layout.migrated_v2();
    let previous_index = kv
        .range(&Range::key(&marker_key))?
        .first()
        .and_then(|kv| serde_json::from_str::<Marker>(&kv.value).ok())
        .and_then(|m| m.v2_index.parse::<i64>().ok())
        .unwrap_or(0);
    let mut plan = Plan {
        pools: Vec::new(),
        ignored: Vec::new(),
        notes: Vec::new(),
        problems: Vec::new(),
        v2_index,
        previous_index,
        marker_key,
    };

    // None: the hosts' pool; Some(network address): a container network.
    let mut pools: BTreeMap<Option<Ipv4Addr>, OriginalPool> = BTreeMap::new();
    for key in v2_keys {
        match layout.classify(&key.key) {
            Some(KeyKind::HostsConfig) => pools.entry(None).or_default().config = Some(key.clone()),
            Some(KeyKind::ContainerConfig(net)) => {
                pools.entry(Some(net)).or_default().config = Some(key.clone())
            }
            Some(KeyKind::Free(pool, addr)) => {
                pools
                    .entry(pool)
                    .or_default()
                    .free
                    .insert(addr, key.mod_revision);
            }
            Some(KeyKind::Assigned(pool, addr)) => {
                pools
                    .entry(pool)
                    .or_default()
                    .assigned
                    .insert(addr, key.mod_revision);
            }
            None => plan.ignored.push(key.key.clone()),
        }
    }
    // Hosts and containers share one subnet: an address in both kinds of pool would go to a
    // host and a container alike.
    let gateway = pools
        .get(&None)
        .and_then(|p| p.config.as_ref())
        .and_then(|c| HostsConfig::parse(&c.value))
        .map(|(_, gateway)| gateway);
    let host_addrs: BTreeSet<Ipv4Addr> = pools
        .get(&None)
        .map(|p| p.free.keys().chain(p.assigned.keys()).copied().collect())
        .unwrap_or_default();
    for (id, pool) in &pools {
        let Some(net) = id else { continue };
        let subnet = pool
            .config
            .as_ref()
            .and_then(|c| ContainerConfig::parse(&c.value));
        for addr in pool.free.keys().chain(pool.assigned.keys()) {
            let skipped = subnet.is_some_and(|n| never_pooled(*addr, n, gateway));
            if host_addrs.contains(addr) && !skipped {
                plan.problems.push(format!(
                    "{}: in the original's host pool and in its container pool {net}; remove \
                     it from one of them in etcd v2 (ETCDCTL_API=2 etcdctl rm KEY)",
                    layout.containers(*net).pool(*addr)
                ));
            }
        }
    }
    for (id, original) in pools {
        if let Some(pool) = plan_pool(kv, layout, id, original, gateway, &mut plan)? {
            plan.pools.push(pool);
        }
    }
    Ok(plan)
}

fn plan_pool<K: Kv>(
    kv: &K,
    layout: &Layout,
    id: Option<Ipv4Addr>,
    mut original: OriginalPool,
    gateway: Option<Ipv4Addr>,
    plan: &mut Plan,
) -> Result<Option<PoolPlan>, MigrateError> {
    let (keys, config_key, role) = match id {
        None => (layout.hosts(), layout.hosts_config(), Role::Host),
        Some(net) => (
            layout.containers(net),
            layout.container_config(net),
            Role::Container,
        ),
    };
    let Some(config) = original.config.take() else {
        plan.problems.push(format!(
            "{config_key}: missing in the original's v2 data, which has addresses for it"
        ));
        return Ok(None);
    };
    // The network, and the config value as this tool writes it (the original's, byte for byte).
    let parsed: Option<(Ipv4Net, String)> = match id {
        None => HostsConfig::parse(&config.value)
            .map(|(subnet, gateway)| (subnet, json(&HostsConfig::new(subnet, gateway)))),
        Some(id) => ContainerConfig::parse(&config.value)
            .filter(|net| net.network() == id)
            .map(|net| (net, json(&ContainerConfig::new(net)))),
    };
    let Some((net, config_value)) = parsed else {
        plan.problems.push(format!(
            "{config_key}: the original's v2 value {:?} is not a config this tool can read",
            config.value
        ));
        return Ok(None);
    };
    let label = match id {
        None => format!("host pool {net}"),
        Some(_) => format!("container pool {net}"),
    };
    // Unchanged in v2 since the last migration: what v3 holds now (the plugin's doing since)
    // stands, as long as v3 still holds something for it.
    let carried = |index: i64| plan.previous_index > 0 && index <= plan.previous_index;

    let stored_config = kv.range(&Range::key(&config_key))?;
    let config_to_write = match stored_config.first() {
        Some(_) if carried(config.mod_revision) => None,
        None => Some((config_key.clone(), config_value)),
        Some(stored) if stored.value == config_value => None,
        Some(stored) => {
            plan.problems.push(format!(
                "{config_key}: etcd v3 holds {:?}, the original's v2 data {:?}",
                stored.value, config.value
            ));
            None
        }
    };

    let v3_free = addrs_of_dir(kv, &keys, &keys.pool_dir)?;
    let v3_assigned: BTreeMap<Ipv4Addr, String> = kv
        .range(&Range::prefix(&keys.assigned_dir))?
        .into_iter()
        .filter_map(|kv| Some((keys.addr_of(&kv.key)?, kv.value)))
        .collect();
    let mut pool = PoolPlan {
        label,
        keys,
        role,
        config: config_to_write,
        write_free: Vec::new(),
        write_assigned: Vec::new(),
        already: 0,
        carried: 0,
    };
    // The original moved addresses in several requests; one left in both directories is
    // taken as assigned, the safe reading.
    for addr in original.assigned.keys() {
        if original.free.remove(addr).is_some() {
            plan.notes.push(format!(
                "{}: both free and assigned in the original's v2 data; migrated as assigned",
                pool.keys.assigned(*addr)
            ));
        }
    }
    // The original pooled every address of a range; this tool never pools these.
    let skipped: Vec<Ipv4Addr> = original
        .free
        .keys()
        .copied()
        .filter(|a| never_pooled(*a, net, gateway))
        .collect();
    for addr in skipped {
        original.free.remove(&addr);
        plan.notes.push(format!(
            "{}: the network, broadcast or hosts' gateway address; not pooled",
            pool.keys.pool(addr)
        ));
    }
    let all = original
        .free
        .iter()
        .map(|(a, i)| (*a, *i, false))
        .chain(original.assigned.iter().map(|(a, i)| (*a, *i, true)));
    for (addr, index, assigned) in all {
        let v2_key = if assigned {
            pool.keys.assigned(addr)
        } else {
            pool.keys.pool(addr)
        };
        if !net.contains(&addr) {
            plan.problems
                .push(format!("{v2_key}: outside the pool's network {net}"));
            continue;
        }
        let v3_holder = v3_assigned.get(&addr);
        if carried(index) && (v3_free.contains(&addr) || v3_holder.is_some()) {
            pool.carried += 1;
            continue;
        }
        match (assigned, v3_free.contains(&addr), v3_holder) {
            (false, false, None) => pool.write_free.push(addr),
            (true, false, None) => pool.write_assigned.push(addr),
            // As v2 has it, or taken in v3 since: either way nobody is handed a held address.
            (false, _, _) => pool.already += 1,
            (true, false, Some(value))
                if Owner::from_json(value).map_or(true, |owner| owner.is_original()) =>
            {
                pool.already += 1
            }
            (true, false, Some(value)) => plan.problems.push(format!(
                "{}: held in etcd v3 by {}, and the original assigned it too ({v2_key}): two \
                 containers may hold it; free one of them, then run migrate-v2 again",
                pool.keys.assigned(addr),
                describe_holder(value)
            )),
            (true, true, _) => plan.problems.push(format!(
                "{}: free in etcd v3, but the original assigned it ({v2_key}); a container may \
                 hold it. If one does, remove the v3 key (etcdctl del {}) and run migrate-v2 again",
                pool.keys.pool(addr),
                pool.keys.pool(addr)
            )),
        }
    }
    Ok(Some(pool))
}

/// The network and broadcast addresses and the hosts' gateway: never in a pool of this tool.
fn never_pooled(addr: Ipv4Addr, net: Ipv4Net, gateway: Option<Ipv4Addr>) -> bool {
    addr == net.network() || addr == net.broadcast() || Some(addr) == gateway
}

/// What a migration wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    pub configs: usize,
    pub free: usize,
    pub assigned: usize,
    /// Found in v3 already when written (a concurrent run, say): left as they were.
    pub already: usize,
}

/// Writes `plan` (which must have no problems): per pool its addresses, then its config, so
/// that no plugin uses a pool before its addresses are in. Then reads every pool back and
/// records the v2 index it brought over.
pub fn apply<K: Kv>(kv: &K, plan: &Plan) -> Result<Written, MigrateError> {
    if !plan.problems.is_empty() {
        return Err(MigrateError::Refused {
            problems: plan.problems.len(),
        });
    }
    let mut written = Written::default();
    let mut raced = Vec::new();
    for pool in &plan.pools {
        let owner = Owner::original(pool.role, &crate::host::now()).to_json();
        let writes: Vec<(Ipv4Addr, String, String)> = pool
            .write_free
            .iter()
            .map(|a| (*a, pool.keys.pool(*a), String::new()))
            .chain(
                pool.write_assigned
                    .iter()
                    .map(|a| (*a, pool.keys.assigned(*a), owner.clone())),
            )
            .collect();
        for batch in writes.chunks(BATCH) {
            let outcome = kv.txn(&guarded_puts(&pool.keys, batch));
            if outcome.map_err(MigrateError::Interrupted)?.succeeded {
                count(&mut written, pool, batch);
                continue;
            }
            // Something of this batch appeared in v3 meanwhile: one by one, and say which.
            for one in batch {
                let single = std::slice::from_ref(one);
                let outcome = kv.txn(&guarded_puts(&pool.keys, single));
                if outcome.map_err(MigrateError::Interrupted)?.succeeded {
                    count(&mut written, pool, single);
                } else if kv
                    .range(&Range::key(&one.1))
                    .map_err(MigrateError::Interrupted)?
                    .is_empty()
                {
                    raced.push(one.1.clone());
                } else {
                    written.already += 1;
                }
            }
        }
        if let Some((key, value)) = &pool.config {
            let txn = Txn {
                compares: vec![Compare::Absent(key.clone())],
                success: vec![Op::put(key, value)],
                failure: vec![Op::Range(Range::key(key))],
            };
            let outcome = kv.txn(&txn).map_err(MigrateError::Interrupted)?;
            match outcome.range(0).first() {
                None => written.configs += 1,
                Some(stored) if stored.value == *value => written.already += 1,
                Some(_) => raced.push(key.clone()),
            }
        }
    }
    if !raced.is_empty() {
        return Err(MigrateError::Raced { keys: raced });
    }
    verify(kv, plan)?;
    if plan.v2_index > plan.previous_index {
        let marker = Marker {
            v2_index: plan.v2_index.to_string(),
            since: crate::host::now(),
        };
        kv.txn(&Txn {
            success: vec![Op::put(&plan.marker_key, json(&marker))],
            ..Txn::default()
        })?;
    }
    Ok(written)
}

fn count(written: &mut Written, pool: &PoolPlan, batch: &[(Ipv4Addr, String, String)]) {
    for (_, key, _) in batch {
        if key.starts_with(&pool.keys.assigned_dir) {
            written.assigned += 1;
        } else {
            written.free += 1;
        }
    }
}

/// Puts each `(address, key, value)` only if v3 holds the address in neither directory.
fn guarded_puts(keys: &PoolKeys, batch: &[(Ipv4Addr, String, String)]) -> Txn {
    Txn {
        compares: batch
            .iter()
            .flat_map(|(a, _, _)| {
                [
                    Compare::Absent(keys.pool(*a)),
                    Compare::Absent(keys.assigned(*a)),
                ]
            })
            .collect(),
        success: batch.iter().map(|(_, k, v)| Op::put(k, v)).collect(),
        failure: vec![],
    }
}

/// Reads each pool back: every address written is there, every assigned one still assigned
/// (a free one may have been taken since), and the config is in.
fn verify<K: Kv>(kv: &K, plan: &Plan) -> Result<(), MigrateError> {
    let mut problems = Vec::new();
    for pool in &plan.pools {
        let free = addrs_of_dir(kv, &pool.keys, &pool.keys.pool_dir)?;
        let assigned = addrs_of_dir(kv, &pool.keys, &pool.keys.assigned_dir)?;
        let lost_free = pool
            .write_free
            .iter()
            .filter(|a| !free.contains(a) && !assigned.contains(a))
            .count();
        let lost_assigned = pool
            .write_assigned
            .iter()
            .filter(|a| !assigned.contains(a))
            .count();
        if lost_free + lost_assigned > 0 {
            problems.push(format!(
                "{}: {lost_free} free and {lost_assigned} assigned address(es) missing",
                pool.label
            ));
        }
        if let Some((key, value)) = &pool.config {
            let stored = kv.range(&Range::key(key))?;
            if stored.first().map(|kv| &kv.value) != Some(value) {
                problems.push(format!("{key} does not hold {value}"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::Unverified { problems })
    }
}

/// Free and assigned addresses of each planned pool in v3 now, for the report.
pub fn counts<K: Kv>(kv: &K, plan: &Plan) -> Result<Vec<(String, usize, usize)>, MigrateError> {
    let mut out = Vec::new();
    for pool in &plan.pools {
        let free = addrs_of_dir(kv, &pool.keys, &pool.keys.pool_dir)?;
        let assigned = addrs_of_dir(kv, &pool.keys, &pool.keys.assigned_dir)?;
        out.push((pool.label.clone(), free.len(), assigned.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::memory::MemKv;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// The original's data in the fixture's shape: hosts .50-.53 (.52 assigned), gateway .1,
    /// containers .100-.105 of 192.0.2.0/24 (.100, .101 assigned).
    fn original() -> Vec<KeyValue> {
        let mut keys = vec![
            (
                "/t/hosts/config",
                r#"{"Subnet":"192.0.2.0/24","Gateway":"192.0.2.1"}"#,
                3,
            ),
            (
                "/t/containers/192.0.2.0/config",
                r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
                9,
            ),
            ("/t/hosts/assigned/192.0.2.52", "", 20),
            ("/t/containers/192.0.2.0/assigned/192.0.2.100", "", 21),
            ("/t/containers/192.0.2.0/assigned/192.0.2.101", "", 22),
            ("/t/unrelated", "x", 2),
        ];
        let free = [
            "/t/hosts/pool/192.0.2.50",
            "/t/hosts/pool/192.0.2.51",
            "/t/hosts/pool/192.0.2.53",
            "/t/containers/192.0.2.0/pool/192.0.2.102",
            "/t/containers/192.0.2.0/pool/192.0.2.103",
            "/t/containers/192.0.2.0/pool/192.0.2.104",
            "/t/containers/192.0.2.0/pool/192.0.2.105",
        ];
        keys.extend(free.iter().map(|k| (*k, "", 5)));
        keys.into_iter()
            .map(|(k, v, i)| KeyValue {
                key: k.into(),
                value: v.into(),
                mod_revision: i,
            })
            .collect()
    }

    #[test]
    fn migrates_configs_free_and_assigned_addresses_once() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let plan = plan(&kv, &l, &original(), 22).unwrap();
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert_eq!(plan.ignored, ["/t/unrelated"]);
        let written = apply(&kv, &plan).unwrap();
        assert_eq!(
            written,
            Written {
                configs: 2,
                free: 7,
                assigned: 3,
                already: 0
            }
        );
        let dump = kv.dump();
        let value = |k: &str| {
            dump.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let held = value("/t/containers/192.0.2.0/assigned/192.0.2.100").unwrap();
        let owner = Owner::from_json(&held).unwrap();
        assert!(owner.is_original() && owner.role == Role::Container);
        let host = Owner::from_json(&value("/t/hosts/assigned/192.0.2.52").unwrap()).unwrap();
        assert!(host.is_original() && host.role == Role::Host);
        assert_eq!(value("/t/containers/192.0.2.0/pool/192.0.2.100"), None);
        assert!(value("/t/migrated-v2")
            .unwrap()
            .contains(r#""V2Index":"22""#));

        // Again: nothing to do, nothing written.
        let again = super::plan(&kv, &l, &original(), 22).unwrap();
        assert!(again.is_empty() && again.problems.is_empty());
        assert_eq!(apply(&kv, &again).unwrap(), Written::default());
        assert_eq!(kv.dump(), dump);
    }

    #[test]
    fn what_the_plugin_did_since_is_not_undone() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        apply(&kv, &plan(&kv, &l, &original(), 22).unwrap()).unwrap();
        // The plugin released .100 and took .102 in v3; the original, still running on some
        // host, then assigned .103 in v2.
        let keys = l.containers(a("192.0.2.0"));
        kv.txn(&Txn {
            success: vec![
                Op::delete(keys.assigned(a("192.0.2.100"))),
                Op::put(keys.pool(a("192.0.2.100")), ""),
                Op::delete(keys.pool(a("192.0.2.102"))),
                Op::put(keys.assigned(a("192.0.2.102")), "{}"),
            ],
            ..Txn::default()
        })
        .unwrap();
        let mut v2 = original();
        v2.retain(|k| !k.key.ends_with("/pool/192.0.2.103"));
        v2.push(KeyValue {
            key: "/t/containers/192.0.2.0/assigned/192.0.2.103".into(),
            value: String::new(),
            mod_revision: 30,
        });
        let later = plan(&kv, &l, &v2, 30).unwrap();
        // .103 is free in v3 and newly assigned in v2: a human must look.
        assert_eq!(later.problems.len(), 1, "{:?}", later.problems);
        assert!(later.problems[0].starts_with("/t/containers/192.0.2.0/pool/192.0.2.103: free"));
        let before = kv.dump();
        assert_eq!(
            apply(&kv, &later),
            Err(MigrateError::Refused { problems: 1 })
        );
        assert_eq!(kv.dump(), before);
        // Once it is out of the v3 pool, the original's assignment comes over; .100 stays free.
        kv.txn(&Txn {
            success: vec![Op::delete(keys.pool(a("192.0.2.103")))],
            ..Txn::default()
        })
        .unwrap();
        let fixed = plan(&kv, &l, &v2, 30).unwrap();
        assert_eq!(fixed.pools.iter().map(|p| p.carried).sum::<usize>(), 9);
        let written = apply(&kv, &fixed).unwrap();
        assert_eq!(written.assigned, 1);
        let dump = kv.dump();
        assert!(dump.iter().any(|(k, _)| k == &keys.pool(a("192.0.2.100"))));
        assert!(dump
            .iter()
            .any(|(k, _)| k == &keys.assigned(a("192.0.2.103"))));
    }

    #[test]
    fn refuses_naming_each_key_where_v3_disagrees() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let keys = l.containers(a("192.0.2.0"));
        // A blind ip-range of the older version: the whole range free, config with another mask.
        let mut ops = vec![Op::put(
            "/t/containers/192.0.2.0/config",
            r#"{"Ipnet":"192.0.2.0","Mask":"25"}"#,
        )];
        for i in 100..=105 {
            ops.push(Op::put(keys.pool(a(&format!("192.0.2.{i}"))), ""));
        }
        kv.txn(&Txn {
            success: ops,
            ..Txn::default()
        })
        .unwrap();
        let before = kv.dump();
        let plan = plan(&kv, &l, &original(), 22).unwrap();
        let named: Vec<&str> = plan
            .problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            named,
            [
                "/t/containers/192.0.2.0/config",
                "/t/containers/192.0.2.0/pool/192.0.2.100",
                "/t/containers/192.0.2.0/pool/192.0.2.101"
            ]
        );
        assert_eq!(
            apply(&kv, &plan),
            Err(MigrateError::Refused { problems: 3 })
        );
        assert_eq!(kv.dump(), before);
    }

    #[test]
    fn unreadable_original_data_is_named_and_odd_data_taken_the_safe_way() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let mut v2 = original();
        v2.push(KeyValue {
            key: "/t/containers/192.0.2.0/pool/192.0.2.100".into(),
            value: String::new(),
            mod_revision: 7,
        });
        v2.push(KeyValue {
            key: "/t/containers/198.51.100.0/pool/198.51.100.7".into(),
            value: String::new(),
            mod_revision: 8,
        });
        let plan = plan(&kv, &l, &v2, 22).unwrap();
        assert_eq!(plan.notes.len(), 1, "{:?}", plan.notes);
        assert_eq!(
            plan.problems,
            [
                "/t/containers/198.51.100.0/config: missing in the original's v2 data, which has \
              addresses for it"
            ]
        );
    }

    fn leaf(key: &str, index: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: String::new(),
            mod_revision: index,
        }
    }

    #[test]
    fn what_this_tool_never_pools_is_not_migrated_as_free() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let mut v2 = original();
        for a in ["192.0.2.0", "192.0.2.1", "192.0.2.255"] {
            v2.push(leaf(&format!("/t/containers/192.0.2.0/pool/{a}"), 6));
        }
        v2.push(leaf("/t/hosts/pool/192.0.2.1", 6));
        let plan = plan(&kv, &l, &v2, 22).unwrap();
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert_eq!(plan.notes.len(), 4, "{:?}", plan.notes);
        apply(&kv, &plan).unwrap();
        let dump = kv.dump();
        for a in ["192.0.2.0", "192.0.2.1", "192.0.2.255"] {
            assert!(
                !dump.iter().any(|(k, _)| k.ends_with(&format!("/pool/{a}"))),
                "{a}"
            );
        }
    }

    #[test]
    fn an_address_in_both_kinds_of_pool_is_refused() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let mut v2 = original();
        v2.push(leaf("/t/hosts/pool/192.0.2.104", 6));
        let plan = plan(&kv, &l, &v2, 22).unwrap();
        assert_eq!(
            plan.problems,
            [
                "/t/containers/192.0.2.0/pool/192.0.2.104: in the original's host pool and in \
              its container pool 192.0.2.0; remove it from one of them in etcd v2 \
              (ETCDCTL_API=2 etcdctl rm KEY)"
            ]
        );
    }

    #[test]
    fn an_address_both_this_tool_and_a_still_running_original_gave_out_is_named() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        apply(&kv, &plan(&kv, &l, &original(), 22).unwrap()).unwrap();
        // The plugin gave .102 to a container; then an original plugin on another host
        // gave it out too, in v2.
        let keys = l.containers(a("192.0.2.0"));
        let ours = Owner::new(
            Role::Container,
            "h1",
            "02:42:00:00:00:01",
            &crate::host::now(),
        );
        kv.txn(&Txn {
            success: vec![
                Op::delete(keys.pool(a("192.0.2.102"))),
                Op::put(keys.assigned(a("192.0.2.102")), ours.to_json()),
            ],
            ..Txn::default()
        })
        .unwrap();
        let mut v2 = original();
        v2.retain(|k| !k.key.ends_with("/pool/192.0.2.102"));
        v2.push(leaf("/t/containers/192.0.2.0/assigned/192.0.2.102", 40));
        let later = plan(&kv, &l, &v2, 40).unwrap();
        assert_eq!(later.problems.len(), 1, "{:?}", later.problems);
        assert!(
            later.problems[0].contains("held in etcd v3 by host h1 (mac 02:42:00:00:00:01)"),
            "{}",
            later.problems[0]
        );
    }

    #[test]
    fn a_network_removed_from_v3_since_is_migrated_again() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        apply(&kv, &plan(&kv, &l, &original(), 22).unwrap()).unwrap();
        let gone: Vec<Op> = kv
            .dump()
            .into_iter()
            .filter(|(k, _)| k.starts_with("/t/containers/"))
            .map(|(k, _)| Op::delete(k))
            .collect();
        kv.txn(&Txn {
            success: gone,
            ..Txn::default()
        })
        .unwrap();
        let again = plan(&kv, &l, &original(), 22).unwrap();
        let written = apply(&kv, &again).unwrap();
        assert_eq!((written.configs, written.free, written.assigned), (1, 4, 2));
    }

    #[test]
    fn large_pools_go_in_transactions_within_etcds_limit() {
        let kv = MemKv::new();
        let l = Layout::new("/t");
        let mut v2 = vec![KeyValue {
            key: "/t/containers/198.18.0.0/config".into(),
            value: r#"{"Ipnet":"198.18.0.0","Mask":"16"}"#.into(),
            mod_revision: 1,
        }];
        for i in 0..1000u32 {
            let addr = Ipv4Addr::from(u32::from(a("198.18.1.0")) + i);
            v2.push(KeyValue {
                key: format!("/t/containers/198.18.0.0/pool/{addr}"),
                value: String::new(),
                mod_revision: 2,
            });
        }
        let plan = plan(&kv, &l, &v2, 2).unwrap();
        kv.calls.set(0);
        let written = apply(&kv, &plan).unwrap();
        assert_eq!(written.free, 1000);
        // 16 batches, the config, the read-back (2 ranges + config) and the marker.
        assert!(kv.calls.get() <= 21, "{} calls", kv.calls.get());
    }
}
