// Bytes of KV a node may hold (--memory). Every block allocation reserves here first, so a write
// that does not fit fails with RESOURCE_EXHAUSTED instead of growing the process.
//
// Thread safety: safe for concurrent use.
#ifndef KVRECALL_KVSTORE_MEMORY_BUDGET_H_
#define KVRECALL_KVSTORE_MEMORY_BUDGET_H_

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvrecall::kvstore {

class MemoryBudget {
 public:
  explicit MemoryBudget(int64_t limit_bytes) : limit_(limit_bytes) {}

  absl::Status Reserve(int64_t bytes) {
    int64_t cur = used_.load();
    do {
      if (cur + bytes > limit_) {
        return absl::ResourceExhaustedError(absl::StrCat("memory budget exhausted: ", cur, " + ", bytes,
                                                         " bytes > limit ", limit_));
      }
    } while (!used_.compare_exchange_weak(cur, cur + bytes));
    return absl::OkStatus();
  }
  void Release(int64_t bytes) { used_.fetch_sub(bytes); }

  int64_t used() const { return used_.load(); }
  int64_t limit() const { return limit_; }

 private:
  const int64_t limit_;
  std::atomic<int64_t> used_{0};
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_MEMORY_BUDGET_H_
