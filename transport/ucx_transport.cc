// UCX (UCP) implementation of Transport.
//
// Structure: one UcxCore per CreateUcxTransport call owns the ucp_context, a single ucp_worker, the
// endpoint cache and a progress thread. The Transport object, every region and every writer hold a
// shared_ptr to it, so the UCX objects live until the last of them is gone.
//
// Thread safety / Invariants:
//   * Every call into the worker (progress, arm, ep create/close, put, flush, rkey unpack/destroy)
//     and into the context (mem map/unmap, rkey pack) happens with UcxCore::mu_ held; the worker is
//     created UCS_THREAD_MODE_SERIALIZED. Why one mutex rather than UCS_THREAD_MODE_MULTI:
//     UCX 1.13's MULTI mode is itself one worker-wide lock taken inside every call, so it would not
//     let two PutAlls run in parallel either; we need a lock anyway for the endpoint cache and for
//     state that UCX callbacks write (they run inside ucp_worker_progress), and one absl::Mutex
//     gives us both, plus Await for sleeping waiters and thread-safety annotations. It also lets a
//     PutAll issue its whole batch and the flush without the lock changing hands per put.
//   * UCX callbacks (endpoint error handler, flush completion) only run inside worker calls, i.e.
//     with mu_ held, so they may touch mu_-guarded state.
//   * An Endpoint stays in the cache while its ucp_ep is open; it leaves the cache only when it is
//     closed (peer failure or put timeout), after which writers holding it answer UNAVAILABLE.
//   * Remote keys are destroyed before their endpoint's close completes (UCX requires it): each
//     Endpoint tracks the rkeys unpacked on it, and closing the endpoint destroys them.
//   * Direct writes: a shared-memory rkey maps the peer's region into this process
//     (ucp_rkey_ptr), and WriteDirect hands that mapping to the caller without taking mu_ (a
//     multi-MiB fill from many threads must not block progress). It holds the endpoint's
//     direct_mu in reader mode instead; destroying an rkey takes direct_mu in writer mode (after
//     mu_, never the other way round), so no mapping goes away under a writer.
//
// Progress: the progress thread sleeps in epoll on the worker's event fd (ucp_worker_get_efd +
// ucp_worker_arm) plus an eventfd used for shutdown, with a 10 ms cap as a safety net. It makes TCP
// puts from peers land in our regions without any PutAll running here. A PutAll waiting for its
// flush first spins on ucp_worker_progress itself for a few tens of microseconds (a loopback round
// trip), then sleeps on the mutex until the flush callback fires or the deadline passes.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "transport/internal/envelope.h"
#include "transport/internal/put_validation.h"
#include "transport/internal/ucx_status.h"
#include "transport/transport.h"

namespace kvrecall::transport {
namespace {

using internal::BlobKind;
using internal::UcsToStatus;

// A waiting PutAll spins this long before sleeping: about one TCP loopback round trip, so small
// batches complete without a thread handoff.
constexpr absl::Duration kSpinBeforeSleep = absl::Microseconds(50);
// The progress thread wakes at least this often even without an event (guards a missed wakeup).
constexpr int kProgressTickMs = 10;
// Bound on closing an endpoint or waiting for canceled requests; past it we leak rather than hang.
constexpr absl::Duration kCloseTimeout = absl::Seconds(2);
// Progress calls per lock hold in the progress thread, so a busy receiver cannot starve writers.
constexpr int kMaxProgressPerHold = 64;

class UcxCore;

// One connection to a peer worker, shared by all writers to that peer.
// All fields but `owner` and `key` (immutable) are guarded by the owner's mu_.
struct Endpoint : std::enable_shared_from_this<Endpoint> {
  UcxCore* owner = nullptr;
  std::string key;                // sealed peer address (cache key)
  ucp_ep_h ep = nullptr;          // null once closed
  absl::Status error;             // non-OK once the peer failed or timed out; never reset
  std::vector<ucp_rkey_h> rkeys;  // unpacked on `ep` and not yet destroyed
  // Direct writes (RemoteWriter::WriteDirect) into mappings of this endpoint's rkeys hold this in
  // reader mode; destroying an rkey (which unmaps it) takes it in writer mode, after mu_.
  absl::Mutex direct_mu;
  bool closed ABSL_GUARDED_BY(direct_mu) = false;  // its rkeys were destroyed by a close
};

// Completion of one flush or close request (ucp_*_nbx). Heap-allocated: if a request never
// completes (UCX bug or a hung close) we leak it rather than let a late callback write into a
// dead stack frame.
struct FlushState {
  bool done = false;  // guarded by UcxCore::mu_ (set inside progress)
  ucs_status_t status = UCS_OK;
};

void OnFlushDone(void* /*request*/, ucs_status_t status, void* user_data) {
  auto* state = static_cast<FlushState*>(user_data);
  state->status = status;
  state->done = true;
}

// Request parameters whose completion lands in *state.
ucp_request_param_t CompletionParam(FlushState* state) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = OnFlushDone;
  param.user_data = state;
  return param;
}

// Whether a UCX_TLS list names only same-host shared-memory transports (or aliases of them).
bool IsSharedMemoryOnly(absl::string_view transports) {
  // Empty means "all", and "^a,b" means "all but a and b": both include network transports.
  if (transports.empty() || transports[0] == '^') return false;
  for (absl::string_view tl : absl::StrSplit(transports, ',', absl::SkipWhitespace())) {
    tl = absl::StripAsciiWhitespace(tl);
    if (tl != "shm" && tl != "sm" && tl != "mm" && tl != "posix" && tl != "sysv" && tl != "xpmem" &&
        tl != "cma" && tl != "knem" && tl != "self") {
      return false;
    }
  }
  return true;
}

class UcxCore {
 public:
  static absl::StatusOr<std::shared_ptr<UcxCore>> Create(const UcxOptions& options);
  ~UcxCore();

