// Thin torch binding of the CUDA stitch kernel: validation (shared with the CPU kernel), output
// allocation and the current stream from c10; the kernel itself is torch-free (stitch_kernel.cu).
// Built only when the installed torch has CUDA and nvcc is present (see setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../stitch_common.h"
#include "stitch_kernel.h"

namespace krypton {
namespace {

void run_cuda(const StitchInputs& in, at::Tensor& out, double pad_value) {
  TORCH_CHECK(in.mat.is_cuda(), "krypton::stitch (CUDA kernel): tensors must be on a CUDA device, got ",
              in.mat.device());
  if (in.B == 0 || in.C == 0 || out.size(2) == 0 || out.size(3) == 0) return;
  const c10::cuda::CUDAGuard guard(in.mat.device());
  KryptonStitchArgs a{};
  a.mat = in.mat.data_ptr();
  a.mat_sc = in.mat.stride(0);
  a.mat_sh = in.mat.stride(1);
  a.mat_sw = in.mat.stride(2);
  a.C = in.C;
  a.H = in.H;
  a.W = in.W;
  a.patch = in.patch.numel() > 0 ? in.patch.data_ptr() : nullptr;
  a.patch_sb = in.patch.stride(0);
  a.patch_sc = in.patch.stride(1);
  a.patch_sh = in.patch.stride(2);
  a.patch_sw = in.patch.stride(3);
  a.ph = in.ph;
  a.pw = in.pw;
  a.patch_origin = in.patch_origin.data_ptr<int64_t>();
  a.window_origin = in.window_origin.data_ptr<int64_t>();
  a.out = out.data_ptr();
  a.out_sb = out.stride(0);
  a.out_sc = out.stride(1);
  a.out_sh = out.stride(2);
  a.out_sw = out.stride(3);
  a.B = in.B;
  a.Hr = out.size(2);
  a.Wr = out.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(in.mat.device().index()).stream();
  const int err = krypton_stitch_cuda_launch(&a, static_cast<int>(in.mat.element_size()),
                                             pad_bits(pad_value, in.mat.scalar_type()), stream);
  TORCH_CHECK(err == 0, "krypton::stitch: CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor stitch_cuda(const at::Tensor& materialized, const at::Tensor& patch,
                       const at::Tensor& patch_origin, const at::Tensor& window_origin,
                       int64_t window_h, int64_t window_w, double pad_value) {
  check_window(window_h, window_w);
  StitchInputs in = check_stitch_inputs(materialized, patch, patch_origin, window_origin);
  at::Tensor out = at::empty({in.B, in.C, window_h, window_w},
                             patch.options().memory_format(stitch_output_format(in)));
  run_cuda(in, out, pad_value);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(krypton, CUDA, m) {
  m.impl("stitch", &stitch_cuda);
}

}  // namespace krypton
