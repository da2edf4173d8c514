// The kvrecall.v1.KvRecall gRPC service: converts wire types to domain types and back, and hands
// every call to a thread pool (callback API; no handler thread blocks on work).
#ifndef KVRECALL_KVSTORE_GRPC_SERVICE_H_
#define KVRECALL_KVSTORE_GRPC_SERVICE_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "kvstore/auth.h"
#include "kvstore/node.h"
#include "kvstore/placement_check.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"

namespace kvrecall::kvstore {

class GrpcService final : public kvrecall::v1::KvRecall::CallbackService {
 public:
  // `node` must outlive the service. `threads` <= 0: every core.
  GrpcService(Node* node, int threads);
  ~GrpcService() override;

  // The cluster's node list and this node's name in it (kvrecall-server --peers/--advertise):
  // OpenSequence then refuses placements by other node lists that do not make this node an
  // owner (placement_check.h). REQUIRES: ValidatePeerConfig(config) is OK; called before the
  // server starts serving.
  void SetPeers(PeerConfig config) { peers_ = std::move(config); }
  // Called with the new state after every Drain call (the server flips its health status).
  // REQUIRES: set before the server starts serving.
  void SetDrainHook(std::function<void(bool draining)> hook) { drain_hook_ = std::move(hook); }
  // Tenant authentication (auth.h; kvrecall-server --tenant-tokens), null: off. With it every call
  // needs a bearer token (UNAUTHENTICATED otherwise) and acts for the token's tenant: a request's
  // tenant field must be empty or that tenant (UNAUTHENTICATED otherwise), so another tenant's
  // sequences are simply not there (NOT_FOUND, as for unknown ones). Each call takes one request
  // from the tenant's rate budget (RESOURCE_EXHAUSTED). Stats shows a tenant its own usage only;
  // Drain needs an admin token (PERMISSION_DENIED); AllocateBlocks (the arena's transport key)
  // needs the tenant's arena_ingest limit (UNIMPLEMENTED otherwise: clients fall back to
  // AppendKV). `auth` must outlive the service. REQUIRES: set before the server starts serving.
  void SetAuthenticator(Authenticator* auth) { auth_ = auth; }
  // Fault injection for tests and drills (kvrecall-server --fault-unimplemented): these RPCs
  // answer UNIMPLEMENTED, as on a node from before them; clients must fall back (AppendKVBatch to
  // AppendKV, AllocateBlocks to AppendKV). INVALID_ARGUMENT for any other name. REQUIRES: set
  // before the server starts serving.
  absl::Status SetUnimplemented(const std::vector<std::string>& rpcs);

  grpc::ServerUnaryReactor* RegisterModel(grpc::CallbackServerContext* ctx, const v1::RegisterModelRequest* req,
                                          v1::RegisterModelResponse* resp) override;
  grpc::ServerUnaryReactor* OpenSequence(grpc::CallbackServerContext* ctx, const v1::OpenSequenceRequest* req,
                                         v1::OpenSequenceResponse* resp) override;
  grpc::ServerReadReactor<v1::AppendKVRequest>* AppendKV(grpc::CallbackServerContext* ctx,
                                                         v1::AppendKVResponse* resp) override;
  grpc::ServerUnaryReactor* AppendKVBatch(grpc::CallbackServerContext* ctx,
                                          const v1::AppendKVBatchRequest* req,
                                          v1::AppendKVBatchResponse* resp) override;
  grpc::ServerUnaryReactor* AllocateBlocks(grpc::CallbackServerContext* ctx, const v1::AllocateBlocksRequest* req,
                                           v1::AllocateBlocksResponse* resp) override;
  grpc::ServerUnaryReactor* CommitBlocks(grpc::CallbackServerContext* ctx, const v1::CommitBlocksRequest* req,
                                         v1::CommitBlocksResponse* resp) override;
  grpc::ServerUnaryReactor* Retrieve(grpc::CallbackServerContext* ctx, const v1::RetrieveRequest* req,
                                     v1::RetrieveResponse* resp) override;
  grpc::ServerUnaryReactor* BuildIndex(grpc::CallbackServerContext* ctx, const v1::BuildIndexRequest* req,
                                       v1::BuildIndexResponse* resp) override;
  grpc::ServerWriteReactor<v1::FetchKVResponse>* FetchKV(grpc::CallbackServerContext* ctx,
                                                         const v1::FetchKVRequest* req) override;
  grpc::ServerUnaryReactor* AttachWorker(grpc::CallbackServerContext* ctx, const v1::AttachWorkerRequest* req,
                                         v1::AttachWorkerResponse* resp) override;
  grpc::ServerUnaryReactor* CloseSequence(grpc::CallbackServerContext* ctx, const v1::CloseSequenceRequest* req,
                                          v1::CloseSequenceResponse* resp) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* req,
                                  v1::StatsResponse* resp) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* ctx, const v1::DrainRequest* req,
                                  v1::DrainResponse* resp) override;

 private:
  Node* const node_;
  Authenticator* auth_ = nullptr;  // immutable once serving
  ThreadPool pool_;
  PeerConfig peers_;  // immutable once serving
  bool unimplemented_append_batch_ = false, unimplemented_allocate_blocks_ = false;  // likewise
  std::function<void(bool)> drain_hook_;  // immutable once serving
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_GRPC_SERVICE_H_
