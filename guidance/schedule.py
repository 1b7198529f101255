"""The one place that owns the noise-path math: alpha_t, sigma_t, noising, x0 prediction, output -> eps, the
Gaussian posterior, the DDIM step and the weightings w(t).

A noise path gives, for each integer timestep t, the coefficients of x_t = alpha_t x + sigma_t eps. Every loss,
the CFG call, DDIM inversion and the PDS posterior are written with alpha_t and sigma_t only, so a path other
than DDPM's (rectified flow: alpha_t = 1 - t/T, sigma_t = t/T) plugs in by subclassing `NoiseSchedule` and
overriding `alpha` / `sigma` (and their tables). Coefficients are float64 on the CPU, indexed by an integer t,
so every loss gets exact Python floats and never mixes dtypes or devices. t = -1 means clean data
(alpha = 1, sigma = 0), the end point of a DDIM sampler.
"""
from __future__ import annotations

import math

import torch

# w(t) of the losses that weight their gradient: 1 (the course's), sigma_t^2 (DreamFusion's 1 - abar_t),
# sigma_t / alpha_t (ISM and SDI: it turns an eps difference into an x0 difference).
WEIGHTINGS = ("uniform", "dreamfusion", "sigma_over_alpha")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


class NoiseSchedule:
    """DDPM (variance-preserving) noise path: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

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

    # ----------------------------------------------------------------------------------------- the path
    def alpha_bar(self, t: int) -> float:
        """Return alpha-bar_t = prod_{s<=t} (1 - beta_s); alpha-bar_{-1} = 1 (clean data)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def alpha(self, t: int) -> float:
        """Return alpha_t, the signal coefficient of x_t = alpha_t x + sigma_t eps (1 at t = -1)."""
        return math.sqrt(self.alpha_bar(t))

    def sigma(self, t: int) -> float:
        """Return sigma_t, the noise coefficient of x_t = alpha_t x + sigma_t eps (0 at t = -1)."""
        return math.sqrt(1.0 - self.alpha_bar(t))

    def alpha_sigma_table(self) -> torch.Tensor:
        """Return the [T, 2] float64 table (alpha_t, sigma_t) for every t."""
        return torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()], dim=1)

    # ----------------------------------------------------------------------------------------- formulas
    def weight(self, t: int, weighting: str = "uniform") -> float:
        """Return w(t): 1 ('uniform'), sigma_t^2 ('dreamfusion', = 1 - abar_t) or sigma_t / alpha_t ('sigma_over_alpha')."""
        if weighting == "uniform":
            return 1.0
        if weighting == "dreamfusion":
            return self.sigma(t) ** 2
        if weighting == "sigma_over_alpha":
            return self.sigma(t) / self.alpha(t)
        raise ValueError(f"unknown weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Return x_t = alpha_t x0 + sigma_t noise."""
        return self.alpha(t) * x0 + self.sigma(t) * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Return the Tweedie estimate x0_hat = (x_t - sigma_t eps) / alpha_t."""
        return (x_t - self.sigma(t) * eps) / self.alpha(t)

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
        """Return the deterministic DDIM (eta 0) move from t to t_next: alpha_next x0_hat + sigma_next eps.

        t_next > t inverts (DDIM inversion), t_next < t samples; t_next = -1 returns x0_hat itself.
        """
        return self.alpha(t_next) * self.predict_x0(x_t, eps, t) + self.sigma(t_next) * eps

    def eps_coefficients(self, prediction_type: str) -> torch.Tensor:
        """Return the [T, 2] float64 table (a_t, b_t) with eps = a_t * output + b_t * x_t for a model's output type.

        epsilon: (1, 0); v-prediction (v = alpha eps - sigma x): (alpha_t, sigma_t);
        flow velocity (v = eps - x): eps = x_t + alpha_t v, i.e. (alpha_t, 1) (alpha_t = 1 - sigma_t on that path).
        """
        table = self.alpha_sigma_table()
        if prediction_type == "epsilon":
            return torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(self.num_train_timesteps, 2).clone()
        if prediction_type == "v_prediction":
            return table
        if prediction_type == "flow":
            return torch.stack([table[:, 0], torch.ones_like(table[:, 0])], dim=1)
        raise ValueError(f"unknown prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")

    def training_target(self, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Return what a model of this output type is trained to output at x_t = alpha_t x0 + sigma_t noise.

        epsilon: noise; v-prediction: v = alpha_t noise - sigma_t x0; flow velocity: d x_t / d sigma_t = noise - x0
        (on the rectified-flow path). VSD's LoRA trains on it (DistillationCore.lora_loss), as the model itself was.
        """
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.alpha(t) * noise - self.sigma(t) * x0
        if prediction_type == "flow":
            return noise - x0
        raise ValueError(f"unknown prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
        """Return eps = alpha_t v + sigma_t x_t, for v-prediction models."""
        return self.alpha(t) * v + self.sigma(t) * x_t

    def posterior_coefficients(self, t: int, t_prev: int) -> tuple[float, float, float]:
        """Return (c_x0, c_xt, std) of q(x_{t_prev} | x_t, x0) = N(c_x0 x0 + c_xt x_t, std^2 I) on any Gaussian path.

        With s = t_prev, alpha_ts = alpha_t / alpha_s and sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2:
        c_xt = alpha_ts sigma_s^2 / sigma_t^2, c_x0 = alpha_s sigma_ts^2 / sigma_t^2, std = sigma_ts sigma_s / sigma_t
        (on DDPM's path this is DDPM eq. 7: c_x0 = sqrt(abar_s) beta_t / (1 - abar_t), ...).
        """
        if not 0 <= t_prev < t < self.num_train_timesteps:
            raise ValueError(f"posterior needs 0 <= t_prev < t < {self.num_train_timesteps}, got t={t}, t_prev={t_prev}")
        alpha_t, sigma_t = self.alpha(t), self.sigma(t)
        alpha_s, sigma_s = self.alpha(t_prev), self.sigma(t_prev)
        alpha_ts = alpha_t / alpha_s
        sigma_ts_sq = sigma_t**2 - alpha_ts**2 * sigma_s**2
        c_xt = alpha_ts * sigma_s**2 / sigma_t**2
        c_x0 = alpha_s * sigma_ts_sq / sigma_t**2
        std = math.sqrt(sigma_ts_sq) * sigma_s / sigma_t
        return c_x0, c_xt, std

    def posterior_mean(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """Return mu(x_t, x0_hat) = c_x0 x0_hat + c_xt x_t, the mean of q(x_{t_prev} | x_t, x0_hat)."""
        c_x0, c_xt, _ = self.posterior_coefficients(t, t_prev)
        return c_x0 * x0_hat + c_xt * x_t

    def posterior_std(self, t: int, t_prev: int) -> float:
        """Return the standard deviation of q(x_{t_prev} | x_t, x0)."""
        return self.posterior_coefficients(t, t_prev)[2]


class RectifiedFlow(NoiseSchedule):
    """Rectified-flow (flow-matching) noise path of SD 3 / 3.5: sigma_t = t / T, alpha_t = 1 - sigma_t.

    x_t = (1 - sigma_t) x + sigma_t eps, the path SD 3's transformer was trained on; the transformer is called with
    timestep 1000 sigma_t = t (diffusers' StableDiffusion3Pipeline passes scheduler.timesteps = sigmas * 1000). No
    shift: the scheduler's `shift` only respaces a sampler's timesteps and is not part of the path. The model's
    output is the velocity v = eps - x, turned into eps by eps_coefficients("flow"). There is no alpha-bar (betas,
    alphas_cumprod) on this path: every formula of the base class is written with alpha(t) and sigma(t), which are
    overridden here with their table.
    """

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigmas = torch.arange(self.num_train_timesteps, dtype=torch.float64) / self.num_train_timesteps

    @classmethod
    def from_scheduler(cls, scheduler) -> "RectifiedFlow":
        """Return the path of a diffusers flow-matching scheduler (its num_train_timesteps; its shift is a sampler's)."""
        return cls(scheduler.config.get("num_train_timesteps", 1000))

    @classmethod
    def scaled_linear(cls, *args, **kwargs):
        raise TypeError("a rectified-flow path has no betas: build it with RectifiedFlow(num_train_timesteps)")

    def alpha_bar(self, t: int) -> float:
        raise TypeError("a rectified-flow path has no alpha-bar: use alpha(t) and sigma(t) (sigma_t = t / T)")

    def alpha(self, t: int) -> float:
        """Return alpha_t = 1 - t / T (1 at t = -1, clean data)."""
        return 1.0 if t < 0 else 1.0 - float(self.sigmas[t])

    def sigma(self, t: int) -> float:
        """Return sigma_t = t / T (0 at t = -1)."""
        return 0.0 if t < 0 else float(self.sigmas[t])

    def alpha_sigma_table(self) -> torch.Tensor:
        """Return the [T, 2] float64 table (alpha_t, sigma_t) = (1 - t / T, t / T) for every t."""
        return torch.stack([1.0 - self.sigmas, self.sigmas], dim=1)

    def posterior_coefficients(self, t: int, t_prev: int) -> tuple[float, float, float]:
        """Return (c_x0, c_xt, std) of q(x_{t_prev} | x_t, x0) (the base class's general Gaussian form).

        t_prev = 0 is refused: sigma_0 = 0 on this path, so that posterior is a point mass (std 0) and PDS's
        z = (x_{t_prev} - mu) / std is undefined.
        """
        if t_prev == 0:
            raise ValueError(f"the rectified-flow posterior at t_prev = 0 is a point mass (sigma_0 = 0): use t >= 2, "
                             f"got t={t}")
        return super().posterior_coefficients(t, t_prev)
