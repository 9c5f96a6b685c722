// Test-only ops of the CUDA launch planning (launch_plan.h), compiled into every build, with or without
// the CUDA kernels, so that the host decisions are tested on any machine:
//   _cuda_launch_plan(...)            the plan of a call, field by field;
//   _cuda_shift_bytes(words, shift)   the kernels' realignment of a vector (shift_bytes), run on the CPU;
//   _cuda_settings(int? max_grid)     caps the grid of every CUDA launch (0: no cap; None: unchanged) and
//                                     returns the cap in force; tests use it to show that results do not
//                                     depend on the grid.
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/launch_plan.h"

namespace fastnas {
namespace cuda_plan {

namespace {
std::atomic<int64_t> max_grid{0};
}  // namespace

int64_t max_grid_for_tests() { return max_grid.load(std::memory_order_relaxed); }

}  // namespace cuda_plan

namespace {

using cuda_plan::ceil_div;
using cuda_plan::element_shift;
using cuda_plan::inputs_of_launch;
using cuda_plan::kGroup;
using cuda_plan::kVectorBytes;
using cuda_plan::LaunchPlan;
using cuda_plan::num_launches;
using cuda_plan::plan_launch;

using PlanFields = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, bool, std::vector<int64_t>, int64_t, int64_t, int64_t>;

PlanFields cuda_launch_plan(int64_t numel, int64_t num_inputs, int64_t element_size, bool weights_grad,
                            c10::IntArrayRef addresses, int64_t multiprocessors,
                            int64_t blocks_per_multiprocessor) {
  const char* op = "fastnas::_cuda_launch_plan";
  TORCH_CHECK_VALUE(element_size == 2 || element_size == 4 || element_size == 8, op,
                    ": element_size must be 2, 4 or 8, got ", element_size);
  TORCH_CHECK_VALUE(numel >= 0 && num_inputs >= 1, op, ": need numel >= 0 and num_inputs >= 1");
  TORCH_CHECK_VALUE(multiprocessors >= 1 && blocks_per_multiprocessor >= 1, op,
                    ": multiprocessors and blocks_per_multiprocessor must be >= 1");
  std::uintptr_t address_bits = 0;
  std::vector<int64_t> shifts;
  for (const int64_t address : addresses) {
    TORCH_CHECK_VALUE(address >= 0 && address % element_size == 0, op,
                      ": addresses must be non-negative multiples of element_size, got ", address);
    address_bits |= static_cast<std::uintptr_t>(address);
    shifts.push_back(element_shift(static_cast<std::uintptr_t>(address), static_cast<int>(element_size)));
  }
  const int64_t first_launch_inputs = inputs_of_launch(num_inputs, 0);
  const int accumulation_size = element_size == 8 ? 8 : 4;
  const LaunchPlan plan =
      plan_launch(numel, first_launch_inputs, static_cast<int>(element_size), accumulation_size, weights_grad,
                  address_bits, multiprocessors * blocks_per_multiprocessor);
  return {plan.vector_elements, plan.full_vectors,   plan.tail,          plan.tiles,
          plan.tiles_per_unit,  plan.units,          plan.grid,          num_launches(num_inputs),
          first_launch_inputs,  ceil_div(first_launch_inputs, kGroup), plan.shifted_loads,
          shifts,               plan.partials_stride, plan.partials_bytes,
          cuda_plan::final_sum_warps_per_input(static_cast<int>(first_launch_inputs))};
}

std::vector<int64_t> cuda_shift_bytes(c10::IntArrayRef words, int64_t shift) {
  const char* op = "fastnas::_cuda_shift_bytes";
  TORCH_CHECK_VALUE(words.size() == 8, op, ": words must hold 8 32-bit words, got ", words.size());
  TORCH_CHECK_VALUE(shift >= 0 && shift < kVectorBytes, op, ": shift must be in [0, 16), got ", shift);
  std::uint32_t lo[4], hi[4], out[4];
  for (int i = 0; i < 4; ++i) {
    lo[i] = static_cast<std::uint32_t>(words[i]);
    hi[i] = static_cast<std::uint32_t>(words[i + 4]);
  }
  cuda_plan::shift_bytes(lo, hi, static_cast<unsigned>(shift), out);
  return {out[0], out[1], out[2], out[3]};
}

int64_t cuda_settings(std::optional<int64_t> max_grid) {
  if (max_grid.has_value()) {
    TORCH_CHECK_VALUE(*max_grid >= 0, "fastnas::_cuda_settings: max_grid must be >= 0 (0: no cap)");
    cuda_plan::max_grid.store(*max_grid, std::memory_order_relaxed);
  }
  return cuda_plan::max_grid_for_tests();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def(
      "_cuda_launch_plan(int numel, int num_inputs, int element_size, bool weights_grad, int[] addresses, "
      "int multiprocessors, int blocks_per_multiprocessor) -> (int vector_elements, int full_vectors, int tail, "
      "int tiles, int tiles_per_unit, int units, int grid, int launches, int inputs_per_launch, "
      "int groups_per_tile, bool shifted_loads, int[] shifts, int partials_stride, int partials_bytes, "
      "int final_sum_warps_per_input)",
      &cuda_launch_plan);
  m.def("_cuda_shift_bytes(int[] words, int shift) -> int[]", &cuda_shift_bytes);
  m.def("_cuda_settings(int? max_grid=None) -> int", &cuda_settings);
}

}  // namespace fastnas
