#include "common/placement.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace kvrecall::placement {
namespace {

constexpr char kRedirectOpen[] = "owners=[";

void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::vector<std::string> Distinct(absl::Span<const std::string> nodes) {
  std::vector<std::string> v(nodes.begin(), nodes.end());
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

}  // namespace

uint64_t Fmix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

uint64_t Hash64(absl::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return Fmix64(h);
}

int64_t AffinityTokens(int64_t prompt_tokens, int affinity_tokens, int block_tokens) {
  const int64_t n = std::min<int64_t>(prompt_tokens, affinity_tokens);
  const int64_t aligned = n / block_tokens * block_tokens;
  return aligned > 0 ? aligned : n;
}

uint64_t PrefixAffinityKey(absl::string_view tenant, absl::string_view model_id,
                           absl::Span<const int32_t> token_ids, int affinity_tokens, int block_tokens) {
  const int64_t n = AffinityTokens(static_cast<int64_t>(token_ids.size()), affinity_tokens, block_tokens);
  std::string enc("kvrecall-affinity-v1", 20);
  enc.push_back('\0');
  PutU32(&enc, static_cast<uint32_t>(tenant.size()));
  enc.append(tenant.data(), tenant.size());
  PutU32(&enc, static_cast<uint32_t>(model_id.size()));
  enc.append(model_id.data(), model_id.size());
  PutU32(&enc, static_cast<uint32_t>(n));
  for (int64_t i = 0; i < n; ++i) PutU32(&enc, static_cast<uint32_t>(token_ids[i]));
  return Hash64(enc);
}

uint64_t Weight(absl::string_view node, uint64_t key) {
  return Fmix64(Hash64(node) ^ Fmix64(key + 0x9e3779b97f4a7c15ULL));
}

std::vector<std::string> RankNodes(absl::Span<const std::string> nodes, uint64_t key) {
  std::vector<std::pair<uint64_t, std::string>> w;
  for (std::string& n : Distinct(nodes)) w.emplace_back(Weight(n, key), std::move(n));
  std::sort(w.begin(), w.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::vector<std::string> out;
  out.reserve(w.size());
  for (auto& [weight, name] : w) out.push_back(std::move(name));
  return out;
}

std::vector<std::string> Owners(absl::Span<const std::string> nodes, uint64_t key, int r) {
  std::vector<std::string> ranked = RankNodes(nodes, key);
  if (r >= 0 && static_cast<size_t>(r) < ranked.size()) ranked.resize(static_cast<size_t>(r));
  return ranked;
}

uint64_t PeersHash(absl::Span<const std::string> nodes) {
  std::string enc;
  for (const std::string& n : Distinct(nodes)) absl::StrAppend(&enc, n, "\n");
  return Hash64(enc);
}

std::vector<std::string> SplitPeers(absl::string_view flag) {
  return absl::StrSplit(flag, ',', absl::SkipWhitespace());
}

std::string RedirectMessage(absl::string_view self, uint64_t key, absl::Span<const std::string> owners,
                            uint64_t peers_hash) {
  return absl::StrCat("node ", self, " is not an owner of placement key ", absl::StrFormat("%016x", key),
                      " by its peer list (peers hash ", absl::StrFormat("%016x", peers_hash),
                      ", which differs from the client's): ", kRedirectOpen, absl::StrJoin(owners, ","),
                      "]; refresh the node list or open the sequence on those owners");
}

std::optional<std::vector<std::string>> ParseRedirect(absl::string_view message) {
  const size_t open = message.find(kRedirectOpen);
  if (open == absl::string_view::npos) return std::nullopt;
  const size_t begin = open + sizeof(kRedirectOpen) - 1;
  const size_t close = message.find(']', begin);
  if (close == absl::string_view::npos) return std::nullopt;
  std::vector<std::string> owners =
      absl::StrSplit(message.substr(begin, close - begin), ',', absl::SkipWhitespace());
  if (owners.empty()) return std::nullopt;
  return owners;
}

namespace {
constexpr absl::string_view kDraining = "node is draining";
}  // namespace

absl::Status DrainingError() {
  return absl::UnavailableError(
      absl::StrCat("this ", kDraining, " and takes no new sequences; place the sequence on another node"));
}

bool IsDrainingError(const absl::Status& s) {
  return absl::IsUnavailable(s) && absl::StrContains(s.message(), kDraining);
}

}  // namespace kvrecall::placement
