#include "kvstore/node.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/distinct_ids.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/placement.h"
#include "common/status_macros.h"
#include "indexer/exact.h"
#include "indexer/index.h"
#include "indexer/kernels.h"
#include "kvstore/internal/records.h"
#include "kvstore/internal/reused_buffer.h"

namespace kvrecall::kvstore {
namespace {

absl::Status ValidateId(const char* what, const std::string& id) {
  if (id.empty() || id.size() > kMaxIdLength) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be 1..", kMaxIdLength, " bytes"));
  }
  return absl::OkStatus();
}

absl::Status NotFound(const std::string& tenant, const std::string& id) {
  return absl::NotFoundError(absl::StrCat("no sequence '", id, "' for tenant '", tenant, "'"));
}

struct NodeMetrics {
  Counter* retrieve_calls = Metrics::Global().GetCounter("kvrecall_retrieve_calls_total", "Retrieve calls served");
  Counter* retrieve_entries =
      Metrics::Global().GetCounter("kvrecall_retrieve_entries_total", "Retrieve entries (sequence, kv-head) served");
  Counter* bytes_streamed =
      Metrics::Global().GetCounter("kvrecall_bytes_streamed_total", "K/V bytes put to workers over the transport");
  Counter* rows_selected = Metrics::Global().GetCounter(
      "kvrecall_retrieve_rows_selected_total", "Rows Retrieve selected (resident at the worker or not)");
  Counter* rows_sent = Metrics::Global().GetCounter(
      "kvrecall_retrieve_rows_sent_total", "Rows Retrieve sent: the selected rows the worker did not hold");
  Counter* bytes_appended = Metrics::Global().GetCounter("kvrecall_bytes_appended_total", "K/V bytes appended");
  Counter* index_builds = Metrics::Global().GetCounter("kvrecall_index_builds_total", "Retrieval indices built");
  Histogram* index_build_seconds =
      Metrics::Global().GetHistogram("kvrecall_index_build_seconds", "BuildIndex time per sequence (all segments)");
  Histogram* retrieve_seconds =
      Metrics::Global().GetHistogram("kvrecall_retrieve_seconds", "Retrieve latency (search + transfer)");
  Gauge* stored_bytes = Metrics::Global().GetGauge("kvrecall_stored_bytes", "K/V bytes held in memory");
  Gauge* sequences = Metrics::Global().GetGauge("kvrecall_sequences", "Sequences held");
  Gauge* arena_bytes =
      Metrics::Global().GetGauge("kvrecall_arena_capacity_bytes", "KV arena size (--memory)");
  Gauge* logical_bytes = Metrics::Global().GetGauge(
      "kvrecall_logical_bytes",
      "K/V bytes the sequences reference (what they would occupy without sharing)");
  Gauge* blocks = Metrics::Global().GetGauge("kvrecall_blocks", "KV blocks held");
  Gauge* shared_blocks = Metrics::Global().GetGauge(
      "kvrecall_shared_blocks", "KV blocks referenced by more than one sequence");
  Counter* prompt_tokens = Metrics::Global().GetCounter("kvrecall_prompt_tokens_total",
                                                        "Prompt tokens of newly opened sequences");
  Counter* matched_tokens = Metrics::Global().GetCounter(
      "kvrecall_matched_tokens_total",
      "Prompt tokens whose KV was already stored (shared prefix hits)");
  Counter* evictions = Metrics::Global().GetCounter(
      "kvrecall_evictions_total", "Blocks evicted from the arena (spilled to --data-dir)");
  Gauge* spilled_bytes = Metrics::Global().GetGauge(
      "kvrecall_spilled_bytes", "Bytes of spilled block records of live blocks on --data-dir");
  Gauge* spilled_blocks =
      Metrics::Global().GetGauge("kvrecall_spilled_blocks", "Live blocks held on disk only");
  Gauge* reloads =
      Metrics::Global().GetGauge("kvrecall_reloads", "Spilled blocks read back into the arena");
  Counter* drops =
      Metrics::Global().GetCounter("kvrecall_sequences_dropped_total", "Sequences dropped");
  Gauge* index_bytes =
      Metrics::Global().GetGauge("kvrecall_index_bytes", "Heap bytes of resident retrieval indices");
  Gauge* index_reserved_bytes = Metrics::Global().GetGauge(
      "kvrecall_index_reserved_bytes", "Arena bytes reserved for retrieval indices (of --memory)");
  Gauge* index_on_disk = Metrics::Global().GetGauge(
      "kvrecall_index_on_disk", "Sequences whose index is spilled to --data-dir");
  Gauge* index_pending = Metrics::Global().GetGauge(
      "kvrecall_index_pending", "Sequences whose index is being built (searches exact meanwhile)");
  Gauge* index_auto_builds = Metrics::Global().GetGauge(
      "kvrecall_index_auto_builds", "Indices built automatically at prefill commit");
  Gauge* index_growths =
      Metrics::Global().GetGauge("kvrecall_index_growths", "Index growth steps with decode tokens");
  Gauge* index_spills = Metrics::Global().GetGauge("kvrecall_index_spills", "Indices spilled");
  Gauge* index_reloads =
      Metrics::Global().GetGauge("kvrecall_index_reloads", "Indices loaded from --data-dir");
  Gauge* index_corrupt = Metrics::Global().GetGauge(
      "kvrecall_index_corrupt", "Index records found corrupt (dropped and rebuilt)");
  Gauge* index_refused = Metrics::Global().GetGauge(
      "kvrecall_index_refused", "Index builds, growth or reloads refused for lack of memory");
  // ctkvr's process-wide counters (sharded per thread in the indexer), read when rendered.
  NodeMetrics() {
    Metrics::Global().SetGaugeReader(
        "kvrecall_ctkvr_searches", "ctkvr segment searches since the process started",
        [] { return static_cast<double>(indexer::ReadCtkvrCounters().searches); });
    Metrics::Global().SetGaugeReader(
        "kvrecall_ctkvr_novel_searches",
        "ctkvr searches whose query was unlike every centroid: scored exactly, then added as one",
        [] { return static_cast<double>(indexer::ReadCtkvrCounters().novel); });
  }
};
std::string ModelKey(absl::string_view model_id) { return absl::StrCat("m", model_id); }

std::string EncodeModel(const ModelSpec& s) {
  internal::RecordWriter w;
  w.U32(1);  // version
  w.Str(s.model_id);
  w.I32(s.num_layers);
  w.I32(s.num_q_heads);
  w.I32(s.num_kv_heads);
  w.I32(s.head_dim);
  w.I32(static_cast<int32_t>(s.kv_dtype));
  w.I32(s.vocab_size);
  w.F64(s.rope_theta);
  return w.Finish();
}

absl::StatusOr<ModelSpec> DecodeModel(absl::string_view record) {
  internal::RecordReader r(record);
  ModelSpec s;
  const uint32_t version = r.U32();
  s.model_id = r.Str();
  s.num_layers = r.I32();
  s.num_q_heads = r.I32();
  s.num_kv_heads = r.I32();
  s.head_dim = r.I32();
  s.kv_dtype = static_cast<DType>(r.I32());
  s.vocab_size = r.I32();
  s.rope_theta = r.F64();
  RETURN_IF_ERROR(r.status());
  if (version != 1) return absl::DataLossError("unknown model record version");
  RETURN_IF_ERROR(s.Validate());
  return s;
}

NodeMetrics& M() {
  static NodeMetrics* m = new NodeMetrics();
  return *m;
}

}  // namespace

