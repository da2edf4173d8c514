#include "common/thread_pool.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
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

TEST(ThreadPoolTest, ParallelForSeesEveryCallsWritesOnReturn) {
  ThreadPool pool(4);
  for (int round = 0; round < 50; ++round) {
    std::vector<int64_t> out(97, -1);  // plain writes: the return must order them before the reads
    pool.ParallelFor(97, [&](int64_t i) { out[i] = i * round; });
    for (int64_t i = 0; i < 97; ++i) ASSERT_EQ(out[i], i * round);
  }
}

TEST(ThreadPoolTest, ConcurrentParallelForsFromManyThreadsEachGetTheirOwnIndices) {
  ThreadPool pool(3);
  std::vector<std::thread> callers;
  std::vector<int64_t> sums(6, 0);
  for (int c = 0; c < 6; ++c) {
    callers.emplace_back([&, c] {
      for (int round = 0; round < 20; ++round) {
        std::atomic<int64_t> sum{0};
        pool.ParallelFor(100 + c, [&](int64_t i) { sum.fetch_add(i + 1); });
        sums[c] += sum.load();
      }
    });
  }
  for (auto& t : callers) t.join();
  for (int c = 0; c < 6; ++c) {
    const int64_t n = 100 + c;
    EXPECT_EQ(sums[c], 20 * n * (n + 1) / 2) << c;
  }
}

TEST(ThreadPoolTest, DestructorRunsEveryScheduledTaskAlsoOnesScheduledByTasks) {
  std::atomic<int> ran{0};
  {
    ThreadPool pool(2);
    for (int i = 0; i < 100; ++i) {
      pool.Schedule([&] {
        ran.fetch_add(1);
        pool.Schedule([&] { ran.fetch_add(1); });
      });
    }
  }
  EXPECT_EQ(ran.load(), 200);
}

// Blocked workers are woken for new work, by a task or a ParallelFor, including the ones the
// caller does not wake itself (its first helpers wake the next).
TEST(ThreadPoolTest, BlockedWorkersWakeForTasksAndEveryHelperAParallelForMayUse) {
  for (absl::Duration spin : {absl::ZeroDuration(), absl::Microseconds(200)}) {
    ThreadPool pool(6, spin);
    for (int round = 0; round < 3; ++round) {
      absl::SleepFor(absl::Milliseconds(20));  // past any spin: the workers block
      absl::Notification ran;
      pool.Schedule([&] { ran.Notify(); });
      ASSERT_TRUE(ran.WaitForNotificationWithTimeout(absl::Seconds(10))) << "round " << round;

      absl::SleepFor(absl::Milliseconds(20));
      // Every index waits until `want` threads are inside at once: the caller and every helper it
      // may use (the cores but one, at most the pool).
      const int hw = static_cast<int>(std::thread::hardware_concurrency());
      const int want = std::min(6, std::max(1, hw - 1)) + 1;
      std::atomic<int> inside{0};
      std::atomic<bool> all_met{true};
      pool.ParallelFor(want, [&](int64_t) {
        inside.fetch_add(1);
        const absl::Time deadline = absl::Now() + absl::Seconds(10);
        while (inside.load() < want && absl::Now() < deadline) std::this_thread::yield();
        if (inside.load() < want) all_met = false;
      });
      EXPECT_TRUE(all_met.load()) << "round " << round << ": only " << inside.load() << " of "
                                  << want << " threads joined";
    }
  }
}

TEST(ThreadPoolTest, SpinningPoolRunsBackToBackWorkAndStopsPromptly) {
  const absl::Time start = absl::Now();
  {
    ThreadPool pool(3, absl::Milliseconds(50));
    for (int round = 0; round < 200; ++round) {
      std::atomic<int64_t> sum{0};
      pool.ParallelFor(64, [&](int64_t i) { sum.fetch_add(i); });
      ASSERT_EQ(sum.load(), 64 * 63 / 2);
    }
    std::atomic<int> ran{0};
    for (int i = 0; i < 50; ++i) pool.Schedule([&] { ran.fetch_add(1); });
    while (ran.load() < 50) std::this_thread::yield();
  }  // the destructor ends the workers' spin, not waits it out forever
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
}

}  // namespace
}  // namespace kvrecall
