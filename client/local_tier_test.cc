#include <cstring>
#include <latch>
#include <map>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "bench/loopback_server.h"
#include "client/tier.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/convert.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"

namespace kvrecall::client {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = 2;
  s.num_q_heads = 2;
  s.num_kv_heads = 1;
  s.head_dim = 2;
  s.kv_dtype = DType::kF32;
  s.vocab_size = 10;
  return s;
}

std::string Floats(std::vector<float> v) { return std::string(reinterpret_cast<char*>(v.data()), v.size() * 4); }

// Tokens [0, n) of Spec()'s two layers, both layers the same: keys k and values v, [n][2] each.
AppendBatch PromptBatch(const std::vector<float>& k, const std::vector<float>& v) {
  AppendBatch b;
  b.num_tokens = static_cast<int64_t>(k.size() / 2);
  for (int l = 0; l < 2; ++l) {
    b.keys.push_back(Floats(k));
    b.values.push_back(Floats(v));
  }
  return b;
}

// Layer 1's two best tokens of `sequence` for the query (1, 0) on kv-head 0, exactly: their ids
// and their rows ([K | V] of 2 floats each) as delivered.
void ExpectBestTwo(Tier& tier, const std::string& sequence, const std::vector<int32_t>& ids,
                   const std::vector<float>& rows) {
  std::vector<float> q = {1, 0, 1, 0};
  RetrieveBatch rb{1, 2, Method::kExact, {{sequence, 0, q, 0, 4}}};
  std::vector<Recalled> out;
  ASSERT_OK(tier.Retrieve(rb, &out));
  ASSERT_EQ(out[0].token_ids, ids);
  const float* got = reinterpret_cast<const float*>(out[0].rows);
  EXPECT_EQ(std::vector<float>(got, got + 8), rows);
}

