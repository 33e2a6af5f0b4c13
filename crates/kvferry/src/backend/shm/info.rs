//! What an SHM backend publishes so that peers on its host can reach it
//! (its connection info), and how a peer checks that it is still current.
//!
//! ```text
//! version u8 = 1 │ pid u32 │ start_time u64 │ nonce u64 │ nonce_addr u64 │ socket name (len u16, bytes)
//! ```
//!
//! `pid` + `start_time` name the process exactly (a restarted process has a
//! new start time even if it reuses the pid). `nonce` is a random number the
//! backend keeps at `nonce_addr` in its own memory: a peer reads it through
//! cross-memory attach when it loads the info, which proves both that the
//! kernel lets it attach and that the pid still is the process that published
//! the info. The socket name is the abstract Unix socket of the control channel.

use crate::error::{Error, Result};

const VERSION: u8 = 1;

/// An SHM backend's connection info, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Process id (in the PID namespace both sides share).
    pub pid: u32,
    /// Process start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// The backend instance's random nonce.
    pub nonce: u64,
    /// Where the nonce lives in the publishing process.
    pub nonce_addr: u64,
    /// Abstract-namespace name of the control socket (without the leading NUL).
    pub socket: Vec<u8>,
}

impl ConnInfo {
    /// Encodes the info as published in metadata.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(31 + self.socket.len());
        v.push(VERSION);
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.start_time.to_le_bytes());
        v.extend_from_slice(&self.nonce.to_le_bytes());
        v.extend_from_slice(&self.nonce_addr.to_le_bytes());
        v.extend_from_slice(&(self.socket.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.socket);
        v
    }

    /// Decodes a peer's info; bad bytes are a `Malformed` error naming what is wrong.
    pub fn decode(b: &[u8]) -> Result<ConnInfo> {
        let bad = |what: &str| Error::malformed(format!("SHM connection info ({} bytes): {what}", b.len()));
        let (&version, rest) = b.split_first().ok_or_else(|| bad("empty"))?;
        if version != VERSION {
            return Err(bad(&format!("version {version}, this build reads version {VERSION}; upgrade the older side")));
        }
        if rest.len() < 30 {
            return Err(bad("truncated"));
        }
        let u64_at = |o: usize| u64::from_le_bytes(rest[o..o + 8].try_into().unwrap_or([0; 8]));
        let pid = u32::from_le_bytes(rest[0..4].try_into().unwrap_or([0; 4]));
        let start_time = u64_at(4);
        let nonce = u64_at(12);
        let nonce_addr = u64_at(20);
        let n = u16::from_le_bytes([rest[28], rest[29]]) as usize;
        let socket = rest.get(30..).filter(|s| s.len() == n).ok_or_else(|| bad("socket name length does not match"))?;
        if pid == 0 || pid > i32::MAX as u32 || socket.is_empty() || nonce_addr == 0 {
            return Err(bad("pid, socket name or nonce address is empty or out of range"));
        }
        Ok(ConnInfo { pid, start_time, nonce, nonce_addr, socket: socket.to_vec() })
    }
}

/// The start time (clock ticks since boot) of process `pid`, or `None` if no
/// such process exists (or `/proc` cannot tell).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and ')'; fields resume after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); field 22 is the 20th from there.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None; // exited, not yet reaped: it is gone for our purposes
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_bytes() {
        let i = ConnInfo { pid: 42, start_time: 7, nonce: 9, nonce_addr: 0x1000, socket: b"kvferry-x".to_vec() };
        let b = i.encode();
        assert_eq!(ConnInfo::decode(&b).unwrap(), i);
        for cut in 0..b.len() {
            assert!(ConnInfo::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(ConnInfo::decode(&v2).unwrap_err().message().contains("version 2"));
        let mut long = b.clone();
        long.push(0);
        assert!(ConnInfo::decode(&long).is_err());
    }

    #[test]
    fn own_start_time_matches_host_id() {
        let me = crate::host::HostId::current();
        assert_eq!(process_start_time(me.pid), Some(me.start_time));
        assert_eq!(process_start_time(i32::MAX as u32), None);
    }
}
