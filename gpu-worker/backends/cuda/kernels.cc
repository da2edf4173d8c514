#include "gpu-worker/backends/cuda/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/backends/cuda/internal/launch.h"

namespace kvrecall::worker::cuda {
namespace {

absl::Status Invalid(absl::string_view fn, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(fn, ": ", what));
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Checks of a K/V cache view read for positions [0, max_len) (every attention launcher).
absl::Status CheckCache(absl::string_view fn, const KvCacheView& c, int head_dim, int64_t max_len) {
  if (c.k == nullptr || c.v == nullptr) return Invalid(fn, "null cache pointer");
  if (!Aligned16(c.k) || !Aligned16(c.v)) {
    return Invalid(fn, "cache rows must be 16-byte aligned");
  }
  if (c.page_stride % 8 != 0 || c.token_stride % 8 != 0 || c.head_stride % 8 != 0 ||
      c.token_stride <= 0 || c.head_stride < head_dim) {
    return Invalid(fn, absl::StrCat("cache strides (", c.page_stride, ", ", c.token_stride, ", ",
                                    c.head_stride, ") must be multiples of 8 with rows apart"));
  }
  if (c.page_table != nullptr) {
    if (c.page_size < 1 || (c.page_size & (c.page_size - 1)) != 0) {
      return Invalid(fn, absl::StrCat("page_size ", c.page_size, " is not a power of two"));
    }
    const int64_t pages = (max_len + c.page_size - 1) / c.page_size;
    if (c.page_table_stride < pages) {
      return Invalid(fn, absl::StrCat("page_table_stride ", c.page_table_stride, " < ", pages,
                                      " pages of ", max_len, " positions"));
    }
  }
  return absl::OkStatus();
}

// Checks shared by the dense and the sparse attention launchers.
absl::Status CheckAttention(absl::string_view fn, int batch, int num_q_heads, int num_kv_heads,
                            int head_dim, int max_len, const uint16_t* q, const int32_t* lengths,
                            const KvCacheView& c, uint16_t* out, int num_splits) {
  if (batch < 1 || batch > 65535) return Invalid(fn, absl::StrCat("batch ", batch));
  if (num_kv_heads < 1 || num_q_heads < num_kv_heads || num_q_heads % num_kv_heads != 0) {
    return Invalid(fn, absl::StrCat("num_q_heads ", num_q_heads,
                                    " is not a positive multiple of "
                                    "num_kv_heads ",
                                    num_kv_heads));
  }
  if (num_q_heads > 65535) return Invalid(fn, absl::StrCat("num_q_heads ", num_q_heads));
  if (head_dim != 64 && head_dim != 128) {
    return Invalid(fn, absl::StrCat("head_dim ", head_dim, " (64 or 128 supported)"));
  }
  if (max_len < 1) return Invalid(fn, absl::StrCat("max_len ", max_len));
  if (num_splits < 0 || num_splits > 1024) {
    return Invalid(fn, absl::StrCat("num_splits ", num_splits));
  }
  if (q == nullptr || lengths == nullptr || out == nullptr || c.k == nullptr || c.v == nullptr) {
    return Invalid(fn, "null q, lengths, out or cache pointer");
  }
  if (!Aligned16(q)) return Invalid(fn, "q rows must be 16-byte aligned");
  return CheckCache(fn, c, head_dim, max_len);
}

absl::Status CheckSparse(const SparseAttentionParams& p) {
  constexpr absl::string_view fn = "SparseAttention";
  if (auto s = CheckAttention(fn, p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim, p.max_len,
                              p.q, p.lengths, p.cache, p.out, p.num_splits);
      !s.ok()) {
    return s;
  }
  if (p.num_sinks < 0 || p.window < 0) {
    return Invalid(fn, absl::StrCat("num_sinks ", p.num_sinks, ", window ", p.window));
  }
  const SlotCacheView& s = p.slots;
  if (s.budget < 0) return Invalid(fn, absl::StrCat("budget ", s.budget));
  if (s.budget > 0) {
    if (s.k == nullptr || s.v == nullptr || s.token_ids == nullptr || s.counts == nullptr) {
      return Invalid(fn, "null slot cache pointer");
    }
    if (!Aligned16(s.k) || !Aligned16(s.v) || s.entry_stride % 8 != 0 || s.row_stride % 8 != 0 ||
        s.row_stride < p.head_dim || s.entry_stride < s.row_stride * s.budget) {
      return Invalid(
          fn, absl::StrCat("slot strides (", s.entry_stride, ", ", s.row_stride, ") or alignment"));
    }
  }
  return absl::OkStatus();
}

// The fields CtkvrLists' workspace size depends on.
absl::Status CheckCtkvrShape(absl::string_view fn, const CtkvrListsParams& p) {
  if (p.begin < 0 || p.end <= p.begin || p.end > INT32_MAX) {
    return Invalid(fn, absl::StrCat("positions [begin, end) = [", p.begin, ", ", p.end,
                                    ") is not 0 <= begin < end <= 2^31 - 1"));
  }
  if (p.num_centroids < 1) return Invalid(fn, absl::StrCat("num_centroids ", p.num_centroids));
  if (p.num_kv_heads < 1 || p.num_kv_heads > 65535) {
    return Invalid(fn, absl::StrCat("num_kv_heads ", p.num_kv_heads));
  }
  if (p.num_q_heads < p.num_kv_heads || p.num_q_heads % p.num_kv_heads != 0) {
    return Invalid(fn,
                   absl::StrCat("num_q_heads ", p.num_q_heads,
                                " is not a positive multiple of num_kv_heads ", p.num_kv_heads));
  }
  return absl::OkStatus();
}

absl::Status CheckCtkvr(absl::string_view fn, const CtkvrListsParams& p) {
  if (auto s = CheckCtkvrShape(fn, p); !s.ok()) return s;
  if (p.head_dim != 64 && p.head_dim != 128) {
    return Invalid(fn, absl::StrCat("head_dim ", p.head_dim, " (64 or 128 supported)"));
  }
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale)) {
    return Invalid(fn, absl::StrCat("scale ", p.scale, " is not positive and finite"));
  }
  if (p.list_size < 1) return Invalid(fn, absl::StrCat("list_size ", p.list_size));
  if (p.keys == nullptr || p.queries == nullptr || p.tokens == nullptr || p.lse == nullptr) {
    return Invalid(fn, "null keys, queries, tokens or lse pointer");
  }
  if (!Aligned16(p.keys) || !Aligned16(p.queries)) {
    return Invalid(fn, "keys and queries must be 16-byte aligned");
  }
  if (reinterpret_cast<uintptr_t>(p.tokens) % alignof(int32_t) != 0 ||
      reinterpret_cast<uintptr_t>(p.lse) % alignof(float) != 0) {
    return Invalid(fn, "tokens and lse must be 4-byte aligned");
  }
  if (p.token_stride <= 0 || p.token_stride % 8 != 0) {
    return Invalid(
        fn, absl::StrCat("token_stride ", p.token_stride, " is not a positive multiple of 8"));
  }
  if (p.head_stride % 8 != 0 || p.head_stride < p.head_dim) {
    return Invalid(
        fn, absl::StrCat("head_stride ", p.head_stride, " is not a multiple of 8 >= ", p.head_dim));
  }
  const int64_t q_row = static_cast<int64_t>(p.num_q_heads) * p.head_dim;
  if (p.query_stride % 8 != 0 || p.query_stride < q_row) {
    return Invalid(
        fn, absl::StrCat("query_stride ", p.query_stride, " is not a multiple of 8 >= ", q_row));
  }
  return absl::OkStatus();
}

