//! `create-network`: take this host's address, create the Docker network, write the CentOS
//! bridge config, apply it; each step undone again if a later one fails.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnet::Ipv4Net;

use crate::alloc::{AllocError, Allocator};
use crate::cli::NetworkFlags;
use crate::kv::{KeyValue, Kv, Range, StoreError};
use crate::layout::{
    describe_holder, ContainerConfig, HostIdentity, HostMatch, HostsConfig, Layout, Owner,
    PoolKeys, Role,
};

/// The IPAM driver name Docker finds the plugin by (the socket's file name).
pub const IPAM_DRIVER: &str = "talkingdata";

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
    WroteFile {
        path: PathBuf,
        backup: Option<PathBuf>,
    },
    StoppedNetworkManager,
}

/// What the bridge's ifcfg file says (seed 000's format).
pub fn bridge_ifcfg(
    bridge: &str,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    subnet: Ipv4Net,
    mtu: u32,
) -> String {
    let mut text = format!(
        "DEVICE={bridge}\nTYPE=Bridge\nBOOTPROTO=static\nIPADDR={addr}\nGATEWAY={gateway}\n\
         NETMASK={}\nONBOOT=yes\nNOZEROCONF=yes\nIPV6INIT=no\nNM_CONTROLLED=no\nDELAY=0\n",
        subnet.netmask()
    );
    if mtu != 1500 {
        text.push_str(&format!("MTU={mtu}\n"));
    }
    text
}

/// The interface's ifcfg with `BRIDGE=<bridge>` (replacing another BRIDGE= line if any).
pub fn enslaved_ifcfg(existing: Option<&str>, interface: &str, bridge: &str) -> String {
    let Some(existing) = existing else {
        return format!("DEVICE={interface}\nONBOOT=yes\nNM_CONTROLLED=no\nBRIDGE={bridge}\n");
    };
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| !l.trim_start().starts_with("BRIDGE="))
        .map(str::to_string)
        .collect();
    lines.push(format!("BRIDGE={bridge}"));
    lines.join("\n") + "\n"
}

/// What create-network will do, worked out before anything changes.
struct Plan {
    host: HostIdentity,
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
    bridge_path: PathBuf,
    iface_path: PathBuf,
    network_exists: bool,
}

