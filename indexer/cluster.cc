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

// Per-cluster, per-dimension variance of the raw rows around their cluster's centroid (the
// mean of its rows): [k][d].
std::vector<float> ClusterVariance(const float* x, int64_t n, int d, const std::vector<float>& cent,
                                   const std::vector<int32_t>& assign) {
  const int k = static_cast<int>(cent.size() / d);
  std::vector<double> sum(static_cast<size_t>(k) * d, 0.0);
  std::vector<int64_t> count(static_cast<size_t>(k), 0);
  for (int64_t t = 0; t < n; ++t) {
    const int32_t c = assign[t];
    ++count[c];
    const float* m = cent.data() + static_cast<int64_t>(c) * d;
    double* s = sum.data() + static_cast<int64_t>(c) * d;
    for (int j = 0; j < d; ++j) {
      const double e = static_cast<double>(x[t * d + j]) - m[j];
      s[j] += e * e;
    }
  }
  std::vector<float> var(sum.size(), 0.0f);
  for (int c = 0; c < k; ++c) {
    if (count[c] == 0) continue;
    for (int j = 0; j < d; ++j)
      var[static_cast<size_t>(c) * d + j] =
          static_cast<float>(sum[static_cast<size_t>(c) * d + j] / count[c]);
  }
  return var;
}

}  // namespace

