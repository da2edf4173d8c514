#include "bench/stream_bench.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "bench/flag_map.h"
#include "bench/percentile.h"
#include "bench/perftest_runner.h"
#include "common/clock.h"
#include "common/logging.h"
#include "common/model_spec.h"
#include "common/status_macros.h"
#include "kvstore/node.h"
#include "transport/transport.h"

namespace kvrecall::bench {
namespace {

using SteadyClock = std::chrono::steady_clock;
constexpr char kTenant[] = "stream-bench";
constexpr char kWorker[] = "stream-bench-worker";

absl::StatusOr<StreamBenchOptions> ParseOptions(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(FlagMap f, FlagMap::Parse(args));
  StreamBenchOptions o;
  std::string sizes;
  RETURN_IF_ERROR(f.Get("tls", &o.tls));
  RETURN_IF_ERROR(f.Get("net_devices", &o.net_devices));
  RETURN_IF_ERROR(f.Get("entries", &o.entries));
  RETURN_IF_ERROR(f.Get("kv_heads", &o.kv_heads));
  RETURN_IF_ERROR(f.Get("group", &o.group));
  RETURN_IF_ERROR(f.Get("head_dim", &o.head_dim));
  RETURN_IF_ERROR(f.Get("message_sizes", &sizes));
  RETURN_IF_ERROR(f.Get("seconds", &o.seconds));
  RETURN_IF_ERROR(f.Get("iterations", &o.iterations));
  RETURN_IF_ERROR(f.Get("warmup", &o.warmup));
  RETURN_IF_ERROR(f.Get("windows", &o.windows));
  RETURN_IF_ERROR(f.Get("drift", &o.drift));
  RETURN_IF_ERROR(f.Get("steady_budget", &o.steady_budget));
  RETURN_IF_ERROR(f.Get("perftest", &o.perftest));
  RETURN_IF_ERROR(f.Get("perftest_iters", &o.perftest_iters));
  RETURN_IF_ERROR(f.Get("perftest_timeout", &o.perftest_timeout));
  RETURN_IF_ERROR(f.Get("perftest_runs", &o.perftest_runs));
  RETURN_IF_ERROR(f.Get("perftest_binary", &o.perftest_binary));
  RETURN_IF_ERROR(f.Get("threads", &o.threads));
  RETURN_IF_ERROR(f.Get("spin_us", &o.spin_us));
  RETURN_IF_ERROR(f.Get("seed", &o.seed));
  RETURN_IF_ERROR(f.CheckAllUsed());
  if (!sizes.empty()) {
    o.message_sizes.clear();
    for (absl::string_view s : absl::StrSplit(sizes, ',', absl::SkipWhitespace())) {
      int64_t v;
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(s), &v) || v <= 0) {
        return absl::InvalidArgumentError(absl::StrCat("--message_sizes: '", s, "' is not a positive byte count"));
      }
      o.message_sizes.push_back(v);
    }
  }
  if (o.message_sizes.empty()) return absl::InvalidArgumentError("--message_sizes is empty");
  if (o.tls.empty()) return absl::InvalidArgumentError("--tls must name a UCX transport list (e.g. tcp)");
  if (o.entries < 1 || o.entries > kvstore::kMaxRetrieveEntries || o.kv_heads < 1 || o.kv_heads > kMaxHeads ||
      o.group < 1 || o.kv_heads * o.group > kMaxHeads || o.head_dim < 2 || o.head_dim > kMaxHeadDim ||
      o.head_dim % 2 != 0) {
    return absl::InvalidArgumentError("need 1 <= entries, 1 <= kv_heads * group <= 1024, even head_dim in [2, 1024]");
  }
  if (o.iterations < 0 || o.warmup < 0 || (o.iterations == 0 && !(o.seconds > 0)) || o.windows < 2) {
    return absl::InvalidArgumentError("need iterations >= 0, warmup >= 0, seconds > 0 (or iterations > 0), windows >= 2");
  }
  if (!(o.drift > 0 && o.drift <= 1) || o.steady_budget < 0 || o.steady_budget > kvstore::kMaxBudget) {
    return absl::InvalidArgumentError("need 0 < drift <= 1 and 0 <= steady_budget <= 65536");
  }
  if (o.perftest_iters < 0 || !(o.perftest_timeout > 0) || o.perftest_runs < 1 ||
      o.perftest_runs > 99) {
    return absl::InvalidArgumentError(
        "need perftest_iters >= 0, perftest_timeout > 0 and 1 <= perftest_runs <= 99");
  }
  const int64_t pair = 2 * 2 * static_cast<int64_t>(o.head_dim);  // bf16 K + V row
  for (int64_t s : o.message_sizes) {
    if (s % pair != 0 || s / pair > kvstore::kMaxBudget) {
      return absl::InvalidArgumentError(absl::StrCat("--message_sizes: ", s, " is not a multiple of the ", pair,
                                                     " B row pair, or exceeds ", kvstore::kMaxBudget, " rows"));
    }
  }
  return o;
}


