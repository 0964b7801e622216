//! Running another program (`docker`, `ip`, `systemctl`) and keeping what it said: its stdout
//! when it succeeds, the last line of its stderr when it fails.

use std::fmt;
use std::io;
use std::process::{Command, ExitStatus};

/// Why a program run did not succeed.
#[derive(Debug)]
pub enum RunError {
    /// It could not be started (not installed, say).
    Spawn { program: String, error: io::Error },
    /// It ran and failed; `said` is the last non-empty line of its stderr.
    Failed {
        program: String,
        /// Its first argument, naming what was asked (`network`, `addr`, `stop`...).
        verb: String,
        status: ExitStatus,
        said: String,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Spawn { program, error } => write!(f, "cannot run {program}: {error}"),
            RunError::Failed {
                program,
                verb,
                status,
                said,
            } => write!(f, "{program} {verb} exited with {status}: {said}"),
        }
    }
}

impl std::error::Error for RunError {}

/// Runs `program` with `args` and waits for it; its stdout if it succeeds.
pub fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<String, RunError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    log::debug!("running {program} {}", args.join(" "));
    let out = Command::new(program)
        .args(&args)
        .output()
        .map_err(|error| RunError::Spawn {
            program: program.into(),
            error,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    Err(RunError::Failed {
        program: program.into(),
        verb: args.first().copied().unwrap_or_default().into(),
        status: out.status,
        said,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_failed_and_the_last_line_of_stderr() {
        let out = run("sh", &["-c", "echo one; echo two >&2; echo >&2; exit 3"]);
        let e = out.unwrap_err();
        assert!(
            matches!(&e, RunError::Failed { said, .. } if said == "two"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "sh -c exited with exit status: 3: two");
        assert_eq!(run("sh", &["-c", "echo hi"]).unwrap(), "hi\n");
        let missing = run::<&str>("/nonexistent/program", &[]).unwrap_err();
        assert!(missing
            .to_string()
            .starts_with("cannot run /nonexistent/program: "));
    }
}
