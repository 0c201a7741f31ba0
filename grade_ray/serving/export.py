"""``grade-ray export``: the learned policy as a self-contained serving artifact.

An export directory holds::

    policy.ts      TorchScript: raw context (B, D) float32 -> weights (B, K) on the simplex;
                   the context standardisation (x - mean) / std is inside the module
    policy.onnx    the same graph as ONNX (opset 18, batch axis dynamic), only with
                   ``--onnx``; it needs the ``grade_ray[onnx]`` extra (onnx, onnxscript for
                   torch's exporter, onnxruntime to check the graph before it is kept)
    metadata.json  feature names and preprocessing, task order, fusion form and eps,
                   versions, training-data range, config hash, sha256 of the model files
    manifest.json  sha256 of every other file (metadata.json included) and a digest of
                   that list; written last, so an export without it is incomplete

Loading never unpickles Python objects: TorchScript archives are read with
``torch.jit.load`` (TorchScript's own restricted format) and metadata is JSON.
:class:`grade_ray.serving.service.FusionService` is the reader; :func:`verify_export`
refuses an export whose files (metadata included) differ from its manifest. The hashes
catch damage and edits that do not rewrite the manifest; they are not a signature.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import grade_ray
from grade_ray.config import UserError
from grade_ray.learner.loop import load_policy
from grade_ray.models.policy import FusionPolicy

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 2  # 2: manifest.json covers every file, metadata.json included
TORCHSCRIPT_FILE = "policy.ts"
ONNX_FILE = "policy.onnx"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "context"
OUTPUT_NAME = "weights"
ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_EXTRA = "pip install 'grade_ray[onnx]'"
ONNX_CHECK_ATOL = 1e-5
"""An ONNX graph whose weights differ from the PyTorch policy's by more is not kept."""


class RequestError(UserError, ValueError):
    """A serving request (or export) the policy cannot answer correctly; the message says
    how to fix it."""


