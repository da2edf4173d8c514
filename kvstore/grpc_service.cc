#include "kvstore/grpc_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "kvstore/internal/reused_buffer.h"
#include "proto/convert.h"

namespace kvrecall::kvstore {
namespace {

absl::Span<const uint8_t> AsBytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

using proto::ToGrpc;

constexpr char kVersion[] = "kvrecall 0.1.0";
constexpr size_t kFetchChunkBytes = 1 << 20;

// The caller of a request: with `auth`, the principal of its bearer token (UNAUTHENTICATED
// without a valid one), after taking one request from a tenant's rate budget; without, an admin.
absl::StatusOr<Principal> CallerOf(Authenticator* auth, grpc::CallbackServerContext* ctx) {
  if (auth == nullptr) return Principal{"", true};
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  const absl::string_view value =
      it == md.end() ? absl::string_view() : absl::string_view(it->second.data(), it->second.size());
  ASSIGN_OR_RETURN(Principal p, auth->Authenticate(value));
  if (!p.admin) RETURN_IF_ERROR(auth->AdmitRequest(p.tenant));
  return p;
}

// The tenant a request acts for: its `claimed` field without `auth`; with it, the token's tenant,
// which the field must be empty or name.
absl::StatusOr<std::string> TenantOf(Authenticator* auth, grpc::CallbackServerContext* ctx,
                                     const std::string& claimed) {
  if (auth == nullptr) return claimed;
  ASSIGN_OR_RETURN(Principal p, CallerOf(auth, ctx));
  if (p.admin) {
    return absl::PermissionDeniedError("an admin token does not act for a tenant; use the tenant's token");
  }
  if (!claimed.empty() && claimed != p.tenant) {
    return absl::UnauthenticatedError(
        absl::StrCat("the bearer token does not authenticate tenant '", claimed, "'"));
  }
  return p.tenant;
}

// The sequences and per-tenant usage of `s` into resp: every tenant's when `tenant` is empty,
// else that tenant's only.
void FillTenantUsage(const NodeStats& s, const std::string& tenant, v1::StatsResponse* resp) {
  for (const SequenceStats& q : s.sequences) {
    if (!tenant.empty() && q.tenant != tenant) continue;
    v1::SequenceInfo* info = resp->add_sequences();
    info->set_tenant(q.tenant);
    info->set_sequence_id(q.sequence_id);
    info->set_model_id(q.model_id);
    info->set_stored_tokens(q.stored_tokens);
    info->set_bytes(q.bytes);
    info->set_state(q.closed ? "closed" : "open");
    info->set_blocks(q.blocks);
    info->set_shared_blocks(q.shared_blocks);
    info->set_matched_tokens(q.matched_tokens);
  }
  for (const TenantStats& t : s.tenants) {
    if (!tenant.empty() && t.tenant != tenant) continue;
    v1::TenantUsage* u = resp->add_tenants();
    u->set_tenant(t.tenant);
    u->set_sequences(t.sequences);
    u->set_tokens(t.tokens);
    u->set_bytes(t.bytes);
    u->set_logical_bytes(t.logical_bytes);
    u->set_unique_blocks(t.unique_blocks);
    u->set_shared_blocks(t.shared_blocks);
    u->set_prompt_tokens(t.prompt_tokens);
    u->set_matched_tokens(t.matched_tokens);
    u->set_quota_charged_bytes(t.quota_charged_bytes);
    u->set_quota_stored_bytes(t.quota_stored_bytes);
    u->set_quota_sequences(t.quota_sequences);
  }
}

// Runs fn(Kept*) (returning absl::Status) on the pool and finishes the unary call with its
// status. fn fills a default-constructed Kept: state worth freeing after the reply is sent,
// destroyed once the call is finished.
template <typename Kept, typename Fn>
grpc::ServerUnaryReactor* RunUnaryKeeping(ThreadPool* pool, grpc::CallbackServerContext* ctx,
                                          Fn fn) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  pool->Schedule([reactor, fn = std::move(fn)]() mutable {
    Kept kept;
    reactor->Finish(ToGrpc(fn(&kept)));
  });
  return reactor;
}

// As RunUnaryKeeping for calls that keep nothing: fn() -> absl::Status.
template <typename Fn>
grpc::ServerUnaryReactor* RunUnary(ThreadPool* pool, grpc::CallbackServerContext* ctx, Fn fn) {
  struct Nothing {};
  return RunUnaryKeeping<Nothing>(pool, ctx,
                                  [fn = std::move(fn)](Nothing*) mutable { return fn(); });
}

// Client stream of AppendKV chunks: one write transaction on one sequence.
class AppendReactor final : public grpc::ServerReadReactor<v1::AppendKVRequest> {
 public:
  AppendReactor(grpc::CallbackServerContext* ctx, Node* node, Authenticator* auth, v1::AppendKVResponse* resp)
      : ctx_(ctx), node_(node), auth_(auth), resp_(resp) {
    StartRead(&chunk_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // Half-close by the client commits; a cancelled or broken stream keeps nothing.
      if (ctx_->IsCancelled()) {
        Fail(absl::CancelledError("AppendKV stream was cancelled; nothing was committed"));
      } else {
        Complete();
      }
      return;
    }
    if (absl::Status s = Apply(); !s.ok()) {
      Fail(s);
      return;
    }
    chunk_.Clear();
    StartRead(&chunk_);
  }
  void OnDone() override {
    // Only a transaction this stream still holds: once it committed or aborted, the sequence may
    // already carry the next stream's transaction, which is not ours to abort.
    if (open_) seq_->AbortAppend();
    delete this;
  }

