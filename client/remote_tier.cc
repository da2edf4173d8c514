// RemoteTier: one kvrecall-server over gRPC; recalled rows arrive by UCX put into a region this
// worker registered (AttachWorker), or, with transport "grpc", by FetchKV streams.
#include <algorithm>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "absl/base/call_once.h"
#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/channel.h"
#include "client/tier.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "grpcpp/grpcpp.h"
#include "kvstore/internal/crc32c.h"
#include "proto/convert.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"
#include "transport/transport.h"

namespace kvrecall::client {
namespace {

namespace v1 = ::kvrecall::v1;
using proto::FromGrpc;

constexpr size_t kAppendChunkBytes = 4 << 20;
// The most K/V bytes of one AppendKVBatch request (well inside kMaxMessageBytes).
constexpr size_t kAppendBatchBytes = 16 << 20;
constexpr size_t kIngestPackBytes = 16 << 20;  // bulk ingest: bytes packed per round of puts
constexpr int kIngestLanes = 4;  // bulk ingest: most threads packing and putting
// Retrieve: pool threads unpacking results with the caller, one less than the cores, at most 7
// (the unpack is memory traffic: on the H100 host the client's own time in a 256-entry call was
// 283-300 us with 7 and 358-469 us with 3; docs/benchmarks.md).
int UnpackThreads() {
  return std::clamp(static_cast<int>(std::thread::hardware_concurrency()) - 1, 1, 7);
}
constexpr size_t kParallelUnpackEntries = 32;  // ... for batches of at least this many entries

class RemoteTier final : public Tier {
 public:
  RemoteTier(const RemoteTierOptions& remote, const TierOptions& options) : remote_(remote), options_(options) {}

  absl::Status Init() {
    if (options_.worker_id.empty()) options_.worker_id = internal::DefaultWorkerId();
    ASSIGN_OR_RETURN(channel_, OpenChannel(remote_.target, remote_.tls));
    if (!channel_->WaitForConnected(absl::ToChronoTime(absl::Now() + options_.deadline))) {
      return absl::UnavailableError(absl::StrCat("cannot reach kvrecall-server at ", remote_.target));
    }
    stub_ = v1::KvRecall::NewStub(channel_);
    const size_t areas = static_cast<size_t>(std::max(1, options_.staging_areas));
    for (size_t a = 0; a < areas; ++a) areas_.push_back(std::make_unique<StagingArea>());
    if (remote_.transport == "grpc") {
      fallback_buffer_.resize(static_cast<size_t>(options_.recall_buffer_bytes));
      return pin_.Pin(options_, reinterpret_cast<uint8_t*>(fallback_buffer_.data()),
                      fallback_buffer_.size());
    }
    if (remote_.transport != "ucx") {
      return absl::InvalidArgumentError(absl::StrCat("transport must be ucx or grpc, not '", remote_.transport, "'"));
    }
    ASSIGN_OR_RETURN(transport_, transport::CreateUcxTransport({remote_.ucx_tls}));
    ASSIGN_OR_RETURN(region_, transport_->AllocateRegion(static_cast<size_t>(options_.recall_buffer_bytes)));
    RETURN_IF_ERROR(pin_.Pin(options_, region_->data(), region_->size()));
    const transport::RemoteRegion d = region_->Describe();
    v1::AttachWorkerRequest req;
    req.set_tenant(options_.tenant);
    req.set_worker_id(options_.worker_id);
    req.set_transport("ucx");
    req.set_peer_address(d.peer_address);
    req.set_remote_base(d.base);
    req.set_length(d.length);
    req.set_rkey(d.rkey);
    v1::AttachWorkerResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    return FromGrpc(stub_->AttachWorker(&ctx, req, &resp));
  }

  absl::Status RegisterModel(const ModelSpec& spec) override {
    v1::RegisterModelRequest req;
    proto::ToProto(spec, req.mutable_spec());
    v1::RegisterModelResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    RETURN_IF_ERROR(FromGrpc(stub_->RegisterModel(&ctx, req, &resp)));
    specs_[spec.model_id] = spec;
    return absl::OkStatus();
  }

  absl::StatusOr<OpenResult> OpenSequence(const std::string& sequence_id, const std::string& model_id,
                                          absl::Span<const int32_t> token_ids) override {
    auto spec = specs_.find(model_id);
    if (spec == specs_.end()) {
      return absl::FailedPreconditionError(absl::StrCat("RegisterModel('", model_id, "') first on this client"));
    }
    v1::OpenSequenceRequest req;
    req.set_tenant(options_.tenant);
    req.set_model_id(model_id);
    req.set_sequence_id(sequence_id);
    req.mutable_token_ids()->Add(token_ids.begin(), token_ids.end());
    v1::OpenSequenceResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    RETURN_IF_ERROR(FromGrpc(stub_->OpenSequence(&ctx, req, &resp)));
    seq_model_[sequence_id] = &spec->second;
    return OpenResult{resp.matched_tokens(), resp.stored_tokens()};
  }

