//! etcd's history, compacted. Every connect and disconnect is an etcd revision, and etcd keeps
//! every revision until it is compacted; Debian's etcd and many installs never compact by
//! themselves, so under churn its memory grows without bound (the soak: 137 → 944 MiB in
//! 30 minutes at 500 reconnects a second) until its backend quota refuses every write. Logic
//! compacts, as Kubernetes' API server does for its etcd: each period, to the revision it saw
//! one period earlier, so a watcher that falls behind still has at least a period of history
//! (and one that falls further lists again, as every watcher here does after a compaction).
//! Several logics compacting is harmless: a revision already compacted is refused, and that
//! refusal is expected.

use std::time::Duration;

use goim_discovery::etcd_client::{CompactionOptions, Error, GetOptions};
use goim_discovery::Client;
use tokio_util::sync::CancellationToken;

/// Every `every` until `stop`: compacts to the revision of the previous round (0: never).
pub async fn compact_loop(
    mut client: Client,
    probe: String,
    every: Duration,
    stop: CancellationToken,
) {
    if every.is_zero() {
        return;
    }
    let mut previous = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match step(&mut client, &probe, previous).await {
            Ok((now, compacted)) => {
                if let Some(rev) = compacted {
                    tracing::debug!(revision = rev, "etcd history compacted");
                }
                previous = Some(now);
            }
            Err(e) => tracing::warn!(error = %e, "etcd compaction failed; retried next period"),
        }
    }
}

/// One round: reads etcd's revision now (through a count-only read of `probe`) and compacts
/// to `previous`, if any. Returns the revision now and what was compacted to; a revision
/// another logic compacted already counts as done.
pub async fn step(
    client: &mut Client,
    probe: &str,
    previous: Option<i64>,
) -> Result<(i64, Option<i64>), Error> {
    let read = client
        .get(probe, Some(GetOptions::new().with_count_only()))
        .await?;
    let now = read.header().map_or(0, |h| h.revision());
    let Some(rev) = previous.filter(|&r| r > 0 && r <= now) else {
        return Ok((now, None));
    };
    match client
        .compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
    {
        Ok(_) => Ok((now, Some(rev))),
        Err(Error::GRpcStatus(s)) if s.message().contains("compacted") => Ok((now, None)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_testkit::Etcd;

    /// A round compacts to what the round before saw: history before it is gone, history
    /// from it on stays; a revision compacted already (by another logic) is not an error.
    #[tokio::test]
    async fn each_round_compacts_to_the_revision_the_round_before_saw() {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let mut client = goim_discovery::connect(&[etcd.endpoint()]).await.unwrap();
        let first = client.put("/c/k", "1", None).await.unwrap();
        let first = first.header().unwrap().revision();
        let (seen, compacted) = step(&mut client, "/c/", None).await.unwrap();
        assert_eq!((seen, compacted), (first, None));
        let second = client.put("/c/k", "2", None).await.unwrap();
        let second = second.header().unwrap().revision();
        client.put("/c/k", "3", None).await.unwrap();

        let (now, compacted) = step(&mut client, "/c/", Some(second)).await.unwrap();
        assert_eq!(compacted, Some(second));
        assert_eq!(now, second + 1);
        let old = client
            .get("/c/k", Some(GetOptions::new().with_revision(first)))
            .await;
        assert!(
            matches!(&old, Err(Error::GRpcStatus(s)) if s.message().contains("compacted")),
            "{old:?}"
        );
        let kept = client
            .get("/c/k", Some(GetOptions::new().with_revision(second)))
            .await
            .unwrap();
        assert_eq!(kept.kvs()[0].value(), b"2");

        // Another logic got there first: not an error, nothing compacted by this one.
        let (_, again) = step(&mut client, "/c/", Some(first)).await.unwrap();
        assert_eq!(again, None);
    }
}
