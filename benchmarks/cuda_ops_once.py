"""Run every op once on the ``cuda`` backend (and its backward where it has one).

Meant to be run under ``compute-sanitizer --tool memcheck`` by ``scripts/gpu_session.sh``:
small odd shapes, both layouts, fp16/bf16/fp32, k 3/5/7, stride 1/2. Exits 1 if an op
raised, 0 otherwise (memory errors are the sanitizer's to report).
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    """Run the ops; print one line per failure."""
    from effnet_kernels import ops

    dev = torch.device("cuda")
    failures = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for fmt in (torch.channels_last, torch.contiguous_format):
            for k, stride in ((3, 1), (5, 2), (7, 1)):
                n, c, h, w = 3, 13, 11, 9
                x = torch.randn(n, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                weight = torch.randn(c, 1, k, k, device=dev, requires_grad=True)
                scale = torch.rand(c, device=dev, requires_grad=True)
                shift = torch.randn(c, device=dev, requires_grad=True)
                r = 5
                wr, br = torch.randn(r, c, device=dev), torch.randn(r, device=dev)
                we, be = torch.randn(c, r, device=dev), torch.randn(c, device=dev)
                try:
                    y, mean = ops.dwconv_bn_act(x, weight, scale, shift, stride=stride, squeeze=True, backend="cuda")
                    gate = ops.se_gate(mean, wr, br, we, be, backend="cuda")
                    out = ops.se_excite(y, gate, backend="cuda")
                    out.float().square().sum().backward()
                    torch.cuda.synchronize()
                except Exception as exc:  # report and go on: the sanitizer log is the point
                    failures += 1
                    print(f"FAILED {dtype} {fmt} k={k} s={stride}: {type(exc).__name__}: {exc}", flush=True)
    print(f"cuda ops run once per configuration; {failures} raised", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
