"""Per-example clipped gradients for 12 workers: fast path vs torch.func vs Opacus vs the floor.

    python -m benchmarks.clipping                 # full table (b in 25, 150, 500, 1500)
    python -m benchmarks.clipping --batches 25,150 --repeats 5
    python -m benchmarks.clipping --conv          # conv nets: convnet (MNIST) and resnet_gn, b = 64, 256

Conv rows (``--conv``): the shipped ``convnet`` on MNIST-shaped inputs and ``resnet_gn`` (a
small ResNet with GroupNorm) on CIFAR-shaped inputs; all methods run interleaved, round-robin
in a rotating order within each repeat, so load drifts on a shared machine hit them alike; the
ratios are medians of the per-repeat ratios to the floor of the same repeat. Opacus runs both
ways existing codebases use it, looped over the 12 workers: ``GradSampleModule`` (per-sample
gradients, then clipping) and ``GradSampleModuleFastGradientClipping`` (its ghost-clipping
mode: norms by hooks, then a second, coefficient-weighted backward per worker).

The floor is one plain non-private forward + backward (mean loss, autograd) over the same
W*b examples: what an implementation without per-example clipping costs. Each method runs
in the same process on the same inputs; we report the median of the repeats after warm-up.
Opacus runs the way existing codebases do it: a GradSampleModule called once per worker,
then clipping of ``p.grad_sample``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tuneguard.privacy import clipped_gradients

CLIP = 2.0
SECTION = "DP gradients (benchmarks/clipping.py)"
CONV_SECTION = "DP gradients, conv nets (benchmarks/clipping.py --conv)"
#: model, input shape, model_params
CONV_MODELS = (("convnet", (1, 28, 28), {}), ("resnet_gn", (3, 32, 32), {"width": 8}))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))


def floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x.reshape(-1, *x.shape[2:])), y.reshape(-1))
    loss.backward()


def opacus_step(gsm, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    rows = []
    for w in range(x.shape[0]):
        for p in params:
            p.grad_sample = None
            p.grad = None
        loss = F.cross_entropy(gsm(x[w]), y[w])
        loss.backward()
        per = torch.cat([p.grad_sample.reshape(x.shape[1], -1) for p in params], dim=1)
        scale = (CLIP / (per.norm(dim=1) + 1e-6)).clamp(max=1.0)
        rows.append((per * scale[:, None]).mean(0))
    return torch.stack(rows)


def timeit(fn, repeats: int, warmup: int = 2, budget_s: float = 60.0) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def paired(fn_a, fn_b, repeats: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median ms of a and of b, and the median of the per-pair ratios b/a.

    a and b run back to back, alternating which goes first, so a change in machine load
    (a shared box) hits both members of a pair alike; the ratio is then robust to it.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb, ratios = [], [], []
    for r in range(repeats):
        order = (fn_a, fn_b) if r % 2 == 0 else (fn_b, fn_a)
        t = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            t[fn] = time.perf_counter() - t0
        ta.append(t[fn_a])
        tb.append(t[fn_b])
        ratios.append(t[fn_b] / t[fn_a])
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, statistics.median(ratios)


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"nproc={os.cpu_count()}, CPU={cpu}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--batches", default="25,150,500,1500")
    ap.add_argument("--repeats", type=int, default=30, help="repeats of the fast path and the floor")
    ap.add_argument("--slow-repeats", type=int, default=7, help="repeats of torch.func and Opacus")
    ap.add_argument("--skip-slow", action="store_true", help="only the fast path and the floor")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md (section 'DP gradients')")
    ap.add_argument("--conv", action="store_true", help="the conv-net rows (convnet, resnet_gn) instead of the MLP")
    ap.add_argument("--models", default=",".join(m for m, _, _ in CONV_MODELS), help="conv models to run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.conv:
        conv_main(args)
        return

    warnings.filterwarnings("ignore")  # Opacus' full-backward-hook warning, harmless here
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = mlp().to(dev)
    gsm = None
    if not args.skip_slow:
        from opacus import GradSampleModule

        gsm = GradSampleModule(mlp().to(dev))
        gsm._module.load_state_dict(model.state_dict())
    W = args.workers
    head = [
        f"W = {W} workers, 784-100-10 MLP (d = 79,510), C = {CLIP}, random MNIST-shaped inputs, device {dev}. "
        f"Median ms. fast / floor: median of the per-pair ratios of {args.repeats} back-to-back (alternating) "
        f"pairs; torch.func and Opacus: median of [n] runs after one warm-up.",
        "",
        "| b | floor: plain fwd+bwd (ms) | fast, out= reused (ms) | fast / floor | fast, fresh output (ms) "
        "| fresh / floor | torch.func generic (ms) | generic / floor | Opacus GSM, loop over workers (ms) | Opacus / floor |",
        "|" + "---|" * 10,
    ]
    print(f"# {machine()}")
    print("\n".join(head), flush=True)
    for b in [int(v) for v in args.batches.split(",")]:
        head.append(row(model, gsm, W, b, args))
        print(head[-1], flush=True)
    if args.write:
        import sys

        from benchmarks._common import write_section

        write_section(SECTION, "\n".join(head), "python -m benchmarks.clipping " + " ".join(sys.argv[1:]))


def synced(fn, dev: torch.device):
    """fn, then wait for the GPU (CUDA kernels run asynchronously)."""
    if dev.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(dev)

    return run


def row(model: nn.Module, gsm, W: int, b: int, args: argparse.Namespace) -> str:
    dev = next(model.parameters()).device
    x = torch.randn(W, b, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (W, b), device=dev)
    buf = torch.empty(W, sum(p.numel() for p in model.parameters()), device=dev)
    floor = synced(lambda: floor_step(model, x, y), dev)
    floor_ms, reuse_ms, ratio = paired(
        floor, synced(lambda: clipped_gradients(model, x, y, CLIP, method="fast", out=buf), dev), args.repeats
    )
    _, fresh_ms, fresh_ratio = paired(
        floor, synced(lambda: clipped_gradients(model, x, y, CLIP, method="fast"), dev), args.repeats
    )
    cells = [f"{floor_ms:.2f}", f"{reuse_ms:.2f}", f"**{ratio:.2f}x**", f"{fresh_ms:.2f}", f"{fresh_ratio:.2f}x"]
    if gsm is None:
        cells += ["-", "-", "-", "-"]
    else:
        gen_ms, ng = timeit(
            synced(lambda: clipped_gradients(model, x, y, CLIP, method="generic"), dev), args.slow_repeats, warmup=1
        )
        op_ms, no = timeit(synced(lambda: opacus_step(gsm, gsm._module, x, y), dev), args.slow_repeats, warmup=1)
        cells += [f"{gen_ms:.1f} [{ng}]", f"{gen_ms / floor_ms:.0f}x", f"{op_ms:.1f} [{no}]", f"{op_ms / floor_ms:.0f}x"]
    return f"| {b} | " + " | ".join(cells) + " |"


def opacus_ghost_step(gsm, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Opacus' ghost-clipping mode as its DPLossFastGradientClipping drives it, looped over workers:
    a backward of the per-example losses that fills the norms, then a second backward of the
    clip-coefficient-weighted loss (hooks off) whose .grad is the clipped sum."""
    params = list(model.parameters())
    rows = []
    for w in range(x.shape[0]):
        for p in params:
            p.grad = None
        loss = F.cross_entropy(gsm(x[w]), y[w], reduction="none")
        loss.sum().backward(retain_graph=True)
        coef = gsm.get_clipping_coef()
        for p in params:
            p.grad = None
        gsm.disable_hooks()
        (coef * loss).sum().backward()
        gsm.enable_hooks()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]) / x.shape[1])
    return torch.stack(rows)


