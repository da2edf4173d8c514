// The "Final:" line parser of bench/perftest_runner.h, on output captured from ucx_perftest 1.13.1
// (UCX_TLS=tcp, -t ucp_put_bw -s 262144 -n 200 -w 20, on the development VM).
#include "bench/perftest_runner.h"

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::bench {
namespace {

using ::kvrecall::testing::StatusIs;

constexpr char kCaptured[] =
    "+--------------+--------------+------------------------------+---------------------+-----------------------+\n"
    "|              |              |       overhead (usec)        |   bandwidth (MB/s)  |  message rate (msg/s) |\n"
    "+--------------+--------------+----------+---------+---------+----------+----------+-----------+-----------+\n"
    "|    Stage     | # iterations | 50.0%ile | average | overall |  average |  overall |  average  |  overall  |\n"
    "+--------------+--------------+----------+---------+---------+----------+----------+-----------+-----------+\n"
    "Final:                   200      0.080  5080.520  5080.520       49.21      49.21         197         197\n";

TEST(PerftestRunnerTest, ParsesCapturedFinalLine) {
  ASSERT_OK_AND_ASSIGN(PerftestResult r, ParsePerftestFinal(kCaptured));
  EXPECT_EQ(r.iterations, 200);
  EXPECT_DOUBLE_EQ(r.latency_p50_us, 0.080);
  EXPECT_DOUBLE_EQ(r.latency_avg_us, 5080.520);
  EXPECT_DOUBLE_EQ(r.mib_per_s, 49.21);
  // MB/s of perftest is 2^20 B/s, as in scripts/bench-transport.sh: 49.21 * 1048576 / 1e9.
  EXPECT_NEAR(r.gb_per_s, 0.0516, 1e-4);
  EXPECT_DOUBLE_EQ(r.msgs_per_s, 197);
}

TEST(PerftestRunnerTest, TakesTheBandwidthOverallColumn) {
  // Shared memory, 256 KiB (same VM): average and overall columns differ here on purpose.
  ASSERT_OK_AND_ASSIGN(PerftestResult r,
                       ParsePerftestFinal("warming up\nFinal:  2000  2.298  12.483  12.483  20000.00  20027.24  80109  80110\n"));
  EXPECT_DOUBLE_EQ(r.mib_per_s, 20027.24);
  EXPECT_NEAR(r.gb_per_s, 20027.24 * 1048576 / 1e9, 1e-9);
  EXPECT_DOUBLE_EQ(r.msgs_per_s, 80110);
}

TEST(PerftestRunnerTest, RejectsOutputWithoutAFinalLine) {
  EXPECT_THAT(ParsePerftestFinal("[1700000000.0] ... ucp_ep_create failed\n"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParsePerftestFinal("Final: 200 0.08 5080.5\n"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParsePerftestFinal("Final: 200 0.08 5080.5 5080.5 x 49.2 197 197\n"),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PerftestRunnerTest, MissingBinaryIsNotFound) {
  EXPECT_THAT(FindPerftest("kvrecall-no-such-perftest"), StatusIs(absl::StatusCode::kNotFound));
  PerftestOptions o;
  o.binary = "/nonexistent/ucx_perftest";
  o.message_bytes = 4096;
  o.iterations = 1;
  EXPECT_THAT(RunUcxPerftest(o), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvrecall::bench
