//! Shared helpers for integration tests: unique names and a user-defined
//! backend plugin ("GATED") whose transfers finish only when the test opens
//! a gate, so in-flight states can be observed without timing.

#![allow(dead_code, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};

use kvferry::backend::{
    Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, PeerInfo, Region, XferPlan, XferState,
};
use kvferry::{MemType, ParamSpec, Params, Result};

/// A process-unique agent name with a readable prefix.
pub fn name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Open means posted transfers complete.
pub static GATE_OPEN: AtomicBool = AtomicBool::new(true);
pub static CANCELS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub struct GatedPlugin;

pub const GATED_PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "rank", default: "100", doc: "preference rank" },
    ParamSpec { name: "color", default: "blue", doc: "an opaque value tests read back" },
];

impl BackendPlugin for GatedPlugin {
    fn name(&self) -> &str {
        "GATED"
    }
    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram]
    }
    fn params(&self) -> &'static [ParamSpec] {
        GATED_PARAMS
    }
    fn create(&self, _ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let params = params.resolved(GATED_PARAMS);
        let rank = params.parse::<u16>("GATED", "rank")?;
        Ok(Arc::new(Gated { params, rank }))
    }
}

#[derive(Debug)]
struct Gated {
    params: Params,
    rank: u16,
}

impl Backend for Gated {
    fn name(&self) -> &str {
        "GATED"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mem_types: vec![MemType::Dram],
            local: true,
            remote: true,
            notifications: false,
            rank: self.rank,
        }
    }
    fn params(&self) -> Params {
        self.params.clone()
    }
    fn register(&self, _region: &Region) -> Result<Vec<u8>> {
        Ok(b"gated-public".to_vec())
    }
    fn deregister(&self, _region: &Region) -> Result<()> {
        Ok(())
    }
    fn load_remote(&self, _peer: &PeerInfo) -> Result<()> {
        Ok(())
    }
    fn unload_remote(&self, _peer: &str) {}
    fn prepare(&self, _plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        Ok(Box::new(GatedXfer { posted: false }))
    }
    fn send_notification(&self, _peer: &str, _msg: &[u8]) -> Result<()> {
        Err(kvferry::Error::not_supported("GATED has no notifications"))
    }
}

#[derive(Debug)]
struct GatedXfer {
    posted: bool,
}

impl BackendXfer for GatedXfer {
    fn post(&mut self, _notif: Option<&[u8]>) -> Result<XferState> {
        self.posted = true;
        self.poll()
    }
    fn poll(&mut self) -> Result<XferState> {
        Ok(if GATE_OPEN.load(Ordering::SeqCst) { XferState::Done } else { XferState::InProgress })
    }
    fn cancel(&mut self) {
        CANCELS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Registers the GATED plugin once per process.
pub fn gated_plugin() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| kvferry::backend::register_plugin(Arc::new(GatedPlugin)).unwrap());
}

/// A free TCP port on 127.0.0.1 (bound once, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real etcd (Debian's etcd-server) on free loopback ports with a temporary
/// data directory; killed and cleaned up on drop.
pub struct Etcd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    pub url: String,
    pub port: u16,
}

impl Etcd {
    /// Starts etcd and waits until it answers, or panics saying why.
    pub fn start() -> Etcd {
        Self::start_on(free_port())
    }

    /// Starts etcd with its client port at `port`.
    pub fn start_on(port: u16) -> Etcd {
        Self::start_with(port, &[])
    }

    /// Starts etcd with its client port at `port` and the extra flags `args`.
    pub fn start_with(port: u16, args: &[&str]) -> Etcd {
        let peer = free_port();
        let dir = std::env::temp_dir().join(format!("kvferry-etcd-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let bin = ["etcd", "/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|b| std::process::Command::new(b).arg("--version").output().is_ok())
            .expect("etcd is not installed: apt-get install etcd-server (scripts/test.sh installs it)");
        let child = std::process::Command::new(bin)
            .args(["--name", "kvferry-test", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("kvferry-test={peer_url}")])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcd starts");
        let e = Etcd { child, dir, url, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let ok = (|| -> std::io::Result<bool> {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
                s.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out.contains("true"))
            })()
            .unwrap_or(false);
            if ok {
                return e;
            }
            assert!(std::time::Instant::now() < deadline, "etcd on port {port} did not become healthy within 20 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Etcd {
    /// POSTs JSON `body` to `path` of etcd's JSON API (what a test sets up
    /// behind the client's back: compaction, users); returns the answer's body.
    pub fn post(&self, path: &str, body: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("etcd answers");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let head =
            format!("POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes())).expect("etcd takes the request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("etcd answers");
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(out)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP connection to `dst` from source address `src` (another loopback
/// address, such as 127.0.0.2, stands for another host).
pub fn connect_from(src: std::net::Ipv4Addr, dst: std::net::SocketAddr) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&std::net::SocketAddr::from((src, 0)).into()).unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s.connect(&dst.into()).unwrap_or_else(|e| panic!("connect {dst} from {src}: {e}"));
    s.into()
}
