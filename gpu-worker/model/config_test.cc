#include "gpu-worker/model/config.h"

#include <fstream>
#include <string>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;

// Llama-3.1-8B's config.json (as published).
constexpr char kLlama31[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// Qwen2.5-0.5B-Instruct's config.json (as published).
constexpr char kQwen2[] = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

TEST(ConfigTest, ParsesLlama31) {
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, ParseConfigJson(kLlama31));
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.group_size(), 4);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.dtype, DType::kBF16);
}

TEST(ConfigTest, ParsesQwen2WithImpliedBias) {
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, ParseConfigJson(kQwen2));
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(c.attention_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.head_dim, 64);  // 896 / 14
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
}

TEST(ConfigTest, DefaultsAndExplicitFields) {
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, ParseConfigJson(R"({
    "architectures": ["MistralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 2.0, "original_max_position_embeddings": 1024},
    "attention_bias": true, "torch_dtype": "float16", "rope_theta": null})"));
  EXPECT_EQ(c.num_kv_heads, 4);   // defaults to num_heads
  EXPECT_EQ(c.head_dim, 16);      // hidden / heads
  EXPECT_TRUE(c.attention_bias);  // explicit on Llama/Mistral is honoured
  EXPECT_EQ(c.dtype, DType::kF16);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 1024);

  ASSERT_OK_AND_ASSIGN(LlamaConfig d, ParseConfigJson(R"({
    "model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 128, "rope_scaling": {"rope_type": "default"}})"));
  EXPECT_EQ(d.architecture, "LlamaForCausalLM");
  EXPECT_EQ(d.head_dim, 128);  // explicit head_dim may differ from hidden / heads
  EXPECT_EQ(d.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_EQ(d.dtype, DType::kBF16);
}

TEST(ConfigTest, RoundTripsThroughToConfigJson) {
  for (const char* text : {kLlama31, kQwen2}) {
    ASSERT_OK_AND_ASSIGN(LlamaConfig c, ParseConfigJson(text));
    c.rms_norm_eps = 1.234567890123e-5;
    ASSERT_OK_AND_ASSIGN(LlamaConfig d, ParseConfigJson(ToConfigJson(c)));
    EXPECT_EQ(d.architecture, c.architecture);
    EXPECT_EQ(d.vocab_size, c.vocab_size);
    EXPECT_EQ(d.hidden_size, c.hidden_size);
    EXPECT_EQ(d.intermediate_size, c.intermediate_size);
    EXPECT_EQ(d.num_layers, c.num_layers);
    EXPECT_EQ(d.num_heads, c.num_heads);
    EXPECT_EQ(d.num_kv_heads, c.num_kv_heads);
    EXPECT_EQ(d.head_dim, c.head_dim);
    EXPECT_EQ(d.rms_norm_eps, c.rms_norm_eps);
    EXPECT_EQ(d.rope_theta, c.rope_theta);
    EXPECT_EQ(d.rope_scaling.type, c.rope_scaling.type);
    EXPECT_EQ(d.rope_scaling.factor, c.rope_scaling.factor);
    EXPECT_EQ(d.rope_scaling.original_max_position_embeddings,
              c.rope_scaling.original_max_position_embeddings);
    EXPECT_EQ(d.max_position_embeddings, c.max_position_embeddings);
    EXPECT_EQ(d.tie_word_embeddings, c.tie_word_embeddings);
    EXPECT_EQ(d.attention_bias, c.attention_bias);
    EXPECT_EQ(d.dtype, c.dtype);
  }
}

// A valid base with one field replaced or removed.
std::string With(const std::string& field_json) {
  return R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2)" +
         (field_json.empty() ? std::string() : ", " + field_json) + "}";
}

