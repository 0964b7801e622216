//! The socket loop under faults and hostile clients (issue 9), against a real etcd: a full
//! descriptor table, stalled and slow clients, keep-alive storms, methods other than POST,
//! HTTP/2.0, a socket path taken over by a newer server, and 20,000 fuzzed requests.

mod common;

use common::{ip_range, unique_prefix, Etcd, PluginClient, Server, TempDir, BIN};
use serde_json::json;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server's per-request deadline (server::REQUEST_TIMEOUT).
const DEADLINE: Duration = Duration::from_secs(5);

fn container_request(pool: &str, addr: &str, mac: &str) -> String {
    json!({"PoolID": pool, "Address": addr, "Options": {"com.docker.network.endpoint.macaddress": mac}})
        .to_string()
}

/// A raw answer: status (0 if none), what came back as text, and how long until the server
/// closed the connection (or the wait ran out).
#[derive(Debug)]
struct Raw {
    status: u16,
    text: String,
    took: Duration,
}

/// Sends `bytes`, then reads until the server closes (or `wait` passes): what came back.
fn exchange(sock: &Path, bytes: &[u8], half_close: bool, wait: Duration) -> Raw {
    let started = Instant::now();
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    // The server may answer and close before reading everything: that is not a failure here.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    raw(&got, started.elapsed())
}

fn raw(got: &[u8], took: Duration) -> Raw {
    let text = String::from_utf8_lossy(got).into_owned();
    // An interim `100 Continue` precedes the answer.
    let last = text
        .strip_prefix("HTTP/1.1 100 Continue\r\n\r\n")
        .unwrap_or(&text);
    let status = last
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw { status, text, took }
}

/// The address answered to a RequestAddress, on a fresh connection.
fn allocate(sock: &Path, mac: &str) -> String {
    let mut c = PluginClient::connect(sock);
    let r = c.call(
        "/IpamDriver.RequestAddress",
        &container_request("192.0.2.0", "", mac),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["Address"].as_str().unwrap_or_default().to_string()
}

fn open_files_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn raises_the_soft_open_files_limit_to_the_hard_one() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("nofile");
    let sock = dir.join("s.sock");
    let mut prlimit = Command::new("prlimit");
    prlimit.args(["--nofile=64:4096", BIN]);
    let server = Server::start_with(prlimit, &etcd.url, "/unused", &sock, &sock);
    // The socket answers as soon as it is bound; the loop raises the limit just after.
    let started = Instant::now();
    while open_files_limit(server.child.id()) != "4096 4096"
        && started.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(open_files_limit(server.child.id()), "4096 4096");
}

