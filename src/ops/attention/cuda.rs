//! GPU launchers of fused prompt-masked attention (`kernels/attention.cu`, FlashAttention-2
//! style on tensor cores): the twins of [`super::cpu::forward`] and [`super::cpu::backward`],
//! in the same layout (`qkv [B, N, 3, h, dh]` read by strides, `out [B, Nq, h*dh]`,
//! `lse [B, h, Nq]`, `dqkv` like `qkv`) and for the same query range (`q_start .. q_start +
//! q_len`, keys always all N tokens), bf16 storage, fp32 softmax and accumulation. No
//! transposes or copies around the kernels; no `N x N` matrix in memory.
//!
//! Head dims: [`HEAD_DIMS`]. Any token count. Device pointers of the bf16 tensors and the
//! backward scratch must be 16-byte aligned (any `CudaSlice` is; a view must start on a
//! multiple of 8 elements). The forward and dK, dV are deterministic; dQ is summed with fp32
//! atomics, so its last bits may vary between runs (except with a split backward of
//! [`super::BWD_TILES`], which computes dQ in a pass of its own and leaves the dQ part of the
//! scratch unused).
//!
//! [`unfused`] is the textbook path (cuBLAS strided-batched GEMMs and a softmax kernel over a
//! materialised score matrix) that benches/gpu_attention.rs measures the fused kernels against.

