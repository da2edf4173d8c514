#include "gpu-worker/model/internal/unicode.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gpu-worker/model/internal/unicode_data.h"

namespace kvrecall::worker::internal {
namespace {

// Hangul syllable composition (Unicode §3.12), done arithmetically rather than by table.
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
              kSCount = kLCount * kNCount;

// Code points at or above this mark carry an ill-formed byte (value - kByteMark) through NFC.
constexpr char32_t kByteMark = 0x200000;

// Length of the longest prefix of text[pos..] that is a prefix of a well-formed UTF-8 sequence
// (Unicode Table 3-7), and in *need the length of the full sequence that its first byte starts
// (0 when the first byte starts none).
int WellFormedPrefix(absl::string_view text, size_t pos, int* need) {
  const auto b0 = static_cast<uint8_t>(text[pos]);
  uint8_t lo = 0x80, hi = 0xBF;
  if (b0 < 0x80) {
    *need = 1;
    return 1;
  } else if (b0 >= 0xC2 && b0 <= 0xDF) {
    *need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    *need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    *need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *need = 0;
    return 1;
  }
  int n = 1;
  while (n < *need && pos + n < text.size()) {
    const auto b = static_cast<uint8_t>(text[pos + n]);
    if (b < lo || b > hi) break;
    lo = 0x80;
    hi = 0xBF;
    ++n;
  }
  return n;
}

bool InRanges(const CodePointRange* r, int n, char32_t cp) {
  const CodePointRange* end = r + n;
  const CodePointRange* it =
      std::upper_bound(r, end, cp, [](char32_t c, const CodePointRange& x) { return c < x.lo; });
  return it != r && cp <= (it - 1)->hi;
}

void Decompose(char32_t cp, std::vector<char32_t>* out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const int s = static_cast<int>(cp - kSBase);
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  const DecompEntry* end = kDecompIndex + kDecompIndexSize;
  const DecompEntry* it = std::lower_bound(
      kDecompIndex, end, cp, [](const DecompEntry& e, char32_t c) { return e.cp < c; });
  if (it != end && it->cp == cp) {
    out->insert(out->end(), kDecompData + it->offset, kDecompData + it->offset + it->length);
  } else {
    out->push_back(cp);
  }
}

// The primary composite of (a, b), or 0.
char32_t Compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    return a + (b - kTBase);
  }
  const Composition* end = kCompositions + kCompositionsSize;
  const Composition* it =
      std::lower_bound(kCompositions, end, std::make_pair(a, b),
                       [](const Composition& c, const std::pair<char32_t, char32_t>& k) {
                         return c.first != k.first ? c.first < k.first : c.second < k.second;
                       });
  return (it != end && it->first == a && it->second == b) ? it->composite : 0;
}

}  // namespace

char32_t DecodeUtf8(absl::string_view text, size_t pos, int* len) {
  int need = 0;
  const int n = WellFormedPrefix(text, pos, &need);
  if (n != need) {
    *len = 1;
    return kInvalidCodePoint;
  }
  *len = n;
  const auto* p = reinterpret_cast<const uint8_t*>(text.data() + pos);
  switch (n) {
    case 1:
      return p[0];
    case 2:
      return (char32_t{p[0] & 0x1Fu} << 6) | (p[1] & 0x3Fu);
    case 3:
      return (char32_t{p[0] & 0x0Fu} << 12) | (char32_t{p[1] & 0x3Fu} << 6) | (p[2] & 0x3Fu);
    default:
      return (char32_t{p[0] & 0x07u} << 18) | (char32_t{p[1] & 0x3Fu} << 12) |
             (char32_t{p[2] & 0x3Fu} << 6) | (p[3] & 0x3Fu);
  }
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsLetter(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return InRanges(kLetterRanges, kLetterRangesSize, cp);
}

bool IsNumber(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return InRanges(kNumberRanges, kNumberRangesSize, cp);
}

bool IsWhitespace(char32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  switch (cp) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

int CombiningClass(char32_t cp) {
  if (cp < 0x300) return 0;
  const CccRange* end = kCccRanges + kCccRangesSize;
  const CccRange* it =
      std::upper_bound(kCccRanges, end, cp, [](char32_t c, const CccRange& r) { return c < r.lo; });
  return (it != kCccRanges && cp <= (it - 1)->hi) ? (it - 1)->ccc : 0;
}

std::string NormalizeNfc(absl::string_view text) {
  // ASCII is already NFC: no ASCII character decomposes, has a non-zero combining class or
  // composes with another.
  if (std::all_of(text.begin(), text.end(),
                  [](char c) { return static_cast<uint8_t>(c) < 0x80; })) {
    return std::string(text);
  }
  // 1. Full canonical decomposition.
  std::vector<char32_t> d;
  d.reserve(text.size() + 8);
  for (size_t pos = 0; pos < text.size();) {
    int len = 0;
    const char32_t cp = DecodeUtf8(text, pos, &len);
    if (cp == kInvalidCodePoint) {
      d.push_back(kByteMark + static_cast<uint8_t>(text[pos]));
    } else {
      Decompose(cp, &d);
    }
    pos += len;
  }
  auto ccc = [](char32_t cp) { return cp >= kByteMark ? 0 : CombiningClass(cp); };
  // 2. Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (ccc(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && ccc(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [&](char32_t a, char32_t b) { return ccc(a) < ccc(b); });
    i = j;
  }
  // 3. Canonical composition.
  size_t out = 0;
  ptrdiff_t starter = -1;
  int last_class = -1;
  for (size_t i = 0; i < d.size(); ++i) {
    const char32_t c = d[i];
    const int cc = ccc(c);
    if (starter >= 0 && c < kByteMark && d[starter] < kByteMark &&
        (last_class < cc || last_class == 0)) {
      // last_class == 0 means the starter is the previous code point (starter-starter pairs).
      if (const char32_t composite = Compose(d[starter], c); composite != 0) {
        d[starter] = composite;
        continue;
      }
    }
    if (cc == 0) {
      starter = static_cast<ptrdiff_t>(out);
      last_class = 0;
    } else {
      last_class = cc;
    }
    d[out++] = c;
  }
  d.resize(out);
  std::string s;
  s.reserve(text.size());
  for (char32_t c : d) {
    if (c >= kByteMark) {
      s.push_back(static_cast<char>(c - kByteMark));
    } else {
      AppendUtf8(c, &s);
    }
  }
  return s;
}

std::string Utf8Lossy(absl::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t pos = 0; pos < bytes.size();) {
    int need = 0;
    const int n = WellFormedPrefix(bytes, pos, &need);
    if (n == need) {
      out.append(bytes.data() + pos, n);
    } else {
      out.append("\xEF\xBF\xBD");
    }
    pos += n;
  }
  return out;
}

}  // namespace kvrecall::worker::internal
