// CPU kernels of the mixed sum (contract: csrc/mixed_sum.h), registered for the CPU dispatch key.
//
// On x86 CPUs with AVX2 or AVX-512 the work of each thread goes to the register-blocked kernels of
// csrc/cpu/mixed_sum_simd.cpp (picked at run time, capped by fastnas::_cpu_settings: fastnas.backend
// sets FASTNAS_CPU_ISA's cap). The portable kernels below serve every other CPU, and the portable level. Both split the work the same way:
//
// Forward, one pass: per tile of kTile elements, y = sum_k w_k * o_k is accumulated in a cache-resident
// tile (float32, or float64 for float64 inputs) and stored once.
// Backward, one pass: per tile, g is read once; for each k, d o_k = w_k * g is written and the tile's
// <g, o_k> added to the chunk's sum. Each fixed chunk of kChunk elements yields K partial sums;
// the partials are summed over chunks in index order. Chunk boundaries do not depend on the thread
// count and parallel ranges fall on tile boundaries, so results are bit-identical across runs and
// across thread counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu/block_pool.h"
#include "cpu/mixed_sum_simd.h"
#include "cpu/multiversion.h"
#include "mixed_sum.h"

namespace fastnas {
namespace {

constexpr int64_t kTile = 8192;                // elements per tile: long runs per stream for the prefetcher, L2-resident
constexpr int64_t kTilesPerChunk = 4;          // 32768 elements per partial sum of d w
constexpr int64_t kChunk = kTile * kTilesPerChunk;
constexpr int64_t kForwardGrainTiles = 2;      // ~16K elements per thread at least

// The leaf loops below are multiversioned (see cpu/multiversion.h).

// ---- leaf loops on one tile, in the accumulation type (float or double)

template <typename T>
FASTNAS_INLINE void scale_body(T* __restrict dst, T w, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = w * src[i];
}
template <typename T>
FASTNAS_INLINE void axpy_body(T* __restrict dst, T w, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
}
template <typename T>
FASTNAS_INLINE T dot_body(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

FASTNAS_MULTIVERSION void scale(float* dst, float w, const float* src, int64_t n) { scale_body(dst, w, src, n); }
FASTNAS_MULTIVERSION void scale(double* dst, double w, const double* src, int64_t n) { scale_body(dst, w, src, n); }
FASTNAS_MULTIVERSION void axpy(float* dst, float w, const float* src, int64_t n) { axpy_body(dst, w, src, n); }
FASTNAS_MULTIVERSION void axpy(double* dst, double w, const double* src, int64_t n) { axpy_body(dst, w, src, n); }
FASTNAS_MULTIVERSION float dot(const float* a, const float* b, int64_t n) { return dot_body(a, b, n); }
FASTNAS_MULTIVERSION double dot(const double* a, const double* b, int64_t n) { return dot_body(a, b, n); }

// ---- 16-bit <-> float32 conversions of one tile (bit-exact with c10's: round to nearest even)

FASTNAS_MULTIVERSION void widen(float* __restrict dst, const at::BFloat16* __restrict src, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[i] = f;
  }
}
FASTNAS_MULTIVERSION void narrow(at::BFloat16* __restrict dst, const float* __restrict src, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    bits[i] = src[i] != src[i] ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
  }
}
#if defined(__FLT16_MAX__)
// _Float16 has the IEEE binary16 layout of at::Half; the compiler converts with F16C/AVX-512 where present.
FASTNAS_MULTIVERSION void widen(float* __restrict dst, const at::Half* __restrict src, int64_t n) {
  const _Float16* h = reinterpret_cast<const _Float16*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(h[i]);
}
FASTNAS_MULTIVERSION void narrow(at::Half* __restrict dst, const float* __restrict src, int64_t n) {
  _Float16* h = reinterpret_cast<_Float16*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = static_cast<_Float16>(src[i]);
}
#else
void widen(float* dst, const at::Half* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
void narrow(at::Half* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
}
#endif

// Size of a tile buffer in the accumulation type: none needed (1) when scalar_t is that type.
template <typename scalar_t>
constexpr int64_t kWidenBuffer = std::is_same_v<scalar_t, at::opmath_type<scalar_t>> ? 1 : kTile;

// The n elements at src as acc_t: src itself when the types match, else widened into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    widen(buf, src, n);
    return buf;
  }
}

