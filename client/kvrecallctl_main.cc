// kvrecallctl: operate kvrecall tier nodes.
//
//   kvrecallctl --server=127.0.0.1:7070 status       node summary
//   kvrecallctl --server=127.0.0.1:7070 drain        take the node out of service (undrain: back)
//   kvrecallctl --server=127.0.0.1:7070 sequences    one line per stored sequence
//   kvrecallctl --server=127.0.0.1:7070 stats        storage: arena, sharing, per-tenant usage
//   kvrecallctl --server=127.0.0.1:7070 drop --tenant=T --sequence=S
//                                                    remove a sequence and release its blocks
//   add --json for machine-readable output; --tls-ca=CA.pem (and --tls-cert/--tls-key for mutual
//   TLS) to reach a server that serves TLS.
#include <cstdio>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "client/channel.h"
#include "common/flags.h"
#include "common/units.h"
#include "grpcpp/grpcpp.h"
#include "proto/convert.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"

ABSL_FLAG(std::string, server, "127.0.0.1:7070", "kvrecall-server address (host:port)");
ABSL_FLAG(bool, json, false, "print JSON instead of a table");
ABSL_FLAG(int, timeout_seconds, 10, "deadline of each call");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA bundle of the server's certificate: connect over TLS");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate, for servers that require one (mutual TLS)");
ABSL_FLAG(std::string, tls_key, "", "private key of --tls-cert");
ABSL_FLAG(std::string, tls_server_name, "", "name to check in the server's certificate (default: the host)");
ABSL_FLAG(std::string, token_file, "",
          "file holding the bearer token for servers run with --tenant-tokens (a tenant's token: "
          "its own stats and sequences; an admin token: everything, and drain)");
ABSL_FLAG(std::string, tenant, "", "drop: the sequence's tenant");
ABSL_FLAG(std::string, sequence, "", "drop: the sequence id");

namespace {

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
      continue;
    }
    out += c;
  }
  return out;
}

double Ratio(int64_t num, int64_t den) {
  return den > 0 ? static_cast<double>(num) / static_cast<double>(den) : 0;
}

void SetDeadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::seconds(absl::GetFlag(FLAGS_timeout_seconds)));
}

int Drop(kvrecall::v1::KvRecall::Stub* stub) {
  using namespace kvrecall;
  const std::string tenant = absl::GetFlag(FLAGS_tenant), sequence = absl::GetFlag(FLAGS_sequence);
  if (tenant.empty() || sequence.empty()) {
    std::cerr << "kvrecallctl drop: --tenant and --sequence are required\n";
    return 2;
  }
  v1::CloseSequenceRequest req;
  req.set_tenant(tenant);
  req.set_sequence_id(sequence);
  req.set_drop(true);
  v1::CloseSequenceResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  const absl::Status s = proto::FromGrpc(stub->CloseSequence(&ctx, req, &resp));
  if (!s.ok()) {
    std::cerr << "kvrecallctl: " << absl::GetFlag(FLAGS_server) << ": " << s << "\n";
    return 1;
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << absl::StrFormat("{\"dropped\":{\"tenant\":\"%s\",\"sequence_id\":\"%s\"}}\n",
                                 JsonEscape(tenant), JsonEscape(sequence));
  } else {
    std::cout << "dropped " << tenant << "/" << sequence << "\n";
  }
  return 0;
}

