"""The precomputed triage worklist: every worklist case diagnosed and explained in the
background, cached on disk by (model, case content), so a worklist click is a cache read.

Keys. The case part is the node's own preprocessing-cache key (hospital_node.cache.CaseCache.key:
sha256 over each source file's path and bytes, the preprocessing version and the grid, with the
per-file sha256 memo `file-hashes.json`, so unchanged files are not read again) of its CT series
and pathology tile, plus the case's EHR values. The model part is the served version id and a
sha256 of the weights and temperature (two bare checkpoints may share a file name), plus the
explanation settings. An entry whose stored keys differ from the ones asked for is never served.

Storage: `<dir>/<sha256 of the key>.npz` (maps as arrays, everything else as one JSON string;
loaded with allow_pickle=False: nothing in the cache can run code), written atomically. The
default folder is `$XDG_STATE_HOME/fedsight/<site hash>/triage` (ui.config.triage_cache_path),
never inside the site root. Memory: the summary row of every case, plus the full explanations
of the `memory_entries` most recently used (an entry is ~0.6 MB at the default grid).

The worker: one daemon thread at nice 19 (Linux: per thread, via its TID) that rescans the site
every `rescan_s` (new cases, changed files, a swapped model) and computes missing entries one
case at a time under `ModelLock.background`: only when no interactive request waits, on one
torch thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explain.config import ExplainConfig
from explain.explanation import CtLocation, Explanation, FieldContribution, explain_case
from explain.modality import ExpertUse, SubsetValue
from hospital_node.cache import CaseCache, default_cache_dir
from hospital_node.dataset import read_site_config
from hospital_node.discover import discover
from hospital_node.preprocess import PREPROCESS_VERSION
from hospital_node.site_files import SiteFile, rel_name, walk_files
from multimodal.data import PreparedCase
from multimodal.grid import InputConfig
from multimodal.model import FedsightModel
from ui.batching import ModelLock
from vocab.ehr_schema import CHEST_V1

log = logging.getLogger(__name__)  # counts and timings only: no case ids
FORMAT = 1


# ---- keys ----
def model_key(model: FedsightModel, version: str, cfg: ExplainConfig) -> str:
    """sha256 over the version id, every weight and buffer, the temperature and the settings."""
    h = hashlib.sha256(f"{version}\x00{float(model.temperature)!r}\x00{model.serve_task}\x00"
                       .encode())
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\x00")
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ehr_bytes(case: PreparedCase) -> bytes:
    if case.ehr is None:
        return b"no-ehr"
    v = np.asarray(case.ehr, dtype=np.float32).copy()
    v[np.isnan(v)] = np.nan  # one NaN bit pattern: equal values, equal bytes
    return v.tobytes()


def site_content_hashes(root: Path, cases: Mapping[str, PreparedCase], inputs: InputConfig,
                        preprocess_cache: Path | None = None) -> dict[str, str]:
    """case id -> content hash for the usable `cases`: the node's preprocessing-cache keys of
    the case's CT series and pathology tile (same function, same per-file memo) + its EHR."""
    root = Path(root).resolve()
    cfg = read_site_config(root)
    cache = CaseCache(preprocess_cache or default_cache_dir(root), root)
    disc = discover(root, cfg.schema or CHEST_V1)
    out: dict[str, str] = {}
    for cid, case in cases.items():
        h = hashlib.sha256(f"case\x00{FORMAT}\x00".encode())
        cf = disc.cases.get(cid)
        if cf is not None and cf.ct_dir is not None and case.ct is not None:
            files = [f.path for f in walk_files(cf.ct_dir, root) if isinstance(f, SiteFile)]
            # the same kind string hospital_node.dataset uses for a CT entry
            kind = f"ct:{rel_name(cf.ct_dir, root)}:{cfg.series_rule!r}"
            h.update(b"ct\x00" + cache.key(kind, files, root, inputs, PREPROCESS_VERSION).encode())
        if cf is not None and cf.pathology is not None and case.path is not None:
            h.update(b"path\x00" + cache.key("path", [cf.pathology], root, inputs,
                                             PREPROCESS_VERSION).encode())
        h.update(b"ehr\x00" + _ehr_bytes(case))
        out[cid] = h.hexdigest()
    cache.hashes.save()
    return out


def entry_name(model_k: str, content_k: str) -> str:
    return hashlib.sha256(f"{model_k}\x00{content_k}".encode()).hexdigest()


