//! What an initiator knows of the regions of the owner at the other end
//! of one control connection: the keys the owner confirmed live, the
//! owner's memfd-backed regions mapped into this process (the mapped fast
//! path), the live ones left to cross-memory attach, and whether the link
//! is dead. Changed only by the link's reader thread (answers, revocations)
//! and when the link dies, always under the write lock, so that a copy
//! holding the read lock sees its keys and mappings stay put.

use std::collections::{HashMap, HashSet};

use super::mapping::Mapping;
use crate::types::AccessKey;

/// What an initiator knows of one connection's owner.
///
/// Invariant: `maps` and `cma_only` hold only keys that are in `live`; a
/// mapping is inserted once per key and removed only together with the key
/// (revocation) or when the link dies. So a copy that finds its keys live,
/// under the read lock, may use the mappings it looked up at prepare.
#[derive(Debug, Default)]
pub struct LinkState {
    /// Keys the owner confirmed live and has not revoked since.
    pub live: HashSet<AccessKey>,
    /// The owner's regions mapped into this process, by key.
    pub maps: HashMap<AccessKey, Mapping>,
    /// Live regions the owner cannot share (raw memory): cross-memory attach.
    pub cma_only: HashSet<AccessKey>,
    /// Why the link is unusable, once it is.
    pub dead: Option<String>,
}

impl LinkState {
    /// The keys of `keys` not confirmed live yet.
    pub(super) fn unknown(&self, keys: &[AccessKey]) -> Vec<AccessKey> {
        keys.iter().filter(|k| !self.live.contains(k)).copied().collect()
    }

    /// The keys of `keys` neither mapped nor known to be left to cross-memory attach.
    pub(super) fn unmapped(&self, keys: &[AccessKey]) -> Vec<AccessKey> {
        keys.iter().filter(|k| !self.maps.contains_key(k) && !self.cma_only.contains(k)).copied().collect()
    }

    /// A STATUS answer for `keys`: the ones the owner says are live are.
    pub(super) fn confirm(&mut self, keys: &[AccessKey], live: &[bool]) {
        for (k, _) in keys.iter().zip(live).filter(|(_, &l)| l) {
            self.live.insert(*k);
        }
    }

    /// `key` is live but stays on cross-memory attach (the owner cannot
    /// share it, or its memfd could not be mapped safely).
    pub(super) fn use_cma(&mut self, key: AccessKey) {
        self.live.insert(key);
        self.cma_only.insert(key);
    }

    /// `key` is live and mapped here. A mapping is never replaced (copies
    /// may be using it): a second one for the same key is dropped.
    pub(super) fn use_mapping(&mut self, key: AccessKey, m: Mapping) {
        self.live.insert(key);
        self.maps.entry(key).or_insert(m);
    }

    /// Forgets `key`; its mapping, if any, is returned for the caller to drop (unmap).
    pub(super) fn revoke(&mut self, key: &AccessKey) -> Option<Mapping> {
        self.live.remove(key);
        self.cma_only.remove(key);
        self.maps.remove(key)
    }

    /// The link died (the first reason wins): nothing is live any more; the
    /// mappings are returned for the caller to drop (unmap).
    pub(super) fn kill(&mut self, why: String) -> HashMap<AccessKey, Mapping> {
        if self.dead.is_none() {
            self.dead = Some(why);
        }
        self.live.clear();
        self.cma_only.clear();
        std::mem::take(&mut self.maps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_live_until_revoked_or_the_link_dies() {
        let (a, b, c) = (AccessKey([1; 16]), AccessKey([2; 16]), AccessKey([3; 16]));
        let mut st = LinkState::default();
        assert_eq!(st.unknown(&[a, b]), [a, b]);
        st.confirm(&[a, b], &[true, false]);
        assert_eq!(st.unknown(&[a, b]), [b]);
        st.use_cma(c);
        assert_eq!(st.unmapped(&[a, c]), [a], "c is known to stay on cross-memory attach");
        assert!(st.revoke(&c).is_none());
        assert!(!st.live.contains(&c) && !st.cma_only.contains(&c));
        assert!(st.kill("first".into()).is_empty());
        assert!(st.kill("second".into()).is_empty());
        assert_eq!(st.dead.as_deref(), Some("first"), "the first reason wins");
        assert!(st.live.is_empty());
    }
}
