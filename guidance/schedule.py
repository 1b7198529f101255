"""The one place that owns the noise-path math: alpha_t, sigma_t, noising, x0 prediction, output -> eps, the
Gaussian posterior, the DDIM step and the weightings w(t).

A noise path gives, for each integer timestep t, the coefficients of x_t = alpha_t x + sigma_t eps. Every loss,
the CFG call, DDIM inversion and the PDS posterior are written with alpha_t and sigma_t only, so a path other
than DDPM's (rectified flow: alpha_t = 1 - t/T, sigma_t = t/T) plugs in by subclassing `NoiseSchedule` and
overriding `alpha` / `sigma` (and their tables). Coefficients are float64 on the CPU, indexed by an integer t,
so every loss gets exact Python floats and never mixes dtypes or devices. t = -1 means clean data
(alpha = 1, sigma = 0), the end point of a DDIM sampler.

A sampler's timesteps are the model's: `sampler_steps(n)` gives the moves (t, t_next) of the model's diffusers
scheduler, from the values of its scheduler config (DDIMConfig; SD 3's flow-matching shift), so that `--loss_type
ddim` is the pipeline's own sample; the steps themselves are this module's DDIM step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# w(t) of the losses that weight their gradient: 1 (the course's), sigma_t^2 (DreamFusion's 1 - abar_t),
# sigma_t / alpha_t (ISM and SDI: it turns an eps difference into an x0 difference).
WEIGHTINGS = ("uniform", "dreamfusion", "sigma_over_alpha")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class DDIMConfig:
    """A DDIM sampler's settings, as diffusers' DDIMScheduler reads them from a model's scheduler config.

    The defaults are Stable Diffusion 1.x / 2.x's scheduler_config.json (leading spacing, steps_offset 1,
    set_alpha_to_one false, clip_sample false); the toy world, which has SD's betas and no scheduler config, uses
    them, so its `ddim` takes the steps SD 2.1's pipeline takes.
    """

    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # the last move ends at clean data (True) or at alpha-bar_0 (False)
    clip_sample: bool = False  # clamp x0_hat to [-clip_sample_range, clip_sample_range] in each sampling step
    clip_sample_range: float = 1.0
    thresholding: bool = False  # dynamic thresholding (Imagen's): not supported by our sampler

    @classmethod
    def from_config(cls, config) -> "DDIMConfig":
        """Return the settings of a DDIMScheduler's config (its defaults already fill keys a config lacks)."""
        return cls(timestep_spacing=config.get("timestep_spacing", "leading"),
                   steps_offset=int(config.get("steps_offset", 0)),
                   set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
                   clip_sample=bool(config.get("clip_sample", True)),
                   clip_sample_range=float(config.get("clip_sample_range", 1.0)),
                   thresholding=bool(config.get("thresholding", False)))


