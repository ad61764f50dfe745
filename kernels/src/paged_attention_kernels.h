// The CPU attention behind tiny_llm_kernels.paged_attention, free of MLX (raw pointers), so
// a plain C++ program can test it. paged_attention.cpp does the RoPE and the cache write
// first, then hands this the rotated queries and the pools.
//
// Query row (token t, head h) at position p = positions[t] of sequence b attends to that
// sequence's keys at positions lo..p (lo = 0, or p - window + 1 with a sliding window), read in place through block_tables[b] (position j at
// block table[j / block_size], offset j % block_size); query head h reads kv head
// h / (H / H_kv). Online softmax, fp32 accumulation.
//
// Bitwise contract: a row's output is a function of its q, its position and the keys and
// values at positions lo..p only, computed in one fixed order: segments of kSegment logical
// positions from 0 up (those wholly before lo skipped), each an online softmax over key tiles of kKeyTile positions (each score
// a fixed chain of FMAs over D then a fixed tree of adds, each output lane a chain over the
// visible keys in position order), the segments folded left to right. Which rows share a task,
// whether a row's segments run in one task or several, how many rows and sequences there are,
// the block size, which blocks hold the keys and the thread count change nothing (tests:
// kernels/check_paged_attention.py).
#pragma once

#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <string>

namespace tiny_llm::pa {

enum class DType { f32, f16, bf16 };

constexpr int kKeyTile = 64;   // logical key positions per tile (independent of block_size)
constexpr int kSegment = 256;  // logical key positions per segment: a row's keys are folded a
                               // segment at a time (flash-decoding's split, at fixed places), so
                               // that a few long rows can be shared out by segment

struct Problem {
  int T = 0, B = 0, H = 0, H_kv = 0, D = 0;
  int block_size = 0, num_blocks = 0, max_blocks = 0;
  float scale = 1.0f;
  int window = 0;               // > 0: a row at position p sees keys p - window + 1 .. p only
  DType q_dtype = DType::f32;   // the queries' and the output's type
  DType kv_dtype = DType::f32;  // the pools' type
  const void* q = nullptr;      // (T, H, D) rotated queries, row-major
  const void* k = nullptr;      // (num_blocks, H_kv, block_size, D) row-major
  const void* v = nullptr;
  const int32_t* positions = nullptr;     // (T,)
  const int32_t* block_tables = nullptr;  // (B, max_blocks)
  void* out = nullptr;                    // (T, H, D) in q_dtype, row-major
  int Dp() const { return (D + 15) / 16 * 16; }
  int lo(int position) const { return window > 0 ? std::max(0, position - window + 1) : 0; }  // first key seen
};

// One task's rows: the query heads of kv heads g0 .. g0 + ng - 1 for the tokens t0 .. t0 + nt - 1,
// which belong to sequence b.
struct Item {
  int b, g0, ng, t0, nt;
};

struct Isa {
  const char* name;
  // seg < 0: the item's rows over all their keys, outputs written. seg >= 0: over segment seg
  // only, each row's (o (Dp), then every row's m, then l) to partial, rows * (Dp + 2) floats.
  void (*attend)(const Problem& p, const Item& item, int seg, float* partial);
  // The outputs of an item whose n_segs segments ran as separate tasks (partials in order).
  void (*merge)(const Problem& p, const Item& item, const float* partials, int n_segs);
};

const Isa& isa_portable();
const Isa* isa_avx2();    // nullptr where not compiled in (non-x86 builds)
const Isa* isa_avx512();  // nullptr where not compiled in

// Cuts the T rows into tasks and runs them on the shared thread pool. cu_seqlens (B + 1):
// sequence b's tokens are t = cu[b] .. cu[b + 1] - 1. Every index is assumed checked.
void run(const Problem& p, const int32_t* cu_seqlens);

// The instruction set in use. configure("portable" | "avx2" | "avx512" | "auto" or "" = best)
// forces one and returns its name; an unknown name, or one this CPU or build lacks, throws
// std::invalid_argument. At start: TINY_LLM_QMM_ISA when set (as for quantized_matmul).
const char* isa_name();
const char* configure(const std::string& isa);

}  // namespace tiny_llm::pa