 private:
  absl::Status Apply() {
    if (seq_ == nullptr) {
      ASSIGN_OR_RETURN(const std::string tenant, TenantOf(auth_, ctx_, chunk_.tenant()));
      ASSIGN_OR_RETURN(seq_, node_->FindSequence(tenant, chunk_.sequence_id()));
      if (absl::Status s = seq_->BeginAppend(); !s.ok()) {
        seq_ = nullptr;
        return s;
      }
      open_ = true;
      tenant_ = chunk_.tenant();
      id_ = chunk_.sequence_id();
    } else if (chunk_.tenant() != tenant_ || chunk_.sequence_id() != id_) {
      return absl::InvalidArgumentError("every chunk of one AppendKV stream must name the same sequence");
    }
    if (chunk_.token_ids_size() > 0) {
      RETURN_IF_ERROR(seq_->AddTokenIds(chunk_.token_ids_start(), chunk_.token_ids()));
    }
    if (chunk_.num_tokens() == 0 && chunk_.keys().empty() && chunk_.values().empty()) return absl::OkStatus();
    auto span = [](const std::string& s) {
      return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    };
    RETURN_IF_ERROR(seq_->AppendChunk(chunk_.layer(), chunk_.token_start(), chunk_.num_tokens(), span(chunk_.keys()),
                                      span(chunk_.values())));
    bytes_ += static_cast<int64_t>(chunk_.keys().size() + chunk_.values().size());
    return absl::OkStatus();
  }

  void Complete() {
    if (seq_ == nullptr) {
      Fail(absl::InvalidArgumentError("empty AppendKV stream"));
      return;
    }
    open_ = false;  // CommitAppend ends the transaction either way
    absl::StatusOr<int64_t> stored = seq_->CommitAppend();
    if (!stored.ok()) {
      Finish(ToGrpc(stored.status()));
      return;
    }
    resp_->set_stored_tokens(*stored);
    resp_->set_bytes_written(bytes_);
    Finish(grpc::Status::OK);
  }

  void Fail(const absl::Status& s) {
    if (open_) seq_->AbortAppend();
    open_ = false;
    Finish(ToGrpc(s));
  }

  grpc::CallbackServerContext* const ctx_;
  Node* const node_;
  Authenticator* const auth_;
  v1::AppendKVResponse* const resp_;
  v1::AppendKVRequest chunk_;
  std::shared_ptr<Sequence> seq_;
  bool open_ = false;  // this stream's transaction on seq_ is open
  std::string tenant_, id_;
  int64_t bytes_ = 0;
};

// Server stream of FetchKV chunks.
class FetchReactor final : public grpc::ServerWriteReactor<v1::FetchKVResponse> {
 public:
  FetchReactor(grpc::CallbackServerContext* ctx, Node* node, Authenticator* auth, ThreadPool* pool,
               const v1::FetchKVRequest* req)
      : ctx_(ctx), node_(node), auth_(auth), req_(req) {
    pool->Schedule([this] { Start(); });
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    Next();
  }
  void OnDone() override { delete this; }

