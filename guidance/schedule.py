"""The one place that owns noise-schedule math: alpha-bar, noising, x0 prediction and the DDPM posterior.

Coefficients are kept in float64 on the CPU and indexed by an integer timestep, so every loss gets
exact Python floats and never mixes dtypes or devices.
"""
from __future__ import annotations

import math

import torch

WEIGHTINGS = ("uniform", "dreamfusion")


class NoiseSchedule:
    """DDPM variance schedule: betas, alphas_cumprod and the formulas built on them."""

    def __init__(self, betas: torch.Tensor):
        self.betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_train_timesteps = len(self.betas)

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_train_timesteps: int = 1000) -> "NoiseSchedule":
        """Return Stable Diffusion's schedule: betas linear in sqrt-space from beta_start to beta_end."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(betas)

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """Return the schedule of a diffusers scheduler (its betas, recomputed in float64)."""
        cfg = scheduler.config
        if cfg.get("trained_betas") is None and cfg.get("beta_schedule") == "scaled_linear":
            return cls.scaled_linear(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
        return cls(scheduler.betas)

    def alpha_bar(self, t: int) -> float:
        """Return alpha-bar_t = prod_{s<=t} (1 - beta_s); alpha-bar_{-1} = 1 (clean data)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def weight(self, t: int, weighting: str = "uniform") -> float:
        """Return the SDS/VSD weight w(t): 1 ('uniform', the course's) or 1 - alpha-bar_t ('dreamfusion')."""
        if weighting == "uniform":
            return 1.0
        if weighting == "dreamfusion":
            return 1.0 - self.alpha_bar(t)
        raise ValueError(f"unknown weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Return x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self.alpha_bar(t)
        return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Return the Tweedie estimate x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = self.alpha_bar(t)
        return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
        """Return eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, for v-prediction models."""
        abar = self.alpha_bar(t)
        return math.sqrt(abar) * v + math.sqrt(1.0 - abar) * x_t

    def eps_from_v_table(self) -> torch.Tensor:
        """Return the [T, 2] float64 table of eps_from_v's coefficients (sqrt(abar_t), sqrt(1 - abar_t)) for every t."""
        return torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()], dim=1)

    def posterior_coefficients(self, t: int, t_prev: int) -> tuple[float, float, float]:
        """Return (c_x0, c_xt, sigma_t) of q(x_{t_prev} | x_t, x0) = N(c_x0 x0 + c_xt x_t, sigma_t^2 I).

        With alpha_t = abar_t / abar_{t_prev} and beta_t = 1 - alpha_t (DDPM eq. 7):
        c_x0 = sqrt(abar_{t_prev}) beta_t / (1 - abar_t), c_xt = sqrt(alpha_t) (1 - abar_{t_prev}) / (1 - abar_t),
        sigma_t^2 = (1 - abar_{t_prev}) / (1 - abar_t) * beta_t.
        """
        if not 0 <= t_prev < t < self.num_train_timesteps:
            raise ValueError(f"posterior needs 0 <= t_prev < t < {self.num_train_timesteps}, got t={t}, t_prev={t_prev}")
        abar_t, abar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha_t = abar_t / abar_prev
        beta_t = 1.0 - alpha_t
        c_x0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar_t)
        c_xt = math.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
        sigma_t = math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * beta_t)
        return c_x0, c_xt, sigma_t

    def posterior_mean(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """Return mu(x_t, x0_hat) = c_x0 x0_hat + c_xt x_t, the mean of q(x_{t_prev} | x_t, x0_hat)."""
        c_x0, c_xt, _ = self.posterior_coefficients(t, t_prev)
        return c_x0 * x0_hat + c_xt * x_t

    def posterior_std(self, t: int, t_prev: int) -> float:
        """Return sigma_t, the standard deviation of q(x_{t_prev} | x_t, x0)."""
        return self.posterior_coefficients(t, t_prev)[2]