#[test]
fn a_listener_that_fails_makes_the_server_exit_non_zero_at_once() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // As systemd's socket, a listening socket that this test shuts down once the server
    // serves it: the server's accept then fails with EINVAL.
    let dir = TempDir::new("badlistener");
    let listening_at = dir.join("systemd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&listening_at).expect("bind");
    let fd = listener.as_raw_fd();
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            r#"export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@""#,
            BIN,
        ])
        .args([
            "--cluster-store",
            "http://127.0.0.1:9",
            "server",
            "--socket",
        ])
        .arg(dir.join("unused.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only dup2 and fcntl, which are async-signal-safe, run between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set.
            let done = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start the server");
    let serving = Instant::now();
    loop {
        let mut probe = UnixStream::connect(&listening_at).expect("connect");
        probe
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        probe
            .write_all(b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .expect("send");
        let mut first = [0u8; 12];
        if probe.read_exact(&mut first).is_ok() && first.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(serving.elapsed() < Duration::from_secs(10), "never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: shutdown on a descriptor this test owns; it reaches the server's copy too.
    assert_eq!(unsafe { libc::shutdown(fd, libc::SHUT_RDWR) }, 0);
    let started = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running 10 s after its listener failed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut log);
    }
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("cannot accept connections"), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_full_descriptor_table_does_not_stop_the_server_accepting() {
    let etcd = Etcd::shared();
    let p = unique_prefix("emfile");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.200/24");
    let dir = TempDir::new("emfile");
    let sock = dir.join("s.sock");
    let mut prlimit = Command::new("prlimit");
    prlimit.args(["--nofile=64:64", BIN]);
    let mut server = Server::start_with(prlimit, &etcd.url, &p, &sock, &sock);
    assert_eq!(open_files_limit(server.child.id()), "64 64");

    // The issue's repro: 80 connections that send half their headers, then close.
    let mut held: Vec<UnixStream> = (0..80)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).expect("connect");
            let _ = s.write_all(b"POST /Plugin.Activate HTTP/1.1\r\nHost: ");
            s
        })
        .collect();
    held.clear();
    for i in 0..20 {
        let started = Instant::now();
        let mut c = PluginClient::connect(&sock);
        assert_eq!(c.call("/Plugin.Activate", "").status, 200);
        assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());
        allocate(&sock, &format!("02:42:00:00:01:{i:02x}"));
    }

    // 80 held open: more than the 64 descriptors. The server takes 32 connections at once
    // (half its limit), so the stallers ahead of a new client are cut off in three rounds of
    // the deadline; then it is answered.
    let held: Vec<UnixStream> = (0..80)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).expect("connect");
            let _ = s.write_all(b"POST /Plugin.Activate HTTP/1.1\r\nHost: ");
            s
        })
        .collect();
    let started = Instant::now();
    let got = allocate(&sock, "02:42:00:00:02:01");
    let waited = started.elapsed();
    eprintln!("answered after {waited:?} with 80 stallers holding on");
    assert!(got.starts_with("192.0.2."), "{got}");
    assert!(waited < 4 * DEADLINE, "{waited:?}");
    drop(held);
    assert!(matches!(server.child.try_wait(), Ok(None)), "server died");
    assert_eq!(server.signal_and_wait("TERM").code(), Some(0));
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// A client that starts a request and then holds the connection, silent.
struct Staller {
    what: &'static str,
    stream: UnixStream,
    started: Instant,
}

fn stall(sock: &Path, what: &'static str, bytes: &[u8]) -> Staller {
    let started = Instant::now();
    let mut stream = UnixStream::connect(sock).expect("connect");
    stream.write_all(bytes).expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    Staller {
        what,
        stream,
        started,
    }
}

const STALLS: [(&str, &[u8]); 6] = [
    (
        "Content-Length 2000, one byte",
        b"POST /IpamDriver.RequestPool HTTP/1.1\r\nContent-Length: 2000\r\n\r\n{",
    ),
    (
        "chunked, partial",
        b"POST /IpamDriver.RequestPool HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"",
    ),
    (
        "half a head",
        b"POST /IpamDriver.RequestPool HTTP/1.1\r\nContent-Le",
    ),
    (
        "Content-Length 10, no body",
        b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 10\r\n\r\n",
    ),
    ("silent", b""),
    (
        "Transfer-Encoding gzip, partial",
        b"POST /IpamDriver.RequestPool HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b",
    ),
];

