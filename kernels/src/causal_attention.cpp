// The MLX side and the loops of tiny_llm_kernels.causal_attention and its backward
// (causal_attention.h).
//
// One task per (sequence n, kv head g), over the thread pool; it owns the rows of its n_rep query
// heads and, in the backward, its keys' and values' gradients, so no two tasks write one element
// and the result does not depend on the number of threads. For each query row i of head h:
//   s_j = scale * (sum over d in order of q_id k_jd), j <= i (keys held transposed, so that the
//     sum runs as D passes over contiguous keys, each vectorized over j);
//   forward:  m = max_j s_j, p_j = exp(s_j - m), l = sum16(p), out_i = (sum over j in order of
//             p_j v_j) / l, lse_i = m + log(l);
//   backward: p_j = exp(s_j - lse_i) (the forward's softmax, recomputed), D_i = sum over d in order of
//             dout_id out_id, dp_j = sum over d in order of dout_id v_jd, ds_j = scale p_j (dp_j - D_i);
//             dq_i = sum over j in order of ds_j k_j; then dk_j = sum of ds_ij q_i and dv_j = sum of
//             p_ij dout_i over the rows i >= j of the group's heads, heads then rows in order.
// Each weighted sum runs over rows padded to a multiple of 16 floats, its accumulators in registers.
// exp and sum16: fast_exp.h. Compiled with -ffp-contract=off; each task is cloned per instruction
// set with its loops inlined: every clone rounds the same.
#include "causal_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "clones.h"
#include "cpu_stream.h"
#include "fast_exp.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

// The helpers are inlined into each task's clone, so that they too run on its instruction set.
#define TINY_LLM_INLINE inline __attribute__((always_inline))

// An (N, heads, L, D) float32 array read through its strides, each row of D contiguous.
struct Heads {
  const float* p;
  int64_t sn, sh, sl;
  const float* row(int n, int h, int l) const { return p + n * sn + h * sh + l * sl; }
};

// a's rows in place when its last axis is contiguous (a transposed (N, L, H, D) is), else a
// row-major copy in tmp.
Heads heads_of(const mx::array& a, std::vector<char>& tmp) {
  if (a.strides(3) == 1 || a.shape(3) == 1) return {a.data<float>(), a.strides(0), a.strides(1), a.strides(2)};
  const float* p = static_cast<const float*>(row_major(a, tmp));
  const int64_t H = a.shape(1), L = a.shape(2), D = a.shape(3);
  return {p, H * L * D, L * D, D};
}

struct Shape {
  int N, H, H_kv, L, D;
};

constexpr int KB = 16;  // keys (or d) per chunk: one AVX-512 register of accumulators

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

// kt (D, Lp): the keys (or values) of (n, g), transposed, keys L.. Lp - 1 zero.
TINY_LLM_INLINE void transpose_rows(const Heads& a, int n, int g, const Shape& sh, int Lp, float* kt) {
  for (int d = 0; d < sh.D; ++d) std::fill(kt + int64_t(d) * Lp + sh.L, kt + int64_t(d + 1) * Lp, 0.0f);
  for (int j = 0; j < sh.L; ++j) {
    const float* r = a.row(n, g, j);
    for (int d = 0; d < sh.D; ++d) kt[int64_t(d) * Lp + j] = r[d];
  }
}

// s[j] = x . t_j (the sum over d in order) for NB chunks of KB keys from t (D, Lp): NB * KB
// accumulators held in registers through the D steps.
template <int NB>
TINY_LLM_INLINE void dot_chunks(const float* x, const float* t, int64_t Lp, int D, float* s) {
  float acc[NB][KB];
  for (int b = 0; b < NB; ++b)
    for (int j = 0; j < KB; ++j) acc[b][j] = x[0] * t[b * KB + j];
  for (int d = 1; d < D; ++d) {
    const float xd = x[d];
    const float* td = t + d * Lp;
    for (int b = 0; b < NB; ++b)
      for (int j = 0; j < KB; ++j) acc[b][j] += xd * td[b * KB + j];
  }
  for (int b = 0; b < NB; ++b)
    for (int j = 0; j < KB; ++j) s[b * KB + j] = acc[b][j];
}

