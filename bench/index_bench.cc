#include "bench/index_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "indexer/exact.h"
#include "indexer/index.h"
#include "indexer/kernels.h"
#include "indexer/merged.h"
#include "indexer/quality.h"
#include "indexer/synthetic.h"

namespace kvrecall::bench {
namespace {

using Clock = std::chrono::steady_clock;
using indexer::Method;

struct Options {
  std::vector<Method> methods = {Method::kCtkvr};
  int64_t tokens = 98304;
  int budget = 1024;
  int head_dim = 128;
  int group = 4;
  int sinks = 16;
  int window = 256;
  int entries = 16;
  int repeats = 3;
  int threads = 0;
  int build_threads = 1;
  int build_repeats = 2;
  uint64_t seed = 1;
  DType dtype = DType::kBF16;
  int needles = 8;
  int prompt_queries = 1024;
  indexer::IndexOptions index;
  indexer::MergedOptions merged;
};

absl::StatusOr<Options> Parse(const std::vector<std::string>& args) {
  Options o;
  std::map<std::string, int64_t*> i64 = {{"tokens", &o.tokens}};
  std::map<std::string, int*> ints = {
      {"budget", &o.budget},
      {"head_dim", &o.head_dim},
      {"group", &o.group},
      {"sinks", &o.sinks},
      {"window", &o.window},
      {"entries", &o.entries},
      {"repeats", &o.repeats},
      {"threads", &o.threads},
      {"build_threads", &o.build_threads},
      {"build_repeats", &o.build_repeats},
      {"needles", &o.needles},
      {"prompt_queries", &o.prompt_queries},
      {"centroids", &o.index.ctkvr.centroids},
      {"list_size", &o.index.ctkvr.list_size},
      {"probe", &o.index.ctkvr.probe},
      {"tokens_per_cluster", &o.index.cluster.tokens_per_cluster},
      {"iterations", &o.index.cluster.iterations},
      {"append_every", &o.index.cluster.append_every},
      {"append_clusters", &o.index.cluster.append_clusters},
      {"chunk_tokens", &o.merged.chunk_tokens},
  };
  for (const std::string& raw : args) {
    absl::string_view a(raw);
    if (!absl::ConsumePrefix(&a, "--") || a == "json") continue;
    std::pair<std::string, std::string> kv = absl::StrSplit(a, absl::MaxSplits('=', 1));
    std::string name = kv.first;
    std::replace(name.begin(), name.end(), '-', '_');
    const std::string& value = kv.second;
    auto bad = [&] {
      return absl::InvalidArgumentError(
          absl::StrCat("index bench: bad value for --", name, ": '", value, "'"));
    };
    if (auto it = ints.find(name); it != ints.end()) {
      if (!absl::SimpleAtoi(value, it->second)) return bad();
    } else if (auto it64 = i64.find(name); it64 != i64.end()) {
      if (!absl::SimpleAtoi(value, it64->second)) return bad();
    } else if (name == "seed") {
      if (!absl::SimpleAtoi(value, &o.seed)) return bad();
      o.index.cluster.seed = o.seed;
    } else if (name == "keep_ratio") {
      if (!absl::SimpleAtod(value, &o.merged.keep_ratio)) return bad();
    } else if (name == "dtype") {
      ASSIGN_OR_RETURN(o.dtype, ParseDType(value));
    } else if (name == "method") {
      o.methods.clear();
      for (absl::string_view m : absl::StrSplit(value, ',')) {
        ASSIGN_OR_RETURN(Method mm, indexer::ParseMethod(m));
        if (mm != Method::kExact) o.methods.push_back(mm);
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat("index bench: unknown flag --", name));
    }
  }
  if (o.tokens <= 0 || o.budget <= 0 || o.head_dim <= 0 || o.group <= 0 || o.entries <= 0 ||
      o.repeats <= 0 || o.threads < 0 || o.build_threads <= 0 || o.build_repeats <= 0 ||
      o.sinks < 0 || o.window < 0) {
    return absl::InvalidArgumentError(
        "index bench: tokens, budget, head_dim, group, entries, repeats, build_threads must be > "
        "0");
  }
  if (o.entries > o.window)
    return absl::InvalidArgumentError("index bench: entries must be <= window");
  return o;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i =
      std::min(v.size() - 1, static_cast<size_t>(std::ceil(p * static_cast<double>(v.size())) - 1));
  return v[i];
}

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

struct Timing {
  double p50 = 0, p99 = 0, entries_per_s = 0;
  std::vector<std::vector<int32_t>> ids;
};

// Times entry-at-a-time searches (calling thread) and whole batches on the pool.
absl::StatusOr<Timing> TimeSearch(const std::vector<indexer::SearchEntry>& entries, int repeats,
                                  ThreadPool* pool) {
  Timing t;
  std::vector<double> lat;
  std::vector<std::vector<int32_t>> one;
  for (int r = 0; r < repeats; ++r) {
    for (const auto& e : entries) {
      const auto a = Clock::now();
      RETURN_IF_ERROR(indexer::Search({&e, 1}, {}, nullptr, &one));
      lat.push_back(Ms(a, Clock::now()) * 1000);
    }
  }
  t.p50 = Percentile(lat, 0.5);
  t.p99 = Percentile(lat, 0.99);
  const auto a = Clock::now();
  for (int r = 0; r < repeats; ++r) RETURN_IF_ERROR(indexer::Search(entries, {}, pool, &t.ids));
  t.entries_per_s = static_cast<double>(entries.size()) * repeats / (Ms(a, Clock::now()) / 1000);
  return t;
}

}  // namespace

absl::StatusOr<nlohmann::json> RunIndexBench(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(Options o, Parse(args));
  indexer::SyntheticOptions so;
  so.tokens = o.tokens;
  so.head_dim = o.head_dim;
  so.group = o.group;
  so.prompt_queries = o.prompt_queries;
  so.decode_queries = o.entries;
  so.sinks = o.sinks;
  so.window = o.window;
  so.needles = o.needles;
  so.dtype = o.dtype;
  so.seed = o.seed;
  const auto g0 = Clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<indexer::SyntheticData> data, indexer::GenerateSynthetic(so));
  const double generate_ms = Ms(g0, Clock::now());
  const int d = o.head_dim, g = o.group;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const int64_t rb = data->retrieval_begin, re = data->retrieval_end;
  ThreadPool pool(o.threads);
  std::unique_ptr<ThreadPool> build_pool;
  if (o.build_threads > 1) build_pool = std::make_unique<ThreadPool>(o.build_threads - 1);

