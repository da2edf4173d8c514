// Fault injection for tests and drills: a Transport decorator whose writers wait before every
// PutAll, as a node behind a congested or failing link would. kvrecall-server exposes it as
// --fault-put-delay-ms; the multi-process tests use it to make a node miss a worker's deadline.
#ifndef KVRECALL_TRANSPORT_FAULT_INJECTION_H_
#define KVRECALL_TRANSPORT_FAULT_INJECTION_H_

#include <memory>

#include "absl/time/time.h"
#include "transport/transport.h"

namespace kvrecall::transport {

// Wraps `inner`: regions and names pass through; every RemoteWriter::PutAll sleeps `put_delay`
// first, then forwards (GetAll forwards at once; WriteDirect is not offered, so that every write
// takes the delayed path). REQUIRES: put_delay >= 0.
std::unique_ptr<Transport> WithPutDelay(std::unique_ptr<Transport> inner, absl::Duration put_delay);

}  // namespace kvrecall::transport

#endif  // KVRECALL_TRANSPORT_FAULT_INJECTION_H_
