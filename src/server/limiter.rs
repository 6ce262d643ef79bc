//! Per-IP connection caps: concurrent connections and new connections per minute, keyed by
//! IPv4 address or IPv6 /64 (one host usually owns a whole /64). Decided at accept time, before
//! any byte is sent; over a cap the connection is closed without a greeting.
//!
//! The check-and-take is one critical section (never load-then-increment), and the table is
//! bounded: idle entries are pruned when it grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key a client is counted under.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default)]
struct Entry {
    open: u32,
    window_start: Option<Instant>,
    new_in_window: u32,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Concurrent,
    Rate,
}

impl Refused {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Concurrent => "per_ip_concurrent",
            Self::Rate => "per_ip_rate",
        }
    }
}

const WINDOW: Duration = Duration::from_secs(60);
const PRUNE_AT: usize = 65_536;

/// The per-IP table.
#[derive(Debug)]
pub struct Limiter {
    per_ip: u32,
    per_minute: u32,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

/// Held for the life of a connection; gives the slot back on drop.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<Limiter>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.limiter.table.lock() {
            if let Some(e) = t.get_mut(&self.key) {
                e.open = e.open.saturating_sub(1);
            }
        }
    }
}

impl Limiter {
    pub fn new(per_ip: u32, per_minute: u32) -> Arc<Self> {
        Arc::new(Self {
            per_ip,
            per_minute,
            table: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for `ip` at `now`, or says which cap refused it.
    ///
    /// # Errors
    /// [`Refused`] when over a cap.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Slot, Refused> {
        let key = ip_key(ip);
        let Ok(mut table) = self.table.lock() else {
            return Err(Refused::Concurrent);
        };
        if table.len() >= PRUNE_AT {
            table.retain(|_, e| {
                e.open > 0
                    || e.window_start
                        .is_some_and(|s| now.duration_since(s) < WINDOW)
            });
        }
        let e = table.entry(key).or_default();
        match e.window_start {
            Some(start) if now.duration_since(start) < WINDOW => {}
            _ => {
                e.window_start = Some(now);
                e.new_in_window = 0;
            }
        }
        if e.open >= self.per_ip {
            return Err(Refused::Concurrent);
        }
        if e.new_in_window >= self.per_minute {
            return Err(Refused::Rate);
        }
        e.open += 1;
        e.new_in_window += 1;
        Ok(Slot {
            limiter: self.clone(),
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_cap_and_release() {
        let l = Limiter::new(2, 100);
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = l.admit(ip, now).unwrap();
        let _b = l.admit(ip, now).unwrap();
        assert_eq!(l.admit(ip, now).unwrap_err(), Refused::Concurrent);
        assert!(l.admit("192.0.2.2".parse().unwrap(), now).is_ok());
        drop(a);
        assert!(l.admit(ip, now).is_ok());
    }

    #[test]
    fn rate_cap_per_minute() {
        let l = Limiter::new(100, 3);
        let t0 = Instant::now();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        for i in 0..3 {
            drop(l.admit(ip, t0 + Duration::from_secs(i)).unwrap());
        }
        // Another address in the same /64 is the same client.
        assert_eq!(
            l.admit(
                "2001:db8::ffff".parse().unwrap(),
                t0 + Duration::from_secs(5)
            )
            .unwrap_err(),
            Refused::Rate
        );
        assert!(l.admit(ip, t0 + Duration::from_secs(61)).is_ok());
        assert!(l.admit("2001:db8:0:1::1".parse().unwrap(), t0).is_ok());
    }

    #[test]
    fn mapped_v4_is_v4() {
        assert_eq!(
            ip_key("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}
