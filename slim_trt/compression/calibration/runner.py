"""The layer-by-layer calibration loop.

Only one decoder block's activations are held at a time: the calibration windows are run up to block 0 once,
then for each block we (1) run the dense block to collect per-linear input statistics, (2) let a callback
compress its linears, (3) run the compressed block to produce the next block's inputs. So every block sees the
outputs of the compressed blocks before it, as in SparseGPT/SLiM.

The arguments a block receives besides the hidden states (rotary cos/sin, causal or sliding-window masks,
position ids) depend only on the batch shape, so they are recorded once per batch size from a real forward pass
instead of being rebuilt per architecture.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ...algorithms.gram import gram
from ...errors import SlimError
from ...resources import block_bytes, check_fits, fits
from ...timing import PhaseTimer, phase
from .block_tuning import BlockTuning, tune_block
from .families import block_linears, decoder_blocks


@dataclass
class LinearStats:
    """Running statistics of one linear layer's inputs over the calibration tokens."""

    hessian: torch.Tensor | None = None  # 2/n * sum x x^T, as in the GPTQ reference
    nsamples: int = 0
    sq_sum: torch.Tensor | None = None  # sum over tokens of x^2, per input channel
    ntokens: int = 0
    # Activation quantization (W8A8), when the runner is given an ActCalibration: the first pass also collects
    # each channel's max |x| and the |x| histogram (the histogram later, on the smoothed inputs, with defer_hist);
    # once act_scale is set, a last pass collects the moments of the quantization error e = Q(x) - x with x
    # (algorithms/lrc.py), from which H_qq and H_xq follow.
    collect_act: bool = False
    defer_hist: bool = False
    abs_hist: Any = None  # algorithms.actquant.AbsHistogram
    channel_absmax: torch.Tensor | None = None  # [K]
    act_scale: float | None = None
    act_bits: int = 8
    act_format: str = "int"  # or "fp8" (E4M3 activations, issue 24)
    act_moments: Any = None  # algorithms.lrc.ActErrorMoments
    act_nsamples: int = 0
    # Asymmetric calibration (dense_target > 0): D = 2/n sum (x_ref - x) x^T, x_ref being the same
    # token's input in the dense model (algorithms/asymmetric.py); None when the layer is fitted to its own output.
    drift: torch.Tensor | None = None
    smoothing: torch.Tensor | None = None  # [K]: SmoothQuant divided input channel j by smoothing[j] (rescaled)

    def add(self, x: torch.Tensor, shared: "InputProducts | None" = None, ref: torch.Tensor | None = None) -> None:
        """Fold the layer input x into H and sum x^2; ref: the dense model's input for the same tokens, folded
        into the drift."""
        from ...algorithms.asymmetric import accumulate_drift
        from ...algorithms.gptq import accumulate_hessian

        shared = shared or InputProducts()
        X, xtx, sq = shared(x)
        if ref is not None:
            prev, n = self.drift, self.nsamples
            self.drift = shared.once("drift", lambda: accumulate_drift(prev, n, X, shared.ref_rows(ref)), prev)
        self.hessian, self.nsamples = accumulate_hessian(self.hessian, self.nsamples, X, xtx)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.ntokens += X.shape[0]
        if self.collect_act:  # the same x (not X): the memo knows the input by the tensor the hook passed
            self.add_histogram(x, shared, hist=not self.defer_hist)

    def add_histogram(self, x: torch.Tensor, shared: "InputProducts | None" = None, hist: bool = True) -> None:
        """Fold x into the per-channel max |x| and (hist) the |x| histogram only: the pass after SmoothQuant,
        whose second moments follow from the first pass's (rescaled)."""
        from ...algorithms.actquant import accumulate_abs_histogram

        shared = shared or InputProducts()
        X = shared.rows(x)
        prev_hist, prev_max = self.abs_hist, self.channel_absmax
        # Layers that read the same input with the same running state get the same (shared) result.
        if hist:
            self.abs_hist = shared.once("hist", lambda: accumulate_abs_histogram(prev_hist, X), prev_hist)
        self.channel_absmax = shared.once("absmax", lambda: X.abs().amax(0) if prev_max is None
                                          else torch.maximum(prev_max, X.abs().amax(0)), prev_max)

    def add_quantized(self, x: torch.Tensor, shared: "InputProducts | None" = None) -> None:
        """Second pass: fold x and its fake-quantized copy (with act_scale) into the error moments."""
        from ...algorithms.actquant import fake_quant
        from ...algorithms.lrc import accumulate_error_moments

        shared = shared or InputProducts()
        X = shared.rows(x)
        prev, n, fmt = self.act_moments, self.act_nsamples, (self.act_scale, self.act_bits, self.act_format)
        self.act_moments, self.act_nsamples = shared.once(
            f"moments {n} {fmt}", lambda: accumulate_error_moments(prev, n, X, fake_quant(X, *fmt)), prev)

    def permuted(self, perm: torch.Tensor) -> "LinearStats":
        """The statistics a new pass would gather after the input channels were put in the order `perm`
        (x_new = x[..., perm], an exact permutation folded into the weights), without running it. The |x|
        histogram pools every channel, so it is unchanged."""
        if self.act_moments is not None:
            raise ValueError("permute the statistics before the quantized pass")
        p = perm.to(self.sq_sum.device)
        return replace(self, hessian=self.hessian[p][:, p], sq_sum=self.sq_sum[p],
                       drift=None if self.drift is None else self.drift[p][:, p],
                       smoothing=None if self.smoothing is None else self.smoothing[p],
                       channel_absmax=None if self.channel_absmax is None else self.channel_absmax[p])

    def rescaled(self, s: torch.Tensor) -> "LinearStats":
        """The second moments after SmoothQuant divided input channel j by s_j (x_new = x / s), without a pass:
        H / (s s^T), sum x^2 / s^2. The |x| histogram pools every channel and cannot be rescaled: it is dropped,
        with the max |x|, for add_histogram's pass to gather both again."""
        if self.act_moments is not None:
            raise ValueError("rescale the statistics before the quantized pass")
        s = s.to(device=self.sq_sum.device, dtype=torch.float32)
        ss = s[:, None] * s[None, :]  # x_ref is divided by the same s
        return replace(self, hessian=self.hessian / ss, sq_sum=self.sq_sum / (s * s),
                       drift=None if self.drift is None else self.drift / ss,
                       smoothing=s if self.smoothing is None else self.smoothing * s,
                       channel_absmax=None, abs_hist=None)

    @property
    def act_norm(self) -> torch.Tensor:
        """L2 norm of each input channel over all tokens (Wanda's ||X_j||)."""
        return self.sq_sum.sqrt()

    @property
    def saliency(self) -> torch.Tensor:
        """SLiM-LoRA's per-channel saliency: the reference code uses the channel's L2 norm (only ratios matter)."""
        return self.act_norm


