"""Artifact size per method and layer, measured by serialising each intervention's state dict.

Usage: python benchmarks/artifact_sizes.py [--d 4096] [--heads 32] [--sea-rank K] [--actadd-len N]
       [--study runs/default/artifacts] [--json OUT]

With ``--study`` it first lists the artifacts a study wrote (bytes on disk, edited layers, bytes
per layer, and for SEA the fitted ranks k⁺/k⁻), then the per-layer sizes at ``--d``.

Compares with the official releases: HPR ~11 M parameters per layer (44 MB in fp32); SEA stores
two dense d x d projectors per layer (64 MiB each in fp32 at d = 4096).
"""

from __future__ import annotations

import argparse
import io
import json
import platform

import torch

from actedit.interventions import ActAddIntervention, CAAIntervention, HPRIntervention, ITIIntervention, SEAIntervention


def serialized_bytes(module: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure(d: int, heads: int, sea_rank: int, actadd_len: int) -> list:
    rows = []
    hpr = HPRIntervention(embed_dim=d)
    rows.append(
        (
            "hpr",
            "probe + angle net d/2,d/4,d/8",
            sum(p.numel() for p in hpr.parameters()),
            serialized_bytes(hpr),
            f"~11 M params/layer ({11e6 * 4 / 2**20:.0f} MiB fp32)",
        )
    )
    del hpr
    sea = SEAIntervention(embed_dim=d, U_pos=torch.zeros(d, sea_rank), U_neg=torch.zeros(d, sea_rank))
    rows.append(
        (
            "sea",
            f"U+ and U- at rank {sea_rank} each",
            sea.U_pos.numel() + sea.U_neg.numel(),
            serialized_bytes(sea),
            f"2 x {d * d * 4 / 2**20:.0f} MiB (dense d x d per polarity)",
        )
    )
    iti = ITIIntervention(embed_dim=d, num_heads=heads, directions=torch.ones(heads, d // heads))
    rows.append(
        (
            "iti",
            f"{heads} head directions + sigmas",
            iti.directions.numel() + iti.sigmas.numel(),
            serialized_bytes(iti),
            "per-head directions (pickled arrays)",
        )
    )
    caa = CAAIntervention(embed_dim=d, vector=torch.ones(d))
    rows.append(("caa", "one vector", caa.vector.numel(), serialized_bytes(caa), "one vector per layer"))
    act = ActAddIntervention(embed_dim=d, steering=torch.ones(actadd_len, d))
    rows.append(
        (
            "actadd",
            f"{actadd_len} x d steering matrix",
            act.steering.numel(),
            serialized_bytes(act),
            "computed on the fly",
        )
    )
    return rows


def study_sizes(root: str) -> list:
    """Bytes on disk of each artifact directory under ``root`` and per edited layer."""
    from pathlib import Path

    rows = []
    for directory in sorted(Path(root).iterdir()):
        config = directory / "config.json"
        if not config.is_file():
            continue
        info = json.loads(config.read_text()).get("actedit", {})
        layers = sorted({int(l) for e in info.get("edits", []) for l in e.get("layers", [])})
        size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
        weights = sum(f.stat().st_size for f in directory.glob("*.bin"))
        ranks = ""
        if any(e.get("method") == "sea" for e in info.get("edits", [])):
            ks = []
            for f in sorted(directory.glob("*.bin")):
                state = torch.load(f, map_location="cpu", weights_only=True)
                if "U_pos" in state:
                    ks.append(f"{state['U_pos'].shape[1]}/{state['U_neg'].shape[1]}")
            ranks = "k+/k- per layer: " + ", ".join(ks)
        rows.append(
            {
                "artifact": directory.name,
                "layers": len(layers),
                "bytes": size,
                "weight_bytes": weights,
                "bytes_per_layer": weights / max(len(layers), 1),
                "note": ranks,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--sea-rank", type=int, default=None, help="rank k of each SEA factor (default d/2)")
    parser.add_argument("--actadd-len", type=int, default=8)
    parser.add_argument("--study", default=None, help="a study's artifacts directory, e.g. runs/default/artifacts")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    study = study_sizes(args.study) if args.study else []
    if study:
        print(f"# artifacts of {args.study} (on disk)")
        print("| artifact | edited layers | total | weights per layer | note |")
        print("|---|---|---|---|---|")
        for r in study:
            print(
                f"| {r['artifact']} | {r['layers']} | {r['bytes'] / 2**20:.3f} MiB | "
                f"{r['bytes_per_layer'] / 2**20:.3f} MiB | {r['note']} |"
            )
    sea_rank = args.sea_rank if args.sea_rank is not None else args.d // 2
    rows = measure(args.d, args.heads, sea_rank, args.actadd_len)
    print(f"# artifact size per layer, d = {args.d} (fp32) — {platform.machine()}, torch {torch.__version__}")
    print("| method | stored | numbers | bytes per layer | official release |")
    print("|---|---|---|---|---|")
    for method, what, numbers, size, official in rows:
        print(f"| {method} | {what} | {numbers:,} | {size / 2**20:.3f} MiB | {official} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "study": study,
                    "per_layer": [
                        dict(zip(("method", "stored", "numbers", "bytes", "official"), r, strict=True)) for r in rows
                    ],
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
