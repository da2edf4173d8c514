#include "gpu-worker/engine/engine.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "gpu-worker/engine/qk_dumper.h"
#include "gpu-worker/model/make_model.h"
#include "indexer/qk_dump.h"

namespace kvrecall::worker {
namespace {

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Once per process, here rather than in SetUpTestSuite (whose failures read as "skipped").
    if (dir_ == nullptr) {
      dir_ = new std::string(::testing::TempDir() + "/engine_test_model." + std::to_string(getpid()));
      ASSERT_OK_AND_ASSIGN(LlamaConfig cfg, PresetConfig("tiny"));
      ASSERT_OK(WriteRandomModel(*dir_, cfg, 7));
    }
    ASSERT_OK_AND_ASSIGN(model_, CreateBackend("cpu", *dir_, 2));
    const LlamaConfig& c = model_->config();
    spec_ = ModelSpec{"tiny", c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.dtype, c.vocab_size,
                      c.rope_theta};
    ASSERT_OK_AND_ASSIGN(tier_, client::CreateLocalTier(kvstore::NodeOptions{int64_t{1} << 30, 16, 2}, {}));
    ASSERT_OK(tier_->RegisterModel(spec_));
    for (int i = 0; i < 300; ++i) prompt_.push_back((i * 37 + 11) % 256);
  }

  EngineOptions Options(int budget) {
    EngineOptions o;
    o.sink_tokens = 4;
    o.window_tokens = 16;
    o.budget = budget;
    o.prefill_chunk = 64;
    o.num_threads = 2;
    return o;
  }

  // Decodes `steps` tokens greedily with `sparse`, teacher-forcing `dense` on the same tokens.
  void Run(Engine* sparse, Engine* dense, int steps, float* max_diff, int* mismatches) {
    std::vector<float> ls, ld;
    ASSERT_OK_AND_ASSIGN(PromptKV kv, sparse->Prefill(prompt_, &ls));
    ASSERT_OK(sparse->AddSequence("s", kv));
    ASSERT_OK(dense->AddSequence("s", kv));
    ld = ls;
    const std::string id = "s";
    *max_diff = 0;
    *mismatches = 0;
    for (int t = 0; t < steps; ++t) {
      const int32_t next = static_cast<int32_t>(std::max_element(ls.begin(), ls.end()) - ls.begin());
      *mismatches += next != static_cast<int32_t>(std::max_element(ld.begin(), ld.end()) - ld.begin());
      ASSERT_OK(sparse->Step({&id, 1}, {&next, 1}, &ls));
      ASSERT_OK(dense->Step({&id, 1}, {&next, 1}, &ld));
      for (size_t j = 0; j < ls.size(); ++j) *max_diff = std::max(*max_diff, std::fabs(ls[j] - ld[j]));
    }
  }

  static std::string* dir_;
  std::unique_ptr<ModelBackend> model_;
  ModelSpec spec_;
  std::unique_ptr<client::Tier> tier_;
  std::vector<int32_t> prompt_;
};
std::string* EngineTest::dir_ = nullptr;

TEST_F(EngineTest, SparseWithFullBudgetEqualsDenseExactly) {
  ASSERT_OK_AND_ASSIGN(auto sparse, Engine::Create(model_.get(), tier_.get(), spec_, Options(4096)));
  EngineOptions d = Options(4096);
  d.sparse = false;
  ASSERT_OK_AND_ASSIGN(auto dense, Engine::Create(model_.get(), nullptr, spec_, d));
  float max_diff;
  int mismatches;
  Run(sparse.get(), dense.get(), 6, &max_diff, &mismatches);
  EXPECT_EQ(max_diff, 0.0f);
  EXPECT_EQ(mismatches, 0);
  // Two sparse layers x 2 kv-heads recall every middle token each step.
  EXPECT_EQ(sparse->counters().retrieve_calls, 6 * 2);
  EXPECT_GT(sparse->counters().recalled_rows, 6 * 2 * 2 * 270);
}

TEST_F(EngineTest, SmallBudgetRecallsOnlyTheBudget) {
  ASSERT_OK_AND_ASSIGN(auto sparse, Engine::Create(model_.get(), tier_.get(), spec_, Options(8)));
  EngineOptions d = Options(8);
  d.sparse = false;
  ASSERT_OK_AND_ASSIGN(auto dense, Engine::Create(model_.get(), nullptr, spec_, d));
  float max_diff;
  int mismatches;
  Run(sparse.get(), dense.get(), 4, &max_diff, &mismatches);
  EXPECT_EQ(sparse->counters().recalled_rows, 4 * 2 * 2 * 8);
  EXPECT_GT(max_diff, 0.0f) << "8 of ~280 middle tokens cannot reproduce dense attention exactly";
  EXPECT_TRUE(std::isfinite(max_diff));
}

TEST_F(EngineTest, DumpsTheQkvItRanInTheIndexerFormat) {
  QkDumper dumper(model_->config(), "s");
  EngineOptions o = Options(8);
  o.observer = &dumper;
  ASSERT_OK_AND_ASSIGN(auto sparse, Engine::Create(model_.get(), tier_.get(), spec_, o));
  std::vector<float> logits;
  ASSERT_OK_AND_ASSIGN(PromptKV kv, sparse->Prefill(prompt_, &logits));
  ASSERT_OK(sparse->AddSequence("s", kv));
  const std::string id = "s";
  const int32_t next = 5;
  ASSERT_OK(sparse->Step({&id, 1}, {&next, 1}, &logits));
  const std::string dir = ::testing::TempDir() + "/qk_dump." + std::to_string(getpid());
  ASSERT_OK(dumper.Write(dir, "tiny", 300, DType::kF32));
  ASSERT_OK_AND_ASSIGN(indexer::QkDumpHeader h, indexer::ReadQkDumpHeader(dir));
  EXPECT_EQ(h.tokens, 301);
  EXPECT_EQ(h.prompt_tokens, 300);
  ASSERT_OK_AND_ASSIGN(indexer::QkDumpLayer layer, indexer::ReadQkDumpLayer(dir, h, 3));
  // The dumped keys are the keys the engine stored: compare the prompt's layer-3 KV.
  const int kvh = spec_.num_kv_heads, d = spec_.head_dim;
  for (int t : {0, 150, 299}) {
    for (int hh = 0; hh < kvh; ++hh) {
      for (int j = 0; j < d; ++j) {
        ASSERT_EQ(layer.k[(static_cast<size_t>(hh) * 301 + t) * d + j], kv.k[3][(static_cast<size_t>(t) * kvh + hh) * d + j]);
      }
    }
  }
}

TEST_F(EngineTest, RejectsBadInput) {
  ASSERT_OK_AND_ASSIGN(auto sparse, Engine::Create(model_.get(), tier_.get(), spec_, Options(8)));
  std::vector<float> logits;
  EXPECT_THAT(sparse->Prefill({}, &logits), ::kvrecall::testing::StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<int32_t> bad = {1, 2, 100000};
  EXPECT_THAT(sparse->Prefill(bad, &logits), ::kvrecall::testing::StatusIs(absl::StatusCode::kInvalidArgument));
  const std::string id = "nope";
  const int32_t tok = 1;
  EXPECT_THAT(sparse->Step({&id, 1}, {&tok, 1}, &logits), ::kvrecall::testing::StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(Engine::Create(model_.get(), nullptr, spec_, Options(8)),
              ::kvrecall::testing::StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::worker
