//! The socket loop: HTTP on a Unix socket, bound here or inherited through systemd socket
//! activation, until SIGTERM or SIGINT. Clients are read on threads of their own, each cut off
//! if a request is not in within a few seconds; the handler runs on one thread, one whole
//! request at a time, and writes each answer as far as the client's socket takes it without
//! waiting (all of it, unless the client stopped reading): the client's thread writes the rest.
//! Knows nothing of what the requests mean.
//!
//! tiny_http's `Server` is not used: its accept thread ends on the first accept error (EMFILE),
//! its connections have no read deadline, and its thread pool can leave a keep-alive connection
//! queued with no thread to serve it (tests/tiny_http_shortfalls.rs shows the first two).

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::http::{self, BodyFault, HeadError};

/// Requests with a larger body are refused unread.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// A connection must deliver each request in full within this time of being accepted or of
/// its previous answer; then it is cut off (408 if it had begun). Also the limit on writing
/// an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = REQUEST_TIMEOUT;

/// At most this many connections at once (fewer if the open files limit is low: half of it,
/// so that etcd connections always find a descriptor); the rest wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;

/// A connection's thread needs little stack: framing a request is shallow.
const CONNECTION_STACK: usize = 256 * 1024;

/// How long to wait before accepting again when out of descriptors or memory.
const BACKOFF: Duration = Duration::from_millis(100);

/// How often the loop looks at the stop flag while idle.
const POLL: Duration = Duration::from_millis(100);

/// The first inherited fd under systemd's socket activation protocol.
const SD_LISTEN_FDS_START: i32 = 3;

/// Why the server could not start or go on.
#[derive(Debug)]
pub enum ServerError {
    /// Another process answers on the socket already.
    AlreadyRunning(PathBuf),
    /// Something that is not a socket sits at the socket's path.
    NotASocket(PathBuf),
    /// The socket could not be made ready (directory, bind, permissions).
    Socket { path: PathBuf, error: io::Error },
    /// The signal handlers could not be installed.
    Signals(io::Error),
    /// The listening socket failed (or the accept thread could not start): exiting lets the
    /// service manager start a new server on the socket.
    Accept(io::Error),
    /// `LISTEN_FDS` names fd 3, but fd 3 is not a listening Unix stream socket.
    NotInherited(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::AlreadyRunning(p) => {
                write!(
                    f,
                    "already running: another process answers on {}",
                    p.display()
                )
            }
            ServerError::NotASocket(p) => {
                write!(
                    f,
                    "{} exists and is not a socket; not replacing it",
                    p.display()
                )
            }
            ServerError::Socket { path, error } => write!(f, "socket {}: {error}", path.display()),
            ServerError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            ServerError::Accept(e) => write!(f, "cannot accept connections: {e}"),
            ServerError::NotInherited(why) => write!(
                f,
                "LISTEN_FDS says systemd passed a socket, but fd 3 {why}; check the socket unit"
            ),
        }
    }
}

impl std::error::Error for ServerError {}

/// Where requests come from.
pub enum Listener {
    /// A socket this process bound; its file is removed when the server stops, if it is
    /// still this socket.
    Bound(UnixListener, SocketFile),
    /// A socket systemd passed in; systemd owns its file.
    Inherited(UnixListener),
}

/// The file of a socket this process bound, known by device and inode: after `rm` and a new
/// server binding the same path, the path names another socket, which must be left alone.
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                match std::fs::remove_file(&self.path) {
                    Ok(()) => log::info!("removed {}", self.path.display()),
                    Err(e) => log::warn!("cannot remove {}: {e}", self.path.display()),
                }
            }
            Ok(_) => log::info!(
                "{} is no longer the socket this server bound; leaving it",
                self.path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot check {}: {e}", self.path.display()),
        }
    }
}

/// Why a request's body was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    TooLarge { limit: u64 },
    Unreadable(String),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::TooLarge { limit } => write!(f, "request body over {limit} bytes"),
            BodyError::Unreadable(e) => write!(f, "cannot read the request body: {e}"),
        }
    }
}

/// A response: status, body, and its content type.
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
}

