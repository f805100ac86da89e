"""Built-in data sets: CIFAR-10, text8, OpenWebText, downsampled ImageNet 64x64, generic
character-level text and token files, and zero-shot perplexity sets for ``ddiff eval``.

Every file-based source takes its location from one recipe key (``root`` for the standard
sets, ``path`` for the generic files), opens its files only when a split is first asked
for, memory-maps what is large, and refuses malformed input with one line that names the
file and the problem. Batching, shuffling, checkpointable iteration and sharding by
process are ddiff's grain pipeline (:func:`ddiff.train_batches`).
"""

import codecs
import dataclasses
import functools
import hashlib
import importlib
import io
import os
import pickle
import re
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

import ddiff

# --------------------------------------------------------------------------- helpers


def _optional(module: str, extra: str, purpose: str) -> Any:
    """Import an optional dependency, or fail with one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ddiff.DdiffError(
            f"{purpose} needs the Python package {module!r}: pip install 'ddiff[{extra}]'"
        ) from None


def _download(url: str, destination: Path, md5: str, what: str) -> None:
    """Fetch ``url`` to ``destination`` with a progress bar and check its MD5.

    The bytes go to a temporary file beside the destination, renamed into place only
    when complete and verified, so an interrupted download leaves nothing behind.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.part-{os.getpid()}")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as error:
        temporary.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise ddiff.DataError(
            f"{what}: {destination} is missing and downloading it from {url} failed "
            f"({reason}); download it by hand and put it at {destination}, or set data.root "
            f"to the directory that holds it"
        ) from None
    if digest.hexdigest() != md5:
        temporary.unlink(missing_ok=True)
        raise ddiff.DataError(
            f"{what}: the file downloaded from {url} has MD5 {digest.hexdigest()}, expected "
            f"{md5}; nothing was saved, try again or put a good copy at {destination}"
        )
    os.replace(temporary, destination)


_RECONSTRUCT = np.empty(0).__reduce__()[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (the CIFAR-10 batches), never
    arbitrary objects."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}") from None


def _check_index(index: int, count: int) -> int:
    index = int(index)
    if not 0 <= index < count:
        raise IndexError(f"example {index} of a split of {count}")
    return index


# --------------------------------------------------------------------------- splits


