//! Hand-crafted frames against a TCP target in another process: a bad key,
//! an out-of-bounds range, an unknown frame type and an absurd length are
//! refused with an error status, and the target's memory is unchanged.

mod tcp_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kvferry::backend::tcp::proto::{ConnInfo, Entry, FrameType, Header, Status, Welcome, MAX_FRAME_DATA};
use kvferry::backend::AccessKey;
use kvferry::metadata::AgentMetadata;
use kvferry_test_support::tcp_wire::{answer, frame, hello, read_welcome};
use kvferry_test_support::{pattern_byte, unhex};
use tcp_support::PeerProc;

peer_entry!();

struct Target {
    port: u16,
    instance: u64,
    key: AccessKey,
    addr: u64,
    len: u64,
}

fn target(peer: &mut PeerProc) -> Target {
    let md = peer.cmd("md");
    let md = AgentMetadata::decode(&unhex(md.strip_prefix("MD ").unwrap())).unwrap();
    let tcp = md.backends.iter().find(|b| b.name == "TCP").unwrap();
    let info = ConnInfo::decode(tcp.conn_info.as_ref().unwrap()).unwrap();
    let r = &md.regions[0];
    Target { port: info.port, instance: md.instance, key: r.key, addr: r.addr, len: r.len }
}

fn connect(t: &Target, token: &[u8]) -> (TcpStream, Welcome) {
    let mut s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello(1, t.instance, "raw", token)).unwrap();
    let w = read_welcome(&mut s).unwrap();
    (s, w)
}

#[test]
fn bad_keys_and_ranges_are_refused_and_memory_is_unchanged() {
    let mut peer = PeerProc::spawn("raw-peer1", 1 << 20, &[], &[]);
    let t = target(&mut peer);
    let (mut s, w) = connect(&t, b"");
    assert_eq!(w.status, Status::Ok, "{}", w.message);
    let junk = [0xeeu8; 64];

    // A WRITE with a key that was never published.
    let bad_key = Entry { key: AccessKey([0x5a; 16]), addr: t.addr, len: 64 };
    s.write_all(&frame(FrameType::Write, 1, &[bad_key], &junk)).unwrap();
    let (h, msg) = answer(&mut s);
    assert_eq!((h.ty, h.status, h.op), (FrameType::Error, Status::NotAllowed, 1), "{}", String::from_utf8_lossy(&msg));

    // The right key, 32 bytes past the end of the region.
    let oob = Entry { key: t.key, addr: t.addr + t.len - 32, len: 64 };
    s.write_all(&frame(FrameType::Write, 2, &[oob], &junk)).unwrap();
    let (h, _) = answer(&mut s);
    assert_eq!((h.ty, h.status, h.op), (FrameType::Error, Status::NotAllowed, 2));

    // Before the start, and an address that overflows.
    let before = Entry { key: t.key, addr: t.addr - 64, len: 64 };
    let wrap = Entry { key: t.key, addr: u64::MAX - 8, len: 64 };
    for (op, e) in [(3, before), (4, wrap)] {
        s.write_all(&frame(FrameType::Write, op, &[e], &junk)).unwrap();
        let (h, _) = answer(&mut s);
        assert_eq!((h.ty, h.status, h.op), (FrameType::Error, Status::NotAllowed, op));
    }

    // A READ out of bounds gets no data, only an error.
    s.write_all(&frame(FrameType::Read, 5, &[oob], &[])).unwrap();
    let (h, _) = answer(&mut s);
    assert_eq!((h.ty, h.status), (FrameType::Error, Status::NotAllowed));

    // One good entry and one bad one in the same frame: nothing is applied.
    let good = Entry { key: t.key, addr: t.addr, len: 64 };
    s.write_all(&frame(FrameType::Write, 6, &[good, bad_key], &[0xee; 128])).unwrap();
    let (h, _) = answer(&mut s);
    assert_eq!((h.ty, h.status), (FrameType::Error, Status::NotAllowed));

    // Lengths that do not add up.
    let mut lie = frame(FrameType::Write, 7, &[good], &junk);
    lie[16..24].copy_from_slice(&63u64.to_le_bytes());
    lie.pop();
    s.write_all(&lie).unwrap();
    let (h, _) = answer(&mut s);
    assert_eq!((h.ty, h.status), (FrameType::Error, Status::Malformed));

    // Memory unchanged, and the connection still serves a valid READ.
    assert_eq!(peer.cmd(&format!("check 1 0 {}", t.len)), "OK");
    s.write_all(&frame(FrameType::Read, 8, &[good], &[])).unwrap();
    let (h, data) = answer(&mut s);
    assert_eq!((h.ty, h.op), (FrameType::Data, 8));
    assert_eq!(data, (0..64).map(|i| pattern_byte(1, i)).collect::<Vec<u8>>());

    // A valid WRITE is applied and acknowledged.
    s.write_all(&frame(FrameType::Write, 9, &[good], &junk)).unwrap();
    let (h, _) = answer(&mut s);
    assert_eq!((h.ty, h.op), (FrameType::Ack, 9));
    assert_eq!(peer.cmd("check 1 0 64"), "BAD 0");
    assert_eq!(peer.cmd(&format!("check 1 64 {}", t.len - 64)), "OK");
}

