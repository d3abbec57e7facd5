// WKV-7 forward and backward kernels (templates). Included by wkv7.cu; also compiled on the CPU through
// cuda_emu.h by the tests.
//
// Per head, S is N x N in float32 ([value i, key j]); per token t:
//   sa_i = sum_j S[i][j] a_j ;  S[i][j] = S[i][j] d_j + sa_i b_j + v_i k_j ;  y_i = sum_j S[i][j] r_j.
// Rows of S evolve independently; the gradients of r, w, k, a, b are sums over rows (columns of S).
//
// Cost model that shaped the tiling (NVIDIA's description for sm_70/75, consistent with the H200 timings of a
// first version that read one shared float per FMA and ran ~4x over its issue estimate): shared memory returns
// one 32-bit register per lane per cycle per SM (an LDS.128 costs 4 cycles, 2 when lanes n and n^1 read the
// same address), against 4 warp-FMAs per cycle. So every value a thread loads from shared memory must feed several
// FMAs: threads hold small register TILES of S (several rows x a slice of keys) and the lanes that share a
// key slice sit at lane distance PW (the slice index is in the high lane bits), which makes the broadcast
// loads pair-uniform. Sums over a slice are TPR-lane butterfly shuffles (xor PW, 2PW, ...).
//
// Row split (KAGGLETRAIN_WKV_SPLIT=1|2|4|auto, default 1; wkv7.cu): the kernels that are sequential over T
// (the forward and bwd_rows_kernel) give each head RS blocks of N/RS value rows. With one block per head, the
// 0.1B model (B*H = 96) left 36 of an H200's 132 SMs idle and ran 4 warps on the others, each block at the
// latency of its per-token chain; rows are independent, so RS blocks of N/RS rows run the identical per-row
// arithmetic (bitwise equal results, same checkpoint layouts) and fill the GPU. Each block stages all N keys
// of the key-indexed inputs but only its own rows of v / dy. RS > 1 uses one row per thread (128 threads at
// RS=2, 64 at RS=4), so the chunk prefetch stays at 2-4 float4 per input and nothing spills.
// Measured on an H200 (bf16, B=8, T=4096, fwd / fwd+bwd with the new backward, ms): H=12: RS=1 1.36 / 4.19,
// RS=2 1.71 / 4.89, RS=4 1.56 / 4.71; H=32: RS=1 1.90 / 8.18, RS=2 2.49 / 9.28, RS=4 2.67 / 9.72. Slower: a
// block's time is T times its per-token dependency chain (dot, shuffles, update, dot, shuffles), which a
// row split does not shorten, while the extra blocks repeat the staging and shared loads. So the default is
// RS=1 (kSplitDefault); the split stays selectable for other GPUs / shapes. RS=1 keeps the v / dy loads and
// stores inside the key arrays' loop: the same PTX as before the split existed (a separate loop there made
// the forward 14% slower).
//
// Forward: RS blocks per head; thread (p, q) holds rows R*p .. R*p+R-1 of its block, keys of slice q. Inputs
// of kCkptLen tokens are staged in shared memory as float32 (decay computed once per element) while the next
// chunk's are already being fetched into registers. For training it saves S every kCkptLen tokens, TRANSPOSED
// ([key][value], so the backward's column-form loads are float4), and sa per token.
//
// Backward: one block per head, per chunk of kCkptLen tokens (walked in reverse):
//  phase A (row form): thread holds dS rows 2p, 2p+1 (keys of slice q); runs the dS row recursion through the
//    chunk: dS' = dS + dy r^T ; dsa = dS' b ; dv = dS' k ; dS = dS' diag(d) + dsa a^T. It needs no S at all;
//    dsa of every token goes to shared memory, dv straight to global.
//  phase B (column form): thread holds columns 2p, 2p+1 (rows of slice q) of S and dS; with every dsa known,
//    the chunk runs with no barrier: dr = S_t^T dy, dk = dS'^T v, db = dS'^T sa, dw ~ sum_i dS'[i] S_{t-1}[i],
//    da = S_{t-1}^T dsa. S_{t-1}: the chunk is first recomputed forward from its checkpoint (column form with
//    the saved sa: no sums needed) keeping the state every SUB tokens in a per-thread scratch slice; inside a
//    SUB-token piece S steps back by division by the decay (at most SUB-1 divisions from an exact state,
//    d >= 0.545: rounding grows < 1.83^3; 15 divisions, as in the official kernel, cost ~5e-6 relative).
//
// Backward "new" (the default; KAGGLETRAIN_WKV_BWD=old selects the one-kernel form above; on an H200, bf16,
// B=8 T=4096 H=32: 7.71 vs 9.91 ms fwd+bwd): the same two phases in two kernels, because only phase A is
// sequential over T.
// bwd_rows_kernel (RS blocks per head) runs phase A over all chunks with the next chunk's inputs prefetched,
// writing dsa (float32) and every CPB chunks the dS rows (transposed: a "dS checkpoint"). bwd_cols_kernel has
// one block per (head, segment of CPB chunks): from the saved state and the dS checkpoint at the segment end
// it runs the recompute + phase B above, so B*H*T/(16 CPB)
// blocks share the SMs (12 warps per SM at <= 168 registers instead of 8) and phase B no longer waits on
// the latency-bound phase A. Sub-chunk states (SUB = 8 there: 8 instead of 12 recompute steps per chunk, at
// most 7 backsteps: <= 1.7e-6 relative even with every decay at its minimum, 3e-7 typical) sit in a
// per-thread local array and are loaded just before the exact step, so they are not live in the hot loop.
//
// Backward "chunk" (KAGGLETRAIN_WKV_BWD=chunk): bwd_rows_kernel with a dS checkpoint at every chunk end, then
// wkv7_chunk.cuh's bwd_chunk_kernel in place of bwd_cols_kernel (the column sums as dense products per chunk);
// "fused": both in one launch (wkv7_chunk.cuh's bwd_fused_kernel, which runs rows_body for the recursion).
//
// Forward "chunk" (KAGGLETRAIN_WKV_FWD=chunk, sm_80+): wkv7_scan.cuh's fwd_chunk_kernel in place of fwd_kernel,
// the same outputs (checkpoints, sa) from dense products per 16-token chunk. Backward "scan" (sm_80+): "chunk"
// with wkv7_scan.cuh's bwd_scan_kernel, the same chunked algebra run backwards, in place of bwd_rows_kernel.
#pragma once

#ifndef WKV7_COLS_MINB
#define WKV7_COLS_MINB 3  // bwd_cols_kernel blocks per SM the registers must allow (3: <= 168 registers)
#endif

