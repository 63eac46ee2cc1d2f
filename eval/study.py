"""``actedit run``: the whole study from one YAML file.

Loads the model and the data, then for every method listed: collects its activations, fits or
trains it (layer selection included) and saves its artifact; composes the methods' edits into
one more artifact; scores the base model and every edit on the test split (lm-eval's TruthfulQA
MC1/MC2, :mod:`actedit.eval.mc`); measures side effects (norm drift, KL to the base model on
neutral text, prediction flips); writes ``OUT/results.json``, ``OUT/report.md`` and the plots.

Everything a step produces is written atomically and reused by a rerun with the same settings:
activation stores resume from their last shard, HPR training from its last epoch, finished
artifacts and scores are loaded instead of recomputed. So an interrupted study continues where
it stopped.

Keys (``configs/default.yaml`` is the embedded default)::

    model: smollm2-135m-instruct   # anything actedit.eval.models.load_model takes
    dtype: auto                    # auto | float32 | bfloat16 | float16: the model's precision
    device: null                   # cpu | cuda | cuda:N (default: CUDA when available)
    data: {name: truthfulqa_mc, source: null, split_file: null, limit: null}
    out: runs/study
    methods:                       # any of hpr, sea, iti, caa, actadd; each like one pipeline config
      hpr: {collect: {...}, fit: {...}, train: {...}, select: {k: 5}}
      iti: {fit: {top_k: 48, alpha: 15}}
      actadd: {data: {name: pairs.jsonl}, fit: {coefficient: 5}}   # ActAdd needs prompt pairs
    compose: all                   # all | none | a list of method names
    eval: {split: test, limit: null, batch_size: 64, mc2_rule: split, analyses: true}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from actedit.interventions.settings import Settings, check_keys
from actedit.train.pipeline import METHODS, CollectConfig, DataConfig, PipelineConfig, read_config

STUDY_ORDER = ("hpr", "sea", "iti", "caa", "actadd")
"""The order in which a study fits its methods and lists them in the report."""

METHOD_KEYS = ("collect", "fit", "train", "select", "data")
"""What a method's block in ``methods`` may hold (``data`` overrides the study's data)."""

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: str) -> str:
    """The model precision ``dtype`` stands for on ``device``: itself, or for ``auto`` bfloat16
    where the hardware multiplies bf16 natively (a CUDA GPU with bf16 support; a CPU with
    AVX512-BF16 or AMX) and float32 elsewhere (emulated bf16 is slower than fp32)."""
    if dtype != "auto":
        return dtype
    import torch

    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    cpu = getattr(torch, "cpu", None)
    native = any(bool(getattr(cpu, probe, lambda: False)()) for probe in
                 ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bfloat16" if native else "float32"


@dataclass
class EvalSettings(Settings):
    """How the study evaluates.

    Attributes:
        split: TruthfulQA split scored (``test``: HPR's 409 questions).
        limit: score only the first N questions of the split (quick runs).
        batch_size: continuation rows per forward call of the scorer.
        mc2_rule: ``split`` (lm-eval truthfulqa_mc2 v2.0) or ``labels`` (v3.0).
        analyses: measure norm drift, KL to base and flips (a few seconds per method).
        norm_texts: test questions whose residual-stream norms are compared.
    """

    split: str = "test"
    limit: Optional[int] = None
    batch_size: int = 64
    mc2_rule: str = "split"
    analyses: bool = True
    norm_texts: int = 32

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval", "test", "all"):
            raise ValueError(f"eval.split must be train, eval, test or all, got {self.split!r}.")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"eval.limit must be a positive integer or null, got {self.limit!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.mc2_rule not in ("split", "labels"):
            raise ValueError(f"eval.mc2_rule must be 'split' or 'labels', got {self.mc2_rule!r}.")


@dataclass
class StudyConfig:
    """A whole study (see the module docstring).

    Attributes:
        model: model spec for :func:`actedit.eval.models.load_model`.
        dtype: the model's precision for collection and evaluation: ``float32``, ``bfloat16``,
            ``float16`` or ``auto`` (:func:`resolve_dtype`: bf16 where the hardware has native bf16
            matrix products, else fp32).
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``; default: CUDA when available).
        data: the contrast data (TruthfulQA with HPR's split by default).
        out: output directory.
        methods: method name → its block (``collect``, ``fit``, ``train``, ``select``, ``data``),
            with the keys of :class:`~actedit.train.pipeline.PipelineConfig`.
        compose: methods whose edits are composed into one more artifact (``all``, ``none`` or
            a list).
        eval: see :class:`EvalSettings`.
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "runs/study"
    methods: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {m: {} for m in ("hpr", "sea", "iti", "caa")})
    compose: Union[str, List[str]] = "all"
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if not isinstance(self.methods, dict) or not self.methods:
            raise ValueError("methods must map at least one method name to its settings, e.g. {iti: {}}.")
        for name, block in self.methods.items():
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r} in methods; choose from {', '.join(METHODS)}.")
            if block is None:
                self.methods[name] = block = {}
            if not isinstance(block, dict):
                raise ValueError(f"methods.{name} must be a mapping, got {type(block).__name__}.")
            check_keys(block, METHOD_KEYS, f"methods.{name}")
        if "actadd" in self.methods and not (self.methods["actadd"].get("data") or {}).get("name"):
            raise ValueError("methods.actadd needs prompt pairs: set methods.actadd.data.name to a JSONL file of "
                             "{prompt1, prompt2} records (or drop actadd).")
        if isinstance(self.compose, str):
            if self.compose not in ("all", "none"):
                raise ValueError(f"compose must be 'all', 'none' or a list of methods, got {self.compose!r}.")
        else:
            missing = [m for m in self.compose if m not in self.methods]
            if missing:
                raise ValueError(f"compose lists {missing}, which are not in methods ({', '.join(self.methods)}).")
        for name in self.methods:  # every block's settings are checked now, before any model loads
            self.pipeline(name)

    @property
    def method_names(self) -> List[str]:
        return [m for m in STUDY_ORDER if m in self.methods]

    @property
    def composed_methods(self) -> List[str]:
        if self.compose == "none":
            return []
        chosen = self.method_names if self.compose == "all" else [m for m in STUDY_ORDER if m in self.compose]
        return chosen if len(chosen) > 1 else []

    def pipeline(self, method: str) -> PipelineConfig:
        """The one-method pipeline config of ``method`` inside this study."""
        block = self.methods[method]
        where = f"methods.{method}"
        data = DataConfig.from_mapping({**asdict(self.data), **(block.get("data") or {})}, f"{where}.data")
        collect = CollectConfig.from_mapping({"dir": str(Path(self.out) / "activations" / method),
                                              **(block.get("collect") or {})}, f"{where}.collect")
        return PipelineConfig(model=self.model, method=method, data=data, collect=collect, fit=block.get("fit"),
                              train=block.get("train"), select=block.get("select"),
                              out=str(Path(self.out) / "artifacts" / method), where=where)


