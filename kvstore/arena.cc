#include "kvstore/arena.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace kvrecall::kvstore {
namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kSlotAlign = 64;
}  // namespace

absl::StatusOr<std::unique_ptr<Arena>> Arena::Create(const ArenaOptions& options,
                                                     transport::Transport* transport) {
  if (options.bytes < 0) return absl::InvalidArgumentError("arena size must be >= 0");
  const size_t size = static_cast<size_t>(options.bytes);
  if (size == 0) return std::unique_ptr<Arena>(new Arena(nullptr, 0, "none"));
  void* p = MAP_FAILED;
  std::string mode = "none";
  if (options.try_hugepages && size % kHugePage == 0) {
    // No MAP_NORESERVE here: without a reservation a hugetlb fault would SIGBUS later; with it
    // mmap fails now when the host's hugepage pool is short, and we fall back.
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1,
             0);
    if (p != MAP_FAILED) mode = "hugetlb";
  }
  if (p == MAP_FAILED) {
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
             0);
    if (p == MAP_FAILED) {
      return absl::InternalError(
          absl::StrCat("mmap of ", size, " bytes for the KV arena: ", std::strerror(errno)));
    }
    if (options.try_hugepages && size >= kHugePage && madvise(p, size, MADV_HUGEPAGE) == 0)
      mode = "thp";
  }
  std::unique_ptr<Arena> arena(new Arena(static_cast<uint8_t*>(p), size, mode));
  if (transport != nullptr) {
    absl::StatusOr<std::unique_ptr<transport::RegisteredRegion>> r =
        transport->RegisterRegion(p, size);
    if (r.ok()) {
      arena->region_ = std::move(*r);
    } else {
      KV_LOG(WARNING) << "KV arena not registered with the " << transport->name()
                      << " transport: " << r.status();
    }
  }
  KV_LOG(INFO) << "KV arena: " << size << " bytes, hugepages=" << mode
               << ", registered=" << (arena->registered() ? "yes" : "no");
  return arena;
}

Arena::~Arena() {
  region_.reset();
  if (base_ != nullptr) munmap(base_, size_);
}

absl::Status Arena::EnsureSlotBytes(size_t bytes) {
  const size_t want = (std::max<size_t>(bytes, 1) + kSlotAlign - 1) / kSlotAlign * kSlotAlign;
  absl::MutexLock lock(&mu_);
  if (slot_bytes_ == 0) {
    slot_bytes_ = want;
    total_slots_ = static_cast<int64_t>(std::min<size_t>(size_ / want, UINT32_MAX));
    return absl::OkStatus();
  }
  if (want > slot_bytes_) {
    return absl::FailedPreconditionError(
        absl::StrCat("a block layer of ", bytes, " bytes does not fit the arena's ", slot_bytes_,
                     "-byte slots (start the node with a larger "
                     "--arena_block_bytes)"));
  }
  return absl::OkStatus();
}

size_t Arena::slot_bytes() const {
  absl::MutexLock lock(&mu_);
  return slot_bytes_;
}

absl::Status Arena::Allocate(int n, std::vector<uint8_t*>* out) {
  absl::MutexLock lock(&mu_);
  if (slot_bytes_ == 0) return absl::FailedPreconditionError("arena slot size is not set");
  const int64_t available = static_cast<int64_t>(free_.size()) + (total_slots_ - carved_);
  if (n > available) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV arena full: ", n, " slots of ", slot_bytes_, " bytes wanted, ", available,
                     " free of ", total_slots_, " (--memory ", size_, " bytes)"));
  }
  for (int i = 0; i < n; ++i) {
    uint32_t idx;
    if (!free_.empty()) {
      idx = free_.back();
      free_.pop_back();
    } else {
      idx = static_cast<uint32_t>(carved_++);
    }
    out->push_back(base_ + static_cast<size_t>(idx) * slot_bytes_);
  }
  used_ += n;
  return absl::OkStatus();
}

void Arena::Free(absl::Span<uint8_t* const> slots) {
  absl::MutexLock lock(&mu_);
  for (uint8_t* s : slots)
    free_.push_back(static_cast<uint32_t>(static_cast<size_t>(s - base_) / slot_bytes_));
  used_ -= static_cast<int64_t>(slots.size());
}

int64_t Arena::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_ * static_cast<int64_t>(slot_bytes_);
}
int64_t Arena::used_slots() const {
  absl::MutexLock lock(&mu_);
  return used_;
}
int64_t Arena::total_slots() const {
  absl::MutexLock lock(&mu_);
  return total_slots_;
}

absl::StatusOr<transport::RemoteRegion> Arena::Describe() const {
  if (region_ == nullptr) {
    return absl::FailedPreconditionError("the arena is not registered with a data transport");
  }
  return region_->Describe();
}

}  // namespace kvrecall::kvstore
