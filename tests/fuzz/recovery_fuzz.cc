// Fuzz target: the durable metadata records of the tier node's RocksDB (--data-dir), through a
// real node's recovery: model, sequence, block and index records, and everything the node does
// with what it decoded. (fuzz_record covers the block and segment decoders on bytes alone, much
// faster; a recovery opens RocksDB twice, about 100 ms under ASan.)
//
// Input: entries [u8 flags][u8 key length][key][u16 LE value length][value]; flags & 3 picks the
// column family (0 meta, 1 blocks, 2 segments; 3 counts as 0), flags & 0x80 recomputes the
// value's CRC-32C (block records: in the header; others: the trailing one of
// internal/records.h), so that mutations get past the checksums. They are written into a RocksDB
// (in memory), a durable Node (block_tokens 4) recovers from it, and every recovered sequence is
// read (ReadRows of every layer: block reloads), searched (Retrieve exact and cluster: index
// reloads) and dropped.
// An error status is the expected answer to damage; crashes, sanitizer reports, hangs and leaks
// are findings.
//
// KVRECALL_FUZZ_WRITE_SEEDS=DIR: writes seeds made by a real durable node into DIR and exits.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/clock.h"
#include "kvstore/block_store.h"
#include "kvstore/internal/crc32c.h"
#include "kvstore/node.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"

namespace kvrecall::kvstore {
namespace {

constexpr int kBlockTokens = 4;
std::string* g_dir = nullptr;  // the data directory's real path (BlockStore's marker file only)

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "fuzz_recovery: %s\n", what);
  std::abort();
}

void PutLe32(std::string* s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*s)[at + i] = static_cast<char>(v >> (8 * i));
}

struct Entry {
  int cf = 0;  // 0 meta, 1 blocks, 2 segments
  std::string key, value;
};

// Records end with their CRC-32C (internal/records.h); block records carry it in the header.
void FixCrc(Entry* e) {
  if (e->cf == 1) {
    if (e->value.size() < kBlockRecordHeaderBytes) return;
    uint32_t crc = internal::Crc32c(e->value.data(), 16);
    crc = internal::Crc32cExtend(crc, e->value.data() + kBlockRecordHeaderBytes,
                                 e->value.size() - kBlockRecordHeaderBytes);
    PutLe32(&e->value, 16, crc);
  } else if (e->value.size() >= 4) {
    PutLe32(&e->value, e->value.size() - 4, internal::Crc32c(e->value.data(), e->value.size() - 4));
  }
}

std::vector<Entry> ParseEntries(const uint8_t* p, size_t n) {
  std::vector<Entry> out;
  size_t i = 0;
  while (i + 2 <= n) {
    const uint8_t flags = p[i];
    const size_t klen = std::min<size_t>(p[i + 1], n - i - 2);
    Entry e;
    e.cf = (flags & 3) % 3;
    e.key.assign(reinterpret_cast<const char*>(p) + i + 2, klen);
    i += 2 + klen;
    size_t vlen = 0;
    if (i + 2 <= n) vlen = p[i] | (size_t{p[i + 1]} << 8);
    i = std::min(i + 2, n);
    vlen = std::min(vlen, n - i);
    e.value.assign(reinterpret_cast<const char*>(p) + i, vlen);
    i += vlen;
    if (flags & 0x80) FixCrc(&e);
    out.push_back(std::move(e));
  }
  return out;
}

NodeOptions DurableOptions(rocksdb::Env* env) {
  NodeOptions o;
  o.memory_bytes = 64 << 10;
  o.block_tokens = kBlockTokens;
  o.search_threads = 1;
  o.try_hugepages = false;
  o.data_dir = *g_dir;
  o.durable = true;
  o.store_env = env;
  o.auto_index = indexer::Method::kExact;  // no background builds: one input, one outcome
  return o;
}

