"""Linear text models and their file format (pure Python, no numpy).

A model maps a text to K outputs: ``softmax`` (a task classifier) or ``sigmoid``
(one independent quality estimate per LLM, for routing). Its inputs are the
hashed buckets of :mod:`edgeroute.learn.features` and a few dense features
(length, and optionally the probabilities of a task model).

File format ``ERLM`` (all little-endian), read by
``edgeroute_core::classify::LinearModel::from_bytes``::

    b"ERLM" | u32 header_len | header JSON (UTF-8)
    | i16[buckets * K] hashed weights, bucket-major (row b holds the K outputs)
    | f64[D * K] dense weights, row-major | f64[K] bias
    | (format 2 with "weighting": "tfidf" only) f32[buckets] idf

Format 1 is count weighting (every file written before tf-idf existed; still written
for count-weighted models, so they load in older cores too); format 2 adds
``"weighting"``: ``"count"`` or ``"tfidf"``.

Header: ``{"format": 1, "featurizer": {...}, "outputs": [...], "activation":
"softmax"|"sigmoid", "dense": ["length", "task"], "task_outputs": [...],
"scale": float, "meta": {...}}``. The hashed logit of output k is
``scale * sum(w[b][k] for b in buckets) / sqrt(len(buckets))``; summing integers
keeps Python and Rust exact, so they differ at most in the last bits of ``exp``.

With tf-idf weighting, each distinct bucket ``b`` (ascending) with count ``c`` has
value ``v = (1 + ln c) * idf[b]`` and the hashed logit of output k is
``scale * sum(v * w[b][k]) / sqrt(sum(v ** 2))`` (sublinear term frequency, inverse
document frequency, L2-normalised document vector), summed in f64 in that order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeroute.atomic_file import replace_file
from edgeroute.learn.features import FeaturizerConfig, bucket_ids, length_features

MAGIC = b"ERLM"
FORMAT_VERSION = 1  # count weighting
FORMAT_TFIDF = 2  # "weighting": "tfidf", an f32 idf table after the bias
TASK_CLASSES: tuple[str, ...] = (
    "code",
    "math",
    "reasoning",
    "creative_writing",
    "summarization",
    "extraction",
    "translation",
    "knowledge_qa",
    "chat",
    "other",
)


@dataclass
class LinearModel:
    """A trained, quantised linear model over hashed text features."""

    featurizer: FeaturizerConfig
    outputs: list[str]
    activation: str
    dense: list[str]
    scale: float
    hashed: list[int]  # i16, len = buckets * K, bucket-major
    dense_weights: list[float]  # len = D * K
    bias: list[float]  # len = K
    task_outputs: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # tf-idf weighting: one idf per bucket (values exact in f32); empty: count weighting
    idf: list[float] = field(default_factory=list)

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def dense_dim(self) -> int:
        d = 0
        for block in self.dense:
            d += 2 if block == "length" else len(self.task_outputs)
        return d

    # ---- inference (the reference the Rust core must match) ----
    def dense_vector(self, text: str, task_probs: Sequence[float] | None) -> list[float]:
        vec: list[float] = []
        for block in self.dense:
            if block == "length":
                vec.extend(length_features(text))
            elif block == "task":
                if task_probs is None or len(task_probs) != len(self.task_outputs):
                    raise ValueError("this model needs the task model's probabilities")
                vec.extend(task_probs)
            else:
                raise ValueError(f"unknown dense block {block!r}")
        return vec

    def _tfidf_hashed(self, buckets: Sequence[int]) -> list[float]:
        k = self.n_outputs
        counts: dict[int, int] = {}
        for b in buckets:
            counts[b] = counts.get(b, 0) + 1
        acc = [0.0] * k
        sumsq = 0.0
        for b in sorted(counts):
            c = counts[b]
            v = (1.0 if c == 1 else 1.0 + math.log(c)) * self.idf[b]
            sumsq += v * v
            row = b * k
            for j in range(k):
                acc[j] += v * self.hashed[row + j]
        norm = math.sqrt(sumsq) if sumsq > 0 else 1.0
        return [(self.scale * a) / norm for a in acc]

    def logits_from(self, buckets: Sequence[int], dense: Sequence[float]) -> list[float]:
        k = self.n_outputs
        if self.idf:
            hashed = self._tfidf_hashed(buckets)
        else:
            acc = [0] * k
            w = self.hashed
            for b in buckets:
                row = b * k
                for j in range(k):
                    acc[j] += w[row + j]
            n = len(buckets)
            norm = math.sqrt(n) if n else 1.0
            hashed = [(self.scale * a) / norm for a in acc]
        out = []
        for j in range(k):
            z = hashed[j]
            for d, x in enumerate(dense):
                z += x * self.dense_weights[d * k + j]
            out.append(z + self.bias[j])
        return out

    def activate(self, logits: Sequence[float]) -> list[float]:
        if self.activation == "softmax":
            m = max(logits)
            e = [math.exp(z - m) for z in logits]
            s = sum(e)
            return [x / s for x in e]
        return [1.0 / (1.0 + math.exp(-z)) for z in logits]

    def predict_proba(self, text: str, task_probs: Sequence[float] | None = None) -> list[float]:
        buckets = bucket_ids(text, self.featurizer)
        return self.activate(self.logits_from(buckets, self.dense_vector(text, task_probs)))

    # ---- file format ----
    def to_bytes(self) -> bytes:
        header: dict[str, Any] = {
            "format": FORMAT_TFIDF if self.idf else FORMAT_VERSION,
            "featurizer": self.featurizer.to_json(),
            "outputs": self.outputs,
            "activation": self.activation,
            "dense": self.dense,
            "task_outputs": self.task_outputs,
            "scale": self.scale,
            "meta": self.meta,
        }
        if self.idf:
            header["weighting"] = "tfidf"
        hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        k = self.n_outputs
        if len(self.hashed) != (1 << self.featurizer.log2_buckets) * k:
            raise ValueError("hashed weight table has the wrong size")
        if len(self.dense_weights) != self.dense_dim() * k or len(self.bias) != k:
            raise ValueError("dense weights or bias have the wrong size")
        if self.idf and len(self.idf) != 1 << self.featurizer.log2_buckets:
            raise ValueError("idf table has the wrong size")
        return b"".join(
            [
                MAGIC,
                struct.pack("<I", len(hb)),
                hb,
                struct.pack(f"<{len(self.hashed)}h", *self.hashed),
                struct.pack(f"<{len(self.dense_weights)}d", *self.dense_weights),
                struct.pack(f"<{k}d", *self.bias),
                struct.pack(f"<{len(self.idf)}f", *self.idf),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> LinearModel:
        if data[:4] != MAGIC:
            raise ValueError("not an ERLM model file")
        (hlen,) = struct.unpack_from("<I", data, 4)
        header = json.loads(data[8 : 8 + hlen].decode("utf-8"))
        fmt, weighting = header.get("format"), header.get("weighting")
        if (fmt, weighting) not in ((FORMAT_VERSION, None), (FORMAT_TFIDF, "count"), (FORMAT_TFIDF, "tfidf")):
            raise ValueError(f"unsupported model format {fmt} (weighting {weighting!r})")
        feat = FeaturizerConfig.from_json(header["featurizer"])
        outputs = [str(o) for o in header["outputs"]]
        k = len(outputs)
        model = cls(
            featurizer=feat,
            outputs=outputs,
            activation=str(header["activation"]),
            dense=[str(d) for d in header["dense"]],
            scale=float(header["scale"]),
            hashed=[],
            dense_weights=[],
            bias=[],
            task_outputs=[str(t) for t in header.get("task_outputs", [])],
            meta=dict(header.get("meta", {})),
        )
        off = 8 + hlen
        nh = (1 << feat.log2_buckets) * k
        model.hashed = list(struct.unpack_from(f"<{nh}h", data, off))
        off += 2 * nh
        nd = model.dense_dim() * k
        model.dense_weights = list(struct.unpack_from(f"<{nd}d", data, off))
        off += 8 * nd
        model.bias = list(struct.unpack_from(f"<{k}d", data, off))
        off += 8 * k
        if weighting == "tfidf":
            nb = 1 << feat.log2_buckets
            model.idf = list(struct.unpack_from(f"<{nb}f", data, off))
            off += 4 * nb
        if off != len(data):
            raise ValueError("trailing bytes after model")
        return model

    def save(self, path: str | Path) -> None:
        """Replaces the file whole: a proxy reloading it, or a crash mid-write, never sees a part."""
        replace_file(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> LinearModel:
        return cls.from_bytes(Path(path).read_bytes())
