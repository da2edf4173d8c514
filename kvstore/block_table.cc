#include "kvstore/block_table.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace kvrecall::kvstore {
namespace {

void AppendBigEndian(std::string* s, uint64_t v) {
  for (int i = 7; i >= 0; --i) s->push_back(static_cast<char>(v >> (8 * i)));
}
void AppendLittleEndian(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>(v >> (8 * i)));
}

}  // namespace

BlockTable::BlockTable(Arena* arena, const BlockTableOptions& options)
    : arena_(arena), options_(options) {
  if (options_.clock == nullptr) options_.clock = Clock::Real();
}

// A read pin: registered in read_pins_ (no per-block pins), or holding a pin on each block.
struct BlockTable::ReadPinState {
  std::vector<Block*> blocks;
  bool per_block = false;
};

BlockTable::~BlockTable() {
  absl::MutexLock lock(&mu_);
  if (!read_pins_.empty()) KV_LOG(ERROR) << read_pins_.size() << " read pins outlive their table";
}

std::string BlockTable::StoreKey(const Block* b) const {
  absl::MutexLock lock(&mu_);
  return StoreKeyLocked(b);
}

std::string BlockTable::StoreKeyLocked(const Block* b) const {
  std::string k;
  if (b->published_ && !options_.durable) {
    k = "c";
    AppendLittleEndian(&k, b->key_.lo);
    AppendLittleEndian(&k, b->key_.hi);
  } else {
    k = "p";
    AppendBigEndian(&k, b->id_);
  }
  return k;
}

void BlockTable::TouchLocked(Block* b, int64_t now) {
  b->last_access_ns_ = std::max(b->last_access_ns_, now);
  b->lease_until_ns_ = std::max(b->lease_until_ns_, now + absl::ToInt64Nanoseconds(options_.lease));
}

absl::Status BlockTable::AllocateSlotsLocked(int n, std::vector<uint8_t*>* out) {
  absl::Status s = arena_->Allocate(n, out);
  if (!absl::IsResourceExhausted(s) || options_.store == nullptr) return s;
  const int64_t free_slots = arena_->total_slots() - arena_->used_slots();
  if (absl::Status e = EvictLocked(n - free_slots); !e.ok()) {
    if (absl::IsResourceExhausted(e)) {
      return absl::ResourceExhaustedError(absl::StrCat(s.message(), "; eviction: ", e.message()));
    }
    return e;
  }
  return arena_->Allocate(n, out);
}

absl::Status BlockTable::ReserveSlots(int n, std::vector<uint8_t*>* out) {
  if (n <= 0) return absl::OkStatus();
  std::vector<uint8_t*> got;
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(AllocateSlotsLocked(n, &got));
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t bytes = arena_->slot_bytes();
  for (uint8_t* p : got) {
    if (reinterpret_cast<uintptr_t>(p) % page == 0 && bytes % page == 0) {
      madvise(p, bytes, MADV_DONTNEED);  // best effort (hugetlb mappings refuse partial pages)
    }
  }
  out->insert(out->end(), got.begin(), got.end());
  return absl::OkStatus();
}

void BlockTable::ReleaseSlots(absl::Span<uint8_t* const> slots) {
  if (slots.empty()) return;
  absl::MutexLock lock(&mu_);
  arena_->Free(slots);
}

