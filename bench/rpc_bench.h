// Retrieve over the wire vs in-process, side by side in one run (issue 5's rpc benchmark).
//
// Two tiers hold the same data: a LocalTier (kvstore::Node in this process, rows delivered by
// the in-process transport, i.e. memcpy) and a RemoteTier talking gRPC to a kvrecall-server on
// 127.0.0.1 (its Node puts rows over UCX into the RemoteTier's registered buffer). The server is
// a child process, as deployed (--server=process), or runs inside this process
// (--server=inprocess, where its gRPC threads share the client's). Both tiers get identical
// Retrieve batches — every (sequence, kv-head) of the decode batch, one layer — interleaved, so
// machine noise hits both alike.
//
// JSON: rpc_us_p50, rpc_us_p99, inprocess_us_p50, inprocess_us_p99, overhead_ratio
// (= rpc_p50 / inprocess_p50 - 1; target <= 0.25), entries_per_s (over the wire), bytes_per_call,
// and every option; rows_sent_per_call and sent_fraction show what delta streaming saved.
#ifndef KVRECALL_BENCH_RPC_BENCH_H_
#define KVRECALL_BENCH_RPC_BENCH_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvrecall::bench {

struct RpcBenchOptions {
  int sequences = 32;
  int kv_heads = 8;
  int group = 4;           // q-heads per kv-head
  int head_dim = 128;
  int tokens = 32768;      // per sequence
  int budget = 1024;
  std::string method = "ctkvr";  // exact | ctkvr | cluster
  int sinks = 16;
  int window = 256;
  // Timed calls, after `warmup` untimed ones. The server's gRPC service pool hands successive
  // calls to different threads, and each thread's first calls fault in its reusable buffers;
  // the warmup covers two rounds of a 16-thread pool, so the p50 is the steady state a decode
  // server sees.
  int iterations = 200;
  int warmup = 40;
  std::string ucx_tls;     // UCX_TLS for both ends; empty = UCX's choice
  uint64_t seed = 1;
  bool delta = true;   // delta streaming (slot epochs); false: every call sends every selected row
  float drift = 0.05f;  // per-step query change: each element += drift * N(0, 1)
  // Queries rounded to bf16, as a bf16 model computes them (RemoteTier then sends them as bf16);
  // false: full fp32 queries on the wire.
  bool bf16_queries = true;
  // ctkvr's novel-query threshold (CtkvrOptions::min_similarity) on both tiers; negative = the
  // node's default. The bench's queries are random, unlike every prompt centroid, so with the
  // default every search is novel and scored exactly; 0 serves each from the lists (CTKVR as
  // published), the cost a real model's queries mostly see.
  double ctkvr_min_similarity = -1;
  // CtkvrOptions::copy_list_rows on both tiers: candidates streamed from per-centroid copies of
  // their key rows (true) or gathered from the pages (false). The same selection either way.
  bool ctkvr_copy_list_rows = true;
  // Search threads of each node (NodeOptions::search_threads); <= 0: every core.
  int threads = 0;
  // How long each node's idle search threads poll for work before they sleep
  // (NodeOptions::search_spin; kvrecall-server --search_spin_us).
  int search_spin_us = 200;
  // RemoteTierOptions::reply_poll: how long the RemoteTier polls for each reply before it sleeps.
  int reply_poll_us = 0;
  // The RemoteTier's region has room for the queries, so the node reads them there (proto
  // RetrieveRequest.queries_in_region); false: they travel in the request.
  bool queries_in_region = true;
  // "process": a kvrecall-server child (filled over UCX ingest, stopped at the end); "inprocess":
  // the server's Node and gRPC service in this process (filled directly).
  std::string server = "process";
  // The kvrecall-server to start; empty: the one beside this program.
  std::string server_binary;
};

// Flags: --name=value for every field above. INVALID_ARGUMENT for unknown flags or bad values.
absl::StatusOr<nlohmann::json> RunRpcBench(const std::vector<std::string>& args);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_RPC_BENCH_H_
