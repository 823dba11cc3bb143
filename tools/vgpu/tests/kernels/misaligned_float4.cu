// memcheck: a 16-byte vector load (ld.global.v4.f32) from an address that is only 4-byte
// aligned (p + 1 floats from a 256-byte aligned allocation).
extern "C" __global__ void misaligned_float4(const float* p, float* out) {
    const float4 v = *reinterpret_cast<const float4*>(p + 1 + 4 * threadIdx.x);
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}