Node::Node(const NodeOptions& options, transport::Transport* transport, Clock* clock)
    : options_(options),
      transport_(transport),
      clock_(clock),
      started_(clock->Now()),
      pool_(options.search_threads, options.search_spin) {
  absl::StatusOr<std::unique_ptr<Arena>> arena =
      Arena::Create(ArenaOptions{options.memory_bytes, options.try_hugepages}, transport);
  if (!arena.ok()) {
    arena_status_ = arena.status();
    KV_LOG(ERROR) << arena_status_;
    arena = Arena::Create(ArenaOptions{0, false}, nullptr);
  }
  arena_ = std::move(*arena);
  if (options.arena_block_bytes > 0) {
    arena_status_.Update(arena_->EnsureSlotBytes(static_cast<size_t>(options.arena_block_bytes)));
  }
  if (!options.data_dir.empty()) {
    absl::StatusOr<std::unique_ptr<BlockStore>> store =
        BlockStore::Open(BlockStoreOptions{options.data_dir, options.durable, options.store_env});
    if (store.ok()) {
      store_ = std::move(*store);
    } else {
      arena_status_.Update(store.status());
      KV_LOG(ERROR) << "--data-dir " << options.data_dir << ": " << store.status();
    }
  }
  if (options.durable && store_ == nullptr) {
    arena_status_.Update(absl::InvalidArgumentError("--durable needs a usable --data-dir"));
  }
  blocks_ = std::make_unique<BlockTable>(
      arena_.get(), BlockTableOptions{clock, options.lease, store_.get(),
                                      options.durable && store_ != nullptr});
  IndexManagerOptions io;
  io.auto_method = options.auto_index;
  io.first_layer = options.auto_index_first_layer;
  io.token_begin = options.auto_index_token_begin;
  io.min_tokens = options.auto_index_min_tokens;
  io.index = options.index_options;
  io.durable = options.durable && store_ != nullptr;
  indexes_ = std::make_unique<IndexManager>(io, blocks_.get(), store_.get(), &pool_, clock);
  if (options.durable && store_ != nullptr && arena_status_.ok()) {
    if (absl::Status s = Recover(); !s.ok()) {
      KV_LOG(ERROR) << "recovering " << options.data_dir << ": " << s;
      arena_status_.Update(s);
    }
  }
  M().stored_bytes->Set(0);
  M().arena_bytes->Set(static_cast<double>(arena_->capacity_bytes()));
  M().evictions->Add(0);
  M().spilled_bytes->Set(0);
}

Node::~Node() {
  indexes_->WaitIdle();
  // Releasing the sequences below must not delete what --durable promised to keep.
  blocks_->KeepRecordsOnRelease();
}

absl::StatusOr<bool> Node::RegisterModel(const ModelSpec& spec) {
  RETURN_IF_ERROR(spec.Validate());
  absl::MutexLock lock(&mu_);
  auto it = models_.find(spec.model_id);
  if (it != models_.end()) {
    if (*it->second == spec) return false;
    return absl::AlreadyExistsError(
        absl::StrCat("model '", spec.model_id, "' is registered with a different spec"));
  }
  // One layer of one block is one arena slot (arena.h).
  const int64_t layer_block = 2 * int64_t{spec.num_kv_heads} * options_.block_tokens *
                              static_cast<int64_t>(spec.row_bytes());
  if (layer_block * spec.num_layers > arena_->capacity_bytes()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "one block of model '", spec.model_id, "' (", spec.num_layers, " layers x ", layer_block,
        " bytes) exceeds this node's ", arena_->capacity_bytes(), "-byte arena"));
  }
  RETURN_IF_ERROR(arena_->EnsureSlotBytes(static_cast<size_t>(layer_block)));
  if (options_.durable && store_ != nullptr) {
    std::unique_ptr<BlockStore::Batch> batch = store_->NewBatch();
    batch->PutMeta(ModelKey(spec.model_id), EncodeModel(spec));
    RETURN_IF_ERROR(store_->Commit(batch.get()));
  }
  models_[spec.model_id] = std::make_shared<const ModelSpec>(spec);
  return true;
}

