"""fsmoe.data: the stdlib default corpus, --data paths and their errors, batch sampling."""
import math
import os
import sysconfig

import pytest
import torch

from fsmoe.config import ConfigError
from fsmoe.data import (BatchSampler, Corpus, DataError, check_vocab, eval_batches, load_corpus, nats_to_bits,
                        stdlib_files, text_files, unigram_entropy_nats)


def test_stdlib_files_sorted_and_stdlib_only():
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and rel == sorted(rel)
    assert all(r.endswith(".py") and "site-packages" not in r for r in rel)


def test_default_corpus_is_deterministic_and_split_by_tail():
    a = load_corpus(None, limit_mb=0.05, val_fraction=0.1, min_tokens=33)
    b = load_corpus(None, limit_mb=0.05, val_fraction=0.1, min_tokens=33)
    assert torch.equal(a.train_N, b.train_N) and torch.equal(a.val_N, b.val_N)
    total = int(0.05 * 2**20)
    assert len(a.train_N) + len(a.val_N) == total and len(a.val_N) == int(total * 0.1)
    head = stdlib_files()[0].read_bytes()[:100]
    assert bytes(a.train_N[: len(head)].tolist()) == head
    assert 2.0 < a.unigram_val_loss_nats() < math.log(256)


def test_data_paths_recurse_sorted_and_skip_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zzz")
    (tmp_path / "a.txt").write_text("aaa")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    single = tmp_path / "one.md"
    single.write_text("one")
    files = text_files([str(tmp_path / "b"), str(single), str(tmp_path)])
    names = [f.relative_to(tmp_path).as_posix() for f in files]
    assert names == ["b/z.txt", "one.md", "a.txt", "b/z.txt", "one.md"]


def _bad_path(tmp_path, kind):
    """A data path of the given kind: missing, empty dir, empty file, dir of binary files."""
    path = tmp_path / kind
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "empty_file":
        path.write_text("")
    elif kind == "binary_dir":
        path.mkdir()
        (path / "x").write_bytes(b"\0" * 10)
    elif kind == "binary_file":  # named explicitly: an error, not silently trained on
        path.write_bytes(b"text" * 100 + b"\0" + b"more" * 100)
    return path


@pytest.mark.parametrize("kind, expect", [("missing", "does not exist"), ("empty_dir", "no non-empty text files"),
                                          ("empty_file", "file is empty"), ("binary_dir", "no non-empty text"),
                                          ("binary_file", "is a binary file")])
def test_bad_data_paths_name_the_path(tmp_path, kind, expect):
    path = _bad_path(tmp_path, kind)
    with pytest.raises(DataError) as e:
        load_corpus([str(path)], limit_mb=1, val_fraction=0.1, min_tokens=33)
    assert e.value.field_name == "train.data" and str(path) in str(e.value) and expect in str(e.value)


def test_too_little_data_says_how_much_is_needed(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 100)
    with pytest.raises(DataError, match="needs at least seq_len"):
        load_corpus([str(tmp_path)], limit_mb=1, val_fraction=0.1, min_tokens=33)


def test_paths_are_a_list_so_any_character_works(tmp_path):
    odd = tmp_path / f"notes{os.pathsep}v2 [x]=1,'\".txt"
    odd.write_text("hello world\n" * 20)
    corpus = load_corpus([str(odd)], limit_mb=1, val_fraction=0.1, min_tokens=9)
    assert corpus.num_files == 1 and str(odd) in corpus.source


def test_unigram_baseline_is_train_frequencies_scored_on_the_val_split():
    """What "byte frequencies alone" give on the val split, which the val loss is compared with:
    not the train split's own entropy (lower when the splits differ)."""
    train_N = torch.tensor([0] * 90 + [1] * 10, dtype=torch.uint8)
    val_N = torch.tensor([0] * 50 + [1] * 50, dtype=torch.uint8)
    corpus = Corpus(train_N, val_N, "t", 1)
    p0, p1 = 91 / 356, 11 / 356  # add-one smoothed over 256 byte values
    assert corpus.unigram_val_loss_nats() == pytest.approx(-(math.log(p0) + math.log(p1)) / 2)
    assert corpus.unigram_val_loss_nats() > unigram_entropy_nats(train_N) + 1.0


def test_vocab_must_hold_every_byte_of_the_data():
    corpus = Corpus(torch.tensor([65, 200], dtype=torch.uint8), torch.tensor([66], dtype=torch.uint8), "utf8", 1)
    check_vocab(corpus, 201)
    with pytest.raises(ConfigError) as e:
        check_vocab(corpus, 128)
    assert e.value.field_name == "model.vocab_size" and ">= 201" in str(e.value)


def test_unigram_entropy_in_nats():
    assert unigram_entropy_nats(torch.tensor([0, 1, 0, 1])) == pytest.approx(math.log(2))
    assert unigram_entropy_nats(torch.tensor([7, 7, 7])) == 0.0
    assert nats_to_bits(math.log(2)) == pytest.approx(1.0)


def test_sampler_is_seeded_shifted_and_resumable():
    tokens_N = torch.arange(1000) % 251
    a, b = BatchSampler(tokens_N, 4, 16, seed=3), BatchSampler(tokens_N, 4, 16, seed=3)
    x_BL, y_BL = a.next()
    assert x_BL.shape == (4, 16) and x_BL.dtype == torch.int64
    assert torch.equal(x_BL[:, 1:], y_BL[:, :-1])
    assert torch.equal(x_BL, b.next()[0])
    state = a.state_dict()
    expected = [a.next()[0] for _ in range(3)]
    c = BatchSampler(tokens_N, 4, 16, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(e, c.next()[0]) for e in expected)


def test_sampler_dp_shards_are_slices_of_the_global_batch():
    tokens_N = torch.arange(500) % 256
    full_x, _ = BatchSampler(tokens_N, 4, 8, seed=0).next()
    shards = [BatchSampler(tokens_N, 4, 8, seed=0, dp_rank=r, dp_size=2).next()[0] for r in range(2)]
    assert torch.equal(torch.cat(shards), full_x)
    with pytest.raises(Exception, match="train.batch_size"):
        BatchSampler(tokens_N, 3, 8, seed=0, dp_rank=0, dp_size=2)


def test_eval_batches_are_fixed_and_in_range():
    tokens_N = torch.arange(300) % 256
    a, b = eval_batches(tokens_N, 2, 16, 3), eval_batches(tokens_N, 2, 16, 3)
    assert len(a) == 3 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert a[-1][1][-1, -1].item() == tokens_N[-1].item()  # the last window ends at the last token
