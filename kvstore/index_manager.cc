#include "kvstore/index_manager.h"

#include <algorithm>
#include <array>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kvstore/internal/records.h"
#include "kvstore/node.h"

namespace kvrecall::kvstore {
namespace {

constexpr uint32_t kHeaderIndex = 0xffffffffu;
// SipHash key of the query digests in shared-index keys.
constexpr std::array<uint8_t, 16> kQueryDigestKey = {'k', 'v', 'r', 'e', 'c', 'a', 'l', 'l',
                                                     '-', 'i', 'd', 'x', '-', 'q', '1', 0};

void AppendLe32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>(v >> (8 * i)));
}
void AppendBe32(std::string* s, uint32_t v) {
  for (int i = 3; i >= 0; --i) s->push_back(static_cast<char>(v >> (8 * i)));
}

int64_t SlotsFor(int64_t bytes, size_t slot_bytes) {
  if (bytes <= 0 || slot_bytes == 0) return 0;
  return (bytes + static_cast<int64_t>(slot_bytes) - 1) / static_cast<int64_t>(slot_bytes);
}

// The bytes a sequence's own reservation covers: its index less what a shared charge holds.
int64_t ResidentBytes(const SequenceIndex* index) {
  if (index == nullptr || index->on_disk || !index->complete) return 0;
  return static_cast<int64_t>(index->MemoryBytes()) - index->shared_bytes;
}

void AppendBytes(std::string* s, const void* p, size_t n) {
  s->append(static_cast<const char*>(p), n);
}
template <typename T>
void AppendPod(std::string* s, T v) {
  AppendBytes(s, &v, sizeof(v));
}

}  // namespace

// Shared indices by key, and the arena slots each one's charge holds. A charge is released
// wherever the last index holding it is dropped, under whatever locks that caller holds, so its
// lock comes after Sequence::mu_ and IndexManager::mu_; under it Register takes the block
// table's (reserving) and the new index's segment locks (MemoryBytes), Release the block table's.
class IndexManager::SharedRegistry : public std::enable_shared_from_this<SharedRegistry> {
 public:
  explicit SharedRegistry(BlockTable* table) : table_(table) {}

  // The live index registered under `key`, or null.
  std::shared_ptr<const SequenceIndex> Find(const std::string& key) {
    absl::MutexLock lock(&mu_);
    auto it = by_key_.find(key);
    return it == by_key_.end() ? nullptr : it->second.index.lock();
  }

  // Charges `index` (whose every segment becomes shared) to slots of its own and registers it
  // under `key`, unless a live index is registered there already: then that one is returned and
  // `index` is left as it was. RESOURCE_EXHAUSTED when the slots cannot be had.
  absl::StatusOr<std::shared_ptr<const SequenceIndex>> Register(
      const std::string& key, std::shared_ptr<SequenceIndex> index) {
    absl::MutexLock lock(&mu_);
    if (auto it = by_key_.find(key); it != by_key_.end()) {
      if (auto live = it->second.index.lock()) return live;
    }
    const int64_t bytes = static_cast<int64_t>(index->MemoryBytes());
    std::vector<uint8_t*> slots;
    const size_t slot = table_->arena()->slot_bytes();
    RETURN_IF_ERROR(table_->ReserveSlots(
        static_cast<int>((bytes + static_cast<int64_t>(slot) - 1) / static_cast<int64_t>(slot)),
        &slots));
    const uint64_t id = ++next_id_;
    reserved_slots_ += static_cast<int64_t>(slots.size());
    bytes_ += bytes;
    slots_[id] = {std::move(slots), bytes};
    index->shared_bytes = bytes;
    index->shared = std::make_shared<Charge>(shared_from_this(), key, id);
    by_key_[key] = {id, index};
    return std::shared_ptr<const SequenceIndex>(std::move(index));
  }

  // Releases every charge now (the manager is going away with its block table's users); charges
  // released later do nothing.
  void Close() {
    absl::MutexLock lock(&mu_);
    for (auto& [id, charged] : slots_) table_->ReleaseSlots(charged.slots);
    slots_.clear();
    by_key_.clear();
    reserved_slots_ = 0;
    bytes_ = 0;
    closed_ = true;
  }

  // Live shared indices, their bytes and the slots their charges hold.
  struct Usage {
    int64_t indices = 0;
    int64_t bytes = 0;
    int64_t slots = 0;
  };
  Usage usage() {
    absl::MutexLock lock(&mu_);
    return {static_cast<int64_t>(slots_.size()), bytes_, reserved_slots_};
  }

