//! The settings file shared by the service and the command line
//! (`/etc/sysconfig/oam-docker-ipam`, or `--config FILE`): systemd `EnvironmentFile=` syntax,
//! read as data (`KEY=value`, optionally quoted; `#`/`;` comment lines), never run by a
//! shell. It holds the same variable names as the environment; `cli` decides precedence.
//! Also the password file it or `--password-file` names: the other file an operator writes.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::auth::Secret;

/// Where the packaged service reads its settings (its `EnvironmentFile=`).
pub const DEFAULT_PATH: &str = "/etc/sysconfig/oam-docker-ipam";

/// Every variable the program reads, from the environment or the settings file, and
/// `OPTIONS`, which only the service's unit reads (its `ExecStart=` passes it as flags).
pub const KNOWN: &[&str] = &[
    "CLUSTER_STORE",
    "DEBUG",
    "IPAM_STORE_PREFIX",
    "IPAM_TIMEOUT",
    "IPAM_CACERT",
    "IPAM_CERT",
    "IPAM_KEY",
    "IPAM_USER",
    "IPAM_PASSWORD_FILE",
    "IPAM_PASSWORD",
    "OPTIONS",
];

/// One `KEY=value` of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// A settings file as read: its path (for messages), its entries (the last of a key wins,
/// as in systemd) and what was ignored, to be logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

impl ConfigFile {
    /// The value of `key` and its line number.
    pub fn get(&self, key: &str) -> Option<(&str, usize)> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| (e.value.as_str(), e.line))
    }
}

/// Why the settings file cannot be read.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--config {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Reads the settings file: `given` (`--config`), which must exist, or the default one,
/// which may be missing (then there are no settings from a file).
pub fn load(given: Option<&Path>) -> Result<ConfigFile, ConfigError> {
    let path = given.unwrap_or(Path::new(DEFAULT_PATH));
    match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => Ok(parse(path, &text)),
            Err(_) => Err(ConfigError {
                path: path.into(),
                reason: "not UTF-8 text".into(),
            }),
        },
        Err(e) if given.is_none() && e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile {
            path: path.into(),
            ..ConfigFile::default()
        }),
        Err(e) => Err(ConfigError {
            path: path.into(),
            reason: e.to_string(),
        }),
    }
}

/// Parses `EnvironmentFile=` text as systemd does: blank lines and lines starting with `#`
/// or `;` are comments; `KEY=value` with optional `export `, whitespace around the key and
/// value trimmed, one pair of surrounding quotes removed (`\"` and `\\` inside double quotes).
/// A `#` after a value is part of the value, as for systemd. A line ending in `\` continues
/// on the next. Lines systemd would ignore, and unknown keys, are warnings.
pub fn parse(path: &Path, text: &str) -> ConfigFile {
    let mut file = ConfigFile {
        path: path.into(),
        ..ConfigFile::default()
    };
    let shown = path.display();
    let mut lines = text.lines().enumerate();
    while let Some((index, first)) = lines.next() {
        let number = index + 1;
        let mut line = first.to_string();
        while line.ends_with('\\') {
            line.pop();
            match lines.next() {
                Some((_, next)) => line.push_str(next),
                None => break,
            }
        }
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let assignment = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let Some((key, value)) = assignment.split_once('=') else {
            file.warnings.push(format!(
                "{shown} line {number}: ignoring a line without '=' (expected KEY=value)"
            ));
            continue;
        };
        let key = key.trim();
        if !KNOWN.contains(&key) {
            file.warnings.push(format!(
                "{shown} line {number}: ignoring unknown setting {key:?}"
            ));
            continue;
        }
        file.entries.push(Entry {
            key: key.to_string(),
            value: unquote(value.trim()),
            line: number,
        });
    }
    file
}

fn unquote(value: &str) -> String {
    if value.len() >= 2 && value.starts_with('\'') && value.ends_with('\'') {
        return value[1..value.len() - 1].to_string();
    }
    if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
        let mut out = String::new();
        let mut chars = value[1..value.len() - 1].chars();
        while let Some(c) = chars.next() {
            match (c, chars.clone().next()) {
                ('\\', Some(next @ ('"' | '\\' | '$' | '`'))) => {
                    out.push(next);
                    chars.next();
                }
                _ => out.push(c),
            }
        }
        return out;
    }
    value.to_string()
}

/// The password file cannot be read, or its first line is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for PasswordFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "password file {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for PasswordFileError {}

/// The first line of the password file at `path`, without its line ending.
pub fn read_password(path: &Path) -> Result<Secret, PasswordFileError> {
    let failed = |reason: String| PasswordFileError {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(failed("its first line is empty".into()));
    }
    Ok(Secret::new(line.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_environment_file_syntax() {
        let text = "# comment\n; another\n\nCLUSTER_STORE=https://a:2379,https://b:2379\n\
                    export IPAM_USER = ipam \nIPAM_CACERT=\"/etc/pki/etcd ca.pem\"\n\
                    IPAM_KEY='/k.pem'\nIPAM_TIMEOUT=5\nIPAM_TIMEOUT=7\n\
                    OPTIONS=--debug \\\n --timeout 2\nIPAM_CERT=\"a\\\"b\"\n";
        let f = parse(Path::new("/x"), text);
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
        assert_eq!(
            f.get("CLUSTER_STORE"),
            Some(("https://a:2379,https://b:2379", 4))
        );
        assert_eq!(f.get("IPAM_USER").map(|v| v.0), Some("ipam"));
        assert_eq!(
            f.get("IPAM_CACERT").map(|v| v.0),
            Some("/etc/pki/etcd ca.pem")
        );
        assert_eq!(f.get("IPAM_KEY").map(|v| v.0), Some("/k.pem"));
        assert_eq!(f.get("IPAM_TIMEOUT"), Some(("7", 9)));
        assert_eq!(f.get("OPTIONS").map(|v| v.0), Some("--debug  --timeout 2"));
        assert_eq!(f.get("IPAM_CERT").map(|v| v.0), Some("a\"b"));
        assert_eq!(f.get("DEBUG"), None);
    }

    #[test]
    fn odd_lines_are_warnings_naming_their_line() {
        let f = parse(
            Path::new("/etc/sysconfig/oam-docker-ipam"),
            "CLUSTERSTORE=x\njust words\n",
        );
        assert!(f.entries.is_empty());
        assert_eq!(
            f.warnings,
            [
                "/etc/sysconfig/oam-docker-ipam line 1: ignoring unknown setting \"CLUSTERSTORE\"",
                "/etc/sysconfig/oam-docker-ipam line 2: ignoring a line without '=' (expected KEY=value)"
            ]
        );
    }

    #[test]
    fn a_given_file_must_exist_the_default_may_not() {
        let err = load(Some(Path::new("/nonexistent/ipam.conf"))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--config /nonexistent/ipam.conf: "),
            "{err}"
        );
    }

    #[test]
    fn the_password_file_gives_its_first_line() {
        let path = std::env::temp_dir().join(format!("oam-secret-{}", std::process::id()));
        std::fs::write(&path, "pw with spaces\r\nsecond\n").unwrap();
        let got = read_password(&path);
        std::fs::write(&path, "\nx\n").unwrap();
        let empty = read_password(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(got.unwrap().expose(), "pw with spaces");
        assert_eq!(
            empty.unwrap_err().to_string(),
            format!("password file {}: its first line is empty", path.display())
        );
    }
}
