"""bench.py on the tiny model: every figure is there and sane, each ratio is its step over its floor.

Speed itself is never asserted here (STYLE.md): the figures are published from bench.py runs.
"""
import json
import math
import statistics

import pytest

import bench
from benchmarks.full import format_table, split_loop
from benchmarks.memory import MEMORY_STEPS
from utils import UserError, run_cli

ROUND_FIGURES = ("floor_b2", "sds", "floor_b4", "pds", "vsd", "vsd_shared", "lora_forward", "lora_train")
MEMORY_FIGURES = ("floor_b2", "sds", "floor_b4", "pds", "vsd", "vsd_shared")
LOOP_FIGURES = ("main_loop_nolog", "main_loop")


@pytest.fixture(scope="module")
def result(tiny_sd_dir):
    """Return bench.py's JSON for the tiny model: 2 rounds, main.py's loop logging every 2 steps."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = bench.main(["--model", str(tiny_sd_dir), "--device", "cpu", "--steps", "2", "--warmup", "1",
                           "--log_step", "2", "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def test_every_figure_is_reported_with_positive_times(result):
    assert set(result["figures"]) == set(ROUND_FIGURES + LOOP_FIGURES)
    for name, figure in result["figures"].items():
        assert figure["time_s"] > 0 and math.isfinite(figure["time_s"]), name
        assert figure["steps_per_s"] == pytest.approx(1 / figure["time_s"])
    for name in ROUND_FIGURES:
        samples = result["figures"][name]["samples_s"]
        assert len(samples) == 2 and all(s > 0 for s in samples)
        assert result["figures"][name]["time_s"] == pytest.approx(statistics.median(samples))
    # One run of --steps + 1 = 3 steps at --log_step 2: steps 0 and 2 log, step 1 gives the figure without logging
    assert result["figures"]["main_loop"]["steps"] == 3
    assert result["figures"]["main_loop_nolog"]["steps"] == 1
    assert result["figures"]["main_loop_nolog"]["samples_s"] == [result["figures"]["main_loop"]["samples_s"][1]]
    assert (result["model"], result["device"], result["precision"], result["rounds"]) == (
        result["source"], "cpu", "fp32", 2)
    assert result["unet_params"] > 0 and result["latent_shape"][0] == 1


def test_each_ratio_is_the_step_over_its_floor(result):
    figures = result["figures"]
    expected_floor = {"sds": "floor_b2", "pds": "floor_b4", "vsd": "floor_b2", "vsd_shared": "floor_b2",
                      "main_loop_nolog": "floor_b2", "main_loop": "floor_b2"}
    for name, floor in expected_floor.items():
        figure = figures[name]
        assert figure["floor"] == floor
        if name in ROUND_FIGURES:  # interleaved rounds: per round, the step over that round's floor
            per_round = [s / f for s, f in zip(figure["samples_s"], figures[floor]["samples_s"])]
            assert figure["ratio"] == pytest.approx(statistics.median(per_round), rel=1e-12)
            assert figure["floor_s"] == figures[floor]["time_s"]
        else:  # main.py's loop: median non-logging step (+ a logging step's extra over --log_step steps) / median floor
            assert figure["ratio"] == pytest.approx(figure["time_s"] / figure["floor_s"], rel=1e-12)
            assert figure["floor_s"] == pytest.approx(statistics.median(figure["floor_samples_s"]))
            assert len(figure["floor_samples_s"]) == 3  # a floor before each of the run's steps
            assert len(figure["samples_s"]) == figure["steps"]
    steps = figures["main_loop"]["samples_s"]
    typical = steps[1]  # --log_step 2: steps 0 and 2 log
    assert figures["main_loop_nolog"]["time_s"] == pytest.approx(typical)
    assert figures["main_loop"]["time_s"] == pytest.approx(typical + statistics.fmean([steps[0] - typical,
                                                                                       steps[2] - typical]) / 2)
    assert "ratio" not in figures["floor_b2"] and "ratio" not in figures["floor_b4"]
    # VSD against the sum of its own UNet work, per round: batch-2 floor + LoRA forward + LoRA training step
    parts = [sum(figures[n]["samples_s"][i] for n in ("floor_b2", "lora_forward", "lora_train")) for i in range(2)]
    assert figures["vsd"]["parts_s"] == pytest.approx(statistics.median(parts))
    assert figures["vsd"]["ratio_to_parts"] == pytest.approx(
        statistics.median(v / p for v, p in zip(figures["vsd"]["samples_s"], parts)))
    assert figures["vsd"]["parts_floor_ratio"] > 1


def test_memory_and_targets_are_consistent(result):
    assert result["memory"]["loaded_mb"] > 100  # torch + two loaded models
    for name in MEMORY_FIGURES:
        added = result["figures"][name]["peak_added_mb"]
        assert -50 < added < 2000, (name, added)  # the tiny model's steps add little over the loaded models
    targets = result["targets"]
    assert set(targets) == {"sds_ratio", "sds_added_mb", "pds_ratio", "pds_added_mb", "vsd_ratio", "main_loop_ratio"}
    assert targets["sds_ratio"]["value"] == result["figures"]["sds"]["ratio"]
    assert targets["pds_added_mb"]["value"] == result["figures"]["pds"]["peak_added_mb"]
    for target in targets.values():
        assert target["met"] == (target["value"] <= target["max"])


def test_table_names_every_figure(result):
    table = format_table(result)
    for figure in result["figures"].values():
        assert figure["label"] in table
    assert "--log_step 2" in table


def test_bad_model_fails_fast_with_its_name(capsys):
    with pytest.raises(UserError, match="no-such-model"):
        bench.parse_args(["--model", "no-such-model", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: bench.main(["--model", "no-such-model", "--device", "cpu"]))
    assert exit_info.value.code == 2
    assert "no-such-model" in capsys.readouterr().err


def test_toy_model_runs_or_is_skipped(capsys):
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = bench.main(["--model", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--log_step", "1",
                           "--no_memory", "--json"])
    assert code == 0
    if out.getvalue():
        figures = json.loads(out.getvalue())["figures"]
        assert figures["sds"]["ratio"] > 0 and figures["vsd"]["ratio"] > 0
    else:
        assert "skipped --model toy" in capsys.readouterr().err


def test_variants_time_the_floor_and_sds_of_each(tiny_sd_dir):
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = bench.main(["--model", str(tiny_sd_dir), "--device", "cpu", "--steps", "2", "--warmup", "0",
                           "--variants", "default,channels_last,classic_attention", "--json"])
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["reference"] == "default" and list(result["variants"]) == ["default", "channels_last",
                                                                             "classic_attention"]
    for name, figure in result["variants"].items():
        for item in ("floor_b2", "sds"):
            mine, ref = figure[f"{item}_samples_s"], result["variants"]["default"][f"{item}_samples_s"]
            assert len(mine) == 2 and all(s > 0 for s in mine)
            assert figure[f"{item}_speedup"] == pytest.approx(statistics.median(r / m for r, m in zip(ref, mine)))
    assert result["variants"]["default"]["floor_b2_speedup"] == 1.0
    with pytest.raises(UserError, match="warp_speed"):
        bench.parse_args(["--model", str(tiny_sd_dir), "--device", "cpu", "--variants", "default,warp_speed"])


def test_split_loop_takes_logging_off_from_the_steps_that_did_not_log():
    run = {"samples_s": [3.0, 1.0, 1.2, 0.9, 5.0, 1.1, 4.0], "floor_s": 1.0, "floor_samples_s": [1.0] * 7}
    loops = split_loop(run, 4)  # steps 0 and 4 log, and the last one (6): main.run logs the final step too
    assert loops["main_loop_nolog"]["samples_s"] == [1.0, 1.2, 0.9, 1.1]
    assert loops["main_loop_nolog"]["time_s"] == pytest.approx(1.05)
    assert loops["main_loop"]["time_s"] == pytest.approx(1.05 + ((3.0 - 1.05) + (5.0 - 1.05) + (4.0 - 1.05)) / 3 / 4)
    assert split_loop(run, 0)["main_loop"]["time_s"] == pytest.approx(1.2)  # logging off: the median
    only_logging = split_loop(run, 1)  # every step logs: no figure without logging from this run
    assert set(only_logging) == {"main_loop"} and only_logging["main_loop"]["time_s"] == pytest.approx(1.2)


def test_methods_mode_times_every_method_against_the_unet_calls_it_made(tiny_sd_dir):
    import io
    from contextlib import redirect_stdout

    from guidance.methods import METHODS

    out = io.StringIO()
    with redirect_stdout(out):
        assert bench.main(["--model", str(tiny_sd_dir), "--device", "cpu", "--steps", "2", "--warmup", "0",
                           "--methods", "--json"]) == 0
    methods = json.loads(out.getvalue())["methods"]
    assert set(methods) == {name for name, m in METHODS.items() if not m.lora and m.sampler is None}
    # rows per UNet call, as each loss's docstring states (t = 500: ISM inverts to s = 420 in 3 steps)
    expected_rows = {"sds": [2], "pds": [4], "sds_edit": [2], "nfsd": [3], "csd": [2], "dds": [4], "bridge": [2], "asd": [3],
                     "ism": [1, 1, 1, 1, 2], "sdi": [2] * 11}  # SDI's inversion steps with CFG (the authors')
    for name, figure in methods.items():
        assert figure["unet_call_rows"] == expected_rows[name], name
        assert figure["unet_rows_per_step"] == sum(expected_rows[name])
        per_round = [s / w for s, w in zip(figure["step_samples_s"], figure["unet_work_samples_s"])]
        assert figure["ratio_to_unet_work"] == pytest.approx(statistics.median(per_round), rel=1e-12)


def test_methods_mode_refuses_unknown_methods():
    with pytest.raises(UserError, match="unknown --methods vsd, nope"):
        bench.parse_args(["--model", "tiny", "--methods", "vsd", "nope"])


def test_memory_mode_gives_each_part_and_each_step_of_a_family(tmp_path):
    """--memory on a tiny SDXL: its four parts' weights as their own parameter bytes, and the three steps' peaks."""
    import io
    from contextlib import redirect_stdout

    from diffusers import UNet2DConditionModel

    from benchmarks.random_sd import build_random_sd

    folder = build_random_sd(tmp_path / "sdxl", "tiny-sdxl")
    out = io.StringIO()
    with redirect_stdout(out):
        assert bench.main(["--model", str(folder), "--device", "cpu", "--memory", "--json"]) == 0
    result = json.loads(out.getvalue())
    assert result["family"] == "sdxl" and result["latent_shape"] == [1, 4, 8, 8]
    assert set(result["weights_mb"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet_bytes = sum(t.numel() * t.element_size() for t in list(unet.parameters()) + list(unet.buffers()))
    assert result["weights_mb"]["unet"] == pytest.approx(unet_bytes / 1e6, rel=1e-9)
    memory = result["memory"]
    assert set(memory["added_mb"]) == set(memory["first_step_s"]) == set(MEMORY_STEPS)
    assert all(math.isfinite(mb) and mb >= 0 for mb in memory["added_mb"].values())
    assert all(s > 0 for s in memory["first_step_s"].values()) and memory["loaded_mb"] > 0


@pytest.mark.parametrize("flags", [["--memory", "--methods"], ["--memory", "--no_memory"]])
def test_memory_mode_is_a_run_of_its_own(flags):
    with pytest.raises(UserError, match="--memory is a run of its own"):
        bench.parse_args(["--model", "tiny", "--device", "cpu", *flags])


def test_nerf_and_mesh_modes_report_each_figure(tiny_sd_dir):
    """bench.py --nerf: the NeRF's render, backward and VAE encode per view with the floor they are set against;
    --mesh: the rasteriser per mesh size and the texture's backward (times only checked to be measured)."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert bench.main(["--model", str(tiny_sd_dir), "--device", "cpu", "--nerf", "16", "--steps", "1",
                           "--warmup", "0", "--threads", "1", "--json"]) == 0
    nerf = json.loads(out.getvalue())
    assert nerf["floor"]["s"] > 0 and set(nerf["sizes"]["16"]) == {"render", "render_backward", "encode_backward"}
    assert all(v["s"] > 0 for v in nerf["sizes"]["16"].values()) and nerf["latent_render"]["s"] > 0
    out = io.StringIO()
    with redirect_stdout(out):
        assert bench.main(["--device", "cpu", "--mesh", "32", "--steps", "1", "--threads", "1", "--json"]) == 0
    mesh = json.loads(out.getvalue())
    assert {row["faces"] for row in mesh["rows"]} == {9800, 99224} and all(row["size"] == 32 for row in mesh["rows"])
    with pytest.raises(UserError, match="separate runs"):
        bench.parse_args(["--nerf", "--mesh"])
