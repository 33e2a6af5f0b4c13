//! Connection admission shared by every kvferry server: the metadata
//! listener, the metadata server, the TCP target and the CLI's rendezvous.
//!
//! A server counts the connections it serves in all and per *source*; past
//! either cap it refuses the newcomer at once instead of queueing it, so a
//! single host cannot take every slot. What counts as one source is decided
//! here, once, by [`source_of`]:
//!
//! - an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack
//!   socket reports) is the IPv4 host it maps, so one host cannot double its
//!   share by connecting over both families;
//! - an IPv6 address counts by its /64 network, because one host is
//!   normally handed a whole /64 and can pick any of its 2^64 addresses;
//! - an IPv4 address counts alone. Every `127.x.y.z` is a distinct source on
//!   purpose: loopback aliases are how tests and containers tell local
//!   clients apart, and anyone who can use them already runs on the host.
//!
//! The gate is taken once per connection (accept and close), never per byte.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use parking_lot::Mutex;

/// The source a connection from `ip` counts against (see the module doc).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `in_flight` connections are served already (the total cap).
    Busy {
        /// Connections held when this one came.
        in_flight: usize,
    },
    /// `in_flight` connections from `source` are served already (the per-source cap).
    SourceBusy {
        /// The source as [`source_of`] counts it.
        source: IpAddr,
        /// Connections that source held when this one came.
        in_flight: usize,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Busy { in_flight } => {
                write!(f, "busy, {in_flight} connections in flight (the most it serves at once); retry shortly")
            }
            Refusal::SourceBusy { source, in_flight } => {
                write!(f, "{in_flight} connections from {source} in flight already; finish those first")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Counts admitted connections against a total and a per-source cap.
/// Cloning shares the counts.
#[derive(Clone, Debug)]
pub struct ConnGate {
    counts: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_source: usize,
}

impl ConnGate {
    /// A gate admitting at most `max_total` connections at once, and at
    /// most `max_per_source` from one source.
    pub fn new(max_total: usize, max_per_source: usize) -> ConnGate {
        ConnGate { counts: Arc::default(), max_total, max_per_source }
    }

    /// Takes a place for a connection from `ip`, or says which cap is full.
    /// The place is given back when the returned slot is dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let source = source_of(ip);
        let mut c = self.counts.lock();
        if c.total >= self.max_total {
            return Err(Refusal::Busy { in_flight: c.total });
        }
        let n = c.per_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            let in_flight = *n;
            return Err(Refusal::SourceBusy { source, in_flight });
        }
        *n += 1;
        c.total += 1;
        Ok(ConnSlot { counts: self.counts.clone(), source })
    }

    /// Connections admitted and not yet released.
    pub fn in_flight(&self) -> usize {
        self.counts.lock().total
    }
}

/// One admitted connection's place in a [`ConnGate`]; dropping it frees it.
#[derive(Debug)]
pub struct ConnSlot {
    counts: Arc<Mutex<Counts>>,
    source: IpAddr,
}

impl ConnSlot {
    /// The source this connection counts against.
    pub fn source(&self) -> IpAddr {
        self.source
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total -= 1;
        if let Some(n) = c.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_group_mapped_v4_and_v6_by_64() {
        assert_eq!(source_of(ip("10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(source_of(ip("::ffff:10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_of(ip("2001:db8:1:2:ffff:1:2:3")), source_of(ip("2001:db8:1:2::9")));
        assert_ne!(source_of(ip("2001:db8:1:3::1")), source_of(ip("2001:db8:1:2::1")));
        assert_ne!(source_of(ip("127.0.0.2")), source_of(ip("127.0.0.1")));
        assert_eq!(source_of(ip("::1")), ip("::"));
    }

    #[test]
    fn caps_refuse_and_dropping_a_slot_frees_it() {
        let g = ConnGate::new(3, 2);
        let a1 = g.admit(ip("10.0.0.1")).unwrap();
        let _a2 = g.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(g.admit(ip("10.0.0.1")).unwrap_err(), Refusal::SourceBusy { source: ip("10.0.0.1"), in_flight: 2 });
        let _b = g.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(g.admit(ip("10.0.0.3")).unwrap_err(), Refusal::Busy { in_flight: 3 });
        drop(a1);
        assert_eq!(g.in_flight(), 2);
        let _a3 = g.admit(ip("10.0.0.1")).unwrap();
        assert!(g.admit(ip("10.0.0.4")).unwrap_err().to_string().contains("busy"));
    }
}
