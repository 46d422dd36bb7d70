// Host-shim stand-in for <cuda_runtime.h>: everything lives in ek_shim.h.
#pragma once
#include "ek_shim.h"
