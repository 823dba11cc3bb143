//! streamcheck: happens-before between streams and the host, checked on device memory and
//! pinned host memory.
//!
//! vgpu runs every stream operation synchronously at call time, so a program whose streams are
//! not ordered still computes the right answer here and would race on a GPU. This model tells
//! which operations a GPU could run concurrently, with vector clocks:
//!
//! - Each stream (a *lane*) has a vector; so has the host. An operation enqueued on a stream
//!   first joins the host's vector (host program order: it cannot start before what the host
//!   already waited for), then ticks the stream's own entry; its stamp is (stream, clock).
//! - `cuEventRecord` stores the stream's vector in the event; `cuStreamWaitEvent` joins the
//!   event's vector into the stream; `cuStreamSynchronize`, `cuEventSynchronize`, a successful
//!   `cuStreamQuery` / `cuEventQuery` join into the host's vector; `cuCtxSynchronize` joins every
//!   stream of the context into it.
//! - The legacy default stream (the NULL, `CU_STREAM_LEGACY` and `CU_STREAM_PER_THREAD`
//!   handles) and the synchronous calls (`cuMemcpyHtoD_v2`, `cuMemsetD8_v2`, `cuMemAlloc_v2`,
//!   `cuMemFree_v2`, ...) are taken as synchronising the whole context before and after them,
//!   which orders more than a GPU does (a non-blocking stream does not wait for the legacy
//!   stream): the model may miss a hazard there, never report one that a GPU orders.
//! - One host vector serves every host thread: vgpu cannot see the host's own synchronisation
//!   (mutexes, joins), so whatever one thread waited for counts as waited for by all.
//!
//! Device memory is tracked per allocation (not per byte): its last write (stamp) and the reads
//! since (the latest per stream). A kernel's read and write sets come from the interpreter's
//! global accesses (atomics are writes), a copy reads its source and writes its destination, a
//! memset writes, `cuMemAllocAsync` counts as a write and `cuMemFreeAsync` as a write that must
//! be ordered after every earlier access. An access by stream `s` is ordered after an earlier
//! one stamped (t, c) iff `s`'s vector has entry t >= c. A write unordered with an earlier read
//! or write, or a read unordered with the last write, is a finding. Two streams writing
//! disjoint halves of one allocation are reported (allocation granularity).
//!
//! Pinned host memory (`cuMemHostAlloc`): vgpu cannot see the host's writes, so an async copy
//! from (or to) a pinned range records a hash of those bytes with the copy's stamp; when a
//! later async copy touches an overlapping pinned range, or at `cuMemFreeHost`, a recorded copy
//! the host has not synchronised with whose bytes have changed since is a finding: the host
//! wrote pinned memory while a copy from it may still run. The bytes are hashed only at those
//! points. A host that rewrites the same bytes, or reads a copy's destination too early, is not
//! seen.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// A vector clock: entry `i` is the last operation of lane `i` known to come before.
#[derive(Clone, Default, Debug)]
pub struct Vc(Vec<u32>);

impl Vc {
    fn get(&self, i: u32) -> u32 {
        self.0.get(i as usize).copied().unwrap_or(0)
    }
    fn raise(&mut self, i: u32, c: u32) {
        let i = i as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, 0);
        }
        self.0[i] = self.0[i].max(c);
    }
    fn join(&mut self, o: &Vc) {
        if self.0.len() < o.0.len() {
            self.0.resize(o.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a = (*a).max(*b);
        }
    }
}

/// Where an operation is enqueued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// A stream made by `cuStreamCreate` (its handle).
    Stream(usize),
    /// The context's legacy default stream, or a synchronous call: synchronises the context.
    Legacy,
}

/// How an operation uses an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    /// `cuMemAllocAsync`: the allocation exists from here on, in stream order.
    Alloc,
    /// `cuMemFreeAsync`: must come after every earlier access.
    Free,
}

