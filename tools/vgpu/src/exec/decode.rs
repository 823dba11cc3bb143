//! Decoding: a parsed `.entry` becomes a flat list of [`DInst`] the interpreter runs, with
//! registers numbered, labels resolved to instruction indices, parameters and `.shared`
//! symbols resolved to offsets. Semantics follow the PTX ISA (9.0); an instruction this file
//! does not know becomes [`Op::Unsupported`], which fails the kernel's launches with its name.

use super::Kernel;
use crate::ptx::{Entry, Inst, Module, Operand, Stmt};
use std::collections::HashMap;

/// Base of the generic-address window for shared memory (`cvta.shared`): far above any host
/// address, so a generic pointer tells its space by its value, as on a GPU.
pub const SHARED_WINDOW: u64 = 0xFFFF_0000_0000_0000;
/// Base of the generic-address window for local memory (`cvta.local`).
pub const LOCAL_WINDOW: u64 = 0xFFFE_0000_0000_0000;
/// Size of each window.
pub const WINDOW_SIZE: u64 = 1 << 32;

/// Scalar types as PTX names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    B8,
    B16,
    B32,
    B64,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F32,
    F64,
    Bf16,
    Bf16x2,
    F16x2,
    Pred,
}

impl Ty {
    pub fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "bf16" => Ty::Bf16,
            "bf16x2" => Ty::Bf16x2,
            "f16x2" => Ty::F16x2,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }
    /// Size in bytes (a predicate counts as 1).
    pub fn bytes(self) -> u32 {
        match self {
            Ty::B8 | Ty::U8 | Ty::S8 | Ty::Pred => 1,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 2,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::Bf16x2 | Ty::F16x2 => 4,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 8,
        }
    }
    pub fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }
    pub fn is_float(self) -> bool {
        matches!(self, Ty::F16 | Ty::F32 | Ty::F64 | Ty::Bf16)
    }
    /// Zero- or sign-extends the low `bytes()` of `v` to 64 bits (the register value).
    #[inline(always)]
    pub fn extend(self, v: u64) -> u64 {
        match self {
            Ty::S8 => v as u8 as i8 as i64 as u64,
            Ty::S16 => v as u16 as i16 as i64 as u64,
            Ty::S32 => v as u32 as i32 as i64 as u64,
            Ty::Pred => (v != 0) as u64,
            _ => match self.bytes() {
                1 => v as u8 as u64,
                2 => v as u16 as u64,
                4 => v as u32 as u64,
                _ => v,
            },
        }
    }
}

/// A special register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sreg {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    SmId,
    NSmId,
    GridId,
    Clock,
    Clock64,
    GlobalTimer,
    LaneMaskEq,
    LaneMaskLt,
    LaneMaskLe,
    LaneMaskGt,
    LaneMaskGe,
    DynamicSmemSize,
    TotalSmemSize,
}

fn sreg(name: &str) -> Option<Sreg> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((base, d)) = name.split_once('.') {
        let d = dim(d)?;
        return Some(match base {
            "%tid" => Sreg::Tid(d),
            "%ntid" => Sreg::Ntid(d),
            "%ctaid" => Sreg::Ctaid(d),
            "%nctaid" => Sreg::Nctaid(d),
            _ => return None,
        });
    }
    Some(match name {
        "%laneid" => Sreg::LaneId,
        "%warpid" => Sreg::WarpId,
        "%nwarpid" => Sreg::NWarpId,
        "%smid" => Sreg::SmId,
        "%nsmid" => Sreg::NSmId,
        "%gridid" => Sreg::GridId,
        "%clock" => Sreg::Clock,
        "%clock64" => Sreg::Clock64,
        "%globaltimer" => Sreg::GlobalTimer,
        "%lanemask_eq" => Sreg::LaneMaskEq,
        "%lanemask_lt" => Sreg::LaneMaskLt,
        "%lanemask_le" => Sreg::LaneMaskLe,
        "%lanemask_gt" => Sreg::LaneMaskGt,
        "%lanemask_ge" => Sreg::LaneMaskGe,
        "%dynamic_smem_size" => Sreg::DynamicSmemSize,
        "%total_smem_size" => Sreg::TotalSmemSize,
        _ => return None,
    })
}

/// A source operand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Src {
    R(u32),
    /// A predicate register read negated (`!%p1`).
    NotR(u32),
    Imm(u64),
    S(Sreg),
}

/// A destination register; `None` for the sink `_`.
pub type Dst = Option<u32>;

/// State spaces of memory operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Global,
    Shared,
    Local,
    Param,
    Const,
    Generic,
}

