//! The command line against a real etcd: every pool command, the key layout byte for byte,
//! idempotence, and every error case leaving etcd unchanged.

mod common;

use common::{cli, fails, host_range, ip_range, ok, unique_prefix, Etcd, BIN};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn host_and_container_ranges_write_the_original_layout() {
    let etcd = Etcd::shared();
    let p = unique_prefix("layout");
    let out = host_range(&etcd.url, &p, "192.0.2.4/24", "192.0.2.6/24", "192.0.2.1");
    assert!(out.contains("3 added"), "{out}");
    let out = ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.102/24");
    assert!(out.contains("3 added"), "{out}");
    let want: Vec<(String, String)> = [
        (
            "containers/192.0.2.0/config",
            r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
        ),
        ("containers/192.0.2.0/pool/192.0.2.100", ""),
        ("containers/192.0.2.0/pool/192.0.2.101", ""),
        ("containers/192.0.2.0/pool/192.0.2.102", ""),
        (
            "hosts/config",
            r#"{"Subnet":"192.0.2.0/24","Gateway":"192.0.2.1"}"#,
        ),
        ("hosts/pool/192.0.2.4", ""),
        ("hosts/pool/192.0.2.5", ""),
        ("hosts/pool/192.0.2.6", ""),
    ]
    .iter()
    .map(|(k, v)| (format!("{p}/{k}"), v.to_string()))
    .collect();
    assert_eq!(etcd.dump(&format!("{p}/")), want);
}

#[test]
fn running_a_range_twice_changes_nothing_and_says_so() {
    let etcd = Etcd::shared();
    let p = unique_prefix("twice");
    let args = [
        "ip-range",
        "--ip-start",
        "198.51.100.0/24",
        "--ip-end",
        "198.51.100.255/24",
    ];
    let first = ok(cli(&etcd.url, &p, &args));
    assert!(
        first.contains("254 added") && first.contains("2 skipped"),
        "{first}"
    );
    let before = etcd.dump(&p);
    let again = ok(cli(&etcd.url, &p, &args));
    assert!(
        again.contains("0 added, 254 already in the pool"),
        "{again}"
    );
    assert_eq!(etcd.dump(&p), before);
}

#[test]
fn a_slash_16_goes_in_with_batches_and_a_second_run_finds_it_all() {
    let etcd = Etcd::shared();
    let p = unique_prefix("slash16");
    let args = [
        "ip-range",
        "--ip-start",
        "198.18.0.0/16",
        "--ip-end",
        "198.18.255.255/16",
    ];
    // On a terminal (script(1) gives it one) the long run counts its progress on stderr.
    let mut command = vec![BIN.to_string()];
    command.extend(
        common::store_args(&etcd.url, &p)
            .iter()
            .map(|a| a.to_string()),
    );
    command.extend(args.iter().map(|a| a.to_string()));
    let first = ok(Command::new("script")
        .args(["-qec", &command.join(" "), "/dev/null"])
        .output()
        .expect("script(1) from util-linux"));
    assert!(first.contains("65534 added"), "{first}");
    assert!(
        first.contains("pooling container addresses: 65534/65534 (100%)"),
        "no progress shown: {first}"
    );
    let again = ok(cli(&etcd.url, &p, &args));
    assert!(
        again.contains("0 added, 65534 already in the pool"),
        "{again}"
    );
}

#[test]
fn release_moves_an_address_back_in_one_step() {
    let etcd = Etcd::shared();
    let p = unique_prefix("release");
    ip_range(&etcd.url, &p, "192.0.2.10/24", "192.0.2.12/24");
    // Take one the way the plugin does: the key moves from pool/ to assigned/.
    let assigned = format!("{p}/containers/192.0.2.0/assigned/192.0.2.11");
    etcd.put(
        &assigned,
        r#"{"Role":"container","Host":"h9","Mac":"02:42:00:00:00:09","Since":"x"}"#,
    );
    etcd.delete(&format!("{p}/containers/192.0.2.0/pool/192.0.2.11"));

    // A container's address is only released with --force (issue 11).
    let held = etcd.dump(&p);
    fails(
        cli(&etcd.url, &p, &["release-ip", "--ip", "192.0.2.11/24"]),
        1,
        "192.0.2.11 is held by host h9 (mac 02:42:00:00:00:09); nothing changed",
    );
    assert_eq!(etcd.dump(&p), held);
    let out = ok(cli(
        &etcd.url,
        &p,
        &["release-ip", "--ip", "192.0.2.11/24", "--force"],
    ));
    assert!(
        out.contains("released 192.0.2.11") && out.contains("h9"),
        "{out}"
    );
    let keys: Vec<String> = etcd.dump(&p).into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&format!("{p}/containers/192.0.2.0/pool/192.0.2.11")));
    assert!(!keys.contains(&assigned));

    let before = etcd.dump(&p);
    let out = ok(cli(&etcd.url, &p, &["release-ip", "--ip", "192.0.2.11/24"]));
    assert!(out.contains("not assigned"), "{out}");
    fails(
        cli(&etcd.url, &p, &["release-ip", "--ip", "192.0.2.99/24"]),
        1,
        "neither free nor assigned",
    );
    assert_eq!(etcd.dump(&p), before);
}

