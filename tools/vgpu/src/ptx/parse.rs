//! PTX text to [`Module`]: a hand-written lexer and a recursive-descent parser over the subset
//! of PTX syntax that nvcc emits for kernels (entries, `.reg`/`.local`/`.shared` declarations,
//! labels, guarded instructions and their operands). It knows syntax only: an instruction is
//! an opcode, its dotted modifiers and its operands; `exec::decode` gives them meaning.
//!
//! Inline asm (`asm("{ .reg .b16 t; ... }")`) produces nested `{ ... }` blocks in an entry's
//! body that may declare their own registers. As [`Entry::regs`] is one flat list, a register
//! declared in a nested block is renamed `NAME$sN` (N: a counter unique within the entry,
//! e.g. `%t$s1`, and `%r<3>` in block 2 becomes `%r0$s2`, `%r1$s2`, `%r2$s2`), declared as
//! single registers in `regs`, and every use of it inside that block is renamed alike.
//!
//! Module-scope `.global`/`.const` variables are skipped (the IR has no place for them): an
//! instruction that uses one refers to a symbol that `decode` does not know.

use super::{Entry, Inst, Module, Operand, Param, RegDecl, SharedVar, Stmt};

/// Parses one PTX text. Errors name the 1-based line and quote it.
pub fn parse(text: &str) -> Result<Module, String> {
    let mut p = Parser {
        lx: Lexer {
            s: text.as_bytes(),
            pos: 0,
            line: 1,
        },
        text,
    };
    p.module()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok<'a> {
    /// A run of `[A-Za-z0-9_$%.]`: directives (`.reg`), opcodes with modifiers
    /// (`ld.global.u32`), registers (`%tid.x`), names, numbers (`0x1F`, `0f3F800000`, `9.0`).
    Word(&'a str),
    /// Any other single character: `{ } ( ) [ ] , ; : @ ! | + - < > =`.
    Punct(u8),
    /// A `"..."` string, without the quotes.
    Str(&'a str),
    Eof,
}

struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
    line: u32,
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'%' | b'.')
}

impl<'a> Lexer<'a> {
    /// Skips whitespace and comments (counting lines).
    fn skip_space(&mut self) {
        let s = self.s;
        while self.pos < s.len() {
            match s[self.pos] {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'/' if s.get(self.pos + 1) == Some(&b'/') => {
                    while self.pos < s.len() && s[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                b'/' if s.get(self.pos + 1) == Some(&b'*') => {
                    self.pos += 2;
                    while self.pos < s.len() && !(s[self.pos] == b'*' && s.get(self.pos + 1) == Some(&b'/')) {
                        self.line += (s[self.pos] == b'\n') as u32;
                        self.pos += 1;
                    }
                    self.pos = (self.pos + 2).min(s.len());
                }
                _ => return,
            }
        }
    }

    /// The next token and the line it starts on.
    fn next(&mut self) -> (Tok<'a>, u32) {
        self.skip_space();
        let (s, start, line) = (self.s, self.pos, self.line);
        let Some(&c) = s.get(start) else {
            return (Tok::Eof, line);
        };
        let tok = if is_word(c) {
            while self.pos < s.len() && is_word(s[self.pos]) {
                self.pos += 1;
            }
            Tok::Word(self.str(start, self.pos))
        } else if c == b'"' {
            self.pos += 1;
            while self.pos < s.len() && s[self.pos] != b'"' && s[self.pos] != b'\n' {
                self.pos += 1;
            }
            let t = Tok::Str(self.str(start + 1, self.pos));
            self.pos = (self.pos + 1).min(s.len());
            t
        } else {
            self.pos += 1;
            Tok::Punct(c)
        };
        (tok, line)
    }

    fn str(&self, a: usize, b: usize) -> &'a str {
        // Words and strings are split at ASCII bytes, so both ends are char boundaries.
        std::str::from_utf8(&self.s[a..b]).unwrap_or("")
    }

    fn peek(&mut self) -> Tok<'a> {
        let (pos, line) = (self.pos, self.line);
        let t = self.next().0;
        (self.pos, self.line) = (pos, line);
        t
    }

    /// Skips to the end of the current line (for `.loc`/`.file`, which end without `;`).
    fn skip_line(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos] != b'\n' {
            self.pos += 1;
        }
    }
}

/// A nested `{ }` block inside an entry body and the registers it declares.
struct Scope {
    id: u32,
    singles: Vec<String>,
    /// `%r<N>` declarations: (prefix, N).
    ranges: Vec<(String, u32)>,
}

struct Parser<'a> {
    lx: Lexer<'a>,
    text: &'a str,
}

/// Bytes of a PTX fundamental type given without the dot.
fn type_size(ty: &str) -> Option<u32> {
    Some(match ty {
        "b8" | "u8" | "s8" | "pred" => 1,
        "b16" | "u16" | "s16" | "f16" | "bf16" => 2,
        "b32" | "u32" | "s32" | "f32" | "f16x2" | "bf16x2" | "tf32" => 4,
        "b64" | "u64" | "s64" | "f64" => 8,
        "b128" => 16,
        _ => return None,
    })
}

impl<'a> Parser<'a> {
    fn err(&self, line: u32, msg: impl std::fmt::Display) -> String {
        let src = self.text.lines().nth(line.saturating_sub(1) as usize).unwrap_or("").trim();
        format!("PTX line {line}: {msg}: `{src}`")
    }

