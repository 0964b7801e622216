//! `create-network`: take this host's address, create the Docker network, write the CentOS
//! bridge config, apply it; each step undone again if a later one fails. The host itself
//! (Docker, `ip`, `systemctl`, the ifcfg directory, the clock) is reached only through
//! [`HostSystem`], the pools only through the allocator and `pools`.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use crate::alloc::{AllocError, Allocator, Record};
use crate::cli::NetworkFlags;
use crate::docker::{self, NetworkSpec};
use crate::exec::RunError;
use crate::hostnet::Service;
use crate::ifcfg;
use crate::kv::{KeyValue, Kv, StoreError};
use crate::layout::{describe_holder, HostIdentity, HostMatch, Layout, Owner, PoolKeys, Role};
use crate::pools::{self, ContainerNetwork, HostsNetwork};
use crate::system::HostSystem;

/// Why create-network stopped.
#[derive(Debug)]
pub enum NetworkError {
    /// No `host-range` has been run: no subnet and gateway to use.
    NoHostPool,
    /// No `ip-range` has defined the container pool of the hosts' subnet, which the Docker
    /// network uses: Docker's RequestPool would be refused.
    NoContainerPool(Ipv4Net),
    /// The stored hosts config is not what this tool writes.
    BadHostsConfig(String),
    /// This host already holds a different address.
    HoldsAnother {
        held: Ipv4Addr,
        asked: Ipv4Addr,
    },
    /// Docker could not be asked whether network `name` exists (no `docker`, no daemon).
    DockerUnreachable {
        name: String,
        error: RunError,
    },
    /// `ip` could not tell the addresses `bridge` carries.
    BridgeUnreadable {
        bridge: String,
        error: RunError,
    },
    /// The Docker network exists with a gateway other than this host's address.
    NetworkDiffers {
        name: String,
        detail: String,
    },
    /// A file exists with other content and `--force` was not given.
    FileDiffers(PathBuf),
    /// A file to change could not be read.
    Unreadable {
        path: PathBuf,
        error: io::Error,
    },
    /// The ifcfg directory does not exist.
    NoIfcfgDir(PathBuf),
    /// The interface to enslave could not be found.
    NoInterface(String),
    /// A step failed; `undone` lists what was rolled back (and what could not be).
    Step {
        step: String,
        error: String,
        undone: Vec<String>,
    },
    Alloc(AllocError),
    Store(StoreError),
}

impl fmt::Display for NetworkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkError::NoContainerPool(subnet) => write!(
                f,
                "no container pool {subnet} in etcd: define one with 'oam-docker-ipam ip-range' \
                 in the hosts' subnet"
            ),
            NetworkError::NoHostPool => {
                write!(
                    f,
                    "no host pool in etcd: define one with 'oam-docker-ipam host-range'"
                )
            }
            NetworkError::BadHostsConfig(v) => write!(f, "the hosts config holds {v:?}"),
            NetworkError::HoldsAnother { held, asked } => write!(
                f,
                "this host already holds {held}, not {asked}; release-host it first to change"
            ),
            NetworkError::DockerUnreachable { name, error } => {
                write!(f, "cannot ask Docker about network {name}: {error}")
            }
            NetworkError::BridgeUnreadable { bridge, error } => {
                write!(f, "cannot read the addresses of {bridge}: {error}")
            }
            NetworkError::NetworkDiffers { name, detail } => write!(
                f,
                "Docker network {name} exists with {detail}; remove it \
                 (docker network rm {name}) or choose another --name"
            ),
            NetworkError::FileDiffers(p) => write!(
                f,
                "{} exists with other content; use --force to replace it (a backup is kept)",
                p.display()
            ),
            NetworkError::Unreadable { path, error } => {
                write!(f, "cannot read {}: {error}", path.display())
            }
            NetworkError::NoIfcfgDir(p) => write!(f, "{} is not a directory", p.display()),
            NetworkError::NoInterface(why) => {
                write!(
                    f,
                    "cannot find the interface to enslave ({why}); use --interface"
                )
            }
            NetworkError::Step {
                step,
                error,
                undone,
            } => {
                write!(f, "{step} failed: {error}")?;
                if undone.is_empty() {
                    write!(f, "; nothing to undo")
                } else {
                    write!(f, "; undone: {}", undone.join(", "))
                }
            }
            NetworkError::Alloc(e) => write!(f, "{e}"),
            NetworkError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for NetworkError {}

impl From<StoreError> for NetworkError {
    fn from(e: StoreError) -> NetworkError {
        NetworkError::Store(e)
    }
}

impl From<AllocError> for NetworkError {
    fn from(e: AllocError) -> NetworkError {
        NetworkError::Alloc(e)
    }
}

/// One thing done that can be undone.
enum Done {
    TookAddress(Ipv4Addr),
    /// Took over the original's record of `addr`; `previous` is its value, `ours` what
    /// replaced it.
    Adopted {
        addr: Ipv4Addr,
        previous: String,
        ours: String,
    },
    CreatedNetwork(String),
    /// Wrote the file `name` of the ifcfg directory; `backup` is the name of the copy of
    /// what it held, if it existed.
    WroteFile {
        name: String,
        backup: Option<String>,
    },
    StoppedNetworkManager,
    DisabledNetworkManager,
}

