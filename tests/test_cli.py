"""Recipes, executors and the `nemo distill_llm ...` CLI: configs, dry runs, real local torchrun
and real Slurm runs, and the exact Docker request."""

import concurrent.futures
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import pytest
import torch
import yaml
from conftest import ROOT, sp_data

from distill_llm import checks
from distill_llm.data.datasets import BatchPlan
from distill_llm.prune import shape as prune_shape
from distill_llm.recipes import RECIPES, models

VENV_BIN = Path(sys.executable).parent
NEMO = str(VENV_BIN / "nemo")

# Published parameter counts (embeddings included), billions: the total, or for a mixture of
# experts (total, active per token: its top-k experts, not every expert).
PUBLISHED = {
    "llama31_8b": 8.03,
    "llama32_1b": 1.24,
    "llama32_3b": 3.21,
    "qwen25_0p5b": 0.494,
    "qwen25_1p5b": 1.54,
    "qwen25_7b": 7.62,
    "qwen3_4b": 4.0,  # Qwen3-4B model card: 4.0B (3.6B non-embedding)
    "mistral_7b": 7.25,
    # Qwen3-30B-A3B model card: 30.5B in total, 3.3B activated (29.9B non-embedding). Its "3.3B"
    # is 3,353,032,704 cut to two figures, not rounded: transformers' Qwen3MoeForCausalLM built
    # from the card's config.json has 30,532,122,624 parameters, less 48 layers x 120 unrouted
    # experts x 3 x 2048 x 768 per token. Leaving out the embeddings, router or norms comes no
    # closer than 1.2% to 3.30B.
    "qwen3_30b_a3b": (30.5, 3.353),
    # Mistral AI, "Mixtral of experts" (mistral.ai/news/mixtral-of-experts, Dec 2023): 46.7B
    # total, 12.9B per token (the paper, arXiv:2401.04088, rounds them to 47B and 13B).
    "mixtral_8x7b": (46.7, 12.9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_architectures_have_their_published_sizes(name):
    cfg = fdl.build(getattr(models, name)())
    cfg.validate(1, 1)
    published = PUBLISHED[name]
    total, active = published if isinstance(published, tuple) else (published, published)
    assert cfg.num_parameters() / 1e9 == pytest.approx(total, rel=0.01)
    assert cfg.num_parameters(active=True) / 1e9 == pytest.approx(active, rel=0.01)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_builds_a_consistent_config(name):
    """Full config built (no model instantiated); the layout fits the worlds it targets."""
    module = importlib.import_module(f"distill_llm.recipes.{name}")
    args = fdl.build(module.recipe()).keywords
    if name == "tiny_cache":  # caches exactly the samples and temperature of the tiny recipe
        served = fdl.build(importlib.import_module("distill_llm.recipes.tiny").recipe()).keywords
        assert args["train"] == served["train"] and args["data"] == served["data"]
        assert args["temperature"] == served["kd"].temperature
        assert args["teacher"] == served["teacher"]
        return
    par, train = args["parallel"], args["train"]
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    worlds = [1, 2] if name.startswith(("tiny", "nemo")) else [8, 16, 32]  # CPU / 8-GPU nodes
    for world in worlds:
        dp = par.validate(world)
        BatchPlan(train.micro_batch_size, train.global_batch_size, dp)
    if name == "nemo_to_nemo":  # both architectures come from the NeMo files
        assert args.get("student") is None and args["export_nemo"].endswith(".nemo")
        return
    student = args.get("student") or args.get("model")
    if "target" in args:  # a prune recipe: the student is the teacher cut to the target
        student = prune_shape.resolve(fdl.build(module.teacher_model()), args["target"], tp)
    student.validate(tp, pp)
    checks.check_seq_length(student, train.seq_length, "student")
    if "teacher" in args:
        teacher = fdl.build(module.teacher_model())
        checks.check_compatible(student, teacher, par, train.seq_length)
        assert teacher.vocab_size == student.vocab_size
        # Minitron 4B-Width is the largest student: 8.03B / 4.51B = 1.78
        assert teacher.num_parameters() > 1.5 * student.num_parameters()


def _nemo(args, cwd, home, timeout=600, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        NEMORUN_HOME=str(home),
        PATH=f"{VENV_BIN}:{env['PATH']}",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        **(env_extra or {}),
    )
    return subprocess.run(
        [NEMO, "distill_llm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def git_repo(tmp_path_factory):
    """A committed git repository to launch from (the git packager ships committed code)."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "README").write_text("launch dir\n")
    for cmd in (["init", "-q"], ["add", "README"], ["commit", "-qm", "init"]):
        subprocess.run(
            ["git", "-c", "user.email=t@t", "-c", "user.name=t", *cmd], cwd=repo, check=True
        )
    return repo


def test_dryrun_of_every_recipe(git_repo, tmp_path):
    def dryrun(name):
        entry = {"tiny_teacher": "pretrain", "tiny_cache": "cache_teacher",
                 "tiny_prune": "prune"}.get(name, "distill")  # fmt: skip
        # the tiny ones in this process, the 8-GPU ones as a one-node Slurm job
        cpu = name.startswith(("tiny", "nemo"))
        where = [] if cpu else ["run.executor=slurm", "run.executor.account=a"]
        out = _nemo([entry, "--factory", name, *where, "--dryrun"], git_repo, tmp_path / name)
        return name, entry, out

    # two CLI processes at a time: each spends most of its ~6 s importing
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for name, entry, out in pool.map(dryrun, RECIPES):
            assert out.returncode == 0, (name, out.stderr[-2000:])
            assert f"Dry run for task distill_llm.api:{entry}" in out.stdout, name
    # --to-yaml writes the fully resolved config, overrides included, and runs nothing
    out = _nemo(
        [
            "distill",
            "--factory",
            "tiny",
            "kd.temperature=2.5",
            "kd.kind=jsd",
            "kd.alpha=0.5",
            "--to-yaml",
            str(tmp_path / "t.yaml"),
        ],
        git_repo,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "t.yaml").read_text()
    assert "temperature: 2.5" in text and "num_layers: 2" in text and "_target_" in text
    assert "kind: jsd" in text and "alpha: 0.5" in text


def test_sbatch_script_for_two_nodes_of_eight_gpus(git_repo, tmp_path):
    out = _nemo(
        [
            "distill",
            "--factory",
            "llama31_8b_to_llama32_1b",
            "run.executor=slurm",
            "run.executor.account=acct",
            "run.executor.partition=batch",
            "run.executor.nodes=2",
            "run.executor.container_mounts=['/lustre/data:/data','/lustre/ckpt:/ckpt']",
            "teacher=/ckpt/llama31_8b",
            "--dryrun",
        ],
        git_repo,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    scripts = list(tmp_path.rglob("*_sbatch.sh"))
    assert len(scripts) == 1
    sbatch = scripts[0].read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --account=acct",
        "#SBATCH --partition=batch",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
    ):
        assert line in sbatch
    # the script is one valid bash program
    assert subprocess.run(["bash", "-n", str(scripts[0])]).returncode == 0
    srun = next(ln for ln in sbatch.splitlines() if ln.startswith("srun ") and "torchrun" in ln)
    assert "--container-image nvcr.io/nvidia/nemo:" in srun
    assert re.search(
        r"--container-mounts /lustre/data:/data,/lustre/ckpt:/ckpt,\S+:/nemo_run", srun
    )
    assert "--nnodes 2 --nproc-per-node 8" in srun
    assert "--node-rank $SLURM_NODEID" in srun
    assert "-m nemo_run.core.runners.fdl_runner" in srun
    # the task config it ships: the recipe with the override
    config = next(tmp_path.rglob("distill_config.yaml")).read_text()
    assert "teacher: /ckpt/llama31_8b" in config and "tensor_parallel: 2" in config


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.executor.account=acct;touch pwned", "error: run.executor.account (Slurm account)"),
        ("run.executor.partition=batch`touch pwned`", "error: run.executor.partition"),
        ("run.executor.container_mounts=['/a:/a;touch pwned']", "error: run.executor.container_"),
        ("run.executor.env_vars={'X;touch pwned':'1'}", "error: run.executor.env_vars: 'X;touch"),
        ("run.executor.env_vars={'X':'$(touch pwned)'}", "error: run.executor.env_vars.X"),
    ],
)
def test_a_value_that_would_reach_the_script_unquoted_is_refused(
    git_repo, tmp_path, override, message
):
    """NeMo-Run writes the job name and log paths (derived from the account) into the sbatch
    script unquoted: such values are refused before any script is written."""
    args = ["distill", "-f", "llama31_8b_to_llama32_1b", "run.executor=slurm"]
    args += ["run.executor.partition=batch", override, "--dryrun"]  # the later value wins
    out = _nemo(args, git_repo, tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), out.stderr[-2000:]
    assert not list(tmp_path.rglob("*_sbatch.sh"))
    assert not list(tmp_path.rglob("pwned")) and not list(git_repo.rglob("pwned"))


def test_executor_factories_refuse_unsafe_values():
    from distill_llm.errors import ConfigError
    from distill_llm.executors import docker, slurm

    slurm(account="acct-1", partition="batch,debug", container_mounts=["/a/b:/c:ro"])
    for bad in (dict(account="a;b"), dict(partition="p q"), dict(container_mounts=["/a:$(x)"])):
        with pytest.raises(ConfigError, match="would reach the job script unquoted"):
            slurm(**bad)
    with pytest.raises(ConfigError, match="docker volumes entry"):
        docker(volumes=["/a:/b|c"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--factory", "nope"], "error: unknown recipe 'nope'; choose one of: tiny,"),
        (["--factory", "tiny", "run.executor=nope"], "error: unknown executor 'nope'; choose"),
        (["--factory", "tiny", "train.nope=3"], "error: train.nope=3: train has no field 'nope'"),
        (
            ["--factory", "tiny", "parallel.tensor_parallel=3"],
            "error: world size 1 is not divisible by tensor_parallel x pipeline_parallel = 3",
        ),
        (
            ["--factory", "tiny", "run.executor=local", "run.executor.ntasks_per_node=3"],
            "error: global_batch_size 8 is not divisible by micro_batch_size 4 x data-parallel",
        ),
    ],
)
def test_bad_input_is_one_line(git_repo, tmp_path, args, message):
    out = _nemo(["distill", *args, "--yes"], git_repo, tmp_path)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), out.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """The tiny recipe's teacher architecture, freshly initialised (fast, in this process)."""
    import distill_llm as dl

    path = tmp_path_factory.mktemp("teacher") / "ckpt"
    dl.init_model(fdl.build(models.tiny_teacher()), str(path), seed=5)
    return path


def test_local_torchrun_run_and_failure(git_repo, tmp_path, tiny_teacher):
    out_dir = tmp_path / "run"
    common = [
        "distill",
        "--factory",
        "tiny",
        f"teacher={tiny_teacher}",
        f"output_dir={out_dir}",
        "train.steps=3",
        "train.val_every=3",
        "run.executor=local",
        "run.executor.ntasks_per_node=2",
        "--yes",
    ]
    out = _nemo(common, git_repo, tmp_path / "home")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "distill: SUCCEEDED" in out.stdout
    assert (out_dir / "final/distill_llm.json").is_file()
    steps = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["kind"] == "train"] == [1, 2, 3]

    # a job that fails inside (data the preflight cannot see) exits 1 with its log tail
    bad = _nemo(
        [*common, "data.paths=[/nonexistent/prefix]", f"output_dir={tmp_path / 'bad'}"],
        git_repo,
        tmp_path / "home",
    )
    assert bad.returncode == 1
    assert "job distill ended FAILED" in bad.stderr
    assert "/nonexistent/prefix.bin is missing" in bad.stderr  # from the job's own log


def test_cache_teacher_then_distill_without_the_teacher(git_repo, tmp_path, tiny_teacher):
    """The two commands of the README's offline-teacher section, for real (in-process)."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    out = _nemo(
        ["cache_teacher", "--factory", "tiny_cache", f"teacher={tiny_teacher}",
         f"output_dir={cache}", "train.steps=3", "--yes"],
        git_repo, tmp_path / "home",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "cache_teacher: SUCCEEDED" in out.stdout and (cache / "train/cache.json").is_file()
    out = _nemo(
        ["distill", "--factory", "tiny", "teacher=None", f"teacher_cache={cache}",
         f"output_dir={run_dir}", "train.steps=3", "--yes"],
        git_repo, tmp_path / "home",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["teacher"] is None and config["teacher_cache"] == str(cache)
    steps = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["kd_loss"] > 0 for e in steps if e["kind"] == "train"] == [True] * 3
    # the same cache with another number of steps: refused before anything runs
    out = _nemo(
        ["distill", "--factory", "tiny", "teacher=None", f"teacher_cache={cache}",
         f"output_dir={tmp_path / 'r2'}", "train.steps=4", "--yes"],
        git_repo, tmp_path / "home",
    )  # fmt: skip
    assert out.returncode != 0 and "samples=" in out.stdout + out.stderr
    assert not (tmp_path / "r2").exists()


DOCKER_CAPTURE = """
import json, sys
from pathlib import Path
from unittest import mock

import docker
import fiddle as fdl

from distill_llm.cli import launch
from distill_llm.executors import docker as docker_executor
from distill_llm.recipes import tiny

calls = []


def run_container(image, command, **kwargs):
    calls.append(dict(image=image, command=command, **kwargs))
    # play the container finishing: nemo_run reads its exit status from the job dir
    job_dir = next(v.split(":")[0] for v in kwargs["volumes"] if v.endswith(":/nemo_run"))
    Path(job_dir, "status_" + kwargs["name"] + ".out").write_text('{"id": 1, "exit_code": "0"}')
    return mock.MagicMock()


client = mock.MagicMock()
client.containers.run.side_effect = run_container
client.containers.list.return_value = []
docker.from_env = lambda *a, **k: client
executor = fdl.build(docker_executor(gpus=8, volumes=["/data:/data"], env_vars={"HF_HOME": "/h"}))
state = launch(tiny.recipe(teacher="/data/teacher"), executor, name="distill")
(call,) = calls
call["device_requests"] = [{"count": d.count} for d in call["device_requests"]]
call["ulimits"] = [dict(u) for u in call["ulimits"]]
print(json.dumps({"state": state, "call": call}, default=str))
"""


def test_docker_request(git_repo, tmp_path):
    """No engine here: capture the docker SDK call the Docker executor makes (and play the
    container finishing with exit code 0)."""
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path), PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, "-c", DOCKER_CAPTURE],
        cwd=git_repo,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "SUCCEEDED"
    call = result["call"]
    assert call["image"].startswith("nvcr.io/nvidia/nemo:")
    assert call["shm_size"] == "64g" and call["ipc_mode"] == "host"
    assert call["runtime"] == "nvidia"
    assert call["device_requests"] == [{"count": 8}]
    assert "/data:/data" in call["volumes"]
    assert any(v.endswith(":/nemo_run") for v in call["volumes"])
    env = call["environment"]
    assert env["HF_HOME"] == "/h" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "torchrun" in call["command"] and "--nproc-per-node 8" in call["command"]
    assert "nemo_run.core.runners.fdl_runner" in call["command"]
    assert sorted(u["Name"] for u in call["ulimits"]) == ["memlock", "stack"]


def test_recipes_are_subpackages_not_top_level():
    import distill_llm.executors
    import distill_llm.recipes

    assert Path(distill_llm.recipes.__file__).parent == ROOT / "recipes"
    assert Path(distill_llm.executors.__file__).parent == ROOT / "executors"
    for top in ("recipes", "executors"):  # nothing generic installed at the top level
        probe = subprocess.run(
            [sys.executable, "-c", f"import {top}"], cwd="/", capture_output=True
        )
        assert probe.returncode != 0 and b"ModuleNotFoundError" in probe.stderr


@pytest.mark.parametrize(
    "arg, field, value",
    [
        ("student.num_query_groups=1", ("student", "num_query_groups"), 1),
        ("data.tokenizer=/x/tok", ("data", "tokenizer"), "/x/tok"),
        ("data.paths=[1.0,/data/x]", ("data", "paths"), "[1.0,/data/x]"),  # the seed's form
        ("data.paths=[0.3,'/a',0.7,'/b']", ("data", "paths"), [0.3, "/a", 0.7, "/b"]),
        ("data.cache_dir=None", ("data", "cache_dir"), None),
        ("student_checkpoint=/c", ("student_checkpoint",), "/c"),
        ("kd.intermediate_pairs=[['a','b','mse']]", ("kd", "intermediate_pairs"), [["a", "b", "mse"]]),  # noqa: E501
        ("parallel.precision=bf16", ("parallel", "precision"), "bf16"),
    ],
)  # fmt: skip
def test_command_line_overrides_reach_the_config(arg, field, value):
    """Every kind of field accepts `key=value` (NeMo-Run's parser rejects `X | None` types)."""
    from nemo_run.cli.cli_parser import parse_cli_args

    from distill_llm.data.datasets import parse_blend
    from distill_llm.recipes import tiny

    built = fdl.build(parse_cli_args(tiny.recipe(), [arg])).keywords
    got = built[field[0]] if len(field) == 1 else getattr(built[field[0]], field[1])
    assert got == value
    if field == ("data", "paths"):
        assert parse_blend(got)[0][0].endswith(("/data/x", "/a"))


def test_preprocess_and_a_recipe_script_through_the_cli(tmp_path):
    from distill_llm.data.tokenizer import train_bpe_tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50))
    )
    train_bpe_tokenizer(str(corpus), str(tmp_path / "tok"), vocab_size=300)
    out = _nemo(
        ["preprocess", f"input={corpus}", f"output_prefix={tmp_path / 'data/c'}",
         f"tokenizer={tmp_path / 'tok'}", "workers=2", "--yes"],
        tmp_path, tmp_path / "home",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote" in out.stdout and "50 documents" in out.stdout
    assert (tmp_path / "data/c.idx").is_file()

    # a Python recipe script takes the same overrides (run.cli.main), here for real
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "home"), PYTHONWARNINGS="ignore")
    script = subprocess.run(
        [sys.executable, str(ROOT / "recipes/tiny_teacher.py"), "train.steps=2",
         f"output_dir={tmp_path / 'teacher'}", "--yes"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr[-2000:]
    assert "pretrain: SUCCEEDED" in script.stdout
    assert (tmp_path / "teacher/final/distill_llm.json").is_file()


def test_nemo_files_through_the_cli(git_repo, tmp_path):
    """`--factory nemo_to_nemo` with the NeMo 1 file NeMo wrote as teacher ends with a .nemo
    student; `export_nemo` turns that into a NeMo 2 directory with the same tensors."""
    from distill_llm.formats.nemo.dcp import DcpReader
    from distill_llm.formats.nemo.source import NemoSource

    teacher = ROOT / "tests" / "fixtures" / "nemo" / "nemo1_llama.nemo"
    data, out = sp_data(tmp_path), tmp_path / "student.nemo"
    run = _nemo(
        ["distill", "--factory", "nemo_to_nemo", f"teacher={teacher}",
         f"data.paths=[1.0,{data}]", "data.split=90,5,5", f"export_nemo={out}",
         f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.seq_length=32",
         "train.micro_batch_size=2", "train.global_batch_size=2", "--yes"],
        git_repo, tmp_path / "home",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert out.is_file()
    exp = _nemo(["export_nemo", f"checkpoint={out}", f"output={tmp_path / 'nemo2'}", "--yes"],
                git_repo, tmp_path / "home")  # fmt: skip
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    one = DcpReader(NemoSource(out), "model_weights")
    two = DcpReader(NemoSource(tmp_path / "nemo2"), "weights")
    for key, shape in one.tensor_shapes().items():
        zeros = (0,) * len(shape)
        other = "module." + key[len("model.") :]
        assert torch.equal(one.read(key, zeros, shape), two.read(other, zeros, shape)), key
    # a bad one: refused in one line, nothing written
    final, target = tmp_path / "run" / "final", tmp_path / "x.nemo"
    bad = _nemo(["export_nemo", f"checkpoint={final}", f"output={target}", "format=nemo2",
                 "--yes"], git_repo, tmp_path / "home")  # fmt: skip
    assert bad.returncode == 2 and "drop the .nemo suffix" in bad.stderr
    assert not (tmp_path / "x.nemo").exists()


def test_minitron_recipe_chains_prune_into_distill(git_repo, tmp_path):
    """The Llama 3.1 8B -> Minitron 4B-Width recipe: the prune target is the published 4.51B
    shape, the distill task starts from what the prune task writes, and a Slurm dry run of
    the two-task experiment writes both job scripts."""
    from distill_llm.recipes import llama31_8b_prune_distill_4b as r

    teacher = fdl.build(r.teacher_model())
    target = fdl.build(r.prune_recipe()).keywords["target"]
    shape = prune_shape.resolve(teacher, target, 2)
    assert shape == fdl.build(r.student_model())
    assert shape.num_parameters() / 1e9 == pytest.approx(4.51, abs=0.005)
    (prune_name, prune_task), (distill_name, distill_task) = r.tasks(
        "/ckpt/llama31_8b", str(tmp_path / "m4b"), steps=10, data_paths=[1.0, "/d/text"]
    )
    prune_args, distill_args = fdl.build(prune_task).keywords, fdl.build(distill_task).keywords
    assert (prune_name, distill_name) == ("prune", "distill")
    assert prune_args["output_dir"] == distill_args["student_checkpoint"]
    assert prune_args["data"] == distill_args["data"] and distill_args["data"].paths[1] == "/d/text"
    assert prune_args["train"].seq_length == distill_args["train"].seq_length == 4096

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NEMORUN_HOME=str(tmp_path / "home"), PYTHONWARNINGS="ignore")
    module = "distill_llm.recipes.llama31_8b_prune_distill_4b"
    args = ["--teacher", "/ckpt/llama31_8b", "--executor", "slurm", "--account", "acc"]
    out = subprocess.run(
        [sys.executable, "-m", module, *args, "--dryrun"],
        cwd=git_repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    scripts = sorted((tmp_path / "home").rglob("*_sbatch.sh"))
    assert len(scripts) == 2, out.stdout[-2000:]
    texts = "\n".join(p.read_text() for p in scripts)
    assert "distill_llm.api:prune" in texts or "prune" in texts
    assert "llama31_8b_prune_distill_4b: DRYRUN" in out.stdout
    # a bad value is one line, before anything is written
    bad = subprocess.run(
        [sys.executable, "-m", module, "--teacher", "/ckpt/x", "--steps", "0", "--dryrun"],
        cwd=git_repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert len(bad.stderr.strip().splitlines()) == 1
