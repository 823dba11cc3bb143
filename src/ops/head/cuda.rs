//! GPU launchers of the ML-VPT head (`kernels/head.cu`; the adapters' and MoE ops' contractions
//! also on tensor cores, `kernels/adapter_mma.cu` and `kernels/moe_mma.cu`, chosen by
//! [`HeadKernels`], tensor cores by default), the twins of [`super::cpu`] op for op:
//! [`adapter_forward`], [`adapter_backward`], [`moe_forward`], [`moe_backward`], the plain-VPT
//! head [`vpt_forward`], [`vpt_backward`] (its GEMMs through cuBLAS), and the prediction
//! [`predict`] (`y = (y+ + y-)/2`, `sigmoid(y)`). The loss terms go through
//! [`crate::ops::asl::cuda::forward_backward_terms`].
//!
//! **Dtypes** (the GPU backend's convention: bf16 activations, fp32 master weights and
//! gradients): the prompt-token features `z`, the adapted features, and their gradients `dz`,
//! `dadapted` are bf16 `[B, P, D]`; every parameter and parameter gradient (adapters `W1 [P,r,D]`,
//! `b1 [P,r]`, `W2 [P,D,r]`, `b2 [P,D]`, gate table `G [rows, D]`, classifier `W [K, D]`,
//! `c [K]`), the saved `u [B,P,r]`, `q, r [B,E,K]` and the logits `y, m [B,K]` are fp32. All sums
//! run in fp32 in a fixed order: results are the same on every run (no atomics). The tensor-core
//! kernels multiply fp32 operands as two bf16 each (see [`HeadKernels`]).
//!
//! **Limits** (checked, [`GpuError::Invalid`] otherwise): `D % 8 == 0`, `D <= 1024`,
//! `1 <= E <=` [`MAX_EXPERTS`], `1 <= r <=` [`MAX_RANK`], every buffer 16-byte aligned (whole
//! cudarc allocations are; a view must start on a multiple of 4 floats / 8 bf16).
//!
//! **Tables**: the gating tables `tok`, `grow` (`u32`, index `e*K + k`, as the CPU op) are
//! uploaded once as [`IndexTable`]s, which check every entry against its range and also hold the
//! inverse (per token / per gate row, the `(e, k)` pairs pointing at it), so that the backward
//! gathers token and gate-row gradients instead of scattering them with atomics.

pub use super::HeadKernels;
use super::{AdapterShape, MoeShape, VptHeadShape};
use crate::gpu::kernels::{adapter_mma, head, moe_mma};
use crate::gpu::launch::{check_aligned, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::view::check_dense;
use crate::gpu::{bf16, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError, Kernel, Tensor, TensorMut};
use crate::ops::linear::LinearShape;
use crate::ops::Grad;
use cudarc::driver::{LaunchConfig, PushKernelArg};

// Block shapes shared with the kernels (src/contract.rs, the one definition).
use crate::contract::head::{
    MoeParams, ADA_IMAGES, ADA_PARAM_COLS, MMA_TILE, MMA_WARPS, MOE_FWD_IMAGES, PAIR_TILE, ROWS_COLS, ROWS_WARPS, TOK_IMAGES,
};

/// Widest feature dimension (a thread owns 8 columns, a block at most 128 threads).
///
/// ```
/// use mlvpt::ops::head::cuda::MAX_D;
/// assert_eq!(MAX_D, 1024);
/// assert!(768 <= MAX_D && 768 % 8 == 0); // ViT-B's width is a valid D
/// ```
pub const MAX_D: usize = crate::contract::head::HEAD_MAX_D;
/// Most experts per label.
///
/// ```
/// use mlvpt::ops::head::cuda::MAX_EXPERTS;
/// assert_eq!(MAX_EXPERTS, 8);
/// ```
pub const MAX_EXPERTS: usize = crate::contract::head::HEAD_MAX_E;
/// Largest adapter bottleneck.
///
/// ```
/// use mlvpt::ops::head::cuda::MAX_RANK;
/// assert_eq!(MAX_RANK, 64);
/// ```
pub const MAX_RANK: usize = crate::contract::head::HEAD_MAX_RANK;
/// Threads per block of the batch-reducing kernels.
const ROWS_THREADS: u32 = (ROWS_WARPS * 32) as u32;
/// Threads per block of the tensor-core kernels.
const MMA_THREADS: u32 = (MMA_WARPS * 32) as u32;

/// A gating table on the device (`u32`, entries in `0..range`) with its inverse in CSR form:
/// for each value `v`, the indices `i` with `table[i] == v`, in increasing order.
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::head::cuda::IndexTable;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // Expert e of label k (E = 2, K = 3) reads prompt token tok[e*K + k] of 4.
/// let tok = IndexTable::new(&gpu, &[0, 1, 1, 2, 3, 3], 4)?;
/// assert_eq!((tok.len(), tok.range()), (6, 4));
/// // A token index past the prompts is refused before anything is uploaded.
/// assert!(IndexTable::new(&gpu, &[0, 4], 4).is_err());
/// # Ok(()) }
/// ```
pub struct IndexTable {
    table: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    items: CudaSlice<u32>,
    len: usize,
    range: usize,
    /// Longest inverse list (sizes the pair-tile grid of the backward).
    max_count: usize,
}

/// The inverse of `table` over values `0..range`: `(offsets [range + 1], items [len])` with the
/// indices of value `v` at `items[offsets[v]..offsets[v + 1]]`, increasing. Errors name the
/// first entry out of range.
///
/// ```
/// use mlvpt::ops::head::cuda::invert_table;
/// let (offsets, items) = invert_table(&[2, 0, 2, 1, 2, 0], 4).unwrap();
/// assert_eq!(offsets, [0, 2, 3, 6, 6]); // value v's entries: items[offsets[v]..offsets[v + 1]]
/// assert_eq!(items, [1, 5, 3, 0, 2, 4]);
/// assert_eq!(invert_table(&[0, 3], 3).unwrap_err(), "entry 1 is 3, outside 0..3");
/// ```
pub fn invert_table(table: &[u32], range: usize) -> Result<(Vec<u32>, Vec<u32>), String> {
    if table.len() > u32::MAX as usize || range >= u32::MAX as usize {
        return Err(format!(
            "table of {} entries over {range} values exceeds 32-bit indices",
            table.len()
        ));
    }
    let mut offsets = vec![0u32; range + 1];
    for (i, &v) in table.iter().enumerate() {
        if v as usize >= range {
            return Err(format!("entry {i} is {v}, outside 0..{range}"));
        }
        offsets[v as usize + 1] += 1;
    }
    for v in 0..range {
        offsets[v + 1] += offsets[v];
    }
    let mut fill = offsets.clone();
    let mut items = vec![0u32; table.len()];
    for (i, &v) in table.iter().enumerate() {
        items[fill[v as usize] as usize] = i as u32;
        fill[v as usize] += 1;
    }
    Ok((offsets, items))
}

impl IndexTable {
    /// Checks that every entry is below `range` (the token count for `tok`, the gate rows for
    /// `grow`), uploads the table and its inverse.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::head::cuda::IndexTable;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// // Group gating, E = 2, K = 4, labels in T = 2 groups (k % 2): gate row e*T + g(k) of E*T = 4.
    /// let grow: Vec<u32> = (0..8).map(|i| ((i / 4) * 2 + (i % 4) % 2) as u32).collect();
    /// let grow = IndexTable::new(&gpu, &grow, 4)?;
    /// assert_eq!(gpu.download(grow.table())?, [0, 1, 0, 1, 2, 3, 2, 3]);
    /// # Ok(()) }
    /// ```
    pub fn new(gpu: &GpuContext, table: &[u32], range: usize) -> Result<Self, GpuError> {
        let (offsets, items) = invert_table(table, range).map_err(|m| GpuError::invalid("head index table", m))?;
        // Zero-length device buffers are not allowed everywhere: keep at least one element.
        let pad = |v: &[u32]| if v.is_empty() { vec![0u32] } else { v.to_vec() };
        let max_count = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        Ok(Self {
            table: gpu.upload(&pad(table))?,
            offsets: gpu.upload(&offsets)?,
            items: gpu.upload(&pad(&items))?,
            len: table.len(),
            range,
            max_count,
        })
    }
    /// The table as uploaded.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::head::cuda::IndexTable;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let t = IndexTable::new(&gpu, &[2, 0, 1], 3)?;
    /// assert_eq!(gpu.download(t.table())?, [2, 0, 1]);
    /// # Ok(()) }
    /// ```
    pub fn table(&self) -> &CudaSlice<u32> {
        &self.table
    }
    /// Number of entries.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::head::cuda::IndexTable;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert_eq!(IndexTable::new(&gpu, &[2, 0, 1], 3)?.len(), 3);
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the table has no entries.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::head::cuda::IndexTable;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert!(IndexTable::new(&gpu, &[], 3)?.is_empty()); // allowed (one padding element is uploaded)
    /// assert!(!IndexTable::new(&gpu, &[1], 3)?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Entries lie in `0..range`.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::head::cuda::IndexTable;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert_eq!(IndexTable::new(&gpu, &[0, 0], 5)?.range(), 5); // entries in 0..5
    /// # Ok(()) }
    /// ```
    pub fn range(&self) -> usize {
        self.range
    }
}

/// Scratch of the backward launchers (`dq, dr [B, E, K]` and the per-(e, k) gradient rows
/// `[E*K, D]` for [`moe_backward`], `du [B, P, r]` for [`adapter_backward`], `dy W` for
/// [`vpt_backward`]), grown on demand and kept between calls. One workspace serves
/// launches in order on one stream.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::head::{cuda, VptHeadShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = VptHeadShape { batch: 2, tokens: 3, dim: 8, labels: 4 };
/// let (zbar, w) = (gpu.upload(&[0.5f32; 16])?, gpu.upload(&[0.25f32; 32])?);
/// let mut dz = gpu.zeros::<bf16>(2 * 3 * 8)?;
/// let (mut dw, mut dc) = (gpu.zeros::<f32>(32)?, gpu.zeros::<f32>(4)?);
/// let mut ws = cuda::HeadWorkspace::new(); // grows on the first call, reused by the next
/// for step in 0..2 {
///     let dy = gpu.upload(&[step as f32 + 1.0; 8])?;
///     cuda::vpt_backward(&gpu, gpu.stream(), &mut ws, &dy, &zbar, &w, &mut dz, &mut dw, &mut dc, &s)?;
/// }
/// assert_eq!(gpu.download(&dc)?, [4.0; 4]); // sum over the batch of dy = 2
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct HeadWorkspace {
    a: Option<CudaSlice<f32>>,
    b: Option<CudaSlice<f32>>,
    c: Option<CudaSlice<f32>>,
}

fn ensure(gpu: &GpuContext, slot: &mut Option<CudaSlice<f32>>, len: usize) -> Result<(), GpuError> {
    let len = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(gpu.zeros(len)?);
    }
    Ok(())
}

