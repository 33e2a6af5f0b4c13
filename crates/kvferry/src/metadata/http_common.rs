//! What the embedded metadata server and its HTTP client share: the
//! percent-coding of keys in URL paths, the size bound of a value, and the
//! words of the answer that tells a store's caller "another lease owns this
//! key". Both sides import this module; neither imports the other.

/// Default largest value the server accepts, in bytes (16 MiB); the client
/// reads answers up to this much (plus a little for the JSON around it).
pub const MAX_VALUE: usize = 16 << 20;

/// Part of the `NotAllowed` message of a store that refused to change a key
/// because another live lease owns it.
pub(crate) const OWNED: &str = "belongs to another live lease";

/// Percent-decodes a URL path segment; `None` on bad escapes or non-UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes a key for a URL path (keeps unreserved characters and `/`).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding_round_trips() {
        let k = "/kvferry/agents/a b%c/metadata";
        assert_eq!(percent_decode(&percent_encode(k)).as_deref(), Some(k));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }
}
