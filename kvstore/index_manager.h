// The life of every sequence's retrieval index on a tier node: automatic builds at prefill
// commit, growth with decode tokens, memory accounting against the arena, spill and reload with
// the sequence, persistence with --durable. Node owns one; kvstore/README.md has the picture.
//
//   build   BuildIndex (explicit, with ctkvr's prompt queries) builds synchronously and always
//           replaces what is there unless an index of the same method already covers the request
//           (idempotent). With auto_method (cluster by default) a commit that leaves at least
//           min_tokens beyond token_begin with no index installs a placeholder (searches scan
//           exactly) and builds on the node's pool; the commit's ack never waits. auto ctkvr
//           only installs the placeholder: its centroids are prompt queries, which only
//           BuildIndex carries. An automatic build never replaces an explicit one (swaps are
//           compare-and-set on the sequence's index).
//   grow    once W = index.cluster.append_every tokens are committed beyond the index's end, a
//           job on the pool indexes the next multiple of W: ctkvr clones its segment and
//           Appends; cluster adds a suffix part (k-means of W tokens into append_clusters
//           clusters, ClusterKV's decode-time clustering) to a chain whose prompt part is shared,
//           starting a new part every suffix_part_tokens. The exact tail stays < W (+ what
//           arrives while a job runs).
//   memory  index bytes take arena slots (BlockTable::ReserveSlots, rounded up per sequence),
//           so KV + indices never exceed --memory: reserving may evict cold KV blocks
//           (with --data-dir) and otherwise fails RESOURCE_EXHAUSTED — the explicit BuildIndex
//           answers it, an automatic build or growth leaves the placeholder / the current index
//           (searches stay exact for the rest) and is counted in stats().refused.
//   spill   after KV evictions, a job spills the index of every sequence none of whose blocks
//           is resident to the store's segments column family (one header + one record per
//           segment, CRC-32C records) and frees its slots; Sequence::index() reloads it.
//   durable with --durable every build is persisted (synced) before it is installed, and a
//           restarted node loads it lazily on first use; growth is not persisted on its own
//           (after a restart the tail is grown again).
//   share  an explicit build whose range lies in the sequence's published blocks is registered
//           under (namespace, model, Sequence::PrefixKey of its end, method, first layer, token
//           range, a digest of its queries). The same build of another sequence over that
//           document installs the registered SequenceIndex instead of building: the sessions
//           over one document search one set of segments (their shared prefix is stored and
//           indexed once), charged to the arena once, by a reservation released with the last
//           index that holds it. Growth adds a part of the sequence's own after the shared
//           segments (indexer::BuildSegmentAfter: ctkvr keeps the shared centroids), never a
//           copy of them. A spilled and reloaded index is the sequence's own again.
//   corrupt a record that fails its CRC or does not parse (or is missing) is never DATA_LOSS:
//           the index is derived from the KV, which is intact, so the node drops it, logs it,
//           counts it (stats().corrupt) and rebuilds it with auto_method (placeholder first:
//           searches stay exact and correct meanwhile). A ctkvr index needs BuildIndex again.
//
// Thread safety: all methods are thread-safe. Lock order: Node::mu_ → IndexManager::mu_ →
// Sequence::mu_ → the shared-index registry's lock → BlockTable::mu_; builds, growth and store I/O of jobs run without mu_.
#ifndef KVRECALL_KVSTORE_INDEX_MANAGER_H_
#define KVRECALL_KVSTORE_INDEX_MANAGER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/thread_pool.h"
#include "indexer/index.h"
#include "kvstore/block_store.h"
#include "kvstore/block_table.h"
#include "kvstore/sequence.h"

namespace kvrecall::kvstore {

struct BuildIndexArgs;
struct BuildIndexOutcome;

struct IndexManagerOptions {
  // --auto-index: the method built at prefill commit; kExact = none.
  indexer::Method auto_method = indexer::Method::kCluster;
  int first_layer = 2;       // automatic builds: layers [first_layer, num_layers)
  int64_t token_begin = 16;  // automatic builds: tokens from here (the worker's sink count)
  int64_t min_tokens = 1024;  // automatic build once this many tokens beyond token_begin
  int64_t suffix_part_tokens = 8192;  // cluster growth: a new chain part after this many
  indexer::IndexOptions index;        // method parameters (W = index.cluster.append_every)
  bool durable = false;               // persist builds (needs a store)
};

struct IndexStats {
  int64_t bytes = 0;           // heap bytes of resident indices
  int64_t reserved_bytes = 0;  // arena bytes reserved for them (slots)
  int64_t indices = 0;         // sequences with a resident, complete index
  int64_t placeholders = 0;    // sequences whose index is pending (exact scan meanwhile)
  int64_t on_disk = 0;         // sequences whose index is spilled / not yet loaded
  int64_t builds = 0;          // explicit + automatic builds installed, ever
  int64_t auto_builds = 0;     // of which automatic
  int64_t growths = 0;         // growth steps installed, ever
  int64_t spills = 0;          // indices spilled, ever
  int64_t reloads = 0;         // indices loaded from the store, ever
  int64_t corrupt = 0;         // records found corrupt (dropped and rebuilt), ever
  int64_t refused = 0;         // automatic builds / growth / reloads refused for memory, ever
  int64_t pending_jobs = 0;    // background jobs queued or running
  int64_t shared = 0;          // shared indices alive (each charged once, in bytes/reserved)
  int64_t shared_installs = 0;  // builds answered with a shared index instead of building, ever
};

class IndexManager {
 public:
  // table, pool, clock must outlive it; store may be null (no spill, no persistence).
  IndexManager(const IndexManagerOptions& options, BlockTable* table, BlockStore* store,
               ThreadPool* pool, Clock* clock);
  ~IndexManager();  // waits for jobs, releases every reservation

