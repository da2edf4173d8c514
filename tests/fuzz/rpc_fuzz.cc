// Fuzz target: request validation of every RPC of the tier's gRPC service, through the real
// handlers (kvstore/grpc_service.h) and the real kvstore::Node behind them.
//
// One process-wide in-process gRPC server (no port) serves a small Node (1 MiB arena, 4-token
// blocks, in-process transport so that AllocateBlocks and worker delivery are live). Before each
// input the node is reset to the same seeded state: model "m" (3 layers, 4 q-heads, 2 kv-heads,
// head_dim 4, bf16, vocab 64); tenant "t" with sequence "s" (10 committed tokens, a cluster
// index) and sequence "o" (6-token prompt, nothing stored); worker "w" of tenant "t" attached to
// a 256 KiB region with an empty slot mirror. So a crash reproduces from its input alone.
// The service authenticates (kvstore/auth.h): the token file names tenant "t" (quotas: 8
// sequences, 16 KiB, 1000 requests/s, arena ingest) and an admin; every call of an input carries
// t's bearer token until a call 13 changes it.
//
// Input: calls, each [u8 selector][u16 LE length][payload]; the payload is the request message
// (calls whose payload does not parse are skipped). selector & 0x0f picks the call:
//   0 RegisterModel  1 OpenSequence  2 AppendKV  3 AllocateBlocks  4 CommitBlocks  5 Retrieve
//   6 BuildIndex  7 FetchKV  8 AttachWorker  9 CloseSequence  10 Stats  11 Drain
//   12 advance the node's (fake) clock by the payload's first u32 (LE) milliseconds
//   13 the authorization metadata of the following calls: empty payload none, "1" t's bearer
//      token, "2" the admin's, anything else the payload itself (printable ASCII only; other
//      bytes are dropped, as gRPC refuses them before sending)
//   14 parse the payload as a token file (ParseTokenTable), without applying it
//   15 AppendKVBatch
// AppendKV's payload is its stream: chunks [u16 LE length][AppendKVRequest]; selector bit 0x80
// cancels the stream after the last chunk instead of half-closing it. A CommitBlocks with
// ingest_id 0 names the last ingest an AllocateBlocks of this input was granted.
// Any response status is fine; crashes, sanitizer reports, hangs and leaks are findings.
//
// KVRECALL_FUZZ_WRITE_SEEDS=DIR: writes seed inputs into DIR and exits.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/model_spec.h"
#include "grpcpp/grpcpp.h"
#include "kvstore/auth.h"
#include "kvstore/grpc_service.h"
#include "kvstore/node.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"
#include "transport/transport.h"

namespace kvrecall::kvstore {
namespace {

constexpr int kRpcs = 16;
constexpr char kTenantToken[] = "Bearer fuzz-tenant-t-token-0123";
constexpr char kAdminToken[] = "Bearer fuzz-admin-token-01234567";
constexpr int kBlockTokens = 4;
constexpr int kSeqTokens = 10;

struct Server {
  FakeClock clock;
  std::unique_ptr<transport::Transport> transport = transport::CreateInProcessTransport();
  std::unique_ptr<transport::RegisteredRegion> worker_region;
  std::unique_ptr<Node> node;
  std::unique_ptr<Authenticator> auth;
  std::unique_ptr<GrpcService> service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::KvRecall::Stub> stub;
};
Server* g = nullptr;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_rpc: %s\n", what.c_str());
  std::abort();
}

ModelSpec SeedSpec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = 3;
  s.num_q_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 4;
  s.kv_dtype = DType::kBF16;
  s.vocab_size = 64;
  return s;
}

std::vector<int32_t> SeedIds(int n) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = (i * 7 + 3) % 64;
  return ids;
}

// [num_kv_heads][n][head_dim] bf16 rows, all finite.
std::string SeedRows(int n, int salt) {
  const ModelSpec spec = SeedSpec();
  std::string rows(static_cast<size_t>(spec.num_kv_heads) * n * spec.head_dim * 2, '\0');
  for (size_t i = 0; i < rows.size(); i += 2) {
    rows[i] = static_cast<char>(i * 13 + salt);
    rows[i + 1] = static_cast<char>(0x3e + ((i / 2) % 3));  // ~0.1 .. 0.5, either sign below
  }
  return rows;
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) Fail(std::string("seeding: ") + what + ": " + s.ToString());
}

