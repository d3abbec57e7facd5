// WKV-7 forward in chunks on tensor cores (KAGGLETRAIN_WKV_FWD=chunk; sm_80+ builds and the emulator). Included
// by wkv7.cu after wkv7_chunk.cuh, whose TF32 x3 helpers (load_split, mma3) it uses.
//
// fwd_kernel (the default) spends ~425 ns per token on an H200 in a chain of dependent steps (a dot, shuffles,
// the update, a dot, shuffles). Here one block per head walks the chunks of kChunk = 16 tokens and does each as
// a few small dense products (the algebra of kaggletrain/ops/wkv_chunked.py), so the dependent chain is per
// chunk instead of per token. With g_t = sum_{s<=t} log d_s (per key, inside the chunk), ST = S0^T ([key][value],
// the checkpoint layout):
//   A^ = a e^{g_{t-1}},  R^ = r e^{g_t},  B~ = b e^{-g_s},  K~ = k e^{-g_s}           (token x key)
//   M_b = A^ B~^T, M_k = A^ K~^T  (s < t);   P_b = R^ B~^T, P_k = R^ K~^T  (s <= t)  (token x token)
//   SA = A^ ST + M_k V + M_b SA     (lower triangular: solved by substitution over the 16 tokens)
//   Y  = R^ ST + P_k V + P_b SA
//   ST' = diag(e^{g_L}) ST + B_^T SA + K_^T V,   B_ = b e^{g_L - g_s}, K_ likewise.
// Every factor lies within e^{+-9.7} (log d >= -0.6065, 16 tokens) and each product of two is <= 1, so float32
// keeps its relative precision; products run as three TF32 products (hi*hi + hi*lo + lo*hi), float32-level.
// The state is never accumulated inside a tensor-core accumulator: the update is formed from zero and added
// to the (already decayed) state with a float32 add, as the sequential kernel does, so the state's rounding
// does not depend on how an accumulator adds. Tokens past T are zero with log d = 0: identity steps.
//
// Outputs as fwd_kernel: y, the final state, and for training the transposed state at every chunk start (plus
// the final one) and sa per token (float32) for the backward; the values differ from fwd_kernel's by rounding.
// Phases per chunk (4 warps; warp w owns the 16-wide tile w of values, or of keys for the state update):
//   stage (inputs prefetched into registers during the previous chunk) | prefix g | scaled operands |
//   pair products (warp w: one of M_b, M_k, P_b, P_k) | SA's and Y's state products (Y stays in registers) |
//   substitution (warps 0-1) while warps 2-3 decay ST and B~, K~ into B_, K_ | Y's last product; state
//   update; checkpoint | y store.
#pragma once

