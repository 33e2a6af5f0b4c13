//! Sockets the way a test wants them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// A TCP connection to `dst` from source address `src`: another loopback
/// address, such as 127.0.0.2, stands for another host.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from((src, 0)).into()).unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s.connect(&dst.into()).unwrap_or_else(|e| panic!("connect {dst} from {src}: {e}"));
    s.into()
}

/// A TCP forwarder on a free loopback port that dies like a crashed server
/// once clients sent it `cut_after` bytes: every connection is shut down
/// and new ones are refused. Stops on drop.
#[derive(Debug)]
pub struct CutProxy {
    /// The port clients connect to.
    pub port: u16,
    dead: Arc<AtomicBool>,
    /// Bytes clients sent so far.
    pub sent: Arc<AtomicU64>,
}

impl CutProxy {
    /// Forwards to `upstream` until clients sent `cut_after` bytes.
    pub fn start(upstream: SocketAddr, cut_after: u64) -> CutProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        l.set_nonblocking(true).expect("nonblocking listener");
        let port = l.local_addr().expect("proxy address").port();
        let dead = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, s) = (dead.clone(), sent.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(upstream) else { continue };
                        let mut list = conns.lock().expect("proxy lock");
                        for c in [&client, &server] {
                            list.push(c.try_clone().expect("clone"));
                        }
                        drop(list);
                        let up = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                        pump(up.0, up.1, Some((s.clone(), cut_after, d.clone(), conns.clone())));
                        pump(server, client, None);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // Dead: the listener goes (connects are refused from now on).
        });
        CutProxy { port, dead, sent }
    }

    /// Whether it has cut.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.dead.store(true, Ordering::SeqCst);
    }
}

type Cut = (Arc<AtomicU64>, u64, Arc<AtomicBool>, Arc<Mutex<Vec<TcpStream>>>);

/// Copies `from` → `to` on a thread; with `cut`, counts the bytes and
/// shuts every connection down once the count passes the limit.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: Option<Cut>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some((sent, limit, dead, conns)) = &cut {
                if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > *limit || dead.load(Ordering::SeqCst) {
                    dead.store(true, Ordering::SeqCst);
                    for c in conns.lock().expect("proxy lock").iter() {
                        let _ = c.shutdown(Shutdown::Both);
                    }
                    break;
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
