"""Loading causal LMs and tokenizers (hub id, local folder or GGUF file), and the tiny offline model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from aropd.paths import resolve

# A minimal ChatML-like template for tokenizers that ship none (the tiny offline model).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _split_gguf(name: str) -> tuple[str, str | None]:
    # "folder/model.gguf" loads through transformers' GGUF reader (needs `gguf` and `accelerate`).
    name = resolve(name)
    p = Path(name)
    return (str(p.parent), p.name) if p.suffix == ".gguf" else (name, None)


def _offline() -> bool:
    # The environment as well as huggingface_hub's constant: the constant is read once, at its import.
    from huggingface_hub import constants

    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _in_hub_cache(repo_id: str, *files: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    files = files or ("config.json", "tokenizer_config.json")
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "~")) or Path(name).is_absolute():
        return False
    try:
        validate_repo_id(name)
    except Exception:
        return False
    return True


_checked: set[str] = set()


def check_model_source(name: str, option: str | None = None) -> None:
    """Fail fast, in words, when ``name`` cannot be loaded: a local folder or file that is not there,
    a hub id that is neither cached nor reachable, a GGUF file without the ``gguf`` extra.

    ``option`` (e.g. ``model.init_args.student``) is named in the error. Runs before transformers,
    whose hub client retries an unreachable hub for over a minute before a generic error.
    """
    where = f"{option}: " if option else ""
    path = resolve(name)
    if path in _checked:
        return
    p = Path(path)  # transformers does not expand '~' either
    if p.suffix == ".gguf":
        if not p.is_file():
            # "org/repo/file.gguf" may name a file of a hub repository.
            repo = Path(path).parent.as_posix()
            if not _is_hub_id(repo):
                raise FileNotFoundError(f"{where}no such GGUF file: {name}{_relative_to_cwd(p)}")
            if not _in_hub_cache(repo, p.name):
                subject = f"{where}no such GGUF file {name!r}{_relative_to_cwd(p)}, and {repo!r} as a hub id"
                _check_on_hub(repo, subject, p.name)
        missing = [m for m in ("gguf", "accelerate") if not _importable(m)]
        if missing:
            raise ImportError(
                f"{where}{name} is a GGUF file: loading it needs {' and '.join(missing)}: pip install 'aropd[gguf]'"
            )
    elif not p.exists():
        if not _is_hub_id(path):
            raise FileNotFoundError(f"{where}no such folder: {name}{_relative_to_cwd(p)}")
        if not _in_hub_cache(path):
            _check_on_hub(path, f"{where}no such folder {name!r}{_relative_to_cwd(p)}, and {name!r} as a hub id")
    _checked.add(path)


def _relative_to_cwd(p: Path) -> str:
    return "" if p.is_absolute() else f" (relative to {Path.cwd()})"


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _check_on_hub(repo_id: str, subject: str, filename: str = "config.json") -> None:
    how = (
        f"To run offline, download it once on a machine with network (`hf download {repo_id}`, "
        f"`huggingface-cli download {repo_id}` with older huggingface_hub) and copy the Hugging Face cache "
        "(HF_HOME) here, or pass a local folder."
    )
    if _offline():
        raise FileNotFoundError(
            f"{subject} is not in the local Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE). {how}"
        )
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        # One request, a short timeout, no retries: the answer (or its absence) in seconds.
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=10)
    except GatedRepoError:
        return  # transformers' own error explains access requests
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{subject} is not on the Hugging Face hub (or it is private: `hf auth login` first)"
        ) from None
    except HfHubHTTPError:
        return  # the hub answered: transformers reports the details (a missing file, a revision)
    except Exception as e:
        raise OSError(
            f"{subject} is not in the local Hugging Face cache, and the hub is unreachable "
            f"({type(e).__name__}: {e}). {how}"
        ) from None


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    check_model_source(name)
    path, gguf = _split_gguf(name)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name: str, dtype: str = "float32") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    check_model_source(name)
    path, gguf = _split_gguf(name)
    kw: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if gguf:
        kw["gguf_file"] = gguf
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def meta_causal_lm(name: str) -> torch.nn.Module:
    """``name``'s architecture built on the meta device: its modules and shapes, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf = _split_gguf(name)
    config = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_same_vocabulary(student_tok: Any, teacher_tok: Any, teacher_name: str) -> None:
    """A separate teacher must share the student's tokenizer: the target is over the student's ids."""
    problems = []
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        problems.append(f"vocabulary differs ({len(student_tok)} vs {len(teacher_tok)} entries)")
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            problems.append(f"{attr} differs")
    if problems:
        raise ValueError(f"teacher {teacher_name!r} is incompatible with the student: " + "; ".join(problems))


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 384, split_digits: bool = False) -> Any:
    """A byte-level BPE trained on ``texts``, wrapped as a fast tokenizer with a chat template.

    ``split_digits`` makes every digit its own token, so arithmetic stays digit-wise.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|end|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_llama(tokenizer: Any, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)
