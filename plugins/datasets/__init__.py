"""Built-in data sets: CIFAR-10, text8, OpenWebText, downsampled ImageNet 64x64, generic
character-level text and token files, and zero-shot perplexity sets for ``ddiff eval``.

One module per source (:mod:`~ddiff_plugins.datasets.cifar10`, ``text8``,
``openwebtext``, ``imagenet64``, ``text_file``, ``token_file``, ``zero_shot``), and the
helpers they share: ``download`` (verified downloads), ``unpickling`` (arrays only),
``gpt2`` (tokenisation), ``detokenize`` (the zero-shot sets' detokenisers), ``splits``
(token windows, image rows, token files), ``windows`` and ``images`` (what the window and
image sources have in common) and ``optional`` (optional dependencies).

Every file-based source takes its location from one recipe key (``root`` for the standard
sets, ``path`` for the generic files), opens its files only when a split is first asked
for, memory-maps what is large, keeps what it loaded outside the module
(``ddiff.cached_load``, so that a source is a pytree of recipe keys only), and refuses
malformed input with one line that names the file and the problem. Batching, shuffling,
checkpointable iteration and sharding by process are ddiff's grain pipeline
(``ddiff.runner.train_batches``).
"""

import ddiff
from ddiff_plugins.datasets.cifar10 import CIFAR10Source
from ddiff_plugins.datasets.imagenet64 import ImageNet64Source
from ddiff_plugins.datasets.openwebtext import OpenWebTextSource
from ddiff_plugins.datasets.text8 import Text8Source
from ddiff_plugins.datasets.text_file import TextFileSource
from ddiff_plugins.datasets.token_file import TokenFileSource
from ddiff_plugins.datasets.zero_shot import ZeroShotSource

COMPONENTS: dict[str, dict[str, type]] = {
    "data": {
        "cifar10": CIFAR10Source,
        "text8": Text8Source,
        "openwebtext": OpenWebTextSource,
        "imagenet64": ImageNet64Source,
        "text_file": TextFileSource,
        "token_file": TokenFileSource,
        "zero_shot": ZeroShotSource,
    },
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