impl HeadWorkspace {
    /// An empty workspace (allocates on first use).
    ///
    /// ```
    /// use mlvpt::ops::head::cuda::HeadWorkspace;
    /// let ws = HeadWorkspace::new(); // no device memory until a backward needs it
    /// # drop(ws);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }
    fn one(&mut self, gpu: &GpuContext, len: usize) -> Result<&mut CudaSlice<f32>, GpuError> {
        ensure(gpu, &mut self.a, len)?;
        self.a
            .as_mut()
            .ok_or_else(|| GpuError::invalid("head workspace", "allocation vanished".to_string()))
    }
    /// Two buffers of `len` and a third of `len3` floats.
    #[allow(clippy::type_complexity)]
    fn three(
        &mut self,
        gpu: &GpuContext,
        len: usize,
        len3: usize,
    ) -> Result<(&mut CudaSlice<f32>, &mut CudaSlice<f32>, &mut CudaSlice<f32>), GpuError> {
        ensure(gpu, &mut self.a, len)?;
        ensure(gpu, &mut self.b, len)?;
        ensure(gpu, &mut self.c, len3)?;
        match (self.a.as_mut(), self.b.as_mut(), self.c.as_mut()) {
            (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
            _ => Err(GpuError::invalid("head workspace", "allocation vanished".to_string())),
        }
    }
}

fn check_dim(op: &'static str, d: usize) -> Result<(), GpuError> {
    if d == 0 || !d.is_multiple_of(8) || d > MAX_D {
        return Err(GpuError::invalid(
            op,
            format!("feature dimension {d} must be a multiple of 8 in 8..={MAX_D}"),
        ));
    }
    Ok(())
}

fn check_u32(op: &'static str, what: &str, v: usize) -> Result<(), GpuError> {
    if v > i32::MAX as usize {
        return Err(GpuError::invalid(op, format!("{what} = {v} exceeds the kernels' 31-bit sizes")));
    }
    Ok(())
}

/// Threads for a kernel where a thread owns 8 columns: D/8 rounded up to a warp.
fn column_threads(d: usize) -> u32 {
    ((d / 8).div_ceil(32) * 32) as u32
}

fn grid_y(op: &'static str, batch: usize, per_block: usize) -> Result<u32, GpuError> {
    let n = batch.div_ceil(per_block);
    if n > 65_535 {
        return Err(GpuError::invalid(
            op,
            format!("batch {batch} needs {n} blocks in y, more than 65535"),
        ));
    }
    Ok(n as u32)
}

fn check_adapter(op: &'static str, s: &AdapterShape) -> Result<(), GpuError> {
    check_dim(op, s.dim)?;
    if s.rank == 0 || s.rank > MAX_RANK {
        return Err(GpuError::invalid(op, format!("adapter rank {} outside 1..={MAX_RANK}", s.rank)));
    }
    check_u32(op, "tokens", s.tokens)?;
    check_u32(op, "batch", s.batch)?;
    grid_y(op, s.batch, TOK_IMAGES)?;
    Ok(())
}

/// Adapters on the prompt tokens: `out[b,t] = z + W2_t gelu(u) + b2_t` with the pre-GELU
/// `u[b,t] = W1_t z[b,t] + b1_t` saved for the backward. The twin of
/// [`super::cpu::adapter_forward`]. `z`, `out` bf16 `[B, P, D]`; `W1 [P, r, D]`, `b1 [P, r]`,
/// `W2 [P, D, r]`, `b2 [P, D]`, `u [B, P, r]` fp32. `kernels` picks the tensor-core or the fp32
/// kernels ([`HeadKernels`]).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, GpuError};
/// use mlvpt::ops::head::{cuda, AdapterShape, HeadKernels};
/// # fn main() -> Result<(), GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = AdapterShape { batch: 2, tokens: 30, dim: 768, rank: 5 };
/// let (p, d, r) = (s.tokens, s.dim, s.rank);
/// let z = gpu.upload(&vec![bf16::from_f32(0.25); s.batch * p * d])?;
/// let (w1, b1) = (gpu.upload(&vec![0.01f32; p * r * d])?, gpu.zeros::<f32>(p * r)?);
/// let (w2, b2) = (gpu.upload(&vec![0.01f32; p * d * r])?, gpu.zeros::<f32>(p * d)?);
/// let mut u = gpu.zeros::<f32>(s.batch * p * r)?;
/// let mut out = gpu.zeros::<bf16>(s.batch * p * d)?;
/// cuda::adapter_forward(&gpu, gpu.stream(), &z, &w1, &b1, &w2, &b2, &mut u, &mut out, &s, HeadKernels::Mma)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn adapter_forward(
    gpu: &GpuContext,
    stream: &CudaStream,
    z: &impl DevicePtr<bf16>,
    w1: &impl DevicePtr<f32>,
    b1: &impl DevicePtr<f32>,
    w2: &impl DevicePtr<f32>,
    b2: &impl DevicePtr<f32>,
    u: &mut impl DevicePtrMut<f32>,
    out: &mut impl DevicePtrMut<bf16>,
    s: &AdapterShape,
    kernels: HeadKernels,
) -> Result<(), GpuError> {
    const OP: &str = "adapter forward";
    check_adapter(OP, s)?;
    let (bn, p, d, r) = (s.batch, s.tokens, s.dim, s.rank);
    check_len(OP, "z", z, bn * p * d)?;
    check_len(OP, "out", out, bn * p * d)?;
    check_len(OP, "u", u, bn * p * r)?;
    check_len(OP, "w1", w1, p * r * d)?;
    check_len(OP, "b1", b1, p * r)?;
    check_len(OP, "w2", w2, p * d * r)?;
    check_len(OP, "b2", b2, p * d)?;
    if bn == 0 || p == 0 {
        return Ok(());
    }
    let (zp, _g1) = z.device_ptr(stream);
    let (w1p, _g2) = w1.device_ptr(stream);
    let (b1p, _g3) = b1.device_ptr(stream);
    let (w2p, _g4) = w2.device_ptr(stream);
    let (b2p, _g5) = b2.device_ptr(stream);
    let (up, _g6) = u.device_ptr_mut(stream);
    let (op, _g7) = out.device_ptr_mut(stream);
    check_aligned(OP, &[("z", zp), ("w1", w1p), ("b2", b2p), ("out", op)])?;
    let (b32, p32, d32, r32) = (bn as u32, p as u32, d as u32, r as u32);
    let (f, cfg) = adapter_tokens_kernel(gpu, OP, (head::ADAPTER_FWD, adapter_mma::ADAPTER_FWD_MMA), s, kernels)?;
    let mut l = stream.launch_builder(&f);
    l.arg(&zp).arg(&w1p).arg(&b1p).arg(&w2p).arg(&b2p).arg(&up).arg(&op);
    l.arg(&b32).arg(&p32).arg(&d32).arg(&r32);
    // SAFETY: every buffer holds what the shape needs (checked), rows are 16-byte aligned,
    // D % 8 == 0 and D <= 1024 so the block's D/8 threads fit, r <= HEAD_MAX_RANK.
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching the adapter forward ({})", kernels.name())))?;
    Ok(())
}

