#include "bench/transport_bench.h"

#include "bench/flag_map.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "transport/transport.h"

namespace kvrecall::bench {
namespace {

using transport::PutOp;
using transport::RegisteredRegion;
using transport::RemoteWriter;
using transport::Transport;
using Clock = std::chrono::steady_clock;

// Distinct op lists each thread cycles through, so consecutive calls do not hit the same rows.
constexpr int kBatchesPerThread = 8;

struct PhaseResult {
  int64_t calls = 0;
  double seconds = 0;
  std::vector<double> latencies_us;  // one per call
};

// Runs `threads` callers, caller t cycling over batches[t], until `seconds` have passed.
absl::StatusOr<PhaseResult> RunPhase(const std::vector<std::unique_ptr<RemoteWriter>>& writers,
                                     const std::vector<std::vector<std::vector<PutOp>>>& batches,
                                     double seconds) {
  const int threads = static_cast<int>(writers.size());
  std::vector<PhaseResult> per_thread(threads);
  std::vector<absl::Status> statuses(threads);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      const auto start = Clock::now();
      const auto end = start + std::chrono::duration<double>(seconds);
      PhaseResult& r = per_thread[t];
      auto now = start;
      for (int64_t call = 0; now < end; ++call) {
        const auto& ops = batches[t][call % batches[t].size()];
        const auto before = Clock::now();
        statuses[t] = writers[t]->PutAll(ops);
        now = Clock::now();
        if (!statuses[t].ok()) break;
        r.latencies_us.push_back(std::chrono::duration<double, std::micro>(now - before).count());
        ++r.calls;
      }
      r.seconds = std::chrono::duration<double>(now - start).count();
    });
  }
  while (ready.load() < threads) std::this_thread::yield();
  go.store(true, std::memory_order_release);
  for (auto& w : workers) w.join();

  PhaseResult total;
  for (int t = 0; t < threads; ++t) {
    RETURN_IF_ERROR(statuses[t]);
    total.calls += per_thread[t].calls;
    total.seconds = std::max(total.seconds, per_thread[t].seconds);
    total.latencies_us.insert(total.latencies_us.end(), per_thread[t].latencies_us.begin(),
                              per_thread[t].latencies_us.end());
  }
  return total;
}

nlohmann::json Latency(std::vector<double> us) {
  if (us.empty()) return nullptr;
  std::sort(us.begin(), us.end());
  auto at = [&us](double q) {
    return us[std::min(us.size() - 1, static_cast<size_t>(q * static_cast<double>(us.size())))];
  };
  return {{"p50", at(0.50)}, {"p99", at(0.99)}, {"max", us.back()}};
}

void FillPattern(uint8_t* data, size_t bytes, uint32_t salt) {
  for (size_t i = 0; i < bytes; ++i) {
    data[i] = static_cast<uint8_t>(1 + (i * 131 + i / 512 * 7 + salt) % 255);
  }
}

}  // namespace

absl::StatusOr<TransportBenchOptions> ParseTransportBenchFlags(
    const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(FlagMap f, FlagMap::Parse(args));
  TransportBenchOptions o;
  RETURN_IF_ERROR(f.Get("transports", &o.transports));
  RETURN_IF_ERROR(f.Get("net_devices", &o.net_devices));
  RETURN_IF_ERROR(f.Get("row_bytes", &o.row_bytes));
  RETURN_IF_ERROR(f.Get("rows_per_put_batch", &o.rows_per_put_batch));
  RETURN_IF_ERROR(f.Get("large_put_bytes", &o.large_put_bytes));
  RETURN_IF_ERROR(f.Get("region_bytes", &o.region_bytes));
  RETURN_IF_ERROR(f.Get("seconds", &o.seconds));
  RETURN_IF_ERROR(f.Get("threads", &o.threads));
  RETURN_IF_ERROR(f.Get("seed", &o.seed));
  RETURN_IF_ERROR(f.CheckAllUsed());
  return o;
}

