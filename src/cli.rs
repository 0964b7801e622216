//! The command line: global flags, one command and its flags, parsed with lexopt in two stages
//! (as typed, then checked into typed values), and the help texts. Global settings not given
//! as flags come from the environment, then the settings file (`config`), then defaults; both
//! are handed in as `Sources`, so parsing itself does no I/O.

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use lexopt::prelude::*;

use crate::addr::{self, AddrError, AddrRange};
use crate::auth::Secret;
use crate::config::{self, ConfigError, ConfigFile};
use crate::tls::TlsFiles;

pub const DEFAULT_CLUSTER_STORE: &str = "http://127.0.0.1:2379";
pub const DEFAULT_STORE_PREFIX: &str = "/talkingdata";
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/talkingdata.sock";
pub const DEFAULT_TIMEOUT_SECS: f64 = 3.0;
pub const DEFAULT_NETWORK: &str = "mynet";
pub const DEFAULT_BRIDGE: &str = "br0";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_IFCFG_DIR: &str = "/etc/sysconfig/network-scripts";

/// A help text: usage and description written by hand, then the flags. A command's flags are
/// listed here only, as `Flag`s; its parser matches on the same names (a unit test keeps the
/// two together) and `-name` is read as `--name` for each of them.
#[derive(Debug, PartialEq, Eq)]
pub struct Help {
    text: &'static str,
    flags: &'static [Flag],
}

/// One of a command's flags, as its help lists it.
#[derive(Debug, PartialEq, Eq)]
struct Flag {
    /// Without the dashes, as the parser matches it.
    name: &'static str,
    /// What the value stands for; `None` for a switch.
    value: Option<&'static str>,
    /// The description, one line of help per line.
    about: &'static str,
}

impl Flag {
    const fn value(name: &'static str, value: &'static str, about: &'static str) -> Flag {
        Flag {
            name,
            value: Some(value),
            about,
        }
    }

    const fn switch(name: &'static str, about: &'static str) -> Flag {
        Flag {
            name,
            value: None,
            about,
        }
    }

    /// `--name VALUE`, as the help's left column shows it.
    fn usage(&self) -> String {
        match self.value {
            Some(value) => format!("--{} {value}", self.name),
            None => format!("--{}", self.name),
        }
    }
}

impl fmt::Display for Help {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text)?;
        if self.flags.is_empty() {
            return Ok(());
        }
        let width = self
            .flags
            .iter()
            .map(|f| f.usage().len())
            .max()
            .unwrap_or_default();
        f.write_str("\nFlags:\n")?;
        for flag in self.flags {
            let mut lines = flag.about.lines();
            let first = lines.next().unwrap_or_default();
            writeln!(f, "  {:width$}  {first}", flag.usage())?;
            for line in lines {
                writeln!(f, "{:indent$}{line}", "", indent = width + 4)?;
            }
        }
        Ok(())
    }
}

/// The global flags are listed in the text: `parse` reads them in its own loop, and
/// `GLOBAL_FLAGS` names them for their one-dash spelling.
static HELP: Help = Help {
    text: "\
oam-docker-ipam: Docker IPAM plugin with address pools in etcd

Usage: oam-docker-ipam [GLOBAL FLAGS] COMMAND [FLAGS]

Commands:
  server          serve Docker's remote IPAM protocol on a Unix socket
  ip-range        add a range of container addresses to the pool
  release-ip      give a container address back to the pool
  host-range      add a range of host addresses and the hosts' gateway
  release-host    give a host address back to the pool
  create-network  take this host's address, create the Docker network and br0's config
  migrate-v2      bring the original tool's pools over from etcd's v2 keyspace
  show            list the pools, and each address in use with its holder
  check           check the pools' invariants in etcd (read-only)
  reconcile       compare this host's Docker endpoints with etcd; --apply fixes
  help [COMMAND]  print this help or a command's (also: h)

Global flags (a flag beats the environment, which beats the settings file):
  --cluster-store URLS  etcd endpoints, comma-separated [env CLUSTER_STORE]
                        (default http://127.0.0.1:2379)
  --store-prefix PATH   etcd key prefix of this installation [env IPAM_STORE_PREFIX]
                        (default /talkingdata)
  --timeout SECONDS     time limit of each etcd request [env IPAM_TIMEOUT] (default 3)
  --cacert FILE         CA certificate(s) to trust for https:// endpoints, PEM
                        [env IPAM_CACERT] (default: the system's CA bundle)
  --cert FILE           client certificate, PEM; its subject must have no CN (etcd's
                        gateway refuses one with a CN) [env IPAM_CERT]
  --key FILE            the client certificate's private key, PEM [env IPAM_KEY]
  --user NAME           etcd user [env IPAM_USER]
  --password-file FILE  the user's password is this file's first line
                        [env IPAM_PASSWORD_FILE; or the password in env IPAM_PASSWORD]
  --config FILE         settings file (default /etc/sysconfig/oam-docker-ipam)
  --debug               log debug messages [env DEBUG=true]
  --host-id ID          this host's stable identity in owner records [env HOST_ID]
                        (default: derived from /etc/machine-id)
  -h, --help            print help (also: COMMAND --help)
  -v, -V, --version     print the version

Each [env NAME] may also be set as NAME=value in the settings file, which the
service reads too. The password is never taken from the command line.
Flags may also be written with one dash (-cluster-store=URL, -ip-start A/N), as the
original tool accepted them.
",
    flags: &[],
};

static SERVER_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] server [--socket PATH]

Serve Docker's remote IPAM protocol. The driver name is the socket's file name
without .sock. Under systemd socket activation the inherited socket is served.
",
    flags: &[Flag::value(
        "socket",
        "PATH",
        "Unix socket to listen on\n(default /run/docker/plugins/talkingdata.sock)",
    )],
};

static IP_RANGE_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] ip-range --ip-start A/N --ip-end B/N [--remove]

Add every address from A to B (both in the same /N network) to that network's
container pool. Addresses in use, the network and broadcast addresses and the
hosts' gateway are not pooled. Running it again changes nothing.

With --remove, take the free addresses from A to B out of the pool instead;
refused, naming them, if any of them is in use. When no address of the
network would be left, its config goes first, so Docker cannot use the pool.
",
    flags: &[
        Flag::value(
            "ip-start",
            "A/N",
            "first address of the range, with its prefix length",
        ),
        Flag::value(
            "ip-end",
            "B/N",
            "last address of the range, with the same prefix length",
        ),
        Flag::switch("remove", "take the range out of the pool"),
    ],
};

static RELEASE_IP_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] release-ip --ip A/N [--force]

Give an address back to the pool of its network. An address recorded for a
container is refused, naming its holder, unless --force.
",
    flags: &[
        Flag::value("ip", "A/N", "the address, with its network's prefix length"),
        Flag::switch("force", "release it even if a container holds it"),
    ],
};

static HOST_RANGE_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] host-range --ip-start A/N --ip-end B/N --gateway G
       [--force | --remove]

Add every address from A to B to the host pool and record the hosts' subnet and
gateway. The gateway must be in the subnet and is never pooled. A gateway other
than the recorded one is refused unless --force, which changes it and says what
changed.

With --remove, take the free addresses from A to B out of the host pool instead
(--gateway may then be left out); refused, naming them, if any is in use. When
no host address would be left, the hosts' config goes first.
",
    flags: &[
        Flag::value(
            "ip-start",
            "A/N",
            "first host address, with its prefix length",
        ),
        Flag::value(
            "ip-end",
            "B/N",
            "last host address, with the same prefix length",
        ),
        Flag::value("gateway", "G", "the hosts' router"),
        Flag::switch("force", "change the recorded gateway to G"),
        Flag::switch("remove", "take the range out of the host pool"),
    ],
};

static RELEASE_HOST_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] release-host --ip A[/N] [--force]