  // Over the data transport when this tier has one and the node's arena is registered
  // (AllocateBlocks, puts into the node's slots, CommitBlocks); otherwise an AppendKV stream.
  absl::Status AppendKV(const std::string& sequence_id, const AppendBatch& batch) override {
    ASSIGN_OR_RETURN(const ModelSpec* spec, SpecOf(sequence_id));
    RETURN_IF_ERROR(internal::CheckAppendBatch(*spec, batch));
    const int64_t bytes = spec->token_kv_bytes() * batch.num_tokens;
    if (transport_ != nullptr && remote_.ingest != "grpc" && !ingest_unsupported_ &&
        bytes >= remote_.ingest_min_bytes) {
      absl::Status s = Ingest(sequence_id, *spec, batch);
      if (!absl::IsUnimplemented(s)) return s;
      ingest_unsupported_ = true;  // the node has no registered arena: AppendKV from now on
    }
    return AppendOverGrpc(sequence_id, *spec, batch);
  }

  // Small appends (a decode step's tokens) go in AppendKVBatch requests of up to
  // kAppendBatchBytes, one round trip for the batch; large ones (prompts) as AppendKV does them.
  // A node without AppendKVBatch (UNIMPLEMENTED) gets AppendKV calls from then on.
  absl::Status AppendKVBatch(absl::Span<const SequenceAppend> appends,
                             std::vector<bool>* stored) override {
    RETURN_IF_ERROR(internal::CheckDistinctSequences(appends));
    if (batch_unsupported_) return Tier::AppendKVBatch(appends, stored);
    std::vector<bool> done(appends.size(), false);
    absl::Status first;
    v1::AppendKVBatchRequest req;
    std::vector<size_t> in_req;  // the appends in req, in order
    size_t req_bytes = 0;
    auto send = [&] {
      if (in_req.empty()) return;
      req.set_tenant(options_.tenant);
      v1::AppendKVBatchResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(&ctx);
      absl::Status s = FromGrpc(stub_->AppendKVBatch(&ctx, req, &resp));
      if (absl::IsUnimplemented(s)) {
        batch_unsupported_ = true;
        for (size_t i : in_req) {
          absl::Status one = AppendKV(appends[i].sequence_id, appends[i].batch);
          done[i] = one.ok();
          first.Update(one);
        }
      } else if (s.ok() && resp.results_size() != static_cast<int>(in_req.size())) {
        first.Update(
            absl::InternalError(absl::StrCat("AppendKVBatch answered ", resp.results_size(),
                                             " results for ", in_req.size(), " appends")));
      } else if (!s.ok()) {
        first.Update(s);  // none of them is acknowledged
      } else {
        for (size_t j = 0; j < in_req.size(); ++j) {
          const v1::AppendResult& r = resp.results(static_cast<int>(j));
          done[in_req[j]] = r.code() == 0;
          if (r.code() != 0) {
            first.Update(absl::Status(
                static_cast<absl::StatusCode>(r.code()),
                absl::StrCat("sequence '", appends[in_req[j]].sequence_id, "': ", r.message())));
          }
        }
        absl::MutexLock lock(&counters_mu_);
        counters_.bytes_appended += resp.bytes_written();
      }
      req.Clear();
      in_req.clear();
      req_bytes = 0;
    };
    for (size_t i = 0; i < appends.size(); ++i) {
      const SequenceAppend& a = appends[i];
      absl::StatusOr<const ModelSpec*> spec = SpecOf(a.sequence_id);
      absl::Status valid = spec.ok() ? internal::CheckAppendBatch(**spec, a.batch) : spec.status();
      if (!valid.ok()) {
        first.Update(valid);
        continue;
      }
      const size_t bytes = static_cast<size_t>((*spec)->token_kv_bytes() * a.batch.num_tokens);
      if (bytes >= static_cast<size_t>(remote_.ingest_min_bytes) || bytes > kAppendBatchBytes) {
        absl::Status one = AppendKV(a.sequence_id, a.batch);
        done[i] = one.ok();
        first.Update(one);
        continue;
      }
      if (req_bytes + bytes > kAppendBatchBytes ||
          in_req.size() == static_cast<size_t>(kvstore::kMaxRetrieveEntries)) {
        send();  // the server takes at most kMaxRetrieveEntries appends per request
      }
      v1::SequenceAppend* m = req.add_appends();
      m->set_sequence_id(a.sequence_id);
      m->set_token_start(a.batch.token_start);
      m->set_num_tokens(static_cast<int32_t>(a.batch.num_tokens));
      m->mutable_token_ids()->Add(a.batch.token_ids.begin(), a.batch.token_ids.end());
      std::string* k = m->mutable_keys();
      std::string* v = m->mutable_values();
      k->reserve(bytes / 2);
      v->reserve(bytes / 2);
      for (const std::string& layer : a.batch.keys) k->append(layer);
      for (const std::string& layer : a.batch.values) v->append(layer);
      in_req.push_back(i);
      req_bytes += bytes;
    }
    send();
    if (stored != nullptr) *stored = std::move(done);
    return first;
  }

