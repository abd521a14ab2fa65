"""Exact per-subspace epsilon for DVDP's process (and subspace diffusion's) on Gaussian data N(m, S).

In stage k the state is x_t^k = L_t y + Σ_t ε with y = D^k x0 ~ N(D^k m, D^k S D^kᵀ), L_t = Σ_i λ̄_{i,t} Π_i and
Σ_t = Σ_i σ̄_{i,t} Π_i (Π_i: orthogonal projection onto subspace i at stage k's resolution, i ≥ k). L_t and Σ_t
are symmetric, so E[ε | x] = Σ_t C_t⁻¹ (x − L_t D^k m) with C_t = L_t S_k L_t + Σ_t². The projections are built
by applying the method's own ``subspace_components`` to the identity, so the oracle shares no formula with the
schedule it tests except the decomposition itself. Written by hand: no library ships a closed-form denoiser.
"""

from __future__ import annotations

import torch
from torch import nn

from diffaccel.errors import UserError
from diffaccel.methods.dvdp import DVDP, down, subspace_components


class DVDPExactEpsilon(nn.Module):
    """``net(x_t^k, t)`` at stage k's resolution H/2^k, as DVDP's (or subspace diffusion's) sampler calls its network."""

    def __init__(self, method: DVDP, mean: torch.Tensor, cov: torch.Tensor, shape: tuple[int, int, int]):
        super().__init__()
        C, H, W = shape
        d = C * H * W
        if mean.numel() != d or cov.shape != (d, d):
            raise UserError(f"mean and covariance must have {d} and {d}x{d} values for images {tuple(shape)}, "
                            f"got {mean.numel()} and {tuple(cov.shape)}")
        method.check_image_size(H, W)
        self.method, self.shape = method, (C, H, W)
        eye = torch.eye(d, dtype=torch.float64).view(d, C, H, W)
        basis = eye                                        # rows of D^k: images of the identity under D^k
        self._stages = []
        for k in range(method.K + 1):
            dk = basis[0].numel()
            down_k = basis.flatten(1).T                    # [d_k, d]: D^k as a matrix
            unit = torch.eye(dk, dtype=torch.float64).view(dk, *basis.shape[1:])
            proj = torch.stack([c.flatten(1) for c in subspace_components(unit, k, method.K)])  # [K+1−k, d_k, d_k]
            self._stages.append((down_k @ mean.double().flatten(), down_k @ cov.double() @ down_k.T, proj))
            if k < method.K:
                basis = down(basis)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        steps = t.round().long()
        if (steps < 1).any() or (steps > self.method.T).any():
            raise UserError(f"time steps must lie in 1..{self.method.T}")
        out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        flat = x.double().flatten(1)
        for step in steps.unique().tolist():
            k = int(self.method.stage(torch.tensor([step])))
            mean_k, cov_k, proj = self._stages[k]
            if flat.shape[1] != mean_k.numel():
                raise UserError(f"time step {step} is in stage {k}, whose images have {mean_k.numel()} values; "
                                f"got {flat.shape[1]}")
            lam = self.method.lam[k:, step].double()
            sig = self.method.sig[k:, step].double()
            L = torch.einsum("i,ijk->jk", lam, proj)
            S = torch.einsum("i,ijk->jk", sig, proj)
            cov_x = L @ cov_k @ L + S @ S
            rows = steps == step
            centred = flat[rows] - L @ mean_k
            out[rows] = (S @ torch.linalg.solve(cov_x, centred.T)).T.reshape(out[rows].shape)
        return out.to(x.dtype)
