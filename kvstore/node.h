// A tier node: the models, sequences and attached workers of one kvrecall-server, with every
// operation of the protocol in domain types. The gRPC service (grpc_service.h) and LocalTier
// (client/) are thin adapters over it, so both run exactly the same validation and logic.
//
// Storage: one arena of options.memory_bytes (arena.h) carved into per-layer block slots, a
// block table (block_table.h) that shares full blocks of equal prefixes between sequences of one
// namespace (a tenant, or the operator's shared namespace), and the sequences' block lists
// (sequence.h). With options.data_dir, blocks without a pin or a live lease are evicted to
// RocksDB when the arena is full and reloaded on the next read (block_table.h, block_store.h);
// with options.durable, commits are written through before they are acknowledged and recovered
// at construction. kvstore/README.md has the picture.
//
// Thread safety: all methods are thread-safe and may block only on CPU work (never on the
// network, except Retrieve's puts to an attached worker, which are bounded by the transport).
#ifndef KVRECALL_KVSTORE_NODE_H_
#define KVRECALL_KVSTORE_NODE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/clock.h"
#include "common/model_spec.h"
#include "common/thread_pool.h"
#include "indexer/index.h"
#include "kvstore/arena.h"
#include "kvstore/block_store.h"
#include "kvstore/block_table.h"
#include "kvstore/index_manager.h"
#include "kvstore/sequence.h"
#include "kvstore/slot_mirror.h"
#include "kvstore/tenant_account.h"
#include "transport/transport.h"

