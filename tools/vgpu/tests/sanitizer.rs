//! The device's checks, proved both ways: each broken kernel in `tests/kernels/` must be
//! caught with the right fault and a report naming the check, kernel, block, thread and
//! address, and the correct kernels (a cp.async pipeline, an ldmatrix + mma.sync tile, a
//! double-buffered bf16 GEMM on awkward sizes) must pass and match an f64 reference.
//!
//! The kernels are compiled to PTX with nvcc at test time (`NVCC`, else the repository's
//! `.toolchain/cuda/nvidia/cu13/bin/nvcc`), once per file per test run.

mod common;

use common::*;
use vgpu::exec::{Fault, FaultKind};

// ---------------------------------------------------------------------------------------------
// Reports.

/// What a finding's report must say.
struct Expect<'a> {
    checks: &'a [&'a str],
    kernel: &'a str,
    block: Option<[u32; 3]>,
    thread: Option<[u32; 3]>,
    /// `Some(Some(a))`: the report names address `a`; `Some(None)`: it names some address.
    address: Option<Option<u64>>,
}

fn expect_fault(result: Result<(), Fault>, kinds: &[FaultKind], e: &Expect) -> Fault {
    let fault = match result {
        Ok(()) => panic!("{}: the launch passed; expected a {} finding", e.kernel, e.checks.join(" or ")),
        Err(f) => f,
    };
    let report = fault.report.replace(", ", ",");
    assert!(
        kinds.contains(&fault.kind),
        "{}: fault kind {:?}, expected one of {kinds:?}; report:\n{}",
        e.kernel,
        fault.kind,
        fault.report
    );
    let first = report.lines().next().unwrap_or("");
    assert!(
        e.checks.iter().any(|c| first.starts_with(&format!("========= vgpu {c}:"))),
        "{}: first line should be `========= vgpu <{}>: ...`; report:\n{}",
        e.kernel,
        e.checks.join("|"),
        fault.report
    );
    assert!(
        report.contains(&format!("kernel {}", e.kernel)),
        "report does not name kernel {}:\n{}",
        e.kernel,
        fault.report
    );
    if let Some([x, y, z]) = e.block {
        assert!(
            report.contains(&format!("block ({x},{y},{z})")),
            "report does not name block ({x},{y},{z}):\n{}",
            fault.report
        );
    }
    if let Some([x, y, z]) = e.thread {
        assert!(
            report.contains(&format!("thread ({x},{y},{z})")),
            "report does not name thread ({x},{y},{z}):\n{}",
            fault.report
        );
    }
    if let Some(want) = e.address {
        let named = addresses(&report);
        assert!(!named.is_empty(), "report names no address:\n{}", fault.report);
        if let Some(a) = want {
            assert!(
                named.contains(&a),
                "report does not name address {a:#x} (it names {named:x?}):\n{}",
                fault.report
            );
        }
    }
    assert!(report.contains("line "), "report does not name the PTX line:\n{}", fault.report);
    fault
}

