//! The RPM under a real systemd: a Debian trixie root (built once and cached by
//! tests/system/build-root.sh) booted with `systemd-nspawn --boot` on a private network
//! (tests/system/machine.sh), with dockerd and an etcd on the container's own loopback. In it:
//! `rpm -i`, socket activation, journal priorities, a bad setting failing once, `docker run`s
//! that lose nothing across three restarts and an in-place upgrade, the man page, and the
//! upgrade from the original 1.0.0 RPM. Each container is powered off and its scratch dir and
//! cgroups removed on drop, also when a test fails; a run killed outright is cleaned up by the
//! next one. Needs root, debootstrap and systemd-container (tests/run-all.sh installs them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const CACHE: &str = "/var/cache/oam-docker-ipam-test";
/// Where etcd listens inside the container (set by build-root.sh): no tool's default, so a
/// service that reaches it was given this endpoint.
const ETCD: &str = "http://127.0.0.1:22379";
const ORIGINAL_RPM: &str = "oam-docker-ipam-1.0.0-1.el7.centos.x86_64.rpm";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One container at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn script(name: &str) -> PathBuf {
    repo(&format!("tests/system/{name}"))
}

/// The cached root, built on first use.
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let out = Command::new("bash")
            .arg(script("build-root.sh"))
            .env("OAM_SYSTEM_TEST_CACHE", CACHE)
            .output()
            .expect("run build-root.sh");
        let path = common::ok_in("build-root.sh", out);
        PathBuf::from(
            path.lines()
                .last()
                .expect("build-root.sh printed no path")
                .trim(),
        )
    })
}

/// Our RPM twice, release 1 and release 2 (the in-place upgrade), copied out of target/rpm
/// (which each build replaces).
fn rpms() -> &'static (PathBuf, PathBuf) {
    static RPMS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    RPMS.get_or_init(|| {
        let keep = Path::new(CACHE).join(format!("rpms-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&keep);
        std::fs::create_dir_all(&keep).expect("rpm dir");
        let build = |release: &str| {
            let out = Command::new(repo("packaging/build-rpm"))
                .env("RPM_RELEASE", release)
                .output()
                .expect("run packaging/build-rpm");
            let built = common::ok_in("packaging/build-rpm", out);
            let built = PathBuf::from(built.lines().last().expect("build-rpm printed nothing"));
            let name = built.file_name().expect("rpm file name");
            let kept = keep.join(name);
            std::fs::copy(&built, &kept).expect("copy the rpm");
            kept
        };
        let first = build("1");
        let second = build("2");
        (first, second)
    })
}

fn rpm_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .expect("rpm file name")
        .to_string()
}

/// A booted container: systemd is its PID 1, `leader` its host PID.
struct Machine {
    scratch: PathBuf,
    name: String,
    leader: String,
}

impl Machine {
    fn boot(tag: &str) -> Machine {
        clean_stale_runs();
        let root = root();
        let (ours, upgrade) = rpms();
        let name = format!("oamsys-{tag}-{}", std::process::id());
        let scratch = Path::new(CACHE).join("runs").join(&name);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(scratch.join("pkgs")).expect("scratch dir");
        for rpm in [ours, upgrade] {
            std::fs::copy(rpm, scratch.join("pkgs").join(rpm_name(rpm))).expect("copy rpm");
        }
        let original = repo("../shared/fixtures/original").join(ORIGINAL_RPM);
        std::fs::copy(&original, scratch.join("pkgs").join(ORIGINAL_RPM))
            .unwrap_or_else(|e| panic!("the original's RPM {}: {e}", original.display()));
        // From here on, Drop powers it off and removes the scratch dir, whatever happens.
        let mut machine = Machine {
            scratch,
            name,
            leader: String::new(),
        };
        let out = Command::new("bash")
            .arg(script("machine.sh"))
            .arg("start")
            .arg(&machine.scratch)
            .arg(root)
            .arg(&machine.name)
            .output()
            .expect("run machine.sh");
        machine.leader = common::ok_in("machine.sh start", out).trim().to_string();
        machine
    }