TEST(LocalTierTest, AppendRetrieveDeliversRowsThroughTheTransport) {
  TierOptions options;
  options.recall_buffer_bytes = 1024;
  ASSERT_OK_AND_ASSIGN(auto tier, CreateLocalTier(kvstore::NodeOptions{1 << 20, 2, 1}, options));
  ASSERT_OK(tier->RegisterModel(Spec()));
  ASSERT_OK(tier->OpenSequence("s", "m", {1, 2, 3}).status());
  AppendBatch b = PromptBatch({1, 0, 5, 0, 2, 0}, {10, 11, 50, 51, 20, 21});
  ASSERT_OK(tier->AppendKV("s", b));
  // A decode token: its id travels with its KV.
  AppendBatch d;
  d.token_start = 3;
  d.num_tokens = 1;
  d.token_ids = {4};
  for (int l = 0; l < 2; ++l) {
    d.keys.push_back(Floats({3, 0}));
    d.values.push_back(Floats({30, 31}));
  }
  ASSERT_OK(tier->AppendKV("s", d));

  ExpectBestTwo(*tier, "s", {1, 3}, {5, 0, 50, 51, 3, 0, 30, 31});
  EXPECT_EQ(tier->counters().bytes_received, 32);

  // Too many rows for the recall buffer: 64 rows of 16 B fit in 1024 B, 65 do not.
  std::vector<float> q = {1, 0, 1, 0};
  RetrieveBatch rb{1, 65, Method::kExact, {{"s", 0, q, 0, 4}}};
  std::vector<Recalled> out;
  EXPECT_THAT(tier->Retrieve(rb, &out), StatusIs(absl::StatusCode::kInvalidArgument));
  // Layers of unequal length are rejected, and nothing is kept.
  AppendBatch bad = d;
  bad.token_start = 4;
  bad.token_ids = {5};
  bad.keys.pop_back();
  EXPECT_THAT(tier->AppendKV("s", bad), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK_AND_ASSIGN(auto stats, tier->Stats(true));
  EXPECT_EQ(stats.sequences[0].stored_tokens, 4);
}

// The recall buffer goes through the pin hooks: pinned whole once allocated, the rows Retrieve
// returns lie in it, unpinned when the tier goes; a pin that fails fails the tier's creation.
TEST(LocalTierTest, RecallBufferIsPinnedForTheTiersLifetime) {
  uint8_t* pinned = nullptr;
  size_t pinned_bytes = 0;
  std::vector<uint8_t*> unpinned;
  TierOptions options;
  options.recall_buffer_bytes = 4096;
  options.pin_region = [&](uint8_t* data, size_t bytes) {
    pinned = data;
    pinned_bytes = bytes;
    return absl::OkStatus();
  };
  options.unpin_region = [&](uint8_t* data) { unpinned.push_back(data); };
  {
    ASSERT_OK_AND_ASSIGN(auto tier, CreateLocalTier(kvstore::NodeOptions{1 << 20, 2, 1}, options));
    ASSERT_NE(pinned, nullptr);
    EXPECT_EQ(pinned_bytes, 4096u);
    ASSERT_OK(tier->RegisterModel(Spec()));
    ASSERT_OK(tier->OpenSequence("s", "m", {1, 2}).status());
    AppendBatch b = PromptBatch({1, 0, 2, 0}, {10, 11, 20, 21});
    ASSERT_OK(tier->AppendKV("s", b));
    std::vector<float> q = {1, 0, 1, 0};
    RetrieveBatch rb{0, 2, Method::kExact, {{"s", 0, q, 0, 2}}};
    std::vector<Recalled> out;
    ASSERT_OK(tier->Retrieve(rb, &out));
    ASSERT_EQ(out[0].fill_slots.size(), 2u);
    EXPECT_GE(out[0].rows, pinned);
    EXPECT_LE(out[0].rows + 2 * 16, pinned + pinned_bytes);
    EXPECT_TRUE(unpinned.empty());
  }
  EXPECT_THAT(unpinned, ElementsAre(pinned));

  unpinned.clear();
  options.pin_region = [](uint8_t*, size_t) { return absl::ResourceExhaustedError("no pins"); };
  EXPECT_THAT(CreateLocalTier(kvstore::NodeOptions{1 << 20, 2, 1}, options).status(),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_TRUE(unpinned.empty());
}

// row_addresses: the arena is pinned next to the recall buffer, and each fill row comes as the
// addresses of its K and V rows there, holding the bytes a copying tier delivers.
TEST(LocalTierTest, RowAddressesPointAtTheRowsInThePinnedArena) {
  std::vector<std::pair<uint8_t*, size_t>> pinned;
  std::vector<uint8_t*> unpinned;
  TierOptions options;
  options.recall_buffer_bytes = 1024;
  options.row_addresses = true;
  options.pin_region = [&](uint8_t* data, size_t bytes) {
    pinned.emplace_back(data, bytes);
    return absl::OkStatus();
  };
  options.unpin_region = [&](uint8_t* data) { unpinned.push_back(data); };
  {
    ASSERT_OK_AND_ASSIGN(auto tier, CreateLocalTier(kvstore::NodeOptions{1 << 20, 2, 1}, options));
    ASSERT_EQ(pinned.size(), 2u);  // the recall buffer, then the arena
    EXPECT_EQ(pinned[1].second, size_t{1} << 20);
    ASSERT_OK(tier->RegisterModel(Spec()));
    ASSERT_OK(tier->OpenSequence("s", "m", {1, 2, 3}).status());
    AppendBatch b = PromptBatch({1, 0, 5, 0, 2, 0}, {10, 11, 50, 51, 20, 21});
    ASSERT_OK(tier->AppendKV("s", b));
    std::vector<float> q = {1, 0, 1, 0};
    RetrieveBatch rb{1, 2, Method::kExact, {{"s", 0, q, 0, 3, /*slot_epoch=*/1}}};
    std::vector<Recalled> out;
    ASSERT_OK(tier->Retrieve(rb, &out));
    ASSERT_THAT(out[0].token_ids, ElementsAre(1, 2));
    EXPECT_EQ(out[0].rows, nullptr);
    ASSERT_EQ(out[0].row_addresses.size(), 2 * out[0].fill_slots.size());
    std::vector<float> got;
    for (const uint8_t* p : out[0].row_addresses) {
      EXPECT_GE(p, pinned[1].first);
      EXPECT_LE(p + 8, pinned[1].first + pinned[1].second);
      got.insert(got.end(), reinterpret_cast<const float*>(p),
                 reinterpret_cast<const float*>(p) + 2);
    }
    EXPECT_THAT(got, ElementsAre(5, 0, 50, 51, 2, 0, 20, 21));
    EXPECT_EQ(tier->counters().rows_received, 2);
    // The same selection again: every row is resident, nothing to gather.
    ASSERT_OK(tier->Retrieve(rb, &out));
    EXPECT_TRUE(out[0].row_addresses.empty());
  }
  ASSERT_EQ(unpinned.size(), 2u);
}

// Concurrent Retrieve calls in different staging areas (CudaEngine's lookahead issues several
// layers at once) answer exactly what the same calls answer one after another, over both the
// in-process tier and a RemoteTier to a loopback server with UCX: same selections, slots and
// rows, same counters.
struct LayerAnswer {
  std::vector<int32_t> token_ids, slots, fill_slots;
  std::string rows;  // the fill rows, copied out of the staging area
};
using StepAnswers = std::vector<std::vector<LayerAnswer>>;  // [step][layer * entries + entry]

constexpr int kLayers = 4, kSeqs = 3, kKvHeads = 2, kGroup = 2, kDim = 8, kTokens = 200,
              kBudget = 16;

ModelSpec WideSpec() {
  ModelSpec s = Spec();
  s.num_layers = kLayers;
  s.num_q_heads = kKvHeads * kGroup;
  s.num_kv_heads = kKvHeads;
  s.head_dim = kDim;
  return s;
}

// query_room: the recall buffer also has room for each call's queries (RemoteTier then hands
// them to the node there).
TierOptions AreaOptions(bool query_room = false) {
  TierOptions o;
  o.staging_areas = kLayers;
  o.recall_buffer_bytes = RecallBufferBytes(kSeqs * kKvHeads, kBudget, 2 * kDim * 4, kLayers,
                                            query_room ? kGroup * kDim : 0);
  return o;
}

// in_place: each call's queries are written where Tier::QueryStaging says (which must offer
// room), not passed from the caller's memory.
absl::StatusOr<StepAnswers> RunSteps(Tier* tier, bool concurrent, bool in_place = false) {
  RETURN_IF_ERROR(tier->RegisterModel(WideSpec()));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (int s = 0; s < kSeqs; ++s) {
    const std::string id = absl::StrCat("seq", s);
    std::vector<int32_t> ids(kTokens);
    for (int t = 0; t < kTokens; ++t) ids[t] = (t * 7 + s) % 10;
    RETURN_IF_ERROR(tier->OpenSequence(id, "m", ids).status());
    AppendBatch b;
    b.num_tokens = kTokens;
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> k(kKvHeads * kTokens * kDim), v(k.size());
      for (float& x : k) x = normal(rng);
      for (float& x : v) x = normal(rng);
      b.keys.push_back(Floats(k));
      b.values.push_back(Floats(v));
    }
    RETURN_IF_ERROR(tier->AppendKV(id, b));
  }
  StepAnswers answers;
  for (int step = 0; step < 3; ++step) {
    std::vector<std::vector<float>> queries(kLayers * kSeqs * kKvHeads,
                                            std::vector<float>(kGroup * kDim));
    for (auto& q : queries) {
      for (float& x : q) x = normal(rng);
    }
    std::vector<LayerAnswer> got(kLayers * kSeqs * kKvHeads);
    std::vector<absl::Status> status(kLayers);
    auto layer = [&](int l) {
      RetrieveBatch rb{l, kBudget, Method::kExact, {}, /*staging_area=*/l};
      const absl::Span<float> staging =
          in_place ? tier->QueryStaging(WideSpec(), l, kSeqs * kKvHeads, kBudget, 0)
                   : absl::Span<float>();
      if (in_place && staging.size() != static_cast<size_t>(kSeqs * kKvHeads * kGroup * kDim)) {
        status[l] =
            absl::InternalError(absl::StrCat("QueryStaging offered ", staging.size(), " floats"));
        return;
      }
      for (int s = 0; s < kSeqs; ++s) {
        for (int h = 0; h < kKvHeads; ++h) {
          const int e = (l * kSeqs + s) * kKvHeads + h;
          absl::Span<const float> q = queries[e];
          if (in_place) {
            float* at = staging.data() + (s * kKvHeads + h) * kGroup * kDim;
            std::copy(q.begin(), q.end(), at);
            q = absl::MakeConstSpan(at, q.size());
          }
          rb.entries.push_back(
              {absl::StrCat("seq", s), h, q, 0, kTokens, static_cast<uint64_t>(1 + e)});
        }
      }
      std::vector<Recalled> out;
      status[l] = tier->Retrieve(rb, &out);
      if (!status[l].ok()) return;
      for (size_t i = 0; i < out.size(); ++i) {
        LayerAnswer& a = got[l * rb.entries.size() + i];
        a.token_ids = out[i].token_ids;
        a.slots = out[i].slots;
        a.fill_slots = out[i].fill_slots;
        a.rows.assign(reinterpret_cast<const char*>(out[i].rows),
                      out[i].fill_slots.size() * 2 * kDim * 4);
      }
    };
    if (concurrent) {
      std::latch start(kLayers);
      std::vector<std::thread> threads;
      for (int l = 0; l < kLayers; ++l) {
        threads.emplace_back([&, l] {
          start.arrive_and_wait();
          layer(l);
        });
      }
      for (std::thread& t : threads) t.join();
    } else {
      for (int l = 0; l < kLayers; ++l) layer(l);
    }
    for (const absl::Status& st : status) RETURN_IF_ERROR(st);
    answers.push_back(std::move(got));
  }
  return answers;
}

void ExpectSameAnswers(const StepAnswers& a, const StepAnswers& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t step = 0; step < a.size(); ++step) {
    ASSERT_EQ(a[step].size(), b[step].size());
    for (size_t e = 0; e < a[step].size(); ++e) {
      SCOPED_TRACE(absl::StrCat("step ", step, " entry ", e));
      EXPECT_EQ(a[step][e].token_ids, b[step][e].token_ids);
      EXPECT_EQ(a[step][e].slots, b[step][e].slots);
      EXPECT_EQ(a[step][e].fill_slots, b[step][e].fill_slots);
      EXPECT_EQ(a[step][e].rows, b[step][e].rows);
      EXPECT_EQ(a[step][e].token_ids.size(), static_cast<size_t>(kBudget));
    }
  }
}

