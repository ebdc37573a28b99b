"""The stored teacher (cache_teacher.py, kd/teacher_cache.py, train_kd.py --teacher-cache).

Exactness: with the full distribution in float32, every KD method trains to the live teacher's
weights. The truncated form is checked by hand on a small distribution. A cache for other data or
another --max-length is refused naming what differs; a damaged shard is named; a killed build
resumes keeping its finished shards.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import cache_teacher
import train_kd
from kd.losses import KD_METHODS, compute_loss
from kd.teacher_cache import MANIFEST, compress_rows, dense_log_probs, shard_name
from run_helpers import weights, write_subset


@pytest.fixture(scope="module")
def train_file(demo_data, tmp_path_factory):
    """80 training examples (20 per direction of the demo): 10 shards of 8."""
    folder = tmp_path_factory.mktemp("cache_files")
    shutil.copy(demo_data / "stats.json", folder / "stats.json")  # the template travels with the data
    return Path(write_subset(demo_data / "train.jsonl", folder / "train.jsonl", 20))


def build(tiny_models, train_file, out, *extra, top_k="all"):
    return cache_teacher.main(["--teacher", tiny_models["teacher"], "--train-file", str(train_file), "--out", str(out),
                               "--top-k", str(top_k), "--examples-per-shard", "8", "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def full_cache(tiny_models, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "full"
    build(tiny_models, train_file, out, "--dtype", "fp32")
    return out


def train(tiny_models, train_file, out, method, teacher_args, *extra):
    return train_kd.main(["--method", method, "--student", tiny_models["student"], "--train-file", str(train_file),
                          "--output-dir", str(out), "--batch-size", "8", "--micro-batch-size", "4",
                          "--max-steps", "3", "--lr", "1e-3", "--seed", "3", *teacher_args, *map(str, extra)])


# ---------------------------------------------------------------------------------------------
# the stored form and its reconstruction
# ---------------------------------------------------------------------------------------------

def test_truncated_rows_keep_the_top_k_and_spread_the_rest_evenly():
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64)
    stored = compress_rows(p.log().float(), 2)
    assert stored["token_ids"].tolist() == [[0, 1]]
    assert torch.allclose(stored["log_rest"].double().exp(), torch.tensor([0.3], dtype=torch.float64))
    dense = dense_log_probs(stored["log_probs"], stored["token_ids"], stored["log_rest"], 5).double().exp()
    # by hand: 0.5, 0.2 kept; the rest 0.3 spread over the other 3 tokens: 0.1 each
    assert torch.allclose(dense, torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]], dtype=torch.float64), atol=1e-6)
    full = compress_rows(p.log().float(), None)
    assert set(full) == {"log_probs"} and torch.equal(dense_log_probs(full["log_probs"], None, None, 5),
                                                      p.log().float())


def test_stored_distribution_as_teacher_logits_gives_the_live_loss():
    """log-probabilities in the place of logits: the losses' log-softmax leaves them as they are."""
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (6,))
    stored = compress_rows(torch.log_softmax(teacher, -1), None)["log_probs"]
    for method in KD_METHODS:
        live, _ = compute_loss(method, student, teacher, labels, gamma=0.1)
        cached, _ = compute_loss(method, student, stored, labels, gamma=0.1)
        assert abs(float(live) - float(cached)) < 1e-12, method


# ---------------------------------------------------------------------------------------------
# exactness: full distribution in fp32 = the live teacher, every KD method
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", KD_METHODS)
def test_full_cache_trains_the_live_teachers_weights(method, tiny_models, train_file, full_cache, tmp_path):
    extra = ("--gamma", "0.1") if method.startswith("selfevo") else ()
    train(tiny_models, train_file, tmp_path / "live", method, ["--teacher", tiny_models["teacher"]], *extra)
    result = train(tiny_models, train_file, tmp_path / "cache", method, ["--teacher-cache", str(full_cache)], *extra)
    live, cached = weights(tmp_path / "live" / "final"), weights(tmp_path / "cache" / "final")
    assert max(float((live[name] - cached[name]).abs().max()) for name in live) <= 1e-6
    start = weights(tiny_models["student"])
    assert max(float((start[name] - cached[name]).abs().max()) for name in start) > 1e-4  # it trained
    config = json.loads((tmp_path / "cache" / "config.json").read_text())
    assert config["teacher_loss_path"] == "cache" and result["hyperparameters"]["teacher_cache"] == str(full_cache)


def test_manifest_records_what_the_cache_is_valid_for(full_cache, tiny_models, train_file):
    manifest = json.loads((full_cache / MANIFEST).read_text())
    assert manifest["teacher"] == tiny_models["teacher"] and len(manifest["teacher_sha256"]) == 64
    assert manifest["template"] == "alpaca" and manifest["max_length"] == 512 and manifest["examples"] == 80
    assert manifest["top_k"] is None and manifest["dtype"] == "fp32" and manifest["vocab_size"] == 600
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(10)]
    assert manifest["positions"] == sum(s["positions"] for s in manifest["shards"]) > 0


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

