// Fuzz target: the tokenizer (gpu-worker/model/tokenizer.h).
//
// Input: byte 0 picks what the rest is (mode = byte0 % 4):
//   0  a tokenizer.json, parsed; when it loads, it encodes a fixed text (with and without the
//      specials) and decodes the ids again.
//   1  a tokenizer_config.json and a generation_config.json (split at the first NUL byte) beside
//      a small real tokenizer.json (the llama3 fixture cut to its first kSmallVocab ids).
//   2  text (byte 1 picks the fixture and add_special), encoded by a real fixture tokenizer;
//      every id must be in the vocabulary and decode again, and with GPT-2's tokenizer (lossless
//      byte-level BPE, no normalizer) valid UTF-8 must decode back to itself.
//   3  token ids (little-endian int32s after byte 1), decoded by a fixture tokenizer; an answer
//      must be well-formed UTF-8.
// Any error status is fine; crashes, sanitizer reports, hangs and broken invariants are findings.
//
// KVRECALL_FUZZ_WRITE_SEEDS=DIR: writes seed inputs (made from the fixtures) into DIR and exits.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "gpu-worker/model/internal/unicode.h"
#include "gpu-worker/model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kvrecall::worker {
namespace {

constexpr const char* kFixtures[] = {"gpt2", "llama3", "qwen2"};
constexpr int kSmallVocab = 320;
constexpr absl::string_view kSample =
    "Hello, world! <|begin_of_text|> It's 2024:\tnaïve café 東京 🙂\r\n  x";

struct State {
  std::unique_ptr<Tokenizer> fixtures[3];
  std::string small_json;  // llama3's tokenizer.json cut to kSmallVocab ids
  // The GPT-2 fixture's added tokens with lstrip or rstrip (RoBERTa's <mask>): they swallow the
  // whitespace next to them, as in Hugging Face, so text holding one does not round-trip.
  std::vector<std::string> gpt2_stripping;
};
State* g = nullptr;

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "fuzz_tokenizer: %s\n", what);
  std::abort();
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(("cannot read " + path).c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The tokenizer.json at `path` with the vocabulary cut to ids < max_id and the merges that stay
// inside it: a small input in the real format.
std::string CutVocab(const std::string& path, int max_id) {
  nlohmann::json j = nlohmann::json::parse(ReadFileOrDie(path));
  nlohmann::json& model = j["model"];
  nlohmann::json vocab = nlohmann::json::object();
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (it.value().get<int>() < max_id) vocab[it.key()] = it.value();
  }
  nlohmann::json merges = nlohmann::json::array();
  for (const nlohmann::json& m : model["merges"]) {  // ["a", "b"] or "a b"
    std::string a, b;
    if (m.is_array()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      const std::string ab = m.get<std::string>();
      a = ab.substr(0, ab.find(' '));
      b = ab.substr(a.size() + 1);
    }
    if (vocab.contains(a) && vocab.contains(b) && vocab.contains(a + b)) merges.push_back(m);
  }
  model["vocab"] = std::move(vocab);
  model["merges"] = std::move(merges);
  nlohmann::json added = nlohmann::json::array();
  for (const nlohmann::json& t : j["added_tokens"]) {
    if (t["id"].get<int>() < max_id) added.push_back(t);
  }
  j["added_tokens"] = std::move(added);
  return j.dump();
}

bool IsWellFormedUtf8(absl::string_view s) {
  for (size_t pos = 0; pos < s.size();) {
    int len = 0;
    if (internal::DecodeUtf8(s, pos, &len) == internal::kInvalidCodePoint) return false;
    pos += static_cast<size_t>(len);
  }
  return true;
}

// Encodes `text`, checks the ids, decodes them; returns the decoded text ("" on a refusal).
std::string RoundTrip(const Tokenizer& t, absl::string_view text, bool add_special) {
  const std::vector<int32_t> ids = t.Encode(text, add_special);
  for (int32_t id : ids) {
    if (id < 0 || id >= t.vocab_size()) Fail("Encode produced an id outside the vocabulary");
  }
  absl::StatusOr<std::string> skip = t.Decode(ids, /*skip_special=*/true);
  absl::StatusOr<std::string> all = t.Decode(ids, /*skip_special=*/false);
  if (!skip.ok() || !all.ok()) Fail("Decode refused ids that Encode produced");
  if (!IsWellFormedUtf8(*all) || !IsWellFormedUtf8(*skip)) Fail("Decode produced ill-formed UTF-8");
  return *all;
}

void Probe(const Tokenizer& t) {
  RoundTrip(t, kSample, false);
  RoundTrip(t, kSample, true);
  for (int32_t id : {-1, 0, t.vocab_size() - 1, t.vocab_size(), t.bos_id()}) {
    const std::string token = t.IdToToken(id);
    if (!token.empty() && t.TokenToId(token) < 0) Fail("IdToToken names a token TokenToId lacks");
    (void)t.IsSpecial(id);
  }
  for (int32_t id : t.eos_ids()) (void)t.IdToToken(id);
}

