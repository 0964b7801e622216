//! Upgrading from the original tool, against a real etcd that serves the v2 API with the
//! original's own key dump replayed into it: blind pool definitions are refused until
//! `migrate-v2` has run; the migration writes once and then changes nothing; the plugin never
//! hands out what the original assigned and hands out everything else; `create-network`
//! adopts a host address the original gave this host; the original's command lines work.

mod common;

use common::{
    cli, fails, ip_range, ok, original_v2_dump, stderr, unique_prefix, Etcd, PluginClient, Server,
    TempDir, BIN,
};
use std::collections::BTreeSet;
use std::process::Command;

const PREFIX: &str = "/talkingdata";

/// An etcd with the v2 API holding what the original wrote (the fixture), and no v3 keys.
fn replayed(tag: &str) -> Etcd {
    let etcd = Etcd::start_v2(tag);
    for (key, value) in original_v2_dump() {
        etcd.v2_put(&key, &value);
    }
    assert!(etcd.dump(PREFIX).is_empty());
    etcd
}

fn mac(i: usize) -> String {
    format!("02:42:c0:00:{:02x}:{:02x}", i / 256, i % 256)
}

/// Takes random addresses of `pool_id` until the pool is exhausted; the addresses got.
fn drain(client: &mut PluginClient, pool_id: &str) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    for i in 0..300 {
        let body = format!(
            r#"{{"PoolID":"{pool_id}","Address":"","Options":{{"com.docker.network.endpoint.macaddress":"{}"}}}}"#,
            mac(i)
        );
        let reply = client.call("/IpamDriver.RequestAddress", &body);
        if reply.status != 200 {
            let err = reply.json()["Err"].as_str().unwrap_or_default().to_string();
            assert!(err.starts_with("no free address left"), "{err}");
            return got;
        }
        let addr = reply.json()["Address"].as_str().unwrap().to_string();
        let bare = addr.split('/').next().unwrap().to_string();
        assert!(got.insert(bare), "{addr} handed out twice");
    }
    panic!("pool {pool_id} never ran out");
}

fn addrs(net: &str, last_octets: impl IntoIterator<Item = u32>) -> BTreeSet<String> {
    last_octets
        .into_iter()
        .map(|i| format!("{net}.{i}"))
        .collect()
}

