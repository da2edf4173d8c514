// The GPU-resident engine against the host Engine on the cpu backend (fp32 everywhere but the
// bf16 K/V), on the make-model preset "tiny" (4 layers, 4 q / 2 kv heads, head_dim 64): the
// prompts are prefilled by the host Engine and uploaded (AddSequence), then
// both decode the same tokens (teacher-forced: the host's greedy choices) and their logits are
// compared every step within bf16 tolerance (relative L2 <= 1e-2 and every element within
// 4u|ref| + 0.05 rms(ref), u = 2^-8, as cuda_backend_test).
//   Dense: every layer's KV on the device, DecodeAttention.
//   Sparse, method exact with a budget covering every candidate: sinks + window + recalled rows
//   attend to the same tokens as dense, so the logits must match the same dense reference;
//   with and without lookahead (a full-budget exact selection does not depend on the query).
// Three sequences decode together; one leaves mid-way (its batch row is refilled by the last).
//
// GPU prefill (PrefillSequence) against the host path (Engine::Prefill, then AddSequence), on a
// 45-token prompt in chunks of 16, 7 and 8 (none divides 45: the last chunk is short):
// the last prompt token's logits and every teacher-forced decode step's logits within the same
// tolerance, the GPU's greedy token equal to the host's wherever the host's top-2 margin exceeds
// the tolerance of those two logits; dense (and a sequence added by AddSequence decoding beside
// the prefilled one), and sparse with a LocalTier behind a recording wrapper: the prompt K/V the
// tier receives and, for ctkvr, the prompt queries its index is built from, against the host
// path's, and the lists the GPU made (gpu_ctkvr_lists) against the indexer's own build.
// GPU tests skip where no CUDA device is found; the argument checks that need no device run
// everywhere.
#include "gpu-worker/engine/cuda_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/loopback_server.h"
#include "client/testing/failing_appends.h"
#include "client/testing/forwarding_tier.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gpu-worker/backends/backend.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/engine/gpu_generate.h"
#include "gpu-worker/engine/testing/logits_compare.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/make_model.h"
#include "gpu-worker/model/safetensors.h"
#include "gtest/gtest.h"
#include "indexer/index.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;
using ::kvrecall::worker::testing::Argmax;
using ::kvrecall::worker::testing::Compare;
using ::kvrecall::worker::testing::Decisive;
using ::kvrecall::worker::testing::Diff;

bool HasGpu() {
  static const bool has = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return has;
}

// A tier that forwards every call and records what PushPromptToTier sends: the prompt appends
// (those without token ids) and the BuildIndex queries.
class RecordingTier final : public client::testing::ForwardingTier {
 public:
  explicit RecordingTier(client::Tier* inner) : ForwardingTier(inner) {}
  absl::Status AppendKV(const std::string& id, const client::AppendBatch& b) override {
    if (b.token_ids.empty()) prompt_appends[id].push_back(b);
    return inner()->AppendKV(id, b);
  }
  // AppendKVBatch call `call` (from 1) stores every sequence but `sequence_id`, and fails.
  void FailAppendOnce(int call, std::string sequence_id) {
    appends_.FailOnce(call, std::move(sequence_id));
  }
  absl::Status AppendKVBatch(absl::Span<const client::SequenceAppend> appends,
                             std::vector<bool>* stored) override {
    return appends_.AppendKVBatch(inner(), appends, stored);
  }
  absl::StatusOr<kvstore::BuildIndexOutcome> BuildIndex(const std::string& id,
                                                        kvstore::BuildIndexArgs a) override {
    Queries& q = queries[id];
    q.num_queries = a.num_queries;
    q.layers.clear();
    for (absl::Span<const float> l : a.layer_queries) q.layers.emplace_back(l.begin(), l.end());
    q.list_size = a.ctkvr_list_size;
    q.list_tokens.clear();
    q.list_lse.clear();
    for (const kvstore::BuildIndexArgs::LayerLists& l : a.ctkvr_lists) {
      q.list_tokens.emplace_back(l.tokens.begin(), l.tokens.end());
      q.list_lse.emplace_back(l.lse.begin(), l.lse.end());
    }
    return inner()->BuildIndex(id, std::move(a));
  }
  std::string Describe() const override { return "recording"; }

  struct Queries {
    int num_queries = 0;
    std::vector<std::vector<float>> layers;  // [sparse layer][num_queries][heads][head_dim]
    // ctkvr lists made by the engine: [sparse layer][kv_heads][num_queries][n] / [...][group].
    int list_size = 0;
    std::vector<std::vector<int32_t>> list_tokens;
    std::vector<std::vector<float>> list_lse;
  };
  std::map<std::string, std::vector<client::AppendBatch>> prompt_appends;
  std::map<std::string, Queries> queries;

 private:
  client::testing::FailingAppends appends_;
};

// Layer l's K (or V) rows of tokens [0, num_tokens) in a list of prompt appends (AppendBatch
// layout, bf16) as fp32 [token][kv_head][head_dim]; NaN where no append covered a token.
std::vector<float> PromptRows(const std::vector<client::AppendBatch>& appends, int l, bool is_v,
                              int64_t num_tokens, int num_kv_heads, int head_dim) {
  std::vector<float> out(static_cast<size_t>(num_tokens) * num_kv_heads * head_dim, NAN);
  for (const client::AppendBatch& b : appends) {
    const std::string& src = is_v ? b.values[l] : b.keys[l];
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src.data());
    for (int h = 0; h < num_kv_heads; ++h) {
      for (int64_t i = 0; i < b.num_tokens; ++i) {
        for (int j = 0; j < head_dim; ++j) {
          out[((b.token_start + i) * num_kv_heads + h) * head_dim + j] =
              Bf16ToF32(bits[(h * b.num_tokens + i) * head_dim + j]);
        }
      }
    }
  }
  return out;
}

class CudaEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HasGpu()) GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount failed or found none)";
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = absl::StrCat(info->test_suite_name(), "_", info->name());
    std::replace(name.begin(), name.end(), '/', '_');
    dir_ = absl::StrCat(::testing::TempDir(), "/cuda_engine_test_", name);
    ASSERT_OK_AND_ASSIGN(config_, PresetConfig("tiny"));
    ASSERT_OK(WriteRandomModel(dir_, config_, 7));
    spec_ = SpecOf(config_, "tiny");
    ASSERT_OK_AND_ASSIGN(cpu_, CreateBackend("cpu", dir_, 2));
    ASSERT_OK_AND_ASSIGN(gpu_model_, LoadGpuModel(8));
  }

  absl::StatusOr<std::unique_ptr<cuda::CudaModel>> LoadGpuModel(int max_rows) const {
    ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::Open(dir_));
    return cuda::CudaModel::Load(config_, *ckpt, max_rows);
  }

  // The prefill tests' prompt: 45 tokens, so that chunks of 16, 7 and 8 all leave a short last
  // chunk, and longer than sinks + window (4 + 8) so that the tier serves the middle.
  std::vector<int32_t> PrefillPrompt() const {
    std::vector<int32_t> prompt;
    for (int i = 0; i < 45; ++i) prompt.push_back((i * 53 + 5) % 256);
    return prompt;
  }

  // Compares the GPU's logits of `what` with the host's (the reference); on a decisive
  // reference also the GPU's greedy token (`gpu_next`, -1: take the argmax of `gpu`).
  void ExpectClose(const float* gpu, const float* host, int32_t gpu_next, const std::string& what,
                   double* worst_rel, int* near_ties) {
    const int V = config_.vocab_size;
    const Diff d = Compare(gpu, host, V);
    EXPECT_LE(d.rel_l2, 1e-2) << what;
    EXPECT_LE(d.worst, 1.0) << what << " rel L2 " << d.rel_l2;
    *worst_rel = std::max(*worst_rel, d.rel_l2);
    if (gpu_next < 0) gpu_next = Argmax(gpu, V);
    if (Decisive(host, V)) {
      EXPECT_EQ(gpu_next, Argmax(host, V)) << what << ": greedy tokens differ";
    } else {
      ++*near_ties;
    }
  }

  EngineOptions Options() const {
    EngineOptions o;
    o.sink_tokens = 4;
    o.window_tokens = 8;
    o.budget = 64;  // > every candidate range [4, len - 8) below
    o.method = client::Method::kExact;
    o.prefill_chunk = 16;
    o.num_threads = 2;
    return o;
  }

  // The engine's ctkvr lists (q) against the indexer's build over the same inputs: the keys
  // the tier received and the queries it was sent. Per (sparse layer, kv-head, centroid): the
  // same n tokens but for at most one near tie, normalisers within 1e-4 (relative).
  void ExpectIndexerLists(const RecordingTier::Queries& q,
                          const std::vector<client::AppendBatch>& appends, const EngineOptions& o,
                          int64_t T) const {
    const int L = config_.num_layers, Hkv = config_.num_kv_heads, d = config_.head_dim;
    const int Hq = config_.num_heads, G = Hq / Hkv, C = q.num_queries;
    const int64_t begin = std::min<int64_t>(o.sink_tokens, T - 1);
    const int64_t n = std::min<int64_t>(q.list_size, T - begin);
    indexer::IndexOptions io;
    io.ctkvr.centroids = C;
    io.ctkvr.list_size = q.list_size;
    int swapped = 0;
    for (int l = o.dense_layers; l < L; ++l) {
      const int s = l - o.dense_layers;
      ASSERT_EQ(q.list_tokens[s].size(), static_cast<size_t>(Hkv) * C * n);
      ASSERT_EQ(q.list_lse[s].size(), static_cast<size_t>(Hkv) * C * G);
      const std::vector<float> keys = PromptRows(appends, l, false, T, Hkv, d);
      for (int h = 0; h < Hkv; ++h) {
        indexer::PagedRows rows;
        rows.page_tokens = static_cast<int>(T);
        rows.page_offset = static_cast<size_t>(h) * d * 4;
        rows.row_stride = static_cast<size_t>(Hkv) * d * 4;
        rows.head_dim = d;
        rows.dtype = DType::kF32;
        rows.num_tokens = T;
        rows.SetPages({reinterpret_cast<const uint8_t*>(keys.data())});
        std::vector<float> grouped;  // [C][G][d] of kv-head h
        for (int c = 0; c < C; ++c) {
          const float* src = q.layers[s].data() + (static_cast<size_t>(c) * Hq + h * G) * d;
          grouped.insert(grouped.end(), src, src + G * d);
        }
        indexer::BuildInput in;
        in.keys = &rows;
        in.token_begin = begin;
        in.token_end = T;
        in.prompt_queries = grouped.data();
        in.num_prompt_queries = C;
        in.group = G;
        ASSERT_OK_AND_ASSIGN(auto seg,
                             indexer::BuildSegment(indexer::Method::kCtkvr, in, io, nullptr));
        ASSERT_OK_AND_ASSIGN(indexer::CtkvrListsCopy want, indexer::CtkvrListsOf(*seg));
        ASSERT_EQ(want.tokens.size(), static_cast<size_t>(C) * n);
        for (int c = 0; c < C; ++c) {
          const int32_t* got = q.list_tokens[s].data() + (static_cast<size_t>(h) * C + c) * n;
          const int32_t* ref = want.tokens.data() + static_cast<size_t>(c) * n;
          std::vector<int32_t> common;
          std::set_intersection(got, got + n, ref, ref + n, std::back_inserter(common));
          EXPECT_GE(static_cast<int64_t>(common.size()), n - 1)
              << "layer " << l << " kv-head " << h << " centroid " << c;
          swapped += static_cast<int>(n - static_cast<int64_t>(common.size()));
          EXPECT_TRUE(std::is_sorted(got, got + n) && std::adjacent_find(got, got + n) == got + n);
          for (int g = 0; g < G; ++g) {
            const float lg = q.list_lse[s][(static_cast<size_t>(h) * C + c) * G + g];
            const float lw = want.lse[static_cast<size_t>(c) * G + g];
            EXPECT_NEAR(lg, lw, 1e-4 * std::max(1.0f, std::fabs(lw)))
                << "layer " << l << " kv-head " << h << " centroid " << c << " head " << g;
          }
        }
      }
    }
    std::printf("[ stats    ] GPU ctkvr lists: %d near-tie swaps against the indexer's\n", swapped);
  }

  // Tier options whose recall buffer takes a step of 4 sequences at o's budget.
  client::TierOptions RecallFor(const EngineOptions& o) const {
    client::TierOptions to;
    to.recall_buffer_bytes = client::RecallBufferBytes(4 * config_.num_kv_heads, o.budget,
                                                       2 * spec_.row_bytes(), to.staging_areas);
    return to;
  }

  // A 60-token prompt's K/V, prefilled by the dense host engine.
  absl::StatusOr<PromptKV> HostPrompt() {
    EngineOptions ho = Options();
    ho.sparse = false;
    ASSIGN_OR_RETURN(auto host, Engine::Create(cpu_.get(), nullptr, spec_, ho));
    std::vector<int32_t> prompt;
    for (int i = 0; i < 60; ++i) prompt.push_back((i * 37 + 11) % 256);
    std::vector<float> logits;
    return host->Prefill(prompt, &logits);
  }

  // Prefills three prompts of different lengths on the host, starts them in both engines and
  // decodes `steps` steps; sequence "b" leaves after step 2. Every step's GPU logits are
  // compared with the host's.
  void Run(CudaEngine* gpu, int steps) {
    EngineOptions ho = Options();
    ho.sparse = false;
    ASSERT_OK_AND_ASSIGN(auto host, Engine::Create(cpu_.get(), nullptr, spec_, ho));
    std::vector<std::string> ids = {"a", "b", "c"};
    std::map<std::string, int32_t> next;
    for (size_t s = 0; s < ids.size(); ++s) {
      std::vector<int32_t> prompt;
      for (int i = 0; i < 30 + 7 * static_cast<int>(s); ++i)
        prompt.push_back((i * 37 + 11 * (s + 1)) % 256);
      std::vector<float> logits;
      ASSERT_OK_AND_ASSIGN(PromptKV kv, host->Prefill(prompt, &logits));
      ASSERT_OK(host->AddSequence(ids[s], kv));
      ASSERT_OK(gpu->AddSequence(ids[s], kv));
      next[ids[s]] = Argmax(logits.data(), config_.vocab_size);
    }
    EXPECT_THAT(gpu->AddSequence("a", PromptKV{}), StatusIs(absl::StatusCode::kAlreadyExists));
    const int V = config_.vocab_size;
    double worst_rel = 0;
    for (int step = 0; step < steps; ++step) {
      if (step == 2) {
        ASSERT_OK(host->RemoveSequence("b"));
        ASSERT_OK(gpu->RemoveSequence("b"));
        ids = {"c", "a"};  // any order
      }
      std::vector<int32_t> tokens;
      for (const std::string& id : ids) tokens.push_back(next[id]);
      std::vector<float> hl, gl;
      std::vector<int32_t> gn;
      ASSERT_OK(host->Step(ids, tokens, &hl));
      ASSERT_OK(gpu->Step(ids, tokens, &gn, &gl));
      ASSERT_EQ(gl.size(), hl.size());
      for (size_t i = 0; i < ids.size(); ++i) {
        const Diff d = Compare(gl.data() + i * V, hl.data() + i * V, V);
        EXPECT_LE(d.rel_l2, 1e-2) << "step " << step << " sequence " << ids[i];
        EXPECT_LE(d.worst, 1.0) << "step " << step << " sequence " << ids[i] << " rel L2 "
                                << d.rel_l2;
        EXPECT_EQ(gn[i], Argmax(gl.data() + i * V, V));
        worst_rel = std::max(worst_rel, d.rel_l2);
        next[ids[i]] = Argmax(hl.data() + i * V, V);
      }
    }
    RecordProperty("worst_rel_l2", std::to_string(worst_rel));
    std::printf("[ stats    ] worst logits rel L2 vs host: %.3g\n", worst_rel);
    std::vector<int32_t> unused;
    EXPECT_THAT(gpu->Step({"a"}, {1}, &unused), StatusIs(absl::StatusCode::kInvalidArgument));
  }

  std::string dir_;
  LlamaConfig config_;
  ModelSpec spec_;
  std::unique_ptr<ModelBackend> cpu_;
  std::unique_ptr<cuda::CudaModel> gpu_model_;
};

