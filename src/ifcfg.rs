//! The CentOS network-scripts files create-network writes: their text, and their reads,
//! writes and restores in an ifcfg directory given as a root, so tests point it at a scratch
//! directory.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

/// What the bridge's ifcfg file says (seed 000's format).
pub fn bridge_text(
    bridge: &str,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    subnet: Ipv4Net,
    mtu: u32,
) -> String {
    let mut text = format!(
        "DEVICE={bridge}\nTYPE=Bridge\nBOOTPROTO=static\nIPADDR={addr}\nGATEWAY={gateway}\n\
         NETMASK={}\nONBOOT=yes\nNOZEROCONF=yes\nIPV6INIT=no\nNM_CONTROLLED=no\nDELAY=0\n",
        subnet.netmask()
    );
    if mtu != 1500 {
        text.push_str(&format!("MTU={mtu}\n"));
    }
    text
}

/// The interface's ifcfg with `BRIDGE=<bridge>` (replacing another BRIDGE= line if any).
pub fn enslaved_text(existing: Option<&str>, interface: &str, bridge: &str) -> String {
    let Some(existing) = existing else {
        return format!("DEVICE={interface}\nONBOOT=yes\nNM_CONTROLLED=no\nBRIDGE={bridge}\n");
    };
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| !l.trim_start().starts_with("BRIDGE="))
        .map(str::to_string)
        .collect();
    lines.push(format!("BRIDGE={bridge}"));
    lines.join("\n") + "\n"
}

/// Whether `dir` is a directory (a symlink to one counts).
pub fn is_dir(dir: &Path) -> bool {
    dir.is_dir()
}

/// The text of `name` in `dir`; None if there is no such file.
pub fn read(dir: &Path, name: &str) -> io::Result<Option<String>> {
    match fs::read_to_string(dir.join(plain(name)?)) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `name` in `dir` with `text` through a temporary file and a rename, so that it is
/// never seen half-written. If it existed, the original is first copied to a `.bak` beside it,
/// named with the time `now` (RFC 3339) to the second (network scripts ignore `*.bak`);
/// returns that backup's name. Both new files are created
/// exclusively, so a file or symlink planted at their names is never written through, and an
/// earlier backup is never overwritten.
pub fn write(dir: &Path, name: &str, text: &str, now: &str) -> io::Result<Option<String>> {
    let path = dir.join(plain(name)?);
    let original = match fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let backup = match original {
        Some(original) => {
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            let base = format!("{name}.{}", backup_stamp(now));
            let (backup, mut file) = create_exclusively(dir, &base, ".bak", mode)?;
            let copied = file.write_all(&original).and_then(|()| file.sync_all());
            if let Err(e) = copied {
                let _ = fs::remove_file(&backup);
                return Err(e);
            }
            Some(backup)
        }
        None => None,
    };
    let base = format!(".{name}.tmp-{}", std::process::id());
    let written = create_exclusively(dir, &base, "", 0o644).and_then(|(temp, mut file)| {
        let done = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&temp, &path));
        if done.is_err() {
            let _ = fs::remove_file(&temp);
        }
        done
    });
    if let Err(e) = written {
        if let Some(b) = &backup {
            let _ = fs::remove_file(b);
        }
        return Err(e);
    }
    Ok(backup.map(|b| file_name(&b)))
}

/// `2026-11-22T00:00:00.000Z` as `20261122T000000`.
fn backup_stamp(now: &str) -> String {
    now.chars()
        .filter(|c| !matches!(c, ':' | '-'))
        .take(15)
        .collect()
}

/// Undoes a [`write`] of `name` in `dir`: moves its backup back, or removes it if it had none.
pub fn restore(dir: &Path, name: &str, backup: Option<&str>) -> io::Result<()> {
    let path = dir.join(plain(name)?);
    match backup {
        Some(backup) => fs::rename(dir.join(plain(backup)?), path),
        None => fs::remove_file(path),
    }
}

/// `name` if it names a file directly in the directory (no `/`, not `.` nor `..`): nothing
/// is ever read or written outside it.
fn plain(name: &str) -> io::Result<&str> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name"),
        ));
    }
    Ok(name)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Creates `<base><suffix>` in `dir`, or `<base>.1<suffix>`, `.2`, ... if that name is
