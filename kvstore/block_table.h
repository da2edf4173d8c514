// KV blocks, the prefix-sharing table, and eviction to disk of a tier node.
//
// A Block is `block_tokens` consecutive tokens of one model, every layer: one arena slot per
// layer (arena.h), each K[num_kv_heads][block_tokens][head_dim] then V of the same shape. A block
// starts private to the sequence that allocated it (refs = 1). Once it is full and committed, the
// sequence publishes it under its content key (content_hash.h); from then on it is immutable and
// any sequence of the same namespace and model whose prompt has the same prefix may take a
// reference instead of storing the bytes again. Only full blocks are ever published, so appends
// (which only write beyond a sequence's committed length) never touch a shared block: no
// copy-on-write is needed. The last Unref frees the block's slots (and its spilled record).
//
// Sharing is exact: besides the key, AcquirePrefix compares namespace, model, parent key and the
// block's token ids before it shares a block.
//
// Residency, pins and leases. A block is kResident (its layers are arena slots) or kSpilled (no
// slots; its bytes are a record in the BlockStore, block_store.h). Whoever reads or writes a
// block's slots holds a *pin* on it (Pin / Unpin; Allocate returns the block pinned once for its
// writer); a pinned block is resident and stays so. Every pin and unpin renews the block's
// *lease* to now + options.lease (injected clock). When an allocation (Allocate, or a reload
// inside Pin) finds the arena full and a store is configured, the table evicts: resident blocks
// with no pin and an expired lease, least recently accessed first (ties: lower id), are written
// to the store in one batch and their slots freed, until the allocation fits. Sequences touch all
// their blocks together, so this is LRU over sequences, and a shared block is spilled once, under
// its content key, whoever references it. Pin reloads a spilled block transparently (it may evict
// others to make room); an immutable block keeps its record, so evicting it again writes nothing.
// No store, or nothing evictable: RESOURCE_EXHAUSTED as before. A store error while spilling
// (e.g. a full disk: RESOURCE_EXHAUSTED) fails only the allocation that needed the room; a
// record that fails its checksum on reload is DATA_LOSS for the reader.
//
// Read pins (PinForRead) cost O(1), not O(blocks): a decode step's Retrieve reads every block of
// every sequence of its batch, and at 96K tokens that is ~3000 blocks a sequence, each a cache
// miss on this table's metadata. A read pin whose blocks the caller knows to be resident (it saw
// them so under the current *residency epoch*, which every eviction advances) is only registered;
// an eviction first turns every registered read pin into per-block pins (EvictLocked), so a
// registered pin protects exactly as a per-block one does. Its caller renews leases itself, at
// most every lease / 4 (Sequence::ReadLayer), so an access protects a block for at least 3/4 of
// the lease and the LRU order is exact to a quarter of the lease.
//
// Thread safety: all methods are thread-safe (one mutex; store I/O for spill and reload happens
// under it, which serialises spills and reloads — simple, and correct; per-block loading states
// would let unrelated pins proceed). Lock order: Sequence::mu_ before BlockTable::mu_ before
// Arena::mu_; the BlockStore is a leaf (RocksDB's own locks). Slot bytes are not guarded: a
// private block is written only by its owning sequence's append transaction (which pins it); a
// published block is never written; readers pin.
#ifndef KVRECALL_KVSTORE_BLOCK_TABLE_H_
#define KVRECALL_KVSTORE_BLOCK_TABLE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/clock.h"
#include "kvstore/arena.h"
#include "kvstore/block_store.h"
#include "kvstore/content_hash.h"

namespace kvrecall::kvstore {

class Block {
 public:
  enum class State { kResident, kSpilled };

  uint64_t id() const { return id_; }
  // Layer l's slot: K[num_kv_heads][block_tokens][head_dim] then V.
  // REQUIRES: l < num_layers, and the caller holds a pin (the pointer changes across a spill).
  uint8_t* layer(int l) const { return layers_[static_cast<size_t>(l)]; }
  // True once published: the bytes never change again.
  bool immutable() const { return immutable_.load(std::memory_order_acquire); }

 private:
  friend class BlockTable;
  Block(uint64_t id, std::vector<uint8_t*> layers, size_t layer_bytes, int num_layers)
      : id_(id), num_layers_(num_layers), layer_bytes_(layer_bytes), layers_(std::move(layers)) {}

