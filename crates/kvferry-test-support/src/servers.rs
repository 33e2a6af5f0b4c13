//! Real components a test starts: etcd (Debian's `etcd-server`) on free
//! loopback ports with a temporary data directory. The metadata server is
//! the library's own (`kvferry::metadata::server::MetaServer::start`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::names::free_port;

/// A running etcd, killed and its data directory removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: std::process::Child,
    dir: PathBuf,
    /// Its client URL, `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its client port.
    pub port: u16,
}

impl Etcd {
    /// Starts etcd on a free port and waits until it answers, or panics saying why.
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
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("etcd is not installed: apt-get install etcd-server (scripts/test.sh installs it)");
        let child = Command::new(bin)
            .args(["--name", "kvferry-test", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("kvferry-test={peer_url}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        let e = Etcd { child, dir, url, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = (|| -> std::io::Result<bool> {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out.contains("true"))
            })()
            .unwrap_or(false);
            if ok {
                return e;
            }
            assert!(Instant::now() < deadline, "etcd on port {port} did not become healthy within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Etcd {
    /// POSTs JSON `body` to `path` of etcd's JSON API (what a test sets up
    /// behind the client's back: compaction, users); returns the answer's body.
    pub fn post(&self, path: &str, body: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("etcd answers");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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

/// A running S3-compatible server (moto's, through `scripts/s3_test_server.py`)
/// on a free loopback port, with authentication on and one bucket; killed
/// on drop (it keeps everything in memory: nothing is left behind).
#[derive(Debug)]
pub struct S3 {
    child: crate::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Its port.
    pub port: u16,
    /// The bucket it made.
    pub bucket: String,
    /// Keys it accepts.
    pub access_key: String,
    /// The secret of `access_key`.
    pub secret_key: String,
}

/// The Python with moto: `KVFERRY_TEST_PYTHON`, else the workspace's
/// `.venv-test` (what `./scripts/test.sh` makes), else `python3`.
pub fn test_python() -> PathBuf {
    if let Some(p) = std::env::var_os("KVFERRY_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv-test/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl S3 {
    /// Starts the server and waits until it serves, or panics saying why.
    pub fn start() -> S3 {
        let script = workspace_root().join("scripts/s3_test_server.py");
        let py = test_python();
        let mut cmd = Command::new(&py);
        cmd.arg(&script).stderr(Stdio::null());
        let mut child = crate::process::Child::spawn("the S3 test server", &mut cmd, "");
        let line = child.try_line(Duration::from_secs(60)).unwrap_or_else(|| {
            panic!(
                "the S3 test server ({} {}) did not start within 60 s: pip install 'moto[server]' boto3 into it \
                 (./scripts/test.sh installs both into .venv-test), or point KVFERRY_TEST_PYTHON at a Python that has them",
                py.display(),
                script.display()
            )
        });
        let field = |k: &str| -> String {
            let pat = format!("\"{k}\": \"");
            let at = line.find(&pat).unwrap_or_else(|| panic!("the S3 test server printed no {k}: {line}")) + pat.len();
            line[at..].split('"').next().unwrap_or_default().to_string()
        };
        let endpoint = field("endpoint");
        let port = endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the endpoint");
        S3 {
            endpoint,
            port,
            bucket: field("bucket"),
            access_key: field("access_key"),
            secret_key: field("secret_key"),
            child,
        }
    }

    /// OBJ backend parameters that reach this server, in `(name, value)` pairs.
    pub fn params(&self) -> Vec<(&'static str, String)> {
        vec![
            ("bucket", self.bucket.clone()),
            ("endpoint_override", self.endpoint.clone()),
            ("access_key", self.access_key.clone()),
            ("secret_key", self.secret_key.clone()),
            ("region", "us-east-1".into()),
        ]
    }

    /// Kills the server now.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}
