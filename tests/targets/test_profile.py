"""Target profiles in engines/profiles/: shipped data is valid and broken profiles are refused by field."""
from __future__ import annotations

import copy
import json

import pytest

from slim_trt.errors import SlimError
from slim_trt.linter import TARGETS as LINT_TARGETS
from slim_trt.targets.profile import GpuInfo
from slim_trt.targets.profile import check_target, list_targets, load_target, profile_from_dict, target_for_gpu

SHIPPED = ["ada", "ampere", "hopper", "jetson-orin", "jetson-thor"]


def gpu(cc: tuple[int, int], name: str = "GPU") -> GpuInfo:
    return GpuInfo(0, name, cc, 80 * 2**30)


def test_shipped_profiles_are_valid_and_name_lint_targets():
    assert list_targets() == SHIPPED
    for name in SHIPPED:
        t = load_target(name)
        assert t.name == name and t.lint_target in LINT_TARGETS
        assert set(t.lint_target_by_tensorrt_major.values()) <= set(LINT_TARGETS)
        assert t.supports["sparsity_2_4"] and t.supports["int4_weights"]  # every target has both
    assert [n for n in SHIPPED if load_target(n).supports["fp8"]] == ["ada", "hopper", "jetson-thor"]
    assert [n for n in SHIPPED if load_target(n).supports["fp4"]] == ["jetson-thor"]
    assert load_target("jetson-orin").lint_target == "jetson-orin-jp6"
    assert load_target("hopper").lint_target_for("11.1.0") == "trt11"
    assert load_target("jetson-orin").lint_target_for("10.3.0.30") == "jetson-orin-jp6"


@pytest.mark.parametrize("cc,expected", [((8, 0), "ampere"), ((8, 6), "ampere"), ((8, 7), "jetson-orin"),
                                         ((8, 9), "ada"), ((9, 0), "hopper"), ((11, 0), "jetson-thor"),
                                         ((7, 5), None)])
def test_target_from_compute_capability(cc, expected):
    t = target_for_gpu(gpu(cc))
    assert (t.name if t else None) == expected


def test_target_must_match_gpu_and_tensorrt():
    hopper = load_target("hopper")
    check_target(hopper, gpu((9, 0)), "10.13.3")
    with pytest.raises(SlimError, match=r"--target hopper is for compute capability 9.0 but this GPU is A100 \(8.0\)"):
        check_target(hopper, gpu((8, 0), "A100"), "10.13.3")
    with pytest.raises(SlimError, match="needs TensorRT 10.3 to 11.x, this machine has 10.2.0"):
        check_target(load_target("jetson-orin"), gpu((8, 7)), "10.2.0")
    with pytest.raises(SlimError, match="this machine has 12.0"):
        check_target(hopper, None, "12.0")


def _hopper_dict() -> dict:
    return json.loads(load_target("hopper").source and open(load_target("hopper").source).read())


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d["supports"].pop("fp8"), "supports"),
    (lambda d: d["supports"].update(fp8="yes"), "supports"),
    (lambda d: d.update(compute_capabilities=["9"]), "compute capability '9'"),
    (lambda d: d.update(compute_capabilities=[]), "compute_capabilities"),
    (lambda d: d.update(lint_target="trt9"), "lint target 'trt9'"),
    (lambda d: d["default_shapes"].update(sequence=[1, 4096, 256]), "default_shapes.sequence"),
    (lambda d: d["default_shapes"].update(batch=[0, 1, 1]), "default_shapes.batch"),
    (lambda d: d.update(workspace_gb=80), "workspace_gb must be smaller"),
    (lambda d: d.update(memory_budget_gb=-1), "memory_budget_gb"),
    (lambda d: d.update(platform="cloud"), "platform"),
    (lambda d: d["tensorrt"].update(min_version="12.0"), "tensorrt.min_version"),
])
def test_broken_profile_is_refused_naming_the_field(mutate, field):
    d = copy.deepcopy(_hopper_dict())
    mutate(d)
    with pytest.raises(SlimError, match="target profile my.json: .*" + field.replace("(", r"\(").replace(".", r"\.")):
        profile_from_dict(d, "my.json")


def test_load_target_by_name_or_path(tmp_path):
    with pytest.raises(SlimError, match="unknown --target 'volta': choose one of ada, ampere, hopper, jetson-orin"):
        load_target("volta")
    custom = _hopper_dict() | {"name": "my-h100"}
    path = tmp_path / "my-h100.json"
    path.write_text(json.dumps(custom))
    assert load_target(str(path)).name == "my-h100"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SlimError, match="is not valid JSON"):
        load_target(str(tmp_path / "bad.json"))


def test_user_profiles_add_to_and_replace_shipped_ones(tmp_path, monkeypatch):
    """$SLIM_TRT_PROFILES_DIR folders come first, then ./engines/profiles/, then the shipped profiles."""
    monkeypatch.chdir(tmp_path)
    env_dir, local_dir = tmp_path / "mine", tmp_path / "engines" / "profiles"
    env_dir.mkdir()
    local_dir.mkdir(parents=True)
    (local_dir / "my-l4.json").write_text(json.dumps(_hopper_dict() | {"name": "my-l4", "memory_budget_gb": 24}))
    (local_dir / "hopper.json").write_text(json.dumps(_hopper_dict() | {"memory_budget_gb": 141}))
    assert list_targets() == sorted(SHIPPED + ["my-l4"])
    assert load_target("my-l4").memory_budget_gb == 24
    assert load_target("hopper").memory_budget_gb == 141  # ./engines/profiles/ replaces the shipped hopper
    assert load_target("ampere").source.endswith("ampere.json") and "engines" not in load_target("ampere").source
    (env_dir / "hopper.json").write_text(json.dumps(_hopper_dict() | {"memory_budget_gb": 94}))
    monkeypatch.setenv("SLIM_TRT_PROFILES_DIR", str(env_dir))
    assert load_target("hopper").memory_budget_gb == 94  # the environment comes first
    (env_dir / "h200.json").write_text(json.dumps(_hopper_dict()))  # file name and profile name differ
    with pytest.raises(SlimError, match="its name 'hopper' must match the file name"):
        load_target("h200")
