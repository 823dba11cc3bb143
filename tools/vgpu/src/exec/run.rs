//! Running a launch: blocks spread over a small worker pool, several resident per worker and
//! their warps interleaved in slices of pseudo-random length; each warp runs its 32 lanes in
//! SIMT fashion (the lanes at the lowest PC step together, so diverged lanes reconverge where
//! their paths meet). Every memory access is checked (see `check.rs`).

#![allow(clippy::too_many_arguments)]

use super::check::{Finding, SharedShadow};
use super::counters::Counters;
use super::decode::*;
use super::{Fault, FaultKind, Kernel, LaunchConfig};
use crate::mem::Alloc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// What a launch shares between its workers.
pub(crate) struct Launch<'a> {
    pub k: &'a Kernel,
    pub cfg: &'a LaunchConfig,
    pub params: Vec<u8>,
    pub allocs: Vec<Alloc>,
    /// Per entry of `allocs`: USE_READ | USE_WRITE as the launch accessed it (streamcheck).
    pub uses: Vec<AtomicU8>,
    pub smem_size: u32,
    pub threads: u32,
    pub abort: AtomicBool,
    pub fault: Mutex<Option<Fault>>,
    pub soft: Mutex<Option<Fault>>,
    pub counters: Option<Mutex<Counters>>,
    pub seed: u64,
    pub started: std::time::Instant,
    pub timeout: std::time::Duration,
}

impl Launch<'_> {
    /// A finding that fails the launch unless another fails it first (initcheck).
    fn soft(&self, f: Fault) {
        let mut slot = self.soft.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(f);
        }
    }
    fn fail(&self, f: Fault) {
        let mut slot = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(f);
        }
        self.abort.store(true, Ordering::Relaxed);
    }
}

/// `Launch::uses` bits.
const USE_READ: u8 = 1;
const USE_WRITE: u8 = 2;

/// A pending `cp.async` copy: lands in shared memory at the wait that covers its group.
struct Copy {
    lane: u8,
    group: u32,
    dst: u32,
    len: u8,
    data: [u8; 16],
    line: u32,
}

pub(crate) struct Warp {
    pub id: u32,
    regs: Vec<u64>,
    pc: [u32; 32],
    /// Lanes that exist (the last warp of a block may be partial).
    live: u32,
    exited: u32,
    at_bar: bool,
    copies: Vec<Copy>,
    /// Committed cp.async groups per lane.
    committed: [u32; 32],
    local: Vec<u8>,
    /// The allocation the warp's last global access hit: [base, end), its index in the
    /// launch's table, and the `Launch::uses` bits already set for it through this cache.
    cache: (u64, u64),
    cache_idx: usize,
    cache_uses: u8,
    /// Lanes waiting at a warp-synchronous instruction for the rest of their warp.
    waiting: u32,
}

pub(crate) struct Block {
    pub id: [u32; 3],
    pub linear: u64,
    warps: Vec<Warp>,
    smem: Vec<u8>,
    shadow: SharedShadow,
    done: bool,
}

fn fbits(v: u64) -> f32 {
    f32::from_bits(v as u32)
}
fn dbits(v: u64) -> f64 {
    f64::from_bits(v)
}
fn width_mask(bytes: u32) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

/// f32 flush-to-zero of subnormals (sign kept).
fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// The f32 nearest to the exact value `hi + lo` (|lo| tiny beside hi) in rounding mode `r`.
fn round_f32(hi: f64, lo: f64, r: Rnd) -> f32 {
    let n = hi as f32;
    if r == Rnd::Rn || !hi.is_finite() {
        return n;
    }
    let diff = if n.is_infinite() { -hi.signum() } else { (hi - n as f64) + lo };
    let up = |x: f32| if x.is_infinite() && x < 0.0 { f32::MIN } else { x.next_up() };
    let down = |x: f32| if x.is_infinite() && x > 0.0 { f32::MAX } else { x.next_down() };
    let (lo_c, hi_c) = if diff > 0.0 {
        (n, up(n))
    } else if diff < 0.0 {
        (down(n), n)
    } else {
        return n;
    };
    match r {
        Rnd::Rm => lo_c,
        Rnd::Rp => hi_c,
        Rnd::Rz => {
            if hi > 0.0 || (hi == 0.0 && lo > 0.0) {
                lo_c
            } else {
                hi_c
            }
        }
        Rnd::Rn => n,
    }
}

/// Exact sum as (hi, lo) (Knuth's TwoSum).
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

fn round_f64(x: f64, r: Rnd) -> f64 {
    match r {
        Rnd::Rn => x.round_ties_even(),
        Rnd::Rz => x.trunc(),
        Rnd::Rm => x.floor(),
        Rnd::Rp => x.ceil(),
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN becomes the canonical 0x7FFF as the GPU's
/// `cvt.rn.bf16.f32` gives.
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7FFF;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

fn fmin(a: f32, b: f32) -> f32 {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => f32::from_bits(0x7FFF_FFFF),
        (true, false) => b,
        (false, true) => a,
        _ => {
            if a == b {
                // -0 is below +0.
                f32::from_bits(a.to_bits() | b.to_bits())
            } else if a < b {
                a
            } else {
                b
            }
        }
    }
}
fn fmax(a: f32, b: f32) -> f32 {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => f32::from_bits(0x7FFF_FFFF),
        (true, false) => b,
        (false, true) => a,
        _ => {
            if a == b {
                f32::from_bits(a.to_bits() & b.to_bits())
            } else if a > b {
                a
            } else {
                b
            }
        }
    }
}
fn dmin(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a < b {
        a
    } else {
        b
    }
}
fn dmax(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a > b {
        a
    } else {
        b
    }
}

fn cmp_f(c: Cmp, a: f64, b: f64) -> bool {
    let un = a.is_nan() || b.is_nan();
    match c {
        Cmp::Eq => !un && a == b,
        Cmp::Ne => !un && a != b,
        Cmp::Lt => !un && a < b,
        Cmp::Le => !un && a <= b,
        Cmp::Gt => !un && a > b,
        Cmp::Ge => !un && a >= b,
        Cmp::Equ => un || a == b,
        Cmp::Neu => un || a != b,
        Cmp::Ltu => un || a < b,
        Cmp::Leu => un || a <= b,
        Cmp::Gtu => un || a > b,
        Cmp::Geu => un || a >= b,
        Cmp::Num => !un,
        Cmp::Nan => un,
    }
}

fn cmp_i<T: PartialOrd + PartialEq>(c: Cmp, a: T, b: T) -> bool {
    match c {
        Cmp::Eq | Cmp::Equ => a == b,
        Cmp::Ne | Cmp::Neu => a != b,
        Cmp::Lt | Cmp::Ltu => a < b,
        Cmp::Le | Cmp::Leu => a <= b,
        Cmp::Gt | Cmp::Gtu => a > b,
        Cmp::Ge | Cmp::Geu => a >= b,
        Cmp::Num => true,
        Cmp::Nan => false,
    }
}

/// The state one worker thread keeps while running blocks of a launch.
pub(crate) struct Runner<'l, 'a> {
    pub l: &'l Launch<'a>,
    pub counters: Option<Counters>,
    rng: u64,
    /// Finished blocks whose buffers the next blocks reuse.
    spare: Vec<Block>,
}

/// Why a warp stopped running.
enum Stop {
    Slice,
    Barrier,
    Exited,
}

type R<T> = Result<T, Fault>;

