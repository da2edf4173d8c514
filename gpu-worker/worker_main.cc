// kvrecall-worker: the decode worker.
//
//   kvrecall-worker make-model --preset=tiny --out=DIR
//       writes a random-weight Llama-architecture model (config.json + model.safetensors).
//   kvrecall-worker generate --model=DIR --tier=HOST:PORT|local --prompt-file=F --prompt-tokens=8192
//       --max-new-tokens=32 --budget=256 [--compare-dense] [--json=OUT]
//       prefills the prompt, pushes its KV to the tier, decodes greedily with sparse retrieval
//       attention and prints a summary (tokens/s, bytes streamed per token, agreement with dense)
//       and the continuation.
//   kvrecall-worker bench [--quick] [--json=OUT|-] [--contexts=32768,98304] [--budgets=1024,2048]
//       decode throughput of the GPU-resident engine, dense vs kvrecall, on the Llama-3-8B shape
//       with random weights and synthetic prompts (engine/decode_bench.h); exit code 77 when
//       there is no usable GPU (or the build has no CUDA).
//
// Tokenization: when the model directory has a tokenizer.json (Hugging Face byte-level BPE,
// gpu-worker/model/tokenizer.h), the prompt is encoded with it, with the special tokens its
// post-processor / tokenizer_config.json adds (Llama-3's <|begin_of_text|>), and the continuation
// is printed decoded. Without one, prompts are raw bytes (token id = byte value), which every model
// with vocab_size >= 256 accepts, and the continuation is printed as bytes.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/cluster_tier.h"
#include "client/tier.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/units.h"
#include "gpu-worker/backends/backend.h"
#include "gpu-worker/engine/decode_bench.h"
#include "gpu-worker/engine/engine.h"
#include "gpu-worker/engine/gpu_generate.h"
#include "gpu-worker/engine/qk_dumper.h"
#include "gpu-worker/model/make_model.h"
#include "gpu-worker/model/tokenizer.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, preset, "tiny", "make-model: preset name (tiny, tiny-qwen2, small)");
ABSL_FLAG(std::string, out, "", "make-model: output directory");
ABSL_FLAG(uint64_t, seed, 1, "make-model: weight seed");
ABSL_FLAG(std::string, model, "", "model directory (config.json + *.safetensors)");
ABSL_FLAG(std::string, model_id, "", "model id registered with the tier (default: directory name)");
ABSL_FLAG(std::string, backend, "cpu", "model backend");
ABSL_FLAG(std::string, engine, "host",
          "generate's decode engine: host (activations on the host, the --backend model) or gpu "
          "(the GPU-resident engine: KV cache, attention and activations on the device; needs a "
          "CUDA build and a GPU)");
ABSL_FLAG(int, tensor_parallel, 1,
          "--engine=gpu: GPUs the model is split over by heads (each retrieving its own kv-heads "
          "through a tier connection of its own)");
ABSL_FLAG(std::string, tp_collective, "nccl",
          "--tensor_parallel > 1: all-reduces through nccl, or host (host memory; ranks may "
          "share a GPU)");
ABSL_FLAG(std::string, tier, "local",
          "tier: 'local' (in-process node), host:port of a kvrecall-server, a comma-separated list of "
          "them, or dns:///name:port (every address of name, re-resolved); lists and dns route each "
          "sequence by rendezvous hashing of its prompt prefix (client/cluster_tier.h)");
ABSL_FLAG(int, replication, 1, "tier nodes that hold each sequence (with a list or dns:/// --tier)");
ABSL_FLAG(std::string, transport, "ucx", "row transport to a remote tier: ucx or grpc (FetchKV fallback)");
ABSL_FLAG(std::string, ucx_tls, "", "UCX transports (UCX_TLS syntax); empty = UCX default");
ABSL_FLAG(std::string, tenant, "default", "tenant name");
ABSL_FLAG(std::string, tier_tls_ca, "", "PEM CA bundle of the tier servers' certificates: reach them over TLS");
ABSL_FLAG(std::string, tier_tls_cert, "", "PEM client certificate, for tier servers that require one (mutual TLS)");
ABSL_FLAG(std::string, tier_tls_key, "", "private key of --tier-tls-cert");
ABSL_FLAG(std::string, tier_tls_server_name, "",
          "name to check in the tier servers' certificates (default: the host dialled)");
ABSL_FLAG(std::string, tier_token_file, "",
          "file holding the tenant's bearer token, for tier servers run with --tenant-tokens");
ABSL_FLAG(std::string, prompt, "",
          "prompt text; encoded with the model directory's tokenizer.json when it has one, else as raw bytes");
ABSL_FLAG(std::string, prompt_file, "", "file whose text is the prompt (encoded as --prompt is)");
ABSL_FLAG(int, prompt_tokens, 0,
          "repeat / cut the prompt to exactly this many tokens (0 = as is); a leading bos is kept once");
