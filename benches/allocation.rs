//! Allocation benchmark: `cargo bench --bench allocation`. Starts its own etcd on loopback,
//! defines a /24 and a /16 pool in the benchmarking range 198.18.0.0/15, and prints, side by
//! side: the raw etcd txn latency (the floor), RequestAddress and ReleaseAddress latency through
//! the plugin's socket and their ratio to the floor, what reading the whole pool costs (what
//! the original did per allocation), allocations per second with 1 and 8 clients, and etcd
//! requests per allocation (counted by etcd itself, from its /metrics). Then the same floor and
//! RequestAddress on a /24 against a second etcd that requires TLS, client certificates and
//! auth (a CA made with the openssl CLI).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{cli, ok, unique_prefix, Etcd, Pki, PluginClient, Server, TempDir, BIN};
use oam_docker_ipam::auth::{Credentials, Secret};
use oam_docker_ipam::etcd::{Client, Security};
use oam_docker_ipam::kv::{Compare, Op, Range, Txn};
use oam_docker_ipam::tls::{self, TlsFiles};
use std::process::Command;
use std::time::{Duration, Instant};

/// Allocations timed one by one per pool; fewer than the /24 holds, so none fails.
const SAMPLES: usize = 200;
/// Raw txns timed for the floor.
const FLOOR_SAMPLES: usize = 400;

struct Pool {
    label: &'static str,
    first: &'static str,
    last: &'static str,
    id: &'static str,
}

#[derive(Default)]
struct Column {
    floor: (f64, f64),
    whole_pool_read: (f64, f64),
    request: (f64, f64),
    release: (f64, f64),
    rate_1: f64,
    rate_8: f64,
    requests_per_alloc: f64,
    requests_per_release: f64,
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    (at(0.50), at(0.99))
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

fn request(pool: &str, mac: usize) -> String {
    format!(
        r#"{{"PoolID":"{pool}","Address":"","Options":{{"com.docker.network.endpoint.macaddress":"02:42:00:{:02x}:{:02x}:{:02x}"}}}}"#,
        (mac >> 16) & 0xff,
        (mac >> 8) & 0xff,
        mac & 0xff
    )
}

fn address_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect("json");
    let a = v["Address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address: {body}"));
    a.split('/').next().unwrap_or_default().to_string()
}

fn measure(etcd: &Etcd, pool: &Pool, dir: &TempDir) -> Column {
    let prefix = unique_prefix("bench");
    ok(cli(
        &etcd.url,
        &prefix,
        &["ip-range", "--ip-start", pool.first, "--ip-end", pool.last],
    ));
    let mut col = Column::default();

    // The floor: one compare-and-swap txn straight to etcd on a kept-alive connection.
    let client = Client::new(vec![etcd.url.clone()], Duration::from_secs(5));
    let key = format!("{prefix}/floor");
    client
        .txn(&Txn {
            success: vec![Op::put(&key, "0")],
            ..Txn::default()
        })
        .expect("txn");
    let floor: Vec<Duration> = (0..FLOOR_SAMPLES)
        .map(|i| {
            let txn = Txn {
                compares: vec![Compare::Exists(key.clone())],
                success: vec![Op::put(&key, i.to_string())],
                failure: vec![],
            };
            let t = Instant::now();
            client.txn(&txn).expect("txn");
            t.elapsed()
        })
        .collect();
    col.floor = percentiles(floor);

    let pool_dir = format!("{prefix}/containers/{}/pool/", pool.id);
    let reads: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            client
                .range(&Range::prefix(pool_dir.as_str()).keys_only())
                .expect("range");
            t.elapsed()
        })
        .collect();
    col.whole_pool_read = percentiles(reads);

    // Latency through the socket, one client.
    let sock = dir.join(&format!("{}.sock", pool.id));
    let server = Server::start(&etcd.url, &prefix, &sock);
    let mut c = PluginClient::connect(&sock);
    let pool_request = format!(
        r#"{{"Pool":"{}/{}"}}"#,
        pool.id,
        pool.label.trim_start_matches('/')
    );
    assert_eq!(c.call("/IpamDriver.RequestPool", &pool_request).status, 200);
    let before = etcd_requests(&etcd.url);
    let mut taken = Vec::new();
    let mut lat = Vec::new();
    for i in 0..SAMPLES {
        let t = Instant::now();
        let r = c.call("/IpamDriver.RequestAddress", &request(pool.id, i));
        lat.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.body);
        taken.push(address_of(&r.body));
    }
    let after_alloc = etcd_requests(&etcd.url);
    col.request = percentiles(lat);
    col.requests_per_alloc = (after_alloc - before) as f64 / SAMPLES as f64;
    let mut lat = Vec::new();
    for addr in &taken {
        let body = format!(r#"{{"PoolID":"{}","Address":"{addr}"}}"#, pool.id);
        let t = Instant::now();
        assert_eq!(c.call("/IpamDriver.ReleaseAddress", &body).status, 200);
        lat.push(t.elapsed());
    }
    col.requests_per_release = (etcd_requests(&etcd.url) - after_alloc) as f64 / SAMPLES as f64;
    col.release = percentiles(lat);
    drop(server);

    // Throughput: 1 client on one server, then 8 clients on 4 servers (4 hosts).
    col.rate_1 = throughput(etcd, &prefix, pool, dir, 1, 1);
    col.rate_8 = throughput(etcd, &prefix, pool, dir, 4, 8);
    col
}

