"""`vlmguard bench`: stage latencies, guard cost, peers and the roofline, as a table and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from vlmguard.cli_support import providers_option
from vlmguard.errors import require_extra
from vlmguard.manifest import Manifest

BENCH_SCHEMA = 1


def _ratio_to_peer(ours: dict, peer: dict) -> dict[str, float]:
    """How much faster we are than a peer (>1: faster): TTFT, end to end, decode tokens/s."""
    return {
        "ttft_speedup": peer["ttft"]["p50"] / ours["ttft"]["p50"],
        "end_to_end_speedup": peer["end_to_end"]["p50"] / ours["end_to_end"]["p50"],
        "decode_speedup": ours["decode_tokens_per_s"] / peer["decode_tokens_per_s"],
    }


def _source_key(source: str | None) -> str:
    """A folder name for one checkpoint's peer builds (distinct for distinct paths or ids)."""
    import hashlib

    resolved = str(Path(source).resolve()) if source and Path(source).exists() else str(source)
    return f"{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:10]}"


def _bandwidth(on_gpu: bool) -> float | None:
    """Copy bandwidth of the memory the decoder's weights live in (device or host)."""
    from vlmguard.runtime.bench_env import device_copy_bandwidth, host_copy_bandwidth

    if not on_gpu:
        return host_copy_bandwidth()
    measured = device_copy_bandwidth()
    if measured is None:
        try:
            from vlmguard.export.bench_peers import torch_device_bandwidth

            measured = torch_device_bandwidth()
        except ImportError:
            measured = None
    return measured


def _same_source(a: str | None, b: str | None) -> bool:
    """Whether two manifests' `source` name one checkpoint (paths compared resolved)."""
    if a is None or b is None:
        return a == b
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return os.path.normpath(a) == os.path.normpath(b)


def check_baseline(manifest: Manifest, baseline: Path) -> None:
    """Refuse a --baseline bundle that is not an export of the same model (shapes, source)."""
    from vlmguard.errors import UsageError

    other = Manifest.read(baseline)
    mismatch = [key for key in ("model", "dtype") if getattr(manifest, key) != getattr(other, key)]
    if not _same_source(manifest.source, other.source):
        mismatch.append("source")
    if mismatch:
        detail = {
            "model": "model shapes",
            "dtype": f"dtype {other.dtype} vs {manifest.dtype}",
            "source": f"source {other.source!r} vs {manifest.source!r}",
        }
        raise UsageError(
            f"--baseline {baseline} is not an export of the bundle's model (other "
            f"{', '.join(detail[key] for key in mismatch)}); export the baseline from the same "
            "checkpoint: vlmguard export SOURCE --out BASELINE --defenses none"
        )


def run_bench(
    bundle: Path,
    settings: object,
    providers: list[str] | str | None,
    policy: object,
    baseline: Path | None,
    source: str | None,
    vs_torch: bool,
    vs_genai: bool,
    workdir: Path,
    on_step: object = lambda step: None,
) -> dict:
    """Measure one bundle (and its baseline and peers) and return the JSON record."""
    from vlmguard.runtime.bench import bench_bundle, ratios, time_requests
    from vlmguard.runtime.bench_env import device_memory_mib, environment, peak_host_mib, roofline
    from vlmguard.runtime.guarded_vlm import GuardedVLM
    from vlmguard.runtime.policy import GuardPolicy

    result = bench_bundle(bundle, settings, providers, policy, on_step)
    guarded = result["guarded"]
    record = {
        "schema": BENCH_SCHEMA,
        "environment": environment(result["providers_used"]),
        **result,
        "stages": guarded["stages"],
        "end_to_end": guarded["end_to_end"],
        "ttft": guarded["ttft"],
        "decode_tokens_per_s": guarded["decode_tokens_per_s"],
    }
    variants = result["detector_variants"]
    if "p50" in variants.get("int8", {}) and "p50" in variants.get("fp32", {}):
        record["detector_int8_over_fp32"] = variants["int8"]["p50"] / variants["fp32"]["p50"]
    if baseline is not None:
        on_step(f"timing the unguarded baseline {baseline}")
        plain_vlm = GuardedVLM.load(baseline, providers=providers, policy=GuardPolicy.neutral())
        plain = time_requests(plain_vlm, settings)
        record["baseline"] = {"bundle": str(baseline), **plain}
        record["graph_ratio"] = ratios(result["neutral"], plain)
        record["guarded_over_baseline"] = ratios(guarded, plain)
    on_gpu = result["providers_used"]["decoder"][0] != "CPUExecutionProvider"
    record["memory"] = {"peak_host_mib": peak_host_mib(), "device_mib": device_memory_mib()}
    on_step("measuring memory bandwidth for the roofline")
    manifest = Manifest.read(bundle)
    context = result["prefill_tokens"] + settings.new_tokens // 2
    record["roofline"] = roofline(
        manifest, context, guarded["decode_tokens_per_s"], _bandwidth(on_gpu),
        "device" if on_gpu else "host",
    )  # fmt: skip
    record["roofline_fraction"] = record["roofline"]["fraction"]
    record["peers"] = _peers(record, settings, source, vs_torch, vs_genai, workdir, on_gpu, on_step)
    return record


