//! The embedded metadata server's store, without HTTP, tokio or clocks of
//! its own (time comes in as `now`): keys and values, leases that own the
//! keys written under them, listings and deletes by prefix, and the event
//! log that watchers page through. Every change bumps the revision.
//!
//! The rules: a key written under a live lease can be overwritten or
//! deleted only by a request that presents that lease; a prefix delete
//! removes only the keys of the lease presented (without one: only unleased
//! keys), and never the empty prefix; a lease that is not kept alive within
//! its TTL is dropped with its keys. Refusals are [`StoreError`]s; the HTTP
//! layer maps them to status codes in one place.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A lease id: 128 random bits, the capability over the lease's keys.
pub(crate) type LeaseId = u128;

/// Events kept for watchers that fall behind.
const EVENT_LOG: usize = 16 * 1024;

/// Bytes a key costs in the total-bytes budget beyond its key and value
/// (the map entry, the lease's key set).
const ENTRY_OVERHEAD: usize = 64;

/// Formats a lease id as the 32 hex digits clients see.
pub(crate) fn lease_text(id: LeaseId) -> String {
    format!("{id:032x}")
}

/// The bounds of the store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most keys stored at once.
    pub(crate) max_keys: usize,
    /// Most bytes stored at once (keys, values and [`ENTRY_OVERHEAD`] a key).
    pub(crate) max_bytes: usize,
    /// Most live leases.
    pub(crate) max_leases: usize,
}

/// Why the store refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreError {
    /// The lease presented does not exist (expired, revoked, or the server restarted).
    LeaseGone(LeaseId),
    /// A write to a key another lease owns.
    OwnedPut(String),
    /// A delete of a key a lease owns, without that lease.
    OwnedDelete(String),
    /// The store holds `max_keys` keys.
    TooManyKeys(usize),
    /// The value would take the store to `.0` bytes, over `max_bytes` (`.1`).
    TooManyBytes(usize, usize),
    /// The store holds `max_leases` leases.
    TooManyLeases(usize),
    /// A delete of the empty prefix (every key).
    EmptyPrefix,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let owned = crate::metadata::http_common::OWNED;
        match self {
            StoreError::LeaseGone(id) => {
                write!(f, "lease {} does not exist (expired, revoked, or the server restarted)", lease_text(*id))
            }
            StoreError::OwnedPut(key) => write!(
                f,
                "key '{key}' {owned}; only a request with that lease may change it (wait for it to expire, or use another name)"
            ),
            StoreError::OwnedDelete(key) => {
                write!(f, "key '{key}' {owned}; delete it with ?lease=<that lease>, or revoke the lease")
            }
            StoreError::TooManyKeys(max) => {
                write!(f, "the store holds its maximum of {max} keys (max_keys); delete some or raise --max-keys")
            }
            StoreError::TooManyBytes(bytes, max) => write!(
                f,
                "storing this value would take the store to {bytes} bytes, over its max_bytes of {max}; delete some keys or raise --max-bytes"
            ),
            StoreError::TooManyLeases(max) => {
                write!(f, "the server holds its maximum of {max} leases (max_leases); revoke some")
            }
            StoreError::EmptyPrefix => f.write_str("deleting the empty prefix (every key) is refused; name a prefix"),
        }
    }
}

#[derive(Debug)]
struct Entry {
    value: Bytes,
    lease: Option<LeaseId>,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

/// One change, as the event log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// The revision the change made.
    pub(crate) rev: u64,
    /// A put (else a delete).
    pub(crate) put: bool,
    /// The key changed.
    pub(crate) key: String,
}

/// One key of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    /// The key.
    pub(crate) key: String,
    /// Bytes of its value.
    pub(crate) len: usize,
    /// Whether a lease owns it.
    pub(crate) leased: bool,
}

/// A page of the event log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EventPage<'a> {
    /// Events up to here were looked at: ask again from here.
    pub(crate) revision: u64,
    /// Events after the asked-for revision were dropped from the log.
    pub(crate) compacted: bool,
    /// The events of the prefix, oldest first.
    pub(crate) events: Vec<&'a Event>,
}

