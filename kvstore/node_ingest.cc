// Node's bulk ingest (AllocateBlocks / CommitBlocks) and draining; the rest of Node is node.cc.
#include <algorithm>
#include <atomic>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "kvstore/internal/crc32c.h"
#include "kvstore/node.h"

namespace kvrecall::kvstore {
namespace {

constexpr int64_t kMaxIngestTokens = int64_t{1} << 20;

struct IngestMetrics {
  Counter* ingests = Metrics::Global().GetCounter(
      "kvrecall_ingests_total", "Bulk ingest transactions (AllocateBlocks) committed");
  Counter* ingest_bytes = Metrics::Global().GetCounter(
      "kvrecall_ingest_bytes_total", "K/V bytes committed by bulk ingest over the transport");
  Counter* ingest_aborts = Metrics::Global().GetCounter(
      "kvrecall_ingest_aborts_total", "Bulk ingest transactions aborted (by the client, a failed check or lease expiry)");
};
IngestMetrics& IM() {
  static IngestMetrics* m = new IngestMetrics();
  return *m;
}

// CRC-32C of what an ingest wrote into one slot: the K rows of tokens [lo, hi) of the block for
// kv-head 0, 1, ..., then the V rows in the same order (proto CommitBlocksRequest.checksums).
uint32_t SlotChecksum(const uint8_t* slot, const ModelSpec& spec, int block_tokens, int64_t lo, int64_t hi) {
  const size_t row = spec.row_bytes();
  const size_t head = static_cast<size_t>(block_tokens) * row;
  const size_t v = static_cast<size_t>(spec.num_kv_heads) * head;
  const size_t off = static_cast<size_t>(lo) * row;
  const size_t len = static_cast<size_t>(hi - lo) * row;
  uint32_t crc = 0;
  for (int h = 0; h < spec.num_kv_heads; ++h) crc = internal::Crc32cExtend(crc, slot + h * head + off, len);
  for (int h = 0; h < spec.num_kv_heads; ++h) crc = internal::Crc32cExtend(crc, slot + v + h * head + off, len);
  return crc;
}

}  // namespace

void Node::ExpireIngests() {
  const absl::Time now = clock_->Now();
  for (Ingest& in : TakeIngests([now](const Ingest& in) { return in.deadline <= now; })) {
    KV_LOG(WARNING) << "ingest of sequence '" << in.key.second << "' (tenant '" << in.key.first
                    << "') was not committed within its lease; aborted";
    in.seq->AbortAppend();
    IM().ingest_aborts->Add(1);
  }
}

std::vector<Node::Ingest> Node::TakeIngests(const std::function<bool(const Ingest&)>& pred) {
  std::vector<Ingest> taken;
  absl::MutexLock lock(&ingest_mu_);
  for (auto it = ingests_.begin(); it != ingests_.end();) {
    if (pred(it->second)) {
      taken.push_back(std::move(it->second));
      ingests_.erase(it++);
    } else {
      ++it;
    }
  }
  return taken;
}

absl::StatusOr<IngestGrant> Node::AllocateBlocks(const AllocateBlocksArgs& args) {
  if (args.num_tokens <= 0 || args.num_tokens > kMaxIngestTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens ", args.num_tokens, " outside [1, ", kMaxIngestTokens, "]"));
  }
  if (args.token_start < 0 || args.token_ids_start < 0 ||
      static_cast<int64_t>(args.token_ids.size()) > kMaxIngestTokens) {
    return absl::InvalidArgumentError("negative token_start / token_ids_start or too many token_ids");
  }
  if (!arena_->registered()) {
    return absl::UnimplementedError(
        "this node's arena is not registered with a data transport (--transport=none?); append over AppendKV");
  }
  ASSIGN_OR_RETURN(transport::RemoteRegion region, arena_->Describe());
  ExpireIngests();
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, FindSequence(args.tenant, args.sequence_id));
  if (seq->committed_tokens() != args.token_start) {
    return absl::FailedPreconditionError(absl::StrCat("sequence '", args.sequence_id, "' has ",
                                                      seq->committed_tokens(), " tokens committed; the ingest starts at ",
                                                      args.token_start));
  }
  RETURN_IF_ERROR(seq->BeginAppend());
  Ingest in;
  in.key = {args.tenant, args.sequence_id};
  in.token_start = args.token_start;
  in.num_tokens = args.num_tokens;
  const int bt = options_.block_tokens;
  in.first_block = args.token_start / bt;
  in.num_blocks = static_cast<int>((args.token_start + args.num_tokens + bt - 1) / bt - in.first_block);
  absl::Status s;
  if (!args.token_ids.empty()) s = seq->AddTokenIds(args.token_ids_start, args.token_ids);
  // A commit may have landed between the check above and BeginAppend.
  if (s.ok() && seq->committed_tokens() != args.token_start) {
    s = absl::FailedPreconditionError("the sequence grew while the ingest was being set up; retry");
  }
  if (s.ok()) s = seq->ReserveRows(args.token_start, args.num_tokens, &in.slots);
  if (!s.ok()) {
    seq->AbortAppend();
    return s;
  }
  IngestGrant g;
  g.transport = std::string(transport_ != nullptr ? transport_->name() : "");
  g.region = std::move(region);
  g.block_tokens = bt;
  g.first_block = in.first_block;
  g.num_blocks = in.num_blocks;
  g.slot_offsets.reserve(in.slots.size());
  for (uint8_t* slot : in.slots) g.slot_offsets.push_back(static_cast<uint64_t>(slot - arena_->base()));
  g.lease = options_.ingest_lease;
  in.seq = std::move(seq);
  in.deadline = clock_->Now() + options_.ingest_lease;
  absl::MutexLock lock(&ingest_mu_);
  // Ids are not guessable by counting alone; CommitBlocks also checks the tenant and sequence.
  do {
    g.ingest_id = (++next_ingest_ << 20) ^ (reinterpret_cast<uintptr_t>(in.seq.get()) >> 4);
  } while (g.ingest_id == 0 || ingests_.contains(g.ingest_id));
  ingests_.emplace(g.ingest_id, std::move(in));
  return g;
}

