//! GPU launchers of fused prompt-masked attention (`kernels/attention.cu`, FlashAttention-2
//! style on tensor cores), the twins of [`super::cpu::forward`] and [`super::cpu::backward`]:
//! bf16 storage, fp32 softmax and accumulation, no `N x N` matrix in memory.
//!
//! **One call each**: [`forward`] and [`backward`] take Q, K, V as typed views ([`Qkv`]: the
//! packed `qkv [B, N, 3, h, dh]` of a timm `qkv` projection, or three separate `[B, N, h, dh]`
//! tensors, any element strides with the head dim contiguous), the prompt mask and query range
//! as [`AttnOptions`], and size their outputs from the input shape. [`forward_with`] and
//! [`backward_with`] are the packed-layout calls with a chosen tile shape and caller-held
//! buffers (the training step's and the benchmarks').
//!
//! Head dims: [`HEAD_DIMS`]. Any token count. Every row of every bf16 view must start on a
//! 16-byte boundary (strides multiples of 8 elements; any `CudaSlice` is aligned). The forward
//! and dK, dV are deterministic; dQ is summed with fp32 atomics, so its last bits may vary
//! between runs (except with a split backward of [`super::BWD_TILES`], which computes dQ in a
//! pass of its own).
//!
//! [`plain_forward`] and [`plain_backward`] are a plain fp32 attention (no tensor cores, any
//! head dim) for the head dims the fused kernels lack.
//!
//! [`unfused`] is the textbook path (cuBLAS strided-batched GEMMs and a softmax kernel over a
//! materialised score matrix) that benches/gpu_attention.rs measures the fused kernels against.

use super::{bwd_tiles, fwd_tiles, AttnShape, BwdTiles, FwdTiles, FUSED_THREADS};
use crate::contract::attention::{AttnParams, PlainAttnParams};
use crate::gpu::kernels::attention;
use crate::gpu::launch::{check_aligned, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{bf16, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError, Kernel, Layout, Tensor, TensorMut};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use std::ops::Range;

/// Head dims the fused kernels are compiled for.
///
/// ```
/// use mlvpt::ops::attention::cuda::HEAD_DIMS;
/// assert_eq!(HEAD_DIMS, [32, 64, 80, 128]);
/// assert!(HEAD_DIMS.contains(&(768 / 12))); // ViT-B
/// ```
pub const HEAD_DIMS: &[usize] = super::FUSED_HEAD_DIMS;

const THREADS: u32 = FUSED_THREADS as u32;
/// Dynamic shared memory a kernel may take without opting in.
const SMEM_DEFAULT_MAX: usize = 48 * 1024;

/// The backward's row-sum kernel of a head dim.
fn pre_kernel(head_dim: usize) -> Kernel {
    match head_dim {
        32 => attention::ATTN_BWD_PRE_D32,
        64 => attention::ATTN_BWD_PRE_D64,
        80 => attention::ATTN_BWD_PRE_D80,
        _ => attention::ATTN_BWD_PRE_D128,
    }
}

/// `kernel` with `bytes` of dynamic shared memory allowed (above 48 KB a kernel must opt in).
fn function_with_smem(gpu: &GpuContext, kernel: Kernel, bytes: usize) -> Result<CudaFunction, GpuError> {
    let f = gpu.kernel(kernel)?;
    if bytes > SMEM_DEFAULT_MAX {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(GpuError::driver(format!("allowing {kernel} {bytes} bytes of shared memory")))?;
    }
    Ok(f)
}

/// Elements (f32) of the scratch [`backward_with`] needs: a dQ accumulator `[B, Nq, h*dh]`
/// followed by `D_i = rowsum(dO * O)` per query row, `[B, h, Nq]`.
///
/// ```
/// use mlvpt::ops::attention::{cuda::backward_scratch_len, AttnShape};
/// let sh = AttnShape::full(2, 10, 3, 32, 1, 4); // B 2, N 10, 3 heads of 32
/// assert_eq!(backward_scratch_len(&sh), 2 * 10 * 96 + 2 * 3 * 10); // dQ sums, then row sums
/// ```
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
            format!(
                "prompt range {}..{} not inside 0..{} tokens",
                sh.prompt_start, sh.prompt_end, sh.tokens
            ),
        ));
    }
    if sh.q_start + sh.q_len > sh.tokens {
        return Err(GpuError::invalid(
            op,
            format!(
                "query range {}..{} not inside 0..{} tokens",
                sh.q_start,
                sh.q_start + sh.q_len,
                sh.tokens
            ),
        ));
    }
    let i32_of = |what: &str, v: usize| {
        i32::try_from(v).map_err(|_| GpuError::invalid(op, format!("{what} = {v} exceeds the kernels' 32-bit index")))
    };
    let bh = sh.batch * sh.heads;
    if bh > 65_535 {
        return Err(GpuError::invalid(
            op,
            format!("batch x heads = {bh} exceeds the 65535 blocks of grid.y"),
        ));
    }
    // Token indices are 32-bit inside the kernels; offsets within an image too.
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
        return Err(GpuError::invalid(
            op,
            format!("tiles for head dim {head_dim} are not a compiled shape of head dim {}", sh.head_dim),
        ));
    }
    Ok(())
}

fn blocks(items: usize, per: usize) -> u32 {
    items.div_ceil(per) as u32
}

/// Parameters of a shape with every pointer null and every stride zero.
fn params_of(d: &Dims, sh: &AttnShape) -> AttnParams {
    AttnParams {
        b: sh.batch as i32,
        n: d.n,
        h: d.h,
        dh: sh.head_dim as i32,
        ps: d.ps,
        pe: d.pe,
        qs: d.qs,
        nq: d.nq,
        scale: d.scale,
        ..AttnParams::default()
    }
}

/// (batch, row, head) element strides of a `[B, rows, h, dh]` layout.
fn bth(l: &Layout<4>) -> (i64, i64, i64) {
    (l.strides[0] as i64, l.strides[1] as i64, l.strides[2] as i64)
}

/// The layouts of Q, K, V inside a packed `qkv [B, N, 3, h, dh]`.
fn packed_layouts(b: usize, n: usize, h: usize, dh: usize) -> [Layout<4>; 3] {
    let d = h * dh;
    let strides = [n * 3 * d, 3 * d, dh, 1];
    [0, 1, 2].map(|i| Layout {
        offset: i * d,
        shape: [b, n, h, dh],
        strides,
    })
}

/// Sets Q, K, V (pointers and strides) in `p`.
fn set_qkv(p: &mut AttnParams, ptrs: [u64; 3], l: &[Layout<4>; 3]) {
    (p.q, p.k, p.v) = (ptrs[0], ptrs[1], ptrs[2]);
    (p.q_batch_stride, p.q_row_stride, p.q_head_stride) = bth(&l[0]);
    (p.k_batch_stride, p.k_row_stride, p.k_head_stride) = bth(&l[1]);
    (p.v_batch_stride, p.v_row_stride, p.v_head_stride) = bth(&l[2]);
}

/// Sets dQ, dK, dV in `p`.
fn set_dqkv(p: &mut AttnParams, ptrs: [u64; 3], l: &[Layout<4>; 3]) {
    (p.dq, p.dk, p.dv) = (ptrs[0], ptrs[1], ptrs[2]);
    (p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride) = bth(&l[0]);
    (p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) = bth(&l[1]);
    (p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride) = bth(&l[2]);
}