TEST(ConcurrentRetrieveTest, LocalTierCallsInDifferentAreasMatchSerialCalls) {
  StepAnswers answers[2];
  TierCounters counters[2];
  for (int concurrent : {0, 1}) {
    ASSERT_OK_AND_ASSIGN(auto tier,
                         CreateLocalTier(kvstore::NodeOptions{8 << 20, 16, 4}, AreaOptions()));
    ASSERT_OK_AND_ASSIGN(answers[concurrent], RunSteps(tier.get(), concurrent == 1));
    counters[concurrent] = tier->counters();
  }
  ExpectSameAnswers(answers[0], answers[1]);
  EXPECT_EQ(counters[1].retrieve_calls, 3 * kLayers);
  EXPECT_EQ(counters[0].rows_received, counters[1].rows_received);
  EXPECT_EQ(counters[0].rows_selected, counters[1].rows_selected);
  EXPECT_EQ(counters[0].bytes_received, counters[1].bytes_received);
  // Delta streaming sent fewer rows than were selected (later steps reuse resident rows).
  EXPECT_LT(counters[1].rows_received, counters[1].rows_selected);
}

// A RemoteTier to a loopback server (UCX over TCP) of its own; put_delay as
// bench::StartLoopbackServer's.
struct RemoteOverLoopback {
  std::unique_ptr<bench::LoopbackServer> server;
  std::unique_ptr<Tier> tier;
};
absl::StatusOr<RemoteOverLoopback> StartRemote(const TierOptions& options,
                                               absl::Duration reply_poll = absl::ZeroDuration(),
                                               absl::Duration put_delay = absl::ZeroDuration()) {
  RemoteOverLoopback rl;
  ASSIGN_OR_RETURN(rl.server, bench::StartLoopbackServer(kvstore::NodeOptions{8 << 20, 16, 4},
                                                         "tcp", put_delay));
  RemoteTierOptions r;
  r.target = rl.server->target;
  r.ucx_tls = "tcp";
  r.reply_poll = reply_poll;
  ASSIGN_OR_RETURN(rl.tier, CreateRemoteTier(r, options));
  return rl;
}

