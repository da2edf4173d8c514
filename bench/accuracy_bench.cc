#include "bench/accuracy_bench.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <tuple>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/flag_map.h"
#include "client/tier.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/backend.h"
#include "gpu-worker/engine/engine.h"
#include "gpu-worker/model/tokenizer.h"
#include "indexer/index.h"
#include "zlib.h"

namespace kvrecall::bench {
namespace {

using worker::Engine;
using worker::EngineOptions;
using worker::PromptKV;
using worker::Tokenizer;

// ---- flags ----

template <typename T>
absl::Status ParseList(FlagMap& f, const std::string& name, std::vector<T>* out) {
  std::string s;
  RETURN_IF_ERROR(f.Get(name, &s));
  if (s.empty()) return absl::OkStatus();
  out->clear();
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    if constexpr (std::is_same_v<T, std::string>) {
      out->emplace_back(part);
    } else {
      T v;
      bool ok;
      if constexpr (std::is_floating_point_v<T>) {
        ok = absl::SimpleAtod(part, &v);
      } else {
        ok = absl::SimpleAtoi(part, &v);
      }
      if (!ok)
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, ": '", part, "' is not a number"));
      out->push_back(v);
    }
  }
  if (out->empty()) return absl::InvalidArgumentError(absl::StrCat("--", name, " is empty"));
  return absl::OkStatus();
}

// ---- tasks (tools/reference-model/tasks.py, in token space) ----

struct Sample {
  std::vector<int32_t> prompt;  // bos .. the token before the answer
  std::vector<int32_t> answer;  // the tokens greedy decoding must reproduce
  double depth = 0;             // where the asked fact sits (fraction of the context)
  std::string fact;             // the answer as text (for messages)
};

class TaskGen {
 public:
  static absl::StatusOr<std::unique_ptr<TaskGen>> Create(const Tokenizer* tok,
                                                         const std::string& haystack_path,
                                                         uint64_t seed) {
    auto g = std::unique_ptr<TaskGen>(new TaskGen(tok, seed));
    g->bos_ = tok->TokenToId("<|bos|>");
    g->eos_ = tok->TokenToId("<|eos|>");
    if (g->bos_ < 0 || g->eos_ < 0) {
      return absl::FailedPreconditionError(
          "tokenizer.json has no <|bos|> / <|eos|> (not the reference model's)");
    }
    const std::vector<int32_t> sp = g->Enc(" 12345");
    if (sp.size() != 6) return absl::FailedPreconditionError("tokenizer must keep digits unmerged");
    std::ifstream in(haystack_path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read haystack ", haystack_path));
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    // Documents joined by <|eos|>, as modeling.load_corpus joins the held-out documents.
    for (absl::string_view doc : absl::StrSplit(text, '\x1e')) {
      const std::vector<int32_t> ids = tok->Encode(doc, /*add_special=*/false);
      g->corpus_.insert(g->corpus_.end(), ids.begin(), ids.end());
      g->corpus_.push_back(g->eos_);
    }
    if (g->corpus_.size() < 40000) {
      return absl::FailedPreconditionError(
          absl::StrCat("haystack has only ", g->corpus_.size(), " tokens"));
    }
    // Keys: 3 lowercase letters. Dense-recall keys are those whose " key" has the modal length.
    std::map<size_t, int> lens;
    std::vector<std::vector<int32_t>> encs;
    for (char a = 'a'; a <= 'z'; ++a) {
      for (char b = 'a'; b <= 'z'; ++b) {
        for (char c = 'a'; c <= 'z'; ++c) {
          g->key_pool_.push_back(std::string{a, b, c});
          encs.push_back(g->Enc(" " + g->key_pool_.back()));
          lens[encs.back().size()]++;
        }
      }
    }
    size_t modal = 0;
    for (auto [len, n] : lens) {
      if (modal == 0 || n > lens[modal]) modal = len;
    }
    for (auto& e : encs) {
      if (e.size() == modal) g->ar_keys_.push_back(e);
    }
    return g;
  }

  size_t corpus_tokens() const { return corpus_.size(); }

  absl::StatusOr<Sample> Make(const std::string& task, int L, double depth) {
    for (int attempt = 0; attempt < 8; ++attempt) {
      std::optional<Sample> s;
      if (task == "passkey") {
        s = Passkey(L, depth);
      } else if (task == "multikey") {
        s = Multikey(L, depth);
      } else if (task == "ar") {
        s = Ar(L, depth);
      } else {
        return absl::InvalidArgumentError(absl::StrCat("unknown task '", task, "'"));
      }
      if (s) return *s;
    }
    return absl::InvalidArgumentError(absl::StrCat("cannot build ", task, " at context ", L));
  }

 private:
  TaskGen(const Tokenizer* tok, uint64_t seed) : tok_(tok), rng_(seed) {}

  std::vector<int32_t> Enc(const std::string& s) const {
    return tok_->Encode(s, /*add_special=*/false);
  }
  int64_t Int(int64_t lo, int64_t hi) {  // [lo, hi)
    return std::uniform_int_distribution<int64_t>(lo, hi - 1)(rng_);
  }
  double Uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }
  std::string Number(int ndigits) {
    std::string s(1, static_cast<char>('0' + Int(1, 10)));
    for (int i = 1; i < ndigits; ++i) s += static_cast<char>('0' + Int(0, 10));
    return s;
  }
  std::vector<int32_t> Haystack(int64_t n) {
    const int64_t start = Int(0, static_cast<int64_t>(corpus_.size()) - n - 1);
    return {corpus_.begin() + start, corpus_.begin() + start + n};
  }

