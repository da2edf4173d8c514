#include "indexer/trace_stats.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/dtype.h"
#include "indexer/exact.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer {

TraceStats ComputeTraceStats(const TraceStatsInput& in) {
  const int d = in.keys->head_dim, g = in.group;
  const float scale =
      in.scale > 0 ? in.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  TraceStats st;
  st.lags = in.lags;
  for (int lag : in.lags) {
    double sum = 0;
    int64_t pairs = 0;
    for (int64_t t : in.positions) {
      const float* a = in.query(t);
      const float* b = t - lag >= 0 ? in.query(t - lag) : nullptr;
      if (a == nullptr || b == nullptr) continue;
      for (int h = 0; h < g; ++h) {
        const float* x = a + static_cast<size_t>(h) * d;
        const float* y = b + static_cast<size_t>(h) * d;
        double xy = 0, xx = 0, yy = 0;
        for (int j = 0; j < d; ++j) {
          xy += static_cast<double>(x[j]) * y[j];
          xx += static_cast<double>(x[j]) * x[j];
          yy += static_cast<double>(y[j]) * y[j];
        }
        if (xx == 0 || yy == 0) continue;
        sum += xy / std::sqrt(xx * yy);
        ++pairs;
      }
    }
    st.query_cosine.push_back(pairs > 0 ? sum / static_cast<double>(pairs) : nan);
    st.query_cosine_pairs.push_back(pairs);
  }
  // Exact selections and per-head concentration.
  const int64_t n = in.range_end - in.range_begin;
  const int64_t top1 = std::max<int64_t>(1, n / 100), top10 = std::max<int64_t>(1, n / 10);
  std::vector<std::vector<int32_t>> sel(in.positions.size());
  std::vector<bool> have(in.positions.size(), false);
  double m1 = 0, m10 = 0;
  int64_t heads = 0;
  internal::QueryForms forms;
  std::vector<float> p;
  for (size_t i = 0; i < in.positions.size(); ++i) {
    const float* q = in.query(in.positions[i]);
    if (q == nullptr) continue;
    have[i] = true;
    SearchQuery sq{q, g, in.keys, in.range_begin, in.range_end, in.k, scale};
    std::vector<std::vector<int32_t>> one;
    if (ExactSearch({&sq, 1}, nullptr, &one).ok()) sel[i] = std::move(one[0]);
    internal::SegmentSearch s;
    forms.Set(q, g, *in.keys, scale, &s);
    s.isa = kernels::BestIsa();
    internal::Hits hits;
    internal::ExactHits(s, in.range_begin, in.range_end, &hits);
    for (int h = 0; h < g; ++h) {
      p.assign(hits.logits.begin() + static_cast<int64_t>(h) * n,
               hits.logits.begin() + static_cast<int64_t>(h + 1) * n);
      std::sort(p.begin(), p.end(), std::greater<float>());
      double a = 0, b = 0;
      for (int64_t t = 0; t < top10; ++t) {
        const double e = std::exp(static_cast<double>(p[t]) - hits.lse[h]);
        b += e;
        if (t < top1) a += e;
      }
      m1 += a;
      m10 += b;
      ++heads;
    }
  }
  st.mass_top1pct = heads > 0 ? m1 / static_cast<double>(heads) : nan;
  st.mass_top10pct = heads > 0 ? m10 / static_cast<double>(heads) : nan;
  double ov = 0;
  for (size_t i = 1; i < in.positions.size(); ++i) {
    if (!have[i] || !have[i - 1] || in.positions[i] != in.positions[i - 1] + 1) continue;
    const auto& a = sel[i];
    const auto& b = sel[i - 1];
    if (a.empty()) continue;
    int64_t common = 0;
    for (int32_t t : a) common += std::binary_search(b.begin(), b.end(), t);
    ov += static_cast<double>(common) / static_cast<double>(a.size());
    ++st.topk_overlap_pairs;
  }
  st.topk_overlap_adjacent =
      st.topk_overlap_pairs > 0 ? ov / static_cast<double>(st.topk_overlap_pairs) : nan;
  // Keys of the range.
  std::vector<float> kf(static_cast<size_t>(n) * d);
  for (int64_t t = 0; t < n; ++t)
    ToF32(in.keys->dtype, in.keys->row(in.range_begin + t), static_cast<size_t>(d),
          kf.data() + t * d);
  std::vector<double> norm(static_cast<size_t>(n)), energy(static_cast<size_t>(d), 0.0);
  double ns = 0, ns2 = 0;
  for (int64_t t = 0; t < n; ++t) {
    double x2 = 0;
    for (int j = 0; j < d; ++j) {
      const double v = kf[t * d + j];
      x2 += v * v;
      energy[j] += v * v;
    }
    norm[t] = std::sqrt(x2);
    ns += norm[t];
    ns2 += x2;
  }
  const double mean = ns / static_cast<double>(n);
  st.key_norm_mean = mean;
  st.key_norm_cv =
      mean > 0 ? std::sqrt(std::max(0.0, ns2 / static_cast<double>(n) - mean * mean)) / mean : nan;
  double total = 0;
  for (double e : energy) total += e;
  std::sort(energy.begin(), energy.end(), std::greater<double>());
  double top = 0;
  for (int j = 0; j < std::min(4, d); ++j) top += energy[j];
  st.key_top4_channel_energy = total > 0 ? top / total : nan;
  for (int lag : in.lags) {
    double sum = 0;
    int64_t pairs = 0;
    for (int64_t t = lag; t < n; ++t) {
      if (norm[t] == 0 || norm[t - lag] == 0) continue;
      double xy = 0;
      for (int j = 0; j < d; ++j) xy += static_cast<double>(kf[t * d + j]) * kf[(t - lag) * d + j];
      sum += xy / (norm[t] * norm[t - lag]);
      ++pairs;
    }
    st.key_cosine.push_back(pairs > 0 ? sum / static_cast<double>(pairs) : nan);
  }
  return st;
}

}  // namespace kvrecall::indexer
