// Hostile and broken input to every RPC of a real kvrecall-server process: each gets the canonical
// error code, nothing half-written is kept, and the server keeps serving everyone else.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"
#include "tests/testing/process.h"

namespace kvrecall::testing {
namespace {

using grpc::StatusCode;

constexpr int kLayers = 2, kKvHeads = 2, kHeadDim = 8, kGroup = 2, kTokens = 40;
constexpr size_t kRow = kHeadDim * 2;  // bf16

class BadInputTest : public ::testing::Test {
 protected:
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  // The server is started once per process, lazily here rather than in SetUpTestSuite: a
  // failure there would be reported as "skipped", which CTest counts as passing.
  void SetUp() override {
    if (server_ == nullptr) {
      dir_ = new std::string(absl::StrCat(::testing::TempDir(), "/bad_input.", getpid()));
      std::filesystem::create_directories(*dir_);
      auto s = StartServer(*dir_, {"--memory=4MiB"});
      ASSERT_TRUE(s.ok()) << s.status();
      server_ = new ServerProcess(std::move(*s));
    }
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(256 << 20);
    channel_ = grpc::CreateCustomChannel(server_->address(), grpc::InsecureChannelCredentials(), args);
    stub_ = v1::KvRecall::NewStub(channel_);
    v1::RegisterModelRequest req;
    *req.mutable_spec() = Spec();
    v1::RegisterModelResponse resp;
    ASSERT_EQ(Call(&v1::KvRecall::Stub::RegisterModel, req, &resp).error_code(), StatusCode::OK);
  }

  static v1::ModelSpec Spec() {
    v1::ModelSpec s;
    s.set_model_id("bad-input-model");
    s.set_num_layers(kLayers);
    s.set_num_q_heads(kKvHeads * kGroup);
    s.set_num_kv_heads(kKvHeads);
    s.set_head_dim(kHeadDim);
    s.set_kv_dtype(v1::DTYPE_BF16);
    s.set_vocab_size(100);
    return s;
  }

  template <typename Req, typename Resp>
  grpc::Status Call(grpc::Status (v1::KvRecall::Stub::*method)(grpc::ClientContext*, const Req&, Resp*),
                    const Req& req, Resp* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return (stub_.get()->*method)(&ctx, req, resp);
  }

  grpc::Status Open(const std::string& id, int tokens, int32_t token_value = 1) {
    v1::OpenSequenceRequest req;
    req.set_tenant("t");
    req.set_model_id("bad-input-model");
    req.set_sequence_id(id);
    for (int i = 0; i < tokens; ++i) req.add_token_ids(token_value);
    v1::OpenSequenceResponse resp;
    return Call(&v1::KvRecall::Stub::OpenSequence, req, &resp);
  }

  v1::AppendKVRequest Chunk(const std::string& id, int layer, int64_t start, int n) {
    v1::AppendKVRequest c;
    c.set_tenant("t");
    c.set_sequence_id(id);
    c.set_layer(layer);
    c.set_token_start(start);
    c.set_num_tokens(n);
    c.set_keys(std::string(kKvHeads * n * kRow, '\x01'));
    c.set_values(std::string(kKvHeads * n * kRow, '\x02'));
    return c;
  }

  // Sends chunks; if `cancel_after` >= 0, cancels the stream after that many chunks.
  grpc::Status Append(const std::vector<v1::AppendKVRequest>& chunks, v1::AppendKVResponse* resp,
                      int cancel_after = -1) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto w = stub_->AppendKV(&ctx, resp);
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (static_cast<int>(i) == cancel_after) {
        ctx.TryCancel();
        break;
      }
      if (!w->Write(chunks[i])) break;
    }
    if (cancel_after < 0) w->WritesDone();
    return w->Finish();
  }

  int64_t StoredTokens(const std::string& id) {
    v1::StatsRequest req;
    req.set_include_sequences(true);
    v1::StatsResponse resp;
    EXPECT_TRUE(Call(&v1::KvRecall::Stub::Stats, req, &resp).ok());
    for (const auto& s : resp.sequences()) {
      if (s.sequence_id() == id) return s.stored_tokens();
    }
    return -1;
  }

