//! The model-based property test of the TCP target (issue 11): random frames
//! over random registrations, memory and files, against a model of what each
//! key may reach.
//!
//! A [`World`] is one target agent (TCP + POSIX, listening on 127.0.0.1) with
//!
//! * DRAM regions carved out of one `mmap`, each in its own block of pages
//!   with `PROT_NONE` guard pages between blocks, and canary bytes in the
//!   slack of a block before and after its region: a target that touches a
//!   guard page faults (the test dies or the connection dies), one that
//!   touches a canary is caught by the byte-for-byte comparison;
//! * FILE regions at offsets inside larger files whose other bytes are
//!   canaries, a length-0 ("whole file") registration, and a file exported
//!   with `register_local_file` whose size is smaller than the file.
//!
//! A hostile client ([`HostileClient`]) sends frames drawn from a
//! [`Source`] (an RNG for the stable test, the fuzzer's bytes for the
//! cargo-fuzz target): random op, 1..8 entries, each entry's key a live
//! memory or file key, a deregistered one or random bytes, addresses and
//! lengths inside, at the edges, outside, overflowing, or in the other
//! kind's coordinates; frames that mix kinds on purpose; lying lengths;
//! batches; notifications; malformed headers; frames cut off mid-way; and
//! deregistration / re-registration between frames.
//!
//! The model predicts each answer under the rules of `docs/TCP.md` and
//! `DESIGN.md`: every entry is checked against the table of its own kind, a
//! frame that mixes kinds or has any entry outside a live region of its kind
//! is refused with `ERROR(NotAllowed)` and touches nothing; an accepted WRITE
//! is applied to the shadow copy, an accepted READ's data is predicted. After
//! every step the whole of every memory block (regions and canaries) and of
//! every file is compared with the shadow.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvferry::backend::tcp::proto::{Entry, FrameType, Status, ENTRY_LEN, HEADER_LEN, MAX_ENTRIES, MAX_FRAME_DATA};
use kvferry::backend::AccessKey;
use kvferry::metadata::AgentMetadata;
use kvferry::{
    Agent, AgentConfig, AlignedBuf, MemType, Params, RegDesc, RegDescList, Registration, XferDesc, XferDescList, XferOp,
};

use crate::tcp_wire::{raw_frame, Answer, HostileClient, TargetAddr};

/// Where the random choices come from.
pub trait Source {
    /// The next byte (0 once a finite source is exhausted).
    fn byte(&mut self) -> u8;
    /// Whether a finite source is exhausted (an RNG never is).
    fn done(&self) -> bool;
    /// A little-endian u16 from two bytes.
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    /// A little-endian u64 from eight bytes.
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }
    /// A number below `n` (0 for `n` = 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.u16() as usize % n
        }
    }
}

/// A finite source: the fuzzer's input.
#[derive(Debug)]
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    /// Reads choices from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }
}

impl Source for Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

pub use crate::rng::Rng;

/// An endless source: [`Rng`], deterministic for a seed.
impl Source for Rng {
    fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }
    fn done(&self) -> bool {
        false
    }
}

const PAGE: usize = 4096;

/// One anonymous mapping, read-write blocks separated by `PROT_NONE` pages.
struct Guarded {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; which thread
// unmaps it does not matter, and every access goes through `World`, which the
// caller synchronizes (`&mut self`).
unsafe impl Send for Guarded {}

impl Guarded {
    /// Maps `pages` pages, all `PROT_NONE`.
    fn new(pages: usize) -> Guarded {
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert!(p != libc::MAP_FAILED, "mmap of {len} bytes failed: {}", std::io::Error::last_os_error());
        Guarded { base: p.cast(), len }
    }

