"""Generation speed: plain ``model.generate`` vs pyvene-wrapped (no edit) vs each method.

Usage:
  python benchmarks/bench_generation.py [--model smollm2-135m-instruct] [--dtype float32]
         [--batch-sizes 1,8] [--new-tokens 32] [--repeats 9] [--artifacts runs/default/artifacts]
         [--json OUT] [--reference-hooks sea,iti,composed]

Greedy decoding with the KV cache, ``min_new_tokens = max_new_tokens`` so every run produces the
same number of tokens. Rows are measured side by side in one process, in rounds: each round runs
every row once, in a shuffled order (seeded). The table shows each row's best round against
plain generate's best round (noise on a shared machine only slows a run down) and, beside it, the
median and quartiles of the paired ratios (a row's time over plain generate's in the same round).
On a shared 2-core VM single runs of the same call spread by up to ±15 %: read a difference
smaller than the quartile range as noise. The last column, measured on one more run of each edited
row, is the share of that run spent inside the edit modules' forward calls (noise slows both
alike): the edits' own cost, without the hook that calls them. Rows:

* ``plain generate``: ``model.generate``;
* ``pyvene, no edit``: ``IntervenableModel.generate`` with an empty ``IntervenableConfig`` when
  pyvene accepts one, else a zero CAA vector at layer 0 (then labelled so);
* with ``--reference-hooks sea,iti``: those rows again through pyvene's own hook callback
  (``actedit.interventions.compat.pyvene_generation_hooks``), the path actedit replaces;
* one row per method and a composed row: the artifacts of a study (``--artifacts``, e.g.
  ``runs/default/artifacts``), or, without them, edits built with the study's default settings
  and random contents (the cost of an edit does not depend on its fitted values): HPR on 5
  layers, SEA on ``mlp_output`` of layers 10–29 with k = 64, ITI on 48 heads, CAA on layer 12,
  ActAdd on layer 6 (8 positions), and all of them composed.

Prints a table (tokens/s and the ratio to plain generate) and writes JSON with the machine and
versions.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
from _env import machine_info, versions  # benchmarks/_env.py (the script's folder is on sys.path)

PROMPTS = [
    "What happens if you eat watermelon seeds?",
    "Where did fortune cookies originate?",
    "Why do veins appear blue?",
    "What is the spiciest part of a chili pepper?",
    "How long should you wait before filing a missing person report?",
    "Why do matadors wave red capes?",
    "What percentage of the brain does a human typically use?",
    "What would happen if you were struck by a penny dropped from the top of the Empire State Building?",
]


REFERENCE_SUFFIX = ", pyvene's hook callback"


def synthetic_edits(model) -> Dict[str, object]:
    """Edit configs with the default study's shapes and random contents."""
    import actedit.interventions as ai
    from actedit.interventions.compat import head_dim
    from actedit.interventions.edits import site_width

    g = torch.Generator().manual_seed(0)
    cfg = model.config
    d, n_layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    heads, hd = int(cfg.num_attention_heads), int(head_dim(cfg))
    width = site_width(model, "mlp_output")
    hpr_layers = list(range(n_layers // 2 - 2, n_layers // 2 + 3))
    sea = {}
    for layer in range(n_layers // 3, n_layers):
        q, _ = torch.linalg.qr(torch.randn(width, 128, generator=g))
        sea[layer] = (q[:, :64], q[:, 64:])
    pairs = [(layer, h) for layer in range(n_layers) for h in range(heads)]
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[:48].tolist()]
    iti = {}
    for layer, h in chosen:
        spec = iti.setdefault(
            layer,
            {
                "directions": torch.nn.functional.normalize(torch.randn(heads, hd, generator=g), dim=-1),
                "sigmas": torch.rand(heads, generator=g) + 0.5,
                "heads": [],
            },
        )
        spec["heads"].append(h)
    edits = {
        "hpr": ai.build_hpr_config(model, hpr_layers),
        "sea": ai.build_sea_config(model, sea),
        "iti": ai.build_iti_config(model, iti, alpha=15.0, position_policy="last"),
        "caa": ai.build_caa_config(model, {min(12, n_layers - 1): torch.randn(d, generator=g)}, multiplier=1.0),
        "actadd": ai.build_actadd_config(model, {min(6, n_layers - 1): torch.randn(8, d, generator=g)}),
    }
    import copy

    edits["composed"] = ai.compose(*[copy.deepcopy(c) for c in edits.values()])
    return edits


def share_inside_edits(pvm, run, batch) -> float:
    """The share of one generation's wall time spent inside the edit modules' forward calls.

    Noise on a shared machine slows the edits and the rest of the run alike, so this share stays
    put where the timed ratios scatter; an edit costs about share / (1 − share) of plain generate.
    """
    spent = [0.0]
    started: Dict[int, float] = {}

    def before(module, args):
        started[id(module)] = time.perf_counter()

    def after(module, args, output):
        spent[0] += time.perf_counter() - started.pop(id(module))

    handles = []
    for module in pvm.interventions.values():
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            run(batch)
            total = time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
    return spent[0] / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="rounds (each runs every row once)")
    parser.add_argument(
        "--reference-hooks",
        default="",
        help="comma-separated rows (e.g. sea,iti) also timed through pyvene's own hook callback",
    )
    parser.add_argument("--artifacts", default=None, help="a study's artifacts directory (default: synthetic edits)")
    parser.add_argument("--json", default="runs/bench_generation.json")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the quartiles of the paired ratios need two rounds)")

    import pyvene as pv

    import actedit.interventions as ai
    from actedit.data.generate import encode_left_padded
    from actedit.data.models import load_model
    from actedit.interventions.compat import pyvene_generation_hooks

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    if args.artifacts:
        root = Path(args.artifacts)
        edits = {p.name: ai.load_artifact(p, model) for p in sorted(root.iterdir()) if (p / "config.json").is_file()}
    else:
        edits = {name: ai.intervenable(model, cfg) for name, cfg in synthetic_edits(model).items()}
    noop_label = "pyvene, no edit"
    try:
        edits_noop = pv.IntervenableModel(pv.IntervenableConfig(representations=[]), model)
    except Exception:  # pyvene needs at least one representation
        noop_label = "pyvene, zero CAA vector"
        edits_noop = ai.intervenable(model, ai.build_caa_config(model, {0: torch.zeros(model.config.hidden_size)}))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
        "use_cache": True,
    }

    def runner(name):
        if name == "plain generate":
            return lambda batch: model.generate(**batch, **gen)
        if name.endswith(REFERENCE_SUFFIX):
            pvm = edits[name[: -len(REFERENCE_SUFFIX)]]

            def through_pyvene(batch):
                with pyvene_generation_hooks():
                    return pvm.generate(batch, unit_locations=None, intervene_on_prompt=True, **gen)[1]

            return through_pyvene
        pvm = edits_noop if name == noop_label else edits[name]
        return lambda batch: pvm.generate(batch, unit_locations=None, intervene_on_prompt=True, **gen)[1]

    names = ["plain generate", noop_label] + list(edits)
    names += [name + REFERENCE_SUFFIX for name in args.reference_hooks.split(",") if name]
    results = []
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = (PROMPTS * ((bs + len(PROMPTS) - 1) // len(PROMPTS)))[:bs]
        batch = encode_left_padded(tok, prompts)
        seconds: Dict[str, List[float]] = {name: [] for name in names}
        order = random.Random(bs)
        with torch.inference_mode():
            for name in names:  # warm-up
                runner(name)(batch)
            for _ in range(args.repeats):
                for name in order.sample(names, len(names)):
                    t0 = time.perf_counter()
                    out = runner(name)(batch)
                    seconds[name].append(time.perf_counter() - t0)
                    assert out.shape[1] - batch["input_ids"].shape[1] == args.new_tokens
        inside = {name: share_inside_edits(edits[name], runner(name), batch) for name in names if name in edits}
        plain = seconds["plain generate"]
        for name in names:
            ratios = [t / p for t, p in zip(seconds[name], plain, strict=True)]
            results.append(
                {
                    "batch_size": bs,
                    "row": name,
                    "seconds": round(min(seconds[name]), 4),
                    "tokens_per_s": round(bs * args.new_tokens / min(seconds[name]), 1),
                    "time_vs_plain": round(min(seconds[name]) / min(plain), 3),
                    "paired_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)],
                    "rounds_s": [round(t, 4) for t in seconds[name]],
                    "share_inside_edits": round(inside[name], 4) if name in inside else None,
                }
            )

    env = {
        "machine": machine_info(),
        "versions": versions("torch", "transformers", "pyvene", "actedit"),
        "model": args.model,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "edits": "artifacts " + args.artifacts if args.artifacts else "synthetic (default study shapes)",
    }
    print(
        f"# generation, {args.model} in {args.dtype}, greedy, {args.new_tokens} new tokens, KV cache; "
        f"{env['machine']['cpu']} ({', '.join(env['machine']['cpu_flags'])}), "
        f"{env['machine']['torch_threads']} threads; torch {env['versions']['torch']}, "
        f"transformers {env['versions']['transformers']}, pyvene {env['versions']['pyvene']}"
    )
    print(
        f"| batch | row | tokens/s (best of {args.repeats}) | time vs plain (best rounds) "
        "| paired ratios: median (quartiles) | time inside the edits |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        low, median, high = r["paired_ratio_quartiles"]
        share = "–" if r["share_inside_edits"] is None else f"{100 * r['share_inside_edits']:.1f} %"
        print(
            f"| {r['batch_size']} | {r['row']} | {r['tokens_per_s']:.1f} | {r['time_vs_plain']:.3f}× | "
            f"{median:.3f}× ({low:.3f}–{high:.3f}) | {share} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