TEST_F(CudaEngineTest, DenseMatchesHostEngine) {
  EngineOptions o = Options();
  o.sparse = false;
  ASSERT_OK_AND_ASSIGN(auto gpu, CudaEngine::Create(gpu_model_.get(), nullptr, spec_, o, {4, 128}));
  Run(gpu.get(), 8);
  EXPECT_EQ(gpu->counters().retrieve_calls, 0);
}

// Parameters: lookahead, and whether the tier gives row addresses in its arena (the kernel
// gathers the rows) instead of copying them into the recall buffer.
class CudaEngineSparseTest : public CudaEngineTest,
                             public ::testing::WithParamInterface<std::tuple<bool, bool>> {};

TEST_P(CudaEngineSparseTest, ExactFullBudgetMatchesDense) {
  EngineOptions o = Options();
  o.lookahead = std::get<0>(GetParam());
  client::TierOptions to;
  to.row_addresses = std::get<1>(GetParam());
  to.staging_areas = o.lookahead ? config_.num_layers - o.dense_layers : 1;
  to.recall_buffer_bytes = client::RecallBufferBytes(4 * config_.num_kv_heads, o.budget,
                                                     2 * spec_.row_bytes(), to.staging_areas);
  cuda::PinnedHostRanges pinned;
  PinRecallBuffer(&pinned, &to);
  ASSERT_OK_AND_ASSIGN(
      auto tier, client::CreateLocalTier(kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, to));
  ASSERT_OK(tier->RegisterModel(spec_));
  ASSERT_OK_AND_ASSIGN(auto gpu, CudaEngine::Create(gpu_model_.get(), tier.get(), spec_, o,
                                                    {4, 128}, &pinned));
  Run(gpu.get(), 8);
  const EngineCounters& c = gpu->counters();
  EXPECT_GT(c.retrieve_calls, 0);
  EXPECT_GT(c.recalled_rows, 0);
  EXPECT_LT(c.streamed_rows, c.recalled_rows);  // delta streaming: resident rows are not resent
  EXPECT_EQ(c.fallback_layers, 0);
}