    /// Runs `script` with sh in the container (all its namespaces), with a clean environment.
    fn sh(&self, script: &str) -> Output {
        Command::new("timeout")
            .args(["-s", "KILL", "300", "nsenter", "-t", &self.leader, "-a"])
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
            ])
            .args(["LANG=C.UTF-8", "SYSTEMD_PAGER=", "sh", "-c", script])
            .output()
            .expect("run nsenter")
    }

    /// Runs `script`; its stdout, or a panic with both streams when it fails.
    fn must(&self, script: &str) -> String {
        common::ok_in(script, self.sh(script))
    }

    /// Waits until `script` prints `want` (trimmed).
    fn wait_for(&self, script: &str, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            last = common::stdout(&self.sh(script)).trim().to_string();
            if last == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("`{script}` printed {last:?}, not {want:?}, within {limit:?}");
    }

    fn state(&self, unit: &str) -> String {
        common::stdout(&self.sh(&format!("systemctl is-active {unit}")))
            .trim()
            .to_string()
    }

    /// The service's journal (this boot's), at `priority` or more urgent, messages only.
    fn journal(&self, priority: &str) -> String {
        self.must(&format!(
            "journalctl -q --no-pager -o cat -u oam-docker-ipam -p {priority}"
        ))
    }

    fn etcd_keys(&self, prefix: &str) -> Vec<String> {
        self.must(&format!(
            "ETCDCTL_API=3 etcdctl --endpoints {ETCD} get --prefix --keys-only {prefix}"
        ))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
    }

    fn cli(&self, args: &str) -> String {
        self.must(&format!("oam-docker-ipam --cluster-store={ETCD} {args}"))
    }

    fn busybox_image(&self) {
        self.must(
            "set -e; d=$(mktemp -d); mkdir $d/bin; cp /bin/busybox $d/bin/; \
             for t in sh ip true sleep cat; do ln -s busybox $d/bin/$t; done; \
             tar -C $d -c . | docker import - bb:latest >/dev/null; rm -rf $d",
        );
    }

    fn create_network(&self, name: &str) {
        self.must(&format!(
            "docker network create --ipam-driver talkingdata --subnet 192.0.2.0/24 \
             --gateway 192.0.2.10 --aux-address DefaultGatewayIPv4=192.0.2.1 \
             -o com.docker.network.bridge.name=br-{name} \
             -o com.docker.network.bridge.enable_ip_masquerade=false {name}"
        ));
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let out = Command::new("bash")
            .arg(script("machine.sh"))
            .arg("stop")
            .arg(&self.scratch)
            .arg(&self.name)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("machine.sh stop {}: {}", self.name, common::stderr(&o)),
            Err(e) => eprintln!("machine.sh stop {}: {e}", self.name),
        }
    }
}

/// Containers of runs that were killed outright (their test process is gone): stop them.
fn clean_stale_runs() {
    let Ok(runs) = std::fs::read_dir(Path::new(CACHE).join("runs")) else {
        return;
    };
    for run in runs.flatten() {
        let name = run.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').next().unwrap_or_default();
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let _ = Command::new("bash")
            .arg(script("machine.sh"))
            .arg("stop")
            .arg(run.path())
            .arg(&name)
            .status();
    }
    if let Ok(old) = std::fs::read_dir(CACHE) {
        for dir in old.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("rpms-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(dir.path());
                }
            }
        }
    }
}

/// Each `docker run` of the restart loop: `ok failed` counts in /run/loop.count.
const RUN_LOOP: &str = r#"
n=0; f=0
while [ ! -e /run/loop.stop ]; do
    if docker run --rm --network mynet bb:latest true >>/run/loop.log 2>&1; then n=$((n+1)); else f=$((f+1)); fi
    echo "$n $f" >/run/loop.count
done
"#;