# ---- (de)serialisation: arrays + JSON, never pickle ----
def to_npz_payload(e: Explanation, model_k: str, content_k: str) -> dict[str, np.ndarray]:
    meta: dict[str, Any] = {
        "format": FORMAT, "model_key": model_k, "content_key": content_k,
        "model_version": e.model_version, "probability": e.probability, "logit": e.logit,
        "temperature": e.temperature, "threshold": e.threshold,
        "uncertain_band": e.uncertain_band, "present": list(e.present),
        "positive": e.positive, "negative": e.negative, "condition": e.condition,
        "missing": list(e.missing), "ct_top_slice": e.ct_top_slice,
        "ct_location": None if e.ct_location is None else {
            "voxel": list(e.ct_location.voxel),
            "mm": None if e.ct_location.mm is None else list(e.ct_location.mm),
            "slice_share": e.ct_location.slice_share},
        "ehr": [[f.name, f.unit, f.value, f.contribution] for f in e.ehr],
        "subsets": [[list(s.modalities), s.logit, s.probability] for s in e.subsets],
        "modality_contrib": e.modality_contrib,
        "experts": [[x.block, x.expert, x.tokens, [list(p) for p in x.by_source], x.fusion]
                    for x in e.experts],
    }
    out = {"_meta": np.array(json.dumps(meta))}
    if e.ct_map is not None:
        out["ct_map"] = e.ct_map
    if e.path_map is not None:
        out["path_map"] = e.path_map
    return out


def from_npz(z: Mapping[str, np.ndarray]) -> tuple[Explanation, dict[str, Any]]:
    m = json.loads(str(z["_meta"]))
    loc = m["ct_location"]
    e = Explanation(
        model_version=m["model_version"], probability=float(m["probability"]),
        logit=float(m["logit"]), temperature=float(m["temperature"]),
        threshold=float(m["threshold"]), uncertain_band=float(m["uncertain_band"]),
        present=tuple(m["present"]), missing=tuple(m["missing"]),
        ct_map=np.asarray(z["ct_map"], np.float32) if "ct_map" in z else None,
        ct_location=None if loc is None else CtLocation(
            tuple(int(v) for v in loc["voxel"]),  # type: ignore[arg-type]
            None if loc["mm"] is None else tuple(float(v) for v in loc["mm"]),  # type: ignore
            float(loc["slice_share"])),
        ct_top_slice=None if m["ct_top_slice"] is None else int(m["ct_top_slice"]),
        path_map=np.asarray(z["path_map"], np.float32) if "path_map" in z else None,
        ehr=tuple(FieldContribution(str(n), str(u), None if v is None else float(v), float(c))
                  for n, u, v, c in m["ehr"]),
        subsets=tuple(SubsetValue(tuple(s), float(lg), float(p)) for s, lg, p in m["subsets"]),
        modality_contrib={str(k): float(v) for k, v in m["modality_contrib"].items()},
        experts=tuple(ExpertUse(int(b), int(x), int(t), tuple((str(s), int(n)) for s, n in by),
                                bool(f)) for b, x, t, by, f in m["experts"]),
        timings_ms={},
        positive=str(m.get("positive", "malignant")), negative=str(m.get("negative", "benign")),
        condition=str(m.get("condition", "malignancy")),
    )
    return e, m


@dataclass(frozen=True)
class Row:
    """One worklist line: what the triage table shows and sorts by."""

    case_id: str
    probability: float
    decision: str
    margin: float  # |p - threshold|: small = uncertain
    near_threshold: bool
    modalities: tuple[str, ...]
    positive: bool = False  # at or above the threshold (the task's label-1 decision)


OUT_OF_SCOPE = "out of scope"


def row_of(case_id: str, e: Explanation | None, modalities: tuple[str, ...] = ()) -> Row:
    """The row of a computed case; e None: the scope check refused it (no probability)."""
    if e is None:
        return Row(case_id, float("nan"), OUT_OF_SCOPE, float("nan"), False, modalities)
    return Row(case_id, e.probability, e.decision, abs(e.probability - e.threshold),
               e.near_threshold, e.present, e.is_positive)


