//! The decisions of the TCP protocol, without I/O, sockets or clocks.
//!
//! * Initiator side — [`Awaiting`]: the frames a connection sent that await
//!   their answers, and which answer the oldest of them accepts
//!   ([`Awaiting::answer`]); anything else is [`Unexpected`] and breaks the
//!   connection.
//! * Target side — how a frame is dispatched: whether it is pipelined or
//!   answered in turn ([`turn`]), whether its type is one a target takes
//!   ([`route`]), which table its entries resolve in ([`resolve`]: memory
//!   and exported files are different kinds and never mix in one frame),
//!   how a file frame's entries lie in its staging buffer
//!   ([`file_entries`]), and the order answers leave in ([`AnswerOrder`]).
//!
//! The drivers (`conn.rs` on the initiator, `server.rs` on the target)
//! only move bytes and keep time; `pair.rs` drives both sides of this
//! module against each other in memory.

use std::collections::VecDeque;
use std::fmt;

use super::proto::{self, Entry, FrameType, Header, ProtoError, Status};
use super::MemRegion;
use crate::backend::{AccessKey, XferOp};

// ─────────────────────────── initiator side ───────────────────────────

/// What the initiator expects back for one frame it sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expect {
    /// The frame's op id, echoed by its answer.
    pub(crate) op: u64,
    /// WRITE (answered by ACK) or READ (answered by DATA).
    pub(crate) xfer: XferOp,
    /// Data bytes the frame moves (a DATA answer carries exactly these).
    pub(crate) bytes: u64,
}

impl Expect {
    /// The answer type that completes the frame (ERROR refuses any frame).
    pub(crate) fn success(&self) -> FrameType {
        match self.xfer {
            XferOp::Write => FrameType::Ack,
            XferOp::Read => FrameType::Data,
        }
    }
}

/// An answer the oldest frame awaiting one accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// ACK: the WRITE was applied at the target.
    Applied,
    /// DATA: the READ's `len` bytes (as many as asked for) follow the header.
    Data {
        /// Bytes that follow.
        len: u64,
    },
    /// ERROR: the target refused the frame; `len` bytes of UTF-8 message follow.
    Refused {
        /// Why, as the target put it.
        status: Status,
        /// Bytes of message that follow.
        len: u64,
    },
}

/// An answer that fits no frame awaiting one: the connection is out of step
/// and must be closed (its bytes can no longer be trusted to line up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unexpected {
    /// Nothing awaits an answer.
    Unsolicited {
        /// The type that arrived.
        ty: FrameType,
    },
    /// The answer is for another op, or of a type the frame does not take.
    OutOfStep {
        /// The op of the oldest frame awaiting an answer.
        sent: u64,
        /// The type that arrived.
        ty: FrameType,
        /// The op that arrived.
        op: u64,
    },
    /// A DATA answer of another length than the READ asked for.
    WrongLength {
        /// Bytes announced.
        got: u64,
        /// Bytes asked for.
        want: u64,
    },
}

impl fmt::Display for Unexpected {
    /// The part of the message after "agent 'name' ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Unexpected::Unsolicited { ty } => write!(f, "sent an unsolicited {ty:?} frame"),
            Unexpected::OutOfStep { sent, ty, op } => {
                write!(f, "answered op {sent:#x} with {ty:?} op {op:#x}: protocol out of step")
            }
            Unexpected::WrongLength { got, want } => write!(f, "sent {got} bytes for a READ of {want}"),
        }
    }
}

/// The frames one connection sent that await their answers, oldest first,
/// each with the driver's own record `T`. A target answers in request
/// order, so only the oldest frame may be answered next.
#[derive(Debug)]
pub(crate) struct Awaiting<T> {
    q: VecDeque<(Expect, T)>,
}

impl<T> Default for Awaiting<T> {
    fn default() -> Self {
        Awaiting { q: VecDeque::new() }
    }
}

impl<T> Awaiting<T> {
    /// A frame was (or is being) sent.
    pub(crate) fn push(&mut self, expect: Expect, t: T) {
        self.q.push_back((expect, t));
    }

    /// Whether nothing awaits an answer.
    pub(crate) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// The oldest frame awaiting an answer.
    pub(crate) fn oldest(&self) -> Option<&T> {
        self.q.front().map(|(_, t)| t)
    }

    /// The newest frame, with what it expects.
    pub(crate) fn newest_mut(&mut self) -> Option<(&Expect, &mut T)> {
        self.q.back_mut().map(|(e, t)| (&*e, t))
    }

