#include "common/metrics.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvrecall {

void Counter::Add(double v) {
  double cur = value_.load();
  while (!value_.compare_exchange_weak(cur, cur + v)) {
  }
}

void Gauge::Add(double v) {
  double cur = value_.load();
  while (!value_.compare_exchange_weak(cur, cur + v)) {
  }
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), buckets_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double v) {
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  absl::MutexLock lock(&mu_);
  ++buckets_[i];
  sum_ += v;
  ++count_;
}

uint64_t Histogram::count() const {
  absl::MutexLock lock(&mu_);
  return count_;
}

std::string Histogram::Render(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  std::string out;
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += buckets_[i];
    absl::StrAppend(&out, name, "_bucket{le=\"", bounds_[i], "\"} ", cum, "\n");
  }
  cum += buckets_.back();
  absl::StrAppend(&out, name, "_bucket{le=\"+Inf\"} ", cum, "\n", name, "_sum ", sum_, "\n", name,
                  "_count ", count_, "\n");
  return out;
}

Metrics& Metrics::Global() {
  static Metrics* m = new Metrics();
  return *m;
}

Counter* Metrics::GetCounter(const std::string& name, const std::string& help) {
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[name];
  if (!e.counter) {
    e.help = help;
    e.type = "counter";
    e.counter = std::make_unique<Counter>();
  }
  return e.counter.get();
}

Gauge* Metrics::GetGauge(const std::string& name, const std::string& help) {
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[name];
  if (!e.gauge) {
    e.help = help;
    e.type = "gauge";
    e.gauge = std::make_unique<Gauge>();
  }
  return e.gauge.get();
}

Histogram* Metrics::GetHistogram(const std::string& name, const std::string& help,
                                 std::vector<double> bounds) {
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[name];
  if (!e.histogram) {
    if (bounds.empty()) {
      for (double b = 50e-6; b < 10.0; b *= 2) bounds.push_back(b);
    }
    e.help = help;
    e.type = "histogram";
    e.histogram = std::make_unique<Histogram>(std::move(bounds));
  }
  return e.histogram.get();
}

void Metrics::SetGaugeReader(const std::string& name, const std::string& help,
                             std::function<double()> read) {
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[name];
  e.help = help;
  e.type = "gauge";
  e.reader = std::move(read);
}

std::string Metrics::RenderPrometheus() const {
  absl::MutexLock lock(&mu_);
  std::string out;
  for (const auto& [name, e] : entries_) {
    absl::StrAppend(&out, "# HELP ", name, " ", e.help, "\n# TYPE ", name, " ", e.type, "\n");
    if (e.counter) absl::StrAppend(&out, name, " ", e.counter->value(), "\n");
    if (e.gauge) absl::StrAppend(&out, name, " ", e.gauge->value(), "\n");
    if (e.reader) absl::StrAppend(&out, name, " ", e.reader(), "\n");
    if (e.histogram) out += e.histogram->Render(name);
  }
  return out;
}

}  // namespace kvrecall
