#include "gpu-worker/backends/cuda/cpu_reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#include "common/dtype.h"
#include "gpu-worker/backends/attention.h"
#include "gpu-worker/model/rope.h"

namespace kvrecall::worker::cuda {
namespace {

int64_t CacheOffset(const KvCacheView& c, int b, int t, int h) {
  int64_t page = b, in_page = t;
  if (c.page_table != nullptr) {
    page = c.page_table[static_cast<int64_t>(b) * c.page_table_stride + t / c.page_size];
    in_page = t % c.page_size;
  }
  return page * c.page_stride + in_page * c.token_stride + static_cast<int64_t>(h) * c.head_stride;
}

void ToF32Row(const uint16_t* src, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = Bf16ToF32(src[i]);
}

// Attends every q-head of each (sequence, kv-head) to the rows `rows(b, h, k, v)` appends.
void Attend(int batch, int num_q_heads, int num_kv_heads, int d, const uint16_t* q, float scale,
            const std::function<void(int, int, std::vector<float>&, std::vector<float>&)>& rows,
            float* out) {
  const int group = num_q_heads / num_kv_heads;
  std::vector<float> k, v, qf(static_cast<size_t>(group) * d);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < num_kv_heads; ++h) {
      k.clear();
      v.clear();
      rows(b, h, k, v);
      const int m = static_cast<int>(k.size() / d);
      const int64_t q0 = (static_cast<int64_t>(b) * num_q_heads + h * group) * d;
      float* o = out + q0;
      if (m == 0) {
        std::fill(o, o + static_cast<int64_t>(group) * d, 0.0f);
        continue;
      }
      ToF32Row(q + q0, group * d, qf.data());
      AttendRows(qf.data(), group, d, k.data(), d, v.data(), d, m, scale, o);
    }
  }
}

void AppendRow(const uint16_t* k, const uint16_t* v, int d, std::vector<float>& kf,
               std::vector<float>& vf) {
  for (int i = 0; i < d; ++i) {
    kf.push_back(Bf16ToF32(k[i]));
    vf.push_back(Bf16ToF32(v[i]));
  }
}

}  // namespace

void DecodeAttentionReference(const DecodeAttentionParams& p, float* out) {
  const KvCacheView& c = p.cache;
  Attend(
      p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim, p.q, p.scale,
      [&](int b, int h, std::vector<float>& k, std::vector<float>& v) {
        const int len = std::min(std::max(p.lengths[b], 0), p.max_len);
        for (int t = 0; t < len; ++t) {
          const int64_t off = CacheOffset(c, b, t, h);
          AppendRow(c.k + off, c.v + off, p.head_dim, k, v);
        }
      },
      out);
}

void PrefillAttentionReference(const PrefillAttentionParams& p, float* out, float* abs_out) {
  const int d = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
  const int kv_len = p.start + p.num_tokens;
  const int64_t q_stride =
      p.q_token_stride != 0 ? p.q_token_stride : static_cast<int64_t>(p.num_q_heads) * d;
  std::vector<float> k, v, v_abs, qf(static_cast<size_t>(group) * d);
  for (int h = 0; h < p.num_kv_heads; ++h) {
    k.clear();
    v.clear();
    for (int t = 0; t < kv_len; ++t) {
      const int64_t off = CacheOffset(p.cache, p.seq, t, h);
      AppendRow(p.cache.k + off, p.cache.v + off, d, k, v);
    }
    v_abs.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) v_abs[i] = std::abs(v[i]);
    for (int i = 0; i < p.num_tokens; ++i) {
      const int64_t q0 = static_cast<int64_t>(h) * group * d;
      const int64_t o0 = (static_cast<int64_t>(i) * p.num_q_heads + h * group) * d;
      ToF32Row(p.q + i * q_stride + q0, group * d, qf.data());
      const int m = p.start + i + 1;  // causal: positions [0, start + i]
      AttendRows(qf.data(), group, d, k.data(), d, v.data(), d, m, p.scale, out + o0);
      if (abs_out != nullptr) {
        AttendRows(qf.data(), group, d, k.data(), d, v_abs.data(), d, m, p.scale, abs_out + o0);
      }
    }
  }
}