/// The forward launch of filled-in parameters.
fn launch_forward(gpu: &GpuContext, stream: &CudaStream, p: &AttnParams, tiles: &FwdTiles) -> Result<(), GpuError> {
    let smem = tiles.smem_bytes();
    let kernel = Kernel::new("attention", tiles.kernel);
    let f = function_with_smem(gpu, kernel, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks(p.nq as usize, tiles.rows), (p.b * p.h) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(p);
    // SAFETY: the callers checked every view's extent and alignment against the shape in `p`;
    // AttnParams is the kernel's one argument (src/contract.rs).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {kernel}")))?;
    Ok(())
}

/// The backward's launches of filled-in parameters (`dq_acc`, `dvec` set from the scratch at
/// `scratch`, which holds [`backward_scratch_len`] floats).
fn launch_backward(gpu: &GpuContext, stream: &CudaStream, p: &mut AttnParams, scratch: u64, tiles: &BwdTiles) -> Result<(), GpuError> {
    let (b, n, nq, dim) = (p.b as usize, p.n as usize, p.nq as usize, (p.h * p.dh) as usize);
    let dq_acc = scratch;
    p.dvec = scratch + (b * nq * dim * std::mem::size_of::<f32>()) as u64;
    // A split backward keeps no dQ sums: a null pointer tells the kernels so.
    p.dq_acc = if tiles.dq_kernel.is_some() { 0 } else { dq_acc };
    let bh = (p.b * p.h) as u32;

    // Grid-stride over the rows' lanes; one thread per 8 elements of out/dout bounds the grid.
    let pre = pre_kernel(p.dh as usize);
    let f = gpu.kernel(pre)?;
    let chunks = (b * nq * dim / 8) as u64;
    let cfg = LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, chunks, BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&*p);
    // SAFETY: as in launch_forward; the scratch holds B*Nq*D + B*h*Nq floats.
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {pre}")))?;

    let smem = tiles.smem_bytes();
    let main = Kernel::new("attention", tiles.kernel);
    let f = function_with_smem(gpu, main, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks(n, tiles.keys), bh, 1),
        block_dim: (tiles.threads() as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&*p);
    // SAFETY: as above; writes dK, dV and adds into the dQ sums (a split backward: the zero dQ
    // rows of its keys outside the query range instead).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {main}")))?;

    if let Some(dq_name) = tiles.dq_kernel {
        if nq == 0 {
            return Ok(());
        }
        let smem = tiles.dq_smem_bytes();
        let dq_kernel = Kernel::new("attention", dq_name);
        let f = function_with_smem(gpu, dq_kernel, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(nq, BwdTiles::DQ_ROWS), bh, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&*p);
        // SAFETY: as above; writes dQ of the query tokens.
        unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {dq_kernel}")))?;
        return Ok(());
    }

    let f = gpu.kernel(attention::ATTN_BWD_DQ_CONVERT)?;
    let tok = (b * n) as u64;
    let cfg = LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, tok * (dim as u64 / 8), BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&*p);
    // SAFETY: reads B*Nq*D floats of scratch, writes dQ (head dims are multiples of 8).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching attn_bwd_dq_convert"))?;
    Ok(())
}

/// Q, K and V of one attention call: three `[B, N, h, dh]` views (head dim contiguous, any
/// other strides), packed or separate.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor};
/// use mlvpt::ops::attention::{self, cuda::{self, AttnOptions, Qkv}, AttnShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (1, 8, 2, 32);
/// let d = h * dh;
/// // Packed [B, N, 3, h, dh] values (exact in bf16), and Q, K, V as three tensors of their own.
/// let x: Vec<f32> = (0..b * n * 3 * d).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0).to_f32()).collect();
/// let part = |s: usize| (0..b * n).flat_map(|r| &x[(r * 3 + s) * d..(r * 3 + s + 1) * d]).map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
/// let (q, k, v) = (gpu.upload(&part(0))?, gpu.upload(&part(1))?, gpu.upload(&part(2))?);
/// let shape = [b, n, h, dh];
/// let qkv = Qkv { q: Tensor::new(&q, shape), k: Tensor::new(&k, shape), v: Tensor::new(&v, shape) };
/// let fwd = cuda::forward(&gpu, &qkv, &AttnOptions::default())?;
/// // The CPU twin (packed layout).
/// let (mut out, mut lse) = (vec![0.0f32; b * n * d], vec![0.0f32; b * h * n]);
/// attention::cpu::forward(&x, &mut out, &mut lse, &AttnShape::full(b, n, h, dh, 0, 0), &mut Vec::new());
/// let big = out.iter().fold(0.0f32, |m, w| m.max(w.abs()));
/// for (g, w) in gpu.download(&fwd.out)?.iter().zip(&out) {
///     assert!((g.to_f32() - w).abs() <= 2e-2 * big + 1e-4, "{g} vs {w}"); // bf16 P and output
/// }
/// # Ok(()) }
/// ```
pub struct Qkv<'a> {
    pub q: Tensor<'a, bf16, 4>,
    pub k: Tensor<'a, bf16, 4>,
    pub v: Tensor<'a, bf16, 4>,
}

impl<'a> Qkv<'a> {
    /// The packed output of a timm `qkv` projection, `[B, N, 3, h, dh]` (`[B, N, 3D]`), read in
    /// place by strides.
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext};
    /// use mlvpt::ops::attention::cuda::Qkv;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let qkv = gpu.upload(&vec![bf16::ZERO; 2 * 10 * 3 * 64])?; // B=2, N=10, D=64
    /// let v = Qkv::packed(&qkv, 2, 10, 2, 32);
    /// assert_eq!(v.k.strides(), [10 * 192, 192, 32, 1]);
    /// # Ok(()) }
    /// ```
    pub fn packed(qkv: &'a impl DevicePtr<bf16>, batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Self {
        let [lq, lk, lv] = packed_layouts(batch, tokens, heads, head_dim);
        let view = |l: Layout<4>| Tensor::strided(qkv, l.offset, l.shape, l.strides);
        Self {
            q: view(lq),
            k: view(lk),
            v: view(lv),
        }
    }
    /// Three views (each `[B, N, h, dh]`, of one shape).
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext, Tensor};
    /// use mlvpt::ops::attention::cuda::{self, AttnOptions, Qkv};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let shape = [2, 5, 1, 32]; // B 2, N 5, one head of 32
    /// let q = gpu.upload(&vec![bf16::from_f32(0.5); 2 * 5 * 32])?;
    /// let kv = gpu.upload(&vec![bf16::from_f32(0.25); 2 * 5 * 32])?;
    /// // K and V may be the same tensor.
    /// let qkv = Qkv::new(Tensor::new(&q, shape), Tensor::new(&kv, shape), Tensor::new(&kv, shape));
    /// let fwd = cuda::forward(&gpu, &qkv, &AttnOptions::default())?;
    /// assert!(gpu.download(&fwd.out)?.iter().all(|o| o.to_f32() == 0.25)); // a mean of equal values
    /// # Ok(()) }
    /// ```
    pub fn new(q: Tensor<'a, bf16, 4>, k: Tensor<'a, bf16, 4>, v: Tensor<'a, bf16, 4>) -> Self {
        Self { q, k, v }
    }
    /// `[B, N, h, dh]`, after checking the three views agree.
    fn shape(&self, op: &'static str) -> Result<[usize; 4], GpuError> {
        let s = self.q.shape();
        for (name, t) in [("k", &self.k), ("v", &self.v)] {
            if t.shape() != s {
                return Err(GpuError::invalid(
                    op,
                    format!("{name} has shape {:?}, q has {s:?} (each [B, N, h, dh])", t.shape()),
                ));
            }
        }
        Ok(s)
    }
}

