//! Runs each command: connects the parsed command line to etcd, the pools, the plugin and the
//! socket loop, and says what was done on stdout.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::net::Ipv4Addr;

use crate::alloc::{AllocError, Allocator, Released};
use crate::auth::Credentials;
use crate::cli::{Command, Global, Password, ShowFlags, UsageError};
use crate::config;
use crate::etcd::V2Tree;
use crate::etcd::{Client, Security};
use crate::inspect::{self, Listing, ShowError, Snapshot};
use crate::ipam::{self, Plugin};
use crate::kv::{Kv, Range, StoreError};
use crate::layout::{ContainerConfig, HostsConfig, Layout};
use crate::layout::{HostIdentity, Role};
use crate::migrate::{self, MigrateError};
use crate::network::{self, NetworkError};
use crate::pools::{self, PoolError};
use crate::reconcile::{self, Outcome, ReconcileError};
use crate::server::{self, BodyError, Reply, ServerError};
use crate::shrink::{self, ShrinkError};
use crate::system::ThisHost;
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
    /// `show` named a pool that is not there.
    Show(ShowError),
    /// `--remove` or a gateway change was refused or cut short.
    Shrink(ShrinkError),
    Reconcile(ReconcileError),
    /// A guarded release: the address is held, and `--force` was not given.
    Held {
        addr: Ipv4Addr,
        holder: String,
    },
    /// `check` or `reconcile` found this many problems (each printed on stdout).
    Found {
        count: usize,
        what: &'static str,
        hint: &'static str,
    },
    /// A setting from the environment is malformed.
    Setting(UsageError),
    /// The TLS files cannot be used (exit status 2, as a malformed setting).
    Tls(TlsError),
    /// The password file cannot be read (exit status 2).
    Password(config::PasswordFileError),
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
            Failure::Show(e) => write!(f, "{e}"),
            Failure::Shrink(e) => write!(f, "{e}"),
            Failure::Reconcile(e) => write!(f, "{e}"),
            Failure::Held { addr, holder } => write!(
                f,
                "{addr} is held by {holder}; nothing changed (--force releases it anyway)"
            ),
            Failure::Found { count, what, hint } => write!(f, "{count} {what}{hint}"),
            Failure::Setting(e) => write!(f, "{e}"),
            Failure::Tls(e) => write!(f, "{e}"),
            Failure::Password(e) => write!(f, "{e}"),
        }
    }
}

impl From<ShowError> for Failure {
    fn from(e: ShowError) -> Failure {
        Failure::Show(e)
    }
}

impl From<ShrinkError> for Failure {
    fn from(e: ShrinkError) -> Failure {
        Failure::Shrink(e)
    }
}

