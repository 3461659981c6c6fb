"""The quickstart: on a CPU, in minutes, with nothing downloaded, pretrain a small teacher,
distil a student several times smaller, train the same student from scratch on the same data
and budget (the baseline), prune the teacher to the student's shape and distil that (Minitron's
prune-then-distil), and compare them.

    make quickstart                      # = .venv/bin/python -m distill_llm.quickstart
    python -m distill_llm.quickstart --output-dir runs/quickstart --seeds 1234 4321

Stages (each prints its progress; the training ones run in one NeMo-Run experiment on the local
executor, torchrun with 2 processes: the teacher is one task, the four student stages another,
so that the ~15 s start-up of a launch is paid twice rather than five times):
 1. corpus: the Python standard library's own source files (present offline on every machine
    with Python), one document per file, split by file into train and validation;
 2. a byte-level BPE tokenizer trained on the train split; both splits preprocessed into one
    indexed dataset (train documents first, the split string cuts exactly between them);
 3. teacher pretraining; 4. KD of the student; 5. the baseline student (`pretrain`);
 6. the teacher pruned to the student's shape (`prune`: its hidden channels cut from the
    rotated residual stream, `hidden_method="pca"`; calibrated on the first training
    batches), then distilled exactly as the KD student (same steps, data, batch and loss);
 7. held-out LM loss, perplexity and KL to the teacher of all four; a table,
    `results.json` and `loss_curves.png`.
A second run reuses the corpus, tokenizer, data and teacher while their settings match.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from distill_llm import api
from distill_llm.data.datasets import DataConfig
from distill_llm.data.preprocess import preprocess
from distill_llm.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig
from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.run_dir import read_metrics
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.kd.config import KDConfig


@dataclass
class QuickstartConfig:
    """Sizes chosen so the whole run fits in ~10 minutes on 2 CPU cores."""

    output_dir: str = "runs/quickstart"
    corpus_mb: float = 6.0  # standard-library source read (MB), one document per file
    valid_fraction: float = 0.05  # share of files held out for validation
    vocab_size: int = 2048
    seq_length: int = 128
    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
            num_query_groups=2,
        )
    )  # fmt: skip
    student: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
            num_query_groups=2,
        )
    )  # fmt: skip
    teacher_steps: int = 400
    student_steps: int = 300  # the KD student and the baseline alike
    micro_batch_size: int = 8
    global_batch_size: int = 16
    val_every: int = 25  # the students' curves
    teacher_val_every: int = 100
    val_batches: int = 4
    teacher_lr: float = 2e-3
    student_lr: float = 3e-3
    temperature: float = 1.0
    devices: int = 2  # torchrun processes (data parallel)
    seeds: List[int] = field(default_factory=lambda: [1234])
    calibration_batches: int = 16  # global batches pruning scores importance on
    # layers removed one at a time, each time the cheapest given those gone: on this teacher
    # ranking single layers keeps [0, 1], whose joint removal costs more (prune.importance)
    depth_method: str = "iterative_lm_loss"
    # hidden 256 -> 64 keeps 83% of the stream's principal directions but few of its channels:
    # the rotated cut starts the pruned student at 4.86 instead of 6.12 (seed 1234)
    hidden_method: str = "pca"


def small() -> QuickstartConfig:
    """The same code path at test sizes (a minute or two)."""
    return QuickstartConfig(
        corpus_mb=0.6, vocab_size=512, seq_length=32,
        teacher=ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128,
                            num_attention_heads=4, num_query_groups=2),
        student=ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64,
                            num_attention_heads=4, num_query_groups=2),
        teacher_steps=6, student_steps=4, micro_batch_size=2, global_batch_size=4,
        val_every=2, teacher_val_every=3, val_batches=1, calibration_batches=2,
    )  # fmt: skip


def pruned_shape(teacher: ModelConfig, student: ModelConfig) -> dict:
    """The prune target for `student`'s shape: its depth and widths; attention with as many of
    the teacher's heads (pruning keeps their width) as give the student's query and key/value
    channels (at least one), so the pruned student's parameters stay close to the others'."""
    width = teacher.hidden_size // teacher.num_attention_heads
    own = student.hidden_size // student.num_attention_heads
    groups = max(1, student.num_query_groups * own // width)
    heads = max(groups, student.num_attention_heads * own // width // groups * groups)
    shape = {k: getattr(student, k) for k in SHAPE}
    return {**shape, "num_attention_heads": heads, "num_query_groups": groups}


def _say(msg: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stamp_ok(path: Path, settings: dict) -> bool:
    """True when the JSON stamp at `path` records exactly `settings` (a reusable stage)."""
    return path.is_file() and json.loads(path.read_text()) == settings


def build_corpus(out: Path, megabytes: float, valid_fraction: float) -> dict:
    """Standard-library .py files as JSONL documents; held out by a hash of the file name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(0).shuffle(files)
    budget, docs = int(megabytes * 1e6), {"train": [], "valid": []}
    used = 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        rel = str(f.relative_to(stdlib))
        digest = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        docs["valid" if digest < valid_fraction else "train"].append(text)
        used += len(text.encode())
        if used >= budget:
            break
    out.mkdir(parents=True, exist_ok=True)
    for split, texts in docs.items():
        with open(out / f"{split}.jsonl", "w") as fh:
            for t in texts:
                fh.write(json.dumps({"text": t}) + "\n")
    return {k: len(v) for k, v in docs.items()} | {"bytes": used}