/// What create-network will do, worked out before anything changes.
struct Plan {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    /// The host address this host holds already, if any.
    held: Option<Ipv4Addr>,
    /// The host address to take if none is held: the one asked for or the existing network's.
    wanted: Option<Ipv4Addr>,
    /// The original tool's record (migrated from etcd v2) of `wanted`, which this host's
    /// bridge carries: the address is this host's, so its record is taken over.
    adopt: Option<KeyValue>,
    interface: String,
    /// The bridge's and the interface's file names in the ifcfg directory, and what each
    /// holds now.
    bridge_file: String,
    bridge_now: Option<String>,
    iface_file: String,
    iface_now: Option<String>,
    network_exists: bool,
    /// Whether NetworkManager is to be stopped (it runs) and disabled (it is enabled): only
    /// what is changed is undone.
    stop_network_manager: bool,
    disable_network_manager: bool,
}

/// Reads etcd and the host and checks the flags; refuses before anything changes.
fn plan<K: Kv, S: HostSystem>(
    alloc: &Allocator<K>,
    layout: &Layout,
    flags: &NetworkFlags,
    me: &HostIdentity,
    sys: &S,
) -> Result<Plan, NetworkError> {
    let hosts = layout.hosts();
    let (subnet, gateway) = match pools::hosts_network(alloc.kv(), layout)? {
        HostsNetwork::Defined { subnet, gateway } => (subnet, gateway),
        HostsNetwork::Unusable(value) => return Err(NetworkError::BadHostsConfig(value)),
        HostsNetwork::Undefined => return Err(NetworkError::NoHostPool),
    };
    match pools::container_network(alloc.kv(), layout, subnet.network())? {
        ContainerNetwork::Defined(net) if net == subnet => {}
        _ => return Err(NetworkError::NoContainerPool(subnet)),
    }
    let held = held_by(alloc, &hosts, me)?;
    if let (Some(held), Some(asked)) = (held, flags.ip) {
        if held != asked {
            return Err(NetworkError::HoldsAnother { held, asked });
        }
    }
    if !sys.is_dir(&flags.ifcfg_dir) {
        return Err(NetworkError::NoIfcfgDir(flags.ifcfg_dir.clone()));
    }
    let interface = match &flags.interface {
        Some(i) => i.clone(),
        None => sys
            .route_interface(gateway)
            .map_err(|e| NetworkError::NoInterface(e.to_string()))?,
    };
    // An existing network keeps its gateway: this host's address must be that one.
    let existing_gateway =
        sys.docker_network(&flags.name)
            .map_err(|error| NetworkError::DockerUnreachable {
                name: flags.name.clone(),
                error,
            })?;
    let bridge_addrs = || {
        sys.bridge_addrs(&flags.bridge)
            .map_err(|error| NetworkError::BridgeUnreadable {
                bridge: flags.bridge.clone(),
                error,
            })
    };
    let differs = |detail: String| NetworkError::NetworkDiffers {
        name: flags.name.clone(),
        detail,
    };
    let wanted = match existing_gateway {
        Some(Some(gw)) => match held.or(flags.ip) {
            Some(addr) if addr != gw => {
                return Err(differs(format!(
                    "gateway {gw}, not this host's address {addr}"
                )))
            }
            _ => Some(gw),
        },
        Some(None) => return Err(differs("no IPv4 gateway".into())),
        None => flags.ip,
    };
    let (wanted, adopt) = match (held, wanted) {
        (None, Some(addr)) => {
            let record = match original_record(alloc, &hosts, addr)? {
                Some(record) if bridge_addrs()?.contains(&addr) => Some(record),
                _ => None,
            };
            (Some(addr), record)
        }
        // Without --ip, an address the original gave this host is still on its bridge.
        (None, None) => {
            let mut found = (None, None);
            for addr in bridge_addrs()? {
                if let Some(record) = original_record(alloc, &hosts, addr)? {
                    found = (Some(addr), Some(record));
                    break;
                }
            }
            found
        }
        (held, wanted) => (held.or(wanted), None),
    };
    // The address to take must be free now: a dry run says what the real run would, and
    // the real run refuses before it changes anything.
    if let (None, Some(addr), None) = (held, wanted, &adopt) {
        match alloc.record(&hosts, addr)? {
            Record::Free => {}
            Record::Held(record) => {
                return Err(NetworkError::Alloc(AllocError::InUse {
                    addr,
                    holder: describe_holder(&record.value),
                }))
            }
            Record::NotInPool => {
                return Err(NetworkError::Alloc(AllocError::NotInPool {
                    addr,
                    net: subnet,
                }))
            }
        }
    }
    let read = |name: &str| {
        sys.read_file(&flags.ifcfg_dir, name)
            .map_err(|error| NetworkError::Unreadable {
                path: flags.ifcfg_dir.join(name),
                error,
            })
    };
    let bridge_file = format!("ifcfg-{}", flags.bridge);
    let bridge_now = read(&bridge_file)?;
    // Refused here, before the host address is taken. An address still to be picked could
    // be any, so an existing file then counts as different.
    if let Some(now) = &bridge_now {
        let ours = held
            .or(wanted)
            .map(|addr| ifcfg::bridge_text(&flags.bridge, addr, gateway, subnet, flags.mtu));
        if ours.as_ref() != Some(now) && !flags.force {
            return Err(NetworkError::FileDiffers(
                flags.ifcfg_dir.join(&bridge_file),
            ));
        }
    }
    let iface_file = format!("ifcfg-{interface}");
    let iface_now = read(&iface_file)?;
    let restart = !flags.no_restart;
    Ok(Plan {
        subnet,
        gateway,
        held,
        wanted,
        bridge_file,
        bridge_now,
        iface_file,
        iface_now,
        interface,
        network_exists: existing_gateway.is_some(),
        adopt,
        stop_network_manager: restart && sys.network_manager_active(),
        disable_network_manager: restart && sys.network_manager_enabled(),
    })
}