// Random finite bf16 values (|x| in about [2^-9, 2^4)), 4 per draw.
void FillBf16(std::mt19937_64& rng, uint8_t* dst, size_t bytes) {
  auto* p = reinterpret_cast<uint16_t*>(dst);
  const size_t n = bytes / 2;
  for (size_t i = 0; i < n; i += 4) {
    uint64_t r = rng();
    for (size_t k = 0; k < 4 && i + k < n; ++k, r >>= 16) {
      const uint16_t sign = static_cast<uint16_t>((r & 1) << 15);
      const uint16_t exp = static_cast<uint16_t>(118 + ((r >> 1) & 7) + ((r >> 4) & 3));  // 118..130
      const uint16_t mant = static_cast<uint16_t>((r >> 6) & 0x7f);
      p[i + k] = static_cast<uint16_t>(sign | (exp << 7) | mant);
    }
  }
}

struct Entry {
  std::string sequence_id;
  int kv_head = 0;
};

// The result of a run of Retrieve calls.
struct CallRun {
  int64_t calls = 0;
  double seconds = 0;  // sum of the timed calls' wall time
  double stream_seconds =
      0;  // of which the node's streaming stage (RetrieveOutcome::stream_micros)
  std::vector<double> latency_us;
  // Per timed call, the node's own phase times (RetrieveOutcome): its whole Retrieve, the reads
  // (pins), the search, the streaming stage and, of that, the slot plans.
  std::vector<double> node_us, read_us, search_us, stream_us, plan_us;
  int64_t rows_selected = 0;
  int64_t rows_sent = 0;
  uint64_t bytes = 0;
  kvstore::RetrieveOutcome last;
  std::vector<int64_t> last_begin;  // per entry: dest_row of the last call
};

class Bench {
 public:
  explicit Bench(const StreamBenchOptions& o) : o_(o), rng_(o.seed) {}

  absl::StatusOr<nlohmann::json> Run();

 private:
  // Sets up the node, its data and the worker region.
  absl::Status Setup();
  // `calls_timed` calls (or until `seconds`) after `warmup` untimed ones; range_of(call) gives
  // each call's candidate range start. Checks every outcome with `check`.
  absl::StatusOr<CallRun> Calls(int budget, uint64_t epoch, int warmup,
                                   const std::function<int64_t(int64_t)>& range_begin,
                                   const std::function<absl::Status(const kvstore::RetrieveOutcome&)>& check);
  kvstore::RetrieveArgs Args(int budget, uint64_t epoch, int64_t begin, bool with_worker);
  // The worker region holds, at each entry's dest_row, the rows the last call reported filled.
  absl::Status Verify(const CallRun& run, int budget);
  double PutAllGbps(int budget, int calls);
  // ucx_perftest at this size, --perftest_runs times: the median run; every run's GB/s, ascending,
  // in *all_gbps.
  absl::StatusOr<PerftestResult> Perftest(int64_t message_bytes, std::vector<double>* all_gbps);

  const StreamBenchOptions o_;
  std::mt19937_64 rng_;
  ModelSpec spec_;
  int64_t row_ = 0, pair_ = 0;
  int64_t max_budget_ = 0, tokens_ = 0;
  int sequences_ = 0;
  std::vector<Entry> entries_;
  std::vector<float> queries_;  // [entries][group][head_dim]
  std::unique_ptr<transport::Transport> node_transport_, worker_transport_;
  std::unique_ptr<kvstore::Node> node_;
  std::unique_ptr<transport::RegisteredRegion> region_;
  uint64_t call_seq_ = 0;
  double setup_seconds_ = 0;
};