def prepare_data(cfg: QuickstartConfig) -> dict:
    """Corpus, tokenizer and the indexed dataset, reused while their settings match."""

    root = Path(cfg.output_dir) / "data"
    settings = {
        "python": sys.version.split()[0],
        "corpus_mb": cfg.corpus_mb,
        "valid_fraction": cfg.valid_fraction,
        "vocab_size": cfg.vocab_size,
    }
    stamp = root / "settings.json"
    prefix = root / "stdlib"
    if stamp_ok(stamp, settings) and Path(f"{prefix}.idx").is_file():
        info = json.loads((root / "info.json").read_text())
        _say(f"data: reusing {prefix} ({info['train']} train / {info['valid']} valid files)")
        return info
    _say(f"data: reading ~{cfg.corpus_mb:g} MB of the standard library's source")
    if root.exists():
        shutil.rmtree(root)
    counts = build_corpus(root / "corpus", cfg.corpus_mb, cfg.valid_fraction)
    _say(f"data: {counts['train']} train / {counts['valid']} valid files; training tokenizer")
    tok = train_bpe_tokenizer(
        str(root / "corpus/train.jsonl"), str(root / "tokenizer"), cfg.vocab_size
    )
    # train documents first, then valid: split "n_train,n_valid,0" cuts exactly between them
    both = [str(root / "corpus/train.jsonl"), str(root / "corpus/valid.jsonl")]
    summary = preprocess(both, str(prefix), tok.path, workers=2)
    info = {
        **counts,
        "prefix": str(prefix),
        "tokenizer": tok.path,
        "vocab_size": load_tokenizer(tok.path).vocab_size,
        "tokens": summary.tokens,
    }
    (root / "info.json").write_text(json.dumps(info, indent=2))
    stamp.write_text(json.dumps(settings))
    return info


