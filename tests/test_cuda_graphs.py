"""CUDA graphs: the choice is validated everywhere; the graphed LoRA step is the eager one (checked on a CPU with the
capture replaced by eager calls); on a CUDA machine, graphed losses equal eager ones step by step."""
import pytest
import torch

from guidance.cuda_graphs import WARMUP_CALLS, CudaGraphs, _Graph
from guidance.sd import StableDiffusion, resolve_cuda_graphs
from utils import UserError

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU (checked on the lent GPU machine)")


def test_auto_is_on_only_on_cuda_without_compile():
    assert resolve_cuda_graphs("auto", torch.device("cpu")) is False
    assert resolve_cuda_graphs("auto", torch.device("cuda")) is True
    assert resolve_cuda_graphs("auto", torch.device("cuda"), compile=True) is False
    assert resolve_cuda_graphs("off", torch.device("cuda")) is False
    assert resolve_cuda_graphs("on", torch.device("cuda")) is True


@pytest.mark.parametrize("choice, device, compile, words", [
    ("on", "cpu", False, "needs a CUDA device"),
    ("on", "cuda", True, "exclusive"),
    ("sometimes", "cuda", False, "unknown cuda_graphs 'sometimes'"),
])
def test_bad_choices_name_the_value_and_the_fix(choice, device, compile, words):
    with pytest.raises(UserError, match=words):
        resolve_cuda_graphs(choice, torch.device(device), compile)


def test_main_refuses_cuda_graphs_on_a_cpu_before_loading(tmp_path):
    import main

    with pytest.raises(UserError, match="--cuda_graphs on needs a CUDA device, but the device is cpu"):
        main.parse_args(["--prompt", "a red circle", "--model", "toy", "--device", "cpu", "--cuda_graphs", "on",
                         "--save_dir", str(tmp_path)])


def test_the_toy_refuses_cuda_graphs_on():
    from guidance.toy import ToyDiffusion

    with pytest.raises(UserError, match="toy world runs eagerly"):
        ToyDiffusion(cuda_graphs="on")
    assert ToyDiffusion(cuda_graphs="auto").graphs is None


def test_cpu_models_run_eagerly(tiny_sd):
    assert tiny_sd.graphs is None


# ----------------------------------------------------------------------------------------- graph bookkeeping, CPU
class EagerReplay(CudaGraphs):
    """CudaGraphs with the capture replaced by eager calls: warm-up (with the training step's save and restore),
    static input buffers and replays exactly as on a GPU, so that the graphed path is checked without CUDA."""

    def _capture(self, fn, inputs, before_warmup=None, after_warmup=None):
        if before_warmup:
            before_warmup()
        for _ in range(WARMUP_CALLS):
            fn(*inputs)
        if after_warmup:
            after_warmup()
        return _Graph(graph=fn, inputs=inputs, outputs=None)

    @staticmethod
    def _replay(entry, *values):
        for buffer, value in zip(entry.inputs, values):
            buffer.copy_(value)
        return tuple(out.clone() for out in entry.graph(*entry.inputs))


@pytest.mark.parametrize("mode", ["fresh", "shared"])
def test_the_graphed_lora_step_is_the_eager_one(tiny_sd_dir, mode):
    """The graphed path replays the model's own training step (core's _lora_step) with the same inputs, and undoes its
    warm-up calls: a separate graphed loss (e.g. eps-MSE on a v model), other inputs, or warm-up steps left in the
    LoRA (3 steps where there was 1) make the gradients and the LoRA differ."""
    models = {}
    for name, graphs in (("eager", None), ("graphed", EagerReplay())):
        model = StableDiffusion(str(tiny_sd_dir), device="cpu", vsd_lora_timestep=mode, lora_lr=1e-2)
        model.graphs = graphs
        models[name] = model
    gen = torch.Generator().manual_seed(0)
    shape = models["eager"].latent_shape(2)
    latents = torch.randn(shape, generator=gen)
    steps = [(t, torch.randn(shape, generator=gen)) for t in (700, 300, 900)]
    results = {}
    for name, model in models.items():
        embeddings = torch.cat([model.get_text_embeds(""), model.get_text_embeds("a red circle")])
        torch.manual_seed(5)  # the LoRA's init and its fresh t and noise
        grads = []
        for t, noise in steps:
            grads.append(_grad(lambda x: model.get_vsd_loss(x, embeddings, t=t, noise=noise), latents)[1])
            grads.append(model.last_lora_loss.clone())
        results[name] = grads, [p.detach().clone() for p in model.lora_parameters]
    assert models["graphed"].graphs.n_graphs >= 1  # the training step went through the graph's path
    (grads_e, lora_e), (grads_g, lora_g) = results["eager"], results["graphed"]
    for e, g in zip(grads_e, grads_g):
        assert torch.allclose(e, g, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(e, g, rtol=1e-6, atol=1e-9) for e, g in zip(lora_e, lora_g))
    assert max(p.abs().max().item() for p in lora_e) > 1e-3  # the LoRA trained (lora_B started at 0)


# ----------------------------------------------------------------------------------------- on a CUDA GPU
def _pair(folder, precision, **kwargs):
    eager = StableDiffusion(str(folder), device="cuda", precision=precision, cuda_graphs="off", **kwargs)
    graphed = StableDiffusion(str(folder), device="cuda", precision=precision, cuda_graphs="on", **kwargs)
    assert eager.graphs is None and graphed.graphs is not None
    return eager, graphed


def _grad(loss_fn, latents):
    x = latents.clone().requires_grad_(True)
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), x.grad