  absl::Status AppendOverGrpc(const std::string& sequence_id, const ModelSpec& spec, const AppendBatch& batch) {
    const size_t row = spec.row_bytes();
    const int64_t heads = spec.num_kv_heads;
    const int64_t tokens_per_chunk =
        std::max<int64_t>(1, static_cast<int64_t>(kAppendChunkBytes / (2 * row * heads)));
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::AppendKVResponse resp;
    std::unique_ptr<grpc::ClientWriter<v1::AppendKVRequest>> writer = stub_->AppendKV(&ctx, &resp);
    v1::AppendKVRequest chunk;
    bool first = true;
    for (int64_t t0 = 0; t0 < batch.num_tokens; t0 += tokens_per_chunk) {
      const int64_t n = std::min(tokens_per_chunk, batch.num_tokens - t0);
      for (int l = 0; l < spec.num_layers; ++l) {
        chunk.Clear();
        chunk.set_tenant(options_.tenant);
        chunk.set_sequence_id(sequence_id);
        chunk.set_layer(l);
        chunk.set_token_start(batch.token_start + t0);
        chunk.set_num_tokens(static_cast<int32_t>(n));
        if (first && !batch.token_ids.empty()) {
          chunk.set_token_ids_start(batch.token_start);
          chunk.mutable_token_ids()->Add(batch.token_ids.begin(), batch.token_ids.end());
        }
        first = false;
        // Slice [heads][t0 : t0 + n][head_dim] out of [heads][num_tokens][head_dim].
        std::string* k = chunk.mutable_keys();
        std::string* v = chunk.mutable_values();
        k->reserve(static_cast<size_t>(heads * n) * row);
        v->reserve(static_cast<size_t>(heads * n) * row);
        for (int64_t h = 0; h < heads; ++h) {
          const size_t off = static_cast<size_t>(h * batch.num_tokens + t0) * row;
          k->append(batch.keys[l], off, static_cast<size_t>(n) * row);
          v->append(batch.values[l], off, static_cast<size_t>(n) * row);
        }
        if (!writer->Write(chunk)) break;  // the server ended the stream; Finish says why
      }
    }
    writer->WritesDone();
    RETURN_IF_ERROR(FromGrpc(writer->Finish()));
    absl::MutexLock lock(&counters_mu_);
    counters_.bytes_appended += resp.bytes_written();
    return absl::OkStatus();
  }

  // Bulk ingest: one transaction for the whole batch. Any failure after AllocateBlocks aborts it
  // (best effort: an abort that does not arrive ends with the node's lease).
  absl::Status Ingest(const std::string& sequence_id, const ModelSpec& spec, const AppendBatch& batch) {
    v1::AllocateBlocksRequest req;
    req.set_tenant(options_.tenant);
    req.set_sequence_id(sequence_id);
    req.set_token_start(batch.token_start);
    req.set_num_tokens(batch.num_tokens);
    if (!batch.token_ids.empty()) {
      req.set_token_ids_start(batch.token_start);
      req.mutable_token_ids()->Add(batch.token_ids.begin(), batch.token_ids.end());
    }
    v1::AllocateBlocksResponse grant;
    const absl::Time asked = absl::Now();
    {
      grpc::ClientContext ctx;
      SetDeadline(&ctx);
      RETURN_IF_ERROR(FromGrpc(stub_->AllocateBlocks(&ctx, req, &grant)));
    }
    absl::Status s = PutIngest(spec, batch, grant, asked);
    v1::CommitBlocksRequest commit;
    commit.set_tenant(options_.tenant);
    commit.set_sequence_id(sequence_id);
    commit.set_ingest_id(grant.ingest_id());
    if (s.ok()) {
      commit.mutable_checksums()->Add(ingest_checksums_.begin(), ingest_checksums_.end());
    } else {
      commit.set_abort(true);
    }
    v1::CommitBlocksResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    const absl::Status c = FromGrpc(stub_->CommitBlocks(&ctx, commit, &resp));
    RETURN_IF_ERROR(s);
    RETURN_IF_ERROR(c);
    absl::MutexLock lock(&counters_mu_);
    counters_.bytes_appended += resp.bytes_written();
    counters_.ingests++;
    return absl::OkStatus();
  }

