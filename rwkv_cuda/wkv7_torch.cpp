// Torch binding of the WKV-7 kernels: argument checks, allocation, stream and device; the math is in
// wkv7.cu. Built by rwkv_cuda/loader.py with torch.utils.cpp_extension.load (a pybind11 module).
// With WKV7_EMU (wkv7_emu_torch.cpp, built by rwkv_cuda/emulated.py) the same binding runs the kernels
// through the CPU emulator, on CPU tensors: the CUDA path's Python side can then be tested without a GPU.
#include <torch/extension.h>

#include <vector>

#ifdef WKV7_EMU
#include <mutex>
#define WKV7_ON_DEVICE(t) (t).is_cpu()
#define WKV7_DEVICE "a CPU tensor (emulated kernel)"
#define WKV7_GUARD(t) const std::lock_guard<std::mutex> guard(emu_mutex())  // one emulator state per process
#define WKV7_STREAM nullptr
namespace {
std::mutex& emu_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace
#else
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#define WKV7_ON_DEVICE(t) (t).is_cuda()
#define WKV7_DEVICE "a CUDA tensor"
#define WKV7_GUARD(t) const c10::cuda::CUDAGuard guard((t).device())
#define WKV7_STREAM c10::cuda::getCurrentCUDAStream().stream()
#endif

#include "wkv7_api.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return wkv7::kF32;
    case at::kHalf: return wkv7::kF16;
    case at::kBFloat16: return wkv7::kBF16;
    default: TORCH_CHECK(false, "wkv7: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check_io(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(WKV7_ON_DEVICE(t), "wkv7: ", name, " must be ", WKV7_DEVICE);
  TORCH_CHECK(t.device() == ref.device(), "wkv7: ", name, " is on another device than r");
  TORCH_CHECK(t.sizes() == ref.sizes(), "wkv7: ", name, " has shape ", t.sizes(), ", expected ", ref.sizes());
  TORCH_CHECK(t.is_contiguous(), "wkv7: ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "wkv7: ", name, " must be 16-byte aligned");
}

void check_state(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  const auto s = ref.sizes();
  TORCH_CHECK(WKV7_ON_DEVICE(t) && t.device() == ref.device(), "wkv7: ", name, " must be on r's device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "wkv7: ", name, " must be float32");
  TORCH_CHECK(t.dim() == 4 && t.size(0) == s[0] && t.size(1) == s[2] && t.size(2) == s[3] && t.size(3) == s[3],
              "wkv7: ", name, " must be [B, H, N, N], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "wkv7: ", name, " must be contiguous and 16-byte aligned");
}

void check_inputs(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be [B, T, H, N]");
  const int dt = dtype_code(r);
  TORCH_CHECK(wkv7::supported((int)r.size(3), dt), "wkv7: head size ", r.size(3), " / dtype ", r.scalar_type(),
              " not compiled into this build");
  TORCH_CHECK(r.numel() < (1LL << 40), "wkv7: tensor too large");
  check_io(r, "r", r);
  auto same_as_r = [&](const at::Tensor& t, const char* name) {
    check_io(t, name, r);
    TORCH_CHECK(t.scalar_type() == r.scalar_type(), "wkv7: ", name, " must have r's dtype");
  };
  same_as_r(k, "k");
  same_as_r(v, "v");
  same_as_r(a, "a");
  same_as_r(b, "b");
  check_io(w, "w", r);
  TORCH_CHECK(w.scalar_type() == r.scalar_type() || w.scalar_type() == at::kFloat,
              "wkv7: w must have r's dtype or be float32");
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "wkv7: ", what, " launch failed: ", cudaGetErrorString((cudaError_t)err));
}

// Returns [y, sT, ckpt, sa]; ckpt and sa are empty unless `save` (training).
std::vector<at::Tensor> forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& s0,
                                bool save) {
  check_inputs(r, w, k, v, a, b);
  if (s0) check_state(*s0, "state", r);
  WKV7_GUARD(r);
  const int B = (int)r.size(0), T = (int)r.size(1), H = (int)r.size(2), N = (int)r.size(3);
  const auto f32 = r.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(r);
  at::Tensor sT = at::empty({B, H, N, N}, f32);
  at::Tensor ckpt = save ? at::empty({B, H, wkv7::num_ckpt(T), N, N}, f32) : at::empty({0}, f32);
  at::Tensor sa = save ? at::empty({B, T, H, N}, f32) : at::empty({0}, f32);

  wkv7::FwdArgs p;
  p.B = B; p.T = T; p.H = H; p.N = N;
  p.dtype = dtype_code(r);
  p.w_f32 = w.scalar_type() != r.scalar_type();
  p.r = r.data_ptr(); p.w = w.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.a = a.data_ptr(); p.b = b.data_ptr();
  p.s0 = s0 ? s0->data_ptr<float>() : nullptr;
  p.y = y.data_ptr(); p.sT = sT.data_ptr<float>();
  p.ckpt = save ? ckpt.data_ptr<float>() : nullptr;
  p.sa = save ? sa.data_ptr<float>() : nullptr;
  check_launch(wkv7::forward(p, WKV7_STREAM), "forward");
  return {y, sT, ckpt, sa};
}

// Returns [dr, dw, dk, dv, da, db, ds0]; ds0 is empty unless need_ds0.
std::vector<at::Tensor> backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& a, const at::Tensor& b, const at::Tensor& dy,
                                 const c10::optional<at::Tensor>& dsT, const at::Tensor& ckpt, const at::Tensor& sa,
                                 bool need_ds0) {
  check_inputs(r, w, k, v, a, b);
  check_io(dy, "dy", r);
  TORCH_CHECK(dy.scalar_type() == r.scalar_type(), "wkv7: dy must have r's dtype");
  if (dsT) check_state(*dsT, "final-state gradient", r);
  const int B = (int)r.size(0), T = (int)r.size(1), H = (int)r.size(2), N = (int)r.size(3);
  TORCH_CHECK(WKV7_ON_DEVICE(ckpt) && ckpt.scalar_type() == at::kFloat && ckpt.is_contiguous() &&
                  ckpt.numel() == (int64_t)B * H * wkv7::num_ckpt(T) * N * N,
              "wkv7: bad checkpoint tensor");
  TORCH_CHECK(WKV7_ON_DEVICE(sa) && sa.scalar_type() == at::kFloat && sa.is_contiguous() && sa.numel() == r.numel(),
              "wkv7: bad sa tensor");
  WKV7_GUARD(r);
  const auto f32 = r.options().dtype(at::kFloat);
  at::Tensor dr = at::empty_like(r), dw = at::empty_like(w), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor da = at::empty_like(a), db = at::empty_like(b);
  at::Tensor ds0 = need_ds0 ? at::empty({B, H, N, N}, f32) : at::empty({0}, f32);
  const int variant = wkv7::resolve_bwd_variant(wkv7::kBwdAuto);  // KAGGLETRAIN_WKV_BWD, read per call
  at::Tensor scratch = at::empty({(int64_t)wkv7::bwd_scratch_floats(B, T, H, N, variant)}, f32);

  wkv7::BwdArgs p;
  p.B = B; p.T = T; p.H = H; p.N = N;
  p.dtype = dtype_code(r);
  p.w_f32 = w.scalar_type() != r.scalar_type();
  p.r = r.data_ptr(); p.w = w.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.a = a.data_ptr(); p.b = b.data_ptr();
  p.dy = dy.data_ptr();
  p.dsT = dsT ? dsT->data_ptr<float>() : nullptr;
  p.ckpt = ckpt.data_ptr<float>(); p.sa = sa.data_ptr<float>(); p.scratch = scratch.data_ptr<float>();
  p.dr = dr.data_ptr(); p.dw = dw.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr(); p.da = da.data_ptr();
  p.db = db.data_ptr();
  p.ds0 = need_ds0 ? ds0.data_ptr<float>() : nullptr;
  p.variant = variant;
  check_launch(wkv7::backward(p, WKV7_STREAM), "backward");
  return {dr, dw, dk, dv, da, db, ds0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-7 WKV CUDA kernels (kaggletrain rwkv_cuda)";
  m.def("forward", &forward, "WKV-7 forward: (r, w, k, v, a, b, s0|None, save) -> [y, sT, ckpt, sa]");
  m.def("backward", &backward,
        "WKV-7 backward: (r, w, k, v, a, b, dy, dsT|None, ckpt, sa, need_ds0) -> [dr, dw, dk, dv, da, db, ds0]");
  m.def("head_sizes", []() { return std::vector<int>{64}; });
  m.def("supported", [](int N, const std::string& dtype) {
    const int code = dtype == "float32" ? wkv7::kF32 : dtype == "float16" ? wkv7::kF16 : dtype == "bfloat16" ? wkv7::kBF16 : -1;
    return code >= 0 && wkv7::supported(N, code);
  });
  m.attr("ckpt_len") = wkv7::kCkptLen;
  m.def("bwd_variant", []() {
          const int v = wkv7::resolve_bwd_variant(wkv7::kBwdAuto);
          return std::string(v == wkv7::kBwdOld     ? "old"
                             : v == wkv7::kBwdChunk ? "chunk"
                             : v == wkv7::kBwdFused ? "fused"
                             : v == wkv7::kBwdScan  ? "scan"
                                                    : "new");
        },
        "the backward that runs now: KAGGLETRAIN_WKV_BWD=old|new|chunk|fused|scan, else the default");
  m.def("bwd_scratch_floats", [](int B, int T, int H, int N) {
          return wkv7::bwd_scratch_floats(B, T, H, N, wkv7::resolve_bwd_variant(wkv7::kBwdAuto));
        },
        "float32 scratch the backward that runs now allocates for this shape (memory_rehearsal.py mirrors it)");
  m.def("fwd_variant", []() { return std::string(wkv7::resolve_fwd_variant(wkv7::kFwdAuto) == wkv7::kFwdChunk ? "chunk" : "seq"); },
        "the forward that runs now: KAGGLETRAIN_WKV_FWD=seq|chunk (chunk only where built: sm_80+), else the default");
  m.def("split", [](int64_t BH) { return wkv7::resolve_split(0, (long long)BH); },
        "blocks per head the forward and the backward's row kernel use now for B*H heads on the current GPU: "
        "KAGGLETRAIN_WKV_SPLIT=1|2|4|auto, else 1");
}
