//! Where ureq falls short for a long-running client, shown against a real etcd, and that the
//! etcd client works around it: ureq's resolver starts a thread per request when a timeout is
//! set, even for a literal address (issue 13); ours starts none.
//!
//! Tasks are counted in a PID namespace of their own, where `/proc/sys/kernel/ns_last_pid`
//! moves by one for every task made: the test runs itself there (`unshare`), with
//! `TASKS_CLIENT` saying which client to count.

mod common;

use common::Etcd;
use oam_docker_ipam::etcd::Client;
use oam_docker_ipam::kv::Range;
use std::process::Command;
use std::time::Duration;

const REQUESTS: u64 = 50;
const TEST: &str = "ureq_starts_a_thread_per_request_and_the_etcd_client_none";

fn last_pid() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .expect("read ns_last_pid")
        .trim()
        .parse()
        .expect("a pid")
}

/// Inside the namespace: makes the requests with `client` and prints the tasks they made.
fn count_here(client: &str, endpoint: &str) {
    let timeout = Duration::from_secs(3);
    let ours = Client::new(vec![endpoint.to_string()], timeout);
    let theirs: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    let before = last_pid();
    for _ in 0..REQUESTS {
        match client {
            "ours" => drop(ours.range(&Range::key("/tasks")).expect("range")),
            _ => drop(
                theirs
                    .get(&format!("{endpoint}/version"))
                    .call()
                    .expect("get"),
            ),
        }
    }
    println!("tasks={} ", last_pid() - before);
}

/// Runs this test again in a new PID namespace, counting `client`'s tasks there.
fn tasks_started(client: &str, endpoint: &str) -> u64 {
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(std::env::current_exe().expect("test binary"))
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("TASKS_CLIENT", client)
        .env("TASKS_ENDPOINT", endpoint)
        .output()
        .expect("run unshare (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{client}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints the test's name first, on the same line.
    text.split("tasks=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count from {client}: {text}"))
}

#[test]
fn ureq_starts_a_thread_per_request_and_the_etcd_client_none() {
    if let (Ok(client), Ok(endpoint)) = (
        std::env::var("TASKS_CLIENT"),
        std::env::var("TASKS_ENDPOINT"),
    ) {
        return count_here(&client, &endpoint);
    }
    let etcd = Etcd::shared();
    let theirs = tasks_started("ureq-default", &etcd.url);
    assert!(
        theirs >= REQUESTS,
        "ureq's default resolver started {theirs} tasks for {REQUESTS} requests: fixed \
         upstream? then src/resolver.rs can go"
    );
    assert_eq!(tasks_started("ours", &etcd.url), 0);
}