  // Checks the node's answer, then puts the batch's rows into the granted slots and leaves their
  // checksums in ingest_checksums_. Puts stop once half the lease has passed since `asked`.
  absl::Status PutIngest(const ModelSpec& spec, const AppendBatch& batch, const v1::AllocateBlocksResponse& g,
                         absl::Time asked) {
    const int64_t bt = g.block_tokens();
    if (bt <= 0 || bt > (1 << 20)) return absl::DataLossError("AllocateBlocks: bad block_tokens");
    const int64_t first = batch.token_start / bt;
    const int64_t blocks = (batch.token_start + batch.num_tokens + bt - 1) / bt - first;
    const size_t row = spec.row_bytes();
    const size_t heads = static_cast<size_t>(spec.num_kv_heads);
    const uint64_t slot_bytes = 2 * heads * static_cast<uint64_t>(bt) * row;
    if (g.first_block() != first || g.num_blocks() != blocks ||
        g.slot_offsets_size() != spec.num_layers * blocks) {
      return absl::DataLossError("AllocateBlocks answered a layout that does not match the request");
    }
    for (uint64_t off : g.slot_offsets()) {
      if (off > g.length() || g.length() - off < slot_bytes) {
        return absl::DataLossError("AllocateBlocks answered a slot outside its region");
      }
    }
    transport::RemoteRegion region{g.peer_address(), g.remote_base(), g.length(), g.rkey()};
    if (ingest_writer_ == nullptr || ingest_writer_->region().peer_address != region.peer_address ||
        ingest_writer_->region().base != region.base || ingest_writer_->region().rkey != region.rkey) {
      ingest_writer_.reset();
      ASSIGN_OR_RETURN(ingest_writer_, transport_->Connect(region));
    }
    const absl::Time stop_putting = asked + absl::Milliseconds(g.lease_ms()) / 2;
    ingest_checksums_.assign(static_cast<size_t>(spec.num_layers * blocks), 0);
    // Large batches are split by layer over a few lanes (threads) that pack, checksum and put
    // concurrently; the writer is thread-safe.
    const int64_t bytes = static_cast<int64_t>(2 * heads * row) * batch.num_tokens * spec.num_layers;
    const int lanes = static_cast<int>(std::clamp<int64_t>(bytes / std::max<int64_t>(1, remote_.ingest_bytes_per_lane), 1,
                                                           std::min<int64_t>(kIngestLanes, spec.num_layers)));
    if (static_cast<int>(ingest_packs_.size()) < lanes) ingest_packs_.resize(static_cast<size_t>(lanes));
    IngestLayout layout{&spec, &batch, &g, bt, first, blocks, slot_bytes, stop_putting};
    std::vector<absl::Status> results(static_cast<size_t>(lanes));
    std::vector<std::thread> threads;
    for (int lane = 1; lane < lanes; ++lane) {
      threads.emplace_back([&, lane] { results[lane] = PutLayers(layout, lane, lanes, &ingest_packs_[lane]); });
    }
    results[0] = PutLayers(layout, 0, lanes, &ingest_packs_[0]);
    for (std::thread& t : threads) t.join();
    for (const absl::Status& r : results) {
      if (!r.ok()) {
        if (absl::IsUnavailable(r)) ingest_writer_.reset();  // a broken connection; the next ingest connects afresh
        return r;
      }
    }
    return absl::OkStatus();
  }

  struct IngestLayout {
    const ModelSpec* spec;
    const AppendBatch* batch;
    const v1::AllocateBlocksResponse* grant;
    int64_t block_tokens, first_block, blocks;
    uint64_t slot_bytes;
    absl::Time stop_putting;
  };

  // One lane of PutIngest: layers lane, lane + lanes, ... Rows are packed into the slot layout
  // so that a whole block is one put (a partial first or last block is one put per kv-head and
  // K/V); puts go out in rounds of about kIngestPackBytes. Fills ingest_checksums_ of its layers.
  absl::Status PutLayers(const IngestLayout& in, int lane, int lanes, std::vector<uint8_t>* pack_buf) {
    const ModelSpec& spec = *in.spec;
    const AppendBatch& batch = *in.batch;
    const size_t row = spec.row_bytes();
    const size_t heads = static_cast<size_t>(spec.num_kv_heads);
    const int64_t bt = in.block_tokens;
    const size_t pack_slots = std::max<size_t>(1, kIngestPackBytes / in.slot_bytes);
    if (pack_buf->size() < pack_slots * in.slot_bytes) pack_buf->resize(pack_slots * in.slot_bytes);
    std::vector<transport::PutOp> ops;
    size_t packed = 0;  // slots of *pack_buf in use by `ops`
    auto flush = [&]() -> absl::Status {
      if (ops.empty()) return absl::OkStatus();
      if (absl::Now() > in.stop_putting) {
        return absl::DeadlineExceededError("bulk ingest: half of the node's lease passed before the puts were done");
      }
      absl::Status s = ingest_writer_->PutAll(ops);
      ops.clear();
      packed = 0;
      return s;
    };
    const int64_t start = batch.token_start;
    const int64_t end = start + batch.num_tokens;
    const size_t head_rows = static_cast<size_t>(bt) * row;
    for (int l = lane; l < spec.num_layers; l += lanes) {
      const uint8_t* kv_src[2] = {reinterpret_cast<const uint8_t*>(batch.keys[l].data()),
                                  reinterpret_cast<const uint8_t*>(batch.values[l].data())};
      for (int64_t b = 0; b < in.blocks; ++b) {
        const int64_t block_first = (in.first_block + b) * bt;
        const int64_t lo = std::max(start, block_first);
        const int64_t hi = std::min(end, block_first + bt);
        const size_t len = static_cast<size_t>(hi - lo) * row;
        const uint64_t slot = in.grant->slot_offsets(static_cast<int>(l * in.blocks + b));
        const bool whole = hi - lo == bt;
        if (whole && packed == pack_slots) RETURN_IF_ERROR(flush());
        uint8_t* pack = whole ? pack_buf->data() + packed * in.slot_bytes : nullptr;
        uint32_t crc = 0;
        for (size_t kv = 0; kv < 2; ++kv) {
          for (size_t h = 0; h < heads; ++h) {
            const uint8_t* from =
                kv_src[kv] + (h * static_cast<size_t>(batch.num_tokens) + static_cast<size_t>(lo - start)) * row;
            crc = kvstore::internal::Crc32cExtend(crc, from, len);
            if (whole) {
              std::memcpy(pack + (kv * heads + h) * head_rows, from, len);
            } else {
              ops.push_back({from, len, slot + (kv * heads + h) * head_rows + static_cast<uint64_t>(lo - block_first) * row});
            }
          }
        }
        if (whole) {
          ops.push_back({pack, static_cast<size_t>(in.slot_bytes), slot});
          ++packed;
        }
        ingest_checksums_[static_cast<size_t>(l * in.blocks + b)] = crc;
      }
    }
    return flush();
  }

