"""Training throughput against the matmul peak measured in the same run.

Figures, for the demo preset and a larger configuration of the same sample shape:

- `matmul peak`: the best FLOP/s of square fp32 and bf16 `torch.mm` on this machine,
  with the same thread count as the training measurements;
- `training step`: one optimiser step as `models.train` runs it (masking, forward,
  masked loss, backward, gradient clipping, AdamW, schedule), on a batch already in
  memory, in fp32 and with bf16 autocast. Model FLOPs per step are counted with
  `torch.utils.flop_counter.FlopCounterMode` (matrix products and attention, forward and
  backward). Model FLOP utilisation (MFU) is FLOP/s over the peak of the same precision;
- `reference`: a plain pre-norm transformer encoder of the same width, depth, heads, MLP
  ratio, batch and token count (`models.mae.ViTBlock`: fused QKV projection,
  `scaled_dot_product_attention`, GELU MLP), with a linear token embedding and decoder, trained by the same optimiser
  on random data. `torch_encoder` is the same with `nn.TransformerEncoder(norm_first=True)`
  in place of the blocks;
- `data loader`: samples/s of the training DataLoader (sampler, epoch-keyed dataset,
  collation) over the real UK t2m data with 0 and 2 workers, against the rate at which
  one rank's training step consumes samples;
- `DDP scaling`: samples/s of `models.train` under torchrun with 1 and 2 gloo processes
  of one thread each, on the demo preset.

Results go to `bench-results/train.json` (or `--output`). The training section of
BENCHMARKS.md is rewritten only with `--update-page`, which `make bench` passes, or by a
full run (without `--quick`) that keeps the default `--output`. Run with `make bench`, or
`python tests/benchmarks/bench_train.py --quick` for a check.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from models.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.config import RunConfig, load_preset  # noqa: E402
from models.mae import ViTBlock  # noqa: E402
from models.objective import objective_for  # noqa: E402
from models.train import (  # noqa: E402
    DistributedContext,
    TrainingState,
    autocast,
    build_loader,
    build_optimizer,
    build_scheduler,
    move_to_device,
)

logger = logging.getLogger("bench_train")

UK_GRIB = Path("era5") / "era5-2mt-2019-03-uk.grib"
TRAIN_PERIOD = ("2019-03-01T00:00:00", "2019-03-24T23:00:00")
TEST_PERIOD = ("2019-03-25T00:00:00", "2019-03-31T23:00:00")
# The larger configuration: 512 wide, 6 blocks in all (5 encoder, 1 decoder), about
# 19 M parameters, with the demo's sample and batch. Wider matrices keep the matmul share
# of a step, and so the attainable MFU, higher than more blocks of the same width would.
LARGER = {"model.embed_dim": 512, "model.depth": 5, "model.num_heads": 8}
BENCHMARKS_PAGE = REPO_ROOT / "BENCHMARKS.md"
DEFAULT_OUTPUT = REPO_ROOT / "bench-results" / "train.json"
SECTION_TITLE = "## Training throughput"


# Measurement helpers


def interleaved_medians(
    steps: dict[str, Callable[[], Any]], warmup: int, min_rounds: int, min_seconds: float
) -> dict[str, float]:
    """Return the median wall time of each callable, calling them in turn, round after round.

    Interleaving exposes every callable to the same background load, so their ratios stay
    fair on a shared machine. Runs at least `min_rounds` rounds and `min_seconds`.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    started = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - started < min_seconds:
        for name, step in steps.items():
            begin = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


MATMUL_SIZE = 2048