TEST(ConcurrentRetrieveTest, RemoteTierCallsInDifferentAreasMatchSerialCalls) {
  // Serial calls; concurrent ones; concurrent ones whose callers poll for their replies (each
  // staging area has its own completion queue).
  StepAnswers answers[3];
  for (int run : {0, 1, 2}) {
    ASSERT_OK_AND_ASSIGN(
        RemoteOverLoopback remote,
        StartRemote(AreaOptions(), run == 2 ? absl::Seconds(10) : absl::ZeroDuration()));
    ASSERT_OK_AND_ASSIGN(answers[run], RunSteps(remote.tier.get(), run > 0));
    EXPECT_EQ(remote.tier->counters().retrieve_calls, 3 * kLayers);
  }
  ExpectSameAnswers(answers[0], answers[1]);
  ExpectSameAnswers(answers[0], answers[2]);
}

// Queries written where QueryStaging says (in the RemoteTier's region, read there by the node
// without a copy) give the answers that queries from the caller's memory give, serially and
// concurrently; tiers without such room offer none, nor do shapes that do not fit.
TEST(ConcurrentRetrieveTest, RemoteTierQueriesWrittenInPlaceMatchQueriesFromTheCaller) {
  StepAnswers answers[3];
  for (int run : {0, 1, 2}) {
    ASSERT_OK_AND_ASSIGN(RemoteOverLoopback remote, StartRemote(AreaOptions(/*query_room=*/true)));
    Tier* tier = remote.tier.get();
    ASSERT_OK_AND_ASSIGN(answers[run],
                         RunSteps(tier, /*concurrent=*/run == 2, /*in_place=*/run > 0));
    if (run == 0) {
      const size_t entries = kSeqs * kKvHeads;
      const absl::Span<float> a = tier->QueryStaging(WideSpec(), 0, entries, kBudget, 0);
      const absl::Span<float> b = tier->QueryStaging(WideSpec(), 1, entries, kBudget, 0);
      ASSERT_EQ(a.size(), entries * kGroup * kDim);
      EXPECT_GE(b.data(), a.data() + a.size());  // each area its own room
      EXPECT_TRUE(tier->QueryStaging(WideSpec(), kLayers, entries, kBudget, 0).empty());
      EXPECT_TRUE(tier->QueryStaging(WideSpec(), -1, entries, kBudget, 0).empty());
      EXPECT_TRUE(
          tier->QueryStaging(WideSpec(), 0, 4 * entries, kBudget, 0).empty());  // rows do not fit
      EXPECT_TRUE(tier->QueryStaging(WideSpec(), 0, 0, kBudget, 0).empty());
    }
  }
  ExpectSameAnswers(answers[0], answers[1]);
  ExpectSameAnswers(answers[0], answers[2]);
  ASSERT_OK_AND_ASSIGN(RemoteOverLoopback no_room, StartRemote(AreaOptions(/*query_room=*/false)));
  EXPECT_TRUE(no_room.tier->QueryStaging(WideSpec(), 0, kSeqs * kKvHeads, kBudget, 0).empty());
  ASSERT_OK_AND_ASSIGN(auto local,
                       CreateLocalTier(kvstore::NodeOptions{8 << 20, 16, 4}, AreaOptions(true)));
  EXPECT_TRUE(local->QueryStaging(WideSpec(), 0, kSeqs * kKvHeads, kBudget, 0).empty());
}

