//! How a checked request becomes S3 operations: decisions only, no I/O.
//!
//! A READ segment becomes ranged GETs of at most `part_size` bytes each. A
//! WRITE groups its segments by object: segments that tile the object from
//! offset 0 without a gap make it whole (one PUT, or a multipart upload
//! above `multipart_threshold`); anything else writes *into* an object
//! and needs `allow_rmw` (read the object, patch it, put it back).

use super::ObjectId;
use crate::error::{Error, Result};
use crate::types::XferOp;

/// One piece of a request: `len` bytes at `offset` of object `obj`, to or
/// from local memory at `mem`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub obj: ObjectId,
    pub offset: u64,
    pub len: u64,
    pub mem: u64,
    /// The object's registered size; 0: unknown (whatever it holds).
    pub obj_len: u64,
}

/// Local memory: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub addr: u64,
    pub len: u64,
}

/// One S3 operation of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// A ranged GET of `[offset, offset + len)` into memory at `mem`.
    Get { obj: ObjectId, offset: u64, len: u64, mem: u64 },
    /// The object becomes these bytes, in order (one PUT).
    Put { obj: ObjectId, data: Vec<Span> },
    /// The object becomes these bytes, uploaded as parts (each part a list
    /// of spans), completed only once every part is stored.
    Multipart { obj: ObjectId, parts: Vec<Vec<Span>> },
    /// Writes into the object: read it, patch `(offset, span)`, put it back.
    Rmw { obj: ObjectId, patches: Vec<(u64, Span)> },
}

/// How large operations are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Largest GET range and multipart part.
    pub part_size: u64,
    /// Objects larger than this are written as multipart uploads.
    pub multipart_threshold: u64,
    /// Whether a WRITE may land inside an object (read-modify-write).
    pub allow_rmw: bool,
}

/// Turns the pieces of a checked request into S3 operations; `name` names
/// an object in errors.
pub(crate) fn plan(op: XferOp, pieces: &[Piece], shape: Shape, name: impl Fn(ObjectId) -> String) -> Result<Vec<Op>> {
    match op {
        XferOp::Read => Ok(reads(pieces, shape.part_size)),
        XferOp::Write => writes(pieces, shape, name),
    }
}

fn reads(pieces: &[Piece], part: u64) -> Vec<Op> {
    let mut ops = Vec::new();
    for p in pieces {
        let mut done = 0;
        while done < p.len {
            let len = (p.len - done).min(part);
            ops.push(Op::Get { obj: p.obj, offset: p.offset + done, len, mem: p.mem + done });
            done += len;
        }
    }
    ops
}

fn writes(pieces: &[Piece], shape: Shape, name: impl Fn(ObjectId) -> String) -> Result<Vec<Op>> {
    // Objects in the order the request first names them (ids count up
    // from 0 in that order); each object's pieces by offset.
    let mut sorted = pieces.to_vec();
    sorted.sort_by_key(|p| (p.obj, p.offset));
    let mut ops = Vec::new();
    for mine in sorted.chunk_by(|a, b| a.obj == b.obj) {
        let obj = mine[0].obj;
        if let Some(w) = mine.windows(2).find(|w| w[0].offset + w[0].len > w[1].offset) {
            return Err(Error::invalid(format!(
                "WRITE to object '{}': bytes {}..{} are written twice in one request; each byte of an object once",
                name(obj),
                w[1].offset,
                (w[0].offset + w[0].len).min(w[1].offset + w[1].len)
            )));
        }
        // Whole: from 0, no gap, and (when its size was registered) to its end;
        // a shorter tiling of a sized object would truncate it.
        let last = &mine[mine.len() - 1];
        let whole = mine[0].offset == 0
            && mine.windows(2).all(|w| w[0].offset + w[0].len == w[1].offset)
            && (last.obj_len == 0 || last.offset + last.len >= last.obj_len);
        if whole {
            let data: Vec<Span> = mine.iter().map(|p| Span { addr: p.mem, len: p.len }).collect();
            let total: u64 = data.iter().map(|s| s.len).sum();
            ops.push(if total > shape.multipart_threshold {
                Op::Multipart { obj, parts: cut(&data, shape.part_size) }
            } else {
                Op::Put { obj, data }
            });
        } else if shape.allow_rmw {
            ops.push(Op::Rmw {
                obj,
                patches: mine.iter().map(|p| (p.offset, Span { addr: p.mem, len: p.len })).collect(),
            });
        } else {
            let gap = if mine[0].offset != 0 {
                format!("starts at offset {}", mine[0].offset)
            } else if mine.windows(2).all(|w| w[0].offset + w[0].len == w[1].offset) {
                format!("ends at byte {} of its {} registered bytes", last.offset + last.len, last.obj_len)
            } else {
                "leaves a gap".to_string()
            };
            return Err(Error::not_supported(format!(
                "WRITE to object '{}' {gap}: an object is written whole, from offset 0 (S3 has no partial writes); \
                 write it from 0, or set the OBJ parameter allow_rmw=true to read, patch and put it back",
                name(obj)
            )));
        }
    }
    Ok(ops)
}