fn loop_count(m: &Machine) -> (u64, u64) {
    let said = m.must("cat /run/loop.count 2>/dev/null || echo 0 0");
    let mut parts = said
        .split_whitespace()
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Waits until the loop has finished `more` runs beyond `(ok, failed)`.
fn wait_runs(m: &Machine, more: u64) {
    let (ok, failed) = loop_count(m);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let (o, f) = loop_count(m);
        if o + f >= ok + failed + more {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the docker run loop is stuck at {:?}:\n{}",
        loop_count(m),
        m.must("tail -n 20 /run/loop.log")
    );
}

#[test]
fn under_systemd_the_rpm_socket_activates_and_restarts_lose_no_docker_run() {
    let _serial = serial();
    let started = Instant::now();
    let m = Machine::boot("main");
    let systemd = m.must("systemctl --version | head -n 1");
    println!("system test: {}", systemd.trim());
    let (ours, upgrade) = rpms();

    // Installed, and the socket enabled: the service waits for Docker's first call.
    m.must(&format!("rpm -i --nodeps /mnt/pkgs/{}", rpm_name(ours)));
    m.must(&format!(
        "printf 'CLUSTER_STORE={ETCD}\\n' >/etc/sysconfig/oam-docker-ipam && \
         systemctl enable --now oam-docker-ipam.socket"
    ));
    assert_eq!(m.state("oam-docker-ipam.socket"), "active");
    m.cli("host-range --ip-start 192.0.2.50/24 --ip-end 192.0.2.59/24 --gateway 192.0.2.1");
    m.cli("ip-range --ip-start 192.0.2.100/24 --ip-end 192.0.2.199/24");
    assert_eq!(
        m.state("oam-docker-ipam.service"),
        "inactive",
        "the service started before anything called the socket"
    );
    m.busybox_image();
    m.create_network("mynet");
    assert_eq!(m.state("oam-docker-ipam.service"), "active");
    let info = m.journal("info");
    assert!(
        info.contains("serving the socket passed by systemd"),
        "not socket-activated:\n{info}"
    );
    assert!(
        info.contains(&format!("etcd endpoints {ETCD}: {ETCD} answers, etcd 3.")),
        "no etcd line at start:\n{info}"
    );
    assert!(info.contains("API prefix /v3"), "{info}");
    let addr = m.must("docker run --rm --network mynet bb:latest ip -4 -o addr show eth0");
    assert!(addr.contains("inet 192.0.2.1"), "{addr}");

    // Journal priorities: a refusal is a warning, an allocation is not.
    let refused = m.sh("docker run --rm --network mynet --ip 192.0.2.60 bb:latest true");
    assert!(!refused.status.success(), "192.0.2.60 is in no pool");
    let warnings = m.journal("warning");
    assert!(
        warnings.contains("192.0.2.60"),
        "the refusal is not a warning:\n{warnings}"
    );
    assert!(
        !warnings.contains("assigned 192.0.2.1"),
        "routine allocations show at -p warning:\n{warnings}"
    );
    assert!(m.journal("info").contains("assigned 192.0.2.1"));
    assert!(
        !m.journal("debug").contains("<6>"),
        "a priority prefix reached the journal as text"
    );
    // Off the journal (a pipe here) the CLI's error line stays plain, even with the variable.
    let plain = m.sh("JOURNAL_STREAM=1:1 oam-docker-ipam --cluster-store=nowhere ip-range");
    assert_eq!(plain.status.code(), Some(2));
    assert!(
        common::stderr(&plain).starts_with("oam-docker-ipam: invalid --cluster-store"),
        "{}",
        common::stderr(&plain)
    );

    // A malformed setting: the service fails once, with the reason in `systemctl status`.
    m.must(
        "printf 'CLUSTER_STORE=etcd.example:2379\\n' >/etc/sysconfig/oam-docker-ipam && \
         systemctl restart oam-docker-ipam.service",
    );
    m.wait_for(
        "systemctl show -P ActiveState oam-docker-ipam.service",
        "failed",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(3)); // longer than RestartSec=2
    let show = m.must(
        "systemctl show -p ActiveState -p NRestarts -p ExecMainStatus oam-docker-ipam.service",
    );
    assert!(
        show.contains("ActiveState=failed")
            && show.contains("NRestarts=0")
            && show.contains("ExecMainStatus=2"),
        "{show}"
    );
    let status = common::stdout(&m.sh("systemctl status --no-pager -l oam-docker-ipam.service"));
    assert!(
        status.contains("oam-docker-ipam: invalid --cluster-store \"etcd.example:2379\""),
        "systemctl status does not say why:\n{status}"
    );
    assert!(m
        .journal("err")
        .contains("invalid --cluster-store \"etcd.example:2379\""));

    // No endpoint answers: a warning, and the service keeps serving.
    m.must(
        "printf 'CLUSTER_STORE=http://127.0.0.1:9\\n' >/etc/sysconfig/oam-docker-ipam && \
         systemctl reset-failed oam-docker-ipam.service && systemctl restart oam-docker-ipam.service",
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !m
        .journal("warning")
        .contains("http://127.0.0.1:9: none answers")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        m.journal("warning")
            .contains("etcd endpoints http://127.0.0.1:9: none answers"),
        "{}",
        m.journal("info")
    );
    assert_eq!(m.state("oam-docker-ipam.service"), "active");
    m.must(&format!(
        "printf 'CLUSTER_STORE={ETCD}\\n' >/etc/sysconfig/oam-docker-ipam && \
         systemctl restart oam-docker-ipam.service"
    ));

    // docker run in a loop while the service restarts three times and is upgraded in place.
    m.must(&format!(
        "systemd-run --quiet --unit=oam-run-loop sh -c '{}'",
        RUN_LOOP.replace('\'', "'\\''")
    ));
    wait_runs(&m, 5);
    for _ in 0..3 {
        m.must("systemctl restart oam-docker-ipam.service");
        wait_runs(&m, 5);
    }
    m.must(&format!("rpm -U --nodeps /mnt/pkgs/{}", rpm_name(upgrade)));
    assert_eq!(
        m.must("rpm -q --qf '%{VERSION}-%{RELEASE}' oam-docker-ipam")
            .trim(),
        format!("{VERSION}-2")
    );
    wait_runs(&m, 5);
    m.must("touch /run/loop.stop");
    m.wait_for(
        "systemctl is-active oam-run-loop.service",
        "inactive",
        Duration::from_secs(60),
    );
    let (runs, failed) = loop_count(&m);
    println!("system test: {runs} docker runs across 3 restarts and 1 upgrade, {failed} failed");
    assert_eq!(
        failed,
        0,
        "failed docker runs:\n{}\n{}",
        m.must("grep -v '^$' /run/loop.log | tail -n 20"),
        m.must("journalctl -q --no-pager -o short-precise -u oam-docker-ipam.socket -u oam-docker-ipam.service -u docker.service | tail -n 150")
    );
    assert!(runs >= 25, "only {runs} docker runs");
    let left = m.etcd_keys("/talkingdata/containers/192.0.2.0/assigned/");
    assert!(left.is_empty(), "addresses left assigned: {left:?}");
    assert_eq!(m.state("oam-docker-ipam.service"), "active");
    assert_eq!(m.state("oam-docker-ipam.socket"), "active");

    // The installed man page renders.
    let man = m.must("MANPAGER=cat MANWIDTH=80 man oam-docker-ipam 2>&1");
    assert!(
        man.contains("OAM-DOCKER-IPAM(8)") && man.contains("SYNOPSIS"),
        "{man}"
    );
    println!("system test: took {:.0?}", started.elapsed());
}

#[test]
fn under_systemd_the_upgrade_from_the_original_1_0_0_rpm_keeps_its_endpoints() {
    let _serial = serial();
    let started = Instant::now();
    let m = Machine::boot("orig");
    let (ours, _) = rpms();

    // The original, running, with its endpoints in its own config (the only place they are).
    m.must(&format!(
        "rpm -i --nodeps /mnt/pkgs/{ORIGINAL_RPM} && \
         sed -i 's|^IPAM_CLUSTER_STORE=.*|IPAM_CLUSTER_STORE={ETCD}|' \
             /etc/oam-docker-ipam/oam-docker-ipam.conf && \
         systemctl daemon-reload && systemctl start oam-docker-ipam.service"
    ));
    m.wait_for(
        "test -S /run/docker/plugins/talkingdata.sock && systemctl is-active oam-docker-ipam.service",
        "active",
        Duration::from_secs(10),
    );
    let old = m.must("systemctl show -P ExecMainPID oam-docker-ipam.service");
    let cmdline = m.must(&format!("tr '\\0' ' ' </proc/{}/cmdline", old.trim()));
    assert!(
        cmdline.contains("--cluster-store="),
        "not the original: {cmdline}"
    );
    // The original's own command line defines a pool, in etcd's v2 keyspace.
    m.cli("ip-range --ip-start 198.51.100.10/24 --ip-end 198.51.100.19/24");

    m.must(&format!("rpm -U --nodeps /mnt/pkgs/{}", rpm_name(ours)));
    let version = m.must("oam-docker-ipam --version");
    assert_eq!(version.trim(), format!("oam-docker-ipam {VERSION}"));
    let sysconfig = m.must("cat /etc/sysconfig/oam-docker-ipam");
    assert!(
        sysconfig
            .lines()
            .any(|l| l == format!("CLUSTER_STORE={ETCD}")),
        "the old endpoints were not carried over:\n{sysconfig}"
    );
    assert_eq!(m.state("oam-docker-ipam.socket"), "active");

    // Docker reaches our plugin through the socket, which reads the old endpoints' etcd: it
    // refuses the original's network until migrate-v2 (README, "Upgrading from 1.x").
    m.busybox_image();
    let create = "docker network create --ipam-driver talkingdata --subnet 198.51.100.0/24 \
         --gateway 198.51.100.1 -o com.docker.network.bridge.name=br-up \
         -o com.docker.network.bridge.enable_ip_masquerade=false upnet";
    let refused = m.sh(create);
    assert!(
        common::stderr(&refused).contains("run 'oam-docker-ipam migrate-v2'"),
        "{}",
        common::stderr(&refused)
    );
    m.cli("migrate-v2");
    m.must("systemctl restart oam-docker-ipam.service");
    m.must(create);
    let addr = m.must("docker run --rm --network upnet bb:latest ip -4 -o addr show eth0");
    assert!(addr.contains("inet 198.51.100.1"), "{addr}");
    let pid = m.must("systemctl show -P ExecMainPID oam-docker-ipam.service");
    assert_ne!(pid.trim(), old.trim(), "the original still serves");
    let info = m.journal("info");
    assert!(
        info.contains(&format!("etcd endpoints {ETCD}: {ETCD} answers")),
        "{info}"
    );
    assert!(m
        .etcd_keys("/talkingdata/containers/198.51.100.0/assigned/")
        .is_empty());
    println!(
        "system test: upgrade from 1.0.0 took {:.0?}",
        started.elapsed()
    );
}
