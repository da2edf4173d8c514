// A small metrics registry rendered in the Prometheus text exposition format (version 0.0.4).
//
//   static Counter* bytes = Metrics::Global().GetCounter("kvrecall_bytes_stored_total", "help");
//   bytes->Add(n);
//
// Metric objects live as long as the registry; Get* returns the same object for the same name.
// Thread safety: everything is safe to use concurrently.
#ifndef KVRECALL_COMMON_METRICS_H_
#define KVRECALL_COMMON_METRICS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvrecall {

class Counter {
 public:
  void Add(double v = 1);
  double value() const { return value_.load(); }

 private:
  std::atomic<double> value_{0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v); }
  void Add(double v);
  double value() const { return value_.load(); }

 private:
  std::atomic<double> value_{0};
};

// Cumulative histogram with fixed upper bounds (seconds for latencies).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  std::string Render(const std::string& name) const;
  uint64_t count() const;

 private:
  const std::vector<double> bounds_;
  mutable absl::Mutex mu_;
  std::vector<uint64_t> buckets_ ABSL_GUARDED_BY(mu_);  // bounds_.size() + 1 (last = +Inf)
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t count_ ABSL_GUARDED_BY(mu_) = 0;
};

class Metrics {
 public:
  static Metrics& Global();
  Counter* GetCounter(const std::string& name, const std::string& help);
  Gauge* GetGauge(const std::string& name, const std::string& help);
  // Default bounds: 50us .. 10s, roughly x2 apart.
  Histogram* GetHistogram(const std::string& name, const std::string& help,
                          std::vector<double> bounds = {});
  // A gauge whose value `read` returns when the registry is rendered, for state that is kept
  // elsewhere (hot-path counters sharded per thread): nothing is set per event. A second call
  // with the same name replaces the reader. `read` must stay callable for the process's life
  // and be thread-safe.
  void SetGaugeReader(const std::string& name, const std::string& help,
                      std::function<double()> read);
  std::string RenderPrometheus() const;

 private:
  struct Entry {
    std::string help;
    std::string type;
    std::function<double()> reader;
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
  };
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_METRICS_H_