  // tasks.py _assemble: bos + haystack with needles at depths (sorted) + tail. The tail is
  // question, answer, closing tokens; the sample is L + 1 tokens. nullopt when it does not fit.
  std::optional<Sample> Assemble(int L, const std::vector<std::vector<int32_t>>& needles,
                                 const std::vector<double>& depths,
                                 const std::vector<int32_t>& question,
                                 const std::vector<int32_t>& answer,
                                 const std::vector<int32_t>& closing) {
    int64_t fixed = 1 + static_cast<int64_t>(question.size() + answer.size() + closing.size());
    for (const auto& n : needles) fixed += static_cast<int64_t>(n.size());
    const int64_t n_hay = L + 1 - fixed;
    if (n_hay < 16) return std::nullopt;
    const std::vector<int32_t> hay = Haystack(n_hay);
    Sample s;
    s.prompt.push_back(bos_);
    int64_t prev = 0;
    for (size_t i = 0; i < needles.size(); ++i) {
      const int64_t cut = std::llround(depths[i] * static_cast<double>(n_hay));
      s.prompt.insert(s.prompt.end(), hay.begin() + prev, hay.begin() + cut);
      s.prompt.insert(s.prompt.end(), needles[i].begin(), needles[i].end());
      prev = cut;
    }
    s.prompt.insert(s.prompt.end(), hay.begin() + prev, hay.end());
    s.prompt.insert(s.prompt.end(), question.begin(), question.end());
    s.answer = answer;
    if (s.prompt.size() + answer.size() + closing.size() != static_cast<size_t>(L) + 1)
      return std::nullopt;
    return s;
  }

  std::optional<Sample> Passkey(int L, double depth) {
    const std::string key = Number(5);
    const auto needle =
        Enc(absl::StrCat(" The pass key is ", key, ". Remember it. ", key, " is the pass key."));
    const auto q = Enc("\nWhat is the pass key? The pass key is");
    std::vector<int32_t> closing = Enc(".");
    closing.push_back(eos_);
    auto s = Assemble(L, {needle}, {depth}, q, Enc(" " + key), closing);
    if (s) {
      s->depth = depth;
      s->fact = key;
    }
    return s;
  }

  std::optional<Sample> Multikey(int L, double depth) {
    const int k = static_cast<int>(Int(2, 9));
    std::vector<int> idx(key_pool_.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
    std::vector<std::tuple<double, std::string, std::string>> needles;  // depth, name, value
    for (int i = 0; i < k; ++i) {
      std::swap(idx[i], idx[i + Int(0, static_cast<int64_t>(idx.size()) - i)]);
      needles.emplace_back(Uniform(), key_pool_[idx[i]], Number(5));
    }
    const int asked = static_cast<int>(Int(0, k));
    std::get<0>(needles[asked]) = depth;
    const std::string name = std::get<1>(needles[asked]), value = std::get<2>(needles[asked]);
    std::stable_sort(needles.begin(), needles.end(),
                     [](const auto& a, const auto& b) { return std::get<0>(a) < std::get<0>(b); });
    std::vector<std::vector<int32_t>> ids;
    std::vector<double> depths;
    for (const auto& [d, n, v] : needles) {
      ids.push_back(Enc(absl::StrCat(" The special magic number for ", n, " is ", v, ".")));
      depths.push_back(d);
    }
    const auto q = Enc(absl::StrCat("\nWhat is the special magic number for ", name,
                                    "? The special magic number for ", name, " is"));
    std::vector<int32_t> closing = Enc(".");
    closing.push_back(eos_);
    auto s = Assemble(L, ids, depths, q, Enc(" " + value), closing);
    if (s) {
      s->depth = depth;
      s->fact = value;
    }
    return s;
  }

  // tasks.py ar(): fixed-length pairs filling most of the context, then queries; here the last
  // query asks for the pair nearest `depth` (no earlier query repeats that pair, so the value can
  // only come from the pair itself); the prompt ends at that query's key, the answer is "=4812".
  std::optional<Sample> Ar(int L, double depth) {
    const int64_t kl = static_cast<int64_t>(ar_keys_[0].size());
    const int64_t pair_len = kl + 6;
    const std::vector<int32_t> qmark = Enc(" ?");
    const int64_t nq = static_cast<int64_t>(qmark.size());
    const int64_t q_len = nq + pair_len;
    const double query_frac = 0.2 + 0.15 * Uniform();
    const int64_t body = L + 1 - 2;
    const int64_t n_q =
        std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(body) * query_frac) / q_len);
    const int64_t n_p =
        std::min<int64_t>((body - n_q * q_len) / pair_len, static_cast<int64_t>(ar_keys_.size()));
    if (n_p < 2) return std::nullopt;
    const int32_t eq = Enc("=")[0], semi = Enc(";")[0];
    std::vector<int> idx(ar_keys_.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
    std::vector<std::vector<int32_t>> pairs(static_cast<size_t>(n_p));
    for (int64_t i = 0; i < n_p; ++i) {
      std::swap(idx[i], idx[i + Int(0, static_cast<int64_t>(idx.size()) - i)]);
      auto& p = pairs[i];
      p = ar_keys_[idx[i]];
      p.push_back(eq);
      for (int j = 0; j < 4; ++j)
        p.push_back(Enc(std::string(1, static_cast<char>('0' + Int(0, 10))))[0]);
      p.push_back(semi);
    }
    const int64_t pad = L + 1 - 2 - n_p * pair_len - n_q * q_len;
    const int64_t target = std::clamp<int64_t>(
        std::llround((depth * L - 1.0 - static_cast<double>(pad)) / static_cast<double>(pair_len)),
        0, n_p - 1);
    Sample s;
    s.prompt.push_back(bos_);
    if (pad > 0) {
      const auto filler = Haystack(pad);
      s.prompt.insert(s.prompt.end(), filler.begin(), filler.end());
    }
    for (const auto& p : pairs) s.prompt.insert(s.prompt.end(), p.begin(), p.end());
    for (int64_t i = 0; i + 1 < n_q; ++i) {
      int64_t w = Int(0, n_p - 1);
      if (w >= target) ++w;
      s.prompt.insert(s.prompt.end(), qmark.begin(), qmark.end());
      s.prompt.insert(s.prompt.end(), pairs[w].begin(), pairs[w].end());
    }
    const auto& p = pairs[target];
    s.prompt.insert(s.prompt.end(), qmark.begin(), qmark.end());
    s.prompt.insert(s.prompt.end(), p.begin(), p.begin() + kl);  // " key"
    s.answer.assign(p.begin() + kl, p.begin() + kl + 5);         // "=4812"
    if (s.prompt.size() + 5 + 1 + 1 != static_cast<size_t>(L) + 1)
      return std::nullopt;  // + ';' + eos
    s.depth = static_cast<double>(1 + pad + target * pair_len) / L;
    for (size_t i = 1; i < s.answer.size(); ++i)
      s.fact += tok_->Decode({&s.answer[i], 1}, false).value_or("?");
    return s;
  }