impl From<ReconcileError> for Failure {
    fn from(e: ReconcileError) -> Failure {
        Failure::Reconcile(e)
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
        Command::HostRange {
            range,
            gateway,
            force,
        } => {
            if force {
                if let Some(change) =
                    shrink::change_hosts_gateway(&etcd(), &layout, range.net, gateway)?
                {
                    println!("{change}");
                    if range.contains(change.old) {
                        println!(
                            "{} (the old gateway) lies in the range and is pooled now; take it \
                             out with host-range --remove if the old router still uses it",
                            change.old
                        );
                    }
                }
            }
            let mut progress = Progress::new("pooling host addresses");
            let report = pools::add_host_range(&etcd(), &layout, range, gateway, &mut |d, t| {
                progress.show(d, t)
            })?;
            progress.finish();
            println!("host pool {} (gateway {gateway}): {report}", range.net);
            Ok(())
        }
        Command::ReleaseIp { addr, net, force } => {
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
            let released = Allocator::new(etcd)
                .release_unless(&keys, addr, |o| !force && o.role == Role::Container)?;
            report_release(
                guarded(released, addr)?,
                addr,
                &format!("the container pool {net}"),
            )
        }
        Command::ReleaseHost {
            addr,
            prefix_len,
            force,
        } => {
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
            let released = Allocator::new(etcd)
                .release_unless(&keys, addr, |o| !force && o.role == Role::Host)?;
            report_release(guarded(released, addr)?, addr, "the host pool")
        }
        Command::RemoveIpRange { range } => {
            let mut progress = Progress::new("removing container addresses");
            let report = shrink::remove_container_range(&etcd(), &layout, range, &mut |d, t| {
                progress.show(d, t)
            });
            progress.finish();
            println!("container pool {}: {}", range.net, report?);
            Ok(())
        }
        Command::RemoveHostRange { range, gateway } => {
            let mut progress = Progress::new("removing host addresses");
            let report =
                shrink::remove_host_range(&etcd(), &layout, range, gateway, &mut |d, t| {
                    progress.show(d, t)
                });
            progress.finish();
            println!("host pool {}: {}", range.net, report?);
            Ok(())
        }
        Command::Show(flags) => show(&etcd(), &layout, flags),
        Command::Check { json } => check(&etcd(), &layout, json),
        Command::Reconcile { apply } => {
            let me = identity(global)?;
            reconcile(&etcd(), &layout, &me, apply)
        }
        Command::MigrateV2 { dry_run } => migrate_v2(&etcd(), &layout, dry_run),
        Command::Server { socket } => {
            let me = identity(global)?;
            let host = me.name.clone();
            let stop = server::Stop::on_signals()?;
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
            log::info!(
                "this host's identity: {}",
                if me.id.is_empty() {
                    "its name alone (no --host-id, HOST_ID nor /etc/machine-id)"
                } else {
                    &me.id
                }
            );
            let plugin = Plugin::new(etcd(), layout, host).with_host_id(&me.id);
            let mut plugin = Served(plugin);
            let served = server::serve(listener, stop, &mut plugin);
            plugin.0.leave();
            Ok(served?)
        }
        Command::CreateNetwork(flags) => {
            let me = identity(global)?;
            Ok(network::create(
                etcd(),
                &layout,
                &flags,
                &me,
                &mut ThisHost,
            )?)
        }
    }
}

/// The plugin behind the socket loop.
struct Served<K>(Plugin<K>);

impl<K: Kv> server::Handler for Served<K> {
    fn handle(&mut self, path: &str, body: Result<&[u8], BodyError>) -> Reply {
        let answer = match body {
            Ok(body) => self.0.handle(path, body),
            Err(e @ BodyError::TooLarge { .. }) => self.0.refuse(413, &e.to_string()),
            Err(e @ BodyError::Unreadable(_)) => self.0.refuse(400, &e.to_string()),
        };
        Reply {
            status: answer.status,
            body: answer.body,
            content_type: ipam::CONTENT_TYPE,
        }
    }

    fn idle(&mut self) {
        self.0.settle();
    }
}