Give a host address back to the host pool. An address recorded as a host's own
is refused, naming the host, unless --force.
",
    flags: &[
        Flag::value(
            "ip",
            "A[/N]",
            "the host address (a prefix length, if given, must be the hosts')",
        ),
        Flag::switch("force", "release it even if a host holds it as its own"),
    ],
};

static SHOW_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] show [--json] [--ip A] [NETWORK]

List every pool (the hosts' and each container network's): its range, size,
free addresses, and those in use by containers or hosts, reserved (gateway or
aux address) or held by the original tool. With NETWORK (a container network
as A.B.C.D/N or its network address, or hosts), also each address in use and
its holder (role, host, MAC, since). With --ip, where A is and who holds it.
",
    flags: &[
        Flag::switch("json", "print JSON (documented in the README and man page)"),
        Flag::value("ip", "A", "show the address A in every pool that has it"),
    ],
};

static CHECK_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] check [--json]

Check the pools' invariants in one consistent read of etcd: pool/ and assigned/
disjoint; every key an address of its network; network, broadcast and the hosts'
gateway never pooled; configs present and parseable; owner records parseable;
the host pool and container pools apart. Prints one line per violation naming
the key, and notes on reserved addresses. Exit status 0 when all hold, 1 if not.
Changes nothing.
",
    flags: &[Flag::switch(
        "json",
        "print JSON (documented in the README and man page)",
    )],
};

static RECONCILE_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] reconcile [--apply]

On a Docker host: compare the endpoints of this host's networks whose IPAM
driver is talkingdata (read with the docker command, so DOCKER_HOST applies)
with what etcd records for this host. Reports leaked addresses (recorded for
this host, no endpoint has them), orphaned ones (an endpoint has an address
etcd has free), conflicting ones (an endpoint has an address etcd records for
another holder) and the original tool's records a local endpoint has. Without
--apply nothing changes and the exit status is 1 if anything was found.
",
    flags: &[Flag::switch(
        "apply",
        "free leaked addresses, record orphaned ones and adopt the original's\n\
         for their endpoint (each a compare-and-swap); conflicts are reported",
    )],
};

static MIGRATE_V2_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] migrate-v2 [--dry-run]

Read the original tool's pools from etcd's v2 keyspace (etcd 3.3 to 3.5 started
with --enable-v2=true) and write them into the v3 keys this tool uses: configs,
free addresses, and the addresses the original assigned (recorded as held by
the original, so they are never handed out again until Docker releases them).
The v2 data is never changed. Running it again changes nothing; where v3
already holds something that disagrees, it refuses, naming each key.
",
    flags: &[Flag::switch(
        "dry-run",
        "print what would be written and change nothing",
    )],
};

static CREATE_NETWORK_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam [GLOBAL FLAGS] create-network [FLAGS]

Take this host's address from the host pool, create the Docker network with the
talkingdata IPAM driver, write ifcfg-br0 and enslave the physical interface to
it, then restart the network service. On failure every step done is undone.
",
    flags: &[
        Flag::value("ip", "A", "this host's address (default: any free one)"),
        Flag::value("name", "NAME", "Docker network name (default mynet)"),
        Flag::value("bridge", "NAME", "bridge device (default br0)"),
        Flag::value("mtu", "N", "MTU of the bridge (default 1500)"),
        Flag::value(
            "interface",
            "NAME",
            "physical interface to enslave (default: the interface of\n\
             the route to the hosts' gateway)",
        ),
        Flag::value(
            "ifcfg-dir",
            "DIR",
            "ifcfg directory (default /etc/sysconfig/network-scripts)",
        ),
        Flag::switch(
            "force",
            "replace an existing, different ifcfg file of the bridge",
        ),
        Flag::switch(
            "no-restart",
            "do not stop NetworkManager nor restart the network service",
        ),
        Flag::switch("dry-run", "print every step and change nothing"),
    ],
};

static HELP_HELP: Help = Help {
    text: "\
Usage: oam-docker-ipam help [COMMAND]

Print the help, or COMMAND's help (the same as COMMAND --help). Also: h [COMMAND].
",
    flags: &[],
};

/// Each command's name and help, for `help COMMAND`.
static COMMANDS: &[(&str, &Help)] = &[
    ("server", &SERVER_HELP),
    ("ip-range", &IP_RANGE_HELP),
    ("release-ip", &RELEASE_IP_HELP),
    ("host-range", &HOST_RANGE_HELP),
    ("release-host", &RELEASE_HOST_HELP),
    ("create-network", &CREATE_NETWORK_HELP),
    ("migrate-v2", &MIGRATE_V2_HELP),
    ("show", &SHOW_HELP),
    ("check", &CHECK_HELP),
    ("reconcile", &RECONCILE_HELP),
    ("help", &HELP_HELP),
    ("h", &HELP_HELP),
];

/// Why the command line was refused. Exit status 2.
#[derive(Debug)]
pub enum UsageError {
    /// lexopt's own complaint: an unknown flag, a missing value, a stray argument.
    Parse(lexopt::Error),
    /// No command was given.
    NoCommand,
    /// The first positional argument names no command.
    UnknownCommand(String),
    /// A required flag is missing.
    Missing {
        command: &'static str,
        flag: &'static str,
    },
    /// A flag's value does not parse.
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    /// An address, range or network is refused.
    Addr {
        flag: &'static str,
        error: AddrError,
    },
    /// A setting from the environment or the settings file is refused.
    Setting {
        origin: String,
        error: Box<UsageError>,
    },
    /// The settings file cannot be read.
    Config(ConfigError),
    /// `--password` was given: a password on the command line shows in process lists.
    PasswordOnCommandLine,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::Parse(e) => write!(f, "{e}"),
            UsageError::NoCommand => write!(f, "no command given (try --help)"),
            UsageError::UnknownCommand(c) => write!(f, "unknown command {c:?} (try --help)"),
            UsageError::Missing { command, flag } => write!(f, "{command} needs {flag}"),
            UsageError::Invalid {
                flag,
                value,
                reason,
            } => {
                write!(f, "invalid {flag} {value:?}: {reason}")
            }
            UsageError::Addr { flag, error } => write!(f, "{flag}: {error}"),
            UsageError::Setting { origin, error } => write!(f, "{error} ({origin})"),
            UsageError::Config(e) => write!(f, "{e}"),
            UsageError::PasswordOnCommandLine => write!(
                f,
                "the password is not taken from the command line, where every user's process \
                 list shows it: use --password-file FILE (its first line) or IPAM_PASSWORD in \
                 the environment"
            ),
        }
    }
}

impl std::error::Error for UsageError {}

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> UsageError {
        UsageError::Parse(e)
    }
}

/// What every command shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    pub endpoints: Vec<String>,
    pub store_prefix: String,
    pub timeout: Duration,
    pub debug: bool,
    /// `--host-id`: this host's stable identity, overriding HOST_ID and /etc/machine-id.
    pub host_id: Option<String>,
    /// Settings that were ignored, to be logged once logging is set up.
    pub warnings: Vec<String>,
    /// CA, client certificate and key files for https:// endpoints.
    pub tls: TlsFiles,
    /// The etcd user, and where its password is (both or neither).
    pub user: Option<String>,
    pub password: Option<Password>,
}

/// Where the etcd password is.
#[derive(Debug, Clone, PartialEq)]
pub enum Password {
    /// The first line of this file (`--password-file`, `IPAM_PASSWORD_FILE`).
    File(PathBuf),
    /// The password itself (`IPAM_PASSWORD` in the environment).
    Given(Secret),
}

/// `create-network`'s settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkFlags {
    pub ip: Option<Ipv4Addr>,
    pub name: String,
    pub bridge: String,
    pub mtu: u32,
    pub interface: Option<String>,
    pub ifcfg_dir: PathBuf,
    pub force: bool,
    pub no_restart: bool,
    pub dry_run: bool,
}

/// Which pool `show` lists the addresses of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolName {
    Hosts,
    /// A container network: its network address, and its prefix length if one was given.
    Containers(Ipv4Addr, Option<u8>),
}