def test_cache_of_other_data_or_max_length_is_refused_naming_it(tiny_models, train_file, full_cache, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(train_file.read_text().splitlines(keepends=True)[:-1]))  # one row less
    with pytest.raises(SystemExit) as error:
        train(tiny_models, other, tmp_path / "a", "forward", ["--teacher-cache", str(full_cache)])
    assert "data_sha256" in str(error.value) and "examples (cache 80, this run 79)" in str(error.value)
    with pytest.raises(SystemExit) as error:
        train(tiny_models, train_file, tmp_path / "b", "forward", ["--teacher-cache", str(full_cache)],
              "--max-length", "100")
    assert "max_length (cache 512, this run 100)" in str(error.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cache_of_another_template_or_tokenizer_is_refused(full_cache, tiny_models, train_file, tmp_path):
    from kd.models import load_tokenizer
    from kd.teacher_cache import TeacherCache, run_fingerprint

    tokenizer = load_tokenizer(tiny_models["student"])
    run = run_fingerprint(train_file, tokenizer, 512, 80)
    TeacherCache(full_cache, run)  # the matching run opens it
    with pytest.raises(SystemExit) as error:
        TeacherCache(full_cache, {**run, "template": "alma"})
    assert "template (cache 'alpaca', this run 'alma')" in str(error.value)
    tokenizer.add_tokens(["<extra-token>"])
    with pytest.raises(SystemExit) as error:
        TeacherCache(full_cache, run_fingerprint(train_file, tokenizer, 512, 80))
    assert "tokenizer_sha256" in str(error.value)


def test_missing_or_corrupt_shard_is_named(tiny_models, train_file, full_cache, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(full_cache, damaged)
    data = bytearray((damaged / shard_name(1)).read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the stored log-probabilities
    (damaged / shard_name(1)).write_bytes(bytes(data))
    with pytest.raises(SystemExit) as error:  # 10 steps of 8 touch every example
        train(tiny_models, train_file, tmp_path / "a", "forward", ["--teacher-cache", str(damaged)], "--max-steps", 10)
    assert f"shard {shard_name(1)}: does not match its sha256" in str(error.value)
    (damaged / shard_name(3)).unlink()
    with pytest.raises(SystemExit) as error:
        train(tiny_models, train_file, tmp_path / "b", "forward", ["--teacher-cache", str(damaged)])
    assert f"shard {shard_name(3)}: is missing" in str(error.value)
    (damaged / MANIFEST).unlink()
    with pytest.raises(SystemExit) as error:
        train(tiny_models, train_file, tmp_path / "c", "forward", ["--teacher-cache", str(damaged)])
    assert "not a complete teacher cache" in str(error.value)


# ---------------------------------------------------------------------------------------------
# resume of an interrupted build
# ---------------------------------------------------------------------------------------------

def test_interrupted_build_resumes_keeping_finished_shards(tiny_models, train_file, tmp_path):
    out = tmp_path / "k8"
    build(tiny_models, train_file, out, "--dtype", "fp16", top_k=8)
    complete = {path.name: path.read_bytes() for path in out.iterdir()}
    # A kill during shard 2: no manifest, shard 2 absent, its temporary half-written, shard 4 never begun.
    (out / MANIFEST).unlink()
    (out / shard_name(2)).unlink()
    (out / shard_name(4)).unlink()
    (out / f".{shard_name(2)}.x1y2.tmp").write_bytes(complete[shard_name(2)][:100])
    kept_times = {i: (out / shard_name(i)).stat().st_mtime_ns for i in (0, 1, 3, 5, 9)}
    build(tiny_models, train_file, out, "--dtype", "fp16", top_k=8)
    assert {i: (out / shard_name(i)).stat().st_mtime_ns for i in (0, 1, 3, 5, 9)} == kept_times  # not redone
    assert not list(out.glob(".*.tmp"))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == complete
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["top_k"] == 8 and manifest["dtype"] == "fp16"
    with pytest.raises(SystemExit) as error:  # a resume with other settings is refused, naming them
        build(tiny_models, train_file, out, "--dtype", "fp16", top_k=16)
    assert "top_k (8 -> 16)" in str(error.value)


def test_truncated_cache_trains_close_to_the_live_teacher(tiny_models, train_file, tmp_path):
    """K = 64 of 600 in bf16: a different, finite, nearby loss (the measured sizes are in bench/)."""
    out = tmp_path / "k64"
    build(tiny_models, train_file, out, "--dtype", "bf16", top_k=64)
    live = train(tiny_models, train_file, tmp_path / "live", "selfevo", ["--teacher", tiny_models["teacher"]])
    cached = train(tiny_models, train_file, tmp_path / "cache", "selfevo", ["--teacher-cache", str(out)])
    live_rows = [json.loads(x) for x in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    cached_rows = [json.loads(x) for x in (tmp_path / "cache" / "metrics.jsonl").read_text().splitlines()]
    assert live_rows[0]["loss"] != cached_rows[0]["loss"]
    assert math.isclose(live_rows[0]["loss"], cached_rows[0]["loss"], rel_tol=0.05)
    assert live["steps"] == cached["steps"] == 3


@pytest.mark.slow
def test_two_processes_build_the_same_cache(tiny_models, train_file, tmp_path):
    """`accelerate launch` with 2 CPU processes: each writes its own shards (0, 2, 4, ... and 1, 3, ...);
    the cache is byte for byte the one-process cache."""
    import os
    import subprocess
    import sys

    repo = Path(cache_teacher.__file__).resolve().parent
    single, double = tmp_path / "single", tmp_path / "double"
    build(tiny_models, train_file, single, top_k=8)
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo / "accelerate_configs" / "cpu.yaml"),
         "--num_processes", "2", "--num_cpu_threads_per_process", "1", str(repo / "cache_teacher.py"),
         "--teacher", tiny_models["teacher"], "--train-file", str(train_file), "--out", str(double), "--top-k", "8",
         "--examples-per-shard", "8", "--batch-size", "3"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "process 1 builds 5 of its 5" in result.stdout + result.stderr
    for i in range(10):
        assert (double / shard_name(i)).read_bytes() == (single / shard_name(i)).read_bytes(), shard_name(i)
    assert json.loads((double / MANIFEST).read_text())["shards"] == json.loads((single / MANIFEST).read_text())["shards"]


def test_on_policy_with_a_cache_is_refused(tiny_models, train_file, full_cache, tmp_path):
    with pytest.raises(SystemExit) as error:
        train(tiny_models, train_file, tmp_path / "a", "forward", ["--teacher-cache", str(full_cache)],
              "--on-policy-ratio", 0.5)
    assert "the student's own samples are not in the cache" in str(error.value)


# ---------------------------------------------------------------------------------------------
# every shard checked before training starts; configuration errors exit 2 and leave nothing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["top_k", "positions", "flipped_bytes", "no_folder", "other_data"])
def test_a_damaged_or_edited_cache_stops_before_anything_is_written(case, tiny_models, train_file, full_cache,
                                                                    tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(full_cache, cache)
    manifest = json.loads((cache / MANIFEST).read_text())
    data = train_file
    if case == "top_k":
        manifest["top_k"] = 16
        message = f"shard {shard_name(0)}: holds arrays of shapes"
    elif case == "positions":
        manifest["shards"][2]["positions"] += 1
        manifest["positions"] += 1
        message = f"shard {shard_name(2)}: holds arrays of shapes"
    elif case == "flipped_bytes":
        raw = bytearray((cache / shard_name(7)).read_bytes())
        raw[-9] ^= 0x55
        (cache / shard_name(7)).write_bytes(bytes(raw))
        message = f"shard {shard_name(7)}: does not match its sha256 in the manifest (the cache is damaged or was edited)"
    elif case == "no_folder":
        shutil.rmtree(cache)
        message = f"--teacher-cache {cache}: does not exist; build it with cache_teacher.py"
    else:
        data = tmp_path / "other.jsonl"
        data.write_text("".join(train_file.read_text().splitlines(keepends=True)[1:]))
        message = "was built for other training data than this run"
    if cache.is_dir():
        (cache / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train(tiny_models, data, out, "forward", ["--teacher-cache", str(cache)])
    assert stop.value.code == 2 and message in str(stop.value), str(stop.value)
    assert not out.exists()  # not even config.json


def test_cache_teacher_settings_that_differ_from_the_existing_cache_exit_2(tiny_models, train_file, full_cache):
    with pytest.raises(SystemExit) as stop:
        build(tiny_models, train_file, full_cache, "--dtype", "fp16")
    assert stop.value.code == 2 and "dtype ('fp32' -> 'fp16')" in str(stop.value)
    assert json.loads((full_cache / MANIFEST).read_text())["batch_size"] == 3  # recorded (decides the padding)


def test_top_k_above_the_vocabulary_stores_the_full_distribution_and_says_so(tiny_models, train_file, tmp_path,
                                                                             capsys):
    manifest = build(tiny_models, train_file, tmp_path / "k", "--dtype", "fp32", "--examples-per-shard", "80",
                     top_k=100000)
    assert manifest["top_k"] is None
    assert "--top-k 100000 is not below the teacher's vocabulary (600 tokens): the full distribution is stored" \
        in capsys.readouterr().out


def test_a_full_disk_during_the_build_stops_in_words_and_leaves_sound_shards(tiny_models, train_file, small_tmpfs):
    from safetensors import safe_open

    out = small_tmpfs / "cache"
    with pytest.raises(SystemExit) as stop:  # 80 full fp32 rows of 600 tokens do not fit in 1 MiB
        build(tiny_models, train_file, out, "--dtype", "fp32")
    message = str(stop.value)
    assert "could not be written: the disk is full" in message and "Traceback" not in message
    assert "run the same command again: it keeps the finished shards" in message
    assert not list(out.glob(".*.tmp")) and not (out / MANIFEST).exists()
    finished = sorted(out.glob("shard-*.safetensors"))
    for path in finished:  # what it leaves is sound
        with safe_open(str(path), framework="np") as handle:
            assert handle.get_tensor("log_probs").shape[1] == 600
