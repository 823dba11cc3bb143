//! Training augmentation (docs/MODEL.md#images-and-augmentation): random resized crop (area
//! scale 0.5-1, aspect ratio 3/4-4/3, torchvision's sampling) and a horizontal flip with
//! probability 1/2; the test transform is a plain resize.
//!
//! Resizing is `fast_image_resize`'s convolution with its `Bilinear` filter: the antialiased
//! triangle filter of PIL and torchvision's `antialias=True` (the filter widens by the scale
//! when shrinking), in 16-bit fixed point on RGB8, one pass per axis with a u8 image between
//! them. The crop is a view of the source rows (no copy), and the filter's taps stop at the
//! crop's edges, as when the crop is cut out first. Its SSE4.1 and AVX2 paths (chosen at run
//! time) give the same bytes as its plain one, so results depend on (seed, epoch, image) only.

use std::cell::RefCell;

use fast_image_resize as fir;
use fir::images::{TypedCroppedImage, TypedImage, TypedImageRef};
use fir::pixels::U8x3;
use image::imageops;
use image::RgbImage;
use rand::Rng;

/// Crop area as a fraction of the image.
pub const CROP_SCALE: (f64, f64) = (0.5, 1.0);
/// Crop aspect ratio (width / height).
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// The crop box `(x, y, w, h)` torchvision's `RandomResizedCrop.get_params` would draw: up to
/// 10 tries of (area, log-uniform ratio) that fit, else a centre crop clamped to the ratios.
pub fn crop_box<R: Rng>(rng: &mut R, width: u32, height: u32) -> (u32, u32, u32, u32) {
    let (w0, h0) = (width as f64, height as f64);
    let area = w0 * h0;
    let (lr0, lr1) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(CROP_SCALE.0..=CROP_SCALE.1);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let w = (target * ratio).sqrt().round();
        let h = (target / ratio).sqrt().round();
        if w >= 1.0 && h >= 1.0 && w <= w0 && h <= h0 {
            let (w, h) = (w as u32, h as u32);
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            return (x, y, w, h);
        }
    }
    let in_ratio = w0 / h0;
    let (w, h) = if in_ratio < CROP_RATIO.0 {
        (width, (w0 / CROP_RATIO.0).round() as u32)
    } else if in_ratio > CROP_RATIO.1 {
        ((h0 * CROP_RATIO.1).round() as u32, height)
    } else {
        (width, height)
    };
    let (w, h) = (w.clamp(1, width), h.clamp(1, height));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// What the training augmentation draws for one image: the crop box `(x, y, w, h)`, then
/// whether to mirror it left-right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainDraw {
    pub crop: (u32, u32, u32, u32),
    pub flip: bool,
}

/// The draws of the training augmentation for a `width x height` image: [`crop_box`], then the
/// flip (probability 1/2), in that order.
pub fn train_draw<R: Rng>(rng: &mut R, width: u32, height: u32) -> TrainDraw {
    let crop = crop_box(rng, width, height);
    let flip = rng.random_bool(0.5);
    TrainDraw { crop, flip }
}

/// A crop + resize of RGB8 images to squares with `fast_image_resize`, and the buffer the
/// result goes to, both reused from call to call.
pub struct Resizer {
    fir: fir::Resizer,
    out: Vec<u8>,
}

impl Default for Resizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Resizer {
    /// A resizer with the best SIMD extensions of this CPU.
    pub fn new() -> Self {
        Self {
            fir: fir::Resizer::new(),
            out: Vec::new(),
        }
    }

    /// A resizer that uses `ext` only, or `None` where this CPU lacks it (to check that every
    /// path gives the same bytes).
    pub fn with_cpu_extensions(ext: fir::CpuExtensions) -> Option<Self> {
        if !ext.is_supported() {
            return None;
        }
        let mut r = Self::new();
        // SAFETY: `ext` is supported by this CPU (checked above).
        unsafe { r.fir.set_cpu_extensions(ext) };
        Some(r)
    }

    /// The SIMD extensions this resizer uses.
    pub fn cpu_extensions(&self) -> fir::CpuExtensions {
        self.fir.cpu_extensions()
    }

    /// The crop `(x, y, w, h)` of the `width x height` RGB8 image `src` (rows packed) resized
    /// to `size x size` (RGB8, rows packed; valid until the next call). A crop of the output's
    /// size is copied as it is. Panics if `src` is shorter than the image or the crop does not
    /// fit in it.
    pub fn resize_crop(&mut self, src: &[u8], width: u32, height: u32, crop: (u32, u32, u32, u32), size: u32) -> &[u8] {
        let (x, y, w, h) = crop;
        let src = TypedImageRef::<U8x3>::from_buffer(width, height, src).expect("resize_crop: source buffer too short");
        let view = TypedCroppedImage::from_ref(&src, x, y, w, h).expect("resize_crop: crop outside the image");
        self.out.resize(3 * size as usize * size as usize, 0);
        let mut dst = TypedImage::<U8x3>::from_buffer(size, size, &mut self.out).expect("resize_crop: output buffer");
        let opts = fir::ResizeOptions::new().resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
        self.fir
            .resize_typed(&view, &mut dst, &opts)
            .expect("resize_crop: fast_image_resize refused the resize");
        &self.out
    }
}