    /// Makes `[off, off + len)` (page-aligned, inside the mapping) read-write.
    fn open(&self, off: usize, len: usize) {
        assert!(off % PAGE == 0 && len % PAGE == 0 && off + len <= self.len);
        // SAFETY: the range lies inside our own mapping (checked above).
        let r = unsafe { libc::mprotect(self.base.add(off).cast(), len, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(r, 0, "mprotect failed: {}", std::io::Error::last_os_error());
    }

    fn addr(&self, off: usize) -> u64 {
        self.base as u64 + off as u64
    }

    /// The bytes of an opened range.
    fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len);
        // SAFETY: the range was opened read-write by `open` (the caller passes
        // block ranges only) and lives as long as `self`; between frames no
        // target thread writes it (every frame sent was answered).
        unsafe { std::slice::from_raw_parts(self.base.add(off), len) }
    }

    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        // SAFETY: as in `slice`, and `&mut self` excludes other test accesses.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(off), len) }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; every registration
        // of it was dropped before (field order of `World`).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A DRAM region: block `[block, block + block_len)` of the mapping, region
/// `[block + off, block + off + len)`, canaries in the rest of the block.
struct MemSlot {
    block: usize,
    block_len: usize,
    off: usize,
    len: usize,
    reg: Option<Registration>,
    key: Option<AccessKey>,
    /// Expected bytes of the whole block.
    shadow: Vec<u8>,
}

/// How a file region is registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileHow {
    /// `register_storage` of `[off, off + len)`, path mode, hinted to POSIX and TCP.
    Range { dev: u64 },
    /// `register_storage` with length 0: the whole file.
    Whole { dev: u64 },
    /// `register_local_file(path, len)`: offsets `0..len` of a larger file.
    Export,
}

/// A FILE region inside a file whose other bytes are canaries.
struct FileSlot {
    path: PathBuf,
    how: FileHow,
    /// Region start (file offset) and length; 0 = the whole file.
    off: u64,
    len: u64,
    reg: Option<Registration>,
    exported: bool,
    key: Option<AccessKey>,
    /// Expected bytes of the whole file.
    shadow: Vec<u8>,
}

impl FileSlot {
    fn live(&self) -> bool {
        self.key.is_some()
    }
}

/// Memory blocks: (pages, region offset in the block, region length).
/// Unaligned starts and ends, a region that fills its block exactly (guard
/// pages on both sides), one that ends at a guard page.
const MEM_LAYOUT: &[(usize, usize, usize)] = &[(2, 100, 5000), (1, 0, 4096), (3, 4103, 4000), (1, 2048, 2048)];

/// Files: (size on disk, how, region offset, region length).
const FILE_LAYOUT: &[(u64, FileHow, u64, u64)] = &[
    (65536, FileHow::Range { dev: 0x501 }, 8192, 16384),
    (16384, FileHow::Range { dev: 0x502 }, 1000, 3000),
    (12288, FileHow::Whole { dev: 0x503 }, 0, 0),
    (32768, FileHow::Export, 0, 20000),
];

/// Offsets a pure-file frame may use on the whole-file region (keeps the
/// file small; larger offsets are used only in frames the model refuses).
const WHOLE_SPAN: u64 = 40960;

/// The canary byte at offset `i` of block or file `slot`.
fn canary(slot: usize, i: usize) -> u8 {
    0xc5 ^ (slot as u8).wrapping_mul(17) ^ (i as u8).wrapping_mul(3) ^ ((i >> 8) as u8)
}

/// The initial byte at offset `i` of region `slot`.
fn initial(slot: usize, i: usize) -> u8 {
    (i as u8).wrapping_mul(29).wrapping_add((slot as u8).wrapping_mul(41)) ^ 0x3c
}

/// The payload byte a WRITE with `seed` carries for target coordinate `x`:
/// overlapping entries of one frame write the same values, so the result does
/// not depend on the order the target applies them in.
fn payload(seed: u64, x: u64) -> u8 {
    ((x ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// What a key names in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mem(usize),
    File(usize),
}

/// The answer the model predicts for one frame.
#[derive(Debug)]
enum Expect {
    /// ACK; then these writes are visible.
    Ack(Vec<(Kind, u64, u64)>),
    /// DATA with exactly these bytes.
    Data(Vec<u8>),
    /// ERROR with one of these statuses; nothing touched; the connection stays.
    Refused(&'static [Status], Why),
    /// ERROR(Malformed), then the target closes the connection.
    Closed,
    /// No answer (NOTIF).
    Nothing,
}

/// Why the model refuses a frame (counted in [`Stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Mixed,
    OutOfBounds,
    DeadKey,
    UnknownKey,
    ZeroLen,
    LyingLen,
    PastEof,
}

const NOT_ALLOWED: &[Status] = &[Status::NotAllowed];
const MALFORMED_OR_NOT_ALLOWED: &[Status] = &[Status::Malformed, Status::NotAllowed];
const STORAGE_OR_NOT_ALLOWED: &[Status] = &[Status::Storage, Status::NotAllowed];

/// What the run exercised: a test asserts each kind happened, so it cannot
/// pass without testing.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Accepted memory WRITE frames.
    pub mem_writes: u64,
    /// Accepted memory READ frames.
    pub mem_reads: u64,
    /// Accepted file WRITE frames.
    pub file_writes: u64,
    /// Accepted file READ frames.
    pub file_reads: u64,
    /// Frames refused because they mix memory and file entries.
    pub mixed: u64,
    /// Refused: an entry outside its key's region.
    pub out_of_bounds: u64,
    /// Refused: a deregistered key.
    pub dead_key: u64,
    /// Refused: a key never registered.
    pub unknown_key: u64,
    /// Refused: an empty entry or a header length that lies.
    pub malformed: u64,
    /// Refused: a whole-file READ past the end of the file.
    pub past_eof: u64,
    /// Frames after which the target closed the connection (bad headers).
    pub closed: u64,
    /// Frames cut off mid-way by the client.
    pub cut: u64,
    /// Notifications sent (and found delivered, in order).
    pub notifs: u64,
    /// Deregistrations and re-registrations.
    pub toggles: u64,
    /// Frames sent in batches (several frames before the first answer).
    pub batched: u64,
    /// Idle hostile connections the target closed when a memory region
    /// their last frame used was deregistered (not an error; reported).
    pub closed_by_deregistration: u64,
}

/// One frame the generator built.
#[derive(Debug)]
struct Frame {
    ty: u8,
    op: u64,
    count: u32,
    header_len: u64,
    entries: Vec<Entry>,
    /// WRITE payload or NOTIF message.
    data: Vec<u8>,
    /// Only the header goes out (the target must refuse it from the header).
    header_only: bool,
    expect: Expect,
}

/// The target, its regions, the model, and a hostile connection to it.
pub struct World {
    client: Option<HostileClient>,
    mems: Vec<MemSlot>,
    files: Vec<FileSlot>,
    agent: Agent,
    target: TargetAddr,
    dir: PathBuf,
    dead: Vec<AccessKey>,
    next_op: u64,
    name: String,
    notifs: Vec<Vec<u8>>,
    last: String,
    /// What was exercised so far.
    pub stats: Stats,
    // Last: unmapped after every registration of it is gone.
    mem: Guarded,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("mem_regions", &self.mems.len())
            .field("file_regions", &self.files.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl World {
    /// A fresh target with every region registered and filled, and a
    /// connected hostile client. `tag` keeps temp paths apart.
    pub fn new(tag: &str) -> World {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tcp = Params::new();
        tcp.set("bind", "127.0.0.1");
        tcp.set("ip", "127.0.0.1");
        let agent = Agent::new(
            &format!("model-{tag}-{}-{n}", std::process::id()),
            AgentConfig::default().with_backend("posix", Params::new()).with_backend("tcp", tcp),
        )
        .expect("target agent with POSIX and TCP");
        let dir = PathBuf::from(format!("/var/tmp/kvferry-model-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");

        // Guard page, then each block followed by a guard page.
        let pages = 1 + MEM_LAYOUT.iter().map(|(p, _, _)| p + 1).sum::<usize>();
        let mut mem = Guarded::new(pages);
        let mut mems = Vec::new();
        let mut at = PAGE;
        for (i, &(p, off, len)) in MEM_LAYOUT.iter().enumerate() {
            let block_len = p * PAGE;
            mem.open(at, block_len);
            let shadow: Vec<u8> = (0..block_len)
                .map(|b| if b >= off && b < off + len { initial(i, b - off) } else { canary(i, b) })
                .collect();
            mem.slice_mut(at, block_len).copy_from_slice(&shadow);
            mems.push(MemSlot { block: at, block_len, off, len, reg: None, key: None, shadow });
            at += block_len + PAGE;
        }
        let mut files = Vec::new();
        for (j, &(size, how, off, len)) in FILE_LAYOUT.iter().enumerate() {
            let path = dir.join(format!("f{j}"));
            let shadow: Vec<u8> = (0..size as usize)
                .map(|b| {
                    let inside = len == 0 || (b as u64 >= off && (b as u64) < off + len);
                    if inside {
                        initial(100 + j, b)
                    } else {
                        canary(100 + j, b)
                    }
                })
                .collect();
            std::fs::write(&path, &shadow).expect("write a temp file");
            files.push(FileSlot { path, how, off, len, reg: None, exported: false, key: None, shadow });
        }
        let target = TargetAddr::of(&agent);
        let name = format!("hostile-{tag}-{n}");
        let mut w = World {
            client: None,
            mems,
            files,
            agent,
            target,
            dir,
            dead: Vec::new(),
            next_op: 1,
            name,
            notifs: Vec::new(),
            last: String::new(),
            stats: Stats::default(),
            mem,
        };
        for i in 0..w.mems.len() {
            w.register_mem(i);
        }
        for j in 0..w.files.len() {
            w.register_file(j);
        }
        w.refresh_keys();
        w.check_all("after setup");
        w
    }

    /// The target agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The target's address.
    pub fn target(&self) -> &TargetAddr {
        &self.target
    }

    fn region_addr(&self, i: usize) -> u64 {
        let m = &self.mems[i];
        self.mem.addr(m.block + m.off)
    }

    fn register_mem(&mut self, i: usize) {
        let list =
            RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(self.region_addr(i), self.mems[i].len as u64, 0)]);
        // SAFETY: the region lies in a read-write block of `self.mem`, which
        // outlives every registration (it is unmapped last, after `mems`);
        // peers may write it at any time: the model accounts for that.
        let reg = unsafe { self.agent.register_mem(&list, &["tcp"]) }.expect("register a DRAM region");
        self.mems[i].reg = Some(reg);
    }

    fn register_file(&mut self, j: usize) {
        let f = &mut self.files[j];
        match f.how {
            FileHow::Range { dev } | FileHow::Whole { dev } => {
                let list = RegDescList::from_descs(
                    MemType::File,
                    vec![RegDesc::with_meta(f.off, f.len, dev, format!("rw:{}", f.path.display()))],
                );
                f.reg = Some(self.agent.register_storage(&list, &["posix", "tcp"]).expect("register a FILE region"));
            }
            FileHow::Export => {
                self.agent.register_local_file(&f.path, f.len, false).expect("export a file");
                f.exported = true;
            }
        }
    }

    /// Reads every live region's key from the target's metadata.
    fn refresh_keys(&mut self) {
        let md = AgentMetadata::decode(&self.agent.local_metadata().expect("metadata")).expect("metadata decodes");
        let exports = self.agent.exported_files();
        for i in 0..self.mems.len() {
            let addr = self.region_addr(i);
            let live = self.mems[i].reg.is_some();
            self.mems[i].key = live.then(|| {
                md.regions
                    .iter()
                    .find(|r| r.mem_type == MemType::Dram && r.addr == addr)
                    .expect("a registered DRAM region is in the metadata")
                    .key
            });
        }
        for f in &mut self.files {
            let dev = match f.how {
                FileHow::Range { dev } | FileHow::Whole { dev } => Some(dev),
                FileHow::Export => exports.iter().find(|e| e.path == f.path).map(|e| e.id),
            };
            let live = f.reg.is_some() || f.exported;
            f.key = match (live, dev) {
                (true, Some(dev)) => Some(
                    md.regions
                        .iter()
                        .find(|r| r.mem_type == MemType::File && r.dev_id == dev)
                        .expect("a registered FILE region is in the metadata")
                        .key,
                ),
                _ => None,
            };
        }
    }

    /// Deregisters a live region (its key joins the dead ones) or registers
    /// a dead one again (with a new key).
    fn toggle(&mut self, pick: usize) {
        self.stats.toggles += 1;
        let n = self.mems.len() + self.files.len();
        let k = pick % n;
        if k < self.mems.len() {
            let m = &mut self.mems[k];
            match m.reg.take() {
                Some(r) => {
                    self.dead.extend(m.key.take());
                    r.deregister().expect("deregister a DRAM region");
                    self.last = format!("deregistered memory region {k}");
                    self.after_mem_deregistration();
                }
                None => {
                    self.register_mem(k);
                    self.last = format!("registered memory region {k} again");
                }
            }
        } else {
            let j = k - self.mems.len();
            let f = &mut self.files[j];
            if f.live() {
                self.dead.extend(f.key.take());
                if let Some(r) = f.reg.take() {
                    r.deregister().expect("deregister a FILE region");
                } else {
                    self.agent.unregister_local_file(&f.path).expect("unexport a file");
                    f.exported = false;
                }
                self.last = format!("deregistered file region {j}");
            } else {
                self.register_file(j);
                self.last = format!("registered file region {j} again");
            }
        }
        self.refresh_keys();
    }

    /// A target may close a connection whose last frame used a region that
    /// is deregistered (it cannot always tell a finished READ from one in
    /// flight): such a close is counted, and the client starts afresh.
    fn after_mem_deregistration(&mut self) {
        if let Some(mut c) = self.client.take() {
            let _ = c.stream.set_read_timeout(Some(Duration::from_millis(3)));
            let mut one = [0u8; 1];
            match std::io::Read::read(&mut c.stream, &mut one) {
                Ok(0) => self.stats.closed_by_deregistration += 1,
                Ok(_) => panic!("the target sent a byte nobody asked for after {}", self.last),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => self.stats.closed_by_deregistration += 1,
            }
        }
    }

    fn kind_of(&self, key: &AccessKey) -> Option<Kind> {
        if let Some(i) = self.mems.iter().position(|m| m.key.as_ref() == Some(key)) {
            return Some(Kind::Mem(i));
        }
        self.files.iter().position(|f| f.key.as_ref() == Some(key)).map(Kind::File)
    }

    /// Whether `[addr, addr + len)` lies inside the live region `k`.
    fn inside(&self, k: Kind, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else { return false };
        match k {
            Kind::Mem(i) => {
                let start = self.region_addr(i);
                addr >= start && end <= start + self.mems[i].len as u64
            }
            Kind::File(j) => {
                let f = &self.files[j];
                f.len == 0 || (addr >= f.off && end <= f.off + f.len)
            }
        }
    }

    /// The model: the answer the target owes for a WRITE or READ frame.
    fn predict(&self, ty: FrameType, entries: &[Entry], header_len: u64) -> Expect {
        let mut sum = Some(0u64);
        for e in entries {
            sum = sum.and_then(|s| s.checked_add(e.len));
        }
        let Some(sum) = sum.filter(|&s| s <= MAX_FRAME_DATA) else { return Expect::Closed };
        if header_len > MAX_FRAME_DATA {
            return Expect::Closed;
        }
        let mut kinds = Vec::with_capacity(entries.len());
        let mut why: Option<Why> = None;
        for e in entries {
            if e.len == 0 {
                why = why.or(Some(Why::ZeroLen));
                continue;
            }
            match self.kind_of(&e.key) {
                None if self.dead.contains(&e.key) => why = why.or(Some(Why::DeadKey)),
                None => why = why.or(Some(Why::UnknownKey)),
                Some(k) if !self.inside(k, e.addr, e.len) => why = why.or(Some(Why::OutOfBounds)),
                Some(k) => kinds.push(k),
            }
        }
        // An empty entry or a lying header is malformed, but an earlier bad
        // entry may be reported first: both are refusals that touch nothing.
        if entries.iter().any(|e| e.len == 0) {
            return Expect::Refused(MALFORMED_OR_NOT_ALLOWED, Why::ZeroLen);
        }
        if sum != header_len {
            return Expect::Refused(MALFORMED_OR_NOT_ALLOWED, Why::LyingLen);
        }
        if let Some(w) = why {
            return Expect::Refused(NOT_ALLOWED, w);
        }
        let mem = kinds.iter().filter(|k| matches!(k, Kind::Mem(_))).count();
        if mem != 0 && mem != kinds.len() {
            return Expect::Refused(NOT_ALLOWED, Why::Mixed);
        }
        let spans: Vec<(Kind, u64, u64)> = kinds.iter().zip(entries).map(|(&k, e)| (k, e.addr, e.len)).collect();
        match ty {
            FrameType::Write => Expect::Ack(spans),
            _ => {
                let mut data = Vec::with_capacity(sum as usize);
                for &(k, addr, len) in &spans {
                    match k {
                        Kind::Mem(i) => {
                            let m = &self.mems[i];
                            let at = m.off + (addr - self.region_addr(i)) as usize;
                            data.extend_from_slice(&m.shadow[at..at + len as usize]);
                        }
                        Kind::File(j) => {
                            let s = &self.files[j].shadow;
                            let (a, b) = (addr as usize, (addr + len) as usize);
                            if b > s.len() {
                                return Expect::Refused(STORAGE_OR_NOT_ALLOWED, Why::PastEof);
                            }
                            data.extend_from_slice(&s[a..b]);
                        }
                    }
                }
                Expect::Data(data)
            }
        }
    }

    fn apply(&mut self, spans: &[(Kind, u64, u64)], seed: u64) {
        for &(k, addr, len) in spans {
            match k {
                Kind::Mem(i) => {
                    let start = self.region_addr(i);
                    let m = &mut self.mems[i];
                    let at = m.off + (addr - start) as usize;
                    for x in 0..len {
                        m.shadow[at + x as usize] = payload(seed, addr + x);
                    }
                }
                Kind::File(j) => {
                    let s = &mut self.files[j].shadow;
                    let end = (addr + len) as usize;
                    if s.len() < end {
                        s.resize(end, 0);
                    }
                    for x in 0..len {
                        s[(addr + x) as usize] = payload(seed, addr + x);
                    }
                }
            }
        }
    }

    fn count(&mut self, e: &Expect) {
        let s = &mut self.stats;
        match e {
            Expect::Ack(spans) if matches!(spans.first(), Some((Kind::Mem(_), _, _))) => s.mem_writes += 1,
            Expect::Ack(_) => s.file_writes += 1,
            // Counted by kind once the data matched.
            Expect::Data(_) => {}
            Expect::Refused(_, w) => match w {
                Why::Mixed => s.mixed += 1,
                Why::OutOfBounds => s.out_of_bounds += 1,
                Why::DeadKey => s.dead_key += 1,
                Why::UnknownKey => s.unknown_key += 1,
                Why::ZeroLen | Why::LyingLen => s.malformed += 1,
                Why::PastEof => s.past_eof += 1,
            },
            Expect::Closed => s.closed += 1,
            Expect::Nothing => s.notifs += 1,
        }
    }

    /// Every byte of every block and file equals the model's.
    fn check_all(&self, when: &str) {
        for (i, m) in self.mems.iter().enumerate() {
            let got = self.mem.slice(m.block, m.block_len);
            if let Some(b) = (0..m.block_len).find(|&b| got[b] != m.shadow[b]) {
                let inside = b >= m.off && b < m.off + m.len;
                panic!(
                    "{when}: memory block {i} byte {b} ({} region [{}, {}), registered: {}) is {:#04x}, the model says {:#04x}; last step: {}",
                    if inside { "inside" } else { "OUTSIDE (canary) of" },
                    m.off,
                    m.off + m.len,
                    m.reg.is_some(),
                    got[b],
                    m.shadow[b],
                    self.last
                );
            }
        }
        for (j, f) in self.files.iter().enumerate() {
            let got = std::fs::read(&f.path).expect("read a temp file back");
            if got != f.shadow {
                let b = (0..got.len().max(f.shadow.len())).find(|&b| got.get(b) != f.shadow.get(b)).unwrap_or(0);
                panic!(
                    "{when}: file {j} ({}, region {:#x}+{}) byte {b} is {:?}, the model says {:?} (sizes {} vs {}); last step: {}",
                    f.path.display(),
                    f.off,
                    f.len,
                    got.get(b),
                    f.shadow.get(b),
                    got.len(),
                    f.shadow.len(),
                    self.last
                );
            }
        }
    }

    fn client(&mut self) -> &mut HostileClient {
        if self.client.is_none() {
            self.client = Some(HostileClient::connect_ok(&self.target, &self.name, b""));
        }
        self.client.as_mut().unwrap_or_else(|| unreachable!("connected above"))
    }

    // ---- the generator ----

    fn live_mem(&self) -> Vec<usize> {
        (0..self.mems.len()).filter(|&i| self.mems[i].key.is_some()).collect()
    }

    fn live_files(&self) -> Vec<usize> {
        (0..self.files.len()).filter(|&j| self.files[j].live()).collect()
    }

    fn key_of(&self, k: Kind) -> AccessKey {
        match k {
            Kind::Mem(i) => self.mems[i].key,
            Kind::File(j) => self.files[j].key,
        }
        .unwrap_or(AccessKey([0; 16]))
    }

    /// Region `k`'s range in its own coordinates (whole file: up to WHOLE_SPAN).
    fn range(&self, k: Kind) -> (u64, u64) {
        match k {
            Kind::Mem(i) => (self.region_addr(i), self.mems[i].len as u64),
            Kind::File(j) => {
                let f = &self.files[j];
                if f.len == 0 {
                    (0, WHOLE_SPAN)
                } else {
                    (f.off, f.len)
                }
            }
        }
    }

    /// A canary address in memory: the slack before a region in its block.
    fn canary_addr(&self, s: &mut dyn Source) -> (u64, u64) {
        let with_slack: Vec<usize> = (0..self.mems.len()).filter(|&i| self.mems[i].off > 0).collect();
        let i = with_slack[s.below(with_slack.len())];
        let m = &self.mems[i];
        let at = s.below(m.off);
        (self.mem.addr(m.block + at), 1 + s.below((m.off - at).min(64)) as u64)
    }

    /// An entry that lies inside live region `k`.
    fn valid_entry(&self, s: &mut dyn Source, k: Kind) -> Entry {
        let (start, len) = self.range(k);
        let l = 1 + match s.below(4) {
            0 => s.below(len as usize),
            _ => s.below(len.min(700) as usize),
        } as u64;
        let l = l.min(len);
        let off = s.below((len - l + 1) as usize) as u64;
        let off = match s.below(6) {
            0 => 0,
            1 => len - l,
            _ => off,
        };
        Entry { key: self.key_of(k), addr: start + off, len: l }
    }

    /// Any entry at all: random key and range, biased to edges and to the
    /// other kind's coordinates.
    fn random_entry(&self, s: &mut dyn Source) -> Entry {
        let mems = self.live_mem();
        let files = self.live_files();
        let all: Vec<Kind> = mems.iter().map(|&i| Kind::Mem(i)).chain(files.iter().map(|&j| Kind::File(j))).collect();
        let key = match s.below(10) {
            0..=3 if !mems.is_empty() => self.key_of(Kind::Mem(mems[s.below(mems.len())])),
            4..=6 if !files.is_empty() => self.key_of(Kind::File(files[s.below(files.len())])),
            7 if !self.dead.is_empty() => self.dead[s.below(self.dead.len())],
            8 => {
                let mut k = [0u8; 16];
                for b in &mut k {
                    *b = s.byte();
                }
                AccessKey(k)
            }
            _ if !all.is_empty() => self.key_of(all[s.below(all.len())]),
            _ => AccessKey([7; 16]),
        };
        // An anchor: some region's start or end (either kind), a canary, a
        // guard page, or an extreme value.
        let anchor_kind = if all.is_empty() { Kind::Mem(0) } else { all[s.below(all.len())] };
        let (rs, rl) = self.range(anchor_kind);
        let delta = s.below(33) as i64 - 16;
        let addr = match s.below(8) {
            0..=2 => rs.wrapping_add(s.below(rl as usize) as u64),
            3 => (rs + rl).wrapping_add_signed(delta),
            4 => rs.wrapping_add_signed(delta),
            5 => self.canary_addr(s).0,
            6 => self.mem.addr(0).wrapping_add_signed(delta),
            _ => [0, 1, u64::MAX, u64::MAX - 15, 1 << 63, s.u64()][s.below(6)],
        };
        let len = match s.below(16) {
            0 => 0,
            1..=9 => 1 + s.below(512) as u64,
            10..=12 => (rs + rl).wrapping_sub(addr).clamp(1, 1 << 16),
            13 => 1 + s.below(1 << 16) as u64,
            14 => (1u64 << 31) + s.u16() as u64,
            _ => (u64::MAX - addr).wrapping_add(1 + s.below(64) as u64).max(1),
        };
        Entry { key, addr, len }
    }

    /// Draws the entries of one WRITE or READ frame.
    fn entries(&self, s: &mut dyn Source) -> Vec<Entry> {
        let mems: Vec<Kind> = self.live_mem().into_iter().map(Kind::Mem).collect();
        let files: Vec<Kind> = self.live_files().into_iter().map(Kind::File).collect();
        let n = 1 + s.below(4) + if s.below(8) == 0 { s.below(8) } else { 0 };
        let mut v = Vec::with_capacity(n);
        match s.below(8) {
            // Coherent: one kind, every entry inside; sometimes one entry spoilt.
            0..=4 => {
                let pool = if s.below(2) == 0 && !mems.is_empty() || files.is_empty() { &mems } else { &files };
                for _ in 0..n {
                    if pool.is_empty() {
                        v.push(self.random_entry(s));
                    } else {
                        let k = pool[s.below(pool.len())];
                        v.push(self.valid_entry(s, k));
                    }
                }
                if s.below(4) == 0 {
                    let at = s.below(v.len());
                    v[at] = self.random_entry(s);
                }
            }
            // Mixed kinds on purpose: a good memory entry with a file key
            // whose range is valid in file coordinates or points at memory
            // canaries (the whole-file key covers every offset).
            5 | 6 if !mems.is_empty() && !files.is_empty() => {
                let k = mems[s.below(mems.len())];
                v.push(self.valid_entry(s, k));
                let fk = files[s.below(files.len())];
                let mut e = self.valid_entry(s, fk);
                if s.below(2) == 0 {
                    let (a, l) = self.canary_addr(s);
                    e.addr = a;
                    e.len = l;
                }
                v.push(e);
                for _ in 2..n {
                    let pool = if s.below(2) == 0 { &mems } else { &files };
                    let k = pool[s.below(pool.len())];
                    v.push(self.valid_entry(s, k));
                }
                // The memory entry first most of the time: that is where a
                // target that judges the frame by entry 0 goes wrong.
                if s.below(4) == 0 {
                    let (a, b) = (s.below(v.len()), s.below(v.len()));
                    v.swap(a, b);
                }
            }
            _ => {
                for _ in 0..n {
                    v.push(self.random_entry(s));
                }
            }
        }
        // A frame with no live memory key that uses the whole-file key stays
        // within WHOLE_SPAN, so that an accepted one keeps the file small.
        let has_mem = v.iter().any(|e| matches!(self.kind_of(&e.key), Some(Kind::Mem(_))));
        if !has_mem {
            for e in &mut v {
                if let Some(Kind::File(j)) = self.kind_of(&e.key) {
                    if self.files[j].len == 0 && e.len < (1 << 31) {
                        e.addr %= WHOLE_SPAN;
                        e.len = e.len.min(WHOLE_SPAN);
                    }
                }
            }
        }
        v
    }

    /// Builds one frame and the model's prediction for it.
    fn frame(&mut self, s: &mut dyn Source) -> Frame {
        let op = self.next_op;
        self.next_op += 1;
        match s.below(20) {
            // A notification.
            0 | 1 => {
                let mut msg = vec![0u8; s.below(300)];
                for b in &mut msg {
                    *b = s.byte();
                }
                Frame {
                    ty: FrameType::Notif as u8,
                    op,
                    count: 0,
                    header_len: msg.len() as u64,
                    entries: Vec::new(),
                    data: msg,
                    header_only: false,
                    expect: Expect::Nothing,
                }
            }
            // A header the target must refuse before reading on: unknown
            // type, a type only targets send, no entries, too many entries,
            // an absurd length.
            2 => {
                let (ty, count, len) = match s.below(5) {
                    0 => (0x40 | s.byte() & 0x3f, 0, 0),
                    1 => (FrameType::Ack as u8, 0, 0),
                    2 => (FrameType::Write as u8, 0, 16),
                    3 => (FrameType::Read as u8, MAX_ENTRIES + 1 + s.below(1000) as u32, 64),
                    _ => (FrameType::Write as u8, 1, MAX_FRAME_DATA + 1 + s.u64() % (1 << 40)),
                };
                Frame {
                    ty,
                    op,
                    count,
                    header_len: len,
                    entries: Vec::new(),
                    data: Vec::new(),
                    header_only: true,
                    expect: Expect::Closed,
                }
            }
            _ => {
                let ty = if s.below(2) == 0 { FrameType::Write } else { FrameType::Read };
                let entries = self.entries(s);
                let sum = entries.iter().try_fold(0u64, |a, e| a.checked_add(e.len));
                let mut header_len = sum.unwrap_or(u64::MAX);
                if header_len <= MAX_FRAME_DATA && s.below(24) == 0 {
                    header_len = header_len.saturating_add_signed([-1i64, 1, 7][s.below(3)]);
                }
                let expect = self.predict(ty, &entries, header_len);
                let header_only = matches!(expect, Expect::Closed);
                let mut data = Vec::new();
                if ty == FrameType::Write && !header_only {
                    // The payload in target coordinates, entry by entry.
                    for e in &entries {
                        data.extend((0..e.len).map(|x| payload(op, e.addr.wrapping_add(x))));
                    }
                    data.resize(header_len as usize, 0xab);
                }
                Frame { ty: ty as u8, op, count: entries.len() as u32, header_len, entries, data, header_only, expect }
            }
        }
    }

    fn describe(&self, f: &Frame) -> String {
        let mut d = format!("frame op {} type {:#04x} count {} len {}:", f.op, f.ty, f.count, f.header_len);
        for (i, e) in f.entries.iter().enumerate() {
            let who = match self.kind_of(&e.key) {
                Some(k) => format!("{k:?}"),
                None if self.dead.contains(&e.key) => "dead key".into(),
                None => "unknown key".into(),
            };
            let _ = write!(d, " [{i}: {who} {:#x}+{}]", e.addr, e.len);
        }
        let _ = write!(d, " expecting {}", expect_name(&f.expect));
        d
    }

    fn encode(f: &Frame, out: &mut Vec<u8>) {
        if f.header_only {
            raw_frame(out, f.ty, f.op, f.count, f.header_len, &[], &[]);
        } else {
            raw_frame(out, f.ty, f.op, f.count, f.header_len, &f.entries, &f.data);
        }
    }

    /// Checks the answer to `f` against the model and applies accepted writes.
    fn settle(&mut self, f: Frame) -> Option<(FrameType, Status)> {
        let what = format!("{} (after: {})", self.describe(&f), self.last);
        self.last = self.describe(&f);
        self.count(&f.expect);
        if matches!(f.expect, Expect::Nothing) {
            self.notifs.push(f.data);
            return None;
        }
        let got = self.client().answer();
        let a: Answer = match got {
            Ok(a) => a,
            Err(e) => panic!("{what}: no answer from the target ({e}); did it fault or drop the connection?"),
        };
        let h = a.header;
        assert_eq!(
            h.op,
            f.op,
            "{what}: the answer is for op {} ({:?} {:?}: {}) instead; answers must come in request order",
            h.op,
            h.ty,
            h.status,
            a.text()
        );
        match f.expect {
            Expect::Ack(spans) if h.ty == FrameType::Error && self.grows_whole_file(&spans) => {
                // Writing past the end of a whole-file registration grows the
                // file; a target may also refuse it (nothing written).
                assert!(
                    STORAGE_OR_NOT_ALLOWED.contains(&h.status),
                    "{what}: a WRITE past the end of the whole file was refused with {:?}: {}",
                    h.status,
                    a.text()
                );
            }
            Expect::Ack(spans) => {
                assert_eq!(
                    (h.ty, h.status),
                    (FrameType::Ack, Status::Ok),
                    "{what}: got {:?} {:?}: {}",
                    h.ty,
                    h.status,
                    a.text()
                );
                self.apply(&spans, f.op);
            }
            Expect::Data(want) => {
                assert_eq!(h.ty, FrameType::Data, "{what}: got {:?} {:?}: {}", h.ty, h.status, a.text());
                if a.body != want {
                    let b = (0..want.len()).find(|&b| a.body.get(b) != want.get(b)).unwrap_or(0);
                    panic!(
                        "{what}: DATA differs from the model at byte {b} ({:?} vs {:?}, {} bytes vs {})",
                        a.body.get(b),
                        want.get(b),
                        a.body.len(),
                        want.len()
                    );
                }
                if matches!(f.entries.first().and_then(|e| self.kind_of(&e.key)), Some(Kind::Mem(_))) {
                    self.stats.mem_reads += 1;
                } else {
                    self.stats.file_reads += 1;
                }
            }
            Expect::Refused(statuses, _) => {
                assert_eq!(
                    h.ty,
                    FrameType::Error,
                    "{what}: the target did not refuse (got {:?}, {} bytes)",
                    h.ty,
                    h.len
                );
                assert!(
                    statuses.contains(&h.status),
                    "{what}: refused with {:?} ({}), expected one of {statuses:?}",
                    h.status,
                    a.text()
                );
                assert!(
                    !a.body.is_empty() && std::str::from_utf8(&a.body).is_ok(),
                    "{what}: the error names no reason"
                );
            }
            Expect::Closed => {
                assert_eq!(
                    (h.ty, h.status),
                    (FrameType::Error, Status::Malformed),
                    "{what}: got {:?} {:?}: {}",
                    h.ty,
                    h.status,
                    a.text()
                );
                let closed = self.client().closed_by_peer();
                assert!(closed, "{what}: the target kept the connection after a malformed header");
                self.client = None;
            }
            Expect::Nothing => unreachable!("handled above"),
        }
        Some((h.ty, h.status))
    }

    /// Whether a WRITE of `spans` ends past the current end of a whole-file
    /// region's file.
    fn grows_whole_file(&self, spans: &[(Kind, u64, u64)]) -> bool {
        spans.iter().any(|&(k, addr, len)| match k {
            Kind::File(j) => self.files[j].len == 0 && addr + len > self.files[j].shadow.len() as u64,
            Kind::Mem(_) => false,
        })
    }

    /// A live memory region's `(key, start address, length)`; `None` when
    /// region `i` is deregistered.
    pub fn mem_region(&self, i: usize) -> Option<(AccessKey, u64, u64)> {
        self.mems[i].key.map(|k| (k, self.region_addr(i), self.mems[i].len as u64))
    }

    /// A live file region's `(key, start offset, length)` (0 = whole file).
    pub fn file_region(&self, j: usize) -> Option<(AccessKey, u64, u64)> {
        self.files[j].key.map(|k| (k, self.files[j].off, self.files[j].len))
    }

    /// Deregisters memory region `i` (its key joins the dead ones); returns
    /// once the target no longer touches it.
    pub fn deregister_mem(&mut self, i: usize) {
        if let Some(r) = self.mems[i].reg.take() {
            self.dead.extend(self.mems[i].key.take());
            r.deregister().expect("deregister a DRAM region");
        }
        self.last = format!("deregistered memory region {i}");
        self.after_mem_deregistration();
    }

    /// The current bytes of memory region `i` (not its canaries).
    pub fn mem_bytes(&self, i: usize) -> Vec<u8> {
        let m = &self.mems[i];
        self.mem.slice(m.block + m.off, m.len).to_vec()
    }

    /// Takes the current bytes of memory region `i` into the model (after a
    /// test wrote it from elsewhere); its canaries stay checked.
    pub fn resync_mem(&mut self, i: usize) {
        let now = self.mem_bytes(i);
        let m = &mut self.mems[i];
        m.shadow[m.off..m.off + m.len].copy_from_slice(&now);
    }

    /// Index of the length-0 (whole file) registration.
    pub fn whole_file(&self) -> usize {
        self.files.iter().position(|f| f.len == 0).unwrap_or_else(|| unreachable!("FILE_LAYOUT has one"))
    }

    /// The address of the first canary byte of memory block `i` (before its
    /// region) and how many canary bytes follow it there.
    pub fn canary_before(&self, i: usize) -> (u64, u64) {
        let m = &self.mems[i];
        (self.mem.addr(m.block), m.off as u64)
    }

    /// Sends one hand-made WRITE or READ frame (the payload is generated),
    /// checks the answer and every byte against the model, and returns the
    /// answer's type and status.
    pub fn frame_checked(&mut self, ty: FrameType, entries: Vec<Entry>) -> (FrameType, Status) {
        self.batch_checked(vec![(ty, entries)])[0]
    }

    /// Sends hand-made WRITE or READ frames back to back before reading any
    /// answer, then checks each answer (in request order) and every byte
    /// against the model. The model predicts every frame from the state
    /// before the batch: put an accepted WRITE last.
    pub fn batch_checked(&mut self, frames: Vec<(FrameType, Vec<Entry>)>) -> Vec<(FrameType, Status)> {
        let mut built = Vec::new();
        let mut b = Vec::new();
        for (ty, entries) in frames {
            let op = self.next_op;
            self.next_op += 1;
            let header_len = entries.iter().try_fold(0u64, |a, e| a.checked_add(e.len)).unwrap_or(u64::MAX);
            let expect = self.predict(ty, &entries, header_len);
            let header_only = matches!(expect, Expect::Closed);
            let mut data = Vec::new();
            if ty == FrameType::Write && !header_only {
                for e in &entries {
                    data.extend((0..e.len).map(|x| payload(op, e.addr.wrapping_add(x))));
                }
            }
            let f =
                Frame { ty: ty as u8, op, count: entries.len() as u32, header_len, entries, data, header_only, expect };
            Self::encode(&f, &mut b);
            built.push(f);
        }
        if let Err(e) = self.client().send_raw(&b) {
            panic!("sending {} frames failed: {e}", built.len());
        }
        let mut out = Vec::new();
        for f in built {
            out.push(self.settle(f).unwrap_or_else(|| unreachable!("WRITE and READ are answered")));
        }
        let when = self.last.clone();
        self.check_all(&when);
        out
    }

    /// One step: a frame, a batch of frames, a frame cut off mid-way, or a
    /// (de)registration; then every byte is compared with the model.
    pub fn step(&mut self, s: &mut dyn Source) {
        match s.below(32) {
            0 => {
                let pick = s.below(64);
                self.toggle(pick);
            }
            1 => {
                // Half a frame, then the client goes away: nothing may change.
                let f = self.frame(s);
                let mut b = Vec::new();
                Self::encode(&f, &mut b);
                // An accepted WRITE is cut before its payload: once the
                // payload flows the target may have applied part of it (legal,
                // and beyond what the model predicts). Anything else anywhere;
                // a NOTIF cut short is lost.
                let limit = match f.expect {
                    Expect::Ack(_) => HEADER_LEN + f.entries.len() * ENTRY_LEN,
                    _ => b.len(),
                };
                let cut = s.below(limit);
                self.last = format!("cut after {cut} bytes: {}", self.describe(&f));
                self.stats.cut += 1;
                let c = self.client();
                let _ = c.send_raw(&b[..cut]);
                self.client = None;
                // The target notices the hang-up; give its thread a moment
                // so a half-applied frame would show in the comparison.
                std::thread::sleep(Duration::from_millis(2));
            }
            2..=5 => {
                // Several frames back to back, then their answers in order. A
                // file WRITE and a frame that closes the connection end a batch
                // (file I/O is pipelined; the model assumes frames in order).
                let n = 2 + s.below(3);
                let mut frames = Vec::new();
                let mut bytes = Vec::new();
                for _ in 0..n {
                    let f = self.frame(s);
                    let ends = match &f.expect {
                        Expect::Closed => true,
                        Expect::Ack(sp) => sp.iter().any(|(k, _, _)| matches!(k, Kind::File(_))),
                        _ => false,
                    };
                    // The model of frame k+1 must see frame k's writes: apply
                    // as we go would be wrong if k is refused, so a batch holds
                    // only frames that do not depend on each other: stop at
                    // any accepted WRITE.
                    let write = matches!(f.expect, Expect::Ack(_));
                    // A frame that gets the connection closed goes first: the
                    // target may drop the answers it still owes before it.
                    if matches!(f.expect, Expect::Closed) && !frames.is_empty() {
                        break;
                    }
                    Self::encode(&f, &mut bytes);
                    frames.push(f);
                    if ends || write {
                        break;
                    }
                }
                self.stats.batched += frames.len() as u64;
                if let Err(e) = self.client().send_raw(&bytes) {
                    panic!("sending a batch of {} frames failed: {e}", frames.len());
                }
                for f in frames {
                    self.settle(f);
                }
            }
            _ => {
                let f = self.frame(s);
                let mut b = Vec::new();
                Self::encode(&f, &mut b);
                if let Err(e) = self.client().send_raw(&b) {
                    panic!("{}: send failed: {e}", self.describe(&f));
                }
                self.settle(f);
            }
        }
        let when = self.last.clone();
        self.check_all(&when);
    }

    /// Steps until the source is exhausted (fuzz input) or `max` steps.
    pub fn run(&mut self, s: &mut dyn Source, max: usize) {
        for _ in 0..max {
            if s.done() {
                break;
            }
            self.step(s);
        }
        self.check_notifs();
    }

    /// Every notification sent whole arrived, in order, under the hostile
    /// client's name (waits up to 5 s for the last ones).
    pub fn check_notifs(&mut self) {
        let want = std::mem::take(&mut self.notifs);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let mut n = self.agent.take_notifications();
            if let Some(v) = n.remove(&self.name) {
                got.extend(v);
            }
            assert!(n.is_empty(), "notifications from unexpected senders: {:?}", n.keys().collect::<Vec<_>>());
            if got.len() >= want.len() || Instant::now() > until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.len(), want.len(), "notifications delivered vs sent");
        assert!(got == want, "notifications arrived changed or out of order");
    }

    /// kvferry's own initiator still works: a WRITE and a READ of a memory
    /// region and a READ of the exported file, applied to the model.
    pub fn legit_round(&mut self) {
        if self.mems[0].reg.is_none() {
            self.register_mem(0);
        }
        let fx = self.files.iter().position(|f| f.how == FileHow::Export).expect("an exported file");
        if !self.files[fx].live() {
            self.register_file(fx);
        }
        self.refresh_keys();
        let mut tcp = Params::new();
        tcp.set("bind", "127.0.0.1");
        tcp.set("ip", "127.0.0.1");
        let init = Agent::new(&format!("{}-init", self.name), AgentConfig::default().with_backend("tcp", tcp))
            .expect("initiator agent");
        init.load_remote_metadata(&self.agent.local_metadata().expect("metadata")).expect("load target metadata");
        let n = 3000usize;
        let mut buf = AlignedBuf::new(3 * n).expect("buffer");
        for (i, b) in buf.as_mut_slice()[..n].iter_mut().enumerate() {
            *b = (i % 253) as u8 ^ 0x5a;
        }
        let _r = init.register_buf(&buf).expect("register the initiator buffer");
        let t = self.agent.name().to_string();
        let dst = self.region_addr(0) + 7;
        let remote = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(dst, n as u64, 0)]);
        let run = |op, local: &XferDescList, remote: &XferDescList| {
            let r = init.create_request(op, local, remote, &t, None).expect("create a legitimate request");
            r.post(None).expect("post");
            r.wait(Duration::from_secs(10)).expect("a legitimate request completes");
        };
        run(XferOp::Write, &buf.xfer_blocks(0, n, 1).expect("desc"), &remote);
        let m = &mut self.mems[0];
        for i in 0..n {
            m.shadow[m.off + 7 + i] = (i % 253) as u8 ^ 0x5a;
        }
        run(XferOp::Read, &buf.xfer_blocks(n, n, 1).expect("desc"), &remote);
        assert_eq!(&buf.as_slice()[n..2 * n], &buf.as_slice()[..n], "a legitimate READ returns what was written");
        let id = self.agent.exported_files()[0].id;
        let file = XferDescList::from_descs(MemType::File, vec![XferDesc::new(100, n as u64, id)]);
        run(XferOp::Read, &buf.xfer_blocks(2 * n, n, 1).expect("desc"), &file);
        assert_eq!(
            &buf.as_slice()[2 * n..3 * n],
            &self.files[fx].shadow[100..100 + n],
            "a legitimate file READ returns the model's bytes"
        );
        self.last = "legitimate WRITE/READ by a kvferry initiator".into();
        self.check_all("after the legitimate round");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.client = None;
        for m in &mut self.mems {
            m.reg = None;
        }
        for f in &mut self.files {
            f.reg = None;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn expect_name(e: &Expect) -> String {
    match e {
        Expect::Ack(_) => "ACK".into(),
        Expect::Data(d) => format!("DATA of {} bytes", d.len()),
        Expect::Refused(s, w) => format!("ERROR {s:?} ({w:?})"),
        Expect::Closed => "ERROR(Malformed) and a closed connection".into(),
        Expect::Nothing => "no answer (NOTIF)".into(),
    }
}