// Drops whatever the last input left and restores the seeded state.
void Reset() {
  Node& node = *g->node;
  node.SetDraining(false);
  for (const SequenceStats& q : node.Stats(true).sequences) {
    (void)node.CloseSequence(q.tenant, q.sequence_id, /*drop=*/true);
  }
  node.WaitForIndexJobs();
  // Pending ingests run out (OpenSequence expires them).
  g->clock.Advance(node.options().ingest_lease + absl::Seconds(1));
  const std::vector<int32_t> ids = SeedIds(kSeqTokens);
  // A server-side stream of the last input may still hold its sequence (a reactor finishes after
  // its client returned); until it lets go, its published blocks would be shared into "s".
  absl::StatusOr<OpenSequenceResult> opened = node.OpenSequence({"t", "m", "s", ids});
  for (int i = 0; opened.ok() && opened->matched_tokens > 0; ++i) {
    if (i == 20000) Fail("a stream of the last input still holds its blocks after 2 s");
    (void)node.CloseSequence("t", "s", /*drop=*/true);
    absl::SleepFor(absl::Microseconds(100));
    opened = node.OpenSequence({"t", "m", "s", ids});
  }
  Check(opened.status(), "open s");
  absl::StatusOr<std::shared_ptr<Sequence>> seq = node.FindSequence("t", "s");
  Check(seq.status(), "find s");
  Check((*seq)->BeginAppend(), "begin s");
  const std::string rows = SeedRows(kSeqTokens, 0);
  const absl::Span<const uint8_t> span(reinterpret_cast<const uint8_t*>(rows.data()), rows.size());
  for (int l = 0; l < SeedSpec().num_layers; ++l) {
    Check((*seq)->AppendChunk(l, 0, kSeqTokens, span, span), "append s");
  }
  Check((*seq)->CommitAppend().status(), "commit s");
  BuildIndexArgs b;
  b.tenant = "t";
  b.sequence_id = "s";
  b.method = indexer::Method::kCluster;
  b.first_layer = 1;
  b.token_begin = 2;
  Check(node.BuildIndex(b).status(), "index s");
  Check(node.OpenSequence({"t", "m", "o", SeedIds(6)}).status(), "open o");
  Check(node.AttachWorker("t", "w", g->worker_region->Describe()), "attach w");
}

template <typename Req>
bool Parse(absl::string_view payload, Req* req) {
  return req->ParseFromArray(payload.data(), static_cast<int>(payload.size()));
}

void AppendStream(absl::string_view payload, bool cancel, const std::string& authorization) {
  grpc::ClientContext ctx;
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
  v1::AppendKVResponse resp;
  std::unique_ptr<grpc::ClientWriter<v1::AppendKVRequest>> w = g->stub->AppendKV(&ctx, &resp);
  size_t i = 0;
  while (i + 2 <= payload.size()) {
    const size_t n = std::min<size_t>(static_cast<uint8_t>(payload[i]) |
                                          (size_t{static_cast<uint8_t>(payload[i + 1])} << 8),
                                      payload.size() - i - 2);
    v1::AppendKVRequest chunk;
    const bool ok = Parse(payload.substr(i + 2, n), &chunk);
    i += 2 + n;
    if (ok && !w->Write(chunk)) break;
  }
  if (cancel) {
    ctx.TryCancel();
  } else {
    w->WritesDone();
  }
  (void)w->Finish();
}

