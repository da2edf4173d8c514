#include "gpu-worker/engine/decode_bench.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "bench/loopback_server.h"
#include "client/tier.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/engine/cuda_engine.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/make_model.h"
#include "indexer/index.h"
#include "kvstore/node.h"

namespace kvrecall::worker {
namespace {

LlamaConfig BenchConfig(bool quick) {
  LlamaConfig c = *PresetConfig("tiny");  // Llama-3 RoPE scaling, theta 500000, untied lm_head
  if (quick) {
    c.num_layers = 4;
    c.hidden_size = 1024;
    c.intermediate_size = 2816;
    c.num_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.vocab_size = 32000;
  } else {  // Llama-3-8B
    c.num_layers = 32;
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.vocab_size = 128256;
  }
  return c;
}

int64_t MemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

void Progress(const std::string& what) {
  static const absl::Time start = absl::Now();
  std::cerr << absl::StrFormat("[bench %7.1f s] %s\n", absl::ToDoubleSeconds(absl::Now() - start),
                               what);
}

// Decodes warmup + steps greedy steps of every resident sequence and fills the row's timing.
absl::Status Decode(CudaEngine* engine, client::Tier* tier, const DecodeBenchOptions& o, int vocab,
                    bool repeat, const std::vector<std::string>& ids, nlohmann::json* row) {
  std::mt19937 rng(static_cast<uint32_t>(o.seed));
  std::vector<int32_t> tokens(ids.size()), next;
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % vocab);
  for (int s = 0; s < o.warmup_steps; ++s) {
    RETURN_IF_ERROR(engine->Step(ids, tokens, &next));
    if (!repeat) tokens = next;
  }
  const CudaEngineTimes t0 = engine->times();
  const EngineCounters c0 = engine->counters();
  const client::TierCounters k0 = tier != nullptr ? tier->counters() : client::TierCounters{};
  for (int s = 0; s < o.steps; ++s) {
    RETURN_IF_ERROR(engine->Step(ids, tokens, &next));
    if (!repeat) tokens = next;
  }
  const CudaEngineTimes& t1 = engine->times();
  const EngineCounters& c1 = engine->counters();
  const client::TierCounters k1 = tier != nullptr ? tier->counters() : client::TierCounters{};
  const double steps = o.steps, batch = static_cast<double>(ids.size());
  const double step_s = (t1.step - t0.step) / steps;
  auto ms = [&](double a, double b) { return (b - a) / steps * 1e3; };
  (*row)["batch"] = ids.size();
  (*row)["tokens_per_s"] = batch / step_s;
  (*row)["step_ms"] = step_s * 1e3;
  (*row)["bytes_streamed_per_token"] =
      static_cast<double>(k1.bytes_received - k0.bytes_received) / (steps * batch);
  const int64_t recalled = c1.recalled_rows - c0.recalled_rows,
                streamed = c1.streamed_rows - c0.streamed_rows;
  (*row)["breakdown"] = {
      {"gpu_ms", ms(t0.gpu, t1.gpu)},
      {"retrieve_wait_ms", ms(t0.retrieve, t1.retrieve)},
      {"retrieve_call_ms", ms(c0.retrieve_seconds, c1.retrieve_seconds)},
      {"tier_node_ms", (k1.tier_node_micros - k0.tier_node_micros) / steps / 1e3},
      {"tier_search_ms", (k1.tier_search_micros - k0.tier_search_micros) / steps / 1e3},
      {"tier_stream_ms", (k1.tier_stream_micros - k0.tier_stream_micros) / steps / 1e3},
      {"tier_read_ms", (k1.tier_read_micros - k0.tier_read_micros) / steps / 1e3},
      {"tier_search_select_ms",
       (k1.tier_search_select_micros - k0.tier_search_select_micros) / steps / 1e3},
      {"tier_search_score_ms",
       (k1.tier_search_score_micros - k0.tier_search_score_micros) / steps / 1e3},
      {"tier_search_finish_ms",
       (k1.tier_search_finish_micros - k0.tier_search_finish_micros) / steps / 1e3},
      {"tier_stream_plan_ms", (k1.tier_stream_plan_micros - k0.tier_stream_plan_micros) / steps / 1e3},
      {"upload_ms", ms(t0.upload, t1.upload)},
      {"append_ms", ms(t0.append, t1.append)},
      {"retrieve_calls_per_step", (c1.retrieve_calls - c0.retrieve_calls) / steps},
      {"rows_selected_per_step", recalled / steps},
      {"rows_streamed_per_step", streamed / steps},
      {"fallback_layers", c1.fallback_layers - c0.fallback_layers}};
  Progress(absl::StrFormat(
      "  %d sequences: %.1f tokens/s, %.2f ms/step (gpu %.2f, retrieve wait %.2f, upload %.2f, "
      "append %.2f ms)",
      ids.size(), batch / step_s, step_s * 1e3, ms(t0.gpu, t1.gpu), ms(t0.retrieve, t1.retrieve),
      ms(t0.upload, t1.upload), ms(t0.append, t1.append)));
  return absl::OkStatus();
}

// One kvrecall row's configuration.
struct Mode {
  int budget;
  bool lookahead;
  bool repeat;
};

absl::StatusOr<std::vector<Mode>> Modes(const DecodeBenchOptions& o) {
  std::vector<Mode> out;
  for (const std::string& t : o.tokens) {
    if (t != "greedy" && t != "repeat") {
      return absl::InvalidArgumentError(
          absl::StrCat("tokens mode '", t, "' is not greedy or repeat"));
    }
    for (bool lookahead : o.lookahead) {
      for (int b : o.budgets) out.push_back({b, lookahead, t == "repeat"});
    }
  }
  return out;
}

}  // namespace

