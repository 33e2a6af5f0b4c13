//! Drivers shared by the always-run randomized test
//! (`crates/kvferry/tests/fuzz_decoders.rs`) and the `cargo fuzz` targets
//! (`fuzz/fuzz_targets/*.rs`). Each takes arbitrary bytes and must never
//! panic; where a decoder accepts its input, re-encoding must decode to the
//! same value.

use std::collections::HashMap;
use std::time::Duration;

use kvferry::backend::shm::{info as shm_info, wire as shm_wire};
use kvferry::backend::tcp::proto;
use kvferry::backend::AccessKey;
use kvferry::metadata::codec::AgentMetadata;
use kvferry::metadata::listener::{self, ListenerRequest};
use kvferry::{Agent, AlignedBuf, MemType, RegDescList, Request, XferDesc, XferDescList, XferOp};

/// The metadata blob decoder, and a round trip of what it accepts.
pub fn metadata(data: &[u8]) {
    if let Ok(m) = AgentMetadata::decode(data) {
        let again = AgentMetadata::decode(&m.encode()).expect("a decoded blob re-encodes to a decodable one");
        assert_eq!(again, m);
        for b in &m.backends {
            let _ = m.extension(&b.name);
        }
    }
}

/// Both descriptor list decoders, and what callers do next with a list.
pub fn desc_lists(data: &[u8]) {
    if let Ok(l) = XferDescList::from_bytes(data) {
        let _ = l.validate(false);
        let _ = l.validate(true);
        let _ = l.total_len();
        assert_eq!(XferDescList::from_bytes(&l.to_bytes()).expect("round trip"), l);
    }
    if let Ok(l) = RegDescList::from_bytes(data) {
        let _ = l.validate(false);
        let _ = l.check_no_overlap();
        let _ = l.trim();
        assert_eq!(RegDescList::from_bytes(&l.to_bytes()).expect("round trip"), l);
    }
}

/// Keys the entry check knows: one region at 0x10000 of 64 KiB, one at the top of the address space.
fn regions() -> HashMap<AccessKey, (u64, u64)> {
    let mut m = HashMap::new();
    m.insert(AccessKey([1; 16]), (0x10000, 0x10000));
    m.insert(AccessKey([2; 16]), (u64::MAX - 0xfff, 0x1000));
    m
}

/// The TCP wire protocol: the first byte picks the decoder, the rest is its input.
pub fn tcp_proto(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 5 {
        0 => {
            if let Some(hb) = rest.get(..proto::HEADER_LEN) {
                let hb: &[u8; proto::HEADER_LEN] = hb.try_into().expect("length checked");
                if let Ok(h) = proto::Header::decode(hb) {
                    assert_eq!(proto::Header::decode(&h.encode()).expect("round trip"), h);
                    let _ = h.entries_len();
                    // Entries that follow: the target's check before any byte moves.
                    let table = &rest[proto::HEADER_LEN..];
                    let _ = proto::check_entries(&h, table, &regions());
                    for i in [0, 1, h.count as usize, usize::MAX / proto::ENTRY_LEN, usize::MAX] {
                        let _ = proto::Entry::decode(table, i);
                    }
                }
            }
        }
        1 => {
            if let Some(fixed) = rest.get(..proto::HELLO_FIXED) {
                let _ = proto::Hello::rest_len(fixed.try_into().expect("length checked"));
            }
            if let Ok(h) = proto::Hello::decode(rest) {
                let _ = h.check(7, None);
                let _ = h.check(h.expect_instance, kvferry::AuthToken::new("secret").ok().as_ref());
                let mut out = Vec::new();
                h.encode(&mut out);
                assert_eq!(proto::Hello::decode(&out).expect("round trip"), h);
            }
        }
        2 => {
            if let Some(fixed) = rest.get(..proto::WELCOME_FIXED) {
                let _ = proto::Welcome::rest_len(fixed.try_into().expect("length checked"));
            }
            if let Ok(w) = proto::Welcome::decode(rest) {
                let _ = w.status.error_kind();
            }
        }
        3 => {
            if let Ok(c) = proto::ConnInfo::decode(rest) {
                assert_eq!(proto::ConnInfo::decode(&c.encode()).expect("round trip"), c);
            }
        }
        _ => {
            let table_len = rest.len() - rest.len() % proto::ENTRY_LEN;
            let table = &rest[..table_len];
            let count = (table_len / proto::ENTRY_LEN) as u32;
            let sum = (0..count as usize)
                .filter_map(|i| proto::Entry::decode(table, i))
                .fold(0u64, |a, e| a.wrapping_add(e.len));
            for ty in [proto::FrameType::Write, proto::FrameType::Read] {
                let h = proto::Header::new(ty, 1, count, sum);
                let _ = proto::check_entries(&h, table, &regions());
            }
        }
    }
}

