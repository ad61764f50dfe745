// The paged attention kernel, written once over a SIMD vector type. Each instruction-set
// translation unit includes, before this file, its attention_simd_<isa>.h (the V the flash attention
// TUs use: L floats a vector, zero/set1/load/store/fma/add/sub/mul/max/hmax/hsum/sum_lanes/exp2,
// load_f16/load_bf16, f16_n/bf16_n) and defines
//   kScoreRows (SR): rows of a score block (SR rows by L / SR keys fill the L lanes of one sum_lanes),
//   RB x NV: rows by vectors of the P @ V register block,
// and half_to_float / float_to_half. Internal linkage throughout, as in flash_attention_impl.h.
// Every TU is compiled with -ffp-contract=off: the only FMAs are the explicit V::fma calls, so
// every inlined copy of a step rounds the same way.
//
// One row's arithmetic, whichever task, block shape or path computes it:
//   q' = fp32(q) * (scale * log2 e), zero padded to Dp (D rounded up to 16);
//   for each segment of kSegment logical positions from the one holding lo (the row's first key:
//   0, or p - window + 1) up to the one holding p, from (m, l, o) = (-inf, 0, 0), for each of its
//   tiles of kKeyTile positions:
//     s_j = sum_lanes tree of (acc = q'[0] k_j[0], then acc = fma(q'[c], k_j[c], acc) over the
//       other Dp / L chunks c in order),
//       for the keys lo <= j <= p of the tile; -inf for the rest of the tile;
//     the online softmax step (flash attention's) over the tile's kKeyTile scores;
//     o[lane] = fma(w_j, v_j[lane], o[lane]) for the keys j <= p of the tile in position order
//       (those before lo weigh 0 and change nothing);
//   the segments' (m, l, o) folded left to right by combine();
//   out = o * (1 / l), rounded to the query's type.
// sum_lanes applies one fixed tree of adds to each input vector, lane by lane, so which
// (row, key) pairs share a call does not matter; nor does an fp16/bf16 row converted once into
// an fp32 buffer rather than as it is loaded (exact either way); nor does a tile in which a
// row sees no key (skipped for that row: it would change nothing).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_scalar.h"
#include "paged_attention_kernels.h"