 private:
  // Held by SequenceIndex::shared of every index sharing the segments.
  struct Charge {
    Charge(std::shared_ptr<SharedRegistry> r, std::string k, uint64_t i)
        : registry(std::move(r)), key(std::move(k)), id(i) {}
    ~Charge() { registry->Release(key, id); }
    const std::shared_ptr<SharedRegistry> registry;
    const std::string key;
    const uint64_t id;
  };
  struct Registered {
    uint64_t id = 0;
    std::weak_ptr<const SequenceIndex> index;
  };
  struct Charged {
    std::vector<uint8_t*> slots;
    int64_t bytes = 0;
  };

  void Release(const std::string& key, uint64_t id) {
    absl::MutexLock lock(&mu_);
    if (closed_) return;
    if (auto it = slots_.find(id); it != slots_.end()) {
      table_->ReleaseSlots(it->second.slots);
      reserved_slots_ -= static_cast<int64_t>(it->second.slots.size());
      bytes_ -= it->second.bytes;
      slots_.erase(it);
    }
    // A later registration under the same key may have replaced this one meanwhile.
    if (auto it = by_key_.find(key); it != by_key_.end() && it->second.id == id) by_key_.erase(it);
  }

  BlockTable* const table_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Registered> by_key_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Charged> slots_ ABSL_GUARDED_BY(mu_);
  int64_t reserved_slots_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

std::string IndexManager::KeyPrefix(absl::string_view tenant, absl::string_view id) {
  std::string k = "x";
  AppendLe32(&k, static_cast<uint32_t>(tenant.size()));
  k.append(tenant.data(), tenant.size());
  AppendLe32(&k, static_cast<uint32_t>(id.size()));
  k.append(id.data(), id.size());
  return k;
}
std::string IndexManager::HeaderKey(absl::string_view tenant, absl::string_view id) {
  return SegmentKey(tenant, id, kHeaderIndex);
}
std::string IndexManager::SegmentKey(absl::string_view tenant, absl::string_view id, uint32_t j) {
  std::string k = KeyPrefix(tenant, id);
  AppendBe32(&k, j);
  return k;
}
std::string IndexManager::RecordsEnd(absl::string_view prefix) {
  return absl::StrCat(prefix, std::string(5, '\xff'));
}

IndexManager::IndexManager(const IndexManagerOptions& options, BlockTable* table, BlockStore* store,
                           ThreadPool* pool, Clock* clock)
    : options_(options),
      table_(table),
      store_(store),
      pool_(pool),
      clock_(clock),
      persist_(options.durable && store != nullptr),
      shared_(std::make_shared<SharedRegistry>(table)),
      hooks_([this] {
        auto hooks = std::make_shared<Sequence::IndexHooks>();
        hooks->load = [this](const Sequence* s, std::shared_ptr<const SequenceIndex> stub) {
          return Load(s, std::move(stub));
        };
        hooks->on_commit = [this](const Sequence* s, int64_t committed) {
          OnCommit(s, committed);
        };
        return hooks;
      }()) {}

IndexManager::~IndexManager() {
  WaitIdle();
  absl::MutexLock lock(&mu_);
  for (auto& [seq, e] : entries_) table_->ReleaseSlots(e.slots);
  entries_.clear();
  shared_->Close();
}

void IndexManager::Track(const std::shared_ptr<Sequence>& seq, bool recovered) {
  {
    absl::MutexLock lock(&mu_);
    entries_[seq.get()].seq = seq;
  }
  seq->set_index_hooks(hooks_);
  if (recovered && store_ != nullptr) {
    auto stub = std::make_shared<SequenceIndex>();
    stub->on_disk = true;
    seq->ReplaceIndex(nullptr, std::move(stub));
  }
}

void IndexManager::Forget(const Sequence* seq, BlockStore::Batch* batch) {
  {
    absl::MutexLock lock(&mu_);
    AwaitIdleLocked(seq);
    auto it = entries_.find(seq);
    if (it != entries_.end()) {
      table_->ReleaseSlots(it->second.slots);
      reserved_slots_ -= static_cast<int64_t>(it->second.slots.size());
      entries_.erase(it);
    }
  }
  if (store_ == nullptr) return;
  const std::string prefix = KeyPrefix(seq->tenant(), seq->id());
  const std::string end = RecordsEnd(prefix);
  if (batch != nullptr) {
    batch->DeleteSegmentRange(prefix, end);
    return;
  }
  std::unique_ptr<BlockStore::Batch> own = store_->NewBatch();
  own->DeleteSegmentRange(prefix, end);
  if (absl::Status s = store_->Commit(own.get()); !s.ok()) {
    KV_LOG(WARNING) << "deleting the index records of '" << seq->id() << "': " << s;
  }
}

void IndexManager::AwaitIdleLocked(const Sequence* seq) {
  auto idle = [this, seq]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = entries_.find(seq);
    return it == entries_.end() || !it->second.busy;
  };
  mu_.Await(absl::Condition(&idle));
}

