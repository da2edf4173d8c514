#include "indexer/merged.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer {
namespace {

struct Entry {
  std::vector<double> k, v;  // sums (size-weighted)
  int32_t count = 0;
  int32_t first = 0;
};

double Cosine(const std::vector<double>& a, const std::vector<double>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t j = 0; j < a.size(); ++j) {
    ab += a[j] * b[j];
    aa += a[j] * a[j];
    bb += b[j] * b[j];
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : 0.0;
}

void MergeChunk(std::vector<Entry>* chunk, int64_t target) {
  int round = 0;
  while (static_cast<int64_t>(chunk->size()) > target && chunk->size() >= 2) {
    // Alternate which parity is the source side.
    const size_t src_parity = static_cast<size_t>(round++ % 2);
    std::vector<size_t> src, dst;
    for (size_t i = 0; i < chunk->size(); ++i) (i % 2 == src_parity ? src : dst).push_back(i);
    if (dst.empty()) break;
    struct Match {
      double sim;
      size_t s, d;
    };
    std::vector<Match> matches;
    for (size_t s : src) {
      Match best{-2, s, dst[0]};
      for (size_t d : dst) {
        const double c =
            Cosine((*chunk)[s].k, (*chunk)[d].k);  // means and sums have the same direction
        if (c > best.sim) best = Match{c, s, d};
      }
      matches.push_back(best);
    }
    const int64_t r = std::min<int64_t>(static_cast<int64_t>(matches.size()),
                                        static_cast<int64_t>(chunk->size()) - target);
    std::stable_sort(matches.begin(), matches.end(),
                     [](const Match& a, const Match& b) { return a.sim > b.sim; });
    std::vector<bool> removed(chunk->size(), false);
    for (int64_t i = 0; i < r; ++i) {
      Entry& s = (*chunk)[matches[i].s];
      Entry& d = (*chunk)[matches[i].d];
      for (size_t j = 0; j < d.k.size(); ++j) {
        d.k[j] += s.k[j];
        d.v[j] += s.v[j];
      }
      d.count += s.count;
      d.first = std::min(d.first, s.first);
      removed[matches[i].s] = true;
    }
    std::vector<Entry> next;
    for (size_t i = 0; i < chunk->size(); ++i)
      if (!removed[i]) next.push_back(std::move((*chunk)[i]));
    *chunk = std::move(next);
  }
}

}  // namespace

absl::StatusOr<MergedKV> MergeChunks(const PagedRows& keys, const PagedRows& values,
                                     int64_t token_begin, int64_t token_end,
                                     const MergedOptions& options, ThreadPool* pool) {
  if (options.chunk_tokens <= 0 || !(options.keep_ratio > 0 && options.keep_ratio <= 1)) {
    return absl::InvalidArgumentError("merged: chunk_tokens must be > 0 and keep_ratio in (0, 1]");
  }
  if (keys.head_dim <= 0 || keys.head_dim != values.head_dim ||
      keys.num_tokens != values.num_tokens) {
    return absl::InvalidArgumentError("merged: keys and values must have the same shape");
  }
  if (token_begin < 0 || token_begin >= token_end || token_end > keys.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("merged: range [", token_begin, ", ", token_end,
                                                   ") empty or outside [0, ", keys.num_tokens,
                                                   ")"));
  }
  const int d = keys.head_dim;
  const int64_t n = token_end - token_begin;
  const int64_t chunks = (n + options.chunk_tokens - 1) / options.chunk_tokens;
  std::vector<std::vector<Entry>> result(static_cast<size_t>(chunks));
  internal::ForChunks(pool, chunks, 1, [&](int64_t c, int64_t) {
    const int64_t b = token_begin + c * options.chunk_tokens;
    const int64_t e = std::min(token_end, b + options.chunk_tokens);
    std::vector<Entry>& chunk = result[c];
    std::vector<float> kf(static_cast<size_t>(d)), vf(static_cast<size_t>(d));
    for (int64_t t = b; t < e; ++t) {
      kernels::ToF32(keys.dtype, keys.row(t), d, kf.data());
      kernels::ToF32(values.dtype, values.row(t), d, vf.data());
      Entry en;
      en.k.assign(kf.begin(), kf.end());
      en.v.assign(vf.begin(), vf.end());
      en.count = 1;
      en.first = static_cast<int32_t>(t);
      chunk.push_back(std::move(en));
    }
    const int64_t target =
        std::max<int64_t>(1, static_cast<int64_t>(std::ceil((e - b) * options.keep_ratio)));
    MergeChunk(&chunk, target);
    std::sort(chunk.begin(), chunk.end(),
              [](const Entry& x, const Entry& y) { return x.first < y.first; });
  });
  MergedKV out;
  out.head_dim = d;
  for (const auto& chunk : result) {
    for (const Entry& en : chunk) {
      for (int j = 0; j < d; ++j) {
        out.keys.push_back(static_cast<float>(en.k[j] / en.count));
        out.values.push_back(static_cast<float>(en.v[j] / en.count));
      }
      out.counts.push_back(en.count);
      out.first_token.push_back(en.first);
    }
  }
  return out;
}

}  // namespace kvrecall::indexer
