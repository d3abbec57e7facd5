// WKV-7 backward, chunk-parallel column sums (KAGGLETRAIN_WKV_BWD=chunk, or =fused for the one-launch form at
// the end). Included by wkv7.cu after wkv7_kernels.cuh (it uses its I/O and decay helpers and its row
// recursion, bwd_rows_kernel / rows_body).
//
// Replaces bwd_cols_kernel (per-token N^2 column sums, ~5 of the 6 ms backward on an H200) with the chunked
// algebra of kaggletrain/ops/wkv_chunked.py as small dense products. bwd_rows_kernel first writes dsa and the
// dS checkpoint at EVERY chunk end (CPB = 1): E, the gradient reaching the chunk's last state from later tokens
// (not yet including that token's own dy r^T). One block per (head, chunk) then needs only S0 (the forward's
// checkpoint), E and the chunk's tokens: psi below, a sum over S_L (the next checkpoint), is formed from S0 and
// the block's E products instead of reading S_L (16 KB less traffic per chunk). With g_t = sum_{s<=t} log d_s (per key,
// inside the chunk) and G_t the full gradient of S_t:
//   dr_t = S_t^T dy_t      = e^{g_t}     [ S0^T dy_t  + sum_{s<=t} ((dy_t.sa_s) b_s + (dy_t.v_s) k_s) e^{-g_s} ]
//   da_t = S_{t-1}^T dsa_t = e^{g_{t-1}} [ S0^T dsa_t + sum_{s<t}  ((dsa_t.sa_s) b_s + (dsa_t.v_s) k_s) e^{-g_s} ]
//   dk_t = G_t^T v_t = e^{g_L - g_t} [ E^T v_t + sum_{s>=t} (v_t.dy_s) r_s e^{g_s - g_L}
//                                               + sum_{s>t} (v_t.dsa_s) a_s e^{g_{s-1} - g_L} ]
//   db_t = G_t^T sa_t: as dk_t with sa_t for v_t.
// Each exponential factor lies within e^{+-9.7} (L = 16, log d >= -0.6065) and each product of two is <= 1, so
// float32 keeps its relative precision. The decay gradient needs no per-token N^2 sum: with
// phi_t = sum_i G_t[i] S_t[i] (per key),
//   dlogd_t = phi_t - b_t db_t - k_t dk_t,   phi_{t-1} = dlogd_t + a_t da_t + r_{t-1} dr_{t-1},
//   phi_L = psi + r_L dr_L,  psi = sum_i E[i] S_L[i]
// (from S_t = S_{t-1} d_t + sa b^T + v k^T and G_{t-1} = G_t d_t + dsa a^T + dy r^T): a 16-step recursion per
// key from one N^2 product per chunk. Tokens past T are zero with log d = 0: identity steps.
//
// Per chunk: 4 [L,N]x[N,N] state products, 4 [L,N]x[N,L] token-pair products, 8 [L,L]x[L,N] products. Two
// bodies, one block of 128 threads either way:
//  - tensor cores (sm_80+ and the emulator, unless -DWKV7_CHUNK_TC=0): WMMA m16n16k8 TF32, each product as
//    three (hi*hi + hi*lo + lo*hi, the operands split into two TF32 parts), which keeps float32-level accuracy;
//    warp w owns output w (dr, da, dk, db) and accumulates its state product and both token-pair products in
//    one set of fragments;
//  - CUDA cores (sm_75, the T4, which has no TF32): warp w owns tokens 4w..4w+3 and lane the keys lane,
//    lane+32 of all four outputs, so the token-indexed operands are warp-uniform (broadcast) shared loads and
//    the key-indexed ones hit 32 different banks (rows padded to N + 4 floats).
#pragma once

#include <type_traits>

#ifndef WKV7_CHUNK_MINB
#define WKV7_CHUNK_MINB 4  // bwd_chunk_kernel blocks per SM the registers must allow (4: <= 128 registers)
#endif
#ifndef WKV7_CHUNK_TC
#define WKV7_CHUNK_TC 1  // 0: the CUDA-core body on every GPU (a tuning-sweep variant)
#endif
#if WKV7_CHUNK_TC && (defined(WKV7_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800))
#define WKV7_CHUNK_USE_TC 1
#else
#define WKV7_CHUNK_USE_TC 0
#endif

