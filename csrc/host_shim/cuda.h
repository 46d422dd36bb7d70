// Host-shim stand-in for <cuda.h>: everything lives in ek_shim.h.
#pragma once
#include "ek_shim.h"