std::vector<AttendedRow> SparseRowsReference(const SparseAttentionParams& p, int b, int h) {
  std::vector<AttendedRow> rows;
  const int len = std::min(std::max(p.lengths[b], 0), p.max_len);
  const int ns = std::min(p.num_sinks, len);
  const int w0 = std::max(ns, len - p.window);
  for (int t = 0; t < ns; ++t) rows.push_back({false, t});
  for (int t = w0; t < len; ++t) rows.push_back({false, t});
  if (p.slots.budget > 0) {
    const int64_t e = static_cast<int64_t>(b) * p.num_kv_heads + h;
    const int count = std::min(std::max(p.slots.counts[e], 0), p.slots.budget);
    for (int s = 0; s < count; ++s) {
      const int t = p.slots.token_ids[e * p.slots.budget + s];
      if (t >= ns && t < w0) rows.push_back({true, s});
    }
  }
  return rows;
}

void SparseAttentionReference(const SparseAttentionParams& p, float* out) {
  Attend(
      p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim, p.q, p.scale,
      [&](int b, int h, std::vector<float>& k, std::vector<float>& v) {
        const int64_t e = static_cast<int64_t>(b) * p.num_kv_heads + h;
        for (const AttendedRow& r : SparseRowsReference(p, b, h)) {
          if (r.from_slot) {
            const int64_t off = e * p.slots.entry_stride + r.index * p.slots.row_stride;
            AppendRow(p.slots.k + off, p.slots.v + off, p.head_dim, k, v);
          } else {
            const int64_t off = CacheOffset(p.cache, b, r.index, h);
            AppendRow(p.cache.k + off, p.cache.v + off, p.head_dim, k, v);
          }
        }
      },
      out);
}

void SlotScatterReference(const SlotScatterParams& p) {
  for (int e = 0; e < p.num_entries; ++e) {
    const SlotFill& f = p.entries[e];
    if (f.seq < 0 || f.seq >= p.batch || f.kv_head < 0 || f.kv_head >= p.num_kv_heads ||
        f.num_rows < 0 || f.first < 0 ||
        static_cast<int64_t>(f.first) + f.num_rows > p.num_fill_slots ||
        (f.row_addresses != nullptr ? reinterpret_cast<uintptr_t>(f.row_addresses) % 8 != 0
                                    : reinterpret_cast<uintptr_t>(f.rows) % 16 != 0 ||
                                          (f.rows == nullptr && f.num_rows > 0))) {
      if (p.num_rejected != nullptr) *p.num_rejected += std::max(f.num_rows, 1);
      continue;
    }
    const int64_t entry = static_cast<int64_t>(f.seq) * p.num_kv_heads + f.kv_head;
    for (int j = 0; j < f.num_rows; ++j) {
      const int slot = p.fill_slots[f.first + j];
      if (slot < 0 || slot >= p.budget) {
        if (p.num_rejected != nullptr) ++*p.num_rejected;
        continue;
      }
      const int64_t dst = entry * p.entry_stride + static_cast<int64_t>(slot) * p.row_stride;
      const uint16_t* k = nullptr;
      const uint16_t* v = nullptr;
      if (f.row_addresses == nullptr) {
        k = f.rows + static_cast<int64_t>(j) * 2 * p.head_dim;
        v = k + p.head_dim;
      } else {
        k = f.row_addresses[2 * j];
        v = f.row_addresses[2 * j + 1];
        if (k == nullptr || v == nullptr ||
            (reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) % 16 != 0) {
          if (p.num_rejected != nullptr) ++*p.num_rejected;
          continue;
        }
      }
      std::copy_n(k, p.head_dim, p.k_slots + dst);
      std::copy_n(v, p.head_dim, p.v_slots + dst);
    }
  }
}

void KvAppendReference(const KvAppendParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const int t = p.positions[b];
    if (t < 0) continue;
    int64_t page = b, in_page = t;
    if (p.page_table != nullptr) {
      page = p.page_table[static_cast<int64_t>(b) * p.page_table_stride + t / p.page_size];
      in_page = t % p.page_size;
    }
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int64_t dst = page * p.page_stride + in_page * p.token_stride + h * p.head_stride;
      const int64_t src = b * p.src_stride + static_cast<int64_t>(h) * p.head_dim;
      std::copy_n(p.k + src, p.head_dim, p.cache_k + dst);
      std::copy_n(p.v + src, p.head_dim, p.cache_v + dst);
    }
  }
}