absl::Status PlanCtkvr(absl::string_view fn, const CtkvrListsParams& p, internal::CtkvrPlan* plan) {
  if (!internal::PlanCtkvrLists(p, plan)) {
    return Invalid(
        fn, absl::StrCat("num_kv_heads ", p.num_kv_heads, ", num_centroids ", p.num_centroids,
                         ", group ", p.num_q_heads / p.num_kv_heads, " and ", p.end - p.begin,
                         " positions exceed the kernels' grid or workspace limits"));
  }
  return absl::OkStatus();
}

int SparseRows(const SparseAttentionParams& p) {
  const int64_t dense = std::min<int64_t>(static_cast<int64_t>(p.num_sinks) + p.window, p.max_len);
  return static_cast<int>(std::min<int64_t>(dense + p.slots.budget, INT32_MAX));
}

}  // namespace

absl::StatusOr<size_t> DecodeAttentionWorkspaceBytes(const DecodeAttentionParams& p) {
  if (auto s = CheckAttention("DecodeAttention", p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim,
                              p.max_len, p.q, p.lengths, p.cache, p.out, p.num_splits);
      !s.ok()) {
    return s;
  }
  internal::AttentionPlan plan;
  if (auto s = CudaStatus(internal::PlanAttention(p.batch, p.num_q_heads, p.num_kv_heads,
                                                  p.head_dim, p.max_len, p.num_splits, &plan),
                          "DecodeAttention plan");
      !s.ok()) {
    return s;
  }
  return plan.workspace_bytes;
}