namespace wkv7 {
namespace detail {

constexpr int kChunk = 16;  // == kCkptLen in wkv7_api.h (checked in wkv7.cu)
constexpr float kDecayScale = 0.60653065971263342f;  // exp(-0.5)

// ---------------------------------------------------------------- vector access
// *(V*)p for a vector type V (float4, float2, uint2, uint4, unsigned): the GPU faults ("misaligned address")
// unless p is aligned to sizeof(V). The emulator does not fault, so there each access checks its alignment.
template <typename V, typename P>
__device__ __forceinline__ V& vec_at(P* p) {
#ifdef WKV7_EMU
  emu::check_aligned(p, alignof(V), "vector access");
#endif
  return *reinterpret_cast<V*>(p);
}
template <typename V, typename P>
__device__ __forceinline__ const V& vec_at(const P* p) {
#ifdef WKV7_EMU
  emu::check_aligned(p, alignof(V), "vector access");
#endif
  return *reinterpret_cast<const V*>(p);
}

// ---------------------------------------------------------------- element I/O (float32 inside)
template <typename T> struct IO;

template <> struct IO<float> {
  using raw4 = float4;  // 4 elements as stored
  static __device__ __forceinline__ raw4 load_raw4(const float* p) { return vec_at<float4>(p); }
  static __device__ __forceinline__ float4 cvt4(raw4 x) { return x; }
  static __device__ __forceinline__ float4 load4(const float* p) { return load_raw4(p); }
  static __device__ __forceinline__ void store4(float* p, float4 x) { vec_at<float4>(p) = x; }
  static __device__ __forceinline__ float2 load2(const float* p) { return vec_at<float2>(p); }
  static __device__ __forceinline__ void store2(float* p, float a, float b) {
    vec_at<float2>(p) = make_float2(a, b);
  }
  static __device__ __forceinline__ void store1(float* p, float x) { *p = x; }
  static __device__ __forceinline__ float load1(const float* p) { return *p; }
};

// 2-byte types: element 0 is the low half of the first 32-bit word (little endian).
template <typename T, typename Bits> struct IO16 {
  using raw4 = uint2;
  static __device__ __forceinline__ raw4 load_raw4(const T* p) { return vec_at<uint2>(p); }
  static __device__ __forceinline__ float4 cvt4(raw4 u) {
    return make_float4(Bits::to_f(u.x & 0xffffu), Bits::to_f(u.x >> 16), Bits::to_f(u.y & 0xffffu),
                       Bits::to_f(u.y >> 16));
  }
  static __device__ __forceinline__ float4 load4(const T* p) { return cvt4(load_raw4(p)); }
  static __device__ __forceinline__ void store4(T* p, float4 x) {
    uint2 u;
    u.x = (unsigned)Bits::from_f(x.x) | ((unsigned)Bits::from_f(x.y) << 16);
    u.y = (unsigned)Bits::from_f(x.z) | ((unsigned)Bits::from_f(x.w) << 16);
    vec_at<uint2>(p) = u;
  }
  static __device__ __forceinline__ float2 load2(const T* p) {
    const unsigned u = vec_at<unsigned>(p);
    return make_float2(Bits::to_f(u & 0xffffu), Bits::to_f(u >> 16));
  }
  static __device__ __forceinline__ void store2(T* p, float a, float b) {
    vec_at<unsigned>(p) = (unsigned)Bits::from_f(a) | ((unsigned)Bits::from_f(b) << 16);
  }
  static __device__ __forceinline__ void store1(T* p, float x) {
    vec_at<unsigned short>(p) = Bits::from_f(x);
  }
  static __device__ __forceinline__ float load1(const T* p) {
    return Bits::to_f(vec_at<unsigned short>(p));
  }
};

struct HalfBits {
  static __device__ __forceinline__ float to_f(unsigned u) { return __half2float(__ushort_as_half((unsigned short)u)); }
  static __device__ __forceinline__ unsigned short from_f(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <> struct IO<__half> : IO16<__half, HalfBits> {};

#if WKV7_WITH_BF16
struct BF16Bits {
  static __device__ __forceinline__ float to_f(unsigned u) { return __uint_as_float(u << 16); }  // exact
  static __device__ __forceinline__ unsigned short from_f(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};
template <> struct IO<__nv_bfloat16> : IO16<__nv_bfloat16, BF16Bits> {};
#endif

// w may be float32 while the other tensors are half precision (a run-time, block-uniform choice). Its raw
// bits travel in a uint4 so a prefetch does not have to wait for the load to convert it.
template <typename T>
__device__ __forceinline__ uint4 load_w_raw4(const void* w, bool w_f32, long long off) {
  if (sizeof(T) == 4 || w_f32) return vec_at<uint4>(static_cast<const float*>(w) + off);
  const uint2 u = vec_at<uint2>(static_cast<const T*>(w) + off);
  return make_uint4(u.x, u.y, 0u, 0u);
}
template <typename T>
__device__ __forceinline__ float4 cvt_w4(uint4 u, bool w_f32) {
  const float4 f = make_float4(__uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z), __uint_as_float(u.w));
  if constexpr (sizeof(T) == 4) {
    return f;
  } else {
    return w_f32 ? f : IO<T>::cvt4(make_uint2(u.x, u.y));
  }
}
template <typename T>
__device__ __forceinline__ void store_w2(void* dw, bool w_f32, long long off, float a, float b) {
  if (w_f32) IO<float>::store2(static_cast<float*>(dw) + off, a, b);
  else IO<T>::store2(static_cast<T*>(dw) + off, a, b);
}

// ---------------------------------------------------------------- math shared by both kernels
// decay d = exp(-e^-0.5 sigmoid(w)) and f = dd/dw = -e^-0.5 d sigmoid(w) (1 - sigmoid(w)), in float32,
// with both sigmoids computed without cancellation or overflow. Accurate expf on purpose: an error in d
// compounds over the tokens a slow channel remembers.
__device__ __forceinline__ void decay_of(float w, float& d, float& f) {
  const float e = expf(-fabsf(w));  // (0, 1]
  const float p = 1.f / (1.f + e);  // sigmoid(|w|)
  const float m = e * p;            // sigmoid(-|w|)
  const float sig = w >= 0.f ? p : m;
  const float oms = w >= 0.f ? m : p;
  d = expf(-kDecayScale * sig);
  f = -kDecayScale * d * sig * oms;
}
// log d = -e^-0.5 sigmoid(w) and its derivative d(log d)/dw = -e^-0.5 sigmoid(w) (1 - sigmoid(w)).
__device__ __forceinline__ float sigmoid_of(float w) {
  const float e = expf(-fabsf(w));
  const float p = 1.f / (1.f + e);
  return w >= 0.f ? p : e * p;
}
__device__ __forceinline__ float decay_log_of(float w) { return -kDecayScale * sigmoid_of(w); }
__device__ __forceinline__ float dlogd_dw(float w) {
  const float sig = sigmoid_of(w), oms = sigmoid_of(-w);
  return -kDecayScale * sig * oms;
}
__device__ __forceinline__ float4 decay4(float4 w) {
  float4 d;
  float f;
  decay_of(w.x, d.x, f); decay_of(w.y, d.y, f); decay_of(w.z, d.z, f); decay_of(w.w, d.w, f);
  return d;
}

// One state element update. The backward recomputes states with this same function and operand order,
// so its recomputed states equal the forward's bit for bit.
__device__ __forceinline__ float state_step(float s, float d, float sa, float b, float v, float k) {
  return fmaf(v, k, fmaf(sa, b, s * d));
}

// Sum over the TPR lanes of a group (lane distance PW); every lane gets the same (bitwise) value.
template <int TPR, int PW>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = PW; off < PW * TPR; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float4 lds4(const float* p) { return vec_at<float4>(p); }
__device__ __forceinline__ float2 lds2(const float* p) { return vec_at<float2>(p); }
__device__ __forceinline__ void sts4(float* p, float4 x) { vec_at<float4>(p) = x; }
__device__ __forceinline__ float comp(const float4& x, int e) { return e == 0 ? x.x : e == 1 ? x.y : e == 2 ? x.z : x.w; }
__device__ __forceinline__ float comp2(const float2& x, int e) { return e == 0 ? x.x : x.y; }

// Lane layout shared by both kernels: PW = 32 / TPR groups per warp; a lane's slice index q is its high
// bits, its group index p counts groups across the block.
template <int TPR>
struct Lanes {
  static constexpr int PW = 32 / TPR;
  int q, p;
  __device__ __forceinline__ explicit Lanes(int tid) {
    const int lane = tid & 31;
    q = lane / PW;
    p = (tid >> 5) * PW + lane % PW;
  }
};
// Element e of float4 group m of slice q (interleaved groups q, q+TPR, ...: adjacent 16-byte words for the
// TPR slices, so a warp's loads of one group touch one 64-byte span).
template <int TPR>
__device__ __forceinline__ int slice4(int q, int m) { return 4 * (q + TPR * m); }

// ---------------------------------------------------------------- forward
// A thread's R x K tile of S (rows R*p.., keys of slice q) into a transposed ([key][value]) state; pT points
// at the block's first row (column, transposed).
template <int N, int TPR, int R, int K>
__device__ __forceinline__ void store_rows_T(float* __restrict__ pT, const float (&S)[R][K], int p, int q) {
#pragma unroll
  for (int m = 0; m < K / 4; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float* dst = pT + (long long)(slice4<TPR>(q, m) + e) * N + R * p;
      if constexpr (R == 4) IO<float>::store4(dst, make_float4(S[0][4 * m + e], S[1][4 * m + e], S[2][4 * m + e], S[3][4 * m + e]));
      else if constexpr (R == 2) IO<float>::store2(dst, S[0][4 * m + e], S[1][4 * m + e]);
      else *dst = S[0][4 * m + e];
    }
}

// Row split: RS blocks per head, block (b*H + h)*RS + s owning value rows s*N/RS .. (s+1)*N/RS - 1 (rows are
// independent, so each block runs exactly the per-row arithmetic of RS=1: results are bitwise equal). Every
// block stages the key-indexed inputs of all N keys, but the row-indexed one (v here, dy in bwd_rows_kernel)
// only for its own rows.
template <int N, int RS>
struct RowSplit {
  static constexpr int NR = N / RS;  // rows per block
  long long bh;                      // batch * H + head
  int row0;                          // the block's first row
  __device__ __forceinline__ explicit RowSplit(long long block) : bh(block / RS), row0((int)(block % RS) * NR) {}
};

template <typename T, int N, int R, int TPR, int RS>
__global__ void __launch_bounds__((N / RS / R) * TPR)
fwd_kernel(const int T_len, const int H, const T* __restrict__ r, const void* __restrict__ w, const bool w_f32,
           const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b,
           const float* __restrict__ s0, T* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt,
           float* __restrict__ sa_out) {
  constexpr int CH = kChunk;
  constexpr int NR = RowSplit<N, RS>::NR;
  constexpr int NT = (NR / R) * TPR;
  constexpr int K = N / TPR;   // keys per thread
  constexpr int G = K / 4;     // float4 groups per thread
  constexpr int NG = N / 4;    // float4 groups per token vector
  constexpr int NGV = NR / 4;  // float4 groups of the block's rows of v
  constexpr int PF = CH * NG / NT;    // float4 groups per key-indexed array per thread in a chunk load
  constexpr int PFV = CH * NGV / NT;  // the same for v
  static_assert((R == 1 || R == 2 || R == 4) && TPR == 4,
                "y/sa stores: R=4 lane q writes row q; R=2 lanes 0/1 write y/sa pairs; R=1 lanes 0/1 write y/sa");
  static_assert(N % (4 * TPR) == 0 && N % (4 * RS) == 0 && NT % 32 == 0 && (CH * NG) % NT == 0 &&
                (CH * NGV) % NT == 0, "bad tiling");
  using Raw = typename IO<T>::raw4;

  __shared__ __align__(16) float s_r[CH * N];
  __shared__ __align__(16) float s_d[CH * N];
  __shared__ __align__(16) float s_k[CH * N];
  __shared__ __align__(16) float s_a[CH * N];
  __shared__ __align__(16) float s_b[CH * N];
  __shared__ __align__(16) float s_v[CH * NR];  // [token][the block's rows]

  const int tid = threadIdx.x;
  const Lanes<TPR> ln(tid);
  const int q = ln.q, p = ln.p;
  constexpr int PW = Lanes<TPR>::PW;
  const RowSplit<N, RS> rs(blockIdx.x);
  const long long bh = rs.bh;
  const int row0 = rs.row0;
  const int h = (int)(bh % H);
  const long long bidx = bh / H;
  const long long NN = (long long)N * N;
  const int nC = (T_len + CH - 1) / CH;
  float* ck = ckpt ? ckpt + bh * (nC + 1) * NN + row0 : nullptr;  // transposed: [key][value], our rows

  float S[R][K];
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int m = 0; m < G; ++m) {
      const float4 x = s0 ? IO<float>::load4(s0 + bh * NN + (long long)(row0 + R * p + rr) * N + slice4<TPR>(q, m))
                          : make_float4(0.f, 0.f, 0.f, 0.f);
      S[rr][4 * m] = x.x; S[rr][4 * m + 1] = x.y; S[rr][4 * m + 2] = x.z; S[rr][4 * m + 3] = x.w;
    }

  // Chunk inputs in flight, raw (so issuing the loads never waits for them).
  Raw pr[PF], pk[PF], pa[PF], pb[PF], pv[PFV];
  uint4 pw[PF];
  auto fetch = [&](int c) {
    const int t0 = c * CH, L = min(CH, T_len - t0);
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT, tt = idx / NG, g = idx % NG;
      const long long off = ((bidx * T_len + t0 + min(tt, L - 1)) * H + h) * N + 4 * g;  // rows past T: reread
      pr[u] = IO<T>::load_raw4(r + off);
      pk[u] = IO<T>::load_raw4(k + off);
      pa[u] = IO<T>::load_raw4(a + off);
      pb[u] = IO<T>::load_raw4(b + off);
      if constexpr (RS == 1) pv[u] = IO<T>::load_raw4(v + off);  // RS=1: the original instruction order
      pw[u] = load_w_raw4<T>(w, w_f32, off);
    }
    if constexpr (RS > 1) {
#pragma unroll
      for (int u = 0; u < PFV; ++u) {
        const int idx = tid + u * NT, tt = idx / NGV, g = idx % NGV;
        pv[u] = IO<T>::load_raw4(v + ((bidx * T_len + t0 + min(tt, L - 1)) * H + h) * N + row0 + 4 * g);
      }
    }
  };
  if (nC > 0) fetch(0);

