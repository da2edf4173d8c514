// A fixed-size thread pool for CPU work (retrieval scans, row copies, model math).
//
// ParallelFor is the latency-critical path: a Retrieve runs a few of them back to back, each a
// few tens of microseconds of work spread over every core. A worker blocked in the kernel takes
// 10-50 µs to wake on a server (longer in a VM), and the old design's wake-one-per-queued-task
// chain made the last of 16 helpers start ~130 µs after the call (kvrecall-bench stream, H100
// host). So:
//   - a ParallelFor is one job that every idle worker joins (claims its indices from a shared
//     counter), not one queued task per helper; the job list is under a SpinLock, as the
//     helpers all reach for it at once;
//   - idle workers wait on one futex word that every new job or task bumps. Waking one costs its
//     waker 1-2 µs, so a ParallelFor's caller wakes two and each helper that joins wakes up to
//     two more (a tree), up to the helpers the job can use: at most the cores but one, as the
//     caller works too;
//   - with `spin` > 0, a worker that runs out of work keeps polling for new work (yielding its
//     core to any other runnable thread between polls) for that long before it blocks, so calls
//     that follow each other closely (a decode step's layers) find the pool awake.
//
// Thread safety: Schedule and ParallelFor may be called from any thread, also from tasks.
// The destructor waits for queued tasks to finish.
#ifndef KVRECALL_COMMON_THREAD_POOL_H_
#define KVRECALL_COMMON_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"
#include "common/spin_lock.h"

namespace kvrecall {

class ThreadPool {
 public:
  // num_threads <= 0 means std::thread::hardware_concurrency(). spin: how long an idle worker
  // polls for new work before it blocks (zero: it blocks at once).
  explicit ThreadPool(int num_threads, absl::Duration spin = absl::ZeroDuration());
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(threads_.size()); }

  // Runs `fn` on a pool thread some time later.
  void Schedule(std::function<void()> fn);

  // Calls fn(i) for every i in [0, n), spread over the pool and the calling thread; returns when
  // all calls returned. Safe to call from inside a pool task (the caller helps, so no deadlock).
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  struct Job;
  enum class Ran { kSomething, kNothing, kStop };
  void WorkerLoop();
  // Runs one job's remaining indices or one task; kStop once stopping with nothing left.
  Ran RunOne();
  // Publishes new work: wakes up to `wanted` blocked workers.
  void Wake(int wanted);

  SpinLock mu_;  // held for a few dozen ns at a time, by every worker at once (spin_lock.h)
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  // ParallelFors that may still have unclaimed indices, oldest first.
  std::vector<std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Bumped after every new job or task; idle workers poll it, blocked ones wait on it (a futex).
  std::atomic<int32_t> work_{0};
  std::atomic<int32_t> blocked_{0};  // workers in work_.wait
  const int64_t spin_ns_;
  const int max_helpers_;  // per ParallelFor: the cores but one (the caller's)
  std::vector<std::thread> threads_;
};

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_THREAD_POOL_H_
