"""The built-in data sets, read from small files in their real on-disk formats."""

import dataclasses
import gc
import hashlib
import pickle
import sys
import types
import weakref
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import (
    cifar_batch,
    text8_text,
    write_cifar10,
    write_imagenet64,
    write_text8,
    write_tokens,
)

import ddiff
import ddiff.runner
from ddiff_plugins import datasets
from ddiff_plugins.synthetic import MarkovChainSource

# --------------------------------------------------------------------------- CIFAR-10


def _planar_to_hwc(row: np.ndarray, side: int) -> np.ndarray:
    return row.reshape(3, side, side).transpose(1, 2, 0).reshape(-1)


@pytest.mark.parametrize("extracted", [False, True])
def test_cifar10_reads_the_python_batches_in_hwc_order(tmp_path, extracted):
    write_cifar10(tmp_path, per_batch=3, test=4, extracted=extracted)
    source = datasets.CIFAR10Source(root=str(tmp_path), download=False, class_conditional=True)
    train, test = source.split("train"), source.split("eval")
    assert (len(train), len(test)) == (15, 4)
    assert (source.vocab_size, source.seq_len, source.num_classes) == (256, 3072, 10)
    assert source.metric == "bits_per_dim" and source.image_shape == (32, 32, 3)
    batch_2 = cifar_batch(3, 2)
    item = train[4]  # the second image of data_batch_2
    np.testing.assert_array_equal(item["tokens"], _planar_to_hwc(batch_2[b"data"][1], 32))
    assert item["tokens"].dtype == np.int32 and int(item["label"]) == batch_2[b"labels"][1]
    test_batch = cifar_batch(4, 99)
    np.testing.assert_array_equal(test[3]["tokens"], _planar_to_hwc(test_batch[b"data"][3], 32))


def test_cifar10_unconditional_examples_carry_no_label(tmp_path):
    write_cifar10(tmp_path, per_batch=2, test=2)
    source = datasets.CIFAR10Source(root=str(tmp_path), download=False)
    assert source.num_classes == 0 and set(source.split("train")[0]) == {"tokens"}