absl::Status RunDecodeBench(const DecodeBenchOptions& o, nlohmann::json* report) {
  RETURN_IF_ERROR(cuda::CheckCudaDevice("kvrecall-worker bench"));
  DecodeBenchOptions opt = o;
  if (o.quick) {
    opt.contexts = {4096};
    opt.budgets = {256};
    opt.steps = 3;
    opt.warmup_steps = 1;
    opt.max_batch = std::min(o.max_batch, 4);
  }
  if (opt.prompts != "private" && opt.prompts != "shared") {
    return absl::InvalidArgumentError(
        absl::StrCat("prompts must be private or shared, not '", opt.prompts, "'"));
  }
  const bool shared = opt.prompts == "shared";
  indexer::IndexOptions index_options;  // the tier node's
  RETURN_IF_ERROR(indexer::ApplyMinSimilarityFlag(opt.ctkvr_min_similarity, &index_options.ctkvr));
  if (opt.prefill_chunk < 0 || opt.prefill_chunk > 8192) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefill_chunk must be in [0, 8192], not ", opt.prefill_chunk));
  }
  if (opt.tier != "local" && opt.tier != "remote") {
    return absl::InvalidArgumentError(
        absl::StrCat("tier must be local or remote, not '", opt.tier, "'"));
  }
  client::Method method;
  if (opt.method == "exact") {
    method = client::Method::kExact;
  } else if (opt.method == "ctkvr") {
    method = client::Method::kCtkvr;
  } else if (opt.method == "cluster") {
    method = client::Method::kCluster;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("method must be exact, ctkvr or cluster, not '", opt.method, "'"));
  }
  const int64_t host_available = MemAvailableBytes();
  const LlamaConfig cfg = BenchConfig(opt.quick);
  const std::string model_name = opt.quick ? "quick (4 layers, hidden 1024)" : "llama-3-8b shape";
  const ModelSpec spec = SpecOf(cfg, opt.quick ? "bench-quick" : "bench-llama-3-8b");
  Progress(absl::StrCat("random bf16 weights for ", model_name, " on the device ..."));
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaModel> model,
                   cuda::CudaModel::Random(cfg, opt.seed,
                                           std::max(opt.max_batch, opt.prefill_chunk)));
  int device = 0;
  cudaDeviceProp prop{};
  RETURN_IF_ERROR(cuda::CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
  RETURN_IF_ERROR(
      cuda::CudaStatus(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  Progress(absl::StrFormat("%.2f GB of weights on %s; host MemAvailable %.1f GB",
                           model->weight_bytes() / 1e9, prop.name, host_available / 1e9));
  ThreadPool pool(opt.threads);

  nlohmann::json rows = nlohmann::json::array();
  const int per_row_steps = opt.warmup_steps + opt.steps;
  ASSIGN_OR_RETURN(const std::vector<Mode> modes, Modes(opt));
  const int kvd = cfg.num_kv_heads * cfg.head_dim;
  for (int context : opt.contexts) {
    if (shared && (opt.question_tokens < 1 || opt.question_tokens >= context)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "question_tokens must be in [1, context) with shared prompts, not ", opt.question_tokens));
    }
    const int max_context = context + static_cast<int>(1 + modes.size()) * per_row_steps + 1;
    auto gpu_batch = [&](const EngineOptions& eo) -> std::pair<int, int64_t> {
      size_t free = 0, total = 0;
      if (cudaMemGetInfo(&free, &total) != cudaSuccess) return {0, 0};
      const int64_t per_seq = CudaEngine::DeviceBytesPerSequence(cfg, eo, max_context);
      const int64_t usable = static_cast<int64_t>(free) - opt.gpu_reserve_bytes;
      return {static_cast<int>(std::clamp<int64_t>(usable / per_seq, 0, opt.max_batch)), per_seq};
    };
    EngineOptions base;
    base.dense_layers = opt.dense_layers;
    base.sink_tokens = opt.sink_tokens;
    base.window_tokens = opt.window_tokens;
    base.method = method;
    base.index_queries = opt.index_queries;
    base.num_threads = opt.threads;
    base.lookahead_calls = opt.lookahead_calls;

    double dense_tps = 0;
    if (opt.dense) {
      EngineOptions eo = base;
      eo.sparse = false;
      const auto [batch, per_seq] = gpu_batch(eo);
      nlohmann::json row = {{"model", model_name},  {"context", context},
                            {"method", "dense"},    {"budget", nullptr},
                            {"tier", "none"},       {"gpu_bytes_per_sequence", per_seq},
                            {"prompt", opt.prefill_chunk > 0 ? "prefilled" : "synthetic"}};
      Progress(
          absl::StrFormat("context %d, dense: batch %d (%.2f GB of device memory per sequence)",
                          context, batch, per_seq / 1e9));
      if (batch < 1) {
        return absl::ResourceExhaustedError(
            absl::StrCat("no dense sequence of ", context, " fits"));
      }
      ASSIGN_OR_RETURN(auto engine,
                       CudaEngine::Create(model.get(), nullptr, spec, eo, {batch, max_context}));
      std::vector<std::string> ids;
      std::mt19937 token_rng(static_cast<uint32_t>(opt.seed + context));
      double prefill_s = 0;
      for (int i = 0; i < batch; ++i) {
        ids.push_back(absl::StrCat("dense-", context, "-", i));
        if (opt.prefill_chunk == 0) {
          RETURN_IF_ERROR(engine->AddSyntheticSequence(ids.back(), context, opt.seed + i));
          continue;
        }
        std::vector<int32_t> prompt(static_cast<size_t>(context));
        for (int32_t& t : prompt) t = static_cast<int32_t>(token_rng() % cfg.vocab_size);
        const absl::Time t0 = absl::Now();
        CudaPrefillOptions po;
        po.chunk_tokens = opt.prefill_chunk;
        RETURN_IF_ERROR(engine->PrefillSequence(ids.back(), prompt, po));
        prefill_s += absl::ToDoubleSeconds(absl::Now() - t0);
        Progress(absl::StrFormat("  prefilled %d / %d prompts on the GPU (%.1f s so far)", i + 1,
                                 batch, prefill_s));
      }
      if (opt.prefill_chunk > 0) {
        row["prefill_chunk"] = opt.prefill_chunk;
        row["prefill_seconds"] = prefill_s / batch;
        row["prefill_tokens_per_s"] = static_cast<double>(context) * batch / prefill_s;
      }
      RETURN_IF_ERROR(Decode(engine.get(), nullptr, opt, cfg.vocab_size, false, ids, &row));
      dense_tps = row["tokens_per_s"];
      row["speedup_vs_dense"] = 1.0;
      rows.push_back(row);
    }
    if (!opt.sparse) continue;

    // The tier holds every layer's K/V of every sequence in blocks of 64 tokens; its arena
    // needed ~8% more than that on the H100 host (2026-11-22), hence the margin.
    const int64_t token_bytes = int64_t{cfg.num_layers} * 2 * kvd * 2;
    const int64_t prompt_bytes = (int64_t{max_context} + 64) * token_bytes * 5 / 4;
    // The tier's memory: tier_shared once (shared prompts: the document and its index, which
    // every session over it holds), then tier_per_seq per sequence (private: its whole prompt;
    // shared: its question, its decode tokens and the blocks they round up to; its index grows
    // into a small part of its own, not reserved here).
    const int64_t index_reserve = kvstore::CtkvrIndexReserveBytes(
        index_options.ctkvr, int64_t{cfg.num_layers - opt.dense_layers} * cfg.num_kv_heads,
        cfg.num_heads / cfg.num_kv_heads, cfg.head_dim, DType::kBF16);
    const int64_t tier_shared = shared ? prompt_bytes + index_reserve : 0;
    const int64_t tier_per_seq =
        shared ? (int64_t{opt.question_tokens} + (max_context - context) + 2 * 64) * token_bytes *
                     5 / 4
               : prompt_bytes;
    const int64_t tier_memory = static_cast<int64_t>(opt.host_memory_fraction * host_available);
    // Each budget decodes at the largest batch its device memory takes (the tier holds prompts
    // for the largest of them; a smaller one decodes the first of those sequences).
    const int tier_batch = static_cast<int>(
        std::min<int64_t>(opt.max_batch, (tier_memory - tier_shared) / tier_per_seq));
    int batch = 0;
    int64_t gpu_per_seq = 0;
    for (int budget : opt.budgets) {
      EngineOptions eo = base;
      eo.budget = budget;
      const auto [fit, per_seq] = gpu_batch(eo);
      batch = std::max(batch, std::min(tier_batch, fit));
      gpu_per_seq = std::max(gpu_per_seq, per_seq);
    }
    if (batch < 1) {
      return absl::ResourceExhaustedError(
          absl::StrCat("no kvrecall sequence of ", context, " fits"));
    }
    const int max_budget = *std::max_element(opt.budgets.begin(), opt.budgets.end());
    const int sparse_layers = cfg.num_layers - opt.dense_layers;
    client::TierOptions to;
    const bool any_lookahead =
        std::find(opt.lookahead.begin(), opt.lookahead.end(), true) != opt.lookahead.end();
    to.staging_areas = any_lookahead ? sparse_layers : 1;
    to.recall_buffer_bytes = client::RecallBufferBytes(
        int64_t{batch} * cfg.num_kv_heads, max_budget, 2 * spec.row_bytes(), to.staging_areas,
        int64_t{spec.group_size()} * spec.head_dim);
    cuda::PinnedHostRanges pinned;  // outlives `tier`
    PinRecallBuffer(&pinned, &to);
    to.row_addresses = opt.row_addresses && opt.tier == "local";
    kvstore::NodeOptions no;
    no.memory_bytes = tier_shared + tier_per_seq * batch + (int64_t{256} << 20);
    no.search_threads = opt.threads;
    no.index_options = index_options;
    // Each prompt's index is built explicitly after its push (PushPromptToTier); the node's
    // automatic build (cluster by default) would first cluster every pushed prompt for nothing
    // (~15 s per 96K prompt on 16 cores), as on a node whose workers build their own indexes
    // (--auto_index=exact there).
    no.auto_index = indexer::Method::kExact;
    Progress(absl::StrFormat(
        "context %d, kvrecall (%s prompts): batch %d (host: %.1f GB of tier per sequence, "
        "%.1f GB arena; device: %.2f GB per sequence)",
        context, opt.prompts, batch, tier_per_seq / 1e9,
        no.memory_bytes / 1e9, gpu_per_seq / 1e9));
    std::unique_ptr<bench::LoopbackServer> server;  // outlives `tier`
    std::unique_ptr<client::Tier> tier;
    if (opt.tier == "remote") {
      ASSIGN_OR_RETURN(server, bench::StartLoopbackServer(no, opt.ucx_tls));
      client::RemoteTierOptions ro;
      ro.target = server->target;
      ro.transport = "ucx";
      ro.ucx_tls = opt.ucx_tls;
      ASSIGN_OR_RETURN(tier, client::CreateRemoteTier(ro, to));
    } else {
      ASSIGN_OR_RETURN(tier, client::CreateLocalTier(no, to));
    }
    Progress(absl::StrCat("tier: ", tier->Describe()));
    RETURN_IF_ERROR(tier->RegisterModel(spec));
    std::vector<std::string> ids;
    std::vector<int64_t> lens(batch, context);
    std::mt19937 rng(static_cast<uint32_t>(opt.seed + context));
    std::normal_distribution<float> normal;
    double index_seconds = 0;
    const absl::Time t_push = absl::Now();
    std::vector<int32_t> document(static_cast<size_t>(shared ? context - opt.question_tokens : 0));
    for (int32_t& t : document) t = static_cast<int32_t>(rng() % cfg.vocab_size);
    // Shared prompts: every session indexes the document's full blocks with the document's
    // queries (what a worker asks for once its prompt adopted the document's prefix), so the
    // tier builds that index once and every session holds it.
    const int nq = opt.index_queries;
    // Random prompt queries of every sparse layer, [nq][num_heads][head_dim] each.
    auto random_queries = [&] {
      std::vector<std::vector<float>> q(sparse_layers);
      for (auto& lq : q) {
        lq.resize(static_cast<size_t>(nq) * cfg.num_heads * cfg.head_dim);
        for (float& x : lq) x = normal(rng);
      }
      return q;
    };
    const int64_t document_end =
        static_cast<int64_t>(document.size()) / no.block_tokens * no.block_tokens;
    const std::vector<std::vector<float>> document_q =
        shared ? random_queries() : std::vector<std::vector<float>>{};
    const std::vector<absl::Span<const float>> document_qs(document_q.begin(), document_q.end());
    for (int i = 0; i < batch; ++i) {
      ids.push_back(absl::StrCat("kvrecall-", context, "-", i));
      std::vector<int32_t> prompt = document;
      prompt.resize(static_cast<size_t>(context));
      for (size_t j = document.size(); j < prompt.size(); ++j) {
        prompt[j] = static_cast<int32_t>(rng() % cfg.vocab_size);
      }
      const std::vector<std::vector<float>> q =
          shared ? std::vector<std::vector<float>>{} : random_queries();
      const std::vector<absl::Span<const float>> qs(q.begin(), q.end());
      const internal::IndexQuerySource queries =
          [&](int64_t) -> absl::StatusOr<internal::IndexQueries> {
        if (shared) return internal::IndexQueries{document_end, nq, document_qs};
        return internal::IndexQueries{context, nq, qs};
      };
      EngineOptions eo = base;
      RETURN_IF_ERROR(internal::PushPromptToTier(tier.get(), spec, eo, ids.back(), prompt,
                                                 SyntheticKvSource(opt.seed + i, spec, &pool),
                                                 queries, &index_seconds));
      Progress(absl::StrFormat("  pushed %d / %d prompts to the tier (index build %.1f s so far)",
                               i + 1, batch, index_seconds));
    }
    const double push_s = absl::ToDoubleSeconds(absl::Now() - t_push);
    for (const Mode& mode : modes) {
      EngineOptions eo = base;
      eo.budget = mode.budget;
      eo.lookahead = mode.lookahead;
      nlohmann::json row = {
          {"model", model_name},
          {"context", context},
          {"method", opt.method},
          {"budget", mode.budget},
          {"tokens", mode.repeat ? "repeat" : "greedy"},
          {"tier", opt.tier},
          {"tier_describe", tier->Describe()},
          {"row_addresses", to.row_addresses},
          {"lookahead", mode.lookahead},
          {"gpu_bytes_per_sequence", CudaEngine::DeviceBytesPerSequence(cfg, eo, max_context)},
          {"tier_bytes_per_sequence", tier_per_seq},
          {"tier_shared_bytes", tier_shared},
          {"prompt", "synthetic"},
          {"prompts", opt.prompts},
          {"question_tokens", shared ? opt.question_tokens : 0},
          {"ctkvr_min_similarity", opt.ctkvr_min_similarity},
          {"tier_fill_seconds", push_s},
          {"index_build_seconds", index_seconds}};
      const int mode_batch = std::min(batch, gpu_batch(eo).first);
      if (mode_batch < 1) {
        return absl::ResourceExhaustedError(
            absl::StrCat("no sequence of ", context, " fits budget ", mode.budget));
      }
      Progress(absl::StrFormat("context %d, %s budget %d%s, %s tokens: batch %d", context,
                               opt.method, mode.budget, mode.lookahead ? " lookahead" : "",
                               mode.repeat ? "repeated" : "greedy", mode_batch));
      ASSIGN_OR_RETURN(auto engine, CudaEngine::Create(model.get(), tier.get(), spec, eo,
                                                       {mode_batch, max_context}, &pinned));
      for (int i = 0; i < mode_batch; ++i) {
        RETURN_IF_ERROR(engine->AddSyntheticSequence(ids[i], lens[i], opt.seed + i));
      }
      const std::vector<std::string> mode_ids(ids.begin(), ids.begin() + mode_batch);
      RETURN_IF_ERROR(
          Decode(engine.get(), tier.get(), opt, cfg.vocab_size, mode.repeat, mode_ids, &row));
      for (int i = 0; i < mode_batch; ++i) lens[i] += per_row_steps;
      row["speedup_vs_dense"] = dense_tps > 0 ? row["tokens_per_s"].get<double>() / dense_tps : 0.0;
      rows.push_back(row);
    }
  }
  (*report)["benchmark"] = "kvrecall-worker bench";
  (*report)["device"] = prop.name;
  (*report)["prompt"] = opt.prefill_chunk > 0
                            ? "dense rows prefilled on the GPU, kvrecall rows synthetic"
                            : "synthetic";
  (*report)["model_config"] = {{"num_layers", cfg.num_layers},
                               {"hidden_size", cfg.hidden_size},
                               {"intermediate_size", cfg.intermediate_size},
                               {"num_heads", cfg.num_heads},
                               {"num_kv_heads", cfg.num_kv_heads},
                               {"head_dim", cfg.head_dim},
                               {"vocab_size", cfg.vocab_size},
                               {"weights", "random bf16 on the device"}};
  (*report)["options"] = {{"dense_layers", opt.dense_layers},
                          {"sink_tokens", opt.sink_tokens},
                          {"window_tokens", opt.window_tokens},
                          {"index_queries", opt.index_queries},
                          {"warmup_steps", opt.warmup_steps},
                          {"steps", opt.steps},
                          {"prompts", opt.prompts},
                          {"ctkvr_min_similarity", opt.ctkvr_min_similarity},
                          {"delta_streaming", true}};
  (*report)["rows"] = rows;
  return absl::OkStatus();
}

}  // namespace kvrecall::worker
