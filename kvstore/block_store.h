// The tier node's disk: a RocksDB database under --data-dir holding spilled and durable KV blocks.
//
// Column families:
//   blocks    key: "c" + 16-byte content key (published, shareable blocks: stored once, whoever
//             spilled them) or "p" + 8-byte big-endian block id (private blocks);
//             value: a block record (below).
//   segments  index records of sequences (index_manager.h): one header and one record per
//             (sparse layer, kv-head), keyed by IndexManager; written when an index is spilled
//             with its sequence, and (--durable) after every build.
//   meta      durable sequence records (node.cc), one per (tenant, sequence).
//
// Block record, version 1 (all integers little-endian):
//   [0, 4)    magic "KVB1"
//   [4, 8)    u32 num_layers
//   [8, 16)   u64 layer_bytes
//   [16, 20)  u32 CRC-32C (internal/crc32c.h) of bytes [0, 16) followed by the payload
//   [20, ...) payload: num_layers * layer_bytes, layer l's slot bytes (K then V, arena.h) in order
// A record whose size, magic, shape or CRC does not match is DATA_LOSS on read: corruption never
// becomes wrong KV.
//
// Modes: durable=false (spill only) wipes RocksDB's files in the directory at Open (spilled
// blocks of an earlier process are unreachable; FAILED_PRECONDITION instead when the directory
// belongs to a durable store, marked by a KVRECALL_DURABLE file) and writes without the WAL (a
// crash loses nothing acknowledged: without --durable nothing survives a restart anyway).
// durable=true keeps the directory, and every Commit goes through the WAL with sync before it
// returns.
//
// Thread safety: all methods are thread-safe (RocksDB's own guarantees); a Batch is not.
#ifndef KVRECALL_KVSTORE_BLOCK_STORE_H_
#define KVRECALL_KVSTORE_BLOCK_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace rocksdb {
class Env;
}  // namespace rocksdb

namespace kvrecall::kvstore {

struct BlockStoreOptions {
  std::string dir;       // created when missing
  bool durable = false;  // see the header comment
  // The RocksDB environment; null: the default (real files). Fault tests pass a wrapper.
  rocksdb::Env* env = nullptr;
};

inline constexpr size_t kBlockRecordHeaderBytes = 20;

class BlockStore {
 public:
  // INTERNAL (or RESOURCE_EXHAUSTED for a full disk) when RocksDB cannot open the directory.
  static absl::StatusOr<std::unique_ptr<BlockStore>> Open(const BlockStoreOptions& options);
  virtual ~BlockStore() = default;

  // A group of writes applied atomically by Commit. Slot bytes are referenced, not copied, until
  // Commit returns: they must stay unchanged until then.
  class Batch {
   public:
    virtual ~Batch() = default;
    // layers: num_layers pointers to layer_bytes bytes each.
    virtual void PutBlock(absl::string_view key, absl::Span<const uint8_t* const> layers,
                          size_t layer_bytes) = 0;
    virtual void DeleteBlock(absl::string_view key) = 0;
    virtual void PutMeta(absl::string_view key, absl::string_view value) = 0;
    virtual void DeleteMeta(absl::string_view key) = 0;
    // Index records (the segments column family); values are opaque here.
    virtual void PutSegment(absl::string_view key, absl::string_view value) = 0;
    // Deletes every segments key k with begin <= k < end.
    virtual void DeleteSegmentRange(absl::string_view begin, absl::string_view end) = 0;
    virtual bool empty() const = 0;
  };
  virtual std::unique_ptr<Batch> NewBatch() = 0;
  // Applies the batch (with a synced WAL when durable). RESOURCE_EXHAUSTED for a full disk.
  virtual absl::Status Commit(Batch* batch) = 0;

  // Reads block `key` into layers[l] (layer_bytes each). NOT_FOUND when absent; DATA_LOSS when
  // the record is malformed, of another shape, or fails its checksum (layers then hold garbage).
  virtual absl::Status GetBlock(absl::string_view key, absl::Span<uint8_t* const> layers,
                                size_t layer_bytes) const = 0;
  // Index record `key` into *value: NOT_FOUND when absent.
  virtual absl::Status GetSegment(absl::string_view key, std::string* value) const = 0;

  // Every meta record, in key order. Stops at and returns the first error of `fn`.
  virtual absl::Status ScanMeta(
      const std::function<absl::Status(absl::string_view key, absl::string_view value)>& fn)
      const = 0;

  // The benchmark's baseline: a plain put / get of `value` in the blocks column family with the
  // same options as spill.
  virtual absl::Status PutRaw(absl::string_view key, absl::string_view value) = 0;
  virtual absl::Status GetRaw(absl::string_view key, std::string* value) const = 0;

  // Test hook: overwrites the stored record of block `key` as given (corruption tests).
  virtual absl::Status OverwriteBlockRecordForTest(absl::string_view key,
                                                   absl::string_view record) = 0;
  virtual absl::StatusOr<std::string> GetBlockRecordForTest(absl::string_view key) const = 0;
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_BLOCK_STORE_H_
