"""Soak: resident memory of one GuardedVLM over many requests (a script, not a pytest test).

    python tests/soak_memory.py --requests 1000 [--bundle DIR] [--max-new-tokens 4]

Without --bundle it builds the tiny random-weight guarded bundle first (`vlmguard tiny-model`
and `vlmguard export`, in child processes, so this process loads the runtime only). Requests
mix images of several sizes and text-only turns, greedy and seeded sampling, streaming and
two-row batches. RSS (psutil when installed, else VmRSS from /proc/self/status) is printed
every 100 requests after a garbage collection, then the growth from request 100 to the last.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = [
    "What is in this picture?",
    "Describe the colours and the shapes you can see here, please.",
    "Is there anything dangerous here?",
    "Write one short sentence about the sea.",
]


def rss_mib() -> float:
    """This process's resident set size in MiB."""
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no psutil and no /proc/self/status: cannot read RSS") from None
    return psutil.Process().memory_info().rss / 2**20


def build_tiny_bundle(root: Path) -> Path:
    """The tiny guarded bundle, built by the CLI in child processes."""
    source, bundle = root / "tiny", root / "bundle"
    for args in (["tiny-model", str(source)], ["export", str(source), "--out", str(bundle)]):
        cli = [sys.executable, "-c", "from vlmguard.cli import main; main()", *args]
        subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)
    return bundle


def images() -> list[Image.Image | None]:
    """Noise images of a few sizes, and None for text-only turns."""
    rng = np.random.default_rng(0)
    shapes = [(30, 40), (48, 64), (50, 20)]
    pictures = [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]
    return [*pictures, None]


def send(vlm: object, index: int, pictures: list, max_new: int) -> None:
    """One request, sent one of four ways."""
    image, prompt = pictures[index % len(pictures)], PROMPTS[index % len(PROMPTS)]
    way = index % 4
    if way == 0:
        vlm.generate(image, prompt, max_new_tokens=max_new)
    elif way == 1:
        from vlmguard.runtime.sampling import Sampling

        vlm.generate(image, prompt, max_new, Sampling(0.9, 40, seed=index))
    elif way == 2:
        stream = vlm.stream(image, prompt, max_new_tokens=max_new)
        "".join(stream)
    else:
        vlm.generate_batch([(image, prompt), (None, "Hello?")], max_new_tokens=max_new)


def main() -> int:
    """Run the soak and print the RSS figures; exit 1 past --max-growth-mib."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--bundle", type=Path, help="a bundle (default: build the tiny one)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--every", type=int, default=100, help="print RSS every N requests")
    parser.add_argument("--max-growth-mib", type=float, help="fail past this growth")
    args = parser.parse_args()
    if args.requests < 2 * args.every:
        parser.error("--requests must be at least twice --every")

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_tiny_bundle(Path(tmp))
        from vlmguard.runtime.guarded_vlm import GuardedVLM

        vlm = GuardedVLM.load(bundle, providers="cpu")
        pictures = images()
        print(f"bundle {bundle}; rss after load {rss_mib():.1f} MiB", flush=True)
        print(f"{'requests':>8}  {'rss_mib':>8}  {'seconds':>7}", flush=True)
        marks: dict[int, float] = {}
        started = time.perf_counter()
        for index in range(1, args.requests + 1):
            send(vlm, index, pictures, args.max_new_tokens)
            if index % args.every == 0:
                gc.collect()
                marks[index] = rss_mib()
                elapsed = time.perf_counter() - started
                print(f"{index:>8}  {marks[index]:>8.1f}  {elapsed:>7.1f}", flush=True)
    first, last = args.every, max(marks)
    growth = marks[last] - marks[first]
    per_request = growth * 1024 / (last - first)
    print(
        f"growth from request {first} to {last}: {growth:+.1f} MiB "
        f"({per_request:+.2f} KiB per request); peak {max(marks.values()):.1f} MiB"
    )
    if "torch" in sys.modules:
        print("note: torch was imported; the runtime should not need it")
    if args.max_growth_mib is not None and growth > args.max_growth_mib:
        print(f"FAIL: growth above {args.max_growth_mib} MiB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
