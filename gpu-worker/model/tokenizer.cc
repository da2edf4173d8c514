#include "gpu-worker/model/tokenizer.h"

#include <algorithm>
#include <array>
#include <deque>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gpu-worker/model/internal/unicode.h"
#include "nlohmann/json.hpp"

namespace kvrecall::worker {
namespace internal {

// The pre-tokenizer split patterns we implement by hand (see SplitWords).
enum class SplitPattern { kGpt2, kLlama3, kQwen2 };

struct PreTokenizerStage {
  bool byte_level = false;  // else a Split with `pattern`
  SplitPattern pattern = SplitPattern::kGpt2;
  bool use_regex = false;  // ByteLevel: split with the GPT-2 pattern
  bool add_prefix_space =
      false;  // ByteLevel: prepend ' ' to each piece that does not start with one
};

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
};

// Leftmost-longest matcher over a few (tens to hundreds of) added tokens.
struct AddedMatcher {
  std::vector<AddedToken> tokens;  // longest first
  std::array<bool, 256> first_byte{};

  bool empty() const { return tokens.empty(); }
  void Finish() {
    std::stable_sort(tokens.begin(), tokens.end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content.size() > b.content.size();
    });
    for (const AddedToken& t : tokens) first_byte[static_cast<uint8_t>(t.content[0])] = true;
  }
  // The longest token that text[pos..] starts with, or nullptr.
  const AddedToken* MatchAt(absl::string_view text, size_t pos) const {
    if (!first_byte[static_cast<uint8_t>(text[pos])]) return nullptr;
    for (const AddedToken& t : tokens) {
      if (text.size() - pos >= t.content.size() &&
          text.compare(pos, t.content.size(), t.content) == 0)
        return &t;
    }
    return nullptr;
  }
};

struct MergeValue {
  int32_t rank;
  int32_t id;
};

struct TokenizerModel {
  bool nfc = false;
  std::vector<PreTokenizerStage> stages;
  bool ignore_merges = false;
  int32_t unk_id = -1;
  bool fuse_unk = false;
  std::array<int32_t, 256> byte_id{};                // the single-byte token of each byte, or -1
  absl::flat_hash_map<uint64_t, MergeValue> merges;  // (left id, right id) -> rank, merged id
  absl::flat_hash_map<std::string, int32_t>
      bytes_to_id;  // vocab tokens by the raw bytes they stand for
  absl::flat_hash_map<std::string, int32_t>
      token_to_id;                      // vocab and added tokens as spelled in the json
  std::vector<std::string> id_token;    // [vocab_size], spelling ("" = no token)
  std::vector<std::string> id_bytes;    // [vocab_size], what Decode emits
  std::vector<uint8_t> id_kind;         // [vocab_size], kNone / kRegular / kSpecial
  AddedMatcher added_raw;               // matched on the text as given
  AddedMatcher added_normalized;        // matched after normalization
  std::vector<int32_t> prefix, suffix;  // added by Encode(add_special = true)
  int32_t bos = -1;
  std::vector<int32_t> eos;
};

enum : uint8_t { kNone = 0, kRegular = 1, kSpecial = 2 };

}  // namespace internal

