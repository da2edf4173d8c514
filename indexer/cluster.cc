// ClusterKV segment: spherical k-means over post-RoPE keys (see index.h for the contract).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "indexer/index.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer::internal {
namespace {

void Normalize(const float* src, int d, float* dst) {
  double n = 0;
  for (int j = 0; j < d; ++j) n += static_cast<double>(src[j]) * src[j];
  const float inv = n > 0 ? static_cast<float>(1.0 / std::sqrt(n)) : 0.0f;
  for (int j = 0; j < d; ++j) dst[j] = src[j] * inv;
}

// Keys [begin, end) as fp32 rows [end - begin][d].
std::vector<float> KeysToF32(const PagedRows& keys, int64_t begin, int64_t end, ThreadPool* pool) {
  const int d = keys.head_dim;
  std::vector<float> x(static_cast<size_t>(end - begin) * d);
  ForChunks(pool, end - begin, 4096, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      kernels::ToF32(keys.dtype, keys.row(begin + t), d, x.data() + t * d);
  });
  return x;
}

}  // namespace

void SphericalKMeans(const float* x, int64_t n, int d, int k, int iterations, uint64_t seed,
                     ThreadPool* pool, std::vector<float>* centroids,
                     std::vector<int32_t>* assign) {
  k = static_cast<int>(std::clamp<int64_t>(k, 1, n));
  std::vector<float> xn(static_cast<size_t>(n) * d);
  ForChunks(pool, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) Normalize(x + t * d, d, xn.data() + t * d);
  });
  // k distinct random rows (partial Fisher-Yates with a fixed generator: same seed, same rows).
  std::mt19937_64 rng(seed);
  std::vector<int32_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  centroids->assign(static_cast<size_t>(k) * d, 0.0f);
  for (int i = 0; i < k; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng() % static_cast<uint64_t>(n - i));
    std::swap(perm[i], perm[j]);
    std::copy(x + static_cast<int64_t>(perm[i]) * d, x + static_cast<int64_t>(perm[i] + 1) * d,
              centroids->begin() + static_cast<int64_t>(i) * d);
  }
  assign->assign(static_cast<size_t>(n), 0);
  std::vector<float> cn(static_cast<size_t>(k) * d);
  for (int it = 0; it < std::max(1, iterations); ++it) {
    for (int c = 0; c < k; ++c)
      Normalize(centroids->data() + static_cast<int64_t>(c) * d, d, cn.data() + c * d);
    ForChunks(pool, n, 512, [&](int64_t b, int64_t e) {
      std::vector<float> sims(static_cast<size_t>(e - b) * k);
      kernels::DotsF32(xn.data() + b * d, e - b, cn.data(), k, d, sims.data(), k);
      for (int64_t t = b; t < e; ++t) {
        const float* s = sims.data() + (t - b) * k;
        (*assign)[t] = static_cast<int32_t>(std::max_element(s, s + k) - s);
      }
    });
    std::vector<double> sum(static_cast<size_t>(k) * d, 0.0);
    std::vector<int64_t> count(static_cast<size_t>(k), 0);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t c = (*assign)[t];
      ++count[c];
      double* s = sum.data() + static_cast<int64_t>(c) * d;
      const float* xt = x + t * d;
      for (int j = 0; j < d; ++j) s[j] += xt[j];
    }
    for (int c = 0; c < k; ++c) {
      if (count[c] == 0) continue;  // keeps its previous centroid
      for (int j = 0; j < d; ++j)
        (*centroids)[static_cast<size_t>(c) * d + j] =
            static_cast<float>(sum[static_cast<size_t>(c) * d + j] / count[c]);
    }
  }
}

namespace {

class ClusterSegment final : public Segment {
 public:
  ClusterSegment(const BuildInput& in, const ClusterOptions& o)
      : Segment(in.token_begin, in.token_end, in.keys->head_dim, in.keys->dtype),
        opt_(o),
        indexed_end_(in.token_begin) {
    offsets_.push_back(0);
  }

  Method method() const override { return Method::kCluster; }

  void AddClusters(const PagedRows& keys, int64_t b, int64_t e, int k, uint64_t seed,
                   ThreadPool* pool) {
    const int d = head_dim_;
    std::vector<float> x = KeysToF32(keys, b, e, pool);
    std::vector<float> cent;
    std::vector<int32_t> assign;
    SphericalKMeans(x.data(), e - b, d, k, opt_.iterations, seed, pool, &cent, &assign);
    const int kk = static_cast<int>(cent.size() / d);
    std::vector<std::vector<int32_t>> members(static_cast<size_t>(kk));
    for (int64_t t = 0; t < e - b; ++t) members[assign[t]].push_back(static_cast<int32_t>(b + t));
    for (int c = 0; c < kk; ++c) {
      if (members[c].empty()) continue;
      centroids_.insert(centroids_.end(), cent.begin() + static_cast<int64_t>(c) * d,
                        cent.begin() + static_cast<int64_t>(c + 1) * d);
      tokens_.insert(tokens_.end(), members[c].begin(), members[c].end());
      offsets_.push_back(static_cast<int32_t>(tokens_.size()));
    }
    indexed_end_ = e;
  }

