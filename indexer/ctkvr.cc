// CTKVR segment: query centroids with inverted top-ρ key lists (see index.h for the contract).
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "indexer/index.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer::internal {
namespace {

constexpr int64_t kTileTokens = 512;

// A per-thread scratch buffer of at least n floats, kept for later builds and backed by
// transparent huge pages where the kernel allows: first-touch page faults are otherwise a large
// share of a build (on VMs most of it). Contents are unspecified.
float* ScratchFloats(size_t n) {
  struct Buffer {
    float* p = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t want = (n * sizeof(float) + kHuge - 1) / kHuge * kHuge;
  if (want > buf.bytes) {
    std::free(buf.p);
    buf.p = static_cast<float*>(std::aligned_alloc(kHuge, want));
    buf.bytes = buf.p != nullptr ? want : 0;
    if (buf.p == nullptr) throw std::bad_alloc();
    madvise(buf.p, want, MADV_HUGEPAGE);  // advisory; failure only costs speed
  }
  return buf.p;
}

class CtkvrSegment final : public Segment {
 public:
  CtkvrSegment(const BuildInput& in, const CtkvrOptions& o)
      : Segment(in.token_begin, in.token_end, in.keys->head_dim, in.keys->dtype),
        opt_(o),
        group_(in.group) {}
  CtkvrSegment(int64_t begin, int64_t end, int head_dim, DType dtype)
      : Segment(begin, end, head_dim, dtype), group_(0) {}

  std::unique_ptr<Segment> Clone() const override {
    return std::make_unique<CtkvrSegment>(*this);
  }

  void SerializeInternal(ByteWriter* w) const override {
    w->I32(opt_.centroids);
    w->I32(opt_.list_size);
    w->I32(opt_.probe);
    w->I32(group_);
    w->I32(num_centroids_);
    w->Array(scaled_);
    w->Array(unit_);
    w->Array(lse_);
    w->U64(lists_.size());
    for (size_t i = 0; i < lists_.size(); ++i) {
      w->Array(lists_[i]);
      w->Array(list_logits_[i]);
    }
    w->Array(list_mass_);
  }

  // Reads the body written by SerializeInternal; false when it is inconsistent.
  bool Parse(ByteReader* r) {
    opt_.centroids = r->I32();
    opt_.list_size = r->I32();
    opt_.probe = r->I32();
    group_ = r->I32();
    num_centroids_ = r->I32();
    if (!r->ok() || opt_.centroids <= 0 || opt_.list_size <= 0 || opt_.probe <= 0 ||
        group_ <= 0 || group_ > (1 << 16) || num_centroids_ <= 0 ||
        num_centroids_ > opt_.centroids) {
      return false;
    }
    const size_t c = static_cast<size_t>(num_centroids_), g = static_cast<size_t>(group_);
    scaled_ = r->Array<float>();
    unit_ = r->Array<float>();
    lse_ = r->Array<double>();
    const uint64_t nlists = r->U64();
    if (!r->ok() || scaled_.size() != c * g * static_cast<size_t>(head_dim_) ||
        unit_.size() != scaled_.size() || lse_.size() != c * g || nlists != c) {
      return false;
    }
    lists_.resize(c);
    list_logits_.resize(c);
    for (size_t i = 0; i < c; ++i) {
      lists_[i] = r->Array<int32_t>();
      list_logits_[i] = r->Array<float>();
      if (!r->ok() || list_logits_[i].size() != lists_[i].size() * g) return false;
      for (size_t j = 0; j < lists_[i].size(); ++j) {
        const int32_t t = lists_[i][j];
        if (t < begin_ || t >= end_ || (j > 0 && t <= lists_[i][j - 1])) return false;
      }
    }
    list_mass_ = r->Array<double>();
    return r->ok() && list_mass_.size() == c * g;
  }

  Method method() const override { return Method::kCtkvr; }

  // Picks the centroids and builds their lists over [begin_, end_).
  void Build(const BuildInput& in, ThreadPool* pool) {
    const int d = head_dim_, g = group_;
    const int q = in.num_prompt_queries;
    const int c = std::min(opt_.centroids, q);
    num_centroids_ = c;
    scaled_.resize(static_cast<size_t>(c) * g * d);
    unit_.resize(scaled_.size());
    const float scale =
        in.scale > 0 ? in.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    for (int i = 0; i < c; ++i) {
      // Evenly spaced positions, the last prompt query first.
      const int pos =
          c == 1 ? q - 1
                 : (q - 1) - static_cast<int>((static_cast<int64_t>(i) * (q - 1)) / (c - 1));
      for (int h = 0; h < g; ++h) {
        const float* src = in.prompt_queries + (static_cast<size_t>(pos) * g + h) * d;
        float* sd = scaled_.data() + (static_cast<size_t>(i) * g + h) * d;
        float* ud = unit_.data() + (static_cast<size_t>(i) * g + h) * d;
        double norm = 0;
        for (int j = 0; j < d; ++j) norm += static_cast<double>(src[j]) * src[j];
        const float inv = norm > 0 ? static_cast<float>(1.0 / std::sqrt(norm)) : 0.0f;
        for (int j = 0; j < d; ++j) {
          sd[j] = src[j] * scale;
          ud[j] = src[j] * inv;
        }
      }
    }
    const int64_t n = end_ - begin_;
    const int nq = c * g;
    // [c*g][n] logits, in a per-thread scratch buffer reused across builds (see ScratchFloats).
    float* const all_logits =
        ScratchFloats(static_cast<size_t>(nq) * n);  // used by pool threads too
    // Many queries × many keys: fp32 key tiles through the packed dot-matrix kernel.
    ForChunks(pool, n, kTileTokens, [&](int64_t b, int64_t e) {
      thread_local std::vector<float> keys, dots;
      keys.resize(static_cast<size_t>(e - b) * d);
      dots.resize(static_cast<size_t>(e - b) * nq);
      for (int64_t t = b; t < e; ++t)
        kernels::ToF32(dtype_, in.keys->row(begin_ + t), d, keys.data() + (t - b) * d);
      kernels::DotsF32(keys.data(), e - b, scaled_.data(), nq, d, dots.data(), nq);
      for (int64_t t = b; t < e; ++t)
        for (int r = 0; r < nq; ++r)
          all_logits[static_cast<size_t>(r) * n + t] = dots[(t - b) * nq + r];
    });
    lse_.assign(static_cast<size_t>(nq), 0.0);
    lists_.assign(static_cast<size_t>(c), {});
    list_logits_.assign(static_cast<size_t>(c), {});
    list_mass_.assign(static_cast<size_t>(nq), 1.0);
    auto build_one = [&](int64_t ci) {
      const float* l = all_logits + ci * g * n;
      for (int h = 0; h < g; ++h) lse_[ci * g + h] = LogSumExp(l + h * n, n, kernels::BestIsa());
      thread_local std::vector<float> v;
      v.resize(static_cast<size_t>(n));
      Rank(ci, l, n, n, v.data());
      thread_local std::vector<int32_t> top;
      kernels::TopK(v.data(), n, opt_.list_size, &top);
      auto& list = lists_[ci];
      auto& ll = list_logits_[ci];
      list.resize(top.size());
      ll.resize(top.size() * g);
      for (size_t j = 0; j < top.size(); ++j) {
        list[j] = static_cast<int32_t>(begin_ + top[j]);
        for (int h = 0; h < g; ++h) ll[j * g + h] = l[h * n + top[j]];
      }
      UpdateMass(ci);
    };
    if (pool != nullptr) {
      pool->ParallelFor(c, build_one);
    } else {
      for (int i = 0; i < c; ++i) build_one(i);
    }
  }

  absl::Status Append(const PagedRows& keys, int64_t new_end, ThreadPool* pool) override {
    if (keys.head_dim != head_dim_ || keys.dtype != dtype_ || new_end < end_ ||
        new_end > keys.num_tokens) {
      return absl::InvalidArgumentError("append: shape mismatch or end outside the keys");
    }
    const int64_t n = new_end - end_;
    if (n == 0) return absl::OkStatus();
    const int g = group_, nq = num_centroids_ * g;
    std::vector<float> logits(static_cast<size_t>(nq) * n);
    std::vector<const uint8_t*> rows;
    RowPointers(keys, end_, new_end, &rows);
    kernels::QueryKeyDots(dtype_, rows.data(), n, head_dim_, scaled_.data(), nq, logits.data(), n);
    auto one = [&](int64_t ci) {
      const float* l = logits.data() + ci * g * n;
      for (int h = 0; h < g; ++h) {
        const double a = lse_[ci * g + h], b = LogSumExp(l + h * n, n, kernels::BestIsa());
        const double mx = std::max(a, b);
        lse_[ci * g + h] = mx + std::log(std::exp(a - mx) + std::exp(b - mx));
      }
      // Re-rank the old list under the new normalisers together with the new tokens.
      auto& list = lists_[ci];
      auto& ll = list_logits_[ci];
      const int64_t old = static_cast<int64_t>(list.size());
      std::vector<float> v(static_cast<size_t>(old + n));
      std::vector<float> merged_logits(static_cast<size_t>(g) * (old + n));
      for (int64_t j = 0; j < old; ++j)
        for (int h = 0; h < g; ++h) merged_logits[h * (old + n) + j] = ll[j * g + h];
      for (int64_t j = 0; j < n; ++j)
        for (int h = 0; h < g; ++h) merged_logits[h * (old + n) + old + j] = l[h * n + j];
      Rank(ci, merged_logits.data(), old + n, old + n, v.data());
      std::vector<int32_t> top;
      kernels::TopK(v.data(), old + n, opt_.list_size, &top);
      std::vector<int32_t> new_list(top.size());
      std::vector<float> new_ll(top.size() * g);
      for (size_t j = 0; j < top.size(); ++j) {
        const int64_t src = top[j];
        new_list[j] = src < old ? list[src] : static_cast<int32_t>(end_ + (src - old));
        for (int h = 0; h < g; ++h) new_ll[j * g + h] = merged_logits[h * (old + n) + src];
      }
      list = std::move(new_list);
      ll = std::move(new_ll);
      UpdateMass(ci);
    };
    if (pool != nullptr) {
      pool->ParallelFor(num_centroids_, one);
    } else {
      for (int i = 0; i < num_centroids_; ++i) one(i);
    }
    end_ = new_end;
    return absl::OkStatus();
  }

  size_t MemoryBytes() const override {
    size_t b = (scaled_.size() + unit_.size()) * 4 + lse_.size() * 8 + list_mass_.size() * 8;
    for (size_t i = 0; i < lists_.size(); ++i)
      b += lists_[i].size() * 4 + list_logits_[i].size() * 4;
    return b;
  }

  absl::Status SearchInternal(const SegmentSearch& s, HitsList* out) const override {
    if (s.group != group_) {
      return absl::InvalidArgumentError(
          absl::StrCat("query group ", s.group, " differs from the ctkvr segment's ", group_));
    }
    const int g = group_, d = head_dim_;
    const int m = std::min(s.ctkvr_probe > 0 ? s.ctkvr_probe : opt_.probe, num_centroids_);
    std::vector<float> sim(static_cast<size_t>(num_centroids_));
    for (int c = 0; c < num_centroids_; ++c) {
      float acc = 0;
      for (int h = 0; h < g; ++h)
        acc += kernels::Dot(s.unit_queries + h * d,
                            unit_.data() + (static_cast<size_t>(c) * g + h) * d, d, s.isa);
      sim[c] = acc;
    }
    // Centroids by similarity; the best m are probed. When their lists (restricted to the range)
    // hold fewer tokens than the budget can take, further centroids are probed in order, and if
    // every list together still falls short the range is scored exactly: Search's contract is
    // min(k, range) tokens, whatever list_size was built with.
    std::vector<int32_t> order(static_cast<size_t>(num_centroids_));
    for (int c = 0; c < num_centroids_; ++c) order[c] = c;
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return sim[a] > sim[b] || (sim[a] == sim[b] && a < b);
    });
    const int64_t rb = std::max(begin_, s.range_begin), re = std::min(end_, s.range_end);
    const int64_t need = std::min<int64_t>(s.k, re - rb);
    // Union of the lists (each sorted ascending), restricted to the range.
    std::vector<int32_t> cand, merged;
    int probed = 0;
    while (probed < num_centroids_ &&
           (probed < m || static_cast<int64_t>(cand.size()) < need)) {
      const std::vector<int32_t>& sorted = lists_[order[probed++]];
      const auto lo = std::lower_bound(sorted.begin(), sorted.end(), rb);
      const auto hi = std::lower_bound(lo, sorted.end(), re);
      merged.clear();
      std::set_union(cand.begin(), cand.end(), lo, hi, std::back_inserter(merged));
      cand.swap(merged);
    }
    if (static_cast<int64_t>(cand.size()) < need) {
      ExactHits(s, rb, re, out->Add());
      return absl::OkStatus();
    }
    if (cand.empty()) return absl::OkStatus();
    const int32_t best0 = order[0];
    Hits& hits = *out->Add();
    ScoreTokens(s, cand, &hits);
    // Each head's normaliser over the whole segment, estimated from the candidates and the share of
    // the best centroid's mass that its list holds.
    for (int h = 0; h < g; ++h) {
      const double f = std::max(list_mass_[static_cast<size_t>(best0) * g + h], 1e-6);
      hits.lse[h] -= std::log(f) * FractionInRange(rb, re);
    }
    return absl::OkStatus();
  }

