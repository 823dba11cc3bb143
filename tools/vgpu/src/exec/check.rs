//! Shadow state of a block's shared memory, one record per byte, for racecheck and initcheck.
//!
//! Ordering: a block keeps a clock that ticks at every barrier. An access records its
//! thread and the clock. A later access by another thread is ordered after it when a
//! `bar.sync` of the block, or (for two threads of one warp) a `bar.warp.sync` of that warp,
//! happened since; otherwise, if either access writes, the pair is a race. `cp.async` copies
//! count as writes by the issuing thread when they land (at the `wait_group` that covers
//! them), and any access to bytes whose copy is still in flight is itself a finding.

use super::run::{Block, Runner};

const NONE: u16 = 0;
const MANY: u16 = u16::MAX;
const MIXED_WARPS: u16 = u16::MAX;
/// `Rec::flags` bit: the last reads were by a warp-collective instruction of warp `rw`.
const COLLECTIVE: u8 = 2;

/// Per-byte record (20 bytes). Times are the block clock; a record older than the running
/// block's start (`base`) is from an earlier block on this worker and means nothing now, so
/// the shadow is reused across blocks without clearing it.
#[derive(Clone, Copy, Default)]
struct Rec {
    /// Last writer's thread index + 1 (0: none).
    w: u16,
    /// Last reader's thread index + 1, or MANY.
    r: u16,
    /// The readers' warp, or MIXED_WARPS.
    rw: u16,
    /// cp.async copies in flight to this byte.
    pend: u8,
    /// COLLECTIVE.
    flags: u8,
    wt: u32,
    rt: u32,
    /// When the byte was last written (initcheck: written by this block iff it >= base).
    it: u32,
}

/// A finding of the shadow checks.
#[derive(Debug, Clone, Copy)]
pub enum Finding {
    /// Read of a byte nobody in this block wrote.
    Uninit { off: usize },
    /// `kind` is "read-after-write", "write-after-read" or "write-after-write"; `other` is
    /// the other thread's index (None: several readers).
    Race {
        off: usize,
        kind: &'static str,
        other: Option<u32>,
    },
    /// Access to a byte whose cp.async copy has not landed (no wait_group covers it yet).
    InFlight { off: usize, write: bool },
}

impl Finding {
    /// (check name, message, detail line).
    pub(crate) fn describe(&self, r: &Runner, b: &Block) -> (&'static str, String, String) {
        let _ = b;
        let who = |t: Option<u32>| match t {
            Some(t) => {
                let bd = r.l.cfg.block;
                format!("thread ({},{},{})", t % bd[0], (t / bd[0]) % bd[1], t / (bd[0] * bd[1]))
            }
            None => "several threads".to_string(),
        };
        match *self {
            Finding::Uninit { off } => (
                "initcheck",
                "uninitialized __shared__ memory read".into(),
                format!("address {off:#x} (shared) was never written by this block"),
            ),
            Finding::Race { off, kind, other } => (
                "racecheck",
                format!("shared memory {kind} hazard with {} and no barrier between", who(other)),
                format!("address {off:#x} (shared)"),
            ),
            Finding::InFlight { off, write } => (
                "racecheck",
                format!(
                    "shared memory {} while a cp.async copy to it is in flight (no cp.async.wait_group covers it yet)",
                    if write { "write" } else { "read" }
                ),
                format!("address {off:#x} (shared)"),
            ),
        }
    }
}

pub struct SharedShadow {
    recs: Vec<Rec>,
    /// Clock: ticks at every barrier and block start.
    now: u32,
    /// The running block's start.
    base: u32,
    last_block_bar: u32,
    last_warp_bar: Vec<u32>,
    /// First byte read before any write (initcheck), not yet reported.
    pub uninit: Option<usize>,
}

impl SharedShadow {
    pub fn new(size: usize) -> Self {
        let mut s = SharedShadow {
            recs: vec![Rec::default(); size],
            now: 0,
            base: 0,
            last_block_bar: 0,
            last_warp_bar: vec![0; 32],
            uninit: None,
        };
        s.start_block();
        s
    }

    /// A new block starts on this shadow: everything recorded before is void.
    pub fn start_block(&mut self) {
        if self.now > u32::MAX - (1 << 24) {
            // The clock would wrap: clear instead.
            self.recs.iter_mut().for_each(|r| *r = Rec::default());
            self.now = 0;
        }
        self.now += 2;
        self.base = self.now;
        self.last_block_bar = self.now;
        self.last_warp_bar.iter_mut().for_each(|t| *t = 0);
        self.uninit = None;
    }

    /// Copies that never landed (the block ended without waiting for them).
    pub fn drop_async(&mut self, off: usize, n: usize) {
        for i in off..off + n {
            self.recs[i].pend = self.recs[i].pend.saturating_sub(1);
        }
    }

    pub fn block_barrier(&mut self) {
        self.now += 1;
        self.last_block_bar = self.now;
    }