  absl::Status Append(const PagedRows& keys, int64_t new_end, ThreadPool* pool) override {
    if (keys.head_dim != head_dim_ || keys.dtype != dtype_ || new_end < end_ ||
        new_end > keys.num_tokens) {
      return absl::InvalidArgumentError("append: shape mismatch or end outside the keys");
    }
    end_ = new_end;
    while (end_ - indexed_end_ >= opt_.append_every) {
      AddClusters(keys, indexed_end_, indexed_end_ + opt_.append_every, opt_.append_clusters,
                  opt_.seed + static_cast<uint64_t>(indexed_end_), pool);
    }
    return absl::OkStatus();
  }

  size_t MemoryBytes() const override {
    return centroids_.size() * 4 + tokens_.size() * 4 + offsets_.size() * 4;
  }

  absl::Status SearchInternal(const SegmentSearch& s, HitsList* out) const override {
    const int d = head_dim_, g = s.group;
    const int64_t k = static_cast<int64_t>(offsets_.size()) - 1;
    const int64_t rb = std::max(begin_, s.range_begin), re = std::min(indexed_end_, s.range_end);
    if (k > 0 && rb < re) {
      std::vector<const uint8_t*> rows(static_cast<size_t>(k));
      for (int64_t c = 0; c < k; ++c)
        rows[c] = reinterpret_cast<const uint8_t*>(centroids_.data() + c * d);
      std::vector<float> logits(static_cast<size_t>(g) * k);
      kernels::QueryKeyDots(DType::kF32, rows.data(), k, d, s.scaled_queries, g, logits.data(), k,
                            s.isa);
      Hits& hits = *out->Add();
      const bool whole = rb <= begin_ && re >= indexed_end_;
      std::vector<float> log_count;
      std::vector<int64_t> kept;
      if (whole) {  // every cluster, straight from the segment's storage (no copy)
        hits.external = tokens_.data();
        hits.external_size = static_cast<int64_t>(tokens_.size());
      }
      for (int64_t c = 0; c < k; ++c) {
        size_t before, now;
        if (whole) {  // clusters are never empty (AddClusters drops empty ones)
          before = static_cast<size_t>(offsets_[c]);
          now = static_cast<size_t>(offsets_[c + 1]);
        } else {
          before = hits.tokens.size();
          for (int32_t i = offsets_[c]; i < offsets_[c + 1]; ++i)
            if (tokens_[i] >= rb && tokens_[i] < re) hits.tokens.push_back(tokens_[i]);
          now = hits.tokens.size();
        }
        const size_t cnt = now - before;
        if (cnt == 0) continue;
        hits.unit_end.push_back(static_cast<int32_t>(now));
        kept.push_back(c);
        log_count.push_back(static_cast<float>(std::log(static_cast<double>(cnt))));
      }
      const int64_t u = static_cast<int64_t>(kept.size());
      hits.units = u;
      hits.logits.resize(static_cast<size_t>(g) * u);
      hits.lse.resize(static_cast<size_t>(g));
      std::vector<float> weighted(static_cast<size_t>(u));
      for (int h = 0; h < g; ++h) {
        for (int64_t i = 0; i < u; ++i) {
          hits.logits[h * u + i] = logits[h * k + kept[i]];
          weighted[i] = hits.logits[h * u + i] + log_count[i];
        }
        hits.lse[h] = LogSumExp(weighted.data(), u, s.isa);
      }
      if (u == 0) out->PopBack();
    }
    // Appended tokens not yet clustered: scored exactly.
    const int64_t pb = std::max(indexed_end_, s.range_begin), pe = std::min(end_, s.range_end);
    if (pb < pe) ExactHits(s, pb, pe, out->Add());
    return absl::OkStatus();
  }

 private:
  ClusterOptions opt_;
  int64_t indexed_end_;           // [begin_, indexed_end_) is clustered; the rest is pending
  std::vector<float> centroids_;  // [clusters][d] mean of raw keys
  std::vector<int32_t> tokens_;   // members, cluster by cluster, ascending within a cluster
  std::vector<int32_t> offsets_;  // cluster c = tokens_[offsets_[c], offsets_[c + 1])
};

}  // namespace

absl::StatusOr<std::unique_ptr<Segment>> BuildClusterSegment(const BuildInput& input,
                                                             const ClusterOptions& options,
                                                             ThreadPool* pool) {
  if (options.tokens_per_cluster <= 0 || options.iterations <= 0 || options.append_every <= 0 ||
      options.append_clusters <= 0) {
    return absl::InvalidArgumentError(
        "cluster: tokens_per_cluster, iterations, append_every and append_clusters must be > 0");
  }
  auto seg = std::make_unique<ClusterSegment>(input, options);
  const int64_t n = input.token_end - input.token_begin;
  const int k = static_cast<int>(std::max<int64_t>(1, n / options.tokens_per_cluster));
  seg->AddClusters(*input.keys, input.token_begin, input.token_end, k, options.seed, pool);
  return std::unique_ptr<Segment>(std::move(seg));
}

}  // namespace kvrecall::indexer::internal