/// Cuts `data` into parts of `part` bytes (the last may be shorter).
fn cut(data: &[Span], part: u64) -> Vec<Vec<Span>> {
    let mut parts = Vec::new();
    let mut cur: Vec<Span> = Vec::new();
    let mut room = part;
    for s in data {
        let mut off = 0;
        while off < s.len {
            let n = (s.len - off).min(room);
            cur.push(Span { addr: s.addr + off, len: n });
            off += n;
            room -= n;
            if room == 0 {
                parts.push(std::mem::take(&mut cur));
                room = part;
            }
        }
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape { part_size: 100, multipart_threshold: 250, allow_rmw: false };

    fn piece(obj: ObjectId, offset: u64, len: u64, mem: u64) -> Piece {
        Piece { obj, offset, len, mem, obj_len: 0 }
    }

    fn name(o: ObjectId) -> String {
        format!("o{o}")
    }

    #[test]
    fn reads_are_cut_into_ranges() {
        let ops = plan(XferOp::Read, &[piece(1, 10, 250, 1000)], SHAPE, name).unwrap();
        assert_eq!(
            ops,
            [
                Op::Get { obj: 1, offset: 10, len: 100, mem: 1000 },
                Op::Get { obj: 1, offset: 110, len: 100, mem: 1100 },
                Op::Get { obj: 1, offset: 210, len: 50, mem: 1200 },
            ]
        );
    }

    #[test]
    fn whole_writes_put_or_upload_parts() {
        // Out of order in the request, whole once sorted: one PUT.
        let ops = plan(XferOp::Write, &[piece(1, 50, 50, 500), piece(1, 0, 50, 0)], SHAPE, name).unwrap();
        assert_eq!(ops, [Op::Put { obj: 1, data: vec![Span { addr: 0, len: 50 }, Span { addr: 500, len: 50 }] }]);
        // Above the threshold: parts of 100 bytes, crossing pieces.
        let ops = plan(XferOp::Write, &[piece(2, 0, 150, 0), piece(2, 150, 150, 5000)], SHAPE, name).unwrap();
        let Op::Multipart { obj: 2, parts } = &ops[0] else { panic!("{ops:?}") };
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1], [Span { addr: 100, len: 50 }, Span { addr: 5000, len: 50 }]);
        assert!(parts.iter().all(|p| p.iter().map(|s| s.len).sum::<u64>() == 100));
    }

    #[test]
    fn writes_into_an_object_need_allow_rmw() {
        let e = plan(XferOp::Write, &[piece(1, 8, 8, 0)], SHAPE, name).unwrap_err();
        assert!(e.message().contains("'o1' starts at offset 8") && e.message().contains("allow_rmw"), "{e}");
        let e = plan(XferOp::Write, &[piece(1, 0, 8, 0), piece(1, 16, 8, 0)], SHAPE, name).unwrap_err();
        assert!(e.message().contains("leaves a gap"), "{e}");
        let rmw = Shape { allow_rmw: true, ..SHAPE };
        let ops = plan(XferOp::Write, &[piece(1, 16, 8, 7), piece(1, 0, 8, 3)], rmw, name).unwrap();
        assert_eq!(
            ops,
            [Op::Rmw { obj: 1, patches: vec![(0, Span { addr: 3, len: 8 }), (16, Span { addr: 7, len: 8 })] }]
        );
    }

    #[test]
    fn a_prefix_of_a_sized_object_is_not_whole() {
        let sized = |offset, len| Piece { obj_len: 100, ..piece(1, offset, len, 0) };
        let e = plan(XferOp::Write, &[sized(0, 40)], SHAPE, name).unwrap_err();
        assert!(e.message().contains("ends at byte 40 of its 100"), "{e}");
        let rmw = Shape { allow_rmw: true, ..SHAPE };
        assert!(matches!(plan(XferOp::Write, &[sized(0, 40)], rmw, name).unwrap()[..], [Op::Rmw { .. }]));
        assert!(matches!(
            plan(XferOp::Write, &[sized(0, 40), sized(40, 60)], SHAPE, name).unwrap()[..],
            [Op::Put { .. }]
        ));
    }

    #[test]
    fn a_byte_written_twice_is_refused() {
        let e = plan(XferOp::Write, &[piece(1, 0, 10, 0), piece(1, 5, 10, 0)], SHAPE, name).unwrap_err();
        assert!(e.message().contains("bytes 5..10 are written twice"), "{e}");
    }

    #[test]
    fn one_operation_per_object_by_id() {
        let ops = plan(XferOp::Write, &[piece(1, 0, 1, 0), piece(0, 0, 1, 0), piece(1, 1, 1, 1)], SHAPE, name).unwrap();
        let objs: Vec<ObjectId> = ops
            .iter()
            .map(|o| match o {
                Op::Put { obj, .. } => *obj,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(objs, [0, 1]);
    }
}