/// The socket systemd passed if this process is the one it was meant for, else None.
fn inherited() -> Result<Option<UnixListener>, ServerError> {
    let var = |name| std::env::var(name).ok()?.trim().parse::<i64>().ok();
    let (Some(pid), Some(fds)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid != i64::from(std::process::id()) || fds < 1 {
        return Ok(None);
    }
    check_listening_unix_socket(SD_LISTEN_FDS_START).map_err(ServerError::NotInherited)?;
    // SAFETY: fd 3 is an open listening Unix socket (checked above) that systemd handed to
    // this process, and nothing else in it owns it.
    Ok(Some(unsafe {
        UnixListener::from_raw_fd(SD_LISTEN_FDS_START)
    }))
}

/// Ok if `fd` is an open Unix-domain stream socket that listens; else what it is instead.
fn check_listening_unix_socket(fd: i32) -> Result<(), String> {
    // SAFETY: fstat and getsockopt only write into the buffers passed, sized as they expect;
    // an fd that is not open makes them fail with EBADF.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) != 0 {
            return Err(format!("is not open ({})", io::Error::last_os_error()));
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err("is not a socket".into());
        }
        let get = |option| {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            let ok = libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            ) == 0;
            ok.then_some(value)
        };
        if get(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
            || get(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        {
            return Err("is not a Unix stream socket".into());
        }
        if get(libc::SO_ACCEPTCONN) != Some(1) {
            return Err("is a socket that does not listen".into());
        }
    }
    Ok(())
}

/// The listener to serve: systemd's, if it passed one, else `path` bound here with mode 0660.
/// A socket file left by a dead server is replaced; one a live server answers on is not.
pub fn listen(path: &Path) -> Result<Listener, ServerError> {
    if let Some(listener) = inherited()? {
        log::info!("serving the socket passed by systemd");
        return Ok(Listener::Inherited(listener));
    }
    let socket_error = |error| ServerError::Socket {
        path: path.to_path_buf(),
        error,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(socket_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServerError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::AlreadyRunning(path.to_path_buf()));
            }
            log::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(socket_error)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    let meta = std::fs::symlink_metadata(path).map_err(socket_error)?;
    // From here on, dropping `file` removes the socket file.
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let permissions = std::fs::Permissions::from_mode(0o660);
    std::fs::set_permissions(path, permissions).map_err(socket_error)?;
    log::info!("listening on {}", path.display());
    Ok(Listener::Bound(listener, file))
}

/// One request for the handler, and where its answer goes.
struct Job {
    path: String,
    body: Result<Vec<u8>, BodyError>,
    /// Whether the connection stays open after the answer.
    keep_alive: bool,
    /// The client's socket, which its connection's thread keeps open until `reply` is
    /// answered or dropped.
    client: RawFd,
    reply: mpsc::Sender<Answer>,
}

/// An answer, and how much of it the handler's loop has written already.
struct Answer {
    bytes: Vec<u8>,
    written: io::Result<usize>,
}

/// Writes as much of `bytes` as the client's socket takes without waiting: all of an answer
/// unless the client has stopped reading. Writing here rather than on the connection's thread
/// spares the client a thread wake-up before it has its answer (about 3% of RequestAddress,
/// `cargo bench --bench allocation`); a client that does not read costs the loop nothing.
fn write_now(client: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: send(2) only reads `bytes`, on a descriptor the connection's thread keeps open
    // until this job's answer reaches it.
    let sent = unsafe {
        libc::send(
            client,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent >= 0 {
        return Ok(sent as usize);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
        _ => Err(e),
    }
}

/// What the handler's loop hears from the other threads.
enum Event {
    Request(Job),
    /// The listening socket failed for good.
    ListenerFailed(io::Error),
}

/// Counts live connections, and answers handed to connection threads but not yet written.
#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    unwritten: AtomicUsize,
}

/// Set by SIGTERM or SIGINT. Made before the socket is bound, so that a signal arriving as
/// soon as the socket answers stops the server cleanly instead of killing it.
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn on_signals() -> Result<Stop, ServerError> {
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(ServerError::Signals)?;
        }
        Ok(Stop(stop))
    }
}

/// What answers the requests `serve` reads.
pub trait Handler {
    /// The answer to a request for `path` with its body (or why the body could not be read).
    fn handle(&mut self, path: &str, body: Result<&[u8], BodyError>) -> Reply;

    /// Called between requests, at least every [`POLL`] while none comes: for work that must
    /// not wait for the next request.
    fn idle(&mut self) {}
}

