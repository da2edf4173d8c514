// LocalTier: the tier node in this process. Rows reach the engine through the in-process
// transport, i.e. through exactly the Node::Retrieve delivery path a remote worker gets.
#include <algorithm>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/tier.h"
#include "common/status_macros.h"
#include "transport/transport.h"

namespace kvrecall::client {
namespace {

class LocalTier final : public Tier {
 public:
  LocalTier(const kvstore::NodeOptions& node_options, const TierOptions& options)
      : options_(options),
        transport_(transport::CreateInProcessTransport()),
        node_(node_options, transport_.get(), Clock::Real()) {}

  absl::Status Init() {
    if (options_.worker_id.empty()) options_.worker_id = internal::DefaultWorkerId();
    ASSIGN_OR_RETURN(region_, transport_->AllocateRegion(static_cast<size_t>(options_.recall_buffer_bytes)));
    RETURN_IF_ERROR(pin_.Pin(options_, region_->data(), region_->size()));
    if (options_.row_addresses) {
      // The GPU reads rows where the node keeps them. The arena outlives this pin (node_ is
      // declared first).
      RETURN_IF_ERROR(node_.arena_status());
      uint8_t* arena = const_cast<uint8_t*>(node_.arena().base());
      RETURN_IF_ERROR(
          arena_pin_.Pin(options_, arena, static_cast<size_t>(node_.arena().capacity_bytes())));
    }
    call_seq_.assign(static_cast<size_t>(std::max(1, options_.staging_areas)), 0);
    return node_.AttachWorker(options_.tenant, options_.worker_id, region_->Describe());
  }

  absl::Status RegisterModel(const ModelSpec& spec) override { return node_.RegisterModel(spec).status(); }

  absl::StatusOr<OpenResult> OpenSequence(const std::string& sequence_id, const std::string& model_id,
                                          absl::Span<const int32_t> token_ids) override {
    ASSIGN_OR_RETURN(auto r, node_.OpenSequence({options_.tenant, model_id, sequence_id, token_ids}));
    return OpenResult{r.matched_tokens, r.stored_tokens};
  }

  // Through the node's batch append, as a batch of one: one path for validation and the
  // transaction.
  absl::Status AppendKV(const std::string& sequence_id, const AppendBatch& batch) override {
    std::vector<absl::StatusOr<int64_t>> results;
    RETURN_IF_ERROR(
        node_.AppendKVBatch(options_.tenant, {NodeAppend(sequence_id, batch)}, &results));
    RETURN_IF_ERROR(results[0].status());
    CountAppended(batch);
    return absl::OkStatus();
  }

  // The node's batch append: each append its own transaction.
  absl::Status AppendKVBatch(absl::Span<const SequenceAppend> appends,
                             std::vector<bool>* stored) override {
    std::vector<kvstore::Node::BatchAppend> args;
    args.reserve(appends.size());
    for (const SequenceAppend& a : appends) args.push_back(NodeAppend(a.sequence_id, a.batch));
    std::vector<absl::StatusOr<int64_t>> results;
    RETURN_IF_ERROR(node_.AppendKVBatch(options_.tenant, args, &results));
    if (stored != nullptr) stored->assign(appends.size(), false);
    absl::Status first;
    for (size_t i = 0; i < results.size(); ++i) {
      first.Update(results[i].status());
      if (!results[i].ok()) continue;
      if (stored != nullptr) (*stored)[i] = true;
      CountAppended(appends[i].batch);
    }
    return first;
  }

