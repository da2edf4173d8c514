#include "gpu-worker/backends/cpu/cpu_backend.h"

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "gpu-worker/backends/attention.h"
#include "gpu-worker/backends/backend.h"
#include "gpu-worker/backends/registry.h"
#include "gpu-worker/model/make_model.h"
#include "gpu-worker/model/rope.h"
#include "gpu-worker/model/safetensors.h"
#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

std::string Dir(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/cpu_", name, "_", ::getpid());
}

// Writes (once per process) a random model of `preset` with `layers` layers; returns its dir.
std::string Model(const std::string& preset, int layers, DType dtype = DType::kBF16) {
  const std::string dir = Dir(absl::StrCat(preset, "_", layers, "_", DTypeName(dtype)));
  if (::access((dir + "/config.json").c_str(), F_OK) != 0) {
    LlamaConfig c = PresetConfig(preset).value();
    c.num_layers = layers;
    c.dtype = dtype;
    EXPECT_OK(WriteRandomModel(dir, c, 1234));
  }
  return dir;
}

// Reads a checkpoint tensor as double.
std::vector<double> Weights(const SafetensorsCheckpoint& ckpt, const std::string& name) {
  const SafetensorsTensor* t = ckpt.Find(name);
  EXPECT_NE(t, nullptr) << name;
  std::vector<float> f(t->num_elements());
  ToF32(t->dtype, t->data.data(), f.size(), f.data());
  return std::vector<double>(f.begin(), f.end());
}

// Straightforward reference math in double.
std::vector<double> NaiveRmsNorm(const std::vector<double>& x, const std::vector<double>& w,
                                 double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = w[i] * x[i] * inv;
  return y;
}

// y = W x (+ b) for W: [rows][x.size()].
std::vector<double> NaiveMatVec(const std::vector<double>& w, const std::vector<double>& x,
                                const std::vector<double>* bias = nullptr) {
  const size_t cols = x.size(), rows = w.size() / cols;
  std::vector<double> y(rows);
  for (size_t r = 0; r < rows; ++r) {
    double s = bias ? (*bias)[r] : 0.0;
    for (size_t c = 0; c < cols; ++c) s += w[r * cols + c] * x[c];
    y[r] = s;
  }
  return y;
}

void NaiveRope(std::vector<double>* x, int heads, int hd, const std::vector<double>& inv, int pos) {
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < hd / 2; ++i) {
      double& a = (*x)[h * hd + i];
      double& b = (*x)[h * hd + i + hd / 2];
      const double c = std::cos(pos * inv[i]), s = std::sin(pos * inv[i]);
      const double a0 = a, b0 = b;
      a = a0 * c - b0 * s;
      b = b0 * c + a0 * s;
    }
  }
}

void ExpectClose(const float* got, const std::vector<double>& want, double tol,
                 const std::string& what) {
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], tol * (1.0 + std::fabs(want[i]))) << what << "[" << i << "]";
  }
}

TEST(BackendRegistryTest, UnknownBackendIsNotFoundAndCpuIsRegistered) {
  EXPECT_THAT(CreateBackend("no-such-backend", Model("tiny", 1)),
              StatusIs(absl::StatusCode::kNotFound));
  const std::vector<std::string> names = RegisteredBackends();
  EXPECT_NE(std::find(names.begin(), names.end(), "cpu"), names.end());
  EXPECT_THAT(CreateBackend("cpu", Dir("missing-model")), StatusIs(absl::StatusCode::kNotFound));
}

TEST(BackendRegistryTest, TargetsCanRegisterMoreBackends) {
  EXPECT_TRUE(RegisterBackend(
      "test-fake", [](const std::string& dir, int threads) { return CreateCpuBackend(dir, 1); }));
  EXPECT_FALSE(RegisterBackend("test-fake", nullptr));  // first registration wins
  EXPECT_FALSE(RegisterBackend("cpu", nullptr));
  ASSERT_OK_AND_ASSIGN(auto b, CreateBackend("test-fake", Model("tiny", 1)));
  EXPECT_EQ(b->config().hidden_size, 256);
}

