"""int8 inference on x86 CPUs: the transformer's linear layers in int8, everything else fp32.

    >>> det = Detector.load("runs/bottle", engine="compile", precision="int8")

Why only the linear layers: they hold 72% of the model's FLOPs (the encoder's and
decoder's projections and FFNs) and already run at the fp32 matmul roofline, so on a CPU
without fast bf16 int8 (VNNI) is the one way left to make them faster. The backbone's
convolutions, the attention itself and the anomaly map stay fp32: in a trial with static
scales, quantising the convolutions as well saved a further 1.4 ms at batch 1 but moved
maps by 2% of their largest value, where linear layers alone stay within about 1e-3
(benchmarks/results/int8_icelake.md: 1.17x faster than compiled fp32 at batch 1).

Dynamic quantisation (weights int8 per output channel, each activation's scale taken
from its own range at run time) rather than static: it needs no calibration images, so a
run loads into int8 as it is, and a part far from the training images cannot be clipped
by scales fitted to them. It goes through torchao's PT2E flow (``torch.export``, the x86
Inductor quantizer, ``convert_pt2e``); Inductor then lowers the quantised linears to
oneDNN int8 kernels, so int8 runs under :mod:`adtr.compiled` only.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from adtr.errors import AdtrError, first_line


def import_pt2e() -> tuple[Any, Any, Any]:
    """torchao's x86 quantizer module, ``prepare_pt2e`` and ``convert_pt2e``, imported without
    the deprecation notes torchao's import prints (about its internals, not the user's code)."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pytree_log.setLevel(logging.ERROR)
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise AdtrError(f"precision int8 needs torchao ({first_line(exc)}): pip install torchao") from exc
    finally:
        pytree_log.setLevel(level)
    return x86, prepare_pt2e, convert_pt2e


def require_int8_support(device: torch.device) -> tuple[Any, Any, Any]:
    """Raise a one-line error where int8 inference cannot run (not an x86 CPU, or no torchao);
    otherwise :func:`import_pt2e`'s modules."""
    if device.type != "cpu":
        raise AdtrError(f"precision int8 runs on x86 CPUs only (device {device.type}): use bf16 there")
    if "x86" not in torch.backends.quantized.supported_engines:
        raise AdtrError("precision int8 needs an x86 CPU (oneDNN int8 kernels); use fp32 or bf16 on this machine")
    return import_pt2e()


class QueryAsInput(nn.Module):
    """``scoring`` with its decoder query embedding taken as a second input instead of a weight.

    Why: Inductor fuses an int8 linear layer with the residual add after it and writes the
    sum into the residual's buffer. When that residual is a frozen constant (the decoder's
    first input is the learned query, and everything computed from it alone before the
    image enters is folded into constants too), each call changed the constant and scores
    drifted by 0.3% a call. A query passed in as a fresh copy on each call makes every
    residual a per-call buffer.
    """

    def __init__(self, scoring: nn.Module, name: str) -> None:
        super().__init__()
        self.scoring = scoring
        self.name = name

    def forward(self, images: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(self.scoring, {self.name: query}, (images,))


def quantize_linear_layers(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``model`` (eval, CPU, images -> outputs) with every ``nn.Linear`` dynamically
    quantised to int8, for ``torch.compile``: a graph module and the extra tensors to pass
    it after the images, each as a fresh copy per call (see :class:`QueryAsInput`).
    ``example`` fixes the input's shape except its batch size, which stays free."""
    x86, prepare_pt2e, convert_pt2e = require_int8_support(example.device)
    # Exported with a batch of two so the batch size stays symbolic (a batch of one is specialised).
    pair = example[:1].expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    query = next((name for name, _ in model.named_parameters() if name.endswith("query_embed")), None)
    extra = () if query is None else (model.get_parameter(query).detach().clone(),)
    wrapped = model if query is None else QueryAsInput(model, query)
    exported = torch.export.export(wrapped.eval(), (pair, *extra),
                                   dynamic_shapes=({0: batch}, *({} for _ in extra))).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_module_type_qconfig(nn.Linear, x86.get_default_x86_inductor_quantization_config(is_dynamic=True))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(pair, *extra)  # dynamic quantisation observes nothing ahead; one pass initialises the observers
    return convert_pt2e(prepared), extra