impl<'l, 'a> Runner<'l, 'a> {
    pub fn new(l: &'l Launch<'a>, worker: u64) -> Self {
        let counters = l.counters.as_ref().map(|_| Counters::new(&l.k.body.classes));
        Runner {
            l,
            counters,
            rng: l.seed ^ (worker.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
            spare: Vec::new(),
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    pub fn new_block(&mut self, linear: u64) -> Block {
        let cfg = self.l.cfg;
        let g = cfg.grid;
        let id = [
            (linear % g[0] as u64) as u32,
            ((linear / g[0] as u64) % g[1] as u64) as u32,
            (linear / (g[0] as u64 * g[1] as u64)) as u32,
        ];
        if let Some(mut b) = self.spare.pop() {
            // Reuse a finished block's buffers: registers and shared memory keep stale values
            // (reading them before writing is a kernel bug the checks see), the shadow
            // restarts its clock instead of clearing.
            b.id = id;
            b.linear = linear;
            b.done = false;
            b.shadow.start_block();
            for w in &mut b.warps {
                w.pc = [0; 32];
                w.exited = !w.live;
                w.at_bar = false;
                w.copies.clear();
                w.committed = [0; 32];
                w.cache = (0, 0);
                w.cache_uses = 0;
                w.waiting = 0;
            }
            return b;
        }
        let nthreads = self.l.threads;
        let nwarps = nthreads.div_ceil(32);
        let nregs = self.l.k.body.nregs as usize;
        let warps = (0..nwarps)
            .map(|w| {
                let live_n = (nthreads - w * 32).min(32);
                let live = if live_n == 32 { u32::MAX } else { (1u32 << live_n) - 1 };
                Warp {
                    id: w,
                    regs: vec![0; nregs * 32],
                    pc: [0; 32],
                    live,
                    exited: !live,
                    at_bar: false,
                    copies: Vec::new(),
                    committed: [0; 32],
                    local: vec![0; self.l.k.local_bytes as usize * 32],
                    cache: (0, 0),
                    cache_idx: 0,
                    cache_uses: 0,
                    waiting: 0,
                }
            })
            .collect();
        let size = self.l.smem_size as usize;
        Block {
            id,
            linear,
            warps,
            smem: vec![0xA5; size],
            shadow: SharedShadow::new(size),
            done: false,
        }
    }

    /// Runs the launch's blocks `first, first + step, ...` with `resident` of them interleaved.
    pub fn run_blocks(&mut self, next: &AtomicU64, total: u64, resident: usize) {
        let mut blocks: Vec<Block> = Vec::new();
        let mut cursor = 0usize;
        let mut turns = 0u32;
        loop {
            if self.l.abort.load(Ordering::Relaxed) {
                return;
            }
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(1024) && self.l.started.elapsed() > self.l.timeout {
                let report = format!(
                    "========= vgpu watchdog: the launch ran past {} s (VGPU_TIMEOUT_S): an endless loop, or a block waiting for one that is not running\n=========     kernel {}\n",
                    self.l.timeout.as_secs(),
                    self.l.k.name
                );
                self.l.fail(Fault {
                    kind: FaultKind::Timeout,
                    report,
                });
                return;
            }
            while blocks.len() < resident {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= total {
                    break;
                }
                blocks.push(self.new_block(b));
            }
            if blocks.is_empty() {
                return;
            }
            cursor = (cursor + 1) % blocks.len();
            let slice = 1 + (self.next_rand() % 48) as u32;
            let res = self.step_block(&mut blocks[cursor], slice);
            if let Err(f) = res {
                self.l.fail(f);
                return;
            }
            if blocks[cursor].done {
                let mut b = blocks.swap_remove(cursor);
                for w in &mut b.warps {
                    for cp in w.copies.drain(..) {
                        b.shadow.drop_async(cp.dst as usize, cp.len as usize);
                    }
                }
                self.spare.push(b);
            }
        }
    }

    /// Runs each runnable warp of the block for up to `slice` instructions, releasing the
    /// barrier when every warp has arrived or exited.
    fn step_block(&mut self, b: &mut Block, slice: u32) -> R<()> {
        let n = b.warps.len();
        let start = (self.next_rand() % n as u64) as usize;
        let mut any = false;
        for i in 0..n {
            let w = (start + i) % n;
            if b.warps[w].at_bar || b.warps[w].exited == u32::MAX {
                continue;
            }
            any = true;
            let _ = self.run_warp(b, w, slice)?;
        }
        if b.warps.iter().all(|w| w.exited == u32::MAX) {
            // Copies never waited for are dropped, as nothing can read them any more.
            b.done = true;
            return Ok(());
        }
        if b.warps.iter().all(|w| w.at_bar || w.exited == u32::MAX) {
            b.shadow.block_barrier();
            if let Some(c) = self.counters.as_mut() {
                c.barriers += 1;
            }
            for w in &mut b.warps {
                if w.at_bar {
                    w.at_bar = false;
                    let m = w.live & !w.exited;
                    for l in 0..32 {
                        if m >> l & 1 == 1 {
                            w.pc[l] += 1;
                        }
                    }
                }
            }
        } else if !any {
            unreachable!("no warp can run and the barrier is not complete");
        }
        Ok(())
    }

    pub fn fault(&self, kind: FaultKind, check: &str, msg: &str, b: &Block, w: &Warp, lane: Option<u32>, pc: u32, extra: &str) -> Fault {
        let k = self.l.k;
        let inst = &k.body.insts[pc as usize];
        let mut r = format!("========= vgpu {check}: {msg}\n");
        r.push_str(&format!(
            "=========     kernel {}, block ({},{},{})",
            k.name, b.id[0], b.id[1], b.id[2]
        ));
        if let Some(l) = lane {
            let t = self.tid(w.id * 32 + l);
            r.push_str(&format!(", thread ({},{},{}) (warp {}, lane {})", t[0], t[1], t[2], w.id, l));
        } else {
            r.push_str(&format!(", warp {}", w.id));
        }
        r.push('\n');
        if !extra.is_empty() {
            r.push_str(&format!("=========     {extra}\n"));
        }
        r.push_str(&format!("=========     at PTX line {}: {}\n", inst.line, k.body.text[pc as usize]));
        Fault { kind, report: r }
    }

    fn tid(&self, linear: u32) -> [u32; 3] {
        let bd = self.l.cfg.block;
        [linear % bd[0], (linear / bd[0]) % bd[1], linear / (bd[0] * bd[1])]
    }

    #[inline(always)]
    fn rd(&self, b: &Block, w: &Warp, s: Src, l: usize) -> u64 {
        match s {
            Src::R(r) => w.regs[r as usize * 32 + l],
            Src::NotR(r) => (w.regs[r as usize * 32 + l] == 0) as u64,
            Src::Imm(v) => v,
            Src::S(sr) => self.sreg(b, w, sr, l),
        }
    }

    fn sreg(&self, b: &Block, w: &Warp, s: Sreg, l: usize) -> u64 {
        let cfg = self.l.cfg;
        let lin = w.id * 32 + l as u32;
        match s {
            Sreg::Tid(d) => self.tid(lin)[d as usize] as u64,
            Sreg::Ntid(d) => cfg.block[d as usize] as u64,
            Sreg::Ctaid(d) => b.id[d as usize] as u64,
            Sreg::Nctaid(d) => cfg.grid[d as usize] as u64,
            Sreg::LaneId => l as u64,
            Sreg::WarpId => w.id as u64,
            Sreg::NWarpId => 64,
            Sreg::SmId => b.linear % crate::device::profile().sm_count as u64,
            Sreg::NSmId => crate::device::profile().sm_count as u64,
            Sreg::GridId => 1,
            Sreg::Clock | Sreg::Clock64 | Sreg::GlobalTimer => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            Sreg::LaneMaskEq => 1 << l,
            Sreg::LaneMaskLt => (1u64 << l) - 1,
            Sreg::LaneMaskLe => (1u64 << (l + 1)) - 1,
            Sreg::LaneMaskGt => (u32::MAX as u64) & !((1u64 << (l + 1)) - 1),
            Sreg::LaneMaskGe => (u32::MAX as u64) & !((1u64 << l) - 1),
            Sreg::DynamicSmemSize => cfg.dynamic_smem as u64,
            Sreg::TotalSmemSize => self.l.smem_size as u64,
        }
    }

    #[inline(always)]
    fn wr(w: &mut Warp, d: u32, l: usize, v: u64) {
        w.regs[d as usize * 32 + l] = v;
    }

    /// Runs warp `wi` of block `b` for up to `budget` instructions.
    fn run_warp(&mut self, b: &mut Block, wi: usize, budget: u32) -> R<Stop> {
        // Take the warp out so the block's shared memory can be borrowed beside it.
        let mut w = std::mem::replace(&mut b.warps[wi], Warp::empty());
        let r = self.run_warp_inner(b, &mut w, budget);
        b.warps[wi] = w;
        r
    }

    /// Which lanes must execute `op` together (a warp-synchronous instruction), or None.
    /// `first` is a lane of the arriving group (member masks are read from it).
    fn sync_set(&self, b: &Block, w: &Warp, op: &Op, first: usize) -> Option<u32> {
        let active = w.live & !w.exited;
        match op {
            Op::Bar { .. } => Some(active),
            Op::MmaBf16 { .. } | Op::Ldmatrix { .. } => Some(w.live),
            Op::Shfl { mask, .. } | Op::Vote { mask, .. } | Op::BarWarp { mask } => Some(self.rd(b, w, *mask, first) as u32 & w.live),
            _ => None,
        }
    }

    /// Runs the warp for up to `budget` instructions. The lanes at the lowest PC step together;
    /// lanes that reach a warp-synchronous instruction (bar.sync, mma/ldmatrix .aligned,
    /// shfl/vote.sync, bar.warp.sync) wait there until every lane it needs has arrived, as
    /// threads do on sm_70 and later, so lanes whose paths the compiler laid out in any order
    /// meet again. Lanes that can never meet are a synccheck finding.
    fn run_warp_inner(&mut self, b: &mut Block, w: &mut Warp, budget: u32) -> R<Stop> {
        let insts = &self.l.k.body.insts;
        // Lanes waiting at a warp-synchronous instruction stay marked across slices, so lanes
        // that exit while others wait for them are seen whatever the slice boundaries.
        let mut waiting = w.waiting;
        // Fast path: while every runnable lane is at one PC (`conv`), the per-lane PCs are not
        // consulted; they are written back before any decision that reads them.
        let mut conv: Option<(u32, u32)> = None;
        macro_rules! sync_pcs {
            () => {
                if let Some((cpc, cg)) = conv.take() {
                    let mut g = cg;
                    while g != 0 {
                        let l = g.trailing_zeros() as usize;
                        g &= g - 1;
                        w.pc[l] = cpc;
                    }
                }
            };
        }
        for _ in 0..budget {
            let active = w.live & !w.exited;
            let (pc, group) = if let Some((cpc, cg)) = conv.filter(|&(_, cg)| waiting == 0 && cg == active && cg != 0) {
                (cpc, cg)
            } else {
                sync_pcs!();
                if active == 0 {
                    w.waiting = 0;
                    return Ok(Stop::Exited);
                }
                let runnable = active & !waiting;
                if runnable == 0 {
                    // Every lane waits at a warp-synchronous instruction, and not all at one.
                    let l = waiting.trailing_zeros() as usize;
                    let pc = w.pc[l];
                    let at = (0..32)
                        .filter(|&x| waiting >> x & 1 == 1 && w.pc[x] == pc)
                        .fold(0u32, |m, x| m | 1 << x);
                    let need = self.sync_set(b, w, &insts[pc as usize].op, l).unwrap_or(active);
                    let elsewhere = active & !at;
                    let msg = format!(
                        "lanes {at:#010x} wait at a warp-synchronous instruction that needs lanes {need:#010x}, but lanes {elsewhere:#010x} wait at another one: the warp can never reconverge there (divergent __syncthreads/__syncwarp/shfl/mma)"
                    );
                    return Err(self.fault(
                        FaultKind::LaunchFailed,
                        "synccheck",
                        &msg,
                        b,
                        w,
                        Some(elsewhere.trailing_zeros().min(31)),
                        pc,
                        "",
                    ));
                }
                // One pass over the runnable lanes: the lowest PC and who is there.
                let (mut pc, mut group) = (u32::MAX, 0u32);
                let mut m = runnable;
                while m != 0 {
                    let l = m.trailing_zeros() as usize;
                    m &= m - 1;
                    let p = w.pc[l];
                    if p < pc {
                        (pc, group) = (p, 1 << l);
                    } else if p == pc {
                        group |= 1 << l;
                    }
                }
                // Lanes already waiting there join them.
                let mut m = waiting;
                while m != 0 {
                    let l = m.trailing_zeros() as usize;
                    m &= m - 1;
                    if w.pc[l] == pc {
                        group |= 1 << l;
                    }
                }
                (pc, group)
            };
            let inst = &insts[pc as usize];
            if let Some(need) = self.sync_set(b, w, &inst.op, group.trailing_zeros() as usize) {
                if need & !active != 0 {
                    sync_pcs!();
                    let gone = need & !active;
                    let msg = format!("a warp-synchronous instruction needs lanes {need:#010x}, but lanes {gone:#010x} have exited");
                    return Err(self.fault(
                        FaultKind::LaunchFailed,
                        "synccheck",
                        &msg,
                        b,
                        w,
                        Some(group.trailing_zeros()),
                        pc,
                        "",
                    ));
                }
                if need & !group != 0 {
                    // Wait here for the others.
                    sync_pcs!();
                    waiting |= group;
                    continue;
                }
                waiting &= !group;
            }
            let mut exec = group;
            if let Some((p, neg)) = inst.guard {
                let mut m = 0u32;
                let mut g = group;
                while g != 0 {
                    let l = g.trailing_zeros() as usize;
                    g &= g - 1;
                    if (w.regs[p as usize * 32 + l] != 0) != neg {
                        m |= 1 << l;
                    }
                }
                exec = m;
            }
            if let Some(c) = self.counters.as_mut() {
                c.count(inst.class, exec.count_ones());
            }
            match &inst.op {
                Op::Bra { target, .. } => {
                    if exec == group || exec == 0 {
                        conv = Some((if exec == 0 { pc + 1 } else { *target }, group));
                        continue;
                    }
                    sync_pcs!();
                    let mut g = group;
                    while g != 0 {
                        let l = g.trailing_zeros() as usize;
                        g &= g - 1;
                        w.pc[l] = if exec >> l & 1 == 1 { *target } else { pc + 1 };
                    }
                    continue;
                }
                Op::Ret => {
                    conv = None;
                    let mut g = group;
                    while g != 0 {
                        let l = g.trailing_zeros() as usize;
                        g &= g - 1;
                        w.pc[l] = pc;
                    }
                    if exec != 0 && waiting != 0 {
                        // Lanes leave while others of the warp wait to meet them.
                        let l = waiting.trailing_zeros() as usize;
                        let wpc = w.pc[l];
                        if let Some(need) = self.sync_set(b, w, &insts[wpc as usize].op, l) {
                            if need & exec != 0 {
                                let msg = format!(
                                    "lanes {exec:#010x} exit while lanes {waiting:#010x} of their warp wait for them at a barrier or warp-synchronous instruction (PTX line {}): a __syncthreads()/__syncwarp() in divergent code",
                                    insts[wpc as usize].line
                                );
                                return Err(self.fault(
                                    FaultKind::LaunchFailed,
                                    "synccheck",
                                    &msg,
                                    b,
                                    w,
                                    Some(exec.trailing_zeros()),
                                    pc,
                                    "",
                                ));
                            }
                        }
                    }
                    w.exited |= exec;
                    let mut g = group & !exec;
                    while g != 0 {
                        let l = g.trailing_zeros() as usize;
                        g &= g - 1;
                        w.pc[l] += 1;
                    }
                    continue;
                }
                Op::Bar { .. } => {
                    if exec != 0 {
                        if exec != active {
                            sync_pcs!();
                            let missing = active & !exec;
                            let msg = format!(
                                "barrier executed by lanes {exec:#010x} while lanes {missing:#010x} of the warp are predicated off"
                            );
                            return Err(self.fault(
                                FaultKind::LaunchFailed,
                                "synccheck",
                                &msg,
                                b,
                                w,
                                Some(missing.trailing_zeros()),
                                pc,
                                "",
                            ));
                        }
                        // The PC advances when the barrier releases.
                        conv = Some((pc, group));
                        sync_pcs!();
                        w.at_bar = true;
                        w.waiting = 0;
                        if let Some(c) = self.counters.as_mut() {
                            c.barrier_arrivals += 1;
                        }
                        return Ok(Stop::Barrier);
                    }
                }
                op => {
                    if exec != 0 {
                        if let Err(e) = self.exec(b, w, op, exec, group, pc) {
                            conv = Some((pc, group));
                            sync_pcs!();
                            return Err(e);
                        }
                    }
                }
            }
            conv = Some((pc + 1, group));
        }
        sync_pcs!();
        w.waiting = waiting;
        Ok(Stop::Slice)
    }

    /// Resolves the address of lane `l`'s access in `space` to (space, address-or-offset).
    #[inline(always)]
    fn ea(&self, b: &Block, w: &Warp, a: &Addr, l: usize) -> u64 {
        let base = match a.base {
            Some(r) => w.regs[r as usize * 32 + l],
            None => 0,
        };
        let _ = b;
        base.wrapping_add(a.off as u64)
    }

    /// Maps a generic address to its space.
    fn generic(addr: u64) -> (Space, u64) {
        if (SHARED_WINDOW..SHARED_WINDOW + WINDOW_SIZE).contains(&addr) {
            (Space::Shared, addr - SHARED_WINDOW)
        } else if (LOCAL_WINDOW..LOCAL_WINDOW + WINDOW_SIZE).contains(&addr) {
            (Space::Local, addr - LOCAL_WINDOW)
        } else {
            (Space::Global, addr)
        }
    }

    /// memcheck for a global access of `len` bytes at `addr` by lane `l`.
    fn check_global(&self, b: &Block, w: &mut Warp, addr: u64, len: u64, align: u64, write: bool, l: usize, pc: u32) -> R<()> {
        if !addr.is_multiple_of(align) {
            let msg = format!("misaligned global {} of {len} bytes", if write { "write" } else { "read" });
            return Err(self.fault(
                FaultKind::MisalignedAddress,
                "memcheck",
                &msg,
                b,
                w,
                Some(l as u32),
                pc,
                &format!("address {addr:#x} is not {align}-byte aligned"),
            ));
        }
        let bit = if write { USE_WRITE } else { USE_READ };
        if addr >= w.cache.0 && addr + len <= w.cache.1 {
            if w.cache_uses & bit == 0 {
                w.cache_uses |= bit;
                self.l.uses[w.cache_idx].fetch_or(bit, Ordering::Relaxed);
            }
            return Ok(());
        }
        let allocs = &self.l.allocs;
        let i = allocs.partition_point(|a| a.base <= addr);
        if i > 0 {
            let a = &allocs[i - 1];
            if addr + len <= a.base + a.size && a.device == self.l.cfg.device {
                w.cache = (a.base, a.base + a.size);
                w.cache_idx = i - 1;
                w.cache_uses = bit;
                self.l.uses[i - 1].fetch_or(bit, Ordering::Relaxed);
                return Ok(());
            }
        }
        let near = if i > 0 {
            let a = &allocs[i - 1];
            format!(
                "; nearest allocation below: {:#x} of {} bytes (ends {} bytes before)",
                a.base,
                a.size,
                (addr as i128 - (a.base + a.size) as i128)
            )
        } else {
            String::new()
        };
        let msg = format!("invalid global {} of size {len}", if write { "write" } else { "read" });
        Err(self.fault(
            FaultKind::IllegalAddress,
            "memcheck",
            &msg,
            b,
            w,
            Some(l as u32),
            pc,
            &format!("address {addr:#x} is outside every live allocation{near}"),
        ))
    }

    fn check_shared(&self, b: &Block, w: &Warp, off: u64, len: u64, align: u64, write: bool, l: usize, pc: u32) -> R<()> {
        if !off.is_multiple_of(align) {
            let msg = format!("misaligned shared {} of {len} bytes", if write { "write" } else { "read" });
            return Err(self.fault(
                FaultKind::MisalignedAddress,
                "memcheck",
                &msg,
                b,
                w,
                Some(l as u32),
                pc,
                &format!("address {off:#x} (shared) is not {align}-byte aligned"),
            ));
        }
        if off + len > b.smem.len() as u64 {
            let msg = format!("invalid shared {} of size {len}", if write { "write" } else { "read" });
            let extra = format!(
                "address {off:#x} (shared) is past the block's {} bytes of shared memory",
                b.smem.len()
            );
            return Err(self.fault(FaultKind::IllegalAddress, "memcheck", &msg, b, w, Some(l as u32), pc, &extra));
        }
        Ok(())
    }

    fn shadow_report(&self, f: Finding, b: &Block, w: &Warp, l: usize, pc: u32) -> Fault {
        let (check, msg, extra) = f.describe(self, b);
        self.fault(FaultKind::LaunchFailed, check, &msg, b, w, Some(l as u32), pc, &extra)
    }

    /// Loads `len` bytes for lane `l` from `space` at `addr`.
    fn load(&mut self, b: &mut Block, w: &mut Warp, space: Space, addr: u64, len: u32, align: u32, l: usize, pc: u32) -> R<u128> {
        let (space, addr) = if space == Space::Generic {
            Self::generic(addr)
        } else {
            (space, addr)
        };
        let mut buf = [0u8; 16];
        let n = len as usize;
        match space {
            Space::Global | Space::Const => {
                self.check_global(b, w, addr, len as u64, align as u64, false, l, pc)?;
                // SAFETY: checked to lie inside a live allocation.
                unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), n) };
                if let Some(c) = self.counters.as_mut() {
                    c.gld_bytes += len as u64;
                }
            }
            Space::Shared => {
                self.check_shared(b, w, addr, len as u64, align as u64, false, l, pc)?;
                let tid = w.id * 32 + l as u32;
                if let Err(f) = b.shadow.read(addr as usize, n, tid) {
                    return Err(self.shadow_report(f, b, w, l, pc));
                }
                if let Some(off) = b.shadow.uninit.take() {
                    let f = self.shadow_report(Finding::Uninit { off }, b, w, l, pc);
                    self.l.soft(f);
                }
                buf[..n].copy_from_slice(&b.smem[addr as usize..addr as usize + n]);
            }
            Space::Local => {
                let lb = self.l.k.local_bytes as u64;
                if addr + len as u64 > lb {
                    let extra = format!("address {addr:#x} (local) is past the thread's {lb} bytes of local memory");
                    return Err(self.fault(
                        FaultKind::IllegalAddress,
                        "memcheck",
                        "invalid local read",
                        b,
                        w,
                        Some(l as u32),
                        pc,
                        &extra,
                    ));
                }
                let o = l * lb as usize + addr as usize;
                buf[..n].copy_from_slice(&w.local[o..o + n]);
            }
            Space::Param => {
                if addr + len as u64 > self.l.params.len() as u64 {
                    return Err(self.fault(
                        FaultKind::IllegalAddress,
                        "memcheck",
                        "parameter read past the parameter buffer",
                        b,
                        w,
                        Some(l as u32),
                        pc,
                        &format!("offset {addr}"),
                    ));
                }
                buf[..n].copy_from_slice(&self.l.params[addr as usize..addr as usize + n]);
            }
            Space::Generic => unreachable!(),
        }
        Ok(u128::from_le_bytes(buf))
    }