/// A per-image adapter kernel of `kernels`, named `(head.cu's, adapter_mma.cu's)`, and its
/// launch: a block per token and 16 images, D/8 threads (head.cu) or 128 (adapter_mma.cu).
fn adapter_tokens_kernel(
    gpu: &GpuContext,
    op: &'static str,
    names: (Kernel, Kernel),
    s: &AdapterShape,
    kernels: HeadKernels,
) -> Result<(cudarc::driver::CudaFunction, LaunchConfig), GpuError> {
    let y = grid_y(op, s.batch, ADA_IMAGES)?;
    Ok(match kernels {
        HeadKernels::Mma => (gpu.kernel(names.1)?, mma_config(s.tokens, y, 1)),
        HeadKernels::Fp32 => (
            gpu.kernel(names.0)?,
            LaunchConfig {
                grid_dim: (s.tokens as u32, y, 1),
                block_dim: (column_threads(s.dim), 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    })
}

/// Adapter backward from `dout [B, P, D]` (bf16): accumulates `dz += dout + W1^T du` (bf16)
/// and writes `dW1, db1, dW2, db2` (fp32, summed over the batch in a fixed order), with
/// `du = (W2^T dout) gelu'(u)` kept in `ws`; `kernels` as for [`adapter_forward`]. The twin of
/// [`super::cpu::adapter_backward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::head::{self, cuda, AdapterShape, HeadKernels};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = AdapterShape { batch: 2, tokens: 2, dim: 16, rank: 2 };
/// let (b, p, d, r) = (s.batch, s.tokens, s.dim, s.rank);
/// let val = |n: usize, k: usize| (0..n).map(|i| ((i * k) % 23) as f32 / 23.0 - 0.5).collect::<Vec<f32>>();
/// let to16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
/// let (z, dout) = (to16(&val(b * p * d, 7)), to16(&val(b * p * d, 5)));
/// let (w1, b1, w2, b2) = (val(p * r * d, 3), val(p * r, 11), val(p * d * r, 13), val(p * d, 17));
/// let (zd, doutd, w1d, w2d) = (gpu.upload(&z)?, gpu.upload(&dout)?, gpu.upload(&w1)?, gpu.upload(&w2)?);
/// let (mut u, mut out) = (gpu.zeros::<f32>(b * p * r)?, gpu.zeros::<bf16>(b * p * d)?);
/// cuda::adapter_forward(&gpu, gpu.stream(), &zd, &w1d, &gpu.upload(&b1)?, &w2d, &gpu.upload(&b2)?, &mut u, &mut out, &s, HeadKernels::Mma)?;
/// let mut dz = gpu.zeros::<bf16>(b * p * d)?; // accumulated into
/// let (mut dw1, mut db1) = (gpu.zeros::<f32>(p * r * d)?, gpu.zeros::<f32>(p * r)?);
/// let (mut dw2, mut db2) = (gpu.zeros::<f32>(p * d * r)?, gpu.zeros::<f32>(p * d)?);
/// let mut ws = cuda::HeadWorkspace::new();
/// cuda::adapter_backward(&gpu, gpu.stream(), &mut ws, &doutd, &zd, &u, &w1d, &w2d, &mut dz, &mut dw1, &mut db1, &mut dw2, &mut db2, &s, HeadKernels::Mma)?;
/// // The CPU twin in f64, from the same u.
/// let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
/// let b64 = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
/// let (mut cdz, mut cdw1, mut cdb1) = (vec![0.0; b * p * d], vec![0.0; p * r * d], vec![0.0; p * r]);
/// let (mut cdw2, mut cdb2) = (vec![0.0; p * d * r], vec![0.0; p * d]);
/// head::cpu::adapter_backward(&b64(&dout), &b64(&z), &f64s(&gpu.download(&u)?), &f64s(&w1), &f64s(&w2),
///                             &mut cdz, &mut cdw1, &mut cdb1, &mut cdw2, &mut cdb2, &s, &mut Vec::new());
/// let close = |got: &[f64], want: &[f64], tol: f64| {
///     let big = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
///     got.iter().zip(want).all(|(g, w)| (g - w).abs() <= tol * big + 1e-6)
/// };
/// assert!(close(&f64s(&gpu.download(&dw1)?), &cdw1, 1e-3) && close(&f64s(&gpu.download(&db1)?), &cdb1, 1e-3));
/// assert!(close(&f64s(&gpu.download(&dw2)?), &cdw2, 1e-3) && close(&f64s(&gpu.download(&db2)?), &cdb2, 1e-3));
/// assert!(close(&b64(&gpu.download(&dz)?), &cdz, 1e-2)); // bf16
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn adapter_backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    ws: &mut HeadWorkspace,
    dout: &impl DevicePtr<bf16>,
    z: &impl DevicePtr<bf16>,
    u: &impl DevicePtr<f32>,
    w1: &impl DevicePtr<f32>,
    w2: &impl DevicePtr<f32>,
    dz: &mut impl DevicePtrMut<bf16>,
    dw1: &mut impl DevicePtrMut<f32>,
    db1: &mut impl DevicePtrMut<f32>,
    dw2: &mut impl DevicePtrMut<f32>,
    db2: &mut impl DevicePtrMut<f32>,
    s: &AdapterShape,
    kernels: HeadKernels,
) -> Result<(), GpuError> {
    const OP: &str = "adapter backward";
    check_adapter(OP, s)?;
    let (bn, p, d, r) = (s.batch, s.tokens, s.dim, s.rank);
    check_len(OP, "dout", dout, bn * p * d)?;
    check_len(OP, "z", z, bn * p * d)?;
    check_len(OP, "dz", dz, bn * p * d)?;
    check_len(OP, "u", u, bn * p * r)?;
    check_len(OP, "w1", w1, p * r * d)?;
    check_len(OP, "w2", w2, p * d * r)?;
    check_len(OP, "dw1", dw1, p * r * d)?;
    check_len(OP, "db1", db1, p * r)?;
    check_len(OP, "dw2", dw2, p * d * r)?;
    check_len(OP, "db2", db2, p * d)?;
    if p == 0 {
        return Ok(());
    }
    let du = ws.one(gpu, bn * p * r)?;
    let (gp, _g1) = dout.device_ptr(stream);
    let (zp, _g2) = z.device_ptr(stream);
    let (up, _g3) = u.device_ptr(stream);
    let (w1p, _g4) = w1.device_ptr(stream);
    let (w2p, _g5) = w2.device_ptr(stream);
    let (dzp, _g6) = dz.device_ptr_mut(stream);
    let (dw1p, _g7) = dw1.device_ptr_mut(stream);
    let (db1p, _g8) = db1.device_ptr_mut(stream);
    let (dw2p, _g9) = dw2.device_ptr_mut(stream);
    let (db2p, _g10) = db2.device_ptr_mut(stream);
    let (dup, _g11) = du.device_ptr_mut(stream);
    check_aligned(
        OP,
        &[("dout", gp), ("z", zp), ("w1", w1p), ("dz", dzp), ("dw1", dw1p), ("db2", db2p)],
    )?;
    let (b32, p32, d32, r32) = (bn as u32, p as u32, d as u32, r as u32);
    if bn > 0 {
        let (f, cfg) = adapter_tokens_kernel(gpu, OP, (head::ADAPTER_BWD_TOKENS, adapter_mma::ADAPTER_BWD_TOKENS_MMA), s, kernels)?;
        let mut l = stream.launch_builder(&f);
        l.arg(&gp).arg(&up).arg(&w1p).arg(&w2p).arg(&dup).arg(&dzp);
        l.arg(&b32).arg(&p32).arg(&d32).arg(&r32);
        // SAFETY: as adapter_fwd; du holds B*P*r floats (workspace sized above).
        unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!(
            "launching the adapter token gradients ({})",
            kernels.name()
        )))?;
    }
    let (f, cfg) = match kernels {
        HeadKernels::Mma => (
            gpu.kernel(adapter_mma::ADAPTER_BWD_PARAMS_MMA)?,
            mma_config(p, d.div_ceil(ADA_PARAM_COLS) as u32, 1),
        ),
        HeadKernels::Fp32 => (
            gpu.kernel(head::ADAPTER_BWD_PARAMS)?,
            LaunchConfig {
                grid_dim: (p as u32, d.div_ceil(ROWS_COLS) as u32, 1),
                block_dim: (ROWS_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&gp).arg(&zp).arg(&up).arg(&dup).arg(&dw1p).arg(&db1p).arg(&dw2p).arg(&db2p);
    l.arg(&b32).arg(&p32).arg(&d32).arg(&r32);
    // SAFETY: parameter gradients hold P*r*D, P*r, P*D*r, P*D floats (checked); the kernel
    // writes each element once (batch 0 writes zeros).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!(
        "launching the adapter parameter gradients ({})",
        kernels.name()
    )))?;
    Ok(())
}

fn check_moe(op: &'static str, s: &MoeShape, tok: &IndexTable, grow: &IndexTable) -> Result<(), GpuError> {
    check_dim(op, s.dim)?;
    if s.experts == 0 || s.experts > MAX_EXPERTS {
        return Err(GpuError::invalid(op, format!("{} experts outside 1..={MAX_EXPERTS}", s.experts)));
    }
    if s.labels == 0 {
        return Err(GpuError::invalid(op, "no labels".to_string()));
    }
    for (what, v) in [
        ("batch", s.batch),
        ("tokens", s.tokens),
        ("labels", s.labels),
        ("gate rows", s.gate_rows),
    ] {
        check_u32(op, what, v)?;
    }
    check_u32(op, "experts x labels", s.experts * s.labels)?;
    let ek = s.experts * s.labels;
    if tok.len() != ek || tok.range() != s.tokens {
        return Err(GpuError::invalid(
            op,
            format!(
                "tok table has {} entries over 0..{}, the shape needs {ek} over 0..{}",
                tok.len(),
                tok.range(),
                s.tokens
            ),
        ));
    }
    if grow.len() != ek || grow.range() != s.gate_rows {
        return Err(GpuError::invalid(
            op,
            format!(
                "grow table has {} entries over 0..{}, the shape needs {ek} over 0..{}",
                grow.len(),
                grow.range(),
                s.gate_rows
            ),
        ));
    }
    grid_y(op, s.batch, TOK_IMAGES)?;
    // Pair tiles go in a grid dimension (at most 65535): 8 pairs per block in head.cu, 64 (and
    // two products) in moe_mma.cu.
    if ek.div_ceil(PAIR_TILE) > 65_535 {
        return Err(GpuError::invalid(
            op,
            format!(
                "{ek} (expert, label) pairs, more than the kernels' grid takes ({})",
                65_535 * PAIR_TILE
            ),
        ));
    }
    Ok(())
}

