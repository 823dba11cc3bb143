//! The rendezvous protocol over a [`Segment`]: joining, the step barrier that every collective
//! runs on, and leaving.
//!
//! A collective is split into steps of at most [`SLOT_BYTES`] per rank. In step `t` rank r
//! 1. waits until every rank's `done >= t - 1` (nobody still reads r's slot from step t - 1);
//! 2. copies its part into slot r, writes the collective's descriptor, publishes `posted = t`;
//! 3. waits until every rank's `posted >= t`, compares the descriptors (a mismatch fails the
//!    collective on every rank, since each sees the others' differ, before any data is used);
//! 4. reduces or copies the slots in rank order into its receive buffer, publishes `done = t`.
//!
//! Every wait checks, besides its condition, the abort flag, whether the awaited rank left,
//! whether its process still lives (every 100 ms), and a timeout (`VGPU_NCCL_TIMEOUT_S`).
//! The condition is checked first, so a peer that aborts right after finishing its last
//! collective (cudarc's `Comm` aborts on drop) does not fail the others.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

use super::reduce::{reduce, Dt, Red};
use super::shm::{alive, RankRec, Segment, DESC_WORDS, MAX_RANKS, SLOT_BYTES};
use super::{ncclInvalidArgument, ncclInvalidUsage, ncclRemoteError, ncclResult_t, ncclSystemError};

/// A failed call: the result code and the message (for stderr and `ncclGetLastError`).
pub type Fail = (ncclResult_t, String);

/// `VGPU_NCCL_TIMEOUT_S` (default 300 s): how long a rank waits for its peers at any one
/// point (joining, or one step of a collective). Generous, since an interpreted training step
/// of one rank may lag another's by a lot; dead, departed and aborting peers end a wait
/// sooner.
pub fn timeout() -> Duration {
    let s = std::env::var("VGPU_NCCL_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(s)
}

/// What the unique id says: where the segment lives and who made the id.
pub struct IdInfo {
    pub path: std::path::PathBuf,
    pub creator: u32,
}

/// One rank's view of a communicator (immutable; the counters live in [`Seq`], behind the
/// handle's lock, so that an abort can reach the segment while a collective waits).
pub struct Rank {
    pub seg: Segment,
    pub rank: usize,
    pub nranks: usize,
    pub device: i32,
    timeout: Duration,
}

/// The last step this rank ran, and the number of collectives it issued.
#[derive(Default)]
pub struct Seq {
    step: u64,
    colls: u64,
}

/// Kinds of collective (the first descriptor word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AllReduce = 1,
    Broadcast = 2,
    Reduce = 3,
    AllGather = 4,
    ReduceScatter = 5,
}

/// One collective as a rank enqueued it. `count` is NCCL's: elements per rank for all-gather
/// (sendcount) and reduce-scatter (recvcount), of the whole buffer otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub kind: Kind,
    pub send: u64,
    pub recv: u64,
    pub count: usize,
    pub dt: Dt,
    pub red: Red,
    pub root: usize,
}

impl Op {
    /// Length of the vector the steps run over: the reduced vector, the broadcast one, one
    /// rank's all-gather part.
    fn global_len(&self, n: usize) -> usize {
        match self.kind {
            Kind::ReduceScatter => self.count * n,
            _ => self.count,
        }
    }

    /// Elements read from sendbuff and written to recvbuff by rank r.
    pub fn extents(&self, r: usize, n: usize) -> (usize, usize) {
        match self.kind {
            Kind::AllReduce => (self.count, self.count),
            Kind::Broadcast => ((r == self.root) as usize * self.count, self.count),
            Kind::Reduce => (self.count, (r == self.root) as usize * self.count),
            Kind::AllGather => (self.count, self.count * n),
            Kind::ReduceScatter => (self.count * n, self.count),
        }
    }

    fn desc(&self, coll: u64, chunk: u64) -> [u64; DESC_WORDS] {
        [
            self.kind as u64 | (self.dt as u64) << 8 | (self.red as u64) << 16,
            self.count as u64,
            self.root as u64,
            coll,
            chunk,
            0,
        ]
    }
}

/// A descriptor in words: "collective #3 (all-reduce of 1000 bf16, sum), step 0".
fn describe(d: &[u64; DESC_WORDS]) -> String {
    let kind = ["?", "all-reduce", "broadcast", "reduce", "all-gather", "reduce-scatter"]
        .get((d[0] & 0xff) as usize)
        .unwrap_or(&"?");
    let ty = ["i8", "u8", "i32", "u32", "i64", "u64", "f16", "f32", "f64", "bf16"]
        .get(((d[0] >> 8) & 0xff) as usize)
        .unwrap_or(&"?");
    let op = ["sum", "prod", "max", "min", "avg"]
        .get(((d[0] >> 16) & 0xff) as usize)
        .unwrap_or(&"?");
    let how = match d[0] & 0xff {
        1 | 5 => format!(", {op}"),
        3 => format!(", {op}, root {}", d[2]),
        2 => format!(", root {}", d[2]),
        _ => String::new(),
    };
    format!("collective #{} ({kind} of {} {ty}{how}), step {}", d[3], d[1], d[4])
}