  for (int c = 0; c < nC; ++c) {
    const int t0 = c * CH;
    const int L = min(CH, T_len - t0);
    if (ck) store_rows_T<N, TPR, R, K>(ck + c * NN, S, p, q);  // state before this chunk, transposed
    __syncthreads();  // the previous chunk's steps are done with shared memory
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT;
      sts4(s_r + 4 * idx, IO<T>::cvt4(pr[u]));
      sts4(s_k + 4 * idx, IO<T>::cvt4(pk[u]));
      sts4(s_a + 4 * idx, IO<T>::cvt4(pa[u]));
      sts4(s_b + 4 * idx, IO<T>::cvt4(pb[u]));
      if constexpr (RS == 1) sts4(s_v + 4 * idx, IO<T>::cvt4(pv[u]));
      sts4(s_d + 4 * idx, decay4(cvt_w4<T>(pw[u], w_f32)));
    }
    if constexpr (RS > 1) {
#pragma unroll
      for (int u = 0; u < PFV; ++u) sts4(s_v + 4 * (tid + u * NT), IO<T>::cvt4(pv[u]));
    }
    __syncthreads();
    if (c + 1 < nC) fetch(c + 1);  // lands while this chunk computes

    for (int tt = 0; tt < L; ++tt) {
      const int tn = tt * N;
      float acc[R][2];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) acc[rr][0] = acc[rr][1] = 0.f;
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const float4 x = lds4(s_a + tn + slice4<TPR>(q, m));
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int rr = 0; rr < R; ++rr) acc[rr][e & 1] = fmaf(S[rr][4 * m + e], comp(x, e), acc[rr][e & 1]);
      }
      float sa[R];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) sa[rr] = group_sum<TPR, PW>(acc[rr][0] + acc[rr][1]);
      float vr[R];
      if constexpr (R == 4) {
        const float4 x = lds4(s_v + tt * NR + R * p);
        vr[0] = x.x; vr[1] = x.y; vr[2] = x.z; vr[3] = x.w;
      } else if constexpr (R == 2) {
        const float2 x = lds2(s_v + tt * NR + R * p);
        vr[0] = x.x; vr[1] = x.y;
      } else {
        vr[0] = s_v[tt * NR + p];
      }
      float yacc[R][2];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) yacc[rr][0] = yacc[rr][1] = 0.f;
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const int j = slice4<TPR>(q, m);
        const float4 d4 = lds4(s_d + tn + j), b4 = lds4(s_b + tn + j), k4 = lds4(s_k + tn + j),
                     r4 = lds4(s_r + tn + j);
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            float& s = S[rr][4 * m + e];
            s = state_step(s, comp(d4, e), sa[rr], comp(b4, e), vr[rr], comp(k4, e));
            yacc[rr][e & 1] = fmaf(s, comp(r4, e), yacc[rr][e & 1]);
          }
      }
      float yy[R];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) yy[rr] = group_sum<TPR, PW>(yacc[rr][0] + yacc[rr][1]);
      const long long off = ((bidx * T_len + t0 + tt) * H + h) * N + row0 + R * p;
      if constexpr (R == 4) {  // lane q writes row R*p + q: a warp writes 32 consecutive rows
        const float my_y = q == 0 ? yy[0] : q == 1 ? yy[1] : q == 2 ? yy[2] : yy[3];
        const float my_sa = q == 0 ? sa[0] : q == 1 ? sa[1] : q == 2 ? sa[2] : sa[3];
        IO<T>::store1(y + off + q, my_y);
        if (sa_out) sa_out[off + q] = my_sa;
      } else if constexpr (R == 2) {  // lane 0 writes the y pair, lane 1 the sa pair
        if (q == 0) IO<T>::store2(y + off, yy[0], yy[1]);
        if (q == 1 && sa_out) IO<float>::store2(sa_out + off, sa[0], sa[1]);
      } else {  // lane 0 writes y, lane 1 sa
        if (q == 0) IO<T>::store1(y + off, yy[0]);
        if (q == 1 && sa_out) sa_out[off] = sa[0];
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int m = 0; m < G; ++m)
      IO<float>::store4(sT + bh * NN + (long long)(row0 + R * p + rr) * N + slice4<TPR>(q, m),
                        make_float4(S[rr][4 * m], S[rr][4 * m + 1], S[rr][4 * m + 2], S[rr][4 * m + 3]));
  if (ck) store_rows_T<N, TPR, R, K>(ck + nC * NN, S, p, q);
}

