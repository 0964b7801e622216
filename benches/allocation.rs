//! Allocation benchmark: `cargo bench --bench allocation`. Starts its own etcd on loopback,
//! defines a /24 and a /16 pool in the benchmarking range 198.18.0.0/15, and prints one table:
//! each goal of issue 13 next to what this run measured and, where the goal is a ratio, the
//! baseline it is a ratio of, measured in the same run straight against etcd:
//!
//! - RequestAddress and ReleaseAddress through the plugin's socket, p50 and p99, against a bare
//!   compare-and-swap transaction on a kept-alive connection of the same client;
//! - etcd requests per release (and per allocation), counted by etcd itself from its /metrics;
//! - 8 plugin processes with one client each on the /16 against 8 threads each sending bare
//!   transactions on a connection of its own, each kind for a fixed time per round; etcd
//!   requests per allocation there; and whether any address was handed out twice or is not
//!   recorded in etcd for the container it went to;
//! - `ip-range` of a /16 against bulk puts of the same keys, 128 to a transaction (one before
//!   it, one after); its re-run;
//! - the plugin's resident memory after 10,000 allocations; start to socket-ready;
//! - RequestAddress and ReleaseAddress on a /24 in a second etcd that requires TLS, client
//!   certificates and auth, against bare transactions on that etcd (no goal: what it costs).
//!
//! Between the plugin and the bare transaction sits a third column: the plugin's own
//! allocator, in this process on an etcd connection of its own (the same transactions, without
//! the socket, the HTTP and JSON of Docker's protocol, and the log lines). Plugin, allocator
//! and bare transaction take turns call by call (or round by round), so that all three see the
//! same shared, noisy machine. It only prints: nothing here fails on a figure.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{cli, ok, unique_prefix, Etcd, Pki, PluginClient, TempDir, BIN};
use oam_docker_ipam::alloc::{self, Allocator, Released};
use oam_docker_ipam::auth::{Credentials, Secret};
use oam_docker_ipam::etcd::{Client, Security};
use oam_docker_ipam::host;
use oam_docker_ipam::kv::{Compare, Op, Range, Txn, MAX_TXN_OPS};
use oam_docker_ipam::layout::{ContainerConfig, Layout, Owner, PoolKeys, Role};
use oam_docker_ipam::tls::{self, TlsFiles};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Latency: rounds of this many allocations, then their releases (with the allocator's, fewer
/// than a /24 holds). 2,000 samples of each: p99 is then the 20th slowest, not the 5th, and
/// steadier from run to run on a shared machine.
const PER_ROUND: usize = 100;
const ROUNDS: usize = 20;
/// Calls of each kind sent and thrown away before timing (first connections, caches).
const WARM_UP: usize = 10;
/// Throughput: processes (and clients); how long each kind sends in a round, and rounds.
const PROCESSES: usize = 8;
const RATE_SPAN: Duration = Duration::from_millis(250);
const RATE_ROUNDS: usize = 16;
/// Addresses each bare connection is given to take in the rate test, and each latency test's
/// bare transactions: ten slices fill most of the /16. The rate test takes about 1,400 a
/// connection here; 6,000 is 12,000 transactions a second on 8 connections.
const BARE_SLICE: usize = 6_000;
/// Allocations before the plugin's resident memory is read, and the connections sending them.
const RSS_ALLOCATIONS: usize = 10_000;
const RSS_CLIENTS: usize = 4;
/// Server starts timed; the median is shown.
const STARTS: usize = 11;
/// Reads of the whole /16 timed (what the original did per allocation); the median is shown.
const WHOLE_READS: usize = 5;

const TIMEOUT: Duration = Duration::from_secs(5);
/// The host name the in-process allocator records.
const HOST: &str = "bench";

struct Pool {
    label: &'static str,
    first: &'static str,
    last: &'static str,
    net: ipnet::Ipv4Net,
}

impl Pool {
    /// Every address `ip-range` pools: all but the network and broadcast addresses.
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        self.net.hosts()
    }
}

fn slash_24() -> Pool {
    Pool {
        label: "/24",
        first: "198.19.7.0/24",
        last: "198.19.7.255/24",
        net: "198.19.7.0/24".parse().expect("net"),
    }
}

fn slash_16() -> Pool {
    Pool {
        label: "/16",
        first: "198.18.0.0/16",
        last: "198.18.255.255/16",
        net: "198.18.0.0/16".parse().expect("net"),
    }
}

/// A `server` process with its log in a file (a pipe nobody reads would fill up and stop
/// it), stopped with SIGTERM by its PID on drop.
struct Plugin {
    child: Child,
    socket: PathBuf,
}

impl Plugin {
    fn spawn(url: &str, prefix: &str, socket: &Path) -> Plugin {
        Plugin::spawn_with(url, prefix, socket, &[])
    }

