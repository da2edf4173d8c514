// A Hugging Face tokenizer.json byte-level BPE tokenizer (GPT-2, Llama-3, Qwen2, Mistral-Nemo
// style): encode text to token ids and decode ids back to text, matching `tokenizers` id for id.
//
// Supported tokenizer.json features (anything else is refused by Load/Parse with INVALID_ARGUMENT
// naming the feature):
//   model          type "BPE", vocab + merges (both the "a b" string and the ["a", "b"] array
//   form),
//                  ignore_merges, unk_token / fuse_unk; no dropout, byte_fallback or subword
//                  affixes.
//   normalizer     null, NFC, or a Sequence of those.
//   pre_tokenizer  ByteLevel (use_regex = the GPT-2 pattern, add_prefix_space), or a Sequence of
//                  Split pre-tokenizers (behavior Isolated) and one ByteLevel, where each Split's
//                  Regex is one of the patterns GPT-2, Llama-3 or Qwen2 ship. The patterns are
//                  implemented by hand over code points; an unknown pattern is refused.
//   added_tokens   matched before pre-tokenization, leftmost-longest, with lstrip/rstrip; those
//                  marked "normalized" are matched after normalization. single_word is refused.
//   post_processor null, ByteLevel, TemplateProcessing (its "single" template),
//   Roberta/BertProcessing,
//                  or a Sequence of those: what Encode(..., add_special=true) adds around the text.
//   decoder        ByteLevel (or null), and Decode turns invalid UTF-8 into U+FFFD as `tokenizers`
//   does.
//
// Thread safety: a loaded Tokenizer is immutable except for an internal, mutex-guarded word cache;
// every method may be called concurrently.
#ifndef KVRECALL_GPU_WORKER_MODEL_TOKENIZER_H_
#define KVRECALL_GPU_WORKER_MODEL_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace kvrecall::worker {

namespace internal {
struct TokenizerModel;  // the parsed tokenizer (tokenizer.cc)
}  // namespace internal

class Tokenizer {
 public:
  // Loads `path`: a tokenizer.json file, or a directory holding one. tokenizer_config.json and
  // generation_config.json beside it, when present, supply bos/eos and add_bos_token/add_eos_token.
  // NOT_FOUND when tokenizer.json does not exist; DATA_LOSS when a file is not valid JSON (corrupt
  // or truncated); INVALID_ARGUMENT when its content is inconsistent (a merge naming a token that
  // is not in the vocab, duplicate ids, ...) or uses a feature this class does not support.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);

  // As Load, from file contents; the two config texts may be empty (absent).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Parse(
      absl::string_view tokenizer_json, absl::string_view tokenizer_config_json = "",
      absl::string_view generation_config_json = "");

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text` (any bytes: ill-formed UTF-8 is tokenized byte by byte and never fails).
  // `add_special`: add what the post-processor (or tokenizer_config's add_bos_token/add_eos_token,
  // which override it) puts around a single sequence, e.g. Llama-3's <|begin_of_text|>.
  std::vector<int32_t> Encode(absl::string_view text, bool add_special) const;

  // The text of `ids`, as `tokenizers`' decode(ids, skip_special_tokens) gives it: byte-level
  // tokens become their bytes, and ill-formed UTF-8 in the result (e.g. a multi-byte character
  // cut between tokens) becomes U+FFFD. INVALID_ARGUMENT when an id is outside [0, vocab_size())
  // or names no token.
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids, bool skip_special) const;

  // One more than the largest token id (vocab and added tokens).
  int vocab_size() const;
  // The token's string as tokenizer.json spells it (byte-level form, e.g. "Ġthe"), or "" if none.
  std::string IdToToken(int32_t id) const;
  // The id of a token string as tokenizer.json spells it, or -1.
  int32_t TokenToId(absl::string_view token) const;
  bool IsSpecial(int32_t id) const;

  // Begin-of-sequence id (generation_config's bos_token_id, else tokenizer_config's bos_token, else
  // the first special token of the post-processor's template), or -1 when there is none.
  int32_t bos_id() const;
  // End-of-sequence ids that stop generation (generation_config's eos_token_id, an int or a list,
  // else tokenizer_config's eos_token); may be empty.
  const std::vector<int32_t>& eos_ids() const;
  // Whether Encode(..., add_special=true) starts with bos_id().
  bool adds_bos() const;

 private:
  explicit Tokenizer(std::unique_ptr<internal::TokenizerModel> model);
  // BPE of one pre-tokenized word (raw bytes), appended to *ids; uses and fills the cache.
  void EncodeWord(absl::string_view word, std::vector<int32_t>* ids) const;

  std::unique_ptr<internal::TokenizerModel> model_;
  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_MODEL_TOKENIZER_H_
