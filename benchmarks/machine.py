"""The one-line description of the machine that benchmark tables are stamped with."""

import os
import platform
from pathlib import Path

import torch

# The vector extensions that set the speed of int8 and fp32 inference: hosts of the same "AMD EPYC, 2 cores"
# VM kind ran the same int8 students 1.5-2.3x apart (one of them had AVX2 alone, no VNNI).
VECTOR_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_int8": "AMX-INT8",
}


def describe_machine() -> str:
    """CPU model (family, model, vector extensions), usable cores, kernel and GPU (if any) of this machine."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if fields:
        flags = set(fields.get("flags", "").split())
        vector = ", ".join(name for flag, name in VECTOR_FLAGS.items() if flag in flags) or "no AVX2"
        cpu = (
            f"{fields.get('model name', cpu)} (family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}; {vector})"
        )
    described = f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}"
    if torch.cuda.is_available():
        described += f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return described
