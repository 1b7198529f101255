"""The distillation losses, written once for every model: SDS, PDS, VSD and the zoo (NFSD, CSD, DDS, SDS-Bridge,
ASD, ISM, SDI).

Notation (guidance/schedule.py owns it): x_t = alpha_t x + sigma_t eps; eps_cfg_s(x_t; y) = eps_u + s (eps_c - eps_u)
with eps_u the uncond row of `text_embeddings = cat[uncond, cond]` (the run's negative prompt) and eps_null the
prediction for the empty prompt "". Every loss forms its gradient explicitly and returns
`0.5 * ||x - (x - grad).detach()||^2 / batch`, so that d loss / d x = grad / batch (threestudio's
reparameterisation). UNet calls run under no_grad, batched (one call per distinct input set); gradients are
formed in float32 (float64 when the latents are float64). Every loss takes optional `t` and `noise` (so tests can
pin them) and `weighting`, whose default is the method's paper weighting (guidance/methods.py lists the same), and
records what it aimed at in `last_guidance`.
"""
from __future__ import annotations

import bisect
import math

import torch

from guidance.core import DistillationCore, grad_dtype, reparam_loss
from guidance.schedule import NoiseSchedule, timestep_grid

PDS_VARIANTS = ("paper", "official")
PDS_OFFICIAL_STEPS = 500  # the official PDS code's DDIM grid (PDSConfig.num_inference_steps)
# SDI's inversion as the authors' code runs it (threestudio: inversion_guidance_scale -7.5 in eps_c + s (eps_c - eps_u),
# i.e. -6.5 in eps_u + s (eps_c - eps_u); inversion_eta 0.3)
SDI_INVERSION_GUIDANCE = -6.5
SDI_INVERSION_ETA = 0.3
# NFSD: below the noise level of t = 200 on Stable Diffusion's DDPM path (the paper's and the authors' code's t < 200),
# delta_D is eps_null alone (the negative prompt's term is dropped). Compared as sigma_t / alpha_t (0.572 there) so that
# it means the same noise level on any path: on SD 3's rectified flow, t <= 363.
NFSD_SMALL_T = 200
SD_PATH = NoiseSchedule.scaled_linear()  # Stable Diffusion's DDPM path, on which NFSD_SMALL_T is a timestep


def nfsd_small_noise(schedule: NoiseSchedule, t: int) -> bool:
    """Return whether t is below NFSD's small-t threshold in noise terms: sigma_t / alpha_t < that of SD's t = 200."""
    return schedule.sigma(t) / schedule.alpha(t) < SD_PATH.sigma(NFSD_SMALL_T) / SD_PATH.alpha(NFSD_SMALL_T)