  absl::Status Retrieve(const RetrieveBatch& batch, std::vector<Recalled>* out) override {
    if (batch.entries.empty()) return absl::InvalidArgumentError("empty retrieve batch");
    ASSIGN_OR_RETURN(const ModelSpec* spec, SpecOf(batch.entries[0].sequence_id));
    const size_t pair = 2 * spec->row_bytes();
    uint64_t first_row = 0, results_offset = 0, queries_offset = internal::kNoQueryRoom;
    uint64_t query_bytes = 0;
    for (const RetrieveEntry& e : batch.entries) query_bytes += e.queries.size() * sizeof(float);
    RETURN_IF_ERROR(internal::CheckRecallFits(batch, pair, options_, &first_row, &results_offset,
                                              query_bytes, &queries_offset));
    // The queries go into our region when it has room for them (RecallBufferBytes with query
    // floats): the node reads them there, and the request stays small.
    const bool queries_in_region = region_ != nullptr && queries_offset != internal::kNoQueryRoom;
    StagingArea& area = *areas_[static_cast<size_t>(batch.staging_area)];
    v1::RetrieveRequest& req = area.req;
    req.Clear();
    req.set_tenant(options_.tenant);
    req.set_layer(batch.layer);
    req.set_budget(static_cast<uint32_t>(batch.budget));
    req.set_method(proto::ToProto(batch.method));
    req.set_successors(static_cast<uint32_t>(batch.successors));
    if (region_ != nullptr) {
      req.set_worker_id(options_.worker_id);
      req.set_staging_area(static_cast<uint32_t>(batch.staging_area));
      req.set_call_seq(++area.call_seq);
      // The results travel with the rows (one more put), not through the gRPC reply.
      req.set_results_in_region(true);
      req.set_results_offset(results_offset);
    }
    if (queries_in_region) {
      req.set_queries_in_region(true);
      req.set_queries_offset(queries_offset);
      // Queries the caller wrote in place (QueryStaging) stay where they are.
      uint8_t* at = region_->data() + queries_offset;
      for (const RetrieveEntry& e : batch.entries) {
        const size_t bytes = e.queries.size() * sizeof(float);
        if (bytes > 0 && reinterpret_cast<const uint8_t*>(e.queries.data()) != at) {
          std::memmove(at, e.queries.data(), bytes);  // the source may lie in the region too
        }
        at += bytes;
      }
    }
    for (size_t i = 0; i < batch.entries.size(); ++i) {
      const RetrieveEntry& e = batch.entries[i];
      v1::RetrieveEntry* pe = req.add_entries();
      pe->set_sequence_id(e.sequence_id);
      pe->set_kv_head(e.kv_head);
      // Without room in the region, a bf16 model's queries travel as bf16: half the bytes, the
      // same values.
      if (!queries_in_region && !proto::PackExactBf16(e.queries, pe->mutable_queries_bf16())) {
        pe->clear_queries_bf16();
        pe->mutable_queries()->Add(e.queries.begin(), e.queries.end());
      }
      pe->set_token_begin(e.token_begin);
      pe->set_token_end(e.token_end);
      pe->set_dest_row(first_row + static_cast<uint64_t>(i) * batch.budget);
      pe->set_slot_epoch(e.slot_epoch);
    }
    v1::RetrieveResponse& resp = area.resp;
    resp.Clear();
    TierCounters got;
    {
      grpc::ClientContext ctx;
      SetDeadline(&ctx, options_.retrieve_deadline > absl::ZeroDuration() ? options_.retrieve_deadline
                                                                           : options_.deadline);
      const absl::Time sent = absl::Now();
      const grpc::Status st = CallRetrieve(&area.cq, &ctx, req, &resp);
      got.tier_wait_micros = absl::ToInt64Microseconds(absl::Now() - sent);
      RETURN_IF_ERROR(FromGrpc(st));
    }
    // The results are in our region (results_in_region), or in the reply: without a region, or
    // from a server that predates results_in_region and ignores it (its rows still land in our
    // region, at each entry's dest_row). Never both: taking the region's bytes while the reply
    // carries the answer would read whatever an earlier call left there.
    const bool in_region = region_ != nullptr && resp.results_size() == 0;
    const int answered = in_region ? static_cast<int>(resp.region_results()) : resp.results_size();
    if (answered != req.entries_size()) {
      return absl::InternalError(absl::StrCat("server answered ", answered, " results for ",
                                              req.entries_size(), " entries"));
    }
    const size_t n = batch.entries.size();
    out->resize(n);
    if (in_region) {
      // The results are in our region, next to the rows. A decode batch has hundreds of entries
      // of ~1K tokens each: unpacking and checking them is spread over a few threads; a small
      // batch is unpacked here, without waking them.
      uint8_t* base = region_->data();
      std::vector<absl::Status> status(n);
      auto unpack = [&](int64_t i) {
        Recalled& r = (*out)[i];
        status[i] = internal::UnpackRecalledFromRegion(
            base + results_offset + i * kvstore::RetrieveResultBytes(batch.budget), batch.budget,
            &r);
        r.rows = base + (first_row + i * batch.budget) * pair;
      };
      if (n >= kParallelUnpackEntries) {
        UnpackPool().ParallelFor(static_cast<int64_t>(n), unpack);
      } else {
        for (size_t i = 0; i < n; ++i) unpack(static_cast<int64_t>(i));
      }
      for (const absl::Status& st : status) RETURN_IF_ERROR(st);
    } else {
      uint8_t* base = region_ != nullptr ? region_->data()
                                         : reinterpret_cast<uint8_t*>(fallback_buffer_.data());
      for (size_t i = 0; i < n; ++i) {
        const v1::RetrieveResult& res = resp.results(static_cast<int>(i));
        Recalled& r = (*out)[i];
        RETURN_IF_ERROR(proto::UnpackInt32s(res.token_ids(), &r.token_ids));
        RETURN_IF_ERROR(proto::UnpackSlots(res.slots(), &r.slots));
        RETURN_IF_ERROR(proto::UnpackSlots(res.fill_slots(), &r.fill_slots));
        RETURN_IF_ERROR(internal::CheckRecalled(r, batch.budget));
        uint8_t* rows = base + (first_row + i * batch.budget) * pair;
        r.rows = rows;
        if (region_ != nullptr) continue;  // the node put the rows
        RETURN_IF_ERROR(Fetch(batch.entries[i].sequence_id, batch.layer, batch.entries[i].kv_head,
                              internal::FillTokens(r), spec->row_bytes(), rows));
        got.bytes_received += static_cast<int64_t>(r.fill_slots.size() * pair);
      }
    }
    for (const Recalled& r : *out) {
      got.rows_received += static_cast<int64_t>(r.fill_slots.size());
      got.rows_selected += static_cast<int64_t>(r.token_ids.size());
    }
    got.bytes_received += static_cast<int64_t>(resp.bytes_streamed());
    got.tier_node_micros = static_cast<int64_t>(resp.node_micros());
    got.tier_service_micros = static_cast<int64_t>(resp.service_micros());
    got.tier_search_micros = static_cast<int64_t>(resp.search_micros());
    got.tier_stream_micros = static_cast<int64_t>(resp.stream_micros());
    got.tier_read_micros = static_cast<int64_t>(resp.read_micros());
    got.tier_search_select_micros = static_cast<int64_t>(resp.search_select_micros());
    got.tier_search_score_micros = static_cast<int64_t>(resp.search_score_micros());
    got.tier_search_finish_micros = static_cast<int64_t>(resp.search_finish_micros());
    got.tier_stream_plan_micros = static_cast<int64_t>(resp.stream_plan_micros());
    got.retrieve_calls = 1;
    absl::MutexLock lock(&counters_mu_);
    counters_ += got;
    return absl::OkStatus();
  }

