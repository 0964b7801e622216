//! The command line and the plugin against an etcd that serves only TLS from a private CA
//! (made by the test with the openssl CLI), requires client certificates and has auth
//! enabled, with a user whose role is limited to one prefix and tokens that die after 2 s
//! unused. Also: each refusal names its cause (certificate, authentication, permission), the
//! password shows in no process's arguments and no log, and a settings file given with
//! `--config` supplies endpoints, TLS files and the user.

mod common;

use common::{
    fails, ok, stderr, unique_prefix, Etcd, Pki, PluginClient, Server, TempDir, BIN, SECURE_PREFIX,
    SECURE_USER,
};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

/// The password of `SECURE_USER`: distinctive, so that finding it anywhere is meaningful.
fn password() -> String {
    format!("pw-{}-Zq7", std::process::id())
}

/// One secure etcd and its certificates for this test binary, and a password file.
struct Secure {
    pki: Pki,
    etcd: Etcd,
    password_file: String,
}

fn secure() -> &'static Secure {
    static SECURE: OnceLock<Secure> = OnceLock::new();
    SECURE.get_or_init(|| {
        let pki = Pki::new("secure");
        let etcd = Etcd::start_secure("secure", &pki, &password());
        let password_file = pki.path("password");
        std::fs::write(&password_file, format!("{}\n", password())).expect("password file");
        Secure {
            pki,
            etcd,
            password_file,
        }
    })
}

/// A store prefix the user's role covers.
fn prefix(tag: &str) -> String {
    format!("{SECURE_PREFIX}{}", unique_prefix(tag))
}

/// Global flags for the secure etcd: endpoint, prefix, CA, client certificate, user.
fn secure_args(s: &Secure, prefix: &str) -> Vec<String> {
    [
        "--cluster-store",
        &s.etcd.url,
        "--store-prefix",
        prefix,
        "--timeout",
        "2",
        "--cacert",
        &s.pki.path("ca.crt"),
        "--cert",
        &s.pki.path("client.crt"),
        "--key",
        &s.pki.path("client.key"),
        "--user",
        SECURE_USER,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// The binary with a clean environment for the settings it reads.
fn bin() -> Command {
    let mut command = Command::new(BIN);
    for name in [
        "CLUSTER_STORE",
        "DEBUG",
        "IPAM_STORE_PREFIX",
        "IPAM_TIMEOUT",
        "IPAM_CACERT",
        "IPAM_CERT",
        "IPAM_KEY",
        "IPAM_USER",
        "IPAM_PASSWORD_FILE",
        "IPAM_PASSWORD",
    ] {
        command.env_remove(name);
    }
    // No settings file of the machine's: each test says what it uses.
    command.args(["--config", "/dev/null"]);
    command
}

/// The CLI with the secure flags, `extra` global flags and `args`; the password from
/// the password file.
fn cli(s: &Secure, prefix: &str, extra: &[&str], args: &[&str]) -> Output {
    bin()
        .args(secure_args(s, prefix))
        .args(["--password-file", &s.password_file])
        .args(extra)
        .args(args)
        .output()
        .expect("run the binary")
}

fn assert_no_password(what: &str, text: &str) {
    assert!(
        !text.contains(&password()),
        "the password shows in {what}: {text}"
    );
}

/// The arguments of every process on the machine, as one text.
fn all_argv() -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            all.push_str(&String::from_utf8_lossy(&cmdline).replace('\0', " "));
            all.push('\n');
        }
    }
    all
}

fn mac(n: u8) -> String {
    format!("02:42:c0:00:02:{n:02x}")
}

