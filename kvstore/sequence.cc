#include "kvstore/sequence.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvrecall::kvstore {

Sequence::Sequence(std::string tenant, std::string id, std::shared_ptr<const ModelSpec> spec,
                   int block_tokens, MemoryBudget* budget)
    : tenant_(std::move(tenant)),
      id_(std::move(id)),
      spec_(std::move(spec)),
      block_tokens_(block_tokens),
      budget_(budget),
      blocks_(spec_->num_layers),
      layer_tokens_(spec_->num_layers, 0) {}

Sequence::~Sequence() { budget_->Release(bytes_); }

Sequence::Snapshot Sequence::Read(int layer, int kv_head) const {
  absl::ReaderMutexLock lock(&mu_);
  Snapshot s;
  const size_t head_bytes = static_cast<size_t>(block_tokens_) * spec_->row_bytes();
  const size_t v_offset = static_cast<size_t>(spec_->num_kv_heads) * head_bytes;
  for (auto* rows : {&s.keys, &s.values}) {
    rows->page_tokens = block_tokens_;
    rows->row_stride = spec_->row_bytes();
    rows->head_dim = spec_->head_dim;
    rows->dtype = spec_->kv_dtype;
    rows->num_tokens = committed_;
  }
  const int64_t nblocks = (committed_ + block_tokens_ - 1) / block_tokens_;
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* block = blocks_[layer][b].get();
    s.keys.pages.push_back(block + kv_head * head_bytes);
    s.values.pages.push_back(block + v_offset + kv_head * head_bytes);
  }
  return s;
}

int64_t Sequence::committed_tokens() const {
  absl::ReaderMutexLock lock(&mu_);
  return committed_;
}
int64_t Sequence::known_token_ids() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<int64_t>(token_ids_.size());
}
std::vector<int32_t> Sequence::token_ids() const {
  absl::ReaderMutexLock lock(&mu_);
  return token_ids_;
}
int64_t Sequence::bytes() const {
  absl::ReaderMutexLock lock(&mu_);
  return bytes_;
}
bool Sequence::closed() const {
  absl::ReaderMutexLock lock(&mu_);
  return closed_;
}
void Sequence::set_closed(bool closed) {
  absl::MutexLock lock(&mu_);
  closed_ = closed;
}

absl::Status Sequence::AddTokenIds(int64_t start, absl::Span<const int32_t> ids) {
  absl::MutexLock lock(&mu_);
  const int64_t known = static_cast<int64_t>(token_ids_.size());
  if (start < 0 || start > known) {
    return absl::FailedPreconditionError(absl::StrCat("token ids start at ", start, " but only ", known,
                                                      " ids are known: they must be contiguous"));
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= spec_->vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", ids[i], " at index ", start + static_cast<int64_t>(i),
                       " outside vocabulary [0, ", spec_->vocab_size, ")"));
    }
    const int64_t at = start + static_cast<int64_t>(i);
    if (at < known && token_ids_[at] != ids[i]) {
      return absl::FailedPreconditionError(absl::StrCat("token id at index ", at, " is ", token_ids_[at],
                                                        ", request says ", ids[i]));
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    if (start + static_cast<int64_t>(i) >= known) token_ids_.push_back(ids[i]);
  }
  return absl::OkStatus();
}

absl::Status Sequence::BeginAppend() {
  absl::MutexLock lock(&mu_);
  if (appending_) return absl::AbortedError(absl::StrCat("sequence '", id_, "' has another append in progress"));
  appending_ = true;
  token_ids_at_begin_ = static_cast<int64_t>(token_ids_.size());
  return absl::OkStatus();
}