int SphericalKMeans(const float* x, int64_t n, int d, int k, int iterations, double tolerance,
                    uint64_t seed, ThreadPool* pool, std::vector<float>* centroids,
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
  assign->assign(static_cast<size_t>(n), -1);
  std::vector<float> cn(static_cast<size_t>(k) * d);
  // Rows that changed cluster, per chunk of 512 rows (summed in chunk order: deterministic).
  std::vector<int64_t> changed(static_cast<size_t>((n + 511) / 512));
  const int64_t stop_at = static_cast<int64_t>(std::floor(tolerance * static_cast<double>(n)));
  int it = 0;
  while (it < std::max(1, iterations)) {
    ++it;
    for (int c = 0; c < k; ++c)
      Normalize(centroids->data() + static_cast<int64_t>(c) * d, d, cn.data() + c * d);
    ForChunks(pool, n, 512, [&](int64_t b, int64_t e) {
      std::vector<float> sims(static_cast<size_t>(e - b) * k);
      kernels::DotsF32(xn.data() + b * d, e - b, cn.data(), k, d, sims.data(), k);
      int64_t moved = 0;
      for (int64_t t = b; t < e; ++t) {
        const float* s = sims.data() + (t - b) * k;
        const int32_t a = static_cast<int32_t>(std::max_element(s, s + k) - s);
        moved += a != (*assign)[t];
        (*assign)[t] = a;
      }
      changed[static_cast<size_t>(b / 512)] = moved;
    });
    int64_t moved = 0;
    for (int64_t m : changed) moved += m;
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
    // Converged: centroids are the means of an assignment that (almost) no longer changes.
    if (moved <= stop_at) break;
  }
  return it;
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

  ClusterSegment(int64_t begin, int64_t end, int head_dim, DType dtype)
      : Segment(begin, end, head_dim, dtype), indexed_end_(begin) {}

  Method method() const override { return Method::kCluster; }

  std::unique_ptr<Segment> Clone() const override {
    return std::make_unique<ClusterSegment>(*this);
  }

  void SerializeInternal(ByteWriter* w) const override {
    w->I32(opt_.tokens_per_cluster);
    w->I32(opt_.iterations);
    w->I32(opt_.append_every);
    w->I32(opt_.append_clusters);
    w->U64(opt_.seed);
    w->I32(opt_.segment_tokens);
    w->F64(opt_.tolerance);
    w->U8(opt_.variance_ranking ? 1 : 0);
    w->I32(opt_.rescore_factor);
    w->I64(indexed_end_);
    w->Array(centroids_);
    w->Array(variances_);
    w->Array(tokens_);
    w->Array(offsets_);
    w->I32(kmeans_runs_);
    w->I64(iterations_run_);
  }

  // Reads the body written by SerializeInternal; false when it is inconsistent.
  bool Parse(ByteReader* r) {
    opt_.tokens_per_cluster = r->I32();
    opt_.iterations = r->I32();
    opt_.append_every = r->I32();
    opt_.append_clusters = r->I32();
    opt_.seed = r->U64();
    opt_.segment_tokens = r->I32();
    opt_.tolerance = r->F64();
    const uint8_t vr = r->U8();
    opt_.variance_ranking = vr == 1;
    opt_.rescore_factor = r->I32();
    indexed_end_ = r->I64();
    centroids_ = r->Array<float>();
    variances_ = r->Array<float>();
    tokens_ = r->Array<int32_t>();
    offsets_ = r->Array<int32_t>();
    kmeans_runs_ = r->I32();
    iterations_run_ = r->I64();
    if (!r->ok() || opt_.tokens_per_cluster <= 0 || opt_.iterations <= 0 ||
        opt_.append_every <= 0 || opt_.append_clusters <= 0 || opt_.segment_tokens < 0 ||
        !(opt_.tolerance >= 0) || !(opt_.tolerance < 1) || vr > 1 || opt_.rescore_factor < 0 ||
        indexed_end_ < begin_ || indexed_end_ > end_ || offsets_.empty() || offsets_[0] != 0 ||
        static_cast<size_t>(offsets_.back()) != tokens_.size()) {
      return false;
    }
    const size_t k = offsets_.size() - 1, d = static_cast<size_t>(head_dim_);
    if (centroids_.size() != k * d || (!variances_.empty() && variances_.size() != k * d) ||
        (variances_.empty() && opt_.variance_ranking && k > 0)) {
      return false;
    }
    for (size_t c = 0; c < k; ++c) {
      if (offsets_[c + 1] <= offsets_[c]) return false;  // clusters are never empty
    }
    // The clusters partition [begin_, indexed_end_): each token in exactly one (a token listed
    // twice would be selected twice, and the slot plans assume distinct ids).
    if (static_cast<int64_t>(tokens_.size()) != indexed_end_ - begin_) return false;
    std::vector<bool> seen(tokens_.size(), false);
    for (int32_t t : tokens_) {
      if (t < begin_ || t >= indexed_end_ || seen[static_cast<size_t>(t - begin_)]) return false;
      seen[static_cast<size_t>(t - begin_)] = true;
    }
    return true;
  }

  void AddClusters(const PagedRows& keys, int64_t b, int64_t e, int k, uint64_t seed,
                   ThreadPool* pool) {
    const int d = head_dim_;
    std::vector<float> x = KeysToF32(keys, b, e, pool);
    std::vector<float> cent;
    std::vector<int32_t> assign;
    iterations_run_ += SphericalKMeans(x.data(), e - b, d, k, opt_.iterations, opt_.tolerance, seed,
                                       pool, &cent, &assign);
    ++kmeans_runs_;
    std::vector<float> var;
    if (opt_.variance_ranking) var = ClusterVariance(x.data(), e - b, d, cent, assign);
    AddMembers(b, e, cent, var, assign);
    indexed_end_ = e;
  }

  // The build: k-means separately on consecutive chunks of segment_tokens (the last chunk
  // absorbs a remainder shorter than half a chunk), each with chunk / tokens_per_cluster
  // clusters; chunks run in parallel on `pool`. Equivalent to AddClusters over the whole range
  // when segment_tokens is 0 or covers it.
  void BuildChunked(const PagedRows& keys, int64_t b, int64_t e, ThreadPool* pool) {
    const int64_t n = e - b, st = opt_.segment_tokens;
    std::vector<std::pair<int64_t, int64_t>> chunks;
    if (st <= 0 || n < st + st / 2) {
      chunks.emplace_back(b, e);
    } else {
      for (int64_t c = b; c < e;) {
        const int64_t ce = e - (c + st) < st / 2 ? e : c + st;
        chunks.emplace_back(c, ce);
        c = ce;
      }
    }
    auto clusters_of = [&](int64_t len) {
      return static_cast<int>(std::max<int64_t>(1, len / opt_.tokens_per_cluster));
    };
    if (chunks.size() == 1) {
      AddClusters(keys, b, e, clusters_of(n), opt_.seed, pool);
      return;
    }
    const int64_t nc = static_cast<int64_t>(chunks.size());
    std::vector<std::vector<float>> cents(static_cast<size_t>(nc));
    std::vector<std::vector<int32_t>> assigns(static_cast<size_t>(nc));
    std::vector<std::vector<float>> vars(static_cast<size_t>(nc));
    std::vector<int> iters(static_cast<size_t>(nc));
    ForChunks(pool, nc, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const auto [xb, xe] = chunks[c];
        std::vector<float> x = KeysToF32(keys, xb, xe, nullptr);
        iters[c] = SphericalKMeans(
            x.data(), xe - xb, head_dim_, clusters_of(xe - xb), opt_.iterations, opt_.tolerance,
            opt_.seed + static_cast<uint64_t>(xb - b), nullptr, &cents[c], &assigns[c]);
        if (opt_.variance_ranking)
          vars[c] = ClusterVariance(x.data(), xe - xb, head_dim_, cents[c], assigns[c]);
      }
    });
    for (int64_t c = 0; c < nc; ++c) {
      AddMembers(chunks[c].first, chunks[c].second, cents[c], vars[c], assigns[c]);
      iterations_run_ += iters[c];
      ++kmeans_runs_;
    }
    indexed_end_ = e;
  }

  // Appends the non-empty clusters of one k-means run over tokens [b, e).
  void AddMembers(int64_t b, int64_t e, const std::vector<float>& cent,
                  const std::vector<float>& var, const std::vector<int32_t>& assign) {
    const int d = head_dim_;
    const int kk = static_cast<int>(cent.size() / d);
    std::vector<std::vector<int32_t>> members(static_cast<size_t>(kk));
    for (int64_t t = 0; t < e - b; ++t) members[assign[t]].push_back(static_cast<int32_t>(b + t));
    for (int c = 0; c < kk; ++c) {
      if (members[c].empty()) continue;
      centroids_.insert(centroids_.end(), cent.begin() + static_cast<int64_t>(c) * d,
                        cent.begin() + static_cast<int64_t>(c + 1) * d);
      if (!var.empty()) {
        variances_.insert(variances_.end(), var.begin() + static_cast<int64_t>(c) * d,
                          var.begin() + static_cast<int64_t>(c + 1) * d);
      }
      tokens_.insert(tokens_.end(), members[c].begin(), members[c].end());
      offsets_.push_back(static_cast<int32_t>(tokens_.size()));
    }
  }

  void Info(ClusterInfo* info) const {
    info->offsets = offsets_;
    info->tokens = tokens_;
    info->kmeans_runs = kmeans_runs_;
    info->kmeans_iterations = iterations_run_;
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
    return centroids_.size() * 4 + variances_.size() * 4 + tokens_.size() * 4 + offsets_.size() * 4;
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
      if (!variances_.empty()) {
        // log E_c[exp(q·k)] ≈ q·μ_c + ½ Σ_j q_j² σ²_cj (Gaussian, diagonal): the centroid logit
        // alone is the log of the *geometric* mean of exp(q·k) over the cluster and under-rates
        // clusters whose mass sits in a few of their tokens.
        std::vector<float> half_q2(static_cast<size_t>(g) * d), bonus(static_cast<size_t>(g) * k);
        for (size_t i = 0; i < half_q2.size(); ++i)
          half_q2[i] = 0.5f * s.scaled_queries[i] * s.scaled_queries[i];
        for (int64_t c = 0; c < k; ++c)
          rows[c] = reinterpret_cast<const uint8_t*>(variances_.data() + c * d);
        kernels::QueryKeyDots(DType::kF32, rows.data(), k, d, half_q2.data(), g, bonus.data(), k,
                              s.isa);
        for (size_t i = 0; i < logits.size(); ++i) logits[i] += bonus[i];
      }
      if (opt_.rescore_factor > 0 && s.k > 0) {
        RescoredHits(s, rb, re, logits, out);
      } else {
        WholeClusterHits(s, rb, re, logits, out);
      }
    }
    // Appended tokens not yet clustered: scored exactly.
    const int64_t pb = std::max(indexed_end_, s.range_begin), pe = std::min(end_, s.range_end);
    if (pb < pe) ExactHits(s, pb, pe, out->Add());
    return absl::OkStatus();
  }

 private:
  // ClusterKV's selection: every cluster (its tokens inside [rb, re)) is one unit scored by its
  // centroid logits; the merge takes whole units until the budget.
  void WholeClusterHits(const SegmentSearch& s, int64_t rb, int64_t re,
                        const std::vector<float>& logits, HitsList* out) const {
    const int g = s.group;
    const int64_t k = static_cast<int64_t>(offsets_.size()) - 1;
    {
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
  }

  // Token-level refinement (ClusterOptions::rescore_factor): clusters in the order of their
  // group score (max over heads of the size-weighted softmax of centroid logits, as the merge
  // ranks whole clusters) until they hold rescore_factor × k tokens of [rb, re); those tokens
  // are scored exactly and are the units. The clusters not taken still count towards each
  // head's normaliser with their centroid estimate, size × exp(logit), so that the candidates
  // are not over-rated next to other segments' tokens.
  void RescoredHits(const SegmentSearch& s, int64_t rb, int64_t re,
                    const std::vector<float>& logits, HitsList* out) const {
    const int g = s.group;
    const int64_t k = static_cast<int64_t>(offsets_.size()) - 1;
    const bool whole = rb <= begin_ && re >= indexed_end_;
    thread_local std::vector<int32_t> count;
    count.resize(static_cast<size_t>(k));
    for (int64_t c = 0; c < k; ++c) {
      if (whole) {
        count[c] = offsets_[c + 1] - offsets_[c];
      } else {
        int32_t n = 0;
        for (int32_t i = offsets_[c]; i < offsets_[c + 1]; ++i)
          n += tokens_[i] >= rb && tokens_[i] < re;
        count[c] = n;
      }
    }
    // Per-head normaliser over the clusters (each standing for its tokens in range).
    std::vector<double> lse_c(static_cast<size_t>(g));
    thread_local std::vector<float> weighted;
    weighted.resize(static_cast<size_t>(k));
    for (int h = 0; h < g; ++h) {
      for (int64_t c = 0; c < k; ++c)
        weighted[c] = count[c] > 0 ? logits[h * k + c] + std::log(static_cast<float>(count[c]))
                                   : -std::numeric_limits<float>::infinity();
      lse_c[h] = LogSumExp(weighted.data(), k, s.isa);
    }
    thread_local std::vector<std::pair<float, int32_t>> order;
    order.clear();
    for (int64_t c = 0; c < k; ++c) {
      if (count[c] == 0) continue;
      float v = -std::numeric_limits<float>::infinity();
      for (int h = 0; h < g; ++h) v = std::max(v, logits[h * k + c] - static_cast<float>(lse_c[h]));
      order.emplace_back(-v, static_cast<int32_t>(c));  // ascending = best first
    }
    if (order.empty()) return;
    const int64_t want = static_cast<int64_t>(opt_.rescore_factor) * s.k;
    thread_local std::vector<int32_t> cand;
    thread_local std::vector<uint8_t> taken;
    cand.clear();
    taken.assign(static_cast<size_t>(k), 0);
    // Take clusters best first; sort lazily in blocks so that a small `want` does not pay for
    // ordering every cluster.
    size_t sorted_end = 0;
    for (size_t i = 0; i < order.size() && static_cast<int64_t>(cand.size()) < want; ++i) {
      if (i == sorted_end) {
        const size_t next = std::min(order.size(), std::max<size_t>(2 * sorted_end, 64));
        std::partial_sort(order.begin() + static_cast<int64_t>(i),
                          order.begin() + static_cast<int64_t>(next), order.end());
        sorted_end = next;
      }
      const int32_t c = order[i].second;
      taken[c] = 1;
      for (int32_t j = offsets_[c]; j < offsets_[c + 1]; ++j)
        if (whole || (tokens_[j] >= rb && tokens_[j] < re)) cand.push_back(tokens_[j]);
    }
    std::sort(cand.begin(), cand.end());
    Hits& hits = *out->Add();
    ScoreTokens(s, cand, &hits);
    for (int h = 0; h < g; ++h) {
      int64_t rest_n = 0;
      for (int64_t c = 0; c < k; ++c) {
        if (taken[c] || count[c] == 0) continue;
        weighted[rest_n++] = logits[h * k + c] + std::log(static_cast<float>(count[c]));
      }
      if (rest_n == 0) continue;
      const double rest = LogSumExp(weighted.data(), rest_n, s.isa);
      const double a = hits.lse[h], mx = std::max(a, rest);
      hits.lse[h] = mx + std::log(std::exp(a - mx) + std::exp(rest - mx));
    }
  }

  ClusterOptions opt_;
  int64_t indexed_end_;           // [begin_, indexed_end_) is clustered; the rest is pending
  std::vector<float> centroids_;  // [clusters][d] mean of raw keys
  std::vector<float> variances_;  // [clusters][d] per-dimension variance (variance_ranking only)
  std::vector<int32_t> tokens_;   // members, cluster by cluster, ascending within a cluster
  std::vector<int32_t> offsets_;  // cluster c = tokens_[offsets_[c], offsets_[c + 1])
  int kmeans_runs_ = 0;
  int64_t iterations_run_ = 0;
};

}  // namespace

