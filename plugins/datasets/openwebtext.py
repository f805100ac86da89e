"""OpenWebText tokenized with GPT-2."""

import os
from pathlib import Path

import equinox as eqx
import numpy as np
from tqdm import tqdm

import ddiff
from ddiff_plugins.datasets import gpt2
from ddiff_plugins.datasets.optional import hugging_face_dataset
from ddiff_plugins.datasets.splits import TokenWindows, tail_split, token_memmap

OPENWEBTEXT_HF = "Skylion007/openwebtext"
OPENWEBTEXT_TOKENS = "openwebtext_gpt2.bin"


def _tokenize_openwebtext(destination: Path) -> None:
    """Tokenize OpenWebText from the Hugging Face ``datasets`` cache with GPT-2, once,
    into ``destination`` (uint16, documents separated by end-of-text)."""
    corpus = hugging_face_dataset(
        OPENWEBTEXT_HF,
        split="train",
        purpose="reading OpenWebText from a Hugging Face cache",
        prefix=f"openwebtext: {destination} is missing and",
        advice=f"put a GPT-2 token file at {destination}, or make the data set available to datasets",
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.part-{os.getpid()}")
    batch_size = 1024
    batches = tqdm(
        (batch["text"] for batch in corpus.iter(batch_size=batch_size)),
        total=-(-len(corpus) // batch_size),
        desc="tokenizing OpenWebText",
        unit="batch",
    )
    try:
        with open(temporary, "wb") as out:
            for document in gpt2.documents(batches):
                out.write(document.tobytes())
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


class OpenWebTextSource(gpt2.AbstractGPT2Source):
    """OpenWebText tokenized with GPT-2 (V = 50257), documents joined by end-of-text and
    packed into disjoint sequences of ``length`` tokens; the last 2% of the sequences are
    held out for evaluation, as in the paper.

    Reads the token file ``openwebtext_gpt2.bin`` (uint16) in ``root``, memory-mapped. When
    it is absent, OpenWebText is read from the Hugging Face ``datasets`` cache (extra
    ``text``), tokenized once and stored there. The token file is mapped when a split is
    first asked for, and the map kept outside the module (:func:`ddiff.cached_load`).

    Attributes (recipe keys):
        root: directory of the token file.
        length: tokens per sequence (the paper: 1024).
    """

    root: str = eqx.field(static=True, default="data/openwebtext")
    length: int = eqx.field(static=True, default=1024)

    @ddiff.cached_load
    def _tokens(self) -> tuple[np.ndarray, Path]:
        path = Path(self.root).expanduser().absolute() / OPENWEBTEXT_TOKENS
        if not path.exists():
            _tokenize_openwebtext(path)
        return token_memmap(path, "uint16", "openwebtext"), path

    def split(self, name: str) -> TokenWindows:
        tokens, path = self._tokens
        count = len(tokens) // self.length
        return tail_split(
            tokens[: count * self.length],
            name,
            cut=(count - max(count // 50, 1)) * self.length,
            length=self.length,
            stride=self.length,
            vocab_size=gpt2.VOCAB_SIZE,
            where=f"openwebtext {path}",
        )