/// The TLS configuration and credentials of `global`, read from their files once.
fn security(global: &Global) -> Result<Security, Failure> {
    let tls = tls::config(&global.tls).map_err(Failure::Tls)?;
    let credentials = match (&global.user, &global.password) {
        (Some(user), Some(password)) => Some(Credentials {
            user: user.clone(),
            password: match password {
                Password::File(path) => config::read_password(path).map_err(Failure::Password)?,
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
        Released::AlreadyFree => {
            println!("{addr} is not assigned: it is already free in {pool}; nothing changed");
            Ok(())
        }
        // What `guarded` keeps is refused before this, with its holder.
        Released::Kept { holder } => Err(Failure::Held { addr, holder }),
        Released::Unknown => Err(Failure::NotInPool(format!(
            "{addr} is neither free nor assigned in {pool}"
        ))),
    }
}

/// This host: its name, and `--host-id`, else `HOST_ID`, else the identity derived from
/// `/etc/machine-id`.
fn identity(global: &Global) -> Result<HostIdentity, Failure> {
    let given = match &global.host_id {
        Some(id) => Some(id.clone()),
        None => match std::env::var("HOST_ID") {
            Ok(v) if !v.trim().is_empty() => {
                Some(crate::cli::parse_host_id("HOST_ID", v.trim()).map_err(Failure::Setting)?)
            }
            _ => None,
        },
    };
    Ok(crate::host::identity(given.as_deref()))
}

/// A guarded release that found the address held is refused; any other result goes on.
fn guarded(released: Released, addr: Ipv4Addr) -> Result<Released, Failure> {
    match released {
        Released::Kept { holder } => Err(Failure::Held { addr, holder }),
        other => Ok(other),
    }
}

/// `show`: one read of the store, printed as a table or JSON.
fn show<K: Kv>(kv: &K, layout: &Layout, flags: ShowFlags) -> Result<(), Failure> {
    let snap = Snapshot::read(kv, layout)?;
    let listing = match (flags.ip, flags.json, flags.pool) {
        (Some(ip), _, _) => Listing::Address(ip),
        (None, true, _) | (None, false, Some(_)) => Listing::Assigned,
        (None, false, None) => Listing::None,
    };
    let view = inspect::show(&snap, flags.pool, listing)?;
    if flags.json {
        println!("{}", pools::json(&view));
    } else if let (Some(ip), true) = (flags.ip, view.pools.is_empty()) {
        println!("{ip} is in no pool");
    } else {
        print!("{}", inspect::show_text(&view, listing != Listing::None));
    }
    Ok(())
}

/// `check`: every violation on a line of its own, then the verdict.
fn check<K: Kv>(kv: &K, layout: &Layout, json: bool) -> Result<(), Failure> {
    let report = inspect::check(&Snapshot::read(kv, layout)?);
    if json {
        println!("{}", pools::json(&report));
    } else {
        for v in &report.violations {
            println!("{}: {}", v.key, v.problem);
        }
        for n in &report.notes {
            println!("note: {}: {}", n.key, n.problem);
        }
        if report.ok {
            println!(
                "ok: {} pool(s), {} address key(s), every invariant holds",
                report.pools, report.addresses
            );
        }
    }
    if report.ok {
        Ok(())
    } else {
        Err(Failure::Found {
            count: report.violations.len(),
            what: "violation(s) found",
            hint: "",
        })
    }
}

/// `reconcile`: Docker, then etcd, then Docker again; what differs, and with `apply` the fixes.
fn reconcile<K: Kv>(
    kv: &K,
    layout: &Layout,
    me: &HostIdentity,
    apply: bool,
) -> Result<(), Failure> {
    let started = reconcile::now_secs();
    let before = crate::docker::talkingdata_view().map_err(ReconcileError::Docker)?;
    let snap = Snapshot::read(kv, layout)?;
    let after = crate::docker::talkingdata_view().map_err(ReconcileError::Docker)?;
    let found = reconcile::compare(&snap, &before, &after, me, started);
    let mut left = 0;
    let mut alloc = Allocator::new(kv);
    for finding in &found {
        if !apply {
            println!("{finding}");
            continue;
        }
        match reconcile::apply(&mut alloc, layout, &snap, me, finding)? {
            Outcome::Fixed(done) => println!("{finding}: {done}"),
            Outcome::Left(why) => {
                left += 1;
                println!("{finding}: left: {why}");
            }
        }
    }
    let endpoints = before.endpoints.len();
    if found.is_empty() {
        println!(
            "in step: {endpoints} endpoint(s) on talkingdata networks, etcd agrees for host {}",
            me.name
        );
        return Ok(());
    }
    if !apply {
        return Err(Failure::Found {
            count: found.len(),
            what: "difference(s) between Docker and etcd",
            hint: "; nothing changed (reconcile --apply fixes all but conflicts)",
        });
    }
    if left > 0 {
        return Err(Failure::Found {
            count: left,
            what: "difference(s) left for a person to resolve",
            hint: "",
        });
    }
    Ok(())
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