namespace wkv7 {
namespace detail {

constexpr int kFwdChunkThreads = 128;

template <int N>
struct FwdChunkSmem {
  static constexpr int L = kChunk, NP = N + 4;
  enum Slot { kR = 0, kK, kV, kA, kB, kX };
  // r -> R^ -> y; k -> K~ -> K_; v; a -> A^; b -> B~ -> B_; log d -> g -> (A^ ST + M_k V) -> SA
  float x[6][L][NP];
  float st[N][NP];   // the state, transposed: [key j][value i]
  float p[4][L][L];  // M_b, M_k, P_b, P_k (masked)
  float el[N];       // e^{g_L}
};

#if WKV7_CHUNK_USE_TC
template <typename T, int N>
__device__ __forceinline__ void fwd_chunk_body(const int T_len, const int H, const T* __restrict__ r,
                                               const void* __restrict__ w, const bool w_f32, const T* __restrict__ k,
                                               const T* __restrict__ v, const T* __restrict__ a,
                                               const T* __restrict__ b, const float* __restrict__ s0,
                                               T* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt,
                                               float* __restrict__ sa_out) {
  using S = FwdChunkSmem<N>;
  constexpr int L = kChunk, NP = S::NP, NG = N / 4, NT = kFwdChunkThreads;
  constexpr int PF = L * NG / NT;  // float4 groups per input per thread in a chunk load
  static_assert(N == 64 && PF * NT == L * NG, "4 warps of 16-wide tiles over N = 64");
  using Raw = typename IO<T>::raw4;
  __shared__ __align__(32) S sm;

  const int tid = threadIdx.x, wp = tid >> 5, lane = tid & 31;
  const long long bh = blockIdx.x;
  const int h = (int)(bh % H);
  const long long bidx = bh / H;
  const long long NN = (long long)N * N;
  const int nC = (T_len + L - 1) / L;
  float* ck = ckpt ? ckpt + bh * (nC + 1) * NN : nullptr;
  auto tok_off = [&](int t) { return ((bidx * T_len + t) * H + h) * N; };

  // the initial state, transposed into st; checkpoint 0
  for (int idx = tid; idx < N * NG; idx += NT) {
    const int i = idx / NG, j = 4 * (idx % NG);
    const float4 x = s0 ? IO<float>::load4(s0 + bh * NN + (long long)i * N + j) : make_float4(0.f, 0.f, 0.f, 0.f);
    sm.st[j][i] = x.x; sm.st[j + 1][i] = x.y; sm.st[j + 2][i] = x.z; sm.st[j + 3][i] = x.w;
  }
  __syncthreads();
  if (ck)
    for (int idx = tid; idx < N * NG; idx += NT) {
      const int j = idx / NG, i = 4 * (idx % NG);
      IO<float>::store4(ck + (long long)j * N + i, lds4(&sm.st[j][i]));
    }

  Raw pr[PF], pk[PF], pv[PF], pa[PF], pb[PF];
  uint4 pw[PF];
  auto fetch = [&](int c) {
    const int t0 = c * L, Lc = min(L, T_len - t0);
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT, tt = idx / NG, g = idx % NG;
      const long long off = tok_off(t0 + min(tt, Lc - 1)) + 4 * g;  // rows past T: reread, zeroed when staged
      pr[u] = IO<T>::load_raw4(r + off);
      pk[u] = IO<T>::load_raw4(k + off);
      pv[u] = IO<T>::load_raw4(v + off);
      pa[u] = IO<T>::load_raw4(a + off);
      pb[u] = IO<T>::load_raw4(b + off);
      pw[u] = load_w_raw4<T>(w, w_f32, off);
    }
  };
  if (nC > 0) fetch(0);

  for (int c = 0; c < nC; ++c) {
    const int t0 = c * L, Lc = min(L, T_len - t0);
    __syncthreads();  // the previous chunk is done with the token slots

    // ---- stage (float32), log d into slot X; then the next chunk's loads go out
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT, tt = idx / NG, j = 4 * (idx % NG);
      const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
      const bool live = tt < Lc;
      sts4(&sm.x[S::kR][tt][j], live ? IO<T>::cvt4(pr[u]) : z);
      sts4(&sm.x[S::kK][tt][j], live ? IO<T>::cvt4(pk[u]) : z);
      sts4(&sm.x[S::kV][tt][j], live ? IO<T>::cvt4(pv[u]) : z);
      sts4(&sm.x[S::kA][tt][j], live ? IO<T>::cvt4(pa[u]) : z);
      sts4(&sm.x[S::kB][tt][j], live ? IO<T>::cvt4(pb[u]) : z);
      const float4 ww = cvt_w4<T>(pw[u], w_f32);
      sts4(&sm.x[S::kX][tt][j], live ? make_float4(decay_log_of(ww.x), decay_log_of(ww.y), decay_log_of(ww.z),
                                                   decay_log_of(ww.w))
                                     : z);
    }
    if (c + 1 < nC) fetch(c + 1);  // lands while this chunk computes
    __syncthreads();

    // ---- g = prefix sum of log d over the chunk (one key per thread)
    if (tid < N) {
      float run = 0.f;
#pragma unroll
      for (int tt = 0; tt < L; ++tt) { run += sm.x[S::kX][tt][tid]; sm.x[S::kX][tt][tid] = run; }
    }
    __syncthreads();