absl::StatusOr<size_t> SparseAttentionWorkspaceBytes(const SparseAttentionParams& p) {
  if (auto s = CheckSparse(p); !s.ok()) return s;
  internal::AttentionPlan plan;
  if (auto s = CudaStatus(internal::PlanAttention(p.batch, p.num_q_heads, p.num_kv_heads,
                                                  p.head_dim, SparseRows(p), p.num_splits, &plan),
                          "SparseAttention plan");
      !s.ok()) {
    return s;
  }
  return plan.workspace_bytes;
}

absl::Status DecodeAttention(const DecodeAttentionParams& p, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  constexpr absl::string_view fn = "DecodeAttention";
  if (auto s = CheckAttention(fn, p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim, p.max_len,
                              p.q, p.lengths, p.cache, p.out, p.num_splits);
      !s.ok()) {
    return s;
  }
  internal::AttentionPlan plan;
  if (auto s = CudaStatus(internal::PlanAttention(p.batch, p.num_q_heads, p.num_kv_heads,
                                                  p.head_dim, p.max_len, p.num_splits, &plan),
                          "DecodeAttention plan");
      !s.ok()) {
    return s;
  }
  if (workspace_bytes < plan.workspace_bytes ||
      (plan.workspace_bytes > 0 && workspace == nullptr)) {
    return Invalid(fn, absl::StrCat("workspace of ", workspace_bytes, " bytes, ",
                                    plan.workspace_bytes, " needed"));
  }
  return CudaStatus(internal::LaunchDecodeAttention(p, plan, workspace, stream), fn);
}

absl::Status SparseAttention(const SparseAttentionParams& p, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  constexpr absl::string_view fn = "SparseAttention";
  if (auto s = CheckSparse(p); !s.ok()) return s;
  internal::AttentionPlan plan;
  if (auto s = CudaStatus(internal::PlanAttention(p.batch, p.num_q_heads, p.num_kv_heads,
                                                  p.head_dim, SparseRows(p), p.num_splits, &plan),
                          "SparseAttention plan");
      !s.ok()) {
    return s;
  }
  if (workspace_bytes < plan.workspace_bytes ||
      (plan.workspace_bytes > 0 && workspace == nullptr)) {
    return Invalid(fn, absl::StrCat("workspace of ", workspace_bytes, " bytes, ",
                                    plan.workspace_bytes, " needed"));
  }
  return CudaStatus(internal::LaunchSparseAttention(p, plan, workspace, stream), fn);
}

