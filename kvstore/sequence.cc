#include "kvstore/sequence.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kvstore/internal/records.h"

namespace kvrecall::kvstore {

Sequence::Sequence(std::string tenant, std::string id, std::shared_ptr<const ModelSpec> spec,
                   int block_tokens, BlockTable* table, std::string share_namespace,
                   bool durable, std::shared_ptr<TenantAccount> account)
    : tenant_(std::move(tenant)),
      id_(std::move(id)),
      spec_(std::move(spec)),
      block_tokens_(block_tokens),
      table_(table),
      namespace_(std::move(share_namespace)),
      durable_(durable),
      account_(std::move(account)),
      layer_tokens_(spec_->num_layers, 0) {}

Sequence::~Sequence() {
  table_->Unpin(txn_pins_);
  for (Block* b : blocks_) table_->Unref(b);
  ReleaseAccount();
}

void Sequence::ReleaseAccount() {
  absl::MutexLock lock(&mu_);
  if (account_ == nullptr) return;
  account_->RefundBytes(committed_ * spec_->token_kv_bytes());
  account_->RemoveSequence();
  account_.reset();
}


void Sequence::Touch() const {
  absl::ReaderMutexLock lock(&mu_);
  table_->Touch(blocks_);
}

absl::StatusOr<Sequence::Snapshot> Sequence::Read(int layer, int kv_head) const {
  ASSIGN_OR_RETURN(std::vector<Snapshot> s, Read(layer, absl::MakeConstSpan(&kv_head, 1)));
  return std::move(s[0]);
}

absl::StatusOr<std::vector<Sequence::Snapshot>> Sequence::Read(int layer, absl::Span<const int> kv_heads) const {
  const Sequence* self = this;
  const std::vector<int> heads(kv_heads.begin(), kv_heads.end());
  ASSIGN_OR_RETURN(std::vector<std::vector<Snapshot>> out,
                   ReadLayer(absl::MakeConstSpan(&self, 1), layer, absl::MakeConstSpan(&heads, 1)));
  return std::move(out[0]);
}

absl::StatusOr<std::vector<std::vector<Sequence::Snapshot>>> Sequence::ReadLayer(
    absl::Span<const Sequence* const> seqs, int layer,
    absl::Span<const std::vector<int>> kv_heads) {
  std::vector<std::vector<Snapshot>> out(seqs.size());
  if (seqs.empty()) return out;
  BlockTable* const table = seqs[0]->table_;
  const int64_t now = table->NowNs();
  const int64_t touch_interval = table->touch_interval_ns();
  // Each sequence's committed blocks and length, taken under its lock: committed blocks stay in
  // place while the caller holds the sequence (only the destructor and the rollback of
  // uncommitted rows release blocks), so they can be pinned after the lock is dropped. Then what
  // the sequence knows of their residency: blocks past its claim are checked one by one.
  std::vector<std::vector<Block*>> blocks(seqs.size());
  std::vector<int64_t> committed(seqs.size());
  std::vector<Block*> to_pin, unverified;
  uint64_t epoch = BlockTable::kNoEpoch;
  bool touch = false;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& seq = *seqs[i];
    {
      absl::ReaderMutexLock lock(&seq.mu_);
      committed[i] = seq.committed_;
      const int64_t nblocks = (seq.committed_ + seq.block_tokens_ - 1) / seq.block_tokens_;
      blocks[i].assign(seq.blocks_.begin(), seq.blocks_.begin() + nblocks);
    }
    {
      absl::MutexLock lock(&seq.read_mu_);
      // One claim for the whole call: every sequence's must be under the same epoch.
      if (i == 0) {
        epoch = seq.claim_epoch_;
      } else if (seq.claim_epoch_ != epoch) {
        epoch = BlockTable::kNoEpoch;
      }
      const size_t claimed = std::min(seq.claim_blocks_, blocks[i].size());
      unverified.insert(unverified.end(), blocks[i].begin() + static_cast<int64_t>(claimed),
                        blocks[i].end());
      touch |= !seq.touched_ns_.has_value() || now - *seq.touched_ns_ >= touch_interval;
    }
    size_t shared = 0;
    if (i > 0) {
      const std::vector<Block*>& prev = blocks[i - 1];
      const size_t n = std::min(prev.size(), blocks[i].size());
      while (shared < n && prev[shared] == blocks[i][shared]) ++shared;
    }
    to_pin.insert(to_pin.end(), blocks[i].begin() + static_cast<int64_t>(shared), blocks[i].end());
  }
  absl::StatusOr<BlockTable::ReadPin> pinned =
      table->PinForRead(std::move(to_pin), epoch, unverified, touch);
  if (!pinned.ok()) {
    const absl::Status& st = pinned.status();
    return absl::Status(
        st.code(), seqs.size() == 1 ? absl::StrCat("sequence '", seqs[0]->id_, "': ", st.message())
                                    : absl::StrCat("reading ", seqs.size(), " sequences from '",
                                                   seqs[0]->id_, "' on: ", st.message()));
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& seq = *seqs[i];
    const ModelSpec& spec = *seq.spec_;
    // After the pin: a reload may have moved a spilled block's slots.
    const auto pages = seq.PageTable(layer, pinned->epoch, blocks[i], touch ? now : -1);
    const size_t hb = seq.head_bytes();
    const size_t v_offset = static_cast<size_t>(spec.num_kv_heads) * hb;
    out[i].resize(kv_heads[i].size());
    for (size_t j = 0; j < kv_heads[i].size(); ++j) {
      Snapshot& s = out[i][j];
      s.pin = pinned->pin;
      for (auto* rows : {&s.keys, &s.values}) {
        rows->pages = pages;
        rows->page_tokens = seq.block_tokens_;
        rows->row_stride = spec.row_bytes();
        rows->head_dim = spec.head_dim;
        rows->dtype = spec.kv_dtype;
        rows->num_tokens = committed[i];
      }
      s.keys.page_offset = static_cast<size_t>(kv_heads[i][j]) * hb;
      s.values.page_offset = v_offset + s.keys.page_offset;
    }
  }
  return out;
}