#[test]
fn release_host_gives_a_host_address_back() {
    let etcd = Etcd::shared();
    let p = unique_prefix("relhost");
    host_range(
        &etcd.url,
        &p,
        "203.0.113.10/24",
        "203.0.113.11/24",
        "203.0.113.1",
    );
    etcd.put(&format!("{p}/hosts/assigned/203.0.113.12"), "");
    let out = ok(cli(
        &etcd.url,
        &p,
        &["release-host", "--ip", "203.0.113.12"],
    ));
    assert!(out.contains("released 203.0.113.12"), "{out}");
    let keys: Vec<String> = etcd.dump(&p).into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&format!("{p}/hosts/pool/203.0.113.12")));
    assert!(!keys.iter().any(|k| k.contains("/hosts/assigned/")));
}

#[test]
fn every_bad_input_is_one_line_and_changes_nothing() {
    let etcd = Etcd::shared();
    let p = unique_prefix("bad");
    host_range(&etcd.url, &p, "192.0.2.4/24", "192.0.2.6/24", "192.0.2.1");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.110/24");
    let before = etcd.dump(&p);
    // Each case: the command line, and what its one-line error must say.
    let usage = [
        (
            "ip-range --ip-start 192.0.2.1 --ip-end 192.0.2.9/24",
            "not an IPv4 address with a prefix",
        ),
        (
            "ip-range --ip-start 192.0.2.1/24 --ip-end 192.0.2.9/25",
            "different prefix lengths",
        ),
        (
            "ip-range --ip-start 192.0.2.9/24 --ip-end 192.0.2.1/24",
            "comes after",
        ),
        (
            "ip-range --ip-start 2001:db8::1/64 --ip-end 2001:db8::9/64",
            "IPv6",
        ),
        ("ip-range --ip-start 192.0.2.1/24", "needs --ip-end"),
        (
            "host-range --ip-start 192.0.2.1/24 --ip-end 192.0.2.9/24 --gateway nope",
            "not an IPv4 address",
        ),
        ("release-ip --ip 192.0.2.255/24", "broadcast"),
        ("frobnicate", "unknown command"),
        (
            "ip-range --ip-start 192.0.2.1/24 --ip-end 192.0.2.9/24 --bogus x",
            "--bogus",
        ),
    ];
    for (line, needle) in usage {
        let args: Vec<&str> = line.split_whitespace().collect();
        fails(cli(&etcd.url, &p, &args), 2, needle);
    }
    let runtime = [
        (
            "ip-range --ip-start 192.0.2.5/24 --ip-end 192.0.2.20/24",
            "overlaps the host range",
        ),
        (
            "ip-range --ip-start 192.0.2.100/25 --ip-end 192.0.2.110/25",
            "already holds",
        ),
        (
            "host-range --ip-start 192.0.2.100/24 --ip-end 192.0.2.105/24 --gateway 192.0.2.1",
            "overlaps the container pool",
        ),
        (
            "host-range --ip-start 192.0.2.7/24 --ip-end 192.0.2.8/24 --gateway 192.0.2.2",
            "already holds",
        ),
        (
            "host-range --ip-start 192.0.2.7/24 --ip-end 192.0.2.8/24 --gateway 198.51.100.1",
            "not a host address",
        ),
    ];
    for (line, needle) in runtime {
        let args: Vec<&str> = line.split_whitespace().collect();
        fails(cli(&etcd.url, &p, &args), 1, needle);
    }
    assert_eq!(etcd.dump(&p), before);
}

#[test]
fn an_unreachable_etcd_fails_clearly_within_the_timeout() {
    let p = unique_prefix("down");
    // A port nothing listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let out = cli(
        &format!("http://127.0.0.1:{port}"),
        &p,
        &[
            "ip-range",
            "--ip-start",
            "192.0.2.1/24",
            "--ip-end",
            "192.0.2.2/24",
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    fails(out, 1, "etcd unreachable");
}

#[test]
fn a_dead_first_endpoint_fails_over_to_the_second() {
    let etcd = Etcd::shared();
    let p = unique_prefix("failover");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The full-width comma of the original's examples separates the endpoints.
    let endpoints = format!("http://127.0.0.1:{port}，{}", etcd.url);
    let out = ip_range(&endpoints, &p, "192.0.2.1/24", "192.0.2.3/24");
    assert!(out.contains("3 added"), "{out}");
    assert_eq!(etcd.dump(&p).len(), 4);
}

#[test]
fn help_and_version() {
    let out = ok(std::process::Command::new(common::BIN)
        .arg("--help")
        .output()
        .unwrap());
    for command in [
        "server",
        "ip-range",
        "release-ip",
        "host-range",
        "release-host",
        "create-network",
    ] {
        assert!(out.contains(command), "--help does not list {command}");
        let help = ok(std::process::Command::new(common::BIN)
            .args([command, "--help"])
            .output()
            .unwrap());
        assert!(
            help.contains(&format!("] {command}")),
            "{command} --help: {help}"
        );
    }
    let version = ok(std::process::Command::new(common::BIN)
        .arg("--version")
        .output()
        .unwrap());
    assert_eq!(
        version.trim(),
        format!("oam-docker-ipam {}", env!("CARGO_PKG_VERSION"))
    );
    let none = std::process::Command::new(common::BIN).output().unwrap();
    fails(none, 2, "no command given");
}