absl::Status PrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream) {
  constexpr absl::string_view fn = "PrefillAttention";
  if (p.num_tokens < 0 || p.start < 0 || static_cast<int64_t>(p.start) + p.num_tokens > INT32_MAX) {
    return Invalid(fn, absl::StrCat("num_tokens ", p.num_tokens, ", start ", p.start));
  }
  if (p.num_kv_heads < 1 || p.num_q_heads < p.num_kv_heads || p.num_q_heads % p.num_kv_heads != 0) {
    return Invalid(fn,
                   absl::StrCat("num_q_heads ", p.num_q_heads,
                                " is not a positive multiple of num_kv_heads ", p.num_kv_heads));
  }
  if (p.head_dim != 64 && p.head_dim != 128) {
    return Invalid(fn, absl::StrCat("head_dim ", p.head_dim, " (64 or 128 supported)"));
  }
  if (p.seq < 0) return Invalid(fn, absl::StrCat("seq ", p.seq));
  if (p.block_rows != 0 && p.block_rows != 64 && p.block_rows != 128) {
    return Invalid(fn, absl::StrCat("block_rows ", p.block_rows, " (0, 64 or 128)"));
  }
  const int64_t row = static_cast<int64_t>(p.num_q_heads) * p.head_dim;
  for (const int64_t stride : {p.q_token_stride, p.out_token_stride}) {
    if (stride != 0 && (stride % 8 != 0 || stride < row)) {
      return Invalid(
          fn, absl::StrCat("token stride ", stride, " is not 0 or a multiple of 8 >= ", row));
    }
  }
  // One block per (q-head, 64 query tokens) at most.
  if ((static_cast<int64_t>(p.num_tokens) + 63) / 64 * p.num_q_heads > INT32_MAX) {
    return Invalid(fn, absl::StrCat("num_tokens ", p.num_tokens, " x num_q_heads ", p.num_q_heads,
                                    " is too large"));
  }
  if (p.num_tokens == 0) return absl::OkStatus();
  if (p.q == nullptr || p.out == nullptr) return Invalid(fn, "null q or out pointer");
  if (!Aligned16(p.q) || !Aligned16(p.out)) {
    return Invalid(fn, "q and out rows must be 16-byte aligned");
  }
  if (auto s = CheckCache(fn, p.cache, p.head_dim, static_cast<int64_t>(p.start) + p.num_tokens);
      !s.ok()) {
    return s;
  }
  return CudaStatus(internal::LaunchPrefillAttention(p, internal::PrefillBlockRows(p), stream), fn);
}

absl::Status SlotScatter(const SlotScatterParams& p, cudaStream_t stream) {
  constexpr absl::string_view fn = "SlotScatter";
  if (p.num_entries < 0 || p.num_fill_slots < 0) {
    return Invalid(fn, absl::StrCat("num_entries ", p.num_entries, ", num_fill_slots ",
                                    p.num_fill_slots));
  }
  if (p.head_dim < 8 || p.head_dim % 8 != 0) {
    return Invalid(fn, absl::StrCat("head_dim ", p.head_dim, " is not a positive multiple of 8"));
  }
  if (p.batch < 1 || p.num_kv_heads < 1 || p.budget < 1) {
    return Invalid(fn, absl::StrCat("batch ", p.batch, ", num_kv_heads ", p.num_kv_heads,
                                    ", budget ", p.budget));
  }
  if (p.num_entries == 0) return absl::OkStatus();
  if (p.entries == nullptr || (p.fill_slots == nullptr && p.num_fill_slots > 0) ||
      p.k_slots == nullptr || p.v_slots == nullptr) {
    return Invalid(fn, "null pointer");
  }
  if (!Aligned16(p.k_slots) || !Aligned16(p.v_slots) || p.entry_stride % 8 != 0 ||
      p.row_stride % 8 != 0 || p.row_stride < p.head_dim ||
      p.entry_stride < p.row_stride * p.budget) {
    return Invalid(fn, "slot strides or alignment");
  }
  return CudaStatus(internal::LaunchSlotScatter(p, stream), fn);
}