use super::{bwd_tiles, fwd_tiles, AttnShape, BwdTiles, FwdTiles, FUSED_THREADS};
use crate::gpu::launch::{aligned, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{bf16, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

/// Head dims the fused kernels are compiled for.
pub const HEAD_DIMS: &[usize] = super::FUSED_HEAD_DIMS;

const THREADS: u32 = FUSED_THREADS as u32;
/// Dynamic shared memory a kernel may take without opting in.
const SMEM_DEFAULT_MAX: usize = 48 * 1024;

/// The backward's row-sum kernel of a head dim.
fn pre_kernel(head_dim: usize) -> &'static str {
    match head_dim {
        32 => "attn_bwd_pre_d32",
        64 => "attn_bwd_pre_d64",
        80 => "attn_bwd_pre_d80",
        _ => "attn_bwd_pre_d128",
    }
}

/// `name` with `bytes` of dynamic shared memory allowed (above 48 KB a kernel must opt in).
fn function_with_smem(gpu: &GpuContext, name: &'static str, bytes: usize) -> Result<CudaFunction, GpuError> {
    let f = gpu.function("attention", name)?;
    if bytes > SMEM_DEFAULT_MAX {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(GpuError::driver(format!("allowing {name} {bytes} bytes of shared memory")))?;
    }
    Ok(f)
}

/// Elements (f32) of the scratch [`backward`] needs: a dQ accumulator `[B, Nq, h*dh]` followed
/// by `D_i = rowsum(dO * O)` per query row, `[B, h, Nq]`.
pub fn backward_scratch_len(sh: &AttnShape) -> usize {
    sh.batch * sh.q_len * sh.dim() + sh.batch * sh.heads * sh.q_len
}

/// The kernel arguments of a validated shape.
#[derive(Debug)]
struct Dims {
    n: i32,
    h: i32,
    ps: i32,
    pe: i32,
    qs: i32,
    nq: i32,
    scale: f32,
    bh: u32,
}

fn check_shape(op: &'static str, sh: &AttnShape) -> Result<Dims, GpuError> {
    if !HEAD_DIMS.contains(&sh.head_dim) {
        return Err(unsupported(op, sh.head_dim));
    }
    if sh.prompt_start > sh.prompt_end || sh.prompt_end > sh.tokens {
        return Err(GpuError::invalid(
            op,
            format!("prompt range {}..{} not inside 0..{} tokens", sh.prompt_start, sh.prompt_end, sh.tokens),
        ));
    }
    if sh.q_start + sh.q_len > sh.tokens {
        return Err(GpuError::invalid(
            op,
            format!("query range {}..{} not inside 0..{} tokens", sh.q_start, sh.q_start + sh.q_len, sh.tokens),
        ));
    }
    let i32_of = |what: &str, v: usize| {
        i32::try_from(v).map_err(|_| GpuError::invalid(op, format!("{what} = {v} exceeds the kernels' 32-bit index")))
    };
    let bh = sh.batch * sh.heads;
    if bh > 65_535 {
        return Err(GpuError::invalid(op, format!("batch x heads = {bh} exceeds the 65535 blocks of grid.y")));
    }
    // Token indices and per-image offsets in elements are 32-bit inside the kernels.
    i32_of("tokens x 3 x dim", sh.tokens * 3 * sh.dim())?;
    Ok(Dims {
        n: i32_of("tokens", sh.tokens)?,
        h: i32_of("heads", sh.heads)?,
        ps: sh.prompt_start as i32,
        pe: sh.prompt_end as i32,
        qs: sh.q_start as i32,
        nq: sh.q_len as i32,
        scale: (1.0 / (sh.head_dim as f64).sqrt()) as f32,
        bh: bh as u32,
    })
}

fn unsupported(op: &'static str, head_dim: usize) -> GpuError {
    GpuError::invalid(op, format!("head dim {head_dim} not supported (kernels for {HEAD_DIMS:?})"))
}

/// A tile shape for this shape's head dim, and one the kernels were compiled with.
fn check_tiles(op: &'static str, sh: &AttnShape, head_dim: usize, compiled: bool) -> Result<(), GpuError> {
    if head_dim != sh.head_dim || !compiled {
        return Err(GpuError::invalid(op, format!("tiles for head dim {head_dim} are not a compiled shape of head dim {}", sh.head_dim)));
    }
    Ok(())
}

fn check_aligned(op: &'static str, ptrs: &[(&str, u64)]) -> Result<(), GpuError> {
    for &(what, p) in ptrs {
        if !aligned(p, 16) {
            return Err(GpuError::invalid(op, format!("{what} is not 16-byte aligned (address {p:#x})")));
        }
    }
    Ok(())
}

fn blocks(items: usize, per: usize) -> u32 {
    items.div_ceil(per) as u32
}

/// `out = softmax(mask(Q K^T / sqrt(dh))) V` per image and head for the query tokens
/// `sh.q_start .. sh.q_start + sh.q_len` over all `N` keys, and the log-sum-exp of every
/// scaled, masked score row into `lse [B, h, Nq]` for [`backward`]. Reads Q, K, V by strides
/// from `qkv [B, N, 3, h, dh]`; writes `out [B, Nq, h*dh]` (head `j` in columns
/// `j*dh..(j+1)*dh`). Prompt queries (`sh.prompt_start..sh.prompt_end`) skip the other prompts'
/// keys. The twin of [`super::cpu::forward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, GpuError};
/// use mlvpt::ops::attention::{cuda, AttnShape};
/// # fn main() -> Result<(), GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // ViT-B: 12 heads of 64, CLS + 30 prompts + 196 patches.
/// let sh = AttnShape::full(2, 227, 12, 64, 1, 31);
/// let qkv = gpu.upload(&vec![bf16::from_f32(0.1); sh.batch * sh.tokens * 3 * sh.dim()])?;
/// let mut out = gpu.zeros::<bf16>(sh.batch * sh.tokens * sh.dim())?;
/// let mut lse = gpu.zeros::<f32>(sh.batch * sh.heads * sh.tokens)?;
/// cuda::forward(&gpu, gpu.stream(), &qkv, &mut out, &mut lse, &sh)?;
///
/// // Backward from dL/dout, with a scratch buffer of backward_scratch_len(&sh) floats.
/// let dout = gpu.upload(&vec![bf16::from_f32(0.01); sh.batch * sh.tokens * sh.dim()])?;
/// let mut dqkv = gpu.zeros::<bf16>(sh.batch * sh.tokens * 3 * sh.dim())?;
/// let mut scratch = gpu.zeros::<f32>(cuda::backward_scratch_len(&sh))?;
/// cuda::backward(&gpu, gpu.stream(), &qkv, &out, &lse, &dout, &mut dqkv, &mut scratch, &sh)?;
/// # Ok(()) }
/// ```
pub fn forward(
    gpu: &GpuContext,
    stream: &CudaStream,
    qkv: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    sh: &AttnShape,
) -> Result<(), GpuError> {
    let tiles = fwd_tiles(sh.head_dim).ok_or_else(|| unsupported("attention forward", sh.head_dim))?;
    forward_with(gpu, stream, qkv, out, lse, sh, &tiles)
}

/// [`forward`] with one of the compiled tile shapes of `sh.head_dim` ([`super::FWD_TILES`]),
/// for benchmarks and tuning; [`forward`] takes the first.
pub fn forward_with(
    gpu: &GpuContext,
    stream: &CudaStream,
    qkv: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    sh: &AttnShape,
    tiles: &FwdTiles,
) -> Result<(), GpuError> {
    const OP: &str = "attention forward";
    let d = check_shape(OP, sh)?;
    check_tiles(OP, sh, tiles.head_dim, super::FWD_TILES.iter().any(|t| t == tiles))?;
    let (b, n, nq, dim) = (sh.batch, sh.tokens, sh.q_len, sh.dim());
    check_len(OP, "qkv", qkv, b * n * 3 * dim)?;
    check_len(OP, "out", out, b * nq * dim)?;
    check_len(OP, "lse", lse, b * sh.heads * nq)?;
    if d.bh == 0 || nq == 0 {
        return Ok(());
    }
    let (qp, _g1) = qkv.device_ptr(stream);
    let (op, _g2) = out.device_ptr_mut(stream);
    let (lp, _g3) = lse.device_ptr_mut(stream);
    check_aligned(OP, &[("qkv", qp), ("out", op)])?;
    let name = tiles.kernel;
    let smem = tiles.smem_bytes();
    let f = function_with_smem(gpu, name, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks(nq, tiles.rows), d.bh, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&qp).arg(&op).arg(&lp).arg(&d.n).arg(&d.h).arg(&d.ps).arg(&d.pe).arg(&d.qs).arg(&d.nq).arg(&d.scale);
    // SAFETY: lengths and alignment checked above; the kernel reads qkv[..B*N*3D] and writes
    // out[..B*Nq*D], lse[..B*h*Nq].
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}

/// Input gradient of [`forward`]: from `dout [B, Nq, h*dh]` and the forward's `out` and `lse`,
/// writes (overwrites) `dqkv [B, N, 3, h, dh]` (Q rows outside the query range zero),
/// recomputing the probabilities from `lse`.
/// `scratch` holds at least [`backward_scratch_len`] f32 (its contents on entry do not matter;
/// it holds the fp32 dQ sums and `rowsum(dout * out)` afterwards). Three launches: the row
/// sums (and the zeroing of the dQ sums), the fused kernel over key blocks (dK, dV written,
/// dQ added with atomics), and dQ's conversion into dqkv. The twin of [`super::cpu::backward`];
/// see [`forward`] for an example.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    qkv: &impl DevicePtr<bf16>,
    out: &impl DevicePtr<bf16>,
    lse: &impl DevicePtr<f32>,
    dout: &impl DevicePtr<bf16>,
    dqkv: &mut impl DevicePtrMut<bf16>,
    scratch: &mut impl DevicePtrMut<f32>,
    sh: &AttnShape,
) -> Result<(), GpuError> {
    let tiles = bwd_tiles(sh.head_dim).ok_or_else(|| unsupported("attention backward", sh.head_dim))?;
    backward_with(gpu, stream, qkv, out, lse, dout, dqkv, scratch, sh, &tiles)
}

