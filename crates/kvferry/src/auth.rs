//! The shared secret that authenticates peers, one type for every port a
//! kvferry process opens: the TCP data port, the metadata listener, the
//! `serve` rendezvous port, the SHM control socket and the metadata server.
//!
//! A token is configured with `KVFERRY_AUTH_TOKEN` (or
//! [`AgentConfig::with_auth_token`](crate::AgentConfig::with_auth_token)).
//! It is compared in constant time, never printed (`Debug` shows only that a
//! token is set) and wiped from memory when dropped. What a token does and
//! does not protect against is written down in `docs/SECURITY.md`: it keeps
//! out whoever does not know it; it does not encrypt, so across an untrusted
//! network it must travel inside a tunnel or a private network.

use std::fmt;

use crate::error::{Error, Result};

/// The environment variable that holds the shared token.
pub const AUTH_TOKEN_ENV: &str = "KVFERRY_AUTH_TOKEN";

/// Longest token accepted, in bytes. Every wire format that carries one
/// bounds it by this.
pub const MAX_TOKEN_LEN: usize = 1024;

/// A shared secret. Cheap to clone; compared in constant time; redacted in
/// `Debug`; zeroed on drop.
#[derive(Clone)]
pub struct AuthToken {
    secret: Box<[u8]>,
}

impl AuthToken {
    /// A token from its text. Refuses an empty token (it would authenticate
    /// nobody and look like protection) and one over [`MAX_TOKEN_LEN`] bytes.
    pub fn new(secret: impl Into<String>) -> Result<Self> {
        let s: String = secret.into();
        if s.is_empty() {
            return Err(Error::invalid(format!(
                "an empty auth token protects nothing; unset {AUTH_TOKEN_ENV} to run without one"
            )));
        }
        if s.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(format!(
                "the auth token is {} bytes; use at most {MAX_TOKEN_LEN} (32 random bytes in hex are plenty)",
                s.len()
            )));
        }
        Ok(AuthToken { secret: s.into_bytes().into_boxed_slice() })
    }

    /// A token from configuration that cannot return an error (the
    /// environment read by `AgentConfig::from_env`): a token that
    /// [`new`](Self::new) refuses fails closed — it is kept, a warning is
    /// logged, and since no wire format carries it, no peer is admitted.
    pub(crate) fn from_config(secret: String) -> Self {
        match AuthToken::new(secret.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(reason = %e, "auth token refused: every peer will be refused until it is fixed");
                AuthToken { secret: secret.into_bytes().into_boxed_slice() }
            }
        }
    }

    /// Whether the token can travel on the wire (not empty, at most
    /// [`MAX_TOKEN_LEN`] bytes). A token that cannot admits no one.
    pub fn is_usable(&self) -> bool {
        !self.secret.is_empty() && self.secret.len() <= MAX_TOKEN_LEN
    }

    /// The token in `KVFERRY_AUTH_TOKEN`, if set and not blank.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(AUTH_TOKEN_ENV) {
            Ok(v) if !v.trim().is_empty() => AuthToken::new(v).map(Some),
            _ => Ok(None),
        }
    }

    /// The secret's bytes, to put on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.secret
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where the two differ (only on their lengths, which are not secret).
    pub fn verify(&self, presented: &[u8]) -> bool {
        self.is_usable() && constant_time_eq(&self.secret, presented)
    }

    /// The check every listener makes: with no token configured everyone
    /// is admitted; with one, only a peer that presents it.
    pub fn admits(expected: Option<&AuthToken>, presented: &[u8]) -> bool {
        expected.is_none_or(|t| t.verify(presented))
    }
}

/// Compares secrets without an early exit that would leak where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

impl PartialEq for AuthToken {
    fn eq(&self, other: &Self) -> bool {
        self.verify(&other.secret)
    }
}

impl Eq for AuthToken {}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl std::str::FromStr for AuthToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        AuthToken::new(s)
    }
}

impl Drop for AuthToken {
    fn drop(&mut self) {
        for b in self.secret.iter_mut() {
            // SAFETY: `b` is a valid, exclusive reference into our own buffer;
            // a volatile write keeps the wipe from being optimised away.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_and_redacts() {
        let t = AuthToken::new("s3cret").unwrap();
        assert!(t.verify(b"s3cret"));
        assert!(!t.verify(b"s3cres"));
        assert!(!t.verify(b"s3cret!"));
        assert!(!t.verify(b""));
        assert_eq!(format!("{t:?}"), "AuthToken(<redacted>)");
        assert!(!format!("{:?}", Some(t.clone())).contains("s3cret"));
        assert_eq!(t, AuthToken::new("s3cret").unwrap());
        assert_ne!(t, AuthToken::new("other").unwrap());
    }

    #[test]
    fn admits_everyone_without_a_token() {
        assert!(AuthToken::admits(None, b""));
        assert!(AuthToken::admits(None, b"anything"));
        let t = AuthToken::new("k").unwrap();
        assert!(AuthToken::admits(Some(&t), b"k"));
        assert!(!AuthToken::admits(Some(&t), b""));
    }

    #[test]
    fn refuses_empty_and_huge_tokens() {
        assert!(AuthToken::new("").is_err());
        assert!(AuthToken::new("x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert!(AuthToken::new("x".repeat(MAX_TOKEN_LEN)).is_ok());
    }
}