/// The store.
#[derive(Debug)]
pub(crate) struct State {
    limits: Limits,
    kv: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    rev: u64,
    events: VecDeque<Event>,
    /// Bytes charged to `max_bytes`.
    bytes: usize,
}

fn cost(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl State {
    /// An empty store within `limits`.
    pub(crate) fn new(limits: Limits) -> State {
        State { limits, kv: BTreeMap::new(), leases: HashMap::new(), rev: 0, events: VecDeque::new(), bytes: 0 }
    }

    /// The revision: the number of changes so far.
    pub(crate) fn rev(&self) -> u64 {
        self.rev
    }

    /// Keys stored.
    pub(crate) fn len(&self) -> usize {
        self.kv.len()
    }

    /// Bytes charged to `max_bytes`.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Live leases.
    pub(crate) fn leases(&self) -> usize {
        self.leases.len()
    }

    /// The value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&Bytes> {
        self.kv.get(key).map(|e| &e.value)
    }

    /// Writes `key`, under `lease` if given (which must be live, and must be
    /// the key's owner if a lease owns it already); the new revision.
    pub(crate) fn put(&mut self, key: String, value: Bytes, lease: Option<LeaseId>) -> Result<u64, StoreError> {
        self.live_lease(lease)?;
        let old = self.kv.get(&key).map(|e| (e.lease, cost(&key, &e.value)));
        if let Some((Some(owner), _)) = old {
            if Some(owner) != lease {
                return Err(StoreError::OwnedPut(key));
            }
        }
        if old.is_none() && self.kv.len() >= self.limits.max_keys {
            return Err(StoreError::TooManyKeys(self.limits.max_keys));
        }
        let bytes = self.bytes - old.map_or(0, |(_, c)| c) + cost(&key, &value);
        if bytes > self.limits.max_bytes {
            return Err(StoreError::TooManyBytes(bytes, self.limits.max_bytes));
        }
        self.bytes = bytes;
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.clone());
        }
        self.record(true, &key);
        self.kv.insert(key, Entry { value, lease });
        Ok(self.rev)
    }

    /// Deletes `key` (a leased one only with its lease): how many keys went (0 or 1).
    pub(crate) fn delete(&mut self, key: &str, lease: Option<LeaseId>) -> Result<usize, StoreError> {
        if let Some(e) = self.kv.get(key) {
            if e.lease.is_some() && e.lease != lease {
                return Err(StoreError::OwnedDelete(key.to_string()));
            }
        }
        Ok(usize::from(self.remove(key)))
    }

    fn prefixed<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Entry)> + 'a {
        self.kv
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// How many keys start with `prefix`, counting at most `limit + 1`
    /// (enough to tell whether a listing is larger than `limit`).
    pub(crate) fn count_prefix(&self, prefix: &str, limit: usize) -> usize {
        self.prefixed(prefix).take(limit.saturating_add(1)).count()
    }

    /// The revision and the keys that start with `prefix`, in order.
    pub(crate) fn list(&self, prefix: &str) -> (u64, Vec<Listed>) {
        let keys = self
            .prefixed(prefix)
            .map(|(k, e)| Listed { key: k.clone(), len: e.value.len(), leased: e.lease.is_some() })
            .collect();
        (self.rev, keys)
    }

    /// Deletes the keys under `prefix` that `lease` owns (without a lease:
    /// the unleased ones); `(deleted, kept)`. The empty prefix is refused.
    pub(crate) fn delete_prefix(&mut self, prefix: &str, lease: Option<LeaseId>) -> Result<(usize, usize), StoreError> {
        if prefix.is_empty() {
            return Err(StoreError::EmptyPrefix);
        }
        self.live_lease(lease)?;
        let mut kept = 0;
        let mine: Vec<String> = self
            .prefixed(prefix)
            .filter_map(|(k, e)| {
                if e.lease == lease {
                    Some(k.clone())
                } else {
                    kept += 1;
                    None
                }
            })
            .collect();
        let n = mine.iter().filter(|k| self.remove(k)).count();
        Ok((n, kept))
    }

    /// Grants lease `id` (drawn by the caller) for `ttl` from `now`.
    pub(crate) fn grant(&mut self, id: LeaseId, ttl: Duration, now: Instant) -> Result<(), StoreError> {
        if self.leases.len() >= self.limits.max_leases {
            return Err(StoreError::TooManyLeases(self.limits.max_leases));
        }
        self.leases.insert(id, Lease { ttl, deadline: now + ttl, keys: HashSet::new() });
        Ok(())
    }

    /// Renews lease `id` for its TTL from `now`; the TTL.
    pub(crate) fn keepalive(&mut self, id: LeaseId, now: Instant) -> Result<Duration, StoreError> {
        let l = self.leases.get_mut(&id).ok_or(StoreError::LeaseGone(id))?;
        l.deadline = now + l.ttl;
        Ok(l.ttl)
    }

    /// Revokes lease `id` and deletes its keys: how many.
    pub(crate) fn revoke(&mut self, id: LeaseId) -> Result<usize, StoreError> {
        if !self.leases.contains_key(&id) {
            return Err(StoreError::LeaseGone(id));
        }
        Ok(self.drop_lease(id))
    }

    /// Drops the leases whose TTL ran out by `now`, with their keys: how many keys went.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let dead: Vec<LeaseId> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        dead.into_iter().map(|id| self.drop_lease(id)).sum()
    }

    /// The events of keys under `prefix` after revision `scanned` (events
    /// up to it held nothing for this prefix: each wake-up of a waiter looks
    /// only at what is new, found by binary search, the log being in
    /// revision order), at most `max` of them: a client far behind pages
    /// through the log from the returned revision. `compacted`: events after
    /// `since` were dropped from the log.
    pub(crate) fn events(&self, prefix: &str, since: u64, scanned: u64, max: usize) -> EventPage<'_> {
        let compacted = self.events.front().is_some_and(|e| e.rev > since + 1) && since > 0;
        let from = self.events.partition_point(|e| e.rev <= scanned);
        let mut events = Vec::new();
        let mut revision = self.rev;
        for e in self.events.range(from..).filter(|e| e.key.starts_with(prefix)) {
            if events.len() == max {
                revision = e.rev - 1;
                break;
            }
            events.push(e);
        }
        EventPage { revision, compacted, events }
    }

    fn live_lease(&self, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(StoreError::LeaseGone(id)),
            _ => Ok(()),
        }
    }

    fn record(&mut self, put: bool, key: &str) {
        self.rev += 1;
        if self.events.len() == EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(Event { rev: self.rev, put, key: key.to_string() });
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.kv.remove(key) {
            Some(e) => {
                self.bytes -= cost(key, &e.value);
                if let Some(l) = e.lease.and_then(|id| self.leases.get_mut(&id)) {
                    l.keys.remove(key);
                }
                self.record(false, key);
                true
            }
            None => false,
        }
    }

    fn drop_lease(&mut self, id: LeaseId) -> usize {
        let Some(l) = self.leases.remove(&id) else { return 0 };
        let mut n = 0;
        for k in l.keys {
            if self.kv.get(&k).is_some_and(|e| e.lease == Some(id)) {
                if let Some(e) = self.kv.remove(&k) {
                    self.bytes -= cost(&k, &e.value);
                    self.record(false, &k);
                    n += 1;
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> State {
        State::new(Limits { max_keys: 3, max_bytes: 1000, max_leases: 2 })
    }

    fn v(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn leases_own_their_keys() {
        let mut s = store();
        let now = Instant::now();
        s.grant(1, Duration::from_secs(1), now).unwrap();
        assert_eq!(s.put("a/x".into(), v("1"), Some(1)), Ok(1));
        // Another writer may not overwrite or delete a leased key.
        assert_eq!(s.put("a/x".into(), v("2"), None), Err(StoreError::OwnedPut("a/x".into())));
        assert_eq!(s.delete("a/x", None), Err(StoreError::OwnedDelete("a/x".into())));
        assert_eq!(s.put("a/x".into(), v("2"), Some(9)), Err(StoreError::LeaseGone(9)));
        assert_eq!(s.put("a/x".into(), v("3"), Some(1)), Ok(2), "its lease may");
        assert_eq!(s.get("a/x"), Some(&v("3")));
        assert_eq!(s.delete("nothing", None), Ok(0));
        // Keepalive moves the deadline; expiry drops the lease and its keys.
        assert_eq!(s.keepalive(1, now + Duration::from_millis(900)), Ok(Duration::from_secs(1)));
        assert_eq!(s.expire(now + Duration::from_millis(1500)), 0);
        assert_eq!(s.expire(now + Duration::from_secs(2)), 1);
        assert_eq!(s.get("a/x"), None);
        assert_eq!(s.keepalive(1, now), Err(StoreError::LeaseGone(1)));
        assert_eq!(s.revoke(1), Err(StoreError::LeaseGone(1)));
        assert_eq!((s.len(), s.bytes(), s.leases()), (0, 0, 0));
    }

    #[test]
    fn prefix_deletes_take_only_the_presented_leases_keys() {
        let mut s = store();
        let now = Instant::now();
        s.grant(1, Duration::from_secs(60), now).unwrap();
        s.put("p/a".into(), v("1"), Some(1)).unwrap();
        s.put("p/b".into(), v("2"), None).unwrap();
        s.put("q/c".into(), v("3"), Some(1)).unwrap();
        assert_eq!(s.delete_prefix("", Some(1)), Err(StoreError::EmptyPrefix));
        assert_eq!(s.delete_prefix("p/", Some(7)), Err(StoreError::LeaseGone(7)));
        assert_eq!(s.delete_prefix("p/", None), Ok((1, 1)), "only the unleased key");
        assert_eq!(s.delete_prefix("p/", Some(1)), Ok((1, 0)));
        assert_eq!(s.revoke(1), Ok(1), "q/c goes with its lease");
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn limits_are_held() {
        let mut s = store();
        for k in ["a", "b", "c"] {
            s.put(k.into(), v("x"), None).unwrap();
        }
        assert_eq!(s.put("d".into(), v("x"), None), Err(StoreError::TooManyKeys(3)));
        assert_eq!(s.put("a".into(), v("y"), None), Ok(4), "an overwrite is not a new key");
        let big = Bytes::from(vec![0u8; 1000]);
        assert!(matches!(s.put("a".into(), big, None), Err(StoreError::TooManyBytes(_, 1000))));
        let now = Instant::now();
        s.grant(1, Duration::from_secs(1), now).unwrap();
        s.grant(2, Duration::from_secs(1), now).unwrap();
        assert_eq!(s.grant(3, Duration::from_secs(1), now), Err(StoreError::TooManyLeases(2)));
        assert!(StoreError::TooManyLeases(2).to_string().contains("max_leases"));
    }

    #[test]
    fn listings_and_event_pages() {
        let mut s = State::new(Limits { max_keys: 100, max_bytes: 1 << 20, max_leases: 1 });
        s.put("k/1".into(), v("a"), None).unwrap();
        s.put("j/1".into(), v("bb"), None).unwrap();
        s.put("k/2".into(), v("ccc"), None).unwrap();
        s.delete("k/1", None).unwrap();
        let (rev, keys) = s.list("k/");
        assert_eq!(rev, 4);
        assert_eq!(keys, vec![Listed { key: "k/2".into(), len: 3, leased: false }]);
        assert_eq!(s.count_prefix("", 1), 2, "counts at most limit + 1");
        let page = s.events("k/", 0, 0, 2);
        let got: Vec<(u64, bool)> = page.events.iter().map(|e| (e.rev, e.put)).collect();
        assert_eq!(got, [(1, true), (3, true)]);
        assert_eq!(page.revision, 3, "a full page ends before the next event");
        let page = s.events("k/", 0, page.revision, 2);
        assert_eq!((page.events.len(), page.revision, page.compacted), (1, 4, false));
        assert!(s.events("x/", 0, 0, 2).events.is_empty());
    }
}
