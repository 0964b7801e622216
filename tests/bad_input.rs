//! Input that the plugin and the command line refuse, against a real etcd, each leaving etcd
//! as it was: container requests without a MAC, ranges with nothing to pool, a release with
//! the wrong mask, credentials in endpoint URLs (never echoed) and impossible ports.

mod common;

use common::{cli, fails, ip_range, unique_prefix, Etcd, PluginClient, Server, TempDir, BIN};
use std::process::Command;

#[test]
fn container_requests_without_a_mac_are_refused() {
    let etcd = Etcd::shared();
    let p = unique_prefix("bad-mac");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.110/24");
    let before = etcd.dump(&p);
    let dir = TempDir::new("bad-mac");
    let socket = dir.join("talkingdata.sock");
    let _server = Server::start(&etcd.url, &p, &socket);
    let mut client = PluginClient::connect(&socket);
    // Two such requests for one --ip would both have succeeded, told apart by nothing.
    for _ in 0..2 {
        let body = r#"{"PoolID":"192.0.2.0","Address":"192.0.2.105","Options":{"x":"y"}}"#;
        let reply = client.call("/IpamDriver.RequestAddress", body);
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert!(
            reply.body.contains("must carry its MAC address"),
            "{}",
            reply.body
        );
    }
    let reply = client.call(
        "/IpamDriver.RequestAddress",
        r#"{"PoolID":"192.0.2.0","Address":"","Options":null}"#,
    );
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(!reply.body.contains("aux"), "{}", reply.body);
    assert_eq!(etcd.dump(&p), before);
}

#[test]
fn the_command_line_refuses_what_would_do_nothing_useful_and_changes_nothing() {
    let etcd = Etcd::shared();
    let p = unique_prefix("bad-cli");
    ip_range(&etcd.url, &p, "192.0.2.100/24", "192.0.2.110/24");
    let before = etcd.dump(&p);
    let only_broadcast = [
        "ip-range",
        "--ip-start",
        "198.51.100.255/24",
        "--ip-end",
        "198.51.100.255/24",
    ];
    fails(
        cli(&etcd.url, &p, &only_broadcast),
        1,
        "the range holds no address to pool",
    );
    fails(
        cli(&etcd.url, &p, &["release-ip", "--ip", "192.0.2.105/25"]),
        1,
        "192.0.2.105/25 does not match the container pool 192.0.2.0/24",
    );
    assert_eq!(etcd.dump(&p), before);

    let run = |store: &str| {
        Command::new(BIN)
            .args(["--cluster-store", store, "ip-range"])
            .args(["--ip-start", "192.0.2.100/24", "--ip-end", "192.0.2.110/24"])
            .output()
            .expect("run the binary")
    };
    let out = run("http://root:s3cret@127.0.0.1:2379");
    assert!(
        !common::stderr(&out).contains("s3cret"),
        "{}",
        common::stderr(&out)
    );
    fails(out, 2, "credentials do not belong in the URL");
    fails(
        run("http://127.0.0.1:abc"),
        2,
        "with a port from 1 to 65535",
    );
    fails(
        run("http://127.0.0.1:99999"),
        2,
        "with a port from 1 to 65535",
    );
}
