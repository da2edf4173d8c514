// --durable on a real kvrecall-server process: SIGKILL it while many sequences are being
// appended concurrently, restart it on the same --data-dir, and check that every acknowledged
// append is there bit-exact (FetchKV), and that unacknowledged ones are missing or complete,
// never partial or wrong.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"
#include "tests/testing/process.h"

namespace kvrecall::testing {
namespace {

using grpc::StatusCode;

constexpr int kLayers = 2, kKvHeads = 2, kHeadDim = 8, kThreads = 8;
constexpr int kHalf = 6, kTokens = 2 * kHalf;  // two appends of 6 tokens; blocks of 4
constexpr size_t kRow = kHeadDim * 2;          // bf16

// The bytes of one row, a function of (sequence, layer, K/V, head, token) only.
std::string RowBytes(int seq, int layer, bool v, int head, int token) {
  std::string r(kRow, '\0');
  // Unsigned arithmetic: the mix wraps by design.
  uint32_t x = (static_cast<uint32_t>(seq) * 7919u + static_cast<uint32_t>(layer) * 131u + (v ? 17u : 0u) +
                static_cast<uint32_t>(head) * 1009u + static_cast<uint32_t>(token) * 65537u) |
               1u;
  for (char& c : r) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    c = static_cast<char>(x);
  }
  return r;
}

std::string Name(int seq) { return absl::StrCat("seq", seq); }

class Client {
 public:
  explicit Client(const std::string& address) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    stub_ = v1::KvRecall::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
  }
  static void Deadline(grpc::ClientContext* ctx) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  }
  grpc::Status Register() {
    v1::RegisterModelRequest req;
    v1::ModelSpec* s = req.mutable_spec();
    s->set_model_id("m");
    s->set_num_layers(kLayers);
    s->set_num_q_heads(2 * kKvHeads);
    s->set_num_kv_heads(kKvHeads);
    s->set_head_dim(kHeadDim);
    s->set_kv_dtype(v1::DTYPE_BF16);
    s->set_vocab_size(1000);
    v1::RegisterModelResponse resp;
    grpc::ClientContext ctx;
    Deadline(&ctx);
    return stub_->RegisterModel(&ctx, req, &resp);
  }
  grpc::Status Open(int seq) {
    v1::OpenSequenceRequest req;
    req.set_tenant("t");
    req.set_model_id("m");
    req.set_sequence_id(Name(seq));
    for (int i = 0; i < kTokens; ++i) req.add_token_ids((seq * 31 + i) % 1000);
    v1::OpenSequenceResponse resp;
    grpc::ClientContext ctx;
    Deadline(&ctx);
    return stub_->OpenSequence(&ctx, req, &resp);
  }
  // One AppendKV stream: tokens [start, start + n) of both layers.
  grpc::Status Append(int seq, int start, int n) {
    v1::AppendKVResponse resp;
    grpc::ClientContext ctx;
    Deadline(&ctx);
    auto w = stub_->AppendKV(&ctx, &resp);
    for (int l = 0; l < kLayers; ++l) {
      v1::AppendKVRequest c;
      c.set_tenant("t");
      c.set_sequence_id(Name(seq));
      c.set_layer(l);
      c.set_token_start(start);
      c.set_num_tokens(n);
      for (int h = 0; h < kKvHeads; ++h) {
        for (int t = start; t < start + n; ++t) {
          c.mutable_keys()->append(RowBytes(seq, l, false, h, t));
          c.mutable_values()->append(RowBytes(seq, l, true, h, t));
        }
      }
      if (!w->Write(c)) break;
    }
    w->WritesDone();
    grpc::Status s = w->Finish();
    if (s.ok() && resp.stored_tokens() != start + n) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "unexpected stored_tokens");
    }
    return s;
  }
  // Stored tokens per sequence id.
  std::map<std::string, int64_t> Stored() {
    v1::StatsRequest req;
    req.set_include_sequences(true);
    v1::StatsResponse resp;
    grpc::ClientContext ctx;
    Deadline(&ctx);
    EXPECT_TRUE(stub_->Stats(&ctx, req, &resp).ok());
    std::map<std::string, int64_t> out;
    for (const auto& s : resp.sequences()) out[s.sequence_id()] = s.stored_tokens();
    return out;
  }
  // Rows [0, n) of (layer, head) via FetchKV: keys then values, each [n][kRow].
  grpc::Status Fetch(int seq, int layer, int head, int n, std::string* k, std::string* v) {
    v1::FetchKVRequest req;
    req.set_tenant("t");
    req.set_sequence_id(Name(seq));
    req.set_layer(layer);
    req.set_kv_head(head);
    req.set_token_begin(0);
    req.set_token_end(n);
    grpc::ClientContext ctx;
    Deadline(&ctx);
    auto r = stub_->FetchKV(&ctx, req);
    v1::FetchKVResponse chunk;
    while (r->Read(&chunk)) {
      k->append(chunk.keys());
      v->append(chunk.values());
    }
    return r->Finish();
  }

 private:
  std::unique_ptr<v1::KvRecall::Stub> stub_;
};