namespace {

using tiny_llm::pa::DType;
using tiny_llm::pa::Item;
using tiny_llm::pa::kKeyTile;
using tiny_llm::pa::kSegment;
using tiny_llm::pa::Problem;

constexpr int BC = kKeyTile;

// An fp16 or bf16 element of a pool row, read as fp32 L at a time (load_kv) or one at a time.
struct Half {
  uint16_t bits;
};
struct BHalf {
  uint16_t bits;
};
inline V load_kv(const float* p) { return V::load(p); }
inline V load_kv(const Half* p) { return V::load_f16(&p->bits); }
inline V load_kv(const BHalf* p) { return V::load_bf16(&p->bits); }

// n values from src (float, Half or BHalf, or the raw uint16 of DType t) to fp32 in dst.
inline void to_float(const float* src, int n, float* dst) { std::memcpy(dst, src, size_t(n) * 4); }
inline void to_float(const Half* src, int n, float* dst) {
  const uint16_t* u = &src->bits;
  for (int i = V::f16_n(u, dst, n); i < n; ++i) dst[i] = half_to_float(u[i]);
}
inline void to_float(const BHalf* src, int n, float* dst) {
  const uint16_t* u = &src->bits;
  for (int i = V::bf16_n(u, dst, n); i < n; ++i) dst[i] = bf16_to_float(u[i]);
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

// f(E{}) with E the element type of d.
template <class F>
inline void with_elem(DType d, F&& f) {
  switch (d) {
    case DType::f32: return f(float{});
    case DType::f16: return f(Half{});
    case DType::bf16: return f(BHalf{});
  }
}

// Per-thread scratch, grown and never shrunk (sizes depend on the task's rows and D).
template <class T, int Slot>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// --- scores: S (rows, BC) = Q (rows, Dp) . K rows ----------------------------------------

// Rows r < nr of Q against keys jj < nk of kp: RB x KB accumulators (RB * KB <= L), one
// chain of FMAs over the Dp / L chunks each, then one sum_lanes for all of them.
template <int RB, int KB, class E>
inline void score_block(const float* Q, int Dp, const E* const* kp, int nr, int nk, float* S) {
  static_assert(RB * KB <= V::L, "one sum_lanes per block");
  constexpr int N = RB * KB;
  const float* q[RB];
  for (int r = 0; r < RB; ++r) q[r] = Q + std::min(r, nr - 1) * Dp;  // a missing row repeats the last
  const E* k[KB];
  for (int jj = 0; jj < KB; ++jj) k[jj] = kp[std::min(jj, nk - 1)];  // likewise a missing key
  // The chain starts with a product (fma(q, k, 0) rounds the same, bar the sign of a zero, which
  // no later step can tell), so that no array of zeros is stored first.
  V acc[N];
  for (int r = 0; r < RB; ++r) {  // chunk 0 (Dp >= L always)
    const V qv = V::load(q[r]);
    for (int jj = 0; jj < KB; ++jj) acc[r * KB + jj] = V::mul(qv, load_kv(k[jj]));
  }
  for (int d = V::L; d < Dp; d += V::L) {
    if constexpr (RB == 1) {
      const V qv = V::load(q[0] + d);
      for (int jj = 0; jj < KB; ++jj) acc[jj] = V::fma(qv, load_kv(k[jj] + d), acc[jj]);
    } else {
      V kv[KB];
      for (int jj = 0; jj < KB; ++jj) kv[jj] = load_kv(k[jj] + d);
      for (int r = 0; r < RB; ++r) {
        const V qv = V::load(q[r] + d);
        for (int jj = 0; jj < KB; ++jj) acc[r * KB + jj] = V::fma(qv, kv[jj], acc[r * KB + jj]);
      }
    }
  }
  alignas(64) float s[V::L];
  if constexpr (N == V::L) {
    V::store(s, V::sum_lanes(acc));
  } else {  // sum_lanes takes L vectors: the block's, then any (their lanes are not used)
    V all[V::L];
    for (int i = 0; i < V::L; ++i) all[i] = acc[i < N ? i : 0];
    V::store(s, V::sum_lanes(all));
  }
  if (nr == RB && nk == KB) {  // a whole block: fixed-size copies, no calls
    for (int r = 0; r < RB; ++r) std::memcpy(S + r * BC, s + r * KB, KB * sizeof(float));
    return;
  }
  for (int r = 0; r < nr; ++r)
    for (int jj = 0; jj < nk; ++jj) S[r * BC + jj] = s[r * KB + jj];
}

// Rows read soon (n of them, `bytes` each), asked for from memory a few at a time: the keys
// while this tile's scores are computed, the values while its P @ V runs, each just ahead of
// its use. The rows of a block are contiguous but blocks lie anywhere, which the hardware
// prefetcher does not follow. What is asked for: the next kv head's rows of this tile, or,
// after the item's last kv head, the first one's next tile (attend()). This kernel first asked
// for a kv head's whole next tile of keys and values (16 KiB at D = 64 in bf16) before its
// scores, three heads' worth before their use in a decode item: slower, most likely because
// the prefetched lines pushed the rows in use out of L1 (32 KiB; Zen 4 fills L1 on prefetcht1
// as far as the timings tell: asking for L1 or L2 measured the same). On 64 decode rows of
// contexts 100-768 (bf16 pools, blocks of 64, one layer), CPU time a key and kv head: 39-48 ns
// before, 24-27 ns with this (19-20 once sum_lanes was inlined), 38-39 ns without prefetching,
// and 17 ns (16) with every sequence reading the same few blocks, all in cache.
template <class E>
struct Ahead {
  const E* const* k = nullptr;
  const E* const* v = nullptr;
  int n = 0;
  int64_t bytes = 0;
  void rows(int j0, int j1) const { keys(j0, j1), values(j0, j1); }
  void keys(int j0, int j1) const { lines(k, j0, j1); }
  void values(int j0, int j1) const { lines(v, j0, j1); }
  void lines(const E* const* p, int j0, int j1) const {
    for (int j = j0; j < std::min(j1, n); ++j)
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p[j]) + b, 0, 2);
  }
};

template <int RB, class E, class A>
inline void score_rows(const float* Q, int Dp, const E* const* kp, int nr, int nk, float* S, const A* ahead) {
  constexpr int KB = V::L / RB;
  for (int j0 = 0; j0 < nk; j0 += KB) {
    if (ahead) ahead->keys(j0, j0 + KB);
    score_block<RB, KB>(Q, Dp, kp + j0, nr, std::min(KB, nk - j0), S + j0);
  }
  if (ahead) ahead->keys(nk, BC);  // a short tile: the rest of the next one
}