// A server from before results_in_region: Retrieve's results come in the reply whatever the
// request asks for, and nothing is put (its answers name resident slots only). Just enough of
// the service for a RemoteTier with a region.
class ReplyResultsServer final : public v1::KvRecall::Service {
 public:
  grpc::Status AttachWorker(grpc::ServerContext*, const v1::AttachWorkerRequest*,
                            v1::AttachWorkerResponse*) override {
    return grpc::Status::OK;
  }
  grpc::Status RegisterModel(grpc::ServerContext*, const v1::RegisterModelRequest*,
                             v1::RegisterModelResponse*) override {
    return grpc::Status::OK;
  }
  grpc::Status OpenSequence(grpc::ServerContext*, const v1::OpenSequenceRequest*,
                            v1::OpenSequenceResponse*) override {
    return grpc::Status::OK;
  }
  grpc::Status Retrieve(grpc::ServerContext*, const v1::RetrieveRequest* req,
                        v1::RetrieveResponse* resp) override {
    for (int i = 0; i < req->entries_size(); ++i) {
      v1::RetrieveResult* r = resp->add_results();
      proto::PackInt32s({3, 5, 8 + i}, r->mutable_token_ids());
      proto::PackSlots({2, 0, 1}, r->mutable_slots());
    }
    return grpc::Status::OK;
  }
};

// A RemoteTier with a region takes such a reply's results, not the bytes its region happens to
// hold where results_in_region would have put them.
TEST(RemoteTierTest, ResultsInTheReplyAreTakenFromTheReply) {
  ReplyResultsServer service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  RemoteTierOptions r;
  r.target = absl::StrCat("127.0.0.1:", port);
  r.ucx_tls = "tcp";
  TierOptions options;
  options.recall_buffer_bytes = RecallBufferBytes(2, 4, 2 * Spec().row_bytes());
  ASSERT_OK_AND_ASSIGN(auto tier, CreateRemoteTier(r, options));
  ASSERT_OK(tier->RegisterModel(Spec()));
  ASSERT_OK(tier->OpenSequence("s", "m", {1, 2, 3}).status());
  std::vector<float> q = {1, 0, 1, 0};
  RetrieveBatch rb{1, 4, Method::kExact, {{"s", 0, q, 0, 10, 1}, {"s", 0, q, 0, 10, 2}}};
  std::vector<Recalled> out;
  ASSERT_OK(tier->Retrieve(rb, &out));
  ASSERT_EQ(out.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_THAT(out[i].token_ids, ElementsAre(3, 5, 8 + i));
    EXPECT_THAT(out[i].slots, ElementsAre(2, 0, 1));
    EXPECT_TRUE(out[i].fill_slots.empty());
  }
  server->Shutdown();
}

// A caller polling for its reply still gets DEADLINE_EXCEEDED at the call's deadline from a node
// that is slow to put the rows.
TEST(ConcurrentRetrieveTest, PolledRemoteTierRetrieveEndsAtItsDeadline) {
  TierOptions options = AreaOptions();
  options.retrieve_deadline = absl::Milliseconds(200);
  ASSERT_OK_AND_ASSIGN(RemoteOverLoopback remote,
                       StartRemote(options, /*reply_poll=*/absl::Seconds(30),
                                   /*put_delay=*/absl::Milliseconds(1500)));
  const absl::Time start = absl::Now();
  EXPECT_THAT(RunSteps(remote.tier.get(), /*concurrent=*/false),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(1400));  // not the node's 1.5 s
}