  // Attention-everywhere references per entry: exact scores over the range, dense output.
  std::vector<int32_t> sinks_window;
  for (int64_t t = 0; t < rb; ++t) sinks_window.push_back(static_cast<int32_t>(t));
  for (int64_t t = re; t < o.tokens; ++t) sinks_window.push_back(static_cast<int32_t>(t));
  std::vector<int32_t> all(static_cast<size_t>(o.tokens));
  for (int64_t t = 0; t < o.tokens; ++t) all[t] = static_cast<int32_t>(t);
  std::vector<std::vector<float>> scores(static_cast<size_t>(o.entries)),
      dense(static_cast<size_t>(o.entries));
  for (int i = 0; i < o.entries; ++i) {
    const float* q = data->decode_queries.data() + static_cast<size_t>(i) * g * d;
    indexer::SearchQuery sq{q, g, &data->keys, rb, re, o.budget, scale};
    indexer::ExactScores(sq, &scores[i]);
    RETURN_IF_ERROR(
        indexer::AttentionOutput(q, g, data->keys, data->values, all, nullptr, scale, &dense[i]));
  }
  auto output_error = [&](int i, const std::vector<int32_t>& ids,
                          const indexer::MergedKV* merged) -> absl::StatusOr<double> {
    std::vector<int32_t> attended = sinks_window;
    attended.insert(attended.end(), ids.begin(), ids.end());
    std::vector<float> o_sparse;
    RETURN_IF_ERROR(
        indexer::AttentionOutput(data->decode_queries.data() + static_cast<size_t>(i) * g * d, g,
                                 data->keys, data->values, attended, merged, scale, &o_sparse));
    return indexer::RelativeL2(o_sparse, dense[i]);
  };

