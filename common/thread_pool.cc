#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <memory>

namespace kvrecall {

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (auto& t : threads_) t.join();
}

void ThreadPool::Schedule(std::function<void()> fn) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(fn));
}

void ThreadPool::WorkerLoop() {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ThreadPool* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) {
            return p->stopping_ || !p->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1) {
    fn(0);
    return;
  }
  // Helpers that start late (after every index was claimed) only touch `state`, which they
  // share ownership of, so the caller waits just for the helpers that are still inside fn.
  // The caller claims indices too, so this never deadlocks when called from a pool task.
  struct State {
    std::atomic<int64_t> next{0};
    absl::Mutex mu;
    int active ABSL_GUARDED_BY(mu) = 0;
  };
  auto state = std::make_shared<State>();
  const std::function<void(int64_t)>* body = &fn;
  const int helpers = static_cast<int>(std::min<int64_t>(n - 1, size()));
  for (int h = 0; h < helpers; ++h) {
    Schedule([state, n, body] {
      {
        absl::MutexLock lock(&state->mu);
        if (state->next.load() >= n) return;
        ++state->active;
      }
      for (int64_t i; (i = state->next.fetch_add(1)) < n;) (*body)(i);
      absl::MutexLock lock(&state->mu);
      --state->active;
    });
  }
  for (int64_t i; (i = state->next.fetch_add(1)) < n;) fn(i);
  absl::MutexLock lock(&state->mu);
  State* st = state.get();
  state->mu.Await(absl::Condition(
      +[](State* s) ABSL_NO_THREAD_SAFETY_ANALYSIS { return s->active == 0; }, st));
}

}  // namespace kvrecall