ABSL_FLAG(int, max_new_tokens, 32, "tokens to decode");
ABSL_FLAG(std::string, mode, "sparse", "sparse (retrieval attention through the tier) or dense");
ABSL_FLAG(std::string, method, "exact", "retrieval method: exact, ctkvr or cluster");
ABSL_FLAG(int, index_queries, 64, "ctkvr: prompt queries sent for the query centroids");
ABSL_FLAG(bool, gpu_ctkvr_lists, true,
          "ctkvr on --engine=gpu: make the centroids' inverted lists on the GPU during prefill "
          "and send them with the centroid queries (false: the tier makes them)");
ABSL_FLAG(int, ctkvr_centroids, 8,
          "ctkvr with --gpu_ctkvr_lists: centroids picked from the --index_queries queries (at "
          "most the tier's, 8)");
ABSL_FLAG(int, ctkvr_list_size, 2048,
          "ctkvr with --gpu_ctkvr_lists: tokens per centroid list (at most the tier's, 2048)");
ABSL_FLAG(int, budget, 1024, "recalled tokens per (sequence, sparse layer, kv-head)");
ABSL_FLAG(int, sink_tokens, 16, "attention sinks always attended");
ABSL_FLAG(int, window_tokens, 256, "recent tokens always attended");
ABSL_FLAG(int, dense_layers, 2, "leading layers that stay dense");
ABSL_FLAG(bool, lookahead, false,
          "issue every sparse layer's retrieval at the start of a step, from the previous step's queries");
ABSL_FLAG(int, lookahead_successors, 16,
          "with --lookahead, the tier also keeps the 2 tokens after each of the selection's best N (copying heads "
          "move one token on per step); 0 = off, at most the budget");
ABSL_FLAG(int, lookahead_calls, 4,
          "with --lookahead (and bench rows with lookahead), sparse layers whose Retrieve calls "
          "are in flight at "
          "once (CUDA engine)");
ABSL_FLAG(bool, delta_streaming, true, "the tier sends only rows not already in this worker's slot caches");
ABSL_FLAG(int, retrieve_deadline_ms, 60000,
          "deadline of each Retrieve; a layer whose Retrieve misses it is decoded on sinks + window + resident rows");
ABSL_FLAG(
    int, tier_reply_poll_us, 0,
    "how long each Retrieve polls for the tier's reply before it sleeps "
    "(RemoteTierOptions::reply_poll): "
    "spares a thread wake-up per call (~90 us on a virtualised host) but keeps a core busy; for "
    "workers whose tier nodes run on other hosts. 0: sleep at once");
ABSL_FLAG(bool, compare_dense, false, "also decode densely (teacher-forced on the same tokens) and compare logits");
ABSL_FLAG(int, threads, 0, "CPU threads (0 = every core)");
ABSL_FLAG(std::string, json, "", "write a JSON report here");
ABSL_FLAG(std::string, sequence_id, "", "sequence id on the tier (default: generated)");
ABSL_FLAG(std::string, dump_qk, "", "write the run's post-RoPE Q/K/V (prompt and decode) to this directory, in the "
          "format kvrecall-bench index reads (indexer/qk_dump.h)");

ABSL_FLAG(bool, quick, false, "bench: a tiny configuration that runs in seconds (the gpu smoke test)");
ABSL_FLAG(std::vector<std::string>, contexts, std::vector<std::string>({"32768", "98304"}),
          "bench: prompt lengths");
ABSL_FLAG(std::vector<std::string>, budgets, std::vector<std::string>({"1024", "2048"}), "bench: kvrecall budgets");
ABSL_FLAG(std::string, bench_method, "ctkvr", "bench: retrieval method of the kvrecall rows");
ABSL_FLAG(std::string, bench_lookahead, "off", "bench: kvrecall rows with lookahead off, on or both");
ABSL_FLAG(std::vector<std::string>, bench_tokens, std::vector<std::string>({"greedy"}),
          "bench: decode inputs of the kvrecall rows, greedy and/or repeat (engine/decode_bench.h)");
ABSL_FLAG(std::string, bench_tier, "local",
          "bench: the kvrecall rows' tier: local (in-process) or remote (a server in this process on "
          "127.0.0.1, reached over gRPC + UCX with --ucx_tls, default posix,sysv,cma,self)");
ABSL_FLAG(
    bool, bench_row_addresses, true,
    "bench: with --bench_tier=local, the GPU gathers recalled rows from the tier's page-locked "
    "arena instead of the node copying them into the recall buffer");
ABSL_FLAG(int, bench_steps, 8, "bench: timed decode steps per row (after 2 warm-up steps)");
ABSL_FLAG(int, max_batch, 64, "bench: the largest batch of any row");
ABSL_FLAG(double, host_memory_fraction, 0.7, "bench: share of MemAvailable the tier may use");
ABSL_FLAG(bool, bench_dense, true, "bench: run the dense rows");
ABSL_FLAG(bool, bench_sparse, true, "bench: run the kvrecall rows");
ABSL_FLAG(std::string, bench_prompts, "private",
          "bench: the kvrecall rows' prompts: private (each sequence its own; host memory bounds the "
          "batch) or shared (one document stored once in the tier plus --bench_question_tokens of "
          "each sequence's own; GPU memory bounds the batch)");
