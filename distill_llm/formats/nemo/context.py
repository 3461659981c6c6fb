"""The `context/` half of a NeMo 2 checkpoint directory, written without NeMo.

    context/io.json          a fiddle graph of `TrainerContext(model=..., trainer=..., extra={})`,
                             in fiddle's JSON format "0.0.1"; NeMo's `load_context` reads it
    context/model.yaml       a readable mirror of `model` (`_target_` keys); NeMo's exporters and
                             TRT-LLM tokenizer loader read it with `yaml.safe_load`
    context/nemo_tokenizer/  the tokenizer files, named relative to `context/`

NeMo's classes cannot be imported here, so the graph is built from two plain nodes: `Target`
(a `fiddle.Config` of a class named by import path) and `PyRef` (a class, function or constant
named by import path, e.g. `torch.float32`). `_FiddleJson` writes them exactly as
`fiddle._src.experimental.serialization.dump_json` writes the real objects (same object names,
`paths`, refcounts and key order; tests/test_nemo_context.py checks it against fiddle itself).

The layout mirrors what `llm.import_ckpt` (nemo_toolkit 2.4.1) writes, see
tests/fixtures/nemo/nemo2_llama/context/, with two differences: only the config fields given
are written (NeMo fills the others with the config class's defaults when it builds it), and
`model.optim` is left out (GPTModel then builds its default optimizer module).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from distill_llm.errors import ConfigError
from distill_llm.formats.hf.config import TOKENIZER_FILES

TRAINER_CONTEXT = "nemo.lightning.io.pl.TrainerContext"
TRAINER = "nemo.lightning.pytorch.trainer.Trainer"
STRATEGY = "nemo.lightning.pytorch.strategies.megatron_strategy.MegatronStrategy"
AUTO_TOKENIZER = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"
SENTENCEPIECE_TOKENIZER = (
    "nemo.collections.common.tokenizers.sentencepiece_tokenizer.SentencePieceTokenizer"
)
TOKENIZER_DIR = "nemo_tokenizer"  # NeMo resolves the tokenizer's path against context/
SENTENCEPIECE_FILE = "tokenizer.model"
# Config fields whose value is a Python object (a dtype or a function), given as its import path.
PYREF_FIELDS = frozenset(
    {
        "activation_func",
        "params_dtype",
        "pipeline_dtype",
        "autocast_dtype",
        "transformer_layer_spec",
    }
)

FIDDLE_VERSION = "0.0.1"
_CONFIG_TYPE = ("fiddle._src.config", "Config")
_METADATA_TYPE = ("fiddle._src.config", "BuildableTraverserMetadata")
_LEAF_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class PyRef:
    """A class, function or constant named by import path: `PyRef("torch", "float32")`.

    io.json holds it as a fiddle pyref; model.yaml as `{_target_: torch.float32, _call_: false}`.
    """

    module: str
    name: str

    @classmethod
    def parse(cls, dotted: str) -> PyRef:
        """`"torch.nn.functional.silu"` -> `PyRef("torch.nn.functional", "silu")`."""
        module, _, name = dotted.rpartition(".")
        if not module or not name:
            raise ValueError(f"{dotted!r} is not an import path like 'torch.float32'")
        return cls(module, name)

    @property
    def dotted(self) -> str:
        """The import path, `module.name`."""
        return f"{self.module}.{self.name}"


class Target:
    """A `fiddle.Config` of the class or function `target` (an import path) with `arguments`.

    Arguments are leaves (bool, int, float, str, None), `PyRef`s, `Target`s, lists, tuples and
    dicts with str keys, in the order given. The same `Target` object used twice is one shared
    fiddle object, as in fiddle.
    """

    def __init__(self, target: str, /, **arguments: Any):
        self.ref = PyRef.parse(target)
        self.arguments = arguments

    def __repr__(self) -> str:
        return f"Target({self.ref.dotted!r}, {self.arguments!r})"


# -- the public entry points ----------------------------------------------------------------------
def write_context(
    context_dir: Path,
    fields: dict,
    *,
    model_class: str,
    config_class: str,
    tokenizer_files: Optional[Path],
) -> None:
    """Write a NeMo 2 `context/` directory (io.json, model.yaml, nemo_tokenizer/) at `context_dir`.

    `fields` are the model-config arguments under NeMo's GPTConfig names (num_layers,
    hidden_size, ..., params_dtype); those in `PYREF_FIELDS` may be given as import paths
    ("torch.nn.functional.silu", "torch.float32"). `model_class` / `config_class` are import
    paths, e.g. "nemo.collections.llm.gpt.model.llama.LlamaModel" / "...llama.LlamaConfig".
    `tokenizer_files`: a directory with Hugging Face tokenizer files (copied to
    nemo_tokenizer/, read by NeMo's AutoTokenizer), or with only a SentencePiece
    `tokenizer.model` (NeMo's SentencePieceTokenizer); None writes `tokenizer: null`, which
    NeMo's HF export cannot work without.
    """
    context_dir = Path(context_dir)
    config = Target(config_class, **{k: _config_value(k, v) for k, v in fields.items()})
    tokenizer, files = None, []
    if tokenizer_files is not None:
        tokenizer, files = _tokenizer(Path(tokenizer_files))
    model = Target(model_class, config=config, tokenizer=tokenizer)  # LlamaModel's order
    root = Target(TRAINER_CONTEXT, model=model, trainer=_trainer(), extra={})
    context_dir.mkdir(parents=True, exist_ok=True)
    if files:
        (context_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
    for f in files:
        shutil.copyfile(f, context_dir / TOKENIZER_DIR / f.name)
    (context_dir / "io.json").write_text(fiddle_json(root))
    (context_dir / "model.yaml").write_text(yaml.safe_dump(yaml_tree(model)))


def read_model_yaml(context_dir: Path) -> dict:
    """The parsed `model.yaml` of a NeMo 2 `context/` directory: `_target_` (the model class),
    `config` (the model-config mapping with its own `_target_`), `tokenizer`, ...; ConfigError
    when the file is missing, not YAML, or has no `config` mapping."""
    path = Path(context_dir) / "model.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist; give the context/ directory of a NeMo 2 checkpoint"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path} has no 'config' mapping; is it a NeMo 2 model.yaml?")
    return data


def fiddle_json(root: Target) -> str:
    """`root` in fiddle's JSON format, byte for byte what `serialization.dump_json` writes for
    the same graph of real `fiddle.Config`s (no trailing newline, as NeMo writes io.json)."""
    return json.dumps(_FiddleJson(root).result)


def yaml_tree(node: Any) -> Any:
    """`node` as NeMo's model.yaml holds it: a `Target` as a mapping with `_target_`, a `PyRef`
    as `{_target_: ..., _call_: false}`, tuples as lists."""
    if isinstance(node, Target):
        return {"_target_": node.ref.dotted, **{k: yaml_tree(v) for k, v in node.arguments.items()}}
    if isinstance(node, PyRef):
        return {"_target_": node.dotted, "_call_": False}
    if isinstance(node, dict):
        return {k: yaml_tree(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [yaml_tree(v) for v in node]
    return node


# -- the pieces of the graph ----------------------------------------------------------------------
def _config_value(name: str, value: Any) -> Any:
    """A config field's value as a graph node: import paths of `PYREF_FIELDS` become PyRefs."""
    if name in PYREF_FIELDS and isinstance(value, str):
        return PyRef.parse(value)
    _check_node(value, f"field {name!r}")
    return value


def _check_node(value: Any, where: str) -> None:
    """TypeError for a value neither fiddle's JSON nor model.yaml can hold (a bug in the caller)."""
    if isinstance(value, (Target, PyRef) + _LEAF_TYPES):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is not a str")
            _check_node(v, where)
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_node(v, where)
        return
    raise TypeError(f"{where}: {type(value).__name__} {value!r} cannot be written to io.json")


def _trainer() -> Target:
    """The trainer NeMo's `ModelConnector.nemo_setup` (lightning/io/connector.py) gives
    `import_ckpt`, as its io capture records it: MegatronStrategy's `**kwargs` land in an
    argument named `kwargs`. `ckpt_async_save=False` as in the fixture: a CPU can save only
    synchronously. NeMo's exporters load `subpath="model"` and never build this trainer."""
    strategy = Target(
        STRATEGY,
        ckpt_save_optimizer=False,
        ckpt_async_save=False,
        kwargs={"always_save_context": True},
    )
    return Target(TRAINER, accelerator="cpu", strategy=strategy, devices=1)


def _tokenizer(src: Path) -> Tuple[Target, List[Path]]:
    """The NeMo tokenizer for the files in `src` and the files to copy to
    context/nemo_tokenizer/. The tokenizer names them relative to context/, as NeMo does:
    `_artifact_transform_load` (lightning/io/mixin.py) and TRT-LLM's
    `get_tokenizer_from_nemo2_context` prefix the path with the context directory."""
    if not src.is_dir():
        raise ConfigError(f"tokenizer directory {str(src)!r} does not exist")
    present = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    names = {f.name for f in present}
    if names & {"tokenizer.json", "tokenizer_config.json"}:
        return Target(AUTO_TOKENIZER, pretrained_model_name=TOKENIZER_DIR), present
    if names == {SENTENCEPIECE_FILE}:
        model_path = f"{TOKENIZER_DIR}/{SENTENCEPIECE_FILE}"
        return Target(SENTENCEPIECE_TOKENIZER, model_path=model_path), present
    raise ConfigError(
        f"{str(src)!r} has no tokenizer.json, tokenizer_config.json or tokenizer.model; "
        "give the Hugging Face model directory or a SentencePiece tokenizer.model"
    )


# -- fiddle's JSON format -------------------------------------------------------------------------
def _pyref(module: str, name: str) -> dict:
    return {"type": "pyref", "module": module, "name": name}


def _memoizable(value: Any) -> bool:
    """fiddle's `daglish.is_memoizable` for our nodes: containers and Targets, not `()`."""
    return isinstance(value, (Target, dict, list)) or (isinstance(value, tuple) and value != ())


def _identity(value: Any) -> Any:
    """What makes two nodes the same object for fiddle: a PyRef's import path (the imported
    object is a singleton), else the node's id."""
    return ("pyref", value.module, value.name) if isinstance(value, PyRef) else id(value)


def _children(value: Any) -> List[tuple]:
    """(repr of fiddle's path element, path code, child) of a Target or container, in order."""
    if isinstance(value, Target):
        return [(f"Attr(name={k!r})", f".{k}", v) for k, v in value.arguments.items()]
    if isinstance(value, dict):
        return [(f"Key(key={k!r})", f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [(f"Index(index={i})", f"[{i}]", v) for i, v in enumerate(value)]
    return []


def _collect_paths(root: Target) -> Dict[Any, List[str]]:
    """Every path from `root` to each shared-able node, depth first (fiddle's
    `daglish_legacy.collect_paths_by_id(root, memoizable_only=True)`)."""
    paths: Dict[Any, List[str]] = {}

    def walk(value: Any, path: str) -> None:
        if _memoizable(value) or isinstance(value, PyRef):
            paths.setdefault(_identity(value), []).append(path)
        for _, code, child in _children(value):
            walk(child, path + code)

    walk(root, "<root>")
    return paths


class _FiddleJson:
    """One run of fiddle's `Serialization` over a graph of Targets, PyRefs, leaves and
    containers: memoizable nodes become named `objects` (children first, then the node's
    metadata, then the node), referenced as `{"type": "ref"}` and counted in `refcounts`."""

    def __init__(self, root: Target):
        self._memo: Dict[int, str] = {}
        self._alive: List[Any] = []  # keeps temporary metadata objects' ids unique
        self._objects: Dict[str, Any] = {}
        self._refcounts: Dict[str, int] = {}
        self._paths = _collect_paths(root)
        self.result = {
            "root": self._emit(root, ["<root>"]),
            "objects": self._objects,
            "refcounts": self._refcounts,
            "version": FIDDLE_VERSION,
        }

    def _ref(self, key: str) -> dict:
        self._refcounts[key] = self._refcounts.get(key, 0) + 1
        return {"type": "ref", "key": key}

    def _emit(self, value: Any, paths: Optional[List[str]]) -> Any:
        """`value` serialized; `paths` None inside metadata, where fiddle records no paths."""
        if _memoizable(value) and id(value) in self._memo:
            return self._ref(self._memo[id(value)])
        if paths is not None and (_memoizable(value) or isinstance(value, PyRef)):
            paths = self._paths.get(_identity(value), paths)  # all paths to a shared node
        if isinstance(value, _LEAF_TYPES):
            if paths is None:
                return value
            out = {"type": "leaf", "value": value}
        elif isinstance(value, PyRef):
            out = _pyref(value.module, value.name)
        else:
            items = [
                [element, self._emit(child, None if paths is None else [p + code for p in paths])]
                for element, code, child in _children(value)
            ]
            if isinstance(value, Target):
                type_, metadata = _CONFIG_TYPE, self._buildable_metadata(value)
            elif isinstance(value, dict):
                type_, metadata = ("builtins", "dict"), self._emit(self._keep(tuple(value)), None)
            else:
                type_, metadata = ("builtins", type(value).__name__), None
            out = {"type": _pyref(*type_), "items": items, "metadata": metadata}
        if paths is not None:
            out["paths"] = list(paths)
        if not _memoizable(value):
            return out
        hint = (
            value.ref.name.rpartition(".")[2] if isinstance(value, Target) else type(value).__name__
        )
        return self._register(value, hint, out)

    def _buildable_metadata(self, target: Target) -> dict:
        """fiddle's `BuildableTraverserMetadata` of a Config, without history: the callable, the
        argument names and empty tag and history dicts."""
        items = [
            ["Attr(name='fn_or_cls')", _pyref(target.ref.module, target.ref.name)],
            ["Attr(name='argument_names')", self._emit(self._keep(tuple(target.arguments)), None)],
            ["Attr(name='argument_tags')", self._emit(self._keep({}), None)],
            ["Attr(name='argument_history')", self._emit(self._keep({}), None)],
        ]
        out = {"type": _pyref(*_METADATA_TYPE), "items": items, "metadata": _pyref(*_METADATA_TYPE)}
        return self._register(self._keep(object()), "BuildableTraverserMetadata", out)

    def _keep(self, value: Any) -> Any:
        self._alive.append(value)
        return value

    def _register(self, value: Any, hint: str, out: dict) -> dict:
        """Store `out` under fiddle's name for it (`llama_config_1`) and return a ref to it."""
        stem = re.sub(r"(?<=[^_A-Z])(?=[A-Z])", "_", hint).lower()  # fiddle's _to_snake_case
        n = 1
        while f"{stem}_{n}" in self._objects:
            n += 1
        name = f"{stem}_{n}"
        self._memo[id(value)] = name
        self._alive.append(value)
        self._objects[name] = out
        return self._ref(name)