/// Where [`backward`] writes dQ, dK and dV (overwritten; dQ rows of tokens outside the query
/// range are zero).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor, TensorMut};
/// use mlvpt::ops::attention::cuda::{self, AttnOptions, Qkv, QkvGrads};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (1, 6, 2, 32);
/// let d = h * dh;
/// let x: Vec<bf16> = (0..b * n * 3 * d).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0)).collect();
/// let qkv_buf = gpu.upload(&x)?;
/// let qkv = Qkv::packed(&qkv_buf, b, n, h, dh);
/// let opts = AttnOptions::default();
/// let fwd = cuda::forward(&gpu, &qkv, &opts)?;
/// let dout = gpu.upload(&vec![bf16::from_f32(0.5); b * n * d])?;
/// let shape = [b, n, h, dh];
/// // Into three tensors...
/// let (mut dq, mut dk, mut dv) = (gpu.zeros::<bf16>(b * n * d)?, gpu.zeros::<bf16>(b * n * d)?, gpu.zeros::<bf16>(b * n * d)?);
/// let separate = QkvGrads::Separate { dq: TensorMut::new(&mut dq, shape), dk: TensorMut::new(&mut dk, shape), dv: TensorMut::new(&mut dv, shape) };
/// cuda::backward(&gpu, &qkv, &fwd.out(), &fwd.lse(), &Tensor::new(&dout, shape), separate, &opts)?;
/// // ... or into one packed dqkv [B, N, 3, h, dh], the layout of qkv.
/// let mut dqkv = gpu.zeros::<bf16>(b * n * 3 * d)?;
/// cuda::backward(&gpu, &qkv, &fwd.out(), &fwd.lse(), &Tensor::new(&dout, shape), QkvGrads::Packed(&mut dqkv), &opts)?;
/// let packed = gpu.download(&dqkv)?;
/// let packed_dv: Vec<bf16> = (0..b * n).flat_map(|r| packed[(r * 3 + 2) * d..(r * 3 + 3) * d].to_vec()).collect();
/// assert_eq!(gpu.download(&dv)?, packed_dv); // dK and dV are deterministic
/// # Ok(()) }
/// ```
#[allow(clippy::large_enum_variant)] // built for one call: boxing the views would only allocate
pub enum QkvGrads<'a> {
    /// One buffer `dqkv [B, N, 3, h, dh]`, the layout of [`Qkv::packed`].
    Packed(&'a mut dyn DevicePtrMut<bf16>),
    /// Three `[B, N, h, dh]` views, each in a buffer of its own.
    Separate {
        dq: TensorMut<'a, bf16, 4>,
        dk: TensorMut<'a, bf16, 4>,
        dv: TensorMut<'a, bf16, 4>,
    },
}

/// The prompt mask and the query range of an attention call.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::attention::{self, cuda::{self, AttnOptions, Qkv}, AttnShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (2, 7, 1, 32);
/// let x: Vec<f32> = (0..b * n * 3 * dh).map(|i| bf16::from_f32(((i * 29) % 97) as f32 / 40.0 - 1.2).to_f32()).collect();
/// let qkv = gpu.upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())?;
/// // ML-VPT's last block: CLS, prompts 1..3 masked from each other, and only the prompts' outputs.
/// let opts = AttnOptions { prompts: Some(1..3), queries: Some(1..3) };
/// let fwd = cuda::forward(&gpu, &Qkv::packed(&qkv, b, n, h, dh), &opts)?;
/// assert_eq!(fwd.shape, [b, 2, h, dh]); // [B, queries, h, dh]
/// let sh = AttnShape { q_start: 1, q_len: 2, ..AttnShape::full(b, n, h, dh, 1, 3) };
/// let (mut out, mut lse) = (vec![0.0f32; b * 2 * dh], vec![0.0f32; b * h * 2]);
/// attention::cpu::forward(&x, &mut out, &mut lse, &sh, &mut Vec::new()); // the CPU twin
/// for (g, w) in gpu.download(&fwd.lse)?.iter().zip(&lse) {
///     assert!((g - w).abs() < 1e-2, "{g} vs {w}");
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttnOptions {
    /// Tokens that are prompts: a prompt query does not attend to the other prompts' keys
    /// (ML-VPT: `1..1 + P`). `None`: no mask.
    pub prompts: Option<Range<usize>>,
    /// Tokens that are queries (keys are always all tokens). `None`: every token.
    pub queries: Option<Range<usize>>,
}

impl AttnOptions {
    fn shape(&self, op: &'static str, [b, n, h, dh]: [usize; 4]) -> Result<AttnShape, GpuError> {
        let p = self.prompts.clone().unwrap_or(0..0);
        let q = self.queries.clone().unwrap_or(0..n);
        if q.start > q.end {
            return Err(GpuError::invalid(op, format!("query range {}..{} is reversed", q.start, q.end)));
        }
        Ok(AttnShape {
            batch: b,
            tokens: n,
            heads: h,
            head_dim: dh,
            prompt_start: p.start,
            prompt_end: p.end,
            q_start: q.start,
            q_len: q.end - q.start,
        })
    }
}

/// The forward's results: `out [B, Nq, h, dh]` (bf16, contiguous: `[B, Nq, h*dh]`, the input of
/// the output projection) and `lse [B, h, Nq]` (f32), which [`backward`] takes back.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::attention::cuda::{self, AttnOptions, AttnOutput, Qkv};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (1, 4, 2, 32);
/// let qkv = gpu.upload(&vec![bf16::ZERO; b * n * 3 * h * dh])?;
/// let fwd: AttnOutput = cuda::forward(&gpu, &Qkv::packed(&qkv, b, n, h, dh), &AttnOptions::default())?;
/// assert_eq!(fwd.shape, [b, n, h, dh]);
/// assert_eq!((fwd.out.len(), fwd.lse.len()), (b * n * h * dh, b * h * n));
/// // Zero scores: a uniform softmax over 4 keys, lse = ln 4.
/// assert!(gpu.download(&fwd.lse)?.iter().all(|l| (l - 4f32.ln()).abs() < 1e-6));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AttnOutput {
    pub out: CudaSlice<bf16>,
    pub lse: CudaSlice<f32>,
    /// `[B, Nq, h, dh]`.
    pub shape: [usize; 4],
}

impl AttnOutput {
    /// `out` as a view.
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext};
    /// use mlvpt::ops::attention::cuda::{self, AttnOptions, Qkv};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let qkv = gpu.upload(&vec![bf16::ONE; 3 * 3 * 32])?; // B 1, N 3, one head of 32
    /// let fwd = cuda::forward(&gpu, &Qkv::packed(&qkv, 1, 3, 1, 32), &AttnOptions::default())?;
    /// let out = fwd.out(); // what the backward takes back
    /// assert_eq!((out.shape(), out.strides()), ([1, 3, 1, 32], [96, 32, 32, 1]));
    /// # Ok(()) }
    /// ```
    pub fn out(&self) -> Tensor<'_, bf16, 4> {
        Tensor::new(&self.out, self.shape)
    }
    /// `lse` as a view, `[B, h, Nq]`.
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext};
    /// use mlvpt::ops::attention::cuda::{self, AttnOptions, Qkv};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let qkv = gpu.upload(&vec![bf16::ONE; 2 * 3 * 3 * 64])?; // B 2, N 3, two heads of 32
    /// let opts = AttnOptions { prompts: None, queries: Some(0..1) }; // CLS only
    /// let fwd = cuda::forward(&gpu, &Qkv::packed(&qkv, 2, 3, 2, 32), &opts)?;
    /// assert_eq!(fwd.lse().shape(), [2, 2, 1]); // [B, h, queries]
    /// # Ok(()) }
    /// ```
    pub fn lse(&self) -> Tensor<'_, f32, 3> {
        let [b, nq, h, _] = self.shape;
        Tensor::new(&self.lse, [b, h, nq])
    }
}

