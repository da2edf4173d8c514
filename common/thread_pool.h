// A fixed-size thread pool for CPU work (retrieval scans, model math).
//
// Thread safety: Schedule and ParallelFor may be called from any thread, also from tasks.
// The destructor waits for queued tasks to finish.
#ifndef KVRECALL_COMMON_THREAD_POOL_H_
#define KVRECALL_COMMON_THREAD_POOL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvrecall {

class ThreadPool {
 public:
  // num_threads <= 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int num_threads);
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
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_THREAD_POOL_H_
