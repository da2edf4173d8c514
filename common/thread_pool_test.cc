#include "common/thread_pool.h"

#include <atomic>
#include <thread>
#include <vector>

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

}  // namespace
}  // namespace kvrecall