namespace kvrecall::kvstore {

// Request limits: anything larger is INVALID_ARGUMENT before any allocation happens.
inline constexpr int kMaxBudget = 1 << 16;
inline constexpr int kMaxRetrieveEntries = 1 << 16;
inline constexpr int64_t kMaxPromptTokens = int64_t{1} << 24;
inline constexpr size_t kMaxIdLength = 256;
// Largest gRPC message a server or client accepts (an AppendKV chunk, a Retrieve batch).
inline constexpr int kMaxMessageBytes = 64 << 20;

// A Retrieve's selection size, checked the same way by the client before it sends and by the
// node: INVALID_ARGUMENT unless budget is in [1, kMaxBudget] and successors in [0, budget].
absl::Status ValidateSelection(int budget, int successors);

// The most arena bytes one sequence's ctkvr index takes on a node: `segments` (layer, kv-head)
// segments at their largest (indexer::CtkvrSegmentMaxBytes), plus 1 MiB for the rounding up to
// whole arena slots (a slot, one layer of one block, is at most that for the models served).
// For sizing --memory ahead of builds.
int64_t CtkvrIndexReserveBytes(const indexer::CtkvrOptions& options, int64_t segments, int group,
                               int head_dim, DType kv_dtype);

struct NodeOptions {
  int64_t memory_bytes = int64_t{1} << 30;  // --memory: the KV arena's size
  int block_tokens = 64;                    // tokens per KV block
  int search_threads = 0;                   // <= 0: every core
  // How long an idle search thread keeps polling for the next call's work before it blocks
  // (ThreadPool's spin): consecutive Retrieves (a decode step's layers) then find the pool awake
  // instead of paying 10-50 µs per wake-up, at the price of that much CPU after each call.
  absl::Duration search_spin = absl::Microseconds(200);
  // Bytes of one arena slot (one layer of one block); 0: the first registered model's layer
  // block, 2 * num_kv_heads * block_tokens * row_bytes. Set it to the largest model's when a
  // node serves several (arena.h).
  int64_t arena_block_bytes = 0;
  // Tenants whose prefixes share one namespace ("s:shared"); every other tenant is isolated.
  std::vector<std::string> shared_tenants;
  bool try_hugepages = true;
  // --data-dir: where evicted blocks spill (block_store.h). Empty: no eviction, a full arena
  // fails writes with RESOURCE_EXHAUSTED.
  std::string data_dir;
  // How long an access (open, append, read) protects a sequence's blocks from eviction.
  absl::Duration lease = absl::Seconds(30);
  // How long an AllocateBlocks transaction may stay uncommitted before it is aborted.
  absl::Duration ingest_lease = absl::Seconds(60);
  // --durable (needs data_dir): registered models and every committed append are written
  // through RocksDB's WAL (synced) before they are acknowledged, and a restarted node recovers
  // them from data_dir (blocks stay on disk until first read). A sequence whose metadata record
  // is corrupt answers DATA_LOSS; one with a corrupt block answers DATA_LOSS when that block is
  // read. Without it, data_dir only holds spill and is wiped at start.
  bool durable = false;
  // The RocksDB environment of data_dir; null: the real one. Fault tests pass a wrapper.
  rocksdb::Env* store_env = nullptr;
  // --auto-index: the index built in the background when a commit leaves at least
  // auto_index_min_tokens committed beyond auto_index_token_begin and the sequence has no index
  // (index_manager.h): cluster (default), ctkvr (a placeholder that scans exactly until
  // BuildIndex brings the prompt queries) or exact (= none). Indices of any origin grow with
  // decode tokens every index_options.cluster.append_every tokens.
  indexer::Method auto_index = indexer::Method::kCluster;
  int auto_index_first_layer = 2;      // the worker's default --dense-layers
  int64_t auto_index_token_begin = 16; // the worker's default --sink-tokens
  int64_t auto_index_min_tokens = 1024;
  indexer::IndexOptions index_options;
  // Per-tenant quotas (tenant_account.h), looked up on every charge so that a reloaded token
  // file applies at once; null: every tenant unlimited.
  TenantLimitsFn tenant_limits;
};

// The retrieval method of a request: the indexer's own enum (one vocabulary end to end; the wire
// enum maps to it in proto/convert.h).
using Method = indexer::Method;

struct OpenSequenceArgs {
  std::string tenant;
  std::string model_id;
  std::string sequence_id;
  absl::Span<const int32_t> token_ids;
};
struct OpenSequenceResult {
  int64_t matched_tokens = 0;
  int64_t stored_tokens = 0;
};

struct RetrieveEntryArgs {
  std::string sequence_id;
  int kv_head = 0;
  absl::Span<const float> queries;  // [group][head_dim], fp32
  int64_t token_begin = 0;
  int64_t token_end = 0;
  uint64_t dest_row = 0;
  uint64_t slot_epoch = 0;  // delta streaming; see proto RetrieveEntry.slot_epoch
};
struct RetrieveArgs {
  std::string tenant;
  int layer = 0;
  int budget = 0;
  Method method = Method::kExact;
  std::string worker_id;  // empty: ids only
  std::vector<RetrieveEntryArgs> entries;
  uint32_t staging_area = 0;  // see proto RetrieveRequest.staging_area / call_seq
  uint64_t call_seq = 0;
  // With a worker: also put each entry's result (ids, slots, fill slots) into the worker's region
  // at results_offset + i * RetrieveResultBytes(budget); see proto RetrieveRequest.
  bool results_in_region = false;
  uint64_t results_offset = 0;
  // Lookahead: see proto RetrieveRequest.successors; in [0, budget].
  int successors = 0;
  // With a worker: the entries carry no queries; they are in the worker's region from byte
  // queries_offset on, entry after entry, each [group][head_dim] fp32 of its model. The node
  // reads them (RemoteWriter::GetAll: a copy on the same host, an RDMA read across hosts) before
  // it checks them. See proto RetrieveRequest.queries_in_region.
  bool queries_in_region = false;
  uint64_t queries_offset = 0;
  // In-process workers only (a region WriteDirect reaches): instead of copying each entry's new
  // rows to dest_row, give their addresses (RetrieveOutcome::row_addresses), so that the worker
  // gathers them itself (a GPU straight from the page-locked arena). The blocks the call read
  // (every block of its sequences' layer) stay pinned until the next call in the same staging
  // area, or until the worker is replaced (AttachWorker again) or revoked: with one area per
  // layer (lookahead) that is the decode batch's working set, which its reads pin anyway, and a
  // sequence dropped meanwhile returns its memory only then. An address lies in the arena
  // (arena().base(), capacity_bytes()) or, for a row held anywhere else, in the worker's region
  // at the entry's dest_row, where the node copied it. Not in the proto.
  bool row_addresses = false;
};
inline constexpr uint32_t kMaxStagingAreas = 4096;
// Bytes of one entry's result in the worker's region: u32 n, u32 m, int32 token_ids[n],
// uint16 slots[n], uint16 fill_slots[m] (little-endian; n, m <= budget), padded to 8 bytes.
inline constexpr size_t RetrieveResultBytes(int budget) { return 8 + 8 * static_cast<size_t>(budget); }
// BuildIndex: segments of `method` (ctkvr or cluster; exact needs none) for every kv-head of the
// layers [first_layer, num_layers), over the committed tokens [token_begin, committed).
struct BuildIndexArgs {
  std::string tenant;
  std::string sequence_id;
  Method method = Method::kCtkvr;
  int first_layer = 2;        // the worker's dense layers are never retrieved
  int64_t token_begin = 16;   // usually the sink count: sinks are always attended anyway
  // ctkvr: the prompt's queries, per layer in [first_layer, num_layers) (index layer -
  // first_layer): [num_queries][num_q_heads][head_dim] fp32 post-RoPE, in position order.
  int num_queries = 0;
  std::vector<absl::Span<const float>> layer_queries;
  // The indexed range's end; 0 = every committed token. A worker whose prompt adopted a shared
  // document's prefix indexes just that prefix, with queries of the document's last positions,
  // so that every session over the document gets the same index, built and stored once
  // (index_manager.h "share"); its own tokens after it are scanned exactly until growth.
  int64_t token_end = 0;
  // ctkvr lists the worker made (on its GPU during prefill; indexer::CtkvrLists); empty = the
  // node makes them. Then every query is a centroid (num_queries <= the node's ctkvr
  // centroids) and, per layer in [first_layer, num_layers) (index layer - first_layer), with
  // n = min(ctkvr_list_size, indexed tokens):
  //   tokens: [num_kv_heads][num_queries][n] positions, each list ascending;
  //   lse:    [num_kv_heads][num_queries][group] normalisers over the indexed range.
  struct LayerLists {
    absl::Span<const int32_t> tokens;
    absl::Span<const float> lse;
  };
  int ctkvr_list_size = 0;  // 1..the node's ctkvr list_size, with lists
  std::vector<LayerLists> ctkvr_lists;
};
struct BuildIndexOutcome {
  int64_t indexed_tokens = 0;
  int segments = 0;
  double build_seconds = 0;
  int64_t index_bytes = 0;
  bool rebuilt = false;  // false: an index of this method over the same tokens existed
  bool shared = false;   // the index is one other sequences over the same document hold too
};
inline constexpr int kMaxIndexQueries = 4096;

struct RetrieveOutcome {
  std::vector<std::vector<int32_t>> token_ids;  // per entry, ascending
  // Per entry: the worker slot of each selected token, and the slots whose rows were sent (in
  // the order they were put at dest_row); see proto RetrieveResult.
  std::vector<std::vector<int32_t>> slots;
  std::vector<std::vector<int32_t>> fill_slots;
  // With RetrieveArgs::row_addresses, per entry: [2 * fill_slots.size()] the K and V row of
  // each fill slot's token (row_bytes each; 16-byte aligned when row_bytes is a multiple of
  // 16, as bf16 rows of a head_dim multiple of 8 are); else empty.
  std::vector<std::vector<const uint8_t*>> row_addresses;
  uint64_t bytes_streamed = 0;
  int64_t rows_selected = 0;  // sum of the selections
  int64_t rows_sent = 0;      // rows put (or to be fetched): the deltas
  // Where the call's time went (the node's clock): all of it, the search part, the delta
  // streaming part (slot plans, row copies and puts) and the reads; the rest is validation.
  int64_t node_micros = 0;
  int64_t search_micros = 0;
  int64_t stream_micros = 0;
  int64_t read_micros = 0;  // the sequences' reads: block pins and page tables, and unpins
  // Of search_micros, its phases (indexer::SearchTimes); of stream_micros, the slot plans.
  int64_t search_select_micros = 0;
  int64_t search_score_micros = 0;
  int64_t search_finish_micros = 0;
  int64_t stream_plan_micros = 0;
};

// Bulk ingest (proto AllocateBlocks / CommitBlocks): the client puts rows straight into arena
// slots over the transport; see the proto for the slot layout.
struct AllocateBlocksArgs {
  std::string tenant;
  std::string sequence_id;
  int64_t token_start = 0;
  int64_t num_tokens = 0;
  int64_t token_ids_start = 0;
  absl::Span<const int32_t> token_ids;  // ids of tokens not yet known, from token_ids_start
};
struct IngestGrant {
  uint64_t ingest_id = 0;
  std::string transport;           // the arena's transport ("ucx", "inproc")
  transport::RemoteRegion region;  // the node's registered arena
  int block_tokens = 0;
  int64_t first_block = 0;
  int num_blocks = 0;
  std::vector<uint64_t> slot_offsets;  // [num_layers][num_blocks], byte offsets in `region`
  absl::Duration lease;
};
struct CommitBlocksArgs {
  std::string tenant;
  std::string sequence_id;
  uint64_t ingest_id = 0;
  absl::Span<const uint32_t> checksums;  // [num_layers][num_blocks]; see proto CommitBlocksRequest
  bool abort = false;
};
struct CommitBlocksOutcome {
  int64_t stored_tokens = 0;
  int64_t bytes_written = 0;
};

struct SequenceStats {
  std::string tenant;
  std::string sequence_id;
  std::string model_id;
  int64_t stored_tokens = 0;
  int64_t bytes = 0;  // arena bytes its blocks occupy (shared blocks counted in full)
  bool closed = false;
  int64_t blocks = 0;
  int64_t shared_blocks = 0;   // blocks also referenced by other sequences
  int64_t matched_tokens = 0;  // tokens it got from shared blocks when opened
};
// Usage of one tenant. Shared blocks are attributed to their sequences in equal parts, so the
// tenants' `bytes` add up to the node's stored_bytes.
struct TenantStats {
  std::string tenant;
  int64_t sequences = 0;
  int64_t tokens = 0;
  int64_t bytes = 0;
  int64_t logical_bytes = 0;   // bytes its sequences reference (what it would store unshared)
  int64_t unique_blocks = 0;   // block references held by this tenant alone (refcount 1)
  int64_t shared_blocks = 0;   // block references to blocks with refcount > 1
  int64_t prompt_tokens = 0;   // tokens of prompts that opened new sequences
  int64_t matched_tokens = 0;  // of which already stored (prefix hits)
  // Its quota account (tenant_account.h): logical bytes charged and the limits (0: none).
  int64_t quota_charged_bytes = 0;
  int64_t quota_stored_bytes = 0;
  int64_t quota_sequences = 0;
};
struct NodeStats {
  int64_t uptime_seconds = 0;
  int64_t memory_limit_bytes = 0;
  int64_t stored_bytes = 0;
  int64_t num_sequences = 0;
  int64_t num_models = 0;
  int64_t num_workers = 0;
  int64_t retrieve_calls = 0;
  int64_t retrieve_entries = 0;
  int64_t bytes_streamed = 0;
  std::vector<SequenceStats> sequences;  // filled when asked for
  // Storage (arena + block table).
  int64_t arena_block_bytes = 0;     // slot size; 0 until the first model registered
  std::string arena_hugepages;       // "hugetlb" | "thp" | "none"
  bool arena_registered = false;     // registered with the transport
  int64_t blocks = 0;                // live blocks (each num_layers slots)
  int64_t shared_blocks = 0;         // referenced by more than one sequence
  int64_t logical_bytes = 0;         // sum over sequences of the bytes they reference
  int64_t prompt_tokens = 0;         // over OpenSequence calls that created a sequence
  int64_t matched_tokens = 0;        // of which served from shared blocks
  int64_t evictions = 0;             // blocks evicted from the arena to --data-dir, ever
  int64_t spilled_bytes = 0;         // bytes of spilled block records of live blocks
  int64_t spilled_blocks = 0;        // live blocks currently on disk only
  int64_t reloads = 0;               // spilled blocks read back, ever
  int64_t ingests = 0;               // AllocateBlocks transactions committed, ever
  int64_t ingest_bytes = 0;          // K/V bytes they committed
  bool draining = false;
  std::vector<TenantStats> tenants;  // always filled, sorted by tenant
  // Indices (index_manager.h). Their memory is taken from the arena: stored_bytes excludes it,
  // stored_bytes + index_reserved_bytes <= memory_limit_bytes.
  IndexStats index;
};

class Node {
 public:
  // `transport` (may be null: no worker can attach) and `clock` must outlive the node.
  Node(const NodeOptions& options, transport::Transport* transport, Clock* clock);
  ~Node();