void FillRandomBf16Reference(uint16_t* out, int64_t n, uint64_t seed, int64_t first, float scale) {
  for (int64_t j = 0; j < n; ++j) {
    uint64_t x = seed + static_cast<uint64_t>(first + j) * 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    const float u = static_cast<float>(x >> 40) * (1.0f / 8388608.0f) - 1.0f;
    out[j] = F32ToBf16(scale * u);
  }
}

void RmsNormReference(const uint16_t* x, const uint16_t* weight, int rows, int dim, float eps,
                      uint16_t* out) {
  for (int r = 0; r < rows; ++r) {
    const uint16_t* xr = x + static_cast<int64_t>(r) * dim;
    double ss = 0.0;
    for (int i = 0; i < dim; ++i) ss += static_cast<double>(Bf16ToF32(xr[i])) * Bf16ToF32(xr[i]);
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
    for (int i = 0; i < dim; ++i) {
      out[static_cast<int64_t>(r) * dim + i] =
          F32ToBf16(Bf16ToF32(xr[i]) * inv * Bf16ToF32(weight[i]));
    }
  }
}

void RopeReference(uint16_t* x, int tokens, int num_heads, int head_dim, int64_t token_stride,
                   const int32_t* positions, const double* inv_freq) {
  const int half = head_dim / 2;
  std::vector<float> row(static_cast<size_t>(num_heads) * head_dim), cs(2 * half);
  for (int t = 0; t < tokens; ++t) {
    uint16_t* xt = x + t * token_stride;
    ToF32Row(xt, num_heads * head_dim, row.data());
    RopeCosSin(absl::MakeConstSpan(inv_freq, half), positions[t], cs.data(), cs.data() + half);
    ApplyRope(row.data(), num_heads, head_dim, cs.data(), cs.data() + half);
    for (int i = 0; i < num_heads * head_dim; ++i) xt[i] = F32ToBf16(row[i]);
  }
}

void SwiGluReference(const uint16_t* gate, const uint16_t* up, int rows, int dim, int64_t in_stride,
                     uint16_t* out) {
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < dim; ++i) {
      const float g = Bf16ToF32(gate[r * in_stride + i]), u = Bf16ToF32(up[r * in_stride + i]);
      out[static_cast<int64_t>(r) * dim + i] = F32ToBf16(g / (1.0f + std::exp(-g)) * u);
    }
  }
}

void EmbeddingGatherReference(const uint16_t* table, int vocab, int dim, const int32_t* ids, int n,
                              uint16_t* out) {
  for (int i = 0; i < n; ++i) {
    uint16_t* o = out + static_cast<int64_t>(i) * dim;
    if (ids[i] < 0 || ids[i] >= vocab) {
      std::fill(o, o + dim, uint16_t{0});
    } else {
      std::copy_n(table + static_cast<int64_t>(ids[i]) * dim, dim, o);
    }
  }
}

void ArgmaxReference(const float* logits, int rows, int vocab, int32_t* out) {
  for (int r = 0; r < rows; ++r) {
    const float* x = logits + static_cast<int64_t>(r) * vocab;
    int best = -1;
    for (int i = 0; i < vocab; ++i) {
      if (std::isnan(x[i])) continue;
      if (best < 0 || x[i] > x[best]) best = i;
    }
    out[r] = best < 0 ? 0 : best;
  }
}