/// The metadata listener's framing and request bodies.
pub fn listener(data: &[u8]) {
    if let Some(hb) = data.get(..listener::HEADER_LEN) {
        let _ = listener::MsgHeader::decode(hb.try_into().expect("length checked"));
    }
    if let Ok((h, token, body)) = listener::decode_msg(data) {
        let again = listener::encode_msg(h.op, token, body).expect("a decoded message re-encodes");
        assert_eq!(again, data);
        if let Ok(ListenerRequest::Send(blob)) = ListenerRequest::decode(h.op, body.to_vec()) {
            metadata(&blob);
        }
    }
}

/// The SHM control wire: length prefix, frames, and the published connection info.
pub fn shm_wire(data: &[u8]) {
    if let Some(p) = data.get(..4) {
        if let Ok(n) = shm_wire::frame_len(p.try_into().expect("length checked")) {
            if let Some(body) = data.get(4..4 + n) {
                if let Ok(f) = shm_wire::Frame::decode(body) {
                    let mut out = Vec::new();
                    f.encode(&mut out);
                    assert_eq!(shm_wire::Frame::decode(&out[4..]).expect("round trip"), f);
                }
            }
        }
    }
    let _ = shm_wire::Frame::decode(data);
    if let Ok(c) = shm_info::ConnInfo::decode(data) {
        assert_eq!(shm_info::ConnInfo::decode(&c.encode()).expect("round trip"), c);
    }
}

/// Valid encodings of everything above, to mutate (target index, bytes):
/// 0 metadata, 1 descriptor lists, 2 TCP protocol, 3 listener, 4 SHM wire.
pub fn seeds() -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    // Metadata of agents with every backend that publishes connection info.
    if let Ok(a) = Agent::with_backends("fuzz-seed-meta", &["local", "tcp", "shm"]) {
        let buf = AlignedBuf::new(64 << 10).expect("64 KiB");
        let _r = a.register_buf(&buf).expect("register");
        if let Ok(m) = a.local_metadata() {
            out.push((0, m));
        }
        if let Ok(m) = a.partial_metadata(&buf.reg_list(), true, &[]) {
            out.push((0, m));
        }
    }
    let mut xl = XferDescList::new(MemType::Dram);
    xl.push(XferDesc::new(0x1000, 4096, 0));
    xl.push(XferDesc::new(u64::MAX - 10, 10, 3));
    out.push((1, xl.to_bytes()));
    let mut rl = RegDescList::new(MemType::File);
    rl.push(kvferry::RegDesc::with_meta(0, 0, 5, b"rw,direct,create:/tmp/x".to_vec()));
    out.push((1, rl.to_bytes()));

    let key = AccessKey([1; 16]);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&proto::Header::new(proto::FrameType::Write, 5, 2, 0x300).encode());
    proto::Entry { key, addr: 0x10000, len: 0x100 }.encode(&mut frame);
    proto::Entry { key, addr: 0x10100, len: 0x200 }.encode(&mut frame);
    out.push((2, frame.clone()));
    frame[0] = 4;
    out.push((2, frame));
    let mut hello = vec![1u8];
    proto::Hello {
        version: proto::VERSION,
        caps: proto::CAPS,
        instance: 9,
        expect_instance: 7,
        name: "peer".into(),
        token: b"secret".to_vec(),
    }
    .encode(&mut hello);
    out.push((2, hello));
    let mut welcome = vec![2u8];
    proto::Welcome {
        version: proto::VERSION,
        status: proto::Status::AuthRefused,
        caps: proto::CAPS,
        instance: 9,
        name: "target".into(),
        message: "no".into(),
    }
    .encode(&mut welcome);
    out.push((2, welcome));
    let mut ci = vec![3u8];
    ci.extend(
        proto::ConnInfo { port: 4000, addrs: vec!["10.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")] }
            .encode(),
    );
    out.push((2, ci));

    for (op, body) in [
        (listener::Op::Fetch, b"peer".to_vec()),
        (listener::Op::Invalidate, [7u8, 0, 0, 0, 0, 0, 0, 0, b'p'].to_vec()),
        (listener::Op::Send, out[0].1.clone()),
    ] {
        out.push((3, listener::encode_msg(op, b"tok", &body).expect("encode")));
    }

    for f in [
        shm_wire::Frame::Hello { version: 1, instance: 3, nonce: 4, token: b"t".to_vec(), name: "n".into() },
        shm_wire::Frame::Welcome,
        shm_wire::Frame::Refuse("why".into()),
        shm_wire::Frame::Notif(b"hello".to_vec()),
        shm_wire::Frame::Query { id: 1, keys: vec![key, AccessKey([9; 16])] },
        shm_wire::Frame::Status { id: 1, live: vec![true, false] },
        shm_wire::Frame::Revoke { seq: 3, key },
        shm_wire::Frame::Ack(3),
    ] {
        let mut v = Vec::new();
        f.encode(&mut v);
        out.push((4, v));
    }
    out.push((
        4,
        shm_info::ConnInfo { pid: 1, start_time: 2, nonce: 3, nonce_addr: 4, socket: b"kvf-shm".to_vec() }.encode(),
    ));
    out
}