class _NonFinite(Exception):
    pass


class InputProducts:
    """The per-batch work a layer input contributes to its statistics (float32 rows, X^T X, sum of x^2, and via
    `once` the histogram and error moments), done once per input tensor: q/k/v (gate/up) read the very same
    tensor, so they share it and get the values each would compute alone. Holds the last input only."""

    def __init__(self) -> None:
        self._x: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._memo: dict = {}

    def once(self, name: str, compute: Callable[[], Any], *state: Any) -> Any:
        """compute() for the current input and the running `state` objects it extends (the same objects: layers
        that have seen the same inputs so far hold them), the first time it is asked for. The memo keeps the
        state objects alive, so their ids stay theirs."""
        key = (name, *map(id, state))
        if key not in self._memo:
            self._memo[key] = (compute(), state)
        return self._memo[key][0]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as float32 rows [tokens, K], checked finite; a new x starts a new memo."""
        if x is not self._x:
            X = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            # A NaN or Inf anywhere makes the sum non-finite: one reduction instead of a mask the size of X
            # (the mask only confirms, for finite values whose sum overflows).
            if not torch.isfinite(X.sum()) and not torch.isfinite(X).all():
                raise _NonFinite()
            self._x, self._rows, self._memo = x, X, {}
        return self._rows

    def ref_rows(self, ref: torch.Tensor) -> torch.Tensor:
        """The dense model's input for the current input's tokens, as float32 rows (once per input)."""
        return self.once("ref rows", lambda: ref.detach().reshape(-1, ref.shape[-1]).to(torch.float32))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, X^T X, sum of x^2 per channel): the products only the dense pass needs."""
        X = self.rows(x)
        return (X, *self.once("products", lambda: (gram(X), (X * X).sum(0))))