std::unique_ptr<Segment> ParseClusterSegment(ByteReader* r, int64_t begin, int64_t end,
                                             int head_dim, DType dtype) {
  auto seg = std::make_unique<ClusterSegment>(begin, end, head_dim, dtype);
  if (!seg->Parse(r)) return nullptr;
  return seg;
}

bool GetClusterInfo(const Segment& segment, ClusterInfo* info) {
  const auto* c = dynamic_cast<const ClusterSegment*>(&segment);
  if (c == nullptr) return false;
  c->Info(info);
  return true;
}

absl::StatusOr<std::unique_ptr<Segment>> BuildClusterSegment(const BuildInput& input,
                                                             const ClusterOptions& options,
                                                             ThreadPool* pool) {
  if (options.tokens_per_cluster <= 0 || options.iterations <= 0 || options.append_every <= 0 ||
      options.append_clusters <= 0) {
    return absl::InvalidArgumentError(
        "cluster: tokens_per_cluster, iterations, append_every and append_clusters must be > 0");
  }
  if (options.segment_tokens < 0 || !(options.tolerance >= 0) || !(options.tolerance < 1) ||
      options.rescore_factor < 0) {
    return absl::InvalidArgumentError(
        "cluster: segment_tokens and rescore_factor must be >= 0, tolerance in [0, 1)");
  }
  auto seg = std::make_unique<ClusterSegment>(input, options);
  seg->BuildChunked(*input.keys, input.token_begin, input.token_end, pool);
  return std::unique_ptr<Segment>(std::move(seg));
}

}  // namespace kvrecall::indexer::internal