// AppendKVBatch through both tiers (RemoteTier sends one AppendKVBatch RPC; the name keeps
// "RemoteTier" for the TSan pass, which leaves out uninstrumented gRPC): each append is
// stored or refused on its own, the first refusal is the result, and what was stored is what a
// Retrieve reads back.
TEST(AppendKVBatchTest, LocalTierAndRemoteTierStoreOrRefuseEachAppendOnItsOwn) {
  ASSERT_OK_AND_ASSIGN(auto server,
                       bench::StartLoopbackServer(kvstore::NodeOptions{1 << 20, 2, 1}, "tcp"));
  RemoteTierOptions r;
  r.target = server->target;
  r.ucx_tls = "tcp";
  TierOptions options;
  options.recall_buffer_bytes = 1024;
  ASSERT_OK_AND_ASSIGN(auto local, CreateLocalTier(kvstore::NodeOptions{1 << 20, 2, 1}, options));
  ASSERT_OK_AND_ASSIGN(auto remote, CreateRemoteTier(r, options));
  for (Tier* tier : {local.get(), remote.get()}) {
    SCOPED_TRACE(tier->Describe());
    ASSERT_OK(tier->RegisterModel(Spec()));
    for (const char* id : {"s1", "s2", "s3"})
      ASSERT_OK(tier->OpenSequence(id, "m", {1, 2, 3}).status());
    auto append = [](const std::string& id, int64_t start, std::vector<float> k,
                     std::vector<int32_t> ids = {}) {
      SequenceAppend a{id, {}};
      a.batch.token_start = start;
      a.batch.num_tokens = static_cast<int64_t>(k.size() / 2);
      a.batch.token_ids = std::move(ids);
      for (int l = 0; l < 2; ++l) {
        a.batch.keys.push_back(Floats(k));
        std::vector<float> v = k;
        for (float& x : v) x += 100 * (l + 1);
        a.batch.values.push_back(Floats(v));
      }
      return a;
    };
    std::vector<bool> stored;
    std::vector<SequenceAppend> batch = {append("s1", 0, {1, 0, 5, 0, 2, 0}),
                                         append("s2", 0, {0, 1, 0, 2, 0, 3}),
                                         append("s3", 1, {1, 1, 1, 1}), append("s1", 3, {9, 9})};
    EXPECT_THAT(tier->AppendKVBatch(batch, &stored), StatusIs(absl::StatusCode::kInvalidArgument))
        << "s1 twice";
    batch.pop_back();
    EXPECT_THAT(tier->AppendKVBatch(batch, &stored),
                StatusIs(absl::StatusCode::kFailedPrecondition));
    EXPECT_THAT(stored, ElementsAre(true, true, false));
    // Decode tokens, their ids with them; an unknown sequence fails alone.
    batch = {append("s1", 3, {3, 0}, {4}), append("nope", 0, {1, 1}), append("s3", 0, {7, 7}),
             append("s2", 3, {0, 4}, {4})};
    // LocalTier asks the node; RemoteTier knows it never opened the sequence.
    EXPECT_THAT(tier->AppendKVBatch(batch, &stored),
                StatusIs(tier == local.get() ? absl::StatusCode::kNotFound
                                             : absl::StatusCode::kFailedPrecondition));
    EXPECT_THAT(stored, ElementsAre(true, false, true, true));
    ASSERT_OK_AND_ASSIGN(auto stats, tier->Stats(true));
    std::map<std::string, int64_t> tokens;
    for (const auto& seq : stats.sequences) tokens[seq.sequence_id] = seq.stored_tokens;
    EXPECT_EQ(tokens["s1"], 4);
    EXPECT_EQ(tokens["s2"], 4);
    EXPECT_EQ(tokens["s3"], 1);
    // s1's layer 1 as stored: the best two of keys (1,0) (5,0) (2,0) (3,0) for query (1, 0).
    ExpectBestTwo(*tier, "s1", {1, 3}, {5, 0, 205, 200, 3, 0, 203, 200});
  }
}

// RecallBufferBytes makes exactly enough room: rows of every area, then its results at the end.
TEST(RecallBufferTest, SizedBufferFitsAndOneLessEntryDoesNot) {
  for (int areas : {1, 3}) {
    for (int budget : {1, 7, 1024}) {
      const size_t pair = 512;
      TierOptions o;
      o.staging_areas = areas;
      o.recall_buffer_bytes = RecallBufferBytes(5, budget, pair, areas);
      RetrieveBatch b;
      b.budget = budget;
      b.entries.resize(5);
      for (int a = 0; a < areas; ++a) {
        b.staging_area = a;
        uint64_t first_row = 0, results = 0;
        ASSERT_OK(internal::CheckRecallFits(b, pair, o, &first_row, &results));
        const uint64_t area_start = first_row * pair;
        EXPECT_GE(results, area_start + 5 * static_cast<uint64_t>(budget) * pair);
        EXPECT_EQ(results % 8, 0u);
        EXPECT_LE(results + 5 * kvstore::RetrieveResultBytes(budget), area_start + o.recall_buffer_bytes / areas);
      }
      b.entries.resize(6);
      uint64_t first_row = 0;
      EXPECT_THAT(internal::CheckRecallFits(b, pair, o, &first_row), StatusIs(absl::StatusCode::kInvalidArgument));
    }
  }
}

