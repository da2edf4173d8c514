// Device-side helpers shared by the attention kernels (attention.cu, prefill_attention.cu):
// KvCacheView addressing (kernel_params.h) and the device's multiprocessor count.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_KV_CACHE_CUH_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_KV_CACHE_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "gpu-worker/backends/cuda/kernel_params.h"

namespace kvrecall::worker::cuda::internal {

// Element offset of sequence b, position t, kv-head h in c's K (or V) array; page_shift is
// log2(c.page_size) for a paged cache (PageShift).
__device__ __forceinline__ int64_t CacheOffset(const KvCacheView& c, int page_shift, int b, int t,
                                               int h) {
  int64_t page;
  int in_page;
  if (c.page_table != nullptr) {
    page = c.page_table[static_cast<int64_t>(b) * c.page_table_stride + (t >> page_shift)];
    in_page = t & ((1 << page_shift) - 1);
  } else {
    page = b;
    in_page = t;
  }
  return page * c.page_stride + static_cast<int64_t>(in_page) * c.token_stride +
         static_cast<int64_t>(h) * c.head_stride;
}

inline int PageShift(const KvCacheView& c) {
  if (c.page_table == nullptr) return 0;
  int s = 0;
  while ((1 << s) < c.page_size) ++s;
  return s;
}

// Multiprocessors of the current device (132, an H100's, if the query fails).
inline int SmCount() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 132;
  return n;
}

}  // namespace kvrecall::worker::cuda::internal

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_KV_CACHE_CUH_
