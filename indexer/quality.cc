#include "indexer/quality.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer {

double TopkRecall(absl::Span<const int32_t> exact, absl::Span<const int32_t> approx) {
  if (exact.empty()) return 1.0;
  std::unordered_set<int32_t> a(approx.begin(), approx.end());
  int64_t hit = 0;
  for (int32_t t : exact) hit += a.count(t);
  return static_cast<double>(hit) / static_cast<double>(exact.size());
}

double AttentionMassRecall(absl::Span<const float> scores, int64_t range_begin,
                           absl::Span<const int32_t> exact, absl::Span<const int32_t> approx) {
  auto mass = [&](absl::Span<const int32_t> ids) {
    double m = 0;
    for (int32_t t : ids) {
      const int64_t i = t - range_begin;
      if (i >= 0 && i < static_cast<int64_t>(scores.size())) m += scores[i];
    }
    return m;
  };
  const double e = mass(exact);
  return e > 0 ? mass(approx) / e : 1.0;
}

double HeadMeanMass(const float* queries, int group, const PagedRows& keys, int64_t range_begin,
                    int64_t range_end, float scale, absl::Span<const int32_t> ids) {
  const int64_t n = range_end - range_begin;
  if (n <= 0 || group <= 0) return 0;
  internal::QueryForms forms;
  internal::SegmentSearch s;
  forms.Set(queries, group, keys, scale, &s);
  s.isa = kernels::BestIsa();
  internal::Hits hits;
  internal::ExactHits(s, range_begin, range_end, &hits);
  double total = 0;
  for (int h = 0; h < group; ++h) {
    double m = 0;
    for (int32_t t : ids) {
      if (t >= range_begin && t < range_end)
        m += std::exp(hits.logits[h * n + (t - range_begin)] - hits.lse[h]);
    }
    total += m;
  }
  return total / group;
}

absl::Status AttentionOutput(const float* queries, int group, const PagedRows& keys,
                             const PagedRows& values, absl::Span<const int32_t> ids,
                             const MergedKV* merged, float scale, std::vector<float>* out) {
  const int d = keys.head_dim;
  if (d <= 0 || values.head_dim != d || group <= 0 ||
      (merged != nullptr && merged->head_dim != d)) {
    return absl::InvalidArgumentError("attention: shape mismatch");
  }
  for (int32_t t : ids) {
    if (t < 0 || t >= keys.num_tokens || t >= values.num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("attention: id ", t, " outside the keys"));
    }
  }
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t m = merged != nullptr ? merged->entries() : 0;
  std::vector<float> scaled(static_cast<size_t>(group) * d);
  for (size_t i = 0; i < scaled.size(); ++i) scaled[i] = queries[i] * scale;
  std::vector<const uint8_t*> rows(static_cast<size_t>(n + m));
  for (int64_t i = 0; i < n; ++i) rows[i] = keys.row(ids[i]);
  for (int64_t i = 0; i < m; ++i)
    rows[n + i] = reinterpret_cast<const uint8_t*>(merged->keys.data() + i * d);
  std::vector<float> logits(static_cast<size_t>(group) * (n + m));
  kernels::QueryKeyDots(keys.dtype, rows.data(), n, d, scaled.data(), group, logits.data(), n + m);
  if (m > 0) {
    kernels::QueryKeyDots(DType::kF32, rows.data() + n, m, d, scaled.data(), group,
                          logits.data() + n, n + m);
    for (int h = 0; h < group; ++h)
      for (int64_t i = 0; i < m; ++i)
        logits[h * (n + m) + n + i] +=
            static_cast<float>(std::log(static_cast<double>(merged->counts[i])));
  }
  out->assign(static_cast<size_t>(group) * d, 0.0f);
  std::vector<double> acc(static_cast<size_t>(d));
  std::vector<float> v(static_cast<size_t>(d));
  for (int h = 0; h < group; ++h) {
    const float* l = logits.data() + h * (n + m);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n + m; ++i) mx = std::max(mx, l[i]);
    std::fill(acc.begin(), acc.end(), 0.0);
    double z = 0;
    for (int64_t i = 0; i < n + m; ++i) {
      const double p = std::exp(static_cast<double>(l[i]) - mx);
      z += p;
      const float* vi;
      if (i < n) {
        kernels::ToF32(values.dtype, values.row(ids[i]), d, v.data());
        vi = v.data();
      } else {
        vi = merged->values.data() + (i - n) * d;
      }
      for (int j = 0; j < d; ++j) acc[j] += p * vi[j];
    }
    for (int j = 0; j < d; ++j)
      (*out)[static_cast<size_t>(h) * d + j] = z > 0 ? static_cast<float>(acc[j] / z) : 0.0f;
  }
  return absl::OkStatus();
}

double RelativeL2(absl::Span<const float> a, absl::Span<const float> b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}

}  // namespace kvrecall::indexer
