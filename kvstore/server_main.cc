// kvrecall-server: one node of the KV memory tier.
//
//   kvrecall-server --listen=0.0.0.0:7070 --memory=64GiB --metrics-port=9090
//
// Serves kvrecall.v1.KvRecall and grpc.health.v1.Health on --listen, Prometheus text metrics on
// http://<metrics-host>:<metrics-port>/metrics. SIGTERM / SIGINT shut it down gracefully.
#include <atomic>
#include <csignal>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/flags.h"
#include "common/http_server.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/placement.h"
#include "common/units.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "indexer/index.h"
#include "kvstore/grpc_service.h"
#include "kvstore/node.h"
#include "kvstore/server_credentials.h"
#include "transport/fault_injection.h"
#include "transport/transport.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:7070", "gRPC address to serve on (port 0 picks a free port)");
ABSL_FLAG(std::string, memory, "1GiB", "KV bytes this node may hold, e.g. 512MiB, 64GiB");
ABSL_FLAG(int, metrics_port, 9090, "HTTP port for /metrics and /healthz (0 picks a free port, -1 disables)");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "IPv4 address for the metrics endpoint");
ABSL_FLAG(int, block_tokens, 64, "tokens per KV block");
ABSL_FLAG(std::string, arena_block_bytes, "0",
          "bytes of one arena slot = one layer of one block (e.g. 256KiB for Llama-3-8B at 64 "
          "tokens, bf16); "
          "0 = the first registered model's; set it to the largest model's when serving several");
ABSL_FLAG(std::string, shared_tenants, "",
          "comma-separated tenants that share one prefix namespace (their equal prompt prefixes "
          "are stored "
          "once); every other tenant is isolated");
ABSL_FLAG(bool, hugepages, true, "back the KV arena with hugepages when the host has them");
ABSL_FLAG(int, search_threads, 0, "threads for retrieval search (0 = every core)");
ABSL_FLAG(int, search_spin_us, 200,
          "microseconds an idle search thread keeps polling for the next Retrieve before it "
          "blocks (0 = block at once): back-to-back calls then skip a 10-50 us wake-up per "
          "thread, for that much CPU after each call");
ABSL_FLAG(int, rpc_threads, 0, "threads for RPC handling (0 = every core)");
ABSL_FLAG(std::string, transport, "ucx", "data transport for streaming rows to workers: ucx or none");
ABSL_FLAG(int, fault_put_delay_ms, 0,
          "fault injection for tests and drills: wait this long before every put of rows to a worker");
ABSL_FLAG(std::vector<std::string>, fault_unimplemented, {},
          "fault injection for tests and drills: comma-separated RPCs (AppendKVBatch, "
          "AllocateBlocks) this node answers UNIMPLEMENTED, as a node from before them would");
ABSL_FLAG(std::string, ucx_tls, "", "UCX transports (UCX_TLS syntax, e.g. tcp or rc,ud); empty = UCX default");
ABSL_FLAG(std::string, data_dir, "",
          "directory for blocks evicted from the arena (RocksDB); empty = no eviction: a full "
          "arena fails writes with RESOURCE_EXHAUSTED. Without --durable it is wiped at start");
ABSL_FLAG(bool, durable, false,
          "write registered models and every committed append through RocksDB's WAL (synced) "
          "before acknowledging it, and recover them from --data-dir at start (needs --data-dir)");
ABSL_FLAG(std::string, auto_index, "cluster",
          "index built in the background when a commit leaves >= --auto-index-min-tokens "
          "un-indexed tokens (the prefill): cluster, ctkvr (exact scan until BuildIndex brings "
          "the prompt queries) or none. Index memory is taken from --memory");
ABSL_FLAG(double, ctkvr_min_similarity, -1,
          "ctkvr: a query whose best centroid's cosine similarity is below this is scored exactly "
          "over every candidate instead of from the lists (in [0, 1]; 0 never; negative keeps the "
          "default, 0.5)");
