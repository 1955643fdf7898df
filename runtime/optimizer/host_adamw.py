"""AdamW with its fp32 state in host memory: the update on the CPU, or on the GPU over streamed chunks.

``HostAdamState`` keeps the fp32 master weights and both Adam moments of the pieces one rank owns
(zero_adamw.py; with ZeRO-1 only this rank's part) in three flat page-locked host buffers, in piece
order, so a chunk of the owned range is one contiguous slice of each. A step walks the owned range
in chunks of ``chunk_numel`` elements, in one of two ways:

- ``cpu``: the chunk's gradients are copied, in their own dtype, to a page-locked staging buffer
  (side stream) and widened to fp32 there when they are low precision; AdamW runs on the CPU
  (torch's fused CPU kernel, one pass over master, moments and gradient), and the new parameter
  values, cast on the CPU, are copied back (another side stream). The copy of chunk i+1's
  gradients and of chunk i-1's parameters overlap the CPU work on chunk i.
- ``gpu``: the chunk's master and moments are copied to a device staging buffer, AdamW runs on the
  GPU with fp32 gradients in place (low-precision ones widened into a chunk-sized buffer), the
  parameter is written from the device master, and master and moments are copied back.
  Host-to-device copies of chunk i+1 and device-to-host copies of chunk i-1 overlap the update of
  chunk i (two staging buffers, one copy stream per direction).

``choose_update_device`` times both on the real buffers (a zero-gradient, zero-lr step of the first
chunks, which leaves freshly initialised state unchanged) and returns the faster. Without CUDA the
same code runs with host memory on both sides and no streams.

Both ways compute torch.optim.AdamW's update (``torch.optim.adamw.adamw``). A chunk may cut a
piece; AdamW's per-tensor step counter is therefore passed as a fresh tensor per call holding the
step before this one, which the kernel increments, instead of the pieces' own counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw

from ..pinned import pinned_empty

UPDATE_DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class _Segment:
    piece: int  # index into the owned pieces
    start: int  # [start, stop) within the piece
    stop: int
    at: int  # offset of ``start`` within the chunk


@dataclass(frozen=True)
class _Chunk:
    lo: int  # [lo, hi) of the owned flat range
    hi: int
    segments: tuple[_Segment, ...]


class HostAdamState:
    """fp32 master weights and AdamW moments of owned pieces in page-locked host memory.

    ``sizes[i]`` is the numel of piece ``i``; ``decay[i]`` whether weight decay applies to it.
    ``master(i)``, ``exp_avg(i)`` and ``exp_avg_sq(i)`` are views into the flat host buffers.
    """

    def __init__(self, sizes: Sequence[int], decay: Sequence[bool], device: torch.device,
                 chunk_numel: int = 2**24) -> None:
        if chunk_numel < 1:
            raise ValueError(f"chunk_numel must be >= 1, got {chunk_numel}")
        self.device = device
        self.sizes = list(sizes)
        self.decay = list(decay)
        self.offsets = []
        total = 0
        for n in self.sizes:
            self.offsets.append(total)
            total += n
        self.numel = total
        self.flat_master = pinned_empty(total, torch.float32)
        self.flat_exp_avg = pinned_empty(total, torch.float32, zero=True)
        self.flat_exp_avg_sq = pinned_empty(total, torch.float32, zero=True)
        self.chunk_numel = chunk_numel
        self.chunks = self._chunks(chunk_numel)
        self._on_cuda = device.type == "cuda"
        self._staging: dict[str, list[torch.Tensor]] = {}
        self._streams: tuple | None = None

    @property
    def host_bytes(self) -> int:
        """Host bytes held: three fp32 values per owned element (staging buffers excluded)."""
        return 12 * self.numel

    def master(self, i: int) -> torch.Tensor:
        return self.flat_master[self.offsets[i]:self.offsets[i] + self.sizes[i]]

    def exp_avg(self, i: int) -> torch.Tensor:
        return self.flat_exp_avg[self.offsets[i]:self.offsets[i] + self.sizes[i]]

    def exp_avg_sq(self, i: int) -> torch.Tensor:
        return self.flat_exp_avg_sq[self.offsets[i]:self.offsets[i] + self.sizes[i]]

    def _chunks(self, chunk_numel: int) -> list[_Chunk]:
        chunks = []
        for lo in range(0, self.numel, chunk_numel):
            hi = min(lo + chunk_numel, self.numel)
            segments = []
            for i, (offset, n) in enumerate(zip(self.offsets, self.sizes)):
                a, b = max(lo, offset), min(hi, offset + n)
                if b > a:
                    segments.append(_Segment(i, a - offset, b - offset, a - lo))
            chunks.append(_Chunk(lo, hi, tuple(segments)))
        return chunks

    # ------------------------------------------------------------------------------------------

    def step(self, mode: str, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, step: int,
             lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
             grad_scale: torch.Tensor | None = None, chunks: Sequence[_Chunk] | None = None) -> None:
        """Apply AdamW step number ``step`` (1-based) to every owned piece.

        ``grads[i]`` and ``params[i]`` are 1-D device views of piece ``i``'s gradient and parameter
        (any dtype: the parameter receives the fp32 master cast to its dtype). The update uses each
        gradient widened to fp32 and multiplied by ``grad_scale`` (a scalar tensor, the clipping
        factor; None for 1): fp32 gradients are scaled in place, others in an fp32 copy of one chunk.
        On return the host state is complete and the device parameters are updated as seen by the
        current stream.
        """
        if mode not in ("cpu", "gpu"):
            raise ValueError(f"update device must be 'cpu' or 'gpu', got {mode!r}")
        scale_fp32_in_place(grads, grad_scale)
        hyper = {"step": step, "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        work = self.chunks if chunks is None else chunks
        if mode == "cpu":
            self._step_cpu(work, grads, params, hyper, None if grad_scale is None else grad_scale.cpu())
        else:
            self._step_gpu(work, grads, params, hyper, grad_scale)

    def _adamw(self, masters, grads, exp_avgs, exp_avg_sqs, segments, hyper) -> None:
        """One fused AdamW call per decay group over aligned lists of 1-D tensors."""
        for decay in (True, False):
            chosen = [k for k, s in enumerate(segments) if self.decay[s.piece] == decay]
            if not chosen:
                continue
            device = masters[chosen[0]].device
            steps = [torch.full((), float(hyper["step"] - 1), dtype=torch.float32, device=device) for _ in chosen]
            adamw(
                [masters[k] for k in chosen], [grads[k] for k in chosen], [exp_avgs[k] for k in chosen],
                [exp_avg_sqs[k] for k in chosen], [], steps, fused=True, amsgrad=False,
                beta1=hyper["betas"][0], beta2=hyper["betas"][1], lr=hyper["lr"],
                weight_decay=hyper["weight_decay"] if decay else 0.0, eps=hyper["eps"], maximize=False,
            )

    def _buffers(self, key: str, count: int, numel: int, dtype: torch.dtype, device: torch.device | None):
        """``count`` reusable staging buffers (page-locked on the host when ``device`` is None)."""
        have = self._staging.get(key)
        if have is None or have[0].numel() < numel:
            if device is None:
                have = [pinned_empty(numel, dtype) for _ in range(count)]
            else:
                have = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
            self._staging[key] = have
        return have

    def _copy_streams(self):
        if not self._on_cuda:
            return None, None
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._streams

    def _step_cpu(self, chunks: Sequence[_Chunk], grads, params, hyper, scale) -> None:
        size = max((c.hi - c.lo for c in chunks), default=0)
        if not size:
            return
        # Gradients cross in their own dtype when uniform (bf16 halves the bytes), widened on the CPU.
        grad_dtypes = {g.dtype for g in grads}
        grad_dtype = grad_dtypes.pop() if len(grad_dtypes) == 1 else torch.float32
        grad_stage = self._buffers(f"cpu_grad_{grad_dtype}", 2, size, grad_dtype, None)
        narrow = any(g.dtype != torch.float32 for g in grads)
        wide = self._buffers("cpu_grad_wide", 1, size, torch.float32, None)[0] if narrow else None
        dtypes = {p.dtype for p in params}
        param_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        param_stage = self._buffers(f"cpu_param_{param_dtype}", 2, size, param_dtype, None)
        down, up = self._copy_streams()
        compute = torch.cuda.current_stream(self.device) if self._on_cuda else None
        if down is not None:
            down.wait_stream(compute)  # the gradients were clipped on the compute stream
            up.wait_stream(compute)  # and nothing there still reads the parameters
        fetched: list = [None] * len(chunks)
        sent: list = [None, None]

        def fetch(k: int) -> None:
            chunk = chunks[k]
            stage = grad_stage[k % 2]
            fetched[k] = _copies_on(down, [(stage[s.at:s.at + s.stop - s.start], grads[s.piece][s.start:s.stop])
                                           for s in chunk.segments])

        for k, chunk in _one_ahead(chunks, fetch):
            if fetched[k] is not None:
                fetched[k].synchronize()
            stage = grad_stage[k % 2]
            segs = chunk.segments
            base = [self.offsets[s.piece] + s.start for s in segs]
            lengths = [s.stop - s.start for s in segs]
            masters = [self.flat_master[b:b + n] for b, n in zip(base, lengths)]
            chunk_grads = [stage[s.at:s.at + n] if grads[s.piece].dtype == torch.float32
                           else widen_and_scale(stage[s.at:s.at + n], scale, out=wide[s.at:s.at + n])
                           for s, n in zip(segs, lengths)]
            self._adamw(masters, chunk_grads,
                        [self.flat_exp_avg[b:b + n] for b, n in zip(base, lengths)],
                        [self.flat_exp_avg_sq[b:b + n] for b, n in zip(base, lengths)], segs, hyper)
            out = param_stage[k % 2]
            if sent[k % 2] is not None:
                sent[k % 2].synchronize()  # chunk k-2's parameters have left this buffer
            for s, m, n in zip(segs, masters, lengths):
                out[s.at:s.at + n].copy_(m)
            sent[k % 2] = _copies_on(up, [(params[s.piece][s.start:s.stop], out[s.at:s.at + n])
                                          for s, n in zip(segs, lengths)])
        if up is not None:
            compute.wait_stream(up)
            for event in sent:
                if event is not None:
                    event.synchronize()  # the staging buffers are rewritten by the next step

    def _step_gpu(self, chunks: Sequence[_Chunk], grads, params, hyper, scale) -> None:
        size = max((c.hi - c.lo for c in chunks), default=0)
        if not size:
            return
        narrow = any(g.dtype != torch.float32 for g in grads)
        # One buffer: the widening and the update of a chunk run in order on the compute stream.
        wide = self._buffers("gpu_grad_wide", 1, size, torch.float32, self.device)[0] if narrow else None
        stages = [self._buffers(f"gpu_{name}", 2, size, torch.float32, self.device)
                  for name in ("master", "exp_avg", "exp_avg_sq")]
        hosts = (self.flat_master, self.flat_exp_avg, self.flat_exp_avg_sq)
        up, down = self._copy_streams()
        compute = torch.cuda.current_stream(self.device) if self._on_cuda else None
        loaded: list = [None] * len(chunks)
        stored: list = [None] * len(chunks)

        def load(k: int) -> None:
            chunk = chunks[k]
            n = chunk.hi - chunk.lo
            # After k-2's values have gone back to the host from that staging buffer.
            loaded[k] = _copies_on(up, [(stage[k % 2][:n], host[chunk.lo:chunk.hi]) for stage, host in zip(stages, hosts)],
                                   after=stored[k - 2] if k >= 2 else None)

        for k, chunk in _one_ahead(chunks, load):
            if loaded[k] is not None:
                compute.wait_event(loaded[k])
            n = chunk.hi - chunk.lo
            master, exp_avg, exp_avg_sq = (stage[k % 2][:n] for stage in stages)
            segs = chunk.segments
            views = [(s.at, s.at + s.stop - s.start) for s in segs]
            masters = [master[a:b] for a, b in views]
            chunk_grads = [grads[s.piece][s.start:s.stop] if grads[s.piece].dtype == torch.float32
                           else widen_and_scale(grads[s.piece][s.start:s.stop], scale, out=wide[a:b])
                           for s, (a, b) in zip(segs, views)]
            self._adamw(masters, chunk_grads,
                        [exp_avg[a:b] for a, b in views], [exp_avg_sq[a:b] for a, b in views], segs, hyper)
            for s, m in zip(segs, masters):
                params[s.piece][s.start:s.stop].copy_(m)
            if down is not None:
                down.wait_stream(compute)  # after this chunk's update
            stored[k] = _copies_on(down, [(host[chunk.lo:chunk.hi], stage)
                                          for stage, host in zip((master, exp_avg, exp_avg_sq), hosts)])
        if down is not None:
            down.synchronize()  # host state complete (checkpoints read it next)


def scale_fp32_in_place(grads: Sequence[torch.Tensor], scale: torch.Tensor | None) -> None:
    """Multiply the fp32 tensors among ``grads`` by ``scale`` in place (nothing when None); others are left alone."""
    wide = [g for g in grads if g.dtype == torch.float32 and g.numel()]
    if scale is not None and wide:
        torch._foreach_mul_(wide, scale.to(wide[0].device))


def widen_and_scale(grad: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad`` as a new fp32 tensor (written into ``out`` when given), multiplied by ``scale`` unless None.

    The product is the one fp32 gradients get from an in-place ``mul_(scale)``: widening is exact.
    """
    wide = torch.empty(grad.shape, dtype=torch.float32, device=grad.device) if out is None else out
    wide.copy_(grad)
    if scale is not None:
        wide.mul_(scale)
    return wide