void Call(int rpc, bool flag, absl::string_view payload, uint64_t* last_ingest, std::string* authorization) {
  v1::KvRecall::Stub& stub = *g->stub;
  grpc::ClientContext ctx;
  if (!authorization->empty()) ctx.AddMetadata("authorization", *authorization);
  switch (rpc) {
    case 0: {
      v1::RegisterModelRequest req;
      v1::RegisterModelResponse resp;
      if (Parse(payload, &req)) (void)stub.RegisterModel(&ctx, req, &resp);
      break;
    }
    case 1: {
      v1::OpenSequenceRequest req;
      v1::OpenSequenceResponse resp;
      if (Parse(payload, &req)) (void)stub.OpenSequence(&ctx, req, &resp);
      break;
    }
    case 2:
      AppendStream(payload, flag, *authorization);
      break;
    case 3: {
      v1::AllocateBlocksRequest req;
      v1::AllocateBlocksResponse resp;
      if (Parse(payload, &req) && stub.AllocateBlocks(&ctx, req, &resp).ok()) {
        *last_ingest = resp.ingest_id();
      }
      break;
    }
    case 4: {
      v1::CommitBlocksRequest req;
      v1::CommitBlocksResponse resp;
      if (!Parse(payload, &req)) break;
      if (req.ingest_id() == 0) req.set_ingest_id(*last_ingest);
      (void)stub.CommitBlocks(&ctx, req, &resp);
      break;
    }
    case 5: {
      v1::RetrieveRequest req;
      v1::RetrieveResponse resp;
      if (Parse(payload, &req) && stub.Retrieve(&ctx, req, &resp).ok() &&
          (req.results_in_region()
               ? resp.results_size() != 0 ||
                     static_cast<int>(resp.region_results()) != req.entries_size()
               : resp.results_size() != req.entries_size() || resp.region_results() != 0)) {
        Fail("Retrieve answered OK with a result count that differs from the entries");
      }
      break;
    }
    case 6: {
      v1::BuildIndexRequest req;
      v1::BuildIndexResponse resp;
      if (Parse(payload, &req)) (void)stub.BuildIndex(&ctx, req, &resp);
      break;
    }
    case 7: {
      v1::FetchKVRequest req;
      if (!Parse(payload, &req)) break;
      std::unique_ptr<grpc::ClientReader<v1::FetchKVResponse>> r = stub.FetchKV(&ctx, req);
      v1::FetchKVResponse resp;
      while (r->Read(&resp)) {
      }
      (void)r->Finish();
      break;
    }
    case 8: {
      v1::AttachWorkerRequest req;
      v1::AttachWorkerResponse resp;
      if (Parse(payload, &req)) (void)stub.AttachWorker(&ctx, req, &resp);
      break;
    }
    case 9: {
      v1::CloseSequenceRequest req;
      v1::CloseSequenceResponse resp;
      if (Parse(payload, &req)) (void)stub.CloseSequence(&ctx, req, &resp);
      break;
    }
    case 10: {
      v1::StatsRequest req;
      v1::StatsResponse resp;
      if (Parse(payload, &req)) (void)stub.Stats(&ctx, req, &resp);
      break;
    }
    case 11: {
      v1::DrainRequest req;
      v1::DrainResponse resp;
      if (Parse(payload, &req)) (void)stub.Drain(&ctx, req, &resp);
      break;
    }
    case 12: {
      uint32_t ms = 0;
      for (size_t i = 0; i < 4 && i < payload.size(); ++i) {
        ms |= uint32_t{static_cast<uint8_t>(payload[i])} << (8 * i);
      }
      g->clock.Advance(absl::Milliseconds(ms));
      break;
    }
    case 13:
      if (payload == "1") {
        *authorization = kTenantToken;
      } else if (payload == "2") {
        *authorization = kAdminToken;
      } else {
        authorization->clear();
        for (char c : payload)
          if (c >= 0x20 && c < 0x7f) authorization->push_back(c);
      }
      break;
    case 14:
      (void)ParseTokenTable(payload);
      break;
    case 15: {
      v1::AppendKVBatchRequest req;
      v1::AppendKVBatchResponse resp;
      if (Parse(payload, &req)) (void)stub.AppendKVBatch(&ctx, req, &resp);
      break;
    }
  }
}

// --- seeds --------------------------------------------------------------------------------------

class SeedWriter {
 public:
  SeedWriter& Add(int rpc, const google::protobuf::Message& m, bool flag = false) {
    return Raw(rpc, m.SerializeAsString(), flag);
  }
  SeedWriter& Raw(int rpc, const std::string& payload, bool flag = false) {
    out_.push_back(static_cast<char>(rpc | (flag ? 0x80 : 0)));
    out_.push_back(static_cast<char>(payload.size() & 0xff));
    out_.push_back(static_cast<char>(payload.size() >> 8));
    out_ += payload;
    return *this;
  }
  void Write(const std::string& dir, const std::string& name) {
    std::ofstream(dir + "/" + name, std::ios::binary) << out_;
    out_.clear();
  }