absl::Status Node::Recover() {
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<std::string, std::string>> model_records, records;
  RETURN_IF_ERROR(store_->ScanMeta([&](absl::string_view key, absl::string_view value) {
    if (!key.empty() && key[0] == 'm') model_records.emplace_back(key, value);
    if (!key.empty() && key[0] == 's') records.emplace_back(key, value);
    return absl::OkStatus();
  }));
  for (const auto& [key, value] : model_records) {
    absl::StatusOr<ModelSpec> spec = DecodeModel(value);
    if (!spec.ok() || ModelKey(spec->model_id) != key) {
      KV_LOG(ERROR) << "model record " << key.substr(1) << " is corrupt; its sequences are lost";
      continue;
    }
    const int64_t layer_block = 2 * int64_t{spec->num_kv_heads} * options_.block_tokens *
                                static_cast<int64_t>(spec->row_bytes());
    if (absl::Status s = arena_->EnsureSlotBytes(static_cast<size_t>(layer_block)); !s.ok()) {
      KV_LOG(ERROR) << "model " << spec->model_id << " no longer fits this arena: " << s;
      continue;
    }
    models_[spec->model_id] = std::make_shared<const ModelSpec>(*spec);
  }
  absl::flat_hash_map<uint64_t, Block*> blocks;  // records shared by several sequences
  int64_t recovered = 0;
  for (const auto& [key, value] : records) {
    // Key: "s" + u32 len(tenant) + tenant + id.
    if (key.size() < 5) continue;
    uint32_t tn = 0;
    for (int i = 0; i < 4; ++i) tn |= uint32_t{static_cast<uint8_t>(key[1 + i])} << (8 * i);
    if (key.size() < 5 + static_cast<size_t>(tn)) continue;
    const SeqKey sk{key.substr(5, tn), key.substr(5 + tn)};
    auto lost = [&](const std::string& why) {
      KV_LOG(ERROR) << "sequence '" << sk.second << "' of tenant '" << sk.first
                    << "' is lost: " << why;
      return absl::DataLossError(absl::StrCat("sequence '", sk.second, "' of tenant '", sk.first,
                                              "' could not be recovered: ", why));
    };
    internal::RecordReader r(value);
    const uint32_t version = r.U32();
    const std::string model_id = r.Str();
    const int64_t block_tokens = r.U32();
    const int64_t committed = r.I64();
    const int64_t adopted = r.I64();
    const uint64_t ntok = r.U64();
    std::vector<int32_t> tokens;
    if (ntok <= r.remaining() / 4) {
      tokens.resize(ntok);
      for (int32_t& t : tokens) t = r.I32();
    }
    const uint64_t nblocks = r.U64();
    std::vector<uint64_t> ids;
    if (nblocks <= r.remaining() / 8) {
      ids.resize(nblocks);
      for (uint64_t& id : ids) id = r.U64();
    }
    if (absl::Status s = r.status(); !s.ok() || tokens.size() != ntok || ids.size() != nblocks) {
      lost_[sk] = lost(s.ok() ? "metadata record is corrupt" : std::string(s.message()));
      continue;
    }
    auto model = models_.find(model_id);
    if (version != 1 || model == models_.end() || block_tokens != options_.block_tokens ||
        committed < 0 || committed > static_cast<int64_t>(ntok) || adopted > committed ||
        static_cast<int64_t>(nblocks) != (committed + block_tokens - 1) / block_tokens) {
      lost_[sk] = lost(absl::StrCat("metadata record (version ", version, ", model '", model_id,
                        "', block_tokens ", block_tokens, ") does not match this node"));
      continue;
    }
    const ModelSpec& spec = *model->second;
    const size_t layer_bytes = 2 * static_cast<size_t>(spec.num_kv_heads) *
                               static_cast<size_t>(block_tokens) * spec.row_bytes();
    std::vector<Block*> seq_blocks;
    for (uint64_t id : ids) {
      auto [it, fresh] = blocks.try_emplace(id, nullptr);
      if (fresh) {
        it->second = blocks_->AddRecovered(id, spec.num_layers, layer_bytes);
      } else {
        blocks_->Ref(it->second);
      }
      seq_blocks.push_back(it->second);
    }
    std::shared_ptr<TenantAccount> account = AccountOf(sk.first);
    account->ForceAddSequence();  // acknowledged: kept even over a lowered quota
    auto seq = std::make_shared<Sequence>(sk.first, sk.second, model->second,
                                          options_.block_tokens, blocks_.get(),
                                          NamespaceOf(sk.first), /*durable=*/true,
                                          std::move(account));
    seq->Restore(std::move(tokens), committed, adopted, std::move(seq_blocks));
    indexes_->Track(seq, /*recovered=*/true);
    sequences_[sk] = std::move(seq);
    ++recovered;
  }
  M().sequences->Set(static_cast<double>(sequences_.size()));
  KV_LOG(INFO) << "recovered " << models_.size() << " models, " << recovered << " sequences ("
               << blocks.size() << " blocks, on disk until read), " << lost_.size() << " lost";
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ModelSpec>> Node::GetModel(const std::string& model_id) const {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(model_id);
  if (it == models_.end()) return absl::NotFoundError(absl::StrCat("model '", model_id, "' is not registered"));
  return it->second;
}

absl::StatusOr<OpenSequenceResult> Node::OpenSequence(const OpenSequenceArgs& args) {
  RETURN_IF_ERROR(ValidateId("tenant", args.tenant));
  RETURN_IF_ERROR(ValidateId("sequence_id", args.sequence_id));
  if (static_cast<int64_t>(args.token_ids.size()) > kMaxPromptTokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", args.token_ids.size(), " tokens exceeds ", kMaxPromptTokens));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<const ModelSpec> spec, GetModel(args.model_id));
  ExpireIngests();  // a client reopening after a crash must not find its old ingest holding the sequence
  std::shared_ptr<Sequence> seq;
  bool created = false;
  {
    absl::MutexLock lock(&mu_);
    if (auto lost = lost_.find({args.tenant, args.sequence_id}); lost != lost_.end()) {
      return lost->second;
    }
    if (draining_.load() && sequences_.find({args.tenant, args.sequence_id}) == sequences_.end()) {
      return placement::DrainingError();
    }
    auto& slot = sequences_[{args.tenant, args.sequence_id}];
    if (slot == nullptr) {
      std::shared_ptr<TenantAccount> account = AccountOf(args.tenant);
      if (absl::Status q = account->AddSequence(); !q.ok()) {
        sequences_.erase({args.tenant, args.sequence_id});
        return q;
      }
      slot = std::make_shared<Sequence>(args.tenant, args.sequence_id, spec, options_.block_tokens,
                                        blocks_.get(), NamespaceOf(args.tenant),
                                        options_.durable && store_ != nullptr, std::move(account));
      created = true;
      indexes_->Track(slot, /*recovered=*/false);
      M().sequences->Set(static_cast<double>(sequences_.size()));
    }
    seq = slot;
  }
  if (!created && seq->spec().model_id != args.model_id) {
    return absl::FailedPreconditionError(absl::StrCat("sequence '", args.sequence_id, "' belongs to model '",
                                                      seq->spec().model_id, "'"));
  }
  if (absl::Status s = seq->AddTokenIds(0, args.token_ids); !s.ok()) {
    if (created) {
      {
        absl::MutexLock lock(&mu_);
        sequences_.erase({args.tenant, args.sequence_id});
      }
      indexes_->Forget(seq.get(), nullptr);
    }
    return s;
  }
  seq->set_closed(false);
  seq->Touch();
  // A sequence with nothing stored yet starts from the blocks its namespace already holds.
  const int64_t adopted = seq->AdoptSharedPrefix();
  OpenSequenceResult r;
  r.stored_tokens = seq->committed_tokens();
  r.matched_tokens = std::min<int64_t>(r.stored_tokens, static_cast<int64_t>(args.token_ids.size()));
  if (created) {
    const auto prompt = static_cast<int64_t>(args.token_ids.size());
    absl::MutexLock lock(&mu_);
    TenantCounters& c = tenant_counters_[args.tenant];
    c.prompt_tokens += prompt;
    c.matched_tokens += adopted;
    prompt_tokens_ += prompt;
    matched_tokens_ += adopted;
    M().prompt_tokens->Add(static_cast<double>(prompt));
    M().matched_tokens->Add(static_cast<double>(adopted));
  }
  return r;
}

absl::StatusOr<std::shared_ptr<Sequence>> Node::FindSequence(const std::string& tenant,
                                                             const std::string& sequence_id) const {
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find({tenant, sequence_id});
  if (it == sequences_.end()) {
    if (auto lost = lost_.find({tenant, sequence_id}); lost != lost_.end()) return lost->second;
    return NotFound(tenant, sequence_id);
  }
  return it->second;
}

absl::StatusOr<std::shared_ptr<Node::Worker>> Node::FindWorker(const std::string& tenant,
                                                               const std::string& worker_id) const {
  absl::MutexLock lock(&mu_);
  auto it = workers_.find({tenant, worker_id});
  if (it == workers_.end()) {
    return absl::FailedPreconditionError(absl::StrCat("worker '", worker_id, "' is not attached (AttachWorker first)"));
  }
  return it->second;
}

Node::StagingArea* Node::Worker::Area(uint32_t id) {
  absl::MutexLock lock(&areas_mu);
  std::unique_ptr<StagingArea>& area = areas[id];
  if (area == nullptr) area = std::make_unique<StagingArea>();
  return area.get();
}

static_assert(std::endian::native == std::endian::little, "results in the worker's region are little-endian");

absl::Status Node::AppendKVBatch(const std::string& tenant, absl::Span<const BatchAppend> appends,
                                 std::vector<absl::StatusOr<int64_t>>* stored) {
  if (appends.empty() || appends.size() > static_cast<size_t>(kMaxRetrieveEntries)) {
    return absl::InvalidArgumentError(
        absl::StrCat("appends ", appends.size(), " not in [1, ", kMaxRetrieveEntries, "]"));
  }
  RETURN_IF_ERROR(CheckDistinctSequenceIds(
      appends, [](const BatchAppend& a) -> absl::string_view { return a.sequence_id; }));
  auto apply = [&](const BatchAppend& a) -> absl::StatusOr<int64_t> {
    ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, FindSequence(tenant, a.sequence_id));
    const ModelSpec& spec = seq->spec();
    if (a.num_tokens < 0 || a.token_start < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("append of ", a.num_tokens, " tokens at ", a.token_start));
    }
    const size_t layers = static_cast<size_t>(spec.num_layers);
    const size_t layer_bytes = static_cast<size_t>(spec.num_kv_heads) *
                               static_cast<size_t>(a.num_tokens) * spec.row_bytes();
    auto per_layer = [&](const std::vector<absl::Span<const uint8_t>>& in,
                         std::vector<absl::Span<const uint8_t>>* out) -> bool {
      if (in.size() == 1 && in[0].size() == layer_bytes * layers) {  // all layers back to back
        for (size_t l = 0; l < layers; ++l)
          out->push_back(in[0].subspan(l * layer_bytes, layer_bytes));
        return true;
      }
      if (in.size() != layers) return false;
      for (const absl::Span<const uint8_t>& l : in) {
        if (l.size() != layer_bytes) return false;
      }
      *out = in;
      return true;
    };
    std::vector<absl::Span<const uint8_t>> keys, values;
    if (!per_layer(a.keys, &keys) || !per_layer(a.values, &values)) {
      return absl::InvalidArgumentError(
          absl::StrCat("keys and values must be [", spec.num_layers, "][", spec.num_kv_heads, "][",
                       a.num_tokens, "][", spec.head_dim, "] in ", DTypeName(spec.kv_dtype), ": ",
                       layer_bytes, " bytes per layer"));
    }
    return seq->AppendTokens(a.token_start, a.num_tokens, a.token_ids, keys, values);
  };
  stored->clear();
  stored->reserve(appends.size());
  for (const BatchAppend& a : appends) stored->push_back(apply(a));
  return absl::OkStatus();
}