template <class E, class A, int R = kScoreRows>
inline void score_rest(int nr, const float* Q, int Dp, const E* const* kp, int nk, float* S, const A* ahead) {
  if constexpr (R > 0) {
    if (nr == R) return score_rows<R>(Q, Dp, kp, nr, nk, S, ahead);
    score_rest<E, A, R - 1>(nr, Q, Dp, kp, nk, S, ahead);
  }
}

// ahead: the next tile's rows to prefetch along the way (once, with the first rows), or nullptr.
template <class E, class A>
void scores(const float* Q, int rows, int Dp, const E* const* kp, int nk, float* S, const A* ahead) {
  int r = 0;
  for (; r + kScoreRows <= rows; r += kScoreRows, ahead = nullptr)
    score_rows<kScoreRows>(Q + r * Dp, Dp, kp, kScoreRows, nk, S + r * BC, ahead);
  if (r < rows) score_rest<E, A>(rows - r, Q + r * Dp, Dp, kp, nk, S + r * BC, ahead);
}

// --- O (rows, Dp) += P (rows, BC) @ V rows ----------------------------------------------

// Rows 0..RB-1 (P and O `BC` and `Dp` apart), columns d .. d + NV * L, keys j0 .. j1 - 1;
// ahead (or nullptr): value rows j0 .. j1 - 1 to prefetch, one at each key.
template <int RB, int NV, class E, class A = Ahead<E>>
inline void pv_block(const float* P, const E* const* vp, int j0, int j1, float* O, int Dp, int d,
                     const A* ahead = nullptr) {
  V acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::load(O + r * Dp + d + v * V::L);
  for (int j = j0; j < j1; ++j) {
    if (ahead) ahead->values(j, j + 1);
    V x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load_kv(vp[j] + d + v * V::L);
    for (int r = 0; r < RB; ++r) {
      const V w = V::set1(P[r * BC + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(w, x[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) V::store(O + r * Dp + d + v * V::L, acc[r][v]);
}

template <int RB, class E, class A = Ahead<E>>
inline void pv_rows(const float* P, const E* const* vp, int j0, int j1, float* O, int Dp, const A* ahead = nullptr) {
  int d = 0;
  for (; d + V::NV * V::L <= Dp; d += V::NV * V::L, ahead = nullptr)  // the values asked for once, at the first
    pv_block<RB, V::NV>(P, vp, j0, j1, O, Dp, d, ahead);
  for (; d < Dp; d += V::L, ahead = nullptr) pv_block<RB, 1>(P, vp, j0, j1, O, Dp, d, ahead);
}

template <class E, class A, int R = V::RB>
inline void pv_rest(int nr, const float* P, const E* const* vp, int j0, int j1, float* O, int Dp, const A* ahead) {
  if constexpr (R > 0) {
    if (nr == R) return pv_rows<R>(P, vp, j0, j1, O, Dp, ahead);
    pv_rest<E, A, R - 1>(nr, P, vp, j0, j1, O, Dp, ahead);
  }
}

// Row r takes keys 0 .. cnt[r] - 1 of the tile: a block of rows shares the keys all of them
// see, then each row takes its own remainder (the diagonal), so each output lane is one chain
// over exactly the row's visible keys. ahead: the value rows to prefetch (all of them, along
// the first block of rows' keys, then any left).
template <class E, class A>
void accumulate(const float* P, const int* cnt, int rows, int Dp, const E* const* vp, float* O, const A* ahead) {
  int asked = 0;  // value rows prefetched so far
  for (int r0 = 0; r0 < rows; r0 += V::RB) {
    const int nr = std::min(V::RB, rows - r0);
    const int common = *std::min_element(cnt + r0, cnt + r0 + nr);
    if (common > 0) pv_rest<E, A>(nr, P + r0 * BC, vp, 0, common, O + r0 * Dp, Dp, asked ? nullptr : ahead);
    if (common > 0 && !asked) asked = common;
    for (int r = r0; r < r0 + nr; ++r)
      if (cnt[r] > common) pv_rows<1>(P + r * BC, vp, common, cnt[r], O + r * Dp, Dp);
  }
  if (ahead) ahead->values(asked, BC);
}

// The online softmax step for one row of BC scores (log2 units), as flash attention's: the
// running max m and sum l absorb the tile, o is rescaled by 2^(m_old - m_new), and s becomes
// the tile's weights 2^(s - m_new).
inline void online_softmax(float* s, float& m, float& l, float* o, int Dp) {
  V mx = V::set1(-kInf);
  for (int c = 0; c < BC; c += V::L) mx = V::max(mx, V::load(s + c));
  const float m_new = std::max(m, V::hmax(mx));
  if (m_new == -kInf) {  // nothing visible yet (scores of -inf): weights 0; NaN scores make the row NaN
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
  const float alpha = std::exp2(m - m_new);  // m = -inf (first tile): 0
  l = l * alpha + V::hsum(sum);
  m = m_new;
  if (alpha != 1.0f) {
    const V a = V::set1(alpha);
    for (int d = 0; d < Dp; d += V::L) V::store(o + d, V::mul(V::load(o + d), a));
  }
}

// Above this many rows an fp16/bf16 tile is converted to fp32 once rather than as each row
// block loads it (the same values either way).
constexpr int kConvertRows = 8;

// A row's running (max, sum, accumulator) over its keys so far, and the fold of a segment's
// (m, l, o) into it (flash-decoding's combine), the same function in a task that takes a row's
// segments one after another and in merge() after tasks that took one segment each:
//   M = max(Ma, m); Ma, m -> weights 2^(Ma - M), 2^(m - M); La = La wa + l wb; Oa = fma(wb, o, Oa wa).
inline void combine(float& Ma, float& La, float* Oa, float m, float l, const float* o, int Dp) {
  const float M = std::isnan(Ma) || std::isnan(m) ? std::nanf("") : std::max(Ma, m);
  if (M == -kInf) return;  // neither saw a finite score: nothing to weigh
  const float wa = std::exp2(Ma - M), wb = std::exp2(m - M);
  La = La * wa + l * wb;
  Ma = M;
  const V va = V::set1(wa), vb = V::set1(wb);
  for (int d = 0; d < Dp; d += V::L) V::store(Oa + d, V::fma(vb, V::load(o + d), V::mul(V::load(Oa + d), va)));
}

// out = o / l for one row, rounded to the output's type. l = 0 cannot happen (every row sees
// key 0) unless the scores were NaN; a NaN l stays.
inline void finish(const Problem& p, int t, int h, float l, float* o, int Dp) {
  const V inv = V::set1(l == 0.0f ? 0.0f : 1.0f / l);
  for (int d = 0; d < Dp; d += V::L) V::store(o + d, V::mul(V::load(o + d), inv));
  store_row(o, p.q_dtype, p.out, (int64_t(t) * p.H + h) * p.D, p.D);
}

// The item's rows: for kv head g0 + i (i < ng), its n_rep query heads, each for the tokens
// t0 .. t0 + nt - 1: row r is query head g0 * n_rep + r / nt, token t0 + r % nt, and the rows of
// kv head g0 + i are rows i * n_rep * nt .. (i + 1) * n_rep * nt - 1.
inline int row_head(const Problem& p, const Item& it, int r) { return it.g0 * (p.H / p.H_kv) + r / it.nt; }
inline int row_token(const Item& it, int r) { return it.t0 + r % it.nt; }

// One task. seg < 0: every segment of the rows' keys, folded in order, and the output written.
// seg >= 0: that segment only, its (o, m, l) per row to `partial` (rows * (Dp + 2) floats:
// o of every row, then m, then l) for merge(); rows that see no key in it are left out.
void attend(const Problem& p, const Item& it, int seg, float* partial) {
  const int D = p.D, Dp = p.Dp(), gr = p.H / p.H_kv * it.nt, rows = it.ng * gr;
  float* Q = scratch<float, 0>(size_t(rows) * (3 * Dp + BC + 4));
  float* O = Q + size_t(rows) * Dp;    // (rows, Dp) this segment's accumulators
  float* Oa = O + size_t(rows) * Dp;   // (rows, Dp) the fold of the segments before
  float* S = Oa + size_t(rows) * Dp;   // (rows, BC) scores, then weights
  float* m = S + size_t(rows) * BC;    // (rows) running max (log2 units) and sum, this segment
  float* l = m + rows;
  float* Ma = l + rows;                // (rows) ... and of the fold
  float* La = Ma + rows;
  int* vis = scratch<int, 1>(size_t(4) * rows);  // keys each row sees (p + 1); this tile's share
  int* cnt = vis + rows;
  int* lo = cnt + rows;  // each row's first key (0, or p - window + 1), and the segment holding it
  int* first = lo + rows;
  float* kbuf = scratch<float, 2>(size_t(2) * BC * Dp);  // a converted tile, when used
  float* vbuf = kbuf + size_t(BC) * Dp;

  const float qmul = p.scale * kLog2e;  // scores come out in log2 units, for exp2
  const size_t qsize = p.q_dtype == DType::f32 ? 4 : 2;
  int maxvis = 0, minlo = std::numeric_limits<int>::max();
  for (int r = 0; r < rows; ++r) {
    const int pos = p.positions[row_token(it, r)];
    maxvis = std::max(maxvis, vis[r] = pos + 1);
    minlo = std::min(minlo, lo[r] = p.lo(pos));
    first[r] = lo[r] / kSegment;
  }
  auto load_q = [&] {
    for (int r = 0; r < rows; ++r) {
      float* q = Q + size_t(r) * Dp;
      const char* src =
          static_cast<const char*>(p.q) + (int64_t(row_token(it, r)) * p.H + row_head(p, it, r)) * D * qsize;
      with_elem(p.q_dtype, [&](auto e) { to_float(reinterpret_cast<const decltype(e)*>(src), D, q); });
      std::fill(q + D, q + Dp, 0.0f);
      const V s = V::set1(qmul);
      for (int d = 0; d < Dp; d += V::L) V::store(q + d, V::mul(V::load(q + d), s));
    }
  };

  const int32_t* table = p.block_tables + int64_t(it.b) * p.max_blocks;
  const int bs = p.block_size;
  const bool convert = D != Dp || (p.kv_dtype != DType::f32 && gr > kConvertRows);
  const int n_segs = (maxvis + kSegment - 1) / kSegment;
  // Segments and tiles wholly before every row's first key are skipped; tiles stay at their
  // fixed places (multiples of BC), so a row computes the same whoever shares its task.
  const int seg0 = seg < 0 ? minlo / kSegment : seg, seg1 = seg < 0 ? n_segs : seg + 1;
  const int t0 = std::max(seg0 * kSegment, minlo / BC * BC);  // the first tile any row sees
  with_elem(p.kv_dtype, [&](auto elem) {
    using E = decltype(elem);
    const E* K = static_cast<const E*>(p.k);
    const E* Vv = static_cast<const E*>(p.v);
    const int64_t row_bytes = int64_t(D) * sizeof(E);
    // Where kv head g's keys s0 .. s0 + nk - 1 live (the rows of a block are contiguous, each
    // block anywhere).
    auto locate = [&](int g, int s0, int nk, const E** kp, const E** vp) {
      int blk = s0 / bs, off = s0 % bs;
      for (int j = 0; j < nk; ++j) {
        const int64_t row = (int64_t(table[blk]) * p.H_kv + g) * bs + off;
        kp[j] = K + row * D;
        vp[j] = Vv + row * D;
        if (++off == bs) off = 0, ++blk;
      }
    };
    // [tile parity][kv head of the item][keys, values]: this tile's rows, and the next one's,
    // located a tile ahead so that scores() can prefetch them.
    const E** ptrs = scratch<const E*, 4>(size_t(2) * it.ng * 2 * BC);
    auto at = [&](int parity, int i, int kv) { return ptrs + ((size_t(parity) * it.ng + i) * 2 + kv) * BC; };
    const int s_end = std::min(maxvis, seg1 * kSegment);
    int cur = 0;
    const int n0 = std::clamp(s_end - t0, 0, BC);
    for (int i = 0; i < it.ng; ++i) locate(it.g0 + i, t0, n0, at(0, i, 0), at(0, i, 1));  // the first tile
    Ahead<E>{at(0, 0, 0), at(0, 0, 1), n0, row_bytes}.rows(0, BC);  // its first kv head's rows, before the queries load
    load_q();
    for (int sg = seg0; sg < seg1; ++sg) {
      std::fill(O, O + size_t(rows) * Dp, 0.0f);
      std::fill(m, m + rows, -kInf);
      std::fill(l, l + rows, 0.0f);
      const int sg_end = std::min(maxvis, (sg + 1) * kSegment);
      for (int s0 = std::max(sg * kSegment, t0); s0 < sg_end; s0 += BC) {
        const int nk = std::min(BC, sg_end - s0), nn = std::clamp(s_end - s0 - BC, 0, BC);
        for (int r = 0; r < rows; ++r)  // keys 0 .. cnt - 1 of the tile; none if all are before lo
          cnt[r] = lo[r] >= s0 + BC ? 0 : std::clamp(vis[r] - s0, 0, BC);
        for (int i = 0; i < it.ng; ++i) {  // each kv head and its rows
          const int r0 = i * gr;
          const E** kp = at(cur, i, 0);
          const E** vp = at(cur, i, 1);
          if (nn > 0) locate(it.g0 + i, s0 + BC, nn, at(cur ^ 1, i, 0), at(cur ^ 1, i, 1));
          // prefetch the rows read next: the next kv head's in this tile, or the first head's next tile
          Ahead<E> ahead = i + 1 < it.ng ? Ahead<E>{at(cur, i + 1, 0), at(cur, i + 1, 1), nk, row_bytes}
                                         : Ahead<E>{at(cur ^ 1, 0, 0), at(cur ^ 1, 0, 1), nn, row_bytes};
          auto tile = [&](const auto* const* ks, const auto* const* vs) {
            scores(Q + size_t(r0) * Dp, gr, Dp, ks, nk, S + size_t(r0) * BC, &ahead);
            for (int r = r0; r < r0 + gr; ++r) {
              if (cnt[r] == 0) continue;  // sees none of this tile: nothing would change
              float* s = S + size_t(r) * BC;
              std::fill(s + cnt[r], s + BC, -kInf);
              std::fill(s, s + std::clamp(lo[r] - s0, 0, BC), -kInf);  // before the window
              online_softmax(s, m[r], l[r], O + size_t(r) * Dp, Dp);
            }
            accumulate(S + size_t(r0) * BC, cnt + r0, gr, Dp, vs, O + size_t(r0) * Dp, &ahead);
          };
          if (!convert) {
            tile(kp, vp);
            continue;
          }
          const float* kc[BC];
          const float* vc[BC];
          for (int j = 0; j < nk; ++j) {
            float* kr = kbuf + size_t(j) * Dp;
            float* vr = vbuf + size_t(j) * Dp;
            to_float(kp[j], D, kr);
            to_float(vp[j], D, vr);
            std::fill(kr + D, kr + Dp, 0.0f);
            std::fill(vr + D, vr + Dp, 0.0f);
            kc[j] = kr, vc[j] = vr;
          }
          tile(kc, vc);
        }
        cur ^= 1;
      }
      if (seg >= 0) break;  // one segment: its partials below
      for (int r = 0; r < rows; ++r) {
        if (sg == first[r]) {  // the row's first segment: it is the fold so far
          std::copy(O + size_t(r) * Dp, O + size_t(r + 1) * Dp, Oa + size_t(r) * Dp);
          Ma[r] = m[r], La[r] = l[r];
        } else if (sg > first[r] && vis[r] > sg * kSegment) {
          combine(Ma[r], La[r], Oa + size_t(r) * Dp, m[r], l[r], O + size_t(r) * Dp, Dp);
        }
      }
    }
  });

  if (seg >= 0) {
    std::memcpy(partial, O, size_t(rows) * Dp * 4);
    std::memcpy(partial + size_t(rows) * Dp, m, size_t(rows) * 4);
    std::memcpy(partial + size_t(rows) * (Dp + 1), l, size_t(rows) * 4);
    return;
  }
  for (int r = 0; r < rows; ++r) finish(p, row_token(it, r), row_head(p, it, r), La[r], Oa + size_t(r) * Dp, Dp);
}

// The rows of an item whose segments ran as separate tasks: each row's segments 0 .. its last
// folded in order (as attend() folds them), then its output written. partials: n_segs blocks of
// rows * (Dp + 2) floats, one per segment, in order.
void merge(const Problem& p, const Item& it, const float* partials, int n_segs) {
  const int Dp = p.Dp(), rows = it.ng * (p.H / p.H_kv) * it.nt;
  const size_t block = size_t(rows) * (Dp + 2);
  float* o = scratch<float, 3>(Dp);
  for (int r = 0; r < rows; ++r) {
    const int t = row_token(it, r), last = std::min(n_segs - 1, p.positions[t] / kSegment);
    const int f = p.lo(p.positions[t]) / kSegment;  // the row's first segment
    const float* part0 = partials + f * block;
    std::memcpy(o, part0 + size_t(r) * Dp, size_t(Dp) * 4);
    float M = part0[size_t(rows) * Dp + r], L = part0[size_t(rows) * (Dp + 1) + r];
    for (int sg = f + 1; sg <= last; ++sg) {
      const float* part = partials + sg * block;
      combine(M, L, o, part[size_t(rows) * Dp + r], part[size_t(rows) * (Dp + 1) + r], part + size_t(r) * Dp, Dp);
    }
    finish(p, t, row_head(p, it, r), L, o, Dp);
  }
}

}  // namespace