// ---- results written past the cache (non-temporal stores)
//
// When a call touches more memory than the last-level cache holds, its results are written with
// non-temporal stores: an ordinary store first reads each destination line from memory (a third of
// the backward's traffic), a non-temporal one does not, and it does not evict the inputs still to be
// read. Smaller calls keep ordinary stores so their results stay in cache for the next op.

#if defined(__x86_64__) && defined(__GNUC__)
// 16-byte stores (SSE2, the x86-64 baseline): one sequential stream fills whole lines anyway.
void stream_bytes(char* dst, const char* src, int64_t bytes) {
  for (; bytes >= 16; bytes -= 16, dst += 16, src += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
  std::memcpy(dst, src, bytes);
}
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;
#endif

// Copies one tile to dst (any alignment: the unaligned head is copied normally).
template <typename scalar_t>
void stream_tile(scalar_t* dst, const scalar_t* src, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  stream_bytes(d + head, s + head, bytes - head);
#else
  std::copy(src, src + n, dst);
#endif
}

// Non-temporal stores are weakly ordered: fence before the results are read by another thread.
inline void stream_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  _mm_sfence();
#endif
}

// dst[i] = w * g[i], streamed, in L1-sized pieces (the scaled values make one trip through L1).
template <typename scalar_t, typename acc_t>
void scale_and_stream(scalar_t* dst, acc_t w, const acc_t* g, int64_t n) {
  constexpr int64_t kPiece = 1024;
  alignas(64) acc_t scaled[kPiece];
  alignas(64) scalar_t narrowed[std::is_same_v<scalar_t, acc_t> ? 1 : kPiece];
  for (int64_t i = 0; i < n; i += kPiece) {
    const int64_t m = std::min(kPiece, n - i);
    scale(scaled, w, g + i, m);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      stream_tile(dst + i, scaled, m);
    } else {
      narrow(narrowed, scaled, m);
      stream_tile(dst + i, narrowed, m);
    }
  }
}

// Size of the last-level cache that this CPU's core 0 sees, from sysfs. sysconf(_SC_LEVEL3_CACHE_SIZE)
// is not used: glibc derives it from CPUID, which under a hypervisor can describe the host's whole
// package (it reports 320 MB on the 2-core EPYC VM whose sysfs, like lscpu, says 32 MB).
int64_t last_level_cache_bytes() {
  int64_t bytes = 0;
  int best_level = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::FILE* level_file = std::fopen((dir + "level").c_str(), "r");
    if (level_file == nullptr) break;
    int level = 0;
    const bool have_level = std::fscanf(level_file, "%d", &level) == 1;
    std::fclose(level_file);
    std::FILE* size_file = std::fopen((dir + "size").c_str(), "r");
    if (size_file == nullptr) continue;
    long long size = 0;
    char unit = 0;
    const int fields = std::fscanf(size_file, "%lld%c", &size, &unit);
    std::fclose(size_file);
    if (!have_level || fields < 1 || level < best_level) continue;
    best_level = level;
    bytes = size << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0);
  }
  if (bytes <= 0) {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    bytes = l3 > 0 ? static_cast<int64_t>(l3) : int64_t(32) << 20;
  }
  return bytes;
}

// Calls touching more bytes than this stream their results: the last-level cache size unless
// fastnas::_cpu_settings sets another (fastnas.backend does, from FASTNAS_CPU_STREAM_BYTES).
std::atomic<int64_t>& stream_threshold() {
  static std::atomic<int64_t> threshold{last_level_cache_bytes()};
  return threshold;
}

// Whether a call that reads and writes `bytes_touched` in all should stream its results.
inline bool should_stream(int64_t bytes_touched) {
  return kCanStream && bytes_touched > stream_threshold().load(std::memory_order_relaxed);
}

template <typename scalar_t>
constexpr simd::Dtype simd_dtype() {
  if constexpr (std::is_same_v<scalar_t, double>) return simd::Dtype::kFloat64;
  if constexpr (std::is_same_v<scalar_t, at::Half>) return simd::Dtype::kFloat16;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return simd::Dtype::kBFloat16;
  return simd::Dtype::kFloat32;
}