absl::Status KvAppend(const KvAppendParams& p, cudaStream_t stream) {
  constexpr absl::string_view fn = "KvAppend";
  if (p.batch < 0 || p.num_kv_heads < 1 || p.head_dim < 8 || p.head_dim % 8 != 0) {
    return Invalid(fn, absl::StrCat("batch ", p.batch, ", num_kv_heads ", p.num_kv_heads,
                                    ", head_dim ", p.head_dim));
  }
  if (p.batch == 0) return absl::OkStatus();
  if (p.k == nullptr || p.v == nullptr || p.positions == nullptr || p.cache_k == nullptr ||
      p.cache_v == nullptr) {
    return Invalid(fn, "null pointer");
  }
  if (!Aligned16(p.k) || !Aligned16(p.v) || !Aligned16(p.cache_k) || !Aligned16(p.cache_v) ||
      p.src_stride % 8 != 0 || p.src_stride < static_cast<int64_t>(p.num_kv_heads) * p.head_dim ||
      p.page_stride % 8 != 0 || p.token_stride % 8 != 0 || p.head_stride % 8 != 0 ||
      p.head_stride < p.head_dim) {
    return Invalid(fn, "strides or alignment");
  }
  if (p.page_table != nullptr && (p.page_size < 1 || (p.page_size & (p.page_size - 1)) != 0)) {
    return Invalid(fn, absl::StrCat("page_size ", p.page_size, " is not a power of two"));
  }
  return CudaStatus(internal::LaunchKvAppend(p, stream), fn);
}

absl::StatusOr<size_t> CtkvrListsWorkspaceBytes(const CtkvrListsParams& p) {
  constexpr absl::string_view fn = "CtkvrLists";
  if (auto s = CheckCtkvrShape(fn, p); !s.ok()) return s;
  internal::CtkvrPlan plan;
  if (auto s = PlanCtkvr(fn, p, &plan); !s.ok()) return s;
  return plan.workspace_bytes;
}

absl::Status CtkvrLists(const CtkvrListsParams& p, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  constexpr absl::string_view fn = "CtkvrLists";
  if (auto s = CheckCtkvr(fn, p); !s.ok()) return s;
  internal::CtkvrPlan plan;
  if (auto s = PlanCtkvr(fn, p, &plan); !s.ok()) return s;
  if (workspace == nullptr || workspace_bytes < plan.workspace_bytes) {
    return Invalid(fn, absl::StrCat("workspace of ", workspace_bytes, " bytes, ",
                                    plan.workspace_bytes, " needed"));
  }
  if (!Aligned16(workspace)) return Invalid(fn, "workspace must be 16-byte aligned");
  return CudaStatus(internal::LaunchCtkvrLists(p, plan, workspace, stream), fn);
}

absl::Status FillRandomBf16(uint16_t* out, int64_t n, uint64_t seed, int64_t first, float scale,
                            cudaStream_t stream) {
  constexpr absl::string_view fn = "FillRandomBf16";
  if (n < 0 || first < 0) return Invalid(fn, absl::StrCat("n ", n, ", first ", first));
  if (n == 0) return absl::OkStatus();
  if (out == nullptr) return Invalid(fn, "null pointer");
  return CudaStatus(internal::LaunchFillRandomBf16(out, n, seed, first, scale, stream), fn);
}

absl::Status RmsNorm(const uint16_t* x, const uint16_t* weight, int rows, int dim, float eps,
                     uint16_t* out, cudaStream_t stream) {
  constexpr absl::string_view fn = "RmsNorm";
  if (rows < 0 || dim < 8 || dim % 8 != 0 || !(eps > 0.0f)) {
    return Invalid(fn, absl::StrCat("rows ", rows, ", dim ", dim, ", eps ", eps));
  }
  if (rows == 0) return absl::OkStatus();
  if (x == nullptr || weight == nullptr || out == nullptr || !Aligned16(x) || !Aligned16(weight) ||
      !Aligned16(out)) {
    return Invalid(fn, "null or unaligned pointer");
  }
  return CudaStatus(internal::LaunchRmsNorm(x, weight, rows, dim, eps, out, stream), fn);
}

