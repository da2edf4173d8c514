// Keeps `kvrecall-bench stream` working: a tiny run over UCX tcp (ucx_perftest skipped) must
// stream every selected row, verify the worker region against the node and report every field.
#include "bench/stream_bench.h"

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::bench {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(StreamBenchTest, TinyRunReportsEveryField) {
  // head_dim 16: 32 B rows, 64 B pairs; 4096 B messages = 64 rows per entry.
  ASSERT_OK_AND_ASSIGN(nlohmann::json j,
                       RunStreamBench({"--tls=tcp", "--entries=3", "--kv_heads=2", "--head_dim=16",
                                       "--message_sizes=4096,8192", "--iterations=1", "--warmup=1",
                                       "--steady_budget=64", "--perftest=false"}));
  EXPECT_EQ(j["transport"], "ucx:tcp");
  EXPECT_EQ(j["sequences"].get<int>(), 2);
  EXPECT_FALSE(j["ucx_perftest_available"].get<bool>());
  ASSERT_EQ(j["sizes"].size(), 2u);
  for (const auto& s : j["sizes"]) {
    for (const char* f : {"message_bytes", "stream_gbps", "ucx_perftest_gbps", "stream_vs_perftest", "rows_per_s",
                          "latency_us_p50", "latency_us_p99", "calls"}) {
      EXPECT_TRUE(s.contains(f)) << f;
    }
    EXPECT_EQ(s["calls"].get<int>(), 1);
    EXPECT_GT(s["stream_gbps"].get<double>(), 0);
    EXPECT_TRUE(s["ucx_perftest_gbps"].is_null());
    EXPECT_TRUE(s["verified"].get<bool>());
    EXPECT_EQ(s["rows_per_call"].get<int64_t>(), 3 * s["budget"].get<int64_t>());
    for (const char* phase : {"node", "read", "search", "stream", "stream_plan"}) {
      EXPECT_GE(s["phases_us_p50"][phase].get<double>(), 0) << phase;
    }
  }
  EXPECT_EQ(j["sizes"][0]["budget"].get<int>(), 64);
  // Steady phase: 64-row budget, drift 0.1 -> 6 new rows per entry per call.
  ASSERT_TRUE(j.contains("steady"));
  EXPECT_NEAR(j["steady"]["fraction_sent"].get<double>(), 6.0 / 64, 1e-9);
  EXPECT_TRUE(j["steady"]["verified"].get<bool>());
}

TEST(StreamBenchTest, UcxPerftestFigureIsTheMedianOfItsRuns) {
  ASSERT_OK_AND_ASSIGN(
      nlohmann::json j,
      RunStreamBench({"--tls=tcp", "--entries=2", "--kv_heads=2", "--head_dim=16",
                      "--message_sizes=4096", "--iterations=1", "--warmup=0", "--steady_budget=0",
                      "--perftest_runs=3", "--perftest_iters=50", "--threads=2", "--spin_us=0"}));
  if (!j["ucx_perftest_available"].get<bool>()) GTEST_SKIP() << "ucx_perftest is not installed";
  EXPECT_EQ(j["threads"].get<int>(), 2);
  EXPECT_EQ(j["search_spin_us"].get<int>(), 0);
  const auto& s = j["sizes"][0];
  ASSERT_TRUE(s["ucx_perftest_runs_gbps"].is_array()) << s.dump();
  const std::vector<double> runs = s["ucx_perftest_runs_gbps"].get<std::vector<double>>();
  ASSERT_EQ(runs.size(), 3u);
  EXPECT_LE(runs[0], runs[1]);
  EXPECT_LE(runs[1], runs[2]);
  EXPECT_EQ(s["ucx_perftest_gbps"].get<double>(), runs[1]);
  EXPECT_DOUBLE_EQ(s["stream_vs_perftest"].get<double>(), s["stream_gbps"].get<double>() / runs[1]);
}

TEST(StreamBenchTest, RejectsBadFlags) {
  EXPECT_THAT(RunStreamBench({"--perftest_runs=0"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunStreamBench({"--entriez=2"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunStreamBench({"--message_sizes=1000"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunStreamBench({"--message_sizes=abc"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunStreamBench({"--drift=0"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunStreamBench({"--windows=1"}), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::bench
