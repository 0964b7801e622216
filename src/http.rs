//! HTTP/1.x framing for the socket loop: reads one request (request line, headers, and a body
//! framed by Content-Length or chunked coding) from a buffered stream, bounded in size, and
//! formats answers with tiny_http's response writer. Knows nothing of sockets or of what the
//! requests mean; a stream that times out shows up here as an `io::ErrorKind::TimedOut` read.

use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// A request line and headers larger than this are refused (431).
pub const MAX_HEAD_BYTES: u64 = 16 * 1024;
/// More header lines than this are refused (431).
const MAX_HEADERS: usize = 100;
/// A body declared larger than the limit, but no larger than this, is read and thrown away
/// before the refusal is sent, so that a client writing it can finish and read the answer.
const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;
/// A chunk-size line longer than this is malformed.
const MAX_CHUNK_LINE: u64 = 1024;

/// A request's line and headers, as far as the loop needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target up to any `?`.
    pub path: String,
    /// The client may send another request on this connection after the answer.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expects_continue: bool,
    framing: Framing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

impl Head {
    /// True if a body follows the head.
    pub fn has_body(&self) -> bool {
        self.framing != Framing::Length(0)
    }
}

/// Why no request head was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// The connection ended, or stayed silent until its deadline, before a request began: close
    /// it without an answer (this is how an idle keep-alive connection ends).
    Idle,
    /// The client went away in the middle of the head.
    Closed,
    /// The head did not arrive before the deadline.
    TimedOut,
    /// Not a request this server takes: the status to answer with (400, 417, 431, 501, 505),
    /// and why.
    Refused(u16, String),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Idle => write!(f, "no request"),
            HeadError::Closed => write!(f, "connection closed in the middle of a request"),
            HeadError::TimedOut => write!(f, "request head not received in time"),
            HeadError::Refused(status, why) => write!(f, "{why} ({status})"),
        }
    }
}

/// Why a request's body was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFault {
    /// Over the limit; the rest of it was not read, so the connection must close.
    TooLarge,
    /// Broken chunked coding.
    Malformed(String),
    /// The client went away before the end of the body.
    Closed,
    /// The body did not arrive before the deadline.
    TimedOut,
}

fn refused(status: u16, why: impl Into<String>) -> HeadError {
    HeadError::Refused(status, why.into())
}

/// One line (up to LF, CR LF removed) of at most `budget` bytes, which is reduced by what was
/// read. `Ok(None)` means the stream ended before any byte of the line.
fn read_line(r: &mut impl BufRead, budget: &mut u64) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    let result = r.by_ref().take(*budget).read_until(b'\n', &mut line);
    *budget -= line.len() as u64;
    match result {
        Ok(_) if line.last() == Some(&b'\n') => {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Ok(Some(line))
        }
        Ok(0) => Ok(None),
        Ok(_) if *budget == 0 => Err(LineError::TooLong),
        Ok(_) => Err(LineError::Closed),
        Err(e) if e.kind() == io::ErrorKind::TimedOut && line.is_empty() => {
            Err(LineError::TimedOut { started: false })
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(LineError::TimedOut { started: true }),
        Err(_) => Err(LineError::Closed),
    }
}

enum LineError {
    TooLong,
    Closed,
    TimedOut { started: bool },
}

