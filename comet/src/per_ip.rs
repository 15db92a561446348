//! Limits per client address: at most so many connections (`max_connections_per_ip`), so one
//! host cannot take every slot, and at most so many new ones a second
//! (`handshakes_per_ip_per_sec`), so one host cannot keep logic busy authenticating. Both
//! off (0) by default: many users behind one NAT share an address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Default)]
pub struct PerIp {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of its address's count, given back when dropped.
#[derive(Debug)]
pub struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub fn new(max: usize) -> Arc<PerIp> {
        Arc::new(PerIp {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`; `Ok(None)` when there is no limit, `Err(())` when
    /// `ip` holds `max` already.
    #[allow(clippy::result_unit_err)]
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Option<IpSlot>, ()> {
        if self.max == 0 {
            return Ok(None);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return Err(());
        }
        *n += 1;
        Ok(Some(IpSlot {
            owner: self.clone(),
            ip,
        }))
    }

    /// Addresses holding connections now.
    pub fn addresses(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Addresses remembered at most; beyond, full buckets are forgotten first, then all.
const MAX_TRACKED: usize = 100_000;

/// A token bucket of new connections per address.
#[derive(Debug)]
pub struct HandshakeRate {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl HandshakeRate {
    pub fn new(per_sec: u32, burst: u32) -> HandshakeRate {
        HandshakeRate {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a new connection from `ip` may proceed now (always, with no limit).
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() >= MAX_TRACKED && !b.contains_key(&ip) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            b.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * per_sec < burst);
            if b.len() >= MAX_TRACKED {
                b.clear();
            }
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_per_address_per_second() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let r = HandshakeRate::new(2, 3);
        assert!((0..3).all(|_| r.allow(a, t0)));
        assert!(!r.allow(a, t0), "burst spent");
        assert!(r.allow(b, t0), "another address has its own bucket");
        assert!(!r.allow(a, t0 + std::time::Duration::from_millis(400)));
        assert!(
            r.allow(a, t0 + std::time::Duration::from_millis(600)),
            "refilled at 2/s"
        );
        let off = HandshakeRate::new(0, 0);
        assert!((0..1000).all(|_| off.allow(a, t0)));
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn counts_per_address_and_forgets_empty_ones() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p = PerIp::new(2);
        let one = p.take(a).unwrap();
        let two = p.take(a).unwrap();
        assert!(p.take(a).is_err());
        let other = p.take(b).unwrap();
        drop(one);
        let three = p.take(a).unwrap();
        drop((two, three, other));
        assert_eq!(p.addresses(), 0);
        assert!(PerIp::new(0).take(a).unwrap().is_none());
    }
}