/// `[B, N, h, dh]` of checked Q, K, V views.
fn check_qkv(op: &'static str, stream: &CudaStream, qkv: &Qkv) -> Result<[usize; 4], GpuError> {
    for (name, t) in [("q", &qkv.q), ("k", &qkv.k), ("v", &qkv.v)] {
        t.check(op, name, stream, true)?;
    }
    qkv.shape(op)
}

/// Fused attention forward on a device: `out = softmax(mask(Q K^T / sqrt(dh))) V` for each
/// image and head over the query tokens of `opts` (all by default), every key; a prompt query
/// (in `opts.prompts`) skips the other prompts' keys. Allocates and returns `out [B, Nq, h, dh]`
/// and the log-sum-exps `lse [B, h, Nq]` the backward needs. The twin of
/// [`super::cpu::forward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, GpuError};
/// use mlvpt::ops::attention::cuda::{self, AttnOptions, Qkv};
/// # fn main() -> Result<(), GpuError> {
/// # if !GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // ViT-B heads (12 x 64) of CLS + 10 prompts + 49 patches, packed as timm's qkv projection.
/// let (b, n, h, dh) = (1, 60, 12, 64);
/// let qkv = gpu.upload(&vec![bf16::from_f32(0.1); b * n * 3 * h * dh])?;
/// let opts = AttnOptions { prompts: Some(1..11), queries: None };
/// let fwd = cuda::forward(&gpu, &Qkv::packed(&qkv, b, n, h, dh), &opts)?;
/// assert_eq!(fwd.shape, [b, n, h, dh]);
///
/// // Backward from dL/dout into a packed dqkv.
/// let dout = gpu.upload(&vec![bf16::from_f32(0.01); b * n * h * dh])?;
/// let mut dqkv = gpu.zeros::<bf16>(b * n * 3 * h * dh)?;
/// let dout_view = mlvpt::gpu::Tensor::new(&dout, fwd.shape);
/// cuda::backward(&gpu, &Qkv::packed(&qkv, b, n, h, dh), &fwd.out(), &fwd.lse(), &dout_view, cuda::QkvGrads::Packed(&mut dqkv), &opts)?;
/// # Ok(()) }
/// ```
pub fn forward(gpu: &GpuContext, qkv: &Qkv, opts: &AttnOptions) -> Result<AttnOutput, GpuError> {
    const OP: &str = "attention forward";
    let stream = gpu.stream();
    let sh = opts.shape(OP, check_qkv(OP, stream, qkv)?)?;
    check_shape(OP, &sh)?;
    let shape = [sh.batch, sh.q_len, sh.heads, sh.head_dim];
    let out_len = (sh.batch * sh.q_len * sh.dim()).max(1);
    let mut out = gpu.zeros::<bf16>(out_len)?;
    let mut lse = gpu.zeros::<f32>((sh.batch * sh.heads * sh.q_len).max(1))?;
    forward_into(
        gpu,
        qkv,
        &mut TensorMut::new(&mut out, shape),
        &mut TensorMut::new(&mut lse, [sh.batch, sh.heads, sh.q_len]),
        opts,
    )?;
    Ok(AttnOutput { out, lse, shape })
}

/// [`forward`] into caller-held views: `out [B, Nq, h, dh]` (any strides, head dim
/// contiguous) and `lse [B, h, Nq]` (contiguous).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, TensorMut};
/// use mlvpt::ops::attention::cuda::{self, AttnOptions, Qkv};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (1, 5, 2, 32);
/// let d = h * dh;
/// let x: Vec<bf16> = (0..b * n * 3 * d).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0)).collect();
/// let qkv_buf = gpu.upload(&x)?;
/// let qkv = Qkv::packed(&qkv_buf, b, n, h, dh);
/// // Write each token's output into the first half of a row of 2D (e.g. beside a residual).
/// let mut wide = gpu.zeros::<bf16>(b * n * 2 * d)?;
/// let mut lse = gpu.zeros::<f32>(b * h * n)?;
/// {
///     let mut out = TensorMut::strided(&mut wide, 0, [b, n, h, dh], [n * 2 * d, 2 * d, dh, 1]);
///     cuda::forward_into(&gpu, &qkv, &mut out, &mut TensorMut::new(&mut lse, [b, h, n]), &AttnOptions::default())?;
/// }
/// let dense = cuda::forward(&gpu, &qkv, &AttnOptions::default())?; // the same values, dense
/// let (wide, dense) = (gpu.download(&wide)?, gpu.download(&dense.out)?);
/// for t in 0..b * n {
///     assert_eq!(wide[t * 2 * d..t * 2 * d + d], dense[t * d..(t + 1) * d]);
///     assert!(wide[t * 2 * d + d..(t + 1) * 2 * d].iter().all(|v| *v == bf16::ZERO)); // untouched
/// }
/// # Ok(()) }
/// ```
pub fn forward_into(
    gpu: &GpuContext,
    qkv: &Qkv,
    out: &mut TensorMut<bf16, 4>,
    lse: &mut TensorMut<f32, 3>,
    opts: &AttnOptions,
) -> Result<(), GpuError> {
    const OP: &str = "attention forward";
    let stream = gpu.stream();
    let sh = opts.shape(OP, check_qkv(OP, stream, qkv)?)?;
    let d = check_shape(OP, &sh)?;
    let tiles = fwd_tiles(sh.head_dim).ok_or_else(|| unsupported(OP, sh.head_dim))?;
    let want_out = [sh.batch, sh.q_len, sh.heads, sh.head_dim];
    if out.shape() != want_out {
        return Err(GpuError::invalid(
            OP,
            format!("out has shape {:?}, needs {want_out:?} ([B, queries, h, dh])", out.shape()),
        ));
    }
    let want_lse = [sh.batch, sh.heads, sh.q_len];
    if lse.shape() != want_lse || !lse.layout().is_contiguous() {
        return Err(GpuError::invalid(
            OP,
            format!("lse must be a contiguous {want_lse:?} ([B, h, queries]), is {:?}", lse.layout()),
        ));
    }
    out.check(OP, "out", stream, true)?;
    lse.check(OP, "lse", stream, false)?;
    if d.bh == 0 || sh.q_len == 0 {
        return Ok(());
    }
    let mut p = params_of(&d, &sh);
    let (qp, _g1) = qkv.q.ptr(stream);
    let (kp, _g2) = qkv.k.ptr(stream);
    let (vp, _g3) = qkv.v.ptr(stream);
    set_qkv(&mut p, [qp, kp, vp], &[*qkv.q.layout(), *qkv.k.layout(), *qkv.v.layout()]);
    let out_layout = *out.layout();
    let (op, _g4) = out.ptr_mut(stream);
    let (lp, _g5) = lse.ptr_mut(stream);
    (p.o, p.lse) = (op, lp);
    (p.o_batch_stride, p.o_row_stride, p.o_head_stride) = bth(&out_layout);
    launch_forward(gpu, stream, &p, &tiles)
}

