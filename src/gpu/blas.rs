//! cuBLAS GEMM for row-major matrices: bf16 or f32 inputs, f32 compute, bf16 or f32 output,
//! single or strided-batched. The linear layer built on it (`Y = X W^T + b`, `dX = dY W`,
//! `dW = dY^T X`, the bias kernel) is `ops::linear::cuda`.

use super::launch::check_len;
use super::{GpuContext, GpuError};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use std::sync::Arc;

/// The cuBLAS handle of a [`GpuContext`], bound to its stream.
pub(crate) struct Blas {
    handle: CudaBlas,
}

impl Blas {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self, cudarc::cublas::result::CublasError> {
        Ok(Self {
            handle: CudaBlas::new(stream)?,
        })
    }
}

/// An element type cuBLAS multiplies here (`bf16` or `f32`).
///
/// ```
/// use mlvpt::gpu::{bf16, CudaSlice, GemmType, GpuContext, GpuError};
/// // One helper for both input types: y [m, n] = x [m, k] w [n, k]^T in f32.
/// fn project<T: GemmType>(gpu: &GpuContext, x: &CudaSlice<T>, w: &CudaSlice<T>, m: usize, n: usize, k: usize) -> Result<Vec<f32>, GpuError> {
///     let mut y = gpu.zeros::<f32>(m * n)?;
///     gpu.gemm::<T, f32>(false, true, m, n, k, 1.0, x, w, 0.0, &mut y)?;
///     gpu.download(&y)
/// }
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (x, w) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 0.5]); // x [2, 2], w [1, 2]
/// let y32 = project(&gpu, &gpu.upload(&x)?, &gpu.upload(&w)?, 2, 1, 2)?;
/// let to_bf16 = |v: &[f32]| v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
/// let y16 = project(&gpu, &gpu.upload(&to_bf16(&x))?, &gpu.upload(&to_bf16(&w))?, 2, 1, 2)?;
/// assert_eq!(y32, [2.0, 5.0]);
/// assert_eq!(y16, y32); // these values are exact in bf16
/// # Ok(()) }
/// ```
pub trait GemmType: DeviceRepr {
    /// cuBLAS's name for it.
    const DATA_TYPE: cudaDataType;
}
impl GemmType for half::bf16 {
    const DATA_TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}
impl GemmType for f32 {
    const DATA_TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}

fn dim(op: &'static str, name: &str, v: usize) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::invalid(op, format!("{name} = {v} exceeds cuBLAS's int range")))
}

/// What `gemm` and `gemm_strided_batched` both pass cuBLAS for a row-major product: the sizes
/// as ints and the swapped operand order's transposes and leading dimensions (see [`GpuContext::gemm`]).
struct ColMajor {
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    op_a: cublasOperation_t,
    op_b: cublasOperation_t,
}

impl ColMajor {
    fn new(op: &'static str, ta: bool, tb: bool, m: usize, n: usize, k: usize) -> Result<Self, GpuError> {
        if k == 0 {
            return Err(GpuError::invalid(op, format!("inner dimension k = 0 (m={m}, n={n})")));
        }
        let (mi, ni, ki) = (dim(op, "m", m)?, dim(op, "n", n)?, dim(op, "k", k)?);
        let t = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        Ok(Self {
            m: mi,
            n: ni,
            k: ki,
            lda: if ta { mi } else { ki }.max(1),
            ldb: if tb { ki } else { ni }.max(1),
            op_a: t(ta),
            op_b: t(tb),
        })
    }
}

impl GpuContext {
    /// f32 accumulation, TF32 inputs for f32 operands when [`Self::allow_tf32`] is on.
    fn compute_type<T: GemmType>(&self) -> cublasComputeType_t {
        if self.tf32() && T::DATA_TYPE == cudaDataType::CUDA_R_32F {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        }
    }

