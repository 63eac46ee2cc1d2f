"""A baked checkpoint (``actedit export --to hf``) checked by llama.cpp itself (issue 18, item 2).

Optional: needs llama-cpp-python (``pip install 'actedit[llamacpp]'``, built from source) and
llama.cpp's own converter, ``convert_hf_to_gguf.py`` with the ``gguf-py`` it ships; by default both
are taken from llama-cpp-python's source archive (``pip download``, cached under
``$ACTEDIT_CACHE/llama_cpp_source``), or ``--llama-cpp DIR`` points at a llama.cpp checkout.

Steps: the embedded SmolLM2-135M-Instruct in fp32, an ITI edit and a CAA edit acting at every
position (random directions of the default study's shapes: ITI on 48 heads with α = 15, CAA at
layer 12 with a vector of norm 20), baked into a checkpoint; llama.cpp's converter writes it as
an F32 GGUF; llama.cpp runs it; its next-token logits on a few prompts are compared with the
pyvene edit's in transformers, beside the edit's own effect on the logits (the difference the
comparison must resolve). Prints one table.

    python scripts/check_llamacpp_baked.py [--llama-cpp DIR] [--out /tmp/llamacpp-baked]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

import actedit
from actedit.data.environment import machine_info, versions
from actedit.export.hf import export_hf
from actedit.interventions import build_caa_config, build_iti_config, compose, intervenable, save_artifact
from actedit.interventions.compat import head_dim

PROMPTS = [
    "Q: What happens if you crack your knuckles a lot?\nA:",
    "Q: Is the Earth flat?\nA:",
    "The capital of France is",
]
LLAMA_CPP_PYTHON = "0.3.36"


def llama_cpp_source(given: str | None) -> Path:
    """A llama.cpp source tree holding convert_hf_to_gguf.py and gguf-py."""
    if given:
        return Path(given)
    cache = Path(os.environ.get("ACTEDIT_CACHE", Path.home() / ".cache" / "actedit")) / "llama_cpp_source"
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file() and (root / "conversion").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(cache)]
        + [f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        check=True,
    )
    archive = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith((prefix + "gguf-py/", prefix + "conversion/"))
            or m.name == prefix + "convert_hf_to_gguf.py"
        ]
        tar.extractall(cache, members=members, filter="data")
    return root


def edits(model):
    g = torch.Generator().manual_seed(0)
    heads, hd, d = int(model.config.num_attention_heads), int(head_dim(model.config)), int(model.config.hidden_size)
    pairs = torch.randperm(model.config.num_hidden_layers * heads, generator=g)[:48]
    spec = {}
    for pair in pairs.tolist():
        layer, head = divmod(pair, heads)
        spec.setdefault(layer, []).append(head)
    iti = build_iti_config(
        model,
        {
            layer: {
                "directions": torch.nn.functional.normalize(torch.randn(heads, hd, generator=g), dim=-1),
                "sigmas": torch.rand(heads, generator=g) + 0.5,
                "heads": sorted(chosen),
            }
            for layer, chosen in spec.items()
        },
        alpha=15.0,
        position_policy="all",
    )
    vector = torch.randn(d, generator=g)
    caa = build_caa_config(model, {12: vector * (20.0 / vector.norm())}, position_policy="all")
    return intervenable(model, compose(iti, caa))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", default=None, help="a llama.cpp checkout (default: llama-cpp-python's sources)")
    parser.add_argument("--out", default="/tmp/llamacpp-baked")
    args = parser.parse_args(argv)
    import llama_cpp  # lazy: optional, heavy

    out = Path(args.out)
    model, tokenizer = actedit.load_model("smollm2-135m-instruct")
    pvm = edits(model)
    artifact = save_artifact(pvm, out / "artifact")
    baked = export_hf(artifact, model, out / "baked", tokenizer=tokenizer, overwrite=True)
    source = llama_cpp_source(args.llama_cpp)
    gguf_file = out / "baked-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py"), "NO_LOCAL_GGUF": ""}
    subprocess.run(
        [
            sys.executable,
            str(source / "convert_hf_to_gguf.py"),
            str(baked),
            "--outtype",
            "f32",
            "--outfile",
            str(gguf_file),
        ],
        check=True,
        env=env,
    )
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, logits_all=True, verbose=False)
    rows = []
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt).input_ids
            llm.reset()
            llm.eval(ids)
            theirs = torch.tensor(np.array(llm.scores[len(ids) - 1]), dtype=torch.float64)
            with torch.no_grad():
                plain = model(torch.tensor([ids])).logits[0, -1].double()
                edited = pvm({"input_ids": torch.tensor([ids])}, unit_locations=None)[1].logits[0, -1].double()
            rows.append(
                (
                    prompt.splitlines()[0][:40],
                    float((theirs - edited).abs().max()),
                    float((edited - plain).abs().max()),
                    int(theirs.argmax()) == int(edited.argmax()),
                )
            )
    finally:
        llm.close()
    info, ver = machine_info(), versions("torch", "transformers", "pyvene", "actedit", "llama_cpp_python")
    print(f"# machine: {info['cpu']}, {info['cores']} cores; " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    print(
        "| prompt | max abs logit diff, llama.cpp (baked, F32 GGUF) vs pyvene edit "
        "| the edit's own max change | same top token |"
    )
    print("|---|---|---|---|")
    for prompt, diff, effect, same in rows:
        print(f"| {prompt!r} | {diff:.2e} | {effect:.2f} | {same} |")


if __name__ == "__main__":
    main(sys.argv[1:])