  // A committed sequence with kTokens tokens.
  void MakeSequence(const std::string& id) {
    ASSERT_EQ(Open(id, kTokens).error_code(), StatusCode::OK);
    v1::AppendKVResponse resp;
    ASSERT_EQ(Append({Chunk(id, 0, 0, kTokens), Chunk(id, 1, 0, kTokens)}, &resp).error_code(), StatusCode::OK);
    ASSERT_EQ(resp.stored_tokens(), kTokens);
  }

  v1::RetrieveRequest GoodRetrieve(const std::string& id) {
    v1::RetrieveRequest r;
    r.set_tenant("t");
    r.set_layer(1);
    r.set_budget(4);
    v1::RetrieveEntry* e = r.add_entries();
    e->set_sequence_id(id);
    e->set_kv_head(1);
    for (int i = 0; i < kGroup * kHeadDim; ++i) e->add_queries(0.1f * i);
    e->set_token_begin(0);
    e->set_token_end(kTokens);
    return r;
  }

  StatusCode Retrieve(const v1::RetrieveRequest& r) {
    v1::RetrieveResponse resp;
    return Call(&v1::KvRecall::Stub::Retrieve, r, &resp).error_code();
  }

  static std::string* dir_;
  static ServerProcess* server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvRecall::Stub> stub_;
};
std::string* BadInputTest::dir_ = nullptr;
ServerProcess* BadInputTest::server_ = nullptr;