#[test]
fn stalled_and_slow_clients_delay_no_one_and_are_cut_off() {
    let etcd = Etcd::shared();
    let p = unique_prefix("stall");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.200/24");
    let dir = TempDir::new("stall");
    let sock = dir.join("s.sock");
    let mut server = Server::start(&etcd.url, &p, &sock);
    let stallers: Vec<Staller> = STALLS
        .iter()
        .map(|(what, bytes)| stall(&sock, what, bytes))
        .collect();
    // A slow client: one byte of a valid request every 500 ms, for up to 30 s.
    let slow_cut = std::thread::spawn({
        let sock = sock.clone();
        move || {
            let started = Instant::now();
            let mut s = UnixStream::connect(&sock).expect("connect");
            let request = format!(
                "POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}",
                " ".repeat(100)
            );
            for b in request.bytes() {
                if s.write_all(&[b]).is_err() || started.elapsed() > Duration::from_secs(30) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            let mut got = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = s.read_to_end(&mut got);
            raw(&got, started.elapsed())
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    // Others are answered at once, on a keep-alive connection and on new ones.
    let mut worst = Duration::ZERO;
    let mut c = PluginClient::connect(&sock);
    for i in 0..20 {
        let started = Instant::now();
        let r = c.call(
            "/IpamDriver.RequestAddress",
            &container_request("192.0.2.0", "", &format!("02:42:00:00:03:{i:02x}")),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        allocate(&sock, &format!("02:42:00:00:04:{i:02x}"));
        worst = worst.max(started.elapsed());
    }
    eprintln!("while 7 clients stalled, the slowest of 40 requests took {worst:?}");
    assert!(worst < Duration::from_secs(3), "{worst:?}");

    // Each staller is cut off at the deadline: 408 if it had begun a request, 501 at once for
    // a transfer coding the server does not take, nothing for the silent one.
    for mut s in stallers {
        let mut got = Vec::new();
        let _ = s.stream.read_to_end(&mut got);
        let r = raw(&got, s.started.elapsed());
        eprintln!("{}: {} after {:?}", s.what, r.status, r.took);
        let want = match s.what {
            "silent" => 0,
            "Transfer-Encoding gzip, partial" => 501,
            _ => 408,
        };
        assert_eq!(r.status, want, "{}: {}", s.what, r.text);
        if want != 501 {
            assert!(
                r.took >= DEADLINE - Duration::from_secs(1) && r.took < 3 * DEADLINE,
                "{}: cut off after {:?}",
                s.what,
                r.took
            );
        }
    }
    let slow = slow_cut.join().expect("slow client");
    eprintln!("slow client: {} after {:?}", slow.status, slow.took);
    assert_eq!(slow.status, 408, "{}", slow.text);
    assert!(slow.took < 3 * DEADLINE, "{:?}", slow.took);
    assert_eq!(server.signal_and_wait("TERM").code(), Some(0));
}

#[test]
fn sigterm_is_honoured_while_clients_stall() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("stallterm");
    let sock = dir.join("s.sock");
    let mut server = Server::start(&etcd.url, "/unused", &sock);
    let _stallers: Vec<Staller> = STALLS
        .iter()
        .map(|(what, bytes)| stall(&sock, what, bytes))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let status = server.signal_and_wait("TERM");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn sixteen_keep_alive_connections_at_once_are_all_answered() {
    let etcd = Etcd::shared();
    let p = unique_prefix("storm");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.254/24");
    let dir = TempDir::new("storm");
    for trial in 0..5 {
        let sock = dir.join(&format!("s{trial}.sock"));
        // A fresh server each trial, as in the issue's repro.
        let server = Server::start(&etcd.url, &p, &sock);
        let release = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let sock = sock.clone();
                let release = Arc::clone(&release);
                std::thread::spawn(move || {
                    let mut c = PluginClient::connect(&sock);
                    let started = Instant::now();
                    let r = c.call(
                        "/IpamDriver.RequestAddress",
                        &container_request(
                            "192.0.2.0",
                            "",
                            &format!("02:42:00:05:{trial:02x}:{i:02x}"),
                        ),
                    );
                    let took = started.elapsed();
                    // Keep the connection open until every client has its answer.
                    let until = Instant::now() + Duration::from_secs(20);
                    while !release.load(Ordering::SeqCst) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    (r.status, r.body, took)
                })
            })
            .collect();
        // Every client answered releases them all; the 30 s read timeout bounds a failure.
        let waiter = {
            let release = Arc::clone(&release);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(8));
                release.store(true, Ordering::SeqCst);
            })
        };
        let mut worst = Duration::ZERO;
        let mut answered = Vec::new();
        for h in handles {
            let (status, body, took) = h.join().expect("client");
            assert_eq!(status, 200, "trial {trial}: {body}");
            answered.push(body);
            worst = worst.max(took);
        }
        drop(waiter);
        eprintln!("trial {trial}: 16 keep-alive clients, slowest answer {worst:?}");
        assert!(worst < Duration::from_secs(3), "trial {trial}: {worst:?}");
        answered.sort();
        answered.dedup();
        assert_eq!(answered.len(), 16, "an address was given twice");
        drop(server);
    }
}

