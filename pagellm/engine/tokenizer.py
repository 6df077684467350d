"""Load the tokenizer: from a model directory, a hub id, or built from GGUF metadata.

Building a tokenizer from GGUF metadata takes transformers several seconds; the result
is saved once in pagellm's cache folder (keyed by the file's path, size and mtime) and
reloaded from there in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any

import transformers

from pagellm.utils import cache_dir

logger = logging.getLogger(__name__)


def _gguf_cache_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_tokenizer(path: str, chat_template: str | None = None) -> Any:
    """A transformers tokenizer for ``path`` (directory, hub id or .gguf file)."""
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        target = os.path.join(cache_dir("tokenizers"), _gguf_cache_key(path))
        if os.path.isfile(os.path.join(target, "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(target)
        else:
            logger.info("building the tokenizer from GGUF metadata (cached afterwards)")
            tok = AutoTokenizer.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path)
            )
            tmp = tempfile.mkdtemp(dir=os.path.dirname(target))
            tok.save_pretrained(tmp)
            try:
                os.rename(tmp, target)  # atomic; a concurrent builder may have won
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