  const NodeOptions& options() const { return options_; }

  // OK with created=true for a new model, created=false for an identical re-registration;
  // ALREADY_EXISTS when the id is taken by a different spec; INVALID_ARGUMENT for a bad spec.
  absl::StatusOr<bool> RegisterModel(const ModelSpec& spec);
  absl::StatusOr<std::shared_ptr<const ModelSpec>> GetModel(const std::string& model_id) const;

  // Creates the sequence, or reopens an existing one of the same model whose known token ids
  // agree with `token_ids` (FAILED_PRECONDITION otherwise).
  absl::StatusOr<OpenSequenceResult> OpenSequence(const OpenSequenceArgs& args);

  // NOT_FOUND when the tenant has no such sequence.
  absl::StatusOr<std::shared_ptr<Sequence>> FindSequence(const std::string& tenant,
                                                         const std::string& sequence_id) const;

  // One append of an AppendKVBatch: tokens [token_start, token_start + num_tokens) of a sequence,
  // with their ids (optional) and every layer's K and V, [num_kv_heads][num_tokens][head_dim]
  // kv_dtype per layer: either one span per layer, or one span of all layers back to back.
  struct BatchAppend {
    std::string sequence_id;
    int64_t token_start = 0, num_tokens = 0;
    absl::Span<const int32_t> token_ids;
    std::vector<absl::Span<const uint8_t>> keys, values;
  };
  // A decode step's new tokens (one RPC for the batch; LocalTier and the gRPC AppendKVBatch both
  // come here). Each append is its own transaction (Sequence::AppendTokens), stored or refused on
  // its own: (*stored)[i] is append i's committed token count, or its error (NOT_FOUND for an
  // unknown sequence, INVALID_ARGUMENT for negative counts or K/V of the wrong size, as
  // AppendTokens otherwise). The call fails as a whole, storing nothing, with INVALID_ARGUMENT
  // for an empty batch, more than kMaxRetrieveEntries appends or a sequence named twice.
  absl::Status AppendKVBatch(const std::string& tenant, absl::Span<const BatchAppend> appends,
                             std::vector<absl::StatusOr<int64_t>>* stored);