// ---------------------------------------------------------------- backward
// Columns 2p, 2p+1 of a transposed ([key][value]) state, rows of slice q: float4 loads.
template <int N, int TPR, int K>
__device__ __forceinline__ void load_cols_T(float (&dst)[2][K], const float* __restrict__ pT, int p, int q) {
#pragma unroll
  for (int cc = 0; cc < 2; ++cc)
#pragma unroll
    for (int m = 0; m < K / 4; ++m) {
      const float4 x = IO<float>::load4(pT + (long long)(2 * p + cc) * N + slice4<TPR>(q, m));
      dst[cc][4 * m] = x.x; dst[cc][4 * m + 1] = x.y; dst[cc][4 * m + 2] = x.z; dst[cc][4 * m + 3] = x.w;
    }
}

struct ColIn {  // the chunk's staged inputs (shared memory, float32, [token][N]); id = 1/d
  const float *r, *d, *id, *f, *k, *a, *b, *v, *dy, *sa, *dsa;
};
template <typename T>
struct ColOut {
  T* dr;
  void* dw;
  bool w_f32;
  T *dk, *da, *db;
};

// Phase B, one token: columns 2p, 2p+1 of S and dS, rows of slice q. EXACT: S_{t-1} is Sst (the token opens
// a SUB piece) instead of the backstep. A template flag, so that each variant is straight-line code.
template <bool EXACT, typename T, int N, int TPR, int K>
__device__ __forceinline__ void col_step(int tt, long long off, const ColIn& in, const ColOut<T>& out,
                                         float (&Sc)[2][K], float (&dSc)[2][K], const float (&Sst)[2][K], int p, int q) {
  constexpr int C = 2;
  constexpr int PW = Lanes<TPR>::PW;
  const int tn = tt * N;
  const float2 r2 = lds2(in.r + tn + 2 * p), d2 = lds2(in.d + tn + 2 * p), b2 = lds2(in.b + tn + 2 * p);
  const float2 k2 = lds2(in.k + tn + 2 * p), a2 = lds2(in.a + tn + 2 * p);
  float2 inv_d = make_float2(0.f, 0.f);
  if constexpr (!EXACT) inv_d = lds2(in.id + tn + 2 * p);  // precomputed: no division in the hot loop
  float cr[C] = {0.f, 0.f}, ckk[C] = {0.f, 0.f}, cb[C] = {0.f, 0.f}, cd[C] = {0.f, 0.f}, ca[C] = {0.f, 0.f};
#pragma unroll
  for (int m = 0; m < K / 4; ++m) {
    const int i4 = slice4<TPR>(q, m);
    const float4 dy4 = lds4(in.dy + tn + i4), v4 = lds4(in.v + tn + i4), sa4 = lds4(in.sa + tn + i4),
                 g4 = lds4(in.dsa + tn + i4);
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int cc = 0; cc < C; ++cc) {
        float& ds = dSc[cc][4 * m + e];
        float& sc = Sc[cc][4 * m + e];
        ds = fmaf(comp(dy4, e), comp2(r2, cc), ds);  // dS' = dS + dy r^T
        cr[cc] = fmaf(sc, comp(dy4, e), cr[cc]);      // dr = S_t^T dy
        ckk[cc] = fmaf(ds, comp(v4, e), ckk[cc]);     // dk = dS'^T v
        cb[cc] = fmaf(ds, comp(sa4, e), cb[cc]);      // db = dS'^T sa
        if constexpr (EXACT) sc = Sst[cc][4 * m + e];
        else sc = fmaf(-comp(v4, e), comp2(k2, cc), fmaf(-comp(sa4, e), comp2(b2, cc), sc)) * comp2(inv_d, cc);  // S_{t-1}
        cd[cc] = fmaf(ds, sc, cd[cc]);                // dd = sum_i dS'[i] S_{t-1}[i]
        ca[cc] = fmaf(sc, comp(g4, e), ca[cc]);       // da = S_{t-1}^T dsa
        ds = fmaf(comp(g4, e), comp2(a2, cc), ds * comp2(d2, cc));  // dS_{t-1} = dS' d + dsa a^T
      }
  }
#pragma unroll
  for (int cc = 0; cc < C; ++cc) {
    cr[cc] = group_sum<TPR, PW>(cr[cc]);
    ckk[cc] = group_sum<TPR, PW>(ckk[cc]);
    cb[cc] = group_sum<TPR, PW>(cb[cc]);
    cd[cc] = group_sum<TPR, PW>(cd[cc]);
    ca[cc] = group_sum<TPR, PW>(ca[cc]);
  }
  // The TPR lanes of a group hold the same sums; each writes different gradients (2 columns each).
  if (q == 0) {
    IO<T>::store2(out.dr + off, cr[0], cr[1]);
    IO<T>::store2(out.db + off, cb[0], cb[1]);
  } else if (q == 1) {
    const float2 f2 = lds2(in.f + tn + 2 * p);
    store_w2<T>(out.dw, out.w_f32, off, cd[0] * f2.x, cd[1] * f2.y);
  } else if (q == 2) {
    IO<T>::store2(out.dk + off, ckk[0], ckk[1]);
  } else {
    IO<T>::store2(out.da + off, ca[0], ca[1]);
  }
}

