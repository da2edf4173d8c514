#include "gpu-worker/model/make_model.h"

#include <unistd.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "gpu-worker/model/safetensors.h"
#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;

std::string Dir(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/mm_", name, "_", ::getpid());
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(MakeModelTest, Presets) {
  ASSERT_OK_AND_ASSIGN(LlamaConfig tiny, PresetConfig("tiny"));
  EXPECT_EQ(tiny.architecture, "LlamaForCausalLM");
  EXPECT_EQ(tiny.vocab_size, 512);
  EXPECT_EQ(tiny.hidden_size, 256);
  EXPECT_EQ(tiny.num_layers, 4);
  EXPECT_EQ(tiny.num_heads, 4);
  EXPECT_EQ(tiny.num_kv_heads, 2);
  EXPECT_EQ(tiny.head_dim, 64);
  EXPECT_EQ(tiny.intermediate_size, 704);
  EXPECT_EQ(tiny.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(tiny.max_position_embeddings, 131072);
  EXPECT_FALSE(tiny.tie_word_embeddings);
  EXPECT_EQ(tiny.dtype, DType::kBF16);
  ASSERT_OK_AND_ASSIGN(LlamaConfig qwen, PresetConfig("tiny-qwen2"));
  EXPECT_EQ(qwen.architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(qwen.attention_bias);
  EXPECT_TRUE(qwen.tie_word_embeddings);
  ASSERT_OK_AND_ASSIGN(LlamaConfig small, PresetConfig("small"));
  EXPECT_EQ(small.num_layers, 8);
  EXPECT_EQ(small.hidden_size, 512);
  EXPECT_EQ(small.num_heads, 8);
  EXPECT_EQ(small.intermediate_size, 1408);
  EXPECT_THAT(PresetConfig("huge"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(MakeModelTest, WritesLoadableDeterministicCheckpoint) {
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, PresetConfig("tiny"));
  c.num_layers = 2;
  ASSERT_OK(WriteRandomModel(Dir("a"), c, 42));
  ASSERT_OK(WriteRandomModel(Dir("b"), c, 42));
  ASSERT_OK(WriteRandomModel(Dir("c"), c, 43));
  const std::string a = ReadBytes(Dir("a") + "/model.safetensors");
  EXPECT_EQ(a, ReadBytes(Dir("b") + "/model.safetensors"));
  EXPECT_NE(a, ReadBytes(Dir("c") + "/model.safetensors"));

  ASSERT_OK_AND_ASSIGN(LlamaConfig loaded, LoadConfig(Dir("a")));
  EXPECT_EQ(loaded.num_layers, 2);
  EXPECT_EQ(loaded.rope_scaling.type, RopeScaling::Type::kLlama3);
  ASSERT_OK_AND_ASSIGN(auto ckpt, SafetensorsCheckpoint::Open(Dir("a")));
  EXPECT_EQ(ckpt->tensors().size(), 2u + 1u + 2u * 9u);  // embed, norm, lm_head + 9 per layer
  const SafetensorsTensor* q = ckpt->Find("model.layers.1.self_attn.q_proj.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->dtype, DType::kBF16);
  EXPECT_EQ(q->shape, (std::vector<int64_t>{256, 256}));
  // Empirical std of the q_proj weights and of a plain linear layer.
  auto stddev = [](const SafetensorsTensor& t) {
    std::vector<float> v(t.num_elements());
    ToF32(t.dtype, t.data.data(), v.size(), v.data());
    double s = 0, s2 = 0;
    for (float x : v) {
      s += x;
      s2 += double{x} * x;
    }
    const double mean = s / v.size();
    EXPECT_NEAR(mean, 0.0, 0.005);
    return std::sqrt(s2 / v.size() - mean * mean);
  };
  EXPECT_NEAR(stddev(*q), kRandomQkStd, 0.01 * kRandomQkStd * 10);
  EXPECT_NEAR(stddev(*ckpt->Find("model.layers.0.mlp.up_proj.weight")), kRandomLinearStd, 0.001);
  const SafetensorsTensor* norm = ckpt->Find("model.layers.0.input_layernorm.weight");
  ASSERT_NE(norm, nullptr);
  std::vector<float> nv(256);
  ToF32(norm->dtype, norm->data.data(), 256, nv.data());
  for (float x : nv) EXPECT_EQ(x, 1.0f);
}

TEST(MakeModelTest, Qwen2HasBiasAndNoLmHead) {
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, PresetConfig("tiny-qwen2"));
  c.num_layers = 1;
  c.dtype = DType::kF32;
  ASSERT_OK(WriteRandomModel(Dir("qwen"), c, 7));
  ASSERT_OK_AND_ASSIGN(auto ckpt, SafetensorsCheckpoint::Open(Dir("qwen")));
  EXPECT_EQ(ckpt->Find("lm_head.weight"), nullptr);
  const SafetensorsTensor* kb = ckpt->Find("model.layers.0.self_attn.k_proj.bias");
  ASSERT_NE(kb, nullptr);
  EXPECT_EQ(kb->dtype, DType::kF32);
  EXPECT_EQ(kb->shape, (std::vector<int64_t>{128}));
}

TEST(MakeModelTest, RejectsBadConfig) {
  LlamaConfig c;  // all zero sizes
  EXPECT_THAT(WriteRandomModel(Dir("bad"), c, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK_AND_ASSIGN(c, PresetConfig("tiny"));
  c.vocab_size = 4000000;
  c.hidden_size = 65536;
  c.num_heads = 64;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  EXPECT_THAT(WriteRandomModel(Dir("big"), c, 1), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::worker
