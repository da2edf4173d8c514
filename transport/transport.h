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

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
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

// One get: `length` bytes from byte `remote_offset` of the remote region to local `dst`.
struct GetOp {
  void* dst = nullptr;
  size_t length = 0;
  uint64_t remote_offset = 0;
};

// A connection to one remote region. Writers to the same peer share one underlying connection.
class RemoteWriter {
 public:
  virtual ~RemoteWriter() = default;
  // Issues every put and returns only after all completed at the target (the bytes are visible
  // to the region's owner once this returns OK). An op outside the region fails the whole call
  // with OUT_OF_RANGE before anything is sent (a null `src` with nonzero length: INVALID_ARGUMENT).
  // A broken peer answers UNAVAILABLE, also when it does not complete within the transport's put
  // timeout (UcxOptions::put_timeout); the connection is then dropped, and later calls on this
  // writer answer UNAVAILABLE too (Connect again for a fresh connection).
  // On any return every op has finished reading its `src`: the caller may reuse the buffers.
  // Zero-length ops are skipped. Ops may overlap; the order in which overlapping bytes land is
  // unspecified.
  virtual absl::Status PutAll(absl::Span<const PutOp> ops) = 0;

  // Direct writes, for a region that is mapped into this process (same-host shared memory; the
  // in-process transport): runs `write(base)` with `base` addressing the region's byte 0, so the
  // caller fills bytes of [0, region().length) with plain stores — from as many threads as it
  // likes — instead of staging them and calling PutAll, and returns true; the bytes are visible
  // to the region's owner once this returns. Returns false without calling `write` when the
  // region is not mapped here (network transports): use PutAll then. The mapping stays valid
  // while `write` runs, even if the peer fails meanwhile. `write` must not call into the
  // transport; its error is returned as is. Default: false.
  virtual absl::StatusOr<bool> WriteDirect(absl::FunctionRef<absl::Status(uint8_t* base)> write) {
    return false;
  }

  // Reads: copies every op's bytes of the remote region into its `dst` and returns once all
  // arrived (a one-sided get, e.g. an RDMA read; a plain copy when the region is mapped here).
  // Errors as PutAll's: OUT_OF_RANGE for an op outside the region and INVALID_ARGUMENT for a
  // null `dst` with nonzero length, before anything is read; UNAVAILABLE for a broken peer or
  // one that does not complete within the put timeout. The region's owner may change the bytes
  // meanwhile: the caller gets a snapshot of each byte, not of the whole region.
  virtual absl::Status GetAll(absl::Span<const GetOp> ops) = 0;

  virtual const RemoteRegion& region() const = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual absl::string_view name() const = 0;  // "ucx" or "inproc"

  // Allocates `bytes` (page-aligned, zeroed) and registers it for remote writes.
  virtual absl::StatusOr<std::unique_ptr<RegisteredRegion>> AllocateRegion(size_t bytes) = 0;
  // Registers caller-owned memory. REQUIRES: [data, data + bytes) outlives the returned region.
  virtual absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* data,
                                                                           size_t bytes) = 0;

  // Connects to a peer's region. INVALID_ARGUMENT for a malformed descriptor (bad address or
  // rkey bytes, zero length, or a descriptor produced by another kind of transport), UNAVAILABLE
  // when the peer cannot be reached. UCX connects lazily: an unreachable peer usually shows up
  // as UNAVAILABLE from the first PutAll rather than from Connect.
  //
  // Lifetimes: regions and writers keep the transport's resources alive, so they may outlive the
  // Transport object itself.
  virtual absl::StatusOr<std::unique_ptr<RemoteWriter>> Connect(const RemoteRegion& region) = 0;
};

struct UcxOptions {
  // UCX_TLS-style transport list ("tcp", "shm,self", "rc,ud"...); empty = UCX's own choice.
  // Applied to this context only (not through the environment); UCX_* environment variables
  // still apply to everything not set here. UCX 1.13 cannot detect peer failure on its
  // shared-memory transports, so with a list of only those (posix, sysv, cma, self, shm...)
  // endpoints are created without error handling and a dead peer is not reported (puts into its
  // still-mapped memory succeed); any other list requires peer-failure detection, which makes UCX
  // pick a network transport even between processes of one host.
  std::string transports;
  // UCX_NET_DEVICES-style device list ("lo", "mlx5_0:1"...); empty = UCX's own choice.
  std::string net_devices;
  // Bound on one PutAll (issue + flush). A peer that has not completed by then is treated as
  // dead: PutAll answers UNAVAILABLE and the connection is dropped.
  absl::Duration put_timeout = absl::Seconds(30);
};

// UCX over whatever the host has. Starts a progress thread so that peers' puts land even when
// this process is not calling into UCX (TCP and shared-memory puts need target-side progress).
absl::StatusOr<std::unique_ptr<Transport>> CreateUcxTransport(const UcxOptions& options = {});

// Writes are memcpy within this process; Connect accepts only regions of the same instance.
std::unique_ptr<Transport> CreateInProcessTransport();

}  // namespace kvrecall::transport

#endif  // KVRECALL_TRANSPORT_TRANSPORT_H_