template <typename T, int N, int TPR, int SUB>
__global__ void __launch_bounds__((N / 2) * TPR)
bwd_kernel(const int T_len, const int H, const T* __restrict__ r, const void* __restrict__ w, const bool w_f32,
           const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b,
           const T* __restrict__ dy, const float* __restrict__ dsT, const float* __restrict__ ckpt,
           const float* __restrict__ sa, float* __restrict__ scratch, T* __restrict__ dr, void* __restrict__ dw,
           T* __restrict__ dk, T* __restrict__ dv, T* __restrict__ da, T* __restrict__ db,
           float* __restrict__ ds0) {
  constexpr int CH = kChunk;
  constexpr int C = 2;            // rows (phase A) / columns (phase B) per thread
  constexpr int NT = (N / C) * TPR;
  constexpr int K = N / TPR;      // keys (phase A) / rows (phase B) per thread
  constexpr int G = K / 4;
  constexpr int NG = N / 4;
  constexpr int NSUB = CH / SUB;
  constexpr int PF = CH * NG / NT;
  constexpr int PW = Lanes<TPR>::PW;
  static_assert(N % (4 * TPR) == 0 && NT % 32 == 0 && CH % SUB == 0 && (CH * NG) % NT == 0, "bad tiling");
  static_assert(NT * C * K == N * N, "scratch layout: one N*N slab per sub-checkpoint");

  // Chunk inputs (float32): r, decay d and 1/d, dd/dw factor f, k, a, b, v, dy, sa; and dsa from phase A.
  __shared__ __align__(16) float s_r[CH * N];
  __shared__ __align__(16) float s_d[CH * N];
  __shared__ __align__(16) float s_id[CH * N];
  __shared__ __align__(16) float s_f[CH * N];
  __shared__ __align__(16) float s_k[CH * N];
  __shared__ __align__(16) float s_a[CH * N];
  __shared__ __align__(16) float s_b[CH * N];
  __shared__ __align__(16) float s_v[CH * N];
  __shared__ __align__(16) float s_dy[CH * N];
  __shared__ __align__(16) float s_sa[CH * N];
  __shared__ __align__(16) float s_dsa[CH * N];

  const int tid = threadIdx.x;
  const Lanes<TPR> ln(tid);
  const int q = ln.q, p = ln.p;
  const long long bh = blockIdx.x;
  const int h = (int)(bh % H);
  const long long bidx = bh / H;
  const long long NN = (long long)N * N;
  const int nC = (T_len + CH - 1) / CH;
  const float* ck = ckpt + bh * (nC + 1) * NN;                              // transposed [key][value]
  float* scr = scratch + bh * (NSUB - 1) * NN + (long long)tid * (C * K);  // this thread's private slices

  float dSr[C][K];  // dS rows 2p+cc, keys of slice q
  float dSc[C][K];  // dS columns 2p+cc, rows of slice q
  float Sc[C][K];   // S_t columns 2p+cc (S_{t-1} after the backstep), rows of slice q
  float Sst[C][K];  // exact state before the current SUB-token piece (recompute: the running state)
  if (dsT) {
#pragma unroll
    for (int cc = 0; cc < C; ++cc)
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const float4 x = IO<float>::load4(dsT + bh * NN + (long long)(2 * p + cc) * N + slice4<TPR>(q, m));
        dSr[cc][4 * m] = x.x; dSr[cc][4 * m + 1] = x.y; dSr[cc][4 * m + 2] = x.z; dSr[cc][4 * m + 3] = x.w;
#pragma unroll
        for (int e = 0; e < 4; ++e) dSc[cc][4 * m + e] = dsT[bh * NN + (long long)(slice4<TPR>(q, m) + e) * N + 2 * p + cc];
      }
  } else {
#pragma unroll
    for (int cc = 0; cc < C; ++cc)
#pragma unroll
      for (int x = 0; x < K; ++x) dSr[cc][x] = dSc[cc][x] = 0.f;
  }

  if (nC > 0) load_cols_T<N, TPR, K>(Sc, ck + nC * NN, p, q);  // the final state
  for (int c = nC - 1; c >= 0; --c) {
    const int t0 = c * CH;
    const int L = min(CH, T_len - t0);
    const int nsub = (L + SUB - 1) / SUB;
    if (nsub > 1) load_cols_T<N, TPR, K>(Sst, ck + c * NN, p, q);  // recompute start; lands during phase A
    __syncthreads();  // everyone is done with the previous chunk's shared memory
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT, tt = idx / NG, g = idx % NG;
      const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
      float4 rr = z, kk = z, aa = z, bb = z, vv = z, gy = z, ss = z, dd = make_float4(1.f, 1.f, 1.f, 1.f), ff = z;
      if (tt < L) {
        const long long off = ((bidx * T_len + t0 + tt) * H + h) * N + 4 * g;
        rr = IO<T>::load4(r + off);
        kk = IO<T>::load4(k + off);
        aa = IO<T>::load4(a + off);
        bb = IO<T>::load4(b + off);
        vv = IO<T>::load4(v + off);
        gy = IO<T>::load4(dy + off);
        ss = IO<float>::load4(sa + off);
        const float4 ww = cvt_w4<T>(load_w_raw4<T>(w, w_f32, off), w_f32);
        decay_of(ww.x, dd.x, ff.x); decay_of(ww.y, dd.y, ff.y); decay_of(ww.z, dd.z, ff.z); decay_of(ww.w, dd.w, ff.w);
      }
      sts4(s_id + 4 * idx, make_float4(1.f / dd.x, 1.f / dd.y, 1.f / dd.z, 1.f / dd.w));
      sts4(s_r + 4 * idx, rr); sts4(s_k + 4 * idx, kk); sts4(s_a + 4 * idx, aa); sts4(s_b + 4 * idx, bb);
      sts4(s_v + 4 * idx, vv); sts4(s_dy + 4 * idx, gy); sts4(s_sa + 4 * idx, ss); sts4(s_d + 4 * idx, dd);
      sts4(s_f + 4 * idx, ff);
    }
    __syncthreads();

    // ---- phase A: dS rows through the chunk (needs no S): dsa -> shared, dv -> global.
    for (int tt = L - 1; tt >= 0; --tt) {
      const int tn = tt * N;
      const float2 dy2 = lds2(s_dy + tn + 2 * p);
      float ra[C][2], rv[C][2];
#pragma unroll
      for (int cc = 0; cc < C; ++cc) ra[cc][0] = ra[cc][1] = rv[cc][0] = rv[cc][1] = 0.f;
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const int j = slice4<TPR>(q, m);
        const float4 r4 = lds4(s_r + tn + j), b4 = lds4(s_b + tn + j), k4 = lds4(s_k + tn + j);
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int cc = 0; cc < C; ++cc) {
            float& x = dSr[cc][4 * m + e];
            x = fmaf(comp2(dy2, cc), comp(r4, e), x);  // dS' = dS + dy r^T
            ra[cc][e & 1] = fmaf(x, comp(b4, e), ra[cc][e & 1]);
            rv[cc][e & 1] = fmaf(x, comp(k4, e), rv[cc][e & 1]);
          }
      }
      float dsa[C], dvv[C];