bool IndexManager::AutoEligible(int num_layers, int64_t committed) const {
  const indexer::Method am = options_.auto_method;
  return (am == indexer::Method::kCluster || am == indexer::Method::kCtkvr) &&
         options_.first_layer < num_layers && committed - options_.token_begin >= options_.min_tokens;
}

void IndexManager::WaitIdle() {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return pending_ == 0; };
  mu_.Await(absl::Condition(&idle));
}

IndexStats IndexManager::stats() const {
  std::vector<std::shared_ptr<Sequence>> seqs;
  IndexStats s;
  {
    absl::MutexLock lock(&mu_);
    s = counters_;
    s.pending_jobs = pending_;
    s.reserved_bytes = reserved_slots_ * static_cast<int64_t>(table_->arena()->slot_bytes());
    for (const auto& [p, e] : entries_) {
      if (auto seq = e.seq.lock()) seqs.push_back(std::move(seq));
    }
  }
  for (const auto& seq : seqs) {
    std::shared_ptr<const SequenceIndex> idx = seq->held_index();
    if (idx == nullptr) continue;
    if (idx->on_disk) {
      ++s.on_disk;
    } else if (!idx->complete) {
      ++s.placeholders;
    } else {
      ++s.indices;
      s.bytes += ResidentBytes(idx.get());
    }
  }
  const SharedRegistry::Usage shared = shared_->usage();
  s.shared = shared.indices;
  s.bytes += shared.bytes;
  s.reserved_bytes += shared.slots * static_cast<int64_t>(table_->arena()->slot_bytes());
  return s;
}

absl::Status IndexManager::InstallLocked(const Sequence* seq, Entry* e,
                                         const SequenceIndex* expected,
                                         std::shared_ptr<const SequenceIndex> next) {
  std::shared_ptr<const SequenceIndex> cur = seq->held_index();
  if (cur.get() != expected) return absl::AbortedError("the index changed meanwhile");
  const int64_t want = SlotsFor(ResidentBytes(next.get()), table_->arena()->slot_bytes());
  const int64_t have = static_cast<int64_t>(e->slots.size());
  if (want > have) {
    absl::Status s = table_->ReserveSlots(static_cast<int>(want - have), &e->slots);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("index of sequence '", seq->id(), "' (",
                                                 ResidentBytes(next.get()),
                                                 " bytes) does not fit: ", s.message()));
    }
  } else if (want < have) {
    table_->ReleaseSlots(absl::MakeConstSpan(e->slots).subspan(static_cast<size_t>(want)));
    e->slots.resize(static_cast<size_t>(want));
  }
  reserved_slots_ += want - have;
  // Only this class replaces indices, always under mu_: the swap cannot fail after the check.
  const_cast<Sequence*>(seq)->ReplaceIndex(expected, std::move(next));
  return absl::OkStatus();
}

void IndexManager::ScheduleLocked(const std::shared_ptr<Sequence>& seq, Entry* e,
                                  void (IndexManager::*job)(const std::shared_ptr<Sequence>&)) {
  e->busy = true;
  ++pending_;
  // The task owns the sequence through `holder` and lets go of it before Finish: a waiter may
  // expect the sequence's memory to be released once no job runs (the pool may keep the task
  // object alive a little longer).
  auto holder = std::make_shared<std::shared_ptr<Sequence>>(seq);
  pool_->Schedule([this, holder, job] {
    std::shared_ptr<Sequence> s = std::move(*holder);
    (this->*job)(s);
    const Sequence* raw = s.get();
    s.reset();
    Finish(raw);
  });
}

void IndexManager::Finish(const Sequence* seq) {
  absl::MutexLock lock(&mu_);
  if (auto it = entries_.find(seq); it != entries_.end()) it->second.busy = false;
  --pending_;
}

