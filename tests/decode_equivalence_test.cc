// A real kvrecall-server process and a real kvrecall-worker process on loopback: with exact
// retrieval and a budget covering every candidate, sparse decoding through the tier must equal
// dense decoding exactly (same tokens, identical logits), over UCX and over the gRPC fallback.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/process.h"

namespace kvrecall::testing {
namespace {

using ::testing::HasSubstr;

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

class DecodeEquivalenceTest : public ::testing::Test {
 protected:
  // Lazily once per process (a failure in SetUpTestSuite would read as "skipped").
  void SetUp() override {
    if (dir_ != nullptr) return;
    dir_ = new std::string(absl::StrCat(::testing::TempDir(), "/decode_equivalence.", getpid()));
    std::filesystem::create_directories(*dir_);
    auto make = Process::Start({BinDir() + "/kvrecall-worker", "make-model", "--preset=tiny", "--out=" + *dir_ + "/model"},
                               *dir_ + "/make.log");
    ASSERT_TRUE(make.ok());
    ASSERT_EQ(*make->Wait(absl::Seconds(60)), 0) << ReadFile(*dir_ + "/make.log");
    std::ofstream(*dir_ + "/prompt.txt") << "The quick brown fox jumps over the lazy dog; pack my box with five "
                                            "dozen liquor jugs. 0123456789 ";
  }

  // Runs generate against `server` and returns its JSON report.
  nlohmann::json Generate(const ServerProcess& server, const std::vector<std::string>& extra) {
    const std::string json = *dir_ + "/gen.json";
    std::remove(json.c_str());
    std::vector<std::string> argv = {BinDir() + "/kvrecall-worker", "generate", "--model=" + *dir_ + "/model",
                                     "--tier=" + server.address(), "--ucx-tls=tcp",
                                     "--prompt-file=" + *dir_ + "/prompt.txt", "--prompt-tokens=1200",
                                     "--max-new-tokens=8", "--sink-tokens=16", "--window-tokens=64",
                                     "--compare-dense", "--threads=2", "--json=" + json};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto p = Process::Start(argv, *dir_ + "/worker.log");
    EXPECT_TRUE(p.ok());
    auto rc = p->Wait(absl::Seconds(300));
    EXPECT_TRUE(rc.ok());
    EXPECT_EQ(*rc, 0) << ReadFile(*dir_ + "/worker.log");
    return nlohmann::json::parse(ReadFile(json), nullptr, /*allow_exceptions=*/false);
  }

