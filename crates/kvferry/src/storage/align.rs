//! O_DIRECT alignment rules, checked when a request is prepared so that a
//! misaligned request fails at `create_request` with an error naming the
//! field, instead of an `EINVAL` from the kernel in the middle of a transfer.
//!
//! With O_DIRECT the kernel moves bytes straight between the device and the
//! buffer, so three things must be aligned: the memory address (to the
//! file's DIO memory alignment), the file offset and the length (both to its
//! DIO offset alignment, the logical block size). The alignments come from
//! `statx(STATX_DIOALIGN)` where the kernel reports them, else `BLKSSZGET`
//! for block devices, else 4096 (safe for 512- and 4096-byte devices).

use super::naming::Naming;
use crate::error::{Error, Result};

/// The alignments one O_DIRECT file asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirectAlign {
    /// Alignment of memory addresses.
    pub(crate) mem: u64,
    /// Alignment of file offsets and lengths.
    pub(crate) off: u64,
}

/// Which part of a segment is misaligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    /// The DRAM address.
    Address,
    /// The file offset.
    Offset,
    /// The length.
    Length,
}

impl Field {
    fn as_str(self) -> &'static str {
        match self {
            Field::Address => "address",
            Field::Offset => "offset",
            Field::Length => "length",
        }
    }
}

impl DirectAlign {
    /// The first misaligned field of `(addr, offset, len)`, if any, with the
    /// value and the alignment it needs.
    pub(crate) fn misaligned(&self, addr: u64, offset: u64, len: u64) -> Option<(Field, u64, u64)> {
        let bad = |v: u64, a: u64| a > 1 && v % a != 0;
        if bad(addr, self.mem) {
            Some((Field::Address, addr, self.mem))
        } else if bad(offset, self.off) {
            Some((Field::Offset, offset, self.off))
        } else if bad(len, self.off) {
            Some((Field::Length, len, self.off))
        } else {
            None
        }
    }

    /// Fails with `InvalidParam` naming the misaligned field of entry `seg`
    /// (called as `naming` says).
    pub(crate) fn check(&self, naming: Naming, seg: usize, file: &str, addr: u64, offset: u64, len: u64) -> Result<()> {
        let Naming { who, item } = naming;
        match self.misaligned(addr, offset, len) {
            None => Ok(()),
            Some((field, value, need)) => Err(Error::invalid(format!(
                "{who}: O_DIRECT {} misaligned in {item} {seg} (file {file}): {} {value:#x} ({value}) is not a multiple of {need}; O_DIRECT needs memory address, file offset and length aligned (memory to {}, offset and length to {}). Use AlignedBuf and block-sized descriptors, or register the file without 'direct'",
                field.as_str(),
                field.as_str(),
                self.mem,
                self.off
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_misaligned_field() {
        let a = DirectAlign { mem: 512, off: 4096 };
        assert_eq!(a.misaligned(4096, 8192, 4096), None);
        assert_eq!(a.misaligned(512, 8192, 4096), None);
        assert_eq!(a.misaligned(100, 8192, 4096), Some((Field::Address, 100, 512)));
        assert_eq!(a.misaligned(4096, 100, 4096), Some((Field::Offset, 100, 4096)));
        assert_eq!(a.misaligned(4096, 0, 100), Some((Field::Length, 100, 4096)));
        let e = a.check(Naming::POSIX, 3, "'/f'", 4096, 0, 100).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidParam);
        assert!(e.message().contains("length misaligned in segment 3"), "{e}");
        assert!(e.message().contains("multiple of 4096"), "{e}");
    }
}
