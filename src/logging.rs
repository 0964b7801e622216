//! Where log lines and the final error line go and how they look: on a terminal or a file, as
//! env_logger writes them; under systemd (stderr is the journal stream named by
//! `JOURNAL_STREAM`), each line starts with its sd-daemon priority (`<3>` error, `<4>` warning,
//! `<6>` info, `<7>` debug) so that `journalctl -p warning` shows refusals and failures only.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use log::{Level, LevelFilter};

/// Installs the logger: our own lines at `debug` or `info`, other crates' at `warn` (the HTTP
/// crates' debug lines are noise to an operator); `RUST_LOG` overrides both.
pub fn init(debug: bool) {
    let level = if debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(LevelFilter::Warn)
        .filter_module("oam_docker_ipam", level)
        .format_target(false)
        .parse_env("RUST_LOG");
    if stderr_is_journal() {
        builder
            .format(|out, record| writeln!(out, "{}", journal_line(record.level(), record.args())));
    }
    builder.init();
}

/// Writes the one line that says why the program stops, as an error: `oam-docker-ipam: why`.
/// Used before and after the logger exists, so it does not go through it.
pub fn fatal(why: &dyn fmt::Display) {
    let line = format!("oam-docker-ipam: {why}");
    if stderr_is_journal() {
        eprintln!("{}", journal_line(Level::Error, &line));
    } else {
        eprintln!("{line}");
    }
}

/// `message` with the sd-daemon prefix of `level` on each of its lines (the journal reads each
/// line as its own entry).
pub fn journal_line(level: Level, message: &dyn fmt::Display) -> String {
    let prefix = match level {
        Level::Error => "<3>",
        Level::Warn => "<4>",
        Level::Info => "<6>",
        Level::Debug | Level::Trace => "<7>",
    };
    message
        .to_string()
        .lines()
        .map(|line| format!("{prefix}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` names its
/// device and inode, and a child that inherited the variable but not the stream must not use
/// the prefixes.
fn stderr_is_journal() -> bool {
    let Ok(named) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let stderr = std::fs::metadata("/proc/self/fd/2")
        .ok()
        .map(|m| (m.dev(), m.ino()));
    names_stream(&named, stderr)
}

/// Whether `JOURNAL_STREAM`'s `DEVICE:INODE` (decimal) is `stream` (device, inode).
fn names_stream(journal_stream: &str, stream: Option<(u64, u64)>) -> bool {
    let mut parts = journal_stream.trim().split(':').map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next(), stream) {
        (Some(Ok(dev)), Some(Ok(ino)), None, Some(actual)) => (dev, ino) == actual,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_level_gets_its_sd_daemon_priority() {
        assert_eq!(journal_line(Level::Error, &"etcd down"), "<3>etcd down");
        assert_eq!(journal_line(Level::Warn, &"refused"), "<4>refused");
        assert_eq!(journal_line(Level::Info, &"assigned"), "<6>assigned");
        assert_eq!(journal_line(Level::Debug, &"POST"), "<7>POST");
        assert_eq!(journal_line(Level::Trace, &"bytes"), "<7>bytes");
    }

    #[test]
    fn every_line_of_a_message_keeps_the_priority() {
        assert_eq!(
            journal_line(Level::Warn, &"first\nsecond"),
            "<4>first\n<4>second"
        );
        assert_eq!(
            journal_line(Level::Info, &format_args!("{} {}", "a", 1)),
            "<6>a 1"
        );
    }

    #[test]
    fn only_the_stream_journal_stream_names_is_the_journal() {
        assert!(names_stream("8:12345", Some((8, 12345))));
        assert!(names_stream("8:12345\n", Some((8, 12345))));
        // A terminal, a pipe or a file the variable was inherited into.
        assert!(!names_stream("8:12345", Some((8, 12346))));
        assert!(!names_stream("8:12345", None));
        assert!(!names_stream("", Some((0, 0))));
        assert!(!names_stream("8", Some((8, 0))));
        assert!(!names_stream("8:1:2", Some((8, 1))));
        assert!(!names_stream("x:y", Some((0, 0))));
    }

    #[test]
    fn off_the_journal_messages_are_not_prefixed() {
        // The terminal format is env_logger's, untouched; the final error line is plain.
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
    }
}