  const Tokenizer* tok_;
  std::mt19937_64 rng_;
  int32_t bos_ = -1, eos_ = -1;
  std::vector<int32_t> corpus_;
  std::vector<std::string> key_pool_;
  std::vector<std::vector<int32_t>> ar_keys_;
};

// ---- decoding ----

struct Config {
  bool dense = false;
  std::string method;  // "dense" for the dense run
  int budget = 0;
  bool lookahead = false;
  std::string Name() const {
    return dense ? "dense" : absl::StrCat(method, "/", budget, lookahead ? "/la" : "");
  }
};

int Argmax(const float* x, int n) { return static_cast<int>(std::max_element(x, x + n) - x); }

// Greedy: the first answer token is the argmax of the prompt's (dense prefill) logits, every
// further one comes from a decode Step fed the previous one; returns `n` tokens.
absl::StatusOr<std::vector<int32_t>> DecodeGreedy(Engine* engine, const std::string& id,
                                                  const std::vector<float>& prompt_logits, size_t n,
                                                  int vocab) {
  std::vector<int32_t> out = {Argmax(prompt_logits.data(), vocab)};
  std::vector<float> logits;
  while (out.size() < n) {
    RETURN_IF_ERROR(engine->Step({&id, 1}, {&out.back(), 1}, &logits));
    out.push_back(Argmax(logits.data(), vocab));
  }
  return out;
}

// ---- PNG ----

void PutBe32(std::string* s, uint32_t v) {
  for (int i = 3; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void Chunk(std::string* png, const char* type, const std::string& data) {
  PutBe32(png, static_cast<uint32_t>(data.size()));
  const std::string body = std::string(type, 4) + data;
  png->append(body);
  PutBe32(png, static_cast<uint32_t>(
                   crc32(0, reinterpret_cast<const Bytef*>(body.data()), static_cast<uInt>(body.size()))));
}

// rgb: [h][w][3]. INTERNAL if zlib fails.
absl::StatusOr<std::string> EncodePng(int w, int h, const std::vector<uint8_t>& rgb) {
  std::string raw;
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);  // filter: none
    raw.append(reinterpret_cast<const char*>(rgb.data()) + static_cast<size_t>(y) * w * 3,
               static_cast<size_t>(w) * 3);
  }
  uLongf zlen = compressBound(static_cast<uLong>(raw.size()));
  std::string z(zlen, '\0');
  if (compress2(reinterpret_cast<Bytef*>(z.data()), &zlen, reinterpret_cast<const Bytef*>(raw.data()),
                static_cast<uLong>(raw.size()), Z_BEST_COMPRESSION) != Z_OK) {
    return absl::InternalError("zlib could not compress the plot");
  }
  z.resize(zlen);
  std::string png = "\x89PNG\r\n\x1a\n";
  std::string ihdr;
  PutBe32(&ihdr, static_cast<uint32_t>(w));
  PutBe32(&ihdr, static_cast<uint32_t>(h));
  ihdr += std::string{8, 2, 0, 0, 0};  // 8-bit RGB
  Chunk(&png, "IHDR", ihdr);
  Chunk(&png, "IDAT", z);
  Chunk(&png, "IEND", "");
  return png;
}

// A 3x5 pixel font (drawn here; upper case only: text is upper-cased).
const std::map<char, std::array<const char*, 5>>& Font() {
  static const auto* font = new std::map<char, std::array<const char*, 5>>{
      {'0', {"###", "#.#", "#.#", "#.#", "###"}}, {'1', {".#.", "##.", ".#.", ".#.", "###"}},
      {'2', {"###", "..#", "###", "#..", "###"}}, {'3', {"###", "..#", ".##", "..#", "###"}},
      {'4', {"#.#", "#.#", "###", "..#", "..#"}}, {'5', {"###", "#..", "###", "..#", "###"}},
      {'6', {"###", "#..", "###", "#.#", "###"}}, {'7', {"###", "..#", ".#.", ".#.", ".#."}},
      {'8', {"###", "#.#", "###", "#.#", "###"}}, {'9', {"###", "#.#", "###", "..#", "###"}},
      {'A', {".#.", "#.#", "###", "#.#", "#.#"}}, {'B', {"##.", "#.#", "##.", "#.#", "##."}},
      {'C', {".##", "#..", "#..", "#..", ".##"}}, {'D', {"##.", "#.#", "#.#", "#.#", "##."}},
      {'E', {"###", "#..", "##.", "#..", "###"}}, {'F', {"###", "#..", "##.", "#..", "#.."}},
      {'G', {".##", "#..", "#.#", "#.#", ".##"}}, {'H', {"#.#", "#.#", "###", "#.#", "#.#"}},
      {'I', {"###", ".#.", ".#.", ".#.", "###"}}, {'J', {"..#", "..#", "..#", "#.#", ".#."}},
      {'K', {"#.#", "#.#", "##.", "#.#", "#.#"}}, {'L', {"#..", "#..", "#..", "#..", "###"}},
      {'M', {"#.#", "###", "###", "#.#", "#.#"}}, {'N', {"##.", "#.#", "#.#", "#.#", "#.#"}},
      {'O', {".#.", "#.#", "#.#", "#.#", ".#."}}, {'P', {"##.", "#.#", "##.", "#..", "#.."}},
      {'Q', {".#.", "#.#", "#.#", "##.", ".##"}}, {'R', {"##.", "#.#", "##.", "#.#", "#.#"}},
      {'S', {".##", "#..", ".#.", "..#", "##."}}, {'T', {"###", ".#.", ".#.", ".#.", ".#."}},
      {'U', {"#.#", "#.#", "#.#", "#.#", "###"}}, {'V', {"#.#", "#.#", "#.#", "#.#", ".#."}},
      {'W', {"#.#", "#.#", "###", "###", "#.#"}}, {'X', {"#.#", "#.#", ".#.", "#.#", "#.#"}},
      {'Y', {"#.#", "#.#", ".#.", ".#.", ".#."}}, {'Z', {"###", "..#", ".#.", "#..", "###"}},
      {'.', {"...", "...", "...", "...", ".#."}}, {'%', {"#.#", "..#", ".#.", "#..", "#.#"}},
      {'=', {"...", "###", "...", "###", "..."}}, {'-', {"...", "...", "###", "...", "..."}},
      {':', {"...", ".#.", "...", ".#.", "..."}}, {'/', {"..#", "..#", ".#.", "#..", "#.."}},
      {'(', {".#.", "#..", "#..", "#..", ".#."}}, {')', {".#.", "..#", "..#", "..#", ".#."}},
      {',', {"...", "...", "...", ".#.", "#.."}}, {' ', {"...", "...", "...", "...", "..."}},
  };
  return *font;
}

