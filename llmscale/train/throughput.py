"""Tokens/s, TFLOP/s per device and MFU against the device's dense bf16 peak."""

from typing import Dict, Optional

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
# Keys are matched as substrings of the device name, most specific first.
PEAK_BF16_TFLOPS = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def peak_tflops(device: torch.device) -> Optional[float]:
    """None for devices without a known peak (CPUs included): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


class ThroughputMeter:
    def __init__(self, flops_per_token: float, world_size: int, peak: Optional[float]):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak

    def measure(self, tokens: int, seconds: float) -> Dict[str, float]:
        tokens_per_s = tokens / seconds
        tflops_per_device = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        metrics = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops_per_device}
        if self.peak:
            metrics["mfu"] = tflops_per_device / self.peak
        return metrics