// Reads, searches and drops every sequence of `node`.
void Exercise(Node* node) {
  const NodeStats stats = node->Stats(true);
  for (const SequenceStats& q : stats.sequences) {
    absl::StatusOr<std::shared_ptr<const ModelSpec>> spec = node->GetModel(q.model_id);
    if (!spec.ok()) Fail("a recovered sequence's model is not registered");
    const int64_t n = std::min<int64_t>(q.stored_tokens, 64);
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) ids[static_cast<size_t>(t)] = static_cast<int32_t>(t);
    for (int layer = 0; layer < (*spec)->num_layers && layer < 4; ++layer) {
      std::string k, v;
      if (node->ReadRows(q.tenant, q.sequence_id, layer, 0, ids, &k, &v).ok() &&
          k.size() != ids.size() * (*spec)->row_bytes()) {
        Fail("ReadRows answered OK with the wrong number of bytes");
      }
    }
    const int group = (*spec)->num_q_heads / (*spec)->num_kv_heads;
    std::vector<float> queries(static_cast<size_t>(group) * (*spec)->head_dim, 0.5f);
    for (indexer::Method m : {indexer::Method::kExact, indexer::Method::kCluster}) {
      RetrieveArgs a;
      a.tenant = q.tenant;
      a.layer = (*spec)->num_layers - 1;
      a.budget = 3;
      a.method = m;
      a.entries.push_back({q.sequence_id, 0, queries, 0, q.stored_tokens, 0, 0});
      (void)node->Retrieve(a);
    }
    (void)node->CloseSequence(q.tenant, q.sequence_id, /*drop=*/true);
  }
  node->WaitForIndexJobs();
}

void FuzzRecovery(const uint8_t* data, size_t size) {
  const std::vector<Entry> entries = ParseEntries(data, size);
  std::unique_ptr<rocksdb::Env> env(rocksdb::NewMemEnv(rocksdb::Env::Default()));
  {
    absl::StatusOr<std::unique_ptr<BlockStore>> store =
        BlockStore::Open(BlockStoreOptions{*g_dir, /*durable=*/true, env.get()});
    if (!store.ok()) Fail("cannot open the in-memory store");
    std::unique_ptr<BlockStore::Batch> batch = (*store)->NewBatch();
    for (const Entry& e : entries) {
      if (e.cf == 0) {
        batch->PutMeta(e.key, e.value);
      } else if (e.cf == 2) {
        batch->PutSegment(e.key, e.value);
      } else if (!(*store)->PutRaw(e.key, e.value).ok()) {
        Fail("cannot write a block record");
      }
    }
    if (!(*store)->Commit(batch.get()).ok()) Fail("cannot write the metadata");
  }
  FakeClock clock;
  Node node(DurableOptions(env.get()), nullptr, &clock);
  Exercise(&node);
}


// The entries of `input` (the format above) other than those of column family `cf`.
std::string Without(const std::string& input, int cf) {
  std::string out;
  size_t i = 0;
  while (i + 2 <= input.size()) {
    const size_t klen = static_cast<uint8_t>(input[i + 1]);
    const size_t at = i + 2 + klen;
    const size_t vlen = static_cast<uint8_t>(input[at]) | (size_t{static_cast<uint8_t>(input[at + 1])} << 8);
    const size_t next = at + 2 + vlen;
    if ((input[i] & 3) != cf) out.append(input, i, next - i);
    i = next;
  }
  return out;
}

