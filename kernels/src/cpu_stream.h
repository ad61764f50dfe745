// The stream a CPU kernel's op is put on, and the start of its primitive's eval_cpu, shared by
// every op in src/.
#pragma once

#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
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

// What eval_cpu does before it dispatches its task: allocates `out` and registers `inputs` and
// `out` with the CPU command encoder of `stream`, which it returns.
inline mlx::core::cpu::CommandEncoder& cpu_encoder(const mlx::core::Stream& stream,
                                                   const std::vector<mlx::core::array>& inputs,
                                                   mlx::core::array& out) {
  namespace mx = mlx::core;
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  return encoder;
}

// The same for a primitive with several outputs: allocates each of `outputs`.
inline mlx::core::cpu::CommandEncoder& cpu_encoder(const mlx::core::Stream& stream,
                                                   const std::vector<mlx::core::array>& inputs,
                                                   std::vector<mlx::core::array>& outputs) {
  namespace mx = mlx::core;
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    encoder.set_output_array(o);
  }
  return encoder;
}

// Weak copies of `arrays` for a dispatched task to capture (the encoder holds the arrays).
inline std::vector<mlx::core::array> weak_copies(const std::vector<mlx::core::array>& arrays) {
  std::vector<mlx::core::array> weak;
  for (const auto& a : arrays) weak.push_back(mlx::core::array::unsafe_weak_copy(a));
  return weak;
}

}  // namespace tiny_llm
