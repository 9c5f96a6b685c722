#include "cpu/block_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastnas {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;  // smaller blocks are cheap for malloc anyway

// The cache's bound: 512 MB unless fastnas::_cpu_pool_settings sets another (fastnas.backend does, from
// FASTNAS_CPU_POOL_MB, when the extension loads).
std::atomic<size_t>& pool_limit() {
  static std::atomic<size_t> limit{size_t(512) << 20};
  return limit;
}

size_t pool_limit_bytes() { return pool_limit().load(std::memory_order_relaxed); }

class BlockPool {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_blocks_.find(bytes);
      if (it != free_blocks_.end() && !it->second.empty()) {
        void* block = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= bytes;
        return block;
      }
    }
    return c10::alloc_cpu(bytes);
  }

  void give_back(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= pool_limit_bytes()) {
        free_blocks_[bytes].push_back(block);
        cached_bytes_ += bytes;
        return;
      }
    }
    c10::free_cpu(block);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_blocks_;
  size_t cached_bytes_ = 0;
};

// Never destroyed: tensors holding its blocks may be freed during interpreter shutdown.
BlockPool& pool() {
  static BlockPool* instance = new BlockPool();
  return *instance;
}

// What a pooled block's deleter needs: the block and its size (the DataPtr's context).
struct PooledBlock {
  void* data;
  size_t bytes;
};

void give_back_block(void* context) {
  auto* block = static_cast<PooledBlock*>(context);
  c10::profiledCPUMemoryReporter().Delete(block->data);
  pool().give_back(block->data, block->bytes);
  delete block;
}

// Blocks of kMinPooledBytes and more come from the pool; smaller ones from torch's CPU allocator.
class PooledCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinPooledBytes || pool_limit_bytes() == 0) return c10::GetDefaultCPUAllocator()->allocate(bytes);
    void* data = pool().take(bytes);
    c10::profiledCPUMemoryReporter().New(data, bytes);
    return {data, new PooledBlock{data, bytes}, &give_back_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PooledCpuAllocator& pooled_allocator() {
  static PooledCpuAllocator* instance = new PooledCpuAllocator();
  return *instance;
}

// Sets the cache's bound in megabytes (0 turns it off; blocks cached already stay until taken) and
// returns the bound in force.
int64_t pool_settings(std::optional<int64_t> limit_megabytes) {
  if (limit_megabytes.has_value()) {
    TORCH_CHECK_VALUE(*limit_megabytes >= 0, "fastnas::_cpu_pool_settings: limit_megabytes must be >= 0");
    pool_limit().store(static_cast<size_t>(*limit_megabytes) << 20, std::memory_order_relaxed);
  }
  return static_cast<int64_t>(pool_limit_bytes() >> 20);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def("_cpu_pool_settings(int? limit_megabytes=None) -> int", &pool_settings);
}

at::Tensor pooled_empty_like(const at::Tensor& like) {
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), &pooled_allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type());
}

at::Tensor pooled_empty_flat(int64_t numel, const at::Tensor& like) {
  return at::detail::empty_generic({numel}, &pooled_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), std::nullopt);
}

}  // namespace fastnas
