// AVX-512 and AVX2 kernels of the mixed sum (see mixed_sum_simd.h). The kernel bodies live in
// mixed_sum_simd_kernels.inc, compiled twice below: once per instruction set, each inside its own
// `#pragma GCC target` region and namespace, with that set's vector traits. Only <immintrin.h> and
// C headers are included, all before the first region.
#include "cpu/mixed_sum_simd.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <atomic>
#include <initializer_list>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTNAS_NO_SIMD)
#define FASTNAS_X86_SIMD 1
#include <immintrin.h>
#else
#define FASTNAS_X86_SIMD 0
#endif

namespace fastnas {
namespace simd {

#if FASTNAS_X86_SIMD

// Scalar conversions shared by both regions (the compiler inlines them into either).
namespace scalar {
inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
// Round to nearest even, NaN to the canonical quiet NaN: bit-exact with c10::BFloat16.
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
}  // namespace scalar

// ------------------------------------------------------------------ AVX-512 (F, BW, VL, DQ) + FMA

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

constexpr int kBackwardGroup = 8;  // 8 weights + 8 sums + 2 vectors of g in 32 registers

struct F32 {
  using scalar = float;
  using acc = float;
  using V = __m512;
  static constexpr int kWidth = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static V load_acc(const float* p) { return _mm512_loadu_ps(p); }
  static void store_acc(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(V v) { return _mm512_reduce_add_ps(v); }
  static float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static float to_acc(float x) { return x; }
  static float from_acc(float x) { return x; }
};

struct F64 {
  using scalar = double;
  using acc = double;
  using V = __m512d;
  static constexpr int kWidth = 8;
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm512_stream_pd(p, v); }
  static V load_acc(const double* p) { return _mm512_loadu_pd(p); }
  static void store_acc(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V zero() { return _mm512_setzero_pd(); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static double reduce(V v) { return _mm512_reduce_add_pd(v); }
  static double fma(double a, double b, double c) { return __builtin_fma(a, b, c); }
  static double to_acc(double x) { return x; }
  static double from_acc(double x) { return x; }
};

// 16-bit storage, float32 arithmetic: 16 halves (32 bytes) per vector.
struct Half16Base {
  using acc = float;
  using V = __m512;
  static constexpr int kWidth = 16;
  static V load_acc(const float* p) { return _mm512_loadu_ps(p); }
  static void store_acc(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(V v) { return _mm512_reduce_add_ps(v); }
  static float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

struct F16 : Half16Base {
  using scalar = uint16_t;
  static V load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m256i narrow(V v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store(uint16_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static void stream(uint16_t* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static float to_acc(uint16_t x) { return _cvtsh_ss(x); }
  static uint16_t from_acc(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
};

struct BF16 : Half16Base {
  using scalar = uint16_t;
  static V load(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static __m256i narrow(V v) {  // round to nearest even; NaN to 0x7fc0, as scalar::float_to_bf16
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
  }
  static void store(uint16_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static void stream(uint16_t* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static float to_acc(uint16_t x) { return scalar::bf16_to_float(x); }
  static uint16_t from_acc(float x) { return scalar::float_to_bf16(x); }
};

#include "cpu/mixed_sum_simd_kernels.inc"

#pragma GCC pop_options
}  // namespace avx512

// ------------------------------------------------------------------ AVX2 + FMA + F16C

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

constexpr int kBackwardGroup = 4;  // 4 weights + 4 sums + up to 4 vectors of g fit in 16 registers; 8 spilled

inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct F32 {
  using scalar = float;
  using acc = float;
  using V = __m256;
  static constexpr int kWidth = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static V load_acc(const float* p) { return _mm256_loadu_ps(p); }
  static void store_acc(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce(V v) { return reduce8(v); }
  static float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static float to_acc(float x) { return x; }
  static float from_acc(float x) { return x; }
};

struct F64 {
  using scalar = double;
  using acc = double;
  using V = __m256d;
  static constexpr int kWidth = 4;
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm256_stream_pd(p, v); }
  static V load_acc(const double* p) { return _mm256_loadu_pd(p); }
  static void store_acc(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V zero() { return _mm256_setzero_pd(); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static double reduce(V v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static double fma(double a, double b, double c) { return __builtin_fma(a, b, c); }
  static double to_acc(double x) { return x; }
  static double from_acc(double x) { return x; }
};

// 16-bit storage, float32 arithmetic: 8 halves (16 bytes) per vector.
struct Half8Base {
  using acc = float;
  using V = __m256;
  static constexpr int kWidth = 8;
  static V load_acc(const float* p) { return _mm256_loadu_ps(p); }
  static void store_acc(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce(V v) { return reduce8(v); }
  static float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

struct F16 : Half8Base {
  using scalar = uint16_t;
  static V load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m128i narrow(V v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store(uint16_t* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
  static void stream(uint16_t* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
  static float to_acc(uint16_t x) { return _cvtsh_ss(x); }
  static uint16_t from_acc(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
};

struct BF16 : Half8Base {
  using scalar = uint16_t;
  static V load(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static __m128i narrow(V v) {  // round to nearest even; NaN to 0x7fc0, as scalar::float_to_bf16
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    // packus works per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7]; 64-bit words 0 and 2 hold r0..7
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    return _mm256_castsi256_si128(packed);
  }
  static void store(uint16_t* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
  static void stream(uint16_t* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
  static float to_acc(uint16_t x) { return scalar::bf16_to_float(x); }
  static uint16_t from_acc(float x) { return scalar::float_to_bf16(x); }
};

#include "cpu/mixed_sum_simd_kernels.inc"

#pragma GCC pop_options
}  // namespace avx2

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  // every CPU with AVX2 and FMA (Haswell, Zen and later) also has F16C
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kPortable;
}

#else

Isa detect_isa() { return Isa::kPortable; }

#endif  // FASTNAS_X86_SIMD

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

bool isa_from_name(const char* name, Isa* isa) {
  for (Isa level : {Isa::kAvx512, Isa::kAvx2, Isa::kPortable}) {
    if (name != nullptr && strcasecmp(name, isa_name(level)) == 0) {  // any case: AVX2 is avx2
      *isa = level;
      return true;
    }
  }
  return false;
}

namespace {

// The best level this CPU supports and this build compiled (fastnas::_cpu_settings lowers the level in
// use: fastnas.backend sets FASTNAS_CPU_ISA's cap when the extension loads).
Isa supported_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

std::atomic<int>& isa_limit() {
  static std::atomic<int> limit{static_cast<int>(Isa::kAvx512)};
  return limit;
}

}  // namespace

Isa active_isa() {
  const int limit = isa_limit().load(std::memory_order_relaxed);
  const int supported = static_cast<int>(supported_isa());
  return static_cast<Isa>(limit < supported ? limit : supported);
}

void set_isa_limit(Isa limit) { isa_limit().store(static_cast<int>(limit), std::memory_order_relaxed); }

void forward(Isa isa, Dtype dtype, const void* const* inputs, int64_t K, const void* weights, void* out,
             int64_t offset, int64_t n, bool stream) {
#if FASTNAS_X86_SIMD
  if (isa == Isa::kAvx512) return avx512::forward(dtype, inputs, K, weights, out, offset, n, stream);
  if (isa == Isa::kAvx2) return avx2::forward(dtype, inputs, K, weights, out, offset, n, stream);
#endif
  abort();  // kPortable never comes here (see mixed_sum_simd.h)
}

void backward(Isa isa, Dtype dtype, const void* g, const void* const* inputs, int64_t K, const void* weights,
              void* const* grads, void* sums, int64_t offset, int64_t n, bool stream) {
#if FASTNAS_X86_SIMD
  if (isa == Isa::kAvx512) return avx512::backward(dtype, g, inputs, K, weights, grads, sums, offset, n, stream);
  if (isa == Isa::kAvx2) return avx2::backward(dtype, g, inputs, K, weights, grads, sums, offset, n, stream);
#endif
  abort();  // kPortable never comes here (see mixed_sum_simd.h)
}

}  // namespace simd
}  // namespace fastnas
