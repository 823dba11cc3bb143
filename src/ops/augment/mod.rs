//! Input augmentation as an op: a batch of uint8 RGB crops (each its own size, packed one after
//! another) resized to `S x S`, mirrored where asked, normalized, and written as the patch
//! embedding's input. The host's part per image is choosing the crop and copying its bytes; on a
//! GPU the bytes cross the bus as uint8 (a quarter of f32) and the rest is one kernel, which can
//! write the patch rows directly and save `patchify`'s pass.
//!
//! The resize is the antialiased triangle ("bilinear") filter of PIL, torchvision's
//! `antialias=True` and `fast_image_resize`: along each axis, output sample `o` of a crop `n`
//! long sits at `c = (o + 0.5) * n / S` and weighs source samples `i` by
//! `max(0, 1 - |i + 0.5 - c| / s)` with `s = max(n / S, 1)` (the filter widens when shrinking),
//! taps `floor(c - s + 0.5) .. floor(c + s + 0.5)` clipped to the crop, weights divided by their
//! sum. Unlike a uint8 resizer, nothing is rounded between the axes or before normalizing.
//!
//! `cpu.rs` holds the twin (what `CpuBackend` runs, the reference the kernel is tested against),
//! `cuda.rs` the launcher of `kernels/augment.cu`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use crate::contract::augment::Crop;

/// Where [`AugmentShape`]'s output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Images `[B, 3, S, S]`, as the host loader produces them.
    Images,
    /// The patch rows `[B, (S/p)^2, 3 * p * p]` of `Backend::patchify`: the patch embedding's
    /// GEMM input, written directly.
    Patches { patch: usize },
}

/// A batch of crops to augment: `batch` crops to `size x size`, normalized per channel as
/// `(v / 255 - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugmentShape {
    pub batch: usize,
    pub size: usize,
    pub layout: Layout,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl AugmentShape {
    /// Values written: `batch * 3 * size * size` in either layout.
    pub fn out_len(&self) -> usize {
        self.batch * 3 * self.size * self.size
    }

    /// The normalization as one multiply-add on 0..=255: `(scale, bias)` per channel.
    pub fn scale_bias(&self) -> ([f32; 3], [f32; 3]) {
        (
            [0, 1, 2].map(|c| (1.0 / (255.0 * self.std[c] as f64)) as f32),
            [0, 1, 2].map(|c| (-(self.mean[c] as f64) / self.std[c] as f64) as f32),
        )
    }

    /// The index in the output of value `(b, c, y, x)`.
    pub fn out_index(&self, b: usize, c: usize, y: usize, x: usize) -> usize {
        let s = self.size;
        match self.layout {
            Layout::Images => ((b * 3 + c) * s + y) * s + x,
            Layout::Patches { patch: p } => {
                let grid = s / p;
                let row = (y / p) * grid + x / p;
                b * 3 * s * s + row * 3 * p * p + (c * p + y % p) * p + x % p
            }
        }
    }

    /// Checks the shape and `crops` against a pixel buffer of `pixels_len` bytes: at least
    /// `batch` crops, each non-empty and inside the buffer, `flip` 0 or 1, and the patch size
    /// dividing `size` (the shape's part: [`check_shape`](Self::check_shape)).
    pub fn check(&self, crops: &[Crop], pixels_len: usize) -> Result<(), String> {
        self.check_shape()?;
        if crops.len() < self.batch {
            return Err(format!("{} crops for a batch of {}", crops.len(), self.batch));
        }
        check_crops(&crops[..self.batch], pixels_len)
    }

    /// The part of [`check`](Self::check) that needs no crops: `size` non-zero, the patch size
    /// dividing it, no zero (or NaN) in `std`. (A launcher checks this much on the host; the
    /// crops are in device memory there.)
    pub fn check_shape(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("output size 0".into());
        }
        if let Layout::Patches { patch } = self.layout {
            if patch == 0 || !self.size.is_multiple_of(patch) {
                return Err(format!("output size {} is not a multiple of patch {patch}", self.size));
            }
        }
        if self.std.iter().any(|&s| s.is_nan() || s == 0.0) {
            return Err(format!("std {:?} has a zero", self.std));
        }
        Ok(())
    }
}

/// The table of crops packed one after another: `(width, height, flip)` of each in order, and
/// the bytes their pixels take in all (each crop's `3 * width * height` from its `offset`).
///
/// ```
/// use mlvpt::ops::augment::pack;
/// let (crops, bytes) = pack([(4, 2, false), (3, 3, true)]);
/// assert_eq!((crops[1].offset, crops[1].flip, bytes), (24, 1, 24 + 27));
/// ```
pub fn pack(dims: impl IntoIterator<Item = (u32, u32, bool)>) -> (Vec<Crop>, usize) {
    let mut bytes = 0usize;
    let crops = dims
        .into_iter()
        .map(|(width, height, flip)| {
            let c = Crop {
                offset: bytes as u32,
                width,
                height,
                flip: flip as u32,
            };
            bytes += 3 * width as usize * height as usize;
            c
        })
        .collect();
    (crops, bytes)
}

/// Checks a crop table against a pixel buffer of `pixels_len` bytes: each crop non-empty and
/// inside the buffer, `flip` 0 or 1, and the buffer addressable by the table's u32 offsets.
pub fn check_crops(crops: &[Crop], pixels_len: usize) -> Result<(), String> {
    if u32::try_from(pixels_len).is_err() {
        return Err(format!("{pixels_len} bytes of pixels: a batch holds at most 4 GiB"));
    }
    for (i, c) in crops.iter().enumerate() {
        // In u128: 3 * width * height of two u32 can pass 2^64 and wrap to a small number.
        let end = c.offset as u128 + 3 * c.width as u128 * c.height as u128;
        if c.width == 0 || c.height == 0 || end > pixels_len as u128 || c.flip > 1 {
            return Err(format!(
                "crop {i} ({}x{} at byte {}, flip {}) does not fit {pixels_len} bytes of pixels",
                c.width, c.height, c.offset, c.flip
            ));
        }
    }
    Ok(())
}

/// The taps and weights of output sample `o` along an axis of `n` source samples resized to
/// `out` (see the module docs): the first tap and the normalized weights, appended to `w`.
pub fn taps(o: usize, n: usize, out: usize, w: &mut Vec<f32>) -> usize {
    let scale = n as f64 / out as f64;
    let support = scale.max(1.0);
    let center = (o as f64 + 0.5) * scale;
    let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
    let hi = (((center + support + 0.5).floor()) as usize).min(n);
    w.clear();
    let mut sum = 0.0f64;
    for i in lo..hi {
        let t = 1.0 - ((i as f64 + 0.5 - center) / support).abs();
        let v = t.max(0.0);
        w.push(v as f32);
        sum += v;
    }
    if sum > 0.0 {
        w.iter_mut().for_each(|v| *v = (*v as f64 / sum) as f32);
    }
    lo
}
