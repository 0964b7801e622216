//! create-network against a real etcd with no Docker to ask: what it refuses before asking
//! Docker, and that a Docker it cannot ask is refused before any change. tests/e2e.rs runs it
//! against real dockerd (refusals, dry run, the successful path); network.rs unit-tests that a
//! failure at each step is undone exactly.

mod common;

use common::{fails, host_range, ip_range, unique_prefix, Etcd, TempDir, BIN};
use std::process::{Command, Output};

/// The Docker create-network runs against.
enum Docker<'a> {
    /// No daemon at `DOCKER_HOST`.
    Down,
    /// No `docker` on the `PATH`, which is this empty directory.
    Missing(&'a TempDir),
}

fn create_network(etcd: &Etcd, prefix: &str, docker: Docker, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args([
            "--cluster-store",
            &etcd.url,
            "--store-prefix",
            prefix,
            "create-network",
        ])
        .args(args)
        // Whatever runs as docker, no real daemon is reached.
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    match docker {
        Docker::Down => {}
        Docker::Missing(dir) => {
            command.env("PATH", &dir.0);
        }
    }
    command.output().expect("run the binary")
}

/// Hosts .10-.12 and containers .100-.110 of 192.0.2.0/24, under a fresh prefix.
fn pools_defined(etcd: &Etcd) -> String {
    let p = unique_prefix("cn");
    host_range(&etcd.url, &p, "192.0.2.10/24", "192.0.2.12/24", "192.0.2.1");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.110/24");
    p
}

/// The refusals that come before Docker is asked; the others, which need a Docker that
/// answers, are in tests/e2e.rs with a real dockerd.
#[test]
fn refusals_before_docker_is_asked_change_nothing() {
    let etcd = Etcd::shared();
    let p = pools_defined(etcd);
    let ifcfg = TempDir::new("cn-refuse");
    std::fs::write(ifcfg.join("ifcfg-br0"), "DEVICE=br0\nIPADDR=203.0.113.9\n").unwrap();
    let (etcd_before, files_before) = (etcd.dump(&p), common::files_in(&ifcfg.0));
    let dir = ifcfg.0.to_str().unwrap();
    let docker = || Docker::Down;
    fails(
        create_network(
            etcd,
            &unique_prefix("cn-empty"),
            docker(),
            &["--ifcfg-dir", dir],
        ),
        1,
        "no host pool",
    );
    let hosts_only = unique_prefix("cn-hosts-only");
    host_range(
        &etcd.url,
        &hosts_only,
        "192.0.2.10/24",
        "192.0.2.12/24",
        "192.0.2.1",
    );
    let before_hosts_only = etcd.dump(&hosts_only);
    let out = create_network(etcd, &hosts_only, docker(), &["--ifcfg-dir", dir]);
    fails(out, 1, "no container pool 192.0.2.0/24 in etcd");
    assert_eq!(etcd.dump(&hosts_only), before_hosts_only);
    fails(
        create_network(etcd, &p, docker(), &["--mtu", "12"]),
        2,
        "--mtu",
    );
    assert_eq!(etcd.dump(&p), etcd_before);
    assert_eq!(common::files_in(&ifcfg.0), files_before);
}

/// Whether the network exists is not known while Docker cannot be asked: the run, and the dry
/// run with it, are refused before anything changes, and the error names the cause.
#[test]
fn a_docker_that_cannot_be_asked_is_refused_before_any_change() {
    let etcd = Etcd::shared();
    let p = pools_defined(etcd);
    let ifcfg = TempDir::new("cn-no-docker");
    let (etcd_before, files_before) = (etcd.dump(&p), common::files_in(&ifcfg.0));
    let dir = ifcfg.0.to_str().unwrap();
    let empty = TempDir::new("cn-empty-path");
    for dry_run in [&[][..], &["--dry-run"]] {
        let args = [&["--ifcfg-dir", dir, "--interface", "eth1"][..], dry_run].concat();
        let out = create_network(etcd, &p, Docker::Down, &args);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        fails(out, 1, "cannot ask Docker about network mynet: ");
        assert!(said.contains("Is the docker daemon running?"), "{said}");
        let out = create_network(etcd, &p, Docker::Missing(&empty), &args);
        fails(
            out,
            1,
            "cannot ask Docker about network mynet: cannot run docker: ",
        );
    }
    assert_eq!(etcd.dump(&p), etcd_before);
    assert_eq!(common::files_in(&ifcfg.0), files_before);
}
