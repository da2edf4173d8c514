// Quality metrics of a selection against exact attention, for tests and benchmarks.
//
// Definitions (one entry = one kv-head's query group, scores as in exact.h):
//   top-k recall            |S ∩ E| / |E|, E = exact top-k ids, S = the method's ids.
//   attention-mass recall   Σ_{t∈S} score(t) / Σ_{t∈E} score(t), score(t) = max_h p_h(t) with p_h
//                           the softmax over the retrieval range: the share of the group's
//                           attention mass that the exact selection captures which S captures
//                           too. In [0, 1] (E maximises the numerator over |S| = k), 1 for exact.
//   attention mass          mean over heads of Σ_{t∈S} p_h(t): the absolute share of each head's
//                           softmax over the retrieval range that S holds.
//   output error            ||o - o_dense|| / ||o_dense|| over the group's heads, where o is
//                           attention over the given tokens (plus merged entries with a
//                           +log(count) logit bias, if any) and o_dense over every token.
// All functions are pure and thread-safe.
#ifndef KVRECALL_INDEXER_QUALITY_H_
#define KVRECALL_INDEXER_QUALITY_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "indexer/merged.h"
#include "indexer/paged_rows.h"

namespace kvrecall::indexer {

// |approx ∩ exact| / |exact| (1 when exact is empty). Ids need not be sorted.
double TopkRecall(absl::Span<const int32_t> exact, absl::Span<const int32_t> approx);

// scores: score(t) for t in [range_begin, range_begin + scores.size()) (ExactScores' output).
// Ids outside that range count 0.
double AttentionMassRecall(absl::Span<const float> scores, int64_t range_begin,
                           absl::Span<const int32_t> exact, absl::Span<const int32_t> approx);

// Mean over heads of the softmax mass (over [range_begin, range_end)) of `ids`.
// queries: [group][head_dim] fp32; scale as in exact.h.
double HeadMeanMass(const float* queries, int group, const PagedRows& keys, int64_t range_begin,
                    int64_t range_end, float scale, absl::Span<const int32_t> ids);

// Attention output per head over `ids` (any order, duplicates not allowed) plus, if `merged` is
// not null, its entries with logit bias log(count): out = [group][head_dim] fp32.
// INVALID_ARGUMENT for shape mismatches or ids outside the keys.
absl::Status AttentionOutput(const float* queries, int group, const PagedRows& keys,
                             const PagedRows& values, absl::Span<const int32_t> ids,
                             const MergedKV* merged, float scale, std::vector<float>* out);

// ||a - b|| / ||b|| (0 if both are zero).
double RelativeL2(absl::Span<const float> a, absl::Span<const float> b);

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_QUALITY_H_
