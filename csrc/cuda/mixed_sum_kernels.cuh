// Device code of the CUDA mixed sum: kernels and their argument structs, without ATen, so that a test
// compiles this header alone (tests/cuda/instantiate_kernels.cu) and reads what ptxas and cuobjdump say
// of every kernel. The launcher is mixed_sum_cuda.cu; the work decomposition (vectors, tiles, units,
// grid) is described and computed in launch_plan.h.
//
// Element types: float, double, __half, __nv_bfloat16; arithmetic in float (double for double).
//
// Loads: every tensor is read in 16-byte vectors, kGroup inputs at a time, every load of a group issued
// before the first arithmetic on it. An input (or g) that does not start on a 16-byte boundary is read
// by the *shifted* kernels with two aligned 16-byte loads per vector (the second mostly an L1 hit: the
// neighbouring thread's first), whose bytes are shifted into place (funnel shifts). The outputs are
// allocated by the launcher and always aligned, so every store is a 16-byte store.
//
// Rounding, fixed by the element index alone (whatever the grid, GPU model, multiprocessor count, build
// or alignment path):
//   forward    acc = fma(w_k, o_k, acc) for k = 0, 1, ..., K - 1 from acc = 0, then one rounding to the
//              output type (launches after the first continue from the stored acc exactly);
//   d o_k      w_k * g, one product in the accumulation type rounded once to the element type;
//   d w_k      thread:  s = fma(g[e], o_k[e], s) over the V elements of its vector, e = 0, 1, ...;
//              warp:    butterfly over the 32 lanes (xor offsets 16, 8, 4, 2, 1);
//              unit:    the warps' sums added over the unit's tiles in order, then warps 0..7 in order;
//              total:   lane l of the last block sums units l, l + 32, ... into four interleaved partial
//                       sums (unit index / 32 mod 4), adds them as (p0 + p1) + (p2 + p3), then a butterfly.
//   The units are a function of numel and the element type only (launch_plan.h), so two calls on the
//   same values give the same bits on any GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/launch_plan.h"