class ScoreDistillation(DistillationCore):
    """Every distillation loss, for any model that offers the small interface of guidance/core.py."""

    def _record(self, latents: torch.Tensor, grad: torch.Tensor, t: int, x_t: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
        """Return reparam_loss(latents, grad) after noting (t, x_t, eps, grad) in last_guidance for diagnostics."""
        self.last_guidance = {"t": t, "x_t": x_t, "eps": eps, "grad": grad}
        return reparam_loss(latents, grad)

    def _noised(self, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        return self.schedule.add_noise(latents.detach().to(noise.dtype), noise, t)

    # ----------------------------------------------------------------------------------------- the course's three
    def get_sds_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 100,
                     grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None,
                     weighting: str = "uniform") -> torch.Tensor:
        """Return the SDS loss; its gradient w.r.t. latents is grad_scale * w(t) * (eps_cfg_s(x_t) - noise).

        DreamFusion (Poole et al., ICLR 2023), eq. 3:  x_t = alpha_t x + sigma_t eps,
                                                       grad = w(t) (eps_cfg_s(x_t; y, t) - eps).
        """
        t = self.sample_timestep(t)
        noise = self._noise_like(latents, noise)
        with torch.no_grad(), self.lora_disabled():
            x_t = self._noised(latents, noise, t)
            eps_hat = self.get_noise_preds(x_t, t, text_embeddings, guidance_scale)
        grad = grad_scale * self.schedule.weight(t, weighting) * (eps_hat - noise)
        return self._record(latents, grad, t, x_t, eps_hat)

    def get_pds_loss(self, src_latents: torch.Tensor, tgt_latents: torch.Tensor, src_text_embedding: torch.Tensor,
                     tgt_text_embedding: torch.Tensor, guidance_scale: float = 7.5, grad_scale: float = 1,
                     t: int | None = None, noise=None, weighting: str = "uniform",
                     variant: str = "paper") -> torch.Tensor:
        """Return the PDS loss; its gradient w.r.t. tgt_latents is grad_scale * w(t) * (z_tgt - z_src).

        Posterior Distillation Sampling (Koo et al., CVPR 2024, eq. 9), noise_t and noise_s shared by both sides:
            x_t = alpha_t x0 + sigma_t noise_t,   x_s = alpha_s x0 + sigma_s noise_s,
            x0_hat = (x_t - sigma_t eps_cfg_s(x_t)) / alpha_t,   z = (x_s - mu(x_t, x0_hat)) / std,
        mu = c_x0 x0_hat + c_xt x_t. Source and target: one batch-4 UNet call. The paper's weighting is uniform.
        variant "paper" (the course's form): s = t - 1 and the exact posterior q(x_s | x_t, x0_hat); then
        c_x0 + c_xt alpha_t = alpha_s, the x_tgt - x_src terms cancel and z_tgt - z_src = c_x0 sigma_t / (alpha_t std)
        (eps_cfg(x_t^tgt) - eps_cfg(x_t^src)): DDS reweighted by t, whatever noise_s is.
        variant "official" (KAIST-Visual-AI-Group/PDS's pds.py): t moves to the authors' grid (pds_official_timesteps:
        500 DDIM steps of the model's spacing, s = the grid point before t, t - 2 on SD's) and the coefficients are
        schedule.one_step_posterior_coefficients; their mismatch leaves k(t) (x_tgt - x_src) in the gradient,
        k = (alpha_s - c_x0 - c_xt alpha_t) / std > 0, which pulls the edit back toward the source (k = 1.6 at
        t = 21, 0.03 at t = 501 on SD's path).
        """
        t = self.sample_timestep(t)
        if variant == "paper":
            t_prev = t - 1
            c_x0, c_xt, std = self.schedule.posterior_coefficients(t, t_prev)
        elif variant == "official":
            t, t_prev = self.pds_official_timesteps(t)
            c_x0, c_xt, std = self.schedule.one_step_posterior_coefficients(t, t_prev)
        else:
            raise ValueError(f"unknown PDS variant {variant!r}: use one of {', '.join(PDS_VARIANTS)}")
        noise_t, noise_t_prev = (None, None) if noise is None else noise
        noise_t = self._noise_like(tgt_latents, noise_t)
        noise_t_prev = self._noise_like(tgt_latents, noise_t_prev)
        with torch.no_grad():
            x0 = torch.cat([src_latents.detach(), tgt_latents.detach()]).to(noise_t.dtype)
            x_t = self.schedule.add_noise(x0, torch.cat([noise_t, noise_t]), t)
            x_t_prev = self.schedule.add_noise(x0, torch.cat([noise_t_prev, noise_t_prev]), t_prev)
            with self.lora_disabled():
                eps_hat = self.get_noise_preds(x_t, t, _pair_rows(src_text_embedding, tgt_text_embedding),
                                               guidance_scale)
            x0_hat = self.schedule.predict_x0(x_t, eps_hat, t)
            mu = c_x0 * x0_hat + c_xt * x_t
            z_src, z_tgt = ((x_t_prev - mu) / std).chunk(2)
        grad = grad_scale * self.schedule.weight(t, weighting) * (z_tgt - z_src)
        return self._record(tgt_latents, grad, t, x_t.chunk(2)[1], eps_hat.chunk(2)[1])

    def pds_official_timesteps(self, t: int) -> tuple[int, int]:
        """Return (t, t_prev) on the official PDS code's grid: the model's DDIM grid of PDS_OFFICIAL_STEPS steps (SD:
        1, 3, ..., 999), t moved to the grid point at or below it and t_prev the point before (t - 2 on SD's).

        The authors draw a grid index uniformly in [int(0.02 n), int(0.98 n)); the loop's t, uniform over the integers
        of the t range, lands on each of those grid points equally often (SD's [20, 980]: 21, ..., 979 twice each,
        and 19 once).
        """
        grid = sorted(timestep_grid(self.schedule.num_train_timesteps, PDS_OFFICIAL_STEPS, self.schedule.ddim))
        index = max(1, bisect.bisect_right(grid, int(t)) - 1)
        return grid[index], grid[index - 1]

    def get_vsd_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 7.5,
                     grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None,
                     weighting: str = "uniform", cameras: torch.Tensor | None = None) -> torch.Tensor:
        """Return the VSD loss; its gradient w.r.t. latents is grad_scale * w(t) * (eps_cfg_s(x_t) - eps_phi(x_t, t, y)).

        ProlificDreamer (Wang et al., NeurIPS 2023), eq. 9: eps_phi is the same UNet with a LoRA (adapters disabled
        for the pretrained branch), conditioned on the prompt only. Each call then takes one AdamW step of the
        LoRA on the detached particles (eq. 10; lora_loss: the model's own training target, noise for epsilon
        models): at a fresh t ~ U[0, T) and fresh noise by default, or on this very x_t when
        vsd_lora_timestep='shared' (one LoRA forward serves both). cameras ([B, 16] camera-to-world matrices of a
        3D generator's views) condition eps_phi on the camera, as ProlificDreamer's LoRA (lora_cameras).
        """
        self.enable_lora()
        t = self.sample_timestep(t)
        noise = self._noise_like(latents, noise)
        cond = self._expand_rows(text_embeddings.chunk(2)[1], latents.shape[0])
        with torch.no_grad():
            x_t = self._noised(latents, noise, t)
            with self.lora_disabled():
                eps_pretrained = self.get_noise_preds(x_t, t, text_embeddings, guidance_scale)
        with self.lora_cameras(cameras):
            if self.vsd_lora_timestep == "shared":
                # one LoRA forward with autograd serves both (it recomputes this very x_t from x and noise)
                eps_lora = self.lora_training_step(latents.detach().to(noise.dtype), t, cond, noise)
            else:
                with torch.no_grad():
                    eps_lora = self.predict_eps(x_t, t, cond)
                self.train_lora(latents.detach().to(noise.dtype), cond)
        grad = grad_scale * self.schedule.weight(t, weighting) * (eps_pretrained - eps_lora)
        return self._record(latents, grad, t, x_t, eps_pretrained)

    # ----------------------------------------------------------------------------------------- the zoo
    def get_nfsd_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 7.5,
                      grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None,
                      weighting: str = "dreamfusion") -> torch.Tensor:
        """Return the NFSD loss; its gradient is grad_scale * w(t) * (s (eps_c - eps_null) + delta_D).

        Noise-Free Score Distillation (Katzir et al., ICLR 2024, eq. 6-7): delta_D = eps_null for t < 200 (in noise
        terms: nfsd_small_noise), else eps_null - eps_neg (eps_neg: the negative prompt's row, the method's own
        negative prompt by default, guidance/methods.py). ONE batch-3B UNet call on [null, neg, cond].
        """
        t = self.sample_timestep(t)
        noise = self._noise_like(latents, noise)
        batch = latents.shape[0]
        neg, cond = (self._expand_rows(e, batch) for e in text_embeddings.chunk(2))
        null = self._expand_rows(self.null_embedding(), batch).to(cond.dtype)
        with torch.no_grad(), self.lora_disabled():
            x_t = self._noised(latents, noise, t)
            eps_null, eps_neg, eps_cond = self.predict_eps(torch.cat([x_t] * 3), t,
                                                           torch.cat([null, neg, cond])).chunk(3)
            delta_c = eps_cond - eps_null
            delta_d = eps_null if nfsd_small_noise(self.schedule, t) else eps_null - eps_neg
        grad = grad_scale * self.schedule.weight(t, weighting) * (guidance_scale * delta_c + delta_d)
        return self._record(latents, grad, t, x_t, eps_null + guidance_scale * delta_c)

    def get_csd_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 7.5,
                     grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None,
                     weighting: str = "dreamfusion") -> torch.Tensor:
        """Return the CSD loss; its gradient is grad_scale * w(t) * s * (eps_c - eps_u): the CFG term alone.

        Classifier Score Distillation (Yu et al., ICLR 2024, eq. 7): SDS without its denoising term. One batch-2B call.
        """
        t = self.sample_timestep(t)
        noise = self._noise_like(latents, noise)
        with torch.no_grad(), self.lora_disabled():
            x_t = self._noised(latents, noise, t)
            eps_uncond, eps_cond = self.predict_uncond_cond(x_t, t, text_embeddings)
        grad = grad_scale * self.schedule.weight(t, weighting) * guidance_scale * (eps_cond - eps_uncond)
        return self._record(latents, grad, t, x_t, eps_uncond + guidance_scale * (eps_cond - eps_uncond))

    def get_dds_loss(self, src_latents: torch.Tensor, tgt_latents: torch.Tensor, src_text_embedding: torch.Tensor,
                     tgt_text_embedding: torch.Tensor, guidance_scale: float = 7.5, grad_scale: float = 1,
                     t: int | None = None, noise: torch.Tensor | None = None,
                     weighting: str = "uniform") -> torch.Tensor:
        """Return the DDS loss; its gradient w.r.t. tgt_latents is grad_scale * w(t) * (eps_cfg_s(z_t; y_tgt) - eps_cfg_s(zhat_t; y_src)).

        Delta Denoising Score (Hertz et al., ICCV 2023, eq. 5): z_t (target) and zhat_t (source) are noised with
        ONE eps at ONE t, so the noise cancels; one batch-4 UNet call (as PDS). The paper's weighting is uniform.
        """
        t = self.sample_timestep(t)
        noise = self._noise_like(tgt_latents, noise)
        with torch.no_grad(), self.lora_disabled():
            x0 = torch.cat([src_latents.detach(), tgt_latents.detach()]).to(noise.dtype)
            x_t = self.schedule.add_noise(x0, torch.cat([noise, noise]), t)
            eps_src, eps_tgt = self.get_noise_preds(x_t, t, _pair_rows(src_text_embedding, tgt_text_embedding),
                                                    guidance_scale).chunk(2)
        grad = grad_scale * self.schedule.weight(t, weighting) * (eps_tgt - eps_src)
        return self._record(tgt_latents, grad, t, x_t.chunk(2)[1], eps_tgt)

    def get_bridge_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 40,
                        grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None,
                        weighting: str = "dreamfusion") -> torch.Tensor:
        """Return the SDS-Bridge loss; its gradient is grad_scale * w(t) * s * (eps(x_t; y_tgt) - eps(x_t; y_src)).

        Rethinking Score Distillation as a Bridge Between Image Distributions (McAllister et al., NeurIPS 2024,
        2D): text_embeddings = cat[emb(prompt + src_modifier), emb(prompt + tgt_modifier)], the current image's
        distribution and the target's. One batch-2B UNet call.
        """
        t = self.sample_timestep(t)
        noise = self._noise_like(latents, noise)
        with torch.no_grad(), self.lora_disabled():
            x_t = self._noised(latents, noise, t)
            eps_src, eps_tgt = self.predict_uncond_cond(x_t, t, text_embeddings)
        grad = grad_scale * self.schedule.weight(t, weighting) * guidance_scale * (eps_tgt - eps_src)
        return self._record(latents, grad, t, x_t, eps_tgt)

    def asd_t_plus(self, t: int, ratio: float = 0.1, u: float | None = None, min_step: int | None = None) -> int:
        """Return ASD's t + d with d = max(1, floor(ratio (t - min_step) u)), u ~ U(0, 1), capped at T - 1."""
        u = float(torch.rand(()).item()) if u is None else float(u)
        min_step = self.min_step if min_step is None else int(min_step)
        d = max(1, math.floor(ratio * (t - min_step) * u))
        return min(t + d, self.schedule.num_train_timesteps - 1)

    def get_asd_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 7.5,
                     grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None,
                     t_plus: int | None = None, weighting: str = "dreamfusion", asd_ratio: float = 0.1) -> torch.Tensor:
        """Return the ASD loss; its gradient is grad_scale * w(t) * (eps_cfg_s(x_t, t) - eps_c(x_{t+d}, t + d)).

        Asynchronous Score Distillation (Ma et al., ECCV 2024): the same eps noises x at t and at t + d
        (asd_t_plus); the conditional prediction at the later timestep replaces SDS's noise. One batch-3B UNet
        call with per-row timesteps [t (uncond), t (cond), t + d (cond)].
        """
        t = self.sample_timestep(t)
        t_plus = self.asd_t_plus(t, asd_ratio) if t_plus is None else int(t_plus)
        noise = self._noise_like(latents, noise)
        batch = latents.shape[0]
        uncond, cond = (self._expand_rows(e, batch) for e in text_embeddings.chunk(2))
        with torch.no_grad(), self.lora_disabled():
            x_t, x_t_plus = self._noised(latents, noise, t), self._noised(latents, noise, t_plus)
            timesteps = [t] * (2 * batch) + [t_plus] * batch
            eps_uncond, eps_cond, eps_cond_plus = self.predict_eps(
                torch.cat([x_t, x_t, x_t_plus]), timesteps, torch.cat([uncond, cond, cond])).chunk(3)
            eps_hat = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        grad = grad_scale * self.schedule.weight(t, weighting) * (eps_hat - eps_cond_plus)
        return self._record(latents, grad, t, x_t, eps_hat)

    def get_ism_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 7.5,
                     grad_scale: float = 1, t: int | None = None, delta_t: int = 80, delta_s: int = 200,
                     inversion_steps: int = 5, weighting: str = "sigma_over_alpha") -> torch.Tensor:
        """Return the ISM loss; its gradient is grad_scale * w(t) * (eps_cfg_s(x_t, t; y) - e_s).

        Interval Score Matching (LucidDreamer, Liang et al., CVPR 2024, eq. 17): s = max(0, t - delta_t);
        x_s = DDIM inversion of x to s under "" in n_s = min(inversion_steps, max(1, ceil(s / delta_s))) steps
        (x_s = x when s = 0); e_s = eps(x_s, s; null); x_t = alpha_t (x_s - sigma_s e_s) / alpha_s + sigma_t e_s.
        UNet calls: n_s inversion steps, e_s, then one batch-2B CFG call at t.
        """
        t = self.sample_timestep(t)
        s = max(0, t - int(delta_t))
        null = self._expand_rows(self.null_embedding(), latents.shape[0])
        with torch.no_grad(), self.lora_disabled():
            x = latents.detach().to(grad_dtype(latents))
            x_s = x if s == 0 else self.ddim_invert(x, null, s, min(int(inversion_steps), max(1, math.ceil(s / delta_s))))
            e_s = self.predict_eps(x_s, s, null.to(self.dtype))
            x_t = self.schedule.ddim_step(x_s, e_s, s, t)
            eps_hat = self.get_noise_preds(x_t, t, text_embeddings, guidance_scale)
        grad = grad_scale * self.schedule.weight(t, weighting) * (eps_hat - e_s)
        return self._record(latents, grad, t, x_t, eps_hat)

    def get_sdi_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 7.5,
                     grad_scale: float = 1, t: int | None = None, inversion_steps: int = 10,
                     weighting: str = "sigma_over_alpha", eta: float = 0.0, noise: torch.Tensor | None = None,
                     inversion_guidance: float | str | None = SDI_INVERSION_GUIDANCE,
                     inversion_eta: float = SDI_INVERSION_ETA, inversion_noise=None) -> torch.Tensor:
        """Return the SDI loss; its gradient is grad_scale * w(t) * (eps_cfg_s(x_t, t) - kappa).

        Score Distillation via Inversion (Lukoianov et al., NeurIPS 2024, eq. 9): x_t = DDIM inversion of x to t
        (inversion_steps equal steps), kappa = (x_t - alpha_t x) / sigma_t, the noise that inversion implies; with
        w = sigma_t / alpha_t the gradient is x - x0_hat(x_t), the paper's target. The inversion is the authors'
        code's (threestudio's stable_diffusion_sdi_guidance.py) by default: CFG on the run's [uncond, cond] rows at
        inversion_guidance -6.5 (their inversion_guidance_scale -7.5 in their convention eps_c + s (eps_c - eps_u))
        and inversion_eta 0.3: eta posterior_std z added after each step (ddim_invert; z = inversion_noise[k] when
        given). inversion_guidance None or "null" inverts under the null prompt without CFG; with inversion_eta 0
        that is this loss before the authors' settings (deterministic). eta > 0 then blends fresh noise into kappa
        (eta = 1: SDS exactly). UNet calls: inversion_steps of 2B rows (B under the null prompt), then one 2B.
        """
        t = self.sample_timestep(t)
        null_inversion = inversion_guidance is None or inversion_guidance == "null"
        if null_inversion:
            null = self._expand_rows(self.null_embedding(), latents.shape[0])
        with torch.no_grad(), self.lora_disabled():
            x = latents.detach().to(grad_dtype(latents))
            if null_inversion:
                x_t = self.ddim_invert(x, null, t, inversion_steps, eta=inversion_eta, noises=inversion_noise)
            else:
                x_t = self.ddim_invert(x, text_embeddings, t, inversion_steps, guidance_scale=float(inversion_guidance),
                                       eta=inversion_eta, noises=inversion_noise)
            kappa = (x_t - self.schedule.alpha(t) * x) / self.schedule.sigma(t)
            if eta > 0:  # blend fresh noise into the inverted noise (eta = 1: SDS exactly)
                kappa = math.sqrt(1 - eta**2) * kappa + eta * self._noise_like(latents, noise)
                x_t = self.schedule.add_noise(x, kappa, t)
            eps_hat = self.get_noise_preds(x_t, t, text_embeddings, guidance_scale)
        grad = grad_scale * self.schedule.weight(t, weighting) * (eps_hat - kappa)
        return self._record(latents, grad, t, x_t, eps_hat)


def _pair_rows(src_text_embedding: torch.Tensor, tgt_text_embedding: torch.Tensor) -> torch.Tensor:
    """Return cat[src_u, tgt_u, src_c, tgt_c]: the embedding rows of a batched [source; target] CFG call."""
    src_uncond, src_cond = src_text_embedding.chunk(2)
    tgt_uncond, tgt_cond = tgt_text_embedding.chunk(2)
    return torch.cat([src_uncond, tgt_uncond, src_cond, tgt_cond])