    /// Row-major `C[m, n] = alpha op(A) op(B) + beta C` with op(A) m x k, op(B) k x n, where
    /// `ta`/`tb` say A is stored k x m / B is stored n x k. f32 accumulation; A and B share a type
    /// (fp32 inputs are rounded to TF32 when [`Self::allow_tf32`] is on).
    ///
    /// cuBLAS is column-major, and a row-major matrix read column-major is its transpose, so
    /// this computes `C^T = op(B)^T op(A)^T` with the operands swapped.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// // C [2, 2] = A [2, 3] B [3, 2], all row-major.
    /// let a = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;
    /// let b = gpu.upload(&[7.0f32, 8.0, 9.0, 10.0, 11.0, 12.0])?;
    /// let mut c = gpu.upload(&[1.0f32; 4])?;
    /// gpu.gemm::<f32, f32>(false, false, 2, 2, 3, 1.0, &a, &b, 0.0, &mut c)?;
    /// assert_eq!(gpu.download(&c)?, [58.0, 64.0, 139.0, 154.0]);
    /// // C = 2 b^T b + C: with `ta` the first operand (here b, stored [3, 2]) is read transposed.
    /// gpu.gemm::<f32, f32>(true, false, 2, 2, 3, 2.0, &b, &b, 1.0, &mut c)?;
    /// assert_eq!(gpu.download(&c)?, [2.0 * 251.0 + 58.0, 2.0 * 278.0 + 64.0, 2.0 * 278.0 + 139.0, 2.0 * 308.0 + 154.0]);
    /// # Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T: GemmType, O: GemmType>(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        beta: f32,
        c: &mut impl DevicePtrMut<O>,
    ) -> Result<(), GpuError> {
        const OP: &str = "gemm";
        check_len(OP, "A", a, m * k)?;
        check_len(OP, "B", b, k * n)?;
        check_len(OP, "C", c, m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let d = ColMajor::new(OP, ta, tb, m, n, k)?;
        let blas = self.blas()?;
        let stream = self.stream();
        let (ap, _ga) = a.device_ptr(stream);
        let (bp, _gb) = b.device_ptr(stream);
        let (cp, _gc) = c.device_ptr_mut(stream);
        // SAFETY: the lengths were checked against the shapes above; the handle is bound to
        // this context's stream, which the pointer guards synchronise with.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle.handle(),
                d.op_b,
                d.op_a,
                d.n,
                d.m,
                d.k,
                (&alpha) as *const f32 as *const _,
                bp as *const _,
                T::DATA_TYPE,
                d.ldb,
                ap as *const _,
                T::DATA_TYPE,
                d.lda,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                O::DATA_TYPE,
                d.n,
                self.compute_type::<T>(),
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(GpuError::cublas(format!("gemm m={m} n={n} k={k}")))
    }

    /// [`Self::gemm`] over `batch` independent products, operand `i` of A, B, C starting at
    /// `i * stride_{a,b,c}` elements (cuBLAS strided-batched; e.g. per-head attention scores).
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// // Two independent dot products, [1, 2] x [2, 1] each: c[i] = a_i . b_i.
    /// let a = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0])?;
    /// let b = gpu.upload(&[5.0f32, 6.0, 7.0, 8.0])?;
    /// let mut c = gpu.zeros::<f32>(2)?;
    /// gpu.gemm_strided_batched::<f32, f32>(false, false, 1, 1, 2, 1.0, &a, 2, &b, 2, 0.0, &mut c, 1, 2)?;
    /// assert_eq!(gpu.download(&c)?, [17.0, 53.0]);
    /// # Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_strided_batched<T: GemmType, O: GemmType>(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &impl DevicePtr<T>,
        stride_a: usize,
        b: &impl DevicePtr<T>,
        stride_b: usize,
        beta: f32,
        c: &mut impl DevicePtrMut<O>,
        stride_c: usize,
        batch: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "gemm_strided_batched";
        if batch == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        let d = ColMajor::new(OP, ta, tb, m, n, k)?;
        let last = batch - 1;
        check_len(OP, "A", a, last * stride_a + m * k)?;
        check_len(OP, "B", b, last * stride_b + k * n)?;
        check_len(OP, "C", c, last * stride_c + m * n)?;
        let bi = dim(OP, "batch", batch)?;
        let stride = |s: usize| i64::try_from(s).map_err(|_| GpuError::invalid(OP, format!("stride {s} exceeds 64 bits")));
        let (sa, sb, sc) = (stride(stride_a)?, stride(stride_b)?, stride(stride_c)?);
        let blas = self.blas()?;
        let stream = self.stream();
        let (ap, _ga) = a.device_ptr(stream);
        let (bp, _gb) = b.device_ptr(stream);
        let (cp, _gc) = c.device_ptr_mut(stream);
        // SAFETY: every operand's extent was checked above; the row-major to column-major swap
        // is the one `gemm` documents.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle.handle(),
                d.op_b,
                d.op_a,
                d.n,
                d.m,
                d.k,
                (&alpha) as *const f32 as *const _,
                bp as *const _,
                T::DATA_TYPE,
                d.ldb,
                sb,
                ap as *const _,
                T::DATA_TYPE,
                d.lda,
                sa,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                O::DATA_TYPE,
                d.n,
                sc,
                bi,
                self.compute_type::<T>(),
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(GpuError::cublas(format!("gemm_strided_batched m={m} n={n} k={k} batch={batch}")))
    }
}