/// Every `address 0x<hex>` in a report.
fn addresses(report: &str) -> Vec<u64> {
    let lower = report.to_ascii_lowercase();
    lower
        .match_indices("address 0x")
        .filter_map(|(i, m)| {
            let hex: String = lower[i + m.len()..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            u64::from_str_radix(&hex, 16).ok()
        })
        .collect()
}

const MEMORY: [FaultKind; 1] = [FaultKind::IllegalAddress];
const MISALIGNED: [FaultKind; 1] = [FaultKind::MisalignedAddress];
const FINDING: [FaultKind; 1] = [FaultKind::LaunchFailed];
const WARP_SYNC: [FaultKind; 2] = [FaultKind::IllegalInstruction, FaultKind::LaunchFailed];
const LAUNCH: [FaultKind; 2] = [FaultKind::InvalidValue, FaultKind::OutOfResources];

fn ok(result: Result<(), Fault>, what: &str) {
    if let Err(f) = result {
        panic!("{what}: expected the launch to pass, got {:?}:\n{}", f.kind, f.report);
    }
}

// ---------------------------------------------------------------------------------------------
// Data.

/// xorshift64*, fixed seeds: the same inputs every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// Round to nearest even bf16 (finite inputs).
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

fn bf16_f64(h: u16) -> f64 {
    f32::from_bits((h as u32) << 16) as f64
}

const BF16_NAN: u16 = 0x7FC0;

/// Rows x cols bf16 matrix with leading dimension `ld`; padding columns hold NaN (so a kernel
/// that reads them instead of zero-filling gives NaN).
fn bf16_matrix(rng: &mut Rng, rows: usize, cols: usize, ld: usize) -> Vec<u16> {
    let mut m = vec![BF16_NAN; rows * ld];
    for r in 0..rows {
        for c in 0..cols {
            m[r * ld + c] = bf16(rng.uniform());
        }
    }
    m
}

/// The bound on |fp32-accumulated dot product - exact| for k products of bf16 values: the
/// products are exact in fp32 (8-bit x 8-bit significands), and each of the k additions rounds
/// with relative error at most u = 2^-24 (round to nearest) of a partial sum bounded by
/// sum |a||b|; allowing 2^-23 per addition also covers truncating accumulation and any order
/// or grouping of the additions (tensor cores add in groups), plus 2 ulps of slack for the
/// final conversion and a tiny absolute term for an all-zero row.
fn dot_bound(k: usize, abs_sum: f64) -> f64 {
    (k as f64 + 2.0) * 2f64.powi(-23) * abs_sum + 1e-30
}

/// Max over elements of |got - reference| / bound, with a reference C[m][n] = sum_k
/// A(m,k) B(k,n) computed in f64 from the given closures.
fn worst_ratio(
    got: &[f32],
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> (f64, usize) {
    let mut worst = (0.0f64, 0usize);
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut abs) = (0.0f64, 0.0f64);
            for l in 0..k {
                exact += a(i, l) * b(l, j);
                abs += (a(i, l) * b(l, j)).abs();
            }
            let g = got[i * n + j] as f64;
            let ratio = if g.is_finite() {
                (g - exact).abs() / dot_bound(k, abs)
            } else {
                f64::INFINITY
            };
            if ratio > worst.0 {
                worst = (ratio, i * n + j);
            }
        }
    }
    worst
}

// ---------------------------------------------------------------------------------------------
// racecheck, initcheck, synccheck.

#[test]
fn missing_syncthreads_is_a_race() {
    let k = kernel("race_missing_sync.cu", "race_missing_sync");
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let (inp, out) = (Buf::upload(&input), Buf::new(64 * 4));
    let r = run(&k, [1, 1, 1], [64, 1, 1], 0, 0, &[arg(&inp.ptr), arg(&out.ptr)]);
    let e = Expect {
        checks: &["racecheck"],
        kernel: "race_missing_sync",
        block: Some([0, 0, 0]),
        thread: None,
        address: None,
    };
    expect_fault(r, &FINDING, &e);
}

#[test]
fn cp_async_without_wait_group_is_caught() {
    let k = kernel("cp_async_pipeline.cu", "pipe_nowait");
    let tiles = 4i32;
    let input: Vec<f32> = (0..128 * tiles).map(|i| i as f32).collect();
    let (inp, out) = (Buf::upload(&input), Buf::new(input.len() * 4));
    let r = run(&k, [1, 1, 1], [32, 1, 1], 0, 0, &[arg(&inp.ptr), arg(&out.ptr), arg(&tiles)]);
    // The first read of a buffer finds it unwritten (initcheck); a device that lands the copy
    // while a read of it is pending reports a race instead.
    let e = Expect {
        checks: &["initcheck", "racecheck"],
        kernel: "pipe_nowait",
        block: Some([0, 0, 0]),
        thread: None,
        address: None,
    };
    expect_fault(r, &FINDING, &e);
}

#[test]
fn cp_async_pipeline_with_wait_group_is_correct() {
    let k = kernel("cp_async_pipeline.cu", "pipe_wait");
    let tiles = 4i32;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let input: Vec<f32> = (0..128 * tiles).map(|_| rng.uniform()).collect();
    let (inp, out) = (Buf::upload(&input), Buf::new(input.len() * 4));
    ok(
        run(&k, [1, 1, 1], [32, 1, 1], 0, 0, &[arg(&inp.ptr), arg(&out.ptr), arg(&tiles)]),
        "pipe_wait",
    );
    let got: Vec<f32> = out.read();
    for t in 0..tiles as usize {
        for lane in 0..32 {
            for e in 0..4 {
                let want = input[t * 128 + ((lane + 1) % 32) * 4 + e];
                let i = t * 128 + lane * 4 + e;
                assert_eq!(got[i].to_bits(), want.to_bits(), "out[{i}] (tile {t}, lane {lane})");
            }
        }
    }
}

#[test]
fn divergent_syncthreads_is_a_sync_error() {
    let k = kernel("divergent_barrier.cu", "divergent_barrier");
    let out = Buf::new(64 * 4);
    let r = run(&k, [1, 1, 1], [64, 1, 1], 0, 0, &[arg(&out.ptr)]);
    let e = Expect {
        checks: &["synccheck"],
        kernel: "divergent_barrier",
        block: Some([0, 0, 0]),
        thread: None,
        address: None,
    };
    expect_fault(r, &FINDING, &e);
}

