// One session's token stream and its full KV cache on the tier node.
//
// Storage: per layer, a list of blocks of `block_tokens` tokens; a block holds
//   K[num_kv_heads][block_tokens][head_dim] followed by V of the same shape, in kv_dtype.
// Tokens [0, committed_tokens()) of every layer are immutable once committed; appends write
// beyond them inside an AppendTxn, which either commits (all layers equal length) or rolls back.
//
// Thread safety: all public methods are thread-safe. Readers take a Snapshot (block pointers and
// the committed length) and then read without locks: committed rows never change, and blocks are
// freed only by rollback (never committed ones) or by the destructor (after the last shared_ptr).
#ifndef KVRECALL_KVSTORE_SEQUENCE_H_
#define KVRECALL_KVSTORE_SEQUENCE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/model_spec.h"
#include "indexer/paged_rows.h"
#include "kvstore/memory_budget.h"

namespace kvrecall::kvstore {

class Sequence {
 public:
  Sequence(std::string tenant, std::string id, std::shared_ptr<const ModelSpec> spec, int block_tokens,
           MemoryBudget* budget);
  ~Sequence();  // releases its blocks' bytes from the budget

  const std::string& tenant() const { return tenant_; }
  const std::string& id() const { return id_; }
  const ModelSpec& spec() const { return *spec_; }

  // Committed KV rows of one (layer, kv-head), valid while the caller holds the shared_ptr to
  // this Sequence. REQUIRES: layer and kv_head in range.
  struct Snapshot {
    indexer::PagedRows keys;
    indexer::PagedRows values;
  };
  Snapshot Read(int layer, int kv_head) const;

  int64_t committed_tokens() const;
  int64_t known_token_ids() const;
  std::vector<int32_t> token_ids() const;
  int64_t bytes() const;
  bool closed() const;
  void set_closed(bool closed);

  // Appends token ids (prompt or decode tokens) starting at index `start`; ids already known
  // must match (FAILED_PRECONDITION otherwise), new ones must be contiguous.
  absl::Status AddTokenIds(int64_t start, absl::Span<const int32_t> ids);

  // Opens the (single) write transaction. ABORTED if another is open.
  absl::Status BeginAppend();
  // Writes one chunk: rows [token_start, token_start + n) of `layer`.
  //   keys, values: [num_kv_heads][n][head_dim] in kv_dtype (exactly that many bytes).
  // FAILED_PRECONDITION if token_start is not the layer's current length or ids of those tokens
  // are unknown; RESOURCE_EXHAUSTED when the budget is full. REQUIRES: BeginAppend succeeded.
  absl::Status AppendChunk(int layer, int64_t token_start, int64_t n, absl::Span<const uint8_t> keys,
                           absl::Span<const uint8_t> values);
  // Commits when every layer has the same length (FAILED_PRECONDITION otherwise, and rolls back).
  // Returns the committed token count.
  absl::StatusOr<int64_t> CommitAppend();
  // Drops everything written since BeginAppend.
  void AbortAppend();

 private:
  void TruncateLocked(int64_t tokens) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  size_t block_bytes() const { return 2 * static_cast<size_t>(spec_->num_kv_heads) * block_tokens_ * spec_->row_bytes(); }

  const std::string tenant_;
  const std::string id_;
  const std::shared_ptr<const ModelSpec> spec_;
  const int block_tokens_;
  MemoryBudget* const budget_;

  mutable absl::Mutex mu_;
  std::vector<int32_t> token_ids_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<std::unique_ptr<uint8_t[]>>> blocks_ ABSL_GUARDED_BY(mu_);  // [layer][block]
  std::vector<int64_t> layer_tokens_ ABSL_GUARDED_BY(mu_);
  int64_t committed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t token_ids_at_begin_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool appending_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_SEQUENCE_H_
