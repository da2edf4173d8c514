// Tensor parallelism (tp_engine.h) against one GPU, on the make-model presets "tiny" (Llama-3
// style, 4 q / 2 kv heads) and "tiny-qwen2" (q/k/v bias, tied embeddings): the same checkpoint
// split over 2 ranks (one kv-head and half the MLP each) and whole on 1 (TensorParallelModel
// of world 1, which is the single-GPU CudaEngine) prefill the same two prompts and decode
// together, the 2-GPU engine teacher-forced on the 1-GPU engine's greedy tokens. Every step's
// logits agree within bf16 tolerance (testing/logits_compare.h) and the greedy tokens are the
// same wherever the 1-GPU logits are decisive; the free-running continuations are compared too.
// Dense, and sparse over a LocalTier per rank with a budget below the candidates (so the ranks'
// selections are real), with and without lookahead.
//
// Faults: a rank whose tier fails mid-step (an error that is not a tier miss) must not leave the
// other rank waiting in an all-reduce: the step fails on both, naming the rank, and is retried
// on a new NCCL group with the same result as an undisturbed run.
//
// Each case runs with NCCL (2 GPUs; skipped with fewer) and with the host-memory collective
// (both ranks on one GPU when there is only one); the argument checks run everywhere.
#include "gpu-worker/engine/tp_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/testing/forwarding_tier.h"
#include "client/tier.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gpu-worker/engine/testing/logits_compare.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/make_model.h"
#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;
using ::kvrecall::worker::testing::Argmax;
using ::kvrecall::worker::testing::Compare;
using ::kvrecall::worker::testing::Decisive;
using ::testing::HasSubstr;

int Gpus() {
  static const int n = [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
  }();
  return n;
}

// Forwards every call; Retrieve call `fail_call` (from 1) answers INTERNAL, which the engine
// does not take for a tier miss.
class FailingRetrieveTier final : public client::testing::ForwardingTier {
 public:
  explicit FailingRetrieveTier(client::Tier* inner) : ForwardingTier(inner) {}
  void FailRetrieve(int call) { fail_call_ = call; }
  absl::Status Retrieve(const client::RetrieveBatch& batch,
                        std::vector<client::Recalled>* out) override {
    if (++calls_ == fail_call_) return absl::InternalError("injected: the tier lost its index");
    return inner()->Retrieve(batch, out);
  }

 private:
  int calls_ = 0, fail_call_ = 0;
};

// One engine (world 1 or 2) with its tiers.
struct Rig {
  std::unique_ptr<TensorParallelModel> model;
  cuda::PinnedHostRanges pinned;  // before the tiers: they unpin into it
  std::vector<std::unique_ptr<client::Tier>> tiers;
  std::vector<std::unique_ptr<FailingRetrieveTier>> failing;
  std::unique_ptr<TensorParallelEngine> engine;
  ~Rig() {
    engine.reset();
    failing.clear();
    tiers.clear();
  }
};

// (preset, mode, collective); mode: 0 dense, 1 sparse, 2 sparse with lookahead.
using Param = std::tuple<std::string, int, std::string>;

class TensorParallelTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    const auto& [preset, mode, collective] = GetParam();
    if (Gpus() < 1) GTEST_SKIP() << "no CUDA device";
    if (collective == "nccl" && Gpus() < 2) {
      GTEST_SKIP() << "NCCL needs 2 CUDA devices, found " << Gpus();
    }
    collective_ = collective;
    dir_ = absl::StrCat(::testing::TempDir(), "/tp_engine_test_", preset);
    ASSERT_OK_AND_ASSIGN(config_, PresetConfig(preset));
    ASSERT_OK(WriteRandomModel(dir_, config_, 11));
    spec_ = SpecOf(config_, preset);
    options_.sparse = mode > 0;
    options_.lookahead = mode == 2;
    options_.sink_tokens = 4;
    options_.window_tokens = 8;
    options_.budget = 12;  // below the candidates of both prompts: the tier selects
    options_.dense_layers = 1;
    options_.method = client::Method::kExact;
    options_.prefill_chunk = 16;
    options_.num_threads = 2;
  }

  absl::Status Make(int world, Rig* s, bool failing_tiers = false) {
    ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::Open(dir_));
    ASSIGN_OR_RETURN(s->model, TensorParallelModel::Load(config_, *ckpt, {world, collective_}, 16));
    std::vector<client::Tier*> tiers(world, nullptr);
    if (options_.sparse) {
      for (int r = 0; r < world; ++r) {
        client::TierOptions to;
        to.staging_areas = config_.num_layers;
        to.recall_buffer_bytes = client::RecallBufferBytes(
            2 * config_.num_kv_heads, options_.budget, 2 * spec_.row_bytes(), to.staging_areas);
        PinRecallBuffer(&s->pinned, &to);
        ASSIGN_OR_RETURN(
            auto tier, client::CreateLocalTier(kvstore::NodeOptions{int64_t{64} << 20, 16, 2}, to));
        tiers[r] = tier.get();
        s->tiers.push_back(std::move(tier));
        if (failing_tiers) {
          s->failing.push_back(std::make_unique<FailingRetrieveTier>(tiers[r]));
          tiers[r] = s->failing.back().get();
        }
      }
    }
    ASSIGN_OR_RETURN(s->engine, TensorParallelEngine::Create(s->model.get(), tiers, spec_, options_,
                                                             {2, 128}, &s->pinned));
    return absl::OkStatus();
  }

  std::vector<int32_t> Prompt(int n, int salt) const {
    std::vector<int32_t> p;
    for (int i = 0; i < n; ++i) p.push_back((i * 37 + 11 * salt) % config_.vocab_size);
    return p;
  }

  // Both prompts into `e`; *next gets their first tokens.
  void Prefill(TensorParallelEngine* e, std::vector<int32_t>* next,
               std::vector<std::vector<float>>* logits) {
    logits->assign(2, {});
    next->assign(2, 0);
    for (int i = 0; i < 2; ++i) {
      ASSERT_OK(e->PrefillSequence(ids_[i], Prompt(45 - 7 * i, i + 1), {}, &(*logits)[i]));
      (*next)[i] = Argmax((*logits)[i].data(), config_.vocab_size);
    }
  }

  // The two engines' logits of n sequences ([n][vocab] each) and their greedy tokens.
  void ExpectSame(const float* two, const float* one, int n, const std::string& what) {
    const int V = config_.vocab_size;
    for (int i = 0; i < n; ++i) {
      const testing::Diff d = Compare(two + i * V, one + i * V, V);
      EXPECT_LE(d.rel_l2, 1e-2) << what << " seq " << i;
      EXPECT_LE(d.worst, 1.0) << what << " seq " << i;
      if (Decisive(one + i * V, V)) {
        EXPECT_EQ(Argmax(two + i * V, V), Argmax(one + i * V, V)) << what << " seq " << i;
      } else {
        ++near_ties_;
      }
    }
  }

  std::string dir_, collective_;
  LlamaConfig config_;
  ModelSpec spec_;
  EngineOptions options_;
  const std::vector<std::string> ids_ = {"a", "b"};
  int near_ties_ = 0;
};

TEST_P(TensorParallelTest, TwoGpusDecodeTheSameTokensAsOne) {
  Rig one, two;
  ASSERT_OK(Make(1, &one));
  ASSERT_OK(Make(2, &two));
  std::vector<int32_t> next1, next2;
  std::vector<std::vector<float>> l1, l2;
  Prefill(one.engine.get(), &next1, &l1);
  Prefill(two.engine.get(), &next2, &l2);
  for (int i = 0; i < 2; ++i) ExpectSame(l2[i].data(), l1[i].data(), 1, absl::StrCat("prompt ", i));
  EXPECT_EQ(next2, next1);

  // Teacher-forced on the 1-GPU tokens, and free-running.
  std::vector<int32_t> forced = next1, free1 = next1, free2 = next2;
  std::vector<float> logits1, logits2;
  for (int step = 0; step < 16; ++step) {
    ASSERT_OK(one.engine->Step(ids_, forced, &next1, &logits1));
    ASSERT_OK(two.engine->Step(ids_, forced, &next2, &logits2));
    ExpectSame(logits2.data(), logits1.data(), 2, absl::StrCat("step ", step));
    forced = next1;
    free1.insert(free1.end(), next1.begin(), next1.end());
    free2.insert(free2.end(), next2.begin(), next2.end());
  }
  EXPECT_EQ(free2, free1) << "near ties: " << near_ties_;
  if (options_.sparse) {
    for (int r = 0; r < 2; ++r) {
      const EngineCounters& c = two.engine->rank(r).counters();
      EXPECT_GT(c.retrieve_calls, 0) << "rank " << r;
      EXPECT_GT(c.recalled_rows, 0) << "rank " << r;
      EXPECT_EQ(c.fallback_layers, 0) << "rank " << r;
    }
    // Each rank stored and retrieved its own kv-head: half of the 1-GPU engine's rows.
    EXPECT_EQ(two.engine->rank(0).counters().recalled_rows,
              one.engine->rank(0).counters().recalled_rows / 2);
  }
  for (const std::string& id : ids_) {
    ASSERT_OK(one.engine->RemoveSequence(id));
    ASSERT_OK(two.engine->RemoveSequence(id));
  }
  EXPECT_EQ(two.engine->batch(), 0);
}