std::shared_ptr<const std::vector<const uint8_t*>> Sequence::PageTable(
    int layer, uint64_t epoch, absl::Span<Block* const> blocks, int64_t touched_ns) const {
  absl::MutexLock lock(&read_mu_);
  // The claim: every one of `blocks` is resident (and pinned) under `epoch`.
  if (claim_epoch_ == BlockTable::kNoEpoch || epoch > claim_epoch_) {
    claim_epoch_ = epoch;
    claim_blocks_ = blocks.size();
  } else if (epoch == claim_epoch_) {
    claim_blocks_ = std::max(claim_blocks_, blocks.size());
  }
  if (touched_ns >= 0 && touched_ns > touched_ns_.value_or(-1)) touched_ns_ = touched_ns;
  if (page_cache_.empty()) page_cache_.resize(static_cast<size_t>(spec_->num_layers));
  PageCache& cache = page_cache_[static_cast<size_t>(layer)];
  // A table built under `epoch` is still right for the blocks it covers: no block has moved
  // since (a move needs an eviction, which advances the epoch).
  const bool current = cache.pages != nullptr && cache.epoch == epoch;
  if (current && cache.pages->size() == blocks.size()) return cache.pages;
  std::vector<const uint8_t*> table;
  if (current && cache.pages->size() < blocks.size()) {
    table.reserve(blocks.size());
    table = *cache.pages;
  }
  const size_t from = table.size();
  table.resize(blocks.size());
  for (size_t b = from; b < blocks.size(); ++b) table[b] = blocks[b]->layer(layer);
  auto pages = std::make_shared<const std::vector<const uint8_t*>>(std::move(table));
  if (cache.pages == nullptr || epoch > cache.epoch ||
      (epoch == cache.epoch && blocks.size() > cache.pages->size())) {
    cache = PageCache{epoch, pages};
  }
  return pages;
}

int64_t Sequence::committed_tokens() const {
  absl::ReaderMutexLock lock(&mu_);
  return committed_;
}
std::optional<ContentKey> Sequence::PrefixKey(int64_t tokens) const {
  absl::ReaderMutexLock lock(&mu_);
  if (tokens <= 0 || tokens > committed_) return std::nullopt;
  const size_t b = static_cast<size_t>((tokens - 1) / block_tokens_);
  if (b >= keys_.size()) return std::nullopt;
  return keys_[b];
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
  return static_cast<int64_t>(blocks_.size()) * spec_->num_layers *
         static_cast<int64_t>(table_->arena()->slot_bytes());
}
bool Sequence::closed() const {
  absl::ReaderMutexLock lock(&mu_);
  return closed_;
}
void Sequence::set_closed(bool closed) {
  absl::MutexLock lock(&mu_);
  closed_ = closed;
}

