// dwconv_bn_act template instances for __nv_bfloat16 (one file per dtype so ninja compiles them in parallel).
#include "dwconv_kernels.cuh"

namespace effnet {
EFFNET_INSTANTIATE_DWCONV(, __nv_bfloat16)
}  // namespace effnet
