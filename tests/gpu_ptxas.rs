//! The ptxas resource report of the embedded kernels (build.rs, `-Xptxas -v`): every kernel,
//! on every architecture, must keep its values in registers (no spills, no stack frame in local
//! memory). Runs without a GPU.
#![cfg(feature = "cuda")]

use mlvpt::gpu::{ptxas, FATBINS, PTXAS_REPORT};

/// Kernels allowed a stack frame (none so far); name them here with the reason.
const STACK_ALLOWED: &[&str] = &[];

#[test]
fn report_covers_every_module() {
    let kernels = ptxas::parse(PTXAS_REPORT);
    assert!(!kernels.is_empty(), "empty ptxas report:\n{PTXAS_REPORT}");
    for (module, fatbin) in FATBINS {
        assert!(!fatbin.is_empty(), "module {module} has an empty fatbin");
        let file = format!("{module}.cu");
        assert!(kernels.iter().any(|k| k.file == file), "no kernel of {file} in the ptxas report");
    }
}

#[test]
fn no_kernel_spills_or_uses_local_memory() {
    let mut bad = Vec::new();
    for k in ptxas::parse(PTXAS_REPORT) {
        let spills = k.spill_store_bytes + k.spill_load_bytes;
        let stack = if STACK_ALLOWED.contains(&k.function.as_str()) { 0 } else { k.stack_frame_bytes };
        if spills > 0 || stack > 0 {
            bad.push(format!(
                "{} {} ({}): {} bytes stack frame, {} bytes spill stores, {} bytes spill loads, {} registers",
                k.file, k.function, k.arch, k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes, k.registers
            ));
        }
    }
    assert!(bad.is_empty(), "kernels using local memory:\n{}", bad.join("\n"));
}

/// Every kernel name the launchers ask for (a string literal like "layernorm_fwd_bf16_v8_c3"
/// in src/ops/*/cuda.rs or src/gpu/*.rs) is an entry function of the embedded modules, so a
/// typo fails here rather than on the GPU machine.
#[test]
fn every_kernel_a_launcher_names_was_compiled() {
    let entries: std::collections::HashSet<String> = ptxas::parse(PTXAS_REPORT).into_iter().map(|k| k.function).collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src/ops", "src/gpu"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                files.push(p.join("cuda.rs"));
            } else if p.extension().is_some_and(|e| e == "rs") {
                files.push(p);
            }
        }
    }
    let mut named = 0;
    let mut missing = Vec::new();
    for f in files.iter().filter(|f| f.exists()) {
        let text = std::fs::read_to_string(f).unwrap();
        for lit in text.split('"').skip(1).step_by(2) {
            let looks_like_kernel = (lit.ends_with("_bf16") || lit.ends_with("_f32") || lit.contains("_bf16_") || lit.contains("_f32_"))
                && lit.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if looks_like_kernel {
                named += 1;
                if !entries.contains(lit) {
                    missing.push(format!("{} names `{lit}`", f.display()));
                }
            }
        }
    }
    assert!(named >= 10, "found only {named} kernel names in the launchers");
    assert!(missing.is_empty(), "kernels named but not compiled:\n{}", missing.join("\n"));
}

/// Stricter than [`every_kernel_a_launcher_names_was_compiled`], which only sees names with an
/// `_f32`/`_bf16` part: every identifier-like string literal with an underscore in a launcher
/// file (src/ops/*/cuda.rs, src/gpu/blas.rs) is a kernel of a module that file loads from
/// (`gpu.function("<module>", ..)` = kernels/<module>.cu), unless it is one of the few
/// literals listed here that are not kernel names. Catches a typo in `attn_bwd_dq_convert`,
/// `moe_fwd_scores` or `layernorm_fwd_f32x_v8_c3`, or a kernel asked of the wrong module.
#[test]
fn every_launcher_literal_is_a_kernel_of_its_own_module() {
    // Literals that are op or buffer names in messages, not kernels.
    const NOT_KERNELS: &[&str] = &[
        "y_pos",
        "y_neg",
        "set_prompts",
        "prompt_grad",
        "copy_tokens",
        "embed_tokens",
        "mul_cols",
        "linear_forward",
        "gemm_strided_batched",
    ];
    let report = ptxas::parse(PTXAS_REPORT);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("src/gpu/blas.rs")];
    for entry in std::fs::read_dir(root.join("src/ops")).unwrap() {
        let p = entry.unwrap().path().join("cuda.rs");
        if p.exists() {
            files.push(p);
        }
    }
    let mut checked = 0;
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lits: Vec<&str> = text.split('"').skip(1).step_by(2).collect();
        let mut modules: Vec<String> = text.split("function(\"").skip(1).filter_map(|s| s.split('"').next()).map(|m| format!("{m}.cu")).collect();
        modules.sort();
        modules.dedup();
        for lit in lits {
            let ident = lit.contains('_') && lit.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            // A module name with an underscore (`moe_mma`) is not a kernel either.
            if !ident || NOT_KERNELS.contains(&lit) || modules.contains(&format!("{lit}.cu")) {
                continue;
            }
            checked += 1;
            if !report.iter().any(|k| k.function == lit && modules.contains(&k.file)) {
                bad.push(format!("{} names `{lit}`, not a kernel of {modules:?}", f.display()));
            }
        }
    }
    assert!(checked >= 80, "found only {checked} kernel names in the launchers");
    assert!(bad.is_empty(), "launcher literals that are not kernels of the module asked:\n{}", bad.join("\n"));
}

