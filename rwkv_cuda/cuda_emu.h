// CPU emulation of the small CUDA subset the WKV-7 kernels use, so that the *same* kernel source can be
// compiled with g++ and checked against the float64 reference on machines without a GPU (CI, and the
// development machine before a scarce GPU run).
//
// Model: the blocks of a launch run one after another; the threads of a block are cooperative fibers
// (ucontext) on one OS thread. A barrier (__syncthreads, and each warp shuffle, which needs a rendezvous)
// yields to the scheduler, which runs every thread up to its next barrier, in a freshly shuffled order
// each round: a read that is not separated by a barrier from the write it depends on then sees stale data
// in some runs, so missing barriers show up as wrong or varying results. Every thread of a block must reach
// the same sequence of barriers (true of these kernels: shuffles and syncs sit in uniform control flow);
// the scheduler aborts if a thread exits while others wait at a barrier.
//
// Checked as the GPU would fault: the alignment of vector accesses (vec_at, __ldcg) and of wmma tiles.
// Not emulated: warp-synchronous execution, register limits, shared-memory limits.
#pragma once

#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <type_traits>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) float2 { float x, y; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == 0 ? "no error" : "emulated error"; }

namespace emu {
// The GPU faults on a vector or tensor-core access whose address is not aligned to its size (16 bytes for a
// float4, 32 for a wmma tile); x86 does not, so the emulated accesses check.
inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "emulated CUDA: misaligned %s at %p (needs %zu-byte alignment)\n", what, p, bytes);
    std::abort();
  }
}
}  // namespace emu

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __fdividef(float a, float b) { return a / b; }

// ---- fp16 / bf16 storage types and conversions (bit-exact round-to-nearest-even) ----
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
// Portable IEEE half <-> float (no _Float16 needed); nearbyint rounds half to even.
inline float __half2float(__half h) {
  const unsigned s = h.x >> 15, E = (h.x >> 10) & 31u, F = h.x & 1023u;
  double v;
  if (E == 0) v = std::ldexp((double)F, -24);
  else if (E == 31) v = F ? NAN : INFINITY;
  else v = std::ldexp(1024.0 + F, (int)E - 25);
  return (float)(s ? -v : v);
}
inline __half __float2half_rn(float f) {
  if (std::isnan(f)) return __half{0x7e00};
  const unsigned short sign = std::signbit(f) ? 0x8000 : 0;
  const double x = std::fabs((double)f);
  if (x >= 65520.0) return __half{(unsigned short)(sign | 0x7c00)};
  if (x < 6.103515625e-05) return __half{(unsigned short)(sign | (unsigned)std::nearbyint(x * 16777216.0))};
  int e;
  const double m = std::frexp(x, &e);  // x = m 2^e, m in [0.5, 1)
  double frac = std::nearbyint((2.0 * m - 1.0) * 1024.0);
  int E = e - 1 + 15;
  if (frac == 1024.0) { frac = 0.0; ++E; }
  if (E >= 31) return __half{(unsigned short)(sign | 0x7c00)};
  return __half{(unsigned short)(sign | (E << 10) | (unsigned)frac)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(unsigned short)(u >> 16)};
}

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
};

struct State {
  ucontext_t sched;
  Fiber* cur = nullptr;
  std::function<void()> body;
  dim3 block_idx, block_dim, grid_dim;
  unsigned long long shfl_slot[1024];
  std::mt19937 rng{12345};
};
inline State& st() { static State s; return s; }

inline void yield_barrier() { swapcontext(&st().cur->ctx, &st().sched); }

inline void trampoline() {
  st().body();
  st().cur->done = true;  // uc_link returns to the scheduler
}

inline unsigned flat_tid() {
  const dim3& t = st().cur->tid;
  const dim3& d = st().block_dim;
  return t.x + d.x * (t.y + d.y * t.z);
}

// Run kernel(args...) over the grid. Returns 0, or aborts on a barrier divergence.
template <typename Kernel, typename... Args>
int launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  State& s = st();
  s.grid_dim = grid;
  s.block_dim = block;
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads > 1024) { std::fprintf(stderr, "emu: block of %u threads\n", nthreads); std::abort(); }
  s.body = [&]() { kernel(args...); };
  std::vector<Fiber> fibers(nthreads);
  std::vector<unsigned> order(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = i;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = dim3(bx, by, bz);
        for (unsigned i = 0; i < nthreads; ++i) {
          Fiber& f = fibers[i];
          f.done = false;
          f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.stack.assign(256 * 1024, 0);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, (void (*)())trampoline, 0);
        }
        for (;;) {
          std::shuffle(order.begin(), order.end(), s.rng);
          unsigned finished = 0;
          for (unsigned i : order) {
            Fiber& f = fibers[i];
            if (f.done) { ++finished; continue; }
            s.cur = &f;
            swapcontext(&s.sched, &f.ctx);
            if (f.done) ++finished;
          }
          if (finished == nthreads) break;
          if (finished != 0) {
            std::fprintf(stderr, "emu: barrier divergence (%u of %u threads exited)\n", finished, nthreads);
            std::abort();
          }
        }
      }
  s.cur = nullptr;
  return 0;
}

}  // namespace emu

