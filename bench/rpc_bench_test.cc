// Keeps `kvrecall-bench rpc` working: a tiny run must succeed, agree between the two tiers (the
// bench checks ids and row bytes itself) and report every field.
#include "bench/rpc_bench.h"

#include <cstdlib>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::bench {
namespace {

using ::kvrecall::testing::StatusIs;

// The kvrecall-server the bench starts: CTest names the binaries' directory.
std::string ServerBinary() {
  const char* d = std::getenv("KVRECALL_BIN_DIR");
  return std::string(d != nullptr ? d : "build/bin") + "/kvrecall-server";
}

TEST(RpcBenchTest, TinyRunReportsEveryField) {
  // ctkvr both with its queries in the worker's region (the node reads them with UCX gets) and
  // in the request; the server in a child process and in this one.
  for (const char* method : {"exact", "ctkvr", "ctkvr-queries-in-request", "ctkvr-inprocess"}) {
    const bool in_request = std::string(method) == "ctkvr-queries-in-request";
    const bool inprocess = std::string(method) == "ctkvr-inprocess";
    ASSERT_OK_AND_ASSIGN(
        nlohmann::json j,
        RunRpcBench({"--sequences=2", "--kv_heads=2", "--head_dim=16", "--tokens=700",
                     "--budget=32", "--iterations=2", "--warmup=1", "--ucx_tls=tcp",
                     std::string("--method=") + (in_request || inprocess ? "ctkvr" : method),
                     std::string("--queries_in_region=") + (in_request ? "false" : "true"),
                     std::string("--server=") + (inprocess ? "inprocess" : "process"),
                     "--server_binary=" + ServerBinary()}));
    EXPECT_EQ(j["queries_in_region"].get<bool>(), !in_request);
    EXPECT_EQ(j["queries_in_place"].get<bool>(), !in_request);  // written where the tier reads them
    EXPECT_EQ(j["server"].get<std::string>(), inprocess ? "inprocess" : "process");
    for (const char* f : {"rpc_us_p50", "rpc_us_p99", "inprocess_us_p50", "overhead_ratio", "entries_per_s"}) {
      EXPECT_TRUE(j.contains(f)) << f;
    }
    EXPECT_EQ(j["entries"].get<int>(), 4);
    EXPECT_GT(j["rpc_us_p50"].get<double>(), 0);
    // The server's time lies inside the client's wait and holds the node's.
    EXPECT_GE(j["service_us_p50"].get<double>(), j["node_us_p50"].get<double>());
    EXPECT_LE(j["service_us_p50"].get<double>(), j["wait_us_p50"].get<double>());
  }
}

TEST(RpcBenchTest, RejectsBadFlags) {
  EXPECT_THAT(RunRpcBench({"--sequencez=2"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunRpcBench({"--tokens=abc"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunRpcBench({"--method=merged"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunRpcBench({"--tokens=100"}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RunRpcBench({"--server=remote"}), StatusIs(absl::StatusCode::kInvalidArgument));
  // A server binary that is not there is named in the error, before any work.
  EXPECT_THAT(RunRpcBench({"--sequences=1", "--kv_heads=1", "--head_dim=16", "--tokens=700",
                           "--budget=32", "--server_binary=/nonexistent/kvrecall-server"}),
              StatusIs(absl::StatusCode::kNotFound));
  // One that exits instead of serving: its exit is the error, not a hang.
  EXPECT_THAT(RunRpcBench({"--sequences=1", "--kv_heads=1", "--head_dim=16", "--tokens=700",
                           "--budget=32", "--server_binary=/bin/false"}),
              StatusIs(absl::StatusCode::kInternal));
}

}  // namespace
}  // namespace kvrecall::bench