  // One layer's retrieval for a batch of entries; see proto RetrieveRequest for the contract.
  absl::StatusOr<RetrieveOutcome> Retrieve(const RetrieveArgs& args);

  // Builds (or, when one of the same method over the same tokens exists, keeps) the sequence's
  // retrieval index. Idempotent. INVALID_ARGUMENT for bad shapes, a non-search method (merged)
  // or non-finite queries; NOT_FOUND for an unknown sequence; FAILED_PRECONDITION when nothing
  // beyond token_begin is committed.
  absl::StatusOr<BuildIndexOutcome> BuildIndex(const BuildIndexArgs& args);

  // Copies committed rows of (layer, kv_head) for `token_ids` into keys/values, each
  // [token_ids.size()][head_dim] kv_dtype. INVALID_ARGUMENT for ids outside the committed range.
  absl::Status ReadRows(const std::string& tenant, const std::string& sequence_id, int layer, int kv_head,
                        absl::Span<const int32_t> token_ids, std::string* keys, std::string* values) const;

  // Connects to the worker's region and remembers it under (tenant, worker_id), replacing an
  // earlier attachment. FAILED_PRECONDITION when this node has no transport.
  absl::Status AttachWorker(const std::string& tenant, const std::string& worker_id,
                            const transport::RemoteRegion& region);