def test_cifar10_missing_offline_names_the_file_and_where_to_put_it(tmp_path):
    source = datasets.CIFAR10Source(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(ddiff.DataError) as error:
        source.split("train")
    message = str(error.value)
    assert "cifar-10-python.tar.gz is missing" in message and str(tmp_path / "nowhere") in message
    assert "\n" not in message


def test_cifar10_download_checks_the_checksum_and_writes_atomically(tmp_path, monkeypatch):
    archive = write_cifar10(tmp_path / "mirror", per_batch=2, test=2)
    monkeypatch.setattr(datasets.cifar10, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(datasets.cifar10, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "data"
    source = datasets.CIFAR10Source(root=str(root))
    assert len(source.split("eval")) == 2
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]

    monkeypatch.setattr(datasets.cifar10, "CIFAR10_MD5", "0" * 32)
    other = tmp_path / "other"
    with pytest.raises(ddiff.DataError, match="has MD5 .* expected 0000"):
        datasets.CIFAR10Source(root=str(other)).split("train")
    assert list(other.iterdir()) == []


def test_cifar10_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.cifar10, "CIFAR10_URL", (tmp_path / "absent.tar.gz").as_uri())
    with pytest.raises(ddiff.DataError) as error:
        datasets.CIFAR10Source(root=str(tmp_path / "data")).split("train")
    message = str(error.value)
    assert "downloading it from" in message and "put it at" in message and "\n" not in message
    assert not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()


def test_cifar10_refuses_a_file_that_is_not_a_tarball(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(ddiff.DataError, match="not a gzip-compressed tar archive"):
        datasets.CIFAR10Source(root=str(tmp_path), download=False).split("train")


def test_cifar10_refuses_images_of_the_wrong_shape(tmp_path):
    directory = write_cifar10(tmp_path, per_batch=2, test=2, extracted=True)
    batch = cifar_batch(2, 3)
    batch[b"data"] = batch[b"data"][:, :3000]
    (directory / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ddiff.DataError, match=r"data_batch_3: images have shape \(2, 3000\)"):
        datasets.CIFAR10Source(root=str(tmp_path), download=False).split("train")


def test_cifar10_never_unpickles_arbitrary_objects(tmp_path):
    directory = write_cifar10(tmp_path, per_batch=2, test=2, extracted=True)
    (directory / "test_batch").write_bytes(pickle.dumps({"data": types.SimpleNamespace()}))
    with pytest.raises(ddiff.DataError, match="test_batch: not a CIFAR-10 python pickle"):
        datasets.CIFAR10Source(root=str(tmp_path), download=False).split("eval")


# --------------------------------------------------------------------------- text8


def test_text8_split_is_90_5_5_with_27_symbols(tmp_path):
    write_text8(tmp_path, characters=4000)
    text = text8_text(4000).decode()
    source = datasets.Text8Source(root=str(tmp_path), length=16, train_stride=1)
    assert (source.vocab_size, source.seq_len, source.metric) == (27, 16, "bits_per_char")
    train, validation = source.split("train"), source.split("eval")
    assert len(train) == 3600 - 16 + 1 and len(validation) == 200 // 16
    assert source.decode(train[5]["tokens"]) == text[5:21]
    assert source.decode(validation[1]["tokens"]) == text[3616:3632]
    test = datasets.Text8Source(root=str(tmp_path), length=16, eval_split="test").split("eval")
    assert source.decode(test[0]["tokens"]) == text[3800:3816]
    assert set(np.unique(train[0]["tokens"])) <= set(range(27))
    assert int(source.split("train")[0]["tokens"][text.index(" ")]) == 26


def test_text8_reads_the_extracted_file_too(tmp_path):
    (tmp_path / "text8").write_bytes(text8_text(1000))
    source = datasets.Text8Source(root=str(tmp_path), length=50, train_stride=50)
    assert len(source.split("train")) == 18 and len(source.split("eval")) == 1


def test_text8_errors(tmp_path):
    with pytest.raises(ddiff.DataError, match=r"text8\.zip is missing; download http"):
        datasets.Text8Source(root=str(tmp_path)).split("train")
    (tmp_path / "text8.zip").write_bytes(b"garbage")
    with pytest.raises(ddiff.DataError, match="is not a zip archive"):
        datasets.Text8Source(root=str(tmp_path)).split("train")
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as zipped:
        zipped.writestr("text8", b"hello World")
    with pytest.raises(ddiff.DataError, match=r"byte 87 \('W'\) at offset 6"):
        datasets.Text8Source(root=str(tmp_path)).split("train")
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as zipped:
        zipped.writestr("text8", text8_text(2000))
    with pytest.raises(ddiff.DataError, match="split is empty: its validation part has 100 characters"):
        datasets.Text8Source(root=str(tmp_path), length=256).split("eval")


# --------------------------------------------------------------------------- ImageNet 64


def test_imagenet64_memory_maps_the_npz_files(tmp_path):
    write_imagenet64(tmp_path, files=2, per_file=3, val=2)
    source = datasets.ImageNet64Source(root=str(tmp_path), class_conditional=True)
    train = source.split("train")
    assert (len(train), len(source.split("eval"))) == (6, 2)
    assert all(isinstance(part, np.memmap) for part in train.parts)
    assert (source.seq_len, source.num_classes, source.image_shape) == (12288, 1000, (64, 64, 3))
    second = np.load(tmp_path / "train_data_batch_2.npz")
    np.testing.assert_array_equal(train[4]["tokens"], _planar_to_hwc(second["data"][1], 64))
    assert int(train[4]["label"]) == int(second["labels"][1]) - 1


def test_imagenet64_reads_compressed_files_into_memory(tmp_path):
    arrays = {"data": np.zeros((2, 12288), np.uint8), "labels": np.array([1, 1000])}
    np.savez_compressed(tmp_path / "val_data.npz", **arrays)
    split = datasets.ImageNet64Source(root=str(tmp_path), class_conditional=True).split("eval")
    assert [int(split[i]["label"]) for i in range(2)] == [0, 999]


def test_imagenet64_errors(tmp_path):
    with pytest.raises(ddiff.DataError, match="train_data_batch_1.npz is missing; put the"):
        datasets.ImageNet64Source(root=str(tmp_path)).split("train")
    write_imagenet64(tmp_path, files=3, per_file=1, val=1)
    (tmp_path / "train_data_batch_2.npz").unlink()
    with pytest.raises(ddiff.DataError, match="train_data_batch_2.npz is missing"):
        datasets.ImageNet64Source(root=str(tmp_path)).split("train")
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=np.ones(2))
    with pytest.raises(ddiff.DataError, match=r"val_data.npz has images of shape \(2, 3072\)"):
        datasets.ImageNet64Source(root=str(tmp_path)).split("eval")
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=[0, 5])
    with pytest.raises(ddiff.DataError, match="labels in 1..1000"):
        datasets.ImageNet64Source(root=str(tmp_path)).split("eval")
    (tmp_path / "val_data.npz").write_bytes(b"not an npz")
    with pytest.raises(ddiff.DataError, match="val_data.npz is not an .npz file"):
        datasets.ImageNet64Source(root=str(tmp_path)).split("eval")