/// `show`'s settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ShowFlags {
    pub json: bool,
    pub ip: Option<Ipv4Addr>,
    pub pool: Option<PoolName>,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help(&'static Help),
    Version,
    Server {
        socket: PathBuf,
    },
    IpRange {
        range: AddrRange,
    },
    /// `force`: also an address a container holds.
    ReleaseIp {
        addr: Ipv4Addr,
        net: Ipv4Net,
        force: bool,
    },
    /// `force`: change the recorded gateway if it differs.
    HostRange {
        range: AddrRange,
        gateway: Ipv4Addr,
        force: bool,
    },
    /// `prefix_len`: given as `A/N` (the original's spelling), checked against the hosts'.
    /// `force`: also an address a host holds as its own.
    ReleaseHost {
        addr: Ipv4Addr,
        prefix_len: Option<u8>,
        force: bool,
    },
    /// `ip-range --remove`.
    RemoveIpRange {
        range: AddrRange,
    },
    /// `host-range --remove`; `gateway`, if given, must be the recorded one.
    RemoveHostRange {
        range: AddrRange,
        gateway: Option<Ipv4Addr>,
    },
    Show(ShowFlags),
    Check {
        json: bool,
    },
    Reconcile {
        apply: bool,
    },
    CreateNetwork(NetworkFlags),
    MigrateV2 {
        dry_run: bool,
    },
}

/// The long flags besides the commands' (which their helps list): the global ones, `--help`
/// and `--version`.
const GLOBAL_FLAGS: &[&str] = &[
    "cluster-store",
    "store-prefix",
    "timeout",
    "debug",
    "config",
    "cacert",
    "cert",
    "key",
    "user",
    "password-file",
    "password",
    "host-id",
    "help",
    "version",
];

/// Whether `name` is a long flag, global or any command's.
fn is_long_flag(name: &str) -> bool {
    GLOBAL_FLAGS.contains(&name)
        || COMMANDS
            .iter()
            .any(|(_, help)| help.flags.iter().any(|flag| flag.name == name))
}

/// `-cluster-store=URL` → `--cluster-store=URL`: the original's CLI library (urfave/cli)
/// took long flags with one dash, and scripts written for it do so.
fn double_dash(arg: OsString) -> OsString {
    let Some(text) = arg.to_str() else {
        return arg;
    };
    let name = text.strip_prefix('-').filter(|rest| !rest.starts_with('-'));
    match name.map(|n| n.split('=').next().unwrap_or(n)) {
        Some(name) if name.len() > 1 && is_long_flag(name) => format!("-{text}").into(),
        _ => arg,
    }
}

/// Where global settings come from besides the command line: environment variables, and
/// the settings file (read only for commands that reach etcd, so that `--help` never fails).
pub struct Sources<'a> {
    /// The value of an environment variable; empty counts as unset.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Reads the settings file: the one `--config` names, or the default one.
    pub config: &'a dyn Fn(Option<&Path>) -> Result<ConfigFile, ConfigError>,
}

impl Sources<'static> {
    /// The process's environment and the settings file on disk.
    pub fn system() -> Sources<'static> {
        Sources {
            env: &env_var,
            config: &config::load,
        }
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The global flags as typed.
#[derive(Default)]
struct GlobalFlags {
    cluster_store: Option<String>,
    store_prefix: Option<String>,
    timeout: Option<String>,
    debug: Option<bool>,
    config: Option<PathBuf>,
    cacert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
    host_id: Option<String>,
}

/// Where a setting's value came from, for messages.
enum Origin {
    Flag,
    Env(&'static str),
    File {
        key: &'static str,
        path: PathBuf,
        line: usize,
    },
}

impl Origin {
    /// `error`, saying where the refused value came from unless it was typed as a flag.
    fn blame(&self, error: UsageError) -> UsageError {
        let origin = match self {
            Origin::Flag => return error,
            Origin::Env(key) => format!("from {key} in the environment"),
            Origin::File { key, path, line } => {
                format!("from {key} in {} line {line}", path.display())
            }
        };
        UsageError::Setting {
            origin,
            error: Box::new(error),
        }
    }
}

/// Looks a setting up in order: the flag, the environment variable `key`, the settings file.
fn setting(
    flag: Option<String>,
    key: &'static str,
    sources: &Sources,
    file: &ConfigFile,
) -> Option<(String, Origin)> {
    if let Some(v) = flag {
        return Some((v, Origin::Flag));
    }
    if let Some(v) = (sources.env)(key) {
        return Some((v, Origin::Env(key)));
    }
    file.get(key)
        .filter(|(v, _)| !v.trim().is_empty())
        .map(|(v, line)| {
            (
                v.to_string(),
                Origin::File {
                    key,
                    path: file.path.clone(),
                    line,
                },
            )
        })
}

/// Parses the arguments (without the program name); settings not given as flags come from
/// `sources`: flag, then environment, then settings file, then the default.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    sources: &Sources,
) -> Result<(Global, Command), UsageError> {
    let mut parser = lexopt::Parser::from_args(args.into_iter().map(double_dash));
    let mut flags = GlobalFlags::default();
    let command = loop {
        match parser.next()? {
            Some(Long("cluster-store")) => {
                flags.cluster_store = Some(text(parser.value()?, "--cluster-store")?)
            }
            Some(Long("store-prefix")) => {
                flags.store_prefix = Some(text(parser.value()?, "--store-prefix")?);
            }
            Some(Long("host-id")) => {
                flags.host_id = Some(parse_host_id(
                    "--host-id",
                    &text(parser.value()?, "--host-id")?,
                )?);
            }
            Some(Long("timeout")) => flags.timeout = Some(text(parser.value()?, "--timeout")?),
            Some(Long("debug")) => {
                flags.debug = Some(match parser.optional_value() {
                    Some(v) => parse_bool("--debug", &text(v, "--debug")?)?,
                    None => true,
                })
            }
            Some(Long("config")) => {
                flags.config = Some(PathBuf::from(text(parser.value()?, "--config")?))
            }
            Some(Long("cacert")) => flags.cacert = Some(text(parser.value()?, "--cacert")?),
            Some(Long("cert")) => flags.cert = Some(text(parser.value()?, "--cert")?),
            Some(Long("key")) => flags.key = Some(text(parser.value()?, "--key")?),
            Some(Long("user")) => flags.user = Some(text(parser.value()?, "--user")?),
            Some(Long("password-file")) => {
                flags.password_file = Some(text(parser.value()?, "--password-file")?)
            }
            // Never echo what follows: it is a password.
            Some(Long("password")) => return Err(UsageError::PasswordOnCommandLine),
            Some(Short('h') | Long("help")) => {
                return Ok((global_defaults(), Command::Help(&HELP)))
            }
            Some(Short('V' | 'v') | Long("version")) => {
                return Ok((global_defaults(), Command::Version))
            }
            Some(Value(name)) => break text(name, "command")?,
            Some(other) => return Err(other.unexpected().into()),
            None => return Err(UsageError::NoCommand),
        }
    };
    if command == "help" || command == "h" {
        return Ok((global_defaults(), parse_help(&mut parser)?));
    }
    let command = match command.as_str() {
        "server" => parse_server(&mut parser),
        "ip-range" => parse_ip_range(&mut parser),
        "release-ip" => parse_release_ip(&mut parser),
        "host-range" => parse_host_range(&mut parser),
        "release-host" => parse_release_host(&mut parser),
        "create-network" => parse_create_network(&mut parser),
        "migrate-v2" => parse_migrate_v2(&mut parser),
        "show" => parse_show(&mut parser),
        "check" => parse_check(&mut parser),
        "reconcile" => parse_reconcile(&mut parser),
        _ => return Err(UsageError::UnknownCommand(command)),
    };
    // A command's help needs no settings; otherwise a refused global setting is reported
    // before a refused command flag.
    if let Ok(Command::Help(_)) = command {
        return Ok((global_defaults(), command?));
    }
    let file = (sources.config)(flags.config.as_deref()).map_err(UsageError::Config)?;
    let global = resolve(flags, sources, &file)?;
    Ok((global, command?))
}

