#include "transport/transport.h"

#include <ucp/api/ucp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "transport/internal/envelope.h"

namespace kvrecall::transport {
namespace {

using ::kvrecall::testing::StatusIs;

constexpr size_t kRowBytes = 512;

// Row `row` of a deterministic source pattern: every byte depends on (row, byte, salt) and none is
// zero, so an unwritten (zeroed) row can never pass for a written one.
std::vector<uint8_t> MakeRows(size_t rows, uint8_t salt) {
  std::vector<uint8_t> out(rows * kRowBytes);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<uint8_t>(1 + (i * 131 + i / kRowBytes * 7 + salt) % 255);
  }
  return out;
}

// Puts `src` rows to the slots in `slots` (slot s = bytes [s * kRowBytes, (s + 1) * kRowBytes)).
std::vector<PutOp> ScatterOps(const std::vector<uint8_t>& src, const std::vector<size_t>& slots) {
  std::vector<PutOp> ops;
  for (size_t i = 0; i < slots.size(); ++i) {
    ops.push_back(PutOp{src.data() + i * kRowBytes, kRowBytes, slots[i] * kRowBytes});
  }
  return ops;
}

// Checks that `region` holds row i of `src` at slot slots[i] and zeros in every other slot.
void ExpectScattered(const uint8_t* region, size_t region_slots, const std::vector<uint8_t>& src,
                     const std::vector<size_t>& slots) {
  std::vector<int> row_at(region_slots, -1);
  for (size_t i = 0; i < slots.size(); ++i) row_at[slots[i]] = static_cast<int>(i);
  const std::vector<uint8_t> zero(kRowBytes, 0);
  for (size_t s = 0; s < region_slots; ++s) {
    const uint8_t* want = row_at[s] < 0 ? zero.data() : src.data() + row_at[s] * kRowBytes;
    ASSERT_EQ(std::memcmp(region + s * kRowBytes, want, kRowBytes), 0) << "slot " << s;
  }
}

// Gets row slots[i] of a region holding `src` (row s at slot s) into row i of the result, checks
// every byte, and that a get outside the region, or into null, reads nothing and fails clearly.
void ExpectGetsReadRows(RemoteWriter& reader, const std::vector<uint8_t>& src,
                        const std::vector<size_t>& slots) {
  std::vector<uint8_t> got(slots.size() * kRowBytes, 0);
  std::vector<GetOp> ops;
  for (size_t i = 0; i < slots.size(); ++i)
    ops.push_back(GetOp{got.data() + i * kRowBytes, kRowBytes, slots[i] * kRowBytes});
  ops.push_back(GetOp{nullptr, 0, 0});  // zero-length: skipped
  ASSERT_OK(reader.GetAll(ops));
  for (size_t i = 0; i < slots.size(); ++i) {
    ASSERT_EQ(std::memcmp(got.data() + i * kRowBytes, src.data() + slots[i] * kRowBytes, kRowBytes),
              0)
        << i;
  }
  const uint64_t length = reader.region().length;
  std::vector<uint8_t> untouched(2 * kRowBytes, 0);
  const std::vector<GetOp> outside = {
      {untouched.data(), kRowBytes, 0},
      {untouched.data() + kRowBytes, kRowBytes, length - kRowBytes + 1}};
  EXPECT_THAT(reader.GetAll(outside), StatusIs(absl::StatusCode::kOutOfRange));
  const GetOp overflow{untouched.data(), kRowBytes, ~uint64_t{0} - 10};
  EXPECT_THAT(reader.GetAll({&overflow, 1}), StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_EQ(untouched, std::vector<uint8_t>(2 * kRowBytes, 0));  // the valid first op did not run
  const GetOp null_dst{nullptr, kRowBytes, 0};
  EXPECT_THAT(reader.GetAll({&null_dst, 1}), StatusIs(absl::StatusCode::kInvalidArgument));
}

std::vector<size_t> ShuffledSlots(size_t region_slots, size_t count, uint32_t seed) {
  std::vector<size_t> slots(region_slots);
  std::iota(slots.begin(), slots.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(count);
  return slots;
}

// ---------------------------------------------------------------------------------------------
// In-process

TEST(InProcessTransportTest, ScatteredPutsLand) {
  auto transport = CreateInProcessTransport();
  EXPECT_EQ(transport->name(), "inproc");
  constexpr size_t kSlots = 256;
  ASSERT_OK_AND_ASSIGN(auto region, transport->AllocateRegion(kSlots * kRowBytes));
  const RemoteRegion descriptor = region->Describe();
  EXPECT_EQ(descriptor.peer_address.rfind("inproc:", 0), 0u);
  EXPECT_EQ(descriptor.length, kSlots * kRowBytes);
  ASSERT_OK_AND_ASSIGN(auto writer, transport->Connect(descriptor));

  const auto src = MakeRows(100, 1);
  const auto slots = ShuffledSlots(kSlots, 100, 7);
  ASSERT_OK(writer->PutAll(ScatterOps(src, slots)));
  ExpectScattered(region->data(), kSlots, src, slots);
}

TEST(InProcessTransportTest, WriteDirectFillsTheRegionUntilItIsDestroyed) {
  auto transport = CreateInProcessTransport();
  std::vector<uint8_t> memory(4096);
  ASSERT_OK_AND_ASSIGN(auto region, transport->RegisterRegion(memory.data(), memory.size()));
  ASSERT_OK_AND_ASSIGN(auto writer, transport->Connect(region->Describe()));
  ASSERT_OK_AND_ASSIGN(bool direct, writer->WriteDirect([](uint8_t* base) {
    std::memset(base + 100, 7, 10);
    return absl::OkStatus();
  }));
  EXPECT_TRUE(direct);
  EXPECT_EQ(memory[100], 7);
  EXPECT_EQ(memory[109], 7);
  EXPECT_EQ(memory[110], 0);
  EXPECT_THAT(writer->WriteDirect([](uint8_t*) { return absl::DataLossError("mine"); }),
              StatusIs(absl::StatusCode::kDataLoss));
  region.reset();
  bool called = false;
  EXPECT_THAT(writer->WriteDirect([&](uint8_t*) {
    called = true;
    return absl::OkStatus();
  }),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_FALSE(called);
}

TEST(InProcessTransportTest, GetsReadScatteredRowsUntilTheRegionIsDestroyed) {
  auto transport = CreateInProcessTransport();
  ASSERT_OK_AND_ASSIGN(auto region, transport->AllocateRegion(64 * kRowBytes));
  const auto src = MakeRows(64, 3);
  std::memcpy(region->data(), src.data(), src.size());
  ASSERT_OK_AND_ASSIGN(auto reader, transport->Connect(region->Describe()));
  ExpectGetsReadRows(*reader, src, ShuffledSlots(64, 40, 5));
  region.reset();
  uint8_t byte = 0;
  const GetOp one{&byte, 1, 0};
  EXPECT_THAT(reader->GetAll({&one, 1}), StatusIs(absl::StatusCode::kUnavailable));
}

TEST(InProcessTransportTest, OutOfRangeSendsNothing) {
  auto transport = CreateInProcessTransport();
  ASSERT_OK_AND_ASSIGN(auto region, transport->AllocateRegion(4 * kRowBytes));
  ASSERT_OK_AND_ASSIGN(auto writer, transport->Connect(region->Describe()));
  const auto src = MakeRows(2, 2);
  const std::vector<PutOp> ops = {{src.data(), kRowBytes, 0},
                                  {src.data() + kRowBytes, kRowBytes, 3 * kRowBytes + 1}};
  EXPECT_THAT(writer->PutAll(ops), StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_EQ(region->data()[0], 0);  // the valid first op was not applied either
  const PutOp huge{src.data(), kRowBytes, ~uint64_t{0} - 10};  // offset + length overflows
  EXPECT_THAT(writer->PutAll({&huge, 1}), StatusIs(absl::StatusCode::kOutOfRange));
  const PutOp null_src{nullptr, kRowBytes, 0};
  EXPECT_THAT(writer->PutAll({&null_src, 1}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(InProcessTransportTest, RejectsDescriptorsFromOtherInstances) {
  auto a = CreateInProcessTransport();
  auto b = CreateInProcessTransport();
  ASSERT_OK_AND_ASSIGN(auto region, a->AllocateRegion(4096));
  EXPECT_THAT(b->Connect(region->Describe()), StatusIs(absl::StatusCode::kInvalidArgument));
  RemoteRegion empty = region->Describe();
  empty.length = 0;
  EXPECT_THAT(a->Connect(empty), StatusIs(absl::StatusCode::kInvalidArgument));
  RemoteRegion with_rkey = region->Describe();
  with_rkey.rkey = "x";
  EXPECT_THAT(a->Connect(with_rkey), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(a->AllocateRegion(0), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(InProcessTransportTest, DestroyedRegionIsUnavailable) {
  auto transport = CreateInProcessTransport();
  std::vector<uint8_t> memory(4096);
  ASSERT_OK_AND_ASSIGN(auto region, transport->RegisterRegion(memory.data(), memory.size()));
  ASSERT_OK_AND_ASSIGN(auto writer, transport->Connect(region->Describe()));
  region.reset();
  const auto src = MakeRows(1, 3);
  const PutOp op{src.data(), kRowBytes, 0};
  EXPECT_THAT(writer->PutAll({&op, 1}), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(memory[0], 0);
}

// ---------------------------------------------------------------------------------------------
// UCX, two Transport instances in this process.

struct UcxCase {
  const char* name;
  const char* transports;
  const char* net_devices;
};

class UcxTransportTest : public ::testing::TestWithParam<UcxCase> {
 protected:
  static UcxOptions Options() {
    UcxOptions options;
    options.transports = GetParam().transports;
    options.net_devices = GetParam().net_devices;
    options.put_timeout = absl::Seconds(5);
    return options;
  }
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(receiver_, CreateUcxTransport(Options()));
    ASSERT_OK_AND_ASSIGN(sender_, CreateUcxTransport(Options()));
    EXPECT_EQ(sender_->name(), "ucx");
  }

  std::unique_ptr<Transport> receiver_;
  std::unique_ptr<Transport> sender_;
};

TEST_P(UcxTransportTest, ScatteredRowsLandInAllocatedRegion) {
  constexpr size_t kSlots = 4096;  // 2 MiB
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->AllocateRegion(kSlots * kRowBytes));
  ASSERT_OK_AND_ASSIGN(auto writer, sender_->Connect(region->Describe()));
  const auto src = MakeRows(1500, 4);
  const auto slots = ShuffledSlots(kSlots, 1500, 11);
  ASSERT_OK(writer->PutAll(ScatterOps(src, slots)));
  ExpectScattered(region->data(), kSlots, src, slots);
}

// Shared memory maps an allocated region into the writer's process, so it is written with plain
// stores (from several threads here); over TCP WriteDirect declines and PutAll is the way.
TEST_P(UcxTransportTest, WriteDirectOnlyWhereTheRegionIsMapped) {
  constexpr size_t kSlots = 2048;  // 1 MiB
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->AllocateRegion(kSlots * kRowBytes));
  ASSERT_OK_AND_ASSIGN(auto writer, sender_->Connect(region->Describe()));
  const auto src = MakeRows(kSlots, 9);
  bool called = false;
  ASSERT_OK_AND_ASSIGN(bool direct, writer->WriteDirect([&](uint8_t* base) {
    called = true;
    std::vector<std::thread> threads;
    for (size_t t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        const size_t part = src.size() / 4;
        std::memcpy(base + t * part, src.data() + t * part, part);
      });
    }
    for (auto& th : threads) th.join();
    return absl::OkStatus();
  }));
  EXPECT_EQ(direct, called);
  if (std::string(GetParam().name) == "shm") {
    ASSERT_TRUE(direct) << "shared memory should map an allocated region";
    EXPECT_EQ(std::memcmp(region->data(), src.data(), src.size()), 0);
  } else {
    EXPECT_FALSE(direct);
  }
}

TEST_P(UcxTransportTest, RowsLandInCallerRegisteredMemory) {
  constexpr size_t kSlots = 512;
  std::vector<uint8_t> memory(kSlots * kRowBytes, 0);
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->RegisterRegion(memory.data(), memory.size()));
  EXPECT_EQ(region->data(), memory.data());
  ASSERT_OK_AND_ASSIGN(auto writer, sender_->Connect(region->Describe()));
  // Source rows from a registered region too, as the tier node does.
  ASSERT_OK_AND_ASSIGN(auto staging, sender_->AllocateRegion(200 * kRowBytes));
  const auto src = MakeRows(200, 5);
  std::memcpy(staging->data(), src.data(), src.size());
  const auto slots = ShuffledSlots(kSlots, 200, 13);
  std::vector<PutOp> ops = ScatterOps(src, slots);
  for (size_t i = 0; i < ops.size(); ++i) ops[i].src = staging->data() + i * kRowBytes;
  ASSERT_OK(writer->PutAll(ops));
  ExpectScattered(memory.data(), kSlots, src, slots);
  // A second batch over the same (cached) endpoint, plus one large contiguous put.
  const auto big = MakeRows(kSlots, 6);
  const PutOp whole{big.data(), big.size(), 0};
  ASSERT_OK(writer->PutAll({&whole, 1}));
  EXPECT_EQ(std::memcmp(memory.data(), big.data(), big.size()), 0);
}

// Gets read the peer's region: a copy where shared memory maps it here, UCX gets (over TCP:
// its software emulation of one-sided reads) elsewhere; allocated and caller-registered memory.
TEST_P(UcxTransportTest, GetsReadScatteredRowsOfThePeersRegion) {
  constexpr size_t kSlots = 2048;  // 1 MiB
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->AllocateRegion(kSlots * kRowBytes));
  const auto src = MakeRows(kSlots, 8);
  std::memcpy(region->data(), src.data(), src.size());
  ASSERT_OK_AND_ASSIGN(auto reader, sender_->Connect(region->Describe()));
  ExpectGetsReadRows(*reader, src, ShuffledSlots(kSlots, 700, 21));
  // One large contiguous get, then a put and a get over the same endpoint.
  std::vector<uint8_t> whole(src.size(), 0);
  const GetOp all{whole.data(), whole.size(), 0};
  ASSERT_OK(reader->GetAll({&all, 1}));
  EXPECT_EQ(whole, src);
  const auto fresh = MakeRows(1, 9);
  const PutOp put{fresh.data(), kRowBytes, 5 * kRowBytes};
  ASSERT_OK(reader->PutAll({&put, 1}));
  std::vector<uint8_t> row(kRowBytes, 0);
  const GetOp back{row.data(), kRowBytes, 5 * kRowBytes};
  ASSERT_OK(reader->GetAll({&back, 1}));
  EXPECT_EQ(row, fresh);

  std::vector<uint8_t> memory = MakeRows(256, 10);
  ASSERT_OK_AND_ASSIGN(auto registered, receiver_->RegisterRegion(memory.data(), memory.size()));
  ASSERT_OK_AND_ASSIGN(auto reader2, sender_->Connect(registered->Describe()));
  ExpectGetsReadRows(*reader2, memory, ShuffledSlots(256, 100, 22));
}

TEST_P(UcxTransportTest, OutOfRangeSendsNothing) {
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->AllocateRegion(8 * kRowBytes));
  ASSERT_OK_AND_ASSIGN(auto writer, sender_->Connect(region->Describe()));
  const auto src = MakeRows(2, 7);
  const std::vector<PutOp> ops = {{src.data(), kRowBytes, 0},
                                  {src.data() + kRowBytes, kRowBytes, 7 * kRowBytes + 1}};
  EXPECT_THAT(writer->PutAll(ops), StatusIs(absl::StatusCode::kOutOfRange));
  // The writer still works, and the first op had not been sent.
  const PutOp last{src.data(), kRowBytes, 7 * kRowBytes};
  ASSERT_OK(writer->PutAll({&last, 1}));
  EXPECT_EQ(region->data()[0], 0);
  EXPECT_EQ(std::memcmp(region->data() + 7 * kRowBytes, src.data(), kRowBytes), 0);
}

TEST_P(UcxTransportTest, MalformedDescriptorsAreInvalidArgument) {
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->AllocateRegion(4096));
  ASSERT_OK_AND_ASSIGN(auto other, receiver_->AllocateRegion(4096));
  const RemoteRegion good = region->Describe();
  std::mt19937 rng(17);
  auto garbage = [&rng](size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    return s;
  };

  std::vector<RemoteRegion> bad;
  RemoteRegion d = good;
  d.peer_address = garbage(good.peer_address.size());
  bad.push_back(d);
  d = good;
  d.peer_address.resize(d.peer_address.size() / 2);  // truncated
  bad.push_back(d);
  d = good;
  d.peer_address.back() ^= 1;  // one flipped bit in the UCX bytes
  bad.push_back(d);
  d = good;
  d.peer_address.clear();
  bad.push_back(d);
  d = good;
  d.rkey = garbage(good.rkey.size());
  bad.push_back(d);
  d = good;
  d.rkey = other->Describe().rkey;  // another region's key
  bad.push_back(d);
  d = good;
  d.rkey.clear();
  bad.push_back(d);
  d = good;
  d.length = 0;
  bad.push_back(d);
  d = good;
  d.length += 4096;  // not what the rkey was packed for
  bad.push_back(d);
  d = good;
  d.peer_address = d.rkey;  // fields swapped
  d.rkey = good.peer_address;
  bad.push_back(d);
  d = CreateInProcessTransport()->AllocateRegion(4096).value()->Describe();
  bad.push_back(d);
  for (size_t i = 0; i < bad.size(); ++i) {
    EXPECT_THAT(sender_->Connect(bad[i]), StatusIs(absl::StatusCode::kInvalidArgument))
        << "case " << i;
  }
  // And the good one still connects after all that.
  ASSERT_OK_AND_ASSIGN(auto writer, sender_->Connect(good));
  const auto src = MakeRows(1, 8);
  const PutOp op{src.data(), kRowBytes, 0};
  EXPECT_OK(writer->PutAll({&op, 1}));
}

TEST_P(UcxTransportTest, ConcurrentPutAllFromFourThreads) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 40;
  constexpr size_t kRowsPerRound = 32;
  constexpr size_t kSlots = kThreads * kRounds * kRowsPerRound;  // each slot written once
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->AllocateRegion(kSlots * kRowBytes));
  // Threads 0 and 1 share one writer; 2 and 3 have their own (all share one endpoint).
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<RemoteWriter> shared, sender_->Connect(region->Describe()));
  std::vector<std::shared_ptr<RemoteWriter>> writers = {shared, shared};
  for (int t = 2; t < kThreads; ++t) {
    ASSERT_OK_AND_ASSIGN(std::shared_ptr<RemoteWriter> own, sender_->Connect(region->Describe()));
    writers.push_back(own);
  }
  const auto src = MakeRows(kSlots, 9);
  const auto slots = ShuffledSlots(kSlots, kSlots, 19);
  std::vector<absl::Status> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds && results[t].ok(); ++r) {
        std::vector<PutOp> ops;
        for (size_t k = 0; k < kRowsPerRound; ++k) {
          const size_t i = (static_cast<size_t>(t) * kRounds + r) * kRowsPerRound + k;
          ops.push_back(PutOp{src.data() + i * kRowBytes, kRowBytes, slots[i] * kRowBytes});
        }
        results[t] = writers[t]->PutAll(ops);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_OK(results[t]) << "thread " << t;
  ExpectScattered(region->data(), kSlots, src, slots);
}