ABSL_FLAG(
    bool, ctkvr_copy_list_rows, true,
    "ctkvr: keep a copy of each list's key rows next to the list (faster searches, more memory) "
    "instead of gathering them from the pages");
ABSL_FLAG(int64_t, auto_index_min_tokens, 1024, "tokens a sequence needs before --auto-index builds");
ABSL_FLAG(int, auto_index_first_layer, 2, "first layer --auto-index indexes (the workers' dense layers)");
ABSL_FLAG(int64_t, auto_index_token_begin, 16, "first token --auto-index indexes (the workers' sinks)");
ABSL_FLAG(absl::Duration, lease, absl::Seconds(30),
          "how long an access (open, append, read) protects a sequence's blocks from eviction");
ABSL_FLAG(absl::Duration, ingest_lease, absl::Seconds(60),
          "how long a bulk ingest over UCX (AllocateBlocks) may stay uncommitted before it is aborted");
ABSL_FLAG(std::string, peers, "",
          "comma-separated names (host:port, as clients dial them) of every node of the cluster; with "
          "--advertise, OpenSequence refuses a sequence that a client with a different node list placed "
          "here although this node is not one of its owners (FAILED_PRECONDITION naming the owners)");
ABSL_FLAG(std::string, advertise, "", "this node's name in --peers");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain: serve gRPC over TLS (with --tls-key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle: require client certificates signed by it (mutual TLS; needs --tls-cert)");
ABSL_FLAG(bool, allow_plaintext, false,
          "serve gRPC unencrypted on a non-loopback --listen address (without it, no TLS flags means "
          "loopback only)");
ABSL_FLAG(std::string, tenant_tokens, "",
          "token file (kvstore/auth.h: 'tenant NAME TOKEN', 'admin TOKEN', 'limits NAME KEY=VALUE...'): "
          "every RPC then needs 'authorization: Bearer TOKEN' and acts for the token's tenant, with its "
          "quotas; empty = no authentication (the request's tenant field is trusted)");
ABSL_FLAG(absl::Duration, tenant_tokens_reload, absl::Seconds(10),
          "how often --tenant-tokens is re-read (a changed file applies without a restart)");
ABSL_FLAG(std::string, port_file, "", "if set, write the bound gRPC port and metrics port here once serving");

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

int Run() {
  using namespace kvrecall;
  auto memory = ParseBytes(absl::GetFlag(FLAGS_memory));
  if (!memory.ok()) {
    KV_LOG(ERROR) << "--memory: " << memory.status().message();
    return 2;
  }
  const int block_tokens = absl::GetFlag(FLAGS_block_tokens);
  if (block_tokens < 1 || block_tokens > 4096) {
    KV_LOG(ERROR) << "--block_tokens must be in [1, 4096]";
    return 2;
  }

  kvstore::PeerConfig peers;
  peers.peers = placement::SplitPeers(absl::GetFlag(FLAGS_peers));
  peers.self = absl::GetFlag(FLAGS_advertise);
  if (absl::Status s = kvstore::ValidatePeerConfig(peers); !s.ok()) {
    KV_LOG(ERROR) << s.message();
    return 2;
  }

  std::unique_ptr<transport::Transport> transport;
  if (absl::GetFlag(FLAGS_transport) == "ucx") {
    auto t = transport::CreateUcxTransport({absl::GetFlag(FLAGS_ucx_tls)});
    if (!t.ok()) {
      KV_LOG(ERROR) << "UCX transport: " << t.status();
      return 1;
    }
    transport = std::move(*t);
    if (const int delay_ms = absl::GetFlag(FLAGS_fault_put_delay_ms); delay_ms > 0) {
      KV_LOG(WARNING) << "fault injection: every put to a worker waits " << delay_ms << " ms";
      transport = transport::WithPutDelay(std::move(transport), absl::Milliseconds(delay_ms));
    }
  } else if (absl::GetFlag(FLAGS_transport) != "none") {
    KV_LOG(ERROR) << "--transport must be ucx or none";
    return 2;
  }

  const std::string block_bytes_flag = absl::GetFlag(FLAGS_arena_block_bytes);
  absl::StatusOr<int64_t> arena_block_bytes =
      block_bytes_flag == "0" ? int64_t{0} : ParseBytes(block_bytes_flag);
  if (!arena_block_bytes.ok()) {
    KV_LOG(ERROR) << "--arena_block_bytes: " << arena_block_bytes.status().message();
    return 2;
  }

  kvstore::NodeOptions options;
  options.memory_bytes = *memory;
  options.block_tokens = block_tokens;
  options.search_threads = absl::GetFlag(FLAGS_search_threads);
  if (absl::GetFlag(FLAGS_search_spin_us) < 0) {
    KV_LOG(ERROR) << "--search_spin_us must be >= 0, got " << absl::GetFlag(FLAGS_search_spin_us);
    return 2;
  }
  options.search_spin = absl::Microseconds(absl::GetFlag(FLAGS_search_spin_us));
  options.arena_block_bytes = *arena_block_bytes;
  options.try_hugepages = absl::GetFlag(FLAGS_hugepages);
  options.data_dir = absl::GetFlag(FLAGS_data_dir);
  options.lease = absl::GetFlag(FLAGS_lease);
  options.ingest_lease = absl::GetFlag(FLAGS_ingest_lease);
  options.durable = absl::GetFlag(FLAGS_durable);
  {
    const std::string m = absl::GetFlag(FLAGS_auto_index);
    if (m == "none") {
      options.auto_index = kvrecall::indexer::Method::kExact;
    } else if (m == "cluster" || m == "ctkvr") {
      options.auto_index = *kvrecall::indexer::ParseMethod(m);
    } else {
      KV_LOG(ERROR) << "--auto-index must be cluster, ctkvr or none, not '" << m << "'";
      return 2;
    }
    options.auto_index_min_tokens = absl::GetFlag(FLAGS_auto_index_min_tokens);
    options.auto_index_first_layer = absl::GetFlag(FLAGS_auto_index_first_layer);
    options.auto_index_token_begin = absl::GetFlag(FLAGS_auto_index_token_begin);
  }
  if (absl::Status s = kvrecall::indexer::ApplyMinSimilarityFlag(
          absl::GetFlag(FLAGS_ctkvr_min_similarity), &options.index_options.ctkvr);
      !s.ok()) {
    KV_LOG(ERROR) << s.message();
    return 2;
  }
  options.index_options.ctkvr.copy_list_rows = absl::GetFlag(FLAGS_ctkvr_copy_list_rows);
  if (options.durable && options.data_dir.empty()) {
    KV_LOG(ERROR) << "--durable needs --data-dir";
    return 2;
  }
  for (absl::string_view t :
       absl::StrSplit(absl::GetFlag(FLAGS_shared_tenants), ',', absl::SkipEmpty())) {
    options.shared_tenants.emplace_back(t);
  }
  std::unique_ptr<kvstore::Authenticator> auth;
  if (const std::string tokens = absl::GetFlag(FLAGS_tenant_tokens); !tokens.empty()) {
    auto a = kvstore::Authenticator::Open(tokens, Clock::Real(), absl::GetFlag(FLAGS_tenant_tokens_reload));
    if (!a.ok()) {
      KV_LOG(ERROR) << "--tenant-tokens: " << a.status().message();
      return 2;
    }
    auth = std::move(*a);
    kvstore::Authenticator* raw = auth.get();
    options.tenant_limits = [raw](const std::string& tenant) { return raw->LimitsOf(tenant); };
  }
  kvstore::Node node(options, transport.get(), Clock::Real());
  if (auth != nullptr) {
    // A tenant whose last token was removed loses its workers' attachments and open ingests.
    auth->SetRevokeHook([&node](const std::string& tenant) { node.RevokeTenant(tenant); });
  }
  if (!node.arena_status().ok()) {
    KV_LOG(ERROR) << "KV storage: " << node.arena_status();
    return 1;
  }
  kvstore::GrpcService service(&node, absl::GetFlag(FLAGS_rpc_threads));
  const size_t num_peers = peers.peers.size();
  service.SetPeers(std::move(peers));
  service.SetAuthenticator(auth.get());
  if (absl::Status s = service.SetUnimplemented(absl::GetFlag(FLAGS_fault_unimplemented));
      !s.ok()) {
    KV_LOG(ERROR) << "--fault-unimplemented: " << s.message();
    return 2;
  }
  if (!absl::GetFlag(FLAGS_fault_unimplemented).empty()) {
    KV_LOG(WARNING) << "fault injection: answering UNIMPLEMENTED to "
                    << absl::StrJoin(absl::GetFlag(FLAGS_fault_unimplemented), ", ");
  }
  // kvrecallctl drain: the health status turns NOT_SERVING, so a readiness probe takes the node
  // out of its Service while it keeps serving the sequences it holds.
  std::atomic<grpc::Server*> serving{nullptr};
  service.SetDrainHook([&serving](bool draining) {
    if (grpc::Server* s = serving.load(); s != nullptr) s->GetHealthCheckService()->SetServingStatus(!draining);
  });

  auto credentials = kvstore::MakeServerCredentials(
      {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key), absl::GetFlag(FLAGS_tls_ca),
       absl::GetFlag(FLAGS_allow_plaintext)},
      absl::GetFlag(FLAGS_listen));
  if (!credentials.ok()) {
    KV_LOG(ERROR) << credentials.status().message();
    return 2;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), *credentials, &port);
  builder.SetMaxReceiveMessageSize(kvstore::kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kvstore::kMaxMessageBytes);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    KV_LOG(ERROR) << "cannot serve on " << absl::GetFlag(FLAGS_listen);
    return 1;
  }
  serving.store(server.get());

  HttpServer http;
  int metrics_port = -1;
  if (absl::GetFlag(FLAGS_metrics_port) >= 0) {
    http.Handle("/metrics", [&node] {
      // Per-tenant families first: rendering them also refreshes the node-level gauges.
      std::string tenants = node.RenderTenantMetrics();
      return Metrics::Global().RenderPrometheus() + tenants;
    });
    http.Handle("/healthz", [] { return std::string("ok\n"); });
    auto p = http.Start(absl::GetFlag(FLAGS_metrics_host), absl::GetFlag(FLAGS_metrics_port));
    if (!p.ok()) {
      KV_LOG(ERROR) << p.status();
      return 1;
    }
    metrics_port = *p;
  }

  const char* security = !absl::GetFlag(FLAGS_tls_cert).empty()
                             ? (absl::GetFlag(FLAGS_tls_ca).empty() ? "TLS" : "mutual TLS")
                             : "plaintext";
  KV_LOG(INFO) << "kvrecall-server serving on port " << port << " (" << absl::GetFlag(FLAGS_listen) << ", "
               << security << (auth ? ", bearer tokens" : "") << "), memory " << FormatBytes(*memory) << ", transport "
               << (transport ? std::string(transport->name()) : "none") << ", metrics port " << metrics_port
               << ", data dir " << (options.data_dir.empty() ? "(none: no eviction)" : options.data_dir)
               << (num_peers > 0 ? absl::StrCat(", one of ", num_peers, " peers as ", absl::GetFlag(FLAGS_advertise))
                                 : std::string());
  if (const std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    const std::string tmp = pf + ".tmp";
    std::ofstream(tmp) << port << " " << metrics_port << "\n";
    std::rename(tmp.c_str(), pf.c_str());
  }

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  KV_LOG(INFO) << "shutting down";
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  http.Stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvrecall-server: a node of the kvrecall KV-cache memory tier");
  kvrecall::ParseFlags(argc, argv);
  return Run();
}