class Canvas {
 public:
  Canvas(int w, int h) : w_(w), h_(h), rgb_(static_cast<size_t>(w) * h * 3, 255) {}
  void Set(int x, int y, std::array<uint8_t, 3> c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    std::copy(c.begin(), c.end(), rgb_.begin() + (static_cast<size_t>(y) * w_ + x) * 3);
  }
  // A line `thick` pixels wide; dashed: 6 on, 4 off.
  void Line(double x0, double y0, double x1, double y1, std::array<uint8_t, 3> c, int thick = 2,
            bool dashed = false) {
    const int n = static_cast<int>(std::max(std::fabs(x1 - x0), std::fabs(y1 - y0))) + 1;
    for (int i = 0; i <= n; ++i) {
      if (dashed && (i % 10) >= 6) continue;
      const double t = static_cast<double>(i) / n;
      const int x = static_cast<int>(std::lround(x0 + t * (x1 - x0))),
                y = static_cast<int>(std::lround(y0 + t * (y1 - y0)));
      for (int dx = 0; dx < thick; ++dx) {
        for (int dy = 0; dy < thick; ++dy) Set(x + dx - thick / 2, y + dy - thick / 2, c);
      }
    }
  }
  void Text(int x, int y, const std::string& s, std::array<uint8_t, 3> c, int scale = 2) {
    for (char ch : s) {
      const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      auto it = Font().find(u);
      if (it != Font().end()) {
        for (int r = 0; r < 5; ++r) {
          for (int col = 0; col < 3; ++col) {
            if (it->second[r][col] != '#') continue;
            for (int a = 0; a < scale; ++a) {
              for (int b = 0; b < scale; ++b) Set(x + col * scale + a, y + r * scale + b, c);
            }
          }
        }
      }
      x += 4 * scale;
    }
  }
  static int TextWidth(const std::string& s, int scale = 2) {
    return static_cast<int>(s.size()) * 4 * scale;
  }
  const std::vector<uint8_t>& rgb() const { return rgb_; }
  int w() const { return w_; }
  int h() const { return h_; }

 private:
  int w_, h_;
  std::vector<uint8_t> rgb_;
};

std::array<uint8_t, 3> MethodColor(const std::string& m) {
  if (m == "exact") return {31, 119, 180};
  if (m == "ctkvr") return {230, 120, 20};
  if (m == "cluster") return {44, 160, 44};
  return {148, 103, 189};
}