TEST_P(UcxTransportTest, ObjectsOutliveTheTransport) {
  ASSERT_OK_AND_ASSIGN(auto region, receiver_->AllocateRegion(4096));
  ASSERT_OK_AND_ASSIGN(auto writer, sender_->Connect(region->Describe()));
  sender_.reset();
  const auto src = MakeRows(1, 10);
  const PutOp op{src.data(), kRowBytes, 1024};
  ASSERT_OK(writer->PutAll({&op, 1}));
  EXPECT_EQ(std::memcmp(region->data() + 1024, src.data(), kRowBytes), 0);
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxTransportTest,
                         ::testing::Values(UcxCase{"tcp", "tcp", "lo"},
                                           UcxCase{"shm", "posix,sysv,cma,self", ""}),
                         [](const auto& info) { return std::string(info.param.name); });

// Over TCP the peer's death closes the socket, which UCX reports through the endpoint's error
// handler. (Over shared memory a peer inside this same process cannot be seen to die: the
// mapping stays valid, and UCX's keepalive only detects dead processes.)
TEST(UcxTransportFailureTest, DestroyedPeerAnswersUnavailableQuickly) {
  UcxOptions options;
  options.transports = "tcp";
  options.net_devices = "lo";
  options.put_timeout = absl::Seconds(3);
  ASSERT_OK_AND_ASSIGN(auto receiver, CreateUcxTransport(options));
  ASSERT_OK_AND_ASSIGN(auto sender, CreateUcxTransport(options));
  ASSERT_OK_AND_ASSIGN(auto region, receiver->AllocateRegion(64 * kRowBytes));
  ASSERT_OK_AND_ASSIGN(auto writer, sender->Connect(region->Describe()));
  const auto src = MakeRows(8, 11);
  std::vector<PutOp> ops;
  for (size_t i = 0; i < 8; ++i) ops.push_back({src.data() + i * kRowBytes, kRowBytes, i * 512});
  ASSERT_OK(writer->PutAll(ops));  // connected

  region.reset();
  receiver.reset();
  const auto start = std::chrono::steady_clock::now();
  absl::Status status;
  // The first call may still see the socket alive; the error must surface within the timeout.
  for (int i = 0; i < 3 && status.ok(); ++i) status = writer->PutAll(ops);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_LT(elapsed, std::chrono::seconds(4));
  // The writer stays failed.
  EXPECT_THAT(writer->PutAll(ops), StatusIs(absl::StatusCode::kUnavailable));
}

