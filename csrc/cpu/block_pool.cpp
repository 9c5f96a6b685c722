#include "cpu/block_pool.h"

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
    return static_cast<size_t>(env != nullptr ? std::strtoull(env, nullptr, 10) : 256) << 20;
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

}  // namespace

at::Tensor pooled_empty_like(const at::Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes < kMinPooledBytes || pool_limit_bytes() == 0) return at::empty_like(like);
  void* block = pool().take(bytes);
  return at::from_blob(
      block, like.sizes(), like.strides(), [bytes](void* data) { pool().give_back(data, bytes); },
      like.options());
}

}  // namespace fastnas
