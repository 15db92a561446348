//! At most so many connections per client address (`max_connections_per_ip`), so one host
//! cannot take every slot. Off (0) by default: many users behind one NAT share an address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;

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