 private:
  // v[t] = max_h (l[h * ld + t] - lse_h(ci)) for t < n.
  void Rank(int64_t ci, const float* l, int64_t n, int64_t ld, float* v) const {
    const int g = group_;
    const float s0 = static_cast<float>(lse_[ci * g]);
    for (int64_t t = 0; t < n; ++t) v[t] = l[t] - s0;
    for (int h = 1; h < g; ++h) {
      const float sh = static_cast<float>(lse_[ci * g + h]);
      const float* lh = l + h * ld;
      for (int64_t t = 0; t < n; ++t) v[t] = std::max(v[t], lh[t] - sh);
    }
  }

  // Share of each head's softmax mass (over the segment) that centroid ci's list holds.
  void UpdateMass(int64_t ci) {
    const int g = group_;
    const auto& ll = list_logits_[ci];
    const size_t n = lists_[ci].size();
    for (int h = 0; h < g; ++h) {
      double z = 0;
      for (size_t j = 0; j < n; ++j)
        z += std::exp(static_cast<double>(ll[j * g + h]) - lse_[ci * g + h]);
      list_mass_[ci * g + h] = std::min(1.0, z);
    }
  }

  // The list-mass correction applies fully when the range covers the segment; scaled down
  // linearly when only part of it is searched.
  double FractionInRange(int64_t rb, int64_t re) const {
    return static_cast<double>(re - rb) / static_cast<double>(end_ - begin_);
  }

