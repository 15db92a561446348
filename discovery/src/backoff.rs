//! The one retry delay every loop in the tree uses: exponential with full jitter (so a fleet
//! of comets that lost etcd together does not come back in lockstep), capped, reset after a
//! success. The delays come from the `backon` crate; this adds the reset and a sleep that
//! gives up on shutdown.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`, each drawn with jitter, forever.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            delays: builder.build(),
        }
    }

    /// What the roles' etcd and accept loops use: 100 ms up to 2 s.
    pub fn standard() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(Duration::from_secs(1))
    }

    /// After a success: the next failure waits the minimum again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// Sleeps the next delay; `false` if `stop` fired first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut b = Backoff::new(min, max);
        let first: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        // Jitter adds up to one more delay on top of the exponential one.
        assert!(
            first.iter().all(|d| *d >= min && *d <= 2 * max),
            "{first:?}"
        );
        assert!(first[7] >= max, "{first:?}");
        b.reset();
        assert!(b.next_delay() <= 2 * min);
    }

    #[tokio::test]
    async fn wait_gives_up_on_stop() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!b.wait(&stop).await);
    }
}
