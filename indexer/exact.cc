#include "indexer/exact.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace kvrecall::indexer {
namespace {

absl::Status ValidateQuery(const SearchQuery& q) {
  if (q.keys == nullptr || q.queries == nullptr) return absl::InvalidArgumentError("null query or keys");
  if (q.group <= 0 || q.k < 0) return absl::InvalidArgumentError("group must be > 0 and k >= 0");
  if (q.token_begin < 0 || q.token_begin > q.token_end || q.token_end > q.keys->num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("token range [", q.token_begin, ", ", q.token_end,
                                                   ") outside [0, ", q.keys->num_tokens, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

void ExactScores(const SearchQuery& q, std::vector<float>* out) {
  const int d = q.keys->head_dim;
  const int64_t n = q.token_end - q.token_begin;
  out->assign(static_cast<size_t>(n), 0.0f);
  if (n == 0) return;
  std::vector<float> logits(static_cast<size_t>(n) * q.group);  // [n][group]
  std::vector<float> key(d);
  for (int64_t i = 0; i < n; ++i) {
    ToF32(q.keys->dtype, q.keys->row(q.token_begin + i), d, key.data());
    for (int h = 0; h < q.group; ++h) {
      const float* qh = q.queries + static_cast<size_t>(h) * d;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int j = 0;
      for (; j + 8 <= d; j += 8)
        for (int u = 0; u < 8; ++u) acc[u] += qh[j + u] * key[j + u];
      for (; j < d; ++j) acc[0] += qh[j] * key[j];
      const float dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      logits[static_cast<size_t>(i) * q.group + h] = dot * q.scale;
    }
  }
  for (int h = 0; h < q.group; ++h) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, logits[static_cast<size_t>(i) * q.group + h]);
    double z = 0;
    for (int64_t i = 0; i < n; ++i) z += std::exp(logits[static_cast<size_t>(i) * q.group + h] - mx);
    const float inv_z = static_cast<float>(1.0 / z);
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(logits[static_cast<size_t>(i) * q.group + h] - mx) * inv_z;
      (*out)[i] = std::max((*out)[i], p);
    }
  }
}

absl::Status ExactSearch(absl::Span<const SearchQuery> queries, ThreadPool* pool,
                         std::vector<std::vector<int32_t>>* out) {
  for (const SearchQuery& q : queries) {
    if (absl::Status s = ValidateQuery(q); !s.ok()) return s;
  }
  out->assign(queries.size(), {});
  auto one = [&](int64_t i) {
    const SearchQuery& q = queries[i];
    std::vector<float> scores;
    ExactScores(q, &scores);
    const int64_t n = static_cast<int64_t>(scores.size());
    const int64_t k = std::min<int64_t>(q.k, n);
    std::vector<int32_t> idx(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) idx[t] = static_cast<int32_t>(t);
    auto better = [&](int32_t a, int32_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
    if (k < n) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), better);
    idx.resize(static_cast<size_t>(k));
    std::sort(idx.begin(), idx.end());
    for (int32_t& t : idx) t = static_cast<int32_t>(t + q.token_begin);
    (*out)[i] = std::move(idx);
  };
  if (pool != nullptr) {
    pool->ParallelFor(static_cast<int64_t>(queries.size()), one);
  } else {
    for (size_t i = 0; i < queries.size(); ++i) one(static_cast<int64_t>(i));
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::indexer