/// Reads `n` answers off `s`, in order: each one's body.
fn read_answers(s: &mut UnixStream, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    let mut bodies = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    while bodies.len() < n {
        // Every answer has a Content-Length (the server never chunks).
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("a Content-Length");
            if got.len() >= end + 4 + length {
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                bodies.push(text[end + 4..end + 4 + length].to_string());
                got.drain(..end + 4 + length);
                continue;
            }
        }
        let read = s.read(&mut chunk).expect("an answer");
        assert!(read > 0, "closed after {} answers", bodies.len());
        got.extend_from_slice(&chunk[..read]);
    }
    assert!(got.is_empty(), "more than asked for");
    bodies
}

#[test]
fn requests_whole_split_or_back_to_back_are_answered_in_order() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("framing");
    let sock = dir.join("s.sock");
    let _server = Server::start(&etcd.url, "/unused", &sock);
    let activate = b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    let capabilities = b"POST /IpamDriver.GetCapabilities HTTP/1.1\r\nHost: x\r\n\
        Content-Length: 2\r\n\r\n{}";
    let is_activate = |b: &String| b.contains("IpamDriver");
    let is_capabilities = |b: &String| b.contains("RequiresMACAddress");
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Whole, one at a time: the loop answers them itself.
    for _ in 0..3 {
        s.write_all(activate).expect("send");
        assert!(is_activate(&read_answers(&mut s, 1)[0]));
    }
    // Split in the head, then in the body: the connection's thread puts each together.
    for cut in [20, capabilities.len() - 1] {
        s.write_all(&capabilities[..cut]).expect("send");
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(&capabilities[cut..]).expect("send");
        assert!(is_capabilities(&read_answers(&mut s, 1)[0]));
    }
    // Back to back in one write, on that connection and on a fresh one.
    let pair: Vec<u8> = [&activate[..], &capabilities[..], &activate[..]].concat();
    let mut fresh = UnixStream::connect(&sock).expect("connect");
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for conn in [&mut s, &mut fresh] {
        conn.write_all(&pair).expect("send");
        let bodies = read_answers(conn, 3);
        assert!(is_activate(&bodies[0]), "{bodies:?}");
        assert!(is_capabilities(&bodies[1]), "{bodies:?}");
        assert!(is_activate(&bodies[2]), "{bodies:?}");
    }
}

