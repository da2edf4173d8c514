// Launchers of the decode worker's CUDA kernels. Plain C++: includes only the CUDA runtime API
// header (for cudaStream_t), so the cuda backend compiles with g++ and the kernels stay in .cu
// files (attention.cu, prefill_attention.cu, ops.cu). cpu_reference.h holds the CPU reference of
// each launcher.
//
// Every launcher
//   - checks shapes and arguments on the host first and returns INVALID_ARGUMENT, launching
//     nothing, when they are bad;
//   - then enqueues its kernels on `stream` (asynchronous: outputs are ready once the stream
//     has been synchronized) and returns INTERNAL with the CUDA error string if a launch fails
//     (CudaStatus in cuda_status.h is the one cudaError_t converter);
//   - reads device data (lengths, ids, page tables) only on the device: values out of contract
//     there give unspecified results but never out-of-bounds accesses where a comment says so.
// All are thread-compatible: concurrent calls on different streams are fine.
// Conventions of the argument structs (bf16 as uint16_t bits, strides in elements, 16-byte
// aligned rows): kernel_params.h.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_KERNELS_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu-worker/backends/cuda/kernel_params.h"

namespace kvrecall::worker::cuda {

// ---- Attention -----------------------------------------------------------------------------
// Split-K ("flash-decoding"): each (sequence, kv-head, split) block reads its K/V rows once for
// all q-heads of the kv-head's group and keeps a partial softmax (max, sum, weighted values);
// a second kernel combines the splits. With one split the first kernel writes `out` itself.
// Lengths of 0 give a zero output row. Positions >= min(lengths[b], max_len) are never read.

// Bytes of device workspace DecodeAttention / SparseAttention need for `p` (0 when one split
// suffices). Depends on the current device's multiprocessor count.
[[nodiscard]] absl::StatusOr<size_t> DecodeAttentionWorkspaceBytes(const DecodeAttentionParams& p);
[[nodiscard]] absl::StatusOr<size_t> SparseAttentionWorkspaceBytes(const SparseAttentionParams& p);

// out[b][h] = softmax(scale * q[b][h] . K[b][0..len)[h / group]) . V[...].
// REQUIRES: batch >= 1, num_kv_heads >= 1, num_q_heads a multiple of num_kv_heads, head_dim 64
//   or 128, max_len >= 1, 0 <= lengths[b] <= max_len, paged: page_size a power of two and
//   page_table holding ceil(max_len / page_size) valid page ids per sequence, workspace at
//   least the bytes WorkspaceBytes returned for the same params (16-byte aligned), 0 <=
//   num_splits <= 1024.
[[nodiscard]] absl::Status DecodeAttention(const DecodeAttentionParams& p, void* workspace,
                                           size_t workspace_bytes, cudaStream_t stream);

// The same over sinks + window + slots (kernel_params.h SparseAttentionParams says which rows).
// REQUIRES: as DecodeAttention, plus num_sinks, window >= 0, slots.budget >= 0, slot token ids
//   of an entry distinct, 0 <= counts[e] <= budget.
[[nodiscard]] absl::Status SparseAttention(const SparseAttentionParams& p, void* workspace,
                                           size_t workspace_bytes, cudaStream_t stream);

// Causal prefill attention of one sequence's chunk (kernel_params.h PrefillAttentionParams):
//   out[i][h] = softmax(scale * q[i][h] . K[0..start+i][h / group]) . V[...],  0 <= i < n,
// flash-attention style on the tensor cores: each block takes `block_rows` query tokens of one
// q-head and streams the K/V rows [0, its last token's position] through shared memory in
// tiles of 64, with an online softmax (fp32 scores, max and sum; probabilities rounded to bf16
// for the P.V product, as FlashAttention does); output rounded to bf16. Cache rows at
// positions >= start + n are never read. No workspace.
// REQUIRES: num_tokens >= 0, start >= 0, start + num_tokens <= 2^31 - 1, num_kv_heads >= 1,
//   num_q_heads a multiple of num_kv_heads, head_dim 64 or 128, seq >= 0, q / out token
//   strides 0 or multiples of 8 >= num_q_heads * head_dim, 16-byte aligned q, out and cache,
//   paged: page_size a power of two and page_table row `seq` holding
//   ceil((start + n) / page_size) valid page ids, block_rows 0, 64 or 128.
[[nodiscard]] absl::Status PrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream);

// Streamed rows into slot caches (kernel_params.h SlotScatterParams).
// REQUIRES: num_rows >= 0, head_dim a multiple of 8, batch, num_kv_heads, budget >= 1.
[[nodiscard]] absl::Status SlotScatter(const SlotScatterParams& p, cudaStream_t stream);

// The new token's K and V rows into a dense (or sinks + window) cache (kernel_params.h
// KvAppendParams).
// REQUIRES: batch >= 0, num_kv_heads >= 1, head_dim a positive multiple of 8, 16-byte aligned
//   rows, paged: page_size a power of two.
[[nodiscard]] absl::Status KvAppend(const KvAppendParams& p, cudaStream_t stream);