/// One allocation an operation uses.
#[derive(Clone, Copy, Debug)]
pub struct Use {
    pub base: u64,
    /// [`crate::mem::Alloc::id`].
    pub id: u64,
    pub size: u64,
    pub kind: Kind,
}

impl Use {
    pub fn of(a: &crate::mem::Alloc, kind: Kind) -> Use {
        Use {
            base: a.base,
            id: a.id,
            size: a.size,
            kind,
        }
    }
}

/// An operation's place in the model: its lane and clock.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    lane: u32,
    clock: u32,
    legacy: bool,
}

/// A hazard: the report's first line (after `vgpu streamcheck: `) and detail lines.
#[derive(Debug, Clone)]
pub struct Finding {
    pub message: String,
    pub details: Vec<String>,
}

impl Finding {
    /// The report as the other checks print theirs.
    pub fn report(&self) -> String {
        let mut r = format!("========= vgpu streamcheck: {}\n", self.message);
        for d in &self.details {
            r.push_str(&format!("=========     {d}\n"));
        }
        r
    }
}

struct Lane {
    ctx: usize,
    /// The stream handle; 0 for a context's legacy stream.
    handle: usize,
    vc: Vc,
}

/// An earlier access: who, when, what.
#[derive(Clone)]
struct Access {
    lane: u32,
    clock: u32,
    what: Arc<str>,
    /// The write is `cuMemAllocAsync` making the allocation.
    alloc: bool,
}

struct History {
    id: u64,
    size: u64,
    write: Option<Access>,
    /// Reads since the last write, the latest per lane.
    reads: Vec<Access>,
}

/// An async copy from or to pinned memory the host may not have waited for.
struct PinnedCopy {
    off: u64,
    len: u64,
    hash: u64,
    lane: u32,
    clock: u32,
    what: Arc<str>,
    to_host: bool,
}

struct Pinned {
    size: u64,
    copies: VecDeque<PinnedCopy>,
}

/// Copies remembered per pinned allocation; the oldest are forgotten beyond (a missed finding
/// at worst).
const PINNED_COPIES: usize = 64;

/// The whole model; the driver keeps one in its state.
#[derive(Default)]
pub struct Model {
    host: Vc,
    lanes: Vec<Lane>,
    streams: HashMap<usize, u32>,
    legacy: HashMap<usize, u32>,
    events: HashMap<usize, Vc>,
    mem: HashMap<u64, History>,
    pinned: BTreeMap<u64, Pinned>,
}

impl Model {
    fn new_lane(&mut self, ctx: usize, handle: usize) -> u32 {
        self.lanes.push(Lane {
            ctx,
            handle,
            vc: Vc::default(),
        });
        (self.lanes.len() - 1) as u32
    }

    fn lane(&mut self, ctx: usize, at: At) -> u32 {
        match at {
            At::Stream(h) => match self.streams.get(&h) {
                Some(&i) => i,
                None => {
                    let i = self.new_lane(ctx, h);
                    self.streams.insert(h, i);
                    i
                }
            },
            At::Legacy => match self.legacy.get(&ctx) {
                Some(&i) => i,
                None => {
                    let i = self.new_lane(ctx, 0);
                    self.legacy.insert(ctx, i);
                    i
                }
            },
        }
    }

    fn lane_name(&self, i: u32) -> String {
        let l = &self.lanes[i as usize];
        if l.handle == 0 {
            "the legacy default stream".to_string()
        } else {
            format!("stream {:#x}", l.handle)
        }
    }

    pub fn stream_created(&mut self, handle: usize, ctx: usize) {
        let i = self.new_lane(ctx, handle);
        self.streams.insert(handle, i);
    }

    /// Its work may still run: the lane stays in its context (for `cuCtxSynchronize`), only the
    /// handle (which may be handed out again) is forgotten.
    pub fn stream_destroyed(&mut self, handle: usize) {
        self.streams.remove(&handle);
    }

