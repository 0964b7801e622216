//! The plugin while its etcd stops answering (issue 9, items 4 and 5), against a real etcd
//! frozen with SIGSTOP: a change etcd applied without answering is answered from what etcd
//! holds, one never answered is undone once etcd answers, a release is finished then, and
//! requests queued behind a dead etcd fail fast instead of each waiting out the timeouts.

mod common;

use common::{ip_range, unique_prefix, Etcd, PluginClient, Server, TempDir};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const NET: &str = "192.0.2.0";

/// Freezes etcd; thaws it when dropped, so that a failing test never leaves it stopped.
struct Frozen<'a>(&'a Etcd);

impl<'a> Frozen<'a> {
    fn new(etcd: &'a Etcd) -> Frozen<'a> {
        etcd.signal("STOP");
        Frozen(etcd)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

fn mac(i: usize) -> String {
    format!("02:42:c0:00:02:{i:02x}")
}

/// A server with `--timeout 1` on a fresh /24 pool of its own etcd; the pool's ID is NET.
fn setup(tag: &str) -> (Etcd, String, TempDir, Server) {
    let etcd = Etcd::start(tag);
    let p = unique_prefix(tag);
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.254/24");
    let dir = TempDir::new(tag);
    let sock = dir.join("p.sock");
    let mut command = std::process::Command::new(common::BIN);
    command.args(["--timeout", "1"]);
    let server = Server::start_with(command, &etcd.url, &p, &sock, &sock);
    let mut c = PluginClient::connect(&sock);
    let pool = c.call(
        "/IpamDriver.RequestPool",
        r#"{"Pool":"192.0.2.0/24","SubPool":"","V6":false}"#,
    );
    assert_eq!(pool.status, 200, "{}", pool.body);
    (etcd, p, dir, server)
}

fn request(sock: &Path, mac: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let body = json!({"PoolID": NET, "Address": "",
        "Options": {"com.docker.network.endpoint.macaddress": mac}});
    let r = PluginClient::connect(sock).call("/IpamDriver.RequestAddress", &body.to_string());
    let addr = if r.status == 200 {
        r.json()["Address"].as_str().unwrap_or_default().to_string()
    } else {
        r.body
    };
    (r.status, addr, started.elapsed())
}

fn release(sock: &Path, addr: &str) -> u16 {
    let body = json!({"PoolID": NET, "Address": addr});
    PluginClient::connect(sock)
        .call("/IpamDriver.ReleaseAddress", &body.to_string())
        .status
}

/// MAC of each address `assigned/` holds, after checking that every address of the range is
/// in exactly one of `pool/` and `assigned/`.
fn assigned(etcd: &Etcd, prefix: &str) -> HashMap<String, String> {
    let base = format!("{prefix}/containers/{NET}/");
    let mut dirs: HashMap<String, Vec<String>> = HashMap::new();
    let mut macs = HashMap::new();
    for (key, value) in etcd.dump(&base) {
        let Some((dir, addr)) = key.strip_prefix(&base).and_then(|r| r.split_once('/')) else {
            continue;
        };
        dirs.entry(addr.to_string())
            .or_default()
            .push(dir.to_string());
        if dir == "assigned" {
            let owner: serde_json::Value = serde_json::from_str(&value).unwrap_or_default();
            let mac = owner["Mac"].as_str().unwrap_or_default().to_string();
            macs.insert(format!("{addr}/24"), mac);
        }
    }
    for i in 1..=254 {
        let addr = format!("192.0.2.{i}");
        let found = dirs.get(&addr).cloned().unwrap_or_default();
        assert!(found.len() == 1, "{addr} is in {found:?}");
    }
    macs
}

/// Waits (bounded) until `assigned/` is `want`.
fn settles_to(etcd: &Etcd, prefix: &str, want: &HashMap<String, String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = assigned(etcd, prefix);
        if now == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "assigned/ is {now:?}, not {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_allocation_etcd_applies_while_frozen_is_answered_from_what_it_holds() {
    let (etcd, p, _dir, server) = setup("outage-applied");
    let sock = server.socket.clone();
    let frozen = Frozen::new(&etcd);
    // Sent to a frozen etcd, which reads and applies it when thawed, after the plugin's
    // 1 s timeout: the plugin must learn that from etcd, not guess.
    let asked = std::thread::spawn(move || request(&sock, &mac(1)));
    std::thread::sleep(Duration::from_millis(1800));
    drop(frozen);
    let (status, addr, took) = asked.join().unwrap();
    assert_eq!(status, 200, "{addr}");
    assert!(
        took > Duration::from_secs(1),
        "answered before etcd thawed: {took:?}"
    );
    settles_to(&etcd, &p, &HashMap::from([(addr, mac(1))]));
}

#[test]
fn an_allocation_never_answered_in_time_is_undone_once_etcd_answers() {
    let (etcd, p, _dir, server) = setup("outage-undone");
    let frozen = Frozen::new(&etcd);
    let (status, text, took) = request(&server.socket, &mac(2));
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("given back"), "{text}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    drop(frozen);
    // What the frozen etcd applied on thawing is given back: no client holds it.
    settles_to(&etcd, &p, &HashMap::new());
    // And the plugin serves again.
    let (status, addr, _) = request(&server.socket, &mac(3));
    assert_eq!(status, 200, "{addr}");
}

#[test]
fn a_release_etcd_did_not_answer_is_finished_once_it_does() {
    let (etcd, p, _dir, server) = setup("outage-release");
    let (status, addr, _) = request(&server.socket, &mac(4));
    assert_eq!(status, 200, "{addr}");
    let frozen = Frozen::new(&etcd);
    // Docker logs a failed release and moves on: the plugin must finish it itself.
    assert_eq!(release(&server.socket, &addr), 500);
    drop(frozen);
    settles_to(&etcd, &p, &HashMap::new());
}

#[test]
fn requests_queued_behind_a_frozen_etcd_fail_fast() {
    let (etcd, p, _dir, server) = setup("outage-queue");
    let frozen = Frozen::new(&etcd);
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let sock = server.socket.clone();
            std::thread::spawn(move || request(&sock, &mac(0x10 + i)))
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    drop(frozen);
    // One request waits out the timeout and the resending of its unanswered change (1 + 3 s);
    // the others wait for it, then fail at once: one after another, 12 x 1 s would be 12 s.
    let slowest = answers.iter().map(|a| a.2).max().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(6),
        "slowest answer took {slowest:?}"
    );
    assert!(answers.iter().all(|a| a.0 == 500), "{answers:?}");
    assert!(
        answers
            .iter()
            .any(|a| a.1.contains("not retried until one does")),
        "{answers:?}"
    );
    // Nothing is left held, and the plugin serves again once etcd answers.
    settles_to(&etcd, &p, &HashMap::new());
    let (status, addr, _) = request(&server.socket, &mac(0x30));
    assert_eq!(status, 200, "{addr}");
}
