"""Running and compiling the kernels on hardware this machine is not.

The project is developed on a 2-core x86-64 Linux machine without a GPU. These tools reach
further: `nvrtc_check` compiles the CUDA kernels as MLX would (NVRTC, no GPU needed),
`cross_compile` compiles the C++ kernels for macOS/ARM and with clang, and `offline_gpu`
stages the GPU specs (2.3, 2.5) for a CUDA machine without a package index and runs them there.
See docs/kernels.md.
"""
