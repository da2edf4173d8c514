// `kvrecall-worker bench`: decode throughput of the GPU-resident engine (cuda_engine.h), dense
// vs kvrecall, on a model shape with random bf16 weights generated on the device (no checkpoint).
//
// Per context: a dense row (every layer's whole KV on the GPU) and one kvrecall row per budget
// (layers [0, dense_layers) dense, the rest sinks + window + the tier's recalled rows; the tier
// in this process behind a LocalTier or a RemoteTier, DecodeBenchOptions::tier), each at the
// largest batch that fits: GPU memory for the device
// side (CudaEngine::DeviceBytesPerSequence), host memory for the tier (it holds every layer's
// K/V of every sequence).
//
// The prompt is synthetic ("prompt": "synthetic" in the JSON) unless prefill_chunk > 0, which
// prefills the dense rows' prompts (random tokens) on the GPU (CudaEngine::PrefillSequence) and
// times it. Otherwise every sequence's prompt K/V are deterministic random rows (SyntheticKv), written straight
// into the device caches and pushed to the tier (the same rows), and the tier's ctkvr index is
// built from random prompt queries. Decoding then runs the real step: every token through every
// layer, the tier's real search and row streaming for every sparse layer, the new rows appended
// to the tier. Budgets of one context reuse the tier's sequences (the window of the later rows
// starts from synthetic rows where the earlier row decoded; the timing does not depend on the
// values).
//
// Thread safety: not thread-safe (uses the current CUDA device).
#ifndef KVRECALL_GPU_WORKER_ENGINE_DECODE_BENCH_H_
#define KVRECALL_GPU_WORKER_ENGINE_DECODE_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"

namespace kvrecall::worker {

struct DecodeBenchOptions {
  // A small shape (4 layers, hidden 1024, 4K context, budget 256, 3 timed steps) that runs in
  // seconds: the smoke test of the gpu-labelled ctest.
  bool quick = false;
  std::vector<int> contexts = {32768, 98304};  // prompt tokens
  std::vector<int> budgets = {1024, 2048};
  std::string method = "ctkvr";  // exact, ctkvr or cluster
  int dense_layers = 2;
  int sink_tokens = 16;
  int window_tokens = 256;
  int index_queries = 64;  // random prompt queries per sparse layer for ctkvr's centroids
  int warmup_steps = 2;
  int steps = 8;       // timed decode steps per row
  int max_batch = 64;  // upper bound on every row's batch
  // EngineOptions::lookahead of the kvrecall rows: one row per mode and budget (the rows of a
  // context share the tier's sequences).
  std::vector<bool> lookahead = {false};
  int lookahead_calls = 4;  // EngineOptions::lookahead_calls
  // The decode input of each step: "greedy" feeds each sequence its own argmax (with random
  // weights the queries then jump from step to step, so nearly every selected row is new),
  // "repeat" feeds every step the same token (consecutive queries stay close, as real decoding's
  // do, and delta streaming sends few rows). One row per mode for every kvrecall configuration.
  std::vector<std::string> tokens = {"greedy"};
  double host_memory_fraction = 0.7;             // of MemAvailable, for the tier
  int64_t gpu_reserve_bytes = int64_t{3} << 30;  // device memory left free (cuBLAS, workspaces)
  // "local": a LocalTier in this process; "remote": a RemoteTier (gRPC + UCX with these
  // transports, "" = UCX's default) to a kvrecall server started inside this process on
  // 127.0.0.1 (bench/loopback_server.h), the same node behind the wire.
  std::string tier = "local";
  // With tier "local": the GPU gathers recalled rows from the tier's page-locked arena
  // (TierOptions::row_addresses) instead of the node copying them into the recall buffer.
  bool row_addresses = true;
  std::string ucx_tls = "posix,sysv,cma,self";
  int threads = 0;  // tier search threads (0 = every core)
  uint64_t seed = 1;
  bool dense = true;   // run the dense rows
  bool sparse = true;  // run the kvrecall rows
  // The kvrecall rows' prompts. "private": every sequence its own context-token prompt, so the
  // tier holds batch × every layer's K/V and host memory bounds the batch (on one host about
  // dense's batch). "shared": one document of context - question_tokens tokens that every
  // sequence shares (stored once in the tier by prefix matching, as sessions over one long
  // document are), then its own question_tokens tokens; each sequence still has its own ctkvr
  // index and is searched and streamed on its own, and the batch is bounded by GPU memory.
  // The dense rows keep private prompts (the engine's dense caches are per sequence).
  std::string prompts = "private";
  int question_tokens = 64;
  // ctkvr's novel-query threshold (CtkvrOptions::min_similarity) of the in-process tier node;
  // negative = the node's default. Random weights make every decode query unlike every prompt
  // centroid, so with the default each search is novel and scans the whole context; a trained
  // model's are novel for 12-25 % of searches (docs/benchmarks.md). 0 = CTKVR as published.
  double ctkvr_min_similarity = -1;
  // > 0: the dense rows' prompts are random tokens prefilled on the GPU
  // (CudaEngine::PrefillSequence in chunks of this many tokens; the row's "prompt" is
  // "prefilled", with prefill_seconds and prefill_tokens_per_s); 0: synthetic K/V rows.
  int prefill_chunk = 0;
};

// Runs the benchmark and fills *report (the JSON of issue 6: "rows" with model, context,
// method, budget, tier, batch, tokens_per_s, step_ms, bytes_streamed_per_token,
// gpu_bytes_per_sequence, speedup_vs_dense and the per-step breakdown). Progress goes to stderr.
// FAILED_PRECONDITION without a usable CUDA device (or in a build without CUDA).
absl::Status RunDecodeBench(const DecodeBenchOptions& options, nlohmann::json* report);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_ENGINE_DECODE_BENCH_H_