absl::StatusOr<const float*> Node::ReadRegionQueries(Worker& worker, uint64_t offset,
                                                     size_t floats) {
  const uint64_t len = worker.writer->region().length;
  const uint64_t bytes = floats * sizeof(float);
  if (offset > len || len - offset < bytes) {
    return absl::OutOfRangeError(absl::StrCat("queries of ", bytes, " bytes at byte ", offset,
                                              " do not fit the worker's region of ", len,
                                              " bytes"));
  }
  thread_local std::vector<float> buffer;  // kept per thread
  internal::ClearForReuse(&buffer, floats);
  buffer.resize(floats);
  const transport::GetOp get{buffer.data(), static_cast<size_t>(bytes), offset};
  RETURN_IF_ERROR(worker.writer->GetAll({&get, 1}));
  return buffer.data();
}

absl::Status Node::StreamDeltas(const RetrieveArgs& args, Worker& worker,
                                std::vector<std::shared_ptr<Sequence>>& seqs,
                                std::vector<Sequence::Snapshot>& snaps, RetrieveOutcome* out) {
  const size_t n = args.entries.size();
  // One call at a time per staging area, in call order: a late call can never put over the rows
  // of a newer one that the worker is about to read.
  StagingArea* area = worker.Area(args.staging_area);
  absl::MutexLock area_lock(&area->mu);
  if (args.call_seq != 0) {
    if (args.call_seq <= area->last_call) {
      return absl::AbortedError(absl::StrCat("stale call ", args.call_seq, " in staging area ", args.staging_area,
                                             ": call ", area->last_call, " already used it"));
    }
    area->last_call = args.call_seq;
  }
  // The worker is done with the previous call's rows: its blocks may go.
  area->ReleaseHeld();

  const int64_t plan_ns = clock_->MonotonicNanos();
  std::vector<SlotKey> keys(n);
  std::vector<absl::Status> status(n);
  std::vector<SlotPlan> plans(n);
  pool_.ParallelFor(static_cast<int64_t>(n), [&](int64_t i) {
    const RetrieveEntryArgs& e = args.entries[i];
    keys[i] = SlotKey{args.tenant, e.sequence_id, args.layer, e.kv_head};
    absl::StatusOr<SlotPlan> plan = worker.mirror.Plan(keys[i], std::weak_ptr<const void>(seqs[i]), e.slot_epoch,
                                                      args.budget, out->token_ids[i]);
    if (plan.ok()) {
      plans[i] = *std::move(plan);
    } else {
      status[i] = plan.status();
    }
  });
  // Forgets the entries this call planned (a refused plan changed nothing of its entry).
  auto forget_all = [&] {
    for (size_t i = 0; i < n; ++i) {
      if (args.entries[i].slot_epoch != 0 && status[i].ok()) worker.mirror.Forget(keys[i]);
    }
  };
  for (size_t i = 0; i < n; ++i) {
    if (!status[i].ok()) {
      forget_all();
      return status[i];
    }
  }
  out->stream_plan_micros = (clock_->MonotonicNanos() - plan_ns) / 1000;

  // Entry i's new rows go at row dest_row of the worker's region as [K row | V row] per token,
  // and (results_in_region) its result at results_offset + i * RetrieveResultBytes(budget).
  const size_t result_bytes = RetrieveResultBytes(args.budget);
  std::vector<size_t> offset(n + 1, 0);  // of entry i's rows among all rows sent
  for (size_t i = 0; i < n; ++i) {
    offset[i + 1] = offset[i] + plans[i].fill_tokens.size() * 2 * seqs[i]->spec().row_bytes();
  }
  // Streaming stores: the rows are headed for the worker's GPU or the NIC, and a cached copy
  // would first read every destination line and then evict the caller's data.
  // Writes entry i's new rows [begin, end) (of its fill tokens) at dst + begin pairs.
  auto write_rows = [&](size_t i, size_t begin, size_t end, uint8_t* dst) {
    const size_t row = seqs[i]->spec().row_bytes();
    const int32_t* tokens = plans[i].fill_tokens.data() + begin;
    const size_t m = end - begin;
    if (m == 0) return;  // an entry with nothing new (its one piece is empty)
    thread_local std::vector<const uint8_t*> src;  // [K row | V row] per token, as dst
    src.resize(2 * m);
    indexer::RowAddresses(snaps[i].keys, tokens, m, src.data(), 2);
    indexer::RowAddresses(snaps[i].values, tokens, m, src.data() + 1, 2);
    indexer::kernels::CopyRowsStreaming(src.data(), static_cast<int64_t>(src.size()), row,
                                        dst + begin * 2 * row, row);
  };
  // The copies go in pieces of at most kPieceTokens rows, so that a call of a few entries with
  // many new rows each still spreads over the pool (one thread copies ~5 GB/s; kvrecall-bench
  // stream's 8 entries of 4 MiB each were 8 threads' work). Piece 0 of an entry also writes its
  // result.
  // (Row addresses copy whole entries, and only the few that lie outside the arena.)
  constexpr size_t kPieceTokens = 256;
  struct Piece {
    size_t entry, begin, end;
  };
  std::vector<Piece> pieces;
  if (!args.row_addresses) {
    pieces.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const size_t m = plans[i].fill_tokens.size();
      size_t b = 0;
      do {
        pieces.push_back({i, b, std::min(m, b + kPieceTokens)});
        b += kPieceTokens;
      } while (b < m);
    }
  }
  auto write_result = [&](size_t i, uint8_t* p) {
    const std::vector<int32_t>& ids = out->token_ids[i];
    const uint32_t counts[2] = {static_cast<uint32_t>(ids.size()), static_cast<uint32_t>(plans[i].fill_slots.size())};
    std::memcpy(p, counts, 8);
    if (!ids.empty()) std::memcpy(p + 8, ids.data(), ids.size() * 4);  // an empty selection: null
    uint8_t* s16 = p + 8 + ids.size() * 4;
    for (const std::vector<int32_t>* v : {&plans[i].slots, &plans[i].fill_slots}) {
      indexer::kernels::NarrowU16(v->data(), static_cast<int64_t>(v->size()), s16);
      s16 += 2 * v->size();
    }
  };
  auto dest = [&](size_t i) { return args.entries[i].dest_row * 2 * seqs[i]->spec().row_bytes(); };

  // Row addresses instead of copies (args.row_addresses): each row of entry i where it lies in
  // the arena. An entry with a row anywhere else (none today: reads reload spilled blocks into
  // the arena) is copied to its dest_row as usual, and its addresses point there.
  const uintptr_t arena_lo = reinterpret_cast<uintptr_t>(arena_->base());
  const uintptr_t arena_hi = arena_lo + static_cast<uintptr_t>(arena_->capacity_bytes());
  if (args.row_addresses) out->row_addresses.assign(n, {});
  auto rows_in_arena = [&](size_t i) {  // fills out->row_addresses[i]; false if one lies outside
    const size_t row = seqs[i]->spec().row_bytes();
    const std::vector<int32_t>& tokens = plans[i].fill_tokens;
    std::vector<const uint8_t*>& addr = out->row_addresses[i];
    addr.resize(2 * tokens.size());
    indexer::RowAddresses(snaps[i].keys, tokens.data(), tokens.size(), addr.data(), 2);
    indexer::RowAddresses(snaps[i].values, tokens.data(), tokens.size(), addr.data() + 1, 2);
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    for (const uint8_t* a : addr) {
      lo = std::min(lo, reinterpret_cast<uintptr_t>(a));
      hi = std::max(hi, reinterpret_cast<uintptr_t>(a));
    }
    return addr.empty() || (lo >= arena_lo && hi <= arena_hi - row);
  };

  // A worker whose region is mapped here (same-host shared memory, in-process) gets the rows and
  // results written straight into it by the pool: one copy (or none, with row addresses).
  // Otherwise they are packed into the area's pack buffer and put with one op per entry. The pack
  // buffer is reused across calls (a fresh zero-filled allocation per call cost more than the
  // copies for MiB-sized puts, as glibc returns it to the kernel on free; kvrecall-bench stream);
  // beyond kMaxRetainedPack it is freed after the call.
  absl::StatusOr<bool> direct = worker.writer->WriteDirect([&](uint8_t* base) {
    if (args.row_addresses) {
      pool_.ParallelFor(static_cast<int64_t>(n), [&](int64_t i) {
        if (!rows_in_arena(i)) {
          uint8_t* dst = base + dest(i);
          write_rows(i, 0, plans[i].fill_tokens.size(), dst);
          const size_t row = seqs[i]->spec().row_bytes();
          std::vector<const uint8_t*>& addr = out->row_addresses[i];
          for (size_t j = 0; j < addr.size(); ++j) addr[j] = dst + j * row;
        }
        if (args.results_in_region) write_result(i, base + args.results_offset + i * result_bytes);
      });
    } else {
      pool_.ParallelFor(static_cast<int64_t>(pieces.size()), [&](int64_t p) {
        const Piece& c = pieces[p];
        write_rows(c.entry, c.begin, c.end, base + dest(c.entry));
        if (args.results_in_region && c.begin == 0) {
          write_result(c.entry, base + args.results_offset + c.entry * result_bytes);
        }
      });
    }
    return absl::OkStatus();
  });
  if (args.row_addresses && direct.ok() && !*direct) {
    direct = absl::FailedPreconditionError(
        "row_addresses needs a worker whose region is mapped in this process");
  }
  if (direct.ok() && !*direct) {
    constexpr size_t kMaxRetainedPack = size_t{16} << 20;
    const size_t pack_bytes = offset[n] + (args.results_in_region ? n * result_bytes : 0);
    if (area->pack_capacity < pack_bytes) {
      area->pack.reset();
      area->pack = std::make_unique_for_overwrite<uint8_t[]>(pack_bytes);  // every byte used is written below
      area->pack_capacity = pack_bytes;
    }
    absl::Cleanup release_large = [area]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      if (area->pack_capacity > kMaxRetainedPack) {
        area->pack.reset();
        area->pack_capacity = 0;
      }
    };
    uint8_t* const packed = area->pack.get();
    uint8_t* const results = packed + offset[n];
    std::vector<transport::PutOp> ops(n);
    for (size_t i = 0; i < n; ++i)
      ops[i] = transport::PutOp{packed + offset[i], offset[i + 1] - offset[i], dest(i)};
    pool_.ParallelFor(static_cast<int64_t>(pieces.size()), [&](int64_t p) {
      const Piece& c = pieces[p];
      write_rows(c.entry, c.begin, c.end, packed + offset[c.entry]);
      if (args.results_in_region && c.begin == 0)
        write_result(c.entry, results + c.entry * result_bytes);
    });
    std::erase_if(ops, [](const transport::PutOp& op) { return op.length == 0; });
    if (args.results_in_region) ops.push_back(transport::PutOp{results, n * result_bytes, args.results_offset});
    if (absl::Status st = worker.writer->PutAll(ops); !st.ok()) direct = st;
  }
  if (!direct.ok()) {
    forget_all();  // which rows arrived is unknown
    out->row_addresses.clear();
    return direct.status();
  }
  if (args.row_addresses) {
    // The rows must stay where they are until the worker has read them: the call's snapshots
    // (their block pins) and sequences stay with the area until its next call.
    area->held_seqs = std::move(seqs);
    area->held_snaps = std::move(snaps);
  }
  out->bytes_streamed += offset[n];
  for (size_t i = 0; i < n; ++i) {
    out->rows_sent += static_cast<int64_t>(plans[i].fill_slots.size());
    out->slots[i] = std::move(plans[i].slots);
    out->fill_slots[i] = std::move(plans[i].fill_slots);
  }
  return absl::OkStatus();
}