def _configs(cfg: QuickstartConfig, info: dict, seed: int) -> dict:
    data = DataConfig(
        paths=[info["prefix"]],
        split=f"{info['train']},{info['valid']},0",
        tokenizer=info["tokenizer"],
        cache_dir=str(Path(cfg.output_dir) / "data/cache"),
    )
    vocab = info["vocab_size"]
    teacher = dataclasses.replace(cfg.teacher, vocab_size=vocab, max_seq_length=cfg.seq_length)
    student = dataclasses.replace(cfg.student, vocab_size=vocab, max_seq_length=cfg.seq_length)

    def train(steps: int, val_every: int = cfg.val_every) -> TrainConfig:
        return TrainConfig(
            steps=steps, micro_batch_size=cfg.micro_batch_size,
            global_batch_size=cfg.global_batch_size, seq_length=cfg.seq_length,
            val_every=val_every, val_batches=cfg.val_batches, log_every=10, seed=seed,
        )  # fmt: skip

    def optim(lr: float, steps: int) -> OptimConfig:
        return OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=max(steps // 20, 1))

    return dict(
        data=data, teacher=teacher, student=student, train=train, optim=optim,
        parallel=ParallelConfig(),
    )  # fmt: skip


MODELS = ("teacher", "kd_student", "baseline_student", "pruned_kd_student")
STUDENTS = ("kd_student", "baseline_student", "pruned_kd_student")
SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def evaluate_models(
    teacher: str,
    checkpoints: Dict[str, str],
    data: DataConfig,
    train: TrainConfig,
    output_file: str,
) -> dict:
    """`api.evaluate` of several checkpoints against one teacher, in one process; writes
    {name: result} to `output_file`."""
    results = {
        name: api.evaluate(teacher, path, data=data, train=train)
        for name, path in checkpoints.items()
    }
    if parallel.is_main():
        Path(output_file).write_text(json.dumps(results, indent=2))
    return results


def val_curve(run_dir: Path) -> list:
    """[step, validation LM loss] of every validation in a run directory's metrics."""
    return [[e["step"], e["val_lm_loss"]] for e in read_metrics(run_dir, "valid")]


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    seeds = results.get("seeds") or [results]
    for key, label, color in (
        ("kd_student", "KD student (random start)", "tab:blue"),
        ("baseline_student", "baseline student (no teacher)", "tab:orange"),
        ("pruned_kd_student", "pruned teacher + KD", "tab:green"),
    ):
        for i, run in enumerate(seeds):  # the first seed bold, any others faint
            steps, losses = zip(*run[key]["curve"])
            ax.plot(steps, losses, marker="o" if i == 0 else None, ms=3, color=color,
                    alpha=1.0 if i == 0 else 0.45, label=label if i == 0 else None)  # fmt: skip
    for i, run in enumerate(seeds):
        ax.axhline(run["teacher"]["val_loss"], ls="--", color="gray", alpha=1.0 if i == 0 else 0.45,
                   label="teacher" if i == 0 else None)  # fmt: skip
    levels = [run["teacher"]["val_loss"] for run in seeds]
    ax.set_ylim(bottom=min(levels) - 0.15)  # the teacher's line clear of the axis
    if len(seeds) > 1:
        ax.text(0.99, 0.6, f"{len(seeds)} seeds (first bold)", transform=ax.transAxes, ha="right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation LM loss (nats/token)")
    ax.set_title(
        f"Student {results['kd_student']['params'] / 1e6:.2f}M params, "
        f"teacher {results['teacher']['params'] / 1e6:.2f}M"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def first_reaching(curve: list, level: float):
    """The first step of `curve` whose loss is at most `level`, or None."""
    return next((step for step, loss in curve if loss <= level), None)


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Every stage, then `results.json`, `loss_curves.png` and a printed table."""
    # NeMo-Run (and the CLI module built on it) is heavy to import: `--help` stays quick
    import nemo_run as run

    from distill_llm.cli import launch_chain, one_task

    out = Path(cfg.output_dir).resolve()
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    stage_s: dict = {}
    t0 = time.perf_counter()
    info = prepare_data(cfg)
    stage_s["data"] = time.perf_counter() - t0
    run.config.set_nemorun_home(str(out / "nemo_run"))
    # torchrun is found on PATH; run as .venv/bin/python, the venv's bin may not be on it
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    executor = run.LocalExecutor(ntasks_per_node=cfg.devices, launcher="torchrun")
    per_seed = []
    for seed in cfg.seeds:
        c = _configs(cfg, info, seed)
        tag = f"seed{seed}"
        teacher_dir = out / tag / "teacher"
        teacher_settings = {
            "model": dataclasses.asdict(c["teacher"]),
            "steps": cfg.teacher_steps,
            "lr": cfg.teacher_lr,
            "data": info["tokens"],
            "train": dataclasses.asdict(c["train"](cfg.teacher_steps, cfg.teacher_val_every)),
        }
        tasks = []
        if (
            stamp_ok(teacher_dir / "quickstart.json", teacher_settings)
            and (teacher_dir / "final/distill_llm.json").is_file()
        ):
            _say(f"{tag}: reusing the teacher in {teacher_dir}")
        else:
            shutil.rmtree(teacher_dir, ignore_errors=True)
            tasks.append(("teacher", run.Partial(
                api.pretrain, model=c["teacher"], data=c["data"],
                train=c["train"](cfg.teacher_steps, cfg.teacher_val_every),
                optim=c["optim"](cfg.teacher_lr, cfg.teacher_steps),
                parallel=c["parallel"], output_dir=str(teacher_dir),
            )))  # fmt: skip
        for name in (*STUDENTS, "pruned"):
            shutil.rmtree(out / tag / name, ignore_errors=True)
        # KD from random weights; the baseline; then Minitron: the teacher cut to the student's
        # shape, calibrated on the first batches the students train on, then distilled with the
        # KD student's settings
        stages = [("kd_student", run.Partial(
            api.distill, teacher=str(teacher_dir / "final"), student=c["student"],
            kd=KDConfig(temperature=cfg.temperature, skip_lm_loss=True), data=c["data"],
            train=c["train"](cfg.student_steps),
            optim=c["optim"](cfg.student_lr, cfg.student_steps),
            parallel=c["parallel"], output_dir=str(out / tag / "kd_student"),
        )), ("baseline_student", run.Partial(
            api.pretrain, model=c["student"], data=c["data"],
            train=c["train"](cfg.student_steps),
            optim=c["optim"](cfg.student_lr, cfg.student_steps),
            parallel=c["parallel"], output_dir=str(out / tag / "baseline_student"),
        )), ("pruned", run.Partial(
            api.prune, teacher=str(teacher_dir / "final"), output_dir=str(out / tag / "pruned"),
            target=pruned_shape(cfg.teacher, cfg.student), data=c["data"],
            train=c["train"](cfg.student_steps), calibration_batches=cfg.calibration_batches,
            depth_method=cfg.depth_method, hidden_method=cfg.hidden_method,
            parallel=c["parallel"],
        )), ("pruned_kd_student", run.Partial(
            api.distill, teacher=str(teacher_dir / "final"),
            student_checkpoint=str(out / tag / "pruned"),
            kd=KDConfig(temperature=cfg.temperature, skip_lm_loss=True), data=c["data"],
            train=c["train"](cfg.student_steps),
            optim=c["optim"](cfg.student_lr, cfg.student_steps),
            parallel=c["parallel"], output_dir=str(out / tag / "pruned_kd_student"),
        ))]  # fmt: skip
        names = [n for n, _ in tasks + stages]  # the teacher's, when it is trained, first
        tasks.append(one_task("students", stages))  # one start-up instead of four
        _say(f"{tag}: running {', '.join(names)} (torchrun x {cfg.devices})")
        started = time.time()
        launch_chain(tasks, executor, f"quickstart_{tag}")
        (teacher_dir / "quickstart.json").write_text(json.dumps(teacher_settings))
        # Wall time per stage (a task's start-up counted in its first): stages run one after
        # another, so each ends when its final checkpoint is written and starts when the one
        # before ended.
        previous = started
        for name in names:
            final = out / tag / name / ("" if name == "pruned" else "final")
            end = (final / "distill_llm.json").stat().st_mtime
            stage_s[f"{tag}/{name}"] = round(end - previous, 1)
            previous = end
        # In this process: a third torchrun launch would cost more than the evaluation itself.
        _say(f"{tag}: evaluating the teacher and the students on the validation split")
        t_eval = time.perf_counter()
        evals = evaluate_models(
            str(teacher_dir / "final"), {n: str(out / tag / n / "final") for n in MODELS},
            data=c["data"], train=c["train"](1), output_file=str(out / tag / "evaluation.json"),
        )  # fmt: skip
        stage_s[f"{tag}/evaluate"] = round(time.perf_counter() - t_eval, 1)
        for name in STUDENTS:
            evals[name]["curve"] = val_curve(out / tag / name)
        base_final = evals["baseline_student"]["val_loss"]
        reached = first_reaching(evals["kd_student"]["curve"], base_final)
        pruned_reached = first_reaching(evals["pruned_kd_student"]["curve"], base_final)
        pruned = json.loads((out / tag / "pruned" / "prune.json").read_text())
        per_seed.append({
            "seed": seed, **evals, "baseline_final_val_loss": base_final,
            "kd_step_reaching_baseline_final": reached,
            "speedup": (cfg.student_steps / reached) if reached else None,
            # step 0 of its curve: validated before any optimizer step
            "pruned_val_loss_before_training": evals["pruned_kd_student"]["curve"][0][1],
            "pruned_kept_layers": pruned.get("kept", {}).get("layers"),
            "pruned_kd_step_reaching_baseline_final": pruned_reached,
            "pruned_speedup": (cfg.student_steps / pruned_reached) if pruned_reached else None,
        })  # fmt: skip
    stage_s["total"] = round(time.perf_counter() - t0, 1)
    stage_s["data"] = round(stage_s["data"], 1)

    first = per_seed[0]
    results = {
        "teacher": first["teacher"],
        "kd_student": first["kd_student"],
        "baseline_student": first["baseline_student"],
        "pruned_kd_student": first["pruned_kd_student"],
        "steps": cfg.student_steps,
        "teacher_steps": cfg.teacher_steps,
        "tokens": cfg.student_steps * cfg.global_batch_size * cfg.seq_length,
        "seeds": per_seed,
        "stage_seconds": stage_s,
    }
    for key in (
        "baseline_final_val_loss", "kd_step_reaching_baseline_final", "speedup",
        "pruned_val_loss_before_training", "pruned_kd_step_reaching_baseline_final",
        "pruned_speedup",
    ):  # fmt: skip
        results[key] = first[key]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "loss_curves.png")
    print(format_table(results))
    _say("wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in stage_s.items()))
    _say(f"wrote {out / 'results.json'} and {out / 'loss_curves.png'}")
    return results


def reached_line(results: dict) -> str:
    """When the KD student reached the baseline's final validation loss, in one sentence."""
    if not results.get("kd_step_reaching_baseline_final"):
        return "KD student did not reach the baseline's final val loss"
    return (
        f"KD student reached the baseline's final val loss "
        f"({results['baseline_final_val_loss']:.4f}) at step "
        f"{results['kd_step_reaching_baseline_final']} of {results['steps']} "
        f"({results['speedup']:.2f}x fewer steps)"
    )


def format_table(results: dict) -> str:
    """The printed summary of `results`: params, val loss, ppl and KL to the teacher per model,
    when the KD student reached the baseline's final loss, and per-seed losses for several seeds."""
    rows = [f"{'model':<18}{'params':>10}{'val loss':>10}{'ppl':>10}{'KL to teacher':>15}"]
    for key in MODELS:
        r = results[key]
        kl = r["kl_to_teacher"]
        kl = 0.0 if abs(kl) < 1e-6 else kl  # the teacher's own KL rounds to +-1e-9
        rows.append(
            f"{key:<18}{r['params'] / 1e6:>9.2f}M{r['val_loss']:>10.4f}{r['val_ppl']:>10.2f}"
            f"{kl:>15.4f}"
        )
    rows.append(reached_line(results))
    if "pruned_kd_student" in results:
        rows.append(
            f"pruned student before training: val loss "
            f"{results['pruned_val_loss_before_training']:.4f}; pruned+KD "
            + (
                f"reached the baseline's final val loss at step "
                f"{results['pruned_kd_step_reaching_baseline_final']} "
                f"({results['pruned_speedup']:.2f}x fewer steps)"
                if results.get("pruned_kd_step_reaching_baseline_final")
                else "did not reach the baseline's final val loss"
            )
        )
    if len(results.get("seeds", [])) > 1:
        rows.append(
            f"{'seed':<8}{'teacher':>10}{'KD student':>12}{'baseline':>10}{'pruned+KD':>11}"
            f"{'KD reached at':>15}{'pruned+KD at':>14}"
        )
        for r in results["seeds"]:
            rows.append(
                f"{r['seed']:<8}{r['teacher']['val_loss']:>10.4f}{r['kd_student']['val_loss']:>12.4f}"
                f"{r['baseline_student']['val_loss']:>10.4f}"
                f"{r['pruned_kd_student']['val_loss']:>11.4f}"
                f"{str(r['kd_step_reaching_baseline_final'] or 'never'):>15}"
                f"{str(r['pruned_kd_step_reaching_baseline_final'] or 'never'):>14}"
            )
    return "\n".join(rows)


def main(argv=None) -> int:
    """The `python -m distill_llm.quickstart` command line: runs the whole quickstart, returns 0."""
    parser = argparse.ArgumentParser(prog="python -m distill_llm.quickstart")
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--small", action="store_true", help="test sizes, same code path")
    args = parser.parse_args(argv)
    cfg = small() if args.small else QuickstartConfig()
    cfg = dataclasses.replace(cfg, output_dir=args.output_dir, seeds=args.seeds)
    run_quickstart(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
