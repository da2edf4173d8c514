#include "kvstore/block_store.h"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kvstore/internal/block_record.h"
#include "kvstore/internal/rocksdb_status.h"
#include "rocksdb/db.h"
#include "rocksdb/listener.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/write_batch.h"

namespace kvrecall::kvstore {
namespace {

using internal::FromRocksDb;

rocksdb::Slice S(absl::string_view s) { return rocksdb::Slice(s.data(), s.size()); }

// RocksDB's own recovery from a full disk polls for free space in the background (seconds);
// Commit resumes before the next write instead, once the file system reports room again, so that
// writes work again as soon as there is space.
class ManualRecovery final : public rocksdb::EventListener {
 public:
  void OnErrorRecoveryBegin(rocksdb::BackgroundErrorReason, rocksdb::Status,
                            bool* auto_recovery) override {
    *auto_recovery = false;
  }
};

class BatchImpl final : public BlockStore::Batch {
 public:
  BatchImpl(rocksdb::ColumnFamilyHandle* blocks, rocksdb::ColumnFamilyHandle* segments,
            rocksdb::ColumnFamilyHandle* meta)
      : blocks_(blocks), segments_(segments), meta_(meta) {}

  void PutBlock(absl::string_view key, absl::Span<const uint8_t* const> layers,
                size_t layer_bytes) override {
    auto header = std::make_unique<uint8_t[]>(kBlockRecordHeaderBytes);
    internal::EncodeBlockRecordHeader(layers, layer_bytes, header.get());
    std::vector<rocksdb::Slice> parts;
    parts.reserve(layers.size() + 1);
    parts.emplace_back(reinterpret_cast<const char*>(header.get()), kBlockRecordHeaderBytes);
    for (const uint8_t* l : layers) {
      parts.emplace_back(reinterpret_cast<const char*>(l), layer_bytes);
    }
    const rocksdb::Slice k = S(key);
    batch_.Put(blocks_, rocksdb::SliceParts(&k, 1),
               rocksdb::SliceParts(parts.data(), static_cast<int>(parts.size())));
    headers_.push_back(std::move(header));
    ++ops_;
  }
  void DeleteBlock(absl::string_view key) override {
    batch_.Delete(blocks_, S(key));
    ++ops_;
  }
  void PutMeta(absl::string_view key, absl::string_view value) override {
    batch_.Put(meta_, S(key), S(value));
    ++ops_;
  }
  void DeleteMeta(absl::string_view key) override {
    batch_.Delete(meta_, S(key));
    ++ops_;
  }
  void PutSegment(absl::string_view key, absl::string_view value) override {
    batch_.Put(segments_, S(key), S(value));
    ++ops_;
  }
  void DeleteSegmentRange(absl::string_view begin, absl::string_view end) override {
    batch_.DeleteRange(segments_, S(begin), S(end));
    ++ops_;
  }
  bool empty() const override { return ops_ == 0; }

  rocksdb::WriteBatch* batch() { return &batch_; }

 private:
  rocksdb::ColumnFamilyHandle* const blocks_;
  rocksdb::ColumnFamilyHandle* const segments_;
  rocksdb::ColumnFamilyHandle* const meta_;
  rocksdb::WriteBatch batch_;
  std::vector<std::unique_ptr<uint8_t[]>> headers_;
  int ops_ = 0;
};

class RocksBlockStore final : public BlockStore {
 public:
  ~RocksBlockStore() override {
    for (rocksdb::ColumnFamilyHandle* h : handles_) {
      if (h != nullptr) db_->DestroyColumnFamilyHandle(h);
    }
    db_.reset();
  }

