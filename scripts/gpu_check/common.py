"""What both parts of the GPU check share: the device, synchronised timing, the environment record, the test
suite's own helpers, and a tiny tokenizer for tokenizer-less random models."""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import platform
import shutil
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch

from clover.io import device_timer

ROOT = Path(__file__).resolve().parents[2]  # the repository (tests/ and clover/ live here)


def pick_device(dry_run: bool) -> torch.device:
    """``cuda`` for the real run (an error when there is none: the check exists to run there), ``cpu`` dry."""
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
                         "use --dry-run to run the CPU version")
    return torch.device("cuda")


def timed(fn, device: torch.device, reps: int, warmup: int = 1) -> dict:
    """Median (and min, max) seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls, the device synchronised
    before and after each call so that asynchronous CUDA work is counted where it is launched."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        with device_timer(device) as timer:
            fn()
        times.append(timer.seconds)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:  # missing, or broken by a missing dependency
        return "missing"


def nvidia_smi() -> dict:
    """GPU name, driver and memory from ``nvidia-smi`` (empty when it is not there)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:  # the kernel module's version line names the driver too
        try:
            line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
            return {"driver": line.split("Kernel Module")[1].split()[0]}
        except (OSError, IndexError):
            return {}
    try:
        line = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    name, driver, memory = (x.strip() for x in line.split(",")[:3])
    return {"gpu_name_smi": name, "driver": driver, "gpu_memory_smi": memory}


def _tf32():
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # a torch release that only has the newer precision settings
        return None


def environment(device: torch.device) -> dict:
    """Where the numbers come from: device, driver, versions, date (UTC)."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "safetensors": _version("safetensors"),
        "tokenizers": _version("tokenizers"),
        "pytest": _version("pytest"),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   tf32_matmul=_tf32(), **nvidia_smi())
    else:
        env.update(gpu_name=None, driver=None, cpu=platform.processor() or platform.machine())
    return env


def header(env: dict) -> str:
    gpu = env.get("gpu_name") or "no GPU (CPU dry run)"
    return (f"gpu_check on {env['device']}: {gpu}, driver {env.get('driver') or '-'}, torch {env['torch']} "
            f"(CUDA {env['torch_cuda'] or '-'}), transformers {env['transformers']}, accelerate {env['accelerate']}, "
            f"{env['date_utc']}")


# ---- the test suite's helpers ---------------------------------------------------------------------------------------
def _pytest_stand_in() -> types.ModuleType:
    """Just enough of pytest for the test modules to import (their decorators become no-ops): the GPU machine may
    have no pytest, and the checks only call the modules' plain helper functions."""
    mod = types.ModuleType("pytest")

    def fixture(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f

    class Mark:
        def __getattr__(self, name):
            return lambda *a, **k: (lambda f: f)

    def unavailable(*args, **kwargs):
        raise RuntimeError("pytest is not installed (gpu_check imported the tests with a stand-in)")

    mod.fixture, mod.mark, mod.raises, mod.__version__ = fixture, Mark(), unavailable, "stand-in"
    return mod


def test_helpers() -> types.SimpleNamespace:
    """The device-neutral helpers of tests/ that the checks reuse (tiny HF checkpoints, random trees, the runtime's
    fp32 tolerance, the chi-square critical value, the draft+model builder)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    stand_in = importlib.util.find_spec("pytest") is None
    if stand_in:
        sys.modules["pytest"] = _pytest_stand_in()
    conftest = importlib.import_module("tests.conftest")
    test_base = importlib.import_module("tests.test_base")
    test_speculative = importlib.import_module("tests.test_speculative")
    return types.SimpleNamespace(save_tiny=conftest.save_tiny, random_tree=test_base.random_tree,
                                 ATOL=test_base.ATOL, RTOL=test_base.RTOL, make=test_speculative.make,
                                 chi2_critical=test_speculative.chi2_critical, pytest_stand_in=stand_in)


# ---- a tokenizer for random models ----------------------------------------------------------------------------------
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def save_char_tokenizer(folder: Path) -> int:
    """Save a fast character-level tokenizer (printable ASCII and newline, ChatML's special tokens; pad 0, bos 1,
    eos 2) into ``folder`` so that data generation can run on a random model; returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)
    return len(vocab)


def cast_parameters(model, dtype: torch.dtype):
    """Cast ``model``'s parameters (not its buffers) to ``dtype``: ``module.to(dtype)`` would also round
    transformers' RoPE ``inv_freq`` buffer to bf16, which its own bf16 loading keeps in fp32."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def hf_from_pretrained(folder, dtype: torch.dtype, device: torch.device):
    """transformers' own model from ``folder`` (saved in fp32), parameters cast to ``dtype``, on ``device``: the
    same weights as the runtime reads, with no dependence on how a transformers release spells its dtype argument."""
    from transformers import AutoModelForCausalLM

    return cast_parameters(AutoModelForCausalLM.from_pretrained(folder).to(device), dtype).eval()