// s[j] = x . t_j for j < nk (and on to the next multiple of KB; s holds Lp floats).
TINY_LLM_INLINE void dots(const float* x, const float* t, int Lp, int D, int nk, float* s) {
  int chunks = (nk + KB - 1) / KB, j0 = 0;
  for (; chunks >= 4; chunks -= 4, j0 += 4 * KB) dot_chunks<4>(x, t + j0, Lp, D, s + j0);
  switch (chunks) {
    case 3: return dot_chunks<3>(x, t + j0, Lp, D, s + j0);
    case 2: return dot_chunks<2>(x, t + j0, Lp, D, s + j0);
    case 1: return dot_chunks<1>(x, t + j0, Lp, D, s + j0);
    default: return;
  }
}

// s[j] = scale * q . k_j for j < nk, from kt (D, Lp).
TINY_LLM_INLINE void scores(const float* q, const float* kt, int Lp, int D, int nk, float scale, float* s) {
  dots(q, kt, Lp, D, nk, s);
  for (int j = 0; j < nk; ++j) s[j] *= scale;
}

// xp (L, Dp): the rows of (n, h), zero past D.
TINY_LLM_INLINE void pad_rows(const Heads& a, int n, int h, const Shape& sh, int Dp, float* xp) {
  for (int j = 0; j < sh.L; ++j) {
    const float* r = a.row(n, h, j);
    std::copy(r, r + sh.D, xp + int64_t(j) * Dp);
    std::fill(xp + int64_t(j) * Dp + sh.D, xp + int64_t(j + 1) * Dp, 0.0f);
  }
}

// o (NB * KB) = o0 + sum over r < n in order of w[r ws] x_r (x_r = x + r xs), o0 = o if `more`, else 0:
// NB * KB accumulators in registers through the n steps.
template <int NB>
TINY_LLM_INLINE void wsum_chunks(const float* w, int64_t ws, const float* x, int64_t xs, int n, bool more, float* o) {
  float acc[NB][KB];
  for (int b = 0; b < NB; ++b)
    for (int j = 0; j < KB; ++j) acc[b][j] = more ? o[b * KB + j] : 0.0f;
  for (int r = 0; r < n; ++r) {
    const float wr = w[r * ws];
    const float* xr = x + r * xs;
    for (int b = 0; b < NB; ++b)
      for (int j = 0; j < KB; ++j) acc[b][j] += wr * xr[b * KB + j];
  }
  for (int b = 0; b < NB; ++b)
    for (int j = 0; j < KB; ++j) o[b * KB + j] = acc[b][j];
}

// o (Dp) = (o if more, else 0) + sum over r < n in order of w[r ws] x_r: a weighted sum of padded rows.
TINY_LLM_INLINE void wsum(const float* w, int64_t ws, const float* x, int64_t xs, int n, int Dp, bool more, float* o) {
  int chunks = Dp / KB, d0 = 0;
  for (; chunks >= 4; chunks -= 4, d0 += 4 * KB) wsum_chunks<4>(w, ws, x + d0, xs, n, more, o + d0);
  switch (chunks) {
    case 3: return wsum_chunks<3>(w, ws, x + d0, xs, n, more, o + d0);
    case 2: return wsum_chunks<2>(w, ws, x + d0, xs, n, more, o + d0);
    case 1: return wsum_chunks<1>(w, ws, x + d0, xs, n, more, o + d0);
    default: return;
  }
}

// s[j] <- exp(s[j] - shift) for j < n.
TINY_LLM_INLINE void exp_shifted(float* s, int n, float shift) {
  for (int j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - shift);
}

// ds[j] = scale * p[j] * (dp[j] - Di), j < nk.
TINY_LLM_INLINE void score_grads(const float* p, const float* dp, float Di, float scale, int nk, float* ds) {
  for (int j = 0; j < nk; ++j) ds[j] = scale * (p[j] * (dp[j] - Di));
}