/// A token as RFC 9110 defines it (method names, header names).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads a request line and headers.
pub fn read_head(r: &mut impl BufRead) -> Result<Head, HeadError> {
    let mut budget = MAX_HEAD_BYTES;
    let too_large = || refused(431, format!("request head over {MAX_HEAD_BYTES} bytes"));
    // RFC 9112 2.2: empty lines before a request line are ignored.
    let mut started = false;
    let line = loop {
        match read_line(r, &mut budget) {
            Ok(Some(line)) if line.is_empty() => started = true,
            Ok(Some(line)) => break line,
            Ok(None) if started => return Err(HeadError::Closed),
            Ok(None) => return Err(HeadError::Idle),
            Err(LineError::TooLong) => return Err(too_large()),
            Err(LineError::Closed) => return Err(HeadError::Closed),
            Err(LineError::TimedOut { started: s }) if started || s => {
                return Err(HeadError::TimedOut)
            }
            Err(LineError::TimedOut { .. }) => return Err(HeadError::Idle),
        }
    };
    let line = String::from_utf8(line).map_err(|_| refused(400, "request line is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(refused(400, format!("malformed request line {line:?}")));
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if is_http_version(v) => {
            return Err(refused(505, format!("{v} is not supported: use HTTP/1.1")))
        }
        _ => return Err(refused(400, format!("malformed request line {line:?}"))),
    };
    if !is_token(method) || target.is_empty() {
        return Err(refused(400, format!("malformed request line {line:?}")));
    }
    let path = target.split('?').next().unwrap_or_default().to_string();

    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let mut expects_continue = false;
    for count in 0.. {
        let line = match read_line(r, &mut budget) {
            Ok(Some(line)) => line,
            Ok(None) | Err(LineError::Closed) => return Err(HeadError::Closed),
            Err(LineError::TooLong) => return Err(too_large()),
            Err(LineError::TimedOut { .. }) => return Err(HeadError::TimedOut),
        };
        if line.is_empty() {
            break;
        }
        if count == MAX_HEADERS {
            return Err(refused(
                431,
                format!("more than {MAX_HEADERS} header lines"),
            ));
        }
        let malformed = || refused(400, "malformed header line");
        let line = String::from_utf8(line).map_err(|_| malformed())?;
        let (name, value) = line.split_once(':').ok_or_else(malformed)?;
        // Whitespace before the colon, or a folded line, is refused (RFC 9112 5.1, 5.2).
        if !is_token(name) {
            return Err(malformed());
        }
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n = value
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| value.parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| refused(400, format!("bad Content-Length {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(refused(400, "conflicting Content-Length headers"));
                }
                length = Some(n);
            }
            "transfer-encoding" => codings.extend(
                value
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            ),
            "connection"
                if value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close")) =>
            {
                keep_alive = false;
            }
            "expect" if value.eq_ignore_ascii_case("100-continue") => expects_continue = true,
            "expect" => return Err(refused(417, format!("cannot meet Expect: {value}"))),
            _ => {}
        }
    }
    let framing = match (codings.as_slice(), length) {
        ([], length) => Framing::Length(length.unwrap_or(0)),
        // Both is how requests are smuggled past proxies (RFC 9112 6.3).
        (_, Some(_)) => {
            return Err(refused(
                400,
                "both Content-Length and Transfer-Encoding given",
            ))
        }
        ([only], None) if only == "chunked" => Framing::Chunked,
        (codings, None) => {
            return Err(refused(
                501,
                format!(
                    "transfer coding {:?} is not supported: send the body with Content-Length",
                    codings.join(", ")
                ),
            ))
        }
    };
    Ok(Head {
        method: method.to_string(),
        path,
        keep_alive,
        expects_continue,
        framing,
    })
}