ABSL_FLAG(int, bench_prefill_chunk, 0,
          "bench: > 0 prefills the dense rows' prompts (random tokens) on the GPU in chunks of this "
          "many tokens and reports the prefill time; 0 = synthetic K/V");
ABSL_FLAG(int, bench_question_tokens, 64, "bench: each sequence's own prompt tokens with --bench_prompts=shared");
ABSL_FLAG(double, ctkvr_min_similarity, -1,
          "bench: ctkvr's novel-query threshold in the in-process tier node (0 = CTKVR as published; "
          "negative = the node's default, 0.5)");

namespace kvrecall::worker {
namespace {

absl::StatusOr<std::vector<int>> IntList(const std::vector<std::string>& v, absl::string_view flag) {
  std::vector<int> out;
  for (const std::string& s : v) {
    int x = 0;
    if (!absl::SimpleAtoi(s, &x) || x < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", s, "' is not a positive integer"));
    }
    out.push_back(x);
  }
  return out;
}

absl::Status Bench() {
  DecodeBenchOptions o;
  o.quick = absl::GetFlag(FLAGS_quick);
  ASSIGN_OR_RETURN(o.contexts, IntList(absl::GetFlag(FLAGS_contexts), "contexts"));
  ASSIGN_OR_RETURN(o.budgets, IntList(absl::GetFlag(FLAGS_budgets), "budgets"));
  o.method = absl::GetFlag(FLAGS_bench_method);
  o.dense_layers = absl::GetFlag(FLAGS_dense_layers);
  o.sink_tokens = absl::GetFlag(FLAGS_sink_tokens);
  o.window_tokens = absl::GetFlag(FLAGS_window_tokens);
  o.index_queries = absl::GetFlag(FLAGS_index_queries);
  o.steps = absl::GetFlag(FLAGS_bench_steps);
  o.max_batch = absl::GetFlag(FLAGS_max_batch);
  if (const std::string m = absl::GetFlag(FLAGS_bench_lookahead); m == "both") {
    o.lookahead = {false, true};
  } else if (m == "on" || m == "off") {
    o.lookahead = {m == "on"};
  } else {
    return absl::InvalidArgumentError("--bench_lookahead is off, on or both");
  }
  o.lookahead_calls = absl::GetFlag(FLAGS_lookahead_calls);
  o.tokens = absl::GetFlag(FLAGS_bench_tokens);
  o.tier = absl::GetFlag(FLAGS_bench_tier);
  o.row_addresses = absl::GetFlag(FLAGS_bench_row_addresses);
  if (!absl::GetFlag(FLAGS_ucx_tls).empty()) o.ucx_tls = absl::GetFlag(FLAGS_ucx_tls);
  o.host_memory_fraction = absl::GetFlag(FLAGS_host_memory_fraction);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.dense = absl::GetFlag(FLAGS_bench_dense);
  o.sparse = absl::GetFlag(FLAGS_bench_sparse);
  o.prompts = absl::GetFlag(FLAGS_bench_prompts);
  o.question_tokens = absl::GetFlag(FLAGS_bench_question_tokens);
  o.prefill_chunk = absl::GetFlag(FLAGS_bench_prefill_chunk);
  o.ctkvr_min_similarity = absl::GetFlag(FLAGS_ctkvr_min_similarity);
  nlohmann::json report;
  RETURN_IF_ERROR(RunDecodeBench(o, &report));
  const std::string path = absl::GetFlag(FLAGS_json);
  if (path == "-") {
    std::cout << report.dump(2) << "\n";
    return absl::OkStatus();
  }
  if (!path.empty()) std::ofstream(path) << report.dump(2) << "\n";
  std::cout << absl::StrFormat("%-8s %-6s %-7s %-6s %-10s %6s %10s %9s %9s %9s %9s %12s %8s\n", "context", "method",
                               "budget", "tokens", "lookahead", "batch", "tokens/s", "step ms", "gpu ms", "retr. ms",
                               "upload ms", "streamed/tok", "speedup");
  for (const auto& r : report["rows"]) {
    const auto& b = r["breakdown"];
    std::cout << absl::StrFormat(
        "%-8d %-6s %-7s %-6s %-10s %6d %10.1f %9.2f %9.2f %9.2f %9.2f %12.0f %8.2f\n", r["context"].get<int>(),
        r["method"].get<std::string>(), r["budget"].is_null() ? "-" : std::to_string(r["budget"].get<int>()),
        r.value("tokens", "-"), r.contains("lookahead") ? (r["lookahead"].get<bool>() ? "on" : "off") : "-",
        r["batch"].get<int>(), r["tokens_per_s"].get<double>(), r["step_ms"].get<double>(),
        b["gpu_ms"].get<double>(), b["retrieve_wait_ms"].get<double>(), b["upload_ms"].get<double>(),
        r["bytes_streamed_per_token"].get<double>(), r["speedup_vs_dense"].get<double>());
  }
  return absl::OkStatus();
}

absl::Status MakeModel() {
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) return absl::InvalidArgumentError("--out is required");
  ASSIGN_OR_RETURN(LlamaConfig config, PresetConfig(absl::GetFlag(FLAGS_preset)));
  RETURN_IF_ERROR(WriteRandomModel(out, config, absl::GetFlag(FLAGS_seed)));
  std::cout << "wrote " << absl::GetFlag(FLAGS_preset) << " model to " << out << " (" << config.num_layers
            << " layers, hidden " << config.hidden_size << ", " << config.num_heads << "/" << config.num_kv_heads
            << " heads, head_dim " << config.head_dim << ", vocab " << config.vocab_size << ")\n";
  return absl::OkStatus();
}

// The model directory's tokenizer.json, or nullptr when it has none (prompts are then raw bytes).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "tokenizer.json", ec)) return nullptr;
  return Tokenizer::Load(dir);
}

