//! Test helpers: a real etcd on free loopback ports (also one with TLS, client certificates
//! and auth, from a CA made with the openssl CLI), the binary under test, a client for the
//! plugin's Unix socket that speaks like dockerd, and a reader of etcd through etcdctl; in
//! `cluster`, an etcd cluster whose members a test can kill, pause and restart.
#![allow(dead_code)]

pub mod cluster;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_oam-docker-ipam");

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("oam-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `url` (`scheme://host:port`) with another port.
fn on_port(url: &str, port: u16) -> String {
    let host = url.rsplit_once(':').map_or(url, |(host, _)| host);
    format!("{host}:{port}")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("port")
        .port()
}

/// An etcd server (Debian's etcd-server) on loopback. A shell watchdog stops it by PID when
/// the test process exits, so a failing or aborted test binary never leaves it running.
pub struct Etcd {
    pub url: String,
    peer_url: String,
    dir: PathBuf,
    watchdog: Option<Child>,
    /// Extra flags for etcd (e.g. `--enable-v2=true`).
    extra: String,
    /// Another address of this machine that etcd also listens on, same port.
    also_on: Option<String>,
    /// For an etcd with TLS: the files etcdctl uses, and root's password once auth is on.
    client_tls: Option<ClientTls>,
}

/// How etcdctl reaches an etcd with TLS and auth.
struct ClientTls {
    cacert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    root_password: Option<String>,
}

/// The user and prefix `Etcd::start_secure` sets up: the user's role may read and write
/// only keys under `SECURE_PREFIX`.
pub const SECURE_USER: &str = "ipam";
pub const SECURE_PREFIX: &str = "/secure";

/// Certificates made with the openssl CLI in a scratch directory (removed on drop): a CA,
/// etcd's server certificate for 127.0.0.1 and localhost, a client certificate whose subject
/// has no CommonName (etcd's JSON gateway refuses one with a CN), one with a CN, and a
/// second CA that signed nothing etcd trusts.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = TempDir::new(&format!("pki-{tag}"));
        let script = r#"
            set -e
            cd "$1"
            ca() { openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.crt"                        -days 2 -subj "/CN=$2" 2>/dev/null; }
            signed() { # name subject extensions
                openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
                printf '%b' "$3" >"$1.ext"
                openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial                     -out "$1.crt" -days 2 -extfile "$1.ext" 2>/dev/null
            }
            ca ca "oam-docker-ipam test CA"
            ca other-ca "another CA"
            signed server "/CN=etcd" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth
"
            signed client "/O=oam-docker-ipam" "extendedKeyUsage=clientAuth
"
            signed client-cn "/O=oam-docker-ipam/CN=ipam" "extendedKeyUsage=clientAuth
"
        "#;
        let out = Command::new("sh")
            .args(["-c", script, "pki"])
            .arg(&dir.0)
            .output()
            .expect("the openssl CLI is installed (tests/run-all.sh installs it)");
        ok_in("making test certificates with openssl", out);
        // A Pki kept in a static is never dropped: remove it when this process exits.
        let _ = Command::new("sh")
            .args([
                "-c",
                r#"while kill -0 "$1" 2>/dev/null; do sleep 0.5; done; rm -rf "$2""#,
                "pki-watchdog",
            ])
            .arg(std::process::id().to_string())
            .arg(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Etcd {
    /// Starts an etcd of its own (for tests that stop it).
    pub fn start(tag: &str) -> Etcd {
        Etcd::start_with(tag, "")
    }

    /// Starts an etcd of its own that also serves the v2 API, as the original tool used it.
    pub fn start_v2(tag: &str) -> Etcd {
        Etcd::start_with(tag, "--enable-v2=true")
    }

    /// Like `start_v2`, also listening on `addr` (an address a test gave a namespace's peer).
    pub fn start_v2_also_on(tag: &str, addr: &str) -> Etcd {
        let mut etcd = Etcd::prepare(tag, "--enable-v2=true");
        etcd.also_on = Some(addr.into());
        etcd.run_first();
        etcd
    }

    /// The URL of the extra address, if any.
    pub fn also_url(&self) -> Option<String> {
        let port = self.url.rsplit(':').next()?;
        Some(format!("http://{}:{port}", self.also_on.as_ref()?))
    }

    fn start_with(tag: &str, extra: &str) -> Etcd {
        let mut etcd = Etcd::prepare(tag, extra);
        etcd.run_first();
        etcd
    }

    fn prepare(tag: &str, extra: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("oam-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        Etcd {
            url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir,
            watchdog: None,
            extra: extra.into(),
            also_on: None,
            client_tls: None,
        }
    }

    /// An etcd of its own serving https with certificates from `pki`, requiring client
    /// certificates, with auth enabled: `root` (password in etcdctl's environment only) and
    /// `SECURE_USER` with `password`, whose role reads and writes only under `SECURE_PREFIX`.
    /// Tokens die after 2 s unused (`--auth-token-ttl 2`).
    pub fn start_secure(tag: &str, pki: &Pki, password: &str) -> Etcd {
        let extra = format!(
            "--cert-file {} --key-file {} --trusted-ca-file {} --client-cert-auth              --auth-token simple --auth-token-ttl 2",
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt")
        );
        let mut etcd = Etcd::prepare(tag, &extra);
        etcd.url = etcd.url.replace("http://", "https://");
        etcd.client_tls = Some(ClientTls {
            cacert: pki.dir.join("ca.crt"),
            cert: pki.dir.join("client.crt"),
            key: pki.dir.join("client.key"),
            root_password: None,
        });
        etcd.run_first();
        let root_password = format!("root-{}", std::process::id());
        etcd.etcdctl_stdin(
            &["user", "add", "root", "--interactive=false"],
            &root_password,
        );
        etcd.etcdctl(&["user", "grant-role", "root", "root"]);
        etcd.etcdctl(&["role", "add", "ipam-role"]);
        let prefix = format!("{SECURE_PREFIX}/");
        etcd.etcdctl(&[
            "role",
            "grant-permission",
            "ipam-role",
            "--prefix=true",
            "readwrite",
            &prefix,
        ]);
        etcd.etcdctl_stdin(
            &["user", "add", SECURE_USER, "--interactive=false"],
            password,
        );
        etcd.etcdctl(&["user", "grant-role", SECURE_USER, "ipam-role"]);
        etcd.etcdctl(&["auth", "enable"]);
        if let Some(tls) = &mut etcd.client_tls {
            tls.root_password = Some(root_password);
        }
        etcd
    }

    /// Whether etcd answers its health check.
    fn healthy(&self) -> bool {
        match &self.client_tls {
            None => http_get(&self.url, "/health").is_some_and(|b| b.contains("true")),
            Some(_) => self
                .etcdctl_command(&["endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success()),
        }
    }

    /// etcdctl (API v3) against this etcd, with the TLS files and root's credentials (in its
    /// environment, not its arguments) where needed.
    fn etcdctl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url]);
        if let Some(tls) = &self.client_tls {
            command
                .arg("--cacert")
                .arg(&tls.cacert)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
            if let Some(password) = &tls.root_password {
                command.env("ETCDCTL_USER", format!("root:{password}"));
            }
        }
        command.args(args);
        command
    }

    /// Runs etcdctl with `input` on its stdin (a password for `--interactive=false`).
    fn etcdctl_stdin(&self, args: &[&str], input: &str) -> String {
        let mut child = self
            .etcdctl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = writeln!(stdin, "{input}");
        }
        let out = child.wait_with_output().expect("etcdctl");
        ok_in(&format!("etcdctl {args:?}"), out)
    }

    /// The etcd shared by every test of this test binary (each uses its own key prefix).
    pub fn shared() -> &'static Etcd {
        static SHARED: OnceLock<Etcd> = OnceLock::new();
        SHARED.get_or_init(|| Etcd::start("shared"))
    }

    /// The first start: the ports were free when `free_port` looked, but a connection of
    /// another test may take one as its own (ephemeral) port before etcd binds it; then etcd
    /// says so in its log and exits, and it is started again on other ports. A restart keeps
    /// its ports (its clients know them).
    fn run_first(&mut self) {
        for _ in 0..4 {
            match self.try_run() {
                Ok(()) => return,
                Err(log) if log.contains("address already in use") => {
                    self.stop();
                    let _ = std::fs::remove_file(self.dir.join("log"));
                    let _ = std::fs::remove_dir_all(self.dir.join("data"));
                    self.url = on_port(&self.url, free_port());
                    self.peer_url = on_port(&self.peer_url, free_port());
                }
                Err(log) => panic!("etcd did not become healthy at {}:\n{log}", self.url),
            }
        }
        panic!("etcd found its ports taken four times in a row");
    }

    fn run(&mut self) {
        if let Err(log) = self.try_run() {
            panic!("etcd did not become healthy at {}:\n{log}", self.url);
        }
    }

    /// Starts etcd and waits until it is healthy; its log if it is not within 20 s or exits.
    fn try_run(&mut self) -> Result<(), String> {
        assert!(
            Command::new("etcd")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "etcd is not installed: run the README's test command (apt-get install etcd-server)"
        );
        let script = r#"
            etcd --name t --data-dir "$1/data" --listen-client-urls "$2" --advertise-client-urls "$2" \
                 --listen-peer-urls "$3" --initial-advertise-peer-urls "$3" \
                 --initial-cluster "t=$3" $5 >>"$1/log" 2>&1 &
            pid=$!
            echo $pid >"$1/pid"
            while kill -0 "$4" 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 0.2; done
            kill $pid 2>/dev/null; wait $pid
            kill -0 "$4" 2>/dev/null || rm -rf "$1"
        "#;
        let child = Command::new("sh")
            .args(["-c", script, "etcd-watchdog"])
            .arg(&self.dir)
            .arg(match self.also_url() {
                Some(also) => format!("{},{also}", self.url),
                None => self.url.clone(),
            })
            .arg(&self.peer_url)
            .arg(std::process::id().to_string())
            .arg(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.watchdog = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.healthy() {
                return Ok(());
            }
            // The watchdog ends when etcd does.
            if self
                .watchdog
                .as_mut()
                .is_some_and(|w| w.try_wait().ok().flatten().is_some())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::fs::read_to_string(self.dir.join("log")).unwrap_or_default())
    }

    /// Stops etcd (by its PID) and waits for it to exit; the data stays for `restart`.
    pub fn stop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill")
                .arg(pid.trim())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.wait();
        }
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to etcd by its PID.
    pub fn signal(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("etcd's pid file");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), pid.trim()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Runs `etcdctl` (API v3) against this etcd; its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_command(args).output().expect("run etcdctl");
        ok_in(&format!("etcdctl {args:?}"), out)
    }

    /// Every key under `prefix` with its value, in key order.
    pub fn dump(&self, prefix: &str) -> Vec<(String, String)> {
        let text = self.etcdctl(&["get", "--prefix", prefix]);
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
            .collect()
    }

    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl(&["put", key, value]);
    }

    pub fn delete(&self, key: &str) {
        self.etcdctl(&["del", key]);
    }

    /// Writes `key` through the v2 API, as the original tool did.
    pub fn v2_put(&self, key: &str, value: &str) {
        let body = format!("value={}", percent_encode(value));
        let answer = http_request(&self.url, "PUT", &format!("/v2/keys{key}"), &body)
            .unwrap_or_else(|| panic!("etcd did not answer a v2 PUT of {key}"));
        assert!(
            answer.contains("\"action\":\"set\""),
            "v2 PUT {key}: {answer}"
        );
    }

    /// The v2 API's answer for `GET /v2/keys<key>?recursive=true&sorted=true`.
    pub fn v2_get(&self, key: &str) -> String {
        http_get(
            &self.url,
            &format!("/v2/keys{key}?recursive=true&sorted=true"),
        )
        .unwrap_or_else(|| panic!("etcd did not answer a v2 GET of {key}"))
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain HTTP GET over TCP to loopback; the body, or None if nothing answered.
pub fn http_get(base: &str, path: &str) -> Option<String> {
    http_request(base, "GET", path, "")
}

/// A plain HTTP/1.0 request over TCP to loopback with a form body; the answer's body.
fn http_request(base: &str, method: &str, path: &str, form: &str) -> Option<String> {
    let addr = base.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split("\r\n\r\n").nth(1).map(str::to_string)
}

/// The original tool's v2 dump (shared/fixtures/original/v2-keys.json), as (key, value)
/// leaves in key order.
pub fn original_v2_dump() -> Vec<(String, String)> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/original/v2-keys.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the original's fixture {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("the fixture is JSON");
    fn walk(node: &serde_json::Value, out: &mut Vec<(String, String)>) {
        if node["dir"].as_bool() == Some(true) {
            for child in node["nodes"].as_array().into_iter().flatten() {
                walk(child, out);
            }
        } else if let Some(key) = node["key"].as_str() {
            let value = node["value"].as_str().unwrap_or_default();
            out.push((key.to_string(), value.to_string()));
        }
    }
    let mut leaves = Vec::new();
    walk(&json["node"], &mut leaves);
    leaves
}