/// One branch's label-aware gating, expert mixture and classifier
/// (docs/MODEL.md#gating-and-the-expert-mixture): per `(b, e, k)` the gate score
/// `q = <G[grow], z[b, tok]>` and the classifier response
/// `r = <W[k], adapted[b, tok]>` (one token-major launch), then `A = softmax_e q`,
/// `m[b,k] = sum_e A q`, `y[b,k] = sum_e A r + c[k]` (a second, per-(b, k) launch); the
/// `[B, K, D]` mixture is never formed. Writes `y, m [B, K]` and saves `q, r [B, E, K]` (fp32).
/// `kernels` picks the scores kernel ([`HeadKernels`]). The twin of [`super::cpu::moe_forward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::head::{self, cuda, HeadKernels, MoeShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = MoeShape { batch: 2, tokens: 3, dim: 16, labels: 4, experts: 2, gate_rows: 8 }; // label gating
/// let (b, p, d, k, e) = (s.batch, s.tokens, s.dim, s.labels, s.experts);
/// let val = |n: usize, m: usize| (0..n).map(|i| ((i * m) % 23) as f32 / 23.0 - 0.5).collect::<Vec<f32>>();
/// let to16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
/// let (z, a) = (to16(&val(b * p * d, 7)), to16(&val(b * p * d, 5)));
/// let (gate, w, c) = (val(s.gate_rows * d, 3), val(k * d, 11), val(k, 13));
/// let tok: Vec<u32> = (0..e * k).map(|i| ((i / k + i % k) % p) as u32).collect();
/// let grow: Vec<u32> = (0..(e * k) as u32).collect();
/// let (tok_t, grow_t) = (cuda::IndexTable::new(&gpu, &tok, p)?, cuda::IndexTable::new(&gpu, &grow, s.gate_rows)?);
/// let (mut y, mut m) = (gpu.zeros::<f32>(b * k)?, gpu.zeros::<f32>(b * k)?);
/// let (mut q, mut r) = (gpu.zeros::<f32>(b * e * k)?, gpu.zeros::<f32>(b * e * k)?);
/// cuda::moe_forward(&gpu, gpu.stream(), &gpu.upload(&z)?, &gpu.upload(&a)?, &gpu.upload(&gate)?, &gpu.upload(&w)?, &gpu.upload(&c)?,
///                   &tok_t, &grow_t, &mut y, &mut m, &mut q, &mut r, &s, HeadKernels::Mma)?;
/// // The CPU twin in f64.
/// let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
/// let b64 = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
/// let (mut cy, mut cm, mut cq, mut cr) = (vec![0.0; b * k], vec![0.0; b * k], vec![0.0; b * e * k], vec![0.0; b * e * k]);
/// head::cpu::moe_forward(&b64(&z), &b64(&a), &f64s(&gate), &f64s(&w), &f64s(&c), &tok, &grow, &mut cy, &mut cm, &mut cq, &mut cr, &s);
/// for (got, want) in [(gpu.download(&y)?, cy), (gpu.download(&m)?, cm), (gpu.download(&q)?, cq), (gpu.download(&r)?, cr)] {
///     for (g, w) in got.iter().zip(&want) {
///         assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
///     }
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn moe_forward(
    gpu: &GpuContext,
    stream: &CudaStream,
    z: &impl DevicePtr<bf16>,
    adapted: &impl DevicePtr<bf16>,
    gate: &impl DevicePtr<f32>,
    w: &impl DevicePtr<f32>,
    c: &impl DevicePtr<f32>,
    tok: &IndexTable,
    grow: &IndexTable,
    y: &mut impl DevicePtrMut<f32>,
    m: &mut impl DevicePtrMut<f32>,
    q: &mut impl DevicePtrMut<f32>,
    r: &mut impl DevicePtrMut<f32>,
    s: &MoeShape,
    kernels: HeadKernels,
) -> Result<(), GpuError> {
    const OP: &str = "moe forward";
    check_moe(OP, s, tok, grow)?;
    let (bn, p, d, k, e) = (s.batch, s.tokens, s.dim, s.labels, s.experts);
    check_len(OP, "z", z, bn * p * d)?;
    check_len(OP, "adapted", adapted, bn * p * d)?;
    check_len(OP, "gate", gate, s.gate_rows * d)?;
    check_len(OP, "w", w, k * d)?;
    check_len(OP, "c", c, k)?;
    check_len(OP, "y", y, bn * k)?;
    check_len(OP, "m", m, bn * k)?;
    check_len(OP, "q", q, bn * e * k)?;
    check_len(OP, "r", r, bn * e * k)?;
    if bn == 0 {
        return Ok(());
    }
    let (zp, _g1) = z.device_ptr(stream);
    let (ap, _g2) = adapted.device_ptr(stream);
    let (gp, _g3) = gate.device_ptr(stream);
    let (wp, _g4) = w.device_ptr(stream);
    let (cp, _g5) = c.device_ptr(stream);
    let (tofp, _g6) = tok.offsets.device_ptr(stream);
    let (titp, _g7) = tok.items.device_ptr(stream);
    let (grp, _g8) = grow.table.device_ptr(stream);
    let (yp, _g9) = y.device_ptr_mut(stream);
    let (mp, _g10) = m.device_ptr_mut(stream);
    let (qp, _g11) = q.device_ptr_mut(stream);
    let (rp, _g12) = r.device_ptr_mut(stream);
    check_aligned(OP, &[("z", zp), ("adapted", ap), ("gate", gp), ("w", wp)])?;
    let (b32, k32, e32) = (bn as u32, k as u32, e as u32);
    let params = MoeParams {
        z: zp,
        adapted: ap,
        gate: gp,
        w: wp,
        grow: grp,
        tok_offsets: tofp,
        tok_items: titp,
        q: qp,
        r: rp,
        ..moe_sizes(s)
    };
    let (f, cfg) = match kernels {
        HeadKernels::Mma => (
            gpu.kernel(moe_mma::MOE_FWD_SCORES_MMA)?,
            mma_config(p, grid_y(OP, bn, MMA_TILE)?, 2 * mma_pair_tiles(tok)),
        ),
        HeadKernels::Fp32 => (
            gpu.kernel(head::MOE_FWD_SCORES)?,
            LaunchConfig {
                grid_dim: (p as u32, grid_y(OP, bn, MOE_FWD_IMAGES)?, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    // SAFETY: lengths checked; tok's inverse has P + 1 offsets over E*K items (< E*K), and the
    // gate rows were range-checked with grow; every (b, e, k) of q, r is written once since
    // each (e, k) lies in exactly one token's list.
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching the moe scores kernel ({})", kernels.name())))?;
    let f = gpu.kernel(head::MOE_FWD_MIX)?;
    let blocks = grid_stride_blocks(gpu, (bn * k) as u64, BLOCK as u64);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&qp).arg(&rp).arg(&cp).arg(&yp).arg(&mp).arg(&b32).arg(&k32).arg(&e32);
    // SAFETY: q, r hold B*E*K, y, m B*K, c K floats (checked).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching moe_fwd_mix"))?;
    Ok(())
}

/// Backward of [`moe_forward`] from `dy, dm [B, K]` (fp32): accumulates into `dz` and
/// `dadapted` (bf16 `[B, P, D]`; tokens of the other branch are left untouched) and writes
/// `dgate [rows, D]`, `dw [K, D]`, `dc [K]` (fp32). Parameter gradients are reduced over the
/// batch per (e, k) pair, token by token (a block per token, 8 pairs and 256 columns, warps'
/// partials added in order), then the pair rows are summed into classifier and gate rows in a
/// fixed order: no atomics, the same bits on every run. `dq, dr [B, E, K]` live in `ws`.
/// `kernels` picks the token-gradient and pair-row kernels ([`HeadKernels`]). The twin of
/// [`super::cpu::moe_backward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::head::{self, cuda, HeadKernels, MoeShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = MoeShape { batch: 2, tokens: 3, dim: 16, labels: 4, experts: 2, gate_rows: 8 };
/// let (b, p, d, k, e) = (s.batch, s.tokens, s.dim, s.labels, s.experts);
/// let val = |n: usize, m: usize| (0..n).map(|i| ((i * m) % 23) as f32 / 23.0 - 0.5).collect::<Vec<f32>>();
/// let to16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
/// let (z, a) = (to16(&val(b * p * d, 7)), to16(&val(b * p * d, 5)));
/// let (gate, w, c, dy, dm) = (val(s.gate_rows * d, 3), val(k * d, 11), val(k, 13), val(b * k, 17), val(b * k, 19));
/// let tok: Vec<u32> = (0..e * k).map(|i| ((i / k + i % k) % p) as u32).collect();
/// let grow: Vec<u32> = (0..(e * k) as u32).collect();
/// let (tok_t, grow_t) = (cuda::IndexTable::new(&gpu, &tok, p)?, cuda::IndexTable::new(&gpu, &grow, s.gate_rows)?);
/// let (zd, ad, gated, wd) = (gpu.upload(&z)?, gpu.upload(&a)?, gpu.upload(&gate)?, gpu.upload(&w)?);
/// let (mut y, mut m) = (gpu.zeros::<f32>(b * k)?, gpu.zeros::<f32>(b * k)?);
/// let (mut q, mut r) = (gpu.zeros::<f32>(b * e * k)?, gpu.zeros::<f32>(b * e * k)?);
/// cuda::moe_forward(&gpu, gpu.stream(), &zd, &ad, &gated, &wd, &gpu.upload(&c)?, &tok_t, &grow_t, &mut y, &mut m, &mut q, &mut r, &s, HeadKernels::Mma)?;
/// let (mut dz, mut da) = (gpu.zeros::<bf16>(b * p * d)?, gpu.zeros::<bf16>(b * p * d)?); // accumulated into
/// let (mut dgate, mut dw, mut dc) = (gpu.zeros::<f32>(s.gate_rows * d)?, gpu.zeros::<f32>(k * d)?, gpu.zeros::<f32>(k)?);
/// let mut ws = cuda::HeadWorkspace::new();
/// cuda::moe_backward(&gpu, gpu.stream(), &mut ws, &gpu.upload(&dy)?, &gpu.upload(&dm)?, &zd, &ad, &gated, &wd, &tok_t, &grow_t,
///                    &q, &r, &mut dz, &mut da, &mut dgate, &mut dw, &mut dc, &s, HeadKernels::Mma)?;
/// // The CPU twin in f64, from the same q and r.
/// let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
/// let b64 = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
/// let (mut cdz, mut cda) = (vec![0.0; b * p * d], vec![0.0; b * p * d]);
/// let (mut cdgate, mut cdw, mut cdc) = (vec![0.0; s.gate_rows * d], vec![0.0; k * d], vec![0.0; k]);
/// head::cpu::moe_backward(&f64s(&dy), &f64s(&dm), &b64(&z), &b64(&a), &f64s(&gate), &f64s(&w), &tok, &grow,
///                         &f64s(&gpu.download(&q)?), &f64s(&gpu.download(&r)?), &mut cdz, &mut cda, &mut cdgate, &mut cdw, &mut cdc, &s, &mut Vec::new());
/// let close = |got: &[f64], want: &[f64], tol: f64| {
///     let big = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
///     got.iter().zip(want).all(|(g, w)| (g - w).abs() <= tol * big + 1e-6)
/// };
/// assert!(close(&f64s(&gpu.download(&dgate)?), &cdgate, 1e-3));
/// assert!(close(&f64s(&gpu.download(&dw)?), &cdw, 1e-3) && close(&f64s(&gpu.download(&dc)?), &cdc, 1e-5));
/// assert!(close(&b64(&gpu.download(&dz)?), &cdz, 1e-2) && close(&b64(&gpu.download(&da)?), &cda, 1e-2)); // bf16
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn moe_backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    ws: &mut HeadWorkspace,
    dy: &impl DevicePtr<f32>,
    dm: &impl DevicePtr<f32>,
    z: &impl DevicePtr<bf16>,
    adapted: &impl DevicePtr<bf16>,
    gate: &impl DevicePtr<f32>,
    w: &impl DevicePtr<f32>,
    tok: &IndexTable,
    grow: &IndexTable,
    q: &impl DevicePtr<f32>,
    r: &impl DevicePtr<f32>,
    dz: &mut impl DevicePtrMut<bf16>,
    dadapted: &mut impl DevicePtrMut<bf16>,
    dgate: &mut impl DevicePtrMut<f32>,
    dw: &mut impl DevicePtrMut<f32>,
    dc: &mut impl DevicePtrMut<f32>,
    s: &MoeShape,
    kernels: HeadKernels,
) -> Result<(), GpuError> {
    const OP: &str = "moe backward";
    check_moe(OP, s, tok, grow)?;
    let (bn, p, d, k, e) = (s.batch, s.tokens, s.dim, s.labels, s.experts);
    check_len(OP, "dy", dy, bn * k)?;
    check_len(OP, "dm", dm, bn * k)?;
    check_len(OP, "z", z, bn * p * d)?;
    check_len(OP, "adapted", adapted, bn * p * d)?;
    check_len(OP, "gate", gate, s.gate_rows * d)?;
    check_len(OP, "w", w, k * d)?;
    check_len(OP, "q", q, bn * e * k)?;
    check_len(OP, "r", r, bn * e * k)?;
    check_len(OP, "dz", dz, bn * p * d)?;
    check_len(OP, "dadapted", dadapted, bn * p * d)?;
    check_len(OP, "dgate", dgate, s.gate_rows * d)?;
    check_len(OP, "dw", dw, k * d)?;
    check_len(OP, "dc", dc, k)?;
    let (dq, dr, pairs) = ws.three(gpu, bn * e * k, e * k * d)?;
    let (dyp, _g1) = dy.device_ptr(stream);
    let (dmp, _g2) = dm.device_ptr(stream);
    let (zp, _g3) = z.device_ptr(stream);
    let (ap, _g4) = adapted.device_ptr(stream);
    let (gp, _g5) = gate.device_ptr(stream);
    let (wp, _g6) = w.device_ptr(stream);
    let (tofp, _g8) = tok.offsets.device_ptr(stream);
    let (titp, _g9) = tok.items.device_ptr(stream);
    let (grp, _g10) = grow.table.device_ptr(stream);
    let (gofp, _g11) = grow.offsets.device_ptr(stream);
    let (gitp, _g12) = grow.items.device_ptr(stream);
    let (qp, _g13) = q.device_ptr(stream);
    let (rp, _g14) = r.device_ptr(stream);
    let (dzp, _g15) = dz.device_ptr_mut(stream);
    let (dap, _g16) = dadapted.device_ptr_mut(stream);
    let (dgp, _g17) = dgate.device_ptr_mut(stream);
    let (dwp, _g18) = dw.device_ptr_mut(stream);
    let (dcp, _g19) = dc.device_ptr_mut(stream);
    let (dqp, _g20) = dq.device_ptr_mut(stream);
    let (drp, _g21) = dr.device_ptr_mut(stream);
    let (prp, _g22) = pairs.device_ptr_mut(stream);
    check_aligned(
        OP,
        &[("z", zp), ("adapted", ap), ("gate", gp), ("w", wp), ("dz", dzp), ("dadapted", dap)],
    )?;
    let (b32, d32, k32, e32) = (bn as u32, d as u32, k as u32, e as u32);
    let null = 0u64;
    let sizes = moe_sizes(s);
    if bn > 0 {
        // dq, dr per (b, k).
        let f = gpu.kernel(head::MOE_BWD_COEF)?;
        let blocks = grid_stride_blocks(gpu, (bn * k) as u64, BLOCK as u64);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&dyp)
            .arg(&dmp)
            .arg(&qp)
            .arg(&rp)
            .arg(&dqp)
            .arg(&drp)
            .arg(&b32)
            .arg(&k32)
            .arg(&e32);
        // SAFETY: dy, dm hold B*K, q, r and the workspace B*E*K floats; E <= HEAD_MAX_E.
        unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching moe_bwd_coef"))?;

        // Token gradients, gathered per token through tok's inverse.
        let (f, cfg) = match kernels {
            HeadKernels::Mma => (
                gpu.kernel(moe_mma::MOE_BWD_TOKENS_MMA)?,
                mma_config(p, grid_y(OP, bn, MMA_TILE)?, 2 * d.div_ceil(MMA_TILE)),
            ),
            HeadKernels::Fp32 => (
                gpu.kernel(head::MOE_BWD_TOKENS)?,
                LaunchConfig {
                    grid_dim: (p as u32, grid_y(OP, bn, TOK_IMAGES)?, 1),
                    block_dim: (column_threads(d), 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
        };
        let params = MoeParams {
            dq: dqp,
            dr: drp,
            gate: gp,
            w: wp,
            grow: grp,
            tok_offsets: tofp,
            tok_items: titp,
            dz: dzp,
            dadapted: dap,
            ..sizes
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&params);
        // SAFETY: the inverse has P + 1 offsets and E*K items, each an index into the E*K
        // tables; rows and tokens were range-checked with the tables.
        unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!(
            "launching the moe token-gradient kernel ({})",
            kernels.name()
        )))?;
    }
    // Parameter gradients: per-(e, k) rows reduced over the batch token by token, then summed
    // into classifier rows (with dc = sum_b dy) and gate rows. Each writes all of its output.
    let (f_pairs, pairs_cfg) = match kernels {
        HeadKernels::Mma => (
            gpu.kernel(moe_mma::MOE_BWD_PAIRS_MMA)?,
            mma_config(p, mma_pair_tiles(tok) as u32, d.div_ceil(MMA_TILE)),
        ),
        HeadKernels::Fp32 => (
            gpu.kernel(head::MOE_BWD_PAIRS)?,
            LaunchConfig {
                grid_dim: (
                    p as u32,
                    tok.max_count.div_ceil(PAIR_TILE).max(1) as u32,
                    d.div_ceil(ROWS_COLS) as u32,
                ),
                block_dim: (ROWS_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    };
    let f_sum = gpu.kernel(head::MOE_SUM_PAIRS)?;
    for (coef, x, out, offsets, items, rows, what) in [
        (drp, ap, dwp, null, null, k, "classifier"),
        (dqp, zp, dgp, gofp, gitp, s.gate_rows, "gate"),
    ] {
        let params = MoeParams {
            coef,
            x,
            tok_offsets: tofp,
            tok_items: titp,
            pair_rows: prp,
            ..sizes
        };
        let mut l = stream.launch_builder(&f_pairs);
        l.arg(&params);
        // SAFETY: coef holds B*E*K floats (workspace), x B*P*D bf16 (checked); each pair index
        // from tok's inverse is < E*K, and the pair-row workspace holds E*K*D floats.
        unsafe { l.launch(pairs_cfg) }.map_err(GpuError::driver(format!(
            "launching the moe pair-row kernel ({what}, {})",
            kernels.name()
        )))?;
        if rows > 0 {
            let rows32 = rows as u32;
            let mut l = stream.launch_builder(&f_sum);
            l.arg(&prp)
                .arg(&offsets)
                .arg(&items)
                .arg(&out)
                .arg(&rows32)
                .arg(&d32)
                .arg(&k32)
                .arg(&e32);
            // SAFETY: out holds rows*D floats (checked: K*D for dw, gate_rows*D for dgate);
            // grow's inverse has gate_rows + 1 offsets over E*K items; without offsets the
            // rows are labels, summing pairs e*K + k < E*K.
            unsafe { l.launch(stride_launch(gpu, rows * d)) }.map_err(GpuError::driver(format!("launching moe_sum_pairs ({what})")))?;
        }
    }
    let f = gpu.kernel(head::COLUMN_SUMS)?;
    let mut l = stream.launch_builder(&f);
    l.arg(&dyp).arg(&dcp).arg(&b32).arg(&k32);
    // SAFETY: dy holds B*K, dc K floats (checked).
    unsafe { l.launch(stride_launch(gpu, k)) }.map_err(GpuError::driver("launching column_sums (dc)"))?;
    Ok(())
}

/// [`MoeParams`] with the sizes of `s` and every pointer null.
fn moe_sizes(s: &MoeShape) -> MoeParams {
    let [batch, tokens, d, labels, experts] = [s.batch, s.tokens, s.dim, s.labels, s.experts].map(|v| v as u32);
    MoeParams {
        batch,
        tokens,
        d,
        labels,
        experts,
        ..MoeParams::default()
    }
}

/// Launch config of a tensor-core kernel (moe_mma.cu, adapter_mma.cu): grid (tokens, y, z), 128 threads
/// (`check_moe` keeps the pair tiles within the grid's 65535).
fn mma_config(tokens: usize, y: u32, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tokens as u32, y, z as u32),
        block_dim: (MMA_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Pair tiles of the tensor-core kernels: the longest per-token pair list over 64, at least 1.
fn mma_pair_tiles(tok: &IndexTable) -> usize {
    tok.max_count.div_ceil(MMA_TILE).max(1)
}

/// Launch config of a grid-stride elementwise kernel over `n` items.
fn stride_launch(gpu: &GpuContext, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, n as u64, BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The cuBLAS calls run on the context's own stream; the kernels must queue there too.
fn check_context_stream(op: &'static str, gpu: &GpuContext, stream: &CudaStream) -> Result<(), GpuError> {
    if !std::ptr::eq(stream, gpu.stream().as_ref()) {
        return Err(GpuError::invalid(
            op,
            "pass gpu.stream(): the GEMMs run on the context's stream".to_string(),
        ));
    }
    Ok(())
}

fn check_vpt(op: &'static str, s: &VptHeadShape) -> Result<(), GpuError> {
    for (what, v) in [("batch", s.batch), ("tokens", s.tokens), ("dim", s.dim), ("labels", s.labels)] {
        check_u32(op, what, v)?;
    }
    if s.tokens == 0 {
        return Err(GpuError::invalid(op, "no prompt tokens to average".to_string()));
    }
    Ok(())
}

/// Plain-VPT head: `zbar[b] = mean_t z[b, t]` (fp32 `[B, D]`, saved) and `y = zbar W^T + c`
/// (cuBLAS, fp32) with `W [K, D]`, `c [K]`. `z` bf16 `[B, P, D]`, any `D`. `stream` must be
/// `gpu.stream()`. The twin of [`super::cpu::vpt_forward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::head::{self, cuda, VptHeadShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = VptHeadShape { batch: 2, tokens: 3, dim: 5, labels: 3 }; // any D
/// let (b, p, d, k) = (s.batch, s.tokens, s.dim, s.labels);
/// let val = |n: usize, m: usize| (0..n).map(|i| ((i * m) % 23) as f32 / 23.0 - 0.5).collect::<Vec<f32>>();
/// let z: Vec<bf16> = val(b * p * d, 7).iter().map(|&x| bf16::from_f32(x)).collect();
/// let (w, c) = (val(k * d, 3), val(k, 5));
/// let (mut zbar, mut y) = (gpu.zeros::<f32>(b * d)?, gpu.zeros::<f32>(b * k)?);
/// cuda::vpt_forward(&gpu, gpu.stream(), &gpu.upload(&z)?, &gpu.upload(&w)?, &gpu.upload(&c)?, &mut zbar, &mut y, &s)?;
/// let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
/// let z64: Vec<f64> = z.iter().map(|x| x.to_f64()).collect();
/// let (mut czbar, mut cy) = (vec![0.0; b * d], vec![0.0; b * k]);
/// head::cpu::vpt_forward(&z64, &f64s(&w), &f64s(&c), &mut czbar, &mut cy, &s); // the CPU twin
/// for (g, w) in gpu.download(&y)?.iter().zip(&cy) {
///     assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn vpt_forward(
    gpu: &GpuContext,
    stream: &CudaStream,
    z: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<f32>,
    c: &impl DevicePtr<f32>,
    zbar: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    y: &mut impl DevicePtrMut<f32>,
    s: &VptHeadShape,
) -> Result<(), GpuError> {
    const OP: &str = "vpt head forward";
    check_context_stream(OP, gpu, stream)?;
    check_vpt(OP, s)?;
    let (bn, p, d, k) = (s.batch, s.tokens, s.dim, s.labels);
    check_len(OP, "z", z, bn * p * d)?;
    check_len(OP, "w", w, k * d)?;
    check_len(OP, "c", c, k)?;
    check_len(OP, "zbar", zbar, bn * d)?;
    check_len(OP, "y", y, bn * k)?;
    if bn == 0 || k == 0 {
        return Ok(());
    }
    {
        let (zp, _g1) = z.device_ptr(stream);
        let (zbp, _g2) = zbar.device_ptr_mut(stream);
        let f = gpu.kernel(head::VPT_MEAN)?;
        let (b32, p32, d32) = (bn as u32, p as u32, d as u32);
        let mut l = stream.launch_builder(&f);
        l.arg(&zp).arg(&zbp).arg(&b32).arg(&p32).arg(&d32);
        // SAFETY: z holds B*P*D, zbar B*D elements (checked).
        unsafe { l.launch(stride_launch(gpu, bn * d)) }.map_err(GpuError::driver("launching vpt_mean"))?;
    }
    crate::ops::linear::cuda::forward::<f32, f32>(
        gpu,
        &*zbar,
        w,
        Some(c),
        y,
        &LinearShape {
            rows: bn,
            d_in: d,
            d_out: k,
        },
    )
}

/// Plain-VPT head backward: `dw = dy^T zbar`, `dc = sum_b dy` (fixed order), and writes
/// `dz[b, t] = (dy W)[b] / P` (bf16). `dy W` goes through `ws`. `stream` must be
/// `gpu.stream()`. The twin of [`super::cpu::vpt_backward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::head::{self, cuda, VptHeadShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = VptHeadShape { batch: 2, tokens: 3, dim: 5, labels: 3 };
/// let (b, p, d, k) = (s.batch, s.tokens, s.dim, s.labels);
/// let val = |n: usize, m: usize| (0..n).map(|i| ((i * m) % 23) as f32 / 23.0 - 0.5).collect::<Vec<f32>>();
/// let (dy, zbar, w) = (val(b * k, 7), val(b * d, 3), val(k * d, 5));
/// let mut dz = gpu.zeros::<bf16>(b * p * d)?;
/// let (mut dw, mut dc) = (gpu.zeros::<f32>(k * d)?, gpu.zeros::<f32>(k)?);
/// let mut ws = cuda::HeadWorkspace::new();
/// cuda::vpt_backward(&gpu, gpu.stream(), &mut ws, &gpu.upload(&dy)?, &gpu.upload(&zbar)?, &gpu.upload(&w)?, &mut dz, &mut dw, &mut dc, &s)?;
/// let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
/// let (mut cdz, mut cdw, mut cdc) = (vec![0.0; b * p * d], vec![0.0; k * d], vec![0.0; k]);
/// head::cpu::vpt_backward(&f64s(&dy), &f64s(&zbar), &f64s(&w), &mut cdz, &mut cdw, &mut cdc, &s, &mut Vec::new()); // the CPU twin
/// for (g, w) in gpu.download(&dw)?.iter().zip(&cdw).chain(gpu.download(&dc)?.iter().zip(&cdc)) {
///     assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
/// }
/// for (g, w) in gpu.download(&dz)?.iter().zip(&cdz) {
///     assert!((g.to_f64() - w).abs() < 1e-2 * w.abs() + 1e-4, "{g} vs {w}"); // bf16
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn vpt_backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    ws: &mut HeadWorkspace,
    dy: &impl DevicePtr<f32>,
    zbar: &impl DevicePtr<f32>,
    w: &impl DevicePtr<f32>,
    dz: &mut impl DevicePtrMut<bf16>,
    dw: &mut impl DevicePtrMut<f32>,
    dc: &mut impl DevicePtrMut<f32>,
    s: &VptHeadShape,
) -> Result<(), GpuError> {
    const OP: &str = "vpt head backward";
    check_context_stream(OP, gpu, stream)?;
    check_vpt(OP, s)?;
    let (bn, p, d, k) = (s.batch, s.tokens, s.dim, s.labels);
    check_len(OP, "dy", dy, bn * k)?;
    check_len(OP, "zbar", zbar, bn * d)?;
    check_len(OP, "w", w, k * d)?;
    check_len(OP, "dz", dz, bn * p * d)?;
    check_len(OP, "dw", dw, k * d)?;
    check_len(OP, "dc", dc, k)?;
    if k > 0 {
        // dw and dc are written even for an empty batch (zeros), as the CPU op does; cuBLAS
        // rejects the GEMM's inner length 0, so that dw is a fill.
        if bn == 0 {
            crate::ops::tokens::cuda::fill::<f32>(gpu, stream, dw, k * d, 0.0)?;
        } else {
            crate::ops::linear::cuda::backward_weight::<f32, f32>(
                gpu,
                dy,
                zbar,
                Grad::Write(dw),
                &LinearShape {
                    rows: bn,
                    d_in: d,
                    d_out: k,
                },
            )?;
        }
        let (dyp, _g1) = dy.device_ptr(stream);
        let (dcp, _g2) = dc.device_ptr_mut(stream);
        let f = gpu.kernel(head::COLUMN_SUMS)?;
        let (b32, k32) = (bn as u32, k as u32);
        let mut l = stream.launch_builder(&f);
        l.arg(&dyp).arg(&dcp).arg(&b32).arg(&k32);
        // SAFETY: dy holds B*K, dc K floats (checked).
        unsafe { l.launch(stride_launch(gpu, k)) }.map_err(GpuError::driver("launching column_sums"))?;
    }
    if bn == 0 {
        return Ok(());
    }
    let dzbar = ws.one(gpu, bn * d)?;
    if k == 0 {
        gpu.stream().memset_zeros(dzbar).map_err(GpuError::driver("zeroing dzbar"))?;
    } else {
        crate::ops::linear::cuda::backward_input::<f32, f32>(
            gpu,
            dy,
            w,
            Grad::Write(dzbar),
            &LinearShape {
                rows: bn,
                d_in: d,
                d_out: k,
            },
        )?;
    }
    let (gp, _g1) = dzbar.device_ptr(stream);
    let (dzp, _g2) = dz.device_ptr_mut(stream);
    let f = gpu.kernel(head::VPT_SPREAD)?;
    let (b32, p32, d32) = (bn as u32, p as u32, d as u32);
    let mut l = stream.launch_builder(&f);
    l.arg(&gp).arg(&dzp).arg(&b32).arg(&p32).arg(&d32);
    // SAFETY: dzbar holds at least B*D floats (workspace), dz B*P*D (checked).
    unsafe { l.launch(stride_launch(gpu, bn * p * d)) }.map_err(GpuError::driver("launching vpt_spread"))?;
    Ok(())
}

/// Prediction: `y = (y_pos + y_neg) / 2` and `prob = sigmoid(y)` over `n` logits (fp32).
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::head::cuda;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (y_pos, y_neg) = (gpu.upload(&[2.0f32, -1.0, 0.0])?, gpu.upload(&[0.0f32, -3.0, 0.0])?);
/// let (mut y, mut prob) = (gpu.zeros::<f32>(3)?, gpu.zeros::<f32>(3)?);
/// cuda::predict(&gpu, gpu.stream(), &y_pos, &y_neg, &mut y, &mut prob, 3)?;
/// assert_eq!(gpu.download(&y)?, [1.0, -2.0, 0.0]);
/// for (p, y) in gpu.download(&prob)?.iter().zip([1.0f32, -2.0, 0.0]) {
///     assert!((p - 1.0 / (1.0 + (-y).exp())).abs() < 1e-6, "{p}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn predict(
    gpu: &GpuContext,
    stream: &CudaStream,
    y_pos: &impl DevicePtr<f32>,
    y_neg: &impl DevicePtr<f32>,
    y: &mut impl DevicePtrMut<f32>,
    prob: &mut impl DevicePtrMut<f32>,
    n: usize,
) -> Result<(), GpuError> {
    const OP: &str = "head predict";
    check_len(OP, "y_pos", y_pos, n)?;
    check_len(OP, "y_neg", y_neg, n)?;
    check_len(OP, "y", y, n)?;
    check_len(OP, "prob", prob, n)?;
    if n == 0 {
        return Ok(());
    }
    let (ap, _g1) = y_pos.device_ptr(stream);
    let (bp, _g2) = y_neg.device_ptr(stream);
    let (yp, _g3) = y.device_ptr_mut(stream);
    let (pp, _g4) = prob.device_ptr_mut(stream);
    let f = gpu.kernel(head::HEAD_PREDICT)?;
    let n64 = n as u64;
    let blocks = grid_stride_blocks(gpu, n64, BLOCK as u64);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&ap).arg(&bp).arg(&yp).arg(&pp).arg(&n64);
    // SAFETY: all four buffers hold n floats (checked).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching head_predict"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::invert_table;

    #[test]
    fn inverse_lists_each_value_in_increasing_order() {
        let table = [2u32, 0, 2, 1, 2, 0];
        let (off, items) = invert_table(&table, 4).unwrap();
        assert_eq!(off, vec![0, 2, 3, 6, 6]);
        assert_eq!(items, vec![1, 5, 3, 0, 2, 4]);
        for v in 0..4 {
            for &i in &items[off[v] as usize..off[v + 1] as usize] {
                assert_eq!(table[i as usize] as usize, v);
            }
        }
    }

    #[test]
    fn inverse_rejects_entries_out_of_range() {
        let err = invert_table(&[0, 3, 1], 3).unwrap_err();
        assert!(err.contains("entry 1 is 3"), "{err}");
        assert_eq!(invert_table(&[], 0).unwrap(), (vec![0], vec![]));
    }
}

// ---------------------------------------------------------------- one-call API on typed views

/// One branch's label-gated head on a device, as [`gated_forward`] and [`gated_backward`] take
/// it: the gate table `gate [rows, D]`, the classifier `w [K, D]` and `c [K]` (fp32, dense
/// views), the gating tables (`tok`, `grow`, index `e*K + k`, uploaded once as
/// [`IndexTable`]s) and the experts per label `E`.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor};
/// use mlvpt::ops::head::{self, cuda::{gated_forward, GatedHead, IndexTable}, MoeShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // Group gating: K = 4 labels in T = 2 groups (k % 2), E = 2 experts per group, one prompt
/// // token per (expert, group) and one gate row each: P = E*T = 4 = gate rows.
/// let (b, p, d, k, e) = (2, 4, 16, 4, 2);
/// let idx: Vec<u32> = (0..e * k).map(|i| ((i / k) * 2 + (i % k) % 2) as u32).collect();
/// let (tok, grow) = (IndexTable::new(&gpu, &idx, p)?, IndexTable::new(&gpu, &idx, 4)?);
/// let val = |n: usize, m: usize| (0..n).map(|i| ((i * m) % 23) as f32 / 23.0 - 0.5).collect::<Vec<f32>>();
/// let z: Vec<bf16> = val(b * p * d, 7).iter().map(|&x| bf16::from_f32(x)).collect();
/// let (gate, w, c) = (val(4 * d, 3), val(k * d, 11), val(k, 13));
/// let (zd, gd, wd, cd) = (gpu.upload(&z)?, gpu.upload(&gate)?, gpu.upload(&w)?, gpu.upload(&c)?);
/// let head = GatedHead { gate: Tensor::new(&gd, [4, d]), w: Tensor::new(&wd, [k, d]), c: Tensor::new(&cd, [k]), tok: &tok, grow: &grow, experts: e };
/// let z_view = Tensor::new(&zd, [b, p, d]);
/// let out = gated_forward(&gpu, &head, &z_view, &z_view)?; // adapted = z: no adapters
/// // The CPU twin.
/// let s = MoeShape { batch: b, tokens: p, dim: d, labels: k, experts: e, gate_rows: 4 };
/// let z32: Vec<f32> = z.iter().map(|x| x.to_f32()).collect();
/// let (mut y, mut m, mut q, mut r) = (vec![0.0f32; b * k], vec![0.0f32; b * k], vec![0.0f32; b * e * k], vec![0.0f32; b * e * k]);
/// head::cpu::moe_forward(&z32, &z32, &gate, &w, &c, &idx, &idx, &mut y, &mut m, &mut q, &mut r, &s);
/// for (g, w) in gpu.download(&out.y)?.iter().zip(&y) {
///     assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
/// }
/// # Ok(()) }
/// ```
pub struct GatedHead<'a> {
    pub gate: Tensor<'a, f32, 2>,
    pub w: Tensor<'a, f32, 2>,
    pub c: Tensor<'a, f32, 1>,
    pub tok: &'a IndexTable,
    pub grow: &'a IndexTable,
    pub experts: usize,
}

/// What [`gated_forward`] returns: the logits `y [B, K]`, the gate-score mixture `m [B, K]`
/// and the saved `q, r [B, E, K]` the backward takes back (fp32, dense).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor};
/// use mlvpt::ops::head::cuda::{gated_forward, GatedHead, GatedOutput, IndexTable};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, p, d, k, e) = (3, 2, 8, 2, 1); // one expert per label: A = 1, y = r + c, m = q
/// let (tok, grow) = (IndexTable::new(&gpu, &[0, 1], p)?, IndexTable::new(&gpu, &[0, 1], k)?);
/// let z = gpu.upload(&vec![bf16::ONE; b * p * d])?;
/// let (gate, w, c) = (gpu.upload(&[0.5f32; 16])?, gpu.upload(&[0.25f32; 16])?, gpu.upload(&[1.0f32, -1.0])?);
/// let head = GatedHead { gate: Tensor::new(&gate, [k, d]), w: Tensor::new(&w, [k, d]), c: Tensor::new(&c, [k]), tok: &tok, grow: &grow, experts: e };
/// let out: GatedOutput = gated_forward(&gpu, &head, &Tensor::new(&z, [b, p, d]), &Tensor::new(&z, [b, p, d]))?;
/// assert_eq!(out.shape.batch, 3);
/// assert_eq!(gpu.download(&out.q)?, [4.0; 6]); // 8 x 1 x 0.5
/// assert_eq!(gpu.download(&out.m)?, [4.0; 6]);
/// assert_eq!(gpu.download(&out.r)?, [2.0; 6]); // 8 x 1 x 0.25
/// assert_eq!(gpu.download(&out.y)?, [3.0, 1.0, 3.0, 1.0, 3.0, 1.0]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GatedOutput {
    pub y: CudaSlice<f32>,
    pub m: CudaSlice<f32>,
    pub q: CudaSlice<f32>,
    pub r: CudaSlice<f32>,
    /// The call's sizes.
    pub shape: MoeShape,
}

/// The parameter gradients [`gated_backward`] returns: `dgate [rows, D]`, `dw [K, D]`,
/// `dc [K]` (fp32).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor, TensorMut};
/// use mlvpt::ops::head::cuda::{gated_backward, gated_forward, GatedGrads, GatedHead, IndexTable};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, p, d, k, e) = (2, 2, 8, 2, 1);
/// let (tok, grow) = (IndexTable::new(&gpu, &[0, 1], p)?, IndexTable::new(&gpu, &[0, 1], k)?);
/// let z = gpu.upload(&vec![bf16::ONE; b * p * d])?;
/// let (gate, w, c) = (gpu.upload(&[0.5f32; 16])?, gpu.upload(&[0.25f32; 16])?, gpu.zeros::<f32>(k)?);
/// let head = GatedHead { gate: Tensor::new(&gate, [k, d]), w: Tensor::new(&w, [k, d]), c: Tensor::new(&c, [k]), tok: &tok, grow: &grow, experts: e };
/// let zv = Tensor::new(&z, [b, p, d]);
/// let fwd = gated_forward(&gpu, &head, &zv, &zv)?;
/// let (dy, dm) = (gpu.upload(&[1.0f32, 2.0, 3.0, 4.0])?, gpu.zeros::<f32>(b * k)?);
/// let (mut dz, mut da) = (gpu.zeros::<bf16>(b * p * d)?, gpu.zeros::<bf16>(b * p * d)?);
/// let g: GatedGrads = gated_backward(&gpu, &head, &zv, &zv, &fwd, &Tensor::new(&dy, [b, k]), &Tensor::new(&dm, [b, k]),
///                                    &mut TensorMut::new(&mut dz, [b, p, d]), &mut TensorMut::new(&mut da, [b, p, d]))?;
/// assert_eq!(gpu.download(&g.dc)?, [4.0, 6.0]); // dc = sum over the batch of dy
/// assert_eq!(gpu.download(&g.dw)?[..d], [4.0; 8]); // dw[k] = sum_b dy[b, k] z[b, tok]
/// assert_eq!(g.dgate.len(), k * d);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GatedGrads {
    pub dgate: CudaSlice<f32>,
    pub dw: CudaSlice<f32>,
    pub dc: CudaSlice<f32>,
}