absl::Status Bench::Setup() {
  const auto t0 = SteadyClock::now();
  spec_.model_id = "stream-bench";
  spec_.num_layers = 1;
  spec_.num_kv_heads = o_.kv_heads;
  spec_.num_q_heads = o_.kv_heads * o_.group;
  spec_.head_dim = o_.head_dim;
  spec_.kv_dtype = DType::kBF16;
  spec_.vocab_size = 1 << 20;
  row_ = static_cast<int64_t>(spec_.row_bytes());
  pair_ = 2 * row_;
  for (int64_t s : o_.message_sizes) max_budget_ = std::max(max_budget_, s / pair_);
  max_budget_ = std::max<int64_t>(max_budget_, o_.steady_budget);
  tokens_ = o_.windows * max_budget_;
  sequences_ = (o_.entries + o_.kv_heads - 1) / o_.kv_heads;

  transport::UcxOptions ucx;
  ucx.transports = o_.tls;
  ucx.net_devices = ResolveNetDevices(o_.tls, o_.net_devices);
  ASSIGN_OR_RETURN(node_transport_, transport::CreateUcxTransport(ucx));
  ASSIGN_OR_RETURN(worker_transport_, transport::CreateUcxTransport(ucx));

  kvstore::NodeOptions no;
  const int64_t slot = 2 * int64_t{o_.kv_heads} * 64 * row_;
  const int64_t blocks = (tokens_ + 63) / 64;
  no.memory_bytes = sequences_ * blocks * slot + (int64_t{64} << 20);
  no.auto_index = indexer::Method::kExact;  // no background index builds during the timing
  no.search_threads = o_.threads;
  if (o_.spin_us >= 0) no.search_spin = absl::Microseconds(o_.spin_us);
  node_ = std::make_unique<kvstore::Node>(no, node_transport_.get(), Clock::Real());
  RETURN_IF_ERROR(node_->arena_status());
  RETURN_IF_ERROR(node_->RegisterModel(spec_).status());

  KV_LOG(INFO) << "stream bench: " << sequences_ << " sequences x " << tokens_ << " tokens x " << o_.kv_heads
               << " kv-heads, head_dim " << o_.head_dim << " (" << (sequences_ * tokens_ * o_.kv_heads * pair_ >> 20)
               << " MiB), UCX_TLS=" << o_.tls;
  const int64_t chunk = std::min<int64_t>(tokens_, 4096);
  std::string keys(static_cast<size_t>(o_.kv_heads * chunk * row_), '\0');
  std::string values(keys.size(), '\0');
  for (int s = 0; s < sequences_; ++s) {
    const std::string id = absl::StrCat("stream-", s);
    std::vector<int32_t> token_ids(static_cast<size_t>(tokens_));
    for (auto& t : token_ids) t = static_cast<int32_t>(rng_() % spec_.vocab_size);
    RETURN_IF_ERROR(node_->OpenSequence({kTenant, spec_.model_id, id, token_ids}).status());
    ASSIGN_OR_RETURN(std::shared_ptr<kvstore::Sequence> seq, node_->FindSequence(kTenant, id));
    RETURN_IF_ERROR(seq->BeginAppend());
    for (int64_t start = 0; start < tokens_; start += chunk) {
      const int64_t n = std::min(chunk, tokens_ - start);
      const size_t bytes = static_cast<size_t>(o_.kv_heads * n * row_);
      FillBf16(rng_, reinterpret_cast<uint8_t*>(keys.data()), bytes);
      FillBf16(rng_, reinterpret_cast<uint8_t*>(values.data()), bytes);
      absl::Status st = seq->AppendChunk(0, start, n, absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(keys.data()), bytes),
                                         absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(values.data()), bytes));
      if (!st.ok()) {
        seq->AbortAppend();
        return st;
      }
    }
    RETURN_IF_ERROR(seq->CommitAppend().status());
  }
  for (int e = 0; e < o_.entries; ++e) entries_.push_back({absl::StrCat("stream-", e / o_.kv_heads), e % o_.kv_heads});
  std::normal_distribution<float> normal;
  queries_.resize(static_cast<size_t>(o_.entries) * o_.group * o_.head_dim);
  for (float& q : queries_) q = normal(rng_);

  ASSIGN_OR_RETURN(region_, worker_transport_->AllocateRegion(static_cast<size_t>(o_.entries * max_budget_ * pair_)));
  RETURN_IF_ERROR(node_->AttachWorker(kTenant, kWorker, region_->Describe()));
  setup_seconds_ = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  return absl::OkStatus();
}

