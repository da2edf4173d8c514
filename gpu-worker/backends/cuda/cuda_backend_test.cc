// The cuda backend against the cpu backend (fp32) on random-weight models of the make-model
// presets "tiny" (Llama-3, untied) and "tiny-qwen2" (q/k/v bias, tied embeddings), call by call.
// GPU tests skip (GTEST_SKIP, reported as skipped) where no CUDA device is found; the
// registration and no-device tests run everywhere.
//
// Tolerances (bf16 unit roundoff u = 2^-8; the cuda backend rounds the normed activations,
// q/k/v, gate/up, the SwiGLU product and the attention input to bf16, the cpu backend nothing):
//   embeddings: exact (a bf16 table either way);
//   q/k/v, the FinishLayer update (x' - x) and logits: relative L2 error <= 1e-2 and every element
//   within 4u * |ref| + 0.05 * rms(ref). Measured on the H100: see NOTES.md.
#include "gpu-worker/backends/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gpu-worker/backends/attention.h"
#include "gpu-worker/backends/backend.h"
#include "gpu-worker/backends/registry.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/make_model.h"
#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;

bool HasGpu() {
  static const bool has = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return has;
}

#define SKIP_WITHOUT_GPU() \
  if (!HasGpu()) GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount failed or found none)"

// Each test process writes its own directory (ctest may run the tests in parallel).
std::string WriteModel(const std::string& preset, LlamaConfig* config_out = nullptr) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string test = absl::StrCat(info->test_suite_name(), "_", info->name());
  std::replace(test.begin(), test.end(), '/', '_');
  const std::string dir =
      absl::StrCat(::testing::TempDir(), "/cuda_backend_test_", test, "_", preset);
  absl::StatusOr<LlamaConfig> config = PresetConfig(preset);
  EXPECT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(WriteRandomModel(dir, *config, 7).ok());
  if (config_out != nullptr) *config_out = *config;
  return dir;
}

struct Diff {
  double rel_l2 = 0;
  double worst = 0;  // max |a - r| / (4u |r| + 0.05 rms(r)); <= 1 passes
};

Diff Compare(const std::vector<float>& a, const std::vector<float>& r) {
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    num += (double{a[i]} - r[i]) * (double{a[i]} - r[i]);
    den += double{r[i]} * r[i];
  }
  const double rms = std::sqrt(den / std::max<size_t>(r.size(), 1));
  Diff d;
  d.rel_l2 = std::sqrt(num / std::max(den, 1e-30));
  for (size_t i = 0; i < r.size(); ++i) {
    const double tol = 4.0 / 256 * std::fabs(r[i]) + 0.05 * rms;
    d.worst = std::max(d.worst, std::fabs(double{a[i]} - r[i]) / tol);
  }
  return d;
}

#define EXPECT_CLOSE(a, r, what)                                              \
  do {                                                                        \
    const Diff d_ = Compare(a, r);                                            \
    EXPECT_LE(d_.rel_l2, 1e-2) << what;                                       \
    EXPECT_LE(d_.worst, 1.0) << what << " (rel L2 " << d_.rel_l2 << ")";      \
    RecordProperty(std::string(what) + "_rel_l2", std::to_string(d_.rel_l2)); \
  } while (0)

std::vector<float> RandomVector(size_t n, float stddev, std::mt19937* rng) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& e : v) e = dist(*rng);
  return v;
}

TEST(CudaBackendRegistration, CudaIsRegistered) {
  EXPECT_THAT(RegisteredBackends(), ::testing::Contains("cuda"));
}

TEST(CudaBackendRegistration, NoDeviceIsFailedPrecondition) {
  if (HasGpu()) GTEST_SKIP() << "a CUDA device is present";
  const std::string dir = WriteModel("tiny");
  EXPECT_THAT(CreateBackend("cuda", dir).status(), StatusIs(absl::StatusCode::kFailedPrecondition));
}

class CudaVsCpuTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    dir_ = WriteModel(GetParam(), &config_);
    auto cpu = CreateBackend("cpu", dir_, 2);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    cpu_ = *std::move(cpu);
    auto gpu = CreateBackend("cuda", dir_);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = *std::move(gpu);
  }

  std::string dir_;
  LlamaConfig config_;
  std::unique_ptr<ModelBackend> cpu_, gpu_;
};

TEST_P(CudaVsCpuTest, EmbedIsExact) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> tok(0, config_.vocab_size - 1);
  std::vector<int32_t> ids(777);  // more than one chunk of rows
  for (int32_t& t : ids) t = tok(rng);
  ids[0] = 0;
  ids[1] = config_.vocab_size - 1;
  std::vector<float> a(ids.size() * config_.hidden_size, NAN), r(a.size());
  ASSERT_OK(gpu_->Embed(ids, a.data()));
  ASSERT_OK(cpu_->Embed(ids, r.data()));
  EXPECT_EQ(a, r);
  const int32_t bad[] = {3, config_.vocab_size};
  EXPECT_THAT(gpu_->Embed(bad, a.data()), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_P(CudaVsCpuTest, EachCallWithinBf16Tolerance) {
  const int hidden = config_.hidden_size;
  const int qd = config_.num_heads * config_.head_dim;
  const int kvd = config_.num_kv_heads * config_.head_dim;
  std::mt19937 rng(2);
  std::uniform_int_distribution<int32_t> pos(0, 131071);
  for (int n : {1, 37, 600}) {  // decode, prefill, more than one chunk (512 rows)
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      const std::string where = absl::StrCat(GetParam(), " n=", n, " layer ", layer, " ");
      std::vector<float> x = RandomVector(static_cast<size_t>(n) * hidden, 1.0f, &rng);
      std::vector<int32_t> positions(n);
      for (int32_t& p : positions) p = pos(rng);
      std::vector<float> qa(static_cast<size_t>(n) * qd, NAN),
          ka(static_cast<size_t>(n) * kvd, NAN), va(ka.size(), NAN), qr(qa.size()), kr(ka.size()),
          vr(ka.size());
      ASSERT_OK(gpu_->Qkv(layer, x.data(), positions, qa.data(), ka.data(), va.data()));
      ASSERT_OK(cpu_->Qkv(layer, x.data(), positions, qr.data(), kr.data(), vr.data()));
      EXPECT_CLOSE(qa, qr, where + "q");
      EXPECT_CLOSE(ka, kr, where + "k");
      EXPECT_CLOSE(va, vr, where + "v");

      const std::vector<float> attn = RandomVector(static_cast<size_t>(n) * qd, 0.5f, &rng);
      std::vector<float> xa = x, xr = x;
      ASSERT_OK(gpu_->FinishLayer(layer, attn.data(), n, xa.data()));
      ASSERT_OK(cpu_->FinishLayer(layer, attn.data(), n, xr.data()));
      for (size_t i = 0; i < x.size(); ++i) {
        xa[i] -= x[i];
        xr[i] -= x[i];
      }
      EXPECT_CLOSE(xa, xr, where + "finish_layer_update");
    }
    std::vector<float> x = RandomVector(static_cast<size_t>(n) * hidden, 1.0f, &rng);
    std::vector<float> la(static_cast<size_t>(n) * config_.vocab_size, NAN), lr(la.size());
    ASSERT_OK(gpu_->Logits(x.data(), n, la.data()));
    ASSERT_OK(cpu_->Logits(x.data(), n, lr.data()));
    EXPECT_CLOSE(la, lr, absl::StrCat(GetParam(), " n=", n, " logits"));
  }
}

