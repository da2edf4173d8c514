// CentroidKV ("merged", arXiv 2506.11418): chunked soft matching compresses a token range of one
// (layer, kv-head) into fewer entries that *replace* the tokens (nothing is recalled).
//
// Per chunk of `chunk_tokens` consecutive tokens, rounds of bipartite soft matching (ToMe): the
// chunk's current entries are split by alternating position (even / odd, the roles swapping every
// round); each entry of the source side is matched to its most similar (cosine of keys) entry on
// the other side; the most similar pairs are merged (source into destination), until the chunk
// holds ceil(chunk × keep_ratio) entries. A merge takes the size-weighted mean of the keys and of
// the values and adds the counts, so attention over merged entries adds log(count) to each
// entry's logit (AttendMerged; quality.h) and a merged entry weighs as much as its tokens would
// if they were identical. Keys are merged after RoPE (post-RoPE means), as stored.
#ifndef KVRECALL_INDEXER_MERGED_H_
#define KVRECALL_INDEXER_MERGED_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/thread_pool.h"
#include "indexer/paged_rows.h"

namespace kvrecall::indexer {

struct MergedOptions {
  int chunk_tokens = 64;     // c: tokens per chunk (the last chunk may be shorter)
  double keep_ratio = 0.25;  // entries kept per chunk / tokens in it; 0.25 = 4× fewer entries
};

// The compressed representation of tokens [token_begin, token_end).
struct MergedKV {
  int head_dim = 0;
  std::vector<float> keys;           // [entries][head_dim] fp32, post-RoPE, size-weighted means
  std::vector<float> values;         // [entries][head_dim] fp32
  std::vector<int32_t> counts;       // [entries] tokens each entry stands for (sum = range size)
  std::vector<int32_t> first_token;  // [entries] lowest token id merged into the entry
  int64_t entries() const { return static_cast<int64_t>(counts.size()); }
};

// Merges keys/values rows [token_begin, token_end) chunk by chunk (chunks spread over `pool`,
// may be null; the result does not depend on it). Entries come out chunk by chunk, in order of
// first_token within a chunk. INVALID_ARGUMENT for an empty or out-of-range range, keys/values
// of different shapes, chunk_tokens <= 0 or keep_ratio outside (0, 1].
absl::StatusOr<MergedKV> MergeChunks(const PagedRows& keys, const PagedRows& values,
                                     int64_t token_begin, int64_t token_end,
                                     const MergedOptions& options, ThreadPool* pool);

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_MERGED_H_
