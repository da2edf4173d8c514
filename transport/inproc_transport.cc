// In-process implementation of Transport: puts and gets are memcpy to and from regions of the
// same instance.
//
// Thread safety / Invariants: an InProcCore (shared by the transport, its regions and writers)
// keeps the set of live regions under a reader/writer mutex. PutAll copies under the reader lock
// and a region unregisters under the writer lock, so a region is never freed while a put into it
// is running, and a put into a destroyed region answers UNAVAILABLE instead of writing freed
// memory. Descriptors name a region by (base, length); a writer binds to the region's id at
// Connect, so a later region at the same address is not written by an old writer.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "transport/internal/put_validation.h"
#include "transport/transport.h"

namespace kvrecall::transport {
namespace {

class InProcCore {
 public:
  InProcCore() {
    static std::atomic<uint64_t> next_instance{1};
    id_ = absl::StrCat("inproc:", getpid(), "-", next_instance.fetch_add(1));
  }

  const std::string& id() const { return id_; }

  uint64_t Add(uint8_t* base, size_t length) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::WriterMutexLock lock(&mu_);
    const uint64_t region_id = next_region_++;
    regions_[region_id] = Live{reinterpret_cast<uintptr_t>(base), length};
    return region_id;
  }

  void Remove(uint64_t region_id) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::WriterMutexLock lock(&mu_);
    regions_.erase(region_id);
  }

  // The id of the live region that contains [base, base + length), if any.
  absl::StatusOr<uint64_t> Find(uint64_t base, uint64_t length) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& [region_id, live] : regions_) {
      if (base >= live.base && base - live.base <= live.length &&
          length <= live.length - (base - live.base)) {
        return region_id;
      }
    }
    return absl::UnavailableError("in-process region is not registered (destroyed?)");
  }

  absl::Status Put(uint64_t region_id, uint64_t base, absl::Span<const PutOp> ops)
      ABSL_LOCKS_EXCLUDED(mu_) {
    return Copy(region_id, ops, [base](const PutOp& op) {
      std::memcpy(reinterpret_cast<uint8_t*>(base + op.remote_offset), op.src, op.length);
    });
  }

  absl::Status Get(uint64_t region_id, uint64_t base, absl::Span<const GetOp> ops)
      ABSL_LOCKS_EXCLUDED(mu_) {
    return Copy(region_id, ops, [base](const GetOp& op) {
      std::memcpy(op.dst, reinterpret_cast<const uint8_t*>(base + op.remote_offset), op.length);
    });
  }

  // Runs `write` with the region's memory, under the reader lock (the region cannot go away).
  absl::StatusOr<bool> WriteDirect(uint64_t region_id, uint64_t base,
                                   absl::FunctionRef<absl::Status(uint8_t*)> write) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::ReaderMutexLock lock(&mu_);
    if (regions_.find(region_id) == regions_.end()) {
      return absl::UnavailableError("in-process region was destroyed");
    }
    RETURN_IF_ERROR(write(reinterpret_cast<uint8_t*>(base)));
    return true;
  }

 private:
  struct Live {
    uint64_t base;
    uint64_t length;
  };

  // Runs copy(op) for every nonempty op while the region stays registered (UNAVAILABLE once
  // destroyed).
  template <typename Op, typename CopyFn>
  absl::Status Copy(uint64_t region_id, absl::Span<const Op> ops, CopyFn copy)
      ABSL_LOCKS_EXCLUDED(mu_) {
    absl::ReaderMutexLock lock(&mu_);
    if (regions_.find(region_id) == regions_.end()) {
      return absl::UnavailableError("in-process region was destroyed");
    }
    for (const Op& op : ops) {
      if (op.length != 0) copy(op);
    }
    return absl::OkStatus();
  }

  std::string id_;
  absl::Mutex mu_;
  std::map<uint64_t, Live> regions_ ABSL_GUARDED_BY(mu_);
  uint64_t next_region_ ABSL_GUARDED_BY(mu_) = 1;
};