absl::Status BlockTable::EvictLocked(int64_t slots) {
  PinRegisteredReadsLocked();
  const int64_t now = NowNs();
  std::vector<Block*> candidates;
  for (Block* b : live_) {
    if (b->state_ == Block::State::kResident && b->pins_ == 0 && b->lease_until_ns_ <= now) {
      candidates.push_back(b);
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Block* a, const Block* b) {
    return a->last_access_ns_ != b->last_access_ns_ ? a->last_access_ns_ < b->last_access_ns_
                                                    : a->id_ < b->id_;
  });
  std::vector<Block*> victims;
  int64_t freed = 0;
  for (Block* b : candidates) {
    if (freed >= slots) break;
    victims.push_back(b);
    freed += b->num_layers_;
  }
  if (freed < slots) {
    return absl::ResourceExhaustedError(
        absl::StrCat("needs ", slots, " more slots but only ", freed,
                     " belong to blocks without a pin or a live lease"));
  }
  std::unique_ptr<BlockStore::Batch> batch = options_.store->NewBatch();
  for (Block* b : victims) {
    if (!b->on_disk_) batch->PutBlock(StoreKeyLocked(b), b->layers_, b->layer_bytes_);
  }
  // A failed write (full disk) leaves every victim resident and untouched.
  if (absl::Status s = options_.store->Commit(batch.get()); !s.ok()) {
    KV_LOG(WARNING) << "spilling " << victims.size() << " blocks failed: " << s;
    return s;
  }
  for (Block* b : victims) {
    if (!b->on_disk_) spilled_bytes_ += static_cast<int64_t>(RecordBytes(b));
    b->on_disk_ = true;
    arena_->Free(b->layers_);
    b->layers_.clear();
    b->state_ = Block::State::kSpilled;
    ++spilled_;
    ++evictions_;
  }
  if (!victims.empty()) ++residency_epoch_;
  return absl::OkStatus();
}

absl::Status BlockTable::ReloadLocked(Block* b) {
  std::vector<uint8_t*> slots;
  slots.reserve(static_cast<size_t>(b->num_layers_));
  if (absl::Status s = AllocateSlotsLocked(b->num_layers_, &slots); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("reloading a spilled block: ", s.message()));
  }
  const std::string key = StoreKeyLocked(b);
  absl::Status s = options_.store->GetBlock(key, slots, b->layer_bytes_);
  if (!s.ok()) {
    arena_->Free(slots);
    if (absl::IsNotFound(s)) s = absl::DataLossError(s.message());
    return absl::Status(s.code(), absl::StrCat("block ", b->id_, ": ", s.message()));
  }
  b->layers_ = std::move(slots);
  b->state_ = Block::State::kResident;
  --spilled_;
  ++reloads_;
  if (!b->immutable() && !options_.durable) {
    // Its owner may append to it: the record goes stale, so drop it now. (Durable records are
    // rewritten by every commit that changes the block instead.)
    std::unique_ptr<BlockStore::Batch> batch = options_.store->NewBatch();
    batch->DeleteBlock(key);
    if (absl::Status d = options_.store->Commit(batch.get()); !d.ok()) {
      KV_LOG(WARNING) << "dropping the record of reloaded block " << b->id_ << ": " << d;
    }
    b->on_disk_ = false;
    spilled_bytes_ -= static_cast<int64_t>(RecordBytes(b));
  }
  return absl::OkStatus();
}

absl::Status BlockTable::PersistCommit(absl::Span<Block* const> blocks, absl::string_view meta_key,
                                       absl::string_view meta_value) {
  if (options_.store == nullptr) return absl::FailedPreconditionError("no store to persist to");
  std::unique_ptr<BlockStore::Batch> batch = options_.store->NewBatch();
  std::string key;
  for (const Block* b : blocks) {
    key = "p";
    AppendBigEndian(&key, b->id_);
    batch->PutBlock(key, b->layers_, b->layer_bytes_);  // pinned: layers_ is stable
  }
  batch->PutMeta(meta_key, meta_value);
  RETURN_IF_ERROR(options_.store->Commit(batch.get()));
  absl::MutexLock lock(&mu_);
  for (Block* b : blocks) {
    if (!b->on_disk_) spilled_bytes_ += static_cast<int64_t>(RecordBytes(b));
    b->on_disk_ = true;
  }
  return absl::OkStatus();
}

