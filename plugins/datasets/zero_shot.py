"""Zero-shot perplexity sets for a GPT-2-vocabulary text model, for ``ddiff eval``."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import numpy as np

import ddiff
from ddiff_plugins.datasets import detokenize, gpt2
from ddiff_plugins.datasets.optional import hugging_face_dataset
from ddiff_plugins.datasets.splits import TokenWindows, nonempty

ZERO_SHOT: dict[str, tuple[str, str | None, str, Callable[[str], str] | None, bool]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", detokenize.wikitext, True),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "text", detokenize.wikitext, True),
    "ptb": ("ptb_text_only", None, "sentence", detokenize.ptb, False),
    "lambada": ("EleutherAI/lambada_openai", "en", "text", None, False),
    "lm1b": ("lm1b", None, "text", detokenize.lm1b, False),
}
"""name -> (Hugging Face data set, configuration, text field, detokenizer, whether the
whole split is one document)."""


class ZeroShotSource(gpt2.AbstractGPT2Source):
    """A zero-shot perplexity set for a GPT-2-vocabulary text model (as in the MD4, SEDD and
    MDLM papers): the test split of WikiText-2, WikiText-103, the Penn Treebank, LAMBADA or
    One Billion Words, read through Hugging Face ``datasets`` (extra ``text``),
    detokenized, tokenized with GPT-2, joined with end-of-text and packed into disjoint
    sequences of ``length``. The set is read and tokenized when its split is first asked
    for, and the tokens kept outside the module (:func:`ddiff.cached_load`). For
    evaluation only::

        ddiff eval RUN_DIR 'data={kind: zero_shot, name: wikitext103}' --output eval_wikitext103.json

    Attributes (recipe keys):
        name: which set.
        length: tokens per sequence (the trained model's, 1024 for OpenWebText).
        cache_dir: the ``datasets`` cache to read (null: its default).
    """

    name: Literal["wikitext2", "wikitext103", "ptb", "lambada", "lm1b"] = eqx.field(
        static=True, default="wikitext103"
    )
    length: int = eqx.field(static=True, default=1024)
    cache_dir: str | None = eqx.field(static=True, default=None)

    @ddiff.cached_load
    def _tokens(self) -> np.ndarray:
        hf_name, config, field, detokenize, whole = ZERO_SHOT[self.name]
        rows = hugging_face_dataset(
            hf_name,
            config,
            split="test",
            cache_dir=self.cache_dir,
            purpose=f"the zero-shot set {self.name}",
            prefix=f"zero_shot {self.name}:",
            advice="make it available to datasets (online once, or in data.cache_dir)",
        )
        texts = list(rows[field])
        if whole:
            texts = ["".join(texts)]
        if detokenize is not None:
            texts = [detokenize(text) for text in texts]
        texts = [text for text in texts if text.strip()]
        documents = list(gpt2.documents([texts]))
        return np.concatenate(documents) if documents else np.zeros(0, np.uint16)

    def split(self, name: str) -> TokenWindows:
        if name == "train":
            raise ddiff.DataError(
                f"zero_shot {self.name} is for evaluation only; train on openwebtext and "
                f"evaluate with: ddiff eval RUN_DIR 'data={{kind: zero_shot, name: {self.name}}}'"
            )
        windows = TokenWindows(
            self._tokens,
            length=self.length,
            stride=self.length,
            vocab_size=gpt2.VOCAB_SIZE,
            where=f"zero_shot {self.name}",
        )
        return nonempty(
            windows,
            f"zero_shot {self.name}",
            f"its test split has {len(self._tokens)} tokens, fewer than length={self.length}",
        )
