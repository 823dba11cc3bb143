//! The contract between the host launchers (`src/ops/<op>/cuda.rs`) and the kernels
//! (`kernels/*.cu`), written once: every constant, tile table, shared-memory size and kernel
//! parameter struct both sides use.
//!
//! build.rs `include!`s this file and writes `contract.cuh` into `OUT_DIR` (nvcc gets it on
//! its include path; `kernels/common.cuh` includes it): each constant as a `constexpr`, the tile
//! tables as X-macros the kernel files instantiate, and each parameter struct as a C struct with
//! a `static_assert` on its size and on every field's offset, taken from this file's
//! `#[repr(C)]` layout. A change here changes both sides; a C struct that drifts from this file
//! fails to compile. So this file has no dependencies (build.rs compiles it too) and holds data,
//! not launch logic.

// build.rs compiles this file too (and allows its unused parts there).

/// Declares integer constants shared with the kernels: each is a Rust `pub const` here and a
/// `constexpr` of the same name in `contract.cuh`; `$table` lists them for build.rs.
macro_rules! shared_consts {
    ($table:ident; $($(#[$m:meta])* $name:ident: $ty:ty = $val:expr;)*) => {
        $($(#[$m])* pub const $name: $ty = $val;)*
        /// (name, value) of each constant of this module, written into `contract.cuh` by build.rs.
        #[doc(hidden)]
        pub const $table: &[(&str, i64)] = &[$((stringify!($name), $val as i64)),*];
    };
}

/// Declares a kernel parameter struct: a `#[repr(C)]` Rust struct, passed by value to its
/// kernels, and the same struct in `contract.cuh`. Each field names its C declaration, with
/// `{}` where the field's name goes (`"const float* {}[4]"`). Pointer fields are device
/// addresses (`u64`, 0 for null).
macro_rules! kernel_params {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $ty:ty => $cty:literal,)* }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name {
            $($(#[$fm])* pub $f: $ty,)*
        }
        /// Every pointer null, every number zero.
        impl Default for $name {
            fn default() -> Self {
                Self { $($f: <$ty as $crate::contract::Zero>::ZERO,)* }
            }
        }
        impl $name {
            /// (field, C declaration, byte offset) of each field, for build.rs.
            #[doc(hidden)]
            pub fn c_fields() -> $crate::contract::CFields {
                vec![$((stringify!($f), $cty, core::mem::offset_of!($name, $f))),*]
            }
        }
    };
}

/// The zero of a parameter field's type (arrays of any length included, which `Default` lacks).
pub(crate) trait Zero {
    const ZERO: Self;
}
impl Zero for u64 {
    const ZERO: Self = 0;
}
impl Zero for i64 {
    const ZERO: Self = 0;
}
impl Zero for u32 {
    const ZERO: Self = 0;
}
impl Zero for i32 {
    const ZERO: Self = 0;
}
impl Zero for f32 {
    const ZERO: Self = 0.0;
}
impl<T: Zero + Copy, const N: usize> Zero for [T; N] {
    const ZERO: Self = [T::ZERO; N];
}

/// LayerNorm (`kernels/layernorm.cu`).
///
/// ```
/// use mlvpt::contract::layernorm;
/// assert_eq!(layernorm::LN_MAX_D, 1024); // 32 lanes x 8 columns x 4 chunks
/// ```
pub mod layernorm {
    shared_consts! { CONSTS;
        /// Longest row the kernels hold in registers (a warp per row, 8 columns a lane, up to
        /// 4 chunks).
        ///
        /// ```
        /// use mlvpt::contract::layernorm::LN_MAX_D;
        /// assert_eq!(LN_MAX_D, 32 * 8 * 4);
        /// ```
        LN_MAX_D: usize = 1024;
    }
}

/// The ML-VPT head (`kernels/head.cu`, `kernels/moe_mma.cu`, `kernels/adapter_mma.cu`).
///
/// ```
/// use mlvpt::contract::head;
/// // A block of the column kernels has at most 128 threads of 8 columns.
/// assert_eq!(head::HEAD_MAX_D, 128 * 8);
/// assert_eq!(head::ROWS_COLS, 32 * 8);
/// ```
pub mod head {
    shared_consts! { CONSTS;
        /// Widest feature dimension (a thread owns 8 columns, a block at most 128 threads).
        ///
        /// ```
        /// use mlvpt::contract::head::HEAD_MAX_D;
        /// assert_eq!(HEAD_MAX_D, 1024); // ViT-L's width fits
        /// ```
        HEAD_MAX_D: usize = 1024;
        /// Most experts per label.
        ///
        /// ```
        /// use mlvpt::contract::head::HEAD_MAX_E;
        /// assert_eq!(HEAD_MAX_E, 8);
        /// ```
        HEAD_MAX_E: usize = 8;
        /// Largest adapter bottleneck.
        ///
        /// ```
        /// use mlvpt::contract::head::HEAD_MAX_RANK;
        /// assert_eq!(HEAD_MAX_RANK, 64);
        /// ```
        HEAD_MAX_RANK: usize = 64;
        /// Images per block of `moe_fwd_scores`.
        ///
        /// ```
        /// use mlvpt::contract::head::MOE_FWD_IMAGES;
        /// assert_eq!(227usize.div_ceil(MOE_FWD_IMAGES), 8); // blocks in y for a batch of 227
        /// ```
        MOE_FWD_IMAGES: usize = 32;
        /// Images per block of `moe_bwd_tokens` and `adapter_bwd_tokens`.
        ///
        /// ```
        /// use mlvpt::contract::head::TOK_IMAGES;
        /// assert_eq!(TOK_IMAGES, 8);
        /// ```
        TOK_IMAGES: usize = 8;
        /// Images per block of `adapter_fwd` and the tensor-core adapter kernels (one m16 tile).
        ///
        /// ```
        /// use mlvpt::contract::head::ADA_IMAGES;
        /// assert_eq!(ADA_IMAGES, 16); // the M of an m16n8k16 tile
        /// ```
        ADA_IMAGES: usize = 16;
        /// Warps per block of the batch-reducing kernels (`moe_bwd_pairs`, `adapter_bwd_params`):
        /// 32 lanes x 8 columns = 256 columns a block; the warps split the images.
        ///
        /// ```
        /// use mlvpt::contract::head::{ROWS_COLS, ROWS_WARPS};
        /// assert_eq!(ROWS_WARPS * 32, 256); // threads per block
        /// assert_eq!(768usize.div_ceil(ROWS_COLS), 3); // blocks over ViT-B's columns
        /// ```
        ROWS_WARPS: usize = 8;
        /// Pairs per block of `moe_bwd_pairs`.
        ///
        /// ```
        /// use mlvpt::contract::head::PAIR_TILE;
        /// assert_eq!((3 * 80usize).div_ceil(PAIR_TILE), 30); // pair tiles of E = 3, K = 80
        /// ```
        PAIR_TILE: usize = 8;
        /// Tile edge of the tensor-core MoE kernels (`moe_mma.cu`): 64 images, pairs or columns a
        /// block.
        ///
        /// ```
        /// use mlvpt::contract::head::MMA_TILE;
        /// assert_eq!(MMA_TILE % 16, 0); // whole m16 tiles
        /// ```
        MMA_TILE: usize = 64;
        /// Warps per block of the tensor-core head kernels.
        ///
        /// ```
        /// use mlvpt::contract::head::MMA_WARPS;
        /// assert_eq!(MMA_WARPS * 32, 128); // threads per block
        /// ```
        MMA_WARPS: usize = 4;
        /// Columns per block of `adapter_bwd_params_mma`.
        ///
        /// ```
        /// use mlvpt::contract::head::ADA_PARAM_COLS;
        /// assert_eq!(768usize.div_ceil(ADA_PARAM_COLS), 12); // blocks over ViT-B's columns
        /// ```
        ADA_PARAM_COLS: usize = 64;
    }
    /// Columns per block of the batch-reducing kernels: 32 lanes of 8 columns.
    ///
    /// ```
    /// use mlvpt::contract::head::{ROWS_COLS, ROWS_WARPS};
    /// assert_eq!(ROWS_COLS, 256);
    /// assert_eq!(ROWS_COLS, ROWS_WARPS * 32); // a lane per 8 columns, as many lanes as threads
    /// ```
    pub const ROWS_COLS: usize = 32 * 8;

    kernel_params! {
        /// The MoE kernels' arguments, the same struct for their fp32 (`head.cu`) and tensor-core
        /// (`moe_mma.cu`) versions: the scores kernels read `z`, `adapted`, `gate`, `w`, `grow`
        /// and `tok`'s inverse and write `q`, `r`; the token-gradient kernels read `dq`, `dr`,
        /// `gate`, `w`, `grow`, `tok`'s inverse and add into `dz`, `dadapted`; the pair-row
        /// kernels reduce `coef [B, E, K]` times `x [B, P, D]` over the batch into
        /// `pair_rows [E*K, D]`. Unused pointers are null.
        ///
        /// ```
        /// use mlvpt::contract::head::MoeParams;
        /// // A pair-row launch of B = 4 images, P = 3 tokens of D = 64, K = 5 labels, E = 2 experts.
        /// let sizes = MoeParams { batch: 4, tokens: 3, d: 64, labels: 5, experts: 2, ..Default::default() };
        /// let p = MoeParams { coef: 0x7f00_0000_0000, x: 0x7f00_0001_0000, pair_rows: 0x7f00_0002_0000, ..sizes };
        /// assert_eq!((p.z, p.q, p.dz), (0, 0, 0)); // the other kernels' pointers stay null
        /// ```
        pub struct MoeParams {
            /// Prompt-token features `[B, P, D]`.
            pub z: u64 => "const __nv_bfloat16* {}",
            /// Adapted features `[B, P, D]`.
            pub adapted: u64 => "const __nv_bfloat16* {}",
            /// Gate table `[rows, D]`.
            pub gate: u64 => "const float* {}",
            /// Classifier `[K, D]`.
            pub w: u64 => "const float* {}",
            /// Gate row of each (e, k), `[E*K]`.
            pub grow: u64 => "const uint32_t* {}",
            /// `tok`'s inverse: per token, the (e, k) pairs using it (CSR offsets `[P + 1]`, items `[E*K]`).
            pub tok_offsets: u64 => "const uint32_t* {}",
            pub tok_items: u64 => "const uint32_t* {}",
            /// Gate scores and classifier responses `[B, E, K]`.
            pub q: u64 => "float* {}",
            pub r: u64 => "float* {}",
            /// Their gradients `[B, E, K]`.
            pub dq: u64 => "const float* {}",
            pub dr: u64 => "const float* {}",
            /// Token gradients `[B, P, D]` (accumulated).
            pub dz: u64 => "__nv_bfloat16* {}",
            pub dadapted: u64 => "__nv_bfloat16* {}",
            /// The pair-row kernels' coefficient `[B, E, K]`, operand `[B, P, D]` and output `[E*K, D]`.
            pub coef: u64 => "const float* {}",
            pub x: u64 => "const __nv_bfloat16* {}",
            pub pair_rows: u64 => "float* {}",
            pub batch: u32 => "uint32_t {}",
            pub tokens: u32 => "uint32_t {}",
            pub d: u32 => "uint32_t {}",
            pub labels: u32 => "uint32_t {}",
            pub experts: u32 => "uint32_t {}",
        }
    }
}

/// AdamW (`kernels/adamw.cu`).
///
/// ```
/// use mlvpt::contract::adamw;
/// let p = adamw::AdamWParams::default();
/// assert_eq!(p.p.len(), adamw::ADAMW_MAX_TENSORS);
/// ```
pub mod adamw {
    shared_consts! { CONSTS;
        /// Most tensors one launch takes; more take several launches.
        ///
        /// ```
        /// use mlvpt::contract::adamw::ADAMW_MAX_TENSORS;
        /// assert_eq!(ADAMW_MAX_TENSORS, 32);
        /// assert_eq!(70usize.div_ceil(ADAMW_MAX_TENSORS), 3); // launches for 70 tensors
        /// ```
        ADAMW_MAX_TENSORS: usize = 32;
    }

    kernel_params! {
        /// `adamw_multi_f32`: up to [`ADAMW_MAX_TENSORS`] fp32 tensors, tensor `t` with its own
        /// parameter, gradient and moment pointers, elements numbered consecutively over the
        /// tensors (`start[t] .. start[t + 1]`), and the update's coefficients (computed on the
        /// host in f64).
        ///
        /// ```
        /// use mlvpt::contract::adamw::{AdamWParams, ADAMW_MAX_TENSORS};
        /// // Two tensors of 10 and 6 elements (device addresses as u64), lr 1e-3 at step 1.
        /// let (lr, wd, b1, b2) = (1e-3f64, 1e-2f64, 0.9f64, 0.999f64);
        /// let mut p = AdamWParams { count: 2, beta1: b1 as f32, beta2: b2 as f32, eps: 1e-8, ..Default::default() };
        /// p.start[..3].copy_from_slice(&[0, 10, 16]);
        /// p.start[3..].fill(16); // unused entries: empty tensors at the end
        /// (p.decay, p.step_size, p.inv_sqrt_bc2) = ((1.0 - lr * wd) as f32, (lr / (1.0 - b1)) as f32, (1.0 / (1.0 - b2).sqrt()) as f32);
        /// (p.one_minus_beta1, p.one_minus_beta2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
        /// assert_eq!(p.start[ADAMW_MAX_TENSORS], 16);
        /// assert_eq!(p.guard, 0); // no guard: never skipped
        /// ```
        pub struct AdamWParams {
            pub p: [u64; ADAMW_MAX_TENSORS] => "float* {}[ADAMW_MAX_TENSORS]",
            pub g: [u64; ADAMW_MAX_TENSORS] => "const float* {}[ADAMW_MAX_TENSORS]",
            pub m: [u64; ADAMW_MAX_TENSORS] => "float* {}[ADAMW_MAX_TENSORS]",
            pub v: [u64; ADAMW_MAX_TENSORS] => "float* {}[ADAMW_MAX_TENSORS]",
            /// `start[count]` = total elements.
            pub start: [u64; ADAMW_MAX_TENSORS + 1] => "uint64_t {}[ADAMW_MAX_TENSORS + 1]",
            /// The update is skipped unless `guard[0]` is finite (null: never skipped).
            pub guard: u64 => "const float* {}",
            pub count: u32 => "uint32_t {}",
            /// `1 - lr * wd`.
            pub decay: f32 => "float {}",
            /// `lr / (1 - beta1^t)`.
            pub step_size: f32 => "float {}",
            /// `1 / sqrt(1 - beta2^t)`.
            pub inv_sqrt_bc2: f32 => "float {}",
            pub beta1: f32 => "float {}",
            pub beta2: f32 => "float {}",
            pub eps: f32 => "float {}",
            /// `1 - beta` from the host in f64: in f32, `1 - 0.999f` is 1.3e-5 off.
            pub one_minus_beta1: f32 => "float {}",
            pub one_minus_beta2: f32 => "float {}",
        }
    }
}

/// The asymmetric loss (`kernels/asl.cu`).
///
/// ```
/// use mlvpt::contract::asl;
/// assert_eq!(asl::AslParams::default().logits.len(), asl::ASL_MAX_TERMS);
/// ```
pub mod asl {
    shared_consts! { CONSTS;
        /// Most logit buffers (loss terms) one launch takes.
        ///
        /// ```
        /// use mlvpt::contract::asl::ASL_MAX_TERMS;
        /// assert_eq!(ASL_MAX_TERMS, 4); // ASL(y+) + ASL(y-) + ASL(m+) + ASL(m-)
        /// ```
        ASL_MAX_TERMS: usize = 4;
    }

    kernel_params! {
        /// `asl_terms_fwd_bwd_f32`: ASL of up to [`ASL_MAX_TERMS`] logit buffers of `n`
        /// elements against the same targets, one gradient buffer each (null: none), the loss
        /// `scale * sum` written to `loss_out[0]`; `partials` (one f64 per block) and
        /// `counter` (zero between launches) are the deterministic reduction's scratch.
        ///
        /// ```
        /// use mlvpt::contract::asl::AslParams;
        /// // Two terms of 80 logits (addresses as u64; 0 is null), the default ASL.
        /// let p = AslParams {
        ///     n: 80,
        ///     nterms: 2,
        ///     gamma_neg: 2.0,
        ///     log_eps: 1e-5f64.ln() as f32,
        ///     scale: 1.0 / 80.0,
        ///     ..Default::default()
        /// };
        /// assert_eq!((p.grad, p.exact_grad), ([0; 4], 0)); // no gradients, constant focusing weights
        /// ```
        pub struct AslParams {
            pub logits: [u64; ASL_MAX_TERMS] => "const float* {}[ASL_MAX_TERMS]",
            pub grad: [u64; ASL_MAX_TERMS] => "float* {}[ASL_MAX_TERMS]",
            pub targets: u64 => "const float* {}",
            pub partials: u64 => "double* {}",
            pub counter: u64 => "unsigned int* {}",
            pub loss_out: u64 => "float* {}",
            pub n: u64 => "uint64_t {}",
            pub nterms: u32 => "uint32_t {}",
            pub gamma_pos: f32 => "float {}",
            pub gamma_neg: f32 => "float {}",
            pub clip: f32 => "float {}",
            /// `ln(eps)` of the probability clamp.
            pub log_eps: f32 => "float {}",
            /// 1: the exact gradient through the focusing weights; 0: constant weights.
            pub exact_grad: i32 => "int {}",
            pub scale: f32 => "float {}",
        }
    }
}

/// The token kernels (`kernels/tokens.cu`).
///
/// ```
/// use mlvpt::contract::tokens;
/// assert_eq!(tokens::CopyTokensParams::default().count, 0);
/// ```
pub mod tokens {
    kernel_params! {
        /// `tok_copy_tokens_{f32,bf16}`: `dst[b, dst_start + j] = src[b, src_start + j]` for
        /// `j < count` token rows of `d`, `src [B, src_tokens, d]`, `dst [B, dst_tokens, d]`
        /// (both of the kernel's storage type), `n = B * count * d` elements.
        ///
        /// ```
        /// use mlvpt::contract::tokens::CopyTokensParams;
        /// // The 10 prompt rows 50..60 of [B = 2, 60, 64] tokens into rows 0..10 of [2, 10, 64].
        /// let p = CopyTokensParams { n: 2 * 10 * 64, src_tokens: 60, src_start: 50, dst_tokens: 10, dst_start: 0, count: 10, d: 64, ..Default::default() };
        /// assert_eq!(p.n, 2 * p.count as u64 * p.d as u64);
        /// ```
        pub struct CopyTokensParams {
            pub src: u64 => "const void* {}",
            pub dst: u64 => "void* {}",
            pub n: u64 => "uint64_t {}",
            pub src_tokens: u32 => "uint32_t {}",
            pub src_start: u32 => "uint32_t {}",
            pub dst_tokens: u32 => "uint32_t {}",
            pub dst_start: u32 => "uint32_t {}",
            pub count: u32 => "uint32_t {}",
            pub d: u32 => "uint32_t {}",
        }
    }
}

/// Input augmentation on the device (`kernels/augment.cu`): uint8 crops resized, flipped and
/// normalized into the patch embedding's input.
///
/// ```
/// use mlvpt::contract::augment;
/// assert_eq!(std::mem::size_of::<augment::Crop>(), 16); // one uint4 per crop
/// assert_eq!(augment::AugmentParams::default().patch, 0);
/// ```
pub mod augment {
    kernel_params! {
        /// One crop of a staged batch: `width x height` RGB8 pixels, rows of `3 * width` bytes
        /// with no padding, starting at byte `offset` of the batch's pixel buffer; `flip` 1
        /// mirrors it left-right after the resize.
        ///
        /// ```
        /// use mlvpt::contract::augment::Crop;
        /// let c = Crop { offset: 0, width: 300, height: 200, flip: 1 };
        /// assert_eq!(c.offset as usize + 3 * (c.width * c.height) as usize, 180_000); // its bytes
        /// ```
        pub struct Crop {
            pub offset: u32 => "uint32_t {}",
            pub width: u32 => "uint32_t {}",
            pub height: u32 => "uint32_t {}",
            pub flip: u32 => "uint32_t {}",
        }
    }

    kernel_params! {
        /// `augment_{f32,bf16}`: crop `b` of `crops` (`batch` of them, pixels in `pixels`,
        /// `pixels_len` bytes) resized to `size x size` with the antialiased triangle filter,
        /// flipped if asked, and written as `v * scale[c] + bias[c]` (v in 0..=255) to `out`
        /// in the kernel's storage type: `[B, 3, S, S]` when `patch` is 0, else the patch rows
        /// `[B, (S/p)^2, 3 * p * p]` of `Backend::patchify`. A crop that does not fit in
        /// `pixels_len` (or is empty) writes NaN, so a bad table shows in the loss.
        ///
        /// ```
        /// use mlvpt::contract::augment::AugmentParams;
        /// // ImageNet normalization folded into one multiply-add per value.
        /// let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        /// let p = AugmentParams {
        ///     batch: 64, size: 224, patch: 16,
        ///     scale: std.map(|s| 1.0 / (255.0 * s)),
        ///     bias: [0, 1, 2].map(|c| -mean[c] / std[c]),
        ///     ..Default::default()
        /// };
        /// assert!((255.0 * p.scale[0] + p.bias[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        /// ```
        pub struct AugmentParams {
            pub crops: u64 => "const Crop* {}",
            pub pixels: u64 => "const uint8_t* {}",
            pub out: u64 => "void* {}",
            pub pixels_len: u64 => "uint64_t {}",
            pub batch: u32 => "uint32_t {}",
            pub size: u32 => "uint32_t {}",
            pub patch: u32 => "uint32_t {}",
            pub scale: [f32; 3] => "float {}[3]",
            pub bias: [f32; 3] => "float {}[3]",
        }
    }
}

/// Prompt-masked attention (`kernels/attention.cu`): the fused kernels and the plain fp32 ones.
///
/// ```
/// use mlvpt::contract::attention;
/// // Every head dim has a forward whose shared memory fits an H100's 227 KB.
/// for dh in attention::FUSED_HEAD_DIMS {
///     let t = attention::FWD_TILES.iter().find(|t| t.head_dim == *dh).unwrap();
///     assert!(t.smem_bytes() <= 227 * 1024, "{}", t.kernel);
/// }
/// ```
pub mod attention {
    shared_consts! { CONSTS;
        /// Warps per block of the forward and of the split backward's dQ pass.
        ///
        /// ```
        /// use mlvpt::contract::attention::{ATTN_THREADS, ATTN_WARPS};
        /// assert_eq!(ATTN_WARPS * 32, ATTN_THREADS);
        /// ```
        ATTN_WARPS: usize = 4;
        /// Keys per tile of the forward and the dQ pass (the backward has 16 per warp).
        ///
        /// ```
        /// use mlvpt::contract::attention::ATTN_KEY_TILE;
        /// assert_eq!(227usize.div_ceil(ATTN_KEY_TILE), 4); // key tiles of a ViT-B/16 row with 30 prompts
        /// ```
        ATTN_KEY_TILE: usize = 64;
        /// Padding (bf16 elements) of each shared-memory row, keeping `ldmatrix` free of bank
        /// conflicts.
        ///
        /// ```
        /// use mlvpt::contract::attention::{smem_row_bytes, ATTN_SMEM_PAD};
        /// assert_eq!(smem_row_bytes(64), (64 + ATTN_SMEM_PAD) * 2); // 16 bytes of padding a row
        /// ```
        ATTN_SMEM_PAD: usize = 8;
    }

    /// Threads per block of the forward and the dQ pass.
    ///
    /// ```
    /// use mlvpt::contract::attention::ATTN_THREADS;
    /// assert_eq!(ATTN_THREADS, 128);
    /// ```
    pub const ATTN_THREADS: usize = 32 * ATTN_WARPS;

    /// Bytes of a shared-memory row of the fused kernels: `head_dim` bf16 plus the padding.
    ///
    /// ```
    /// use mlvpt::contract::attention::smem_row_bytes;
    /// assert_eq!(smem_row_bytes(64), 144);
    /// assert_eq!(smem_row_bytes(64) % 16, 0); // rows stay 16-byte aligned for ldmatrix
    /// ```
    pub const fn smem_row_bytes(head_dim: usize) -> usize {
        (head_dim + ATTN_SMEM_PAD) * 2
    }

    /// One compiled tile shape of the fused forward: `rows` query rows per block of
    /// [`ATTN_WARPS`] warps (16 x MT per warp), keys in tiles of [`ATTN_KEY_TILE`];
    /// `pipelined`: the software-pipelined schedule (the next tile's Q K^T issued before this
    /// tile's softmax, K and V double-buffered); `min_blocks`: blocks per SM ptxas must fit
    /// (`__launch_bounds__`).
    ///
    /// ```
    /// use mlvpt::contract::attention::{FwdTiles, FWD_TILES};
    /// let default64: &FwdTiles = FWD_TILES.iter().find(|t| t.head_dim == 64).unwrap();
    /// assert_eq!((default64.kernel, default64.rows, default64.pipelined), ("attn_fwd_d64", 128, false));
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FwdTiles {
        pub head_dim: usize,
        pub rows: usize,
        pub pipelined: bool,
        pub min_blocks: usize,
        pub kernel: &'static str,
    }

    impl FwdTiles {
        /// m16 tiles of query rows per warp.
        ///
        /// ```
        /// use mlvpt::contract::attention::FWD_TILES;
        /// let t = FWD_TILES.iter().find(|t| t.kernel == "attn_fwd_d64").unwrap();
        /// assert_eq!(t.m_tiles(), 2); // 128 rows over 4 warps of m16 tiles
        /// ```
        pub const fn m_tiles(&self) -> usize {
            self.rows / (16 * ATTN_WARPS)
        }
        /// Dynamic shared memory: Q rows, a K tile and a V tile (two each when pipelined).
        ///
        /// ```
        /// use mlvpt::contract::attention::FWD_TILES;
        /// let plain = FWD_TILES.iter().find(|t| t.kernel == "attn_fwd_d64_r64").unwrap();
        /// let piped = FWD_TILES.iter().find(|t| t.kernel == "attn_fwd_d64_r64p").unwrap();
        /// assert_eq!(plain.smem_bytes(), (64 + 2 * 64) * 144);
        /// assert_eq!(piped.smem_bytes(), (64 + 4 * 64) * 144); // K and V double-buffered
        /// ```
        pub const fn smem_bytes(&self) -> usize {
            let kv_tiles = if self.pipelined { 4 } else { 2 };
            (self.rows + kv_tiles * ATTN_KEY_TILE) * smem_row_bytes(self.head_dim)
        }
    }

    /// One compiled tile shape of the fused backward: `keys` keys per block (a warp per 16),
    /// the queries `rows` at a time. With `dq_kernel` (a split backward) `kernel` computes dK
    /// and dV only and `dq_kernel` computes dQ in a query-stationary pass of
    /// [`BwdTiles::DQ_ROWS`] rows per block, without fp32 atomics.
    ///
    /// ```
    /// use mlvpt::contract::attention::{BwdTiles, BWD_TILES};
    /// let split: &BwdTiles = BWD_TILES.iter().find(|t| t.dq_kernel.is_some()).unwrap();
    /// assert_eq!((split.kernel, split.dq_kernel), ("attn_bwd_d64_split", Some("attn_bwd_d64_split_dq")));
    /// assert_eq!(split.threads(), 128);
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct BwdTiles {
        pub head_dim: usize,
        pub keys: usize,
        pub rows: usize,
        pub kernel: &'static str,
        pub dq_kernel: Option<&'static str>,
    }

    impl BwdTiles {
        /// Query rows per block of a split backward's dQ pass (one m16 tile per warp).
        ///
        /// ```
        /// use mlvpt::contract::attention::BwdTiles;
        /// assert_eq!(BwdTiles::DQ_ROWS, 64);
        /// assert_eq!(227usize.div_ceil(BwdTiles::DQ_ROWS), 4); // dQ blocks of a 227-token image
        /// ```
        pub const DQ_ROWS: usize = 16 * ATTN_WARPS;

        /// Warps per block: one per 16 keys.
        ///
        /// ```
        /// use mlvpt::contract::attention::BWD_TILES;
        /// let wide = BWD_TILES.iter().find(|t| t.kernel == "attn_bwd_d64_k128").unwrap();
        /// assert_eq!(wide.warps(), 8); // a warp per 16 of its 128 keys
        /// ```
        pub const fn warps(&self) -> usize {
            self.keys / 16
        }
        /// Threads per block.
        ///
        /// ```
        /// use mlvpt::contract::attention::BWD_TILES;
        /// assert!(BWD_TILES.iter().all(|t| t.threads() == 32 * t.keys / 16));
        /// ```
        pub const fn threads(&self) -> usize {
            32 * self.warps()
        }
        /// Dynamic shared memory: K, V of the block's keys, Q and dO of a step, dS^T
        /// `[keys][rows + 8]` bf16, and the step's log-sum-exps and row sums (f32); a split
        /// backward has no dS^T and two of everything else of a step.
        ///
        /// ```
        /// use mlvpt::contract::attention::{smem_row_bytes, BWD_TILES};
        /// let t = BWD_TILES.iter().find(|t| t.kernel == "attn_bwd_d64").unwrap();
        /// let row = smem_row_bytes(64);
        /// assert_eq!(t.smem_bytes(), (2 * 64 + 2 * 64) * row + 64 * (64 + 8) * 2 + 2 * 64 * 4);
        /// assert!(t.smem_bytes() <= 48 * 1024); // no opt-in needed
        /// ```
        pub const fn smem_bytes(&self) -> usize {
            let row = smem_row_bytes(self.head_dim);
            if self.dq_kernel.is_some() {
                (2 * self.keys + 4 * self.rows) * row + 4 * self.rows * 4
            } else {
                (2 * self.keys + 2 * self.rows) * row + self.keys * (self.rows + ATTN_SMEM_PAD) * 2 + 2 * self.rows * 4
            }
        }
        /// Dynamic shared memory of the dQ pass: Q and dO rows, K and V tiles twice each.
        ///
        /// ```
        /// use mlvpt::contract::attention::{BwdTiles, BWD_TILES};
        /// let split = BWD_TILES.iter().find(|t| t.dq_kernel.is_some()).unwrap();
        /// assert_eq!(split.dq_smem_bytes(), (2 * BwdTiles::DQ_ROWS + 4 * 64) * 144);
        /// ```
        pub const fn dq_smem_bytes(&self) -> usize {
            (2 * Self::DQ_ROWS + 4 * ATTN_KEY_TILE) * smem_row_bytes(self.head_dim)
        }
    }

    /// Head dims the fused kernels are compiled for (each has a row-sum kernel
    /// `attn_bwd_pre_d<dh>`).
    ///
    /// ```
    /// use mlvpt::contract::attention::FUSED_HEAD_DIMS;
    /// assert_eq!(FUSED_HEAD_DIMS, [32, 64, 80, 128]);
    /// assert!(!FUSED_HEAD_DIMS.contains(&24)); // the demo's heads take the plain kernels
    /// ```
    pub const FUSED_HEAD_DIMS: &[usize] = &[32, 64, 80, 128];

    const fn fwd(head_dim: usize, rows: usize, pipelined: bool, min_blocks: usize, kernel: &'static str) -> FwdTiles {
        FwdTiles {
            head_dim,
            rows,
            pipelined,
            min_blocks,
            kernel,
        }
    }
    const fn bwd(head_dim: usize, keys: usize, rows: usize, kernel: &'static str, dq_kernel: Option<&'static str>) -> BwdTiles {
        BwdTiles {
            head_dim,
            keys,
            rows,
            kernel,
            dq_kernel,
        }
    }

    /// Every compiled forward; the first of a head dim is the launcher's default, the others
    /// are alternatives `benches/gpu_attention.rs` measures against it (ViT-S/B/L: 64; ViT-H:
    /// 80; 32 and 128 for narrow and wide heads). Head dims 80 and 128 take 64 rows so the
    /// accumulators fit in registers without spilling; 3 blocks per SM (at most 168 registers)
    /// where that costs no spill.
    ///
    /// ```
    /// use mlvpt::contract::attention::{FUSED_HEAD_DIMS, FWD_TILES};
    /// for dh in FUSED_HEAD_DIMS {
    ///     let first = FWD_TILES.iter().find(|t| t.head_dim == *dh).unwrap(); // the default
    ///     println!("head dim {dh}: {} ({} rows, {} B shared)", first.kernel, first.rows, first.smem_bytes());
    /// }
    /// assert!(FWD_TILES.iter().all(|t| t.rows % 64 == 0));
    /// ```
    pub const FWD_TILES: &[FwdTiles] = &[
        fwd(32, 128, false, 1, "attn_fwd_d32"),
        fwd(64, 128, false, 1, "attn_fwd_d64"),
        fwd(64, 64, false, 3, "attn_fwd_d64_r64"),
        fwd(64, 64, true, 3, "attn_fwd_d64_r64p"),
        fwd(80, 64, false, 3, "attn_fwd_d80"),
        fwd(128, 64, false, 1, "attn_fwd_d128"),
    ];

    /// Every compiled backward, as [`FWD_TILES`]; steps of 32 and 16 queries at head dims 80 and
    /// 128 keep dK, dV and the step's scores in registers. `attn_bwd_d64_k128` (8 warps, 128
    /// keys per block) halves the dQ atomics and the Q, dO reloads of the 64-key blocks;
    /// `attn_bwd_d64_split` computes dQ in a pass of its own (two more matrix products, no
    /// atomics, no fp32 scratch: deterministic).
    ///
    /// ```
    /// use mlvpt::contract::attention::{FUSED_HEAD_DIMS, BWD_TILES};
    /// for dh in FUSED_HEAD_DIMS {
    ///     assert!(BWD_TILES.iter().any(|t| t.head_dim == *dh), "no backward for {dh}");
    /// }
    /// let names: Vec<_> = BWD_TILES.iter().filter(|t| t.head_dim == 64).map(|t| t.kernel).collect();
    /// assert_eq!(names[0], "attn_bwd_d64"); // the default comes first
    /// ```
    pub const BWD_TILES: &[BwdTiles] = &[
        bwd(32, 64, 64, "attn_bwd_d32", None),
        bwd(64, 64, 64, "attn_bwd_d64", None),
        bwd(64, 64, 32, "attn_bwd_d64_q32", None),
        bwd(64, 128, 64, "attn_bwd_d64_k128", None),
        bwd(64, 64, 64, "attn_bwd_d64_split", Some("attn_bwd_d64_split_dq")),
        bwd(80, 64, 32, "attn_bwd_d80", None),
        bwd(128, 64, 16, "attn_bwd_d128", None),
    ];

    kernel_params! {
        /// Every fused attention kernel's arguments (as flash-attention's `Flash_fwd_params`):
        /// Q, K, V and their gradients `[B, N, h, dh]`, the output and its gradient
        /// `[B, Nq, h, dh]`, each at its own pointer with element strides per image, token and
        /// head (the head dim contiguous), so packed `qkv [B, N, 3, h, dh]` and separate tensors
        /// are the same call; `lse [B, h, Nq]` and the backward's scratch are contiguous.
        /// Queries are the tokens `qs .. qs + nq`, keys all `n`; tokens `ps .. pe` are prompts
        /// (a prompt query skips the other prompts' keys; `ps == pe`: no mask).
        ///
        /// ```
        /// use mlvpt::contract::attention::AttnParams;
        /// // Packed qkv [B=2, N=10, 3, h=2, dh=32] at address `base`: Q, K, V by strides.
        /// let (b, n, h, dh) = (2i64, 10i64, 2i64, 32i64);
        /// let (base, d) = (0x7f00_0000_0000u64, h * dh);
        /// let (tok, img) = (3 * d, n * 3 * d);
        /// let p = AttnParams {
        ///     q: base,
        ///     k: base + 2 * d as u64, // bf16: 2 bytes an element
        ///     v: base + 4 * d as u64,
        ///     q_batch_stride: img, q_row_stride: tok, q_head_stride: dh,
        ///     k_batch_stride: img, k_row_stride: tok, k_head_stride: dh,
        ///     v_batch_stride: img, v_row_stride: tok, v_head_stride: dh,
        ///     b: b as i32, n: n as i32, h: h as i32, dh: dh as i32,
        ///     ps: 1, pe: 4, // tokens 1..4 are prompts
        ///     qs: 0, nq: n as i32, // every token a query
        ///     scale: 1.0 / (dh as f32).sqrt(),
        ///     ..Default::default()
        /// };
        /// assert_eq!(p.dq_acc, 0); // null: set by the backward
        /// ```
        pub struct AttnParams {
            pub q: u64 => "const __nv_bfloat16* {}",
            pub k: u64 => "const __nv_bfloat16* {}",
            pub v: u64 => "const __nv_bfloat16* {}",
            /// Written by the forward, read by the backward.
            pub o: u64 => "__nv_bfloat16* {}",
            /// Natural-log log-sum-exp of each scaled, masked score row, `[B, h, Nq]`.
            pub lse: u64 => "float* {}",
            pub dout: u64 => "const __nv_bfloat16* {}",
            pub dq: u64 => "__nv_bfloat16* {}",
            pub dk: u64 => "__nv_bfloat16* {}",
            pub dv: u64 => "__nv_bfloat16* {}",
            /// fp32 dQ sums `[B, Nq, h*dh]` (null for a split backward).
            pub dq_acc: u64 => "float* {}",
            /// `rowsum(dO * O)` per query row, `[B, h, Nq]`.
            pub dvec: u64 => "float* {}",
            pub q_batch_stride: i64 => "int64_t {}",
            pub q_row_stride: i64 => "int64_t {}",
            pub q_head_stride: i64 => "int64_t {}",
            pub k_batch_stride: i64 => "int64_t {}",
            pub k_row_stride: i64 => "int64_t {}",
            pub k_head_stride: i64 => "int64_t {}",
            pub v_batch_stride: i64 => "int64_t {}",
            pub v_row_stride: i64 => "int64_t {}",
            pub v_head_stride: i64 => "int64_t {}",
            pub o_batch_stride: i64 => "int64_t {}",
            pub o_row_stride: i64 => "int64_t {}",
            pub o_head_stride: i64 => "int64_t {}",
            pub do_batch_stride: i64 => "int64_t {}",
            pub do_row_stride: i64 => "int64_t {}",
            pub do_head_stride: i64 => "int64_t {}",
            pub dq_batch_stride: i64 => "int64_t {}",
            pub dq_row_stride: i64 => "int64_t {}",
            pub dq_head_stride: i64 => "int64_t {}",
            pub dk_batch_stride: i64 => "int64_t {}",
            pub dk_row_stride: i64 => "int64_t {}",
            pub dk_head_stride: i64 => "int64_t {}",
            pub dv_batch_stride: i64 => "int64_t {}",
            pub dv_row_stride: i64 => "int64_t {}",
            pub dv_head_stride: i64 => "int64_t {}",
            /// Images.
            pub b: i32 => "int {}",
            /// Tokens (keys).
            pub n: i32 => "int {}",
            /// Heads.
            pub h: i32 => "int {}",
            /// Head dim.
            pub dh: i32 => "int {}",
            pub ps: i32 => "int {}",
            pub pe: i32 => "int {}",
            pub qs: i32 => "int {}",
            pub nq: i32 => "int {}",
            /// `dh^-1/2`.
            pub scale: f32 => "float {}",
        }
    }

    kernel_params! {
        /// `attn_simple_fwd` / `attn_simple_bwd`, the plain fp32 attention for head dims the
        /// fused kernels lack: `qkv [B, N, 3, h, dh]`, `out` and `dout [B, Nq, h*dh]`,
        /// `lse [B, h, Nq]`, `dqkv` like `qkv`; queries `q0 .. q0 + nq`, prompts `ps .. pe`.
        ///
        /// ```
        /// use mlvpt::contract::attention::PlainAttnParams;
        /// // Head dim 48 (no fused kernel): 4 heads, CLS + 10 prompts + 49 patches, every token a query.
        /// let p = PlainAttnParams { n: 60, h: 4, dh: 48, ps: 1, pe: 11, q0: 0, nq: 60, scale: 1.0 / 48f32.sqrt(), ..Default::default() };
        /// assert_eq!(p.dqkv, 0); // pointers are set by the launcher
        /// ```
        pub struct PlainAttnParams {
            pub qkv: u64 => "const float* {}",
            /// Written by the forward, read by the backward.
            pub out: u64 => "float* {}",
            pub lse: u64 => "float* {}",
            pub dout: u64 => "const float* {}",
            /// Zero on entry to the backward (dK, dV are added with atomics).
            pub dqkv: u64 => "float* {}",
            pub n: i32 => "int {}",
            pub h: i32 => "int {}",
            pub dh: i32 => "int {}",
            pub ps: i32 => "int {}",
            pub pe: i32 => "int {}",
            pub q0: i32 => "int {}",
            pub nq: i32 => "int {}",
            pub scale: f32 => "float {}",
        }
    }
}

/// (field, C declaration, byte offset) of each field of a parameter struct.
#[doc(hidden)]
pub type CFields = Vec<(&'static str, &'static str, usize)>;

/// The parameter structs build.rs writes into `contract.cuh`: (C name, size, fields).
#[doc(hidden)]
pub fn param_structs() -> Vec<(&'static str, usize, CFields)> {
    macro_rules! structs {
        ($($m:ident::$t:ident),*) => { vec![$((stringify!($t), core::mem::size_of::<$m::$t>(), $m::$t::c_fields())),*] };
    }
    structs![
        adamw::AdamWParams,
        asl::AslParams,
        head::MoeParams,
        tokens::CopyTokensParams,
        augment::Crop,
        augment::AugmentParams,
        attention::AttnParams,
        attention::PlainAttnParams
    ]
}

/// Every shared constant, for build.rs.
#[doc(hidden)]
pub const ALL_CONSTS: &[&[(&str, i64)]] = &[layernorm::CONSTS, head::CONSTS, adamw::CONSTS, asl::CONSTS, attention::CONSTS];

/// `contract.cuh`, the C side of this file: each shared constant as a `constexpr`, the attention
/// tile tables as the X-macros `kernels/attention.cu` instantiates, each parameter struct with
/// `static_assert`s on its size and every field's offset. build.rs writes it into `OUT_DIR`
/// before nvcc runs; anything else compiling the kernels (the virtual device's tests) does the
/// same.
///
/// ```
/// let h = mlvpt::contract::c_header();
/// assert!(h.contains("constexpr int HEAD_MAX_E = 8;") && h.contains("struct AttnParams {"));
/// assert!(h.contains("#define ATTN_FWD_CONFIGS(X) X(32, "));
/// ```
pub fn c_header() -> String {
    use attention::{BwdTiles, ATTN_WARPS, BWD_TILES, FUSED_HEAD_DIMS, FWD_TILES};
    use std::fmt::Write as _;
    let mut h = String::from(
        "// Generated from src/contract.rs (mlvpt::contract::c_header; build.rs writes it): do not edit.\n\
         #pragma once\n#include <cuda_bf16.h>\n#include <stddef.h>\n#include <stdint.h>\n\n",
    );
    for table in ALL_CONSTS {
        for (name, value) in *table {
            let ty = if i32::try_from(*value).is_ok() { "int" } else { "long long" };
            let _ = writeln!(h, "constexpr {ty} {name} = {value};");
        }
    }
    h.push_str("\n// Attention tile tables (src/contract.rs FWD_TILES, BWD_TILES), instantiated at the end of attention.cu.\n");
    let dims: Vec<String> = FUSED_HEAD_DIMS.iter().map(|d| format!("X({d})")).collect();
    let _ = writeln!(h, "#define ATTN_HEAD_DIMS(X) {}", dims.join(" "));
    // X(head dim, m-tiles per warp, pipelined, min blocks per SM, name). The launcher sizes the
    // dynamic shared memory from the same tables (FwdTiles::smem_bytes and the like).
    let fwd: Vec<String> = FWD_TILES
        .iter()
        .map(|t| {
            format!(
                "X({}, {}, {}, {}, {})",
                t.head_dim,
                t.m_tiles(),
                t.pipelined,
                t.min_blocks,
                t.kernel
            )
        })
        .collect();
    let _ = writeln!(h, "#define ATTN_FWD_CONFIGS(X) {}", fwd.join(" "));
    // X(head dim, query rows per step, warps, split, name)
    let bwd: Vec<String> = BWD_TILES
        .iter()
        .map(|t| {
            format!(
                "X({}, {}, {}, {}, {})",
                t.head_dim,
                t.rows,
                t.warps(),
                t.dq_kernel.is_some(),
                t.kernel
            )
        })
        .collect();
    let _ = writeln!(h, "#define ATTN_BWD_CONFIGS(X) {}", bwd.join(" "));
    // X(head dim, m-tiles per warp, name) of the split backwards' dQ passes
    let dq: Vec<String> = BWD_TILES
        .iter()
        .filter_map(|t| {
            t.dq_kernel
                .map(|k| format!("X({}, {}, {})", t.head_dim, BwdTiles::DQ_ROWS / (16 * ATTN_WARPS), k))
        })
        .collect();
    let _ = writeln!(h, "#define ATTN_BWD_DQ_CONFIGS(X) {}", dq.join(" "));

    for (name, size, fields) in param_structs() {
        let _ = writeln!(h, "\nstruct {name} {{");
        for (field, decl, _) in &fields {
            let _ = writeln!(h, "    {};", decl.replace("{}", field));
        }
        h.push_str("};\n");
        let _ = writeln!(
            h,
            "static_assert(sizeof({name}) == {size}, \"{name}: size differs from src/contract.rs\");"
        );
        for (field, _, offset) in &fields {
            let _ = writeln!(
                h,
                "static_assert(offsetof({name}, {field}) == {offset}, \"{name}::{field}: offset differs from src/contract.rs\");"
            );
        }
    }
    h
}