  UcxCore(const UcxCore&) = delete;
  UcxCore& operator=(const UcxCore&) = delete;

  // Sealed worker address, for descriptors.
  const std::string& address() const { return address_; }

  // Registers [data, data + bytes) (allocate == false) or allocates `bytes` through UCX
  // (allocate == true; data ignored). On OK, *memh, *base, *packed_rkey are set.
  absl::Status Map(void* data, size_t bytes, bool allocate, ucp_mem_h* memh, uint8_t** base,
                   std::string* packed_rkey) ABSL_LOCKS_EXCLUDED(mu_);
  void Unmap(ucp_mem_h memh) ABSL_LOCKS_EXCLUDED(mu_);

  // Finds or creates the endpoint for `sealed_address` and unpacks `rkey` on it. *direct is
  // where [base, base + length) of the peer is mapped into this process (same-host shared
  // memory), or null.
  absl::Status Attach(const std::string& sealed_address, absl::string_view address,
                      absl::string_view rkey, uint64_t base, uint64_t length,
                      std::shared_ptr<Endpoint>* endpoint, ucp_rkey_h* rkey_handle,
                      uint8_t** direct) ABSL_LOCKS_EXCLUDED(mu_);
  // Undoes Attach's rkey unpack (a no-op when the endpoint was closed, which destroyed it).
  void Detach(Endpoint& endpoint, ucp_rkey_h rkey) ABSL_LOCKS_EXCLUDED(mu_);

  // Issues every op (puts or gets), flushes the endpoint and waits. REQUIRES: ops validated.
  template <typename Op>
  absl::Status Transfer(Endpoint& endpoint, ucp_rkey_h rkey, uint64_t base,
                        absl::Span<const Op> ops) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  UcxCore() = default;

  // Runs inside worker progress, i.e. with mu_ held by whichever thread progressed.
  static void OnEndpointError(void* arg, ucp_ep_h ep,
                              ucs_status_t status) ABSL_NO_THREAD_SAFETY_ANALYSIS;

