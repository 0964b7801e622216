//! Day-2 operations against a real etcd and the real plugin process: `show --json`, `check`
//! on a consistent and a broken store, guarded releases, gateway reservations freed by the
//! host that made them, host identities surviving a rename, and shrinking ranges. Every
//! refusal leaves etcd as it was.

mod common;

use common::{
    cli, fails, host_range, ip_range, ok, stdout, unique_prefix, Etcd, PluginClient, Server,
    TempDir, BIN,
};
use serde_json::Value;
use std::process::Command;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// A plugin whose host identity is `id`.
fn server(etcd: &Etcd, p: &str, dir: &TempDir, id: &str) -> (Server, PluginClient) {
    let socket = dir.join("talkingdata.sock");
    let mut command = Command::new(BIN);
    command.env("HOST_ID", id);
    let server = Server::start_with(command, &etcd.url, p, &socket, &socket);
    let client = PluginClient::connect(&socket);
    (server, client)
}

fn request(client: &mut PluginClient, addr: &str, mac: &str) -> String {
    let body = format!(
        r#"{{"PoolID":"192.0.2.0","Address":"{addr}","Options":{{"com.docker.network.endpoint.macaddress":"{mac}"}}}}"#
    );
    let reply = client.call("/IpamDriver.RequestAddress", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let got = reply.json()["Address"].as_str().unwrap().to_string();
    got.trim_end_matches("/24").to_string()
}

fn release(client: &mut PluginClient, addr: &str) {
    let body = format!(r#"{{"PoolID":"192.0.2.0","Address":"{addr}"}}"#);
    assert_eq!(client.call("/IpamDriver.ReleaseAddress", &body).status, 200);
}

fn json(o: std::process::Output) -> Value {
    let text = ok(o);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn show_lists_every_holder_and_check_names_what_is_broken() {
    let etcd = Etcd::shared();
    let p = unique_prefix("show");
    host_range(&etcd.url, &p, "192.0.2.10/24", "192.0.2.20/24", "192.0.2.1");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.120/24");
    let dir = TempDir::new("show");
    let (_server, mut client) = server(etcd, &p, &dir, "id-show");
    // Fixed addresses: the inconsistency injected below must not hit one of them.
    let a = request(&mut client, "192.0.2.104", "02:42:c0:00:02:01");
    let b = request(&mut client, "192.0.2.110", "02:42:c0:00:02:02");
    let gw = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.120","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#;
    assert_eq!(client.call("/IpamDriver.RequestAddress", gw).status, 200);

    let before = etcd.dump(&p);
    let view = json(cli(&etcd.url, &p, &["show", "--json"]));
    let pools = view["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2, "{view}");
    assert_eq!(pools[0]["kind"], "hosts");
    assert_eq!(pools[0]["gateway"], "192.0.2.1");
    assert_eq!(
        (pools[0]["size"].as_u64(), pools[0]["free"].as_u64()),
        (Some(11), Some(11))
    );
    let c = &pools[1];
    assert_eq!(c["id"], "192.0.2.0");
    assert_eq!(c["network"], "192.0.2.0/24");
    assert_eq!(
        (c["first"].as_str(), c["last"].as_str()),
        (Some("192.0.2.100"), Some("192.0.2.120"))
    );
    assert_eq!(
        (
            c["size"].as_u64(),
            c["free"].as_u64(),
            c["containers"].as_u64(),
            c["reserved"].as_u64()
        ),
        (Some(21), Some(18), Some(2), Some(1))
    );
    let listed = c["addresses"].as_array().unwrap();
    for (addr, mac) in [(&a, "02:42:c0:00:02:01"), (&b, "02:42:c0:00:02:02")] {
        let entry = listed
            .iter()
            .find(|e| e["address"] == addr.as_str())
            .unwrap();
        assert_eq!(entry["state"], "assigned");
        assert_eq!(entry["role"], "container");
        assert_eq!(entry["mac"], mac);
        assert_eq!(entry["host"], hostname().as_str());
        assert_eq!(entry["host_id"], "id-show");
        assert_eq!(entry["recorded_by"], "oam-docker-ipam");
        assert_eq!(
            entry["key"],
            format!("{p}/containers/192.0.2.0/assigned/{addr}").as_str()
        );
    }

    let one = json(cli(&etcd.url, &p, &["show", "--json", "--ip", &b]));
    assert_eq!(one["pools"].as_array().unwrap().len(), 1);
    assert_eq!(one["pools"][0]["addresses"][0]["mac"], "02:42:c0:00:02:02");
    let text = ok(cli(&etcd.url, &p, &["show", "192.0.2.0/24"]));
    assert!(
        text.contains(&b) && text.contains("02:42:c0:00:02:02"),
        "{text}"
    );
    let nowhere = ok(cli(&etcd.url, &p, &["show", "--ip", "203.0.113.9"]));
    assert_eq!(nowhere.trim(), "203.0.113.9 is in no pool");
    fails(
        cli(&etcd.url, &p, &["show", "198.51.100.0/24"]),
        1,
        "no pool 198.51.100.0 in etcd",
    );
    fails(
        cli(&etcd.url, &p, &["show", "192.0.2.0/25"]),
        1,
        "does not match the container pool 192.0.2.0/24",
    );
    fails(
        cli(&etcd.url, &p, &["show", "mynet"]),
        2,
        "expected hosts, a network",
    );

    let checked = ok(cli(&etcd.url, &p, &["check"]));
    assert!(
        checked.contains("ok: 2 pool(s), 32 address key(s)"),
        "{checked}"
    );
    assert!(
        checked.contains("192.0.2.120 is the gateway of Docker network 192.0.2.0/24"),
        "{checked}"
    );
    assert_eq!(etcd.dump(&p), before, "show and check changed etcd");

    // Inject inconsistencies as a hand edit would: an assigned address also free, the hosts'
    // gateway pooled, an owner record that does not parse.
    let free_too = format!("{p}/containers/192.0.2.0/pool/{a}");
    let gateway_pooled = format!("{p}/hosts/pool/192.0.2.1");
    let garbage = format!("{p}/containers/192.0.2.0/assigned/192.0.2.101");
    etcd.put(&free_too, "");
    etcd.put(&gateway_pooled, "");
    etcd.delete(&format!("{p}/containers/192.0.2.0/pool/192.0.2.101"));
    etcd.put(&garbage, "{not json");
    let broken = etcd.dump(&p);
    let out = cli(&etcd.url, &p, &["check"]);
    let said = stdout(&out);
    fails(out, 1, "3 violation(s) found");
    for key in [&free_too, &gateway_pooled, &garbage] {
        assert!(
            said.lines().any(|l| l.starts_with(&format!("{key}: "))),
            "{key} not named:\n{said}"
        );
    }
    assert!(
        said.contains(&format!("{a} is free and assigned at once")),
        "{said}"
    );
    assert!(
        said.contains("the hosts' gateway 192.0.2.1 is pooled"),
        "{said}"
    );
    let out = cli(&etcd.url, &p, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["violations"].as_array().unwrap().len(), 3);
    assert_eq!(etcd.dump(&p), broken, "check changed etcd");
}

#[test]
fn guarded_releases_refuse_holders_and_force_frees_them() {
    let etcd = Etcd::shared();
    let p = unique_prefix("guard");
    host_range(&etcd.url, &p, "192.0.2.10/24", "192.0.2.20/24", "192.0.2.1");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.120/24");
    let dir = TempDir::new("guard");
    let (_server, mut client) = server(etcd, &p, &dir, "id-guard");
    let a = request(&mut client, "192.0.2.105", "02:42:c0:00:02:05");
    let before = etcd.dump(&p);
    let ip = format!("{a}/24");
    fails(
        cli(&etcd.url, &p, &["release-ip", "--ip", &ip]),
        1,
        &format!(
            "{a} is held by host {} (mac 02:42:c0:00:02:05); nothing changed (--force",
            hostname()
        ),
    );
    assert_eq!(etcd.dump(&p), before);
    let out = ok(cli(&etcd.url, &p, &["release-ip", "--ip", &ip, "--force"]));
    assert!(out.contains(&format!("released {a}")), "{out}");
    assert!(etcd
        .dump(&p)
        .contains(&(format!("{p}/containers/192.0.2.0/pool/{a}"), String::new())));

    let host_key = format!("{p}/hosts/assigned/192.0.2.12");
    etcd.delete(&format!("{p}/hosts/pool/192.0.2.12"));
    etcd.put(
        &host_key,
        r#"{"Role":"host","Host":"h7","Since":"2026-01-01T00:00:00Z"}"#,
    );
    let before = etcd.dump(&p);
    fails(
        cli(&etcd.url, &p, &["release-host", "--ip", "192.0.2.12"]),
        1,
        "192.0.2.12 is held by host h7 as its own address; nothing changed",
    );
    assert_eq!(etcd.dump(&p), before);
    ok(cli(
        &etcd.url,
        &p,
        &["release-host", "--ip", "192.0.2.12", "--force"],
    ));
    assert!(!etcd.dump(&p).iter().any(|(k, _)| *k == host_key));

    // A gateway reservation goes back when its host releases it; an aux one stays.
    let pool_before = etcd.dump(&format!("{p}/containers/"));
    let gw = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.111","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#;
    assert_eq!(client.call("/IpamDriver.RequestAddress", gw).status, 200);
    let aux = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.112","Options":null}"#;
    assert_eq!(client.call("/IpamDriver.RequestAddress", aux).status, 200);
    release(&mut client, "192.0.2.111");
    release(&mut client, "192.0.2.112");
    let after = etcd.dump(&format!("{p}/containers/"));
    assert!(after.contains(&(
        format!("{p}/containers/192.0.2.0/pool/192.0.2.111"),
        String::new()
    )));
    assert!(after
        .iter()
        .any(|(k, v)| k.ends_with("/assigned/192.0.2.112") && v.contains("\"aux\"")));
    ok(cli(
        &etcd.url,
        &p,
        &["release-ip", "--ip", "192.0.2.112/24"],
    ));
    assert_eq!(etcd.dump(&format!("{p}/containers/")), pool_before);
}

#[test]
fn a_renamed_host_still_releases_by_its_identity_and_old_records_by_name() {
    let etcd = Etcd::shared();
    let p = unique_prefix("identity");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.110/24");
    let dir = TempDir::new("identity");
    let (_server, mut client) = server(etcd, &p, &dir, "id-rename");
    let base = format!("{p}/containers/192.0.2.0");
    let records = [
        // Taken under the old name, same identity: released.
        (
            "192.0.2.101",
            r#"{"Role":"container","Host":"old-name","Mac":"02:42:00:00:00:01","Since":"x","HostId":"id-rename"}"#,
        ),
        // Another machine with this host's name: kept.
        (
            "192.0.2.102",
            &format!(
                r#"{{"Role":"container","Host":"{}","Mac":"02:42:00:00:00:02","Since":"x","HostId":"id-other"}}"#,
                hostname()
            ),
        ),
        // Written before identities, under this host's name: released, as before.
        (
            "192.0.2.103",
            &format!(
                r#"{{"Role":"container","Host":"{}","Mac":"02:42:00:00:00:03","Since":"x"}}"#,
                hostname()
            ),
        ),
        // Written before identities by another host: kept.
        (
            "192.0.2.104",
            r#"{"Role":"container","Host":"h9","Mac":"02:42:00:00:00:04","Since":"x"}"#,
        ),
    ];
    for (addr, value) in &records {
        etcd.delete(&format!("{base}/pool/{addr}"));
        etcd.put(&format!("{base}/assigned/{addr}"), value);
    }
    for (addr, _) in &records {
        release(&mut client, addr);
    }
    let dump = etcd.dump(&base);
    let free = |addr: &str| {
        dump.iter()
            .any(|(k, _)| *k == format!("{base}/pool/{addr}"))
    };
    assert!(free("192.0.2.101") && free("192.0.2.103"), "{dump:?}");
    assert!(!free("192.0.2.102") && !free("192.0.2.104"), "{dump:?}");
    let taken = request(&mut client, "192.0.2.101", "02:42:00:00:00:05");
    let record = etcd.dump(&format!("{base}/assigned/{taken}"));
    assert!(
        record[0].1.contains(r#""HostId":"id-rename""#),
        "{record:?}"
    );
    fails(
        cli(&etcd.url, &p, &["--host-id", "two words", "check"]),
        2,
        "--host-id",
    );
}

#[test]
fn ranges_shrink_only_by_free_addresses_and_the_gateway_changes_with_force() {
    let etcd = Etcd::shared();
    let p = unique_prefix("shrink");
    host_range(
        &etcd.url,
        &p,
        "198.51.100.10/24",
        "198.51.100.20/24",
        "198.51.100.1",
    );
    ip_range(&etcd.url, &p, "198.51.100.100/24", "198.51.100.200/24");
    let held = format!("{p}/containers/198.51.100.0/assigned/198.51.100.150");
    etcd.delete(&format!("{p}/containers/198.51.100.0/pool/198.51.100.150"));
    etcd.put(
        &held,
        r#"{"Role":"container","Host":"h1","Mac":"02:42:00:00:00:01","Since":"x"}"#,
    );
    let before = etcd.dump(&p);
    let remove = |start: &str, end: &str| {
        cli(
            &etcd.url,
            &p,
            &["ip-range", "--ip-start", start, "--ip-end", end, "--remove"],
        )
    };
    fails(
        remove("198.51.100.140/24", "198.51.100.160/24"),
        1,
        "1 address(es) of the range are in use: 198.51.100.150 (held by host h1 (mac 02:42:00:00:00:01))",
    );
    fails(
        remove("203.0.113.1/24", "203.0.113.9/24"),
        1,
        "no container pool 203.0.113.0/24 in etcd",
    );
    fails(
        cli(
            &etcd.url,
            &p,
            &[
                "host-range",
                "--ip-start",
                "198.51.100.10/24",
                "--ip-end",
                "198.51.100.12/24",
                "--gateway",
                "198.51.100.2",
                "--remove",
            ],
        ),
        1,
        "--gateway 198.51.100.2 is not the recorded gateway 198.51.100.1",
    );
    fails(
        cli(
            &etcd.url,
            &p,
            &[
                "host-range",
                "--ip-start",
                "198.51.100.10/24",
                "--ip-end",
                "198.51.100.20/24",
                "--gateway",
                "198.51.100.2",
            ],
        ),
        1,
        "already holds",
    );
    fails(
        cli(
            &etcd.url,
            &p,
            &[
                "host-range",
                "--ip-start",
                "198.51.100.10/24",
                "--ip-end",
                "198.51.100.20/24",
                "--gateway",
                "198.51.100.120",
                "--force",
            ],
        ),
        1,
        "gateway 198.51.100.120 is in the container pool",
    );
    assert_eq!(etcd.dump(&p), before);

    let out = ok(remove("198.51.100.151/24", "198.51.100.255/24"));
    assert!(out.contains("50 removed, 55 were not in the pool"), "{out}");
    let out = ok(remove("198.51.100.100/24", "198.51.100.149/24"));
    assert!(out.contains("50 removed"), "{out}");
    assert!(!out.contains("config"), "{out}");
    ok(cli(
        &etcd.url,
        &p,
        &["release-ip", "--ip", "198.51.100.150/24", "--force"],
    ));
    let out = ok(remove("198.51.100.0/24", "198.51.100.255/24"));
    assert!(
        out.contains(&format!("1 removed, 255 were not in the pool; no address is left, so {p}/containers/198.51.100.0/config was removed first")),
        "{out}"
    );
    assert!(etcd.dump(&format!("{p}/containers/")).is_empty());

    let out = ok(cli(
        &etcd.url,
        &p,
        &[
            "host-range",
            "--ip-start",
            "198.51.100.10/24",
            "--ip-end",
            "198.51.100.20/24",
            "--gateway",
            "198.51.100.15",
            "--force",
        ],
    ));
    assert!(
        out.contains(&format!("changed the hosts' gateway in {p}/hosts/config from 198.51.100.1 to 198.51.100.15; 198.51.100.15 was taken out of the host pool")),
        "{out}"
    );
    let hosts = etcd.dump(&format!("{p}/hosts/"));
    assert!(hosts.contains(&(
        format!("{p}/hosts/config"),
        r#"{"Subnet":"198.51.100.0/24","Gateway":"198.51.100.15"}"#.into()
    )));
    assert!(!hosts
        .iter()
        .any(|(k, _)| k.ends_with("/pool/198.51.100.15")));
    ok(cli(&etcd.url, &p, &["check"]));
    let out = ok(cli(
        &etcd.url,
        &p,
        &[
            "host-range",
            "--ip-start",
            "198.51.100.0/24",
            "--ip-end",
            "198.51.100.255/24",
            "--remove",
        ],
    ));
    assert!(
        out.contains("10 removed") && out.contains("hosts/config was removed first"),
        "{out}"
    );
    assert!(etcd.dump(&format!("{p}/")).is_empty());
}