class TokenWindows:
    """A split of fixed-length windows into a 1-D token array (an ``np.memmap`` or an
    in-memory array): window i holds tokens [i*stride, i*stride + length). Every window is
    checked against the vocabulary as it is read, and a bad id is reported with the file
    and its position."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        length: int,
        stride: int,
        vocab_size: int,
        where: str,
        offset: int = 0,
    ):
        self.tokens = tokens
        self.length = length
        self.stride = stride
        self.vocab_size = vocab_size
        self.where = where
        self.offset = offset
        self.count = 0 if len(tokens) < length else (len(tokens) - length) // stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = _check_index(index, self.count) * self.stride
        window = np.asarray(self.tokens[start : start + self.length])
        if window.max(initial=0) >= self.vocab_size:
            bad = int(np.argmax(window >= self.vocab_size))
            raise ddiff.DataError(
                f"{self.where}: token id {int(window[bad])} at position "
                f"{self.offset + start + bad} is outside the vocabulary 0..{self.vocab_size - 1}"
            )
        return {"tokens": window.astype(np.int32)}


class ImageRows:
    """A split of images stored one per row in channel-planar order (C, H, W), as in the
    CIFAR-10 batches and the downsampled ImageNet files, possibly across several arrays
    (memory-mapped or not). Examples are flattened in (H, W, C) order."""

    def __init__(
        self,
        parts: Sequence[np.ndarray],
        labels: np.ndarray | None,
        shape: tuple[int, int, int],
    ):
        self.parts = list(parts)
        self.labels = labels
        self.shape = shape
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = _check_index(index, len(self))
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        height, width, channels = self.shape
        row = np.asarray(self.parts[part][index - self.starts[part]])
        tokens = row.reshape(channels, height, width).transpose(1, 2, 0).reshape(-1)
        item = {"tokens": tokens.astype(np.int32)}
        if self.labels is not None:
            item["label"] = np.int32(self.labels[index])
        return item


def _nonempty(split: Any, what: str, why: str) -> Any:
    if len(split) == 0:
        raise ddiff.DataError(f"{what}: the split is empty: {why}")
    return split


def _positive(value: int | None, key: str) -> None:
    if value is not None and value < 1:
        raise ddiff.RecipeError(f"must be >= 1, got {value}", path=f"data.{key}")


def _fraction(value: float, key: str) -> None:
    if not 0.0 < value < 1.0:
        raise ddiff.RecipeError(f"must be in (0, 1), got {value}", path=f"data.{key}")


def _tail_split(
    tokens: np.ndarray,
    name: str,
    *,
    cut: int,
    length: int,
    stride: int,
    vocab_size: int,
    where: str,
) -> TokenWindows:
    """Train on windows of ``tokens[:cut]`` starting every ``stride``; evaluate on
    disjoint windows of ``tokens[cut:]``."""
    if name == "train":
        part, offset, step = tokens[:cut], 0, stride
    else:
        part, offset, step = tokens[cut:], cut, length
    windows = TokenWindows(
        part, length=length, stride=step, vocab_size=vocab_size, where=where, offset=offset
    )
    return _nonempty(
        windows, where, f"its {name} part has {len(part)} tokens, fewer than length={length}"
    )


def _tail_cut(count: int, fraction: float) -> int:
    return count - int(round(count * fraction))


# --------------------------------------------------------------------------- GPT-2 text

GPT2_VOCAB_SIZE = 50257
GPT2_EOS = 50256


@functools.cache
def _gpt2() -> Any:
    """The GPT-2 byte-pair encoding (tiktoken's ``gpt2``)."""
    tiktoken = _optional("tiktoken", "text", "GPT-2 tokenization")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # noqa: BLE001 - tiktoken fetches its tables; any failure is the user's setup
        raise ddiff.DataError(
            f"cannot load tiktoken's GPT-2 tables ({error}); run once with network access "
            f"or point TIKTOKEN_CACHE_DIR at a cache that has them"
        ) from None


def _gpt2_decode(tokens: np.ndarray) -> str:
    try:
        encoding = _gpt2()
    except ddiff.DdiffError:
        return " ".join(str(int(t)) for t in tokens)
    return encoding.decode([int(t) for t in tokens if t < GPT2_VOCAB_SIZE])


def _gpt2_documents(batches: Iterable[Sequence[str]]) -> Iterator[np.ndarray]:
    """Each document of each batch as uint16 GPT-2 ids followed by end-of-text."""
    encoding = _gpt2()
    for batch in batches:
        for ids in encoding.encode_ordinary_batch(list(batch)):
            yield np.asarray([*ids, GPT2_EOS], np.uint16)


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3072) uint8 planar, labels (N,)) of one CIFAR-10 python batch."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ddiff.DataError(f"{where}: not a CIFAR-10 python pickle ({error})") from None
    if not isinstance(batch, dict):
        raise ddiff.DataError(f"{where}: not a CIFAR-10 batch (a pickled {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ddiff.DataError(f"{where}: not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", None)
        raise ddiff.DataError(
            f"{where}: images have shape {shape} and dtype {getattr(data, 'dtype', None)}; "
            f"expected (N, 3072) uint8, 32x32 RGB images"
        )
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ddiff.DataError(f"{where}: expected {data.shape[0]} labels in 0..9")
    return data, labels.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class CIFAR10Source(ddiff.AbstractDataSource):
    """CIFAR-10 from the standard python-pickle tarball: 50,000 training and 10,000 test
    images (the test set is the eval split), each D = 32x32x3 = 3072 tokens of 256 values,
    flattened in (height, width, channel) order.

    The tarball ``cifar-10-python.tar.gz`` (or its extracted ``cifar-10-batches-py``
    directory) is read from ``root``; when absent it is downloaded there with a progress
    bar and an MD5 check.

    Attributes (recipe keys):
        root: directory holding (or receiving) the tarball.
        download: whether to download the tarball when it is absent.
        class_conditional: give the class label (0..9) with each image.
    """

    root: str = "data/cifar10"
    download: bool = True
    class_conditional: bool = False

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def seq_len(self) -> int:
        return 32 * 32 * 3

    @property
    def num_classes(self) -> int:
        return 10 if self.class_conditional else 0

    @property
    def metric(self) -> str:
        return "bits_per_dim"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (32, 32, 3)

    def _members(self) -> dict[str, tuple[bytes, str]]:
        root = Path(self.root).expanduser().absolute()
        names = (*CIFAR10_TRAIN, CIFAR10_TEST)
        extracted = root / CIFAR10_DIR
        if extracted.is_dir():
            missing = [n for n in names if not (extracted / n).is_file()]
            if missing:
                raise ddiff.DataError(
                    f"cifar10: {extracted} lacks {', '.join(missing)}; put the complete "
                    f"extracted {CIFAR10_DIR} directory there, or the tarball {CIFAR10_ARCHIVE} in {root}"
                )
            return {n: ((extracted / n).read_bytes(), str(extracted / n)) for n in names}
        archive = root / CIFAR10_ARCHIVE
        if not archive.exists():
            if not self.download:
                raise ddiff.DataError(
                    f"cifar10: {archive} is missing; download {CIFAR10_URL} and put it there "
                    f"(or set data.download=true, or data.root to the directory that holds it)"
                )
            _download(CIFAR10_URL, archive, CIFAR10_MD5, "cifar10")
        try:
            with tarfile.open(archive, "r:gz") as tar:
                found = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in found]
                if missing:
                    raise ddiff.DataError(
                        f"cifar10: {archive} lacks {', '.join(missing)}; it is not the CIFAR-10 "
                        f"python tarball ({CIFAR10_URL})"
                    )
                return {
                    n: (tar.extractfile(found[n]).read(), f"{archive}:{found[n].name}")
                    for n in names
                }
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ddiff.DataError(
                f"cifar10: {archive} is not a gzip-compressed tar archive ({error}); "
                f"replace it with the CIFAR-10 python tarball from {CIFAR10_URL}"
            ) from None

    @functools.cached_property
    def _splits(self) -> dict[str, ImageRows]:
        batches = {name: _cifar_batch(raw, where) for name, (raw, where) in self._members().items()}
        splits = {}
        for split, names in (("train", CIFAR10_TRAIN), ("eval", (CIFAR10_TEST,))):
            labels = np.concatenate([batches[n][1] for n in names])
            splits[split] = ImageRows(
                [batches[n][0] for n in names],
                labels if self.class_conditional else None,
                self.image_shape,
            )
        return splits

    def split(self, name: str) -> ImageRows:
        return _nonempty(self._splits[name], "cifar10", f"its {name} batches hold no images")