    /// Takes every frame off (the connection died).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.q.drain(..).map(|(_, t)| t)
    }

    /// Matches an answer's header with the oldest frame, which it takes off
    /// the queue: what the answer means for it, or why it fits no frame
    /// (with the frame taken off, if there was one, for the driver to fail).
    pub(crate) fn answer(&mut self, h: &Header) -> Result<(Answer, T), (Unexpected, Option<T>)> {
        let Some((expect, t)) = self.q.pop_front() else {
            return Err((Unexpected::Unsolicited { ty: h.ty }, None));
        };
        match accept(&expect, h) {
            Ok(a) => Ok((a, t)),
            Err(u) => Err((u, Some(t))),
        }
    }
}

/// Whether answer `h` completes (or refuses) the frame that expects `expect`.
pub(crate) fn accept(expect: &Expect, h: &Header) -> Result<Answer, Unexpected> {
    if h.op != expect.op || (h.ty != expect.success() && h.ty != FrameType::Error) {
        return Err(Unexpected::OutOfStep { sent: expect.op, ty: h.ty, op: h.op });
    }
    match h.ty {
        FrameType::Error => Ok(Answer::Refused { status: h.status, len: h.len }),
        FrameType::Data if h.len != expect.bytes => Err(Unexpected::WrongLength { got: h.len, want: expect.bytes }),
        FrameType::Data => Ok(Answer::Data { len: h.len }),
        _ => Ok(Answer::Applied),
    }
}

/// Whether an answer is a DATA frame larger than `inline_max`: a thread
/// waiting for a small request of its own leaves it to the reader thread.
pub(crate) fn is_large(h: &Header, inline_max: u64) -> bool {
    h.ty == FrameType::Data && h.len > inline_max
}

// ───────────────────────────── target side ─────────────────────────────

/// The target's live tables, as the protocol consults them.
pub(crate) trait Tables {
    /// The memory region registered now with `key`.
    fn memory(&self, key: &AccessKey) -> Option<MemRegion>;
    /// Whether `key` names an exported file region now.
    fn is_file(&self, key: &AccessKey) -> bool;
}

/// When a frame's answer leaves, relative to the file operations held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// A frame on exported files: started at once, its answer held and sent
    /// in turn after those of earlier file frames.
    Pipelined,
    /// Anything else (a memory frame, a notification, a frame to refuse):
    /// every held answer goes out first, so answers keep request order and
    /// a notification is delivered only after earlier WRITEs were applied.
    AfterHeld,
}

/// Decides a frame's [`Turn`] from its header and the key of its entry 0
/// (`None`: it has no entries). Only a routing hint: [`resolve`] checks
/// every entry against the table of its kind.
pub(crate) fn turn(h: &Header, entry0: Option<&AccessKey>, tables: &impl Tables) -> Turn {
    let data = matches!(h.ty, FrameType::Write | FrameType::Read);
    if data && entry0.is_some_and(|k| tables.is_file(k) && tables.memory(k).is_none()) {
        Turn::Pipelined
    } else {
        Turn::AfterHeld
    }
}

/// What a target does with a frame of a type it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// WRITE or READ: its entry table follows, to [`resolve`].
    Data(XferOp),
    /// A notification of `len` bytes follows; it gets no answer.
    Notif,
}

/// The target's check of a frame's type: an answer type (ACK, DATA, ERROR)
/// sent to a target is refused, and the connection closed after the ERROR.
pub(crate) fn route(h: &Header) -> Result<Route, ProtoError> {
    match h.ty {
        FrameType::Write => Ok(Route::Data(XferOp::Write)),
        FrameType::Read => Ok(Route::Data(XferOp::Read)),
        FrameType::Notif => Ok(Route::Notif),
        other => Err(ProtoError {
            status: Status::Malformed,
            message: format!("a target takes WRITE, READ and NOTIF frames, not {other:?}"),
        }),
    }
}

/// Which table a WRITE or READ resolved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// Every entry lies inside a live memory region: the spans to move and
    /// the ids of the regions used were filled in.
    Memory,
    /// Entry 0 names an exported file and no entry names memory: the
    /// storage plan checks the rest ([`file_entries`]).
    Files,
}

/// The refusal of a frame that mixes memory and file regions.
pub(crate) fn mixed(i: usize) -> ProtoError {
    ProtoError {
        status: Status::NotAllowed,
        message: format!(
            "entry {i} names a region of another kind than entry 0 (memory and exported files): \
             a frame's entries must all be memory or all be files; post them as separate requests"
        ),
    }
}