TEST(DurabilityTest, SigkillMidIngestLosesNoAcknowledgedAppend) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/durability.", getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::vector<std::string> flags = {"--memory=4MiB", "--block-tokens=4", "--transport=none",
                                          "--durable", "--data-dir=" + dir + "/data"};
  auto server = StartServer(dir, flags);
  ASSERT_TRUE(server.ok()) << server.status();
  {
    Client c(server->address());
    ASSERT_EQ(c.Register().error_code(), StatusCode::OK);
  }

  // acked[seq] = tokens acknowledged; tried[seq] = tokens of the append in flight or done.
  std::mutex mu;
  std::map<int, int> acked, tried;
  std::atomic<int> acks{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Client c(server->address());
      for (int i = 0; !stop.load(); ++i) {
        const int seq = t * 100000 + i;
        if (!c.Open(seq).ok()) return;
        for (int half = 0; half < 2; ++half) {
          {
            std::lock_guard<std::mutex> lock(mu);
            tried[seq] = (half + 1) * kHalf;
          }
          if (!c.Append(seq, half * kHalf, kHalf).ok()) return;  // the server is gone
          std::lock_guard<std::mutex> lock(mu);
          acked[seq] = (half + 1) * kHalf;
          acks.fetch_add(1);
        }
      }
    });
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (acks.load() < 60 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_EQ(kill(server->process.pid(), SIGKILL), 0);
  stop = true;
  for (auto& th : threads) th.join();
  server->process.Wait(absl::Seconds(10)).IgnoreError();
  ASSERT_GE(acks.load(), 60);

  auto again = StartServer(dir, flags);
  ASSERT_TRUE(again.ok()) << again.status();
  Client c(again->address());
  const std::map<std::string, int64_t> stored = c.Stored();
  int checked = 0;
  for (const auto& [seq, tokens] : tried) {
    const int ack = acked.count(seq) ? acked[seq] : 0;
    auto it = stored.find(Name(seq));
    const int64_t have = it == stored.end() ? 0 : it->second;
    // Acknowledged appends survive; the one in flight is all there or not at all.
    ASSERT_GE(have, ack) << Name(seq);
    ASSERT_LE(have, tokens) << Name(seq);
    ASSERT_EQ(have % kHalf, 0) << Name(seq) << " kept a partial append";
    if (have == 0) continue;
    for (int l = 0; l < kLayers; ++l) {
      for (int h = 0; h < kKvHeads; ++h) {
        std::string k, v;
        ASSERT_TRUE(c.Fetch(seq, l, h, static_cast<int>(have), &k, &v).ok()) << Name(seq);
        std::string want_k, want_v;
        for (int tok = 0; tok < have; ++tok) {
          want_k += RowBytes(seq, l, false, h, tok);
          want_v += RowBytes(seq, l, true, h, tok);
        }
        ASSERT_TRUE(k == want_k && v == want_v) << Name(seq) << " layer " << l << " head " << h;
      }
    }
    ++checked;
  }
  EXPECT_GE(checked, 30);
  // The recovered node keeps taking appends.
  ASSERT_EQ(c.Open(999999).error_code(), StatusCode::OK);
  ASSERT_EQ(c.Append(999999, 0, kHalf).error_code(), StatusCode::OK);
}

}  // namespace
}  // namespace kvrecall::testing