/// The Docker network create-network makes.
fn spec(plan: &Plan, flags: &NetworkFlags) -> NetworkSpec {
    NetworkSpec {
        name: flags.name.clone(),
        bridge: flags.bridge.clone(),
        mtu: flags.mtu,
        subnet: plan.subnet,
        router: plan.gateway,
    }
}

fn print_dry_run(plan: &Plan, flags: &NetworkFlags, me: &HostIdentity) {
    let host = &me.name;
    match (plan.held, plan.wanted) {
        (Some(a), _) => println!("would keep {a}, which this host holds"),
        (None, Some(a)) if plan.adopt.is_some() => println!(
            "would adopt {a}: the original tool assigned it and {} carries it",
            flags.bridge
        ),
        (None, Some(a)) => println!("would take {a} from the host pool as {host}"),
        (None, None) => println!("would take a free address from the host pool as {host}"),
    }
    if plan.network_exists {
        println!("would keep the existing Docker network {}", flags.name);
    } else {
        let args = docker::create_args(&spec(plan, flags), "<host address>");
        println!("would run: docker {}", args.join(" "));
    }
    let bridge_path = flags.ifcfg_dir.join(&plan.bridge_file);
    let ours = plan
        .held
        .or(plan.wanted)
        .map(|addr| ifcfg::bridge_text(&flags.bridge, addr, plan.gateway, plan.subnet, flags.mtu));
    match &plan.bridge_now {
        Some(now) if Some(now) == ours.as_ref() => {
            println!("{} is up to date", bridge_path.display())
        }
        Some(_) => println!(
            "would replace {} (bridge {} with the host address), keeping a backup",
            bridge_path.display(),
            flags.bridge
        ),
        None => println!(
            "would write {} (bridge {} with the host address)",
            bridge_path.display(),
            flags.bridge
        ),
    }
    let iface_path = flags.ifcfg_dir.join(&plan.iface_file);
    let iface_text =
        ifcfg::enslaved_text(plan.iface_now.as_deref(), &plan.interface, &flags.bridge);
    if plan.iface_now.as_ref() == Some(&iface_text) {
        println!("{} is up to date", iface_path.display());
    } else {
        println!(
            "would add BRIDGE={} to {}",
            flags.bridge,
            iface_path.display()
        );
    }
    if !flags.no_restart {
        let mut commands = Vec::new();
        if plan.stop_network_manager {
            commands.push("systemctl stop NetworkManager");
        }
        if plan.disable_network_manager {
            commands.push("systemctl disable NetworkManager");
        }
        commands.push("systemctl restart network");
        println!("would run: {}", commands.join("; "));
    }
}

/// Runs create-network on `sys` with the pools in `kv`; prints each step on stdout.
pub fn create<K: Kv, S: HostSystem>(
    kv: K,
    layout: &Layout,
    flags: &NetworkFlags,
    me: &HostIdentity,
    sys: &mut S,
) -> Result<(), NetworkError> {
    let mut alloc = Allocator::new(kv);
    let plan = plan(&alloc, layout, flags, me, sys)?;
    if flags.dry_run {
        print_dry_run(&plan, flags, me);
        return Ok(());
    }
    let hosts = layout.hosts();
    let mut done = Vec::new();
    match apply(&plan, flags, me, &mut alloc, &hosts, sys, &mut done) {
        Ok(()) => Ok(()),
        Err((step, error)) => {
            let undone = undo(&mut alloc, &hosts, sys, &flags.ifcfg_dir, done);
            Err(NetworkError::Step {
                step,
                error,
                undone,
            })
        }
    }
}

