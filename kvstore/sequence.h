// One session's token stream and its full KV cache on the tier node.
//
// Storage: a list of KV blocks (block_table.h) of `block_tokens` tokens each; block b holds
// tokens [b * block_tokens, (b + 1) * block_tokens) of every layer, one arena slot per layer,
//   slot = K[num_kv_heads][block_tokens][head_dim] followed by V of the same shape, in kv_dtype.
// Tokens [0, committed_tokens()) of every layer are immutable once committed; appends write
// beyond them inside an AppendTxn, which either commits (all layers equal length) or rolls back.
//
// Prefix sharing: a new sequence may start with blocks other sequences of the same namespace
// and model committed (AdoptSharedPrefix); every full block this sequence commits is published
// for others. Shared blocks are always full and below committed_tokens(), so appends never
// write into them.
//
// Eviction (block_table.h): a Snapshot pins the blocks it points into, so they stay resident
// (spilled ones are reloaded by Read and ReadLayer) until the last copy of every Snapshot of the
// same call is gone (a call's snapshots share one pin); an append
// transaction pins the blocks it writes until it commits or aborts. Every write renews the
// blocks' leases, and reads do at most every lease / 4 (BlockTable::touch_interval_ns): a read
// pin costs O(1) for a sequence whose blocks it already saw resident (BlockTable::PinForRead).
//
// Thread safety: all public methods are thread-safe. Readers take a Snapshot (block pointers and
// the committed length) and then read without locks: committed rows never change, and blocks are
// released only by rollback (never committed ones) or by the destructor (after the last
// shared_ptr to the Sequence is gone).
#ifndef KVRECALL_KVSTORE_SEQUENCE_H_
#define KVRECALL_KVSTORE_SEQUENCE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/model_spec.h"
#include "indexer/paged_rows.h"
#include "kvstore/block_table.h"
#include "kvstore/content_hash.h"
#include "kvstore/sequence_index.h"
#include "kvstore/tenant_account.h"

namespace kvrecall::kvstore {

class Sequence {
 public:
  // `table` must outlive the sequence and its arena's slot size must be >= the model's layer
  // block (2 * num_kv_heads * block_tokens * row_bytes). `share_namespace` salts the content
  // keys of its blocks (content_hash.h): sequences share blocks only within one namespace.
  // durable: every commit is written through the table's store (BlockTable::PersistCommit)
  // together with this sequence's metadata record before CommitAppend returns.
  // account (may be null: unlimited): the tenant's quota account (tenant_account.h). The caller
  // has already added this sequence to it (AddSequence); the sequence charges its committed
  // tokens' logical bytes there (commits over the quota fail with RESOURCE_EXHAUSTED, nothing
  // committed; a shared prefix that does not fit is not adopted) and gives both back when it is
  // destroyed.
  Sequence(std::string tenant, std::string id, std::shared_ptr<const ModelSpec> spec,
           int block_tokens, BlockTable* table, std::string share_namespace,
           bool durable = false, std::shared_ptr<TenantAccount> account = nullptr);
  ~Sequence();  // releases its block references and its quota charge

  const std::string& tenant() const { return tenant_; }
  const std::string& id() const { return id_; }
  const ModelSpec& spec() const { return *spec_; }
  const std::string& share_namespace() const { return namespace_; }