#[test]
fn reading_unwritten_shared_memory_is_an_initcheck_finding() {
    let k = kernel("uninit_shared.cu", "uninit_shared");
    let out = Buf::new(64 * 4);
    let r = run(&k, [1, 1, 1], [64, 1, 1], 0, 0, &[arg(&out.ptr)]);
    let e = Expect {
        checks: &["initcheck"],
        kernel: "uninit_shared",
        block: Some([0, 0, 0]),
        thread: None,
        address: Some(None),
    };
    expect_fault(r, &FINDING, &e);
}

#[test]
fn ldmatrix_by_half_a_warp_is_a_sync_error() {
    let k = kernel("mma_tile.cu", "mma_tile_half_warp_ldmatrix");
    let (a, b, c) = mma_tile_inputs(3);
    let r = run(&k, [1, 1, 1], [32, 1, 1], 0, 0, &[arg(&a.ptr), arg(&b.ptr), arg(&c.ptr)]);
    let e = Expect {
        checks: &["synccheck"],
        kernel: "mma_tile_half_warp_ldmatrix",
        block: Some([0, 0, 0]),
        thread: None,
        address: None,
    };
    expect_fault(r, &WARP_SYNC, &e);
}

// ---------------------------------------------------------------------------------------------
// memcheck.

#[test]
fn global_store_one_past_the_end_is_an_illegal_address() {
    let k = kernel("oob_global_store.cu", "oob_global_store");
    let n = 100i32;
    let out = Buf::new(n as usize * 4);
    // 128 threads in blocks of 64: i == n is thread 36 of block 1.
    let r = run(&k, [2, 1, 1], [64, 1, 1], 0, 0, &[arg(&out.ptr), arg(&n)]);
    let e = Expect {
        checks: &["memcheck"],
        kernel: "oob_global_store",
        block: Some([1, 0, 0]),
        thread: Some([36, 0, 0]),
        address: Some(Some(out.ptr + 4 * n as u64)),
    };
    expect_fault(r, &MEMORY, &e);
}

#[test]
fn misaligned_float4_load_is_a_misaligned_address() {
    let k = kernel("misaligned_float4.cu", "misaligned_float4");
    let (p, out) = (Buf::upload(&[1.0f32; 16]), Buf::new(4));
    let r = run(&k, [1, 1, 1], [1, 1, 1], 0, 0, &[arg(&p.ptr), arg(&out.ptr)]);
    let e = Expect {
        checks: &["memcheck"],
        kernel: "misaligned_float4",
        block: Some([0, 0, 0]),
        thread: Some([0, 0, 0]),
        address: Some(Some(p.ptr + 4)),
    };
    expect_fault(r, &MISALIGNED, &e);
}

#[test]
fn static_shared_array_overrun_is_an_illegal_address() {
    let k = kernel("shared_overrun.cu", "static_smem_overrun");
    assert_eq!(k.static_smem, 256, "__shared__ float s[64] is 256 bytes of static shared memory");
    let out = Buf::new(65 * 4);
    let r = run(&k, [1, 1, 1], [65, 1, 1], 0, 0, &[arg(&out.ptr)]);
    let e = Expect {
        checks: &["memcheck"],
        kernel: "static_smem_overrun",
        block: Some([0, 0, 0]),
        thread: Some([64, 0, 0]),
        address: Some(None),
    };
    expect_fault(r, &MEMORY, &e);
}

#[test]
fn dynamic_shared_memory_overrun_is_an_illegal_address() {
    let k = kernel("shared_overrun.cu", "dynamic_smem_overrun");
    let out = Buf::new(64 * 4);
    // 63 floats of dynamic shared memory for 64 threads: thread 63 stores past the end.
    let r = run(&k, [1, 1, 1], [64, 1, 1], 63 * 4, 0, &[arg(&out.ptr)]);
    let e = Expect {
        checks: &["memcheck"],
        kernel: "dynamic_smem_overrun",
        block: Some([0, 0, 0]),
        thread: Some([63, 0, 0]),
        address: Some(None),
    };
    expect_fault(r, &MEMORY, &e);
}

