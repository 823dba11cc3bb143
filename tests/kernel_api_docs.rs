//! Every public item of the kernel API has rustdoc with an example that runs (issue #16).
//!
//! The kernel API is everything public in `src/gpu/*.rs`, the launchers in `src/ops/*/cuda.rs`
//! and the host/kernel contract `src/contract.rs`. This test reads those files (no GPU, no
//! `cuda` feature needed) and fails, naming file, line and item, for any public item whose doc
//! comment lacks an example block that uses it:
//!
//! - item-level `pub fn|struct|enum|trait|const|static|type|mod` (also `pub const fn`,
//!   `pub unsafe fn`, ...), in the file or in a public inline module, and `pub fn` / `pub const`
//!   inside inherent `impl` blocks of public types;
//! - the constants declared through `shared_consts!` in `src/contract.rs` (each becomes a
//!   `pub const`) and the structs declared through `kernel_params!`;
//! - `pub use` re-exports: one of an item declared in this crate's sources is checked at the
//!   declaration (also outside the scanned files, e.g. `ops::head::HeadKernels`); one of an
//!   external crate's item or of the generated `gpu::kernels` module must carry the example on
//!   the `pub use` itself.
//!
//! Not checked: `pub(crate)`/`pub(super)`/`pub(in ..)` items, `#[doc(hidden)]` and `#[cfg(test)]`
//! items, anything inside a private module, a function body, a trait or a `macro_rules!`
//! definition, fields and variants (documented with their type), and the generated
//! `gpu::kernels` module (build.rs writes it; `cargo doc` checks it renders).
//!
//! An example block is a fenced block the doc tests compile and run: the fence's info string is
//! empty or `rust` (optionally `should_panic` or an edition); `ignore`, `no_run`,
//! `compile_fail`, `text` and other languages do not count. The block must use the item: name it
//! as a word outside its `use` declarations.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of the kernel API, relative to the crate root, in a fixed order.
fn kernel_api_files() -> Vec<PathBuf> {
    let root = root();
    let mut files = Vec::new();
    let mut gpu: Vec<PathBuf> = fs::read_dir(root.join("src/gpu"))
        .expect("src/gpu exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    gpu.sort();
    files.extend(gpu);
    let mut ops: Vec<PathBuf> = fs::read_dir(root.join("src/ops"))
        .expect("src/ops exists")
        .map(|e| e.expect("readable entry").path().join("cuda.rs"))
        .filter(|p| p.is_file())
        .collect();
    ops.sort();
    files.extend(ops);
    files.push(root.join("src/contract.rs"));
    files
        .into_iter()
        .map(|p| p.strip_prefix(&root).expect("under the crate root").to_path_buf())
        .collect()
}

/// A public item found in a source file.
#[derive(Debug, Clone)]
struct Item {
    /// 1-based line of the item's keyword.
    line: usize,
    /// `fn`, `struct`, ..., `const (shared_consts!)`, `use`.
    kind: String,
    name: String,
    /// Inside an `impl` block (of this type).
    in_impl: Option<String>,
    /// Directly in the file, not in an inline module or impl.
    top_level: bool,
    /// The doc comment's lines (without `///`), in order.
    doc: Vec<String>,
    /// `#[doc(hidden)]` or `#[cfg(test)]`.
    hidden: bool,
    /// For `use`: the full re-exported path of each name, `(path segments, exported name)`.
    reexports: Vec<(Vec<String>, String)>,
}

/// What a `{` opened.
#[derive(Debug, Clone, PartialEq)]
enum Ctx {
    /// An inline module; `true` when public.
    Module(bool),
    /// An inherent impl of a public type (`Some(type)`) or anything else we do not look into
    /// (`None`: a trait impl or an impl of a private type).
    Impl(Option<String>),
    /// A `kernel_params!` invocation: its `pub struct` is an item of the enclosing module.
    KernelParams,
    /// A `shared_consts!` invocation: each `NAME: type = value;` is a `pub const`.
    SharedConsts,
    /// Anything else (fn bodies, traits, struct bodies, macro definitions, expressions).
    Opaque,
}

/// `line` with string and char literals blanked and comments removed, so braces and
/// semicolons can be counted. `in_block` carries a `/* */` comment across lines.
fn code_of(line: &str, in_block: &mut bool) -> String {
    let c: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < c.len() {
        if *in_block {
            if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                *in_block = false;
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => break,
            '/' if c.get(i + 1) == Some(&'*') => {
                *in_block = true;
                i += 2;
            }
            '"' => {
                // A string literal (escapes honoured); raw strings of this code base hold no quotes.
                i += 1;
                while i < c.len() && c[i] != '"' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            '\'' => {
                // A char literal ('x', '\n', '\''), else a lifetime.
                if c.get(i + 1) == Some(&'\\') {
                    let mut j = i + 2;
                    while j < c.len() && c[j] != '\'' {
                        j += 1;
                    }
                    i = j + 1;
                    out.push_str("' '");
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 3;
                    out.push_str("' '");
                } else {
                    out.push('\'');
                    i += 1;
                }
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> String {
    s.chars().take_while(|&c| is_ident_char(c) || c == '$').collect()
}

/// Strips a leading visibility: `Some(true)` for plain `pub`, `Some(false)` for a restricted
/// one (`pub(crate)`, ...), `None` without one.
fn strip_vis(s: &str) -> (Option<bool>, &str) {
    if let Some(rest) = s.strip_prefix("pub(") {
        let end = rest.find(')').map_or(rest.len(), |e| e + 1);
        return (Some(false), rest[end..].trim_start());
    }
    if let Some(rest) = s.strip_prefix("pub ") {
        return (Some(true), rest.trim_start());
    }
    (None, s)
}

/// `(kind, name)` of an item header such as `const unsafe fn name<..>(..)`, after its
/// visibility. `impl` and `macro_rules!` are reported as kinds too (name: the impl's type).
fn header(s: &str) -> Option<(String, String)> {
    let mut s = s.trim_start();
    // Qualifiers before the keyword.
    loop {
        let w = ident(s);
        if ["const", "unsafe", "async", "extern", "default"].contains(&w.as_str()) {
            let rest = s[w.len()..].trim_start();
            // `const NAME: T` is a const item, `const fn` a qualifier.
            if w == "const" && !rest.starts_with("fn ") && !rest.starts_with("unsafe ") {
                return Some(("const".into(), ident(rest)));
            }
            s = rest.trim_start_matches("\"C\"").trim_start();
        } else {
            break;
        }
    }
    let w = ident(s);
    let rest = s[w.len()..].trim_start();
    match w.as_str() {
        "fn" | "struct" | "enum" | "trait" | "static" | "type" | "mod" | "union" => {
            let rest = rest.strip_prefix("mut ").unwrap_or(rest);
            Some((w, ident(rest)))
        }
        "impl" => Some(("impl".into(), impl_type(rest))),
        "macro_rules" => Some(("macro_rules".into(), String::new())),
        "use" => Some(("use".into(), String::new())),
        _ => None,
    }
}

/// The type an `impl` header is for, or "" for a trait impl (`impl Trait for Type`).
fn impl_type(rest: &str) -> String {
    // Skip the generics `<...>` right after `impl`.
    let mut s = rest;
    if s.starts_with('<') {
        let mut depth = 0;
        for (i, c) in s.char_indices() {
            match c {
                '<' => depth += 1,
                '>' => {
                    depth -= 1;
                    if depth == 0 {
                        s = s[i + 1..].trim_start();
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    if s.contains(" for ") {
        return String::new();
    }
    ident(s)
}

/// Parses `a::b::{C, D as E}` (after `pub use`, without the `;`) into `(path, exported name)`.
fn use_tree(prefix: &[String], s: &str) -> Vec<(Vec<String>, String)> {
    let s = s.trim();
    if let Some(open) = s.find('{') {
        let base: Vec<String> = s[..open]
            .split("::")
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect();
        let inner = &s[open + 1..s.rfind('}').unwrap_or(s.len())];
        let mut path = prefix.to_vec();
        path.extend(base);
        // Split at top-level commas.
        let (mut depth, mut start, mut out) = (0, 0, Vec::new());
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.extend(use_tree(&path, &inner[start..i]));
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.extend(use_tree(&path, &inner[start..]));
        return out;
    }
    if s.is_empty() {
        return Vec::new();
    }
    let (p, alias) = match s.split_once(" as ") {
        Some((p, a)) => (p.trim(), Some(a.trim().to_string())),
        None => (s, None),
    };
    let mut path = prefix.to_vec();
    path.extend(p.split("::").map(|x| x.trim().to_string()));
    let name = alias.unwrap_or_else(|| path.last().cloned().unwrap_or_default());
    vec![(path, name)]
}

/// Every public item of one source file (see the module docs for what counts).
fn scan(text: &str) -> Vec<Item> {
    let lines: Vec<&str> = text.lines().collect();
    let mut items = Vec::new();
    let mut stack: Vec<Ctx> = Vec::new();
    // What the next `{` opens, set by an item header.
    let mut pending: Option<Ctx> = None;
    // () and [] nesting: a `;` ends a header only outside them.
    let mut nest = 0i32;
    let mut in_block = false;
    let mut use_acc: Option<(usize, String)> = None;
    // Names of non-public structs and enums of the file (their impls are not API).
    let private_types: BTreeSet<String> = lines
        .iter()
        .filter_map(|l| {
            let (vis, rest) = strip_vis(l.trim_start());
            match (vis, header(rest)) {
                (Some(true), _) => None,
                (_, Some((k, n))) if k == "struct" || k == "enum" => Some(n),
                _ => None,
            }
        })
        .collect();

    for (idx, raw) in lines.iter().enumerate() {
        let code = code_of(raw, &mut in_block);
        let trimmed = code.trim();

        // A multi-line `pub use` collects until its `;` (its braces are counted below).
        let continues_use = use_acc.is_some();
        if let Some((start, acc)) = use_acc.as_mut() {
            acc.push(' ');
            acc.push_str(trimmed);
            if trimmed.contains(';') {
                let body = acc.trim_end_matches(';').trim().to_string();
                let start = *start;
                use_acc = None;
                push_use(&mut items, &lines, start, &body);
            }
        }

        // Where are we? Items count at the file level, in public inline modules, in
        // `kernel_params!` invocations, and (methods, associated consts) in inherent impls.
        let visible = stack
            .iter()
            .all(|c| matches!(c, Ctx::Module(true) | Ctx::KernelParams | Ctx::Impl(Some(_)) | Ctx::SharedConsts));
        let in_impl = match stack.last() {
            Some(Ctx::Impl(Some(t))) => Some(t.clone()),
            _ => None,
        };
        let impl_anywhere = stack.iter().any(|c| matches!(c, Ctx::Impl(_)));
        let top_level = stack.iter().all(|c| matches!(c, Ctx::KernelParams | Ctx::SharedConsts));

        if visible && matches!(stack.last(), Some(Ctx::SharedConsts)) {
            // `NAME: type = value;` (the first line, `TABLE;`, names the table).
            let name = ident(trimmed);
            if !name.is_empty()
                && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && trimmed[name.len()..].trim_start().starts_with(':')
            {
                let (doc, hidden) = doc_above(&lines, idx);
                items.push(Item {
                    line: idx + 1,
                    kind: "const (shared_consts!)".into(),
                    name,
                    in_impl: None,
                    top_level,
                    doc,
                    hidden,
                    reexports: Vec::new(),
                });
            }
        }

        let (vis, rest) = strip_vis(trimmed);
        let head = if continues_use { None } else { header(rest) };
        if let Some((kind, name)) = &head {
            if visible && vis == Some(true) && !name.starts_with('$') {
                let counts = match in_impl {
                    Some(_) => kind == "fn" || kind == "const",
                    None => !impl_anywhere && kind != "impl" && kind != "macro_rules",
                };
                if counts && kind == "use" {
                    let body = rest.trim_start().strip_prefix("use").unwrap_or("").trim();
                    if body.contains(';') {
                        push_use(&mut items, &lines, idx, body.trim_end_matches(';'));
                    } else {
                        use_acc = Some((idx, body.to_string()));
                    }
                } else if counts {
                    let (doc, hidden) = doc_above(&lines, idx);
                    items.push(Item {
                        line: idx + 1,
                        kind: kind.clone(),
                        name: name.clone(),
                        in_impl: in_impl.clone(),
                        top_level,
                        doc,
                        hidden,
                        reexports: Vec::new(),
                    });
                }
            }
            pending = Some(match kind.as_str() {
                "mod" => Ctx::Module(vis == Some(true) && visible),
                "impl" if !name.is_empty() && !private_types.contains(name) && visible => Ctx::Impl(Some(name.clone())),
                "impl" => Ctx::Impl(None),
                _ => Ctx::Opaque,
            });
        } else if continues_use {
            // Part of a `pub use` statement.
        } else if trimmed.starts_with("kernel_params!") {
            pending = Some(Ctx::KernelParams);
        } else if trimmed.starts_with("shared_consts!") {
            pending = Some(Ctx::SharedConsts);
        }

        for ch in code.chars() {
            match ch {
                '{' => stack.push(pending.take().unwrap_or(Ctx::Opaque)),
                '}' => {
                    stack.pop();
                }
                '(' | '[' => nest += 1,
                ')' | ']' => nest -= 1,
                ';' if nest == 0 => pending = None,
                _ => {}
            }
        }
    }
    items
}

fn push_use(items: &mut Vec<Item>, lines: &[&str], idx: usize, body: &str) {
    let (doc, hidden) = doc_above(lines, idx);
    let reexports = use_tree(&[], body);
    let name = reexports.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>().join(", ");
    items.push(Item {
        line: idx + 1,
        kind: "use".into(),
        name,
        in_impl: None,
        top_level: true,
        doc,
        hidden,
        reexports,
    });
}

/// The doc comment above line `idx` (across attributes and plain comments) and whether an
/// attribute hides the item (`#[doc(hidden)]`, `#[cfg(test)]`).
fn doc_above(lines: &[&str], idx: usize) -> (Vec<String>, bool) {
    let mut doc = Vec::new();
    let mut hidden = false;
    let mut i = idx;
    while i > 0 {
        i -= 1;
        let l = lines[i].trim();
        if let Some(d) = l.strip_prefix("///") {
            doc.push(d.strip_prefix(' ').unwrap_or(d).to_string());
        } else if l.starts_with("#[") || l.starts_with("$(#[") {
            let squeezed: String = l.chars().filter(|c| !c.is_whitespace()).collect();
            if squeezed.contains("#[doc(hidden)]") || squeezed.contains("#[cfg(test)]") {
                hidden = true;
            }
        } else if l.starts_with("//") && !l.starts_with("//!") {
            // A plain comment between the docs and the item.
        } else {
            break;
        }
    }
    doc.reverse();
    (doc, hidden)
}

/// The code of each runnable example block in `doc` (hidden `# ` lines included).
fn example_blocks(doc: &[String]) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<(bool, String)> = None;
    for l in doc {
        let t = l.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            match cur.take() {
                Some((runs, code)) => {
                    if runs {
                        blocks.push(code);
                    }
                }
                None => {
                    let runs = info
                        .split(',')
                        .map(str::trim)
                        .filter(|w| !w.is_empty())
                        .all(|w| w == "rust" || w == "should_panic" || w.starts_with("edition"));
                    cur = Some((runs, String::new()));
                }
            }
        } else if let Some((_, code)) = cur.as_mut() {
            code.push_str(l);
            code.push('\n');
        }
    }
    blocks
}

/// Whether `text` has `word` as a whole identifier.
fn mentions(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char)
    })
}

/// The code of an example without its `use` declarations (an import alone does not use an item).
fn without_imports(code: &str) -> String {
    let mut out = String::new();
    let mut in_use = false;
    for line in code.lines() {
        let l = line.trim_start();
        let l = l.strip_prefix("# ").unwrap_or(l);
        if !in_use && (l.starts_with("use ") || l.starts_with("pub use ")) {
            in_use = true;
        }
        if in_use {
            in_use = !l.contains(';');
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Why an item's doc does not do, if it does not.
fn doc_problem(doc: &[String], name: &str) -> Option<String> {
    if doc.iter().all(|l| l.trim().is_empty()) {
        return Some("no doc comment".into());
    }
    let blocks = example_blocks(doc);
    if blocks.is_empty() {
        return Some("no example block that runs (``` or ```rust)".into());
    }
    if !blocks.iter().any(|b| mentions(&without_imports(b), name)) {
        return Some(format!("no example block uses `{name}` (beyond importing it)"));
    }
    None
}

/// The module path of a source file (`src/gpu/mod.rs` -> `[gpu]`, `src/ops/head/cuda.rs` ->
/// `[ops, head, cuda]`).
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix("src").unwrap_or(file);
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    if last != "mod.rs" && last != "lib.rs" {
        parts.push(last.trim_end_matches(".rs").to_string());
    }
    parts
}

/// The source file of a module path, if it is a file of its own.
fn file_of(module: &[String]) -> Option<PathBuf> {
    if module.is_empty() {
        return Some(PathBuf::from("src/lib.rs"));
    }
    let base = PathBuf::from("src").join(module.join("/"));
    let flat = base.with_extension("rs");
    let nested = base.join("mod.rs");
    [flat, nested].into_iter().find(|p| root().join(p).is_file())
}

/// Where a re-exported path is declared: `(file, item name)`, or `None` for an external crate's
/// item or one of an inline (generated) module.
fn resolve(from: &Path, path: &[String]) -> Option<(PathBuf, String)> {
    let (leaf, dirs) = path.split_last()?;
    if dirs.is_empty() {
        // `pub use name;`: a crate.
        return None;
    }
    let mut module = module_of(from);
    for (i, seg) in dirs.iter().enumerate() {
        match seg.as_str() {
            "crate" if i == 0 => module.clear(),
            "self" if i == 0 => {}
            "super" => {
                module.pop()?;
            }
            _ => {
                module.push(seg.clone());
                // A first segment that is no module file of ours is an external crate (or an
                // inline module).
                file_of(&module)?;
            }
        }
    }
    Some((file_of(&module)?, leaf.clone()))
}

/// Every problem in the kernel API's files, one line each.
fn problems() -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut checked = 0;
    for file in kernel_api_files() {
        let text = fs::read_to_string(root().join(&file)).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for item in scan(&text) {
            if item.hidden {
                continue;
            }
            let what = match &item.in_impl {
                Some(t) => format!("{}:{}: pub {} {t}::{}", file.display(), item.line, item.kind, item.name),
                None => format!("{}:{}: pub {} {}", file.display(), item.line, item.kind, item.name),
            };
            if item.kind != "use" {
                checked += 1;
                let mut doc = item.doc.clone();
                if item.kind == "mod" {
                    // `pub mod name;`: the module file's inner docs (`//!`) count too.
                    let mut module = module_of(&file);
                    module.push(item.name.clone());
                    if let Some(f) = file_of(&module) {
                        let inner = fs::read_to_string(root().join(f)).unwrap_or_default();
                        doc.extend(
                            inner
                                .lines()
                                .map_while(|l| l.trim_start().strip_prefix("//!"))
                                .map(|d| d.strip_prefix(' ').unwrap_or(d).to_string()),
                        );
                    }
                }
                if let Some(p) = doc_problem(&doc, &item.name) {
                    out.push(format!("{what}: {p}"));
                }
                continue;
            }
            for (path, name) in &item.reexports {
                checked += 1;
                match resolve(&file, path) {
                    // Declared in our sources: its declaration carries the docs.
                    Some((decl_file, leaf)) => {
                        let decl_text = fs::read_to_string(root().join(&decl_file)).unwrap_or_default();
                        let decl = scan(&decl_text)
                            .into_iter()
                            .find(|d| d.top_level && d.name == leaf && d.kind != "use");
                        match decl {
                            None => out.push(format!(
                                "{what}: re-exported `{}` not found as a public item of {}",
                                path.join("::"),
                                decl_file.display()
                            )),
                            Some(d) => {
                                if let Some(p) = doc_problem(&d.doc, &leaf) {
                                    out.push(format!("{what}: re-exports {}:{} `{leaf}`: {p}", decl_file.display(), d.line));
                                }
                            }
                        }
                    }
                    // An external crate's or a generated item: the `pub use` carries the docs.
                    None => {
                        if let Some(p) = doc_problem(&item.doc, name) {
                            out.push(format!("{what}: re-export of `{}`: {p}", path.join("::")));
                        }
                    }
                }
            }
        }
    }
    (out, checked)
}

#[test]
fn every_public_kernel_api_item_has_a_runnable_example() {
    let (problems, checked) = problems();
    // The scan must have found the API (a parser that finds nothing passes vacuously).
    assert!(
        checked > 100,
        "only {checked} public items found in the kernel API's files: the scan is broken"
    );
    assert!(
        problems.is_empty(),
        "{} of {checked} public kernel API items lack a rustdoc example that runs and uses them:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The scanner itself, on a made-up file: what it must flag and what it must leave alone.
#[test]
fn the_scan_flags_what_it_should() {
    let src = r#"
//! Module docs.
use std::fmt;

/// Documented, with an example.
///
/// ```
/// let _ = good();
/// ```
#[allow(dead_code)]
pub fn good() {}

/// Documented, no example.
pub fn no_example() {}

pub struct Undocumented;

/// An example that does not run.
///
/// ```ignore
/// let _ = skipped();
/// ```
pub fn skipped() {}

/// An example about something else.
///
/// ```
/// let _ = good();
/// ```
pub const OTHER: u32 = 1;

/// Hidden.
#[doc(hidden)]
pub fn hidden() {}

pub(crate) fn crate_only() {}

fn private() {
    pub fn nested_in_body() {}
}

mod private_mod {
    pub fn inside_private_mod() {}
}

/// Imported, never used.
///
/// ```
/// use x::public_mod;
/// ```
pub mod public_mod {
    /// No example.
    pub fn in_public_mod(s: &str) -> usize {
        let _ = "{ not a brace }";
        let _ = '{';
        s.len()
    }
}

/// ```
/// let t = Thing;
/// ```
pub struct Thing;

impl Thing {
    /// ```
    /// Thing.method();
    /// ```
    pub fn method(&self) {}
    pub const fn undocumented_method(&self) {}
    fn private_method(&self) {}
    pub(crate) fn crate_method(&self) {}
}

impl fmt::Display for Thing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ok(())
    }
}

struct Private;
impl Private {
    pub fn method_of_private_type(&self) {}
}

pub trait Tr {
    fn required(&self);
}

macro_rules! m {
    ($name:ident) => { pub fn $name() {} };
}

shared_consts! { CONSTS;
    /// ```
    /// assert_eq!(ONE, 1);
    /// ```
    ONE: usize = 1;
    /// No example.
    TWO: usize = 2;
}

kernel_params! {
    /// No example.
    pub struct Params {
        pub a: u64 => "const float* {}",
    }
}

/// ```
/// let _ = ext::Thing;
/// ```
pub use ext::{Thing as Renamed, Other};

/// ```
/// use ext::{
///     Used,
///     Spread,
/// };
/// let _ = Used::new();
/// ```
pub use ext::{
    Used,
    Spread,
};
"#;
    let items = scan(src);
    let mut found: Vec<(String, bool)> = Vec::new();
    for i in items.iter().filter(|i| !i.hidden) {
        if i.kind == "use" {
            found.extend(i.reexports.iter().map(|(_, n)| (n.clone(), doc_problem(&i.doc, n).is_some())));
        } else {
            found.push((i.name.clone(), doc_problem(&i.doc, &i.name).is_some()));
        }
    }
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    let flagged: Vec<&str> = found.iter().filter(|(_, bad)| *bad).map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "good",
            "no_example",
            "Undocumented",
            "skipped",
            "OTHER",
            "public_mod",
            "in_public_mod",
            "Thing",
            "method",
            "undocumented_method",
            "Tr",
            "ONE",
            "TWO",
            "Params",
            "Renamed",
            "Other",
            "Used",
            "Spread"
        ],
        "items found"
    );
    assert_eq!(
        flagged,
        [
            "no_example",
            "Undocumented",
            "skipped",
            "OTHER",
            "public_mod",
            "in_public_mod",
            "undocumented_method",
            "Tr",
            "TWO",
            "Params",
            "Renamed",
            "Other",
            "Spread"
        ],
        "items flagged"
    );
    assert!(items.iter().any(|i| i.name == "hidden" && i.hidden));
}

/// Re-exports resolve to their declarations in our sources; external ones do not.
#[test]
fn re_exports_resolve_to_our_sources() {
    let gpu = Path::new("src/gpu/mod.rs");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        resolve(gpu, &s(&["blas", "GemmType"])),
        Some((PathBuf::from("src/gpu/blas.rs"), "GemmType".into()))
    );
    assert_eq!(resolve(gpu, &s(&["cudarc", "driver", "CudaSlice"])), None);
    assert_eq!(resolve(gpu, &s(&["kernels", "FATBINS"])), None);
    let head = Path::new("src/ops/head/cuda.rs");
    assert_eq!(
        resolve(head, &s(&["super", "HeadKernels"])),
        Some((PathBuf::from("src/ops/head/mod.rs"), "HeadKernels".into()))
    );
    let tokens = Path::new("src/ops/tokens/cuda.rs");
    assert_eq!(
        resolve(tokens, &s(&["crate", "gpu", "launch", "Storage"])),
        Some((PathBuf::from("src/gpu/launch.rs"), "Storage".into()))
    );
}
