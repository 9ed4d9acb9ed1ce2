"""``python -m scale_kernels``: report the backends and check each usable one against the reference."""

from __future__ import annotations

import torch

from . import available_backends, upscaled_linear, upscaled_linear_reference


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32
    print(f"scale_kernels self-check on {device} ({dtype})")
    g = torch.Generator().manual_seed(0)
    M, d_in, e_in, d_out, e_out = 37, 45, 19, 53, 11

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    args = (rnd(M, d_in + e_in), rnd(d_out, d_in), rnd(e_out, d_in), rnd(e_out, e_in), rnd(d_out, e_in),
            rnd(d_out), rnd(e_out), torch.rand(M, generator=g).to(device) < 0.5)  # fmt: skip
    ref = upscaled_linear_reference(*(a.double() if a.is_floating_point() else a for a in args))
    for name, reason in available_backends(device, dtype).items():
        if reason is not None:
            print(f"  {name:7s} unavailable: {reason}")
            continue
        err = (upscaled_linear(*args, backend=name).double() - ref).abs().max().item()
        print(f"  {name:7s} max |y - y_fp64| = {err:.2e}")


if __name__ == "__main__":
    main()