/// Serves `handler` until SIGTERM or SIGINT, then finishes the request in hand, removes the
/// socket file it bound (if still its own), and returns.
///
/// One thread accepts; each connection gets a thread that reads its requests under
/// [`REQUEST_TIMEOUT`] and writes what of an answer the socket did not take at once; `handler`
/// runs on the calling thread only, one request at a time, and never waits on a client.
pub fn serve(
    listener: Listener,
    stop: Stop,
    handler: &mut impl Handler,
) -> Result<(), ServerError> {
    let stop = stop.0;
    let (unix, _file) = match listener {
        Listener::Bound(listener, file) => (listener, Some(file)),
        Listener::Inherited(listener) => (listener, None),
    };
    // systemd may pass the socket non-blocking; the accept thread blocks.
    unix.set_nonblocking(false).map_err(ServerError::Accept)?;
    let limit = raise_open_files_limit();
    let cap = (limit / 2).clamp(8, MAX_CONNECTIONS as u64) as usize;
    log::debug!("open files limit {limit}: up to {cap} connections at once");
    let counts = Arc::new(Counts::default());
    let (events, inbox) = mpsc::channel();
    {
        let counts = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(&unix, &events, &counts, cap))
            .map_err(ServerError::Accept)?;
    }
    while !stop.load(Ordering::Relaxed) {
        match inbox.recv_timeout(POLL) {
            Ok(Event::Request(job)) => {
                let reply = handler.handle(&job.path, job.body.as_deref().map_err(Clone::clone));
                let bytes = http::answer(
                    reply.status,
                    reply.content_type,
                    &reply.body,
                    !job.keep_alive,
                    false,
                    &[],
                );
                let written = write_now(job.client, &bytes);
                counts.unwritten.fetch_add(1, Ordering::SeqCst);
                if job.reply.send(Answer { bytes, written }).is_err() {
                    counts.unwritten.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Ok(Event::ListenerFailed(e)) => return Err(ServerError::Accept(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => handler.idle(),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ServerError::Accept(io::Error::other("accept thread ended")))
            }
        }
    }
    log::info!("stopping on signal");
    // The answer in hand is written by its connection's thread: give it the time a write has.
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while counts.unwritten.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sets the soft limit on open files to the hard one, since each connection holds one
/// (systemd's default soft limit of 1024 is reached by a thousand idle clients); returns the
/// soft limit in force.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log::warn!(
            "cannot read the open files limit: {}",
            io::Error::last_os_error()
        );
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::info!(
                "raised the open files limit from {} to {}",
                limit.rlim_cur,
                raised.rlim_cur
            );
            return raised.rlim_cur;
        }
        log::warn!(
            "cannot raise the open files limit from {} to {}: {}",
            limit.rlim_cur,
            limit.rlim_max,
            io::Error::last_os_error()
        );
    }
    limit.rlim_cur
}

/// What to do after `accept` failed.
#[derive(Debug, PartialEq, Eq)]
enum AcceptFault {
    /// This one connection failed (it was reset, a signal came): accept the next.
    Retry,
    /// Out of descriptors or memory: wait for connections to end, then accept again.
    Exhausted,
    /// The listening socket itself is unusable: the server must exit (and be restarted).
    Fatal,
}

fn accept_fault(e: &io::Error) -> AcceptFault {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptFault::Exhausted,
        // accept(2): the pending connection failed, or (for network sockets) an error that
        // belongs to the new connection; retry.
        Some(
            libc::ECONNABORTED
            | libc::EINTR
            | libc::EAGAIN
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH,
        ) => AcceptFault::Retry,
        // EBADF, EINVAL (not listening), ENOTSOCK, EOPNOTSUPP (not a stream socket), ...
        _ => AcceptFault::Fatal,
    }
}

/// Accepts connections for as long as the listener works, at most `cap` at once (the rest wait
/// in the listen backlog), and gives each a thread.
fn accept_loop(
    listener: &UnixListener,
    events: &mpsc::Sender<Event>,
    counts: &Arc<Counts>,
    cap: usize,
) {
    let mut exhausted = false;
    loop {
        while counts.connections.load(Ordering::SeqCst) >= cap {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => match accept_fault(&e) {
                AcceptFault::Retry => {
                    // Never a hot loop, whatever error keeps coming.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                AcceptFault::Exhausted => {
                    if !exhausted {
                        log::warn!("accepting a connection failed: {e}; retrying");
                    }
                    exhausted = true;
                    std::thread::sleep(BACKOFF);
                    continue;
                }
                AcceptFault::Fatal => {
                    log::error!("accepting a connection failed: {e}");
                    let _ = events.send(Event::ListenerFailed(e));
                    return;
                }
            },
        };
        if exhausted {
            log::info!("accepting connections again");
            exhausted = false;
        }
        counts.connections.fetch_add(1, Ordering::SeqCst);
        let guard = Live(Arc::clone(counts));
        let events = events.clone();
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                let live = guard;
                connection(&stream, &events, &live.0);
            });
        if let Err(e) = spawned {
            // The closure, and with it the connection and its count, is dropped.
            log::warn!("cannot start a thread for a connection: {e}");
            std::thread::sleep(BACKOFF);
        }
    }
}

