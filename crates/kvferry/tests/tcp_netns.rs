//! Two hosts on one machine: the peer and the initiator run in two network
//! namespaces joined by a veth pair (10.x addresses), created and removed by
//! the test itself. Where namespaces cannot be created (no root, no `ip`),
//! the test says so loudly and returns.

mod tcp_support;

use std::time::Duration;

use kvferry::{AlignedBuf, Params, XferOp};
use kvferry_test_support::netns::Netns;
use kvferry_test_support::{fill, first_mismatch};
use kvferry_test_support::{rerun_self, Child};
use tcp_support::{fetch, PeerProc};

peer_entry!();

/// The initiator role, run inside namespace A.
#[test]
#[ignore = "run by two_hosts_in_network_namespaces inside a namespace"]
fn initiator_entry() {
    if std::env::var("KVF_TCP_ROLE").as_deref() != Ok("initiator") {
        return;
    }
    let env = |k: &str| std::env::var(k).unwrap();
    let (peer_ip, md_port, addr, len): (String, u16, u64, usize) = (
        env("KVF_PEER_IP"),
        env("KVF_PEER_PORT").parse().unwrap(),
        env("KVF_PEER_ADDR").parse().unwrap(),
        env("KVF_LEN").parse().unwrap(),
    );
    let a = tcp_support::initiator("tn-init", Params::new());
    fetch(&a, "tn-peer", &peer_ip, md_port);
    let mut src = AlignedBuf::new(len).unwrap();
    fill(src.as_mut_slice(), 33);
    let back = AlignedBuf::new(len).unwrap();
    let _r = a.register_buf(&src).unwrap();
    let _r2 = a.register_buf(&back).unwrap();
    let mut remote = kvferry::XferDescList::new(kvferry::MemType::Dram);
    remote.push(kvferry::XferDesc::new(addr, len as u64, 0));
    let w = a
        .create_request(XferOp::Write, &src.xfer_blocks(0, len, 1).unwrap(), &remote, "tn-peer", Some(b"across"))
        .unwrap();
    w.post(None).unwrap();
    w.wait(Duration::from_secs(30)).unwrap();
    let r = a.create_request(XferOp::Read, &back.xfer_blocks(0, len, 1).unwrap(), &remote, "tn-peer", None).unwrap();
    r.post(None).unwrap();
    r.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(first_mismatch(back.as_slice(), 33, 0, len), None);
    println!("\nKVF PASS");
}

#[test]
fn two_hosts_in_network_namespaces() {
    let Some(ns) = Netns::create_or_skip("t", 101) else { return };
    let len = 8 << 20;
    let mut peer = PeerProc::spawn("tn-peer", len, &[("KVF_TCP_LISTEN", &ns.ip_b)], &["ip", "netns", "exec", &ns.b]);
    let mut cmd = rerun_self("initiator_entry", true, &["ip", "netns", "exec", &ns.a]);
    cmd.env("KVF_TCP_ROLE", "initiator")
        .env("KVF_PEER_IP", &ns.ip_b)
        .env("KVF_PEER_PORT", peer.md_port.to_string())
        .env("KVF_PEER_ADDR", peer.buf_addr.to_string())
        .env("KVF_LEN", len.to_string())
        .env_remove("KVFERRY_AUTH_TOKEN");
    let mut child = Child::spawn("the initiator", &mut cmd, "");
    let Some(status) = child.exits_within(Duration::from_secs(60)) else {
        panic!("the initiator in namespace {} did not finish within 60 s", ns.a);
    };
    let out = child.rest_of_output(Duration::from_secs(5)).join("\n");
    assert!(status.success() && out.contains("KVF PASS"), "initiator failed ({status}):\n{out}");
    assert_eq!(peer.cmd("notifs 1 10000"), "NOTIFS tn-init:across");
    assert_eq!(peer.cmd(&format!("check 33 0 {len}")), "OK");
}
