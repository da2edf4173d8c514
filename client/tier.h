// The worker's view of the KV memory tier.
//
// Two implementations share this interface: RemoteTier (gRPC control + UCX rows, one node) and
// LocalTier (the same kvstore::Node in-process, rows delivered through the in-process transport),
// so the decode engine cannot tell where its tier lives.
//
// A Tier acts for one tenant and one worker. Thread safety: calls come from one thread at a time
// (the engine's), except that Retrieve calls in different staging areas may run at once on
// different threads (lookahead issues several layers together; ClusterTier serialises them). The
// rows returned by Retrieve stay valid until the next Retrieve in the same staging area.
#ifndef KVRECALL_CLIENT_TIER_H_
#define KVRECALL_CLIENT_TIER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/model_spec.h"
#include "kvstore/node.h"

namespace kvrecall::client {

using kvstore::Method;

struct TierOptions {
  std::string tenant = "default";
  std::string worker_id;                      // empty: "<hostname>-<pid>"
  int64_t recall_buffer_bytes = int64_t{64} << 20;  // receive region for recalled rows
  absl::Duration deadline = absl::Seconds(60);      // per call
  // Retrieve's own deadline (it sits inside every decode step); zero = `deadline`. A worker that
  // misses it decodes that layer without the tier's answer (see worker::Engine).
  absl::Duration retrieve_deadline = absl::ZeroDuration();
  // The recall buffer is split into this many equal staging areas; RetrieveBatch::staging_area
  // picks one. Calls in different areas may be in flight at once (lookahead issues every sparse
  // layer together); calls in one area are ordered by the tier, so a late reply's rows can never
  // land on top of a newer call's rows.
  int staging_areas = 1;
  // Called with the recall buffer once it is allocated (an error fails the tier's creation) and
  // before it is freed. The GPU worker page-locks it here (cuda::PinnedHostRanges), so its kernels
  // read recalled rows where they land. Unset: nothing.
  std::function<absl::Status(uint8_t* data, size_t bytes)> pin_region;
  std::function<void(uint8_t* data)> unpin_region;
  // LocalTier only (others ignore it): Retrieve gives the addresses of the rows to fill
  // (Recalled::row_addresses) where they lie in the node's arena instead of copying them into the
  // recall buffer, and the arena is pinned with pin_region too. A GPU worker then gathers the rows
  // itself, over the bus, and the node's threads copy nothing. Page-locking faults in and locks
  // the whole arena (NodeOptions::memory_bytes) when the tier is created (~1 s per 14 GB on the
  // H100 host): size the arena to what the tier will hold.
  bool row_addresses = false;
};

struct OpenResult {
  int64_t matched_tokens = 0;  // leading tokens whose KV the tier already holds
  int64_t stored_tokens = 0;
};

// KV of tokens [token_start, token_start + num_tokens) for every layer.
struct AppendBatch {
  int64_t token_start = 0;
  int64_t num_tokens = 0;
  // Ids of those tokens if the tier does not know them yet (decode tokens); else empty.
  std::vector<int32_t> token_ids;
  // keys[layer], values[layer]: [num_kv_heads][num_tokens][head_dim], kv_dtype bytes.
  std::vector<std::string> keys;
  std::vector<std::string> values;
};

struct SequenceAppend {
  std::string sequence_id;
  AppendBatch batch;
};

struct RetrieveEntry {
  std::string sequence_id;
  int kv_head = 0;
  absl::Span<const float> queries;  // [group][head_dim], fp32, post-RoPE
  int64_t token_begin = 0;          // candidates [token_begin, token_end)
  int64_t token_end = 0;
  // Delta streaming. A nonzero epoch names the caller's slot cache for (sequence, layer, kv_head):
  // `budget` slots of K/V rows that persist across calls. The tier remembers which token each slot
  // holds and sends only the rows of newly selected tokens. The caller must move to a larger
  // epoch whenever its slots may not hold what the tier last sent (a new cache, or any failed
  // call): the tier then treats the cache as empty and sends every selected row. 0: no cache;
  // every selected row is sent, into slots 0..n-1 in token order.
  uint64_t slot_epoch = 0;
};
struct RetrieveBatch {
  int layer = 0;
  int budget = 0;
  Method method = Method::kExact;
  std::vector<RetrieveEntry> entries;
  int staging_area = 0;  // in [0, TierOptions::staging_areas)
  // Lookahead: the queries are the previous step's; the `successors` best selected tokens each
  // bring the 2 tokens after them (proto RetrieveRequest.successors). In [0, budget].
  int successors = 0;
};
// The selection for one entry and the rows it needs. The selected tokens token_ids (ascending)
// live in slots[j] of the caller's slot cache. Rows of tokens that were not resident arrived
// packed at `rows`: row j (K[head_dim] then V[head_dim] in kv_dtype, 2 * row_bytes bytes) belongs
// in slot fill_slots[j]; the caller copies them into its slots before the next call in the same
// staging area. With slot_epoch 0: slots[j] = j, fill_slots = slots, rows in token order.
// With TierOptions::row_addresses (LocalTier), `rows` is null and row_addresses[2j] and
// [2j + 1] are where the K and V row of fill_slots[j] lie (row_bytes each, in memory pinned
// through TierOptions::pin_region), valid as long as `rows` would be.
struct Recalled {
  std::vector<int32_t> token_ids;
  std::vector<int32_t> slots;
  std::vector<int32_t> fill_slots;
  const uint8_t* rows = nullptr;
  std::vector<const uint8_t*> row_addresses;
};

struct TierCounters {
  int64_t retrieve_calls = 0;
  int64_t rows_received = 0;  // rows that arrived (new rows only under delta streaming)
  int64_t rows_selected = 0;  // rows the selections named, resident or not
  int64_t bytes_received = 0;  // K/V bytes that arrived for recalled rows
  int64_t bytes_appended = 0;
  int64_t ingests = 0;  // appends that went over the data transport (AllocateBlocks/CommitBlocks)
  int64_t tier_node_micros = 0;  // time the tier node(s) reported spending on Retrieve calls
  // Time Retrieve spent waiting for the tier's answers (RPC round trips, node time included);
  // the rest of Retrieve is the client's own work (request building, unpacking, checks).
  int64_t tier_wait_micros = 0;
  // Of tier_wait_micros, the tier servers' own time (RetrieveResponse.service_micros: node time,
  // decoding, encoding, waiting for a service thread); the rest is the wire and gRPC.
  int64_t tier_service_micros = 0;
  int64_t tier_search_micros = 0;  // of tier_node_micros: the index searches
  int64_t tier_stream_micros = 0;  // of tier_node_micros: slot plans and rows sent
  int64_t tier_read_micros = 0;    // of tier_node_micros: block pins and page tables
  // Of tier_search_micros, the search's phases (kvstore::RetrieveOutcome); of
  // tier_stream_micros, the slot plans.
  int64_t tier_search_select_micros = 0;
  int64_t tier_search_score_micros = 0;
  int64_t tier_search_finish_micros = 0;
  int64_t tier_stream_plan_micros = 0;