    /// The context's streams and events are gone and its allocations freed (the driver calls
    /// [`Model::forget`] for each and [`Model::event_destroyed`] for its events).
    pub fn ctx_destroyed(&mut self, ctx: usize) {
        self.streams.retain(|_, i| self.lanes[*i as usize].ctx != ctx);
        self.legacy.remove(&ctx);
        for l in self.lanes.iter_mut().filter(|l| l.ctx == ctx) {
            l.vc = Vc::default();
            l.ctx = usize::MAX;
        }
    }

    /// `cuCtxSynchronize`, and the context-wide synchronisation taken for synchronous calls.
    pub fn ctx_sync(&mut self, ctx: usize) {
        for l in self.lanes.iter().filter(|l| l.ctx == ctx) {
            self.host.join(&l.vc);
        }
    }

    /// `cuStreamSynchronize`, a successful `cuStreamQuery`, a copy into pageable host memory
    /// (it returns when done): the host has seen everything enqueued on the stream.
    pub fn stream_sync(&mut self, ctx: usize, at: At) {
        match at {
            At::Legacy => self.ctx_sync(ctx),
            At::Stream(_) => {
                let i = self.lane(ctx, at);
                self.host.join(&self.lanes[i as usize].vc);
            }
        }
    }

    pub fn event_record(&mut self, event: usize, ctx: usize, at: At) {
        let vc = match at {
            At::Legacy => {
                self.ctx_sync(ctx);
                self.host.clone()
            }
            At::Stream(_) => {
                let i = self.lane(ctx, at) as usize;
                self.lanes[i].vc.join(&self.host);
                self.lanes[i].vc.clone()
            }
        };
        self.events.insert(event, vc);
    }

    /// `cuStreamWaitEvent`; an event never recorded orders nothing.
    pub fn stream_wait(&mut self, ctx: usize, at: At, event: usize) {
        if !self.events.contains_key(&event) {
            return;
        }
        let i = match at {
            At::Legacy => None,
            At::Stream(_) => Some(self.lane(ctx, at) as usize),
        };
        let ev = &self.events[&event];
        match i {
            None => self.host.join(ev),
            Some(i) => {
                let l = &mut self.lanes[i];
                l.vc.join(&self.host);
                l.vc.join(ev);
            }
        }
    }

    /// `cuEventSynchronize`, a successful `cuEventQuery`.
    pub fn event_sync(&mut self, event: usize) {
        if let Some(ev) = self.events.get(&event) {
            self.host.join(ev);
        }
    }

    pub fn event_destroyed(&mut self, event: usize) {
        self.events.remove(&event);
    }

    /// The allocation at `base` is gone (a synchronous free, a context's teardown).
    pub fn forget(&mut self, base: u64) {
        self.mem.remove(&base);
    }

    /// Enqueues an operation at `at` that makes `uses`; checks each against the allocation's
    /// history, then records it. The first hazard found is returned (the operation is recorded
    /// all the same).
    pub fn access(&mut self, ctx: usize, at: At, what: &str, uses: &[Use]) -> Result<Stamp, Finding> {
        let lane = self.lane(ctx, at);
        let legacy = at == At::Legacy;
        if legacy {
            self.ctx_sync(ctx);
        }
        let l = &mut self.lanes[lane as usize];
        l.vc.join(&self.host);
        let clock = l.vc.get(lane) + 1;
        l.vc.raise(lane, clock);
        let stamp = Stamp { lane, clock, legacy };
        let me = Access {
            lane,
            clock,
            what: Arc::from(what),
            alloc: false,
        };
        let mut finding = None;
        for u in uses {
            if finding.is_some() {
                break;
            }
            let Some(h) = self.mem.get(&u.base) else { continue };
            if h.id != u.id {
                continue;
            }
            finding = self.check(h, u, &me);
        }
        for u in uses.iter().filter(|u| u.kind == Kind::Read) {
            let h = self.history(u);
            match h.reads.iter_mut().find(|r| r.lane == lane) {
                Some(r) => *r = me.clone(),
                None => h.reads.push(me.clone()),
            }
        }
        for u in uses.iter().filter(|u| u.kind != Kind::Read) {
            if u.kind == Kind::Free {
                self.mem.remove(&u.base);
                continue;
            }
            let h = self.history(u);
            h.write = Some(Access {
                alloc: u.kind == Kind::Alloc,
                ..me.clone()
            });
            h.reads.clear();
        }
        if legacy {
            self.host.raise(lane, clock);
        }
        finding.map_or(Ok(stamp), Err)
    }

