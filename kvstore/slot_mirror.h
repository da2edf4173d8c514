// SlotMirror: the tier node's copy of what one worker's slot caches hold, so that Retrieve sends
// only the rows a worker does not already have (delta streaming, ARCHITECTURE.md §4).
//
// A worker keeps, per (sequence, layer, kv-head), `budget` slots of K/V rows across decode steps,
// under an epoch it chooses. Consecutive steps select mostly the same tokens, so for each entry
// the mirror diffs the new selection against the tokens it believes the slots hold: tokens already
// resident keep their slot, new tokens take the slots of tokens that left the selection (lowest
// slot first, so a full resend fills slots 0..n-1 and goes out as one contiguous put).
//
// The mirror is soft state and never the cause of a wrong row:
//   - an epoch larger than the mirror's, a different budget or a different sequence incarnation
//     (dropped and re-created under the same id) resets the entry: everything is resent;
//   - an epoch smaller than the mirror's is a stale call: Plan fails with ABORTED;
//   - a plan is applied when made; if its rows then fail to reach the worker the caller must
//     Forget the entry (and the worker, seeing the failure, moves to a new epoch anyway).
//
// Thread safety: all methods are thread-safe.
#ifndef KVRECALL_KVSTORE_SLOT_MIRROR_H_
#define KVRECALL_KVSTORE_SLOT_MIRROR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace kvrecall::kvstore {

struct SlotKey {
  std::string tenant;
  std::string sequence_id;
  int layer = 0;
  int kv_head = 0;

  friend bool operator==(const SlotKey& a, const SlotKey& b) {
    return std::tie(a.tenant, a.sequence_id, a.layer, a.kv_head) == std::tie(b.tenant, b.sequence_id, b.layer, b.kv_head);
  }
  template <typename H>
  friend H AbslHashValue(H h, const SlotKey& k) {
    return H::combine(std::move(h), k.tenant, k.sequence_id, k.layer, k.kv_head);
  }
};

// Where a selection lives in the worker's slots and which rows must be sent.
struct SlotPlan {
  std::vector<int32_t> slots;        // slots[j]: slot of selection[j]
  std::vector<int32_t> fill_slots;   // slots to fill, ascending
  std::vector<int32_t> fill_tokens;  // fill_tokens[j]: the token whose row goes to fill_slots[j]
};

// The plan without a mirror: selection j in slot j, every row sent.
SlotPlan FreshSlotPlan(absl::Span<const int32_t> selection);

class SlotMirror {
 public:
  // Diffs `selection` (ascending, distinct, size <= budget) against the entry `key` and applies
  // the result. `incarnation` identifies the sequence object (a dropped and re-created sequence
  // has another). epoch 0 is not mirrored (FreshSlotPlan). ABORTED when epoch < the entry's;
  // INVALID_ARGUMENT for a selection larger than the budget.
  absl::StatusOr<SlotPlan> Plan(const SlotKey& key, std::weak_ptr<const void> incarnation, uint64_t epoch, int budget,
                                absl::Span<const int32_t> selection);

  // Drops an entry (its rows may not have arrived); the next Plan for it resends everything.
  void Forget(const SlotKey& key);
  // Drops every entry of a sequence (closed or dropped).
  void ForgetSequence(const std::string& tenant, const std::string& sequence_id);

  int64_t entries() const;

  // Plan looks resident tokens up in a per-thread table (4 bytes per token id) while every id is
  // in [0, kDirectTokens); otherwise it merges the two sorted lists (the same plan, slower).
  static constexpr int32_t kDirectTokens = 1 << 21;

 private:
  struct Entry {
    absl::Mutex mu;
    std::weak_ptr<const void> incarnation ABSL_GUARDED_BY(mu);
    uint64_t epoch ABSL_GUARDED_BY(mu) = 0;  // 0: never planned
    int budget ABSL_GUARDED_BY(mu) = 0;
    // The tokens the slots hold, ascending, and their slots; slots not listed are free.
    std::vector<int32_t> tokens ABSL_GUARDED_BY(mu);
    std::vector<int32_t> slots ABSL_GUARDED_BY(mu);
  };

  // Striped maps, each lock held only to find an entry: the plans of one Retrieve's entries run
  // in parallel, each under its entry's lock. (With the plans under their shard's lock, two of a
  // call's 8 entries in one shard, the likely case, made one wait for the other's plan, and on a
  // server such a wait costs a wake-up.) A Forget drops the map's reference; a plan running
  // meanwhile finishes on the orphaned entry, and the next one starts afresh.
  struct Shard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<SlotKey, std::shared_ptr<Entry>> entries ABSL_GUARDED_BY(mu);
  };
  static constexpr int kShards = 16;
  Shard& ShardOf(const SlotKey& key) { return shards_[absl::HashOf(key) % kShards]; }

  Shard shards_[kShards];
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_SLOT_MIRROR_H_