/// Fused attention backward on a device: from `dout [B, Nq, h, dh]` and [`forward`]'s `out`
/// and `lse`, writes dQ, dK, dV into `grads` (recomputing the probabilities from `lse`; dQ
/// rows of non-query tokens zero). Allocates its fp32 scratch. The twin of
/// [`super::cpu::backward`]; see [`forward`] for an example.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor};
/// use mlvpt::ops::attention::{self, cuda::{self, AttnOptions, Qkv, QkvGrads}, AttnShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (2, 6, 2, 32);
/// let d = h * dh;
/// let x: Vec<f32> = (0..b * n * 3 * d).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0).to_f32()).collect();
/// let g: Vec<f32> = (0..b * n * d).map(|i| bf16::from_f32(((i * 13) % 17) as f32 / 8.0 - 1.0).to_f32()).collect();
/// let to16 = |v: &[f32]| v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
/// let (qkv_buf, dout) = (gpu.upload(&to16(&x))?, gpu.upload(&to16(&g))?);
/// let qkv = Qkv::packed(&qkv_buf, b, n, h, dh);
/// let opts = AttnOptions { prompts: Some(1..3), queries: None };
/// let fwd = cuda::forward(&gpu, &qkv, &opts)?;
/// let mut dqkv = gpu.zeros::<bf16>(b * n * 3 * d)?;
/// cuda::backward(&gpu, &qkv, &fwd.out(), &fwd.lse(), &Tensor::new(&dout, fwd.shape), QkvGrads::Packed(&mut dqkv), &opts)?;
/// // The CPU twin, on the same bf16 values.
/// let sh = AttnShape::full(b, n, h, dh, 1, 3);
/// let (mut out, mut lse, mut want) = (vec![0.0f32; b * n * d], vec![0.0f32; b * h * n], vec![0.0f32; b * n * 3 * d]);
/// let mut scratch = Vec::new();
/// attention::cpu::forward(&x, &mut out, &mut lse, &sh, &mut scratch);
/// attention::cpu::backward(&x, &out, &lse, &g, &mut want, &sh, &mut scratch);
/// let big = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
/// for (got, w) in gpu.download(&dqkv)?.iter().zip(&want) {
///     assert!((got.to_f32() - w).abs() <= 2e-2 * big + 1e-4, "{got} vs {w}");
/// }
/// # Ok(()) }
/// ```
pub fn backward(
    gpu: &GpuContext,
    qkv: &Qkv,
    out: &Tensor<bf16, 4>,
    lse: &Tensor<f32, 3>,
    dout: &Tensor<bf16, 4>,
    grads: QkvGrads,
    opts: &AttnOptions,
) -> Result<(), GpuError> {
    const OP: &str = "attention backward";
    let stream = gpu.stream();
    let sh = opts.shape(OP, check_qkv(OP, stream, qkv)?)?;
    let d = check_shape(OP, &sh)?;
    let tiles = bwd_tiles(sh.head_dim).ok_or_else(|| unsupported(OP, sh.head_dim))?;
    let want = [sh.batch, sh.q_len, sh.heads, sh.head_dim];
    for (name, t) in [("out", out), ("dout", dout)] {
        if t.shape() != want {
            return Err(GpuError::invalid(
                OP,
                format!("{name} has shape {:?}, needs {want:?} ([B, queries, h, dh])", t.shape()),
            ));
        }
        t.check(OP, name, stream, true)?;
    }
    let want_lse = [sh.batch, sh.heads, sh.q_len];
    if lse.shape() != want_lse || !lse.layout().is_contiguous() {
        return Err(GpuError::invalid(
            OP,
            format!("lse must be a contiguous {want_lse:?} ([B, h, queries]), is {:?}", lse.layout()),
        ));
    }
    lse.check(OP, "lse", stream, false)?;
    if d.bh == 0 || sh.tokens == 0 {
        return Ok(());
    }
    let mut scratch = gpu.zeros::<f32>(backward_scratch_len(&sh).max(1))?;
    let mut p = params_of(&d, &sh);
    let (qp, _g1) = qkv.q.ptr(stream);
    let (kp, _g2) = qkv.k.ptr(stream);
    let (vp, _g3) = qkv.v.ptr(stream);
    set_qkv(&mut p, [qp, kp, vp], &[*qkv.q.layout(), *qkv.k.layout(), *qkv.v.layout()]);
    let (op, _g4) = out.ptr(stream);
    let (lp, _g5) = lse.ptr(stream);
    let (dop, _g6) = dout.ptr(stream);
    (p.o, p.lse, p.dout) = (op, lp, dop);
    (p.o_batch_stride, p.o_row_stride, p.o_head_stride) = bth(out.layout());
    (p.do_batch_stride, p.do_row_stride, p.do_head_stride) = bth(dout.layout());
    let (sp, _g7) = scratch.device_ptr_mut(stream);
    let want_grad = [sh.batch, sh.tokens, sh.heads, sh.head_dim];
    match grads {
        QkvGrads::Packed(buf) => {
            let layouts = packed_layouts(sh.batch, sh.tokens, sh.heads, sh.head_dim);
            let len = buf.len();
            let (base, _g8) = buf.device_ptr_mut(stream);
            layouts[2].check(OP, "dqkv", len, base, 2, true)?;
            set_dqkv(&mut p, layouts.map(|l| base + (l.offset * 2) as u64), &layouts);
            launch_backward(gpu, stream, &mut p, sp, &tiles)
        }
        QkvGrads::Separate { mut dq, mut dk, mut dv } => {
            for (name, t) in [("dq", &mut dq), ("dk", &mut dk), ("dv", &mut dv)] {
                if t.shape() != want_grad {
                    return Err(GpuError::invalid(
                        OP,
                        format!("{name} has shape {:?}, needs {want_grad:?} ([B, N, h, dh])", t.shape()),
                    ));
                }
                t.check(OP, name, stream, true)?;
            }
            let layouts = [*dq.layout(), *dk.layout(), *dv.layout()];
            let (dqp, _g8) = dq.ptr_mut(stream);
            let (dkp, _g9) = dk.ptr_mut(stream);
            let (dvp, _g10) = dv.ptr_mut(stream);
            set_dqkv(&mut p, [dqp, dkp, dvp], &layouts);
            launch_backward(gpu, stream, &mut p, sp, &tiles)
        }
    }
}