absl::Status Rope(uint16_t* x, int tokens, int num_heads, int head_dim, int64_t token_stride,
                  const int32_t* positions, const double* inv_freq, cudaStream_t stream) {
  constexpr absl::string_view fn = "Rope";
  if (tokens < 0 || num_heads < 1 || head_dim < 2 || head_dim % 2 != 0 ||
      token_stride < static_cast<int64_t>(num_heads) * head_dim) {
    return Invalid(fn, absl::StrCat("tokens ", tokens, ", num_heads ", num_heads, ", head_dim ",
                                    head_dim, ", token_stride ", token_stride));
  }
  if (tokens == 0) return absl::OkStatus();
  if (x == nullptr || positions == nullptr || inv_freq == nullptr) {
    return Invalid(fn, "null pointer");
  }
  return CudaStatus(internal::LaunchRope(x, tokens, num_heads, head_dim, token_stride, positions,
                                         inv_freq, stream),
                    fn);
}

absl::Status SwiGlu(const uint16_t* gate, const uint16_t* up, int rows, int dim, int64_t in_stride,
                    uint16_t* out, cudaStream_t stream) {
  constexpr absl::string_view fn = "SwiGlu";
  if (rows < 0 || dim < 1 || in_stride < dim) {
    return Invalid(fn, absl::StrCat("rows ", rows, ", dim ", dim, ", in_stride ", in_stride));
  }
  if (rows == 0) return absl::OkStatus();
  if (gate == nullptr || up == nullptr || out == nullptr) return Invalid(fn, "null pointer");
  return CudaStatus(internal::LaunchSwiGlu(gate, up, rows, dim, in_stride, out, stream), fn);
}

absl::Status EmbeddingGather(const uint16_t* table, int vocab, int dim, const int32_t* ids, int n,
                             uint16_t* out, cudaStream_t stream) {
  constexpr absl::string_view fn = "EmbeddingGather";
  if (n < 0 || vocab < 1 || dim < 8 || dim % 8 != 0) {
    return Invalid(fn, absl::StrCat("n ", n, ", vocab ", vocab, ", dim ", dim));
  }
  if (n == 0) return absl::OkStatus();
  if (table == nullptr || ids == nullptr || out == nullptr || !Aligned16(table) ||
      !Aligned16(out)) {
    return Invalid(fn, "null or unaligned pointer");
  }
  return CudaStatus(internal::LaunchEmbeddingGather(table, vocab, dim, ids, n, out, stream), fn);
}

absl::Status Argmax(const float* logits, int rows, int vocab, int32_t* out, cudaStream_t stream) {
  constexpr absl::string_view fn = "Argmax";
  if (rows < 0 || vocab < 1) return Invalid(fn, absl::StrCat("rows ", rows, ", vocab ", vocab));
  if (rows == 0) return absl::OkStatus();
  if (logits == nullptr || out == nullptr) return Invalid(fn, "null pointer");
  return CudaStatus(internal::LaunchArgmax(logits, rows, vocab, out, stream), fn);
}

absl::Status SampleTopP(const float* logits, int rows, int vocab, const float* temperature,
                        const float* top_p, const float* uniform, int32_t* out,
                        cudaStream_t stream) {
  constexpr absl::string_view fn = "SampleTopP";
  if (rows < 0 || vocab < 1) return Invalid(fn, absl::StrCat("rows ", rows, ", vocab ", vocab));
  if (rows == 0) return absl::OkStatus();
  if (logits == nullptr || temperature == nullptr || top_p == nullptr || uniform == nullptr ||
      out == nullptr) {
    return Invalid(fn, "null pointer");
  }
  return CudaStatus(
      internal::LaunchSampleTopP(logits, rows, vocab, temperature, top_p, uniform, out, stream),
      fn);
}

}  // namespace kvrecall::worker::cuda