    // ---- scaled operands, in place
    for (int idx = tid; idx < L * N; idx += NT) {
      const int tt = idx / N, j = idx % N;
      const float g = sm.x[S::kX][tt][j], gp = tt > 0 ? sm.x[S::kX][tt - 1][j] : 0.f;
      const float eng = expf(-g);
      sm.x[S::kA][tt][j] *= expf(gp);
      sm.x[S::kR][tt][j] *= expf(g);
      sm.x[S::kB][tt][j] *= eng;
      sm.x[S::kK][tt][j] *= eng;
      if (tt == L - 1) sm.el[j] = expf(g);
    }
    __syncthreads();

    // ---- pair products: warp 0 M_b = A^ B~^T, 1 M_k = A^ K~^T, 2 P_b = R^ B~^T, 3 P_k = R^ K~^T
    {
      FragC acc;
      wm::fill_fragment(acc, 0.f);
      FragA ah, al;
      FragBC bh, bl;
      const float* A = &sm.x[wp < 2 ? S::kA : S::kR][0][0];
      const float* B = &sm.x[(wp & 1) ? S::kK : S::kB][0][0];
#pragma unroll
      for (int kk = 0; kk < N; kk += 8) {
        load_split(ah, al, A + kk, NP);
        load_split(bh, bl, B + kk, NP);  // element (key, token s) at x[s][key]: column major
        mma3(acc, ah, al, bh, bl);
      }
      wm::store_matrix_sync(&sm.p[wp][0][0], acc, L, wm::mem_row_major);
      __syncwarp();
      for (int e = lane; e < L * L; e += 32) {
        const int t = e / L, s = e % L;
        if (wp < 2 ? s >= t : s > t) sm.p[wp][t][s] = 0.f;
      }
    }
    __syncthreads();

    // ---- warp w, values 16w..16w+15: U = A^ ST + M_k V (to slot X) and Y = R^ ST + P_k V (kept)
    FragC acc_y;
    {
      FragC acc_u;
      wm::fill_fragment(acc_u, 0.f);
      wm::fill_fragment(acc_y, 0.f);
      FragA ah, al, rh, rl;
      FragBR bh, bl;
#pragma unroll
      for (int kk = 0; kk < N; kk += 8) {
        load_split(ah, al, &sm.x[S::kA][0][kk], NP);
        load_split(rh, rl, &sm.x[S::kR][0][kk], NP);
        load_split(bh, bl, &sm.st[kk][16 * wp], NP);
        mma3(acc_u, ah, al, bh, bl);
        mma3(acc_y, rh, rl, bh, bl);
      }
#pragma unroll
      for (int kk = 0; kk < L; kk += 8) {
        load_split(ah, al, &sm.p[1][0][kk], L);
        load_split(rh, rl, &sm.p[3][0][kk], L);
        load_split(bh, bl, &sm.x[S::kV][kk][16 * wp], NP);
        mma3(acc_u, ah, al, bh, bl);
        mma3(acc_y, rh, rl, bh, bl);
      }
      wm::store_matrix_sync(&sm.x[S::kX][0][16 * wp], acc_u, NP, wm::mem_row_major);  // g is no longer read
    }
    __syncthreads();

    if (tid < N) {
      // ---- SA = U + M_b SA: substitution down the tokens, one value per thread
      const int i = tid;
      float sa[L];
#pragma unroll
      for (int t = 0; t < L; ++t) {
        float acc = sm.x[S::kX][t][i];
#pragma unroll
        for (int s = 0; s < t; ++s) acc = fmaf(sm.p[0][t][s], sa[s], acc);
        sa[t] = acc;
        sm.x[S::kX][t][i] = acc;
        if (sa_out && t < Lc) sa_out[tok_off(t0 + t) + i] = acc;
      }
    } else {
      // ---- meanwhile: decay the state (rows = keys) and turn B~, K~ into B_, K_
      for (int idx = tid - N; idx < N * NG; idx += NT - N) {
        const int j = idx / NG, i = 4 * (idx % NG);
        const float e = sm.el[j];
        const float4 x = lds4(&sm.st[j][i]);
        sts4(&sm.st[j][i], make_float4(x.x * e, x.y * e, x.z * e, x.w * e));
      }
      for (int idx = tid - N; idx < L * NG; idx += NT - N) {
        const int tt = idx / NG, j = 4 * (idx % NG);
        const float4 e = lds4(&sm.el[j]), xb = lds4(&sm.x[S::kB][tt][j]), xk = lds4(&sm.x[S::kK][tt][j]);
        sts4(&sm.x[S::kB][tt][j], make_float4(xb.x * e.x, xb.y * e.y, xb.z * e.z, xb.w * e.w));
        sts4(&sm.x[S::kK][tt][j], make_float4(xk.x * e.x, xk.y * e.y, xk.z * e.z, xk.w * e.w));
      }
    }
    __syncthreads();

