from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import catalog
from orchestrator.spec import Overrides, SpecError, load_spec, parse_duration

GOOD = """\
name: mnist-cnn
resources:
  vm_size: Standard_NC4as_T4_v3
  region: westeurope
  zone: 2
  disk_gb: 100
nodes: 2
setup: pip install -r requirements.txt
run: python train.py --epochs 3
env:
  EPOCHS: 3
  MODE: fast
secrets: [WANDB_API_KEY]
artifacts: [outputs, logs/train.log]
max_duration: 1h30m
budget_usd: 25
ssh:
  user: trainer
  allowed_cidrs: [203.0.113.7, 198.51.100.0/24]
expect:
  test_accuracy: ">= 0.99"
  loss: 0.5
"""


def error_of(job_dir: Callable[[str], Path], text: str, overrides: Overrides | None = None) -> str:
    path = job_dir(text)
    with pytest.raises(SpecError) as e:
        load_spec(path, overrides)
    return str(e.value)


def test_a_full_job_file_loads_with_defaults_and_types(job_dir: Callable[[str], Path]) -> None:
    spec = load_spec(job_dir(GOOD))
    assert spec.name == "mnist-cnn"
    assert spec.resources.zone == "2"
    assert spec.resources.image == "auto" and spec.resources.spot is False
    assert spec.setup == ["pip install -r requirements.txt"]
    assert spec.env == {"EPOCHS": "3", "MODE": "fast"}
    assert spec.max_duration == 5400
    assert spec.budget_usd == 25.0
    assert spec.ssh.allowed_cidrs == ["203.0.113.7/32", "198.51.100.0/24"]
    assert str(spec.expect["test_accuracy"]) == ">= 0.99"
    assert spec.expect["loss"].holds(0.7) and not spec.expect["loss"].holds(0.4)
    assert spec.workdir_path == Path(spec.base_dir)


def test_minimal_job_gets_the_documented_defaults(job_dir: Callable[[str], Path]) -> None:
    spec = load_spec(job_dir("name: tiny\nrun: python train.py\n"))
    assert spec.nodes == 1
    assert spec.resources.vm_size == "Standard_NC4as_T4_v3"
    assert spec.resources.region == "eastus"
    assert spec.ssh.user == "azureuser"
    assert spec.max_duration == 4 * 3600


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ("name: a\nrun: [unclosed\n", "job.yaml:3", "not valid YAML"),
        ("name: demo\nrun: x\nname: again\n", "job.yaml:3", "duplicate key 'name' (first at line 1)"),
        ("name: demo\nrun: x\nresources:\n  vm_sise: Standard_NC4as_T4_v3\n", "job.yaml:4", "unknown key"),
        ("name: demo\nrun: x\nnodes: three\n", "job.yaml:3", "wrong type"),
        ("name: demo\nrun: x\nnodes: 40\n", "job.yaml:3", "less than or equal to 16"),
        ("name: demo\nrun: x\nresources:\n  disk_gb: 10\n", "job.yaml:4", "greater than or equal to 30"),
        ("name: Demo_Job\nrun: x\n", "job.yaml:1", "not a valid job name"),
        ("name: demo\nrun: x\nssh:\n  user: root\n", "job.yaml:4", "Azure does not allow 'root'"),
        ("name: demo\nrun: x\nresources:\n  vm_size: Standard_NC4as_T4\n", "job.yaml:4", "Did you mean"),
        ("name: demo\nrun: x\nresources:\n  vm_size: standard_nc4as_t4_v3\n", "job.yaml:4", "case matters"),
        ("name: demo\nrun: x\nresources:\n  region: westeurop\n", "job.yaml:4", "Did you mean westeurope"),
        (
            "name: demo\nrun: x\nresources:\n  vm_size: Standard_ND96isr_H100_v5\n  region: japaneast\n",
            "job.yaml:3",
            "not offered in japaneast",
        ),
        ("name: demo\nrun: x\nresources:\n  zone: 4\n", "job.yaml:4", "zone must be 1, 2 or 3"),
        ("name: demo\nrun: x\nartifacts: [../secrets]\n", "job.yaml:3", "relative path inside"),
        ("name: demo\nrun: x\nartifacts: [/etc/passwd]\n", "job.yaml:3", "relative path inside"),
        ("name: demo\nrun: x\nworkdir: /srv/code\n", "job.yaml:3", "must be relative"),
        ("name: demo\nrun: x\nworkdir: missing\n", "job.yaml:3", "no folder"),
        ("name: demo\nrun: x\nmax_duration: forever\n", "job.yaml:3", "not a duration"),
        ("name: demo\nrun: x\nssh:\n  allowed_cidrs: [my-laptop]\n", "job.yaml:4", "not an IP address"),
        ("name: demo\nrun: x\nssh:\n  private_key: nope/id_rsa\n", "job.yaml:4", "no such file"),
        ("name: demo\nrun: x\nexpect:\n  acc: about 0.9\n", "job.yaml:4", "write a condition"),
        ("name: demo\nrun: x\nenv:\n  ORCH_RUN_ID: x\n", "job.yaml:4", "set by orchestrator"),
        ("name: demo\n", "job.yaml:1", "run: required key is missing"),
        ("- just\n- a list\n", "job.yaml:1", "must be a mapping"),
        ("", "job.yaml:1", "empty"),
    ],
)
def test_bad_input_names_file_line_and_what_is_allowed(
    job_dir: Callable[[str], Path], text: str, where: str, says: str
) -> None:
    message = error_of(job_dir, text)
    assert where in message
    assert says in message
    assert "Traceback" not in message