TINY_LLM_CLONES void forward_task(const Heads& Q, const Heads& K, const Heads& V, const Shape& sh, float scale,
                                  int n, int g, float* out, float* lse) {
  thread_local std::vector<float> buf;
  const int Lp = round_up(sh.L, KB), Dp = round_up(sh.D, KB);
  buf.resize(size_t(sh.D) * Lp + size_t(sh.L) * Dp + Lp + Dp);
  float* kt = buf.data();                     // (D, Lp) keys, transposed
  float* vp = kt + size_t(sh.D) * Lp;         // (L, Dp) values, padded
  float* s = vp + size_t(sh.L) * Dp;          // (Lp) scores, then weights
  float* o = s + Lp;                          // (Dp) a row's output
  transpose_rows(K, n, g, sh, Lp, kt);
  pad_rows(V, n, g, sh, Dp, vp);
  const int rep = sh.H / sh.H_kv;
  for (int h = g * rep; h < (g + 1) * rep; ++h) {
    for (int i = 0; i < sh.L; ++i) {
      const int nk = i + 1;
      scores(Q.row(n, h, i), kt, Lp, sh.D, nk, scale, s);
      float m = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < nk; ++j) m = s[j] > m ? s[j] : m;  // a NaN is skipped here and turns up in s - m
      exp_shifted(s, nk, m);
      const float l = sum16(s, nk);
      wsum(s, 1, vp, Dp, nk, Dp, false, o);
      float* dst = out + ((int64_t(n) * sh.H + h) * sh.L + i) * sh.D;
      for (int d = 0; d < sh.D; ++d) dst[d] = o[d] / l;
      lse[(int64_t(n) * sh.H + h) * sh.L + i] = m + std::log(l);
    }
  }
}

TINY_LLM_CLONES void backward_task(const Heads& Q, const Heads& K, const Heads& V, const Heads& O,
                                   const float* lse, const Heads& dO, const Shape& sh, float scale, int n, int g,
                                   float* dq, float* dk, float* dv) {
  thread_local std::vector<float> buf;
  const int Lp = round_up(sh.L, KB), Dp = round_up(sh.D, KB), rep = sh.H / sh.H_kv;
  const size_t LpD = size_t(Lp) * sh.D, LDp = size_t(sh.L) * Dp, LLp = size_t(sh.L) * Lp;
  buf.resize(2 * LpD + LDp * (1 + 2 * rep) + 2 * LLp * rep + Lp + Dp);
  float* kt = buf.data();           // (D, Lp) keys, transposed
  float* vt = kt + LpD;             // (D, Lp) values, transposed
  float* kp = vt + LpD;             // (L, Dp) keys, padded
  float* qp = kp + LDp;             // (rep, L, Dp) the group's queries, padded
  float* gp = qp + LDp * rep;       // (rep, L, Dp) their output gradients, padded
  float* P = gp + LDp * rep;        // (rep, L, Lp) softmax weights (row i: keys 0..i)
  float* dS = P + LLp * rep;        // (rep, L, Lp) score gradients
  float* dp = dS + LLp * rep;       // (Lp) a row's dout . v_j
  float* o = dp + Lp;               // (Dp) a row of dq, dk or dv
  transpose_rows(K, n, g, sh, Lp, kt);
  transpose_rows(V, n, g, sh, Lp, vt);
  pad_rows(K, n, g, sh, Dp, kp);
  for (int r = 0; r < rep; ++r) {
    const int h = g * rep + r;
    pad_rows(Q, n, h, sh, Dp, qp + LDp * r);
    pad_rows(dO, n, h, sh, Dp, gp + LDp * r);
    for (int i = 0; i < sh.L; ++i) {
      const int nk = i + 1;
      float* p = P + LLp * r + size_t(i) * Lp;
      float* ds = dS + LLp * r + size_t(i) * Lp;
      const float* gi = gp + LDp * r + size_t(i) * Dp;
      const float* oi = O.row(n, h, i);
      scores(qp + LDp * r + size_t(i) * Dp, kt, Lp, sh.D, nk, scale, p);
      exp_shifted(p, nk, lse[(int64_t(n) * sh.H + h) * sh.L + i]);
      float Di = gi[0] * oi[0];  // in dp's order: where out_i = v_j (one key), ds_j is exactly 0
      for (int d = 1; d < sh.D; ++d) Di += gi[d] * oi[d];
      dots(gi, vt, Lp, sh.D, nk, dp);
      score_grads(p, dp, Di, scale, nk, ds);
      wsum(ds, 1, kp, Dp, nk, Dp, false, o);  // dq_i
      std::copy(o, o + sh.D, dq + ((int64_t(n) * sh.H + h) * sh.L + i) * sh.D);
    }
  }
  // dk_j and dv_j: the rows i >= j of every head of the group, heads then rows in order.
  for (int j = 0; j < sh.L; ++j) {
    for (int r = 0; r < rep; ++r)
      wsum(dS + LLp * r + size_t(j) * Lp + j, Lp, qp + LDp * r + size_t(j) * Dp, Dp, sh.L - j, Dp, r > 0, o);
    std::copy(o, o + sh.D, dk + ((int64_t(n) * sh.H_kv + g) * sh.L + j) * sh.D);
    for (int r = 0; r < rep; ++r)
      wsum(P + LLp * r + size_t(j) * Lp + j, Lp, gp + LDp * r + size_t(j) * Dp, Dp, sh.L - j, Dp, r > 0, o);
    std::copy(o, o + sh.D, dv + ((int64_t(n) * sh.H_kv + g) * sh.L + j) * sh.D);
  }
}

