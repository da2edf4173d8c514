#include "gpu-worker/model/internal/unicode.h"

#include <string>

#include "gtest/gtest.h"

namespace kvrecall::worker::internal {
namespace {

std::string U8(std::u32string s) {
  std::string out;
  for (char32_t c : s) AppendUtf8(c, &out);
  return out;
}

TEST(UnicodeTest, Classes) {
  for (char32_t c : {U'a', U'Z', U'é', U'ß', U'Ж', U'日', U'한', U'ـ', U'ſ'})
    EXPECT_TRUE(IsLetter(c)) << int(c);
  for (char32_t c : {U'0', U'9', U'٣', U'४', U'Ⅻ', U'½', U'²', U'①'})
    EXPECT_TRUE(IsNumber(c)) << int(c);
  // Combining marks (Mn/Mc), punctuation, symbols and emoji are neither.
  for (char32_t c :
       {U'\u0301', U'\u093f', U'_', U'\'', U'€', U'😀', U'\u200d', char32_t{0x10FFFF}}) {
    EXPECT_FALSE(IsLetter(c)) << int(c);
    EXPECT_FALSE(IsNumber(c)) << int(c);
  }
  for (char32_t c :
       {U' ', U'\t', U'\n', U'\v', U'\f', U'\r', U'\u0085', U'\u00a0', U'\u2003', U'\u3000'}) {
    EXPECT_TRUE(IsWhitespace(c)) << int(c);
  }
  for (char32_t c : {U'\x1c', U'\x1f', U'\u200b', U'a', U'\u180e'})
    EXPECT_FALSE(IsWhitespace(c)) << int(c);
}

TEST(UnicodeTest, DecodeUtf8RejectsIllFormedSequences) {
  int len = 0;
  EXPECT_EQ(DecodeUtf8("\xE2\x82\xAC", 0, &len), U'€');
  EXPECT_EQ(len, 3);
  EXPECT_EQ(DecodeUtf8("\xF0\x9F\x98\x80", 0, &len), U'😀');
  EXPECT_EQ(len, 4);
  for (const char* bad : {"\x80", "\xC1\x81", "\xE0\x80\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80",
                          "\xE2\x82", "\xF8\x88\x80\x80\x80", "\xFF"}) {
    EXPECT_EQ(DecodeUtf8(bad, 0, &len), kInvalidCodePoint) << bad;
    EXPECT_EQ(len, 1);
  }
}

TEST(UnicodeTest, LossyReplacesMaximalSubparts) {
  EXPECT_EQ(Utf8Lossy("plain é 日"), "plain é 日");
  EXPECT_EQ(Utf8Lossy("a\x80z"), "a\uFFFDz");
  EXPECT_EQ(Utf8Lossy("\xE2\x82"), "\uFFFD");  // one truncated sequence: one U+FFFD
  EXPECT_EQ(Utf8Lossy("\xF0\x9F\x98z"), "\uFFFDz");
  EXPECT_EQ(Utf8Lossy("\xC0\xAF"), "\uFFFD\uFFFD");            // overlong: each byte
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"), "\uFFFD\uFFFD\uFFFD");  // surrogate
  EXPECT_EQ(Utf8Lossy("\xE2\x82\xE2\x82\xAC"), "\uFFFD€");
}

TEST(UnicodeTest, Nfc) {
  // Expected values from Python's unicodedata.normalize("NFC", ...).
  EXPECT_EQ(NormalizeNfc("plain ascii"), "plain ascii");
  EXPECT_EQ(NormalizeNfc(U8(U"e\u0301")), U8(U"\u00e9"));
  EXPECT_EQ(NormalizeNfc(U8(U"a\u0301\u0323")), U8(U"\u1ea1\u0301"));  // reordered, then composed
  EXPECT_EQ(NormalizeNfc(U8(U"\u212b")), U8(U"\u00c5"));               // singleton
  EXPECT_EQ(NormalizeNfc(U8(U"\u0958")), U8(U"\u0915\u093c"));         // composition exclusion
  EXPECT_EQ(NormalizeNfc(U8(U"\u1100\u1161\u11a8")), U8(U"\uac01"));   // Hangul LV + T
  EXPECT_EQ(NormalizeNfc(U8(U"e\u0301\u0302")), U8(U"\u00e9\u0302"));  // blocked by the same class
  EXPECT_EQ(NormalizeNfc(U8(U"\u1f00\u0345")), U8(U"\u1f80"));
  EXPECT_EQ(NormalizeNfc(U8(U"\u0344")), U8(U"\u0308\u0301"));
  EXPECT_EQ(NormalizeNfc(U8(U"a\u0308\u0304")), U8(U"\u01df"));
  EXPECT_EQ(NormalizeNfc(U8(U"\u00c5\u0301")), U8(U"\u01fa"));
  EXPECT_EQ(NormalizeNfc(U8(U"\u0301a")), U8(U"\u0301a"));
  // Ill-formed bytes pass through and block composition across them.
  EXPECT_EQ(NormalizeNfc("e\xFF\xCC\x81"), "e\xFF\xCC\x81");
  EXPECT_EQ(NormalizeNfc("\xE2\x82 e\xCC\x81"), "\xE2\x82 \xC3\xA9");
}

}  // namespace
}  // namespace kvrecall::worker::internal