#pragma unroll
      for (int cc = 0; cc < C; ++cc) {
        dsa[cc] = group_sum<TPR, PW>(ra[cc][0] + ra[cc][1]);
        dvv[cc] = group_sum<TPR, PW>(rv[cc][0] + rv[cc][1]);
      }
      if (q == 0) vec_at<float2>(s_dsa + tn + 2 * p) = make_float2(dsa[0], dsa[1]);
      if (q == 1) IO<T>::store2(dv + ((bidx * T_len + t0 + tt) * H + h) * N + 2 * p, dvv[0], dvv[1]);
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const int j = slice4<TPR>(q, m);
        const float4 a4 = lds4(s_a + tn + j), d4 = lds4(s_d + tn + j);
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int cc = 0; cc < C; ++cc) dSr[cc][4 * m + e] = fmaf(dsa[cc], comp(a4, e), dSr[cc][4 * m + e] * comp(d4, e));
      }
    }
    __syncthreads();  // every dsa of the chunk is in s_dsa

    // ---- recompute the states at the starts of sub-chunks 1 .. nsub-1 (column form, saved sa), running in
    // Sst (which phase B reloads anyway), from ckpt[c] fetched before phase A.
    for (int s = 1; s < nsub; ++s) {
      for (int tt = (s - 1) * SUB; tt < s * SUB; ++tt) {
        const int tn = tt * N;
        const float2 d2 = lds2(s_d + tn + 2 * p), b2 = lds2(s_b + tn + 2 * p), k2 = lds2(s_k + tn + 2 * p);
#pragma unroll
        for (int m = 0; m < G; ++m) {
          const int i4 = slice4<TPR>(q, m);
          const float4 sa4 = lds4(s_sa + tn + i4), v4 = lds4(s_v + tn + i4);
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int cc = 0; cc < C; ++cc)
              Sst[cc][4 * m + e] = state_step(Sst[cc][4 * m + e], comp2(d2, cc), comp(sa4, e), comp2(b2, cc),
                                              comp(v4, e), comp2(k2, cc));
        }
      }
#pragma unroll
      for (int cc = 0; cc < C; ++cc)
#pragma unroll
        for (int m = 0; m < G; ++m)
          IO<float>::store4(scr + (s - 1) * NN + cc * K + 4 * m,
                            make_float4(Sst[cc][4 * m], Sst[cc][4 * m + 1], Sst[cc][4 * m + 2], Sst[cc][4 * m + 3]));
    }

    // ---- phase B: S and dS columns, tokens in reverse, no barrier. Sc enters as the exact state at the
    // end of the chunk (the final state, or what the previous chunk's phase B left: ckpt[c+1] exactly).
    const ColIn in{s_r, s_d, s_id, s_f, s_k, s_a, s_b, s_v, s_dy, s_sa, s_dsa};
    const ColOut<T> out{dr, dw, w_f32, dk, da, db};
    for (int s = nsub - 1; s >= 0; --s) {
      const int st0 = s * SUB;
      const int sL = min(SUB, L - st0);
      if (s == 0) {
        load_cols_T<N, TPR, K>(Sst, ck + c * NN, p, q);
      } else {
#pragma unroll
        for (int cc = 0; cc < C; ++cc)
#pragma unroll
          for (int m = 0; m < G; ++m) {
            const float4 x = IO<float>::load4(scr + (s - 1) * NN + cc * K + 4 * m);
            Sst[cc][4 * m] = x.x; Sst[cc][4 * m + 1] = x.y; Sst[cc][4 * m + 2] = x.z; Sst[cc][4 * m + 3] = x.w;
          }
      }
      const long long row0 = (bidx * T_len + t0) * H + h;  // token t0's row of [B*T, H]
      for (int tt = st0 + sL - 1; tt > st0; --tt)
        col_step<false, T, N, TPR, K>(tt, (row0 + (long long)tt * H) * N + 2 * p, in, out, Sc, dSc, Sst, p, q);
      col_step<true, T, N, TPR, K>(st0, (row0 + (long long)st0 * H) * N + 2 * p, in, out, Sc, dSc, Sst, p, q);
    }
  }
  if (ds0) {
#pragma unroll
    for (int cc = 0; cc < C; ++cc)
#pragma unroll
      for (int m = 0; m < G; ++m)
        IO<float>::store4(ds0 + bh * NN + (long long)(2 * p + cc) * N + slice4<TPR>(q, m),
                          make_float4(dSr[cc][4 * m], dSr[cc][4 * m + 1], dSr[cc][4 * m + 2], dSr[cc][4 * m + 3]));
  }
}


// ---------------------------------------------------------------- backward, two kernels ("new")
// The old bwd_kernel runs phase A, the recompute and phase B one after another in B*H blocks: on a 132-SM
// GPU that is ~8 warps per SM, and the whole backward runs at the issue rate of a latency-bound loop.
// Only phase A (the dS row recursion) is truly sequential over T; given dS at a chunk end (and the dsa of
// its tokens), the recompute + phase B of that chunk need nothing from other chunks. So:
//  bwd_rows_kernel (B*H*RS blocks): phase A over all chunks (inputs prefetched one chunk ahead, 6 arrays staged
//    instead of 11), writing dv, dsa (float32, global) and dS every CPB chunks (transposed, "dS checkpoints");
//  bwd_cols_kernel (B*H*ceil(nC/CPB) blocks, i.e. parallel over T): per segment of CPB chunks, from the
//    saved state at the segment end and the dS checkpoint, the recompute + phase B of the old kernel,
//    unchanged in arithmetic (col_step). The sub-chunk states live in a per-thread local array.
// Same operations in the same order per element as the old kernel (dS rows/columns bitwise equal).

// Phase A over the whole sequence. Scratch: dsa [B,T,H,N] float32; dsck [B*H, nSeg, N, N] transposed, entry g
// = the gradient of the state at the end of segment g (the state after token min(T, (g+1)*CPB*CH) - 1).
// C dS rows per thread; RS blocks per head (RowSplit), each writing its own rows of dsa, dv, dsck and ds0.
// rows_body is the work of logical block `block`, staging each chunk in s_r .. s_dy (float32 [token][key];
// s_dy: [token][the block's rows]). done (the fused backward only, else nullptr): per (head, chunk) flags,
// each set once that chunk's dsa and dS checkpoint are written. bwd_rows_kernel (below) passes separate
// __shared__ arrays: as a struct, ptxas allocated the standalone kernels' registers differently.
template <int N, int NR>
struct RowsSmem {  // the same staging as one struct, for the fused kernel's shared-memory union
  float r[kChunk * N], d[kChunk * N], k[kChunk * N], a[kChunk * N], b[kChunk * N], dy[kChunk * NR];
};

