//! A deterministic in-memory harness for the TCP protocol, after
//! quinn-proto's `tests/util.rs` `Pair`: an initiator and a target speak
//! the wire format as bytes through two in-memory pipes, each side making
//! its decisions with the code the drivers use ([`state`], [`proto`]) — no
//! sockets, threads or clocks, so every run is the same.
//!
//! The target's memory regions are byte vectors at made-up addresses. Its
//! exported files are byte vectors too; their operations complete at once,
//! but their answers are held in an [`AnswerOrder`] and leave when the real
//! driver's would: when no next frame is waiting or the cap is reached,
//! and before any answer that is not pipelined.

use std::collections::HashMap;

use super::proto::{self, Entry, FrameType, Header, Status, HEADER_LEN};
use super::state::{self, Answer, AnswerOrder, Awaiting, Expect, Resolved, Route, Tables, Turn, Unexpected};
use super::MemRegion;
use crate::backend::{AccessKey, XferOp};

/// How a frame the initiator sent ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// ACK.
    Applied,
    /// DATA, with the bytes.
    Data(Vec<u8>),
    /// ERROR, with the status and message.
    Refused(Status, String),
    /// Failed because an answer out of step broke the connection.
    Broken,
}

/// The initiator's side: frames out, answers matched with [`Awaiting`].
#[derive(Default)]
struct Initiator {
    /// Bytes for the target.
    out: Vec<u8>,
    /// Bytes from the target, not handled yet.
    rx: Vec<u8>,
    awaiting: Awaiting<u64>,
    next_op: u64,
    /// Frames that ended, in the order they ended.
    done: Vec<(u64, Outcome)>,
    /// Why the connection broke, once it did.
    broken: Option<Unexpected>,
}

impl Initiator {
    fn frame(&mut self, xfer: XferOp, entries: &[Entry], data: &[u8]) -> u64 {
        self.next_op += 1;
        let op = self.next_op;
        let bytes = entries.iter().map(|e| e.len).sum();
        let ty = if xfer == XferOp::Write { FrameType::Write } else { FrameType::Read };
        self.out.extend_from_slice(&Header::new(ty, op, entries.len() as u32, bytes).encode());
        for e in entries {
            e.encode(&mut self.out);
        }
        self.out.extend_from_slice(data);
        self.awaiting.push(Expect { op, xfer, bytes }, op);
        op
    }

    fn write(&mut self, entries: &[Entry], data: &[u8]) -> u64 {
        self.frame(XferOp::Write, entries, data)
    }

    fn read(&mut self, entries: &[Entry]) -> u64 {
        self.frame(XferOp::Read, entries, &[])
    }

    fn notif(&mut self, msg: &[u8]) {
        self.out.extend_from_slice(&Header::new(FrameType::Notif, 0, 0, msg.len() as u64).encode());
        self.out.extend_from_slice(msg);
    }

    /// Handles every whole answer received, as `Conn::read_next` does.
    fn handle_input(&mut self) {
        while self.broken.is_none() && self.rx.len() >= HEADER_LEN {
            let hb: [u8; HEADER_LEN] = self.rx[..HEADER_LEN].try_into().expect("length checked");
            let h = Header::decode(&hb).expect("the target sends well-formed headers");
            let end = HEADER_LEN + h.len as usize;
            if self.rx.len() < end {
                return;
            }
            let body: Vec<u8> = self.rx.drain(..end).skip(HEADER_LEN).collect();
            match self.awaiting.answer(&h) {
                Ok((Answer::Applied, op)) => self.done.push((op, Outcome::Applied)),
                Ok((Answer::Data { .. }, op)) => self.done.push((op, Outcome::Data(body))),
                Ok((Answer::Refused { status, .. }, op)) => {
                    self.done.push((op, Outcome::Refused(status, String::from_utf8_lossy(&body).into_owned())))
                }
                Err((u, op)) => {
                    self.broken = Some(u);
                    self.done.extend(op.into_iter().chain(self.awaiting.drain()).map(|op| (op, Outcome::Broken)));
                }
            }
        }
    }

    fn outcome(&self, op: u64) -> Option<&Outcome> {
        self.done.iter().find(|(o, _)| *o == op).map(|(_, r)| r)
    }
}