// Accuracy (mean over depths) vs budget, one panel per (task, context); a line per method, dashed
// with lookahead; dense as a grey line.
absl::StatusOr<std::string> Plot(const AccuracyBenchOptions& o, const std::vector<std::string>& tasks,
                                 const nlohmann::json& rows) {
  const int pw = 420, ph = 300, top = 60;
  const int cols = static_cast<int>(o.contexts.size()), nrows = static_cast<int>(tasks.size());
  Canvas cv(std::max(cols * pw, 900), top + nrows * ph);
  const std::array<uint8_t, 3> black{0, 0, 0}, grey{150, 150, 150}, light{225, 225, 225};
  // Legend.
  int lx = 10;
  cv.Text(lx, 8, "ACCURACY (%) VS BUDGET, MEAN OVER DEPTHS", black);
  for (const std::string& m : o.methods) {
    cv.Line(lx, 38, lx + 30, 38, MethodColor(m), 3);
    cv.Text(lx + 36, 33, m, black);
    lx += 50 + Canvas::TextWidth(m);
  }
  cv.Line(lx, 38, lx + 30, 38, grey, 3);
  cv.Text(lx + 36, 33, "dense", black);
  lx += 50 + Canvas::TextWidth("dense");
  cv.Text(lx, 33, "SOLID: LOOKAHEAD OFF, DASHED: ON", black);
  const double lb0 =
      std::log2(static_cast<double>(*std::min_element(o.budgets.begin(), o.budgets.end())));
  const double lb1 =
      std::log2(static_cast<double>(*std::max_element(o.budgets.begin(), o.budgets.end())));
  for (int r = 0; r < nrows; ++r) {
    for (int c = 0; c < cols; ++c) {
      const int ox = c * pw, oy = top + r * ph;
      const int x0 = ox + 50, x1 = ox + pw - 20, y0 = oy + ph - 45, y1 = oy + 30;  // plot area
      const auto X = [&](double budget) {
        const double t = lb1 > lb0 ? (std::log2(budget) - lb0) / (lb1 - lb0) : 0.5;
        return x0 + t * (x1 - x0);
      };
      const auto Y = [&](double acc) { return y0 - acc * (y0 - y1); };
      cv.Text(ox + 50, oy + 8, absl::StrCat(tasks[r], " ", o.contexts[c]), black);
      for (int k = 0; k <= 4; ++k) {
        const double a = k / 4.0;
        cv.Line(x0, Y(a), x1, Y(a), light, 1);
        const std::string lab = absl::StrCat(k * 25);
        cv.Text(x0 - 8 - Canvas::TextWidth(lab), static_cast<int>(Y(a)) - 5, lab, black);
      }
      for (int b : o.budgets) {
        cv.Line(X(b), y0, X(b), y0 + 4, black, 1);
        const std::string lab = absl::StrCat(b);
        cv.Text(static_cast<int>(X(b)) - Canvas::TextWidth(lab) / 2, y0 + 8, lab, black);
      }
      cv.Text((x0 + x1) / 2 - Canvas::TextWidth("budget") / 2, y0 + 26, "budget", black);
      cv.Line(x0, y0, x1, y0, black, 1);
      cv.Line(x0, y0, x0, y1, black, 1);
      // Mean over depths per (method, lookahead, budget), and dense.
      std::map<std::tuple<std::string, bool, int>, std::pair<double, int>> acc;
      double dense = 0;
      int ndense = 0;
      std::map<double, bool> seen_depth;
      for (const auto& row : rows) {
        if (row["task"] != tasks[r] || row["context"] != o.contexts[c]) continue;
        auto& a = acc[{row["method"].get<std::string>(), row["lookahead"].get<bool>(),
                       row["budget"].get<int>()}];
        a.first += row["accuracy"].get<double>();
        a.second++;
        const double d = row["depth"].get<double>();
        if (!seen_depth[d]) {
          seen_depth[d] = true;
          dense += row["dense_accuracy"].get<double>();
          ndense++;
        }
      }
      if (ndense > 0) cv.Line(x0, Y(dense / ndense), x1, Y(dense / ndense), grey, 3);
      for (size_t mi = 0; mi < o.methods.size(); ++mi) {
        const std::string& m = o.methods[mi];
        const double lift = 3.0 * static_cast<double>(mi);  // keeps equal lines apart (3 px each)
        for (bool la : {false, true}) {
          double px = -1, py = -1;
          for (int b : o.budgets) {
            auto it = acc.find({m, la, b});
            if (it == acc.end()) continue;
            const double x = X(b), y = Y(it->second.first / it->second.second) - lift;
            if (px >= 0) cv.Line(px, py, x, y, MethodColor(m), 3, la);
            for (int dx = -3; dx <= 3; ++dx) {
              for (int dy = -3; dy <= 3; ++dy)
                cv.Set(static_cast<int>(x) + dx, static_cast<int>(y) + dy, MethodColor(m));
            }
            px = x;
            py = y;
          }
        }
      }
    }
  }
  return EncodePng(cv.w(), cv.h(), cv.rgb());
}

std::string Pct(double a) { return absl::StrFormat("%.1f", 100.0 * a); }

}  // namespace

absl::StatusOr<AccuracyBenchOptions> ParseAccuracyBenchFlags(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(FlagMap f, FlagMap::Parse(args));
  AccuracyBenchOptions o;
  RETURN_IF_ERROR(f.Get("model", &o.model));
  RETURN_IF_ERROR(f.Get("haystack", &o.haystack));
  RETURN_IF_ERROR(f.Get("backend", &o.backend));
  RETURN_IF_ERROR(ParseList(f, "tasks", &o.tasks));
  RETURN_IF_ERROR(ParseList(f, "contexts", &o.contexts));
  RETURN_IF_ERROR(ParseList(f, "depths", &o.depths));
  RETURN_IF_ERROR(f.Get("samples", &o.samples));
  RETURN_IF_ERROR(ParseList(f, "methods", &o.methods));
  RETURN_IF_ERROR(ParseList(f, "budgets", &o.budgets));
  RETURN_IF_ERROR(f.Get("lookahead", &o.lookahead));
  RETURN_IF_ERROR(f.Get("threads", &o.threads));
  RETURN_IF_ERROR(f.Get("seed", &o.seed));
  RETURN_IF_ERROR(f.Get("sinks", &o.sinks));
  RETURN_IF_ERROR(f.Get("window", &o.window));
  RETURN_IF_ERROR(f.Get("dense_layers", &o.dense_layers));
  RETURN_IF_ERROR(f.Get("index_queries", &o.index_queries));
  RETURN_IF_ERROR(f.Get("ctkvr_probe", &o.ctkvr_probe));
  RETURN_IF_ERROR(f.Get("ctkvr_list_size", &o.ctkvr_list_size));
  RETURN_IF_ERROR(f.Get("ctkvr_centroids", &o.ctkvr_centroids));
  RETURN_IF_ERROR(f.Get("ctkvr_min_similarity", &o.ctkvr_min_similarity));
  RETURN_IF_ERROR(f.Get("ctkvr_neighbour_radius", &o.ctkvr_neighbour_radius));
  RETURN_IF_ERROR(f.Get("ctkvr_max_added", &o.ctkvr_max_added));
  RETURN_IF_ERROR(f.Get("markdown", &o.markdown));
  RETURN_IF_ERROR(f.Get("plot", &o.plot));
  RETURN_IF_ERROR(f.Get("progress", &o.progress));
  RETURN_IF_ERROR(f.CheckAllUsed());
  for (const std::string& t : o.tasks) {
    if (t == "vartrack") {
      return absl::InvalidArgumentError(
          "vartrack: recall-tiny did not learn it (~50% dense, models/recall-tiny/README.md)");
    }
    if (t != "passkey" && t != "multikey" && t != "ar") {
      return absl::InvalidArgumentError(
          absl::StrCat("--tasks: unknown task '", t, "' (passkey, multikey, ar)"));
    }
  }
  for (const std::string& m : o.methods) {
    if (m == "merged") {
      return absl::InvalidArgumentError(
          "--methods: merged is not supported in the decode path (kvstore::Node::Retrieve refuses "
          "it: merged "
          "replaces tokens instead of selecting them); use exact, ctkvr, cluster");
    }
    if (m != "exact" && m != "ctkvr" && m != "cluster") {
      return absl::InvalidArgumentError(absl::StrCat("--methods: unknown method '", m, "'"));
    }
  }
  if (o.lookahead != "off" && o.lookahead != "on" && o.lookahead != "both") {
    return absl::InvalidArgumentError("--lookahead must be off, on or both");
  }
  for (int c : o.contexts) {
    if (c < 512 || c > 131072)
      return absl::InvalidArgumentError("--contexts must be in [512, 131072]");
  }
  for (double d : o.depths) {
    if (!(d >= 0 && d <= 1)) return absl::InvalidArgumentError("--depths must be in [0, 1]");
  }
  for (int b : o.budgets) {
    if (b < 1 || b > (1 << 16))
      return absl::InvalidArgumentError("--budgets must be in [1, 65536]");
  }
  if (o.samples < 1 || o.sinks < 0 || o.window < 2 || o.dense_layers < 0 || o.index_queries < 1) {
    return absl::InvalidArgumentError(
        "need samples >= 1, sinks >= 0, window >= 2, dense_layers >= 0");
  }
  return o;
}

