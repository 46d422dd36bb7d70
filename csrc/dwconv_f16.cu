// dwconv_bn_act template instances for __half (one file per dtype so ninja compiles them in parallel).
#include "dwconv_kernels.cuh"

namespace effnet {
EFFNET_INSTANTIATE_DWCONV(, __half)
}  // namespace effnet