TEST_F(BadInputTest, RegisterModel) {
  v1::RegisterModelRequest req;
  v1::RegisterModelResponse resp;
  *req.mutable_spec() = Spec();
  req.mutable_spec()->set_head_dim(0);
  EXPECT_EQ(Call(&v1::KvRecall::Stub::RegisterModel, req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  *req.mutable_spec() = Spec();
  req.mutable_spec()->set_num_kv_heads(3);
  EXPECT_EQ(Call(&v1::KvRecall::Stub::RegisterModel, req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  *req.mutable_spec() = Spec();
  req.mutable_spec()->set_kv_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(Call(&v1::KvRecall::Stub::RegisterModel, req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  *req.mutable_spec() = Spec();
  req.mutable_spec()->set_num_layers(1 << 30);
  EXPECT_EQ(Call(&v1::KvRecall::Stub::RegisterModel, req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  *req.mutable_spec() = Spec();
  req.mutable_spec()->set_head_dim(16);  // same id, different shape
  EXPECT_EQ(Call(&v1::KvRecall::Stub::RegisterModel, req, &resp).error_code(), StatusCode::ALREADY_EXISTS);
}

TEST_F(BadInputTest, OpenSequence) {
  EXPECT_EQ(Open("", 3).error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Open("o1", 3, 100).error_code(), StatusCode::INVALID_ARGUMENT) << "token id == vocab_size";
  EXPECT_EQ(Open("o2", 3, -5).error_code(), StatusCode::INVALID_ARGUMENT);
  v1::OpenSequenceRequest req;
  req.set_tenant("t");
  req.set_model_id("no-such-model");
  req.set_sequence_id("o3");
  v1::OpenSequenceResponse resp;
  EXPECT_EQ(Call(&v1::KvRecall::Stub::OpenSequence, req, &resp).error_code(), StatusCode::NOT_FOUND);
  ASSERT_EQ(Open("o4", 3, 1).error_code(), StatusCode::OK);
  EXPECT_EQ(Open("o4", 3, 2).error_code(), StatusCode::FAILED_PRECONDITION) << "reopen with other tokens";
}

TEST_F(BadInputTest, AppendKV) {
  ASSERT_EQ(Open("a", 10).error_code(), StatusCode::OK);
  v1::AppendKVResponse resp;
  // Wrong head_dim: bytes do not match the spec.
  v1::AppendKVRequest c = Chunk("a", 0, 0, 4);
  c.set_keys(std::string(kKvHeads * 4 * 12 * 2, 'x'));
  EXPECT_EQ(Append({c}, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  // Counts far too large for the bytes sent.
  c = Chunk("a", 0, 0, 4);
  c.set_num_tokens(1 << 30);
  EXPECT_EQ(Append({c}, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Append({Chunk("a", 5, 0, 4)}, &resp).error_code(), StatusCode::INVALID_ARGUMENT) << "layer";
  EXPECT_EQ(Append({Chunk("nope", 0, 0, 4)}, &resp).error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(Append({Chunk("a", 0, 0, 11)}, &resp).error_code(), StatusCode::FAILED_PRECONDITION)
      << "KV for tokens whose ids are unknown";
  EXPECT_EQ(Append({Chunk("a", 0, 3, 4)}, &resp).error_code(), StatusCode::FAILED_PRECONDITION) << "gap";
  // Stream ending with layers of unequal length: nothing is committed.
  EXPECT_EQ(Append({Chunk("a", 0, 0, 4)}, &resp).error_code(), StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(StoredTokens("a"), 0);
  // Truncated stream (client cancels half-way): nothing is committed.
  EXPECT_EQ(Append({Chunk("a", 0, 0, 4), Chunk("a", 1, 0, 4), Chunk("a", 0, 4, 4)}, &resp, 2).error_code(),
            StatusCode::CANCELLED);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(StoredTokens("a"), 0);
  // Oversized message (over the server's 64 MiB limit).
  c = Chunk("a", 0, 0, 4);
  c.set_keys(std::string(70 << 20, 'x'));
  EXPECT_EQ(Append({c}, &resp).error_code(), StatusCode::RESOURCE_EXHAUSTED);
  // More KV than the node's --memory: RESOURCE_EXHAUSTED, and the memory comes back.
  ASSERT_EQ(Open("big", 70000).error_code(), StatusCode::OK);
  EXPECT_EQ(Append({Chunk("big", 0, 0, 70000), Chunk("big", 1, 0, 70000)}, &resp).error_code(),
            StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(StoredTokens("big"), 0);
  // After all that, a well-formed append still works.
  EXPECT_EQ(Append({Chunk("a", 0, 0, 10), Chunk("a", 1, 0, 10)}, &resp).error_code(), StatusCode::OK);
  EXPECT_EQ(StoredTokens("a"), 10);
}

// AppendKVBatch: malformed requests fail whole; each append succeeds or fails on its own with
// its own code, a failed one keeps nothing, and the others are stored.
TEST_F(BadInputTest, AppendKVBatch) {
  ASSERT_EQ(Open("b1", 12).error_code(), StatusCode::OK);
  ASSERT_EQ(Open("b2", 12, 2).error_code(), StatusCode::OK);
  ASSERT_EQ(Open("b3", 12, 3).error_code(), StatusCode::OK);
  ASSERT_EQ(Open("b4", 12, 4).error_code(), StatusCode::OK);
  ASSERT_EQ(Open("b5", 12, 5).error_code(), StatusCode::OK);
  auto one = [](const std::string& id, int64_t start, int n) {
    v1::SequenceAppend a;
    a.set_sequence_id(id);
    a.set_token_start(start);
    a.set_num_tokens(n);
    a.set_keys(std::string(kLayers * kKvHeads * n * kRow, '\x01'));
    a.set_values(std::string(kLayers * kKvHeads * n * kRow, '\x02'));
    return a;
  };
  v1::AppendKVBatchRequest req;
  req.set_tenant("t");
  v1::AppendKVBatchResponse resp;
  EXPECT_EQ(Call(&v1::KvRecall::Stub::AppendKVBatch, req, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT)
      << "no appends";
  *req.add_appends() = one("b1", 0, 4);
  *req.add_appends() = one("b1", 0, 4);
  EXPECT_EQ(Call(&v1::KvRecall::Stub::AppendKVBatch, req, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT)
      << "one sequence twice";
  EXPECT_EQ(StoredTokens("b1"), 0);

  req.clear_appends();
  *req.add_appends() = one("b1", 0, 4);  // stored
  v1::SequenceAppend short_keys = one("b2", 0, 4);
  short_keys.mutable_keys()->resize(short_keys.keys().size() - 1);
  *req.add_appends() = short_keys;         // INVALID_ARGUMENT
  *req.add_appends() = one("nope", 0, 4);  // NOT_FOUND
  *req.add_appends() = one("b3", 2, 4);    // a gap: FAILED_PRECONDITION
  v1::SequenceAppend huge = one("b4", 0, 4);
  huge.set_num_tokens(1 << 30);  // counts far beyond the bytes
  *req.add_appends() = huge;
  *req.add_appends() = one("b5", 0, 13);  // ids unknown past 12
  ASSERT_EQ(Call(&v1::KvRecall::Stub::AppendKVBatch, req, &resp).error_code(), StatusCode::OK);
  ASSERT_EQ(resp.results_size(), 6);
  EXPECT_EQ(resp.results(0).code(), 0);
  EXPECT_EQ(resp.results(0).stored_tokens(), 4);
  EXPECT_EQ(resp.results(1).code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(resp.results(2).code(), static_cast<int>(absl::StatusCode::kNotFound));
  EXPECT_EQ(resp.results(3).code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(resp.results(4).code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(resp.results(5).code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_FALSE(resp.results(5).message().empty());
  EXPECT_EQ(resp.bytes_written(), 2 * kLayers * kKvHeads * 4 * kRow);
  EXPECT_EQ(StoredTokens("b1"), 4);
  EXPECT_EQ(StoredTokens("b2"), 0);
  for (const char* id : {"b3", "b4", "b5"}) EXPECT_EQ(StoredTokens(id), 0) << id;

  // The next batch continues where each sequence is; decode-style appends carry their ids
  // (from token_start), which must agree with the ids already known.
  req.clear_appends();
  *req.add_appends() = one("b1", 4, 8);
  v1::SequenceAppend wrong_id = one("b2", 0, 1);
  wrong_id.add_token_ids(7);  // token 0 of b2 is 2
  *req.add_appends() = wrong_id;
  ASSERT_EQ(Call(&v1::KvRecall::Stub::AppendKVBatch, req, &resp).error_code(), StatusCode::OK);
  ASSERT_EQ(resp.results_size(), 2);
  EXPECT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
  EXPECT_EQ(resp.results(1).code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  req.clear_appends();
  v1::SequenceAppend decode = one("b1", 12, 1);
  decode.add_token_ids(7);
  *req.add_appends() = decode;
  ASSERT_EQ(Call(&v1::KvRecall::Stub::AppendKVBatch, req, &resp).error_code(), StatusCode::OK);
  EXPECT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
  EXPECT_EQ(resp.results(0).stored_tokens(), 13);
  EXPECT_EQ(StoredTokens("b1"), 13);
  EXPECT_EQ(StoredTokens("b2"), 0);
}

TEST_F(BadInputTest, Retrieve) {
  MakeSequence("r");
  EXPECT_EQ(Retrieve(GoodRetrieve("r")), StatusCode::OK);
  v1::RetrieveRequest r = GoodRetrieve("r");
  r.mutable_entries(0)->add_queries(1.0f);  // wrong query shape
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.mutable_entries(0)->set_sequence_id("nope");
  EXPECT_EQ(Retrieve(r), StatusCode::NOT_FOUND);
  r = GoodRetrieve("r");
  r.set_tenant("someone-else");
  EXPECT_EQ(Retrieve(r), StatusCode::NOT_FOUND);
  r = GoodRetrieve("r");
  r.set_budget(0xFFFFFFFFu);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.mutable_entries(0)->set_token_end(kTokens + 1);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.mutable_entries(0)->set_token_begin(-3);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.mutable_entries(0)->set_kv_head(kKvHeads);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.set_layer(-1);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.set_worker_id("never-attached");
  EXPECT_EQ(Retrieve(r), StatusCode::FAILED_PRECONDITION);
  r = GoodRetrieve("r");
  r.set_method(static_cast<v1::Method>(77));
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.set_staging_area(1u << 30);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.mutable_entries(0)->set_slot_epoch(9);  // no worker: ids only, nothing is mirrored
  r.set_call_seq(3);
  EXPECT_EQ(Retrieve(r), StatusCode::OK);
  r = GoodRetrieve("r");
  r.set_successors(4);  // lookahead successors: at most the budget
  EXPECT_EQ(Retrieve(r), StatusCode::OK);
  r.set_successors(5);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r.set_successors(0xFFFFFFFFu);
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.set_results_in_region(true);  // results into a region, but no worker attached
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.mutable_entries(0)->clear_queries();
  r.set_queries_in_region(true);  // queries in a region, but no worker attached
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  r = GoodRetrieve("r");
  r.clear_entries();
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT);
  // Queries as bf16: the same shape rules, plus no odd byte count and not both forms at once.
  r = GoodRetrieve("r");
  r.mutable_entries(0)->clear_queries();
  r.mutable_entries(0)->set_queries_bf16(std::string(2 * kGroup * kHeadDim, '\x3f'));
  EXPECT_EQ(Retrieve(r), StatusCode::OK);
  r.mutable_entries(0)->mutable_queries_bf16()->push_back('\0');
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT) << "odd byte count";
  r.mutable_entries(0)->set_queries_bf16(std::string(2 * kGroup * kHeadDim + 2, '\x3f'));
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT) << "one query value too many";
  r = GoodRetrieve("r");
  r.mutable_entries(0)->set_queries_bf16(std::string(2 * kGroup * kHeadDim, '\x3f'));
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT) << "both forms";
  r = GoodRetrieve("r");
  r.mutable_entries(0)->clear_queries();
  r.mutable_entries(0)->set_queries_bf16(std::string(2 * kGroup * kHeadDim, '\xff'));
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT) << "NaN queries";
  r = GoodRetrieve("r");
  for (int i = 0; i < 70000; ++i) r.add_entries()->set_sequence_id("r");
  EXPECT_EQ(Retrieve(r), StatusCode::INVALID_ARGUMENT) << "too many entries";
}

TEST_F(BadInputTest, FetchAttachCloseStats) {
  MakeSequence("f");
  auto fetch = [&](v1::FetchKVRequest req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto r = stub_->FetchKV(&ctx, req);
    v1::FetchKVResponse chunk;
    int rows = 0;
    while (r->Read(&chunk)) rows += chunk.token_ids_size();
    grpc::Status s = r->Finish();
    return std::make_pair(s.error_code(), rows);
  };
  v1::FetchKVRequest req;
  req.set_tenant("t");
  req.set_sequence_id("f");
  req.set_layer(1);
  req.set_kv_head(0);
  req.set_token_begin(0);
  req.set_token_end(kTokens);
  EXPECT_EQ(fetch(req), std::make_pair(StatusCode::OK, kTokens));
  req.add_token_ids(3);
  req.add_token_ids(kTokens);
  EXPECT_EQ(fetch(req).first, StatusCode::INVALID_ARGUMENT);
  req.clear_token_ids();
  req.set_token_end(kTokens + 5);
  EXPECT_EQ(fetch(req).first, StatusCode::INVALID_ARGUMENT);
  req.set_token_end(kTokens);
  req.set_kv_head(9);
  EXPECT_EQ(fetch(req).first, StatusCode::INVALID_ARGUMENT);
  req.set_sequence_id("nope");
  EXPECT_EQ(fetch(req).first, StatusCode::NOT_FOUND);

  v1::AttachWorkerRequest a;
  v1::AttachWorkerResponse ar;
  a.set_tenant("t");
  a.set_worker_id("w");
  a.set_transport("ucx");
  a.set_peer_address("this is not a UCX worker address");
  a.set_remote_base(4096);
  a.set_length(1 << 20);
  a.set_rkey("garbage");
  EXPECT_EQ(Call(&v1::KvRecall::Stub::AttachWorker, a, &ar).error_code(), StatusCode::INVALID_ARGUMENT);
  a.set_transport("carrier-pigeon");
  EXPECT_EQ(Call(&v1::KvRecall::Stub::AttachWorker, a, &ar).error_code(), StatusCode::INVALID_ARGUMENT);

  v1::CloseSequenceRequest c;
  v1::CloseSequenceResponse cr;
  c.set_tenant("t");
  c.set_sequence_id("nope");
  EXPECT_EQ(Call(&v1::KvRecall::Stub::CloseSequence, c, &cr).error_code(), StatusCode::NOT_FOUND);
  c.set_sequence_id("f");
  c.set_drop(true);
  EXPECT_EQ(Call(&v1::KvRecall::Stub::CloseSequence, c, &cr).error_code(), StatusCode::OK);
  EXPECT_EQ(Retrieve(GoodRetrieve("f")), StatusCode::NOT_FOUND);
}

// Prefix sharing must not open a side channel: another tenant asking for the same prompt learns
// nothing (matched_tokens 0), and kvrecallctl drop releases exactly what was stored.
TEST_F(BadInputTest, SharedPrefixesStayInsideTheTenant) {
  constexpr int kPrompt = 130;  // two full 64-token blocks + a partial one
  auto open = [&](const std::string& tenant, const std::string& id,
                  v1::OpenSequenceResponse* resp) {
    v1::OpenSequenceRequest req;
    req.set_tenant(tenant);
    req.set_model_id("bad-input-model");
    req.set_sequence_id(id);
    for (int i = 0; i < kPrompt; ++i) req.add_token_ids(7 + i % 50);
    return Call(&v1::KvRecall::Stub::OpenSequence, req, resp).error_code();
  };
  v1::StatsResponse before;
  ASSERT_TRUE(Call(&v1::KvRecall::Stub::Stats, v1::StatsRequest(), &before).ok());
  v1::OpenSequenceResponse r;
  ASSERT_EQ(open("t", "share-1", &r), StatusCode::OK);
  EXPECT_EQ(r.matched_tokens(), 0);
  v1::AppendKVResponse ar;
  ASSERT_EQ(
      Append({Chunk("share-1", 0, 0, kPrompt), Chunk("share-1", 1, 0, kPrompt)}, &ar).error_code(),
      StatusCode::OK);
  ASSERT_EQ(open("t", "share-2", &r), StatusCode::OK);
  EXPECT_EQ(r.matched_tokens(), 128) << "whole blocks only";
  EXPECT_EQ(r.stored_tokens(), 128);
  ASSERT_EQ(open("u", "share-1", &r), StatusCode::OK);
  EXPECT_EQ(r.matched_tokens(), 0) << "another tenant sees nothing";
  v1::StatsRequest sreq;
  v1::StatsResponse stats;
  ASSERT_TRUE(Call(&v1::KvRecall::Stub::Stats, sreq, &stats).ok());
  EXPECT_EQ(stats.shared_blocks() - before.shared_blocks(), 2);
  EXPECT_EQ(stats.evictions(), 0);
  EXPECT_EQ(stats.spilled_bytes(), 0);

  for (const char* id : {"share-1", "share-2"}) {
    auto ctl = Process::Start({BinDir() + "/kvrecallctl", "--server=" + server_->address(), "drop",
                               "--tenant=t", std::string("--sequence=") + id},
                              *dir_ + "/ctl-drop.log");
    ASSERT_TRUE(ctl.ok());
    EXPECT_EQ(*ctl->Wait(absl::Seconds(30)), 0) << ReadFile(*dir_ + "/ctl-drop.log");
  }
  v1::CloseSequenceRequest c;
  v1::CloseSequenceResponse cr;
  c.set_tenant("u");
  c.set_sequence_id("share-1");
  c.set_drop(true);
  ASSERT_EQ(Call(&v1::KvRecall::Stub::CloseSequence, c, &cr).error_code(), StatusCode::OK);
  ASSERT_TRUE(Call(&v1::KvRecall::Stub::Stats, sreq, &stats).ok());
  EXPECT_EQ(stats.stored_bytes(), before.stored_bytes());
  EXPECT_EQ(stats.blocks(), before.blocks());
}

TEST_F(BadInputTest, BuildIndex) {
  MakeSequence("bi");
  v1::BuildIndexRequest req;
  req.set_tenant("t");
  req.set_sequence_id("bi");
  req.set_method(v1::METHOD_CTKVR);
  req.set_first_layer(1);
  req.set_token_begin(0);
  req.set_num_queries(2);
  v1::LayerQueries* l = req.add_layers();
  l->set_layer(1);
  for (int i = 0; i < 2 * kKvHeads * kGroup * kHeadDim; ++i) l->add_queries(0.01f * i);
  v1::BuildIndexResponse resp;
  v1::BuildIndexRequest bad = req;
  bad.mutable_layers(0)->set_layer(0);  // out of order
  EXPECT_EQ(Call(&v1::KvRecall::Stub::BuildIndex, bad, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  bad = req;
  bad.mutable_layers(0)->add_queries(1.0f);  // wrong shape
  EXPECT_EQ(Call(&v1::KvRecall::Stub::BuildIndex, bad, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  bad = req;
  bad.set_method(v1::METHOD_MERGED);
  EXPECT_EQ(Call(&v1::KvRecall::Stub::BuildIndex, bad, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  bad = req;
  bad.set_sequence_id("nope");
  EXPECT_EQ(Call(&v1::KvRecall::Stub::BuildIndex, bad, &resp).error_code(), StatusCode::NOT_FOUND);
  // Lists a GPU worker made: well-formed ones are taken, broken ones refused.
  v1::BuildIndexRequest listed = req;
  listed.set_ctkvr_list_size(4);
  v1::CtkvrLayerLists* lists = listed.add_ctkvr_lists();
  lists->set_layer(1);
  for (int i = 0; i < kKvHeads * 2; ++i) {
    for (int t : {0, 3, 5, 9}) lists->add_tokens(t);
    for (int h = 0; h < kGroup; ++h) lists->add_lse(100.0f);
  }
  for (auto& [what, broken] :
       std::vector<std::pair<std::string, std::function<void(v1::BuildIndexRequest*)>>>{
           {"layer out of order",
            [](v1::BuildIndexRequest* b) { b->mutable_ctkvr_lists(0)->set_layer(2); }},
           {"a token short",
            [](v1::BuildIndexRequest* b) {
              b->mutable_ctkvr_lists(0)->mutable_tokens()->RemoveLast();
            }},
           {"a normaliser short",
            [](v1::BuildIndexRequest* b) {
              b->mutable_ctkvr_lists(0)->mutable_lse()->RemoveLast();
            }},
           {"list size 0", [](v1::BuildIndexRequest* b) { b->set_ctkvr_list_size(0); }},
           {"descending",
            [](v1::BuildIndexRequest* b) { b->mutable_ctkvr_lists(0)->set_tokens(0, 4); }},
           {"past the range",
            [](v1::BuildIndexRequest* b) { b->mutable_ctkvr_lists(0)->set_tokens(3, 1 << 20); }},
           {"NaN normaliser",
            [](v1::BuildIndexRequest* b) { b->mutable_ctkvr_lists(0)->set_lse(0, NAN); }},
           {"two layers of lists",
            [](v1::BuildIndexRequest* b) { *b->add_ctkvr_lists() = b->ctkvr_lists(0); }},
       }) {
    bad = listed;
    broken(&bad);
    EXPECT_EQ(Call(&v1::KvRecall::Stub::BuildIndex, bad, &resp).error_code(),
              StatusCode::INVALID_ARGUMENT)
        << what;
  }
  v1::RetrieveRequest r = GoodRetrieve("bi");
  r.set_method(v1::METHOD_CTKVR);
  EXPECT_EQ(Retrieve(r), StatusCode::FAILED_PRECONDITION) << "no index yet";
  ASSERT_EQ(Call(&v1::KvRecall::Stub::BuildIndex, req, &resp).error_code(), StatusCode::OK);
  EXPECT_EQ(resp.segments(), kKvHeads);
  EXPECT_EQ(Retrieve(r), StatusCode::OK);
  MakeSequence("bi-listed");
  listed.set_sequence_id("bi-listed");
  ASSERT_EQ(Call(&v1::KvRecall::Stub::BuildIndex, listed, &resp).error_code(), StatusCode::OK);
  EXPECT_EQ(resp.segments(), kKvHeads);
  r = GoodRetrieve("bi-listed");
  r.set_method(v1::METHOD_CTKVR);
  EXPECT_EQ(Retrieve(r), StatusCode::OK);
}

// Bulk ingest's two RPCs with broken fields, and a commit whose rows never arrived.
TEST_F(BadInputTest, AllocateAndCommitBlocks) {
  ASSERT_EQ(Open("ing", 10).error_code(), StatusCode::OK);
  auto alloc = [&](const std::string& id, int64_t start, int64_t n, v1::AllocateBlocksResponse* resp) {
    v1::AllocateBlocksRequest r;
    r.set_tenant("t");
    r.set_sequence_id(id);
    r.set_token_start(start);
    r.set_num_tokens(n);
    return Call(&v1::KvRecall::Stub::AllocateBlocks, r, resp).error_code();
  };
  auto commit = [&](const std::string& tenant, uint64_t ingest, std::vector<uint32_t> crcs, bool abort) {
    v1::CommitBlocksRequest r;
    r.set_tenant(tenant);
    r.set_sequence_id("ing");
    r.set_ingest_id(ingest);
    r.mutable_checksums()->Add(crcs.begin(), crcs.end());
    r.set_abort(abort);
    v1::CommitBlocksResponse resp;
    return Call(&v1::KvRecall::Stub::CommitBlocks, r, &resp).error_code();
  };
  v1::AllocateBlocksResponse g;
  EXPECT_EQ(alloc("ing", 0, 0, &g), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(alloc("ing", 0, int64_t{1} << 40, &g), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(alloc("ing", -5, 2, &g), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(alloc("ing", 0, 11, &g), StatusCode::FAILED_PRECONDITION) << "ids unknown";
  EXPECT_EQ(alloc("ing", 3, 2, &g), StatusCode::FAILED_PRECONDITION) << "gap";
  EXPECT_EQ(alloc("nope", 0, 2, &g), StatusCode::NOT_FOUND);
  EXPECT_EQ(alloc("ing", 0, 70000, &g), StatusCode::FAILED_PRECONDITION) << "ids unknown before memory";
  ASSERT_EQ(Open("huge", 70000).error_code(), StatusCode::OK);
  EXPECT_EQ(alloc("huge", 0, 70000, &g), StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(StoredTokens("huge"), 0);

  ASSERT_EQ(alloc("ing", 0, 10, &g), StatusCode::OK);
  EXPECT_EQ(g.transport(), "ucx");
  EXPECT_EQ(g.slot_offsets_size(), kLayers * g.num_blocks());
  for (uint64_t off : g.slot_offsets()) EXPECT_LT(off, g.length());
  EXPECT_EQ(alloc("ing", 0, 10, &g), StatusCode::ABORTED) << "one transaction at a time";
  std::vector<uint32_t> crcs(static_cast<size_t>(g.slot_offsets_size()), 0);
  EXPECT_EQ(commit("other-tenant", g.ingest_id(), crcs, false), StatusCode::NOT_FOUND);
  EXPECT_EQ(commit("t", g.ingest_id() ^ 1, crcs, false), StatusCode::NOT_FOUND);
  // Nothing was put: the checksums cannot match, nothing is committed.
  EXPECT_EQ(commit("t", g.ingest_id(), crcs, false), StatusCode::DATA_LOSS);
  EXPECT_EQ(StoredTokens("ing"), 0);
  EXPECT_EQ(commit("t", g.ingest_id(), crcs, false), StatusCode::NOT_FOUND) << "the transaction ended";
  ASSERT_EQ(alloc("ing", 0, 10, &g), StatusCode::OK);
  EXPECT_EQ(commit("t", g.ingest_id(), {}, true), StatusCode::OK) << "abort";
  // AppendKV works on it afterwards.
  v1::AppendKVResponse resp;
  EXPECT_EQ(Append({Chunk("ing", 0, 0, 10), Chunk("ing", 1, 0, 10)}, &resp).error_code(), StatusCode::OK);
  EXPECT_EQ(StoredTokens("ing"), 10);
}

// kvrecallctl drain's RPC: health NOT_SERVING, new sequences refused, held ones still served.
TEST_F(BadInputTest, DrainingNodeServesWhatItHolds) {
  MakeSequence("held");
  auto drain = [&](bool on) {
    v1::DrainRequest r;
    r.set_draining(on);
    v1::DrainResponse resp;
    EXPECT_TRUE(Call(&v1::KvRecall::Stub::Drain, r, &resp).ok());
    EXPECT_EQ(resp.draining(), on);
  };
  auto health = [&] {
    auto h = grpc::health::v1::Health::NewStub(channel_);
    grpc::health::v1::HealthCheckRequest hreq;
    grpc::health::v1::HealthCheckResponse hresp;
    grpc::ClientContext ctx;
    EXPECT_TRUE(h->Check(&ctx, hreq, &hresp).ok());
    return hresp.status();
  };
  drain(true);
  EXPECT_EQ(health(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Open("fresh", 4).error_code(), StatusCode::UNAVAILABLE);
  EXPECT_EQ(Open("held", kTokens).error_code(), StatusCode::OK);
  EXPECT_EQ(Retrieve(GoodRetrieve("held")), StatusCode::OK);
  drain(false);
  EXPECT_EQ(health(), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(Open("fresh", 4).error_code(), StatusCode::OK);
}

TEST_F(BadInputTest, ServerKeepsServingAndReportsHealthy) {
  MakeSequence("alive");
  EXPECT_EQ(Retrieve(GoodRetrieve("alive")), StatusCode::OK);
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::health::v1::HealthCheckRequest hreq;
  grpc::health::v1::HealthCheckResponse hresp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(health->Check(&ctx, hreq, &hresp).ok());
  EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_TRUE(server_->process.running());
}

}  // namespace
}  // namespace kvrecall::testing