def test_binary_junk_and_non_utf8_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: demo\nrun: x\n\x00\x01\x02garbage")
    with pytest.raises(SpecError, match=r"job.yaml:3: .*binary data"):
        load_spec(path)
    path.write_bytes(b"name: demo\nrun: \xff\xfe\n")
    with pytest.raises(SpecError, match=r"job.yaml:2: .*not UTF-8"):
        load_spec(path)


def test_an_alias_bomb_is_refused_quickly(job_dir: Callable[[str], Path]) -> None:
    lines = ["name: demo", "run: x", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    start = time.perf_counter()
    message = error_of(job_dir, "\n".join(lines) + "\n")
    assert "too many values" in message
    assert time.perf_counter() - start < 5  # generous: the real figure is milliseconds


def test_anchors_and_merge_keys_still_work(job_dir: Callable[[str], Path]) -> None:
    text = "name: demo\nrun: x\nbase: &base {EPOCHS: '1'}\n"
    assert "unknown key" in error_of(job_dir, text)  # `base` itself is not a field...
    text = "name: demo\nrun: x\nenv:\n  <<: {EPOCHS: '1'}\n  LR: '0.1'\n"
    assert load_spec(job_dir(text)).env == {"EPOCHS": "1", "LR": "0.1"}


def test_several_problems_are_listed_each_with_its_line(job_dir: Callable[[str], Path]) -> None:
    message = error_of(job_dir, "name: demo\nrun: x\nnodes: 0\nresources:\n  disk_gb: 5\n  colour: red\n")
    assert "job.yaml:3: nodes:" in message
    assert "job.yaml:5: resources.disk_gb:" in message
    assert "job.yaml:6: resources.colour: unknown key" in message


def test_command_line_overrides_win_and_are_blamed_by_flag(job_dir: Callable[[str], Path]) -> None:
    path = job_dir("name: demo\nrun: x\nresources:\n  region: eastus\n")
    spec = load_spec(path, Overrides(region="westeurope", vm_size="Standard_NC24ads_A100_v4", spot=True, nodes=3))
    assert (spec.resources.region, spec.resources.vm_size, spec.resources.spot, spec.nodes) == (
        "westeurope",
        "Standard_NC24ads_A100_v4",
        True,
        3,
    )
    message = error_of(job_dir, "name: demo\nrun: x\n", Overrides(region="mars-central"))
    assert message.startswith("--region: resources.region: unknown region 'mars-central'")


def test_missing_file_and_folder_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "job.yaml").write_text("name: demo\nrun: x\n")
    with pytest.raises(SpecError, match="did you mean"):
        load_spec(tmp_path)


@pytest.mark.parametrize(("text", "seconds"), [("90m", 5400), ("2h", 7200), ("1h30m", 5400), (600, 600), ("1d", 86400)])
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10s", "8d", True, "soon", 3.5])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration|between 1 minute and 7 days"):
        parse_duration(bad)


def test_env_flags_override_and_are_blamed_by_flag(job_dir: Callable[[str], Path]) -> None:
    path = job_dir("name: demo\nrun: x\nenv:\n  DATASET: mnist\n")
    spec = load_spec(path, Overrides(env=("DATASET=digits", "EXTRA=1")))
    assert spec.env == {"DATASET": "digits", "EXTRA": "1"}
    assert "not KEY=VALUE" in error_of(job_dir, "name: demo\nrun: x\n", Overrides(env=("NOEQUALS",)))
    assert error_of(job_dir, "name: demo\nrun: x\n", Overrides(env=("ORCH_X=1",))).startswith("--env: env.ORCH_X")


@pytest.mark.parametrize("size", ["Standard_NC6s_v3", "Standard_NC12s_v3", "Standard_NC24s_v3", "Standard_NC24rs_v3"])
def test_a_retired_size_is_refused_with_its_date_and_a_replacement(job_dir: Callable[[str], Path], size: str) -> None:
    message = error_of(job_dir, f"name: demo\nrun: x\nresources:\n  vm_size: {size}\n  region: eastus\n")
    assert "/" + f"job.yaml:4: resources.vm_size: {size} was retired by Azure on 2025-09-30" in message
    assert "Standard_NC24ads_A100_v4" in message
    flagged = error_of(job_dir, "name: demo\nrun: x\n", Overrides(vm_size=size))
    assert flagged.startswith(f"--vm-size: resources.vm_size: {size} was retired")


