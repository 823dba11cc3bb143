//! Loading a frozen ViT from a timm-format `.safetensors` file: the config is inferred from the
//! tensor shapes, f16/bf16 are widened to f32, and the position embeddings are resampled
//! (bicubic, as timm's `resample_abs_pos_embed`) when the wanted image size differs.

use std::path::Path;

use anyhow::{bail, Context};
use safetensors::tensor::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use super::backbone::{expected_tensors, Backbone};
use super::config::VitConfig;
use super::params::NamedTensor;

/// What loading found besides the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct TimmInfo {
    /// Image side the checkpoint was trained at (`sqrt(pos_embed tokens - 1) * patch`).
    pub native_image_size: usize,
    /// True when the position embeddings were resampled to another grid.
    pub resampled: bool,
    /// Tensors present but not used, with why (head, fc_norm, DINOv2 registers, ...).
    pub ignored: Vec<String>,
}

/// Attention heads by width for the standard ViT-S/B/L/H sizes.
pub fn default_heads(dim: usize) -> Option<usize> {
    match dim {
        384 => Some(6),
        768 => Some(12),
        1024 => Some(16),
        1280 => Some(16),
        _ => None,
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads `path` and builds the backbone. `heads` overrides [`default_heads`] (needed for
/// non-standard widths); `image_size` (default: the checkpoint's own) must be a multiple of
/// the patch size.
pub fn load_timm(path: &Path, heads: Option<usize>, image_size: Option<usize>) -> anyhow::Result<(Backbone, TimmInfo)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read backbone weights {}", path.display()))?;
    from_bytes(&bytes, heads, image_size).with_context(|| format!("backbone weights {}", path.display()))
}

/// [`load_timm`] on the file's bytes.
pub fn from_bytes(bytes: &[u8], heads: Option<usize>, image_size: Option<usize>) -> anyhow::Result<(Backbone, TimmInfo)> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("not a readable safetensors file ({e:?})"))?;
    let get = |name: &str| -> anyhow::Result<NamedTensor> {
        let v = st.tensor(name).map_err(|_| anyhow::anyhow!("tensor {name} is missing"))?;
        Ok(NamedTensor {
            name: name.into(),
            shape: v.shape().to_vec(),
            data: to_f32(name, v.dtype(), v.data())?,
        })
    };
    let shape = |name: &str| -> anyhow::Result<Vec<usize>> {
        Ok(st
            .tensor(name)
            .map_err(|_| anyhow::anyhow!("tensor {name} is missing"))?
            .shape()
            .to_vec())
    };

    // The config from the shapes.
    let cls = shape("cls_token")?;
    if cls.len() != 3 || cls[0] != 1 || cls[1] != 1 {
        bail!("tensor cls_token has shape {cls:?}, expected [1, 1, D]");
    }
    let dim = cls[2];
    let pw = shape("patch_embed.proj.weight")?;
    if pw.len() != 4 || pw[0] != dim || pw[2] != pw[3] {
        bail!("tensor patch_embed.proj.weight has shape {pw:?}, expected [{dim}, C, p, p]");
    }
    let (channels, patch) = (pw[1], pw[2]);
    let pe = shape("pos_embed")?;
    if pe.len() != 3 || pe[0] != 1 || pe[2] != dim || pe[1] < 2 {
        bail!("tensor pos_embed has shape {pe:?}, expected [1, 1 + N, {dim}]");
    }
    let grid = (pe[1] - 1).isqrt();
    if grid * grid != pe[1] - 1 {
        bail!(
            "tensor pos_embed has {} tokens: not 1 class token + a square patch grid \
             (position embeddings without the class token are not supported)",
            pe[1]
        );
    }
    let native = grid * patch;
    let mut depth = 0;
    while st.tensor(&format!("blocks.{depth}.norm1.weight")).is_ok() {
        depth += 1;
    }
    if depth == 0 {
        bail!("tensor blocks.0.norm1.weight is missing (no transformer blocks found)");
    }
    let fc1 = shape("blocks.0.mlp.fc1.weight")?;
    if fc1.len() != 2 || fc1[1] != dim {
        bail!("tensor blocks.0.mlp.fc1.weight has shape {fc1:?}, expected [mlp_dim, {dim}]");
    }
    let heads = match heads.or_else(|| default_heads(dim)) {
        Some(h) => h,
        None => bail!("width {dim} is not a standard ViT size (384, 768, 1024, 1280): give the number of heads (--heads)"),
    };
    let cfg = VitConfig {
        image_size: image_size.unwrap_or(native),
        patch,
        channels,
        dim,
        depth,
        heads,
        mlp_dim: fc1[0],
        layer_scale: st.tensor("blocks.0.ls1.gamma").is_ok(),
        final_norm: st.tensor("norm.weight").is_ok(),
    };
    cfg.validate()?;

    // Every tensor must be expected or knowingly ignored.
    let expected = expected_tensors(&cfg);
    let mut ignored = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for name in &names {
        if expected.iter().any(|(n, _)| n == name) {
            continue;
        }
        if name.starts_with("head.") || name.starts_with("fc_norm.") || name.starts_with("head_drop") {
            ignored.push(format!("{name} (classifier head, not used)"));
        } else if name == "register_tokens" || name == "mask_token" {
            ignored.push(format!(
                "{name} (DINOv2 extra token: unsupported, ignored; features differ from the original model)"
            ));
        } else {
            bail!(
                "unexpected tensor {name} (shape {:?}): not part of a timm ViT this loader understands",
                shape(name)?
            );
        }
    }

    let mut tensors = Vec::with_capacity(expected.len());
    let mut resampled = false;
    for (name, want) in &expected {
        let mut t = get(name)?;
        if name == "pos_embed" && cfg.image_size != native {
            let g_new = cfg.image_size / patch;
            t = NamedTensor {
                name: name.clone(),
                shape: want.clone(),
                data: resample_pos_embed(&t.data, dim, grid, g_new, true),
            };
            resampled = true;
        }
        if &t.shape != want {
            bail!("tensor {name} has shape {:?}, expected {want:?}", t.shape);
        }
        tensors.push(t);
    }
    let backbone = Backbone::from_tensors(&cfg, tensors)?;
    Ok((
        backbone,
        TimmInfo {
            native_image_size: native,
            resampled,
            ignored,
        },
    ))
}