    {
      // ---- Y += P_b SA, into slot R (R^ is no longer read)
      FragA ah, al;
      FragBR bh, bl;
#pragma unroll
      for (int kk = 0; kk < L; kk += 8) {
        load_split(ah, al, &sm.p[2][0][kk], L);
        load_split(bh, bl, &sm.x[S::kX][kk][16 * wp], NP);
        mma3(acc_y, ah, al, bh, bl);
      }
      wm::store_matrix_sync(&sm.x[S::kR][0][16 * wp], acc_y, NP, wm::mem_row_major);

      // ---- keys 16w..16w+15: ST += B_^T SA + K_^T V (the update formed from zero, then one float32 add)
      FragC upd[N / 16];
#pragma unroll
      for (int n = 0; n < N / 16; ++n) wm::fill_fragment(upd[n], 0.f);
      FragAT th, tl;
#pragma unroll
      for (int kk = 0; kk < L; kk += 8) {
        load_split(th, tl, &sm.x[S::kB][kk][16 * wp], NP);  // element (key, token) at x[token][key]
#pragma unroll
        for (int n = 0; n < N / 16; ++n) {
          load_split(bh, bl, &sm.x[S::kX][kk][16 * n], NP);
          mma3(upd[n], th, tl, bh, bl);
        }
        load_split(th, tl, &sm.x[S::kK][kk][16 * wp], NP);
#pragma unroll
        for (int n = 0; n < N / 16; ++n) {
          load_split(bh, bl, &sm.x[S::kV][kk][16 * n], NP);
          mma3(upd[n], th, tl, bh, bl);
        }
      }
#pragma unroll
      for (int n = 0; n < N / 16; ++n) {
        FragC old;
        wm::load_matrix_sync(old, &sm.st[16 * wp][16 * n], NP, wm::mem_row_major);
#pragma unroll
        for (int e = 0; e < old.num_elements; ++e) upd[n].x[e] += old.x[e];
      }
      __syncwarp();  // every lane has read its rows of st
#pragma unroll
      for (int n = 0; n < N / 16; ++n) wm::store_matrix_sync(&sm.st[16 * wp][16 * n], upd[n], NP, wm::mem_row_major);
      __syncwarp();
      if (ck)  // the state after this chunk: the next one's checkpoint (or the final one)
        for (int e = lane; e < 16 * NG; e += 32) {
          const int j = 16 * wp + e / NG, i = 4 * (e % NG);
          IO<float>::store4(ck + (c + 1) * NN + (long long)j * N + i, lds4(&sm.st[j][i]));
        }
    }
    __syncthreads();

    // ---- y
    for (int idx = tid; idx < L * NG; idx += NT) {
      const int tt = idx / NG, i = 4 * (idx % NG);
      if (tt < Lc) IO<T>::store4(y + tok_off(t0 + tt) + i, lds4(&sm.x[S::kR][tt][i]));
    }
  }
  __syncthreads();
  for (int idx = tid; idx < N * N; idx += NT) {  // the final state, [value][key]
    const int i = idx / N, j = idx % N;
    sT[bh * NN + idx] = sm.st[j][i];
  }
}
#endif

// One block per (batch, head).
template <typename T, int N>
__global__ void __launch_bounds__(kFwdChunkThreads)
fwd_chunk_kernel(const int T_len, const int H, const T* __restrict__ r, const void* __restrict__ w, const bool w_f32,
                 const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b,
                 const float* __restrict__ s0, T* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt,
                 float* __restrict__ sa_out) {
#if WKV7_CHUNK_USE_TC
  fwd_chunk_body<T, N>(T_len, H, r, w, w_f32, k, v, a, b, s0, y, sT, ckpt, sa_out);
#endif
}

}  // namespace detail
}  // namespace wkv7