Block* BlockTable::AddRecovered(uint64_t id, int num_layers, size_t layer_bytes) {
  absl::MutexLock lock(&mu_);
  Block* b = new Block(id, {}, layer_bytes, num_layers);
  b->pins_ = 0;
  b->state_ = Block::State::kSpilled;
  b->on_disk_ = true;
  ++residency_epoch_;
  next_id_ = std::max(next_id_, id + 1);
  live_.insert(b);
  ++references_;
  ++spilled_;
  spilled_bytes_ += static_cast<int64_t>(RecordBytes(b));
  return b;
}

absl::StatusOr<Block*> BlockTable::Allocate(int num_layers, size_t layer_bytes) {
  if (layer_bytes == 0) layer_bytes = arena_->slot_bytes();
  std::vector<uint8_t*> slots;
  slots.reserve(static_cast<size_t>(num_layers));
  absl::MutexLock lock(&mu_);
  if (absl::Status s = AllocateSlotsLocked(num_layers, &slots); !s.ok()) return s;
  Block* b = new Block(next_id_++, std::move(slots), layer_bytes, num_layers);
  TouchLocked(b, NowNs());
  live_.insert(b);
  ++references_;
  return b;
}

void BlockTable::Ref(Block* b) {
  absl::MutexLock lock(&mu_);
  if (b->refs_++ == 1) ++shared_;
  ++references_;
}

void BlockTable::Unref(Block* b) {
  absl::MutexLock lock(&mu_);
  --references_;
  if (--b->refs_ > 0) {
    if (b->refs_ == 1) --shared_;
    return;
  }
  if (b->published_) published_.erase(b->key_);
  live_.erase(b);
  if (b->on_disk_ && !keep_records_) {
    std::unique_ptr<BlockStore::Batch> batch = options_.store->NewBatch();
    batch->DeleteBlock(StoreKeyLocked(b));
    if (absl::Status s = options_.store->Commit(batch.get()); !s.ok()) {
      KV_LOG(WARNING) << "deleting the record of block " << b->id_ << ": " << s;
    }
    spilled_bytes_ -= static_cast<int64_t>(RecordBytes(b));
  }
  if (b->state_ == Block::State::kResident) {
    arena_->Free(b->layers_);
  } else {
    --spilled_;
  }
  delete b;
}

absl::Status BlockTable::Pin(absl::Span<Block* const> blocks) {
  absl::MutexLock lock(&mu_);
  return PinLocked(blocks, /*touch=*/true);
}

absl::Status BlockTable::PinLocked(absl::Span<Block* const> blocks, bool touch) {
  const int64_t now = NowNs();
  // Pin the resident ones first so that reloading the others cannot evict them.
  for (Block* b : blocks) {
    if (touch) TouchLocked(b, now);
    ++b->pins_;
  }
  for (Block* b : blocks) {
    if (b->state_ == Block::State::kResident) continue;
    if (absl::Status s = ReloadLocked(b); !s.ok()) {
      for (Block* p : blocks) --p->pins_;
      return s;
    }
  }
  return absl::OkStatus();
}

void BlockTable::Unpin(absl::Span<Block* const> blocks) {
  absl::MutexLock lock(&mu_);
  const int64_t now = NowNs();
  for (Block* b : blocks) {
    --b->pins_;
    TouchLocked(b, now);
  }
}

absl::StatusOr<BlockTable::ReadPin> BlockTable::PinForRead(std::vector<Block*> blocks,
                                                           uint64_t resident_epoch,
                                                           absl::Span<Block* const> unverified,
                                                           bool touch) {
  auto state = std::make_unique<ReadPinState>();
  state->blocks = std::move(blocks);
  ReadPin out;
  {
    absl::MutexLock lock(&mu_);
    bool known = resident_epoch == residency_epoch_;
    for (size_t i = 0; known && i < unverified.size(); ++i) {
      known = unverified[i]->state_ == Block::State::kResident;
    }
    if (known) {
      if (touch) {
        const int64_t now = NowNs();
        for (Block* b : state->blocks) TouchLocked(b, now);
      }
      read_pins_.insert(state.get());
    } else {
      RETURN_IF_ERROR(PinLocked(state->blocks, touch));
      state->per_block = true;
    }
    out.epoch = residency_epoch_;
  }
  out.pin = std::shared_ptr<const void>(
      state.release(), [this](const void* p) { ReleaseRead(static_cast<const ReadPinState*>(p)); });
  return out;
}