// With query floats RecallBufferBytes also makes room for the batch's queries, between its rows
// and its results; without, there is none unless the rounding happens to leave it.
TEST(RecallBufferTest, QueriesGetRoomBetweenRowsAndResultsWhenSizedForThem) {
  for (int areas : {1, 3}) {
    for (int budget : {1, 7, 1024}) {
      const size_t pair = 512;
      const int64_t floats = 4 * 128;  // group 4 x head_dim 128
      const uint64_t query_bytes = 5 * floats * sizeof(float);
      TierOptions o;
      o.staging_areas = areas;
      o.recall_buffer_bytes = RecallBufferBytes(5, budget, pair, areas, floats);
      RetrieveBatch b;
      b.budget = budget;
      b.entries.resize(5);
      for (int a = 0; a < areas; ++a) {
        b.staging_area = a;
        uint64_t first_row = 0, results = 0, queries = 0;
        ASSERT_OK(
            internal::CheckRecallFits(b, pair, o, &first_row, &results, query_bytes, &queries));
        ASSERT_NE(queries, internal::kNoQueryRoom);
        EXPECT_EQ(queries % 64, 0u);
        EXPECT_GE(queries,
                  first_row * pair + 5 * static_cast<uint64_t>(budget) * pair);  // after the rows
        EXPECT_LE(queries + query_bytes, results);  // before the results
      }
      // A batch with larger queries than the room: they travel in the request.
      uint64_t first_row = 0, results = 0, queries = 0;
      ASSERT_OK(
          internal::CheckRecallFits(b, pair, o, &first_row, &results, 4 * query_bytes, &queries));
      EXPECT_EQ(queries, internal::kNoQueryRoom);
      ASSERT_OK(internal::CheckRecallFits(b, pair, o, &first_row, &results, 0, &queries));
      EXPECT_EQ(queries, internal::kNoQueryRoom) << "no queries, no room needed";
    }
  }
}

// A confused node's result in the region cannot claim more tokens than the budget.
TEST(RecallBufferTest, UnpackRejectsCountsBeyondTheBudget) {
  std::vector<uint8_t> buf(kvstore::RetrieveResultBytes(4), 0);
  const uint32_t ok[2] = {2, 1};
  std::memcpy(buf.data(), ok, 8);
  const int32_t ids[2] = {5, 9};
  std::memcpy(buf.data() + 8, ids, 8);
  const uint8_t slots[6] = {3, 0, 1, 0, 1, 0};  // slots 3, 1; fill slot 1
  std::memcpy(buf.data() + 16, slots, 6);
  Recalled r;
  ASSERT_OK(internal::UnpackRecalledFromRegion(buf.data(), 4, &r));
  EXPECT_THAT(r.token_ids, ElementsAre(5, 9));
  EXPECT_THAT(r.slots, ElementsAre(3, 1));
  EXPECT_THAT(r.fill_slots, ElementsAre(1));
  ASSERT_OK(internal::CheckRecalled(r, 4));
  const uint32_t too_many[2] = {5, 0};
  std::memcpy(buf.data(), too_many, 8);
  EXPECT_THAT(internal::UnpackRecalledFromRegion(buf.data(), 4, &r), StatusIs(absl::StatusCode::kInternal));
  const uint32_t fills_over[2] = {2, 3};
  std::memcpy(buf.data(), fills_over, 8);
  EXPECT_THAT(internal::UnpackRecalledFromRegion(buf.data(), 4, &r), StatusIs(absl::StatusCode::kInternal));
}

// The slot-map check against a plain one (every rule spelt out, one token at a time) over random
// valid maps and random breakages of them, at sizes around the vector widths: a confused node's
// reply is refused exactly when one rule is broken, through the region too.
bool PlainCheck(const Recalled& r, int budget) {
  const size_t n = r.token_ids.size();
  if (n > static_cast<size_t>(budget) || r.slots.size() != n || r.fill_slots.size() > n)
    return false;
  std::vector<int> seen(static_cast<size_t>(budget), 0);
  for (size_t j = 0; j < n; ++j) {
    if (j > 0 && r.token_ids[j] <= r.token_ids[j - 1]) return false;
    if (r.slots[j] < 0 || r.slots[j] >= budget || seen[static_cast<size_t>(r.slots[j])]++ != 0)
      return false;
  }
  for (int32_t s : r.fill_slots) {
    if (s < 0 || s >= budget || seen[static_cast<size_t>(s)] != 1) return false;
    seen[static_cast<size_t>(s)] = 2;
  }
  return true;
}