 private:
  void Start() {
    absl::Status s = Prepare();
    if (!s.ok()) {
      Finish(ToGrpc(s));
      return;
    }
    Next();
  }

  absl::Status Prepare() {
    ASSIGN_OR_RETURN(tenant_, TenantOf(auth_, ctx_, req_->tenant()));
    ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, node_->FindSequence(tenant_, req_->sequence_id()));
    const ModelSpec& spec = seq->spec();
    if (req_->layer() < 0 || req_->layer() >= spec.num_layers || req_->kv_head() < 0 ||
        req_->kv_head() >= spec.num_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", req_->layer(), " / kv_head ", req_->kv_head(),
                                                     " outside the model's ", spec.num_layers, " layers / ",
                                                     spec.num_kv_heads, " kv-heads"));
    }
    const int64_t stored = seq->committed_tokens();
    if (req_->token_ids_size() > 0) {
      ids_.assign(req_->token_ids().begin(), req_->token_ids().end());
    } else {
      if (req_->token_begin() < 0 || req_->token_begin() > req_->token_end() || req_->token_end() > stored) {
        return absl::InvalidArgumentError(absl::StrCat("token range [", req_->token_begin(), ", ", req_->token_end(),
                                                       ") outside the ", stored, " stored tokens"));
      }
      for (int64_t t = req_->token_begin(); t < req_->token_end(); ++t) ids_.push_back(static_cast<int32_t>(t));
    }
    // Validate every id up front so that a bad one fails before any row is sent.
    for (int32_t t : ids_) {
      if (t < 0 || t >= stored) {
        return absl::InvalidArgumentError(absl::StrCat("token ", t, " outside the ", stored, " stored tokens"));
      }
    }
    rows_per_chunk_ = std::max<size_t>(1, kFetchChunkBytes / (2 * spec.row_bytes()));
    return absl::OkStatus();
  }

  void Next() {
    if (pos_ >= ids_.size() && sent_any_) {
      Finish(grpc::Status::OK);
      return;
    }
    const size_t end = std::min(ids_.size(), pos_ + rows_per_chunk_);
    absl::Span<const int32_t> part(ids_.data() + pos_, end - pos_);
    out_.Clear();
    absl::Status s = node_->ReadRows(tenant_, req_->sequence_id(), req_->layer(), req_->kv_head(), part,
                                     out_.mutable_keys(), out_.mutable_values());
    if (!s.ok()) {  // e.g. dropped meanwhile
      Finish(ToGrpc(s));
      return;
    }
    out_.mutable_token_ids()->Add(part.begin(), part.end());
    pos_ = end;
    sent_any_ = true;
    StartWrite(&out_);
  }

  grpc::CallbackServerContext* const ctx_;
  Node* const node_;
  Authenticator* const auth_;
  const v1::FetchKVRequest* const req_;
  std::string tenant_;  // the tenant it acts for
  std::vector<int32_t> ids_;
  size_t rows_per_chunk_ = 1;
  size_t pos_ = 0;
  bool sent_any_ = false;
  v1::FetchKVResponse out_;
};

}  // namespace

GrpcService::GrpcService(Node* node, int threads) : node_(node), pool_(threads) {}
GrpcService::~GrpcService() = default;

