//! The socket loop: HTTP on a Unix socket, bound here or inherited through systemd socket
//! activation, until SIGTERM or SIGINT. One thread polls the listener and the connections
//! waiting between requests, and runs the handler, one whole request at a time: a request that
//! arrives whole is answered there and then. A connection whose request comes in pieces, or
//! that does not take its answer at once, gets a thread of its own for the rest of its life,
//! which reads under a deadline (and writes what the client did not take at once), so that
//! the handler never waits on a client.
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
/// its previous answer (time the loop spent on other requests before it looked is not
/// counted); then it is cut off (408 if it had begun). Also the limit on each write of an
/// answer to a client that does not read it.
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
    /// The listening socket failed (or the loop's wake socket could not be made): exiting
    /// lets the service manager start a new server on the socket.
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

/// One request a connection's thread read, and where its answer goes.
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

/// An answer, and how much of it the loop has written already.
struct Answer {
    bytes: Vec<u8>,
    written: io::Result<usize>,
    unwritten: Unwritten,
}

/// Counts live connections, and answers handed to connection threads but not yet written.
#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    unwritten: AtomicUsize,
}

/// Holds one count in `connections` while a connection lives.
struct Live(Arc<Counts>);

impl Live {
    fn new(counts: &Arc<Counts>) -> Live {
        counts.connections.fetch_add(1, Ordering::SeqCst);
        Live(Arc::clone(counts))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Holds one count in `unwritten` while an answer waits for a connection's thread to write it,
/// so that a stopping server waits for it.
struct Unwritten(Arc<Counts>);

impl Unwritten {
    fn new(counts: &Arc<Counts>) -> Unwritten {
        counts.unwritten.fetch_add(1, Ordering::SeqCst);
        Unwritten(Arc::clone(counts))
    }
}

impl Drop for Unwritten {
    fn drop(&mut self) {
        self.0.unwritten.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Writes as much of `bytes` as the client's socket takes without waiting: all of an answer
/// unless the client has stopped reading, and then a connection's thread writes the rest.
fn write_now(client: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: send(2) only reads `bytes`, on a descriptor that is open while this runs (the
    // loop's own, or one a connection's thread keeps open until its job is answered).
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

/// The handler's answer to one request, as the bytes to write.
fn respond(
    handler: &mut impl Handler,
    path: &str,
    body: Result<&[u8], BodyError>,
    keep_alive: bool,
) -> Vec<u8> {
    let reply = handler.handle(path, body);
    http::answer(
        reply.status,
        reply.content_type,
        &reply.body,
        !keep_alive,
        false,
        &[],
    )
}

/// What connection threads use to reach the loop: a job goes on the channel, then a byte on
/// the wake socket, which the loop polls beside the clients'.
#[derive(Clone)]
struct ToLoop {
    jobs: mpsc::Sender<Job>,
    wake: Arc<UnixStream>,
    counts: Arc<Counts>,
}

impl ToLoop {
    /// False once `serve` has returned.
    fn send(&self, job: Job) -> bool {
        if self.jobs.send(job).is_err() {
            return false;
        }
        self.wake();
        true
    }

    fn wake(&self) {
        // A full wake socket already has the loop woken; any other failure leaves the loop to
        // its next round, at most POLL away.
        let _ = (&*self.wake).write(&[1]);
    }
}

/// A connection between requests, polled by the loop until its next request begins.
struct Waiting {
    stream: UnixStream,
    /// When it is closed if no request has begun by then.
    until: Instant,
    live: Live,
}

/// Where a connection's thread starts when the loop hands it a connection, which it then
/// keeps until the connection ends.
enum Handoff {
    /// The start of the requests the loop left to the thread, and their deadline.
    Read { bytes: Vec<u8>, until: Instant },
    /// The rest of an answer the client's socket did not take at once, and whether the
    /// connection stays open after it.
    Write {
        rest: Vec<u8>,
        keep_alive: bool,
        count: Unwritten,
    },
}

/// Bytes read from a waiting client at once: a request of Docker's fits many times over.
const READ_BUFFER: usize = 64 * 1024;

/// What the loop polls: the wake socket, the listener, then each waiting connection.
const WAKE: usize = 0;
const LISTENER: usize = 1;
const FIRST_WAITING: usize = 2;

/// Serves `handler` until SIGTERM or SIGINT, then finishes the request in hand, removes the
/// socket file it bound (if still its own), and returns.
///
/// This thread polls the listener and every connection that waits between requests, accepts,
/// reads, and runs `handler`, one request at a time. A request that arrives whole in one read
/// is answered right there: the client's bytes wake one thread, the one that answers. Anything
/// else (a request in pieces, one to refuse, a client that does not read its answer) goes to
/// a thread of the connection's own, which reads under [`REQUEST_TIMEOUT`] and passes whole
/// requests back to this loop, so that `handler` never waits on a client.
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
    // Accepting only when poll says a connection waits; accepted sockets block (their
    // threads rely on it), reads here never wait (MSG_DONTWAIT).
    unix.set_nonblocking(true).map_err(ServerError::Accept)?;
    let limit = raise_open_files_limit();
    let cap = (limit / 2).clamp(8, MAX_CONNECTIONS as u64) as usize;
    log::debug!("open files limit {limit}: up to {cap} connections at once");
    let counts = Arc::new(Counts::default());
    let (jobs, inbox) = mpsc::channel();
    let (wake, woken) = UnixStream::pair().map_err(ServerError::Accept)?;
    wake.set_nonblocking(true).map_err(ServerError::Accept)?;
    woken.set_nonblocking(true).map_err(ServerError::Accept)?;
    let to_loop = ToLoop {
        jobs,
        wake: Arc::new(wake),
        counts: Arc::clone(&counts),
    };
    let mut waiting: Vec<Waiting> = Vec::new();
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut accept_after = Instant::now();
    let mut exhausted = false;
    let mut next_idle = Instant::now() + POLL;
    let mut last_polled = Instant::now();
    let mut poll_failing = false;
    let stopping = || stop.load(Ordering::Relaxed);
    while !stopping() {
        let now = Instant::now();
        // A connection's thread wakes the loop when it ends, freeing a place under the cap.
        let at_cap = counts.connections.load(Ordering::SeqCst) >= cap;
        let accepting = !at_cap && now >= accept_after;
        let mut wake_at = waiting
            .iter()
            .map(|w| w.until)
            .fold(next_idle, Instant::min);
        if !at_cap && !accepting {
            wake_at = wake_at.min(accept_after);
        }
        let mut fds = Vec::with_capacity(FIRST_WAITING + waiting.len());
        fds.push(readable(woken.as_raw_fd()));
        // poll(2) skips a negative descriptor.
        fds.push(readable(if accepting { unix.as_raw_fd() } else { -1 }));
        fds.extend(waiting.iter().map(|w| readable(w.stream.as_raw_fd())));
        if let Err(e) = poll(&mut fds, wake_at.saturating_duration_since(now)) {
            if !poll_failing {
                log::warn!("poll failed: {e}; retrying");
            }
            poll_failing = true;
            std::thread::sleep(BACKOFF);
            continue;
        }
        poll_failing = false;
        // What is readable now came after the loop last polled: at worst just after, and then
        // its client is not charged for the time the loop spent on others since.
        let since = last_polled;
        let polled = Instant::now();
        last_polled = polled;
        let mut served = false;
        if fds[WAKE].revents != 0 {
            let mut drain = [0u8; 64];
            while matches!((&woken).read(&mut drain), Ok(n) if n > 0) {}
        }
        // Whole requests from connections' threads. After SIGTERM, only the request in hand
        // is answered: the others' connections close unanswered.
        while !stopping() {
            let Ok(job) = inbox.try_recv() else { break };
            let bytes = respond(
                handler,
                &job.path,
                job.body.as_deref().map_err(Clone::clone),
                job.keep_alive,
            );
            let written = write_now(job.client, &bytes);
            // If the thread is gone the answer is dropped, and its count with it.
            let _ = job.reply.send(Answer {
                bytes,
                written,
                unwritten: Unwritten::new(&counts),
            });
            served = true;
        }
        let mut kept = Vec::with_capacity(waiting.len());
        for (conn, fd) in waiting.drain(..).zip(&fds[FIRST_WAITING..]) {
            if fd.revents != 0 && !stopping() {
                served = true;
                let late = Instant::now().saturating_duration_since(since);
                kept.extend(on_readable(conn, late, &mut buffer, handler, &to_loop));
            } else if fd.revents != 0 || conn.until > polled {
                kept.push(conn);
            }
            // Else it stayed silent to its deadline: closed without an answer, as an idle
            // keep-alive connection ends.
        }
        waiting = kept;
        let listener_events = fds[LISTENER].revents;
        // After SIGTERM, connections are left in the backlog: under systemd's socket unit the
        // next server takes them.
        if listener_events != 0 && !stopping() {
            let accepted = accept_all(
                &unix,
                &counts,
                cap,
                &mut waiting,
                &mut accept_after,
                &mut exhausted,
            )?;
            let hung_up = listener_events & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
            if accepted == 0 && hung_up {
                // A listening socket that was shut down polls as hung up while a non-blocking
                // accept keeps saying "try again" (a blocking one would fail with EINVAL).
                let e = io::Error::other("the listening socket was shut down");
                log::error!("accepting a connection failed: {e}");
                return Err(ServerError::Accept(e));
            }
        }
        if served {
            next_idle = Instant::now() + POLL;
        } else if Instant::now() >= next_idle && !stopping() {
            handler.idle();
            next_idle = Instant::now() + POLL;
        }
    }
    log::info!("stopping on signal");
    drop(waiting);
    // The answer in hand is written by its connection's thread: give it the time a write has.
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while counts.unwritten.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn readable(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// poll(2) for at most `wait` (rounded up to whole milliseconds, at most [`POLL`]); a signal
/// ends it early without an error.
fn poll(fds: &mut [libc::pollfd], wait: Duration) -> io::Result<()> {
    let millis = wait.min(POLL).as_micros().div_ceil(1000) as libc::c_int;
    // SAFETY: poll(2) reads and writes exactly `fds.len()` pollfd structs of the slice.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    if ready >= 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        fds.iter_mut().for_each(|fd| fd.revents = 0);
        return Ok(());
    }
    Err(e)
}

/// Reads what a waiting connection sent. One whole request, alone, is answered at once, and
/// the connection waits again (if it stays open); anything else goes to a thread of its own
/// with the bytes read, and its deadline moved on by `late`, the time since the loop last
/// polled. None if the connection is done with or handed off.
fn on_readable(
    conn: Waiting,
    late: Duration,
    buffer: &mut [u8],
    handler: &mut impl Handler,
    to_loop: &ToLoop,
) -> Option<Waiting> {
    let fd = conn.stream.as_raw_fd();
    // SAFETY: recv(2) writes at most `buffer.len()` bytes into `buffer`, on the open socket
    // `conn` owns.
    let got = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    let read = match got {
        // The client closed the connection between requests.
        0 => return None,
        n if n > 0 => &buffer[..n as usize],
        _ => {
            let e = io::Error::last_os_error();
            return matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
            .then_some(conn);
        }
    };
    let mut rest = read;
    let whole = match http::read_head(&mut rest) {
        Ok(head) if head.method == "POST" && !head.expects_continue => {
            match http::read_body(&mut rest, &head, MAX_BODY_BYTES) {
                Ok(body) if rest.is_empty() => Some((head, body)),
                _ => None,
            }
        }
        _ => None,
    };
    let Some((head, body)) = whole else {
        log::debug!("a request did not come whole and alone: its connection gets a thread");
        let start = Handoff::Read {
            bytes: read.to_vec(),
            until: conn.until + late,
        };
        hand_off(conn, start, to_loop);
        return None;
    };
    let bytes = respond(handler, &head.path, Ok(&body), head.keep_alive);
    match write_now(fd, &bytes) {
        Ok(n) if n == bytes.len() => head.keep_alive.then(|| Waiting {
            until: Instant::now() + REQUEST_TIMEOUT,
            ..conn
        }),
        Ok(n) => {
            log::debug!("an answer was not taken at once: its connection gets a thread");
            let rest = bytes.get(n..).unwrap_or_default().to_vec();
            let start = Handoff::Write {
                rest,
                keep_alive: head.keep_alive,
                count: Unwritten::new(&to_loop.counts),
            };
            hand_off(conn, start, to_loop);
            None
        }
        Err(e) => {
            log::warn!("answering a request failed: {e}");
            None
        }
    }
}

/// Gives `conn` a thread of its own, starting from `start`.
fn hand_off(conn: Waiting, start: Handoff, to_loop: &ToLoop) {
    let to_loop = to_loop.clone();
    let spawned = std::thread::Builder::new()
        .name("connection".into())
        .stack_size(CONNECTION_STACK)
        .spawn(move || {
            let Waiting { stream, live, .. } = conn;
            connection(&stream, start, &to_loop);
            drop((stream, live));
            to_loop.wake();
        });
    if let Err(e) = spawned {
        // The closure, and with it the connection, its counts and any answer, is dropped.
        log::warn!("cannot start a thread for a connection: {e}");
    }
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

/// Accepts the connections waiting in the backlog, up to `cap` at once (the rest wait there),
/// into `waiting`, and says how many. Out of descriptors or memory, accepting pauses for
/// [`BACKOFF`]; an error of the listening socket itself ends the server.
fn accept_all(
    listener: &UnixListener,
    counts: &Arc<Counts>,
    cap: usize,
    waiting: &mut Vec<Waiting>,
    accept_after: &mut Instant,
    exhausted: &mut bool,
) -> Result<usize, ServerError> {
    let mut accepted = 0;
    while counts.connections.load(Ordering::SeqCst) < cap {
        match listener.accept() {
            Ok((stream, _)) => {
                if *exhausted {
                    log::info!("accepting connections again");
                    *exhausted = false;
                }
                waiting.push(Waiting {
                    stream,
                    until: Instant::now() + REQUEST_TIMEOUT,
                    live: Live::new(counts),
                });
                accepted += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if accepted == 0 {
                    // Readable with nothing to accept: never a hot loop on it.
                    *accept_after = Instant::now() + Duration::from_millis(1);
                }
                return Ok(accepted);
            }
            Err(e) => match accept_fault(&e) {
                AcceptFault::Retry => {
                    // Never a hot loop, whatever error keeps coming.
                    *accept_after = Instant::now() + Duration::from_millis(1);
                    return Ok(accepted);
                }
                AcceptFault::Exhausted => {
                    if !*exhausted {
                        log::warn!("accepting a connection failed: {e}; retrying");
                    }
                    *exhausted = true;
                    *accept_after = Instant::now() + BACKOFF;
                    return Ok(accepted);
                }
                AcceptFault::Fatal => {
                    log::error!("accepting a connection failed: {e}");
                    return Err(ServerError::Accept(e));
                }
            },
        }
    }
    Ok(accepted)
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

/// Serves one connection the loop handed over: first the rest of an answer, if any, then each
/// request, which must arrive in full by its deadline ([`REQUEST_TIMEOUT`] after the
/// connection was accepted or its previous answer written); the loop gets it whole.
fn connection(stream: &UnixStream, start: Handoff, to_loop: &ToLoop) {
    if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
        log::warn!("cannot set a write timeout on a connection: {e}");
        return;
    }
    let send = |bytes: &[u8]| {
        let mut w = stream;
        w.write_all(bytes).and_then(|()| w.flush())
    };
    let (read, until) = match start {
        Handoff::Read { bytes, until } => (bytes, until),
        Handoff::Write {
            rest,
            keep_alive,
            count,
        } => {
            let written = send(&rest);
            drop(count);
            if let Err(e) = written {
                log::warn!("answering a request failed: {e}");
                return;
            }
            if !keep_alive {
                return;
            }
            (Vec::new(), Instant::now() + REQUEST_TIMEOUT)
        }
    };
    let mut reader = BufReader::new(io::Cursor::new(read).chain(Deadlined { stream, until }));
    let refuse = |status: u16, why: &str, head_only: bool, extra: &[(&str, &str)]| {
        log::warn!("refused a request: {why}");
        let _ = send(&http::answer(status, PLAIN, why, true, head_only, extra));
    };
    let timed_out = format!(
        "request not received within {} s",
        REQUEST_TIMEOUT.as_secs()
    );
    loop {
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
        if !to_loop.send(job) {
            return;
        }
        // The loop answers every request it takes; an error means it stopped first.
        let Ok(answer) = answer.recv() else { return };
        // What the loop could not write at once.
        let written = answer
            .written
            .and_then(|done| match answer.bytes.get(done..) {
                Some(rest) if !rest.is_empty() => send(rest),
                _ => Ok(()),
            });
        drop(answer.unwritten);
        if let Err(e) = written {
            log::warn!("answering a request failed: {e}");
            return;
        }
        if !keep_alive {
            return;
        }
        reader.get_mut().get_mut().1.until = Instant::now() + REQUEST_TIMEOUT;
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
