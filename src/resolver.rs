//! Turning an etcd endpoint's host into socket addresses without a thread per request:
//! literal addresses are used as they are, names are looked up on the calling thread.
//!
//! ureq's own resolver starts a thread for every lookup when a timeout is set, even for
//! `127.0.0.1`, so that the lookup can be abandoned at the timeout. Endpoints are nearly
//! always literal addresses; a name is looked up with the system resolver, bounded by its own
//! timeouts (`/etc/resolv.conf`) rather than by `--timeout`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// The resolver the etcd client's agent uses.
#[derive(Debug, Default)]
pub struct InPlace;

impl Resolver for InPlace {
    fn resolve(
        &self,
        uri: &Uri,
        _config: &Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let authority = uri
            .authority()
            .ok_or_else(|| ureq::Error::BadUri(format!("{uri} has no host")))?;
        let port = match (authority.port_u16(), uri.scheme_str()) {
            (Some(port), _) => port,
            (None, Some("https")) => 443,
            (None, _) => 80,
        };
        let host = authority.host();
        let mut found = self.empty();
        // "[::1]" is how a URI writes an IPv6 literal.
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            found.push(SocketAddr::new(ip, port));
            return Ok(found);
        }
        for addr in (host, port).to_socket_addrs()? {
            // Keeps what fits (16), as ureq's own resolver does.
            if found.try_push(addr).is_err() {
                break;
            }
        }
        if found.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(found)
    }
}
