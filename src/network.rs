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
    /// The bridge's and the interface's file names in the ifcfg directory.
    bridge_file: String,
    iface_file: String,
    network_exists: bool,
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
    let existing_gateway = sys.docker_network(&flags.name);
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
            let record = original_record(alloc, &hosts, addr)?
                .filter(|_| sys.bridge_addrs(&flags.bridge).contains(&addr));
            (Some(addr), record)
        }
        // Without --ip, an address the original gave this host is still on its bridge.
        (None, None) => {
            let mut found = (None, None);
            for addr in sys.bridge_addrs(&flags.bridge) {
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
    Ok(Plan {
        subnet,
        gateway,
        held,
        wanted,
        bridge_file: format!("ifcfg-{}", flags.bridge),
        iface_file: format!("ifcfg-{interface}"),
        interface,
        network_exists: existing_gateway.is_some(),
        adopt,
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
    println!(
        "would write {} (bridge {} with the host address)",
        flags.ifcfg_dir.join(&plan.bridge_file).display(),
        flags.bridge
    );
    println!(
        "would add BRIDGE={} to {}",
        flags.bridge,
        flags.ifcfg_dir.join(&plan.iface_file).display()
    );
    if !flags.no_restart {
        println!(
            "would run: systemctl stop NetworkManager; systemctl disable NetworkManager; \
             systemctl restart network"
        );
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
    let addr = match plan.held {
        Some(addr) => {
            println!("this host already holds {addr}");
            addr
        }
        None => {
            let owner = me.owner(Role::Host, "", &sys.now());
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
    let bridge_path = dir.join(&plan.bridge_file);
    let bridge_text = ifcfg::bridge_text(&flags.bridge, addr, plan.gateway, plan.subnet, flags.mtu);
    let existing_bridge = sys
        .read_file(dir, &plan.bridge_file)
        .map_err(|e| step("reading the bridge config", e))?;
    if existing_bridge.as_deref().is_some_and(|t| t != bridge_text) && !flags.force {
        let refusal = NetworkError::FileDiffers(bridge_path);
        return Err(step("writing the bridge config", refusal));
    }
    let existing_iface = sys
        .read_file(dir, &plan.iface_file)
        .map_err(|e| step("reading the interface config", e))?;
    let iface_text =
        ifcfg::enslaved_text(existing_iface.as_deref(), &plan.interface, &flags.bridge);

    if plan.network_exists {
        println!("Docker network {} exists already", flags.name);
    } else {
        sys.create_docker_network(&spec(plan, flags), addr)
            .map_err(|e| step("docker network create", e))?;
        done.push(Done::CreatedNetwork(flags.name.clone()));
        println!("created Docker network {}", flags.name);
    }

    for (name, text, existing) in [
        (&plan.bridge_file, &bridge_text, existing_bridge),
        (&plan.iface_file, &iface_text, existing_iface),
    ] {
        let path = dir.join(name);
        if existing.as_deref() == Some(text.as_str()) {
            println!("{} is up to date", path.display());
            continue;
        }
        let backup = sys
            .write_file(dir, name, text)
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
        if sys.network_manager_active() {
            sys.service(Service::StopNetworkManager)
                .map_err(|e| step("stopping NetworkManager", e))?;
            done.push(Done::StoppedNetworkManager);
            sys.service(Service::DisableNetworkManager)
                .map_err(|e| step("disabling NetworkManager", e))?;
            println!("stopped and disabled NetworkManager");
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
