//! Runs each command: connects the parsed command line to etcd, the pools, the plugin and the
//! socket loop, and says what was done on stdout.

use std::fmt;
use std::io::{IsTerminal, Write};

use crate::alloc::{AllocError, Allocator, Released};
use crate::cli::{Command, Global};
use crate::etcd::Client;
use crate::ipam::{self, Plugin};
use crate::layout::Layout;
use crate::network::{self, NetworkError};
use crate::pools::{self, PoolError};
use crate::server::{self, BodyError, Reply, ServerError};

/// Why a command failed at run time. Exit status 1.
#[derive(Debug)]
pub enum Failure {
    Pool(PoolError),
    Alloc(AllocError),
    Server(ServerError),
    Network(NetworkError),
    /// An address to release is not in the pool at all.
    NotInPool(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Pool(e) => write!(f, "{e}"),
            Failure::Alloc(e) => write!(f, "{e}"),
            Failure::Server(e) => write!(f, "{e}"),
            Failure::Network(e) => write!(f, "{e}"),
            Failure::NotInPool(what) => write!(f, "{what}"),
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

impl From<NetworkError> for Failure {
    fn from(e: NetworkError) -> Failure {
        Failure::Network(e)
    }
}

pub fn run(global: &Global, command: Command) -> Result<(), Failure> {
    let etcd = || Client::new(global.endpoints.clone(), global.timeout);
    let layout = Layout::new(&global.store_prefix);
    match command {
        Command::Help(text) => {
            print!("{text}");
            Ok(())
        }
        Command::Version => {
            println!("oam-docker-ipam {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
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
            let keys = layout.containers(net.network());
            report_release(
                Allocator::new(etcd()).release_any(&keys, addr)?,
                addr,
                &format!("the container pool {net}"),
            )
        }
        Command::ReleaseHost { addr } => {
            let keys = layout.hosts();
            report_release(
                Allocator::new(etcd()).release_any(&keys, addr)?,
                addr,
                "the host pool",
            )
        }
        Command::Server { socket } => {
            let host = crate::layout::host_name();
            let listener = server::listen(&socket)?;
            log::info!(
                "oam-docker-ipam {} serving pools under {} for host {host}",
                env!("CARGO_PKG_VERSION"),
                global.store_prefix
            );
            let etcd = etcd();
            log_etcd(&etcd, &global.endpoints);
            let mut plugin = Plugin::new(etcd, layout, host);
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
