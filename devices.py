"""Device, precision and torch.compile: where a model runs and in which number format."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import subprocess
import sys
from typing import TYPE_CHECKING

from cli import UsageError, positive_int

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("korquad")


def pick_device(no_cuda: bool) -> torch.device:
    """The GPU when there is one (and --no_cuda is not given), else the CPU."""
    import torch

    if torch.cuda.is_available() and not no_cuda:
        # TF32 for whatever runs outside autocast (or all of it under --fp32) on Ampere and newer.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype: on a GPU bf16 where supported, else fp16 (unless --fp32); on a CPU only if asked."""
    import torch

    if args.fp16:
        if device.type != "cuda":
            raise UsageError("--fp16 needs a CUDA GPU; use --bf16 for mixed precision on a CPU")
        return torch.float16
    if args.bf16:
        if device.type == "cuda" and not has_native_bf16(device):
            raise UsageError("--bf16: this GPU has no native bfloat16 (it needs compute capability 8.0+); use --fp16")
        return torch.bfloat16
    if device.type == "cuda" and not args.fp32:
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return None


def has_native_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and newer. `torch.cuda.is_bf16_supported()` also says yes
    for older GPUs that only emulate bf16, slowly (a Colab T4), where fp16 is the right choice."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """One autocast context for the whole forward pass (a no-op in full precision)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    """--compile and its bucket width, shared by the entry points."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model, with CUDA-graph replay on a GPU (slower on a CPU).")
    parser.add_argument("--compile_bucket", type=positive_int, default=64,
                        help="With --compile, pad batches up to a multiple of this many pieces, so that a run "
                             "compiles one input shape per bucket.")


def check_compile_args(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse --compile where it cannot work, before any data is read."""
    if not args.compile:
        return
    if args.compile_bucket < 1:
        raise UsageError(f"--compile_bucket must be at least 1, got {args.compile_bucket}")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UsageError("--compile on a GPU needs Triton (pip install triton), or leave --compile off")
    else:
        check_cpu_compiler()


def check_cpu_compiler() -> None:
    """The C++ compiler TorchInductor will call on a CPU ($CXX, else g++; clang++ on macOS) must answer --version,
    as Inductor itself first asks it: a bogus CXX is found now, not as a traceback after the data is built."""
    chosen = os.environ.get("CXX")  # set but empty counts: Inductor then calls "" and fails
    compiler = chosen if chosen is not None else ("clang++" if sys.platform == "darwin" else "g++")
    try:
        subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        if chosen is not None:
            raise UsageError(f"--compile on a CPU: CXX={chosen or '(empty)'} is not a working C++ compiler "
                             f"(`{chosen} --version` failed); point CXX at g++ or clang++, unset it, or leave "
                             f"--compile off") from None
        raise UsageError("--compile on a CPU needs a C++ compiler (g++ or clang++, or set CXX); "
                         "install one or leave --compile off") from None


def compile_padding(args: argparse.Namespace, rows: int, max_width: int) -> dict:
    """collate_features arguments that keep a compiled model to one input shape per bucket (none without --compile)."""
    if not args.compile:
        return {}
    return {"pad_to_multiple": args.compile_bucket, "max_width": max_width, "pad_rows_to": rows}


def compile_model(model: torch.nn.Module, args: argparse.Namespace, device: torch.device,
                  max_width: int) -> torch.nn.Module:
    """`model` compiled for static, bucketed shapes (the model itself without --compile).

    On one GPU, mode "reduce-overhead" replays each shape as a CUDA graph: a step of this small model
    is bound by kernel launches, not arithmetic. The compiled module shares `model`'s parameters.
    """
    import torch

    if not args.compile:
        return model
    buckets = math.ceil(max_width / args.compile_bucket)
    # One graph per bucket, in training and in evaluation mode; past the limit torch falls back to eager.
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 2 * buckets + 2))
    # CUDA graphs cannot hold DDP's gradient all-reduce hooks: under torchrun, fused kernels only.
    distributed = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    mode = "reduce-overhead" if device.type == "cuda" and not distributed else None
    logger.info("compiling the model for up to %d sequence buckets of %d pieces (mode %s); the first batch "
                "of each bucket waits for its compilation", buckets, args.compile_bucket, mode or "default")
    return torch.compile(model, mode=mode, dynamic=False)