class TriageCache:
    """Disk entries by (model key, content key) + an LRU of full explanations in memory +
    the summary rows of the current (model, case) pairs."""

    def __init__(self, folder: Path, memory_entries: int = 128) -> None:
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memory_entries = memory_entries
        self._mem: OrderedDict[str, Explanation] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.npz"

    def get(self, model_k: str, content_k: str) -> Explanation | None:
        name = entry_name(model_k, content_k)
        with self._lock:
            e = self._mem.get(name)
            if e is not None:
                self._mem.move_to_end(name)
                self.hits += 1
                return e
        e = self._read(name, model_k, content_k)
        with self._lock:
            if e is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(name, e)
        return e

    def peek(self, model_k: str, content_k: str) -> Explanation | None:
        """Like get, without counting (the worker's own look-ups)."""
        name = entry_name(model_k, content_k)
        with self._lock:
            if name in self._mem:
                return self._mem[name]
        return self._read(name, model_k, content_k)

    def _read(self, name: str, model_k: str, content_k: str) -> Explanation | None:
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                e, meta = from_npz({k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as err:
            log.warning("triage entry unreadable (%s); recomputing", type(err).__name__)
            return None
        if meta.get("model_key") != model_k or meta.get("content_key") != content_k \
                or meta.get("format") != FORMAT:
            return None  # another model's or another content's entry: never served
        return e

    def _remember(self, name: str, e: Explanation) -> None:
        self._mem[name] = e
        self._mem.move_to_end(name)
        while len(self._mem) > self.memory_entries:
            self._mem.popitem(last=False)

    def put(self, model_k: str, content_k: str, e: Explanation) -> None:
        name = entry_name(model_k, content_k)
        stored = dataclasses.replace(e, timings_ms={})
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **to_npz_payload(stored, model_k, content_k))
            os.replace(tmp, self._path(name))
        except OSError as err:  # a cache that cannot be written only costs recomputation
            Path(tmp).unlink(missing_ok=True)
            log.warning("could not write triage entry (%s)", type(err).__name__)
        with self._lock:
            self._remember(name, stored)


def set_thread_nice(level: int = 19) -> bool:
    """Lower this thread's CPU priority (Linux: a thread's nice is per TID)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), level)
        return True
    except (OSError, AttributeError):
        return False


class TriageWorker:
    """Background thread: keep every worklist case's entry computed for the served model.

    `snapshot()` -> (model, version, model key, {case id: case}, {case id: content key}) is read
    under the service's state lock; `rescan()` reloads the site (new cases, changed files);
    `on_done(case_id, model_k, content_k, e, also_result)` records a computed entry; `also(case)`
    runs first under the same lock (the service's scope check): a result with `refused` set
    skips the explanation (e is None then).
    """

    def __init__(self, snapshot: Callable[[], tuple[FedsightModel, str, str,
                                                     Mapping[str, PreparedCase],
                                                     Mapping[str, str]]],
                 rescan: Callable[[], None] | None, cache: TriageCache, lock: ModelLock,
                 cfg: ExplainConfig, rescan_s: float,
                 on_done: Callable[..., None], also: Callable[[PreparedCase], Any] | None = None
                 ) -> None:
        self.snapshot, self.rescan, self.cache, self.lock = snapshot, rescan, cache, lock
        self.cfg, self.rescan_s, self.on_done, self.also = cfg, rescan_s, on_done, also
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.computed = 0
        self._done: set[tuple[str, str]] = set()  # (model key, content key) known present
        self.idle = threading.Event()  # set whenever nothing is left to compute
        self._thread = threading.Thread(target=self._run, name="triage", daemon=True)

    def start(self) -> TriageWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.wake.set()
        self._thread.join(timeout)

    def pending(self) -> list[str]:
        _m, _v, mk, cases, keys = self.snapshot()
        return [cid for cid in cases if cid in keys and self.cache.peek(mk, keys[cid]) is None]

    def _run(self) -> None:
        set_thread_nice(19)
        next_scan = time.monotonic() + self.rescan_s
        while not self.stop_event.is_set():
            if self.rescan is not None and time.monotonic() >= next_scan:
                try:
                    self.rescan()
                except Exception as err:  # noqa: BLE001 - a failed rescan keeps the old list
                    log.warning("worklist rescan failed (%s)", type(err).__name__)
                next_scan = time.monotonic() + self.rescan_s
            todo = self._todo()
            if not todo:
                self.idle.set()
                self.wake.wait(timeout=max(0.05, next_scan - time.monotonic()))
                self.wake.clear()
                continue
            self.idle.clear()
            for model, version, mk, cid, case, ck in todo:
                if self.stop_event.is_set():
                    return
                with self.lock.background(self.stop_event) as got:
                    if not got:
                        return
                    if self.cache.peek(mk, ck) is not None:  # an interactive call made it
                        continue
                    t0 = time.perf_counter()
                    extra = self.also(case) if self.also is not None else None
                    refused = bool(getattr(extra, "refused", False))
                    e = None if refused else explain_case(model, case, self.cfg, version)
                log.debug("triage entry computed in %.0f ms", (time.perf_counter() - t0) * 1e3)
                if e is not None:
                    self.cache.put(mk, ck, e)
                self._done.add((mk, ck))
                self.computed += 1
                self.on_done(cid, mk, ck, e, extra)
                if self.wake.is_set():  # the model or the site changed: re-plan
                    break

    def _todo(self) -> list[tuple[FedsightModel, str, str, str, PreparedCase, str]]:
        model, version, mk, cases, keys = self.snapshot()
        out = []
        for cid, case in cases.items():
            ck = keys.get(cid)
            if ck is None or (mk, ck) in self._done:
                continue
            e = self.cache.peek(mk, ck)
            if e is None:
                out.append((model, version, mk, cid, case, ck))
            else:
                self._done.add((mk, ck))
                self.on_done(cid, mk, ck, e)
        return out


def sort_rows(rows: Iterable[Row], order: str = "triage") -> list[Row]:
    """Out-of-scope rows last, by id; the others by `order`.
    triage: positive (malignant) or near-threshold first, then by probability (high first);
    suspicion: probability high first; uncertainty: closest to the threshold first."""
    rows = list(rows)
    done = [r for r in rows if r.decision != OUT_OF_SCOPE]
    refused = sorted((r for r in rows if r.decision == OUT_OF_SCOPE), key=lambda r: r.case_id)
    if order == "suspicion":
        return sorted(done, key=lambda r: (-r.probability, r.case_id)) + refused
    if order == "uncertainty":
        return sorted(done, key=lambda r: (r.margin, -r.probability, r.case_id)) + refused
    if order == "triage":
        return sorted(done, key=lambda r: (not (r.positive or r.near_threshold),
                                           -r.probability, r.case_id)) + refused
    raise ValueError(f"worklist order must be triage, suspicion or uncertainty, got {order!r}")