TEST(RecallBufferTest, CheckRefusesExactlyTheBrokenSlotMaps) {
  std::mt19937 rng(7);
  int refused = 0, checked = 0;
  for (int n : {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 65, 100, 1024}) {
    for (int extra : {0, 5, 64}) {
      const int budget = n + extra;
      if (budget == 0) continue;
      for (int trial = 0; trial < 40; ++trial) {
        Recalled r;
        std::vector<int32_t> pool(static_cast<size_t>(budget));
        for (int i = 0; i < budget; ++i) pool[static_cast<size_t>(i)] = i;
        std::shuffle(pool.begin(), pool.end(), rng);
        r.slots.assign(pool.begin(), pool.begin() + n);
        int32_t t = static_cast<int32_t>(rng() % 5);
        for (int j = 0; j < n; ++j) r.token_ids.push_back(t += 1 + static_cast<int32_t>(rng() % 9));
        const int m = n == 0 ? 0 : static_cast<int>(rng() % (n + 1));
        r.fill_slots.assign(r.slots.begin(), r.slots.begin() + m);
        std::shuffle(r.fill_slots.begin(), r.fill_slots.end(), rng);
        ASSERT_TRUE(PlainCheck(r, budget));
        ASSERT_OK(internal::CheckRecalled(r, budget)) << n << " tokens, budget " << budget;
        if (n == 0) continue;
        // One breakage (some may leave the map valid, e.g. a fill moved to another selected slot).
        const size_t j = rng() % static_cast<size_t>(n), k = rng() % static_cast<size_t>(n);
        const int32_t free_slot = extra > 0 ? pool[static_cast<size_t>(n)] : budget;
        switch (trial % 8) {
          case 0:
            r.token_ids[j] = r.token_ids[k];
            break;  // repeated or unsorted id
          case 1:
            std::swap(r.token_ids[j], r.token_ids[k]);
            break;  // unsorted ids
          case 2:
            r.slots[j] = r.slots[k];
            break;  // slot twice
          case 3:
            r.slots[j] = trial % 16 < 8 ? budget : -1 - static_cast<int32_t>(rng() % 3);
            break;
          case 4:
            r.slots[j] = free_slot;
            break;  // out of range or free
          case 5:
            if (m > 0) r.fill_slots[rng() % m] = free_slot;
            break;  // fill outside the selection
          case 6:
            if (m > 1) r.fill_slots[0] = r.fill_slots[1];
            break;  // fill twice
          case 7:
            if (m > 0) r.fill_slots[rng() % m] = trial % 16 < 8 ? budget : -1;
            break;
        }
        const bool want = PlainCheck(r, budget);
        refused += !want;
        ++checked;
        EXPECT_EQ(internal::CheckRecalled(r, budget).ok(), want)
            << n << " tokens, budget " << budget << ", breakage " << trial % 8;
        // The same map through the region's layout (ids, then uint16 slots and fills), where it
        // fits.
        bool fits = true;
        for (int32_t s : r.slots) fits &= s >= 0 && s < 65536;
        for (int32_t s : r.fill_slots) fits &= s >= 0 && s < 65536;
        if (!fits) continue;
        std::vector<uint8_t> buf(kvstore::RetrieveResultBytes(budget), 0);
        const uint32_t counts[2] = {static_cast<uint32_t>(n), static_cast<uint32_t>(m)};
        std::memcpy(buf.data(), counts, 8);
        std::memcpy(buf.data() + 8, r.token_ids.data(), 4 * static_cast<size_t>(n));
        uint8_t* p = buf.data() + 8 + 4 * static_cast<size_t>(n);
        for (const std::vector<int32_t>* v : {&r.slots, &r.fill_slots}) {
          for (int32_t s : *v) {
            *p++ = static_cast<uint8_t>(s);
            *p++ = static_cast<uint8_t>(s >> 8);
          }
        }
        Recalled back;
        const absl::Status st = internal::UnpackRecalledFromRegion(buf.data(), budget, &back);
        EXPECT_EQ(st.ok(), want) << st;
        if (!want) {
          EXPECT_THAT(st, StatusIs(absl::StatusCode::kInternal));
        } else {
          EXPECT_EQ(back.token_ids, r.token_ids);
          EXPECT_EQ(back.slots, r.slots);
          EXPECT_EQ(back.fill_slots, r.fill_slots);
        }
      }
    }
  }
  EXPECT_GT(refused, checked / 2) << "the breakages must mostly break";
}

}  // namespace
}  // namespace kvrecall::client
