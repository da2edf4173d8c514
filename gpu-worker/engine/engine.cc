#include "gpu-worker/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/attention.h"

namespace kvrecall::worker {

// Local KV of one sequence.
//   Dense layers: k[l], v[l] hold every token: [len][kv_heads][head_dim].
//   Sparse layers: k[l], v[l] hold the sinks (first min(len, S) tokens); ring_k[l], ring_v[l] hold
//   the window: position p >= S lives in slot (p - S) % W, [W][kv_heads][head_dim].
//   Sparse layers also keep a slot cache per kv-head: the rows the tier recalled, `budget` slots
//   that persist across steps (the tier sends only the rows of newly selected tokens).
struct Engine::Seq {
  int64_t len = 0;
  int64_t tier_len = 0;  // tokens the tier holds (len, or len + 1 after a step failed late)
  std::vector<std::vector<float>> k, v, ring_k, ring_v;
  struct SlotCache {
    uint64_t epoch = 0;             // names this cache to the tier; a new one after any failure
    std::vector<uint8_t> rows;      // [budget][K row | V row], kv_dtype
    std::vector<int32_t> selected;  // slots of the last selection, in token order
  };
  std::vector<std::vector<SlotCache>> slots;  // [layer][kv_head]; empty for dense layers
  // Lookahead: this sequence's queries of the last step, per sparse layer: [num_heads][head_dim].
  std::vector<std::vector<float>> last_q;
};

namespace internal {

bool IsTierMiss(const absl::Status& s) {
  return s.code() == absl::StatusCode::kDeadlineExceeded || s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kAborted;
}

absl::Status AppendStepTokens(client::Tier* tier, std::vector<client::SequenceAppend> appends,
                              absl::Span<int64_t* const> tier_len) {
  if (tier_len.size() != appends.size()) {
    return absl::InvalidArgumentError("one tier length per append");
  }
  std::vector<client::SequenceAppend> send;
  std::vector<int64_t*> sent_len;
  send.reserve(appends.size());
  for (size_t i = 0; i < appends.size(); ++i) {
    if (*tier_len[i] > appends[i].batch.token_start) continue;  // stored by an earlier try
    send.push_back(std::move(appends[i]));
    sent_len.push_back(tier_len[i]);
  }
  if (send.empty()) return absl::OkStatus();
  std::vector<bool> stored;
  const absl::Status st = tier->AppendKVBatch(send, &stored);
  for (size_t i = 0; i < send.size(); ++i) {
    if (st.ok() || (i < stored.size() && stored[i])) {
      *sent_len[i] = send[i].batch.token_start + send[i].batch.num_tokens;
    }
  }
  return st;
}

absl::Status PushPromptToTier(client::Tier* tier, const ModelSpec& spec,
                              const EngineOptions& options, const std::string& id,
                              absl::Span<const int32_t> tokens, const PromptKvSource& kv,
                              IndexQueries queries, double* index_build_seconds) {
  return PushPromptToTier(
      tier, spec, options, id, tokens, kv,
      [&](int64_t) -> absl::StatusOr<IndexQueries> { return queries; }, index_build_seconds);
}

absl::Status PushPromptToTier(client::Tier* tier, const ModelSpec& spec,
                              const EngineOptions& options, const std::string& id,
                              absl::Span<const int32_t> tokens, const PromptKvSource& kv,
                              const IndexQuerySource& queries, double* index_build_seconds) {
  constexpr int64_t kPushTokens = 2048;  // prompt tokens per AppendKV transaction
  const int L = spec.num_layers;
  const int64_t T = static_cast<int64_t>(tokens.size());
  ASSIGN_OR_RETURN(client::OpenResult open, tier->OpenSequence(id, spec.model_id, tokens));
  for (int64_t t0 = open.stored_tokens; t0 < T; t0 += kPushTokens) {
    client::AppendBatch b;
    b.token_start = t0;
    b.num_tokens = std::min(kPushTokens, T - t0);
    b.keys.resize(L);
    b.values.resize(L);
    kv(&b);
    RETURN_IF_ERROR(tier->AppendKV(id, b));
  }
  if (options.method == client::Method::kExact) return absl::OkStatus();
  kvstore::BuildIndexArgs args;
  args.method = options.method;
  args.first_layer = options.dense_layers;
  args.token_begin = std::min<int64_t>(options.sink_tokens, T - 1);
  if (options.method == client::Method::kCtkvr) {
    ASSIGN_OR_RETURN(IndexQueries q, queries(open.stored_tokens));
    if (q.end <= args.token_begin || q.end > T) {
      return absl::InvalidArgumentError(absl::StrCat("index queries end at ", q.end, ", outside (",
                                                     args.token_begin, ", ", T, "]"));
    }
    args.token_end = q.end < T ? q.end : 0;
    args.num_queries = q.num;
    args.layer_queries = std::move(q.layers);
    args.ctkvr_list_size = q.list_size;
    args.ctkvr_lists = std::move(q.lists);
  }
  ASSIGN_OR_RETURN(kvstore::BuildIndexOutcome built, tier->BuildIndex(id, std::move(args)));
  *index_build_seconds += built.build_seconds;
  return absl::OkStatus();
}

std::vector<int32_t> IndexQueryPositions(const EngineOptions& options, int64_t num_tokens) {
  const int64_t window = std::min<int64_t>(num_tokens, std::max(1, options.index_query_window));
  const int64_t n = std::min<int64_t>(window, std::max(1, options.index_queries));
  std::vector<int32_t> positions;
  positions.reserve(static_cast<size_t>(n));
  for (int64_t j = n - 1; j >= 0; --j) {
    positions.push_back(static_cast<int32_t>(num_tokens - 1 - j * (window / n)));
  }
  return positions;
}

PromptKvSource PromptKvSourceOf(const ModelSpec& spec, const PromptKV& prompt) {
  return [&spec, &prompt](client::AppendBatch* b) {
    const int Hkv = spec.num_kv_heads, d = spec.head_dim;
    const size_t row = spec.row_bytes();
    for (int l = 0; l < spec.num_layers; ++l) {
      for (auto [src, dst] : {std::pair{&prompt.k[l], &b->keys[l]}, std::pair{&prompt.v[l], &b->values[l]}}) {
        dst->resize(static_cast<size_t>(Hkv * b->num_tokens) * row);
        for (int h = 0; h < Hkv; ++h) {  // [t][h][d] -> [h][t][d]
          for (int64_t i = 0; i < b->num_tokens; ++i) {
            FromF32(spec.kv_dtype, src->data() + (static_cast<size_t>(b->token_start + i) * Hkv + h) * d, d,
                    dst->data() + (static_cast<size_t>(h) * b->num_tokens + i) * row);
          }
        }
      }
    }
  };
}

}  // namespace internal

using internal::IsTierMiss;

Engine::Engine(ModelBackend* model, client::Tier* tier, ModelSpec spec, const EngineOptions& options)
    : model_(model),
      tier_(tier),
      spec_(std::move(spec)),
      options_(options),
      config_(model->config()),
      pool_(options.num_threads) {}

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(ModelBackend* model, client::Tier* tier, ModelSpec spec,
                                                       const EngineOptions& options) {
  const LlamaConfig& c = model->config();
  if (spec.num_layers != c.num_layers || spec.num_q_heads != c.num_heads || spec.num_kv_heads != c.num_kv_heads ||
      spec.head_dim != c.head_dim) {
    return absl::InvalidArgumentError("model spec does not match the model's config");
  }
  if (options.sparse) {
    if (tier == nullptr) return absl::InvalidArgumentError("sparse mode needs a tier");
    if (options.window_tokens < 2 || options.sink_tokens < 0 || options.budget < 1 || options.dense_layers < 0) {
      return absl::InvalidArgumentError("need window_tokens >= 2, sink_tokens >= 0, budget >= 1, dense_layers >= 0");
    }
  }
  if (options.prefill_chunk < 1) return absl::InvalidArgumentError("prefill_chunk must be >= 1");
  return std::unique_ptr<Engine>(new Engine(model, tier, std::move(spec), options));
}

void Engine::RoundKv(float* x, size_t n) const {
  for (size_t i = 0; i < n; ++i) x[i] = RoundTrip(spec_.kv_dtype, x[i]);
}

absl::StatusOr<PromptKV> Engine::Prefill(absl::Span<const int32_t> tokens, std::vector<float>* logits) {
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  const int64_t T = static_cast<int64_t>(tokens.size());
  const int L = config_.num_layers, Hq = config_.num_heads, Hkv = config_.num_kv_heads, d = config_.head_dim;
  const int G = Hq / Hkv;
  const size_t rowf = static_cast<size_t>(Hkv) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  PromptKV p;
  p.tokens.assign(tokens.begin(), tokens.end());
  p.k.assign(L, {});
  p.v.assign(L, {});
  p.q.assign(L, {});
  p.query_positions = internal::IndexQueryPositions(options_, T);
  for (int l = 0; l < L; ++l) {
    p.k[l].resize(static_cast<size_t>(T) * rowf);
    p.v[l].resize(static_cast<size_t>(T) * rowf);
  }
  std::vector<float> x, q, attn;
  for (int64_t c0 = 0; c0 < T; c0 += options_.prefill_chunk) {
    const int64_t C = std::min<int64_t>(options_.prefill_chunk, T - c0);
    std::vector<int32_t> pos(static_cast<size_t>(C));
    for (int64_t i = 0; i < C; ++i) pos[i] = static_cast<int32_t>(c0 + i);
    x.resize(static_cast<size_t>(C) * config_.hidden_size);
    q.resize(static_cast<size_t>(C) * Hq * d);
    attn.resize(q.size());
    RETURN_IF_ERROR(model_->Embed(tokens.subspan(c0, C), x.data()));
    for (int l = 0; l < L; ++l) {
      float* k = p.k[l].data() + c0 * rowf;
      float* v = p.v[l].data() + c0 * rowf;
      RETURN_IF_ERROR(model_->Qkv(l, x.data(), pos, q.data(), k, v));
      RoundKv(k, C * rowf);
      RoundKv(v, C * rowf);
      if (options_.observer != nullptr) options_.observer->OnQkv(l, {}, pos, q.data(), k, v);
      if (IsSparse(l)) {  // keep the sampled prompt queries of this chunk (positions ascending)
        for (int32_t qp : p.query_positions) {
          if (qp >= c0 && qp < c0 + C) {
            const float* row = q.data() + static_cast<size_t>(qp - c0) * Hq * d;
            p.q[l].insert(p.q[l].end(), row, row + static_cast<size_t>(Hq) * d);
          }
        }
      }
      const float* K = p.k[l].data();
      const float* V = p.v[l].data();
      pool_.ParallelFor(C * Hkv, [&](int64_t i) {
        const int64_t t = i / Hkv;
        const int h = static_cast<int>(i % Hkv);
        const size_t qoff = (static_cast<size_t>(t) * Hq + static_cast<size_t>(h) * G) * d;
        AttendRows(q.data() + qoff, G, d, K + h * d, static_cast<long>(rowf), V + h * d, static_cast<long>(rowf),
                   static_cast<int>(c0 + t + 1), scale, attn.data() + qoff);
      });
      RETURN_IF_ERROR(model_->FinishLayer(l, attn.data(), static_cast<int>(C), x.data()));
    }
    if (c0 + C == T) {
      logits->resize(config_.vocab_size);
      RETURN_IF_ERROR(model_->Logits(x.data() + (C - 1) * config_.hidden_size, 1, logits->data()));
    }
  }
  return p;
}

absl::Status Engine::AddSequence(const std::string& id, const PromptKV& prompt) {
  if (seqs_.count(id)) return absl::AlreadyExistsError(absl::StrCat("sequence '", id, "' is already running"));
  const int L = config_.num_layers;
  const size_t rowf = static_cast<size_t>(config_.num_kv_heads) * config_.head_dim;
  const int64_t T = static_cast<int64_t>(prompt.tokens.size());
  if (static_cast<int>(prompt.k.size()) != L || static_cast<int>(prompt.v.size()) != L) {
    return absl::InvalidArgumentError("prompt KV has the wrong number of layers");
  }
  if (options_.sparse) {
    std::vector<absl::Span<const float>> queries;
    for (int l = options_.dense_layers; l < L; ++l) queries.push_back(prompt.q[l]);
    RETURN_IF_ERROR(internal::PushPromptToTier(
        tier_, spec_, options_, id, prompt.tokens, internal::PromptKvSourceOf(spec_, prompt),
        {T, static_cast<int>(prompt.query_positions.size()), queries},
        &counters_.index_build_seconds));
  }
  auto s = std::make_unique<Seq>();
  s->len = T;
  s->tier_len = T;
  s->k.resize(L);
  s->v.resize(L);
  s->ring_k.resize(L);
  s->ring_v.resize(L);
  s->slots.resize(L);
  s->last_q.resize(L);
  const int64_t S = options_.sink_tokens, W = options_.window_tokens;
  for (int l = 0; l < L; ++l) {
    if (!IsSparse(l)) {
      s->k[l] = prompt.k[l];
      s->v[l] = prompt.v[l];
      continue;
    }
    const int64_t sinks = std::min(T, S);
    s->k[l].assign(prompt.k[l].begin(), prompt.k[l].begin() + sinks * rowf);
    s->v[l].assign(prompt.v[l].begin(), prompt.v[l].begin() + sinks * rowf);
    s->slots[l].resize(static_cast<size_t>(config_.num_kv_heads));
    for (auto& cache : s->slots[l]) cache.epoch = ++next_epoch_;
    s->ring_k[l].assign(static_cast<size_t>(W) * rowf, 0.0f);
    s->ring_v[l].assign(static_cast<size_t>(W) * rowf, 0.0f);
    for (int64_t p = std::max(S, T - W); p < T; ++p) {
      const size_t slot = static_cast<size_t>((p - S) % W);
      std::copy_n(prompt.k[l].begin() + p * rowf, rowf, s->ring_k[l].begin() + slot * rowf);
      std::copy_n(prompt.v[l].begin() + p * rowf, rowf, s->ring_v[l].begin() + slot * rowf);
    }
  }
  seqs_[id] = std::move(s);
  return absl::OkStatus();
}

absl::Status Engine::RemoveSequence(const std::string& id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("no sequence '", id, "'"));
  seqs_.erase(it);
  if (options_.sparse) return tier_->CloseSequence(id, /*drop=*/true);
  return absl::OkStatus();
}

