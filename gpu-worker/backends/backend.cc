#include "gpu-worker/backends/backend.h"

#include <map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "gpu-worker/backends/cpu/cpu_backend.h"
#include "gpu-worker/backends/registry.h"

namespace kvrecall::worker {
namespace {

struct Registry {
  absl::Mutex mu;
  std::map<std::string, BackendFactory> factories ABSL_GUARDED_BY(mu);
};

// Constructed on first use, so registrations from other objects' static initialisers work in
// any order; never destroyed, so it outlives them too.
Registry& GetRegistry() {
  static Registry* const registry = [] {
    auto* r = new Registry();
    absl::MutexLock lock(&r->mu);
    r->factories.emplace("cpu", &CreateCpuBackend);
    return r;
  }();
  return *registry;
}

}  // namespace

bool RegisterBackend(const std::string& name, BackendFactory factory) {
  Registry& r = GetRegistry();
  absl::MutexLock lock(&r.mu);
  return r.factories.emplace(name, std::move(factory)).second;
}

std::vector<std::string> RegisteredBackends() {
  Registry& r = GetRegistry();
  absl::MutexLock lock(&r.mu);
  std::vector<std::string> names;
  for (const auto& [name, f] : r.factories) names.push_back(name);
  return names;
}

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateBackend(const std::string& name,
                                                            const std::string& model_dir,
                                                            int num_threads) {
  BackendFactory factory;
  {
    Registry& r = GetRegistry();
    absl::MutexLock lock(&r.mu);
    auto it = r.factories.find(name);
    if (it != r.factories.end()) factory = it->second;
  }
  if (!factory && name == "cuda") {
    // Registered by the cuda backend's own object library (kvrecall_worker_cuda_backend), which
    // only CUDA builds have and only the binaries that link it contain.
    return absl::FailedPreconditionError(
        "backend 'cuda' is not in this binary (it needs a CUDA build, KVRECALL_CUDA=ON, and a "
        "binary linked with kvrecall_worker_cuda_backend, as kvrecall-worker is); use "
        "--backend=cpu");
  }
  if (!factory) {
    return absl::NotFoundError(absl::StrCat("unknown backend '", name, "' (registered: ",
                                            absl::StrJoin(RegisteredBackends(), ", "), ")"));
  }
  return factory(model_dir, num_threads);
}

absl::Status CheckQkvArgs(const LlamaConfig& config, int layer, absl::Span<const int32_t> positions) {
  if (layer < 0 || layer >= config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  for (size_t i = 0; i < positions.size(); ++i) {
    if (positions[i] < 0) return absl::InvalidArgumentError(absl::StrCat("negative position at index ", i));
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::worker
