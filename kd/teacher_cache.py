"""A stored teacher: its distributions over the training data, computed once, read by every KD run.

The teacher is frozen and deterministic, so its distribution at every response position of every
training example is the same in each epoch and in each run of a sweep. cache_teacher.py computes
them once; train_kd.py --teacher-cache DIR reads them instead of running the teacher.

What is stored, per training example (in the order of kd.data.TranslationDataset: the rows of the
train file that fit --max-length) and per response position (where the shifted label counts):
  log_probs [T, K]  the K largest teacher log-probabilities log p_v (log-softmax over the teacher's
                    full vocabulary V, in the cache's dtype)
  token_ids [T, K]  their token ids (uint16 when V <= 65536, else int32)
  log_rest  [T]     log of the remaining mass, log Σ_{v not in top-K} p_v (float32, log-sum-exp of
                    the others: no cancellation when the top-K hold almost everything)
With --top-k all, log_probs is [T, V] (the full distribution) and there are no ids and no rest.
With --sampling S (RS-KD, Anshumann et al., ACL 2025) there is only
  token_ids [T, S]  S draws with replacement from the teacher's distribution p, sorted (a token
                    drawn c times appears c times); each draw weighs 1/S
at 2 bytes a draw for V <= 65536: S = 2K + 2 takes the bytes of top-K in fp16 (K·(2 + 2) + 4).

How a stored row enters the losses (`TeacherCache.log_probs`): the dense log-distribution
    log p̃_v = stored log p_v            for v in the top-K,
    log p̃_v = log_rest − log(V − K)     for every other v   (the rest spread evenly),
handed to kd/losses.py as the teacher's logits. p̃ sums to 1, so the losses' log-softmax leaves it as
it is (up to rounding) and every KL stays finite; with --top-k all it is the teacher's distribution.
A sampled row is p̂_v = (draws of v)/S: zero outside the drawn tokens, and E[p̂] = p, so every loss
linear in p (forward KD's KL(p‖q) up to a constant, noevo's KL(ỹ‖q)) has the live teacher's
gradient in expectation, where top-K's truncation is biased (RS-KD's argument). A loss that is not
linear in p (skew, selfevo's d > Γ, JSD, TVD, ATKD, TAID, ...) is biased by either, by sampled rows
far more (bench/bench_teacher_cache.py measures both; a reverse KL(q‖p̂) is even infinite wherever
the student puts mass on an undrawn token): train_kd.py refuses those methods with a sampled cache.
Cutting to the vocabulary shared with the student and renormalising there is the same as for live
teacher logits (log_softmax of log-probabilities cut to V' equals log_softmax of the logits cut to V').

Layout of DIR:
  build.json                what the cache is valid for (written first; a resumed build must match it)
  shard-00000.safetensors   examples [0, S), shard-00001: [S, 2S), ... (S = examples per shard); each
                            written whole under a temporary name and renamed (kd/io.py): a killed
                            build leaves finished shards and no half shard; a resume redoes the rest
  manifest.json             written last, when every shard is there: build.json's fields plus each
                            shard's size, token count and sha256. A cache without it is incomplete.
Shards are distributed round-robin over the processes of `accelerate launch` (shard s on process
s mod P), so several GPUs build one cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kd.io import fail, read_json

CONFIG_ERROR = 2  # a cache that cannot serve the run is a configuration error, as a wrong flag

MANIFEST = "manifest.json"
BUILD = "build.json"
FORMAT = 1
# The fields of the manifest that must equal the training run's (what train_kd.py checks).
RUN_FIELDS = ("data_sha256", "tokenizer_sha256", "template", "max_length", "examples")
STORAGE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": "bf16"}  # bf16: stored via torch


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------- fingerprints


def file_sha256(path, chunk=1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Hash of what decides the token ids: the vocabulary (token -> id) and the BOS/EOS ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    text = json.dumps({"vocab": vocab, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_template(train_file) -> Optional[str]:
    """The prompt template prepare_data.py recorded in stats.json beside the train file (None without one)."""
    stats = Path(train_file).parent / "stats.json"
    if not stats.is_file():
        return None
    try:
        return json.loads(stats.read_text(encoding="utf-8")).get("template")
    except (OSError, ValueError):
        return None


def teacher_sha256(name_or_path) -> str:
    """Hash of the teacher's config.json and weight files (a local folder, or the hub snapshot in the cache)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(name_or_path), local_files_only=True))
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir()
                   if p.name == "config.json" or p.suffix in (".safetensors", ".bin") and p.is_file())
    for path in files:
        digest.update(path.name.encode("utf-8"))
        digest.update(file_sha256(path).encode("ascii"))
    return digest.hexdigest()


