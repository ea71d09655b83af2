"""Special-token ids of the two Dispider tokenizers, read without importing transformers when possible."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from .errors import CheckpointError

IMAGE_TOKEN = "<image>"
IM_PATCH_TOKEN = "<im_patch>"
HAS_ANSWER_TOKEN = "<has_answer>"
TO_DO_TOKEN = "<to_do>"
KEEP_SILENT_TOKEN = "<keep_silent>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
END_OF_TEXT_TOKEN = "<|endoftext|>"
COMPACT_PAD_TOKEN = "<pad>"

# Files a Qwen2 tokenizer may be made of; whichever exist are copied by the split.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the Dispider special tokens in one tokenizer; None where the text is not one single token."""

    image: int | None
    im_patch: int | None
    has_answer: int | None
    to_do: int | None
    keep_silent: int | None
    im_end: int | None
    pad: int | None

    def as_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


TOKEN_TEXTS = {
    "image": IMAGE_TOKEN,
    "im_patch": IM_PATCH_TOKEN,
    "has_answer": HAS_ANSWER_TOKEN,
    "to_do": TO_DO_TOKEN,
    "keep_silent": KEEP_SILENT_TOKEN,
    "im_end": IM_END_TOKEN,
}


def tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    """The tokenizer files present in a directory; a CheckpointError when there is no usable tokenizer."""
    present = [tokenizer_dir / name for name in TOKENIZER_FILE_NAMES if (tokenizer_dir / name).is_file()]
    names = {p.name for p in present}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise CheckpointError(tokenizer_dir / "tokenizer.json", None, "no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    return present


def copy_tokenizer_files(tokenizer_dir: Path, out_dir: Path) -> list[Path]:
    copied = []
    for source in tokenizer_files(tokenizer_dir):
        shutil.copyfile(source, out_dir / source.name)
        copied.append(out_dir / source.name)
    return copied


def _single_id_finder(tokenizer_dir: Path) -> Callable[[str], int | None]:
    """A function text -> id when the text encodes to exactly one token of that text, else None."""
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        # The tokenizers library reads tokenizer.json in milliseconds; transformers would cost seconds of import.
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise CheckpointError(tokenizer_json, None, f"cannot be loaded: {exc}") from exc

        def find(text: str) -> int | None:
            ids = tok.encode(text, add_special_tokens=False).ids
            return ids[0] if len(ids) == 1 and tok.id_to_token(ids[0]) == text else None

        return find

    # Slow-only tokenizer (vocab.json + merges.txt): only transformers can read it faithfully.
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def find_slow(text: str) -> int | None:
        ids = auto.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and auto.convert_ids_to_tokens(ids[0]) == text else None

    return find_slow


def _configured_pad_token(tokenizer_dir: Path) -> str | None:
    config_file = tokenizer_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    pad = json.loads(config_file.read_text()).get("pad_token")
    if isinstance(pad, dict):  # AddedToken serialised as a dict
        pad = pad.get("content")
    return pad


def read_special_token_ids(tokenizer_dir: Path, *, default_pad: str | None = None) -> SpecialTokenIds:
    """The Dispider special-token ids of the tokenizer in ``tokenizer_dir``.

    ``pad`` is the configured pad token, else ``default_pad`` (the v1 loader sets ``<pad>`` on the compact
    tokenizer when it has none).
    """
    tokenizer_files(tokenizer_dir)
    find = _single_id_finder(tokenizer_dir)
    ids = {name: find(text) for name, text in TOKEN_TEXTS.items()}
    pad_text = _configured_pad_token(tokenizer_dir) or default_pad
    ids["pad"] = find(pad_text) if pad_text else None
    return SpecialTokenIds(**ids)


def check_ids_fit_vocab(ids: SpecialTokenIds, vocab_size: int, tokenizer_dir: Path, vocab_file: Path) -> None:
    """Every special id must index a row of the embedding matrix."""
    for name, value in ids.as_dict().items():
        if value is not None and value >= vocab_size:
            raise CheckpointError(
                tokenizer_dir / "tokenizer.json",
                TOKEN_TEXTS.get(name, name),
                f"token id {value} is outside the {vocab_size} embedding rows of {vocab_file}",
            )
