// nvcc-compiled launch functions behind kernels.h (internal: call kernels.h instead). They
// assume the arguments were validated by the kernels.cc launchers and return the launch's
// cudaError_t (cudaGetLastError after the launch), which kernels.cc turns into a Status.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_LAUNCH_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_LAUNCH_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "gpu-worker/backends/cuda/kernel_params.h"

namespace kvrecall::worker::cuda::internal {

// How an attention call is partitioned (the same on both sides of the workspace contract).
struct AttentionPlan {
  int num_splits = 1;
  int rows_per_split = 0;  // a multiple of the kernel's tile
  size_t workspace_bytes = 0;
};

// rows: the largest number of candidate rows of one (sequence, kv-head).
cudaError_t PlanAttention(int batch, int num_q_heads, int num_kv_heads, int head_dim, int rows,
                          int requested_splits, AttentionPlan* plan);
cudaError_t LaunchDecodeAttention(const DecodeAttentionParams& p, const AttentionPlan& plan,
                                  void* workspace, cudaStream_t stream);
cudaError_t LaunchSparseAttention(const SparseAttentionParams& p, const AttentionPlan& plan,
                                  void* workspace, cudaStream_t stream);
// block_rows: 64 or 128 (kernels.cc resolves 0 with PrefillBlockRows).
int PrefillBlockRows(const PrefillAttentionParams& p);
cudaError_t LaunchPrefillAttention(const PrefillAttentionParams& p, int block_rows,
                                   cudaStream_t stream);
cudaError_t LaunchSlotScatter(const SlotScatterParams& p, cudaStream_t stream);
cudaError_t LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream);
// How a CtkvrLists call is partitioned, and its workspace: the partial (max, sum of exp) pairs
// [num_kv_heads][rows][tiles] float2 at offset 0, then the scores [num_kv_heads][num_centroids]
// [score_stride] fp32 at scores_offset (256-byte aligned).
struct CtkvrPlan {
  int n = 0;                 // end - begin
  int list_len = 0;          // min(list_size, n)
  int group = 0;             // num_q_heads / num_kv_heads
  int rows = 0;              // num_centroids * group query rows per kv-head (row c * group + j)
  int m_tiles = 1;           // 16-row mma tiles per row chunk: 1 (rows <= 16) or 2
  int chunks = 0;            // row chunks of 16 * m_tiles rows
  int tiles = 0;             // position tiles of the logit passes
  int64_t score_stride = 0;  // fp32 elements between two lists' scores (n rounded up to 64)
  size_t scores_offset = 0;
  size_t workspace_bytes = 0;
};

// false when a count or size would exceed what the kernels index or the grid allows.
// REQUIRES: kernels.cc checked begin < end <= 2^31 - 1, num_centroids >= 1 and num_q_heads a
//   positive multiple of num_kv_heads >= 1 (the fields the plan reads).
bool PlanCtkvrLists(const CtkvrListsParams& p, CtkvrPlan* plan);
// REQUIRES: every check of kernels.cc CtkvrLists passed; workspace of plan.workspace_bytes.
cudaError_t LaunchCtkvrLists(const CtkvrListsParams& p, const CtkvrPlan& plan, void* workspace,
                             cudaStream_t stream);
cudaError_t LaunchFillRandomBf16(uint16_t* out, int64_t n, uint64_t seed, int64_t first,
                                 float scale, cudaStream_t stream);

cudaError_t LaunchRmsNorm(const uint16_t* x, const uint16_t* weight, int rows, int dim, float eps,
                          uint16_t* out, cudaStream_t stream);
cudaError_t LaunchRope(uint16_t* x, int tokens, int num_heads, int head_dim, int64_t token_stride,
                       const int32_t* positions, const double* inv_freq, cudaStream_t stream);
cudaError_t LaunchSwiGlu(const uint16_t* gate, const uint16_t* up, int rows, int dim,
                         int64_t in_stride, uint16_t* out, cudaStream_t stream);
cudaError_t LaunchEmbeddingGather(const uint16_t* table, int vocab, int dim, const int32_t* ids,
                                  int n, uint16_t* out, cudaStream_t stream);
cudaError_t LaunchArgmax(const float* logits, int rows, int vocab, int32_t* out,
                         cudaStream_t stream);
cudaError_t LaunchSampleTopP(const float* logits, int rows, int vocab, const float* temperature,
                             const float* top_p, const float* uniform, int32_t* out,
                             cudaStream_t stream);

}  // namespace kvrecall::worker::cuda::internal

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_LAUNCH_H_
