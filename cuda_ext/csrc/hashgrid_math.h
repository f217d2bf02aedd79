// Per-point math of the tiny-cuda-nn HashGrid encoding (3-D input, trilinear interpolation).
//
// Everything here is `__host__ __device__` and free of torch and of the CUDA runtime, so the
// CPU build (hashgrid_cpu.cpp, OpenMP) and the CUDA build (hashgrid_cuda.cu) run the same code.
// The parameter layout is documented in citygen/fields/hash_encoding.py; in short, level `l`
// owns entries [offsets[l], offsets[l+1]) of a flat table, each entry F consecutive floats.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HG_HD __host__ __device__ __forceinline__
#else
#define HG_HD inline
#endif

namespace hashgrid {

// tcnn's hashing primes for x, y, z.  The 1 for x keeps neighbouring x in neighbouring slots.
constexpr uint32_t kPrime1 = 2654435761u;
constexpr uint32_t kPrime2 = 805459861u;

// Level scale as tcnn computes it, in float32: exp2(level * log2(per_level_scale)) * base - 1.
HG_HD float level_scale(uint32_t level, float log2_per_level_scale, uint32_t base_resolution) {
    return exp2f((float)level * log2_per_level_scale) * (float)base_resolution - 1.0f;
}

// Vertices per axis of the level's virtual dense grid.
HG_HD uint32_t level_resolution(float scale) { return (uint32_t)ceilf(scale) + 1u; }

// The level geometry a kernel needs, derived from the offset table and the scale.
struct Level {
    uint32_t offset;      // first entry
    uint32_t size;        // entries (modulo of the index)
    uint32_t resolution;  // vertices per axis
    float scale;
    bool dense;           // resolution^3 <= size: stride indexing instead of hashing
    bool pow2_size;       // size is a power of two (every hashed level): modulo by masking
};

HG_HD Level make_level(const int32_t* offsets, const float* scales, uint32_t level) {
    Level lv;
    lv.offset = (uint32_t)offsets[level];
    lv.size = (uint32_t)offsets[level + 1] - lv.offset;
    lv.scale = scales[level];
    lv.resolution = level_resolution(lv.scale);
    // tcnn multiplies strides while they stay <= size; hashing starts where the grid outgrows it.
    uint64_t r = lv.resolution;
    lv.dense = r * r * r <= (uint64_t)lv.size;
    lv.pow2_size = (lv.size & (lv.size - 1u)) == 0u;
    return lv;
}

// Entry index of grid vertex (gx, gy, gz) in a level (uint32 arithmetic wraps as in tcnn).
HG_HD uint32_t vertex_index(const Level& lv, uint32_t gx, uint32_t gy, uint32_t gz) {
    uint32_t index;
    if (lv.dense) {
        index = gx + gy * lv.resolution + gz * lv.resolution * lv.resolution;
    } else {
        index = gx ^ (gy * kPrime1) ^ (gz * kPrime2);
    }
    // index % size, without the integer division where it is not needed: hashed levels have
    // power-of-two sizes, and dense indices only reach past the size at the upper border.
    if (lv.pow2_size) return index & (lv.size - 1u);
    return index < lv.size ? index : index % lv.size;
}

// Position in vertex units: pos = fma(scale, x, 0.5), cell = floor(pos), frac = pos - cell.
// On the host the float64 product of two floats is exact, so rounding the double sum to float
// equals fmaf's single rounding (up to a double-rounding tie, which does not occur in practice)
// without needing FMA hardware.
HG_HD void pos_fract(float x, float scale, float& frac, uint32_t& cell) {
#if defined(__CUDA_ARCH__)
    const float pos = fmaf(scale, x, 0.5f);
    const float floored = floorf(pos);
#else
    const float pos = (float)((double)scale * (double)x + 0.5);
    // floor by truncation + correction: without SSE4.1 floorf is a libm call, and it is the
    // hottest instruction here.  Exact for |pos| < 2^31 (inputs in [0, 1] give pos <= scale + 1).
    int32_t truncated = (int32_t)pos;
    truncated -= (float)truncated > pos ? 1 : 0;
    const float floored = (float)truncated;
#endif
    cell = (uint32_t)(int32_t)floored;
    frac = pos - floored;
}

// The 8 corners of a point's cell: entry indices and trilinear weights, tcnn's corner order
// (bit d of the corner number selects +1 on axis d).
struct Corners {
    uint32_t index[8];
    float weight[8];
    float frac[3];  // kept for the input gradient
};

HG_HD void cell_corners(const Level& lv, const float* xyz, Corners& c) {
    uint32_t cell[3];
    for (int d = 0; d < 3; ++d) pos_fract(xyz[d], lv.scale, c.frac[d], cell[d]);
    for (uint32_t k = 0; k < 8; ++k) {
        float w = 1.0f;
        uint32_t g[3];
        for (int d = 0; d < 3; ++d) {
            const bool up = (k >> d) & 1u;
            w *= up ? c.frac[d] : 1.0f - c.frac[d];
            g[d] = cell[d] + (up ? 1u : 0u);
        }
        c.weight[k] = w;
        c.index[k] = vertex_index(lv, g[0], g[1], g[2]);
    }
}

// Forward: out[f] = sum_k weight_k * table[index_k * F + f] for one level (table at its offset).
template <int F>
HG_HD void level_forward(const Corners& c, const float* table, float* out) {
    float acc[F];
    for (int f = 0; f < F; ++f) acc[f] = 0.0f;
    for (int k = 0; k < 8; ++k) {
        const float* entry = table + (size_t)c.index[k] * F;
        for (int f = 0; f < F; ++f) acc[f] += c.weight[k] * entry[f];
    }
    for (int f = 0; f < F; ++f) out[f] = acc[f];
}

// Backward to the table: grad_table[index_k * F + f] += weight_k * grad_out[f].  `add(ptr, v)`
// is a plain add where the caller owns the level, an atomic add where threads share it.
template <int F, typename Add>
HG_HD void level_backward(const Corners& c, const float* grad_out, float* grad_table, Add add) {
    for (int k = 0; k < 8; ++k) {
        float* entry = grad_table + (size_t)c.index[k] * F;
        for (int f = 0; f < F; ++f) add(entry + f, c.weight[k] * grad_out[f]);
    }
}

// Backward to the position: d out[f] / d x_d = scale * sum_k (d weight_k / d frac_d) * value_k[f],
// contracted with grad_out.  Adds the level's contribution to dx[3].
template <int F>
HG_HD void level_backward_input(const Level& lv, const Corners& c, const float* table,
                                const float* grad_out, float* dx) {
    for (int k = 0; k < 8; ++k) {
        const float* entry = table + (size_t)c.index[k] * F;
        float g = 0.0f;
        for (int f = 0; f < F; ++f) g += grad_out[f] * entry[f];
        for (int d = 0; d < 3; ++d) {
            // weight_k with axis d's factor replaced by its derivative (+1 or -1).
            float w = ((k >> d) & 1u) ? 1.0f : -1.0f;
            for (int e = 0; e < 3; ++e) {
                if (e == d) continue;
                w *= ((k >> e) & 1u) ? c.frac[e] : 1.0f - c.frac[e];
            }
            dx[d] += lv.scale * w * g;
        }
    }
}

}  // namespace hashgrid