/// `HTTP/` followed by a version number: a version this server may not speak, but HTTP.
fn is_http_version(v: &str) -> bool {
    v.strip_prefix("HTTP/").is_some_and(|n| {
        !n.is_empty()
            && n.split('.').count() <= 2
            && n.split('.')
                .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn body_io(e: io::Error) -> BodyFault {
    match e.kind() {
        io::ErrorKind::TimedOut => BodyFault::TimedOut,
        _ => BodyFault::Closed,
    }
}

/// Reads the body that `head` announces, up to `limit` bytes.
pub fn read_body(r: &mut impl BufRead, head: &Head, limit: u64) -> Result<Vec<u8>, BodyFault> {
    match head.framing {
        Framing::Length(n) if n > limit => {
            // A client that waits for 100 Continue has not sent it.
            if n <= DRAIN_LIMIT && !head.expects_continue {
                let drained =
                    io::copy(&mut r.by_ref().take(n), &mut io::sink()).map_err(body_io)?;
                if drained < n {
                    return Err(BodyFault::Closed);
                }
            }
            Err(BodyFault::TooLarge)
        }
        Framing::Length(n) => {
            let mut body = Vec::new();
            let got = r.by_ref().take(n).read_to_end(&mut body).map_err(body_io)?;
            if (got as u64) < n {
                return Err(BodyFault::Closed);
            }
            Ok(body)
        }
        Framing::Chunked => read_chunked(r, limit),
    }
}

fn chunk_line(r: &mut impl BufRead) -> Result<Vec<u8>, BodyFault> {
    let mut budget = MAX_CHUNK_LINE;
    match read_line(r, &mut budget) {
        Ok(Some(line)) => Ok(line),
        Ok(None) | Err(LineError::Closed) => Err(BodyFault::Closed),
        Err(LineError::TooLong) => Err(BodyFault::Malformed("chunk line too long".into())),
        Err(LineError::TimedOut { .. }) => Err(BodyFault::TimedOut),
    }
}

/// Chunked coding (RFC 9112 7.1): size lines in hex (extensions ignored), data, CR LF; a zero
/// size, then trailer lines (ignored) up to an empty line.
fn read_chunked(r: &mut impl BufRead, limit: u64) -> Result<Vec<u8>, BodyFault> {
    let mut body = Vec::new();
    loop {
        let line = chunk_line(r)?;
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .map(|s| s.trim_matches([' ', '\t']))
            .filter(|s| !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| BodyFault::Malformed("bad chunk size".into()))?;
        if size == 0 {
            for _ in 0..=MAX_HEADERS {
                if chunk_line(r)?.is_empty() {
                    return Ok(body);
                }
            }
            return Err(BodyFault::Malformed("too many trailer lines".into()));
        }
        if body.len() as u64 + size > limit {
            return Err(BodyFault::TooLarge);
        }
        let got = r
            .by_ref()
            .take(size)
            .read_to_end(&mut body)
            .map_err(body_io)?;
        if (got as u64) < size {
            return Err(BodyFault::Closed);
        }
        if !chunk_line(r)?.is_empty() {
            return Err(BodyFault::Malformed(
                "chunk data longer than its size".into(),
            ));
        }
    }
}

/// An answer as bytes: status line, `Content-Type`, `Content-Length`, `Connection: close` if
/// `close`, any `extra` headers, and the body unless `head_only` (the answer to HEAD). Written
/// by tiny_http's response writer, which adds `Date` and `Server`.
pub fn answer(
    status: u16,
    content_type: &str,
    body: &str,
    close: bool,
    head_only: bool,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut response = tiny_http::Response::from_string(body).with_status_code(status);
    for (name, value) in [("Content-Type", content_type)].iter().chain(extra) {
        if let Ok(header) = tiny_http::Header::from_bytes(*name, *value) {
            response.add_header(header);
        }
    }
    let mut out = Vec::new();
    // No request headers are passed: they could ask for a transfer coding (TE), and a
    // Content-Length is simplest for every client. Writing into a Vec cannot fail.
    let _ = response.raw_print(&mut out, tiny_http::HTTPVersion(1, 1), &[], head_only, None);
    if close {
        // tiny_http's add_header drops any Connection header: put it after the status line.
        let at = out
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(out.len(), |i| i + 2);
        out.splice(at..at, b"Connection: close\r\n".iter().copied());
    }
    out
}

/// The interim answer a client sending `Expect: 100-continue` waits for.
pub fn write_continue(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Head, HeadError> {
        read_head(&mut io::Cursor::new(text.as_bytes()))
    }

    fn full(text: &str) -> (Head, Result<Vec<u8>, BodyFault>) {
        let mut r = io::Cursor::new(text.as_bytes());
        let h = read_head(&mut r).expect("head");
        let b = read_body(&mut r, &h, 16);
        (h, b)
    }

    fn status(e: Result<Head, HeadError>) -> u16 {
        match e {
            Err(HeadError::Refused(s, _)) => s,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn reads_what_dockerd_sends() {
        let (h, b) = full(
            "POST /IpamDriver.RequestPool?x=1 HTTP/1.1\r\nHost: \r\nContent-Length: 5\r\n\r\nhello",
        );
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, "/IpamDriver.RequestPool");
        assert!(h.keep_alive && !h.expects_continue && h.has_body());
        assert_eq!(b, Ok(b"hello".to_vec()));
    }

    #[test]
    fn connection_close_and_http_1_0_end_the_connection() {
        assert!(
            !head("POST / HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!head("POST / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
    }

    #[test]
    fn decodes_chunks_and_ignores_extensions_and_trailers() {
        let (_, b) = full(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
        );
        assert_eq!(b, Ok(b"abcde".to_vec()));
    }

    #[test]
    fn bodies_over_the_limit_are_refused() {
        let (_, b) = full("POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\n12345678901234567");
        assert_eq!(b, Err(BodyFault::TooLarge));
        let (_, b) = full("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n");
        assert_eq!(b, Err(BodyFault::TooLarge));
    }

    #[test]
    fn short_bodies_and_broken_chunks() {
        let (_, b) = full("POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc");
        assert_eq!(b, Err(BodyFault::Closed));
        for bad in ["zz\r\n", "3\r\nabcd\r\n", "fffffffffffffffff\r\n"] {
            let text = format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{bad}");
            assert!(
                matches!(full(&text).1, Err(BodyFault::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_frame() {
        assert_eq!(status(head("POST / HTTP/2.0\r\n\r\n")), 505);
        assert_eq!(status(head("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")), 505);
        assert_eq!(status(head("POST / HTTP/1.1 x\r\n\r\n")), 400);
        assert_eq!(status(head("POST /\r\n\r\n")), 400);
        assert_eq!(status(head("PO(ST / HTTP/1.1\r\n\r\n")), 400);
        assert_eq!(status(head("POST / FTP/1.1\r\n\r\n")), 400);
        assert_eq!(status(head("POST / HTTP/1.1\r\nA : b\r\n\r\n")), 400);
        assert_eq!(status(head("POST / HTTP/1.1\r\n folded\r\n\r\n")), 400);
        assert_eq!(
            status(head("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")),
            400
        );
        assert_eq!(
            status(head("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n")),
            400
        );
        assert_eq!(
            status(head(
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )),
            400
        );
        assert_eq!(
            status(head(
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            400
        );
        assert_eq!(
            status(head("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")),
            501
        );
        assert_eq!(
            status(head(
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            )),
            501
        );
        assert_eq!(
            status(head("POST / HTTP/1.1\r\nExpect: magic\r\n\r\n")),
            417
        );
        let long = format!("POST /{} HTTP/1.1\r\n\r\n", "a".repeat(20_000));
        assert_eq!(status(head(&long)), 431);
        let many = format!("POST / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(101));
        assert_eq!(status(head(&many)), 431);
    }

    #[test]
    fn silence_and_a_partial_head_differ() {
        assert_eq!(head(""), Err(HeadError::Idle));
        assert_eq!(head("POST / HT"), Err(HeadError::Closed));
        assert_eq!(head("POST / HTTP/1.1\r\nA: b\r\n"), Err(HeadError::Closed));
    }

    #[test]
    fn answers_with_a_length_and_no_body_for_head() {
        let text = String::from_utf8(answer(
            405,
            "text/plain",
            "no",
            true,
            false,
            &[("Allow", "POST")],
        ))
        .unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(text.contains("\r\nAllow: POST\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 2\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nno"), "{text}");
        let text = String::from_utf8(answer(405, "text/plain", "no", true, true, &[])).unwrap();
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }
}
