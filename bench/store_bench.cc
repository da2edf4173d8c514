#include "bench/store_bench.h"

#include "bench/flag_map.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "common/status_macros.h"
#include "kvstore/block_store.h"
#include "kvstore/block_table.h"
#include "kvstore/node.h"

namespace kvrecall::bench {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

absl::StatusOr<DType> ParseDType(const std::string& s) {
  if (s == "bf16") return DType::kBF16;
  if (s == "f16") return DType::kF16;
  if (s == "f32") return DType::kF32;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype must be bf16, f16 or f32, got '", s, "'"));
}

ModelSpec BenchSpec(const StoreBenchOptions& o, DType dtype) {
  ModelSpec s;
  s.model_id = "store-bench";
  s.num_layers = o.layers;
  s.num_q_heads = o.kv_heads * 4;
  s.num_kv_heads = o.kv_heads;
  s.head_dim = o.head_dim;
  s.kv_dtype = dtype;
  s.vocab_size = 128256;
  return s;
}

// Appends tokens [start, end) of `seq` for every layer in chunks, one transaction per chunk, from
// one source chunk (the bytes' values do not matter here).
absl::Status Ingest(kvstore::Sequence* seq, int64_t start, int64_t end, int64_t chunk_tokens,
                    const std::string& k, const std::string& v, size_t chunk_row_bytes) {
  const int layers = seq->spec().num_layers;
  for (int64_t t = start; t < end; t += chunk_tokens) {
    const int64_t n = std::min(chunk_tokens, end - t);
    const size_t bytes = static_cast<size_t>(n) * chunk_row_bytes;
    RETURN_IF_ERROR(seq->BeginAppend());
    for (int l = 0; l < layers; ++l) {
      absl::Status s =
          seq->AppendChunk(l, t, n, {reinterpret_cast<const uint8_t*>(k.data()), bytes},
                           {reinterpret_cast<const uint8_t*>(v.data()), bytes});
      if (!s.ok()) {
        seq->AbortAppend();
        return s;
      }
    }
    RETURN_IF_ERROR(seq->CommitAppend().status());
  }
  return absl::OkStatus();
}

// The spill part (see store_bench.h).
absl::Status RunSpill(const StoreBenchOptions& o, const ModelSpec& spec, nlohmann::json* out) {
  const size_t layer_bytes =
      2 * static_cast<size_t>(o.kv_heads) * static_cast<size_t>(o.block_tokens) * spec.row_bytes();
  const int64_t n = std::max<int64_t>(1, o.spill_tokens / o.block_tokens);
  const int64_t block_bytes = static_cast<int64_t>(layer_bytes) * o.layers;
  const int64_t bytes = n * block_bytes;
  std::string dir = o.spill_dir;
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    dir = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/kvrecall-bench-spill.", getpid());
  }
  ASSIGN_OR_RETURN(std::unique_ptr<kvstore::Arena> arena,
                   kvstore::Arena::Create({n * block_bytes, o.hugepages}, nullptr));
  RETURN_IF_ERROR(arena->EnsureSlotBytes(layer_bytes));
  double spill_s = 0, reload_s = 0, put_s = 0, get_s = 0;
  {
    ASSIGN_OR_RETURN(std::unique_ptr<kvstore::BlockStore> store,
                     kvstore::BlockStore::Open({dir + "/blocks", false, nullptr}));
    FakeClock clock;
    kvstore::BlockTable table(arena.get(), {&clock, absl::Seconds(1), store.get()});
    std::vector<kvstore::Block*> old_blocks, new_blocks;
    std::mt19937_64 rng(7);
    for (int64_t i = 0; i < n; ++i) {
      ASSIGN_OR_RETURN(kvstore::Block * b, table.Allocate(o.layers, layer_bytes));
      for (int l = 0; l < o.layers; ++l) {
        for (size_t j = 0; j + 8 <= layer_bytes; j += 8) {
          const uint64_t r = rng();
          std::memcpy(b->layer(l) + j, &r, 8);
        }
      }
      table.Unpin({&b, 1});
      old_blocks.push_back(b);
    }
    clock.Advance(absl::Seconds(10));
    double t0 = Now();
    for (int64_t i = 0; i < n; ++i) {
      ASSIGN_OR_RETURN(kvstore::Block * b, table.Allocate(o.layers, layer_bytes));  // evicts one
      new_blocks.push_back(b);
    }
    spill_s = Now() - t0;
    if (table.stats().evictions != n) return absl::InternalError("spill bench: evictions != blocks");
    for (kvstore::Block* b : new_blocks) table.Unref(b);
    t0 = Now();
    for (kvstore::Block* b : old_blocks) RETURN_IF_ERROR(table.Pin({&b, 1}));
    reload_s = Now() - t0;
    (*out)["spill"] = {{"bytes", bytes},
                       {"blocks", n},
                       {"block_bytes", block_bytes},
                       {"dir", dir},
                       {"spill_seconds", spill_s},
                       {"reload_seconds", reload_s},
                       {"reloads", table.stats().reloads}};
    for (kvstore::Block* b : old_blocks) {
      table.Unpin({&b, 1});
      table.Unref(b);
    }
  }
  {
    // Baseline in a fresh store: the same number of values of one block's bytes.
    ASSIGN_OR_RETURN(std::unique_ptr<kvstore::BlockStore> store,
                     kvstore::BlockStore::Open({dir + "/raw", false, nullptr}));
    std::string value(static_cast<size_t>(block_bytes), '\0');
    std::mt19937_64 rng(9);
    for (size_t j = 0; j + 8 <= value.size(); j += 8) {
      const uint64_t r = rng();
      std::memcpy(value.data() + j, &r, 8);
    }
    double t0 = Now();
    for (int64_t i = 0; i < n; ++i) {
      value[0] = static_cast<char>(i);
      RETURN_IF_ERROR(store->PutRaw(absl::StrCat("raw", i), value));
    }
    put_s = Now() - t0;
    std::string got;
    t0 = Now();
    for (int64_t i = 0; i < n; ++i) RETURN_IF_ERROR(store->GetRaw(absl::StrCat("raw", i), &got));
    get_s = Now() - t0;
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  auto gbps = [&](double s) { return static_cast<double>(bytes) / s / 1e9; };
  (*out)["spill_gbps"] = gbps(spill_s);
  (*out)["reload_gbps"] = gbps(reload_s);
  (*out)["rocksdb_put_gbps"] = gbps(put_s);
  (*out)["rocksdb_get_gbps"] = gbps(get_s);
  (*out)["spill_vs_rocksdb_put"] = put_s / spill_s;
  (*out)["reload_vs_rocksdb_get"] = get_s / reload_s;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<StoreBenchOptions> ParseStoreBenchFlags(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(FlagMap f, FlagMap::Parse(args));
  StoreBenchOptions o;
  auto count = [&f](const char* name, auto* field) -> absl::Status {
    RETURN_IF_ERROR(f.Get(name, field));
    if (*field < 0) return absl::InvalidArgumentError(absl::StrCat("--", name, " must not be negative"));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(count("layers", &o.layers));
  RETURN_IF_ERROR(count("kv_heads", &o.kv_heads));
  RETURN_IF_ERROR(count("head_dim", &o.head_dim));
  RETURN_IF_ERROR(count("block_tokens", &o.block_tokens));
  RETURN_IF_ERROR(count("ingest_tokens", &o.ingest_tokens));
  RETURN_IF_ERROR(count("chunk_tokens", &o.chunk_tokens));
  RETURN_IF_ERROR(count("passes", &o.passes));
  RETURN_IF_ERROR(count("sessions", &o.sessions));
  RETURN_IF_ERROR(count("prefix_tokens", &o.prefix_tokens));
  RETURN_IF_ERROR(count("suffix_tokens", &o.suffix_tokens));
  RETURN_IF_ERROR(count("spill_tokens", &o.spill_tokens));
  RETURN_IF_ERROR(f.Get("dtype", &o.dtype));
  RETURN_IF_ERROR(f.Get("spill_dir", &o.spill_dir));
  RETURN_IF_ERROR(f.Get("hugepages", &o.hugepages));
  RETURN_IF_ERROR(f.CheckAllUsed());
  return o;
}

absl::StatusOr<nlohmann::json> RunStoreBench(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(StoreBenchOptions o, ParseStoreBenchFlags(args));
  return RunStoreBenchWithOptions(o);
}

absl::StatusOr<nlohmann::json> RunStoreBenchWithOptions(const StoreBenchOptions& o) {
  ASSIGN_OR_RETURN(DType dtype, ParseDType(o.dtype));
  if (o.layers < 1 || o.kv_heads < 1 || o.head_dim < 1 || o.block_tokens < 1 ||
      o.ingest_tokens < 1 || o.chunk_tokens < 1 || o.passes < 2 || o.sessions < 1 ||
      o.prefix_tokens < 0 || o.suffix_tokens < 1) {
    return absl::InvalidArgumentError("store bench: every size must be positive and --passes >= 2");
  }
  const ModelSpec spec = BenchSpec(o, dtype);
  RETURN_IF_ERROR(spec.Validate());
  const size_t row = spec.row_bytes();
  const size_t chunk_row_bytes =
      static_cast<size_t>(o.kv_heads) * row;  // one token, one layer, K or V
  const int64_t bytes_per_token = 2 * static_cast<int64_t>(chunk_row_bytes) * o.layers;
  const int64_t block_bytes = bytes_per_token * o.block_tokens;

  // Source chunk: [kv_heads][chunk_tokens][head_dim], random bytes.
  std::string src_k(static_cast<size_t>(o.chunk_tokens) * chunk_row_bytes, '\0');
  std::string src_v(src_k.size(), '\0');
  std::mt19937_64 rng(1);
  for (std::string* s : {&src_k, &src_v}) {
    for (size_t i = 0; i + 8 <= s->size(); i += 8) {
      const uint64_t r = rng();
      std::memcpy(s->data() + i, &r, 8);
    }
  }

  nlohmann::json out;
  out["bench"] = "store";
  out["options"] = {{"layers", o.layers},
                    {"kv_heads", o.kv_heads},
                    {"head_dim", o.head_dim},
                    {"dtype", o.dtype},
                    {"block_tokens", o.block_tokens},
                    {"ingest_tokens", o.ingest_tokens},
                    {"chunk_tokens", o.chunk_tokens},
                    {"passes", o.passes},
                    {"sessions", o.sessions},
                    {"prefix_tokens", o.prefix_tokens},
                    {"suffix_tokens", o.suffix_tokens},
                    {"hugepages", o.hugepages},
                    {"spill_tokens", o.spill_tokens}};
  out["bytes_per_token"] = bytes_per_token;

  // ---- ingest vs memcpy ----
  const int64_t ingest_blocks = (o.ingest_tokens + o.block_tokens - 1) / o.block_tokens;
  const int64_t ingest_bytes = o.ingest_tokens * bytes_per_token;
  FakeClock clock;
  std::vector<double> ingest_s, memcpy_s;
  std::string hugepages;
  {
    kvstore::NodeOptions no;
    no.memory_bytes = (ingest_blocks + 1) * block_bytes;
    no.block_tokens = o.block_tokens;
    no.search_threads = 1;
    no.try_hugepages = o.hugepages;
    kvstore::Node node(no, nullptr, &clock);
    RETURN_IF_ERROR(node.arena_status());
    hugepages = node.arena().hugepages();
    RETURN_IF_ERROR(node.RegisterModel(spec).status());
    std::vector<int32_t> ids(static_cast<size_t>(o.ingest_tokens));
    for (int p = 0; p < o.passes; ++p) {
      for (size_t i = 0; i < ids.size(); ++i)
        ids[i] = static_cast<int32_t>((i * 7 + static_cast<size_t>(p)) % 128256);
      const std::string id = absl::StrCat("ingest-", p);
      RETURN_IF_ERROR(node.OpenSequence({"bench", spec.model_id, id, ids}).status());
      ASSIGN_OR_RETURN(std::shared_ptr<kvstore::Sequence> seq, node.FindSequence("bench", id));
      const double t0 = Now();
      RETURN_IF_ERROR(
          Ingest(seq.get(), 0, o.ingest_tokens, o.chunk_tokens, src_k, src_v, chunk_row_bytes));
      ingest_s.push_back(Now() - t0);
      seq.reset();
      RETURN_IF_ERROR(node.CloseSequence("bench", id, /*drop=*/true));
    }
  }
  // Baselines: memcpy of the same bytes into one contiguous buffer, (a) in whole chunks as they
  // arrive (glibc picks non-temporal stores for such sizes), (b) in runs of one block's rows of
  // one head (block_tokens rows, the pieces the arena copies). The better one is memcpy_gbps.
  std::vector<double> memcpy_runs_s;
  {
    void* p = mmap(nullptr, static_cast<size_t>(ingest_bytes), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return absl::ResourceExhaustedError("cannot map the memcpy destination");
    if (o.hugepages) madvise(p, static_cast<size_t>(ingest_bytes), MADV_HUGEPAGE);
    uint8_t* dst = static_cast<uint8_t*>(p);
    const size_t run = static_cast<size_t>(o.block_tokens) * row;
    for (int runs = 0; runs < 2; ++runs) {
      for (int pass = 0; pass < o.passes; ++pass) {
        const double t0 = Now();
        size_t off = 0;
        for (int64_t t = 0; t < o.ingest_tokens; t += o.chunk_tokens) {
          const size_t bytes =
              static_cast<size_t>(std::min(o.chunk_tokens, o.ingest_tokens - t)) * chunk_row_bytes;
          for (int l = 0; l < o.layers; ++l) {
            for (const std::string* src : {&src_k, &src_v}) {
              if (runs == 0) {
                std::memcpy(dst + off, src->data(), bytes);
              } else {
                for (size_t b = 0; b < bytes; b += run)
                  std::memcpy(dst + off + b, src->data() + b, std::min(run, bytes - b));
              }
              off += bytes;
            }
          }
        }
        (runs == 0 ? memcpy_s : memcpy_runs_s).push_back(Now() - t0);
      }
    }
    munmap(p, static_cast<size_t>(ingest_bytes));
  }
  auto gbps = [&](double s) { return static_cast<double>(ingest_bytes) / s / 1e9; };
  const double ingest_best = *std::min_element(ingest_s.begin() + 1, ingest_s.end());
  const double memcpy_chunks_best = *std::min_element(memcpy_s.begin() + 1, memcpy_s.end());
  const double memcpy_runs_best = *std::min_element(memcpy_runs_s.begin() + 1, memcpy_runs_s.end());
  const double memcpy_best = std::min(memcpy_chunks_best, memcpy_runs_best);
  out["arena_hugepages"] = hugepages;
  out["ingest"] = {{"bytes", ingest_bytes}, {"seconds_per_pass", ingest_s}};
  out["memcpy"] = {{"bytes", ingest_bytes},
                   {"seconds_per_pass", memcpy_s},
                   {"block_runs_seconds_per_pass", memcpy_runs_s},
                   {"whole_chunks_gbps", gbps(memcpy_chunks_best)},
                   {"block_runs_gbps", gbps(memcpy_runs_best)}};
  out["ingest_gbps"] = gbps(ingest_best);
  out["ingest_cold_gbps"] = gbps(ingest_s[0]);
  out["memcpy_gbps"] = gbps(memcpy_best);
  out["memcpy_cold_gbps"] = gbps(memcpy_s[0]);
  out["ingest_vs_memcpy"] = memcpy_best / ingest_best;
  out["ingest_vs_memcpy_cold"] = memcpy_s[0] / ingest_s[0];

  // ---- prefix sharing ----
  const int64_t prompt = o.prefix_tokens + o.suffix_tokens;
  const int64_t blocks_needed =
      (o.prefix_tokens / o.block_tokens) +
      o.sessions *
          ((prompt - o.prefix_tokens / o.block_tokens * o.block_tokens + o.block_tokens - 1) /
           o.block_tokens);
  kvstore::NodeOptions no;
  no.memory_bytes = (blocks_needed + 1) * block_bytes;
  no.block_tokens = o.block_tokens;
  no.search_threads = 1;
  no.try_hugepages = o.hugepages;
  kvstore::Node node(no, nullptr, &clock);
  RETURN_IF_ERROR(node.arena_status());
  RETURN_IF_ERROR(node.RegisterModel(spec).status());
  std::vector<int32_t> ids(static_cast<size_t>(prompt));
  for (int64_t i = 0; i < o.prefix_tokens; ++i)
    ids[static_cast<size_t>(i)] = static_cast<int32_t>(i % 100000);
  int64_t matched = 0, prompt_total = 0;
  const double t0 = Now();
  for (int s = 0; s < o.sessions; ++s) {
    for (int64_t i = o.prefix_tokens; i < prompt; ++i) {
      ids[static_cast<size_t>(i)] = static_cast<int32_t>(100000 + (s * 1009 + i) % 28000);
    }
    const std::string id = absl::StrCat("session-", s);
    ASSIGN_OR_RETURN(kvstore::OpenSequenceResult r,
                     node.OpenSequence({"bench", spec.model_id, id, ids}));
    matched += r.matched_tokens;
    prompt_total += prompt;
    ASSIGN_OR_RETURN(std::shared_ptr<kvstore::Sequence> seq, node.FindSequence("bench", id));
    RETURN_IF_ERROR(
        Ingest(seq.get(), r.stored_tokens, prompt, o.chunk_tokens, src_k, src_v, chunk_row_bytes));
  }
  const double sharing_s = Now() - t0;
  const kvstore::NodeStats st = node.Stats(false);
  const int64_t ideal = (o.prefix_tokens + o.sessions * o.suffix_tokens) * bytes_per_token;
  out["shared_bytes"] = st.stored_bytes;
  out["ideal_bytes"] = ideal;
  out["independent_bytes"] = o.sessions * prompt * bytes_per_token;
  out["sharing_ratio"] = static_cast<double>(st.stored_bytes) / static_cast<double>(ideal);
  out["prefix_hit_rate"] = static_cast<double>(matched) / static_cast<double>(prompt_total);
  out["logical_bytes"] = st.logical_bytes;
  out["sharing_seconds"] = sharing_s;
  out["spill_gbps"] = nullptr;
  out["reload_gbps"] = nullptr;
  out["rocksdb_put_gbps"] = nullptr;
  out["rocksdb_get_gbps"] = nullptr;
  if (o.spill_tokens > 0) RETURN_IF_ERROR(RunSpill(o, spec, &out));
  out["notes"] = {
      "ingest_gbps / memcpy_gbps: best of passes 1.. (warm pages); memcpy_gbps = the better of "
      "whole-chunk and "
      "block-run memcpy",
      "*_cold: pass 0, first touch of fresh pages; on a VM this mostly measures the hypervisor "
      "backing guest "
      "memory (whichever runs first pays it), not the arena",
      "ingest = Sequence::AppendChunk per layer + commit, in-process (no RPC, no UCX)",
      "spill_gbps: evicting one block (all layers, one 8-MiB-class record, CRC-32C) per allocation "
      "into RocksDB without WAL; reload_gbps: Get + CRC check + copy into arena slots; rocksdb_*: "
      "raw Put/Get of the same value sizes, same column family options; reads mostly hit the "
      "memtable / page cache (the data was just written)"};
  return out;
}

}  // namespace kvrecall::bench