fn request_address(c: &mut PluginClient, n: u8) -> String {
    let body = format!(
        r#"{{"PoolID":"192.0.2.0","Address":"","Options":{{"com.docker.network.endpoint.macaddress":"{}"}}}}"#,
        mac(n)
    );
    let reply = c.call("/IpamDriver.RequestAddress", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let address = reply.json()["Address"]
        .as_str()
        .expect("an address")
        .to_string();
    address.split('/').next().unwrap_or_default().to_string()
}

#[test]
fn pools_the_plugin_and_releases_work_over_tls_with_client_certificates_and_auth() {
    let s = secure();
    let p = prefix("pools");
    let out = ok(cli(
        s,
        &p,
        &[],
        &[
            "host-range",
            "--ip-start",
            "192.0.2.4/24",
            "--ip-end",
            "192.0.2.6/24",
            "--gateway",
            "192.0.2.1",
        ],
    ));
    assert!(out.contains("3 added"), "{out}");
    // The password in the environment this time, as a one-off user would give it.
    let out = bin()
        .args(secure_args(s, &p))
        .env("IPAM_PASSWORD", password())
        .args([
            "ip-range",
            "--ip-start",
            "192.0.2.100/24",
            "--ip-end",
            "192.0.2.102/24",
        ])
        .output()
        .expect("run the binary");
    assert_no_password("ip-range's output", &stderr(&out));
    let out = ok(out);
    assert!(out.contains("3 added"), "{out}");

    // The plugin, with --debug so that its log says as much as it ever does.
    let dir = TempDir::new("secure-plugin");
    let socket = dir.join("talkingdata.sock");
    let mut command = bin();
    command.args(secure_args(s, &p)[6..].iter()).args([
        "--password-file",
        &s.password_file,
        "--debug",
    ]);
    let mut server = Server::start_with(command, &s.etcd.url, &p, &socket, &socket);
    let mut c = PluginClient::connect(&socket);
    let pool = c.call("/IpamDriver.RequestPool", r#"{"Pool":"192.0.2.0/24"}"#);
    assert_eq!(pool.status, 200, "{}", pool.body);
    let first = request_address(&mut c, 1);
    // Longer than --auth-token-ttl 2: the token dies unused, and is renewed.
    std::thread::sleep(Duration::from_secs(3));
    let second = request_address(&mut c, 2);
    assert_ne!(first, second);
    let assigned: Vec<String> = s
        .etcd
        .dump(&format!("{p}/containers/192.0.2.0/assigned/"))
        .into_iter()
        .map(|(k, _)| k.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(assigned.len(), 2, "{assigned:?}");
    let release = c.call(
        "/IpamDriver.ReleaseAddress",
        &format!(r#"{{"PoolID":"192.0.2.0","Address":"{first}"}}"#),
    );
    assert_eq!(release.status, 200, "{}", release.body);
    assert_no_password("a process's arguments", &all_argv());
    assert!(server.signal_and_wait("TERM").success());
    let log = server.log();
    assert!(log.contains("authenticated as"), "{log}");
    assert!(log.contains("token expired"), "no renewal logged: {log}");
    assert_no_password("the plugin's log", &log);

    // release-ip of the one still held (a container's: --force).
    let out = ok(cli(
        s,
        &p,
        &[],
        &["release-ip", "--force", "--ip", &format!("{second}/24")],
    ));
    assert!(out.contains(&format!("released {second}")), "{out}");
    let dump = s.etcd.dump(&format!("{p}/"));
    assert!(
        !dump.iter().any(|(k, _)| k.contains("/assigned/")),
        "{dump:?}"
    );
    assert_eq!(
        dump.iter().filter(|(k, _)| k.contains("/pool/")).count(),
        6,
        "{dump:?}"
    );
}

#[test]
fn a_wrong_ca_fails_naming_the_certificate_and_tries_no_other_endpoint() {
    let s = secure();
    let p = prefix("wrong-ca");
    let out = bin()
        .args(secure_args(s, &p))
        .args(["--password-file", &s.password_file])
        .args(["--cacert", &s.pki.path("other-ca.crt")])
        .args([
            "ip-range",
            "--ip-start",
            "192.0.2.1/24",
            "--ip-end",
            "192.0.2.2/24",
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!err.contains("unreachable"), "{err}");
    assert!(err.contains(&s.etcd.url), "{err}");
    fails(out, 1, "certificate problem");
    // Without --cacert the system's CAs are trusted, which do not include the test's CA.
    let mut args = secure_args(s, &p);
    args.drain(6..8);
    let out = bin()
        .args(args)
        .args(["--password-file", &s.password_file])
        .args([
            "ip-range",
            "--ip-start",
            "192.0.2.1/24",
            "--ip-end",
            "192.0.2.2/24",
        ])
        .output()
        .unwrap();
    fails(out, 1, "not signed by a trusted CA");
    assert!(s.etcd.dump(&format!("{p}/")).is_empty());
}

#[test]
fn client_certificate_problems_are_named() {
    let s = secure();
    let p = prefix("client-cert");
    let range = [
        "ip-range",
        "--ip-start",
        "192.0.2.1/24",
        "--ip-end",
        "192.0.2.2/24",
    ];
    // None at all.
    let mut args = secure_args(s, &p);
    args.drain(8..12);
    let out = bin()
        .args(args)
        .args(["--password-file", &s.password_file])
        .args(range)
        .output()
        .unwrap();
    fails(
        out,
        1,
        "etcd requires a client certificate (give --cert and --key)",
    );
    // One with a CommonName, which the gateway refuses.
    let with_cn = [
        "--cert",
        &s.pki.path("client-cn.crt"),
        "--key",
        &s.pki.path("client-cn.key"),
    ];
    fails(cli(s, &p, &with_cn, &range), 1, "has a CommonName (CN)");
    // A key that is not the certificate's: refused before any request.
    let wrong_key = ["--key", &s.pki.path("server.key")];
    fails(
        cli(s, &p, &wrong_key, &range),
        2,
        "cannot be used with the key",
    );
    let missing = ["--cacert", "/nonexistent/ca.pem"];
    fails(
        cli(s, &p, &missing, &range),
        2,
        "--cacert /nonexistent/ca.pem",
    );
    assert!(s.etcd.dump(&format!("{p}/")).is_empty());
}

#[test]
fn a_wrong_password_or_a_foreign_prefix_fails_naming_authentication_or_permission() {
    let s = secure();
    let p = prefix("wrong-password");
    let range = [
        "ip-range",
        "--ip-start",
        "192.0.2.1/24",
        "--ip-end",
        "192.0.2.2/24",
    ];
    let out = bin()
        .args(secure_args(s, &p))
        .env("IPAM_PASSWORD", "not-the-password")
        .args(range)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!err.contains("not-the-password"), "{err}");
    fails(out, 1, "authentication of etcd user \"ipam\" failed");
    // No user at all.
    let mut args = secure_args(s, &p);
    args.truncate(12);
    let out = bin().args(args).args(range).output().unwrap();
    fails(out, 1, "requires authentication");
    // A prefix outside the user's role.
    let foreign = unique_prefix("foreign");
    fails(cli(s, &foreign, &[], &range), 1, "permission denied");
    assert!(s.etcd.dump(&format!("{p}/")).is_empty());
    assert!(s.etcd.dump(&format!("{foreign}/")).is_empty());
    // On the command line, never.
    let out = bin()
        .args(secure_args(s, &p))
        .args(["--password", "on-the-command-line"])
        .args(range)
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("on-the-command-line"));
    fails(out, 2, "not taken from the command line");
}

#[test]
fn the_command_line_takes_endpoints_tls_files_and_the_user_from_a_config_file() {
    let s = secure();
    let p = prefix("config");
    let dir = TempDir::new("secure-config");
    let config = dir.join("oam-docker-ipam");
    std::fs::write(
        &config,
        format!(
            "# as the package's file, filled in\nCLUSTER_STORE={}\nIPAM_STORE_PREFIX=\"{p}\"\n\
             IPAM_CACERT={}\nIPAM_CERT={}\nIPAM_KEY={}\nIPAM_USER={SECURE_USER}\n\
             IPAM_PASSWORD_FILE={}\nOPTIONS=--debug\n",
            s.etcd.url,
            s.pki.path("ca.crt"),
            s.pki.path("client.crt"),
            s.pki.path("client.key"),
            s.password_file
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let run = |extra: &[&str]| {
        let mut command = bin();
        command.args(["--config", &config]).args(extra).args([
            "ip-range",
            "--ip-start",
            "192.0.2.1/24",
            "--ip-end",
            "192.0.2.2/24",
        ]);
        command.output().unwrap()
    };
    let out = ok(run(&[]));
    assert!(out.contains("2 added"), "{out}");
    assert_eq!(s.etcd.dump(&format!("{p}/")).len(), 3);
    // A flag beats the file: another CA, and the same refusal as without the file.
    fails(
        run(&["--cacert", &s.pki.path("other-ca.crt")]),
        1,
        "certificate problem",
    );
    // A file that does not exist is an error when named.
    let out = bin()
        .args(["--config", "/nonexistent/oam-docker-ipam", "ip-range"])
        .args(["--ip-start", "192.0.2.1/24", "--ip-end", "192.0.2.2/24"])
        .output()
        .unwrap();
    fails(out, 2, "--config /nonexistent/oam-docker-ipam: ");
}