    fn store(&mut self, b: &mut Block, w: &mut Warp, space: Space, addr: u64, len: u32, align: u32, v: u128, l: usize, pc: u32) -> R<()> {
        let (space, addr) = if space == Space::Generic {
            Self::generic(addr)
        } else {
            (space, addr)
        };
        let bytes = v.to_le_bytes();
        let n = len as usize;
        match space {
            Space::Global => {
                self.check_global(b, w, addr, len as u64, align as u64, true, l, pc)?;
                // SAFETY: checked to lie inside a live allocation.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, n) };
                if let Some(c) = self.counters.as_mut() {
                    c.gst_bytes += len as u64;
                }
            }
            Space::Shared => {
                self.check_shared(b, w, addr, len as u64, align as u64, true, l, pc)?;
                let tid = w.id * 32 + l as u32;
                if let Err(f) = b.shadow.write(addr as usize, n, tid) {
                    return Err(self.shadow_report(f, b, w, l, pc));
                }
                b.smem[addr as usize..addr as usize + n].copy_from_slice(&bytes[..n]);
            }
            Space::Local => {
                let lb = self.l.k.local_bytes as u64;
                if addr + len as u64 > lb {
                    let extra = format!("address {addr:#x} (local) is past the thread's {lb} bytes of local memory");
                    return Err(self.fault(
                        FaultKind::IllegalAddress,
                        "memcheck",
                        "invalid local write",
                        b,
                        w,
                        Some(l as u32),
                        pc,
                        &extra,
                    ));
                }
                let o = l * lb as usize + addr as usize;
                w.local[o..o + n].copy_from_slice(&bytes[..n]);
            }
            Space::Param | Space::Const => {
                return Err(self.fault(
                    FaultKind::IllegalInstruction,
                    "memcheck",
                    "store to a read-only state space",
                    b,
                    w,
                    Some(l as u32),
                    pc,
                    "",
                ));
            }
            Space::Generic => unreachable!(),
        }
        Ok(())
    }

    /// Counts a warp-wide memory request for the counters: global sectors, shared wavefronts.
    fn count_request(&mut self, space: Space, addrs: &[(u64, u32)]) {
        let Some(c) = self.counters.as_mut() else { return };
        c.request(space, addrs);
    }

    /// A source operand for all 32 lanes (lanes outside `exec` hold whatever is there).
    #[inline(always)]
    fn gather(&self, b: &Block, w: &Warp, s: Src, exec: u32) -> [u64; 32] {
        match s {
            Src::R(r) => {
                let regs: &[u64; 32] = w.regs[r as usize * 32..][..32].try_into().expect("32 lanes");
                std::array::from_fn(|l| regs[l])
            }
            Src::NotR(r) => {
                let base = r as usize * 32;
                std::array::from_fn(|l| (w.regs[base + l] == 0) as u64)
            }
            Src::Imm(v) => [v; 32],
            Src::S(sr) => std::array::from_fn(|l| if exec >> l & 1 == 1 { self.sreg(b, w, sr, l) } else { 0 }),
        }
    }