absl::StatusOr<nlohmann::json> RunAccuracyBench(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(AccuracyBenchOptions o, ParseAccuracyBenchFlags(args));
  return RunAccuracyBench(o);
}

absl::StatusOr<nlohmann::json> RunAccuracyBench(const AccuracyBenchOptions& o) {
  const absl::Time t_start = absl::Now();
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::Load(o.model));
  ASSIGN_OR_RETURN(std::unique_ptr<TaskGen> gen, TaskGen::Create(tok.get(), o.haystack, o.seed));
  ASSIGN_OR_RETURN(std::unique_ptr<worker::ModelBackend> model,
                   worker::CreateBackend(o.backend, o.model, o.threads));
  const worker::LlamaConfig& cfg = model->config();
  if (o.dense_layers >= cfg.num_layers)
    return absl::InvalidArgumentError("--dense_layers leaves no sparse layer");
  const ModelSpec spec = worker::SpecOf(cfg, "accuracy-bench");

  std::vector<Config> configs;
  std::vector<bool> lookaheads;
  if (o.lookahead != "on") lookaheads.push_back(false);
  if (o.lookahead != "off") lookaheads.push_back(true);
  for (const std::string& m : o.methods) {
    for (int b : o.budgets) {
      for (bool la : lookaheads) configs.push_back({false, m, b, la});
    }
  }
  const int max_budget = *std::max_element(o.budgets.begin(), o.budgets.end());
  const int max_context = *std::max_element(o.contexts.begin(), o.contexts.end());

  // One in-process tier for every run. Its own background index is off (exact): the runs build
  // theirs with BuildIndex, and an automatic cluster index would only burn CPU.
  kvstore::NodeOptions no;
  const int64_t pair = 2 * static_cast<int64_t>(spec.row_bytes());
  // Anchor + one run, each at most max_context + a few tokens, full blocks shared.
  no.memory_bytes =
      std::max<int64_t>(int64_t{256} << 20, 3 * pair * cfg.num_kv_heads * cfg.num_layers *
                                                (static_cast<int64_t>(max_context) + 1024));
  no.block_tokens = 64;
  no.search_threads = o.threads;
  no.auto_index = indexer::Method::kExact;
  if (o.ctkvr_probe > 0) no.index_options.ctkvr.probe = o.ctkvr_probe;
  if (o.ctkvr_list_size > 0) no.index_options.ctkvr.list_size = o.ctkvr_list_size;
  if (o.ctkvr_centroids > 0) no.index_options.ctkvr.centroids = o.ctkvr_centroids;
  RETURN_IF_ERROR(indexer::ApplyMinSimilarityFlag(o.ctkvr_min_similarity, &no.index_options.ctkvr));
  if (o.ctkvr_neighbour_radius >= 0)
    no.index_options.ctkvr.neighbour_radius = o.ctkvr_neighbour_radius;
  if (o.ctkvr_max_added >= 0) no.index_options.ctkvr.max_added = o.ctkvr_max_added;
  client::TierOptions to;
  to.tenant = "accuracy";
  to.staging_areas = cfg.num_layers - o.dense_layers;  // lookahead: one per sparse layer
  // Each staging area holds one layer's rows for every kv-head (budget rows each), with room to
  // spare for whatever else the tier keeps there.
  to.recall_buffer_bytes =
      (2 * pair * max_budget * cfg.num_kv_heads + (int64_t{1} << 20)) * to.staging_areas;
  ASSIGN_OR_RETURN(std::unique_ptr<client::Tier> tier, client::CreateLocalTier(no, to));
  RETURN_IF_ERROR(tier->RegisterModel(spec));

  EngineOptions base;
  base.sparse = true;
  base.dense_layers = o.dense_layers;
  base.sink_tokens = o.sinks;
  base.window_tokens = o.window;
  base.index_queries = o.index_queries;
  base.num_threads = o.threads;
  base.method = client::Method::kExact;
  base.budget = 1;
  // Prefills, and holds each sample's anchor sequence on the tier (exact: no index to build).
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> prefiller,
                   Engine::Create(model.get(), tier.get(), spec, base));
  EngineOptions dense_opts = base;
  dense_opts.sparse = false;
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> dense,
                   Engine::Create(model.get(), nullptr, spec, dense_opts));

  // correct[(task, context, depth index)][config index] (config -1 = dense).
  std::map<std::tuple<std::string, int, int>, std::map<int, int>> correct;
  // ctkvr searches and novel ones (scored exactly: CtkvrOptions::min_similarity) per cell/config.
  std::map<std::tuple<std::string, int, int>, std::map<int, indexer::CtkvrCounters>> ctkvr_seen;
  double prefill_s = 0, anchor_push_s = 0, run_add_s = 0, index_build_s = 0, decode_dense_s = 0,
         decode_sparse_s = 0;
  int64_t prefill_tokens = 0, runs = 0, prompts = 0;
  const int64_t total_samples =
      static_cast<int64_t>(o.tasks.size() * o.contexts.size() * o.depths.size()) * o.samples;
  std::vector<nlohmann::json> examples;
  for (const std::string& task : o.tasks) {
    for (int L : o.contexts) {
      if (static_cast<size_t>(L) + 64 > gen->corpus_tokens()) {
        return absl::InvalidArgumentError(absl::StrCat("context ", L, " exceeds the haystack (",
                                                       gen->corpus_tokens(), " tokens)"));
      }
      for (size_t di = 0; di < o.depths.size(); ++di) {
        auto& cell = correct[{task, L, static_cast<int>(di)}];
        for (int s = 0; s < o.samples; ++s) {
          ASSIGN_OR_RETURN(Sample smp, gen->Make(task, L, o.depths[di]));
          std::vector<float> logits;
          absl::Time t0 = absl::Now();
          ASSIGN_OR_RETURN(PromptKV kv, prefiller->Prefill(smp.prompt, &logits));
          prefill_s += absl::ToDoubleSeconds(absl::Now() - t0);
          prefill_tokens += static_cast<int64_t>(smp.prompt.size());
          const std::string base_id = absl::StrCat(task, "-", L, "-", di, "-", s);
          const std::string anchor = base_id + "-anchor";
          t0 = absl::Now();
          RETURN_IF_ERROR(prefiller->AddSequence(anchor, kv));
          anchor_push_s += absl::ToDoubleSeconds(absl::Now() - t0);
          ++prompts;

          t0 = absl::Now();
          RETURN_IF_ERROR(dense->AddSequence(base_id, kv));
          ASSIGN_OR_RETURN(
              std::vector<int32_t> got,
              DecodeGreedy(dense.get(), base_id, logits, smp.answer.size(), cfg.vocab_size));
          RETURN_IF_ERROR(dense->RemoveSequence(base_id));
          decode_dense_s += absl::ToDoubleSeconds(absl::Now() - t0);
          const bool dense_ok = got == smp.answer;
          cell[-1] += dense_ok;
          int sparse_ok = 0;
          std::string failed;
          for (size_t ci = 0; ci < configs.size(); ++ci) {
            const Config& c = configs[ci];
            EngineOptions eo = base;
            eo.method = *indexer::ParseMethod(c.method);
            eo.budget = c.budget;
            eo.lookahead = c.lookahead;
            ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine,
                             Engine::Create(model.get(), tier.get(), spec, eo));
            const std::string id = absl::StrCat(base_id, "-", ci);
            t0 = absl::Now();
            RETURN_IF_ERROR(engine->AddSequence(id, kv));
            run_add_s += absl::ToDoubleSeconds(absl::Now() - t0);
            t0 = absl::Now();
            const indexer::CtkvrCounters before = indexer::ReadCtkvrCounters();
            ASSIGN_OR_RETURN(
                std::vector<int32_t> out,
                DecodeGreedy(engine.get(), id, logits, smp.answer.size(), cfg.vocab_size));
            decode_sparse_s += absl::ToDoubleSeconds(absl::Now() - t0);
            const indexer::CtkvrCounters run = indexer::ReadCtkvrCounters().Since(before);
            indexer::CtkvrCounters& seen = ctkvr_seen[{task, L, static_cast<int>(di)}][static_cast<int>(ci)];
            seen.searches += run.searches;
            seen.novel += run.novel;
            index_build_s += engine->counters().index_build_seconds;
            RETURN_IF_ERROR(engine->RemoveSequence(id));
            ++runs;
            const bool ok = out == smp.answer;
            cell[static_cast<int>(ci)] += ok;
            sparse_ok += ok;
            if (!ok && failed.size() < 200)
              absl::StrAppend(&failed, failed.empty() ? "" : " ", c.Name());
          }
          RETURN_IF_ERROR(prefiller->RemoveSequence(anchor));
          if (examples.size() < 3) {
            examples.push_back({{"task", task},
                                {"context", L},
                                {"depth", smp.depth},
                                {"fact", smp.fact},
                                {"dense_answer", tok->Decode(got, false).value_or("?")}});
          }
          if (o.progress) {
            std::cerr << absl::StrFormat(
                "[accuracy %d/%d %.0fs] %s L=%d depth=%.2f #%d fact=%s dense %s, %d/%d sparse "
                "ok%s%s\n",
                prompts, total_samples, absl::ToDoubleSeconds(absl::Now() - t_start), task, L,
                o.depths[di], s, smp.fact, dense_ok ? "ok" : "WRONG", sparse_ok, configs.size(),
                failed.empty() ? "" : "; wrong: ", failed);
          }
        }
      }
    }
  }

  nlohmann::json rows = nlohmann::json::array();
  for (const std::string& task : o.tasks) {
    for (int L : o.contexts) {
      for (size_t di = 0; di < o.depths.size(); ++di) {
        auto& cell = correct[{task, L, static_cast<int>(di)}];
        const double dense_acc = static_cast<double>(cell[-1]) / o.samples;
        for (size_t ci = 0; ci < configs.size(); ++ci) {
          const indexer::CtkvrCounters seen =
              ctkvr_seen[{task, L, static_cast<int>(di)}][static_cast<int>(ci)];
          rows.push_back({{"task", task},
                          {"context", L},
                          {"depth", o.depths[di]},
                          {"method", configs[ci].method},
                          {"budget", configs[ci].budget},
                          {"lookahead", configs[ci].lookahead},
                          {"accuracy", static_cast<double>(cell[static_cast<int>(ci)]) / o.samples},
                          {"dense_accuracy", dense_acc},
                          {"samples", o.samples},
                          {"ctkvr_searches", seen.searches},
                          {"ctkvr_novel_fraction", seen.novel_fraction()}});
        }
      }
    }
  }
  // Where each method breaks: the smallest budget whose accuracy over all depths is within one
  // point of dense (and stays so at every larger budget).
  nlohmann::json summary = nlohmann::json::array();
  for (const std::string& task : o.tasks) {
    for (int L : o.contexts) {
      for (const std::string& m : o.methods) {
        for (bool la : lookaheads) {
          std::map<int, std::pair<double, double>> by_budget;  // budget -> (sum acc, sum dense)
          for (const auto& r : rows) {
            if (r["task"] != task || r["context"] != L || r["method"] != m || r["lookahead"] != la)
              continue;
            auto& p = by_budget[r["budget"].get<int>()];
            p.first += r["accuracy"].get<double>();
            p.second += r["dense_accuracy"].get<double>();
          }
          const double n = static_cast<double>(o.depths.size());
          nlohmann::json acc = nlohmann::json::object();
          nlohmann::json within = nullptr;
          double dense_all = 0;
          for (auto it = by_budget.rbegin(); it != by_budget.rend(); ++it) {
            dense_all = it->second.second / n;
            if (it->second.first / n >= dense_all - 0.01) {
              within = it->first;
            } else {
              break;
            }
          }
          for (const auto& [b, p] : by_budget) acc[std::to_string(b)] = p.first / n;
          summary.push_back({{"task", task},
                             {"context", L},
                             {"method", m},
                             {"lookahead", la},
                             {"dense_accuracy", dense_all},
                             {"accuracy_by_budget", acc},
                             {"min_budget_within_1pt", within}});
        }
      }
    }
  }
  const double total_s = absl::ToDoubleSeconds(absl::Now() - t_start);
  nlohmann::json out;
  out["benchmark"] = "accuracy";
  out["rows"] = rows;
  out["summary"] = summary;
  out["examples"] = examples;
  out["options"] = {
      {"model", o.model},
      {"haystack", o.haystack},
      {"tasks", o.tasks},
      {"contexts", o.contexts},
      {"depths", o.depths},
      {"samples", o.samples},
      {"methods", o.methods},
      {"budgets", o.budgets},
      {"lookahead", o.lookahead},
      {"threads", o.threads},
      {"seed", o.seed},
      {"sinks", o.sinks},
      {"window", o.window},
      {"dense_layers", o.dense_layers},
      {"index_queries", o.index_queries},
      {"ctkvr_centroids", o.ctkvr_centroids},
      {"ctkvr_list_size", o.ctkvr_list_size},
      {"ctkvr_probe", o.ctkvr_probe},
      {"ctkvr_min_similarity", no.index_options.ctkvr.min_similarity},
      {"ctkvr_neighbour_radius", no.index_options.ctkvr.neighbour_radius},
      {"ctkvr_max_added", no.index_options.ctkvr.max_added},
      {"haystack_tokens", gen->corpus_tokens()},
      {"backend", o.backend},
      {"kv_dtype", std::string(DTypeName(spec.kv_dtype))},
      {"metric", "exact match of the greedy-decoded answer tokens"},
      {"unsupported_methods", {{"merged", "not a Retrieve method in the decode path"}}}};
  out["timing"] = {{"seconds", total_s},
                   {"prompts", prompts},
                   {"prefill_tokens", prefill_tokens},
                   {"prefill_seconds", prefill_s},
                   {"anchor_push_seconds", anchor_push_s},
                   {"sparse_runs", runs},
                   {"run_add_sequence_seconds", run_add_s},
                   {"index_build_seconds", index_build_s},
                   {"dense_decode_seconds", decode_dense_s},
                   {"sparse_decode_seconds", decode_sparse_s}};

  if (!o.markdown.empty()) {
    std::ostringstream md;
    md << "Accuracy (%) over depths " << absl::StrJoin(o.depths, ",") << ", " << o.samples
       << " samples each; exact match of the greedy answer.\n\n";
    md << "| task | context | method | lookahead | ";
    for (int b : o.budgets) md << b << " | ";
    md << "dense | min budget within 1 pt |\n|---|---|---|---|";
    for (size_t i = 0; i < o.budgets.size(); ++i) md << "---|";
    md << "---|---|\n";
    for (const auto& s : summary) {
      md << "| " << s["task"].get<std::string>() << " | " << s["context"] << " | "
         << s["method"].get<std::string>() << " | " << (s["lookahead"].get<bool>() ? "on" : "off")
         << " | ";
      for (int b : o.budgets)
        md << Pct(s["accuracy_by_budget"][std::to_string(b)].get<double>()) << " | ";
      md << Pct(s["dense_accuracy"].get<double>()) << " | "
         << (s["min_budget_within_1pt"].is_null() ? std::string("none")
                                                  : s["min_budget_within_1pt"].dump())
         << " |\n";
    }
    md << "\nPer depth (accuracy % of each configuration; dense first):\n\n| task | context | "
          "config |";
    for (double d : o.depths) md << " " << d << " |";
    md << "\n|---|---|---|";
    for (size_t i = 0; i < o.depths.size(); ++i) md << "---|";
    md << "\n";
    for (const std::string& task : o.tasks) {
      for (int L : o.contexts) {
        for (int ci = -1; ci < static_cast<int>(configs.size()); ++ci) {
          md << "| " << task << " | " << L << " | " << (ci < 0 ? "dense" : configs[ci].Name())
             << " |";
          for (size_t di = 0; di < o.depths.size(); ++di) {
            md << " "
               << Pct(static_cast<double>(correct[{task, L, static_cast<int>(di)}][ci]) / o.samples)
               << " |";
          }
          md << "\n";
        }
      }
    }
    std::ofstream f(o.markdown);
    if (!(f << md.str())) return absl::InternalError(absl::StrCat("cannot write ", o.markdown));
  }
  if (!o.plot.empty()) {
    ASSIGN_OR_RETURN(const std::string png, Plot(o, o.tasks, rows));
    std::ofstream f(o.plot, std::ios::binary);
    if (!(f << png))
      return absl::InternalError(absl::StrCat("cannot write ", o.plot));
  }
  return out;
}

}  // namespace kvrecall::bench