absl::Status Engine::RetrieveLayer(int l, absl::Span<Seq* const> seqs, absl::Span<const std::string> ids,
                                   absl::Span<const int32_t> pos, const std::function<const float*(int)>& queries,
                                   int staging_area, bool lookahead) {
  const int B = static_cast<int>(seqs.size());
  const int Hkv = config_.num_kv_heads, G = config_.num_heads / Hkv, d = config_.head_dim;
  const int64_t S = options_.sink_tokens, W = options_.window_tokens;
  client::RetrieveBatch batch{l, options_.budget, options_.method, {}, staging_area,
                              RetrieveSuccessors(options_, lookahead)};
  std::vector<Seq::SlotCache*> caches;
  caches.reserve(static_cast<size_t>(B) * Hkv);
  batch.entries.reserve(static_cast<size_t>(B) * Hkv);
  for (int i = 0; i < B; ++i) {
    const int64_t ws = std::max<int64_t>(S, pos[i] + 1 - W);
    if (ws <= S) continue;  // everything is sink or window
    for (int h = 0; h < Hkv; ++h) {
      Seq::SlotCache& cache = seqs[i]->slots[l][h];
      caches.push_back(&cache);
      batch.entries.push_back({ids[i], h, absl::MakeConstSpan(queries(i) + static_cast<size_t>(h) * G * d,
                                                               static_cast<size_t>(G) * d),
                               S, ws, options_.delta_streaming ? cache.epoch : 0});
    }
  }
  if (batch.entries.empty()) return absl::OkStatus();
  const absl::Time t0 = absl::Now();
  std::vector<client::Recalled> recalled;
  absl::Status st = tier_->Retrieve(batch, &recalled);
  counters_.retrieve_seconds += absl::ToDoubleSeconds(absl::Now() - t0);
  counters_.retrieve_calls++;
  if (!st.ok()) {
    // Whatever the tier put or remembers for this call is unknown: new epochs make it resend.
    for (Seq::SlotCache* cache : caches) cache->epoch = ++next_epoch_;
    return st;
  }
  const size_t pair = 2 * spec_.row_bytes();
  for (size_t e = 0; e < caches.size(); ++e) {
    client::Recalled& r = recalled[e];
    Seq::SlotCache& cache = *caches[e];
    if (cache.rows.empty()) cache.rows.resize(static_cast<size_t>(options_.budget) * pair);
    client::internal::ApplyFills(r, pair, cache.rows.data());
    counters_.recalled_rows += static_cast<int64_t>(r.token_ids.size());
    counters_.streamed_rows += static_cast<int64_t>(r.fill_slots.size());
    cache.selected = std::move(r.slots);
  }
  return absl::OkStatus();
}