absl::StatusOr<RetrieveOutcome> Node::Retrieve(const RetrieveArgs& args) {
  const int64_t start_ns = clock_->MonotonicNanos();
  if (args.method == Method::kMerged) {
    return absl::UnimplementedError("merged replaces tokens instead of selecting them; it is not a Retrieve method");
  }
  RETURN_IF_ERROR(ValidateSelection(args.budget, args.successors));
  if (args.entries.empty() || args.entries.size() > static_cast<size_t>(kMaxRetrieveEntries)) {
    return absl::InvalidArgumentError(absl::StrCat("entries ", args.entries.size(), " not in [1, ", kMaxRetrieveEntries, "]"));
  }
  if (args.staging_area >= kMaxStagingAreas) {
    return absl::InvalidArgumentError(absl::StrCat("staging_area ", args.staging_area, " not below ", kMaxStagingAreas));
  }
  std::shared_ptr<Worker> worker;
  if (!args.worker_id.empty()) {
    ASSIGN_OR_RETURN(worker, FindWorker(args.tenant, args.worker_id));
  } else if (args.results_in_region || args.row_addresses || args.queries_in_region) {
    return absl::InvalidArgumentError(absl::StrCat(args.results_in_region ? "results_in_region"
                                                   : args.row_addresses   ? "row_addresses"
                                                                          : "queries_in_region",
                                                   " needs an attached worker (worker_id)"));
  }

  // Validate every entry and take snapshots before doing any work: first the fields, then one
  // read of the layer for every sequence (Sequence::ReadLayer: one pin), then the ranges.
  // `seqs` is declared before `snaps`, which must go first.
  const size_t n = args.entries.size();
  std::vector<std::shared_ptr<Sequence>> seqs(n);
  std::vector<Sequence::Snapshot> snaps(n);
  std::vector<std::shared_ptr<const SequenceIndex>> indexes(n);  // keep segments alive
  std::vector<indexer::SearchEntry> queries(n);
  // Each entry's queries: in args, or read from the worker's region, where entry i's lie at
  // floats [region_at[i], region_at[i + 1]).
  std::vector<absl::Span<const float>> entry_queries(n);
  std::vector<size_t> region_at(args.queries_in_region ? n + 1 : 0, 0);
  absl::flat_hash_map<absl::string_view, size_t> group_of;  // sequence id -> index in `groups`
  std::vector<std::vector<size_t>> groups;  // the entries of each sequence, in order
  for (size_t i = 0; i < n; ++i) {
    const RetrieveEntryArgs& e = args.entries[i];
    auto [it, fresh] = group_of.try_emplace(e.sequence_id, groups.size());
    if (fresh) {
      groups.emplace_back();
      ASSIGN_OR_RETURN(seqs[i], FindSequence(args.tenant, e.sequence_id));
    } else {
      seqs[i] = seqs[groups[it->second].front()];
    }
    groups[it->second].push_back(i);
    const ModelSpec& spec = seqs[i]->spec();
    auto bad = [&](const std::string& msg) {
      return absl::InvalidArgumentError(absl::StrCat("entry ", i, " (sequence '", e.sequence_id, "'): ", msg));
    };
    if (args.layer < 0 || args.layer >= spec.num_layers) {
      return bad(absl::StrCat("layer ", args.layer, " outside [0, ", spec.num_layers, ")"));
    }
    if (e.kv_head < 0 || e.kv_head >= spec.num_kv_heads) {
      return bad(absl::StrCat("kv_head ", e.kv_head, " outside [0, ", spec.num_kv_heads, ")"));
    }
    const size_t want = static_cast<size_t>(spec.group_size()) * spec.head_dim;
    if (args.queries_in_region) {
      if (!e.queries.empty())
        return bad("carries queries, but they are in the worker's region (queries_in_region)");
      region_at[i + 1] = region_at[i] + want;
    } else if (e.queries.size() != want) {
      return bad(absl::StrCat("queries must be [", spec.group_size(), "][", spec.head_dim, "] = ", want,
                              " floats, got ", e.queries.size()));
    } else {
      entry_queries[i] = e.queries;
    }
  }
  if (args.queries_in_region) {
    ASSIGN_OR_RETURN(const float* fetched,
                     ReadRegionQueries(*worker, args.queries_offset, region_at[n]));
    for (size_t i = 0; i < n; ++i) {
      entry_queries[i] =
          absl::MakeConstSpan(fetched + region_at[i], region_at[i + 1] - region_at[i]);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    for (float q : entry_queries[i]) {
      if (!std::isfinite(q)) {
        return absl::InvalidArgumentError(absl::StrCat("entry ", i, " (sequence '",
                                                       args.entries[i].sequence_id,
                                                       "'): queries contain NaN or Inf"));
      }
    }
  }
  // One read of the layer for every sequence (one pin of their blocks, shared prefixes once).
  const int64_t read_ns = clock_->MonotonicNanos();
  {
    std::vector<const Sequence*> read_seqs;
    std::vector<std::vector<int>> read_heads;
    for (const std::vector<size_t>& members : groups) {
      read_seqs.push_back(seqs[members.front()].get());
      std::vector<int>& heads = read_heads.emplace_back();
      for (size_t i : members) heads.push_back(args.entries[i].kv_head);
    }
    ASSIGN_OR_RETURN(std::vector<std::vector<Sequence::Snapshot>> read,
                     Sequence::ReadLayer(read_seqs, args.layer, read_heads));
    for (size_t g = 0; g < groups.size(); ++g) {
      const std::shared_ptr<const SequenceIndex> index =
          args.method != Method::kExact ? read_seqs[g]->index() : nullptr;
      for (size_t j = 0; j < groups[g].size(); ++j) {
        snaps[groups[g][j]] = std::move(read[g][j]);
        indexes[groups[g][j]] = index;
      }
    }
  }
  int64_t read_elapsed_ns = clock_->MonotonicNanos() - read_ns;
  for (size_t i = 0; i < n; ++i) {
    const RetrieveEntryArgs& e = args.entries[i];
    const ModelSpec& spec = seqs[i]->spec();
    const int64_t stored = snaps[i].keys.num_tokens;
    if (e.token_begin < 0 || e.token_begin > e.token_end || e.token_end > stored) {
      return absl::InvalidArgumentError(absl::StrCat("entry ", i, " (sequence '", e.sequence_id, "'): token range [",
                                                     e.token_begin, ", ", e.token_end, ") outside the ", stored,
                                                     " stored tokens"));
    }
    if (worker != nullptr) {
      const uint64_t row_pair = 2 * spec.row_bytes();
      const uint64_t len = worker->writer->region().length;
      if (e.dest_row > len / row_pair || len / row_pair - e.dest_row < static_cast<uint64_t>(args.budget)) {
        return absl::OutOfRangeError(absl::StrCat("entry ", i, ": rows [", e.dest_row, ", ", e.dest_row + args.budget,
                                                  ") do not fit the worker's region of ", len / row_pair, " rows"));
      }
    }
    indexer::SearchEntry& q = queries[i];
    q.queries = entry_queries[i].data();
    q.group = spec.group_size();
    q.keys = &snaps[i].keys;
    q.token_begin = e.token_begin;
    q.token_end = e.token_end;
    q.k = args.budget;
    q.successors = args.successors;
    if (args.method != Method::kExact) {
      const indexer::Segment* seg =
          indexes[i] != nullptr && indexes[i]->method == args.method ? indexes[i]->segment(args.layer, e.kv_head) : nullptr;
      if (seg == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat("entry ", i, ": sequence '", e.sequence_id, "' has no ",
                                                          indexer::MethodName(args.method), " index for layer ",
                                                          args.layer, " (BuildIndex first)"));
      }
      q.segments.push_back(seg);
    }
  }

  if (args.results_in_region) {
    const uint64_t len = worker->writer->region().length;
    const uint64_t need = n * RetrieveResultBytes(args.budget);
    if (args.results_offset > len || len - args.results_offset < need) {
      return absl::OutOfRangeError(absl::StrCat("results of ", need, " bytes at byte ", args.results_offset,
                                                " do not fit the worker's region of ", len, " bytes"));
    }
  }

  RetrieveOutcome out;
  const int64_t search_ns = clock_->MonotonicNanos();
  indexer::SearchTimes phases;
  indexer::SearchOptions search_options;
  search_options.times = &phases;
  RETURN_IF_ERROR(indexer::Search(queries, search_options, &pool_, &out.token_ids));
  out.search_micros = (clock_->MonotonicNanos() - search_ns) / 1000;
  out.search_select_micros = phases.select_nanos / 1000;
  out.search_score_micros = phases.score_nanos / 1000;
  out.search_finish_micros = phases.finish_nanos / 1000;
  out.slots.resize(n);
  out.fill_slots.resize(n);
  for (const auto& ids : out.token_ids) out.rows_selected += static_cast<int64_t>(ids.size());

  if (worker == nullptr) {
    // Ids only: the caller fetches every selected row (no slot cache is mirrored for it).
    for (size_t i = 0; i < n; ++i) {
      out.slots[i].resize(out.token_ids[i].size());
      std::iota(out.slots[i].begin(), out.slots[i].end(), 0);
      out.fill_slots[i] = out.slots[i];
    }
    out.rows_sent = out.rows_selected;
  } else {
    const int64_t stream_ns = clock_->MonotonicNanos();
    RETURN_IF_ERROR(StreamDeltas(args, *worker, seqs, snaps, &out));
    out.stream_micros = (clock_->MonotonicNanos() - stream_ns) / 1000;
  }
  // The pins go with the snapshots (their release is part of the reads' cost).
  const int64_t release_ns = clock_->MonotonicNanos();
  queries.clear();
  snaps.clear();
  read_elapsed_ns += clock_->MonotonicNanos() - release_ns;
  out.read_micros = read_elapsed_ns / 1000;
  retrieve_calls_.fetch_add(1);
  retrieve_entries_.fetch_add(static_cast<int64_t>(n));
  bytes_streamed_.fetch_add(static_cast<int64_t>(out.bytes_streamed));
  M().retrieve_calls->Add();
  M().retrieve_entries->Add(static_cast<double>(n));
  M().bytes_streamed->Add(static_cast<double>(out.bytes_streamed));
  M().rows_selected->Add(static_cast<double>(out.rows_selected));
  M().rows_sent->Add(static_cast<double>(out.rows_sent));
  out.node_micros = (clock_->MonotonicNanos() - start_ns) / 1000;
  M().retrieve_seconds->Observe(static_cast<double>(out.node_micros) * 1e-6);
  return out;
}