absl::StatusOr<CommitBlocksOutcome> Node::CommitBlocks(const CommitBlocksArgs& args) {
  ExpireIngests();
  Ingest in;
  {
    absl::MutexLock lock(&ingest_mu_);
    auto it = ingests_.find(args.ingest_id);
    if (it == ingests_.end() || it->second.key != SeqKey{args.tenant, args.sequence_id}) {
      return absl::NotFoundError(absl::StrCat("no open ingest ", args.ingest_id, " of sequence '", args.sequence_id,
                                              "' (committed, aborted or its lease ran out)"));
    }
    in = std::move(it->second);
    ingests_.erase(it);
  }
  // From here the transaction ends either way.
  if (args.abort) {
    in.seq->AbortAppend();
    IM().ingest_aborts->Add(1);
    return CommitBlocksOutcome{in.seq->committed_tokens(), 0};
  }
  const ModelSpec& spec = in.seq->spec();
  const size_t want = static_cast<size_t>(spec.num_layers) * static_cast<size_t>(in.num_blocks);
  absl::Status s;
  if (args.checksums.size() != want) {
    s = absl::InvalidArgumentError(absl::StrCat("checksums must be [", spec.num_layers, "][", in.num_blocks,
                                                "] = ", want, " values; got ", args.checksums.size()));
  }
  if (s.ok()) {
    const int bt = options_.block_tokens;
    const int64_t end = in.token_start + in.num_tokens;
    std::atomic<int64_t> bad{-1};
    pool_.ParallelFor(static_cast<int64_t>(want), [&](int64_t i) {
      const int64_t b = in.first_block + i % in.num_blocks;
      const int64_t lo = std::max(in.token_start, b * bt) - b * bt;
      const int64_t hi = std::min(end, (b + 1) * bt) - b * bt;
      if (SlotChecksum(in.slots[static_cast<size_t>(i)], spec, bt, lo, hi) != args.checksums[static_cast<size_t>(i)]) {
        int64_t none = -1;
        bad.compare_exchange_strong(none, i);
      }
    });
    if (const int64_t i = bad.load(); i >= 0) {
      s = absl::DataLossError(absl::StrCat("ingest of sequence '", args.sequence_id, "': layer ", i / in.num_blocks,
                                           " block ", in.first_block + i % in.num_blocks,
                                           " does not match its checksum (a put was lost or truncated); "
                                           "nothing was committed"));
    }
  }
  if (s.ok()) s = in.seq->CompleteRows(in.token_start, in.num_tokens);
  if (!s.ok()) {
    in.seq->AbortAppend();
    IM().ingest_aborts->Add(1);
    return s;
  }
  ASSIGN_OR_RETURN(int64_t stored, in.seq->CommitAppend());
  const int64_t bytes = 2 * in.num_tokens * spec.num_layers * spec.num_kv_heads * static_cast<int64_t>(spec.row_bytes());
  ingests_committed_.fetch_add(1);
  ingest_bytes_.fetch_add(bytes);
  IM().ingests->Add(1);
  IM().ingest_bytes->Add(static_cast<double>(bytes));
  return CommitBlocksOutcome{stored, bytes};
}

int64_t Node::SetDraining(bool draining) {
  if (draining_.exchange(draining) != draining) {
    KV_LOG(INFO) << (draining ? "draining: new sequences are refused" : "undrained: accepting new sequences");
  }
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(sequences_.size());
}

}  // namespace kvrecall::kvstore