def test_retired_sizes_are_never_suggested_or_listed(job_dir: Callable[[str], Path]) -> None:
    typo = error_of(job_dir, "name: demo\nrun: x\nresources:\n  vm_size: Standard_NC6s_v4\n")
    assert "NC6s_v3" not in typo and "NC12s_v3" not in typo
    unknown = error_of(job_dir, "name: demo\nrun: x\nresources:\n  vm_size: Zeta\n")
    assert "Known GPU sizes" in unknown
    assert not any(retired in unknown or retired in typo for retired in catalog.RETIRED_SIZES)
    lower = error_of(job_dir, "name: demo\nrun: x\nresources:\n  vm_size: standard_nc6s_v3\n")
    assert "was retired by Azure on 2025-09-30" in lower


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # GPU size -> image auto -> ubuntu-hpc 2204, whose OS disk is 64 GB
        ("resources:\n  disk_gb: 40\n", "40 GB is smaller than the 64 GB OS disk of image ubuntu-hpc-22.04"),
        (
            "resources:\n  image: microsoft-dsvm:ubuntu-hpc:2204:latest\n  disk_gb: 63\n",
            "63 GB is smaller than the 64 GB OS disk of image microsoft-dsvm:ubuntu-hpc:2204:latest",
        ),
        (
            "resources:\n  vm_size: Standard_D4s_v5\n  image: ubuntu-hpc-22.04\n  disk_gb: 32\n",
            "32 GB is smaller than the 64 GB OS disk of image ubuntu-hpc-22.04",
        ),
    ],
)
def test_a_disk_smaller_than_the_image_is_refused(job_dir: Callable[[str], Path], text: str, says: str) -> None:
    message = error_of(job_dir, "name: demo\nrun: x\n" + text)
    line = 2 + text.count("\n")  # disk_gb is the last line
    assert "/" + f"job.yaml:{line}: resources.disk_gb: {says}" in message
    assert "at least 64" in message


def test_cpu_images_accept_their_own_minimum(job_dir: Callable[[str], Path]) -> None:
    spec = load_spec(job_dir("name: demo\nrun: x\nresources:\n  vm_size: Standard_D4s_v5\n  disk_gb: 30\n"))
    assert spec.resources.disk_gb == 30  # ubuntu-24.04's OS disk is 30 GB
    assert load_spec(job_dir("name: demo\nrun: x\nresources:\n  disk_gb: 64\n")).resources.disk_gb == 64


def test_the_vm_size_flag_applies_the_image_minimum(job_dir: Callable[[str], Path]) -> None:
    text = "name: demo\nrun: x\nresources:\n  vm_size: Standard_D4s_v5\n  disk_gb: 32\n"
    assert load_spec(job_dir(text)).resources.disk_gb == 32
    message = error_of(job_dir, text, Overrides(vm_size="Standard_NC4as_T4_v3"))
    assert "/" + "job.yaml:5: resources.disk_gb: 32 GB is smaller than the 64 GB OS disk" in message
    assert "Standard_NC4as_T4_v3" in message


def test_b_series_cannot_be_spot(job_dir: Callable[[str], Path]) -> None:
    message = error_of(job_dir, "name: demo\nrun: x\nresources:\n  vm_size: Standard_B2s\n  spot: true\n")
    assert "job.yaml:3: resources: Standard_B2s cannot run as a Spot VM" in message


def test_an_a10_size_is_refused_with_the_reason(job_dir: Callable[[str], Path]) -> None:
    from orchestrator.errors import UserInputError
    from orchestrator.spec import load_spec

    path = job_dir("name: a10\nrun: python train.py\nresources:\n  vm_size: Standard_NV36ads_A10_v5\n")
    with pytest.raises(UserInputError, match=r"job.yaml:4: resources.vm_size: .*GRID driver.*Standard_NC4as_T4_v3"):
        load_spec(str(path))


def test_a_missing_requirements_file_is_said_with_the_field_errors(tmp_path: Path) -> None:
    """One pass: the user sees every problem of the file at once, the requirements file's included."""
    job = tmp_path / "job.yaml"
    job.write_text("name: BAD NAME\nresources:\n  disk_gb: 20\npython:\n  requirements: nope.txt\nrun: python x.py\n")
    with pytest.raises(SpecError) as info:
        load_spec(job)
    assert [(p.where, p.field) for p in info.value.problems] == [
        (f"{job}:1", "name"),
        (f"{job}:3", "resources.disk_gb"),
        (f"{job}:5", "python.requirements"),
    ]
    assert info.value.problems[2].message.startswith(f"no such file {tmp_path / 'nope.txt'}")
