#include "gpu-worker/engine/tp_engine.h"

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/cuda_status.h"

namespace kvrecall::worker {
namespace {

// The error of rank `first` (the first to fail; -1: none), naming the rank.
absl::Status Failure(const std::vector<absl::Status>& statuses, int first) {
  if (first < 0) return absl::OkStatus();
  const absl::Status& s = statuses[first];
  if (statuses.size() == 1) return s;
  return absl::Status(s.code(), absl::StrCat("tensor-parallel rank ", first, ": ", s.message()));
}

}  // namespace

// Rank r's view of whichever NCCL group the model holds now (a failure replaces the group).
class TensorParallelModel::RankCollective final : public cuda::Collective {
 public:
  RankCollective(TensorParallelModel* model, int rank) : model_(model), rank_(rank) {}
  absl::Status AllReduceSum(float* data, size_t count, cudaStream_t stream) override {
    if (model_->group_ == nullptr) {
      return absl::UnavailableError("the tensor-parallel group could not be made again");
    }
    return model_->group_->rank(rank_)->AllReduceSum(data, count, stream);
  }

 private:
  TensorParallelModel* const model_;
  const int rank_;
};

TensorParallelModel::TensorParallelModel(LlamaConfig config, TensorParallelOptions tp, int devices)
    : config_(std::move(config)), tp_(std::move(tp)), shards_(tp_.world) {
  for (int r = 0; r < tp_.world; ++r) {
    devices_.push_back(r % devices);
    collectives_.push_back(std::make_unique<RankCollective>(this, r));
  }
}

absl::StatusOr<std::unique_ptr<cuda::CollectiveGroup>> TensorParallelModel::MakeGroup() const {
  return tp_.collective == "nccl" ? cuda::CreateNcclGroup(tp_.world)
                                  : cuda::CreateHostGroup(tp_.world);
}

TensorParallelModel::~TensorParallelModel() {
  (void)ForEachRank([&](int r) {
    shards_[r].reset();
    return absl::OkStatus();
  });
}

absl::StatusOr<std::unique_ptr<TensorParallelModel>> TensorParallelModel::Make(
    const LlamaConfig& config, const TensorParallelOptions& tp,
    absl::FunctionRef<absl::StatusOr<std::unique_ptr<cuda::CudaModel>>(const cuda::TensorParallel&)>
        load) {
  const int world = tp.world;
  RETURN_IF_ERROR(ShardConfig(config, world).status());
  if (tp.collective != "nccl" && tp.collective != "host") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown collective '", tp.collective, "' (nccl, host)"));
  }
  RETURN_IF_ERROR(cuda::CheckCudaDevice("tensor parallelism"));
  int devices = 0;
  RETURN_IF_ERROR(cuda::CudaStatus(cudaGetDeviceCount(&devices), "cudaGetDeviceCount"));
  std::unique_ptr<TensorParallelModel> m(new TensorParallelModel(config, tp, devices));
  if (world > 1) {
    ASSIGN_OR_RETURN(m->group_, m->MakeGroup());
  }
  RETURN_IF_ERROR(m->ForEachRank([&](int r) -> absl::Status {
    const cuda::TensorParallel shard{r, world, world > 1 ? m->collectives_[r].get() : nullptr};
    ASSIGN_OR_RETURN(m->shards_[r], load(shard));
    return absl::OkStatus();
  }));
  return m;
}

absl::StatusOr<std::unique_ptr<TensorParallelModel>> TensorParallelModel::Load(
    const LlamaConfig& config, const SafetensorsCheckpoint& ckpt, const TensorParallelOptions& tp,
    int max_rows) {
  return Make(config, tp, [&](const cuda::TensorParallel& shard) {
    return cuda::CudaModel::Load(config, ckpt, max_rows, shard);
  });
}

absl::StatusOr<std::unique_ptr<TensorParallelModel>> TensorParallelModel::Random(
    const LlamaConfig& config, uint64_t seed, const TensorParallelOptions& tp, int max_rows) {
  return Make(config, tp, [&](const cuda::TensorParallel& shard) {
    return cuda::CudaModel::Random(config, seed, max_rows, shard);
  });
}

int TensorParallelModel::RunRanks(absl::FunctionRef<absl::Status(int rank)> fn,
                                  bool abort_on_failure, std::vector<absl::Status>* out) {
  const int world = static_cast<int>(shards_.size());
  out->assign(world, absl::OkStatus());
  int first_failure = -1;
  auto run = [&](int r) {
    const cuda::ScopedDevice device(devices_[r]);
    return device.status().ok() ? fn(r) : device.status();
  };
  if (world == 1) {
    (*out)[0] = run(0);
    return (*out)[0].ok() ? -1 : 0;
  }
  absl::Mutex mu;
  int running = world;
  std::vector<std::thread> threads;
  threads.reserve(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      absl::Status s = run(r);
      absl::MutexLock lock(&mu);
      --running;
      if (!s.ok() && first_failure < 0) first_failure = r;
      // The others may be waiting on the GPU for this rank's next collective.
      if (!s.ok() && abort_on_failure && running > 0 && group_ != nullptr) {
        KV_LOG(WARNING) << "tensor-parallel rank " << r << " failed while " << running
                        << " other ranks ran (" << s.ToString() << "); aborting the group";
        group_->Abort();
      }
      (*out)[r] = std::move(s);
    });
  }
  for (std::thread& t : threads) t.join();
  return first_failure;
}