/// Widens a stored tensor to f32 (little-endian, as safetensors stores).
fn to_f32(name: &str, dtype: Dtype, b: &[u8]) -> anyhow::Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        d => bail!("tensor {name} has dtype {d:?}; only F32, F16, BF16 and F64 are supported"),
    })
}

/// PyTorch's cubic convolution weights (A = -0.75) for fractional offset `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The 4 clamped source indices and weights of each output coordinate, as PyTorch's bicubic
/// `F.interpolate` without antialias (A = -0.75, align_corners=False).
fn taps_plain(g_old: usize, g_new: usize) -> Vec<(Vec<usize>, Vec<f64>)> {
    let scale = g_old as f64 / g_new as f64;
    (0..g_new)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let f = src.floor();
            let w = cubic_weights(src - f);
            let idx = [-1i64, 0, 1, 2].map(|k| (f as i64 + k).clamp(0, g_old as i64 - 1) as usize);
            (idx.to_vec(), w.to_vec())
        })
        .collect()
}

/// The same with `antialias=True` (PyTorch's separable AA path, PIL's bicubic with a = -0.5:
/// the filter is widened by the scale when downsampling, taps outside the grid are dropped and
/// the rest renormalized). This is timm's default in `resample_abs_pos_embed`.
fn taps_antialias(g_old: usize, g_new: usize) -> Vec<(Vec<usize>, Vec<f64>)> {
    fn filter(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    let scale = g_old as f64 / g_new as f64;
    let (support, invscale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    (0..g_new)
        .map(|o| {
            let center = scale * (o as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(g_old as i64) as usize;
            let idx: Vec<usize> = (xmin..xmax).collect();
            let mut w: Vec<f64> = idx.iter().map(|&j| filter((j as f64 - center + 0.5) * invscale)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (idx, w)
        })
        .collect()
}

/// Resamples `[1, 1 + g_old^2, D]` position embeddings to `[1, 1 + g_new^2, D]`: the class
/// token's row is kept, the patch grid is interpolated bicubically (align_corners=False),
/// matching `F.interpolate(mode="bicubic", antialias=antialias)`. timm's
/// `resample_abs_pos_embed` (and so its checkpoint loading) uses `antialias=True`.
pub fn resample_pos_embed(pe: &[f32], d: usize, g_old: usize, g_new: usize, antialias: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity((1 + g_new * g_new) * d);
    out.extend_from_slice(&pe[..d]);
    let grid = &pe[d..];
    let taps = if antialias {
        taps_antialias(g_old, g_new)
    } else {
        taps_plain(g_old, g_new)
    };
    let mut acc = vec![0f64; d];
    for (yi, yw) in &taps {
        for (xi, xw) in &taps {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (&y, &wy) in yi.iter().zip(yw) {
                for (&x, &wx) in xi.iter().zip(xw) {
                    let w = wy * wx;
                    let row = &grid[(y * g_old + x) * d..(y * g_old + x + 1) * d];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += w * v as f64;
                    }
                }
            }
            out.extend(acc.iter().map(|&a| a as f32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_to_the_same_grid_is_the_identity() {
        let (d, g) = (3, 4);
        let pe: Vec<f32> = (0..(1 + g * g) * d).map(|i| (i as f32 * 0.37).sin()).collect();
        for aa in [false, true] {
            let r = resample_pos_embed(&pe, d, g, g, aa);
            for (a, b) in pe.iter().zip(&r) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn resampling_matches_torch_bicubic() {
        // Golden from PyTorch 2 (f64): g = sin(arange(18)).reshape(1, 2, 3, 3);
        // F.interpolate(g, size=(5, 5), mode="bicubic", align_corners=False, antialias=False)[0, :, 1, :].
        let want = [
            [
                0.08171968532104525,
                0.10385349997973821,
                0.11954805975303258,
                0.07589017472740735,
                0.036912953630175736,
            ],
            [
                -0.03398705393278042,
                -0.07379313738195598,
                -0.11893504412415463,
                -0.10502885208818066,
                -0.08403726346205265,
            ],
        ];
        let (d, g) = (2, 3);
        // Our layout is [1 + g*g, D] with the class row first; torch's is [D, g, g].
        let mut pe = vec![0f32; (1 + g * g) * d];
        for c in 0..d {
            for i in 0..g * g {
                pe[d + i * d + c] = ((c * g * g + i) as f64).sin() as f32;
            }
        }
        let r = resample_pos_embed(&pe, d, g, 5, false);
        for (c, row) in want.iter().enumerate() {
            for (x, &w) in row.iter().enumerate() {
                let got = r[d + (5 + x) * d + c] as f64;
                assert!((got - w).abs() < 1e-6, "channel {c}, x {x}: {got} vs {w}");
            }
        }
    }

    #[test]
    fn resampling_keeps_constants_and_linear_ramps_inside() {
        // Cubic weights sum to 1, so a constant grid stays constant; the class row is kept.
        let (d, g) = (2, 3);
        let mut pe = vec![7.0f32; (1 + g * g) * d];
        pe[0] = -1.0;
        for (aa, g_new) in [(false, 5), (true, 5), (true, 2)] {
            let r = resample_pos_embed(&pe, d, g, g_new, aa);
            assert_eq!(r.len(), (1 + g_new * g_new) * d);
            assert_eq!(r[0], -1.0);
            assert!(r[d..].iter().all(|&v| (v - 7.0).abs() < 1e-5));
        }
        // Upsampling 2x: output index 1 sits at source 0.25 (weights of t = 0.25).
        let w = cubic_weights(0.25);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
    }
}
