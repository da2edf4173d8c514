#include "gpu-worker/model/tokenizer.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gpu-worker/model/internal/unicode.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using json = nlohmann::json;

// Written by testdata/make_tokenizer_fixtures.py with Hugging Face `tokenizers`.
const std::string kTestdata = KVRECALL_TOKENIZER_TESTDATA;

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::unique_ptr<Tokenizer> LoadFlavour(const std::string& flavour) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::Load(kTestdata + "/" + flavour);
  EXPECT_OK(t);
  return t.ok() ? *std::move(t) : nullptr;
}

std::vector<int32_t> Ids(const json& j) { return j.get<std::vector<int32_t>>(); }

// Every encode and decode answer `tokenizers` gave, id for id and byte for byte.
void ExpectMatchesFixture(const std::string& flavour) {
  std::unique_ptr<Tokenizer> tok = LoadFlavour(flavour);
  ASSERT_NE(tok, nullptr);
  const json cases = json::parse(ReadText(kTestdata + "/" + flavour + "/cases.json"));
  ASSERT_GT(cases["encode"].size(), 40u);
  for (const json& c : cases["encode"]) {
    const std::string text = c["text"].get<std::string>();
    SCOPED_TRACE("text: " + text);
    EXPECT_EQ(tok->Encode(text, false), Ids(c["ids"]));
    EXPECT_EQ(tok->Encode(text, true), Ids(c["ids_add_special"]));
    EXPECT_EQ(tok->Decode(Ids(c["ids"]), false).value_or("<error>"),
              c["decoded"].get<std::string>());
    EXPECT_EQ(tok->Decode(Ids(c["ids_add_special"]), true).value_or("<error>"),
              c["decoded_skip_special"].get<std::string>());
  }
  ASSERT_GT(cases["decode"].size(), 40u);
  for (const json& c : cases["decode"]) {
    SCOPED_TRACE("ids: " + c["ids"].dump());
    EXPECT_EQ(tok->Decode(Ids(c["ids"]), false).value_or("<error>"), c["text"].get<std::string>());
    EXPECT_EQ(tok->Decode(Ids(c["ids"]), true).value_or("<error>"),
              c["text_skip_special"].get<std::string>());
  }
}

class FixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureTest, MatchesHuggingFaceTokenizers) { ExpectMatchesFixture(GetParam()); }

// Random valid UTF-8 from a pool that hits every pre-tokenizer branch; decode(encode(x)) gives back
// x (NFC(x) for the NFC-normalizing flavour).
TEST_P(FixtureTest, RoundTripsValidText) {
  std::unique_ptr<Tokenizer> tok = LoadFlavour(GetParam());
  ASSERT_NE(tok, nullptr);
  const std::vector<std::string> pool = {"a",
                                         "Z",
                                         "q",
                                         " ",
                                         "  ",
                                         "\t",
                                         "\n",
                                         "\r\n",
                                         "'",
                                         "'s",
                                         "'LL",
                                         "0",
                                         "42",
                                         "7",
                                         ".",
                                         ",",
                                         "!?",
                                         "é",
                                         "e\xCC\x81",
                                         "\xCC\xA3",
                                         "日",
                                         "본",
                                         "\xE1\x84\x80",
                                         "\xE1\x85\xA1",
                                         "😀",
                                         "\xE2\x80\x8D",
                                         "\xC2\xA0",
                                         "\xE3\x80\x80",
                                         "\xD9\xA3",
                                         "<|",
                                         "|>",
                                         "<|eot_id|>",
                                         "<|endoftext|>",
                                         "ſ",
                                         "ß",
                                         "Ⅻ"};
  const bool nfc = GetParam() == "qwen2";
  std::mt19937 rng(11);
  for (int iter = 0; iter < 2000; ++iter) {
    std::string text;
    const int n = std::uniform_int_distribution<int>(0, 24)(rng);
    for (int i = 0; i < n; ++i)
      text += pool[std::uniform_int_distribution<size_t>(0, pool.size() - 1)(rng)];
    const std::vector<int32_t> ids = tok->Encode(text, false);
    const std::string want = nfc ? internal::NormalizeNfc(text) : text;
    ASSERT_EQ(tok->Decode(ids, false).value_or("<error>"), want) << "text: " << text;
  }
}

