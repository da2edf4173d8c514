// The little Unicode a byte-level BPE tokenizer needs: lenient UTF-8 decoding, the character
// classes of the GPT-2 / Llama-3 / Qwen2 pre-tokenizer patterns (\p{L}, \p{N}, \s) and NFC
// normalization. Tables come from Python's unicodedata (kUnicodeDataVersion); code points assigned
// after that version classify as neither letter nor number.
//
// Thread safety: every function is pure.
#ifndef KVRECALL_GPU_WORKER_MODEL_INTERNAL_UNICODE_H_
#define KVRECALL_GPU_WORKER_MODEL_INTERNAL_UNICODE_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace kvrecall::worker::internal {

// Returned by DecodeUtf8 for a byte that does not start a well-formed UTF-8 sequence.
inline constexpr char32_t kInvalidCodePoint = 0xFFFFFFFF;

// Decodes the code point at text[pos]. Returns it and sets *len to its byte length; for ill-formed
// input (stray continuation byte, overlong form, surrogate, > U+10FFFF, truncated sequence) returns
// kInvalidCodePoint with *len = 1, so that every byte of any input is consumed exactly once.
// REQUIRES: pos < text.size().
char32_t DecodeUtf8(absl::string_view text, size_t pos, int* len);
void AppendUtf8(char32_t cp, std::string* out);

// \p{L} (general category L*) and \p{N} (N*).
bool IsLetter(char32_t cp);
bool IsNumber(char32_t cp);
// \s as Oniguruma and Rust's char::is_whitespace read it: the White_Space property.
bool IsWhitespace(char32_t cp);

// Canonical combining class (0 for starters and unknown code points).
int CombiningClass(char32_t cp);

// Unicode Normalization Form C of `text`. Ill-formed UTF-8 bytes are copied through unchanged and
// act as starters that nothing composes with. ASCII input is returned without work.
std::string NormalizeNfc(absl::string_view text);

// Replaces each maximal ill-formed subsequence with U+FFFD, as Rust's String::from_utf8_lossy
// (and the Unicode "substitution of maximal subparts" practice) does.
std::string Utf8Lossy(absl::string_view bytes);

}  // namespace kvrecall::worker::internal

#endif  // KVRECALL_GPU_WORKER_MODEL_INTERNAL_UNICODE_H_
