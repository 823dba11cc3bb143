// atom.global.add.v2.f32 (float2 atomicAdd, sm_90): every thread adds (1, 2) to p[off], p[off+1].
// The vector's address must be 8-byte aligned: off even passes, off odd is misaligned.
extern "C" __global__ void add_pair(float* p, int off) {
    atomicAdd(reinterpret_cast<float2*>(p + off), make_float2(1.0f, 2.0f));
}
