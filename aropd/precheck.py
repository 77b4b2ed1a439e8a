"""Config mistakes caught before Lightning is imported.

Importing Lightning takes ~5 s (it pulls torchmetrics, scipy and torch._dynamo), so the real parser
answers a typo like ``--trainer.max_step 5`` only after that. This module reads the command line
and the ``--config`` files with nothing heavier than ``yaml`` and ``ast``: each file must exist and
parse, and every option key must be a parameter of the class it configures (``lightning.Trainer``,
and the ``model``/``data`` classes when they are aropd's own), read from the installed sources.
Whatever it cannot be sure of it leaves to the real parser, which checks everything again.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

# The classes AropdCLI uses when a config names none, and the options it links (source → target,
# kept equal; setting a target directly is an error). Defined here so the check needs no Lightning.
DEFAULT_CLASSES = {"model": "aropd.module.PrivilegedDistillation", "data": "aropd.data.PrivilegedDataModule"}
LINKS = (
    ("model.init_args.student", "data.init_args.tokenizer"),  # the data is tokenized for the student
    ("model.init_args.max_new_tokens", "data.init_args.max_new_tokens"),  # and cut to its rollout budget
)
# Trainer-method parameters LightningCLI fills itself rather than exposing as options.
_SUBCOMMAND_SKIP = {
    "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
    "validate": {"model", "dataloaders", "datamodule"},
    "test": {"model", "dataloaders", "datamodule"},
    "predict": {"model", "dataloaders", "datamodule", "return_predictions"},
}
_EXTRA_TOP_LEVEL = {"config", "print_config", "seed_everything", "trainer", "model", "data", "cpu_threads"}
_SUBCLASS_KEYS = {"class_path", "init_args", "dict_kwargs", "__path__"}


class ConfigError(ValueError):
    """A config or option mistake found before anything was imported or created."""


def _module_source(module: str) -> Path | None:
    """The file of ``module`` without importing it (nor, past its top-level package, its parents)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def init_params(class_path: str) -> frozenset[str] | None:
    """The keyword parameters of ``class_path``'s ``__init__`` (following ``**kwargs`` to its base
    class), read from source; None when that cannot be done with certainty."""
    module, _, name = class_path.rpartition(".")
    path = _module_source(module) if module else None
    if path is None:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if cls is None:
        return None
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    params: set[str] = set()
    if init is not None:
        args = init.args
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]} - {"self"}
        if args.kwarg is None:
            return frozenset(params)
    # No __init__, or one passing **kwargs on: the rest comes from the (single) base class.
    if len(cls.bases) != 1 or not isinstance(cls.bases[0], ast.Name):
        return None
    base = _resolve_name(tree, module, cls.bases[0].id)
    inherited = init_params(base) if base else None
    return None if inherited is None else frozenset(params | inherited)