  // Committed KV rows of one (layer, kv-head), valid while the caller holds both the Snapshot
  // and the shared_ptr to this Sequence (destroy the Snapshot first). REQUIRES: layer and kv_head
  // in range. Reloads spilled blocks: DATA_LOSS when a spilled block is corrupt or missing,
  // RESOURCE_EXHAUSTED when the arena cannot make room for them.
  struct Snapshot {
    indexer::PagedRows keys;
    indexer::PagedRows values;
    // Holds the pins of every block the call read (all of its sequences' blocks, for
    // ReadLayer); released with the last copy of the last Snapshot of that call.
    std::shared_ptr<const void> pin;
  };
  absl::StatusOr<Snapshot> Read(int layer, int kv_head) const;
  // The same for several kv-heads of one layer at once, out[i] for kv_heads[i], under one pin of
  // the blocks (a decode step reads every kv-head of a sequence: pinning once per head would
  // take the block table's lock and touch every block that many times). REQUIRES: as Read.
  absl::StatusOr<std::vector<Snapshot>> Read(int layer, absl::Span<const int> kv_heads) const;
  // One layer of several sequences under one pin (a Retrieve reads every sequence of a decode
  // batch): out[i][j] is seqs[i]'s Snapshot of kv_heads[i][j]. The blocks are pinned in one call
  // of the block table, and a prefix of blocks that seqs[i] shares with seqs[i - 1] is pinned
  // once (sessions over one document share its blocks, so order them together). Each sequence's
  // kv-heads, K and V, share one page table (the layer's slot of each block, at per-head
  // offsets). REQUIRES: every sequence is of one BlockTable, kv_heads.size() == seqs.size(), and
  // the layer and kv-heads are in range. The snapshots are valid while the caller holds every
  // seqs[i] (their shared pin unpins all the call's blocks: destroy every Snapshot first).
  // Errors: as Read; a reload failure fails the whole call.
  static absl::StatusOr<std::vector<std::vector<Snapshot>>> ReadLayer(
      absl::Span<const Sequence* const> seqs, int layer,
      absl::Span<const std::vector<int>> kv_heads);
  // Renews the lease of every block (an access that reads no bytes).
  void Touch() const;

  // Gives the sequence's quota charge (its committed bytes and its place in the tenant's
  // sequence count) back now and charges nothing from here on. For a dropped sequence, whose
  // object in-flight calls may keep alive a little longer: a drop's refund is visible as soon as
  // the drop is acknowledged. The destructor does the same for a sequence not released.
  void ReleaseAccount();

  int64_t committed_tokens() const;
  // The content key (content_hash.h) of the published block that holds token `tokens - 1`: it
  // names this sequence's first `tokens` tokens (and the rest of that block) within its
  // namespace and model, so two sequences with the same PrefixKey(n) hold the same KV for
  // tokens [0, n). nullopt when that token is not committed or its block is not yet full.
  std::optional<ContentKey> PrefixKey(int64_t tokens) const;
  int64_t known_token_ids() const;
  std::vector<int32_t> token_ids() const;
  // Arena bytes referenced by this sequence (shared blocks counted in full).
  int64_t bytes() const;
  bool closed() const;
  void set_closed(bool closed);

  // The retrieval index (null until one is built or an automatic build started). Readers hold
  // the returned pointer for the duration of a search; ReplaceIndex swaps it atomically. Never an
  // on-disk stub (SequenceIndex::on_disk): index() loads one through the hooks' loader first
  // (which may read the store; without hooks it answers null).
  std::shared_ptr<const SequenceIndex> index() const;
  // The index as held, without loading (may be an on-disk stub).
  std::shared_ptr<const SequenceIndex> held_index() const;
  // Replaces the index by `next` only if it is still `expected` (pointer identity, null
  // included); true when replaced.
  bool ReplaceIndex(const SequenceIndex* expected, std::shared_ptr<const SequenceIndex> next);

  // The index lifecycle's hooks (index_manager.h), set once by the node right after creation.
  // load(seq, stub): returns the loaded index (or whatever replaced the stub). on_commit(seq,
  // committed): called after every successful CommitAppend, outside the sequence's lock; it must
  // not block on long work.
  struct IndexHooks {
    std::function<std::shared_ptr<const SequenceIndex>(const Sequence*,
                                                       std::shared_ptr<const SequenceIndex>)>
        load;
    std::function<void(const Sequence*, int64_t)> on_commit;
  };
  void set_index_hooks(std::shared_ptr<const IndexHooks> hooks);

  // How many of its blocks are currently resident in the arena.
  int64_t resident_blocks() const;

