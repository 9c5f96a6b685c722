#include "cpu/block_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastnas {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;  // smaller blocks are cheap for malloc anyway

size_t pool_limit_bytes() {
  static const size_t limit = [] {
    const char* env = std::getenv("FASTNAS_CPU_POOL_MB");
    return static_cast<size_t>(env != nullptr ? std::strtoull(env, nullptr, 10) : 512) << 20;
  }();
  return limit;
}

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

}  // namespace

at::Tensor pooled_empty_like(const at::Tensor& like) {
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), &pooled_allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type());
}

at::Tensor pooled_empty_flat(int64_t numel, const at::Tensor& like) {
  return at::detail::empty_generic({numel}, &pooled_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), std::nullopt);
}

}  // namespace fastnas