/// Holds one count in `connections` while a connection lives.
struct Live(Arc<Counts>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket read that gives up at `until`, however the bytes trickle in.
struct Deadlined<'a> {
    stream: &'a UnixStream,
    until: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        match self.stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
            other => other,
        }
    }
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// Serves one connection: each request must arrive in full within [`REQUEST_TIMEOUT`] of the
/// connection being accepted or its previous answer written; the handler's loop gets it whole.
fn connection(stream: &UnixStream, events: &mpsc::Sender<Event>, counts: &Counts) {
    if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
        log::warn!("cannot set a write timeout on a connection: {e}");
        return;
    }
    let mut reader = BufReader::new(Deadlined {
        stream,
        until: Instant::now() + REQUEST_TIMEOUT,
    });
    let send = |bytes: Vec<u8>| {
        let mut w = stream;
        w.write_all(&bytes).and_then(|()| w.flush())
    };
    let refuse = |status: u16, why: &str, head_only: bool, extra: &[(&str, &str)]| {
        log::warn!("refused a request: {why}");
        let _ = send(http::answer(status, PLAIN, why, true, head_only, extra));
    };
    let timed_out = format!(
        "request not received within {} s",
        REQUEST_TIMEOUT.as_secs()
    );
    loop {
        reader.get_mut().until = Instant::now() + REQUEST_TIMEOUT;
        let head = match http::read_head(&mut reader) {
            Ok(head) => head,
            Err(HeadError::Idle | HeadError::Closed) => return,
            Err(HeadError::TimedOut) => return refuse(408, &timed_out, false, &[]),
            Err(HeadError::Refused(status, why)) => return refuse(status, &why, false, &[]),
        };
        // Every call is a POST; anything else could change the pools without the caller
        // being told (a HEAD answer has no body).
        if head.method != "POST" {
            let why = format!("method {} is not allowed: only POST is served", head.method);
            return refuse(405, &why, head.method == "HEAD", &[("Allow", "POST")]);
        }
        if head.expects_continue && head.has_body() {
            let mut w = stream;
            if http::write_continue(&mut w).is_err() {
                return;
            }
        }
        let body = match http::read_body(&mut reader, &head, MAX_BODY_BYTES) {
            Ok(body) => Ok(body),
            Err(BodyFault::TooLarge) => Err(BodyError::TooLarge {
                limit: MAX_BODY_BYTES,
            }),
            Err(BodyFault::Malformed(why)) => Err(BodyError::Unreadable(why)),
            Err(BodyFault::Closed) => return,
            Err(BodyFault::TimedOut) => return refuse(408, &timed_out, false, &[]),
        };
        // After a refused body the next request's start is unknown.
        let keep_alive = head.keep_alive && body.is_ok();
        let (reply, answer) = mpsc::channel();
        let job = Job {
            path: head.path,
            body,
            keep_alive,
            client: stream.as_raw_fd(),
            reply,
        };
        if events.send(Event::Request(job)).is_err() {
            return;
        }
        // The handler answers every request it takes; an error means it stopped first.
        let Ok(answer) = answer.recv() else { return };
        // What the handler's loop could not write at once.
        let written = answer
            .written
            .and_then(|done| match answer.bytes.get(done..) {
                Some(rest) if !rest.is_empty() => send(rest.to_vec()),
                _ => Ok(()),
            });
        counts.unwritten.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = written {
            log::warn!("answering a request failed: {e}");
            return;
        }
        if !keep_alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_retried_waited_out_or_fatal() {
        let fault = |errno| accept_fault(&io::Error::from_raw_os_error(errno));
        assert_eq!(fault(libc::EMFILE), AcceptFault::Exhausted);
        assert_eq!(fault(libc::ENFILE), AcceptFault::Exhausted);
        assert_eq!(fault(libc::ENOMEM), AcceptFault::Exhausted);
        assert_eq!(fault(libc::ECONNABORTED), AcceptFault::Retry);
        assert_eq!(fault(libc::EINTR), AcceptFault::Retry);
        assert_eq!(fault(libc::EBADF), AcceptFault::Fatal);
        assert_eq!(fault(libc::EINVAL), AcceptFault::Fatal);
        assert_eq!(fault(libc::ENOTSOCK), AcceptFault::Fatal);
    }

    #[test]
    fn a_socket_file_is_removed_only_while_it_is_the_one_bound() {
        let dir = std::env::temp_dir().join(format!("oam-socketfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let Listener::Bound(first, file) = listen(&path).expect("listen") else {
            panic!("not bound here");
        };
        std::fs::remove_file(&path).expect("rm");
        let second = UnixListener::bind(&path).expect("bind again");
        drop(file);
        assert!(path.exists(), "removed a socket it did not bind");
        drop((first, second));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