/// The packed-layout forward with a chosen compiled tile shape of `sh.head_dim`
/// ([`super::FWD_TILES`]) and caller-held buffers: reads `qkv [B, N, 3, h, dh]`, writes
/// `out [B, Nq, h*dh]` and `lse [B, h, Nq]` for the query tokens `sh.q_start ..
/// sh.q_start + sh.q_len`. The training step's call, and the benchmarks'.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::attention::{self, cuda, AttnShape, FWD_TILES};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (1, 9, 1, 64);
/// let x: Vec<f32> = (0..b * n * 3 * dh).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0).to_f32()).collect();
/// let qkv = gpu.upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())?;
/// let sh = AttnShape::full(b, n, h, dh, 1, 4);
/// let (mut want, mut want_lse) = (vec![0.0f32; b * n * dh], vec![0.0f32; b * h * n]);
/// attention::cpu::forward(&x, &mut want, &mut want_lse, &sh, &mut Vec::new());
/// let big = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
/// // Every compiled forward of head dim 64, into the same buffers.
/// let (mut out, mut lse) = (gpu.zeros::<bf16>(b * n * dh)?, gpu.zeros::<f32>(b * h * n)?);
/// for tiles in FWD_TILES.iter().filter(|t| t.head_dim == 64) {
///     cuda::forward_with(&gpu, gpu.stream(), &qkv, &mut out, &mut lse, &sh, tiles)?;
///     for (g, w) in gpu.download(&out)?.iter().zip(&want) {
///         assert!((g.to_f32() - w).abs() <= 2e-2 * big + 1e-4, "{}: {g} vs {w}", tiles.kernel);
///     }
/// }
/// # Ok(()) }
/// ```
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
    let layouts = packed_layouts(b, n, sh.heads, sh.head_dim);
    let mut p = params_of(&d, sh);
    set_qkv(&mut p, layouts.map(|l| qp + (l.offset * 2) as u64), &layouts);
    (p.o, p.lse) = (op, lp);
    (p.o_batch_stride, p.o_row_stride, p.o_head_stride) = ((nq * dim) as i64, dim as i64, sh.head_dim as i64);
    launch_forward(gpu, stream, &p, tiles)
}

/// The packed-layout backward with a chosen compiled tile shape ([`super::BWD_TILES`]) and
/// caller-held buffers: from `dout [B, Nq, h*dh]` and the forward's `out` and `lse`, writes
/// (overwrites) `dqkv [B, N, 3, h, dh]` (Q rows outside the query range zero). `scratch` holds
/// at least [`backward_scratch_len`] f32 (its contents on entry do not matter). Three launches:
/// the row sums (and the zeroing of the dQ sums), the fused kernel over key blocks (dK, dV
/// written, dQ added with atomics), and dQ's conversion.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::attention::{self, cuda, AttnShape, BWD_TILES};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, h, dh) = (1, 7, 1, 64);
/// let x: Vec<f32> = (0..b * n * 3 * dh).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0).to_f32()).collect();
/// let g: Vec<f32> = (0..b * n * dh).map(|i| bf16::from_f32(((i * 13) % 17) as f32 / 8.0 - 1.0).to_f32()).collect();
/// let to16 = |v: &[f32]| v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
/// let (qkv, dout) = (gpu.upload(&to16(&x))?, gpu.upload(&to16(&g))?);
/// let sh = AttnShape::full(b, n, h, dh, 1, 3);
/// let (mut out, mut lse) = (gpu.zeros::<bf16>(b * n * dh)?, gpu.zeros::<f32>(b * h * n)?);
/// cuda::forward_with(&gpu, gpu.stream(), &qkv, &mut out, &mut lse, &sh, &attention::fwd_tiles(64).unwrap())?;
/// let (mut o, mut l, mut want) = (vec![0.0f32; b * n * dh], vec![0.0f32; b * h * n], vec![0.0f32; b * n * 3 * dh]);
/// let mut scratch = Vec::new();
/// attention::cpu::forward(&x, &mut o, &mut l, &sh, &mut scratch);
/// attention::cpu::backward(&x, &o, &l, &g, &mut want, &sh, &mut scratch); // the CPU twin
/// let big = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
/// // Every compiled backward of head dim 64 (the split one computes dQ without atomics).
/// let mut dqkv = gpu.zeros::<bf16>(b * n * 3 * dh)?;
/// let mut fp32_scratch = gpu.zeros::<f32>(cuda::backward_scratch_len(&sh))?;
/// for tiles in BWD_TILES.iter().filter(|t| t.head_dim == 64) {
///     cuda::backward_with(&gpu, gpu.stream(), &qkv, &out, &lse, &dout, &mut dqkv, &mut fp32_scratch, &sh, tiles)?;
///     for (got, w) in gpu.download(&dqkv)?.iter().zip(&want) {
///         assert!((got.to_f32() - w).abs() <= 2e-2 * big + 1e-4, "{}: {got} vs {w}", tiles.kernel);
///     }
/// }
/// # Ok(()) }
/// ```
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
    let layouts = packed_layouts(b, n, sh.heads, sh.head_dim);
    let mut p = params_of(&d, sh);
    set_qkv(&mut p, layouts.map(|l| qp + (l.offset * 2) as u64), &layouts);
    set_dqkv(&mut p, layouts.map(|l| dqp + (l.offset * 2) as u64), &layouts);
    (p.o, p.lse, p.dout) = (op, lp, dop);
    let rows = ((nq * dim) as i64, dim as i64, sh.head_dim as i64);
    (p.o_batch_stride, p.o_row_stride, p.o_head_stride) = rows;
    (p.do_batch_stride, p.do_row_stride, p.do_head_stride) = rows;
    launch_backward(gpu, stream, &mut p, sp, tiles)
}

// ---- plain fp32 attention (any head dim) ----

fn plain_params(op: &'static str, sh: &AttnShape) -> Result<PlainAttnParams, GpuError> {
    if sh.q_start + sh.q_len > sh.tokens || sh.prompt_start > sh.prompt_end || sh.prompt_end > sh.tokens {
        return Err(GpuError::invalid(op, format!("{sh:?} is not a valid attention shape")));
    }
    if sh.batch * sh.heads > 65_535 || sh.q_len > i32::MAX as usize || sh.tokens * 3 * sh.dim() > i32::MAX as usize {
        return Err(GpuError::invalid(op, format!("{sh:?} exceeds the plain kernels' grid")));
    }
    let [n, h, dh, ps, pe, q0, nq] = [
        sh.tokens,
        sh.heads,
        sh.head_dim,
        sh.prompt_start,
        sh.prompt_end,
        sh.q_start,
        sh.q_len,
    ]
    .map(|v| v as i32);
    Ok(PlainAttnParams {
        n,
        h,
        dh,
        ps,
        pe,
        q0,
        nq,
        scale: 1.0 / (sh.head_dim as f32).sqrt(),
        ..PlainAttnParams::default()
    })
}

fn plain_cfg(sh: &AttnShape, floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (sh.q_len as u32, (sh.batch * sh.heads) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: ((floats + 32) * 4) as u32,
    }
}

