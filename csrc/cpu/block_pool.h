// A bounded cache of page-resident memory blocks for the CPU kernels' results.
//
// glibc returns multi-megabyte blocks to the OS when they are freed, so every fresh tensor of that
// size page-faults on first touch: writing the K input gradients of a supernet node into fresh
// memory is several times slower than into memory already mapped (benchmarks/RESULTS.md). Blocks of
// the kernels' own results are kept here when freed and handed out again for the same size, up to
// 512 MB in all unless fastnas::_cpu_pool_settings sets another bound (fastnas.backend sets
// FASTNAS_CPU_POOL_MB's; 0 turns the cache off).
//
// The cache sits behind a c10::Allocator, so its tensors are ordinary ones: resizable (a resize
// allocates through the same allocator), and every block handed out or given back is reported to
// torch's memory profiler, as the default CPU allocator reports its own.
#pragma once

#include <ATen/ATen.h>

namespace fastnas {

// An uninitialised tensor with the sizes, strides, dtype and device of `like` (a non-overlapping and
// dense CPU tensor), its memory taken from the cache when it holds a block of that size.
at::Tensor pooled_empty_like(const at::Tensor& like);

// An uninitialised 1-D CPU tensor of `numel` elements of like's dtype, from the cache likewise.
at::Tensor pooled_empty_flat(int64_t numel, const at::Tensor& like);

}  // namespace fastnas
