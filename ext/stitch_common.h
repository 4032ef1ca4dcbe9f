// Shared (device-independent) part of the krypton::stitch op: input validation and output
// allocation rules. Included by the CPU translation unit (stitch.cpp) and by the CUDA binding
// (cuda/stitch_cuda.cpp) so that both devices accept and reject exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace krypton {

// Validated, device-independent view of one stitch call. `mat` is always 3-d [C,H,W].
struct StitchInputs {
  at::Tensor mat;            // [C,H,W] (a view of the caller's tensor, strides kept)
  at::Tensor patch;          // [B,C,ph,pw]
  at::Tensor patch_origin;   // [B,2] int64, contiguous
  at::Tensor window_origin;  // [B,2] int64, contiguous
  int64_t B, C, H, W, ph, pw;
};

inline StitchInputs check_stitch_inputs(const at::Tensor& materialized, const at::Tensor& patch,
                                        const at::Tensor& patch_origin,
                                        const at::Tensor& window_origin) {
  TORCH_CHECK(materialized.layout() == at::kStrided && patch.layout() == at::kStrided,
              "krypton::stitch: materialized and patch must be dense (strided) tensors");
  TORCH_CHECK(materialized.dim() == 3 || (materialized.dim() == 4 && materialized.size(0) == 1),
              "krypton::stitch: materialized must be [C,H,W] or [1,C,H,W], got shape ",
              materialized.sizes());
  TORCH_CHECK(patch.dim() == 4, "krypton::stitch: patch must be [B,C,ph,pw], got shape ",
              patch.sizes());
  TORCH_CHECK(at::isFloatingType(materialized.scalar_type()),
              "krypton::stitch: materialized must be a floating tensor (float32, float64, float16, "
              "bfloat16), got ", materialized.scalar_type());
  TORCH_CHECK(patch.scalar_type() == materialized.scalar_type(),
              "krypton::stitch: patch dtype (", patch.scalar_type(),
              ") must match materialized dtype (", materialized.scalar_type(), ")");
  TORCH_CHECK(patch.device() == materialized.device(), "krypton::stitch: patch is on ",
              patch.device(), " but materialized is on ", materialized.device());

  at::Tensor mat = materialized.dim() == 4 ? materialized.select(0, 0) : materialized;
  const int64_t B = patch.size(0);
  TORCH_CHECK(patch.size(1) == mat.size(0), "krypton::stitch: patch has ", patch.size(1),
              " channels but materialized has ", mat.size(0), " (patch shape ", patch.sizes(),
              ", materialized shape ", materialized.sizes(), ")");

  auto check_origin = [&](const at::Tensor& o, const char* name) {
    TORCH_CHECK(o.scalar_type() == at::kLong, "krypton::stitch: ", name,
                " must be int64 (torch.long), got ", o.scalar_type());
    TORCH_CHECK(o.dim() == 2 && o.size(0) == B && o.size(1) == 2, "krypton::stitch: ", name,
                " must have shape [B,2] = [", B, ",2] (rows of (y, x)), got ", o.sizes());
    TORCH_CHECK(o.device() == materialized.device(), "krypton::stitch: ", name, " is on ",
                o.device(), " but the data is on ", materialized.device(),
                " (keep the origins on the data's device)");
  };
  check_origin(patch_origin, "patch_origin");
  check_origin(window_origin, "window_origin");

  return StitchInputs{mat,
                      patch,
                      patch_origin.contiguous(),
                      window_origin.contiguous(),
                      B,
                      mat.size(0),
                      mat.size(1),
                      mat.size(2),
                      patch.size(2),
                      patch.size(3)};
}

inline void check_window(int64_t window_h, int64_t window_w) {
  TORCH_CHECK(window_h >= 0 && window_w >= 0,
              "krypton::stitch: window_h and window_w must be >= 0, got (", window_h, ", ",
              window_w, ")");
}

// The output of `stitch` follows the patch's memory format (the patch is usually the output of
// the previous incremental layer, so this keeps a channels_last pipeline channels_last); an empty
// batch, or an ambiguous / contiguous patch, gives a contiguous output.
inline at::MemoryFormat stitch_output_format(const StitchInputs& in) {
  if (in.B > 0 && in.patch.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// pad_value converted to the tensor's dtype, returned as raw bits (the kernels only copy bytes).
inline uint64_t pad_bits(double pad_value, at::ScalarType dtype) {
  uint64_t bits = 0;
  switch (dtype) {
    case at::kDouble: { double v = pad_value; std::memcpy(&bits, &v, sizeof v); break; }
    case at::kFloat: { float v = static_cast<float>(pad_value); std::memcpy(&bits, &v, sizeof v); break; }
    case at::kHalf: { at::Half v = static_cast<at::Half>(pad_value); std::memcpy(&bits, &v, sizeof v); break; }
    case at::kBFloat16: { at::BFloat16 v = static_cast<at::BFloat16>(pad_value); std::memcpy(&bits, &v, sizeof v); break; }
    default: TORCH_CHECK(false, "krypton::stitch: unsupported dtype ", dtype,
                         " (supported: float32, float64, float16, bfloat16)");
  }
  return bits;
}

}  // namespace krypton