grpc::ServerUnaryReactor* GrpcService::RegisterModel(grpc::CallbackServerContext* ctx,
                                                     const v1::RegisterModelRequest* req,
                                                     v1::RegisterModelResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    RETURN_IF_ERROR(CallerOf(auth_, ctx).status());  // models are schema, shared by all tenants
    ASSIGN_OR_RETURN(ModelSpec spec, proto::FromProto(req->spec()));
    ASSIGN_OR_RETURN(bool created, node_->RegisterModel(spec));
    resp->set_created(created);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcService::OpenSequence(grpc::CallbackServerContext* ctx,
                                                    const v1::OpenSequenceRequest* req,
                                                    v1::OpenSequenceResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, TenantOf(auth_, ctx, req->tenant()));
    RETURN_IF_ERROR(CheckPlacement(peers_, *req, resp));
    OpenSequenceArgs args{std::move(tenant), req->model_id(), req->sequence_id(),
                          absl::MakeConstSpan(req->token_ids().data(), req->token_ids_size())};
    ASSIGN_OR_RETURN(OpenSequenceResult r, node_->OpenSequence(args));
    resp->set_matched_tokens(r.matched_tokens);
    resp->set_stored_tokens(r.stored_tokens);
    return absl::OkStatus();
  });
}

grpc::ServerReadReactor<v1::AppendKVRequest>* GrpcService::AppendKV(grpc::CallbackServerContext* ctx,
                                                                    v1::AppendKVResponse* resp) {
  static Counter* const streams =
      Metrics::Global().GetCounter("kvrecall_append_streams_total", "AppendKV streams opened");
  streams->Add();
  return new AppendReactor(ctx, node_, auth_, resp);
}

absl::Status GrpcService::SetUnimplemented(const std::vector<std::string>& rpcs) {
  for (const std::string& rpc : rpcs) {
    if (rpc == "AppendKVBatch") {
      unimplemented_append_batch_ = true;
    } else if (rpc == "AllocateBlocks") {
      unimplemented_allocate_blocks_ = true;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("'", rpc, "' cannot be made unimplemented (AppendKVBatch, AllocateBlocks)"));
    }
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* GrpcService::AppendKVBatch(grpc::CallbackServerContext* ctx,
                                                     const v1::AppendKVBatchRequest* req,
                                                     v1::AppendKVBatchResponse* resp) {
  static Counter* const calls = Metrics::Global().GetCounter("kvrecall_append_batch_calls_total",
                                                             "AppendKVBatch calls served");
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    if (unimplemented_append_batch_) {
      return absl::UnimplementedError("AppendKVBatch is off on this node (--fault-unimplemented)");
    }
    ASSIGN_OR_RETURN(const std::string tenant, TenantOf(auth_, ctx, req->tenant()));
    calls->Add();
    std::vector<Node::BatchAppend> appends(static_cast<size_t>(req->appends_size()));
    for (int i = 0; i < req->appends_size(); ++i) {
      const v1::SequenceAppend& a = req->appends(i);
      Node::BatchAppend& b = appends[static_cast<size_t>(i)];
      b.sequence_id = a.sequence_id();
      b.token_start = a.token_start();
      b.num_tokens = a.num_tokens();
      b.token_ids = absl::MakeConstSpan(a.token_ids().data(), a.token_ids_size());
      b.keys = {AsBytes(a.keys())};
      b.values = {AsBytes(a.values())};
    }
    std::vector<absl::StatusOr<int64_t>> stored;
    RETURN_IF_ERROR(node_->AppendKVBatch(tenant, appends, &stored));
    int64_t bytes = 0;
    for (int i = 0; i < req->appends_size(); ++i) {
      v1::AppendResult* r = resp->add_results();
      const absl::StatusOr<int64_t>& s = stored[static_cast<size_t>(i)];
      if (s.ok()) {
        r->set_stored_tokens(*s);
        bytes +=
            static_cast<int64_t>(req->appends(i).keys().size() + req->appends(i).values().size());
      } else {
        r->set_code(static_cast<int32_t>(s.status().code()));
        r->set_message(std::string(s.status().message()));
      }
    }
    resp->set_bytes_written(bytes);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcService::AllocateBlocks(grpc::CallbackServerContext* ctx,
                                                      const v1::AllocateBlocksRequest* req,
                                                      v1::AllocateBlocksResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    if (unimplemented_allocate_blocks_) {
      return absl::UnimplementedError("AllocateBlocks is off on this node (--fault-unimplemented)");
    }
    ASSIGN_OR_RETURN(std::string tenant, TenantOf(auth_, ctx, req->tenant()));
    if (auth_ != nullptr && !auth_->LimitsOf(tenant).arena_ingest) {
      return absl::UnimplementedError(absl::StrCat(
          "direct ingest into the arena is not granted to tenant '", tenant,
          "' (token file: limits ", tenant, " arena_ingest=true); stream AppendKV instead"));
    }
    AllocateBlocksArgs args{std::move(tenant),  req->sequence_id(),     req->token_start(),
                            req->num_tokens(),  req->token_ids_start(),
                            absl::MakeConstSpan(req->token_ids().data(), req->token_ids_size())};
    ASSIGN_OR_RETURN(IngestGrant g, node_->AllocateBlocks(args));
    resp->set_ingest_id(g.ingest_id);
    resp->set_transport(g.transport);
    resp->set_peer_address(g.region.peer_address);
    resp->set_remote_base(g.region.base);
    resp->set_length(g.region.length);
    resp->set_rkey(g.region.rkey);
    resp->set_block_tokens(g.block_tokens);
    resp->set_first_block(g.first_block);
    resp->set_num_blocks(g.num_blocks);
    resp->mutable_slot_offsets()->Add(g.slot_offsets.begin(), g.slot_offsets.end());
    resp->set_lease_ms(absl::ToInt64Milliseconds(g.lease));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcService::CommitBlocks(grpc::CallbackServerContext* ctx,
                                                    const v1::CommitBlocksRequest* req,
                                                    v1::CommitBlocksResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, TenantOf(auth_, ctx, req->tenant()));
    CommitBlocksArgs args{std::move(tenant), req->sequence_id(), req->ingest_id(),
                          absl::MakeConstSpan(req->checksums().data(), req->checksums_size()), req->abort()};
    ASSIGN_OR_RETURN(CommitBlocksOutcome out, node_->CommitBlocks(args));
    resp->set_stored_tokens(out.stored_tokens);
    resp->set_bytes_written(out.bytes_written);
    return absl::OkStatus();
  });
}

