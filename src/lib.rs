//! oam-docker-ipam as a library: the modules behind the binary, also used by its benchmark.

pub mod addr;
pub mod alloc;
pub mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod etcd;
pub mod host;
pub mod http;
pub mod inspect;
pub mod ipam;
pub mod kv;
pub mod layout;
pub mod logging;
pub mod migrate;
pub mod network;
pub mod pools;
pub mod reconcile;
pub mod resolver;
pub mod server;
pub mod shrink;
pub mod tls;