    pub fn warp_barrier(&mut self, warp: u32) {
        self.now += 1;
        self.last_warp_bar[warp as usize] = self.now;
    }

    /// Whether an access by thread `prev` (index + 1) at time `t` is ordered before one by
    /// thread `tid` now.
    #[inline(always)]
    fn ordered(&self, prev: u16, t: u32, tid: u32) -> bool {
        if prev as u32 == tid + 1 || t < self.last_block_bar {
            return true;
        }
        let (pw, w) = ((prev as u32 - 1) / 32, tid / 32);
        pw == w && t < self.last_warp_bar[w as usize]
    }

    /// A read by a warp-collective `.sync.aligned` instruction (ldmatrix) on behalf of
    /// thread `tid`: every lane of the warp waits for the instruction, whose loads complete
    /// before it returns data to them, so later writes by lanes of this warp are ordered after
    /// it (other warps still need a barrier).
    pub fn read_collective(&mut self, off: usize, n: usize, tid: u32) -> Result<(), Finding> {
        self.read(off, n, tid)?;
        for i in off..off + n {
            let rec = &mut self.recs[i];
            if rec.rw == (tid / 32) as u16 {
                rec.flags |= COLLECTIVE;
            }
        }
        Ok(())
    }

    pub fn read(&mut self, off: usize, n: usize, tid: u32) -> Result<(), Finding> {
        let me = (tid + 1) as u16;
        let warp = (tid / 32) as u16;
        for i in off..off + n {
            let r = self.recs[i];
            if r.pend > 0 {
                return Err(Finding::InFlight { off: i, write: false });
            }
            if r.it < self.base && self.uninit.is_none() {
                // Reported at the end of the launch unless a sharper finding (a race with the
                // write that comes later) fails it first.
                self.uninit = Some(i);
            }
            if r.w != NONE && !self.ordered(r.w, r.wt, tid) {
                return Err(Finding::Race {
                    off: i,
                    kind: "read-after-write",
                    other: Some(r.w as u32 - 1),
                });
            }
            let rec = &mut self.recs[i];
            rec.flags &= !COLLECTIVE;
            if rec.r == NONE || rec.r == me || rec.rt < self.last_block_bar {
                rec.r = me;
                rec.rw = warp;
            } else {
                rec.r = MANY;
                if rec.rw != warp {
                    rec.rw = MIXED_WARPS;
                }
            }
            rec.rt = self.now;
        }
        Ok(())
    }

    fn check_write(&self, i: usize, tid: u32) -> Result<(), Finding> {
        let r = self.recs[i];
        if r.w != NONE && !self.ordered(r.w, r.wt, tid) {
            return Err(Finding::Race {
                off: i,
                kind: "write-after-write",
                other: Some(r.w as u32 - 1),
            });
        }
        if r.flags & COLLECTIVE != 0 && r.rt >= self.base && r.rw == (tid / 32) as u16 {
            return Ok(());
        }
        if r.r == MANY {
            let same_warp_synced = r.rw == (tid / 32) as u16 && r.rt < self.last_warp_bar[(tid / 32) as usize];
            if r.rt >= self.last_block_bar && !same_warp_synced {
                return Err(Finding::Race {
                    off: i,
                    kind: "write-after-read",
                    other: None,
                });
            }
        } else if r.r != NONE && !self.ordered(r.r, r.rt, tid) {
            return Err(Finding::Race {
                off: i,
                kind: "write-after-read",
                other: Some(r.r as u32 - 1),
            });
        }
        Ok(())
    }

    fn mark_written(&mut self, i: usize, tid: u32) {
        let rec = &mut self.recs[i];
        rec.w = (tid + 1) as u16;
        rec.wt = self.now;
        rec.it = self.now;
        rec.flags = 0;
        // Reads before this write are now ordered through it for later checks.
        rec.r = NONE;
    }

    pub fn write(&mut self, off: usize, n: usize, tid: u32) -> Result<(), Finding> {
        for i in off..off + n {
            if self.recs[i].pend > 0 {
                return Err(Finding::InFlight { off: i, write: true });
            }
            self.check_write(i, tid)?;
            self.mark_written(i, tid);
        }
        Ok(())
    }

    /// A shared atomic: ordered with other atomics, initialises the bytes.
    pub fn atomic(&mut self, off: usize, n: usize) {
        for i in off..off + n {
            self.recs[i].it = self.now;
        }
    }

    pub fn issue_async(&mut self, off: usize, n: usize) {
        for i in off..off + n {
            self.recs[i].pend = self.recs[i].pend.saturating_add(1);
        }
    }

    /// A cp.async copy lands: a write by the issuing thread now.
    pub fn land_async(&mut self, off: usize, n: usize, tid: u32) -> Result<(), Finding> {
        for i in off..off + n {
            self.recs[i].pend = self.recs[i].pend.saturating_sub(1);
            self.check_write(i, tid)?;
            self.mark_written(i, tid);
        }
        Ok(())
    }
}
