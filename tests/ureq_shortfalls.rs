//! Where ureq falls short for a long-running client, shown against a real etcd, and that the
//! etcd client works around it: ureq's resolver starts a thread per request when a timeout is
//! set, even for a literal address (issue 13); ours starts none.

mod common;

use common::Etcd;
use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/tasks_per_request`, which `cargo test` builds along with the
/// tests (built here when only this test was asked for).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join("tasks_per_request");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--example", "tasks_per_request"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build --example tasks_per_request");
    }
    path
}

/// Tasks started by `n` requests of `client`, counted in a PID namespace of their own.
fn tasks_started(client: &str, endpoint: &str, n: usize) -> u64 {
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(example())
        .args([client, endpoint, &n.to_string()])
        .output()
        .expect("run unshare (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{client}: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim().parse().expect("a count")
}

#[test]
fn ureq_starts_a_thread_per_request_and_the_etcd_client_none() {
    let etcd = Etcd::shared();
    let n = 50;
    let theirs = tasks_started("ureq-default", &etcd.url, n);
    assert!(
        theirs >= n as u64,
        "ureq's default resolver started {theirs} tasks for {n} requests: fixed upstream? \
         then src/resolver.rs can go"
    );
    assert_eq!(tasks_started("ours", &etcd.url, n), 0);
}