namespace fastnas {
namespace cuda_kernels {

using cuda_plan::kGroup;
using cuda_plan::kMaxInputsPerLaunch;
using cuda_plan::kThreads;
using cuda_plan::kWarps;

// ------------------------------------------------------------------------------------- element types

// Element type -> accumulation type, and back with one rounding to nearest even (by overload; the
// extension is built without the 16-bit types' conversion operators).
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void round_to(float x, float& out) { out = x; }
__device__ __forceinline__ void round_to(double x, double& out) { out = x; }
__device__ __forceinline__ void round_to(float x, __half& out) { out = __float2half_rn(x); }
__device__ __forceinline__ void round_to(float x, __nv_bfloat16& out) { out = __float2bfloat16_rn(x); }

// An element type T: its accumulation type, and 16 bytes <-> the V = 16 / sizeof(T) values they hold.
template <typename T>
struct Element {
  using Acc = decltype(to_acc(T()));
  static constexpr int kVector = cuda_plan::kVectorBytes / static_cast<int>(sizeof(T));
  __device__ static T from_acc(Acc x) {
    T out;
    round_to(x, out);
    return out;
  }
  __device__ static void unpack(uint4 raw, Acc (&v)[kVector]) {
    T elements[kVector];
    memcpy(elements, &raw, sizeof(raw));
#pragma unroll
    for (int e = 0; e < kVector; ++e) v[e] = to_acc(elements[e]);
  }
  __device__ static uint4 pack(const Acc (&v)[kVector]) {
    T elements[kVector];
#pragma unroll
    for (int e = 0; e < kVector; ++e) round_to(v[e], elements[e]);
    uint4 raw;
    memcpy(&raw, elements, sizeof(raw));
    return raw;
  }
};

// Explicit roundings, so that no build contracts or splits them differently.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// ------------------------------------------------------------------------------------- 16-byte access

// The 16 bytes starting `shift` bytes into a (a then b): funnel shifts, no local memory.
__device__ __forceinline__ uint4 shift_bytes(uint4 a, uint4 b, unsigned shift) {
  const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  const unsigned words = shift / 4;
  const unsigned bits = (shift % 4) * 8;
  unsigned d[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) {
    const unsigned lo = (words & 1) ? w[i + 1] : w[i];
    const unsigned hi = (words & 1) ? w[i + 3] : w[i + 2];
    d[i] = (words & 2) ? hi : lo;
  }
  return make_uint4(__funnelshift_r(d[0], d[1], bits), __funnelshift_r(d[1], d[2], bits),
                    __funnelshift_r(d[2], d[3], bits), __funnelshift_r(d[3], d[4], bits));
}

// Vector `index` of a tensor in two steps, so that a group's loads are all issued before any use:
// issue() the aligned 16-byte load(s), then value() the 16 bytes. Unshifted kernels need the tensor
// 16-byte aligned; shifted ones take any element-aligned address. Read-only data (non-coherent path).
template <bool kShifted>
struct VectorLoad {
  uint4 a;
  uint4 b;
  unsigned shift;
  __device__ __forceinline__ void issue(const void* tensor, int64_t index) {
    if constexpr (kShifted) {
      const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(tensor);
      shift = static_cast<unsigned>(address % cuda_plan::kVectorBytes);
      const uint4* base = reinterpret_cast<const uint4*>(address - shift) + index;
      a = __ldg(base);
      // The next aligned vector holds the rest; it lies within the 16-byte block of the vector's last
      // element, so it never leaves the tensor's allocation. A predicated load into a zeroed register
      // (b = shift ? load : a would wait for a before the next load issues).
      b = make_uint4(0u, 0u, 0u, 0u);
      if (shift != 0) b = __ldg(base + 1);
    } else {
      a = __ldg(reinterpret_cast<const uint4*>(tensor) + index);
    }
  }
  __device__ __forceinline__ uint4 value() const {
    if constexpr (kShifted) return shift_bytes(a, b, shift);
    return a;
  }
};

__device__ __forceinline__ void store_vector(void* tensor, int64_t index, uint4 value) {
  reinterpret_cast<uint4*>(tensor)[index] = value;
}

// ------------------------------------------------------------------------------------- reductions

// Sums N values over the warp's 32 lanes (xor butterfly 16, 8, 4, 2, 1 for every value, the same tree as
// a plain butterfly of each value alone) with N - 1 + log2(32 / N) shuffles instead of 5 N: at each of
// the first log2(N) steps a lane keeps half of its values, sends the other half to its partner and adds
// the partner's copy of the half it keeps. Lane l returns the sum of value (l / (32 / N)); lanes
// l, l ^ 1, ... hold copies of it.
template <int N, typename A>
__device__ __forceinline__ A transposed_warp_sum(const A (&values)[N]) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N: a power of two up to 32");
  const int lane = threadIdx.x % 32;
  A v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = values[i];
  int offset = 16;
#pragma unroll
  for (int count = N; count > 1; count /= 2, offset /= 2) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < count / 2; ++i) {
      const A keep = upper ? v[i + count / 2] : v[i];
      const A send = upper ? v[i] : v[i + count / 2];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
  }
#pragma unroll
  for (; offset > 0; offset /= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
  return v[0];
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  const A values[1] = {v};
  return transposed_warp_sum<1>(values);
}

// ------------------------------------------------------------------------------------- forward

template <typename T>
struct ForwardParams {
  using Acc = typename Element<T>::Acc;
  const T* inputs[kMaxInputsPerLaunch];  // this launch's o_k
  const Acc* weights;                    // this launch's w_k
  const Acc* running_in;                 // sum over the earlier launches' inputs, or nullptr
  Acc* running_out;                      // sum for the next launch, or nullptr: write out
  T* out;                                // y
  int64_t full_vectors;                  // numel / V
  int64_t tiles;
  int num_inputs;                        // 1..kMaxInputsPerLaunch
  int tail;                              // numel % V
};

template <typename T, bool kShifted>
__global__ void __launch_bounds__(kThreads) mixed_sum_forward_kernel(const __grid_constant__ ForwardParams<T> p) {
  using E = Element<T>;
  using Acc = typename E::Acc;
  using AccE = Element<Acc>;
  constexpr int V = E::kVector;
  constexpr int kRunningVectors = V / AccE::kVector;  // 16-byte vectors of the running sum per vector
  __shared__ Acc s_w[kMaxInputsPerLaunch];
  const int n = p.num_inputs;
  for (int k = threadIdx.x; k < n; k += kThreads) s_w[k] = p.weights[k];
  __syncthreads();

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t v = tile * kThreads + threadIdx.x;
    if (v < p.full_vectors) {
      Acc acc[V];
      if (p.running_in != nullptr) {
#pragma unroll
        for (int h = 0; h < kRunningVectors; ++h) {  // written by the previous launch: coherent loads
          Acc part[AccE::kVector];
          AccE::unpack(reinterpret_cast<const uint4*>(p.running_in)[v * kRunningVectors + h], part);
#pragma unroll
          for (int e = 0; e < AccE::kVector; ++e) acc[h * AccE::kVector + e] = part[e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = Acc(0);
      }
      for (int base = 0; base < n; base += kGroup) {
        VectorLoad<kShifted> x[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (base + j < n) x[j].issue(p.inputs[base + j], v);
        }
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (base + j < n) {
            Acc xv[V];
            E::unpack(x[j].value(), xv);
            const Acc w = s_w[base + j];
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = fma_rn(w, xv[e], acc[e]);
          }
        }
      }
      if (p.running_out != nullptr) {
#pragma unroll
        for (int h = 0; h < kRunningVectors; ++h) {
          Acc part[AccE::kVector];
#pragma unroll
          for (int e = 0; e < AccE::kVector; ++e) part[e] = acc[h * AccE::kVector + e];
          store_vector(p.running_out, v * kRunningVectors + h, AccE::pack(part));
        }
      } else {
        store_vector(p.out, v, E::pack(acc));  // rounds to T
      }
    } else if (v == p.full_vectors && p.tail > 0) {  // the partial last vector, element by element
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (e >= p.tail) break;
        const int64_t i = v * V + e;
        Acc acc = p.running_in != nullptr ? p.running_in[i] : Acc(0);
        for (int k = 0; k < n; ++k) acc = fma_rn(s_w[k], to_acc(__ldg(p.inputs[k] + i)), acc);
        if (p.running_out != nullptr) {
          p.running_out[i] = acc;
        } else {
          p.out[i] = E::from_acc(acc);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------- backward

template <typename T>
struct BackwardParams {
  using Acc = typename Element<T>::Acc;
  const T* inputs[kMaxInputsPerLaunch];  // this launch's o_k (without weights grad: unused)
  T* inputs_grad[kMaxInputsPerLaunch];   // this launch's d o_k (without inputs grad: unused)
  const T* grad;                         // g
  const Acc* weights;                    // this launch's w_k
  Acc* partials;                         // [num_inputs][units]: one sum per input and unit
  Acc* weights_grad;                     // this launch's d w_k
  unsigned int* arrivals;                // blocks done: 0 on entry, set back to 0 by the last block
  int64_t full_vectors;                  // numel / V
  int64_t tiles;
  int64_t tiles_per_unit;
  int64_t units;
  int num_inputs;                        // 1..kMaxInputsPerLaunch
  int tail;                              // numel % V
  bool want_inputs_grad;
  bool want_weights_grad;
};

template <typename T, bool kShifted>
__global__ void __launch_bounds__(kThreads) mixed_sum_backward_kernel(const __grid_constant__ BackwardParams<T> p) {
  using E = Element<T>;
  using Acc = typename E::Acc;
  constexpr int V = E::kVector;
  constexpr int kLanesPerSum = 32 / kGroup;  // lanes holding copies of one transposed_warp_sum result
  __shared__ Acc s_w[kMaxInputsPerLaunch];
  __shared__ Acc s_sums[kWarps][kMaxInputsPerLaunch];  // per warp: this unit's sums so far
  __shared__ bool s_last_block;
  const int n = p.num_inputs;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int k = threadIdx.x; k < n; k += kThreads) s_w[k] = p.weights[k];
  __syncthreads();

  for (int64_t unit = blockIdx.x; unit < p.units; unit += gridDim.x) {
    if (p.want_weights_grad) {
      for (int k = lane; k < n; k += 32) s_sums[warp][k] = Acc(0);
      __syncwarp();
    }
    const int64_t first_tile = unit * p.tiles_per_unit;
    const int64_t end_tile = first_tile + p.tiles_per_unit < p.tiles ? first_tile + p.tiles_per_unit : p.tiles;
    for (int64_t tile = first_tile; tile < end_tile; ++tile) {
      const int64_t v = tile * kThreads + threadIdx.x;
      const bool full = v < p.full_vectors;
      const int tail = v == p.full_vectors ? p.tail : 0;  // elements of a partial last vector
      // g: issued now, unpacked (again) in each group once the group's loads are issued too
      VectorLoad<kShifted> g_load;
      if (full) g_load.issue(p.grad, v);
      for (int base = 0; base < n; base += kGroup) {
        Acc dot[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) dot[j] = Acc(0);
        if (full) {
          VectorLoad<kShifted> x[kGroup];
          if (p.want_weights_grad) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (base + j < n) x[j].issue(p.inputs[base + j], v);
            }
          }
          Acc g[V];
          E::unpack(g_load.value(), g);
          if (p.want_inputs_grad) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (base + j < n) {
                const Acc w = s_w[base + j];
                Acc d[V];
#pragma unroll
                for (int e = 0; e < V; ++e) d[e] = mul_rn(w, g[e]);
                store_vector(p.inputs_grad[base + j], v, E::pack(d));
              }
            }
          }
          if (p.want_weights_grad) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (base + j < n) {
                Acc xv[V];
                E::unpack(x[j].value(), xv);
#pragma unroll
                for (int e = 0; e < V; ++e) dot[j] = fma_rn(g[e], xv[e], dot[j]);
              }
            }
          }
        } else if (tail > 0) {  // the partial last vector, element by element, in the same order
#pragma unroll
          for (int e = 0; e < V; ++e) {
            if (e >= tail) break;
            const int64_t i = v * V + e;
            const Acc g = to_acc(__ldg(p.grad + i));
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              const int k = base + j;
              if (k >= n) break;
              if (p.want_inputs_grad) p.inputs_grad[k][i] = E::from_acc(mul_rn(s_w[k], g));
              if (p.want_weights_grad) dot[j] = fma_rn(g, to_acc(__ldg(p.inputs[k] + i)), dot[j]);
            }
          }
        }
        if (p.want_weights_grad) {  // uniform over the grid: every lane of the warp is here
          const Acc s = transposed_warp_sum<kGroup>(dot);
          const int k = base + lane / kLanesPerSum;
          if (lane % kLanesPerSum == 0 && k < n) s_sums[warp][k] += s;
        }
      }
    }
    if (p.want_weights_grad) {
      __syncthreads();
      for (int k = threadIdx.x; k < n; k += kThreads) {
        Acc s = s_sums[0][k];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) s += s_sums[w][k];
        p.partials[k * p.units + unit] = s;
      }
      __syncthreads();
    }
  }
  if (!p.want_weights_grad) return;

  // The last block to finish adds the units' sums. Every block makes its partials visible device-wide
  // before it counts itself done; the last one reads them from L2 (not L1).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last_block = atomicAdd(p.arrivals, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last_block) return;
  __threadfence();
  if (threadIdx.x == 0) *p.arrivals = 0u;  // no other block of this launch touches it again
  for (int k = warp; k < n; k += kWarps) {
    const Acc* column = p.partials + k * p.units;
    Acc part0 = Acc(0), part1 = Acc(0), part2 = Acc(0), part3 = Acc(0);
    int64_t r = lane;
    for (; r + 96 < p.units; r += 128) {
      part0 += __ldcg(column + r);
      part1 += __ldcg(column + r + 32);
      part2 += __ldcg(column + r + 64);
      part3 += __ldcg(column + r + 96);
    }
    if (r < p.units) part0 += __ldcg(column + r);
    if (r + 32 < p.units) part1 += __ldcg(column + r + 32);
    if (r + 64 < p.units) part2 += __ldcg(column + r + 64);
    const Acc total = warp_sum((part0 + part1) + (part2 + part3));
    if (lane == 0) p.weights_grad[k] = total;
  }
}

// ------------------------------------------------------------------------------------- kernel table

// Every kernel the launcher can choose for element type T; instantiating the table compiles them all.
template <typename T>
struct Kernels {
  using Forward = void (*)(ForwardParams<T>);
  using Backward = void (*)(BackwardParams<T>);
  Forward forward[2];    // [shifted]
  Backward backward[2];  // [shifted]
};

template <typename T>
inline Kernels<T> kernels() {
  return {{mixed_sum_forward_kernel<T, false>, mixed_sum_forward_kernel<T, true>},
          {mixed_sum_backward_kernel<T, false>, mixed_sum_backward_kernel<T, true>}};
}

}  // namespace cuda_kernels
}  // namespace fastnas