Sequence::Usage Sequence::usage() const {
  absl::ReaderMutexLock lock(&mu_);
  Usage u;
  u.tokens = committed_;
  u.blocks = static_cast<int64_t>(blocks_.size());
  u.adopted_tokens = adopted_;
  const int64_t block_bytes =
      spec_->num_layers * static_cast<int64_t>(table_->arena()->slot_bytes());
  u.bytes = u.blocks * block_bytes;
  for (int refs : table_->RefCounts(blocks_)) {
    if (refs > 1) ++u.shared_blocks;
    u.attributed_bytes += static_cast<double>(block_bytes) / std::max(refs, 1);
  }
  return u;
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

ContentKey Sequence::KeyOfBlockLocked(size_t b, const ContentKey& parent) const {
  const absl::Span<const int32_t> tokens(token_ids_.data() + b * static_cast<size_t>(block_tokens_),
                                         static_cast<size_t>(block_tokens_));
  return BlockContentKey(parent, namespace_, spec_->model_id, tokens);
}

int64_t Sequence::AdoptSharedPrefix() {
  absl::MutexLock lock(&mu_);
  if (committed_ != 0 || appending_ || !blocks_.empty()) return committed_;
  const size_t full = token_ids_.size() / static_cast<size_t>(block_tokens_);
  std::vector<ContentKey> keys;
  keys.reserve(full);
  ContentKey parent;
  for (size_t b = 0; b < full; ++b) {
    parent = KeyOfBlockLocked(b, parent);
    keys.push_back(parent);
  }
  const int n =
      table_->AcquirePrefix(keys, namespace_, spec_->model_id, token_ids_, block_tokens_, &blocks_);
  if (n > 0 && account_ != nullptr &&
      !account_->ChargeBytes(int64_t{n} * block_tokens_ * spec_->token_kv_bytes()).ok()) {
    // Over the quota: store nothing; the tenant's own commit of these tokens will say why.
    for (Block* b : blocks_) table_->Unref(b);
    blocks_.clear();
    return 0;
  }
  keys.resize(static_cast<size_t>(n));
  keys_ = std::move(keys);
  committed_ = static_cast<int64_t>(n) * block_tokens_;
  adopted_ = committed_;
  std::fill(layer_tokens_.begin(), layer_tokens_.end(), committed_);
  return committed_;
}

absl::Status Sequence::BeginAppend() {
  absl::MutexLock lock(&mu_);
  if (appending_) return absl::AbortedError(absl::StrCat("sequence '", id_, "' has another append in progress"));
  if (committed_ % block_tokens_ != 0) {
    // Appends continue the partial last block: keep it resident while they write it.
    Block* last = blocks_[static_cast<size_t>(committed_ / block_tokens_)];
    if (absl::Status s = table_->Pin({&last, 1}); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("sequence '", id_, "': ", s.message()));
    }
    txn_pins_.push_back(last);
  }
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
    return absl::InvalidArgumentError(
        absl::StrCat("keys/values must each be [", spec_->num_kv_heads, "][", n, "][",
                     spec_->head_dim, "] ", DTypeName(spec_->kv_dtype), " = ", expect,
                     " bytes; got ", keys.size(), " and ", values.size()));
  }
  if (token_start != layer_tokens_[layer]) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " holds ", layer_tokens_[layer],
                                                      " tokens; chunk starts at ", token_start));
  }
  if (token_start + n > static_cast<int64_t>(token_ids_.size())) {
    return absl::FailedPreconditionError(absl::StrCat("KV for tokens up to ", token_start + n, " but only ",
                                                      token_ids_.size(), " token ids are known"));
  }
  const size_t hb = head_bytes();
  const size_t v_offset = static_cast<size_t>(spec_->num_kv_heads) * hb;
  const int64_t need_blocks = (token_start + n + block_tokens_ - 1) / block_tokens_;
  while (static_cast<int64_t>(blocks_.size()) < need_blocks) {
    absl::StatusOr<Block*> b = table_->Allocate(spec_->num_layers, 2 * spec_->num_kv_heads * hb);
    if (!b.ok()) return b.status();
    blocks_.push_back(*b);
    txn_pins_.push_back(*b);  // Allocate pinned it for us
  }
  // Copy runs of consecutive tokens that stay inside one block: for a fixed kv-head they are
  // contiguous both in the chunk ([h][n][d]) and in the slot ([h][block_tokens][d]).
  for (int64_t i = 0; i < n;) {
    const int64_t t = token_start + i;
    Block* block = blocks_[static_cast<size_t>(t / block_tokens_)];
    if (block->immutable()) {
      return absl::InternalError(
          absl::StrCat("append to token ", t, " would write a shared block"));
    }
    const int64_t run = std::min<int64_t>(n - i, block_tokens_ - t % block_tokens_);
    uint8_t* slot = block->layer(layer);
    const size_t in_block = static_cast<size_t>(t % block_tokens_) * row;
    for (int h = 0; h < spec_->num_kv_heads; ++h) {
      const size_t src =
          (static_cast<size_t>(h) * static_cast<size_t>(n) + static_cast<size_t>(i)) * row;
      std::memcpy(slot + h * hb + in_block, keys.data() + src, static_cast<size_t>(run) * row);
      std::memcpy(slot + v_offset + h * hb + in_block, values.data() + src,
                  static_cast<size_t>(run) * row);
    }
    i += run;
  }
  layer_tokens_[layer] = token_start + n;
  return absl::OkStatus();
}