class InProcRegion final : public RegisteredRegion {
 public:
  // `mapped`: the region owns [data, data + size) as an anonymous mapping.
  InProcRegion(std::shared_ptr<InProcCore> core, uint8_t* data, size_t size, bool mapped)
      : core_(std::move(core)),
        data_(data),
        size_(size),
        mapped_(mapped),
        region_id_(core_->Add(data, size)) {}
  ~InProcRegion() override {
    core_->Remove(region_id_);
    if (mapped_) munmap(data_, size_);
  }

  uint8_t* data() override { return data_; }
  size_t size() const override { return size_; }
  RemoteRegion Describe() const override {
    RemoteRegion region;
    region.peer_address = core_->id();
    region.base = reinterpret_cast<uintptr_t>(data_);
    region.length = size_;
    return region;
  }

 private:
  const std::shared_ptr<InProcCore> core_;
  uint8_t* const data_;
  const size_t size_;
  const bool mapped_;
  const uint64_t region_id_;
};

class InProcWriter final : public RemoteWriter {
 public:
  InProcWriter(std::shared_ptr<InProcCore> core, uint64_t region_id, RemoteRegion region)
      : core_(std::move(core)), region_id_(region_id), region_(std::move(region)) {}

  absl::Status PutAll(absl::Span<const PutOp> ops) override {
    RETURN_IF_ERROR(internal::ValidatePutOps(ops, region_.length));
    return core_->Put(region_id_, region_.base, ops);
  }
  absl::StatusOr<bool> WriteDirect(absl::FunctionRef<absl::Status(uint8_t* base)> write) override {
    return core_->WriteDirect(region_id_, region_.base, write);
  }
  absl::Status GetAll(absl::Span<const GetOp> ops) override {
    RETURN_IF_ERROR(internal::ValidateGetOps(ops, region_.length));
    return core_->Get(region_id_, region_.base, ops);
  }
  const RemoteRegion& region() const override { return region_; }

 private:
  const std::shared_ptr<InProcCore> core_;
  const uint64_t region_id_;
  const RemoteRegion region_;
};

class InProcTransport final : public Transport {
 public:
  InProcTransport() : core_(std::make_shared<InProcCore>()) {}

  absl::string_view name() const override { return "inproc"; }

  absl::StatusOr<std::unique_ptr<RegisteredRegion>> AllocateRegion(size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError("region of 0 bytes");
    void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
      return absl::ResourceExhaustedError(absl::StrCat("mmap of ", bytes, " bytes failed"));
    }
    return std::unique_ptr<RegisteredRegion>(
        new InProcRegion(core_, static_cast<uint8_t*>(data), bytes, /*mapped=*/true));
  }

  absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* data,
                                                                   size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError("region of 0 bytes");
    if (data == nullptr) return absl::InvalidArgumentError("null region");
    return std::unique_ptr<RegisteredRegion>(
        new InProcRegion(core_, static_cast<uint8_t*>(data), bytes, /*mapped=*/false));
  }

  absl::StatusOr<std::unique_ptr<RemoteWriter>> Connect(const RemoteRegion& region) override {
    if (region.peer_address != core_->id()) {
      return absl::InvalidArgumentError(
          absl::StrCat("descriptor is not from this in-process transport (", core_->id(), ")"));
    }
    if (!region.rkey.empty()) {
      return absl::InvalidArgumentError("in-process descriptors carry no rkey");
    }
    if (region.length == 0) return absl::InvalidArgumentError("remote region of 0 bytes");
    ASSIGN_OR_RETURN(uint64_t region_id, core_->Find(region.base, region.length));
    return std::unique_ptr<RemoteWriter>(new InProcWriter(core_, region_id, region));
  }

 private:
  const std::shared_ptr<InProcCore> core_;
};

}  // namespace

std::unique_ptr<Transport> CreateInProcessTransport() {
  return std::make_unique<InProcTransport>();
}

}  // namespace kvrecall::transport
