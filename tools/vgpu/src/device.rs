//! The card the virtual device reports: H100 SXM by default, A100 with `VGPU_PROFILE=a100`;
//! `VGPU_DEVICE_COUNT` devices (default 1).

/// Limits and identity of one simulated card.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub cc: (i32, i32),
    pub sm_count: i32,
    /// Shared memory per block without the opt-in attribute.
    pub smem_per_block: u32,
    /// Shared memory per block with `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
    pub smem_per_block_optin: u32,
    pub smem_per_sm: u32,
    pub regs_per_block: u32,
    pub regs_per_sm: u32,
    pub max_threads_per_block: u32,
    pub max_threads_per_sm: u32,
    pub max_block_dim: [u32; 3],
    pub max_grid_dim: [u32; 3],
    pub total_mem: u64,
    pub clock_khz: i32,
    pub mem_clock_khz: i32,
    pub bus_width: i32,
    pub l2_bytes: i32,
}

pub const H100: Profile = Profile {
    name: "vGPU (virtual CUDA device on the CPU; H100 SXM limits; no performance meaning)",
    cc: (9, 0),
    sm_count: 132,
    smem_per_block: 48 * 1024,
    smem_per_block_optin: 227 * 1024,
    smem_per_sm: 228 * 1024,
    regs_per_block: 65536,
    regs_per_sm: 65536,
    max_threads_per_block: 1024,
    max_threads_per_sm: 2048,
    max_block_dim: [1024, 1024, 64],
    max_grid_dim: [2147483647, 65535, 65535],
    total_mem: 80 * (1 << 30),
    clock_khz: 1_980_000,
    mem_clock_khz: 2_619_000,
    bus_width: 5120,
    l2_bytes: 50 * 1024 * 1024,
};

pub const A100: Profile = Profile {
    name: "vGPU (virtual CUDA device on the CPU; A100 SXM limits; no performance meaning)",
    cc: (8, 0),
    sm_count: 108,
    smem_per_block: 48 * 1024,
    smem_per_block_optin: 163 * 1024,
    smem_per_sm: 164 * 1024,
    regs_per_block: 65536,
    regs_per_sm: 65536,
    max_threads_per_block: 1024,
    max_threads_per_sm: 2048,
    max_block_dim: [1024, 1024, 64],
    max_grid_dim: [2147483647, 65535, 65535],
    total_mem: 80 * (1 << 30),
    clock_khz: 1_410_000,
    mem_clock_khz: 1_593_000,
    bus_width: 5120,
    l2_bytes: 40 * 1024 * 1024,
};

/// The profile chosen by `VGPU_PROFILE` (h100, the default, or a100).
pub fn profile() -> &'static Profile {
    static P: std::sync::OnceLock<&'static Profile> = std::sync::OnceLock::new();
    P.get_or_init(
        || match std::env::var("VGPU_PROFILE").unwrap_or_default().to_ascii_lowercase().as_str() {
            "a100" => &A100,
            _ => &H100,
        },
    )
}

/// Number of devices (`VGPU_DEVICE_COUNT`, default 1, at most 16).
pub fn device_count() -> i32 {
    std::env::var("VGPU_DEVICE_COUNT")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .unwrap_or(1)
        .clamp(0, 16)
}
