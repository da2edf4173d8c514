// Bulk ingest over UCX vs the AppendKV stream, side by side in one run.
//
// One kvstore::Node with a UCX transport behind a gRPC service on 127.0.0.1 (in this process) and
// two RemoteTiers to it: one appends by AllocateBlocks + one-sided puts into the node's arena +
// CommitBlocks (RemoteTierOptions::ingest "auto"), the other by the AppendKV gRPC stream
// ("grpc"). They alternate appends of the same prompt KV (a fresh sequence each time, dropped
// afterwards), so machine noise hits both alike. Each append is a whole prompt: `tokens` tokens of
// every layer of a Llama-3-8B-shaped model by default.
//
// JSON: ucx_gbps, grpc_gbps, ucx_vs_grpc (= ucx_gbps / grpc_gbps), ucx_ms_p50, grpc_ms_p50,
// bytes_per_append, and the options. GB/s counts K and V bytes acknowledged per second of append
// latency (client side, AllocateBlocks to CommitBlocks' answer).
#ifndef KVRECALL_BENCH_INGEST_BENCH_H_
#define KVRECALL_BENCH_INGEST_BENCH_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvrecall::bench {

struct IngestBenchOptions {
  int layers = 32;
  int kv_heads = 8;
  int head_dim = 128;
  int tokens = 2048;      // per append (one prompt)
  int iterations = 5;     // appends per path
  int warmup = 1;
  std::string ucx_tls;    // UCX_TLS for both ends; empty = UCX's choice
  bool durable = false;   // node with --durable (needs data_dir)
  std::string data_dir;
  uint64_t seed = 1;
};

// Flags: --name=value for every field above. INVALID_ARGUMENT for unknown flags or bad values.
absl::StatusOr<nlohmann::json> RunIngestBench(const std::vector<std::string>& args);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_INGEST_BENCH_H_