absl::Status TensorParallelModel::OnEveryRank(absl::FunctionRef<absl::Status(int rank)> fn,
                                              std::vector<absl::Status>* statuses) {
  if (world() > 1 && (group_ == nullptr || group_->aborted())) {
    group_.reset();
    absl::StatusOr<std::unique_ptr<cuda::CollectiveGroup>> group = MakeGroup();
    if (!group.ok()) {
      return absl::UnavailableError(absl::StrCat(
          "the tensor-parallel group could not be made again: ", group.status().message()));
    }
    group_ = *std::move(group);
  }
  std::vector<absl::Status> own;
  std::vector<absl::Status>* out = statuses != nullptr ? statuses : &own;
  const int first = RunRanks(fn, /*abort_on_failure=*/true, out);
  return Failure(*out, first);
}

absl::Status TensorParallelModel::ForEachRank(absl::FunctionRef<absl::Status(int rank)> fn) {
  std::vector<absl::Status> statuses;
  const int first = RunRanks(fn, /*abort_on_failure=*/false, &statuses);
  return Failure(statuses, first);
}

absl::StatusOr<std::unique_ptr<TensorParallelEngine>> TensorParallelEngine::Create(
    TensorParallelModel* model, absl::Span<client::Tier* const> tiers, const ModelSpec& spec,
    const EngineOptions& options, const CudaEngineLimits& limits,
    const cuda::PinnedHostRanges* pinned) {
  const int world = model->world();
  if (static_cast<int>(tiers.size()) != world) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallelism over ", world, " GPUs needs one tier per rank, got ", tiers.size()));
  }
  if (spec.num_kv_heads % world != 0 || spec.num_q_heads % world != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model spec '", spec.model_id, "': heads not a multiple of ", world));
  }
  std::unique_ptr<TensorParallelEngine> e(new TensorParallelEngine(model, world));
  RETURN_IF_ERROR(model->ForEachRank([&](int r) -> absl::Status {
    ModelSpec s = spec;
    s.model_id = ShardName(spec.model_id, r, world);
    s.num_q_heads /= world;
    s.num_kv_heads /= world;
    if (options.sparse && tiers[r] != nullptr) RETURN_IF_ERROR(tiers[r]->RegisterModel(s));
    ASSIGN_OR_RETURN(e->engines_[r], CudaEngine::Create(model->shard(r), tiers[r], std::move(s),
                                                        options, limits, pinned));
    return absl::OkStatus();
  }));
  return e;
}

TensorParallelEngine::~TensorParallelEngine() {
  (void)model_->ForEachRank([&](int r) {
    engines_[r].reset();
    return absl::OkStatus();
  });
}

std::vector<std::string> TensorParallelEngine::RankIds(absl::Span<const std::string> ids,
                                                       int r) const {
  std::vector<std::string> out;
  out.reserve(ids.size());
  for (const std::string& id : ids) out.push_back(ShardName(id, r, world()));
  return out;
}

absl::Status TensorParallelEngine::PrefillSequence(const std::string& id,
                                                   absl::Span<const int32_t> tokens,
                                                   const CudaPrefillOptions& options,
                                                   std::vector<float>* last_logits) {
  if (!diverged_.ok()) return diverged_;
  RETURN_IF_ERROR(engines_[0]->CheckPrefill(ShardName(id, 0, world()), tokens, options));
  const absl::Status s = model_->OnEveryRank([&](int r) {
    return engines_[r]->PrefillSequence(ShardName(id, r, world()), tokens, options,
                                        r == 0 ? last_logits : nullptr);
  });
  if (!s.ok()) {  // no rank keeps the sequence
    (void)model_->ForEachRank([&](int r) {
      const std::string rid = ShardName(id, r, world());
      return engines_[r]->Contains(rid) ? engines_[r]->RemoveSequence(rid) : absl::OkStatus();
    });
  }
  return s;
}

absl::Status TensorParallelEngine::Step(absl::Span<const std::string> ids,
                                        absl::Span<const int32_t> tokens,
                                        std::vector<int32_t>* next, std::vector<float>* logits) {
  if (!diverged_.ok()) return diverged_;
  std::vector<std::vector<std::string>> rank_ids(world());
  for (int r = 0; r < world(); ++r) rank_ids[r] = RankIds(ids, r);
  RETURN_IF_ERROR(engines_[0]->CheckStep(rank_ids[0], tokens));
  std::vector<std::vector<int32_t>> rank_next(world());
  std::vector<absl::Status> statuses;
  const absl::Status s = model_->OnEveryRank(
      [&](int r) {
        return engines_[r]->Step(rank_ids[r], tokens, r == 0 ? next : &rank_next[r],
                                 r == 0 ? logits : nullptr);
      },
      &statuses);
  int failed = 0;
  for (const absl::Status& st : statuses) failed += !st.ok();
  if (failed > 0 && failed < world()) {
    diverged_ = absl::FailedPreconditionError(absl::StrCat(
        "a step failed on ", failed, " of ", world(), " tensor-parallel ranks, which now hold ",
        "different positions; remove every sequence to go on (", s.message(), ")"));
  }
  if (!s.ok()) return s;
  // Every rank computed the same logits from the same replicated x.
  for (int r = 1; r < world(); ++r) {
    if (rank_next[r] != *next) {
      diverged_ = absl::InternalError(
          absl::StrCat("tensor-parallel rank ", r, " sampled other tokens than rank 0"));
      return diverged_;
    }
  }
  return absl::OkStatus();
}

absl::Status TensorParallelEngine::RemoveSequence(const std::string& id) {
  if (!engines_[0]->Contains(ShardName(id, 0, world()))) {
    return absl::NotFoundError(absl::StrCat("no sequence '", id, "'"));
  }
  const absl::Status s = model_->ForEachRank(
      [&](int r) { return engines_[r]->RemoveSequence(ShardName(id, r, world())); });
  if (batch() == 0) diverged_ = absl::OkStatus();
  return s;
}

}  // namespace kvrecall::worker
