// Register-blocked x86 kernels of the mixed sum (AVX-512 and AVX2), picked at run time.
//
// Each vector of results reads its slice of all K inputs at once: the forward is one FMA chain
// per vector, the backward writes the K scaled copies of g and keeps the K inner products in
// registers (8 inputs per pass with AVX-512, 4 with AVX2; later passes re-read g from L2). Every
// input is streamed from memory once. Measured against the portable kernels, which accumulate
// input by input through a cache-resident tile: benchmarks/RESULTS.md, "CPU kernels alone".
//
// The translation unit behind this header includes no ATen header: its functions are compiled for
// instruction sets the baseline build does not assume, and inline functions of shared headers
// compiled that way could be picked by the linker for the rest of the library.
#pragma once

#include <cstdint>

namespace fastnas {
namespace simd {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
enum class Dtype : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Name of an instruction-set level: "portable", "avx2" or "avx512".
const char* isa_name(Isa isa);
// The level named `name` (as isa_name spells it, in any case) in *isa; false for any other name.
bool isa_from_name(const char* name, Isa* isa);

// The level the kernels use now: the best this CPU supports and this build compiled, capped by
// set_isa_limit (fastnas::_cpu_settings; fastnas.backend sets FASTNAS_CPU_ISA's cap).
Isa active_isa();
void set_isa_limit(Isa limit);

// Alignment that streamed (non-temporal) results need, in bytes.
constexpr int64_t kStreamAlignment = 64;

// out[i] = sum_k weights[k] * inputs[k][i] for i in [offset, offset + n). weights are float64 for
// float64 inputs, float32 otherwise. When `stream`, results are written past the cache (non-temporal
// stores) if out + offset is aligned to kStreamAlignment; the caller fences (_mm_sfence) before the
// results are read by another thread. `isa` must not be kPortable.
void forward(Isa isa, Dtype dtype, const void* const* inputs, int64_t K, const void* weights, void* out,
             int64_t offset, int64_t n, bool stream);

// For i in [offset, offset + n): grads[k][i] = weights[k] * g[i] (when grads is not null), and
// sums[k] = sum_i g[i] * inputs[k][i] (when inputs is not null) in a fixed order, in the weights'
// dtype. `stream` as in forward, for the grads. `isa` must not be kPortable.
void backward(Isa isa, Dtype dtype, const void* g, const void* const* inputs, int64_t K, const void* weights,
              void* const* grads, void* sums, int64_t offset, int64_t n, bool stream);

}  // namespace simd
}  // namespace fastnas
