// The MoE kernels' MoeParams (src/contract.rs) unpacked into the restrict-qualified locals their
// bodies use (a struct field cannot be __restrict__), for the fp32 (head.cu) and tensor-core
// (moe_mma.cu) versions alike.
#pragma once
#include "common.cuh"

#define MOE_SIZES(p) \
    const uint32_t batch = (p).batch, tokens = (p).tokens, d = (p).d, labels = (p).labels, experts = (p).experts
#define MOE_TABLES(p)                                                 \
    const uint32_t* __restrict__ tok_offsets = (p).tok_offsets;      \
    const uint32_t* __restrict__ tok_items = (p).tok_items
// The scores kernels: z, adapted, the gate table and classifier in; q, r out.
#define MOE_SCORES_ARGS(p)                                            \
    const bf16* __restrict__ z = (p).z;                              \
    const bf16* __restrict__ adapted = (p).adapted;                  \
    const float* __restrict__ gate = (p).gate;                       \
    const float* __restrict__ w = (p).w;                             \
    const uint32_t* __restrict__ grow = (p).grow;                    \
    float* __restrict__ q = (p).q;                                   \
    float* __restrict__ r = (p).r;                                   \
    MOE_TABLES(p);                                                   \
    MOE_SIZES(p)
// The token-gradient kernels: dq, dr, the gate table and classifier in; dz, dadapted added to.
#define MOE_TOKENS_ARGS(p)                                            \
    const float* __restrict__ dq = (p).dq;                           \
    const float* __restrict__ dr = (p).dr;                           \
    const float* __restrict__ gate = (p).gate;                       \
    const float* __restrict__ w = (p).w;                             \
    const uint32_t* __restrict__ grow = (p).grow;                    \
    bf16* __restrict__ dz = (p).dz;                                  \
    bf16* __restrict__ dadapted = (p).dadapted;                      \
    MOE_TABLES(p);                                                   \
    MOE_SIZES(p)
// The pair-row kernels: coef [B, E, K] times x [B, P, D] into pair_rows [E*K, D].
#define MOE_PAIRS_ARGS(p)                                             \
    const float* __restrict__ coef = (p).coef;                       \
    const bf16* __restrict__ x = (p).x;                              \
    float* __restrict__ pair_rows = (p).pair_rows;                   \
    MOE_TABLES(p);                                                   \
    MOE_SIZES(p)