/// The fused attention's tile tables (`ops::attention::FWD_TILES`, `BWD_TILES`, which hold
/// the kernel names the launcher asks for) name entry functions of kernels/attention.cu.
/// ([`attention_tile_tables_are_the_kernel_sources_lists`] checks the tiles and order too.)
#[test]
fn attention_tile_tables_name_compiled_kernels() {
    use mlvpt::ops::attention::{BWD_TILES, FUSED_HEAD_DIMS, FWD_TILES};
    let report = ptxas::parse(PTXAS_REPORT);
    let names: Vec<&str> = FWD_TILES
        .iter()
        .map(|t| t.kernel)
        .chain(BWD_TILES.iter().map(|t| t.kernel))
        .chain(BWD_TILES.iter().filter_map(|t| t.dq_kernel))
        .collect();
    for name in &names {
        assert!(report.iter().any(|k| k.function == *name && k.file == "attention.cu"), "`{name}` is not a kernel of attention.cu");
    }
    assert!(names.len() >= 2 * FUSED_HEAD_DIMS.len(), "a forward and a backward per head dim");
}

/// The body of `#define NAME(X) ...` in `src` (continuation lines joined), as the argument
/// lists of its `X(...)` entries.
fn macro_entries(src: &str, name: &str) -> Vec<Vec<String>> {
    let head = format!("#define {name}(X)");
    let start = src.find(&head).unwrap_or_else(|| panic!("no `{head}` in kernels/attention.cu"));
    let mut body = String::new();
    for line in src[start + head.len()..].lines() {
        let more = line.trim_end().ends_with('\\');
        body.push_str(line.trim_end().trim_end_matches('\\'));
        body.push(' ');
        if !more {
            break;
        }
    }
    body.split("X(")
        .skip(1)
        .map(|e| e.split(')').next().unwrap().split(',').map(|a| a.trim().to_string()).collect())
        .collect()
}

/// The launcher's tile tables are the kernel source's own lists (`ATTN_FWD_CONFIGS`,
/// `ATTN_BWD_CONFIGS`, `ATTN_BWD_DQ_CONFIGS`, `ATTN_HEAD_DIMS` in kernels/attention.cu) in
/// order, so the defaults (the first of a head dim) agree too: names, head dims, query rows
/// per block (16 MT WARPS), keys per block (16 per warp), steps of queries, the pipelined
/// forwards and the split backwards with their dQ passes. The dynamic shared memory the
/// launcher computes from these is checked from below by the virtual device's memcheck
/// (shared memory there is exactly what the launch asked for).
#[test]
fn attention_tile_tables_are_the_kernel_sources_lists() {
    use mlvpt::ops::attention::{BwdTiles, BWD_TILES, FUSED_HEAD_DIMS, FWD_TILES};
    let src = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/attention.cu")).unwrap();
    let warps: usize = src
        .split("constexpr int WARPS = ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("`constexpr int WARPS = N;` in kernels/attention.cu");
    let num = |a: &str| -> usize { a.parse().unwrap_or_else(|_| panic!("`{a}` is not a number")) };
    let fwd: Vec<String> = macro_entries(&src, "ATTN_FWD_CONFIGS")
        .iter()
        .map(|a| format!("{} dh {} rows {} pipelined {}", a[4], num(&a[0]), 16 * num(&a[1]) * warps, a[2]))
        .collect();
    let dq_src = macro_entries(&src, "ATTN_BWD_DQ_CONFIGS");
    let dq: Vec<String> = dq_src.iter().map(|a| format!("{} dh {} rows {}", a[2], num(&a[0]), 16 * num(&a[1]) * warps)).collect();
    let bwd: Vec<String> = macro_entries(&src, "ATTN_BWD_CONFIGS")
        .iter()
        .map(|a| {
            let dq = if a[3] == "true" { format!("{}_dq", a[4]) } else { "-".to_string() };
            format!("{} dh {} keys {} rows {} dq {dq}", a[4], num(&a[0]), 16 * num(&a[2]), num(&a[1]))
        })
        .collect();
    let dims: Vec<usize> = macro_entries(&src, "ATTN_HEAD_DIMS").iter().map(|a| num(&a[0])).collect();

    let host_fwd: Vec<String> =
        FWD_TILES.iter().map(|t| format!("{} dh {} rows {} pipelined {}", t.kernel, t.head_dim, t.rows, t.pipelined)).collect();
    let host_bwd: Vec<String> = BWD_TILES
        .iter()
        .map(|t| format!("{} dh {} keys {} rows {} dq {}", t.kernel, t.head_dim, t.keys, t.rows, t.dq_kernel.unwrap_or("-")))
        .collect();
    let host_dq: Vec<String> =
        BWD_TILES.iter().filter_map(|t| t.dq_kernel.map(|k| format!("{k} dh {} rows {}", t.head_dim, BwdTiles::DQ_ROWS))).collect();
    assert!(!fwd.is_empty() && !bwd.is_empty() && !dims.is_empty(), "empty lists parsed from kernels/attention.cu");
    assert_eq!(fwd, host_fwd, "forward kernels: attention.cu vs FWD_TILES");
    assert_eq!(bwd, host_bwd, "backward kernels: attention.cu vs BWD_TILES");
    assert_eq!(dq, host_dq, "dQ passes of the split backwards: attention.cu vs BWD_TILES");
    assert_eq!(dims, FUSED_HEAD_DIMS, "head dims compiled in attention.cu vs FUSED_HEAD_DIMS");
}