#[test]
fn dynamic_shared_memory_in_bounds_passes() {
    let k = kernel("shared_overrun.cu", "dynamic_smem_overrun");
    let out = Buf::new(64 * 4);
    ok(
        run(&k, [1, 1, 1], [64, 1, 1], 64 * 4, 0, &[arg(&out.ptr)]),
        "dynamic_smem_overrun with 256 bytes",
    );
    let got: Vec<f32> = out.read();
    let want: Vec<f32> = (0..64).map(|t| (63 - t) as f32).collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------------
// ldmatrix + mma.sync on one m16n8k16 tile.

/// A (16x16 row-major), B (column-major: b[n*16 + k]) as bf16 bits, and a NaN-filled C.
fn mma_tile_inputs(seed: u64) -> (Buf, Buf, Buf) {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ seed);
    let a: Vec<u16> = (0..256).map(|_| bf16(rng.uniform())).collect();
    let b: Vec<u16> = (0..128).map(|_| bf16(rng.uniform())).collect();
    (Buf::upload(&a), Buf::upload(&b), Buf::upload(&[f32::NAN; 128]))
}

/// Runs one mma_tile variant; the worst |C - C_f64| / bound over the tile (<= 1 is right).
fn mma_tile_ratio(name: &str) -> f64 {
    let k = kernel("mma_tile.cu", name);
    let (a, b, c) = mma_tile_inputs(1);
    ok(run(&k, [1, 1, 1], [32, 1, 1], 0, 0, &[arg(&a.ptr), arg(&b.ptr), arg(&c.ptr)]), name);
    let (av, bv, got): (Vec<u16>, Vec<u16>, Vec<f32>) = (a.read(), b.read(), c.read());
    let (ratio, at) = worst_ratio(&got, 16, 8, 16, |i, l| bf16_f64(av[i * 16 + l]), |l, j| bf16_f64(bv[j * 16 + l]));
    eprintln!("{name}: worst error / bound {ratio:.3e} at C[{}][{}]", at / 8, at % 8);
    ratio
}

#[test]
fn mma_tile_matches_f64() {
    let r = mma_tile_ratio("mma_tile_ok");
    assert!(r <= 1.0, "mma_tile_ok: error {r} x the bound");
}

#[test]
fn ldmatrix_wrong_row_address_gives_a_wrong_product() {
    // Lane 9 points at row 10 instead of row 9 of A: row 9 of C is wrong, with no finding.
    let r = mma_tile_ratio("mma_tile_wrong_row");
    assert!(
        r > 100.0,
        "mma_tile_wrong_row: worst error only {r} x the bound; the bug went unseen"
    );
}

#[test]
fn mma_with_transposed_b_gives_a_wrong_product() {
    let r = mma_tile_ratio("mma_tile_trans_b");
    assert!(r > 100.0, "mma_tile_trans_b: worst error only {r} x the bound; the bug went unseen");
}

#[test]
fn misaligned_ldmatrix_row_address_is_a_misaligned_address() {
    let k = kernel("mma_tile.cu", "mma_tile_misaligned_ldmatrix");
    let (a, b, c) = mma_tile_inputs(2);
    let r = run(&k, [1, 1, 1], [32, 1, 1], 0, 0, &[arg(&a.ptr), arg(&b.ptr), arg(&c.ptr)]);
    let e = Expect {
        checks: &["memcheck"],
        kernel: "mma_tile_misaligned_ldmatrix",
        block: Some([0, 0, 0]),
        thread: Some([3, 0, 0]),
        address: Some(None),
    };
    expect_fault(r, &MISALIGNED, &e);
}

// ---------------------------------------------------------------------------------------------
// The double-buffered cp.async + ldmatrix + mma.sync GEMM.

#[test]
fn gemm_bf16_cp_async_ldmatrix_mma_matches_f64_on_awkward_sizes() {
    let k = kernel("gemm_bf16.cu", "gemm_bf16");
    // Not multiples of the 32x16x16 tile; lda, ldb rounded up to 8 elements (16-byte rows)
    // with NaN padding the kernel must never use (cp.async src-size zero-fills).
    let (m, n, kk) = (67usize, 45usize, 83usize);
    let (lda, ldb) = (kk.next_multiple_of(8), n.next_multiple_of(8));
    let mut rng = Rng(0x0123_4567_89AB_CDEF);
    let av = bf16_matrix(&mut rng, m, kk, lda);
    let bv = bf16_matrix(&mut rng, kk, n, ldb);
    let (a, b, c) = (Buf::upload(&av), Buf::upload(&bv), Buf::upload(&vec![f32::NAN; m * n]));
    let (mi, ni, ki, ldai, ldbi) = (m as i32, n as i32, kk as i32, lda as i32, ldb as i32);
    let grid = [n.div_ceil(16) as u32, m.div_ceil(32) as u32, 1];
    let args = [
        arg(&a.ptr),
        arg(&b.ptr),
        arg(&c.ptr),
        arg(&mi),
        arg(&ni),
        arg(&ki),
        arg(&ldai),
        arg(&ldbi),
    ];
    ok(run(&k, grid, [64, 1, 1], 0, 0, &args), "gemm_bf16");
    let got: Vec<f32> = c.read();
    let (ratio, at) = worst_ratio(&got, m, n, kk, |i, l| bf16_f64(av[i * lda + l]), |l, j| bf16_f64(bv[l * ldb + j]));
    eprintln!(
        "gemm_bf16 {m}x{n}x{kk}: worst error / bound {ratio:.3e} at C[{}][{}]",
        at / n,
        at % n
    );
    assert!(
        ratio <= 1.0,
        "gemm_bf16: C[{}][{}] = {} is {ratio} x the bound from the f64 reference",
        at / n,
        at % n,
        got[at]
    );
}

