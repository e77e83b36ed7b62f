"""`editor bench engine`: the naive sampler loop against the fast engine (docs/engine.md).

A fill of `--tokens` masked positions in a `--context`-token canvas (one span in the middle of
random literal text), for each model, batch size and decoding mode:

- `naive`: the landed loop's shape of work, a full forward pass over the whole canvas at every
  step with float32 logits over the whole vocabulary at every position (the model is seen through
  a plain `DiffusionModel` view, so neither the cache nor position-only logits apply).
- `fast`: the same schedule with the key/value cache (no periodic refresh), logits only at masked
  positions and the step loop's single host read; `fast-rK`: the cache refreshed by a full pass
  every K steps (the sampler's default is K = 4).

`--quantize none,int8,fp8` runs each model with its blocks' linear weights stored that way
(editor/models/quantize.py; fp8 only on GPUs of compute capability 8.9+); the bytes counted for the
ceiling are the weights as stored, and under fp8 the FLOP peak is doubled (the tensor cores' dense
FP8 rate), though the head and attention stay in the model's dtype.

Models: `tiny` (the bundled one), `default-shape` (SmolLM2-135M's shape, random weights, until the
adapted default model is on main), `dream-7b` and `llada-8b` (their exact shapes, random weights,
built on the device in the benchmark dtype: no weights are needed). Random-weight models have flat
confidences, so the modes fix the tokens per step (`--steps`) rather than use a threshold.

The hardware ceiling for a step is max(FLOPs / peak FLOP/s, bytes / peak bandwidth) with the
counts printed: 2 x weights x tokens run for the linear layers and the head, 4 x window x keys x
width per layer for attention, and one read of the weights and of the cached keys/values.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from editor.benchmarks.options import schedule_options
from editor.chat import Instruction

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M (the default model's base), Dream-v0-7B (Qwen2.5-7B), LLaDA-8B: their published configs.
    "default-shape": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "intermediate_size": 1536,
        "rope_theta": 100000.0,
        "tie_embeddings": True,
        "shifted": True,
    },
    "dream-7b": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "num_layers": 28,
        "num_heads": 28,
        "num_kv_heads": 4,
        "intermediate_size": 18944,
        "rope_theta": 1e6,
        "qkv_bias": True,
        "shifted": True,
    },
    "llada-8b": {
        "vocab_size": 126464,
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 32,
        "intermediate_size": 12288,
        "rope_theta": 5e5,
        "shifted": False,
    },
}
# Dense bf16 tensor-core peak and HBM bandwidth of the accelerators we bench on (vendor figures).
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
FP8_FLOPS_FACTOR = 2.0  # Hopper's dense FP8 tensor-core rate over its bf16 rate (1,979 vs 989 TFLOP/s)


@dataclass
class Work:
    """What the model was asked to compute over a run, counted at the calls."""

    full_passes: int = 0
    windows: int = 0
    tokens_run: int = 0  # rows x positions through the layers
    tokens_scored: int = 0  # rows x positions through the output head
    attention_pairs: int = 0  # rows x queries x keys
    keys_read: int = 0  # rows x keys, once per pass


@dataclass
class Figure:
    model: str
    mode: str
    batch: int
    masked_tokens: int
    context: int
    steps: int
    tokens_per_step: float
    seconds: float
    tokens_per_s: float
    ms_per_step: float
    peak_memory_mb: float
    flops: float
    bytes: float
    ceiling_fraction: float | None
    extrapolated_from_steps: int | None = None
    quantize: str = "none"  # how the blocks' linear weights were stored (`--quantize`)
    weight_mb: float = 0.0  # the network's weights as stored in memory
    work: dict[str, int] = field(default_factory=dict)
    graph_replays: int = 0  # window steps of the timed run(s) replayed as CUDA graphs


class CountingModel:
    """A plain `DiffusionModel` view of a native model that counts the work of each call (the
    sampler finds no `score` on its class, so it runs the naive full pass)."""

    def __init__(self, model: Any, work: Work) -> None:
        self._model = model
        self.work = work
        self.name = model.name
        self.tokenizer = model.tokenizer
        self.special = model.special
        self.logits_shifted = model.logits_shifted
        self.vocab_size = model.vocab_size

    @property
    def device(self) -> Any:
        return self._model.device

    def frame(self, instruction: Instruction | None = None) -> tuple[list[int], list[int]]:
        return self._model.frame(instruction)

    def forward_logits(self, input_ids: Any, attention_mask: Any) -> Any:
        batch, length = input_ids.shape
        self.work.full_passes += 1
        self.work.tokens_run += batch * length
        self.work.tokens_scored += batch * length
        self.work.attention_pairs += batch * length * length
        self.work.keys_read += batch * length
        return self._model.forward_logits(input_ids, attention_mask)


class CountingWindowedModel(CountingModel):
    """The same with the fast interface (`WindowedModel`), counted too."""

    def score(self, input_ids: Any, attention_mask: Any, at: Any, *, keep_cache: bool) -> Any:
        batch, length = input_ids.shape
        self.work.full_passes += 1
        self.work.tokens_run += batch * length
        self.work.tokens_scored += at.numel()
        self.work.attention_pairs += batch * length * length
        self.work.keys_read += batch * length
        return self._model.score(input_ids, attention_mask, at, keep_cache=keep_cache)

    def score_window(self, cache: Any, input_ids: Any, window: Any, at: Any) -> Any:
        self.work.windows += 1
        self.work.tokens_run += window.numel()
        self.work.tokens_scored += at.numel()
        self.work.attention_pairs += window.numel() * input_ids.shape[1]
        self.work.keys_read += input_ids.numel()
        return self._model.score_window(cache, input_ids, window, at)


def _flops_and_bytes(network: Any, work: Work, dtype_bytes: int) -> tuple[float, float]:
    from editor.models.quantize import tensor_bytes, weight_bytes

    config = network.config
    head = config.vocab_size * config.hidden_size
    body = sum(p.numel() for name, p in network.named_parameters() if name.startswith("layers."))
    flops = 2.0 * body * work.tokens_run + 2.0 * head * work.tokens_scored
    flops += 4.0 * work.attention_pairs * config.hidden_size * config.num_layers
    passes = work.full_passes + work.windows
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes
    stored = weight_bytes(network.layers) + tensor_bytes(network.lm_head.weight)  # quantized: as stored
    weight_bytes_read = stored * passes  # every weight read once per pass
    return flops, float(weight_bytes_read + kv_bytes * work.keys_read)  # and every key/value once per pass


def _build(
    name: str, device: str, dtype_name: str, cuda_graphs: int, fuse: bool, quantize: str = "none"
) -> tuple[Any, Any]:
    """(model, network) for a bench model name, its linear weights stored as `quantize`."""
    import torch

    from editor.models.loading import load_model
    from editor.models.quantize import check_quantize

    dtype = getattr(torch, dtype_name)
    check_quantize(quantize, device, dtype)
    if name == "tiny":  # loaded as served: fused on CUDA
        bundled = load_model("tiny", device=device, dtype=dtype, cuda_graphs=cuda_graphs, quantize=quantize)
        return bundled, bundled.network  # type: ignore[attr-defined]
    bundled = load_model("tiny", device="cpu", dtype=dtype, cuda_graphs=0)  # its tokenizer only
    from editor.models.base import SpecialIds
    from editor.models.native import NativeDiffusionModel
    from editor.models.transformer import BidirectionalTransformer, TransformerConfig

    shape = dict(SHAPES[name])
    shifted = bool(shape.pop("shifted"))
    config = TransformerConfig(**shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = BidirectionalTransformer(config).eval()
            for parameter in network.parameters():
                parameter.data.mul_(0.5)  # keep random activations in range over many layers
            if fuse:
                network.fuse_projections()
    finally:
        torch.set_default_dtype(previous)
    special = SpecialIds(mask=config.vocab_size - 1, pad=0, bos=1, eos=0)
    model = NativeDiffusionModel(
        network,
        bundled.tokenizer,
        special,
        logits_shifted=shifted,
        name=f"{name} (random weights)",
        use_chat_template=False,
    )
    model.quantize_weights(quantize)  # after fusing, before the graphs (as `load_model` does)
    model.use_cuda_graphs(cuda_graphs)
    return model, network


class _OpenVocabulary:
    """Every token but the mask allowed: the vocabulary rules of an unconstrained span. Every other
    token counts as starting with a space and every tenth as ending with one, so the default
    `single_spaces` rule does its real work."""

    def __init__(self, vocab_size: int, mask: int) -> None:
        self.vocab_size, self.mask_id = vocab_size, mask

    def space_edges(self, device: Any) -> tuple[Any, Any]:
        import torch

        ids = torch.arange(self.vocab_size, device=device)
        return ids % 2 == 0, ids % 10 == 5

    def lettered(self, device: Any) -> Any:
        """Every token but punctuation (every tenth) has a letter, so the no-repeat rule does its work."""
        import torch

        return torch.arange(self.vocab_size, device=device) % 10 != 5

    def word_classes(self, device: Any) -> tuple[Any, Any]:
        """Pairs of ids spell one word (a spaced and an unspaced spelling), every tenth is punctuation."""
        import torch

        ids = torch.arange(self.vocab_size, device=device)
        spellings = torch.arange(0, self.vocab_size - 1, 2, device=device)[:, None] + torch.tensor(
            [0, 1], device=device
        )
        return torch.where(ids % 10 == 5, -1, ids // 2), spellings  # [V], [C, 2]

    def table(self, rules: list[Any], device: Any) -> Any:
        import torch

        allowed = torch.ones((len(rules), self.vocab_size), dtype=torch.bool, device=device)
        allowed[:, self.mask_id] = False
        return allowed


def _rows(batch: int, context: int, tokens: int, vocab: int, seed: int) -> list[Any]:
    import torch

    from editor.constraints import PositionRule
    from editor.sampler import Row

    generator = torch.Generator().manual_seed(seed)
    start = (context - tokens) // 2
    rows = []
    for _ in range(batch):
        ids = torch.randint(3, min(vocab, 8000), (context,), generator=generator).tolist()
        ids[0] = 1
        pinned = [not (start <= p < start + tokens) for p in range(context)]
        rows.append(Row(ids=ids, pinned=pinned, rules=[PositionRule()] * context))
    return rows


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(
    model: Any,
    network: Any,
    mode: str,
    batch: int,
    *,
    tokens: int,
    context: int,
    steps: int,
    device: str,
    dtype_bytes: int,
    peak: tuple[float, float] | None,
    max_steps: int | None,
    repeats: int,
    schedule: str,
    block_length: int,
    quantize: str = "none",
    no_repeat_ngram: int | None = None,
) -> Figure:
    import torch

    from editor.options import SamplerOptions
    from editor.sampler import SamplerRun

    refresh = int(mode.split("-r")[1]) if "-r" in mode else None  # `fast`: no periodic refresh
    options = SamplerOptions(
        steps=steps,
        seed=0,
        schedule=schedule,
        block_length=block_length,
        cache=mode != "naive",
        cache_refresh_every=refresh,
        **({} if no_repeat_ngram is None else {"no_repeat_ngram": no_repeat_ngram}),
    )
    vocabulary = _OpenVocabulary(network.config.vocab_size, model.special.mask)
    rows = _rows(batch, context, tokens, network.config.vocab_size, seed=batch)
    times, works, done_steps, replays = [], [], 0, 0
    graphs = getattr(model, "window_graphs", None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for attempt in range(repeats + 1 if repeats else 1):  # the first run warms up kernels and allocator
        work = Work()
        counted = CountingModel(model, work) if mode == "naive" else CountingWindowedModel(model, work)
        replays_before = 0 if graphs is None else graphs.replays
        with torch.inference_mode():
            _synchronize(device)
            started = time.perf_counter()
            run = SamplerRun(counted, rows, options, vocabulary)  # type: ignore[arg-type]
            while not run.finished and (max_steps is None or run.step_number < max_steps):
                run.step()
            _synchronize(device)
            elapsed = time.perf_counter() - started
        done_steps = run.step_number
        if attempt or not repeats:  # --repeats 0: the one (cold) run is the figure
            times.append(elapsed)
            works.append(work)
            replays += 0 if graphs is None else graphs.replays - replays_before
    seconds = statistics.median(times)
    full_steps = max(1, min(steps, tokens))
    extrapolated = done_steps if done_steps < full_steps else None
    seconds_full = seconds * full_steps / done_steps
    work = works[0]
    scale = full_steps / done_steps
    flops, moved = _flops_and_bytes(network, work, dtype_bytes)
    flops, moved = flops * scale, moved * scale
    ceiling = None if peak is None else max(flops / peak[0], moved / peak[1]) / seconds_full
    if device.startswith("cuda"):
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Figure(
        model=model.name,
        mode=mode,
        batch=batch,
        masked_tokens=tokens,
        context=context,
        steps=full_steps,
        tokens_per_step=tokens / full_steps,
        seconds=round(seconds_full, 4),
        tokens_per_s=round(batch * tokens / seconds_full, 1),
        ms_per_step=round(1000 * seconds_full / full_steps, 3),
        peak_memory_mb=round(memory, 1),
        flops=flops,
        bytes=moved,
        ceiling_fraction=None if ceiling is None else round(ceiling, 4),
        extrapolated_from_steps=extrapolated,
        quantize=quantize,
        weight_mb=round(model.weight_bytes / 2**20, 1),
        work=asdict(work),
        graph_replays=replays,
    )


def _peak(
    device: str, dtype: Any, override_flops: float | None, override_bandwidth: float | None
) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) assumed for the ceiling; on the CPU a measured GEMM rate in the run's dtype."""
    import torch

    if override_flops and override_bandwidth:
        return override_flops, override_bandwidth
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        return next((peaks for key, peaks in PEAKS.items() if key in name), None)
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a
    started = time.perf_counter()
    for _ in range(5):
        a @ a
    gemm = 5 * 2 * 1024**3 / (time.perf_counter() - started)
    return gemm, override_bandwidth or 20e9  # bandwidth: a typical figure for a small cloud VM