# --------------------------------------------------------------------------- token and text files


@pytest.mark.parametrize(("suffix", "dtype"), [(".bin", "uint16"), (".bin", "uint32"), (".npy", "uint32")])
def test_token_file_windows_and_held_out_tail(tmp_path, suffix, dtype):
    path = tmp_path / f"tokens{suffix}"
    tokens = np.random.default_rng(0).integers(0, 70_000 if dtype == "uint32" else 500, 1000)
    if suffix == ".npy":
        np.save(path, tokens.astype(dtype))
    else:
        tokens.astype(dtype).tofile(path)
    source = datasets.TokenFileSource(
        path=str(path), vocabulary=70_000, length=10, dtype=dtype, stride=5, eval_fraction=0.1
    )
    train, held_out = source.split("train"), source.split("eval")
    assert isinstance(source._tokens, np.memmap)
    assert (len(train), len(held_out)) == ((900 - 10) // 5 + 1, 10)
    np.testing.assert_array_equal(train[3]["tokens"], tokens[15:25])
    np.testing.assert_array_equal(held_out[2]["tokens"], tokens[920:930])


def test_token_file_errors_name_the_file(tmp_path):
    path = tmp_path / "tokens.bin"
    write_tokens(path, 100, 50)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ddiff.DataError, match="odd.bin has 3 bytes, not a whole number of uint16"):
        datasets.TokenFileSource(path=str(tmp_path / "odd.bin"), vocabulary=50, length=4).split("train")
    with pytest.raises(ddiff.DataError, match="absent.bin is missing"):
        datasets.TokenFileSource(path=str(tmp_path / "absent.bin"), vocabulary=5).split("train")
    np.save(tmp_path / "floats.npy", np.zeros(10))
    with pytest.raises(ddiff.DataError, match="holds a float64 array"):
        datasets.TokenFileSource(path=str(tmp_path / "floats.npy"), vocabulary=5).split("train")
    source = datasets.TokenFileSource(path=str(path), vocabulary=10, length=4)
    with pytest.raises(ddiff.DataError, match=r"tokens.bin: token id \d+ at position \d+ is outside the vocabulary 0..9"):
        [source.split("train")[i] for i in range(len(source.split("train")))]
    with pytest.raises(ddiff.DataError, match="split is empty: its eval part has 2 tokens"):
        datasets.TokenFileSource(path=str(path), vocabulary=50, length=4).split("eval")


def test_text_file_characters(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "the cat sat on the mat. " * 40
    path.write_text(text)
    source = datasets.TextFileSource(path=str(path), length=12, eval_fraction=0.1)
    assert source.vocab_size == len(set(text)) and source.metric == "bits_per_char"
    assert source.decode(source.split("train")[1]["tokens"]) == text[12:24]
    cut = len(text) - round(len(text) * 0.1)
    assert source.decode(source.split("eval")[0]["tokens"]) == text[cut : cut + 12]
    fixed = datasets.TextFileSource(path=str(path), length=12, alphabet="abcdefghijklmnopqrstuvwxyz .")
    assert fixed.vocab_size == 28 and int(fixed.split("train")[0]["tokens"][0]) == ord("t") - ord("a")
    with pytest.raises(ddiff.DataError, match=r"character '\.' at offset 22, which is not in data.alphabet"):
        datasets.TextFileSource(path=str(path), alphabet="abcdefghijklmnopqrstuvwxyz ").split("train")
    path.write_bytes(b"caf\xe9")
    with pytest.raises(ddiff.DataError, match="is not UTF-8 text"):
        datasets.TextFileSource(path=str(path)).split("train")


# --------------------------------------------------------------------------- OpenWebText, zero-shot


def test_openwebtext_holds_out_two_percent_of_the_sequences(tmp_path):
    tokens = write_tokens(tmp_path / "openwebtext_gpt2.bin", 8 * 200 + 5, 50257)
    source = datasets.OpenWebTextSource(root=str(tmp_path), length=8)
    assert (source.vocab_size, source.metric) == (50257, "perplexity")
    assert (len(source.split("train")), len(source.split("eval"))) == (196, 4)
    np.testing.assert_array_equal(source.split("eval")[0]["tokens"], tokens[196 * 8 : 197 * 8])


def test_openwebtext_without_token_file_or_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ddiff.DdiffError, match=r"needs the Python package 'datasets': pip install 'ddiff\[text\]'"):
        datasets.OpenWebTextSource(root=str(tmp_path)).split("train")