  // The tenant's credentials were revoked: forgets its workers (their connections close once no
  // call in flight still uses them, so nothing more is written into their regions) and aborts
  // its open bulk ingests (their arena slots are never committed). Its stored sequences stay.
  // Returns the number of workers and ingests revoked.
  std::pair<int, int> RevokeTenant(const std::string& tenant);

  // Bulk ingest. AllocateBlocks opens the sequence's write transaction for tokens
  // [token_start, token_start + num_tokens) of every layer and answers the arena slots they land
  // in; the transaction is the ingest's until CommitBlocks ends it (commit or abort, either way)
  // or its lease (options.ingest_lease) runs out, when it is aborted. Codes: INVALID_ARGUMENT
  // bad sizes/ids; NOT_FOUND unknown sequence (or ingest id, or one of another sequence);
  // UNIMPLEMENTED arena not registered with a transport (use AppendKV); FAILED_PRECONDITION
  // token_start not the committed length; ABORTED another append is open (or the lease ran out before commit);
  // RESOURCE_EXHAUSTED arena full; DATA_LOSS a checksum mismatch (nothing committed).
  absl::StatusOr<IngestGrant> AllocateBlocks(const AllocateBlocksArgs& args);
  absl::StatusOr<CommitBlocksOutcome> CommitBlocks(const CommitBlocksArgs& args);

