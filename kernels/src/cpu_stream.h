// The stream a CPU kernel's op is put on, shared by every op in src/.
#pragma once

#include <stdexcept>
#include <string>
#include <variant>

#include "mlx/stream.h"
#include "mlx/utils.h"

namespace tiny_llm {

// `s` as a stream, or the CPU's default stream when none is given. A GPU stream or device
// throws std::invalid_argument("<who>: this is a CPU kernel; ...").
inline mlx::core::Stream cpu_stream(const mlx::core::StreamOrDevice& s, const std::string& who) {
  namespace mx = mlx::core;
  const mx::Stream stream =
      std::holds_alternative<std::monostate>(s) ? mx::default_stream(mx::Device::cpu) : mx::to_stream(s);
  if (stream.device.type != mx::Device::cpu)
    throw std::invalid_argument(who + ": this is a CPU kernel; pass stream=mx.cpu (or leave it out)");
  return stream;
}

}  // namespace tiny_llm
