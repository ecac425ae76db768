"""``torch.compile`` inference: the whole of scoring as one Inductor graph.

    >>> det = Detector.load("runs/bottle", engine="compile", precision="bf16")

Inductor fuses the backbone's convolutions with their batch norms and activations,
freezes the weights into the graph (``freezing``) and fuses the element-wise work of the
transformer, map and score. On this project's 2-core CPU that took batch-1 latency from
about 65 ms (eager fp32) to under 30 ms with bf16 (benchmarks/results/speed.md). The
price is a one-off compilation, about 30 s per batch size on that CPU, so it pays for
serving and for large batches, not for scoring one image from the command line.

Graphs are compiled for fixed batch sizes: a batch smaller than one already compiled is
padded up to it (its extra rows are discarded) rather than compiled again. int8
(:mod:`adtr.quantize`) compiles one graph, for one image, and scores a batch image by image.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch._inductor import config as inductor_config

from adtr.errors import AdtrError, compile_failure
from adtr.export import ScoringModel
from adtr.quantize import quantize_linear_layers


class CompiledScorer:
    """A :class:`ScoringModel` compiled with Inductor; :meth:`score_tensors` has the
    signature and meaning of :meth:`adtr.detector.Detector.score_tensors`.

    Args:
        scoring: the model, already on ``device``.
        precision: ``fp32``, ``bf16`` (the network under autocast inside the compiled graph)
            or ``int8`` (x86 CPUs: the transformer's linear layers quantised first, see
            :mod:`adtr.quantize`).
        device: where it runs.
    """

    def __init__(self, scoring: ScoringModel, precision: str, device: torch.device) -> None:
        self.scoring = scoring.eval()
        self.precision = precision
        self.device = device
        self.batch_sizes: set[int] = set()  # compiled so far
        self.int8: nn.Module | None = None
        self.extra_inputs: tuple[torch.Tensor, ...] = ()  # int8: passed after the images, copied per call
        if precision == "int8":
            size = scoring.image_size
            example = torch.zeros(1, 3, size, size, device=device)
            self.int8, self.extra_inputs = quantize_linear_layers(scoring, example)
        self.graph = torch.compile(self.run, dynamic=False)

    def run(self, images: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.int8 is not None:
            return self.int8(images, *extra)
        return self.scoring(images, self.precision)

    @torch.no_grad()
    def score_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> maps (B, S, S) and scores (B,), float32 on the CPU.

        int8 scores one image at a time: dynamic quantisation takes each activation's scale
        from the whole tensor, so within a batch an image's score would depend on the images
        beside it. Alone, it does not.
        """
        if self.int8 is not None and len(images) > 1:
            parts = [self.score_tensors(image[None]) for image in images]
            return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
        n = len(images)
        size = min((s for s in self.batch_sizes if s >= n), default=n)
        x = images.to(self.device)
        if size > n:
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        try:
            # Freezing (weights as constants: conv + batch-norm folding, prepacked weights) is
            # read from Inductor's global config while compiling (``options=`` did not reach
            # it); the C++ wrapper calls the kernels without Python in between. Measured at
            # batch 1 bf16 on the 2-core CPU: 41 ms without either, 31 with freezing, 24 with both.
            # (The wrapper is left at its default on GPUs, where it was not measured.)
            with inductor_config.patch(freezing=True, cpp_wrapper=self.device.type == "cpu"), \
                    warnings.catch_warnings():
                # Inductor's int8 lowering copies a tensor the way torch warns about; nothing the user can act on
                warnings.filterwarnings("ignore", message="To copy construct from a tensor")
                maps, scores = self.graph(x, *(t.clone() for t in self.extra_inputs))
        except Exception as exc:  # noqa: BLE001 - a compiler failure is an environment problem, said in one line
            if size in self.batch_sizes:
                raise
            raise AdtrError(f"{compile_failure(exc)}: use --engine torch") from exc
        self.batch_sizes.add(size)
        return maps[:n, 0].float().cpu(), scores[:n].float().cpu()
