// Retrieval-index benchmark (`kvrecall-bench index`): quality, build time and search speed of a
// method next to `exact` on the same generated data in the same run.
//
// Data: one (layer, kv-head) of indexer/synthetic.h (`tokens` keys and values, `entries` decode
// query groups at the last positions, the prompt's last queries before them, planted needles),
// or, with --qk_dump=DIR, every kv-head of one layer of a real dump (indexer/qk_dump.h, written
// by `kvrecall-worker generate --dump-qk=DIR`): the entries are the query groups of the last
// `entries` positions of the dump — decode steps when it has at least `entries` of them, else
// the last prompt positions too — one search entry per (kv-head, position); CTKVR's centroids
// are the last `prompt_queries` prompt positions before the first entry; no needles. The dump's
// token count replaces --tokens, its head_dim and group replace --head_dim/--group.
// Retrieval range [sinks, tokens - window); the budget is per entry, sinks and window extra.
//
// Measured per method:
//   build_ms                one segment over the retrieval range, on one core (--build_threads=1);
//                           the best of --build_repeats builds (build_ms_first: the first, which
//                           also pays page faults for scratch buffers; builds over 1 s are not
//                           repeated)
//   search_us_p50 / p99     one entry per Search call, calling thread only, over entries ×
//                           repeats calls
//   entries_per_s           Search over all entries at once on a pool of --threads (0 = all cores),
//                           repeated `repeats` times
//   topk_recall, attention_mass_recall, attention_mass, needles_found / needles_total,
//   attention_output_rel_l2 (sinks + window + selection vs dense)  — see indexer/quality.h
// cluster also reports clusters, kmeans_runs, kmeans_iterations_per_run (means over heads) and
// oracle_ranking_mass_recall: the mass recall of the same clusters ranked by their true mean
// score (the best any centroid ranking of them can do);
// and, unless --stats=false, "trace_stats" (indexer/trace_stats.h; means over the kv-heads):
// query cosine at lags 1/16/256/1024, top-`budget` overlap of adjacent entries, and the
// softmax mass of each head's top 1% / 10% of tokens.
// merged has no search: it reports entries, compression and attention_output_rel_l2 (sinks +
// window exact + merged entries with log-count bias vs dense); search fields are null.
#ifndef KVRECALL_BENCH_INDEX_BENCH_H_
#define KVRECALL_BENCH_INDEX_BENCH_H_

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrecall::bench {

// Parses "--name=value" flags and runs. Flags (defaults):
//   --method=ctkvr            exact | ctkvr | cluster | merged, or a comma list ("ctkvr,cluster")
//   --tokens=98304 --budget=1024 --head_dim=128 --group=4 --sinks=16 --window=256
//   --entries=16 --repeats=3 --threads=0 --build_threads=1 --build_repeats=2 --seed=1 --dtype=bf16
//   --needles=8 --prompt_queries=1024 --query_token_weight=0 --query_token_persistence=0.45
//            (generator, indexer/synthetic.h; --query_token_weight=1.3 adds the per-position
//            lookup component)
//   ctkvr:   --centroids=8 --list_size=2048 --probe=1 --min_similarity=0.5 --max_added=16
//            --neighbour_tokens=8 --neighbour_radius=8 (ctkvr rows report novel_fraction)
//   cluster: --tokens_per_cluster=80 --iterations=20 --tolerance=0.01 --segment_tokens=8192
//            --variance_ranking=false --rescore_factor=8 --append_every=320 --append_clusters=4
//   merged:  --chunk_tokens=64 --keep_ratio=0.25
//   data:    --qk_dump=DIR (real dump instead of generated data) --layer=-1 (the first dumped
//            layer >= 2) --stats=true
// Arguments that are not "--" flags, and "--json", are ignored. INVALID_ARGUMENT for an unknown
// flag or a bad value. Returns
//   {"bench": "index", "isa": ..., "threads": ..., "options": {...}, "data": {...},
//    "methods": [{"method": "exact", ...}, {"method": M, "tokens", "budget",
//                 "attention_mass_recall", "topk_recall", "needles_found", "needles_total",
//                 "search_us_p50", "search_us_p99", "exact_search_us_p50", "speedup_vs_exact",
//                 "build_ms", "entries_per_s", "parameters": {...}, ...}, ...]}
absl::StatusOr<nlohmann::json> RunIndexBench(const std::vector<std::string>& args);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_INDEX_BENCH_H_
