//! End to end with real Docker daemons (Debian's docker.io) in network namespaces this test
//! makes: one host, two hosts on one L2 segment, and a daemon restart. Each simulated host has
//! its own network namespace, mount namespace (its own /run/docker/plugins), host name, plugin
//! process and dockerd; all share one etcd on loopback. Everything is torn down by PID and by
//! name on drop, also when a test fails.

mod common;

use common::{host_range, ip_range, ok_in, stderr, stdout, unique_prefix, Etcd, TempDir, BIN};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One daemon pair at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    ok_in(&format!("{program} {args:?}"), run(program, args))
}

/// A busybox root file system, imported into each daemon as `bb:latest` (no registry here).
fn image_tar(dir: &TempDir) -> PathBuf {
    let root = dir.join("image-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    for tool in ["sh", "ip", "ping", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    let tar = dir.join("image.tar");
    must(
        "tar",
        &[
            "-C",
            root.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ],
    );
    tar
}

/// The namespaces' shared parts: a private bind mount holding the mount-namespace files.
struct Lab {
    ns_dir: PathBuf,
    dir: TempDir,
    tar: PathBuf,
    tag: String,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let tag = format!("{tag}{}", std::process::id() % 100_000);
        let ns_dir = PathBuf::from(format!("/run/oam-e2e-{tag}"));
        std::fs::create_dir_all(&ns_dir).unwrap();
        std::fs::create_dir_all("/run/docker/plugins").unwrap();
        let ns = ns_dir.to_str().unwrap();
        must("mount", &["--bind", ns, ns]);
        must("mount", &["--make-private", ns]);
        let dir = TempDir::new(&format!("e2e-{tag}"));
        let tar = image_tar(&dir);
        Lab {
            ns_dir,
            dir,
            tar,
            tag,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = run("umount", &[self.ns_dir.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.ns_dir);
    }
}

/// One simulated Docker host.
struct Host {
    name: String,
    netns: String,
    mount_ns: PathBuf,
    dir: PathBuf,
    etcd_url: String,
    prefix: String,
    plugin: Option<Child>,
    dockerd: Option<Child>,
}

impl Host {
    fn start(lab: &Lab, name: &str, etcd: &Etcd, prefix: &str) -> Host {
        let netns = format!("oam{}{}", lab.tag, name);
        let mount_ns = lab.ns_dir.join(name);
        let dir = lab.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut host = Host {
            name: name.into(),
            netns,
            mount_ns,
            dir,
            etcd_url: etcd.url.clone(),
            prefix: prefix.into(),
            plugin: None,
            dockerd: None,
        };
        must("ip", &["netns", "add", &host.netns]);
        must(
            "ip",
            &[
                "netns",
                "exec",
                &host.netns,
                "ip",
                "link",
                "set",
                "lo",
                "up",
            ],
        );
        std::fs::write(&host.mount_ns, "").unwrap();
        let mnt = format!("--mount={}", host.mount_ns.display());
        must("unshare", &[&mnt, "--propagation", "private", "true"]);
        must(
            "nsenter",
            &[&mnt, "mount", "-t", "tmpfs", "tmpfs", "/run/docker/plugins"],
        );
        host.start_plugin();
        host.start_dockerd();
        let import = Command::new("docker")
            .args(["import", lab.tar.to_str().unwrap(), "bb:latest"])
            .env("DOCKER_HOST", host.docker_host())
            .output()
            .unwrap();
        assert!(
            import.status.success(),
            "docker import: {}",
            stderr(&import)
        );
        host
    }

    fn docker_host(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.display())
    }

    /// `BIN args` in this host's mount namespace and with this host's name.
    fn own_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.mount_ns.display()))
            .args([
                "unshare",
                "--uts",
                "sh",
                "-c",
                "hostname \"$0\" && exec \"$@\"",
                &self.name,
                BIN,
            ])
            .args([
                "--cluster-store",
                &self.etcd_url,
                "--store-prefix",
                &self.prefix,
            ])
            .args(args)
            .env("DOCKER_HOST", self.docker_host())
            // The simulated hosts share this machine's /etc/machine-id, as clones would.
            .env("HOST_ID", format!("id-{}", self.name))
            .stdin(Stdio::null());
        c
    }

    fn start_plugin(&mut self) {
        let log = std::fs::File::create(self.dir.join("plugin.log")).unwrap();
        let child = self
            .own_command(&["--debug", "server"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.plugin = Some(child);
    }

    fn start_dockerd(&mut self) {
        let d = self.dir.display().to_string();
        let log = std::fs::File::create(self.dir.join("dockerd.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--mount={}", self.mount_ns.display()))
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .args([
                "dockerd",
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
            ])
            .args([
                "--data-root",
                &format!("{d}/root"),
                "--exec-root",
                &format!("{d}/exec"),
            ])
            .args([
                "-H",
                &self.docker_host(),
                "--pidfile",
                &format!("{d}/docker.pid"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.dockerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self
                .docker(&["info", "--format", "{{.ID}}"])
                .status
                .success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "dockerd on {} did not start: {}",
            self.name,
            self.log_tail("dockerd.log")
        );
    }

    fn stop_dockerd(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            let _ = run("kill", &[&child.id().to_string()]);
            let _ = child.wait();
        }
        let pidfile = self.dir.join("docker.pid");
        let deadline = Instant::now() + Duration::from_secs(30);
        while pidfile.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("120")
            .arg("docker")
            .args(args)
            .env("DOCKER_HOST", self.docker_host())
            .output()
            .unwrap()
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        ok_in(
            &format!("docker {args:?} on {}", self.name),
            self.docker(args),
        )
    }

    fn in_netns(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.netns];
        all.extend_from_slice(args);
        must("ip", &all)
    }

    /// The address and MAC a container has on the network.
    fn addr_of(&self, container: &str) -> (String, String) {
        let out = self.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.MacAddress}}{{end}}",
            container,
        ]);
        let mut parts = out.split_whitespace();
        (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        )
    }

    fn log_tail(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} plugin.log\n{}",
                self.name,
                self.log_tail("plugin.log")
            );
            eprintln!(
                "--- {} dockerd.log\n{}",
                self.name,
                self.log_tail("dockerd.log")
            );
        }
        if self.dockerd.is_some() {
            let ids = stdout(&self.docker(&["ps", "-aq"]));
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
            let _ = self.docker(&["network", "rm", "mynet"]);
        }
        self.stop_dockerd();
        if let Some(mut plugin) = self.plugin.take() {
            let _ = run("kill", &[&plugin.id().to_string()]);
            let _ = plugin.wait();
        }
        let _ = run("umount", &[self.mount_ns.to_str().unwrap()]);
        let _ = std::fs::remove_file(&self.mount_ns);
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Takes the one-at-a-time lock and defines, under a fresh prefix, hosts `NET.10`-`NET.20`
/// with the router `NET.1` and containers `NET.100`-`NET.200` (NET a /24's first three octets).
fn lab_pools(tag: &str, net: &str) -> (MutexGuard<'static, ()>, &'static Etcd, String) {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let etcd = Etcd::shared();
    let p = unique_prefix(tag);
    let hosts = (
        format!("{net}.10/24"),
        format!("{net}.20/24"),
        format!("{net}.1"),
    );
    host_range(&etcd.url, &p, &hosts.0, &hosts.1, &hosts.2);
    ip_range(
        &etcd.url,
        &p,
        &format!("{net}.100/24"),
        &format!("{net}.200/24"),
    );
    (serial, etcd, p)
}