/// The global settings from the flags as typed, the environment and the settings file.
fn resolve(flags: GlobalFlags, sources: &Sources, file: &ConfigFile) -> Result<Global, UsageError> {
    let mut warnings = file.warnings.clone();
    let endpoints = match setting(flags.cluster_store, "CLUSTER_STORE", sources, file) {
        Some((v, origin)) => parse_endpoints(&v).map_err(|e| origin.blame(e))?,
        None => vec![DEFAULT_CLUSTER_STORE.to_string()],
    };
    let store_prefix = match setting(flags.store_prefix, "IPAM_STORE_PREFIX", sources, file) {
        Some((v, origin)) => parse_prefix(&v).map_err(|e| origin.blame(e))?,
        None => DEFAULT_STORE_PREFIX.to_string(),
    };
    let timeout = match setting(flags.timeout, "IPAM_TIMEOUT", sources, file) {
        Some((v, origin)) => parse_seconds(&v).map_err(|e| origin.blame(e))?,
        None => DEFAULT_TIMEOUT_SECS,
    };
    // A DEBUG set for something else must not break every command: a warning.
    let debug = match flags.debug {
        Some(on) => on,
        None => match setting(None, "DEBUG", sources, file) {
            Some((v, origin)) => match parse_bool("DEBUG", &v) {
                Ok(on) => on,
                Err(_) => {
                    let from = match origin.blame(UsageError::NoCommand) {
                        UsageError::Setting { origin, .. } => origin,
                        _ => String::new(),
                    };
                    warnings.push(format!(
                        "ignoring DEBUG={v:?} {from}: expected true or false"
                    ));
                    false
                }
            },
            None => false,
        },
    };
    let path =
        |flag, key| setting(flag, key, sources, file).map(|(v, origin)| (PathBuf::from(v), origin));
    let cacert = path(flags.cacert, "IPAM_CACERT");
    let cert = path(flags.cert, "IPAM_CERT");
    let key = path(flags.key, "IPAM_KEY");
    match (&cert, &key) {
        (Some((_, origin)), None) => {
            return Err(origin.blame(UsageError::Missing {
                command: "--cert",
                flag: "--key (the client certificate's private key)",
            }))
        }
        (None, Some((_, origin))) => {
            return Err(origin.blame(UsageError::Missing {
                command: "--key",
                flag: "--cert (the client certificate)",
            }))
        }
        _ => {}
    }
    let user = setting(flags.user, "IPAM_USER", sources, file);
    if let Some((name, origin)) = &user {
        if name.contains(char::is_whitespace) || name.contains(':') {
            return Err(origin.blame(UsageError::Invalid {
                flag: "--user",
                value: name.clone(),
                reason: "expected an etcd user name, without spaces or ':' (the password \
                         goes in --password-file)"
                    .into(),
            }));
        }
    }
    // The password: a file named by the flag, a password in the environment, a file named
    // in the environment, a file named in the settings file. A password written into the
    // settings file itself (readable by everyone) is not taken.
    if file.get("IPAM_PASSWORD").is_some() {
        warnings.push(format!(
            "ignoring IPAM_PASSWORD in {}: that file is readable by every user; put the \
             password in a file only root can read and name it with IPAM_PASSWORD_FILE",
            file.path.display()
        ));
    }
    let password = match (flags.password_file, (sources.env)("IPAM_PASSWORD")) {
        (Some(f), _) => Some((Password::File(f.into()), Origin::Flag)),
        (None, Some(p)) => Some((
            Password::Given(Secret::new(p)),
            Origin::Env("IPAM_PASSWORD"),
        )),
        (None, None) => path(None, "IPAM_PASSWORD_FILE").map(|(f, o)| (Password::File(f), o)),
    };
    let (user, password) = match (user, password) {
        (Some((user, _)), Some((password, _))) => (Some(user), Some(password)),
        (None, None) => (None, None),
        (Some((_, origin)), None) => {
            return Err(origin.blame(UsageError::Missing {
                command: "--user",
                flag: "a password (--password-file FILE, or IPAM_PASSWORD in the environment)",
            }))
        }
        (None, Some((_, origin))) => {
            return Err(origin.blame(UsageError::Missing {
                command: "a password",
                flag: "--user",
            }))
        }
    };
    let tls = TlsFiles {
        cacert: cacert.map(|(p, _)| p),
        cert: cert.map(|(p, _)| p),
        key: key.map(|(p, _)| p),
    };
    let plain: Vec<&String> = endpoints
        .iter()
        .filter(|e| e.starts_with("http://"))
        .collect();
    if !plain.is_empty() && user.is_some() {
        warnings.push(format!(
            "the etcd password goes unencrypted to {}: use https:// endpoints",
            plain
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if plain.len() == endpoints.len() && tls != TlsFiles::default() {
        warnings.push(
            "--cacert, --cert and --key are unused: every endpoint is http://, not https://".into(),
        );
    }
    Ok(Global {
        endpoints,
        store_prefix,
        timeout: Duration::from_secs_f64(timeout),
        debug,
        host_id: flags.host_id,
        warnings,
        tls,
        user,
        password,
    })
}

/// `help [COMMAND]` (or `h`), as the original's CLI library had it.
fn parse_help(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let Some(arg) = parser.next()? else {
        return Ok(Command::Help(&HELP));
    };
    let name = match arg {
        Value(name) => text(name, "command")?,
        Short('h') | Long("help") => return Ok(Command::Help(&HELP_HELP)),
        other => return Err(other.unexpected().into()),
    };
    if let Some(extra) = parser.next()? {
        return Err(extra.unexpected().into());
    }
    match COMMANDS.iter().find(|(command, _)| *command == name) {
        Some((_, help)) => Ok(Command::Help(help)),
        None => Err(UsageError::UnknownCommand(name)),
    }
}

fn global_defaults() -> Global {
    Global {
        endpoints: vec![DEFAULT_CLUSTER_STORE.into()],
        store_prefix: DEFAULT_STORE_PREFIX.into(),
        timeout: Duration::from_secs_f64(DEFAULT_TIMEOUT_SECS),
        debug: false,
        host_id: None,
        warnings: Vec::new(),
        tls: TlsFiles::default(),
        user: None,
        password: None,
    }
}

fn text(value: OsString, flag: &'static str) -> Result<String, UsageError> {
    value.into_string().map_err(|v| UsageError::Invalid {
        flag,
        value: v.to_string_lossy().into_owned(),
        reason: "not valid UTF-8".into(),
    })
}

fn parse_bool(flag: &'static str, value: &str) -> Result<bool, UsageError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(UsageError::Invalid {
            flag,
            value: value.into(),
            reason: "expected true or false".into(),
        }),
    }
}

fn parse_seconds(value: &str) -> Result<f64, UsageError> {
    match value.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 3600.0 => Ok(s),
        _ => Err(UsageError::Invalid {
            flag: "--timeout",
            value: value.into(),
            reason: "expected a number of seconds above 0 and at most 3600".into(),
        }),
    }
}