    /// Writes `v` to register `d` of the lanes in `exec`.
    #[inline(always)]
    fn scatter(w: &mut Warp, d: u32, exec: u32, v: &[u64; 32]) {
        let base = d as usize * 32;
        let dst = &mut w.regs[base..base + 32];
        if exec == u32::MAX {
            dst.copy_from_slice(v);
        } else {
            for (l, x) in dst.iter_mut().enumerate() {
                if exec >> l & 1 == 1 {
                    *x = v[l];
                }
            }
        }
    }

    /// The register-to-register arithmetic, over whole warps (one operand fetch per operand
    /// instead of one per lane): the interpreter's hot path. False: not handled here.
    fn exec_warpwide(&self, b: &Block, w: &mut Warp, op: &Op, exec: u32) -> bool {
        let mut out = [0u64; 32];
        match op {
            Op::Mov { d, a, ty } => {
                let mask = if *ty == Ty::Pred { 1 } else { width_mask(ty.bytes()) };
                let x = self.gather(b, w, *a, exec);
                for l in 0..32 {
                    out[l] = x[l] & mask;
                }
                Self::scatter(w, *d, exec, &out);
            }
            Op::Int { op, ty, d, a, b: bb } => {
                let (x, y) = (self.gather(b, w, *a, exec), self.gather(b, w, *bb, exec));
                let ty = *ty;
                let nb = ty.bytes();
                let mask = width_mask(nb);
                match op {
                    IntBin::Add => (0..32).for_each(|l| out[l] = x[l].wrapping_add(y[l]) & mask),
                    IntBin::Sub => (0..32).for_each(|l| out[l] = x[l].wrapping_sub(y[l]) & mask),
                    IntBin::MulLo => (0..32).for_each(|l| out[l] = ty.extend(x[l]).wrapping_mul(ty.extend(y[l])) & mask),
                    IntBin::And => (0..32).for_each(|l| out[l] = x[l] & y[l] & mask),
                    IntBin::Or => (0..32).for_each(|l| out[l] = (x[l] | y[l]) & mask),
                    IntBin::Xor => (0..32).for_each(|l| out[l] = (x[l] ^ y[l]) & mask),
                    IntBin::Shl => (0..32).for_each(|l| {
                        let s = y[l] as u32;
                        out[l] = if s >= nb * 8 { 0 } else { (x[l] << s) & mask }
                    }),
                    IntBin::MulWide => {
                        let m2 = width_mask(nb * 2);
                        if ty.signed() {
                            (0..32).for_each(|l| out[l] = (ty.extend(x[l]) as i64).wrapping_mul(ty.extend(y[l]) as i64) as u64 & m2)
                        } else {
                            (0..32).for_each(|l| out[l] = (x[l] & mask).wrapping_mul(y[l] & mask) & m2)
                        }
                    }
                    _ => return false,
                }
                Self::scatter(w, *d, exec, &out);
            }
            Op::F {
                op,
                ty: Ty::F32,
                rnd: Rnd::Rn,
                ftz: false,
                sat: false,
                d,
                a,
                b: bb,
            } => {
                let (x, y) = (self.gather(b, w, *a, exec), self.gather(b, w, *bb, exec));
                let f = |l: usize| (fbits(x[l]), fbits(y[l]));
                match op {
                    FBin::Add => (0..32).for_each(|l| {
                        out[l] = {
                            let (p, q) = f(l);
                            (p + q).to_bits() as u64
                        }
                    }),
                    FBin::Sub => (0..32).for_each(|l| {
                        out[l] = {
                            let (p, q) = f(l);
                            (p - q).to_bits() as u64
                        }
                    }),
                    FBin::Mul => (0..32).for_each(|l| {
                        out[l] = {
                            let (p, q) = f(l);
                            (p * q).to_bits() as u64
                        }
                    }),
                    _ => return false,
                }
                Self::scatter(w, *d, exec, &out);
            }
            Op::Fma {
                ty: Ty::F32,
                rnd: Rnd::Rn,
                ftz: false,
                sat: false,
                d,
                a,
                b: bb,
                c,
            } => {
                let (x, y, z) = (
                    self.gather(b, w, *a, exec),
                    self.gather(b, w, *bb, exec),
                    self.gather(b, w, *c, exec),
                );
                for l in 0..32 {
                    out[l] = fbits(x[l]).mul_add(fbits(y[l]), fbits(z[l])).to_bits() as u64;
                }
                Self::scatter(w, *d, exec, &out);
            }
            Op::Setp {
                cmp,
                ty,
                p,
                q,
                a,
                b: bb,
                comb: None,
            } => {
                let (x, y) = (self.gather(b, w, *a, exec), self.gather(b, w, *bb, exec));
                let ty = *ty;
                for l in 0..32 {
                    out[l] = match ty {
                        Ty::F32 => cmp_f(*cmp, fbits(x[l]) as f64, fbits(y[l]) as f64),
                        Ty::F64 => cmp_f(*cmp, dbits(x[l]), dbits(y[l])),
                        _ if ty.signed() => cmp_i(*cmp, ty.extend(x[l]) as i64, ty.extend(y[l]) as i64),
                        _ => cmp_i(*cmp, ty.extend(x[l]), ty.extend(y[l])),
                    } as u64;
                }
                if let Some(p) = p {
                    Self::scatter(w, *p, exec, &out);
                }
                if let Some(q) = q {
                    let neg: [u64; 32] = std::array::from_fn(|l| out[l] ^ 1);
                    Self::scatter(w, *q, exec, &neg);
                }
            }
            Op::Selp { ty, d, a, b: bb, c } => {
                let mask = width_mask(ty.bytes());
                let (x, y, z) = (
                    self.gather(b, w, *a, exec),
                    self.gather(b, w, *bb, exec),
                    self.gather(b, w, *c, exec),
                );
                for l in 0..32 {
                    out[l] = if z[l] != 0 { x[l] } else { y[l] } & mask;
                }
                Self::scatter(w, *d, exec, &out);
            }
            Op::Ld {
                space: Space::Param,
                ty,
                d,
                addr: Addr { base: None, off },
            } if d.len() == 1 && ty.bytes() <= 8 => {
                // A kernel parameter at a constant offset: the same value for every lane.
                let n = ty.bytes() as usize;
                let (Some(di), Ok(o)) = (d[0], usize::try_from(*off)) else {
                    return false;
                };
                let Some(bytes) = self.l.params.get(o..o + n) else { return false };
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(bytes);
                let v = ty.extend(u64::from_le_bytes(buf)) & if ty.signed() { u64::MAX } else { width_mask(n as u32) };
                Self::scatter(w, di, exec, &[v; 32]);
            }
            Op::Cvt {
                dt,
                st,
                rnd,
                rint,
                ftz,
                sat,
                d,
                a,
            } => {
                if cvt(*dt, *st, *rnd, *rint, *ftz, *sat, 0).is_none() {
                    return false;
                }
                let x = self.gather(b, w, *a, exec);
                for l in 0..32 {
                    out[l] = cvt(*dt, *st, *rnd, *rint, *ftz, *sat, x[l]).unwrap_or(0);
                }
                Self::scatter(w, *d, exec, &out);
            }
            _ => return false,
        }
        true
    }