/// The target's side: frames in, dispatched with [`state`], answers out in order.
struct Target {
    memory: HashMap<AccessKey, (MemRegion, Vec<u8>)>,
    files: HashMap<AccessKey, Vec<u8>>,
    /// Answers of file operations, held.
    order: AnswerOrder<Vec<u8>>,
    /// Bytes from the initiator, not handled yet.
    rx: Vec<u8>,
    /// Bytes for the initiator.
    out: Vec<u8>,
    notifs: Vec<Vec<u8>>,
    /// Why the target closed the connection, once it did.
    closed: Option<String>,
}

impl Tables for Target {
    fn memory(&self, key: &AccessKey) -> Option<MemRegion> {
        self.memory.get(key).map(|(r, _)| *r)
    }
    fn is_file(&self, key: &AccessKey) -> bool {
        self.files.contains_key(key)
    }
}

impl Target {
    /// A target holding up to `cap` bytes of file answers.
    fn new(cap: u64) -> Target {
        Target {
            memory: HashMap::new(),
            files: HashMap::new(),
            order: AnswerOrder::new(cap),
            rx: Vec::new(),
            out: Vec::new(),
            notifs: Vec::new(),
            closed: None,
        }
    }

    fn add_memory(&mut self, key: AccessKey, id: u64, addr: u64, len: usize) {
        self.memory.insert(key, (MemRegion { id, addr, len: len as u64 }, vec![0; len]));
    }

    fn error(&mut self, op: u64, e: &proto::ProtoError) {
        let h = Header { status: e.status, ..Header::new(FrameType::Error, op, 0, e.message.len() as u64) };
        self.out.extend_from_slice(&h.encode());
        self.out.extend_from_slice(e.message.as_bytes());
    }

    fn flush_one(&mut self) -> bool {
        match self.order.next() {
            Some(a) => {
                self.out.extend_from_slice(&a);
                true
            }
            None => false,
        }
    }

    /// Handles every whole frame received, in the order `serve_frames` does.
    fn handle_input(&mut self) {
        while self.closed.is_none() {
            // between_frames: start the next frame if it is in and there is room.
            while !self.order.is_empty() {
                if self.rx.len() >= HEADER_LEN && self.order.room() {
                    break;
                }
                self.flush_one();
            }
            if self.rx.len() < HEADER_LEN {
                return;
            }
            let hb: [u8; HEADER_LEN] = self.rx[..HEADER_LEN].try_into().expect("length checked");
            let h = match Header::decode(&hb) {
                Ok(h) => h,
                Err(e) => {
                    self.error(Header::raw_op(&hb), &e);
                    self.closed = Some(e.message);
                    return;
                }
            };
            let body_len = h.entries_len() + if h.ty == FrameType::Read { 0 } else { h.len as usize };
            if self.rx.len() < HEADER_LEN + body_len {
                // The rest of the frame has not arrived (the driver would block reading it).
                return;
            }
            let body: Vec<u8> = self.rx.drain(..HEADER_LEN + body_len).skip(HEADER_LEN).collect();
            self.dispatch(&h, &body);
        }
    }

    /// `ConnState::dispatch`, in memory.
    fn dispatch(&mut self, h: &Header, body: &[u8]) {
        let entry0 = (h.count > 0).then(|| Entry::decode(body, 0).map(|e| e.key)).flatten();
        if state::turn(h, entry0.as_ref(), self) == Turn::AfterHeld {
            while self.flush_one() {}
        }
        match state::route(h) {
            Ok(Route::Notif) => self.notifs.push(body.to_vec()),
            Ok(Route::Data(op)) => self.data_op(op, h, body),
            Err(e) => {
                self.error(h.op, &e);
                self.closed = Some(e.message);
            }
        }
    }

    fn data_op(&mut self, op: XferOp, h: &Header, body: &[u8]) {
        let (table, payload) = body.split_at(h.entries_len());
        let (mut spans, mut ids) = (Vec::new(), Vec::new());
        let r = state::resolve(h, table, self, &mut spans, &mut ids);
        let entries = (0..h.count as usize).filter_map(|i| Entry::decode(table, i));
        match r {
            Ok(Resolved::Memory) => {
                let mut data = Vec::new();
                let mut at = 0;
                for e in entries {
                    let (r, mem) = self.memory.get_mut(&e.key).expect("resolved");
                    let range = (e.addr - r.addr) as usize..(e.addr - r.addr + e.len) as usize;
                    match op {
                        XferOp::Write => mem[range].copy_from_slice(&payload[at..at + e.len as usize]),
                        XferOp::Read => data.extend_from_slice(&mem[range]),
                    }
                    at += e.len as usize;
                }
                let ty = if op == XferOp::Write { FrameType::Ack } else { FrameType::Data };
                self.out.extend_from_slice(&Header::new(ty, h.op, 0, data.len() as u64).encode());
                self.out.extend_from_slice(&data);
            }
            Ok(Resolved::Files) => match self.file_op(op, h, table, payload) {
                Ok(answer) => self.order.hold(h.len, answer),
                Err(e) => {
                    while self.flush_one() {}
                    self.error(h.op, &e);
                }
            },
            Err(e) => {
                while self.flush_one() {}
                self.error(h.op, &e);
            }
        }
    }

