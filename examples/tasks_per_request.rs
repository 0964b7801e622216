//! How many threads (tasks) `N` etcd requests start, for `tests/ureq_shortfalls.rs`: run it
//! in a PID namespace of its own, where `/proc/sys/kernel/ns_last_pid` counts every task made.
//!
//! Usage: tasks_per_request ours|ureq-default ENDPOINT N

use std::time::Duration;

use oam_docker_ipam::etcd::Client;
use oam_docker_ipam::kv::Range;

fn last_pid() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            eprintln!("cannot read /proc/sys/kernel/ns_last_pid");
            std::process::exit(2)
        })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [which, endpoint, n] = args.as_slice() else {
        eprintln!("usage: tasks_per_request ours|ureq-default ENDPOINT N");
        std::process::exit(2)
    };
    let n: usize = n.parse().unwrap_or(0);
    let timeout = Duration::from_secs(3);
    let count = match which.as_str() {
        "ours" => {
            let client = Client::new(vec![endpoint.clone()], timeout);
            let before = last_pid();
            for _ in 0..n {
                if let Err(e) = client.range(&Range::key("/tasks-per-request")) {
                    eprintln!("request failed: {e}");
                    std::process::exit(1)
                }
            }
            last_pid() - before
        }
        "ureq-default" => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(timeout))
                .build()
                .into();
            let before = last_pid();
            for _ in 0..n {
                if let Err(e) = agent.get(&format!("{endpoint}/version")).call() {
                    eprintln!("request failed: {e}");
                    std::process::exit(1)
                }
            }
            last_pid() - before
        }
        other => {
            eprintln!("unknown client {other:?}");
            std::process::exit(2)
        }
    };
    println!("{count}");
}