 private:
  std::string out_;
};

std::string Chunks(const std::vector<v1::AppendKVRequest>& chunks) {
  std::string s;
  for (const v1::AppendKVRequest& c : chunks) {
    const std::string b = c.SerializeAsString();
    s.push_back(static_cast<char>(b.size() & 0xff));
    s.push_back(static_cast<char>(b.size() >> 8));
    s += b;
  }
  return s;
}

void WriteSeeds(const std::string& dir) {
  SeedWriter w;
  v1::RegisterModelRequest reg;
  v1::ModelSpec* spec = reg.mutable_spec();
  spec->set_model_id("m");
  spec->set_num_layers(3);
  spec->set_num_q_heads(4);
  spec->set_num_kv_heads(2);
  spec->set_head_dim(4);
  spec->set_kv_dtype(v1::DTYPE_BF16);
  spec->set_vocab_size(64);
  w.Add(0, reg).Write(dir, "register_same");
  spec->set_model_id("m2");
  spec->set_num_layers(2);
  spec->set_kv_dtype(v1::DTYPE_F32);
  spec->set_rope_theta(10000);

  v1::OpenSequenceRequest open;
  open.set_tenant("t");
  open.set_model_id("m2");
  open.set_sequence_id("n");
  for (int32_t id : SeedIds(9)) open.add_token_ids(id);
  w.Add(0, reg).Add(1, open).Write(dir, "register_open");
  open.set_model_id("m");
  open.set_sequence_id("s");
  open.clear_token_ids();
  for (int32_t id : SeedIds(kSeqTokens)) open.add_token_ids(id);
  w.Add(1, open).Write(dir, "reopen_s");

  // AppendKV into "o" (its prompt), one chunk per layer, then a second stream with decode ids.
  std::vector<v1::AppendKVRequest> chunks;
  for (int l = 0; l < 3; ++l) {
    v1::AppendKVRequest c;
    c.set_tenant("t");
    c.set_sequence_id("o");
    c.set_layer(l);
    c.set_token_start(0);
    c.set_num_tokens(6);
    c.set_keys(SeedRows(6, l));
    c.set_values(SeedRows(6, l + 7));
    chunks.push_back(c);
  }
  w.Raw(2, Chunks(chunks)).Write(dir, "append_o");
  w.Raw(2, Chunks(chunks), /*flag=*/true).Write(dir, "append_o_cancelled");
  std::vector<v1::AppendKVRequest> decode;
  for (int l = 0; l < 3; ++l) {
    v1::AppendKVRequest c;
    c.set_tenant("t");
    c.set_sequence_id("s");
    c.set_layer(l);
    c.set_token_start(kSeqTokens);
    c.set_num_tokens(1);
    c.set_keys(SeedRows(1, l));
    c.set_values(SeedRows(1, l));
    if (l == 0) {
      c.set_token_ids_start(kSeqTokens);
      c.add_token_ids(5);
    }
    decode.push_back(c);
  }
  w.Raw(2, Chunks(decode)).Write(dir, "append_decode_s");
  // The same decode token through AppendKVBatch, with "o"'s prompt in the same request.
  v1::AppendKVBatchRequest batch;
  batch.set_tenant("t");
  v1::SequenceAppend* one = batch.add_appends();
  one->set_sequence_id("s");
  one->set_token_start(kSeqTokens);
  one->set_num_tokens(1);
  one->add_token_ids(5);
  v1::SequenceAppend* prompt = batch.add_appends();
  prompt->set_sequence_id("o");
  prompt->set_token_start(0);
  prompt->set_num_tokens(6);
  for (int l = 0; l < 3; ++l) {
    one->mutable_keys()->append(SeedRows(1, l));
    one->mutable_values()->append(SeedRows(1, l));
    prompt->mutable_keys()->append(SeedRows(6, l));
    prompt->mutable_values()->append(SeedRows(6, l + 7));
  }
  w.Add(15, batch).Write(dir, "append_batch");

  v1::AllocateBlocksRequest alloc;
  alloc.set_tenant("t");
  alloc.set_sequence_id("o");
  alloc.set_token_start(0);
  alloc.set_num_tokens(6);
  v1::CommitBlocksRequest commit;
  commit.set_tenant("t");
  commit.set_sequence_id("o");
  for (int i = 0; i < 3 * 2; ++i) commit.add_checksums(0x12345678u + i);
  w.Add(3, alloc).Add(4, commit).Write(dir, "ingest_bad_crc");
  v1::CommitBlocksRequest abort_req;
  abort_req.set_tenant("t");
  abort_req.set_sequence_id("o");
  abort_req.set_abort(true);
  w.Add(3, alloc).Add(4, abort_req).Write(dir, "ingest_abort");
  w.Add(3, alloc).Raw(12, std::string("\x60\xea\x00\x00", 4)).Add(4, commit).Write(dir, "ingest_expired");

  v1::RetrieveRequest ret;
  ret.set_tenant("t");
  ret.set_layer(2);
  ret.set_budget(4);
  ret.set_method(v1::METHOD_CLUSTER);
  for (int h = 0; h < 2; ++h) {
    v1::RetrieveEntry* e = ret.add_entries();
    e->set_sequence_id("s");
    e->set_kv_head(h);
    for (int i = 0; i < 2 * 4; ++i) e->add_queries(i % 3 == 0 ? -0.5f : 0.25f);
    e->set_token_begin(1);
    e->set_token_end(kSeqTokens);
  }
  w.Add(5, ret).Write(dir, "retrieve_ids");
  ret.set_method(v1::METHOD_EXACT);
  ret.set_worker_id("w");
  ret.set_staging_area(1);
  ret.set_call_seq(1);
  ret.mutable_entries(0)->set_slot_epoch(1);
  ret.mutable_entries(1)->set_slot_epoch(1);
  ret.mutable_entries(1)->set_dest_row(4);
  v1::RetrieveRequest ret2 = ret;
  ret2.set_call_seq(2);
  ret2.mutable_entries(0)->set_token_begin(0);
  ret2.set_results_in_region(true);
  ret2.set_results_offset(4096);
  w.Add(5, ret).Add(5, ret2).Write(dir, "retrieve_worker_delta");

  v1::BuildIndexRequest build;
  build.set_tenant("t");
  build.set_sequence_id("s");
  build.set_method(v1::METHOD_CTKVR);
  build.set_first_layer(1);
  build.set_token_begin(2);
  build.set_num_queries(2);
  for (int l = 1; l < 3; ++l) {
    v1::LayerQueries* q = build.add_layers();
    q->set_layer(l);
    for (int i = 0; i < 2 * 4 * 4; ++i) q->add_queries((i % 5) * 0.1f - 0.2f);
  }
  ret.set_method(v1::METHOD_CTKVR);
  w.Add(6, build).Add(5, ret).Write(dir, "build_ctkvr_retrieve");

  v1::FetchKVRequest fetch;
  fetch.set_tenant("t");
  fetch.set_sequence_id("s");
  fetch.set_layer(1);
  fetch.set_kv_head(1);
  fetch.set_token_begin(0);
  fetch.set_token_end(kSeqTokens);
  w.Add(7, fetch).Write(dir, "fetch_range");
  fetch.add_token_ids(3);
  fetch.add_token_ids(9);
  w.Add(7, fetch).Write(dir, "fetch_ids");

  v1::AttachWorkerRequest attach;
  attach.set_tenant("t");
  attach.set_worker_id("w2");
  attach.set_transport("ucx");
  attach.set_peer_address("not an address");
  attach.set_remote_base(4096);
  attach.set_length(65536);
  w.Add(8, attach).Write(dir, "attach");

  v1::CloseSequenceRequest close;
  close.set_tenant("t");
  close.set_sequence_id("s");
  close.set_drop(true);
  w.Add(9, close).Add(5, ret).Write(dir, "drop_then_retrieve");

  v1::StatsRequest stats;
  stats.set_include_sequences(true);
  w.Add(10, stats).Write(dir, "stats");
  w.Raw(13, "2").Add(10, stats).Raw(13, "Bearer not-a-token-0123456789").Add(10, stats).Raw(13, "")
      .Add(9, close).Write(dir, "auth_admin_wrong_none");
  w.Raw(14, "tenant a tok-a-0123456789abcdef\nadmin adm-0123456789abcdef\n"
            "limits a stored_bytes=1MiB sequences=3 requests_per_s=2.5 arena_ingest=true\n")
      .Write(dir, "token_file");

  v1::DrainRequest drain;
  drain.set_draining(true);
  open.set_sequence_id("new");
  w.Raw(13, "2").Add(11, drain).Raw(13, "1").Add(1, open).Write(dir, "drain_open");

  // A whole life: open, append, index, retrieve, fetch, close.
  open.set_sequence_id("life");
  for (v1::AppendKVRequest& c : chunks) c.set_sequence_id("life");
  build.set_sequence_id("life");
  for (int h = 0; h < 2; ++h) ret.mutable_entries(h)->set_sequence_id("life");
  ret.set_worker_id("");
  fetch.set_sequence_id("life");
  close.set_sequence_id("life");
  w.Add(1, open).Raw(2, Chunks(chunks)).Add(6, build).Add(5, ret).Add(7, fetch).Add(9, close)
      .Write(dir, "life");
}

}  // namespace
}  // namespace kvrecall::kvstore

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace kvrecall::kvstore;
  if (const char* dir = std::getenv("KVRECALL_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  g = new Server();
  absl::StatusOr<std::unique_ptr<kvrecall::transport::RegisteredRegion>> region =
      g->transport->AllocateRegion(256 << 10);
  Check(region.status(), "worker region");
  g->worker_region = *std::move(region);
  const std::string tokens = "/tmp/fuzz_rpc_tokens." + std::to_string(::getpid());
  std::ofstream(tokens) << "tenant t " << (kTenantToken + 7) << "\nadmin " << (kAdminToken + 7)
                        << "\nlimits t sequences=8 stored_bytes=16KiB requests_per_s=1000 arena_ingest=true\n";
  absl::StatusOr<std::unique_ptr<Authenticator>> auth =
      Authenticator::Open(tokens, &g->clock, absl::Hours(24 * 365));
  Check(auth.status(), "token file");
  g->auth = *std::move(auth);
  std::remove(tokens.c_str());
  NodeOptions o;
  o.tenant_limits = [](const std::string& tenant) { return g->auth->LimitsOf(tenant); };
  o.memory_bytes = 1 << 20;
  o.block_tokens = kBlockTokens;
  o.search_threads = 1;
  o.try_hugepages = false;
  g->node = std::make_unique<Node>(o, g->transport.get(), &g->clock);
  Check(g->node->arena_status(), "arena");
  Check(g->node->RegisterModel(SeedSpec()).status(), "model");
  g->service = std::make_unique<GrpcService>(g->node.get(), 2);
  g->service->SetAuthenticator(g->auth.get());
  grpc::ServerBuilder builder;
  builder.RegisterService(g->service.get());
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  g->server = builder.BuildAndStart();
  if (g->server == nullptr) Fail("cannot start the in-process server");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  g->stub = kvrecall::v1::KvRecall::NewStub(g->server->InProcessChannel(args));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvrecall::kvstore;
  Reset();
  uint64_t last_ingest = 0;
  std::string authorization = kTenantToken;
  const absl::string_view in(reinterpret_cast<const char*>(data), size);
  size_t i = 0;
  while (i < in.size()) {
    const uint8_t sel = static_cast<uint8_t>(in[i]);
    size_t n = 0;
    if (i + 3 <= in.size()) {
      n = static_cast<uint8_t>(in[i + 1]) | (size_t{static_cast<uint8_t>(in[i + 2])} << 8);
    }
    i = std::min(i + 3, in.size());
    n = std::min(n, in.size() - i);
    Call((sel & 0x0f) % kRpcs, (sel & 0x80) != 0, in.substr(i, n), &last_ingest, &authorization);
    i += n;
  }
  g->node->WaitForIndexJobs();
  return 0;
}
