#include "kvstore/slot_mirror.h"

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

  Shard& shard = ShardOf(key);
  absl::MutexLock lock(&shard.mu);
  auto [it, inserted] = shard.entries.try_emplace(key);
  Entry& e = it->second;
  if (!inserted && epoch < e.epoch) {
    return absl::AbortedError(absl::StrCat("stale call: slot epoch ", epoch, " for sequence '", key.sequence_id,
                                           "' layer ", key.layer, " kv-head ", key.kv_head,
                                           " is older than the mirror's ", e.epoch));
  }
  if (inserted || epoch > e.epoch || e.budget != budget || incarnation.expired() ||
      !SameOwner(e.incarnation, incarnation)) {
    e.incarnation = std::move(incarnation);
    e.epoch = epoch;
    e.budget = budget;
    e.tokens.clear();
    e.slots.clear();
  }

  // Merge the two ascending lists: resident tokens keep their slots.
  SlotPlan plan;
  plan.slots.assign(selection.size(), -1);
  thread_local std::vector<char> used;  // per call; kept to spare an allocation per entry
  used.assign(static_cast<size_t>(budget), 0);
  size_t r = 0;
  for (size_t j = 0; j < selection.size(); ++j) {
    while (r < e.tokens.size() && e.tokens[r] < selection[j]) ++r;
    if (r < e.tokens.size() && e.tokens[r] == selection[j]) {
      plan.slots[j] = e.slots[r];
      used[static_cast<size_t>(e.slots[r])] = 1;
    }
  }
  // New tokens take the free slots, lowest first (both in ascending order).
  int32_t next_free = 0;
  for (size_t j = 0; j < selection.size(); ++j) {
    if (plan.slots[j] >= 0) continue;
    while (used[static_cast<size_t>(next_free)]) ++next_free;
    used[static_cast<size_t>(next_free)] = 1;
    plan.slots[j] = next_free;
    plan.fill_slots.push_back(next_free);
    plan.fill_tokens.push_back(selection[j]);
  }
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