absl::StatusOr<BuildIndexOutcome> Node::BuildIndex(const BuildIndexArgs& args) {
  if (args.method == Method::kMerged) {
    return absl::InvalidArgumentError("merged is a compressed representation, not a search index");
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, FindSequence(args.tenant, args.sequence_id));
  const ModelSpec& spec = seq->spec();
  if (args.first_layer < 0 || args.first_layer >= spec.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("first_layer ", args.first_layer, " outside [0, ", spec.num_layers, ")"));
  }
  const int64_t committed = seq->committed_tokens();
  if (args.token_begin < 0 || args.token_begin >= committed) {
    return absl::FailedPreconditionError(absl::StrCat("nothing to index: token_begin ", args.token_begin, " but ",
                                                      committed, " tokens committed"));
  }
  if (args.token_end < 0 || (args.token_end > 0 && args.token_end <= args.token_begin)) {
    return absl::InvalidArgumentError(
        absl::StrCat("token_end ", args.token_end,
                     " must be 0 (every committed token) or above token_begin ", args.token_begin));
  }
  if (args.token_end > committed) {
    return absl::FailedPreconditionError(
        absl::StrCat("token_end ", args.token_end, " beyond the ", committed, " tokens committed"));
  }
  BuildIndexOutcome outcome;
  outcome.indexed_tokens = (args.token_end > 0 ? args.token_end : committed) - args.token_begin;
  if (args.method == Method::kExact) return outcome;  // exact scans; nothing to build
  const indexer::Method method = args.method;
  const int sparse_layers = spec.num_layers - args.first_layer;
  const int d = spec.head_dim, Hq = spec.num_q_heads;
  if (method == indexer::Method::kCtkvr) {
    if (args.num_queries <= 0 || args.num_queries > kMaxIndexQueries) {
      return absl::InvalidArgumentError(absl::StrCat("ctkvr needs 1..", kMaxIndexQueries, " prompt queries, got ",
                                                     args.num_queries));
    }
    if (static_cast<int>(args.layer_queries.size()) != sparse_layers) {
      return absl::InvalidArgumentError(absl::StrCat("ctkvr needs queries for ", sparse_layers, " layers, got ",
                                                     args.layer_queries.size()));
    }
    const size_t want = static_cast<size_t>(args.num_queries) * Hq * d;
    for (const auto& q : args.layer_queries) {
      if (q.size() != want) {
        return absl::InvalidArgumentError(absl::StrCat("queries of a layer must be [", args.num_queries, "][", Hq, "][",
                                                       d, "] = ", want, " floats, got ", q.size()));
      }
      for (float x : q) {
        if (!std::isfinite(x)) return absl::InvalidArgumentError("queries contain NaN or Inf");
      }
    }
    if (!args.ctkvr_lists.empty()) {
      // Sizes here; the lists' contents (ranges, order, normalisers) per segment by the indexer.
      const indexer::CtkvrOptions& o = indexes_->options().index.ctkvr;
      if (static_cast<int>(args.ctkvr_lists.size()) != sparse_layers) {
        return absl::InvalidArgumentError(absl::StrCat("ctkvr lists for ", args.ctkvr_lists.size(),
                                                       " layers; want ", sparse_layers));
      }
      if (args.ctkvr_list_size < 1 || args.ctkvr_list_size > o.list_size) {
        return absl::InvalidArgumentError(absl::StrCat("ctkvr lists of ", args.ctkvr_list_size,
                                                       " tokens; this node takes 1 to ",
                                                       o.list_size));
      }
      if (args.num_queries > o.centroids) {
        return absl::InvalidArgumentError(absl::StrCat("ctkvr lists for ", args.num_queries,
                                                       " queries; this node takes at most ",
                                                       o.centroids, " centroids"));
      }
      const int64_t end = args.token_end > 0 ? args.token_end : committed;
      const size_t n =
          static_cast<size_t>(std::min<int64_t>(args.ctkvr_list_size, end - args.token_begin));
      const size_t lists = static_cast<size_t>(spec.num_kv_heads) * args.num_queries;
      for (const BuildIndexArgs::LayerLists& l : args.ctkvr_lists) {
        if (l.tokens.size() != lists * n || l.lse.size() != lists * spec.group_size()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "ctkvr lists of a layer must be [", spec.num_kv_heads, "][", args.num_queries, "][",
              n, "] tokens and [", spec.num_kv_heads, "][", args.num_queries, "][",
              spec.group_size(), "] normalisers, got ", l.tokens.size(), " and ", l.lse.size()));
        }
      }
    }
  } else if (!args.ctkvr_lists.empty()) {
    return absl::InvalidArgumentError("ctkvr lists for a build that is not ctkvr");
  }
  // Built (or kept, when an index of this method already covers the request) by the index
  // manager, which also waits for an automatic build of this sequence that is in flight.
  absl::StatusOr<BuildIndexOutcome> outcome_or = indexes_->Build(seq, args, committed);
  if (outcome_or.ok() && outcome_or->rebuilt) {
    M().index_builds->Add();
    M().index_build_seconds->Observe(outcome_or->build_seconds);
  }
  return outcome_or;
}

