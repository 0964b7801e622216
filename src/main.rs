//! oam-docker-ipam: a Docker remote IPAM plugin whose address pools live in etcd, and the
//! command line that defines those pools. This file only dispatches and reports errors.

use oam_docker_ipam::{cli, commands, logging};

use std::process::ExitCode;

fn main() -> ExitCode {
    let parsed = cli::parse(std::env::args_os().skip(1), &cli::Sources::system());
    let (global, command) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            logging::fatal(&e);
            return ExitCode::from(2);
        }
    };
    logging::init(global.debug);
    match commands::run(&global, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::fatal(&e);
            ExitCode::from(e.exit_code())
        }
    }
}