/// An address: `[reg + off]` or an absolute offset (a resolved symbol) in its space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Addr {
    pub base: Option<u32>,
    pub off: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntBin {
    Add,
    Sub,
    MulLo,
    MulHi,
    MulWide,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FBin {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    Copysign,
}

/// Rounding modes (`.rn` is the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rnd {
    Rn,
    Rz,
    Rm,
    Rp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FUn {
    Neg,
    Abs,
    Rcp,
    Sqrt,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
    Inc,
    Dec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

/// A decoded instruction's operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Mov {
        d: u32,
        a: Src,
        ty: Ty,
    },
    /// `mov.b32 {lo, hi}, a` / `mov.b64 {a, b}, x`: split into `parts` pieces of `bits`.
    Unpack {
        d: Vec<Dst>,
        a: Src,
        bits: u32,
    },
    /// `mov.b64 d, {a, b}`: join.
    Pack {
        d: u32,
        a: Vec<Src>,
        bits: u32,
    },
    /// Integer binary op on type `ty` (`MulWide` reads `ty` and writes twice its width).
    Int {
        op: IntBin,
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
    },
    /// `mad.lo/hi/wide`: d = a * b + c.
    Mad {
        hi: bool,
        wide: bool,
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    /// Integer unary: neg, not, abs, popc, clz, brev.
    IntUn {
        op: &'static str,
        ty: Ty,
        d: u32,
        a: Src,
    },
    Bfi {
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
        pos: Src,
        len: Src,
    },
    Bfe {
        ty: Ty,
        d: u32,
        a: Src,
        pos: Src,
        len: Src,
    },
    /// Float binary op (f32 or f64).
    F {
        op: FBin,
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        d: u32,
        a: Src,
        b: Src,
    },
    Fma {
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    FUnary {
        op: FUn,
        ty: Ty,
        ftz: bool,
        approx: bool,
        d: u32,
        a: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        p: Dst,
        q: Dst,
        a: Src,
        b: Src,
        comb: Option<(BoolOp, Src)>,
    },
    Selp {
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    /// Predicate logic: and/or/xor (b given) or not (b None).
    PredOp {
        op: Option<BoolOp>,
        d: u32,
        a: Src,
        b: Option<Src>,
    },
    /// Bitwise logic on a non-predicate type.
    Cvt {
        dt: Ty,
        st: Ty,
        rnd: Option<Rnd>,
        rint: bool,
        ftz: bool,
        sat: bool,
        d: u32,
        a: Src,
    },
    /// `cvt.rn.bf16x2.f32 d, a, b`: d.hi = bf16(a), d.lo = bf16(b).
    CvtPack {
        d: u32,
        a: Src,
        b: Src,
        relu: bool,
    },
    /// `cvta[.to].space`: `to` converts a generic address to the space's, else the reverse.
    Cvta {
        to: bool,
        space: Space,
        d: u32,
        a: Src,
    },
    Ld {
        space: Space,
        ty: Ty,
        d: Vec<Dst>,
        addr: Addr,
    },
    St {
        space: Space,
        ty: Ty,
        addr: Addr,
        a: Vec<Src>,
    },
    Atom {
        space: Space,
        op: AtomOp,
        ty: Ty,
        d: Vec<Dst>,
        addr: Addr,
        a: Vec<Src>,
        b: Option<Src>,
    },
    Bra {
        target: u32,
        uni: bool,
    },
    Ret,
    /// `bar.sync` / `barrier.sync` (id, optional thread count).
    Bar {
        id: Src,
        count: Option<Src>,
        aligned: bool,
    },
    BarWarp {
        mask: Src,
    },
    Membar,
    Shfl {
        mode: ShflMode,
        d: u32,
        p: Dst,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    Vote {
        mode: VoteMode,
        d: u32,
        a: Src,
        mask: Src,
    },
    /// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`.
    MmaBf16 {
        d: [Dst; 4],
        a: [Src; 4],
        b: [Src; 2],
        c: [Src; 4],
    },
    /// `ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16`.
    Ldmatrix {
        num: u32,
        trans: bool,
        d: Vec<Dst>,
        addr: Addr,
        space: Space,
    },
    /// `cp.async.{ca,cg}.shared.global [dst], [src], size[, src_size]`.
    CpAsync {
        size: u32,
        dst: Addr,
        src: Addr,
        src_size: Option<Src>,
    },
    CpAsyncCommit,
    /// `cp.async.wait_group n` (`wait_all`: commit, then n = 0).
    CpAsyncWait {
        n: u32,
        all: bool,
    },
    Nop,
    /// An instruction this interpreter does not know: its text.
    Unsupported(String),
}

/// One instruction ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct DInst {
    pub op: Op,
    pub guard: Option<(u32, bool)>,
    /// PTX line number.
    pub line: u32,
    /// The instruction class counted by the counters (its opcode).
    pub class: u16,
}

/// A kernel's decoded body.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    pub insts: Vec<DInst>,
    pub nregs: u32,
    /// Byte offset of each `.param` in the parameter buffer.
    pub param_offsets: Vec<u32>,
    pub param_bytes: u32,
    /// Offset of dynamic shared memory (after the static variables).
    pub dyn_smem_offset: u32,
    /// Opcode names by class index (for the counters).
    pub classes: Vec<String>,
    /// Source text per line? No: the instruction text for reports, by instruction index.
    pub text: Vec<String>,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a.max(1)) * a.max(1)
}

struct Ctx<'a> {
    regs: HashMap<String, u32>,
    labels: HashMap<String, u32>,
    params: HashMap<String, u32>,
    shared: &'a HashMap<String, u64>,
    locals: HashMap<String, u64>,
}

