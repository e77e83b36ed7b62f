"""CUDA graphs for the cached window step (docs/engine.md, "CUDA graphs").

At batch 1 a window step of a large model is bound by the host, not the GPU: some 15 kernels per
layer launched one by one from Python. A CUDA graph replays the whole step in one launch. A graph
holds fixed shapes and fixed addresses, so:

- widths are bucketed: the window (W positions) and the scored positions (M) are padded up to a
  bucket by repeating their first column. A repeated window position computes exactly what the
  original does and writes the same keys/values, and the logits of repeated scored positions are
  cut off, so padding changes nothing but the work;
- the keys/values live in one static slab per (batch, canvas length). The cache being run is bound
  to it: copied in once, then its `layers` are the slab's tensors, updated in place by each replay.
  A second cache bound to the same slab (another sampler run of the same shape) first hands the
  slab's contents back to the previous owner as its own copy, so neither sees the other's writes;
- a shape is captured the second time it is seen, so a shape that occurs once (a batch that
  changes at the next step) costs no capture. At most `max_graphs` graphs are kept, least recently
  used dropped first; their memory comes from one shared pool;
- a slab is as large as one run's cache (for a 7B model, 8 rows of 4,096 positions: ~2 GB), so at
  most `max_slabs` (batch, canvas length) shapes keep one; the least recently used goes, with its
  graphs;
- a graph ends at the final norm of the scored positions ([B, M, C]); the output head runs after
  the replay, so no graph holds a [B, M, vocabulary] logits buffer of its own.

`capture=False` runs the same bucketing, slab binding and padding eagerly (no CUDA needed): that is
how the CPU tests check that a graphed run fills exactly what an unpadded one does.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from editor.models.base import CanvasCache
from editor.models.transformer import KV, BidirectionalTransformer

DEFAULT_MAX_GRAPHS = 48
DEFAULT_MAX_SLABS = 4
SEEN_LIMIT = 4096  # shapes remembered as seen once; forgotten all at once beyond this
MIN_BUCKET = 8


def bucket(width: int) -> int:
    """The padded width for `width`: a multiple of a quarter of its power of two (at least 8), so
    padding wastes at most a quarter, and a whole fill meets about four buckets per octave."""
    if width <= MIN_BUCKET:
        return MIN_BUCKET
    step = max(MIN_BUCKET, (1 << (width.bit_length() - 1)) // 4)
    return -(-width // step) * step


def pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """[B, w] -> [B, width] by repeating the first column."""
    extra = width - values.shape[1]
    if extra <= 0:
        return values
    return torch.cat([values, values[:, :1].expand(-1, extra)], dim=1)


GraphKey = tuple[int, int, int, int, bool]  # batch, canvas length, window bucket, scored bucket, padded


@dataclass
class _Slab:
    """Static keys/values per layer [B, Hkv, L, D], and the cache bound to them."""

    layers: list[KV]
    owner: weakref.ref[CanvasCache] | None = None


@dataclass
class _Graph:
    """One captured window step: its static inputs and output, and how to replay it."""

    ids: torch.Tensor  # [B, Wb] tokens at the window positions
    window: torch.Tensor  # [B, Wb] canvas positions
    positions: torch.Tensor  # [B, Wb] rotary positions
    hidden_at: torch.Tensor  # [B, Mb] window indices to score
    attention: torch.Tensor | None  # [B, L] bool, or None for an unpadded batch
    replay: Callable[[], torch.Tensor]  # -> final-normed hidden states [B, Mb, C]


class WindowGraphs:
    """Captured window steps of one network (owned by the one worker that owns the model)."""

    def __init__(
        self,
        network: BidirectionalTransformer,
        *,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        max_slabs: int = DEFAULT_MAX_SLABS,
        capture: bool = True,
    ):
        self.network = network
        self.max_graphs = max_graphs
        self.max_slabs = max(1, max_slabs)
        self.capture = capture
        self._graphs: OrderedDict[GraphKey, _Graph] = OrderedDict()
        self._slabs: OrderedDict[tuple[int, int], _Slab] = OrderedDict()
        self._seen: set[GraphKey] = set()
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0  # graphs captured so far (for the benchmark and the tests)
        self.replays = 0

    def run(
        self,
        cache: CanvasCache,
        ids: torch.Tensor,  # [B, W] tokens at the window positions
        window: torch.Tensor,  # [B, W] canvas positions
        positions: torch.Tensor,  # [B, W] rotary positions
        hidden_at: torch.Tensor,  # [B, M] window indices to score
    ) -> torch.Tensor | None:
        """Logits [B, M, V] from a graphed window step, or None when this shape runs eagerly (the
        first time it is seen): the caller then runs `forward_window` itself."""
        if self.max_graphs <= 0:
            return None
        with torch.inference_mode():  # static buffers are inference tensors: keep every caller in the mode
            return self._run(cache, ids, window, positions, hidden_at)

    def _run(
        self,
        cache: CanvasCache,
        ids: torch.Tensor,
        window: torch.Tensor,
        positions: torch.Tensor,
        hidden_at: torch.Tensor,
    ) -> torch.Tensor | None:
        batch, width = window.shape
        length = cache.layers[0][0].shape[2]
        scored = hidden_at.shape[1]
        key = (batch, length, bucket(width), bucket(scored), cache.attention is not None)
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._seen:
                if len(self._seen) >= SEEN_LIMIT:
                    self._seen.clear()
                self._seen.add(key)
                return None
            graph = self._capture(key, cache, ids, window, positions, hidden_at)
        else:
            self._graphs.move_to_end(key)
            self._bind(cache, self._slab(cache))
        graph.ids.copy_(pad_columns(ids, key[2]))
        graph.window.copy_(pad_columns(window, key[2]))
        graph.positions.copy_(pad_columns(positions, key[2]))
        graph.hidden_at.copy_(pad_columns(hidden_at, key[3]))
        if graph.attention is not None:
            assert cache.attention is not None
            graph.attention.copy_(cache.attention)
        self.replays += 1
        hidden = graph.replay()[:, :scored]  # [B, M, C]
        return self.network.lm_head(hidden)  # [B, M, V]

    def _slab(self, cache: CanvasCache) -> _Slab:
        first = cache.layers[0][0]
        slab_key = (first.shape[0], first.shape[2])
        slab = self._slabs.get(slab_key)
        if slab is not None:
            self._slabs.move_to_end(slab_key)
            return slab
        while len(self._slabs) >= self.max_slabs:
            self._drop_slab(next(iter(self._slabs)))
        slab = self._slabs[slab_key] = _Slab([(torch.empty_like(k), torch.empty_like(v)) for k, v in cache.layers])
        return slab

    def _drop_slab(self, slab_key: tuple[int, int]) -> None:
        """Forget a slab and its graphs (a cache still bound to it keeps its tensors alive)."""
        for key in [key for key in self._graphs if key[:2] == slab_key]:
            del self._graphs[key]
        del self._slabs[slab_key]

    @staticmethod
    def _bind(cache: CanvasCache, slab: _Slab) -> None:
        """Make `cache` run on the slab's tensors (copying its keys/values in), unless it already does."""
        if cache.layers[0][0] is slab.layers[0][0]:
            return
        previous = slab.owner() if slab.owner is not None else None
        if previous is not None and previous is not cache and previous.layers[0][0] is slab.layers[0][0]:
            previous.layers = [(k.clone(), v.clone()) for k, v in slab.layers]  # evicted: its own copy
        for (static_k, static_v), (k, v) in zip(slab.layers, cache.layers, strict=True):
            static_k.copy_(k)
            static_v.copy_(v)
        cache.layers = list(slab.layers)
        slab.owner = weakref.ref(cache)

    def _capture(
        self,
        key: GraphKey,
        cache: CanvasCache,
        ids: torch.Tensor,
        window: torch.Tensor,
        positions: torch.Tensor,
        hidden_at: torch.Tensor,
    ) -> _Graph:
        slab = self._slab(cache)
        self._bind(cache, slab)
        _, _, window_width, scored_width, _ = key
        # Static inputs hold this step's real values, so the warm-up run below writes exactly the
        # keys/values the replay will write again.
        ids = pad_columns(ids, window_width).clone()
        window = pad_columns(window, window_width).clone()
        positions = pad_columns(positions, window_width).clone()
        hidden_at = pad_columns(hidden_at, scored_width).clone()
        attention = None if cache.attention is None else cache.attention.clone()

        def step() -> torch.Tensor:
            return self.network.forward_window(
                slab.layers, ids, window, positions, attention, hidden_at=hidden_at, logits=False
            )

        replay: Callable[[], torch.Tensor] = step
        if self.capture:
            # Warm up on a side stream (lazy tables, kernel choices, allocator), then capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                hidden = step()

            def replay_graph() -> torch.Tensor:
                graph.replay()
                return hidden

            replay = replay_graph
        self._graphs[key] = _Graph(ids, window, positions, hidden_at, attention, replay)
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return self._graphs[key]

    def clear(self) -> None:
        self._graphs.clear()
        self._slabs.clear()
        self._seen.clear()


__all__ = ["DEFAULT_MAX_GRAPHS", "DEFAULT_MAX_SLABS", "WindowGraphs", "bucket", "pad_columns"]