class PolicyWeights(nn.Module):
    """Serving wrapper: raw context x (B, D) float32 -> pi(x) (B, K), rows summing to 1.

    Standardisation is part of the wrapped :class:`FusionPolicy` (buffers
    ``x_mean``, ``x_std``), so callers pass features exactly as logged.
    """

    def __init__(self, policy: FusionPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.policy.pi(x)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_export_dir(out: Path) -> None:
    """An export goes into a new or empty directory, or over an earlier export: files of
    other kinds there would be replaced or end up beside the export, outside its manifest."""
    if not out.is_dir():
        if out.exists():
            raise RequestError(f"--out {out} is a file; give a directory")
        return
    ours = {TORCHSCRIPT_FILE, ONNX_FILE, METADATA_FILE, MANIFEST_FILE}
    other = sorted(
        f.name for f in out.iterdir() if f.name not in ours and not f.name.endswith(".tmp")
    )
    if other:
        raise RequestError(
            f"--out {out} holds files that are not an export ({other[:5]}); export into a new "
            "or empty directory, or one an earlier export wrote"
        )


def _example_input(policy: FusionPolicy, batch: int = 8) -> torch.Tensor:
    """(batch, D) float32 contexts around the training distribution (for tracing)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, policy.context_dim, generator=g)
    return policy.x_mean + z * policy.x_std


def _torchscript(wrapper: PolicyWeights, path: Path) -> None:
    """Trace the wrapper (no data-dependent control flow) and save it; batch size stays free."""
    x = _example_input(wrapper.policy)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (x,), check_trace=True)
        # The trace must not have frozen the batch dimension.
        for b in (1, 3):
            xb = _example_input(wrapper.policy, b)
            torch.testing.assert_close(traced(xb), wrapper(xb), rtol=0, atol=1e-6)
    torch.jit.save(traced, str(path))


def missing_onnx_packages() -> list[str]:
    """The packages of the ``grade_ray[onnx]`` extra that do not import here."""
    import importlib.util

    return [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's ONNX exporter logs a warning per torchvision op it cannot register, onnxscript
    and onnx_ir log each optimisation pass, and both warn about their own deprecations;
    none of it concerns this policy (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require_onnx() -> None:
    """Raise :class:`RequestError` naming what to install unless the onnx extra is here."""
    missing = missing_onnx_packages()
    if missing:
        raise RequestError(
            f"--onnx needs the onnx extra ({', '.join(missing)} not installed): {ONNX_EXTRA}"
        )


def _onnx(wrapper: PolicyWeights, path: Path) -> dict[str, Any]:
    """Export ``wrapper`` to ONNX with torch's exporter (torch.export-based), check it with
    onnxruntime against the PyTorch module, and write it to ``path``; returns what metadata
    records about it. Raises :class:`RequestError` when the extra is missing or the graph
    cannot be exported or disagrees with the policy (nothing is written then)."""
    require_onnx()
    import onnxruntime as ort

    tmp = path.with_name(path.name + ".tmp")
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                wrapper,
                (_example_input(wrapper.policy),),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        # The graph must answer like the module, and the batch axis must have stayed free.
        for b in (1, 3, 64):
            xb = _example_input(wrapper.policy, b)
            with torch.no_grad():
                want = wrapper(xb).numpy()
            got = session.run(None, {INPUT_NAME: xb.numpy()})[0]
            if got.shape != want.shape or not abs(got - want).max() <= ONNX_CHECK_ATOL:
                raise RequestError(
                    f"the ONNX graph disagrees with the PyTorch policy at batch {b} "
                    f"(shape {got.shape} vs {want.shape}); not writing {path.name}"
                )
    except RequestError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # exporter failures vary by torch version; the message says which
        tmp.unlink(missing_ok=True)
        raise RequestError(
            f"ONNX export failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            "export without --onnx to get the TorchScript policy only"
        ) from e
    tmp.replace(path)
    import onnx

    return {
        "opset": ONNX_OPSET,
        "dynamic_axes": {INPUT_NAME: [0], OUTPUT_NAME: [0]},
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "checked_atol": ONNX_CHECK_ATOL,
    }


def build_metadata(
    policy: FusionPolicy,
    state: dict[str, Any],
    files: dict[str, Path | None],
    onnx_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """metadata.json content for an exported policy (plain JSON values only)."""
    from grade_ray.data.sessions import SessionMeta

    meta = SessionMeta.from_json(state["meta"])
    pcfg = state["config"]["policy"]
    ts_range = state.get("ts_range")
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "grade_ray_version": grade_ray.__version__,
        "torch_version": torch.__version__,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", meta.context_dim]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", meta.num_tasks]},
        "context": {
            "dim": meta.context_dim,
            "names": list(meta.context_names),
            "preprocessing": {
                "kind": "standardize",
                "formula": "(x - mean) / std, applied inside the exported module",
                "mean": [float(v) for v in policy.x_mean.tolist()],
                "std": [float(v) for v in policy.x_std.tolist()],
            },
        },
        "tasks": {"names": list(meta.task_names), "kinds": list(meta.task_kinds)},
        "fusion": {"form": pcfg["fusion"], "eps": float(pcfg["fusion_eps"])},
        "architecture": {
            "class": "grade_ray.models.policy.FusionPolicy",
            "context_dim": meta.context_dim,
            "num_tasks": meta.num_tasks,
            "num_experts": int(pcfg["num_experts"]),
            "expert_hidden": int(pcfg["expert_hidden"]),
        },
        "training": {
            "stage": state.get("stage"),
            "ts_range": None if ts_range is None else [int(t) for t in ts_range],
            "config_hash": state["config_hash"],
            "data_source": meta.source,
        },
        "files": {
            kind: None if p is None else {"path": p.name, "sha256": sha256_file(p)}
            for kind, p in files.items()
        },
        "onnx": onnx_info,
        "notes": [] if onnx_info else ["ONNX not exported (`grade-ray export --onnx` writes it)"],
    }


def export_policy(run_dir: str | Path, out_dir: str | Path, onnx: bool = False) -> dict[str, Any]:
    """Export RUN_DIR/policy.pt (or a policy file) to ``out_dir``; returns the metadata dict.

    Writes policy.ts (TorchScript), policy.onnx when ``onnx`` (checked with onnxruntime
    first), metadata.json, and manifest.json last. Each exported model maps raw context
    (B, D) float32 -> weights (B, K) on the simplex.
    """
    if onnx:
        require_onnx()  # before anything is written
    policy, _, state = load_policy(run_dir)
    if getattr(policy, "item_aware", False):
        raise RequestError(
            f"{run_dir} holds an item-aware policy (policy.kind=item_aware); export, infer and "
            "serve take context -> one weight vector per request and cannot serve weights that "
            "depend on each candidate's scores. Serve an item-agnostic policy "
            "(policy.kind=context) or rank with ItemAwarePolicy.fused(context, scores, mask, "
            "fusion) in process"
        )
    out = Path(out_dir)
    _check_export_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete until the new one is written
    wrapper = PolicyWeights(policy).eval()

    ts_path = out / TORCHSCRIPT_FILE
    _torchscript(wrapper, ts_path)
    onnx_path: Path | None = out / ONNX_FILE
    onnx_path.unlink(missing_ok=True)  # never leave a stale file from an older export
    onnx_info = None
    if onnx:
        onnx_info = _onnx(wrapper, onnx_path)
    else:
        onnx_path = None

    metadata = build_metadata(policy, state, {"torchscript": ts_path, "onnx": onnx_path}, onnx_info)
    _write_json(out / METADATA_FILE, metadata)
    files = [TORCHSCRIPT_FILE, METADATA_FILE] + ([ONNX_FILE] if onnx_path else [])
    write_manifest(out, files)
    log.info(
        "exported policy (config %s, K=%d tasks %s, D=%d%s) to %s",
        metadata["training"]["config_hash"],
        len(metadata["tasks"]["names"]),
        metadata["tasks"]["names"],
        metadata["context"]["dim"],
        ", + ONNX" if onnx_path else "",
        out,
    )
    return metadata


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def _files_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(out: Path, names: list[str]) -> dict[str, Any]:
    """``out/manifest.json``: sha256 of each of ``names`` and a digest of that list."""
    files = {n: sha256_file(out / n) for n in sorted(names)}
    manifest = {"format_version": 1, "files": files, "digest": _files_digest(files)}
    _write_json(out / MANIFEST_FILE, manifest)
    return manifest


def verify_export(export_dir: str | Path) -> dict[str, str]:
    """Check an export against its manifest; returns file name -> sha256.

    Raises :class:`RequestError` when the manifest is missing or malformed, its digest does
    not match its file list, it does not cover the model and metadata files, or a listed
    file is missing or has another sha256.
    """
    d = Path(export_dir)
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise RequestError(
            f"{d}: no {MANIFEST_FILE} (an incomplete export, or one from an older grade_ray); "
            "re-export it with `grade-ray export`"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        ok = isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        )
        digest = manifest["digest"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise RequestError(f"{path} is not a valid manifest ({type(e).__name__}: {e})") from None
    if not ok or digest != _files_digest(files):
        raise RequestError(f"{path} was modified (its digest does not match its file list)")
    missing = {TORCHSCRIPT_FILE, METADATA_FILE} - set(files)
    if missing:
        raise RequestError(f"{path} does not cover {sorted(missing)}; re-export")
    for name, want in files.items():
        f = d / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise RequestError(f"{f}, listed in {path}, is missing; re-export")
        if sha256_file(f) != want:
            raise RequestError(
                f"{f} does not match the sha256 in {path}; the export was modified or "
                "truncated: re-export it"
            )
    return files


# ---------------------------------------------------------------------------
# CLI


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.run) / "export"
    md = export_policy(args.run, out, onnx=args.onnx)
    print(f"exported to {out}")
    for kind, f in md["files"].items():
        print(
            f"  {kind}: " + ("not exported" if f is None else f"{f['path']} sha256={f['sha256']}")
        )
    print(f"  manifest: {MANIFEST_FILE} (sha256 of every file, {METADATA_FILE} included)")
    for note in md["notes"]:
        print(f"  note: {note}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``grade-ray export RUN_DIR --out DIR``."""
    p = subparsers.add_parser(
        "export", help="export the learned policy for serving (TorchScript [+ ONNX] + metadata)"
    )
    p.add_argument("run", metavar="RUN_DIR", help="run directory holding policy.pt (or the file)")
    p.add_argument("--out", help="export directory (default RUN_DIR/export)")
    p.add_argument(
        "--onnx",
        action="store_true",
        help=f"also write {ONNX_FILE} (checked with onnxruntime; needs {ONNX_EXTRA})",
    )
    p.set_defaults(fn=cmd_export)