impl Ctx<'_> {
    fn reg(&self, name: &str) -> Result<u32, String> {
        self.regs.get(name).copied().ok_or_else(|| format!("undeclared register {name}"))
    }
    fn src(&self, o: &Operand) -> Result<Src, String> {
        Ok(match o {
            Operand::Reg(n) => match sreg(n) {
                Some(s) => Src::S(s),
                None => Src::R(self.reg(n)?),
            },
            Operand::NotReg(n) => Src::NotR(self.reg(n)?),
            Operand::Int(v) => Src::Imm(*v as u64),
            Operand::F32(b) => Src::Imm(*b as u64),
            Operand::F64(b) => Src::Imm(*b),
            Operand::Symbol(s) => Src::Imm(self.symbol(s)?),
            other => return Err(format!("operand {other:?} where a value was expected")),
        })
    }
    fn symbol(&self, s: &str) -> Result<u64, String> {
        if let Some(&o) = self.shared.get(s) {
            return Ok(o);
        }
        if let Some(&o) = self.locals.get(s) {
            return Ok(o);
        }
        if let Some(&o) = self.params.get(s) {
            return Ok(o as u64);
        }
        if let Some(&o) = self.labels.get(s) {
            return Ok(o as u64);
        }
        Err(format!("unknown symbol {s}"))
    }
    fn dst(&self, o: &Operand) -> Result<Dst, String> {
        match o {
            Operand::Reg(n) => Ok(Some(self.reg(n)?)),
            Operand::Sink => Ok(None),
            other => Err(format!("operand {other:?} where a register was expected")),
        }
    }
    fn d(&self, o: &Operand) -> Result<u32, String> {
        self.dst(o)?.ok_or_else(|| "a sink `_` where a register is needed".to_string())
    }
    fn addr(&self, o: &Operand) -> Result<Addr, String> {
        match o {
            Operand::Addr { base: None, offset } => Ok(Addr { base: None, off: *offset }),
            Operand::Addr { base: Some(b), offset } => {
                if b.starts_with('%') {
                    Ok(Addr {
                        base: Some(self.reg(b)?),
                        off: *offset,
                    })
                } else {
                    Ok(Addr {
                        base: None,
                        off: self.symbol(b)? as i64 + *offset,
                    })
                }
            }
            other => Err(format!("operand {other:?} where an address was expected")),
        }
    }
    fn dsts(&self, o: &Operand) -> Result<Vec<Dst>, String> {
        match o {
            Operand::Vector(v) => v.iter().map(|x| self.dst(x)).collect(),
            x => Ok(vec![self.dst(x)?]),
        }
    }
    fn srcs(&self, o: &Operand) -> Result<Vec<Src>, String> {
        match o {
            Operand::Vector(v) => v.iter().map(|x| self.src(x)).collect(),
            x => Ok(vec![self.src(x)?]),
        }
    }
}

/// Lays out the `.shared` variables a module declares: static ones at increasing aligned
/// offsets (only those an entry references count toward its size), extern ones at the
/// dynamic base. Returns (symbol -> offset, static size, dynamic base).
fn shared_layout(m: &Module, e: &Entry) -> (HashMap<String, u64>, u64, u64) {
    let mut used = std::collections::HashSet::new();
    let mut note = |o: &Operand| {
        let mut visit = |name: &str| {
            used.insert(name.to_string());
        };
        match o {
            Operand::Symbol(s) => visit(s),
            Operand::Addr { base: Some(b), .. } if !b.starts_with('%') => visit(b),
            _ => {}
        }
    };
    for s in &e.body {
        if let Stmt::Inst(i) = s {
            for o in &i.operands {
                note(o);
                if let Operand::Vector(v) = o {
                    v.iter().for_each(&mut note);
                }
            }
        }
    }
    let mut map = HashMap::new();
    let mut off = 0u64;
    let mut dyn_align = 16u64;
    let vars: Vec<_> = m.shared.iter().chain(e.shared.iter()).collect();
    for v in &vars {
        if v.is_extern {
            dyn_align = dyn_align.max(v.align as u64);
            continue;
        }
        if !used.contains(&v.name) {
            continue;
        }
        off = align_up(off, v.align.max(1) as u64);
        map.insert(v.name.clone(), off);
        off += v.size;
    }
    let static_size = off;
    let dyn_base = align_up(off, dyn_align);
    for v in &vars {
        if v.is_extern {
            map.insert(v.name.clone(), dyn_base);
        }
    }
    (map, static_size, dyn_base)
}