absl::StatusOr<std::vector<int32_t>> PromptTokens(int vocab, const Tokenizer* tokenizer) {
  std::string text = absl::GetFlag(FLAGS_prompt);
  if (const std::string f = absl::GetFlag(FLAGS_prompt_file); !f.empty()) {
    std::ifstream in(f, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read --prompt_file ", f));
    std::stringstream ss;
    ss << in.rdbuf();
    text = ss.str();
  }
  if (text.empty()) return absl::InvalidArgumentError("give --prompt or --prompt_file");
  const int want = absl::GetFlag(FLAGS_prompt_tokens);
  if (tokenizer != nullptr) {
    std::vector<int32_t> ids = tokenizer->Encode(text, /*add_special=*/true);
    const size_t lead = tokenizer->adds_bos() ? 1 : 0;
    if (ids.size() <= lead) return absl::InvalidArgumentError("the prompt encodes to no tokens");
    if (want > 0) {
      const std::vector<int32_t> body(ids.begin() + lead, ids.end());
      ids.resize(lead);
      while (ids.size() < static_cast<size_t>(want)) ids.push_back(body[(ids.size() - lead) % body.size()]);
      ids.resize(want);
    }
    for (int32_t id : ids) {
      if (id >= vocab) {
        return absl::FailedPreconditionError(
            absl::StrCat("tokenizer.json gives token id ", id, ", beyond the model's vocab_size ", vocab));
      }
    }
    return ids;
  }
  if (vocab < 256) return absl::FailedPreconditionError("byte-level prompts need vocab_size >= 256");
  std::vector<int32_t> tokens;
  const size_t n = want > 0 ? static_cast<size_t>(want) : text.size();
  for (size_t i = 0; i < n; ++i) tokens.push_back(static_cast<unsigned char>(text[i % text.size()]));
  return tokens;
}

int Argmax(const float* x, int n) { return static_cast<int>(std::max_element(x, x + n) - x); }

std::string Printable(const std::vector<int32_t>& tokens) {
  std::string s;
  for (int32_t t : tokens) s += (t >= 32 && t < 127) ? static_cast<char>(t) : (t == '\n' ? ' ' : '?');
  return s;
}

// The continuation as text: decoded with the tokenizer (ids it has no token for are left out, with
// a warning), else as printable bytes.
std::string GeneratedText(const Tokenizer* tokenizer, const std::vector<int32_t>& ids) {
  if (tokenizer == nullptr) return Printable(ids);
  absl::StatusOr<std::string> text = tokenizer->Decode(ids, /*skip_special=*/false);
  if (text.ok()) return *text;
  KV_LOG(WARNING) << text.status() << "; ids without a token are left out of the text";
  std::vector<int32_t> known;
  for (int32_t id : ids) {
    if (id < tokenizer->vocab_size() && !tokenizer->IdToToken(id).empty()) known.push_back(id);
  }
  return tokenizer->Decode(known, false).value_or("");
}

absl::Status Generate() {
  const std::string dir = absl::GetFlag(FLAGS_model);
  if (dir.empty()) return absl::InvalidArgumentError("--model is required");
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, LoadTokenizer(dir));
  if (tokenizer != nullptr) {
    KV_LOG(INFO) << "tokenizer.json: " << tokenizer->vocab_size() << " tokens, bos " << tokenizer->bos_id()
                 << (tokenizer->adds_bos() ? " (added)" : "");
  }
  const int threads = absl::GetFlag(FLAGS_threads);
  const std::string engine_kind = absl::GetFlag(FLAGS_engine);
  if (engine_kind != "host" && engine_kind != "gpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--engine is host or gpu, not '", engine_kind, "'"));
  }
  const bool gpu = engine_kind == "gpu";
  const int world = absl::GetFlag(FLAGS_tensor_parallel);
  if (world < 1 || (world > 1 && !gpu)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tensor_parallel must be 1, or more with --engine=gpu; got ", world));
  }
  const absl::Time t_load = absl::Now();
  std::unique_ptr<ModelBackend> model;  // the host engine's; the GPU engine loads its own
  LlamaConfig cfg;
  if (gpu) {
    ASSIGN_OR_RETURN(cfg, LoadConfig(dir));
  } else {
    ASSIGN_OR_RETURN(model, CreateBackend(absl::GetFlag(FLAGS_backend), dir, threads));
    cfg = model->config();
    KV_LOG(INFO) << "loaded " << dir << " in " << absl::ToDoubleSeconds(absl::Now() - t_load)
                 << " s";
  }

  std::string model_id = absl::GetFlag(FLAGS_model_id);
  if (model_id.empty()) {
    std::string d = dir;
    while (!d.empty() && d.back() == '/') d.pop_back();
    model_id = d.substr(d.find_last_of('/') + 1);
  }
  const ModelSpec spec = SpecOf(cfg, model_id);

  const bool sparse = absl::GetFlag(FLAGS_mode) == "sparse";
  if (!sparse && absl::GetFlag(FLAGS_mode) != "dense") return absl::InvalidArgumentError("--mode is sparse or dense");
  EngineOptions eo;
  eo.sparse = sparse;
  eo.budget = absl::GetFlag(FLAGS_budget);
  eo.lookahead = absl::GetFlag(FLAGS_lookahead);
  eo.lookahead_successors = absl::GetFlag(FLAGS_lookahead_successors);
  eo.lookahead_calls = absl::GetFlag(FLAGS_lookahead_calls);
  if (eo.lookahead_successors < 0) return absl::InvalidArgumentError("--lookahead_successors must be >= 0");
  eo.delta_streaming = absl::GetFlag(FLAGS_delta_streaming);
  eo.sink_tokens = absl::GetFlag(FLAGS_sink_tokens);
  eo.window_tokens = absl::GetFlag(FLAGS_window_tokens);
  eo.dense_layers = absl::GetFlag(FLAGS_dense_layers);
  eo.num_threads = threads;
  eo.index_queries = absl::GetFlag(FLAGS_index_queries);
  eo.gpu_ctkvr_lists = absl::GetFlag(FLAGS_gpu_ctkvr_lists);
  eo.ctkvr_centroids = absl::GetFlag(FLAGS_ctkvr_centroids);
  eo.ctkvr_list_size = absl::GetFlag(FLAGS_ctkvr_list_size);
  if (const std::string m = absl::GetFlag(FLAGS_method); m == "exact") {
    eo.method = client::Method::kExact;
  } else if (m == "ctkvr") {
    eo.method = client::Method::kCtkvr;
  } else if (m == "cluster") {
    eo.method = client::Method::kCluster;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--method must be exact, ctkvr or cluster, not '", m, "'"));
  }
  std::string id = absl::GetFlag(FLAGS_sequence_id);
  if (id.empty()) id = absl::StrCat("gen-", absl::ToUnixMicros(absl::Now()));
  std::unique_ptr<QkDumper> dumper;
  if (gpu && !absl::GetFlag(FLAGS_dump_qk).empty()) {
    return absl::InvalidArgumentError("--dump_qk needs --engine=host");
  }
  if (!absl::GetFlag(FLAGS_dump_qk).empty()) {
    dumper = std::make_unique<QkDumper>(cfg, id);
    eo.observer = dumper.get();
  }

  ASSIGN_OR_RETURN(std::vector<int32_t> prompt, PromptTokens(cfg.vocab_size, tokenizer.get()));
  const int steps = absl::GetFlag(FLAGS_max_new_tokens);
  // Declared before the tier: the tier's recall buffer is pinned through it.
  std::unique_ptr<GpuGenerator> gpu_generator;
  if (gpu) {
    ASSIGN_OR_RETURN(gpu_generator,
                     CreateGpuGenerator(dir, spec, eo, static_cast<int>(prompt.size()) + steps + 1,
                                        {world, absl::GetFlag(FLAGS_tp_collective)}));
    KV_LOG(INFO) << "loaded " << dir << " on the GPU in "
                 << absl::ToDoubleSeconds(absl::Now() - t_load) << " s";
  }
  // One tier connection per GPU (rank r's is tiers[r]); `tier` is rank 0's.
  std::vector<std::unique_ptr<client::Tier>> tiers;
  for (int rank = 0; sparse && rank < world; ++rank) {
    std::unique_ptr<client::Tier> tier;
    client::TierOptions to;
    if (gpu_generator != nullptr) gpu_generator->PinRecallBuffer(&to);
    to.tenant = absl::GetFlag(FLAGS_tenant);
    const int64_t pair = 2 * static_cast<int64_t>(spec.row_bytes());
    // One staging area of budget rows per kv-head, and one area per sparse layer with lookahead.
    to.staging_areas = eo.lookahead ? std::max(1, cfg.num_layers - eo.dense_layers) : 1;
    // With room for the step's queries: the node reads them from the region.
    to.recall_buffer_bytes =
        std::max<int64_t>(
            int64_t{1} << 20,
            client::RecallBufferBytes(cfg.num_kv_heads, eo.budget, static_cast<size_t>(pair), 1,
                                      int64_t{spec.group_size()} * spec.head_dim)) *
        to.staging_areas;
    to.retrieve_deadline = absl::Milliseconds(absl::GetFlag(FLAGS_retrieve_deadline_ms));
    if (world > 1) {  // the ranks are separate workers to the tier (slot mirrors, staging)
      to.worker_id = ShardName(client::internal::DefaultWorkerId(), rank, world);
    }
    const std::string target = absl::GetFlag(FLAGS_tier);
    const std::vector<std::string> peers = client::SplitPeers(target);
    client::RemoteTierOptions ro;
    ro.target = target;
    ro.transport = absl::GetFlag(FLAGS_transport);
    ro.ucx_tls = absl::GetFlag(FLAGS_ucx_tls);
    if (absl::GetFlag(FLAGS_tier_reply_poll_us) < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--tier-reply-poll-us must be >= 0, not ",
                                                     absl::GetFlag(FLAGS_tier_reply_poll_us)));
    }
    ro.reply_poll = absl::Microseconds(absl::GetFlag(FLAGS_tier_reply_poll_us));
    ro.tls = {absl::GetFlag(FLAGS_tier_tls_ca), absl::GetFlag(FLAGS_tier_tls_cert), absl::GetFlag(FLAGS_tier_tls_key),
              absl::GetFlag(FLAGS_tier_tls_server_name), absl::GetFlag(FLAGS_tier_token_file)};
    if (target == "local") {
      ASSIGN_OR_RETURN(tier, client::CreateLocalTier(kvstore::NodeOptions{int64_t{8} << 30, 64, threads}, to));
    } else if (peers.size() > 1 || target.rfind(client::kDnsPrefix, 0) == 0 || absl::GetFlag(FLAGS_replication) > 1) {
      client::ClusterTierOptions co;
      co.peers = peers;
      co.replication = absl::GetFlag(FLAGS_replication);
      co.remote = ro;  // its target is ignored: every node gets its own
      ASSIGN_OR_RETURN(tier, client::CreateClusterTier(co, to));
    } else {
      ASSIGN_OR_RETURN(tier, client::CreateRemoteTier(ro, to));
    }
    // Ranks register their shards' models themselves (TensorParallelEngine).
    if (world == 1) RETURN_IF_ERROR(tier->RegisterModel(spec));
    KV_LOG(INFO) << "tier" << (world > 1 ? absl::StrCat(" of rank ", rank) : "") << ": "
                 << tier->Describe();
    tiers.push_back(std::move(tier));
  }
  client::Tier* const tier = tiers.empty() ? nullptr : tiers[0].get();
  std::vector<client::Tier*> rank_tiers(static_cast<size_t>(world), nullptr);
  for (size_t r = 0; r < tiers.size(); ++r) rank_tiers[r] = tiers[r].get();
  const bool compare = absl::GetFlag(FLAGS_compare_dense) && sparse;
  const int V = cfg.vocab_size;
  GenerateRun run;
  std::unique_ptr<Engine> engine;
  if (gpu) {
    KV_LOG(INFO) << "prefill of " << prompt.size() << " tokens and " << steps
                 << " decode steps on the GPU ...";
    ASSIGN_OR_RETURN(run, gpu_generator->Run(rank_tiers, id, prompt, steps, compare));
  } else {
    ASSIGN_OR_RETURN(engine, Engine::Create(model.get(), tier, spec, eo));
    std::unique_ptr<Engine> dense;
    if (compare) {
      EngineOptions d = eo;
      d.sparse = false;
      d.observer = nullptr;
      ASSIGN_OR_RETURN(dense, Engine::Create(model.get(), nullptr, spec, d));
    }
    std::vector<float> logits, dense_logits;
    KV_LOG(INFO) << "prefill of " << prompt.size() << " tokens ...";
    const absl::Time t_prefill = absl::Now();
    ASSIGN_OR_RETURN(PromptKV kv, engine->Prefill(prompt, &logits));
    run.prefill_seconds = absl::ToDoubleSeconds(absl::Now() - t_prefill);
    const absl::Time t_push = absl::Now();
    RETURN_IF_ERROR(engine->AddSequence(id, kv));
    run.push_seconds = absl::ToDoubleSeconds(absl::Now() - t_push);
    run.tier_appended_before_decode = tier ? tier->counters().bytes_appended : 0;
    if (compare) {
      RETURN_IF_ERROR(dense->AddSequence(id, kv));
      dense_logits = logits;
    }
    KV_LOG(INFO) << "prefill " << run.prefill_seconds << " s, pushed to tier in "
                 << run.push_seconds << " s; decoding ...";
    int32_t next = Argmax(logits.data(), V);
    for (int s = 0; s < steps; ++s) {
      // Compare the distributions that chose this token (prompt logits first, then each step's).
      if (compare) run.CompareWithDense(logits, dense_logits, next);
      run.generated.push_back(next);
      const absl::Time t0 = absl::Now();
      RETURN_IF_ERROR(engine->Step({&id, 1}, {&next, 1}, &logits));
      run.decode_seconds += absl::ToDoubleSeconds(absl::Now() - t0);
      if (compare) {
        const absl::Time t1 = absl::Now();
        RETURN_IF_ERROR(dense->Step({&id, 1}, {&next, 1}, &dense_logits));
        run.dense_seconds += absl::ToDoubleSeconds(absl::Now() - t1);
      }
      next = Argmax(logits.data(), V);
    }
    run.counters = engine->counters();
  }
  const std::vector<int32_t>& generated = run.generated;
  const int top1_match = run.top1_match, compared = run.compared;
  const double max_dlogit = run.max_abs_dlogit, decode_s = run.decode_seconds,
               dense_s = run.dense_seconds;
  const double prefill_s = run.prefill_seconds, push_s = run.push_seconds;
  const std::vector<double>& step_dlogit = run.step_max_abs_dlogit;
  const EngineCounters& c = run.counters;
  client::TierCounters tc;
  for (const auto& t : tiers) tc += t->counters();
  const double tok_s = decode_s > 0 ? steps / decode_s : 0;
  const double streamed_per_token = steps ? static_cast<double>(tc.bytes_received) / steps : 0;
  const double appended_per_token =
      steps ? static_cast<double>(tc.bytes_appended - run.tier_appended_before_decode) / steps : 0;

  std::cout
      << "\n=== kvrecall generate ===\n"
      << absl::StrFormat("model          %s (%d layers, %d/%d heads, head_dim %d, kv %s)\n",
                         spec.model_id, spec.num_layers, spec.num_q_heads, spec.num_kv_heads,
                         spec.head_dim, DTypeName(spec.kv_dtype))
      << absl::StrFormat("tier           %s%s\n", tier ? tier->Describe() : "none (dense)",
                         world > 1 ? absl::StrCat(", one connection for each of ", world,
                                                  " tensor-parallel GPUs")
                                   : "")
      << absl::StrFormat("prompt         %d tokens, prefill %.2f s (%.0f tok/s), KV push %.2f s\n",
                         prompt.size(), prefill_s, prompt.size() / prefill_s, push_s)
      << absl::StrFormat(
             "attention      %s: %d dense layers, sinks %d, window %d, budget %d, method %s "
             "(index built in %.3f s)\n",
             sparse ? "sparse" : "dense", eo.dense_layers, eo.sink_tokens, eo.window_tokens,
             eo.budget, absl::GetFlag(FLAGS_method), c.index_build_seconds)
      << absl::StrFormat("decode         %d tokens in %.3f s = %.1f tokens/s\n", steps, decode_s,
                         tok_s)
      << absl::StrFormat(
             "retrieval      %d calls, %.3f s total; %s streamed per token (%d rows/token); "
             "%s appended per token\n",
             c.retrieve_calls, c.retrieve_seconds,
             FormatBytes(static_cast<int64_t>(streamed_per_token)),
             steps ? c.streamed_rows / steps : 0,
             FormatBytes(static_cast<int64_t>(appended_per_token)))
      << absl::StrFormat(
             "slot caches    %d of %d selected rows resident already (%.1f%%); delta streaming %s, "
             "lookahead %s; %d layer-steps fell back (tier missed its deadline)\n",
             c.recalled_rows - c.streamed_rows, c.recalled_rows,
             c.recalled_rows ? 100.0 * (c.recalled_rows - c.streamed_rows) / c.recalled_rows : 0.0,
             eo.delta_streaming ? "on" : "off", eo.lookahead ? "on" : "off", c.fallback_layers);
  if (compare) {
    std::cout << absl::StrFormat("vs dense       top-1 match %d/%d = %.1f%%, max |dlogit| %.3g; dense decode in "
                                 "this process %.1f tokens/s (all KV local)\n",
                                 top1_match, compared, 100.0 * top1_match / std::max(1, compared), max_dlogit,
                                 dense_s > 0 ? steps / dense_s : 0.0);
  }
  const auto* cluster = dynamic_cast<const client::ClusterTier*>(tier);
  const client::ClusterCounters cc = cluster != nullptr ? cluster->cluster_counters() : client::ClusterCounters{};
  if (cluster != nullptr) {
    std::cout << absl::StrFormat("tier nodes     %d failovers, %d replicas replaced, %d refilled (%d tokens), "
                                 "%d redirects\n",
                                 cc.failovers, cc.substitutions, cc.refills, cc.refilled_tokens, cc.redirects);
  }
  const std::string generated_text = GeneratedText(tokenizer.get(), generated);
  std::cout << "generated      \"" << generated_text << "\"\n";

  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    nlohmann::json j;
    j["model_id"] = spec.model_id;
    j["tier"] = tier ? tier->Describe() : "none";
    j["tensor_parallel"] = world;
    j["mode"] = sparse ? "sparse" : "dense";
    j["prompt_tokens"] = prompt.size();
    j["prefill_seconds"] = prefill_s;
    j["push_seconds"] = push_s;
    j["decode_tokens"] = steps;
    j["decode_seconds"] = decode_s;
    j["tokens_per_second"] = tok_s;
    j["retrieve_calls"] = c.retrieve_calls;
    j["retrieve_seconds"] = c.retrieve_seconds;
    j["recalled_rows"] = c.recalled_rows;
    j["streamed_rows"] = c.streamed_rows;
    j["fallback_layers"] = c.fallback_layers;
    j["bytes_streamed_per_token"] = streamed_per_token;
    j["bytes_appended_per_token"] = appended_per_token;
    j["options"] = {{"budget", eo.budget},
                    {"sink_tokens", eo.sink_tokens},
                    {"window_tokens", eo.window_tokens},
                    {"dense_layers", eo.dense_layers},
                    {"method", absl::GetFlag(FLAGS_method)},
                    {"index_queries", eo.index_queries},
                    {"gpu_ctkvr_lists", eo.gpu_ctkvr_lists},
                    {"ctkvr_centroids", eo.ctkvr_centroids},
                    {"ctkvr_list_size", eo.ctkvr_list_size},
                    {"lookahead", eo.lookahead},
                    {"delta_streaming", eo.delta_streaming}};
    j["index_build_seconds"] = c.index_build_seconds;
    j["generated"] = generated;
    j["tokenizer"] = tokenizer != nullptr ? "tokenizer.json" : "bytes";
    j["generated_text"] = generated_text;
    if (cluster != nullptr) {
      j["tier_cluster"] = {{"failovers", cc.failovers}, {"substitutions", cc.substitutions},
                           {"refills", cc.refills}, {"redirects", cc.redirects}};
    }
    if (compare) {
      j["compare_dense"] = {{"top1_match", top1_match}, {"compared", compared},
                            {"top1_match_rate", static_cast<double>(top1_match) / std::max(1, compared)},
                            {"max_abs_dlogit", max_dlogit}, {"step_max_abs_dlogit", step_dlogit},
                            {"dense_tokens_per_second", dense_s > 0 ? steps / dense_s : 0.0}};
    }
    std::ofstream(path) << j.dump(2) << "\n";
  }
  if (dumper != nullptr) {
    RETURN_IF_ERROR(dumper->Write(absl::GetFlag(FLAGS_dump_qk), spec.model_id, static_cast<int64_t>(prompt.size()),
                                  spec.kv_dtype));
    std::cout << "Q/K dump       " << dumper->tokens() << " tokens x " << cfg.num_layers << " layers -> "
              << absl::GetFlag(FLAGS_dump_qk) << "\n";
  }
  if (tier && engine != nullptr)
    RETURN_IF_ERROR(engine->RemoveSequence(id));  // GpuGenerator::Run removed its own
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvrecall::worker

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvrecall-worker <command> [flags]\n"
      "  make-model  --preset=tiny --out=DIR        write a random-weight Llama model\n"
      "  generate    --model=DIR --tier=local|HOST:PORT --prompt_file=F|--prompt=TEXT "
      "[--prompt_tokens=N]\n"
      "              [--max_new_tokens=32] [--budget=1024] [--compare_dense] [--json=OUT]\n"
      "              [--engine=gpu [--tensor_parallel=N [--tp_collective=nccl|host]]]\n"
      "              (text is tokenized with DIR/tokenizer.json when present, else as raw bytes)\n"
      "  bench       [--quick] [--json=OUT|-] [--contexts=32768,98304] [--budgets=1024,2048]\n"
      "              [--bench_lookahead=off|on|both] [--bench_tokens=greedy,repeat] "
      "[--bench_tier=local|remote] [--bench_row_addresses]\n"
      "              [--bench_prompts=private|shared] [--ctkvr_min_similarity=X] "
      "[--bench_prefill_chunk=N]\n"
      "              GPU decode throughput, dense vs kvrecall, Llama-3-8B shape, synthetic "
      "prompts");
  std::vector<std::string> args = kvrecall::ParseFlags(argc, argv);
  if (args.size() != 2) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  const std::string cmd = args[1];
  absl::Status s;
  if (cmd == "make-model") {
    s = kvrecall::worker::MakeModel();
  } else if (cmd == "generate") {
    s = kvrecall::worker::Generate();
  } else if (cmd == "bench") {
    s = kvrecall::worker::Bench();
    if (s.code() == absl::StatusCode::kFailedPrecondition) {  // no GPU: ctest reports a skip
      std::cerr << "kvrecall-worker bench: " << s << "\n";
      return 77;
    }
  } else {
    std::cerr << "unknown command '" << cmd << "'\n" << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  if (!s.ok()) {
    std::cerr << "kvrecall-worker " << cmd << ": " << s << "\n";
    return 1;
  }
  return 0;
}
