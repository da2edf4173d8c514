#include "common/thread_pool.h"

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace kvrecall {
namespace {

TEST(ThreadPoolTest, ParallelForVisitsEveryIndexOnce) {
  ThreadPool pool(3);
  std::vector<std::atomic<int>> hits(1000);
  pool.ParallelFor(1000, [&](int64_t i) { hits[i].fetch_add(1); });
  for (auto& h : hits) EXPECT_EQ(h.load(), 1);
}

TEST(ThreadPoolTest, NestedParallelForDoesNotDeadlock) {
  ThreadPool pool(2);
  std::atomic<int> total{0};
  pool.ParallelFor(8, [&](int64_t) { pool.ParallelFor(8, [&](int64_t) { total.fetch_add(1); }); });
  EXPECT_EQ(total.load(), 64);
}

// Debian's Abseil tracks every mutex that was held with another in a process-wide lock graph and
// removes it there when the mutex is destroyed. Threads that do this at once must not read as a
// race under ThreadSanitizer (the KVRECALL_TSAN shim, cmake/tsan/absl_sync_tsan.cc): every
// ParallelFor's State holds a mutex that the last helper destroys, on whichever thread it is.
TEST(ThreadPoolTest, MutexesLockedAndDestroyedOnManyThreadsAtOnce) {
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