/// Decodes one entry into a [`Kernel`].
pub fn decode_entry(m: &Module, e: &Entry) -> Result<Kernel, String> {
    let ctx_err = |line: u32, msg: String| format!("{}: PTX line {line}: {msg}", e.name);
    // Registers.
    let mut regs = HashMap::new();
    let mut n = 0u32;
    for d in &e.regs {
        match d.count {
            Some(c) => {
                for i in 0..c {
                    regs.insert(format!("{}{}", d.prefix, i), n);
                    n += 1;
                }
            }
            None => {
                regs.insert(d.prefix.clone(), n);
                n += 1;
            }
        }
    }
    // Parameters.
    let mut params = HashMap::new();
    let mut param_offsets = Vec::new();
    let mut poff = 0u32;
    for p in &e.params {
        poff = align_up(poff as u64, p.align.max(1) as u64) as u32;
        params.insert(p.name.clone(), poff);
        param_offsets.push(poff);
        poff += p.size;
    }
    // Local memory (`__local_depot`).
    let mut locals = HashMap::new();
    let mut loff = 0u64;
    for l in &e.locals {
        loff = align_up(loff, l.align.max(1) as u64);
        locals.insert(l.name.clone(), loff);
        loff += l.size;
    }
    let (shared, static_smem, dyn_base) = shared_layout(m, e);
    // Labels -> instruction index.
    let mut labels = HashMap::new();
    let mut idx = 0u32;
    for s in &e.body {
        match s {
            Stmt::Label(l) => {
                labels.insert(l.clone(), idx);
            }
            Stmt::Inst(_) => idx += 1,
        }
    }
    let ctx = Ctx {
        regs,
        labels,
        params,
        shared: &shared,
        locals,
    };
    let mut classes: Vec<String> = Vec::new();
    let mut class_ix: HashMap<String, u16> = HashMap::new();
    let mut insts = Vec::new();
    let mut text = Vec::new();
    for s in &e.body {
        let Stmt::Inst(i) = s else { continue };
        let op = match decode_inst(&ctx, i) {
            Ok(op) => op,
            Err(msg) => return Err(ctx_err(i.line, format!("{msg} in `{}`", inst_text(i)))),
        };
        let guard = match &i.guard {
            Some((r, neg)) => Some((ctx.reg(r).map_err(|m| ctx_err(i.line, m))?, *neg)),
            None => None,
        };
        let cname = class_name(i);
        let class = *class_ix.entry(cname.clone()).or_insert_with(|| {
            classes.push(cname);
            (classes.len() - 1) as u16
        });
        text.push(inst_text(i));
        insts.push(DInst {
            op,
            guard,
            line: i.line,
            class,
        });
    }
    insts.push(DInst {
        op: Op::Ret,
        guard: None,
        line: e.line,
        class: 0,
    });
    text.push("(end of kernel)".into());
    if classes.is_empty() {
        classes.push("ret".into());
    }
    let max_threads = e.reqntid.or(e.maxntid).map(|d| d.iter().map(|&x| x.max(1)).product());
    Ok(Kernel {
        name: e.name.clone(),
        params: e.params.iter().map(|p| (p.size, p.align)).collect(),
        static_smem: static_smem as u32,
        max_threads,
        num_regs: n.min(255),
        local_bytes: loff as u32,
        body: Decoded {
            insts,
            nregs: n,
            param_offsets,
            param_bytes: poff,
            dyn_smem_offset: dyn_base as u32,
            classes,
            text,
        },
    })
}

/// The counters' class of an instruction: its opcode with the modifiers that change its cost
/// class (space, vector width), e.g. `ld.global.v4`, `mma`, `fma`.
fn class_name(i: &Inst) -> String {
    let keep = |m: &str| {
        matches!(
            m,
            "global" | "shared" | "local" | "param" | "v2" | "v4" | "sync" | "async" | "trans"
        )
    };
    let mut s = i.opcode.clone();
    for m in &i.mods {
        if keep(m) {
            s.push('.');
            s.push_str(m);
        }
    }
    s
}

/// The instruction as PTX text, for reports.
pub fn inst_text(i: &Inst) -> String {
    fn op(o: &Operand) -> String {
        match o {
            Operand::Reg(r) => r.clone(),
            Operand::NotReg(r) => format!("!{r}"),
            Operand::Int(v) => v.to_string(),
            Operand::F32(b) => format!("0f{b:08X}"),
            Operand::F64(b) => format!("0d{b:016X}"),
            Operand::Symbol(s) => s.clone(),
            Operand::Addr { base, offset } => match (base, offset) {
                (Some(b), 0) => format!("[{b}]"),
                (Some(b), o) => format!("[{b}+{o}]"),
                (None, o) => format!("[{o}]"),
            },
            Operand::Vector(v) => format!("{{{}}}", v.iter().map(op).collect::<Vec<_>>().join(", ")),
            Operand::Sink => "_".into(),
            Operand::PredPair(a, b) => format!("{a}|{b}"),
        }
    }
    let mut s = String::new();
    if let Some((g, neg)) = &i.guard {
        s.push_str(&format!("@{}{} ", if *neg { "!" } else { "" }, g));
    }
    s.push_str(&i.opcode);
    for m in &i.mods {
        s.push('.');
        s.push_str(m);
    }
    let ops: Vec<String> = i.operands.iter().map(op).collect();
    if !ops.is_empty() {
        s.push(' ');
        s.push_str(&ops.join(", "));
    }
    s
}

fn has(i: &Inst, m: &str) -> bool {
    i.mods.iter().any(|x| x == m)
}

/// The last modifier that names a type.
fn last_ty(i: &Inst) -> Option<Ty> {
    i.mods.iter().rev().find_map(|m| Ty::parse(m))
}

