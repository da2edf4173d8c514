// Exact retrieval: the true top-k tokens of a kv-head for its whole query group.
//
// Score of token t for a group of G query heads (GQA, one selection per kv-head):
//   p_h(t) = softmax over the candidate range of (q_h . k_t * scale)   for each head h
//   score(t) = max_h p_h(t)
// so a token that matters to any head of the group is kept, and heads with flat and peaky
// distributions are comparable. The result is the `k` best tokens (ties: lower token first),
// returned in ascending token order. This is the oracle the approximate indices are measured by.
#ifndef KVRECALL_INDEXER_EXACT_H_
#define KVRECALL_INDEXER_EXACT_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/thread_pool.h"
#include "indexer/paged_rows.h"

namespace kvrecall::indexer {

struct SearchQuery {
  const float* queries = nullptr;  // [group][head_dim], fp32, post-RoPE
  int group = 0;
  const PagedRows* keys = nullptr;
  int64_t token_begin = 0;  // candidates: [token_begin, token_end)
  int64_t token_end = 0;
  int k = 0;                // number of tokens to select
  float scale = 0;          // usually 1/sqrt(head_dim)
};

// Runs every query (spread over `pool`, which may be null for the calling thread only).
// On OK, (*out)[i] holds min(k, token_end - token_begin) ascending token ids for query i.
// INVALID_ARGUMENT if a query's range lies outside its keys or a shape is inconsistent.
absl::Status ExactSearch(absl::Span<const SearchQuery> queries, ThreadPool* pool,
                         std::vector<std::vector<int32_t>>* out);

// Scores used above for one query: out[t - token_begin] = score(t). Exposed for tests and for
// quality metrics.
void ExactScores(const SearchQuery& query, std::vector<float>* out);

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_EXACT_H_