  absl::Status Retrieve(const RetrieveBatch& batch, std::vector<Recalled>* out) override {
    if (batch.entries.empty()) return absl::InvalidArgumentError("empty retrieve batch");
    ASSIGN_OR_RETURN(std::shared_ptr<kvstore::Sequence> first,
                     node_.FindSequence(options_.tenant, batch.entries[0].sequence_id));
    const size_t pair = 2 * first->spec().row_bytes();
    uint64_t first_row = 0;
    RETURN_IF_ERROR(internal::CheckRecallFits(batch, pair, options_, &first_row));
    kvstore::RetrieveArgs args{options_.tenant, batch.layer, batch.budget, batch.method, options_.worker_id, {}};
    args.staging_area = static_cast<uint32_t>(batch.staging_area);
    args.call_seq = ++call_seq_[batch.staging_area];
    args.successors = batch.successors;
    args.row_addresses = options_.row_addresses;
    for (size_t i = 0; i < batch.entries.size(); ++i) {
      const RetrieveEntry& e = batch.entries[i];
      args.entries.push_back({e.sequence_id, e.kv_head, e.queries, e.token_begin, e.token_end,
                              first_row + static_cast<uint64_t>(i) * batch.budget, e.slot_epoch});
    }
    ASSIGN_OR_RETURN(kvstore::RetrieveOutcome r, node_.Retrieve(args));
    out->resize(batch.entries.size());
    TierCounters got;
    for (size_t i = 0; i < batch.entries.size(); ++i) {
      Recalled& rec = (*out)[i];
      rec.token_ids = std::move(r.token_ids[i]);
      rec.slots = std::move(r.slots[i]);
      rec.fill_slots = std::move(r.fill_slots[i]);
      if (options_.row_addresses) {
        rec.rows = nullptr;
        rec.row_addresses = std::move(r.row_addresses[i]);
      } else {
        rec.rows = region_->data() + (first_row + i * batch.budget) * pair;
        rec.row_addresses.clear();
      }
      got.rows_received += static_cast<int64_t>(rec.fill_slots.size());
      got.rows_selected += static_cast<int64_t>(rec.token_ids.size());
    }
    got.retrieve_calls = 1;
    got.bytes_received = static_cast<int64_t>(r.bytes_streamed);
    got.tier_node_micros = r.node_micros;
    got.tier_search_micros = r.search_micros;
    got.tier_stream_micros = r.stream_micros;
    got.tier_read_micros = r.read_micros;
    got.tier_search_select_micros = r.search_select_micros;
    got.tier_search_score_micros = r.search_score_micros;
    got.tier_search_finish_micros = r.search_finish_micros;
    got.tier_stream_plan_micros = r.stream_plan_micros;
    absl::MutexLock lock(&counters_mu_);
    counters_ += got;
    return absl::OkStatus();
  }

  absl::StatusOr<kvstore::BuildIndexOutcome> BuildIndex(const std::string& sequence_id,
                                                        kvstore::BuildIndexArgs args) override {
    args.tenant = options_.tenant;
    args.sequence_id = sequence_id;
    return node_.BuildIndex(args);
  }

  absl::Status CloseSequence(const std::string& sequence_id, bool drop) override {
    return node_.CloseSequence(options_.tenant, sequence_id, drop);
  }
  absl::StatusOr<kvstore::NodeStats> Stats(bool include_sequences) override { return node_.Stats(include_sequences); }
  TierCounters counters() const override {
    absl::MutexLock lock(&counters_mu_);
    return counters_;
  }
  std::string Describe() const override {
    return options_.row_addresses ? "local (in-process node; rows gathered from its pinned arena)"
                                  : "local (in-process node)";
  }

 private:
  // A view of `batch` (its buffers, not a copy) as the node takes it.
  static kvstore::Node::BatchAppend NodeAppend(const std::string& sequence_id,
                                               const AppendBatch& batch) {
    kvstore::Node::BatchAppend a;
    a.sequence_id = sequence_id;
    a.token_start = batch.token_start;
    a.num_tokens = batch.num_tokens;
    a.token_ids = batch.token_ids;
    for (const std::string& k : batch.keys) a.keys.push_back(AsBytes(k));
    for (const std::string& v : batch.values) a.values.push_back(AsBytes(v));
    return a;
  }

  void CountAppended(const AppendBatch& batch) {
    int64_t bytes = 0;
    for (const std::string& k : batch.keys) bytes += static_cast<int64_t>(2 * k.size());
    absl::MutexLock lock(&counters_mu_);
    counters_.bytes_appended += bytes;
  }

  static absl::Span<const uint8_t> AsBytes(const std::string& s) {
    return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
  }

  TierOptions options_;
  std::unique_ptr<transport::Transport> transport_;
  kvstore::Node node_;
  std::unique_ptr<transport::RegisteredRegion> region_;
  internal::RegionPin pin_;  // of region_
  internal::RegionPin arena_pin_;  // of the node's arena, with row_addresses
  mutable absl::Mutex counters_mu_;
  TierCounters counters_ ABSL_GUARDED_BY(counters_mu_);
  // Per staging area: the last call's number (each touched only by that area's calls).
  std::vector<uint64_t> call_seq_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tier>> CreateLocalTier(const kvstore::NodeOptions& node_options,
                                                      const TierOptions& options) {
  auto tier = std::make_unique<LocalTier>(node_options, options);
  RETURN_IF_ERROR(tier->Init());
  return tier;
}

}  // namespace kvrecall::client
