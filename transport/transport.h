// The bulk data plane: one-sided writes of K/V rows into memory a peer registered.
//
// Control (who may write where) travels over gRPC as a RemoteRegion descriptor; bytes travel here.
// Two implementations: UCX (UCP put over RDMA / TCP / shared memory) and in-process (memcpy, for
// LocalTier and tests), chosen by factory.
//
// Thread safety: Transport, RegisteredRegion and RemoteWriter are safe to use from many threads
// at once (the tier node serves many Retrieve calls concurrently through one Transport).
#ifndef KVRECALL_TRANSPORT_TRANSPORT_H_
#define KVRECALL_TRANSPORT_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvrecall::transport {

// What a remote peer needs to write into a registered region. Opaque outside the transport that
// produced it; travels inside AttachWorker.
struct RemoteRegion {
  std::string peer_address;  // transport address of the region's owner (UCX worker address bytes)
  uint64_t base = 0;         // remote virtual address of the region's byte 0
  uint64_t length = 0;       // bytes
  std::string rkey;          // packed remote key (empty for in-process)
};

// Local memory registered with a transport so that peers may put into it. Owns the registration
// (and the memory, when the transport allocated it); the descriptor stays valid while it lives.
class RegisteredRegion {
 public:
  virtual ~RegisteredRegion() = default;
  virtual uint8_t* data() = 0;
  virtual size_t size() const = 0;
  virtual RemoteRegion Describe() const = 0;
};

// One put: `length` bytes from local `src` to byte `remote_offset` of the remote region.
struct PutOp {
  const void* src = nullptr;
  size_t length = 0;
  uint64_t remote_offset = 0;
};

// A connection to one remote region.
class RemoteWriter {
 public:
  virtual ~RemoteWriter() = default;
  // Issues every put and returns only after all completed at the target (the bytes are visible
  // to the region's owner once this returns OK). An op outside the region fails the whole call
  // with OUT_OF_RANGE before anything is sent. A broken peer answers UNAVAILABLE.
  virtual absl::Status PutAll(absl::Span<const PutOp> ops) = 0;
  virtual const RemoteRegion& region() const = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual absl::string_view name() const = 0;  // "ucx" or "inproc"

  // Allocates `bytes` (page-aligned, zeroed) and registers it for remote writes.
  virtual absl::StatusOr<std::unique_ptr<RegisteredRegion>> AllocateRegion(size_t bytes) = 0;
  // Registers caller-owned memory. REQUIRES: [data, data + bytes) outlives the returned region.
  virtual absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* data, size_t bytes) = 0;

  // Connects to a peer's region. INVALID_ARGUMENT for a malformed descriptor (bad address or
  // rkey bytes), UNAVAILABLE when the peer cannot be reached.
  virtual absl::StatusOr<std::unique_ptr<RemoteWriter>> Connect(const RemoteRegion& region) = 0;
};

struct UcxOptions {
  // UCX_TLS-style transport list ("tcp", "shm,self", "rc,ud"...); empty = UCX's own choice.
  std::string transports;
};

// UCX over whatever the host has. Starts a progress thread so that peers' puts land even when
// this process is not calling into UCX (TCP and shared-memory puts need target-side progress).
absl::StatusOr<std::unique_ptr<Transport>> CreateUcxTransport(const UcxOptions& options = {});

// Writes are memcpy within this process; Connect accepts only regions of the same instance.
std::unique_ptr<Transport> CreateInProcessTransport();

}  // namespace kvrecall::transport

#endif  // KVRECALL_TRANSPORT_TRANSPORT_H_