    fn history(&mut self, u: &Use) -> &mut History {
        let h = self.mem.entry(u.base).or_insert_with(|| History {
            id: u.id,
            size: u.size,
            write: None,
            reads: Vec::new(),
        });
        if h.id != u.id {
            *h = History {
                id: u.id,
                size: u.size,
                write: None,
                reads: Vec::new(),
            };
        }
        h
    }

    /// The hazard between `me` making use `u` and the history `h`, if any.
    fn check(&self, h: &History, u: &Use, me: &Access) -> Option<Finding> {
        let vc = &self.lanes[me.lane as usize].vc;
        let unordered = |a: &Access| a.lane != me.lane && vc.get(a.lane) < a.clock;
        let writes = u.kind != Kind::Read;
        let prev_w = h.write.as_ref().filter(|w| unordered(w));
        let (kind, prev, prev_verb) = if let Some(w) = prev_w {
            match (w.alloc, writes) {
                (true, _) => ("use-before-allocation", w, "be making"),
                (false, true) => ("write-after-write", w, "write"),
                (false, false) => ("read-after-write", w, "write"),
            }
        } else if let Some(r) = h.reads.iter().find(|r| writes && unordered(r)) {
            ("write-after-read", r, "read")
        } else {
            return None;
        };
        let verb = match u.kind {
            Kind::Read => "reads",
            Kind::Write => "writes",
            Kind::Alloc => "allocates",
            Kind::Free => "frees",
        };
        let message = format!(
            "{kind} hazard across streams: {} on {} {verb} allocation {:#x} ({} bytes) while {} on {} may still {prev_verb} it",
            me.what,
            self.lane_name(me.lane),
            u.base,
            h.size,
            prev.what,
            self.lane_name(prev.lane),
        );
        let details = vec![
            format!(
                "earlier: {} was operation #{} of {}; {} has waited for its operations up to #{} only",
                prev.what,
                prev.clock,
                self.lane_name(prev.lane),
                self.lane_name(me.lane),
                vc.get(prev.lane),
            ),
            "nothing orders the two: record an event after the first (cuEventRecord) and make the second's stream wait for it (cuStreamWaitEvent), or synchronise the host between them".to_string(),
            "(streamcheck tracks whole allocations: the two may touch different bytes of it)".to_string(),
        ];
        Some(Finding { message, details })
    }

    // -----------------------------------------------------------------------------------------
    // Pinned host memory.

    pub fn pinned_alloc(&mut self, base: u64, size: u64) {
        self.pinned.insert(
            base,
            Pinned {
                size,
                copies: VecDeque::new(),
            },
        );
    }

    /// The pinned allocation holding `addr`: (base, size).
    fn pinned_at(&self, addr: u64) -> Option<(u64, u64)> {
        let (&base, p) = self.pinned.range(..=addr).next_back()?;
        (addr < base + p.size.max(1)).then_some((base, p.size))
    }

    pub fn is_pinned(&self, addr: u64) -> bool {
        self.pinned_at(addr).is_some()
    }