template <typename scalar_t>
void forward_kernel(const std::vector<const scalar_t*>& inputs, const at::opmath_type<scalar_t>* w,
                    scalar_t* out, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t K = static_cast<int64_t>(inputs.size());
  const int64_t num_tiles = (numel + kTile - 1) / kTile;
  const bool stream = should_stream((K + 1) * numel * static_cast<int64_t>(sizeof(scalar_t)));
  const simd::Isa isa = simd::active_isa();
  at::parallel_for(0, num_tiles, kForwardGrainTiles, [&](int64_t tile_begin, int64_t tile_end) {
    const int64_t begin = tile_begin * kTile;
    const int64_t end = std::min(numel, tile_end * kTile);
    if (isa != simd::Isa::kPortable) {
      simd::forward(isa, simd_dtype<scalar_t>(), reinterpret_cast<const void* const*>(inputs.data()), K, w, out,
                    begin, end - begin, stream);
      if (stream) stream_fence();
      return;
    }
    alignas(64) acc_t acc_buf[kTile];
    alignas(64) acc_t widened[kWidenBuffer<scalar_t>];
    alignas(64) scalar_t narrowed[kWidenBuffer<scalar_t>];
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t start = tile * kTile;
      const int64_t n = std::min(kTile, numel - start);
      // float32/float64 accumulate in the output tile itself (it stays in L1 across k), unless streamed
      acc_t* acc = acc_buf;
      if constexpr (kSameType) {
        if (!stream) acc = out + start;
      }
      scale(acc, w[0], as_acc(inputs[0] + start, widened, n), n);
      for (int64_t k = 1; k < K; ++k) axpy(acc, w[k], as_acc(inputs[k] + start, widened, n), n);
      if constexpr (kSameType) {
        if (stream) stream_tile(out + start, acc, n);
      } else if (stream) {
        narrow(narrowed, acc, n);
        stream_tile(out + start, narrowed, n);
      } else {
        narrow(out + start, acc, n);
      }
    }
    if (stream) stream_fence();
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* g, const std::vector<const scalar_t*>& inputs,
                     const at::opmath_type<scalar_t>* w, int64_t K, const std::vector<scalar_t*>& grads,
                     at::opmath_type<scalar_t>* partials, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const bool want_outputs_grad = !grads.empty();
  const bool want_weights_grad = !inputs.empty();
  const int64_t num_chunks = (numel + kChunk - 1) / kChunk;
  const int64_t streams = 1 + (want_outputs_grad ? K : 0) + (want_weights_grad ? K : 0);
  const bool stream = want_outputs_grad && should_stream(streams * numel * static_cast<int64_t>(sizeof(scalar_t)));
  const simd::Isa isa = simd::active_isa();
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    if (isa != simd::Isa::kPortable) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t start = chunk * kChunk;
        simd::backward(isa, simd_dtype<scalar_t>(), g,
                       want_weights_grad ? reinterpret_cast<const void* const*>(inputs.data()) : nullptr, K, w,
                       want_outputs_grad ? reinterpret_cast<void* const*>(grads.data()) : nullptr,
                       want_weights_grad ? partials + chunk * K : nullptr, start, std::min(kChunk, numel - start),
                       stream);
      }
      if (stream) stream_fence();
      return;
    }
    alignas(64) acc_t g_buf[kWidenBuffer<scalar_t>];
    alignas(64) acc_t o_buf[kWidenBuffer<scalar_t>];
    alignas(64) acc_t scaled[kWidenBuffer<scalar_t>];
    std::vector<acc_t> chunk_sums(want_weights_grad ? K : 0);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      std::fill(chunk_sums.begin(), chunk_sums.end(), acc_t(0));
      const int64_t chunk_stop = std::min(numel, (chunk + 1) * kChunk);
      for (int64_t start = chunk * kChunk; start < chunk_stop; start += kTile) {
        const int64_t n = std::min(kTile, chunk_stop - start);
        const acc_t* gt = as_acc(g + start, g_buf, n);
        for (int64_t k = 0; k < K; ++k) {
          if (want_outputs_grad) {
            if (stream) {
              scale_and_stream(grads[k] + start, w[k], gt, n);
            } else if constexpr (kSameType) {
              scale(grads[k] + start, w[k], gt, n);
            } else {
              scale(scaled, w[k], gt, n);
              narrow(grads[k] + start, scaled, n);
            }
          }
          if (want_weights_grad) chunk_sums[k] += dot(gt, as_acc(inputs[k] + start, o_buf, n), n);
        }
      }
      for (int64_t k = 0; k < K && want_weights_grad; ++k) partials[chunk * K + k] = chunk_sums[k];
    }
    if (stream) stream_fence();
  });
}