  const IndexManagerOptions& options() const { return options_; }

  // Starts managing `seq` (sets its index hooks). recovered: a durable restart's sequence whose
  // index (if any) is in the store: it gets an on-disk stub, loaded on first use.
  void Track(const std::shared_ptr<Sequence>& seq, bool recovered);
  // Stops managing it (a dropped sequence): waits for its job, releases its reservation and
  // deletes its records (into `batch` when given, else in a batch of its own).
  void Forget(const Sequence* seq, BlockStore::Batch* batch);

  // The explicit build (validated by Node::BuildIndex): see the header comment. `committed` is
  // the sequence's committed length when the call was validated.
  absl::StatusOr<BuildIndexOutcome> Build(const std::shared_ptr<Sequence>& seq,
                                          const BuildIndexArgs& args, int64_t committed);

  // Blocks until no background job is queued or running (tests; shutdown).
  void WaitIdle();
  // Spills the index of every sequence with no resident block (what the background sweep after
  // evictions does). Returns how many were spilled.
  int SpillCold();

  IndexStats stats() const;

  // Store keys of a sequence's index records (the segments column family).
  static std::string KeyPrefix(absl::string_view tenant, absl::string_view id);
  static std::string HeaderKey(absl::string_view tenant, absl::string_view id);
  static std::string SegmentKey(absl::string_view tenant, absl::string_view id, uint32_t j);
  // The exclusive end of the key range [KeyPrefix, RecordsEnd) that holds all of them.
  static std::string RecordsEnd(absl::string_view prefix);

 private:
  class SharedRegistry;
  struct Entry {
    std::weak_ptr<Sequence> seq;
    std::vector<uint8_t*> slots;  // reserved for its resident index
    bool busy = false;            // a job for it is queued or running
    bool auto_failed = false;     // an automatic build failed: not retried until BuildIndex
    const SequenceIndex* persisted = nullptr;  // the resident index whose records are stored
  };

  // Installs `next` if the sequence's index is still `expected`, re-charging its reservation.
  // ABORTED when it changed meanwhile; RESOURCE_EXHAUSTED when the slots cannot be had.
  absl::Status InstallLocked(const Sequence* seq, Entry* e, const SequenceIndex* expected,
                             std::shared_ptr<const SequenceIndex> next)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ScheduleLocked(const std::shared_ptr<Sequence>& seq, Entry* e,
                      void (IndexManager::*job)(const std::shared_ptr<Sequence>&))
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::shared_ptr<const SequenceIndex> Placeholder(const Sequence& seq, indexer::Method method,
                                                   int first_layer, int64_t token_begin) const;
  // Builds every segment of layers [first_layer, num_layers) over [token_begin, token_end).
  // `ctkvr`: an explicit build's queries and lists (its other fields are ignored); null for
  // other methods.
  absl::StatusOr<std::shared_ptr<SequenceIndex>> BuildSegments(const Sequence& seq,
                                                               indexer::Method method,
                                                               int first_layer, int64_t token_begin,
                                                               int64_t token_end,
                                                               const BuildIndexArgs* ctkvr) const;
  absl::Status Persist(const Sequence& seq, const SequenceIndex& index);
  absl::StatusOr<std::shared_ptr<SequenceIndex>> LoadRecords(const Sequence& seq) const;

  // The registry key of an explicit build over [args.token_begin, token_end), or "" when its
  // range is not all in published blocks (nothing else can hold the same tokens).
  std::string ShareKey(const Sequence& seq, const BuildIndexArgs& args, int64_t token_end) const;

  void OnCommit(const Sequence* seq, int64_t committed);
  // Blocks until no job of `seq` is queued or running (or it is not tracked).
  void AwaitIdleLocked(const Sequence* seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a sequence of `num_layers` layers with `committed` tokens gets an automatic index.
  bool AutoEligible(int num_layers, int64_t committed) const;
  std::shared_ptr<const SequenceIndex> Load(const Sequence* seq,
                                            std::shared_ptr<const SequenceIndex> stub);
  // Jobs.
  void AutoBuildJob(const std::shared_ptr<Sequence>& seq);
  void GrowJob(const std::shared_ptr<Sequence>& seq);
  void Finish(const Sequence* seq);

  const IndexManagerOptions options_;
  BlockTable* const table_;
  BlockStore* const store_;
  ThreadPool* const pool_;
  Clock* const clock_;
  const bool persist_;  // options_.durable with a store: builds are persisted
  // Shared indices (see "share" above); outlives this object while an index holds a charge.
  const std::shared_ptr<SharedRegistry> shared_;
  // The hooks every tracked sequence gets (they hold no per-sequence state).
  const std::shared_ptr<const Sequence::IndexHooks> hooks_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<const Sequence*, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int64_t pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool sweep_queued_ ABSL_GUARDED_BY(mu_) = false;
  int64_t swept_evictions_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reserved_slots_ ABSL_GUARDED_BY(mu_) = 0;
  IndexStats counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_INDEX_MANAGER_H_