  const uint64_t id_;
  const int num_layers_;
  const size_t layer_bytes_;  // bytes of each layer slot that hold KV (<= the arena slot)
  // The fields below are guarded by the owning BlockTable's mutex; layers_ is read without it
  // by pin holders (it only changes while the block has no pin).
  std::vector<uint8_t*> layers_;  // empty while spilled
  std::atomic<bool> immutable_{false};
  int refs_ = 1;
  int pins_ = 1;
  State state_ = State::kResident;
  bool on_disk_ = false;  // the store holds a current record of this block
  int64_t last_access_ns_ = 0;
  int64_t lease_until_ns_ = 0;
  bool published_ = false;
  ContentKey key_, parent_;
  std::string namespace_, model_id_;
  std::vector<int32_t> tokens_;
};

struct BlockTableOptions {
  Clock* clock = nullptr;                    // null: Clock::Real(); must outlive the table
  absl::Duration lease = absl::Seconds(30);  // how long an access protects a block from eviction
  BlockStore* store = nullptr;               // null: no eviction; must outlive the table
  // --durable (store required): every committed block is written through at commit
  // (PersistCommit), records are keyed "p" + id for good (ids survive restarts), and a reloaded
  // block keeps its record.
  bool durable = false;
};

struct BlockTableStats {
  int64_t blocks = 0;         // live blocks (resident or spilled)
  int64_t published = 0;      // of which shareable
  int64_t shared = 0;         // of which referenced by more than one sequence
  int64_t references = 0;     // sum of refcounts
  int64_t spilled = 0;        // live blocks currently spilled (no slots)
  int64_t spilled_bytes = 0;  // bytes of the store's block records of live blocks
  int64_t evictions = 0;      // blocks evicted from the arena, ever
  int64_t reloads = 0;        // spilled blocks read back, ever
};

class BlockTable {
 public:
  // `arena` must outlive the table; its slot size must be set before Allocate.
  explicit BlockTable(Arena* arena, const BlockTableOptions& options = {});
  ~BlockTable();  // REQUIRES: every block was unreferenced.

  Arena* arena() const { return arena_; }
  bool can_evict() const { return options_.store != nullptr; }

  // A new private block with one slot per layer, refs = 1 and pins = 1 (the writer's: Unpin it
  // when the write is committed or abandoned). layer_bytes: the bytes of each slot that hold KV
  // (what a spill writes); 0 = the whole slot. RESOURCE_EXHAUSTED when fewer than num_layers slots
  // are free even after evicting what may be evicted (nothing is allocated then); a store error
  // while spilling is returned as is.
  absl::StatusOr<Block*> Allocate(int num_layers, size_t layer_bytes = 0);
  void Ref(Block* b);
  // Drops one reference; at zero the block leaves the table, its slots return to the arena and
  // its store record (if any) is deleted. REQUIRES: at zero, no pin other than the owner's.
  void Unref(Block* b);

  // Makes every block resident (reloading spilled ones) and pins it; renews their leases. All or
  // nothing: on error no pin is kept. DATA_LOSS when a record is missing or fails its checksum,
  // RESOURCE_EXHAUSTED when the arena cannot make room. REQUIRES: the caller holds a reference on
  // each block for as long as it holds the pins.
  absl::Status Pin(absl::Span<Block* const> blocks);
  void Unpin(absl::Span<Block* const> blocks);
  // Renews the leases (an access that does not read bytes, e.g. reopening a sequence).
  void Touch(absl::Span<Block* const> blocks);

  // A reader's pin on `blocks` (Sequence::ReadLayer), released with the last copy of `pin`.
  // When `resident_epoch` is the current residency epoch (the caller saw every block of
  // `blocks` outside `unverified` resident under it) and every block of `unverified` is
  // resident, the pin is registered in O(1); otherwise it pins block by block as Pin does,
  // reloading spilled ones (errors as Pin's; nothing is kept then). `touch`: renew every block's
  // lease as well (the caller throttles this; a read pin's release renews nothing). `epoch`: the
  // residency epoch under which every block was resident and pinned, for the caller's next
  // claim. REQUIRES: as Pin; `unverified` is a subset of `blocks`.
  static constexpr uint64_t kNoEpoch = ~uint64_t{0};  // never the current epoch
  struct ReadPin {
    std::shared_ptr<const void> pin;
    uint64_t epoch = 0;
  };
  absl::StatusOr<ReadPin> PinForRead(std::vector<Block*> blocks, uint64_t resident_epoch,
                                     absl::Span<Block* const> unverified, bool touch);
  // The clock's time and the interval at which a reader renews its blocks' leases (lease / 4).
  int64_t NowNs() const { return options_.clock->MonotonicNanos(); }
  int64_t touch_interval_ns() const { return absl::ToInt64Nanoseconds(options_.lease) / 4; }