/// Resolves a WRITE's or READ's entry table (`h.count` entries) before any
/// byte moves. Memory: every entry names a live memory region by key and
/// lies inside it, no entry is empty, the lengths add up to `h.len`; fills
/// `spans` with the memory to move and `ids` with the regions used. A file
/// key at entry 0 makes it a file frame, in which no entry may name
/// memory; a key of the other kind anywhere else refuses the frame. On
/// anything but [`Resolved::Memory`], `spans` and `ids` are left empty.
/// A refusal is answered in turn ([`Turn::AfterHeld`]).
pub(crate) fn resolve(
    h: &Header,
    table: &[u8],
    tables: &impl Tables,
    spans: &mut Vec<(u64, u64)>,
    ids: &mut Vec<u64>,
) -> Result<Resolved, ProtoError> {
    spans.clear();
    ids.clear();
    let r = resolve_memory(h, table, tables, spans, ids);
    if !matches!(r, Ok(Resolved::Memory)) {
        spans.clear();
        ids.clear();
    }
    match r? {
        Resolved::Memory => Ok(Resolved::Memory),
        Resolved::Files => no_memory_entries(h, table, tables).map(|()| Resolved::Files),
    }
}

fn entry(table: &[u8], i: usize) -> Result<Entry, ProtoError> {
    Entry::decode(table, i).ok_or_else(|| ProtoError::malformed("entry table truncated"))
}

fn resolve_memory(
    h: &Header,
    table: &[u8],
    tables: &impl Tables,
    spans: &mut Vec<(u64, u64)>,
    ids: &mut Vec<u64>,
) -> Result<Resolved, ProtoError> {
    let mut sum = 0u64;
    for i in 0..h.count as usize {
        let e = entry(table, i)?;
        let Some(r) = tables.memory(&e.key) else {
            if tables.is_file(&e.key) {
                return if i == 0 { Ok(Resolved::Files) } else { Err(mixed(i)) };
            }
            return Err(ProtoError {
                status: Status::NotAllowed,
                message: format!(
                    "entry {i} ({:#x}+{}) names the key {:?}, which is not registered now",
                    e.addr, e.len, e.key
                ),
            });
        };
        if e.len == 0 {
            return Err(ProtoError::malformed(format!("entry {i} is empty")));
        }
        sum = sum.checked_add(e.len).ok_or_else(|| ProtoError::malformed(format!("entry {i}: lengths overflow")))?;
        let inside = e.addr >= r.addr
            && e.addr.checked_add(e.len).is_some_and(|end| r.addr.checked_add(r.len).is_some_and(|rend| end <= rend));
        if !inside {
            return Err(ProtoError {
                status: Status::NotAllowed,
                message: format!(
                    "entry {i} ({:#x}+{}) is not inside the memory region registered now with the key {:?}",
                    e.addr, e.len, e.key
                ),
            });
        }
        spans.push((e.addr, e.len));
        if ids.last() != Some(&r.id) {
            ids.push(r.id);
        }
    }
    if sum != h.len {
        return Err(ProtoError::malformed(format!("entries add up to {sum} bytes but the frame announces {}", h.len)));
    }
    Ok(Resolved::Memory)
}

/// Checks that no entry of a file frame names a memory region: kinds never
/// mix (entry 0 named an exported file).
fn no_memory_entries(h: &Header, table: &[u8], tables: &impl Tables) -> Result<(), ProtoError> {
    for i in 0..h.count as usize {
        if tables.memory(&entry(table, i)?.key).is_some() {
            return Err(mixed(i));
        }
    }
    Ok(())
}

/// A lookup under which every key spans the whole offset space: with it,
/// [`proto::check_entries`] checks only the framing of a file frame (no
/// empty entry, lengths that add up to the header's). Which file region a
/// key names, and whether an entry lies inside it, is the storage plan's
/// check, made once for every user of files.
struct FramingOnly;

impl proto::RegionLookup for FramingOnly {
    fn lookup(&self, _key: &AccessKey) -> Option<(u64, u64)> {
        Some((0, u64::MAX))
    }
}

/// One entry of a file frame, placed in the frame's staging buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileEntry {
    /// The exported file region's key.
    pub(crate) key: AccessKey,
    /// Offset in the file region.
    pub(crate) offset: u64,
    /// Bytes.
    pub(crate) len: u64,
    /// Where its bytes lie in the staging buffer (entries back to back).
    pub(crate) buf: u64,
}

