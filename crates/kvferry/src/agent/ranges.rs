//! An ordered map from `(memory type, device, start)` to regions, answering
//! "which region covers this range" and "does this range overlap one" in
//! `O(log n)`. Used for local registrations and for each peer's regions.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::desc::XferDesc;
use crate::types::MemType;

/// A region's position: memory type, device, start.
pub(crate) type Pos = (MemType, u64, u64);

/// Something with a length (0 = "to the end of the device").
pub(crate) trait Span {
    fn span_len(&self) -> u64;
}

#[derive(Debug)]
pub(crate) struct RangeMap<V> {
    map: BTreeMap<Pos, V>,
}

impl<V> Default for RangeMap<V> {
    fn default() -> Self {
        RangeMap { map: BTreeMap::new() }
    }
}

fn end(start: u64, len: u64) -> u64 {
    if len == 0 {
        u64::MAX
    } else {
        start.saturating_add(len)
    }
}

impl<V: Span> RangeMap<V> {
    pub(crate) fn insert(&mut self, pos: Pos, v: V) -> Option<V> {
        self.map.insert(pos, v)
    }

    pub(crate) fn remove(&mut self, pos: &Pos) -> Option<V> {
        self.map.remove(pos)
    }

    pub(crate) fn get(&self, pos: &Pos) -> Option<&V> {
        self.map.get(pos)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Pos, &V)> {
        self.map.iter()
    }

    /// The region that wholly contains `d` of memory type `mt`, if any.
    pub(crate) fn covering(&self, mt: MemType, d: &XferDesc) -> Option<(&Pos, &V)> {
        let d_end = d.end()?;
        let (pos, v) = self.map.range(..=(mt, d.dev_id, d.addr)).next_back()?;
        (pos.0 == mt && pos.1 == d.dev_id && d_end <= end(pos.2, v.span_len())).then_some((pos, v))
    }

    /// A region that overlaps `[addr, addr + len)` (len 0 = to the end), if any.
    pub(crate) fn overlapping(&self, mt: MemType, dev: u64, addr: u64, len: u64) -> Option<(&Pos, &V)> {
        let new_end = end(addr, len);
        // The nearest region starting at or before addr may reach into the range...
        if let Some((pos, v)) = self.map.range(..=(mt, dev, addr)).next_back() {
            if pos.0 == mt && pos.1 == dev && end(pos.2, v.span_len()) > addr {
                return Some((pos, v));
            }
        }
        // ...and so may the first one starting after addr.
        let (pos, v) = self.map.range((Bound::Excluded((mt, dev, addr)), Bound::Unbounded)).next()?;
        (pos.0 == mt && pos.1 == dev && pos.2 < new_end).then_some((pos, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Span for u64 {
        fn span_len(&self) -> u64 {
            *self
        }
    }

    #[test]
    fn covering_and_overlap() {
        let mut m = RangeMap::default();
        m.insert((MemType::Dram, 0, 100), 50u64);
        m.insert((MemType::Dram, 0, 200), 10u64);
        m.insert((MemType::File, 3, 0), 0u64);
        assert!(m.covering(MemType::Dram, &XferDesc::new(100, 50, 0)).is_some());
        assert!(m.covering(MemType::Dram, &XferDesc::new(120, 31, 0)).is_none());
        assert!(m.covering(MemType::Dram, &XferDesc::new(120, 10, 1)).is_none());
        assert!(m.covering(MemType::Dram, &XferDesc::new(99, 2, 0)).is_none());
        assert!(m.covering(MemType::File, &XferDesc::new(1 << 40, 4096, 3)).is_some(), "len 0 covers the whole file");
        assert!(m.overlapping(MemType::Dram, 0, 149, 1).is_some());
        assert!(m.overlapping(MemType::Dram, 0, 150, 50).is_none());
        assert!(m.overlapping(MemType::Dram, 0, 150, 51).is_some());
        assert!(m.overlapping(MemType::Dram, 0, 0, 0).is_some());
        assert!(m.overlapping(MemType::Vram, 0, 0, 0).is_none());
    }
}
