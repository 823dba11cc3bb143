//! Tensor-core fragments: `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` and
//! `ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16`.
//!
//! Layouts (g = lane >> 2, t = lane & 3; in a 32-bit register the low half holds the lower
//! index), from the PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"
//! and "Warp-level matrix load instruction: ldmatrix", and checked against a second source,
//! CUTLASS's `cute/atom/mma_traits_sm80.hpp` (`MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>`:
//! ALayout `SM80_16x8_Row` = ((4,8),(2,2,2)):((32,1),(16,8,128)), BLayout ((4,8),(2,2)):
//! ((16,1),(8,64)), CLayout `SM80_16x8_Row`) and `cute/atom/copy_traits_sm75.hpp`
//! (`SM75_U32x4_LDSM_N`, `SM75_U16x8_LDSM_T`), which agree:
//! - A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9],
//!   a3 = A[g+8][2t+8..2t+9].
//! - B (16x8, col): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g].
//! - C, D (16x8): c0, c1 = C[g][2t, 2t+1]; c2, c3 = C[g+8][2t, 2t+1].
//! - ldmatrix: lane 8i + r gives the address of row r of matrix i; register i of a lane gets
//!   row g, elements 2t and 2t+1 of matrix i (with .trans: element g of rows 2t and 2t+1).

fn bf(h: u32) -> f64 {
    f32::from_bits((h & 0xFFFF) << 16) as f64
}

/// D = A B + C for one warp, from each lane's fragment registers. Products of bf16 values
/// are exact in f64 and the sum is rounded once to f32: the exact result, where tensor cores
/// truncate partial sums (about 2^-23 relative; tests' bounds allow for both).
pub fn mma_bf16(a: &[[u32; 4]; 32], b: &[[u32; 2]; 32], c: &[[u32; 4]; 32]) -> [[u32; 4]; 32] {
    let mut am = [[0f64; 16]; 16];
    let mut bm = [[0f64; 8]; 16];
    let mut cm = [[0f64; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l >> 2, l & 3);
        let put_a = |am: &mut [[f64; 16]; 16], r: usize, k: usize, v: u32| {
            am[r][k] = bf(v);
            am[r][k + 1] = bf(v >> 16);
        };
        put_a(&mut am, g, 2 * t, a[l][0]);
        put_a(&mut am, g + 8, 2 * t, a[l][1]);
        put_a(&mut am, g, 2 * t + 8, a[l][2]);
        put_a(&mut am, g + 8, 2 * t + 8, a[l][3]);
        bm[2 * t][g] = bf(b[l][0]);
        bm[2 * t + 1][g] = bf(b[l][0] >> 16);
        bm[2 * t + 8][g] = bf(b[l][1]);
        bm[2 * t + 9][g] = bf(b[l][1] >> 16);
        cm[g][2 * t] = f32::from_bits(c[l][0]) as f64;
        cm[g][2 * t + 1] = f32::from_bits(c[l][1]) as f64;
        cm[g + 8][2 * t] = f32::from_bits(c[l][2]) as f64;
        cm[g + 8][2 * t + 1] = f32::from_bits(c[l][3]) as f64;
    }
    let mut dm = [[0f32; 8]; 16];
    for i in 0..16 {
        for j in 0..8 {
            let mut s = cm[i][j];
            for k in 0..16 {
                s += am[i][k] * bm[k][j];
            }
            dm[i][j] = s as f32;
        }
    }
    let mut d = [[0u32; 4]; 32];
    for (l, dl) in d.iter_mut().enumerate() {
        let (g, t) = (l >> 2, l & 3);
        *dl = [
            dm[g][2 * t].to_bits(),
            dm[g][2 * t + 1].to_bits(),
            dm[g + 8][2 * t].to_bits(),
            dm[g + 8][2 * t + 1].to_bits(),
        ];
    }
    d
}

/// The registers each lane gets from `num` 8x8 b16 matrices whose rows are `rows[8 i + r]`.
pub fn ldmatrix(rows: &[[u16; 8]; 32], num: u32, trans: bool) -> [[u32; 4]; 32] {
    let mut d = [[0u32; 4]; 32];
    for (l, dl) in d.iter_mut().enumerate() {
        let (g, t) = (l >> 2, l & 3);
        for i in 0..num as usize {
            let m = &rows[8 * i..8 * i + 8];
            let (lo, hi) = if trans {
                (m[2 * t][g], m[2 * t + 1][g])
            } else {
                (m[g][2 * t], m[g][2 * t + 1])
            };
            dl[i] = lo as u32 | (hi as u32) << 16;
        }
    }
    d
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    fn bf16(x: f32) -> u16 {
        (x.to_bits() >> 16) as u16
    }

    #[test]
    fn mma_matches_a_plain_product_through_the_fragments() {
        // Small integers are exact in bf16.
        let a = |i: usize, k: usize| ((i * 3 + k * 5) % 7) as f32 - 3.0;
        let b = |k: usize, j: usize| ((k * 2 + j * 7) % 5) as f32 - 2.0;
        let (mut fa, mut fb, mut fc) = ([[0u32; 4]; 32], [[0u32; 2]; 32], [[0u32; 4]; 32]);
        let pack = |lo: f32, hi: f32| bf16(lo) as u32 | (bf16(hi) as u32) << 16;
        for l in 0..32 {
            let (g, t) = (l >> 2, l & 3);
            fa[l] = [
                pack(a(g, 2 * t), a(g, 2 * t + 1)),
                pack(a(g + 8, 2 * t), a(g + 8, 2 * t + 1)),
                pack(a(g, 2 * t + 8), a(g, 2 * t + 9)),
                pack(a(g + 8, 2 * t + 8), a(g + 8, 2 * t + 9)),
            ];
            fb[l] = [pack(b(2 * t, g), b(2 * t + 1, g)), pack(b(2 * t + 8, g), b(2 * t + 9, g))];
            fc[l] = [1.0f32.to_bits(); 4];
        }
        let d = mma_bf16(&fa, &fb, &fc);
        for l in 0..32 {
            let (g, t) = (l >> 2, l & 3);
            for (r, (i, j)) in [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]
                .into_iter()
                .enumerate()
            {
                let want: f32 = 1.0 + (0..16).map(|k| a(i, k) * b(k, j)).sum::<f32>();
                assert_eq!(f32::from_bits(d[l][r]), want, "D[{i}][{j}]");
            }
        }
    }

    #[test]
    fn ldmatrix_trans_is_the_transpose() {
        let mut rows = [[0u16; 8]; 32];
        for (r, row) in rows.iter_mut().enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = (r * 8 + c) as u16;
            }
        }
        let n = ldmatrix(&rows, 4, false);
        let t = ldmatrix(&rows, 4, true);
        for l in 0..32 {
            let (g, tt) = (l >> 2, l & 3);
            for i in 0..4 {
                assert_eq!(n[l][i] & 0xFFFF, (i * 64 + g * 8 + 2 * tt) as u32);
                assert_eq!(t[l][i] & 0xFFFF, (i * 64 + 2 * tt * 8 + g) as u32);
                assert_eq!(t[l][i] >> 16, (i * 64 + (2 * tt + 1) * 8 + g) as u32);
            }
        }
    }
}