/// A command line's words (none of them has a space).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// assigned/ of a container pool: address → owner record.
fn assigned(etcd: &Etcd, prefix: &str, net: &str) -> HashMap<String, Value> {
    let base = format!("{prefix}/containers/{net}/assigned/");
    etcd.dump(&base)
        .into_iter()
        .map(|(k, v)| {
            (
                k.trim_start_matches(&base).to_string(),
                serde_json::from_str(&v).unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Container pool keys (both directories), for before/after comparisons.
fn pool_keys(etcd: &Etcd, prefix: &str, net: &str) -> Vec<String> {
    etcd.dump(&format!("{prefix}/containers/{net}/"))
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

fn create_network(host: &Host, ifcfg: &Path, interface: &str) -> String {
    let out = host
        .own_command(&[
            "create-network",
            "--ifcfg-dir",
            ifcfg.to_str().unwrap(),
            "--no-restart",
            "--interface",
            interface,
        ])
        .output()
        .unwrap();
    ok_in(&format!("create-network on {}", host.name), out)
}

/// The host address `host` holds according to etcd.
fn host_address(etcd: &Etcd, prefix: &str, host: &str) -> String {
    let base = format!("{prefix}/hosts/assigned/");
    let held: Vec<String> = etcd
        .dump(&base)
        .into_iter()
        .filter(|(_, v)| {
            serde_json::from_str::<Value>(v).is_ok_and(|o| o["Host"] == host && o["Role"] == "host")
        })
        .map(|(k, _)| k.trim_start_matches(&base).to_string())
        .collect();
    assert_eq!(held.len(), 1, "{host} holds {held:?}");
    held[0].clone()
}

/// create-network against a real dockerd: each refusal comes before anything changes (etcd,
/// the ifcfg files, Docker's networks), and the dry run prints every step and changes nothing.
/// (A failure at each later step being undone exactly is unit-tested in network.rs, where a
/// step can be made to fail.)
#[test]
fn create_network_refuses_before_any_change_and_dry_runs_with_a_real_dockerd() {
    let (_serial, etcd, p) = lab_pools("e2e-cn", "192.0.2");
    let lab = Lab::new("cn");
    let host = Host::start(&lab, "hostC", etcd, &p);
    host.in_netns(&[
        "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    let ifcfg = lab.dir.join("ifcfg");
    std::fs::create_dir_all(&ifcfg).unwrap();
    std::fs::write(ifcfg.join("ifcfg-br0"), "DEVICE=br0\nIPADDR=203.0.113.9\n").unwrap();
    let dir = ifcfg.to_str().unwrap();
    let networks = || stdout(&host.docker(&["network", "ls", "--format", "{{.Name}}"]));
    let before = (etcd.dump(&p), common::files_in(&ifcfg), networks());
    let run = |args: &[&str]| {
        let base = ["create-network", "--ifcfg-dir", dir, "--interface", "eth1"];
        host.own_command(&[&base[..], args].concat())
            .output()
            .unwrap()
    };
    let cases: &[(&[&str], &str)] = &[
        (&["--ip", "198.51.100.7"], "not in the address pool"),
        // The dry run refuses what the real run would, instead of saying "would take".
        (
            &["--ip", "198.51.100.7", "--dry-run"],
            "not in the address pool",
        ),
        (
            &["--ip", "192.0.2.1", "--dry-run"],
            "192.0.2.1 is not in the address pool of 192.0.2.0/24",
        ),
        (
            &["--ip", "192.0.2.11"],
            "exists with other content; use --force",
        ),
        (&["--ifcfg-dir", "/nonexistent/ifcfg"], "is not a directory"),
    ];
    for (args, needle) in cases {
        common::fails(run(args), 1, needle);
    }
    common::fails(run(&["--mtu", "12"]), 2, "--mtu");
    assert_eq!(
        (etcd.dump(&p), common::files_in(&ifcfg), networks()),
        before
    );

    std::fs::remove_file(ifcfg.join("ifcfg-br0")).unwrap();
    let said = ok_in(
        "create-network --dry-run",
        run(&["--dry-run", "--ip", "192.0.2.12"]),
    );
    for step in [
        "would take 192.0.2.12 from the host pool",
        "--ipam-driver=talkingdata --subnet=192.0.2.0/24 --gateway=<host address> --aux-address=DefaultGatewayIPv4=192.0.2.1 mynet",
        "would write",
        "would add BRIDGE=br0 to",
        "systemctl restart network",
    ] {
        assert!(said.contains(step), "dry run does not say {step:?}:\n{said}");
    }
    assert_eq!(etcd.dump(&p), before.0);
    assert!(common::files_in(&ifcfg).is_empty());
    assert_eq!(networks(), before.2);
}

#[test]
fn one_host_allocates_from_etcd_and_gives_addresses_back() {
    let (_serial, etcd, p) = lab_pools("e2e-one", "192.0.2");
    let pool_before = pool_keys(etcd, &p, "192.0.2.0");

    let lab = Lab::new("one");
    let host = Host::start(&lab, "hostA", etcd, &p);
    host.in_netns(&[
        "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    let ifcfg = lab.dir.join("ifcfg");
    std::fs::create_dir_all(&ifcfg).unwrap();
    let original_eth1 = "DEVICE=eth1\nBOOTPROTO=none\nONBOOT=yes\n";
    std::fs::write(ifcfg.join("ifcfg-eth1"), original_eth1).unwrap();

    let said = create_network(&host, &ifcfg, "eth1");
    assert!(said.contains("created Docker network mynet"), "{said}");
    let host_ip = host_address(etcd, &p, "hostA");
    let bridge = std::fs::read_to_string(ifcfg.join("ifcfg-br0")).unwrap();
    assert_eq!(
        bridge,
        format!(
            "DEVICE=br0\nTYPE=Bridge\nBOOTPROTO=static\nIPADDR={host_ip}\nGATEWAY=192.0.2.1\n\
             NETMASK=255.255.255.0\nONBOOT=yes\nNOZEROCONF=yes\nIPV6INIT=no\nNM_CONTROLLED=no\nDELAY=0\n"
        )
    );
    assert_eq!(
        std::fs::read_to_string(ifcfg.join("ifcfg-eth1")).unwrap(),
        format!("{original_eth1}BRIDGE=br0\n")
    );
    let backups: Vec<String> = std::fs::read_dir(&ifcfg)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("ifcfg-eth1.") && n.ends_with(".bak"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(
        std::fs::read_to_string(ifcfg.join(&backups[0])).unwrap(),
        original_eth1
    );
    // The network is as seed 001 lists it, and br0 carries this host's address.
    let inspect = host.docker_ok(&["network", "inspect", "mynet"]);
    let net: Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(net[0]["IPAM"]["Driver"], "talkingdata");
    assert_eq!(net[0]["IPAM"]["Config"][0]["Subnet"], "192.0.2.0/24");
    assert_eq!(net[0]["IPAM"]["Config"][0]["Gateway"], host_ip.as_str());
    assert_eq!(
        net[0]["IPAM"]["Config"][0]["AuxiliaryAddresses"]["DefaultGatewayIPv4"],
        "192.0.2.1"
    );
    assert_eq!(net[0]["Options"]["com.docker.network.bridge.name"], "br0");
    assert_eq!(
        net[0]["Options"]["com.docker.network.bridge.enable_ip_masquerade"],
        "false"
    );
    assert_eq!(net[0]["Options"]["com.docker.network.driver.mtu"], "1500");
    assert!(host
        .in_netns(&["ip", "-4", "addr", "show", "br0"])
        .contains(&format!("{host_ip}/24")));

    // Running it again takes no second address.
    let again = create_network(&host, &ifcfg, "eth1");
    assert!(
        again.contains("already holds") && again.contains("exists already"),
        "{again}"
    );
    assert_eq!(host_address(etcd, &p, "hostA"), host_ip);

    // A network of that name made by hand, with another gateway, is refused untouched.
    ip_range(&etcd.url, &p, "198.51.100.100/24", "198.51.100.110/24");
    host.docker_ok(&words("network create --ipam-driver=talkingdata --subnet=198.51.100.0/24 --gateway=198.51.100.15 handmade"));
    let before = etcd.dump(&p);
    let refused = host
        .own_command(&[
            "create-network",
            "--name",
            "handmade",
            "--bridge",
            "br1",
            "--ifcfg-dir",
            ifcfg.to_str().unwrap(),
            "--no-restart",
            "--interface",
            "eth1",
        ])
        .output()
        .unwrap();
    common::fails(
        refused,
        1,
        &format!("handmade exists with gateway 198.51.100.15, not this host's address {host_ip}"),
    );
    assert_eq!(etcd.dump(&p), before);
    host.docker_ok(&["network", "rm", "handmade"]);

    host.docker_ok(&words(
        "run -d --name c1 --network mynet bb:latest sleep 1000",
    ));
    let (ip1, mac1) = host.addr_of("c1");
    let held = assigned(etcd, &p, "192.0.2.0");
    assert_eq!(held[&ip1]["Host"], "hostA");
    assert_eq!(held[&ip1]["Mac"], mac1.as_str());
    assert_eq!(held[&ip1]["Role"], "container");

    // c1's address is random: ask for one it does not hold.
    let fixed = if ip1 == "192.0.2.150" {
        "192.0.2.151"
    } else {
        "192.0.2.150"
    };
    host.docker_ok(&words(&format!(
        "run -d --name c2 --network mynet --ip {fixed} bb:latest sleep 1000"
    )));
    assert_eq!(host.addr_of("c2").0, fixed);
    let taken = host.docker(&words(&format!(
        "run -d --name c3 --network mynet --ip {fixed} bb:latest sleep 1000"
    )));
    assert_eq!(taken.status.code(), Some(125));
    let err = stderr(&taken);
    assert!(
        err.contains(&format!(
            "IpamDriver.RequestAddress: {fixed} is already in use by host hostA (mac "
        )),
        "{err}"
    );

    host.docker_ok(&["rm", "-f", "c1"]);
    let keys = pool_keys(etcd, &p, "192.0.2.0");
    assert!(keys.contains(&format!("{p}/containers/192.0.2.0/pool/{ip1}")));
    assert!(!keys.contains(&format!("{p}/containers/192.0.2.0/assigned/{ip1}")));

    host.docker_ok(&["rm", "-f", "c2", "c3"]);
    host.docker_ok(&["network", "rm", "mynet"]);
    assert_eq!(pool_keys(etcd, &p, "192.0.2.0"), pool_before);

    // dockerd sends each call whole, so the plugin's one thread read them all: no connection
    // needed a thread of its own (the plugin logs each one that does, with --debug).
    let log = std::fs::read_to_string(host.dir.join("plugin.log")).unwrap();
    let calls = log.matches("RequestAddress ").count();
    assert!(calls >= 3, "{calls} RequestAddress calls logged:\n{log}");
    assert!(!log.contains("gets a thread"), "{log}");
}

#[test]
fn two_hosts_share_one_pool_and_one_l2_network() {
    let (_serial, etcd, p) = lab_pools("e2e-two", "198.51.100");
    let lab = Lab::new("two");
    let a = Host::start(&lab, "hostA", etcd, &p);
    let b = Host::start(&lab, "hostB", etcd, &p);
    must(
        "ip",
        &[
            "link", "add", "vA", "netns", &a.netns, "type", "veth", "peer", "name", "vB", "netns",
            &b.netns,
        ],
    );
    for (host, dev) in [(&a, "vA"), (&b, "vB")] {
        let ifcfg = lab.dir.join(&format!("ifcfg-{}", host.name));
        std::fs::create_dir_all(&ifcfg).unwrap();
        create_network(host, &ifcfg, dev);
        host.in_netns(&["ip", "link", "set", dev, "master", "br0", "up"]);
    }
    let (ip_a, ip_b) = (
        host_address(etcd, &p, "hostA"),
        host_address(etcd, &p, "hostB"),
    );
    assert_ne!(ip_a, ip_b);

    // Ten containers on each host, all started at the same time.
    let mut runs = Vec::new();
    for host in [&a, &b] {
        for i in 0..10 {
            let name = format!("{}-{i}", host.name);
            let child = Command::new("docker")
                .args([
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "--network",
                    "mynet",
                    "bb:latest",
                    "sleep",
                    "1000",
                ])
                .env("DOCKER_HOST", host.docker_host())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            runs.push((name, child));
        }
    }
    for (name, child) in runs {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "docker run {name}: {}", stderr(&out));
    }
    let held = assigned(etcd, &p, "198.51.100.0");
    let mut addrs = HashSet::new();
    for host in [&a, &b] {
        for i in 0..10 {
            let (ip, mac) = host.addr_of(&format!("{}-{i}", host.name));
            assert!(addrs.insert(ip.clone()), "{ip} handed out twice");
            assert_eq!(held[&ip]["Host"], host.name.as_str(), "{ip}");
            assert_eq!(held[&ip]["Mac"], mac.as_str(), "{ip}");
        }
    }
    assert_eq!(addrs.len(), 20);
    assert_eq!(held.len(), 20);

    let (target, _) = a.addr_of("hostA-0");
    let ping = b.docker(&["exec", "hostB-0", "ping", "-c", "2", "-W", "2", &target]);
    assert!(
        ping.status.success(),
        "ping from B to A's container {target}: {}{}",
        stdout(&ping),
        stderr(&ping)
    );
    let ping = b.docker(&["exec", "hostB-1", "ping", "-c", "1", "-W", "2", &ip_a]);
    assert!(
        ping.status.success(),
        "ping from B to A's br0 {ip_a}: {}",
        stdout(&ping)
    );
}

#[test]
fn a_daemon_restart_leaks_no_address() {
    let (_serial, etcd, p) = lab_pools("e2e-restart", "203.0.113");
    let lab = Lab::new("restart");
    let mut host = Host::start(&lab, "hostA", etcd, &p);
    host.in_netns(&[
        "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    let ifcfg = lab.dir.join("ifcfg");
    std::fs::create_dir_all(&ifcfg).unwrap();
    create_network(&host, &ifcfg, "eth1");
    let run = |name: &'static str, restart: &'static str| {
        [
            "run",
            "-d",
            "--name",
            name,
            "--restart",
            restart,
            "--network",
            "mynet",
            "--stop-timeout",
            "1",
            "bb:latest",
            "sleep",
            "1000",
        ]
    };
    host.docker_ok(&run("r1", "always"));
    // A stopped container holds no address across the restart either.
    host.docker_ok(&run("s1", "no"));
    host.docker_ok(&["stop", "-t", "1", "s1"]);

    host.stop_dockerd();
    host.start_dockerd();
    let deadline = Instant::now() + Duration::from_secs(60);
    while host
        .docker_ok(&["inspect", "-f", "{{.State.Running}}", "r1"])
        .trim()
        != "true"
    {
        assert!(Instant::now() < deadline, "r1 did not come back");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (ip, mac) = host.addr_of("r1");
    let held = assigned(etcd, &p, "203.0.113.0");
    let containers: Vec<&String> = held
        .iter()
        .filter(|(_, o)| o["Role"] == "container")
        .map(|(a, _)| a)
        .collect();
    let running = host.docker_ok(&["ps", "-q"]).split_whitespace().count();
    assert_eq!(
        containers.len(),
        running,
        "assigned {containers:?} for {running} running containers"
    );
    assert_eq!(held[&ip]["Mac"], mac.as_str());
}

/// Runs `args` as `host`'s own command line and returns what it did.
fn own(host: &Host, args: &[&str]) -> Output {
    host.own_command(args).output().unwrap()
}

/// Waits until `host`'s plugin answers on its socket (in the host's mount namespace).
fn wait_for_plugin(host: &Host) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mnt = format!("--mount={}", host.mount_ns.display());
    while !run(
        "nsenter",
        &[&mnt, "test", "-S", "/run/docker/plugins/talkingdata.sock"],
    )
    .status
    .success()
    {
        assert!(Instant::now() < deadline, "the plugin did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn day_2_show_guarded_release_and_reconcile_with_a_real_dockerd() {
    let (_serial, etcd, p) = lab_pools("e2e-day2", "203.0.113");
    let lab = Lab::new("day2");
    let mut host = Host::start(&lab, "hostA", etcd, &p);
    host.in_netns(&[
        "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    let ifcfg = lab.dir.join("ifcfg");
    std::fs::create_dir_all(&ifcfg).unwrap();
    create_network(&host, &ifcfg, "eth1");
    for name in ["c1", "c2"] {
        host.docker_ok(&words(&format!(
            "run -d --name {name} --network mynet bb:latest sleep 1000"
        )));
    }
    let c2_started = Instant::now();
    let (ip1, mac1) = host.addr_of("c1");
    let (ip2, mac2) = host.addr_of("c2");

    // show --json: each container's address with its MAC and host.
    let shown = ok_in("show --json", own(&host, &["show", "--json"]));
    let shown: Value = serde_json::from_str(&shown).unwrap();
    let pool = shown["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "203.0.113.0")
        .unwrap_or_else(|| panic!("no container pool in {shown}"));
    for (ip, mac) in [(&ip1, &mac1), (&ip2, &mac2)] {
        let entry = pool["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["address"] == ip.as_str())
            .unwrap_or_else(|| panic!("{ip} not listed in {pool}"));
        assert_eq!(entry["role"], "container");
        assert_eq!(entry["mac"], mac.as_str());
        assert_eq!(entry["host"], "hostA");
        assert_eq!(entry["host_id"], "id-hostA");
    }
    ok_in("check", own(&host, &["check"]));
    let said = ok_in("reconcile", own(&host, &["reconcile"]));
    assert!(said.contains("in step: 2 endpoint(s)"), "{said}");

    // release-ip of a running container's address is refused, etcd unchanged...
    let before = etcd.dump(&p);
    let ip1_24 = format!("{ip1}/24");
    common::fails(
        own(&host, &["release-ip", "--ip", &ip1_24]),
        1,
        &format!("{ip1} is held by host hostA (mac {mac1}); nothing changed"),
    );
    assert_eq!(etcd.dump(&p), before);
    // ... and --force frees it: a mistake under a running container.
    ok_in(
        "release-ip --force",
        own(&host, &["release-ip", "--ip", &ip1_24, "--force"]),
    );
    let released = etcd.dump(&p);
    assert!(released
        .iter()
        .any(|(k, _)| *k == format!("{p}/containers/203.0.113.0/pool/{ip1}")));

    // A docker rm while the plugin is stopped leaks c2's address.
    if let Some(mut plugin) = host.plugin.take() {
        let _ = run("kill", &[&plugin.id().to_string()]);
        let _ = plugin.wait();
    }
    host.docker_ok(&["rm", "-f", "c2"]);
    host.start_plugin();
    wait_for_plugin(&host);
    assert!(etcd
        .dump(&p)
        .iter()
        .any(|(k, _)| *k == format!("{p}/containers/203.0.113.0/assigned/{ip2}")));
    // reconcile does not judge records younger than 10 s: let c2's age past that.
    if let Some(wait) = Duration::from_secs(11).checked_sub(c2_started.elapsed()) {
        std::thread::sleep(wait);
    }

    let before = etcd.dump(&p);
    let dry = own(&host, &["reconcile"]);
    let said = stdout(&dry);
    assert_eq!(dry.status.code(), Some(1), "{said}{}", stderr(&dry));
    assert!(
        said.contains(&format!(
            "leaked {ip2} in pool 203.0.113.0: recorded for host hostA (mac {mac2})"
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "orphaned {ip1} in pool 203.0.113.0: container c1 (mac {mac1}) on network mynet uses it"
        )),
        "{said}"
    );
    assert_eq!(said.lines().count(), 2, "{said}");
    assert!(stderr(&dry).contains("2 difference(s) between Docker and etcd; nothing changed"));
    assert_eq!(etcd.dump(&p), before, "a dry run changed etcd");

    let applied = ok_in("reconcile --apply", own(&host, &["reconcile", "--apply"]));
    assert!(applied.contains(&format!("freed {ip2}")), "{applied}");
    assert!(
        applied.contains(&format!("recorded {ip1} for container c1")),
        "{applied}"
    );
    let held = assigned(etcd, &p, "203.0.113.0");
    assert!(!held.contains_key(&ip2), "{held:?}");
    assert_eq!(held[&ip1]["Mac"], mac1.as_str());
    assert_eq!(held[&ip1]["Host"], "hostA");
    assert_eq!(held[&ip1]["HostId"], "id-hostA");
    assert!(etcd
        .dump(&p)
        .iter()
        .any(|(k, _)| *k == format!("{p}/containers/203.0.113.0/pool/{ip2}")));

    ok_in("check afterwards", own(&host, &["check"]));
    let again = ok_in("reconcile again", own(&host, &["reconcile"]));
    assert!(again.contains("in step: 1 endpoint(s)"), "{again}");
    let taken = host.docker(&words(&format!(
        "run -d --name c3 --network mynet --ip {ip1} bb:latest sleep 1000"
    )));
    assert_eq!(taken.status.code(), Some(125), "{}", stderr(&taken));
    assert!(
        stderr(&taken).contains(&format!(
            "{ip1} is already in use by host hostA (mac {mac1})"
        )),
        "{}",
        stderr(&taken)
    );
}
