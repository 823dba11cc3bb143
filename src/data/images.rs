//! Image files to normalized tensors: decode (JPEG, PNG; grey, 16-bit and CMYK become RGB8),
//! resize, normalize, in parallel. Unreadable files are reported, never fatal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Per-channel normalization constants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
    #[default]
    Imagenet,
    /// OpenAI CLIP: mean (0.4815, 0.4578, 0.4082), std (0.2686, 0.2613, 0.2758).
    Clip,
    /// mean 0.5, std 0.5 (Inception, many timm ViTs such as augreg).
    Inception,
}

impl Norm {
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Norm::Imagenet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            // OpenAI CLIP's published constants, as written there.
            #[allow(clippy::excessive_precision)]
            Norm::Clip => (
                [0.481_454_66, 0.457_827_5, 0.408_210_73],
                [0.268_629_54, 0.261_302_58, 0.275_777_11],
            ),
            Norm::Inception => ([0.5; 3], [0.5; 3]),
        }
    }
}

/// An image that could not be used, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Decodes `path` (format guessed from the content) to RGB8 at its own size. Grey,
/// grey+alpha, RGBA and 16-bit images are converted (alpha dropped, 16 bits scaled); the JPEG
/// decoder turns CMYK into RGB itself.
pub fn load_rgb_full(path: &Path) -> Result<image::RgbImage, String> {
    let reader = image::ImageReader::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let reader = reader.with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
    let img = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    Ok(img.to_rgb8())
}

/// [`load_rgb_full`] resized to `size x size` (the antialiased bilinear filter of
/// [`super::augment`]; the aspect ratio is not kept, as the paper's test transform
/// `Resize((S, S))`).
pub fn load_rgb(path: &Path, size: u32) -> Result<image::RgbImage, String> {
    Ok(super::augment::test_transform(&load_rgb_full(path)?, size))
}

/// [`Norm`] as lookup tables: value `v` of channel `c` normalizes to `lut[c][v]`, computed as
/// `(v / 255 - mean) / std` in f32.
#[derive(Clone, Debug)]
pub struct NormTable {
    lut: [[f32; 256]; 3],
}

impl NormTable {
    pub fn new(norm: Norm) -> Self {
        let (mean, std) = norm.mean_std();
        let mut lut = [[0f32; 256]; 3];
        for (c, t) in lut.iter_mut().enumerate() {
            for (v, o) in t.iter_mut().enumerate() {
                *o = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Self { lut }
    }

    /// The normalized value of `v` in channel `c`.
    pub fn get(&self, c: usize, v: u8) -> f32 {
        self.lut[c][v as usize]
    }
}

/// Writes `width x height` RGB8 pixels (rows packed) as normalized CHW f32 into `out`
/// (`3 * width * height` values), mirrored left-right if `flip`, in one pass.
pub fn normalize_rgb_into(px: &[u8], width: usize, height: usize, flip: bool, table: &NormTable, out: &mut [f32]) {
    let plane = width * height;
    assert!(px.len() >= 3 * plane, "normalize: {} bytes for {width}x{height} RGB8", px.len());
    assert!(out.len() >= 3 * plane, "normalize: {} values for 3x{width}x{height}", out.len());
    if plane == 0 {
        return;
    }
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let [lr, lg, lb] = &table.lut;
    let rows = px[..3 * plane].chunks_exact(3 * width);
    let planes = r
        .chunks_exact_mut(width)
        .zip(g.chunks_exact_mut(width))
        .zip(b.chunks_exact_mut(width));
    for (row, ((r, g), b)) in rows.zip(planes) {
        let outs = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
        let put = |p: &[u8], ((r, g), b): ((&mut f32, &mut f32), &mut f32)| {
            *r = lr[p[0] as usize];
            *g = lg[p[1] as usize];
            *b = lb[p[2] as usize];
        };
        if flip {
            row.chunks_exact(3).rev().zip(outs).for_each(|(p, o)| put(p, o));
        } else {
            row.chunks_exact(3).zip(outs).for_each(|(p, o)| put(p, o));
        }
    }
}

/// Writes an RGB8 image as normalized CHW f32 into `out` (`3 * w * h` values).
pub fn normalize_into(img: &image::RgbImage, norm: Norm, out: &mut [f32]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    normalize_rgb_into(img.as_raw(), w, h, false, &NormTable::new(norm), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_writes_chw_mirrored_when_asked() {
        // 5x3, every byte different, so a swapped channel, row or column shows.
        let (w, h) = (5usize, 3usize);
        let px: Vec<u8> = (0..3 * w * h).map(|i| (i * 17 % 256) as u8).collect();
        for norm in [Norm::Imagenet, Norm::Clip, Norm::Inception] {
            let (mean, std) = norm.mean_std();
            let table = NormTable::new(norm);
            for flip in [false, true] {
                let mut out = vec![f32::NAN; 3 * w * h];
                normalize_rgb_into(&px, w, h, flip, &table, &mut out);
                for c in 0..3 {
                    for y in 0..h {
                        for x in 0..w {
                            let sx = if flip { w - 1 - x } else { x };
                            let v = px[3 * (y * w + sx) + c];
                            let want = (v as f32 / 255.0 - mean[c]) / std[c];
                            assert_eq!(out[(c * h + y) * w + x], want, "{norm:?} flip {flip} c{c} y{y} x{x}");
                        }
                    }
                }
            }
        }
        let img = image::RgbImage::from_raw(w as u32, h as u32, px.clone()).unwrap();
        let (mut a, mut b) = (vec![0f32; 3 * w * h], vec![0f32; 3 * w * h]);
        normalize_into(&img, Norm::Clip, &mut a);
        normalize_rgb_into(&px, w, h, false, &NormTable::new(Norm::Clip), &mut b);
        assert_eq!(a, b);
    }
}