def timestep_grid(num_train_timesteps: int, steps: int, config: DDIMConfig = DDIMConfig()) -> list[int]:
    """Return the descending integer timesteps of DDIMScheduler.set_timesteps(steps) under `config`'s spacing.

    leading: k * (T // n) + steps_offset; trailing: round(T - k T / n) - 1; linspace: round of n points from T - 1
    down to 0 (Lin et al. 2024, table 2, the three spacings diffusers offers).
    """
    T, n = int(num_train_timesteps), int(steps)
    if not 1 <= n <= T:
        raise ValueError(f"a sampler of {n} steps needs 1 <= steps <= {T}")
    spacing = config.timestep_spacing
    if spacing == "leading":
        return [k * (T // n) + config.steps_offset for k in range(n - 1, -1, -1)]
    if spacing == "trailing":
        return [round(T - k * T / n) - 1 for k in range(n)]
    if spacing == "linspace":
        return [round((T - 1) * k / (n - 1)) if n > 1 else 0 for k in range(n - 1, -1, -1)]
    raise ValueError(f"unknown timestep_spacing {spacing!r}: use one of {', '.join(TIMESTEP_SPACINGS)}")


class NoiseSchedule:
    """DDPM (variance-preserving) noise path: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

    def __init__(self, betas: torch.Tensor, ddim: DDIMConfig = DDIMConfig()):
        self.betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_train_timesteps = len(self.betas)
        self.ddim = ddim

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_train_timesteps: int = 1000) -> "NoiseSchedule":
        """Return Stable Diffusion's schedule: betas linear in sqrt-space from beta_start to beta_end."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(betas)

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """Return the schedule of a diffusers DDIMScheduler (its betas, recomputed in float64; its DDIM config)."""
        cfg = scheduler.config
        ddim = DDIMConfig.from_config(cfg)
        if cfg.get("trained_betas") is None and cfg.get("beta_schedule") == "scaled_linear":
            schedule = cls.scaled_linear(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
            schedule.ddim = ddim
            return schedule
        return cls(scheduler.betas, ddim)

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
        return self.ddim_update(self.predict_x0(x_t, eps, t), eps, t_next)

    def ddim_update(self, x0_hat: torch.Tensor, eps: torch.Tensor, t_next,
                    x0_clip: float | None = None) -> torch.Tensor:
        """Return alpha_next x0_hat + sigma_next eps, x0_hat first clamped to [-x0_clip, x0_clip] if given (a scheduler
        config's clip_sample; eps is kept, as DDIMScheduler keeps it). On the rectified-flow path, from a velocity
        output v, this is the flow-matching Euler step x_t + (sigma_next - sigma_t) v."""
        if x0_clip is not None:
            x0_hat = x0_hat.clamp(-x0_clip, x0_clip)
        return self.alpha(t_next) * x0_hat + self.sigma(t_next) * eps

    def x0_and_eps(self, prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, t) -> tuple:
        """Return (x0_hat, eps) from a denoiser's native output at x_t, as diffusers' schedulers compute them.

        epsilon: x0_hat = (x_t - sigma_t eps) / alpha_t; v: x0_hat = alpha_t x_t - sigma_t v,
        eps = alpha_t v + sigma_t x_t; flow velocity: x0_hat = x_t - sigma_t v, eps = x_t + alpha_t v (no division:
        defined at sigma = 1, alpha = 0).
        """
        alpha, sigma = self.alpha(t), self.sigma(t)
        if prediction_type == "epsilon":
            return (x_t - sigma * output) / alpha, output
        if prediction_type == "v_prediction":
            return alpha * x_t - sigma * output, alpha * output + sigma * x_t
        if prediction_type == "flow":
            return x_t - sigma * output, x_t + alpha * output
        raise ValueError(f"unknown prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")

    @property
    def x0_clip(self) -> float | None:
        """Return the x0_hat clamp of this model's DDIM sampler (its config's clip_sample_range), or None."""
        return self.ddim.clip_sample_range if self.ddim.clip_sample else None

    def sampler_steps(self, steps: int) -> list[tuple[int, int]]:
        """Return the moves (t, t_next) of diffusers' DDIMScheduler with this model's config, for `steps` steps.

        t runs over timestep_grid (set_timesteps); each move goes to t - T // steps (DDIMScheduler.step's rule,
        which for trailing and linspace spacing need not be the next grid point); a move below 0 ends at clean
        data (t_next = -1) when set_alpha_to_one, else at alpha-bar_0 (t_next = 0). SD 2.1 at 50 steps: 981, 961,
        ..., 1, then 0.
        """
        if self.ddim.thresholding:
            raise ValueError("this model's scheduler config sets thresholding (dynamic thresholding), which the DDIM "
                             "sampler here does not implement: use the diffusers pipeline to sample it")
        jump = self.num_train_timesteps // int(steps)
        end = -1 if self.ddim.set_alpha_to_one else 0
        return [(t, t - jump if t - jump >= 0 else end) for t in timestep_grid(self.num_train_timesteps, steps,
                                                                               self.ddim)]

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

    def one_step_posterior_coefficients(self, t: int, t_prev: int) -> tuple[float, float, float]:
        """Return (c_x0, c_xt, std) as the official PDS code (KAIST-Visual-AI-Group/PDS, pds/pds.py) computes them.

        Its t_prev is the previous point of a 500-step DDIM grid (t - 2 on SD's), but its coefficients are those of
        the one-step transition t - 1 -> t (DDPM's betas[t], alphas[t]) with alpha-bar at t_prev:
        c_x0 = alpha_s beta_t / sigma_t^2, c_xt = sqrt(alphas[t]) sigma_s^2 / sigma_t^2, std = sqrt(beta_t) sigma_s /
        sigma_t, s = t_prev. Written on any Gaussian path with alpha_{t|t-1} = alpha_t / alpha_{t-1} for sqrt(alphas[t])
        and beta_t = sigma_t^2 - alpha_{t|t-1}^2 sigma_{t-1}^2 (DDPM's beta_t on its path). For t_prev = t - 1 this
        is posterior_coefficients; for t_prev < t - 1, c_x0 + c_xt alpha_t != alpha_s, so PDS keeps a term in
        x_tgt - x_src.
        """
        if not 0 < t_prev < t < self.num_train_timesteps:
            raise ValueError(f"PDS's official posterior needs 0 < t_prev < t < {self.num_train_timesteps}, got t={t}, "
                             f"t_prev={t_prev}")
        alpha_t, sigma_t = self.alpha(t), self.sigma(t)
        alpha_s, sigma_s = self.alpha(t_prev), self.sigma(t_prev)
        alpha_step = alpha_t / self.alpha(t - 1)
        beta_t = sigma_t**2 - alpha_step**2 * self.sigma(t - 1) ** 2
        c_x0 = alpha_s * beta_t / sigma_t**2
        c_xt = alpha_step * sigma_s**2 / sigma_t**2
        std = math.sqrt(beta_t) * sigma_s / sigma_t
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
    shift: the scheduler's `shift` only respaces a sampler's timesteps and is not part of the path (sampler_steps
    uses it). The model's output is the velocity v = eps - x, turned into eps by eps_coefficients("flow"). There is
    no alpha-bar (betas, alphas_cumprod) on this path: every formula of the base class is written with alpha(t) and
    sigma(t), which are overridden here; t may be any real in [0, T] (a sampler's shifted timesteps are not
    integers), the losses use integers.
    """

    # the flow-matching scheduler options whose sigmas sampler_steps does not reproduce
    UNSUPPORTED_SAMPLER_OPTIONS = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas",
                                   "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, unsupported: tuple = ()):
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigmas = torch.arange(self.num_train_timesteps, dtype=torch.float64) / self.num_train_timesteps
        self.shift = float(shift)
        self.unsupported = tuple(unsupported)  # options of the scheduler config that sampler_steps refuses
        # No DDIM config on this path: an integer grid (PDS's official variant) takes SD's spacing rule.
        self.ddim = DDIMConfig()

    @classmethod
    def from_scheduler(cls, scheduler) -> "RectifiedFlow":
        """Return the path of a diffusers flow-matching scheduler (its num_train_timesteps, and its shift for
        sampler_steps)."""
        cfg = scheduler.config
        return cls(cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0),
                   tuple(name for name in cls.UNSUPPORTED_SAMPLER_OPTIONS if cfg.get(name)))

    @classmethod
    def scaled_linear(cls, *args, **kwargs):
        raise TypeError("a rectified-flow path has no betas: build it with RectifiedFlow(num_train_timesteps)")

    def alpha_bar(self, t: int) -> float:
        raise TypeError("a rectified-flow path has no alpha-bar: use alpha(t) and sigma(t) (sigma_t = t / T)")

    def alpha(self, t: float) -> float:
        """Return alpha_t = 1 - t / T (1 at t = -1, clean data)."""
        return 1.0 - self.sigma(t)

    def sigma(self, t: float) -> float:
        """Return sigma_t = t / T (0 at t = -1)."""
        return 0.0 if t < 0 else t / self.num_train_timesteps

    def sampler_steps(self, steps: int) -> list[tuple[float, float]]:
        """Return the moves (t, t_next) of diffusers' FlowMatchEulerDiscreteScheduler with this shift, t = T sigma.

        As its set_timesteps: n sigmas evenly from 1 down to the scheduler's smallest, shift(1 / T), each then shifted
        (the smallest thus twice, as diffusers does), sigma' = s sigma / (1 + (s - 1) sigma); the last move ends at
        sigma = 0. The move itself is ddim_update, which on this path is the scheduler's Euler step.
        """
        if self.unsupported:
            raise ValueError(f"this model's scheduler config sets {', '.join(self.unsupported)}, whose timesteps the "
                             f"sampler here does not reproduce: use the diffusers pipeline to sample it")
        n, T = int(steps), self.num_train_timesteps
        if n < 1:
            raise ValueError(f"a sampler of {n} steps needs steps >= 1")

        def shifted(sigma: float) -> float:
            return self.shift * sigma / (1 + (self.shift - 1) * sigma)

        low = shifted(1.0 / T)
        sigmas = [shifted(1.0 - (1.0 - low) * k / (n - 1)) if n > 1 else 1.0 for k in range(n)] + [0.0]
        times = [T * sigma for sigma in sigmas]
        return list(zip(times[:-1], times[1:]))

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