namespace {
// A Retrieve's arguments and outcome (a few vectors per entry: ~35 us to free at 256 entries),
// freed after its reply is sent, off the caller's path.
struct RetrieveKept {
  RetrieveArgs args;
  RetrieveOutcome out;
};
}  // namespace

grpc::ServerUnaryReactor* GrpcService::Retrieve(grpc::CallbackServerContext* ctx, const v1::RetrieveRequest* req,
                                                v1::RetrieveResponse* resp) {
  const absl::Time received = absl::Now();
  return RunUnaryKeeping<RetrieveKept>(
      &pool_, ctx, [this, ctx, req, resp, received](RetrieveKept* kept) -> absl::Status {
        RetrieveArgs& args = kept->args;
        ASSIGN_OR_RETURN(args.tenant, TenantOf(auth_, ctx, req->tenant()));
        args.layer = req->layer();
        args.budget = static_cast<int>(std::min<uint32_t>(req->budget(), kMaxBudget + 1));
        ASSIGN_OR_RETURN(args.method, proto::FromProto(req->method()));
        args.worker_id = req->worker_id();
        if (req->entries_size() > kMaxRetrieveEntries) {
          return absl::InvalidArgumentError(
              absl::StrCat("entries ", req->entries_size(), " exceed ", kMaxRetrieveEntries));
        }
        // bf16 queries are widened into one buffer, sized first so that the spans into it stay
        // valid.
        size_t bf16_values = 0;
        for (const v1::RetrieveEntry& e : req->entries())
          bf16_values += e.queries_bf16().size() / 2;
        thread_local std::vector<float> widened;  // kept per service thread
        internal::ClearForReuse(&widened, bf16_values);
        args.entries.reserve(req->entries_size());
        for (int i = 0; i < req->entries_size(); ++i) {
          const v1::RetrieveEntry& e = req->entries(i);
          absl::Span<const float> queries(e.queries().data(), e.queries_size());
          if (!e.queries_bf16().empty()) {
            if (!queries.empty()) {
              return absl::InvalidArgumentError(
                  absl::StrCat("entry ", i, ": both queries and queries_bf16 are set"));
            }
            const size_t first = widened.size();
            RETURN_IF_ERROR(proto::AppendBf16AsF32(e.queries_bf16(), &widened));
            queries = absl::MakeConstSpan(widened.data() + first, widened.size() - first);
          }
          args.entries.push_back(RetrieveEntryArgs{e.sequence_id(), e.kv_head(), queries,
                                                   e.token_begin(), e.token_end(), e.dest_row(),
                                                   e.slot_epoch()});
        }
        args.staging_area = req->staging_area();
        args.call_seq = req->call_seq();
        args.results_in_region = req->results_in_region();
        args.results_offset = req->results_offset();
        args.successors = static_cast<int>(std::min<uint32_t>(req->successors(), kMaxBudget + 1));
        args.queries_in_region = req->queries_in_region();
        args.queries_offset = req->queries_offset();
        ASSIGN_OR_RETURN(kept->out, node_->Retrieve(args));
        const RetrieveOutcome& out = kept->out;
        resp->set_node_micros(static_cast<uint64_t>(out.node_micros));
        resp->set_search_micros(static_cast<uint64_t>(out.search_micros));
        resp->set_search_select_micros(static_cast<uint64_t>(out.search_select_micros));
        resp->set_search_score_micros(static_cast<uint64_t>(out.search_score_micros));
        resp->set_search_finish_micros(static_cast<uint64_t>(out.search_finish_micros));
        resp->set_stream_plan_micros(static_cast<uint64_t>(out.stream_plan_micros));
        resp->set_stream_micros(static_cast<uint64_t>(out.stream_micros));
        resp->set_read_micros(static_cast<uint64_t>(out.read_micros));
        if (args.results_in_region) {
          resp->set_region_results(
              static_cast<uint32_t>(out.token_ids.size()));  // next to the rows
        } else {
          for (size_t i = 0; i < out.token_ids.size(); ++i) {
            v1::RetrieveResult* r = resp->add_results();
            proto::PackInt32s(out.token_ids[i], r->mutable_token_ids());
            proto::PackSlots(out.slots[i], r->mutable_slots());
            proto::PackSlots(out.fill_slots[i], r->mutable_fill_slots());
          }
        }
        resp->set_bytes_streamed(out.bytes_streamed);
        resp->set_service_micros(
            static_cast<uint64_t>(absl::ToInt64Microseconds(absl::Now() - received)));
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* GrpcService::BuildIndex(grpc::CallbackServerContext* ctx,
                                                  const v1::BuildIndexRequest* req, v1::BuildIndexResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    BuildIndexArgs args;
    ASSIGN_OR_RETURN(args.tenant, TenantOf(auth_, ctx, req->tenant()));
    args.sequence_id = req->sequence_id();
    ASSIGN_OR_RETURN(args.method, proto::FromProto(req->method()));
    args.first_layer = req->first_layer();
    args.token_begin = req->token_begin();
    args.token_end = req->token_end();
    args.num_queries = req->num_queries();
    for (int i = 0; i < req->layers_size(); ++i) {
      const v1::LayerQueries& l = req->layers(i);
      if (l.layer() != req->first_layer() + i) {
        return absl::InvalidArgumentError(absl::StrCat("layers[", i, "] is layer ", l.layer(), "; want ",
                                                       req->first_layer() + i, " (in order from first_layer)"));
      }
      args.layer_queries.push_back(absl::MakeConstSpan(l.queries().data(), l.queries_size()));
    }
    args.ctkvr_list_size = req->ctkvr_list_size();
    for (int i = 0; i < req->ctkvr_lists_size(); ++i) {
      const v1::CtkvrLayerLists& l = req->ctkvr_lists(i);
      if (l.layer() != req->first_layer() + i) {
        return absl::InvalidArgumentError(absl::StrCat("ctkvr_lists[", i, "] is layer ", l.layer(),
                                                       "; want ", req->first_layer() + i,
                                                       " (in order from first_layer)"));
      }
      args.ctkvr_lists.push_back({absl::MakeConstSpan(l.tokens().data(), l.tokens_size()),
                                  absl::MakeConstSpan(l.lse().data(), l.lse_size())});
    }
    ASSIGN_OR_RETURN(BuildIndexOutcome out, node_->BuildIndex(args));
    resp->set_indexed_tokens(out.indexed_tokens);
    resp->set_segments(out.segments);
    resp->set_build_seconds(out.build_seconds);
    resp->set_index_bytes(out.index_bytes);
    resp->set_rebuilt(out.rebuilt);
    resp->set_shared(out.shared);
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<v1::FetchKVResponse>* GrpcService::FetchKV(grpc::CallbackServerContext* ctx,
                                                                    const v1::FetchKVRequest* req) {
  return new FetchReactor(ctx, node_, auth_, &pool_, req);
}

grpc::ServerUnaryReactor* GrpcService::AttachWorker(grpc::CallbackServerContext* ctx,
                                                    const v1::AttachWorkerRequest* req,
                                                    v1::AttachWorkerResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    // The node's writer reaches the worker's region only once the worker authenticated.
    ASSIGN_OR_RETURN(const std::string tenant, TenantOf(auth_, ctx, req->tenant()));
    if (req->transport() != "ucx") {
      return absl::InvalidArgumentError(absl::StrCat("unsupported transport '", req->transport(), "' (want \"ucx\")"));
    }
    transport::RemoteRegion region{req->peer_address(), req->remote_base(), req->length(), req->rkey()};
    RETURN_IF_ERROR(node_->AttachWorker(tenant, req->worker_id(), region));
    resp->set_transport("ucx");
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcService::CloseSequence(grpc::CallbackServerContext* ctx,
                                                     const v1::CloseSequenceRequest* req,
                                                     v1::CloseSequenceResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req]() -> absl::Status {
    ASSIGN_OR_RETURN(const std::string tenant, TenantOf(auth_, ctx, req->tenant()));
    return node_->CloseSequence(tenant, req->sequence_id(), req->drop());
  });
}

grpc::ServerUnaryReactor* GrpcService::Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* req,
                                             v1::StatsResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(const Principal caller, CallerOf(auth_, ctx));
    NodeStats s = node_->Stats(req->include_sequences());
    resp->set_version(kVersion);
    resp->set_uptime_seconds(s.uptime_seconds);
    resp->set_memory_limit_bytes(s.memory_limit_bytes);
    if (!caller.admin) {
      // A tenant sees its own usage and sequences, nothing of the node's or others' activity.
      FillTenantUsage(s, caller.tenant, resp);
      return absl::OkStatus();
    }
    resp->set_stored_bytes(s.stored_bytes);
    resp->set_num_sequences(s.num_sequences);
    resp->set_num_models(s.num_models);
    resp->set_num_workers(s.num_workers);
    resp->set_retrieve_calls(s.retrieve_calls);
    resp->set_retrieve_entries(s.retrieve_entries);
    resp->set_bytes_streamed(s.bytes_streamed);
    resp->set_arena_block_bytes(s.arena_block_bytes);
    resp->set_arena_hugepages(s.arena_hugepages);
    resp->set_arena_registered(s.arena_registered);
    resp->set_blocks(s.blocks);
    resp->set_shared_blocks(s.shared_blocks);
    resp->set_logical_bytes(s.logical_bytes);
    resp->set_prompt_tokens(s.prompt_tokens);
    resp->set_matched_tokens(s.matched_tokens);
    resp->set_evictions(s.evictions);
    resp->set_spilled_bytes(s.spilled_bytes);
    resp->set_spilled_blocks(s.spilled_blocks);
    resp->set_reloads(s.reloads);
    resp->set_ingests(s.ingests);
    resp->set_ingest_bytes(s.ingest_bytes);
    resp->set_draining(s.draining);
    FillTenantUsage(s, "", resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcService::Drain(grpc::CallbackServerContext* ctx, const v1::DrainRequest* req,
                                             v1::DrainResponse* resp) {
  return RunUnary(&pool_, ctx, [this, ctx, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(const Principal caller, CallerOf(auth_, ctx));
    if (!caller.admin) return absl::PermissionDeniedError("Drain needs an admin token");
    resp->set_num_sequences(node_->SetDraining(req->draining()));
    resp->set_draining(req->draining());
    if (drain_hook_) drain_hook_(req->draining());
    return absl::OkStatus();
  });
}

}  // namespace kvrecall::kvstore