/// Runs decoder `target` (as numbered in [`seeds`]) on `data`.
pub fn run(target: usize, data: &[u8]) {
    match target {
        0 => metadata(data),
        1 => desc_lists(data),
        2 => tcp_proto(data),
        3 => listener(data),
        _ => shm_wire(data),
    }
}

/// Reads operation choices from fuzzer bytes; zeros once they run out.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn pick(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.u8() as usize % n
        }
    }
}

const BUF: usize = 64 << 10;

/// A random sequence of agent operations over LOCAL — register,
/// deregister, load (also corrupted) metadata, invalidate, create, post,
/// poll, wait, drop requests, notifications, prepared lists — between two
/// agents and within one. Must never panic and never hang (every wait here
/// is bounded; a caller runs this under a watchdog).
pub fn agent_ops(data: &[u8]) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let names = [format!("fz-a-{}-{n}", std::process::id()), format!("fz-b-{}-{n}", std::process::id())];
    let agents: Vec<Agent> =
        names.iter().map(|nm| Agent::with_backends(nm, &["local"]).expect("LOCAL agent")).collect();
    let bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::new(BUF).expect("buffer")).collect();
    // regs[agent][buf]
    let mut regs: Vec<Vec<Option<kvferry::Registration>>> =
        vec![(0..4).map(|_| None).collect(), (0..4).map(|_| None).collect()];
    let mut reqs: Vec<(usize, Request)> = Vec::new();
    let mut b = Bytes { data, pos: 0 };
    if b.u8() & 1 == 0 {
        // Most sequences start from a working setup, so that requests get made.
        for (ag, a) in agents.iter().enumerate() {
            for i in 0..4 {
                regs[ag][i] = a.register_buf(&bufs[i]).ok();
            }
        }
        for ag in 0..2 {
            if let Ok(m) = agents[1 - ag].local_metadata() {
                let _ = agents[ag].load_remote_metadata(&m);
            }
        }
    }
    let mut steps = 0;
    while !b.done() && steps < 400 {
        steps += 1;
        let ag = b.pick(2);
        let a = &agents[ag];
        match b.u8() % 16 {
            0 | 1 => {
                let i = b.pick(4);
                if regs[ag][i].is_none() {
                    regs[ag][i] = a.register_buf(&bufs[i]).ok();
                }
            }
            2 => {
                let i = b.pick(4);
                if let Some(r) = regs[ag][i].take() {
                    if b.u8() & 1 == 0 {
                        let _ = r.deregister();
                    }
                }
            }
            3 | 4 => {
                if let Ok(m) = agents[1 - ag].local_metadata() {
                    let _ = a.load_remote_metadata(&m);
                }
            }
            5 => {
                // Corrupted metadata: flip a few bytes of a real blob.
                if let Ok(mut m) = agents[1 - ag].local_metadata() {
                    for _ in 0..1 + b.pick(4) {
                        let at = b.u16() as usize;
                        if !m.is_empty() {
                            let len = m.len();
                            m[at % len] ^= b.u8() | 1;
                        }
                    }
                    if b.u8() & 1 == 0 {
                        m.truncate(b.u16() as usize);
                    }
                    let _ = a.load_remote_metadata(&m);
                }
            }
            6 => {
                let _ = a.invalidate_remote(&names[1 - ag]);
            }
            7..=9 => {
                if reqs.len() >= 16 {
                    reqs.remove(0);
                }
                let op = if b.u8() & 1 == 0 { XferOp::Write } else { XferOp::Read };
                let loopback = b.u8() % 4 == 0;
                let peer = if loopback { ag } else { 1 - ag };
                let count = 1 + b.pick(8);
                let (li, ri) = (b.pick(4), b.pick(4));
                let mut local = XferDescList::new(MemType::Dram);
                let mut remote = XferDescList::new(MemType::Dram);
                for _ in 0..count {
                    // Mostly inside the buffers, sometimes past their ends or empty.
                    let len = (b.u16() as u64 % 4096) + u64::from(b.u8() == 0) * 70_000;
                    let lo = b.u16() as u64 % (BUF as u64 - 4096 + u64::from(b.u8() == 0) * 4096);
                    let ro = b.u16() as u64 % (BUF as u64 - 4096 + u64::from(b.u8() == 0) * 4096);
                    let rlen = if b.u8() == 1 { len + 1 } else { len };
                    local.push(XferDesc::new(bufs[li].addr() + lo, len, 0));
                    remote.push(XferDesc::new(bufs[ri].addr() + ro, rlen, u64::from(b.u8() == 2)));
                }
                let notif = (b.u8() & 3 == 0).then_some(&b"fz"[..]);
                if let Ok(r) = a.create_request(op, &local, &remote, &names[peer], notif) {
                    reqs.push((ag, r));
                }
            }
            10 => {
                let k = b.pick(reqs.len());
                if let Some((_, r)) = reqs.get(k) {
                    let notif = (b.u8() & 1 == 0).then_some(&b"p"[..]);
                    let _ = r.post(notif);
                }
            }
            11 => {
                let k = b.pick(reqs.len());
                if let Some((_, r)) = reqs.get(k) {
                    let _ = r.status();
                    let _ = r.wait(Duration::from_millis(u64::from(b.u8() % 4)));
                }
            }
            12 => {
                if !reqs.is_empty() {
                    let k = b.pick(reqs.len());
                    let (_, r) = reqs.remove(k);
                    if b.u8() & 1 == 0 {
                        r.release();
                    }
                }
            }
            13 => {
                let _ = a.send_notification(&names[b.pick(2)], b"n", &[]);
                let _ = agents[1 - ag].take_notifications();
            }
            14 => {
                // Prepared lists and index vectors, indices possibly out of range.
                let (li, ri) = (b.pick(4), b.pick(4));
                let block = 1 + b.pick(8) * 512;
                if let (Ok(l), Ok(r)) = (bufs[li].xfer_blocks(0, block, 8), bufs[ri].xfer_blocks(0, block, 8)) {
                    let peer = &names[b.pick(2)];
                    if let (Ok(pl), Ok(pr)) = (a.prepare_local(&l), a.prepare_remote(peer, &r)) {
                        let n = 1 + b.pick(4);
                        let lidx: Vec<usize> = (0..n).map(|_| b.pick(10)).collect();
                        let ridx: Vec<usize> = (0..n + usize::from(b.u8() == 0)).map(|_| b.pick(10)).collect();
                        if let Ok(r) = a.make_request(XferOp::Write, &pl, &lidx, &pr, &ridx, None, &[]) {
                            let _ = r.post(None);
                            let _ = r.wait(Duration::from_millis(5));
                        }
                    }
                }
            }
            _ => {
                let _ = a.check_remote(&names[1 - ag], None);
                let _ = a.remote_agents();
                let _ = a.partial_metadata(&bufs[b.pick(4)].reg_list(), b.u8() & 1 == 0, &[]).map(|m| {
                    let _ = agents[1 - ag].load_remote_metadata(&m);
                });
            }
        }
    }
    // Teardown in an order a user may choose: requests, then registrations, then agents.
    drop(reqs);
    drop(regs);
    drop(agents);
}