  // --durable: writes `blocks` (pinned; their bytes as they are now) and the metadata record
  // (meta_key, meta_value) in one atomic, synced batch. On error nothing was written (a full
  // disk is RESOURCE_EXHAUSTED). Does not take the table's mutex while the write is in flight.
  absl::Status PersistCommit(absl::Span<Block* const> blocks, absl::string_view meta_key,
                             absl::string_view meta_value);
  // Recovery (--durable): a spilled block whose record is "p" + id, refs = 1, no pin. Later ids
  // are allocated above it. REQUIRES: no block with this id exists yet.
  Block* AddRecovered(uint64_t id, int num_layers, size_t layer_bytes);

  // Makes a full, committed block shareable under `key` = BlockContentKey(parent, ns, model,
  // tokens). If another block already holds the key, this one simply stays private.
  // REQUIRES: b is full, committed (never written again) and pinned.
  void Publish(Block* b, const ContentKey& parent, const ContentKey& key,
               absl::string_view share_namespace, absl::string_view model_id,
               absl::Span<const int32_t> tokens);

  // Walks keys[0..] (keys[i] = key of block i of `token_ids`, chained) and, while block i is
  // published with the same namespace, model, parent and tokens, takes a reference on it and
  // appends it to *out. Returns the number of blocks appended. Spilled blocks are shared too
  // (they are reloaded when read).
  int AcquirePrefix(absl::Span<const ContentKey> keys, absl::string_view share_namespace,
                    absl::string_view model_id, absl::Span<const int32_t> token_ids,
                    int block_tokens, std::vector<Block*>* out);

  // From now on the last Unref of a block leaves its store record in place: the owner is
  // shutting down, and durable records must survive it (spill records are wiped at the next
  // start anyway).
  void KeepRecordsOnRelease();

  // Takes n arena slots that hold no KV (index_manager.h charges index memory against the arena
  // with them), evicting blocks as Allocate does; appends them to *out. All or nothing:
  // RESOURCE_EXHAUSTED when they cannot be had. The slots' pages are released to the OS where
  // the mapping allows (madvise), since nothing will write them.
  absl::Status ReserveSlots(int n, std::vector<uint8_t*>* out);
  // Returns slots obtained from ReserveSlots.
  void ReleaseSlots(absl::Span<uint8_t* const> slots);

  // refs of each block, in order.
  std::vector<int> RefCounts(absl::Span<Block* const> blocks) const;
  // States of each block, in order.
  std::vector<Block::State> States(absl::Span<Block* const> blocks) const;
  // The store key of a block: "c" + content key when published and not durable, else "p" +
  // big-endian id.
  std::string StoreKey(const Block* b) const;
  BlockTableStats stats() const;

 private:
  struct ReadPinState;
  void TouchLocked(Block* b, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pin's body: pins every block (renewing the leases when `touch`), then reloads the spilled.
  absl::Status PinLocked(absl::Span<Block* const> blocks, bool touch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseRead(const ReadPinState* state);
  // Before an eviction: every registered read pin takes its per-block pins.
  void PinRegisteredReadsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string StoreKeyLocked(const Block* b) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Arena slots, evicting when the arena is full.
  absl::Status AllocateSlotsLocked(int n, std::vector<uint8_t*>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status EvictLocked(int64_t slots) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ReloadLocked(Block* b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  size_t RecordBytes(const Block* b) const {
    return kBlockRecordHeaderBytes + static_cast<size_t>(b->num_layers_) * b->layer_bytes_;
  }

  Arena* const arena_;
  BlockTableOptions options_;
  mutable absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t shared_ ABSL_GUARDED_BY(mu_) = 0;  // blocks with refs_ > 1
  int64_t references_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t spilled_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t spilled_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reloads_ ABSL_GUARDED_BY(mu_) = 0;
  bool keep_records_ ABSL_GUARDED_BY(mu_) = false;
  // Advanced by every eviction (and by AddRecovered, whose blocks are born spilled): a block
  // seen resident under epoch e is resident while the epoch is still e.
  uint64_t residency_epoch_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_set<ReadPinState*> read_pins_ ABSL_GUARDED_BY(mu_);  // registered, O(1) ones
  absl::flat_hash_set<Block*> live_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<ContentKey, Block*> published_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_BLOCK_TABLE_H_
