//! The agent never calls a backend while holding a lock the request path
//! takes: a backend slow to load one peer (SHM reads /proc, TCP may dial)
//! does not stall requests to other peers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use kvferry::backend::{
    Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, PeerInfo, Region, XferPlan, XferState,
};
use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, ParamSpec, Params, Result, XferOp};

/// While set, `load_remote` waits (up to 10 s) until it is cleared.
static BLOCK: AtomicBool = AtomicBool::new(false);
/// Set by `load_remote` once it is blocked.
static ENTERED: AtomicBool = AtomicBool::new(false);

#[derive(Debug)]
struct SlowLoadPlugin;

impl BackendPlugin for SlowLoadPlugin {
    fn name(&self) -> &str {
        "SLOWLOAD"
    }
    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram]
    }
    fn params(&self) -> &'static [ParamSpec] {
        &[]
    }
    fn create(&self, _ctx: BackendContext, _params: &Params) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(SlowLoad))
    }
}

#[derive(Debug)]
struct SlowLoad;

impl Backend for SlowLoad {
    fn name(&self) -> &str {
        "SLOWLOAD"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { mem_types: vec![MemType::Dram], local: false, remote: true, notifications: false, rank: 1 }
    }
    fn params(&self) -> Params {
        Params::new()
    }
    fn register(&self, _region: &Region) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn deregister(&self, _region: &Region) -> Result<()> {
        Ok(())
    }
    fn load_remote(&self, _peer: &PeerInfo) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(10);
        while BLOCK.load(Ordering::SeqCst) && Instant::now() < until {
            ENTERED.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
    fn unload_remote(&self, _peer: &str) {}
    fn prepare(&self, _plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        Ok(Box::new(Done))
    }
    fn send_notification(&self, _peer: &str, _msg: &[u8]) -> Result<()> {
        Err(kvferry::Error::not_supported("SLOWLOAD has no notifications"))
    }
}

#[derive(Debug)]
struct Done;

impl BackendXfer for Done {
    fn post(&mut self, _notif: Option<&[u8]>) -> Result<XferState> {
        Ok(XferState::Done)
    }
    fn poll(&mut self) -> Result<XferState> {
        Ok(XferState::Done)
    }
    fn cancel(&mut self) {}
}

fn agent(name: &str) -> Agent {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| kvferry::backend::register_plugin(Arc::new(SlowLoadPlugin)).unwrap());
    let name = format!("{name}-{}", std::process::id());
    Agent::new(&name, AgentConfig::default().with_backend("SLOWLOAD", Params::new())).unwrap()
}

#[test]
fn a_slow_peer_load_does_not_stall_requests_to_other_peers() {
    let (me, fast, slow) = (agent("locks-me"), agent("locks-fast"), agent("locks-slow"));
    let bufs: Vec<AlignedBuf> = (0..3).map(|_| AlignedBuf::new(4096).unwrap()).collect();
    let _regs: Vec<_> = [&me, &fast, &slow].iter().zip(&bufs).map(|(a, b)| a.register_buf(b).unwrap()).collect();
    let fast_name = me.load_remote_metadata(&fast.local_metadata().unwrap()).unwrap();
    let slow_md = slow.local_metadata().unwrap();

    BLOCK.store(true, Ordering::SeqCst);
    let loader = {
        let me = me.clone();
        std::thread::spawn(move || me.load_remote_metadata(&slow_md))
    };
    let t = Instant::now();
    while !ENTERED.load(Ordering::SeqCst) {
        assert!(t.elapsed() < Duration::from_secs(5), "the slow load never reached the backend");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The slow peer's load sits in its backend; requests to the fast peer go on.
    let t = Instant::now();
    let local = bufs[0].xfer_blocks(0, 4096, 1).unwrap();
    let remote = bufs[1].xfer_blocks(0, 4096, 1).unwrap();
    let req = me.create_request(XferOp::Write, &local, &remote, &fast_name, None).unwrap();
    req.post(None).unwrap();
    assert!(me.check_remote(&fast_name, Some(&remote)));
    let took = t.elapsed();
    assert!(!loader.is_finished(), "the slow load was still in its backend");
    BLOCK.store(false, Ordering::SeqCst);
    loader.join().unwrap().unwrap();
    assert!(took < Duration::from_secs(1), "a request to another peer waited {took:?} for a backend's load");
}