// ---------------------------------------------------------------------------------------------
// Launch checks.

#[test]
fn block_above_launch_bounds_is_refused() {
    let k = kernel("launch_checks.cu", "bounded_128");
    assert_eq!(k.max_threads, Some(128), "__launch_bounds__(128) is .maxntid 128");
    let out = Buf::new(256 * 4);
    ok(
        run(&k, [2, 1, 1], [128, 1, 1], 0, 0, &[arg(&out.ptr)]),
        "bounded_128 with 128 threads",
    );
    assert!(out.read::<f32>().iter().all(|&x| x == 1.0));
    launch_refused(run(&k, [1, 1, 1], [256, 1, 1], 0, 0, &[arg(&out.ptr)]), "bounded_128");
}

#[test]
fn dynamic_shared_memory_above_48k_needs_the_opt_in() {
    let k = kernel("launch_checks.cu", "dyn_smem_user");
    let out = Buf::new(64 * 4);
    // 64 KB without CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: refused.
    launch_refused(run(&k, [1, 1, 1], [64, 1, 1], 64 << 10, 0, &[arg(&out.ptr)]), "dyn_smem_user");
    // With the attribute: runs.
    ok(
        run(&k, [1, 1, 1], [64, 1, 1], 64 << 10, 64 << 10, &[arg(&out.ptr)]),
        "dyn_smem_user with 64 KB opted in",
    );
    let want: Vec<f32> = (0..64).map(|t| (t ^ 1) as f32).collect();
    assert_eq!(out.read::<f32>(), want);
    // Above the 227 KB a block may have at all: refused even with the attribute.
    let too_much = (227 << 10) + 1024;
    launch_refused(
        run(&k, [1, 1, 1], [64, 1, 1], too_much, too_much, &[arg(&out.ptr)]),
        "dyn_smem_user",
    );
}

/// A launch check refuses before running: no `line` in its report, so only the check, the
/// kernel and the fault kind are asserted.
fn launch_refused(r: Result<(), Fault>, kernel: &str) {
    let fault = match r {
        Ok(()) => panic!("{kernel}: the launch passed; expected a launch check"),
        Err(f) => f,
    };
    assert!(
        LAUNCH.contains(&fault.kind),
        "{kernel}: fault kind {:?}, expected one of {LAUNCH:?}:\n{}",
        fault.kind,
        fault.report
    );
    assert!(
        fault.report.starts_with("========= vgpu launch check:"),
        "{kernel}: first line should be `========= vgpu launch check: ...`:\n{}",
        fault.report
    );
    assert!(
        fault.report.contains(&format!("kernel {kernel}")),
        "report does not name kernel {kernel}:\n{}",
        fault.report
    );
}

#[test]
fn vector_atomics_add_and_need_the_vector_alignment() {
    let k = kernel("vector_atomic.cu", "add_pair");
    let p = Buf::upload(&[0.0f32; 4]);
    let off = 2i32;
    run(&k, [3, 1, 1], [64, 1, 1], 0, 0, &[arg(&p.ptr), arg(&off)]).expect("aligned float2 atomics");
    assert_eq!(p.read::<f32>(), [0.0, 0.0, 192.0, 384.0], "192 threads added (1, 2)");
    let off = 1i32;
    let f = run(&k, [1, 1, 1], [32, 1, 1], 0, 0, &[arg(&p.ptr), arg(&off)]).expect_err("misaligned float2 atomic");
    assert_eq!(f.kind, FaultKind::MisalignedAddress, "{}", f.report);
    assert!(
        f.report.contains("memcheck") && f.report.contains(&format!("{:#x}", p.ptr + 4)),
        "{}",
        f.report
    );
}
