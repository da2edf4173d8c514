#include "indexer/synthetic.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"

namespace kvrecall::indexer {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Rotates pairs (2i, 2i+1) of v by pos * theta^(-2i/d).
void Rope(float* v, int d, int64_t pos, const std::vector<double>& freq) {
  for (int i = 0; i < d / 2; ++i) {
    const double a = static_cast<double>(pos) * freq[i];
    const double c = std::cos(a), s = std::sin(a);
    const double x = v[2 * i], y = v[2 * i + 1];
    v[2 * i] = static_cast<float>(x * c - y * s);
    v[2 * i + 1] = static_cast<float>(x * s + y * c);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<SyntheticData>> GenerateSynthetic(const SyntheticOptions& o) {
  if (o.head_dim <= 0 || o.head_dim % 2 != 0)
    return absl::InvalidArgumentError("head_dim must be even and > 0");
  if (o.group <= 0 || o.prompt_queries < 0 || o.decode_queries < 0 || o.sinks < 0 || o.window < 0 ||
      o.needles < 0 || o.page_tokens <= 0 || o.massive_channels < 0 ||
      o.massive_channels > o.head_dim / 2 || !(o.rope_theta > 1) || !(o.query_token_weight >= 0) ||
      !std::isfinite(o.query_token_weight) || !(o.query_token_persistence >= 0) ||
      !(o.query_token_persistence < 1)) {
    return absl::InvalidArgumentError("synthetic: negative or out-of-range option");
  }
  if (o.decode_queries > o.window)
    return absl::InvalidArgumentError("decode_queries must be <= window");
  if (o.tokens < o.sinks + o.window + 2 * static_cast<int64_t>(o.needles) + 1 ||
      o.tokens > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens ", o.tokens, " too small for sinks + window + needles"));
  }
  auto out = std::make_unique<SyntheticData>();
  SyntheticData& s = *out;
  s.options = o;
  const int d = o.head_dim, P = d / 2, g = o.group;
  const int64_t n = o.tokens;
  s.retrieval_begin = o.sinks;
  s.retrieval_end = n - o.window;

  std::vector<double> freq(static_cast<size_t>(P));
  for (int i = 0; i < P; ++i) freq[i] = std::pow(o.rope_theta, -2.0 * i / d);
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto gauss = [&](std::vector<float>* v, float sd) {
    for (float& x : *v) x = nd(rng) * sd;
  };
  std::vector<float> amp(static_cast<size_t>(d));
  for (int j = 0; j < d; ++j)
    amp[j] = 0.4f + 1.2f * static_cast<float>(j / 2) / static_cast<float>(std::max(1, P - 1));

  // Topic segments.
  std::vector<int64_t> seg_start;
  std::vector<std::vector<float>> topics;
  std::uniform_int_distribution<int64_t> seg_len(128, 2048);
  for (int64_t t = 0; t < n; t += seg_len(rng)) {
    seg_start.push_back(t);
    topics.emplace_back(static_cast<size_t>(d));
    gauss(&topics.back(), 1.0f);
  }
  auto topic_of = [&](int64_t t) {
    return static_cast<size_t>(std::upper_bound(seg_start.begin(), seg_start.end(), t) -
                               seg_start.begin() - 1);
  };
  // Phrases: 16-128 token runs inside topics with their own direction, so a query's preference
  // among the tokens of a topic comes in runs (what makes real attention clusterable).
  std::vector<int64_t> phrase_start;
  std::vector<std::vector<float>> phrases;
  std::uniform_int_distribution<int64_t> phrase_len(16, 128);
  for (int64_t t = 0; t < n; t += phrase_len(rng)) {
    phrase_start.push_back(t);
    phrases.emplace_back(static_cast<size_t>(d));
    gauss(&phrases.back(), 0.7f);
  }
  auto phrase_of = [&](int64_t t) {
    return static_cast<size_t>(std::upper_bound(phrase_start.begin(), phrase_start.end(), t) -
                               phrase_start.begin() - 1);
  };
  // Massive key channels: the first element of some of the slowest pairs.
  std::vector<int> massive;
  for (int i = 0; i < o.massive_channels; ++i) massive.push_back(2 * (P - 1 - 2 * i % P));
  // Shared query direction (what sinks align with), per-head direction, topics each head is about,
  // slow drift.
  std::vector<float> common(static_cast<size_t>(d));
  gauss(&common, 1.0f);
  std::vector<std::vector<float>> head_dir(static_cast<size_t>(g),
                                           std::vector<float>(static_cast<size_t>(d)));
  for (auto& v : head_dir) gauss(&v, 0.5f);
  std::uniform_int_distribution<size_t> pick_topic(0, topics.size() - 1);
  std::vector<std::vector<size_t>> head_topics(static_cast<size_t>(g));
  for (auto& ht : head_topics)
    for (int r = 0; r < 4; ++r) ht.push_back(pick_topic(rng));
  constexpr int kDrift = 3;
  std::vector<std::vector<float>> drift_dir(static_cast<size_t>(g) * kDrift,
                                            std::vector<float>(static_cast<size_t>(d)));
  for (auto& v : drift_dir) gauss(&v, 0.35f);
  std::uniform_real_distribution<double> uni(0, 1);
  std::vector<double> drift_period(drift_dir.size()), drift_phase(drift_dir.size());
  for (size_t r = 0; r < drift_dir.size(); ++r) {
    drift_period[r] = 4096 + uni(rng) * (32768 - 4096);
    drift_phase[r] = uni(rng) * 2 * kPi;
  }
  // Needle positions (the keys are planted after the queries exist, below).
  std::set<int32_t> needle_pos;
  std::uniform_int_distribution<int64_t> pos_dist(s.retrieval_begin, s.retrieval_end - 1);
  while (static_cast<int>(needle_pos.size()) < o.needles)
    needle_pos.insert(static_cast<int32_t>(pos_dist(rng)));
  s.needle_tokens.assign(needle_pos.begin(), needle_pos.end());
  // Keys and values.
  const size_t es = DTypeSize(o.dtype);
  s.key_bytes.resize(static_cast<size_t>(n) * d * es);
  s.value_bytes.resize(s.key_bytes.size());
  std::vector<float> k(static_cast<size_t>(d)), v(static_cast<size_t>(d)),
      noise(static_cast<size_t>(d));
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<float>& topic = topics[topic_of(t)];
    const std::vector<float>& phrase = phrases[phrase_of(t)];
    gauss(&noise, 0.35f);
    for (int j = 0; j < d; ++j) k[j] = topic[j] + phrase[j] + noise[j];
    if (t < o.sinks) {
      for (int j = 0; j < d; ++j) k[j] = 1.6f * common[j] + 0.3f * noise[j];
    }
    for (int j = 0; j < d; ++j) k[j] *= amp[j];
    for (int c : massive) k[c] += o.massive_value;
    Rope(k.data(), d, t, freq);
    gauss(&v, 1.0f);
    for (int j = 0; j < d; ++j) v[j] += 0.5f * topic[j];
    FromF32(o.dtype, k.data(), static_cast<size_t>(d),
            s.key_bytes.data() + static_cast<size_t>(t) * d * es);
    FromF32(o.dtype, v.data(), static_cast<size_t>(d),
            s.value_bytes.data() + static_cast<size_t>(t) * d * es);
  }
  for (auto* view : {&s.keys, &s.values}) {
    const std::vector<uint8_t>& bytes = view == &s.keys ? s.key_bytes : s.value_bytes;
    view->page_tokens = o.page_tokens;
    view->row_stride = static_cast<size_t>(d) * es;
    view->head_dim = d;
    view->dtype = o.dtype;
    view->num_tokens = n;
    std::vector<const uint8_t*> pages;
    for (int64_t t = 0; t < n; t += o.page_tokens)
      pages.push_back(bytes.data() + static_cast<size_t>(t) * d * es);
    view->SetPages(std::move(pages));
  }

  // Queries: a stable part (shared, per head, topics, slow drift) and, with query_token_weight,
  // a per-position lookup of one earlier token's key (targets drawn from their own generator so
  // that the stable parts do not depend on the option).
  const int64_t decode_begin = n - o.decode_queries;
  s.num_prompt_queries = static_cast<int>(std::min<int64_t>(o.prompt_queries, decode_begin));
  const int64_t qfirst = decode_begin - s.num_prompt_queries;
  std::vector<int64_t> target;  // [position - qfirst][head]
  if (o.query_token_weight > 0) {
    std::mt19937_64 trng(o.seed ^ 0x9e3779b97f4a7c15ULL);
    std::uniform_real_distribution<double> keep(0, 1);
    std::uniform_int_distribution<int64_t> where(s.retrieval_begin, s.retrieval_end - 1);
    target.resize(static_cast<size_t>(n - qfirst) * g);
    for (int64_t t = qfirst; t < n; ++t) {
      for (int h = 0; h < g; ++h) {
        const size_t i = static_cast<size_t>(t - qfirst) * g + h;
        target[i] =
            t > qfirst && keep(trng) < o.query_token_persistence ? target[i - g] : where(trng);
      }
    }
  }
  // The lookup direction of target p: p's phrase content as its key carries it (channel
  // magnitudes, rotated to p), unit length, times query_token_weight × |stable query|.
  auto add_lookup = [&](int64_t t, int h, float* q) {
    if (target.empty()) return;
    const int64_t p = target[static_cast<size_t>(t - qfirst) * g + h];
    const std::vector<float>& phrase = phrases[phrase_of(p)];
    std::vector<float> u(static_cast<size_t>(d));
    for (int j = 0; j < d; ++j) u[j] = phrase[j] * amp[j];
    Rope(u.data(), d, p, freq);
    double qn = 0, un = 0;
    for (int j = 0; j < d; ++j) {
      qn += static_cast<double>(q[j]) * q[j];
      un += static_cast<double>(u[j]) * u[j];
    }
    if (un == 0) return;
    const float w = static_cast<float>(o.query_token_weight * std::sqrt(qn / un));
    for (int j = 0; j < d; ++j) q[j] += w * u[j];
  };
  auto query = [&](int64_t t, int h, float* q) {
    std::vector<float> pre(static_cast<size_t>(d));
    for (int j = 0; j < d; ++j) pre[j] = 0.5f * common[j] + head_dir[h][j];
    for (size_t r : head_topics[h])
      for (int j = 0; j < d; ++j) pre[j] += 0.6f * topics[r][j];
    for (int r = 0; r < kDrift; ++r) {
      const size_t idx = static_cast<size_t>(h) * kDrift + r;
      const float w =
          static_cast<float>(std::sin(2 * kPi * t / drift_period[idx] + drift_phase[idx]));
      for (int j = 0; j < d; ++j) pre[j] += w * drift_dir[idx][j];
    }
    for (int j = 0; j < d; ++j) q[j] = pre[j] * amp[j] + 0.05f * nd(rng);
    Rope(q, d, t, freq);
  };
  s.prompt_queries.resize(static_cast<size_t>(s.num_prompt_queries) * g * d);
  for (int i = 0; i < s.num_prompt_queries; ++i) {
    const int64_t t = decode_begin - s.num_prompt_queries + i;
    for (int h = 0; h < g; ++h)
      query(t, h, s.prompt_queries.data() + (static_cast<size_t>(i) * g + h) * d);
  }
  s.decode_queries.resize(static_cast<size_t>(o.decode_queries) * g * d);
  for (int i = 0; i < o.decode_queries; ++i)
    for (int h = 0; h < g; ++h)
      query(decode_begin + i, h, s.decode_queries.data() + (static_cast<size_t>(i) * g + h) * d);
  for (int i = 0; i < s.num_prompt_queries; ++i)
    for (int h = 0; h < g; ++h)
      add_lookup(qfirst + i, h, s.prompt_queries.data() + (static_cast<size_t>(i) * g + h) * d);
  for (int i = 0; i < o.decode_queries; ++i)
    for (int h = 0; h < g; ++h)
      add_lookup(decode_begin + i, h,
                 s.decode_queries.data() + (static_cast<size_t>(i) * g + h) * d);
  // Needles: needle j is planted for head j % group. Its key gets the direction of that head's
  // middle decode query added (post-RoPE), scaled so that the query's logit for it is `margin`
  // above its best other token of the retrieval range — with the lookup component, so that every
  // decode query of the head scores it that much above its own best other token (its queries
  // differ step to step then).
  if (o.needles > 0 && o.decode_queries > 0) {
    const int mid = o.decode_queries / 2;
    const double margin = 0.5;  // logits over the best other token
    const float inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    std::vector<float> kf(static_cast<size_t>(d));
    for (int h = 0; h < g; ++h) {
      // The direction added: the middle decode query, or with the lookup component the mean of
      // the head's decode queries (each of them must rank the needle first).
      std::vector<float> dir(
          s.decode_queries.begin() + (static_cast<int64_t>(mid) * g + h) * d,
          s.decode_queries.begin() + (static_cast<int64_t>(mid) * g + h + 1) * d);
      if (!target.empty()) {
        std::fill(dir.begin(), dir.end(), 0.0f);
        for (int i = 0; i < o.decode_queries; ++i)
          for (int j = 0; j < d; ++j)
            dir[j] += s.decode_queries[(static_cast<size_t>(i) * g + h) * d + j];
      }
      const float* q = dir.data();
      double qn = 0;
      for (int j = 0; j < d; ++j) qn += static_cast<double>(q[j]) * q[j];
      qn = std::sqrt(qn);
      if (qn == 0) continue;
      float best = -std::numeric_limits<float>::infinity();
      // With the lookup component: every decode query's best logit too.
      std::vector<float> others(target.empty() ? 0 : static_cast<size_t>(o.decode_queries),
                                -std::numeric_limits<float>::infinity());
      for (int64_t t = s.retrieval_begin; t < s.retrieval_end; ++t) {
        ToF32(o.dtype, s.keys.row(t), static_cast<size_t>(d), kf.data());
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += static_cast<double>(q[j]) * kf[j];
        best = std::max(best, static_cast<float>(dot) * inv_sqrt_d);
        for (size_t i = 0; i < others.size(); ++i) {
          const float* qi = s.decode_queries.data() + (static_cast<size_t>(i) * g + h) * d;
          float di = 0;
          for (int j = 0; j < d; ++j) di += qi[j] * kf[j];
          others[i] = std::max(others[i], di * inv_sqrt_d);
        }
      }
      for (int j = h; j < o.needles; j += g) {
        uint8_t* row = s.key_bytes.data() + static_cast<size_t>(s.needle_tokens[j]) * d * es;
        ToF32(o.dtype, row, static_cast<size_t>(d), kf.data());
        double dot = 0;
        for (int u = 0; u < d; ++u) dot += static_cast<double>(q[u]) * kf[u];
        double beta = ((best + margin) / inv_sqrt_d - dot) / qn;
        for (size_t i = 0; i < others.size(); ++i) {
          const float* qi = s.decode_queries.data() + (static_cast<size_t>(i) * g + h) * d;
          double qik = 0, qiu = 0, qin = 0;
          for (int u = 0; u < d; ++u) {
            qik += static_cast<double>(qi[u]) * kf[u];
            qiu += static_cast<double>(qi[u]) * q[u] / qn;
            qin += static_cast<double>(qi[u]) * qi[u];
          }
          // Queries nearly orthogonal to the needle direction are left out (the key would have
          // to grow without bound).
          if (qiu > 0.05 * std::sqrt(qin))
            beta = std::max(beta, ((others[i] + margin) / inv_sqrt_d - qik) / qiu);
        }
        for (int u = 0; u < d; ++u) kf[u] += static_cast<float>(beta * q[u] / qn);
        FromF32(o.dtype, kf.data(), static_cast<size_t>(d), row);
      }
    }
  }
  return out;
}

}  // namespace kvrecall::indexer