    /// Before an async copy (`what`) touches `[addr, addr + len)` of pinned memory, and at
    /// `cuMemFreeHost` (the whole allocation): earlier copies of overlapping bytes that the host
    /// has synchronised with are done; any other whose bytes changed is a finding.
    pub fn pinned_check(&mut self, addr: u64, len: u64, what: &str) -> Result<(), Finding> {
        let Some((base, size)) = self.pinned_at(addr) else { return Ok(()) };
        let (lo, hi) = (addr - base, (addr - base).saturating_add(len).min(size));
        let host = &self.host;
        let p = self.pinned.get_mut(&base).expect("pinned allocation");
        let mut found = None;
        p.copies.retain(|c| {
            if c.off >= hi || c.off + c.len <= lo || found.is_some() {
                return true;
            }
            if host.get(c.lane) >= c.clock {
                return false;
            }
            // SAFETY: the range lies inside the live pinned allocation at `base`.
            let now = hash(unsafe { std::slice::from_raw_parts((base + c.off) as *const u8, c.len as usize) });
            if now == c.hash {
                return true;
            }
            found = Some((c.what.clone(), c.lane, c.clock, c.off, c.len, c.to_host));
            false
        });
        let Some((prev, lane, clock, off, n, to_host)) = found else {
            return Ok(());
        };
        let dir = if to_host { "to" } else { "from" };
        Err(Finding {
            message: format!(
                "host wrote pinned memory while an async copy {dir} it may still run: {prev} on {} {dir} pinned bytes [{:#x}, +{n}) (allocation {base:#x}), changed before {what}",
                self.lane_name(lane),
                base + off,
            ),
            details: vec![
                format!(
                    "the host has not synchronised with operation #{clock} of {} (cuEventSynchronize on an event recorded after it, cuStreamSynchronize) and those bytes differ from what they were when the copy was issued",
                    self.lane_name(lane)
                ),
                if to_host {
                    "on a GPU the copy may still be writing them when the host changes them".to_string()
                } else {
                    "on a GPU the copy may read them after the host changed them".to_string()
                },
            ],
        })
    }

    /// After an async copy stamped `st` read (or, `to_host`, wrote) `[addr, addr + len)` of
    /// pinned memory: remembers the bytes as they are now. Copies on the legacy stream are
    /// done when the call returns and need no record.
    pub fn pinned_record(&mut self, addr: u64, len: u64, st: Stamp, what: &str, to_host: bool) {
        if st.legacy {
            return;
        }
        let Some((base, size)) = self.pinned_at(addr) else { return };
        let off = addr - base;
        let len = len.min(size - off);
        // SAFETY: the range lies inside the live pinned allocation at `base`.
        let h = hash(unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) });
        let p = self.pinned.get_mut(&base).expect("pinned allocation");
        if p.copies.len() >= PINNED_COPIES {
            p.copies.pop_front();
        }
        p.copies.push_back(PinnedCopy {
            off,
            len,
            hash: h,
            lane: st.lane,
            clock: st.clock,
            what: Arc::from(what),
            to_host,
        });
    }

    /// `cuMemFreeHost`: checks the allocation's copies like a copy of all of it, then drops it.
    pub fn pinned_free(&mut self, base: u64) -> Result<(), Finding> {
        let Some(size) = self.pinned.get(&base).map(|p| p.size) else {
            return Ok(());
        };
        let r = self.pinned_check(base, size, "cuMemFreeHost");
        self.pinned.remove(&base);
        r
    }
}