    /// A file frame: framing by [`state::file_entries`], then a stand-in
    /// for the storage plan (a known file, bounds), then the bytes move.
    fn file_op(&mut self, op: XferOp, h: &Header, table: &[u8], payload: &[u8]) -> Result<Vec<u8>, proto::ProtoError> {
        let placed: Vec<state::FileEntry> = state::file_entries(h, table)?.collect();
        for e in &placed {
            let inside = self.files.get(&e.key).is_some_and(|f| e.offset + e.len <= f.len() as u64);
            if !inside {
                return Err(state::storage_refusal(&crate::Error::not_allowed("outside the file region")));
            }
        }
        let mut data = Vec::new();
        for e in &placed {
            let f = self.files.get_mut(&e.key).expect("checked above");
            let range = e.offset as usize..(e.offset + e.len) as usize;
            match op {
                XferOp::Write => f[range].copy_from_slice(&payload[e.buf as usize..(e.buf + e.len) as usize]),
                XferOp::Read => data.extend_from_slice(&f[range]),
            }
        }
        let ty = if op == XferOp::Write { FrameType::Ack } else { FrameType::Data };
        let mut answer = Header::new(ty, h.op, 0, data.len() as u64).encode().to_vec();
        answer.extend_from_slice(&data);
        Ok(answer)
    }
}

/// An initiator and a target, connected by in-memory pipes.
struct Pair {
    i: Initiator,
    t: Target,
}

/// The target's memory region: key, 4 KiB at 0x10000.
const MEM: AccessKey = AccessKey([1; 16]);
/// The target's exported file region, 4 KiB.
const FILE: AccessKey = AccessKey([2; 16]);
const BASE: u64 = 0x10000;

impl Pair {
    /// A pair whose target has [`MEM`] and [`FILE`] and holds up to `cap` bytes of file answers.
    fn new(cap: u64) -> Pair {
        let mut t = Target::new(cap);
        t.add_memory(MEM, 1, BASE, 4096);
        t.files.insert(FILE, vec![0; 4096]);
        Pair { i: Initiator::default(), t }
    }

    /// Moves bytes both ways until both sides are quiet.
    fn drive(&mut self) {
        while !self.i.out.is_empty() || !self.t.out.is_empty() {
            self.t.rx.append(&mut self.i.out);
            self.t.handle_input();
            self.i.rx.append(&mut self.t.out);
            self.i.handle_input();
        }
    }
}

fn mem(addr: u64, len: u64) -> Entry {
    Entry { key: MEM, addr, len }
}

fn file(offset: u64, len: u64) -> Entry {
    Entry { key: FILE, addr: offset, len }
}

#[test]
fn requests_and_answers_match() {
    let mut p = Pair::new(1 << 20);
    let w = p.i.write(&[mem(BASE + 8, 4), mem(BASE + 100, 2)], b"abcdef");
    let r = p.i.read(&[mem(BASE + 100, 2), mem(BASE + 8, 4)]);
    p.i.notif(b"after the write");
    let fw = p.i.write(&[file(10, 3)], b"xyz");
    let fr = p.i.read(&[file(9, 5)]);
    p.drive();
    assert_eq!(p.i.broken, None);
    assert_eq!(p.i.outcome(w), Some(&Outcome::Applied));
    assert_eq!(p.i.outcome(r), Some(&Outcome::Data(b"efabcd".to_vec())));
    assert_eq!(p.i.outcome(fw), Some(&Outcome::Applied));
    assert_eq!(p.i.outcome(fr), Some(&Outcome::Data(b"\0xyz\0".to_vec())));
    assert_eq!(p.t.notifs, vec![b"after the write".to_vec()]);
    assert!(p.i.awaiting.is_empty() && p.t.closed.is_none());
    let ops: Vec<u64> = p.i.done.iter().map(|(op, _)| *op).collect();
    assert_eq!(ops, [w, r, fw, fr], "answers in request order");
}

