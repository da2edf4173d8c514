// Statistics of a query/key trace that decide how well the retrieval indices can work, computed
// the same way on generated data (indexer/synthetic.h) and on real dumps (indexer/qk_dump.h) so
// the two can be compared (issue 7 item 3):
//   query self-similarity   cos(q_t, q_{t-Δ}) per query head, mean over heads and positions t,
//                           for each lag Δ (CTKVR relies on it staying high over ~1K positions);
//   top-k overlap           |E_t ∩ E_{t-1}| / k between the exact group selections (exact.h) of
//                           adjacent positions t-1, t (both in `positions`);
//   mass concentration      per head, the softmax mass (over the range) of its top 1% and top
//                           10% tokens, mean over heads and positions (how peaked attention is);
//   key statistics          over the keys of the range: mean L2 norm and its coefficient of
//                           variation (std / mean), the share of Σ_j E[k_j²] held by the 4
//                           channels with the largest E[k_j²] ("massive" channels), and the key
//                           cosine cos(k_t, k_{t-Δ}) for the same lags (how local key content is:
//                           what segmented clustering relies on).
// Pure and thread-safe.
#ifndef KVRECALL_INDEXER_TRACE_STATS_H_
#define KVRECALL_INDEXER_TRACE_STATS_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "indexer/paged_rows.h"

namespace kvrecall::indexer {

struct TraceStatsInput {
  const PagedRows* keys = nullptr;  // one kv-head's keys, post-RoPE
  int group = 0;                    // query heads of the kv-head
  // The query group at a position, [group][head_dim] fp32 post-RoPE, or nullptr when the trace
  // does not hold that position (pairs with such a position are skipped).
  std::function<const float*(int64_t position)> query;
  std::vector<int64_t> positions;  // positions t evaluated, ascending
  int64_t range_begin = 0;         // attention range [range_begin, range_end) of keys
  int64_t range_end = 0;
  int k = 1024;     // selection size for the top-k overlap
  float scale = 0;  // 0 means 1/sqrt(head_dim)
  std::vector<int> lags = {1, 16, 256, 1024};
};

struct TraceStats {
  std::vector<int> lags;
  std::vector<double> query_cosine;         // per lag; NaN when no pair had both queries
  std::vector<int64_t> query_cosine_pairs;  // (position, head) pairs averaged, per lag
  double topk_overlap_adjacent = 0;         // NaN when no adjacent pair
  int64_t topk_overlap_pairs = 0;
  double mass_top1pct = 0;  // NaN when no position had a query
  double mass_top10pct = 0;
  double key_norm_mean = 0;
  double key_norm_cv = 0;
  double key_top4_channel_energy = 0;
  std::vector<double> key_cosine;  // per lag (mean over t in the range with t - lag in it too)
};

// REQUIRES: keys and query set; the range inside the keys and non-empty.
TraceStats ComputeTraceStats(const TraceStatsInput& input);

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_TRACE_STATS_H_
