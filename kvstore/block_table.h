// KV blocks and the prefix-sharing table of a tier node.
//
// A Block is `block_tokens` consecutive tokens of one model, every layer: one arena slot per
// layer (arena.h), each K[num_kv_heads][block_tokens][head_dim] then V of the same shape. A block
// starts private to the sequence that allocated it (refs = 1). Once it is full and committed, the
// sequence publishes it under its content key (content_hash.h); from then on it is immutable and
// any sequence of the same namespace and model whose prompt has the same prefix may take a
// reference instead of storing the bytes again. Only full blocks are ever published, so appends
// (which only write beyond a sequence's committed length) never touch a shared block: no
// copy-on-write is needed. The last Unref frees the block's slots.
//
// Sharing is exact: besides the key, AcquirePrefix compares namespace, model, parent key and the
// block's token ids before it shares a block.
//
// Hooks for the rest of issue 3 (not built yet): eviction would keep zero-ref published blocks in
// an LRU instead of freeing them at once (Unref), and a spilled block would have no slots but a
// RocksDB location (Block::state); index segments over a shared prefix would hang off the
// published block chain the same way.
//
// Thread safety: all methods are thread-safe (one mutex). Lock order: Sequence::mu_ before
// BlockTable::mu_ before Arena::mu_. Slot bytes are not guarded: a private block is written only by
// its owning sequence's append transaction; a published block is never written.
#ifndef KVRECALL_KVSTORE_BLOCK_TABLE_H_
#define KVRECALL_KVSTORE_BLOCK_TABLE_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kvstore/arena.h"
#include "kvstore/content_hash.h"

namespace kvrecall::kvstore {

class Block {
 public:
  enum class State { kResident, kSpilled };  // kSpilled: reserved for issue 3 item 3

  uint64_t id() const { return id_; }
  // Layer l's slot: K[num_kv_heads][block_tokens][head_dim] then V. REQUIRES: l < num_layers.
  uint8_t* layer(int l) const { return layers_[static_cast<size_t>(l)]; }
  // True once published: the bytes never change again.
  bool immutable() const { return immutable_.load(std::memory_order_acquire); }

 private:
  friend class BlockTable;
  Block(uint64_t id, std::vector<uint8_t*> layers) : id_(id), layers_(std::move(layers)) {}

  const uint64_t id_;
  const std::vector<uint8_t*> layers_;
  std::atomic<bool> immutable_{false};
  // The fields below are guarded by the owning BlockTable's mutex.
  int refs_ = 1;
  State state_ = State::kResident;
  bool published_ = false;
  ContentKey key_, parent_;
  std::string namespace_, model_id_;
  std::vector<int32_t> tokens_;
};

struct BlockTableStats {
  int64_t blocks = 0;      // live blocks
  int64_t published = 0;   // of which shareable
  int64_t shared = 0;      // of which referenced by more than one sequence
  int64_t references = 0;  // sum of refcounts
};

class BlockTable {
 public:
  // `arena` must outlive the table; its slot size must be set before Allocate.
  explicit BlockTable(Arena* arena) : arena_(arena) {}
  ~BlockTable();  // REQUIRES: every block was unreferenced.

  Arena* arena() const { return arena_; }

  // A new private block with one slot per layer and refs = 1. RESOURCE_EXHAUSTED when the arena
  // has fewer than num_layers free slots (nothing is allocated then).
  absl::StatusOr<Block*> Allocate(int num_layers);
  void Ref(Block* b);
  // Drops one reference; at zero the block leaves the table and its slots return to the arena.
  void Unref(Block* b);

  // Makes a full, committed block shareable under `key` = BlockContentKey(parent, ns, model,
  // tokens). If another block already holds the key, this one simply stays private.
  // REQUIRES: b is full and committed (never written again); tokens.size() == block_tokens.
  void Publish(Block* b, const ContentKey& parent, const ContentKey& key,
               absl::string_view share_namespace, absl::string_view model_id,
               absl::Span<const int32_t> tokens);

  // Walks keys[0..] (keys[i] = key of block i of `token_ids`, chained) and, while block i is
  // published with the same namespace, model, parent and tokens, takes a reference on it and
  // appends it to *out. Returns the number of blocks appended.
  int AcquirePrefix(absl::Span<const ContentKey> keys, absl::string_view share_namespace,
                    absl::string_view model_id, absl::Span<const int32_t> token_ids,
                    int block_tokens, std::vector<Block*>* out);

  // refs of each block, in order.
  std::vector<int> RefCounts(absl::Span<Block* const> blocks) const;
  BlockTableStats stats() const;

 private:
  Arena* const arena_;
  mutable absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t live_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t shared_ ABSL_GUARDED_BY(mu_) = 0;  // blocks with refs_ > 1
  int64_t references_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<ContentKey, Block*> published_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_BLOCK_TABLE_H_
