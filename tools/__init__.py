"""Learner tools: render PROGRESS.md from spec results, scaffold a learner's package.

The kernels' staging for other hardware (NVRTC, cross compilers, offline GPU runs) is in hardware/.
"""