#[test]
fn a_client_that_stops_reading_its_answers_delays_no_one_and_loses_none() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("unread");
    let sock = dir.join("s.sock");
    let _server = Server::start(&etcd.url, "/unused", &sock);
    let request = b"POST /IpamDriver.GetCapabilities HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
    // More answers than the socket's buffers hold, asked one write at a time, unread.
    const ASKED: usize = 4000;
    let mut greedy = UnixStream::connect(&sock).expect("connect");
    greedy
        .set_write_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut sent = 0;
    while sent < ASKED && greedy.write_all(request).is_ok() {
        sent += 1;
    }
    eprintln!("sent {sent} requests without reading an answer");
    // The writes stopped because the server stopped reading: its answers filled the socket.
    assert!(
        (100..ASKED).contains(&sent),
        "{sent} requests went out: the answers never filled the socket"
    );
    // Meanwhile another client is answered at once.
    let started = Instant::now();
    let mut other = UnixStream::connect(&sock).expect("connect");
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    other.write_all(request).expect("send");
    let body = read_answers(&mut other, 1).remove(0);
    assert!(body.contains("RequiresMACAddress"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Reading now, within the server's write timeout, brings every answer.
    greedy
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let bodies = read_answers(&mut greedy, sent);
    assert!(bodies.iter().all(|b| b.contains("RequiresMACAddress")));
}

#[test]
fn only_post_is_served() {
    let etcd = Etcd::shared();
    let p = unique_prefix("methods");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.20/24");
    let dir = TempDir::new("methods");
    let sock = dir.join("s.sock");
    let _server = Server::start(&etcd.url, &p, &sock);
    let before = etcd.dump(&p);
    let body = container_request("192.0.2.0", "", "02:42:00:00:06:01");
    for method in ["HEAD", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"] {
        let request = format!(
            "{method} /IpamDriver.RequestAddress HTTP/1.1\r\nHost: \r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = exchange(&sock, request.as_bytes(), false, Duration::from_secs(10));
        assert_eq!(r.status, 405, "{method}: {}", r.text);
        assert!(
            r.text.contains("\r\nAllow: POST\r\n"),
            "{method}: {}",
            r.text
        );
        assert!(
            r.text.contains("\r\nConnection: close\r\n"),
            "{method}: {}",
            r.text
        );
        assert!(
            r.took < Duration::from_secs(3),
            "{method}: not closed at once"
        );
        let body_sent = r.text.split("\r\n\r\n").nth(1).unwrap_or_default();
        if method == "HEAD" {
            assert_eq!(body_sent, "", "HEAD answered with a body");
        } else {
            assert!(body_sent.contains("only POST is served"), "{}", r.text);
        }
    }
    assert_eq!(etcd.dump(&p), before, "a refused method changed etcd");
    // The same request as POST does allocate: the refusals above were not for its content.
    allocate(&sock, "02:42:00:00:06:01");
    assert_ne!(etcd.dump(&p), before);
}

#[test]
fn http_2_is_answered_505_and_closed() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("http2");
    let sock = dir.join("s.sock");
    let _server = Server::start(&etcd.url, "/unused", &sock);
    for request in [
        &b"POST /Plugin.Activate HTTP/2.0\r\nContent-Length: 0\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let r = exchange(&sock, request, false, Duration::from_secs(10));
        assert_eq!(r.status, 505, "{}", r.text);
        assert!(
            r.took < Duration::from_secs(3),
            "not closed at once: {:?}",
            r.took
        );
    }
}

#[test]
fn a_stopping_server_leaves_a_newer_servers_socket() {
    let etcd = Etcd::shared();
    let dir = TempDir::new("takeover");
    let sock = dir.join("talkingdata.sock");
    let mut a = Server::start(&etcd.url, "/unused", &sock);
    std::fs::remove_file(&sock).expect("rm the socket");
    let mut b = Server::start(&etcd.url, "/unused", &sock);
    assert_eq!(a.signal_and_wait("TERM").code(), Some(0));
    let log = a.log();
    assert!(
        log.contains("no longer the socket this server bound"),
        "{log}"
    );
    assert!(sock.exists(), "A removed B's socket");
    assert_eq!(
        PluginClient::connect(&sock)
            .call("/Plugin.Activate", "")
            .status,
        200
    );
    assert_eq!(b.signal_and_wait("TERM").code(), Some(0));
    assert!(!sock.exists(), "B left its own socket");
}

/// xorshift64*: enough randomness for fuzzing, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const PATHS: [&str; 8] = [
    "/Plugin.Activate",
    "/IpamDriver.GetCapabilities",
    "/IpamDriver.GetDefaultAddressSpaces",
    "/IpamDriver.RequestPool",
    "/IpamDriver.RequestAddress",
    "/IpamDriver.ReleaseAddress",
    "/IpamDriver.ReleasePool",
    "/Nope",
];

fn fuzz_bodies() -> Vec<String> {
    vec![
        String::new(),
        r#"{"AddressSpace":"","Pool":"192.0.2.0/24","SubPool":"","Options":{},"V6":false}"#.into(),
        r#"{"PoolID":"192.0.2.0","Address":"192.0.2.10","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#.into(),
        r#"{"PoolID":"192.0.2.0","Address":"192.0.2.1","Options":null}"#.into(),
        container_request("192.0.2.0", "", "02:42:68:43:a9:ad"),
        container_request("192.0.2.0", "192.0.2.15", "02:42:3a:3c:3b:a9"),
        r#"{"PoolID":"192.0.2.0","Address":"192.0.2.15"}"#.into(),
        r#"{"PoolID":"192.0.2.0"}"#.into(),
    ]
}