TEST(ConfigTest, RejectsInconsistentOrHostileConfigs) {
  ASSERT_OK(ParseConfigJson(With("")));
  const std::string bad[] = {
      "{not json",
      "[1, 2]",
      R"({"architectures": ["GPT2LMHeadModel"], "vocab_size": 1})",
      R"({"vocab_size": 100})",                                                  // no architecture
      With(R"("num_key_value_heads": 3)"),                                       // 4 % 3 != 0
      With(R"("hidden_size": 66, "num_attention_heads": 4, "head_dim": null)"),  // 66 % 4
      With(R"("head_dim": 63)"),                                                 // odd
      With(R"("vocab_size": -1)"),
      With(R"("vocab_size": 0)"),
      With(R"("vocab_size": 1e12)"),          // not an integer
      With(R"("vocab_size": 100000000000)"),  // absurd
      With(R"("hidden_size": 18446744073709551615)"),
      With(R"("num_hidden_layers": 100000)"),
      With(R"("intermediate_size": "128")"),
      With(R"("rms_norm_eps": 0)"),
      With(R"("rope_theta": -5)"),
      With(R"("rope_scaling": {"rope_type": "yarn", "factor": 4.0})"),
      With(R"("rope_scaling": {"rope_type": "llama3", "factor": 0.5})"),
      With(
          R"("rope_scaling": {"rope_type": "llama3", "low_freq_factor": 4, "high_freq_factor": 1})"),
      With(R"("rope_scaling": "llama3")"),
      With(R"("torch_dtype": "float64")"),
      With(R"("tie_word_embeddings": "yes")"),
      With(R"("hidden_act": "gelu")"),
      With(R"("mlp_bias": true)"),
      R"({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "attention_bias": false})",
  };
  for (const std::string& text : bad) {
    EXPECT_THAT(ParseConfigJson(text), StatusIs(absl::StatusCode::kInvalidArgument)) << text;
  }
  // Required fields, one at a time.
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads"}) {
    EXPECT_THAT(ParseConfigJson(With(std::string("\"") + key + "\": null")),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << key;
  }
}

TEST(ConfigTest, ShardConfigSplitsHeadsAndMlpByRank) {
  ASSERT_OK_AND_ASSIGN(const LlamaConfig c, ParseConfigJson(With(R"("num_attention_heads": 8,
                                                                  "head_dim": 16)")));
  ASSERT_OK_AND_ASSIGN(const LlamaConfig one, ShardConfig(c, 1));
  EXPECT_EQ(ToConfigJson(one), ToConfigJson(c));
  ASSERT_OK_AND_ASSIGN(const LlamaConfig two, ShardConfig(c, 2));
  EXPECT_EQ(two.num_heads, 4);
  EXPECT_EQ(two.num_kv_heads, 1);
  EXPECT_EQ(two.intermediate_size, 64);
  EXPECT_EQ(two.group_size(), c.group_size());
  EXPECT_EQ(two.hidden_size, c.hidden_size);
  EXPECT_EQ(two.head_dim, c.head_dim);
  EXPECT_EQ(two.vocab_size, c.vocab_size);
  // Each rank keeps whole GQA groups and whole MLP columns, or the split is refused.
  EXPECT_THAT(ShardConfig(c, 4), StatusIs(absl::StatusCode::kInvalidArgument));  // 2 kv-heads
  EXPECT_THAT(ShardConfig(c, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShardConfig(c, -2), StatusIs(absl::StatusCode::kInvalidArgument));
  LlamaConfig odd_mlp = c;
  odd_mlp.intermediate_size = 129;
  EXPECT_THAT(ShardConfig(odd_mlp, 2), StatusIs(absl::StatusCode::kInvalidArgument));

  EXPECT_EQ(ShardName("llama", 0, 1), "llama");
  EXPECT_EQ(ShardName("llama", 1, 2), "llama.tp1of2");
  EXPECT_NE(ShardName("s", 0, 2), ShardName("s", 1, 2));
  EXPECT_NE(ShardName("s", 0, 2), ShardName("s", 0, 4));
}

TEST(ConfigTest, LoadConfigReadsFileOrReportsNotFound) {
  const std::string dir = ::testing::TempDir();
  EXPECT_THAT(LoadConfig(dir + "/no-such-dir"), StatusIs(absl::StatusCode::kNotFound));
  {
    std::ofstream out(dir + "/config.json");
    out << kLlama31;
  }
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, LoadConfig(dir));
  EXPECT_EQ(c.vocab_size, 128256);
}

}  // namespace
}  // namespace kvrecall::worker