/// Checks a file frame's framing on the wire (no empty entry, lengths that
/// add up to `h.len`) and lays its entries out back to back in one staging
/// buffer of `h.len` bytes, for the storage plan to check the rest (a live
/// exported file region, access, bounds, O_DIRECT alignment).
pub(crate) fn file_entries<'t>(
    h: &Header,
    table: &'t [u8],
) -> Result<impl Iterator<Item = FileEntry> + 't, ProtoError> {
    proto::check_entries(h, table, &FramingOnly)?;
    let mut at = 0u64;
    Ok((0..h.count as usize).filter_map(|i| Entry::decode(table, i)).map(move |e| {
        // The framing check bounded the sum of the lengths.
        let buf = at;
        at += e.len;
        FileEntry { key: e.key, offset: e.addr, len: e.len, buf }
    }))
}

/// The status a refused file operation is answered with, from the storage
/// layer's error: a broken storage rule (alignment, access mode) is
/// `Invalid`, an unknown key or a range outside its region `NotAllowed`,
/// anything else (I/O, a short file, ENOSPC) `Storage`.
pub(crate) fn storage_refusal(e: &crate::Error) -> ProtoError {
    let status = match e.kind() {
        crate::ErrorKind::InvalidParam => Status::Invalid,
        crate::ErrorKind::NotAllowed | crate::ErrorKind::NotFound => Status::NotAllowed,
        _ => Status::Storage,
    };
    ProtoError { status, message: e.message().to_string() }
}

/// The order a target's answers leave in: request order. Pipelined file
/// operations are held (started, then answered oldest first); an answer
/// that is not pipelined waits until every held one went out
/// ([`Turn::AfterHeld`]). `T` is the driver's record of a held operation.
#[derive(Debug)]
pub(crate) struct AnswerOrder<T> {
    held: VecDeque<(u64, T)>,
    held_bytes: u64,
    cap: u64,
}

impl<T> AnswerOrder<T> {
    /// An order that holds up to `cap` bytes of file operations.
    pub(crate) fn new(cap: u64) -> Self {
        AnswerOrder { held: VecDeque::new(), held_bytes: 0, cap }
    }

    /// Holds a started file operation of `len` bytes; its answer goes out in turn.
    pub(crate) fn hold(&mut self, len: u64, t: T) {
        self.held_bytes += len;
        self.held.push_back((len, t));
    }

    /// Whether another file operation may start: those held stay under the cap.
    pub(crate) fn room(&self) -> bool {
        self.held_bytes < self.cap
    }

