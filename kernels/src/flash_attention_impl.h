// The flash attention kernels, written once over a SIMD vector type. Each
// instruction-set translation unit defines, before including this file:
//   struct V: L floats a vector; RB x NV: the register block of the matmul tile
//     (RB rows by NV vectors of columns); zero, set1, load, store, fma, mul, sub,
//     max, hmax, hsum, sum_lanes (lane j = hsum of the j-th of L vectors), exp2;
//     f16_n / bf16_n: bulk conversion to fp32 of a prefix (returns how many values it
//     converted; the caller does the tail); load_f16 / load_bf16: L values as fp32.
//   float half_to_float(uint16_t), uint16_t float_to_half(float) (round to nearest even).
// Everything here has internal linkage: each TU compiles its own copy with its own
// flags, so the linker can never hand the portable TU an AVX-512 body.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_scalar.h"
#include "flash_attention_kernels.h"

namespace {

using tiny_llm::fa::DType;
using tiny_llm::fa::kKeyTile;
using tiny_llm::fa::Plan;
using tiny_llm::fa::Problem;
using tiny_llm::fa::Tensor;

constexpr int BC = kKeyTile;

// n values of t at (i0, i1, i2, c0...c0+n) as fp32.
void load_row(const Tensor& t, int64_t i0, int64_t i1, int64_t i2, int64_t c0, int n, float* dst) {
  const int64_t step = t.strides[3];
  const int64_t off = i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + c0 * step;
  if (t.dtype == DType::f32) {
    const float* src = static_cast<const float*>(t.data) + off;
    if (step == 1) {
      std::memcpy(dst, src, size_t(n) * 4);
    } else {
      for (int i = 0; i < n; ++i) dst[i] = src[i * step];
    }
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(t.data) + off;
  const bool half = t.dtype == DType::f16;
  int i = step != 1 ? 0 : half ? V::f16_n(src, dst, n) : V::bf16_n(src, dst, n);
  for (; i < n; ++i) dst[i] = half ? half_to_float(src[i * step]) : bf16_to_float(src[i * step]);
}

void store_row(const float* src, DType t, void* out, int64_t off, int n) {
  switch (t) {
    case DType::f32: std::memcpy(static_cast<float*>(out) + off, src, size_t(n) * 4); return;
    case DType::f16:
      for (int i = 0; i < n; ++i) static_cast<uint16_t*>(out)[off + i] = float_to_half(src[i]);
      return;
    case DType::bf16:
      for (int i = 0; i < n; ++i) static_cast<uint16_t*>(out)[off + i] = float_to_bf16(src[i]);
      return;
  }
}

// Per-thread scratch, one buffer per user (slot) so that none resizes another's:
// a query tile's rows and one kv tile, never more (sizes depend on the plan only).
enum Slot { kTileSlot, kRowSlot, kSlots };
float* scratch(Slot slot, size_t floats) {
  thread_local std::vector<float> bufs[kSlots];
  if (bufs[slot].size() < floats) bufs[slot].resize(floats);
  return bufs[slot].data();
}

// --- the matmul tile: C (M, N) (+)= A (M, K) @ B (K, N), all fp32 row-major -------------------

// RB rows by NV vectors: broadcast A[r, k], FMA into RB * NV accumulators held in registers.
template <int RB, int NV>
inline void micro(const float* A, int lda, const float* B, int ldb, int K, float* C, int ldc, bool accumulate) {
  V c[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? V::load(C + r * ldc + v * V::L) : V::zero();
  for (int k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = V::load(B + k * ldb + v * V::L);
    for (int r = 0; r < RB; ++r) {
      const V a = V::set1(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) c[r][v] = V::fma(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) V::store(C + r * ldc + v * V::L, c[r][v]);
}

template <int NV, int R = V::RB>
inline void micro_rows(int rb, const float* A, int lda, const float* B, int ldb, int K, float* C, int ldc,
                       bool accumulate) {
  if constexpr (R > 0) {
    if (rb == R) return micro<R, NV>(A, lda, B, ldb, K, C, ldc, accumulate);
    micro_rows<NV, R - 1>(rb, A, lda, B, ldb, K, C, ldc, accumulate);
  }
}

template <int NV>
void column_block(int M, const float* A, int lda, const float* B, int ldb, int K, float* C, int ldc,
                  bool accumulate) {
  for (int m = 0; m < M; m += V::RB)
    micro_rows<NV>(std::min(V::RB, M - m), A + m * lda, lda, B, ldb, K, C + m * ldc, ldc, accumulate);
}

// N is a multiple of L (64 or Dp).
void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
          bool accumulate) {
  int n = 0;
  for (; n + V::NV * V::L <= N; n += V::NV * V::L)
    column_block<V::NV>(M, A, lda, B + n, ldb, K, C + n, ldc, accumulate);
  for (; n < N; n += V::L) column_block<1>(M, A, lda, B + n, ldb, K, C + n, ldc, accumulate);
}

// --- the pieces of one query tile ---------------------------------------------------------

// Key tile t of kv head (b, g): Kt (Dp, BC), K transposed so that the score tile is a
// plain matmul, then V (BC, Dp). Keys past S and columns past D are zeros.
void pack_kv(const Problem& p, const Plan& plan, int b, int g, int t, float* dst) {
  const int Dp = plan.Dp;
  float* kt = dst;
  float* vt = dst + BC * Dp;
  float* row = scratch(kRowSlot, Dp);
  for (int j = 0; j < BC; ++j) {
    const int s = t * BC + j;
    if (s >= p.S) {
      for (int d = 0; d < Dp; ++d) kt[d * BC + j] = 0.0f;
      std::fill(vt + j * Dp, vt + (j + 1) * Dp, 0.0f);
      continue;
    }
    load_row(p.k, b, g, s, 0, p.D, row);
    for (int d = 0; d < p.D; ++d) kt[d * BC + j] = row[d];
    for (int d = p.D; d < Dp; ++d) kt[d * BC + j] = 0.0f;
    load_row(p.v, b, g, s, 0, p.D, vt + j * Dp);
    std::fill(vt + j * Dp + p.D, vt + (j + 1) * Dp, 0.0f);
  }
}

// One fp16 or bf16 value of a K or V row read in place; load_kv reads L of them (or of fp32) as fp32.
struct Half { uint16_t bits; };
struct BHalf { uint16_t bits; };
inline V load_kv(const float* p) { return V::load(p); }
inline V load_kv(const Half* p) { return V::load_f16(&p->bits); }
inline V load_kv(const BHalf* p) { return V::load_bf16(&p->bits); }

// f(rows, stride) on rows s0..s0+n of K or V (kv head (b, g)), Dp values a row, `stride`
// elements apart: the tensor's own memory when its rows already are that (unit stride, D ==
// Dp), as float, Half or BHalf, converted to fp32 as they are loaded; else rows converted
// and zero padded into `buf` (n * Dp floats). A decode call (H 9, H_kv 3, D 64, S = 1500, 30
// caches) on an fp16 cache took 118 us through buf, more than on fp32 (103); in place, 64 (fp32: 88).
template <class F>
inline void with_kv_rows(const Tensor& t, int b, int g, int s0, int n, int D, int Dp, float* buf, F&& f) {
  if (t.strides[3] == 1 && D == Dp) {
    const int64_t at = b * t.strides[0] + g * t.strides[1] + s0 * t.strides[2];
    switch (t.dtype) {
      case DType::f32: return f(static_cast<const float*>(t.data) + at, t.strides[2]);
      case DType::f16: return f(static_cast<const Half*>(t.data) + at, t.strides[2]);
      case DType::bf16: return f(static_cast<const BHalf*>(t.data) + at, t.strides[2]);
    }
  }
  for (int j = 0; j < n; ++j) {
    load_row(t, b, g, s0 + j, 0, D, buf + j * Dp);
    std::fill(buf + j * Dp + D, buf + (j + 1) * Dp, 0.0f);
  }
  f(static_cast<const float*>(buf), int64_t(Dp));
}

// Decode (a few rows): scores of key tile t straight from K's rows, S (rows, BC) = Q @ K^T.
// Packing the tile first (transposing K) would cost more than these few rows use it. Per row
// and block of L keys: L vectors of partial dot products, which V::sum_lanes turns into the
// block's L scores at once. One horizontal sum per score, as before, cost more than the dot
// products: with this and accumulate_direct's registers, a decode call at S = 2048 (H 9,
// H_kv 3, D 64) went from 91-100 to 61-66 us, and the model's decode from 6.0 to 5.4 ms a
// token at S = 512 and from 8.2 to 7.2 at S = 1500 (medians, old and new builds alternated).
void scores_direct(const Problem& p, int b, int g, int t, const float* Q, int rows, int Dp, float* S, float* buf) {
  const int s0 = t * BC, valid = std::min(BC, p.S - s0);
  with_kv_rows(p.k, b, g, s0, valid, p.D, Dp, buf, [&](const auto* K, int64_t ks) {
    for (int r = 0; r < rows; ++r) {
      const float* q = Q + r * Dp;
      for (int j0 = 0; j0 < BC; j0 += V::L) {  // keys past `valid` score 0 here, -inf once masked
        V acc[V::L];
        for (int jj = 0; jj < V::L; ++jj) {
          acc[jj] = V::zero();
          if (j0 + jj >= valid) continue;
          const auto* k = K + (j0 + jj) * ks;
          for (int d = 0; d < Dp; d += V::L) acc[jj] = V::fma(V::load(q + d), load_kv(k + d), acc[jj]);
        }
        V::store(S + r * BC + j0, V::sum_lanes(acc));
      }
    }
  });
}

// NV vectors of one row of O, held in registers over the tile's `valid` keys.
template <int NV, class E>
inline void accumulate_block(const float* P, const E* Vr, int64_t vs, int valid, float* o) {
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V::load(o + v * V::L);
  for (int j = 0; j < valid; ++j) {
    const V w = V::set1(P[j]);
    for (int v = 0; v < NV; ++v) acc[v] = V::fma(w, load_kv(Vr + j * vs + v * V::L), acc[v]);
  }
  for (int v = 0; v < NV; ++v) V::store(o + v * V::L, acc[v]);
}

// ... and O (rows, Dp) += P (rows, BC) @ V straight from V's rows, 4 vectors of a row of O at
// a time kept in registers (not loaded and stored again for every key).
void accumulate_direct(const Problem& p, int b, int g, int t, const float* P, int rows, int Dp, float* O, float* buf) {
  const int s0 = t * BC, valid = std::min(BC, p.S - s0);
  with_kv_rows(p.v, b, g, s0, valid, p.D, Dp, buf, [&](const auto* Vr, int64_t vs) {
    for (int r = 0; r < rows; ++r) {
      int d = 0;
      for (; d + 4 * V::L <= Dp; d += 4 * V::L) accumulate_block<4>(P + r * BC, Vr + d, vs, valid, O + r * Dp + d);
      for (; d < Dp; d += V::L) accumulate_block<1>(P + r * BC, Vr + d, vs, valid, O + r * Dp + d);
    }
  });
}

// Up to this many rows a task reads K and V in place (decode); above, it packs tiles.
constexpr int kDirectRows = 8;

// The online softmax step for one row of scores s (BC, log2 units): the running max m
// and sum l absorb this tile, the accumulator o is rescaled by 2^(m_old - m_new), and s
// becomes the tile's weights 2^(s - m_new).
inline void online_softmax(float* s, float& m, float& l, float* o, int Dp) {
  V mx = V::set1(-kInf);
  for (int c = 0; c < BC; c += V::L) mx = V::max(mx, V::load(s + c));
  const float m_new = std::max(m, V::hmax(mx));
  if (m_new == -kInf) {  // no key visible to this row yet: weights 0, o and l stay 0
    // ... unless the max skipped NaN scores: then the row is NaN, as softmax makes it.
    if (std::any_of(s, s + BC, [](float x) { return std::isnan(x); })) m = l = std::nanf("");
    std::fill(s, s + BC, 0.0f);
    return;
  }
  const V shift = V::set1(m_new);
  V sum = V::zero();
  for (int c = 0; c < BC; c += V::L) {
    const V e = V::exp2(V::sub(V::load(s + c), shift));
    V::store(s + c, e);
    sum = V::add(sum, e);
  }
  const float alpha = std::exp2(m - m_new);  // m = -inf (first visible tile): 0
  l = l * alpha + V::hsum(sum);
  m = m_new;
  if (alpha != 1.0f) {
    const V a = V::set1(alpha);
    for (int d = 0; d < Dp; d += V::L) V::store(o + d, V::mul(V::load(o + d), a));
  }
}

// Scores of key tile t for the rows of a query tile, in place: the additive mask (in
// log2 units, like the scores), the causal limit, and -inf for keys past S.
void mask_scores(const Problem& p, int b, int g, int n_rep, int l0, int nl, int t, float* S, float* mrow) {
  const int s0 = t * BC, valid = std::min(BC, p.S - s0);
  for (int row = 0; row < n_rep * nl; ++row) {
    float* s = S + row * BC;
    const int h = g * n_rep + row / nl, pos = l0 + row % nl;
    if (p.mask.data) {
      load_row(p.mask, b, h, pos, s0, valid, mrow);
      for (int j = 0; j < valid; ++j) s[j] += mrow[j] * kLog2e;
    }
    int hidden = valid;  // keys from here on are invisible to this row
    if (p.causal) hidden = std::min(hidden, std::max(0, pos + p.S - p.L - s0 + 1));
    for (int j = hidden; j < BC; ++j) s[j] = -kInf;
  }
}

// Query tile qt of kv head (b, g): rows (r, i) = query head g * n_rep + r at position
// l0 + i, so one pass over the kv head's tiles serves all n_rep heads that read it.
void attend(const Problem& p, const Plan& plan, int b, int g, int qt, int split, const float* packed,
            float* partial) {
  const int Dp = plan.Dp, n_rep = plan.n_rep;
  const int l0 = qt * plan.positions, nl = std::min(p.L - l0, plan.positions), rows = n_rep * nl;
  float* Q = scratch(kTileSlot, size_t(rows) * (2 * Dp + BC + 2) + BC + plan.tile_floats());
  float* O = Q + rows * Dp;         // (rows, Dp) accumulator
  float* S = O + rows * Dp;         // (rows, BC) scores, then weights
  float* m = S + rows * BC;         // (rows) running max, log2 units
  float* l = m + rows;              // (rows) running sum
  float* mrow = l + rows;           // (BC) one mask row
  float* tile = mrow + BC;          // (tile_floats) one packed kv tile, when not prepacked

  // Pre-scaled by scale * log2(e): scores come out in log2 units, and exp2 is cheap.
  const V qmul = V::set1(p.scale * kLog2e);
  for (int row = 0; row < rows; ++row) {
    float* q = Q + row * Dp;
    load_row(p.q, b, g * n_rep + row / nl, l0 + row % nl, 0, p.D, q);
    std::fill(q + p.D, q + Dp, 0.0f);
    for (int d = 0; d < Dp; d += V::L) V::store(q + d, V::mul(V::load(q + d), qmul));
  }
  std::fill(O, O + rows * Dp, 0.0f);
  std::fill(m, m + rows, -kInf);
  std::fill(l, l + rows, 0.0f);

  // Key tiles this query tile can see (causal: none fully above the diagonal), and
  // this split's share of them.
  int visible = plan.n_ktiles;
  if (p.causal) {
    const int last = l0 + nl - 1 + p.S - p.L;  // the last key its last row sees
    visible = last < 0 ? 0 : std::min(plan.n_ktiles, last / BC + 1);
  }
  const int t0 = visible * split / plan.n_splits, t1 = visible * (split + 1) / plan.n_splits;
  const bool direct = !packed && rows <= kDirectRows;
  for (int t = t0; t < t1; ++t) {
    if (direct) {
      scores_direct(p, b, g, t, Q, rows, Dp, S, tile);
      mask_scores(p, b, g, n_rep, l0, nl, t, S, mrow);
      for (int row = 0; row < rows; ++row) online_softmax(S + row * BC, m[row], l[row], O + row * Dp, Dp);
      accumulate_direct(p, b, g, t, S, rows, Dp, O, tile + BC * Dp);
      continue;
    }
    const float* kt = packed ? packed + size_t(t) * plan.tile_floats() : tile;
    if (!packed) pack_kv(p, plan, b, g, t, tile);
    gemm(rows, BC, Dp, Q, Dp, kt, BC, S, BC, false);  // (rows, Dp) @ (Dp, BC)
    mask_scores(p, b, g, n_rep, l0, nl, t, S, mrow);
    for (int row = 0; row < rows; ++row) online_softmax(S + row * BC, m[row], l[row], O + row * Dp, Dp);
    gemm(rows, Dp, BC, S, BC, kt + BC * Dp, Dp, O, Dp, true);  // (rows, BC) @ (BC, Dp)
  }

  if (plan.n_splits > 1) {  // (O, m, l) for merge()
    const int R = plan.max_rows();
    std::memcpy(partial, O, size_t(rows) * Dp * 4);
    std::memcpy(partial + size_t(R) * Dp, m, size_t(rows) * 4);
    std::memcpy(partial + size_t(R) * Dp + R, l, size_t(rows) * 4);
    return;
  }
  for (int row = 0; row < rows; ++row) {
    // l = 0: the row saw no key; its output is 0 (torch's convention), not 0/0. A NaN l stays.
    const V inv = V::set1(l[row] == 0.0f ? 0.0f : 1.0f / l[row]);
    float* o = O + row * Dp;
    for (int d = 0; d < Dp; d += V::L) V::store(o + d, V::mul(V::load(o + d), inv));
    const int h = g * n_rep + row / nl, pos = l0 + row % nl;
    store_row(o, p.q.dtype, p.out, p.out_offset(b, h, pos), p.D);
  }
}

// Flash-decoding's combine: split i saw its keys with max m_i, sum l_i, accumulator O_i;
// out = sum_i 2^(m_i - M) O_i / sum_i 2^(m_i - M) l_i, M = max_i m_i.
void merge(const Problem& p, const Plan& plan, int b, int g, int qt, const float* partials) {
  const int Dp = plan.Dp, n_rep = plan.n_rep, R = plan.max_rows();
  const int l0 = qt * plan.positions, nl = std::min(p.L - l0, plan.positions);
  const size_t block = size_t(R) * (Dp + 2);
  float* o = scratch(kRowSlot, Dp);
  for (int row = 0; row < n_rep * nl; ++row) {
    float M = -kInf;
    for (int i = 0; i < plan.n_splits; ++i) {  // a NaN m_i (a split that saw NaN scores) wins
      const float m_i = partials[i * block + size_t(R) * Dp + row];
      M = std::isnan(m_i) || m_i > M ? m_i : M;
    }
    std::fill(o, o + Dp, 0.0f);
    float lsum = 0.0f;
    if (M != -kInf) {
      for (int i = 0; i < plan.n_splits; ++i) {
        const float* part = partials + i * block;
        const float w = std::exp2(part[size_t(R) * Dp + row] - M);  // a split that saw nothing: 0
        lsum += w * part[size_t(R) * Dp + R + row];
        const V wv = V::set1(w);
        for (int d = 0; d < Dp; d += V::L) V::store(o + d, V::fma(wv, V::load(part + row * Dp + d), V::load(o + d)));
      }
    }
    const V inv = V::set1(lsum == 0.0f ? 0.0f : 1.0f / lsum);
    for (int d = 0; d < Dp; d += V::L) V::store(o + d, V::mul(V::load(o + d), inv));
    const int h = g * n_rep + row / nl, pos = l0 + row % nl;
    store_row(o, p.q.dtype, p.out, p.out_offset(b, h, pos), p.D);
  }
}

}  // namespace
