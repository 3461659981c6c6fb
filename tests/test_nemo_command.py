"""NeMo 1's megatron_gpt_distillation.py command line (distill_llm.megatron_gpt_distillation):
the keys of NeMo's documented command map onto distill()'s arguments, every other supported key
lands in its field, and mistakes are refused in one line. Fast: nothing is trained here."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from distill_llm import megatron_gpt_distillation as cmd
from distill_llm.data.datasets import DataConfig, parse_blend
from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.errors import ConfigError
from distill_llm.kd.config import KDConfig

TP = 2
# NeMo's documented command, with TP=2 (docs/source/nlp/distillation.rst at NeMo v2.0.0)
SEED_ARGV = [
    "model.restore_from_path=path/to/student.nemo",
    "model.kd_teacher_restore_from_path=path/to/teacher.nemo",
    f"model.tensor_model_parallel_size={TP}",
    "model.tokenizer.model=path/to/tokenizer.model",
    "model.data.data_prefix=[1.0,path/to/tokenized/data]",
    "model.nemo_path=final_checkpoint.nemo",
    "trainer.precision=bf16",
    f"trainer.devices={TP}",
]
TORCHRUN_ENV = {"LOCAL_WORLD_SIZE": str(TP), "WORLD_SIZE": str(TP), "RANK": "0"}
BASE = [
    "model.kd_teacher_restore_from_path=t.nemo",
    "model.data.data_prefix=[1.0,data/x]",
]


def kwargs_of(argv, env=None):
    return cmd.to_distill_kwargs(cmd.parse_overrides(argv), {} if env is None else env)


def refusal(argv, env=None) -> str:
    with pytest.raises(ConfigError) as err:
        kwargs_of(argv, env)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_documented_command_maps_onto_distill():
    kw = kwargs_of(SEED_ARGV, TORCHRUN_ENV)
    assert kw["teacher"] == "path/to/teacher.nemo"
    assert kw["student"] is None
    assert kw["student_checkpoint"] == "path/to/student.nemo"
    assert kw["export_nemo"] == "final_checkpoint.nemo"
    assert kw["output_dir"] == "runs/megatron_gpt_distillation"
    assert kw["data"] == DataConfig(paths=[1.0, "path/to/tokenized/data"],
                                    tokenizer="path/to/tokenizer.model")  # fmt: skip
    assert kw["parallel"] == ParallelConfig(tensor_parallel=TP, precision="bf16")
    # nothing else set: the dataclasses' defaults
    assert (kw["kd"], kw["train"], kw["optim"]) == (KDConfig(), TrainConfig(), OptimConfig())
    assert set(kw) == {"teacher", "student", "student_checkpoint", "kd", "data", "train",
                       "optim", "parallel", "output_dir", "export_nemo"}  # fmt: skip
    # distill's data check reads the list as NeMo does: one prefix, nothing to blend
    assert parse_blend(kw["data"].paths) == ([str(Path("path/to/tokenized/data").resolve())], None)


@pytest.mark.parametrize("student", ["None", "null", "NULL"])
def test_no_student_checkpoint_means_the_default_student(student):
    kw = kwargs_of(BASE + [f"model.restore_from_path={student}"])
    assert kw["student_checkpoint"] is None and kw["student"] is None
    assert kwargs_of(BASE)["student_checkpoint"] is None  # left out: the same


@pytest.mark.parametrize(
    "arg, group, field, value",
    [
        ("trainer.max_steps=7", "train", "steps", 7),
        ("trainer.val_check_interval=3", "train", "val_every", 3),
        ("trainer.limit_val_batches=5", "train", "val_batches", 5),
        ("trainer.log_every_n_steps=4", "train", "log_every", 4),
        ("model.micro_batch_size=2", "train", "micro_batch_size", 2),
        ("model.global_batch_size=16", "train", "global_batch_size", 16),
        ("model.encoder_seq_length=64", "train", "seq_length", 64),
        ("model.data.seq_length=32", "train", "seq_length", 32),
        ("model.seed=7", "train", "seed", 7),
        ("model.optim.lr=1e-4", "optim", "lr", 1e-4),
        ("model.optim.lr=1", "optim", "lr", 1.0),
        ("model.optim.sched.min_lr=1e-5", "optim", "min_lr", 1e-5),
        ("model.optim.sched.warmup_steps=50", "optim", "warmup_steps", 50),
        ("model.optim.weight_decay=0.1", "optim", "weight_decay", 0.1),
        ("trainer.gradient_clip_val=0.5", "optim", "clip_grad", 0.5),
        ("model.pipeline_model_parallel_size=2", "parallel", "pipeline_parallel", 2),
        ("model.tensor_model_parallel_size=4", "parallel", "tensor_parallel", 4),
        ("model.data.splits_string=90,5,5", "data", "split", "90,5,5"),
        ("model.data.index_mapping_dir=idx", "data", "cache_dir", "idx"),
        ("model.data.eod_mask_loss=true", "data", "eod_mask_loss", True),
        ("model.tokenizer.model=tok", "data", "tokenizer", "tok"),
        ("model.kd_config.temperature=2.0", "kd", "temperature", 2.0),
        ("model.kd_config.logit_kl_temperature=3", "kd", "temperature", 3.0),
        ("model.kd_config.temperature_squared=false", "kd", "temperature_squared", False),
        ("model.kd_config.kind=reverse_kl", "kd", "kind", "reverse_kl"),
        ("model.kd_config.beta=0.3", "kd", "beta", 0.3),
        ("model.kd_config.skip_lm_loss=False", "kd", "skip_lm_loss", False),
        ("model.kd_config.kd_loss_scale=2.5", "kd", "kd_loss_scale", 2.5),
    ],
)
def test_each_key_sets_its_field(arg, group, field, value):
    kw = kwargs_of(BASE + [arg])
    got = getattr(kw[group], field)
    assert got == value and type(got) is type(value)
    # and only that field: the rest of its config keeps the defaults
    default = type(kw[group])()
    others = {k: v for k, v in vars(kw[group]).items() if k not in (field, "paths")}
    assert others == {k: v for k, v in vars(default).items() if k not in (field, "paths")}


def test_hydra_plus_prefix_and_quotes():
    kw = kwargs_of(BASE + ["+trainer.max_steps=9", "++model.optim.lr=2e-4",
                           "exp_manager.exp_dir='runs/my run'"])  # fmt: skip
    assert kw["train"].steps == 9 and kw["optim"].lr == 2e-4
    assert kw["output_dir"] == "runs/my run"
    assert kwargs_of(BASE + ["exp_manager.explicit_log_dir=logs"])["output_dir"] == "logs"
    assert kwargs_of(BASE + ["exp_manager.exp_dir=null"])["output_dir"] == cmd.DEFAULT_OUTPUT_DIR


def test_intermediate_layer_pairs_and_logit_layers():
    pairs = (
        "[[decoder.layers.0,decoder.layers.1],"
        "[decoder.final_layernorm,decoder.final_layernorm,mse]]"
    )
    kw = kwargs_of(BASE + [f"model.kd_config.intermediate_layer_pairs={pairs}",
                           "model.kd_config.logit_layers=[output_layer,output_layer]"])  # fmt: skip
    assert kw["kd"].intermediate_pairs == [
        ["decoder.layers.0", "decoder.layers.1"],
        ["decoder.final_layernorm", "decoder.final_layernorm", "mse"],
    ]
    kw["kd"].validate()  # the form KDConfig takes
    assert "[output_layer,output_layer]" in refusal(
        BASE + ["model.kd_config.logit_layers=[embedding,output_layer]"]
    )
    assert "list of [student_module" in refusal(
        BASE + ["model.kd_config.intermediate_layer_pairs=[a,b]"]
    )


@pytest.mark.parametrize(
    "given, expected",
    [(32, "fp32"), ("32", "fp32"), ("32-true", "fp32"), ("bf16", "bf16"),
     ("bf16-mixed", "bf16"), ("16-mixed", "fp16"), (16, "fp16")],
)  # fmt: skip
def test_precision_maps_onto_parallel_config(given, expected):
    parallel = kwargs_of(BASE + [f"trainer.precision={given}"])["parallel"]
    assert parallel.precision == expected
    if expected == "fp16":  # mapped, then refused by the check distill runs
        with pytest.raises(ConfigError, match="use fp32 or bf16"):
            parallel.validate(1)
    else:
        assert parallel.validate(1) == 1


def test_unknown_key_is_refused_in_one_line_listing_the_supported_keys():
    message = refusal(BASE + ["model.num_layers=4"])
    assert message.startswith("unknown key model.num_layers")
    for key in cmd.SUPPORTED:
        assert key in message
    assert "did you mean trainer.max_steps?" in refusal(BASE + ["trainer.max_step=4"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["trainer.max_steps"], "malformed argument 'trainer.max_steps'"),
        (["--config-path"], "malformed argument '--config-path'"),
        (["=3"], "malformed argument '=3'"),
        (["trainer.max_steps=1", "trainer.max_steps=2"], "trainer.max_steps is given twice"),
        (["model.data.data_prefix=[1.0,x"], "unbalanced brackets"),
        (["model.data.data_prefix=[1.0,,x]"], "empty list element"),
        (["model.data.data_prefix={train:[1.0,x]}"], "dictionary values are not supported"),
    ],
)
def test_malformed_arguments_are_refused(argv, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        cmd.parse_overrides(argv)


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("trainer.max_steps=ten", "trainer.max_steps must be a whole number"),
        ("trainer.max_steps=1e5", "trainer.max_steps must be a whole number, got 100000.0"),
        ("trainer.val_check_interval=0.5", "fractions of an epoch are not supported"),
        ("trainer.limit_val_batches=1.0", "fractions of an epoch are not supported"),
        ("model.optim.lr=fast", "model.optim.lr must be a number"),
        ("model.kd_config.skip_lm_loss=1", "must be true or false"),
        ("model.nemo_path=", "model.nemo_path needs a path"),
        ("trainer.devices=0", "trainer.devices must be a number of processes"),
        ("model.encoder_seq_length=64", "both set train.seq_length"),
    ],
)
def test_bad_values_are_refused_naming_the_key(arg, expected):
    extra = ["model.data.seq_length=32"] if "seq_length" in arg else []
    assert expected in refusal(BASE + extra + [arg])


def test_equal_aliases_are_accepted():
    kw = kwargs_of(BASE + ["model.encoder_seq_length=64", "model.data.seq_length=64"])
    assert kw["train"].seq_length == 64


def test_teacher_and_data_prefix_are_required():
    assert refusal(BASE[1:]).startswith("model.kd_teacher_restore_from_path is required")
    assert refusal(BASE[:1]).startswith("model.data.data_prefix is required")
    assert kwargs_of(BASE[:1] + ["model.data.data_prefix=[]"])["data"].mock


def test_devices_and_num_nodes_must_match_the_launch():
    two_per_node = {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}
    kwargs_of(BASE + ["trainer.devices=2", "trainer.num_nodes=2"], two_per_node)
    for anything in ("auto", -1):  # Lightning's "all devices": whatever torchrun started
        kwargs_of(BASE + [f"trainer.devices={anything}"], two_per_node)
    assert "torchrun started 2 processes per node" in refusal(
        BASE + ["trainer.devices=4"], two_per_node
    )
    assert "trainer.num_nodes=1 but the job has 2 node(s)" in refusal(
        BASE + ["trainer.num_nodes=1"], two_per_node
    )
    # a plain process is one process on one node
    assert "--nproc_per_node=2" in refusal(BASE + ["trainer.devices=2"], {})
    kwargs_of(BASE + ["trainer.devices=1", "trainer.num_nodes=1"], {})


def test_ignored_keys_are_accepted_and_explained():
    ignored = [
        "trainer.accelerator=gpu",
        "trainer.logger=False",
        "model.sequence_parallel=True",
        "exp_manager.checkpoint_callback_params.save_top_k=10",
        "+model.data.num_workers=2",
    ]
    kw = kwargs_of(BASE + ignored)
    assert kw == kwargs_of(BASE)
    assert all(reason for reason in cmd.IGNORED_KEYS.values())
    assert cmd.ignored_reason("exp_manager.checkpoint_callback_params.monitor")
    assert cmd.ignored_reason("exp_manager.checkpoint_callback_params") is None
    assert not set(cmd.IGNORED_KEYS) & set(cmd.SUPPORTED)


def test_parse_value_literals():
    assert cmd.parse_value("[1.0,'a,b',[x,2]]") == [1.0, "a,b", ["x", 2]]
    assert cmd.parse_value("[]") == []
    assert cmd.parse_value('"[1,2]"') == "[1,2]"
    assert [cmd.parse_value(v) for v in ("null", "None", "true", "False", "3", "1e-4")] == [
        None, None, True, False, 3, 1e-4,
    ]  # fmt: skip
    assert cmd.parse_value("path/to/x") == "path/to/x"


def test_main_runs_distill_and_prints_notes_and_summary(monkeypatch, capsys):
    from distill_llm import api

    calls = []

    def fake_distill(**kwargs):
        calls.append(kwargs)
        return {"step": 3, "final": "runs/x/final", "valid": {"val_lm_loss": 1.5}}

    monkeypatch.setattr(api, "distill", fake_distill)
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    assert cmd.main(SEED_ARGV + ["trainer.accelerator=gpu"]) == 0
    assert calls == [kwargs_of(SEED_ARGV, TORCHRUN_ENV)]
    out = capsys.readouterr().out
    assert "note: ignoring trainer.accelerator='gpu'" in out
    assert "done at step 3, val_lm_loss 1.5000" in out and "saved final_checkpoint.nemo" in out
    # rank 1 runs the same, silently
    monkeypatch.setenv("RANK", "1")
    assert cmd.main(SEED_ARGV + ["trainer.accelerator=gpu"]) == 0
    assert capsys.readouterr().out == ""


def test_main_refuses_with_exit_code_2_and_one_line(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cmd.main(BASE + ["model.hidden_size=64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key model.hidden_size") and err.count("\n") == 1


def test_help_lists_every_key_without_loading_megatron():
    code = (
        "import sys; from distill_llm import megatron_gpt_distillation as m; "
        "rc = m.main(['--help']); assert 'megatron' not in {k.split('.')[0] for k in sys.modules}"
        "; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in list(cmd.SUPPORTED) + list(cmd.IGNORED_KEYS):
        assert key in proc.stdout
    default = re.escape(f"-> optim.lr = {OptimConfig().lr!r}:")
    assert re.search(rf"^  model\.optim\.lr +{default}", proc.stdout, re.M)
