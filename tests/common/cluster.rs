//! An etcd cluster of one or more members on loopback whose members a test can kill, stop,
//! resume and restart one at a time, by PID, and read through the JSON gateway. Every member is
//! killed on drop, also when a test panics; a watchdog per member kills it if the test binary
//! itself dies.

use super::{free_port, TempDir};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Quick elections, so that a lost leader is replaced within about a second.
const HEARTBEAT_MS: &str = "100";
const ELECTION_MS: &str = "1000";

/// How long a member or the whole cluster may take to (re)start and serve.
const START_LIMIT: Duration = Duration::from_secs(20);

/// One etcd process of the cluster.
pub struct Member {
    pub name: String,
    pub client_url: String,
    peer_url: String,
    process: Option<Child>,
    /// Kills the member if the test binary dies without dropping the cluster.
    watchdog: Option<Watchdog>,
}

impl Member {
    /// The member's PID while it runs (stopped or not).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: TempDir,
}

impl Cluster {
    /// Starts `size` members (`m1`, `m2`, ...) and waits until they have a leader. Should a
    /// port that was free when `free_port` looked be taken before its member binds it (an
    /// outgoing connection of another test can get it), the cluster starts anew on other
    /// ports, up to four times.
    pub fn start(tag: &str, size: usize) -> Cluster {
        for _ in 0..4 {
            let mut cluster = Cluster::on_free_ports(tag, size);
            for i in 0..size {
                cluster.spawn(i);
            }
            if cluster.lost_a_port() {
                continue;
            }
            cluster.wait_healthy();
            return cluster;
        }
        panic!("etcd cluster found a port taken four times in a row");
    }

    fn on_free_ports(tag: &str, size: usize) -> Cluster {
        static N: AtomicU32 = AtomicU32::new(0);
        let token = format!(
            "oam-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let members: Vec<Member> = (1..=size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                process: None,
                watchdog: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            members,
            initial_cluster,
            token,
            dir: TempDir::new(&format!("cluster-{tag}")),
        }
    }

