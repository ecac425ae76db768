"""Speed against the limits of this machine: roofline, FLOPs, latency, training throughput.

    python benchmarks/speed.py [--run RUN] [--threads N]

1. Roofline: the matrix-multiply throughput this machine delivers (a large fp32 and a
   bf16 matmul, timed first, in the same process).
2. FLOPs of the model per image (backbone, transformer + map), counted by
   ``torch.utils.flop_counter``; a training step on cached features is counted as 3x its
   forward pass (backward = 2x forward).
3. Latency: ms/image at batch 1 and 32 for backbone, transformer (+ map and score) and
   total, in fp32 and with bf16 autocast (bf16 only where the hardware has fast bf16,
   unless ``--precisions`` asks for it), image already decoded; images/s; the fraction
   of the roofline achieved (FLOPs / time / matmul throughput of that precision).
4. Training: GFLOP/s of a step (forward, backward, AdamW) at the default batch size,
   eager and compiled (``fit --compile``; its compile time in speed.json).
5. Peak resident memory, and the agreement of bf16 with the fp32 reference.
6. onnxruntime: ms/image at both batch sizes for the exported full model (one ONNX
   graph: backbone, transformer, map and score; ``adtr export``), same thread count.
7. torch.compile (``--engine compile``): the same full model compiled by Inductor, in
   the same precisions (and int8 where it runs: x86 CPUs with torchao), ms/image at both
   batch sizes, compile time, agreement with eager fp32.

``--before results/speed_before.json`` adds that earlier result beside this one (the
committed tables compare with the run before this project's optimisations).

Writes ``speed.json`` and ``speed.md``. Without ``--run`` the model is built from the
default config with packaged backbone weights and an untrained transformer (speed does
not depend on the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch

from provenance import (git_commit, machine_description, short_commit,  # benchmarks/ is on sys.path when run
                        write_results)

HERE = Path(__file__).resolve().parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warmup: int = 2, device: torch.device = torch.device("cpu")) -> float:
    return interleaved_median_seconds({"fn": fn}, repeats, warmup, device)["fn"]


def interleaved_median_seconds(fns: dict, repeats: int, warmup: int = 2,
                               device: torch.device = torch.device("cpu")) -> dict:
    """Median seconds of each of ``fns``, timed in turns (the order reversed every round), so
    that a machine that slows down or speeds up meanwhile weighs on all of them alike."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def matmul_gflops(dtype: torch.dtype, device: torch.device, repeats: int = 10, enough_seconds: float = 0.25) -> float:
    """GFLOP/s of a large square matmul: n doubles from 256 to 2048 (8192 on a GPU) and stops
    once one product takes ``enough_seconds``. A CPU without bf16 hardware (AVX2 only) runs
    bf16 at about 1 GFLOP/s per thread (measured 0.87), where one 2048 product takes 20 s."""
    top, n = (2048 if device.type == "cpu" else 8192), 256
    while True:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        one = median_seconds(lambda: a @ b, 1, warmup=1, device=device)
        if n >= top or one >= enough_seconds:
            break
        n *= 2
    repeats = max(3, min(repeats, int(2.0 / max(one, 1e-9))))
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, device=device) / 1e9