/// Reads etcd and Docker and checks the flags; refuses before anything changes.
fn plan<K: Kv>(
    kv: &K,
    layout: &Layout,
    flags: &NetworkFlags,
    me: &HostIdentity,
) -> Result<Plan, NetworkError> {
    let host = me.clone();
    let stored = kv.range(&Range::key(layout.hosts_config()))?;
    let value = stored
        .first()
        .map(|kv| kv.value.clone())
        .ok_or(NetworkError::NoHostPool)?;
    let (subnet, gateway) =
        HostsConfig::parse(&value).ok_or_else(|| NetworkError::BadHostsConfig(value.clone()))?;
    let container_config = kv.range(&Range::key(layout.container_config(subnet.network())))?;
    let container_net = container_config
        .first()
        .and_then(|kv| ContainerConfig::parse(&kv.value));
    if container_net != Some(subnet) {
        return Err(NetworkError::NoContainerPool(subnet));
    }
    let held = held_by(kv, layout, me)?;
    if let (Some(held), Some(asked)) = (held, flags.ip) {
        if held != asked {
            return Err(NetworkError::HoldsAnother { held, asked });
        }
    }
    if !flags.ifcfg_dir.is_dir() {
        return Err(NetworkError::NoIfcfgDir(flags.ifcfg_dir.clone()));
    }
    let interface = match &flags.interface {
        Some(i) => i.clone(),
        None => route_interface(gateway)?,
    };
    // An existing network keeps its gateway: this host's address must be that one.
    let existing_gateway = docker_network_gateway(&flags.name);
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
            let record = original_record(kv, layout, addr)?
                .filter(|_| bridge_addrs(&flags.bridge).contains(&addr));
            (Some(addr), record)
        }
        // Without --ip, an address the original gave this host is still on its bridge.
        (None, None) => {
            let mut found = (None, None);
            for addr in bridge_addrs(&flags.bridge) {
                if let Some(record) = original_record(kv, layout, addr)? {
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
        let hosts = layout.hosts();
        if let Some(record) = kv.range(&Range::key(hosts.assigned(addr)))?.first() {
            return Err(NetworkError::Alloc(AllocError::InUse {
                addr,
                holder: describe_holder(&record.value),
            }));
        }
        if kv.range(&Range::key(hosts.pool(addr)))?.is_empty() {
            return Err(NetworkError::Alloc(AllocError::NotInPool {
                addr,
                net: subnet,
            }));
        }
    }
    Ok(Plan {
        host,
        subnet,
        gateway,
        held,
        wanted,
        bridge_path: flags.ifcfg_dir.join(format!("ifcfg-{}", flags.bridge)),
        iface_path: flags.ifcfg_dir.join(format!("ifcfg-{interface}")),
        interface,
        network_exists: existing_gateway.is_some(),
        adopt,
    })
}

fn print_dry_run(plan: &Plan, flags: &NetworkFlags) {
    let host = &plan.host.name;
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
        let args = network_args(flags, plan.subnet, "<host address>", plan.gateway);
        println!("would run: docker {}", args.join(" "));
    }
    println!(
        "would write {} (bridge {} with the host address)",
        plan.bridge_path.display(),
        flags.bridge
    );
    println!(
        "would add BRIDGE={} to {}",
        flags.bridge,
        plan.iface_path.display()
    );
    if !flags.no_restart {
        println!(
            "would run: systemctl stop NetworkManager; systemctl disable NetworkManager; \
             systemctl restart network"
        );
    }
}

/// Runs create-network; prints each step on stdout.
pub fn create<K: Kv>(
    kv: K,
    layout: &Layout,
    flags: &NetworkFlags,
    me: &HostIdentity,
) -> Result<(), NetworkError> {
    let plan = plan(&kv, layout, flags, me)?;
    if flags.dry_run {
        print_dry_run(&plan, flags);
        return Ok(());
    }
    let hosts = layout.hosts();
    let mut alloc = Allocator::new(kv);
    let mut done = Vec::new();
    match apply(&plan, flags, &mut alloc, &hosts, &mut done) {
        Ok(()) => Ok(()),
        Err((step, error)) => {
            let undone = undo(&mut alloc, &hosts, done);
            Err(NetworkError::Step {
                step,
                error,
                undone,
            })
        }
    }
}

