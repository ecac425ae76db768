"""``torch.compile`` inference: the whole of scoring as one Inductor graph.

    >>> det = Detector.load("runs/bottle", engine="compile", precision="bf16")

Inductor fuses the backbone's convolutions with their batch norms and activations,
freezes the weights into the graph (``freezing``) and fuses the element-wise work of the
transformer, map and score. On this project's 2-core CPU that took batch-1 latency from
about 65 ms (eager fp32) to under 30 ms with bf16 (benchmarks/results/speed.md). The
price is a one-off compilation, about 30 s per batch size on that CPU, so it pays for
serving and for large batches, not for scoring one image from the command line.

Graphs are compiled for fixed batch sizes: a batch smaller than one already compiled is
padded up to it (its extra rows are discarded) rather than compiled again.
"""

from __future__ import annotations

import torch
from torch._inductor import config as inductor_config

from adtr.errors import AdtrError, compile_failure
from adtr.export import ScoringModel


class CompiledScorer:
    """A :class:`ScoringModel` compiled with Inductor; :meth:`score_tensors` has the
    signature and meaning of :meth:`adtr.detector.Detector.score_tensors`.

    Args:
        scoring: the model, already on ``device``.
        precision: ``fp32`` or ``bf16`` (the network under autocast inside the compiled graph).
        device: where it runs.
    """

    def __init__(self, scoring: ScoringModel, precision: str, device: torch.device) -> None:
        self.scoring = scoring.eval()
        self.precision = precision
        self.device = device
        self.batch_sizes: set[int] = set()  # compiled so far
        self.graph = torch.compile(self.run, dynamic=False)

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scoring(images, self.precision)

    @torch.no_grad()
    def score_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> maps (B, S, S) and scores (B,), float32 on the CPU."""
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
            with inductor_config.patch(freezing=True, cpp_wrapper=self.device.type == "cpu"):
                maps, scores = self.graph(x)
        except Exception as exc:  # noqa: BLE001 - a compiler failure is an environment problem, said in one line
            if size in self.batch_sizes:
                raise
            raise AdtrError(f"{compile_failure(exc)}: use --engine torch") from exc
        self.batch_sizes.add(size)
        return maps[:n, 0].float().cpu(), scores[:n].float().cpu()
