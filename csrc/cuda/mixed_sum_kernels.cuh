// Device code of the CUDA mixed sum: kernels and their argument structs, without ATen, so that a test
// compiles this header alone (tests/cuda/instantiate_kernels.cu) and reads what ptxas and cuobjdump say
// of every kernel. The launcher is mixed_sum_cuda.cu; the work decomposition (vectors, tiles, units,
// grid) is described and computed in launch_plan.h.
//
// Element types: float, double, __half, __nv_bfloat16; arithmetic in float (double for double).
//
// Loads: every tensor is read in 16-byte vectors, kGroup inputs at a time, every load of a group issued
// before the first arithmetic on it. An input (or g) that does not start on a 16-byte boundary is read
// by the *shifted* kernels with two aligned 16-byte loads per vector (the second is the neighbouring
// thread's first: more L1 traffic, no more DRAM traffic), whose bytes are shifted into place (funnel
// shifts); aligned inputs of the same call keep one load per vector. The outputs are allocated by the
// launcher and always aligned, so every store is a 16-byte store.
//
// Rounding, fixed by the element index alone (whatever the grid, GPU model, multiprocessor count, build
// or alignment path):
//   forward    acc = fma(w_k, o_k, acc) for k = 0, 1, ..., K - 1 from acc = 0, then one rounding to the
//              output type (launches after the first continue from the stored acc exactly);
//   d o_k      w_k * g, one product in the accumulation type rounded once to the element type;
//   d w_k      thread:  s = fma(g[e], o_k[e], s) over the V elements of its vector, e = 0, 1, ...;
//              warp:    butterfly over the 32 lanes (xor offsets 16, 8, 4, 2, 1);
//              unit:    the warps' sums added over the unit's tiles in order, then warps 0..7 in order;
//              total:   the last block adds the units' sums in an order fixed by the number of units and
//                       inputs (sum_unit_partials).
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
  static constexpr int kVector = cuda_plan::vector_elements(sizeof(T));
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
      shift = static_cast<unsigned>(cuda_plan::element_shift(address, 1));  // in bytes
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
    if constexpr (kShifted) {
      const uint32_t lo[4] = {a.x, a.y, a.z, a.w};
      const uint32_t hi[4] = {b.x, b.y, b.z, b.w};
      uint32_t out[4];
      cuda_plan::shift_bytes(lo, hi, shift, out);
      return make_uint4(out[0], out[1], out[2], out[3]);
    }
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
// the partner's copy of the half it keeps. Lane l returns the sum of value l / (32 / N), as do the
// other lanes of its run of 32 / N.
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

// Register budgets, so that ptxas neither spills nor trades occupancy on its own: at least 3 resident blocks
// per multiprocessor (<= 85 registers) for the unshifted kernels, 2 (<= 128) for the shifted ones, which
// hold two loads per input. (Without them ptxas capped one kernel at 80 registers and spilled.)
template <bool kShifted>
constexpr int kMinBlocks = kShifted ? 2 : 3;

template <typename T, bool kShifted>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kShifted>)
    mixed_sum_forward_kernel(const __grid_constant__ ForwardParams<T> p) {
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
  Acc* partials;                         // [num_inputs][partials_stride]: one sum per input and unit
  Acc* weights_grad;                     // this launch's d w_k
  unsigned int* arrivals;                // blocks done: 0 on entry, set back to 0 by the last block
  int64_t full_vectors;                  // numel / V
  int64_t tiles;
  int64_t tiles_per_unit;
  int64_t units;
  int64_t partials_stride;               // units rounded up to whole 16-byte vectors, the rest zeros
  int num_inputs;                        // 1..kMaxInputsPerLaunch
  int tail;                              // numel % V
  bool want_inputs_grad;
  bool want_weights_grad;
};

// The last block's final sum: weights_grad[k] = the sum of row k of partials, units 0..units-1 (the
// row is padded with zeros to `stride`, a whole number of 16-byte vectors). With fewer inputs than warps,
// warps share a row (segments: chunk c of kChunk units goes to segment c mod segments), so that the whole
// block reads. Each lane keeps kLoads 16-byte loads in flight, sums each vector in order into partial sum
// j (its load j of every chunk), adds the kLoads partial sums as a tree, then a butterfly over the lanes;
// the segments' sums are added in segment order. Every thread of the block calls it.
template <typename Acc>
__device__ void sum_unit_partials(const Acc* partials, int64_t units, int64_t stride, int n, Acc* weights_grad,
                                  Acc (*s_segment_sums)[kMaxInputsPerLaunch]) {
  using AccE = Element<Acc>;
  constexpr int P = AccE::kVector;  // sums per 16-byte vector
  constexpr int kLoads = 8;
  constexpr int64_t kChunk = 32 * P * kLoads;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int segments = cuda_plan::final_sum_warps_per_input(n);
  const int segment = warp % segments;
  for (int k = warp / segments; k < n; k += kWarps / segments) {
    const Acc* row = partials + k * stride;
    Acc part[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) part[j] = Acc(0);
    for (int64_t chunk = segment * kChunk; chunk < units; chunk += segments * kChunk) {
      uint4 raw[kLoads];
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int64_t u = chunk + (j * 32 + lane) * P;
        raw[j] = make_uint4(0u, 0u, 0u, 0u);
        if (u < units) raw[j] = __ldcg(reinterpret_cast<const uint4*>(row + u));  // L2: written by other blocks
      }
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        Acc x[P];
        AccE::unpack(raw[j], x);
        Acc s = x[0];
#pragma unroll
        for (int e = 1; e < P; ++e) s += x[e];
        part[j] += s;
      }
    }
#pragma unroll
    for (int width = kLoads / 2; width > 0; width /= 2) {
#pragma unroll
      for (int j = 0; j < width; ++j) part[j] += part[j + width];
    }
    const Acc total = warp_sum(part[0]);
    if (lane == 0) s_segment_sums[segment][k] = total;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < n; k += kThreads) {
    Acc total = s_segment_sums[0][k];
    for (int segment_index = 1; segment_index < segments; ++segment_index) total += s_segment_sums[segment_index][k];
    weights_grad[k] = total;
  }
}

template <typename T, bool kShifted>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kShifted>)
    mixed_sum_backward_kernel(const __grid_constant__ BackwardParams<T> p) {
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
        Acc* row = p.partials + k * p.partials_stride;
        row[unit] = s;
        if (unit == p.units - 1) {  // zeros up to the stride: the final sum reads whole vectors
          for (int64_t pad = p.units; pad < p.partials_stride; ++pad) row[pad] = Acc(0);
        }
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
  sum_unit_partials(p.partials, p.units, p.partials_stride, n, p.weights_grad, s_sums);
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
