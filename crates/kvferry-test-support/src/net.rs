//! Sockets the way a test wants them.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use socket2::{Domain, Socket, Type};

/// A TCP connection to `dst` from source address `src`: another loopback
/// address, such as 127.0.0.2, stands for another host.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from((src, 0)).into()).unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s.connect(&dst.into()).unwrap_or_else(|e| panic!("connect {dst} from {src}: {e}"));
    s.into()
}
