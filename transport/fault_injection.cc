#include "transport/fault_injection.h"

#include <utility>

#include "absl/time/clock.h"
#include "common/status_macros.h"

namespace kvrecall::transport {
namespace {

class DelayedWriter final : public RemoteWriter {
 public:
  DelayedWriter(std::unique_ptr<RemoteWriter> inner, absl::Duration delay) : inner_(std::move(inner)), delay_(delay) {}
  absl::Status PutAll(absl::Span<const PutOp> ops) override {
    absl::SleepFor(delay_);
    return inner_->PutAll(ops);
  }
  absl::Status GetAll(absl::Span<const GetOp> ops) override { return inner_->GetAll(ops); }
  const RemoteRegion& region() const override { return inner_->region(); }

 private:
  std::unique_ptr<RemoteWriter> inner_;
  absl::Duration delay_;
};

class DelayedTransport final : public Transport {
 public:
  DelayedTransport(std::unique_ptr<Transport> inner, absl::Duration delay) : inner_(std::move(inner)), delay_(delay) {}
  absl::string_view name() const override { return inner_->name(); }
  absl::StatusOr<std::unique_ptr<RegisteredRegion>> AllocateRegion(size_t bytes) override {
    return inner_->AllocateRegion(bytes);
  }
  absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* data, size_t bytes) override {
    return inner_->RegisterRegion(data, bytes);
  }
  absl::StatusOr<std::unique_ptr<RemoteWriter>> Connect(const RemoteRegion& region) override {
    ASSIGN_OR_RETURN(std::unique_ptr<RemoteWriter> writer, inner_->Connect(region));
    return std::unique_ptr<RemoteWriter>(new DelayedWriter(std::move(writer), delay_));
  }

 private:
  std::unique_ptr<Transport> inner_;
  absl::Duration delay_;
};

}  // namespace

std::unique_ptr<Transport> WithPutDelay(std::unique_ptr<Transport> inner, absl::Duration put_delay) {
  return std::make_unique<DelayedTransport>(std::move(inner), put_delay);
}

}  // namespace kvrecall::transport