absl::Status Sequence::ReserveRows(int64_t token_start, int64_t n, std::vector<uint8_t*>* slots) {
  absl::MutexLock lock(&mu_);
  if (!appending_) return absl::FailedPreconditionError("no append in progress");
  if (n <= 0 || n > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens ", n, " outside [1, 2^24]"));
  }
  for (int l = 0; l < spec_->num_layers; ++l) {
    if (layer_tokens_[l] != token_start) {
      return absl::FailedPreconditionError(absl::StrCat("layer ", l, " holds ", layer_tokens_[l],
                                                        " tokens; the rows start at ", token_start));
    }
  }
  if (token_start + n > static_cast<int64_t>(token_ids_.size())) {
    return absl::FailedPreconditionError(absl::StrCat("KV for tokens up to ", token_start + n, " but only ",
                                                      token_ids_.size(), " token ids are known"));
  }
  const int64_t first = token_start / block_tokens_;
  const int64_t need_blocks = (token_start + n + block_tokens_ - 1) / block_tokens_;
  while (static_cast<int64_t>(blocks_.size()) < need_blocks) {
    absl::StatusOr<Block*> b = table_->Allocate(spec_->num_layers, 2 * spec_->num_kv_heads * head_bytes());
    if (!b.ok()) return b.status();
    blocks_.push_back(*b);
    txn_pins_.push_back(*b);  // Allocate pinned it for us
  }
  for (int64_t b = first; b < need_blocks; ++b) {
    if (blocks_[static_cast<size_t>(b)]->immutable()) {
      return absl::InternalError(absl::StrCat("ingest into block ", b, " would write a shared block"));
    }
  }
  for (int l = 0; l < spec_->num_layers; ++l) {
    for (int64_t b = first; b < need_blocks; ++b) slots->push_back(blocks_[static_cast<size_t>(b)]->layer(l));
  }
  return absl::OkStatus();
}