    fn next(&mut self) -> (Tok<'a>, u32) {
        self.lx.next()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        match self.next() {
            (Tok::Punct(p), _) if p == c => Ok(()),
            (t, line) => Err(self.err(line, format!("expected `{}`, found {}", c as char, show(t)))),
        }
    }

    fn word(&mut self, what: &str) -> Result<(&'a str, u32), String> {
        match self.next() {
            (Tok::Word(w), line) => Ok((w, line)),
            (t, line) => Err(self.err(line, format!("expected {what}, found {}", show(t)))),
        }
    }

    fn uint(&mut self, what: &str) -> Result<u32, String> {
        let (w, line) = self.word(what)?;
        match parse_number(w) {
            Some(Operand::Int(v)) if (0..=u32::MAX as i64).contains(&v) => Ok(v as u32),
            _ => Err(self.err(line, format!("expected {what}, found `{w}`"))),
        }
    }

    /// Consumes `c` if it is next.
    fn eat(&mut self, c: u8) -> bool {
        if self.lx.peek() == Tok::Punct(c) {
            self.lx.next();
            true
        } else {
            false
        }
    }

    /// Skips to and past the next `;` at brace depth 0 (for initialisers `= { ... }`).
    fn skip_stmt(&mut self) -> Result<(), String> {
        let mut depth = 0i32;
        loop {
            match self.next() {
                (Tok::Punct(b'{'), _) => depth += 1,
                (Tok::Punct(b'}'), _) => depth -= 1,
                (Tok::Punct(b';'), _) if depth <= 0 => return Ok(()),
                (Tok::Eof, line) => return Err(self.err(line, "unexpected end of text (missing `;`)")),
                _ => {}
            }
        }
    }

    fn module(&mut self) -> Result<Module, String> {
        let mut m = Module::default();
        let mut is_extern = false;
        loop {
            let (tok, line) = self.next();
            let w = match tok {
                Tok::Eof => return Ok(m),
                Tok::Word(w) => w,
                t => return Err(self.err(line, format!("unexpected {} at module scope", show(t)))),
            };
            match w {
                ".version" => {
                    let (v, vl) = self.word("a version")?;
                    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
                    m.version = match (a.parse(), b.parse()) {
                        (Ok(a), Ok(b)) => (a, b),
                        _ => return Err(self.err(vl, format!("bad .version `{v}`"))),
                    };
                }
                ".target" => {
                    m.target = self.word("a target")?.0.to_string();
                    while self.eat(b',') {
                        self.word("a target option")?;
                    }
                }
                ".address_size" => {
                    let bits = self.uint("an address size")?;
                    if bits != 64 {
                        return Err(self.err(line, "only .address_size 64 is supported"));
                    }
                }
                ".visible" | ".weak" | ".common" => continue,
                ".extern" => {
                    is_extern = true;
                    continue;
                }
                ".entry" => m.entries.push(self.entry(line)?),
                ".func" => {
                    let name = self.lx.peek();
                    return Err(self.err(
                        line,
                        format!(
                            "device function {} (`.func`): not supported, only kernels (`.entry`) whose calls nvcc inlined",
                            show(name)
                        ),
                    ));
                }
                ".shared" => m.shared.push(self.var(line, is_extern)?),
                // Not representable in the IR: skipped (see the module docs).
                ".global" | ".const" => self.skip_stmt()?,
                ".pragma" => self.skip_stmt()?,
                ".file" | ".loc" => self.lx.skip_line(),
                _ => return Err(self.err(line, format!("unexpected `{w}` at module scope"))),
            }
            is_extern = false;
        }
    }

    /// A variable after its state space (`.shared`, `.local`): `[.align N] [.vN] .type name[[N]]
    /// [= init];`.
    fn var(&mut self, line: u32, is_extern: bool) -> Result<SharedVar, String> {
        let (mut align, mut elem, mut vec) = (None, None, 1);
        let name = loop {
            let (w, wl) = self.word("a variable declaration")?;
            match w {
                ".align" => align = Some(self.uint("an alignment")?),
                ".v2" | ".v4" | ".v8" => vec = w[2..].parse().unwrap_or(1),
                _ if w.starts_with('.') => elem = Some(type_size(&w[1..]).ok_or_else(|| self.err(wl, format!("unknown type `{w}`")))?),
                _ => break w,
            }
        };
        let elem = elem.ok_or_else(|| self.err(line, format!("variable `{name}` has no type")))? * vec;
        let mut size = elem as u64;
        if self.eat(b'[') {
            if self.eat(b']') {
                size = 0;
            } else {
                size *= self.uint("an array length")? as u64;
                self.expect(b']')?;
            }
        }
        if self.eat(b'=') {
            return Err(self.err(line, format!("initialised variable `{name}`: not supported in this state space")));
        }
        self.expect(b';')?;
        Ok(SharedVar {
            name: name.to_string(),
            align: align.unwrap_or(elem),
            size: if is_extern { 0 } else { size },
            is_extern,
        })
    }

