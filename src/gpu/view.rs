//! Typed views of device tensors for the one-call ops: a buffer (any cudarc `CudaSlice` or
//! `CudaView`, the caller's or this crate's), an element offset, a shape and element strides,
//! with the element type and rank in the type. An op checks each view it is given (extent
//! inside the buffer, unit stride where its kernel needs one, 16-byte alignment) and names the
//! argument that fails.

use super::{CudaStream, DevicePtr, DevicePtrMut, GpuError};
use cudarc::driver::SyncOnDrop;

/// Where a view's elements are: `offset + sum(index[i] * strides[i])` of the buffer.
///
/// ```
/// use mlvpt::gpu::Layout;
/// // K of a packed qkv [B=2, N=5, 3, h=4, dh=8]: [B, N, h, dh] at offset h*dh.
/// let k = Layout { offset: 32, shape: [2, 5, 4, 8], strides: [5 * 96, 96, 8, 1] };
/// assert_eq!(k.numel(), 320);
/// assert_eq!(k.extent(), 928); // within the 960 elements of the qkv buffer
/// assert!(!k.is_contiguous());
/// assert_eq!(Layout::contiguous([2, 5, 4, 8]).strides, [160, 32, 8, 1]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout<const R: usize> {
    pub offset: usize,
    pub shape: [usize; R],
    pub strides: [usize; R],
}

impl<const R: usize> Layout<R> {
    /// Row-major and dense.
    ///
    /// ```
    /// use mlvpt::gpu::Layout;
    /// let l = Layout::contiguous([2, 3, 4]);
    /// assert_eq!((l.offset, l.strides), (0, [12, 4, 1]));
    /// ```
    pub fn contiguous(shape: [usize; R]) -> Self {
        let mut strides = [0; R];
        let mut s = 1;
        for i in (0..R).rev() {
            strides[i] = s;
            s *= shape[i];
        }
        Self { offset: 0, shape, strides }
    }
    /// Number of elements the view addresses.
    ///
    /// ```
    /// use mlvpt::gpu::Layout;
    /// assert_eq!(Layout::contiguous([2, 3, 4]).numel(), 24);
    /// assert_eq!(Layout::contiguous([2, 0, 4]).numel(), 0);
    /// ```
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// One past the last buffer element the view addresses (its offset when it is empty).
    ///
    /// ```
    /// use mlvpt::gpu::Layout;
    /// assert_eq!(Layout::contiguous([2, 3]).extent(), 6);
    /// // Every other row of a [4, 3] matrix, from row 1: rows 1 and 3 end at element 12.
    /// let odd_rows = Layout { offset: 3, shape: [2, 3], strides: [6, 1] };
    /// assert_eq!(odd_rows.extent(), 12);
    /// assert_eq!(Layout { offset: 5, shape: [0, 3], strides: [3, 1] }.extent(), 5); // empty
    /// ```
    pub fn extent(&self) -> usize {
        if self.numel() == 0 {
            return self.offset;
        }
        self.offset + self.shape.iter().zip(&self.strides).map(|(n, s)| (n - 1) * s).sum::<usize>() + 1
    }
    /// Whether the layout is row-major and dense.
    ///
    /// ```
    /// use mlvpt::gpu::Layout;
    /// assert!(Layout::contiguous([4, 3]).is_contiguous());
    /// assert!(Layout { offset: 6, ..Layout::contiguous([2, 3]) }.is_contiguous()); // any offset
    /// assert!(!Layout { offset: 0, shape: [2, 3], strides: [6, 1] }.is_contiguous());
    /// ```
    pub fn is_contiguous(&self) -> bool {
        Self {
            offset: self.offset,
            ..Self::contiguous(self.shape)
        } == *self
    }

    /// Fails unless the view fits a buffer of `len` elements, its last dimension has unit
    /// stride, and (with `vec` elements of `elem` bytes per 16-byte load) every row starts on a
    /// 16-byte boundary of a buffer at address `base`.
    pub(crate) fn check(&self, op: &'static str, name: &str, len: usize, base: u64, elem: usize, vec: bool) -> Result<(), GpuError> {
        if self.extent() > len {
            return Err(GpuError::invalid(
                op,
                format!(
                    "{name}: shape {:?}, strides {:?} at offset {} reach element {}, past the buffer's {len}",
                    self.shape,
                    self.strides,
                    self.offset,
                    self.extent() - 1
                ),
            ));
        }
        if R > 0 && self.shape[R - 1] > 1 && self.strides[R - 1] != 1 {
            return Err(GpuError::invalid(
                op,
                format!(
                    "{name}: the last dimension must be contiguous (stride 1), not stride {}",
                    self.strides[R - 1]
                ),
            ));
        }
        if vec {
            let per = 16 / elem;
            if let Some(i) = (0..R.saturating_sub(1)).find(|&i| self.shape[i] > 1 && !self.strides[i].is_multiple_of(per)) {
                return Err(GpuError::invalid(
                    op,
                    format!(
                        "{name}: stride {} of dimension {i} is not a multiple of {per} elements (16 bytes)",
                        self.strides[i]
                    ),
                ));
            }
            let addr = base + (self.offset * elem) as u64;
            if !addr.is_multiple_of(16) {
                return Err(GpuError::invalid(
                    op,
                    format!("{name} is not 16-byte aligned (address {addr:#x}, offset {} elements)", self.offset),
                ));
            }
        }
        Ok(())
    }
}

