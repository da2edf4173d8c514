// The tier node's KV memory: one host allocation of `--memory` bytes, carved into equal slots.
//
// A slot holds one layer of one KV block (block_table.h):
//   K[num_kv_heads][block_tokens][head_dim] then V of the same shape, in the model's kv_dtype.
// Every slot of an arena has the same size, `slot_bytes`, fixed once (SetSlotBytes) before the
// first allocation: by the node from `--arena_block_bytes`, or from the first registered model's
// per-layer block size. A model whose per-layer block is smaller uses a slot partially (the rest
// is wasted); a larger one is refused at registration. One size per arena keeps the free list a
// plain stack and makes "a slot freed by any model fits any model" true.
//
// The mapping is made once and never grows: Allocate fails with RESOURCE_EXHAUSTED when no slot
// is free, so the process never exceeds its budget through KV. Hugepages: MAP_HUGETLB first
// (only when the host has reserved hugepages for it), else transparent hugepages via
// madvise(MADV_HUGEPAGE), else plain 4 KiB pages; which one happened is logged and reported.
// Pages are touched lazily (MAP_NORESERVE on the non-hugetlb path).
// With a transport the whole mapping is registered once (Transport::RegisterRegion), so that
// bulk ingest can later put straight into allocated slots; a failed registration is logged and
// reported, not fatal (nothing depends on it yet).
//
// Thread safety: all methods are thread-safe. Slot memory itself is not synchronised: the owner
// of a slot (the block table) decides who writes and reads it.
#ifndef KVRECALL_KVSTORE_ARENA_H_
#define KVRECALL_KVSTORE_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "transport/transport.h"

namespace kvrecall::kvstore {

struct ArenaOptions {
  int64_t bytes = int64_t{1} << 30;  // --memory; the mapping's size
  bool try_hugepages = true;         // false: plain pages (no MAP_HUGETLB, no madvise)
};

class Arena {
 public:
  // Maps options.bytes (0 bytes: an arena that can hold nothing). INTERNAL when mmap fails
  // outright. `transport` may be null; when not, it must outlive the arena's registration,
  // which the arena drops before unmapping.
  static absl::StatusOr<std::unique_ptr<Arena>> Create(const ArenaOptions& options,
                                                       transport::Transport* transport);
  ~Arena();  // REQUIRES: no slot is still in use by a reader.
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Fixes the slot size, rounded up to 64 bytes. OK when unset, or already set to a size >= bytes
  // (the call then changes nothing); FAILED_PRECONDITION when set to a smaller size.
  absl::Status EnsureSlotBytes(size_t bytes);
  size_t slot_bytes() const;  // 0 until set

  // Appends `n` slots to *out, all or nothing. RESOURCE_EXHAUSTED when fewer than n are free,
  // FAILED_PRECONDITION before the slot size is set.
  absl::Status Allocate(int n, std::vector<uint8_t*>* out);
  // Returns slots obtained from Allocate. REQUIRES: each was allocated and not yet freed.
  void Free(absl::Span<uint8_t* const> slots);

  int64_t capacity_bytes() const { return static_cast<int64_t>(size_); }
  int64_t used_bytes() const;  // slots in use * slot_bytes
  int64_t used_slots() const;
  int64_t total_slots() const;  // 0 until the slot size is set
  // "hugetlb", "thp" or "none".
  const std::string& hugepages() const { return hugepages_; }
  bool registered() const { return region_ != nullptr; }
  // The registration's descriptor: what a peer needs to put straight into slots (bulk ingest;
  // slot offsets are relative to base()). FAILED_PRECONDITION when the arena is not registered.
  absl::StatusOr<transport::RemoteRegion> Describe() const;
  const uint8_t* base() const { return base_; }

 private:
  Arena(uint8_t* base, size_t size, std::string hugepages)
      : base_(base), size_(size), hugepages_(std::move(hugepages)) {}

  uint8_t* const base_;
  const size_t size_;
  const std::string hugepages_;
  std::unique_ptr<transport::RegisteredRegion> region_;

  mutable absl::Mutex mu_;
  size_t slot_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t total_slots_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t carved_ ABSL_GUARDED_BY(mu_) = 0;  // slots [0, carved_) were handed out at least once
  std::vector<uint32_t> free_
      ABSL_GUARDED_BY(mu_);  // returned slot indices (LIFO: warm pages first)
  int64_t used_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_ARENA_H_