std::shared_ptr<const SequenceIndex> IndexManager::Placeholder(const Sequence& seq,
                                                               indexer::Method method,
                                                               int first_layer,
                                                               int64_t token_begin) const {
  const ModelSpec& spec = seq.spec();
  auto p = std::make_shared<SequenceIndex>();
  p->method = method;
  p->first_layer = std::clamp(first_layer, 0, spec.num_layers);
  p->num_kv_heads = spec.num_kv_heads;
  p->token_begin = token_begin;
  p->token_end = token_begin;
  p->complete = false;
  std::shared_ptr<const indexer::Segment> none =
      indexer::NewUnindexedSegment(spec.head_dim, spec.kv_dtype);
  p->segments.assign(static_cast<size_t>(spec.num_layers - p->first_layer) * spec.num_kv_heads,
                     none);
  return p;
}

void IndexManager::OnCommit(const Sequence* raw, int64_t committed) {
  // Read before taking mu_: BlockTable's lock is not nested in ours on every commit.
  const int64_t evictions = store_ != nullptr ? table_->stats().evictions : 0;
  absl::MutexLock lock(&mu_);
  if (store_ != nullptr && !sweep_queued_) {
    if (evictions != swept_evictions_) {
      swept_evictions_ = evictions;
      sweep_queued_ = true;
      ++pending_;
      pool_->Schedule([this] {
        SpillCold();
        absl::MutexLock l(&mu_);
        sweep_queued_ = false;
        --pending_;
      });
    }
  }
  auto it = entries_.find(raw);
  if (it == entries_.end() || it->second.busy) return;
  Entry& e = it->second;
  std::shared_ptr<Sequence> seq = e.seq.lock();
  if (seq == nullptr) return;
  std::shared_ptr<const SequenceIndex> cur = seq->held_index();
  const indexer::Method am = options_.auto_method;
  if (cur == nullptr) {
    if (!AutoEligible(seq->spec().num_layers, committed)) return;
    std::shared_ptr<const SequenceIndex> p =
        Placeholder(*seq, am, options_.first_layer, options_.token_begin);
    if (!InstallLocked(raw, &e, nullptr, p).ok()) return;
    if (am == indexer::Method::kCluster) ScheduleLocked(seq, &e, &IndexManager::AutoBuildJob);
    return;
  }
  if (cur->on_disk) return;
  if (!cur->complete) {
    if (cur->method == indexer::Method::kCluster && !e.auto_failed) {
      ScheduleLocked(seq, &e, &IndexManager::AutoBuildJob);
    }
    return;
  }
  if (committed - cur->token_end >= options_.index.cluster.append_every) {
    ScheduleLocked(seq, &e, &IndexManager::GrowJob);
  }
}

absl::StatusOr<std::shared_ptr<SequenceIndex>> IndexManager::BuildSegments(
    const Sequence& seq, indexer::Method method, int first_layer, int64_t token_begin,
    int64_t token_end, const BuildIndexArgs* ctkvr) const {
  const ModelSpec& spec = seq.spec();
  const int G = spec.group_size(), d = spec.head_dim, Hq = spec.num_q_heads,
            Hkv = spec.num_kv_heads;
  const int64_t t0 = clock_->MonotonicNanos();
  auto index = std::make_shared<SequenceIndex>();
  index->method = method;
  index->first_layer = first_layer;
  index->num_kv_heads = Hkv;
  index->token_begin = token_begin;
  index->token_end = token_end;
  index->segments.resize(static_cast<size_t>(spec.num_layers - first_layer) * Hkv);
  std::vector<absl::Status> status(index->segments.size());
  pool_->ParallelFor(static_cast<int64_t>(index->segments.size()), [&](int64_t j) {
    const int layer = first_layer + static_cast<int>(j / Hkv), h = static_cast<int>(j % Hkv);
    absl::StatusOr<Sequence::Snapshot> read = seq.Read(layer, h);
    if (!read.ok()) {
      status[j] = read.status();
      return;
    }
    const Sequence::Snapshot& snap = *read;
    indexer::BuildInput in;
    in.keys = &snap.keys;
    in.token_begin = token_begin;
    in.token_end = token_end;
    in.group = G;
    std::vector<float> grouped;  // [C][group][d] of this kv-head, from [C][Hq][d]
    indexer::CtkvrLists lists;
    if (method == indexer::Method::kCtkvr) {
      const int num_queries = ctkvr->num_queries;
      const float* src = ctkvr->layer_queries[layer - first_layer].data();
      grouped.resize(static_cast<size_t>(num_queries) * G * d);
      for (int c = 0; c < num_queries; ++c) {
        std::copy_n(src + (static_cast<size_t>(c) * Hq + static_cast<size_t>(h) * G) * d,
                    static_cast<size_t>(G) * d, grouped.begin() + static_cast<size_t>(c) * G * d);
      }
      in.prompt_queries = grouped.data();
      in.num_prompt_queries = num_queries;
      if (!ctkvr->ctkvr_lists.empty()) {  // [Hkv][C][n] and [Hkv][C][G], sizes checked by Node
        const BuildIndexArgs::LayerLists& l = ctkvr->ctkvr_lists[layer - first_layer];
        const size_t lists_per_head = static_cast<size_t>(num_queries);
        lists.list_size = ctkvr->ctkvr_list_size;
        lists.tokens = l.tokens.data() + h * (l.tokens.size() / Hkv);
        lists.lse = l.lse.data() + h * lists_per_head * G;
        in.ctkvr_lists = &lists;
      }
    }
    auto seg = indexer::BuildSegment(method, in, options_.index, nullptr);
    if (seg.ok()) {
      index->segments[j] = std::move(*seg);
    } else {
      status[j] = seg.status();
    }
  });
  for (const absl::Status& st : status) RETURN_IF_ERROR(st);
  index->build_seconds = static_cast<double>(clock_->MonotonicNanos() - t0) * 1e-9;
  return index;
}