/// Plain fp32 masked attention forward (`attn_simple_fwd`), for any head dim; the fused bf16
/// kernels cover [`HEAD_DIMS`]. Layouts as [`super::cpu::forward`], fp32 storage.
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::attention::{self, AttnShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let sh = AttnShape::full(2, 5, 2, 3, 1, 3); // head dim 3: no fused kernel for it
/// let x: Vec<f32> = (0..2 * 5 * 3 * 6).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
/// let (mut out, mut lse) = (gpu.zeros::<f32>(2 * 5 * 6)?, gpu.zeros::<f32>(2 * 2 * 5)?);
/// attention::cuda::plain_forward(&gpu, gpu.stream(), &gpu.upload(&x)?, &mut out, &mut lse, &sh)?;
/// let (mut want, mut want_lse) = (vec![0.0f32; 2 * 5 * 6], vec![0.0f32; 2 * 2 * 5]);
/// attention::cpu::forward(&x, &mut want, &mut want_lse, &sh, &mut Vec::new()); // the CPU twin
/// for (g, w) in gpu.download(&out)?.iter().zip(&want).chain(gpu.download(&lse)?.iter().zip(&want_lse)) {
///     assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
/// }
/// # Ok(()) }
/// ```
pub fn plain_forward(
    gpu: &GpuContext,
    stream: &CudaStream,
    qkv: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<f32>,
    lse: &mut impl DevicePtrMut<f32>,
    sh: &AttnShape,
) -> Result<(), GpuError> {
    const OP: &str = "attention forward (plain)";
    let mut a = plain_params(OP, sh)?;
    check_len(OP, "qkv", qkv, sh.batch * sh.tokens * 3 * sh.dim())?;
    check_len(OP, "out", out, sh.batch * sh.q_len * sh.dim())?;
    check_len(OP, "lse", lse, sh.batch * sh.heads * sh.q_len)?;
    if sh.batch * sh.heads * sh.q_len == 0 {
        return Ok(());
    }
    let f = gpu.kernel(attention::ATTN_SIMPLE_FWD)?;
    let (qp, _g1) = qkv.device_ptr(stream);
    let (op, _g2) = out.device_ptr_mut(stream);
    let (lp, _g3) = lse.device_ptr_mut(stream);
    (a.qkv, a.out, a.lse) = (qp, op, lp);
    let mut l = stream.launch_builder(&f);
    l.arg(&a);
    // SAFETY: lengths checked above; shared memory holds N scores and 32 reduction slots.
    unsafe { l.launch(plain_cfg(sh, sh.tokens)) }.map_err(GpuError::driver("launching attn_simple_fwd"))?;
    Ok(())
}

/// Backward of [`plain_forward`]: writes `dqkv [B, N, 3D]` (zeroed first; Q rows outside
/// the query range stay zero).
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::attention::{self, AttnShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // The last block's call: only the prompts 1..3 are queries.
/// let sh = AttnShape { q_start: 1, q_len: 2, ..AttnShape::full(1, 5, 2, 4, 1, 3) };
/// let x: Vec<f32> = (0..5 * 3 * 8).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
/// let dout: Vec<f32> = (0..2 * 8).map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0).collect();
/// let qkv = gpu.upload(&x)?;
/// let (mut out, mut lse) = (gpu.zeros::<f32>(2 * 8)?, gpu.zeros::<f32>(2 * 2)?);
/// attention::cuda::plain_forward(&gpu, gpu.stream(), &qkv, &mut out, &mut lse, &sh)?;
/// let mut dqkv = gpu.upload(&vec![f32::NAN; 5 * 3 * 8])?; // overwritten
/// attention::cuda::plain_backward(&gpu, gpu.stream(), &qkv, &out, &lse, &gpu.upload(&dout)?, &mut dqkv, &sh)?;
/// let (mut o, mut l, mut want) = (vec![0.0f32; 2 * 8], vec![0.0f32; 2 * 2], vec![0.0f32; 5 * 3 * 8]);
/// let mut scratch = Vec::new();
/// attention::cpu::forward(&x, &mut o, &mut l, &sh, &mut scratch);
/// attention::cpu::backward(&x, &o, &l, &dout, &mut want, &sh, &mut scratch); // the CPU twin
/// for (g, w) in gpu.download(&dqkv)?.iter().zip(&want) {
///     assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn plain_backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    qkv: &impl DevicePtr<f32>,
    out: &impl DevicePtr<f32>,
    lse: &impl DevicePtr<f32>,
    dout: &impl DevicePtr<f32>,
    dqkv: &mut impl DevicePtrMut<f32>,
    sh: &AttnShape,
) -> Result<(), GpuError> {
    const OP: &str = "attention backward (plain)";
    let mut a = plain_params(OP, sh)?;
    let total = sh.batch * sh.tokens * 3 * sh.dim();
    check_len(OP, "qkv", qkv, total)?;
    check_len(OP, "out", out, sh.batch * sh.q_len * sh.dim())?;
    check_len(OP, "dout", dout, sh.batch * sh.q_len * sh.dim())?;
    check_len(OP, "lse", lse, sh.batch * sh.heads * sh.q_len)?;
    check_len(OP, "dqkv", dqkv, total)?;
    // dK, dV are added with atomics: zero dqkv first (the shared fill kernel of tokens.cu).
    crate::ops::tokens::cuda::fill::<f32>(gpu, stream, dqkv, total, 0.0)?;
    if sh.batch * sh.heads * sh.q_len == 0 {
        return Ok(());
    }
    let f = gpu.kernel(attention::ATTN_SIMPLE_BWD)?;
    let (qp, _g1) = qkv.device_ptr(stream);
    let (op, _g2) = out.device_ptr(stream);
    let (lp, _g3) = lse.device_ptr(stream);
    let (gp, _g4) = dout.device_ptr(stream);
    let (dp, _g5) = dqkv.device_ptr_mut(stream);
    (a.qkv, a.out, a.lse, a.dout, a.dqkv) = (qp, op, lp, gp, dp);
    let mut l = stream.launch_builder(&f);
    l.arg(&a);
    // SAFETY: lengths checked above; shared memory holds 2N floats and 32 reduction slots.
    unsafe { l.launch(plain_cfg(sh, 2 * sh.tokens)) }.map_err(GpuError::driver("launching attn_simple_bwd"))?;
    Ok(())
}

/// The unfused attention path the benchmark compares against: per-head contiguous Q, K, V
/// (`[B, h, N, dh]`, made once by [`unfused::split_heads`]), the full score matrix `[B, h, N, N]`
/// in bf16, cuBLAS strided-batched GEMMs and row-softmax kernels. Not used by the model.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::attention::{cuda::unfused, AttnShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let sh = AttnShape::full(1, 8, 2, 32, 1, 3); // B 1, N 8, 2 heads of 32, prompts 1..3
/// let (bh, n, dh) = (2, 8, 32);
/// let x: Vec<bf16> = (0..n * 3 * bh * dh).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0)).collect();
/// let qkv = gpu.upload(&x)?;
/// let z = || gpu.zeros::<bf16>(bh * n * dh);
/// let (mut q, mut k, mut v, mut o) = (z()?, z()?, z()?, z()?);
/// let (mut p, mut dp) = (gpu.zeros::<bf16>(bh * n * n)?, gpu.zeros::<bf16>(bh * n * n)?); // [B, h, N, N]
/// unfused::split_heads(&gpu, &qkv, &mut q, &mut k, &mut v, &sh)?;
/// unfused::forward(&gpu, &q, &k, &v, &mut p, &mut o, &sh)?;
/// let dout = gpu.upload(&vec![bf16::from_f32(0.1); bh * n * dh])?;
/// let (mut dq, mut dk, mut dv) = (z()?, z()?, z()?);
/// unfused::backward(&gpu, &q, &k, &v, &p, &dout, &mut dp, &mut dq, &mut dk, &mut dv, &sh)?;
/// // Each softmax row sums to 1, and a prompt row gives the other prompt 0.
/// let p = gpu.download(&p)?;
/// for row in p.chunks(n) {
///     let sum: f32 = row.iter().map(|v| v.to_f32()).sum();
///     assert!((sum - 1.0).abs() < 2e-2, "{sum}");
/// }
/// assert_eq!((p[n + 2], p[2 * n + 1]), (bf16::ZERO, bf16::ZERO));
/// # Ok(()) }
/// ```
pub mod unfused {
    use super::*;
    use crate::gpu::CudaSlice;

    fn ew_launch(gpu: &GpuContext, items: u64) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid_stride_blocks(gpu, items, BLOCK as u64), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check_full(op: &'static str, sh: &AttnShape) -> Result<Dims, GpuError> {
        if sh.q_start != 0 || sh.q_len != sh.tokens {
            return Err(GpuError::invalid(op, "the unfused path takes every token as a query"));
        }
        check_shape(op, sh)
    }

    /// `q, k, v [B, h, N, dh]` from `qkv [B, N, 3, h, dh]`.
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext};
    /// use mlvpt::ops::attention::{cuda::unfused, AttnShape};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let (b, n, h, dh) = (2, 3, 2, 32);
    /// let sh = AttnShape::full(b, n, h, dh, 0, 0);
    /// let x: Vec<bf16> = (0..b * n * 3 * h * dh).map(|i| bf16::from_f32(i as f32)).collect();
    /// let qkv = gpu.upload(&x)?;
    /// let (mut q, mut k, mut v) = (gpu.zeros::<bf16>(b * h * n * dh)?, gpu.zeros::<bf16>(b * h * n * dh)?, gpu.zeros::<bf16>(b * h * n * dh)?);
    /// unfused::split_heads(&gpu, &qkv, &mut q, &mut k, &mut v, &sh)?;
    /// // k[b, j, i, :] = qkv[b, i, 1, j, :]
    /// let k = gpu.download(&k)?;
    /// for (bi, j, i) in [(0, 1, 2), (1, 0, 1)] {
    ///     let src = (((bi * n + i) * 3 + 1) * h + j) * dh;
    ///     let dst = ((bi * h + j) * n + i) * dh;
    ///     assert_eq!(k[dst..dst + dh], x[src..src + dh]);
    /// }
    /// # Ok(()) }
    /// ```
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
        let f = gpu.kernel(attention::ATTN_SPLIT_HEADS)?;
        let mut l = s.launch_builder(&f);
        l.arg(&qkvp)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&dims[0])
            .arg(&dims[1])
            .arg(&dims[2])
            .arg(&dims[3]);
        // SAFETY: lengths checked above.
        unsafe { l.launch(ew_launch(gpu, total as u64)) }.map_err(GpuError::driver("launching attn_split_heads"))?;
        Ok(())
    }

    /// `p = softmax(mask(scale q k^T))` (kept for [`backward`]) and `o = p v`, `o [B, h, N, dh]`.
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext};
    /// use mlvpt::ops::attention::{self, cuda::unfused, AttnShape};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let (n, dh) = (6, 32); // B 1, one head: [B, h, N, dh] is [N, dh]
    /// let sh = AttnShape::full(1, n, 1, dh, 0, 0);
    /// let x: Vec<f32> = (0..n * 3 * dh).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0).to_f32()).collect();
    /// let qkv = gpu.upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())?;
    /// let z = || gpu.zeros::<bf16>(n * dh);
    /// let (mut q, mut k, mut v, mut o) = (z()?, z()?, z()?, z()?);
    /// let mut p = gpu.zeros::<bf16>(n * n)?;
    /// unfused::split_heads(&gpu, &qkv, &mut q, &mut k, &mut v, &sh)?;
    /// unfused::forward(&gpu, &q, &k, &v, &mut p, &mut o, &sh)?;
    /// let (mut want, mut lse) = (vec![0.0f32; n * dh], vec![0.0f32; n]);
    /// attention::cpu::forward(&x, &mut want, &mut lse, &sh, &mut Vec::new()); // the CPU twin
    /// let big = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    /// for (g, w) in gpu.download(&o)?.iter().zip(&want) {
    ///     assert!((g.to_f32() - w).abs() <= 5e-2 * big + 1e-4, "{g} vs {w}"); // scores rounded to bf16 too
    /// }
    /// # Ok(()) }
    /// ```
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
        let f = gpu.kernel(attention::ATTN_SOFTMAX_ROWS_BF16)?;
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
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext};
    /// use mlvpt::ops::attention::{self, cuda::unfused, AttnShape};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let (n, dh) = (6, 32); // B 1, one head: [B, h, N, dh] is [N, dh]
    /// let sh = AttnShape::full(1, n, 1, dh, 0, 0);
    /// let x: Vec<f32> = (0..n * 3 * dh).map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0).to_f32()).collect();
    /// let g: Vec<f32> = (0..n * dh).map(|i| bf16::from_f32(((i * 13) % 17) as f32 / 8.0 - 1.0).to_f32()).collect();
    /// let to16 = |v: &[f32]| v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
    /// let (qkv, dout) = (gpu.upload(&to16(&x))?, gpu.upload(&to16(&g))?);
    /// let z = || gpu.zeros::<bf16>(n * dh);
    /// let (mut q, mut k, mut v, mut o) = (z()?, z()?, z()?, z()?);
    /// let (mut p, mut dp) = (gpu.zeros::<bf16>(n * n)?, gpu.zeros::<bf16>(n * n)?);
    /// unfused::split_heads(&gpu, &qkv, &mut q, &mut k, &mut v, &sh)?;
    /// unfused::forward(&gpu, &q, &k, &v, &mut p, &mut o, &sh)?;
    /// let (mut dq, mut dk, mut dv) = (z()?, z()?, z()?);
    /// unfused::backward(&gpu, &q, &k, &v, &p, &dout, &mut dp, &mut dq, &mut dk, &mut dv, &sh)?;
    /// // The CPU twin's dqkv [N, 3, dh]: compare dV.
    /// let (mut out, mut lse, mut want) = (vec![0.0f32; n * dh], vec![0.0f32; n], vec![0.0f32; n * 3 * dh]);
    /// let mut scratch = Vec::new();
    /// attention::cpu::forward(&x, &mut out, &mut lse, &sh, &mut scratch);
    /// attention::cpu::backward(&x, &out, &lse, &g, &mut want, &sh, &mut scratch);
    /// let want_dv: Vec<f32> = (0..n).flat_map(|i| want[(i * 3 + 2) * dh..(i * 3 + 3) * dh].to_vec()).collect();
    /// let big = want_dv.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    /// for (got, w) in gpu.download(&dv)?.iter().zip(&want_dv) {
    ///     assert!((got.to_f32() - w).abs() <= 5e-2 * big + 1e-4, "{got} vs {w}");
    /// }
    /// # Ok(()) }
    /// ```
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
        let f = gpu.kernel(attention::ATTN_SOFTMAX_BWD_ROWS_BF16)?;
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
        let e = check_shape(
            "t",
            &AttnShape {
                q_start: 1,
                ..shape(20, 64, 1, 3)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("query range 1..21"), "{e}");
        let d = check_shape(
            "t",
            &AttnShape {
                q_start: 1,
                q_len: 30,
                ..shape(227, 64, 1, 31)
            },
        )
        .unwrap();
        assert_eq!((d.qs, d.nq), (1, 30));
        let big = AttnShape {
            batch: 65_536,
            ..shape(4, 32, 0, 0)
        };
        assert!(check_shape("t", &big).unwrap_err().to_string().contains("65535"));
    }

    #[test]
    fn cuda_attention_scratch_holds_dq_sums_and_row_sums() {
        let sh = shape(227, 64, 1, 31);
        assert_eq!(backward_scratch_len(&sh), 2 * 227 * 192 + 2 * 3 * 227);
        let last = AttnShape {
            q_start: 1,
            q_len: 30,
            ..sh
        };
        assert_eq!(backward_scratch_len(&last), 2 * 30 * 192 + 2 * 3 * 30);
    }
}
