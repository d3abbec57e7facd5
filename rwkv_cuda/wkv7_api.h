// Host-side interface of the WKV-7 kernels (wkv7.cu). Plain pointers and sizes, no torch types, so the
// kernel file compiles standalone (nvcc -c, or g++ with the CPU emulator) and the torch binding
// (wkv7_torch.cpp) stays a thin layer.
//
// Conventions (as kaggletrain/ops/wkv.py): r, w, k, v, a, b, y and all their gradients are [B, T, H, N]
// contiguous in the I/O dtype, except w and dw, which may be float32 while the rest is half precision.
// w is the raw decay logit: decay = exp(-exp(-0.5) * sigmoid(w)), computed in float32 in the kernel.
// States are float32 [B, H, N, N], layout [value i, key j]. Recurrence per head:
//   sa = S a ;  S = S diag(d) + sa b^T + v k^T ;  y = S r.
#pragma once

#ifndef WKV7_EMU
#include <cuda_runtime_api.h>
#endif

namespace wkv7 {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Forward saves the state every kCkptLen tokens (plus the final state) for the backward pass.
constexpr int kCkptLen = 16;

inline long long num_ckpt(int T) { return (T + kCkptLen - 1) / kCkptLen + 1; }

// Forward implementations. kFwdSeq: fwd_kernel, token by token. kFwdChunk: chunks of kCkptLen tokens as dense
// tensor-core products (fwd_chunk_kernel; builds with TF32, i.e. sm_80+; elsewhere it resolves to kFwdSeq).
// kFwdAuto: the environment variable KAGGLETRAIN_WKV_FWD=seq|chunk, else kFwdDefault.
enum FwdVariant : int { kFwdAuto = 0, kFwdSeq = 1, kFwdChunk = 2 };
constexpr int kFwdDefault = kFwdSeq;  // until a GPU has timed kFwdChunk

// Backward implementations. kBwdOld: one block per (batch, head) runs everything (bwd_kernel). kBwdNew: the
// sequential dS row recursion in one kernel, then the column sums parallel over segments of kBwdSegChunks
// chunks in a second one. kBwdChunk: the same row recursion, then the column sums of each chunk as dense
// products (chunked algebra, parallel over chunks). kBwdFused: kBwdChunk's two kernels as one launch, the
// chunks running while the row recursion goes on. kBwdAuto: the environment variable
// KAGGLETRAIN_WKV_BWD=old|new|chunk|fused|scan, else kBwdDefault. kBwdScan: kBwdChunk with the dS recursion in
// chunks on tensor cores as well (bwd_scan_kernel; sm_80+, elsewhere it resolves to kBwdChunk).
enum BwdVariant : int { kBwdAuto = 0, kBwdOld = 1, kBwdNew = 2, kBwdChunk = 3, kBwdFused = 4, kBwdScan = 5 };
constexpr int kBwdDefault = kBwdNew;  // H200: passed every float64-reference case; 7.71 vs 9.91 ms fwd+bwd (bf16)
constexpr int kBwdSegChunks = 4;

// Row split of the sequential kernels (the forward and the new backward's row kernel): each head's N value
// rows go to `split` blocks (1, 2 or 4), so that small B*H still fills the GPU. Results are bitwise the same
// for every split. 0: KAGGLETRAIN_WKV_SPLIT=1|2|4; "auto": the smallest split with B*H*split >= 2 * (number
// of SMs), at most kMaxSplit; unset (or anything else): kSplitDefault.
constexpr int kMaxSplit = 4;
// 1 because the first H200 run measured every split slower (bf16, B=8, T=4096; see wkv7_kernels.cuh).
constexpr int kSplitDefault = 1;

struct FwdArgs {
  int B = 0, T = 0, H = 0, N = 0;
  int dtype = kF32;
  bool w_f32 = false;  // w is float32 although dtype is half precision
  const void *r = nullptr, *w = nullptr, *k = nullptr, *v = nullptr, *a = nullptr, *b = nullptr;
  const float* s0 = nullptr;  // optional initial state [B,H,N,N]
  void* y = nullptr;          // [B,T,H,N] dtype
  float* sT = nullptr;        // final state [B,H,N,N]
  float* ckpt = nullptr;      // optional (training): [B,H,num_ckpt(T),N,N], each state TRANSPOSED [key][value]
  float* sa = nullptr;        // optional (training): [B,T,H,N] float32, S_{t-1} a_t
  int split = 0;              // row split of kFwdSeq; resolved with resolve_split
  int variant = kFwdAuto;     // FwdVariant; resolved with resolve_fwd_variant
};

struct BwdArgs {
  int B = 0, T = 0, H = 0, N = 0;
  int dtype = kF32;
  bool w_f32 = false;
  const void *r = nullptr, *w = nullptr, *k = nullptr, *v = nullptr, *a = nullptr, *b = nullptr;
  const void* dy = nullptr;     // [B,T,H,N] dtype
  const float* dsT = nullptr;   // optional gradient of the final state
  const float* ckpt = nullptr;  // from the forward
  const float* sa = nullptr;    // from the forward
  float* scratch = nullptr;     // bwd_scratch_floats(B, T, H, N, variant) float32, any content
  void *dr = nullptr, *dw = nullptr, *dk = nullptr, *dv = nullptr, *da = nullptr, *db = nullptr;
  float* ds0 = nullptr;  // optional gradient of the initial state
  int variant = kBwdAuto;  // BwdVariant; resolved with resolve_bwd_variant
  int split = 0;           // row split of bwd_rows_kernel (kBwdNew only); resolved with resolve_split
};

// kFwdSeq or kFwdChunk: `variant` itself unless kFwdAuto, then KAGGLETRAIN_WKV_FWD (seq|chunk), else
// kFwdDefault; kFwdChunk only where this build has it.
int resolve_fwd_variant(int variant);
// Floats of backward scratch (in all) for this shape and variant.
long long bwd_scratch_floats(int B, int T, int H, int N, int variant);
// kBwdOld, kBwdNew, kBwdChunk, kBwdFused or kBwdScan: `variant` itself unless kBwdAuto, then
// KAGGLETRAIN_WKV_BWD (old|new|chunk|fused|scan), else kBwdDefault; kBwdScan only where this build has it.
int resolve_bwd_variant(int variant);
// 1, 2 or 4: `split` itself if it is one of those, else KAGGLETRAIN_WKV_SPLIT (1|2|4, or auto: the choice for
// B*H heads on the current device, whose SM count is queried once; the CPU emulator assumes 132), else
// kSplitDefault.
int resolve_split(int split, long long BH);
// True if a kernel for this head size and dtype was compiled into this build.
bool supported(int N, int dtype);
// 0 on success, else a cudaError_t value (cudaErrorInvalidValue for unsupported arguments).
int forward(const FwdArgs& args, cudaStream_t stream);
int backward(const BwdArgs& args, cudaStream_t stream);

}  // namespace wkv7
