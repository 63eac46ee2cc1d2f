"""``actedit eval``: TruthfulQA MC1/MC2 of a base model and an edit, with the analyses, as files.

Writes into ``--out``:

* ``results.json`` — ``mc1``/``mc2`` (fractions; of the edit when one is given, else of the base
  model), ``base``/``edited`` blocks with stderr and per-question scores, the protocol, the flip
  table, side effects (LM loss, KL to the base model) and activation-norm drift;
* ``report.md`` — a Markdown table (model × MC1/MC2 ± stderr, norm drift, KL) and the flips;
* ``norms.png`` and ``flips.png`` when an edit is evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from actedit.train import truthfulqa


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="local model directory, Hub id, .gguf file or alias (smollm2-135m-instruct)")
    parser.add_argument("--data", default=None,
                        help="directory holding mc_task.json (and hpr_ids_splits.json), or a Hub dataset id "
                             "(default: truthful_qa from the Hub)")
    parser.add_argument("--split", default="test", choices=["train", "eval", "test", "all"])
    parser.add_argument("--split-file", default=None, help="split file (default: DATA/hpr_ids_splits.json)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N questions of the split")
    parser.add_argument("--intervention", default=None, help="artifact directory or Hub repo id of the edit")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mc2-rule", default="split", choices=["split", "labels"],
                        help="lm-eval truthfulqa_mc2 v2.0 ('split', default) or v3.0 ('labels')")
    parser.add_argument("--no-analyses", action="store_true", help="skip norms, side effects and plots")
    parser.add_argument("--layer-curve", action="store_true",
                        help="also score the edit restricted to its top-1..K layers (HPR Fig. 6; K scorings)")


def _questions(args):
    chosen = truthfulqa.split_questions(args.data, args.split, args.split_file, limit=args.limit)
    if not chosen:
        raise ValueError(f"no questions to score in split {args.split!r} (limit {args.limit}).")
    return chosen


def _block(result) -> Dict[str, Any]:
    out = result.to_dict()
    out["per_question"] = out.pop("records")
    return out


def evaluate(args) -> Dict[str, Any]:
    """Run the evaluation described by parsed ``args``; returns the results dict it wrote."""
    from actedit.eval import analysis, plots
    from actedit.eval.mc import score_mc_many
    from actedit.eval.models import load_model

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = _questions(args)
    started = time.time()
    model, tokenizer = load_model(args.model)
    pvm = None
    if args.intervention:
        from actedit.interventions import load_artifact

        pvm = load_artifact(args.intervention, model)
    # base and edit together: the edit starts from the base model's unedited lower layers
    scored = score_mc_many({"base": model, **({"edited": pvm} if pvm is not None else {})}, tokenizer, questions,
                           batch_size=args.batch_size, mc2_rule=args.mc2_rule)
    base = scored["base"]
    results: Dict[str, Any] = {
        "model": args.model, "data": args.data, "split": args.split, "n_questions": len(questions),
        "protocol": base.protocol, "base": _block(base),
    }
    rows = [("base", base, None, None)]
    if args.intervention:
        from actedit.interventions import artifact_metadata
        from actedit.interventions.artifacts import resolve_artifact

        edited = scored["edited"]
        results["intervention"] = {"path": str(args.intervention),
                                   "metadata": artifact_metadata(resolve_artifact(args.intervention))}
        results["edited"] = _block(edited)
        flips = analysis.flips_from_records(base.records, edited.records)
        results["flips"] = flips.to_dict()
        drift = kl = None
        if not args.no_analyses:
            effects = analysis.side_effects(pvm, tokenizer, base=model)
            results["side_effects"] = effects.to_dict()
            kl = effects.kl
            inputs = analysis.encode_texts(tokenizer, [q.question for q in questions[:32]])
            comparison = analysis.activation_norms(model, inputs, {"edited": pvm}, skip_first=1)
            results["norms"] = comparison.summary()
            layer_drift = comparison.drift()["edited"]
            drift = sum(layer_drift.values()) / max(len(layer_drift), 1)
            plots.plot_norms(comparison, out_dir / "norms.png")
            plots.plot_flips({"edited": flips}, out_dir / "flips.png")
            _layer_analyses(args, pvm, tokenizer, questions, results, out_dir)
        rows.append(("edited", edited, drift, kl))
        final = edited
    else:
        final = base
    results["mc1"], results["mc2"] = final.mc1, final.mc2
    results["mc1_stderr"], results["mc2_stderr"] = final.mc1_stderr, final.mc2_stderr
    results["seconds"] = time.time() - started
    _write_json(out_dir / "results.json", results)
    (out_dir / "report.md").write_text(markdown_report(results, rows))
    return results


def _layer_analyses(args, pvm, tokenizer, questions, results: Dict[str, Any], out_dir: Path) -> None:
    """Probe accuracy per layer (from the artifact's layer selection) and, with --layer-curve,
    MC1/MC2 of the edit restricted to its best 1..K layers."""
    from actedit.eval import analysis, plots
    from actedit.eval.mc import score_mc

    info = results["intervention"]["metadata"]
    selection = info.get("layer_selection") or {}
    if selection.get("accuracy"):
        accuracy = {int(k): float(v) for k, v in selection["accuracy"].items()}
        plots.plot_per_layer(accuracy, "eval probe accuracy", out_dir / "probe_accuracy.png",
                             highlight=selection.get("selected"))
    if not args.layer_curve:
        return
    layers = sorted({layer for edit in info.get("edits", []) for layer in edit.get("layers", [])})
    ranked = [int(x) for x in selection.get("ranking", []) if int(x) in layers] or layers

    def score(chosen):
        result = score_mc(analysis.restrict_layers(pvm, chosen), tokenizer, questions,
                          batch_size=args.batch_size, progress=False, mc2_rule=args.mc2_rule)
        return {"mc1": result.mc1, "mc2": result.mc2}

    curve = analysis.accuracy_vs_num_layers(score, ranked, max_k=len(ranked), progress=True)
    results["layer_curve"] = curve.to_dict()
    plots.plot_layer_count(curve, out_dir / "layer_curve.png")


def markdown_report(results: Dict[str, Any], rows) -> str:
    lines = [f"# TruthfulQA ({results['split']} split, {results['n_questions']} questions)", "",
             f"Model: `{results['model']}`. Protocol: {results['protocol'].get('name')}; "
             f"MC2 rule: {results['protocol'].get('mc2_rule')}; BOS token: {results['protocol'].get('bos')}.", "",
             "| model | MC1 | MC2 | mean norm drift | KL to base |", "|---|---|---|---|---|"]
    for name, result, drift, kl in rows:
        fmt = lambda x: "—" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"| {name} | {100 * result.mc1:.2f} ± {100 * result.mc1_stderr:.2f} | "
                     f"{100 * result.mc2:.2f} ± {100 * result.mc2_stderr:.2f} | {fmt(drift)} | {fmt(kl)} |")
    if "flips" in results:
        f = results["flips"]
        lines += ["", "| False→True | True→False | remains True | remains False | accuracy |",
                  "|---|---|---|---|---|",
                  f"| {f['false_to_true']:.2f} | {f['true_to_false']:.2f} | {f['remains_true']:.2f} | "
                  f"{f['remains_false']:.2f} | {f['accuracy']:.2f} |"]
    lines.append("")
    return "\n".join(lines)


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def run(args) -> int:
    results = evaluate(args)
    print(f"MC1 {results['mc1']:.4f} ± {results['mc1_stderr']:.4f}, MC2 {results['mc2']:.4f} ± "
          f"{results['mc2_stderr']:.4f} on {results['n_questions']} questions -> {Path(args.out) / 'results.json'}")
    return 0
