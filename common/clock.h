// Injected time. Code that needs "now" takes a Clock*; tests pass a FakeClock and advance it.
//
// Thread safety: all methods are safe to call concurrently.
#ifndef KVRECALL_COMMON_CLOCK_H_
#define KVRECALL_COMMON_CLOCK_H_

#include <atomic>
#include <cstdint>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvrecall {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
  // Monotonic nanoseconds for measuring durations.
  virtual int64_t MonotonicNanos() const = 0;

  // The process-wide real clock (never null, never destroyed).
  static Clock* Real();
};

// A clock that only moves when told to. Starts at the Unix epoch + 1e9 s.
class FakeClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::FromUnixNanos(nanos_.load()); }
  int64_t MonotonicNanos() const override { return nanos_.load(); }
  void Advance(absl::Duration d) { nanos_.fetch_add(absl::ToInt64Nanoseconds(d)); }

 private:
  std::atomic<int64_t> nanos_{int64_t{1'000'000'000} * 1'000'000'000};
};

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_CLOCK_H_
