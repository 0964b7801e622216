//! Packaging checks: the RPM builds and holds exactly the expected files, with a binary that
//! runs on CentOS 7; rpmlint, systemd-analyze and mandoc are clean; the help texts and the man
//! page document the same commands and flags; the socket unit listens where the server does.

mod common;

use common::{ok, ok_in, TempDir, BIN};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is not installed: {e}"))
}

fn help(args: &[&str]) -> String {
    ok(Command::new(BIN).args(args).output().unwrap())
}

/// The RPM `packaging/build-rpm` makes with this release number, copied out of its build
/// tree (which the next build replaces). Builds one at a time.
fn build_rpm(release: u32) -> String {
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let out = ok(Command::new(repo("packaging/build-rpm"))
        .env("RPM_RELEASE", release.to_string())
        .output()
        .expect("run packaging/build-rpm"));
    let built = out
        .lines()
        .last()
        .expect("build-rpm printed nothing")
        .trim()
        .to_string();
    assert!(
        built.ends_with(&format!("-{release}.x86_64.rpm")) && Path::new(&built).is_file(),
        "last line {built:?}"
    );
    let dir = repo(&format!("target/rpm-test/{release}"));
    std::fs::create_dir_all(&dir).expect("make a directory for the RPM");
    let kept = dir.join(Path::new(&built).file_name().expect("a file name"));
    std::fs::copy(&built, &kept).expect("copy the RPM");
    kept.to_string_lossy().into_owned()
}

#[test]
fn the_rpm_holds_exactly_the_expected_files_and_a_binary_for_centos_7() {
    let rpm = build_rpm(1);

    let files = ok(tool("rpm", &["-qlp", &rpm]));
    let want = [
        "/etc/sysconfig/oam-docker-ipam".to_string(),
        "/usr/bin/oam-docker-ipam".into(),
        "/usr/lib/systemd/system/oam-docker-ipam.service".into(),
        "/usr/lib/systemd/system/oam-docker-ipam.socket".into(),
        format!("/usr/share/doc/oam-docker-ipam-{VERSION}"),
        format!("/usr/share/doc/oam-docker-ipam-{VERSION}/README.md"),
        format!("/usr/share/licenses/oam-docker-ipam-{VERSION}"),
        format!("/usr/share/licenses/oam-docker-ipam-{VERSION}/LICENSE"),
        "/usr/share/man/man8/oam-docker-ipam.8.gz".into(),
    ];
    assert_eq!(files.lines().collect::<Vec<_>>(), want);

    let version = ok(tool("rpm", &["-qp", "--qf", "%{VERSION}", &rpm]));
    assert_eq!(version, VERSION, "the RPM's version is not Cargo.toml's");
    let flags = ok(tool(
        "rpm",
        &["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", &rpm],
    ));
    assert!(
        flags
            .lines()
            .any(|l| l == "/etc/sysconfig/oam-docker-ipam cn"),
        "{flags}"
    );
    let requires = ok(tool("rpm", &["-qp", "--requires", &rpm]));
    for need in ["/usr/bin/docker", "iproute", "systemd"] {
        assert!(
            requires.lines().any(|l| l.trim() == need),
            "no Requires {need}: {requires}"
        );
    }
    let scripts = ok(tool("rpm", &["-qp", "--scripts", &rpm]));
    for phase in ["postinstall", "preuninstall", "postuninstall"] {
        assert!(scripts.contains(phase), "no {phase} scriptlet: {scripts}");
    }
    assert!(
        scripts.contains("try-restart oam-docker-ipam.service"),
        "{scripts}"
    );

    // The packaged binary is static (musl), so CentOS 7's glibc 2.17 cannot be too old for it.
    let dir = TempDir::new("rpm");
    let unpack = Command::new("sh")
        .arg("-c")
        .arg("rpm2cpio \"$1\" | cpio -idm --quiet")
        .arg("sh")
        .arg(&rpm)
        .current_dir(&dir.0)
        .status()
        .unwrap();
    assert!(unpack.success());
    let binary = dir.join("usr/bin/oam-docker-ipam");
    let dynamic = ok(tool("readelf", &["-d", binary.to_str().unwrap()]));
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        needed.is_empty(),
        "the packaged binary is not static: {needed:?}"
    );
    let runs = ok(Command::new(&binary).arg("--version").output().unwrap());
    assert_eq!(runs.trim(), format!("oam-docker-ipam {VERSION}"));

    let lint = tool(
        "rpmlint",
        &[
            "-c",
            repo("packaging/rpmlint.toml").to_str().unwrap(),
            &rpm,
            repo("packaging/oam-docker-ipam.spec").to_str().unwrap(),
        ],
    );
    let said = common::stdout(&lint);
    assert!(
        lint.status.success() && said.contains(" 0 errors, 0 warnings"),
        "rpmlint:\n{said}{}",
        common::stderr(&lint)
    );
}