absl::StatusOr<nlohmann::json> RunTransportBench(const TransportBenchOptions& o) {
  if (o.row_bytes == 0 || o.rows_per_put_batch <= 0 || o.threads <= 0 || !(o.seconds > 0) ||
      o.region_bytes < o.row_bytes * static_cast<size_t>(o.rows_per_put_batch) ||
      o.region_bytes < o.large_put_bytes) {
    return absl::InvalidArgumentError("inconsistent transport bench options");
  }
  const bool inproc = o.transports == "inproc";
  std::unique_ptr<Transport> receiver;
  std::unique_ptr<Transport> sender_owned;
  if (inproc) {
    receiver = transport::CreateInProcessTransport();
  } else {
    transport::UcxOptions ucx;
    ucx.transports = o.transports;
    ucx.net_devices = o.net_devices;
    ASSIGN_OR_RETURN(receiver, transport::CreateUcxTransport(ucx));
    ASSIGN_OR_RETURN(sender_owned, transport::CreateUcxTransport(ucx));
  }
  // The in-process transport only connects to its own regions.
  Transport* sender = inproc ? receiver.get() : sender_owned.get();

  ASSIGN_OR_RETURN(std::unique_ptr<RegisteredRegion> region,
                   receiver->AllocateRegion(o.region_bytes));
  std::vector<std::unique_ptr<RemoteWriter>> writers;
  for (int t = 0; t < o.threads; ++t) {
    ASSIGN_OR_RETURN(auto writer, sender->Connect(region->Describe()));
    writers.push_back(std::move(writer));
  }

  // Scattered rows: thread t's batch b takes the next rows_per_put_batch slots of one random
  // permutation of all row slots, so rows within a batch (and, while they fit, across threads
  // and batches) are distinct.
  const size_t rows = static_cast<size_t>(o.rows_per_put_batch);
  const size_t slots = o.region_bytes / o.row_bytes;
  std::vector<size_t> permutation(slots);
  std::iota(permutation.begin(), permutation.end(), 0);
  std::mt19937_64 rng(o.seed);
  std::shuffle(permutation.begin(), permutation.end(), rng);
  std::vector<std::unique_ptr<RegisteredRegion>> staging;  // one per thread, registered
  std::vector<std::vector<std::vector<PutOp>>> scattered(o.threads);
  size_t next = 0;
  for (int t = 0; t < o.threads; ++t) {
    ASSIGN_OR_RETURN(auto source, sender->AllocateRegion(rows * o.row_bytes));
    FillPattern(source->data(), source->size(), static_cast<uint32_t>(t));
    for (int b = 0; b < kBatchesPerThread; ++b) {
      std::vector<PutOp> ops(rows);
      for (size_t i = 0; i < rows; ++i) {
        ops[i] = PutOp{source->data() + i * o.row_bytes, o.row_bytes,
                       permutation[next++ % slots] * o.row_bytes};
      }
      scattered[t].push_back(std::move(ops));
    }
    staging.push_back(std::move(source));
  }
  ASSIGN_OR_RETURN(PhaseResult s, RunPhase(writers, scattered, o.seconds));
  const double s_rows = static_cast<double>(s.calls) * static_cast<double>(rows);
  const double s_bytes = s_rows * static_cast<double>(o.row_bytes);

  nlohmann::json out = {
      {"bench", "transport"},
      {"transport", inproc ? "inproc" : "ucx"},
      {"tls", inproc ? "" : o.transports},
      {"same_process", true},
      {"note",
       "sender and receiver are two transport instances in one process (UCX: two workers, each "
       "with a progress thread); ucx_perftest runs client and server as separate processes"},
      {"options",
       {{"row_bytes", o.row_bytes},
        {"rows_per_put_batch", o.rows_per_put_batch},
        {"large_put_bytes", o.large_put_bytes},
        {"region_bytes", o.region_bytes},
        {"seconds", o.seconds},
        {"threads", o.threads},
        {"net_devices", o.net_devices}}},
      {"scattered",
       {{"row_bytes", o.row_bytes},
        {"rows_per_batch", o.rows_per_put_batch},
        {"threads", o.threads},
        {"calls", s.calls},
        {"rows", s_rows},
        {"seconds", s.seconds},
        {"rows_per_s", s_rows / s.seconds},
        {"gb_per_s", s_bytes / s.seconds / 1e9},
        {"mib_per_s", s_bytes / s.seconds / (1 << 20)},
        {"latency_us", Latency(std::move(s.latencies_us))}}},
  };

  if (o.large_put_bytes > 0) {
    const size_t large_slots = o.region_bytes / o.large_put_bytes;
    std::vector<std::unique_ptr<RegisteredRegion>> large_sources;
    std::vector<std::vector<std::vector<PutOp>>> contiguous(o.threads);
    for (int t = 0; t < o.threads; ++t) {
      ASSIGN_OR_RETURN(auto source, sender->AllocateRegion(o.large_put_bytes));
      FillPattern(source->data(), source->size(), static_cast<uint32_t>(100 + t));
      for (int b = 0; b < kBatchesPerThread; ++b) {
        const size_t slot = static_cast<size_t>(t * kBatchesPerThread + b) % large_slots;
        contiguous[t].push_back(
            {PutOp{source->data(), o.large_put_bytes, slot * o.large_put_bytes}});
      }
      large_sources.push_back(std::move(source));
    }
    ASSIGN_OR_RETURN(PhaseResult c, RunPhase(writers, contiguous, o.seconds));
    const double c_bytes = static_cast<double>(c.calls) * static_cast<double>(o.large_put_bytes);
    out["contiguous"] = {{"put_bytes", o.large_put_bytes},
                         {"threads", o.threads},
                         {"calls", c.calls},
                         {"seconds", c.seconds},
                         {"gb_per_s", c_bytes / c.seconds / 1e9},
                         {"mib_per_s", c_bytes / c.seconds / (1 << 20)},
                         {"latency_us", Latency(std::move(c.latencies_us))}};
  }

  // Byte-exact check of one scattered batch with a fresh pattern.
  FillPattern(staging[0]->data(), staging[0]->size(), 0xA5);
  RETURN_IF_ERROR(writers[0]->PutAll(scattered[0][0]));
  bool verified = true;
  for (const PutOp& op : scattered[0][0]) {
    verified = verified && std::memcmp(region->data() + op.remote_offset, op.src, op.length) == 0;
  }
  out["verified"] = verified;
  if (!verified) return absl::DataLossError("transport bench: verification batch mismatch");
  return out;
}

}  // namespace kvrecall::bench