def _resolve_name(tree: ast.Module, module: str, name: str) -> str | None:
    """The dotted path of ``name`` as ``module`` sees it: defined there, or ``from x import name``."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return f"{module}.{name}"
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return f"{node.module}.{alias.name}"
    return None


@lru_cache(maxsize=None)
def _trainer_method_params(method: str) -> frozenset[str] | None:
    path = _module_source("lightning.pytorch.trainer.trainer")
    if path is None:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"), None)
    fn = next((n for n in (cls.body if cls else []) if isinstance(n, ast.FunctionDef) and n.name == method), None)
    if fn is None:
        return None
    args = fn.args
    return frozenset(a.arg for a in [*args.args, *args.kwonlyargs]) - {"self"}


def top_level_keys(subcommand: str) -> frozenset[str] | None:
    """The keys a ``subcommand`` config may hold at its top level."""
    params = _trainer_method_params(subcommand)
    return None if params is None else frozenset(params - _SUBCOMMAND_SKIP[subcommand] | _EXTRA_TOP_LEVEL)


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Group:
    """One subclass-mode group (``model`` or ``data``): its class, and the keys set since it was chosen.
    When a later config switches the class, the keys set before it that the new class lacks are
    dropped by the parser (a method preset over the quickstart relies on that), so only the keys
    set after the last switch are checked."""

    def __init__(self, name: str) -> None:
        self.name, self.class_path, self.keys = name, DEFAULT_CLASSES[name], []

    def switch(self, class_path: Any) -> None:
        if isinstance(class_path, str):
            self.class_path, self.keys = class_path, []

    def add(self, value: Any, origin: str) -> None:
        if isinstance(value, str):
            self.switch(value)
        elif isinstance(value, dict):
            if "class_path" in value:
                self.switch(value["class_path"])
            init_args = value.get("init_args")
            for k in init_args if isinstance(init_args, dict) else ():
                self.keys.append((k, origin, f"{self.name}.init_args.{k}"))
            for k in value.keys() - _SUBCLASS_KEYS:  # init args given without `init_args:`
                self.keys.append((k, origin, f"{self.name}.{k}"))


def check_argv(argv: list[str]) -> None:
    """Raise :class:`ConfigError` naming every unknown option and unreadable config in ``argv``
    (the arguments after the program name); return quietly when all is well or unsure."""
    if not argv or argv[0] not in _SUBCOMMAND_SKIP:
        return
    import yaml

    subcommand, problems = argv[0], []
    trainer_keys = init_params("lightning.pytorch.trainer.trainer.Trainer")
    top_keys = top_level_keys(subcommand)
    groups = {name: _Group(name) for name in DEFAULT_CLASSES}
    trainer_seen: list[tuple[str, str, str]] = []
    top_seen: list[tuple[str, str]] = []

    def take(key: str, value: Any, origin: str) -> None:
        head, _, tail = key.partition(".")
        top_seen.append((head, origin))
        if head in groups:
            if not tail:
                groups[head].add(value, origin)
            elif tail == "class_path":
                groups[head].switch(value)
            else:
                first, _, _ = tail.removeprefix("init_args.").partition(".")
                if first and first not in _SUBCLASS_KEYS:
                    groups[head].keys.append((first, origin, f"{head}.{tail}"))
        elif head == "trainer":
            if tail:
                first = tail.partition(".")[0]
                trainer_seen.append((first, origin, f"trainer.{tail}"))
            elif isinstance(value, dict):
                trainer_seen.extend((k, origin, f"trainer.{k}") for k in value)

    i, args = 1, argv
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help") or arg.startswith("--print_config"):
            return  # the parser's own output is what is asked for
        if not arg.startswith("-"):
            continue
        key, eq, value = arg.lstrip("-").partition("=")
        if not eq and i < len(args) and not args[i].startswith("--"):
            value, i = args[i], i + 1
        key = key.rstrip("+")  # `--trainer.callbacks+=...` appends
        if key in ("c", "config"):
            path = Path(value)
            if not path.is_file():
                problems.append(f"--config {value}: " + ("is a directory, not a YAML file" if path.is_dir() else "no such file"))
                continue
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark is not None else ""
                problems.append(f"--config {value}{where}: not valid YAML ({getattr(e, 'problem', None) or e})")
                continue
            if loaded is None:
                continue
            if not isinstance(loaded, dict):
                problems.append(f"--config {value}: expected a mapping of options, got a {type(loaded).__name__}")
                continue
            for k, v in loaded.items():
                take(str(k), v, value)
        else:
            try:
                parsed = yaml.safe_load(value) if value else None
            except yaml.YAMLError:
                parsed = value
            take(key, parsed, "command line")

    def unknown(kind: str, full: str, origin: str, key: str, options) -> str:
        where = f"--{full}" if origin == "command line" else f"{origin}: {full}"
        return f"{where}: {key!r} is not an option of {kind}{_suggest(key, options)}"

    if top_keys is not None:
        for key, origin in top_seen:
            if key not in top_keys:
                problems.append(unknown(f"`aropd {subcommand}`", key, origin, key, top_keys))
    if trainer_keys is not None:
        for key, origin, full in trainer_seen:
            if key not in trainer_keys:
                problems.append(unknown("the Trainer", full, origin, key, trainer_keys))
    for group in groups.values():
        params = init_params(group.class_path) if group.class_path.startswith("aropd.") else None
        if params is None:
            continue
        linked = {t.rpartition(".")[2]: s for s, t in LINKS if t.startswith(f"{group.name}.")}
        for key, origin, full in group.keys:
            if key in linked:
                where = f"--{full}" if origin == "command line" else f"{origin}: {full}"
                problems.append(f"{where}: follows {linked[key]} and cannot be set on its own; set {linked[key]}")
            elif key not in params:
                problems.append(unknown(group.class_path, full, origin, key, params))
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))
