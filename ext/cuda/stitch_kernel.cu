// CUDA kernel of krypton::stitch, torch-free (see stitch_kernel.h). One thread per output element
// in a grid-stride loop. The linear index is decomposed in the output's memory order (channels
// innermost for a channels_last output, columns innermost otherwise) so that neighbouring threads
// write neighbouring addresses. Each value comes from the pad value, position b's patch, or the
// shared materialized tensor. Index math uses 32-bit integers when every offset fits.
#include "stitch_kernel.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

template <typename T, typename I, bool kChannelsInner>
__global__ void stitch_kernel(KryptonStitchArgs a, T pad) {
  const I C = static_cast<I>(a.C), H = static_cast<I>(a.H), W = static_cast<I>(a.W);
  const I Hr = static_cast<I>(a.Hr), Wr = static_cast<I>(a.Wr);
  const I ph = static_cast<I>(a.ph), pw = static_cast<I>(a.pw);
  const I total = static_cast<I>(a.B) * C * Hr * Wr;
  const T* __restrict__ mat = static_cast<const T*>(a.mat);
  const T* __restrict__ patch = static_cast<const T*>(a.patch);
  T* __restrict__ out = static_cast<T*>(a.out);

  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<I>(blockDim.x) * gridDim.x) {
    I b, c, i, j, t;
    if (kChannelsInner) {
      c = idx % C; t = idx / C;
      j = t % Wr; t = t / Wr;
      i = t % Hr; b = t / Hr;
    } else {
      j = idx % Wr; t = idx / Wr;
      i = t % Hr; t = t / Hr;
      c = t % C; b = t / C;
    }
    // Origins may be negative or far outside: keep them in int64 until the bounds tests pass.
    const int64_t y = a.window_origin[2 * b] + i;
    const int64_t x = a.window_origin[2 * b + 1] + j;
    T v = pad;
    if (y >= 0 && y < H && x >= 0 && x < W) {
      const int64_t ry = y - a.patch_origin[2 * b];
      const int64_t rx = x - a.patch_origin[2 * b + 1];
      if (ry >= 0 && ry < ph && rx >= 0 && rx < pw) {
        v = patch[b * static_cast<I>(a.patch_sb) + c * static_cast<I>(a.patch_sc) +
                  static_cast<I>(ry) * static_cast<I>(a.patch_sh) +
                  static_cast<I>(rx) * static_cast<I>(a.patch_sw)];
      } else {
        v = mat[c * static_cast<I>(a.mat_sc) + static_cast<I>(y) * static_cast<I>(a.mat_sh) +
                static_cast<I>(x) * static_cast<I>(a.mat_sw)];
      }
    }
    out[b * static_cast<I>(a.out_sb) + c * static_cast<I>(a.out_sc) +
        i * static_cast<I>(a.out_sh) + j * static_cast<I>(a.out_sw)] = v;
  }
}

// Largest element offset reachable in a tensor with these sizes and (non-negative) strides.
int64_t max_offset(const int64_t* sizes, const int64_t* strides, int n) {
  int64_t m = 0;
  for (int k = 0; k < n; ++k) {
    if (sizes[k] == 0) return 0;
    m += (sizes[k] - 1) * (strides[k] < 0 ? -strides[k] : strides[k]);
  }
  return m;
}

template <typename T, typename I>
cudaError_t launch_typed(const KryptonStitchArgs& a, T pad, cudaStream_t stream) {
  const int64_t total = a.B * a.C * a.Hr * a.Wr;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535LL * 32) blocks = 65535LL * 32;  // grid-stride loop covers the rest
  // channels innermost when the output is channels_last (unit channel stride, pixel stride != 1)
  const bool channels_inner = a.C > 1 && a.out_sc == 1 && a.out_sw != 1;
  if (channels_inner) {
    stitch_kernel<T, I, true><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a, pad);
  } else {
    stitch_kernel<T, I, false><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a, pad);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_width(const KryptonStitchArgs& a, uint64_t pad_bits, cudaStream_t stream) {
  T pad;
  static_assert(sizeof(T) <= sizeof(uint64_t), "element too wide");
  pad = static_cast<T>(pad_bits);  // low bytes hold the value (little-endian bit pattern)
  const int64_t ms[3] = {a.C, a.H, a.W}, mst[3] = {a.mat_sc, a.mat_sh, a.mat_sw};
  const int64_t ps[4] = {a.B, a.C, a.ph, a.pw},
                pst[4] = {a.patch_sb, a.patch_sc, a.patch_sh, a.patch_sw};
  const int64_t os[4] = {a.B, a.C, a.Hr, a.Wr}, ost[4] = {a.out_sb, a.out_sc, a.out_sh, a.out_sw};
  // 32-bit indices need every offset < 2^31 and idx + grid stride (< 2^29) never to overflow.
  const int64_t lim = int64_t{1} << 31;
  const bool fits32 = a.B * a.C * a.Hr * a.Wr < (int64_t{1} << 30) && max_offset(ms, mst, 3) < lim &&
                      max_offset(ps, pst, 4) < lim && max_offset(os, ost, 4) < lim;
  return fits32 ? launch_typed<T, int32_t>(a, pad, stream)
                : launch_typed<T, int64_t>(a, pad, stream);
}

}  // namespace

extern "C" int krypton_stitch_cuda_launch(const KryptonStitchArgs* args, int elem_size,
                                          uint64_t pad_bits, cudaStream_t stream) {
  if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const KryptonStitchArgs& a = *args;
  if (a.B <= 0 || a.C <= 0 || a.Hr <= 0 || a.Wr <= 0) return static_cast<int>(cudaSuccess);
  switch (elem_size) {
    case 2: return static_cast<int>(launch_width<uint16_t>(a, pad_bits, stream));
    case 4: return static_cast<int>(launch_width<uint32_t>(a, pad_bits, stream));
    case 8: return static_cast<int>(launch_width<uint64_t>(a, pad_bits, stream));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