    fn exec(&mut self, b: &mut Block, w: &mut Warp, op: &Op, exec: u32, group: u32, pc: u32) -> R<()> {
        if self.exec_warpwide(b, w, op, exec) {
            return Ok(());
        }
        macro_rules! lanes {
            (|$l:ident| $body:expr) => {{
                let mut m = exec;
                while m != 0 {
                    let $l = m.trailing_zeros() as usize;
                    m &= m - 1;
                    $body;
                }
            }};
        }
        match op {
            Op::Unpack { d, a, bits } => lanes!(|l| {
                let v = self.rd(b, w, *a, l);
                for (i, di) in d.iter().enumerate() {
                    if let Some(di) = di {
                        Self::wr(w, *di, l, (v >> (i as u32 * bits)) & width_mask(bits / 8));
                    }
                }
            }),
            Op::Pack { d, a, bits } => lanes!(|l| {
                let mut v = 0u64;
                for (i, ai) in a.iter().enumerate() {
                    v |= (self.rd(b, w, *ai, l) & width_mask(bits / 8)) << (i as u32 * bits);
                }
                Self::wr(w, *d, l, v)
            }),
            Op::Int { op, ty, d, a, b: bb } => {
                let ty = *ty;
                let nb = ty.bytes();
                let bits = nb * 8;
                let mask = width_mask(nb);
                let signed = ty.signed();
                lanes!(|l| {
                    let x = ty.extend(self.rd(b, w, *a, l));
                    let y = self.rd(b, w, *bb, l);
                    let v = match op {
                        IntBin::Add => x.wrapping_add(ty.extend(y)),
                        IntBin::Sub => x.wrapping_sub(ty.extend(y)),
                        IntBin::MulLo => x.wrapping_mul(ty.extend(y)),
                        IntBin::MulWide => {
                            let y = ty.extend(y);
                            let p = if signed {
                                (x as i64).wrapping_mul(y as i64) as u64
                            } else {
                                x.wrapping_mul(y)
                            };
                            Self::wr(w, *d, l, p & width_mask(nb * 2));
                            continue;
                        }
                        IntBin::MulHi => {
                            let y = ty.extend(y);
                            if signed {
                                (((x as i64 as i128) * (y as i64 as i128)) >> bits) as u64
                            } else {
                                (((x as u128) * (y as u128)) >> bits) as u64
                            }
                        }
                        IntBin::Div | IntBin::Rem => {
                            let y = ty.extend(y);
                            let div = *op == IntBin::Div;
                            if y & mask == 0 {
                                if div {
                                    mask
                                } else {
                                    x
                                }
                            } else if signed {
                                let (xi, yi) = (x as i64, y as i64);
                                (if div { xi.wrapping_div(yi) } else { xi.wrapping_rem(yi) }) as u64
                            } else if div {
                                x / y
                            } else {
                                x % y
                            }
                        }
                        IntBin::Min | IntBin::Max => {
                            let y = ty.extend(y);
                            let less = if signed { (x as i64) < (y as i64) } else { x < y };
                            if less == (*op == IntBin::Min) {
                                x
                            } else {
                                y
                            }
                        }
                        IntBin::And => x & y,
                        IntBin::Or => x | y,
                        IntBin::Xor => x ^ y,
                        IntBin::Shl => {
                            let s = y as u32;
                            if s >= bits {
                                0
                            } else {
                                x << s
                            }
                        }
                        IntBin::Shr => {
                            let s = (y as u32).min(bits);
                            if signed {
                                ((x as i64) >> s.min(63)) as u64
                            } else if s >= bits {
                                0
                            } else {
                                (x & mask) >> s
                            }
                        }
                    };
                    Self::wr(w, *d, l, v & mask)
                })
            }
            Op::Mad {
                hi,
                wide,
                ty,
                d,
                a,
                b: bb,
                c,
            } => {
                let ty = *ty;
                let nb = ty.bytes();
                let signed = ty.signed();
                lanes!(|l| {
                    let x = ty.extend(self.rd(b, w, *a, l));
                    let y = ty.extend(self.rd(b, w, *bb, l));
                    let z = self.rd(b, w, *c, l);
                    let v = if *wide {
                        let p = if signed {
                            (x as i64).wrapping_mul(y as i64) as u64
                        } else {
                            x.wrapping_mul(y)
                        };
                        p.wrapping_add(z) & width_mask(nb * 2)
                    } else if *hi {
                        let h = if signed {
                            (((x as i64 as i128) * (y as i64 as i128)) >> (nb * 8)) as u64
                        } else {
                            (((x as u128) * (y as u128)) >> (nb * 8)) as u64
                        };
                        h.wrapping_add(z) & width_mask(nb)
                    } else {
                        x.wrapping_mul(y).wrapping_add(z) & width_mask(nb)
                    };
                    Self::wr(w, *d, l, v)
                })
            }
            Op::IntUn { op, ty, d, a } => {
                let ty = *ty;
                let nb = ty.bytes();
                let mask = width_mask(nb);
                lanes!(|l| {
                    let x = ty.extend(self.rd(b, w, *a, l));
                    let v = match *op {
                        "neg" => x.wrapping_neg() & mask,
                        "not" => !x & mask,
                        "abs" => ((x as i64).wrapping_abs() as u64) & mask,
                        "popc" => (x & mask).count_ones() as u64,
                        "clz" => ((x & mask).leading_zeros() - (64 - nb * 8)) as u64,
                        "brev" => ((x & mask).reverse_bits() >> (64 - nb * 8)) & mask,
                        _ => unreachable!(),
                    };
                    Self::wr(w, *d, l, v)
                })
            }
            Op::Bfi { ty, d, a, b: bb, pos, len } => {
                let bits = ty.bytes() * 8;
                lanes!(|l| {
                    let x = self.rd(b, w, *a, l);
                    let mut f = self.rd(b, w, *bb, l) & width_mask(bits / 8);
                    let p = self.rd(b, w, *pos, l) as u32 & 0xff;
                    let n = self.rd(b, w, *len, l) as u32 & 0xff;
                    for i in 0..n {
                        if p + i >= bits {
                            break;
                        }
                        f = (f & !(1 << (p + i))) | (((x >> i) & 1) << (p + i));
                    }
                    Self::wr(w, *d, l, f)
                })
            }
            Op::Bfe { ty, d, a, pos, len } => {
                let ty = *ty;
                let bits = ty.bytes() * 8;
                lanes!(|l| {
                    let x = self.rd(b, w, *a, l) & width_mask(bits / 8);
                    let p = self.rd(b, w, *pos, l) as u32 & 0xff;
                    let n = self.rd(b, w, *len, l) as u32 & 0xff;
                    let msb = bits - 1;
                    let sbit = if ty.signed() && n > 0 { (x >> (p + n - 1).min(msb)) & 1 } else { 0 };
                    let mut v = 0u64;
                    for i in 0..bits {
                        let bit = if i < n && p + i <= msb { (x >> (p + i)) & 1 } else { sbit };
                        v |= bit << i;
                    }
                    Self::wr(w, *d, l, v)
                })
            }
            Op::F {
                op,
                ty,
                rnd,
                ftz,
                sat,
                d,
                a,
                b: bb,
            } => {
                if *ty == Ty::F64 {
                    lanes!(|l| {
                        let x = dbits(self.rd(b, w, *a, l));
                        let y = dbits(self.rd(b, w, *bb, l));
                        let v = match op {
                            FBin::Add => x + y,
                            FBin::Sub => x - y,
                            FBin::Mul => x * y,
                            FBin::Div => x / y,
                            FBin::Min => dmin(x, y),
                            FBin::Max => dmax(x, y),
                            FBin::Copysign => y.copysign(x),
                        };
                        Self::wr(w, *d, l, v.to_bits())
                    })
                } else {
                    lanes!(|l| {
                        let mut x = fbits(self.rd(b, w, *a, l));
                        let mut y = fbits(self.rd(b, w, *bb, l));
                        if *ftz {
                            x = ftz32(x);
                            y = ftz32(y);
                        }
                        let mut v = match op {
                            FBin::Add | FBin::Sub => {
                                let y = if *op == FBin::Sub { -y } else { y };
                                if *rnd == Rnd::Rn {
                                    x + y
                                } else {
                                    let (h, lo) = two_sum(x as f64, y as f64);
                                    round_f32(h, lo, *rnd)
                                }
                            }
                            FBin::Mul => {
                                if *rnd == Rnd::Rn {
                                    x * y
                                } else {
                                    round_f32(x as f64 * y as f64, 0.0, *rnd)
                                }
                            }
                            FBin::Div => x / y,
                            FBin::Min => fmin(x, y),
                            FBin::Max => fmax(x, y),
                            FBin::Copysign => y.copysign(x),
                        };
                        if *ftz {
                            v = ftz32(v);
                        }
                        if *sat {
                            v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
                        }
                        Self::wr(w, *d, l, v.to_bits() as u64)
                    })
                }
            }
            Op::Fma {
                ty,
                rnd,
                ftz,
                sat,
                d,
                a,
                b: bb,
                c,
            } => {
                if *ty == Ty::F64 {
                    lanes!(|l| {
                        let x = dbits(self.rd(b, w, *a, l));
                        let y = dbits(self.rd(b, w, *bb, l));
                        let z = dbits(self.rd(b, w, *c, l));
                        Self::wr(w, *d, l, x.mul_add(y, z).to_bits())
                    })
                } else {
                    lanes!(|l| {
                        let mut x = fbits(self.rd(b, w, *a, l));
                        let mut y = fbits(self.rd(b, w, *bb, l));
                        let mut z = fbits(self.rd(b, w, *c, l));
                        if *ftz {
                            x = ftz32(x);
                            y = ftz32(y);
                            z = ftz32(z);
                        }
                        let mut v = if *rnd == Rnd::Rn {
                            x.mul_add(y, z)
                        } else {
                            let (h, lo) = two_sum(x as f64 * y as f64, z as f64);
                            round_f32(h, lo, *rnd)
                        };
                        if *ftz {
                            v = ftz32(v);
                        }
                        if *sat {
                            v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
                        }
                        Self::wr(w, *d, l, v.to_bits() as u64)
                    })
                }
            }
            Op::FUnary { op, ty, ftz, d, a, .. } => {
                if *ty == Ty::F64 {
                    lanes!(|l| {
                        let x = dbits(self.rd(b, w, *a, l));
                        let v = match op {
                            FUn::Neg => -x,
                            FUn::Abs => x.abs(),
                            FUn::Rcp => 1.0 / x,
                            FUn::Sqrt => x.sqrt(),
                            FUn::Rsqrt => 1.0 / x.sqrt(),
                            FUn::Ex2 => x.exp2(),
                            FUn::Lg2 => x.log2(),
                            FUn::Sin => x.sin(),
                            FUn::Cos => x.cos(),
                            FUn::Tanh => x.tanh(),
                        };
                        Self::wr(w, *d, l, v.to_bits())
                    })
                } else {
                    lanes!(|l| {
                        let mut x = fbits(self.rd(b, w, *a, l));
                        if *ftz {
                            x = ftz32(x);
                        }
                        let mut v = match op {
                            FUn::Neg => -x,
                            FUn::Abs => x.abs(),
                            FUn::Rcp => 1.0 / x,
                            FUn::Sqrt => x.sqrt(),
                            FUn::Rsqrt => 1.0 / x.sqrt(),
                            FUn::Ex2 => x.exp2(),
                            FUn::Lg2 => x.log2(),
                            FUn::Sin => x.sin(),
                            FUn::Cos => x.cos(),
                            FUn::Tanh => x.tanh(),
                        };
                        if *ftz {
                            v = ftz32(v);
                        }
                        Self::wr(w, *d, l, v.to_bits() as u64)
                    })
                }
            }
            Op::Setp {
                cmp,
                ty,
                p,
                q,
                a,
                b: bb,
                comb,
            } => {
                let ty = *ty;
                lanes!(|l| {
                    let x = self.rd(b, w, *a, l);
                    let y = self.rd(b, w, *bb, l);
                    let r = match ty {
                        Ty::F32 => cmp_f(*cmp, fbits(x) as f64, fbits(y) as f64),
                        Ty::F64 => cmp_f(*cmp, dbits(x), dbits(y)),
                        _ if ty.signed() => cmp_i(*cmp, ty.extend(x) as i64, ty.extend(y) as i64),
                        _ => cmp_i(*cmp, ty.extend(x), ty.extend(y)),
                    };
                    let (r, rn) = match comb {
                        Some((op, c)) => {
                            let cv = self.rd(b, w, *c, l) != 0;
                            let f = |v: bool| match op {
                                BoolOp::And => v && cv,
                                BoolOp::Or => v || cv,
                                BoolOp::Xor => v ^ cv,
                            };
                            (f(r), f(!r))
                        }
                        None => (r, !r),
                    };
                    if let Some(p) = p {
                        Self::wr(w, *p, l, r as u64);
                    }
                    if let Some(q) = q {
                        Self::wr(w, *q, l, rn as u64);
                    }
                })
            }
            Op::PredOp { op, d, a, b: bb } => lanes!(|l| {
                let x = self.rd(b, w, *a, l) != 0;
                let v = match (op, bb) {
                    (None, _) => !x,
                    (Some(o), Some(bb)) => {
                        let y = self.rd(b, w, *bb, l) != 0;
                        match o {
                            BoolOp::And => x && y,
                            BoolOp::Or => x || y,
                            BoolOp::Xor => x ^ y,
                        }
                    }
                    (Some(_), None) => unreachable!(),
                };
                Self::wr(w, *d, l, v as u64)
            }),
            Op::Cvt {
                dt,
                st,
                rnd,
                rint,
                ftz,
                sat,
                d,
                a,
            } => {
                let (dt, st) = (*dt, *st);
                lanes!(|l| {
                    let x = self.rd(b, w, *a, l);
                    let v = cvt(dt, st, *rnd, *rint, *ftz, *sat, x);
                    match v {
                        Some(v) => Self::wr(w, *d, l, v),
                        None => {
                            let msg = format!("cvt.{dt:?}.{st:?} with these modifiers is not implemented");
                            return Err(self.fault(
                                FaultKind::LaunchFailed,
                                "unsupported instruction",
                                &msg,
                                b,
                                w,
                                Some(l as u32),
                                pc,
                                "",
                            ));
                        }
                    }
                })
            }
            Op::CvtPack { d, a, b: bb, relu } => lanes!(|l| {
                let mut x = fbits(self.rd(b, w, *a, l));
                let mut y = fbits(self.rd(b, w, *bb, l));
                if *relu {
                    x = if x.is_nan() { x } else { x.max(0.0) };
                    y = if y.is_nan() { y } else { y.max(0.0) };
                }
                let v = ((f32_to_bf16(x) as u64) << 16) | f32_to_bf16(y) as u64;
                Self::wr(w, *d, l, v)
            }),
            Op::Cvta { to, space, d, a } => lanes!(|l| {
                let x = self.rd(b, w, *a, l);
                let base = match space {
                    Space::Shared => SHARED_WINDOW,
                    Space::Local => LOCAL_WINDOW,
                    _ => 0,
                };
                let v = if *to {
                    x.wrapping_sub(base) & if base != 0 { WINDOW_SIZE - 1 } else { u64::MAX }
                } else {
                    x.wrapping_add(base)
                };
                Self::wr(w, *d, l, v)
            }),
            Op::Ld { space, ty, d, addr } => {
                let es = ty.bytes();
                let n = d.len() as u32;
                let total = es * n;
                let mut reqs = [(0u64, 0u32); 32];
                let mut nreq = 0;
                let mut m = exec;
                while m != 0 {
                    let l = m.trailing_zeros() as usize;
                    m &= m - 1;
                    let ea = self.ea(b, w, addr, l);
                    let v = self.load(b, w, *space, ea, total, total, l, pc)?;
                    for (i, di) in d.iter().enumerate() {
                        if let Some(di) = di {
                            let e = (v >> (i as u32 * es * 8)) as u64 & width_mask(es);
                            Self::wr(
                                w,
                                *di,
                                l,
                                ty.extend(e) & if es < 8 && !ty.signed() { width_mask(es) } else { u64::MAX },
                            );
                        }
                    }
                    reqs[nreq] = (ea, total);
                    nreq += 1;
                }
                if self.counters.is_some() {
                    let sp = if *space == Space::Generic {
                        Self::generic(reqs[0].0).0
                    } else {
                        *space
                    };
                    self.count_request(sp, &reqs[..nreq]);
                }
            }
            Op::St { space, ty, addr, a } => {
                let es = ty.bytes();
                let n = a.len() as u32;
                let total = es * n;
                let mut reqs = [(0u64, 0u32); 32];
                let mut nreq = 0;
                let mut m = exec;
                while m != 0 {
                    let l = m.trailing_zeros() as usize;
                    m &= m - 1;
                    let ea = self.ea(b, w, addr, l);
                    let mut v = 0u128;
                    for (i, ai) in a.iter().enumerate() {
                        v |= ((self.rd(b, w, *ai, l) & width_mask(es)) as u128) << (i as u32 * es * 8);
                    }
                    self.store(b, w, *space, ea, total, total, v, l, pc)?;
                    reqs[nreq] = (ea, total);
                    nreq += 1;
                }
                if self.counters.is_some() {
                    let sp = if *space == Space::Generic {
                        Self::generic(reqs[0].0).0
                    } else {
                        *space
                    };
                    self.count_request(sp, &reqs[..nreq]);
                }
            }
            Op::Atom {
                space,
                op,
                ty,
                d,
                addr,
                a,
                b: cmpv,
            } => {
                let es = ty.bytes();
                lanes!(|l| {
                    let ea = self.ea(b, w, addr, l);
                    for (i, ai) in a.iter().enumerate() {
                        let x = self.rd(b, w, *ai, l);
                        let c = cmpv.map(|s| self.rd(b, w, s, l));
                        let el = ea + (i as u32 * es) as u64;
                        // A vector atomic's address is aligned to the whole vector.
                        let align = if i == 0 { a.len() as u32 * es } else { es };
                        let old = self.atomic(b, w, *space, *op, *ty, el, x, c, es, align, l, pc)?;
                        if let Some(Some(di)) = d.get(i) {
                            Self::wr(w, *di, l, old);
                        }
                    }
                })
            }
            Op::BarWarp { mask } => {
                let m = self.rd(b, w, *mask, exec.trailing_zeros() as usize) as u32 & w.live;
                if m & !group != 0 || exec & !m != 0 {
                    let msg = format!("__syncwarp({m:#010x}) executed by lanes {exec:#010x}: every lane of the mask must reach it together, and only they");
                    return Err(self.fault(
                        FaultKind::LaunchFailed,
                        "synccheck",
                        &msg,
                        b,
                        w,
                        Some((m & !group).trailing_zeros().min(31)),
                        pc,
                        "",
                    ));
                }
                b.shadow.warp_barrier(w.id);
            }
            Op::Membar | Op::Nop => {}
            Op::Shfl {
                mode,
                d,
                p,
                a,
                b: bb,
                c,
                mask,
            } => {
                let mut vals = [0u64; 32];
                for (l, v) in vals.iter_mut().enumerate() {
                    if group >> l & 1 == 1 {
                        *v = self.rd(b, w, *a, l);
                    }
                }
                let mut m = exec;
                while m != 0 {
                    let l = m.trailing_zeros() as usize;
                    m &= m - 1;
                    let mk = self.rd(b, w, *mask, l) as u32;
                    if mk & !exec != 0 || mk >> l & 1 == 0 {
                        let msg = format!("shfl.sync with member mask {mk:#010x} executed by lanes {exec:#010x}: every lane of the mask must execute it together, including this one");
                        return Err(self.fault(FaultKind::LaunchFailed, "synccheck", &msg, b, w, Some(l as u32), pc, ""));
                    }
                    let bv = self.rd(b, w, *bb, l) as u32 & 0x1f;
                    let cv = self.rd(b, w, *c, l) as u32;
                    let seg = (cv >> 8) & 0x1f;
                    let clamp = cv & 0x1f;
                    let lane = l as i32;
                    let max_lane = ((l as u32 & seg) | (clamp & !seg)) as i32;
                    let min_lane = (l as u32 & seg) as i32;
                    let (mut j, ok) = match mode {
                        ShflMode::Up => {
                            let j = lane - bv as i32;
                            (j, j >= max_lane)
                        }
                        ShflMode::Down => {
                            let j = lane + bv as i32;
                            (j, j <= max_lane)
                        }
                        ShflMode::Bfly => {
                            let j = lane ^ bv as i32;
                            (j, j <= max_lane)
                        }
                        ShflMode::Idx => {
                            let j = min_lane | (bv & !seg) as i32;
                            (j, j <= max_lane)
                        }
                    };
                    if !ok {
                        j = lane;
                    }
                    if exec >> j & 1 == 0 {
                        let msg = format!("shfl.sync reads lane {j}, which is not executing it (lanes {exec:#010x})");
                        return Err(self.fault(FaultKind::LaunchFailed, "synccheck", &msg, b, w, Some(l as u32), pc, ""));
                    }
                    Self::wr(w, *d, l, vals[j as usize] & 0xFFFF_FFFF);
                    if let Some(p) = p {
                        Self::wr(w, *p, l, ok as u64);
                    }
                }
            }
            Op::Vote { mode, d, a, mask } => {
                let mut ballot = 0u32;
                lanes!(|l| {
                    if self.rd(b, w, *a, l) != 0 {
                        ballot |= 1 << l;
                    }
                });
                lanes!(|l| {
                    let mk = self.rd(b, w, *mask, l) as u32;
                    if mk & !exec != 0 {
                        let msg = format!("vote.sync with member mask {mk:#010x} executed by lanes {exec:#010x}");
                        return Err(self.fault(FaultKind::LaunchFailed, "synccheck", &msg, b, w, Some(l as u32), pc, ""));
                    }
                    let bal = ballot & mk;
                    let v = match mode {
                        VoteMode::Ballot => bal as u64,
                        VoteMode::All => (bal == mk) as u64,
                        VoteMode::Any => (bal != 0) as u64,
                        VoteMode::Uni => (bal == 0 || bal == mk) as u64,
                    };
                    Self::wr(w, *d, l, v)
                });
            }
            Op::MmaBf16 { d, a, b: bb, c } => {
                self.need_full_warp(b, w, exec, group, pc, "mma.sync.aligned")?;
                let (mut fa, mut fb, mut fc) = ([[0u32; 4]; 32], [[0u32; 2]; 32], [[0u32; 4]; 32]);
                for l in 0..32 {
                    for i in 0..4 {
                        fa[l][i] = self.rd(b, w, a[i], l) as u32;
                        fc[l][i] = self.rd(b, w, c[i], l) as u32;
                    }
                    for i in 0..2 {
                        fb[l][i] = self.rd(b, w, bb[i], l) as u32;
                    }
                }
                let out = super::tensor::mma_bf16(&fa, &fb, &fc);
                for (l, o) in out.iter().enumerate() {
                    for i in 0..4 {
                        if let Some(di) = d[i] {
                            Self::wr(w, di, l, o[i] as u64);
                        }
                    }
                }
                if let Some(cn) = self.counters.as_mut() {
                    cn.mma += 1;
                }
            }
            Op::Ldmatrix {
                num,
                trans,
                d,
                addr,
                space,
            } => {
                self.need_full_warp(b, w, exec, group, pc, "ldmatrix.sync.aligned")?;
                // Rows: lane 8i + r gives the address of row r of matrix i (16 bytes each).
                let mut rows = [[0u16; 8]; 32];
                let mut reqs = [(0u64, 16u32); 32];
                for (l, row) in rows.iter_mut().enumerate().take(*num as usize * 8) {
                    let ea = self.ea(b, w, addr, l);
                    let (sp, off) = if *space == Space::Generic {
                        Self::generic(ea)
                    } else {
                        (Space::Shared, ea)
                    };
                    if sp != Space::Shared {
                        return Err(self.fault(
                            FaultKind::IllegalAddress,
                            "memcheck",
                            "ldmatrix from a generic address outside shared memory",
                            b,
                            w,
                            Some(l as u32),
                            pc,
                            &format!("address {ea:#x}"),
                        ));
                    }
                    self.check_shared(b, w, off, 16, 16, false, l, pc)?;
                    let tid = w.id * 32 + l as u32;
                    if let Err(f) = b.shadow.read_collective(off as usize, 16, tid) {
                        return Err(self.shadow_report(f, b, w, l, pc));
                    }
                    if let Some(uoff) = b.shadow.uninit.take() {
                        let f = self.shadow_report(Finding::Uninit { off: uoff }, b, w, l, pc);
                        self.l.soft(f);
                    }
                    let mut bytes = [0u8; 16];
                    bytes.copy_from_slice(&b.smem[off as usize..off as usize + 16]);
                    let v = u128::from_le_bytes(bytes);
                    for (e, x) in row.iter_mut().enumerate() {
                        *x = (v >> (16 * e)) as u16;
                    }
                    reqs[l] = (off, 16);
                }
                let out = super::tensor::ldmatrix(&rows, *num, *trans);
                for (l, o) in out.iter().enumerate() {
                    for (i, di) in d.iter().enumerate() {
                        if let Some(di) = di {
                            Self::wr(w, *di, l, o[i] as u64);
                        }
                    }
                }
                if self.counters.is_some() {
                    self.count_request(Space::Shared, &reqs[..*num as usize * 8]);
                }
            }
            Op::CpAsync { size, dst, src, src_size } => lanes!(|l| {
                let de = self.ea(b, w, dst, l);
                let se = self.ea(b, w, src, l);
                let n = *size;
                let rs = match src_size {
                    Some(s) => self.rd(b, w, *s, l) as u32,
                    None => n,
                };
                if rs > n {
                    let msg = format!("cp.async src-size {rs} exceeds the copy size {n}");
                    return Err(self.fault(FaultKind::IllegalInstruction, "memcheck", &msg, b, w, Some(l as u32), pc, ""));
                }
                let (sp, soff) = Self::generic(se);
                if sp != Space::Global {
                    return Err(self.fault(
                        FaultKind::IllegalAddress,
                        "memcheck",
                        "cp.async source is not a global address",
                        b,
                        w,
                        Some(l as u32),
                        pc,
                        &format!("address {se:#x}"),
                    ));
                }
                // The source must be aligned to the copy size even when src-size is 0.
                if !se.is_multiple_of(n as u64) {
                    return Err(self.fault(
                        FaultKind::MisalignedAddress,
                        "memcheck",
                        &format!("misaligned cp.async global read of {n} bytes"),
                        b,
                        w,
                        Some(l as u32),
                        pc,
                        &format!("address {se:#x} is not {n}-byte aligned"),
                    ));
                }
                let mut data = [0u8; 16];
                if rs > 0 {
                    self.check_global(b, w, soff, rs as u64, 1, false, l, pc)?;
                    // SAFETY: checked inside a live allocation.
                    unsafe { std::ptr::copy_nonoverlapping(soff as *const u8, data.as_mut_ptr(), rs as usize) };
                }
                self.check_shared(b, w, de, n as u64, n as u64, true, l, pc)?;
                b.shadow.issue_async(de as usize, n as usize);
                w.copies.push(Copy {
                    lane: l as u8,
                    group: u32::MAX,
                    dst: de as u32,
                    len: n as u8,
                    data,
                    line: pc,
                });
                if let Some(c) = self.counters.as_mut() {
                    c.gld_bytes += rs as u64;
                    c.cp_async_bytes += n as u64;
                }
            }),
            Op::CpAsyncCommit => lanes!(|l| {
                let g = w.committed[l];
                for cp in w.copies.iter_mut().filter(|c| c.lane as usize == l && c.group == u32::MAX) {
                    cp.group = g;
                }
                w.committed[l] += 1;
            }),
            Op::CpAsyncWait { n, all } => lanes!(|l| {
                if *all {
                    let g = w.committed[l];
                    for cp in w.copies.iter_mut().filter(|c| c.lane as usize == l && c.group == u32::MAX) {
                        cp.group = g;
                    }
                    w.committed[l] += 1;
                }
                // Groups below `committed - n` complete now.
                let limit = w.committed[l].saturating_sub(*n);
                let mut i = 0;
                while i < w.copies.len() {
                    let cp = &w.copies[i];
                    if cp.lane as usize == l && cp.group != u32::MAX && cp.group < limit {
                        let cp = w.copies.swap_remove(i);
                        let tid = w.id * 32 + l as u32;
                        if let Err(f) = b.shadow.land_async(cp.dst as usize, cp.len as usize, tid) {
                            let issued = self.l.k.body.insts[cp.line as usize].line;
                            let mut fault = self.shadow_report(f, b, w, l, pc);
                            fault
                                .report
                                .push_str(&format!("=========     (the cp.async was issued at PTX line {issued})\n"));
                            return Err(fault);
                        }
                        b.smem[cp.dst as usize..cp.dst as usize + cp.len as usize].copy_from_slice(&cp.data[..cp.len as usize]);
                    } else {
                        i += 1;
                    }
                }
            }),
            Op::Unsupported(t) => {
                let msg = format!("instruction `{t}` is not implemented by the virtual device");
                return Err(self.fault(FaultKind::LaunchFailed, "unsupported instruction", &msg, b, w, None, pc, ""));
            }
            // Branches, exits and barriers are the scheduler's; moves and selects always take
            // the warp-wide path.
            Op::Bra { .. } | Op::Ret | Op::Bar { .. } | Op::Mov { .. } | Op::Selp { .. } => unreachable!(),
        }
        Ok(())
    }

