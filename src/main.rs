//! oam-docker-ipam: a Docker remote IPAM plugin whose address pools live in etcd, and the
//! command line that defines those pools. This file only dispatches and reports errors.

use oam_docker_ipam::{cli, commands};

use std::process::ExitCode;

fn main() -> ExitCode {
    let parsed = cli::parse(std::env::args_os().skip(1), cli::env_defaults());
    let (global, command) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("oam-docker-ipam: {e}");
            return ExitCode::from(2);
        }
    };
    let level = if global.debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    // Our own debug lines only: the HTTP crates' are noise to an operator.
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("oam_docker_ipam", level)
        .format_target(false)
        .parse_env("RUST_LOG")
        .init();
    match commands::run(&global, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oam-docker-ipam: {e}");
            ExitCode::from(1)
        }
    }
}