def load_study(path: Optional[str], overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a study YAML (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    raw = read_config(path, overrides, "No study config at {path!r}; the embedded default is configs/default.yaml.")
    check_keys(raw, [f.name for f in fields(StudyConfig)], "")
    data = DataConfig.from_mapping(raw.pop("data", None), "data")
    evals = EvalSettings.from_mapping(raw.pop("eval", None), "eval")
    return StudyConfig(data=data, eval=evals, **raw)


# ------------------------------------------------------------------------------------ files
def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _artifact_ready(path: Path) -> bool:
    from actedit.interventions.artifacts import ArtifactError, verify_artifact

    if not path.is_dir():
        return False
    try:
        verify_artifact(path)
    except (ArtifactError, ValueError, FileNotFoundError):
        return False
    return True


def _mc_result(data: Dict[str, Any]):
    from actedit.eval.mc import MCRecord, MCResult

    records = [MCRecord(**r) for r in data["records"]]
    return MCResult(records=records, **{k: v for k, v in data.items() if k != "records"})


class _Steps:
    """Numbered step headers and per-step timings."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.seconds: Dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {name}", flush=True)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 2)


# ------------------------------------------------------------------------------------ study
def run_study(cfg: StudyConfig, *, quiet: bool = False) -> Dict[str, Any]:
    """Run (or resume) the study ``cfg``; returns the results written to ``OUT/results.json``."""
    import torch

    from actedit.eval import analysis, plots
    from actedit.eval.mc import score_mc_many
    from actedit.eval.models import load_model
    from actedit.interventions import compose, config_of, intervenable, load_artifact, save_artifact
    from actedit.train import pipeline
    from actedit.train.truthfulqa import split_questions

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = cfg.method_names
    composed = cfg.composed_methods
    edits = methods + (["composed"] if composed else [])
    steps = _Steps(2 + 2 * len(methods) + bool(composed) + 1 + bool(edits) + 1, quiet)

    # data first: a missing dataset should fail before the model loads
    test = steps.run("load TruthfulQA", split_questions, cfg.data.source, cfg.eval.split, cfg.data.split_file,
                     limit=cfg.eval.limit)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = steps.run(f"load model {cfg.model} ({dtype}, {device})", load_model, cfg.model,
                                 dtype=getattr(torch, dtype), device=device)
    # every method's layer specs against this model's depth, before any work
    pipelines = {method: cfg.pipeline(method).for_model(model) for method in methods}

    artifacts: Dict[str, Path] = {}
    step_seconds: Dict[str, Dict[str, float]] = {}
    for method in methods:
        pcfg = pipelines[method]
        path = Path(pcfg.out)
        record = step_seconds.setdefault(method, {})
        if _artifact_ready(path):
            steps.run(f"{method}: collect (reused)", lambda: None)
            steps.run(f"{method}: fit (reused)", lambda: None)
            previous = (_read_json(out / "results.json") or {}).get("methods", {}).get(method, {})
            record.update({k: v for k, v in previous.get("seconds", {}).items() if k in ("collect", "fit")})
        else:
            collect_step = f"{method}: collect activations"
            fit_step = f"{method}: {'train' if method == 'hpr' else 'fit'}"
            steps.run(collect_step, pipeline.collect, pcfg, model, tokenizer)
            steps.run(fit_step, pipeline.train if method == "hpr" else pipeline.fit, pcfg, model, tokenizer)
            record.update(collect=steps.seconds[collect_step], fit=steps.seconds[fit_step])
        artifacts[method] = path

    if composed:
        path = out / "artifacts" / "composed"

        def build_composed():
            if _artifact_ready(path):
                return
            configs = [config_of(load_artifact(artifacts[m], model)) for m in composed]
            save_artifact(intervenable(model, compose(*configs, metadata={"composed_of": composed})), path)

        steps.run(f"compose {' + '.join(composed)}", build_composed)
        artifacts["composed"] = path

    # ---------------------------------------------------------------- evaluation
    eval_dir = out / "eval"
    key = {"questions": [q.index for q in test], "mc2_rule": cfg.eval.mc2_rule, "dtype": dtype,
           "model": cfg.model}

    pvms = {name: load_artifact(artifacts[name], model) for name in edits}

    def score_all() -> Dict[str, Any]:
        """Scores read from OUT/eval/<name>.json when their key and artifact match; the rest
        scored together, the edits sharing the base model's unedited lower layers."""
        done: Dict[str, Any] = {}
        for name in ["base"] + edits:
            cached = _read_json(eval_dir / f"{name}.json")
            if cached and cached.get("key") == key and (name == "base" or
                                                        cached.get("artifact_sha") == _sha(artifacts[name])):
                done[name] = _mc_result(cached["result"])
        todo = [name for name in edits if name not in done]
        if todo or "base" not in done:  # the base model runs whenever an edit does: it carries their lower layers
            targets = {"base": model, **{name: pvms[name] for name in todo}}
            scored = score_mc_many(targets, tokenizer, test, batch_size=cfg.eval.batch_size,
                                   mc2_rule=cfg.eval.mc2_rule)
            for name, result in scored.items():
                if name in done:
                    continue
                _write_json(eval_dir / f"{name}.json", {"key": key, "artifact_sha": None if name == "base" else
                                                        _sha(artifacts[name]), "result": result.to_dict()})
                done[name] = result
        return {name: done[name] for name in ["base"] + edits}

    results: Dict[str, Any] = steps.run(f"score base model{' + ' + ', '.join(edits) if edits else ''} "
                                        f"on {len(test)} questions", score_all)

    analyses: Dict[str, Dict[str, Any]] = {name: {} for name in edits}

    def run_analyses():
        if not cfg.eval.analyses:
            return
        for name in edits:
            flips = analysis.flips_from_records(results["base"].records, results[name].records)
            effects = analysis.side_effects(pvms[name], tokenizer, base=model)
            analyses[name].update(flips=flips, side_effects=effects)
        inputs = analysis.encode_texts(tokenizer, [q.question for q in test[:cfg.eval.norm_texts]])
        comparison = analysis.activation_norms(model, inputs, pvms, skip_first=1)
        drift = comparison.drift()
        for name in edits:
            layer_drift = drift[name]
            analyses[name]["norm_drift"] = sum(layer_drift.values()) / max(len(layer_drift), 1)
        plots.plot_norms(comparison, out / "norms.png")
        plots.plot_flips({name: analyses[name]["flips"] for name in edits}, out / "flips.png")

    if edits:
        steps.run("analyses (flips, KL, norm drift)", run_analyses)

    def write_report():
        summary = _summarise(cfg, test, results, analyses, artifacts, step_seconds, steps.seconds, edits,
                             time.perf_counter() - started, model)
        plots.plot_scores({name: summary["methods"][name] for name in ["base"] + edits}, out / "scores.png")
        _write_json(out / "results.json", summary)
        (out / "report.md").write_text(markdown_report(summary))
        return summary

    summary = steps.run("write report", write_report)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 2)
    _write_json(out / "results.json", summary)
    return summary


def _sha(path: Path) -> Optional[str]:
    """Identity of an artifact: the hash of its manifest (which lists every file's SHA-256)."""
    from actedit.interventions.artifacts import MANIFEST, file_sha256

    manifest = path / MANIFEST
    return file_sha256(manifest) if manifest.is_file() else None


def _summarise(cfg, test, results, analyses, artifacts, step_seconds, steps_seconds, edits, total, model):
    from actedit.eval.environment import environment
    from actedit.interventions import artifact_metadata

    methods: Dict[str, Any] = {}
    for name in ["base"] + edits:
        r = results[name]
        entry: Dict[str, Any] = {"mc1": r.mc1, "mc2": r.mc2, "mc1_stderr": r.mc1_stderr, "mc2_stderr": r.mc2_stderr,
                                 "score_seconds": round(r.seconds, 2)}
        if name != "base":
            info = artifact_metadata(artifacts[name])
            entry["artifact"] = str(artifacts[name])
            entry["layers"] = sorted({int(layer) for e in info.get("edits", []) for layer in e.get("layers", [])})
            entry["edits"] = [{k: e.get(k) for k in ("method", "component", "layers")} for e in info.get("edits", [])]
            a = analyses.get(name, {})
            if "flips" in a:
                entry["flips"] = a["flips"].to_dict()
                entry["kl_to_base"] = a["side_effects"].kl
                entry["lm_loss"] = a["side_effects"].edited_loss
                entry["base_lm_loss"] = a["side_effects"].base_loss
                entry["norm_drift"] = a.get("norm_drift")
            entry["seconds"] = {**step_seconds.get(name, {}), "score": round(r.seconds, 2)}
        methods[name] = entry
    base_losses = [m["base_lm_loss"] for m in methods.values() if "base_lm_loss" in m]
    if base_losses:
        methods["base"]["lm_loss"] = base_losses[0]
    return {
        "study": {"model": cfg.model, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                  "dtype_requested": cfg.dtype, "data": asdict(cfg.data), "eval": asdict(cfg.eval),
                  "methods": cfg.methods, "compose": cfg.composed_methods, "out": cfg.out},
        "n_questions": len(test),
        "protocol": results["base"].protocol,
        "methods": methods,
        "seconds": {"steps": steps_seconds, "total": round(total, 2)},
        "environment": environment(model),
    }


def markdown_report(summary: Dict[str, Any]) -> str:
    """The study's Markdown report: one row per model, then flips and timings."""
    s = summary["study"]
    env = summary["environment"]
    lines = [f"# actedit study: {s['model']} on TruthfulQA ({s['eval']['split']} split, "
             f"{summary['n_questions']} questions)", "",
             f"Protocol: {summary['protocol'].get('name')} (lm-eval truthfulqa_mc1/mc2, MC2 rule "
             f"{summary['protocol'].get('mc2_rule')}), model dtype {s['dtype']}. Machine: {env['machine'].get('cpu')}, "
             f"{env['machine'].get('cores')} cores, {env['machine'].get('torch_threads')} torch threads; "
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, pyvene {env.get('pyvene')}.", "",
             "| model | layers | MC1 (%) | MC2 (%) | norm drift | KL to base | LM loss |",
             "|---|---|---|---|---|---|---|"]

    def num(x, digits=4):
        return "—" if x is None else f"{x:.{digits}f}"

    for name, m in summary["methods"].items():
        layers = m.get("layers")
        shown = "—" if not layers else (f"{layers[0]}–{layers[-1]} ({len(layers)})" if len(layers) > 6
                                         else ", ".join(map(str, layers)))
        lines.append(f"| {name} | {shown} | {100 * m['mc1']:.2f} ± {100 * m['mc1_stderr']:.2f} | "
                     f"{100 * m['mc2']:.2f} ± {100 * m['mc2_stderr']:.2f} | {num(m.get('norm_drift'))} | "
                     f"{num(m.get('kl_to_base'))} | {num(m.get('lm_loss', m.get('base_lm_loss')), 3)} |")
    lines += ["", "Norm drift: mean over layers of |‖h′‖ − ‖h‖| / ‖h‖ of the residual stream on the first "
              f"{s['eval']['norm_texts']} test questions. KL to base and LM loss: on neutral text "
              "(`actedit.eval.analysis.NEUTRAL_TEXTS`), where edits with the `answer` policy (ITI, CAA) have no "
              "marked answer and edit only the last position."]
    flips = {n: m["flips"] for n, m in summary["methods"].items() if "flips" in m}
    if flips:
        lines += ["", "MC1 prediction flips against the base model (% of questions, HPR Table 3):", "",
                  "| edit | False→True | True→False | remains True | remains False |", "|---|---|---|---|---|"]
        for n, f in flips.items():
            lines.append(f"| {n} | {f['false_to_true']:.2f} | {f['true_to_false']:.2f} | {f['remains_true']:.2f} | "
                         f"{f['remains_false']:.2f} |")
    lines += ["", "Seconds per step:", "", "| step | seconds |", "|---|---|"]
    for step, sec in summary["seconds"]["steps"].items():
        lines.append(f"| {step} | {sec:.1f} |")
    lines += ["", f"Total: {summary['seconds']['total']:.0f} s. Plots: scores.png, flips.png, norms.png, "
              "artifacts/hpr_probe_accuracy.png.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="study YAML (default: the embedded configs/default.yaml)")
    parser.add_argument("--data", default=None, help="directory with mc_task.json and hpr_ids_splits.json "
                        "(overrides data.source; default: the Hub)")
    parser.add_argument("--out", default=None, help="output directory (overrides out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set eval.limit=20 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no step headers")


def default_config_path() -> Path:
    """``configs/default.yaml`` of the installed package."""
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def run(args) -> int:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    if args.out is not None:
        overrides.append(f"out={args.out}")
    cfg = load_study(args.config or str(default_config_path()), overrides)
    summary = run_study(cfg, quiet=args.quiet)
    m = summary["methods"]
    best = max((n for n in m if n != "base"), key=lambda n: m[n]["mc2"], default=None)
    line = (f"done in {summary['seconds']['total']:.0f} s: base MC1/MC2 {100 * m['base']['mc1']:.1f}/"
            f"{100 * m['base']['mc2']:.1f}")
    if best:
        line += f", best edit {best} {100 * m[best]['mc1']:.1f}/{100 * m[best]['mc2']:.1f}"
    print(f"{line}; report {Path(cfg.out) / 'report.md'}, results {Path(cfg.out) / 'results.json'}, "
          f"artifacts {Path(cfg.out) / 'artifacts'}")
    return 0