    /// Whether a member exited, just started, because its address was in use; false once
    /// every member answers, or after `START_LIMIT` (then `wait_healthy` says what is wrong).
    fn lost_a_port(&mut self) -> bool {
        let deadline = Instant::now() + START_LIMIT;
        while Instant::now() < deadline {
            for m in &mut self.members {
                if let Some(Ok(Some(_))) = m.process.as_mut().map(Child::try_wait) {
                    let log = std::fs::read_to_string(self.dir.join(&format!("{}.log", m.name)))
                        .unwrap_or_default();
                    return log.contains("address already in use");
                }
            }
            let all_answer = self
                .members
                .iter()
                .all(|m| get(&m.client_url, "/health").is_some());
            if all_answer {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Every member's client URL, comma-separated (as `--cluster-store` takes them).
    pub fn endpoints(&self) -> String {
        self.endpoints_from(0)
    }

    /// Every member's client URL, member `first` first and the others in order after it.
    pub fn endpoints_from(&self, first: usize) -> String {
        let n = self.members.len();
        (0..n)
            .map(|k| self.members[(first + k) % n].client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let data_dir = self.dir.join(&format!("{}.data", self.members[i].name));
        let log_path = self.dir.join(&format!("{}.log", self.members[i].name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("etcd log file");
        let m = &self.members[i];
        // With an existing data dir (a restart) etcd ignores the --initial-* flags.
        let process = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", HEARTBEAT_MS])
            .args(["--election-timeout", ELECTION_MS])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian's etcd-server)");
        let watchdog = Watchdog::new(process.id(), Some(&self.dir.0));
        let m = &mut self.members[i];
        m.process = Some(process);
        m.watchdog = Some(watchdog);
    }

    /// Sends `signal` to member `i` by its PID.
    pub fn signal(&self, i: usize, signal: i32) {
        let pid = self.members[i]
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.members[i].name));
        // SAFETY: kill(2) on a PID this process started and has not reaped.
        let done = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(done, 0, "kill -{signal} {pid}");
    }

    /// SIGSTOP: the member keeps its sockets but answers nothing.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    /// SIGKILL, and reaps it; its data stays for `restart`.
    pub fn kill(&mut self, i: usize) {
        self.stop_watchdog(i);
        if let Some(mut p) = self.members[i].process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// SIGTERM (etcd's clean shutdown), and waits for it to exit (SIGKILL after 10 s).
    pub fn terminate(&mut self, i: usize) {
        self.stop_watchdog(i);
        self.signal(i, libc::SIGTERM);
        let Some(mut p) = self.members[i].process.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = p.kill();
        let _ = p.wait();
        panic!(
            "{} did not exit within 10 s of SIGTERM",
            self.members[i].name
        );
    }

    /// Starts member `i` again, on its old ports and data directory, and waits until the
    /// cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.members[i].process.is_none(),
            "{} is running",
            self.members[i].name
        );
        self.spawn(i);
        self.wait_healthy();
    }

    fn stop_watchdog(&mut self, i: usize) {
        self.members[i].watchdog.take();
    }

    /// Member `i`'s `/v3/maintenance/status`, if it answers within 2 s.
    pub fn status(&self, i: usize) -> Option<Value> {
        let text = post_json(&self.members[i].client_url, "/v3/maintenance/status", "{}")?;
        serde_json::from_str(&text).ok()
    }

    /// The index of the current leader, as a member that is itself the leader says.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            for i in 0..self.members.len() {
                if self.members[i].process.is_none() {
                    continue;
                }
                if let Some(s) = self.status(i) {
                    let me = s["header"]["member_id"].as_str();
                    if me.is_some() && me == s["leader"].as_str() {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no member says it leads");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running member answers `/health` true and one of them leads.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let healthy = self
                .members
                .iter()
                .filter(|m| m.process.is_some())
                .all(|m| get(&m.client_url, "/health").is_some_and(|b| b.contains("\"true\"")));
            if healthy {
                self.leader();
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| {
                        let log =
                            std::fs::read_to_string(self.dir.join(&format!("{}.log", m.name)))
                                .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        format!(
                            "{}:\n{}",
                            m.name,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!("etcd cluster not healthy:\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every key under `prefix` with its value, in key order, read (linearizably) from the
    /// first member that answers.
    pub fn dump(&self, prefix: &str) -> Vec<(String, String)> {
        let body = json!({
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(prefix_end(prefix)),
        })
        .to_string();
        for m in self.members.iter().filter(|m| m.process.is_some()) {
            let Some(text) = post_json(&m.client_url, "/v3/kv/range", &body) else {
                continue;
            };
            let Ok(answer) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if answer.get("header").is_none() {
                continue;
            }
            let decode = |v: &Value| {
                let bytes = BASE64
                    .decode(v.as_str().unwrap_or_default())
                    .expect("base64");
                String::from_utf8(bytes).expect("UTF-8")
            };
            // An empty range has no "kvs" at all.
            return answer["kvs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|kv| (decode(&kv["key"]), decode(&kv["value"])))
                .collect();
        }
        panic!("no etcd member answered a range of {prefix}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A shell that SIGKILLs a process (and removes a directory) once the test binary is gone,
/// for when it dies without unwinding. Dropping it stops only the shell.
pub struct Watchdog(Child);

impl Watchdog {
    pub fn new(pid: u32, dir: Option<&Path>) -> Watchdog {
        let child = Command::new("sh")
            .args([
                "-c",
                r#"while kill -0 "$0" 2>/dev/null && kill -0 "$1" 2>/dev/null; do sleep 0.5; done
                   kill -0 "$0" 2>/dev/null && exit
                   kill -9 "$1" 2>/dev/null
                   [ -n "$2" ] && rm -rf "$2""#,
            ])
            .arg(std::process::id().to_string())
            .arg(pid.to_string())
            .arg(dir.map(|d| d.as_os_str()).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a watchdog");
        Watchdog(child)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The key just past every key that starts with `prefix` (an ASCII prefix).
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    let last = bytes.last_mut().expect("a non-empty prefix");
    *last += 1;
    String::from_utf8(bytes).expect("ASCII")
}

fn get(base: &str, path: &str) -> Option<String> {
    http(base, "GET", path, "")
}

fn post_json(base: &str, path: &str, body: &str) -> Option<String> {
    http(base, "POST", path, body)
}

/// One HTTP/1.0 exchange with a member over loopback: the answer's body, if any within 2 s.
fn http(base: &str, method: &str, path: &str, body: &str) -> Option<String> {
    let addr = base.strip_prefix("http://")?;
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}