// Token 0..2 of a 3-token input against a naive recomputation from the checkpoint.
void CheckAgainstNaive(const std::string& dir) {
  ASSERT_OK_AND_ASSIGN(auto backend, CreateBackend("cpu", dir, 2));
  const LlamaConfig& c = backend->config();
  ASSERT_OK_AND_ASSIGN(auto ckpt, SafetensorsCheckpoint::Open(dir));
  const int h = c.hidden_size, hd = c.head_dim;
  const int qd = c.num_heads * hd, kvd = c.num_kv_heads * hd;
  const std::vector<int32_t> tokens = {17, 3, 500};
  const std::vector<int32_t> positions = {0, 1, 2};
  std::vector<float> x(3 * h), q(3 * qd), k(3 * kvd), v(3 * kvd);
  ASSERT_OK(backend->Embed(tokens, x.data()));
  ASSERT_OK(backend->Qkv(0, x.data(), positions, q.data(), k.data(), v.data()));

  const std::vector<double> embed = Weights(*ckpt, "model.embed_tokens.weight");
  const std::string p = "model.layers.0.";
  const std::vector<double> inv = RopeInverseFrequencies(c);
  std::vector<double> bq, bk, bv;
  if (c.attention_bias) {
    bq = Weights(*ckpt, p + "self_attn.q_proj.bias");
    bk = Weights(*ckpt, p + "self_attn.k_proj.bias");
    bv = Weights(*ckpt, p + "self_attn.v_proj.bias");
  }
  const auto* pbq = c.attention_bias ? &bq : nullptr;
  const auto* pbk = c.attention_bias ? &bk : nullptr;
  const auto* pbv = c.attention_bias ? &bv : nullptr;
  std::vector<std::vector<double>> x_ref(3);
  for (int t = 0; t < 3; ++t) {
    x_ref[t].assign(embed.begin() + tokens[t] * h, embed.begin() + (tokens[t] + 1) * h);
    ExpectClose(x.data() + t * h, x_ref[t], 0, "embed");
    const std::vector<double> hn =
        NaiveRmsNorm(x_ref[t], Weights(*ckpt, p + "input_layernorm.weight"), c.rms_norm_eps);
    std::vector<double> qr = NaiveMatVec(Weights(*ckpt, p + "self_attn.q_proj.weight"), hn, pbq);
    std::vector<double> kr = NaiveMatVec(Weights(*ckpt, p + "self_attn.k_proj.weight"), hn, pbk);
    const std::vector<double> vr =
        NaiveMatVec(Weights(*ckpt, p + "self_attn.v_proj.weight"), hn, pbv);
    NaiveRope(&qr, c.num_heads, hd, inv, positions[t]);
    NaiveRope(&kr, c.num_kv_heads, hd, inv, positions[t]);
    ExpectClose(q.data() + t * qd, qr, 1e-5, absl::StrCat("q", t));
    ExpectClose(k.data() + t * kvd, kr, 1e-5, absl::StrCat("k", t));
    ExpectClose(v.data() + t * kvd, vr, 1e-5, absl::StrCat("v", t));
  }

  // FinishLayer on token 0, whose causal attention sees only itself: attn = v of its kv-head.
  std::vector<float> attn(3 * qd);
  std::vector<double> attn0(qd);
  for (int t = 0; t < 3; ++t) {
    for (int hq = 0; hq < c.num_heads; ++hq) {
      const int kvh = hq / c.group_size();
      for (int j = 0; j < hd; ++j) attn[t * qd + hq * hd + j] = v[t * kvd + kvh * hd + j];
    }
  }
  for (int j = 0; j < qd; ++j) attn0[j] = attn[j];
  ASSERT_OK(backend->FinishLayer(0, attn.data(), 3, x.data()));
  std::vector<double> xr = x_ref[0];
  const std::vector<double> o = NaiveMatVec(Weights(*ckpt, p + "self_attn.o_proj.weight"), attn0);
  for (int j = 0; j < h; ++j) xr[j] += o[j];
  const std::vector<double> hn =
      NaiveRmsNorm(xr, Weights(*ckpt, p + "post_attention_layernorm.weight"), c.rms_norm_eps);
  const std::vector<double> g = NaiveMatVec(Weights(*ckpt, p + "mlp.gate_proj.weight"), hn);
  const std::vector<double> u = NaiveMatVec(Weights(*ckpt, p + "mlp.up_proj.weight"), hn);
  std::vector<double> a(g.size());
  for (size_t j = 0; j < g.size(); ++j) a[j] = g[j] / (1.0 + std::exp(-g[j])) * u[j];
  const std::vector<double> d = NaiveMatVec(Weights(*ckpt, p + "mlp.down_proj.weight"), a);
  for (int j = 0; j < h; ++j) xr[j] += d[j];
  ExpectClose(x.data(), xr, 1e-5, "finish");

  // Logits of token 0.
  std::vector<float> logits(3 * c.vocab_size);
  ASSERT_OK(backend->Logits(x.data(), 3, logits.data()));
  const std::vector<double> fn =
      NaiveRmsNorm(xr, Weights(*ckpt, "model.norm.weight"), c.rms_norm_eps);
  const std::vector<double> lr = NaiveMatVec(
      Weights(*ckpt, c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight"), fn);
  ExpectClose(logits.data(), lr, 1e-5, "logits");
}

TEST(CpuBackendTest, MatchesNaiveRecomputationLlama) { CheckAgainstNaive(Model("tiny", 2)); }
TEST(CpuBackendTest, MatchesNaiveRecomputationQwen2) { CheckAgainstNaive(Model("tiny-qwen2", 1)); }
TEST(CpuBackendTest, MatchesNaiveRecomputationF16AndF32) {
  CheckAgainstNaive(Model("tiny", 1, DType::kF16));
  CheckAgainstNaive(Model("tiny-qwen2", 1, DType::kF32));
}

// A full causal forward over `tokens`; returns the logits [n][vocab].
std::vector<float> Forward(ModelBackend* b, const std::vector<int32_t>& tokens) {
  const LlamaConfig& c = b->config();
  const int n = static_cast<int>(tokens.size()), h = c.hidden_size, hd = c.head_dim;
  const int qd = c.num_heads * hd, kvd = c.num_kv_heads * hd, g = c.group_size();
  std::vector<int32_t> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = i;
  std::vector<float> x(n * h), q(n * qd), k(n * kvd), v(n * kvd), attn(n * qd);
  EXPECT_OK(b->Embed(tokens, x.data()));
  for (int l = 0; l < c.num_layers; ++l) {
    EXPECT_OK(b->Qkv(l, x.data(), pos, q.data(), k.data(), v.data()));
    for (int i = 0; i < n; ++i) {
      for (int kvh = 0; kvh < c.num_kv_heads; ++kvh) {
        AttendRows(q.data() + i * qd + kvh * g * hd, g, hd, k.data() + kvh * hd, kvd,
                   v.data() + kvh * hd, kvd, i + 1, 1.0f / std::sqrt(float(hd)),
                   attn.data() + i * qd + kvh * g * hd);
      }
    }
    EXPECT_OK(b->FinishLayer(l, attn.data(), n, x.data()));
  }
  std::vector<float> logits(n * c.vocab_size);
  EXPECT_OK(b->Logits(x.data(), n, logits.data()));
  return logits;
}

TEST(CpuBackendTest, FullForwardIsFiniteAndDeterministic) {
  const std::string dir = Model("tiny", 4);
  ASSERT_OK_AND_ASSIGN(auto one, CreateBackend("cpu", dir, 1));
  ASSERT_OK_AND_ASSIGN(auto two, CreateBackend("cpu", dir, 2));
  std::vector<int32_t> tokens;
  for (int i = 0; i < 40; ++i) tokens.push_back((i * 37 + 11) % 512);
  const std::vector<float> a = Forward(one.get(), tokens);
  const std::vector<float> b = Forward(two.get(), tokens);
  const std::vector<float> c = Forward(two.get(), tokens);
  for (float f : a) ASSERT_TRUE(std::isfinite(f));
  EXPECT_EQ(a, b);  // thread count does not change a bit
  EXPECT_EQ(b, c);  // nor does running again
  float lo = a[0], hi = a[0];
  for (float f : a) lo = std::min(lo, f), hi = std::max(hi, f);
  EXPECT_GT(hi - lo, 0.1f);  // logits are not degenerate
}

TEST(CpuBackendTest, RowsAreIndependentOfBatching) {
  ASSERT_OK_AND_ASSIGN(auto b, CreateBackend("cpu", Model("tiny", 1), 2));
  const LlamaConfig& c = b->config();
  const int n = 700, h = c.hidden_size, qd = c.num_heads * c.head_dim;
  const int kvd = c.num_kv_heads * c.head_dim;
  std::vector<int32_t> tokens(n), pos(n);
  for (int i = 0; i < n; ++i) tokens[i] = (i * 7) % c.vocab_size, pos[i] = 3 * i;
  std::vector<float> x(n * h), q(n * qd), k(n * kvd), v(n * kvd);
  ASSERT_OK(b->Embed(tokens, x.data()));
  ASSERT_OK(b->Qkv(0, x.data(), pos, q.data(), k.data(), v.data()));
  std::vector<float> q1(qd), k1(kvd), v1(kvd);
  for (int i : {0, 1, 511, 512, 699}) {
    ASSERT_OK(b->Qkv(0, x.data() + i * h, absl::MakeConstSpan(&pos[i], 1), q1.data(), k1.data(),
                     v1.data()));
    EXPECT_TRUE(std::equal(q1.begin(), q1.end(), q.begin() + i * qd)) << i;
    EXPECT_TRUE(std::equal(k1.begin(), k1.end(), k.begin() + i * kvd)) << i;
    EXPECT_TRUE(std::equal(v1.begin(), v1.end(), v.begin() + i * kvd)) << i;
  }
  // FinishLayer of the whole batch vs one row (the attention input can be anything).
  std::vector<float> xb = x, x1(x.begin() + 600 * h, x.begin() + 601 * h);
  ASSERT_OK(b->FinishLayer(0, q.data(), n, xb.data()));
  ASSERT_OK(b->FinishLayer(0, q.data() + 600 * qd, 1, x1.data()));
  EXPECT_TRUE(std::equal(x1.begin(), x1.end(), xb.begin() + 600 * h));
}

TEST(CpuBackendTest, RejectsBadArguments) {
  ASSERT_OK_AND_ASSIGN(auto b, CreateBackend("cpu", Model("tiny", 1), 1));
  std::vector<float> x(2 * 256), q(2 * 256), k(2 * 128), v(2 * 128);
  EXPECT_THAT(b->Embed({1, 512}, x.data()), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(b->Embed({-1}, x.data()), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(b->Embed({1, 2}, x.data()));
  EXPECT_THAT(b->Qkv(1, x.data(), {0, 1}, q.data(), k.data(), v.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(b->Qkv(0, x.data(), {0, -1}, q.data(), k.data(), v.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(b->FinishLayer(-1, q.data(), 2, x.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_OK(b->Qkv(0, x.data(), {}, q.data(), k.data(), v.data()));  // n = 0 is a no-op
}

// Rewrites `src`'s checkpoint into a new dir, with `edit` applied to the tensor list.
std::string Rewrite(const std::string& src, const std::string& name,
                    const std::function<void(std::vector<TensorToWrite>*)>& edit) {
  const std::string dir = Dir(name);
  ::mkdir(dir.c_str(), 0755);
  {
    std::ifstream in(src + "/config.json");
    std::ofstream out(dir + "/config.json");
    out << in.rdbuf();
  }
  auto ckpt = SafetensorsCheckpoint::Open(src).value();
  std::vector<TensorToWrite> tensors;
  for (const SafetensorsTensor* t : ckpt->tensors()) {
    tensors.push_back({t->name, t->dtype, t->shape, t->data});
  }
  edit(&tensors);
  EXPECT_OK(WriteSafetensors(dir + "/model.safetensors", tensors));
  return dir;
}

TEST(CpuBackendTest, ValidatesEveryTensor) {
  const std::string src = Model("tiny", 1);
  const std::string missing = Rewrite(src, "missing", [](std::vector<TensorToWrite>* ts) {
    std::erase_if(
        *ts, [](const TensorToWrite& t) { return t.name == "model.layers.0.mlp.up_proj.weight"; });
  });
  auto s = CreateBackend("cpu", missing);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("model.layers.0.mlp.up_proj.weight"));

  const std::string reshaped = Rewrite(src, "reshaped", [](std::vector<TensorToWrite>* ts) {
    for (auto& t : *ts) {
      if (t.name == "model.layers.0.self_attn.k_proj.weight") t.shape = {256, 128};
    }
  });
  s = CreateBackend("cpu", reshaped);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("self_attn.k_proj.weight"));

  // Extra tensors are ignored.
  const std::vector<float> extra(4, 0.0f);
  const std::string more = Rewrite(src, "extra", [&](std::vector<TensorToWrite>* ts) {
    ts->push_back({"model.rotary_emb.inv_freq",
                   DType::kF32,
                   {4},
                   absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(extra.data()), 16)});
  });
  EXPECT_OK(CreateBackend("cpu", more).status());
}

}  // namespace
}  // namespace kvrecall::worker
