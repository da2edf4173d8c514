// kvrecall-bench: the project's benchmark programs, one subcommand each, JSON on stdout.
//
//   kvrecall-bench transport --transports=tcp --json     UCX put path (see transport_bench.h)
//   kvrecall-bench index --method=ctkvr --json            indices vs exact (see index_bench.h)
//   kvrecall-bench rpc --json                             Retrieve RPC vs in-process (rpc_bench.h)
//   kvrecall-bench store --json                           arena and prefix sharing (store_bench.h)
//   kvrecall-bench stream --json                          delta streaming vs ucx_perftest (stream_bench.h)
//   kvrecall-bench ingest --json                          bulk ingest over UCX vs AppendKV (ingest_bench.h)
//   kvrecall-bench accuracy --json                        retrieval methods vs dense on recall-tiny (accuracy_bench.h)
//   kvrecall-bench soak --minutes=N --json                concurrent clients, eviction, checked reads, RSS (soak_bench.h)
//
// Every performance claim in docs/benchmarks.md names the command that reproduces it.
#include <iostream>
#include <string>
#include <vector>

#include "bench/accuracy_bench.h"
#include "bench/index_bench.h"
#include "bench/ingest_bench.h"
#include "bench/rpc_bench.h"
#include "bench/soak_bench.h"
#include "bench/store_bench.h"
#include "bench/stream_bench.h"
#include "bench/transport_bench.h"
#include "common/flags.h"

namespace {

constexpr char kUsage[] =
    "kvrecall-bench <benchmark> [--flag=value ...] [--json]\n"
    "  transport   RemoteWriter::PutAll rows/s, GB/s and latency over a UCX transport\n"
    "              flags: --transports=tcp|posix,sysv,cma,self|inproc --row_bytes=512\n"
    "                     --rows_per_put_batch=1024 --large_put_bytes=4194304 --seconds=3 --threads=1\n"
    "  index       retrieval indices vs exact on the same data: quality, build, search latency\n"
    "              flags: --method=ctkvr,cluster,merged --tokens=98304 --budget=1024 --head_dim=128\n"
    "                     --group=4 (see bench/index_bench.h)\n"
    "  rpc         Retrieve over gRPC + UCX vs the same calls in-process (flags: bench/rpc_bench.h)\n"
    "  store       arena ingest vs memcpy, prefix sharing of 16 sessions (flags: see bench/store_bench.h)\n"
    "  stream      Node::Retrieve delta streaming over UCX vs ucx_perftest put bandwidth\n"
    "              flags: --tls=tcp|posix,sysv,cma,self --entries=8 --head_dim=128\n"
    "                     --message_sizes=262144,1048576,4194304 --seconds=2|--iterations=N --drift=0.1\n"
    "                     --perftest_iters=0(auto) --perftest=false --seed=1 (see bench/stream_bench.h)\n"
    "  ingest      AppendKV of a whole prompt: one-sided puts into the node's arena vs the gRPC stream\n"
    "              flags: --layers=32 --kv_heads=8 --head_dim=128 --tokens=2048 --iterations=5\n"
    "                     --ucx_tls= --durable=false --data_dir= (see bench/ingest_bench.h)\n"
    "  accuracy    task accuracy (passkey, multikey, ar) of exact/ctkvr/cluster vs dense on models/recall-tiny\n"
    "              flags: --contexts=4096,8192,16384,32768 --depths=0.1,...,0.9 --samples=4 --tasks=passkey,multikey\n"
    "                     --methods=exact,ctkvr,cluster --budgets=64,...,2048 --lookahead=both --threads=0\n"
    "                     --seed=777 --markdown=FILE --plot=FILE.png (see bench/accuracy_bench.h)\n"
    "  soak        concurrent clients against a memory-capped node with eviction; checks every row read\n"
    "              back and the RSS; fails on any error, mismatch or RSS above budget\n"
    "              flags: --minutes=1 --clients=8 --memory=256MiB --rss_budget_mib=0 (see bench/soak_bench.h)\n"
    "Output is one JSON document (pretty-printed; --json prints it compact).\n";

// Runs a benchmark whose entry point takes the subcommand's arguments and returns its JSON.
template <typename Fn>
int RunJson(const char* name, Fn fn, const std::vector<std::string>& args, bool compact) {
  auto result = fn(args);
  if (!result.ok()) {
    std::cerr << "kvrecall-bench " << name << ": " << result.status() << "\n";
    return result.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::cout << result->dump(compact ? -1 : 2) << "\n";
  return 0;
}

int Transport(const std::vector<std::string>& args, bool compact) {
  auto options = kvrecall::bench::ParseTransportBenchFlags(args);
  if (!options.ok()) {
    std::cerr << "kvrecall-bench transport: " << options.status() << "\n" << kUsage;
    return 2;
  }
  auto result = kvrecall::bench::RunTransportBench(*options);
  if (!result.ok()) {
    std::cerr << "kvrecall-bench transport: " << result.status() << "\n";
    return 1;
  }
  std::cout << result->dump(compact ? -1 : 2) << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  kvrecall::SetMutexDeadlockDetection(false);  // subcommands parse their own flags (flag_map.h)
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  bool compact = false;
  for (const auto& a : args) compact |= a == "--json";
  if (cmd == "transport") return Transport(args, compact);
  if (cmd == "ingest") {
    return RunJson("ingest", [](const std::vector<std::string>& a) { return kvrecall::bench::RunIngestBench(a); },
                   args, compact);
  }
  if (cmd == "index") {
    return RunJson("index", [](const std::vector<std::string>& a) { return kvrecall::bench::RunIndexBench(a); },
                   args, compact);
  }
  if (cmd == "soak") {
    return RunJson("soak", [](const std::vector<std::string>& a) { return kvrecall::bench::RunSoakBench(a); }, args,
                   compact);
  }
  if (cmd == "rpc") {
    return RunJson("rpc", [](const std::vector<std::string>& a) { return kvrecall::bench::RunRpcBench(a); }, args,
                   compact);
  }
  if (cmd == "store") {
    return RunJson("store", [](const std::vector<std::string>& a) { return kvrecall::bench::RunStoreBench(a); },
                   args, compact);
  }
  if (cmd == "stream") {
    return RunJson("stream", [](const std::vector<std::string>& a) { return kvrecall::bench::RunStreamBench(a); },
                   args, compact);
  }
  if (cmd == "accuracy") {
    return RunJson("accuracy",
                   [](const std::vector<std::string>& a) { return kvrecall::bench::RunAccuracyBench(a); }, args,
                   compact);
  }
  std::cerr << "kvrecall-bench: unknown benchmark '" << cmd << "'\n" << kUsage;
  return 2;
}
