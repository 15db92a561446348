//! goim comet: holds client connections (goim's protocol over TCP and WebSocket), authenticates
//! them through logic and pushes to them.

pub mod bucket;
pub mod channel;

mod conn;
pub mod connection;
pub mod handler;
pub mod metrics;
pub mod per_ip;
pub mod proxy;
pub mod registry;
pub mod room_watch;
pub mod rooms;
pub mod server;
pub mod sweep;
pub mod ws;

pub use connection::Transport;
pub use goim_config::CometConfig;
pub use metrics::CometMetrics;
pub use server::{listen, Comet, Load};