  static std::string* dir_;
};
std::string* DecodeEquivalenceTest::dir_ = nullptr;

TEST_F(DecodeEquivalenceTest, SparseEqualsDenseOverUcxAndOverGrpcFallback) {
  auto server = StartServer(*dir_);
  ASSERT_TRUE(server.ok()) << server.status();
  for (const std::string transport : {"ucx", "grpc"}) {
    SCOPED_TRACE(transport);
    nlohmann::json j = Generate(*server, {"--budget=2048", "--transport=" + transport});
    ASSERT_FALSE(j.is_discarded());
    EXPECT_EQ(j["compare_dense"]["top1_match_rate"].get<double>(), 1.0);
    EXPECT_EQ(j["compare_dense"]["max_abs_dlogit"].get<double>(), 0.0);
    // 8 steps x 2 sparse layers x 2 kv-heads, each recalling all of [16, pos - 63).
    EXPECT_GE(j["recalled_rows"].get<int64_t>(), 8 * 2 * 2 * (1200 - 16 - 64));
    EXPECT_GT(j["bytes_streamed_per_token"].get<double>(), 0);
  }
  // The approximate indices, with a budget covering every candidate, select everything too.
  for (const std::string method : {"ctkvr", "cluster"}) {
    SCOPED_TRACE(method);
    nlohmann::json j = Generate(*server, {"--budget=2048", "--method=" + method});
    ASSERT_FALSE(j.is_discarded());
    EXPECT_EQ(j["compare_dense"]["max_abs_dlogit"].get<double>(), 0.0);
    EXPECT_EQ(j["options"]["method"].get<std::string>(), method);
  }
  // Without delta streaming a small budget streams exactly budget rows per (sparse layer,
  // kv-head) per token: 2 layers x 2 kv-heads x 32 rows x (K + V: 2 x 64 x 2 bytes).
  nlohmann::json j = Generate(*server, {"--budget=32", "--delta-streaming=false"});
  EXPECT_EQ(j["bytes_streamed_per_token"].get<double>(), 2 * 2 * 32 * 256);
  EXPECT_EQ(j["streamed_rows"].get<int64_t>(), j["recalled_rows"].get<int64_t>());
  // With it (the default) only rows missing from the worker's slot caches travel; lookahead
  // selects from the previous step's queries, all layers issued at the start of the step (here
  // with each call polling for its reply).
  j = Generate(*server, {"--budget=32", "--lookahead", "--tier-reply-poll-us=20000"});
  EXPECT_EQ(j["recalled_rows"].get<int64_t>(), 8 * 2 * 2 * 32);
  EXPECT_LT(j["streamed_rows"].get<int64_t>(), j["recalled_rows"].get<int64_t>());
  EXPECT_LT(j["bytes_streamed_per_token"].get<double>(), 2 * 2 * 32 * 256);
  EXPECT_EQ(j["fallback_layers"].get<int64_t>(), 0);
  EXPECT_TRUE(j["options"]["lookahead"].get<bool>());

  // Operators see the traffic: kvrecallctl and /metrics.
  auto ctl = Process::Start({BinDir() + "/kvrecallctl", "--server=" + server->address(), "status"},
                            *dir_ + "/ctl.log");
  ASSERT_TRUE(ctl.ok());
  EXPECT_EQ(*ctl->Wait(absl::Seconds(30)), 0);
  EXPECT_THAT(ReadFile(*dir_ + "/ctl.log"), HasSubstr("retrieve calls  96"));
  const std::string metrics = HttpGet(server->metrics_port, "/metrics");
  EXPECT_THAT(metrics, HasSubstr("HTTP/1.0 200 OK"));
  EXPECT_THAT(metrics, HasSubstr("kvrecall_retrieve_calls_total 96"));
  EXPECT_THAT(metrics, HasSubstr("# TYPE kvrecall_retrieve_seconds histogram"));
  // BuildIndex built ctkvr with its prompt queries; cluster was already built at commit
  // (--auto-index=cluster), so asking for it again built nothing.
  EXPECT_THAT(metrics, HasSubstr("kvrecall_index_builds_total 1\n"));
  EXPECT_THAT(metrics, HasSubstr("# TYPE kvrecall_index_auto_builds"));
}

// A decode step's new tokens go to the node in one AppendKVBatch call. A node without that RPC
// (UNIMPLEMENTED, as from before it) gets AppendKV streams instead, and decoding is unchanged.
TEST_F(DecodeEquivalenceTest, StepAppendsGoInOneRpcAndFallBackToAppendKV) {
  std::vector<int32_t> generated;
  int64_t prompt_streams = -1;  // AppendKV streams of the first run: the prompt's only
  for (const bool batch : {true, false}) {
    SCOPED_TRACE(batch ? "AppendKVBatch" : "AppendKV fallback");
    const std::string dir = absl::StrCat(*dir_, "/append-", batch);
    std::filesystem::create_directories(dir);
    std::vector<std::string> flags;
    if (!batch) flags.push_back("--fault-unimplemented=AppendKVBatch");
    auto server = StartServer(dir, flags);
    ASSERT_TRUE(server.ok()) << server.status();
    nlohmann::json j = Generate(*server, {"--budget=32", "--transport=grpc"});
    ASSERT_FALSE(j.is_discarded());
    const int64_t steps = j["decode_tokens"].get<int64_t>();
    ASSERT_GT(steps, 0);
    const std::string metrics = HttpGet(server->metrics_port, "/metrics");
    auto counter = [&](const std::string& name) -> int64_t {
      const size_t at = metrics.find("\n" + name + " ");
      if (at == std::string::npos) return 0;  // never incremented
      return std::stoll(metrics.substr(at + name.size() + 2));
    };
    if (batch) {
      EXPECT_EQ(counter("kvrecall_append_batch_calls_total"), steps);
      generated = j["generated"].get<std::vector<int32_t>>();
      prompt_streams = counter("kvrecall_append_streams_total");
    } else {
      EXPECT_EQ(counter("kvrecall_append_batch_calls_total"), 0);
      EXPECT_EQ(j["generated"].get<std::vector<int32_t>>(), generated);
      // The first refused batch switched the worker to AppendKV: one stream a step more.
      EXPECT_EQ(counter("kvrecall_append_streams_total"), prompt_streams + steps);
    }
  }
}

TEST_F(DecodeEquivalenceTest, SlowTierMissesTheDeadlineAndTheWorkerFallsBack) {
  // Every put of rows waits 400 ms; the worker gives each Retrieve 100 ms.
  auto server = StartServer(*dir_, {"--fault-put-delay-ms=400"});
  ASSERT_TRUE(server.ok()) << server.status();
  nlohmann::json j = Generate(*server, {"--budget=32", "--retrieve-deadline-ms=100"});
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["decode_tokens"].get<int64_t>(), 8) << "the run completes";
  EXPECT_EQ(j["fallback_layers"].get<int64_t>(), 8 * 2) << "every sparse layer of every step missed";
  EXPECT_EQ(j["streamed_rows"].get<int64_t>(), 0);
}

TEST_F(DecodeEquivalenceTest, WorkerRejectsACheckpointWithALyingHeader) {
  const std::string bad = *dir_ + "/bad-model";
  std::filesystem::create_directories(bad);
  std::filesystem::copy_file(*dir_ + "/model/config.json", bad + "/config.json",
                             std::filesystem::copy_options::overwrite_existing);
  std::string st = ReadFile(*dir_ + "/model/model.safetensors");
  // Claim a header far longer than the file.
  const uint64_t lie = st.size() * 4;
  std::memcpy(st.data(), &lie, 8);
  std::ofstream(bad + "/model.safetensors", std::ios::binary) << st;
  auto p = Process::Start({BinDir() + "/kvrecall-worker", "generate", "--model=" + bad, "--prompt=hello",
                           "--tier=local"},
                          *dir_ + "/bad.log");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(*p->Wait(absl::Seconds(60)), 1);
  EXPECT_THAT(ReadFile(*dir_ + "/bad.log"), HasSubstr("DATA_LOSS"));
}

// Tensor parallelism is the GPU engine's: any other width, or a width for the host engine, is
// refused before anything loads.
TEST_F(DecodeEquivalenceTest, WorkerRejectsTensorParallelismItCannotRun) {
  for (const std::vector<std::string>& flags : {std::vector<std::string>{"--tensor_parallel=2"},
                                                {"--tensor_parallel=0"},
                                                {"--engine=gpu", "--tensor_parallel=-1"}}) {
    std::vector<std::string> argv = {BinDir() + "/kvrecall-worker", "generate",
                                     "--model=" + *dir_ + "/model", "--prompt=hello"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    auto p = Process::Start(argv, *dir_ + "/tp.log");
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(*p->Wait(absl::Seconds(60)), 1) << flags.back();
    EXPECT_THAT(ReadFile(*dir_ + "/tp.log"), HasSubstr("INVALID_ARGUMENT")) << flags.back();
  }
}

}  // namespace
}  // namespace kvrecall::testing