impl GatedHead<'_> {
    /// The sizes of a call on `z [B, P, D]`, each view checked against them by name.
    fn shape(&self, op: &'static str, z: &Tensor<bf16, 3>, adapted: &Tensor<bf16, 3>) -> Result<MoeShape, GpuError> {
        let [batch, tokens, dim] = z.shape();
        let [gate_rows, _] = self.gate.shape();
        let [labels, _] = self.w.shape();
        check_dense(op, "z", z.layout(), [batch, tokens, dim], "[B, P, D]")?;
        check_dense(op, "adapted", adapted.layout(), [batch, tokens, dim], "[B, P, D], as z")?;
        check_dense(op, "gate", self.gate.layout(), [gate_rows, dim], "[rows, D], D as z")?;
        check_dense(op, "w", self.w.layout(), [labels, dim], "[K, D], D as z")?;
        check_dense(op, "c", self.c.layout(), [labels], "[K], K as w")?;
        Ok(MoeShape {
            batch,
            tokens,
            dim,
            labels,
            experts: self.experts,
            gate_rows,
        })
    }
}

/// One branch's gating, expert mixture and classifier on a device, in one call: from the prompt
/// tokens `z [B, P, D]` and their adapted features `adapted [B, P, D]` (bf16, dense), returns
/// `y, m [B, K]` and the saved `q, r [B, E, K]` (see [`moe_forward`], which this checks and
/// calls with the default [`HeadKernels`]). The twin of [`super::cpu::moe_forward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor};
/// use mlvpt::ops::head::cuda::{gated_forward, GatedHead, IndexTable};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, p, d, k, e) = (2, 3, 16, 4, 2); // 3 prompt tokens, 4 labels, 2 experts each
/// let z = gpu.upload(&vec![bf16::from_f32(0.5); b * p * d])?;
/// let (gate, w, c) = (gpu.upload(&vec![0.1f32; e * k * d])?, gpu.upload(&vec![0.2f32; k * d])?, gpu.upload(&vec![0.0f32; k])?);
/// // Expert e of label k is token (e + k) % p and gate row e*K + k (label gating).
/// let tok: Vec<u32> = (0..e * k).map(|i| ((i / k + i % k) % p) as u32).collect();
/// let grow: Vec<u32> = (0..(e * k) as u32).collect();
/// let (tok, grow) = (IndexTable::new(&gpu, &tok, p)?, IndexTable::new(&gpu, &grow, e * k)?);
/// let head = GatedHead { gate: Tensor::new(&gate, [e * k, d]), w: Tensor::new(&w, [k, d]), c: Tensor::new(&c, [k]), tok: &tok, grow: &grow, experts: e };
/// let out = gated_forward(&gpu, &head, &Tensor::new(&z, [b, p, d]), &Tensor::new(&z, [b, p, d]))?;
/// let y = gpu.download(&out.y)?; // 16 * 0.5 * 0.2 = 1.6 for every (b, k)
/// assert!(y.iter().all(|&v| (v - 1.6).abs() < 1e-2), "{y:?}");
/// # Ok(()) }
/// ```
pub fn gated_forward(gpu: &GpuContext, head: &GatedHead, z: &Tensor<bf16, 3>, adapted: &Tensor<bf16, 3>) -> Result<GatedOutput, GpuError> {
    const OP: &str = "gated head forward";
    let s = head.shape(OP, z, adapted)?;
    let (bk, bek) = ((s.batch * s.labels).max(1), (s.batch * s.experts * s.labels).max(1));
    let (mut y, mut m, mut q, mut r) = (gpu.zeros(bk)?, gpu.zeros(bk)?, gpu.zeros(bek)?, gpu.zeros(bek)?);
    moe_forward(
        gpu,
        gpu.stream(),
        z,
        adapted,
        &head.gate,
        &head.w,
        &head.c,
        head.tok,
        head.grow,
        &mut y,
        &mut m,
        &mut q,
        &mut r,
        &s,
        HeadKernels::default(),
    )?;
    Ok(GatedOutput { y, m, q, r, shape: s })
}

