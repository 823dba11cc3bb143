//! A PNG of the affinity matrices ordered by group (the paper's Fig. 1 idea): one heatmap per
//! graph, rows and columns sorted by group, group boundaries drawn, class names on the axes.
//! Text uses the `font8x8` bitmap glyphs, so no system fonts are needed.

use std::path::Path;

use font8x8::{UnicodeFonts, BASIC_FONTS};
use image::{Rgb, RgbImage};
use nalgebra::DMatrix;

use super::Partition;

/// One heatmap: a graph's affinity matrix and the partition to order it by.
pub struct Panel<'a> {
    pub title: String,
    pub affinity: &'a DMatrix<f64>,
    pub partition: &'a Partition,
}

const BG: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const BOUNDARY: Rgb<u8> = Rgb([255, 40, 40]);
/// Longest class name drawn in full; longer names are cut (with a trailing '.').
const MAX_NAME: usize = 20;

/// Viridis, sampled at 9 points and interpolated linearly; `v` in [0, 1].
fn viridis(v: f64) -> Rgb<u8> {
    const STOPS: [[f64; 3]; 9] = [
        [68.0, 1.0, 84.0],
        [71.0, 44.0, 122.0],
        [59.0, 81.0, 139.0],
        [44.0, 113.0, 142.0],
        [33.0, 144.0, 141.0],
        [39.0, 173.0, 129.0],
        [92.0, 200.0, 99.0],
        [170.0, 220.0, 50.0],
        [253.0, 231.0, 37.0],
    ];
    let x = v.clamp(0.0, 1.0) * 8.0;
    let i = (x.floor() as usize).min(7);
    let f = x - i as f64;
    let c = |k: usize| (STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f).round() as u8;
    Rgb([c(0), c(1), c(2)])
}

/// Distinct colours for the group strips along the axes.
fn group_colour(g: usize) -> Rgb<u8> {
    const C: [[u8; 3]; 10] = [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ];
    Rgb(C[g % C.len()])
}

fn fill(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, c: Rgb<u8>) {
    for yy in y..(y + h).min(img.height()) {
        for xx in x..(x + w).min(img.width()) {
            img.put_pixel(xx, yy, c);
        }
    }
}

fn short(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= MAX_NAME {
        name.to_string()
    } else {
        chars[..MAX_NAME - 1].iter().collect::<String>() + "."
    }
}

/// Draws `text` at (x, y) with glyphs `scale` pixels per font pixel; `vertical` runs the text
/// downwards, rotated a quarter turn clockwise (for column names).
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, scale: u32, vertical: bool, colour: Rgb<u8>) {
    for (n, ch) in s.chars().enumerate() {
        let glyph = BASIC_FONTS.get(ch).or_else(|| BASIC_FONTS.get('?')).unwrap_or([0; 8]);
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..8u32 {
                if bits & (1 << gx) == 0 {
                    continue;
                }
                let (px, py) = if vertical {
                    (x + (7 - gy as u32) * scale, y + (8 * n as u32 + gx) * scale)
                } else {
                    (x + (8 * n as u32 + gx) * scale, y + gy as u32 * scale)
                };
                fill(img, px, py, scale, scale, colour);
            }
        }
    }
}

/// Renders the panels side by side. Each matrix is coloured from its smallest to its largest
/// off-diagonal value (the range is printed under the title); the diagonal is drawn grey.
pub fn render(panels: &[Panel], classes: &[String]) -> RgbImage {
    let k = classes.len().max(1) as u32;
    let cell = (960 / k).clamp(1, 24);
    let names = cell >= 8;
    let name_px = if names {
        classes.iter().map(|c| short(c).chars().count()).max().unwrap_or(0) as u32 * 8 + 6
    } else {
        0
    };
    let strip = 6;
    let n = k * cell;
    let (title_h, bar_h) = (28, 22);
    let left = 10 + name_px + strip + 2;
    let top = title_h + bar_h + 6;
    // Wide enough for the heatmap, the title (16 px glyphs) and the colour bar.
    let title_w = panels.iter().map(|p| p.title.chars().count() as u32 * 16).max().unwrap_or(0);
    let panel_w = left + (n + 20).max(title_w + 20).max(300);
    let height = top + n + 2 + strip + name_px + 10;
    let mut img = RgbImage::from_pixel(panel_w * panels.len().max(1) as u32, height, BG);
    for (p, panel) in panels.iter().enumerate() {
        let x0 = p as u32 * panel_w;
        let order: Vec<usize> = panel.partition.groups.iter().flatten().copied().collect();
        let group_of = panel.partition.label_to_group(classes.len());
        let m = panel.affinity;
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                if i != j {
                    lo = lo.min(m[(i, j)]);
                    hi = hi.max(m[(i, j)]);
                }
            }
        }
        if !lo.is_finite() {
            lo = 0.0; // a single label: no off-diagonal entries
        }
        if !hi.is_finite() || hi <= lo {
            hi = lo + 1.0;
        }
        text(&mut img, x0 + left, 6, &panel.title, 2, false, INK);
        // Colour bar with its range.
        let bar_y = title_h;
        let lo_s = format!("{lo:.3}");
        text(&mut img, x0 + left, bar_y + 4, &lo_s, 1, false, INK);
        let bar_x = x0 + left + 8 * lo_s.len() as u32 + 6;
        for b in 0..200u32 {
            fill(&mut img, bar_x + b, bar_y + 2, 1, 12, viridis(b as f64 / 199.0));
        }
        text(&mut img, bar_x + 206, bar_y + 4, &format!("{hi:.3}"), 1, false, INK);
        // Heatmap.
        for (r, &i) in order.iter().enumerate() {
            for (c, &j) in order.iter().enumerate() {
                let colour = if i == j {
                    Rgb([200, 200, 200])
                } else {
                    viridis((m[(i, j)] - lo) / (hi - lo))
                };
                fill(&mut img, x0 + left + c as u32 * cell, top + r as u32 * cell, cell, cell, colour);
            }
        }
        // Group strips and names along both axes.
        for (r, &i) in order.iter().enumerate() {
            let g = group_of[i];
            let at = r as u32 * cell;
            fill(&mut img, x0 + left - strip - 2, top + at, strip, cell, group_colour(g));
            fill(&mut img, x0 + left + at, top + n + 2, cell, strip, group_colour(g));
            if names {
                let s = short(&classes[i]);
                let w = 8 * s.chars().count() as u32;
                let off = (cell - 8) / 2;
                text(&mut img, x0 + left - strip - 4 - w, top + at + off, &s, 1, false, INK);
                text(&mut img, x0 + left + at + off, top + n + strip + 4, &s, 1, true, INK);
            }
        }
        // Boundaries between groups.
        let mut edge = 0u32;
        for members in &panel.partition.groups[..panel.partition.groups.len().saturating_sub(1)] {
            edge += members.len() as u32 * cell;
            fill(&mut img, x0 + left + edge.saturating_sub(1), top, 1, n, BOUNDARY);
            fill(&mut img, x0 + left, top + edge.saturating_sub(1), n, 1, BOUNDARY);
        }
    }
    img
}

/// Renders the panels and writes them as a PNG file.
pub fn write_png(path: &Path, panels: &[Panel], classes: &[String]) -> Result<(), String> {
    render(panels, classes)
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| format!("{}: cannot write the plot: {e}", path.display()))
}
