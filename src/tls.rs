//! TLS towards etcd: which certificate authorities to trust (the `--cacert` file, else the
//! system's CA bundle) and which client certificate to present, read from PEM files into the
//! `TlsConfig` of ureq's own rustls support; and which transport failures are TLS failures,
//! so that they are reported as certificate problems rather than as an unreachable etcd.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

/// Where distributions keep the system's trusted CAs as one PEM bundle, tried in order:
/// CentOS/RHEL (filled by `update-ca-trust`), then Debian/Ubuntu (`update-ca-certificates`).
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/certs/ca-certificates.crt",
];

/// The PEM files of the TLS settings, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) to trust instead of the system's (`--cacert`).
    pub cacert: Option<PathBuf>,
    /// Client certificate (`--cert`), with its key (`--key`); both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Why the TLS settings cannot be used.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read {
        flag: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    /// A file holds no PEM item of the kind needed (or malformed PEM).
    NoPem {
        flag: &'static str,
        path: PathBuf,
        wanted: &'static str,
    },
    /// rustls refuses the client certificate with this key (they do not belong together, or
    /// the key's kind is not supported).
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { flag, path, error } => {
                write!(f, "{flag} {}: {error}", path.display())
            }
            TlsError::NoPem { flag, path, wanted } => {
                write!(f, "{flag} {}: no PEM {wanted} in it", path.display())
            }
            TlsError::KeyMismatch { cert, key } => write!(
                f,
                "client certificate {} cannot be used with the key {}: they do not belong \
                 together, or the key's type is not supported (RSA, ECDSA P-256/P-384, Ed25519)",
                cert.display(),
                key.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {}

/// The ureq TLS configuration for `files`. Without `--cacert`, the first system CA bundle
/// that exists is trusted, as OpenSSL-based tools (and the original Go tool) do; only when
/// none exists, the Mozilla roots compiled into ureq.
pub fn config(files: &TlsFiles) -> Result<TlsConfig, TlsError> {
    let roots = match &files.cacert {
        Some(path) => RootCerts::from(certificates("--cacert", path)?),
        None => system_roots(),
    };
    let client_cert = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = certificates("--cert", cert)?;
            let key_pem = read("--key", key)?;
            let private_key = PrivateKey::from_pem(&key_pem).map_err(|_| TlsError::NoPem {
                flag: "--key",
                path: key.clone(),
                wanted: "private key",
            })?;
            let client = ClientCert::new_with_certs(&chain, private_key);
            check_client_cert(&client).map_err(|()| TlsError::KeyMismatch {
                cert: cert.clone(),
                key: key.clone(),
            })?;
            Some(client)
        }
        // The command line refuses one without the other.
        _ => None,
    };
    Ok(TlsConfig::builder()
        .root_certs(roots)
        .client_cert(client_cert)
        .build())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        error,
    })
}

/// Every certificate of a PEM file; at least one.
fn certificates(flag: &'static str, path: &Path) -> Result<Vec<Certificate<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certs = pem_certificates(&pem);
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            flag,
            path: path.to_path_buf(),
            wanted: "certificate",
        });
    }
    Ok(certs)
}

/// The certificates in PEM text; other items and malformed sections are skipped (a system
/// bundle may hold comments and trust attributes).
fn pem_certificates(pem: &[u8]) -> Vec<Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect()
}

/// The system's CA bundle, or ureq's compiled-in roots where there is none.
fn system_roots() -> RootCerts {
    for bundle in SYSTEM_CA_BUNDLES {
        let Ok(pem) = std::fs::read(bundle) else {
            continue;
        };
        let certs = pem_certificates(&pem);
        if !certs.is_empty() {
            log::debug!("trusting the {} CAs of {bundle}", certs.len());
            return RootCerts::from(certs);
        }
    }
    log::debug!(
        "no system CA bundle ({}): trusting the roots compiled in",
        SYSTEM_CA_BUNDLES.join(", ")
    );
    RootCerts::WebPki
}