// A peer that is connected but never progresses (a raw UCX worker nobody drives, standing in for
// a hung process): TCP puts need the target to acknowledge them, so only the put timeout ends the
// call. The connection is then dropped, and later calls fail fast.
TEST(UcxTransportFailureTest, StalledPeerTimesOut) {
  ucp_config_t* config;
  ASSERT_EQ(ucp_config_read(nullptr, nullptr, &config), UCS_OK);
  ASSERT_EQ(ucp_config_modify(config, "TLS", "tcp"), UCS_OK);
  ASSERT_EQ(ucp_config_modify(config, "NET_DEVICES", "lo"), UCS_OK);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_RMA;
  ucp_context_h context;
  ASSERT_EQ(ucp_init(&params, config, &context), UCS_OK);
  ucp_config_release(config);
  ucp_worker_params_t worker_params{};
  ucp_worker_h worker;
  ASSERT_EQ(ucp_worker_create(context, &worker_params, &worker), UCS_OK);
  std::vector<uint8_t> memory(4096);
  ucp_mem_map_params_t map{};
  map.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  map.address = memory.data();
  map.length = memory.size();
  ucp_mem_h memh;
  ASSERT_EQ(ucp_mem_map(context, &map, &memh), UCS_OK);
  void* rkey;
  size_t rkey_size;
  ASSERT_EQ(ucp_rkey_pack(context, memh, &rkey, &rkey_size), UCS_OK);
  ucp_address_t* address;
  size_t address_size;
  ASSERT_EQ(ucp_worker_get_address(worker, &address, &address_size), UCS_OK);
  RemoteRegion region;
  region.base = reinterpret_cast<uintptr_t>(memory.data());
  region.length = memory.size();
  region.peer_address = internal::SealBlob(
      internal::BlobKind::kWorkerAddress,
      absl::string_view(reinterpret_cast<const char*>(address), address_size), 0);
  region.rkey = internal::SealBlob(internal::BlobKind::kRkey,
                                   absl::string_view(static_cast<const char*>(rkey), rkey_size),
                                   internal::RegionBinding(region.base, region.length));
  ucp_worker_release_address(worker, address);
  ucp_rkey_buffer_release(rkey);

  {
    UcxOptions options;
    options.transports = "tcp";
    options.net_devices = "lo";
    options.put_timeout = absl::Milliseconds(300);
    ASSERT_OK_AND_ASSIGN(auto sender, CreateUcxTransport(options));
    ASSERT_OK_AND_ASSIGN(auto writer, sender->Connect(region));
    const auto src = MakeRows(4, 12);
    std::vector<PutOp> ops;
    for (size_t i = 0; i < 4; ++i) ops.push_back({src.data() + i * kRowBytes, kRowBytes, i * 512});
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THAT(writer->PutAll(ops), StatusIs(absl::StatusCode::kUnavailable));
    const auto elapsed = std::chrono::steady_clock::now() - start;
    EXPECT_GE(elapsed, std::chrono::milliseconds(250));
    EXPECT_LT(elapsed, std::chrono::seconds(3));
    EXPECT_THAT(writer->PutAll(ops), StatusIs(absl::StatusCode::kUnavailable));
  }
  ucp_mem_unmap(context, memh);
  ucp_worker_destroy(worker);
  ucp_cleanup(context);
}

TEST(UcxTransportFailureTest, BadOptions) {
  UcxOptions options;
  options.put_timeout = absl::ZeroDuration();
  EXPECT_THAT(CreateUcxTransport(options), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::transport