    /// As [`Plugin::spawn`], with `flags` (TLS, auth) before the command.
    fn spawn_with(url: &str, prefix: &str, socket: &Path, flags: &[String]) -> Plugin {
        let log = std::fs::File::create(socket.with_extension("log")).expect("log file");
        let child = Command::new(BIN)
            .args(common::store_args(url, prefix))
            .args(flags)
            .args(["server", "--socket"])
            .arg(socket)
            .env_remove("CLUSTER_STORE")
            .env_remove("DEBUG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the server");
        Plugin {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// Starts a server and waits until its socket takes connections.
    fn start(url: &str, prefix: &str, socket: &Path) -> Plugin {
        let plugin = Plugin::spawn(url, prefix, socket);
        plugin.wait_ready(Duration::from_millis(1));
        plugin
    }

    fn wait_ready(&self, pause: Duration) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(pause);
        }
    }

    /// A client that has asked for `pool` as dockerd does before any address.
    fn client(&self, pool: &Pool) -> PluginClient {
        let mut c = PluginClient::connect(&self.socket);
        let body = format!(r#"{{"Pool":"{}"}}"#, pool.net);
        let r = c.call("/IpamDriver.RequestPool", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        c
    }

    /// `VmRSS` from /proc, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal, to the server this struct started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh MAC for each container the benchmark asks an address for.
fn next_mac() -> String {
    static N: AtomicUsize = AtomicUsize::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "02:42:00:{:02x}:{:02x}:{:02x}",
        (n >> 16) & 0xff,
        (n >> 8) & 0xff,
        n & 0xff
    )
}

/// Asks for a random address for a new container; the address and the container's MAC.
fn request_address(c: &mut PluginClient, pool: &Pool) -> (String, String) {
    let mac = next_mac();
    let body = format!(
        r#"{{"PoolID":"{}","Address":"","Options":{{"com.docker.network.endpoint.macaddress":"{mac}"}}}}"#,
        pool.net.network()
    );
    let r = c.call("/IpamDriver.RequestAddress", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let a = v["Address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address: {}", r.body));
    (a.split('/').next().unwrap_or_default().to_string(), mac)
}

fn release_address(c: &mut PluginClient, pool: &Pool, addr: &str) {
    let body = format!(
        r#"{{"PoolID":"{}","Address":"{addr}"}}"#,
        pool.net.network()
    );
    let r = c.call("/IpamDriver.ReleaseAddress", &body);
    assert_eq!(r.status, 200, "{}", r.body);
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed(), out)
}

/// p50 and p99 in ms.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    (at(0.50), at(0.99))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Range and Txn calls etcd has served so far.
fn etcd_requests(url: &str) -> u64 {
    let metrics = common::http_get(url, "/metrics").expect("etcd /metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{grpc_code=\"OK\""))
        .filter(|l| l.contains("grpc_method=\"Range\"") || l.contains("grpc_method=\"Txn\""))
        .filter(|l| l.contains("etcdserverpb.KV"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Bare transactions on a kept-alive connection, on keys of their own: a one-key
/// compare-and-swap, and (where a pool was bulk-put for them) the very transactions the
/// allocator sends to take and give back an address, with an owner value of the same size.
/// What an allocation cannot be cheaper than.
struct Bare {
    client: Client,
    key: String,
    n: usize,
    moves: Option<Moves>,
}

/// Addresses of a pool of the bare transactions' own: free ones to take, taken ones (with
/// their values) to give back.
struct Moves {
    keys: PoolKeys,
    free: Vec<Ipv4Addr>,
    held: Vec<(Ipv4Addr, String)>,
}

impl Bare {
    fn new(url: &str, key: String) -> Bare {
        Bare::on(Client::new(vec![url.to_string()], TIMEOUT), key)
    }

    fn on(client: Client, key: String) -> Bare {
        client
            .txn(&Txn {
                success: vec![Op::put(&key, "0")],
                ..Txn::default()
            })
            .expect("put");
        Bare {
            client,
            key,
            n: 0,
            moves: None,
        }
    }

    /// Also moving the addresses `free` of the pool `keys`.
    fn moving(mut self, keys: PoolKeys, free: Vec<Ipv4Addr>) -> Bare {
        self.moves = Some(Moves {
            keys,
            free,
            held: Vec::new(),
        });
        self
    }

    /// The one-key compare-and-swap.
    fn txn(&mut self) {
        self.n += 1;
        let txn = Txn {
            compares: vec![Compare::Exists(self.key.clone())],
            success: vec![Op::put(&self.key, self.n.to_string())],
            failure: vec![],
        };
        assert!(self.client.txn(&txn).expect("txn").succeeded);
    }

    /// The allocator's taking of an address.
    fn take(&mut self) {
        let moves = self.moves.as_mut().expect("a pool to move in");
        let addr = moves.free.pop().expect("a free address left");
        let value = Owner::new(Role::Container, HOST, &next_mac(), &host::now()).to_json();
        let txn = alloc::take_txn(&moves.keys, addr, &value);
        assert!(self.client.txn(&txn).expect("take").succeeded);
        moves.held.push((addr, value));
    }

    /// The allocator's one-request giving back of an address it took.
    fn release(&mut self) {
        let moves = self.moves.as_mut().expect("a pool to move in");
        let (addr, value) = moves.held.pop().expect("a taken address");
        let guard = Compare::Value(moves.keys.assigned(addr), value);
        let txn = alloc::move_back_txn(&moves.keys, addr, guard, vec![]);
        assert!(self.client.txn(&txn).expect("release").succeeded);
        moves.free.push(addr);
    }
}

/// The plugin's allocator in this process, on an etcd connection of its own, taking from the
/// pool whose keys are `keys`.
struct InProcess {
    alloc: Allocator<Client>,
    keys: PoolKeys,
    net: ipnet::Ipv4Net,
}

impl InProcess {
    fn new(url: &str, prefix: &str, pool: &Pool) -> InProcess {
        InProcess {
            alloc: Allocator::new(Client::new(vec![url.to_string()], TIMEOUT)),
            keys: Layout::new(prefix).containers(pool.net.network()),
            net: pool.net,
        }
    }

    fn take(&mut self) -> Ipv4Addr {
        let owner = Owner::new(Role::Container, HOST, &next_mac(), &host::now());
        self.alloc
            .take_any(&self.keys, self.net, &owner)
            .expect("take_any")
    }

    fn release(&mut self, addr: Ipv4Addr) {
        let released = self.alloc.release_container(&self.keys, addr, HOST);
        assert!(
            matches!(released, Ok(Released::Freed { .. })),
            "{released:?}"
        );
    }
}

/// A slice of the pool the bare transactions move addresses in.
struct Same {
    keys: PoolKeys,
    free: Vec<Ipv4Addr>,
}

/// `n` slices of `count` addresses each, from the `pool` bulk-put under `prefix`.
fn same_slices(prefix: &str, pool: &Pool, n: usize, count: usize) -> Vec<Same> {
    let keys = Layout::new(prefix).containers(pool.net.network());
    let all: Vec<Ipv4Addr> = pool.hosts().collect();
    all.chunks(count)
        .take(n)
        .map(|free| Same {
            keys: keys.clone(),
            free: free.to_vec(),
        })
        .collect()
}

/// Latencies of one kind of call: through the plugin, the allocator in-process, the same
/// transaction bare, a one-key compare-and-swap.
#[derive(Default)]
struct Timings {
    plugin: Vec<Duration>,
    in_process: Vec<Duration>,
    same: Vec<Duration>,
    cas: Vec<Duration>,
}

impl Timings {
    /// Times the four, in an order that turns with `i`.
    fn time(
        &mut self,
        i: usize,
        mut plugin: impl FnMut(),
        mut in_process: impl FnMut(),
        mut same: impl FnMut(&mut Bare),
        bare: &mut Bare,
    ) {
        for k in 0..4 {
            match (i + k) % 4 {
                0 => self.plugin.push(timed(&mut plugin).0),
                1 => self.in_process.push(timed(&mut in_process).0),
                2 => self.same.push(timed(|| same(bare)).0),
                _ => self.cas.push(timed(|| bare.txn()).0),
            }
        }
    }
}

struct Latency {
    request: Timings,
    release: Timings,
    requests_per_alloc: f64,
    requests_per_release: f64,
    /// Plugin.Activate round trips: the socket and HTTP alone, no etcd.
    socket: Vec<Duration>,
}

/// RequestAddress and ReleaseAddress through the plugin on `prefix`'s pool, the allocator
/// in-process on `own_prefix`'s (the same addresses, other keys), and bare txns, in turns.
fn latency(
    etcd: &Etcd,
    (prefix, own_prefix): (&str, &str),
    pool: &Pool,
    dir: &TempDir,
    same: Same,
) -> Latency {
    let mut bare =
        Bare::new(&etcd.url, format!("{prefix}/bare-latency")).moving(same.keys, same.free);
    let mut own = InProcess::new(&etcd.url, own_prefix, pool);
    let plugin = Plugin::start(
        &etcd.url,
        prefix,
        &dir.join(&format!("latency-{}.sock", pool.net.network())),
    );
    let mut c = plugin.client(pool);
    for _ in 0..WARM_UP {
        bare.txn();
        bare.take();
        bare.release();
        let (addr, _) = request_address(&mut c, pool);
        release_address(&mut c, pool, &addr);
        let addr = own.take();
        own.release(addr);
    }
    let (mut request, mut release) = (Timings::default(), Timings::default());
    for _ in 0..ROUNDS {
        let (mut given, mut taken) = (Vec::new(), Vec::new());
        for i in 0..PER_ROUND {
            request.time(
                i,
                || given.push(request_address(&mut c, pool).0),
                || taken.push(own.take()),
                Bare::take,
                &mut bare,
            );
        }
        for (i, (addr, own_addr)) in given.iter().zip(&taken).enumerate() {
            release.time(
                i,
                || release_address(&mut c, pool, addr),
                || own.release(*own_addr),
                Bare::release,
                &mut bare,
            );
        }
    }
    // Counted apart from the timed rounds, with the plugin the only client: etcd's counters
    // cannot tell whose request they served.
    let before = etcd_requests(&etcd.url);
    let given: Vec<String> = (0..PER_ROUND)
        .map(|_| request_address(&mut c, pool).0)
        .collect();
    let middle = etcd_requests(&etcd.url);
    for addr in &given {
        release_address(&mut c, pool, addr);
    }
    let after = etcd_requests(&etcd.url);
    let n = PER_ROUND as f64;
    let socket = (0..ROUNDS * PER_ROUND)
        .map(|_| {
            let (took, answer) = timed(|| c.call("/Plugin.Activate", ""));
            assert_eq!(answer.status, 200, "{}", answer.body);
            took
        })
        .collect();
    Latency {
        request,
        release,
        requests_per_alloc: (middle - before) as f64 / n,
        requests_per_release: (after - middle) as f64 / n,
        socket,
    }
}

/// Runs `work(i)` on one thread for each of `parties`, all started at once; how long until
/// the last ended, and what each returned.
fn all_at_once<P: Send, T: Send>(
    parties: &mut [P],
    work: impl Fn(&mut P) -> T + Sync,
) -> (Duration, Vec<T>) {
    let start = Barrier::new(parties.len() + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = parties
            .iter_mut()
            .map(|p| {
                let (start, work) = (&start, &work);
                scope.spawn(move || {
                    start.wait();
                    work(p)
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        let out: Vec<T> = handles
            .into_iter()
            .map(|h| h.join().expect("a benchmark thread"))
            .collect();
        (t.elapsed(), out)
    })
}

/// Runs `work` over and over on one thread for each of `parties`, all started at once, until
/// `span` has passed since the first of them started; how long until the last one stopped,
/// and what each call returned. A rate is what they did in that time: with a fixed number of
/// calls each instead, the clock waited for the slowest party, and one process the scheduler
/// left behind stretched the whole round. One deadline for all, so that a thread that starts
/// late does less rather than end later.
fn for_a_while<P: Send, T: Send>(
    parties: &mut [P],
    span: Duration,
    work: impl Fn(&mut P) -> T + Sync,
) -> (Duration, Vec<T>) {
    let deadline = std::sync::OnceLock::new();
    let (took, each) = all_at_once(parties, |p| {
        let until = *deadline.get_or_init(|| Instant::now() + span);
        let mut out = Vec::new();
        while Instant::now() < until {
            out.push(work(p));
        }
        out
    });
    (took, each.into_iter().flatten().collect())
}

struct Throughput {
    plugin: f64,
    in_process: f64,
    same: f64,
    cas: f64,
    given: usize,
    duplicates: usize,
    unrecorded: usize,
    /// etcd requests per allocation through the plugins, counted by etcd.
    plugin_requests: f64,
}

/// `PROCESSES` plugin processes with a client each, as many threads with the allocator
/// in-process (on `own_prefix`'s pool), and as many bare connections, in turns, round by
/// round; then every address the plugins handed out is looked up in etcd.
fn throughput(
    etcd: &Etcd,
    (prefix, own_prefix): (&str, &str),
    pool: &Pool,
    dir: &TempDir,
    same: Vec<Same>,
) -> Throughput {
    let mut bare: Vec<Bare> = same
        .into_iter()
        .enumerate()
        .map(|(i, same)| {
            Bare::new(&etcd.url, format!("{prefix}/bare-rate-{i}")).moving(same.keys, same.free)
        })
        .collect();
    assert_eq!(bare.len(), PROCESSES);
    let mut own: Vec<InProcess> = (0..PROCESSES)
        .map(|_| InProcess::new(&etcd.url, own_prefix, pool))
        .collect();
    let plugins: Vec<Plugin> = (0..PROCESSES)
        .map(|i| Plugin::start(&etcd.url, prefix, &dir.join(&format!("host{i}.sock"))))
        .collect();
    let mut clients: Vec<PluginClient> = plugins.iter().map(|p| p.client(pool)).collect();
    // Each connection's first call, not timed.
    let mut given: Vec<(String, String)> = clients
        .iter_mut()
        .map(|c| request_address(c, pool))
        .collect();
    own.iter_mut().for_each(|o| {
        o.take();
    });
    bare.iter_mut().for_each(Bare::txn);
    bare.iter_mut().for_each(Bare::take);

    let (mut time, mut calls) = ([Duration::ZERO; 4], [0usize; 4]);
    let mut plugin_requests = 0;
    for round in 0..RATE_ROUNDS {
        for k in 0..4 {
            let kind = (round + k) % 4;
            let before = etcd_requests(&etcd.url);
            let (t, n) = match kind {
                0 => {
                    let (t, got) =
                        for_a_while(&mut clients, RATE_SPAN, |c| request_address(c, pool));
                    let n = got.len();
                    given.extend(got);
                    plugin_requests += etcd_requests(&etcd.url) - before;
                    (t, n)
                }
                1 => {
                    let (t, got) = for_a_while(&mut own, RATE_SPAN, InProcess::take);
                    (t, got.len())
                }
                2 => {
                    let (t, got) = for_a_while(&mut bare, RATE_SPAN, Bare::take);
                    (t, got.len())
                }
                _ => {
                    let (t, got) = for_a_while(&mut bare, RATE_SPAN, Bare::txn);
                    (t, got.len())
                }
            };
            time[kind] += t;
            calls[kind] += n;
        }
    }
    let rate = |kind: usize| calls[kind] as f64 / time[kind].as_secs_f64();
    let [plugin, in_process, same_time, cas_time] = [0, 1, 2, 3].map(rate);

    let keys = Layout::new(prefix).containers(pool.net.network());
    let recorded: HashMap<String, Option<Owner>> = bare[0]
        .client
        .range(&Range::prefix(keys.assigned_dir.as_str()))
        .expect("read assigned/")
        .into_iter()
        .map(|kv| {
            let addr = kv.key.trim_start_matches(&keys.assigned_dir).to_string();
            (addr, Owner::from_json(&kv.value))
        })
        .collect();
    let distinct: HashSet<&str> = given.iter().map(|(a, _)| a.as_str()).collect();
    let unrecorded = given
        .iter()
        .filter(|(addr, mac)| !matches!(recorded.get(addr), Some(Some(o)) if o.mac == *mac))
        .count();
    Throughput {
        plugin,
        in_process,
        same: same_time,
        cas: cas_time,
        given: given.len(),
        duplicates: given.len() - distinct.len(),
        unrecorded,
        plugin_requests: plugin_requests as f64 / calls[0] as f64,
    }
}

/// Resident memory of a server at start and after `RSS_ALLOCATIONS`, in KiB; and the rate
/// of those allocations.
fn memory(etcd: &Etcd, prefix: &str, pool: &Pool, dir: &TempDir) -> (u64, u64, f64) {
    let plugin = Plugin::start(&etcd.url, prefix, &dir.join("memory.sock"));
    let mut clients: Vec<PluginClient> = (0..RSS_CLIENTS).map(|_| plugin.client(pool)).collect();
    let at_start = plugin.rss_kib();
    let (t, _) = all_at_once(&mut clients, |c| {
        for _ in 0..RSS_ALLOCATIONS / RSS_CLIENTS {
            request_address(c, pool);
        }
    });
    let rate = RSS_ALLOCATIONS as f64 / t.as_secs_f64();
    (at_start, plugin.rss_kib(), rate)
}

/// Median time from spawning a server to its socket taking a connection.
fn start_to_ready(etcd: &Etcd, prefix: &str, dir: &TempDir) -> Duration {
    let samples = (0..STARTS)
        .map(|i| {
            let socket = dir.join(&format!("start{i}.sock"));
            let t = Instant::now();
            let plugin = Plugin::spawn(&etcd.url, prefix, &socket);
            plugin.wait_ready(Duration::from_micros(100));
            t.elapsed()
        })
        .collect();
    median(samples)
}

/// Bulk puts of the config and every key `ip-range` writes into `pool/` for `pool`, 128 to a
/// transaction, under `prefix`.
fn bulk_put(url: &str, prefix: &str, pool: &Pool) -> Duration {
    let client = Client::new(vec![url.to_string()], TIMEOUT);
    let keys = Layout::new(prefix).containers(pool.net.network());
    let all: Vec<Ipv4Addr> = pool.hosts().collect();
    let t = Instant::now();
    // The pool's config (ip-range writes it last, after the addresses): allocations compare it.
    let config = serde_json::to_string(&ContainerConfig::new(pool.net)).expect("config JSON");
    client
        .txn(&Txn {
            success: vec![Op::put(&keys.config, config)],
            ..Txn::default()
        })
        .expect("config put");
    for batch in all.chunks(MAX_TXN_OPS) {
        let txn = Txn {
            success: batch.iter().map(|a| Op::put(keys.pool(*a), "")).collect(),
            ..Txn::default()
        };
        client.txn(&txn).expect("bulk put");
    }
    t.elapsed()
}

fn ip_range(url: &str, prefix: &str, pool: &Pool) -> Duration {
    let args = ["ip-range", "--ip-start", pool.first, "--ip-end", pool.last];
    timed(|| ok(cli(url, prefix, &args))).0
}

/// One line of the table; `met` is None for figures without a goal.
#[derive(Default)]
struct Row {
    what: String,
    plugin: String,
    in_process: String,
    baseline: String,
    ratio: String,
    goal: String,
    /// Whether the goal is met, against each baseline in turn.
    met: Vec<bool>,
}

fn row(what: impl Into<String>, plugin: impl Into<String>) -> Row {
    Row {
        what: what.into(),
        plugin: plugin.into(),
        ..Row::default()
    }
}

impl Row {
    fn in_process(mut self, figure: impl Into<String>) -> Row {
        self.in_process = figure.into();
        self
    }

    fn baseline(mut self, baseline: impl Into<String>) -> Row {
        self.baseline = baseline.into();
        self
    }

    fn ratio(mut self, ratio: f64) -> Row {
        self.ratio = format!("{ratio:.2}x");
        self
    }

    fn goal(mut self, goal: impl Into<String>, met: bool) -> Row {
        self.goal = goal.into();
        self.met = vec![met];
        self
    }

    /// Two ratios: to the same transaction bare, and to a one-key compare-and-swap.
    fn ratios(mut self, same: f64, cas: f64) -> Row {
        self.ratio = format!("{same:.2}x / {cas:.2}x");
        self
    }

    /// A goal met (or not) against each of the two baselines of [`Row::ratios`].
    fn goals(mut self, goal: impl Into<String>, same: bool, cas: bool) -> Row {
        self.goal = goal.into();
        self.met = vec![same, cas];
        self
    }
}

/// RequestAddress and ReleaseAddress through the plugin against bare txns, in turns, on a /24
/// in a second etcd that requires TLS, client certificates and auth (a CA made with the openssl
/// CLI): what security costs. Its (request, release) latencies.
fn secure_latency(pool: &Pool, dir: &TempDir) -> (Timings, Timings) {
    let pki = Pki::new("bench");
    let password = format!("bench-{}", std::process::id());
    let etcd = Etcd::start_secure("bench-secure", &pki, &password);
    let password_file = pki.path("password");
    std::fs::write(&password_file, &password).expect("password file");
    let prefix = format!("{}{}", common::SECURE_PREFIX, unique_prefix("bench"));
    let flags: Vec<String> = [
        "--cacert",
        &pki.path("ca.crt"),
        "--cert",
        &pki.path("client.crt"),
        "--key",
        &pki.path("client.key"),
        "--user",
        common::SECURE_USER,
        "--password-file",
        &password_file,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args = ["ip-range", "--ip-start", pool.first, "--ip-end", pool.last];
    ok(Command::new(BIN)
        .args(common::store_args(&etcd.url, &prefix))
        .args(&flags)
        .args(args)
        .output()
        .expect("ip-range"));
    let security = Security {
        tls: tls::config(&TlsFiles {
            cacert: Some(pki.path("ca.crt").into()),
            cert: Some(pki.path("client.crt").into()),
            key: Some(pki.path("client.key").into()),
        })
        .expect("TLS files"),
        credentials: Some(Credentials {
            user: common::SECURE_USER.into(),
            password: Secret::new(password.clone()),
        }),
    };
    let client = Client::secured(vec![etcd.url.clone()], TIMEOUT, security);
    let mut bare = Bare::on(client, format!("{prefix}/bare-latency"));
    let socket = dir.join("secure.sock");
    let plugin = Plugin::spawn_with(&etcd.url, &prefix, &socket, &flags);
    plugin.wait_ready(Duration::from_millis(1));
    let mut c = plugin.client(pool);
    for _ in 0..WARM_UP {
        bare.txn();
        let (addr, _) = request_address(&mut c, pool);
        release_address(&mut c, pool, &addr);
    }
    let (mut request, mut release) = (Timings::default(), Timings::default());
    let mut given = Vec::new();
    for i in 0..PER_ROUND {
        // Two take turns here: the allocator in-process has no column on this etcd.
        if i % 2 == 0 {
            request.cas.push(timed(|| bare.txn()).0);
        }
        request
            .plugin
            .push(timed(|| given.push(request_address(&mut c, pool).0)).0);
        if i % 2 == 1 {
            request.cas.push(timed(|| bare.txn()).0);
        }
    }
    for (i, addr) in given.iter().enumerate() {
        if i % 2 == 0 {
            release.cas.push(timed(|| bare.txn()).0);
        }
        release
            .plugin
            .push(timed(|| release_address(&mut c, pool, addr)).0);
        if i % 2 == 1 {
            release.cas.push(timed(|| bare.txn()).0);
        }
    }
    (request, release)
}

/// Rows of the secured etcd: p50 and p99 of each call against the bare txns of that etcd.
fn secure_rows(rows: &mut Vec<Row>, (request, release): (Timings, Timings)) {
    for (call, trio) in [("RequestAddress", request), ("ReleaseAddress", release)] {
        let (plugin, bare) = (percentiles(trio.plugin), percentiles(trio.cas));
        rows.push(
            row(
                format!("{call} p50 / p99, /24 pool, etcd with TLS + client certificate + auth"),
                format!("{:.2} / {:.2} ms", plugin.0, plugin.1),
            )
            .baseline(format!("{:.2} / {:.2} ms", bare.0, bare.1))
            .ratio(plugin.0 / bare.0),
        );
    }
}

/// The rows of one pool: p50 and p99 of each call against the bare txns timed in turn with
/// them, and etcd requests per call.
fn latency_rows(rows: &mut Vec<Row>, pool: &Pool, l: Latency) {
    for (call, times) in [("RequestAddress", l.request), ("ReleaseAddress", l.release)] {
        let (plugin, own, same, cas) = (
            percentiles(times.plugin),
            percentiles(times.in_process),
            percentiles(times.same),
            percentiles(times.cas),
        );
        for (at, limit, pick) in [
            ("p50", 1.2, (|p: (f64, f64)| p.0) as fn((f64, f64)) -> f64),
            ("p99", 2.0, |p: (f64, f64)| p.1),
        ] {
            let (plugin, own, same, cas) = (pick(plugin), pick(own), pick(same), pick(cas));
            rows.push(
                row(
                    format!("{call} {at}, {} pool", pool.label),
                    format!("{plugin:.2} ms"),
                )
                .in_process(format!(
                    "{own:.2} ms ({:.2}x / {:.2}x)",
                    own / same,
                    own / cas
                ))
                .baseline(format!("{same:.2} ms / {cas:.2} ms"))
                .ratios(plugin / same, plugin / cas)
                .goals(
                    format!("≤ {limit}x"),
                    plugin / same <= limit,
                    plugin / cas <= limit,
                ),
            );
        }
    }
    rows.push(
        row(
            format!("etcd requests per release, {} pool", pool.label),
            format!("{:.2}", l.requests_per_release),
        )
        .goal("1.00", l.requests_per_release < 1.005),
    );
    let (p50, p99) = percentiles(l.socket);
    rows.push(row(
        format!(
            "Plugin.Activate p50 / p99 (the socket and HTTP, no etcd), {} pool's plugin",
            pool.label
        ),
        format!("{p50:.3} / {p99:.3} ms"),
    ));
    rows.push(row(
        format!("etcd requests per allocation, {} pool", pool.label),
        format!("{:.2}", l.requests_per_alloc),
    ));
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: run only when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let began = Instant::now();
    let etcd = Etcd::start("bench");
    let dir = TempDir::new("bench");
    let (small, big) = (slash_24(), slash_16());

    // The /16 goes in first: its timing is a goal, and the later parts use it. Bulk puts go
    // in before and after it (etcd's database grows with each), and the first bulk-put keys
    // are a pool of the same addresses for the allocator in-process.
    let bulk = unique_prefix("bulk");
    let before = bulk_put(&etcd.url, &bulk, &big);
    let big_prefix = unique_prefix("bench");
    let first = ip_range(&etcd.url, &big_prefix, &big);
    let same_prefix = unique_prefix("bulk");
    let after = bulk_put(&etcd.url, &same_prefix, &big);
    let floor = (before + after) / 2;
    let again = ip_range(&etcd.url, &big_prefix, &big);
    let (small_prefix, small_own) = (unique_prefix("bench"), unique_prefix("own"));
    ip_range(&etcd.url, &small_prefix, &small);
    ip_range(&etcd.url, &small_own, &small);

    // The bare transactions' own pool: the second bulk put's.
    let mut same = same_slices(&same_prefix, &big, 2 + PROCESSES, BARE_SLICE);
    let rate_same = same.split_off(2);
    let (same16, same24) = (same.pop().expect("slice"), same.pop().expect("slice"));
    let l24 = latency(&etcd, (&small_prefix, &small_own), &small, &dir, same24);
    let l16 = latency(&etcd, (&big_prefix, &bulk), &big, &dir, same16);
    let rate = throughput(&etcd, (&big_prefix, &bulk), &big, &dir, rate_same);
    let (rss_start, rss_after, rss_rate) = memory(&etcd, &big_prefix, &big, &dir);
    let start = start_to_ready(&etcd, &unique_prefix("start"), &dir);
    let secure = secure_latency(&small, &dir);
    let whole = {
        let client = Client::new(vec![etcd.url.clone()], TIMEOUT);
        let pool_dir = Layout::new(&big_prefix)
            .containers(big.net.network())
            .pool_dir;
        let reads = (0..WHOLE_READS)
            .map(|_| timed(|| client.range(&Range::prefix(pool_dir.as_str()).keys_only())).0)
            .collect();
        median(reads)
    };

    let mut rows = Vec::new();
    latency_rows(&mut rows, &small, l24);
    latency_rows(&mut rows, &big, l16);
    let (same, cas) = (rate.plugin / rate.same, rate.plugin / rate.cas);
    rows.push(
        row(
            format!("allocations/s, {PROCESSES} processes x 1 client, /16 pool"),
            format!("{:.0}", rate.plugin),
        )
        .in_process(format!(
            "{:.0} on {PROCESSES} threads ({:.2}x / {:.2}x)",
            rate.in_process,
            rate.in_process / rate.same,
            rate.in_process / rate.cas
        ))
        .baseline(format!(
            "{:.0} / {:.0} txn/s on {PROCESSES} connections",
            rate.same, rate.cas
        ))
        .ratios(same, cas)
        .goals("≥ 0.8x", same >= 0.8, cas >= 0.8),
    );
    rows.push(
        row(
            format!(
                "of the {} addresses they handed out: given twice, not recorded for their container",
                rate.given
            ),
            format!("{}, {}", rate.duplicates, rate.unrecorded),
        )
        .goal("0, 0", rate.duplicates == 0 && rate.unrecorded == 0),
    );
    rows.push(row(
        format!("etcd requests per allocation, {PROCESSES} processes, /16 pool"),
        format!("{:.3}", rate.plugin_requests),
    ));
    let ratio = first.as_secs_f64() / floor.as_secs_f64();
    rows.push(
        row(
            "ip-range of the /16 (65,534 addresses)",
            format!("{:.2} s", first.as_secs_f64()),
        )
        .baseline(format!(
            "{:.2} s bulk put, 128 keys a txn (mean of one before, one after)",
            floor.as_secs_f64()
        ))
        .ratio(ratio)
        .goal("≤ 1.5x", ratio <= 1.5),
    );
    rows.push(
        row(
            "ip-range of the /16 again",
            format!("{:.2} s", again.as_secs_f64()),
        )
        .goal("< 1 s", again < Duration::from_secs(1)),
    );
    rows.push(
        row(
            format!("plugin RSS after {RSS_ALLOCATIONS} allocations"),
            format!("{:.1} MiB", rss_after as f64 / 1024.0),
        )
        .baseline(format!("{:.1} MiB at start", rss_start as f64 / 1024.0))
        .goal("< 10 MiB", rss_after < 10 * 1024),
    );
    rows.push(
        row(
            format!("start to socket-ready (median of {STARTS})"),
            format!("{:.1} ms", ms(start)),
        )
        .goal("< 10 ms", start < Duration::from_millis(10)),
    );
    rows.push(row(
        format!("allocations/s, 1 process x {RSS_CLIENTS} clients, /16 pool"),
        format!("{rss_rate:.0}"),
    ));
    secure_rows(&mut rows, secure);
    rows.push(row(
        "read the whole /16 pool (the original, per allocation)",
        format!("{:.0} ms", ms(whole)),
    ));

    println!(
        "{} RequestAddress and ReleaseAddress per pool and {} rounds of {} ms of allocations \
         on {PROCESSES} connections, plugin, allocator and bare txn taking turns:",
        ROUNDS * PER_ROUND,
        RATE_ROUNDS,
        RATE_SPAN.as_millis()
    );
    println!();
    println!("| measure | plugin | allocator in-process (/ bare) | bare txn, same run | plugin / bare | goal | met |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let met: Vec<&str> = r
            .met
            .iter()
            .map(|&met| if met { "yes" } else { "**no**" })
            .collect();
        let met = met.join(" / ");
        println!(
            "| {} | {} | {} | {} | {} | {} | {met} |",
            r.what, r.plugin, r.in_process, r.baseline, r.ratio, r.goal
        );
    }
    eprintln!(
        "(the benchmark took {:.0} s)",
        began.elapsed().as_secs_f64()
    );
}
