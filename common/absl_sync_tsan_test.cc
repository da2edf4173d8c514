// A regression test for the KVRECALL_TSAN shim over Debian's Abseil (cmake/tsan/absl_sync_tsan.cc).
// It asserts nothing itself: under ThreadSanitizer a report fails the test's process. In other
// builds it only exercises the mutexes.
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace kvrecall {
namespace {

// Debian's Abseil tracks every mutex that was held with another in a process-wide lock graph and
// removes it there when the mutex is destroyed. Threads that do this at once must not read as a
// race under ThreadSanitizer (the KVRECALL_TSAN shim, cmake/tsan/absl_sync_tsan.cc): every
// ParallelFor's State holds a mutex that the last helper destroys, on whichever thread it is.
TEST(AbslSyncTsanTest, MutexesLockedAndDestroyedOnManyThreadsAtOnce) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 50;
  constexpr int kMutexes = 512;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([] {
      for (int r = 0; r < kRounds; ++r) {
        std::vector<std::unique_ptr<absl::Mutex>> mutexes;
        for (int m = 0; m < kMutexes; ++m) {
          mutexes.push_back(std::make_unique<absl::Mutex>());
          if (m == 0) continue;
          // Held together: an edge between the two in the lock graph.
          absl::MutexLock outer(mutexes[m - 1].get());
          absl::MutexLock inner(mutexes[m].get());
        }
        mutexes.clear();  // Removes kMutexes nodes from the lock graph, growing its free list.
      }
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace
}  // namespace kvrecall
