//! The socket loop: HTTP on a Unix socket, bound here or inherited through systemd socket
//! activation, one request handled at a time on one thread, until SIGTERM or SIGINT. Knows
//! nothing of what the requests mean.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Requests with a larger body are refused unread.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

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
    /// The HTTP server could not start on the listener.
    Http(String),
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
            ServerError::Http(e) => write!(f, "cannot serve HTTP: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// Where requests come from.
pub enum Listener {
    /// A socket this process bound (tiny_http unlinks its file when the server is dropped).
    Bound(UnixListener),
    /// A socket systemd passed in; systemd owns its file.
    Inherited(UnixListener),
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
fn inherited() -> Option<UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
    let fds: i32 = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: under the protocol checked above, fd 3 is an open listening socket handed to
    // this process and to nothing else in it.
    Some(unsafe { UnixListener::from_raw_fd(SD_LISTEN_FDS_START) })
}

/// The listener to serve: systemd's, if it passed one, else `path` bound here with mode 0660.
/// A socket file left by a dead server is replaced; one a live server answers on is not.
pub fn listen(path: &Path) -> Result<Listener, ServerError> {
    if let Some(listener) = inherited() {
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
    let permissions = std::fs::Permissions::from_mode(0o660);
    if let Err(e) = std::fs::set_permissions(path, permissions) {
        let _ = std::fs::remove_file(path);
        return Err(socket_error(e));
    }
    log::info!("listening on {}", path.display());
    Ok(Listener::Bound(listener))
}

/// Serves `handler` until SIGTERM or SIGINT, then finishes the request in hand, removes the
/// socket file it bound, and returns.
pub fn serve(
    listener: Listener,
    mut handler: impl FnMut(&str, Result<&[u8], BodyError>) -> Reply,
) -> Result<(), ServerError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(ServerError::Signals)?;
    }
    let (unix, inherited) = match listener {
        Listener::Bound(listener) => (listener, false),
        Listener::Inherited(listener) => (listener, true),
    };
    let server = tiny_http::Server::from_listener(unix, None)
        .map_err(|e| ServerError::Http(e.to_string()))?;
    while !stop.load(Ordering::Relaxed) {
        match server.recv_timeout(POLL) {
            Ok(Some(request)) => answer(request, &mut handler),
            Ok(None) => {}
            Err(e) => log::warn!("receiving a request failed: {e}"),
        }
    }
    log::info!("stopping on signal");
    if inherited {
        // tiny_http's drop unlinks the socket's path, which belongs to systemd's socket unit:
        // dockerd would no longer find the plugin. The process exits next; let it go undropped.
        std::mem::forget(server);
    }
    // Dropping the server unlinks the socket file this process bound.
    Ok(())
}

fn answer(
    mut request: tiny_http::Request,
    handler: &mut impl FnMut(&str, Result<&[u8], BodyError>) -> Reply,
) {
    let path = request
        .url()
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut body = Vec::new();
    let read = match request.body_length() {
        Some(len) if len as u64 > MAX_BODY_BYTES => Err(BodyError::TooLarge {
            limit: MAX_BODY_BYTES,
        }),
        _ => match request
            .as_reader()
            .take(MAX_BODY_BYTES + 1)
            .read_to_end(&mut body)
        {
            Ok(_) if body.len() as u64 > MAX_BODY_BYTES => Err(BodyError::TooLarge {
                limit: MAX_BODY_BYTES,
            }),
            Ok(_) => Ok(body.as_slice()),
            Err(e) => Err(BodyError::Unreadable(e.to_string())),
        },
    };
    log::debug!("{} {path} ({} bytes)", request.method(), body.len());
    let reply = handler(&path, read);
    let mut response = tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
    if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", reply.content_type) {
        response.add_header(header);
    }
    if let Err(e) = request.respond(response) {
        log::warn!("answering {path} failed: {e}");
    }
}