  absl::Span<float> QueryStaging(const ModelSpec& spec, int staging_area, size_t entries,
                                 int budget, int successors) override {
    if (region_ == nullptr || entries == 0 || spec.num_kv_heads < 1) return {};
    const size_t floats = entries * static_cast<size_t>(spec.group_size()) * spec.head_dim;
    uint64_t first_row = 0, results_offset = 0, queries_offset = internal::kNoQueryRoom;
    if (!internal::CheckRecallFits(entries, budget, successors, staging_area, 2 * spec.row_bytes(),
                                   options_, &first_row, &results_offset, floats * sizeof(float),
                                   &queries_offset)
             .ok() ||
        queries_offset == internal::kNoQueryRoom) {
      return {};
    }
    return absl::MakeSpan(reinterpret_cast<float*>(region_->data() + queries_offset), floats);
  }

  absl::StatusOr<kvstore::BuildIndexOutcome> BuildIndex(const std::string& sequence_id,
                                                        kvstore::BuildIndexArgs args) override {
    v1::BuildIndexRequest req;
    req.set_tenant(options_.tenant);
    req.set_sequence_id(sequence_id);
    req.set_method(proto::ToProto(args.method));
    req.set_first_layer(args.first_layer);
    req.set_token_begin(args.token_begin);
    req.set_token_end(args.token_end);
    req.set_num_queries(args.num_queries);
    for (size_t i = 0; i < args.layer_queries.size(); ++i) {
      v1::LayerQueries* l = req.add_layers();
      l->set_layer(args.first_layer + static_cast<int>(i));
      l->mutable_queries()->Add(args.layer_queries[i].begin(), args.layer_queries[i].end());
    }
    req.set_ctkvr_list_size(args.ctkvr_list_size);
    for (size_t i = 0; i < args.ctkvr_lists.size(); ++i) {
      v1::CtkvrLayerLists* l = req.add_ctkvr_lists();
      l->set_layer(args.first_layer + static_cast<int>(i));
      l->mutable_tokens()->Add(args.ctkvr_lists[i].tokens.begin(),
                               args.ctkvr_lists[i].tokens.end());
      l->mutable_lse()->Add(args.ctkvr_lists[i].lse.begin(), args.ctkvr_lists[i].lse.end());
    }
    v1::BuildIndexResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    RETURN_IF_ERROR(FromGrpc(stub_->BuildIndex(&ctx, req, &resp)));
    kvstore::BuildIndexOutcome out;
    out.indexed_tokens = resp.indexed_tokens();
    out.segments = resp.segments();
    out.build_seconds = resp.build_seconds();
    out.index_bytes = resp.index_bytes();
    out.rebuilt = resp.rebuilt();
    out.shared = resp.shared();
    return out;
  }