  indexer::BuildInput in;
  in.keys = &data->keys;
  in.token_begin = rb;
  in.token_end = re;
  in.prompt_queries = data->prompt_queries.data();
  in.num_prompt_queries = data->num_prompt_queries;
  in.group = g;
  in.scale = scale;

  auto entries_for = [&](const indexer::Segment* seg) {
    std::vector<indexer::SearchEntry> es(static_cast<size_t>(o.entries));
    for (int i = 0; i < o.entries; ++i) {
      es[i].queries = data->decode_queries.data() + static_cast<size_t>(i) * g * d;
      es[i].group = g;
      es[i].keys = &data->keys;
      if (seg != nullptr) es[i].segments = {seg};
      es[i].token_begin = rb;
      es[i].token_end = re;
      es[i].k = o.budget;
      es[i].scale = scale;
    }
    return es;
  };
  auto quality = [&](nlohmann::json* j, const std::vector<std::vector<int32_t>>& ids,
                     const std::vector<std::vector<int32_t>>& exact_ids) -> absl::Status {
    double mass_recall = 0, min_mass_recall = 1, topk = 0, mass = 0, err = 0;
    int64_t found = 0;
    for (int i = 0; i < o.entries; ++i) {
      const double mr = indexer::AttentionMassRecall(scores[i], rb, exact_ids[i], ids[i]);
      mass_recall += mr;
      min_mass_recall = std::min(min_mass_recall, mr);
      topk += indexer::TopkRecall(exact_ids[i], ids[i]);
      mass += indexer::HeadMeanMass(data->decode_queries.data() + static_cast<size_t>(i) * g * d, g,
                                    data->keys, rb, re, scale, ids[i]);
      for (int32_t nt : data->needle_tokens)
        found += std::binary_search(ids[i].begin(), ids[i].end(), nt);
      ASSIGN_OR_RETURN(double e, output_error(i, ids[i], nullptr));
      err += e;
    }
    (*j)["attention_mass_recall"] = mass_recall / o.entries;
    (*j)["attention_mass_recall_min"] = min_mass_recall;
    (*j)["topk_recall"] = topk / o.entries;
    (*j)["attention_mass"] = mass / o.entries;
    (*j)["needles_found"] = found;
    (*j)["needles_total"] = static_cast<int64_t>(data->needle_tokens.size()) * o.entries;
    (*j)["attention_output_rel_l2"] = err / o.entries;
    return absl::OkStatus();
  };