def differences(cache: dict, run: dict) -> list:
    """'name: cache X, run Y' for every field of RUN_FIELDS that differs."""
    return [f"{name} (cache {cache.get(name)!r}, this run {run.get(name)!r})"
            for name in RUN_FIELDS if cache.get(name) != run.get(name)]


def run_fingerprint(train_file, tokenizer, max_length, examples) -> dict:
    """What a training run needs the cache to be built from (compared with the manifest)."""
    return {"data_sha256": file_sha256(train_file), "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "template": data_template(train_file), "max_length": max_length, "examples": examples}


# ----------------------------------------------------------------------------- building


def token_id_dtype(vocab: int):
    return np.uint16 if vocab <= 2**16 else np.int32


def sample_rows(log_p: torch.Tensor, draws: int, generator: torch.Generator) -> dict:
    """The stored form of a sampled row set: `draws` tokens per row of log_p [T, V], drawn with
    replacement from p (torch.multinomial on the CPU generator, so that a build is the same on any
    device), sorted within each row."""
    ids = torch.multinomial(log_p.float().exp().cpu(), draws, replacement=True, generator=generator)
    return {"token_ids": ids.sort(dim=-1).values}


def compress_rows(log_p: torch.Tensor, top_k: Optional[int]) -> dict:
    """The stored form of the teacher's log-probabilities log_p [T, V] (float32): the full rows
    (top_k None), or the top-K log-probs, their ids and the log of the rest."""
    if top_k is None:
        return {"log_probs": log_p}
    values, ids = torch.topk(log_p, top_k, dim=-1)
    others = log_p.scatter(1, ids, -math.inf)
    return {"log_probs": values, "token_ids": ids, "log_rest": torch.logsumexp(others, dim=-1)}


def shard_arrays(parts: list, offsets: list, top_k: Optional[int], vocab: int, dtype: str,
                 sampling: Optional[int] = None) -> dict:
    """numpy arrays of one shard from the per-example compressed (or sampled) rows."""
    def cat(name, empty_shape, empty_dtype):
        tensors = [part[name] for part in parts if name in part]
        return torch.cat(tensors) if tensors else torch.zeros(empty_shape, dtype=empty_dtype)

    if sampling is not None:
        return {"token_offsets": np.asarray(offsets, dtype=np.int64),
                "token_ids": cat("token_ids", (0, sampling), torch.long).numpy().astype(token_id_dtype(vocab))}

    width = vocab if top_k is None else top_k
    log_probs = cat("log_probs", (0, width), torch.float32)
    arrays = {"token_offsets": np.asarray(offsets, dtype=np.int64)}
    if dtype == "bf16":  # numpy has no bf16: its bit pattern as uint16 (read back through torch)
        arrays["log_probs"] = log_probs.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        arrays["log_probs"] = log_probs.numpy().astype(STORAGE_DTYPES[dtype])
    if top_k is not None:
        arrays["token_ids"] = cat("token_ids", (0, width), torch.long).numpy().astype(token_id_dtype(vocab))
        arrays["log_rest"] = cat("log_rest", (0,), torch.float32).numpy().astype(np.float32)
    return arrays


# ----------------------------------------------------------------------------- reading


def dense_log_probs(log_probs: Optional[torch.Tensor], ids: Optional[torch.Tensor], log_rest: Optional[torch.Tensor],
                    vocab: int) -> torch.Tensor:
    """log p̃ [T, V] of stored rows: the top-K log-probs at their ids, log_rest − log(V − K) elsewhere
    (the rest spread evenly); rows without ids are the full distribution already; sampled rows (ids
    only) are log of (draws of v)/S, −inf at the tokens not drawn."""
    if ids is None:
        return log_probs
    if log_probs is None:
        counts = torch.zeros(ids.shape[0], vocab, dtype=torch.float32).scatter_add_(
            1, ids, torch.ones(ids.shape, dtype=torch.float32))
        return (counts / ids.shape[1]).log()
    spread = log_rest - math.log(vocab - ids.shape[1])  # each other token's share of the rest, in log
    return spread[:, None].expand(-1, vocab).clone().scatter_(1, ids, log_probs)



class TeacherCache:
    """A complete cache folder, checked against a training run, read micro-batch by micro-batch."""

    def __init__(self, folder, run: dict, argument="--teacher-cache"):
        """Every problem is found here, before any training step, and stops with exit status 2: a folder
        that is not there, a build that did not finish, a cache of other data, and a manifest or shard
        that was changed (every shard's sha256 and shapes are checked against the manifest: about 2 s
        for the paper's 1 GiB cache, measured here at 1.8 s per GiB)."""
        self.folder, self.argument = Path(folder), argument
        if not self.folder.is_dir():
            fail(f"{argument} {folder}", "does not exist", "build it with cache_teacher.py --out "
                 f"{folder} (see its --help), or pass --teacher", code=CONFIG_ERROR)
        if not (self.folder / MANIFEST).is_file():
            fail(f"{argument} {folder}", "not a complete teacher cache (no manifest.json: the build did not finish)",
                 "run cache_teacher.py with the same arguments again to finish it", code=CONFIG_ERROR)
        self.manifest = read_json(self.folder / MANIFEST, argument)
        if self.manifest.get("format") != FORMAT:
            fail(f"{argument} {folder}", f"cache format {self.manifest.get('format')!r}, this code reads {FORMAT}",
                 "build the cache again with this cache_teacher.py", code=CONFIG_ERROR)
        different = differences(self.manifest, run)
        if different:
            fail(f"{argument} {folder}", "was built for other training data than this run: " + "; ".join(different),
                 "build a cache for this run (cache_teacher.py with its --train-file, --max-length and the "
                 "student's tokenizer) or pass --teacher", code=CONFIG_ERROR)
        self.vocab = self.manifest["vocab_size"]
        self.top_k = self.manifest["top_k"]  # None: the full distribution (or sampled rows)
        self.sampling = self.manifest.get("sampling")  # S draws per position (RS-KD), or None
        self.per_shard = self.manifest["examples_per_shard"]
        self._open = {}
        self._verify()

    def _bad_shard(self, name, what):
        fail(f"{self.argument} {self.folder}: shard {name}", f"{what} (the cache is damaged or was edited)",
             "build the cache again (cache_teacher.py; delete manifest.json and that shard, the others are kept)",
             code=CONFIG_ERROR)

    def _verify(self):
        """Every shard against the manifest: there, its size and sha256, and its arrays' shapes (examples,
        positions, K or V columns): an edited manifest or flipped bytes stop the run before it starts."""
        from safetensors import SafetensorError, safe_open

        manifest = self.manifest
        width = self.sampling or (self.vocab if self.top_k is None else self.top_k)
        shards = manifest["shards"]
        if len(shards) != math.ceil(manifest["examples"] / self.per_shard):
            self._bad_shard("(all)", f"{len(shards)} shards for {manifest['examples']} examples of "
                                     f"{self.per_shard} a shard in the manifest")
        if sum(shard["positions"] for shard in shards) != manifest["positions"]:
            self._bad_shard("(all)", "the shards' positions do not add up to the manifest's")
        for shard in shards:  # the cheap checks of every shard first
            path = self.folder / shard["file"]
            if not path.is_file():
                self._bad_shard(shard["file"], "is missing")
            if path.stat().st_size != shard["bytes"]:
                self._bad_shard(shard["file"], f"has {path.stat().st_size} bytes, the manifest says {shard['bytes']}")
        for index, shard in enumerate(shards):
            path = self.folder / shard["file"]
            if file_sha256(path) != shard["sha256"]:
                self._bad_shard(shard["file"], "does not match its sha256 in the manifest")
            examples = min(self.per_shard, manifest["examples"] - index * self.per_shard)
            try:
                with safe_open(str(path), framework="np") as handle:
                    shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
                    offsets = handle.get_tensor("token_offsets")
            except (SafetensorError, OSError, ValueError, KeyError) as error:
                self._bad_shard(shard["file"], f"cannot be read ({error})")
            positions = shard["positions"]
            if self.sampling:
                expected = {"token_offsets": (examples + 1,), "token_ids": (positions, width)}
            else:
                expected = {"token_offsets": (examples + 1,), "log_probs": (positions, width)}
                if self.top_k is not None:
                    expected.update(token_ids=(positions, width), log_rest=(positions,))
            if shapes != expected or int(offsets[-1]) != positions:
                self._bad_shard(shard["file"], f"holds arrays of shapes {shapes}, the manifest (top_k "
                                               f"{self.top_k}, sampling {self.sampling}, vocab {self.vocab}) says "
                                               f"{expected}")

    def _shard(self, index):
        if index not in self._open:
            from safetensors import SafetensorError, safe_open

            entry = self.manifest["shards"][index]
            path = self.folder / entry["file"]
            try:  # checked against the manifest when the cache was opened (_verify)
                handle = safe_open(str(path), framework="np")
                offsets = handle.get_tensor("token_offsets")
            except (SafetensorError, OSError, ValueError) as error:
                self._bad_shard(entry["file"], f"cannot be read ({error})")
            self._open[index] = (handle, offsets)
        return self._open[index]

    def example_rows(self, example: int):
        """(log_probs [T, K or V] float32, token_ids [T, K] int64 or None, log_rest [T] or None) of one example;
        sampled rows: (None, token_ids [T, S], None)."""
        handle, offsets = self._shard(example // self.per_shard)
        local = example % self.per_shard
        start, end = int(offsets[local]), int(offsets[local + 1])
        if self.sampling:
            return None, torch.from_numpy(np.asarray(handle.get_slice("token_ids")[start:end], dtype=np.int64)), None
        raw = handle.get_slice("log_probs")[start:end]
        if self.manifest["dtype"] == "bf16":
            log_probs = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16).float()
        else:
            log_probs = torch.from_numpy(np.asarray(raw, dtype=np.float32))
        if self.top_k is None:
            return log_probs, None, None
        ids = torch.from_numpy(np.asarray(handle.get_slice("token_ids")[start:end], dtype=np.int64))
        rest = torch.from_numpy(np.asarray(handle.get_slice("log_rest")[start:end], dtype=np.float32))
        return log_probs, ids, rest

    def log_probs(self, examples, counts, device=None) -> torch.Tensor:
        """The dense teacher log-distribution [Σ counts, V] (see the module docstring) of the response
        positions of `examples` (dataset indices), in order: counts[i] positions of example i."""
        rows = []
        for example, count in zip(examples.tolist(), counts.tolist()):
            log_probs, ids, rest = self.example_rows(example)
            stored = (ids if log_probs is None else log_probs).shape[0]
            if stored != count:
                fail(f"{self.argument} {self.folder}", f"example {example} has {stored} stored response "
                     f"positions, this run counts {count}", "build the cache for this run's data and tokenizer")
            rows.append(dense_log_probs(log_probs, ids, rest, self.vocab))
        dense = torch.cat(rows) if rows else torch.zeros(0, self.vocab)
        return dense.to(device) if device is not None else dense
