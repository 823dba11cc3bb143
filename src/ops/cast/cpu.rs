//! CPU reference of the casts: `half`'s conversions (round to nearest even, NaN stays NaN).

use half::bf16;
use half::slice::HalfFloatSliceExt;

/// `y[i] = bf16(x[i])`. Panics if the lengths differ (a caller bug).
pub fn f32_to_bf16(x: &[f32], y: &mut [bf16]) {
    y.convert_from_f32_slice(x);
}

/// `y[i] = f32(x[i])` (exact). Panics if the lengths differ (a caller bug).
pub fn bf16_to_f32(x: &[bf16], y: &mut [f32]) {
    x.convert_to_f32_slice(y);
}