template <typename T, int N, int TPR, int CPB, int C, int RS>
__device__ __forceinline__ void rows_body(float* const s_r, float* const s_d, float* const s_k, float* const s_a,
                                          float* const s_b, float* const s_dy, const long long block, int* done,
                                          const int T_len, const int H, const T* __restrict__ r, const void* __restrict__ w,
                                          const bool w_f32, const T* __restrict__ k, const T* __restrict__ a,
                                          const T* __restrict__ b, const T* __restrict__ dy,
                                          const float* __restrict__ dsT, float* __restrict__ dsa_out,
                                          T* __restrict__ dv, float* __restrict__ dsck, float* __restrict__ ds0) {
  constexpr int CH = kChunk;
  constexpr int NR = RowSplit<N, RS>::NR;
  constexpr int NT = (NR / C) * TPR;
  constexpr int K = N / TPR;
  constexpr int G = K / 4;
  constexpr int NG = N / 4;
  constexpr int NGY = NR / 4;         // float4 groups of the block's rows of dy
  constexpr int PF = CH * NG / NT;    // per key-indexed array
  constexpr int PFY = CH * NGY / NT;  // for dy
  constexpr int PW = Lanes<TPR>::PW;
  static_assert(C == 1 || C == 2, "dsa/dv stores: lanes 0/1 write one value or a pair");
  static_assert(N % (4 * TPR) == 0 && N % (4 * RS) == 0 && NT % 32 == 0 && (CH * NG) % NT == 0 &&
                (CH * NGY) % NT == 0, "bad tiling");
  using Raw = typename IO<T>::raw4;

  const int tid = threadIdx.x;
  const Lanes<TPR> ln(tid);
  const int q = ln.q, p = ln.p;
  const RowSplit<N, RS> rs(block);
  const long long bh = rs.bh;
  const int row0 = rs.row0;
  const int h = (int)(bh % H);
  const long long bidx = bh / H;
  const long long NN = (long long)N * N;
  const int nC = (T_len + CH - 1) / CH;
  const int nSeg = (nC + CPB - 1) / CPB;
  float* ckd = dsck + bh * nSeg * NN + row0;  // transposed: our rows are columns row0..

  float dSr[C][K];  // dS rows row0 + C*p + cc, keys of slice q
  if (dsT) {
#pragma unroll
    for (int cc = 0; cc < C; ++cc)
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const float4 x = IO<float>::load4(dsT + bh * NN + (long long)(row0 + C * p + cc) * N + slice4<TPR>(q, m));
        dSr[cc][4 * m] = x.x; dSr[cc][4 * m + 1] = x.y; dSr[cc][4 * m + 2] = x.z; dSr[cc][4 * m + 3] = x.w;
      }
  } else {
#pragma unroll
    for (int cc = 0; cc < C; ++cc)
#pragma unroll
      for (int x = 0; x < K; ++x) dSr[cc][x] = 0.f;
  }

  Raw pr[PF], pk[PF], pa[PF], pb[PF], pg[PFY];
  uint4 pw[PF];
  auto fetch = [&](int c) {
    const int t0 = c * CH, L = min(CH, T_len - t0);
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT, tt = idx / NG, g = idx % NG;
      const long long off = ((bidx * T_len + t0 + min(tt, L - 1)) * H + h) * N + 4 * g;  // rows past T: reread
      pr[u] = IO<T>::load_raw4(r + off);
      pk[u] = IO<T>::load_raw4(k + off);
      pa[u] = IO<T>::load_raw4(a + off);
      pb[u] = IO<T>::load_raw4(b + off);
      if constexpr (RS == 1) pg[u] = IO<T>::load_raw4(dy + off);  // RS=1: the original instruction order
      pw[u] = load_w_raw4<T>(w, w_f32, off);
    }
    if constexpr (RS > 1) {
#pragma unroll
      for (int u = 0; u < PFY; ++u) {
        const int idx = tid + u * NT, tt = idx / NGY, g = idx % NGY;
        pg[u] = IO<T>::load_raw4(dy + ((bidx * T_len + t0 + min(tt, L - 1)) * H + h) * N + row0 + 4 * g);
      }
    }
  };
  if (nC > 0) fetch(nC - 1);

  for (int c = nC - 1; c >= 0; --c) {
    const int t0 = c * CH;
    const int L = min(CH, T_len - t0);
    if (c == nC - 1 || (c + 1) % CPB == 0) store_rows_T<N, TPR, C, K>(ckd + (c / CPB) * NN, dSr, p, q);
    __syncthreads();  // the previous chunk's steps are done with shared memory
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT;
      sts4(s_r + 4 * idx, IO<T>::cvt4(pr[u]));
      sts4(s_k + 4 * idx, IO<T>::cvt4(pk[u]));
      sts4(s_a + 4 * idx, IO<T>::cvt4(pa[u]));
      sts4(s_b + 4 * idx, IO<T>::cvt4(pb[u]));
      if constexpr (RS == 1) sts4(s_dy + 4 * idx, IO<T>::cvt4(pg[u]));
      sts4(s_d + 4 * idx, decay4(cvt_w4<T>(pw[u], w_f32)));
    }
    if constexpr (RS > 1) {
#pragma unroll
      for (int u = 0; u < PFY; ++u) sts4(s_dy + 4 * (tid + u * NT), IO<T>::cvt4(pg[u]));
    }
    __syncthreads();
    if (c > 0) fetch(c - 1);  // lands while this chunk computes

    for (int tt = L - 1; tt >= 0; --tt) {
      const int tn = tt * N;
      float dyr[C];
      if constexpr (C == 2) {
        const float2 x = lds2(s_dy + tt * NR + 2 * p);
        dyr[0] = x.x; dyr[1] = x.y;
      } else {
        dyr[0] = s_dy[tt * NR + p];
      }
      float ra[C][2], rv[C][2];
#pragma unroll
      for (int cc = 0; cc < C; ++cc) ra[cc][0] = ra[cc][1] = rv[cc][0] = rv[cc][1] = 0.f;
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const int j = slice4<TPR>(q, m);
        const float4 r4 = lds4(s_r + tn + j), b4 = lds4(s_b + tn + j), k4 = lds4(s_k + tn + j);
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int cc = 0; cc < C; ++cc) {
            float& x = dSr[cc][4 * m + e];
            x = fmaf(dyr[cc], comp(r4, e), x);  // dS' = dS + dy r^T
            ra[cc][e & 1] = fmaf(x, comp(b4, e), ra[cc][e & 1]);
            rv[cc][e & 1] = fmaf(x, comp(k4, e), rv[cc][e & 1]);
          }
      }
      float dsa[C], dvv[C];
#pragma unroll
      for (int cc = 0; cc < C; ++cc) {
        dsa[cc] = group_sum<TPR, PW>(ra[cc][0] + ra[cc][1]);
        dvv[cc] = group_sum<TPR, PW>(rv[cc][0] + rv[cc][1]);
      }
      const long long off = ((bidx * T_len + t0 + tt) * H + h) * N + row0 + C * p;
      if constexpr (C == 2) {
        if (q == 0) IO<float>::store2(dsa_out + off, dsa[0], dsa[1]);
        if (q == 1) IO<T>::store2(dv + off, dvv[0], dvv[1]);
      } else {
        if (q == 0) dsa_out[off] = dsa[0];
        if (q == 1) IO<T>::store1(dv + off, dvv[0]);
      }
#pragma unroll
      for (int m = 0; m < G; ++m) {
        const int j = slice4<TPR>(q, m);
        const float4 a4 = lds4(s_a + tn + j), d4 = lds4(s_d + tn + j);
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int cc = 0; cc < C; ++cc) dSr[cc][4 * m + e] = fmaf(dsa[cc], comp(a4, e), dSr[cc][4 * m + e] * comp(d4, e));
      }
    }
    if (done) {  // this chunk's dsa and its dS checkpoint (stored before the loop) are in global memory
      __threadfence();
      __syncthreads();
      if (tid == 0) atomicExch(done + bh * nC + c, 1);
    }
  }
  if (ds0) {
#pragma unroll
    for (int cc = 0; cc < C; ++cc)
#pragma unroll
      for (int m = 0; m < G; ++m)
        IO<float>::store4(ds0 + bh * NN + (long long)(row0 + C * p + cc) * N + slice4<TPR>(q, m),
                          make_float4(dSr[cc][4 * m], dSr[cc][4 * m + 1], dSr[cc][4 * m + 2], dSr[cc][4 * m + 3]));
  }
}

template <typename T, int N, int TPR, int CPB, int C, int RS>
__global__ void __launch_bounds__((N / RS / C) * TPR)
bwd_rows_kernel(const int T_len, const int H, const T* __restrict__ r, const void* __restrict__ w, const bool w_f32,
                const T* __restrict__ k, const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ dy,
                const float* __restrict__ dsT, float* __restrict__ dsa_out, T* __restrict__ dv,
                float* __restrict__ dsck, float* __restrict__ ds0) {
  constexpr int CH = kChunk, NR = N / RS;
  __shared__ __align__(16) float s_r[CH * N];
  __shared__ __align__(16) float s_d[CH * N];
  __shared__ __align__(16) float s_k[CH * N];
  __shared__ __align__(16) float s_a[CH * N];
  __shared__ __align__(16) float s_b[CH * N];
  __shared__ __align__(16) float s_dy[CH * NR];  // [token][the block's rows]
  rows_body<T, N, TPR, CPB, C, RS>(s_r, s_d, s_k, s_a, s_b, s_dy, blockIdx.x, nullptr, T_len, H, r, w, w_f32, k, a, b,
                                   dy, dsT, dsa_out, dv, dsck, ds0);
}