    fn need_full_warp(&self, b: &Block, w: &Warp, exec: u32, group: u32, pc: u32, what: &str) -> R<()> {
        let _ = group;
        if exec != u32::MAX {
            let missing = !exec;
            let msg = format!("{what} executed by lanes {exec:#010x} only: every lane of the warp must execute it together (lanes {missing:#010x} are exited, diverged or predicated off)");
            return Err(self.fault(
                FaultKind::IllegalInstruction,
                "synccheck",
                &msg,
                b,
                w,
                Some(missing.trailing_zeros()),
                pc,
                "",
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn atomic(
        &mut self,
        b: &mut Block,
        w: &mut Warp,
        space: Space,
        op: AtomOp,
        ty: Ty,
        addr: u64,
        x: u64,
        c: Option<u64>,
        es: u32,
        align: u32,
        l: usize,
        pc: u32,
    ) -> R<u64> {
        let (space, addr) = if space == Space::Generic {
            Self::generic(addr)
        } else {
            (space, addr)
        };
        let apply = |old: u64| -> u64 {
            match ty {
                Ty::F32 => match op {
                    AtomOp::Add => (fbits(old) + fbits(x)).to_bits() as u64,
                    _ => x,
                },
                Ty::F64 => match op {
                    AtomOp::Add => (dbits(old) + dbits(x)).to_bits(),
                    _ => x,
                },
                _ => {
                    let m = width_mask(es);
                    let (o, v) = (ty.extend(old), ty.extend(x));
                    let s = ty.signed();
                    (match op {
                        AtomOp::Add => o.wrapping_add(v),
                        AtomOp::Min => {
                            if (s && (o as i64) < (v as i64)) || (!s && o < v) {
                                o
                            } else {
                                v
                            }
                        }
                        AtomOp::Max => {
                            if (s && (o as i64) > (v as i64)) || (!s && o > v) {
                                o
                            } else {
                                v
                            }
                        }
                        AtomOp::Exch => v,
                        AtomOp::Cas => {
                            if o & m == c.unwrap_or(0) & m {
                                v
                            } else {
                                o
                            }
                        }
                        AtomOp::And => o & v,
                        AtomOp::Or => o | v,
                        AtomOp::Xor => o ^ v,
                        AtomOp::Inc => {
                            if o & m >= v & m {
                                0
                            } else {
                                o + 1
                            }
                        }
                        AtomOp::Dec => {
                            if o & m == 0 || o & m > v & m {
                                v
                            } else {
                                o - 1
                            }
                        }
                    }) & m
                }
            }
        };
        match space {
            Space::Global => {
                self.check_global(b, w, addr, es as u64, (align.min(16)).max(es) as u64, true, l, pc)?;
                if let Some(cn) = self.counters.as_mut() {
                    cn.atomics += 1;
                }
                // SAFETY: checked inside a live allocation and aligned; other blocks may
                // update it concurrently, hence the atomic compare-exchange loop.
                unsafe {
                    match es {
                        4 => {
                            let a = &*(addr as *const AtomicU32);
                            let mut cur = a.load(Ordering::Relaxed);
                            loop {
                                let new = apply(cur as u64) as u32;
                                match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                                    Ok(_) => return Ok(cur as u64),
                                    Err(v) => cur = v,
                                }
                            }
                        }
                        8 => {
                            let a = &*(addr as *const AtomicU64);
                            let mut cur = a.load(Ordering::Relaxed);
                            loop {
                                let new = apply(cur);
                                match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                                    Ok(_) => return Ok(cur),
                                    Err(v) => cur = v,
                                }
                            }
                        }
                        _ => Err(self.fault(
                            FaultKind::LaunchFailed,
                            "unsupported instruction",
                            "atomic of this width is not implemented",
                            b,
                            w,
                            Some(l as u32),
                            pc,
                            "",
                        )),
                    }
                }
            }
            Space::Shared => {
                self.check_shared(b, w, addr, es as u64, es as u64, true, l, pc)?;
                let o = addr as usize;
                let mut buf = [0u8; 8];
                buf[..es as usize].copy_from_slice(&b.smem[o..o + es as usize]);
                let old = u64::from_le_bytes(buf);
                let new = apply(old);
                b.smem[o..o + es as usize].copy_from_slice(&new.to_le_bytes()[..es as usize]);
                b.shadow.atomic(o, es as usize);
                Ok(old)
            }
            _ => Err(self.fault(
                FaultKind::LaunchFailed,
                "unsupported instruction",
                "atomic in this state space is not implemented",
                b,
                w,
                Some(l as u32),
                pc,
                "",
            )),
        }
    }
}

impl Warp {
    fn empty() -> Warp {
        Warp {
            id: 0,
            regs: Vec::new(),
            pc: [0; 32],
            live: 0,
            exited: u32::MAX,
            at_bar: false,
            copies: Vec::new(),
            committed: [0; 32],
            local: Vec::new(),
            cache: (0, 0),
            cache_idx: 0,
            cache_uses: 0,
            waiting: 0,
        }
    }
}

/// `cvt` between scalar types; None for a combination not implemented.
fn cvt(dt: Ty, st: Ty, rnd: Option<Rnd>, rint: bool, ftz: bool, sat: bool, x: u64) -> Option<u64> {
    let sat01 = |v: f32| if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    let int_dst = |v: f64| -> u64 {
        // Float to integer saturates; NaN gives 0.
        let r = round_f64(v, rnd.unwrap_or(Rnd::Rz));
        let nb = dt.bytes();
        if r.is_nan() {
            return 0;
        }
        if dt.signed() {
            let bits = nb * 8;
            let (lo, hi) = (-(2f64.powi(bits as i32 - 1)), 2f64.powi(bits as i32 - 1) - 1.0);
            (r.clamp(lo, hi) as i64 as u64) & width_mask(nb)
        } else {
            let hi = 2f64.powi(nb as i32 * 8) - 1.0;
            (r.clamp(0.0, hi) as u64) & width_mask(nb)
        }
    };
    let src_f = |x: u64| -> Option<f64> {
        Some(match st {
            Ty::F32 => {
                let v = fbits(x);
                (if ftz { ftz32(v) } else { v }) as f64
            }
            Ty::F64 => dbits(x),
            Ty::Bf16 => f32::from_bits((x as u32 & 0xFFFF) << 16) as f64,
            _ => return None,
        })
    };
    Some(match (dt.is_float(), st.is_float()) {
        (false, false) => {
            // Integer to integer: extend by the source type, then truncate (or saturate).
            let v = st.extend(x);
            if sat {
                let nb = dt.bytes();
                let (lo, hi): (i128, i128) = if dt.signed() {
                    (-(1i128 << (nb * 8 - 1)), (1i128 << (nb * 8 - 1)) - 1)
                } else {
                    (0, (1i128 << (nb * 8)) - 1)
                };
                let vi: i128 = if st.signed() { v as i64 as i128 } else { v as i128 };
                (vi.clamp(lo, hi) as u64) & width_mask(nb)
            } else {
                v & width_mask(dt.bytes())
            }
        }
        (false, true) => int_dst(src_f(x)?),
        (true, false) => {
            let v = if st.signed() {
                st.extend(x) as i64 as f64
            } else {
                st.extend(x) as f64
            };
            // 64-bit integers may not be exact in f64; the project converts 32-bit ones.
            match dt {
                Ty::F32 => {
                    let exact = if st.signed() {
                        st.extend(x) as i64 as i128
                    } else {
                        st.extend(x) as i128
                    };
                    let lo = (exact - v as i128) as f64;
                    let mut f = round_f32(v, lo, rnd.unwrap_or(Rnd::Rn));
                    if sat {
                        f = sat01(f);
                    }
                    f.to_bits() as u64
                }
                Ty::F64 => v.to_bits(),
                Ty::Bf16 => f32_to_bf16(v as f32) as u64,
                _ => return None,
            }
        }
        (true, true) => {
            let v = src_f(x)?;
            match dt {
                Ty::F32 => {
                    let mut f = if rint {
                        round_f64(v, rnd.unwrap_or(Rnd::Rn)) as f32
                    } else if st == Ty::F64 {
                        round_f32(v, 0.0, rnd.unwrap_or(Rnd::Rn))
                    } else {
                        v as f32
                    };
                    if ftz {
                        f = ftz32(f);
                    }
                    if sat {
                        f = sat01(f);
                    }
                    f.to_bits() as u64
                }
                Ty::F64 => {
                    let mut f = if rint { round_f64(v, rnd.unwrap_or(Rnd::Rn)) } else { v };
                    if sat {
                        f = if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) };
                    }
                    f.to_bits()
                }
                Ty::Bf16 => {
                    if rnd.unwrap_or(Rnd::Rn) != Rnd::Rn {
                        return None;
                    }
                    let mut f = v as f32;
                    if sat {
                        f = sat01(f);
                    }
                    f32_to_bf16(f) as u64
                }
                _ => return None,
            }
        }
    })
}

