//! Runs each command: connects the parsed command line to etcd, the pools, the plugin and the
//! socket loop, and says what was done on stdout.

use std::fmt;
use std::io::{IsTerminal, Write};

use crate::alloc::{AllocError, Allocator, Released};
use crate::auth::{AuthError, Credentials, Secret};
use crate::cli::{Command, Global, Password};
use crate::etcd::V2Tree;
use crate::etcd::{Client, Security};
use crate::ipam::{self, Plugin};
use crate::kv::{Kv, Range, StoreError};
use crate::layout::{ContainerConfig, HostsConfig, Layout};
use crate::migrate::{self, MigrateError};
use crate::network::{self, NetworkError};
use crate::pools::{self, PoolError};
use crate::server::{self, BodyError, Reply, ServerError};
use crate::tls::{self, TlsError};

/// Why a command failed at run time. Exit status 1.
#[derive(Debug)]
pub enum Failure {
    Pool(PoolError),
    Alloc(AllocError),
    Server(ServerError),
    Network(NetworkError),
    /// An address to release is not in the pool at all.
    NotInPool(String),
    /// An address was given with a prefix length other than its pool's.
    WrongMask {
        given: String,
        pool: String,
    },
    Migrate(MigrateError),
    /// etcd does not serve the v2 API that `migrate-v2` reads.
    V2NotServed,
    Store(StoreError),
    /// The TLS files cannot be used (exit status 2, as a malformed setting).
    Tls(TlsError),
    /// The password file cannot be read (exit status 2).
    Password(AuthError),
}

