//! CPU twin of `kernels/augment.cu`: what `CpuBackend::augment` runs, and the reference the
//! launcher is tested against.

use super::{taps, AugmentShape, Crop};
use crate::ops::par::*;
use crate::ops::real::{cast, Real};

/// Crops of `pixels` (the table `crops`, see [`Crop`]) resized to `size x size`, mirrored where
/// `flip` is 1, normalized, into `out` in `shape.layout` (see the module docs for the filter).
/// Weights and sums in f32, as the kernel's; panics if [`AugmentShape::check`] fails.
pub fn augment<T: Real>(pixels: &[u8], crops: &[Crop], out: &mut [T], shape: &AugmentShape) {
    if let Err(e) = shape.check(crops, pixels.len()) {
        panic!("augment: {e}");
    }
    let s = shape.size;
    let per = 3 * s * s;
    assert!(
        out.len() >= shape.batch * per,
        "augment: out holds {} values, needs {}",
        out.len(),
        shape.batch * per
    );
    let (scale, bias) = shape.scale_bias();
    // Each image into its own slice of `out` (both layouts keep an image's values together).
    out[..shape.batch * per].par_chunks_mut(per).enumerate().for_each(|(b, ob)| {
        let c = crops[b];
        let (w, h) = (c.width as usize, c.height as usize);
        let px = &pixels[c.offset as usize..c.offset as usize + 3 * w * h];
        // The x taps of every output column (after the flip), computed once per image.
        let mut wx = Vec::new();
        let cols: Vec<(usize, Vec<f32>)> = (0..s)
            .map(|ox| {
                let sx = if c.flip == 1 { s - 1 - ox } else { ox };
                let lo = taps(sx, w, s, &mut wx);
                (lo, wx.clone())
            })
            .collect();
        let mut wy = Vec::new();
        for oy in 0..s {
            let y0 = taps(oy, h, s, &mut wy);
            for (ox, (x0, wx)) in cols.iter().enumerate() {
                let mut acc = [0f32; 3];
                for (j, &vy) in wy.iter().enumerate() {
                    let row = &px[3 * ((y0 + j) * w + x0)..];
                    let mut r = [0f32; 3];
                    for (i, &vx) in wx.iter().enumerate() {
                        for ch in 0..3 {
                            r[ch] += vx * row[3 * i + ch] as f32;
                        }
                    }
                    for ch in 0..3 {
                        acc[ch] += vy * r[ch];
                    }
                }
                for ch in 0..3 {
                    let i = shape.out_index(0, ch, oy, ox);
                    ob[i] = cast((acc[ch] * scale[ch] + bias[ch]) as f64);
                }
            }
        }
    });
}
