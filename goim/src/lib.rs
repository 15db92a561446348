//! The `goim` binary's pieces: configuration, the command line and each mode's wiring.

pub mod cli;
pub mod config;
pub mod demo;
pub mod distributed;
pub mod standalone;
pub mod tls;
pub mod tools;