/// A read-only view of a device tensor of `T` with `R` dimensions.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, Tensor};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let buf = gpu.upload(&vec![bf16::ZERO; 2 * 5 * 3 * 4 * 8])?; // qkv [B=2, N=5, 3, h=4, dh=8]
/// // K of every head: [B, N, h, dh] at offset h*dh, token stride 3*h*dh.
/// let k = Tensor::strided(&buf, 32, [2, 5, 4, 8], [5 * 96, 96, 8, 1]);
/// assert_eq!(k.shape(), [2, 5, 4, 8]);
/// # Ok(()) }
/// ```
pub struct Tensor<'a, T, const R: usize> {
    buf: &'a dyn DevicePtr<T>,
    layout: Layout<R>,
}

impl<'a, T, const R: usize> Tensor<'a, T, R> {
    /// A dense row-major view of the start of `buf`.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, Tensor};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let buf = gpu.zeros::<f32>(2 * 3)?;
    /// let t = Tensor::new(&buf, [2, 3]);
    /// assert_eq!((t.shape(), t.strides()), ([2, 3], [3, 1]));
    /// # Ok(()) }
    /// ```
    pub fn new(buf: &'a impl DevicePtr<T>, shape: [usize; R]) -> Self {
        Self {
            buf,
            layout: Layout::contiguous(shape),
        }
    }
    /// A view at element `offset` of `buf` with element `strides`.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, Tensor};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let buf = gpu.upload(&[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0])?; // [3, 2]
    /// let col1 = Tensor::strided(&buf, 1, [3], [2]); // its second column
    /// assert_eq!(col1.layout().extent(), 6);
    /// # Ok(()) }
    /// ```
    pub fn strided(buf: &'a impl DevicePtr<T>, offset: usize, shape: [usize; R], strides: [usize; R]) -> Self {
        Self {
            buf,
            layout: Layout { offset, shape, strides },
        }
    }
    /// The view's layout.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, Layout, Tensor};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let buf = gpu.zeros::<f32>(12)?;
    /// let t = Tensor::strided(&buf, 4, [2, 4], [4, 1]);
    /// assert_eq!(*t.layout(), Layout { offset: 4, shape: [2, 4], strides: [4, 1] });
    /// assert!(t.layout().is_contiguous());
    /// # Ok(()) }
    /// ```
    pub fn layout(&self) -> &Layout<R> {
        &self.layout
    }
    /// The view's shape.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, Tensor};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let buf = gpu.zeros::<f32>(24)?;
    /// assert_eq!(Tensor::new(&buf, [2, 3, 4]).shape(), [2, 3, 4]);
    /// # Ok(()) }
    /// ```
    pub fn shape(&self) -> [usize; R] {
        self.layout.shape
    }
    /// The view's element strides.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, Tensor};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let buf = gpu.zeros::<f32>(24)?;
    /// assert_eq!(Tensor::new(&buf, [2, 3, 4]).strides(), [12, 4, 1]);
    /// # Ok(()) }
    /// ```
    pub fn strides(&self) -> [usize; R] {
        self.layout.strides
    }
    /// Number of elements of the underlying buffer.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, Tensor};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let buf = gpu.zeros::<f32>(100)?;
    /// let t = Tensor::strided(&buf, 10, [2, 5], [5, 1]);
    /// assert_eq!(t.buffer_len(), 100); // the whole buffer, not the view
    /// # Ok(()) }
    /// ```
    pub fn buffer_len(&self) -> usize {
        self.buf.len()
    }
    /// The device address of the view's first element (with cudarc's guard for the stream).
    pub(crate) fn ptr<'s>(&'s self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        let (p, g) = self.buf.device_ptr(stream);
        (p + (self.layout.offset * std::mem::size_of::<T>()) as u64, g)
    }
    /// [`Layout::check`] against this view's buffer.
    pub(crate) fn check(&self, op: &'static str, name: &str, stream: &CudaStream, vec: bool) -> Result<(), GpuError> {
        let (base, _g) = self.buf.device_ptr(stream);
        self.layout.check(op, name, self.buf.len(), base, std::mem::size_of::<T>(), vec)
    }
}

/// A writable view of a device tensor of `T` with `R` dimensions.
///
/// ```
/// use mlvpt::gpu::{GpuContext, TensorMut};
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let mut buf = gpu.zeros::<f32>(8)?;
/// {
///     // Rows 1..3 of a [4, 2] matrix. A view also goes wherever a cudarc buffer does,
///     // starting at its first element.
///     let mut rows = TensorMut::strided(&mut buf, 2, [2, 2], [2, 1]);
///     assert_eq!(rows.shape(), [2, 2]);
///     tokens::cuda::fill::<f32>(&gpu, gpu.stream(), &mut rows, 4, 1.0)?;
/// }
/// assert_eq!(gpu.download(&buf)?, [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
/// # Ok(()) }
/// ```
pub struct TensorMut<'a, T, const R: usize> {
    buf: &'a mut dyn DevicePtrMut<T>,
    layout: Layout<R>,
}

