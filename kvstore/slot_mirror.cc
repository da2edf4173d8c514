#include "kvstore/slot_mirror.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvrecall::kvstore {
namespace {

bool SameOwner(const std::weak_ptr<const void>& a, const std::weak_ptr<const void>& b) {
  return !a.owner_before(b) && !b.owner_before(a);
}

}  // namespace

SlotPlan FreshSlotPlan(absl::Span<const int32_t> selection) {
  SlotPlan plan;
  plan.slots.resize(selection.size());
  for (size_t j = 0; j < selection.size(); ++j) plan.slots[j] = static_cast<int32_t>(j);
  plan.fill_slots = plan.slots;
  plan.fill_tokens.assign(selection.begin(), selection.end());
  return plan;
}

absl::StatusOr<SlotPlan> SlotMirror::Plan(const SlotKey& key, std::weak_ptr<const void> incarnation, uint64_t epoch,
                                          int budget, absl::Span<const int32_t> selection) {
  if (budget <= 0 || selection.size() > static_cast<size_t>(budget)) {
    return absl::InvalidArgumentError(absl::StrCat("selection of ", selection.size(), " tokens for a budget of ", budget));
  }
  if (epoch == 0) return FreshSlotPlan(selection);

  std::shared_ptr<Entry> entry;
  {
    Shard& shard = ShardOf(key);
    absl::MutexLock lock(&shard.mu);
    std::shared_ptr<Entry>& slot = shard.entries[key];
    if (slot == nullptr) slot = std::make_shared<Entry>();
    entry = slot;
  }
  Entry& e = *entry;
  absl::MutexLock lock(&e.mu);
  if (epoch < e.epoch) {
    return absl::AbortedError(absl::StrCat("stale call: slot epoch ", epoch, " for sequence '", key.sequence_id,
                                           "' layer ", key.layer, " kv-head ", key.kv_head,
                                           " is older than the mirror's ", e.epoch));
  }
  if (epoch > e.epoch || e.budget != budget || incarnation.expired() ||
      !SameOwner(e.incarnation, incarnation)) {
    e.incarnation = std::move(incarnation);
    e.epoch = epoch;
    e.budget = budget;
    e.tokens.clear();
    e.slots.clear();
  }

  // Resident tokens keep their slots. used[budget] is a sink for the writes of non-resident
  // selections.
  const size_t n = selection.size(), resident = e.tokens.size();
  SlotPlan plan;
  plan.slots.assign(n, -1);
  thread_local std::vector<char> used;  // per call; kept to spare an allocation per entry
  used.assign(static_cast<size_t>(budget) + 1, 0);
  // Both lists ascending: their ends bound every id.
  const int32_t min_token = std::min(n > 0 ? selection[0] : 0, resident > 0 ? e.tokens[0] : 0);
  const int32_t max_token =
      std::max(n > 0 ? selection[n - 1] : 0, resident > 0 ? e.tokens[resident - 1] : 0);
  if (min_token >= 0 && max_token < kDirectTokens) {
    // Through a table of every token's slot: independent lookups instead of a merge whose every
    // step waits for the previous one (which list advances is data, and mispredicts).
    thread_local std::vector<int32_t> slot_of;  // -1 everywhere between calls
    if (slot_of.size() <= static_cast<size_t>(max_token))
      slot_of.resize(static_cast<size_t>(max_token) + 1, -1);
    for (size_t r = 0; r < resident; ++r) slot_of[e.tokens[r]] = e.slots[r];
    for (size_t j = 0; j < n; ++j) {
      const int32_t slot = slot_of[selection[j]];
      plan.slots[j] = slot;
      used[slot >= 0 ? static_cast<size_t>(slot) : static_cast<size_t>(budget)] = 1;
    }
    for (size_t r = 0; r < resident; ++r) slot_of[e.tokens[r]] = -1;
  } else {
    // Merge the two ascending lists, branch-free.
    for (size_t j = 0, r = 0; j < n && r < resident;) {
      const int32_t a = selection[j], b = e.tokens[r];
      const bool same = a == b;
      const int32_t slot = e.slots[r];
      plan.slots[j] = same ? slot : plan.slots[j];
      used[same ? static_cast<size_t>(slot) : static_cast<size_t>(budget)] = 1;
      j += a <= b ? 1 : 0;
      r += b <= a ? 1 : 0;
    }
  }
  // New tokens take the free slots, lowest first (both in ascending order).
  thread_local std::vector<int32_t> free_slots;
  free_slots.resize(static_cast<size_t>(budget));
  size_t nfree = 0;
  for (int32_t s = 0; s < budget; ++s) {
    free_slots[nfree] = s;
    nfree += used[static_cast<size_t>(s)] ? 0 : 1;
  }
  plan.fill_slots.resize(n);
  plan.fill_tokens.resize(n);
  size_t fills = 0;
  for (size_t j = 0; j < n; ++j) {
    // fills <= j < n <= budget indexes free_slots; at most nfree selections are fresh (the
    // selection fits the budget), so a fresh one reads a free slot, others discard the value.
    // Masks, not a branch: which selections are fresh is data.
    const int32_t old = plan.slots[j];
    const int32_t fresh = old >> 31;  // all ones when fresh (old == -1)
    const int32_t slot = free_slots[fills];
    plan.fill_slots[fills] = slot;
    plan.fill_tokens[fills] = selection[j];
    plan.slots[j] = (slot & fresh) | (old & ~fresh);
    fills += static_cast<size_t>(fresh & 1);
  }
  plan.fill_slots.resize(fills);
  plan.fill_tokens.resize(fills);
  e.tokens.assign(selection.begin(), selection.end());
  e.slots = plan.slots;
  return plan;
}

void SlotMirror::Forget(const SlotKey& key) {
  Shard& shard = ShardOf(key);
  absl::MutexLock lock(&shard.mu);
  shard.entries.erase(key);
}

void SlotMirror::ForgetSequence(const std::string& tenant, const std::string& sequence_id) {
  for (Shard& shard : shards_) {
    absl::MutexLock lock(&shard.mu);
    absl::erase_if(shard.entries, [&](const auto& kv) {
      return kv.first.tenant == tenant && kv.first.sequence_id == sequence_id;
    });
  }
}

int64_t SlotMirror::entries() const {
  int64_t n = 0;
  for (const Shard& shard : shards_) {
    absl::MutexLock lock(&shard.mu);
    n += static_cast<int64_t>(shard.entries.size());
  }
  return n;
}

}  // namespace kvrecall::kvstore