def _peers(
    record: dict,
    settings: object,
    source: str | None,
    vs_torch: bool,
    vs_genai: bool,
    workdir: Path,
    on_gpu: bool,
    on_step: object,
) -> dict:
    """Each asked-for peer's figures and our speedup over it (or why it could not run)."""
    from vlmguard.errors import VlmguardError

    peers: dict[str, dict] = {}
    if not (vs_torch or vs_genai):
        return peers
    from vlmguard.export import bench_peers
    from vlmguard.runtime.bench import bench_image

    image = bench_image(settings.image_size)
    runs = {"runs": settings.runs, "warmup": settings.warmup}
    jobs = []
    if vs_torch:
        jobs.append(("torch_eager", lambda: bench_peers.torch_peer(
            source, image, record["prompt"], settings.new_tokens, **runs,
            device="cuda" if on_gpu else "cpu")))  # fmt: skip
    if vs_genai:
        jobs.append(("onnxruntime_genai", lambda: bench_peers.genai_peer(
            source, workdir, record["prefill_tokens"], settings.new_tokens, **runs,
            device="cuda" if on_gpu else "cpu")))  # fmt: skip
    for name, job in jobs:
        on_step(f"timing the peer {name}")
        try:
            figures = job()
        except (VlmguardError, OSError) as err:
            peers[name] = {"error": str(err).splitlines()[0]}
            continue
        peers[name] = {
            **figures,
            "ours_guarded": _ratio_to_peer(record["guarded"], figures),
            "ours_neutral": _ratio_to_peer(record["neutral"], figures),
        }
    return peers


def _figures(run: dict, name: str) -> dict | None:
    """A run's percentiles for a stage, or for `ttft` / `end_to_end` (None if it has none)."""
    return run["stages"].get(name) or run.get(name)


