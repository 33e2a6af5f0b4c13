//! Two hosts on one machine: the peer and the initiator run in two network
//! namespaces joined by a veth pair (10.x addresses), created and removed by
//! the test itself. Where namespaces cannot be created (no root, no `ip`),
//! the test says so loudly and returns.

mod tcp_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvferry::{AlignedBuf, Params, XferOp};
use tcp_support::{fetch, fill, first_mismatch, PeerProc};

peer_entry!();

/// Namespaces and the veth pair; removed on drop, even when the test fails.
struct Netns {
    a: String,
    b: String,
    ip_a: String,
    ip_b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let tag = format!("{:x}{:04x}", pid, Instant::now().elapsed().subsec_nanos() as u16 ^ (pid as u16));
        let n = Netns {
            a: format!("kvft-{tag}-a"),
            b: format!("kvft-{tag}-b"),
            ip_a: format!("10.{}.{}.1", 100 + pid % 100, (pid / 100) % 250),
            ip_b: format!("10.{}.{}.2", 100 + pid % 100, (pid / 100) % 250),
        };
        let (va, vb) = (format!("kva{}", pid % 100_000), format!("kvb{}", pid % 100_000));
        ip(&["netns", "add", &n.a])?;
        ip(&["netns", "add", &n.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &n.a])?;
        ip(&["link", "set", &vb, "netns", &n.b])?;
        ip(&["-n", &n.a, "addr", "add", &format!("{}/24", n.ip_a), "dev", &va])?;
        ip(&["-n", &n.b, "addr", "add", &format!("{}/24", n.ip_b), "dev", &vb])?;
        for (ns, dev) in [(&n.a, &va), (&n.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

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
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("\n*** SKIPPED: cannot create network namespaces: {why} ***\n");
            println!("SKIPPED: cannot create network namespaces: {why}");
            return;
        }
    };
    let len = 8 << 20;
    let mut peer = PeerProc::spawn("tn-peer", len, &[("KVF_TCP_LISTEN", &ns.ip_b)], &["ip", "netns", "exec", &ns.b]);
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.a])
        .arg(&exe)
        .args(["--exact", "initiator_entry", "--ignored", "--nocapture", "--test-threads=1"])
        .env("KVF_TCP_ROLE", "initiator")
        .env("KVF_PEER_IP", &ns.ip_b)
        .env("KVF_PEER_PORT", peer.md_port.to_string())
        .env("KVF_PEER_ADDR", peer.buf_addr.to_string())
        .env("KVF_LEN", len.to_string())
        .env_remove("KVFERRY_AUTH_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the initiator in namespace {} did not finish within 60 s", ns.a);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success() && out.contains("KVF PASS"), "initiator failed ({status}):\n{out}");
    assert_eq!(peer.cmd("notifs 1 10000"), "NOTIFS tn-init:across");
    assert_eq!(peer.cmd(&format!("check 33 0 {len}")), "OK");
}