  // Draining: OpenSequence of a sequence this node does not hold answers UNAVAILABLE (clients
  // place it on their next node); everything else keeps working. Returns the sequences held.
  int64_t SetDraining(bool draining);
  bool draining() const { return draining_.load(); }

  // drop=false marks it closed (kept); drop=true removes it and releases its block references
  // (a block's memory returns to the arena when its last reference goes, i.e. once no other
  // sequence shares it and no reader still holds the sequence).
  absl::Status CloseSequence(const std::string& tenant, const std::string& sequence_id, bool drop);

  NodeStats Stats(bool include_sequences) const;

  // Blocks until no background index job (automatic build, growth, spill sweep) is queued or
  // running. For tests and orderly shutdown; serving never needs it.
  void WaitForIndexJobs();
  // Spills the indices of sequences none of whose blocks is resident (what the background sweep
  // after evictions does); returns how many.
  int SpillColdIndexes();
  // Per-tenant gauges in the Prometheus text format (kvrecall_tenant_*{tenant="..."}), to be
  // appended to Metrics::Global().RenderPrometheus(); also refreshes the node-level gauges.
  std::string RenderTenantMetrics() const;

  // OK, or why the arena could not be mapped (the node then holds nothing: every append is
  // RESOURCE_EXHAUSTED). A server should refuse to start on an error.
  // Also covers opening --data-dir.
  const absl::Status& arena_status() const { return arena_status_; }
  const Arena& arena() const { return *arena_; }

 private:
  struct StagingArea {
    absl::Mutex mu;  // held by a Retrieve from its slot plans until its puts have completed
    uint64_t last_call ABSL_GUARDED_BY(mu) = 0;
    std::unique_ptr<uint8_t[]> pack ABSL_GUARDED_BY(mu);  // rows packed for the puts
    size_t pack_capacity ABSL_GUARDED_BY(mu) = 0;
    // The last row_addresses call's reads: they keep its rows' blocks pinned until the next call
    // here. The snapshots go before their sequences (ReleaseHeld).
    std::vector<std::shared_ptr<Sequence>> held_seqs ABSL_GUARDED_BY(mu);
    std::vector<Sequence::Snapshot> held_snaps ABSL_GUARDED_BY(mu);
    void ReleaseHeld() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      held_snaps.clear();
      held_seqs.clear();
    }
    ~StagingArea() {
      absl::MutexLock lock(&mu);
      ReleaseHeld();
    }
  };
  struct Worker {
    std::unique_ptr<transport::RemoteWriter> writer;
    SlotMirror mirror;  // what this worker's slot caches hold
    absl::Mutex areas_mu;
    absl::flat_hash_map<uint32_t, std::unique_ptr<StagingArea>> areas ABSL_GUARDED_BY(areas_mu);
    StagingArea* Area(uint32_t id);
  };
  using SeqKey = std::pair<std::string, std::string>;  // (tenant, sequence id)
  struct Ingest {
    SeqKey key;
    std::shared_ptr<Sequence> seq;
    int64_t token_start = 0;
    int64_t num_tokens = 0;
    int64_t first_block = 0;
    int num_blocks = 0;
    std::vector<uint8_t*> slots;  // [num_layers][num_blocks]
    absl::Time deadline;
  };
  // Aborts (outside ingest_mu_) every ingest whose lease ran out.
  void ExpireIngests();
  // Removes and returns the open ingests `pred` selects (the caller aborts them).
  std::vector<Ingest> TakeIngests(const std::function<bool(const Ingest&)>& pred);

