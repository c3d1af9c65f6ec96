// Typed failures of the native core. Every failure that can reach a caller is a vdiff::Error with a code;
// the addon turns it into a rejected promise whose error has `code` set to "VDIFF_<NAME>".
#pragma once
#include <stdexcept>
#include <string>

namespace vdiff {

enum class ErrorCode {
  InvalidModel,     // model directory, config.json or safetensors unusable (missing, truncated, wrong shape, ...)
  InvalidArgument,  // bad sampling settings, prompt too long, unknown sequence id, ...
  Cancelled,        // a step was cancelled through its cancel flag
  OutOfMemory,      // an allocation failed
  Unavailable,      // the device asked for is not there (no CUDA in this build, no GPU visible)
  Numeric,          // the model computed NaN or infinity (non-finite weights, or its dtype's range exceeded)
  Internal,         // a bug: an invariant did not hold
};

inline const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::InvalidModel: return "INVALID_MODEL";
    case ErrorCode::InvalidArgument: return "INVALID_ARGUMENT";
    case ErrorCode::Cancelled: return "CANCELLED";
    case ErrorCode::OutOfMemory: return "OUT_OF_MEMORY";
    case ErrorCode::Unavailable: return "UNAVAILABLE";
    case ErrorCode::Numeric: return "NUMERIC";
    case ErrorCode::Internal: return "INTERNAL";
  }
  return "INTERNAL";
}

class Error : public std::runtime_error {
 public:
  // `param`: the setting or input at fault, by its C++ name (e.g. "top_p", "prompt"); empty when none is.
  Error(ErrorCode code, const std::string& message, std::string param = "")
      : std::runtime_error(message), code_(code), param_(std::move(param)) {}
  ErrorCode code() const { return code_; }
  const std::string& param() const { return param_; }

 private:
  ErrorCode code_;
  std::string param_;
};

}  // namespace vdiff