absl::StatusOr<BuildIndexOutcome> IndexManager::Build(const std::shared_ptr<Sequence>& seq,
                                                      const BuildIndexArgs& args,
                                                      int64_t committed) {
  {
    // Let an automatic build or growth of this sequence finish: it may be what is asked for.
    absl::MutexLock lock(&mu_);
    AwaitIdleLocked(seq.get());
  }
  const int64_t end = args.token_end > 0 ? args.token_end : committed;
  BuildIndexOutcome outcome;
  outcome.indexed_tokens = end - args.token_begin;
  if (std::shared_ptr<const SequenceIndex> cur = seq->index();
      cur != nullptr && cur->complete && cur->method == args.method &&
      cur->first_layer <= args.first_layer && cur->token_begin <= args.token_begin &&
      cur->token_end >= end) {
    outcome.segments = static_cast<int>(cur->segments.size());
    outcome.build_seconds = cur->build_seconds;
    outcome.index_bytes = static_cast<int64_t>(cur->MemoryBytes());
    outcome.shared = cur->shared != nullptr;
    return outcome;
  }
  const std::string key = ShareKey(*seq, args, end);
  std::shared_ptr<const SequenceIndex> index = key.empty() ? nullptr : shared_->Find(key);
  const bool reused = index != nullptr;
  if (!reused) {
    ASSIGN_OR_RETURN(
        std::shared_ptr<SequenceIndex> built,
        BuildSegments(*seq, args.method, args.first_layer, args.token_begin, end, &args));
    built->explicit_build = true;
    if (key.empty()) {
      index = std::move(built);
    } else {
      // Another sequence over the document may have registered the same build meanwhile.
      ASSIGN_OR_RETURN(index, shared_->Register(key, std::move(built)));
    }
  }
  if (persist_) RETURN_IF_ERROR(Persist(*seq, *index));
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(seq.get());
    if (it == entries_.end()) return absl::NotFoundError("the sequence was dropped meanwhile");
    std::shared_ptr<const SequenceIndex> cur = seq->held_index();
    RETURN_IF_ERROR(InstallLocked(seq.get(), &it->second, cur.get(), index));
    it->second.auto_failed = false;
    it->second.persisted = persist_ ? index.get() : nullptr;
    ++(reused ? counters_.shared_installs : counters_.builds);
  }
  outcome.segments = static_cast<int>(index->segments.size());
  outcome.build_seconds = reused ? 0 : index->build_seconds;
  outcome.index_bytes = static_cast<int64_t>(index->MemoryBytes());
  outcome.rebuilt = !reused;
  outcome.shared = index->shared != nullptr;
  return outcome;
}

std::string IndexManager::ShareKey(const Sequence& seq, const BuildIndexArgs& args,
                                   int64_t token_end) const {
  const std::optional<ContentKey> prefix = seq.PrefixKey(token_end);
  if (!prefix.has_value()) return "";
  std::string key;
  for (const std::string* s : {&seq.share_namespace(), &seq.spec().model_id}) {
    AppendLe32(&key, static_cast<uint32_t>(s->size()));
    key.append(*s);
  }
  AppendPod(&key, prefix->lo);
  AppendPod(&key, prefix->hi);
  AppendPod(&key, static_cast<uint8_t>(args.method));
  AppendPod(&key, args.first_layer);
  AppendPod(&key, args.token_begin);
  AppendPod(&key, token_end);
  if (args.method == indexer::Method::kCtkvr) {
    // Queries of the same document positions are the same whichever session computed them; a
    // 128-bit digest of each layer's queries stands for them (content_hash.h's SipHash).
    AppendPod(&key, args.num_queries);
    for (const auto& q : args.layer_queries) {
      const std::array<uint8_t, 16> digest =
          SipHash24_128(kQueryDigestKey, q.data(), q.size() * sizeof(float));
      AppendBytes(&key, digest.data(), digest.size());
    }
    // Lists the worker made stand for themselves by their length: the same queries over the
    // same document give the same lists.
    AppendPod(&key, args.ctkvr_lists.empty() ? 0 : args.ctkvr_list_size);
  }
  return key;
}

