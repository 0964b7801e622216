//! create-network's refusals, dry run and rollback against a real etcd, with a Docker that
//! cannot be asked or a fake `docker` that knows no network and cannot create one (the
//! end-to-end tests cover the successful path with real dockerd).

mod common;

use common::{fails, host_range, ip_range, ok, unique_prefix, Etcd, TempDir, BIN};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

/// The Docker create-network runs against.
enum Docker<'a> {
    /// No daemon at `DOCKER_HOST`.
    Down,
    /// No `docker` on the `PATH`, which is this empty directory.
    Missing(&'a TempDir),
    /// The `docker` of [`fake_docker`], first on the `PATH`.
    Fake(&'a TempDir),
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
        Docker::Fake(dir) => {
            let path = std::env::var("PATH").unwrap_or_default();
            command.env("PATH", format!("{}:{path}", dir.0.display()));
        }
    }
    command.output().expect("run the binary")
}

/// A directory holding a `docker` that answers `network inspect` as Debian's docker.io does
/// for a network that does not exist, and fails `network create`.
fn fake_docker() -> TempDir {
    let dir = TempDir::new("cn-docker");
    let script = "#!/bin/sh\n\
                  case \"$1 $2\" in\n\
                  'network inspect') echo \"Error: No such network: $5\" >&2; exit 1 ;;\n\
                  'network create') echo 'Error response from daemon: injected' >&2; exit 1 ;;\n\
                  esac\n\
                  echo \"fake docker: unexpected $*\" >&2; exit 2\n";
    let path = dir.join("docker");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn files_in(dir: &TempDir) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            Some((
                e.file_name().into_string().ok()?,
                std::fs::read_to_string(e.path()).ok()?,
            ))
        })
        .collect();
    files.sort();
    files
}

/// Hosts .10-.12 and containers .100-.110 of 192.0.2.0/24, under a fresh prefix.
fn pools_defined(etcd: &Etcd) -> String {
    let p = unique_prefix("cn");
    host_range(&etcd.url, &p, "192.0.2.10/24", "192.0.2.12/24", "192.0.2.1");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.110/24");
    p
}

#[test]
fn a_failed_step_undoes_the_ones_before_it() {
    let etcd = Etcd::shared();
    let p = pools_defined(etcd);
    let ifcfg = TempDir::new("cn-undo");
    std::fs::write(ifcfg.join("ifcfg-eth1"), "DEVICE=eth1\nONBOOT=yes\n").unwrap();
    let (etcd_before, files_before) = (etcd.dump(&p), files_in(&ifcfg));
    let docker = fake_docker();
    let dir = ifcfg.0.to_str().unwrap();
    let args = ["--ifcfg-dir", dir, "--interface", "eth1", "--no-restart"];
    let out = create_network(etcd, &p, Docker::Fake(&docker), &args);
    fails(out, 1, "docker network create failed");
    let with_ip = [&args[..], &["--ip", "192.0.2.11"]].concat();
    let out = create_network(etcd, &p, Docker::Fake(&docker), &with_ip);
    fails(out, 1, "undone: released host address 192.0.2.11");
    assert_eq!(etcd.dump(&p), etcd_before);
    assert_eq!(files_in(&ifcfg), files_before);
}

#[test]
fn refusals_change_nothing() {
    let etcd = Etcd::shared();
    let p = pools_defined(etcd);
    let ifcfg = TempDir::new("cn-refuse");
    std::fs::write(ifcfg.join("ifcfg-br0"), "DEVICE=br0\nIPADDR=203.0.113.9\n").unwrap();
    let (etcd_before, files_before) = (etcd.dump(&p), files_in(&ifcfg));
    let dir = ifcfg.0.to_str().unwrap();
    let fake = fake_docker();
    let docker = || Docker::Fake(&fake);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--ifcfg-dir", "/nonexistent/ifcfg", "--interface", "eth1"],
            "is not a directory",
        ),
        (
            &[
                "--ifcfg-dir",
                dir,
                "--interface",
                "eth1",
                "--ip",
                "198.51.100.7",
            ],
            "not in the address pool",
        ),
        // The dry run refuses what the real run would, instead of saying "would take".
        (
            &[
                "--ifcfg-dir",
                dir,
                "--interface",
                "eth1",
                "--ip",
                "198.51.100.7",
                "--dry-run",
            ],
            "not in the address pool",
        ),
        (
            &[
                "--ifcfg-dir",
                dir,
                "--interface",
                "eth1",
                "--ip",
                "192.0.2.1",
                "--dry-run",
            ],
            "192.0.2.1 is not in the address pool of 192.0.2.0/24",
        ),
        (
            &[
                "--ifcfg-dir",
                dir,
                "--interface",
                "eth1",
                "--ip",
                "192.0.2.11",
            ],
            "exists with other content; use --force",
        ),
    ];
    for (args, needle) in cases {
        fails(create_network(etcd, &p, docker(), args), 1, needle);
    }
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
    assert_eq!(files_in(&ifcfg), files_before);
}

#[test]
fn dry_run_prints_every_step_and_changes_nothing() {
    let etcd = Etcd::shared();
    let p = pools_defined(etcd);
    let ifcfg = TempDir::new("cn-dry");
    let before = etcd.dump(&p);
    let docker = fake_docker();
    let out = ok(create_network(
        etcd,
        &p,
        Docker::Fake(&docker),
        &[
            "--ifcfg-dir",
            ifcfg.0.to_str().unwrap(),
            "--interface",
            "eth1",
            "--dry-run",
            "--ip",
            "192.0.2.12",
        ],
    ));
    for step in [
        "would take 192.0.2.12 from the host pool",
        "--ipam-driver=talkingdata --subnet=192.0.2.0/24 --gateway=<host address> --aux-address=DefaultGatewayIPv4=192.0.2.1 mynet",
        "would write",
        "would add BRIDGE=br0 to",
        "systemctl restart network",
    ] {
        assert!(out.contains(step), "dry run does not say {step:?}:\n{out}");
    }
    assert_eq!(etcd.dump(&p), before);
    assert!(files_in(&ifcfg).is_empty());
}

/// Whether the network exists is not known while Docker cannot be asked: the run, and the dry
/// run with it, are refused before anything changes, and the error names the cause.
#[test]
fn a_docker_that_cannot_be_asked_is_refused_before_any_change() {
    let etcd = Etcd::shared();
    let p = pools_defined(etcd);
    let ifcfg = TempDir::new("cn-no-docker");
    let (etcd_before, files_before) = (etcd.dump(&p), files_in(&ifcfg));
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
    assert_eq!(files_in(&ifcfg), files_before);
}