/// A well-formed request, in one of the framings a client may use.
fn seed(rng: &mut Rng, bodies: &[String]) -> Vec<u8> {
    let path = rng.pick(&PATHS);
    let body = rng.pick(bodies);
    match rng.below(5) {
        0 => {
            let half = body.len() / 2;
            format!(
                "POST {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                half, &body[..half], body.len() - half, &body[half..]
            )
        }
        1 => format!("POST {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        2 => format!(
            "POST {path} HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        3 => format!(
            "POST {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            body.len()
        ),
        _ => format!(
            "POST {path} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\n\
             Accept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
            body.len()
        ),
    }
    .into_bytes()
}

const TOKENS: [&str; 16] = [
    "\r\n",
    "\r\n\r\n",
    ":",
    " ",
    "\0",
    "HTTP/1.1",
    "HTTP/2.0",
    "Content-Length: ",
    "Transfer-Encoding: chunked\r\n",
    "99999999999999999999",
    "-1",
    "{",
    "}",
    "\"",
    "null",
    "\u{00e9}",
];

/// A request changed in one to four random ways.
fn mutate(rng: &mut Rng, mut bytes: Vec<u8>, other: &[u8]) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(9) {
            0 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            1 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            2 => {
                let end = (at + rng.below(16)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let token = rng.pick(&TOKENS).as_bytes();
                bytes.splice(at..at, token.iter().copied());
            }
            4 => bytes.truncate(at),
            5 => {
                let from = rng.below(other.len() + 1);
                bytes.truncate(at);
                bytes.extend_from_slice(&other[from..]);
            }
            6 => {
                const METHODS: [&[u8]; 6] = [b"GET", b"HEAD", b"PUT", b"post", b"P\0ST", b""];
                let method = *rng.pick(&METHODS);
                if let Some(sp) = bytes.iter().position(|&b| b == b' ') {
                    bytes.splice(..sp, method.iter().copied());
                }
            }
            7 => {
                let end = (at + rng.below(64)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            _ => {
                let n = rng.below(32);
                let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, noise);
            }
        }
    }
    bytes
}