  // Rebuilds models and sequences from the store's metadata (durable only).
  absl::Status Recover();
  // Retrieve's delivery to an attached worker: slot plans against the worker's mirror, then the
  // new rows packed and put at each entry's dest_row. Fills out->slots, fill_slots, rows_sent
  // and bytes_streamed. With args.row_addresses it answers where the rows lie instead
  // (out->row_addresses) and moves seqs and snaps into the staging area, whose next call
  // releases them; otherwise it leaves them to the caller.
  absl::Status StreamDeltas(const RetrieveArgs& args, Worker& worker,
                            std::vector<std::shared_ptr<Sequence>>& seqs,
                            std::vector<Sequence::Snapshot>& snaps, RetrieveOutcome* out);
  // Reads `floats` fp32 queries from the worker's region at byte `offset` into a buffer of the
  // calling thread (valid until its next call). OUT_OF_RANGE when they do not fit the region;
  // the transport's error (UNAVAILABLE) when the read fails.
  static absl::StatusOr<const float*> ReadRegionQueries(Worker& worker, uint64_t offset,
                                                        size_t floats);
  absl::StatusOr<std::shared_ptr<Worker>> FindWorker(const std::string& tenant, const std::string& worker_id) const;
  std::string NamespaceOf(const std::string& tenant) const;
  // The tenant's quota account, created on first use.
  std::shared_ptr<TenantAccount> AccountOf(const std::string& tenant) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct TenantCounters {
    int64_t prompt_tokens = 0;
    int64_t matched_tokens = 0;
  };

  const NodeOptions options_;
  transport::Transport* const transport_;
  Clock* const clock_;
  const absl::Time started_;
  absl::Status arena_status_;
  // Declared before the sequences so that they are destroyed after them.
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<BlockStore> store_;  // null without --data-dir
  std::unique_ptr<BlockTable> blocks_;
  ThreadPool pool_;
  // After the pool and the table (it uses both), before the sequences (they call into it).
  std::unique_ptr<IndexManager> indexes_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const ModelSpec>> models_ ABSL_GUARDED_BY(mu_);
  std::map<SeqKey, std::shared_ptr<Sequence>> sequences_ ABSL_GUARDED_BY(mu_);
  std::map<SeqKey, std::shared_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, TenantCounters> tenant_counters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<TenantAccount>> accounts_ ABSL_GUARDED_BY(mu_);
  // Durable sequences whose metadata could not be recovered: DATA_LOSS until dropped.
  std::map<SeqKey, absl::Status> lost_ ABSL_GUARDED_BY(mu_);
  int64_t prompt_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t matched_tokens_ ABSL_GUARDED_BY(mu_) = 0;

  absl::Mutex ingest_mu_;
  absl::flat_hash_map<uint64_t, Ingest> ingests_ ABSL_GUARDED_BY(ingest_mu_);
  uint64_t next_ingest_ ABSL_GUARDED_BY(ingest_mu_) = 0;
  std::atomic<int64_t> ingests_committed_{0};
  std::atomic<int64_t> ingest_bytes_{0};
  std::atomic<bool> draining_{false};

  std::atomic<int64_t> retrieve_calls_{0};
  std::atomic<int64_t> retrieve_entries_{0};
  std::atomic<int64_t> bytes_streamed_{0};
  mutable std::atomic<int64_t> evictions_reported_{0};  // already added to the metric counter
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_NODE_H_
