//! The floor under a small TCP WRITE: a raw 4 KiB ping-pong between two
//! processes on loopback (4 KiB + 56 bytes of frame out, a 24-byte answer
//! back), with no kvferry in it. Each side either blocks in `read` or polls
//! non-blocking and yields between tries, which shows what a thread wake-up
//! costs on the machine.
//!
//! `cargo run --release -p kvferry --example tcp_pingpong -- [block|poll] [block|poll]`
//! (client mode, then server mode; default `block block`). Prints the average
//! round trip of 5 rounds of 20 000.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

const OUT: usize = 4096 + 56;
const BACK: usize = 24;

/// Reads exactly `buf.len()` bytes, blocking or polling (yield between tries).
fn read_full(s: &mut TcpStream, buf: &mut [u8], poll: bool) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if poll && e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_full(s: &mut TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.write(&buf[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn server(poll: bool) -> io::Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    s.set_nonblocking(poll)?;
    let mut buf = vec![0u8; OUT];
    while read_full(&mut s, &mut buf, poll).is_ok() {
        write_full(&mut s, &buf[..BACK])?;
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        return server(args.get(1).map(String::as_str) == Some("poll"));
    }
    let client_poll = args.first().map(String::as_str) == Some("poll");
    let server_mode = args.get(1).cloned().unwrap_or_else(|| "block".into());
    let mut child =
        Command::new(std::env::current_exe()?).args(["--serve", &server_mode]).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let port: u16 = line.trim().parse().map_err(|_| io::Error::other("bad port line"))?;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_nonblocking(client_poll)?;
    let out = vec![1u8; OUT];
    let mut back = [0u8; BACK];
    let mode = if client_poll { "poll" } else { "block" };
    for round in 0..5 {
        let n = 20_000;
        let t0 = Instant::now();
        for _ in 0..n {
            write_full(&mut s, &out)?;
            read_full(&mut s, &mut back, client_poll)?;
        }
        let us = t0.elapsed().as_secs_f64() / n as f64 * 1e6;
        println!("client {mode}, server {server_mode}, round {round}: {us:.1} µs average round trip");
    }
    drop(s);
    child.wait()?;
    Ok(())
}
