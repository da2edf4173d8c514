// The p-quantile (0 <= p <= 1) of a sample by the nearest rank below p * n; 0 for no samples.
// Shared by the benchmarks that report p50/p99 latencies (rpc, stream).
#ifndef KVRECALL_BENCH_PERCENTILE_H_
#define KVRECALL_BENCH_PERCENTILE_H_

#include <algorithm>
#include <vector>

namespace kvrecall::bench {

inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_PERCENTILE_H_
