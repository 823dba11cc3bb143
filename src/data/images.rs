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

/// [`load_rgb_full`] resized to `size x size` (bilinear; the aspect ratio is not kept, as the
/// paper's test transform `Resize((S, S))`).
pub fn load_rgb(path: &Path, size: u32) -> Result<image::RgbImage, String> {
    Ok(super::augment::test_transform(&load_rgb_full(path)?, size))
}

/// Writes an RGB8 image as normalized CHW f32 into `out` (`3 * w * h` values).
pub fn normalize_into(img: &image::RgbImage, norm: Norm, out: &mut [f32]) {
    let (mean, std) = norm.mean_std();
    let plane = (img.width() * img.height()) as usize;
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
}
