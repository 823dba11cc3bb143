//! PTX as parsed: a module of entries, each a list of generic instructions. The parser
//! (`parse.rs`) knows PTX syntax, not instruction semantics; `exec::decode` maps each
//! instruction to what the interpreter runs and rejects the ones it does not know.

pub mod parse;

/// A parsed PTX module (one `.ptx` text).
#[derive(Debug, Clone, Default)]
pub struct Module {
    /// `.version` as (major, minor).
    pub version: (u32, u32),
    /// `.target`, e.g. "sm_90".
    pub target: String,
    pub entries: Vec<Entry>,
    /// Module-scope `.shared` variables (nvcc puts a kernel's `__shared__` arrays here).
    pub shared: Vec<SharedVar>,
}

/// A `.shared` declaration: `.shared .align 16 .b8 name[1024];` or `.extern .shared ... name[];`
#[derive(Debug, Clone)]
pub struct SharedVar {
    pub name: String,
    pub align: u32,
    /// Size in bytes (element size x count); 0 for `.extern` (dynamic shared memory).
    pub size: u64,
    pub is_extern: bool,
}

/// One `.entry` (a kernel).
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub params: Vec<Param>,
    /// Register declarations, in order: `.reg .b32 %r<19>;` gives prefix "%r", count 19
    /// (registers %r0..%r18); `.reg .f32 %f;` (no count) gives count 0 and `single` true.
    pub regs: Vec<RegDecl>,
    /// `.maxntid x, y, z` (`__launch_bounds__`), `.reqntid`, `.minnctapersm`.
    pub maxntid: Option<[u32; 3]>,
    pub reqntid: Option<[u32; 3]>,
    pub minnctapersm: Option<u32>,
    /// `.local` arrays declared inside the entry (`__local_depot`): name, align, size bytes.
    pub locals: Vec<SharedVar>,
    /// `.shared` declared inside the entry body (rare; same meaning as module scope).
    pub shared: Vec<SharedVar>,
    pub body: Vec<Stmt>,
    /// Line number of the `.entry` in the PTX text (1-based).
    pub line: u32,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    /// Type as written without the dot: "u64", "u32", "f32", "b8", ...
    pub ty: String,
    /// Bytes: element size x array count (`.param .align 8 .b8 p[24]` is 24).
    pub size: u32,
    /// `.align` if given, else the element size.
    pub align: u32,
}

#[derive(Debug, Clone)]
pub struct RegDecl {
    /// Type without the dot: "pred", "b16", "b32", "b64", "f32", "f64", "u32", ...
    pub ty: String,
    /// "%r" for `%r<19>`, or the whole name for a single register.
    pub prefix: String,
    /// Number of registers for the `<N>` form; None for a single named register.
    pub count: Option<u32>,
}

#[derive(Debug, Clone)]
pub enum Stmt {
    /// `$L__BB0_2:`
    Label(String),
    Inst(Inst),
}

/// One instruction, as written: `@!%p1 ld.global.nc.v4.f32 {%f1,%f2,%f3,%f4}, [%rd5+16];`
/// has guard Some((%p1, negated)), opcode "ld", mods ["global", "nc", "v4", "f32"].
#[derive(Debug, Clone)]
pub struct Inst {
    pub guard: Option<(String, bool)>,
    pub opcode: String,
    /// The dot-separated parts after the opcode, in order, without dots.
    pub mods: Vec<String>,
    pub operands: Vec<Operand>,
    /// 1-based line in the PTX text (for reports).
    pub line: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// `%r5`, `%rd12`, `%p1`, also special registers such as `%tid.x`, `%laneid`
    /// (the name is kept whole, with its dot).
    Reg(String),
    /// `!%p1` where a predicate operand is negated.
    NotReg(String),
    /// Integer literal (decimal, hex `0x..`, octal, negative), as its two's-complement bits.
    Int(i64),
    /// `0fXXXXXXXX`: the f32 bits.
    F32(u32),
    /// `0dXXXXXXXXXXXXXXXX`: the f64 bits.
    F64(u64),
    /// A bare name: a label (`bra $L__BB0_2`), a shared variable or a parameter used as a value.
    Symbol(String),
    /// `[base+offset]`, where base is a register or a symbol (param / shared var) or absent
    /// (`[16]`, an absolute address).
    Addr { base: Option<String>, offset: i64 },
    /// `{%f1, %f2, _}`; `_` is `Operand::Sink`.
    Vector(Vec<Operand>),
    /// `_` (a discarded result).
    Sink,
    /// `%p1|%p2` (setp's pair of destinations).
    PredPair(String, String),
}