absl::Status Node::ReadRows(const std::string& tenant, const std::string& sequence_id, int layer, int kv_head,
                            absl::Span<const int32_t> token_ids, std::string* keys, std::string* values) const {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, FindSequence(tenant, sequence_id));
  const ModelSpec& spec = seq->spec();
  if (layer < 0 || layer >= spec.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " outside [0, ", spec.num_layers, ")"));
  }
  if (kv_head < 0 || kv_head >= spec.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat("kv_head ", kv_head, " outside [0, ", spec.num_kv_heads, ")"));
  }
  ASSIGN_OR_RETURN(const Sequence::Snapshot snap, seq->Read(layer, kv_head));
  for (int32_t t : token_ids) {
    if (t < 0 || t >= snap.keys.num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("token ", t, " outside the ", snap.keys.num_tokens, " stored tokens"));
    }
  }
  const size_t row = spec.row_bytes();
  keys->resize(token_ids.size() * row);
  values->resize(token_ids.size() * row);
  indexer::GatherRows(snap.keys, token_ids.data(), token_ids.size(),
                      reinterpret_cast<uint8_t*>(keys->data()), row);
  indexer::GatherRows(snap.values, token_ids.data(), token_ids.size(),
                      reinterpret_cast<uint8_t*>(values->data()), row);
  return absl::OkStatus();
}

absl::Status Node::AttachWorker(const std::string& tenant, const std::string& worker_id,
                                const transport::RemoteRegion& region) {
  RETURN_IF_ERROR(ValidateId("tenant", tenant));
  RETURN_IF_ERROR(ValidateId("worker_id", worker_id));
  if (transport_ == nullptr) return absl::FailedPreconditionError("this node has no data transport");
  auto worker = std::make_shared<Worker>();
  ASSIGN_OR_RETURN(worker->writer, transport_->Connect(region));
  absl::MutexLock lock(&mu_);
  workers_[{tenant, worker_id}] = std::move(worker);
  return absl::OkStatus();
}