  static absl::StatusOr<std::unique_ptr<BlockStore>> Open(const BlockStoreOptions& o) {
    if (o.dir.empty()) return absl::InvalidArgumentError("BlockStore needs a directory");
    std::error_code ec;
    const std::string marker = o.dir + "/KVRECALL_DURABLE";
    if (!o.durable && std::filesystem::exists(marker, ec)) {
      return absl::FailedPreconditionError(absl::StrCat(
          o.dir,
          " holds a --durable node's data; start with --durable, or use another directory "
          "(without --durable the directory is wiped at start)"));
    }
    std::filesystem::create_directories(o.dir, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("cannot create ", o.dir, ": ", ec.message()));
    }
    if (o.durable && !std::filesystem::exists(marker, ec)) {
      std::ofstream(marker) << "kvrecall --durable data directory\n";
    }
    rocksdb::DBOptions db;
    db.create_if_missing = true;
    db.create_missing_column_families = true;
    db.paranoid_checks = true;
    db.max_background_jobs = 2;
    if (o.env != nullptr) db.env = o.env;
    db.listeners.push_back(std::make_shared<ManualRecovery>());
    rocksdb::ColumnFamilyOptions cf;
    cf.compression = rocksdb::kNoCompression;  // bf16 KV does not compress; keep spill fast
    cf.write_buffer_size = 64 << 20;
    cf.max_write_buffer_number = 2;
    cf.target_file_size_base = 256 << 20;
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
        {rocksdb::kDefaultColumnFamilyName, cf},
        {"blocks", cf},
        {"segments", cf},
        {"meta", rocksdb::ColumnFamilyOptions()},
    };
    if (!o.durable) {
      // Spill records of an earlier process are unreachable: drop them. DestroyDB removes
      // RocksDB's files only, never anything else an operator put in the directory.
      rocksdb::Options destroy(db, cf);
      RETURN_IF_ERROR(FromRocksDb(rocksdb::DestroyDB(o.dir, destroy, cfs), "wipe " + o.dir));
    }
    auto store = std::unique_ptr<RocksBlockStore>(new RocksBlockStore());
    store->durable_ = o.durable;
    store->dir_ = o.dir;
    rocksdb::DB* raw = nullptr;
    RETURN_IF_ERROR(FromRocksDb(rocksdb::DB::Open(db, o.dir, cfs, &store->handles_, &raw),
                                absl::StrCat("open ", o.dir)));
    store->db_.reset(raw);
    store->write_.sync = o.durable;
    store->write_.disableWAL = !o.durable;
    store->read_.verify_checksums = true;
    return std::unique_ptr<BlockStore>(std::move(store));
  }

  std::unique_ptr<Batch> NewBatch() override {
    return std::make_unique<BatchImpl>(blocks(), segments(), meta());
  }

  absl::Status Commit(Batch* batch) override {
    auto* b = static_cast<BatchImpl*>(batch);
    if (b->empty()) return absl::OkStatus();
    if (needs_resume_.load() && HasRoom()) {
      // Leave the read-only state a full disk left behind, now that there is room again.
      // (Resuming while the disk is still full would fail its flush and make the error fatal.)
      if (db_->Resume().ok()) needs_resume_.store(false);
    }
    const rocksdb::Status w = db_->Write(write_, b->batch());
    if (w.IsNoSpace() || w.IsIOError()) needs_resume_.store(true);
    return FromRocksDb(w, "write blocks");
  }

  absl::Status GetBlock(absl::string_view key, absl::Span<uint8_t* const> layers,
                        size_t layer_bytes) const override {
    rocksdb::PinnableSlice v;
    RETURN_IF_ERROR(FromRocksDb(db_->Get(read_, blocks(), S(key), &v), "read block"));
    return internal::DecodeBlockRecord(absl::string_view(v.data(), v.size()), layers,
                                       layer_bytes);
  }

  absl::Status GetSegment(absl::string_view key, std::string* value) const override {
    return FromRocksDb(db_->Get(read_, segments(), S(key), value), "read index record");
  }

  absl::Status ScanMeta(
      const std::function<absl::Status(absl::string_view, absl::string_view)>& fn) const override {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(read_, meta()));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      RETURN_IF_ERROR(fn(absl::string_view(it->key().data(), it->key().size()),
                         absl::string_view(it->value().data(), it->value().size())));
    }
    return FromRocksDb(it->status(), "scan metadata");
  }

  absl::Status PutRaw(absl::string_view key, absl::string_view value) override {
    return FromRocksDb(db_->Put(write_, blocks(), S(key), S(value)), "put");
  }
  absl::Status GetRaw(absl::string_view key, std::string* value) const override {
    return FromRocksDb(db_->Get(read_, blocks(), S(key), value), "get");
  }

  absl::Status OverwriteBlockRecordForTest(absl::string_view key,
                                           absl::string_view record) override {
    return PutRaw(key, record);
  }
  absl::StatusOr<std::string> GetBlockRecordForTest(absl::string_view key) const override {
    std::string v;
    RETURN_IF_ERROR(GetRaw(key, &v));
    return v;
  }

 private:
  RocksBlockStore() = default;
  rocksdb::ColumnFamilyHandle* blocks() const { return handles_[1]; }
  rocksdb::ColumnFamilyHandle* segments() const { return handles_[2]; }
  rocksdb::ColumnFamilyHandle* meta() const { return handles_[3]; }

  bool HasRoom() const {
    uint64_t free = 0;
    return db_->GetEnv()->GetFreeSpace(dir_, &free).ok() && free >= kResumeFreeBytes;
  }
  static constexpr uint64_t kResumeFreeBytes = 256 << 20;

  bool durable_ = false;
  std::string dir_;
  std::atomic<bool> needs_resume_{false};  // a write failed for lack of space
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  rocksdb::WriteOptions write_;  // durable: sync WAL; spill: no WAL
  rocksdb::ReadOptions read_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BlockStore>> BlockStore::Open(const BlockStoreOptions& options) {
  return RocksBlockStore::Open(options);
}

}  // namespace kvrecall::kvstore