/// Splits an endpoint list on `,` or the full-width `，` that the original's examples use.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, UsageError> {
    let mut endpoints = Vec::new();
    for part in list
        .split([',', '，'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let rest = part
            .strip_prefix("http://")
            .or_else(|| part.strip_prefix("https://"));
        let authority = rest.map(|r| r.split('/').next().unwrap_or_default());
        if let Some((_, host)) = authority.and_then(|a| a.rsplit_once('@')) {
            // Never echo the credentials: they would land in logs and terminals.
            let scheme = if part.starts_with("https") {
                "https"
            } else {
                "http"
            };
            return Err(UsageError::Invalid {
                flag: "--cluster-store",
                value: format!("{scheme}://…@{host}"),
                reason: "credentials do not belong in the URL (they would show in logs, \
                         Docker's errors and process lists); remove 'user:password@'"
                    .into(),
            });
        }
        if !authority.is_some_and(authority_ok) {
            return Err(UsageError::Invalid {
                flag: "--cluster-store",
                value: part.into(),
                reason: "expected http://HOST:PORT or https://HOST:PORT with a port from 1 \
                         to 65535"
                    .into(),
            });
        }
        endpoints.push(part.trim_end_matches('/').to_string());
    }
    if endpoints.is_empty() {
        return Err(UsageError::Invalid {
            flag: "--cluster-store",
            value: list.into(),
            reason: "no endpoint given".into(),
        });
    }
    Ok(endpoints)
}

/// `HOST`, `HOST:PORT` or `[V6]:PORT`, the port (if any) a number from 1 to 65535.
fn authority_ok(authority: &str) -> bool {
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, rest)) => (host, rest.strip_prefix(':').map(Some).unwrap_or(None)),
            None => return false,
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let port_ok = port.map_or(true, |p| p.parse::<u16>().is_ok_and(|p| p > 0));
    !host.is_empty() && !host.contains(char::is_whitespace) && port_ok
}

fn parse_prefix(prefix: &str) -> Result<String, UsageError> {
    let trimmed = prefix.trim_end_matches('/');
    if !trimmed.starts_with('/') || !trimmed.is_ascii() || trimmed.contains(char::is_whitespace) {
        return Err(UsageError::Invalid {
            flag: "--store-prefix",
            value: prefix.into(),
            reason: "expected an ASCII path starting with / (such as /talkingdata)".into(),
        });
    }
    Ok(trimmed.to_string())
}

// Each command reads its flags in its own loop, as typed, and checks them after the loop: so
// the last of a repeated flag counts, and `--help` anywhere wins over a value that would be
// refused, though not over a flag that cannot be read at all. `show` checks as it goes.

fn need(
    value: Option<String>,
    command: &'static str,
    flag: &'static str,
) -> Result<String, UsageError> {
    value.ok_or(UsageError::Missing { command, flag })
}

fn addr_flag<T>(flag: &'static str, result: Result<T, AddrError>) -> Result<T, UsageError> {
    result.map_err(|error| UsageError::Addr { flag, error })
}

fn parse_server(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut socket) = (false, None);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("socket") => socket = Some(text(parser.value()?, "--socket")?),
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&SERVER_HELP));
    }
    let socket = PathBuf::from(socket.as_deref().unwrap_or(DEFAULT_SOCKET));
    if socket.file_stem().is_none() {
        return Err(UsageError::Invalid {
            flag: "--socket",
            value: socket.display().to_string(),
            reason: "expected a file path".into(),
        });
    }
    Ok(Command::Server { socket })
}

fn parse_range(
    command: &'static str,
    start: Option<String>,
    end: Option<String>,
) -> Result<AddrRange, UsageError> {
    let start = need(start, command, "--ip-start")?;
    let end = need(end, command, "--ip-end")?;
    addr_flag("--ip-start", addr::parse_cidr(&start))?;
    addr_flag("--ip-end", addr::parse_cidr(&end))?;
    addr_flag("--ip-start/--ip-end", AddrRange::parse(&start, &end))
}

fn parse_ip_range(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut start, mut end, mut remove) = (false, None, None, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("ip-start") => start = Some(text(parser.value()?, "--ip-start")?),
            Long("ip-end") => end = Some(text(parser.value()?, "--ip-end")?),
            Long("remove") => remove = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&IP_RANGE_HELP));
    }
    let range = parse_range("ip-range", start, end)?;
    if remove {
        return Ok(Command::RemoveIpRange { range });
    }
    Ok(Command::IpRange { range })
}

fn parse_host_range(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut start, mut end, mut gateway) = (false, None, None, None);
    let (mut force, mut remove) = (false, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("ip-start") => start = Some(text(parser.value()?, "--ip-start")?),
            Long("ip-end") => end = Some(text(parser.value()?, "--ip-end")?),
            Long("gateway") => gateway = Some(text(parser.value()?, "--gateway")?),
            Long("force") => force = true,
            Long("remove") => remove = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&HOST_RANGE_HELP));
    }
    let range = parse_range("host-range", start, end)?;
    if force && remove {
        return Err(UsageError::Invalid {
            flag: "--force",
            value: "--remove".into(),
            reason: "--force changes the gateway of a range being added; not with --remove".into(),
        });
    }
    if remove {
        let gateway = match gateway {
            Some(g) => Some(addr_flag("--gateway", addr::parse_addr(&g))?),
            None => None,
        };
        return Ok(Command::RemoveHostRange { range, gateway });
    }
    let gateway = need(gateway, "host-range", "--gateway")?;
    let gateway = addr_flag("--gateway", addr::parse_addr(&gateway))?;
    Ok(Command::HostRange {
        range,
        gateway,
        force,
    })
}

/// A host identity as typed: 1 to 64 printable ASCII characters, no spaces.
pub fn parse_host_id(flag: &'static str, value: &str) -> Result<String, UsageError> {
    let ok = !value.is_empty() && value.len() <= 64 && value.chars().all(|c| c.is_ascii_graphic());
    if !ok {
        return Err(UsageError::Invalid {
            flag,
            value: value.into(),
            reason: "expected 1 to 64 printable ASCII characters without spaces".into(),
        });
    }
    Ok(value.into())
}

fn parse_show(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let mut show = ShowFlags {
        json: false,
        ip: None,
        pool: None,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(&SHOW_HELP)),
            Long("json") => show.json = true,
            Long("ip") => {
                let v = text(parser.value()?, "--ip")?;
                show.ip = Some(addr_flag("--ip", addr::parse_addr(&v))?);
            }
            Value(v) if show.pool.is_none() => {
                let v = text(v, "NETWORK")?;
                show.pool = Some(parse_pool_name(&v)?);
            }
            other => return Err(other.unexpected().into()),
        }
    }
    Ok(Command::Show(show))
}

/// `hosts`, `A.B.C.D/N` (its network) or `A.B.C.D` (a network address, a pool ID).
fn parse_pool_name(value: &str) -> Result<PoolName, UsageError> {
    if value == "hosts" {
        return Ok(PoolName::Hosts);
    }
    if value.contains('/') {
        let net = addr_flag("NETWORK", addr::parse_cidr(value))?.trunc();
        return Ok(PoolName::Containers(net.network(), Some(net.prefix_len())));
    }
    let addr = addr::parse_addr(value).map_err(|_| UsageError::Invalid {
        flag: "NETWORK",
        value: value.into(),
        reason: "expected hosts, a network A.B.C.D/N or its network address".into(),
    })?;
    Ok(PoolName::Containers(addr, None))
}

fn parse_check(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut json) = (false, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("json") => json = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&CHECK_HELP));
    }
    Ok(Command::Check { json })
}

fn parse_reconcile(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut apply) = (false, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("apply") => apply = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&RECONCILE_HELP));
    }
    Ok(Command::Reconcile { apply })
}

fn parse_release_ip(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut ip, mut force) = (false, None, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("ip") => ip = Some(text(parser.value()?, "--ip")?),
            Long("force") => force = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&RELEASE_IP_HELP));
    }
    let ip = need(ip, "release-ip", "--ip")?;
    let cidr = addr_flag("--ip", addr::parse_cidr(&ip))?;
    let net = cidr.trunc();
    if !addr::is_host_of(cidr.addr(), net) {
        return Err(UsageError::Addr {
            flag: "--ip",
            error: AddrError::NotHost(cidr.addr(), net),
        });
    }
    Ok(Command::ReleaseIp {
        addr: cidr.addr(),
        net,
        force,
    })
}

