"""The NeMo 2 `context/` writer against the context nemo_toolkit 2.4.1 wrote for the same model
(tests/fixtures/nemo/nemo2_llama/context) and against fiddle's own serializer. No NeMo import:
NeMo's classes are stood in for by recording classes in stand-in modules."""

import collections
import json
import shutil
import sys
import types
from pathlib import Path

import fiddle as fdl
import pytest
import torch
import yaml
from fiddle._src.experimental import serialization

from distill_llm.errors import ConfigError
from distill_llm.formats.nemo.context import (
    AUTO_TOKENIZER,
    SENTENCEPIECE_TOKENIZER,
    PyRef,
    Target,
    fiddle_json,
    read_model_yaml,
    write_context,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nemo"
NEMO_CONTEXT = FIXTURES / "nemo2_llama" / "context"
HF_BPE = FIXTURES / "hf_llama_bpe"  # the HF model nemo2_llama was imported from
HF_SP = FIXTURES / "hf_llama_sp"
# The fields distill_llm writes (NeMo's GPTConfig names).
FIELDS = (
    "num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups kv_channels "
    "normalization layernorm_epsilon activation_func gated_linear_unit add_bias_linear "
    "add_qkv_bias qk_layernorm position_embedding_type rotary_base rotary_percent seq_length "
    "share_embeddings_and_output_weights make_vocab_size_divisible_by vocab_size init_method_std "
    "hidden_dropout attention_dropout params_dtype bf16 fp16 tensor_model_parallel_size "
    "pipeline_model_parallel_size"
).split()


def fixture_yaml() -> dict:
    return yaml.safe_load((NEMO_CONTEXT / "model.yaml").read_text())


def fixture_io() -> dict:
    return json.loads((NEMO_CONTEXT / "io.json").read_text())


def fixture_fields() -> dict:
    """FIELDS as the fixture's model.yaml has them; a pyref ({_target_, _call_: false}) as its
    import path, the way write_context takes it."""
    config = fixture_yaml()["config"]
    return {n: config[n]["_target_"] if isinstance(config[n], dict) else config[n] for n in FIELDS}


def write(context_dir: Path, fields=None, tokenizer=HF_BPE) -> Path:
    y = fixture_yaml()
    write_context(
        context_dir,
        fixture_fields() if fields is None else fields,
        model_class=y["_target_"],
        config_class=y["config"]["_target_"],
        tokenizer_files=tokenizer,
    )
    return context_dir


@pytest.fixture
def written(tmp_path) -> Path:
    return write(tmp_path / "context")


# -- walking io.json ------------------------------------------------------------------------------
def _item(obj: dict, attr: str):
    """The serialized argument `attr` of a serialized fiddle Config."""
    items = {element: value for element, value in obj["items"]}
    return items[f"Attr(name={attr!r})"]


def _deref(io: dict, node):
    return (
        io["objects"][node["key"]] if isinstance(node, dict) and node.get("type") == "ref" else node
    )


def _follow(io: dict, *attrs: str) -> dict:
    """The object at root.<attrs...>."""
    obj = _deref(io, io["root"])
    for attr in attrs:
        obj = _deref(io, _item(obj, attr))
    return obj


def _callable(io: dict, obj: dict) -> str:
    fn = _item(_deref(io, obj["metadata"]), "fn_or_cls")
    return f"{fn['module']}.{fn['name']}"


def _refs(node):
    """Every {"type": "ref"} key anywhere in `node`."""
    if isinstance(node, dict):
        if node.get("type") == "ref":
            yield node["key"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _resolved(io: dict, node):
    """`node` with every ref replaced by its object (object names differ between files)."""
    node = _deref(io, node)
    if isinstance(node, dict):
        return {k: _resolved(io, v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolved(io, v) for v in node]
    return node


def _no_paths(node: dict) -> dict:
    return {k: v for k, v in node.items() if k != "paths"}


# -- stand-ins for NeMo's modules -----------------------------------------------------------------
class StandIn:
    """What `fdl.build` makes of a NeMo class here: it records its keyword arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class StandInModule(types.ModuleType):
    """A module that has every class asked of it (a StandIn subclass with that name)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (StandIn,), {"__module__": self.__name__, "__qualname__": name})
        setattr(self, name, cls)
        return cls


def stand_in_modules(monkeypatch, io: dict) -> None:
    """Put a StandInModule in sys.modules for every module io.json names except torch, fiddle
    and builtins; fiddle's `import_symbol` uses `importlib.import_module`, which returns it."""
    modules = {node["module"] for node in _pyrefs(io)}
    for module in sorted(modules):
        if module.split(".")[0] not in ("torch", "fiddle", "builtins"):
            monkeypatch.setitem(sys.modules, module, StandInModule(module))


def _pyrefs(node):
    if isinstance(node, dict):
        if node.get("type") == "pyref":
            yield node
        for v in node.values():
            yield from _pyrefs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pyrefs(v)


def as_yaml(value):
    """A built graph of StandIns as model.yaml writes it."""
    if isinstance(value, StandIn):
        target = f"{type(value).__module__}.{type(value).__qualname__}"
        return {"_target_": target, **{k: as_yaml(v) for k, v in value.kwargs.items()}}
    if isinstance(value, torch.dtype):
        return {"_target_": str(value), "_call_": False}  # str(torch.float32) == "torch.float32"
    if isinstance(value, types.FunctionType):
        return {"_target_": f"{value.__module__}.{value.__qualname__}", "_call_": False}
    if isinstance(value, dict):
        return {k: as_yaml(v) for k, v in value.items()}
    return value


def real_fiddle_graph(node, monkeypatch):
    """`node` (Targets, PyRefs, ...) as real fdl.Configs of StandIns; torch pyrefs resolve to
    the real torch objects (NeMo registers torch dtypes as fiddle constants: lightning/io/
    fdl_torch.py; here, only for this test)."""
    memo = {}

    def build(value):
        if isinstance(value, Target):
            if id(value) not in memo:
                module = sys.modules.get(value.ref.module)
                if not isinstance(module, StandInModule):
                    module = StandInModule(value.ref.module)
                    monkeypatch.setitem(sys.modules, value.ref.module, module)
                cls = getattr(module, value.ref.name)
                memo[id(value)] = fdl.Config(
                    cls, **{k: build(v) for k, v in value.arguments.items()}
                )
            return memo[id(value)]
        if isinstance(value, PyRef):
            obj = serialization.import_symbol(
                serialization.DefaultPyrefPolicy(), value.module, value.name
            )
            if isinstance(obj, torch.dtype):
                serialization.register_constant(value.module, value.name, compare_by_identity=True)
            return obj
        if isinstance(value, dict):
            return {k: build(v) for k, v in value.items()}
        if isinstance(value, list):
            return [build(v) for v in value]
        if isinstance(value, tuple):
            return tuple(build(v) for v in value)
        return value

    monkeypatch.setattr(
        serialization,
        "_serialization_constants_by_id",
        dict(serialization._serialization_constants_by_id),
    )
    return build(node)


# -- (1) model.yaml ----------------------------------------------------------------------------
def test_model_yaml_has_the_fixtures_value_for_every_written_field(written):
    ours, theirs = read_model_yaml(written), fixture_yaml()
    assert set(ours["config"]) == set(FIELDS) | {"_target_"}  # what was given, nothing more
    for name in FIELDS:
        assert ours["config"][name] == theirs["config"][name], name
    assert ours["config"]["activation_func"] == {
        "_target_": "torch.nn.functional.silu",
        "_call_": False,
    }
    assert ours["_target_"] == theirs["_target_"]
    assert ours["config"]["_target_"] == theirs["config"]["_target_"]
    assert ours["tokenizer"]["_target_"] == theirs["tokenizer"]["_target_"] == AUTO_TOKENIZER
    assert ours["tokenizer"]["pretrained_model_name"] == "nemo_tokenizer"
    # the fixture's own file is a plain yaml.safe_dump (sorted keys); ours is written the same way
    text = (written / "model.yaml").read_text()
    assert yaml.safe_dump(yaml.safe_load(text)) == text


def test_writing_twice_gives_the_same_bytes(tmp_path):
    a, b = write(tmp_path / "a"), write(tmp_path / "b")
    for name in ("io.json", "model.yaml"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


# -- (2) io.json's structure ---------------------------------------------------------------------
def test_io_json_has_fiddles_structure_and_the_fixtures_classes_and_values(written):
    ours, theirs = json.loads((written / "io.json").read_text()), fixture_io()
    assert list(ours) == ["root", "objects", "refcounts", "version"] == list(theirs)
    assert ours["version"] == "0.0.1"
    for name, obj in ours["objects"].items():  # NeMo's load() reads every object's type pyref
        assert obj["type"]["type"] == "pyref" and obj["type"]["module"], name
    counted = collections.Counter(_refs(ours["root"])) + collections.Counter(_refs(ours["objects"]))
    assert ours["refcounts"] == dict(counted)
    assert set(ours["refcounts"]) == set(ours["objects"])  # every object used, every ref resolves

    chains = [(), ("model",), ("model", "config"), ("model", "tokenizer"), ("trainer",)]
    chains.append(("trainer", "strategy"))
    for chain in chains:
        assert _callable(ours, _follow(ours, *chain)) == _callable(theirs, _follow(theirs, *chain))
        # NeMo's load_context(subpath=...) picks the object whose paths hold "<root>.<subpath>"
        path = "<root>" + "".join(f".{a}" for a in chain)
        holders = [k for k, v in ours["objects"].items() if path in v.get("paths", [])]
        assert [ours["objects"][k] for k in holders] == [_follow(ours, *chain)]

    config, fixture_config = _follow(ours, "model", "config"), _follow(theirs, "model", "config")
    assert [name for name, _ in config["items"]] == [f"Attr(name={n!r})" for n in FIELDS]
    fixture_names = {element for element, _ in fixture_config["items"]}
    compared = 0
    for name in FIELDS:
        item = _item(config, name)
        assert item["paths"] == [f"<root>.model.config.{name}"]
        if f"Attr(name={name!r})" in fixture_names:  # NeMo wrote it: the same node
            assert _no_paths(item) == _no_paths(_item(fixture_config, name)), name
            compared += 1
        else:  # NeMo left it to the class default; model.yaml holds the value
            expected = fixture_yaml()["config"][name]
            got = (
                {"_target_": f"{item['module']}.{item['name']}", "_call_": False}
                if item["type"] == "pyref"
                else item["value"]
            )
            assert got == expected, name
    assert compared >= 15  # most fields are in both files
    assert _item(config, "params_dtype") == {
        "type": "pyref",
        "module": "torch",
        "name": "float32",
        "paths": ["<root>.model.config.params_dtype"],
    }
    for attr in ("ckpt_save_optimizer", "ckpt_async_save"):
        strategy = (_follow(ours, "trainer", "strategy"), _follow(theirs, "trainer", "strategy"))
        assert _no_paths(_item(strategy[0], attr)) == _no_paths(_item(strategy[1], attr))
    for chain in (("trainer", "strategy", "kwargs"), ("model", "tokenizer")):
        assert _resolved(ours, _follow(ours, *chain)) == _resolved(theirs, _follow(theirs, *chain))


# -- (3) fiddle itself -----------------------------------------------------------------------------
def test_io_json_is_byte_identical_to_fiddles_own_dump_of_the_same_graph(tmp_path, monkeypatch):
    fields = dict(fixture_fields(), pipeline_dtype="torch.float32")  # a pyref at two paths
    context = write(tmp_path / "context", fields)
    y = fixture_yaml()
    config = Target(y["config"]["_target_"], **fields)
    config.arguments.update(
        activation_func=PyRef.parse(fields["activation_func"]),
        params_dtype=PyRef("torch", "float32"),
        pipeline_dtype=PyRef("torch", "float32"),
    )
    tokenizer = Target(AUTO_TOKENIZER, pretrained_model_name="nemo_tokenizer")
    model = Target(y["_target_"], config=config, tokenizer=tokenizer)
    strategy = Target(
        "nemo.lightning.pytorch.strategies.megatron_strategy.MegatronStrategy",
        ckpt_save_optimizer=False,
        ckpt_async_save=False,
        kwargs={"always_save_context": True},
    )
    trainer = Target(
        "nemo.lightning.pytorch.trainer.Trainer", accelerator="cpu", strategy=strategy, devices=1
    )
    root = Target("nemo.lightning.io.pl.TrainerContext", model=model, trainer=trainer, extra={})
    expected = serialization.dump_json(real_fiddle_graph(root, monkeypatch))
    assert (context / "io.json").read_text() == expected
    dtype = _item(_follow(json.loads(expected), "model", "config"), "pipeline_dtype")
    assert dtype["paths"] == [
        "<root>.model.config.params_dtype",
        "<root>.model.config.pipeline_dtype",
    ]


def test_the_emitter_matches_fiddle_on_shared_nodes_and_every_container(monkeypatch):
    shared = Target("fake.pkg.Shared", x=1, fn=PyRef("torch.nn.functional", "relu"))
    graph = Target(
        "fake.pkg.Root",
        a=shared,
        b=[shared, 2.5, None, "s"],
        c=(1, (), {"k": [True]}),
        d={"nested": {"deep": shared}, "empty": {}},
        e=Target("fake.pkg.make_thing"),
    )
    expected = serialization.dump_json(real_fiddle_graph(graph, monkeypatch))
    assert fiddle_json(graph) == expected
    io = json.loads(expected)
    assert io["refcounts"]["shared_1"] == 3 and "make_thing_1" in io["objects"]


def test_io_json_loads_with_fiddles_deserializer_into_what_model_yaml_says(written, monkeypatch):
    io = json.loads((written / "io.json").read_text())
    stand_in_modules(monkeypatch, io)
    config = serialization.load_json((written / "io.json").read_text())
    assert isinstance(config, fdl.Config)
    assert (
        fdl.get_callable(config.model.config)
        is sys.modules["nemo.collections.llm.gpt.model.llama"].LlamaConfig
    )
    assert config.model.config.activation_func is torch.nn.functional.silu
    assert config.model.config.params_dtype is torch.float32
    assert config.model.tokenizer.pretrained_model_name == "nemo_tokenizer"

    built = fdl.build(config)  # as NeMo's load_context does, with the StandIns as NeMo
    assert as_yaml(built.kwargs["model"]) == read_model_yaml(written)
    assert built.kwargs["extra"] == {}
    assert as_yaml(built.kwargs["trainer"]) == {
        "_target_": "nemo.lightning.pytorch.trainer.Trainer",
        "accelerator": "cpu",
        "devices": 1,
        "strategy": {
            "_target_": "nemo.lightning.pytorch.strategies.megatron_strategy.MegatronStrategy",
            "ckpt_save_optimizer": False,
            "ckpt_async_save": False,
            "kwargs": {"always_save_context": True},
        },
    }

    # NeMo's load_context(path, subpath="model.config"): the root becomes that object
    key = next(k for k, v in io["objects"].items() if "<root>.model.config" in v.get("paths", []))
    sub = serialization.Deserialization(dict(io, root={"type": "ref", "key": key})).result
    ours = fdl.build(sub).kwargs

    fixture = fixture_io()
    stand_in_modules(monkeypatch, fixture)
    key = next(
        k for k, v in fixture["objects"].items() if "<root>.model.config" in v.get("paths", [])
    )
    theirs = serialization.Deserialization(dict(fixture, root={"type": "ref", "key": key})).result
    assert type(fdl.build(theirs)).__qualname__ == "LlamaConfig"
    common = set(ours) & set(theirs.__arguments__)
    assert len(common) >= 15
    for name in common:
        assert ours[name] == getattr(theirs, name), name


def test_gelu_loads_as_torchs_gelu(tmp_path, monkeypatch):
    """F.gelu is a C builtin, which plain fiddle cannot dump (NeMo patches fiddle to write it as
    `torch._C._nn.gelu`); named by its torch.nn.functional path it still loads as itself."""
    context = write(
        tmp_path / "context", dict(fixture_fields(), activation_func="torch.nn.functional.gelu")
    )
    stand_in_modules(monkeypatch, json.loads((context / "io.json").read_text()))
    config = serialization.load_json((context / "io.json").read_text())
    assert config.model.config.activation_func is torch.nn.functional.gelu


# -- (4) tokenizer files ---------------------------------------------------------------------------
def test_hf_tokenizer_files_are_copied_to_nemo_tokenizer(written):
    copied = sorted(p.name for p in (written / "nemo_tokenizer").iterdir())
    assert copied == sorted(p.name for p in (NEMO_CONTEXT / "nemo_tokenizer").iterdir())
    for name in copied:
        assert (written / "nemo_tokenizer" / name).read_bytes() == (HF_BPE / name).read_bytes()
    # NeMo resolves pretrained_model_name against context/ (_artifact_transform_load)
    tokenizer = read_model_yaml(written)["tokenizer"]
    assert (written / tokenizer["pretrained_model_name"] / "tokenizer.json").is_file()


def test_a_lone_sentencepiece_model_becomes_a_sentencepiece_tokenizer(tmp_path):
    src = tmp_path / "sp"
    src.mkdir()
    shutil.copyfile(HF_SP / "tokenizer.model", src / "tokenizer.model")
    context = write(tmp_path / "context", tokenizer=src)
    tokenizer = read_model_yaml(context)["tokenizer"]
    assert tokenizer == {
        "_target_": SENTENCEPIECE_TOKENIZER,
        "model_path": "nemo_tokenizer/tokenizer.model",
    }
    assert (context / tokenizer["model_path"]).read_bytes() == (
        HF_SP / "tokenizer.model"
    ).read_bytes()
    io = json.loads((context / "io.json").read_text())
    assert _callable(io, _follow(io, "model", "tokenizer")) == SENTENCEPIECE_TOKENIZER


def test_an_hf_sentencepiece_tokenizer_stays_an_hf_tokenizer(tmp_path):
    context = write(tmp_path / "context", tokenizer=HF_SP)  # LlamaTokenizer: tokenizer_config.json
    assert read_model_yaml(context)["tokenizer"]["_target_"] == AUTO_TOKENIZER
    copied = sorted(p.name for p in (context / "nemo_tokenizer").iterdir())
    assert copied == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]


def test_no_tokenizer_writes_null(tmp_path):
    context = write(tmp_path / "context", tokenizer=None)
    assert read_model_yaml(context)["tokenizer"] is None
    assert not (context / "nemo_tokenizer").exists()
    io = json.loads((context / "io.json").read_text())
    assert _item(_follow(io, "model"), "tokenizer") == {
        "type": "leaf",
        "value": None,
        "paths": ["<root>.model.tokenizer"],
    }


def test_a_directory_without_tokenizer_files_is_refused_before_writing(tmp_path):
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError, match="tokenizer"):
            write(tmp_path / "context", tokenizer=src)
    assert not (tmp_path / "context").exists()


# -- reading and refusing --------------------------------------------------------------------------
def test_read_model_yaml_reads_the_fixture_and_refuses_bad_files_in_one_line(tmp_path):
    assert read_model_yaml(NEMO_CONTEXT)["config"]["num_layers"] == 2
    with pytest.raises(ConfigError, match="does not exist") as err:
        read_model_yaml(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "model.yaml").write_text("config: [unclosed\n  - x: {\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        read_model_yaml(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "model.yaml").write_text("_target_: x.Y\n")
    with pytest.raises(ConfigError, match="no 'config' mapping"):
        read_model_yaml(tmp_path)


def test_a_value_io_json_cannot_hold_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="num_layers"):
        write(tmp_path / "context", dict(fixture_fields(), num_layers=object()))
    assert PyRef.parse("torch.nn.functional.gelu") == PyRef("torch.nn.functional", "gelu")