#[test]
fn twenty_thousand_fuzzed_requests_change_nothing_and_crash_nothing() {
    let etcd = Etcd::shared();
    let p = unique_prefix("fuzz");
    ip_range(&etcd.url, &p, "192.0.2.11/24", "192.0.2.20/24");
    // Every pooled address is held by a container of another host, so that no request, valid
    // or not, can change etcd: a release leaves another host's address alone and nothing is
    // free to take. Any change is then the fuzzing's doing.
    let owner = r#"{"Role":"container","Host":"fuzz-other-host","Mac":"02:42:00:00:00:99","Since":"2026-01-01T00:00:00Z"}"#;
    for (key, _) in etcd.dump(&format!("{p}/containers/192.0.2.0/pool/")) {
        etcd.delete(&key);
        etcd.put(&key.replace("/pool/", "/assigned/"), owner);
    }
    let before = etcd.dump(&p);
    assert_eq!(before.len(), 11, "{before:?}");

    let dir = TempDir::new("fuzz");
    let sock = dir.join("s.sock");
    // Its log goes to a file: 20,000 refusals would fill a pipe nobody reads.
    let log_path = dir.join("server.log");
    let child = Command::new(BIN)
        .args(common::store_args(&etcd.url, &p))
        .args(["server", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start the server");
    let mut server = Server {
        child,
        socket: sock.clone(),
    };
    common::wait_for_socket(&sock);

    let seed0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("fuzz seed {seed0}");
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 1_300;
    let statuses: Arc<[AtomicUsize; 600]> = Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let sock = &sock;
            let statuses = Arc::clone(&statuses);
            scope.spawn(move || {
                let mut rng = Rng(seed0 ^ (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let bodies = fuzz_bodies();
                for _ in 0..PER_CLIENT {
                    let base = seed(&mut rng, &bodies);
                    let case = match rng.below(10) {
                        0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
                        1 => base,
                        _ => {
                            let other = seed(&mut rng, &bodies);
                            mutate(&mut rng, base, &other)
                        }
                    };
                    // Half-closing makes a request cut short end at once instead of at the
                    // deadline; the server must answer or close, never hang.
                    let r = exchange(sock, &case, true, Duration::from_secs(15));
                    assert!(
                        r.took < Duration::from_secs(10),
                        "no answer and no close after {:?} for {:?}",
                        r.took,
                        String::from_utf8_lossy(&case)
                    );
                    statuses[usize::from(r.status).min(599)].fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let took = started.elapsed();
    let sent = CLIENTS * PER_CLIENT;
    let seen: Vec<String> = statuses
        .iter()
        .enumerate()
        .filter(|(_, n)| n.load(Ordering::Relaxed) > 0)
        .map(|(s, n)| format!("{s}: {}", n.load(Ordering::Relaxed)))
        .collect();
    eprintln!(
        "{sent} fuzzed requests in {took:?}; answers by status (0 = closed without one): {seen:?}"
    );
    assert!(sent >= 20_000);
    assert!(took < Duration::from_secs(60), "{took:?}");
    // The fuzzing reached the handler, not only the framing.
    assert!(statuses[200].load(Ordering::Relaxed) > 1000, "{seen:?}");

    assert!(matches!(server.child.try_wait(), Ok(None)), "server died");
    let mut c = PluginClient::connect(&sock);
    assert_eq!(c.call("/Plugin.Activate", "").status, 200);
    assert_eq!(etcd.dump(&p), before, "fuzzing changed etcd");
    assert_eq!(server.signal_and_wait("TERM").code(), Some(0));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

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

/// A server on `etcd` whose etcd requests may take 8 s (store_args' 2 s would give up before
/// a client's deadline passes).
fn patient_server(etcd: &Etcd, prefix: &str, sock: &Path) -> Server {
    let child = Command::new(BIN)
        .args(["--cluster-store", &etcd.url, "--store-prefix", prefix])
        .args(["--timeout", "8", "server", "--socket"])
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let server = Server {
        child,
        socket: sock.to_path_buf(),
    };
    common::wait_for_socket(sock);
    server
}

/// Sends the head of a request that expects `100 Continue`, sends the body as soon as that
/// comes, and reads until the server closes (or 20 s pass): when the interim answer came,
/// and what came back in all.
fn expect_continue(mut s: UnixStream, started: Instant) -> (Duration, Raw) {
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(
        b"POST /IpamDriver.GetCapabilities HTTP/1.1\r\nHost: \r\n\
          Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
    )
    .expect("send the head");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let interim = started.elapsed();
    if got.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n") {
        let _ = s.write_all(b"{}");
        let _ = s.read_to_end(&mut got);
    }
    (interim, raw(&got, started.elapsed()))
}

/// A client that delivers its whole request within the deadline is answered, however long
/// the handler was busy with others meanwhile: also when the request is too big for one read
/// or waits for `100 Continue`, which the loop leaves to the connection's thread.
#[test]
fn a_request_delivered_in_time_is_answered_after_a_busy_handler() {
    let etcd = Etcd::start("busyhandler");
    let p = unique_prefix("busyhandler");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.20/24");
    let dir = TempDir::new("busyhandler");
    let sock = dir.join("s.sock");
    let mut server = patient_server(&etcd, &p, &sock);
    let started = Instant::now();
    // Accepted now: each has the deadline from here to deliver its request.
    let mut big = UnixStream::connect(&sock).expect("connect");
    big.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let waits_for_continue = UnixStream::connect(&sock).expect("connect");
    let mut busy = PluginClient::connect(&sock);
    std::thread::sleep(Duration::from_millis(300));

    // etcd stalls, and with it the handler, on one allocation, for longer than the deadline.
    let frozen = Frozen::new(&etcd);
    let allocation = std::thread::spawn(move || {
        busy.call(
            "/IpamDriver.RequestAddress",
            &container_request("192.0.2.0", "", "02:42:00:00:07:01"),
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile, well within their deadline, one client sends a whole request of 100 kB (the
    // server takes bodies up to 1 MiB), and one sends a head that expects 100 Continue.
    let body = format!("{{}}{}", " ".repeat(100_000));
    let request = format!(
        "POST /IpamDriver.GetCapabilities HTTP/1.1\r\nHost: \r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    big.write_all(request.as_bytes())
        .expect("send the big request");
    let continued = std::thread::spawn(move || expect_continue(waits_for_continue, started));
    std::thread::sleep((started + DEADLINE + Duration::from_millis(1500)) - Instant::now());
    drop(frozen);

    assert_eq!(allocation.join().expect("allocation"), 200);
    let mut got = Vec::new();
    let _ = big.read_to_end(&mut got);
    let big = raw(&got, started.elapsed());
    let (interim, continued) = continued.join().expect("100-continue client");
    eprintln!(
        "big request: {} after {:?}; 100 Continue after {interim:?}, then {}",
        big.status, big.took, continued.status
    );
    assert_eq!(big.status, 200, "big request: {}", big.text);
    assert_eq!(continued.status, 200, "100-continue: {}", continued.text);
    assert_eq!(server.signal_and_wait("TERM").code(), Some(0));
}

/// A TCP proxy on loopback to `target` that holds each chunk etcd sends back for `delay`: an
/// etcd that answers, slowly. Its threads end with the test process.
fn slow_proxy(target: &str, delay: Duration) -> String {
    use std::net::{TcpListener, TcpStream};
    let target = target.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(etcd) = TcpStream::connect(&target) else {
                continue;
            };
            let pipe = move |mut from: TcpStream, mut to: TcpStream, delay: Duration| {
                let mut chunk = [0u8; 64 * 1024];
                while let Ok(n) = from.read(&mut chunk) {
                    std::thread::sleep(delay);
                    if n == 0 || to.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(Shutdown::Both);
            };
            let (c, e) = (
                client.try_clone().expect("clone"),
                etcd.try_clone().expect("clone"),
            );
            std::thread::spawn(move || pipe(c, e, Duration::ZERO));
            std::thread::spawn(move || pipe(etcd, client, delay));
        }
    });
    url
}

/// SIGTERM ends the server after the request in hand, not after every request that was
/// waiting: with a slow etcd, answering them all first takes as many times as long.
#[test]
fn sigterm_does_not_wait_for_every_queued_request() {
    let etcd = Etcd::shared();
    let p = unique_prefix("termqueue");
    ip_range(&etcd.url, &p, "192.0.2.1/24", "192.0.2.100/24");
    let slow = slow_proxy(&etcd.url, Duration::from_millis(400));
    let dir = TempDir::new("termqueue");
    let sock = dir.join("s.sock");
    let mut server = Server::start(&slow, &p, &sock);
    // The first allocation also connects to etcd; the second takes what each one takes.
    allocate(&sock, "02:42:00:00:08:00");
    let one = Instant::now();
    allocate(&sock, "02:42:00:00:08:01");
    let one = one.elapsed();
    // Twenty clients, each with a whole request waiting, as dockerd's would be.
    let clients: Vec<UnixStream> = (2..22)
        .map(|i| {
            let mut s = UnixStream::connect(&sock).expect("connect");
            let body = container_request("192.0.2.0", "", &format!("02:42:00:00:08:{i:02x}"));
            let request = format!(
                "POST /IpamDriver.RequestAddress HTTP/1.1\r\nHost: \r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(request.as_bytes()).expect("send");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let status = loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    eprintln!("one allocation took {one:?}; exited {took:?} after SIGTERM");
    drop(clients);
    assert_eq!(status.code(), Some(0));
    assert!(
        took < 3 * one,
        "SIGTERM took {took:?}: one request takes {one:?}"
    );
}