/// Waits until `ready(q)` holds for every rank q < n, failing on abort, a rank that left, a
/// dead process or `timeout`. `what` names the wait in messages.
fn wait_all(
    seg: &Segment,
    me: usize,
    n: usize,
    timeout: Duration,
    what: &str,
    extra: &dyn Fn() -> Option<Fail>,
    ready: impl Fn(&RankRec) -> bool,
) -> Result<(), Fail> {
    let start = Instant::now();
    let mut last_live = start;
    let mut spins = 0u32;
    loop {
        if (0..n).all(|q| ready(seg.rank(q))) {
            return Ok(());
        }
        let pending: Vec<usize> = (0..n).filter(|&q| !ready(seg.rank(q))).collect();
        let a = seg.header().abort.load(Acquire);
        if a != 0 {
            let who = a - 1;
            let code = if who as usize == me { ncclInvalidUsage } else { ncclRemoteError };
            return Err((
                code,
                format!("rank {me}: {what}: rank {who} aborted the communicator (ncclCommAbort)"),
            ));
        }
        for &q in &pending {
            if seg.rank(q).departed.load(Acquire) != 0 {
                return Err((
                    ncclRemoteError,
                    format!("rank {me}: {what}: rank {q} left the communicator (destroyed it) before taking part"),
                ));
            }
        }
        let now = Instant::now();
        if now.duration_since(last_live) >= Duration::from_millis(100) {
            last_live = now;
            for &q in &pending {
                let pid = seg.rank(q).pid.load(Acquire);
                if pid != 0 && !alive(pid) {
                    return Err((
                        ncclRemoteError,
                        format!("rank {me}: {what}: rank {q} (process {pid}) is gone: it exited or was killed"),
                    ));
                }
            }
            if let Some((c, m)) = extra() {
                return Err((c, format!("rank {me}: {what}: {m}")));
            }
        }
        if now.duration_since(start) >= timeout {
            return Err((
                ncclSystemError,
                format!(
                    "rank {me}: {what}: timed out after {:.1} s (VGPU_NCCL_TIMEOUT_S) waiting for rank(s) {pending:?}",
                    now.duration_since(start).as_secs_f64()
                ),
            ));
        }
        // Spin briefly, then yield, then sleep: ranks may share few cores, and a peer may
        // still be computing for seconds.
        spins = spins.saturating_add(1);
        if spins < 64 {
            std::hint::spin_loop();
        } else if spins < 512 {
            std::thread::yield_now();
        } else if now.duration_since(start) < Duration::from_millis(20) {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Rank {
    /// Joins the communicator `info` names as `rank` of `nranks` on `device`, and waits for
    /// every rank to join.
    pub fn join(info: &IdInfo, nranks: usize, rank: usize, device: i32) -> Result<Rank, Fail> {
        if nranks == 0 || nranks > MAX_RANKS || rank >= nranks {
            return Err((
                ncclInvalidArgument,
                format!("ncclCommInitRank: rank {rank} of {nranks} ranks (this device allows 1 to {MAX_RANKS})"),
            ));
        }
        let seg = Segment::open(&info.path, rank).map_err(|e| {
            (
                ncclSystemError,
                format!("ncclCommInitRank: cannot open the shared segment {}: {e}", info.path.display()),
            )
        })?;
        let timeout = timeout();
        let me = Rank {
            seg,
            rank,
            nranks,
            device,
            timeout,
        };
        let h = me.seg.header();
        if let Err(other) = h.nranks.compare_exchange(0, nranks as u32, AcqRel, Acquire) {
            if other as usize != nranks {
                // Not joined: leaving would count this rank as departed for the others.
                return Err((
                    ncclInvalidUsage,
                    format!("ncclCommInitRank: rank {rank} says {nranks} ranks, another rank said {other}"),
                ));
            }
        }
        // Claim the rank (1), fill in pid and device, then publish (2): a second claim fails
        // without touching the first one's record.
        let rec = me.seg.rank(rank);
        if rec.joined.compare_exchange(0, 1, AcqRel, Acquire).is_err() {
            return Err((
                ncclInvalidUsage,
                format!("ncclCommInitRank: rank {rank} joined twice with one unique id"),
            ));
        }
        rec.pid.store(std::process::id(), Relaxed);
        rec.device.store(device as u32, Relaxed);
        rec.joined.store(2, Release);
        // NCCL also needs the id's creator to live until every rank joined.
        let creator = || {
            (!alive(info.creator)).then(|| {
                (
                    ncclRemoteError,
                    format!("the process that made the unique id ({}) is gone", info.creator),
                )
            })
        };
        let waited = wait_all(
            &me.seg,
            rank,
            nranks,
            timeout,
            &format!("ncclCommInitRank (rank {rank} of {nranks}, waiting for every rank to join)"),
            &creator,
            |r| r.joined.load(Acquire) == 2,
        );
        if let Err(e) = waited {
            me.leave(false);
            return Err(e);
        }
        // NCCL refuses two ranks of one communicator on one GPU.
        let pid = std::process::id();
        for q in 0..nranks {
            let rq = me.seg.rank(q);
            if q != rank && rq.pid.load(Acquire) == pid && rq.device.load(Acquire) == device as u32 {
                me.leave(false);
                return Err((
                    ncclInvalidUsage,
                    format!("ncclCommInitRank: ranks {q} and {rank} both use CUDA device {device} of process {pid} (duplicate GPU)"),
                ));
            }
        }
        Ok(me)
    }

    /// Leaves the communicator: marks this rank departed (and the communicator aborted when
    /// `abort`), and removes the segment file once no rank is left that could still use it.
    pub fn leave(&self, abort: bool) {
        let h = self.seg.header();
        if abort {
            let _ = h.abort.compare_exchange(0, self.rank as u32 + 1, AcqRel, Acquire);
        }
        self.seg.rank(self.rank).departed.store(1, Release);
        let n = h.nranks.load(Acquire) as usize;
        let gone = (0..n.min(MAX_RANKS)).all(|q| {
            let r = self.seg.rank(q);
            r.departed.load(Acquire) != 0 || !alive(r.pid.load(Acquire))
        });
        if gone {
            self.seg.unlink();
        }
    }

    /// Runs one collective to completion (the buffers were checked by the caller).
    ///
    /// # Safety
    /// `op.send` / `op.recv` hold the elements `op.extents` says for this rank.
    pub unsafe fn run(&self, seq: &mut Seq, op: &Op) -> Result<(), Fail> {
        let (n, r) = (self.nranks, self.rank);
        seq.colls += 1;
        let len = op.global_len(n);
        let size = op.dt.size();
        let per_step = SLOT_BYTES / size;
        let steps = len.div_ceil(per_step);
        for k in 0..steps {
            seq.step += 1;
            let t = seq.step;
            let (lo, hi) = (k * per_step, (len).min((k + 1) * per_step));
            let m = hi - lo;
            let mine = op.desc(seq.colls, k as u64);
            let what = describe(&mine);
            wait_all(&self.seg, r, n, self.timeout, &what, &|| None, |q| q.done.load(Acquire) >= t - 1)?;
            let posts = op.kind != Kind::Broadcast || r == op.root;
            if posts {
                // SAFETY: [lo, hi) lies inside sendbuff's extent; the slot holds SLOT_BYTES.
                unsafe { std::ptr::copy_nonoverlapping((op.send as *const u8).add(lo * size), self.seg.slot(r), m * size) };
            }
            let rec = self.seg.rank(r);
            for (w, v) in rec.desc.iter().zip(mine) {
                w.store(v, Relaxed);
            }
            rec.posted.store(t, Release);
            wait_all(&self.seg, r, n, self.timeout, &what, &|| None, |q| q.posted.load(Acquire) >= t)?;
            for q in 0..n {
                let theirs: [u64; DESC_WORDS] = std::array::from_fn(|i| self.seg.rank(q).desc[i].load(Relaxed));
                if theirs != mine {
                    return Err((
                        ncclInvalidUsage,
                        format!(
                            "rank {r}: mismatched collectives: this rank runs {}, rank {q} runs {}",
                            describe(&mine),
                            describe(&theirs)
                        ),
                    ));
                }
            }
            let slots: Vec<*const u8> = (0..n).map(|q| self.seg.slot(q) as *const u8).collect();
            let recv = op.recv as *mut u8;
            // SAFETY: every slot holds this step's m elements (published, descriptors equal);
            // the receive ranges lie inside recvbuff's extent.
            unsafe {
                match op.kind {
                    Kind::AllReduce => reduce(op.dt, op.red, &slots, m, recv.add(lo * size)),
                    Kind::Reduce if r == op.root => reduce(op.dt, op.red, &slots, m, recv.add(lo * size)),
                    Kind::Reduce => {}
                    Kind::ReduceScatter => {
                        // This rank's block of the reduced vector, within this step.
                        let (b0, b1) = ((r * op.count).max(lo), ((r + 1) * op.count).min(hi));
                        if b0 < b1 {
                            let at: Vec<*const u8> = slots.iter().map(|s| s.add((b0 - lo) * size)).collect();
                            reduce(op.dt, op.red, &at, b1 - b0, recv.add((b0 - r * op.count) * size));
                        }
                    }
                    Kind::Broadcast => std::ptr::copy(slots[op.root], recv.add(lo * size), m * size),
                    Kind::AllGather => {
                        for (q, s) in slots.iter().enumerate() {
                            std::ptr::copy(*s, recv.add((q * op.count + lo) * size), m * size);
                        }
                    }
                }
            }
            rec.done.store(t, Release);
        }
        Ok(())
    }
}
