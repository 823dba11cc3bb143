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

use mlvpt::ops::attention::{AttnShape, FusedTiles, FUSED_HEAD_DIMS};

mod attention_common;
mod cuda_emu;
use attention_common::{check_against_cpu, KernelOut};
use cuda_emu::read_f32 as read;

/// Shapes small enough for the emulator (each mma is two barriers of 32 threads), awkward
/// enough to exercise every path: one token; N below, across and past a 64-key tile; prompts
/// crossing tile edges; several images and heads; query sub-ranges.
fn cases() -> Vec<AttnShape> {
    let full = |dh: usize, b: usize, h: usize, n: usize, p: usize| AttnShape::full(b, n, h, dh, 1, 1 + p);
    let mut v = vec![
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
            v.push(full(dh, 1, 2, 75, 10));
            v.push(AttnShape { q_start: 1, q_len: 10, ..full(dh, 1, 1, 75, 10) });
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
    for (i, sh) in cases.iter().enumerate() {
        args.push(format!(
            "c{i}:{}:{}:{}:{}:{}:{}:{}:{}",
            sh.head_dim, sh.batch, sh.heads, sh.tokens, sh.prompt_start, sh.prompt_end, sh.q_start, sh.q_len
        ));
    }
    let dir = driver.run("run", &args);
    check_tiles(&dir);
    for (i, sh) in cases.iter().enumerate() {
        let g = |name: &str| read(&dir, &format!("c{i}_{name}"));
        let (qkv, dout) = (g("qkv"), g("dout"));
        let (out, lse, dqkv) = (g("out"), g("lse"), g("dqkv"));
        check_against_cpu(sh, &qkv, &dout, &KernelOut { out: &out, lse: &lse, dqkv: &dqkv }, driver.seed as u64);
    }
}

/// The launcher's geometry (`FusedTiles`, which sizes grids and dynamic shared memory) is the
/// kernel source's own (`attn::Tiles<DH>`), for every compiled head dim and no other.
fn check_tiles(dir: &std::path::Path) {
    let text = std::fs::read_to_string(dir.join("tiles")).expect("the driver's tiles file");
    let mut dims = Vec::new();
    for line in text.lines() {
        let v: Vec<usize> = line.split_whitespace().map(|x| x.parse().expect("a number")).collect();
        let t = FusedTiles::of(v[0]).unwrap_or_else(|| panic!("kernels for head dim {} but no FusedTiles", v[0]));
        let host = [t.head_dim, t.fwd_rows, t.bwd_keys, t.bwd_rows, t.fwd_smem_bytes(), t.bwd_smem_bytes()];
        assert_eq!(v, host, "head dim {}: kernel (dh, fwd rows, bwd keys, bwd rows, fwd smem, bwd smem) vs FusedTiles", v[0]);
        dims.push(v[0]);
    }
    assert_eq!(dims, FUSED_HEAD_DIMS, "head dims compiled in attention.cu vs FUSED_HEAD_DIMS");
}