// Recompute + phase B for one segment of CPB chunks (block = (b*H + h) * nSeg + segment), chunks in reverse.
template <typename T, int N, int TPR, int SUB, int CPB>
__global__ void __launch_bounds__((N / 2) * TPR, WKV7_COLS_MINB)
bwd_cols_kernel(const int T_len, const int H, const T* __restrict__ r, const void* __restrict__ w, const bool w_f32,
                const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b,
                const T* __restrict__ dy, const float* __restrict__ ckpt, const float* __restrict__ sa,
                const float* __restrict__ dsa, const float* __restrict__ dsck, T* __restrict__ dr,
                void* __restrict__ dw, T* __restrict__ dk, T* __restrict__ da, T* __restrict__ db) {
  constexpr int CH = kChunk;
  constexpr int C = 2;
  constexpr int NT = (N / C) * TPR;
  constexpr int K = N / TPR;
  constexpr int G = K / 4;
  constexpr int NG = N / 4;
  constexpr int NSUB = CH / SUB;
  constexpr int PF = CH * NG / NT;
  static_assert(N % (4 * TPR) == 0 && NT % 32 == 0 && CH % SUB == 0 && (CH * NG) % NT == 0, "bad tiling");

  __shared__ __align__(16) float s_r[CH * N];
  __shared__ __align__(16) float s_d[CH * N];
  __shared__ __align__(16) float s_id[CH * N];
  __shared__ __align__(16) float s_f[CH * N];
  __shared__ __align__(16) float s_k[CH * N];
  __shared__ __align__(16) float s_a[CH * N];
  __shared__ __align__(16) float s_b[CH * N];
  __shared__ __align__(16) float s_v[CH * N];
  __shared__ __align__(16) float s_dy[CH * N];
  __shared__ __align__(16) float s_sa[CH * N];
  __shared__ __align__(16) float s_dsa[CH * N];

  const int tid = threadIdx.x;
  const Lanes<TPR> ln(tid);
  const int q = ln.q, p = ln.p;
  const long long NN = (long long)N * N;
  const int nC = (T_len + CH - 1) / CH;
  const int nSeg = (nC + CPB - 1) / CPB;
  const long long bh = blockIdx.x / nSeg;
  const int seg = (int)(blockIdx.x % nSeg);
  const int h = (int)(bh % H);
  const long long bidx = bh / H;
  const float* ck = ckpt + bh * (nC + 1) * NN;  // transposed [key][value]
  const int c_hi = min(nC, (seg + 1) * CPB) - 1;

  float dSc[C][K];  // dS columns 2p+cc, rows of slice q
  float Sc[C][K];   // S_t columns 2p+cc (S_{t-1} after the backstep), rows of slice q
  float Sst[C][K];  // exact state before the current SUB-token piece (recompute: the running state)
  float snap[NSUB][C][K];  // exact states at the sub-chunk starts (local memory)
  load_cols_T<N, TPR, K>(Sc, ck + (c_hi + 1) * NN, p, q);
  load_cols_T<N, TPR, K>(dSc, dsck + (bh * nSeg + seg) * NN, p, q);

  for (int c = c_hi; c >= seg * CPB; --c) {
    const int t0 = c * CH;
    const int L = min(CH, T_len - t0);
    const int nsub = (L + SUB - 1) / SUB;
    load_cols_T<N, TPR, K>(Sst, ck + c * NN, p, q);  // recompute start
    __syncthreads();  // everyone is done with the previous chunk's shared memory
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int idx = tid + u * NT, tt = idx / NG, g = idx % NG;
      const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
      float4 rr = z, kk = z, aa = z, bb = z, vv = z, gy = z, ss = z, gs = z, dd = make_float4(1.f, 1.f, 1.f, 1.f), ff = z;
      if (tt < L) {
        const long long off = ((bidx * T_len + t0 + tt) * H + h) * N + 4 * g;
        rr = IO<T>::load4(r + off);
        kk = IO<T>::load4(k + off);
        aa = IO<T>::load4(a + off);
        bb = IO<T>::load4(b + off);
        vv = IO<T>::load4(v + off);
        gy = IO<T>::load4(dy + off);
        ss = IO<float>::load4(sa + off);
        gs = IO<float>::load4(dsa + off);
        const float4 ww = cvt_w4<T>(load_w_raw4<T>(w, w_f32, off), w_f32);
        decay_of(ww.x, dd.x, ff.x); decay_of(ww.y, dd.y, ff.y); decay_of(ww.z, dd.z, ff.z); decay_of(ww.w, dd.w, ff.w);
      }
      sts4(s_id + 4 * idx, make_float4(1.f / dd.x, 1.f / dd.y, 1.f / dd.z, 1.f / dd.w));
      sts4(s_r + 4 * idx, rr); sts4(s_k + 4 * idx, kk); sts4(s_a + 4 * idx, aa); sts4(s_b + 4 * idx, bb);
      sts4(s_v + 4 * idx, vv); sts4(s_dy + 4 * idx, gy); sts4(s_sa + 4 * idx, ss); sts4(s_d + 4 * idx, dd);
      sts4(s_f + 4 * idx, ff); sts4(s_dsa + 4 * idx, gs);
    }
    __syncthreads();

    // ---- recompute the states at the starts of sub-chunks 1 .. nsub-1 (column form, saved sa).
#pragma unroll
    for (int cc = 0; cc < C; ++cc)
#pragma unroll
      for (int x = 0; x < K; ++x) snap[0][cc][x] = Sst[cc][x];
    for (int s = 1; s < nsub; ++s) {
      for (int tt = (s - 1) * SUB; tt < s * SUB; ++tt) {
        const int tn = tt * N;
        const float2 d2 = lds2(s_d + tn + 2 * p), b2 = lds2(s_b + tn + 2 * p), k2 = lds2(s_k + tn + 2 * p);
#pragma unroll
        for (int m = 0; m < G; ++m) {
          const int i4 = slice4<TPR>(q, m);
          const float4 sa4 = lds4(s_sa + tn + i4), v4 = lds4(s_v + tn + i4);
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int cc = 0; cc < C; ++cc)
              Sst[cc][4 * m + e] = state_step(Sst[cc][4 * m + e], comp2(d2, cc), comp(sa4, e), comp2(b2, cc),
                                              comp(v4, e), comp2(k2, cc));
        }
      }
#pragma unroll
      for (int cc = 0; cc < C; ++cc)
#pragma unroll
        for (int x = 0; x < K; ++x) snap[s][cc][x] = Sst[cc][x];
    }

    // ---- phase B: S and dS columns, tokens in reverse, no barrier.
    const ColIn in{s_r, s_d, s_id, s_f, s_k, s_a, s_b, s_v, s_dy, s_sa, s_dsa};
    const ColOut<T> out{dr, dw, w_f32, dk, da, db};
    for (int s = nsub - 1; s >= 0; --s) {
      const int st0 = s * SUB;
      const int sL = min(SUB, L - st0);
      const long long row0 = (bidx * T_len + t0) * H + h;  // token t0's row of [B*T, H]
      for (int tt = st0 + sL - 1; tt > st0; --tt)
        col_step<false, T, N, TPR, K>(tt, (row0 + (long long)tt * H) * N + 2 * p, in, out, Sc, dSc, Sst, p, q);
      // The exact state before the piece is loaded only now, so it is not live through the backsteps.
#pragma unroll
      for (int cc = 0; cc < C; ++cc)
#pragma unroll
        for (int x = 0; x < K; ++x) Sst[cc][x] = snap[s][cc][x];
      col_step<true, T, N, TPR, K>(st0, (row0 + (long long)st0 * H) * N + 2 * p, in, out, Sc, dSc, Sst, p, q);
    }
  }
}

}  // namespace detail
}  // namespace wkv7
