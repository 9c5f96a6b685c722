// What the channels_last (NHWC) kernels share: vectors of contiguous channels and the argument checks
// of 2-D geometries (csrc/cpu/depthwise_conv_cpu.cpp, csrc/cpu/avg_pool_cpu.cpp, csrc/cpu/batch_norm_cpu.cpp).
//
// Everything here is internal to the translation unit that includes it (an unnamed namespace): the
// vector helpers are inlined into multiversioned functions (cpu/multiversion.h) and compiled for each
// of their instruction sets, so no out-of-line copy built for one set may be shared with another.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "cpu/multiversion.h"

// Lanes<T> passes 64-byte vectors by value between always-inlined functions only: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastnas {
namespace {

constexpr int64_t kVectorBytes = 64;  // one AVX-512 register (two AVX2 ones, four SSE ones)
constexpr int kMaxVectors = 4;          // channels per block: up to 4 vectors (64 float32 channels)

// A vector of channels (GCC/Clang vector extension: compiled for whichever instruction set the
// multiversioned caller targets).
template <typename T>
struct Lanes {
  typedef T V __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t kCount = kVectorBytes / sizeof(T);
  static FASTNAS_INLINE V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static FASTNAS_INLINE void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
};

// A pair of values (kernel_size, stride, ...) of op `op`, each at least `minimum`.
inline std::vector<int64_t> pair_arg(at::IntArrayRef values, const char* op, const char* name, int64_t minimum) {
  TORCH_CHECK_VALUE(values.size() == 2, op, ": ", name, " must have 2 values, got ", values.size());
  TORCH_CHECK_VALUE(values[0] >= minimum && values[1] >= minimum, op, ": ", name, " must be >= ", minimum, ", got ",
                    values);
  return values.vec();
}

inline bool is_nhwc(const at::Tensor& t) { return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast); }

}  // namespace
}  // namespace fastnas