def print_bench(record: dict, console: object) -> None:
    """The human summary: stage table, ratios, peers, roofline."""
    from rich.table import Table

    # No box, headers on two lines: the table fits 80 columns with nothing cut.
    table = Table(
        title=f"vlmguard bench: {record['bundle']}", box=None, header_style="bold", pad_edge=False
    )
    table.add_column("stage", no_wrap=True)
    columns = ["guarded\np50", "\np90", "\np99", "neutral\np50", "guard\nratio"]
    has_base = "baseline" in record
    if has_base:
        columns += ["unguarded\nexport p50", "guarded /\nunguarded"]
    for column in columns:
        table.add_column(column, justify="right")
    names = [*record["guarded"]["stages"], "ttft", "end_to_end"]
    for name in names:
        figures = _figures(record["guarded"], name)
        neutral = _figures(record["neutral"], name)
        ratio = record["guard_ratio"].get(name)
        row = [name, *(f"{figures[p]:.2f}" for p in ("p50", "p90", "p99"))]
        row += [f"{neutral['p50']:.2f}" if neutral else "-", f"{ratio:.3f}" if ratio else "-"]
        if has_base:
            base = _figures(record["baseline"], name)
            over = record["guarded_over_baseline"].get(name)
            row += [f"{base['p50']:.2f}" if base else "-", f"{over:.3f}" if over else "-"]
        table.add_row(*row)
    console.print(table)
    base = f", unguarded export {record['baseline']['decode_tokens_per_s']:.1f}" if has_base else ""
    console.print(
        f"decode: guarded {record['guarded']['decode_tokens_per_s']:.1f} tokens/s, neutral "
        f"{record['neutral']['decode_tokens_per_s']:.1f}{base}; guarded/neutral decode time "
        f"per token {record['guard_ratio']['decode_time_per_token']:.3f}"
    )
    if "detector_int8_over_fp32" in record:
        console.print(f"detector int8 / fp32 time: {record['detector_int8_over_fp32']:.2f}")
    roof = record["roofline"]
    if roof["fraction"] is not None:
        console.print(
            f"roofline: {(roof['weight_bytes_per_token'] + roof['kv_bytes_per_token']) / 1e6:.1f}"
            f" MB per token at {roof['copy_bandwidth_gb_s']:.1f} GB/s ({roof['memory']}) allows "
            f"{roof['roofline_tokens_per_s']:.1f} tokens/s; measured {roof['fraction']:.1%} of it"
        )
    for name, peer in record["peers"].items():
        if "error" in peer:
            console.print(f"peer {name}: not measured ({peer['error']})")
            continue
        speed = peer["ours_guarded"]
        console.print(
            f"peer {name}: decode {peer['decode_tokens_per_s']:.1f} tokens/s, TTFT "
            f"{peer['ttft']['p50']:.1f} ms; ours guarded is x{speed['decode_speedup']:.2f} on "
            f"decode, x{speed['ttft_speedup']:.2f} on TTFT"
        )
    memory = record["memory"]
    device = f", device {memory['device_mib']:.0f} MiB" if memory["device_mib"] else ""
    console.print(f"peak host memory {memory['peak_host_mib']:.0f} MiB{device}")