class _FakeEncoding:
    """Bytes as tokens: enough to check detokenizing, joining and packing."""

    def encode_ordinary_batch(self, texts):
        return [list(text.encode()) for text in texts]

    def decode(self, ids):
        return bytes(ids).decode()


class _Corpus:
    def __len__(self):
        return 3

    def iter(self, batch_size):
        yield {"text": ["ab", "c", "de"]}


def test_openwebtext_is_tokenized_once_from_the_datasets_cache(tmp_path, monkeypatch):
    loaded = []

    def load_dataset(name, split):
        loaded.append(name)
        return _Corpus()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(datasets.gpt2, "encoding", lambda: _FakeEncoding())
    assert len(datasets.OpenWebTextSource(root=str(tmp_path), length=2).split("train")) == 3
    eos = datasets.gpt2.EOS
    stored = np.fromfile(tmp_path / datasets.openwebtext.OPENWEBTEXT_TOKENS, np.uint16)
    assert stored.tolist() == [97, 98, eos, 99, eos, 100, 101, eos]
    assert len(datasets.OpenWebTextSource(root=str(tmp_path), length=2).split("eval")) == 1
    assert loaded == [datasets.openwebtext.OPENWEBTEXT_HF]
    assert [p.name for p in tmp_path.iterdir()] == [datasets.openwebtext.OPENWEBTEXT_TOKENS]


def test_openwebtext_unavailable_names_the_token_file(tmp_path, monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ddiff.DataError, match=r"openwebtext_gpt2.bin is missing and .* \(ConnectionError: offline\)"):
        datasets.OpenWebTextSource(root=str(tmp_path)).split("train")


def test_zero_shot_sets_detokenize_join_and_pack(monkeypatch):
    rows = {"text": [" = Title = \n", " a @-@ b , c . \n", ""]}
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split, cache_dir: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(datasets.gpt2, "encoding", lambda: _FakeEncoding())
    source = datasets.ZeroShotSource(name="wikitext2", length=4)
    stream = source._tokens
    assert bytes(stream[:-1].tolist()).decode() == " = Title = \n a-b, c. \n"
    assert int(stream[-1]) == datasets.gpt2.EOS
    assert len(source.split("eval")) == len(stream) // 4
    with pytest.raises(ddiff.DataError, match="for evaluation only"):
        source.split("train")


def test_zero_shot_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ddiff.DdiffError, match=r"pip install 'ddiff\[text\]'"):
        datasets.ZeroShotSource(name="ptb").split("eval")


# --------------------------------------------------------------------------- the grain pipeline


def test_pipeline_over_a_memory_mapped_file_resumes_exactly_and_shards(tmp_path):
    write_tokens(tmp_path / "tokens.bin", 4000, 100)
    source = datasets.TokenFileSource(path=str(tmp_path / "tokens.bin"), vocabulary=100, length=8)
    iterator = ddiff.runner.train_batches(source, batch_size=4, seed=3)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["tokens"] for _ in range(3)]
    resumed = ddiff.runner.train_batches(source, batch_size=4, seed=3)
    resumed.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], batch)
    shards = [
        {tuple(row) for _ in range(30) for row in next(it)["tokens"]}
        for it in (
            ddiff.runner.train_batches(source, batch_size=4, seed=3, process_index=i, process_count=2)
            for i in range(2)
        )
    ]
    assert shards[0] and shards[1] and not shards[0] & shards[1]


def test_bad_token_inside_the_pipeline_reaches_the_user_unchanged(tmp_path):
    tokens = np.zeros(64, np.uint16)
    tokens[40] = 999
    tokens.tofile(tmp_path / "tokens.bin")
    source = datasets.TokenFileSource(path=str(tmp_path / "tokens.bin"), vocabulary=10, length=8, eval_fraction=0.1)
    iterator = ddiff.runner.train_batches(source, batch_size=7, seed=0)
    with pytest.raises(ddiff.DataError, match="token id 999 at position 40"):
        next(iterator)