kvstore::RetrieveArgs Bench::Args(int budget, uint64_t epoch, int64_t begin, bool with_worker) {
  kvstore::RetrieveArgs a;
  a.tenant = kTenant;
  a.layer = 0;
  a.budget = budget;
  a.method = kvstore::Method::kExact;
  if (with_worker) {
    a.worker_id = kWorker;
    a.call_seq = ++call_seq_;
  }
  const size_t qn = static_cast<size_t>(o_.group) * o_.head_dim;
  for (int e = 0; e < o_.entries; ++e) {
    kvstore::RetrieveEntryArgs ea;
    ea.sequence_id = entries_[e].sequence_id;
    ea.kv_head = entries_[e].kv_head;
    ea.queries = absl::MakeConstSpan(queries_.data() + e * qn, qn);
    ea.token_begin = begin;
    ea.token_end = begin + budget;
    ea.dest_row = static_cast<uint64_t>(e) * budget;
    ea.slot_epoch = with_worker ? epoch : 0;
    a.entries.push_back(std::move(ea));
  }
  return a;
}

absl::StatusOr<CallRun> Bench::Calls(int budget, uint64_t epoch, int warmup,
                                 const std::function<int64_t(int64_t)>& range_begin,
                                 const std::function<absl::Status(const kvstore::RetrieveOutcome&)>& check) {
  CallRun run;
  const auto deadline = SteadyClock::now() + std::chrono::duration<double>(o_.seconds);
  for (int64_t call = 0;; ++call) {
    const bool timed = call >= warmup;
    if (timed) {
      const int64_t done = call - warmup;
      if (o_.iterations > 0 ? done >= o_.iterations : (done >= 3 && SteadyClock::now() >= deadline)) break;
    }
    const kvstore::RetrieveArgs args = Args(budget, epoch, range_begin(call), /*with_worker=*/true);
    const auto t0 = SteadyClock::now();
    absl::StatusOr<kvstore::RetrieveOutcome> out = node_->Retrieve(args);
    const auto t1 = SteadyClock::now();
    if (!out.ok()) return out.status();
    RETURN_IF_ERROR(check(*out));
    if (timed) {
      const double us = std::chrono::duration<double, std::micro>(t1 - t0).count();
      run.latency_us.push_back(us);
      run.seconds += us * 1e-6;
      run.stream_seconds += static_cast<double>(out->stream_micros) * 1e-6;
      run.node_us.push_back(static_cast<double>(out->node_micros));
      run.read_us.push_back(static_cast<double>(out->read_micros));
      run.search_us.push_back(static_cast<double>(out->search_micros));
      run.stream_us.push_back(static_cast<double>(out->stream_micros));
      run.plan_us.push_back(static_cast<double>(out->stream_plan_micros));
      ++run.calls;
      run.rows_selected += out->rows_selected;
      run.rows_sent += out->rows_sent;
      run.bytes += out->bytes_streamed;
    }
    run.last = *std::move(out);
  }
  return run;
}

absl::Status Bench::Verify(const CallRun& run, int budget) {
  const uint8_t* base = region_->data();
  for (int e = 0; e < o_.entries; ++e) {
    const auto& ids = run.last.token_ids[e];
    const auto& slots = run.last.slots[e];
    const auto& fill = run.last.fill_slots[e];
    if (slots.size() != ids.size()) return absl::InternalError("slots and token ids differ in length");
    std::vector<int32_t> token_of_slot(static_cast<size_t>(budget), -1);
    for (size_t j = 0; j < ids.size(); ++j) token_of_slot.at(static_cast<size_t>(slots[j])) = ids[j];
    std::vector<int32_t> filled;
    for (int32_t s : fill) filled.push_back(token_of_slot.at(static_cast<size_t>(s)));
    if (filled.empty()) continue;
    std::string keys, values;
    RETURN_IF_ERROR(node_->ReadRows(kTenant, entries_[e].sequence_id, 0, entries_[e].kv_head, filled, &keys, &values));
    const uint8_t* dst = base + static_cast<size_t>(e) * budget * pair_;
    for (size_t j = 0; j < filled.size(); ++j) {
      if (std::memcmp(dst + j * pair_, keys.data() + j * row_, row_) != 0 ||
          std::memcmp(dst + j * pair_ + row_, values.data() + j * row_, row_) != 0) {
        return absl::InternalError(absl::StrCat("entry ", e, ": row ", j, " (token ", filled[j],
                                                ") in the worker region differs from Node::ReadRows"));
      }
    }
  }
  return absl::OkStatus();
}