def plot_bench(record: dict, out: Path) -> None:
    """A bar chart of p50 per stage (guarded, neutral, unguarded export) and peers' decode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        from vlmguard.errors import VlmguardError

        raise VlmguardError("--plot needs matplotlib: pip install 'vlmguard[plot]'") from err
    runs = {"guarded": record["guarded"], "neutral": record["neutral"]}
    if "baseline" in record:
        runs["unguarded export"] = record["baseline"]
    stages = [*record["guarded"]["stages"], "ttft", "end_to_end"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(runs)
    for i, (name, run) in enumerate(runs.items()):
        values = [(_figures(run, s) or {"p50": 0})["p50"] for s in stages]
        left.barh([y + i * width for y in range(len(stages))], values, width, label=name)
    left.set_yticks([y + width for y in range(len(stages))], stages)
    left.set_xscale("log")
    left.set_xlabel("p50 ms (log)")
    left.legend()
    decode = {name: run["decode_tokens_per_s"] for name, run in runs.items()}
    decode |= {
        name: peer["decode_tokens_per_s"]
        for name, peer in record["peers"].items()
        if "decode_tokens_per_s" in peer
    }
    right.bar(list(decode), list(decode.values()))
    right.set_ylabel("decode tokens/s")
    right.tick_params(axis="x", rotation=20)
    figure.suptitle(f"{Path(record['bundle']).name}: {record['environment']['cpu']}")
    figure.tight_layout()
    figure.savefig(out, dpi=120)


@click.command("bench")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--model-shape", type=click.Choice(["tiny", "small"]),
              help="Build the random reference model of this shape (and its plain and guarded "
                   "bundles) and bench it; `small` is SmolVLM-256M-shaped.")  # fmt: skip
@providers_option
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(exists=True, path_type=Path),
    help="Policy JSON for the guarded runs (default: the bundle's own, else defaults).",
)
@click.option(
    "--baseline",
    type=click.Path(path_type=Path),
    help="An unguarded export of the same model (`--defenses none`) to time against.",
)
@click.option("--prompt-tokens", default=64, show_default=True, help="Tokens of user text.")
@click.option(
    "--max-new-tokens",
    "new_tokens",
    default=32,
    show_default=True,
    help="Answer length: tokens decoded per request (end of text is ignored).",
)
@click.option(
    "--new-tokens",
    "old_new_tokens",
    type=int,
    default=None,
    hidden=True,
    help="Old name of --max-new-tokens.",
)
@click.option("--image-size", default=336, show_default=True, help="Side of the input image.")
@click.option("--runs", default=10, show_default=True, help="Timed requests per configuration.")
@click.option("--warmup", default=2, show_default=True, help="Untimed requests first.")
@click.option(
    "--vs-torch",
    "vs_torch",
    metavar="SOURCE",
    help="Also time transformers' eager generate on this checkpoint (needs [export]); "
    "'auto': the --model-shape checkpoint or the one the bundle was exported from.",
)
@click.option(
    "--vs-genai",
    is_flag=True,
    help="Also time onnxruntime-genai on the same language model, built from the "
    "--vs-torch SOURCE (or as 'auto' finds it).",
)
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Where reference models and peer builds are kept (default ~/.cache/vlmguard/"
                   "bench).")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the JSON here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), help="Write a PNG chart.")
def bench_command(
    bundle: Path | None,
    model_shape: str | None,
    providers: str | None,
    policy_file: Path | None,
    baseline: Path | None,
    prompt_tokens: int,
    new_tokens: int,
    old_new_tokens: int | None,
    image_size: int,
    runs: int,
    warmup: int,
    vs_torch: str | None,
    vs_genai: bool,
    workdir: Path | None,
    json_out: Path | None,
    plot_out: Path | None,
) -> None:
    """Time each stage of a bundle's request path, guarded vs neutral, with peers and roofline.

    Stages (p50/p90/p99 ms over --runs requests): preprocess, tokenize, detector,
    vision_encoder, prefill, decode; plus time to first token, end to end and decode tokens/s.
    Every figure is measured side by side in this one process; compare ratios, not absolute
    times across machines.
    """
    from rich.console import Console

    from vlmguard.errors import VlmguardError
    from vlmguard.runtime.bench import BenchSettings
    from vlmguard.runtime.policy import GuardPolicy

    console = Console(stderr=True)
    if old_new_tokens is not None:
        new_tokens = old_new_tokens
    settings = BenchSettings(prompt_tokens, new_tokens, image_size, runs, warmup)
    settings.validate()
    if (bundle is None) == (model_shape is None):
        raise click.UsageError("give either a BUNDLE or --model-shape tiny|small")
    if model_shape is not None or vs_torch or vs_genai:
        require_extra("export")  # the reference build and the peers run torch
        from vlmguard.quiet import quiet_offline_tools

        quiet_offline_tools()  # no "Loading weights" bars under our progress lines
    if plot_out is not None:
        require_extra("plot")  # before the run, not after it
    if workdir is None:
        from vlmguard.export.bench_peers import BENCH_CACHE

        workdir = BENCH_CACHE
    source = None if vs_torch == "auto" else vs_torch
    if source is not None:
        from vlmguard.export.source import resolve_source

        resolve_source(source)  # a peer that cannot be found is an error, not "not measured"
    if model_shape is not None:
        from vlmguard.export.bench_peers import build_reference

        paths = build_reference(model_shape, workdir, lambda step: console.print(f"· {step}"))
        bundle, baseline = paths["guarded"], baseline or paths["plain"]
        source = source or str(paths["checkpoint"])
    manifest = Manifest.read(bundle)
    if baseline is not None:
        check_baseline(manifest, baseline)
    if (vs_torch or vs_genai) and source is None:
        source = manifest.source
        if not source or not Path(source).exists():
            raise VlmguardError(
                f"the peers need the checkpoint the bundle came from ({source!r} is not here): "
                "give --vs-torch SOURCE"
            )
    policy = GuardPolicy.load(policy_file) if policy_file else None
    record = run_bench(
        bundle, settings, providers, policy, baseline, source, bool(vs_torch), vs_genai,
        workdir / "peers" / _source_key(source),
        lambda step: console.print(f"· {step}"),
    )  # fmt: skip
    print_bench(record, Console())
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(record, indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if plot_out is not None:
        plot_out.parent.mkdir(parents=True, exist_ok=True)
        plot_bench(record, plot_out)
        console.print(f"wrote {plot_out}")