  struct Usage {
    int64_t tokens = 0;           // committed
    int64_t blocks = 0;           // referenced blocks
    int64_t shared_blocks = 0;    // of which referenced by other sequences too
    int64_t bytes = 0;            // arena bytes referenced (shared in full)
    double attributed_bytes = 0;  // each block's bytes / its refcount: sums to the arena's use
    int64_t adopted_tokens = 0;   // tokens that came from shared blocks when it was opened
  };
  Usage usage() const;

  // Appends token ids (prompt or decode tokens) starting at index `start`; ids already known
  // must match (FAILED_PRECONDITION otherwise), new ones must be contiguous.
  absl::Status AddTokenIds(int64_t start, absl::Span<const int32_t> ids);

  // When nothing is committed and no append is open: takes references on the longest run of
  // published blocks matching the known token ids' full blocks, and commits them. Returns the
  // committed token count afterwards (a multiple of block_tokens; 0 when nothing matched).
  int64_t AdoptSharedPrefix();

  // The meta column family key of a sequence's durable record: "s" + u32 len(tenant) + tenant +
  // id.
  static std::string MetaKey(absl::string_view tenant, absl::string_view id);
  // Recovery: the state of a durable record. `blocks` carry one reference each, which the
  // sequence takes over. REQUIRES: a new sequence; committed <= token_ids.size();
  // blocks.size() == ceil(committed / block_tokens).
  void Restore(std::vector<int32_t> token_ids, int64_t committed, int64_t adopted,
               std::vector<Block*> blocks);

  // Opens the (single) write transaction. ABORTED if another is open; when the last committed
  // block is partial (appends continue it) it is pinned, reloading it if spilled (DATA_LOSS /
  // RESOURCE_EXHAUSTED as for Read).
  absl::Status BeginAppend();
  // Writes one chunk: rows [token_start, token_start + n) of `layer`.
  //   keys, values: [num_kv_heads][n][head_dim] in kv_dtype (exactly that many bytes).
  // FAILED_PRECONDITION if token_start is not the layer's current length or ids of those tokens
  // are unknown; RESOURCE_EXHAUSTED when the arena is full. REQUIRES: BeginAppend succeeded.
  absl::Status AppendChunk(int layer, int64_t token_start, int64_t n, absl::Span<const uint8_t> keys,
                           absl::Span<const uint8_t> values);
  // Bulk ingest (Node::AllocateBlocks): the rows of [token_start, token_start + n) are written by
  // someone else (a transport put straight into the slots) instead of AppendChunk.
  // ReserveRows, inside an open append whose every layer holds exactly token_start tokens,
  // allocates the blocks those tokens need and appends to *slots, for each layer l and each block
  // b in [token_start / block_tokens, (token_start + n - 1) / block_tokens], the slot
  // block(b)->layer(l), in [num_layers][blocks] order. INVALID_ARGUMENT for n outside [1, 2^24],
  // FAILED_PRECONDITION for a layer at another length or unknown token ids, RESOURCE_EXHAUSTED
  // when the arena is full (blocks already allocated stay with the transaction until it ends).
  // CompleteRows then declares those rows written in every layer (ready for CommitAppend).
  absl::Status ReserveRows(int64_t token_start, int64_t n, std::vector<uint8_t*>* slots);
  absl::Status CompleteRows(int64_t token_start, int64_t n);
  // Commits when every layer has the same length (FAILED_PRECONDITION otherwise, and rolls back)
  // and the tenant's quota takes the new tokens (RESOURCE_EXHAUSTED otherwise, rolled back),
  // then publishes the newly full blocks. Returns the committed token count.
  absl::StatusOr<int64_t> CommitAppend();
  // Drops everything written since BeginAppend.
  void AbortAppend();
  // One whole append as its own transaction: BeginAppend, the ids of tokens [token_start, ...)
  // if given, every layer's chunk of tokens [token_start, token_start + n), CommitAppend; any
  // error aborts it and keeps nothing. keys[l], values[l]: layer l as AppendChunk takes it.
  // INVALID_ARGUMENT unless there is one span per layer. Returns the committed token count.
  absl::StatusOr<int64_t> AppendTokens(int64_t token_start, int64_t n,
                                       absl::Span<const int32_t> token_ids,
                                       absl::Span<const absl::Span<const uint8_t>> keys,
                                       absl::Span<const absl::Span<const uint8_t>> values);

