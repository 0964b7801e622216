//! What tiny_http 0.12 does that made the socket loop stop using its `Server` (issue 9), shown
//! on tiny_http alone, so that an upgrade that fixes any of it makes a test here fail and the
//! workaround in src/server.rs can be reconsidered. The thread-pool starvation of keep-alive
//! connections (a race) is not shown here; tests/server_faults.rs checks the loop avoids it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test at a time: one of them lowers this process's open files limit.
static SERIAL: Mutex<()> = Mutex::new(());

fn socket_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oam-tiny-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("s.sock")
}

fn tiny_server(path: &PathBuf) -> tiny_http::Server {
    let listener = UnixListener::bind(path).expect("bind");
    tiny_http::Server::from_listener(listener, None).expect("tiny_http server")
}

fn nofile() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit
}

fn set_nofile(limit: &libc::rlimit) {
    // SAFETY: setrlimit only reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) }, 0);
}

#[test]
fn running_out_of_descriptors_once_stops_tiny_http_accepting_for_good() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = socket_path("emfile");
    let server = tiny_server(&path);
    // One connection served first, so that its descriptors are all taken before counting.
    let mut probe = UnixStream::connect(&path).expect("connect");
    probe
        .write_all(b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        .expect("write");
    let request = server
        .recv_timeout(Duration::from_secs(5))
        .expect("recv")
        .expect("the probe's request");
    request
        .respond(tiny_http::Response::from_string("ok"))
        .expect("respond");
    // Allow descriptors up to the lowest free one only: the next client's socket takes it, and
    // the server finds none for its side.
    // SAFETY: F_DUPFD on an open descriptor returns a new one (the lowest free), closed below.
    let lowest_free = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD, 0) };
    assert!(lowest_free > 0);
    // SAFETY: closes the descriptor made just above, which nothing else uses.
    unsafe { libc::close(lowest_free) };
    let saved = nofile();
    set_nofile(&libc::rlimit {
        rlim_cur: lowest_free as libc::rlim_t + 1,
        rlim_max: saved.rlim_max,
    });
    let client = UnixStream::connect(&path);
    let reported = server.recv_timeout(Duration::from_secs(2));
    set_nofile(&saved);
    assert!(client.is_ok(), "{client:?}");
    // The accept thread reserved its next descriptor on entering accept(2), so the accept
    // succeeds and tiny_http's clone of the socket fails: its accept thread panics
    // (refined_tcp_stream.rs unwraps). When accept(2) itself fails, it logs, reports the
    // error once, and ends. Either way:
    assert!(
        matches!(&reported, Ok(None))
            || matches!(&reported, Err(e) if e.raw_os_error() == Some(libc::EMFILE)),
        "{reported:?}"
    );
    // Descriptors are free again, but the accept thread has ended and closed the listener:
    // every later connect is refused, and the server only ever reports "no request".
    std::thread::sleep(Duration::from_millis(100));
    let later = UnixStream::connect(&path);
    assert!(later.is_err(), "tiny_http accepts again: {later:?}");
    assert!(matches!(
        server.recv_timeout(Duration::from_millis(300)),
        Ok(None)
    ));
    drop(probe);
}

#[test]
fn tiny_http_never_cuts_off_a_silent_client_and_reads_bodies_on_the_callers_thread() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = socket_path("stall");
    let server = tiny_server(&path);
    // Content-Length over 1 KiB and one byte of body: the request is handed over at once,
    // and reading its body blocks whoever reads it, with no deadline to set.
    let mut staller = UnixStream::connect(&path).expect("connect");
    staller
        .write_all(b"POST /x HTTP/1.1\r\nContent-Length: 2000\r\n\r\n{")
        .expect("write");
    let mut request = server
        .recv_timeout(Duration::from_secs(5))
        .expect("recv")
        .expect("the stalled request, before its body");
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        let mut body = Vec::new();
        let _ = request.as_reader().read_to_end(&mut body);
        started.elapsed()
    });
    // Past the 5 s our loop allows: tiny_http has neither answered nor closed the
    // connection, and the body read is still blocked.
    std::thread::sleep(Duration::from_secs(6));
    assert!(!reader.is_finished(), "the body read gave up by itself");
    staller
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let read = staller.read(&mut byte);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "tiny_http closed or answered the stalled connection: {read:?}"
    );
    drop(staller);
    let blocked = reader.join().expect("reader");
    assert!(blocked >= Duration::from_secs(6), "{blocked:?}");
}

#[test]
fn tiny_http_holds_an_http_2_request_unanswered() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = socket_path("http2");
    let server = tiny_server(&path);
    let mut client = UnixStream::connect(&path).expect("connect");
    client
        .write_all(b"POST /x HTTP/2.0\r\nContent-Length: 0\r\n\r\n")
        .expect("write");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut got = [0u8; 64];
    let read = client.read(&mut got);
    // Its 505 sits in a buffer nobody flushes, and the connection stays open.
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "tiny_http answered: {read:?}"
    );
    assert!(matches!(
        server.recv_timeout(Duration::from_millis(100)),
        Ok(None)
    ));
}

#[test]
fn tiny_http_responses_drop_a_connection_header() {
    let response = tiny_http::Response::from_string("x")
        .with_header(tiny_http::Header::from_bytes("Connection", "close").expect("header"));
    let mut out = Vec::new();
    response
        .raw_print(&mut out, tiny_http::HTTPVersion(1, 1), &[], false, None)
        .expect("print");
    let text = String::from_utf8_lossy(&out);
    assert!(!text.to_ascii_lowercase().contains("connection:"), "{text}");
}