// Seeds: what a real durable node writes (two models, sequences sharing a prefix, a cluster
// index), read back column family by column family.
void WriteSeeds(const std::string& dir) {
  std::unique_ptr<rocksdb::Env> env(rocksdb::NewMemEnv(rocksdb::Env::Default()));
  FakeClock clock;
  {
    Node node(DurableOptions(env.get()), nullptr, &clock);
    ModelSpec spec;
    spec.model_id = "m";
    spec.num_layers = 2;
    spec.num_q_heads = 2;
    spec.num_kv_heads = 1;
    spec.head_dim = 4;
    spec.kv_dtype = DType::kBF16;
    spec.vocab_size = 64;
    if (!node.RegisterModel(spec).ok()) Fail("seed: RegisterModel");
    std::vector<int32_t> ids(24);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i % 7);
    for (const char* id : {"a", "b"}) {
      const size_t n = id[0] == 'a' ? 24 : 10;
      // b shares a's first full blocks (prefix sharing) and stores the rest.
      absl::StatusOr<OpenSequenceResult> opened =
          node.OpenSequence({"t", "m", id, absl::MakeConstSpan(ids.data(), n)});
      if (!opened.ok()) Fail("seed: OpenSequence");
      const int64_t start = opened->matched_tokens;
      absl::StatusOr<std::shared_ptr<Sequence>> seq = node.FindSequence("t", id);
      if (!seq.ok() || !(*seq)->BeginAppend().ok()) Fail("seed: BeginAppend");
      std::vector<uint8_t> kv(static_cast<size_t>(n - start) * spec.row_bytes());
      for (size_t i = 0; i < kv.size(); ++i) kv[i] = static_cast<uint8_t>(i % 2 ? 0x3e : i * 7);
      const absl::Span<const uint8_t> rows(kv.data(), kv.size());
      for (int l = 0; l < spec.num_layers; ++l) {
        if (!(*seq)->AppendChunk(l, start, static_cast<int>(n - start), rows, rows).ok()) {
          Fail("seed: Append");
        }
      }
      if (!(*seq)->CommitAppend().ok()) Fail("seed: Commit");
    }
    BuildIndexArgs b;
    b.tenant = "t";
    b.sequence_id = "a";
    b.method = indexer::Method::kCluster;
    b.first_layer = 1;
    b.token_begin = 2;
    if (!node.BuildIndex(b).ok()) Fail("seed: BuildIndex");
    node.WaitForIndexJobs();
  }
  // Read every column family back.
  rocksdb::DBOptions db;
  db.env = env.get();
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
      {rocksdb::kDefaultColumnFamilyName, {}}, {"blocks", {}}, {"segments", {}}, {"meta", {}}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  if (!rocksdb::DB::OpenForReadOnly(db, *g_dir, cfs, &handles, &raw).ok()) Fail("seed: reopen");
  std::string all;
  for (int cf : {0, 1, 2}) {
    rocksdb::ColumnFamilyHandle* h = handles[cf == 0 ? 3 : cf];
    std::unique_ptr<rocksdb::Iterator> it(raw->NewIterator(rocksdb::ReadOptions(), h));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      const rocksdb::Slice k = it->key(), v = it->value();
      all.push_back(static_cast<char>(0x80 | cf));
      all.push_back(static_cast<char>(k.size()));
      all.append(k.data(), k.size());
      all.push_back(static_cast<char>(v.size() & 0xff));
      all.push_back(static_cast<char>(v.size() >> 8));
      all.append(v.data(), v.size());
    }
  }
  for (rocksdb::ColumnFamilyHandle* h : handles) raw->DestroyColumnFamilyHandle(h);
  delete raw;
  std::ofstream(dir + "/durable_node", std::ios::binary) << all;
  // The same without the index records (the node rebuilds) and without the blocks (DATA_LOSS).
  std::ofstream(dir + "/durable_node_no_blocks", std::ios::binary) << Without(all, 1);
  std::ofstream(dir + "/durable_node_no_index", std::ios::binary) << Without(all, 2);
}
}  // namespace
}  // namespace kvrecall::kvstore

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace kvrecall::kvstore;
  std::string tmpl = (std::filesystem::temp_directory_path() / "fuzz_recovery.XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) Fail("mkdtemp");
  g_dir = new std::string(tmpl);
  if (const char* dir = std::getenv("KVRECALL_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::filesystem::remove_all(*g_dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvrecall::kvstore::FuzzRecovery(data, size);
  return 0;
}