/// Does the plan, recording in `done` each step that a later failure must undo.
fn apply<K: Kv, S: HostSystem>(
    plan: &Plan,
    flags: &NetworkFlags,
    me: &HostIdentity,
    alloc: &mut Allocator<K>,
    hosts: &PoolKeys,
    sys: &mut S,
    done: &mut Vec<Done>,
) -> Result<(), (String, String)> {
    let now = sys.now();
    let addr = match plan.held {
        Some(addr) => {
            println!("this host already holds {addr}");
            addr
        }
        None => {
            let owner = me.owner(Role::Host, "", &now);
            if let (Some(record), Some(addr)) = (&plan.adopt, plan.wanted) {
                let ours = owner.to_json();
                let adopted = alloc
                    .replace_owner(hosts, addr, record.mod_revision, &ours)
                    .map_err(|e| step("adopting the host address", e))?;
                if !adopted {
                    let why = format!("the record of {addr} changed since it was read");
                    return Err(step("adopting the host address", why));
                }
                done.push(Done::Adopted {
                    addr,
                    previous: record.value.clone(),
                    ours,
                });
                println!(
                    "adopted {addr}: the original tool assigned it and {} carries it",
                    flags.bridge
                );
                addr
            } else {
                let addr = match plan.wanted {
                    Some(addr) => {
                        alloc
                            .take(hosts, plan.subnet, addr, &owner)
                            .map_err(|e| step("taking the host address", e))?;
                        addr
                    }
                    None => alloc
                        .take_any(hosts, plan.subnet, &owner)
                        .map_err(|e| step("taking a host address", e))?,
                };
                done.push(Done::TookAddress(addr));
                println!("took host address {addr}");
                addr
            }
        }
    };

    let dir = &flags.ifcfg_dir;
    let bridge_text = ifcfg::bridge_text(&flags.bridge, addr, plan.gateway, plan.subnet, flags.mtu);
    let iface_text =
        ifcfg::enslaved_text(plan.iface_now.as_deref(), &plan.interface, &flags.bridge);

    if plan.network_exists {
        println!("Docker network {} exists already", flags.name);
    } else {
        sys.create_docker_network(&spec(plan, flags), addr)
            .map_err(|e| step("docker network create", e))?;
        done.push(Done::CreatedNetwork(flags.name.clone()));
        println!("created Docker network {}", flags.name);
    }

    for (name, text, existing) in [
        (&plan.bridge_file, &bridge_text, &plan.bridge_now),
        (&plan.iface_file, &iface_text, &plan.iface_now),
    ] {
        let path = dir.join(name);
        if existing.as_deref() == Some(text.as_str()) {
            println!("{} is up to date", path.display());
            continue;
        }
        let backup = sys
            .write_file(dir, name, text, &now)
            .map_err(|e| step(&format!("writing {}", path.display()), e))?;
        match &backup {
            Some(b) => println!(
                "wrote {} (the original is kept as {})",
                path.display(),
                dir.join(b).display()
            ),
            None => println!("wrote {}", path.display()),
        }
        done.push(Done::WroteFile {
            name: name.clone(),
            backup,
        });
    }

    if !flags.no_restart {
        if plan.stop_network_manager {
            sys.service(Service::StopNetworkManager)
                .map_err(|e| step("stopping NetworkManager", e))?;
            done.push(Done::StoppedNetworkManager);
            println!("stopped NetworkManager");
        }
        if plan.disable_network_manager {
            sys.service(Service::DisableNetworkManager)
                .map_err(|e| step("disabling NetworkManager", e))?;
            done.push(Done::DisabledNetworkManager);
            println!("disabled NetworkManager");
        }
        sys.service(Service::RestartNetwork)
            .map_err(|e| step("restarting the network service", e))?;
        println!("restarted the network service");
    }
    Ok(())
}

fn step(name: &str, error: impl fmt::Display) -> (String, String) {
    (name.to_string(), error.to_string())
}

/// Undoes `done` in reverse order; says what was undone and what could not be.
fn undo<K: Kv, S: HostSystem>(
    alloc: &mut Allocator<K>,
    hosts: &PoolKeys,
    sys: &mut S,
    dir: &Path,
    done: Vec<Done>,
) -> Vec<String> {
    let mut said = Vec::new();
    for action in done.into_iter().rev() {
        let (what, result) = match action {
            Done::StoppedNetworkManager => (
                "started NetworkManager again".to_string(),
                sys.service(Service::StartNetworkManager)
                    .map_err(|e| e.to_string()),
            ),
            Done::DisabledNetworkManager => (
                "enabled NetworkManager again".to_string(),
                sys.service(Service::EnableNetworkManager)
                    .map_err(|e| e.to_string()),
            ),
            Done::WroteFile { name, backup } => (
                match backup {
                    Some(_) => format!("restored {}", dir.join(&name).display()),
                    None => format!("removed {}", dir.join(&name).display()),
                },
                sys.restore_file(dir, &name, backup.as_deref())
                    .map_err(|e| e.to_string()),
            ),
            Done::CreatedNetwork(name) => (
                format!("removed Docker network {name}"),
                sys.remove_docker_network(&name).map_err(|e| e.to_string()),
            ),
            Done::Adopted {
                addr,
                previous,
                ours,
            } => (
                format!("gave {addr} back to the original's record"),
                give_back(alloc, hosts, addr, &ours, &previous),
            ),
            Done::TookAddress(addr) => (
                format!("released host address {addr}"),
                alloc
                    .release_any(hosts, addr)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            ),
        };
        match result {
            Ok(()) => said.push(what),
            Err(e) => said.push(format!("NOT {what} ({e})")),
        }
    }
    said
}

/// Puts `previous` back as the record of `addr` if the record is still `ours`.
fn give_back<K: Kv>(
    alloc: &mut Allocator<K>,
    hosts: &PoolKeys,
    addr: Ipv4Addr,
    ours: &str,
    previous: &str,
) -> Result<(), String> {
    match alloc.record(hosts, addr).map_err(|e| e.to_string())? {
        Record::Held(kv) if kv.value == ours => {
            match alloc.replace_owner(hosts, addr, kv.mod_revision, previous) {
                Ok(true) => Ok(()),
                Ok(false) => Err("its record changed meanwhile".into()),
                Err(e) => Err(e.to_string()),
            }
        }
        _ => Err("its record changed meanwhile".into()),
    }
}

/// The original tool's record (migrated from etcd v2) of host address `addr`, if that is
/// what holds it.
fn original_record<K: Kv>(
    alloc: &Allocator<K>,
    hosts: &PoolKeys,
    addr: Ipv4Addr,
) -> Result<Option<KeyValue>, NetworkError> {
    Ok(match alloc.record(hosts, addr)? {
        Record::Held(kv) if Owner::from_json(&kv.value).is_some_and(|o| o.is_original()) => {
            Some(kv)
        }
        _ => None,
    })
}

