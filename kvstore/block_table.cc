#include "kvstore/block_table.h"

#include <algorithm>

namespace kvrecall::kvstore {

BlockTable::~BlockTable() = default;

absl::StatusOr<Block*> BlockTable::Allocate(int num_layers) {
  std::vector<uint8_t*> slots;
  slots.reserve(static_cast<size_t>(num_layers));
  if (absl::Status s = arena_->Allocate(num_layers, &slots); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  Block* b = new Block(next_id_++, std::move(slots));
  ++live_;
  ++references_;
  return b;
}

void BlockTable::Ref(Block* b) {
  absl::MutexLock lock(&mu_);
  if (b->refs_++ == 1) ++shared_;
  ++references_;
}

void BlockTable::Unref(Block* b) {
  {
    absl::MutexLock lock(&mu_);
    --references_;
    if (--b->refs_ > 0) {
      if (b->refs_ == 1) --shared_;
      return;
    }
    if (b->published_) published_.erase(b->key_);
    --live_;
  }
  arena_->Free(b->layers_);
  delete b;
}

void BlockTable::Publish(Block* b, const ContentKey& parent, const ContentKey& key,
                         absl::string_view share_namespace, absl::string_view model_id,
                         absl::Span<const int32_t> tokens) {
  b->immutable_.store(true, std::memory_order_release);
  absl::MutexLock lock(&mu_);
  if (b->published_ || !published_.emplace(key, b).second) return;
  b->published_ = true;
  b->key_ = key;
  b->parent_ = parent;
  b->namespace_ = std::string(share_namespace);
  b->model_id_ = std::string(model_id);
  b->tokens_.assign(tokens.begin(), tokens.end());
}

int BlockTable::AcquirePrefix(absl::Span<const ContentKey> keys, absl::string_view share_namespace,
                              absl::string_view model_id, absl::Span<const int32_t> token_ids,
                              int block_tokens, std::vector<Block*>* out) {
  absl::MutexLock lock(&mu_);
  int n = 0;
  ContentKey parent;
  for (size_t i = 0; i < keys.size(); ++i) {
    const size_t begin = i * static_cast<size_t>(block_tokens);
    if (begin + static_cast<size_t>(block_tokens) > token_ids.size()) break;
    auto it = published_.find(keys[i]);
    if (it == published_.end()) break;
    Block* b = it->second;
    const absl::Span<const int32_t> tokens =
        token_ids.subspan(begin, static_cast<size_t>(block_tokens));
    if (b->state_ != Block::State::kResident || b->parent_ != parent ||
        b->namespace_ != share_namespace || b->model_id_ != model_id ||
        !std::equal(tokens.begin(), tokens.end(), b->tokens_.begin(), b->tokens_.end())) {
      break;
    }
    if (b->refs_++ == 1) ++shared_;
    ++references_;
    out->push_back(b);
    parent = keys[i];
    ++n;
  }
  return n;
}

std::vector<int> BlockTable::RefCounts(absl::Span<Block* const> blocks) const {
  absl::MutexLock lock(&mu_);
  std::vector<int> r;
  r.reserve(blocks.size());
  for (const Block* b : blocks) r.push_back(b->refs_);
  return r;
}

BlockTableStats BlockTable::stats() const {
  absl::MutexLock lock(&mu_);
  return BlockTableStats{live_, static_cast<int64_t>(published_.size()), shared_, references_};
}

}  // namespace kvrecall::kvstore
