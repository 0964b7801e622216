//! create-network's refusals, dry run and rollback against a real etcd, with a Docker daemon
//! that cannot be reached (the end-to-end tests cover the successful path with real dockerd).

mod common;

use common::{fails, host_range, ip_range, ok, unique_prefix, Etcd, TempDir, BIN};
use std::process::{Command, Output};

fn create_network(etcd: &Etcd, prefix: &str, docker_host: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args([
            "--cluster-store",
            &etcd.url,
            "--store-prefix",
            prefix,
            "create-network",
        ])
        .args(args)
        .env("DOCKER_HOST", docker_host)
        .output()
        .expect("run the binary")
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
    let dead_docker = format!("unix://{}", ifcfg.join("no-docker.sock").display());
    let dir = ifcfg.0.to_str().unwrap();
    let args = ["--ifcfg-dir", dir, "--interface", "eth1", "--no-restart"];
    let out = create_network(etcd, &p, &dead_docker, &args);
    fails(out, 1, "docker network create failed");
    let with_ip = [&args[..], &["--ip", "192.0.2.11"]].concat();
    let out = create_network(etcd, &p, &dead_docker, &with_ip);
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
    let docker = "unix:///nonexistent/docker.sock";
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
        fails(create_network(etcd, &p, docker, args), 1, needle);
    }
    fails(
        create_network(
            etcd,
            &unique_prefix("cn-empty"),
            docker,
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
    let out = create_network(etcd, &hosts_only, docker, &["--ifcfg-dir", dir]);
    fails(out, 1, "no container pool 192.0.2.0/24 in etcd");
    assert_eq!(etcd.dump(&hosts_only), before_hosts_only);
    fails(
        create_network(etcd, &p, docker, &["--mtu", "12"]),
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
    let out = ok(create_network(
        etcd,
        &p,
        "unix:///nonexistent/docker.sock",
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