// A whole causal forward pass (the calls chained as the engine chains them, attention on the
// CPU): errors compound through the layers but stay within bf16 tolerance, and the greedy token
// of each position agrees wherever the cpu backend's top-2 margin exceeds the error bound.
TEST_P(CudaVsCpuTest, ForwardPassLogitsAgree) {
  const int n = 96, hidden = config_.hidden_size, hd = config_.head_dim, V = config_.vocab_size;
  const int qd = config_.num_heads * hd, kvd = config_.num_kv_heads * hd;
  std::mt19937 rng(3);
  std::uniform_int_distribution<int32_t> tok(0, V - 1);
  std::vector<int32_t> ids(n), positions(n);
  for (int i = 0; i < n; ++i) {
    ids[i] = tok(rng);
    positions[i] = i;
  }
  auto forward = [&](ModelBackend* m, std::vector<float>* logits) {
    std::vector<float> x(static_cast<size_t>(n) * hidden), q(static_cast<size_t>(n) * qd),
        k(static_cast<size_t>(n) * kvd), v(k.size()), attn(q.size());
    ASSERT_OK(m->Embed(ids, x.data()));
    for (int l = 0; l < config_.num_layers; ++l) {
      ASSERT_OK(m->Qkv(l, x.data(), positions, q.data(), k.data(), v.data()));
      for (int t = 0; t < n; ++t) {
        for (int g = 0; g < config_.num_kv_heads; ++g) {
          const size_t o =
              static_cast<size_t>(t) * qd + static_cast<size_t>(g) * config_.group_size() * hd;
          AttendRows(q.data() + o, config_.group_size(), hd, k.data() + g * hd, kvd,
                     v.data() + g * hd, kvd, t + 1, 1.0f / std::sqrt(float(hd)), attn.data() + o);
        }
      }
      ASSERT_OK(m->FinishLayer(l, attn.data(), n, x.data()));
    }
    logits->assign(static_cast<size_t>(n) * V, NAN);
    ASSERT_OK(m->Logits(x.data(), n, logits->data()));
  };
  std::vector<float> la, lr;
  forward(gpu_.get(), &la);
  forward(cpu_.get(), &lr);
  const Diff d = Compare(la, lr);
  EXPECT_LE(d.rel_l2, 2e-2);
  RecordProperty("forward_logits_rel_l2", std::to_string(d.rel_l2));
  double max_abs = 0;
  for (size_t i = 0; i < la.size(); ++i)
    max_abs = std::max(max_abs, std::fabs(double{la[i]} - lr[i]));
  int decided = 0, agree = 0;
  for (int t = 0; t < n; ++t) {
    const float* r = lr.data() + static_cast<size_t>(t) * V;
    const float* a = la.data() + static_cast<size_t>(t) * V;
    std::vector<float> sorted(r, r + V);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    if (sorted[0] - sorted[1] <= 2 * max_abs) continue;
    ++decided;
    agree += std::max_element(a, a + V) - a == std::max_element(r, r + V) - r;
  }
  EXPECT_EQ(agree, decided) << "max |dlogit| " << max_abs;
  EXPECT_GE(decided, n / 2) << "too few decisive positions to test anything";
}

TEST_P(CudaVsCpuTest, BadArguments) {
  std::vector<float> x(config_.hidden_size), q(config_.num_heads * config_.head_dim),
      kv(2 * config_.num_kv_heads * config_.head_dim);
  const int32_t pos[] = {0};
  EXPECT_THAT(gpu_->Qkv(config_.num_layers, x.data(), pos, q.data(), kv.data(), kv.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const int32_t neg[] = {-1};
  EXPECT_THAT(gpu_->Qkv(0, x.data(), neg, q.data(), kv.data(), kv.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(gpu_->FinishLayer(-1, q.data(), 1, x.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(gpu_->Logits(x.data(), -1, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaVsCpuTest, ::testing::Values("tiny", "tiny-qwen2"));

TEST(CudaBackendLoad, MissingTensorIsInvalidArgument) {
  SKIP_WITHOUT_GPU();
  LlamaConfig config;
  const std::string dir = WriteModel("tiny", &config);
  config.num_layers += 1;  // the checkpoint lacks the last layer's tensors
  std::ofstream(dir + "/config.json") << ToConfigJson(config);
  EXPECT_THAT(CreateBackend("cuda", dir).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(CudaBackendLoad, MissingDirectoryIsNotFound) {
  SKIP_WITHOUT_GPU();
  EXPECT_THAT(CreateBackend("cuda", ::testing::TempDir() + "/no_such_model").status(),
              StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvrecall::worker