/// Does the plan, recording in `done` each step that a later failure must undo.
fn apply<K: Kv>(
    plan: &Plan,
    flags: &NetworkFlags,
    alloc: &mut Allocator<K>,
    hosts: &PoolKeys,
    done: &mut Vec<Done>,
) -> Result<(), (String, String)> {
    let addr = match plan.held {
        Some(addr) => {
            println!("this host already holds {addr}");
            addr
        }
        None => {
            let owner = plan.host.owner(Role::Host, "", &crate::host::now());
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

    let bridge_text = bridge_ifcfg(&flags.bridge, addr, plan.gateway, plan.subnet, flags.mtu);
    let existing_bridge =
        read_optional(&plan.bridge_path).map_err(|e| step("reading the bridge config", e))?;
    if existing_bridge.as_deref().is_some_and(|t| t != bridge_text) && !flags.force {
        let refusal = NetworkError::FileDiffers(plan.bridge_path.clone());
        return Err(step("writing the bridge config", refusal));
    }
    let existing_iface =
        read_optional(&plan.iface_path).map_err(|e| step("reading the interface config", e))?;
    let iface_text = enslaved_ifcfg(existing_iface.as_deref(), &plan.interface, &flags.bridge);

    if plan.network_exists {
        println!("Docker network {} exists already", flags.name);
    } else {
        let args = network_args(flags, plan.subnet, &addr.to_string(), plan.gateway);
        run("docker", &args).map_err(|e| step("docker network create", e))?;
        done.push(Done::CreatedNetwork(flags.name.clone()));
        println!("created Docker network {}", flags.name);
    }

    for (path, text, existing) in [
        (&plan.bridge_path, &bridge_text, existing_bridge),
        (&plan.iface_path, &iface_text, existing_iface),
    ] {
        if existing.as_deref() == Some(text.as_str()) {
            println!("{} is up to date", path.display());
            continue;
        }
        let backup = write_atomically(path, text, existing.is_some())
            .map_err(|e| step(&format!("writing {}", path.display()), e))?;
        match &backup {
            Some(b) => println!(
                "wrote {} (the original is kept as {})",
                path.display(),
                b.display()
            ),
            None => println!("wrote {}", path.display()),
        }
        done.push(Done::WroteFile {
            path: path.clone(),
            backup,
        });
    }

    if !flags.no_restart {
        if run("systemctl", &["is-active", "--quiet", "NetworkManager"]).is_ok() {
            run("systemctl", &["stop", "NetworkManager"])
                .map_err(|e| step("stopping NetworkManager", e))?;
            done.push(Done::StoppedNetworkManager);
            run("systemctl", &["disable", "NetworkManager"])
                .map_err(|e| step("disabling NetworkManager", e))?;
            println!("stopped and disabled NetworkManager");
        }
        run("systemctl", &["restart", "network"])
            .map_err(|e| step("restarting the network service", e))?;
        println!("restarted the network service");
    }
    Ok(())
}

fn step(name: &str, error: impl fmt::Display) -> (String, String) {
    (name.to_string(), error.to_string())
}

/// Undoes `done` in reverse order; says what was undone and what could not be.
fn undo<K: Kv>(alloc: &mut Allocator<K>, hosts: &PoolKeys, done: Vec<Done>) -> Vec<String> {
    let mut said = Vec::new();
    for action in done.into_iter().rev() {
        let (what, result) = match action {
            Done::StoppedNetworkManager => (
                "started NetworkManager again".to_string(),
                run("systemctl", &["enable", "--now", "NetworkManager"]).map(|_| ()),
            ),
            Done::WroteFile {
                path,
                backup: Some(backup),
            } => (
                format!("restored {}", path.display()),
                fs::rename(&backup, &path).map_err(|e| e.to_string()),
            ),
            Done::WroteFile { path, backup: None } => (
                format!("removed {}", path.display()),
                fs::remove_file(&path).map_err(|e| e.to_string()),
            ),
            Done::CreatedNetwork(name) => (
                format!("removed Docker network {name}"),
                run("docker", &["network", "rm", &name]).map(|_| ()),
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
    let record = alloc
        .kv()
        .range(&Range::key(hosts.assigned(addr)))
        .map_err(|e| e.to_string())?;
    match record.first() {
        Some(kv) if kv.value == ours => {
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
    kv: &K,
    layout: &Layout,
    addr: Ipv4Addr,
) -> Result<Option<KeyValue>, NetworkError> {
    let record = kv.range(&Range::key(layout.hosts().assigned(addr)))?;
    Ok(record
        .into_iter()
        .next()
        .filter(|kv| Owner::from_json(&kv.value).is_some_and(|o| o.is_original())))
}

/// The IPv4 addresses `bridge` carries now (none if it does not exist).
fn bridge_addrs(bridge: &str) -> Vec<Ipv4Addr> {
    let Ok(out) = run("ip", &["-4", "-o", "addr", "show", "dev", bridge]) else {
        return Vec::new();
    };
    let mut words = out.split_whitespace();
    let mut found = Vec::new();
    while let Some(word) = words.next() {
        if word == "inet" {
            if let Some(addr) = words.next().and_then(|a| a.split('/').next()?.parse().ok()) {
                found.push(addr);
            }
        }
    }
    found
}

/// The host address this host already holds, if any.
fn held_by<K: Kv>(
    kv: &K,
    layout: &Layout,
    host: &HostIdentity,
) -> Result<Option<Ipv4Addr>, NetworkError> {
    let hosts = layout.hosts();
    let assigned = kv.range(&Range::prefix(hosts.assigned_dir.as_str()))?;
    Ok(assigned.iter().find_map(|kv| {
        let owner = Owner::from_json(&kv.value)?;
        (owner.role == Role::Host && host.is_holder(&owner))
            .then(|| hosts.addr_of(&kv.key))
            .flatten()
    }))
}

fn network_args(
    flags: &NetworkFlags,
    subnet: Ipv4Net,
    addr: &str,
    gateway: Ipv4Addr,
) -> Vec<String> {
    vec![
        "network".into(),
        "create".into(),
        "--opt=com.docker.network.bridge.enable_icc=true".into(),
        "--opt=com.docker.network.bridge.enable_ip_masquerade=false".into(),
        "--opt=com.docker.network.bridge.host_binding_ipv4=0.0.0.0".into(),
        format!("--opt=com.docker.network.bridge.name={}", flags.bridge),
        format!("--opt=com.docker.network.driver.mtu={}", flags.mtu),
        format!("--ipam-driver={IPAM_DRIVER}"),
        format!("--subnet={subnet}"),
        format!("--gateway={addr}"),
        format!("--aux-address=DefaultGatewayIPv4={gateway}"),
        flags.name.clone(),
    ]
}

/// None if no Docker network `name` exists (or Docker cannot be asked); else its IPv4 gateway,
/// if it has one.
fn docker_network_gateway(name: &str) -> Option<Option<Ipv4Addr>> {
    let format = "{{range .IPAM.Config}}{{.Gateway}} {{end}}";
    let out = run("docker", &["network", "inspect", "--format", format, name]).ok()?;
    Some(out.split_whitespace().find_map(|g| g.parse().ok()))
}

/// The device of the route to `gateway`, as `ip route get` tells.
fn route_interface(gateway: Ipv4Addr) -> Result<String, NetworkError> {
    let out = run("ip", &["-4", "route", "get", &gateway.to_string()])
        .map_err(NetworkError::NoInterface)?;
    let mut words = out.split_whitespace();
    while let Some(word) = words.next() {
        if word == "dev" {
            if let Some(dev) = words.next() {
                return Ok(dev.to_string());
            }
        }
    }
    Err(NetworkError::NoInterface(format!(
        "no device in {:?}",
        out.trim()
    )))
}

/// Runs a program; its stdout on success, else its stderr's last line (or why it did not run).
pub(crate) fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<String, String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    log::debug!("running {program} {}", args.join(" "));
    let out = Command::new(program)
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    Err(format!(
        "{program} {} exited with {}: {last}",
        args.first().copied().unwrap_or_default(),
        out.status
    ))
}

fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `text` through a temporary file and a rename, so that it is never
/// seen half-written. If it existed, the original is first copied to a `.bak` beside it
/// (network scripts ignore `*.bak`); returns that backup's path. Both new files are created
/// exclusively, so a file or symlink planted at their names is never written through, and
/// an earlier backup is never overwritten.
fn write_atomically(path: &Path, text: &str, existed: bool) -> io::Result<Option<PathBuf>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let backup = if existed {
        let original = fs::read(path)?;
        let mode = fs::metadata(path)?.permissions().mode() & 0o777;
        let stamp = crate::host::now().replace([':', '-'], "");
        let base = format!("{name}.{}", &stamp[..15]);
        let (backup, mut file) = create_exclusively(dir, &base, ".bak", mode)?;
        let copied = file.write_all(&original).and_then(|()| file.sync_all());
        if let Err(e) = copied {
            let _ = fs::remove_file(&backup);
            return Err(e);
        }
        Some(backup)
    } else {
        None
    };
    let base = format!(".{name}.tmp-{}", std::process::id());
    let written = create_exclusively(dir, &base, "", 0o644).and_then(|(temp, mut file)| {
        let done = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&temp, path));
        if done.is_err() {
            let _ = fs::remove_file(&temp);
        }
        done
    });
    if let Err(e) = written {
        if let Some(b) = &backup {
            let _ = fs::remove_file(b);
        }
        return Err(e);
    }
    Ok(backup)
}

/// Creates `<base><suffix>` in `dir`, or `<base>.1<suffix>`, `.2`, ... if that name is
/// taken: `create_new` fails on any existing entry, a symlink included, so nothing planted
/// there is followed.
fn create_exclusively(
    dir: &Path,
    base: &str,
    suffix: &str,
    mode: u32,
) -> io::Result<(PathBuf, fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    for n in 0..100 {
        let name = match n {
            0 => format!("{base}{suffix}"),
            n => format!("{base}.{n}{suffix}"),
        };
        let path = dir.join(name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("100 files named {base}*{suffix} exist in {}", dir.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_config_matches_the_seed() {
        let text = bridge_ifcfg(
            "br0",
            "192.0.2.85".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            "192.0.0.0/18".parse().unwrap(),
            1500,
        );
        assert_eq!(
            text,
            "DEVICE=br0\nTYPE=Bridge\nBOOTPROTO=static\nIPADDR=192.0.2.85\nGATEWAY=192.0.2.1\n\
             NETMASK=255.255.192.0\nONBOOT=yes\nNOZEROCONF=yes\nIPV6INIT=no\nNM_CONTROLLED=no\nDELAY=0\n"
        );
    }

    #[test]
    fn enslaving_adds_or_replaces_one_bridge_line() {
        let old = "DEVICE=eth0\nONBOOT=yes\nBRIDGE=br9\n";
        assert_eq!(
            enslaved_ifcfg(Some(old), "eth0", "br0"),
            "DEVICE=eth0\nONBOOT=yes\nBRIDGE=br0\n"
        );
        let fresh = enslaved_ifcfg(None, "eth0", "br0");
        assert!(fresh.starts_with("DEVICE=eth0\n") && fresh.ends_with("BRIDGE=br0\n"));
        let again = enslaved_ifcfg(Some(&fresh), "eth0", "br0");
        assert_eq!(again, fresh);
    }

    #[test]
    fn planted_links_are_never_followed_and_backups_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("oam-net-plant-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("ifcfg-br0");
        fs::write(&path, "one\n").unwrap();
        // The names an attacker can predict: the temporary file and this second's backup.
        let temp = dir.join(format!(".ifcfg-br0.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &temp).unwrap();
        let stamp = crate::host::now().replace([':', '-'], "");
        let predicted = dir.join(format!("ifcfg-br0.{}.bak", &stamp[..15]));
        std::os::unix::fs::symlink(&victim, &predicted).unwrap();

        let first = write_atomically(&path, "two\n", true).unwrap().unwrap();
        let second = write_atomically(&path, "three\n", true).unwrap().unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_ne!(first, second);
        assert_eq!(fs::read_to_string(&first).unwrap(), "one\n");
        assert_eq!(fs::read_to_string(&second).unwrap(), "two\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "three\n");
        assert!(fs::symlink_metadata(&temp)
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_writes_keep_a_backup() {
        let dir = std::env::temp_dir().join(format!("oam-net-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ifcfg-br0");
        assert_eq!(write_atomically(&path, "one\n", false).unwrap(), None);
        let backup = write_atomically(&path, "two\n", true).unwrap().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two\n");
        assert_eq!(fs::read_to_string(&backup).unwrap(), "one\n");
        fs::remove_dir_all(&dir).unwrap();
    }
}
