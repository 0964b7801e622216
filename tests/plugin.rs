//! The IPAM plugin over its Unix socket, against a real etcd: Docker's call sequence byte for
//! byte, concurrent servers sharing one pool, bad input, signals, stale sockets, socket
//! activation, and etcd going away and coming back.

mod common;

use common::{ip_range, unique_prefix, Etcd, PluginClient, Server, TempDir};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

fn container_request(pool: &str, addr: &str, mac: &str) -> String {
    json!({"PoolID": pool, "Address": addr, "Options": {"com.docker.network.endpoint.macaddress": mac}})
        .to_string()
}

fn mac(i: usize) -> String {
    format!(
        "02:42:{:02x}:{:02x}:{:02x}:{:02x}",
        (i >> 24) & 0xff,
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

/// Keys under `<prefix>/containers/<net>/{pool,assigned}/`, as address → directory.
fn pool_state(etcd: &Etcd, prefix: &str, net: &str) -> Vec<(String, String)> {
    let base = format!("{prefix}/containers/{net}/");
    etcd.dump(&base)
        .into_iter()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix(&base)?;
            let (dir, addr) = rest.split_once('/')?;
            Some((addr.to_string(), dir.to_string()))
        })
        .collect()
}

#[test]
fn answers_dockers_call_sequence_byte_for_byte() {
    let etcd = Etcd::shared();
    let p = unique_prefix("sequence");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.254/24");
    let dir = TempDir::new("sequence");
    let sock = dir.join("talkingdata.sock");
    let _server = Server::start(&etcd.url, &p, &sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let mut c = PluginClient::connect(&sock);
    let exact = |c: &mut PluginClient, path: &str, body: &str, want: &str| {
        let r = c.call(path, body);
        assert_eq!(
            (r.status, r.content_type.as_str(), r.body.as_str()),
            (200, CONTENT_TYPE, want),
            "{path}"
        );
    };
    exact(
        &mut c,
        "/Plugin.Activate",
        "",
        r#"{"Implements":["IpamDriver"]}"#,
    );
    exact(
        &mut c,
        "/IpamDriver.GetCapabilities",
        "",
        r#"{"RequiresMACAddress":true,"RequiresRequestReplay":false}"#,
    );
    exact(
        &mut c,
        "/IpamDriver.GetDefaultAddressSpaces",
        "",
        r#"{"GlobalDefaultAddressSpace":"","LocalDefaultAddressSpace":""}"#,
    );
    exact(
        &mut c,
        "/IpamDriver.RequestPool",
        r#"{"AddressSpace":"","Pool":"192.0.2.0/24","SubPool":"","Options":{},"V6":false}"#,
        r#"{"Data":{},"Pool":"192.0.2.0/24","PoolID":"192.0.2.0"}"#,
    );
    exact(
        &mut c,
        "/IpamDriver.RequestAddress",
        r#"{"PoolID":"192.0.2.0","Address":"192.0.2.10","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
        r#"{"Address":"192.0.2.10/24","Data":{}}"#,
    );
    exact(
        &mut c,
        "/IpamDriver.RequestAddress",
        r#"{"PoolID":"192.0.2.0","Address":"192.0.2.1","Options":null}"#,
        r#"{"Address":"192.0.2.1/24","Data":{}}"#,
    );
    // Gateway and aux address left the pool, recorded for their role.
    let state: HashMap<String, String> = pool_state(etcd, &p, "192.0.2.0").into_iter().collect();
    assert_eq!(state["192.0.2.10"], "assigned");
    assert_eq!(state["192.0.2.1"], "assigned");

    let any = c.call(
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "", "02:42:68:43:a9:ad"),
    );
    assert_eq!(any.status, 200, "{}", any.body);
    let got = any.json()["Address"].as_str().unwrap().to_string();
    assert!(
        got.ends_with("/24") && got != "192.0.2.10/24" && got != "192.0.2.1/24",
        "{got}"
    );
    let got_ip = got.trim_end_matches("/24").to_string();
    let owner: Value = serde_json::from_str(
        &etcd.dump(&format!("{p}/containers/192.0.2.0/assigned/{got_ip}"))[0].1,
    )
    .unwrap();
    assert_eq!(owner["Role"], "container");
    assert_eq!(owner["Mac"], "02:42:68:43:a9:ad");

    exact(
        &mut c,
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "192.0.2.99", "02:42:3a:3c:3b:a9"),
        r#"{"Address":"192.0.2.99/24","Data":{}}"#,
    );
    // The same container asking again (a retry) gets the same answer.
    exact(
        &mut c,
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "192.0.2.99", "02:42:3a:3c:3b:a9"),
        r#"{"Address":"192.0.2.99/24","Data":{}}"#,
    );
    let taken = c.call(
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "192.0.2.99", "02:42:00:00:00:01"),
    );
    assert_eq!(taken.status, 500);
    let err = taken.json()["Err"].as_str().unwrap().to_string();
    assert!(
        err.starts_with("192.0.2.99 is already in use by host ")
            && err.ends_with("(mac 02:42:3a:3c:3b:a9)"),
        "{err}"
    );

    for addr in ["192.0.2.99", &got_ip, "192.0.2.10", "192.0.2.1"] {
        let body = format!(r#"{{"PoolID":"192.0.2.0","Address":"{addr}"}}"#);
        exact(&mut c, "/IpamDriver.ReleaseAddress", &body, "{}");
    }
    exact(
        &mut c,
        "/IpamDriver.ReleasePool",
        r#"{"PoolID":"192.0.2.0"}"#,
        "{}",
    );
    let state: HashMap<String, String> = pool_state(etcd, &p, "192.0.2.0").into_iter().collect();
    assert_eq!(state["192.0.2.99"], "pool");
    assert_eq!(state[&got_ip], "pool");
    // The gateway goes back with the network of the host that reserved it (issue 11); aux
    // addresses stay out of the pool, since every host's network names them.
    assert_eq!(state["192.0.2.10"], "pool");
    assert_eq!(state["192.0.2.1"], "assigned");
    assert!(etcd.dump(&format!("{p}/containers/192.0.2.0/config")).len() == 1);
}

