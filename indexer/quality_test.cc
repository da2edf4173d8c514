// Tests of merged.h, quality.h, synthetic.h, qk_dump.h, trace_stats.h and the index benchmark.
#include "indexer/quality.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include "bench/index_bench.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "indexer/exact.h"
#include "indexer/merged.h"
#include "indexer/qk_dump.h"
#include "indexer/synthetic.h"
#include "indexer/trace_stats.h"

namespace kvrecall::indexer {
namespace {

using ::kvrecall::testing::StatusIs;

// fp32 rows, one page.
struct Rows {
  std::vector<float> data;
  PagedRows rows;
  Rows(std::vector<float> d, int head_dim) : data(std::move(d)) {
    rows.page_tokens = 1 << 20;
    rows.head_dim = head_dim;
    rows.dtype = DType::kF32;
    rows.row_stride = static_cast<size_t>(head_dim) * 4;
    rows.num_tokens = static_cast<int64_t>(data.size()) / head_dim;
    rows.SetPages({reinterpret_cast<const uint8_t*>(data.data())});
  }
};

TEST(QualityTest, RecallsOnHandCheckableCases) {
  EXPECT_DOUBLE_EQ(TopkRecall({1, 2, 3, 4}, {4, 3, 9, 8}), 0.5);
  EXPECT_DOUBLE_EQ(TopkRecall({}, {1}), 1.0);
  const std::vector<float> scores = {0.1f, 0.5f, 0.3f, 0.1f};  // tokens 10..13
  EXPECT_NEAR(AttentionMassRecall(scores, 10, {11, 12}, {11, 13}), 0.6 / 0.8, 1e-6);
  EXPECT_DOUBLE_EQ(RelativeL2({1, 1}, {1, 1}), 0.0);
  EXPECT_NEAR(RelativeL2({0, 2}, {0, 1}), 1.0, 1e-12);
}

TEST(QualityTest, MergedDuplicatesWithLogCountBiasReproduceDenseAttention) {
  // Tokens 0-3 are one key/value repeated, 4-5 another: merging each run into one entry with its
  // count and adding log(count) to its logit gives exactly the dense output.
  const int d = 4;
  std::vector<float> k, v;
  for (int t = 0; t < 6; ++t) {
    const bool a = t < 4;
    k.insert(k.end(), {a ? 1.0f : -1.0f, 0.5f, 0, a ? 0.0f : 2.0f});
    v.insert(v.end(), {a ? 1.0f : 3.0f, 2, a ? -1.0f : 0.0f, 0});
  }
  Rows keys(k, d), values(v, d);
  MergedOptions mo;
  mo.chunk_tokens = 6;
  mo.keep_ratio = 2.0 / 6;
  ASSERT_OK_AND_ASSIGN(MergedKV m, MergeChunks(keys.rows, values.rows, 0, 6, mo, nullptr));
  ASSERT_EQ(m.entries(), 2);
  EXPECT_EQ(m.counts[0] + m.counts[1], 6);
  const float q[8] = {0.3f, -1, 2, 0.7f, 1, 1, 0, -0.5f};
  std::vector<float> dense, merged;
  ASSERT_OK(
      AttentionOutput(q, 2, keys.rows, values.rows, {0, 1, 2, 3, 4, 5}, nullptr, 0.5f, &dense));
  ASSERT_OK(AttentionOutput(q, 2, keys.rows, values.rows, {}, &m, 0.5f, &merged));
  EXPECT_LT(RelativeL2(merged, dense), 1e-6);
}

TEST(MergedTest, CompressesFourTimesAndKeepsCountsAndOrder) {
  SyntheticOptions o;
  o.tokens = 2000;
  o.head_dim = 32;
  o.window = 32;
  o.decode_queries = 4;
  o.query_token_weight = 0;  // flat attention, where merging beats dropping
  ASSERT_OK_AND_ASSIGN(auto data, GenerateSynthetic(o));
  ThreadPool pool(2);
  ASSERT_OK_AND_ASSIGN(MergedKV a,
                       MergeChunks(data->keys, data->values, 16, 1968, MergedOptions{}, nullptr));
  ASSERT_OK_AND_ASSIGN(MergedKV b,
                       MergeChunks(data->keys, data->values, 16, 1968, MergedOptions{}, &pool));
  EXPECT_EQ(a.keys, b.keys);
  EXPECT_EQ(a.counts, b.counts);
  EXPECT_EQ(a.entries(), (1952 + 3) / 4);
  int64_t total = 0;
  for (int32_t c : a.counts) total += c;
  EXPECT_EQ(total, 1952);
  EXPECT_TRUE(std::is_sorted(a.first_token.begin(), a.first_token.end()));
  // The merged representation approximates dense attention far better than dropping tokens.
  const float* q = data->decode_queries.data();
  std::vector<int32_t> all, outside;
  for (int t = 0; t < 2000; ++t) {
    all.push_back(t);
    if (t < 16 || t >= 1968) outside.push_back(t);
  }
  std::vector<float> dense, merged, dropped;
  const float scale = 1.0f / std::sqrt(32.0f);
  ASSERT_OK(AttentionOutput(q, 4, data->keys, data->values, all, nullptr, scale, &dense));
  ASSERT_OK(AttentionOutput(q, 4, data->keys, data->values, outside, &a, scale, &merged));
  ASSERT_OK(AttentionOutput(q, 4, data->keys, data->values, outside, nullptr, scale, &dropped));
  EXPECT_LT(RelativeL2(merged, dense), RelativeL2(dropped, dense));

  const auto bad = StatusIs(absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(MergeChunks(data->keys, data->values, 10, 10, {}, nullptr).status(), bad);
  EXPECT_THAT(MergeChunks(data->keys, data->values, 0, 5000, {}, nullptr).status(), bad);
  EXPECT_THAT(
      MergeChunks(data->keys, data->values, 0, 100, MergedOptions{0, 0.25}, nullptr).status(), bad);
  EXPECT_THAT(MergeChunks(data->keys, data->values, 0, 100, MergedOptions{64, 0}, nullptr).status(),
              bad);
}

TEST(SyntheticTest, NeedlesAreTheirHeadsTopTokensAndBadOptionsFail) {
  SyntheticOptions o;
  o.tokens = 4096;
  o.head_dim = 64;
  o.decode_queries = 8;
  ASSERT_OK_AND_ASSIGN(auto data, GenerateSynthetic(o));
  EXPECT_EQ(data->needle_tokens.size(), 8u);
  EXPECT_EQ(data->num_prompt_queries, 1024);
  const float scale = 1.0f / 8;
  o.query_token_weight = 1.3f;
  ASSERT_OK_AND_ASSIGN(data, GenerateSynthetic(o));
  // With the lookup component: every needle is its head's best token, for every
  // decode query — by a margin of 0.5 logit by construction (less bf16 rounding).
  std::vector<float> kf(64);
  for (int e = 0; e < o.decode_queries; ++e) {
    for (int j = 0; j < o.needles; ++j) {
      const float* q = data->decode_queries.data() + (e * 4 + j % 4) * 64;
      auto logit = [&](int64_t t) {
        ToF32(o.dtype, data->keys.row(t), 64, kf.data());
        double x = 0;
        for (int u = 0; u < 64; ++u) x += static_cast<double>(q[u]) * kf[u];
        return x * scale;
      };
      double best_other = -1e300;
      for (int64_t t = data->retrieval_begin; t < data->retrieval_end; ++t) {
        if (!std::binary_search(data->needle_tokens.begin(), data->needle_tokens.end(), t))
          best_other = std::max(best_other, logit(t));
      }
      EXPECT_GT(logit(data->needle_tokens[j]), best_other + 0.3)
          << "entry " << e << " needle " << j;
    }
  }
  // Without it (the default): in every decode query's exact group top-64.
  o.query_token_weight = 0;
  ASSERT_OK_AND_ASSIGN(data, GenerateSynthetic(o));
  for (int e = 0; e < o.decode_queries; ++e) {
    SearchQuery sq{data->decode_queries.data() + e * 4 * 64,
                   4,
                   &data->keys,
                   data->retrieval_begin,
                   data->retrieval_end,
                   64,
                   scale};
    std::vector<std::vector<int32_t>> out;
    ASSERT_OK(ExactSearch({&sq, 1}, nullptr, &out));
    for (int32_t n : data->needle_tokens)
      EXPECT_TRUE(std::binary_search(out[0].begin(), out[0].end(), n));
  }
  SyntheticOptions odd = o;
  odd.head_dim = 7;
  EXPECT_THAT(GenerateSynthetic(odd).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  SyntheticOptions tiny = o;
  tiny.tokens = 100;
  EXPECT_THAT(GenerateSynthetic(tiny).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  SyntheticOptions bad = o;
  bad.query_token_persistence = 1;
  EXPECT_THAT(GenerateSynthetic(bad).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  bad = o;
  bad.query_token_weight = -1;
  EXPECT_THAT(GenerateSynthetic(bad).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(QkDumpTest, RoundTripsAndReportsMissingOrTruncatedFiles) {
  const std::string dir = ::testing::TempDir() + "/qk_dump_test";
  std::filesystem::remove_all(dir);
  QkDumpHeader h;
  h.dtype = DType::kBF16;
  h.head_dim = 8;
  h.num_q_heads = 4;
  h.num_kv_heads = 2;
  h.tokens = 5;
  h.prompt_tokens = 3;
  h.layers = {2, 3};
  h.rope_theta = 500000;
  h.model = "tiny";
  std::vector<float> q(4 * 5 * 8), k(2 * 5 * 8), v(2 * 5 * 8);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(i) * 0.25f;
  for (size_t i = 0; i < k.size(); ++i) k[i] = -static_cast<float>(i);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 7);
  ASSERT_OK(WriteQkDumpHeader(dir, h));
  ASSERT_OK(WriteQkDumpLayer(dir, h, 2, q, k, v));
  EXPECT_THAT(WriteQkDumpLayer(dir, h, 9, q, k, v), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(WriteQkDumpLayer(dir, h, 3, q, k, {}), StatusIs(absl::StatusCode::kInvalidArgument));

  ASSERT_OK_AND_ASSIGN(QkDumpHeader r, ReadQkDumpHeader(dir));
  EXPECT_EQ(r.layers, h.layers);
  EXPECT_EQ(r.tokens, 5);
  EXPECT_EQ(r.prompt_tokens, 3);
  EXPECT_EQ(r.dtype, DType::kBF16);
  EXPECT_EQ(r.model, "tiny");
  ASSERT_OK_AND_ASSIGN(QkDumpLayer l, ReadQkDumpLayer(dir, r, 2));
  for (size_t i = 0; i < q.size(); ++i) EXPECT_EQ(l.q[i], RoundTrip(DType::kBF16, q[i]));
  for (size_t i = 0; i < k.size(); ++i) EXPECT_EQ(l.k[i], RoundTrip(DType::kBF16, k[i]));
  const PagedRows kr = DumpRows(r, l, 1, false);
  EXPECT_EQ(kr.num_tokens, 5);
  float first;
  std::memcpy(&first, kr.row(0), 4);
  EXPECT_EQ(first, l.k[5 * 8]);
  std::vector<float> group;
  DumpQueryGroup(r, l, 1, 4, &group);  // q-heads 2 and 3 at position 4
  ASSERT_EQ(group.size(), 16u);
  EXPECT_EQ(group[0], l.q[(2 * 5 + 4) * 8]);
  EXPECT_EQ(group[8], l.q[(3 * 5 + 4) * 8]);

  EXPECT_THAT(ReadQkDumpLayer(dir, r, 3).status(), StatusIs(absl::StatusCode::kNotFound));
  std::filesystem::resize_file(dir + "/layer_2.k.bin", 10);
  EXPECT_THAT(ReadQkDumpLayer(dir, r, 2).status(), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(ReadQkDumpHeader(dir + "/nope").status(), StatusIs(absl::StatusCode::kNotFound));
  std::ofstream(dir + "/header.json") << "{\"format\": \"other\"}";
  EXPECT_THAT(ReadQkDumpHeader(dir).status(), StatusIs(absl::StatusCode::kDataLoss));
  std::filesystem::remove_all(dir);
}

TEST(IndexBenchTest, SmallRunReportsEveryFieldNextToExact) {
  ASSERT_OK_AND_ASSIGN(
      nlohmann::json j,
      bench::RunIndexBench({"index", "--json", "--method=ctkvr,cluster,merged", "--tokens=3000",
                            "--budget=128", "--head_dim=32", "--entries=4", "--repeats=1",
                            "--iterations=3", "--prompt_queries=256", "--window=64",
                            "--query_token_weight=0"}));
  ASSERT_EQ(j["methods"].size(), 4u);
  EXPECT_EQ(j["methods"][0]["method"], "exact");
  EXPECT_EQ(j["methods"][0]["attention_mass_recall"], 1.0);
  for (const auto& m : j["methods"]) {
    for (const char* f :
         {"method", "tokens", "budget", "attention_mass_recall", "topk_recall", "needles_found",
          "needles_total", "search_us_p50", "search_us_p99", "exact_search_us_p50",
          "speedup_vs_exact", "build_ms", "entries_per_s", "parameters"}) {
      EXPECT_TRUE(m.contains(f)) << m["method"] << " lacks " << f;
    }
  }
  EXPECT_EQ(j["methods"][1]["needles_found"], j["methods"][1]["needles_total"]);
  EXPECT_EQ(j["methods"][3]["compression"], 4.0);
  EXPECT_THAT(bench::RunIndexBench({"--bogus=1"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bench::RunIndexBench({"--method=faiss"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bench::RunIndexBench({"--tokens=x"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(TraceStatsTest, HandCheckableCase) {
  // Keys: token 2 aligned with the query, the rest orthogonal; queries equal at even positions,
  // opposite at odd ones.
  Rows k({0, 1, 0, 1, 50, 0, 0, 1, 0, 1}, 2);
  const float even[2] = {1, 0}, odd[2] = {-1, 0};
  TraceStatsInput in;
  in.keys = &k.rows;
  in.group = 1;
  in.query = [&](int64_t p) -> const float* {
    if (p < 0 || p > 5) return nullptr;
    return p % 2 == 0 ? even : odd;
  };
  in.positions = {4, 5};
  in.range_begin = 0;
  in.range_end = 5;
  in.k = 1;
  in.scale = 1;
  in.lags = {1, 2, 16};
  const TraceStats s = ComputeTraceStats(in);
  ASSERT_EQ(s.query_cosine.size(), 3u);
  EXPECT_DOUBLE_EQ(s.query_cosine[0], -1.0);   // lag 1: opposite
  EXPECT_DOUBLE_EQ(s.query_cosine[1], 1.0);    // lag 2: equal
  EXPECT_TRUE(std::isnan(s.query_cosine[2]));  // lag 16: no query that far back
  EXPECT_EQ(s.query_cosine_pairs[1], 2);
  // Position 4 selects token 2, position 5 (query -x) one of the orthogonal tokens.
  EXPECT_EQ(s.topk_overlap_pairs, 1);
  EXPECT_DOUBLE_EQ(s.topk_overlap_adjacent, 0.0);
  // 1% and 10% of 5 tokens is one token: at position 4 it holds ~all the mass, at 5 a quarter.
  EXPECT_NEAR(s.mass_top1pct, (1.0 + 0.25) / 2, 1e-6);
  EXPECT_DOUBLE_EQ(s.mass_top1pct, s.mass_top10pct);
  // Keys of [0, 5): norms 1, 1, 50, 1, 1 (mean 10.8, E[n²] 500.8); two channels hold all energy;
  // key cosine lag 1: pairs (1,0) 1, (2,1) 0, (3,2) 0, (4,3) 1; lag 2: (2,0) 0, (3,1) 1, (4,2) 0.
  EXPECT_DOUBLE_EQ(s.key_norm_mean, 10.8);
  EXPECT_NEAR(s.key_norm_cv, std::sqrt(500.8 - 10.8 * 10.8) / 10.8, 1e-9);
  EXPECT_DOUBLE_EQ(s.key_top4_channel_energy, 1.0);
  ASSERT_EQ(s.key_cosine.size(), 3u);
  EXPECT_DOUBLE_EQ(s.key_cosine[0], 0.5);
  EXPECT_NEAR(s.key_cosine[1], 1.0 / 3, 1e-12);
  EXPECT_TRUE(std::isnan(s.key_cosine[2]));
}

// Trace statistics of the generator, 8K tokens at the reference model's shape (head_dim 128,
// group 2). With the per-position retrieval component (weight 1.3) the query statistics land
// near the recall-tiny traces (docs/benchmarks.md: query cosine 0.64 / 0.37 / 0.37 at lags
// 1 / 16 / 256, adjacent top-1024 overlap 0.6) and attention is more concentrated than without
// it (it overshoots the traces' top-1% mass of 0.68: see synthetic.h); without it (the default)
// queries barely move.
TraceStats GeneratorStats(float weight) {
  SyntheticOptions o;
  o.tokens = 8192;
  o.group = 2;
  o.decode_queries = 16;
  o.query_token_weight = weight;
  auto data = GenerateSynthetic(o);
  EXPECT_OK(data.status());
  const SyntheticData& d = **data;
  const int row = o.group * o.head_dim;
  const int64_t first = o.tokens - o.decode_queries - d.num_prompt_queries;
  TraceStatsInput in;
  in.keys = &d.keys;
  in.group = o.group;
  in.query = [&](int64_t p) -> const float* {
    const int64_t i = p - first;
    if (i < 0) return nullptr;
    if (i < d.num_prompt_queries) return d.prompt_queries.data() + i * row;
    return d.decode_queries.data() + (i - d.num_prompt_queries) * row;
  };
  for (int64_t p = o.tokens - o.decode_queries; p < o.tokens; ++p) in.positions.push_back(p);
  in.range_begin = d.retrieval_begin;
  in.range_end = d.retrieval_end;
  in.k = 1024;
  in.lags = {1, 16, 256};
  return ComputeTraceStats(in);
}

TEST(SyntheticTest, LookupComponentMakesTraceStatisticsLikeTheReferenceModels) {
  const TraceStats real_like = GeneratorStats(1.3f);
  const TraceStats old = GeneratorStats(0);
  EXPECT_GT(real_like.query_cosine[0], 0.5);
  EXPECT_LT(real_like.query_cosine[0], 0.8);
  EXPECT_LT(real_like.query_cosine[1], 0.55);
  EXPECT_LT(real_like.query_cosine[2], 0.55);
  EXPECT_GT(real_like.topk_overlap_adjacent, 0.4);
  EXPECT_LT(real_like.topk_overlap_adjacent, 0.8);
  EXPECT_GT(real_like.mass_top1pct, old.mass_top1pct + 0.1);
  EXPECT_GT(old.query_cosine[0], 0.98);
  EXPECT_GT(old.topk_overlap_adjacent, 0.9);
  // The keys do not depend on the option (only the queries get the lookup component).
  // (Up to the planted needles, whose margin differs.)
  EXPECT_NEAR(real_like.key_norm_mean, old.key_norm_mean, 1e-3 * old.key_norm_mean);
}

TEST(IndexBenchTest, RunsOnARealDumpLayout) {
  const std::string dir = ::testing::TempDir() + "/qk_dump_bench_test";
  std::filesystem::remove_all(dir);
  QkDumpHeader h;
  h.dtype = DType::kF32;
  h.head_dim = 16;
  h.num_q_heads = 4;
  h.num_kv_heads = 2;
  h.tokens = 1200;
  h.prompt_tokens = 1190;  // 10 decode steps: entries reach into the prompt
  h.layers = {0, 2};
  h.has_values = true;
  h.rope_theta = 10000;
  h.model = "test";
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  auto fill = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng);
    return v;
  };
  const auto q = fill(4 * 1200 * 16), kk = fill(2 * 1200 * 16), v = fill(2 * 1200 * 16);
  ASSERT_OK(WriteQkDumpHeader(dir, h));
  ASSERT_OK(WriteQkDumpLayer(dir, h, 0, q, kk, v));
  ASSERT_OK(WriteQkDumpLayer(dir, h, 2, q, kk, v));
  ASSERT_OK_AND_ASSIGN(
      nlohmann::json j,
      bench::RunIndexBench({"--qk_dump=" + dir, "--method=ctkvr,cluster,merged", "--budget=64",
                            "--entries=16", "--repeats=1", "--iterations=3", "--window=64",
                            "--prompt_queries=128", "--segment_tokens=512"}));
  EXPECT_EQ(j["data"]["generator"], "qk_dump");
  EXPECT_EQ(j["data"]["layer"], 2);  // the first layer >= 2 by default
  EXPECT_EQ(j["data"]["entries_are_decode_steps"], false);
  EXPECT_EQ(j["data"]["search_entries"], 32);  // 16 positions × 2 kv-heads
  EXPECT_EQ(j["options"]["group"], 2);
  ASSERT_EQ(j["methods"].size(), 4u);
  EXPECT_EQ(j["methods"][0]["attention_mass_recall"], 1.0);
  EXPECT_EQ(j["methods"][1]["needles_total"], 0);
  for (int m = 1; m < 3; ++m) {
    EXPECT_GT(j["methods"][m]["attention_mass_recall"].get<double>(), 0.0);
    EXPECT_LE(j["methods"][m]["attention_mass_recall"].get<double>(), 1.0 + 1e-9);
  }
  EXPECT_GT(j["methods"][2]["clusters"].get<double>(), 10.0);
  // Range [16, 1136) in 512-token chunks: [16, 528) and [528, 1136) (the remainder is absorbed).
  EXPECT_EQ(j["methods"][2]["kmeans_runs"].get<double>(), 2.0);
  const double oracle = j["methods"][2]["oracle_ranking_mass_recall"].get<double>();
  EXPECT_GT(oracle, 0.0);
  EXPECT_LE(oracle, 1.0 + 1e-9);
  ASSERT_TRUE(j.contains("trace_stats"));
  EXPECT_TRUE(j["trace_stats"]["query_cosine_by_lag"].contains("1024"));
  EXPECT_GT(j["trace_stats"]["mass_top10pct"].get<double>(),
            j["trace_stats"]["mass_top1pct"].get<double>());
  EXPECT_THAT(bench::RunIndexBench({"--qk_dump=" + dir, "--layer=1"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bench::RunIndexBench({"--qk_dump=" + dir + "/none"}).status(),
              StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvrecall::indexer