/// A key prefix no other test uses.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "/test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The global flags every test passes: its etcd, its prefix, a short timeout.
pub fn store_args<'a>(url: &'a str, prefix: &'a str) -> [&'a str; 6] {
    [
        "--cluster-store",
        url,
        "--store-prefix",
        prefix,
        "--timeout",
        "2",
    ]
}

/// Runs the binary with `--cluster-store URL --store-prefix PREFIX` and `args`.
pub fn cli(url: &str, prefix: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(store_args(url, prefix))
        .args(args)
        .env_remove("CLUSTER_STORE")
        .env_remove("DEBUG")
        .output()
        .expect("run the binary")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ip-range START END`, which must succeed; its stdout.
pub fn ip_range(url: &str, prefix: &str, start: &str, end: &str) -> String {
    ok(cli(
        url,
        prefix,
        &["ip-range", "--ip-start", start, "--ip-end", end],
    ))
}

/// `host-range START END --gateway GATEWAY`, which must succeed; its stdout.
pub fn host_range(url: &str, prefix: &str, start: &str, end: &str, gateway: &str) -> String {
    let args = [
        "host-range",
        "--ip-start",
        start,
        "--ip-end",
        end,
        "--gateway",
        gateway,
    ];
    ok(cli(url, prefix, &args))
}

/// Asserts success and returns stdout.
pub fn ok(o: Output) -> String {
    ok_in("command", o)
}

/// Asserts that `what` succeeded, showing its output if not; returns stdout.
pub fn ok_in(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?}): {}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts failure with `code` and a one-line error containing `needle`.
pub fn fails(o: Output, code: i32, needle: &str) {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout {} stderr {err}",
        stdout(&o)
    );
    let line = err.trim();
    assert!(!line.contains('\n'), "error is not one line: {err}");
    assert!(
        line.contains(needle),
        "error {line:?} does not say {needle:?}"
    );
}

/// A running `server`, stopped by PID (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(url: &str, prefix: &str, socket: &Path) -> Server {
        Server::start_with(Command::new(BIN), url, prefix, socket, socket)
    }

    /// Runs `command` (the binary, or a wrapper around it) as `server --socket socket_flag`
    /// and waits until something answers on `listens_on`.
    pub fn start_with(
        mut command: Command,
        url: &str,
        prefix: &str,
        socket_flag: &Path,
        listens_on: &Path,
    ) -> Server {
        let child = command
            .args(store_args(url, prefix))
            .args(["server", "--socket"])
            .arg(socket_flag)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server");
        let server = Server {
            child,
            socket: listens_on.to_path_buf(),
        };
        wait_for_socket(listens_on);
        server
    }

    /// Sends `signal` (by PID) and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit on {signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server logged (after it exited).
    pub fn log(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {}", socket.display());
}

/// A keep-alive HTTP/1.1 connection to the plugin, sending what dockerd sends.
pub struct PluginClient {
    reader: BufReader<UnixStream>,
}

/// One answer: status, Content-Type, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl PluginClient {
    pub fn connect(socket: &Path) -> PluginClient {
        let stream = UnixStream::connect(socket).expect("connect to the plugin");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        PluginClient {
            reader: BufReader::new(stream),
        }
    }

    pub fn call(&mut self, path: &str, body: &str) -> Reply {
        self.send_raw(path, body.as_bytes())
    }

    pub fn send_raw(&mut self, path: &str, body: &[u8]) -> Reply {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\n\
             Accept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n",
            body.len()
        );
        // One write, as Go's client (dockerd's) sends a small request: the plugin answers
        // such a request on its loop's thread. tests/server_faults.rs sends requests in pieces.
        let request = [head.as_bytes(), body].concat();
        self.reader
            .get_mut()
            .write_all(&request)
            .expect("send request");
        self.read_reply()
    }

    fn read_reply(&mut self) -> Reply {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let (mut length, mut content_type) = (0usize, String::new());
        loop {
            let mut header = String::new();
            self.reader.read_line(&mut header).expect("header");
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().expect("length"),
                "content-type" => content_type = value.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("body");
        Reply {
            status,
            content_type,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// Every file of `dir` and its text, sorted.
pub fn files_in(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            Some((
                e.file_name().into_string().ok()?,
                std::fs::read_to_string(e.path()).ok()?,
            ))
        })
        .collect();
    files.sort();
    files
}