#[test]
fn bad_requests_get_an_error_and_the_server_keeps_serving() {
    let etcd = Etcd::shared();
    let p = unique_prefix("badreq");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.20/24");
    let dir = TempDir::new("badreq");
    let sock = dir.join("talkingdata.sock");
    let _server = Server::start(&etcd.url, &p, &sock);
    let mut c = PluginClient::connect(&sock);
    let huge = vec![b'x'; 1024 * 1024 + 10];
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/Nope.Nothing", b"".to_vec(), 404, "unknown call"),
        (
            "/IpamDriver.RequestPool",
            b"{not json".to_vec(),
            400,
            "malformed request",
        ),
        (
            "/IpamDriver.RequestPool",
            br#"{"Pool":7}"#.to_vec(),
            400,
            "malformed request",
        ),
        (
            "/IpamDriver.RequestPool",
            br#"{"Pool":"203.0.113.0/24"}"#.to_vec(),
            404,
            "no container pool 203.0.113.0",
        ),
        (
            "/IpamDriver.RequestPool",
            br#"{"Pool":"","V6":true}"#.to_vec(),
            400,
            "IPv6",
        ),
        (
            "/IpamDriver.RequestAddress",
            container_request("192.0.2.0", "198.51.100.7", "02:42:00:00:00:01").into_bytes(),
            400,
            "outside the pool",
        ),
        (
            "/IpamDriver.RequestAddress",
            container_request("192.0.2.0", "", "02:42:zz").into_bytes(),
            400,
            "not a MAC address",
        ),
        (
            "/IpamDriver.RequestAddress",
            container_request("192.0.2.0", "192.0.2.200", "02:42:00:00:00:01").into_bytes(),
            500,
            "not in the address pool",
        ),
        (
            "/IpamDriver.RequestAddress",
            huge,
            413,
            "over 1048576 bytes",
        ),
    ];
    for (path, body, status, needle) in cases {
        let r = c.send_raw(path, &body);
        assert_eq!(r.status, status, "{path}: {}", r.body);
        let err = r.json()["Err"].as_str().unwrap_or_default().to_string();
        assert!(
            err.contains(needle),
            "{path}: {err:?} does not say {needle:?}"
        );
    }
    // Still serving, on a new connection too.
    let mut again = PluginClient::connect(&sock);
    assert_eq!(again.call("/Plugin.Activate", "").status, 200);
    let r = again.call(
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "", "02:42:00:00:00:02"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn four_servers_and_eight_clients_never_hand_out_an_address_twice() {
    let etcd = Etcd::shared();
    let p = unique_prefix("concurrent");
    // 254 addresses for 800 requests: the pool runs out under contention.
    ip_range(&etcd.url, &p, "198.51.100.0/24", "198.51.100.255/24");
    let dir = TempDir::new("concurrent");
    let servers: Vec<Server> = (0..4)
        .map(|i| Server::start(&etcd.url, &p, &dir.join(&format!("s{i}.sock"))))
        .collect();
    let sockets: Vec<_> = servers.iter().map(|s| s.socket.clone()).collect();
    let results: Vec<(Vec<String>, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|client| {
                let sock = sockets[client % 4].clone();
                scope.spawn(move || {
                    let mut c = PluginClient::connect(&sock);
                    let (mut got, mut errors) = (Vec::new(), Vec::new());
                    for i in 0..100 {
                        let r = c.call(
                            "/IpamDriver.RequestAddress",
                            &container_request("198.51.100.0", "", &mac(client * 1000 + i)),
                        );
                        match r.status {
                            200 => got.push(r.json()["Address"].as_str().unwrap().to_string()),
                            _ => errors.push(r.json()["Err"].as_str().unwrap().to_string()),
                        }
                    }
                    (got, errors)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let handed: Vec<String> = results.iter().flat_map(|(g, _)| g.clone()).collect();
    let errors: Vec<String> = results.iter().flat_map(|(_, e)| e.clone()).collect();
    let distinct: HashSet<&String> = handed.iter().collect();
    assert_eq!(
        distinct.len(),
        handed.len(),
        "an address was handed out twice"
    );
    assert_eq!(handed.len(), 254);
    assert_eq!(errors.len(), 800 - 254);
    assert!(
        errors
            .iter()
            .all(|e| e == "no free address left in pool 198.51.100.0/24"),
        "{:?}",
        errors.iter().collect::<HashSet<_>>()
    );

    // Every address is in exactly one directory, and the handed-out ones are assigned.
    let state = pool_state(etcd, &p, "198.51.100.0");
    let mut seen = HashMap::new();
    for (addr, dir) in &state {
        assert!(
            seen.insert(addr.clone(), dir.clone()).is_none(),
            "{addr} is in both directories"
        );
    }
    assert_eq!(seen.len(), 254);
    for a in &handed {
        assert_eq!(seen[a.trim_end_matches("/24")], "assigned");
    }
    drop(servers);
}

#[test]
fn sigterm_finishes_the_request_in_hand_and_removes_the_socket() {
    // An "etcd" that accepts and never answers makes the request in hand last the timeout.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hung.local_addr().unwrap());
    let dir = TempDir::new("sigterm");
    let sock = dir.join("talkingdata.sock");
    let mut server = Server::start(&url, "/unused", &sock);
    let mut c = PluginClient::connect(&sock);
    let pending = std::thread::spawn(move || {
        let started = Instant::now();
        let r = c.call("/IpamDriver.RequestPool", r#"{"Pool":"192.0.2.0/24"}"#);
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = server.signal_and_wait("TERM");
    let (reply, took) = pending.join().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert!(
        reply.json()["Err"]
            .as_str()
            .unwrap()
            .contains("etcd unreachable"),
        "{}",
        reply.body
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(!sock.exists(), "socket left behind");
    drop(hung);
}

#[test]
fn sigint_exits_cleanly_too() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("sigint");
    let sock = dir.join("talkingdata.sock");
    let mut server = Server::start(&etcd.url, "/unused", &sock);
    assert_eq!(server.signal_and_wait("INT").code(), Some(0));
    assert!(!sock.exists());
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_is_not() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("stale");
    let sock = dir.join("talkingdata.sock");
    // A socket file nobody listens on, as a crash leaves it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let _first = Server::start(&etcd.url, "/unused", &sock);
    assert_eq!(
        PluginClient::connect(&sock)
            .call("/Plugin.Activate", "")
            .status,
        200
    );

    let second = Command::new(common::BIN)
        .args(["--cluster-store", &etcd.url, "server", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    common::fails(second, 1, "already running");
    assert_eq!(
        PluginClient::connect(&sock)
            .call("/Plugin.Activate", "")
            .status,
        200
    );

    let file = dir.join("plain-file.sock");
    std::fs::write(&file, "not a socket").unwrap();
    let out = Command::new(common::BIN)
        .args(["server", "--socket"])
        .arg(&file)
        .output()
        .unwrap();
    common::fails(out, 1, "is not a socket");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a socket");
}

#[test]
fn serves_a_socket_passed_by_systemd() {
    let etcd = Etcd::shared();
    let p = unique_prefix("activation");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.9/24");
    let dir = TempDir::new("activation");
    let sock = dir.join("talkingdata.sock");
    let mut activator = Command::new("systemd-socket-activate");
    activator.arg("-l").arg(&sock).arg(common::BIN);
    // --socket points elsewhere: an activated server must not bind it.
    let elsewhere = dir.join("not-used.sock");
    let mut server = Server::start_with(activator, &etcd.url, &p, &elsewhere, &sock);
    let mut c = PluginClient::connect(&sock);
    assert_eq!(c.call("/Plugin.Activate", "").status, 200);
    let r = c.call(
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "", "02:42:00:00:00:05"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(server.signal_and_wait("TERM").code(), Some(0));
    let log = server.log();
    assert!(
        log.contains("serving the socket passed by systemd"),
        "{log}"
    );
    // systemd owns the socket file: the server leaves it in place.
    assert!(
        sock.exists(),
        "the activated server removed systemd's socket"
    );
    assert!(!elsewhere.exists());
}

#[test]
fn an_inherited_fd_that_is_not_a_listening_unix_socket_is_refused() {
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("not-activation");
    let sock = dir.join("talkingdata.sock");
    let file = std::fs::File::open("/dev/null").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (unlistening, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let datagram = std::os::unix::net::UnixDatagram::unbound().unwrap();
    for (fd, says) in [
        (file.as_raw_fd(), "fd 3 is not a socket"),
        (tcp.as_raw_fd(), "fd 3 is not a Unix stream socket"),
        (datagram.as_raw_fd(), "fd 3 is not a Unix stream socket"),
        (
            unlistening.as_raw_fd(),
            "fd 3 is a socket that does not listen",
        ),
    ] {
        let out = with_fd3(fd, &sock);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!sock.exists());
    }
}

/// Runs `server` as systemd would start it with `fd` passed as fd 3.
fn with_fd3(fd: i32, sock: &std::path::Path) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let script = "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" server --socket \"$1\"";
    let mut command = Command::new("sh");
    command.args(["-c", script, common::BIN]).arg(sock);
    // SAFETY: only dup, dup2 and close, which are async-signal-safe, run between fork and
    // exec. The copy made by dup has no close-on-exec flag, even when `fd` is 3 itself.
    unsafe {
        command.pre_exec(move || {
            let copy = libc::dup(fd);
            if copy < 0 || libc::dup2(copy, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if copy != 3 {
                libc::close(copy);
            }
            Ok(())
        });
    }
    command.output().unwrap()
}

#[test]
fn etcd_down_during_a_request_is_an_error_and_the_server_recovers() {
    let mut etcd = Etcd::start("downup");
    let p = unique_prefix("downup");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.50/24");
    let dir = TempDir::new("downup");
    let sock = dir.join("talkingdata.sock");
    let mut server = Server::start(&etcd.url, &p, &sock);
    let mut c = PluginClient::connect(&sock);
    let r = c.call("/IpamDriver.RequestPool", r#"{"Pool":"192.0.2.0/24"}"#);
    assert_eq!(r.status, 200, "{}", r.body);

    etcd.stop();
    let started = Instant::now();
    let r = c.call(
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "", "02:42:00:00:00:07"),
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(r.status, 500);
    assert!(
        r.json()["Err"]
            .as_str()
            .unwrap()
            .starts_with("etcd unreachable: "),
        "{}",
        r.body
    );
    assert!(matches!(server.child.try_wait(), Ok(None)), "server died");

    etcd.restart();
    // Requests fail at once until the plugin's health check sees etcd again (every 0.2 s).
    let back = Instant::now();
    let r = loop {
        let r = c.call(
            "/IpamDriver.RequestAddress",
            &container_request("192.0.2.0", "", "02:42:00:00:00:07"),
        );
        if r.status == 200 || back.elapsed() > Duration::from_secs(2) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r.status, 200, "{}", r.body);
    let r = c.call("/IpamDriver.ReleaseAddress", &json!({"PoolID":"192.0.2.0","Address": r.json()["Address"].as_str().unwrap().trim_end_matches("/24")}).to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        pool_state(&etcd, &p, "192.0.2.0")
            .iter()
            .filter(|(_, d)| d == "pool")
            .count(),
        50
    );
}