    /// Whether no answer is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The held operation to answer next (the oldest).
    pub(crate) fn next(&mut self) -> Option<T> {
        let (len, t) = self.held.pop_front()?;
        self.held_bytes -= len;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct T {
        mem: HashMap<AccessKey, MemRegion>,
        files: Vec<AccessKey>,
    }

    impl Tables for T {
        fn memory(&self, key: &AccessKey) -> Option<MemRegion> {
            self.mem.get(key).copied()
        }
        fn is_file(&self, key: &AccessKey) -> bool {
            self.files.contains(key)
        }
    }

    const M: AccessKey = AccessKey([1; 16]);
    const F: AccessKey = AccessKey([2; 16]);

    fn tables() -> T {
        let mut mem = HashMap::new();
        mem.insert(M, MemRegion { id: 5, addr: 0x1000, len: 0x1000 });
        T { mem, files: vec![F] }
    }

    fn table(es: &[Entry]) -> Vec<u8> {
        let mut t = Vec::new();
        for e in es {
            e.encode(&mut t);
        }
        t
    }

    #[test]
    fn the_oldest_frame_takes_only_its_own_answer() {
        let mut a = Awaiting::default();
        a.push(Expect { op: 1, xfer: XferOp::Write, bytes: 10 }, 'w');
        a.push(Expect { op: 2, xfer: XferOp::Read, bytes: 20 }, 'r');
        // The READ's answer before the WRITE's: out of step, and the WRITE is handed back to fail.
        let (u, t) = a.answer(&Header::new(FrameType::Data, 2, 0, 20)).unwrap_err();
        assert_eq!(u, Unexpected::OutOfStep { sent: 1, ty: FrameType::Data, op: 2 });
        assert_eq!(t, Some('w'));
        assert_eq!(a.answer(&Header::new(FrameType::Data, 2, 0, 20)).unwrap(), (Answer::Data { len: 20 }, 'r'));
        let (u, t) = a.answer(&Header::new(FrameType::Ack, 3, 0, 0)).unwrap_err();
        assert_eq!((u, t), (Unexpected::Unsolicited { ty: FrameType::Ack }, None));
        let read = Expect { op: 4, xfer: XferOp::Read, bytes: 8 };
        assert_eq!(
            accept(&read, &Header::new(FrameType::Data, 4, 0, 9)),
            Err(Unexpected::WrongLength { got: 9, want: 8 })
        );
        assert!(matches!(accept(&read, &Header::new(FrameType::Ack, 4, 0, 0)), Err(Unexpected::OutOfStep { .. })));
        let refused = Header { status: Status::NotAllowed, ..Header::new(FrameType::Error, 4, 0, 3) };
        assert_eq!(accept(&read, &refused), Ok(Answer::Refused { status: Status::NotAllowed, len: 3 }));
        assert!(is_large(&Header::new(FrameType::Data, 4, 0, 65), 64));
        assert!(!is_large(&Header::new(FrameType::Data, 4, 0, 64), 64));
    }

    #[test]
    fn frames_resolve_in_one_table_of_their_kind() {
        let t = tables();
        let (mut spans, mut ids) = (Vec::new(), Vec::new());
        let mem = [Entry { key: M, addr: 0x1000, len: 16 }, Entry { key: M, addr: 0x1800, len: 16 }];
        let h = Header::new(FrameType::Write, 1, 2, 32);
        assert_eq!(resolve(&h, &table(&mem), &t, &mut spans, &mut ids), Ok(Resolved::Memory));
        assert_eq!((spans.as_slice(), ids.as_slice()), (&[(0x1000, 16), (0x1800, 16)][..], &[5][..]));
        assert_eq!(turn(&h, Some(&M), &t), Turn::AfterHeld);

        let file = [Entry { key: F, addr: 0, len: 16 }];
        let h = Header::new(FrameType::Read, 2, 1, 16);
        assert_eq!(resolve(&h, &table(&file), &t, &mut spans, &mut ids), Ok(Resolved::Files));
        assert!(spans.is_empty() && ids.is_empty());
        assert_eq!(turn(&h, Some(&F), &t), Turn::Pipelined);
        assert_eq!(turn(&Header::new(FrameType::Notif, 3, 0, 1), None, &t), Turn::AfterHeld);

        // Either kind after the other at entry 0 refuses the frame, naming the entry.
        for es in [[mem[0], file[0]], [file[0], mem[0]]] {
            let h = Header::new(FrameType::Write, 4, 2, 32);
            let e = resolve(&h, &table(&es), &t, &mut spans, &mut ids).unwrap_err();
            assert_eq!(e.status, Status::NotAllowed);
            assert!(e.message.contains("entry 1") && e.message.contains("must all be memory"), "{}", e.message);
            assert!(spans.is_empty() && ids.is_empty());
        }
        let e = resolve(
            &Header::new(FrameType::Write, 5, 1, 1),
            &table(&[Entry { key: AccessKey([9; 16]), addr: 0, len: 1 }]),
            &t,
            &mut spans,
            &mut ids,
        )
        .unwrap_err();
        assert_eq!(e.status, Status::NotAllowed);
    }

    #[test]
    fn answer_types_are_refused_and_file_entries_are_laid_out() {
        for ty in [FrameType::Ack, FrameType::Data, FrameType::Error] {
            assert_eq!(route(&Header::new(ty, 1, 0, 0)).unwrap_err().status, Status::Malformed);
        }
        assert_eq!(route(&Header::new(FrameType::Read, 1, 1, 1)), Ok(Route::Data(XferOp::Read)));
        let es = [Entry { key: F, addr: 100, len: 10 }, Entry { key: F, addr: 0, len: 6 }];
        let h = Header::new(FrameType::Write, 1, 2, 16);
        let placed: Vec<FileEntry> = file_entries(&h, &table(&es)).unwrap().collect();
        assert_eq!(placed[1], FileEntry { key: F, offset: 0, len: 6, buf: 10 });
        assert!(file_entries(&Header::new(FrameType::Write, 1, 2, 17), &table(&es)).is_err());
        let e = storage_refusal(&crate::Error::invalid("offset is not a multiple of 512"));
        assert_eq!(e.status, Status::Invalid);
    }

    #[test]
    fn held_answers_leave_oldest_first_within_the_cap() {
        let mut o = AnswerOrder::new(100);
        assert!(o.room() && o.is_empty());
        o.hold(60, 1);
        o.hold(40, 2);
        assert!(!o.room());
        assert_eq!(o.next(), Some(1));
        assert!(o.room());
        assert_eq!(o.next(), Some(2));
        assert_eq!(o.next(), None);
    }
}
