//! The systemd units against CentOS 7's systemd 219: every option they set is one that 219
//! knows, or one listed here as newer, kept in a block whose comment says that 219 ignores it.
//! A new option fails this test until someone has looked up when systemd added it.

use std::path::Path;

/// Options the units use that systemd 219 knows, by section, with the version that added each
/// (systemd's NEWS and man pages). `StartLimitInterval=`/`StartLimitBurst=` are the [Service]
/// names 219 has; newer systemd still reads them there.
const KNOWN_TO_219: &[(&str, &str, u32)] = &[
    ("Unit", "Description", 1),
    ("Unit", "Documentation", 187),
    ("Unit", "Requires", 1),
    ("Unit", "After", 1),
    ("Unit", "Before", 1),
    ("Unit", "Wants", 1),
    ("Service", "Type", 1),
    ("Service", "EnvironmentFile", 1),
    ("Service", "ExecStart", 1),
    ("Service", "Restart", 1),
    ("Service", "RestartSec", 1),
    ("Service", "RestartPreventExitStatus", 189),
    ("Service", "StartLimitInterval", 1),
    ("Service", "StartLimitBurst", 1),
    ("Service", "StandardError", 1),
    ("Service", "LimitNOFILE", 1),
    ("Service", "NoNewPrivileges", 187),
    ("Service", "CapabilityBoundingSet", 1),
    ("Service", "ProtectSystem", 214), // the values yes and full; strict is below
    ("Service", "ProtectHome", 214),
    ("Service", "PrivateTmp", 1),
    ("Service", "PrivateDevices", 209),
    ("Service", "RestrictAddressFamilies", 211),
    ("Service", "SystemCallArchitectures", 209),
    ("Service", "ReadWriteDirectories", 1),
    ("Socket", "ListenStream", 1),
    ("Socket", "SocketUser", 214),
    ("Socket", "SocketGroup", 214),
    ("Socket", "SocketMode", 1),
    ("Socket", "DirectoryMode", 1),
    ("Install", "WantedBy", 1),
    ("Install", "Also", 1),
];

/// What systemd 219 does not know (an option, or one value of an option), the version that
/// added it, and why the unit keeps it: newer hosts get the protection, 219 logs and ignores it.
const NEWER_THAN_219: &[(&str, u32)] = &[
    ("ProtectSystem=strict", 232), // 219 knows only yes/full; "strict" is refused, ignored
    ("ProtectKernelTunables", 232),
    ("ProtectKernelModules", 232),
    ("ProtectControlGroups", 232),
    ("RestrictNamespaces", 233),
    ("RestrictRealtime", 231),
    ("LockPersonality", 235),
    ("MemoryDenyWriteExecute", 231),
    ("ReadWritePaths", 231), // beside ReadWriteDirectories=, its 219 name
];

/// (section, option, value) of each setting.
fn settings(unit: &str) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    let mut section = String::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else {
            let (key, value) = line.split_once('=').unwrap_or((line, ""));
            found.push((section.clone(), key.to_string(), value.to_string()));
        }
    }
    found
}

/// The comment that opens each block of lines (up to a blank line or a section), with the
/// settings of that block.
fn block_comments(unit: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let (mut comment, mut keys, mut opened) = (String::new(), String::new(), false);
    for line in unit.lines().map(str::trim).chain([""]) {
        if line.is_empty() || line.starts_with('[') {
            if !keys.is_empty() {
                blocks.push((comment.clone(), keys.clone()));
            }
            comment.clear();
            keys.clear();
            opened = false;
        } else if let Some(text) = line.strip_prefix('#') {
            if !opened {
                comment.push_str(text);
                comment.push(' ');
            }
        } else {
            opened = true;
            keys.push_str(line);
            keys.push('\n');
        }
    }
    blocks
}

fn unit_text(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(file);
    std::fs::read_to_string(&path).expect("read the unit")
}

/// What is wrong with `unit` (named `file`) for systemd 219.
fn check(file: &str, unit: &str) -> Vec<String> {
    let blocks = block_comments(unit);
    let mut problems = Vec::new();
    for (section, key, value) in settings(unit) {
        let setting = format!("{key}={value}");
        let newer = NEWER_THAN_219
            .iter()
            .find(|(what, _)| *what == key || *what == setting);
        if let Some((what, version)) = newer {
            let marked = blocks.iter().any(|(comment, keys)| {
                keys.lines().any(|l| l == setting)
                    && comment.contains("systemd 219")
                    && comment.contains("ignores")
            });
            if !marked {
                problems.push(format!(
                    "{file}: {setting} ({what}: systemd {version}) is not in a block whose comment says systemd 219 ignores it"
                ));
            }
        } else if !KNOWN_TO_219
            .iter()
            .any(|(s, k, _)| *s == section && *k == key)
        {
            problems.push(format!(
                "{file}: [{section}] {key}= is in neither list of tests/units.rs: look up which systemd added it"
            ));
        }
    }
    problems
}

#[test]
fn every_unit_option_is_known_to_systemd_219_or_marked_as_ignored_there() {
    let mut problems = Vec::new();
    for file in ["oam-docker-ipam.service", "oam-docker-ipam.socket"] {
        problems.extend(check(file, &unit_text(file)));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_catches_an_unlisted_option_and_an_unmarked_newer_one() {
    let unit =
        "[Service]\nExecStart=/bin/true\nProtectClock=yes\n\n# hardening\nLockPersonality=yes\n\n\
                # newer; systemd 219 ignores these\nProtectSystem=strict\n";
    let problems = check("x.service", unit);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("ProtectClock"), "{problems:?}");
    assert!(problems[1].contains("LockPersonality=yes"), "{problems:?}");
    let strict_elsewhere = "[Service]\nProtectSystem=strict\n";
    assert_eq!(check("x.service", strict_elsewhere).len(), 1);
    assert!(check("x.service", "[Service]\nProtectSystem=full\n").is_empty());
}

#[test]
fn the_service_fails_once_on_bad_settings_and_keeps_its_socket_across_restarts() {
    let all = settings(&unit_text("oam-docker-ipam.service"));
    let get = |key: &str| {
        all.iter()
            .find(|(_, k, _)| k == key)
            .map(|(_, _, v)| v.as_str())
    };
    // Exit status 2 is a usage error (a malformed setting): restarting cannot fix it.
    assert_eq!(get("RestartPreventExitStatus"), Some("2"));
    assert_eq!(get("Restart"), Some("on-failure"));
    assert_eq!(get("LimitNOFILE"), Some("65536"));
    let burst: u32 = get("StartLimitBurst")
        .and_then(|b| b.parse().ok())
        .expect("StartLimitBurst= is set");
    assert!(
        burst >= 10,
        "restarts and an upgrade would hit the start limit"
    );
    assert_eq!(
        get("ReadWriteDirectories"),
        get("ReadWritePaths"),
        "219's name and the new one must say the same"
    );
}