/// A fast 64-bit hash of a byte range (8 bytes a step); only equality matters.
fn hash(b: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = b.len() as u64 ^ K;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    (h ^ u64::from_le_bytes(tail)).wrapping_mul(K) ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(base: u64, id: u64, kind: Kind) -> Use {
        Use { base, id, size: 64, kind }
    }

    const CTX: usize = 7;
    const A: At = At::Stream(100);
    const B: At = At::Stream(200);

    fn model() -> Model {
        let mut m = Model::default();
        m.stream_created(100, CTX);
        m.stream_created(200, CTX);
        m
    }

    #[test]
    fn copy_then_unordered_read_is_a_finding_and_an_event_orders_it() {
        let mut m = model();
        m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap();
        let f = m.access(CTX, A, "kernel", &[alloc(1, 1, Kind::Read)]).unwrap_err();
        assert!(f.message.starts_with("read-after-write"), "{}", f.message);

        let mut m = model();
        m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap();
        m.event_record(9, CTX, B);
        m.stream_wait(CTX, A, 9);
        m.access(CTX, A, "kernel", &[alloc(1, 1, Kind::Read)]).unwrap();
        // A write on B after A's read, with no wait: write-after-read.
        let f = m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap_err();
        assert!(f.message.starts_with("write-after-read"), "{}", f.message);
    }

    #[test]
    fn host_synchronisation_and_legacy_calls_order_everything_before() {
        let mut m = model();
        m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap();
        m.stream_sync(CTX, B);
        m.access(CTX, A, "kernel", &[alloc(1, 1, Kind::Read)]).unwrap();
        m.access(CTX, At::Legacy, "cuMemcpyHtoD_v2", &[alloc(1, 1, Kind::Write)]).unwrap();
        m.access(CTX, B, "kernel", &[alloc(1, 1, Kind::Read)]).unwrap();
        m.ctx_sync(CTX);
        m.access(CTX, A, "free", &[alloc(1, 1, Kind::Free)]).unwrap();
        // A new allocation at the same address starts a new history.
        m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap();
        m.access(CTX, A, "kernel", &[alloc(1, 2, Kind::Read)]).unwrap();
    }

    #[test]
    fn an_event_carries_what_its_stream_had_waited_for() {
        // B writes; A waits for B; C waits for A's event recorded after: C is ordered after B.
        let mut m = model();
        m.stream_created(300, CTX);
        m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap();
        m.event_record(1, CTX, B);
        m.stream_wait(CTX, A, 1);
        m.event_record(2, CTX, A);
        m.stream_wait(CTX, At::Stream(300), 2);
        m.access(CTX, At::Stream(300), "kernel", &[alloc(1, 1, Kind::Read)]).unwrap();
        // An event recorded before the write does not order it.
        let mut m = model();
        m.event_record(1, CTX, B);
        m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap();
        m.stream_wait(CTX, A, 1);
        assert!(m.access(CTX, A, "kernel", &[alloc(1, 1, Kind::Read)]).is_err());
    }

    #[test]
    fn contexts_do_not_synchronise_each_other() {
        let mut m = model();
        m.stream_created(300, CTX + 1);
        m.access(CTX, B, "copy", &[alloc(1, 1, Kind::Write)]).unwrap();
        m.ctx_sync(CTX + 1);
        m.access(CTX + 1, At::Legacy, "memset", &[]).unwrap();
        assert!(m.access(CTX, A, "kernel", &[alloc(1, 1, Kind::Read)]).is_err());
    }

    #[test]
    fn pinned_bytes_changed_before_the_host_waited() {
        let mut buf = vec![1u8; 256];
        let base = buf.as_mut_ptr() as u64;
        let mut m = model();
        m.pinned_alloc(base, 256);
        let st = m.access(CTX, B, "copy", &[]).unwrap();
        m.pinned_record(base, 128, st, "copy", false);
        // Unchanged bytes, or bytes outside the copied range: nothing to say.
        m.pinned_check(base, 256, "next").unwrap();
        buf[200] = 9;
        m.pinned_check(base, 256, "next").unwrap();
        buf[3] = 9;
        let f = m.pinned_check(base + 64, 8, "next").unwrap_err();
        assert!(f.message.starts_with("host wrote pinned memory"), "{}", f.message);
        // Synchronised: done, whatever the bytes.
        let st = m.access(CTX, B, "copy", &[]).unwrap();
        m.pinned_record(base, 128, st, "copy", false);
        m.event_record(5, CTX, B);
        m.event_sync(5);
        buf[3] = 10;
        m.pinned_free(base).unwrap();
    }
}