absl::Status Engine::Step(absl::Span<const std::string> ids, absl::Span<const int32_t> tokens,
                          std::vector<float>* logits) {
  if (ids.size() != tokens.size() || ids.empty()) return absl::InvalidArgumentError("need one token per sequence");
  const int B = static_cast<int>(ids.size());
  const int L = config_.num_layers, Hq = config_.num_heads, Hkv = config_.num_kv_heads, d = config_.head_dim;
  const int G = Hq / Hkv;
  const size_t rowf = static_cast<size_t>(Hkv) * d;
  const int64_t S = options_.sink_tokens, W = options_.window_tokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  std::vector<Seq*> seqs(B);
  std::vector<int32_t> pos(B);
  for (int i = 0; i < B; ++i) {
    auto it = seqs_.find(ids[i]);
    if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("no sequence '", ids[i], "'"));
    seqs[i] = it->second.get();
    pos[i] = static_cast<int32_t>(seqs[i]->len);
  }
  std::vector<float> x(static_cast<size_t>(B) * config_.hidden_size), q(static_cast<size_t>(B) * Hq * d),
      attn(q.size());
  // New rows of every layer, kept for the tier append: [layer][B][kv_heads][head_dim].
  std::vector<std::vector<float>> new_k(L, std::vector<float>(B * rowf)), new_v = new_k;
  RETURN_IF_ERROR(model_->Embed(tokens, x.data()));

  // Lookahead: every sparse layer's retrieval is issued now, from the last step's queries, on
  // a thread of its own (one staging area per layer), and overlaps this step's compute.
  const bool lookahead = options_.sparse && options_.lookahead && std::all_of(seqs.begin(), seqs.end(), [&](Seq* s) {
    return !s->last_q[L - 1].empty();
  });
  struct Prefetch {
    absl::Status status;
    absl::Notification done;
  };
  std::vector<Prefetch> prefetch(static_cast<size_t>(L));
  std::thread prefetcher;
  if (lookahead) {
    prefetcher = std::thread([&] {
      for (int l = options_.dense_layers; l < L; ++l) {
        prefetch[l].status = RetrieveLayer(l, seqs, ids, pos, [&](int i) { return seqs[i]->last_q[l].data(); },
                                           l - options_.dense_layers, /*lookahead=*/true);
        prefetch[l].done.Notify();
      }
    });
  }
  absl::Cleanup join = [&] {
    if (prefetcher.joinable()) prefetcher.join();
  };
  for (int l = 0; l < L; ++l) {
    float* k = new_k[l].data();
    float* v = new_v[l].data();
    RETURN_IF_ERROR(model_->Qkv(l, x.data(), pos, q.data(), k, v));
    RoundKv(k, B * rowf);
    RoundKv(v, B * rowf);
    if (options_.observer != nullptr) options_.observer->OnQkv(l, ids, pos, q.data(), k, v);
    const bool sparse = IsSparse(l);
    // Store the new rows locally.
    for (int i = 0; i < B; ++i) {
      Seq& s = *seqs[i];
      const int64_t p = pos[i];
      if (!sparse || p < S) {
        // At row p, not appended: a step retried after a failure writes the same rows again.
        s.k[l].resize(static_cast<size_t>(p + 1) * rowf);
        s.v[l].resize(static_cast<size_t>(p + 1) * rowf);
        std::copy_n(k + i * rowf, rowf, s.k[l].begin() + static_cast<size_t>(p) * rowf);
        std::copy_n(v + i * rowf, rowf, s.v[l].begin() + static_cast<size_t>(p) * rowf);
      } else {
        const size_t slot = static_cast<size_t>((p - S) % W);
        std::copy_n(k + i * rowf, rowf, s.ring_k[l].begin() + slot * rowf);
        std::copy_n(v + i * rowf, rowf, s.ring_v[l].begin() + slot * rowf);
      }
    }
    if (!sparse) {
      pool_.ParallelFor(static_cast<int64_t>(B) * Hkv, [&](int64_t j) {
        const int i = static_cast<int>(j / Hkv), h = static_cast<int>(j % Hkv);
        const size_t qoff = (static_cast<size_t>(i) * Hq + static_cast<size_t>(h) * G) * d;
        AttendRows(q.data() + qoff, G, d, seqs[i]->k[l].data() + h * d, static_cast<long>(rowf),
                   seqs[i]->v[l].data() + h * d, static_cast<long>(rowf), pos[i] + 1, scale, attn.data() + qoff);
      });
    } else {
      // The tier's selection for the middle [S, window_start) of every (sequence, kv-head): issued
      // now from this step's queries, or at the start of the step from the last step's
      // (lookahead). A tier that fails in a way worth waiting out (deadline, unavailable, a stale
      // call) costs accuracy, not the step: the layer runs on sinks + window + what is resident.
      absl::Status got;
      if (lookahead) {
        prefetch[l].done.WaitForNotification();
        got = prefetch[l].status;
      } else {
        got = RetrieveLayer(l, seqs, ids, pos, [&](int i) { return q.data() + static_cast<size_t>(i) * Hq * d; }, 0,
                          /*lookahead=*/false);
      }
      if (!got.ok()) {
        if (!IsTierMiss(got)) return got;
        counters_.fallback_layers++;
        if (counters_.fallback_layers == 1 || counters_.fallback_layers % 1000 == 0) {
          KV_LOG(WARNING) << "tier missed layer " << l << " (" << got.ToString() << "); decoding it on sinks + window + "
                          << "resident rows (" << counters_.fallback_layers << " so far)";
        }
      }
      const size_t row_bytes = spec_.row_bytes();
      pool_.ParallelFor(static_cast<int64_t>(B) * Hkv, [&](int64_t j) {
        const int i = static_cast<int>(j / Hkv), h = static_cast<int>(j % Hkv);
        const Seq& s = *seqs[i];
        const int64_t p = pos[i];
        const int64_t ws = std::max<int64_t>(S, p + 1 - W);
        const Seq::SlotCache& cache = s.slots[l][h];
        const size_t nrec = ws > S ? cache.selected.size() : 0;
        const int64_t nsink = std::min<int64_t>(S, p + 1);
        const int64_t nwin = p >= S ? p - ws + 1 : 0;
        const size_t m = static_cast<size_t>(nsink) + nrec + static_cast<size_t>(nwin);
        std::vector<float> keys(m * d), vals(m * d);
        size_t r = 0;
        for (int64_t t = 0; t < nsink; ++t, ++r) {  // sinks, then recalled, then window: positional order
          std::copy_n(s.k[l].begin() + t * rowf + h * d, d, keys.begin() + r * d);
          std::copy_n(s.v[l].begin() + t * rowf + h * d, d, vals.begin() + r * d);
        }
        for (size_t t = 0; t < nrec; ++t, ++r) {
          const uint8_t* pair = cache.rows.data() + static_cast<size_t>(cache.selected[t]) * 2 * row_bytes;
          ToF32(spec_.kv_dtype, pair, d, keys.data() + r * d);
          ToF32(spec_.kv_dtype, pair + row_bytes, d, vals.data() + r * d);
        }
        for (int64_t t = ws; t <= p && nwin > 0; ++t, ++r) {
          const size_t slot = static_cast<size_t>((t - S) % W);
          std::copy_n(s.ring_k[l].begin() + slot * rowf + h * d, d, keys.begin() + r * d);
          std::copy_n(s.ring_v[l].begin() + slot * rowf + h * d, d, vals.begin() + r * d);
        }
        const size_t qoff = (static_cast<size_t>(i) * Hq + static_cast<size_t>(h) * G) * d;
        AttendRows(q.data() + qoff, G, d, keys.data(), d, vals.data(), d, static_cast<int>(m), scale,
                   attn.data() + qoff);
      });
      if (options_.lookahead) {
        for (int i = 0; i < B; ++i) {
          seqs[i]->last_q[l].assign(q.begin() + static_cast<size_t>(i) * Hq * d,
                                    q.begin() + static_cast<size_t>(i + 1) * Hq * d);
        }
      }
    }
    RETURN_IF_ERROR(model_->FinishLayer(l, attn.data(), B, x.data()));
  }
  logits->resize(static_cast<size_t>(B) * config_.vocab_size);
  RETURN_IF_ERROR(model_->Logits(x.data(), B, logits->data()));

  if (options_.sparse) {
    // The new tokens join the tier's copy of each sequence (their ids travel with their KV).
    const absl::Time t0 = absl::Now();
    const size_t row = spec_.row_bytes();
    std::vector<client::SequenceAppend> appends(B);
    for (int i = 0; i < B; ++i) {
      appends[i].sequence_id = ids[i];
      client::AppendBatch& b = appends[i].batch;
      b.token_start = pos[i];
      b.num_tokens = 1;
      b.token_ids = {tokens[i]};
      b.keys.resize(L);
      b.values.resize(L);
      for (int l = 0; l < L; ++l) {
        b.keys[l].resize(Hkv * row);
        b.values[l].resize(Hkv * row);
        FromF32(spec_.kv_dtype, new_k[l].data() + i * rowf, rowf, b.keys[l].data());
        FromF32(spec_.kv_dtype, new_v[l].data() + i * rowf, rowf, b.values[l].data());
      }
    }
    std::vector<int64_t*> tier_len(B);
    for (int i = 0; i < B; ++i) tier_len[i] = &seqs[i]->tier_len;
    RETURN_IF_ERROR(internal::AppendStepTokens(tier_, std::move(appends), tier_len));
    counters_.append_seconds += absl::ToDoubleSeconds(absl::Now() - t0);
  }
  for (int i = 0; i < B; ++i) seqs[i]->len++;
  counters_.steps++;
  counters_.tokens_decoded += B;
  return absl::OkStatus();
}

}  // namespace kvrecall::worker