void BlockTable::ReleaseRead(const ReadPinState* state) {
  {
    absl::MutexLock lock(&mu_);
    if (state->per_block) {
      for (Block* b : state->blocks) --b->pins_;
    } else {
      read_pins_.erase(const_cast<ReadPinState*>(state));
    }
  }
  delete state;
}

void BlockTable::PinRegisteredReadsLocked() {
  for (ReadPinState* state : read_pins_) {
    for (Block* b : state->blocks) ++b->pins_;
    state->per_block = true;
  }
  read_pins_.clear();
}

void BlockTable::Touch(absl::Span<Block* const> blocks) {
  absl::MutexLock lock(&mu_);
  const int64_t now = NowNs();
  for (Block* b : blocks) TouchLocked(b, now);
}

void BlockTable::Publish(Block* b, const ContentKey& parent, const ContentKey& key,
                         absl::string_view share_namespace, absl::string_view model_id,
                         absl::Span<const int32_t> tokens) {
  b->immutable_.store(true, std::memory_order_release);
  absl::MutexLock lock(&mu_);
  if (b->published_ || !published_.emplace(key, b).second) return;
  b->published_ = true;
  b->key_ = key;
  b->parent_ = parent;
  b->namespace_ = std::string(share_namespace);
  b->model_id_ = std::string(model_id);
  b->tokens_.assign(tokens.begin(), tokens.end());
}

int BlockTable::AcquirePrefix(absl::Span<const ContentKey> keys, absl::string_view share_namespace,
                              absl::string_view model_id, absl::Span<const int32_t> token_ids,
                              int block_tokens, std::vector<Block*>* out) {
  absl::MutexLock lock(&mu_);
  int n = 0;
  ContentKey parent;
  for (size_t i = 0; i < keys.size(); ++i) {
    const size_t begin = i * static_cast<size_t>(block_tokens);
    if (begin + static_cast<size_t>(block_tokens) > token_ids.size()) break;
    auto it = published_.find(keys[i]);
    if (it == published_.end()) break;
    Block* b = it->second;
    const absl::Span<const int32_t> tokens =
        token_ids.subspan(begin, static_cast<size_t>(block_tokens));
    if (b->parent_ != parent || b->namespace_ != share_namespace || b->model_id_ != model_id ||
        !std::equal(tokens.begin(), tokens.end(), b->tokens_.begin(), b->tokens_.end())) {
      break;
    }
    if (b->refs_++ == 1) ++shared_;
    ++references_;
    out->push_back(b);
    parent = keys[i];
    ++n;
  }
  return n;
}

void BlockTable::KeepRecordsOnRelease() {
  absl::MutexLock lock(&mu_);
  keep_records_ = true;
}

std::vector<int> BlockTable::RefCounts(absl::Span<Block* const> blocks) const {
  absl::MutexLock lock(&mu_);
  std::vector<int> r;
  r.reserve(blocks.size());
  for (const Block* b : blocks) r.push_back(b->refs_);
  return r;
}

std::vector<Block::State> BlockTable::States(absl::Span<Block* const> blocks) const {
  absl::MutexLock lock(&mu_);
  std::vector<Block::State> r;
  r.reserve(blocks.size());
  for (const Block* b : blocks) r.push_back(b->state_);
  return r;
}

BlockTableStats BlockTable::stats() const {
  absl::MutexLock lock(&mu_);
  BlockTableStats s;
  s.blocks = static_cast<int64_t>(live_.size());
  s.published = static_cast<int64_t>(published_.size());
  s.shared = shared_;
  s.references = references_;
  s.spilled = spilled_;
  s.spilled_bytes = spilled_bytes_;
  s.evictions = evictions_;
  s.reloads = reloads_;
  return s;
}

}  // namespace kvrecall::kvstore
