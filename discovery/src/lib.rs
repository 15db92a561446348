//! What every role shares about etcd: the key layout and record types, a lease kept alive (and
//! re-granted if it expires), and a watched prefix that survives etcd restarts and compactions.

pub mod keys;
pub mod lease;
pub mod watch;

pub use etcd_client;
pub use etcd_client::Client;
pub use keys::{CometRecord, CometState, JobRecord, Keys, LoadRecord, OnlineRecord};
pub use lease::LeaseHandle;
pub use watch::{Entry, WatchCache};

use std::time::Duration;

/// Connects to etcd. The channel is lazy: an unreachable etcd is an error on first use, not
/// here, so roles start and retry rather than crash.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    Client::connect(endpoints, Some(opts)).await
}

/// etcd's default limit of operations in one transaction.
pub const MAX_TXN_OPS: usize = 128;