void check_qkv(const char* who, const mx::array& q, const mx::array& k, const mx::array& v) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(who) + ": " + what); };
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32)
    fail("q, k and v must be float32");
  if (q.ndim() != 4 || k.ndim() != 4 || k.shape() != v.shape())
    fail("q must be (N, H, L, D) and k, v (N, H_kv, L, D), got " + shape_str(q) + ", " + shape_str(k) + " and " +
         shape_str(v));
  if (k.shape(0) != q.shape(0) || k.shape(2) != q.shape(2) || k.shape(3) != q.shape(3))
    fail("k and v must be (N, H_kv, L, D) = (" + std::to_string(q.shape(0)) + ", H_kv, " +
         std::to_string(q.shape(2)) + ", " + std::to_string(q.shape(3)) + "), got " + shape_str(k));
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0)
    fail("the query heads (" + std::to_string(q.shape(1)) + ") must be a multiple of the kv heads (" +
         std::to_string(k.shape(1)) + ")");
}

}  // namespace

std::vector<mx::array> causal_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                                        mx::StreamOrDevice s) {
  check_qkv("causal_attention", q, k, v);
  const mx::Stream stream = cpu_stream(s, "causal_attention");
  return mx::array::make_arrays({q.shape(), {q.shape(0), q.shape(1), q.shape(2)}}, {mx::float32, mx::float32},
                                std::make_shared<CausalAttention>(stream, scale, false), {q, k, v});
}

std::vector<mx::array> causal_attention_backward(const mx::array& q, const mx::array& k, const mx::array& v,
                                                 const mx::array& out, const mx::array& lse,
                                                 const mx::array& dout, float scale, mx::StreamOrDevice s) {
  const char* who = "causal_attention_backward";
  check_qkv(who, q, k, v);
  if (out.shape() != q.shape() || dout.shape() != q.shape() || out.dtype() != mx::float32 ||
      dout.dtype() != mx::float32)
    throw std::invalid_argument(std::string(who) + ": out and dout must be float32 " + shape_str(q) + ", got " +
                                shape_str(out) + " and " + shape_str(dout));
  if (lse.shape() != mx::Shape{q.shape(0), q.shape(1), q.shape(2)} || lse.dtype() != mx::float32)
    throw std::invalid_argument(std::string(who) + ": lse must be float32 (N, H, L), got " + shape_str(lse));
  const mx::Stream stream = cpu_stream(s, who);
  return mx::array::make_arrays({q.shape(), k.shape(), v.shape()}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<CausalAttention>(stream, scale, true), {q, k, v, out, lse, dout});
}

void CausalAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  encoder.dispatch([ins = weak_copies(inputs), outs = weak_copies(outputs), scale = scale_,
                    backward = backward_]() mutable {
    const auto &q = ins[0], &k = ins[1];
    const Shape sh{q.shape(0), q.shape(1), k.shape(1), q.shape(2), q.shape(3)};
    std::vector<char> tq, tk, tv, to, tg, tl;
    const Heads Q = heads_of(q, tq), K = heads_of(k, tk), V = heads_of(ins[2], tv);
    ThreadPool& pool = ThreadPool::get();
    const int tasks = sh.N * sh.H_kv;
    if (!backward) {
      float* out = outs[0].data<float>();
      float* lse = outs[1].data<float>();
      pool.run(tasks, [&](int t) { forward_task(Q, K, V, sh, scale, t / sh.H_kv, t % sh.H_kv, out, lse); });
      return;
    }
    const Heads O = heads_of(ins[3], to), dO = heads_of(ins[5], tg);
    const float* lse = static_cast<const float*>(row_major(ins[4], tl));
    float *dq = outs[0].data<float>(), *dk = outs[1].data<float>(), *dv = outs[2].data<float>();
    pool.run(tasks, [&](int t) {
      backward_task(Q, K, V, O, lse, dO, sh, scale, t / sh.H_kv, t % sh.H_kv, dq, dk, dv);
    });
  });
}

void CausalAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string("tiny_llm_kernels.") +
                           (backward_ ? "causal_attention_backward" : "causal_attention") +
                           " is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
