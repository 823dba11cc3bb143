// Counters and an instruction the device does not implement.

// Every lane reads s[lane * 32]: 32 words in one bank, a 32-way conflict (32 wavefronts for one
// request); then s[lane]: conflict-free (1 wavefront).
extern "C" __global__ void bank_conflicts(float* out) {
    __shared__ float s[32 * 32];
    const int t = threadIdx.x;
    for (int i = t; i < 32 * 32; i += 32) s[i] = (float)i;
    __syncthreads();
    volatile float* vs = s;
    out[t] = vs[t * 32];
    out[32 + t] = vs[t];
}

// prmt (byte permute) is not implemented by the virtual device: the launch must fail naming it.
extern "C" __global__ void unknown_instruction(unsigned* out) {
    unsigned r;
    asm volatile("prmt.b32 %0, %1, %2, 0x3210;" : "=r"(r) : "r"(out[0]), "r"(out[1]));
    out[2] = r;
}

// Waits for a flag nobody sets: only the watchdog ends it.
extern "C" __global__ void spin_forever(const volatile int* flag) {
    while (*flag == 0) {
    }
}
