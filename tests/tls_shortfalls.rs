//! What ureq 3.5 does with TLS settings that src/tls.rs works around, shown on ureq alone, so
//! that an upgrade that fixes it makes a test here fail and the workaround can be dropped:
//! a client certificate whose key does not belong to it is accepted when the agent is built
//! and panics inside the first https request (rustls refuses the pair and ureq `expect`s
//! it), instead of returning an error. src/tls.rs builds the pair once at start, catching
//! the panic, and reports "cannot be used with the key"; tests/secure_etcd.rs checks that.

mod common;

use common::Pki;
use oam_docker_ipam::tls::{self, TlsError, TlsFiles};
use std::net::TcpListener;
use std::sync::Mutex;
use ureq::tls::{Certificate, ClientCert, PrivateKey, TlsConfig};

/// The panic hook is process-wide: one test at a time touches it.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn a_client_key_that_is_not_the_certificates_panics_inside_the_request() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pki = Pki::new("shortfall");
    let cert = std::fs::read(pki.path("client.crt")).unwrap();
    let other_key = std::fs::read(pki.path("server.key")).unwrap();
    let client = ClientCert::new_with_certs(
        &[Certificate::from_pem(&cert).expect("a PEM certificate")],
        PrivateKey::from_pem(&other_key).expect("a PEM key"),
    );
    // Building the agent accepts the pair.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(TlsConfig::builder().client_cert(Some(client)).build())
        .timeout_global(Some(std::time::Duration::from_secs(2)))
        .build()
        .into();
    // Something that accepts TCP connections, so that ureq gets as far as TLS.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/", listener.local_addr().unwrap());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = agent.get(&url).call();
    }));
    std::panic::set_hook(hook);
    let panic = outcome.expect_err("ureq returned instead of panicking: drop the check in tls.rs");
    let said = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(said.contains("valid client auth certificate"), "{said}");

    // The workaround: the same pair is an error up front.
    let files = TlsFiles {
        cacert: Some(pki.path("ca.crt").into()),
        cert: Some(pki.path("client.crt").into()),
        key: Some(pki.path("server.key").into()),
    };
    let err = tls::config(&files).expect_err("a mismatched key was accepted");
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    let files = TlsFiles {
        key: Some(pki.path("client.key").into()),
        ..files
    };
    assert!(tls::config(&files).is_ok());
}
