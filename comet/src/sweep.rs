//! Presence converges to what the comet holds: every so often the comet walks the presence
//! keys on its own lease and removes those no live connection backs (a Disconnect that could
//! not be delivered, a handshake that timed out after logic stored it, a connection that left
//! while its presence was being re-put under a new lease). What the comet holds is the truth.
//!
//! A key is removed only if it was already there at the previous sweep, so a connection whose
//! handshake is still under way is never swept; and only if it is unchanged since it was read
//! and still on this comet's lease, so a reconnect racing the sweep keeps its presence.
//! Cost: one paged, keys-only read of the cluster's presence per sweep (1,000 keys a page).

use goim_discovery::etcd_client::{Compare, CompareOp, Error, GetOptions, Txn, TxnOp};
use goim_discovery::keys::prefix_end;
use goim_discovery::{Client, Keys};

use crate::server::Comet;

const PAGE: i64 = 1000;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// The etcd revision the sweep read at: the next sweep removes only keys older than it.
    pub revision: i64,
    /// Presence keys removed.
    pub removed: u64,
}

/// Removes the presence on `lease` last written at or before `older_than` that `comet` does
/// not back with a live connection.
pub async fn sweep(
    client: &Client,
    keys: &Keys,
    comet: &Comet,
    lease: i64,
    older_than: i64,
) -> Result<Swept, Error> {
    let mut swept = Swept::default();
    let key_prefix = keys.online_keys();
    let mid_prefix = keys.online_mids();
    for prefix in [&key_prefix, &mid_prefix] {
        let end = prefix_end(prefix);
        let mut start = prefix.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_keys_only();
            if swept.revision != 0 {
                opts = opts.with_revision(swept.revision);
            }
            let page = client.clone().get(start.clone(), Some(opts)).await?;
            if swept.revision == 0 {
                swept.revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                if kv.lease() != lease || kv.mod_revision() > older_than {
                    continue;
                }
                let Ok(path) = std::str::from_utf8(kv.key()) else {
                    continue;
                };
                let backed = if prefix == &key_prefix {
                    path.strip_prefix(key_prefix.as_str())
                        .is_some_and(|key| comet.holds(key, None))
                } else {
                    // online/mid/{mid}/{key}
                    path.strip_prefix(mid_prefix.as_str())
                        .and_then(|rest| rest.split_once('/'))
                        .and_then(|(mid, key)| Some((mid.parse::<i64>().ok()?, key)))
                        .is_none_or(|(mid, key)| comet.holds(key, Some(mid)))
                };
                if backed {
                    continue;
                }
                let guarded = Txn::new()
                    .when([
                        Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision()),
                        Compare::lease(kv.key(), CompareOp::Equal, lease),
                    ])
                    .and_then([TxnOp::delete(kv.key(), None)]);
                if client.clone().txn(guarded).await?.succeeded() {
                    swept.removed += 1;
                    tracing::debug!(key = path, "removed presence no connection backs");
                }
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
    }
    Ok(swept)
}