void IndexManager::AutoBuildJob(const std::shared_ptr<Sequence>& seq) {
  std::shared_ptr<const SequenceIndex> placeholder = seq->held_index();
  if (placeholder == nullptr || placeholder->complete || placeholder->on_disk ||
      placeholder->method != indexer::Method::kCluster) {
    return;
  }
  const int64_t committed = seq->committed_tokens();
  absl::StatusOr<std::shared_ptr<SequenceIndex>> built =
      BuildSegments(*seq, placeholder->method, placeholder->first_layer, placeholder->token_begin,
                    committed, nullptr);
  absl::Status s = built.status();
  if (s.ok() && persist_) s = Persist(*seq, **built);
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(seq.get());
  if (it == entries_.end()) return;
  if (s.ok()) s = InstallLocked(seq.get(), &it->second, placeholder.get(), *built);
  if (s.ok()) {
    it->second.persisted = persist_ ? built->get() : nullptr;
    ++counters_.builds;
    ++counters_.auto_builds;
    return;
  }
  if (absl::IsAborted(s)) return;  // replaced meanwhile (an explicit build, a drop)
  it->second.auto_failed = true;
  if (absl::IsResourceExhausted(s)) ++counters_.refused;
  KV_LOG(WARNING) << "automatic index build of sequence '" << seq->id()
                  << "' failed (searches stay exact): " << s;
}

void IndexManager::GrowJob(const std::shared_ptr<Sequence>& seq) {
  std::shared_ptr<const SequenceIndex> cur = seq->held_index();
  if (cur == nullptr || cur->on_disk || !cur->complete) return;
  const int64_t w = options_.index.cluster.append_every;
  const int64_t committed = seq->committed_tokens();
  const int64_t new_end = cur->token_end + (committed - cur->token_end) / w * w;
  if (new_end <= cur->token_end) return;
  const ModelSpec& spec = seq->spec();
  auto next = std::make_shared<SequenceIndex>(*cur);
  next->token_end = new_end;
  std::vector<absl::Status> status(next->segments.size());
  indexer::IndexOptions suffix = options_.index;
  suffix.cluster.tokens_per_cluster =
      std::max(1, suffix.cluster.append_every / std::max(1, suffix.cluster.append_clusters));
  suffix.cluster.segment_tokens = 0;
  pool_->ParallelFor(static_cast<int64_t>(next->segments.size()), [&](int64_t j) {
    const int layer = cur->first_layer + static_cast<int>(j / spec.num_kv_heads),
              h = static_cast<int>(j % spec.num_kv_heads);
    absl::StatusOr<Sequence::Snapshot> read = seq->Read(layer, h);
    if (!read.ok()) {
      status[j] = read.status();
      return;
    }
    std::vector<std::shared_ptr<const indexer::Segment>> parts =
        indexer::SegmentParts(cur->segments[j]);
    const indexer::Segment& last = *parts.back();
    // A shared index's segments are never copied to grow: the sequence's tokens go into a part
    // of its own after them (ctkvr's keeps the shared centroids).
    const bool new_part = (cur->method == indexer::Method::kCluster &&
                           (parts.size() == 1 || last.token_end() - last.token_begin() >=
                                                     options_.suffix_part_tokens)) ||
                          (cur->shared != nullptr && parts.size() == 1);
    if (new_part) {
      indexer::BuildInput in;
      in.keys = &read->keys;
      in.token_begin = cur->token_end;
      in.token_end = new_end;
      in.group = spec.group_size();
      absl::StatusOr<std::unique_ptr<indexer::Segment>> part =
          indexer::BuildSegmentAfter(parts.back(), in, suffix, nullptr);
      if (!part.ok()) {
        status[j] = part.status();
        return;
      }
      parts.push_back(std::move(*part));
    } else {
      std::unique_ptr<indexer::Segment> grown = last.Clone();
      if (absl::Status s = grown->Append(read->keys, new_end, nullptr); !s.ok()) {
        status[j] = s;
        return;
      }
      parts.back() = std::move(grown);
    }
    if (parts.size() == 1) {
      next->segments[j] = std::move(parts[0]);
      return;
    }
    absl::StatusOr<std::unique_ptr<indexer::Segment>> chain =
        indexer::NewSegmentChain(std::move(parts));
    if (chain.ok()) {
      next->segments[j] = std::move(*chain);
    } else {
      status[j] = chain.status();
    }
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) {
      KV_LOG(WARNING) << "growing the index of sequence '" << seq->id() << "': " << s;
      return;
    }
  }
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(seq.get());
  if (it == entries_.end()) return;
  absl::Status s = InstallLocked(seq.get(), &it->second, cur.get(), next);
  if (s.ok()) {
    ++counters_.growths;
  } else if (absl::IsResourceExhausted(s)) {
    ++counters_.refused;
  }
}