// The transport alone, same shape: one PutAll of `entries` ops of budget × pair bytes each, from
// unregistered heap buffers (as StreamDeltas' staging), node transport → worker region.
double Bench::PutAllGbps(int budget, int calls) {
  absl::StatusOr<std::unique_ptr<transport::RemoteWriter>> writer = node_transport_->Connect(region_->Describe());
  if (!writer.ok()) return 0;
  std::vector<std::string> bufs(static_cast<size_t>(o_.entries), std::string(static_cast<size_t>(budget * pair_), 'x'));
  std::vector<transport::PutOp> ops;
  for (int e = 0; e < o_.entries; ++e) {
    ops.push_back({bufs[e].data(), bufs[e].size(), static_cast<uint64_t>(e) * budget * pair_});
  }
  if (!(*writer)->PutAll(ops).ok()) return 0;  // warm-up
  const auto t0 = SteadyClock::now();
  for (int c = 0; c < calls; ++c) {
    if (!(*writer)->PutAll(ops).ok()) return 0;
  }
  const double s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  return static_cast<double>(calls) * o_.entries * budget * pair_ / s / 1e9;
}

absl::StatusOr<PerftestResult> Bench::Perftest(int64_t message_bytes,
                                               std::vector<double>* all_gbps) {
  PerftestOptions p;
  p.binary = o_.perftest_binary;
  p.tls = o_.tls;
  p.net_devices = o_.net_devices;
  p.message_bytes = static_cast<size_t>(message_bytes);
  const int64_t target = ContainsTcp(o_.tls) ? (int64_t{128} << 20) : (int64_t{2} << 30);
  p.iterations = o_.perftest_iters > 0 ? o_.perftest_iters : std::clamp<int64_t>(target / message_bytes, 20, 1000000);
  p.timeout = absl::Seconds(o_.perftest_timeout);
  KV_LOG(INFO) << "stream bench: ucx_perftest -t ucp_put_bw -s " << message_bytes << " -n "
               << p.iterations << " (UCX_TLS=" << o_.tls << "), " << o_.perftest_runs << " run(s)";
  std::vector<PerftestResult> runs;
  for (int r = 0; r < o_.perftest_runs; ++r) {
    ASSIGN_OR_RETURN(PerftestResult one, RunUcxPerftest(p));
    runs.push_back(one);
  }
  std::sort(runs.begin(), runs.end(), [](const PerftestResult& a, const PerftestResult& b) {
    return a.gb_per_s < b.gb_per_s;
  });
  all_gbps->clear();
  for (const PerftestResult& r : runs) all_gbps->push_back(r.gb_per_s);
  return runs[runs.size() / 2];  // the median (the upper middle one of an even count)
}