def matmul(dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """Return a closure that multiplies two MATMUL_SIZE square matrices in `dtype`: 2 * MATMUL_SIZE**3 FLOPs."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device).to(dtype)

    def multiply() -> None:
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return multiply


def count_flops(step: Callable[[], Any]) -> int:
    """Return the FLOPs of the matrix products and attention in one call of `step`, forward and backward."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


# Models and steps


class ReferenceEncoder(nn.Module):
    """Plain pre-norm transformer encoder with a linear token embedding and decoder.

    tokens: [B, L, token_size] -> [B, L, token_size]. The blocks are the MAE model's plain
    `ViTBlock`s, or with `torch_layers` `nn.TransformerEncoder(norm_first=True)` layers.
    """

    def __init__(
        self, token_size: int, width: int, depth: int, heads: int, mlp_ratio: float, torch_layers: bool = False
    ) -> None:
        super().__init__()
        self.embedding = nn.Linear(token_size, width)
        if torch_layers:
            layer = nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=int(width * mlp_ratio), dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True,
            )
            self.encoder: nn.Module = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        else:
            self.encoder = nn.Sequential(*(ViTBlock(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, token_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.encoder(self.embedding(tokens))))


def training_step(
    model: nn.Module, loss_of: Callable[[], torch.Tensor], config: RunConfig, precision: str, device: torch.device
) -> Callable[[], None]:
    """Return a closure that runs one optimiser step as `models.train.train_loop` does."""
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)

    def step() -> None:
        with autocast(precision, device):
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def forward_backward(loss_of: Callable[[], torch.Tensor], precision: str, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        with autocast(precision, device):
            loss = loss_of()
        loss.backward()

    return run


def measure_model(config: RunConfig, batch: Any, device: torch.device, quick: bool) -> dict[str, Any]:
    """Measure tokens/s and MFU of the AtmoRep objective and of the reference encoder, fp32 and bf16.

    The matmul peaks are timed in the same rounds as the training steps.
    """
    objective = objective_for(config)
    tokens_per_sample = objective.tokens_per_sample()
    tokens_per_step = tokens_per_sample * config.train.batch_size
    batch = move_to_device(batch, device)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = objective.build_model().to(device)
    model.train()

    # The reference has as many blocks as the model has transformer blocks in all, and
    # tokens of the same size: the sample's input values over its token count.
    width, depth = config.model.embed_dim, len(objective.checkpoint_modules(model))
    inputs = batch[0].values() if isinstance(batch[0], dict) else [batch[0]]
    token_size = sum(tensor[0].numel() for tensor in inputs) // tokens_per_sample
    reference_tokens = torch.randn(config.train.batch_size, tokens_per_sample, token_size, device=device)
    reference_target = torch.randn_like(reference_tokens)

    def atmorep_loss() -> torch.Tensor:
        return objective.loss(model, batch, generator)[0]

    def reference_loss_of(reference: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: nn.functional.mse_loss(reference(reference_tokens).float(), reference_target)

    models: dict[str, tuple[nn.Module, Callable[[], torch.Tensor]]] = {"atmorep": (model, atmorep_loss)}
    for name, torch_layers in (("reference", False), ("torch_encoder", True)):
        reference = ReferenceEncoder(
            token_size, width, depth, config.model.num_heads, config.model.mlp_ratio, torch_layers
        ).to(device)
        models[name] = (reference, reference_loss_of(reference))

    result: dict[str, Any] = {
        "parameters": {name: sum(p.numel() for p in module.parameters()) for name, (module, _) in models.items()},
        "tokens_per_step": tokens_per_step,
        "batch_size": config.train.batch_size,
        "width": width,
        "depth": depth,
    }
    steps: dict[str, Callable[[], Any]] = {}
    for name, (module, loss_of) in models.items():
        result[f"{name}_flops_per_step"] = count_flops(forward_backward(loss_of, "fp32", device))
        module.zero_grad(set_to_none=True)
        for precision in ("fp32", "bf16"):
            steps[f"{name}_{precision}"] = training_step(module, loss_of, config, precision, device)
    steps["peak_fp32"] = matmul(torch.float32, device)
    steps["peak_bf16"] = matmul(torch.bfloat16, device)

    seconds = interleaved_medians(steps, warmup=2, min_rounds=3, min_seconds=2.0 if quick else 20.0)
    peaks = {precision: 2 * MATMUL_SIZE**3 / seconds[f"peak_{precision}"] for precision in ("fp32", "bf16")}
    result["peak_gflops"] = {precision: peak / 1e9 for precision, peak in peaks.items()}
    logger.info("matmul peak: %.0f GFLOP/s fp32, %.0f GFLOP/s bf16", peaks["fp32"] / 1e9, peaks["bf16"] / 1e9)
    for name in models:
        flops = result[f"{name}_flops_per_step"]
        for precision in ("fp32", "bf16"):
            step_seconds = seconds[f"{name}_{precision}"]
            result[f"{name}_{precision}"] = {
                "seconds_per_step": step_seconds,
                "tokens_per_second": tokens_per_step / step_seconds,
                "samples_per_second": config.train.batch_size / step_seconds,
                "gflops_per_second": flops / step_seconds / 1e9,
                "mfu": flops / step_seconds / peaks[precision],
            }
            logger.info(
                "%s %s: %.3f s/step, %.0f tokens/s, %.1f GFLOP/s, MFU %.0f%%",
                name, precision, step_seconds, tokens_per_step / step_seconds, flops / step_seconds / 1e9,
                100 * flops / step_seconds / peaks[precision],
            )
    return result


# Data loader


def write_uk_zarr(mirror: Path, folder: Path) -> Path:
    """Normalise the real UK t2m GRIB with training-period statistics into a Zarr store, as ingestion does."""
    source = xr.open_dataset(mirror / UK_GRIB, engine="cfgrib", backend_kwargs={"indexpath": ""})
    t2m = source["t2m"].drop_vars([name for name in source["t2m"].coords if name not in source["t2m"].dims])
    train = t2m.sel(time=slice(*TRAIN_PERIOD))
    mean, std = float(train.mean()), float(train.std())
    ds = ((t2m - mean) / std).astype("float32").to_dataset(name="t2m")
    ds.attrs = {"train_period": list(TRAIN_PERIOD), "test_period": list(TEST_PERIOD)}
    path = folder / "uk.zarr"
    ds.chunk({"time": 24}).to_zarr(path, zarr_format=3, consolidated=False)
    return path


def measure_loader(config: RunConfig, zarr_path: Path, workers: int, quick: bool) -> float:
    """Return the samples/s of one rank's training DataLoader with `workers` worker processes."""
    config = config.model_copy(update={"train": config.train.model_copy(update={"num_workers": workers})})
    dataset = objective_for(config).open_dataset(zarr_path)
    context = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    loader, _ = build_loader(dataset, config, context, TrainingState())
    batches = 20 if quick else 100
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.train.batch_size / (time.perf_counter() - started)


# DDP scaling


LOG_RATE = re.compile(r"step (\d+)/\d+ loss \S+ lr \S+ ([0-9.]+) samples/s")


def measure_ddp(config: RunConfig, zarr_path: Path, processes: int, folder: Path, quick: bool) -> float:
    """Return the samples/s over all ranks of `models.train` under torchrun, after the first logged interval."""
    steps = 12 if quick else 40
    overrides = {"max_steps": steps, "log_every": steps // 4, "checkpoint_every": 10 * steps, "num_threads": 1}
    run_config = config.model_copy(update={"train": config.train.model_copy(update=overrides)})
    config_path = folder / f"ddp{processes}.json"
    config_path.write_text(run_config.model_dump_json())
    output_dir = Path(tempfile.mkdtemp(prefix=f"ddp{processes}-", dir=folder))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "-m", "models.train", "--config", str(config_path), "--output-dir", str(output_dir),
        "--dataset-path", str(zarr_path),
    ]
    env = {key: value for key, value in os.environ.items() if key != "ATMOREP_MLFLOW_RUN_ID"}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} processes failed:\n{completed.stderr[-4000:]}")
    rates = [float(rate) for step, rate in LOG_RATE.findall(completed.stderr) if int(step) > steps // 4]
    if not rates:
        raise RuntimeError(f"no throughput lines in the training log:\n{completed.stderr[-4000:]}")
    return statistics.mean(rates)


# Report


def check_goals(figures: dict[str, Any], loader: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Compare the measured figures with the throughput goals: value, goal and whether it is met, per goal."""
    larger = figures["larger"]
    values = {
        "loader headroom over training consumption": (loader["headroom"], 1.0),
        "larger config fp32 MFU": (larger["atmorep_fp32"]["mfu"], 0.70),
        "larger config fp32 throughput vs reference": (
            larger["atmorep_fp32"]["tokens_per_second"] / larger["reference_fp32"]["tokens_per_second"], 0.90
        ),
        "larger config bf16 throughput vs reference": (
            larger["atmorep_bf16"]["tokens_per_second"] / larger["reference_bf16"]["tokens_per_second"], 0.90
        ),
        "larger config bf16 speed-up over fp32": (
            larger["atmorep_bf16"]["tokens_per_second"] / larger["atmorep_fp32"]["tokens_per_second"], 1.3
        ),
    }
    return {name: {"value": value, "goal": goal, "met": value >= goal} for name, (value, goal) in values.items()}



def update_benchmarks_page(results: dict[str, Any]) -> None:
    """Replace the training section of BENCHMARKS.md (or append it), leaving other sections as they are."""
    lines = [
        SECTION_TITLE,
        "",
        f"Measured {results['date']} with `make bench` on {results['machine']}, torch threads: {results['threads']}, "
        f"torch {results['torch']}, with a 1-minute load average of "
        f"{results['load_average_1min']['start']:.1f} at the start and {results['load_average_1min']['end']:.1f} "
        "at the end (other processes share the cores and lower every figure). MFU is model FLOP/s (matrix products and attention, forward "
        "and backward, counted by `FlopCounterMode`) over the peak of the same precision: the median "
        f"FLOP/s of a {MATMUL_SIZE} x {MATMUL_SIZE} `torch.mm`, timed in the same rounds as the training steps, "
        "so that both see the same background load. `reference` is a plain pre-norm transformer encoder "
        "(fused QKV, `scaled_dot_product_attention`) of the same width, depth, heads, tokens and batch, and "
        "`torch_encoder` the same built from `nn.TransformerEncoder(norm_first=True)`.",
        "",
        "| config | parameters | tokens/step | model | precision | peak GFLOP/s | tokens/s | GFLOP/s | MFU "
        "| vs reference |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    for name, figures in results["configs"].items():
        for precision in ("fp32", "bf16"):
            for model in ("atmorep", "reference", "torch_encoder"):
                entry = figures[f"{model}_{precision}"]
                ratio = entry["tokens_per_second"] / figures[f"reference_{precision}"]["tokens_per_second"]
                parameters = figures["parameters"][model]
                lines.append(
                    f"| {name} | {parameters / 1e6:.1f} M | {figures['tokens_per_step']} | {model} | {precision} | "
                    f"{figures['peak_gflops'][precision]:.0f} | {entry['tokens_per_second']:.0f} | {entry['gflops_per_second']:.0f} | "
                    f"{100 * entry['mfu']:.0f}% | {ratio:.2f} |"
                )

    loader = results["loader"]
    ddp = results["ddp"]
    lines += [
        "",
        f"Data loader (demo preset, one rank): {loader['samples_per_second_0_workers']:.0f} samples/s in the "
        f"training process, {loader['samples_per_second_2_workers']:.0f} samples/s with 2 workers, against "
        f"{loader['consumed_fp32']:.0f} samples/s consumed by a fp32 step and {loader['consumed_bf16']:.0f} by a "
        f"bf16 step ({loader['headroom']:.0f} times headroom without workers).",
        "",
        f"DDP scaling (demo preset, torchrun, gloo, one thread per process, best of alternating runs): "
        f"{ddp['samples_per_second_1']:.0f} "
        f"samples/s with 1 process, {ddp['samples_per_second_2']:.0f} with 2, a speed-up of {ddp['speedup']:.2f} "
        f"({100 * ddp['efficiency']:.0f}% efficiency).",
        "",
        f"GPU: {results['gpu']}",
        "",
        "| goal | measured | target | met |",
        "| --- | ---: | ---: | --- |",
    ]

    for name, goal in results["goals"].items():
        lines.append(f"| {name} | {goal['value']:.2f} | {goal['goal']:.2f} | {'yes' if goal['met'] else 'no'} |")
    lines.append("")

    page = BENCHMARKS_PAGE.read_text() if BENCHMARKS_PAGE.exists() else "# Benchmarks\n"
    start = page.find(SECTION_TITLE)
    if start == -1:
        page = page.rstrip("\n") + "\n\n" + "\n".join(lines)
    else:
        following = page.find("\n## ", start + len(SECTION_TITLE))
        rest = page[following + 1 :] if following != -1 else ""
        page = page[:start] + "\n".join(lines) + ("\n" + rest if rest else "")
    atomic_write_bytes(BENCHMARKS_PAGE, lambda handle: handle.write(page.encode()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings, for a smoke test")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file of the results")
    parser.add_argument(
        "--update-page",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the training section of BENCHMARKS.md (default: only for a full run, without --quick, "
        "that keeps the default --output)",
    )
    arguments = parser.parse_args()
    update_page = arguments.update_page
    if update_page is None:
        update_page = not arguments.quick and arguments.output == DEFAULT_OUTPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(arguments.threads)
    device = torch.device("cpu")
    load_before = os.getloadavg()[0]

    mirror = Path(os.environ.get("ATMOREP_DATA_MIRROR", REPO_ROOT.parent / "shared" / "data"))
    demo = load_preset("demo")
    configs = {"demo": demo, "larger": load_preset("demo", LARGER)}
    with tempfile.TemporaryDirectory(prefix="atmorep-bench-train-") as folder:
        zarr_path = write_uk_zarr(mirror, Path(folder))
        dataset = objective_for(demo).open_dataset(zarr_path)
        batch = torch.utils.data.default_collate([dataset[index] for index in range(demo.train.batch_size)])

        figures = {name: measure_model(config, batch, device, arguments.quick) for name, config in configs.items()}

        loader = {f"samples_per_second_{workers}_workers": measure_loader(demo, zarr_path, workers, arguments.quick)
                  for workers in (0, 2)}
        loader["consumed_fp32"] = figures["demo"]["atmorep_fp32"]["samples_per_second"]
        loader["consumed_bf16"] = figures["demo"]["atmorep_bf16"]["samples_per_second"]
        loader["headroom"] = loader["samples_per_second_0_workers"] / max(loader["consumed_fp32"], loader["consumed_bf16"])
        logger.info("data loader: %s", loader)

        # Alternate the runs and keep each one's best, so a burst of background load on a
        # shared machine does not decide the ratio.
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(1 if arguments.quick else 2):
            for processes in rates:
                rates[processes].append(measure_ddp(demo, zarr_path, processes, Path(folder), arguments.quick))
        ddp = {f"samples_per_second_{processes}": max(values) for processes, values in rates.items()}
        ddp["speedup"] = ddp["samples_per_second_2"] / ddp["samples_per_second_1"]
        ddp["efficiency"] = ddp["speedup"] / 2
        logger.info("DDP: %s", ddp)

    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
        "threads": arguments.threads,
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "torch": torch.__version__,
        "configs": figures,
        "loader": loader,
        "ddp": ddp,
        "goals": check_goals(figures, loader),
        "gpu": "not measured: no CUDA device on this machine" if not torch.cuda.is_available()
        else "not measured: this benchmark times the CPU only",
        "quick": arguments.quick,
    }
    atomic_write_json(arguments.output, results)
    if update_page:
        update_benchmarks_page(results)
        logger.info("wrote %s and BENCHMARKS.md", arguments.output)
    else:
        logger.info("wrote %s; BENCHMARKS.md is unchanged (pass --update-page to rewrite it)", arguments.output)


if __name__ == "__main__":
    main()