absl::Status Sequence::CompleteRows(int64_t token_start, int64_t n) {
  absl::MutexLock lock(&mu_);
  if (!appending_) return absl::FailedPreconditionError("no append in progress");
  const int64_t end = token_start + n;
  if (n <= 0 || end > static_cast<int64_t>(blocks_.size()) * block_tokens_ ||
      end > static_cast<int64_t>(token_ids_.size())) {
    return absl::FailedPreconditionError(absl::StrCat("rows [", token_start, ", ", end, ") were not reserved"));
  }
  for (int l = 0; l < spec_->num_layers; ++l) {
    if (layer_tokens_[l] != token_start) {
      return absl::FailedPreconditionError(absl::StrCat("layer ", l, " holds ", layer_tokens_[l],
                                                        " tokens; the rows start at ", token_start));
    }
  }
  for (int l = 0; l < spec_->num_layers; ++l) layer_tokens_[l] = end;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Sequence::CommitAppend() {
  std::shared_ptr<const IndexHooks> hooks;
  absl::StatusOr<int64_t> committed = CommitAppendInternal(&hooks);
  if (committed.ok() && hooks != nullptr && hooks->on_commit) hooks->on_commit(this, *committed);
  return committed;
}

absl::StatusOr<int64_t> Sequence::CommitAppendInternal(std::shared_ptr<const IndexHooks>* hooks) {
  absl::MutexLock lock(&mu_);
  if (!appending_) return absl::FailedPreconditionError("no append in progress");
  appending_ = false;
  const int64_t len = layer_tokens_[0];
  for (int l = 1; l < spec_->num_layers; ++l) {
    if (layer_tokens_[l] != len) {
      const int64_t other = layer_tokens_[l];
      UnpinTxnLocked();
      TruncateLocked(committed_);
      token_ids_.resize(static_cast<size_t>(token_ids_at_begin_));
      return absl::FailedPreconditionError(absl::StrCat("append ended with layer 0 at ", len,
                                                        " tokens but layer ", l, " at ", other,
                                                        "; nothing was committed"));
    }
  }
  const int64_t charge = (len - committed_) * spec_->token_kv_bytes();
  if (charge > 0 && account_ != nullptr) {
    if (absl::Status s = account_->ChargeBytes(charge); !s.ok()) {
      UnpinTxnLocked();
      TruncateLocked(committed_);
      token_ids_.resize(static_cast<size_t>(token_ids_at_begin_));
      return absl::Status(s.code(), absl::StrCat(s.message(), "; nothing of sequence '", id_,
                                                 "' was committed"));
    }
  }
  if (durable_) {
    // Acknowledged means on disk: blocks and metadata in one synced batch, or nothing.
    const absl::Status s =
        table_->PersistCommit(txn_pins_, MetaKey(tenant_, id_), EncodeRecordLocked(len));
    if (!s.ok()) {
      if (charge > 0 && account_ != nullptr) account_->RefundBytes(charge);
      UnpinTxnLocked();
      TruncateLocked(committed_);
      token_ids_.resize(static_cast<size_t>(token_ids_at_begin_));
      return absl::Status(s.code(), absl::StrCat("writing the append of sequence '", id_,
                                                 "' through: ", s.message(),
                                                 "; nothing was committed"));
    }
  }
  committed_ = len;
  PublishFullBlocksLocked();
  UnpinTxnLocked();
  *hooks = hooks_;
  return committed_;
}

void Sequence::PublishFullBlocksLocked() {
  const size_t full = static_cast<size_t>(committed_ / block_tokens_);
  while (keys_.size() < full) {
    const size_t b = keys_.size();
    const ContentKey parent = b == 0 ? ContentKey{} : keys_[b - 1];
    const ContentKey key = KeyOfBlockLocked(b, parent);
    table_->Publish(
        blocks_[b], parent, key, namespace_, spec_->model_id,
        absl::Span<const int32_t>(token_ids_.data() + b * static_cast<size_t>(block_tokens_),
                                  static_cast<size_t>(block_tokens_)));
    keys_.push_back(key);
  }
}

void Sequence::AbortAppend() {
  absl::MutexLock lock(&mu_);
  if (!appending_) return;
  appending_ = false;
  UnpinTxnLocked();
  TruncateLocked(committed_);
  token_ids_.resize(static_cast<size_t>(token_ids_at_begin_));
}

absl::StatusOr<int64_t> Sequence::AppendTokens(int64_t token_start, int64_t n,
                                               absl::Span<const int32_t> token_ids,
                                               absl::Span<const absl::Span<const uint8_t>> keys,
                                               absl::Span<const absl::Span<const uint8_t>> values) {
  const int layers = spec().num_layers;
  if (static_cast<int>(keys.size()) != layers || static_cast<int>(values.size()) != layers) {
    return absl::InvalidArgumentError(absl::StrCat("append has keys/values for ", keys.size(), "/",
                                                   values.size(), " layers; the model has ",
                                                   layers));
  }
  RETURN_IF_ERROR(BeginAppend());
  absl::Status written = [&]() -> absl::Status {
    if (!token_ids.empty()) RETURN_IF_ERROR(AddTokenIds(token_start, token_ids));
    for (int l = 0; l < layers; ++l)
      RETURN_IF_ERROR(AppendChunk(l, token_start, n, keys[l], values[l]));
    return absl::OkStatus();
  }();
  if (!written.ok()) {
    AbortAppend();
    return written;
  }
  // CommitAppend ends the transaction either way: aborting after it could end another writer's.
  return CommitAppend();
}

void Sequence::UnpinTxnLocked() {
  table_->Unpin(txn_pins_);
  txn_pins_.clear();
}

void Sequence::TruncateLocked(int64_t tokens) {
  const size_t keep_blocks = static_cast<size_t>((tokens + block_tokens_ - 1) / block_tokens_);
  while (blocks_.size() > keep_blocks) {
    table_->Unref(blocks_.back());
    blocks_.pop_back();
  }
  for (int l = 0; l < spec_->num_layers; ++l) layer_tokens_[l] = std::min(layer_tokens_[l], tokens);
}

std::string Sequence::MetaKey(absl::string_view tenant, absl::string_view id) {
  std::string key = "s";
  const auto n = static_cast<uint32_t>(tenant.size());
  for (int i = 0; i < 4; ++i) key.push_back(static_cast<char>(n >> (8 * i)));
  key.append(tenant.data(), tenant.size());
  key.append(id.data(), id.size());
  return key;
}

std::string Sequence::EncodeRecordLocked(int64_t committed) const {
  internal::RecordWriter w;
  w.U32(1);  // version
  w.Str(spec_->model_id);
  w.U32(static_cast<uint32_t>(block_tokens_));
  w.I64(committed);
  w.I64(adopted_);
  w.U64(token_ids_.size());
  for (int32_t t : token_ids_) w.I32(t);
  const size_t nblocks = static_cast<size_t>((committed + block_tokens_ - 1) / block_tokens_);
  w.U64(nblocks);
  for (size_t b = 0; b < nblocks; ++b) w.U64(blocks_[b]->id());
  return w.Finish();
}

void Sequence::Restore(std::vector<int32_t> token_ids, int64_t committed, int64_t adopted,
                       std::vector<Block*> blocks) {
  absl::MutexLock lock(&mu_);
  token_ids_ = std::move(token_ids);
  blocks_ = std::move(blocks);
  committed_ = committed;
  adopted_ = adopted;
  std::fill(layer_tokens_.begin(), layer_tokens_.end(), committed_);
  if (account_ != nullptr) account_->ForceChargeBytes(committed_ * spec_->token_kv_bytes());
  PublishFullBlocksLocked();
  absl::MutexLock read_lock(&read_mu_);  // the blocks were replaced: forget what reads saw
  claim_epoch_ = BlockTable::kNoEpoch;
  claim_blocks_ = 0;
  page_cache_.clear();
}

std::shared_ptr<const SequenceIndex> Sequence::index() const {
  std::shared_ptr<const SequenceIndex> held;
  std::shared_ptr<const IndexHooks> hooks;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (index_ == nullptr || !index_->on_disk) return index_;
    held = index_;
    hooks = hooks_;
  }
  if (hooks == nullptr || !hooks->load) return nullptr;
  std::shared_ptr<const SequenceIndex> loaded = hooks->load(this, std::move(held));
  return loaded != nullptr && loaded->on_disk ? nullptr : loaded;
}

std::shared_ptr<const SequenceIndex> Sequence::held_index() const {
  absl::ReaderMutexLock lock(&mu_);
  return index_;
}

bool Sequence::ReplaceIndex(const SequenceIndex* expected,
                            std::shared_ptr<const SequenceIndex> next) {
  absl::MutexLock lock(&mu_);
  if (index_.get() != expected) return false;
  index_ = std::move(next);
  return true;
}

void Sequence::set_index_hooks(std::shared_ptr<const IndexHooks> hooks) {
  absl::MutexLock lock(&mu_);
  hooks_ = std::move(hooks);
}

int64_t Sequence::resident_blocks() const {
  absl::ReaderMutexLock lock(&mu_);
  int64_t n = 0;
  for (Block::State st : table_->States(blocks_)) n += st == Block::State::kResident;
  return n;
}

}  // namespace kvrecall::kvstore
