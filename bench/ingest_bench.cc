#include "bench/ingest_bench.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "bench/flag_map.h"
#include "bench/loopback_server.h"
#include "bench/percentile.h"
#include "client/tier.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kvstore/node.h"

namespace kvrecall::bench {
namespace {

absl::StatusOr<IngestBenchOptions> ParseOptions(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(FlagMap f, FlagMap::Parse(args));
  IngestBenchOptions o;
  RETURN_IF_ERROR(f.Get("layers", &o.layers));
  RETURN_IF_ERROR(f.Get("kv_heads", &o.kv_heads));
  RETURN_IF_ERROR(f.Get("head_dim", &o.head_dim));
  RETURN_IF_ERROR(f.Get("tokens", &o.tokens));
  RETURN_IF_ERROR(f.Get("iterations", &o.iterations));
  RETURN_IF_ERROR(f.Get("warmup", &o.warmup));
  RETURN_IF_ERROR(f.Get("ucx_tls", &o.ucx_tls));
  RETURN_IF_ERROR(f.Get("durable", &o.durable));
  RETURN_IF_ERROR(f.Get("data_dir", &o.data_dir));
  RETURN_IF_ERROR(f.Get("seed", &o.seed));
  RETURN_IF_ERROR(f.CheckAllUsed());
  if (o.layers < 1 || o.kv_heads < 1 || o.head_dim < 2 || o.tokens < 1 || o.tokens > (1 << 20) ||
      o.iterations < 1 || o.warmup < 0) {
    return absl::InvalidArgumentError("need positive sizes, tokens <= 2^20");
  }
  if (o.durable && o.data_dir.empty()) return absl::InvalidArgumentError("--durable needs --data_dir");
  return o;
}

}  // namespace

absl::StatusOr<nlohmann::json> RunIngestBench(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(IngestBenchOptions o, ParseOptions(args));
  ModelSpec spec;
  spec.model_id = "ingest-bench";
  spec.num_layers = o.layers;
  spec.num_q_heads = o.kv_heads * 4;
  spec.num_kv_heads = o.kv_heads;
  spec.head_dim = o.head_dim;
  spec.kv_dtype = DType::kBF16;
  spec.vocab_size = 1 << 20;
  const int64_t layer_bytes = static_cast<int64_t>(spec.row_bytes()) * o.kv_heads * o.tokens;
  const int64_t append_bytes = 2 * layer_bytes * o.layers;

  kvstore::NodeOptions node_options;
  // Two sequences at a time (the previous one is dropped before the next opens) plus slack.
  node_options.memory_bytes = 3 * append_bytes + (int64_t{64} << 20);
  node_options.auto_index = indexer::Method::kExact;
  node_options.data_dir = o.data_dir;
  node_options.durable = o.durable;
  ASSIGN_OR_RETURN(std::unique_ptr<LoopbackServer> srv, StartLoopbackServer(node_options, o.ucx_tls));

  client::TierOptions tier_options;
  tier_options.recall_buffer_bytes = 1 << 20;
  tier_options.deadline = absl::Minutes(5);
  const std::string& target = srv->target;
  client::RemoteTierOptions ucx_options{target, "ucx", o.ucx_tls, "auto"};
  ucx_options.ingest_min_bytes = 0;  // this tier measures the transport path at every size
  ASSIGN_OR_RETURN(std::unique_ptr<client::Tier> ucx, client::CreateRemoteTier(ucx_options, tier_options));
  ASSIGN_OR_RETURN(std::unique_ptr<client::Tier> grpc_tier,
                   client::CreateRemoteTier({target, "ucx", o.ucx_tls, "grpc"}, tier_options));
  RETURN_IF_ERROR(ucx->RegisterModel(spec));
  RETURN_IF_ERROR(grpc_tier->RegisterModel(spec));

  KV_LOG(INFO) << "ingest bench: " << o.tokens << " tokens x " << o.layers << " layers x " << o.kv_heads
               << " kv-heads x head_dim " << o.head_dim << " = " << (append_bytes >> 20) << " MiB per append";
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> normal;
  client::AppendBatch batch;
  batch.token_start = 0;
  batch.num_tokens = o.tokens;
  for (int l = 0; l < o.layers; ++l) {
    for (auto* v : {&batch.keys, &batch.values}) {
      std::string buf(static_cast<size_t>(layer_bytes), '\0');
      auto* p = reinterpret_cast<uint16_t*>(buf.data());
      for (size_t i = 0; i < buf.size() / 2; ++i) p[i] = F32ToBf16(normal(rng));
      v->push_back(std::move(buf));
    }
  }
  std::vector<double> ucx_ms, grpc_ms;
  int serial = 0;
  for (int it = 0; it < o.warmup + o.iterations; ++it) {
    for (client::Tier* tier : {ucx.get(), grpc_tier.get()}) {
      const std::string id = absl::StrCat("ingest-", serial++);
      std::vector<int32_t> ids(static_cast<size_t>(o.tokens));
      for (auto& t : ids) t = static_cast<int32_t>(rng() % spec.vocab_size);
      RETURN_IF_ERROR(tier->OpenSequence(id, spec.model_id, ids).status());
      const absl::Time t0 = absl::Now();
      RETURN_IF_ERROR(tier->AppendKV(id, batch));
      const double ms = absl::ToDoubleMilliseconds(absl::Now() - t0);
      RETURN_IF_ERROR(tier->CloseSequence(id, /*drop=*/true));
      if (it >= o.warmup) (tier == ucx.get() ? ucx_ms : grpc_ms).push_back(ms);
    }
  }
  if (ucx->counters().ingests != o.warmup + o.iterations) {
    return absl::InternalError(absl::StrCat("the ucx tier made ", ucx->counters().ingests,
                                            " transport ingests; expected every append to use it"));
  }
  const double ucx_p50 = Percentile(ucx_ms, 0.5), grpc_p50 = Percentile(grpc_ms, 0.5);
  const double gb = static_cast<double>(append_bytes) / 1e9;
  nlohmann::json j;
  j["benchmark"] = "ingest";
  j["transport"] = o.ucx_tls.empty() ? "ucx-default" : o.ucx_tls;
  j["layers"] = o.layers;
  j["kv_heads"] = o.kv_heads;
  j["head_dim"] = o.head_dim;
  j["tokens"] = o.tokens;
  j["iterations"] = o.iterations;
  j["durable"] = o.durable;
  j["bytes_per_append"] = append_bytes;
  j["ucx_ms_p50"] = ucx_p50;
  j["grpc_ms_p50"] = grpc_p50;
  j["ucx_gbps"] = gb / (ucx_p50 / 1e3);
  j["grpc_gbps"] = gb / (grpc_p50 / 1e3);
  j["ucx_vs_grpc"] = grpc_p50 / ucx_p50;
  return j;
}

}  // namespace kvrecall::bench