int IndexManager::SpillCold() {
  if (store_ == nullptr) return 0;
  std::vector<std::shared_ptr<Sequence>> seqs;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [p, e] : entries_) {
      if (e.busy) continue;
      if (auto seq = e.seq.lock()) seqs.push_back(std::move(seq));
    }
  }
  int spilled = 0;
  for (const auto& seq : seqs) {
    std::shared_ptr<const SequenceIndex> cur = seq->held_index();
    if (cur == nullptr || cur->on_disk || !cur->complete) continue;
    if (seq->resident_blocks() > 0 || seq->committed_tokens() == 0) continue;
    bool stored = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = entries_.find(seq.get());
      // Busy: a job or a reload of it started meanwhile; it is spilled by a later sweep.
      if (it == entries_.end() || it->second.busy) continue;
      stored = it->second.persisted == cur.get();
      // Forget waits for the records written below before deleting them.
      it->second.busy = true;
    }
    const absl::Status persisted = stored ? absl::OkStatus() : Persist(*seq, *cur);
    if (!persisted.ok()) {
      KV_LOG(WARNING) << "spilling the index of sequence '" << seq->id() << "': " << persisted;
    }
    auto stub = std::make_shared<SequenceIndex>();
    stub->method = cur->method;
    stub->on_disk = true;
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(seq.get());
    if (it == entries_.end()) continue;
    it->second.busy = false;
    if (!persisted.ok()) continue;
    if (InstallLocked(seq.get(), &it->second, cur.get(), stub).ok()) {
      it->second.persisted = nullptr;
      ++counters_.spills;
      ++spilled;
    }
  }
  return spilled;
}

absl::Status IndexManager::Persist(const Sequence& seq, const SequenceIndex& index) {
  std::unique_ptr<BlockStore::Batch> batch = store_->NewBatch();
  const std::string prefix = KeyPrefix(seq.tenant(), seq.id());
  batch->DeleteSegmentRange(prefix, RecordsEnd(prefix));
  internal::RecordWriter h;
  h.U32(1);  // version
  h.U32(static_cast<uint32_t>(index.method));
  h.I32(index.first_layer);
  h.I32(index.num_kv_heads);
  h.I64(index.token_begin);
  h.I64(index.token_end);
  h.F64(index.build_seconds);
  h.U32(index.explicit_build ? 1 : 0);
  h.U64(index.segments.size());
  batch->PutSegment(HeaderKey(seq.tenant(), seq.id()), h.Finish());
  for (size_t j = 0; j < index.segments.size(); ++j) {
    internal::RecordWriter w;
    w.U32(1);
    w.Str(indexer::SerializeSegment(*index.segments[j]));
    batch->PutSegment(SegmentKey(seq.tenant(), seq.id(), static_cast<uint32_t>(j)), w.Finish());
  }
  return store_->Commit(batch.get());
}