/// Whether rustls accepts this certificate and key together.
///
/// ureq 3.5 hands them to rustls only when it opens its first https connection, and there
/// `expect`s the result: a key that does not fit the certificate panics inside the request
/// (tests/tls_shortfalls.rs shows it). So the same step is taken here once, up front, on a
/// throwaway agent connecting to a loopback listener of our own that hangs up at once; a
/// panic is caught and becomes an error. The panic hook is silenced meanwhile: this runs
/// while the process starts, before it has other threads that could panic.
fn check_client_cert(client: &ClientCert) -> Result<(), ()> {
    let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
        // No loopback: skip the check; a bad key then shows as a panic at the first request.
        return Ok(());
    };
    let Ok(addr) = listener.local_addr() else {
        return Ok(());
    };
    let hang_up = std::thread::spawn(move || {
        let _ = listener.accept();
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::Specific(Default::default()))
                .client_cert(Some(client.clone()))
                .build(),
        )
        .timeout_global(Some(std::time::Duration::from_secs(2)))
        .proxy(None)
        .build()
        .into();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // The agent is thrown away after a panic: nothing observes a broken invariant.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        // Fails either way (nothing speaks TLS there): only a panic matters.
        let _ = agent.get(format!("https://{addr}/")).call();
    }));
    std::panic::set_hook(hook);
    let _ = hang_up.join();
    outcome.map_err(|_| ())
}

/// What went wrong in TLS, if a transport failure is a TLS failure: rustls reports a refused
/// certificate (ours or the server's), a TLS alert from the peer, or a handshake it cannot
/// complete as `InvalidData` I/O errors carrying its own error.
pub fn failure(e: &ureq::Error) -> Option<String> {
    match e {
        ureq::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
            let text = io.to_string();
            let tls = [
                "certificate",
                "alert",
                "handshake",
                "peer",
                "HandshakeFailure",
            ]
            .iter()
            .any(|w| text.contains(w));
            tls.then_some(text)
        }
        ureq::Error::Tls(text) => Some(text.to_string()),
        _ => None,
    }
}

/// A person's explanation of a TLS failure's text; `sent_cert`: whether a client
/// certificate was configured (etcd answers a missing one with the same alert as a bad one).
pub fn advice(text: &str, sent_cert: bool) -> &'static str {
    let text = text.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if has(&["unknownissuer", "unknown issuer"]) {
        "the server's certificate is not signed by a trusted CA (give the CA with --cacert)"
    } else if has(&["notvalidforname", "not valid for name"]) {
        "the server's certificate does not name the host in the endpoint URL"
    } else if has(&["expired", "notvalidyet", "not valid yet"]) {
        "a certificate is outside its validity period"
    } else if !sent_cert && has(&["alert"]) {
        "etcd requires a client certificate (give --cert and --key)"
    } else if has(&[
        "badcertificate",
        "unknownca",
        "unknown ca",
        "bad certificate",
    ]) {
        "etcd refused the client certificate (is it signed by etcd's --trusted-ca-file?)"
    } else {
        "the TLS handshake failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_with_comments_yields_its_certificates_only() {
        // Not a real certificate: PEM framing is all that parse_pem checks.
        let pem = b"# a comment\n-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\ntrailing\n";
        assert_eq!(pem_certificates(pem).len(), 1);
        assert!(pem_certificates(b"nothing here").is_empty());
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            cacert: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = config(&files).expect_err("a missing CA file was accepted");
        assert!(
            err.to_string()
                .starts_with("--cacert /nonexistent/ca.pem: "),
            "{err}"
        );
    }

    #[test]
    fn each_failure_gets_its_advice() {
        assert!(advice("invalid peer certificate: UnknownIssuer", true).contains("--cacert"));
        assert!(advice("received fatal alert: BadCertificate", false).contains("--cert"));
        assert!(advice("received fatal alert: BadCertificate", true).contains("refused"));
        assert!(advice("invalid peer certificate: NotValidForName", true).contains("host"));
    }
}
