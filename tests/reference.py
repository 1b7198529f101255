"""Independent references for the gradient tests: the DDPM schedule recomputed from a scheduler's config, and the
CFG prediction from a plain diffusers UNet, written from the equations and never through guidance/."""
import torch


class ReferenceSchedule:
    """DDPM schedule tensors in float64, recomputed from the scheduler's config (scaled_linear)."""

    def __init__(self, config):
        assert config.beta_schedule == "scaled_linear"
        self.betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps,
                                    dtype=torch.float64) ** 2
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)

    def add_noise(self, x0, noise, t):
        return self.alphas_cumprod[t].sqrt() * x0 + (1 - self.alphas_cumprod[t]).sqrt() * noise


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def cfg_reference(unet, x_t, t, text_embeddings, scale):
    """Return eps_uncond + s (eps_cond - eps_uncond) for each row of x_t (one prompt pair per row, or one for all).

    The UNet sees the batch in the layout the contract prescribes, [x_t; x_t] against [uncond rows; cond rows],
    because CPU convolutions round differently per batch size (~1e-6, times the guidance scale).
    """
    batch = x_t.shape[0]
    uncond, cond = text_embeddings.chunk(2)
    uncond, cond = uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)
    with torch.no_grad():
        eps = unet(torch.cat([x_t, x_t]), torch.full((2 * batch,), t),
                   encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = eps[:batch], eps[batch:]
    return eps_u + scale * (eps_c - eps_u)
