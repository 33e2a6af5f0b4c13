//! Two hosts on one machine: two network namespaces joined by a veth pair,
//! created by a test and removed on drop (even when the test fails). Used
//! by the library's and the CLI's test suites.

use std::process::Command;

/// Namespaces `a` and `b`, with addresses `ip_a` and `ip_b` on the veth pair.
#[derive(Debug)]
pub struct Netns {
    /// The first namespace's name.
    pub a: String,
    /// The second namespace's name.
    pub b: String,
    /// The first namespace's address on the pair.
    pub ip_a: String,
    /// The second namespace's address on the pair.
    pub ip_b: String,
}

/// Runs `ip <args>`; the error says which command failed and why.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Creates the pair. `tag` keeps names apart between test binaries, and
    /// `octet` (the second byte of a 10.x.y.0/24 net) their addresses.
    pub fn create(tag: &str, octet: u32) -> Result<Netns, String> {
        let pid = std::process::id();
        let net = format!("10.{}.{}", octet, pid % 250 + 1);
        let n = Netns {
            a: format!("kvf{tag}-{pid}-a"),
            b: format!("kvf{tag}-{pid}-b"),
            ip_a: format!("{net}.1"),
            ip_b: format!("{net}.2"),
        };
        let (va, vb) = (format!("kv{tag}a{}", pid % 100_000), format!("kv{tag}b{}", pid % 100_000));
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

    /// [`create`](Self::create), or `None` after saying loudly (on stderr and
    /// in the test's output) why namespaces cannot be made here (no root, no `ip`).
    pub fn create_or_skip(tag: &str, octet: u32) -> Option<Netns> {
        match Netns::create(tag, octet) {
            Ok(n) => Some(n),
            Err(why) => {
                eprintln!("\n*** SKIPPED: cannot create network namespaces: {why} ***\n");
                println!("SKIPPED: cannot create network namespaces: {why}");
                None
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}