 private:
  // CommitAppend under mu_; on success *hooks is hooks_ (called after mu_ is released).
  absl::StatusOr<int64_t> CommitAppendInternal(std::shared_ptr<const IndexHooks>* hooks);
  void TruncateLocked(int64_t tokens) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnpinTxnLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ReadLayer, after its pin: records that `blocks` (this sequence's committed blocks) are
  // resident under `epoch` and, when touched_ns >= 0, that their leases were renewed then;
  // returns `layer`'s page table over them, from the cache when it is current.
  std::shared_ptr<const std::vector<const uint8_t*>> PageTable(int layer, uint64_t epoch,
                                                               absl::Span<Block* const> blocks,
                                                               int64_t touched_ns) const
      ABSL_LOCKS_EXCLUDED(read_mu_);
  // The durable record with `committed` tokens: version, model, block_tokens, committed,
  // adopted, token ids, block ids (internal/records.h; decoded by Node's recovery).
  std::string EncodeRecordLocked(int64_t committed) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishFullBlocksLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  ContentKey KeyOfBlockLocked(size_t b, const ContentKey& parent) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  size_t head_bytes() const { return static_cast<size_t>(block_tokens_) * spec_->row_bytes(); }

  const std::string tenant_;
  const std::string id_;
  const std::shared_ptr<const ModelSpec> spec_;
  const int block_tokens_;
  BlockTable* const table_;
  const std::string namespace_;
  const bool durable_;

  mutable absl::Mutex mu_;
  // The tenant's quota account (may be null); ReleaseAccount clears it.
  std::shared_ptr<TenantAccount> account_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const SequenceIndex> index_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const IndexHooks> hooks_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> token_ids_ ABSL_GUARDED_BY(mu_);
  std::vector<Block*> blocks_ ABSL_GUARDED_BY(mu_);  // one reference each
  std::vector<ContentKey> keys_
      ABSL_GUARDED_BY(mu_);  // keys of blocks_[0, keys_.size()), all published
  std::vector<int64_t> layer_tokens_ ABSL_GUARDED_BY(mu_);
  int64_t committed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t adopted_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t token_ids_at_begin_ ABSL_GUARDED_BY(mu_) = 0;
  bool appending_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<Block*> txn_pins_ ABSL_GUARDED_BY(mu_);  // pinned by the open append
  bool closed_ ABSL_GUARDED_BY(mu_) = false;

  // What reads (ReadLayer) remember between calls, so that a read does not walk every block's
  // metadata (a cache miss each: ~3000 blocks a sequence at 96K tokens): blocks_[0, claim_blocks_)
  // were all resident under the block table's residency epoch claim_epoch_
  // (BlockTable::PinForRead); touched_ns_ is when a read last renewed the blocks' leases;
  // page_cache_[layer] is that layer's page table (each committed block's slot), valid while the
  // epoch is the one it was built under (no block moved since) and extended as blocks are
  // committed. Lock order: mu_ before read_mu_ (ReadLayer never holds both). Memory: 8 bytes per
  // block and layer read.
  struct PageCache {
    uint64_t epoch = 0;  // meaningful only with pages
    std::shared_ptr<const std::vector<const uint8_t*>> pages;
  };
  mutable absl::Mutex read_mu_;
  mutable uint64_t claim_epoch_ ABSL_GUARDED_BY(read_mu_) = BlockTable::kNoEpoch;
  mutable size_t claim_blocks_ ABSL_GUARDED_BY(read_mu_) = 0;
  mutable std::optional<int64_t> touched_ns_ ABSL_GUARDED_BY(read_mu_);
  mutable std::vector<PageCache> page_cache_ ABSL_GUARDED_BY(read_mu_);  // one per layer
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_SEQUENCE_H_