void PrintStats(const kvrecall::v1::StatsResponse& resp, bool json) {
  using kvrecall::FormatBytes;
  if (json) {
    std::cout << absl::StrFormat(
        "{\"server\":\"%s\",\"memory_limit_bytes\":%d,\"stored_bytes\":%d,\"logical_bytes\":%d,"
        "\"arena_block_bytes\":%d,\"arena_hugepages\":\"%s\",\"arena_registered\":%s,\"blocks\":%d,"
        "\"shared_blocks\":%d,\"prompt_tokens\":%d,\"matched_tokens\":%d,\"prefix_hit_rate\":%.6f,"
        "\"evictions\":%d,\"spilled_bytes\":%d,\"spilled_blocks\":%d,\"reloads\":%d,"
        "\"tenants\":[",
        JsonEscape(absl::GetFlag(FLAGS_server)), resp.memory_limit_bytes(), resp.stored_bytes(),
        resp.logical_bytes(), resp.arena_block_bytes(), JsonEscape(resp.arena_hugepages()),
        resp.arena_registered() ? "true" : "false", resp.blocks(), resp.shared_blocks(),
        resp.prompt_tokens(), resp.matched_tokens(),
        Ratio(resp.matched_tokens(), resp.prompt_tokens()), resp.evictions(), resp.spilled_bytes(),
        resp.spilled_blocks(), resp.reloads());
    for (int i = 0; i < resp.tenants_size(); ++i) {
      const auto& t = resp.tenants(i);
      std::cout << (i ? "," : "")
                << absl::StrFormat(
                       "{\"tenant\":\"%s\",\"sequences\":%d,\"tokens\":%d,\"bytes\":%d,"
                       "\"logical_bytes\":%d,\"unique_blocks\":%d,\"shared_blocks\":%d,"
                       "\"prompt_tokens\":%d,\"matched_tokens\":%d,\"prefix_hit_rate\":%.6f}",
                       JsonEscape(t.tenant()), t.sequences(), t.tokens(), t.bytes(),
                       t.logical_bytes(), t.unique_blocks(), t.shared_blocks(), t.prompt_tokens(),
                       t.matched_tokens(), Ratio(t.matched_tokens(), t.prompt_tokens()));
    }
    std::cout << "]}\n";
    return;
  }
  std::cout << absl::StrFormat(
      "memory          %s used of %s (%.1f%%), %s referenced by sequences\n"
      "arena           %s slots, hugepages %s, %s\n"
      "blocks          %d (%d shared)\n"
      "prefix hits     %d of %d prompt tokens (%.1f%%)\n"
      "evictions       %d\nspilled         %s in %d blocks, %d reloads\n\n",
      FormatBytes(resp.stored_bytes()), FormatBytes(resp.memory_limit_bytes()),
      100.0 * Ratio(resp.stored_bytes(), resp.memory_limit_bytes()),
      FormatBytes(resp.logical_bytes()), FormatBytes(resp.arena_block_bytes()),
      resp.arena_hugepages(),
      resp.arena_registered() ? "registered with the transport" : "not registered", resp.blocks(),
      resp.shared_blocks(), resp.matched_tokens(), resp.prompt_tokens(),
      100.0 * Ratio(resp.matched_tokens(), resp.prompt_tokens()), resp.evictions(),
      FormatBytes(resp.spilled_bytes()), resp.spilled_blocks(), resp.reloads());
  std::cout << absl::StrFormat("%-16s %5s %10s %12s %12s %8s %8s %8s\n", "TENANT", "SEQS", "TOKENS",
                               "BYTES", "LOGICAL", "UNIQUE", "SHARED", "HIT%");
  for (const auto& t : resp.tenants()) {
    std::cout << absl::StrFormat(
        "%-16s %5d %10d %12s %12s %8d %8d %7.1f%%\n", t.tenant(), t.sequences(), t.tokens(),
        FormatBytes(t.bytes()), FormatBytes(t.logical_bytes()), t.unique_blocks(),
        t.shared_blocks(), 100.0 * Ratio(t.matched_tokens(), t.prompt_tokens()));
  }
}

// drain / undrain: flips the node's draining state (grpc health NOT_SERVING, no new sequences).
int Drain(kvrecall::v1::KvRecall::Stub* stub, bool draining) {
  using namespace kvrecall;
  v1::DrainRequest req;
  req.set_draining(draining);
  v1::DrainResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  const absl::Status s = proto::FromGrpc(stub->Drain(&ctx, req, &resp));
  if (!s.ok()) {
    std::cerr << "kvrecallctl: " << absl::GetFlag(FLAGS_server) << ": " << s << "\n";
    return 1;
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << absl::StrFormat("{\"server\":\"%s\",\"draining\":%s,\"sequences\":%d}\n",
                                 JsonEscape(absl::GetFlag(FLAGS_server)), resp.draining() ? "true" : "false",
                                 resp.num_sequences());
  } else if (resp.draining()) {
    std::cout << absl::GetFlag(FLAGS_server) << " is draining: health NOT_SERVING, no new sequences; "
              << resp.num_sequences() << " sequences still held\n";
  } else {
    std::cout << absl::GetFlag(FLAGS_server) << " accepts new sequences again\n";
  }
  return 0;
}

