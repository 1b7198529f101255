"""The structure the 3D and backend work builds on: guidance/ stands alone, without import cycles; the run configuration
is the one description of a run (flags, run_config.json, run_all's stale check); the loop fits on a screen; no script
asks a world its name."""
import ast
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main
import run_all
from guidance.config import RunConfig
from guidance.methods import OPTION_FLAGS

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("main.py", "run_all.py", "app.py", "app_requests.py", "eval.py", "report.py", "report_runs.py", "bench.py",
           "utils.py")


def guidance_modules() -> list[str]:
    return sorted(p.stem for p in (REPO / "guidance").glob("*.py") if p.stem != "__init__")


def test_guidance_imports_without_the_scripts(tmp_path):
    """guidance/ alone (as dropped into the course's skeleton) imports every module: a module that reaches for
    utils.py or main.py fails here."""
    shutil.copytree(REPO / "guidance", tmp_path / "guidance", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import importlib, sys\n" + "".join(f"importlib.import_module('guidance.{m}')\n" for m in guidance_modules())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any((tmp_path / name).exists() for name in SCRIPTS)


def module_imports(path: Path) -> set[str]:
    """Return the guidance modules a file imports at module level (imports inside functions are lazy by design)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("guidance."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("guidance.")}
    return found


def test_no_import_cycle_among_guidance_modules():
    graph = {m: module_imports(REPO / "guidance" / f"{m}.py") & set(guidance_modules()) for m in guidance_modules()}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for other in graph[node]:
            visit(other, path + [node])
        state[node] = "done"

    for module in graph:
        visit(module, [])
    assert "sd" not in graph["models"] and "families" not in graph["models"]  # the factory knows families by registry


def test_no_script_asks_a_world_its_name():
    """The scripts ask a world what they need (its prompts file, scorer, example); a '"toy"' literal would mean a
    script special-cases the toy world by name again."""
    offenders = []
    for path in [*(REPO / name for name in SCRIPTS), *(REPO / "guidance").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        if path.name in ("toy.py", "toy3d.py"):
            continue
        offenders += [f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if '"toy"' in line]
    assert offenders == []


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_loop_fits_on_a_screen_and_the_scripts_stay_short():
    assert function_lengths(REPO / "guidance" / "loop.py")["run"] <= 60
    for name in ("main.py", "run_all.py", "app.py"):
        long = {f: n for f, n in function_lengths(REPO / name).items() if n > 80}
        assert long == {}, f"{name}: {long}"


# ----------------------------------------------------------------------------------------------- the configuration
def test_every_field_is_a_flag_with_help_and_every_method_option_a_field():
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert set(OPTION_FLAGS) <= set(fields)
    assert all(f.metadata.get("help") for f in fields.values()), [n for n, f in fields.items() if not f.metadata.get("help")]
    flags = {a.dest for a in main.build_parser()._actions if a.dest != "help"}
    assert flags == set(fields)


def test_a_new_field_changes_results_unless_marked(tmp_path):
    """run_all's stale check derives from the fields: a field added without thought counts as result-changing."""
    from guidance.config import setting

    extended = dataclasses.make_dataclass("Extended", [("new_knob", int, setting(3, "a new setting")),
                                                       ("new_log", int, setting(0, "a logging setting",
                                                                                result=False))], bases=(RunConfig,))
    assert "new_knob" in extended.result_fields() and "new_log" not in extended.result_fields()
    assert "device" not in RunConfig.result_fields() and "log_step" not in RunConfig.result_fields()


@pytest.mark.parametrize("field, value", [("generator", "pixels"), ("t_anneal_to", 0.25), ("negative_prompt", "blurry"),
                                          ("lr", 0.05), ("t_range", (0.1, 0.9))])
def test_run_all_redoes_a_finished_run_when_any_result_setting_changed(tmp_path, field, value):
    item = run_all.Item("sds", "a_red_circle", 0, "a red circle", None, None, tmp_path)
    config = RunConfig(prompt="a red circle", model="toy", save_dir=str(tmp_path)).resolved()
    item.folder.write_config({**json.loads(json.dumps(config.to_record())), "status": "finished"})
    item.image_path.write_bytes(b"png")
    assert run_all.completion(item, config) == (True, "finished")
    done, why = run_all.completion(item, config.replace(**{field: value}))
    assert not done and why.startswith("settings changed: " + field)
    assert run_all.completion(item, config.replace(log_step=5, device="cpu"))[0]  # not result settings


def test_the_record_is_the_configuration(tmp_path):
    """run_config.json holds every field of the configuration under its own name, and a run made from the record
    again would be the same run."""
    config = main.parse_args(["--model", "toy", "--prompt", "a red circle", "--step", "3", "--log_step", "0",
                              "--save_dir", str(tmp_path)])
    result = main.run(main.build_model(config), config, progress=False)
    record = json.loads((result.run_dir / "run_config.json").read_text())
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    again = RunConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in fields})
    assert again == config.replace(device="cpu")  # the record says where the run ran (the flag left it open)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", record["finished"]) and record["steps_done"] == 3