std::pair<int, int> Node::RevokeTenant(const std::string& tenant) {
  std::vector<std::shared_ptr<Worker>> revoked;  // destroyed outside mu_
  {
    absl::MutexLock lock(&mu_);
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (it->first.first == tenant) {
        revoked.push_back(std::move(it->second));
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
  }
  std::vector<Ingest> ingests = TakeIngests([&tenant](const Ingest& in) { return in.key.first == tenant; });
  for (Ingest& in : ingests) in.seq->AbortAppend();
  if (!revoked.empty() || !ingests.empty()) {
    KV_LOG(WARNING) << "tenant '" << tenant << "' revoked: " << revoked.size() << " workers detached, "
                    << ingests.size() << " ingests aborted";
  }
  return {static_cast<int>(revoked.size()), static_cast<int>(ingests.size())};
}

absl::Status Node::CloseSequence(const std::string& tenant, const std::string& sequence_id, bool drop) {
  std::shared_ptr<Sequence> victim;  // freed outside the lock
  std::vector<std::shared_ptr<Worker>> mirrors;  // the tenant's workers, to forget the sequence in
  absl::ReleasableMutexLock lock(&mu_);
  auto it = sequences_.find({tenant, sequence_id});
  const bool lost = lost_.count({tenant, sequence_id}) > 0;
  if (it == sequences_.end() && !lost) return NotFound(tenant, sequence_id);
  if (drop && options_.durable && store_ != nullptr) {
    // Forget the record first: a crash after this point must not resurrect the sequence.
    std::unique_ptr<BlockStore::Batch> batch = store_->NewBatch();
    batch->DeleteMeta(Sequence::MetaKey(tenant, sequence_id));
    const std::string index_prefix = IndexManager::KeyPrefix(tenant, sequence_id);
    batch->DeleteSegmentRange(index_prefix, IndexManager::RecordsEnd(index_prefix));
    RETURN_IF_ERROR(store_->Commit(batch.get()));
  }
  if (lost) {
    if (drop) lost_.erase({tenant, sequence_id});
    return absl::OkStatus();
  }
  if (drop) {
    victim = std::move(it->second);
    sequences_.erase(it);
    for (const auto& [key, worker] : workers_) {
      if (key.first == tenant) mirrors.push_back(worker);
    }
    M().sequences->Set(static_cast<double>(sequences_.size()));
    M().drops->Add();
  } else {
    it->second->set_closed(true);
  }
  lock.Release();
  // Outside the node's lock: forgetting scans every mirror entry, and Forget waits for an index
  // job of this sequence to finish.
  for (const auto& worker : mirrors) worker->mirror.ForgetSequence(tenant, sequence_id);
  if (victim != nullptr) {
    victim->ReleaseAccount();  // in-flight calls may hold the object: refund now, not at its end
    indexes_->Forget(victim.get(), nullptr);
  }
  return absl::OkStatus();
}

void Node::WaitForIndexJobs() { indexes_->WaitIdle(); }

int Node::SpillColdIndexes() { return indexes_->SpillCold(); }

std::shared_ptr<TenantAccount> Node::AccountOf(const std::string& tenant) {
  std::shared_ptr<TenantAccount>& a = accounts_[tenant];
  if (a == nullptr) a = std::make_shared<TenantAccount>(tenant, options_.tenant_limits);
  return a;
}

std::string Node::NamespaceOf(const std::string& tenant) const {
  for (const std::string& t : options_.shared_tenants) {
    if (t == tenant) return "s:shared";
  }
  return absl::StrCat("t:", tenant);
}

NodeStats Node::Stats(bool include_sequences) const {
  NodeStats s;
  s.uptime_seconds = absl::ToInt64Seconds(clock_->Now() - started_);
  s.memory_limit_bytes = arena_->capacity_bytes();
  s.index = indexes_->stats();
  s.stored_bytes = arena_->used_bytes() - s.index.reserved_bytes;
  s.arena_block_bytes = static_cast<int64_t>(arena_->slot_bytes());
  s.arena_hugepages = arena_->hugepages();
  s.arena_registered = arena_->registered();
  const BlockTableStats bt = blocks_->stats();
  s.blocks = bt.blocks;
  s.shared_blocks = bt.shared;
  s.evictions = bt.evictions;
  s.spilled_bytes = bt.spilled_bytes;
  s.spilled_blocks = bt.spilled;
  s.reloads = bt.reloads;
  s.retrieve_calls = retrieve_calls_.load();
  s.retrieve_entries = retrieve_entries_.load();
  s.bytes_streamed = bytes_streamed_.load();
  s.ingests = ingests_committed_.load();
  s.ingest_bytes = ingest_bytes_.load();
  s.draining = draining_.load();
  std::vector<std::pair<SeqKey, std::shared_ptr<Sequence>>> seqs;
  std::map<std::string, TenantStats> tenants;
  {
    absl::MutexLock lock(&mu_);
    s.num_models = static_cast<int64_t>(models_.size());
    s.num_sequences = static_cast<int64_t>(sequences_.size());
    s.num_workers = static_cast<int64_t>(workers_.size());
    s.prompt_tokens = prompt_tokens_;
    s.matched_tokens = matched_tokens_;
    seqs.assign(sequences_.begin(), sequences_.end());
    for (const auto& [tenant, c] : tenant_counters_) {
      TenantStats& t = tenants[tenant];
      t.prompt_tokens = c.prompt_tokens;
      t.matched_tokens = c.matched_tokens;
    }
    for (const auto& [tenant, a] : accounts_) {
      if (a->sequences() == 0 && a->bytes() == 0) continue;
      TenantStats& t = tenants[tenant];
      const TenantLimits limits = a->limits();
      t.quota_charged_bytes = a->bytes();
      t.quota_stored_bytes = limits.stored_bytes;
      t.quota_sequences = limits.sequences;
    }
  }
  // Per-sequence figures are read outside the node lock (each takes its sequence's lock).
  std::map<std::string, double> attributed;
  for (const auto& [key, seq] : seqs) {
    const Sequence::Usage u = seq->usage();
    TenantStats& t = tenants[key.first];
    t.sequences++;
    t.tokens += u.tokens;
    t.logical_bytes += u.bytes;
    t.shared_blocks += u.shared_blocks;
    t.unique_blocks += u.blocks - u.shared_blocks;
    attributed[key.first] += u.attributed_bytes;
    s.logical_bytes += u.bytes;
    if (include_sequences) {
      s.sequences.push_back({key.first, key.second, seq->spec().model_id, u.tokens, u.bytes,
                             seq->closed(), u.blocks, u.shared_blocks, u.adopted_tokens});
    }
  }
  for (auto& [name, t] : tenants) {
    t.tenant = name;
    t.bytes = static_cast<int64_t>(attributed[name] + 0.5);
    s.tenants.push_back(t);
  }
  M().stored_bytes->Set(static_cast<double>(s.stored_bytes));
  M().logical_bytes->Set(static_cast<double>(s.logical_bytes));
  M().blocks->Set(static_cast<double>(s.blocks));
  M().shared_blocks->Set(static_cast<double>(s.shared_blocks));
  M().spilled_bytes->Set(static_cast<double>(s.spilled_bytes));
  M().spilled_blocks->Set(static_cast<double>(s.spilled_blocks));
  M().reloads->Set(static_cast<double>(s.reloads));
  M().index_bytes->Set(static_cast<double>(s.index.bytes));
  M().index_reserved_bytes->Set(static_cast<double>(s.index.reserved_bytes));
  M().index_on_disk->Set(static_cast<double>(s.index.on_disk));
  M().index_pending->Set(static_cast<double>(s.index.placeholders));
  M().index_auto_builds->Set(static_cast<double>(s.index.auto_builds));
  M().index_growths->Set(static_cast<double>(s.index.growths));
  M().index_spills->Set(static_cast<double>(s.index.spills));
  M().index_reloads->Set(static_cast<double>(s.index.reloads));
  M().index_corrupt->Set(static_cast<double>(s.index.corrupt));
  M().index_refused->Set(static_cast<double>(s.index.refused));
  const int64_t before = evictions_reported_.exchange(s.evictions);
  if (s.evictions > before) M().evictions->Add(static_cast<double>(s.evictions - before));
  return s;
}

std::string Node::RenderTenantMetrics() const {
  const NodeStats s = Stats(false);
  auto label = [](const std::string& v) {
    std::string out;
    for (char c : v) {
      if (c == '\\' || c == '"') out += '\\';
      if (c == '\n') {
        out += "\\n";
        continue;
      }
      out += c;
    }
    return out;
  };
  struct Family {
    const char* name;
    const char* help;
    int64_t TenantStats::*field;
  };
  const Family families[] = {
      {"kvrecall_tenant_sequences", "Sequences held per tenant", &TenantStats::sequences},
      {"kvrecall_tenant_tokens", "Committed tokens per tenant", &TenantStats::tokens},
      {"kvrecall_tenant_bytes", "Arena bytes per tenant (shared blocks split between their users)",
       &TenantStats::bytes},
      {"kvrecall_tenant_logical_bytes", "Bytes the tenant's sequences reference",
       &TenantStats::logical_bytes},
      {"kvrecall_tenant_unique_blocks", "Block references held by one sequence only",
       &TenantStats::unique_blocks},
      {"kvrecall_tenant_shared_blocks", "Block references to shared blocks",
       &TenantStats::shared_blocks},
      {"kvrecall_tenant_prompt_tokens", "Prompt tokens of newly opened sequences",
       &TenantStats::prompt_tokens},
      {"kvrecall_tenant_matched_tokens", "Prompt tokens served from shared blocks",
       &TenantStats::matched_tokens},
  };
  std::string out;
  for (const Family& f : families) {
    absl::StrAppend(&out, "# HELP ", f.name, " ", f.help, "\n# TYPE ", f.name, " gauge\n");
    for (const TenantStats& t : s.tenants) {
      absl::StrAppend(&out, f.name, "{tenant=\"", label(t.tenant), "\"} ", t.*(f.field), "\n");
    }
  }
  return out;
}

int64_t CtkvrIndexReserveBytes(const indexer::CtkvrOptions& options, int64_t segments, int group,
                               int head_dim, DType kv_dtype) {
  return segments * indexer::CtkvrSegmentMaxBytes(options, group, head_dim, kv_dtype) +
         (int64_t{1} << 20);
}

absl::Status ValidateSelection(int budget, int successors) {
  if (budget <= 0 || budget > kMaxBudget) {
    return absl::InvalidArgumentError(absl::StrCat("budget ", budget, " not in [1, ", kMaxBudget, "]"));
  }
  if (successors < 0 || successors > budget) {
    return absl::InvalidArgumentError(absl::StrCat("successors ", successors, " not in [0, budget ", budget, "]"));
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::kvstore