/// taken: `create_new` fails on any existing entry, a symlink included, so nothing planted
/// there is followed.
fn create_exclusively(
    dir: &Path,
    base: &str,
    suffix: &str,
    mode: u32,
) -> io::Result<(PathBuf, fs::File)> {
    for n in 0..100 {
        let name = match n {
            0 => format!("{base}{suffix}"),
            n => format!("{base}.{n}{suffix}"),
        };
        let path = dir.join(name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("100 files named {base}*{suffix} exist in {}", dir.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-22T00:00:00.000000000Z";

    /// A fresh scratch directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oam-ifcfg-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bridge_config_matches_the_seed() {
        let text = bridge_text(
            "br0",
            "192.0.2.85".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            "192.0.0.0/18".parse().unwrap(),
            1500,
        );
        assert_eq!(
            text,
            "DEVICE=br0\nTYPE=Bridge\nBOOTPROTO=static\nIPADDR=192.0.2.85\nGATEWAY=192.0.2.1\n\
             NETMASK=255.255.192.0\nONBOOT=yes\nNOZEROCONF=yes\nIPV6INIT=no\nNM_CONTROLLED=no\nDELAY=0\n"
        );
    }

    #[test]
    fn enslaving_adds_or_replaces_one_bridge_line() {
        let old = "DEVICE=eth0\nONBOOT=yes\nBRIDGE=br9\n";
        assert_eq!(
            enslaved_text(Some(old), "eth0", "br0"),
            "DEVICE=eth0\nONBOOT=yes\nBRIDGE=br0\n"
        );
        let fresh = enslaved_text(None, "eth0", "br0");
        assert!(fresh.starts_with("DEVICE=eth0\n") && fresh.ends_with("BRIDGE=br0\n"));
        let again = enslaved_text(Some(&fresh), "eth0", "br0");
        assert_eq!(again, fresh);
    }

    #[test]
    fn planted_links_are_never_followed_and_backups_never_overwritten() {
        let dir = scratch("plant");
        let victim = dir.join("victim");
        fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("ifcfg-br0");
        fs::write(&path, "one\n").unwrap();
        // The names an attacker can predict: the temporary file and this second's backup.
        let temp = dir.join(format!(".ifcfg-br0.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &temp).unwrap();
        let predicted = dir.join("ifcfg-br0.20261122T000000.bak");
        std::os::unix::fs::symlink(&victim, &predicted).unwrap();

        let first = write(&dir, "ifcfg-br0", "two\n", NOW).unwrap().unwrap();
        let second = write(&dir, "ifcfg-br0", "three\n", NOW).unwrap().unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_ne!(first, second);
        assert_eq!(fs::read_to_string(dir.join(&first)).unwrap(), "one\n");
        assert_eq!(fs::read_to_string(dir.join(&second)).unwrap(), "two\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "three\n");
        assert!(fs::symlink_metadata(&temp)
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_keep_a_backup_that_restore_puts_back() {
        let dir = scratch("backup");
        assert_eq!(read(&dir, "ifcfg-br0").unwrap(), None);
        assert_eq!(write(&dir, "ifcfg-br0", "one\n", NOW).unwrap(), None);
        let backup = write(&dir, "ifcfg-br0", "two\n", NOW).unwrap().unwrap();
        assert_eq!(read(&dir, "ifcfg-br0").unwrap().as_deref(), Some("two\n"));
        assert_eq!(read(&dir, &backup).unwrap().as_deref(), Some("one\n"));
        restore(&dir, "ifcfg-br0", Some(&backup)).unwrap();
        assert_eq!(read(&dir, "ifcfg-br0").unwrap().as_deref(), Some("one\n"));
        assert_eq!(read(&dir, &backup).unwrap(), None);
        restore(&dir, "ifcfg-br0", None).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_outside_the_directory_are_refused() {
        let dir = scratch("outside");
        for name in ["../ifcfg-br0", "a/b", "..", ".", ""] {
            assert!(read(&dir, name).is_err(), "{name:?}");
            assert!(write(&dir, name, "x\n", NOW).is_err(), "{name:?}");
            assert!(restore(&dir, name, None).is_err(), "{name:?}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