TEST_P(TensorParallelTest, ARankFailingMidStepFailsTheStepOnEveryRankAndItRetries) {
  if (std::get<1>(GetParam()) != 1) GTEST_SKIP() << "sparse without lookahead only";
  Rig one, two;
  ASSERT_OK(Make(1, &one));
  ASSERT_OK(Make(2, &two, /*failing_tiers=*/true));
  std::vector<int32_t> next1, next2;
  std::vector<std::vector<float>> l1, l2;
  Prefill(one.engine.get(), &next1, &l1);
  Prefill(two.engine.get(), &next2, &l2);
  std::vector<float> logits1, logits2;
  ASSERT_OK(one.engine->Step(ids_, next1, &next1, &logits1));
  ASSERT_OK(two.engine->Step(ids_, next2, &next2, &logits2));
  // Rank 1's first sparse layer fails in the next step, after rank 0 went ahead to the
  // layer's all-reduce. Without the abort, rank 0 would wait there for ever.
  const int sparse_layers = config_.num_layers - options_.dense_layers;
  two.failing[1]->FailRetrieve(sparse_layers + 1);
  const std::vector<int32_t> tokens = next2;
  const absl::Status failed = two.engine->Step(ids_, tokens, &next2, &logits2);
  EXPECT_THAT(failed, StatusIs(absl::StatusCode::kInternal));
  EXPECT_THAT(std::string(failed.message()), HasSubstr("rank 1"));
  // Both ranks failed, so they stay at one position and the step can be retried.
  ASSERT_OK(two.engine->Step(ids_, tokens, &next2, &logits2));
  ASSERT_OK(one.engine->Step(ids_, next1, &next1, &logits1));
  ExpectSame(logits2.data(), logits1.data(), 2, "retried step");
}

std::string CaseName(const ::testing::TestParamInfo<Param>& info) {
  static const char* kModes[] = {"dense", "sparse", "lookahead"};
  std::string name = std::get<0>(info.param);
  std::replace(name.begin(), name.end(), '-', '_');
  return name + "_" + kModes[std::get<1>(info.param)] + "_" + std::get<2>(info.param);
}

INSTANTIATE_TEST_SUITE_P(Presets, TensorParallelTest,
                         ::testing::Combine(::testing::Values("tiny", "tiny-qwen2"),
                                            ::testing::Values(0, 1, 2),
                                            ::testing::Values("nccl", "host")),
                         CaseName);

// Argument checks that need no device.
TEST(TensorParallelArgsTest, RefusesSplitsThatCutAGqaGroupOrTheMlp) {
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, PresetConfig("tiny"));  // 2 kv-heads
  const absl::Status three = TensorParallelModel::Random(c, 1, {3}, 4).status();
  EXPECT_THAT(three, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(three.message()), HasSubstr("multiples"));
  EXPECT_THAT(TensorParallelModel::Random(c, 1, {0}, 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(TensorParallelModel::Random(c, 1, {2, "mpi"}, 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  if (Gpus() < 2) {
    EXPECT_THAT(TensorParallelModel::Random(c, 1, {2}, 4),
                StatusIs(absl::StatusCode::kFailedPrecondition));
  }
}

}  // namespace
}  // namespace kvrecall::worker