# --------------------------------------------------------------------------- sources as Equinox modules


def test_every_data_source_is_a_final_module_of_static_recipe_keys(registry):
    sources = [entry for entry in registry if entry.slot == "data"]
    assert {"markov", "toy", "cifar10", "text8", "token_file"} <= {entry.name for entry in sources}
    for entry in sources:
        assert issubclass(entry.cls, eqx.Module) and not entry.cls.__subclasses__(), entry.name
        loose = [f.name for f in dataclasses.fields(entry.cls) if not f.metadata.get("static")]
        assert not loose, f"{entry.name}: fields {loose} are not static"


def test_loaded_data_stays_out_of_the_pytree(tmp_path):
    write_tokens(tmp_path / "tokens.bin", 400, 50)
    source = datasets.TokenFileSource(path=str(tmp_path / "tokens.bin"), vocabulary=50, length=8)
    markov = MarkovChainSource(num_symbols=4, length=8, concentration=0.1, num_train=16, num_eval=8)
    assert len(source.split("train")) and source._tokens is source._tokens
    assert markov.split("train") is markov.split("train")
    for loaded in (source, markov):
        assert jax.tree_util.tree_leaves(loaded) == []
        assert jax.jit(lambda s, x: x * s.seq_len)(loaded, jnp.ones(())) == 8
    twin = datasets.TokenFileSource(path=str(tmp_path / "tokens.bin"), vocabulary=50, length=8)
    assert twin == source and hash(twin) == hash(source)
    copy = jax.tree_util.tree_map(lambda leaf: leaf, source)
    assert copy == source and copy is not source and copy._tokens is not source._tokens


def test_cached_load_runs_once_per_source_and_is_dropped_with_it():
    calls = []

    class Counted(ddiff.AbstractDataSource):
        length: int = eqx.field(static=True, default=3)

        @property
        def vocab_size(self):
            return 2

        @property
        def seq_len(self):
            return self.length

        @ddiff.cached_load
        def tokens(self):
            calls.append(self.length)
            return np.zeros((4, self.length), np.int32)

        def split(self, name):
            return ddiff.ArraySplit(self.tokens)

    source = Counted()
    assert source.tokens is source.tokens and calls == [3]
    held = weakref.ref(source)
    del source
    gc.collect()
    assert held() is None
    assert Counted().tokens.shape == (4, 3) and calls == [3, 3]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kind": "text8", "length": 0}, "data.length: length must be >= 1, got 0"),
        ({"kind": "text8", "train_stride": 0}, "data.train_stride: train_stride must be >= 1"),
        ({"kind": "openwebtext", "length": 0}, "data.length: length must be >= 1"),
        ({"kind": "zero_shot", "length": 0}, "data.length: length must be >= 1"),
        ({"kind": "token_file", "path": "t.bin", "vocabulary": 0}, "data.vocabulary: vocabulary must be >= 1"),
        ({"kind": "token_file", "path": "t.bin", "vocabulary": 9, "stride": 0}, "data.stride: stride must be >= 1"),
        ({"kind": "text_file", "path": "t.txt", "eval_fraction": 1.0}, r"data.eval_fraction: eval_fraction must be in \(0, 1\)"),
        ({"kind": "text_file", "path": "t.txt", "alphabet": "aba"}, "data.alphabet: alphabet repeats a character"),
        ({"kind": "text_file", "path": "t.txt", "alphabet": ""}, "data.alphabet: alphabet is empty"),
        ({"kind": "markov", "num_symbols": 1}, "data.num_symbols: num_symbols must be >= 2, got 1"),
        ({"kind": "markov", "num_eval": 0}, "data.num_eval: num_eval must be >= 1"),
        ({"kind": "markov", "concentration": 0.0}, "data.concentration: concentration must be positive"),
        ({"kind": "markov", "concentration": 5.0}, "data.concentration: with concentration=5.0 .* lower concentration"),
        ({"kind": "toy", "length": 9}, r"data.length: V\^D = 19683 sequences is more than 4096"),
        ({"kind": "toy", "toy": "classes", "classes": 0}, "data.classes: classes must be >= 1"),
    ],
)
def test_recipe_keys_are_refused_as_recipe_errors_at_their_path(section, message):
    with pytest.raises(ddiff.RecipeError, match=message):
        ddiff.build_component("data", section)