impl Failure {
    /// 2 for settings that cannot work (restarting the service cannot fix them), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Tls(_) | Failure::Password(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Pool(e) => write!(f, "{e}"),
            Failure::Alloc(e) => write!(f, "{e}"),
            Failure::Server(e) => write!(f, "{e}"),
            Failure::Network(e) => write!(f, "{e}"),
            Failure::NotInPool(what) => write!(f, "{what}"),
            Failure::WrongMask { given, pool } => {
                write!(f, "{given} does not match {pool}; nothing changed")
            }
            Failure::Migrate(e) => write!(f, "{e}"),
            Failure::V2NotServed => write!(
                f,
                "etcd does not serve its v2 API, where the original kept its pools: start it \
                 with --enable-v2=true (etcd 3.3 to 3.5) and run migrate-v2 again"
            ),
            Failure::Store(e) => write!(f, "{e}"),
            Failure::Tls(e) => write!(f, "{e}"),
            Failure::Password(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Failure {}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Failure {
        Failure::Pool(e)
    }
}

impl From<AllocError> for Failure {
    fn from(e: AllocError) -> Failure {
        Failure::Alloc(e)
    }
}

impl From<ServerError> for Failure {
    fn from(e: ServerError) -> Failure {
        Failure::Server(e)
    }
}

impl From<MigrateError> for Failure {
    fn from(e: MigrateError) -> Failure {
        Failure::Migrate(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Store(e)
    }
}

impl From<NetworkError> for Failure {
    fn from(e: NetworkError) -> Failure {
        Failure::Network(e)
    }
}

pub fn run(global: &Global, command: Command) -> Result<(), Failure> {
    for warning in &global.warnings {
        log::warn!("{warning}");
    }
    match command {
        Command::Help(text) => {
            print!("{text}");
            return Ok(());
        }
        Command::Version => {
            println!("oam-docker-ipam {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        _ => {}
    }
    let security = security(global)?;
    let etcd = || Client::secured(global.endpoints.clone(), global.timeout, security.clone());
    let layout = Layout::new(&global.store_prefix);
    match command {
        Command::Help(_) | Command::Version => Ok(()),
        Command::IpRange { range } => {
            let mut progress = Progress::new("pooling container addresses");
            let report = pools::add_container_range(&etcd(), &layout, range, &mut |d, t| {
                progress.show(d, t)
            })?;
            progress.finish();
            println!("container pool {}: {report}", range.net);
            Ok(())
        }
        Command::HostRange { range, gateway } => {
            let mut progress = Progress::new("pooling host addresses");
            let report = pools::add_host_range(&etcd(), &layout, range, gateway, &mut |d, t| {
                progress.show(d, t)
            })?;
            progress.finish();
            println!("host pool {} (gateway {gateway}): {report}", range.net);
            Ok(())
        }
        Command::ReleaseIp { addr, net } => {
            let etcd = etcd();
            let config = stored(&etcd, &layout.container_config(net.network()))?;
            if let Some(pool) = config.as_deref().and_then(ContainerConfig::parse) {
                if pool != net {
                    return Err(Failure::WrongMask {
                        given: format!("{addr}/{}", net.prefix_len()),
                        pool: format!("the container pool {pool}"),
                    });
                }
            }
            let keys = layout.containers(net.network());
            report_release(
                Allocator::new(etcd).release_any(&keys, addr)?,
                addr,
                &format!("the container pool {net}"),
            )
        }
        Command::ReleaseHost { addr, prefix_len } => {
            let etcd = etcd();
            if let Some(len) = prefix_len {
                let config = stored(&etcd, &layout.hosts_config())?;
                if let Some((subnet, _)) = config.as_deref().and_then(HostsConfig::parse) {
                    if subnet.prefix_len() != len || !subnet.contains(&addr) {
                        return Err(Failure::WrongMask {
                            given: format!("{addr}/{len}"),
                            pool: format!("the hosts' subnet {subnet}"),
                        });
                    }
                }
            }
            let keys = layout.hosts();
            report_release(
                Allocator::new(etcd).release_any(&keys, addr)?,
                addr,
                "the host pool",
            )
        }
        Command::MigrateV2 { dry_run } => migrate_v2(&etcd(), &layout, dry_run),
        Command::Server { socket } => {
            let host = crate::layout::host_name();
            let listener = server::listen(&socket)?;
            log::info!(
                "oam-docker-ipam {} serving pools under {} for host {host}",
                env!("CARGO_PKG_VERSION"),
                global.store_prefix
            );
            // On its own client and thread: an etcd that does not answer must delay neither
            // Docker's first call nor the signal handlers that serve installs.
            let (probe, endpoints) = (etcd(), global.endpoints.clone());
            std::thread::spawn(move || log_etcd(&probe, &endpoints));
            let mut plugin = Plugin::new(etcd(), layout, host);
            server::serve(listener, |path, body| {
                let answer = match body {
                    Ok(body) => plugin.handle(path, body),
                    Err(e @ BodyError::TooLarge { .. }) => plugin.refuse(413, &e.to_string()),
                    Err(e @ BodyError::Unreadable(_)) => plugin.refuse(400, &e.to_string()),
                };
                Reply {
                    status: answer.status,
                    body: answer.body,
                    content_type: ipam::CONTENT_TYPE,
                }
            })?;
            Ok(())
        }
        Command::CreateNetwork(flags) => Ok(network::create(etcd(), &layout, &flags)?),
    }
}

/// The TLS configuration and credentials of `global`, read from their files once.
fn security(global: &Global) -> Result<Security, Failure> {
    let tls = tls::config(&global.tls).map_err(Failure::Tls)?;
    let credentials = match (&global.user, &global.password) {
        (Some(user), Some(password)) => Some(Credentials {
            user: user.clone(),
            password: match password {
                Password::File(path) => Secret::from_file(path).map_err(Failure::Password)?,
                Password::Given(secret) => secret.clone(),
            },
        }),
        _ => None,
    };
    Ok(Security { tls, credentials })
}

/// Says at start which etcd the server will use, and warns (it serves anyway: etcd may come
/// up later, and Docker gets each request's error meanwhile) when no endpoint answers.
fn log_etcd(etcd: &Client, endpoints: &[String]) {
    let endpoints = endpoints.join(",");
    match etcd.server_version() {
        Ok(found) => log::info!(
            "etcd endpoints {endpoints}: {} answers, etcd {}, API prefix {}",
            found.endpoint,
            found.version,
            found.api_prefix
        ),
        Err(e) => log::warn!(
            "etcd endpoints {endpoints}: none answers ({e}); serving anyway, requests fail until one does"
        ),
    }
}

/// The value stored at `key`, if any.
fn stored<K: Kv>(kv: &K, key: &str) -> Result<Option<String>, Failure> {
    Ok(kv
        .range(&Range::key(key))?
        .into_iter()
        .next()
        .map(|kv| kv.value))
}

/// `migrate-v2`: reads the original's v2 keys, says what it will write (or why it refuses),
/// writes unless `dry_run`, and reports what v3 holds afterwards.
fn migrate_v2(etcd: &Client, layout: &Layout, dry_run: bool) -> Result<(), Failure> {
    let (index, keys) = match etcd.v2_tree(layout.prefix()).map_err(StoreError::from)? {
        V2Tree::NotServed => return Err(Failure::V2NotServed),
        V2Tree::Missing => {
            println!(
                "etcd v2 holds nothing under {}: nothing to migrate",
                layout.prefix()
            );
            return Ok(());
        }
        V2Tree::Keys { index, keys } => (index, keys),
    };
    let plan = migrate::plan(etcd, layout, &keys, index)?;
    for key in &plan.ignored {
        println!("not migrated (not the original's layout): {key}");
    }
    for note in &plan.notes {
        println!("note: {note}");
    }
    for pool in &plan.pools {
        println!(
            "{}: {} free and {} assigned to write, {} already in etcd v3, {} unchanged in v2 \
             since the last migration",
            pool.label,
            pool.write_free.len(),
            pool.write_assigned.len(),
            pool.already,
            pool.carried
        );
    }
    for problem in &plan.problems {
        println!("disagrees: {problem}");
    }
    if !plan.problems.is_empty() {
        return Err(MigrateError::Refused {
            problems: plan.problems.len(),
        }
        .into());
    }
    if dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    if plan.is_empty() {
        println!(
            "nothing to migrate: etcd v3 holds the original's data already (v2 index {index})"
        );
    }
    let written = migrate::apply(etcd, &plan)?;
    if !plan.is_empty() {
        println!(
            "wrote {} config(s), {} free and {} assigned address(es) (held by the original \
             until Docker releases them); {} were in etcd v3 already",
            written.configs, written.free, written.assigned, written.already
        );
    }
    for (label, free, assigned) in migrate::counts(etcd, &plan)? {
        println!("checked {label} in etcd v3: {free} free, {assigned} assigned");
    }
    Ok(())
}

fn report_release(released: Released, addr: std::net::Ipv4Addr, pool: &str) -> Result<(), Failure> {
    match released {
        Released::Freed { holder } => {
            println!("released {addr} (held by {holder}) back to {pool}");
            Ok(())
        }
        Released::AlreadyFree | Released::Kept { .. } => {
            println!("{addr} is not assigned: it is already free in {pool}; nothing changed");
            Ok(())
        }
        Released::Unknown => Err(Failure::NotInPool(format!(
            "{addr} is neither free nor assigned in {pool}"
        ))),
    }
}

/// A count on stderr while a long write runs, only when stderr is a terminal.
struct Progress {
    label: &'static str,
    shown: bool,
    enabled: bool,
}

impl Progress {
    fn new(label: &'static str) -> Progress {
        Progress {
            label,
            shown: false,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, done: u64, total: u64) {
        if self.enabled && total >= 1024 {
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r{}: {done}/{total} ({}%)",
                self.label,
                done * 100 / total
            );
            let _ = err.flush();
            self.shown = true;
        }
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
        }
    }
}
