// kvrecallctl: operate kvrecall tier nodes.
//
//   kvrecallctl --server=127.0.0.1:7070 status       node summary
//   kvrecallctl --server=127.0.0.1:7070 sequences    one line per stored sequence
//   add --json for machine-readable output.
#include <cstdio>
#include <iostream>

#include "absl/flags/flag.h"
#include "common/flags.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "common/units.h"
#include "grpcpp/grpcpp.h"
#include "proto/convert.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"

ABSL_FLAG(std::string, server, "127.0.0.1:7070", "kvrecall-server address (host:port)");
ABSL_FLAG(bool, json, false, "print JSON instead of a table");
ABSL_FLAG(int, timeout_seconds, 10, "deadline of each call");

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

int Main(const std::string& command) {
  using namespace kvrecall;
  auto channel = grpc::CreateChannel(absl::GetFlag(FLAGS_server), grpc::InsecureChannelCredentials());
  auto stub = v1::KvRecall::NewStub(channel);
  v1::StatsRequest req;
  req.set_include_sequences(command == "sequences");
  v1::StatsResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_timeout_seconds)));
  const absl::Status s = proto::FromGrpc(stub->Stats(&ctx, req, &resp));
  if (!s.ok()) {
    std::cerr << "kvrecallctl: " << absl::GetFlag(FLAGS_server) << ": " << s << "\n";
    return 1;
  }
  const bool json = absl::GetFlag(FLAGS_json);
  if (command == "status") {
    if (json) {
      std::cout << absl::StrFormat(
          "{\"server\":\"%s\",\"version\":\"%s\",\"uptime_seconds\":%d,\"memory_limit_bytes\":%d,"
          "\"stored_bytes\":%d,\"sequences\":%d,\"models\":%d,\"workers\":%d,\"retrieve_calls\":%d,"
          "\"retrieve_entries\":%d,\"bytes_streamed\":%d}\n",
          JsonEscape(absl::GetFlag(FLAGS_server)), JsonEscape(resp.version()), resp.uptime_seconds(),
          resp.memory_limit_bytes(), resp.stored_bytes(), resp.num_sequences(), resp.num_models(),
          resp.num_workers(), resp.retrieve_calls(), resp.retrieve_entries(), resp.bytes_streamed());
    } else {
      std::cout << absl::StrFormat(
          "server          %s\nversion         %s\nuptime          %ds\nmemory          %s used of %s (%.1f%%)\n"
          "sequences       %d\nmodels          %d\nworkers         %d\nretrieve calls  %d (%d entries)\n"
          "bytes streamed  %s\n",
          absl::GetFlag(FLAGS_server), resp.version(), resp.uptime_seconds(), FormatBytes(resp.stored_bytes()),
          FormatBytes(resp.memory_limit_bytes()),
          100.0 * static_cast<double>(resp.stored_bytes()) / static_cast<double>(std::max<int64_t>(1, resp.memory_limit_bytes())),
          resp.num_sequences(), resp.num_models(), resp.num_workers(), resp.retrieve_calls(), resp.retrieve_entries(),
          FormatBytes(resp.bytes_streamed()));
    }
    return 0;
  }
  if (json) {
    std::cout << "[";
    for (int i = 0; i < resp.sequences_size(); ++i) {
      const auto& q = resp.sequences(i);
      std::cout << (i ? "," : "")
                << absl::StrFormat("{\"tenant\":\"%s\",\"sequence_id\":\"%s\",\"model_id\":\"%s\",\"tokens\":%d,"
                                   "\"bytes\":%d,\"state\":\"%s\"}",
                                   JsonEscape(q.tenant()), JsonEscape(q.sequence_id()), JsonEscape(q.model_id()),
                                   q.stored_tokens(), q.bytes(), q.state());
    }
    std::cout << "]\n";
  } else {
    std::cout << absl::StrFormat("%-16s %-24s %-16s %10s %12s %s\n", "TENANT", "SEQUENCE", "MODEL", "TOKENS", "BYTES",
                                 "STATE");
    for (const auto& q : resp.sequences()) {
      std::cout << absl::StrFormat("%-16s %-24s %-16s %10d %12s %s\n", q.tenant(), q.sequence_id(), q.model_id(),
                                   q.stored_tokens(), FormatBytes(q.bytes()), q.state());
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvrecallctl [--server=host:port] [--json] status|sequences\n"
      "  status     node summary: memory, sequences, workers, retrieval counters\n"
      "  sequences  one line per stored sequence");
  std::vector<std::string> args = kvrecall::ParseFlags(argc, argv);
  if (args.size() != 2 || (args[1] != "status" && args[1] != "sequences")) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  return Main(args[1]);
}