const ORIGINAL_RPM: &str =
    "../shared/fixtures/original/oam-docker-ipam-1.0.0-1.el7.centos.x86_64.rpm";

/// A scratch root for `rpm --root`: busybox as /bin/sh and its applets, so that scriptlets
/// run (chrooted) as on a host; no systemctl, which the scriptlets allow for.
struct ScratchRoot(TempDir);

impl ScratchRoot {
    fn new(tag: &str) -> ScratchRoot {
        let root = ScratchRoot(TempDir::new(tag));
        let bin = root.path("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .expect("busybox-static is installed (the test command installs it)");
        let applets = ok(tool("/bin/busybox", &["--list"]));
        for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        root.rpm(&["--initdb"]);
        root
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.0 .0.join(inside.trim_start_matches('/'))
    }

    /// `rpm --root ROOT ARGS`, which must succeed; its stdout.
    fn rpm(&self, args: &[&str]) -> String {
        let root = self.0 .0.to_str().unwrap();
        let out = Command::new("rpm")
            .args(["--root", root])
            .args(args)
            .output()
            .expect("rpm is installed");
        ok_in(&format!("rpm {args:?}"), out)
    }

    fn read(&self, inside: &str) -> String {
        std::fs::read_to_string(self.path(inside))
            .unwrap_or_else(|e| panic!("{inside} in the scratch root: {e}"))
    }

    /// What `rpm -V` says of the package; empty when every file is as packaged.
    fn verify(&self) -> String {
        let root = self.0 .0.to_str().unwrap();
        let out = Command::new("rpm")
            .args(["--root", root, "-V", "--nodeps", "oam-docker-ipam"])
            .output()
            .expect("rpm is installed");
        format!("{}{}", common::stdout(&out), common::stderr(&out))
    }
}

#[test]
fn upgrades_over_the_original_and_over_itself_and_erases_cleanly() {
    let ours = build_rpm(1);
    let newer = build_rpm(2);
    let original = repo(ORIGINAL_RPM);
    assert!(
        original.is_file(),
        "the fixture {} is missing",
        original.display()
    );

    // The original, installed and configured as its users have it.
    let root = ScratchRoot::new("rpm-upgrade");
    root.rpm(&["-i", "--nodeps", original.to_str().unwrap()]);
    let conf = "/etc/oam-docker-ipam/oam-docker-ipam.conf";
    std::fs::write(
        root.path(conf),
        // Spellings systemd's EnvironmentFile takes: spaces, export, quotes, a comment.
        "# [ipam]\nIPAM_DEBUG = false\nexport IPAM_CLUSTER_STORE=\"http://192.0.2.53:2379,http://192.0.2.54:2379\"   # prod\n",
    )
    .unwrap();

    // Ours over it: whole, verified, the endpoints carried, nothing left behind.
    root.rpm(&["-U", "--nodeps", &ours]);
    assert_eq!(root.verify(), "", "rpm -V after the upgrade from 1.0.0");
    assert_eq!(
        root.rpm(&["-q", "oam-docker-ipam"]).trim(),
        format!("oam-docker-ipam-{VERSION}-1.x86_64")
    );
    let sysconfig = root.read("/etc/sysconfig/oam-docker-ipam");
    for line in [
        "CLUSTER_STORE=http://192.0.2.53:2379,http://192.0.2.54:2379",
        "DEBUG=false",
    ] {
        assert!(
            sysconfig.lines().any(|l| l == line),
            "no {line:?} in:\n{sysconfig}"
        );
    }
    let runs = Command::new(root.path("/usr/bin/oam-docker-ipam"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(ok(runs).trim(), format!("oam-docker-ipam {VERSION}"));
    assert!(root
        .path("/usr/lib/systemd/system/oam-docker-ipam.service")
        .is_file());
    for gone in [
        "/etc/oam-docker-ipam",
        "/usr/bin/.oam-docker-ipam.rpm-upgrade",
        "/usr/lib/systemd/system/.oam-docker-ipam.service.rpm-upgrade",
        "/var/lib/rpm-state/oam-docker-ipam",
        "/etc/sysconfig/oam-docker-ipam.rpm-upgrade",
    ] {
        assert!(!root.path(gone).exists(), "{gone} is left behind");
    }

    // Our own next release over it: the triggers stay quiet, the edited config stays.
    root.rpm(&["-U", "--nodeps", &newer]);
    assert_eq!(
        root.verify(),
        "",
        "rpm -V after an upgrade from our own release"
    );
    assert_eq!(root.read("/etc/sysconfig/oam-docker-ipam"), sysconfig);
    assert_eq!(
        sysconfig.matches("CLUSTER_STORE=").count(),
        2,
        "{sysconfig}"
    );

    // Erase: every packaged file goes; the edited config is kept as .rpmsave, as rpm does.
    root.rpm(&["-e", "--nodeps", "oam-docker-ipam"]);
    for gone in [
        "/usr/bin/oam-docker-ipam",
        "/usr/lib/systemd/system/oam-docker-ipam.service",
        "/usr/lib/systemd/system/oam-docker-ipam.socket",
        "/etc/sysconfig/oam-docker-ipam",
    ] {
        assert!(!root.path(gone).exists(), "{gone} is left after erase");
    }
    assert_eq!(
        root.read("/etc/sysconfig/oam-docker-ipam.rpmsave"),
        sysconfig
    );

    // Back to the original: it is whole again, and nothing of ours is left behind.
    let back = ScratchRoot::new("rpm-downgrade");
    back.rpm(&["-i", "--nodeps", original.to_str().unwrap()]);
    back.rpm(&["-U", "--nodeps", &ours]);
    back.rpm(&["-U", "--oldpackage", "--nodeps", original.to_str().unwrap()]);
    assert_eq!(
        back.rpm(&["-q", "oam-docker-ipam"]).trim(),
        "oam-docker-ipam-1.0.0-1.el7.centos.x86_64"
    );
    assert!(back.path("/usr/bin/oam-docker-ipam").is_file());
    for gone in [
        "/usr/bin/.oam-docker-ipam.rpm-upgrade",
        "/usr/lib/systemd/system/.oam-docker-ipam.service.rpm-upgrade",
        "/var/lib/rpm-state/oam-docker-ipam",
        "/usr/lib/systemd/system/oam-docker-ipam.socket",
    ] {
        assert!(!back.path(gone).exists(), "{gone} is left after going back");
    }

    // A fresh install carries nothing and verifies clean.
    let fresh = ScratchRoot::new("rpm-fresh");
    fresh.rpm(&["-i", "--nodeps", &ours]);
    assert_eq!(fresh.verify(), "");
    let packaged = fresh.read("/etc/sysconfig/oam-docker-ipam");
    assert!(
        !packaged.lines().any(|l| l.starts_with("CLUSTER_STORE=")),
        "{packaged}"
    );
}

#[test]
fn both_systemd_units_verify() {
    let dir = TempDir::new("units");
    std::fs::create_dir_all(dir.join("man/man8")).unwrap();
    std::fs::copy(
        repo("man/oam-docker-ipam.8"),
        dir.join("man/man8/oam-docker-ipam.8"),
    )
    .unwrap();
    let service = std::fs::read_to_string(repo("systemd/oam-docker-ipam.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/oam-docker-ipam $OPTIONS server\n"));
    // The same unit, with the binary where this build put it.
    std::fs::write(
        dir.join("oam-docker-ipam.service"),
        service.replace("/usr/bin/oam-docker-ipam", BIN),
    )
    .unwrap();
    std::fs::copy(
        repo("systemd/oam-docker-ipam.socket"),
        dir.join("oam-docker-ipam.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "oam-docker-ipam.socket",
            "oam-docker-ipam.service",
        ])
        .current_dir(&dir.0)
        .env("MANPATH", dir.join("man"))
        .output()
        .expect("systemd-analyze is installed");
    let said = format!("{}{}", common::stdout(&out), common::stderr(&out));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    for line in [
        "Documentation=man:oam-docker-ipam(8)",
        "EnvironmentFile=-/etc/sysconfig/oam-docker-ipam",
        "Before=docker.service",
        "Restart=on-failure",
        "Requires=oam-docker-ipam.socket",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "the service lacks {line}"
        );
    }
}

#[test]
fn the_socket_unit_listens_where_the_server_does() {
    let socket = std::fs::read_to_string(repo("systemd/oam-docker-ipam.socket")).unwrap();
    let listen: Vec<&str> = socket
        .lines()
        .filter_map(|l| l.strip_prefix("ListenStream="))
        .collect();
    let server_help = help(&["server", "--help"]);
    let default = server_help
        .split("(default ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("server --help states its default socket");
    assert_eq!(listen, vec![default]);
    assert!(default.ends_with("/talkingdata.sock"));
}

#[test]
fn the_man_page_lints_clean() {
    let out = tool(
        "mandoc",
        &[
            "-Tlint",
            "-W",
            "style",
            repo("man/oam-docker-ipam.8").to_str().unwrap(),
        ],
    );
    let said = format!("{}{}", common::stdout(&out), common::stderr(&out));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "mandoc -Tlint:\n{said}"
    );
}

/// Flags at the start of a help line (`  --flag VALUE  text`, `  -h, --help  text`).
fn help_flags(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("  -"))
        .flat_map(|l| {
            l.split_whitespace()
                .take_while(|w| w.starts_with('-'))
                .map(|w| w.trim_end_matches(',').to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Per man page section or command subsection: the flags of its `.TP` tags.
fn man_flags() -> BTreeMap<String, BTreeSet<String>> {
    let roff = std::fs::read_to_string(repo("man/oam-docker-ipam.8")).unwrap();
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut section, mut tag_next) = (String::new(), false);
    for line in roff.lines() {
        if let Some(name) = line.strip_prefix(".SH ") {
            section = name.trim_matches('"').to_string();
        } else if let Some(name) = line.strip_prefix(".SS ") {
            section = name.to_string();
            found.entry(section.clone()).or_default();
        } else if line == ".TP" {
            tag_next = true;
        } else if tag_next {
            tag_next = false;
            let text = line.replace("\\-", "-");
            let flags = text
                .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                .filter(|w| w.starts_with('-') && w.len() > 1)
                .map(|w| w.split('=').next().unwrap_or(w).to_string());
            found.entry(section.clone()).or_default().extend(flags);
        }
    }
    found
}

#[test]
fn help_and_man_page_document_the_same_commands_and_flags() {
    let main = help(&["--help"]);
    let commands: Vec<String> = main
        .split("Commands:\n")
        .nth(1)
        .expect("--help lists commands")
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let man = man_flags();
    let man_commands: BTreeSet<&String> = man
        .keys()
        .filter(|k| {
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        .collect();
    assert_eq!(
        man_commands,
        commands.iter().collect::<BTreeSet<_>>(),
        "commands in the man page vs --help"
    );
    assert_eq!(
        man["GLOBAL FLAGS"],
        help_flags(&main),
        "global flags: man page vs --help"
    );
    for command in &commands {
        let from_help = help_flags(&help(&[command, "--help"]));
        assert_eq!(man[command], from_help, "{command}: man page vs --help");
    }
}

#[test]
fn the_settings_file_documents_every_setting_and_the_docs_name_them() {
    let packaged = std::fs::read_to_string(repo("packaging/oam-docker-ipam.sysconfig")).unwrap();
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let man = std::fs::read_to_string(repo("man/oam-docker-ipam.8")).unwrap();
    for key in oam_docker_ipam::config::KNOWN {
        assert!(readme.contains(key), "README.md does not name {key}");
        assert!(man.contains(key), "the man page does not name {key}");
        if *key == "IPAM_PASSWORD" {
            // Documented, but not as a setting of this world-readable file.
            assert!(!packaged.lines().any(|l| l.starts_with("#IPAM_PASSWORD=")));
            continue;
        }
        assert!(
            packaged.lines().any(|l| l.starts_with(&format!("#{key}="))),
            "the packaged settings file does not document {key}"
        );
    }
    // Every setting it shows, uncommented, is read without a warning.
    let uncommented: String = packaged
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest
                    .split('=')
                    .next()
                    .is_some_and(|k| oam_docker_ipam::config::KNOWN.contains(&k)) =>
            {
                rest.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let parsed = oam_docker_ipam::config::parse(Path::new("sysconfig"), &uncommented);
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    assert_eq!(
        parsed.entries.len(),
        oam_docker_ipam::config::KNOWN.len() - 1
    );
}