/// Backward of [`gated_forward`] in one call: from `dy, dm [B, K]` (fp32, dense) and the
/// forward's output, adds the token gradients into `dz` and `dadapted` (bf16 `[B, P, D]`,
/// dense; tokens no expert uses are left as they are) and returns the parameter gradients.
/// The twin of [`super::cpu::moe_backward`]; the `embed_head` example runs both.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor, TensorMut};
/// use mlvpt::ops::head::{self, cuda::{gated_backward, gated_forward, GatedHead, IndexTable}, MoeShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let s = MoeShape { batch: 2, tokens: 3, dim: 16, labels: 4, experts: 2, gate_rows: 8 }; // label gating
/// let (b, p, d, k, e) = (s.batch, s.tokens, s.dim, s.labels, s.experts);
/// let val = |n: usize, m: usize| (0..n).map(|i| ((i * m) % 23) as f32 / 23.0 - 0.5).collect::<Vec<f32>>();
/// let to16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
/// let (z, a) = (to16(&val(b * p * d, 7)), to16(&val(b * p * d, 5)));
/// let (gate, w, c, dy, dm) = (val(8 * d, 3), val(k * d, 11), val(k, 13), val(b * k, 17), val(b * k, 19));
/// let tok: Vec<u32> = (0..e * k).map(|i| ((i / k + i % k) % p) as u32).collect();
/// let grow: Vec<u32> = (0..(e * k) as u32).collect();
/// let (tok_t, grow_t) = (IndexTable::new(&gpu, &tok, p)?, IndexTable::new(&gpu, &grow, 8)?);
/// let (zd, ad, gd, wd, cd) = (gpu.upload(&z)?, gpu.upload(&a)?, gpu.upload(&gate)?, gpu.upload(&w)?, gpu.upload(&c)?);
/// let head = GatedHead { gate: Tensor::new(&gd, [8, d]), w: Tensor::new(&wd, [k, d]), c: Tensor::new(&cd, [k]), tok: &tok_t, grow: &grow_t, experts: e };
/// let (zv, av) = (Tensor::new(&zd, [b, p, d]), Tensor::new(&ad, [b, p, d]));
/// let fwd = gated_forward(&gpu, &head, &zv, &av)?;
/// let (dyd, dmd) = (gpu.upload(&dy)?, gpu.upload(&dm)?);
/// let (mut dz, mut da) = (gpu.zeros::<bf16>(b * p * d)?, gpu.zeros::<bf16>(b * p * d)?);
/// let g = gated_backward(&gpu, &head, &zv, &av, &fwd, &Tensor::new(&dyd, [b, k]), &Tensor::new(&dmd, [b, k]),
///                        &mut TensorMut::new(&mut dz, [b, p, d]), &mut TensorMut::new(&mut da, [b, p, d]))?;
/// // The CPU twin in f64, from the forward's q and r.
/// let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
/// let b64 = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
/// let (mut cdz, mut cda) = (vec![0.0; b * p * d], vec![0.0; b * p * d]);
/// let (mut cdgate, mut cdw, mut cdc) = (vec![0.0; 8 * d], vec![0.0; k * d], vec![0.0; k]);
/// head::cpu::moe_backward(&f64s(&dy), &f64s(&dm), &b64(&z), &b64(&a), &f64s(&gate), &f64s(&w), &tok, &grow,
///                         &f64s(&gpu.download(&fwd.q)?), &f64s(&gpu.download(&fwd.r)?), &mut cdz, &mut cda, &mut cdgate, &mut cdw, &mut cdc, &s, &mut Vec::new());
/// let close = |got: &[f64], want: &[f64], tol: f64| {
///     let big = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
///     got.iter().zip(want).all(|(g, w)| (g - w).abs() <= tol * big + 1e-6)
/// };
/// assert!(close(&f64s(&gpu.download(&g.dgate)?), &cdgate, 1e-3) && close(&f64s(&gpu.download(&g.dw)?), &cdw, 1e-3));
/// assert!(close(&f64s(&gpu.download(&g.dc)?), &cdc, 1e-5));
/// assert!(close(&b64(&gpu.download(&dz)?), &cdz, 1e-2) && close(&b64(&gpu.download(&da)?), &cda, 1e-2)); // bf16
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gated_backward(
    gpu: &GpuContext,
    head: &GatedHead,
    z: &Tensor<bf16, 3>,
    adapted: &Tensor<bf16, 3>,
    fwd: &GatedOutput,
    dy: &Tensor<f32, 2>,
    dm: &Tensor<f32, 2>,
    dz: &mut TensorMut<bf16, 3>,
    dadapted: &mut TensorMut<bf16, 3>,
) -> Result<GatedGrads, GpuError> {
    const OP: &str = "gated head backward";
    let s = head.shape(OP, z, adapted)?;
    if s != fwd.shape {
        return Err(GpuError::invalid(
            OP,
            format!("the forward output is of {:?}, this call of {s:?}", fwd.shape),
        ));
    }
    check_dense(OP, "dy", dy.layout(), [s.batch, s.labels], "[B, K]")?;
    check_dense(OP, "dm", dm.layout(), [s.batch, s.labels], "[B, K]")?;
    check_dense(OP, "dz", dz.layout(), [s.batch, s.tokens, s.dim], "[B, P, D], as z")?;
    check_dense(OP, "dadapted", dadapted.layout(), [s.batch, s.tokens, s.dim], "[B, P, D], as z")?;
    let mut g = GatedGrads {
        dgate: gpu.zeros((s.gate_rows * s.dim).max(1))?,
        dw: gpu.zeros((s.labels * s.dim).max(1))?,
        dc: gpu.zeros(s.labels.max(1))?,
    };
    let mut ws = HeadWorkspace::new();
    moe_backward(
        gpu,
        gpu.stream(),
        &mut ws,
        dy,
        dm,
        z,
        adapted,
        &head.gate,
        &head.w,
        head.tok,
        head.grow,
        &fwd.q,
        &fwd.r,
        dz,
        dadapted,
        &mut g.dgate,
        &mut g.dw,
        &mut g.dc,
        &s,
        HeadKernels::default(),
    )?;
    Ok(g)
}