static COUNTERS_ON: AtomicBool = AtomicBool::new(false);
static LAST_COUNTERS: Mutex<Option<Counters>> = Mutex::new(None);

/// `VGPU_COUNTERS=summary`: each kernel's launches and summed counters, printed by
/// [`print_counter_summary`].
static SUMMARY: Mutex<std::collections::BTreeMap<String, (u64, Counters)>> = Mutex::new(std::collections::BTreeMap::new());

/// Prints (stderr) and clears the per-kernel totals that `VGPU_COUNTERS=summary` collected,
/// most warp instructions first. The driver calls it when a context is torn down.
pub fn print_counter_summary() {
    let totals = std::mem::take(&mut *SUMMARY.lock().unwrap_or_else(|e| e.into_inner()));
    if totals.is_empty() {
        return;
    }
    let mut rows: Vec<_> = totals.into_iter().collect();
    rows.sort_by_key(|(_, (_, c))| std::cmp::Reverse(c.warp_insts.iter().sum::<u64>()));
    let all: u64 = rows.iter().map(|(_, (_, c))| c.warp_insts.iter().sum::<u64>()).sum();
    eprintln!(
        "vgpu counters summary (interpreter proxy, not GPU performance): {} kernels, {all} warp instructions",
        rows.len()
    );
    for (name, (launches, c)) in &rows {
        let n: u64 = c.warp_insts.iter().sum();
        eprintln!("  {:5.1}%  {launches} launches of {name}", 100.0 * n as f64 / all.max(1) as f64);
        for line in c.table(name, [0; 3], [0; 3]).lines().skip(1) {
            eprintln!("    {line}");
        }
    }
}

static TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// The watchdog's limit for this process's launches (as `VGPU_TIMEOUT_S`, default 900 s);
/// `None` goes back to the environment's.
pub fn set_timeout(limit: Option<std::time::Duration>) {
    TIMEOUT_MS.store(limit.map_or(0, |d| (d.as_millis() as u64).max(1)), Ordering::Relaxed);
}

/// Turns the per-launch counters on or off for this process (as `VGPU_COUNTERS=1` does).
pub fn set_counters(on: bool) {
    COUNTERS_ON.store(on, Ordering::Relaxed);
}

/// The counters of the last launch that had them on (any thread), taken.
pub fn take_last_counters() -> Option<Counters> {
    LAST_COUNTERS.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn launch_check(kind: FaultKind, k: &Kernel, msg: String) -> Fault {
    Fault {
        kind,
        report: format!("========= vgpu launch check: {msg}\n=========     kernel {}\n", k.name),
    }
}

/// Checks the launch as the driver would, then runs it. `uses`, when given, receives the allocations the launch read or wrote (streamcheck).
///
/// # Safety
/// See [`super::launch`].
pub unsafe fn launch(
    k: &Kernel,
    cfg: &LaunchConfig,
    params: *const *const std::ffi::c_void,
    uses: Option<&mut Vec<super::GlobalUse>>,
) -> Result<(), Fault> {
    let p = crate::device::profile();
    let threads: u64 = cfg.block.iter().map(|&x| x as u64).product();
    for d in 0..3 {
        if cfg.block[d] == 0 || cfg.block[d] > p.max_block_dim[d] {
            return Err(launch_check(
                FaultKind::InvalidValue,
                k,
                format!("block dimension {d} is {} (allowed 1..={})", cfg.block[d], p.max_block_dim[d]),
            ));
        }
        if cfg.grid[d] == 0 || cfg.grid[d] > p.max_grid_dim[d] {
            return Err(launch_check(
                FaultKind::InvalidValue,
                k,
                format!("grid dimension {d} is {} (allowed 1..={})", cfg.grid[d], p.max_grid_dim[d]),
            ));
        }
    }
    if threads > p.max_threads_per_block as u64 {
        return Err(launch_check(
            FaultKind::InvalidValue,
            k,
            format!("{threads} threads per block exceed the device's {}", p.max_threads_per_block),
        ));
    }
    if let Some(m) = k.max_threads {
        if threads > m as u64 {
            return Err(launch_check(
                FaultKind::OutOfResources,
                k,
                format!("{threads} threads per block exceed the kernel's .maxntid/__launch_bounds__ of {m}"),
            ));
        }
    }
    let stat = k.static_smem;
    let limit = if cfg.max_dynamic_smem_attr > 0 {
        cfg.max_dynamic_smem_attr
    } else {
        p.smem_per_block.saturating_sub(stat)
    };
    if cfg.dynamic_smem > limit {
        let why = if cfg.max_dynamic_smem_attr > 0 {
            format!("above the {limit} bytes set with CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES")
        } else {
            format!("above the default {limit} bytes (48 KB less {stat} static) without the CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES opt-in")
        };
        return Err(launch_check(
            FaultKind::InvalidValue,
            k,
            format!("{} bytes of dynamic shared memory requested, {why}", cfg.dynamic_smem),
        ));
    }
    if stat as u64 + cfg.dynamic_smem as u64 > p.smem_per_block_optin as u64 {
        return Err(launch_check(
            FaultKind::InvalidValue,
            k,
            format!(
                "{} static + {} dynamic bytes of shared memory exceed the device's {} per block",
                stat, cfg.dynamic_smem, p.smem_per_block_optin
            ),
        ));
    }
    for (i, inst) in k.body.insts.iter().enumerate() {
        if let Op::Unsupported(t) = &inst.op {
            let _ = i;
            return Err(Fault {
                kind: FaultKind::LaunchFailed,
                report: format!(
                    "========= vgpu unsupported instruction: `{t}` is not implemented by the virtual device\n=========     kernel {}, at PTX line {}\n",
                    k.name, inst.line
                ),
            });
        }
    }
    // Parameters, as the entry's .param list lays them out.
    let mut buf = vec![0u8; k.body.param_bytes as usize];
    if !k.params.is_empty() && params.is_null() {
        return Err(launch_check(
            FaultKind::InvalidValue,
            k,
            format!("kernelParams is null but the kernel takes {} parameters", k.params.len()),
        ));
    }
    for (i, &(size, _)) in k.params.iter().enumerate() {
        // SAFETY: the caller promises one pointer per parameter.
        let ptr = unsafe { *params.add(i) };
        if ptr.is_null() {
            return Err(launch_check(FaultKind::InvalidValue, k, format!("kernelParams[{i}] is null")));
        }
        let off = k.body.param_offsets[i] as usize;
        // SAFETY: the caller promises `size` readable bytes behind it.
        unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, buf[off..].as_mut_ptr(), size as usize) };
    }
    let smem_size = if cfg.dynamic_smem > 0 {
        k.body.dyn_smem_offset + cfg.dynamic_smem
    } else {
        stat.max(k.body.dyn_smem_offset.min(stat))
    };
    static LAUNCHES: AtomicU64 = AtomicU64::new(0);
    let n = LAUNCHES.fetch_add(1, Ordering::Relaxed);
    let seed = std::env::var("VGPU_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0x5EED)
        ^ n.wrapping_mul(0xD134_2543_DE82_EF95);
    let mode = std::env::var("VGPU_COUNTERS").unwrap_or_default();
    let summary = mode == "summary";
    let want_counters = COUNTERS_ON.load(Ordering::Relaxed) || summary || (!mode.is_empty() && mode != "0");
    let allocs = crate::mem::snapshot();
    let launch = Launch {
        k,
        cfg,
        params: buf,
        uses: allocs.iter().map(|_| AtomicU8::new(0)).collect(),
        allocs,
        smem_size,
        threads: threads as u32,
        abort: AtomicBool::new(false),
        fault: Mutex::new(None),
        soft: Mutex::new(None),
        counters: want_counters.then(|| Mutex::new(Counters::new(&k.body.classes))),
        seed,
        started: std::time::Instant::now(),
        timeout: match TIMEOUT_MS.load(Ordering::Relaxed) {
            0 => std::time::Duration::from_secs(std::env::var("VGPU_TIMEOUT_S").ok().and_then(|s| s.parse().ok()).unwrap_or(900)),
            ms => std::time::Duration::from_millis(ms),
        },
    };
    let total: u64 = cfg.grid.iter().map(|&x| x as u64).product();
    let workers = std::env::var("VGPU_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
        .clamp(1, 64)
        .min(total as usize);
    let resident = std::env::var("VGPU_RESIDENT")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(2)
        .clamp(1, 32);
    let next = AtomicU64::new(0);
    let work = |wk: u64| {
        let mut r = Runner::new(&launch, wk);
        r.run_blocks(&next, total, resident);
        if let (Some(mine), Some(all)) = (r.counters.as_ref(), launch.counters.as_ref()) {
            all.lock().unwrap_or_else(|e| e.into_inner()).merge(mine);
        }
    };
    if workers <= 1 {
        work(0);
    } else {
        std::thread::scope(|s| {
            for wk in 1..workers {
                let work = &work;
                s.spawn(move || work(wk as u64));
            }
            work(0);
        });
    }
    if let Some(c) = launch.counters.as_ref() {
        let c = c.lock().unwrap_or_else(|e| e.into_inner());
        if summary {
            let mut totals = SUMMARY.lock().unwrap_or_else(|e| e.into_inner());
            let entry = totals.entry(k.name.clone()).or_insert_with(|| (0, Counters::new(&k.body.classes)));
            entry.0 += 1;
            entry.1.merge(&c);
        } else {
            eprint!("{}", c.table(&k.name, cfg.grid, cfg.block));
        }
        *LAST_COUNTERS.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
    }
    if let Some(out) = uses {
        out.extend(launch.allocs.iter().zip(&launch.uses).filter_map(|(a, u)| {
            let u = u.load(Ordering::Relaxed);
            (u != 0).then_some(super::GlobalUse {
                alloc: *a,
                read: u & USE_READ != 0,
                write: u & USE_WRITE != 0,
            })
        }));
    }
    let hard = launch.fault.into_inner().unwrap_or_else(|e| e.into_inner());
    let soft = launch.soft.into_inner().unwrap_or_else(|e| e.into_inner());
    match hard.or(soft) {
        Some(f) => Err(f),
        None => Ok(()),
    }
}
