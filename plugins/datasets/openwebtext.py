"""OpenWebText tokenized with GPT-2."""

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ddiff
from ddiff_plugins.datasets import gpt2
from ddiff_plugins.datasets.optional import optional_import
from ddiff_plugins.datasets.splits import TokenWindows, tail_split, token_memmap

OPENWEBTEXT_HF = "Skylion007/openwebtext"
OPENWEBTEXT_TOKENS = "openwebtext_gpt2.bin"


def _tokenize_openwebtext(destination: Path) -> None:
    """Tokenize OpenWebText from the Hugging Face ``datasets`` cache with GPT-2, once,
    into ``destination`` (uint16, documents separated by end-of-text)."""
    datasets = optional_import("datasets", "text", "reading OpenWebText from a Hugging Face cache")
    try:
        corpus = datasets.load_dataset(OPENWEBTEXT_HF, split="train")
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean "not available"
        raise ddiff.DataError(
            f"openwebtext: {destination} is missing and the Hugging Face data set "
            f"{OPENWEBTEXT_HF} could not be loaded ({type(error).__name__}: {error}); put a "
            f"GPT-2 token file at {destination}, or make the data set available to datasets"
        ) from None
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


@dataclasses.dataclass(frozen=True)
class OpenWebTextSource(gpt2.AbstractGPT2Source):
    """OpenWebText tokenized with GPT-2 (V = 50257), documents joined by end-of-text and
    packed into disjoint sequences of ``length`` tokens; the last 2% of the sequences are
    held out for evaluation, as in the paper.

    Reads the token file ``openwebtext_gpt2.bin`` (uint16) in ``root``, memory-mapped. When
    it is absent, OpenWebText is read from the Hugging Face ``datasets`` cache (extra
    ``text``), tokenized once and stored there.

    Attributes (recipe keys):
        root: directory of the token file.
        length: tokens per sequence (the paper: 1024).
    """

    root: str = "data/openwebtext"
    length: int = 1024

    @functools.cached_property
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