class KeptInputs:
    """One block's linear inputs over all the calibration batches (float32 rows, in the order the forward handed
    them to the hooks; linears that read one input share one tensor), kept from the pass before the activation
    calibration's last one: the quantization-error moments are then gathered from them instead of from one more
    forward of the block (one of a W8A8 block's four or five), from the very same inputs, so the statistics are
    bit for bit those of the pass it spares. With SmoothQuant they are the histogram pass's inputs (the smoothed
    block's); without, the first pass's, unless a channel permutation changed the block in between (permuted,
    a layer sums its products in another order, so the next layers' inputs differ in their last bits: the block
    runs again). Costs 4 bytes per token and input channel of the block's distinct inputs while its statistics
    are gathered (resources.block_bytes counts it)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, torch.Tensor]] = []

    def adder(self, name: str, add: Callable[[torch.Tensor], None], shared: InputProducts) -> Callable:
        """A hook function: keep linear `name`'s input (shared.rows: one tensor for the linears reading it), then
        pass it to add."""
        def keep_and_add(x: torch.Tensor) -> None:
            self.rows.append((name, shared.rows(x)))
            add(x)
        return keep_and_add

    def replay(self, adders: dict[str, Callable[[torch.Tensor], None]], timer: PhaseTimer | None = None) -> None:
        """What a hooked pass would do: each kept input to adders[name], in the forward's order."""
        for name, X in self.rows:
            if name in adders:
                with phase(timer, "hessian"):
                    adders[name](X)


class _Stop(Exception):
    pass


@dataclass
class ActCalibration:
    """What the runner does for quantized activations (W8A8): `scale(stats)` gives a linear's activation scale
    from its |x| histogram (stats.abs_hist; layers that hold one histogram get one scale); `smooth(i, block, linears, stats)` may migrate activation outliers into the
    weights (SmoothQuant) and returns {linear name: s} for the linears whose inputs it divided by s, channel by
    channel (their statistics are rescaled and their |x| histograms gathered again)."""

    bits: int
    scale: Callable[[LinearStats], float]
    fmt: str = "int"  # "fp8": E4M3 activations
    smooth: Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, LinearStats]], dict[str, torch.Tensor]] | None = None


@dataclass
class BlockResult:
    index: int
    layers: dict[str, dict] = field(default_factory=dict)  # per-linear info from the callback
    output_rel_error: float = 0.0  # ||Y_compressed - Y_dense|| / ||Y_dense|| of the block output
    # asymmetric: the same against the dense model's own hidden states after this block (the error so far)
    drift_rel_error: float | None = None
    tuning: dict | None = None  # block_tuning.tune_block's report, when the adapters were tuned


@dataclass(frozen=True)
class BlockTune:
    """run_layerwise's block-wise adapter tuning: how (config), and toward what ("layer": the dense block's output
    on the compressed stream; "dense": the dense model's hidden states after the block)."""
    config: BlockTuning
    target: str = "layer"


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))


@torch.no_grad()
def _record_block_kwargs(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> list[dict]:
    """One forward pass on `batch` that records the keyword arguments every block receives."""
    recorded: list[dict] = [None] * len(blocks)  # type: ignore[list-item]

    def stand_in(i: int):
        # The arguments depend on the batch shape only, so each block is replaced by one that records them and
        # passes its input on: no block runs (a streamed model's blocks are not even in memory).
        def forward(*args, **kwargs):
            recorded[i] = dict(kwargs)
            if i == len(blocks) - 1:
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]
        return forward

    for i, blk in enumerate(blocks):
        blk.forward = stand_in(i)
    try:
        model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for blk in blocks:
            del blk.forward
    for kw in recorded:
        kw.pop("past_key_values", None)
        kw["use_cache"] = False
    return recorded