def _cpu_s() -> float:
    """CPU seconds of this process, user + system (page faults count): what a call costs the
    machine, unlike wall time, which on a shared box also counts waiting for a core."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(
    fns: dict[str, object], repeats: int, warmup: int = 1
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median ms of each fn, the median per-repeat ratio to ``fns['floor']`` in wall time and
    the same in process CPU time; within a repeat the fns run back to back, the order rotating
    from repeat to repeat."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {k: [] for k in names}
    cpu_ratios: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        t, c = {}, {}
        for k in order:
            c0, t0 = _cpu_s(), time.perf_counter()
            fns[k]()
            t[k], c[k] = time.perf_counter() - t0, _cpu_s() - c0
        for k in names:
            times[k].append(t[k])
            ratios[k].append(t[k] / t["floor"])
            cpu_ratios[k].append(c[k] / c["floor"])
    return ({k: statistics.median(v) * 1e3 for k, v in times.items()},
            {k: statistics.median(v) for k, v in ratios.items()},
            {k: statistics.median(v) for k, v in cpu_ratios.items()})


def conv_main(args: argparse.Namespace) -> None:

    warnings.filterwarnings("ignore")
    dev = torch.device(args.device)
    W = args.workers
    batches = [int(v) for v in (args.batches if args.batches != "25,150,500,1500" else "64,256").split(",")]
    reps = args.repeats if args.skip_slow else min(args.repeats, args.slow_repeats)
    head = [
        f"W = {W} workers, C = {CLIP}, random inputs, device {dev}. All methods interleaved in one process "
        f"(round-robin, rotating order), {reps} repeats after one warm-up; median ms and the median of "
        "the per-repeat ratios to the floor of the same repeat (wall time; CPU: user + system time of the process, "
        "which waiting for a core on a loaded box does not inflate). fast = `clipped_gradients` (auto: ghost path) "
        "with a reused `out=`; generic = torch.func; Opacus GSM / ghost = GradSampleModule / "
        "GradSampleModuleFastGradientClipping called once per worker.",
        "",
        "| model (d) | b | floor (ms) | fast (ms) | fast / floor | fast / floor (CPU) | generic (ms) | generic / floor "
        "| Opacus GSM (ms) | GSM / floor | Opacus ghost (ms) | ghost / floor |",
        "|" + "---|" * 12,
    ]
    print(f"# {machine()}")
    print("\n".join(head), flush=True)
    wanted = args.models.split(",")
    for name, shape, params in CONV_MODELS:
        if name not in wanted:
            continue
        for b in batches:
            head.append(conv_row(name, shape, params, W, b, dev, args))
            print(head[-1], flush=True)
    if args.write:
        import sys

        from benchmarks._common import write_section

        write_section(CONV_SECTION, "\n".join(head), "python -m benchmarks.clipping " + " ".join(sys.argv[1:]))


def conv_row(name: str, shape: tuple, params: dict, W: int, b: int, dev: torch.device, args: argparse.Namespace) -> str:
    from tuneguard.models import build_model

    model = build_model(name, 0, input_shape=shape, params=params).to(dev)
    d = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(b)
    x = torch.randn(W, b, *shape, generator=g).to(dev)
    y = torch.randint(0, 10, (W, b), generator=g).to(dev)
    buf = torch.empty(W, d, device=dev)
    fns = {
        "floor": synced(lambda: floor_step(model, x, y), dev),
        "fast": synced(lambda: clipped_gradients(model, x, y, CLIP, out=buf), dev),
    }
    if not args.skip_slow:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        gsm_model = build_model(name, 0, input_shape=shape, params=params).to(dev)
        gsm = GradSampleModule(gsm_model)
        ghost_model = build_model(name, 0, input_shape=shape, params=params).to(dev)
        ghost = GradSampleModuleFastGradientClipping(ghost_model, max_grad_norm=CLIP, use_ghost_clipping=True,
                                                     loss_reduction="sum")
        fns["generic"] = synced(lambda: clipped_gradients(model, x, y, CLIP, method="generic"), dev)
        fns["gsm"] = synced(lambda: opacus_step(gsm, gsm_model, x, y), dev)
        fns["ghost"] = synced(lambda: opacus_ghost_step(ghost, ghost_model, x, y), dev)
        # the same numbers, or the comparison means nothing
        ref = clipped_gradients(model, x[:2], y[:2], CLIP, method="generic").grads
        for other in (opacus_step(gsm, gsm_model, x[:2], y[:2]), opacus_ghost_step(ghost, ghost_model, x[:2], y[:2]),
                      clipped_gradients(model, x[:2], y[:2], CLIP).grads):
            err = float((other - ref).abs().max() / ref.abs().max())
            assert err < 1e-4, f"{name}: a method disagrees with torch.func by {err:.2e} (relative)"
    ms, ratio, cpu = interleaved(fns, args.repeats if args.skip_slow else min(args.repeats, args.slow_repeats))
    del fns  # Opacus' hooks keep activations of the last call alive
    cells = [f"{ms['floor']:.1f}", f"{ms['fast']:.1f}", f"**{ratio['fast']:.2f}x**", f"{cpu['fast']:.2f}x"]
    for k in ("generic", "gsm", "ghost"):
        cells += [f"{ms[k]:.0f}", f"{ratio[k]:.1f}x"] if k in ms else ["-", "-"]
    return f"| {name} ({d:,}) | {b} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