// Arbitrary bytes, ill-formed UTF-8 included: Encode never fails, every id decodes, and the bytes
// come back exactly wherever they were well-formed (Decode is lossy only where the input was).
TEST_P(FixtureTest, ArbitraryBytesDoNotCrash) {
  std::unique_ptr<Tokenizer> tok = LoadFlavour(GetParam());
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(5);
  const std::string alphabet =
      std::string("\x80\xBF\xC0\xC3\xE2\xED\xF0\xF4\xF5\xFF '\r\n\t<|>a1", 21);
  for (int iter = 0; iter < 3000; ++iter) {
    std::string text(std::uniform_int_distribution<int>(0, 40)(rng), '\0');
    for (char& ch : text) {
      ch = iter % 2 ? static_cast<char>(rng()) : alphabet[rng() % alphabet.size()];
    }
    for (bool special : {false, true}) {
      const std::vector<int32_t> ids = tok->Encode(text, special);
      for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->vocab_size()) << id;
      absl::StatusOr<std::string> back = tok->Decode(ids, false);
      ASSERT_OK(back);
      if (!special && GetParam() != "qwen2") {
        EXPECT_EQ(*back, internal::Utf8Lossy(text));
      }
      ASSERT_OK(tok->Decode(ids, true));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Flavours, FixtureTest, ::testing::Values("gpt2", "llama3", "qwen2"));

// ByteLevel add_prefix_space adds a space to each piece, so this flavour does not round-trip; only
// the answers from `tokenizers` are compared.
TEST(TokenizerTest, PrefixSpaceMatchesHuggingFaceTokenizers) {
  ExpectMatchesFixture("gpt2_prefix");
}

TEST(TokenizerTest, Llama3SpecialTokensAndConfigs) {
  std::unique_ptr<Tokenizer> tok = LoadFlavour("llama3");
  ASSERT_NE(tok, nullptr);
  const int32_t bos = tok->TokenToId("<|begin_of_text|>");
  const int32_t eot = tok->TokenToId("<|eot_id|>");
  const int32_t end = tok->TokenToId("<|end_of_text|>");
  ASSERT_GE(bos, 0);
  EXPECT_EQ(tok->bos_id(), bos);
  EXPECT_THAT(tok->eos_ids(), ElementsAre(end, eot));  // generation_config.json's list
  EXPECT_TRUE(tok->adds_bos());
  EXPECT_TRUE(tok->IsSpecial(eot));
  EXPECT_FALSE(tok->IsSpecial(tok->Encode("a", false)[0]));
  EXPECT_EQ(tok->IdToToken(eot), "<|eot_id|>");

  const std::vector<int32_t> plain = tok->Encode("hi<|eot_id|>", false);
  const std::vector<int32_t> with = tok->Encode("hi<|eot_id|>", true);
  ASSERT_EQ(with.size(), plain.size() + 1);
  EXPECT_EQ(with[0], bos);
  EXPECT_EQ(plain.back(), eot);
  EXPECT_EQ(*tok->Decode(with, false), "<|begin_of_text|>hi<|eot_id|>");
  EXPECT_EQ(*tok->Decode(with, true), "hi");

  // tokenizer_config.json's add_bos_token / add_eos_token override the post-processor.
  const std::string json_text = ReadText(kTestdata + "/llama3/tokenizer.json");
  ASSERT_OK_AND_ASSIGN(
      std::unique_ptr<Tokenizer> no_bos,
      Tokenizer::Parse(json_text,
                       R"({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                      "add_bos_token": false, "add_eos_token": true})"));
  EXPECT_FALSE(no_bos->adds_bos());
  EXPECT_EQ(no_bos->bos_id(), bos);
  EXPECT_THAT(no_bos->eos_ids(), ElementsAre(end));
  std::vector<int32_t> want = tok->Encode("hi", false);
  want.push_back(end);
  EXPECT_EQ(no_bos->Encode("hi", true), want);
}

TEST(TokenizerTest, Gpt2AndQwen2SpecialTokens) {
  std::unique_ptr<Tokenizer> gpt2 = LoadFlavour("gpt2");
  ASSERT_NE(gpt2, nullptr);
  const int32_t eot = gpt2->TokenToId("<|endoftext|>");
  EXPECT_EQ(gpt2->bos_id(), -1);  // GPT-2 has none of the usual bos names and no config here
  EXPECT_FALSE(gpt2->adds_bos());
  EXPECT_THAT(gpt2->eos_ids(), ElementsAre(eot));
  EXPECT_EQ(gpt2->Encode("x", true), gpt2->Encode("x", false));
  // <mask> has lstrip: it swallows the whitespace before it.
  const int32_t mask = gpt2->TokenToId("<mask>");
  EXPECT_EQ(gpt2->Encode("a   <mask>", false),
            (std::vector<int32_t>{gpt2->Encode("a", false)[0], mask}));

  std::unique_ptr<Tokenizer> qwen = LoadFlavour("qwen2");
  ASSERT_NE(qwen, nullptr);
  const int32_t cafe = qwen->TokenToId("café");
  ASSERT_GE(cafe, 0);
  EXPECT_FALSE(qwen->IsSpecial(cafe));
  // "café" is a normalized added token: the decomposed spelling matches it after NFC.
  EXPECT_EQ(qwen->Encode("cafe\xCC\x81", false), std::vector<int32_t>{cafe});
  EXPECT_EQ(qwen->Encode("café", false), std::vector<int32_t>{cafe});
  // Non-special added tokens survive skip_special; special ones do not.
  const std::vector<int32_t> ids = qwen->Encode("<|im_start|><think>x", false);
  EXPECT_EQ(*qwen->Decode(ids, true), "<think>x");
  EXPECT_EQ(*qwen->Decode(ids, false), "<|im_start|><think>x");
}

// The word cache is shared: concurrent Encode calls give what a single thread gives.
TEST(TokenizerTest, ConcurrentEncodeAgrees) {
  std::unique_ptr<Tokenizer> tok = LoadFlavour("qwen2");
  ASSERT_NE(tok, nullptr);
  const json cases = json::parse(ReadText(kTestdata + "/qwen2/cases.json"));
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> want;
  for (const json& c : cases["encode"]) {
    texts.push_back(c["text"].get<std::string>());
    want.push_back(Ids(c["ids"]));
  }
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 20; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          const size_t j = (i + k * 7) % texts.size();
          if (tok->Encode(texts[j], false) != want[j]) ++mismatches;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(TokenizerTest, DecodeRejectsIdsOutOfRange) {
  std::unique_ptr<Tokenizer> tok = LoadFlavour("gpt2");
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Decode(std::vector<int32_t>{1, tok->vocab_size()}, false),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(tok->Decode(std::vector<int32_t>{-1}, true),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_OK(tok->Decode(std::vector<int32_t>{tok->vocab_size() - 1}, false));
  EXPECT_EQ(*tok->Decode({}, false), "");
}

absl::Status ParseMutated(const std::function<void(json&)>& mutate) {
  json j = json::parse(ReadText(kTestdata + "/llama3/tokenizer.json"));
  mutate(j);
  return Tokenizer::Parse(j.dump()).status();
}

TEST(TokenizerTest, BadFilesGiveClearErrors) {
  EXPECT_THAT(Tokenizer::Load(kTestdata + "/no-such-dir"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(Tokenizer::Parse("not json"), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(Tokenizer::Parse("[1, 2]"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Tokenizer::Parse("{}"), StatusIs(absl::StatusCode::kInvalidArgument));

  const std::string good = ReadText(kTestdata + "/llama3/tokenizer.json");
  ASSERT_OK(Tokenizer::Parse(good));
  // Truncated anywhere: DATA_LOSS, never a crash.
  std::mt19937 rng(3);
  for (int i = 0; i < 40; ++i) {
    const size_t cut = rng() % good.size();
    EXPECT_THAT(Tokenizer::Parse(good.substr(0, cut)), StatusIs(absl::StatusCode::kDataLoss))
        << cut;
  }
  // Bytes flipped anywhere: an error or (rarely, inside a token's spelling) a tokenizer; no crash.
  for (int i = 0; i < 40; ++i) {
    std::string bad = good;
    for (int k = 0; k < 4; ++k) bad[rng() % bad.size()] = static_cast<char>(rng());
    absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::Parse(bad);
    if (t.ok()) (*t)->Encode("some text 123", true);
  }

  struct Case {
    std::function<void(json&)> mutate;
    const char* message;
  };
  const std::vector<Case> cases = {
      {[](json& j) { j["model"]["type"] = "WordPiece"; }, "not supported (only BPE)"},
      {[](json& j) { j.erase("model"); }, "'model' is missing"},
      {[](json& j) {
         j["model"]["merges"].push_back({"zzq", "q"});
       },
       "'zzq', which is not in the vocab"},
      {[](json& j) { j["model"]["merges"].push_back("a b c"); }, "not two tokens"},
      {[](json& j) { j["model"]["merges"].push_back(7); }, "neither"},
      {[](json& j) { j["model"]["vocab"]["zzq"] = 5; }, "id 5 is given to both"},
      {[](json& j) { j["model"]["vocab"]["zzq"] = "x"; }, "integer token id"},
      {[](json& j) { j["model"]["vocab"]["zzq"] = -3; }, "is not in [0"},
      {[](json& j) { j["model"]["byte_fallback"] = true; }, "byte_fallback"},
      {[](json& j) {
         j["normalizer"] = {{"type", "NFKC"}};
       },
       "normalizer 'NFKC' is not supported"},
      {[](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+"; },
       "not one we implement"},
      {[](json& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       "'Whitespace' is not supported"},
      {[](json& j) { j["pre_tokenizer"] = nullptr; }, "exactly one ByteLevel"},
      {[](json& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       },
       "decoder 'WordPiece'"},
      {[](json& j) { j["added_tokens"][0]["single_word"] = true; }, "single_word"},
      {[](json& j) { j["added_tokens"][0]["id"] = "zero"; }, "integer token id"},
      {[](json& j) {
         j["post_processor"] = {{"type", "Nope"}};
       },
       "post_processor 'Nope'"},
  };
  for (const Case& c : cases) {
    const absl::Status s = ParseMutated(c.mutate);
    EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument)) << c.message;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message));
  }
  EXPECT_THAT(Tokenizer::Parse(good, "{\"bos_token\": \"<nope>\"}"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Tokenizer::Parse(good, "", "{\"eos_token_id\": [1, 99999]}"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Tokenizer::Parse(good, "{\"bos_token\": "), StatusIs(absl::StatusCode::kDataLoss));

  // Load names the file in its errors.
  const std::string dir = ::testing::TempDir() + "/tokenizer_bad";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/tokenizer.json") << good.substr(0, good.size() / 2);
  const absl::Status s = Tokenizer::Load(dir).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(std::string(s.message()), HasSubstr("tokenizer_bad/tokenizer.json"));
}

// About 1 MB of mixed prose, code and Unicode: it round-trips, and the speed is logged.
TEST(TokenizerTest, EncodesOneMegabyte) {
  std::unique_ptr<Tokenizer> tok = LoadFlavour("llama3");
  ASSERT_NE(tok, nullptr);
  const json cases = json::parse(ReadText(kTestdata + "/llama3/cases.json"));
  std::string text;
  std::mt19937 rng(1);
  while (text.size() < (size_t{1} << 20)) {
    const json& c = cases["encode"][rng() % cases["encode"].size()];
    std::string t = c["text"].get<std::string>();
    if (t.find("<|") != std::string::npos) continue;
    text += t;
    text += std::to_string(rng() % 100000);  // fresh words, so that not everything hits the cache
  }
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok->Encode(text, false);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("encoded %zu bytes into %zu tokens in %.3f s: %.0f tokens/s, %.1f MB/s\n",
              text.size(), ids.size(), s, ids.size() / s, text.size() / s / 1e6);
  EXPECT_EQ(*tok->Decode(ids, false), text);
}

}  // namespace
}  // namespace kvrecall::worker
