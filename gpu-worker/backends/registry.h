// Backend registration: how a backend makes itself reachable through CreateBackend(name, ...).
//
// "cpu" is built into kvrecall_worker_backends and registered by the registry itself on first use
// (an explicit call, so a static-library link can never drop it). Another build target (e.g. the
// CUDA backend) registers itself with KVRECALL_REGISTER_BACKEND in one of its .cc files; because a
// linker drops unreferenced objects of a static archive, such a target must be an OBJECT library
// (or be linked whole-archive) so that its registrar object reaches the binary. Shared code never
// names the backends it does not build.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_REGISTRY_H_
#define KVRECALL_GPU_WORKER_BACKENDS_REGISTRY_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu-worker/backends/backend.h"

namespace kvrecall::worker {

// Loads a model directory into a new backend; `num_threads` as in CreateBackend.
using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<ModelBackend>>(
    const std::string& model_dir, int num_threads)>;

// Makes `factory` reachable as `name`. Returns false (keeping the earlier one) when `name` is
// already registered. Thread-safe; may run during static initialisation.
bool RegisterBackend(const std::string& name, BackendFactory factory);

// The registered names, sorted.
std::vector<std::string> RegisteredBackends();

}  // namespace kvrecall::worker

// At namespace scope in a .cc file of an OBJECT library:
//   KVRECALL_REGISTER_BACKEND(cuda, "cuda", &CreateCudaBackend);
#define KVRECALL_REGISTER_BACKEND(id, name, factory)                    \
  [[maybe_unused]] static const bool kvrecall_backend_registered_##id = \
      ::kvrecall::worker::RegisterBackend(name, factory)

#endif  // KVRECALL_GPU_WORKER_BACKENDS_REGISTRY_H_