impl<'a, T, const R: usize> TensorMut<'a, T, R> {
    /// A dense row-major view of the start of `buf`.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, TensorMut};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let mut buf = gpu.zeros::<f32>(6)?;
    /// let t = TensorMut::new(&mut buf, [2, 3]);
    /// assert!(t.layout().is_contiguous());
    /// # Ok(()) }
    /// ```
    pub fn new(buf: &'a mut impl DevicePtrMut<T>, shape: [usize; R]) -> Self {
        Self {
            buf,
            layout: Layout::contiguous(shape),
        }
    }
    /// A view at element `offset` of `buf` with element `strides`.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, TensorMut};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let mut buf = gpu.zeros::<f32>(6)?;
    /// let col0 = TensorMut::strided(&mut buf, 0, [3], [2]); // the first column of a [3, 2]
    /// assert_eq!(col0.layout().extent(), 5);
    /// # Ok(()) }
    /// ```
    pub fn strided(buf: &'a mut impl DevicePtrMut<T>, offset: usize, shape: [usize; R], strides: [usize; R]) -> Self {
        Self {
            buf,
            layout: Layout { offset, shape, strides },
        }
    }
    /// The view's layout.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, Layout, TensorMut};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let mut buf = gpu.zeros::<f32>(12)?;
    /// let t = TensorMut::strided(&mut buf, 6, [2, 3], [3, 1]);
    /// assert_eq!(*t.layout(), Layout { offset: 6, ..Layout::contiguous([2, 3]) });
    /// # Ok(()) }
    /// ```
    pub fn layout(&self) -> &Layout<R> {
        &self.layout
    }
    /// The view's shape.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, TensorMut};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let mut buf = gpu.zeros::<f32>(24)?;
    /// assert_eq!(TensorMut::new(&mut buf, [2, 3, 4]).shape(), [2, 3, 4]);
    /// # Ok(()) }
    /// ```
    pub fn shape(&self) -> [usize; R] {
        self.layout.shape
    }
    /// The device address of the view's first element.
    pub(crate) fn ptr_mut<'s>(&'s mut self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        let (p, g) = self.buf.device_ptr_mut(stream);
        (p + (self.layout.offset * std::mem::size_of::<T>()) as u64, g)
    }
    /// [`Layout::check`] against this view's buffer.
    pub(crate) fn check(&mut self, op: &'static str, name: &str, stream: &CudaStream, vec: bool) -> Result<(), GpuError> {
        let len = self.buf.len();
        let (base, _g) = self.buf.device_ptr_mut(stream);
        self.layout.check(op, name, len, base, std::mem::size_of::<T>(), vec)
    }
}

/// A view is a device slice starting at its first element, so a dense view can go wherever a
/// cudarc buffer can (the op checks the layout; the length is the buffer's rest).
impl<T, const R: usize> cudarc::driver::DeviceSlice<T> for Tensor<'_, T, R> {
    fn len(&self) -> usize {
        self.buf.len().saturating_sub(self.layout.offset)
    }
    fn stream(&self) -> &std::sync::Arc<CudaStream> {
        self.buf.stream()
    }
}
impl<T, const R: usize> DevicePtr<T> for Tensor<'_, T, R> {
    fn device_ptr<'s>(&'s self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        self.ptr(stream)
    }
}
impl<T, const R: usize> cudarc::driver::DeviceSlice<T> for TensorMut<'_, T, R> {
    fn len(&self) -> usize {
        self.buf.len().saturating_sub(self.layout.offset)
    }
    fn stream(&self) -> &std::sync::Arc<CudaStream> {
        self.buf.stream()
    }
}
impl<T, const R: usize> DevicePtrMut<T> for TensorMut<'_, T, R> {
    fn device_ptr_mut<'s>(&'s mut self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        self.ptr_mut(stream)
    }
}

/// Fails unless `view` has shape `want` (named in the message by `dims`, e.g. "[B, P, D]"), is
/// dense and row-major, and fits its buffer (16-byte aligned where `vec`).
pub(crate) fn check_dense<const R: usize>(
    op: &'static str,
    name: &str,
    layout: &Layout<R>,
    want: [usize; R],
    dims: &str,
) -> Result<(), GpuError> {
    if layout.shape != want {
        return Err(GpuError::invalid(
            op,
            format!("{name} has shape {:?}, needs {want:?} ({dims})", layout.shape),
        ));
    }
    if !layout.is_contiguous() {
        return Err(GpuError::invalid(
            op,
            format!("{name} must be dense and row-major (strides {:?})", layout.strides),
        ));
    }
    Ok(())
}