void WriteSeeds(const std::string& dir) {
  auto put = [&dir](const std::string& name, char mode, absl::string_view body) {
    std::ofstream(dir + "/" + name, std::ios::binary) << mode << body;
  };
  put("json_llama3_small", '\0', g->small_json);
  put("json_gpt2_small", '\0',
      CutVocab(std::string(KVRECALL_TOKENIZER_TESTDATA) + "/gpt2/tokenizer.json", kSmallVocab));
  put("json_qwen2_small", '\0',
      CutVocab(std::string(KVRECALL_TOKENIZER_TESTDATA) + "/qwen2/tokenizer.json", kSmallVocab));
  const std::string llama = std::string(KVRECALL_TOKENIZER_TESTDATA) + "/llama3/";
  put("configs_llama3", '\1',
      ReadFileOrDie(llama + "tokenizer_config.json") + std::string(1, '\0') +
          ReadFileOrDie(llama + "generation_config.json"));
  // Texts of the fixtures' cases, for each fixture; ids of the first few for decoding.
  for (int f = 0; f < 3; ++f) {
    const nlohmann::json cases = nlohmann::json::parse(ReadFileOrDie(
        std::string(KVRECALL_TOKENIZER_TESTDATA) + "/" + kFixtures[f] + "/cases.json"));
    int n = 0;
    for (const nlohmann::json& c : cases["encode"]) {
      const std::string text = c["text"].get<std::string>();
      if (text.size() > 200 || n >= 6) continue;
      put(std::string("encode_") + kFixtures[f] + "_" + std::to_string(n), '\2',
          std::string(1, static_cast<char>(f | (n % 2 ? 4 : 0))) + text);
      std::string ids(1, static_cast<char>(f | (n % 2 ? 4 : 0)));
      for (const nlohmann::json& id : c["ids_add_special"]) {
        const int32_t v = id.get<int32_t>();
        ids.append(reinterpret_cast<const char*>(&v), 4);
      }
      put(std::string("decode_") + kFixtures[f] + "_" + std::to_string(n), '\3', ids);
      ++n;
    }
  }
}

}  // namespace
}  // namespace kvrecall::worker

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace kvrecall::worker;
  g = new State();
  for (int f = 0; f < 3; ++f) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::Load(std::string(KVRECALL_TOKENIZER_TESTDATA) + "/" + kFixtures[f]);
    if (!t.ok()) Fail("cannot load a fixture tokenizer");
    g->fixtures[f] = *std::move(t);
  }
  g->small_json =
      CutVocab(std::string(KVRECALL_TOKENIZER_TESTDATA) + "/llama3/tokenizer.json", kSmallVocab);
  const nlohmann::json gpt2 = nlohmann::json::parse(
      ReadFileOrDie(std::string(KVRECALL_TOKENIZER_TESTDATA) + "/gpt2/tokenizer.json"));
  for (const nlohmann::json& t : gpt2["added_tokens"]) {
    if (t.value("lstrip", false) || t.value("rstrip", false)) {
      g->gpt2_stripping.push_back(t["content"].get<std::string>());
    }
  }
  if (!Tokenizer::Parse(g->small_json).ok()) Fail("the cut llama3 tokenizer does not load");
  if (const char* dir = std::getenv("KVRECALL_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvrecall::worker;
  if (size < 1) return 0;
  const absl::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 4) {
    case 0: {
      absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::Parse(rest);
      if (t.ok()) Probe(**t);
      break;
    }
    case 1: {
      const size_t nul = rest.find('\0');
      const absl::string_view cfg = rest.substr(0, nul);
      const absl::string_view gen = nul == absl::string_view::npos ? "" : rest.substr(nul + 1);
      absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::Parse(g->small_json, cfg, gen);
      if (t.ok()) Probe(**t);
      break;
    }
    case 2: {
      if (rest.empty()) return 0;
      const Tokenizer& t = *g->fixtures[(static_cast<uint8_t>(rest[0]) & 3) % 3];
      const bool add_special = (rest[0] & 4) != 0;
      const absl::string_view text = rest.substr(1);
      const std::string decoded = RoundTrip(t, text, add_special);
      const bool strips =
          std::any_of(g->gpt2_stripping.begin(), g->gpt2_stripping.end(),
                      [&](const std::string& tok) { return absl::StrContains(text, tok); });
      if (&t == g->fixtures[0].get() && !add_special && !strips && IsWellFormedUtf8(text) &&
          decoded != text) {
        Fail("GPT-2 byte-level BPE did not decode valid UTF-8 back to itself");
      }
      break;
    }
    case 3: {
      if (rest.empty()) return 0;
      const Tokenizer& t = *g->fixtures[(static_cast<uint8_t>(rest[0]) & 3) % 3];
      std::vector<int32_t> ids((rest.size() - 1) / 4);
      if (!ids.empty()) std::memcpy(ids.data(), rest.data() + 1, ids.size() * 4);
      absl::StatusOr<std::string> text = t.Decode(ids, (rest[0] & 4) != 0);
      if (text.ok() && !IsWellFormedUtf8(*text)) Fail("Decode produced ill-formed UTF-8");
      break;
    }
  }
  return 0;
}
