// Placement of sequences over many tier nodes: rendezvous (highest-random-weight) hashing of a
// sequence's prefix-affinity key over a node list. Client (client/cluster_tier.h) and server
// (kvrecall-server --peers) compute it with the same fixed functions below, so both agree on who
// owns a sequence without any coordinator.
//
// The hashes are fixed and documented (never a per-process seed), so placement is stable across
// processes, restarts and machines:
//   Hash64(bytes)        = Fmix64(FNV-1a-64(bytes))
//                          FNV-1a-64: offset basis 0xcbf29ce484222325, prime 0x100000001b3;
//                          Fmix64: MurmurHash3's 64-bit finaliser (xor-shift 33, *0xff51afd7ed558ccd,
//                          xor-shift 33, *0xc4ceb9fe1a85ec53, xor-shift 33).
//   Weight(node, key)    = Fmix64(Hash64(node name) ^ Fmix64(key + 0x9e3779b97f4a7c15))
//   RankNodes(nodes,key) = the distinct node names by Weight descending (ties: name ascending);
//                          the first R are the sequence's owners.
//   PeersHash(nodes)     = Hash64 of the distinct names, sorted, each followed by '\n'.
//   PrefixAffinityKey    = Hash64 of  "kvrecall-affinity-v1\0" | len(tenant) u32 LE | tenant
//                          | len(model_id) u32 LE | model_id | n u32 LE | first n token ids
//                          (each i32 as u32 LE), where n = AffinityTokens(prompt length, ...).
// Adding or removing one of N nodes moves about 1/N of the keys (only those whose top-R set
// contained or now contains that node); every other key keeps its owners.
//
// Thread safety: pure functions.
#ifndef KVRECALL_COMMON_PLACEMENT_H_
#define KVRECALL_COMMON_PLACEMENT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvrecall::placement {

// The prefix the affinity key covers: sessions whose prompts agree on their first
// kAffinityTokens tokens land on the same nodes (and share those blocks there).
inline constexpr int kAffinityTokens = 1024;
inline constexpr int kAffinityBlockTokens = 64;  // the node's default block size

uint64_t Fmix64(uint64_t x);
uint64_t Hash64(absl::string_view bytes);

// n = min(prompt_tokens, affinity_tokens) rounded down to a multiple of block_tokens; a prompt
// shorter than one block uses all of its tokens. REQUIRES: affinity_tokens, block_tokens > 0.
int64_t AffinityTokens(int64_t prompt_tokens, int affinity_tokens = kAffinityTokens,
                       int block_tokens = kAffinityBlockTokens);

// The key of a sequence opened with `token_ids` (its prompt); see the header comment.
uint64_t PrefixAffinityKey(absl::string_view tenant, absl::string_view model_id,
                           absl::Span<const int32_t> token_ids, int affinity_tokens = kAffinityTokens,
                           int block_tokens = kAffinityBlockTokens);

uint64_t Weight(absl::string_view node, uint64_t key);

// Every distinct node of `nodes`, best owner first.
std::vector<std::string> RankNodes(absl::Span<const std::string> nodes, uint64_t key);
// The first min(r, distinct nodes) of RankNodes.
std::vector<std::string> Owners(absl::Span<const std::string> nodes, uint64_t key, int r);

uint64_t PeersHash(absl::Span<const std::string> nodes);

// A comma-separated node list flag (--peers, --tier): "a:1,b:2" -> {"a:1", "b:2"}, blanks skipped;
// "dns:///name:port" -> {"dns:///name:port"}.
std::vector<std::string> SplitPeers(absl::string_view flag);

// The FAILED_PRECONDITION message a node sends a client that placed a sequence on it although it
// is not an owner, and its parser (the client follows the redirect): "... owners=[a,b] ...".
std::string RedirectMessage(absl::string_view self, uint64_t key, absl::Span<const std::string> owners,
                            uint64_t peers_hash);
// The owners named in a RedirectMessage; nullopt when `message` is not one.
std::optional<std::vector<std::string>> ParseRedirect(absl::string_view message);

// The UNAVAILABLE a draining node (kvrecallctl drain) answers to OpenSequence of a sequence it
// does not hold, and its test: a client places the sequence on its next node without taking the
// draining one for dead (it still serves what it holds).
absl::Status DrainingError();
bool IsDrainingError(const absl::Status& s);

}  // namespace kvrecall::placement

#endif  // KVRECALL_COMMON_PLACEMENT_H_
