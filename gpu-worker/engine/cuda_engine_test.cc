// The GPU-resident engine against the host Engine on the cpu backend (fp32 everywhere but the
// bf16 K/V), on the make-model preset "tiny" (4 layers, 4 q / 2 kv heads, head_dim 64): the
// prompts are prefilled by the host Engine (the GPU engine has no prefill) and uploaded, then
// both decode the same tokens (teacher-forced: the host's greedy choices) and their logits are
// compared every step within bf16 tolerance (relative L2 <= 1e-2 and every element within
// 4u|ref| + 0.05 rms(ref), u = 2^-8, as cuda_backend_test).
//   Dense: every layer's KV on the device, DecodeAttention.
//   Sparse, method exact with a budget covering every candidate: sinks + window + recalled rows
//   attend to the same tokens as dense, so the logits must match the same dense reference;
//   with and without lookahead (a full-budget exact selection does not depend on the query).
// Three sequences decode together; one leaves mid-way (its batch row is refilled by the last).
// GPU tests skip where no CUDA device is found.
#include "gpu-worker/engine/cuda_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gpu-worker/backends/backend.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/make_model.h"
#include "gpu-worker/model/safetensors.h"
#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;

bool HasGpu() {
  static const bool has = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return has;
}

struct Diff {
  double rel_l2 = 0;
  double worst = 0;  // max |a - r| / (4u |r| + 0.05 rms(r)); <= 1 passes
};

Diff Compare(const float* a, const float* r, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (double{a[i]} - r[i]) * (double{a[i]} - r[i]);
    den += double{r[i]} * r[i];
  }
  const double rms = std::sqrt(den / std::max<size_t>(n, 1));
  Diff d;
  d.rel_l2 = std::sqrt(num / std::max(den, 1e-30));
  for (size_t i = 0; i < n; ++i) {
    const double tol = 4.0 / 256 * std::fabs(r[i]) + 0.05 * rms;
    d.worst = std::max(d.worst, std::fabs(double{a[i]} - r[i]) / tol);
  }
  return d;
}

int Argmax(const float* x, int n) { return static_cast<int>(std::max_element(x, x + n) - x); }

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
    ASSERT_OK_AND_ASSIGN(auto ckpt, SafetensorsCheckpoint::Open(dir_));
    ASSERT_OK_AND_ASSIGN(gpu_model_, cuda::CudaModel::Load(config_, *ckpt, 8));
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

class CudaEngineSparseTest : public CudaEngineTest, public ::testing::WithParamInterface<bool> {};

TEST_P(CudaEngineSparseTest, ExactFullBudgetMatchesDense) {
  EngineOptions o = Options();
  o.lookahead = GetParam();
  client::TierOptions to;
  to.staging_areas = o.lookahead ? config_.num_layers - o.dense_layers : 1;
  to.recall_buffer_bytes = client::RecallBufferBytes(4 * config_.num_kv_heads, o.budget,
                                                     2 * spec_.row_bytes(), to.staging_areas);
  ASSERT_OK_AND_ASSIGN(
      auto tier, client::CreateLocalTier(kvstore::NodeOptions{int64_t{256} << 20, 16, 2}, to));
  ASSERT_OK(tier->RegisterModel(spec_));
  ASSERT_OK_AND_ASSIGN(auto gpu,
                       CudaEngine::Create(gpu_model_.get(), tier.get(), spec_, o, {4, 128}));
  Run(gpu.get(), 8);
  const EngineCounters& c = gpu->counters();
  EXPECT_GT(c.retrieve_calls, 0);
  EXPECT_GT(c.recalled_rows, 0);
  EXPECT_LT(c.streamed_rows, c.recalled_rows);  // delta streaming: resident rows are not resent
  EXPECT_EQ(c.fallback_layers, 0);
}

INSTANTIATE_TEST_SUITE_P(Lookahead, CudaEngineSparseTest, ::testing::Bool());

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
