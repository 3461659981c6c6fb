"""The tiny distillation through NeMo-Run's Slurm executor on a real Slurm cluster: two nodes
on this machine (tests/slurm_cluster.py), torchrun across 2 nodes x 1 process, job states from
slurmdbd accounting."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import pytest
import slurm_cluster

from distill_llm.recipes import models

# Both scripts: argv (teacher, out_dir, partition, PATH) and a 2-node x 1-process CPU executor
PRELUDE = """
import json, sys
from distill_llm.cli import JobFailed, launch, launch_chain
from distill_llm.executors import slurm
from distill_llm.recipes import tiny, tiny_prune
import fiddle as fdl

teacher, out_dir, partition, path = sys.argv[1:5]
executor = fdl.build(slurm(
    account="distill_llm", partition=partition, nodes=2, gpus_per_node=0, tasks_per_node=1,
    time="00:15:00", container_image=None, packager="none", exclusive=False,
    env_vars={"PATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
))
"""

SUBMIT = (
    PRELUDE
    + """
recipe = tiny.recipe(teacher=teacher, output_dir=out_dir, steps=4)
try:
    state, error = launch(recipe, executor, name="distill"), ""
except JobFailed as err:
    state, error = "FAILED", str(err)
print(json.dumps({"state": state, "error": error}))
"""
)

CHAIN = (
    PRELUDE
    + """
pruned = out_dir + "/pruned"
first = tiny_prune.recipe(teacher=teacher, output_dir=pruned, calibration_batches=2)
second = tiny.recipe(teacher=teacher, output_dir=out_dir + "/distill", steps=2)
second.student, second.student_checkpoint = None, pruned
try:
    state, error = launch_chain([("prune", first), ("distill", second)], executor, "chain"), ""
except JobFailed as err:
    state, error = "FAILED", str(err)
print(json.dumps({"state": state, "error": error}))
"""
)


@pytest.fixture(scope="module")
def cluster():
    return slurm_cluster.ensure_cluster()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import distill_llm as dl

    path = tmp_path_factory.mktemp("slurm_teacher") / "ckpt"
    dl.init_model(fdl.build(models.tiny_teacher()), str(path), seed=9)
    return path


def _submit(cluster, teacher, out_dir, home, script=SUBMIT):
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, NEMORUN_HOME=str(home), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable, "-c", script, str(teacher), str(out_dir), cluster["partition"],
            f"{venv_bin}:{os.environ['PATH']}",
        ],
        env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sacct_states(home: Path, fields: str = "JobID,State,NNodes") -> list[str]:
    """Slurm's own record of the jobs this test submitted (their ids from the sbatch logs)."""
    ids = {p.name.rsplit("_", 1)[-1].split(".")[0] for p in home.rglob("sbatch_*.out")}
    cmd = ["sacct", "--parsable2", "--noheader", "-X", "-o", fields]
    out = subprocess.run(
        [*cmd, "-j", ",".join(ids)], capture_output=True, text=True, check=True
    ).stdout
    return sorted(out.split(), key=lambda row: int(row.split("|")[0]))


def test_tiny_distillation_on_two_slurm_nodes(cluster, teacher, tmp_path):
    out_dir = tmp_path / "run"
    result = _submit(cluster, teacher, out_dir, tmp_path / "home")
    assert result == {"state": "SUCCEEDED", "error": ""}
    meta = json.loads((out_dir / "final/distill_llm.json").read_text())
    assert meta["world_size"] == 2  # torchrun joined one process from each node
    steps = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["kind"] == "train"] == [1, 2, 3, 4]
    (state,) = _sacct_states(tmp_path / "home")
    assert state.endswith("|COMPLETED|2")


def test_a_failing_slurm_job_is_reported_failed(cluster, tmp_path):
    result = _submit(cluster, tmp_path / "no_teacher", tmp_path / "run", tmp_path / "home")
    assert result["state"] == "FAILED"
    assert "job distill ended FAILED" in result["error"]
    assert "no_teacher' does not exist" in result["error"]  # the cause, from the job's log
    (state,) = _sacct_states(tmp_path / "home")
    assert state.endswith("|FAILED|2")


def test_prune_then_distill_as_one_chained_slurm_experiment(cluster, teacher, tmp_path):
    """cli.launch_chain (the Minitron recipe's launcher): both jobs submitted together, the
    second held by an afterok dependency on the first, and it reads what the first wrote."""
    out_dir = tmp_path / "run"
    result = _submit(cluster, teacher, out_dir, tmp_path / "home", CHAIN)
    assert result == {"state": "SUCCEEDED", "error": ""}
    assert (out_dir / "pruned" / "prune.json").is_file()
    config = (out_dir / "distill" / "config.yaml").read_text()
    assert f"student_checkpoint: {out_dir / 'pruned'}" in config
    states = _sacct_states(tmp_path / "home", "JobID,State,NNodes,Submit,Start,End")
    assert len(states) == 2 and all("|COMPLETED|2|" in s for s in states)
    # job ids ascend: the prune job first
    prune_end = states[0].split("|")[5]
    distill_submit, distill_start = states[1].split("|")[3:5]
    # submitted together, before the pruning ended; held by the dependency until it had
    assert distill_submit < prune_end <= distill_start


def test_a_failed_first_step_cancels_the_chained_second(cluster, tmp_path):
    result = _submit(cluster, tmp_path / "no_teacher", tmp_path / "run", tmp_path / "home", CHAIN)
    assert result["state"] == "FAILED"
    # the second job, pending on an afterok that can no longer hold, is cancelled, not left
    assert "job prune ended FAILED; cancelled distill" in result["error"]
    assert "no_teacher' does not exist" in result["error"]  # the cause, from the job's log
    assert not (tmp_path / "run" / "distill").exists()  # it never started
    # no job is left pending on the failed prune job's afterok. (Only this run's: a job another
    # run left pending, e.g. one a slurmctld restart restored from its saved state after its
    # cancel, is not this test's business.)
    (prune,) = _sacct_states(tmp_path / "home")  # the one job that ran
    prune_id = prune.split("|")[0]
    pending = subprocess.run(["squeue", "--noheader", "-t", "PENDING", "-o", "%i %E"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert prune.endswith("|FAILED|2")
    assert not re.findall(rf"^\S+ afterok:{prune_id}\b.*$", pending, re.MULTILINE)