namespace wkv7 {
namespace detail {

constexpr int kChunkThreads = 128;

template <typename T>
struct ChunkIO {
  int T_len, H;
  const T *r, *k, *v, *a, *b, *dy;
  const void* w;
  bool w_f32;
  const float *ckpt, *sa, *dsa, *dsck;
  T *dr, *dk, *da, *db;
  void* dw;
};

// Where the block working on chunk c of head bh = b*H + h reads and writes.
struct ChunkPos {
  int nC, c, t0, Lc;
  long long bh, row0;  // row0: token t0's row of [B*T, H]
  __device__ __forceinline__ ChunkPos(int T_len, int H, long long bh_, int c_) {
    nC = (T_len + kChunk - 1) / kChunk;
    bh = bh_;
    c = c_;
    t0 = c * kChunk;
    Lc = min(kChunk, T_len - t0);
    row0 = ((bh / H) * T_len + t0) * H + bh % H;
  }
  __device__ __forceinline__ long long off(int tt, int H, int N) const { return (row0 + (long long)tt * H) * N; }
};

__device__ __forceinline__ float dot4(const float4& x, const float4& y, float acc) {
  return fmaf(x.w, y.w, fmaf(x.z, y.z, fmaf(x.y, y.y, fmaf(x.x, y.x, acc))));
}

// A float4 through L2 only (ld.global.cg): data another block of the same fused launch wrote.
__device__ __forceinline__ float4 ld_cg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

template <typename T>
__device__ __forceinline__ void store_w1(void* dw, bool w_f32, long long off, float x) {
  if (w_f32) static_cast<float*>(dw)[off] = x;
  else IO<T>::store1(static_cast<T*>(dw) + off, x);
}

// x[0..3][t][:] = dy, dsa, v, sa and g[t][:] = log d of the chunk's tokens (zero past T); rows of x padded to NP.
template <typename T, int N, int NP>
__device__ __forceinline__ void stage_tokens(const ChunkIO<T>& io, const ChunkPos& pos, float (*x)[kChunk][NP],
                                             float (*g)[N]) {
  constexpr int NG = N / 4;
  for (int idx = threadIdx.x; idx < kChunk * NG; idx += kChunkThreads) {
    const int tt = idx / NG, i = 4 * (idx % NG);
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    float4 gy = z, gs = z, vv = z, ss = z, ld = z;
    if (tt < pos.Lc) {
      const long long off = pos.off(tt, io.H, N) + i;
      gy = IO<T>::load4(io.dy + off);
      gs = ld_cg4(io.dsa + off);  // from the row recursion (another block, in the fused backward)
      vv = IO<T>::load4(io.v + off);
      ss = IO<float>::load4(io.sa + off);
      const float4 ww = cvt_w4<T>(load_w_raw4<T>(io.w, io.w_f32, off), io.w_f32);
      ld = make_float4(decay_log_of(ww.x), decay_log_of(ww.y), decay_log_of(ww.z), decay_log_of(ww.w));
    }
    sts4(&x[0][tt][i], gy); sts4(&x[1][tt][i], gs); sts4(&x[2][tt][i], vv); sts4(&x[3][tt][i], ss);
    sts4(&g[tt][i], ld);
  }
}

// The finished dr, da, dk, db of token t, key j: kept in x[0..3] (float32, for decay_grad) and stored for
// tokens before T.
template <typename T, int N, int NP>
__device__ __forceinline__ void put_outputs(const ChunkIO<T>& io, const ChunkPos& pos, float (*x)[kChunk][NP], int t,
                                            int j, float xr, float xa, float xk, float xb) {
  x[0][t][j] = xr; x[1][t][j] = xa; x[2][t][j] = xk; x[3][t][j] = xb;
  if (t < pos.Lc) {
    const long long off = pos.off(t, io.H, N) + j;
    IO<T>::store1(io.dr + off, xr); IO<T>::store1(io.da + off, xa);
    IO<T>::store1(io.dk + off, xk); IO<T>::store1(io.db + off, xb);
  }
}

// g[t][j] = sum_{s<=t} log d_s[j]: one key per thread of the first N.
template <int N>
__device__ __forceinline__ void prefix_log_decay(float (*g)[N]) {
  const int j = threadIdx.x;
  if (j < N) {
    float run = 0.f;
#pragma unroll
    for (int tt = 0; tt < kChunk; ++tt) { run += g[tt][j]; g[tt][j] = run; }
  }
}

// The decay gradient from the float32 outputs (out[0..3] = dr, da, dk, db of the chunk) and psi: the phi
// recursion above, one key per thread of the first N. The chunk's r, k, a, b, w are loaded up front (compile-
// time token indices keep them in registers), so the 16 dependent steps wait on no memory.
template <typename T, int N, int NP>
__device__ __forceinline__ void decay_grad(const ChunkIO<T>& io, const ChunkPos& pos, const float (*out)[kChunk][NP],
                                           const float* psi) {
  const int j = threadIdx.x;
  if (j >= N) return;
  const int H = io.H, Lc = pos.Lc;
  float rr[kChunk], kk[kChunk], aa[kChunk], bb[kChunk], fw[kChunk];
#pragma unroll
  for (int t = 0; t < kChunk; ++t) {
    rr[t] = kk[t] = aa[t] = bb[t] = fw[t] = 0.f;
    if (t < Lc) {
      const long long off = pos.off(t, H, N) + j;
      rr[t] = IO<T>::load1(io.r + off); kk[t] = IO<T>::load1(io.k + off);
      aa[t] = IO<T>::load1(io.a + off); bb[t] = IO<T>::load1(io.b + off);
      fw[t] = dlogd_dw(io.w_f32 ? static_cast<const float*>(io.w)[off] : IO<T>::load1(static_cast<const T*>(io.w) + off));
    }
  }
  float phi = psi[j];  // tokens past T are identity steps: phi passes through them unchanged
#pragma unroll
  for (int t = kChunk - 1; t >= 0; --t) {
    if (t < Lc) {
      if (t == Lc - 1) phi += rr[t] * out[0][t][j];  // phi of the last token: its own dy r^T term
      const float dl = phi - bb[t] * out[3][t][j] - kk[t] * out[2][t][j];
      store_w1<T>(io.dw, io.w_f32, pos.off(t, H, N) + j, dl * fw[t]);
      phi = dl + aa[t] * out[1][t][j] + (t > 0 ? rr[t - 1] * out[0][t - 1][j] : 0.f);
    }
  }
}

#if WKV7_CHUNK_USE_TC
// ---------------------------------------------------------------- tensor-core body (TF32 x3)
namespace wm = nvcuda::wmma;
using FragA = wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, wm::row_major>;
using FragAT = wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, wm::col_major>;
using FragBR = wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, wm::row_major>;
using FragBC = wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, wm::col_major>;
using FragC = wm::fragment<wm::accumulator, 16, 16, 8, float>;

// A float32 tile as two TF32 tiles, hi + lo (x - hi is exact in float32; lo keeps its top 11 bits).
template <typename Frag>
__device__ __forceinline__ void load_split(Frag& hi, Frag& lo, const float* p, unsigned ldm) {
  wm::load_matrix_sync(hi, p, ldm);
#pragma unroll
  for (int e = 0; e < hi.num_elements; ++e) {
    const float x = hi.x[e], h = wm::__float_to_tf32(x);
    hi.x[e] = h;
    lo.x[e] = wm::__float_to_tf32(x - h);
  }
}
// acc += A B from three TF32 products, small terms first (lo*lo, ~2^-22 relative, is left out).
template <typename FA, typename FB>
__device__ __forceinline__ void mma3(FragC& acc, const FA& ah, const FA& al, const FB& bh, const FB& bl) {
  wm::mma_sync(acc, al, bh, acc);
  wm::mma_sync(acc, ah, bl, acc);
  wm::mma_sync(acc, ah, bh, acc);
}

template <int N>
struct ChunkSmemTC {
  static constexpr int L = kChunk, NP = N + 4, KH = N / 2, KP = KH + 4;
  float x[4][L][NP];  // dy, dsa, v, sa; then the float32 dr, da, dk, db
  float g[L][N];      // cumulative log-decay inside the chunk
  float p[4][L][L];   // dy.sa, dy.v (then kept for s <= t), dsa.sa, dsa.v (s < t)
  union {
    float st[2][N][KP];  // values kh*KH .. +KH of S0^T and of E^T ([key][value])
    float y[4][L][N];    // b e^{-g}, k e^{-g}, r e^{g - g_L}, a e^{g_prev - g_L}
  } u;
  float psi[N];
};

// Stage values [kh*KH, kh*KH + KH) of S0^T and E^T and add that part of psi0 = sum_i E[i] S0[i] (into psi).
// psi = sum_i E[i] S_L[i] is formed from psi0 and the E products later, without reading S_L (16 KB per chunk):
// S_L = S0 e^{g_L} + sum_s (sa_s b_s^T + v_s k_s^T) e^{g_L - g_s}, so
// psi = e^{g_L} [psi0 + sum_s (b_s e^{-g_s} (E^T sa_s) + k_s e^{-g_s} (E^T v_s))].
template <int N>
__device__ __forceinline__ void stage_state_half(ChunkSmemTC<N>& sm, const float* S0T, const float* ET, int kh) {
  using S = ChunkSmemTC<N>;
  constexpr int QG = S::KH / 4;  // float4 groups per key row
  static_assert(QG == 8, "psi reduction: 8 lanes per key");
  for (int idx = threadIdx.x; idx < N * QG; idx += kChunkThreads) {  // uniform trip count (N*QG % 128 == 0)
    const int j = idx / QG, i = 4 * (idx % QG);
    const long long src = (long long)j * N + kh * S::KH + i;
    const float4 e = ld_cg4(ET + src), s0 = IO<float>::load4(S0T + src);
    sts4(&sm.u.st[0][j][i], s0);
    sts4(&sm.u.st[1][j][i], e);
    float part = dot4(e, s0, 0.f);
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    part += __shfl_xor_sync(0xffffffffu, part, 4);
    if (i == 0) sm.psi[j] = kh == 0 ? part : sm.psi[j] + part;
  }
}

// out[n] += X[:, kh*KH ..] ST[..]: the state product of warp w's output over one half of the values.
template <int N>
__device__ __forceinline__ void state_half(FragC (&out)[N / 16], const float (*X)[N + 4], const float (*ST)[N / 2 + 4],
                                           int kh) {
  using S = ChunkSmemTC<N>;
  FragA ah, al;
  FragBC bh, bl;
#pragma unroll
  for (int kk = 0; kk < S::KH; kk += 8) {
    load_split(ah, al, &X[0][kh * S::KH + kk], S::NP);
#pragma unroll
    for (int n = 0; n < N / 16; ++n) {
      load_split(bh, bl, &ST[16 * n][kk], S::KP);  // element (value k, key j) at ST[j][k]: column major
      mma3(out[n], ah, al, bh, bl);
    }
  }
}

// out[n] += P Y[:, col0 + 16n .. +15] over the chunk's 16 tokens (n < NT; Y row-major with ld LD), P as stored
// (PA = FragA) or transposed (PA = FragAT).
template <typename PA, int NT, int LD>
__device__ __forceinline__ void token_product(FragC* out, const float* P, const float* Y, int col0) {
  constexpr bool transposed = std::is_same<PA, FragAT>::value;
  PA ah, al;
  FragBR bh, bl;
#pragma unroll
  for (int kk = 0; kk < kChunk; kk += 8) {
    load_split(ah, al, transposed ? P + kk * kChunk : P + kk, kChunk);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      load_split(bh, bl, Y + kk * LD + col0 + 16 * n, LD);
      mma3(out[n], ah, al, bh, bl);
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void chunk_body(ChunkSmemTC<N>& sm, const ChunkIO<T>& io, long long bh, int c) {
  using S = ChunkSmemTC<N>;
  constexpr int L = kChunk, NP = S::NP;
  const int tid = threadIdx.x, wp = tid >> 5;
  const ChunkPos pos(io.T_len, io.H, bh, c);
  const long long NN = (long long)N * N;
  const float* S0T = io.ckpt + (pos.bh * (pos.nC + 1) + pos.c) * NN;
  const float* ET = io.dsck + (pos.bh * pos.nC + pos.c) * NN;

  stage_tokens<T, N, NP>(io, pos, sm.x, sm.g);
  stage_state_half<N>(sm, S0T, ET, 0);
  __syncthreads();
  prefix_log_decay<N>(sm.g);  // warps 0-1; read only after the next barrier

  {  // token pairs: warp w forms P_w = (dy | dsa) . (sa | v) over all values, as stored (masks come later)
    FragC acc;
    wm::fill_fragment(acc, 0.f);
    FragA ah, al;
    FragBC bh, bl;
    const float* A = &sm.x[wp < 2 ? 0 : 1][0][0];
    const float* B = &sm.x[(wp & 1) ? 2 : 3][0][0];
#pragma unroll
    for (int kk = 0; kk < N; kk += 8) {
      load_split(ah, al, A + kk, NP);
      load_split(bh, bl, B + kk, NP);  // element (value k, token s) at x[s][k]: column major
      mma3(acc, ah, al, bh, bl);
    }
    wm::store_matrix_sync(&sm.p[wp][0][0], acc, L, wm::mem_row_major);
  }
  // warp w: output w = (dy | dsa) S0 or (v | sa) E, values in two staged halves
  FragC out[N / 16];
#pragma unroll
  for (int n = 0; n < N / 16; ++n) wm::fill_fragment(out[n], 0.f);
  state_half<N>(out, sm.x[wp], sm.u.st[wp < 2 ? 0 : 1], 0);
  __syncthreads();
  stage_state_half<N>(sm, S0T, ET, 1);
  __syncthreads();
  state_half<N>(out, sm.x[wp], sm.u.st[wp < 2 ? 0 : 1], 1);
  __syncthreads();  // the states and the token operands are done with
  if (wp >= 2) {  // E^T v_s and E^T sa_s (the E products so far), for psi: into the slots v and sa just freed
#pragma unroll
    for (int n = 0; n < N / 16; ++n) wm::store_matrix_sync(&sm.x[wp][0][16 * n], out[n], NP, wm::mem_row_major);
  }

  // masks on the pair products; the scaled token operands
  for (int idx = tid; idx < 4 * L * L; idx += kChunkThreads) {
    const int m = idx / (L * L), t = (idx / L) % L, s = idx % L;
    if (m < 2 ? s > t : s >= t) sm.p[m][t][s] = 0.f;
  }
  for (int idx = tid; idx < L * N; idx += kChunkThreads) {
    const int tt = idx / N, j = idx % N;
    float bb = 0.f, kk = 0.f, rr = 0.f, aa = 0.f;
    if (tt < pos.Lc) {
      const long long off = pos.off(tt, io.H, N) + j;
      bb = IO<T>::load1(io.b + off); kk = IO<T>::load1(io.k + off); rr = IO<T>::load1(io.r + off); aa = IO<T>::load1(io.a + off);
    }
    const float g = sm.g[tt][j], gp = tt > 0 ? sm.g[tt - 1][j] : 0.f, gL = sm.g[L - 1][j];
    const float eng = expf(-g);
    sm.u.y[0][tt][j] = bb * eng;
    sm.u.y[1][tt][j] = kk * eng;
    sm.u.y[2][tt][j] = rr * expf(g - gL);
    sm.u.y[3][tt][j] = aa * expf(gp - gL);
  }
  __syncthreads();
  if (tid < N) {  // psi (see stage_state_half); x[2] and x[3] are rewritten after the next barrier
    const int j = tid;
    float acc = sm.psi[j];
#pragma unroll
    for (int s = 0; s < L; ++s) acc = fmaf(sm.u.y[0][s][j], sm.x[3][s][j], fmaf(sm.u.y[1][s][j], sm.x[2][s][j], acc));
    sm.psi[j] = acc * expf(sm.g[L - 1][j]);
  }
  __syncthreads();

  // warp 0: dr += P1 Y1 + P2 Y2; 1: da += P3 Y1 + P4 Y2; 2: dk += P2^T Y3 + P4^T Y4; 3: db += P1^T Y3 + P3^T Y4
  if (wp < 2) {
    token_product<FragA, N / 16, N>(out, &sm.p[2 * wp][0][0], &sm.u.y[0][0][0], 0);
    token_product<FragA, N / 16, N>(out, &sm.p[2 * wp + 1][0][0], &sm.u.y[1][0][0], 0);
  } else {
    token_product<FragAT, N / 16, N>(out, &sm.p[wp == 2 ? 1 : 0][0][0], &sm.u.y[2][0][0], 0);
    token_product<FragAT, N / 16, N>(out, &sm.p[wp == 2 ? 3 : 2][0][0], &sm.u.y[3][0][0], 0);
  }
#pragma unroll
  for (int n = 0; n < N / 16; ++n) wm::store_matrix_sync(&sm.x[wp][0][16 * n], out[n], NP, wm::mem_row_major);
  __syncthreads();

  // scale, store, keep the float32 values for the decay gradient
  for (int idx = tid; idx < L * N; idx += kChunkThreads) {
    const int t = idx / N, j = idx % N;
    const float g = sm.g[t][j], gp = t > 0 ? sm.g[t - 1][j] : 0.f, eb = expf(sm.g[L - 1][j] - g);
    put_outputs<T, N, NP>(io, pos, sm.x, t, j, sm.x[0][t][j] * expf(g), sm.x[1][t][j] * expf(gp), sm.x[2][t][j] * eb,
                          sm.x[3][t][j] * eb);
  }
  __syncthreads();
  decay_grad<T, N, NP>(io, pos, sm.x, sm.psi);
}

#else
// ---------------------------------------------------------------- CUDA-core body
template <int N>
struct ChunkSmemSIMT {
  static constexpr int L = kChunk, NP = N + 4;
  float x[4][L][NP];  // dy, dsa, v, sa; later the float32 dr, da, dk, db
  float g[L][N];      // cumulative log-decay inside the chunk
  float p[4][L][L];   // dy.sa, dy.v (s <= t), dsa.sa, dsa.v (s < t); zero elsewhere
  union {
    float st[N][NP];   // S0^T, then E^T ([key][value])
    float y[4][L][N];  // b e^{-g}, k e^{-g}, r e^{g}, a e^{g_prev}
  } u;
  float psi[N];
};

// acc[tt][jj] += sum_i X[4w + tt][i] ST[j_jj][i] (ST = a transposed state staged in shared memory).
template <int N>
__device__ __forceinline__ void state_product(float (&acc0)[4][2], float (&acc1)[4][2], const float (*X0)[N + 4],
                                              const float (*X1)[N + 4], const float (*ST)[N + 4], int w, int lane) {
#pragma unroll 4
  for (int i = 0; i < N; i += 4) {
    const float4 s0 = lds4(&ST[lane][i]), s1 = lds4(&ST[lane + 32][i]);
#pragma unroll
    for (int tt = 0; tt < 4; ++tt) {
      const float4 x0 = lds4(&X0[4 * w + tt][i]), x1 = lds4(&X1[4 * w + tt][i]);
      acc0[tt][0] = dot4(x0, s0, acc0[tt][0]);
      acc0[tt][1] = dot4(x0, s1, acc0[tt][1]);
      acc1[tt][0] = dot4(x1, s0, acc1[tt][0]);
      acc1[tt][1] = dot4(x1, s1, acc1[tt][1]);
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void chunk_body(ChunkSmemSIMT<N>& sm, const ChunkIO<T>& io, long long bh, int c) {
  using S = ChunkSmemSIMT<N>;
  constexpr int L = kChunk, NG = N / 4, NP = S::NP;
  static_assert(N == 64, "thread layout: 2 keys per lane, 4 tokens per warp");
  const int tid = threadIdx.x, wp = tid >> 5, lane = tid & 31;
  const ChunkPos pos(io.T_len, io.H, bh, c);
  const long long NN = (long long)N * N;
  const float* S0T = io.ckpt + (pos.bh * (pos.nC + 1) + pos.c) * NN;
  const float* ET = io.dsck + (pos.bh * pos.nC + pos.c) * NN;

  stage_tokens<T, N, NP>(io, pos, sm.x, sm.g);
  for (int idx = tid; idx < N * NG; idx += kChunkThreads) {
    const int j = idx / NG, i = 4 * (idx % NG);
    sts4(&sm.u.st[j][i], IO<float>::load4(S0T + (long long)j * N + i));
  }
  __syncthreads();
  prefix_log_decay<N>(sm.g);  // the other threads go on with the products below

  // ---- S0 products (dr, da) and the token-pair products
  float acc_r[4][2] = {}, acc_a[4][2] = {}, acc_k[4][2] = {}, acc_b[4][2] = {};
  state_product<N>(acc_r, acc_a, sm.x[0], sm.x[1], sm.u.st, wp, lane);
  {
    const int tp = tid >> 3, s0 = tid & 7;  // pairs (tp, s0) and (tp, s0 + 8)
    float pr[4][2] = {};
#pragma unroll 4
    for (int i = 0; i < N; i += 4) {
      const float4 gy = lds4(&sm.x[0][tp][i]), gs = lds4(&sm.x[1][tp][i]);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float4 vv = lds4(&sm.x[2][s0 + 8 * e][i]), ss = lds4(&sm.x[3][s0 + 8 * e][i]);
        pr[0][e] = dot4(gy, ss, pr[0][e]);
        pr[1][e] = dot4(gy, vv, pr[1][e]);
        pr[2][e] = dot4(gs, ss, pr[2][e]);
        pr[3][e] = dot4(gs, vv, pr[3][e]);
      }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int s = s0 + 8 * e;
      sm.p[0][tp][s] = s <= tp ? pr[0][e] : 0.f;
      sm.p[1][tp][s] = s <= tp ? pr[1][e] : 0.f;
      sm.p[2][tp][s] = s < tp ? pr[2][e] : 0.f;
      sm.p[3][tp][s] = s < tp ? pr[3][e] : 0.f;
    }
  }
  __syncthreads();  // done with S0^T

  // ---- E products (dk, db); E^T replaces S0^T, and psi0 = sum_i E[i] S0[i] is formed on the way (psi: see the
  //      tensor-core body's stage_state_half; the 16 float4 groups of a key are 16 neighbouring lanes)
  static_assert(NG == 16 && (N * NG) % kChunkThreads == 0, "psi0 reduction: 16 lanes per key, uniform trips");
  for (int idx = tid; idx < N * NG; idx += kChunkThreads) {
    const int j = idx / NG, i = 4 * (idx % NG);
    const float4 e = ld_cg4(ET + (long long)j * N + i);
    float part = dot4(e, lds4(&sm.u.st[j][i]), 0.f);
    sts4(&sm.u.st[j][i], e);
#pragma unroll
    for (int off = 1; off < NG; off <<= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
    if (i == 0) sm.psi[j] = part;
  }
  __syncthreads();
  state_product<N>(acc_k, acc_b, sm.x[2], sm.x[3], sm.u.st, wp, lane);
  __syncthreads();  // done with E^T

  // ---- the token-side operands, scaled: b e^{-g}, k e^{-g}, r e^{g}, a e^{g_prev}
  for (int idx = tid; idx < L * NG; idx += kChunkThreads) {
    const int tt = idx / NG, i = 4 * (idx % NG);
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    float4 bb = z, kk = z, rr = z, aa = z;
    if (tt < pos.Lc) {
      const long long off = pos.off(tt, io.H, N) + i;
      bb = IO<T>::load4(io.b + off); kk = IO<T>::load4(io.k + off); rr = IO<T>::load4(io.r + off); aa = IO<T>::load4(io.a + off);
    }
    float eg[4], ep[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      eg[e] = sm.g[tt][i + e];
      ep[e] = tt > 0 ? sm.g[tt - 1][i + e] : 0.f;
    }
    sts4(&sm.u.y[0][tt][i], make_float4(bb.x * expf(-eg[0]), bb.y * expf(-eg[1]), bb.z * expf(-eg[2]), bb.w * expf(-eg[3])));
    sts4(&sm.u.y[1][tt][i], make_float4(kk.x * expf(-eg[0]), kk.y * expf(-eg[1]), kk.z * expf(-eg[2]), kk.w * expf(-eg[3])));
    sts4(&sm.u.y[2][tt][i], make_float4(rr.x * expf(eg[0]), rr.y * expf(eg[1]), rr.z * expf(eg[2]), rr.w * expf(eg[3])));
    sts4(&sm.u.y[3][tt][i], make_float4(aa.x * expf(ep[0]), aa.y * expf(ep[1]), aa.z * expf(ep[2]), aa.w * expf(ep[3])));
  }
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    const float eL = expf(sm.g[L - 1][lane + 32 * jj]);
#pragma unroll
    for (int tt = 0; tt < 4; ++tt) { acc_k[tt][jj] *= eL; acc_b[tt][jj] *= eL; }
  }
  __syncthreads();
  // psi = e^{g_L} psi0 + sum_s (b_s e^{-g_s} (E^T sa_s) + k_s e^{-g_s} (E^T v_s)) e^{g_L} (the E products above are
  // already scaled by e^{g_L}): each warp's 4 tokens, then the 4 warps' parts (in sm.x, free since the E products)
  float (*part)[NP] = sm.x[0];
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    const int j = lane + 32 * jj;
    float acc = 0.f;
#pragma unroll
    for (int tt = 0; tt < 4; ++tt)
      acc = fmaf(sm.u.y[0][4 * wp + tt][j], acc_b[tt][jj], fmaf(sm.u.y[1][4 * wp + tt][j], acc_k[tt][jj], acc));
    part[wp][j] = acc;
  }
  __syncthreads();
  if (tid < N) sm.psi[tid] = fmaf(sm.psi[tid], expf(sm.g[L - 1][tid]), (part[0][tid] + part[1][tid]) + (part[2][tid] + part[3][tid]));
  __syncthreads();  // the parts are read before put_outputs rewrites sm.x

  // ---- products over the chunk's tokens s
#pragma unroll
  for (int s4 = 0; s4 < L; s4 += 4) {
    float4 pt[4][4];  // pt[m][tt] = p[m][4w + tt][s4 .. s4+3]
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) pt[m][tt] = lds4(&sm.p[m][4 * wp + tt][s4]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = s4 + e;
      float4 ps[4];  // ps[m] = p[m][s][4w .. 4w+3]: the transposed use
#pragma unroll
      for (int m = 0; m < 4; ++m) ps[m] = lds4(&sm.p[m][s][4 * wp]);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int j = lane + 32 * jj;
        const float yb = sm.u.y[0][s][j], yk = sm.u.y[1][s][j], yr = sm.u.y[2][s][j], ya = sm.u.y[3][s][j];
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
          acc_r[tt][jj] = fmaf(comp(pt[0][tt], e), yb, fmaf(comp(pt[1][tt], e), yk, acc_r[tt][jj]));
          acc_a[tt][jj] = fmaf(comp(pt[2][tt], e), yb, fmaf(comp(pt[3][tt], e), yk, acc_a[tt][jj]));
          acc_k[tt][jj] = fmaf(comp(ps[1], tt), yr, fmaf(comp(ps[3], tt), ya, acc_k[tt][jj]));
          acc_b[tt][jj] = fmaf(comp(ps[0], tt), yr, fmaf(comp(ps[2], tt), ya, acc_b[tt][jj]));
        }
      }
    }
  }

  // ---- scale, store, and keep float32 copies for the decay gradient (sm.x is free since the E products)
#pragma unroll
  for (int tt = 0; tt < 4; ++tt) {
    const int t = 4 * wp + tt;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int j = lane + 32 * jj;
      const float g = sm.g[t][j], gp = t > 0 ? sm.g[t - 1][j] : 0.f;
      const float eg = expf(g), eng = expf(-g);
      put_outputs<T, N, NP>(io, pos, sm.x, t, j, acc_r[tt][jj] * eg, acc_a[tt][jj] * expf(gp), acc_k[tt][jj] * eng,
                            acc_b[tt][jj] * eng);
    }
  }
  __syncthreads();
  decay_grad<T, N, NP>(io, pos, sm.x, sm.psi);
}
#endif

#if WKV7_CHUNK_USE_TC
template <int N> using ChunkSmem = ChunkSmemTC<N>;
#else
template <int N> using ChunkSmem = ChunkSmemSIMT<N>;
#endif

// block = (b*H + h) * nC + chunk.
template <typename T, int N>
__global__ void __launch_bounds__(kChunkThreads, WKV7_CHUNK_MINB) bwd_chunk_kernel(const ChunkIO<T> io) {
  __shared__ __align__(32) ChunkSmem<N> sm;
  const int nC = (io.T_len + kChunk - 1) / kChunk;
  chunk_body<T, N>(sm, io, blockIdx.x / nC, (int)(blockIdx.x % nC));
}

// ---------------------------------------------------------------- fused: row recursion and chunks at once
// KAGGLETRAIN_WKV_BWD=fused: one launch of B*H row-recursion blocks and B*H*nC chunk blocks, so the chunk
// work (parallel) runs while the row recursion (sequential over T, about as long) is still going, instead
// of after it. A block takes its logical id from an atomic counter, so ids follow the order in which blocks
// actually start: ids 0..B*H-1 are the row recursions, which wait for nothing; the rest are chunks, latest
// chunk first (the recursion runs backwards in T), each waiting for its flag. Every block that waits
// therefore waits on blocks already running: no deadlock, whatever the GPU's size or scheduling order.
// A wait is bounded (~4 s); one that runs out sets sync[1], after which every wait ends at once, so a bug
// shows up as wrong gradients in the tests, never as a hung GPU.
// sync: [0] id counter, [1] abort, [2 ..] one flag per (head, chunk); all zero at launch.
template <int N>
union FusedSmem {
  RowsSmem<N, N> rows;
  ChunkSmem<N> chunk;
};

__device__ __forceinline__ void wait_flag(int* flag, int* abort) {
#ifdef WKV7_EMU
  // The emulator runs blocks in id order: every row recursion has finished before any chunk block starts, so
  // an unset flag here is a flag the row recursion never set.
  if (atomicAdd(flag, 0) == 0) {
    std::fprintf(stderr, "emu: chunk flag not set by the row recursion\n");
    std::abort();
  }
#endif
  unsigned ns = 32;
  for (long long spins = 0; atomicAdd(flag, 0) == 0; ++spins) {
    if (atomicAdd(abort, 0) != 0) return;
    if (spins > (1LL << 22)) {
      atomicExch(abort, 1);
      return;
    }
    __nanosleep(ns);
    if (ns < 1024) ns *= 2;
  }
}

template <typename T, int N, int TPR>
__global__ void __launch_bounds__(kChunkThreads, WKV7_CHUNK_MINB)
bwd_fused_kernel(const ChunkIO<T> io, const float* __restrict__ dsT, T* __restrict__ dv, float* __restrict__ ds0,
                 float* __restrict__ dsa, float* __restrict__ dsck, int* __restrict__ sync) {
  static_assert((N / 2) * TPR == kChunkThreads, "the row recursion's block (2 rows per thread) is a chunk block");
  __shared__ __align__(32) FusedSmem<N> sm;
  __shared__ int s_id;
  if (threadIdx.x == 0) s_id = atomicAdd(sync, 1);
  __syncthreads();
  const long long id = s_id;
  const int nC = (io.T_len + kChunk - 1) / kChunk;
  const long long BH = (long long)gridDim.x / (nC + 1);
  if (id < BH) {
    RowsSmem<N, N>& rs = sm.rows;
    rows_body<T, N, TPR, 1, 2, 1>(rs.r, rs.d, rs.k, rs.a, rs.b, rs.dy, id, sync + 2, io.T_len, io.H, io.r, io.w,
                                  io.w_f32, io.k, io.a, io.b, io.dy, dsT, dsa, dv, dsck, ds0);
    return;
  }
  const long long item = id - BH;
  const long long bh = item % BH;
  const int c = nC - 1 - (int)(item / BH);
  if (threadIdx.x == 0) wait_flag(sync + 2 + bh * nC + c, sync + 1);
  __syncthreads();
  __threadfence();
  chunk_body<T, N>(sm.chunk, io, bh, c);
}

}  // namespace detail
}  // namespace wkv7