  void ProgressLoop();
  // Closes endpoint.ep (if open), records `why` as its error if none yet, drops it from the cache.
  // `force`: discard outstanding operations (they complete with an error) instead of flushing.
  void CloseEndpointLocked(Endpoint& endpoint, absl::Status why, bool force)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseFailedEndpointsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Progresses the worker until *done or `deadline`. Returns *done.
  bool ProgressUntilLocked(const bool* done, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Progresses a close or flush request (made with CompletionParam(state)) for up to
  // kCloseTimeout and frees it. When it did not complete, leaks `state` to its late callback and
  // returns false. A null or error request has nothing pending: true.
  bool AwaitRequestLocked(ucs_status_ptr_t request, std::unique_ptr<FlushState> state)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Flushes every endpoint of the worker, including ones UCX opened for peers; bounded by
  // kCloseTimeout.
  void FlushWorkerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Duration put_timeout_;
  // UCX 1.13's shared-memory transports (posix, sysv, cma, self) cannot report peer failure, so
  // with UCP_ERR_HANDLING_MODE_PEER no lane is found ("no peer failure handler") and the peer is
  // unreachable. When the transport list has nothing else we create endpoints without error
  // handling: the memory is local, so puts cannot hang, but a dead peer is not reported (its
  // mapping stays valid). With any other transport in the list we require PEER mode; then UCX
  // uses that transport even between processes of one host.
  bool shm_only_ = false;
  std::string address_;
  ucp_context_h context_ = nullptr;  // handle immutable after Create; calls need mu_
  ucp_worker_h worker_ = nullptr;    // handle immutable after Create; calls need mu_
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread progress_thread_;

  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Endpoint>> endpoints_ ABSL_GUARDED_BY(mu_);
  bool have_failed_endpoints_ ABSL_GUARDED_BY(mu_) = false;
  // Endpoints whose close never completed; kept so that a late UCX callback finds live memory.
  std::vector<std::shared_ptr<Endpoint>> zombies_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::shared_ptr<UcxCore>> UcxCore::Create(const UcxOptions& options) {
  if (options.put_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("UcxOptions.put_timeout must be positive");
  }
  std::shared_ptr<UcxCore> core(new UcxCore());
  core->put_timeout_ = options.put_timeout;
  core->shm_only_ = IsSharedMemoryOnly(options.transports);

  ucp_config_t* config = nullptr;
  RETURN_IF_ERROR(UcsToStatus(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read"));
  absl::Status config_status;
  if (!options.transports.empty()) {
    config_status = UcsToStatus(ucp_config_modify(config, "TLS", options.transports.c_str()),
                                absl::StrCat("UCX TLS=", options.transports));
  }
  if (config_status.ok() && !options.net_devices.empty()) {
    config_status =
        UcsToStatus(ucp_config_modify(config, "NET_DEVICES", options.net_devices.c_str()),
                    absl::StrCat("UCX NET_DEVICES=", options.net_devices));
  }
  if (config_status.ok()) {
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 0;  // one worker, and every call is under mu_
    config_status = UcsToStatus(ucp_init(&params, config, &core->context_), "ucp_init");
  }
  ucp_config_release(config);
  if (!config_status.ok()) {
    // A bad TLS / device string is the caller's to fix, whatever UCX called it.
    return absl::InvalidArgumentError(config_status.message());
  }

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  RETURN_IF_ERROR(UcsToStatus(ucp_worker_create(core->context_, &worker_params, &core->worker_),
                              "ucp_worker_create"));

  ucp_address_t* address = nullptr;
  size_t address_length = 0;
  RETURN_IF_ERROR(UcsToStatus(ucp_worker_get_address(core->worker_, &address, &address_length),
                              "ucp_worker_get_address"));
  if (address_length == 0 || address_length > internal::kMaxEnvelopePayloadBytes) {
    ucp_worker_release_address(core->worker_, address);
    return absl::InternalError(absl::StrCat("UCX worker address of ", address_length, " bytes"));
  }
  core->address_ = internal::SealBlob(
      BlobKind::kWorkerAddress,
      absl::string_view(reinterpret_cast<const char*>(address), address_length), 0);
  ucp_worker_release_address(core->worker_, address);

  int worker_fd = -1;
  RETURN_IF_ERROR(UcsToStatus(ucp_worker_get_efd(core->worker_, &worker_fd), "ucp_worker_get_efd"));
  core->epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  core->wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (core->epoll_fd_ < 0 || core->wake_fd_ < 0) {
    return absl::InternalError(absl::StrCat("epoll/eventfd: ", std::strerror(errno)));
  }
  for (int fd : {worker_fd, core->wake_fd_}) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = fd;
    if (epoll_ctl(core->epoll_fd_, EPOLL_CTL_ADD, fd, &event) != 0) {
      return absl::InternalError(absl::StrCat("epoll_ctl: ", std::strerror(errno)));
    }
  }
  core->progress_thread_ = std::thread([raw = core.get()] { raw->ProgressLoop(); });
  return core;
}

UcxCore::~UcxCore() {
  if (progress_thread_.joinable()) {
    stop_.store(true, std::memory_order_release);
    const uint64_t one = 1;
    if (write(wake_fd_, &one, sizeof(one)) != sizeof(one)) {
      KV_LOG(WARNING) << "ucx transport: eventfd write failed; progress thread exits on its tick";
    }
    progress_thread_.join();
  }
  if (worker_ != nullptr) {
    absl::MutexLock lock(&mu_);
    // Copy: closing erases from endpoints_.
    std::vector<std::shared_ptr<Endpoint>> open;
    for (auto& [key, endpoint] : endpoints_) open.push_back(endpoint);
    for (auto& endpoint : open) {
      // Flush-close healthy peers so they see an orderly disconnect; force the failed ones.
      CloseEndpointLocked(*endpoint, absl::UnavailableError("transport destroyed"),
                          /*force=*/!endpoint->error.ok());
    }
    FlushWorkerLocked();
    ucp_worker_destroy(worker_);
  }
  if (context_ != nullptr) ucp_cleanup(context_);
  if (epoll_fd_ >= 0) close(epoll_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void UcxCore::ProgressLoop() {
  bool warned = false;
  epoll_event events[4];
  while (!stop_.load(std::memory_order_acquire)) {
    ucs_status_t armed;
    {
      absl::MutexLock lock(&mu_);
      for (int i = 0; i < kMaxProgressPerHold && ucp_worker_progress(worker_) != 0; ++i) {
      }
      if (have_failed_endpoints_) CloseFailedEndpointsLocked();
      armed = ucp_worker_arm(worker_);
    }
    if (armed == UCS_ERR_BUSY) continue;  // events arrived since the last progress
    if (armed != UCS_OK && !warned) {
      warned = true;
      KV_LOG(WARNING) << "ucx transport: ucp_worker_arm: " << ucs_status_string(armed)
                      << "; falling back to " << kProgressTickMs << " ms polling";
    }
    const int n = epoll_wait(epoll_fd_, events, 4, kProgressTickMs);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == wake_fd_) {
        uint64_t value;
        if (read(wake_fd_, &value, sizeof(value)) < 0) {
          // EAGAIN: already drained; nothing to do.
        }
      }
    }
  }
}

void UcxCore::OnEndpointError(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
  // Runs inside ucp_worker_progress, i.e. with mu_ held by the progressing thread. UCX does not
  // allow closing the endpoint from here; the progress thread (or the next user) closes it.
  auto* endpoint = static_cast<Endpoint*>(arg);
  endpoint->owner->have_failed_endpoints_ = true;
  if (endpoint->error.ok()) {
    endpoint->error = absl::UnavailableError(
        absl::StrCat("UCX peer failed: ", UcsToStatus(status, "endpoint").message()));
  }
}

void UcxCore::CloseFailedEndpointsLocked() {
  have_failed_endpoints_ = false;
  std::vector<std::shared_ptr<Endpoint>> failed;
  for (auto& [key, endpoint] : endpoints_) {
    if (!endpoint->error.ok()) failed.push_back(endpoint);
  }
  for (auto& endpoint : failed) CloseEndpointLocked(*endpoint, endpoint->error, /*force=*/true);
}

bool UcxCore::ProgressUntilLocked(const bool* done, absl::Time deadline) {
  while (!*done && absl::Now() < deadline) ucp_worker_progress(worker_);
  return *done;
}

void UcxCore::FlushWorkerLocked() {
  // Endpoints UCX created on its own to answer peers' wireup (not in endpoints_) may still hold a
  // pending reply. UCX 1.13 asserts when worker destruction purges such a reply
  // (ucp_request_send_state_ff, "got REP message"; removed upstream in openucx/ucx#8175), so let
  // the worker drain first. A dead peer cannot block this past kCloseTimeout.
  auto state = std::make_unique<FlushState>();
  const ucp_request_param_t param = CompletionParam(state.get());
  ucs_status_ptr_t request = ucp_worker_flush_nbx(worker_, &param);
  // Worker destruction may still complete an unfinished request into its state.
  if (!AwaitRequestLocked(request, std::move(state))) {
    KV_LOG(WARNING) << "ucx transport: worker flush did not complete in "
                    << absl::FormatDuration(kCloseTimeout) << "; destroying anyway";
  }
}

bool UcxCore::AwaitRequestLocked(ucs_status_ptr_t request, std::unique_ptr<FlushState> state) {
  if (request == nullptr || UCS_PTR_IS_ERR(request)) return true;
  if (!ProgressUntilLocked(&state->done, absl::Now() + kCloseTimeout)) {
    (void)state.release();  // a late callback may still write it
    return false;
  }
  ucp_request_free(request);
  return true;
}

void UcxCore::CloseEndpointLocked(Endpoint& endpoint, absl::Status why, bool force) {
  if (endpoint.error.ok()) endpoint.error = std::move(why);
  auto it = endpoints_.find(endpoint.key);
  // Keep a reference while closing: the cache entry may be the last one.
  std::shared_ptr<Endpoint> keep;
  if (it != endpoints_.end() && it->second.get() == &endpoint) {
    keep = std::move(it->second);
    endpoints_.erase(it);
  }
  if (endpoint.ep == nullptr) return;

  auto state = std::make_unique<FlushState>();
  ucp_request_param_t param = CompletionParam(state.get());
  param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t request = ucp_ep_close_nbx(endpoint.ep, &param);
  endpoint.ep = nullptr;
  // After a forced close has discarded outstanding operations, but before the close completes:
  // UCX requires rkeys to go before their endpoint.
  {
    absl::MutexLock direct(&endpoint.direct_mu);  // waits out direct writes into the mappings
    for (ucp_rkey_h rkey : endpoint.rkeys) ucp_rkey_destroy(rkey);
    endpoint.rkeys.clear();
    endpoint.closed = true;
  }
  if (!AwaitRequestLocked(request, std::move(state))) {
    if (!force) {
      // A flush-close can wait on a dead peer; we cannot force an already-closing endpoint, so
      // leave the request to UCX (worker destruction reclaims it) and leak the small state.
      KV_LOG(WARNING) << "ucx transport: endpoint close did not complete in "
                      << absl::FormatDuration(kCloseTimeout);
    } else {
      KV_LOG(ERROR) << "ucx transport: forced endpoint close did not complete";
    }
    // A late callback (error handler) may still write the endpoint too: keep it.
    zombies_.push_back(endpoint.shared_from_this());
  }
}

absl::Status UcxCore::Map(void* data, size_t bytes, bool allocate, ucp_mem_h* memh, uint8_t** base,
                          std::string* packed_rkey) {
  if (bytes == 0) return absl::InvalidArgumentError("region of 0 bytes");
  if (!allocate && data == nullptr) return absl::InvalidArgumentError("null region");
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  params.address = allocate ? nullptr : data;
  params.length = bytes;
  // Allocated regions come from UCX so that it can place them in shared memory (sysv/posix),
  // which same-host peers then write with plain stores instead of a syscall per put (cma).
  params.flags = allocate ? UCP_MEM_MAP_ALLOCATE : 0;

  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(UcsToStatus(ucp_mem_map(context_, &params, memh), "ucp_mem_map"));
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  absl::Status status = UcsToStatus(ucp_mem_query(*memh, &attr), "ucp_mem_query");
  if (status.ok() && attr.length < bytes) {
    status = absl::InternalError(absl::StrCat("ucp_mem_map gave ", attr.length, " < ", bytes));
  }
  const long page = sysconf(_SC_PAGESIZE);
  if (status.ok() && allocate && reinterpret_cast<uintptr_t>(attr.address) % page != 0) {
    status = absl::InternalError("UCX allocation is not page-aligned");
  }
  void* rkey_buffer = nullptr;
  size_t rkey_size = 0;
  if (status.ok()) {
    status = UcsToStatus(ucp_rkey_pack(context_, *memh, &rkey_buffer, &rkey_size), "ucp_rkey_pack");
  }
  if (status.ok() && (rkey_size == 0 || rkey_size > internal::kMaxEnvelopePayloadBytes)) {
    ucp_rkey_buffer_release(rkey_buffer);
    status = absl::InternalError(absl::StrCat("packed rkey of ", rkey_size, " bytes"));
  }
  if (!status.ok()) {
    ucp_mem_unmap(context_, *memh);
    return status;
  }
  *base = static_cast<uint8_t*>(attr.address);
  *packed_rkey = internal::SealBlob(
      BlobKind::kRkey, absl::string_view(static_cast<const char*>(rkey_buffer), rkey_size),
      internal::RegionBinding(reinterpret_cast<uintptr_t>(*base), bytes));
  ucp_rkey_buffer_release(rkey_buffer);
  return absl::OkStatus();
}

void UcxCore::Unmap(ucp_mem_h memh) {
  absl::MutexLock lock(&mu_);
  const ucs_status_t status = ucp_mem_unmap(context_, memh);
  if (status != UCS_OK) {
    KV_LOG(WARNING) << "ucx transport: ucp_mem_unmap: " << ucs_status_string(status);
  }
}

absl::Status UcxCore::Attach(const std::string& sealed_address, absl::string_view address,
                             absl::string_view rkey, uint64_t base, uint64_t length,
                             std::shared_ptr<Endpoint>* endpoint, ucp_rkey_h* rkey_handle,
                             uint8_t** direct) {
  absl::MutexLock lock(&mu_);
  std::shared_ptr<Endpoint>& slot = endpoints_[sealed_address];
  if (slot != nullptr && !slot->error.ok()) {
    std::shared_ptr<Endpoint> failed = slot;
    CloseEndpointLocked(*failed, failed->error, /*force=*/true);  // erases the slot
  }
  std::shared_ptr<Endpoint>& entry = endpoints_[sealed_address];
  if (entry == nullptr) {
    auto fresh = std::make_shared<Endpoint>();
    fresh->owner = this;
    fresh->key = sealed_address;
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.address = reinterpret_cast<const ucp_address_t*>(address.data());
    params.err_mode = shm_only_ ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = OnEndpointError;
    params.err_handler.arg = fresh.get();
    const absl::Status status =
        UcsToStatus(ucp_ep_create(worker_, &params, &fresh->ep), "ucp_ep_create");
    if (!status.ok()) {
      endpoints_.erase(sealed_address);
      // The address was well-formed (sealed); failing to use it means no common transport or
      // an unreachable peer.
      return absl::UnavailableError(status.message());
    }
    entry = std::move(fresh);
  }
  const absl::Status status =
      UcsToStatus(ucp_ep_rkey_unpack(entry->ep, rkey.data(), rkey_handle), "ucp_ep_rkey_unpack");
  if (!status.ok()) {
    return status.code() == absl::StatusCode::kUnavailable
               ? status
               : absl::InvalidArgumentError(status.message());
  }
  entry->rkeys.push_back(*rkey_handle);
  *endpoint = entry;
  // Shared-memory transports map the peer's segment here; network ones answer UNREACHABLE. Only a
  // mapping of the whole region, in one piece, is used.
  void* first = nullptr;
  void* last = nullptr;
  *direct = nullptr;
  if (ucp_rkey_ptr(*rkey_handle, base, &first) == UCS_OK &&
      ucp_rkey_ptr(*rkey_handle, base + length - 1, &last) == UCS_OK &&
      static_cast<uint8_t*>(last) - static_cast<uint8_t*>(first) == static_cast<ptrdiff_t>(length - 1)) {
    *direct = static_cast<uint8_t*>(first);
  }
  return absl::OkStatus();
}

void UcxCore::Detach(Endpoint& endpoint, ucp_rkey_h rkey) {
  absl::MutexLock lock(&mu_);
  auto it = std::find(endpoint.rkeys.begin(), endpoint.rkeys.end(), rkey);
  if (it == endpoint.rkeys.end()) return;  // destroyed when the endpoint was closed
  endpoint.rkeys.erase(it);
  absl::MutexLock direct(&endpoint.direct_mu);
  ucp_rkey_destroy(rkey);
}

template <typename Op>
absl::Status UcxCore::Transfer(Endpoint& endpoint, ucp_rkey_h rkey, uint64_t base,
                               absl::Span<const Op> ops) {
  constexpr bool kGet = std::is_same_v<Op, GetOp>;
  const absl::Time deadline = absl::Now() + put_timeout_;
  auto flush = std::make_unique<FlushState>();

  absl::MutexLock lock(&mu_);
  if (endpoint.ep == nullptr || !endpoint.error.ok()) {
    if (endpoint.ep != nullptr) CloseEndpointLocked(endpoint, endpoint.error, /*force=*/true);
    return endpoint.error;
  }

  // Individual operations carry no callback: the flush below covers their completion (and
  // reports an error if any of them failed), so each returned request is released at once.
  ucp_request_param_t op_param{};
  op_param.op_attr_mask = UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  op_param.memory_type = UCS_MEMORY_TYPE_HOST;
  absl::Status issue_status;
  for (const Op& op : ops) {
    if (op.length == 0) continue;
    ucs_status_ptr_t request;
    if constexpr (kGet) {
      request =
          ucp_get_nbx(endpoint.ep, op.dst, op.length, base + op.remote_offset, rkey, &op_param);
    } else {
      request =
          ucp_put_nbx(endpoint.ep, op.src, op.length, base + op.remote_offset, rkey, &op_param);
    }
    if (UCS_PTR_IS_ERR(request)) {
      issue_status = UcsToStatus(UCS_PTR_STATUS(request), kGet ? "ucp_get_nbx" : "ucp_put_nbx");
      break;  // still flush: operations already issued may be using caller buffers
    }
    if (request != nullptr) ucp_request_free(request);
  }

  const ucp_request_param_t flush_param = CompletionParam(flush.get());
  ucs_status_ptr_t request = ucp_ep_flush_nbx(endpoint.ep, &flush_param);
  if (request == nullptr) {
    flush->done = true;
  } else if (UCS_PTR_IS_ERR(request)) {
    flush->done = true;
    flush->status = UCS_PTR_STATUS(request);
    request = nullptr;
  } else {
    ProgressUntilLocked(&flush->done, std::min(deadline, absl::Now() + kSpinBeforeSleep));
    if (!flush->done) mu_.AwaitWithDeadline(absl::Condition(&flush->done), deadline);
    if (!flush->done) {
      // The peer is alive enough not to reset the connection but not completing: treat it as
      // dead. A forced close completes our flush (and other writers' operations) with an error.
      CloseEndpointLocked(
          endpoint,
          absl::UnavailableError(absl::StrCat("UCX peer did not complete ", kGet ? "gets" : "puts",
                                              " within ", absl::FormatDuration(put_timeout_))),
          /*force=*/true);
      if (!ProgressUntilLocked(&flush->done, absl::Now() + kCloseTimeout)) {
        KV_LOG(ERROR) << "ucx transport: flush request never completed after forced close";
        (void)flush.release();  // a late callback may still write it
        return endpoint.error;
      }
    }
    ucp_request_free(request);
  }

  absl::Status status = issue_status;
  if (status.ok() && flush->status != UCS_OK) status = UcsToStatus(flush->status, "flush");
  if (status.ok()) return status;
  // Any failure of issued operations means the connection is unusable; answer UNAVAILABLE.
  CloseEndpointLocked(endpoint, absl::UnavailableError(status.message()), /*force=*/true);
  return endpoint.error;
}

class UcxRegion final : public RegisteredRegion {
 public:
  UcxRegion(std::shared_ptr<UcxCore> core, ucp_mem_h memh, uint8_t* data, size_t size,
            std::string rkey)
      : core_(std::move(core)), memh_(memh), data_(data), size_(size) {
    descriptor_.peer_address = core_->address();
    descriptor_.base = reinterpret_cast<uintptr_t>(data);
    descriptor_.length = size;
    descriptor_.rkey = std::move(rkey);
  }
  ~UcxRegion() override { core_->Unmap(memh_); }

  uint8_t* data() override { return data_; }
  size_t size() const override { return size_; }
  RemoteRegion Describe() const override { return descriptor_; }

 private:
  const std::shared_ptr<UcxCore> core_;
  const ucp_mem_h memh_;
  uint8_t* const data_;
  const size_t size_;
  RemoteRegion descriptor_;
};

class UcxWriter final : public RemoteWriter {
 public:
  UcxWriter(std::shared_ptr<UcxCore> core, std::shared_ptr<Endpoint> endpoint, ucp_rkey_h rkey,
            uint8_t* direct, RemoteRegion region)
      : core_(std::move(core)),
        endpoint_(std::move(endpoint)),
        rkey_(rkey),
        direct_(direct),
        region_(std::move(region)) {}
  ~UcxWriter() override { core_->Detach(*endpoint_, rkey_); }

  absl::Status PutAll(absl::Span<const PutOp> ops) override {
    RETURN_IF_ERROR(internal::ValidatePutOps(ops, region_.length));
    if (ops.empty()) return absl::OkStatus();
    return core_->Transfer(*endpoint_, rkey_, region_.base, ops);
  }
  absl::Status GetAll(absl::Span<const GetOp> ops) override {
    RETURN_IF_ERROR(internal::ValidateGetOps(ops, region_.length));
    if (ops.empty()) return absl::OkStatus();
    // Mapped here: a copy, through the same access as a direct write (without the worker's lock).
    ASSIGN_OR_RETURN(const bool mapped, WriteDirect([&](uint8_t* base) {
                       for (const GetOp& op : ops) {
                         if (op.length != 0)
                           std::memcpy(op.dst, base + op.remote_offset, op.length);
                       }
                       return absl::OkStatus();
                     }));
    if (mapped) return absl::OkStatus();
    return core_->Transfer(*endpoint_, rkey_, region_.base, ops);
  }
  absl::StatusOr<bool> WriteDirect(absl::FunctionRef<absl::Status(uint8_t* base)> write) override {
    if (direct_ == nullptr) return false;
    absl::ReaderMutexLock lock(&endpoint_->direct_mu);
    if (endpoint_->closed) return absl::UnavailableError("the connection to the region's owner was closed");
    RETURN_IF_ERROR(write(direct_));
    return true;
  }
  const RemoteRegion& region() const override { return region_; }

 private:
  const std::shared_ptr<UcxCore> core_;  // declared first: outlives endpoint_
  const std::shared_ptr<Endpoint> endpoint_;
  const ucp_rkey_h rkey_;
  uint8_t* const direct_;  // the region mapped here, or null
  const RemoteRegion region_;
};

class UcxTransport final : public Transport {
 public:
  explicit UcxTransport(std::shared_ptr<UcxCore> core) : core_(std::move(core)) {}

  absl::string_view name() const override { return "ucx"; }

  absl::StatusOr<std::unique_ptr<RegisteredRegion>> AllocateRegion(size_t bytes) override {
    ucp_mem_h memh;
    uint8_t* base;
    std::string rkey;
    RETURN_IF_ERROR(core_->Map(nullptr, bytes, /*allocate=*/true, &memh, &base, &rkey));
    std::memset(base, 0, bytes);  // UCX's heap fallback is not zeroed
    return std::unique_ptr<RegisteredRegion>(
        new UcxRegion(core_, memh, base, bytes, std::move(rkey)));
  }

  absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* data,
                                                                   size_t bytes) override {
    ucp_mem_h memh;
    uint8_t* base;
    std::string rkey;
    RETURN_IF_ERROR(core_->Map(data, bytes, /*allocate=*/false, &memh, &base, &rkey));
    return std::unique_ptr<RegisteredRegion>(
        new UcxRegion(core_, memh, base, bytes, std::move(rkey)));
  }

  absl::StatusOr<std::unique_ptr<RemoteWriter>> Connect(const RemoteRegion& region) override {
    if (region.length == 0) return absl::InvalidArgumentError("remote region of 0 bytes");
    if (region.base == 0 || region.base + region.length < region.base) {
      return absl::InvalidArgumentError("remote region address range is invalid");
    }
    ASSIGN_OR_RETURN(absl::string_view address,
                     internal::OpenBlob(BlobKind::kWorkerAddress, region.peer_address, 0));
    ASSIGN_OR_RETURN(absl::string_view rkey,
                     internal::OpenBlob(BlobKind::kRkey, region.rkey,
                                        internal::RegionBinding(region.base, region.length)));
    std::shared_ptr<Endpoint> endpoint;
    ucp_rkey_h rkey_handle = nullptr;
    uint8_t* direct = nullptr;
    RETURN_IF_ERROR(core_->Attach(region.peer_address, address, rkey, region.base, region.length, &endpoint,
                                  &rkey_handle, &direct));
    return std::unique_ptr<RemoteWriter>(
        new UcxWriter(core_, std::move(endpoint), rkey_handle, direct, region));
  }

 private:
  const std::shared_ptr<UcxCore> core_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Transport>> CreateUcxTransport(const UcxOptions& options) {
  ASSIGN_OR_RETURN(std::shared_ptr<UcxCore> core, UcxCore::Create(options));
  return std::unique_ptr<Transport>(new UcxTransport(std::move(core)));
}

}  // namespace kvrecall::transport