thread_local! {
    /// One resizer per thread (the loader's rayon workers), reused across images and batches.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Runs `f` with this thread's [`Resizer`]. `f` must not call `with_resizer` itself.
pub fn with_resizer<T>(f: impl FnOnce(&mut Resizer) -> T) -> T {
    RESIZER.with(|r| f(&mut r.borrow_mut()))
}

/// Random resized crop to `size x size`, then a horizontal flip half of the time, as an image
/// (the loader does the same straight into its f32 batch).
pub fn train_transform<R: Rng>(rng: &mut R, img: &RgbImage, size: u32) -> RgbImage {
    let d = train_draw(rng, img.width(), img.height());
    let px = with_resizer(|r| r.resize_crop(img.as_raw(), img.width(), img.height(), d.crop, size).to_vec());
    let mut out = RgbImage::from_raw(size, size, px).expect("size x size RGB8");
    if d.flip {
        imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// The test transform: resize to `size x size` (aspect ratio not kept).
pub fn test_transform(img: &RgbImage, size: u32) -> RgbImage {
    if img.width() == size && img.height() == size {
        return img.clone();
    }
    let (w, h) = img.dimensions();
    let px = with_resizer(|r| r.resize_crop(img.as_raw(), w, h, (0, 0, w, h), size).to_vec());
    RgbImage::from_raw(size, size, px).expect("size x size RGB8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A `w x h` RGB8 image of random bytes (every pixel unlike its neighbours, so a tap in the
    /// wrong place shows).
    fn noise(rng: &mut ChaCha8Rng, w: u32, h: u32) -> Vec<u8> {
        let mut v = vec![0u8; 3 * (w * h) as usize];
        rng.fill_bytes(&mut v);
        v
    }

    /// A source's width and height, a crop of it and the output size.
    type Case = (u32, u32, (u32, u32, u32, u32), u32);

    /// Sources, crops and output sizes: shrinking, enlarging, one axis each way, odd sizes,
    /// crops away from the origin, single pixels and the identity.
    fn cases(rng: &mut ChaCha8Rng) -> Vec<Case> {
        let mut c = vec![
            (1, 1, (0, 0, 1, 1), 5),
            (7, 3, (0, 0, 7, 3), 7),
            (300, 7, (0, 0, 300, 7), 16),
            (37, 23, (3, 5, 31, 17), 224),
            (640, 480, (0, 0, 640, 480), 224),
            (224, 224, (0, 0, 224, 224), 224),
            (224, 224, (13, 2, 224 - 13, 222), 224),
            (101, 99, (50, 0, 1, 99), 9),
            (101, 99, (1, 1, 99, 97), 33),
        ];
        for (w, h, s) in [(500, 375, 224), (224, 224, 224), (333, 500, 61), (97, 61, 224), (1000, 17, 31)] {
            for _ in 0..3 {
                c.push((w, h, crop_box(rng, w, h), s));
            }
        }
        c
    }

    /// The SIMD extensions fast_image_resize has on this CPU besides the plain path.
    fn simd_extensions() -> Vec<fir::CpuExtensions> {
        #[cfg(target_arch = "x86_64")]
        let all = vec![fir::CpuExtensions::Sse4_1, fir::CpuExtensions::Avx2];
        #[cfg(target_arch = "aarch64")]
        let all = vec![fir::CpuExtensions::Neon];
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let all: Vec<fir::CpuExtensions> = vec![];
        all.into_iter().filter(|e| e.is_supported()).collect()
    }

    #[test]
    fn every_simd_path_gives_the_plain_paths_bytes() {
        let mut rng = ChaCha8Rng::seed_from_u64(20);
        let exts = simd_extensions();
        if cfg!(target_arch = "x86_64") {
            // Every x86-64 CPU this runs on has SSE4.1: the comparison below must not be empty.
            assert!(!exts.is_empty(), "no SIMD path to compare");
            assert_eq!(
                Resizer::new().cpu_extensions(),
                *exts.last().unwrap(),
                "the default is the best path"
            );
        }
        let mut plain = Resizer::with_cpu_extensions(fir::CpuExtensions::None).unwrap();
        let mut simd: Vec<Resizer> = exts.iter().map(|&e| Resizer::with_cpu_extensions(e).unwrap()).collect();
        for (w, h, crop, size) in cases(&mut rng) {
            let src = noise(&mut rng, w, h);
            let want = plain.resize_crop(&src, w, h, crop, size).to_vec();
            assert_eq!(want.len(), 3 * (size * size) as usize);
            for r in &mut simd {
                let got = r.resize_crop(&src, w, h, crop, size);
                assert!(
                    got == want.as_slice(),
                    "{:?} differs from the plain path: {w}x{h} crop {crop:?} to {size}",
                    r.cpu_extensions()
                );
            }
        }
    }

    /// The antialiased triangle filter, straight from its definition (PIL's `Image.resize`
    /// with `BILINEAR`, torchvision's `antialias=True`): along an axis of `n` samples resized
    /// to `out`, output `o` is centred at `(o + 0.5) n / out` and weighs samples `i` in
    /// `floor(c - s + 0.5) .. floor(c + s + 0.5)` (clipped to the axis) by
    /// `max(0, 1 - |i + 0.5 - c| / s)`, `s = max(n / out, 1)`, normalized. In f64, unrounded.
    fn triangle_reference(src: &[u8], width: u32, crop: (u32, u32, u32, u32), size: u32) -> Vec<f64> {
        let axis = |n: u32| -> Vec<(usize, Vec<f64>)> {
            let scale = n as f64 / size as f64;
            let support = scale.max(1.0);
            (0..size)
                .map(|o| {
                    let c = (o as f64 + 0.5) * scale;
                    let lo = ((c - support + 0.5).floor() as i64).max(0) as usize;
                    let hi = ((c + support + 0.5).floor() as i64).min(n as i64) as usize;
                    let w: Vec<f64> = (lo..hi).map(|i| (1.0 - ((i as f64 + 0.5 - c) / support).abs()).max(0.0)).collect();
                    let sum: f64 = w.iter().sum();
                    (lo, w.into_iter().map(|v| v / sum).collect())
                })
                .collect()
        };
        let (x0, y0, cw, ch) = crop;
        let (xs, ys) = (axis(cw), axis(ch));
        let at = |x: usize, y: usize, c: usize| src[3 * ((y0 as usize + y) * width as usize + x0 as usize + x) + c] as f64;
        let mut out = Vec::with_capacity(3 * (size * size) as usize);
        for (ylo, wy) in &ys {
            for (xlo, wx) in &xs {
                for c in 0..3 {
                    let mut v = 0.0;
                    for (j, vy) in wy.iter().enumerate() {
                        for (i, vx) in wx.iter().enumerate() {
                            v += vy * vx * at(xlo + i, ylo + j, c);
                        }
                    }
                    out.push(v);
                }
            }
        }
        out
    }

    #[test]
    fn resize_is_the_antialiased_triangle_filter_of_the_crop() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut r = Resizer::new();
        for (w, h, crop, size) in cases(&mut rng) {
            let src = noise(&mut rng, w, h);
            let got = r.resize_crop(&src, w, h, crop, size);
            let want = triangle_reference(&src, w, crop, size);
            let mut sum_err = 0.0;
            for (k, (&g, &f)) in got.iter().zip(&want).enumerate() {
                // The resizer rounds to u8 between its two passes and at the end, with 16-bit
                // weights: at most one step from the exact value rounded.
                let d = (g as f64 - f.round()).abs();
                assert!(
                    d <= 1.0,
                    "{w}x{h} crop {crop:?} to {size}: value {k} is {g}, the filter gives {f:.3}"
                );
                sum_err += (g as f64 - f).abs();
            }
            let mean_err = sum_err / want.len() as f64;
            assert!(mean_err < 0.5, "{w}x{h} crop {crop:?} to {size}: mean error {mean_err:.3}");
        }
    }

    #[test]
    fn train_draw_is_the_crop_box_then_the_flip() {
        for seed in 0..50 {
            let mut a = ChaCha8Rng::seed_from_u64(seed);
            let mut b = ChaCha8Rng::seed_from_u64(seed);
            let d = train_draw(&mut a, 500, 375);
            assert_eq!(d.crop, crop_box(&mut b, 500, 375));
            assert_eq!(d.flip, b.random_bool(0.5));
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn crop_boxes_fit_and_respect_scale_and_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (w, h) in [(224u32, 224u32), (500, 333), (40, 300), (1, 1), (3, 100)] {
            for _ in 0..200 {
                let (x, y, cw, ch) = crop_box(&mut rng, w, h);
                assert!(cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h, "{w}x{h}: {x},{y} {cw}x{ch}");
                if w >= 100 && h >= 100 {
                    let frac = (cw * ch) as f64 / (w * h) as f64;
                    assert!(frac > 0.48 && frac <= 1.0, "area {frac}");
                    let r = cw as f64 / ch as f64;
                    assert!(r > 0.7 && r < 1.4, "ratio {r}");
                }
            }
        }
    }

    #[test]
    fn train_transform_gives_the_size_and_flips_sometimes() {
        // A left-dark, right-bright ramp: a flipped output has its bright side on the left.
        let img = RgbImage::from_fn(64, 48, |x, _| image::Rgb([(x * 4) as u8; 3]));
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut flipped = 0;
        for _ in 0..40 {
            let o = train_transform(&mut rng, &img, 16);
            assert_eq!(o.dimensions(), (16, 16));
            if o.get_pixel(0, 8)[0] > o.get_pixel(15, 8)[0] {
                flipped += 1;
            }
        }
        assert!((5..=35).contains(&flipped), "{flipped} of 40 flipped");
        assert_eq!(test_transform(&img, 16).dimensions(), (16, 16));
    }
}
