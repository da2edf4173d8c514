#include "gpu-worker/engine/engine.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <set>

#include "client/testing/failing_appends.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gpu-worker/engine/qk_dumper.h"
#include "gpu-worker/model/make_model.h"
#include "gtest/gtest.h"
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
    ASSERT_OK_AND_ASSIGN(tier_, NewTier());
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

  // An in-process tier with the model registered.
  absl::StatusOr<std::unique_ptr<client::Tier>> NewTier(const client::TierOptions& options = {}) {
    ASSIGN_OR_RETURN(std::unique_ptr<client::Tier> tier,
                     client::CreateLocalTier(kvstore::NodeOptions{int64_t{1} << 30, 16, 2}, options));
    RETURN_IF_ERROR(tier->RegisterModel(spec_));
    return tier;
  }

  // The dense reference engine.
  absl::StatusOr<std::unique_ptr<Engine>> Dense(int budget) {
    EngineOptions d = Options(budget);
    d.sparse = false;
    return Engine::Create(model_.get(), nullptr, spec_, d);
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

// ctkvr's prompt queries: evenly spaced over the last index_query_window positions, ending at the
// last one (the GPU engine's PrefillSequence samples the same positions).
TEST(IndexQueryPositionsTest, EvenlySpacedOverTheWindowEndingAtTheLastToken) {
  EngineOptions o;
  o.index_queries = 4;
  o.index_query_window = 16;
  EXPECT_EQ(internal::IndexQueryPositions(o, 100), (std::vector<int32_t>{87, 91, 95, 99}));
  EXPECT_EQ(internal::IndexQueryPositions(o, 3), (std::vector<int32_t>{0, 1, 2}));
}

// Sessions over one document: a source that answers with the document's queries once the
// prompt adopted its prefix makes the tier build the index once for both.
TEST_F(EngineTest, PromptsOverOneDocumentAskForOneSharedIndex) {
  EngineOptions o = Options(64);
  o.method = client::Method::kCtkvr;
  const internal::PromptKvSource zeros = [&](client::AppendBatch* b) {
    for (int l = 0; l < spec_.num_layers; ++l) {
      for (auto* rows : {&b->keys[l], &b->values[l]}) {
        rows->assign(static_cast<size_t>(spec_.num_kv_heads * b->num_tokens) * spec_.row_bytes(),
                     0);
        for (size_t i = 0; i < rows->size(); i += 7)
          (*rows)[i] = static_cast<uint8_t>(b->token_start + i);
      }
    }
  };
  const int nq = 4, sparse_layers = spec_.num_layers - o.dense_layers;
  auto queries = [&](float v) {
    return std::vector<float>(static_cast<size_t>(nq) * spec_.num_q_heads * spec_.head_dim, v);
  };
  const std::vector<float> document_q = queries(0.5f), own_q = queries(0.25f);
  std::vector<int64_t> adopted;
  const internal::IndexQuerySource source =
      [&](int64_t a) -> absl::StatusOr<internal::IndexQueries> {
    adopted.push_back(a);
    internal::IndexQueries q{256, nq, {}};
    for (int l = 0; l < sparse_layers; ++l) q.layers.push_back(document_q);
    return q;
  };
  std::vector<int32_t> a(prompt_.begin(), prompt_.begin() + 256), b = a;
  for (int i = 0; i < 44; ++i) {
    a.push_back(1 + i);
    b.push_back(100 + i);
  }
  double seconds = 0;
  ASSERT_OK(internal::PushPromptToTier(tier_.get(), spec_, o, "a", a, zeros, source, &seconds));
  ASSERT_OK(internal::PushPromptToTier(tier_.get(), spec_, o, "b", b, zeros, source, &seconds));
  EXPECT_EQ(adopted, (std::vector<int64_t>{0, 256}));
  ASSERT_OK_AND_ASSIGN(kvstore::NodeStats stats, tier_->Stats(false));
  EXPECT_EQ(stats.index.builds, 1);
  EXPECT_EQ(stats.index.shared_installs, 1);
  EXPECT_EQ(stats.index.shared, 1);

  // A source whose range leaves the prompt is refused before anything is built.
  const internal::IndexQuerySource beyond = [&](int64_t) -> absl::StatusOr<internal::IndexQueries> {
    internal::IndexQueries q{301, nq, {}};
    for (int l = 0; l < sparse_layers; ++l) q.layers.push_back(own_q);
    return q;
  };
  EXPECT_THAT(internal::PushPromptToTier(tier_.get(), spec_, o, "c", a, zeros, beyond, &seconds),
              testing::StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(EngineTest, SparseWithFullBudgetEqualsDenseExactly) {
  ASSERT_OK_AND_ASSIGN(auto sparse, Engine::Create(model_.get(), tier_.get(), spec_, Options(4096)));
  ASSERT_OK_AND_ASSIGN(auto dense, Dense(4096));
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
  ASSERT_OK_AND_ASSIGN(auto dense, Dense(8));
  float max_diff;
  int mismatches;
  Run(sparse.get(), dense.get(), 4, &max_diff, &mismatches);
  EXPECT_EQ(sparse->counters().recalled_rows, 4 * 2 * 2 * 8);
  EXPECT_GT(max_diff, 0.0f) << "8 of ~280 middle tokens cannot reproduce dense attention exactly";
  EXPECT_TRUE(std::isfinite(max_diff));
}

TEST_F(EngineTest, DeltaStreamingSendsOnlyNewRowsAndChangesNothing) {
  // Two tiers, so both engines can hold sequence "s".
  ASSERT_OK_AND_ASSIGN(auto other_tier, NewTier());
  EngineOptions full = Options(64);
  full.delta_streaming = false;
  ASSERT_OK_AND_ASSIGN(auto delta, Engine::Create(model_.get(), tier_.get(), spec_, Options(64)));
  ASSERT_OK_AND_ASSIGN(auto resend, Engine::Create(model_.get(), other_tier.get(), spec_, full));
  float max_diff;
  int mismatches;
  Run(delta.get(), resend.get(), 8, &max_diff, &mismatches);
  EXPECT_EQ(max_diff, 0.0f) << "the slot caches must hold exactly the rows a full resend delivers";
  EXPECT_EQ(resend->counters().streamed_rows, resend->counters().recalled_rows);
  EXPECT_EQ(delta->counters().recalled_rows, resend->counters().recalled_rows);
  // The first step sends everything; later steps only what changed (a random-weight model's
  // queries drift a lot, so this is a weak bound; bench/stream measures real drift).
  EXPECT_LT(delta->counters().streamed_rows, delta->counters().recalled_rows);
  EXPECT_EQ(tier_->counters().rows_received, delta->counters().streamed_rows);
}

TEST_F(EngineTest, LookaheadWithFullBudgetEqualsDenseExactly) {
  // With a budget covering every candidate the selection does not depend on the queries, so
  // selecting from the previous step's queries changes nothing.
  client::TierOptions to;
  to.staging_areas = 2;  // one per sparse layer
  ASSERT_OK_AND_ASSIGN(auto tier, NewTier(to));
  EngineOptions o = Options(4096);
  o.lookahead = true;
  ASSERT_OK_AND_ASSIGN(auto sparse, Engine::Create(model_.get(), tier.get(), spec_, o));
  ASSERT_OK_AND_ASSIGN(auto dense, Dense(4096));
  float max_diff;
  int mismatches;
  Run(sparse.get(), dense.get(), 6, &max_diff, &mismatches);
  EXPECT_EQ(max_diff, 0.0f);
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(sparse->counters().retrieve_calls, 6 * 2);
  EXPECT_EQ(sparse->counters().fallback_layers, 0);
}

// A tier whose Retrieve fails with a chosen status on chosen calls (1-based), else forwards.
class FaultyTier final : public client::Tier {
 public:
  FaultyTier(client::Tier* inner, std::set<int> failing, absl::Status failure)
      : inner_(inner), failing_(std::move(failing)), failure_(std::move(failure)) {}
  absl::Status RegisterModel(const ModelSpec& spec) override { return inner_->RegisterModel(spec); }
  absl::StatusOr<client::OpenResult> OpenSequence(const std::string& id, const std::string& model,
                                                  absl::Span<const int32_t> tokens) override {
    return inner_->OpenSequence(id, model, tokens);
  }
  absl::Status AppendKV(const std::string& id, const client::AppendBatch& b) override { return inner_->AppendKV(id, b); }
  // AppendKVBatch call `call` (from 1) stores every sequence but `sequence_id`, and fails.
  void FailAppendOnce(int call, std::string sequence_id) {
    appends_.FailOnce(call, std::move(sequence_id));
  }
  absl::Status AppendKVBatch(absl::Span<const client::SequenceAppend> appends,
                             std::vector<bool>* stored) override {
    return appends_.AppendKVBatch(inner_, appends, stored);
  }
  absl::Status Retrieve(const client::RetrieveBatch& batch, std::vector<client::Recalled>* out) override {
    ++calls_;
    if (failing_.count(calls_)) {
      // Like a reply lost after the tier did its work: the tier's mirror moved on, the caller's
      // slots did not.
      std::vector<client::Recalled> lost;
      EXPECT_OK(inner_->Retrieve(batch, &lost));
      return failure_;
    }
    return inner_->Retrieve(batch, out);
  }
  absl::StatusOr<kvstore::BuildIndexOutcome> BuildIndex(const std::string& id, kvstore::BuildIndexArgs a) override {
    return inner_->BuildIndex(id, std::move(a));
  }
  absl::Status CloseSequence(const std::string& id, bool drop) override { return inner_->CloseSequence(id, drop); }
  absl::StatusOr<kvstore::NodeStats> Stats(bool s) override { return inner_->Stats(s); }
  client::TierCounters counters() const override { return inner_->counters(); }
  std::string Describe() const override { return "faulty"; }

 private:
  client::Tier* inner_;
  std::set<int> failing_;
  absl::Status failure_;
  int calls_ = 0;
  client::testing::FailingAppends appends_;
};

TEST_F(EngineTest, MissedDeadlineFallsBackToResidentRowsAndRecovers) {
  ASSERT_OK_AND_ASSIGN(auto other_tier, NewTier());
  // Call 4 is step 2's last layer: its fallback changes step 2's logits but no stored K/V (the
  // layer's K/V are computed before its attention), so every later step must match the steady
  // engine exactly, which it can only do if the lost call's rows are never assumed resident.
  FaultyTier faulty(tier_.get(), {4}, absl::DeadlineExceededError("tier too slow"));
  ASSERT_OK_AND_ASSIGN(auto flaky, Engine::Create(model_.get(), &faulty, spec_, Options(64)));
  ASSERT_OK_AND_ASSIGN(auto steady, Engine::Create(model_.get(), other_tier.get(), spec_, Options(64)));
  std::vector<float> lf, ls;
  ASSERT_OK_AND_ASSIGN(PromptKV kv, flaky->Prefill(prompt_, &lf));
  ASSERT_OK(flaky->AddSequence("s", kv));
  ASSERT_OK(steady->AddSequence("s", kv));
  const std::string id = "s";
  for (int t = 0; t < 5; ++t) {
    const int32_t next = 17 + t;
    ASSERT_OK(flaky->Step({&id, 1}, {&next, 1}, &lf));
    ASSERT_OK(steady->Step({&id, 1}, {&next, 1}, &ls));
    float diff = 0;
    for (size_t j = 0; j < lf.size(); ++j) diff = std::max(diff, std::fabs(lf[j] - ls[j]));
    if (t == 1) {
      EXPECT_GT(diff, 0.0f) << "step 2 ran on the previous step's rows";
    } else {
      EXPECT_EQ(diff, 0.0f) << "step " << t + 1 << " must see exactly the tier's selection again";
    }
  }
  EXPECT_EQ(flaky->counters().fallback_layers, 1);
}

// A step whose appends failed for one sequence fails; retried, it sends only that sequence's
// token (the tier refuses a token twice), and decoding goes on exactly as if nothing happened.
TEST_F(EngineTest, AStepRetriedAfterAPartialAppendFailureSendsOnlyWhatWasNotStored) {
  ASSERT_OK_AND_ASSIGN(auto other_tier, NewTier());
  FaultyTier faulty(tier_.get(), {}, absl::OkStatus());
  faulty.FailAppendOnce(2, "b");
  ASSERT_OK_AND_ASSIGN(auto flaky, Engine::Create(model_.get(), &faulty, spec_, Options(32)));
  ASSERT_OK_AND_ASSIGN(auto steady,
                       Engine::Create(model_.get(), other_tier.get(), spec_, Options(32)));
  std::vector<float> lf, ls;
  ASSERT_OK_AND_ASSIGN(PromptKV kv, flaky->Prefill(prompt_, &lf));
  const std::vector<std::string> ids = {"a", "b"};
  for (const std::string& id : ids) {
    ASSERT_OK(flaky->AddSequence(id, kv));
    ASSERT_OK(steady->AddSequence(id, kv));
  }
  for (int t = 0; t < 5; ++t) {
    const std::vector<int32_t> next = {17 + t, 40 + t};
    if (t == 1) {
      EXPECT_THAT(flaky->Step(ids, next, &lf),
                  ::kvrecall::testing::StatusIs(absl::StatusCode::kUnavailable));
    }
    ASSERT_OK(flaky->Step(ids, next, &lf)) << "step " << t + 1;
    ASSERT_OK(steady->Step(ids, next, &ls));
    EXPECT_EQ(lf, ls) << "step " << t + 1;
  }
  // Both tiers hold every token once: the prompt and five steps.
  for (client::Tier* tier : {static_cast<client::Tier*>(&faulty), other_tier.get()}) {
    ASSERT_OK_AND_ASSIGN(kvstore::NodeStats stats, tier->Stats(/*include_sequences=*/true));
    ASSERT_EQ(stats.sequences.size(), 2u);
    for (const auto& seq : stats.sequences)
      EXPECT_EQ(seq.stored_tokens, static_cast<int64_t>(prompt_.size()) + 5);
  }
}

TEST_F(EngineTest, TierErrorsThatAreNotMissesFailTheStep) {
  FaultyTier faulty(tier_.get(), {1}, absl::InvalidArgumentError("bad request"));
  ASSERT_OK_AND_ASSIGN(auto engine, Engine::Create(model_.get(), &faulty, spec_, Options(64)));
  std::vector<float> logits;
  ASSERT_OK_AND_ASSIGN(PromptKV kv, engine->Prefill(prompt_, &logits));
  ASSERT_OK(engine->AddSequence("s", kv));
  const std::string id = "s";
  const int32_t next = 3;
  EXPECT_THAT(engine->Step({&id, 1}, {&next, 1}, &logits),
              ::kvrecall::testing::StatusIs(absl::StatusCode::kInvalidArgument));
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
