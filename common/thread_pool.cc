#include "common/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <utility>

namespace kvrecall {
namespace {

int64_t SteadyNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Polls `ready` for up to `spin_ns`, yielding the core between polls (another runnable thread
// on it, such as the caller a worker is waiting for, runs first). True once ready.
template <typename Ready>
bool SpinUntil(int64_t spin_ns, Ready ready) {
  if (ready()) return true;
  if (spin_ns <= 0) return false;
  const int64_t deadline = SteadyNanos() + spin_ns;
  do {
    std::this_thread::yield();
    if (ready()) return true;
  } while (SteadyNanos() < deadline);
  return false;
}

// Blocked workers a ParallelFor's caller wakes, and each helper that joins it after them.
constexpr int kWakeFanout = 2;

}  // namespace

// One ParallelFor: its caller and up to max_helpers workers claim indices from `next`.
struct ThreadPool::Job {
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;
  int max_helpers = 0;
  int helpers = 0;  // workers that joined; guarded by the pool's mu_
  std::atomic<int64_t> next{0};
  std::atomic<int32_t> active{0};  // joined workers still claiming

  void Claim() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) (*fn)(i);
  }
};

ThreadPool::ThreadPool(int num_threads, absl::Duration spin)
    : spin_ns_(std::max<int64_t>(0, absl::ToInt64Nanoseconds(spin))),
      max_helpers_(std::max(1, static_cast<int>(std::thread::hardware_concurrency()) - 1)) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    SpinLockHolder lock(&mu_);
    stopping_ = true;
  }
  Wake(size());
  for (auto& t : threads_) t.join();
}

void ThreadPool::Wake(int wanted) {
  // Pairs with WorkerLoop: a worker counts itself in blocked_ before it checks work_ (in the
  // wait); here work_ moves before blocked_ is read. So either this sees the worker blocked, or
  // the worker sees the new work_ and does not block.
  work_.fetch_add(1, std::memory_order_seq_cst);
  const int32_t blocked = blocked_.load(std::memory_order_seq_cst);
  if (blocked == 0) return;
  if (wanted >= blocked) {
    work_.notify_all();
  } else {
    for (int w = 0; w < wanted; ++w) work_.notify_one();
  }
}

void ThreadPool::Schedule(std::function<void()> fn) {
  {
    SpinLockHolder lock(&mu_);
    queue_.push_back(std::move(fn));
  }
  Wake(1);
}

ThreadPool::Ran ThreadPool::RunOne() {
  std::shared_ptr<Job> job;
  std::function<void()> task;
  int more = 0;  // helpers the job still wants
  {
    SpinLockHolder lock(&mu_);
    // Jobs first: their callers are waiting.
    for (size_t j = 0; j < jobs_.size();) {
      Job& candidate = *jobs_[j];
      if (candidate.next.load(std::memory_order_relaxed) >= candidate.n) {
        jobs_.erase(jobs_.begin() + static_cast<std::ptrdiff_t>(j));  // every index claimed
        continue;
      }
      if (candidate.helpers < candidate.max_helpers) {
        ++candidate.helpers;
        candidate.active.fetch_add(1, std::memory_order_relaxed);
        job = jobs_[j];
        more = std::min(kWakeFanout, candidate.max_helpers - candidate.helpers);
        break;
      }
      ++j;
    }
    if (job == nullptr) {
      if (queue_.empty()) return stopping_ ? Ran::kStop : Ran::kNothing;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
  }
  if (job != nullptr) {
    if (more > 0) Wake(more);  // pass the wake-up on (a tree: the caller woke only a few)
    job->Claim();
    // Release: the caller, seeing active reach 0, sees every write fn made here.
    if (job->active.fetch_sub(1, std::memory_order_acq_rel) == 1) job->active.notify_all();
  } else {
    task();
  }
  return Ran::kSomething;
}

void ThreadPool::WorkerLoop() {
  while (true) {
    const int32_t seen = work_.load(std::memory_order_acquire);
    const Ran ran = RunOne();
    if (ran == Ran::kStop) return;
    if (ran == Ran::kSomething) continue;
    // Idle: poll, then block, until work_ moves past `seen` (work published after RunOne looked
    // has moved it already).
    if (SpinUntil(spin_ns_, [&] { return work_.load(std::memory_order_acquire) != seen; }))
      continue;
    blocked_.fetch_add(1, std::memory_order_seq_cst);
    work_.wait(seen, std::memory_order_seq_cst);
    blocked_.fetch_sub(1, std::memory_order_relaxed);
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1) {
    fn(0);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  // The caller works too: with more helpers than the other cores, one of them would wait for a
  // core until a busy thread's index is done (the pool's threads and the caller are one more than
  // the cores by default).
  job->max_helpers = static_cast<int>(std::min<int64_t>({n - 1, size(), max_helpers_}));
  {
    SpinLockHolder lock(&mu_);
    jobs_.push_back(job);
  }
  // Waking a blocked thread costs its waker ~1-2 µs; the first helpers wake the next ones.
  Wake(std::min(kWakeFanout, job->max_helpers));
  // The caller claims indices too, so this never deadlocks when called from a pool task.
  job->Claim();
  {
    // No worker joins after this; wait only for those that did and are still inside fn.
    SpinLockHolder lock(&mu_);
    std::erase(jobs_, job);
  }
  if (SpinUntil(spin_ns_, [&] { return job->active.load(std::memory_order_acquire) == 0; })) return;
  for (int32_t a; (a = job->active.load(std::memory_order_acquire)) != 0;) {
    job->active.wait(a, std::memory_order_acquire);
  }
}

}  // namespace kvrecall