fn rnd_of(i: &Inst) -> Option<Rnd> {
    i.mods.iter().find_map(|m| match m.as_str() {
        "rn" | "rni" => Some(Rnd::Rn),
        "rz" | "rzi" => Some(Rnd::Rz),
        "rm" | "rmi" => Some(Rnd::Rm),
        "rp" | "rpi" => Some(Rnd::Rp),
        _ => None,
    })
}

fn space_of(i: &Inst) -> Space {
    for m in &i.mods {
        match m.as_str() {
            "global" => return Space::Global,
            "shared" => return Space::Shared,
            "local" => return Space::Local,
            "param" => return Space::Param,
            "const" => return Space::Const,
            _ => {}
        }
    }
    Space::Generic
}

fn nops(i: &Inst, n: usize) -> Result<(), String> {
    if i.operands.len() != n {
        return Err(format!("expected {n} operands, found {}", i.operands.len()));
    }
    Ok(())
}

fn unsupported(i: &Inst) -> Op {
    Op::Unsupported(inst_text(i))
}

fn decode_inst(c: &Ctx, i: &Inst) -> Result<Op, String> {
    let o = &i.operands;
    let ty = last_ty(i);
    let op = i.opcode.as_str();
    Ok(match op {
        "mov" => {
            nops(i, 2)?;
            let ty = ty.ok_or("mov without a type")?;
            match (&o[0], &o[1]) {
                (Operand::Vector(d), a) => {
                    let bits = ty.bytes() * 8 / d.len() as u32;
                    Op::Unpack {
                        d: d.iter().map(|x| c.dst(x)).collect::<Result<_, _>>()?,
                        a: c.src(a)?,
                        bits,
                    }
                }
                (d, Operand::Vector(a)) => {
                    let bits = ty.bytes() * 8 / a.len() as u32;
                    Op::Pack {
                        d: c.d(d)?,
                        a: a.iter().map(|x| c.src(x)).collect::<Result<_, _>>()?,
                        bits,
                    }
                }
                (d, a) => Op::Mov {
                    d: c.d(d)?,
                    a: c.src(a)?,
                    ty,
                },
            }
        }
        "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" | "copysign" => {
            let ty = ty.ok_or("no type")?;
            if ty == Ty::Pred {
                nops(i, 3)?;
                let bop = match op {
                    "and" => BoolOp::And,
                    "or" => BoolOp::Or,
                    "xor" => BoolOp::Xor,
                    _ => return Ok(unsupported(i)),
                };
                return Ok(Op::PredOp {
                    op: Some(bop),
                    d: c.d(&o[0])?,
                    a: c.src(&o[1])?,
                    b: Some(c.src(&o[2])?),
                });
            }
            nops(i, 3)?;
            let (d, a, b) = (c.d(&o[0])?, c.src(&o[1])?, c.src(&o[2])?);
            if matches!(ty, Ty::F32 | Ty::F64) {
                let fop = match op {
                    "add" => FBin::Add,
                    "sub" => FBin::Sub,
                    "mul" => FBin::Mul,
                    "div" => FBin::Div,
                    "min" => FBin::Min,
                    "max" => FBin::Max,
                    "copysign" => FBin::Copysign,
                    _ => return Ok(unsupported(i)),
                };
                if has(i, "NaN") || has(i, "xorsign") {
                    return Ok(unsupported(i));
                }
                Op::F {
                    op: fop,
                    ty,
                    rnd: rnd_of(i).unwrap_or(Rnd::Rn),
                    ftz: has(i, "ftz"),
                    sat: has(i, "sat"),
                    d,
                    a,
                    b,
                }
            } else if ty.is_float() || matches!(ty, Ty::Bf16x2 | Ty::F16x2) {
                unsupported(i)
            } else {
                let iop = match op {
                    "add" => IntBin::Add,
                    "sub" => IntBin::Sub,
                    "mul" if has(i, "hi") => IntBin::MulHi,
                    "mul" if has(i, "wide") => IntBin::MulWide,
                    "mul" => IntBin::MulLo,
                    "div" => IntBin::Div,
                    "rem" => IntBin::Rem,
                    "min" => IntBin::Min,
                    "max" => IntBin::Max,
                    "and" => IntBin::And,
                    "or" => IntBin::Or,
                    "xor" => IntBin::Xor,
                    "shl" => IntBin::Shl,
                    "shr" => IntBin::Shr,
                    _ => return Ok(unsupported(i)),
                };
                if has(i, "sat") || has(i, "cc") {
                    return Ok(unsupported(i));
                }
                Op::Int { op: iop, ty, d, a, b }
            }
        }
        "mad" | "fma" => {
            nops(i, 4)?;
            let ty = ty.ok_or("no type")?;
            let (d, a, b, cc) = (c.d(&o[0])?, c.src(&o[1])?, c.src(&o[2])?, c.src(&o[3])?);
            if matches!(ty, Ty::F32 | Ty::F64) {
                Op::Fma {
                    ty,
                    rnd: rnd_of(i).unwrap_or(Rnd::Rn),
                    ftz: has(i, "ftz"),
                    sat: has(i, "sat"),
                    d,
                    a,
                    b,
                    c: cc,
                }
            } else if ty.is_float() || op == "fma" || has(i, "cc") || has(i, "sat") {
                unsupported(i)
            } else {
                Op::Mad {
                    hi: has(i, "hi"),
                    wide: has(i, "wide"),
                    ty,
                    d,
                    a,
                    b,
                    c: cc,
                }
            }
        }
        "neg" | "abs" | "not" | "popc" | "clz" | "brev" | "rcp" | "sqrt" | "rsqrt" | "ex2" | "lg2" | "sin" | "cos" | "tanh" => {
            nops(i, 2)?;
            let ty = ty.ok_or("no type")?;
            let (d, a) = (c.d(&o[0])?, c.src(&o[1])?);
            if ty == Ty::Pred {
                if op != "not" {
                    return Ok(unsupported(i));
                }
                return Ok(Op::PredOp { op: None, d, a, b: None });
            }
            if matches!(ty, Ty::F32 | Ty::F64) {
                let fop = match op {
                    "neg" => FUn::Neg,
                    "abs" => FUn::Abs,
                    "rcp" => FUn::Rcp,
                    "sqrt" => FUn::Sqrt,
                    "rsqrt" => FUn::Rsqrt,
                    "ex2" => FUn::Ex2,
                    "lg2" => FUn::Lg2,
                    "sin" => FUn::Sin,
                    "cos" => FUn::Cos,
                    "tanh" => FUn::Tanh,
                    _ => return Ok(unsupported(i)),
                };
                if matches!(fop, FUn::Rcp | FUn::Sqrt) && !has(i, "approx") && rnd_of(i).is_some_and(|r| r != Rnd::Rn) {
                    return Ok(unsupported(i));
                }
                Op::FUnary {
                    op: fop,
                    ty,
                    ftz: has(i, "ftz"),
                    approx: has(i, "approx"),
                    d,
                    a,
                }
            } else if ty.is_float() {
                unsupported(i)
            } else {
                let name: &'static str = match op {
                    "neg" => "neg",
                    "abs" => "abs",
                    "not" => "not",
                    "popc" => "popc",
                    "clz" => "clz",
                    "brev" => "brev",
                    _ => return Ok(unsupported(i)),
                };
                Op::IntUn { op: name, ty, d, a }
            }
        }
        "bfi" => {
            nops(i, 5)?;
            Op::Bfi {
                ty: ty.ok_or("no type")?,
                d: c.d(&o[0])?,
                a: c.src(&o[1])?,
                b: c.src(&o[2])?,
                pos: c.src(&o[3])?,
                len: c.src(&o[4])?,
            }
        }
        "bfe" => {
            nops(i, 4)?;
            Op::Bfe {
                ty: ty.ok_or("no type")?,
                d: c.d(&o[0])?,
                a: c.src(&o[1])?,
                pos: c.src(&o[2])?,
                len: c.src(&o[3])?,
            }
        }
        "setp" => {
            let ty = ty.ok_or("no type")?;
            let cmp = i
                .mods
                .iter()
                .find_map(|m| {
                    Some(match m.as_str() {
                        "eq" => Cmp::Eq,
                        "ne" => Cmp::Ne,
                        "lt" | "lo" => Cmp::Lt,
                        "le" | "ls" => Cmp::Le,
                        "gt" | "hi" => Cmp::Gt,
                        "ge" | "hs" => Cmp::Ge,
                        "equ" => Cmp::Equ,
                        "neu" => Cmp::Neu,
                        "ltu" => Cmp::Ltu,
                        "leu" => Cmp::Leu,
                        "gtu" => Cmp::Gtu,
                        "geu" => Cmp::Geu,
                        "num" => Cmp::Num,
                        "nan" => Cmp::Nan,
                        _ => return None,
                    })
                })
                .ok_or("setp without a comparison")?;
            let comb = i.mods.iter().find_map(|m| match m.as_str() {
                "and" => Some(BoolOp::And),
                "or" => Some(BoolOp::Or),
                "xor" => Some(BoolOp::Xor),
                _ => None,
            });
            let (p, q) = match &o[0] {
                Operand::PredPair(a, b) => (Some(c.reg(a)?), Some(c.reg(b)?)),
                x => (c.dst(x)?, None),
            };
            let comb = match comb {
                Some(b) => {
                    nops(i, 4)?;
                    Some((b, c.src(&o[3])?))
                }
                None => {
                    nops(i, 3)?;
                    None
                }
            };
            if !matches!(ty, Ty::F32 | Ty::F64) && ty.is_float() {
                return Ok(unsupported(i));
            }
            Op::Setp {
                cmp,
                ty,
                p,
                q,
                a: c.src(&o[1])?,
                b: c.src(&o[2])?,
                comb,
            }
        }
        "selp" => {
            nops(i, 4)?;
            Op::Selp {
                ty: ty.ok_or("no type")?,
                d: c.d(&o[0])?,
                a: c.src(&o[1])?,
                b: c.src(&o[2])?,
                c: c.src(&o[3])?,
            }
        }
        "cvt" => {
            let types: Vec<Ty> = i.mods.iter().filter_map(|m| Ty::parse(m)).collect();
            if types.len() != 2 {
                return Err("cvt needs two types".into());
            }
            let (dt, st) = (types[0], types[1]);
            if dt == Ty::Bf16x2 && st == Ty::F32 {
                nops(i, 3)?;
                if rnd_of(i) != Some(Rnd::Rn) || has(i, "satfinite") {
                    return Ok(unsupported(i));
                }
                return Ok(Op::CvtPack {
                    d: c.d(&o[0])?,
                    a: c.src(&o[1])?,
                    b: c.src(&o[2])?,
                    relu: has(i, "relu"),
                });
            }
            nops(i, 2)?;
            if matches!(dt, Ty::Bf16x2 | Ty::F16x2 | Ty::Pred) || matches!(st, Ty::Bf16x2 | Ty::F16x2 | Ty::Pred) {
                return Ok(unsupported(i));
            }
            let rint = i.mods.iter().any(|m| matches!(m.as_str(), "rni" | "rzi" | "rmi" | "rpi"));
            Op::Cvt {
                dt,
                st,
                rnd: rnd_of(i),
                rint,
                ftz: has(i, "ftz"),
                sat: has(i, "sat"),
                d: c.d(&o[0])?,
                a: c.src(&o[1])?,
            }
        }
        "cvta" => {
            nops(i, 2)?;
            let space = space_of(i);
            if !matches!(space, Space::Global | Space::Shared | Space::Local) {
                return Ok(unsupported(i));
            }
            Op::Cvta {
                to: has(i, "to"),
                space,
                d: c.d(&o[0])?,
                a: c.src(&o[1])?,
            }
        }
        "ld" | "st" => {
            nops(i, 2)?;
            let ty = ty.ok_or("no type")?;
            let space = space_of(i);
            // Cache hints (.nc, .cg, .L2::..) and orderings (.volatile, .relaxed) need nothing
            // here: every access is performed at once, in order.
            if has(i, "v8") {
                return Ok(unsupported(i));
            }
            if op == "ld" {
                Op::Ld {
                    space,
                    ty,
                    d: c.dsts(&o[0])?,
                    addr: c.addr(&o[1])?,
                }
            } else {
                Op::St {
                    space,
                    ty,
                    addr: c.addr(&o[0])?,
                    a: c.srcs(&o[1])?,
                }
            }
        }
        "atom" | "red" => {
            let ty = ty.ok_or("no type")?;
            let space = space_of(i);
            let aop = i
                .mods
                .iter()
                .find_map(|m| {
                    Some(match m.as_str() {
                        "add" => AtomOp::Add,
                        "min" => AtomOp::Min,
                        "max" => AtomOp::Max,
                        "exch" => AtomOp::Exch,
                        "cas" => AtomOp::Cas,
                        "and" => AtomOp::And,
                        "or" => AtomOp::Or,
                        "xor" => AtomOp::Xor,
                        "inc" => AtomOp::Inc,
                        "dec" => AtomOp::Dec,
                        _ => return None,
                    })
                })
                .ok_or("atom without an operation")?;
            if matches!(ty, Ty::F32 | Ty::F64) && !matches!(aop, AtomOp::Add | AtomOp::Exch) {
                return Ok(unsupported(i));
            }
            if !matches!(ty, Ty::F32 | Ty::F64) && ty.is_float() {
                return Ok(unsupported(i));
            }
            if op == "red" {
                nops(i, 2)?;
                Op::Atom {
                    space,
                    op: aop,
                    ty,
                    d: vec![],
                    addr: c.addr(&o[0])?,
                    a: c.srcs(&o[1])?,
                    b: None,
                }
            } else {
                let b = if aop == AtomOp::Cas {
                    nops(i, 4)?;
                    Some(c.src(&o[3])?)
                } else {
                    nops(i, 3)?;
                    None
                };
                Op::Atom {
                    space,
                    op: aop,
                    ty,
                    d: c.dsts(&o[0])?,
                    addr: c.addr(&o[1])?,
                    a: c.srcs(&o[2])?,
                    b,
                }
            }
        }
        "bra" => {
            nops(i, 1)?;
            let Operand::Symbol(l) = &o[0] else {
                return Err("bra needs a label".into());
            };
            let target = *c.labels.get(l).ok_or_else(|| format!("unknown label {l}"))?;
            Op::Bra {
                target,
                uni: has(i, "uni"),
            }
        }
        "ret" | "exit" => Op::Ret,
        "bar" | "barrier" => {
            if has(i, "warp") {
                nops(i, 1)?;
                return Ok(Op::BarWarp { mask: c.src(&o[0])? });
            }
            if !(has(i, "sync") || i.mods.is_empty() || (op == "barrier" && has(i, "aligned") && i.mods.len() == 1)) {
                // bar.arrive / bar.red are not used by the project.
                return Ok(unsupported(i));
            }
            let id = if o.is_empty() { Src::Imm(0) } else { c.src(&o[0])? };
            let count = if o.len() > 1 { Some(c.src(&o[1])?) } else { None };
            // Named barriers (another id, or a thread count) would need per-barrier arrival
            // sets; the project uses barrier 0 of the whole block only.
            if id != Src::Imm(0) || count.is_some() {
                return Ok(unsupported(i));
            }
            // `bar.sync` is `barrier.sync.aligned`.
            Op::Bar {
                id,
                count,
                aligned: op == "bar" || has(i, "aligned"),
            }
        }
        "membar" | "fence" => Op::Membar,
        "shfl" => {
            nops(i, 5)?;
            let mode = if has(i, "bfly") {
                ShflMode::Bfly
            } else if has(i, "down") {
                ShflMode::Down
            } else if has(i, "up") {
                ShflMode::Up
            } else if has(i, "idx") {
                ShflMode::Idx
            } else {
                return Ok(unsupported(i));
            };
            if !has(i, "sync") {
                return Ok(unsupported(i));
            }
            let (d, p) = match &o[0] {
                Operand::PredPair(a, b) => (c.reg(a)?, Some(c.reg(b)?)),
                x => (c.d(x)?, None),
            };
            Op::Shfl {
                mode,
                d,
                p,
                a: c.src(&o[1])?,
                b: c.src(&o[2])?,
                c: c.src(&o[3])?,
                mask: c.src(&o[4])?,
            }
        }
        "vote" => {
            nops(i, 3)?;
            let mode = if has(i, "all") {
                VoteMode::All
            } else if has(i, "any") {
                VoteMode::Any
            } else if has(i, "uni") {
                VoteMode::Uni
            } else if has(i, "ballot") {
                VoteMode::Ballot
            } else {
                return Ok(unsupported(i));
            };
            if !has(i, "sync") {
                return Ok(unsupported(i));
            }
            Op::Vote {
                mode,
                d: c.d(&o[0])?,
                a: c.src(&o[1])?,
                mask: c.src(&o[2])?,
            }
        }
        "mma" => {
            let want = ["sync", "aligned", "m16n8k16", "row", "col", "f32", "bf16", "bf16", "f32"];
            if i.mods.iter().map(|s| s.as_str()).ne(want.iter().copied()) {
                return Ok(unsupported(i));
            }
            nops(i, 4)?;
            let d = c.dsts(&o[0])?;
            let a = c.srcs(&o[1])?;
            let b = c.srcs(&o[2])?;
            let cc = c.srcs(&o[3])?;
            if d.len() != 4 || a.len() != 4 || b.len() != 2 || cc.len() != 4 {
                return Err("mma.m16n8k16 needs 4, 4, 2 and 4 registers".into());
            }
            Op::MmaBf16 {
                d: [d[0], d[1], d[2], d[3]],
                a: [a[0], a[1], a[2], a[3]],
                b: [b[0], b[1]],
                c: [cc[0], cc[1], cc[2], cc[3]],
            }
        }
        "ldmatrix" => {
            nops(i, 2)?;
            if !(has(i, "m8n8") && has(i, "b16") && has(i, "sync") && has(i, "aligned")) {
                return Ok(unsupported(i));
            }
            let num = if has(i, "x4") {
                4
            } else if has(i, "x2") {
                2
            } else if has(i, "x1") {
                1
            } else {
                return Ok(unsupported(i));
            };
            let d = c.dsts(&o[0])?;
            if d.len() != num as usize {
                return Err(format!("ldmatrix .x{num} needs {num} registers"));
            }
            let space = space_of(i);
            if !matches!(space, Space::Shared | Space::Generic) {
                return Ok(unsupported(i));
            }
            Op::Ldmatrix {
                num,
                trans: has(i, "trans"),
                d,
                addr: c.addr(&o[1])?,
                space,
            }
        }
        "cp" => {
            if !has(i, "async") {
                return Ok(unsupported(i));
            }
            if has(i, "commit_group") {
                return Ok(Op::CpAsyncCommit);
            }
            if has(i, "wait_group") {
                nops(i, 1)?;
                let Src::Imm(n) = c.src(&o[0])? else {
                    return Err("wait_group needs a constant".into());
                };
                return Ok(Op::CpAsyncWait { n: n as u32, all: false });
            }
            if has(i, "wait_all") {
                return Ok(Op::CpAsyncWait { n: 0, all: true });
            }
            if !(has(i, "shared") && has(i, "global")) || has(i, "bulk") || i.mods.iter().any(|m| m.starts_with("L2") || m == "mbarrier") {
                return Ok(unsupported(i));
            }
            if o.len() < 3 || o.len() > 4 {
                return Err("cp.async needs 3 or 4 operands".into());
            }
            let Src::Imm(size) = c.src(&o[2])? else {
                return Err("cp.async size must be a constant".into());
            };
            if !matches!(size, 4 | 8 | 16) || (has(i, "cg") && size != 16) {
                return Err(format!("cp.async copy size {size} is not allowed"));
            }
            let src_size = if o.len() == 4 {
                match &o[3] {
                    // The ignore-src predicate form is not used by the project.
                    Operand::Reg(r) if r.starts_with("%p") => return Ok(unsupported(i)),
                    x => Some(c.src(x)?),
                }
            } else {
                None
            };
            Op::CpAsync {
                size: size as u32,
                dst: c.addr(&o[0])?,
                src: c.addr(&o[1])?,
                src_size,
            }
        }
        "pragma" | "prefetch" | "prefetchu" => Op::Nop,
        _ => unsupported(i),
    })
}