    /// `.entry name ( params ) directives { body }`; the `.entry` word is consumed.
    fn entry(&mut self, line: u32) -> Result<Entry, String> {
        let name = self.word("the entry's name")?.0.to_string();
        let mut e = Entry {
            name,
            params: Vec::new(),
            regs: Vec::new(),
            maxntid: None,
            reqntid: None,
            minnctapersm: None,
            locals: Vec::new(),
            shared: Vec::new(),
            body: Vec::new(),
            line,
        };
        if self.eat(b'(') && !self.eat(b')') {
            loop {
                e.params.push(self.param()?);
                match self.next() {
                    (Tok::Punct(b','), _) => {}
                    (Tok::Punct(b')'), _) => break,
                    (t, l) => return Err(self.err(l, format!("expected `,` or `)` in the parameter list, found {}", show(t)))),
                }
            }
        }
        // Performance directives up to the body.
        loop {
            let (tok, l) = self.next();
            match tok {
                Tok::Punct(b'{') => break,
                Tok::Word(".maxntid") => e.maxntid = Some(self.dims()?),
                Tok::Word(".reqntid") => e.reqntid = Some(self.dims()?),
                Tok::Word(".minnctapersm") => e.minnctapersm = Some(self.uint("a number")?),
                Tok::Word(".maxnreg" | ".maxnctapersm" | ".maxclusterrank") => {
                    self.uint("a number")?;
                }
                Tok::Word(".reqnctapercluster") => {
                    self.dims()?;
                }
                Tok::Word(".noreturn" | ".explicitcluster") => {}
                Tok::Word(".pragma") => self.skip_stmt()?,
                t => return Err(self.err(l, format!("expected a performance directive or `{{`, found {}", show(t)))),
            }
        }
        self.body(&mut e)?;
        Ok(e)
    }

    /// `.param [.align N] [.ptr .space .align N] .type name[[N]]`.
    fn param(&mut self) -> Result<Param, String> {
        let (w, line) = self.word("`.param`")?;
        if w != ".param" {
            return Err(self.err(line, format!("expected `.param`, found `{w}`")));
        }
        let (mut align, mut ty) = (None, None);
        let name = loop {
            let (w, wl) = self.word("a parameter declaration")?;
            match w {
                // `.align` alone sets the parameter's alignment; after `.ptr` it is the
                // pointee's, which does not matter here.
                ".align" => {
                    let a = self.uint("an alignment")?;
                    align.get_or_insert(a);
                }
                ".ptr" => align = align.or(Some(0)),
                ".global" | ".shared" | ".const" | ".local" => {}
                _ if w.starts_with('.') => {
                    let size = type_size(&w[1..]).ok_or_else(|| self.err(wl, format!("unknown parameter type `{w}`")))?;
                    ty = Some((&w[1..], size));
                }
                _ => break w,
            }
        };
        let (ty, elem) = ty.ok_or_else(|| self.err(line, format!("parameter `{name}` has no type")))?;
        let mut size = elem;
        if self.eat(b'[') {
            size *= self.uint("an array length")?;
            self.expect(b']')?;
        }
        let align = match align {
            Some(a) if a > 0 => a,
            _ => elem,
        };
        Ok(Param {
            name: name.to_string(),
            ty: ty.to_string(),
            size,
            align,
        })
    }

    /// `x[, y[, z]]` (missing dimensions are 1).
    fn dims(&mut self) -> Result<[u32; 3], String> {
        let mut d = [1u32; 3];
        for (i, v) in d.iter_mut().enumerate() {
            if i > 0 && !self.eat(b',') {
                break;
            }
            *v = self.uint("a dimension")?;
        }
        Ok(d)
    }

    /// The statements of an entry body, after its `{`, through the matching `}`.
    fn body(&mut self, e: &mut Entry) -> Result<(), String> {
        let mut scopes: Vec<Scope> = Vec::new();
        let mut next_scope = 0u32;
        loop {
            let (tok, line) = self.next();
            match tok {
                Tok::Punct(b'{') => {
                    next_scope += 1;
                    scopes.push(Scope {
                        id: next_scope,
                        singles: Vec::new(),
                        ranges: Vec::new(),
                    });
                }
                Tok::Punct(b'}') => {
                    if scopes.pop().is_none() {
                        return Ok(());
                    }
                }
                Tok::Punct(b'@') => {
                    let neg = self.eat(b'!');
                    let (p, pl) = self.word("a guard predicate")?;
                    if p.starts_with('.') || p.as_bytes()[0].is_ascii_digit() {
                        return Err(self.err(pl, format!("bad guard `{p}`")));
                    }
                    let guard = Some((rename(&scopes, p), neg));
                    let (op, ol) = self.word("an opcode")?;
                    e.body.push(Stmt::Inst(self.inst(op, ol, guard, &scopes)?));
                }
                Tok::Word(".reg") => self.reg_decl(e, scopes.last_mut())?,
                Tok::Word(".local") => {
                    let v = self.var(line, false)?;
                    e.locals.push(v);
                }
                Tok::Word(".shared") => {
                    let v = self.var(line, false)?;
                    e.shared.push(v);
                }
                Tok::Word(".pragma") => self.skip_stmt()?,
                Tok::Word(".loc" | ".file") => self.lx.skip_line(),
                Tok::Word(w) if w.starts_with('.') => return Err(self.err(line, format!("unsupported directive `{w}` in an entry body"))),
                Tok::Word(w) => {
                    if self.eat(b':') {
                        e.body.push(Stmt::Label(w.to_string()));
                    } else {
                        e.body.push(Stmt::Inst(self.inst(w, line, None, &scopes)?));
                    }
                }
                Tok::Eof => return Err(self.err(line, format!("end of text inside the body of `{}`", e.name))),
                t => return Err(self.err(line, format!("unexpected {}", show(t)))),
            }
        }
    }

