// kvrecall-bench accuracy: task accuracy of every retrieval method against dense attention on the
// reference model (models/recall-tiny, issue 7), through the real decode engine and a tier.
//
// Samples are built in token space exactly as tools/reference-model/tasks.py builds them (the
// formats the model was trained on), over held-out natural text (models/recall-tiny/haystack.txt):
//   passkey   " The pass key is 48213. Remember it. 48213 is the pass key." at `depth`, then
//             "\nWhat is the pass key? The pass key is" -> " 48213"
//   multikey  2..8 needles " The special magic number for qzv is 48213." (the asked one at
//             `depth`), then "\nWhat is the special magic number for qzv? The special magic
//             number for qzv is" -> " 48213"
//   ar        dense associative recall " qzv=4812;" pairs and " ? qzv=4812;" queries; the last
//             query asks for the pair nearest `depth`: " ? qzv" -> "=4812"
// Each sample is `context` tokens (bos .. answer .. '.' or eos), like eval.py's.
//
// Per sample the prompt is prefilled ONCE (dense, as the worker always prefills); then every
// configuration decodes the answer greedily from that PromptKV. The answer's first token (the
// space before the digits, or ar's '=') comes from the prefill's logits, as in serving; every
// digit comes from a decode step, sparse where the configuration is. Score: exact match of the
// greedy answer tokens (no teacher forcing). Configurations: dense (all KV
// local, no tier), and each method x budget x lookahead with layers >= dense_layers retrieved
// from a LocalTier. The prompt is pushed to the tier once per sample (an anchor sequence); every
// run is its own tier sequence whose full blocks are shared with the anchor (kvstore prefix
// sharing), so a run pushes only the last partial block and, for ctkvr / cluster, builds its
// index (BuildIndex is per sequence). `merged` is not a Retrieve method (kvstore::Node refuses
// it): the bench rejects it rather than report numbers it cannot measure.
//
// JSON: {"rows": [{task, context, depth, method, budget, lookahead, accuracy, dense_accuracy,
// samples, ctkvr_searches, ctkvr_novel_fraction (the share of ctkvr searches that found their
// query novel and scored exactly)}], "options": ..., "timing": ..., "summary": ...}. --markdown=FILE writes tables,
// --plot=FILE.png accuracy vs budget per method (bench/accuracy_bench.cc draws it, no libraries).
// Progress goes to stderr.
#ifndef KVRECALL_BENCH_ACCURACY_BENCH_H_
#define KVRECALL_BENCH_ACCURACY_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvrecall::bench {

struct AccuracyBenchOptions {
  std::string model = "models/recall-tiny";  // config.json, safetensors, tokenizer.json
  std::string haystack = "models/recall-tiny/haystack.txt";  // documents separated by U+001E
  std::string backend = "cpu";  // model backend (gpu-worker/backends): cpu, or cuda in CUDA builds
  std::vector<std::string> tasks = {"passkey", "multikey"};  // passkey, multikey, ar
  std::vector<int> contexts = {4096, 8192, 16384, 32768};
  std::vector<double> depths = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9};
  int samples = 4;  // per (task, context, depth)
  std::vector<std::string> methods = {"exact", "ctkvr", "cluster"};
  std::vector<int> budgets = {64, 128, 256, 512, 1024, 2048};
  std::string lookahead = "both";  // off | on | both
  int threads = 0;                 // 0 = every core
  uint64_t seed = 777;
  int sinks = 16;
  int window = 256;
  int dense_layers = 2;
  int index_queries = 64;
  int ctkvr_probe = 0;       // ctkvr centroids probed per search (0 = the node's default)
  int ctkvr_list_size = 0;   // ctkvr inverted-list length (0 = the node's default)
  int ctkvr_centroids = 0;   // ctkvr query centroids C (0 = the node's default)
  // ctkvr novel-query threshold (CtkvrOptions::min_similarity; 0 = off, CTKVR as published;
  // negative = the node's default)
  double ctkvr_min_similarity = -1;
  // ctkvr neighbours (CtkvrOptions::neighbour_radius) and added centroids (max_added); negative =
  // the node's default.
  int ctkvr_neighbour_radius = -1;
  int ctkvr_max_added = -1;
  std::string markdown;  // write markdown tables here
  std::string plot;      // write a PNG plot here
  bool progress = true;  // progress lines on stderr
};

// Parses --name=value flags (the fields above; lists comma-separated). INVALID_ARGUMENT for
// unknown flags, bad values, or `merged` (not a decode-path method).
absl::StatusOr<AccuracyBenchOptions> ParseAccuracyBenchFlags(const std::vector<std::string>& args);

// Runs the grid. NOT_FOUND when the model or haystack is missing.
absl::StatusOr<nlohmann::json> RunAccuracyBench(const AccuracyBenchOptions& options);
absl::StatusOr<nlohmann::json> RunAccuracyBench(const std::vector<std::string>& args);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_ACCURACY_BENCH_H_
