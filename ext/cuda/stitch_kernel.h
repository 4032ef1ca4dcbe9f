// Torch-free interface of the CUDA stitch kernel (ext/cuda/stitch_kernel.cu). Only raw pointers,
// sizes and strides (in elements) cross this boundary, so the kernel compiles with a bare nvcc and
// the torch binding (stitch_cuda.cpp) is the only file that needs torch's CUDA headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

extern "C" {

struct KryptonStitchArgs {
  const void* mat;  // materialized [C,H,W]
  int64_t mat_sc, mat_sh, mat_sw;
  int64_t C, H, W;
  const void* patch;  // [B,C,ph,pw]; may be null when ph*pw == 0
  int64_t patch_sb, patch_sc, patch_sh, patch_sw;
  int64_t ph, pw;
  const int64_t* patch_origin;   // [B,2] contiguous (y, x), device memory
  const int64_t* window_origin;  // [B,2] contiguous (y, x), device memory
  void* out;                     // [B,C,Hr,Wr]
  int64_t out_sb, out_sc, out_sh, out_sw;
  int64_t B, Hr, Wr;
};

// Launches the kernel on `stream` for elements of `elem_size` bytes (2, 4 or 8: the kernel only
// copies bits; pad_bits holds the pad value already converted to the dtype, in its low bytes).
// Returns a cudaError_t as int (0 = cudaSuccess); cudaErrorInvalidValue for a bad elem_size.
int krypton_stitch_cuda_launch(const KryptonStitchArgs* args, int elem_size, uint64_t pad_bits,
                               cudaStream_t stream);

}  // extern "C"