absl::StatusOr<std::shared_ptr<SequenceIndex>> IndexManager::LoadRecords(
    const Sequence& seq) const {
  std::string value;
  RETURN_IF_ERROR(store_->GetSegment(HeaderKey(seq.tenant(), seq.id()), &value));
  const ModelSpec& spec = seq.spec();
  auto index = std::make_shared<SequenceIndex>();
  internal::RecordReader h(value);
  const uint32_t version = h.U32();
  const uint32_t method = h.U32();
  index->first_layer = h.I32();
  index->num_kv_heads = h.I32();
  index->token_begin = h.I64();
  index->token_end = h.I64();
  index->build_seconds = h.F64();
  index->explicit_build = h.U32() == 1;
  const uint64_t n = h.U64();
  RETURN_IF_ERROR(h.status());
  const int64_t committed = seq.committed_tokens();
  if (version != 1 ||
      (method != static_cast<uint32_t>(indexer::Method::kCtkvr) &&
       method != static_cast<uint32_t>(indexer::Method::kCluster)) ||
      index->first_layer < 0 || index->first_layer >= spec.num_layers ||
      index->num_kv_heads != spec.num_kv_heads || index->token_begin < 0 ||
      index->token_end <= index->token_begin || index->token_end > committed ||
      n != static_cast<uint64_t>(spec.num_layers - index->first_layer) * spec.num_kv_heads) {
    return absl::DataLossError("index header record does not match the sequence");
  }
  index->method = static_cast<indexer::Method>(method);
  index->segments.resize(n);
  for (uint64_t j = 0; j < n; ++j) {
    RETURN_IF_ERROR(
        store_->GetSegment(SegmentKey(seq.tenant(), seq.id(), static_cast<uint32_t>(j)), &value));
    internal::RecordReader r(value);
    const uint32_t v = r.U32();
    const std::string bytes = r.Str();
    RETURN_IF_ERROR(r.status());
    if (v != 1) return absl::DataLossError("unknown index segment record version");
    ASSIGN_OR_RETURN(std::unique_ptr<indexer::Segment> seg, indexer::ParseSegment(bytes));
    if (seg->method() != index->method || seg->token_begin() != index->token_begin ||
        seg->token_end() != index->token_end || seg->head_dim() != spec.head_dim ||
        seg->dtype() != spec.kv_dtype) {
      return absl::DataLossError("index segment record does not match its header");
    }
    index->segments[j] = std::move(seg);
  }
  return index;
}

std::shared_ptr<const SequenceIndex> IndexManager::Load(
    const Sequence* raw, std::shared_ptr<const SequenceIndex> stub) {
  std::shared_ptr<Sequence> seq;
  {
    // Single flight: concurrent first uses of the stub wait for one load and share its result.
    // (While the stub is held only a load can be busy; once it is replaced, return at once
    // rather than waiting for a job the replacement scheduled.)
    absl::MutexLock lock(&mu_);
    auto idle = [this, raw, &stub]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      auto it = entries_.find(raw);
      return it == entries_.end() || !it->second.busy || raw->held_index() != stub;
    };
    mu_.Await(absl::Condition(&idle));
    auto it = entries_.find(raw);
    if (it == entries_.end()) return nullptr;
    seq = it->second.seq.lock();
    if (seq == nullptr || store_ == nullptr) return nullptr;
    if (std::shared_ptr<const SequenceIndex> cur = seq->held_index(); cur != stub) return cur;
    it->second.busy = true;
  }
  absl::StatusOr<std::shared_ptr<SequenceIndex>> loaded = LoadRecords(*seq);
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(raw);
  if (it == entries_.end()) return nullptr;
  Entry& e = it->second;
  e.busy = false;
  if (loaded.ok()) {
    const SequenceIndex* installed = loaded->get();
    absl::Status s = InstallLocked(raw, &e, stub.get(), *loaded);
    if (s.ok()) {
      e.persisted = installed;
      ++counters_.reloads;
      return *loaded;
    }
    if (absl::IsAborted(s)) return seq->held_index();  // loaded by someone else meanwhile
    ++counters_.refused;
    KV_LOG(WARNING) << "reloading the index of sequence '" << seq->id() << "': " << s;
    // Correct answers without the index until memory allows the reload.
    return Placeholder(*seq, (*loaded)->method, (*loaded)->first_layer, (*loaded)->token_begin);
  }
  // Missing (never persisted, e.g. a restart before the first build finished) or corrupt: the
  // index is derived data and the KV is intact, so drop it and build it again.
  if (!absl::IsNotFound(loaded.status())) {
    ++counters_.corrupt;
    KV_LOG(ERROR) << "index records of sequence '" << seq->id() << "' of tenant '"
                  << seq->tenant() << "' are unusable (" << loaded.status()
                  << "); dropping and rebuilding the index";
  }
  const indexer::Method am = options_.auto_method;
  std::shared_ptr<const SequenceIndex> next;
  if (AutoEligible(seq->spec().num_layers, seq->committed_tokens())) {
    next = Placeholder(*seq, am, options_.first_layer, options_.token_begin);
  }
  if (!InstallLocked(raw, &e, stub.get(), next).ok()) return seq->held_index();
  e.persisted = nullptr;
  if (next != nullptr && am == indexer::Method::kCluster && !e.busy) {
    ScheduleLocked(seq, &e, &IndexManager::AutoBuildJob);
  }
  return next;
}

}  // namespace kvrecall::kvstore