  nlohmann::json methods = nlohmann::json::array();
  // exact
  ASSIGN_OR_RETURN(Timing exact, TimeSearch(entries_for(nullptr), o.repeats, &pool));
  {
    nlohmann::json j;
    j["method"] = "exact";
    j["tokens"] = o.tokens;
    j["budget"] = o.budget;
    RETURN_IF_ERROR(quality(&j, exact.ids, exact.ids));
    j["search_us_p50"] = exact.p50;
    j["search_us_p99"] = exact.p99;
    j["exact_search_us_p50"] = exact.p50;
    j["speedup_vs_exact"] = 1.0;
    j["build_ms"] = 0.0;
    j["entries_per_s"] = exact.entries_per_s;
    j["parameters"] = nlohmann::json::object();
    methods.push_back(j);
  }
  for (Method m : o.methods) {
    nlohmann::json j;
    j["method"] = std::string(indexer::MethodName(m));
    j["tokens"] = o.tokens;
    j["budget"] = o.budget;
    j["exact_search_us_p50"] = exact.p50;
    if (m == Method::kMerged) {
      const auto b0 = Clock::now();
      ASSIGN_OR_RETURN(indexer::MergedKV mkv, indexer::MergeChunks(data->keys, data->values, rb, re,
                                                                   o.merged, build_pool.get()));
      j["build_ms"] = Ms(b0, Clock::now());
      j["entries"] = mkv.entries();
      j["compression"] =
          static_cast<double>(re - rb) / static_cast<double>(std::max<int64_t>(1, mkv.entries()));
      double err = 0;
      for (int i = 0; i < o.entries; ++i) {
        ASSIGN_OR_RETURN(double e, output_error(i, {}, &mkv));
        err += e;
      }
      j["attention_output_rel_l2"] = err / o.entries;
      for (const char* f :
           {"attention_mass_recall", "topk_recall", "needles_found", "needles_total",
            "search_us_p50", "search_us_p99", "speedup_vs_exact", "entries_per_s"}) {
        j[f] = nullptr;
      }
      j["parameters"] = {{"chunk_tokens", o.merged.chunk_tokens},
                         {"keep_ratio", o.merged.keep_ratio}};
      methods.push_back(j);
      continue;
    }
    // The first build pays page faults for its scratch buffers; later ones (steady state on a
    // tier node) reuse them. Report both.
    std::unique_ptr<indexer::Segment> seg;
    double first_ms = 0, best_ms = 0;
    for (int r = 0; r < o.build_repeats; ++r) {
      const auto b0 = Clock::now();
      ASSIGN_OR_RETURN(seg, indexer::BuildSegment(m, in, o.index, build_pool.get()));
      const double ms = Ms(b0, Clock::now());
      if (r == 0) first_ms = best_ms = ms;
      best_ms = std::min(best_ms, ms);
      if (ms > 1000) break;  // page faults are noise next to a build this long
    }
    j["build_ms"] = best_ms;
    j["build_ms_first"] = first_ms;
    j["index_bytes"] = seg->MemoryBytes();
    ASSIGN_OR_RETURN(Timing t, TimeSearch(entries_for(seg.get()), o.repeats, &pool));
    RETURN_IF_ERROR(quality(&j, t.ids, exact.ids));
    j["search_us_p50"] = t.p50;
    j["search_us_p99"] = t.p99;
    j["speedup_vs_exact"] = t.p50 > 0 ? exact.p50 / t.p50 : 0.0;
    j["entries_per_s"] = t.entries_per_s;
    if (m == Method::kCtkvr) {
      j["parameters"] = {{"centroids", o.index.ctkvr.centroids},
                         {"list_size", o.index.ctkvr.list_size},
                         {"probe", o.index.ctkvr.probe},
                         {"prompt_queries", data->num_prompt_queries}};
    } else {
      j["parameters"] = {{"tokens_per_cluster", o.index.cluster.tokens_per_cluster},
                         {"iterations", o.index.cluster.iterations},
                         {"append_every", o.index.cluster.append_every},
                         {"append_clusters", o.index.cluster.append_clusters},
                         {"seed", o.index.cluster.seed}};
    }
    methods.push_back(j);
  }
  nlohmann::json out;
  out["bench"] = "index";
  out["isa"] = std::string(indexer::kernels::IsaName(indexer::kernels::BestIsa()));
  out["threads"] = pool.size();
  out["hardware_threads"] = std::thread::hardware_concurrency();
  out["options"] = {{"tokens", o.tokens},
                    {"budget", o.budget},
                    {"head_dim", d},
                    {"group", g},
                    {"sinks", o.sinks},
                    {"window", o.window},
                    {"entries", o.entries},
                    {"repeats", o.repeats},
                    {"build_threads", o.build_threads},
                    {"build_repeats", o.build_repeats},
                    {"seed", o.seed},
                    {"dtype", std::string(DTypeName(o.dtype))},
                    {"needles", o.needles},
                    {"prompt_queries", o.prompt_queries}};
  out["data"] = {{"generator", "synthetic"},
                 {"generate_ms", generate_ms},
                 {"retrieval_begin", rb},
                 {"retrieval_end", re},
                 {"needle_tokens", data->needle_tokens}};
  out["methods"] = methods;
  return out;
}

}  // namespace kvrecall::bench
