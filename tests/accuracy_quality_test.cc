// Quality regression (CTest label `quality`): the CPU configuration of `kvrecall-bench accuracy`
// on the reference model (models/recall-tiny) with thresholds the model meets with margin, so a
// change that breaks retrieval (selection, slot caches, lookahead, an index) fails here even when
// every unit test still passes. Passkey at 4K tokens, needles at 10% / 50% / 90% depth (all of
// them outside the sinks and the 256-token window, so they can only be answered through the tier),
// budgets 256 and 1024, exact / ctkvr / cluster, lookahead off and on.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <tuple>

#include "bench/accuracy_bench.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::bench {
namespace {

TEST(AccuracyQualityTest, RetrievalMatchesDenseOnPasskey4K) {
  AccuracyBenchOptions o;
  o.model = KVRECALL_MODEL_DIR;
  o.haystack = KVRECALL_MODEL_DIR "/haystack.txt";
  o.tasks = {"passkey"};
  o.contexts = {4096};
  o.depths = {0.1, 0.5, 0.9};
  o.samples = 3;
  o.methods = {"exact", "ctkvr", "cluster"};
  o.budgets = {256, 1024};
  o.lookahead = "both";
  o.seed = 20261122;
  const std::string plot = ::testing::TempDir() + "/accuracy-quality.png";
  o.plot = plot;
  absl::StatusOr<nlohmann::json> r = RunAccuracyBench(o);
  ASSERT_TRUE(r.ok()) << r.status();
  const nlohmann::json& rows = (*r)["rows"];
  ASSERT_EQ(rows.size(), 3u * 3 * 2 * 2);  // depths x methods x budgets x lookahead

  // The answer is the planted key, decoded as text: the task is what we think it is.
  const nlohmann::json& ex = (*r)["examples"][0];
  EXPECT_EQ(ex["dense_answer"].get<std::string>(), " " + ex["fact"].get<std::string>());

  // Mean accuracy over depths per (method, budget, lookahead), and dense.
  std::map<std::tuple<std::string, int, bool>, double> acc;
  std::map<double, double> dense_by_depth;
  for (const auto& row : rows) {
    EXPECT_EQ(row["samples"], 3);
    acc[{row["method"], row["budget"], row["lookahead"]}] += row["accuracy"].get<double>() / 3;
    dense_by_depth[row["depth"].get<double>()] = row["dense_accuracy"].get<double>();
  }
  double dense = 0;
  for (const auto& [d, a] : dense_by_depth) dense += a / 3;
  EXPECT_GE(dense, 0.9) << "the reference model itself no longer answers (dense)";
  // Measured on this configuration (9 samples per cell, 2026-11-23): exact and ctkvr 100% at
  // 256 and 1024 (= dense), lookahead off and on (exact with lookahead was 11% / 56% before
  // lookahead kept the successors of its best tokens; ctkvr 44% / 44% as published, before
  // novel queries were scored exactly: docs/benchmarks.md); cluster 89% / 100% without
  // lookahead, 100% / 100% with it. With retrieval broken every needle lies outside sinks +
  // window: 0%.
  // The run is deterministic (fixed seed, per-head attention on one thread each), so the floors
  // below only move when the code does.
  for (const auto& [key, a] : acc) {
    const auto& [method, budget, lookahead] = key;
    SCOPED_TRACE(testing::Message()
                 << method << " budget " << budget << " lookahead " << lookahead);
    if (method == "exact" && !lookahead) {
      EXPECT_GE(a, dense - 0.01);  // the full scan is lossless here
    }
  }
  // Lookahead selects from the previous step's queries; keeping the successors of its best
  // tokens (EngineOptions::lookahead_successors) follows the copying head.
  EXPECT_GE((acc[{"exact", 256, true}]), 0.85);
  EXPECT_GE((acc[{"exact", 1024, true}]), 0.85);
  EXPECT_GE((acc[{"ctkvr", 1024, true}]), 0.85);
  // ctkvr scores novel queries exactly (CtkvrOptions::min_similarity): the copy steps that the
  // published method misses. A floor above the published 44% keeps that from regressing.
  EXPECT_GE((acc[{"ctkvr", 256, false}]), 0.85);
  EXPECT_GE((acc[{"ctkvr", 1024, false}]), 0.85);
  EXPECT_GE((acc[{"cluster", 1024, false}]), 0.3);

  // The plot is a compressed PNG (a few KB, not the ~1 MB of raw pixels).
  std::ifstream png(plot, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(png)), std::istreambuf_iterator<char>());
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_GT(bytes.size(), 500u);
  EXPECT_LT(bytes.size(), 200000u);
  std::remove(plot.c_str());
}

TEST(AccuracyQualityTest, MergedIsRefusedNotFaked) {
  absl::StatusOr<AccuracyBenchOptions> o = ParseAccuracyBenchFlags({"--methods=exact,merged"});
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  o = ParseAccuracyBenchFlags({"--tasks=vartrack"});
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  o = ParseAccuracyBenchFlags({"--budgets=64,2048", "--contexts=4096", "--lookahead=on", "--json"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->budgets, (std::vector<int>{64, 2048}));
  EXPECT_EQ(o->lookahead, "on");
}

}  // namespace
}  // namespace kvrecall::bench