# --------------------------------------------------------------------------- text8

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def _character_table(alphabet: str) -> np.ndarray:
    table = np.full(256, 255, np.uint8)
    for code, character in enumerate(alphabet):
        table[ord(character)] = code
    return table


@dataclasses.dataclass(frozen=True)
class Text8Source(ddiff.AbstractDataSource):
    """text8: the first 10^8 characters of an English Wikipedia dump, lower-case letters
    and spaces (27 symbols: ``a``..``z`` are 0..25, space is 26), split as in the paper
    into the first 90M characters (train), the next 5M (validation) and the last 5M (test).
    (Proportionally 90%/5%/5% for a file of another length.)

    Training examples are windows of ``length`` characters starting every
    ``train_stride`` characters (1, every offset, as in the MD4 code); evaluation uses
    disjoint chunks of ``length``.

    Attributes (recipe keys):
        root: directory holding ``text8.zip`` (or the extracted file ``text8``).
        length: characters per example (the paper: 256).
        train_stride: characters between the starts of consecutive training windows.
        eval_split: ``validation`` or ``test`` (the paper reports test BPC).
    """

    root: str = "data/text8"
    length: int = 256
    train_stride: int = 1
    eval_split: Literal["validation", "test"] = "validation"

    def __post_init__(self) -> None:
        _positive(self.length, "length")
        _positive(self.train_stride, "train_stride")

    @property
    def vocab_size(self) -> int:
        return len(TEXT8_ALPHABET)

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def metric(self) -> str:
        return "bits_per_char"

    def decode(self, tokens: np.ndarray) -> str:
        return "".join(TEXT8_ALPHABET[int(t)] if t < 27 else "_" for t in tokens)

    @functools.cached_property
    def _codes(self) -> tuple[np.ndarray, str]:
        """(the text as symbol codes, uint8; the file it came from)."""
        root = Path(self.root).expanduser().absolute()
        plain, archive = root / "text8", root / "text8.zip"
        if plain.is_file():
            raw, where = np.memmap(plain, np.uint8, mode="r"), str(plain)
        elif archive.is_file():
            try:
                with zipfile.ZipFile(archive) as zipped:
                    raw = np.frombuffer(zipped.read("text8"), np.uint8)
            except zipfile.BadZipFile:
                raise ddiff.DataError(f"text8: {archive} is not a zip archive") from None
            except KeyError:
                raise ddiff.DataError(
                    f"text8: {archive} has no member named 'text8'; it is not the text8 zip"
                ) from None
            where = str(archive)
        else:
            raise ddiff.DataError(
                f"text8: {archive} is missing; download {TEXT8_URL} and put it there "
                f"(or set data.root to the directory that holds it)"
            )
        codes = _character_table(TEXT8_ALPHABET)[raw]
        if np.any(codes == 255):
            bad = int(np.argmax(codes == 255))
            raise ddiff.DataError(
                f"text8: {where} has byte {int(raw[bad])} ({chr(raw[bad])!r}) at offset {bad}; "
                f"text8 holds only lower-case letters a-z and spaces"
            )
        return codes, where

    def split(self, name: str) -> TokenWindows:
        codes, where = self._codes
        total = len(codes)
        bounds = {
            "train": (0, total * 9 // 10),
            "validation": (total * 9 // 10, total * 19 // 20),
            "test": (total * 19 // 20, total),
        }
        part = "train" if name == "train" else self.eval_split
        start, stop = bounds[part]
        windows = TokenWindows(
            codes[start:stop],
            length=self.length,
            stride=self.train_stride if name == "train" else self.length,
            vocab_size=self.vocab_size,
            where=where,
            offset=start,
        )
        return _nonempty(
            windows,
            f"text8 ({where})",
            f"its {part} part has {stop - start} characters, fewer than length={self.length}",
        )


# --------------------------------------------------------------------------- token files


def _token_memmap(path: Path, dtype: str, what: str) -> np.ndarray:
    """A token file memory-mapped: ``.npy`` (its header gives the dtype) or raw binary of
    ``dtype`` (uint16 or uint32)."""
    if not path.is_file():
        raise ddiff.DataError(f"{what}: {path} is missing")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ddiff.DataError(f"{what}: {path} is not a .npy array file ({error})") from None
        if tokens.dtype not in (np.uint16, np.uint32) or tokens.ndim != 1:
            raise ddiff.DataError(
                f"{what}: {path} holds a {tokens.dtype} array of shape {tokens.shape}; "
                f"expected a 1-D uint16 or uint32 array of token ids"
            )
        return tokens
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ddiff.DataError(
            f"{what}: {path} has {size} bytes, not a whole number of {dtype} tokens; "
            f"check the file and data.dtype"
        )
    if size == 0:
        raise ddiff.DataError(f"{what}: {path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


@dataclasses.dataclass(frozen=True)
class TokenFileSource(ddiff.AbstractDataSource):
    """A file of token ids, memory-mapped: raw binary uint16/uint32 (``.bin``) or a 1-D
    ``.npy`` array. Training uses windows of ``length`` starting every ``stride`` tokens
    of the first 1 - ``eval_fraction`` of the file; evaluation uses disjoint windows of the
    rest.

    Attributes (recipe keys):
        path: the token file.
        vocabulary: number of token values V (every id must be below it).
        length: tokens per example.
        dtype: ``uint16`` or ``uint32``, for raw files (``.npy`` files carry their own).
        stride: tokens between training windows (null: ``length``, disjoint).
        eval_fraction: the held-out tail of the file.
        unit: what evaluation reports beside bits per token.
    """

    path: str
    vocabulary: int
    length: int = 1024
    dtype: Literal["uint16", "uint32"] = "uint16"
    stride: int | None = None
    eval_fraction: float = 0.02
    unit: Literal["bits_per_token", "bits_per_char", "perplexity"] = "bits_per_token"

    def __post_init__(self) -> None:
        _positive(self.vocabulary, "vocabulary")
        _positive(self.length, "length")
        _positive(self.stride, "stride")
        _fraction(self.eval_fraction, "eval_fraction")

    @property
    def vocab_size(self) -> int:
        return self.vocabulary

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def metric(self) -> str:
        return self.unit

    @functools.cached_property
    def _tokens(self) -> np.ndarray:
        return _token_memmap(Path(self.path).expanduser().absolute(), self.dtype, "token_file")

    def split(self, name: str) -> TokenWindows:
        return _tail_split(
            self._tokens,
            name,
            cut=_tail_cut(len(self._tokens), self.eval_fraction),
            length=self.length,
            stride=self.stride or self.length,
            vocab_size=self.vocabulary,
            where=f"token_file {Path(self.path).expanduser().absolute()}",
        )


# --------------------------------------------------------------------------- text files


@dataclasses.dataclass(frozen=True)
class TextFileSource(ddiff.AbstractDataSource):
    """A UTF-8 text file modelled character by character. The vocabulary is ``alphabet``
    (token i is its i-th character) or, when null, the file's distinct characters in
    code-point order. The last ``eval_fraction`` of the characters is held out; training
    windows of ``length`` start every ``stride`` characters of the rest.

    The file is read into memory once (4 bytes a character while encoding); for corpora
    of billions of characters, write a :class:`TokenFileSource` file instead.

    Attributes (recipe keys):
        path: the text file.
        length: characters per example.
        alphabet: the characters, in token order (null: from the file).
        stride: characters between training windows (null: ``length``, disjoint).
        eval_fraction: the held-out tail of the file.
    """

    path: str
    length: int = 256
    alphabet: str | None = None
    stride: int | None = None
    eval_fraction: float = 0.05

    def __post_init__(self) -> None:
        _positive(self.length, "length")
        _positive(self.stride, "stride")
        _fraction(self.eval_fraction, "eval_fraction")
        if self.alphabet is not None and len(set(self.alphabet)) != len(self.alphabet):
            raise ddiff.RecipeError("repeats a character", path="data.alphabet")

    @functools.cached_property
    def _encoded(self) -> tuple[np.ndarray, str]:
        """(the text as token ids, the alphabet)."""
        path = Path(self.path).expanduser().absolute()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ddiff.DataError(f"text_file: {path} is missing") from None
        except UnicodeDecodeError as error:
            raise ddiff.DataError(
                f"text_file: {path} is not UTF-8 text (byte {error.start} cannot be decoded)"
            ) from None
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        alphabet = self.alphabet
        if alphabet is None:
            alphabet = "".join(chr(c) for c in np.unique(points))
        if not alphabet:
            raise ddiff.DataError(f"text_file: {path} is empty")
        known = np.array(sorted(ord(c) for c in alphabet), dtype=np.uint32)
        order = np.argsort([ord(c) for c in alphabet]).astype(np.int64)
        position = np.clip(np.searchsorted(known, points), 0, len(known) - 1)
        unknown = known[position] != points
        if np.any(unknown):
            bad = int(np.argmax(unknown))
            raise ddiff.DataError(
                f"text_file: {path} has character {chr(points[bad])!r} at offset {bad}, "
                f"which is not in data.alphabet"
            )
        dtype = np.uint8 if len(alphabet) <= 256 else np.uint32
        return order[position].astype(dtype), alphabet

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) if self.alphabet is not None else len(self._encoded[1])

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def metric(self) -> str:
        return "bits_per_char"

    def decode(self, tokens: np.ndarray) -> str:
        alphabet = self._encoded[1] if self.alphabet is None else self.alphabet
        return "".join(alphabet[int(t)] if t < len(alphabet) else "_" for t in tokens)

    def split(self, name: str) -> TokenWindows:
        return _tail_split(
            self._encoded[0],
            name,
            cut=_tail_cut(len(self._encoded[0]), self.eval_fraction),
            length=self.length,
            stride=self.stride or self.length,
            vocab_size=self.vocab_size,
            where=f"text_file {Path(self.path).expanduser().absolute()}",
        )


# --------------------------------------------------------------------------- OpenWebText

OPENWEBTEXT_HF = "Skylion007/openwebtext"
OPENWEBTEXT_TOKENS = "openwebtext_gpt2.bin"


def _tokenize_openwebtext(destination: Path) -> None:
    """Tokenize OpenWebText from the Hugging Face ``datasets`` cache with GPT-2, once,
    into ``destination`` (uint16, documents separated by end-of-text)."""
    datasets = _optional("datasets", "text", "reading OpenWebText from a Hugging Face cache")
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
            for document in _gpt2_documents(batches):
                out.write(document.tobytes())
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class OpenWebTextSource(ddiff.AbstractDataSource):
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

    def __post_init__(self) -> None:
        _positive(self.length, "length")

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB_SIZE

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def metric(self) -> str:
        return "perplexity"

    def decode(self, tokens: np.ndarray) -> str:
        return _gpt2_decode(tokens)

    @functools.cached_property
    def _tokens(self) -> tuple[np.ndarray, Path]:
        path = Path(self.root).expanduser().absolute() / OPENWEBTEXT_TOKENS
        if not path.exists():
            _tokenize_openwebtext(path)
        return _token_memmap(path, "uint16", "openwebtext"), path

    def split(self, name: str) -> TokenWindows:
        tokens, path = self._tokens
        count = len(tokens) // self.length
        return _tail_split(
            tokens[: count * self.length],
            name,
            cut=(count - max(count // 50, 1)) * self.length,
            length=self.length,
            stride=self.length,
            vocab_size=GPT2_VOCAB_SIZE,
            where=f"openwebtext {path}",
        )


# --------------------------------------------------------------------------- ImageNet 64


def _npz_array(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of an .npz file, memory-mapped when stored uncompressed (as the
    downsampled ImageNet files are), read into memory otherwise."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ddiff.DataError(f"imagenet64: {path} is not an .npz file ({error})") from None
    with archive:
        try:
            info = archive.getinfo(f"{name}.npy")
        except KeyError:
            raise ddiff.DataError(
                f"imagenet64: {path} has no array {name!r} (it has: "
                f"{', '.join(n.removesuffix('.npy') for n in archive.namelist())})"
            ) from None
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little")
        start += int.from_bytes(header[28:30], "little")
        handle.seek(start)
        try:
            version = np.lib.format.read_magic(handle)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[version]
            shape, fortran, dtype = read_header(handle)
        except (ValueError, KeyError) as error:
            raise ddiff.DataError(
                f"imagenet64: {path}: array {name!r} is unreadable ({error})"
            ) from None
        offset = handle.tell()
    if dtype.hasobject:
        raise ddiff.DataError(f"imagenet64: {path}: array {name!r} holds Python objects")
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _imagenet_file(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    data = _npz_array(path, "data")
    labels = np.asarray(_npz_array(path, "labels"))
    dims = side * side * 3
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != dims:
        raise ddiff.DataError(
            f"imagenet64: {path} has images of shape {data.shape} and dtype {data.dtype}; "
            f"expected (N, {dims}) uint8, {side}x{side} RGB images"
        )
    if (
        labels.shape != (data.shape[0],)
        or labels.min(initial=1) < 1
        or labels.max(initial=1) > 1000
    ):
        raise ddiff.DataError(
            f"imagenet64: {path} should have {data.shape[0]} labels in 1..1000, has "
            f"{labels.shape[0] if labels.ndim == 1 else labels.shape} in "
            f"{labels.min(initial=1)}..{labels.max(initial=1)}"
        )
    return data, labels.astype(np.int32) - 1


@dataclasses.dataclass(frozen=True)
class ImageNet64Source(ddiff.AbstractDataSource):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017) from its standard npz files:
    ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and ``val_data.npz``, each
    with ``data`` (N, 12288) uint8 in channel-planar order and ``labels`` 1..1000. The
    validation set is the eval split. Images are D = 64x64x3 = 12288 tokens of 256 values
    in (height, width, channel) order; the files are memory-mapped.

    Attributes (recipe keys):
        root: directory of the npz files.
        class_conditional: give the class label (0..999) with each image.
    """

    root: str = "data/imagenet64"
    class_conditional: bool = False

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def seq_len(self) -> int:
        return 64 * 64 * 3

    @property
    def num_classes(self) -> int:
        return 1000 if self.class_conditional else 0

    @property
    def metric(self) -> str:
        return "bits_per_dim"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (64, 64, 3)

    def _files(self, name: str) -> list[Path]:
        root = Path(self.root).expanduser().absolute()
        where = (
            f"put the downsampled ImageNet 64x64 npz files (train_data_batch_1.npz .. "
            f"train_data_batch_10.npz, val_data.npz) in {root}, or set data.root"
        )
        if name == "eval":
            path = root / "val_data.npz"
            if not path.is_file():
                raise ddiff.DataError(f"imagenet64: {path} is missing; {where}")
            return [path]
        numbers = sorted(
            int(match.group(1))
            for p in root.glob("train_data_batch_*.npz")
            if (match := re.fullmatch(r"train_data_batch_(\d+)\.npz", p.name))
        )
        if not numbers:
            raise ddiff.DataError(f"imagenet64: {root}/train_data_batch_1.npz is missing; {where}")
        gaps = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        if gaps:
            raise ddiff.DataError(
                f"imagenet64: {root}/train_data_batch_{gaps[0]}.npz is missing; {where}"
            )
        return [root / f"train_data_batch_{n}.npz" for n in numbers]

    @functools.cached_property
    def _opened(self) -> dict[str, ImageRows]:
        return {}

    def split(self, name: str) -> ImageRows:
        if name not in self._opened:
            files = [_imagenet_file(path, 64) for path in self._files(name)]
            labels = np.concatenate([labels for _, labels in files])
            self._opened[name] = _nonempty(
                ImageRows(
                    [data for data, _ in files],
                    labels if self.class_conditional else None,
                    self.image_shape,
                ),
                "imagenet64",
                f"its {name} files hold no images",
            )
        return self._opened[name]


# --------------------------------------------------------------------------- zero-shot


def _wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (spaced punctuation, @-@ joiners)."""
    for spaced, plain in (
        (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
        (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "), (" 's", "'s"),
        ("( ", "("), (" )", ")"), ("[ ", "["), (" ]", "]"), ("{ ", "{"), (" }", "}"),
        (" n't", "n't"), (" 're", "'re"), (" 've", "'ve"), (" 'll", "'ll"), (" 'm", "'m"),
    ):  # fmt: skip
        text = text.replace(spaced, plain)
    text = re.sub(r"= = = (.*?) = = =", r"=== \1 ===", text)
    return re.sub(r"= = (.*?) = =", r"== \1 ==", text)


def _ptb_detokenize(text: str) -> str:
    """Undo the Penn Treebank's tokenization."""
    for spaced, plain in (
        (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n", "\n"), ("\\/", "/"),
        (" , ", ", "), (" . ", ". "), (" ; ", "; "), (" : ", ": "), (" ? ", "? "),
        (" ! ", "! "), ("$ ", "$"), (" %", "%"), ("<unk>", "?"), (" 're", "'re"),
        (" 've", "'ve"), (" 'll", "'ll"), (" 'm", "'m"), (" 'd", "'d"),
    ):  # fmt: skip
        text = text.replace(spaced, plain)
    return text


def _lm1b_detokenize(text: str) -> str:
    """Undo One Billion Words' tokenization."""
    for spaced, plain in (
        (" 's", "'s"), (" n't", "n't"), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
        (" : ", ": "), (" ? ", "? "), (" ! ", "! "), ("( ", "("), (" )", ")"),
    ):  # fmt: skip
        text = text.replace(spaced, plain)
    return re.sub(r" \.$", ".", text)


ZERO_SHOT: dict[str, tuple[str, str | None, str, Callable[[str], str] | None, bool]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", _wikitext_detokenize, True),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "text", _wikitext_detokenize, True),
    "ptb": ("ptb_text_only", None, "sentence", _ptb_detokenize, False),
    "lambada": ("EleutherAI/lambada_openai", "en", "text", None, False),
    "lm1b": ("lm1b", None, "text", _lm1b_detokenize, False),
}
"""name -> (Hugging Face data set, configuration, text field, detokenizer, whether the
whole split is one document)."""


@dataclasses.dataclass(frozen=True)
class ZeroShotSource(ddiff.AbstractDataSource):
    """A zero-shot perplexity set for a GPT-2-vocabulary text model (as in the MD4, SEDD and
    MDLM papers): the test split of WikiText-2, WikiText-103, the Penn Treebank, LAMBADA or
    One Billion Words, read through Hugging Face ``datasets`` (extra ``text``),
    detokenized, tokenized with GPT-2, joined with end-of-text and packed into disjoint
    sequences of ``length``. For evaluation only::

        ddiff eval RUN_DIR 'data={kind: zero_shot, name: wikitext103}' --output eval_wikitext103.json

    Attributes (recipe keys):
        name: which set.
        length: tokens per sequence (the trained model's, 1024 for OpenWebText).
        cache_dir: the ``datasets`` cache to read (null: its default).
    """

    name: Literal["wikitext2", "wikitext103", "ptb", "lambada", "lm1b"] = "wikitext103"
    length: int = 1024
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _positive(self.length, "length")

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB_SIZE

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def metric(self) -> str:
        return "perplexity"

    def decode(self, tokens: np.ndarray) -> str:
        return _gpt2_decode(tokens)

    @functools.cached_property
    def _tokens(self) -> np.ndarray:
        hf_name, config, field, detokenize, whole = ZERO_SHOT[self.name]
        datasets = _optional("datasets", "text", f"the zero-shot set {self.name}")
        try:
            rows = datasets.load_dataset(hf_name, config, split="test", cache_dir=self.cache_dir)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean "not available"
            raise ddiff.DataError(
                f"zero_shot {self.name}: the Hugging Face data set {hf_name} could not be "
                f"loaded ({type(error).__name__}: {error}); make it available to datasets "
                f"(online once, or in data.cache_dir)"
            ) from None
        texts = list(rows[field])
        if whole:
            texts = ["".join(texts)]
        if detokenize is not None:
            texts = [detokenize(text) for text in texts]
        texts = [text for text in texts if text.strip()]
        documents = list(_gpt2_documents([texts]))
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
            vocab_size=GPT2_VOCAB_SIZE,
            where=f"zero_shot {self.name}",
        )
        return _nonempty(
            windows,
            f"zero_shot {self.name}",
            f"its test split has {len(self._tokens)} tokens, fewer than length={self.length}",
        )


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("data", "cifar10", CIFAR10Source)
    registry.register("data", "text8", Text8Source)
    registry.register("data", "openwebtext", OpenWebTextSource)
    registry.register("data", "imagenet64", ImageNet64Source)
    registry.register("data", "text_file", TextFileSource)
    registry.register("data", "token_file", TokenFileSource)
    registry.register("data", "zero_shot", ZeroShotSource)
