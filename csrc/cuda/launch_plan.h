// What the CUDA kernels of the mixed sum run, decided on the host: plain C++, no CUDA dependency, so
// the CPU build compiles it too and tests it through fastnas::_cuda_launch_plan (launch_plan_op.cpp).
// The kernels (mixed_sum_kernels.cuh) include it for the constants and the index arithmetic they
// share with the host.
//
// The work of one launch, for every tensor alike (the K inputs, g, y, the K input gradients):
//   vector   16 bytes, V = 16 / element size elements; vector i holds elements [i V, i V + V).
//            The last one is partial when V does not divide numel (its thread walks it element by
//            element).
//   tile     kThreads consecutive vectors, one per thread of a block (thread t: vector tile * kThreads + t).
//   unit     tiles_per_unit consecutive tiles: one column entry of the weight gradient's partial sums.
//            The backward reduces each unit in a fixed order into its entry, and the last block to
//            finish adds the entries in a fixed order. tiles_per_unit and the number of units depend on
//            numel and the element size only (never on the device), so the weight gradient is the same,
//            bit for bit, whatever the grid, the GPU model, its multiprocessor count or the alignment.
//   grid     min(units, multiprocessors x resident blocks per multiprocessor): a persistent grid, each
//            block takes units blockIdx.x, blockIdx.x + grid, ... (the forward: tiles likewise).
// Inputs are loaded kGroup at a time (all kGroup loads issued before the first use); a launch takes
// up to kMaxInputsPerLaunch inputs, so K = 112 is one launch and larger K several.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTNAS_HOST_DEVICE __host__ __device__
#else
#define FASTNAS_HOST_DEVICE
#endif

namespace fastnas {
namespace cuda_plan {

constexpr int kThreads = 256;                // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kVectorBytes = 16;             // one 128-bit load or store
constexpr int kGroup = 8;                    // inputs whose loads are in flight together
constexpr int kMaxInputsPerLaunch = 128;     // input (and input-gradient) pointers in a launch's arguments
constexpr int64_t kMaxUnits = 65536;         // rows of weight-gradient partial sums (bounds the workspace)

FASTNAS_HOST_DEVICE constexpr int vector_elements(int element_size) { return kVectorBytes / element_size; }

// How many elements past the previous 16-byte boundary a tensor starts (0: 16-byte aligned). The kernels
// read such a tensor with aligned 16-byte loads and shift the bytes into place.
FASTNAS_HOST_DEVICE constexpr int element_shift(std::uintptr_t address, int element_size) {
  return static_cast<int>(address % kVectorBytes) / element_size;
}

// The 16 bytes that start `shift` bytes (0..15) into the 32 bytes lo, hi (little-endian 32-bit words):
// how the kernels realign a vector of a tensor that does not start on a 16-byte boundary, from the two
// aligned vectors around it. Word selects and 64-bit shifts (funnel shifts on the GPU), no local memory.
FASTNAS_HOST_DEVICE inline void shift_bytes(const std::uint32_t (&lo)[4], const std::uint32_t (&hi)[4], unsigned shift,
                                            std::uint32_t (&out)[4]) {
  const std::uint32_t w[8] = {lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
  const unsigned words = shift / 4;
  const unsigned bits = (shift % 4) * 8;
  std::uint32_t d[5];  // w[words], ..., w[words + 4]
  for (int i = 0; i < 5; ++i) {
    const std::uint32_t even = (words & 1) ? w[i + 1] : w[i];
    const std::uint32_t odd = (words & 1) ? w[i + 3] : w[i + 2];
    d[i] = (words & 2) ? odd : even;
  }
  for (int i = 0; i < 4; ++i) {
    out[i] = static_cast<std::uint32_t>(((static_cast<std::uint64_t>(d[i + 1]) << 32) | d[i]) >> bits);
  }
}

FASTNAS_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launches for K inputs and the inputs of launch `index`: launches after the first run in the same
// stream, the forward on a running sum, the backward on its own range of inputs.
constexpr int64_t num_launches(int64_t num_inputs) { return ceil_div(num_inputs, kMaxInputsPerLaunch); }
constexpr int64_t inputs_of_launch(int64_t num_inputs, int64_t index) {
  return std::min<int64_t>(kMaxInputsPerLaunch, num_inputs - index * kMaxInputsPerLaunch);
}

// The largest grid any launch may use (0: no cap), set by fastnas::_cuda_settings for tests that show
// that results do not depend on the grid (defined in launch_plan_op.cpp).
int64_t max_grid_for_tests();

// Warps of the last block that share one input's row of unit sums in the final sum of the backward: a
// power of two, as many as leave every input a share, so that few inputs still keep the block reading.
FASTNAS_HOST_DEVICE constexpr int final_sum_warps_per_input(int num_inputs) {
  int warps = kWarps;
  while (warps > 1 && warps * num_inputs > kWarps) warps /= 2;
  return warps;
}

struct LaunchPlan {
  int vector_elements = 0;      // V
  int64_t full_vectors = 0;     // numel / V
  int tail = 0;                 // numel % V: elements of the partial last vector
  int64_t tiles = 0;
  int64_t tiles_per_unit = 0;   // backward with weight gradient; 1 otherwise
  int64_t units = 0;            // work items of the grid: units of tiles (rows of partials) or tiles
  int64_t grid = 0;             // blocks
  bool shifted_loads = false;   // some input (or g) is not 16-byte aligned: the kernel that shifts
  int64_t partials_stride = 0;  // units rounded up to whole 16-byte vectors of the accumulation type
  int64_t partials_bytes = 0;   // workspace of one launch's [inputs, partials_stride] unit sums (0 without)
};

// The plan of one launch over numel elements of element_size bytes, with num_inputs inputs (one
// launch's share) and resident_blocks = multiprocessors x resident blocks per multiprocessor of the
// chosen kernel. address_bits: the OR of every input's (and g's) address; outputs are allocated here and
// always 16-byte aligned. accumulation_size: bytes of the accumulation type.
inline LaunchPlan plan_launch(int64_t numel, int64_t num_inputs, int element_size, int accumulation_size,
                              bool weights_grad, std::uintptr_t address_bits, int64_t resident_blocks) {
  LaunchPlan plan;
  plan.vector_elements = vector_elements(element_size);
  plan.full_vectors = numel / plan.vector_elements;
  plan.tail = static_cast<int>(numel % plan.vector_elements);
  plan.tiles = ceil_div(plan.full_vectors + (plan.tail > 0 ? 1 : 0), kThreads);
  plan.tiles_per_unit = weights_grad ? std::max<int64_t>(1, ceil_div(plan.tiles, kMaxUnits)) : 1;
  plan.units = ceil_div(plan.tiles, plan.tiles_per_unit);
  plan.grid = std::max<int64_t>(1, std::min(plan.units, std::max<int64_t>(1, resident_blocks)));
  plan.shifted_loads = element_shift(address_bits, 1) != 0;
  const int sums_per_vector = kVectorBytes / accumulation_size;
  plan.partials_stride = ceil_div(plan.units, sums_per_vector) * sums_per_vector;
  plan.partials_bytes = weights_grad ? plan.partials_stride * num_inputs * accumulation_size : 0;
  return plan;
}

}  // namespace cuda_plan
}  // namespace fastnas
