//! Deterministic byte patterns, so that one process can check what another
//! wrote without shipping the bytes: byte `i` of pattern `seed` depends on
//! both and looks random (a block landing at the wrong offset is caught),
//! two seeds below 256 differ at every byte, and byte 0 of pattern `seed`
//! is `seed as u8`.

/// The splitmix64 finalizer: a bijection of u64 that mixes every bit (0 stays 0).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The random word behind bytes `8 * w .. 8 * w + 8` of pattern `seed`.
fn word(seed: u64, w: u64) -> u64 {
    mix(w ^ (seed >> 8).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn byte_of(word: u64, seed: u64, i: usize) -> u8 {
    ((word >> (8 * (i % 8))) as u8 ^ i as u8).wrapping_add(seed as u8)
}

/// Byte `i` of pattern `seed`.
pub fn pattern_byte(seed: u64, i: usize) -> u8 {
    byte_of(word(seed, (i / 8) as u64), seed, i)
}

/// Fills `buf` with pattern `seed` (byte `i` of the slice is byte `i` of the pattern).
pub fn fill(buf: &mut [u8], seed: u64) {
    for (w, chunk) in buf.chunks_mut(8).enumerate() {
        let x = word(seed, w as u64);
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = byte_of(x, seed, w * 8 + j);
        }
    }
}

/// The first `n` bytes of pattern `seed`.
pub fn pattern_vec(seed: u64, n: usize) -> Vec<u8> {
    (0..n).map(|i| pattern_byte(seed, i)).collect()
}

/// The first offset in `buf[off..off + len]` whose byte is not byte `i` of
/// pattern `seed` (offsets and pattern positions both count from the start
/// of `buf`).
pub fn first_mismatch(buf: &[u8], seed: u64, off: usize, len: usize) -> Option<usize> {
    (off..off + len).find(|&i| buf[i] != pattern_byte(seed, i))
}

/// A deterministic permutation of `0..n`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (x >> 33) as usize % (i + 1));
    }
    v
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of the hex string `s` (panics on anything else).
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_everywhere_and_blocks_do_not_repeat() {
        let (a, b) = (pattern_vec(1, 1 << 20), pattern_vec(2, 1 << 20));
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!((a[0], b[0]), (1, 2));
        let mut c = vec![0u8; 1000];
        fill(&mut c, 300);
        assert_eq!(c, pattern_vec(300, 1000));
        assert_ne!(c, pattern_vec(44, 1000));
        let blocks: std::collections::HashSet<&[u8]> = a.chunks(4096).collect();
        assert_eq!(blocks.len(), 256, "every 4 KiB block of 1 MiB differs");
        let words: std::collections::HashSet<&[u8]> = a.chunks(8).collect();
        assert_eq!(words.len(), a.len() / 8, "no 8-byte word repeats in 1 MiB");
        assert_eq!(first_mismatch(&a, 1, 0, a.len()), None);
        assert_eq!(first_mismatch(&b, 1, 10, 5), Some(10));
        assert_eq!(unhex(&hex(&a[..64])), &a[..64]);
        let mut p = shuffled(100, 7);
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }
}
