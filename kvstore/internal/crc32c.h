// CRC-32C (Castagnoli), the checksum of spilled / durable KV blocks. SSE4.2 crc32 instructions
// when the CPU has them (checked once at run time), else a table-driven fallback; both give the
// same value. Crc32c("123456789") == 0xE3069283.
#ifndef KVRECALL_KVSTORE_INTERNAL_CRC32C_H_
#define KVRECALL_KVSTORE_INTERNAL_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace kvrecall::kvstore::internal {

// Continues `crc` (the value returned for the bytes before `data`; 0 to start) over n bytes.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);
inline uint32_t Crc32c(const void* data, size_t n) { return Crc32cExtend(0, data, n); }

}  // namespace kvrecall::kvstore::internal

#endif  // KVRECALL_KVSTORE_INTERNAL_CRC32C_H_