#[test]
fn unknown_types_absurd_lengths_and_bad_hellos_are_rejected() {
    let mut peer = PeerProc::spawn("raw-peer2", 1 << 20, &[("KVFERRY_AUTH_TOKEN", "tok")], &[]);
    let t = target(&mut peer);

    // Unknown frame type: an error, then the connection is closed.
    let (mut s, w) = connect(&t, b"tok");
    assert_eq!(w.status, Status::Ok);
    let mut b = Header::new(FrameType::Ack, 11, 0, 0).encode();
    b[0] = 0x42;
    s.write_all(&b).unwrap();
    let (h, msg) = answer(&mut s);
    assert_eq!((h.ty, h.status), (FrameType::Error, Status::Malformed));
    assert!(String::from_utf8_lossy(&msg).contains("unknown frame type"));
    assert_eq!(s.read(&mut [0u8; 1]).unwrap_or(0), 0, "connection closed");

    // An absurd length: refused before any byte is trusted.
    let (mut s, _) = connect(&t, b"tok");
    let mut b = Header::new(FrameType::Write, 12, 1, 1).encode();
    b[16..24].copy_from_slice(&(MAX_FRAME_DATA * 4).to_le_bytes());
    s.write_all(&b).unwrap();
    let (h, _) = answer(&mut s);
    assert_eq!((h.ty, h.status), (FrameType::Error, Status::Malformed));

    // A frame type only a target sends.
    let (mut s, _) = connect(&t, b"tok");
    s.write_all(&Header::new(FrameType::Ack, 13, 0, 0).encode()).unwrap();
    let (h, _) = answer(&mut s);
    assert_eq!((h.ty, h.status), (FrameType::Error, Status::Malformed));

    // Wrong token, no token, wrong instance: refused at the handshake.
    let (_, w) = connect(&t, b"nope");
    assert_eq!(w.status, Status::AuthRefused);
    assert!(w.message.contains("auth token"), "{}", w.message);
    let (_, w) = connect(&t, b"");
    assert_eq!(w.status, Status::AuthRefused);
    let stale = Target { instance: t.instance ^ 1, ..t };
    let (_, w) = connect(&stale, b"tok");
    assert_eq!(w.status, Status::WrongInstance);

    // Not our protocol at all.
    let mut s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: example.invalid\r\n\r\n").unwrap();
    assert_eq!(read_welcome(&mut s).unwrap().status, Status::Malformed);
    assert_eq!(peer.cmd("check 1 0 1048576"), "OK");
}
