//! Peer-to-peer metadata exchange, as NIXL users know it: an agent with its
//! listener on serves its metadata on `listen_addr:listen_port`; peers push
//! theirs (`send_local_metadata`), pull (`fetch_remote_metadata`) or withdraw
//! it (`invalidate_local_metadata`).
//!
//! The three calls are asynchronous: they return once the address is parsed
//! and a background thread does the exchange, bounded by
//! [`AgentConfig::metadata_timeout`](crate::AgentConfig::metadata_timeout).
//! [`Agent::check_remote`] tells when a peer's metadata has arrived.

use std::net::{SocketAddr, ToSocketAddrs};

use std::sync::{Arc, Weak};

use super::peers::Origin;
use super::{Agent, AgentInner};
use crate::error::{Error, Result};
use crate::metadata::listener::{self, Caller, Handler, ListenerHandle, ListenerRequest, Op};

impl Agent {
    /// Starts the metadata listener on `port` (0: any free one) of
    /// [`AgentConfig::listener_bind_addr`](crate::AgentConfig::listener_bind_addr)
    /// and returns the port it took. [`Agent::new`] calls it when
    /// `config.listener` is on; an agent built without it can start it later,
    /// once it has created its backends, so that no peer fetches metadata
    /// that lists none (NIXL starts its listener before its backends, and a
    /// fast peer loads an agent it cannot reach). Fails if a listener is on.
    pub fn start_listener(&self, port: u16) -> Result<u16> {
        let mut slot = self.inner.listener.lock();
        if let Some(h) = slot.as_ref() {
            return Err(Error::invalid(format!(
                "agent '{}' already listens on {}; one listener per agent",
                self.name(),
                h.local_addr()
            )));
        }
        let cfg = &self.inner.config;
        let weak: Weak<AgentInner> = Arc::downgrade(&self.inner);
        let handler: Handler = Arc::new(move |caller, req| {
            let agent = weak.upgrade().map(|inner| Agent { inner }).ok_or("the agent is shutting down")?;
            agent.handle_listener(caller, req).map_err(|e| e.to_string())
        });
        let h = ListenerHandle::start(
            SocketAddr::new(cfg.listener_bind_addr(), port),
            cfg.listener_limits,
            cfg.auth_token.clone(),
            handler,
        )?;
        tracing::debug!(agent = %self.name(), addr = %h.local_addr(), "metadata listener started");
        let port = h.port();
        *slot = Some(h);
        Ok(port)
    }

    fn handle_listener(&self, caller: Caller, req: ListenerRequest) -> Result<Option<Vec<u8>>> {
        match req {
            ListenerRequest::Send(blob) => {
                let name = self.load_peer(&blob, Origin::Pushed(caller.addr.ip()), None)?;
                tracing::debug!(agent = %self.name(), peer = %name, from = %caller.addr, "metadata received from a peer");
                Ok(None)
            }
            ListenerRequest::Fetch(name) if name.is_empty() || name == self.name() => Ok(Some(self.local_metadata()?)),
            ListenerRequest::Fetch(name) => {
                Err(Error::not_found(format!("this listener serves agent '{}', not '{name}'", self.name())))
            }
            ListenerRequest::Invalidate { name, instance } => {
                // Without a token, only the address the peer's metadata came
                // from may withdraw it: a stranger cannot evict a peer.
                self.invalidate_if(&name, |p| {
                    if !caller.authenticated && !p.origin.is_from(caller.addr.ip()) {
                        return Err(Error::not_allowed(format!(
                            "INVALIDATE of agent '{name}' from {}: its metadata did not come from that address; without an auth token only the peer itself may withdraw it",
                            caller.addr.ip()
                        )));
                    }
                    // An older instance withdrawing leaves the newer one loaded.
                    Ok(p.instance == instance || instance == 0)
                })
                .map(|_| None)
            }
        }
    }