/// [`backward`] with one of the compiled tile shapes of `sh.head_dim` ([`super::BWD_TILES`]),
/// for benchmarks and tuning; [`backward`] takes the first.
#[allow(clippy::too_many_arguments)]
pub fn backward_with(
    gpu: &GpuContext,
    stream: &CudaStream,
    qkv: &impl DevicePtr<bf16>,
    out: &impl DevicePtr<bf16>,
    lse: &impl DevicePtr<f32>,
    dout: &impl DevicePtr<bf16>,
    dqkv: &mut impl DevicePtrMut<bf16>,
    scratch: &mut impl DevicePtrMut<f32>,
    sh: &AttnShape,
    tiles: &BwdTiles,
) -> Result<(), GpuError> {
    const OP: &str = "attention backward";
    let d = check_shape(OP, sh)?;
    check_tiles(OP, sh, tiles.head_dim, super::BWD_TILES.iter().any(|t| t == tiles))?;
    let (b, n, nq, dim) = (sh.batch, sh.tokens, sh.q_len, sh.dim());
    check_len(OP, "qkv", qkv, b * n * 3 * dim)?;
    check_len(OP, "out", out, b * nq * dim)?;
    check_len(OP, "dout", dout, b * nq * dim)?;
    check_len(OP, "lse", lse, b * sh.heads * nq)?;
    check_len(OP, "dqkv", dqkv, b * n * 3 * dim)?;
    check_len(OP, "scratch", scratch, backward_scratch_len(sh))?;
    if d.bh == 0 || n == 0 {
        return Ok(());
    }
    let (qp, _g1) = qkv.device_ptr(stream);
    let (op, _g2) = out.device_ptr(stream);
    let (lp, _g3) = lse.device_ptr(stream);
    let (dop, _g4) = dout.device_ptr(stream);
    let (dqp, _g5) = dqkv.device_ptr_mut(stream);
    let (sp, _g6) = scratch.device_ptr_mut(stream);
    check_aligned(OP, &[("qkv", qp), ("out", op), ("dout", dop), ("dqkv", dqp), ("scratch", sp)])?;
    let dq_acc = sp;
    let dvec = sp + (b * nq * dim * std::mem::size_of::<f32>()) as u64;
    let (pre, main) = (pre_kernel(sh.head_dim), tiles.kernel);

    // Grid-stride over the rows' lanes; one thread per 8 elements of out/dout bounds the grid.
    let chunks = (b * nq * dim / 8) as u64;
    let f = gpu.function("attention", pre)?;
    let b32 = b as i32;
    // A split backward keeps no dQ sums: a null pointer tells the kernel not to zero them.
    let dq_sums: u64 = if tiles.dq_kernel.is_some() { 0 } else { dq_acc };
    let cfg = LaunchConfig { grid_dim: (grid_stride_blocks(gpu, chunks, BLOCK as u64), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let mut l = stream.launch_builder(&f);
    l.arg(&op).arg(&dop).arg(&dvec).arg(&dq_sums).arg(&b32).arg(&d.nq).arg(&d.h);
    // SAFETY: out/dout hold B*Nq*D, the scratch B*Nq*D + B*h*Nq floats (checked); 16-byte aligned.
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {pre}")))?;

    let smem = tiles.smem_bytes();
    let f = function_with_smem(gpu, main, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks(n, tiles.keys), d.bh, 1),
        block_dim: (tiles.threads() as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&qp).arg(&dop).arg(&lp).arg(&dvec).arg(&dq_acc).arg(&dqp);
    l.arg(&d.n).arg(&d.h).arg(&d.ps).arg(&d.pe).arg(&d.qs).arg(&d.nq).arg(&d.scale);
    // SAFETY: as above; writes dqkv's K and V slots and adds into the dQ sums (a split
    // backward: the zero Q-slot rows of its keys outside the query range instead).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {main}")))?;

    if let Some(dq_name) = tiles.dq_kernel {
        if nq == 0 {
            return Ok(());
        }
        let smem = tiles.dq_smem_bytes();
        let f = function_with_smem(gpu, dq_name, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(nq, BwdTiles::DQ_ROWS), d.bh, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&qp).arg(&dop).arg(&lp).arg(&dvec).arg(&dqp);
        l.arg(&d.n).arg(&d.h).arg(&d.ps).arg(&d.pe).arg(&d.qs).arg(&d.nq).arg(&d.scale);
        // SAFETY: as above; writes dqkv's Q slot of the query tokens.
        unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {dq_name}")))?;
        return Ok(());
    }

    let f = gpu.function("attention", "attn_bwd_dq_convert")?;
    let tok = (b * n) as u64;
    let (n32, qs32, nq32, dim32) = (n as u32, sh.q_start as u32, nq as u32, dim as u32);
    let cfg = LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, tok * (dim as u64 / 8), BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&dq_acc).arg(&dqp).arg(&tok).arg(&n32).arg(&qs32).arg(&nq32).arg(&dim32).arg(&d.scale);
    // SAFETY: reads B*Nq*D floats of scratch, writes dqkv's Q slot (D % 8 == 0 for these dims).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching attn_bwd_dq_convert"))?;
    Ok(())
}

/// The unfused attention path the benchmark compares against: per-head contiguous Q, K, V
/// (`[B, h, N, dh]`, made once by [`unfused::split_heads`]), the full score matrix `[B, h, N, N]`
/// in bf16, cuBLAS strided-batched GEMMs and row-softmax kernels. Not used by the model.
pub mod unfused {
    use super::*;
    use crate::gpu::CudaSlice;

    fn ew_launch(gpu: &GpuContext, items: u64) -> LaunchConfig {
        LaunchConfig { grid_dim: (grid_stride_blocks(gpu, items, BLOCK as u64), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
    }

    fn check_full(op: &'static str, sh: &AttnShape) -> Result<Dims, GpuError> {
        if sh.q_start != 0 || sh.q_len != sh.tokens {
            return Err(GpuError::invalid(op, "the unfused path takes every token as a query"));
        }
        check_shape(op, sh)
    }

    /// `q, k, v [B, h, N, dh]` from `qkv [B, N, 3, h, dh]`.
    pub fn split_heads(
        gpu: &GpuContext,
        qkv: &CudaSlice<bf16>,
        q: &mut CudaSlice<bf16>,
        k: &mut CudaSlice<bf16>,
        v: &mut CudaSlice<bf16>,
        sh: &AttnShape,
    ) -> Result<(), GpuError> {
        const OP: &str = "attention split_heads";
        let total = sh.batch * sh.tokens * sh.dim();
        check_len(OP, "qkv", qkv, 3 * total)?;
        check_len(OP, "q", q, total)?;
        check_len(OP, "k", k, total)?;
        check_len(OP, "v", v, total)?;
        let s = gpu.stream();
        let (qkvp, _g1) = qkv.device_ptr(s);
        let (qp, _g2) = q.device_ptr_mut(s);
        let (kp, _g3) = k.device_ptr_mut(s);
        let (vp, _g4) = v.device_ptr_mut(s);
        let dims = [sh.batch as u32, sh.tokens as u32, sh.heads as u32, sh.head_dim as u32];
        let f = gpu.function("attention", "attn_split_heads")?;
        let mut l = s.launch_builder(&f);
        l.arg(&qkvp).arg(&qp).arg(&kp).arg(&vp).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]);
        // SAFETY: lengths checked above.
        unsafe { l.launch(ew_launch(gpu, total as u64)) }.map_err(GpuError::driver("launching attn_split_heads"))?;
        Ok(())
    }

    /// `p = softmax(mask(scale q k^T))` (kept for [`backward`]) and `o = p v`, `o [B, h, N, dh]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        gpu: &GpuContext,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        p: &mut CudaSlice<bf16>,
        o: &mut CudaSlice<bf16>,
        sh: &AttnShape,
    ) -> Result<(), GpuError> {
        let d = check_full("attention unfused forward", sh)?;
        let (n, dh, bh) = (sh.tokens, sh.head_dim, d.bh as usize);
        gpu.gemm_strided_batched(false, true, n, n, dh, 1.0, q, n * dh, k, n * dh, 0.0, p, n * n, bh)?;
        let f = gpu.function("attention", "attn_softmax_rows_bf16")?;
        let rows = (bh * n) as u64;
        let n32 = n as u32;
        {
            let s = gpu.stream();
            let (pp, _g) = p.device_ptr_mut(s);
            let mut l = s.launch_builder(&f);
            l.arg(&pp).arg(&rows).arg(&n32).arg(&d.ps).arg(&d.pe).arg(&d.scale);
            // SAFETY: p holds bh*N*N elements (checked by the GEMM above).
            unsafe { l.launch(ew_launch(gpu, rows * 32)) }.map_err(GpuError::driver("launching attn_softmax_rows_bf16"))?;
        }
        gpu.gemm_strided_batched(false, false, n, dh, n, 1.0, p, n * n, v, n * dh, 0.0, o, n * dh, bh)
    }

    /// Gradients `dq, dk, dv [B, h, N, dh]` from `dout [B, h, N, dh]` and the forward's `p`;
    /// `dp` is a `[B, h, N, N]` scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        gpu: &GpuContext,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        p: &CudaSlice<bf16>,
        dout: &CudaSlice<bf16>,
        dp: &mut CudaSlice<bf16>,
        dq: &mut CudaSlice<bf16>,
        dk: &mut CudaSlice<bf16>,
        dv: &mut CudaSlice<bf16>,
        sh: &AttnShape,
    ) -> Result<(), GpuError> {
        let d = check_full("attention unfused backward", sh)?;
        let (n, dh, bh) = (sh.tokens, sh.head_dim, d.bh as usize);
        gpu.gemm_strided_batched(true, false, n, dh, n, 1.0, p, n * n, dout, n * dh, 0.0, dv, n * dh, bh)?;
        gpu.gemm_strided_batched(false, true, n, n, dh, 1.0, dout, n * dh, v, n * dh, 0.0, dp, n * n, bh)?;
        let f = gpu.function("attention", "attn_softmax_bwd_rows_bf16")?;
        let rows = (bh * n) as u64;
        let n32 = n as u32;
        {
            let s = gpu.stream();
            let (pp, _g1) = p.device_ptr(s);
            let (dpp, _g2) = dp.device_ptr_mut(s);
            let mut l = s.launch_builder(&f);
            l.arg(&pp).arg(&dpp).arg(&rows).arg(&n32).arg(&d.scale);
            // SAFETY: p and dp hold bh*N*N elements (checked by the GEMMs above).
            unsafe { l.launch(ew_launch(gpu, rows * 32)) }.map_err(GpuError::driver("launching attn_softmax_bwd_rows_bf16"))?;
        }
        gpu.gemm_strided_batched(false, false, n, dh, n, 1.0, dp, n * n, k, n * dh, 0.0, dq, n * dh, bh)?;
        gpu.gemm_strided_batched(true, false, n, dh, n, 1.0, dp, n * n, q, n * dh, 0.0, dk, n * dh, bh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, dh: usize, ps: usize, pe: usize) -> AttnShape {
        AttnShape::full(2, n, 3, dh, ps, pe)
    }

    #[test]
    fn cuda_attention_shape_checks_name_the_problem() {
        let d = check_shape("t", &shape(227, 64, 1, 31)).unwrap();
        assert_eq!((d.n, d.h, d.ps, d.pe, d.bh), (227, 3, 1, 31, 6));
        assert!((d.scale - 0.125).abs() < 1e-7);
        let e = check_shape("t", &shape(227, 48, 1, 31)).unwrap_err().to_string();
        assert!(e.contains("head dim 48"), "{e}");
        let e = check_shape("t", &shape(20, 64, 1, 31)).unwrap_err().to_string();
        assert!(e.contains("prompt range 1..31"), "{e}");
        let e = check_shape("t", &shape(20, 64, 5, 2)).unwrap_err().to_string();
        assert!(e.contains("prompt range 5..2"), "{e}");
        let e = check_shape("t", &AttnShape { q_start: 1, ..shape(20, 64, 1, 3) }).unwrap_err().to_string();
        assert!(e.contains("query range 1..21"), "{e}");
        let d = check_shape("t", &AttnShape { q_start: 1, q_len: 30, ..shape(227, 64, 1, 31) }).unwrap();
        assert_eq!((d.qs, d.nq), (1, 30));
        let big = AttnShape { batch: 65_536, ..shape(4, 32, 0, 0) };
        assert!(check_shape("t", &big).unwrap_err().to_string().contains("65535"));
    }

    #[test]
    fn cuda_attention_scratch_holds_dq_sums_and_row_sums() {
        let sh = shape(227, 64, 1, 31);
        assert_eq!(backward_scratch_len(&sh), 2 * 227 * 192 + 2 * 3 * 227);
        let last = AttnShape { q_start: 1, q_len: 30, ..sh };
        assert_eq!(backward_scratch_len(&last), 2 * 30 * 192 + 2 * 3 * 30);
    }
}