namespace {

using internal::AddedMatcher;
using internal::AddedToken;
using internal::SplitPattern;
using internal::TokenizerModel;
using json = nlohmann::json;

constexpr size_t kMaxJsonBytes = size_t{1} << 30;
constexpr int64_t kMaxId = int64_t{1} << 24;  // 16M tokens: bounds the per-id tables
constexpr size_t kMaxCachedWord = 256;        // bytes; longer words are not cached
constexpr size_t kMaxCacheEntries = 1 << 16;

// The pre-tokenizer regexes as tokenizer.json spells them.
constexpr char kGpt2Regex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr char kLlama3Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr char kQwen2Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

absl::Status Invalid(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", what));
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest for U+0100 + n.
std::array<char32_t, 256> ByteToChar() {
  std::array<char32_t, 256> m{};
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable =
        (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    m[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
  }
  return m;
}

// The raw bytes a byte-level token string stands for; false when a character is not one of the 256.
bool TokenToBytes(absl::string_view token, std::string* out) {
  static const auto* char_to_byte = [] {
    auto* m = new absl::flat_hash_map<char32_t, uint8_t>();
    const std::array<char32_t, 256> b2c = ByteToChar();
    for (int b = 0; b < 256; ++b) (*m)[b2c[b]] = static_cast<uint8_t>(b);
    return m;
  }();
  out->clear();
  for (size_t pos = 0; pos < token.size();) {
    int len = 0;
    const char32_t cp = internal::DecodeUtf8(token, pos, &len);
    auto it = char_to_byte->find(cp);
    if (it == char_to_byte->end()) return false;
    out->push_back(static_cast<char>(it->second));
    pos += len;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer patterns, by hand. Each function below is the regex's leftmost-first alternation
// evaluated at one position, with the greedy quantifiers' backtracking worked out:
//   GPT-2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   Llama-3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//            | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   Qwen2:   as Llama-3 with \p{N} for \p{N}{1,3}.
// Ill-formed UTF-8 bytes are single code points of class kOther.

enum Class : uint8_t { kOther, kLetter, kNumber, kSpace };

struct CodePoint {
  char32_t cp;
  size_t offset;  // byte offset in the piece
  Class cls;
};

Class Classify(char32_t cp) {
  if (cp == internal::kInvalidCodePoint) return kOther;
  if (internal::IsLetter(cp)) return kLetter;
  if (internal::IsNumber(cp)) return kNumber;
  if (internal::IsWhitespace(cp)) return kSpace;
  return kOther;
}

bool IsNewline(char32_t cp) { return cp == '\r' || cp == '\n'; }

// Length (code points) of a contraction 's 't 're 've 'm 'll 'd at i, 0 if none.
// `fold`: case-insensitive as Oniguruma's (?i) (which also folds U+017F LATIN SMALL LETTER LONG S
// to s).
size_t Contraction(const std::vector<CodePoint>& c, size_t i, bool fold) {
  if (c[i].cp != '\'' || i + 1 >= c.size()) return 0;
  auto at = [&](size_t k) -> char32_t {
    if (k >= c.size()) return 0;
    char32_t x = c[k].cp;
    if (fold) {
      if (x >= 'A' && x <= 'Z') x += 'a' - 'A';
      if (x == 0x17F) x = 's';
    }
    return x;
  };
  const char32_t a = at(i + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  const char32_t b = at(i + 2);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

size_t RunOf(const std::vector<CodePoint>& c, size_t i, Class cls) {
  while (i < c.size() && c[i].cls == cls) ++i;
  return i;
}

// \s+(?!\S) then \s+, at a whitespace code point i.
size_t WhitespaceTail(const std::vector<CodePoint>& c, size_t i) {
  const size_t j = RunOf(c, i, kSpace);
  if (j == c.size()) return j;
  return j - 1 > i ? j - 1 : j;
}

// End (exclusive, in code points) of the match at i.
size_t MatchGpt2(const std::vector<CodePoint>& c, size_t i) {
  if (const size_t n = Contraction(c, i, /*fold=*/false)) return i + n;
  const bool space_then = c[i].cp == ' ' && i + 1 < c.size();
  for (Class cls : {kLetter, kNumber, kOther}) {
    if (space_then && c[i + 1].cls == cls) return RunOf(c, i + 1, cls);
    if (c[i].cls == cls) return RunOf(c, i, cls);
  }
  return WhitespaceTail(c, i);
}

size_t MatchLlama3(const std::vector<CodePoint>& c, size_t i, size_t max_digits) {
  if (const size_t n = Contraction(c, i, /*fold=*/true)) return i + n;
  const CodePoint& x = c[i];
  if (x.cls == kLetter) return RunOf(c, i, kLetter);
  if (x.cls != kNumber && !IsNewline(x.cp) && i + 1 < c.size() && c[i + 1].cls == kLetter) {
    return RunOf(c, i + 1, kLetter);
  }
  if (x.cls == kNumber) {
    size_t j = i;
    while (j < c.size() && j - i < max_digits && c[j].cls == kNumber) ++j;
    return j;
  }
  size_t j = 0;
  if (x.cp == ' ' && i + 1 < c.size() && c[i + 1].cls == kOther) {
    j = RunOf(c, i + 1, kOther);
  } else if (x.cls == kOther) {
    j = RunOf(c, i, kOther);
  }
  if (j > 0) {
    while (j < c.size() && IsNewline(c[j].cp)) ++j;
    return j;
  }
  // x is whitespace. \s*[\r\n]+ : up to and including the run's last newline.
  const size_t end = RunOf(c, i, kSpace);
  for (size_t k = end; k > i; --k) {
    if (IsNewline(c[k - 1].cp)) return k;
  }
  return WhitespaceTail(c, i);
}

void SplitWords(SplitPattern pattern, absl::string_view text, std::vector<CodePoint>* scratch,
                std::vector<absl::string_view>* out) {
  std::vector<CodePoint>& c = *scratch;
  c.clear();
  for (size_t pos = 0; pos < text.size();) {
    int len = 0;
    const char32_t cp = internal::DecodeUtf8(text, pos, &len);
    c.push_back({cp, pos, Classify(cp)});
    pos += len;
  }
  for (size_t i = 0; i < c.size();) {
    size_t j = 0;
    switch (pattern) {
      case SplitPattern::kGpt2:
        j = MatchGpt2(c, i);
        break;
      case SplitPattern::kLlama3:
        j = MatchLlama3(c, i, 3);
        break;
      case SplitPattern::kQwen2:
        j = MatchLlama3(c, i, 1);
        break;
    }
    const size_t begin = c[i].offset;
    const size_t end = j < c.size() ? c[j].offset : text.size();
    out->push_back(text.substr(begin, end - begin));
    i = j;
  }
}

// Splits `text` at added tokens (leftmost-longest, with lstrip/rstrip): calls on_text for each
// non-empty stretch between tokens and on_token for each token's id.
template <typename OnText, typename OnToken>
void SplitAdded(const AddedMatcher& m, absl::string_view text, OnText on_text, OnToken on_token) {
  if (m.empty()) {
    if (!text.empty()) on_text(text);
    return;
  }
  size_t done = 0;  // text[0, done) is handled
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* t = m.MatchAt(text, pos);
    if (t == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + t->content.size();
    if (t->lstrip) {
      // Walk back over whitespace code points, not into what an earlier match took.
      size_t k = start;
      while (k > done) {
        size_t b = k - 1;
        while (b > done && (static_cast<uint8_t>(text[b]) & 0xC0) == 0x80 && k - b < 4) --b;
        int len = 0;
        const char32_t cp = internal::DecodeUtf8(text, b, &len);
        if (b + len != k || !internal::IsWhitespace(cp)) break;
        k = b;
      }
      start = k;
    }
    if (t->rstrip) {
      while (stop < text.size()) {
        int len = 0;
        const char32_t cp = internal::DecodeUtf8(text, stop, &len);
        if (!internal::IsWhitespace(cp)) break;
        stop += len;
      }
    }
    if (start > done) on_text(text.substr(done, start - done));
    on_token(t->id);
    done = pos = stop;
  }
  if (done < text.size()) on_text(text.substr(done));
}

// ---------------------------------------------------------------------------------------------
// Loading.

absl::StatusOr<json> ParseJson(absl::string_view text, absl::string_view name) {
  if (text.size() > kMaxJsonBytes)
    return absl::InvalidArgumentError(absl::StrCat(name, " is larger than 1 GiB"));
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::DataLossError(absl::StrCat(name, " is not valid JSON (corrupt or truncated?)"));
  }
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(name, " is not a JSON object"));
  return j;
}

const json* Find(const json& j, const char* key) {
  auto it = j.find(key);
  return (it == j.end() || it->is_null()) ? nullptr : &*it;
}

absl::StatusOr<bool> GetBool(const json& j, const char* key, bool dflt, absl::string_view where) {
  const json* v = Find(j, key);
  if (v == nullptr) return dflt;
  if (!v->is_boolean()) return Invalid(absl::StrCat(where, ".", key, " must be a boolean"));
  return v->get<bool>();
}

absl::StatusOr<int32_t> GetId(const json& v, absl::string_view where) {
  if (!v.is_number_integer()) return Invalid(absl::StrCat(where, " must be an integer token id"));
  if (v.is_number_unsigned() ? v.get<uint64_t>() >= static_cast<uint64_t>(kMaxId)
                             : (v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxId)) {
    return Invalid(absl::StrCat(where, " = ", v.dump(), " is not in [0, ", kMaxId, ")"));
  }
  return static_cast<int32_t>(v.get<int64_t>());
}

absl::Status ParseNormalizer(const json& n, TokenizerModel* m) {
  if (n.is_null()) return absl::OkStatus();
  if (!n.is_object() || !n.contains("type") || !n["type"].is_string())
    return Invalid("normalizer has no type");
  const std::string type = n["type"].get<std::string>();
  if (type == "NFC") {
    m->nfc = true;
    return absl::OkStatus();
  }
  if (type == "Sequence") {
    const json* list = Find(n, "normalizers");
    if (list == nullptr || !list->is_array())
      return Invalid("normalizer Sequence has no 'normalizers' list");
    for (const json& x : *list) RETURN_IF_ERROR(ParseNormalizer(x, m));
    return absl::OkStatus();
  }
  return Invalid(absl::StrCat("normalizer '", type, "' is not supported (only null and NFC)"));
}

absl::Status ParsePreTokenizer(const json& p, TokenizerModel* m) {
  if (p.is_null()) return absl::OkStatus();
  if (!p.is_object() || !p.contains("type") || !p["type"].is_string())
    return Invalid("pre_tokenizer has no type");
  const std::string type = p["type"].get<std::string>();
  if (type == "Sequence") {
    const json* list = Find(p, "pretokenizers");
    if (list == nullptr || !list->is_array())
      return Invalid("pre_tokenizer Sequence has no 'pretokenizers' list");
    for (const json& x : *list) RETURN_IF_ERROR(ParsePreTokenizer(x, m));
    return absl::OkStatus();
  }
  internal::PreTokenizerStage stage;
  if (type == "ByteLevel") {
    stage.byte_level = true;
    ASSIGN_OR_RETURN(stage.add_prefix_space, GetBool(p, "add_prefix_space", true, "pre_tokenizer"));
    ASSIGN_OR_RETURN(stage.use_regex, GetBool(p, "use_regex", true, "pre_tokenizer"));
    m->stages.push_back(stage);
    return absl::OkStatus();
  }
  if (type == "Split") {
    const json* pattern = Find(p, "pattern");
    const json* regex =
        pattern != nullptr && pattern->is_object() ? Find(*pattern, "Regex") : nullptr;
    if (regex == nullptr || !regex->is_string()) {
      return Invalid("Split pre_tokenizer: only a {\"Regex\": ...} pattern is supported");
    }
    const std::string r = regex->get<std::string>();
    if (r == kGpt2Regex) {
      stage.pattern = SplitPattern::kGpt2;
    } else if (r == kLlama3Regex) {
      stage.pattern = SplitPattern::kLlama3;
    } else if (r == kQwen2Regex) {
      stage.pattern = SplitPattern::kQwen2;
    } else {
      return Invalid(
          absl::StrCat("Split pre_tokenizer pattern '", r,
                       "' is not one we implement (GPT-2, Llama-3 and Qwen2 patterns are)"));
    }
    const json* behavior = Find(p, "behavior");
    if (behavior == nullptr || *behavior != "Isolated") {
      return Invalid("Split pre_tokenizer: only behavior 'Isolated' is supported");
    }
    ASSIGN_OR_RETURN(bool invert, GetBool(p, "invert", false, "pre_tokenizer"));
    if (invert) return Invalid("Split pre_tokenizer: invert is not supported");
    m->stages.push_back(stage);
    return absl::OkStatus();
  }
  return Invalid(
      absl::StrCat("pre_tokenizer '", type, "' is not supported (ByteLevel, Split, Sequence are)"));
}

absl::Status ParseDecoder(const json& d) {
  if (d.is_null()) return absl::OkStatus();
  if (!d.is_object() || !d.contains("type") || !d["type"].is_string())
    return Invalid("decoder has no type");
  const std::string type = d["type"].get<std::string>();
  if (type == "ByteLevel") return absl::OkStatus();
  if (type == "Sequence") {
    const json* list = Find(d, "decoders");
    if (list == nullptr || !list->is_array())
      return Invalid("decoder Sequence has no 'decoders' list");
    for (const json& x : *list) RETURN_IF_ERROR(ParseDecoder(x));
    return absl::OkStatus();
  }
  return Invalid(absl::StrCat("decoder '", type, "' is not supported (only ByteLevel)"));
}

// The ids a processor's template puts before and after a single sequence.
absl::Status ParsePostProcessor(const json& p, TokenizerModel* m) {
  if (p.is_null()) return absl::OkStatus();
  if (!p.is_object() || !p.contains("type") || !p["type"].is_string())
    return Invalid("post_processor has no type");
  const std::string type = p["type"].get<std::string>();
  if (type == "ByteLevel") return absl::OkStatus();
  if (type == "Sequence") {
    const json* list = Find(p, "processors");
    if (list == nullptr || !list->is_array())
      return Invalid("post_processor Sequence has no 'processors' list");
    for (const json& x : *list) RETURN_IF_ERROR(ParsePostProcessor(x, m));
    return absl::OkStatus();
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    const json* cls = Find(p, "cls");
    const json* sep = Find(p, "sep");
    if (cls == nullptr || sep == nullptr || !cls->is_array() || cls->size() != 2 ||
        !sep->is_array() || sep->size() != 2) {
      return Invalid(absl::StrCat("post_processor ", type, " needs cls and sep [token, id] pairs"));
    }
    ASSIGN_OR_RETURN(int32_t c, GetId((*cls)[1], "post_processor.cls"));
    ASSIGN_OR_RETURN(int32_t s, GetId((*sep)[1], "post_processor.sep"));
    m->prefix.push_back(c);
    m->suffix.push_back(s);
    return absl::OkStatus();
  }
  if (type == "TemplateProcessing") {
    const json* single = Find(p, "single");
    const json* specials = Find(p, "special_tokens");
    if (single == nullptr || !single->is_array())
      return Invalid("TemplateProcessing has no 'single' template");
    bool seen_a = false;
    for (const json& piece : *single) {
      if (!piece.is_object())
        return Invalid("TemplateProcessing: a template piece is not an object");
      if (const json* seq = Find(piece, "Sequence")) {
        if (!seq->is_object() || Find(*seq, "id") == nullptr || (*seq)["id"] != "A" || seen_a) {
          return Invalid("TemplateProcessing: the single template must hold sequence A once");
        }
        seen_a = true;
        continue;
      }
      const json* sp = Find(piece, "SpecialToken");
      if (sp == nullptr || !sp->is_object() || Find(*sp, "id") == nullptr ||
          !(*sp)["id"].is_string()) {
        return Invalid("TemplateProcessing: a template piece is neither Sequence nor SpecialToken");
      }
      const std::string name = (*sp)["id"].get<std::string>();
      const json* entry =
          specials != nullptr && specials->is_object() ? Find(*specials, name.c_str()) : nullptr;
      const json* ids = entry != nullptr && entry->is_object() ? Find(*entry, "ids") : nullptr;
      if (ids == nullptr || !ids->is_array()) {
        return Invalid(absl::StrCat("TemplateProcessing: special token '", name, "' has no ids"));
      }
      for (const json& id : *ids) {
        ASSIGN_OR_RETURN(int32_t v,
                         GetId(id, absl::StrCat("TemplateProcessing special token '", name, "'")));
        (seen_a ? m->suffix : m->prefix).push_back(v);
      }
    }
    if (!seen_a) return Invalid("TemplateProcessing: the single template has no sequence A");
    return absl::OkStatus();
  }
  return Invalid(absl::StrCat("post_processor '", type, "' is not supported"));
}

void SetToken(TokenizerModel* m, int32_t id, const std::string& token, uint8_t kind) {
  if (static_cast<size_t>(id) >= m->id_token.size()) {
    m->id_token.resize(id + 1);
    m->id_kind.resize(id + 1, internal::kNone);
  }
  m->id_token[id] = token;
  m->id_kind[id] = kind;
}

absl::Status ParseModel(const json& model, TokenizerModel* m) {
  if (!model.is_object()) return Invalid("'model' is missing");
  const json* type = Find(model, "type");
  if (type != nullptr && (!type->is_string() || *type != "BPE")) {
    return Invalid(absl::StrCat("model type ", type->dump(), " is not supported (only BPE)"));
  }
  if (const json* d = Find(model, "dropout");
      d != nullptr && !(d->is_number() && d->get<double>() == 0.0)) {
    return Invalid("BPE dropout is not supported");
  }
  ASSIGN_OR_RETURN(bool byte_fallback, GetBool(model, "byte_fallback", false, "model"));
  if (byte_fallback) return Invalid("BPE byte_fallback is not supported (only byte-level BPE)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* v = Find(model, key);
    if (v != nullptr && !(v->is_string() && v->get<std::string>().empty())) {
      return Invalid(absl::StrCat("BPE ", key, " is not supported"));
    }
  }
  ASSIGN_OR_RETURN(m->ignore_merges, GetBool(model, "ignore_merges", false, "model"));
  ASSIGN_OR_RETURN(m->fuse_unk, GetBool(model, "fuse_unk", false, "model"));

  const json* vocab = Find(model, "vocab");
  if (vocab == nullptr || !vocab->is_object())
    return Invalid("model.vocab must be an object of token -> id");
  absl::flat_hash_map<std::string, int32_t> model_vocab;
  model_vocab.reserve(vocab->size());
  std::string bytes;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    ASSIGN_OR_RETURN(int32_t id, GetId(it.value(), absl::StrCat("model.vocab['", it.key(), "']")));
    if (static_cast<size_t>(id) < m->id_token.size() && m->id_kind[id] != internal::kNone) {
      return Invalid(absl::StrCat("model.vocab: id ", id, " is given to both '", m->id_token[id],
                                  "' and '", it.key(), "'"));
    }
    SetToken(m, id, it.key(), internal::kRegular);
    model_vocab[it.key()] = id;
    if (TokenToBytes(it.key(), &bytes)) m->bytes_to_id.emplace(bytes, id);
  }
  if (const json* unk = Find(model, "unk_token")) {
    if (!unk->is_string()) return Invalid("model.unk_token must be a string");
    auto it = model_vocab.find(unk->get<std::string>());
    if (it == model_vocab.end())
      return Invalid(
          absl::StrCat("model.unk_token '", unk->get<std::string>(), "' is not in the vocab"));
    m->unk_id = it->second;
  }
  m->byte_id.fill(-1);
  for (int b = 0; b < 256; ++b) {
    auto it = m->bytes_to_id.find(std::string(1, static_cast<char>(b)));
    if (it != m->bytes_to_id.end()) m->byte_id[b] = it->second;
  }

  const json* merges = Find(model, "merges");
  if (merges != nullptr && !merges->is_array()) return Invalid("model.merges must be a list");
  if (merges == nullptr) return absl::OkStatus();
  m->merges.reserve(merges->size());
  int32_t rank = 0;
  for (const json& merge : *merges) {
    std::string a, b;
    if (merge.is_string()) {
      const std::string s = merge.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return Invalid(
            absl::StrCat("merge #", rank, " '", s, "' is not two tokens separated by one space"));
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      a = merge[0].get<std::string>();
      b = merge[1].get<std::string>();
    } else {
      return Invalid(absl::StrCat("merge #", rank, " ", merge.dump(),
                                  " is neither \"a b\" nor [\"a\", \"b\"]"));
    }
    auto ia = model_vocab.find(a), ib = model_vocab.find(b), iab = model_vocab.find(a + b);
    for (auto [it, tok] : {std::pair{ia, &a}, std::pair{ib, &b},
                           std::pair{iab, static_cast<std::string*>(nullptr)}}) {
      if (it == model_vocab.end()) {
        return Invalid(absl::StrCat("merge #", rank, " '", a, " ", b, "' refers to token '",
                                    tok ? *tok : a + b, "', which is not in the vocab"));
      }
    }
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                         static_cast<uint32_t>(ib->second);
    m->merges.emplace(key, internal::MergeValue{rank, iab->second});
    ++rank;
  }
  return absl::OkStatus();
}

absl::Status ParseAddedTokens(const json& added, TokenizerModel* m) {
  if (added.is_null()) return absl::OkStatus();
  if (!added.is_array()) return Invalid("added_tokens must be a list");
  for (const json& t : added) {
    if (!t.is_object()) return Invalid("an added_tokens entry is not an object");
    const json* content = Find(t, "content");
    const json* idj = Find(t, "id");
    if (content == nullptr || !content->is_string() || content->get<std::string>().empty() ||
        idj == nullptr) {
      return Invalid("an added_tokens entry needs a non-empty 'content' and an 'id'");
    }
    AddedToken a;
    a.content = content->get<std::string>();
    ASSIGN_OR_RETURN(a.id, GetId(*idj, absl::StrCat("added token '", a.content, "' id")));
    ASSIGN_OR_RETURN(a.special, GetBool(t, "special", false, "added_tokens"));
    ASSIGN_OR_RETURN(a.lstrip, GetBool(t, "lstrip", false, "added_tokens"));
    ASSIGN_OR_RETURN(a.rstrip, GetBool(t, "rstrip", false, "added_tokens"));
    ASSIGN_OR_RETURN(bool single_word, GetBool(t, "single_word", false, "added_tokens"));
    ASSIGN_OR_RETURN(bool normalized, GetBool(t, "normalized", !a.special, "added_tokens"));
    if (single_word)
      return Invalid(absl::StrCat("added token '", a.content, "': single_word is not supported"));
    SetToken(m, a.id, a.content, a.special ? internal::kSpecial : internal::kRegular);
    (normalized ? m->added_normalized : m->added_raw).tokens.push_back(std::move(a));
  }
  m->added_raw.Finish();
  m->added_normalized.Finish();
  return absl::OkStatus();
}

// tokenizer_config.json's bos_token / eos_token: a string or {"content": ...}.
absl::StatusOr<int32_t> ConfigToken(const json& cfg, const char* key, const TokenizerModel& m) {
  const json* v = Find(cfg, key);
  if (v == nullptr) return -1;
  if (v->is_object()) v = Find(*v, "content");
  if (v == nullptr || !v->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer_config.json: ", key, " must be a string or {content}"));
  }
  auto it = m.token_to_id.find(v->get<std::string>());
  if (it == m.token_to_id.end()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: ", key, " '",
                                                   v->get<std::string>(), "' is not a token"));
  }
  return it->second;
}

absl::Status ParseConfigs(absl::string_view tokenizer_config_json,
                          absl::string_view generation_config_json, TokenizerModel* m) {
  auto check = [&](int32_t id, absl::string_view what) -> absl::Status {
    if (static_cast<size_t>(id) >= m->id_token.size() || m->id_kind[id] == internal::kNone) {
      return absl::InvalidArgumentError(absl::StrCat(what, " ", id, " names no token"));
    }
    return absl::OkStatus();
  };
  int32_t cfg_bos = -1, cfg_eos = -1, gen_bos = -1;
  std::vector<int32_t> gen_eos;
  if (!tokenizer_config_json.empty()) {
    ASSIGN_OR_RETURN(json cfg, ParseJson(tokenizer_config_json, "tokenizer_config.json"));
    ASSIGN_OR_RETURN(cfg_bos, ConfigToken(cfg, "bos_token", *m));
    ASSIGN_OR_RETURN(cfg_eos, ConfigToken(cfg, "eos_token", *m));
    // LlamaTokenizerFast & co. rebuild the post-processor from these two flags when they are given.
    const json* add_bos = Find(cfg, "add_bos_token");
    const json* add_eos = Find(cfg, "add_eos_token");
    if ((add_bos != nullptr && !add_bos->is_boolean()) ||
        (add_eos != nullptr && !add_eos->is_boolean())) {
      return absl::InvalidArgumentError(
          "tokenizer_config.json: add_bos_token / add_eos_token must be booleans");
    }
    if (add_bos != nullptr || add_eos != nullptr) {
      m->prefix.clear();
      m->suffix.clear();
      if (add_bos != nullptr && add_bos->get<bool>() && cfg_bos >= 0) m->prefix.push_back(cfg_bos);
      if (add_eos != nullptr && add_eos->get<bool>() && cfg_eos >= 0) m->suffix.push_back(cfg_eos);
    }
  }
  if (!generation_config_json.empty()) {
    ASSIGN_OR_RETURN(json gen, ParseJson(generation_config_json, "generation_config.json"));
    if (const json* b = Find(gen, "bos_token_id")) {
      ASSIGN_OR_RETURN(gen_bos, GetId(*b, "generation_config.json bos_token_id"));
      RETURN_IF_ERROR(check(gen_bos, "generation_config.json bos_token_id"));
    }
    if (const json* e = Find(gen, "eos_token_id")) {
      for (const json& x : e->is_array() ? *e : json::array({*e})) {
        ASSIGN_OR_RETURN(int32_t id, GetId(x, "generation_config.json eos_token_id"));
        RETURN_IF_ERROR(check(id, "generation_config.json eos_token_id"));
        gen_eos.push_back(id);
      }
    }
  }
  m->bos = gen_bos >= 0   ? gen_bos
           : cfg_bos >= 0 ? cfg_bos
                          : (m->prefix.empty() ? -1 : m->prefix.front());
  if (m->bos < 0) {
    for (const char* name : {"<|begin_of_text|>", "<s>", "<bos>"}) {
      auto it = m->token_to_id.find(name);
      if (it != m->token_to_id.end() && m->id_kind[it->second] == internal::kSpecial) {
        m->bos = it->second;
        break;
      }
    }
  }
  if (!gen_eos.empty()) {
    m->eos = gen_eos;
  } else if (cfg_eos >= 0) {
    m->eos = {cfg_eos};
  } else {
    for (const char* name :
         {"<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>", "</s>", "<eos>"}) {
      auto it = m->token_to_id.find(name);
      if (it != m->token_to_id.end() && m->id_kind[it->second] == internal::kSpecial)
        m->eos.push_back(it->second);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TokenizerModel>> ParseAll(absl::string_view tokenizer_json,
                                                         absl::string_view tokenizer_config_json,
                                                         absl::string_view generation_config_json) {
  ASSIGN_OR_RETURN(json j, ParseJson(tokenizer_json, "tokenizer.json"));
  auto m = std::make_unique<TokenizerModel>();
  static const json kNull;
  auto field = [&](const char* key) -> const json& { return j.contains(key) ? j[key] : kNull; };
  if (!j.contains("model")) return Invalid("'model' is missing");
  RETURN_IF_ERROR(ParseNormalizer(field("normalizer"), m.get()));
  RETURN_IF_ERROR(ParsePreTokenizer(field("pre_tokenizer"), m.get()));
  const int byte_levels = static_cast<int>(std::count_if(
      m->stages.begin(), m->stages.end(), [](const auto& s) { return s.byte_level; }));
  if (byte_levels != 1) {
    return Invalid(
        "the pre_tokenizer must contain exactly one ByteLevel (only byte-level BPE is supported)");
  }
  RETURN_IF_ERROR(ParseDecoder(field("decoder")));
  RETURN_IF_ERROR(ParseModel(j["model"], m.get()));
  RETURN_IF_ERROR(ParseAddedTokens(field("added_tokens"), m.get()));
  RETURN_IF_ERROR(ParsePostProcessor(field("post_processor"), m.get()));

  m->id_bytes.resize(m->id_token.size());
  for (size_t id = 0; id < m->id_token.size(); ++id) {
    if (m->id_kind[id] == internal::kNone) continue;
    const std::string& t = m->id_token[id];
    m->token_to_id.emplace(t, static_cast<int32_t>(id));
    // The ByteLevel decoder: a token whose every character is a byte-level character becomes those
    // bytes; any other (an added token such as "<|eot_id|>" with a space in it) stays as it is.
    if (!TokenToBytes(t, &m->id_bytes[id])) m->id_bytes[id] = t;
  }
  // Added tokens win the spelling -> id lookup over vocab entries of the same spelling.
  for (const AddedMatcher* am : {&m->added_raw, &m->added_normalized}) {
    for (const AddedToken& t : am->tokens) m->token_to_id[t.content] = t.id;
  }
  for (int32_t id : m->prefix) {
    if (static_cast<size_t>(id) >= m->id_token.size() || m->id_kind[id] == internal::kNone) {
      return Invalid(absl::StrCat("post_processor adds id ", id, ", which names no token"));
    }
  }
  for (int32_t id : m->suffix) {
    if (static_cast<size_t>(id) >= m->id_token.size() || m->id_kind[id] == internal::kNone) {
      return Invalid(absl::StrCat("post_processor adds id ", id, ", which names no token"));
    }
  }
  RETURN_IF_ERROR(ParseConfigs(tokenizer_config_json, generation_config_json, m.get()));
  return m;
}

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path.string()));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path.string()));
  return ss.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<internal::TokenizerModel> model) : model_(std::move(model)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Parse(
    absl::string_view tokenizer_json, absl::string_view tokenizer_config_json,
    absl::string_view generation_config_json) {
  absl::StatusOr<std::unique_ptr<TokenizerModel>> m;
  try {
    m = ParseAll(tokenizer_json, tokenizer_config_json, generation_config_json);
  } catch (const std::exception& e) {  // a JSON type mismatch the checks above did not anticipate
    return absl::InvalidArgumentError(absl::StrCat("tokenizer files: ", e.what()));
  }
  if (!m.ok()) return m.status();
  return std::unique_ptr<Tokenizer>(new Tokenizer(*std::move(m)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path file = path;
  if (fs::is_directory(file, ec)) file /= "tokenizer.json";
  if (!fs::exists(file, ec))
    return absl::NotFoundError(absl::StrCat(file.string(), " does not exist"));
  ASSIGN_OR_RETURN(std::string tok, ReadFile(file));
  std::string cfg, gen;
  const fs::path dir = file.parent_path();
  if (fs::exists(dir / "tokenizer_config.json", ec)) {
    ASSIGN_OR_RETURN(cfg, ReadFile(dir / "tokenizer_config.json"));
  }
  if (fs::exists(dir / "generation_config.json", ec)) {
    ASSIGN_OR_RETURN(gen, ReadFile(dir / "generation_config.json"));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Parse(tok, cfg, gen);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat(file.string(), ": ", t.status().message()));
  }
  return t;
}

void Tokenizer::EncodeWord(absl::string_view word, std::vector<int32_t>* ids) const {
  const TokenizerModel& m = *model_;
  if (m.ignore_merges) {
    auto it = m.bytes_to_id.find(word);
    if (it != m.bytes_to_id.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  if (word.size() == 1 && m.byte_id[static_cast<uint8_t>(word[0])] >= 0) {
    ids->push_back(m.byte_id[static_cast<uint8_t>(word[0])]);
    return;
  }
  const bool cacheable = word.size() <= kMaxCachedWord;
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }

  // BPE as `tokenizers` does it (Word::merge_all): a linked list of symbols and a heap of candidate
  // merges ordered by (rank, position); a popped candidate is applied only if its pair still
  // exists.
  struct Symbol {
    int32_t id;  // -1: merged into its left neighbour
    int prev, next;
  };
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  for (char ch : word) {
    int32_t id = m.byte_id[static_cast<uint8_t>(ch)];
    if (id < 0) {
      if (m.unk_id < 0) continue;  // no unk token: the byte is dropped, as `tokenizers` drops it
      if (m.fuse_unk && !sym.empty() && sym.back().id == m.unk_id) continue;
      id = m.unk_id;
    }
    const int n = static_cast<int>(sym.size());
    sym.push_back({id, n - 1, -1});
    if (n > 0) sym[n - 1].next = n;
  }
  auto pair = [&](int32_t a, int32_t b) -> const internal::MergeValue* {
    auto it = m.merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) |
                            static_cast<uint32_t>(b));
    return it == m.merges.end() ? nullptr : &it->second;
  };
  std::vector<Candidate> heap;
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) {
    if (const auto* v = pair(sym[i].id, sym[i + 1].id)) heap.push_back({v->rank, i, v->id});
  }
  std::make_heap(heap.begin(), heap.end(), std::greater<>());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& s = sym[c.pos];
    if (s.id < 0 || s.next < 0) continue;
    const int r = s.next;
    const auto* v = pair(s.id, sym[r].id);
    if (v == nullptr || v->id != c.id) continue;
    s.id = c.id;
    s.next = sym[r].next;
    sym[r].id = -1;
    if (s.next >= 0) sym[s.next].prev = c.pos;
    if (s.prev >= 0) {
      if (const auto* p = pair(sym[s.prev].id, s.id)) {
        heap.push_back({p->rank, s.prev, p->id});
        std::push_heap(heap.begin(), heap.end(), std::greater<>());
      }
    }
    if (s.next >= 0) {
      if (const auto* n = pair(s.id, sym[s.next].id)) {
        heap.push_back({n->rank, c.pos, n->id});
        std::push_heap(heap.begin(), heap.end(), std::greater<>());
      }
    }
  }
  const size_t first = ids->size();
  for (int i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) ids->push_back(sym[i].id);
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    if (cache_.size() < kMaxCacheEntries) {
      cache_.emplace(std::string(word), std::vector<int32_t>(ids->begin() + first, ids->end()));
    }
  }
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view text, bool add_special) const {
  const TokenizerModel& m = *model_;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 8);
  if (add_special) ids = m.prefix;
  std::vector<CodePoint> scratch;
  std::vector<absl::string_view> pieces, next;
  std::deque<std::string> owned;  // pieces that ByteLevel's add_prefix_space rewrote

  auto pre_tokenize = [&](absl::string_view segment) {
    pieces.assign(1, segment);
    for (const internal::PreTokenizerStage& st : m.stages) {
      next.clear();
      for (absl::string_view p : pieces) {
        if (st.byte_level && st.add_prefix_space && p[0] != ' ') {
          owned.push_back(absl::StrCat(" ", p));
          p = owned.back();
        }
        if (!st.byte_level || st.use_regex) {
          SplitWords(st.byte_level ? SplitPattern::kGpt2 : st.pattern, p, &scratch, &next);
        } else {
          next.push_back(p);
        }
      }
      pieces.swap(next);
    }
    for (absl::string_view w : pieces) EncodeWord(w, &ids);
    owned.clear();
  };
  auto on_token = [&](int32_t id) { ids.push_back(id); };
  SplitAdded(
      m.added_raw, text,
      [&](absl::string_view raw) {
        if (!m.nfc) {
          SplitAdded(m.added_normalized, raw, pre_tokenize, on_token);
        } else {
          const std::string normalized = internal::NormalizeNfc(raw);
          SplitAdded(m.added_normalized, normalized, pre_tokenize, on_token);
        }
      },
      on_token);
  if (add_special) ids.insert(ids.end(), m.suffix.begin(), m.suffix.end());
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special) const {
  const TokenizerModel& m = *model_;
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || static_cast<size_t>(id) >= m.id_token.size() ||
        m.id_kind[id] == internal::kNone) {
      return absl::InvalidArgumentError(absl::StrCat("Decode: ids[", i, "] = ", id,
                                                     " is not a token id (vocab size ",
                                                     m.id_token.size(), ")"));
    }
    if (skip_special && m.id_kind[id] == internal::kSpecial) continue;
    bytes += m.id_bytes[id];
  }
  return internal::Utf8Lossy(bytes);
}

int Tokenizer::vocab_size() const { return static_cast<int>(model_->id_token.size()); }

std::string Tokenizer::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= model_->id_token.size()) return "";
  return model_->id_token[id];
}

int32_t Tokenizer::TokenToId(absl::string_view token) const {
  auto it = model_->token_to_id.find(token);
  return it == model_->token_to_id.end() ? -1 : it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < model_->id_kind.size() &&
         model_->id_kind[id] == internal::kSpecial;
}

int32_t Tokenizer::bos_id() const { return model_->bos; }
const std::vector<int32_t>& Tokenizer::eos_ids() const { return model_->eos; }
bool Tokenizer::adds_bos() const {
  return model_->bos >= 0 && !model_->prefix.empty() && model_->prefix[0] == model_->bos;
}

}  // namespace kvrecall::worker
