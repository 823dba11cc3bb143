//! The fused attention kernels' CUDA source (`kernels/attention.cu`) run on the CPU, no GPU
//! needed: `tests/cuda_emu/attention_driver.cpp` compiles attention.cu against the emulator
//! (`cuda_bf16.h`, and `emu_ptx.h` for cp.async, ldmatrix and the bf16 mma.sync, emulated lane
//! by lane from the PTX fragment layouts) and runs the forward, the backward's three kernels and
//! their grids as the launcher does, on random bf16 inputs with poisoned outputs; this test
//! compares the dumps with the CPU reference (`ops::attention::cpu`) within the bounds of the
//! GPU test (tests/gpu_attention.rs). Every compiled head dim, token counts that are not tile
//! multiples, prompt blocks that cross tiles, query ranges (the model's last block). It checks
//! the kernels' indexing, fragment layouts, masking and barriers, not GPU timing or the memory
//! model. Needs a C++20 compiler; without one it says so and passes.

use mlvpt::ops::attention::{AttnShape, BwdTiles, BWD_TILES, FUSED_HEAD_DIMS, FWD_TILES};

mod attention_common;
mod cuda_emu;
use attention_common::{check_against_cpu, KernelOut};
use cuda_emu::read_f32 as read;

/// Shapes small enough for the emulator (each mma is two barriers of 32 threads), awkward
/// enough to exercise every path: one token; N below, across and past a 64-key tile; prompts
/// crossing tile edges; several images and heads; query sub-ranges. Each with the default
/// kernels (variant 0 of its head dim); the alternative tile shapes (variant 1, 2, ...: see
/// FWD_TILES, BWD_TILES) run on the head-dim-64 cases.
fn cases() -> Vec<(AttnShape, usize, usize)> {
    let full = |dh: usize, b: usize, h: usize, n: usize, p: usize| AttnShape::full(b, n, h, dh, 1, 1 + p);
    let mut shapes = vec![
        full(64, 1, 1, 1, 0),
        full(64, 2, 1, 31, 30),
        full(64, 1, 2, 97, 1),
        full(64, 1, 1, 131, 70),
        full(32, 2, 3, 67, 10),
        AttnShape { q_start: 1, q_len: 30, ..full(64, 2, 1, 90, 30) },
        AttnShape { q_start: 40, q_len: 50, ..full(32, 1, 2, 100, 60) },
    ];
    for &dh in FUSED_HEAD_DIMS {
        if dh != 32 && dh != 64 {
            shapes.push(full(dh, 1, 2, 75, 10));
            shapes.push(AttnShape { q_start: 1, q_len: 10, ..full(dh, 1, 1, 75, 10) });
        }
    }
    let (nf, nb) = (FWD_TILES.iter().filter(|t| t.head_dim == 64).count(), BWD_TILES.iter().filter(|t| t.head_dim == 64).count());
    let mut v = Vec::new();
    // The ViT-B shapes (227 = CLS + 30 prompts + 196 patches; 257 with 60 prompts),
    // default kernels only: the emulator needs a few seconds for each.
    v.push((full(64, 1, 1, 227, 30), 0, 0));
    v.push((full(64, 1, 1, 257, 60), 0, 0));
    for sh in shapes {
        v.push((sh, 0, 0));
        if sh.head_dim == 64 && sh.tokens > 1 {
            v.extend((1..nf.max(nb)).map(|k| (sh, k.min(nf - 1), k.min(nb - 1))));
        }
    }
    v
}

#[test]
fn emulated_attention_kernels_match_the_cpu_reference() {
    let Some(driver) = cuda_emu::build("attention_emulated", "attention_driver") else {
        return;
    };
    let cases = cases();
    let mut args = vec![driver.seed.to_string()];
    for (i, (sh, fv, bv)) in cases.iter().enumerate() {
        args.push(format!(
            "c{i}:{}:{}:{}:{}:{}:{}:{}:{}:{fv}:{bv}",
            sh.head_dim, sh.batch, sh.heads, sh.tokens, sh.prompt_start, sh.prompt_end, sh.q_start, sh.q_len
        ));
    }
    let dir = driver.run("run", &args);
    check_tiles(&dir);
    for (i, (sh, _, _)) in cases.iter().enumerate() {
        let g = |name: &str| read(&dir, &format!("c{i}_{name}"));
        let (qkv, dout) = (g("qkv"), g("dout"));
        let (out, lse, dqkv) = (g("out"), g("lse"), g("dqkv"));
        check_against_cpu(sh, &qkv, &dout, &KernelOut { out: &out, lse: &lse, dqkv: &dqkv }, driver.seed as u64);
    }
}

/// The launcher's tables (`FWD_TILES`, `BWD_TILES`: kernel names, grid and dynamic shared
/// memory sizes, in order, so the defaults agree too) are the kernel source's own
/// (`ATTN_FWD_CONFIGS`, `ATTN_BWD_CONFIGS`), and so are the head dims.
fn check_tiles(dir: &std::path::Path) {
    let text = std::fs::read_to_string(dir.join("tiles")).expect("the driver's tiles file");
    let (mut fwd, mut bwd, mut dq, mut dims) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> usize { w[i].parse().expect("a number") };
        match w[0] {
            "fwd" => fwd.push(format!("{} dh {} rows {} smem {}", w[1], num(2), num(3), num(4))),
            "bwd" => bwd.push(format!("{} dh {} keys {} rows {} smem {}", w[1], num(2), num(3), num(4), num(5))),
            "dq" => dq.push(format!("{} dh {} rows {} smem {}", w[1], num(2), num(3), num(4))),
            _ => dims.push(num(1)),
        }
    }
    let host_fwd: Vec<String> =
        FWD_TILES.iter().map(|t| format!("{} dh {} rows {} smem {}", t.kernel, t.head_dim, t.rows, t.smem_bytes())).collect();
    let host_bwd: Vec<String> = BWD_TILES
        .iter()
        .map(|t| format!("{} dh {} keys {} rows {} smem {}", t.kernel, t.head_dim, t.keys, t.rows, t.smem_bytes()))
        .collect();
    let host_dq: Vec<String> = BWD_TILES
        .iter()
        .filter_map(|t| t.dq_kernel.map(|k| format!("{k} dh {} rows {} smem {}", t.head_dim, BwdTiles::DQ_ROWS, t.dq_smem_bytes())))
        .collect();
    assert_eq!(fwd, host_fwd, "forward kernels: attention.cu vs FWD_TILES");
    assert_eq!(dq, host_dq, "dQ passes of the split backwards: attention.cu vs BWD_TILES");
    assert_eq!(bwd, host_bwd, "backward kernels: attention.cu vs BWD_TILES");
    assert_eq!(dims, FUSED_HEAD_DIMS, "head dims compiled in attention.cu vs FUSED_HEAD_DIMS");
}