absl::StatusOr<nlohmann::json> Bench::Run() {
  RETURN_IF_ERROR(Setup());
  nlohmann::json j;
  j["bench"] = "stream";
  j["transport"] = absl::StrCat("ucx:", o_.tls);
  j["tls"] = o_.tls;
  j["net_devices"] = ResolveNetDevices(o_.tls, o_.net_devices);
  j["same_process"] = true;
  j["method"] = "exact";
  j["entries"] = o_.entries;
  j["sequences"] = sequences_;
  j["kv_heads"] = o_.kv_heads;
  j["group"] = o_.group;
  j["head_dim"] = o_.head_dim;
  j["threads"] = o_.threads;
  j["search_spin_us"] = absl::ToInt64Microseconds(node_->options().search_spin);
  j["row_bytes"] = row_;
  j["tokens_per_sequence"] = tokens_;
  j["setup_seconds"] = setup_seconds_;

  std::optional<std::string> perftest_missing;
  if (!o_.perftest) {
    perftest_missing = "skipped (--perftest=false)";
  } else if (absl::StatusOr<std::string> p = FindPerftest(o_.perftest_binary); !p.ok()) {
    perftest_missing = absl::StrCat("not installed: ", p.status().message());
    KV_LOG(WARNING) << "stream bench: ucx_perftest " << *perftest_missing << "; ucx_perftest_gbps will be null";
  }
  j["ucx_perftest_available"] = !perftest_missing.has_value();
  if (perftest_missing.has_value()) j["ucx_perftest_note"] = *perftest_missing;

  nlohmann::json sizes = nlohmann::json::array();
  std::optional<double> min_ratio;
  bool all_ratios = true;
  uint64_t epoch = 0;
  for (int64_t message_bytes : o_.message_sizes) {
    const int budget = static_cast<int>(message_bytes / pair_);
    ++epoch;
    KV_LOG(INFO) << "stream bench: message " << message_bytes << " B = " << budget << " rows x " << o_.entries
                 << " entries per call";
    const int64_t expect_rows = int64_t{o_.entries} * budget;
    auto check = [&](const kvstore::RetrieveOutcome& out) -> absl::Status {
      if (out.rows_sent != expect_rows || out.rows_selected != expect_rows ||
          out.bytes_streamed != static_cast<uint64_t>(expect_rows * pair_)) {
        return absl::InternalError(absl::StrCat("a call sent ", out.rows_sent, " rows (", out.bytes_streamed,
                                                " bytes) of ", out.rows_selected, " selected; expected all ",
                                                expect_rows, " rows new"));
      }
      return absl::OkStatus();
    };
    const int windows = o_.windows;
    ASSIGN_OR_RETURN(CallRun run, Calls(budget, epoch, o_.warmup,
                                           [&](int64_t call) { return (call % windows) * budget; }, check));
    RETURN_IF_ERROR(Verify(run, budget));

    // Where the time goes: the same calls without a worker (validation + exact search, no
    // streaming), and the transport alone with StreamDeltas' op shape.
    std::vector<double> ids_us;
    for (int c = 0; c < std::max<int64_t>(3, std::min<int64_t>(run.calls, 10)); ++c) {
      const kvstore::RetrieveArgs a = Args(budget, 0, (c % windows) * budget, /*with_worker=*/false);
      const auto t0 = SteadyClock::now();
      RETURN_IF_ERROR(node_->Retrieve(a).status());
      ids_us.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
    }
    const double putall = PutAllGbps(budget, static_cast<int>(std::clamp<int64_t>(run.calls, 3, 50)));

    nlohmann::json s;
    s["message_bytes"] = message_bytes;
    s["budget"] = budget;
    s["rows_per_call"] = expect_rows;
    s["bytes_per_call"] = expect_rows * pair_;
    s["calls"] = run.calls;
    s["seconds"] = run.seconds;
    s["rows_per_s"] = static_cast<double>(run.rows_sent) / run.seconds;
    s["stream_gbps"] = static_cast<double>(run.bytes) / run.seconds / 1e9;
    // The streaming stage alone, as the node timed it: slot plans, row copies or puts, results.
    s["stream_stage_gbps"] =
        run.stream_seconds > 0 ? static_cast<double>(run.bytes) / run.stream_seconds / 1e9 : 0.0;
    s["latency_us_p50"] = Percentile(run.latency_us, 0.5);
    s["latency_us_p99"] = Percentile(run.latency_us, 0.99);
    // The node's phases, as it timed them (p50 of each on its own, so they need not add up).
    s["phases_us_p50"] = {{"node", Percentile(run.node_us, 0.5)},
                          {"read", Percentile(run.read_us, 0.5)},
                          {"search", Percentile(run.search_us, 0.5)},
                          {"stream", Percentile(run.stream_us, 0.5)},
                          {"stream_plan", Percentile(run.plan_us, 0.5)}};
    // Breakdown (estimates from separate calls): ids_only = the same Retrieve without a worker
    // (validation, snapshots, exact search); the rest of a call is plan + pack + put + flush.
    const double ids50 = Percentile(ids_us, 0.5);
    const double rest50 = s["latency_us_p50"].get<double>() - ids50;
    s["ids_only_us_p50"] = ids50;
    s["stream_excl_search_gbps"] = rest50 > 0 ? static_cast<double>(expect_rows * pair_) / (rest50 * 1e3) : 0.0;
    s["putall_gbps"] = putall;
    s["verified"] = true;
    s["ucx_perftest_gbps"] = nullptr;
    s["stream_vs_perftest"] = nullptr;
    if (!perftest_missing.has_value()) {
      std::vector<double> perftest_runs;
      absl::StatusOr<PerftestResult> pt = Perftest(message_bytes, &perftest_runs);
      if (pt.ok()) {
        const double ratio = s["stream_gbps"].get<double>() / pt->gb_per_s;
        s["ucx_perftest_gbps"] = pt->gb_per_s;
        s["ucx_perftest_runs_gbps"] = perftest_runs;
        s["ucx_perftest"] = {{"iterations", pt->iterations}, {"mib_per_s", pt->mib_per_s},
                             {"latency_p50_us", pt->latency_p50_us}, {"latency_avg_us", pt->latency_avg_us},
                             {"msgs_per_s", pt->msgs_per_s}};
        s["stream_vs_perftest"] = ratio;
        s["excl_search_vs_perftest"] = s["stream_excl_search_gbps"].get<double>() / pt->gb_per_s;
        s["stream_stage_vs_perftest"] = s["stream_stage_gbps"].get<double>() / pt->gb_per_s;
        s["putall_vs_perftest"] = putall / pt->gb_per_s;
        if (message_bytes >= 262144) min_ratio = std::min(min_ratio.value_or(ratio), ratio);
      } else {
        KV_LOG(WARNING) << "stream bench: ucx_perftest failed: " << pt.status();
        s["ucx_perftest_error"] = pt.status().ToString();
        all_ratios = false;
      }
    }
    KV_LOG(INFO) << "stream bench: " << message_bytes << " B: " << s["stream_gbps"].get<double>() << " GB/s over "
                 << run.calls << " calls, p50 " << s["latency_us_p50"].get<double>() << " us; ucx_perftest "
                 << s["ucx_perftest_gbps"].dump();
    sizes.push_back(std::move(s));
  }
  j["sizes"] = std::move(sizes);
  if (min_ratio.has_value() && all_ratios) {
    j["target"] = {{"stream_vs_perftest_min_256k_plus", *min_ratio}, {"want", 0.8}, {"met", *min_ratio >= 0.8}};
  } else {
    j["target"] = nullptr;
  }

  if (o_.steady_budget > 0) {
    const int budget = o_.steady_budget;
    const int64_t shift = std::max<int64_t>(1, static_cast<int64_t>(o_.drift * budget + 0.5));
    ++epoch;
    // The range slides by `shift` per call, back and forth over the stored tokens (never jumping,
    // so every call after the first changes exactly `shift` tokens of each entry).
    const int64_t span = tokens_ - budget;
    auto begin_of = [&](int64_t call) {
      if (span <= 0) return int64_t{0};
      const int64_t pos = (call * shift) % (2 * span);
      return pos <= span ? pos : 2 * span - pos;
    };
    KV_LOG(INFO) << "stream bench: steady phase, budget " << budget << ", drift " << shift << " tokens per call";
    auto ok = [](const kvstore::RetrieveOutcome&) { return absl::OkStatus(); };
    ASSIGN_OR_RETURN(CallRun run, Calls(budget, epoch, std::max(1, o_.warmup), begin_of, ok));
    RETURN_IF_ERROR(Verify(run, budget));
    const int64_t full = int64_t{o_.entries} * budget;
    nlohmann::json st;
    st["budget"] = budget;
    st["drift"] = o_.drift;
    st["drift_tokens_per_call"] = shift;
    st["calls"] = run.calls;
    st["seconds"] = run.seconds;
    st["rows_selected_per_s"] = static_cast<double>(run.rows_selected) / run.seconds;
    st["rows_per_s"] = static_cast<double>(run.rows_sent) / run.seconds;
    st["bytes_per_call"] = static_cast<double>(run.bytes) / static_cast<double>(run.calls);
    st["full_bytes_per_call"] = full * pair_;
    st["fraction_sent"] = static_cast<double>(run.rows_sent) / static_cast<double>(run.rows_selected);
    st["stream_gbps"] = static_cast<double>(run.bytes) / run.seconds / 1e9;
    st["latency_us_p50"] = Percentile(run.latency_us, 0.5);
    st["latency_us_p99"] = Percentile(run.latency_us, 0.99);
    st["verified"] = true;
    j["steady"] = std::move(st);
  }
  j["note"] =
      "node and worker are two UCX transport instances in this process; ucx_perftest runs as two processes; "
      "stream_gbps = bytes put / wall time of Node::Retrieve (exact search over `budget` candidates, slot plan, "
      "packing, one put per entry, flush); GB = 1e9 bytes; ucx_perftest's MB/s is 2^20 B/s";
  return j;
}

}  // namespace

absl::StatusOr<nlohmann::json> RunStreamBench(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(StreamBenchOptions o, ParseOptions(args));
  Bench bench(o);
  return bench.Run();
}

}  // namespace kvrecall::bench