  absl::Status CloseSequence(const std::string& sequence_id, bool drop) override {
    v1::CloseSequenceRequest req;
    req.set_tenant(options_.tenant);
    req.set_sequence_id(sequence_id);
    req.set_drop(drop);
    v1::CloseSequenceResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    return FromGrpc(stub_->CloseSequence(&ctx, req, &resp));
  }

  absl::StatusOr<kvstore::NodeStats> Stats(bool include_sequences) override {
    v1::StatsRequest req;
    req.set_include_sequences(include_sequences);
    v1::StatsResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    RETURN_IF_ERROR(FromGrpc(stub_->Stats(&ctx, req, &resp)));
    kvstore::NodeStats s;
    s.uptime_seconds = resp.uptime_seconds();
    s.memory_limit_bytes = resp.memory_limit_bytes();
    s.stored_bytes = resp.stored_bytes();
    s.num_sequences = resp.num_sequences();
    s.num_models = resp.num_models();
    s.num_workers = resp.num_workers();
    s.retrieve_calls = resp.retrieve_calls();
    s.retrieve_entries = resp.retrieve_entries();
    s.bytes_streamed = resp.bytes_streamed();
    for (const auto& q : resp.sequences()) {
      s.sequences.push_back({q.tenant(), q.sequence_id(), q.model_id(), q.stored_tokens(),
                             q.bytes(), q.state() == "closed", q.blocks(), q.shared_blocks(),
                             q.matched_tokens()});
    }
    s.arena_block_bytes = resp.arena_block_bytes();
    s.arena_hugepages = resp.arena_hugepages();
    s.arena_registered = resp.arena_registered();
    s.blocks = resp.blocks();
    s.shared_blocks = resp.shared_blocks();
    s.logical_bytes = resp.logical_bytes();
    s.prompt_tokens = resp.prompt_tokens();
    s.matched_tokens = resp.matched_tokens();
    s.evictions = resp.evictions();
    s.spilled_bytes = resp.spilled_bytes();
    s.spilled_blocks = resp.spilled_blocks();
    s.reloads = resp.reloads();
    s.ingests = resp.ingests();
    s.ingest_bytes = resp.ingest_bytes();
    s.draining = resp.draining();
    for (const auto& u : resp.tenants()) {
      s.tenants.push_back({u.tenant(), u.sequences(), u.tokens(), u.bytes(), u.logical_bytes(),
                           u.unique_blocks(), u.shared_blocks(), u.prompt_tokens(),
                           u.matched_tokens(), u.quota_charged_bytes(), u.quota_stored_bytes(),
                           u.quota_sequences()});
    }
    return s;
  }

  TierCounters counters() const override {
    absl::MutexLock lock(&counters_mu_);
    return counters_;
  }
  std::string Describe() const override {
    return absl::StrCat("remote ", remote_.target, " via ", region_ != nullptr ? "ucx" : "grpc");
  }

 private:
  void SetDeadline(grpc::ClientContext* ctx) const { SetDeadline(ctx, options_.deadline); }
  static void SetDeadline(grpc::ClientContext* ctx, absl::Duration deadline) {
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  }

  absl::StatusOr<const ModelSpec*> SpecOf(const std::string& sequence_id) const {
    auto it = seq_model_.find(sequence_id);
    if (it == seq_model_.end()) {
      return absl::FailedPreconditionError(absl::StrCat("OpenSequence('", sequence_id, "') first on this client"));
    }
    return it->second;
  }

