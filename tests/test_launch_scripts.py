"""Fast checks of launch/ without a cluster: syntax, documented variables, rendezvous
resolution (with a stand-in scontrol), the srun command the job scripts build, the job scripts'
one shape and their bootstrap. Time limits, the requeue guard and health checks:
test_launch_guards.py."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import launch_fixtures
import pytest
from launch_fixtures import run_bash
from paths import ROOT

LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
# Libraries sourced by the job scripts (common.sh sources the common_*.sh files); never run.
LIBRARIES = sorted(LAUNCH.glob("common*.sh"))
TRAIN_SCRIPTS = ["mm8b", "mm1b5", "transformer8b", "transformer1b5", "mm8b_32k"]
# Job scripts (submitted with sbatch): their variables are documented in launch/README.md only.
JOB_SCRIPTS = [*TRAIN_SCRIPTS, "preprocess"]
# Tools run by hand: each documents its own variables in its header.
TOOLS = [p for p in SCRIPTS if p not in LIBRARIES and p.stem not in JOB_SCRIPTS]
CONFIGS = {
    "mm8b": "mm_8b.yaml",
    "mm1b5": "mm_1b5.yaml",
    "transformer8b": "transformer_8b.yaml",
    "transformer1b5": "transformer_1b5.yaml",
    "mm8b_32k": "mm_8b_32k.yaml",
}
VAR_RE = re.compile(r"\bMM_[A-Z0-9_]+\b")
stub_env = launch_fixtures.stub_env  # the fixture: stand-in scontrol/srun, no SLURM context


# ----------------------------------------------------------------------------- syntax and docs
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(
        ["shellcheck", "-x", "-P", str(LAUNCH), *map(str, SCRIPTS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_strict_mode(script: Path) -> None:
    if script in LIBRARIES:  # sourced by the scripts, which set the mode
        return
    assert "set -euo pipefail" in script.read_text()


def header(text: str) -> str:
    """The leading comment block (the #SBATCH lines included)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            lines.append(line)
        elif lines:
            break
    return "\n".join(lines)


def common_functions() -> dict[str, str]:
    """Function name -> body, for every function in launch/common*.sh."""
    text = "\n".join(p.read_text() for p in LIBRARIES)
    funcs, name, body = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^(mm_[a-z0-9_]+)\(\) \{(.*)$", line)
        if m:
            name, body = m.group(1), [m.group(2)]
            if m.group(2).rstrip().endswith("}"):
                funcs[name], name = "\n".join(body), None
            continue
        if name:
            if line == "}":
                funcs[name], name = "\n".join(body), None
            else:
                body.append(line)
    return funcs


def variables_read(script: Path) -> set[str]:
    """MM_* variables the script reads, itself or through the common.sh functions it calls."""
    funcs = common_functions()
    text = "\n".join(
        line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    seen, todo, names = set(), [text], set()
    while todo:
        chunk = todo.pop()
        names |= set(VAR_RE.findall(chunk))
        for fname, fbody in funcs.items():
            if fname not in seen and re.search(rf"\b{fname}\b", chunk):
                seen.add(fname)
                todo.append(fbody)
    return names


@pytest.mark.parametrize("script", TOOLS, ids=lambda p: p.name)
def test_header_documents_every_variable(script: Path) -> None:
    head = header(script.read_text())
    documented = set(VAR_RE.findall(head))
    missing = sorted(variables_read(script) - documented)
    assert not missing, f"{script.name} reads {missing} but its header does not document them"


def readme_rows() -> dict[str, str]:
    """Variable -> its row in a table of launch/README.md (the one reference of the variables)."""
    readme = (LAUNCH / "README.md").read_text()
    return {
        m.group(1): m.group(0) for m in re.finditer(r"^\| `(MM_[A-Z0-9_]+)` \|.*$", readme, re.M)
    }


@pytest.mark.parametrize("name", JOB_SCRIPTS)
def test_readme_has_a_row_for_every_job_variable(name: str) -> None:
    missing = sorted(variables_read(LAUNCH / f"{name}.sh") - set(readme_rows()))
    assert not missing, f"{name}.sh reads {missing} but launch/README.md has no row for them"


def test_readme_documents_every_variable() -> None:
    readme = (LAUNCH / "README.md").read_text()
    names = set()
    for script in SCRIPTS:
        if script not in LIBRARIES:
            names |= variables_read(script)
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"launch/README.md does not mention {missing}"


@pytest.mark.parametrize("name", TRAIN_SCRIPTS)
def test_training_scripts_sbatch_defaults(name: str) -> None:
    text = (LAUNCH / f"{name}.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M))
    assert sbatch["job-name"] == name
    assert sbatch["gpus-per-node"] == sbatch["ntasks-per-node"] == "8"
    for flag in ("exclusive", "requeue", "nodes", "time"):
        assert flag in sbatch, flag
    assert re.fullmatch(r"B:USR1@\d+", sbatch["signal"])
    assert sbatch["open-mode"] == "append"
    assert f"pretrain/configs/{CONFIGS[name]}" in text
    assert (ROOT / "pretrain" / "configs" / CONFIGS[name]).exists()


# ----------------------------------------------------------------------------- rendezvous
def resolve(env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_bash("source launch/common.sh; mm_resolve_master_addr", env)


def test_rendezvous_outside_slurm_fails_loudly(stub_env: dict[str, str]) -> None:
    proc = resolve(stub_env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "SLURM_JOB_NODELIST is not set" in proc.stderr


def test_rendezvous_first_host_node_addr(stub_env: dict[str, str]) -> None:
    env = {
        **stub_env,
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "STUB_HOSTNAMES": "gpu07 gpu08",
        "STUB_FIRST": "gpu07",
        "STUB_NODE": "NodeName=gpu07 NodeAddr=10.1.2.7 NodeHostName=gpu07 State=ALLOCATED",
    }
    proc = resolve(env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "10.1.2.7"


def test_rendezvous_explicit_override(stub_env: dict[str, str]) -> None:
    proc = resolve({**stub_env, "MM_MASTER_ADDR": "gpu07-ib0"})
    assert proc.returncode == 0
    assert proc.stdout.strip() == "gpu07-ib0"


@pytest.mark.parametrize(
    "case", ["no hosts", "scontrol fails", "no address", "unresolvable", "loopback across hosts"]
)
def test_rendezvous_fails_loudly(stub_env: dict[str, str], case: str) -> None:
    env = {
        **stub_env,
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "STUB_HOSTNAMES": "gpu07 gpu08",
        "STUB_FIRST": "gpu07",
    }
    expect = {
        "no hosts": "no host in SLURM_JOB_NODELIST",
        "scontrol fails": "failed",
        "no address": "no NodeAddr/NodeHostName",
        "unresolvable": "does not resolve",
        "loopback across hosts": "loopback",
    }[case]
    if case == "no hosts":
        env["STUB_HOSTNAMES"] = ""
    elif case == "scontrol fails":
        env["STUB_RC"] = "1"
    elif case == "no address":
        env["STUB_NODE"] = "NodeName=gpu07 NodeAddr=(null) NodeHostName=(null)"
    elif case == "unresolvable":
        env["STUB_NODE"] = "NodeName=gpu07 NodeAddr=gpu07.invalid NodeHostName=gpu07"
    else:
        env["STUB_NODE"] = "NodeName=gpu07 NodeAddr=127.0.0.1 NodeHostName=hostA"
        env["STUB_NODES"] = (
            "NodeName=gpu07 NodeAddr=127.0.0.1 NodeHostName=hostA\n"
            "NodeName=gpu08 NodeAddr=127.0.0.1 NodeHostName=hostB"
        )
    proc = resolve(env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "", "nothing may be printed as a rendezvous address"
    assert "ERROR: rendezvous" in proc.stderr and expect in proc.stderr, proc.stderr
    assert "localhost" not in proc.stdout


def test_rendezvous_loopback_on_one_machine_is_allowed(stub_env: dict[str, str]) -> None:
    env = {
        **stub_env,
        "SLURM_JOB_NODELIST": "n[1-2]",
        "STUB_HOSTNAMES": "n1 n2",
        "STUB_FIRST": "n1",
        "STUB_NODE": "NodeName=n1 NodeAddr=127.0.0.1 NodeHostName=vm",
        "STUB_NODES": "NodeName=n1 NodeAddr=127.0.0.1 NodeHostName=vm\n"
        "NodeName=n2 NodeAddr=127.0.0.1 NodeHostName=vm",
    }
    proc = resolve(env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "127.0.0.1"


def job_env(stub_env: dict[str, str], **extra: str) -> dict[str, str]:
    """A fake 2-node GPU job context for a dry run."""
    return {
        **stub_env,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_CPUS_ON_NODE": "96",
        "SLURM_GPUS_PER_NODE": "8",
        "STUB_HOSTNAMES": "gpu07 gpu08",
        "STUB_FIRST": "gpu07",
        "STUB_NODE": "NodeName=gpu07 NodeAddr=10.1.2.7 NodeHostName=gpu07",
        "MM_REPO": str(ROOT),
        "MM_DRY_RUN": "1",
        **extra,
    }


def test_job_script_fails_before_srun_when_rendezvous_fails(
    stub_env: dict[str, str], tmp_path: Path
) -> None:
    env = job_env(
        stub_env,
        MM_DRY_RUN="0",
        MM_OUTPUT_DIR=str(tmp_path / "run"),
        STUB_NODE="NodeName=gpu07 NodeAddr=gpu07.invalid NodeHostName=gpu07",
    )
    proc = run_bash("bash launch/mm8b.sh", env)
    assert proc.returncode == 2, proc.stderr
    assert "does not resolve" in proc.stderr
    calls = Path(env["STUB_CALLS"])
    assert not calls.exists() or "srun" not in calls.read_text()


# ----------------------------------------------------------------------------- srun command
def dry_run(script: str, env: dict[str, str], *args: str) -> str:
    proc = run_bash(f"bash launch/{script}.sh " + " ".join(args), env)
    assert proc.returncode == 0, proc.stderr
    return " ".join(shlex.split(proc.stdout))  # the printed command is shell-quoted


@pytest.mark.parametrize("name", TRAIN_SCRIPTS)
def test_dry_run_srun_command(stub_env: dict[str, str], tmp_path: Path, name: str) -> None:
    env = job_env(
        stub_env,
        MM_OUTPUT_DIR=str(tmp_path / "run"),
        MM_DATA_BLEND="0.7 /data/web 0.3 /data/code",
        MM_TOKENIZER="/tok/llama3",
        MM_EXTRA_ARGS="train.iters=100",
    )
    cmd = dry_run(name, env, "parallel.tensor_model_parallel_size=4")
    assert cmd.startswith("srun ")
    for part in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--ntasks=16",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "pretrain/pretrain_mm.py",
        f"--config pretrain/configs/{CONFIGS[name]}",
        f"checkpoint.dir={tmp_path}/run/checkpoints",
        f"logging.dir={tmp_path}/run/logs",
        "runtime.stop_file=",
        "data.train_blend=[0.7,/data/web,0.3,/data/code]",
        "data.tokenizer=/tok/llama3",
        "train.iters=100",
        "parallel.tensor_model_parallel_size=4",
    ):
        assert part in cmd, (part, cmd)
    assert ("checkpoint.init_from=" in cmd) == (name == "mm8b_32k")


def test_dry_run_cpu_mode(stub_env: dict[str, str], tmp_path: Path) -> None:
    env = job_env(
        stub_env,
        MM_OUTPUT_DIR=str(tmp_path / "run"),
        SLURM_GPUS_PER_NODE="0",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_CPUS_ON_NODE="2",
        MM_TRAIN_CMD="python3 tests/fake_trainer.py",
    )
    cmd = dry_run("mm8b", env)
    assert "--ntasks-per-node=1 --ntasks=2" in cmd
    assert "--gpus-per-node" not in cmd
    assert "python3 tests/fake_trainer.py --config" in cmd


def test_blend_must_be_pairs(stub_env: dict[str, str], tmp_path: Path) -> None:
    env = job_env(stub_env, MM_OUTPUT_DIR=str(tmp_path / "run"), MM_DATA_BLEND="0.7 /data/web 0.3")
    proc = run_bash("bash launch/mm8b.sh", env)
    assert proc.returncode == 2
    assert "weight/prefix pairs" in proc.stderr


def test_outside_slurm_says_to_use_sbatch(stub_env: dict[str, str]) -> None:
    proc = run_bash("bash launch/mm8b.sh", {**stub_env, "MM_REPO": str(ROOT)})
    assert proc.returncode == 2
    assert "sbatch launch/mm8b.sh" in proc.stderr


def test_finetune_key_default_documented_as_used() -> None:
    from pretrain.config import CheckpointConfig

    assert "init_from" in {f.name for f in dataclasses.fields(CheckpointConfig)}
    assert readme_rows()["MM_FINETUNE_KEY"].startswith(
        "| `MM_FINETUNE_KEY` | `checkpoint.init_from` |"
    )
    assert (
        'MM_FINETUNE_KEY="${MM_FINETUNE_KEY:-checkpoint.init_from}"'
        in (LAUNCH / "common.sh").read_text()
    )
    for script in SCRIPTS:
        assert "finetune_from" not in script.read_text(), script.name


def test_tracker_name_is_the_checkpoint_formats() -> None:
    """The shell reads the tracker that mm_megatron.checkpoint.format names; one spelling in
    launch/ (_mm_tracker_name), equal to the library's."""
    from mm_megatron.checkpoint.format import TRACKER

    text = "\n".join(p.read_text() for p in SCRIPTS)
    assert f'_mm_tracker_name="{TRACKER}"' in (LAUNCH / "common.sh").read_text()
    assert text.count(TRACKER) == 1


# ----------------------------------------------------------------------------- job script shape
# What may differ between two job scripts: the #SBATCH values, the line that says what the job
# runs, the script's own name and its two defaults. Everything else is one shape.
SHAPE_SUBS = [
    (r"^(#SBATCH --[a-z-]+)=\S+$", r"\1=<value>"),
    (
        r'^MM_CONFIG="\$\{MM_CONFIG:-pretrain/configs/[\w.]+\}"$',
        'MM_CONFIG="${MM_CONFIG:-pretrain/configs/<config>}"',
    ),
    (
        r'^MM_FINETUNE_FROM="\$\{MM_FINETUNE_FROM-[\w./]*\}"$',
        'MM_FINETUNE_FROM="${MM_FINETUNE_FROM-<path>}"',
    ),
]
BOOTSTRAP_START = "# Find launch/common.sh."
BOOTSTRAP_END = 'source "$_mm_c"'


def job_shape(name: str) -> list[str]:
    """The lines of launch/NAME.sh with what may differ between job scripts replaced."""
    lines = (LAUNCH / f"{name}.sh").read_text().splitlines()
    description = lines.index("#") + 1
    assert lines[description].startswith("# "), f"{name}.sh: no description after #SBATCH"
    lines[description] = "# <description>"
    out = []
    for line in lines:
        line = line.replace(f"launch/{name}.sh", "launch/<name>.sh")
        line = line.replace(f"_mm_script={name}", "_mm_script=<name>")
        for pattern, repl in SHAPE_SUBS:
            line = re.sub(pattern, repl, line)
        out.append(line)
    return out


def bootstrap(name: str) -> str:
    text = (LAUNCH / f"{name}.sh").read_text()
    start, end = text.index(BOOTSTRAP_START), text.index(BOOTSTRAP_END)
    return text[start : end + len(BOOTSTRAP_END)]


@pytest.mark.parametrize("name", TRAIN_SCRIPTS[1:])
def test_job_scripts_have_one_shape(name: str) -> None:
    reference, shape = job_shape(TRAIN_SCRIPTS[0]), job_shape(name)
    assert len(shape) <= 45, f"{name}.sh: {len(shape)} lines; shared code belongs in common.sh"
    assert shape == reference, (
        f"{name}.sh differs from {TRAIN_SCRIPTS[0]}.sh beyond the #SBATCH values, the "
        "description, the name, MM_CONFIG and MM_FINETUNE_FROM"
    )
    assert shape[-1] == 'mm_train_main "$@"'
    assert "# shellcheck source=launch/common.sh" in shape


def test_preprocess_shares_the_bootstrap() -> None:
    assert bootstrap("preprocess") == bootstrap(TRAIN_SCRIPTS[0])
    assert "mm_common_defaults" in (LAUNCH / "preprocess.sh").read_text()


def spool_env(
    stub_env: dict[str, str], tmp_path: Path, name: str, **extra: str
) -> tuple[dict[str, str], Path]:
    """A job environment without MM_REPO, and a copy of the script in a spool directory, as
    slurmd runs it: the script's own path says nothing about the repository."""
    spool = tmp_path / "spool" / "job4242"
    spool.mkdir(parents=True)
    shutil.copy(LAUNCH / f"{name}.sh", spool / "slurm_script")
    env = job_env(
        stub_env,
        **{"MM_OUTPUT_DIR": str(tmp_path / "run"), "SLURM_SUBMIT_DIR": str(tmp_path), **extra},
    )
    env.pop("MM_REPO")
    return env, spool / "slurm_script"


@pytest.mark.parametrize("found", ["command", "submit dir", "submit dir, scontrol fails"])
def test_bootstrap_finds_common_from_a_spool_copy(
    stub_env: dict[str, str], tmp_path: Path, found: str
) -> None:
    extra = (
        {"STUB_COMMAND": str(LAUNCH / "mm8b_32k.sh")}
        if found == "command"
        else {"SLURM_SUBMIT_DIR": str(ROOT), "STUB_JOB_RC": "1" if "fails" in found else "0"}
    )
    env, copy = spool_env(stub_env, tmp_path, "mm8b_32k", **extra)
    proc = run_bash(f"bash {copy}", env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cmd = " ".join(shlex.split(proc.stdout))
    assert "--config pretrain/configs/mm_8b_32k.yaml" in cmd
    assert f"checkpoint.init_from={ROOT}/runs/mm8b/checkpoints" in cmd


@pytest.mark.parametrize("name", JOB_SCRIPTS)
def test_bootstrap_fails_loudly_without_common(
    stub_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    env, copy = spool_env(stub_env, tmp_path, name)
    proc = run_bash(f"bash {copy}", env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"[{name}] ERROR: cannot find launch/common.sh; set MM_REPO or "
        "submit from the repository root"
    )


def test_preprocess_defaults_after_bootstrap(stub_env: dict[str, str], tmp_path: Path) -> None:
    env, copy = spool_env(stub_env, tmp_path, "preprocess", STUB_COMMAND=str(LAUNCH / "x.sh"))
    proc = run_bash(f"bash {copy}", env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "MM_PREP_INPUT is required" in proc.stderr


def test_config_error_printed_once_not_per_rank(tmp_path: Path) -> None:
    """Every rank hits a configuration error alike; only the first prints it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    outs = []
    for rank in ("0", "1"):
        proc = subprocess.run(
            [
                sys.executable,
                "pretrain/pretrain_mm.py",
                "--config",
                "pretrain/configs/tiny_mm.yaml",
                "no_such.key=1",
            ],
            cwd=ROOT,
            env={**env, "RANK": rank, "WORLD_SIZE": "2"},
            text=True,
            capture_output=True,
            timeout=120,
        )
        assert proc.returncode == 2
        outs.append(proc.stderr)
    assert "config error" in outs[0] and "config error" not in outs[1]