@click.command("engine")
@click.option("--model", "models", multiple=True, default=["tiny"], help="tiny, default-shape, dream-7b, llada-8b")
@click.option("--device", default="cpu", help="cpu or cuda")
@click.option("--dtype", "dtype_name", default=None, help="float32 or bfloat16 [default: the device's, as served]")
@click.option("--batch", "batches", default="1,8,16", help="comma-separated batch sizes")
@click.option("--tokens", default=256, help="masked tokens per row")
@click.option("--context", default=512, help="canvas length")
@click.option("--tokens-per-step", "per_step", default="1,4", help="comma-separated; steps = tokens / this")
@click.option("--naive-batches", default="1", help="batch sizes at which the naive loop is also run")
@click.option("--refresh", default="", help="comma-separated k: also run the cache refreshed every k steps")
@click.option("--naive-max-steps", default=None, type=int, help="time this many naive steps and extrapolate")
@schedule_options
@click.option("--repeats", default=1, help="timed runs after one warm-up (median); 0: one cold run")
@click.option("--peak-flops", default=None, type=float, help="override the assumed FLOP/s")
@click.option("--peak-bandwidth", default=None, type=float, help="override the assumed bytes/s")
@click.option("--threads", default=None, type=int, help="torch CPU threads [default: torch's choice]")
@click.option(
    "--cuda-graphs", default=None, type=int, help="CUDA graphs kept per model; 0: none [default: EDITOR_CUDA_GRAPHS]"
)
@click.option(
    "--quantize",
    "quantizations",
    default="none",
    help="comma-separated: none, int8, fp8 (each model built once per setting; fp8: GPUs of compute capability 8.9+)",
)
@click.option(
    "--no-repeat-ngram",
    default=None,
    type=click.IntRange(min=0, max=8),
    help="the sampler's no_repeat_ngram (0: off) [default: the sampler's default]",
)
@click.option("--no-fuse", is_flag=True, help="keep q/k/v and gate/up unfused (random-weight models; as served: fused)")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="write all figures here")
def engine(
    models: tuple[str, ...],
    device: str,
    dtype_name: str | None,
    batches: str,
    tokens: int,
    context: int,
    per_step: str,
    naive_batches: str,
    refresh: str,
    naive_max_steps: int | None,
    repeats: int,
    schedule: str,
    block_length: int,
    peak_flops: float | None,
    peak_bandwidth: float | None,
    threads: int | None,
    cuda_graphs: int | None,
    quantizations: str,
    no_repeat_ngram: int | None,
    no_fuse: bool,
    json_path: str | None,
) -> None:
    """Naive loop vs fast engine: tokens/s, ms/step, tokens/step, peak memory, ceiling fraction."""
    import torch

    from editor.models.native import default_dtype, dtype_text
    from editor.models.quantize import QUANTIZE_CHOICES, QuantizeError
    from editor.settings import Settings

    if threads:
        torch.set_num_threads(threads)
    if cuda_graphs is None:
        cuda_graphs = Settings().cuda_graphs
    settings_to_run = [q.strip() for q in quantizations.split(",") if q.strip()]
    for quantize in settings_to_run:
        if quantize not in QUANTIZE_CHOICES:
            raise click.BadParameter(
                f"{quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}", param_hint="--quantize"
            )

    dtype_name = dtype_name or dtype_text(default_dtype(device, None))
    dtype_bytes = torch.tensor([], dtype=getattr(torch, dtype_name)).element_size()
    peak = _peak(device, getattr(torch, dtype_name), peak_flops, peak_bandwidth)
    figures: list[Figure] = []
    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    click.echo(
        f"device {device} ({hardware}), {dtype_name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{tokens} masked tokens in a {context}-token canvas; {schedule} schedule"
        + (f", blocks of {block_length}" if schedule == "blocks" else "")
    )
    if peak is not None:
        click.echo(f"ceiling assumes {peak[0] / 1e12:.1f} TFLOP/s and {peak[1] / 1e9:.0f} GB/s")
    click.echo(
        f"{'model':28} {'weights':7} {'mode':7} {'batch':>5} {'tok/step':>8} {'steps':>5} {'tok/s':>9} {'ms/step':>8} "
        f"{'peak MB':>8} {'TFLOP':>8} {'GB':>8} {'ceiling':>7}"
    )
    for name, quantize in [(name, quantize) for name in models for quantize in settings_to_run]:
        try:
            model, network = _build(name, device, dtype_name, cuda_graphs, fuse=not no_fuse, quantize=quantize)
        except QuantizeError as error:
            raise click.ClickException(str(error)) from error
        fp8_peak = peak if peak is None or quantize != "fp8" else (peak[0] * FP8_FLOPS_FACTOR, peak[1])
        for rate in [int(r) for r in per_step.split(",")]:
            steps = max(1, tokens // rate)
            for batch in [int(b) for b in batches.split(",")]:
                modes = ["naive", "fast"] if str(batch) in naive_batches.split(",") else ["fast"]
                modes += [f"fast-r{k}" for k in refresh.split(",") if k]
                for mode in modes:
                    figure = _measure(
                        model,
                        network,
                        mode,
                        batch,
                        tokens=tokens,
                        context=context,
                        steps=steps,
                        device=device,
                        dtype_bytes=dtype_bytes,
                        peak=fp8_peak,
                        max_steps=naive_max_steps if mode == "naive" else None,
                        repeats=repeats,
                        schedule=schedule,
                        block_length=block_length,
                        quantize=quantize,
                        no_repeat_ngram=no_repeat_ngram,
                    )
                    figures.append(figure)
                    ceiling = "-" if figure.ceiling_fraction is None else f"{figure.ceiling_fraction:.0%}"
                    click.echo(
                        f"{figure.model[:28]:28} {quantize:7} {mode:7} {batch:>5} {figure.tokens_per_step:>8.2f} "
                        f"{figure.steps:>5} {figure.tokens_per_s:>9.1f} {figure.ms_per_step:>8.2f} "
                        f"{figure.peak_memory_mb:>8.0f} {figure.flops / 1e12:>8.2f} {figure.bytes / 1e9:>8.2f} "
                        f"{ceiling:>7}"
                    )
        del model, network
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if json_path:
        payload = {
            "benchmark": "engine",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
            "dtype": dtype_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "schedule": schedule,
            "block_length": block_length if schedule == "blocks" else None,
            "cuda_graphs": cuda_graphs if device.startswith("cuda") else 0,
            "fused_projections": not no_fuse,
            "no_repeat_ngram": no_repeat_ngram,
            "assumed_peak_flops": None if peak is None else peak[0],
            "assumed_peak_bandwidth": None if peak is None else peak[1],
            "figures": [asdict(f) for f in figures],
        }
        Path(json_path).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        click.echo(f"wrote {json_path}")


__all__ = ["engine"]
