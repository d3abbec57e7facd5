// The torch binding (wkv7_torch.cpp) over the CPU emulation of the kernels (cuda_emu.h): one translation unit,
// built by rwkv_cuda/emulated.py for tests of the CUDA path on machines without a GPU. Torch's headers come
// first, so the emulator's CUDA-named macros never reach them.
#include <torch/extension.h>

#ifndef WKV7_EMU
#define WKV7_EMU 1
#endif
#include "wkv7.cu"
#include "wkv7_torch.cpp"
