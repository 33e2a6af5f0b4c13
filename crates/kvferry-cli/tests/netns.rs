//! Two hosts on one machine: `kvferry` targets and initiators in two network
//! namespaces joined by a veth pair, created and removed here. Where
//! namespaces cannot be made (no root, no `ip`), the test says so loudly.

use std::process::{Command, Stdio};
use std::time::Duration;

use kvferry_test_support::netns::Netns;
use kvferry_test_support::Child;

/// Runs `kvferry <args>` as a target inside `ns`, returns it and its port.
fn target(ns: &str, args: &[&str]) -> (Child, String) {
    let mut child = Child::spawn(
        "the target",
        Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_kvferry")])
            .args(args)
            .stderr(Stdio::inherit()),
        "",
    );
    let line = child.line(Duration::from_secs(60));
    let port = line.trim().rsplit(':').next().expect("the target prints its address").to_string();
    (child, port)
}

/// Waits for a target to leave after its initiator is done; kills it after 30 s.
fn reap(mut t: Child) {
    if t.exits_within(Duration::from_secs(30)).is_none() {
        t.kill();
        panic!("the target did not leave within 30 s of its initiator");
    }
}

fn initiator(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip").args(["netns", "exec", ns, env!("CARGO_BIN_EXE_kvferry")]).args(args).output().unwrap()
}

#[test]
fn memory_and_remote_files_between_two_namespaces() {
    let Some(ns) = Netns::create_or_skip("c", 201) else { return };
    // Memory over TCP.
    let (t, port) =
        target(&ns.a, &["bench", "p2p", "--mode", "target", "--backend", "tcp", "--ip", &ns.ip_a, "--port", "0"]);
    let o = initiator(
        &ns.b,
        &[
            "bench",
            "p2p",
            "--mode",
            "initiator",
            "--backend",
            "tcp",
            "--ip",
            &ns.ip_a,
            "--port",
            &port,
            "--block-sizes",
            "4K,1M",
            "--iters",
            "10",
            "--check-consistency",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    reap(t);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);

    // Remote file segments: the target exports files in namespace A.
    let dir = format!("/var/tmp/kvferry-netns-{}", std::process::id());
    for op in ["write", "read"] {
        let (t, port) = target(
            &ns.a,
            &[
                "bench",
                "storage",
                "--mode",
                "target",
                "--op",
                op,
                "--ip",
                &ns.ip_a,
                "--port",
                "0",
                "--dir",
                &dir,
                "--file-size",
                "8M",
            ],
        );
        let o = initiator(
            &ns.b,
            &[
                "bench",
                "storage",
                "--mode",
                "initiator",
                "--op",
                op,
                "--ip",
                &ns.ip_a,
                "--port",
                &port,
                "--block-sizes",
                "64K",
                "--batch-size",
                "4",
                "--iters",
                "10",
                "--check-consistency",
                "--json",
            ],
        );
        assert!(o.status.success(), "{op}: {}", String::from_utf8_lossy(&o.stderr));
        reap(t);
        let line = String::from_utf8_lossy(&o.stdout);
        assert!(line.contains("\"verified\":true") && line.contains("\"backend\":\"TCP\""), "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