#[test]
fn out_of_order_and_unexpected_answers_break_the_connection() {
    // The target answers the second frame first: the first is failed, the connection broken.
    let mut i = Initiator::default();
    let w = i.write(&[mem(BASE, 4)], b"abcd");
    let r = i.read(&[mem(BASE, 4)]);
    i.rx.extend_from_slice(&Header::new(FrameType::Data, r, 0, 4).encode());
    i.rx.extend_from_slice(b"abcd");
    i.handle_input();
    assert_eq!(i.broken, Some(Unexpected::OutOfStep { sent: w, ty: FrameType::Data, op: r }));
    assert_eq!(i.done, vec![(w, Outcome::Broken), (r, Outcome::Broken)]);

    // An answer nothing asked for.
    let mut i = Initiator::default();
    i.rx.extend_from_slice(&Header::new(FrameType::Ack, 7, 0, 0).encode());
    i.handle_input();
    assert_eq!(i.broken, Some(Unexpected::Unsolicited { ty: FrameType::Ack }));

    // ACK for a READ, and DATA of the wrong length.
    let mut i = Initiator::default();
    let r = i.read(&[mem(BASE, 4)]);
    i.rx.extend_from_slice(&Header::new(FrameType::Ack, r, 0, 0).encode());
    i.handle_input();
    assert_eq!(i.broken, Some(Unexpected::OutOfStep { sent: r, ty: FrameType::Ack, op: r }));
    let mut i = Initiator::default();
    let r = i.read(&[mem(BASE, 4)]);
    i.rx.extend_from_slice(&Header::new(FrameType::Data, r, 0, 5).encode());
    i.rx.extend_from_slice(b"abcde");
    i.handle_input();
    assert_eq!(i.broken, Some(Unexpected::WrongLength { got: 5, want: 4 }));

    // An answer type sent to a target: ERROR, then the target closes.
    let mut p = Pair::new(1 << 20);
    p.i.out.extend_from_slice(&Header::new(FrameType::Ack, 3, 0, 0).encode());
    p.drive();
    assert!(p.t.closed.as_deref().is_some_and(|m| m.contains("not Ack")), "{:?}", p.t.closed);
}

#[test]
fn refusals_keep_request_order_behind_held_file_answers() {
    // A cap of 8 bytes: the second file frame waits for the first's answer.
    for cap in [8, 1 << 20] {
        let mut p = Pair::new(cap);
        let a = p.i.write(&[file(0, 4)], b"1234");
        let b = p.i.write(&[Entry { key: AccessKey([9; 16]), addr: 0, len: 4 }], b"????");
        let c = p.i.write(&[file(4, 4)], b"5678");
        let d = p.i.read(&[file(4094, 4)]);
        let e = p.i.write(&[mem(BASE, 4)], b"mem!");
        let f = p.i.read(&[file(0, 8)]);
        p.drive();
        assert_eq!(p.i.broken, None, "cap {cap}: answers left in request order");
        let ops: Vec<u64> = p.i.done.iter().map(|(op, _)| *op).collect();
        assert_eq!(ops, [a, b, c, d, e, f], "cap {cap}");
        assert!(
            matches!(p.i.outcome(b), Some(Outcome::Refused(Status::NotAllowed, m)) if m.contains("not registered"))
        );
        assert!(matches!(p.i.outcome(d), Some(Outcome::Refused(Status::NotAllowed, _))), "beyond the file region");
        assert_eq!(p.i.outcome(f), Some(&Outcome::Data(b"12345678".to_vec())));
        assert_eq!(&p.t.memory[&MEM].1[..4], b"mem!");
    }
}

#[test]
fn a_frame_mixing_kinds_is_refused_and_touches_nothing() {
    let mut p = Pair::new(1 << 20);
    let a = p.i.write(&[mem(BASE, 4), file(0, 4)], b"abcdefgh");
    let b = p.i.write(&[file(0, 4), mem(BASE, 4)], b"abcdefgh");
    let c = p.i.read(&[file(0, 4), mem(BASE, 4)]);
    p.drive();
    assert_eq!(p.i.broken, None);
    for op in [a, b, c] {
        match p.i.outcome(op) {
            Some(Outcome::Refused(Status::NotAllowed, m)) => {
                assert!(m.contains("entry 1") && m.contains("must all be memory or all be files"), "{m}")
            }
            other => panic!("op {op}: {other:?}"),
        }
    }
    assert!(p.t.memory[&MEM].1.iter().all(|&b| b == 0), "memory untouched");
    assert!(p.t.files[&FILE].iter().all(|&b| b == 0), "file untouched");
    assert!(p.t.closed.is_none(), "a refusal keeps the connection");
}