/// Allocations per second with `clients` clients spread over `servers` plugin processes; the
/// addresses are released again afterwards (not timed).
fn throughput(
    etcd: &Etcd,
    prefix: &str,
    pool: &Pool,
    dir: &TempDir,
    servers: usize,
    clients: usize,
) -> f64 {
    let per_client = SAMPLES / clients.max(1);
    let servers: Vec<Server> = (0..servers)
        .map(|i| {
            Server::start(
                &etcd.url,
                prefix,
                &dir.join(&format!("{}-t{i}.sock", pool.id)),
            )
        })
        .collect();
    let sockets: Vec<_> = servers.iter().map(|s| s.socket.clone()).collect();
    let started = Instant::now();
    let taken: Vec<(usize, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|n| {
                let sock = sockets[n % sockets.len()].clone();
                scope.spawn(move || {
                    let mut c = PluginClient::connect(&sock);
                    let got: Vec<String> = (0..per_client)
                        .map(|i| {
                            let r = c.call(
                                "/IpamDriver.RequestAddress",
                                &request(pool.id, 100_000 + n * 10_000 + i),
                            );
                            assert_eq!(r.status, 200, "{}", r.body);
                            address_of(&r.body)
                        })
                        .collect();
                    (n, got)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let rate = (clients * per_client) as f64 / started.elapsed().as_secs_f64();
    for (n, addrs) in taken {
        let mut c = PluginClient::connect(&sockets[n % sockets.len()]);
        for addr in addrs {
            let body = format!(r#"{{"PoolID":"{}","Address":"{addr}"}}"#, pool.id);
            assert_eq!(c.call("/IpamDriver.ReleaseAddress", &body).status, 200);
        }
    }
    drop(servers);
    rate
}

/// Raw txn floor and RequestAddress/ReleaseAddress through the socket on the /24, against an
/// etcd with TLS, client certificates and auth: (floor, request, release).
fn measure_secure(dir: &TempDir) -> ((f64, f64), (f64, f64), (f64, f64)) {
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
    ok(Command::new(BIN)
        .args(common::store_args(&etcd.url, &prefix))
        .args(&flags)
        .args([
            "ip-range",
            "--ip-start",
            "198.19.7.0/24",
            "--ip-end",
            "198.19.7.255/24",
        ])
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
    let client = Client::secured(vec![etcd.url.clone()], Duration::from_secs(5), security);
    let key = format!("{prefix}/floor");
    client
        .txn(&Txn {
            success: vec![Op::put(&key, "0")],
            ..Txn::default()
        })
        .expect("txn");
    let floor: Vec<Duration> = (0..FLOOR_SAMPLES)
        .map(|i| {
            let txn = Txn {
                compares: vec![Compare::Exists(key.clone())],
                success: vec![Op::put(&key, i.to_string())],
                failure: vec![],
            };
            let t = Instant::now();
            client.txn(&txn).expect("txn");
            t.elapsed()
        })
        .collect();

    let sock = dir.join("secure.sock");
    let mut command = Command::new(BIN);
    command.args(&flags);
    let server = Server::start_with(command, &etcd.url, &prefix, &sock, &sock);
    let mut c = PluginClient::connect(&sock);
    assert_eq!(
        c.call("/IpamDriver.RequestPool", r#"{"Pool":"198.19.7.0/24"}"#)
            .status,
        200
    );
    let mut taken = Vec::new();
    let mut lat = Vec::new();
    for i in 0..SAMPLES {
        let t = Instant::now();
        let r = c.call("/IpamDriver.RequestAddress", &request("198.19.7.0", i));
        lat.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.body);
        taken.push(address_of(&r.body));
    }
    let request_lat = percentiles(lat);
    let mut lat = Vec::new();
    for addr in &taken {
        let body = format!(r#"{{"PoolID":"198.19.7.0","Address":"{addr}"}}"#);
        let t = Instant::now();
        assert_eq!(c.call("/IpamDriver.ReleaseAddress", &body).status, 200);
        lat.push(t.elapsed());
    }
    drop(server);
    (percentiles(floor), request_lat, percentiles(lat))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: run only when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let etcd = Etcd::start("bench");
    let dir = TempDir::new("bench");
    let pools = [
        Pool {
            label: "/24",
            first: "198.19.7.0/24",
            last: "198.19.7.255/24",
            id: "198.19.7.0",
        },
        Pool {
            label: "/16",
            first: "198.18.0.0/16",
            last: "198.18.255.255/16",
            id: "198.18.0.0",
        },
    ];
    let cols: Vec<Column> = pools.iter().map(|p| measure(&etcd, p, &dir)).collect();

    let row = |name: &str, f: &dyn Fn(&Column) -> String| {
        println!("| {name} | {} | {} |", f(&cols[0]), f(&cols[1]));
    };
    let pair = |(p50, p99): (f64, f64)| format!("{p50:.2} / {p99:.2}");
    println!("| ms p50 / p99 ({SAMPLES} allocations, {FLOOR_SAMPLES} raw txns) | /24 pool (254) | /16 pool (65,534) |");
    println!("|---|---|---|");
    row("raw etcd CAS txn (floor)", &|c| pair(c.floor));
    row("read the whole pool (the original, per allocation)", &|c| {
        pair(c.whole_pool_read)
    });
    row("RequestAddress via socket", &|c| pair(c.request));
    row("RequestAddress / floor (p50)", &|c| {
        format!("{:.2}x", c.request.0 / c.floor.0)
    });
    row("ReleaseAddress via socket", &|c| pair(c.release));
    row("ReleaseAddress / floor (p50)", &|c| {
        format!("{:.2}x", c.release.0 / c.floor.0)
    });
    row("allocations/s, 1 client, 1 server", &|c| {
        format!("{:.0}", c.rate_1)
    });
    row("allocations/s, 8 clients, 4 servers", &|c| {
        format!("{:.0}", c.rate_8)
    });
    row("etcd requests per allocation", &|c| {
        format!("{:.2}", c.requests_per_alloc)
    });
    row("etcd requests per release", &|c| {
        format!("{:.2}", c.requests_per_release)
    });

    let (floor, request, release) = measure_secure(&dir);
    let plain = &cols[0];
    println!();
    println!("| ms p50 / p99, /24 pool | http, no auth | https + client certificate + auth |");
    println!("|---|---|---|");
    println!(
        "| raw etcd CAS txn (floor) | {} | {} |",
        pair(plain.floor),
        pair(floor)
    );
    println!(
        "| RequestAddress via socket | {} | {} |",
        pair(plain.request),
        pair(request)
    );
    println!(
        "| RequestAddress / floor (p50) | {:.2}x | {:.2}x |",
        plain.request.0 / plain.floor.0,
        request.0 / floor.0
    );
    println!(
        "| ReleaseAddress via socket | {} | {} |",
        pair(plain.release),
        pair(release)
    );
}