// ---- Index construction --------------------------------------------------------------------
// CTKVR lists of one layer (kernel_params.h CtkvrListsParams): one pass of q.k over the range
// writes per-block partial log-sum-exps, a second combines them into lse and writes the scores
// (workspace), and one block per (kv-head, centroid) selects its top list_len scores by radix
// select on their bits and writes the positions in ascending order. Keys outside [begin, end)
// are never read.
// Bytes of device workspace CtkvrLists needs for `p`.
[[nodiscard]] absl::StatusOr<size_t> CtkvrListsWorkspaceBytes(const CtkvrListsParams& p);
// REQUIRES: 0 <= begin < end <= 2^31 - 1, num_centroids >= 1, num_kv_heads >= 1, num_q_heads a
//   multiple of num_kv_heads, head_dim 64 or 128, scale > 0, list_size >= 1, 16-byte aligned
//   keys and queries, workspace of CtkvrListsWorkspaceBytes (16-byte aligned).
[[nodiscard]] absl::Status CtkvrLists(const CtkvrListsParams& p, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream);

// ---- Per-token operations ------------------------------------------------------------------

// out[r][i] = bf16(x[r][i] * rsqrt(mean_i(x[r][i]^2) + eps) * weight[i]), all in fp32.
//   x, out: [rows][dim] bf16 (out may alias x); weight: [dim] bf16.
// REQUIRES: rows >= 0, dim a positive multiple of 8, eps > 0.
[[nodiscard]] absl::Status RmsNorm(const uint16_t* x, const uint16_t* weight, int rows, int dim,
                                   float eps, uint16_t* out, cudaStream_t stream);

// Rotates x in place by RoPE (rotate_half pairing, as gpu-worker/model/rope.h): for token t,
// head h, i < head_dim/2, with a = positions[t] * inv_freq[i] in double and c, s = fp32 cos(a),
// sin(a):  x'[i] = x[i]*c - x[i+d/2]*s,  x'[i+d/2] = x[i+d/2]*c + x[i]*s   (fp32, rounded to bf16).
//   x: token t, head h at x + t * token_stride + h * head_dim, bf16
//   positions: [tokens] int32; inv_freq: [head_dim / 2] fp64 (RopeInverseFrequencies, Llama-3
//   scaling included).
// REQUIRES: tokens >= 0, num_heads >= 1, head_dim even and > 0, token_stride >= num_heads *
//   head_dim.
[[nodiscard]] absl::Status Rope(uint16_t* x, int tokens, int num_heads, int head_dim,
                                int64_t token_stride, const int32_t* positions,
                                const double* inv_freq, cudaStream_t stream);

// out[r][i] = bf16(silu(gate[r][i]) * up[r][i]), silu(g) = g / (1 + exp(-g)), fp32.
//   gate, up: row r at gate + r * in_stride (so a fused [rows][2*dim] gate|up buffer works);
//   out: [rows][dim] bf16.
// REQUIRES: rows >= 0, dim >= 1, in_stride >= dim.
[[nodiscard]] absl::Status SwiGlu(const uint16_t* gate, const uint16_t* up, int rows, int dim,
                                  int64_t in_stride, uint16_t* out, cudaStream_t stream);

// out[i] = table[ids[i]]; an id outside [0, vocab) gives a row of zeros.
//   table: [vocab][dim] bf16; ids: [n] int32; out: [n][dim] bf16.
// REQUIRES: n >= 0, vocab >= 1, dim a positive multiple of 8.
[[nodiscard]] absl::Status EmbeddingGather(const uint16_t* table, int vocab, int dim,
                                           const int32_t* ids, int n, uint16_t* out,
                                           cudaStream_t stream);

// out[r] = the lowest index of the largest logits[r][i] (NaN is never chosen unless the whole
// row is NaN, then 0).  logits: [rows][vocab] fp32; out: [rows] int32.
// REQUIRES: rows >= 0, vocab >= 1.
[[nodiscard]] absl::Status Argmax(const float* logits, int rows, int vocab, int32_t* out,
                                  cudaStream_t stream);

// Temperature + top-p (nucleus) sampling with the caller's uniform random numbers, one token
// per row. With e[i] = exp((logits[i] - max) / temperature[r]):
//   kept = the tokens with e[i] >= tau, tau the largest value for which the kept mass is at
//          least top_p[r] * sum(e) (the smallest descending-probability prefix, ties included);
//   out[r] = the first kept index i, in vocabulary order, whose running kept mass exceeds
//          uniform[r] * kept mass (the last kept index if rounding leaves none).
// temperature[r] <= 0 means greedy (Argmax); top_p[r] >= 1 keeps every token.
//   logits: [rows][vocab] fp32; temperature, top_p, uniform: [rows] fp32 (uniform in [0, 1));
//   out: [rows] int32.
// REQUIRES: rows >= 0, vocab >= 1, finite logits.
[[nodiscard]] absl::Status SampleTopP(const float* logits, int rows, int vocab,
                                      const float* temperature, const float* top_p,
                                      const float* uniform, int32_t* out, cudaStream_t stream);

// Deterministic pseudo-random bf16 values (random weights and synthetic K/V for benchmarks):
//   out[j] = bf16(scale * u(seed, first + j)), u in [-1, 1) from a counter-based hash (the bf16
// rounding may reach +-scale)
// (splitmix64 of seed + index * golden ratio; the top 24 bits), so any slice of a stream can be
// generated on its own, on the GPU or by FillRandomBf16Reference on the host, bit for bit.
//   out: [n] bf16.
// REQUIRES: n >= 0, first >= 0.
[[nodiscard]] absl::Status FillRandomBf16(uint16_t* out, int64_t n, uint64_t seed, int64_t first,
                                          float scale, cudaStream_t stream);

}  // namespace kvrecall::worker::cuda

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_KERNELS_H_
