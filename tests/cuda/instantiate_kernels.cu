// Every kernel of csrc/cuda/mixed_sum_kernels.cuh, instantiated as the launcher instantiates them, for
// tests/test_cuda_compiled.py to compile alone (no ATen) and inspect.
#include "cuda/mixed_sum_kernels.cuh"

namespace fastnas {
namespace cuda_kernels {
template Kernels<float> kernels<float>();
template Kernels<double> kernels<double>();
template Kernels<__half> kernels<__half>();
template Kernels<__nv_bfloat16> kernels<__nv_bfloat16>();
}  // namespace cuda_kernels
}  // namespace fastnas