// ---- nvcuda::wmma, the TF32 subset (m16n16k8). A fragment here holds its WHOLE tile in every thread (the real
// layout across the warp's lanes is opaque to the kernels, which only use whole-fragment operations and
// element-wise maps), so each emulated thread computes the warp's full result. Reads and writes of shared
// memory around these calls must be separated by __syncthreads, as on the GPU across warps.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };

// load/store_matrix_sync: "mptr must be a 256-bit aligned pointer", ldm a multiple of 4 for float elements.
inline void check_tile(const float* p, unsigned ldm) {
  emu::check_aligned(p, 32, "wmma tile");
  if (ldm % 4 != 0) {
    std::fprintf(stderr, "emulated CUDA: wmma ldm %u is not a multiple of 4 floats\n", ldm);
    std::abort();
  }
}

template <typename Use, int M, int N, int K> struct FragShape;
template <int M, int N, int K> struct FragShape<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct FragShape<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct FragShape<accumulator, M, N, K> { static constexpr int R = M, C = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = FragShape<Use, M, N, K>::R, C = FragShape<Use, M, N, K>::C;
  static constexpr int num_elements = R * C;
  float x[R * C];  // [row][col] of the tile
};

inline float __float_to_tf32(float f) {  // cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits
  if (!std::isfinite(f)) return f;
  unsigned u = __float_as_uint(f);
  u = (u + 0x1000u) & ~0x1fffu;
  return __uint_as_float(u);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_tile(p, ldm);
  for (int r = 0; r < F::R; ++r)
    for (int c = 0; c < F::C; ++c)
      f.x[r * F::C + c] = std::is_same<Layout, col_major>::value ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const float* p, unsigned ldm, layout_t layout) {
  check_tile(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
template <int M, int N, int K, typename T>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout) {
  check_tile(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]) = f.x[r * N + c];
}
template <int M, int N, int K, typename T>
inline void fill_fragment(fragment<accumulator, M, N, K, T, void>& f, float v) {
  for (float& e : f.x) e = v;
}
// d = a b + c, float32 accumulation in k order (the GPU's internal order and rounding may differ slightly).
template <int M, int N, int K, typename TA, typename LA, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc = std::fmaf(a.x[i * K + k], b.x[k * N + j], acc);
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda

#define threadIdx (emu::st().cur->tid)
#define blockIdx (emu::st().block_idx)
#define blockDim (emu::st().block_dim)
#define gridDim (emu::st().grid_dim)

inline void __syncthreads() { emu::yield_barrier(); }
// A warp barrier: here a barrier of the whole block, so every warp of the block must reach the same __syncwarp
// calls (the kernels call it in block-uniform code). It orders a warp's lanes around shared memory that one
// emulated lane would otherwise read after another had already rewritten it (each holds whole WMMA tiles).
inline void __syncwarp(unsigned = 0xffffffffu) { emu::yield_barrier(); }

// Blocks run one after another here, so atomics are plain read-modify-writes and fences are no-ops.
inline int atomicAdd(int* p, int v) { const int old = *p; *p += v; return old; }
inline int atomicExch(int* p, int v) { const int old = *p; *p = v; return old; }
inline void __threadfence() {}
inline void __nanosleep(unsigned) {}
inline float4 __ldcg(const float4* p) { emu::check_aligned(p, 16, "__ldcg"); return *p; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }

// Warp shuffle: publish, rendezvous, read the partner's slot, rendezvous again (so the slot is not
// overwritten before everyone has read it).
template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "emu shuffle: type too large");
  const unsigned me = emu::flat_tid();
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::st().shfl_slot[me] = bits;
  emu::yield_barrier();
  const unsigned lane = me & 31u, base = me & ~31u;
  const unsigned seg = lane & ~(unsigned)(width - 1);
  const unsigned other = base + seg + (((lane - seg) ^ (unsigned)lane_mask) & (unsigned)(width - 1));
  T r;
  std::memcpy(&r, &emu::st().shfl_slot[other], sizeof(T));
  emu::yield_barrier();
  return r;
}

#define WKV7_LAUNCH(kernel, grid, block, smem, stream, ...) emu::launch(kernel, grid, block, __VA_ARGS__)
