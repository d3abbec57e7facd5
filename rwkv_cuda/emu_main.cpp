// CPU harness for the emulated kernels (tests/test_cuda_compile.py builds it with g++):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -DWKV7_EMU -x c++ emu_main.cpp -o emu_wkv7
//   emu_wkv7 IN OUT
// IN:  int32 header [B, T, H, N, dtype(0 f32, 1 f16, 2 bf16), w_f32, has_s0, has_dsT], then raw arrays
//      r, w, k, v, a, b, [s0 f32], dy, [dsT f32]   (w as float32 if w_f32, else dtype)
// OUT: y, sT f32, dr, dw, dk, dv, da, db, ds0 f32  (dw as float32 if w_f32)
// Every output buffer is filled with 0xFF bytes (NaN in all three dtypes) first, so an element the
// kernels fail to write shows up. KAGGLETRAIN_WKV_FWD=seq|chunk picks the forward, KAGGLETRAIN_WKV_BWD=
// old|new|chunk|fused|scan the backward, KAGGLETRAIN_WKV_SPLIT=1|2|4|auto the row split (default 1; auto assumes
// 132 SMs: 4 blocks per head for the tests' few heads).
#include "wkv7.cu"

#include <cstdio>
#include <vector>

namespace {

bool read_exact(FILE* f, void* p, size_t n) { return n == 0 || fread(p, 1, n, f) == n; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) { std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]); return 2; }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) { std::perror("open IN"); return 2; }
  int hd[8];
  if (!read_exact(in, hd, sizeof hd)) { std::fprintf(stderr, "short header\n"); return 2; }
  const int B = hd[0], T = hd[1], H = hd[2], N = hd[3], dtype = hd[4];
  const bool w_f32 = hd[5] != 0, has_s0 = hd[6] != 0, has_dsT = hd[7] != 0;
  const size_t el = dtype == wkv7::kF32 ? 4 : 2, wel = w_f32 ? 4 : el;
  const size_t n = (size_t)B * T * H * N, ns = (size_t)B * H * N * N;

  std::vector<char> r(n * el), w(n * wel), k(n * el), v(n * el), a(n * el), b(n * el), dy(n * el);
  std::vector<float> s0(has_s0 ? ns : 0), dsT(has_dsT ? ns : 0);
  bool ok = read_exact(in, r.data(), r.size()) && read_exact(in, w.data(), w.size()) &&
            read_exact(in, k.data(), k.size()) && read_exact(in, v.data(), v.size()) &&
            read_exact(in, a.data(), a.size()) && read_exact(in, b.data(), b.size()) &&
            read_exact(in, s0.data(), s0.size() * 4) && read_exact(in, dy.data(), dy.size()) &&
            read_exact(in, dsT.data(), dsT.size() * 4);
  std::fclose(in);
  if (!ok) { std::fprintf(stderr, "short input\n"); return 2; }

  auto poison = [](size_t bytes) { return std::vector<char>(bytes, (char)0xFF); };
  std::vector<char> y = poison(n * el), dr = poison(n * el), dw = poison(n * wel), dk = poison(n * el),
                    dv = poison(n * el), da = poison(n * el), db = poison(n * el);
  std::vector<float> sT(ns), ds0(ns), ckpt((size_t)B * H * wkv7::num_ckpt(T) * N * N), sa(n);
  const int variant = wkv7::resolve_bwd_variant(wkv7::kBwdAuto);  // KAGGLETRAIN_WKV_BWD=old|new|chunk|fused|scan
  const int split = wkv7::resolve_split(0, (long long)B * H);      // KAGGLETRAIN_WKV_SPLIT=1|2|4|auto
  std::vector<float> scratch((size_t)wkv7::bwd_scratch_floats(B, T, H, N, variant));
  for (auto* vec : {&sT, &ds0, &ckpt, &sa, &scratch})
    std::fill(vec->begin(), vec->end(), __uint_as_float(0xFFFFFFFFu));

  wkv7::FwdArgs fa;
  fa.B = B; fa.T = T; fa.H = H; fa.N = N; fa.dtype = dtype; fa.w_f32 = w_f32;
  fa.r = r.data(); fa.w = w.data(); fa.k = k.data(); fa.v = v.data(); fa.a = a.data(); fa.b = b.data();
  fa.s0 = has_s0 ? s0.data() : nullptr;
  fa.y = y.data(); fa.sT = sT.data(); fa.ckpt = ckpt.data(); fa.sa = sa.data();
  fa.split = split;
  if (int e = wkv7::forward(fa, nullptr)) { std::fprintf(stderr, "forward failed: %d\n", e); return 1; }

  wkv7::BwdArgs ba;
  ba.B = B; ba.T = T; ba.H = H; ba.N = N; ba.dtype = dtype; ba.w_f32 = w_f32;
  ba.r = r.data(); ba.w = w.data(); ba.k = k.data(); ba.v = v.data(); ba.a = a.data(); ba.b = b.data();
  ba.dy = dy.data(); ba.dsT = has_dsT ? dsT.data() : nullptr;
  ba.ckpt = ckpt.data(); ba.sa = sa.data(); ba.scratch = scratch.data();
  ba.dr = dr.data(); ba.dw = dw.data(); ba.dk = dk.data(); ba.dv = dv.data(); ba.da = da.data(); ba.db = db.data();
  ba.ds0 = ds0.data();
  ba.variant = variant;
  ba.split = split;
  if (int e = wkv7::backward(ba, nullptr)) { std::fprintf(stderr, "backward failed: %d\n", e); return 1; }

  FILE* out = std::fopen(argv[2], "wb");
  if (!out) { std::perror("open OUT"); return 2; }
  auto put = [&](const void* p, size_t bytes) { return std::fwrite(p, 1, bytes, out) == bytes; };
  ok = put(y.data(), y.size()) && put(sT.data(), ns * 4) && put(dr.data(), dr.size()) && put(dw.data(), dw.size()) &&
       put(dk.data(), dk.size()) && put(dv.data(), dv.size()) && put(da.data(), da.size()) &&
       put(db.data(), db.size()) && put(ds0.data(), ns * 4);
  std::fclose(out);
  return ok ? 0 : 2;
}