absl::Status Sequence::AppendChunk(int layer, int64_t token_start, int64_t n, absl::Span<const uint8_t> keys,
                                   absl::Span<const uint8_t> values) {
  absl::MutexLock lock(&mu_);
  if (!appending_) return absl::FailedPreconditionError("no append in progress");
  if (layer < 0 || layer >= spec_->num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " outside [0, ", spec_->num_layers, ")"));
  }
  if (n <= 0) return absl::InvalidArgumentError(absl::StrCat("num_tokens ", n, " must be positive"));
  const size_t row = spec_->row_bytes();
  const size_t expect = static_cast<size_t>(spec_->num_kv_heads) * static_cast<size_t>(n) * row;
  if (n > (int64_t{1} << 24) || keys.size() != expect || values.size() != expect) {
    return absl::InvalidArgumentError(absl::StrCat("keys/values must each be [", spec_->num_kv_heads, "][", n,
                                                   "][", spec_->head_dim, "] ", DTypeName(spec_->kv_dtype), " = ",
                                                   expect, " bytes; got ", keys.size(), " and ", values.size()));
  }
  if (token_start != layer_tokens_[layer]) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " holds ", layer_tokens_[layer],
                                                      " tokens; chunk starts at ", token_start));
  }
  if (token_start + n > static_cast<int64_t>(token_ids_.size())) {
    return absl::FailedPreconditionError(absl::StrCat("KV for tokens up to ", token_start + n, " but only ",
                                                      token_ids_.size(), " token ids are known"));
  }
  const size_t head_bytes = static_cast<size_t>(block_tokens_) * row;
  const size_t v_offset = static_cast<size_t>(spec_->num_kv_heads) * head_bytes;
  auto& blocks = blocks_[layer];
  const int64_t need_blocks = (token_start + n + block_tokens_ - 1) / block_tokens_;
  while (static_cast<int64_t>(blocks.size()) < need_blocks) {
    if (absl::Status s = budget_->Reserve(static_cast<int64_t>(block_bytes())); !s.ok()) return s;
    bytes_ += static_cast<int64_t>(block_bytes());
    blocks.emplace_back(new uint8_t[block_bytes()]);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = token_start + i;
    uint8_t* block = blocks[t / block_tokens_].get();
    const size_t in_block = static_cast<size_t>(t % block_tokens_) * row;
    for (int h = 0; h < spec_->num_kv_heads; ++h) {
      const size_t src = (static_cast<size_t>(h) * n + i) * row;
      std::memcpy(block + h * head_bytes + in_block, keys.data() + src, row);
      std::memcpy(block + v_offset + h * head_bytes + in_block, values.data() + src, row);
    }
  }
  layer_tokens_[layer] = token_start + n;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Sequence::CommitAppend() {
  absl::MutexLock lock(&mu_);
  if (!appending_) return absl::FailedPreconditionError("no append in progress");
  appending_ = false;
  const int64_t len = layer_tokens_[0];
  for (int l = 1; l < spec_->num_layers; ++l) {
    if (layer_tokens_[l] != len) {
      const int64_t other = layer_tokens_[l];
      TruncateLocked(committed_);
      token_ids_.resize(static_cast<size_t>(token_ids_at_begin_));
      return absl::FailedPreconditionError(absl::StrCat("append ended with layer 0 at ", len, " tokens but layer ",
                                                        l, " at ", other, "; nothing was committed"));
    }
  }
  committed_ = len;
  return committed_;
}

void Sequence::AbortAppend() {
  absl::MutexLock lock(&mu_);
  if (!appending_) return;
  appending_ = false;
  TruncateLocked(committed_);
  token_ids_.resize(static_cast<size_t>(token_ids_at_begin_));
}

void Sequence::TruncateLocked(int64_t tokens) {
  const int64_t keep_blocks = (tokens + block_tokens_ - 1) / block_tokens_;
  for (int l = 0; l < spec_->num_layers; ++l) {
    auto& blocks = blocks_[l];
    while (static_cast<int64_t>(blocks.size()) > keep_blocks) {
      blocks.pop_back();
      budget_->Release(static_cast<int64_t>(block_bytes()));
      bytes_ -= static_cast<int64_t>(block_bytes());
    }
    layer_tokens_[l] = std::min(layer_tokens_[l], tokens);
  }
}

}  // namespace kvrecall::kvstore