@torch.no_grad()
def _block0_inputs(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> torch.Tensor:
    """Hidden states entering block 0 for one batch (the forward stops there)."""
    out: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        out.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return out[0]


def _run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs_for: Callable[[int], dict]) -> list[torch.Tensor]:
    outs = []
    for x in inputs:
        y = block(x, **kwargs_for(x.shape[0]))
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.pow(2).sum()) for y in b)
    return (num / den) ** 0.5 if den > 0 else 0.0


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    compress_block: Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, LinearStats]], dict[str, dict]],
    *,
    batch_size: int = 8,
    skip: Callable[[str], bool] = lambda name: False,
    restore_block: Callable[[int, nn.Module], bool] = lambda i, block: False,
    restorable: Callable[[int], bool] = lambda i: False,
    on_block_done: Callable[[BlockResult], None] = lambda r: None,
    progress: Iterable | None = None,
    act: ActCalibration | None = None,
    device: torch.device | str | None = None,
    timer: PhaseTimer | None = None,
    weights=None,
    transform: Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, LinearStats]], bool] | None = None,
    asymmetric: bool = False,
    tune: "BlockTune | None" = None,
    keep_inputs: bool = True,
) -> list[BlockResult]:
    """Compress `model` block by block.

    compress_block(i, block, linears, stats) replaces the given linears inside `block` and returns per-layer info.
    restore_block(i, block) may put an earlier run's compressed layers into `block` and return True (resume);
    the block then only runs forward to produce the next block's inputs. restorable(i): whether restore_block
    would find block i (asymmetric runs the dense block first then, while its linears are still the dense ones).
    act: calibrate static activation scales (and optionally smooth) before compress_block sees the statistics:
    one more forward pass of the dense block (two with smoothing: the |x| histograms of the smoothed inputs).
    device: where each block runs and is compressed (None: where the model is). The model stays where it is;
    each block moves there with the calibration activations, and back once it is compressed, before the next.
    timer: charged with the phases calibration_forward, hessian, act_calibration, compress, block_output, load.
    weights: a slim_trt.compression.streaming.StreamedModel when the model's tensors are on the meta device: the tensors
    outside the blocks are read for the first forward pass, each block before its turn, and the block's
    compressed layers leave memory once on_block_done has saved them.
    transform(i, block, linears, stats): may change the dense block into an equivalent one (a channel
    permutation) from its first statistics, before the activation calibration; returns {linear name: perm} for
    the linears whose input channels it put in the order perm, whose statistics are permuted to match.
    asymmetric: also carry the dense model's hidden states through the dense blocks, and give every linear the
    drift of its inputs from the dense model's (LinearStats.drift, for algorithms/asymmetric.py): the first
    statistics pass runs each batch through the dense block twice, on the dense and on the compressed stream,
    pairing each linear's two inputs token by token (one batch of them held at a time).
    tune: after compress_block, train the block's adapters toward its dense output (block_tuning.py): the dense
    block's output on the compressed stream, or with tune.target "dense" the dense stream's (carried then, without
    the drift unless asymmetric).
    keep_inputs: W8A8 may keep a block's linear inputs for its error moments (KeptInputs) where the device has
    room for them; False: always one more pass instead (the same statistics; for a host short of memory).
    """
    blocks = decoder_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    batches = _batches(windows, batch_size)
    home = weights.home if weights is not None else next(model.parameters()).device
    device = home if device is None else torch.device(device)
    if weights is not None:
        with phase(timer, "load"):
            weights.load_outer()
    with phase(timer, "calibration_forward"):
        sizes = {b.shape[0]: b for b in batches}
        if tune is not None:  # the tuning steps take micro-batches of the calibration batches
            sizes.update({m.shape[0]: m for b in batches for m in b.split(tune.config.micro_batch)})
        kw_cache = {n: _to(_record_block_kwargs(model, blocks, b), device) for n, b in sizes.items()}
        hidden = [_block0_inputs(model, blocks, b).to(device) for b in batches]
    # The dense model's hidden states (asymmetric, or the tuning's target): the same list as `hidden` until a block
    # is compressed.
    dense_hidden = hidden if asymmetric or (tune is not None and tune.target == "dense") else None
    if weights is not None:
        weights.release_outer()
        weights.kw_cache_bytes = _tensor_bytes(kw_cache)

    def kwargs_for(i: int):
        return lambda bsz: kw_cache[bsz][i]

    results: list[BlockResult] = []
    indices = range(len(blocks)) if progress is None else progress
    for i in indices:
        block = blocks[i]
        res = BlockResult(index=i)
        if weights is not None:
            with phase(timer, "load"):
                weights.load_block(i)
        dense_next = None
        if dense_hidden is not None and restorable(i):
            # Before restore_block replaces the linears: the dense stream needs this block as it was.
            with phase(timer, "calibration_forward"):
                dense_next = _run_block(block.to(device), dense_hidden, kwargs_for(i))
        if restore_block(i, block):
            if dense_hidden is not None:
                if dense_next is None:
                    raise RuntimeError(f"block {i} was restored although restorable({i}) said it would not be")
                dense_hidden = dense_next
            with phase(timer, "block_output"):
                hidden = _run_block(block.to(device), hidden, kwargs_for(i))
                block.to(home)
            if weights is not None:
                weights.release_block(i, block)
            results.append(res)
            continue
        linears = {n: m for n, m in block_linears(block).items() if not skip(f"{prefix}{i}.{n}")}
        widths, dense = [m.in_features for m in linears.values()], dense_hidden is not None
        # W8A8: the error moments are gathered from kept inputs (KeptInputs) when the caller allows it and they fit
        # the device; otherwise from one more pass of the block, with the same results.
        kept = KeptInputs() if keep_inputs and act is not None and linears and fits(
            block_bytes(block, hidden, widths, dense_stream=dense, kept_inputs=True), device) else None
        smoothing = act is not None and act.smooth is not None
        check_fits(block_bytes(block, hidden, widths, dense_stream=dense, kept_inputs=kept is not None), device,
                   f"compressing block {prefix}{i}")
        block.to(device)

        @contextlib.contextmanager
        def hooked(adders: dict[str, Callable[[torch.Tensor], None]]):
            """Within: each forward of the block passes linear `name`'s input to adders[name]."""
            handles = [linears[n].register_forward_hook(_stats_hook(f, timer)) for n, f in adders.items()]
            try:
                yield
            except _NonFinite:
                raise SlimError(f"NaN or Inf in the activations entering block {prefix}{i}: the model or the "
                                f"calibration text is broken (check the source weights; try another dtype)")
            finally:
                for h in handles:
                    h.remove()

        def run_hooked(adders: dict[str, Callable[[torch.Tensor], None]]) -> list[torch.Tensor]:
            """The block's forward on the compressed stream with each linear's input passed to adders[name]."""
            with hooked(adders):
                return _run_block(block, hidden, kwargs_for(i))

        def replay_or_run(adders: dict[str, Callable[[torch.Tensor], None]]) -> None:
            """The error moments' pass: from the kept inputs (checked finite when they were kept), or by running
            the block."""
            if kept is None:
                run_hooked(adders)
            else:
                kept.replay(adders, timer)

        def new_stats() -> dict[str, LinearStats]:
            # With SmoothQuant the first pass's histograms would describe inputs it is about to divide.
            return {n: LinearStats(collect_act=act is not None, defer_hist=smoothing) for n in linears}

        def gather(stats: dict[str, LinearStats]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
            """The first statistics pass: (the dense block's outputs on the compressed stream, on the dense
            stream (None without one))."""
            shared = InputProducts()
            if dense_hidden is not None and dense_hidden is not hidden and asymmetric:
                out, ref_out = run_paired(stats, shared)
            else:  # no drift wanted, or none yet (block 0)
                out = run_hooked(keeping({n: functools.partial(st.add, shared=shared) for n, st in stats.items()},
                                         shared, not smoothing))
                ref_out = None if dense_hidden is None else (
                    out if dense_hidden is hidden else _run_block(block, dense_hidden, kwargs_for(i)))
            _share_equal_hessians(stats)
            return out, ref_out

        def keeping(adders: dict[str, Callable], shared: InputProducts, now: bool) -> dict[str, Callable]:
            """adders that also keep each input, in the pass (`now`) whose inputs the error moments read."""
            return adders if kept is None or not now else {n: kept.adder(n, f, shared) for n, f in adders.items()}

        def run_paired(stats: dict[str, LinearStats], shared: InputProducts):
            """Per batch: the dense stream through the block (each linear's input kept), then the compressed
            stream, whose hooks fold each input with the dense one into the statistics."""
            refs: dict[str, torch.Tensor] = {}
            keep = {n: functools.partial(refs.__setitem__, n) for n in stats}
            add = keeping({n: (lambda x, n=n: stats[n].add(x, shared, ref=refs[n])) for n in stats}, shared,
                          not smoothing)
            out, ref_out = [], []
            for x, x_ref in zip(hidden, dense_hidden):
                refs.clear()
                with hooked(keep):
                    ref_out += _run_block(block, [x_ref], kwargs_for(i))
                with hooked(add):
                    out += _run_block(block, [x], kwargs_for(i))
            return out, ref_out

        stats = new_stats()
        with phase(timer, "calibration_forward"):
            dense_out, dense_next = gather(stats)
        # The block may now change into an equivalent one (dense_out holds). Its inputs change by a channel
        # permutation or a per-channel division, exactly, so the statistics follow without another pass; only the
        # |x| histogram, which pools every channel, is gathered again after SmoothQuant.
        if transform is not None and linears:
            with phase(timer, "permutation"):
                perms = transform(i, block, linears, stats)
                for name, perm in perms.items():
                    stats[name] = stats[name].permuted(perm)
                if perms and not smoothing:
                    kept = None  # kept from the first pass, before the block changed (KeptInputs)
        if act is not None and linears:
            with phase(timer, "act_calibration"):
                divisors = act.smooth(i, block, linears, stats) if act.smooth is not None else {}
                for name, s in divisors.items():
                    stats[name] = stats[name].rescaled(s)
                _share_equal_hessians(stats)
                pending = [n for n, st in stats.items() if st.abs_hist is None]  # deferred, or rescaled
                if pending:  # with SmoothQuant every layer (new_stats defers their histograms): the pass to keep
                    shared = InputProducts()
                    run_hooked(keeping({n: functools.partial(stats[n].add_histogram, shared=shared) for n in pending},
                                       shared, smoothing))
                scales = {}  # layers that read one input hold one histogram: one scale search for them
                for st in stats.values():
                    if id(st.abs_hist) not in scales:
                        scales[id(st.abs_hist)] = act.scale(st)
                    st.act_scale, st.act_bits, st.act_format = scales[id(st.abs_hist)], act.bits, act.fmt
                shared = InputProducts()
                replay_or_run({n: functools.partial(st.add_quantized, shared=shared) for n, st in stats.items()})
                kept = None  # the block's compression needs the memory
        with phase(timer, "compress"):
            res.layers = compress_block(i, block, linears, stats)
        if tune is not None and linears:
            with phase(timer, "block_tuning"):
                target = dense_next if tune.target == "dense" else dense_out
                res.tuning = tune_block(block, hidden, target, kwargs_for(i), tune.config, index=i)
        with phase(timer, "block_output"):
            hidden = _run_block(block, hidden, kwargs_for(i))
            if not all(torch.isfinite(h).all() for h in hidden):
                raise SlimError(f"NaN or Inf in the outputs of compressed block {prefix}{i}")
            res.output_rel_error = _rel(hidden, dense_out)
            del dense_out
            if dense_hidden is not None:
                dense_hidden = dense_next
                res.drift_rel_error = _rel(hidden, dense_hidden)
            block.to(home)
        results.append(res)
        on_block_done(res)
        if weights is not None:
            weights.release_block(i, block)
    return results


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in nested tuples, lists and dicts, each distinct tensor once."""
    seen: set = set()

    def walk(o) -> int:
        if isinstance(o, torch.Tensor):
            key = (o.untyped_storage().data_ptr(), o.storage_offset(), tuple(o.shape))
            if key in seen:
                return 0
            seen.add(key)
            return o.numel() * o.element_size()
        if isinstance(o, (tuple, list)):
            return sum(walk(x) for x in o)
        if isinstance(o, dict):
            return sum(walk(x) for x in o.values())
        return 0

    return walk(obj)


def _to(obj, device: torch.device):
    """The block keyword arguments (tensors, possibly in tuples, lists or dicts) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _share_equal_hessians(stats: dict[str, LinearStats]) -> None:
    """Layers whose statistics came out equal (they read the same input) hold one H (and one drift): the memory
    is counted once and the factorisations of H (algorithms/memo.py) are computed once for all of them."""
    for attr in ("hessian", "drift"):
        seen: list[torch.Tensor] = []
        for st in stats.values():
            T = getattr(st, attr)
            if T is None:
                continue
            same = next((G for G in seen if G.shape == T.shape and torch.equal(G, T)), None)
            if same is None:
                seen.append(T)
            else:
                setattr(st, attr, same)


def _stats_hook(add: Callable[[torch.Tensor], None], timer: PhaseTimer | None = None):
    def hook(_mod, args, _out):
        with phase(timer, "hessian"):
            add(args[0])
    return hook


def _blocks_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is blocks:
            return name + "."
    return ""