  TierCounters& operator+=(const TierCounters& b) {
    retrieve_calls += b.retrieve_calls;
    rows_received += b.rows_received;
    rows_selected += b.rows_selected;
    bytes_received += b.bytes_received;
    bytes_appended += b.bytes_appended;
    ingests += b.ingests;
    tier_node_micros += b.tier_node_micros;
    tier_wait_micros += b.tier_wait_micros;
    tier_service_micros += b.tier_service_micros;
    tier_search_micros += b.tier_search_micros;
    tier_stream_micros += b.tier_stream_micros;
    tier_read_micros += b.tier_read_micros;
    tier_search_select_micros += b.tier_search_select_micros;
    tier_search_score_micros += b.tier_search_score_micros;
    tier_search_finish_micros += b.tier_search_finish_micros;
    tier_stream_plan_micros += b.tier_stream_plan_micros;
    return *this;
  }
};

class Tier {
 public:
  virtual ~Tier() = default;
  virtual absl::Status RegisterModel(const ModelSpec& spec) = 0;
  virtual absl::StatusOr<OpenResult> OpenSequence(const std::string& sequence_id, const std::string& model_id,
                                                  absl::Span<const int32_t> token_ids) = 0;
  // All-or-nothing: when it returns OK the tokens are stored and acknowledged.
  virtual absl::Status AppendKV(const std::string& sequence_id, const AppendBatch& batch) = 0;
  // Several sequences' appends (a decode step's new tokens), each all-or-nothing on its own as
  // AppendKV: OK when every one is stored; else the first failure's error, and stored[i] (when
  // given; resized to appends.size()) says which were stored and acknowledged. The sequence ids
  // must differ (INVALID_ARGUMENT). This default calls AppendKV for each; RemoteTier sends one
  // RPC for small appends.
  virtual absl::Status AppendKVBatch(absl::Span<const SequenceAppend> appends,
                                     std::vector<bool>* stored = nullptr);
  // out->size() == batch.entries.size() on OK. INVALID_ARGUMENT when entries * budget rows do
  // not fit one staging area of the recall buffer. The rows stay valid until the next call in
  // the same staging area.
  virtual absl::Status Retrieve(const RetrieveBatch& batch, std::vector<Recalled>* out) = 0;
  // Where the caller may write a Retrieve batch's queries in place: `entries` entries of a
  // `spec` model ([entries][group][head_dim] fp32, entry after entry), for a batch of that
  // budget and successors in `staging_area`. A batch whose entry i's queries are the i-th
  // group * head_dim floats of this span is sent without copying them (RemoteTier: the span
  // lies in its recall buffer, where the node reads the queries). Valid until the next call in
  // that staging area returns; write it only while no call in that area is in flight. Empty
  // when the tier has no such room (LocalTier reads the caller's memory anyway; a RemoteTier
  // whose recall buffer was not sized with query room; a batch that does not fit) — the caller
  // then passes queries from its own memory as usual.
  virtual absl::Span<float> QueryStaging(const ModelSpec& spec, int staging_area, size_t entries,
                                         int budget, int successors) {
    return {};
  }
  // Builds the sequence's retrieval index (args.tenant and args.sequence_id are filled in by the
  // tier). See kvstore::Node::BuildIndex.
  virtual absl::StatusOr<kvstore::BuildIndexOutcome> BuildIndex(const std::string& sequence_id,
                                                                kvstore::BuildIndexArgs args) = 0;
  virtual absl::Status CloseSequence(const std::string& sequence_id, bool drop) = 0;
  virtual absl::StatusOr<kvstore::NodeStats> Stats(bool include_sequences) = 0;
  virtual TierCounters counters() const = 0;
  virtual std::string Describe() const = 0;  // "local" / "remote 127.0.0.1:7070 via ucx"
};

// TierOptions::recall_buffer_bytes for Retrieve batches of up to `entries` x `budget` rows of
// `row_pair_bytes` (2 * row_bytes) in each of `staging_areas` areas, their results included, and
// room for their queries (`query_floats_per_entry` = group * head_dim), which a RemoteTier then
// hands the node through its region instead of the request (proto RetrieveRequest.
// queries_in_region). Without that room the queries travel in the request.
int64_t RecallBufferBytes(int64_t entries, int budget, size_t row_pair_bytes, int staging_areas = 1,
                          int64_t query_floats_per_entry = 0);

// An in-process tier: owns a kvstore::Node and an in-process transport.
absl::StatusOr<std::unique_ptr<Tier>> CreateLocalTier(const kvstore::NodeOptions& node_options,
                                                      const TierOptions& options);

// TLS for the gRPC channels to tier nodes (kvrecall-server --tls-cert/--tls-key/--tls-ca).
struct TlsOptions {
  std::string ca_file;    // PEM CA bundle that signed the servers' certificates; empty: plaintext
  std::string cert_file;  // PEM certificate of this client, for servers that require one (mTLS)
  std::string key_file;   // its private key
  // The name checked against the server's certificate instead of the target's host (e.g. when
  // the certificate names a Service but the client dials pod addresses); empty: the host.
  std::string server_name;
  // A file holding this client's tenant bearer token (servers run with --tenant-tokens), sent as
  // "authorization: Bearer TOKEN" with every call; re-read every 10 s, so a rotated Kubernetes
  // Secret applies without a restart. Empty: no token.
  std::string token_file;
};

struct RemoteTierOptions {
  std::string target;             // host:port of a kvrecall-server
  std::string transport = "ucx";  // "ucx": rows are put into our registered buffer; "grpc": FetchKV
  std::string ucx_tls;            // UCX_TLS-style list; empty = UCX default
  // "auto": with transport "ucx", AppendKV puts rows straight into the node's arena
  // (AllocateBlocks / CommitBlocks) when the node supports it, else streams AppendKV; "grpc":
  // always AppendKV.
  std::string ingest = "auto";
  // Appends smaller than this (decode steps) use AppendKV even with "auto": one streamed RPC beats
  // two RPCs and a put for a few rows.
  int64_t ingest_min_bytes = int64_t{1} << 20;
  // A large append is packed and put by up to 4 threads, one per this many bytes.
  int64_t ingest_bytes_per_lane = int64_t{32} << 20;
  // How long Retrieve polls for its reply (its thread reads the reply itself, never asleep)
  // before it sleeps until the reply comes. Zero (the default): sleep at once. Polling spares
  // the kernel's wake-up of the caller, ~90 µs a call on a virtualised host (a halted vCPU), but
  // keeps a core busy for the whole call: worth it for small calls to a node on another host,
  // not where the node shares the caller's cores (docs/benchmarks.md, issue 5, session 23).
  absl::Duration reply_poll = absl::ZeroDuration();
  TlsOptions tls;  // the channel's TLS (client/channel.h); default plaintext
};
// Connects (waits for the channel up to options.deadline) and, with transport "ucx", attaches
// this worker's receive region. UNAVAILABLE when the server cannot be reached.
absl::StatusOr<std::unique_ptr<Tier>> CreateRemoteTier(const RemoteTierOptions& remote, const TierOptions& options);

namespace internal {
// The size and staging-area checks shared by both implementations; on OK *area_first_row is the
// first row (of 2 * row_bytes bytes) of the batch's staging area in the recall buffer, and entry i
// gets rows [area_first_row + i * budget, + budget).
// *results_offset (when not null) is the byte offset in the recall buffer where the node may put
// the batch's results (kvstore::RetrieveResultBytes(budget) per entry), at the area's end.
// *queries_offset (when not null) is where `query_bytes` of the batch's queries fit between its
// rows and its results (64-byte aligned), or kNoQueryRoom.
inline constexpr uint64_t kNoQueryRoom = ~uint64_t{0};
absl::Status CheckRecallFits(const RetrieveBatch& batch, size_t row_pair_bytes,
                             const TierOptions& options, uint64_t* area_first_row,
                             uint64_t* results_offset = nullptr, uint64_t query_bytes = 0,
                             uint64_t* queries_offset = nullptr);
// The same for a batch of `entries` entries of that budget, successors and staging area.
absl::Status CheckRecallFits(size_t entries, int budget, int successors, int staging_area,
                             size_t row_pair_bytes, const TierOptions& options,
                             uint64_t* area_first_row, uint64_t* results_offset,
                             uint64_t query_bytes, uint64_t* queries_offset);
// Reads one entry's result as the node put it (proto RetrieveRequest.results_in_region) and
// checks it as CheckRecalled does; INTERNAL for counts beyond the budget or a failed check.
absl::Status UnpackRecalledFromRegion(const uint8_t* p, int budget, Recalled* r);
// The shape checks of an AppendBatch against its model (layers, bytes per layer).
absl::Status CheckAppendBatch(const ModelSpec& spec, const AppendBatch& batch);
// INVALID_ARGUMENT when two appends name one sequence.
absl::Status CheckDistinctSequences(absl::Span<const SequenceAppend> appends);
// Checks a reply's slot map against the request (budget, ascending ids, slots distinct and in
// range, every fill slot among the selection's) so a confused server cannot make the caller
// write outside its slot cache.
absl::Status CheckRecalled(const Recalled& r, int budget);
// The token of each fill row (fill_tokens[j] goes to slot fill_slots[j]); r must have passed
// CheckRecalled.
std::vector<int32_t> FillTokens(const Recalled& r);
// Copies r's new rows (packed at r.rows, or at r.row_addresses) into a slot cache of
// [budget][row_pair_bytes] at slot_rows. REQUIRES: r.rows, or two row_addresses per fill.
void ApplyFills(const Recalled& r, size_t row_pair_bytes, uint8_t* slot_rows);
std::string DefaultWorkerId();

// The recall buffer's pin (TierOptions::pin_region): Pin calls the hook, destruction unpins.
// Declare it after the buffer so that it is destroyed first.
class RegionPin {
 public:
  RegionPin() = default;
  ~RegionPin();
  RegionPin(const RegionPin&) = delete;
  RegionPin& operator=(const RegionPin&) = delete;
  absl::Status Pin(const TierOptions& options, uint8_t* data, size_t bytes);

 private:
  std::function<void(uint8_t*)> unpin_;
  uint8_t* data_ = nullptr;
};
}  // namespace internal

}  // namespace kvrecall::client

#endif  // KVRECALL_CLIENT_TIER_H_
