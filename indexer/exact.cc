#include "indexer/exact.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "indexer/index.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer {
namespace {

absl::Status ValidateQuery(const SearchQuery& q) {
  if (q.keys == nullptr || q.queries == nullptr)
    return absl::InvalidArgumentError("null query or keys");
  if (q.group <= 0 || q.k < 0) return absl::InvalidArgumentError("group must be > 0 and k >= 0");
  if (q.keys->head_dim <= 0) return absl::InvalidArgumentError("head_dim must be > 0");
  if (q.token_begin < 0 || q.token_begin > q.token_end || q.token_end > q.keys->num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("token range [", q.token_begin, ", ",
                                                   q.token_end, ") outside [0, ",
                                                   q.keys->num_tokens, ")"));
  }
  const int64_t n = static_cast<int64_t>(q.group) * q.keys->head_dim;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(q.queries[i]))
      return absl::InvalidArgumentError("queries contain NaN or Inf");
  }
  if (!std::isfinite(q.scale)) return absl::InvalidArgumentError("scale must be finite");
  return absl::OkStatus();
}

// Hits of the whole range for one query (queries scaled by q.scale).
void RangeHits(const SearchQuery& q, internal::Hits* hits) {
  internal::QueryForms forms;
  internal::SegmentSearch s;
  forms.Set(q.queries, q.group, *q.keys, q.scale, &s);
  s.range_begin = q.token_begin;
  s.range_end = q.token_end;
  s.k = q.k;
  s.isa = kernels::BestIsa();
  internal::ExactHits(s, q.token_begin, q.token_end, hits);
}

}  // namespace

void ExactScores(const SearchQuery& q, std::vector<float>* out) {
  const int64_t n = q.token_end - q.token_begin;
  out->assign(static_cast<size_t>(std::max<int64_t>(n, 0)), 0.0f);
  if (n <= 0) return;
  internal::Hits hits;
  RangeHits(q, &hits);
  for (int h = 0; h < q.group; ++h) {
    const float* l = hits.logits.data() + h * n;
    for (int64_t i = 0; i < n; ++i) {
      (*out)[i] = std::max((*out)[i],
                           static_cast<float>(std::exp(static_cast<double>(l[i]) - hits.lse[h])));
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
    thread_local internal::HitsList list;
    list.Reset();
    internal::Hits* hits = list.Add();
    RangeHits(q, hits);
    internal::SelectFromHits(list.view(), q.group, q.k, &(*out)[i]);
  };
  internal::ForEach(pool, static_cast<int64_t>(queries.size()), one);
  return absl::OkStatus();
}

}  // namespace kvrecall::indexer