int Main(const std::string& command) {
  using namespace kvrecall;
  auto channel = client::OpenChannel(absl::GetFlag(FLAGS_server),
                                     {absl::GetFlag(FLAGS_tls_ca), absl::GetFlag(FLAGS_tls_cert),
                                      absl::GetFlag(FLAGS_tls_key), absl::GetFlag(FLAGS_tls_server_name),
                                      absl::GetFlag(FLAGS_token_file)});
  if (!channel.ok()) {
    std::cerr << "kvrecallctl: " << channel.status().message() << "\n";
    return 2;
  }
  auto stub = v1::KvRecall::NewStub(*channel);
  if (command == "drop") return Drop(stub.get());
  if (command == "drain" || command == "undrain") return Drain(stub.get(), command == "drain");
  v1::StatsRequest req;
  req.set_include_sequences(command == "sequences");
  v1::StatsResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  const absl::Status s = proto::FromGrpc(stub->Stats(&ctx, req, &resp));
  if (!s.ok()) {
    std::cerr << "kvrecallctl: " << absl::GetFlag(FLAGS_server) << ": " << s << "\n";
    return 1;
  }
  const bool json = absl::GetFlag(FLAGS_json);
  if (command == "stats") {
    PrintStats(resp, json);
    return 0;
  }
  if (command == "status") {
    if (json) {
      std::cout << absl::StrFormat(
          "{\"server\":\"%s\",\"version\":\"%s\",\"uptime_seconds\":%d,\"memory_limit_bytes\":%d,"
          "\"stored_bytes\":%d,\"sequences\":%d,\"models\":%d,\"workers\":%d,\"retrieve_calls\":%d,"
          "\"retrieve_entries\":%d,\"bytes_streamed\":%d,\"ingests\":%d,\"ingest_bytes\":%d,"
          "\"draining\":%s}\n",
          JsonEscape(absl::GetFlag(FLAGS_server)), JsonEscape(resp.version()), resp.uptime_seconds(),
          resp.memory_limit_bytes(), resp.stored_bytes(), resp.num_sequences(), resp.num_models(),
          resp.num_workers(), resp.retrieve_calls(), resp.retrieve_entries(), resp.bytes_streamed(),
          resp.ingests(), resp.ingest_bytes(), resp.draining() ? "true" : "false");
    } else {
      std::cout << absl::StrFormat(
          "server          %s\nversion         %s\nuptime          %ds\nmemory          %s used of "
          "%s (%.1f%%)\n"
          "sequences       %d\nmodels          %d\nworkers         %d\nretrieve calls  %d (%d "
          "entries)\n"
          "bytes streamed  %s\ningested        %s over the transport in %d transactions\n"
          "state           %s\n",
          absl::GetFlag(FLAGS_server), resp.version(), resp.uptime_seconds(),
          FormatBytes(resp.stored_bytes()), FormatBytes(resp.memory_limit_bytes()),
          100.0 * Ratio(resp.stored_bytes(), std::max<int64_t>(1, resp.memory_limit_bytes())),
          resp.num_sequences(), resp.num_models(), resp.num_workers(), resp.retrieve_calls(),
          resp.retrieve_entries(), FormatBytes(resp.bytes_streamed()), FormatBytes(resp.ingest_bytes()),
          resp.ingests(), resp.draining() ? "draining (no new sequences)" : "serving");
    }
    return 0;
  }
  if (json) {
    std::cout << "[";
    for (int i = 0; i < resp.sequences_size(); ++i) {
      const auto& q = resp.sequences(i);
      std::cout
          << (i ? "," : "")
          << absl::StrFormat(
                 "{\"tenant\":\"%s\",\"sequence_id\":\"%s\",\"model_id\":\"%s\",\"tokens\":%d,"
                 "\"bytes\":%d,\"state\":\"%s\",\"blocks\":%d,\"shared_blocks\":%d,"
                 "\"matched_tokens\":%d}",
                 JsonEscape(q.tenant()), JsonEscape(q.sequence_id()), JsonEscape(q.model_id()),
                 q.stored_tokens(), q.bytes(), q.state(), q.blocks(), q.shared_blocks(),
                 q.matched_tokens());
    }
    std::cout << "]\n";
  } else {
    std::cout << absl::StrFormat("%-16s %-24s %-16s %10s %12s %8s %8s %s\n", "TENANT", "SEQUENCE",
                                 "MODEL", "TOKENS", "BYTES", "BLOCKS", "SHARED", "STATE");
    for (const auto& q : resp.sequences()) {
      std::cout << absl::StrFormat(
          "%-16s %-24s %-16s %10d %12s %8d %8d %s\n", q.tenant(), q.sequence_id(), q.model_id(),
          q.stored_tokens(), FormatBytes(q.bytes()), q.blocks(), q.shared_blocks(), q.state());
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvrecallctl [--server=host:port] [--json] status|sequences|stats|drop|drain|undrain\n"
      "  status     node summary: memory, sequences, workers, retrieval counters\n"
      "  sequences  one line per stored sequence (blocks, shared blocks)\n"
      "  stats      storage: arena, blocks, prefix hit rate, evictions, spilled bytes, per-tenant "
      "usage\n"
      "  drop       --tenant=T --sequence=S: remove a sequence and release its blocks\n"
      "  drain      take the node out of service: health NOT_SERVING (readiness fails), new\n"
      "             sequences refused with UNAVAILABLE (clients place them elsewhere); the\n"
      "             sequences it holds are still served\n"
      "  undrain    accept new sequences again");
  std::vector<std::string> args = kvrecall::ParseFlags(argc, argv);
  if (args.size() != 2 ||
      (args[1] != "status" && args[1] != "sequences" && args[1] != "stats" && args[1] != "drop" &&
       args[1] != "drain" && args[1] != "undrain")) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  return Main(args[1]);
}