def _one_ahead(chunks: Sequence[_Chunk], start: Callable[[int], None]) -> Iterator[tuple[int, _Chunk]]:
    """``(k, chunk)`` in order, ``start(k + 1)`` called before chunk k is handed out (``start(0)`` first).

    ``start`` queues a chunk's copies: those of chunk k+1 run while chunk k is updated.
    """
    if chunks:
        start(0)
    for k, chunk in enumerate(chunks):
        if k + 1 < len(chunks):
            start(k + 1)
        yield k, chunk


def _copies_on(stream, copies: list[tuple[torch.Tensor, torch.Tensor]], after=None):
    """``dst.copy_(src)`` for each pair, queued on ``stream`` after event ``after``; the event marking their end.

    ``stream`` None (no CUDA): plain copies, no event.
    """
    if stream is None:
        for dst, src in copies:
            dst.copy_(src)
        return None
    with torch.cuda.stream(stream):
        if after is not None:
            stream.wait_event(after)
        for dst, src in copies:
            dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return event


def choose_update_device(state: HostAdamState, params: Sequence[torch.Tensor], *, probe_chunks: int = 2,
                         repeats: int = 2) -> tuple[str, dict[str, float]]:
    """Time the CPU and the GPU-streamed update on the first chunks; return the faster and both rates.

    Runs zero-gradient steps with lr 0 on the real buffers: freshly initialised state (zero moments)
    and the parameters stay exactly as they were. Call before any real step or state load. Rates
    are owned elements per second.
    """
    chunks = state.chunks[:probe_chunks]
    if not chunks:
        return "gpu" if state.device.type == "cuda" else "cpu", {}
    # Zero gradients only as long as the probed segments reach into each piece.
    reach = {}
    for c in chunks:
        for s in c.segments:
            reach[s.piece] = max(reach.get(s.piece, 0), s.stop)
    zeros = [torch.zeros(reach.get(i, 0), dtype=torch.float32, device=p.device) for i, p in enumerate(params)]
    elements = sum(c.hi - c.lo for c in chunks)
    rates = {}
    for mode in ("cpu", "gpu"):
        best = float("inf")
        for _ in range(repeats):
            _sync(state.device)
            start = time.perf_counter()
            state.step(mode, zeros, params, step=1, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                       chunks=chunks)
            _sync(state.device)
            best = min(best, time.perf_counter() - start)
        rates[mode] = elements / best
    return max(rates, key=rates.get), rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