template <typename scalar_t>
std::vector<const scalar_t*> data_pointers(at::TensorList tensors) {
  std::vector<const scalar_t*> pointers;
  pointers.reserve(tensors.size());
  for (const at::Tensor& t : tensors) pointers.push_back(t.data_ptr<scalar_t>());
  return pointers;
}

at::Tensor mixed_sum_forward_cpu(at::TensorList outputs, const at::Tensor& weights) {
  check_native_inputs(at::Tensor(), outputs, weights, c10::DeviceType::CPU, "fastnas::_mixed_sum_forward");
  at::Tensor out = pooled_empty_like(outputs[0]);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_sum_forward_cpu", [&] {
    forward_kernel<scalar_t>(data_pointers<scalar_t>(outputs), weights.data_ptr<at::opmath_type<scalar_t>>(),
                             out.data_ptr<scalar_t>(), out.numel());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward_cpu(const at::Tensor& grad,
                                                                        at::TensorList outputs,
                                                                        const at::Tensor& weights,
                                                                        bool compute_outputs_grad) {
  const int64_t K =
      check_native_inputs(grad, outputs, weights, c10::DeviceType::CPU, "fastnas::_mixed_sum_backward");
  const int64_t numel = grad.numel();
  BackwardResults results =
      allocate_backward_results(grad, outputs, weights, compute_outputs_grad, &pooled_empty_flat);
  if (results.done) return {results.outputs_grad, results.weights_grad};
  std::vector<at::Tensor>& outputs_grad = results.outputs_grad;  // named, not bound: lambdas capture them
  at::Tensor& weights_grad = results.weights_grad;
  const int64_t num_chunks = (numel + kChunk - 1) / kChunk;
  at::Tensor partials = outputs.empty() ? at::Tensor() : at::empty({num_chunks, K}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t*> grad_pointers;
    for (at::Tensor& t : outputs_grad) grad_pointers.push_back(t.data_ptr<scalar_t>());
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), data_pointers<scalar_t>(outputs),
                              weights.data_ptr<acc_t>(), K, grad_pointers,
                              partials.defined() ? partials.data_ptr<acc_t>() : nullptr, numel);
    if (!outputs.empty()) {
      // second stage: chunk partials summed in index order, in double, so d w is deterministic
      const acc_t* p = partials.data_ptr<acc_t>();
      acc_t* dw = weights_grad.data_ptr<acc_t>();
      for (int64_t k = 0; k < K; ++k) {
        double sum = 0.0;
        for (int64_t c = 0; c < num_chunks; ++c) sum += static_cast<double>(p[c * K + k]);
        dw[k] = static_cast<acc_t>(sum);
      }
    }
  });
  return {outputs_grad, weights_grad};
}

// Settings of the CPU kernels: the instruction-set level ("avx512", "avx2" or "portable", capped by what
// the CPU has) and the size above which results are streamed; fastnas.backend sets them from
// FASTNAS_CPU_ISA and FASTNAS_CPU_STREAM_BYTES when the extension loads, tests and benchmarks to
// compare levels. Returns the settings in force after the call.
std::tuple<std::string, int64_t> cpu_settings(std::optional<std::string> isa, std::optional<int64_t> stream_above_bytes) {
  if (isa.has_value()) {
    simd::Isa level;
    TORCH_CHECK_VALUE(simd::isa_from_name(isa->c_str(), &level),
                      "fastnas::_cpu_settings: isa must be 'avx512', 'avx2' or 'portable', got '", *isa, "'");
    simd::set_isa_limit(level);
  }
  if (stream_above_bytes.has_value()) {
    TORCH_CHECK_VALUE(*stream_above_bytes >= 0, "fastnas::_cpu_settings: stream_above_bytes must be >= 0");
    stream_threshold().store(*stream_above_bytes, std::memory_order_relaxed);
  }
  return {simd::isa_name(simd::active_isa()), stream_threshold().load(std::memory_order_relaxed)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def("_cpu_settings(str? isa=None, int? stream_above_bytes=None) -> (str, int)", &cpu_settings);
}

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("_mixed_sum_forward", &mixed_sum_forward_cpu);
  m.impl("_mixed_sum_backward", &mixed_sum_backward_cpu);
}

}  // namespace fastnas