# fp32: the same kernels in the same order, replayed (SDPA may pick another kernel under capture: tiny tolerance)
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3}


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphed_sds_and_pds_equal_eager(tiny_sd_dir, precision):
    eager, graphed = _pair(tiny_sd_dir, precision)
    gen = torch.Generator("cuda").manual_seed(0)
    shape = eager.latent_shape(1)
    latents, source = (torch.randn(shape, generator=gen, device="cuda") for _ in range(2))
    tol = TOLERANCE[precision]
    for model in (eager, graphed):
        model.embeddings = torch.cat([model.get_text_embeds(""), model.get_text_embeds("a red circle")])
        model.edit = torch.cat([model.get_text_embeds(""), model.get_text_embeds("a blue square")])
    for step, t in enumerate((20, 500, 980, 500)):
        noise = torch.randn(shape, generator=gen, device="cuda")
        noise_prev = torch.randn(shape, generator=gen, device="cuda")
        sds = [_grad(lambda x: m.get_sds_loss(x, m.embeddings, guidance_scale=25, t=t, noise=noise), latents)
               for m in (eager, graphed)]
        pds = [_grad(lambda x: m.get_pds_loss(source, x, m.embeddings, m.edit, guidance_scale=7.5, t=t,
                                              noise=(noise, noise_prev)), latents) for m in (eager, graphed)]
        for (loss_e, grad_e), (loss_g, grad_g) in (sds, pds):
            scale = grad_e.abs().max().item()
            assert (grad_g - grad_e).abs().max().item() <= tol * max(scale, 1.0), (precision, step, t)
            assert abs(loss_g.item() - loss_e.item()) <= tol * max(abs(loss_e.item()), 1.0)
    # one graph per batch shape (2 for SDS, 4 for PDS), captured once and replayed after
    assert graphed.graphs.n_graphs == 2


@needs_cuda
@pytest.mark.parametrize("mode, precision", [("fresh", "fp32"), ("shared", "fp32"), ("fresh", "fp16")])
def test_graphed_vsd_trains_the_same_lora_as_eager(tiny_sd_dir, mode, precision):
    # TF32 convolutions (cuDNN's default) round to ~1e-3, and eager and captured backward passes may pick
    # different algorithms: compare in true fp32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        eager, graphed = _pair(tiny_sd_dir, precision, vsd_lora_timestep=mode)
        gen = torch.Generator("cuda").manual_seed(1)
        shape = eager.latent_shape(2)
        latents = torch.randn(shape, generator=gen, device="cuda")
        steps = [(700, torch.randn(shape, generator=gen, device="cuda")) for _ in range(4)]
        results, initial, final = {}, {}, {}
        for name, model in (("eager", eager), ("graphed", graphed)):
            embeddings = torch.cat([model.get_text_embeds(""), model.get_text_embeds("a red circle")])
            torch.manual_seed(5)  # the LoRA's init and its fresh t and noise come from the global generators
            torch.cuda.manual_seed(5)
            model.enable_lora()
            initial[name] = [p.detach().clone() for p in model.lora_parameters]
            results[name] = []
            for t, noise in steps:
                loss, grad = _grad(lambda x: model.get_vsd_loss(x, embeddings, t=t, noise=noise), latents)
                results[name].append((grad, model.last_lora_loss.item()))
            final[name] = [p.detach().clone() for p in model.lora_parameters]
    tol = TOLERANCE[precision]
    for step, ((grad_e, lora_e), (grad_g, lora_g)) in enumerate(zip(results["eager"], results["graphed"])):
        assert (grad_g - grad_e).abs().max().item() <= 10 * tol * grad_e.abs().max().item(), step
        assert lora_g == pytest.approx(lora_e, rel=10 * tol), step
    # What 4 AdamW steps changed in the LoRA agrees: the graph trains, and the warm-up calls made before its
    # capture were undone (left in, they would be 2 more steps: 50% more change).
    change_e = torch.cat([(f - i).flatten() for f, i in zip(final["eager"], initial["eager"])])
    change_g = torch.cat([(f - i).flatten() for f, i in zip(final["graphed"], initial["graphed"])])
    assert change_e.abs().max().item() > 1e-5
    assert (change_g - change_e).abs().max().item() <= 0.05 * change_e.abs().max().item()
    assert (change_g - change_e).norm().item() <= 0.05 * change_e.norm().item()
    graphed.reset_lora()
    assert graphed.graphs.n_graphs == 0


@needs_cuda
def test_graphed_vae_decode_equals_eager(tiny_sd_dir):
    eager, graphed = _pair(tiny_sd_dir, "fp32")
    latents = torch.randn(eager.latent_shape(1), generator=torch.Generator("cuda").manual_seed(2), device="cuda")
    for scale in (1.0, 3.0):  # a second call replays the graph on new inputs
        assert (graphed.decode_latents(scale * latents) - eager.decode_latents(scale * latents)).abs().max() < 1e-5
    assert graphed.graphs.n_graphs == 1


@needs_cuda
@pytest.mark.parametrize("loss_type", ["sds", "vsd"])
def test_main_run_with_graphs_matches_eager(tiny_sd_dir, tmp_path, loss_type):
    import main

    eager, graphed = _pair(tiny_sd_dir, "fp32")
    latents = {}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for name, model in (("eager", eager), ("graphed", graphed)):
            args = main.parse_args(["--prompt", "a red circle", "--model", str(tiny_sd_dir), "--loss_type", loss_type,
                                    "--step", "30", "--log_step", "10", "--device", "cuda",
                                    "--save_dir", str(tmp_path / name)])
            result = main.run(model, args, progress=False)
            assert result.status == "finished" and len(result.losses) == 30
            assert len(list((tmp_path / name).glob("*/progress/*.png"))) == 3
            latents[name] = result.latents
    difference = (latents["graphed"] - latents["eager"]).abs().max().item()
    assert difference <= 1e-3 * latents["eager"].abs().max().item(), difference