/// The host address this host already holds, if any.
fn held_by<K: Kv>(
    alloc: &Allocator<K>,
    hosts: &PoolKeys,
    host: &HostIdentity,
) -> Result<Option<Ipv4Addr>, NetworkError> {
    let held = alloc.held(hosts)?;
    Ok(held.into_iter().find_map(|(addr, kv)| {
        let owner = Owner::from_json(&kv.value)?;
        (owner.role == Role::Host && host.is_holder(&owner)).then_some(addr)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::fs;

    use crate::addr::AddrRange;
    use crate::exec::RunError;
    use crate::hostnet::RouteError;
    use crate::kv::memory::{Fault, MemKv};
    use crate::kv::{Op, Range, Txn};

    const NOW: &str = "2026-11-22T00:00:00.000000000Z";

    /// A host in memory, but for its ifcfg directory: a scratch directory written through
    /// `ifcfg`, so that trees are compared. Every call is recorded; the changing calls are
    /// numbered from 0, and those in `fail` fail without changing anything.
    #[derive(Default)]
    struct FakeHost {
        /// Docker networks: name and gateway.
        networks: BTreeMap<String, Option<Ipv4Addr>>,
        bridge_addrs: Vec<Ipv4Addr>,
        /// The device of the route to the hosts' gateway; None: `ip` finds none.
        route: Option<String>,
        nm_active: bool,
        nm_enabled: bool,
        restarts: u32,
        calls: RefCell<Vec<String>>,
        changes: usize,
        fail: BTreeSet<usize>,
        /// Docker cannot be asked; `ip` cannot tell addresses.
        docker_down: bool,
        ip_down: bool,
    }

    /// Everything a `FakeHost` holds that create-network may change.
    type HostState = (
        BTreeMap<String, Option<Ipv4Addr>>,
        bool,
        bool,
        u32,
        Vec<(String, String)>,
    );

    impl FakeHost {
        fn look(&self, call: String) {
            self.calls.borrow_mut().push(call);
        }

        /// Records a changing call; whether it is to fail.
        fn change(&mut self, call: String) -> bool {
            self.calls.borrow_mut().push(call);
            self.changes += 1;
            self.fail.contains(&(self.changes - 1))
        }

        fn refused() -> RunError {
            RunError::Spawn {
                program: "fake".into(),
                error: io::Error::other("injected failure"),
            }
        }

        fn state(&self, dir: &Path) -> HostState {
            (
                self.networks.clone(),
                self.nm_active,
                self.nm_enabled,
                self.restarts,
                tree(dir),
            )
        }
    }

    impl HostSystem for FakeHost {
        fn docker_network(&self, name: &str) -> Result<Option<Option<Ipv4Addr>>, RunError> {
            self.look(format!("docker network inspect {name}"));
            if self.docker_down {
                return Err(FakeHost::refused());
            }
            Ok(self.networks.get(name).copied())
        }

        fn create_docker_network(
            &mut self,
            spec: &NetworkSpec,
            gateway: Ipv4Addr,
        ) -> Result<(), RunError> {
            if self.change(format!("docker network create {} {gateway}", spec.name)) {
                return Err(FakeHost::refused());
            }
            self.networks.insert(spec.name.clone(), Some(gateway));
            Ok(())
        }

        fn remove_docker_network(&mut self, name: &str) -> Result<(), RunError> {
            if self.change(format!("docker network rm {name}")) {
                return Err(FakeHost::refused());
            }
            self.networks.remove(name);
            Ok(())
        }

        fn bridge_addrs(&self, bridge: &str) -> Result<Vec<Ipv4Addr>, RunError> {
            self.look(format!("ip addr show {bridge}"));
            if self.ip_down {
                return Err(FakeHost::refused());
            }
            Ok(self.bridge_addrs.clone())
        }

        fn route_interface(&self, gateway: Ipv4Addr) -> Result<String, RouteError> {
            self.look(format!("ip route get {gateway}"));
            self.route
                .clone()
                .ok_or_else(|| RouteError::NoDevice("unreachable".into()))
        }

        fn network_manager_active(&self) -> bool {
            self.look("systemctl is-active NetworkManager".into());
            self.nm_active
        }

        fn network_manager_enabled(&self) -> bool {
            self.look("systemctl is-enabled NetworkManager".into());
            self.nm_enabled
        }

        fn service(&mut self, change: Service) -> Result<(), RunError> {
            if self.change(format!("{change:?}")) {
                return Err(FakeHost::refused());
            }
            match change {
                Service::StopNetworkManager => self.nm_active = false,
                Service::StartNetworkManager => self.nm_active = true,
                Service::DisableNetworkManager => self.nm_enabled = false,
                Service::EnableNetworkManager => self.nm_enabled = true,
                Service::RestartNetwork => self.restarts += 1,
            }
            Ok(())
        }

        fn is_dir(&self, dir: &Path) -> bool {
            self.look(format!("is-dir {}", dir.display()));
            ifcfg::is_dir(dir)
        }

        fn read_file(&self, dir: &Path, name: &str) -> io::Result<Option<String>> {
            self.look(format!("read {name}"));
            ifcfg::read(dir, name)
        }

        fn write_file(
            &mut self,
            dir: &Path,
            name: &str,
            text: &str,
            now: &str,
        ) -> io::Result<Option<String>> {
            if self.change(format!("write {name}")) {
                return Err(io::Error::other("injected failure"));
            }
            ifcfg::write(dir, name, text, now)
        }

        fn restore_file(&mut self, dir: &Path, name: &str, backup: Option<&str>) -> io::Result<()> {
            if self.change(format!("restore {name}")) {
                return Err(io::Error::other("injected failure"));
            }
            ifcfg::restore(dir, name, backup)
        }

        fn now(&self) -> String {
            NOW.into()
        }
    }

    /// Each file of `dir` and its text, by name.
    fn tree(dir: &Path) -> Vec<(String, String)> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<(String, String)> = entries
            .map(|e| {
                let e = e.unwrap();
                let text = fs::read_to_string(e.path()).unwrap_or_else(|_| "<unreadable>".into());
                (e.file_name().into_string().unwrap(), text)
            })
            .collect();
        files.sort();
        files
    }

    /// A host h1 whose hosts' subnet 192.0.2.0/24 (router .1) pools hosts .10-.12 and
    /// containers .100-.110; NetworkManager runs and is enabled, the route to the router goes
    /// by eth1, and its ifcfg directory is empty.
    struct World {
        kv: MemKv,
        layout: Layout,
        host: FakeHost,
        me: HostIdentity,
        flags: NetworkFlags,
    }

    /// Changes a fresh world into the one a test needs.
    type Setup = fn(&mut World);

    /// Whether an error is the refusal expected.
    type Refused = fn(&NetworkError) -> bool;

    const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn addr(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, last)
    }

    impl World {
        fn new(test: &str) -> World {
            let world = World::bare(test);
            let hosts = AddrRange::parse("192.0.2.10/24", "192.0.2.12/24").unwrap();
            pools::add_host_range(&world.kv, &world.layout, hosts, ROUTER, &mut |_, _| {}).unwrap();
            let containers = AddrRange::parse("192.0.2.100/24", "192.0.2.110/24").unwrap();
            pools::add_container_range(&world.kv, &world.layout, containers, &mut |_, _| {})
                .unwrap();
            world
        }

        /// No pools defined.
        fn bare(test: &str) -> World {
            let dir =
                std::env::temp_dir().join(format!("oam-network-{test}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            World {
                kv: MemKv::new(),
                layout: Layout::new("/talkingdata"),
                host: FakeHost {
                    route: Some("eth1".into()),
                    nm_active: true,
                    nm_enabled: true,
                    ..FakeHost::default()
                },
                me: HostIdentity::new("h1", "id-h1"),
                flags: NetworkFlags {
                    ip: None,
                    name: "mynet".into(),
                    bridge: "br0".into(),
                    mtu: 1500,
                    interface: None,
                    ifcfg_dir: dir,
                    force: false,
                    no_restart: false,
                    dry_run: false,
                },
            }
        }

        fn dir(&self) -> PathBuf {
            self.flags.ifcfg_dir.clone()
        }

        fn file(&self, name: &str, text: &str) {
            fs::write(self.dir().join(name), text).unwrap();
        }

        fn create(&mut self) -> Result<(), NetworkError> {
            let flags = self.flags.clone();
            create(&self.kv, &self.layout, &flags, &self.me, &mut self.host)
        }

        /// Every key, value and revision: any write shows, even one undone.
        fn store(&self) -> Vec<KeyValue> {
            self.kv.range(&Range::prefix("/")).unwrap()
        }

        /// Records `owner` as holding host address `a`, as a taking would.
        fn hold(&self, a: Ipv4Addr, owner: &Owner) {
            let hosts = self.layout.hosts();
            let txn = Txn {
                compares: vec![],
                success: vec![
                    Op::delete(hosts.pool(a)),
                    Op::put(hosts.assigned(a), owner.to_json()),
                ],
                failure: vec![],
            };
            assert!(self.kv.txn(&txn).unwrap().succeeded);
        }

        fn holder(&self, a: Ipv4Addr) -> Option<String> {
            let record = self.kv.range(&Range::key(self.layout.hosts().assigned(a)));
            record.unwrap().into_iter().next().map(|kv| kv.value)
        }
    }

    impl Drop for World {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.flags.ifcfg_dir);
        }
    }

    #[test]
    fn sets_up_a_fresh_host_then_a_rerun_changes_nothing() {
        let mut w = World::new("fresh");
        w.file("ifcfg-eth1", "DEVICE=eth1\nONBOOT=yes\n");
        w.create().unwrap();

        let hosts = w.layout.hosts();
        let alloc = Allocator::new(&w.kv);
        let held = alloc.held(&hosts).unwrap();
        assert_eq!(held.len(), 1, "{held:?}");
        let (a, record) = &held[0];
        assert_eq!(record.value, w.me.owner(Role::Host, "", NOW).to_json());
        assert_eq!(w.host.networks.get("mynet"), Some(&Some(*a)));
        let files = tree(&w.dir());
        let bridge = ifcfg::bridge_text("br0", *a, ROUTER, "192.0.2.0/24".parse().unwrap(), 1500);
        assert_eq!(files[0], ("ifcfg-br0".into(), bridge));
        assert_eq!(
            files[1],
            (
                "ifcfg-eth1".into(),
                "DEVICE=eth1\nONBOOT=yes\nBRIDGE=br0\n".into()
            )
        );
        // The backup is dated by the host's clock, which the fake sets.
        assert_eq!(
            files[2],
            (
                "ifcfg-eth1.20261122T000000.bak".into(),
                "DEVICE=eth1\nONBOOT=yes\n".into()
            )
        );
        assert_eq!(files.len(), 3);
        assert_eq!(
            (w.host.nm_active, w.host.nm_enabled, w.host.restarts),
            (false, false, 1)
        );
        assert_eq!(
            w.host.calls.borrow()[w.host.calls.borrow().len() - 6..],
            [
                format!("docker network create mynet {a}"),
                "write ifcfg-br0".into(),
                "write ifcfg-eth1".into(),
                "StopNetworkManager".into(),
                "DisableNetworkManager".into(),
                "RestartNetwork".into(),
            ]
        );

        // The same again keeps the address, the network and the files.
        let (store, host) = (w.store(), w.host.state(&w.dir()));
        let changes = w.host.changes;
        w.create().unwrap();
        assert_eq!(w.store(), store);
        let (networks, _, _, restarts, files) = w.host.state(&w.dir());
        assert_eq!((networks, restarts - 1, files), (host.0, host.3, host.4));
        assert_eq!(
            w.host.changes,
            changes + 1,
            "only the network service restarts"
        );
    }

    #[test]
    fn a_dry_run_changes_nothing() {
        let mut w = World::new("dry");
        w.flags.dry_run = true;
        w.flags.ip = Some(addr(11));
        let (store, host) = (w.store(), w.host.state(&w.dir()));
        w.create().unwrap();
        assert_eq!(w.host.changes, 0);
        assert_eq!(w.store(), store);
        assert_eq!(w.host.state(&w.dir()), host);
    }

    /// Each refusal, as a change to a fresh world, and what it is refused with.
    fn refusals() -> Vec<(&'static str, Setup, Refused)> {
        vec![
            (
                "no host pool",
                |w| *w = World::bare("refused-bare"),
                |e| matches!(e, NetworkError::NoHostPool),
            ),
            (
                "a hosts config this tool does not write",
                |w| {
                    let put = Txn {
                        success: vec![Op::put(w.layout.hosts_config(), "nonsense")],
                        ..Txn::default()
                    };
                    w.kv.txn(&put).unwrap();
                },
                |e| matches!(e, NetworkError::BadHostsConfig(v) if v == "nonsense"),
            ),
            (
                "no container pool",
                |w| {
                    let config = w.layout.container_config(addr(0));
                    let delete = Txn {
                        success: vec![Op::delete(config)],
                        ..Txn::default()
                    };
                    w.kv.txn(&delete).unwrap();
                },
                |e| matches!(e, NetworkError::NoContainerPool(_)),
            ),
            (
                "this host holds another address",
                |w| {
                    w.hold(addr(10), &w.me.owner(Role::Host, "", NOW));
                    w.flags.ip = Some(addr(11));
                },
                |e| matches!(e, NetworkError::HoldsAnother { held, asked } if *held == addr(10) && *asked == addr(11)),
            ),
            (
                "no ifcfg directory",
                |w| w.flags.ifcfg_dir = w.dir().join("missing"),
                |e| matches!(e, NetworkError::NoIfcfgDir(_)),
            ),
            (
                "no route to the router",
                |w| w.host.route = None,
                |e| matches!(e, NetworkError::NoInterface(_)),
            ),
            (
                "Docker cannot be asked",
                |w| w.host.docker_down = true,
                |e| matches!(e, NetworkError::DockerUnreachable { name, .. } if name == "mynet"),
            ),
            (
                "ip cannot tell the bridge's addresses",
                |w| w.host.ip_down = true,
                |e| matches!(e, NetworkError::BridgeUnreadable { bridge, .. } if bridge == "br0"),
            ),
            (
                "ip cannot tell the addresses of a bridge an original record may be on",
                |w| {
                    w.hold(addr(11), &Owner::original(Role::Host, NOW));
                    w.flags.ip = Some(addr(11));
                    w.host.ip_down = true;
                },
                |e| matches!(e, NetworkError::BridgeUnreadable { .. }),
            ),
            (
                "the network's gateway is another address",
                |w| {
                    w.host.networks.insert("mynet".into(), Some(addr(12)));
                    w.flags.ip = Some(addr(11));
                },
                |e| matches!(e, NetworkError::NetworkDiffers { detail, .. } if detail.contains("gateway 192.0.2.12")),
            ),
            (
                "the network has no IPv4 gateway",
                |w| {
                    w.host.networks.insert("mynet".into(), None);
                },
                |e| matches!(e, NetworkError::NetworkDiffers { detail, .. } if detail == "no IPv4 gateway"),
            ),
            (
                "the address is another host's",
                |w| {
                    w.hold(
                        addr(11),
                        &HostIdentity::new("h2", "id-h2").owner(Role::Host, "", NOW),
                    );
                    w.flags.ip = Some(addr(11));
                },
                |e| matches!(e, NetworkError::Alloc(AllocError::InUse { .. })),
            ),
            (
                "the address is not in the pool",
                |w| w.flags.ip = Some("198.51.100.7".parse().unwrap()),
                |e| matches!(e, NetworkError::Alloc(AllocError::NotInPool { .. })),
            ),
            (
                "a different ifcfg-br0, the address given",
                |w| {
                    w.file("ifcfg-br0", "DEVICE=br0\nIPADDR=203.0.113.9\n");
                    w.flags.ip = Some(addr(11));
                },
                |e| matches!(e, NetworkError::FileDiffers(p) if p.ends_with("ifcfg-br0")),
            ),
            (
                "an ifcfg-br0, the address still to pick",
                |w| {
                    let subnet = "192.0.2.0/24".parse().unwrap();
                    w.file(
                        "ifcfg-br0",
                        &ifcfg::bridge_text("br0", addr(11), ROUTER, subnet, 1500),
                    );
                },
                |e| matches!(e, NetworkError::FileDiffers(_)),
            ),
            (
                "a different ifcfg-br0, the address held",
                |w| {
                    w.hold(addr(10), &w.me.owner(Role::Host, "", NOW));
                    let subnet = "192.0.2.0/24".parse().unwrap();
                    w.file(
                        "ifcfg-br0",
                        &ifcfg::bridge_text("br0", addr(10), ROUTER, subnet, 9000),
                    );
                },
                |e| matches!(e, NetworkError::FileDiffers(_)),
            ),
            (
                "an unreadable ifcfg file",
                |w| fs::create_dir(w.dir().join("ifcfg-eth1")).unwrap(),
                |e| matches!(e, NetworkError::Unreadable { path, .. } if path.ends_with("ifcfg-eth1")),
            ),
        ]
    }

    #[test]
    fn every_refusal_comes_before_the_first_change() {
        for (what, setup, refused) in refusals() {
            for dry_run in [false, true] {
                let mut w = World::new("refused");
                setup(&mut w);
                w.flags.dry_run = dry_run;
                let (store, host) = (w.store(), w.host.state(&w.dir()));
                let e = w.create().unwrap_err();
                assert!(
                    refused(&e),
                    "{what} (dry run {dry_run}): refused with {e:?}"
                );
                assert_eq!(w.host.changes, 0, "{what}: {:?}", w.host.calls.borrow());
                assert_eq!(w.store(), store, "{what}: the store changed");
                assert_eq!(w.host.state(&w.dir()), host, "{what}: the host changed");
            }
        }
    }

    #[test]
    fn adopts_the_address_the_original_gave_this_host() {
        let mut w = World::new("adopt");
        w.hold(addr(11), &Owner::original(Role::Host, NOW));
        w.host.bridge_addrs = vec![addr(11)];
        w.create().unwrap();
        let ours = w.me.owner(Role::Host, "", NOW).to_json();
        assert_eq!(w.holder(addr(11)), Some(ours));
        assert_eq!(w.host.networks.get("mynet"), Some(&Some(addr(11))));
    }

    /// Worlds in which create-network changes the store and the host in different ways.
    fn scenarios() -> Vec<(&'static str, Setup)> {
        vec![
            ("any free address, the interface's file backed up", |w| {
                w.file("ifcfg-eth1", "DEVICE=eth1\nONBOOT=yes\n")
            }),
            (
                "a given address, a different ifcfg-br0 replaced with --force",
                |w| {
                    w.file("ifcfg-br0", "DEVICE=br0\nIPADDR=203.0.113.9\n");
                    w.flags.ip = Some(addr(11));
                    w.flags.force = true;
                },
            ),
            ("the original's address on the bridge, adopted", |w| {
                w.hold(addr(11), &Owner::original(Role::Host, NOW));
                w.host.bridge_addrs = vec![addr(11)];
            }),
            (
                "an existing network's gateway, NetworkManager enabled but stopped",
                |w| {
                    w.host.networks.insert("mynet".into(), Some(addr(12)));
                    w.host.nm_active = false;
                },
            ),
            ("NetworkManager running but not enabled", |w| {
                w.host.nm_enabled = false;
            }),
            ("NetworkManager neither running nor enabled", |w| {
                (w.host.nm_active, w.host.nm_enabled) = (false, false);
            }),
        ]
    }

    #[test]
    fn a_failure_at_any_step_is_undone_exactly() {
        for (what, setup) in scenarios() {
            // Step 0 is the write to the store, step n the host's change n - 1.
            for step in 0.. {
                let mut w = World::new("undo");
                setup(&mut w);
                let (store, host) = (w.kv.dump(), w.host.state(&w.dir()));
                if step == 0 {
                    // A dry run counts the plan's reads: those pass, the write after fails.
                    w.flags.dry_run = true;
                    let before = w.kv.calls.get();
                    w.create().unwrap();
                    w.flags.dry_run = false;
                    w.kv.fail_next((w.kv.calls.get() - before) as usize, Fault::Pass);
                    w.kv.fail_next(1, Fault::Down);
                } else {
                    w.host.fail.insert(step - 1);
                }
                match w.create() {
                    Err(NetworkError::Step {
                        step: s, undone, ..
                    }) => {
                        assert!(
                            undone.iter().all(|u| !u.starts_with("NOT")),
                            "{what}, step {step} ({s}): {undone:?}"
                        );
                    }
                    Ok(()) => {
                        assert!(step > 3, "{what}: only {step} steps");
                        break;
                    }
                    Err(e) => panic!("{what}, step {step}: {e}"),
                }
                assert_eq!(w.kv.dump(), store, "{what}, step {step}: the store");
                assert_eq!(
                    w.host.state(&w.dir()),
                    host,
                    "{what}, step {step}: the host"
                );
            }
        }
    }

    #[test]
    fn an_undo_that_fails_is_reported_and_the_rest_still_undone() {
        let mut w = World::new("undo-fails");
        w.flags.ip = Some(addr(11));
        // Change 1 writes ifcfg-br0; change 2 is the undo's removal of the network.
        w.host.fail = BTreeSet::from([1, 2]);
        let e = w.create().unwrap_err();
        let path = w.dir().join("ifcfg-br0");
        assert_eq!(
            e.to_string(),
            format!(
                "writing {} failed: injected failure; undone: NOT removed Docker network mynet \
                 (cannot run fake: injected failure), released host address 192.0.2.11",
                path.display()
            )
        );
        assert_eq!(w.holder(addr(11)), None);
        assert_eq!(w.host.networks.get("mynet"), Some(&Some(addr(11))));
    }
}
