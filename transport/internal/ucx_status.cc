#include "transport/internal/ucx_status.h"

#include "absl/strings/str_cat.h"

namespace kvrecall::transport::internal {

absl::Status UcsToStatus(ucs_status_t status, absl::string_view context) {
  if (status == UCS_OK) return absl::OkStatus();
  const std::string message = absl::StrCat(context, ": ", ucs_status_string(status));
  if (UCS_IS_LINK_ERROR(status) || UCS_IS_ENDPOINT_ERROR(status)) {
    return absl::UnavailableError(message);
  }
  switch (status) {
    case UCS_ERR_NO_RESOURCE:  // transient: send queues full
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_BUSY:
    case UCS_ERR_CANCELED:  // outstanding ops of an endpoint that failed or was force-closed
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_SOME_CONNECTS_FAILED:
    case UCS_ERR_NO_PROGRESS:
      return absl::UnavailableError(message);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
    case UCS_ERR_BUFFER_TOO_SMALL:
      return absl::InvalidArgumentError(message);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_EXCEEDS_LIMIT:
    case UCS_ERR_SHMEM_SEGMENT:
      return absl::ResourceExhaustedError(message);
    case UCS_ERR_OUT_OF_RANGE:
      return absl::OutOfRangeError(message);
    case UCS_ERR_NO_ELEM:
    case UCS_ERR_NO_DEVICE:
      return absl::NotFoundError(message);
    case UCS_ERR_ALREADY_EXISTS:
      return absl::AlreadyExistsError(message);
    case UCS_ERR_NOT_IMPLEMENTED:
    case UCS_ERR_UNSUPPORTED:
      return absl::UnimplementedError(message);
    case UCS_ERR_MESSAGE_TRUNCATED:
      return absl::DataLossError(message);
    case UCS_INPROGRESS:
      return absl::InternalError(absl::StrCat(context, ": request still in progress"));
    default:
      return absl::InternalError(message);
  }
}

}  // namespace kvrecall::transport::internal