void SampleTopPReference(const float* logits, int rows, int vocab, const float* temperature,
                         const float* top_p, const float* uniform, int32_t* out, bool* ambiguous,
                         double margin) {
  std::vector<double> e(vocab), sorted(vocab);
  for (int r = 0; r < rows; ++r) {
    const float* x = logits + static_cast<int64_t>(r) * vocab;
    bool amb = false;
    if (!(temperature[r] > 0.0f)) {
      ArgmaxReference(x, 1, vocab, out + r);
      if (ambiguous != nullptr) ambiguous[r] = false;
      continue;
    }
    const double mx = *std::max_element(x, x + vocab);
    double z = 0.0;
    for (int i = 0; i < vocab; ++i) {
      e[i] = std::exp((x[i] - mx) / temperature[r]);
      z += e[i];
    }
    double tau = 0.0, kept = z;
    if (top_p[r] < 1.0f) {
      sorted = e;
      std::sort(sorted.begin(), sorted.end(), std::greater<double>());
      const double target = static_cast<double>(top_p[r]) * z;
      double mass = 0.0;
      size_t i = 0;
      while (i < sorted.size()) {
        // Take the whole tier of equal values.
        size_t j = i;
        double tier = 0.0;
        while (j < sorted.size() && sorted[j] == sorted[i]) tier += sorted[j++];
        const double before = mass;
        mass += tier;
        if (mass >= target || j == sorted.size()) {
          tau = sorted[i];
          kept = mass;
          if (std::abs(mass - target) < margin * z ||
              (before > 0.0 && std::abs(before - target) < margin * z)) {
            amb = true;
          }
          // The next tier down may hold a value that fp32 rounding puts on the other side of tau.
          if (j < sorted.size() && (sorted[i] - sorted[j]) < 1e-6 * sorted[i]) amb = true;
          break;
        }
        i = j;
      }
    }
    const double thr = static_cast<double>(uniform[r]) * kept;
    double run = 0.0;
    int pick = -1, last = -1;
    for (int i = 0; i < vocab; ++i) {
      if (e[i] < tau) continue;
      last = i;
      const double before = run;
      run += e[i];
      if (run > thr) {
        pick = i;
        if (std::abs(run - thr) < margin * kept || std::abs(before - thr) < margin * kept) {
          amb = true;
        }
        break;
      }
    }
    out[r] = pick >= 0 ? pick : std::max(last, 0);
    if (ambiguous != nullptr) ambiguous[r] = amb;
  }
}

void CtkvrListsReference(const CtkvrListsParams& p, std::vector<double>* scores) {
  const int64_t n = p.end - p.begin;
  const int d = p.head_dim, group = p.num_q_heads / p.num_kv_heads, centroids = p.num_centroids;
  const int64_t list_len = std::min<int64_t>(p.list_size, n);
  if (scores != nullptr) scores->assign(static_cast<size_t>(p.num_kv_heads * centroids * n), 0.0);
  std::vector<double> keys(static_cast<size_t>(n * d)), logit(static_cast<size_t>(group * n));
  std::vector<double> score(static_cast<size_t>(n)), lse(static_cast<size_t>(group));
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int h = 0; h < p.num_kv_heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      const uint16_t* k = p.keys + (p.begin + t) * p.token_stride + h * p.head_stride;
      for (int i = 0; i < d; ++i) keys[t * d + i] = Bf16ToF32(k[i]);
    }
    for (int c = 0; c < centroids; ++c) {
      for (int j = 0; j < group; ++j) {
        const uint16_t* q = p.queries + c * p.query_stride + (h * group + j) * d;
        double* l = logit.data() + j * n;
        for (int64_t t = 0; t < n; ++t) {
          double dot = 0.0;
          for (int i = 0; i < d; ++i) dot += static_cast<double>(Bf16ToF32(q[i])) * keys[t * d + i];
          l[t] = static_cast<double>(p.scale) * dot;
        }
        const double mx = *std::max_element(l, l + n);
        double sum = 0.0;
        for (int64_t t = 0; t < n; ++t) sum += std::exp(l[t] - mx);
        lse[j] = mx + std::log(sum);
        p.lse[(static_cast<int64_t>(h) * centroids + c) * group + j] = static_cast<float>(lse[j]);
      }
      for (int64_t t = 0; t < n; ++t) {
        score[t] = logit[t] - lse[0];
        for (int j = 1; j < group; ++j) score[t] = std::max(score[t], logit[j * n + t] - lse[j]);
      }
      if (scores != nullptr) {
        std::copy(score.begin(), score.end(),
                  scores->begin() + (static_cast<int64_t>(h) * centroids + c) * n);
      }
      // Highest score first, the lower position first among equal scores (-0 == +0).
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + list_len, order.end(),
                        [&](int64_t a, int64_t b) {
                          return score[a] > score[b] || (score[a] == score[b] && a < b);
                        });
      std::sort(order.begin(), order.begin() + list_len);
      int32_t* out = p.tokens + (static_cast<int64_t>(h) * centroids + c) * list_len;
      for (int64_t i = 0; i < list_len; ++i) out[i] = static_cast<int32_t>(p.begin + order[i]);
    }
  }
}

}  // namespace kvrecall::worker::cuda