INSTANTIATE_TEST_SUITE_P(LookaheadAndRowAddresses, CudaEngineSparseTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

// The same through a RemoteTier whose recall buffer has room for the queries: the engine widens
// each layer's queries where the tier reads them (Tier::QueryStaging), one staging area per layer
// with lookahead, and decodes as dense does.
TEST_F(CudaEngineTest, ExactFullBudgetThroughARemoteTierWithQueriesInPlaceMatchesDense) {
  EngineOptions o = Options();
  o.lookahead = true;
  ASSERT_OK_AND_ASSIGN(auto server, bench::StartLoopbackServer(
                                        kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, "tcp"));
  client::TierOptions to;
  to.staging_areas = config_.num_layers - o.dense_layers;
  to.recall_buffer_bytes = client::RecallBufferBytes(
      4 * config_.num_kv_heads, o.budget, 2 * spec_.row_bytes(), to.staging_areas,
      int64_t{config_.num_heads / config_.num_kv_heads} * config_.head_dim);
  cuda::PinnedHostRanges pinned;
  PinRecallBuffer(&pinned, &to);
  client::RemoteTierOptions r;
  r.target = server->target;
  r.ucx_tls = "tcp";
  ASSERT_OK_AND_ASSIGN(auto tier, client::CreateRemoteTier(r, to));
  ASSERT_OK(tier->RegisterModel(spec_));
  ASSERT_FALSE(tier->QueryStaging(spec_, 0, 4 * config_.num_kv_heads, o.budget, 0).empty());
  ASSERT_OK_AND_ASSIGN(
      auto gpu, CudaEngine::Create(gpu_model_.get(), tier.get(), spec_, o, {4, 128}, &pinned));
  Run(gpu.get(), 8);
  const EngineCounters& c = gpu->counters();
  EXPECT_GT(c.retrieve_calls, 0);
  EXPECT_GT(c.recalled_rows, 0);
  EXPECT_EQ(c.fallback_layers, 0);
}

// A step whose appends failed for one sequence fails; retried, it sends only that sequence's
// token (the tier refuses a token twice), and decoding goes on as on an engine that never failed.
TEST_F(CudaEngineTest, AStepRetriedAfterAPartialAppendFailureSendsOnlyWhatWasNotStored) {
  EngineOptions o = Options();
  client::TierOptions to = RecallFor(o);
  cuda::PinnedHostRanges pinned;
  PinRecallBuffer(&pinned, &to);
  ASSERT_OK_AND_ASSIGN(PromptKV kv, HostPrompt());
  // Destroyed in reverse: the engines before the tiers they use.
  std::vector<std::unique_ptr<client::Tier>> tiers;
  std::unique_ptr<RecordingTier> recording;
  RecordingTier* flaky_tier = nullptr;
  std::vector<std::unique_ptr<CudaEngine>> engines;
  for (int e = 0; e < 2; ++e) {  // 0: flaky, 1: steady
    ASSERT_OK_AND_ASSIGN(
        auto tier, client::CreateLocalTier(kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, to));
    ASSERT_OK(tier->RegisterModel(spec_));
    client::Tier* used = tier.get();
    if (e == 0) {
      recording = std::make_unique<RecordingTier>(tier.get());
      recording->FailAppendOnce(2, "b");
      flaky_tier = recording.get();
      used = flaky_tier;
    }
    ASSERT_OK_AND_ASSIGN(auto gpu,
                         CudaEngine::Create(gpu_model_.get(), used, spec_, o, {4, 128}, &pinned));
    for (const char* id : {"a", "b"}) ASSERT_OK(gpu->AddSequence(id, kv));
    tiers.push_back(std::move(tier));
    engines.push_back(std::move(gpu));
  }
  const std::vector<std::string> ids = {"a", "b"};
  for (int t = 0; t < 5; ++t) {
    const std::vector<int32_t> tokens = {17 + t, 40 + t};
    std::vector<int32_t> nf, ns;
    if (t == 1) {
      EXPECT_THAT(engines[0]->Step(ids, tokens, &nf), StatusIs(absl::StatusCode::kUnavailable));
    }
    ASSERT_OK(engines[0]->Step(ids, tokens, &nf)) << "step " << t + 1;
    ASSERT_OK(engines[1]->Step(ids, tokens, &ns));
    EXPECT_EQ(nf, ns) << "step " << t + 1;
  }
  for (client::Tier* tier : {static_cast<client::Tier*>(flaky_tier), tiers[1].get()}) {
    ASSERT_OK_AND_ASSIGN(kvstore::NodeStats stats, tier->Stats(/*include_sequences=*/true));
    ASSERT_EQ(stats.sequences.size(), 2u);
    for (const auto& seq : stats.sequences) EXPECT_EQ(seq.stored_tokens, 60 + 5);
  }
}

// `generate --engine=gpu`'s loop: the prompt prefilled on the GPU and pushed to the tier, greedy
// steps through it; with exact retrieval over every candidate it chooses what the dense GPU
// engine alongside chooses, and it leaves no sequence behind.
TEST_F(CudaEngineTest, GpuGeneratorDecodesThroughTheTierAsDenseDoes) {
  EngineOptions o = Options();
  ASSERT_OK_AND_ASSIGN(auto generator, CreateGpuGenerator(dir_, spec_, o, 128));
  client::TierOptions to = RecallFor(o);
  generator->PinRecallBuffer(&to);
  ASSERT_OK_AND_ASSIGN(
      auto tier, client::CreateLocalTier(kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, to));
  ASSERT_OK(tier->RegisterModel(spec_));
  const std::vector<int32_t> prompt = PrefillPrompt();
  ASSERT_OK_AND_ASSIGN(GenerateRun run,
                       generator->Run({tier.get()}, "g", prompt, 12, /*compare_dense=*/true));
  EXPECT_EQ(run.generated.size(), 12u);
  EXPECT_EQ(run.compared, 12);
  // Sparse and dense attention sum the same rows in other orders: within the bf16 tolerance of
  // the other GPU tests, and the same greedy token but perhaps at one near-tie.
  EXPECT_LE(run.max_abs_dlogit, 1.0);
  EXPECT_GE(run.top1_match, run.compared - 1) << "max |dlogit| " << run.max_abs_dlogit;
  EXPECT_GT(run.counters.retrieve_calls, 0);
  EXPECT_GT(run.counters.recalled_rows, 0);
  EXPECT_GT(run.prefill_seconds, 0);
  ASSERT_OK_AND_ASSIGN(kvstore::NodeStats stats, tier->Stats(/*include_sequences=*/true));
  EXPECT_TRUE(stats.sequences.empty());
  // Bad input: a prompt longer than the generator's max_context.
  EXPECT_THAT(generator->Run({tier.get()}, "long", std::vector<int32_t>(200, 3), 1, false).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(generator->Run({tier.get(), tier.get()}, "two", prompt, 1, false).status(),
              StatusIs(absl::StatusCode::kInvalidArgument))
      << "one tier per GPU";
}

// `generate --engine=gpu --tensor_parallel=2 --tp_collective=host`: the model split over two
// ranks (sharing this GPU), each with a tier of its own, generates what one GPU generates; the
// ranks' retrieval adds up to the single GPU's (twice the calls, each for half the heads).
TEST_F(CudaEngineTest, GpuGeneratorOverTwoRanksGeneratesWhatOneDoes) {
  EngineOptions o = Options();
  const std::vector<int32_t> prompt = PrefillPrompt();
  std::vector<GenerateRun> runs;
  for (int world : {1, 2}) {
    ASSERT_OK_AND_ASSIGN(auto generator, CreateGpuGenerator(dir_, spec_, o, 128, {world, "host"}));
    ASSERT_EQ(generator->world(), world);
    client::TierOptions to = RecallFor(o);
    generator->PinRecallBuffer(&to);
    std::vector<std::unique_ptr<client::Tier>> tiers;
    std::vector<client::Tier*> rank_tiers;
    for (int r = 0; r < world; ++r) {
      to.worker_id = ShardName("w", r, world);
      ASSERT_OK_AND_ASSIGN(
          tiers.emplace_back(),
          client::CreateLocalTier(kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, to));
      rank_tiers.push_back(tiers.back().get());
    }
    if (world == 1) {
      ASSERT_OK(tiers[0]->RegisterModel(spec_));  // ranks register their shards themselves
    }
    ASSERT_OK_AND_ASSIGN(runs.emplace_back(), generator->Run(rank_tiers, "g", prompt, 12, false));
    EXPECT_THAT(generator->Run({tiers[0].get()}, "x", prompt, 1, false).status(),
                StatusIs(world == 1 ? absl::StatusCode::kOk : absl::StatusCode::kInvalidArgument));
    for (const auto& tier : tiers) {
      ASSERT_OK_AND_ASSIGN(kvstore::NodeStats stats, tier->Stats(/*include_sequences=*/true));
      EXPECT_TRUE(stats.sequences.empty());
    }
  }
  EXPECT_EQ(runs[1].generated, runs[0].generated);
  EXPECT_EQ(runs[1].counters.retrieve_calls, 2 * runs[0].counters.retrieve_calls);
  EXPECT_EQ(runs[1].counters.recalled_rows, runs[0].counters.recalled_rows);
  EXPECT_EQ(runs[1].counters.steps, runs[0].counters.steps);
}

// Rows in a recall buffer the device cannot read (not pinned): the step fails with
// FAILED_PRECONDITION before any kernel reads them, and the engine keeps working.
TEST_F(CudaEngineTest, UnpinnedRecallBufferFailsTheStep) {
  EngineOptions o = Options();
  ASSERT_OK_AND_ASSIGN(
      auto tier,
      client::CreateLocalTier(kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, RecallFor(o)));
  ASSERT_OK(tier->RegisterModel(spec_));
  ASSERT_OK_AND_ASSIGN(auto gpu,
                       CudaEngine::Create(gpu_model_.get(), tier.get(), spec_, o, {4, 128}));
  ASSERT_OK_AND_ASSIGN(PromptKV kv, HostPrompt());
  ASSERT_OK(gpu->AddSequence("a", kv));
  std::vector<int32_t> next;
  EXPECT_THAT(gpu->Step({"a"}, {1}, &next), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(gpu->Step({"a"}, {1}, &next), StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_OK(gpu->RemoveSequence("a"));
}

// GPU prefill in dense mode, by (the model's max_rows, CudaPrefillOptions::chunk_tokens): chunks
// of prefill_chunk = 16, of 7, and of 8 where the model's 8 rows cap prefill_chunk.
class CudaEnginePrefillDenseTest : public CudaEngineTest,
                                   public ::testing::WithParamInterface<std::pair<int, int>> {};

TEST_P(CudaEnginePrefillDenseTest, MatchesHostPrefill) {
  const auto [max_rows, chunk] = GetParam();
  ASSERT_OK_AND_ASSIGN(auto model, LoadGpuModel(max_rows));
  EngineOptions o = Options();
  o.sparse = false;
  ASSERT_OK_AND_ASSIGN(auto host, Engine::Create(cpu_.get(), nullptr, spec_, o));
  ASSERT_OK_AND_ASSIGN(auto gpu, CudaEngine::Create(model.get(), nullptr, spec_, o, {4, 128}));
  CudaPrefillOptions po;
  po.chunk_tokens = chunk;
  EXPECT_EQ(gpu->PrefillChunk(po), chunk > 0 ? chunk : std::min(o.prefill_chunk, max_rows));
  const std::vector<int32_t> prompt = PrefillPrompt();
  std::vector<float> hl, gl;
  ASSERT_OK_AND_ASSIGN(PromptKV kv, host->Prefill(prompt, &hl));
  ASSERT_OK(host->AddSequence("p", kv));
  // "h" takes the host path into the GPU engine and decodes beside the prefilled "p".
  ASSERT_OK(gpu->AddSequence("h", kv));
  ASSERT_OK(gpu->PrefillSequence("p", prompt, po, &gl));
  EXPECT_EQ(gpu->batch(), 2);
  EXPECT_GT(gpu->times().prefill, 0);
  double worst_rel = 0;
  int near_ties = 0;
  ASSERT_EQ(gl.size(), hl.size());
  ExpectClose(gl.data(), hl.data(), -1, "prefill logits", &worst_rel, &near_ties);
  const int V = config_.vocab_size;
  const std::vector<std::string> ids = {"p", "h"};
  int32_t next = Argmax(hl.data(), V);  // teacher-forced: the host's greedy tokens
  for (int step = 0; step < 6; ++step) {
    std::vector<float> hs, gs;
    std::vector<int32_t> gn;
    ASSERT_OK(host->Step({"p"}, {next}, &hs));
    ASSERT_OK(gpu->Step(ids, {next, next}, &gn, &gs));
    for (int i = 0; i < 2; ++i) {
      ExpectClose(gs.data() + i * V, hs.data(), gn[i], absl::StrCat("step ", step, " ", ids[i]),
                  &worst_rel, &near_ties);
    }
    next = Argmax(hs.data(), V);
  }
  std::printf("[ stats    ] worst logits rel L2 vs host: %.3g, near ties %d\n", worst_rel,
              near_ties);
}

INSTANTIATE_TEST_SUITE_P(Chunks, CudaEnginePrefillDenseTest,
                         ::testing::Values(std::pair{32, 0}, std::pair{32, 7}, std::pair{8, 0}));

// GPU prefill in sparse mode (a LocalTier behind RecordingTier), exact with a budget covering
// every candidate (decoding must then match the dense host reference) and ctkvr (the index is
// built from the prompt queries, by the tier or from lists the engine made; decoding only has
// to run). The engine's lists are checked against the indexer's own build over the same keys
// and queries (what the tier received): the same lists but for near ties, normalisers within
// fp32 rounding.
class CudaEnginePrefillSparseTest
    : public CudaEngineTest,
      public ::testing::WithParamInterface<std::pair<client::Method, bool>> {};

TEST_P(CudaEnginePrefillSparseTest, PushesThePromptAndMatchesHostPrefill) {
  ASSERT_OK_AND_ASSIGN(auto model, LoadGpuModel(32));
  EngineOptions o = Options();
  o.method = GetParam().first;
  o.gpu_ctkvr_lists = GetParam().second;
  o.ctkvr_list_size = 12;  // of the 41 tokens [sinks, 45): a real selection
  o.index_queries = 16;  // 16 positions, every 2nd of the last 32 (index_query_window)
  o.index_query_window = 32;
  client::TierOptions to;
  to.recall_buffer_bytes = client::RecallBufferBytes(4 * config_.num_kv_heads, o.budget,
                                                     2 * spec_.row_bytes(), to.staging_areas);
  cuda::PinnedHostRanges pinned;
  client::TierOptions pinned_to = to;
  PinRecallBuffer(&pinned, &pinned_to);
  ASSERT_OK_AND_ASSIGN(auto local, client::CreateLocalTier(
                                       kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, pinned_to));
  RecordingTier tier(local.get());
  ASSERT_OK(tier.RegisterModel(spec_));
  ASSERT_OK_AND_ASSIGN(auto gpu,
                       CudaEngine::Create(model.get(), &tier, spec_, o, {4, 128}, &pinned));
  // The host reference: a sparse engine's Prefill (its PromptKV carries the sampled queries;
  // Prefill does not touch the tier) decoded by a dense engine.
  ASSERT_OK_AND_ASSIGN(auto unused_tier,
                       client::CreateLocalTier(kvstore::NodeOptions{int64_t{64} << 20, 16, 2}, to));
  ASSERT_OK_AND_ASSIGN(auto prefiller, Engine::Create(cpu_.get(), unused_tier.get(), spec_, o));
  EngineOptions dense = Options();
  dense.sparse = false;
  ASSERT_OK_AND_ASSIGN(auto host, Engine::Create(cpu_.get(), nullptr, spec_, dense));
  const std::vector<int32_t> prompt = PrefillPrompt();
  const int64_t T = static_cast<int64_t>(prompt.size());
  std::vector<float> hl, gl;
  ASSERT_OK_AND_ASSIGN(PromptKV kv, prefiller->Prefill(prompt, &hl));
  ASSERT_OK(host->AddSequence("p", kv));
  ASSERT_OK(gpu->PrefillSequence("p", prompt, {}, &gl));
  double worst_rel = 0;
  int near_ties = 0;
  ExpectClose(gl.data(), hl.data(), -1, "prefill logits", &worst_rel, &near_ties);

  // What reached the tier: every layer's K/V of the whole prompt, as the host path sends it.
  const int L = config_.num_layers, Hkv = config_.num_kv_heads, d = config_.head_dim;
  ASSERT_EQ(tier.prompt_appends.count("p"), 1u);
  client::AppendBatch ref;
  ref.num_tokens = T;
  ref.keys.resize(L);
  ref.values.resize(L);
  internal::PromptKvSourceOf(spec_, kv)(&ref);
  for (int l = 0; l < L; ++l) {
    for (bool is_v : {false, true}) {
      const std::vector<float> got = PromptRows(tier.prompt_appends["p"], l, is_v, T, Hkv, d);
      const std::vector<float> want = PromptRows({ref}, l, is_v, T, Hkv, d);
      const Diff diff = Compare(got.data(), want.data(), got.size());
      EXPECT_LE(diff.rel_l2, 1e-2) << "layer " << l << (is_v ? " V" : " K");
      EXPECT_LE(diff.worst, 1.0) << "layer " << l << (is_v ? " V" : " K");  // NaN fails too
    }
  }
  if (o.method == client::Method::kCtkvr) {
    ASSERT_EQ(tier.queries.count("p"), 1u);
    const RecordingTier::Queries& q = tier.queries["p"];
    EXPECT_EQ(kv.query_positions, internal::IndexQueryPositions(o, T));
    // The queries sent: every sampled one, or with lists the centroids picked from them.
    std::vector<int> sent(kv.query_positions.size());
    std::iota(sent.begin(), sent.end(), 0);
    if (o.gpu_ctkvr_lists) {
      sent = indexer::CtkvrCentroidQueries(static_cast<int>(sent.size()), o.ctkvr_centroids);
    }
    EXPECT_EQ(q.num_queries, static_cast<int>(sent.size()));
    ASSERT_EQ(static_cast<int>(q.layers.size()), L - o.dense_layers);
    const size_t qd = static_cast<size_t>(config_.num_heads) * d;
    for (int l = o.dense_layers; l < L; ++l) {
      const std::vector<float>& got = q.layers[l - o.dense_layers];
      std::vector<float> want;
      for (int i : sent)
        want.insert(want.end(), kv.q[l].begin() + i * qd, kv.q[l].begin() + (i + 1) * qd);
      ASSERT_EQ(got.size(), want.size()) << "layer " << l;
      const Diff diff = Compare(got.data(), want.data(), got.size());
      EXPECT_LE(diff.rel_l2, 1e-2) << "queries of layer " << l;
      EXPECT_LE(diff.worst, 1.0) << "queries of layer " << l;
    }
    if (o.gpu_ctkvr_lists) {
      ASSERT_EQ(q.list_size, o.ctkvr_list_size);
      ASSERT_EQ(static_cast<int>(q.list_tokens.size()), L - o.dense_layers);
      ExpectIndexerLists(q, tier.prompt_appends["p"], o, T);
    } else {
      EXPECT_TRUE(q.list_tokens.empty());
    }
  } else {
    EXPECT_EQ(tier.queries.count("p"), 0u);  // exact builds nothing
  }

  const int V = config_.vocab_size;
  int32_t next = Argmax(hl.data(), V);
  for (int step = 0; step < 6; ++step) {
    std::vector<float> hs, gs;
    std::vector<int32_t> gn;
    ASSERT_OK(host->Step({"p"}, {next}, &hs));
    ASSERT_OK(gpu->Step({"p"}, {next}, &gn, &gs));
    if (o.method == client::Method::kExact) {
      ExpectClose(gs.data(), hs.data(), gn[0], absl::StrCat("step ", step), &worst_rel, &near_ties);
    }
    next = Argmax(hs.data(), V);
  }
  EXPECT_GT(gpu->counters().retrieve_calls, 0);
  EXPECT_EQ(gpu->counters().fallback_layers, 0);
  std::printf("[ stats    ] worst logits rel L2 vs host: %.3g, near ties %d\n", worst_rel,
              near_ties);
}

INSTANTIATE_TEST_SUITE_P(Methods, CudaEnginePrefillSparseTest,
                         ::testing::Values(std::pair{client::Method::kExact, false},
                                           std::pair{client::Method::kCtkvr, false},
                                           std::pair{client::Method::kCtkvr, true}));

TEST_F(CudaEngineTest, PrefillRejectsBadPromptsAndFullBatch) {
  EngineOptions o = Options();
  o.sparse = false;
  ASSERT_OK_AND_ASSIGN(auto gpu, CudaEngine::Create(gpu_model_.get(), nullptr, spec_, o, {2, 64}));
  const int V = config_.vocab_size;
  EXPECT_THAT(gpu->PrefillSequence("x", {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(gpu->PrefillSequence("x", {1, V, 2}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(gpu->PrefillSequence("x", {1, -1}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(gpu->PrefillSequence("x", std::vector<int32_t>(64, 1)),
              StatusIs(absl::StatusCode::kInvalidArgument));  // max_context
  CudaPrefillOptions bad;
  bad.chunk_tokens = -1;
  EXPECT_THAT(gpu->PrefillSequence("x", {1, 2}, bad), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(gpu->batch(), 0);
  ASSERT_OK(gpu->PrefillSequence("x", std::vector<int32_t>(63, 1)));  // the longest that fits
  EXPECT_THAT(gpu->PrefillSequence("x", {1, 2}), StatusIs(absl::StatusCode::kAlreadyExists));
  ASSERT_OK(gpu->PrefillSequence("y", {1, 2, 3}));
  EXPECT_THAT(gpu->PrefillSequence("z", {1, 2}), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(gpu->batch(), 2);
  std::vector<int32_t> next;
  ASSERT_OK(gpu->Step({"x", "y"}, {3, 4}, &next));  // "x" at position 63, the last
}

// The argument checks of PrefillSequence, which need no device.
TEST(CudaEnginePrefillArgs, ValidatePrefillPrompt) {
  using internal::ValidatePrefillPrompt;
  const std::vector<int32_t> ok = {0, 5, 255};
  EXPECT_OK(ValidatePrefillPrompt(ok, 256, 4));
  EXPECT_THAT(ValidatePrefillPrompt({}, 256, 4), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePrefillPrompt(std::vector<int32_t>{0, 256}, 256, 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePrefillPrompt(std::vector<int32_t>{-1}, 256, 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePrefillPrompt(ok, 256, 3),  // max_context - 1 tokens at most
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(CudaEnginePrefillArgs, DeviceBytesFollowTheHeaderComment) {
  LlamaConfig c;
  c.num_layers = 32;
  c.hidden_size = 4096;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  EngineOptions o;  // sparse, 2 dense layers
  const int64_t T = 98304;
  const int64_t sparse = CudaEngine::PrefillDeviceBytes(c, o, T, 2048);
  o.sparse = false;
  const int64_t dense = CudaEngine::PrefillDeviceBytes(c, o, T, 2048);
  EXPECT_EQ(sparse - dense, 2 * 2 * T * 1024 * 2);  // two layers' K/V scratch
  EXPECT_NEAR(static_cast<double>(sparse), 2.46e9, 0.02e9);
}

TEST_F(CudaEngineTest, RejectsBadLimitsAndFullBatch) {
  EngineOptions o = Options();
  o.sparse = false;
  EXPECT_THAT(CudaEngine::Create(gpu_model_.get(), nullptr, spec_, o, {9, 128}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));  // more rows than the model's scratch
  ASSERT_OK_AND_ASSIGN(auto gpu, CudaEngine::Create(gpu_model_.get(), nullptr, spec_, o, {1, 64}));
  EXPECT_THAT(gpu->AddSyntheticSequence("x", 64, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(gpu->AddSyntheticSequence("x", 63, 1));
  EXPECT_THAT(gpu->AddSyntheticSequence("y", 10, 1),
              StatusIs(absl::StatusCode::kResourceExhausted));
  std::vector<int32_t> next;
  ASSERT_OK(gpu->Step({"x"}, {3}, &next));  // position 63, the last
  EXPECT_THAT(gpu->Step({"x"}, {3}, &next),
              StatusIs(absl::StatusCode::kFailedPrecondition));  // max_context
}

}  // namespace
}  // namespace kvrecall::worker