fn parse_release_host(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut ip, mut force) = (false, None, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("ip") => ip = Some(text(parser.value()?, "--ip")?),
            Long("force") => force = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&RELEASE_HOST_HELP));
    }
    let ip = need(ip, "release-host", "--ip")?;
    // The original took the host address with its prefix length, like release-ip.
    let (addr, prefix_len) = if ip.contains('/') {
        let cidr = addr_flag("--ip", addr::parse_cidr(&ip))?;
        (cidr.addr(), Some(cidr.prefix_len()))
    } else {
        (addr_flag("--ip", addr::parse_addr(&ip))?, None)
    };
    Ok(Command::ReleaseHost {
        addr,
        prefix_len,
        force,
    })
}

fn parse_migrate_v2(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let (mut help, mut dry_run) = (false, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => help = true,
            Long("dry-run") => dry_run = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if help {
        return Ok(Command::Help(&MIGRATE_V2_HELP));
    }
    Ok(Command::MigrateV2 { dry_run })
}

/// Interface and bridge names as the kernel takes them: 1 to 15 bytes, no `/`, space or `:`.
fn parse_ifname(flag: &'static str, value: &str) -> Result<String, UsageError> {
    let ok = !value.is_empty()
        && value.len() <= 15
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        && value != "."
        && value != "..";
    if !ok {
        return Err(UsageError::Invalid {
            flag,
            value: value.into(),
            reason: "expected an interface name of 1 to 15 letters, digits, '-', '_', '.'".into(),
        });
    }
    Ok(value.into())
}

/// `create-network`'s flags as typed.
#[derive(Default)]
struct NetworkArgs {
    help: bool,
    ip: Option<String>,
    name: Option<String>,
    bridge: Option<String>,
    mtu: Option<String>,
    interface: Option<String>,
    ifcfg_dir: Option<String>,
    force: bool,
    no_restart: bool,
    dry_run: bool,
}

fn parse_create_network(parser: &mut lexopt::Parser) -> Result<Command, UsageError> {
    let mut args = NetworkArgs::default();
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => args.help = true,
            Long("ip") => args.ip = Some(text(parser.value()?, "--ip")?),
            Long("name") => args.name = Some(text(parser.value()?, "--name")?),
            Long("bridge") => args.bridge = Some(text(parser.value()?, "--bridge")?),
            Long("mtu") => args.mtu = Some(text(parser.value()?, "--mtu")?),
            Long("interface") => args.interface = Some(text(parser.value()?, "--interface")?),
            Long("ifcfg-dir") => args.ifcfg_dir = Some(text(parser.value()?, "--ifcfg-dir")?),
            Long("force") => args.force = true,
            Long("no-restart") => args.no_restart = true,
            Long("dry-run") => args.dry_run = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if args.help {
        return Ok(Command::Help(&CREATE_NETWORK_HELP));
    }
    let ip = match args.ip {
        Some(v) => Some(addr_flag("--ip", addr::parse_addr(&v))?),
        None => None,
    };
    let name = args.name.unwrap_or_else(|| DEFAULT_NETWORK.into());
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with(['-', '.']);
    if !name_ok {
        return Err(UsageError::Invalid {
            flag: "--name",
            value: name,
            reason: "expected letters, digits, '-', '_' or '.'".into(),
        });
    }
    let bridge = parse_ifname("--bridge", args.bridge.as_deref().unwrap_or(DEFAULT_BRIDGE))?;
    let mtu = match args.mtu {
        None => DEFAULT_MTU,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(m) if (68..=65535).contains(&m) => m,
            _ => {
                return Err(UsageError::Invalid {
                    flag: "--mtu",
                    value: v,
                    reason: "expected a number from 68 to 65535".into(),
                })
            }
        },
    };
    let interface = match args.interface {
        Some(v) => Some(parse_ifname("--interface", &v)?),
        None => None,
    };
    let ifcfg_dir = PathBuf::from(args.ifcfg_dir.as_deref().unwrap_or(DEFAULT_IFCFG_DIR));
    Ok(Command::CreateNetwork(NetworkFlags {
        ip,
        name,
        bridge,
        mtu,
        interface,
        ifcfg_dir,
        force: args.force,
        no_restart: args.no_restart,
        dry_run: args.dry_run,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn no_file(_: Option<&Path>) -> Result<ConfigFile, ConfigError> {
        Ok(ConfigFile::default())
    }

    fn run(args: &[&str]) -> Result<(Global, Command), UsageError> {
        let sources = Sources {
            env: &no_env,
            config: &no_file,
        };
        parse(args.iter().map(OsString::from), &sources)
    }

    /// Parses `args` with these environment variables and this settings file.
    fn run_with(
        args: &[&str],
        env: &[(&str, &str)],
        file: &str,
    ) -> Result<(Global, Command), UsageError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let file = file.to_string();
        let load = move |given: Option<&Path>| {
            let path = given.unwrap_or(Path::new(config::DEFAULT_PATH));
            Ok(config::parse(path, &file))
        };
        let sources = Sources {
            env: &lookup,
            config: &load,
        };
        parse(args.iter().map(OsString::from), &sources)
    }

    #[test]
    fn reads_the_original_command_lines() {
        let (g, c) = run(&[
            "--cluster-store=http://192.0.2.53:2379，http://192.0.2.54:2379,http://192.0.2.55:2379",
            "host-range",
            "--ip-start",
            "192.0.2.54/24",
            "--ip-end",
            "192.0.2.58/24",
            "--gateway",
            "192.0.2.1",
        ])
        .unwrap();
        assert_eq!(g.endpoints.len(), 3);
        assert_eq!(g.endpoints[1], "http://192.0.2.54:2379");
        assert!(matches!(c, Command::HostRange { .. }));
        let (g, c) = run(&[
            "--debug=true",
            "--cluster-store=http://localhost:2379",
            "server",
        ])
        .unwrap();
        assert!(g.debug);
        assert_eq!(
            c,
            Command::Server {
                socket: DEFAULT_SOCKET.into()
            }
        );
    }

    #[test]
    fn environment_stands_in_for_flags() {
        let env = [("CLUSTER_STORE", "http://127.0.0.1:1"), ("DEBUG", "1")];
        let (g, _) = run_with(&["server"], &env, "").unwrap();
        assert_eq!(g.endpoints, vec!["http://127.0.0.1:1".to_string()]);
        assert!(g.debug);
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_the_settings_file() {
        let file = "CLUSTER_STORE=https://file:2379\nIPAM_STORE_PREFIX=/file\n\
                    IPAM_TIMEOUT=9\nIPAM_CACERT=/file/ca.pem\nIPAM_CERT=/file/c.pem\n\
                    IPAM_KEY=/file/k.pem\nIPAM_USER=fileuser\nIPAM_PASSWORD_FILE=/file/pw\n";
        let (g, _) = run_with(&["server"], &[], file).unwrap();
        assert_eq!(g.endpoints, ["https://file:2379"]);
        assert_eq!(g.store_prefix, "/file");
        assert_eq!(g.timeout, Duration::from_secs(9));
        assert_eq!(g.tls.cacert, Some("/file/ca.pem".into()));
        assert_eq!(g.tls.key, Some("/file/k.pem".into()));
        assert_eq!(g.user.as_deref(), Some("fileuser"));
        assert_eq!(g.password, Some(Password::File("/file/pw".into())));

        let env = [
            ("CLUSTER_STORE", "https://env:2379"),
            ("IPAM_TIMEOUT", "8"),
            ("IPAM_PASSWORD", "from-env"),
        ];
        let (g, _) = run_with(&["server"], &env, file).unwrap();
        assert_eq!(g.endpoints, ["https://env:2379"]);
        assert_eq!(g.timeout, Duration::from_secs(8));
        assert_eq!(g.store_prefix, "/file");
        assert_eq!(
            g.password,
            Some(Password::Given(Secret::new("from-env".into())))
        );

        let flags = [
            "--cluster-store",
            "https://flag:2379",
            "--timeout",
            "7",
            "--password-file",
            "/flag/pw",
            "server",
        ];
        let (g, _) = run_with(&flags, &env, file).unwrap();
        assert_eq!(g.endpoints, ["https://flag:2379"]);
        assert_eq!(g.timeout, Duration::from_secs(7));
        assert_eq!(g.password, Some(Password::File("/flag/pw".into())));

        // --help needs no settings file, even a broken one.
        let broken = |_: Option<&Path>| {
            Err(ConfigError {
                path: "/x".into(),
                reason: "unreadable".into(),
            })
        };
        let sources = Sources {
            env: &no_env,
            config: &broken,
        };
        let help = parse(["server".into(), "--help".into()], &sources).unwrap();
        assert_eq!(help.1, Command::Help(&SERVER_HELP));
        let err = parse(["server".into()], &sources).unwrap_err();
        assert_eq!(err.to_string(), "--config /x: unreadable");
    }

    #[test]
    fn a_refused_setting_says_where_it_came_from() {
        let err = run_with(&["server"], &[], "\nIPAM_TIMEOUT=soon\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --timeout \"soon\": expected a number of seconds above 0 and at most 3600 \
             (from IPAM_TIMEOUT in /etc/sysconfig/oam-docker-ipam line 2)"
        );
        let err = run_with(&["server"], &[("CLUSTER_STORE", "etcd:2379")], "").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid --cluster-store \"etcd:2379\"")
                && err
                    .to_string()
                    .ends_with("(from CLUSTER_STORE in the environment)"),
            "{err}"
        );
    }

    #[test]
    fn tls_and_user_settings_come_in_pairs_and_the_password_never_from_argv() {
        let err = run(&["--cert", "/c.pem", "server"]).unwrap_err();
        assert!(err.to_string().starts_with("--cert needs --key"), "{err}");
        let err = run(&["--key", "/k.pem", "server"]).unwrap_err();
        assert!(err.to_string().starts_with("--key needs --cert"), "{err}");
        let err = run(&["--user", "ipam", "server"]).unwrap_err();
        assert!(
            err.to_string().starts_with("--user needs a password"),
            "{err}"
        );
        let err = run(&["--password-file", "/pw", "server"]).unwrap_err();
        assert!(
            err.to_string().starts_with("a password needs --user"),
            "{err}"
        );
        for args in [
            &["--password", "s3cret", "server"][..],
            &["--password=s3cret", "server"],
            &["-password=s3cret", "server"],
        ] {
            let err = run(args).unwrap_err().to_string();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.contains("not taken from the command line"), "{err}");
        }
        let (g, _) = run_with(
            &["--user", "ipam", "server"],
            &[],
            "IPAM_PASSWORD=in-a-world-readable-file\nIPAM_PASSWORD_FILE=/pw\n",
        )
        .unwrap();
        assert_eq!(g.password, Some(Password::File("/pw".into())));
        assert!(
            g.warnings
                .iter()
                .any(|w| w.starts_with("ignoring IPAM_PASSWORD in")),
            "{:?}",
            g.warnings
        );
        assert!(!format!("{g:?}").contains("in-a-world-readable-file"));
    }

    #[test]
    fn refuses_bad_command_lines() {
        let bad: &[&[&str]] = &[
            &[],
            &["frobnicate"],
            &["ip-range", "--ip-start", "192.0.2.1/24"],
            &[
                "ip-range",
                "--ip-start",
                "192.0.2.1/24",
                "--ip-end",
                "192.0.2.9/25",
            ],
            &[
                "ip-range",
                "--ip-start",
                "192.0.2.1/24",
                "--ip-end",
                "192.0.2.9/24",
                "extra",
            ],
            &["release-ip", "--ip", "192.0.2.0/24"],
            &["release-host", "--ip", "fe80::1"],
            &["--cluster-store", "127.0.0.1:2379", "server"],
            &["--cluster-store", "http://127.0.0.1:abc", "server"],
            &["--cluster-store", "http://127.0.0.1:99999", "server"],
            &["--cluster-store", "http://127.0.0.1:0", "server"],
            &["--cluster-store", "http://[::1", "server"],
            &["--timeout", "0", "server"],
            &["--store-prefix", "talkingdata", "server"],
            &["create-network", "--mtu", "9"],
            &["create-network", "--bridge", "a/b"],
            &["server", "--bogus"],
            &["--host-id", "a b", "server"],
            &["--host-id", "", "server"],
            &["show", "192.0.2.0/24", "198.51.100.0/24"],
            &["show", "mynet"],
            &["show", "--ip", "192.0.2.5/24"],
            &["check", "extra"],
            &["reconcile", "--force"],
            &[
                "host-range",
                "--ip-start",
                "192.0.2.10/24",
                "--ip-end",
                "192.0.2.20/24",
                "--force",
                "--remove",
            ],
            &["release-ip", "--ip", "192.0.2.5/24", "--force=yes"],
        ];
        for args in bad {
            let err = run(args).expect_err(&format!("{args:?} was accepted"));
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn reads_the_original_cli_librarys_spellings() {
        let (g, c) = run(&[
            "-cluster-store=http://192.0.2.53:2379",
            "-debug",
            "ip-range",
            "-ip-start",
            "192.0.2.100/24",
            "-ip-end=192.0.2.200/24",
        ])
        .unwrap();
        assert_eq!(g.endpoints, ["http://192.0.2.53:2379"]);
        assert!(g.debug);
        assert!(matches!(c, Command::IpRange { .. }));
        assert_eq!(run(&["-v"]).unwrap().1, Command::Version);
        assert_eq!(run(&["-version"]).unwrap().1, Command::Version);
        assert_eq!(run(&["h"]).unwrap().1, Command::Help(&HELP));
        assert_eq!(
            run(&["help", "ip-range"]).unwrap().1,
            Command::Help(&IP_RANGE_HELP)
        );
        assert_eq!(
            run(&["h", "migrate-v2"]).unwrap().1,
            Command::Help(&MIGRATE_V2_HELP)
        );
        assert!(run(&["help", "frobnicate"]).is_err());
        assert_eq!(
            run(&["release-host", "-ip", "192.0.2.54/24"]).unwrap().1,
            Command::ReleaseHost {
                addr: "192.0.2.54".parse().unwrap(),
                prefix_len: Some(24),
                force: false
            }
        );
        assert_eq!(
            run(&["migrate-v2", "-dry-run"]).unwrap().1,
            Command::MigrateV2 { dry_run: true }
        );
        // A short flag cluster that happens to spell nothing known stays as lexopt reads it.
        assert!(run(&["-xyz", "server"]).is_err());
    }

    #[test]
    fn an_unreadable_debug_in_the_environment_is_a_warning() {
        let (g, c) = run_with(&["server"], &[("DEBUG", "verbose")], "").unwrap();
        assert!(!g.debug);
        assert_eq!(
            g.warnings,
            ["ignoring DEBUG=\"verbose\" from DEBUG in the environment: expected true or false"]
        );
        assert!(matches!(c, Command::Server { .. }));
        assert!(run(&["--debug=verbose", "server"]).is_err());
    }

    #[test]
    fn credentials_in_endpoint_urls_are_refused_and_never_echoed() {
        let err = run(&[
            "--cluster-store",
            "http://root:s3cret@127.0.0.1:2379",
            "server",
        ])
        .expect_err("accepted a URL with credentials");
        let said = err.to_string();
        assert!(!said.contains("s3cret") && !said.contains("root"), "{said}");
        assert!(
            said.contains("credentials do not belong in the URL"),
            "{said}"
        );
        let ok = parse_endpoints("https://[::1]:2379,http://etcd1:2379/,http://etcd2").unwrap();
        assert_eq!(
            ok,
            ["https://[::1]:2379", "http://etcd1:2379", "http://etcd2"]
        );
    }

    #[test]
    fn reads_the_day_2_commands() {
        let (g, c) = run(&["--host-id", "rack1-h7", "show", "--json", "192.0.2.5/24"]).unwrap();
        assert_eq!(g.host_id.as_deref(), Some("rack1-h7"));
        assert_eq!(
            c,
            Command::Show(ShowFlags {
                json: true,
                ip: None,
                pool: Some(PoolName::Containers("192.0.2.0".parse().unwrap(), Some(24)))
            })
        );
        assert_eq!(
            run(&["show", "--ip", "192.0.2.5", "hosts"]).unwrap().1,
            Command::Show(ShowFlags {
                json: false,
                ip: Some("192.0.2.5".parse().unwrap()),
                pool: Some(PoolName::Hosts)
            })
        );
        assert_eq!(
            run(&["check", "-json"]).unwrap().1,
            Command::Check { json: true }
        );
        assert_eq!(
            run(&["reconcile", "--apply"]).unwrap().1,
            Command::Reconcile { apply: true }
        );
        let remove = [
            "ip-range",
            "--ip-start",
            "192.0.2.100/24",
            "--ip-end",
            "192.0.2.110/24",
            "--remove",
        ];
        assert!(matches!(
            run(&remove).unwrap().1,
            Command::RemoveIpRange { .. }
        ));
        let (_, c) = run(&[
            "host-range",
            "--ip-start",
            "192.0.2.10/24",
            "--ip-end",
            "192.0.2.20/24",
            "--remove",
        ])
        .unwrap();
        assert!(matches!(c, Command::RemoveHostRange { gateway: None, .. }));
        assert!(matches!(
            run(&["release-ip", "--ip", "192.0.2.5/24", "--force"])
                .unwrap()
                .1,
            Command::ReleaseIp { force: true, .. }
        ));
    }

    #[test]
    fn help_anywhere() {
        assert_eq!(run(&["--help"]).unwrap().1, Command::Help(&HELP));
        assert_eq!(
            run(&["ip-range", "--help"]).unwrap().1,
            Command::Help(&IP_RANGE_HELP)
        );
        assert_eq!(run(&["-V"]).unwrap().1, Command::Version);
    }

    /// Every long flag: the global ones and each command's.
    fn every_flag() -> Vec<&'static str> {
        let mut all: Vec<&str> = GLOBAL_FLAGS.to_vec();
        for (_, help) in COMMANDS {
            all.extend(help.flags.iter().map(|flag| flag.name));
        }
        all.sort_unstable();
        all.dedup();
        all
    }

    #[test]
    fn each_command_takes_exactly_the_flags_its_help_lists() {
        use lexopt::Error::{MissingValue, UnexpectedOption};
        for (command, help) in COMMANDS {
            assert_eq!(
                run(&[command, "--help"]).unwrap().1,
                Command::Help(help),
                "{command}"
            );
            for name in every_flag().into_iter().filter(|name| *name != "help") {
                let flag = format!("--{name}");
                let listed = help.flags.iter().find(|f| f.name == name);
                match (listed, run(&[command, &flag])) {
                    (
                        Some(Flag { value: Some(_), .. }),
                        Err(UsageError::Parse(MissingValue { .. })),
                    ) => {}
                    // A switch: it leaves the --help after it to be read as such.
                    (Some(Flag { value: None, .. }), _) => assert_eq!(
                        run(&[command, &flag, "--help"]).unwrap().1,
                        Command::Help(help),
                        "{command} {flag}"
                    ),
                    (None, Err(UsageError::Parse(UnexpectedOption(_)))) => {}
                    (listed, other) => {
                        panic!("{command} {flag}: listed as {listed:?}, parsed as {other:?}")
                    }
                }
                assert_eq!(
                    format!("{:?}", run(&[command, &format!("-{name}")])),
                    format!("{:?}", run(&[command, &flag])),
                    "{command} -{name}"
                );
            }
        }
    }

    #[test]
    fn every_global_flag_the_help_lists_may_be_written_with_one_dash() {
        let listed = HELP
            .text
            .lines()
            .filter(|line| line.starts_with("  -"))
            .flat_map(|row| row.split_whitespace().take_while(|w| w.starts_with('-')))
            .filter_map(|flag| flag.trim_end_matches(',').strip_prefix("--"));
        for name in listed {
            assert!(
                GLOBAL_FLAGS.contains(&name),
                "--{name} is not in GLOBAL_FLAGS"
            );
        }
    }

    #[test]
    fn a_command_flag_mistake_is_named_on_one_line() {
        let said = |args: &[&str]| run(args).unwrap_err().to_string();
        assert_eq!(said(&["server", "--bogus"]), "invalid option '--bogus'");
        assert_eq!(said(&["server", "-x"]), "invalid option '-x'");
        // Another command's flag.
        assert_eq!(said(&["check", "--apply"]), "invalid option '--apply'");
        assert_eq!(said(&["reconcile", "--json"]), "invalid option '--json'");
        assert_eq!(
            said(&["server", "--ip", "192.0.2.1"]),
            "invalid option '--ip'"
        );
        assert_eq!(
            said(&["ip-range", "--ip-start"]),
            "missing argument for option '--ip-start'"
        );
        assert_eq!(
            said(&["create-network", "--mtu"]),
            "missing argument for option '--mtu'"
        );
        assert_eq!(
            said(&["migrate-v2", "--dry-run=yes"]),
            "unexpected argument for option '--dry-run': \"yes\""
        );
        assert_eq!(said(&["check", "extra"]), "unexpected argument \"extra\"");
        assert_eq!(
            said(&["ip-range", "--ip-end", "192.0.2.9/24"]),
            "ip-range needs --ip-start"
        );
        let range = ["--ip-start", "192.0.2.1/24", "--ip-end", "192.0.2.9/24"];
        assert_eq!(
            said(&[&["host-range"][..], &range].concat()),
            "host-range needs --gateway"
        );
        assert_eq!(
            said(&["create-network", "--mtu", "9"]),
            "invalid --mtu \"9\": expected a number from 68 to 65535"
        );
        // --help wins over a value that would be refused, not over a flag that cannot be read.
        assert_eq!(
            run(&["create-network", "--mtu", "9", "--help"]).unwrap().1,
            Command::Help(&CREATE_NETWORK_HELP)
        );
        assert_eq!(
            said(&["server", "--help", "--bogus"]),
            "invalid option '--bogus'"
        );
    }

    #[test]
    fn the_last_of_a_repeated_flag_counts() {
        let (_, c) = run(&[
            "create-network",
            "--mtu",
            "9",
            "--name=a",
            "--force",
            "--mtu",
            "9000",
            "-name",
            "b",
            "--force",
        ])
        .unwrap();
        let Command::CreateNetwork(flags) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            (flags.mtu, flags.name.as_str(), flags.force),
            (9000, "b", true)
        );
        assert_eq!(
            run(&["server", "--socket", "/a.sock", "--socket=/b.sock"])
                .unwrap()
                .1,
            Command::Server {
                socket: "/b.sock".into()
            }
        );
        let (_, c) = run(&[
            "ip-range",
            "--ip-start",
            "bad",
            "--ip-end",
            "192.0.2.9/24",
            "--ip-start",
            "192.0.2.1/24",
        ])
        .unwrap();
        assert!(matches!(c, Command::IpRange { .. }), "{c:?}");
    }

    #[test]
    fn help_lists_flags_in_one_column_after_the_text() {
        static SAMPLE: Help = Help {
            text: "Usage: x\n",
            flags: &[
                Flag::value("long-name", "VALUE", "first\nsecond"),
                Flag::switch("on", "a switch"),
            ],
        };
        assert_eq!(
            SAMPLE.to_string(),
            "Usage: x\n\nFlags:\n  --long-name VALUE  first\n                     second\n  \
             --on               a switch\n"
        );
        assert_eq!(HELP_HELP.to_string(), HELP_HELP.text);
    }
}
