//! A position-dependent byte pattern: every 8-byte word is a hash of its
//! absolute offset and a seed, so a block landing in the wrong place, a
//! stale block, or a torn copy all fail verification.

fn word(offset_words: u64, seed: u8) -> u64 {
    // splitmix64 of (offset, seed).
    let mut z = offset_words.wrapping_add(u64::from(seed) << 56).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf`, which sits at absolute offset `base` of the pattern.
pub fn fill(buf: &mut [u8], base: u64, seed: u8) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = word(base / 8 + i as u64, seed).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// Offset of the first byte of `buf` that differs from the pattern, if any.
pub fn first_mismatch(buf: &[u8], base: u64, seed: u8) -> Option<usize> {
    buf.chunks(8).enumerate().find_map(|(i, chunk)| {
        let w = word(base / 8 + i as u64, seed).to_le_bytes();
        (chunk != &w[..chunk.len()]).then_some(i * 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_misplacement() {
        let mut a = vec![0u8; 4096];
        fill(&mut a, 8192, 1);
        assert_eq!(first_mismatch(&a, 8192, 1), None);
        assert_eq!(first_mismatch(&a, 0, 1), Some(0));
        assert_eq!(first_mismatch(&a, 8192, 2), Some(0));
        a[100] ^= 1;
        assert_eq!(first_mismatch(&a, 8192, 1), Some(96));
    }
}