#[test]
fn the_originals_pools_migrate_once_and_what_it_assigned_stays_taken() {
    let etcd = replayed("upgrade-migrate");
    let url = etcd.url.as_str();
    let v2_before = etcd.v2_get(PREFIX);

    // Before the migration, defining the pools again or serving them is refused.
    let blind = [
        "ip-range",
        "--ip-start",
        "192.0.2.100/24",
        "--ip-end",
        "192.0.2.119/24",
    ];
    fails(
        cli(url, PREFIX, &blind),
        1,
        "the original's etcd v2 data defines this network (/talkingdata/containers/192.0.2.0): \
         run 'oam-docker-ipam migrate-v2'",
    );
    let hosts = [
        "host-range",
        "--ip-start",
        "192.0.2.50/24",
        "--ip-end",
        "192.0.2.59/24",
        "--gateway",
        "192.0.2.1",
    ];
    fails(cli(url, PREFIX, &hosts), 1, "(/talkingdata/hosts): run");
    // Nor under another mask that overlaps it.
    let wider = [
        "ip-range",
        "--ip-start",
        "192.0.2.100/22",
        "--ip-end",
        "192.0.2.102/22",
    ];
    fails(
        cli(url, PREFIX, &wider),
        1,
        "(/talkingdata/containers/192.0.2.0): run",
    );
    let dir = TempDir::new("upgrade-sock");
    let socket = dir.join("talkingdata.sock");
    {
        let _server = Server::start(url, PREFIX, &socket);
        let reply = PluginClient::connect(&socket)
            .call("/IpamDriver.RequestPool", r#"{"Pool":"192.0.2.0/24"}"#);
        assert_eq!(reply.status, 404, "{}", reply.body);
        assert!(
            reply.body.contains("run 'oam-docker-ipam migrate-v2'"),
            "{}",
            reply.body
        );
    }
    assert!(etcd.dump(PREFIX).is_empty());

    let dry = ok(cli(url, PREFIX, &["migrate-v2", "--dry-run"]));
    for line in [
        "host pool 192.0.2.0/24: 9 free and 1 assigned to write, 0 already in etcd v3",
        "container pool 192.0.2.0/24: 17 free and 3 assigned to write",
        "container pool 198.51.100.0/24: 4 free and 1 assigned to write",
        "dry run: nothing written",
    ] {
        assert!(dry.contains(line), "no {line:?} in:\n{dry}");
    }
    assert!(etcd.dump(PREFIX).is_empty());

    let first = ok(cli(url, PREFIX, &["migrate-v2"]));
    assert!(
        first.contains("wrote 3 config(s), 30 free and 5 assigned address(es)"),
        "{first}"
    );
    assert!(
        first.contains("checked container pool 192.0.2.0/24 in etcd v3: 17 free, 3 assigned"),
        "{first}"
    );
    let migrated = etcd.dump(PREFIX);
    let original = original_v2_dump();
    assert_eq!(migrated.len(), original.len() + 1, "{migrated:?}");
    for (key, value) in &original {
        let got = migrated
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{key} was not migrated"));
        if key.contains("/assigned/") {
            let owner: serde_json::Value = serde_json::from_str(&got.1).unwrap();
            assert_eq!(owner["RecordedBy"], "original", "{key}: {}", got.1);
        } else {
            assert_eq!(&got.1, value, "{key}");
        }
    }
    assert!(migrated
        .iter()
        .any(|(k, _)| k == "/talkingdata/migrated-v2"));
    assert_eq!(etcd.v2_get(PREFIX), v2_before, "the v2 data changed");

    let second = ok(cli(url, PREFIX, &["migrate-v2"]));
    assert!(second.contains("nothing to migrate"), "{second}");
    assert_eq!(etcd.dump(PREFIX), migrated, "a second run changed etcd");

    let again = ip_range(url, PREFIX, "192.0.2.100/24", "192.0.2.119/24");
    assert!(
        again.contains("0 added, 17 already in the pool, 3 in use"),
        "{again}"
    );

    let _server = Server::start(url, PREFIX, &socket);
    let mut client = PluginClient::connect(&socket);
    for pool in ["192.0.2.0/24", "198.51.100.0/24"] {
        let body = format!(r#"{{"Pool":"{pool}"}}"#);
        let reply = client.call("/IpamDriver.RequestPool", &body);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    for (pool, held) in [
        ("192.0.2.0", "192.0.2.101"),
        ("198.51.100.0", "198.51.100.12"),
    ] {
        let body = format!(
            r#"{{"PoolID":"{pool}","Address":"{held}","Options":{{"com.docker.network.endpoint.macaddress":"02:42:00:00:00:01"}}}}"#
        );
        let reply = client.call("/IpamDriver.RequestAddress", &body);
        assert_eq!(reply.status, 500, "{}", reply.body);
        assert!(
            reply
                .body
                .contains("in use by a container of the original tool"),
            "{}",
            reply.body
        );
    }
    assert_eq!(drain(&mut client, "192.0.2.0"), addrs("192.0.2", 103..=119));
    assert_eq!(
        drain(&mut client, "198.51.100.0"),
        addrs("198.51.100", [10, 11, 13, 14])
    );
}

#[test]
fn a_v3_pool_defined_blindly_beside_the_v2_data_is_named_and_nothing_written() {
    let etcd = replayed("upgrade-blind");
    // What the previous version's ip-range wrote, unaware of the v2 data.
    etcd.put(
        "/talkingdata/containers/192.0.2.0/config",
        r#"{"Ipnet":"192.0.2.0","Mask":"24"}"#,
    );
    for i in 100..=119 {
        etcd.put(
            &format!("/talkingdata/containers/192.0.2.0/pool/192.0.2.{i}"),
            "",
        );
    }
    let before = etcd.dump(PREFIX);
    let out = cli(&etcd.url, PREFIX, &["migrate-v2"]);
    let said = common::stdout(&out);
    for i in 100..=102 {
        let key = format!("disagrees: /talkingdata/containers/192.0.2.0/pool/192.0.2.{i}: free");
        assert!(said.contains(&key), "no {key:?} in:\n{said}");
    }
    fails(out, 1, "refusing to migrate: 3 key(s) disagree");
    assert_eq!(etcd.dump(PREFIX), before);
}

#[test]
fn an_etcd_without_the_v2_api_is_named() {
    let etcd = Etcd::shared();
    let p = unique_prefix("upgrade-nov2");
    fails(
        cli(&etcd.url, &p, &["migrate-v2"]),
        1,
        "etcd does not serve its v2 API",
    );
    // Nothing can be checked there: pools are defined as usual, with a warning.
    let out = cli(
        &etcd.url,
        &p,
        &[
            "ip-range",
            "--ip-start",
            "192.0.2.100/24",
            "--ip-end",
            "192.0.2.102/24",
        ],
    );
    assert!(
        common::stderr(&out)
            .contains("whether the original tool defined this network there cannot be checked"),
        "{}",
        common::stderr(&out)
    );
    assert!(ok(out).contains("3 added"));
}

/// A host in a network namespace: a bridge carrying `cidr`, and a veth pair to the root
/// namespace (203.0.113.1 there, 203.0.113.2 inside) so that it reaches an etcd that also
/// listens on 203.0.113.1. Removed on drop, the veth with it.
struct Netns(String);

impl Netns {
    fn host(name: &str, bridge: &str, cidr: &str) -> Netns {
        let ns = Netns(format!("{name}-{}", std::process::id()));
        let veth = format!("oamv{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
        };
        ip(&["netns", "add", &ns.0]);
        ip(&["-n", &ns.0, "link", "add", bridge, "type", "bridge"]);
        ip(&["-n", &ns.0, "addr", "add", cidr, "dev", bridge]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "up0", "netns", &ns.0,
        ]);
        ip(&["addr", "add", "203.0.113.1/30", "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &ns.0, "addr", "add", "203.0.113.2/30", "dev", "up0"]);
        ip(&["-n", &ns.0, "link", "set", "up0", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth, and so the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn create_network_over_the_originals_host_address_changes_nothing_while_docker_is_down() {
    let ns = Netns::host("oamadopt", "br0", "192.0.2.54/24");
    let etcd = Etcd::start_v2_also_on("upgrade-adopt", "203.0.113.1");
    for (key, value) in original_v2_dump() {
        etcd.v2_put(&key, &value);
    }
    ok(cli(&etcd.url, PREFIX, &["migrate-v2"]));
    let inside_url = etcd.also_url().unwrap();
    let ifcfg = TempDir::new("upgrade-adopt");
    let dead_docker = format!("unix://{}", ifcfg.join("no-docker.sock").display());
    let create = |netns: Option<&str>, extra: &[&str]| {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let url = if netns.is_some() {
            &inside_url
        } else {
            &etcd.url
        };
        command
            .args(["--cluster-store", url, "create-network"])
            .args(["--ifcfg-dir", ifcfg.0.to_str().unwrap()])
            .args(["--interface", "eth1", "--no-restart"])
            .args(extra)
            .env("DOCKER_HOST", &dead_docker)
            .output()
            .expect("run create-network")
    };
    let before = etcd.dump(PREFIX);

    // This host's br0 carries .54, but whether Docker's network exists is not known while
    // Docker cannot be asked: refused before the adoption, in the run and the dry run alike.
    // (Adopting it is unit-tested in network.rs, with a fake host.)
    let out = create(Some(&ns.0), &["--ip", "192.0.2.54"]);
    fails(out, 1, "cannot ask Docker about network mynet");
    assert_eq!(etcd.dump(PREFIX), before);
    let out = create(Some(&ns.0), &["--dry-run"]);
    fails(out, 1, "cannot ask Docker about network mynet");

    let out = create(None, &["--ip", "192.0.2.54", "--bridge", "oamnobr0"]);
    fails(out, 1, "cannot ask Docker about network mynet");
    assert_eq!(etcd.dump(PREFIX), before);
}

#[test]
fn the_originals_command_lines_work() {
    let etcd = Etcd::shared();
    let p = unique_prefix("upgrade-cli");
    let run = |args: &[&str], env_debug: Option<&str>| {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env_remove("CLUSTER_STORE")
            .env_remove("DEBUG");
        if let Some(debug) = env_debug {
            command.env("DEBUG", debug);
        }
        command.output().expect("run the binary")
    };
    let store = format!("-cluster-store={}", etcd.url);
    let prefix = format!("-store-prefix={p}");
    let hosts = [
        store.as_str(),
        &prefix,
        "-debug",
        "host-range",
        "-ip-start",
        "192.0.2.10/24",
        "-ip-end",
        "192.0.2.12/24",
        "-gateway",
        "192.0.2.1",
    ];
    assert!(ok(run(&hosts, None)).contains("3 added"));
    let containers = [
        store.as_str(),
        &prefix,
        "ip-range",
        "-ip-start=192.0.2.100/24",
        "-ip-end=192.0.2.102/24",
    ];
    let out = run(&containers, Some("verbose"));
    assert!(
        stderr(&out).contains("ignoring DEBUG=\"verbose\" from DEBUG in the environment"),
        "{}",
        stderr(&out)
    );
    assert!(ok(out).contains("3 added"));

    let before = etcd.dump(&p);
    let release = |ip: &str| run(&[store.as_str(), &prefix, "release-host", "--ip", ip], None);
    assert!(ok(release("192.0.2.10/24")).contains("already free"));
    fails(
        release("192.0.2.10/25"),
        1,
        "192.0.2.10/25 does not match the hosts' subnet 192.0.2.0/24",
    );
    let wrong_mask = [
        store.as_str(),
        &prefix,
        "release-ip",
        "--ip",
        "192.0.2.100/25",
    ];
    fails(
        run(&wrong_mask, None),
        1,
        "does not match the container pool 192.0.2.0/24",
    );
    assert_eq!(etcd.dump(&p), before);

    let version = ok(run(&["-v"], None));
    assert_eq!(
        version.trim(),
        format!("oam-docker-ipam {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(ok(run(&["h", "ip-range"], None))
        .starts_with("Usage: oam-docker-ipam [GLOBAL FLAGS] ip-range"));
    assert!(ok(run(&["help"], None)).contains("migrate-v2"));
}