  // The gRPC fallback: reads rows of `ids` into dst as [K row | V row] pairs.
  absl::Status Fetch(const std::string& sequence_id, int layer, int kv_head, const std::vector<int32_t>& ids,
                     size_t row, uint8_t* dst) {
    if (ids.empty()) return absl::OkStatus();
    v1::FetchKVRequest req;
    req.set_tenant(options_.tenant);
    req.set_sequence_id(sequence_id);
    req.set_layer(layer);
    req.set_kv_head(kv_head);
    req.mutable_token_ids()->Add(ids.begin(), ids.end());
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    auto reader = stub_->FetchKV(&ctx, req);
    v1::FetchKVResponse chunk;
    size_t got = 0;
    while (reader->Read(&chunk)) {
      const size_t n = static_cast<size_t>(chunk.token_ids_size());
      if (got + n > ids.size() || chunk.keys().size() != n * row || chunk.values().size() != n * row) {
        ctx.TryCancel();
        reader->Finish();
        return absl::DataLossError("malformed FetchKV chunk");
      }
      for (size_t j = 0; j < n; ++j) {
        std::memcpy(dst + (got + j) * 2 * row, chunk.keys().data() + j * row, row);
        std::memcpy(dst + ((got + j) * 2 + 1) * row, chunk.values().data() + j * row, row);
      }
      got += n;
    }
    RETURN_IF_ERROR(FromGrpc(reader->Finish()));
    if (got != ids.size()) return absl::DataLossError("FetchKV returned fewer rows than asked for");
    return absl::OkStatus();
  }

  // What Retrieve keeps per staging area, touched only by that area's calls. The messages are
  // reused (cleared messages keep their buffers). The completion queue is shut down and drained
  // when the area goes (every call on it has completed by then: CallRetrieve returns only after
  // its Finish).
  struct StagingArea {
    v1::RetrieveRequest req;
    v1::RetrieveResponse resp;
    uint64_t call_seq = 0;  // the last call's number
    grpc::CompletionQueue cq;
    ~StagingArea() {
      cq.Shutdown();
      void* tag;
      bool ok;
      while (cq.Next(&tag, &ok)) {
      }
    }
  };

  // One Retrieve call: its reply is polled for (the caller's thread reads it itself, without
  // being woken) for up to remote_.reply_poll, then waited for. The call's own deadline
  // (ctx) still ends it.
  grpc::Status CallRetrieve(grpc::CompletionQueue* cq, grpc::ClientContext* ctx,
                            const v1::RetrieveRequest& req, v1::RetrieveResponse* resp) {
    grpc::Status st;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::RetrieveResponse>> call =
        stub_->AsyncRetrieve(ctx, req, cq);
    call->Finish(resp, &st, &st);
    const absl::Time poll_until = absl::Now() + remote_.reply_poll;
    while (true) {
      void* tag = nullptr;
      bool ok = false;
      const bool poll = absl::Now() < poll_until;
      switch (cq->AsyncNext(
          &tag, &ok,
          poll ? gpr_time_0(GPR_CLOCK_MONOTONIC) : gpr_inf_future(GPR_CLOCK_MONOTONIC))) {
        case grpc::CompletionQueue::GOT_EVENT:
          return st;  // the queue's only tag: this call's Finish
        case grpc::CompletionQueue::SHUTDOWN:
          return grpc::Status(grpc::StatusCode::INTERNAL, "Retrieve's completion queue shut down");
        case grpc::CompletionQueue::TIMEOUT:
          break;
      }
    }
  }

  ThreadPool& UnpackPool() {
    absl::call_once(unpack_pool_once_,
                    [this] { unpack_pool_ = std::make_unique<ThreadPool>(UnpackThreads()); });
    return *unpack_pool_;
  }

  const RemoteTierOptions remote_;
  TierOptions options_;
  absl::once_flag unpack_pool_once_;
  std::unique_ptr<ThreadPool> unpack_pool_;  // made on first use
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvRecall::Stub> stub_;
  std::unique_ptr<transport::Transport> transport_;
  std::unique_ptr<transport::RegisteredRegion> region_;
  std::unique_ptr<transport::RemoteWriter> ingest_writer_;  // to the node's arena
  std::vector<uint32_t> ingest_checksums_;
  std::vector<std::vector<uint8_t>> ingest_packs_;  // per lane: rows packed in slot layout for the puts
  std::vector<std::unique_ptr<StagingArea>> areas_;
  bool ingest_unsupported_ = false;  // the node answered UNIMPLEMENTED to AllocateBlocks
  bool batch_unsupported_ = false;   // the node answered UNIMPLEMENTED to AppendKVBatch
  std::string fallback_buffer_;
  internal::RegionPin pin_;  // of region_ or fallback_buffer_
  std::map<std::string, ModelSpec> specs_;
  std::map<std::string, const ModelSpec*> seq_model_;
  mutable absl::Mutex counters_mu_;
  TierCounters counters_ ABSL_GUARDED_BY(counters_mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tier>> CreateRemoteTier(const RemoteTierOptions& remote, const TierOptions& options) {
  auto tier = std::make_unique<RemoteTier>(remote, options);
  RETURN_IF_ERROR(tier->Init());
  return tier;
}

}  // namespace kvrecall::client
