"""RS-KD's sampled teacher (cache_teacher.py --sampling S, kd/teacher_cache.py): the stored form by hand,
unbiasedness measured against top-K's bias, a build that is reproducible and trains, and the refusals
(--sampling with --top-k, a cache built one way and read as the other, a loss not linear in p).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import cache_teacher
import train_kd
from kd.losses import compute_loss
from kd.teacher_cache import MANIFEST, compress_rows, dense_log_probs, sample_rows, shard_name
from run_helpers import weights, write_subset


@pytest.fixture(scope="module")
def train_file(demo_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampled_files")
    shutil.copy(demo_data / "stats.json", folder / "stats.json")
    return Path(write_subset(demo_data / "train.jsonl", folder / "train.jsonl", 4))  # 16 examples


def build(tiny_models, train_file, out, *extra):
    return cache_teacher.main(["--teacher", tiny_models["teacher"], "--train-file", str(train_file), "--out", str(out),
                               "--examples-per-shard", "8", "--batch-size", "3", *map(str, extra)])


@pytest.fixture(scope="module")
def sampled_cache(tiny_models, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled") / "s6"
    build(tiny_models, train_file, out, "--sampling", 6)
    return out


def train(tiny_models, train_file, out, method, cache, *extra):
    return train_kd.main(["--method", method, "--student", tiny_models["student"], "--train-file", str(train_file),
                          "--output-dir", str(out), "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
                          "--lr", "1e-3", "--seed", "3", "--teacher-cache", str(cache), *map(str, extra)])


# ---------------------------------------------------------------------------------------------
# the stored form, by hand, and its expectation
# ---------------------------------------------------------------------------------------------

def test_sampled_rows_by_hand():
    # draws [0, 0, 1, 2] of S = 4: p̂ = [2/4, 1/4, 1/4, 0]
    dense = dense_log_probs(None, torch.tensor([[0, 0, 1, 2]]), None, 4).exp()
    assert dense.tolist() == [[0.5, 0.25, 0.25, 0.0]]
    log_p = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).log()
    rows = sample_rows(log_p, 16, torch.Generator().manual_seed(0))
    ids = rows["token_ids"][0]
    assert set(rows) == {"token_ids"} and ids.tolist() == sorted(ids.tolist()) and set(ids.tolist()) <= {0, 1}
    again = sample_rows(log_p, 16, torch.Generator().manual_seed(0))["token_ids"]
    assert torch.equal(again, rows["token_ids"])  # the seed decides the draws


def test_sampled_rows_are_unbiased_where_top_k_is_not():
    """Over 4000 positions of one teacher distribution: the mean of p̂ is p within 5 binomial standard
    errors, and so is forward KD's gradient (linear in p); top-K with the same bytes keeps a bias many
    times larger than that (its spread tail is not the teacher's tail)."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], dtype=torch.float64)
    positions, draws = 4000, 6
    log_p = p.log().float().expand(positions, -1).contiguous()
    ids = sample_rows(log_p, draws, torch.Generator().manual_seed(1))["token_ids"]
    sampled = dense_log_probs(None, ids, None, p.numel()).double()
    standard_error = (p * (1 - p) / (positions * draws)).sqrt()
    assert ((sampled.exp().mean(0) - p).abs() < 5 * standard_error).all()
    top = compress_rows(log_p, 2)
    truncated = dense_log_probs(top["log_probs"], top["token_ids"], top["log_rest"], p.numel()).double()
    assert (truncated.exp().mean(0) - p).abs().max() > 20 * standard_error.max()

    student = torch.zeros(positions, p.numel(), dtype=torch.float64)
    labels = torch.zeros(positions, dtype=torch.long)

    def gradient(teacher):
        leaf = student.clone().requires_grad_(True)
        compute_loss("forward", leaf, teacher, labels, kd_ratio=1.0, reduction="sum")[0].backward()
        return leaf.grad.mean(0)  # q − p̂ per position, averaged

    live = gradient(p.log().expand(positions, -1))
    assert ((gradient(sampled) - live).abs() < 5 * standard_error).all()
    assert (gradient(truncated) - live).abs().max() > 20 * standard_error.max()


# ---------------------------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------------------------

def test_a_sampled_build_is_reproducible_records_its_kind_and_trains(tiny_models, train_file, sampled_cache, tmp_path):
    from safetensors.numpy import load_file

    manifest = json.loads((sampled_cache / MANIFEST).read_text())
    assert (manifest["sampling"], manifest["sampling_seed"], manifest["top_k"], manifest["dtype"]) == (6, 0, None, None)
    arrays = load_file(str(sampled_cache / shard_name(0)))
    assert set(arrays) == {"token_offsets", "token_ids"} and arrays["token_ids"].shape[1] == 6
    assert manifest["bytes_per_position"] < 6 * 2 + 4  # 2 bytes a draw (vocabulary 600), plus offsets
    again = build(tiny_models, train_file, tmp_path / "again", "--sampling", 6)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    other_seed = build(tiny_models, train_file, tmp_path / "seed1", "--sampling", 6, "--sampling-seed", 1)
    assert [s["sha256"] for s in other_seed["shards"]] != [s["sha256"] for s in manifest["shards"]]

    result = train(tiny_models, train_file, tmp_path / "run", "forward", sampled_cache)
    start, end = weights(tiny_models["student"]), weights(tmp_path / "run" / "final")
    assert result["steps"] == 2 and max(float((start[k] - end[k]).abs().max()) for k in start) > 1e-4


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (("--sampling", 6, "--top-k", 4), "--top-k/--sampling: --sampling with --top-k"),
    ((), "--top-k/--sampling: neither was given"),
    (("--sampling", 0), "--sampling 0: must be at least 1 draw"),
])
def test_bad_sampling_arguments_exit_2_in_words(extra, message, tiny_models, train_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        build(tiny_models, train_file, tmp_path / "c", *extra)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_cache_built_one_way_is_not_continued_or_read_the_other(tiny_models, train_file, sampled_cache, tmp_path,
                                                                  capsys):
    # resuming the build with --top-k into the sampled cache's folder: the build record's words
    with pytest.raises(SystemExit) as stop:
        build(tiny_models, train_file, sampled_cache, "--top-k", 4)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "top_k (None -> 4)" in err and "sampling (6 -> None)" in err
    # a manifest edited to read the sampled shards as top-K rows: the shapes against the manifest's words
    edited = tmp_path / "edited"
    shutil.copytree(sampled_cache, edited)
    manifest = json.loads((edited / MANIFEST).read_text())
    manifest.update(sampling=None, top_k=6, dtype="fp16")
    (edited / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"shard-00000\.safetensors: holds arrays of shapes .* the manifest \(top_k 6, "
                                         r"sampling None, vocab 600\) says"):
        train(tiny_models, train_file, tmp_path / "run", "forward", edited)


@pytest.mark.parametrize("method", ["reverse", "selfevo", "taid"])
def test_a_loss_not_linear_in_p_refuses_sampled_rows_before_training(method, tiny_models, train_file, sampled_cache,
                                                                     tmp_path):
    with pytest.raises(SystemExit, match=r"--method .*: the cache holds 6 sampled tokens per position \(its manifest: "
                                         r"sampling 6\): unbiased only for the losses linear in p \(forward, noevo\)"):
        train(tiny_models, train_file, tmp_path / "run", method, sampled_cache)
    assert not (tmp_path / "run").exists()


def test_noevo_trains_from_sampled_rows(tiny_models, train_file, sampled_cache, tmp_path):
    result = train(tiny_models, train_file, tmp_path / "run", "noevo", sampled_cache)
    assert result["steps"] == 2 and result["hyperparameters"]["teacher_cache"] == str(sampled_cache)
