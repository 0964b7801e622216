//! The outside world create-network reads and changes, as one interface: Docker's networks,
//! what `ip` says of this host's network, the services `systemctl` runs, the files of an
//! ifcfg directory, and the clock. [`ThisHost`] is the real one, passing each call on to
//! `docker`, `hostnet` or `ifcfg`; the unit tests of `network` use a fake.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::docker::{self, NetworkSpec};
use crate::exec::RunError;
use crate::hostnet::{self, RouteError, Service};
use crate::ifcfg;

/// What create-network needs of the host it runs on. The `&mut self` methods change it; the
/// others only look.
pub trait HostSystem {
    /// None if Docker says no network `name` exists; else its IPv4 gateway, if it has one.
    /// An error if Docker cannot be asked.
    fn docker_network(&self, name: &str) -> Result<Option<Option<Ipv4Addr>>, RunError>;
    /// Creates the Docker network `spec` with `gateway` as its gateway.
    fn create_docker_network(
        &mut self,
        spec: &NetworkSpec,
        gateway: Ipv4Addr,
    ) -> Result<(), RunError>;
    fn remove_docker_network(&mut self, name: &str) -> Result<(), RunError>;

    /// The IPv4 addresses `bridge` carries now (none if it does not exist); an error if
    /// `ip` cannot tell.
    fn bridge_addrs(&self, bridge: &str) -> Result<Vec<Ipv4Addr>, RunError>;
    /// The device of the route to `gateway`.
    fn route_interface(&self, gateway: Ipv4Addr) -> Result<String, RouteError>;

    /// Whether NetworkManager is running now.
    fn network_manager_active(&self) -> bool;
    /// Whether NetworkManager is enabled, to start at boot.
    fn network_manager_enabled(&self) -> bool;
    fn service(&mut self, change: Service) -> Result<(), RunError>;

    /// Whether the ifcfg directory `dir` exists.
    fn is_dir(&self, dir: &Path) -> bool;
    /// The text of the file `name` in `dir`; None if there is none.
    fn read_file(&self, dir: &Path, name: &str) -> io::Result<Option<String>>;
    /// Replaces (or creates) `name` in `dir` with `text`; the name of the backup of what it
    /// held, if it existed, dated `now` (as [`HostSystem::now`] tells it).
    fn write_file(
        &mut self,
        dir: &Path,
        name: &str,
        text: &str,
        now: &str,
    ) -> io::Result<Option<String>>;
    /// Undoes a `write_file`: moves `backup` back to `name`, or removes `name` if none.
    fn restore_file(&mut self, dir: &Path, name: &str, backup: Option<&str>) -> io::Result<()>;

    /// The time records and backups are dated with (RFC 3339, UTC).
    fn now(&self) -> String;
}

/// The machine this runs on.
pub struct ThisHost;

impl HostSystem for ThisHost {
    fn docker_network(&self, name: &str) -> Result<Option<Option<Ipv4Addr>>, RunError> {
        docker::network_gateway(name)
    }

    fn create_docker_network(
        &mut self,
        spec: &NetworkSpec,
        gateway: Ipv4Addr,
    ) -> Result<(), RunError> {
        docker::create_network(spec, gateway)
    }

    fn remove_docker_network(&mut self, name: &str) -> Result<(), RunError> {
        docker::remove_network(name)
    }

    fn bridge_addrs(&self, bridge: &str) -> Result<Vec<Ipv4Addr>, RunError> {
        hostnet::bridge_addrs(bridge)
    }

    fn route_interface(&self, gateway: Ipv4Addr) -> Result<String, RouteError> {
        hostnet::route_interface(gateway)
    }

    fn network_manager_active(&self) -> bool {
        hostnet::network_manager_active()
    }

    fn network_manager_enabled(&self) -> bool {
        hostnet::network_manager_enabled()
    }

    fn service(&mut self, change: Service) -> Result<(), RunError> {
        hostnet::change(change)
    }

    fn is_dir(&self, dir: &Path) -> bool {
        ifcfg::is_dir(dir)
    }

    fn read_file(&self, dir: &Path, name: &str) -> io::Result<Option<String>> {
        ifcfg::read(dir, name)
    }

    fn write_file(
        &mut self,
        dir: &Path,
        name: &str,
        text: &str,
        now: &str,
    ) -> io::Result<Option<String>> {
        ifcfg::write(dir, name, text, now)
    }

    fn restore_file(&mut self, dir: &Path, name: &str, backup: Option<&str>) -> io::Result<()> {
        ifcfg::restore(dir, name, backup)
    }

    fn now(&self) -> String {
        crate::host::now()
    }
}