    /// `.reg .type %r<N>;` or `.reg .type a, b;` (`.reg` consumed). In a nested block the
    /// registers are renamed and declared one by one (see the module docs).
    fn reg_decl(&mut self, e: &mut Entry, scope: Option<&mut Scope>) -> Result<(), String> {
        let mut ty = None;
        let mut names: Vec<(&'a str, Option<u32>)> = Vec::new();
        loop {
            let (w, _) = self.word("a register declaration")?;
            if let Some(t) = w.strip_prefix('.') {
                // `.v2 .b32` would also land here: the last type wins.
                ty = Some(t);
                continue;
            }
            let count = if self.eat(b'<') {
                let n = self.uint("a register count")?;
                self.expect(b'>')?;
                Some(n)
            } else {
                None
            };
            names.push((w, count));
            match self.next() {
                (Tok::Punct(b','), _) => {}
                (Tok::Punct(b';'), _) => break,
                (t, l) => return Err(self.err(l, format!("expected `,` or `;`, found {}", show(t)))),
            }
        }
        let ty = ty.unwrap_or("b32").to_string();
        match scope {
            None => {
                for (name, count) in names {
                    e.regs.push(RegDecl {
                        ty: ty.clone(),
                        prefix: name.to_string(),
                        count,
                    });
                }
            }
            Some(s) => {
                for (name, count) in names {
                    match count {
                        None => {
                            e.regs.push(RegDecl {
                                ty: ty.clone(),
                                prefix: format!("{name}$s{}", s.id),
                                count: None,
                            });
                            s.singles.push(name.to_string());
                        }
                        Some(n) => {
                            for i in 0..n {
                                e.regs.push(RegDecl {
                                    ty: ty.clone(),
                                    prefix: format!("{name}{i}$s{}", s.id),
                                    count: None,
                                });
                            }
                            s.ranges.push((name.to_string(), n));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// An instruction after its opcode word, through its `;`.
    fn inst(&mut self, op: &'a str, line: u32, guard: Option<(String, bool)>, scopes: &[Scope]) -> Result<Inst, String> {
        let mut parts = op.split('.');
        let opcode = parts.next().unwrap_or("").to_string();
        if opcode.is_empty() || opcode.as_bytes()[0].is_ascii_digit() || opcode.starts_with('%') {
            return Err(self.err(line, format!("expected an instruction, found `{op}`")));
        }
        let mods = parts.map(str::to_string).collect();
        let mut operands = Vec::new();
        if !self.eat(b';') {
            loop {
                operands.push(self.operand(scopes)?);
                match self.next() {
                    (Tok::Punct(b','), _) => {}
                    (Tok::Punct(b';'), _) => break,
                    (t, l) => return Err(self.err(l, format!("expected `,` or `;` after an operand, found {}", show(t)))),
                }
            }
        }
        Ok(Inst {
            guard,
            opcode,
            mods,
            operands,
            line,
        })
    }

    fn operand(&mut self, scopes: &[Scope]) -> Result<Operand, String> {
        let (tok, line) = self.next();
        Ok(match tok {
            Tok::Punct(b'[') => {
                let (mut base, mut offset) = (None, 0i64);
                let (w, wl) = self.word("an address")?;
                if w.as_bytes()[0].is_ascii_digit() {
                    offset = self.int(w, wl)?;
                } else {
                    base = Some(if w.starts_with('%') { rename(scopes, w) } else { w.to_string() });
                    if self.eat(b'+') {
                        let neg = self.eat(b'-');
                        let (n, nl) = self.word("an offset")?;
                        offset = self.int(n, nl)?;
                        if neg {
                            offset = offset.wrapping_neg();
                        }
                    } else if self.eat(b'-') {
                        let (n, nl) = self.word("an offset")?;
                        offset = self.int(n, nl)?.wrapping_neg();
                    }
                }
                self.expect(b']')?;
                Operand::Addr { base, offset }
            }
            Tok::Punct(b'{') => {
                let mut v = Vec::new();
                loop {
                    v.push(self.operand(scopes)?);
                    match self.next() {
                        (Tok::Punct(b','), _) => {}
                        (Tok::Punct(b'}'), _) => break,
                        (t, l) => return Err(self.err(l, format!("expected `,` or `}}` in a vector, found {}", show(t)))),
                    }
                }
                Operand::Vector(v)
            }
            Tok::Punct(b'!') => {
                let (w, _) = self.word("a predicate")?;
                Operand::NotReg(rename(scopes, w))
            }
            Tok::Punct(b'-') => {
                let (w, wl) = self.word("a number")?;
                match parse_number(w) {
                    Some(Operand::Int(v)) => Operand::Int(v.wrapping_neg()),
                    Some(Operand::F64(b)) if w.contains('.') => Operand::F64(b ^ (1 << 63)),
                    _ => return Err(self.err(wl, format!("bad number `-{w}`"))),
                }
            }
            Tok::Word("_") => Operand::Sink,
            // Registers; inline asm's scoped registers may lack the `%`.
            Tok::Word(w) if w.starts_with('%') || scoped(scopes, w).is_some() => {
                let r = rename(scopes, w);
                if self.eat(b'|') {
                    let (q, _) = self.word("a second predicate")?;
                    Operand::PredPair(r, rename(scopes, q))
                } else {
                    Operand::Reg(r)
                }
            }
            Tok::Word(w) if w.as_bytes()[0].is_ascii_digit() => {
                parse_number(w).ok_or_else(|| self.err(line, format!("bad number `{w}`")))?
            }
            Tok::Word(w) => Operand::Symbol(w.to_string()),
            t => return Err(self.err(line, format!("expected an operand, found {}", show(t)))),
        })
    }

    fn int(&self, w: &str, line: u32) -> Result<i64, String> {
        match parse_number(w) {
            Some(Operand::Int(v)) => Ok(v),
            _ => Err(self.err(line, format!("expected an integer, found `{w}`"))),
        }
    }
}

/// A register's name after scoped renaming (the innermost nested block declaring it wins).
fn rename(scopes: &[Scope], name: &str) -> String {
    scoped(scopes, name).unwrap_or_else(|| name.to_string())
}

/// `NAME$sN` if a nested block declares `name`.
fn scoped(scopes: &[Scope], name: &str) -> Option<String> {
    for s in scopes.iter().rev() {
        let ranged = || {
            s.ranges.iter().any(|(p, n)| {
                name.strip_prefix(p.as_str())
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()) && d.parse::<u32>().is_ok_and(|i| i < *n))
            })
        };
        if s.singles.iter().any(|x| x == name) || ranged() {
            return Some(format!("{name}$s{}", s.id));
        }
    }
    None
}

/// An integer (`42`, `0x2A`, `052`, `0b101`, with an optional `U` suffix; decimals beyond
/// i64 wrap as u64), `0fXXXXXXXX` (f32 bits), `0dXXXXXXXXXXXXXXXX` (f64 bits), or a decimal
/// float such as `1.5` (an f64, as PTX types it).
fn parse_number(w: &str) -> Option<Operand> {
    let b = w.as_bytes();
    if b.len() > 2 && b[0] == b'0' {
        match b[1] {
            b'f' | b'F' if b.len() == 10 => return u32::from_str_radix(&w[2..], 16).ok().map(Operand::F32),
            b'd' | b'D' if b.len() == 18 => return u64::from_str_radix(&w[2..], 16).ok().map(Operand::F64),
            _ => {}
        }
    }
    if w.contains('.') || ((w.contains('e') || w.contains('E')) && !w.starts_with("0x") && !w.starts_with("0X")) {
        return w.parse::<f64>().ok().map(|f| Operand::F64(f.to_bits()));
    }
    let digits = w.strip_suffix(['U', 'u']).unwrap_or(w);
    let (radix, d) = if let Some(h) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, h)
    } else if let Some(bin) = digits.strip_prefix("0b").or_else(|| digits.strip_prefix("0B")) {
        (2, bin)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    u64::from_str_radix(d, radix).ok().map(|v| Operand::Int(v as i64))
}

fn show(t: Tok) -> String {
    match t {
        Tok::Word(w) => format!("`{w}`"),
        Tok::Punct(c) => format!("`{}`", c as char),
        Tok::Str(s) => format!("\"{s}\""),
        Tok::Eof => "the end of the text".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Representative syntax from nvcc's output for the project's kernels.
    const SAMPLE: &str = r#"//
// Generated by NVIDIA NVVM Compiler
/* a block
   comment */
.version 9.0
.target sm_90
.address_size 64

	// .globl	k1
.extern .shared .align 16 .b8 smem[];
	.shared .align 4 .b8 _ZZ2k1E3red[4096];
.shared .align 4 .b32 words[10];
.shared .f32 one;
.visible .global .align 4 .b8 table[8] = {1, 2, 3, 4, 5, 6, 7, 8};

.visible .entry k1(
	.param .u64 k1_param_0,
	.param .align 8 .b8 k1_param_1[24],
	.param .f32 k1_param_2
)
.maxntid 128, 1, 1
.minnctapersm 3
{
	.local .align 4 .b8 	__local_depot0[32];
	.reg .pred 	%p<21>;
	.reg .b16 	%rs<3>;
	.reg .b32 	%r<77>;
	.reg .f32 	%f<9>;
	.reg .b64 	%rd<13>;
	.reg .f64 	%fd<2>;

	ld.param.u64 	%rd1, [k1_param_0];
	ld.param.u32 	%r2, [k1_param_1+16];
	mov.u32 	%r1, %tid.x;
	mov.u32 	%r3, smem;
	mov.u64 	%rd2, k1_param_0;
	setp.ge.u32 	%p1, %r1, 0x1F;
	@%p1 bra 	$L__BB0_2;
$L__BB0_2:
	@!%p1 ld.global.nc.v4.f32 	{%f1, %f2, %f3, %f4}, [%rd5+16];
	st.global.f32 	[%rd1+-16], %f1;
	mov.f32 	%f5, 0f3F800000;
	mov.f64 	%fd1, 0d3FF0000000000000;
	add.s32 	%r4, %r1, -1;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1,%f2,%f3,%f4}, {%r1,%r2,%r3,%r4}, {%r5,%r6}, {%f5,%f6,%f7,%f8};
	{ cvt.rn.bf16x2.f32 %r5, %f2, %f3;}
	ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r10, %r11, %r12, %r13}, [%r14];
	cp.async.cg.shared.global [%r1], [%rd2], 16, %r3;
	cp.async.wait_group 1;
	shfl.sync.bfly.b32 	%r6|%p2, %r7, 16, 31, -1;
	shfl.sync.bfly.b32 	%r8, %r7, 16, 31, -1;
	atom.global.add.v2.f32 	{%f1, %f2}, [%rd1], {%f3, %f4};
	mov.b32 	{%rs1, %rs2}, %r1;
	mov.b64 {%r1,%r2}, %fd1;
	ld.shared.u32 	%r9, [smem+128];
	ld.shared.u32 	%r9, [_ZZ2k1E3red];
	st.local.u32 	[%rd3], _;
	.pragma "nounroll";
	bar.sync 	0;
	{
	.reg .b16 %tmp;
	.reg .pred p;
	.reg .b32 %r<2>;
	mov.b32 {%tmp, %rs1}, %r1;
	setp.ne.b16 p, %tmp, 0;
	@p add.u32 %r1, %r0, 7U;
	}
	mov.u32 %r1, %r1;
	ret;

}
	// .globl	k2
.visible .entry k2()
.reqntid 32, 2
{
	ret;
}
"#;

    #[test]
    fn ptx_sample_structure() {
        let m = parse(SAMPLE).unwrap();
        assert_eq!(m.version, (9, 0));
        assert_eq!(m.target, "sm_90");
        assert_eq!(m.entries.len(), 2);
        let sh: Vec<_> = m.shared.iter().map(|s| (s.name.as_str(), s.align, s.size, s.is_extern)).collect();
        assert_eq!(
            sh,
            [
                ("smem", 16, 0, true),
                ("_ZZ2k1E3red", 4, 4096, false),
                ("words", 4, 40, false),
                ("one", 4, 4, false)
            ]
        );
        let e = &m.entries[0];
        assert_eq!((e.name.as_str(), e.line), ("k1", 16));
        let ps: Vec<_> = e.params.iter().map(|p| (p.name.as_str(), p.ty.as_str(), p.size, p.align)).collect();
        assert_eq!(
            ps,
            [
                ("k1_param_0", "u64", 8, 8),
                ("k1_param_1", "b8", 24, 8),
                ("k1_param_2", "f32", 4, 4)
            ]
        );
        assert_eq!(e.maxntid, Some([128, 1, 1]));
        assert_eq!(e.minnctapersm, Some(3));
        assert_eq!(e.reqntid, None);
        assert_eq!(e.locals.len(), 1);
        assert_eq!(
            (e.locals[0].name.as_str(), e.locals[0].align, e.locals[0].size),
            ("__local_depot0", 4, 32)
        );
        assert_eq!(
            (e.regs[0].ty.as_str(), e.regs[0].prefix.as_str(), e.regs[0].count),
            ("pred", "%p", Some(21))
        );
        assert_eq!(
            (e.regs[2].ty.as_str(), e.regs[2].prefix.as_str(), e.regs[2].count),
            ("b32", "%r", Some(77))
        );
        let k2 = &m.entries[1];
        assert_eq!(
            (k2.name.as_str(), k2.params.len(), k2.reqntid, k2.maxntid),
            ("k2", 0, Some([32, 2, 1]), None)
        );
        assert_eq!(k2.body.len(), 1);
    }

    fn insts(e: &Entry) -> Vec<&Inst> {
        e.body
            .iter()
            .filter_map(|s| if let Stmt::Inst(i) = s { Some(i) } else { None })
            .collect()
    }

    fn reg(s: &str) -> Operand {
        Operand::Reg(s.into())
    }

    #[test]
    fn ptx_sample_instructions() {
        use Operand::*;
        let m = parse(SAMPLE).unwrap();
        let e = &m.entries[0];
        let i = insts(e);
        let find = |op: &str, line: u32| *i.iter().find(|x| x.opcode == op && x.line == line).unwrap();
        let ld = find("ld", 32);
        assert_eq!(ld.mods, ["param", "u64"]);
        assert_eq!(
            ld.operands,
            [
                reg("%rd1"),
                Addr {
                    base: Some("k1_param_0".into()),
                    offset: 0
                }
            ]
        );
        assert_eq!(
            find("ld", 33).operands[1],
            Addr {
                base: Some("k1_param_1".into()),
                offset: 16
            }
        );
        assert_eq!(find("mov", 34).operands, [reg("%r1"), reg("%tid.x")]);
        assert_eq!(find("mov", 35).operands[1], Symbol("smem".into()));
        assert_eq!(find("mov", 36).operands[1], Symbol("k1_param_0".into()));
        assert_eq!(find("setp", 37).operands[2], Int(31));
        let bra = find("bra", 38);
        assert_eq!(
            (bra.guard.clone(), bra.operands.clone()),
            (Some(("%p1".into(), false)), vec![Symbol("$L__BB0_2".into())])
        );
        assert!(matches!(&e.body[7], Stmt::Label(l) if l == "$L__BB0_2"));
        let ldv = find("ld", 40);
        assert_eq!(ldv.guard, Some(("%p1".into(), true)));
        assert_eq!(ldv.mods, ["global", "nc", "v4", "f32"]);
        assert_eq!(ldv.operands[0], Vector(vec![reg("%f1"), reg("%f2"), reg("%f3"), reg("%f4")]));
        assert_eq!(
            ldv.operands[1],
            Addr {
                base: Some("%rd5".into()),
                offset: 16
            }
        );
        assert_eq!(
            find("st", 41).operands[0],
            Addr {
                base: Some("%rd1".into()),
                offset: -16
            }
        );
        assert_eq!(find("mov", 42).operands[1], F32(0x3F80_0000));
        assert_eq!(find("mov", 43).operands[1], F64(1f64.to_bits()));
        assert_eq!(find("add", 44).operands[2], Int(-1));
        let mma = find("mma", 45);
        assert_eq!(mma.mods.join("."), "sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
        assert_eq!(mma.operands.len(), 4);
        assert_eq!(mma.operands[2], Vector(vec![reg("%r5"), reg("%r6")]));
        let cvt = find("cvt", 46);
        assert_eq!((cvt.mods.join("."), cvt.operands.len()), ("rn.bf16x2.f32".into(), 3));
        assert_eq!(
            find("ldmatrix", 47).mods,
            ["sync", "aligned", "m8n8", "x4", "trans", "shared", "b16"]
        );
        let cp = find("cp", 48);
        assert_eq!(cp.mods, ["async", "cg", "shared", "global"]);
        assert_eq!(
            cp.operands,
            [
                Addr {
                    base: Some("%r1".into()),
                    offset: 0
                },
                Addr {
                    base: Some("%rd2".into()),
                    offset: 0
                },
                Int(16),
                reg("%r3")
            ]
        );
        assert_eq!(
            (find("cp", 49).mods.clone(), find("cp", 49).operands.clone()),
            (vec!["async".into(), "wait_group".into()], vec![Int(1)])
        );
        assert_eq!(find("shfl", 50).operands[0], PredPair("%r6".into(), "%p2".into()));
        assert_eq!(find("shfl", 50).operands[4], Int(-1));
        assert_eq!(find("shfl", 51).operands[0], reg("%r8"));
        let atom = find("atom", 52);
        assert_eq!(atom.operands[2], Vector(vec![reg("%f3"), reg("%f4")]));
        assert_eq!(find("mov", 53).operands[0], Vector(vec![reg("%rs1"), reg("%rs2")]));
        assert_eq!(find("mov", 54).operands[0], Vector(vec![reg("%r1"), reg("%r2")]));
        assert_eq!(
            find("ld", 55).operands[1],
            Addr {
                base: Some("smem".into()),
                offset: 128
            }
        );
        assert_eq!(find("st", 57).operands[1], Sink);
        assert_eq!(find("bar", 59).operands, [Int(0)]);
        assert_eq!(find("ret", 69).operands, []);
    }

    #[test]
    fn ptx_scoped_registers_are_renamed() {
        use Operand::*;
        let m = parse(SAMPLE).unwrap();
        let e = &m.entries[0];
        let i = insts(e);
        let find = |op: &str, line: u32| *i.iter().find(|x| x.opcode == op && x.line == line).unwrap();
        // Block 1 is the one-line `{ cvt ... }`, block 2 declares registers.
        let names: Vec<_> = e.regs.iter().skip(6).map(|r| (r.ty.as_str(), r.prefix.as_str(), r.count)).collect();
        assert_eq!(
            names,
            [
                ("b16", "%tmp$s2", None),
                ("pred", "p$s2", None),
                ("b32", "%r0$s2", None),
                ("b32", "%r1$s2", None)
            ]
        );
        assert_eq!(find("mov", 64).operands, [Vector(vec![reg("%tmp$s2"), reg("%rs1")]), reg("%r1$s2")]);
        assert_eq!(find("setp", 65).operands[0], reg("p$s2"));
        let add = find("add", 66);
        assert_eq!(add.guard, Some(("p$s2".into(), false)));
        assert_eq!(add.operands, [reg("%r1$s2"), reg("%r0$s2"), Int(7)]);
        // After the block, `%r1` is the entry's again.
        assert_eq!(find("mov", 68).operands, [reg("%r1"), reg("%r1")]);
    }

    #[test]
    fn ptx_numbers() {
        assert_eq!(parse_number("0x1F"), Some(Operand::Int(31)));
        assert_eq!(parse_number("0XffffffffU"), Some(Operand::Int(0xffff_ffff)));
        assert_eq!(parse_number("010"), Some(Operand::Int(8)));
        assert_eq!(parse_number("0"), Some(Operand::Int(0)));
        assert_eq!(parse_number("18446744073709551615"), Some(Operand::Int(-1)));
        assert_eq!(parse_number("0fBF800000"), Some(Operand::F32(0xBF80_0000)));
        assert_eq!(parse_number("1.5"), Some(Operand::F64(1.5f64.to_bits())));
        assert_eq!(parse_number("12ab"), None);
    }

    #[test]
    fn ptx_errors_name_line_and_text() {
        let bad = ".version 9.0\n.target sm_90\n.address_size 64\n.visible .entry k()\n{\n\tadd.s32 %r1, %r2 %r3;\n}\n";
        let e = parse(bad).unwrap_err();
        assert!(e.contains("line 6") && e.contains("add.s32 %r1, %r2 %r3;"), "{e}");
        let e = parse(".version 9.0\n.entry k(\n.param .q32 x\n)\n{\n}\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains(".q32"), "{e}");
        let e = parse(".version 9.0\n.entry k()\n{\n\tret;\n").unwrap_err();
        assert!(e.contains("end of text"), "{e}");
        let e = parse(".func f()\n{\n}\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains(".func"), "{e}");
    }

    /// nvcc: `NVCC`, else the project's pinned toolchain.
    fn nvcc() -> Option<std::path::PathBuf> {
        if let Some(p) = std::env::var_os("NVCC") {
            return Some(p.into());
        }
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.toolchain/cuda/nvidia/cu13/bin/nvcc");
        p.is_file().then_some(p)
    }

    /// Compiles every project kernel to PTX (as `nvcc -ptx -arch=compute_90 -O3`) and parses it.
    #[test]
    fn ptx_parses_every_project_kernel() {
        let Some(nvcc) = nvcc() else {
            eprintln!("skipped: no nvcc (set NVCC or run tools/install-cuda-toolchain.sh)");
            return;
        };
        let kdir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
        let out = std::env::temp_dir().join(format!("vgpu-ptx-test-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        // The kernels include the header build.rs generates from the project's contract.
        std::fs::write(out.join("contract.cuh"), mlvpt::contract::c_header()).unwrap();
        // Entry points per kernel file, from the list build.rs checks against nvcc.
        let listed = std::fs::read_to_string(kdir.join("entries.txt")).unwrap();
        let mut expect: Vec<(String, usize)> = Vec::new();
        for module in listed
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().next())
        {
            match expect.iter_mut().find(|(m, _)| m == module) {
                Some((_, n)) => *n += 1,
                None => expect.push((module.to_string(), 1)),
            }
        }
        assert!(expect.len() >= 10, "kernels/entries.txt lists {} files", expect.len());
        let texts: Vec<(String, String)> = std::thread::scope(|s| {
            let hs: Vec<_> = expect
                .iter()
                .map(|(stem, _)| {
                    let (nvcc, kdir, out) = (&nvcc, &kdir, &out);
                    s.spawn(move || {
                        let ptx = out.join(format!("{stem}.ptx"));
                        let st = std::process::Command::new(nvcc)
                            .args(["-ptx", "-std=c++17", "-O3", "-arch=compute_90", "-I"])
                            .arg(kdir)
                            .arg("-I")
                            .arg(out)
                            .arg("-o")
                            .arg(&ptx)
                            .arg(kdir.join(format!("{stem}.cu")))
                            .status()
                            .expect("run nvcc");
                        assert!(st.success(), "nvcc failed on {stem}.cu");
                        (stem.to_string(), std::fs::read_to_string(&ptx).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let _ = std::fs::remove_dir_all(&out);
        for ((stem, n), (_, text)) in expect.iter().zip(&texts) {
            let t0 = std::time::Instant::now();
            let m = parse(text).unwrap_or_else(|e| panic!("{stem}.ptx: {e}"));
            eprintln!("{stem}.ptx: {} bytes parsed in {:?}", text.len(), t0.elapsed());
            assert_eq!(m.entries.len(), *n, "{stem}.ptx entries");
            assert_eq!(m.target, "sm_90");
            for e in &m.entries {
                assert!(!e.body.is_empty() && !e.regs.is_empty(), "{stem}: {}", e.name);
                assert!(
                    e.body.iter().any(|s| matches!(s, Stmt::Inst(i) if i.opcode == "ret")),
                    "{stem}: {} has a ret",
                    e.name
                );
                // Every register used is declared (scoped ones renamed).
                for s in &e.body {
                    let Stmt::Inst(i) = s else { continue };
                    let mut regs = Vec::new();
                    collect_regs(&i.operands, &mut regs);
                    for r in regs {
                        assert!(declared(e, r), "{stem}:{} undeclared register {r}", i.line);
                    }
                }
            }
            if *stem == "adamw" {
                let e = &m.entries[0];
                // One by-value struct parameter, as the contract lays it out.
                let size = std::mem::size_of::<mlvpt::contract::adamw::AdamWParams>() as u32;
                assert_eq!((e.params[0].size, e.params[0].align, e.params.len()), (size, 8, 1));
                // nvcc declares a kernel's `__shared__` arrays inside its body.
                assert!(e
                    .shared
                    .iter()
                    .any(|s| s.name == "_ZZ15adamw_multi_f32E2ss" && s.size == 264 && s.align == 8));
            }
            if *stem == "attention" {
                // Shapes that nvcc writes, as the interpreter will see them.
                let all: Vec<&Inst> = m.entries.iter().flat_map(insts).collect();
                let has = |f: &dyn Fn(&Inst) -> bool| all.iter().any(|i| f(i));
                assert!(has(&|i| i.opcode == "mma" && i.operands.len() == 4));
                assert!(has(
                    &|i| i.opcode == "ldmatrix" && matches!(&i.operands[0], Operand::Vector(v) if v.len() == 4)
                ));
                assert!(has(&|i| i.opcode == "cp"
                    && i.mods == ["async", "cg", "shared", "global"]
                    && i.operands.len() == 4));
                assert!(has(&|i| i.opcode == "shfl" && matches!(i.operands[0], Operand::PredPair(..))));
                assert!(has(&|i| i.opcode == "cvt" && i.mods == ["rn", "bf16x2", "f32"]));
                assert!(m.shared.iter().any(|s| s.is_extern && s.size == 0));
                assert!(m.entries.iter().any(|e| e.maxntid == Some([128, 1, 1])));
            }
        }
    }

    fn collect_regs<'a>(ops: &'a [Operand], out: &mut Vec<&'a str>) {
        for o in ops {
            match o {
                Operand::Reg(r) | Operand::NotReg(r) if !r.contains('.') && !matches!(r.as_str(), "%laneid" | "%warpid") => out.push(r),
                Operand::PredPair(a, b) => out.extend([a.as_str(), b.as_str()]),
                Operand::Addr { base: Some(b), .. } if b.starts_with('%') => out.push(b),
                Operand::Vector(v) => collect_regs(v, out),
                _ => {}
            }
        }
    }

    fn declared(e: &Entry, r: &str) -> bool {
        e.regs.iter().any(|d| match d.count {
            None => d.prefix == r,
            Some(n) => r
                .strip_prefix(d.prefix.as_str())
                .and_then(|i| i.parse::<u32>().ok())
                .is_some_and(|i| i < n),
        })
    }
}