  CtkvrOptions opt_;
  int group_;
  int num_centroids_ = 0;
  std::vector<float> scaled_;  // [c][g][d] centroid queries × scale
  std::vector<float> unit_;    // [c][g][d] normalised centroid queries
  std::vector<double> lse_;    // [c][g] log Σ exp(logit) over the segment
  // [c] token ids, ascending: TopK returns ascending indices, and Append ranks the old list
  // followed by the new (later) tokens.
  std::vector<std::vector<int32_t>> lists_;
  std::vector<std::vector<float>> list_logits_;  // [c] [len][g] scaled logits of the list's tokens
  std::vector<double> list_mass_;                // [c][g]
};

}  // namespace

std::unique_ptr<Segment> ParseCtkvrSegment(ByteReader* r, int64_t begin, int64_t end,
                                           int head_dim, DType dtype) {
  if (end <= begin) return nullptr;
  auto seg = std::make_unique<CtkvrSegment>(begin, end, head_dim, dtype);
  if (!seg->Parse(r)) return nullptr;
  return seg;
}

absl::StatusOr<std::unique_ptr<Segment>> BuildCtkvrSegment(const BuildInput& input,
                                                           const CtkvrOptions& options,
                                                           ThreadPool* pool) {
  if (options.centroids <= 0 || options.list_size <= 0 || options.probe <= 0) {
    return absl::InvalidArgumentError("ctkvr: centroids, list_size and probe must be > 0");
  }
  if (input.prompt_queries == nullptr || input.num_prompt_queries <= 0 || input.group <= 0) {
    return absl::InvalidArgumentError(
        "ctkvr needs prompt queries ([num_prompt_queries][group][head_dim])");
  }
  const int64_t nq =
      static_cast<int64_t>(input.num_prompt_queries) * input.group * input.keys->head_dim;
  for (int64_t i = 0; i < nq; ++i) {
    if (!std::isfinite(input.prompt_queries[i])) {
      return absl::InvalidArgumentError("ctkvr prompt queries contain NaN or Inf");
    }
  }
  auto seg = std::make_unique<CtkvrSegment>(input, options);
  seg->Build(input, pool);
  return std::unique_ptr<Segment>(std::move(seg));
}

}  // namespace kvrecall::indexer::internal