def count_flops(fn) -> int:
    """FLOPs of ``fn()``; call it on modules without trainable parameters (the counter's
    module tracker trips over parameters that require grad inside no_grad).

    torch's counter has a formula for the GPU attention kernels but none for the CPU's
    (``_scaled_dot_product_flash_attention_for_cpu``), so on a CPU it counted attention as
    free: 0.80 of the default model's 5.24 GFLOP per image went uncounted in every table
    before 2026-12-07. The GPU kernels' formula (two matmuls of L x L x head size per head)
    is given to it here.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def build(run: Path | None):
    from adtr.config import RunConfig
    from adtr.detector import Detector
    from adtr.engine import build_backbone, build_model

    if run is not None:
        det = Detector.load(run, device="cpu")
        return det.network.backbone, det.network.model, det.config
    cfg = RunConfig()
    backbone = build_backbone(cfg.model)
    return backbone, build_model(cfg.model, backbone.out_channels).eval(), cfg


def onnx_latency(backbone, model, cfg, images: torch.Tensor, batches, device: torch.device) -> dict:
    """ms/image of the exported full model (backbone, transformer, map, score) in onnxruntime.

    Exports ``backbone`` + ``model`` as ``adtr export`` does, into a temporary folder (no
    run needed), with as many threads as torch uses. ``{"skipped": reason}`` without onnxruntime.
    """
    import tempfile

    try:
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"{exc.name} is not installed"}
    from adtr.export import OnnxScorer, ScoringModel, onnx_bytes
    from adtr.models.adtr import ADTRDetector

    size = cfg.model.image_size
    network = ADTRDetector(copy.deepcopy(backbone).cpu(), copy.deepcopy(model).cpu())
    scoring = ScoringModel(network, size, cfg.score.sigma, cfg.score.pool_size).eval()
    x = images.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        try:
            path.write_bytes(onnx_bytes(scoring, metadata={"image_size": str(size), "threshold": "nan"}))
        except Exception as exc:  # noqa: BLE001 - keep the torch measurements; report why the rows are missing
            return {"skipped": f"export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
        export_s = time.perf_counter() - t
        scorer = OnnxScorer(path, device, threads=torch.get_num_threads())
        latency = {}
        for bs in batches:
            t = median_seconds(lambda: scorer.score_tensors(x[:bs]), 20 if bs == 1 else 3)
            latency[f"b{bs}"] = {"ms_total": 1000 * t / bs, "images_per_s": bs / t}
        with torch.no_grad():
            ref = scoring(x[:2])[0][:, 0]
        diff = float((scorer.score_tensors(x[:2])[0] - ref).abs().max() / ref.abs().max())
        file_mb = path.stat().st_size / 2**20
    return {"ort_version": onnxruntime.__version__, "provider": scorer.provider, "threads": torch.get_num_threads(),
            "export_seconds": export_s, "file_mb": file_mb, "latency": latency, "max_relative_map_difference": diff}


def timed_precisions(requested: list[str], fast_bf16: bool) -> list[str]:
    """The precisions to time: ``auto`` is fp32, plus bf16 where the hardware has fast bf16."""
    chosen = set(requested) - {"auto"}
    if "auto" in requested:
        chosen |= {"fp32", "bf16"} if fast_bf16 else {"fp32"}
    return [p for p in ("fp32", "bf16") if p in chosen]


def int8_if_supported(device: torch.device) -> list[str]:
    """``["int8"]`` where ``--precision int8`` runs (x86 CPU with torchao), else nothing."""
    from adtr.errors import AdtrError
    from adtr.quantize import require_int8_support

    try:
        require_int8_support(device)
    except AdtrError as exc:
        print(f"compiled int8 rows skipped: {exc}")
        return []
    return ["int8"]


def compiled_latency(backbone, model, cfg, images: torch.Tensor, batches, device: torch.device,
                     precisions=("fp32", "bf16")) -> dict:
    """ms/image of the full model (backbone, transformer, map, score) under torch.compile,
    in each of ``precisions``, and its largest differences from eager fp32."""
    from adtr.compiled import CompiledScorer
    from adtr.errors import AdtrError
    from adtr.export import ScoringModel
    from adtr.models.adtr import ADTRDetector

    scoring = ScoringModel(ADTRDetector(backbone, model), cfg.model.image_size, cfg.score.sigma,
                           cfg.score.pool_size).eval()
    with torch.no_grad():
        ref_maps, ref_scores = scoring(images)
    result = {}
    for precision in precisions:
        scorer = CompiledScorer(scoring, precision, device)
        row = {}
        for bs in batches:
            t = time.perf_counter()
            try:
                maps, scores = scorer.score_tensors(images[:bs])  # compiles for this batch size
            except AdtrError as exc:  # no compiler here: keep the other measurements
                return {"skipped": str(exc)}
            row[f"compile_seconds_b{bs}"] = time.perf_counter() - t
            t = median_seconds(lambda: scorer.score_tensors(images[:bs]), 20 if bs == 1 else 3, device=device)
            row[f"b{bs}"] = {"ms_total": 1000 * t / bs, "images_per_s": bs / t}
        row["max_relative_map_difference"] = float((maps - ref_maps[:, 0].cpu()).abs().max() / ref_maps.abs().max())
        row["max_relative_score_difference"] = float(((scores - ref_scores.cpu()).abs() / ref_scores.abs().cpu()).max())
        result[precision] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a run folder (default: untrained default model)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--batches", type=int, nargs=2, default=[1, 32], help="the two batch sizes timed")
    parser.add_argument("--name", default="speed", help="output file stem (default speed)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--before", type=Path, help="an earlier speed.json to show beside this run")
    parser.add_argument("--skip", nargs="+", default=[], choices=["compiled", "onnx"],
                        help="leave out these rows (e.g. onnx where onnxruntime has no GPU provider)")
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                        help="precisions timed (default auto: fp32, and bf16 where the hardware has fast bf16; "
                             "without it bf16 runs at a few GFLOP/s and its rows would take many minutes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from adtr.engine import autocast
    from adtr.models.adtr import reconstruction_loss
    from adtr.postprocess import image_score, pixel_anomaly_map

    from adtr.engine import TrainingForward, bf16_is_fast, default_device, fit_optimizer

    cpu = default_device()  # the device everything below runs on: CUDA when present
    fast_bf16 = bf16_is_fast(cpu)
    precisions = timed_precisions(args.precisions, fast_bf16)
    roof = {"fp32": matmul_gflops(torch.float32, cpu), "bf16": matmul_gflops(torch.bfloat16, cpu)}
    backbone, model, cfg = build(args.run)
    backbone, model = backbone.to(cpu), model.to(cpu)
    size = cfg.model.image_size
    images = torch.rand(max(args.batches), 3, size, size, device=cpu)

    def head(feats, net=model, precision="fp32"):
        """Transformer, map and score, as ``ScoringModel`` does them: the map in fp32 always."""
        with autocast(precision, cpu):
            out = net(feats)
        pmap = pixel_anomaly_map(out.anomaly_map.float(), (size, size), cfg.score.sigma)
        return image_score(pmap, cfg.score.pool_size)

    with torch.no_grad():
        feats32 = backbone(images)
        flops_backbone = count_flops(lambda: backbone(images[:1]))
        frozen = copy.deepcopy(model).requires_grad_(False)
        flops_head = count_flops(lambda: head(feats32[:1], frozen))

    latency = {}
    for precision in precisions:
        for bs in args.batches:
            x, f = images[:bs], feats32[:bs]
            reps = 20 if bs == 1 else 3
            with torch.no_grad():
                with autocast(precision, cpu):
                    t_backbone = median_seconds(lambda: backbone(x), reps, device=cpu)
                t_head = median_seconds(lambda: head(f, precision=precision), reps, device=cpu)
            total = t_backbone + t_head
            flops = (flops_backbone + flops_head) * bs
            latency[f"{precision}_b{bs}"] = {
                "ms_backbone": 1000 * t_backbone / bs, "ms_transformer": 1000 * t_head / bs,
                "ms_total": 1000 * total / bs, "images_per_s": bs / total,
                "roofline_fraction": flops / total / 1e9 / roof[precision],
                "ms_at_roofline": 1000 * (flops_backbone + flops_head) / 1e9 / roof[precision],
            }

    compiled = {"skipped": "--skip compiled"} if "compiled" in args.skip else \
        compiled_latency(backbone, model, cfg, images, args.batches, cpu, precisions + int8_if_supported(cpu))
    onnx = {"skipped": "--skip onnx"} if "onnx" in args.skip else \
        onnx_latency(backbone, model, cfg, images, args.batches, cpu)
    if "skipped" in onnx:
        print(f"onnxruntime rows skipped: {onnx['skipped']}")

    agreement = None
    if "bf16" in precisions:
        with torch.no_grad():
            ref = head(feats32[:8])
            fast = head(feats32[:8], precision="bf16")
        agreement = float(((fast - ref).abs() / ref.abs().clamp_min(1e-6)).max())

    train = {}
    batch = feats32[: cfg.train.batch_size]
    model.train()
    opts = {p: fit_optimizer(model, cfg.train, cpu, lr=1e-6, precision=p) for p in precisions}  # fit's, per precision

    def step(precision, forward=model):
        opt = opts[precision]
        with autocast(precision, cpu):
            loss = reconstruction_loss(forward(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():  # backward costs about twice the forward (the usual 3x rule for a training step)
        step_flops = 3 * count_flops(lambda: frozen(batch))
    for precision in precisions:
        steps = {precision: lambda p=precision: step(p)}
        compile_seconds = None
        if "compiled" not in args.skip:
            forward = TrainingForward(model, len(batch))  # fit --compile
            compile_seconds = forward.prepare(batch, precision, cpu)
            if forward.graph is None:
                print(f"compiled {precision} training step skipped: torch.compile failed (see the warning above)")
            else:
                steps[f"{precision} compiled"] = lambda p=precision, f=forward: step(p, f)
        # Eager and compiled steps in turns: this machine's speed drifts by more than their difference.
        for key, t in interleaved_median_seconds(steps, 7, device=cpu).items():
            train[key] = {"ms_per_step": 1000 * t, "gflops_per_s": step_flops / t / 1e9,
                          "roofline_fraction": step_flops / t / 1e9 / roof[precision]}
            if key.endswith("compiled"):
                train[key]["compile_seconds"] = compile_seconds
    model.eval()

    machine = torch.cuda.get_device_name() if cpu.type == "cuda" else machine_description()
    result = {
        "commit": git_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": cpu.type, "machine": machine, "image_size": size,
        "backbone": cfg.model.backbone, "roofline_gflops": roof,
        "gflops_per_image": {"backbone": flops_backbone / 1e9, "transformer_map_score": flops_head / 1e9},
        "train_step_gflops": step_flops / 1e9, "train_batch_size": cfg.train.batch_size,
        "fast_bf16": fast_bf16, "precisions": precisions, "latency": latency, "compiled": compiled,
        "onnxruntime": onnx, "train": train, "bf16_max_relative_score_difference": agreement,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cpu.type == "cuda" else None,
    }
    before = json.loads(args.before.read_text()) if args.before else None
    write_results(args.out, args.name, result, markdown(result, before))


def markdown(r: dict, before: dict | None = None) -> str:
    g = r["gflops_per_image"]
    was = f"before (`{short_commit(before['commit'])[:7]}`)" if before else None

    def earlier(section: str, key: str, field: str, fmt: str = ".1f") -> str:
        value = before.get(section, {}).get(key, {}).get(field) if before else None
        return "" if not before else (" | n/a" if value is None else f" | {value:{fmt}}")

    lines = [
        f"# Speed on this machine ({r['device']}: {r['machine']}, {r['threads']} CPU threads, torch {r['torch']})\n",
        f"Commit `{short_commit(r['commit'])}`, {r['backbone']} at {r['image_size']}x{r['image_size']}.\n",
        f"Roofline (large square matmul): fp32 {r['roofline_gflops']['fp32']:.0f} GFLOP/s, "
        f"bf16 {r['roofline_gflops']['bf16']:.0f} GFLOP/s. Model: {g['backbone']:.2f} GFLOP backbone + "
        f"{g['transformer_map_score']:.2f} GFLOP transformer, map and score per image; a training step at batch "
        f"{r['train_batch_size']} (forward + backward on cached features): {r['train_step_gflops']:.1f} GFLOP.\n",
        "Eager PyTorch (`--engine torch`), image already decoded:\n",
        "| precision, batch | ms/img backbone | ms/img transformer + map + score | ms/img total | images/s | "
        "ms/img at the roofline | roofline fraction" + (f" | ms/img total {was}" if was else "") + " |",
        "|---|---|---|---|---|---|---|" + ("---|" if was else ""),
    ]
    for key, v in r["latency"].items():
        lines.append(f"| {key.replace('_b', ', batch ')} | {v['ms_backbone']:.1f} | {v['ms_transformer']:.1f} | "
                     f"{v['ms_total']:.1f} | {v['images_per_s']:.1f} | {v['ms_at_roofline']:.1f} | "
                     f"{v['roofline_fraction']:.2f}{earlier('latency', key, 'ms_total')} |")
    compiled = r.get("compiled")
    if compiled and "skipped" in compiled:
        lines.append(f"\ntorch.compile: skipped ({compiled['skipped']}).")
    elif compiled:
        lines += ["", "torch.compile (`--engine compile`): the whole model from image to map and score as one "
                  "Inductor graph, weights frozen into it; compiled once per batch size.\n",
                  "| precision, batch | ms/img total | images/s | roofline fraction | compile (s) | "
                  "max map difference from eager fp32 | max score difference |", "|---|---|---|---|---|---|---|"]
        flops = g["backbone"] + g["transformer_map_score"]
        fp32 = r["roofline_gflops"]["fp32"]  # int8's rows: against the fp32 roofline, the bound it has to beat
        for precision, row in compiled.items():
            for key in (k for k in row if k.startswith("b")):
                v = row[key]
                lines.append(f"| {precision}, batch {key[1:]} | {v['ms_total']:.1f} | {v['images_per_s']:.1f} | "
                             f"{flops / (v['ms_total'] / 1000) / r['roofline_gflops'].get(precision, fp32):.2f} | "
                             f"{row['compile_seconds_' + key]:.0f} | {row['max_relative_map_difference']:.1e} | "
                             f"{row['max_relative_score_difference']:.1e} |")
        lines.append("\n(differences relative to the largest map value and to each score" +
                     ("; int8: the transformer's linear layers in int8, one image at a time, its roofline fraction "
                      "against fp32's)" if "int8" in compiled else ")"))
    onnx = r.get("onnxruntime", {"skipped": "not measured"})
    if "skipped" in onnx:
        lines.append(f"\nonnxruntime: skipped ({onnx['skipped']}).")
    else:
        lines += ["", f"onnxruntime {onnx.get('ort_version', '')} ({onnx['provider']}, {onnx['threads']} threads): the "
                  "exported full model (`adtr export`), one graph from image to map and score; maps within "
                  f"{onnx['max_relative_map_difference']:.1e} of torch fp32 (relative to the largest value).\n",
                  "| engine, batch | ms/img total | images/s | torch fp32 ms/img total |", "|---|---|---|---|"]
        for key, v in onnx["latency"].items():
            ref = r["latency"].get(f"fp32_{key}", {}).get("ms_total", float("nan"))
            lines.append(f"| onnxruntime, batch {key[1:]} | {v['ms_total']:.1f} | {v['images_per_s']:.1f} | "
                         f"{ref:.1f} |")
    lines += ["", "| training step | ms | GFLOP/s | roofline fraction" + (f" | ms {was} | GFLOP/s {was}" if was else "")
              + " |", "|---|---|---|---|" + ("---|---|" if was else "")]
    for key, v in r["train"].items():
        lines.append(f"| {key} | {v['ms_per_step']:.0f} | {v['gflops_per_s']:.0f} | {v['roofline_fraction']:.2f}"
                     f"{earlier('train', key, 'ms_per_step', '.0f')}{earlier('train', key, 'gflops_per_s', '.0f')} |")
    compiles = [f"{key}: {v['compile_seconds']:.0f} s" for key, v in r["train"].items() if "compile_seconds" in v]
    if compiles:
        lines.append(f"\nCompiled training steps (`fit --compile`) first paid a one-off compilation "
                     f"({', '.join(compiles)}).")
    agreement = r.get("bf16_max_relative_score_difference")
    if agreement is None:
        why = ("this hardware has no fast bf16, so `--precision auto` runs fp32 here"
               if not r.get("fast_bf16", True) else "not asked for (`--precisions`)")
        lines.append(f"\nbf16 not timed: {why}. Peak RSS {r['peak_rss_mb']:.0f} MB.")
    else:
        lines.append(f"\nbf16 vs fp32 image scores (eager): max relative difference "
                     f"{agreement:.2e}. Peak RSS {r['peak_rss_mb']:.0f} MB.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