    /// Opens connections to a loaded peer now rather than on first use
    /// (NIXL's `make_connection`), with every backend that loaded it.
    pub fn make_connection(&self, peer: &str) -> Result<()> {
        let p = self.peer(peer)?;
        for (i, s) in self.slots().iter().enumerate() {
            if p.loaded_mask & (1 << i) != 0 {
                s.backend.connect(peer).map_err(|e| e.context(format!("make_connection to '{peer}'")))?;
            }
        }
        Ok(())
    }

    /// The port the metadata listener is bound to, if the listener is on.
    pub fn listen_port(&self) -> Option<u16> {
        self.inner.listener.lock().as_ref().map(ListenerHandle::port)
    }

    /// The address and port the metadata listener is bound to, if it is on
    /// (see [`AgentConfig::listener_bind_addr`](crate::AgentConfig::listener_bind_addr)).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.inner.listener.lock().as_ref().map(ListenerHandle::local_addr)
    }

    /// Sends `blob` (this agent's full metadata if `None`) to the agent
    /// listening at `addr`, which loads it. Asynchronous: errors are logged.
    pub(crate) fn p2p_send(&self, addr: SocketAddr, blob: Option<Vec<u8>>) -> Result<()> {
        let blob = match blob {
            Some(b) => b,
            None => self.local_metadata()?,
        };
        self.spawn_call("send_local_metadata", addr, Op::Send, blob, None)
    }

    /// Asks the agent listening at `addr`, which must be named `name`, for
    /// its metadata and loads it. Asynchronous: poll
    /// [`check_remote(name, None)`](Agent::check_remote) to know when it arrived.
    pub(crate) fn p2p_fetch(&self, name: &str, addr: SocketAddr) -> Result<()> {
        if name == self.name() {
            return Err(Error::invalid("fetch_remote_metadata: that is this agent's own name"));
        }
        self.spawn_call("fetch_remote_metadata", addr, Op::Fetch, name.as_bytes().to_vec(), Some(name.to_string()))
    }

    /// Tells the agent listening at `addr` to forget this agent (drop its
    /// metadata and close connections to it). Asynchronous.
    pub(crate) fn p2p_invalidate(&self, addr: SocketAddr) -> Result<()> {
        let mut body = self.inner.instance.to_le_bytes().to_vec();
        body.extend_from_slice(self.name().as_bytes());
        self.spawn_call("invalidate_local_metadata", addr, Op::Invalidate, body, None)
    }

    fn spawn_call(
        &self,
        what: &'static str,
        addr: SocketAddr,
        op: Op,
        body: Vec<u8>,
        fetch: Option<String>,
    ) -> Result<()> {
        let agent = self.clone();
        std::thread::Builder::new()
            .name(format!("kvf-md-{what}"))
            .spawn(move || {
                let cfg = agent.config();
                let r = listener::call(addr, cfg.metadata_timeout, cfg.auth_token.as_ref(), op, &body).and_then(
                    |(reply, blob)| match (fetch, reply) {
                        (Some(want), Op::Metadata) => agent
                            .load_peer(&blob, Origin::Fetched(addr.ip()), Some(&want))
                            .map(drop)
                            .map_err(|e| e.context(format!("loading what {addr} served"))),
                        (None, Op::Ok) => Ok(()),
                        (_, other) => Err(Error::malformed(format!("{addr} answered {other:?}"))),
                    },
                );
                if let Err(e) = r {
                    tracing::warn!(agent = %agent.name(), %addr, error = %e, "{what} failed");
                }
            })
            .map_err(|e| Error::io(format!("{what}: cannot spawn a thread"), e))?;
        Ok(())
    }
}

pub(crate) fn resolve(ip: &str, port: u16) -> Result<SocketAddr> {
    if port == 0 {
        return Err(Error::invalid(format!("port 0 for '{ip}': give the peer's listen_port")));
    }
    (ip, port)
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("cannot resolve '{ip}'"), e))?
        .next()
        .ok_or_else(|| Error::invalid(format!("'{ip}' resolves to no address")))
}
